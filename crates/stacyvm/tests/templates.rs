//! Templates that act, against the real binary on the native provider:
//! env, secrets (environment and files, from the server's secret store,
//! never in the database or the API), files and setup in a new sandbox; a
//! failed or endless setup is a typed error with no sandbox left; warm
//! pools fill, hand out set-up sandboxes, refill and drain.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;

const SECRET: &str = "s3cret-value-8f2a";
const ROTATED: &str = "rotated-value-91c4";
const FILE_SECRET: &str = "file-secret-27d0";

fn start(dir: &std::path::Path, extra: &[(&str, &str)]) -> common::Server {
    let mut env = vec![
        ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
        ("STACYVM_SECRET_API_KEY", FILE_SECRET),
    ];
    env.extend_from_slice(extra);
    common::Server::start(dir, &env)
}

/// The Prometheus metrics text.
async fn metrics(api: &common::Api) -> String {
    api.http
        .get(format!("{}/metrics/prometheus", api.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// Live sandboxes the server runs (pool ones included), from the metrics.
async fn running(api: &common::Api) -> u64 {
    metrics(api)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("stacyvm_sandboxes_total{state=\"running\"} "))
        .map_or(0, |v| v.trim().parse::<f64>().expect("number") as u64)
}

async fn wait_for(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !ok().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_apply_env_secrets_files_and_setup() {
    let dir = tempfile::tempdir().expect("dir");
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).expect("mkdir");
    std::fs::write(secrets.join("GH_TOKEN"), format!("{SECRET}\n")).expect("secret");
    let server = start(dir.path(), &[]);
    let api = common::Api::new(&server);

    let (s, t) = api
        .post(
            "/templates",
            json!({
                "name": "app",
                "image": "host",
                "env": {"APP_MODE": "test"},
                "secrets": [
                    {"name": "GH_TOKEN"},
                    {"name": "API_KEY", "inject_at": "/run/app/key"}
                ],
                "files": {"/workspace/app/config.txt": "hello from the template\n"},
                "setup": [
                    "mkdir -p /workspace/built && echo \"$APP_MODE\" > /workspace/built/mode",
                    "printf %s \"$GH_TOKEN\" | wc -c > /workspace/built/token",
                    "cat /workspace/app/config.txt > /workspace/built/config"
                ]
            }),
        )
        .await;
    assert_eq!(s, 201, "{t}");
    assert_eq!(
        t["files"]["/workspace/app/config.txt"],
        "hello from the template\n"
    );
    let text = t.to_string();
    assert!(
        !text.contains(SECRET) && !text.contains(FILE_SECRET),
        "{text}"
    );

    let sb = api.spawn(json!({"template": "app"})).await;
    let id = sb["id"].as_str().expect("id").to_string();
    assert!(
        !sb.to_string().contains("stacyvm.sys.") && !sb.to_string().contains(SECRET),
        "no hidden keys or secrets on the sandbox: {sb}"
    );
    let out = api
        .exec(
            &id,
            "cat /workspace/built/mode /workspace/built/token /workspace/built/config; \
             cat /run/app/key; echo; stat -c %a /run/app/key; echo \"$APP_MODE $GH_TOKEN\"",
        )
        .await;
    assert_eq!(
        out["stdout"].as_str().expect("stdout"),
        format!(
            "test\n{}\nhello from the template\n{FILE_SECRET}\n400\ntest {SECRET}\n",
            SECRET.len()
        ),
        "{out}"
    );
    // The request's environment wins over the template's.
    let (s, out) = api
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "echo $APP_MODE", "env": {"APP_MODE": "mine"}}),
        )
        .await;
    assert_eq!((s, out["stdout"].as_str()), (200, Some("mine\n")), "{out}");

    // Secrets are read at each use: a rotated one applies from the next exec.
    std::fs::write(secrets.join("GH_TOKEN"), ROTATED).expect("rotate");
    let out = api.exec(&id, "echo $GH_TOKEN").await;
    assert_eq!(out["stdout"], format!("{ROTATED}\n"));

    // Nothing secret at rest in the database: the exec log keeps the
    // output with the secrets redacted (waited for: it is written behind).
    let db_text = || {
        ["stacyvm.db", "stacyvm.db-wal"]
            .iter()
            .filter_map(|f| std::fs::read(dir.path().join(f)).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect::<String>()
    };
    wait_for("the exec log", async || db_text().contains("[REDACTED]")).await;
    for f in ["stacyvm.db", "stacyvm.db-wal"] {
        if let Ok(bytes) = std::fs::read(dir.path().join(f)) {
            let hay = String::from_utf8_lossy(&bytes);
            assert!(
                !hay.contains(SECRET) && !hay.contains(ROTATED) && !hay.contains(FILE_SECRET),
                "a secret value is in {f}"
            );
        }
    }

    // Callers cannot name secrets through reserved metadata.
    let (s, v) = api
        .post(
            "/sandboxes",
            json!({"metadata": {"stacyvm.sys.secret_env": "{\"X\":\"GH_TOKEN\"}"}}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"].as_str().expect("msg").contains("reserved"),
        "{v}"
    );

    // A secret the server lacks: 400 naming where it goes, nothing spawned.
    let (s, v) = api
        .post(
            "/templates",
            json!({"name": "needs", "image": "host", "secrets": [{"name": "NOT_THERE"}]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = api.post("/sandboxes", json!({"template": "needs"})).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .expect("msg")
            .contains("STACYVM_SECRET_NOT_THERE"),
        "{v}"
    );

    // Templates that do not parse.
    for (body, contains) in [
        (
            json!({"name": "b1", "image": "host", "secrets": [{"name": "../etc"}]}),
            "secret name",
        ),
        (
            json!({"name": "b2", "image": "host", "secrets": [{"name": "A", "inject_at": "rel/path"}]}),
            "inject_at",
        ),
        (
            json!({"name": "b3", "image": "host", "files": {"relative.txt": "x"}}),
            "absolute",
        ),
        (
            json!({"name": "b4", "image": "host", "setup": ["  "]}),
            "non-empty",
        ),
    ] {
        let (s, v) = api.post("/templates", body).await;
        assert_eq!(s, 400, "{v}");
        assert!(
            v["message"].as_str().expect("msg").contains(contains),
            "{v}"
        );
    }

    let (s, _) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_endless_setup_leaves_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let server = start(dir.path(), &[("STACYVM_DEFAULTS_MAX_EXEC_TIMEOUT", "2s")]);
    let api = common::Api::new(&server);
    let (s, v) = api
        .post(
            "/templates",
            json!({"name": "broken", "image": "host",
                   "setup": ["echo first-step-ran", "echo before; echo oops-on-stderr >&2; exit 3", "echo never"]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = api.post("/sandboxes", json!({"template": "broken"})).await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["code"], "SETUP_FAILED", "{v}");
    let msg = v["message"].as_str().expect("msg");
    assert!(
        msg.contains("step 2")
            && msg.contains("exited with code 3")
            && msg.contains("oops-on-stderr"),
        "{msg}"
    );
    let (s, v) = api
        .post(
            "/templates",
            json!({"name": "endless", "image": "host", "setup": ["sleep 600"]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let started = Instant::now();
    let (s, v) = api.post("/sandboxes", json!({"template": "endless"})).await;
    assert_eq!((s, v["code"].as_str()), (422, Some("SETUP_FAILED")), "{v}");
    assert!(
        v["message"]
            .as_str()
            .expect("msg")
            .contains("did not finish within 2s"),
        "{v}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the step was stopped"
    );
    let (_, list) = api.get("/sandboxes").await;
    assert_eq!(list, json!([]), "no sandbox left");
    assert_eq!(running(&api).await, 0, "none running either");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pools_fill_hand_out_refill_and_drain() {
    let dir = tempfile::tempdir().expect("dir");
    let server = start(dir.path(), &[]);
    let api = common::Api::new(&server);
    let (s, v) = api
        .post(
            "/templates",
            json!({"name": "warm", "image": "host", "pool_size": 2, "env": {"WARM": "1"},
                   "setup": ["echo warmed-by-setup > /workspace/w"]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let ready = async |api: &common::Api| -> i64 {
        let (_, t) = api.get("/templates/warm").await;
        t["pool"]["ready"].as_i64().unwrap_or(-1)
    };
    wait_for("two pool sandboxes", async || ready(&api).await == 2).await;
    let (_, list) = api.get("/sandboxes").await;
    assert_eq!(list, json!([]), "pool sandboxes are nobody's");
    assert_eq!(running(&api).await, 2);

    // A restart takes the pool back: still two, none spawned anew.
    drop(server);
    let server = start(dir.path(), &[]);
    let api = common::Api::new(&server);
    wait_for("the pool after a restart", async || ready(&api).await == 2).await;
    assert_eq!(running(&api).await, 2, "the same two, adopted");
    let (_, t) = api.get("/templates/warm").await;
    assert_eq!(t["pool"]["failures"], 0, "{t}");

    let sb = api
        .spawn(json!({"template": "warm", "metadata": {"who": "me"}, "ttl": "5m"}))
        .await;
    let id = sb["id"].as_str().expect("id").to_string();
    assert_eq!(sb["metadata"]["who"], "me", "{sb}");
    assert_eq!(sb["metadata"]["template"], "warm", "{sb}");
    let left = sb["expires_at"]
        .as_str()
        .expect("exp")
        .parse::<chrono::DateTime<chrono::Utc>>()
        .expect("time")
        - chrono::Utc::now();
    assert!(
        left <= chrono::Duration::minutes(5),
        "the caller's ttl: {left:?}"
    );
    let out = api.exec(&id, "cat /workspace/w; echo $WARM").await;
    assert_eq!(out["stdout"], "warmed-by-setup\n1\n", "{out}");
    let (_, list) = api.get("/sandboxes").await;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let (_, t) = api.get("/templates/warm").await;
    assert_eq!(t["pool"]["hits"], 1, "{t}");

    // Refilled behind the claim.
    wait_for("the pool to refill", async || ready(&api).await == 2).await;
    assert_eq!(running(&api).await, 3);
    let metrics = metrics(&api).await;
    assert!(
        metrics.contains("stacyvm_template_pool_hits_total{template=\"warm\"} 1"),
        "{metrics}"
    );

    // A request the template does not say is spawned fresh (and set up).
    let other = api
        .spawn(json!({"template": "warm", "memory_mb": 300}))
        .await;
    let other_id = other["id"].as_str().expect("id").to_string();
    let out = api.exec(&other_id, "cat /workspace/w").await;
    assert_eq!(out["stdout"], "warmed-by-setup\n");
    let (_, t) = api.get("/templates/warm").await;
    assert_eq!(t["pool"]["hits"], 1, "not from the pool: {t}");

    // A changed template drains the old pool and fills a new one.
    let (s, v) = api
        .call(
            reqwest::Method::PUT,
            "/templates/warm",
            json!({"image": "host", "pool_size": 1, "setup": ["echo v2 > /workspace/w"]}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    wait_for("the new pool", async || {
        ready(&api).await == 1 && running(&api).await == 3
    })
    .await;
    let sb = api.spawn(json!({"template": "warm"})).await;
    let v2 = sb["id"].as_str().expect("id").to_string();
    let out = api.exec(&v2, "cat /workspace/w").await;
    assert_eq!(out["stdout"], "v2\n", "{out}");

    // Deleting the template drains its pool (a refill still being set up
    // included): only the three claimed sandboxes stay.
    let (s, _) = api.delete("/templates/warm").await;
    assert_eq!(s, 200);
    for id in [id, other_id, v2] {
        let (s, _) = api.delete(&format!("/sandboxes/{id}")).await;
        assert_eq!(s, 200);
    }
    wait_for("the pool to drain", async || running(&api).await == 0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(running(&api).await, 0, "nothing refilled after the delete");
}
