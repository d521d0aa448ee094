//! Pool mode (`pool.enabled`) against the real binary, on native and on
//! docker (runc): sandboxes of different owners share one pool host yet
//! see nothing of each other; the host is nobody's sandbox (not listed, not
//! counted) and lives exactly as long as its last sandbox; a full pool
//! refuses or queues; a restart (kill -9) keeps pooled sandboxes working;
//! what a shared runtime cannot do per sandbox is a typed refusal.
//!
//! Needs root (native slots are uids of the sandbox's user namespace) and,
//! for docker, a running dockerd and the static agent (`scripts/test`).

mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

const DOCKER_IMAGE: &str = "stacyvm-test/docker-busybox:1";

async fn call(
    api: &common::Api,
    method: reqwest::Method,
    path: &str,
    owner: &str,
    body: Value,
) -> (u16, Value) {
    let mut r = api
        .http
        .request(method, format!("{}{path}", api.base))
        .header("X-User-ID", owner);
    if !body.is_null() {
        r = r.json(&body);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn spawn_as(api: &common::Api, owner: &str, body: Value) -> (u16, Value) {
    call(api, reqwest::Method::POST, "/sandboxes", owner, body).await
}

async fn sh(api: &common::Api, owner: &str, id: &str, command: &str) -> String {
    let (s, v) = call(
        api,
        reqwest::Method::POST,
        &format!("/sandboxes/{id}/exec"),
        owner,
        json!({ "command": command }),
    )
    .await;
    assert_eq!(s, 200, "exec {command:?} in {id}: {v}");
    v["stdout"].as_str().unwrap_or_default().to_string()
}

/// How many processes the sandbox sees whose command line has `sleep N`
/// (the pattern's space is escaped so the counting shell is not one).
fn count(n: u32) -> String {
    format!(
        "c=0; for d in /proc/[0-9]*; do l=$(tr '\\0' ' ' < $d/cmdline 2>/dev/null); \
         case \"$l\" in *sleep\\ {n}*) c=$((c+1));; esac; done; echo $c"
    )
}

async fn status(api: &common::Api) -> Value {
    let (s, v) = api.get("/pool/status").await;
    assert_eq!(s, 200, "{v}");
    v
}

struct Case {
    provider: &'static str,
    env: Vec<(&'static str, &'static str)>,
}

fn env_of(
    case: &Case,
    extra: &[(&'static str, &'static str)],
) -> Vec<(&'static str, &'static str)> {
    let mut env = vec![
        ("STACYVM_POOL_ENABLED", "true"),
        ("STACYVM_POOL_MAX_VMS", "1"),
        ("STACYVM_POOL_MAX_USERS_PER_VM", "2"),
        ("STACYVM_POOL_MEMORY_MB", "512"),
        ("STACYVM_POOL_VCPUS", "1"),
        ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
        ("STACYVM_DEFAULTS_SPAWN_QUEUE_TIMEOUT", "20s"),
        ("STACYVM_LOGGING_LEVEL", "info"),
    ];
    env.extend(case.env.iter().copied());
    env.extend(extra.iter().copied());
    env
}

async fn pool_mode(case: Case) {
    let dir = tempfile::tempdir().expect("dir");
    let provider = case.provider;
    let server = common::Server::start(dir.path(), &env_of(&case, &[]));
    let api = common::Api::new(&server);
    assert_eq!(
        status(&api).await,
        json!({"enabled": true, "vms": 0, "max_vms": 1, "total_users": 0, "max_users_per_vm": 2})
    );

    // Two owners, one host.
    let (s, a) = spawn_as(&api, "alice", json!({"provider": provider, "ttl": "10m"})).await;
    assert_eq!(s, 201, "{a}");
    let (s, b) = spawn_as(&api, "bob", json!({"provider": provider, "ttl": "10m"})).await;
    assert_eq!(s, 201, "{b}");
    let (a_id, b_id) = (
        a["id"].as_str().expect("id").to_string(),
        b["id"].as_str().expect("id").to_string(),
    );
    let host = a["vm_id"].as_str().expect("vm_id").to_string();
    assert!(!host.is_empty(), "a pooled sandbox names its host: {a}");
    assert_eq!(b["vm_id"].as_str(), Some(host.as_str()), "{b}");
    assert_eq!(a["provider"], provider, "{a}");
    let st = status(&api).await;
    assert_eq!(
        (st["vms"].as_i64(), st["total_users"].as_i64()),
        (Some(1), Some(2)),
        "{st}"
    );

    // The host is nobody's sandbox: not listed, not found, not counted.
    let (s, list) = api.get("/sandboxes").await;
    assert_eq!(s, 200, "{list}");
    let mut ids: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|v| v["id"].as_str())
        .collect();
    ids.sort_unstable();
    let mut want = vec![a_id.as_str(), b_id.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want, "only the pooled sandboxes are listed: {list}");
    let (s, v) = api.get(&format!("/sandboxes/{host}")).await;
    assert_eq!(s, 404, "the host is not an API sandbox: {v}");
    let (s, v) = api.delete(&format!("/sandboxes/{host}")).await;
    assert!(s == 404 || s == 200, "{s} {v}");
    assert_eq!(
        status(&api).await["vms"],
        1,
        "a DELETE of the host's id does nothing"
    );
    assert_eq!(
        common::cli(&server, &["pool"]).trim(),
        "pool hosts 1/1, sandboxes 2 (at most 2 per host)"
    );
    let (_, metrics) = api.get("/metrics/prometheus").await;
    let text = metrics.as_str().unwrap_or_default();
    assert!(text.contains("stacyvm_pool_hosts 1"), "{text}");
    assert!(text.contains("stacyvm_pool_sandboxes 2"), "{text}");

    // Separate users: files, processes and signals.
    let out = sh(
        &api,
        "alice",
        &a_id,
        "id -u; echo s3cret > /workspace/secret; chmod 644 /workspace/secret; (sleep 4242 &); echo ok",
    )
    .await;
    let a_uid: u32 = out
        .lines()
        .next()
        .expect("uid")
        .trim()
        .parse()
        .expect("uid");
    assert!(a_uid >= 10_000, "{out}");
    let out = sh(
        &api,
        "bob",
        &b_id,
        &format!(
            "id -u; ls -A /workspace | wc -l; cat /workspace/secret 2>/dev/null || echo none; {}",
            count(4242)
        ),
    )
    .await;
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_ne!(lines[0], a_uid.to_string(), "{out}");
    assert_eq!(
        &lines[1..],
        ["0", "none", "0"],
        "bob sees nothing of alice: {out}"
    );
    let (s, v) = call(
        &api,
        reqwest::Method::GET,
        &format!("/sandboxes/{b_id}/files?path=/workspace/secret"),
        "bob",
        Value::Null,
    )
    .await;
    assert_eq!(s, 404, "{v}");
    let _ = sh(&api, "bob", &b_id, "kill -9 -1 2>/dev/null; echo done").await;
    assert_eq!(sh(&api, "alice", &a_id, &count(4242)).await.trim(), "1");
    // What a shared runtime cannot do per sandbox: typed refusals.
    for path in ["pause", "snapshot"] {
        let (s, v) = call(
            &api,
            reqwest::Method::POST,
            &format!("/sandboxes/{a_id}/{path}"),
            "alice",
            Value::Null,
        )
        .await;
        assert_eq!(s, 409, "{path}: {v}");
        assert!(v.to_string().contains("pooled"), "{path}: {v}");
    }
    let (s, v) = spawn_as(
        &api,
        "carol",
        json!({"provider": provider, "volumes": [{"volume": "v", "path": "/data"}]}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v.to_string()
            .contains("volumes need a sandbox of their own"),
        "{v}"
    );
    // Full: one host of two.
    let (s, v) = spawn_as(&api, "carol", json!({"provider": provider})).await;
    assert_eq!(s, 429, "{v}");
    assert!(v.to_string().contains("vm pool at capacity"), "{v}");

    // kill -9 and a new server: the pooled sandboxes and their processes
    // are still there.
    let _ = std::process::Command::new("kill")
        .args(["-9", &server.pid().to_string()])
        .status();
    drop(server);
    let server = common::Server::start(
        dir.path(),
        &env_of(&case, &[("STACYVM_POOL_OVERFLOW", "queue")]),
    );
    let api = common::Api::new(&server);
    let st = status(&api).await;
    assert_eq!(
        (st["vms"].as_i64(), st["total_users"].as_i64()),
        (Some(1), Some(2)),
        "{st}: {}",
        std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
    );
    assert_eq!(
        sh(
            &api,
            "alice",
            &a_id,
            &format!("cat /workspace/secret; {}", count(4242))
        )
        .await,
        "s3cret\n1\n"
    );

    // Queue: a third owner waits for a slot, and gets alice's.
    let queued = {
        let api = common::Api::new(&server);
        tokio::spawn(async move {
            let started = Instant::now();
            let r = spawn_as(&api, "carol", json!({"provider": provider})).await;
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!queued.is_finished(), "a spawn into a full pool waits");
    let (s, v) = call(
        &api,
        reqwest::Method::DELETE,
        &format!("/sandboxes/{a_id}"),
        "alice",
        Value::Null,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let ((s, c), waited) = queued.await.expect("queued spawn");
    assert_eq!(s, 201, "{c}");
    assert!(waited >= Duration::from_millis(1400), "{waited:?}");
    let c_id = c["id"].as_str().expect("id").to_string();
    assert_eq!(c["vm_id"].as_str(), Some(host.as_str()), "{c}");
    // The slot came back clean: nothing of alice's.
    assert_eq!(
        sh(
            &api,
            "carol",
            &c_id,
            &format!("ls -A /workspace | wc -l; {}", count(4242))
        )
        .await,
        "0\n0\n"
    );

    // The host outlives none of its sandboxes and goes with the last.
    for (owner, id) in [("bob", &b_id), ("carol", &c_id)] {
        let (s, v) = call(
            &api,
            reqwest::Method::DELETE,
            &format!("/sandboxes/{id}"),
            owner,
            Value::Null,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        if owner == "bob" {
            assert_eq!(
                status(&api).await["vms"],
                1,
                "the host stays while carol is in it"
            );
        }
    }
    let st = status(&api).await;
    assert_eq!(
        (st["vms"].as_i64(), st["total_users"].as_i64()),
        (Some(0), Some(0)),
        "{st}"
    );
    if provider == "docker" {
        let out = common::docker(&["ps", "-a", "-q", "--filter", &format!("name={host}")]);
        assert!(
            String::from_utf8_lossy(&out.stdout).trim().is_empty(),
            "the host's container is gone"
        );
    }

    // Expiry: a pooled sandbox's time to live ends it, and its host.
    let (s, d) = spawn_as(&api, "dave", json!({"provider": provider, "ttl": "1s"})).await;
    assert_eq!(s, 201, "{d}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (s, v) = api.delete("/sandboxes").await;
    assert_eq!(s, 200, "{v}");
    let st = status(&api).await;
    assert_eq!(
        (st["vms"].as_i64(), st["total_users"].as_i64()),
        (Some(0), Some(0)),
        "{st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_mode_on_native() {
    pool_mode(Case {
        provider: "native",
        env: Vec::new(),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_mode_on_docker() {
    common::ensure_docker_image(DOCKER_IMAGE);
    pool_mode(Case {
        provider: "docker",
        env: vec![
            ("STACYVM_PROVIDERS_DOCKER_ENABLED", "true"),
            ("STACYVM_PROVIDERS_DOCKER_DEFAULT_IMAGE", DOCKER_IMAGE),
        ],
    })
    .await;
}
