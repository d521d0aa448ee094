//! Environment builds through the API and the CLI, as a user drives them,
//! on a real Debian base image (made by `scripts/test` with mmdebstrap:
//! no image can be pulled here) with packages from Debian's mirror and
//! PyPI: native and docker builds that install apt and pip packages and
//! spawn, layer reuse, a push to a loopback registry with a credential
//! that is a server secret (and one that is wrong), and the bad cases —
//! a package that does not exist, a base that does not exist, targets
//! that do not parse, a cancel mid-`apt-get`, a `kill -9` mid-build.

mod common;

use std::net::ToSocketAddrs;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BASE: &str = "stacyvm-test/debian:bookworm";
/// The docker test's sandbox network.
const DOCKER_NET: &str = "stacyvm-buildtest";

/// Removes the docker test's network, its bridge and the provider's
/// filter rules for it (found by their comment) when dropped.
struct NetworkGuard;

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", DOCKER_NET])
            .output();
        let mark = format!("stacyvm:{DOCKER_NET}");
        for chain in ["DOCKER-USER", "INPUT"] {
            let Ok(out) = Command::new("iptables").args(["-w", "-S", chain]).output() else {
                continue;
            };
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if !line.contains(&mark) || !line.starts_with("-A ") {
                    continue;
                }
                let mut args: Vec<String> = line
                    .split_whitespace()
                    .map(|w| w.trim_matches('"').to_string())
                    .collect();
                args[0] = "-D".into();
                let _ = Command::new("iptables").arg("-w").args(&args).output();
            }
        }
    }
}

/// The Debian base image `scripts/test` makes (mmdebstrap), imported into
/// the Docker engine once per test binary.
fn ensure_debian() {
    static ONCE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let tar = std::env::var("STACYVM_TEST_DEBIAN_TAR")
        .unwrap_or_else(|_| "/var/cache/stacyvm/base/debian-bookworm.tar".into());
    assert!(
        std::path::Path::new(&tar).is_file(),
        "the Debian base image {tar} is missing: scripts/test makes it (mmdebstrap); or set STACYVM_TEST_DEBIAN_TAR"
    );
    let out = Command::new("docker")
        .args(["import", &tar, BASE])
        .output()
        .expect("docker CLI (test setup only)");
    assert!(
        out.status.success(),
        "docker import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    *done = true;
}

/// The package mirrors' addresses as egress exceptions: where the
/// machine's resolver answers with an address of a reserved range (a
/// gateway proxy), sandboxes may reach it only when the operator says so.
fn mirror_allowance() -> String {
    let mut v: Vec<String> = Vec::new();
    for host in ["deb.debian.org", "pypi.org", "files.pythonhosted.org"] {
        if let Ok(addrs) = (host, 80).to_socket_addrs() {
            for a in addrs {
                if let std::net::IpAddr::V4(ip) = a.ip() {
                    let s = format!("{ip}/32");
                    if !v.contains(&s) {
                        v.push(s);
                    }
                }
            }
        }
    }
    v.join(",")
}

struct Env {
    dir: tempfile::TempDir,
    allow: String,
    docker: bool,
}

impl Env {
    fn new(docker: bool) -> Env {
        ensure_debian();
        Env {
            dir: tempfile::tempdir().expect("dir"),
            allow: mirror_allowance(),
            docker,
        }
    }

    fn vars(&self) -> Vec<(&str, &str)> {
        let mut v = vec![
            ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
            ("STACYVM_PROVIDERS_NATIVE_EGRESS_ALLOW", self.allow.as_str()),
            ("STACYVM_PROVIDERS_PROOT_ENABLED", "true"),
        ];
        if self.docker {
            v.push(("STACYVM_PROVIDERS_DOCKER_ENABLED", "true"));
            v.push(("STACYVM_PROVIDERS_DOCKER_EGRESS_ALLOW", self.allow.as_str()));
            // A sandbox network of the test's own, removed with its
            // filter rules at the end (NetworkGuard).
            v.push(("STACYVM_PROVIDERS_DOCKER_BRIDGE_NETWORK", DOCKER_NET));
        }
        v
    }

    fn start(&self) -> common::Server {
        common::Server::start(self.dir.path(), &self.vars())
    }

    /// `stacyvm image import --docker BASE` into this server's native store.
    fn import_native(&self) {
        let out = Command::new(env!("CARGO_BIN_EXE_stacyvm"))
            .args(["image", "import", "--docker", BASE])
            .env("STACYVM_SERVER_DATA_DIR", self.dir.path())
            .output()
            .expect("stacyvm image import");
        assert!(
            out.status.success(),
            "image import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn cli(&self, server: &common::Server, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_stacyvm"))
            .args(args)
            .env("STACYVM_URL", server.url.trim_end_matches("/api/v1"))
            .output()
            .expect("stacyvm CLI")
    }
}

async fn spec(api: &common::Api, body: Value) -> String {
    let (s, v) = api.post("/environments/specs", body).await;
    assert_eq!(s, 201, "{v}");
    v["id"].as_str().expect("spec id").to_string()
}

/// Polls a build until it ends (bounded).
async fn wait_build(api: &common::Api, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (s, v) = api.get(&format!("/environments/builds/{id}")).await;
        assert_eq!(s, 200, "{v}");
        if matches!(v["status"].as_str(), Some("ready" | "failed" | "canceled")) {
            return v;
        }
        assert!(Instant::now() < deadline, "build did not end: {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the build's current step starts with `prefix`.
async fn wait_step(api: &common::Api, id: &str, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, v) = api.get(&format!("/environments/builds/{id}")).await;
        let step = v["current_step"].as_str().unwrap_or_default();
        if step.starts_with(prefix) && v["log"].as_str().unwrap_or_default().contains("Get:") {
            return;
        }
        assert!(
            v["status"] == "queued" || v["status"] == "building",
            "build ended before {prefix:?}: {v}"
        );
        assert!(Instant::now() < deadline, "no step {prefix:?}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn sandboxes(api: &common::Api) -> Vec<Value> {
    let (s, v) = api.get("/sandboxes").await;
    assert_eq!(s, 200, "{v}");
    v.as_array().expect("list").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_builds_install_packages_spawn_and_reuse_their_layer() {
    let env = Env::new(false);
    env.import_native();
    let registry = common::Registry::start_with_auth(env.dir.path(), "natbot", "pw-native-1");
    std::fs::create_dir_all(env.dir.path().join("secrets")).expect("secrets dir");
    std::fs::write(env.dir.path().join("secrets/NAT_PW"), "pw-native-1").expect("secret");
    let server = env.start();
    let api = common::Api::new(&server);
    let (s, conn) = api
        .post(
            "/environments/registry-connections",
            json!({"provider": "registry", "host": registry.addr, "username": "natbot", "secret_ref": "NAT_PW"}),
        )
        .await;
    assert_eq!(s, 201, "{conn}");
    let spec_id = spec(
        &api,
        json!({
            "name": "Tools & Py",
            "base_image": BASE,
            "apt_packages": ["jq"],
            // A version range: `>` must reach pip, not the shell.
            "python_packages": ["six>=1.16,<2"],
            "python_version": "3.11",
        }),
    )
    .await;

    // The CLI follows the log on stderr and prints the image on stdout;
    // the image goes to the registry too.
    let out = env.cli(&server, &["env", "build", &spec_id, "--target", "registry"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "env build: {stderr}");
    let image = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        image.starts_with("local/stacyvm-env:tools---py-"),
        "{image:?}"
    );
    for line in [
        "==> step 4/",
        "Setting up jq",
        "Successfully installed six",
        "==> commit",
        "build ready",
    ] {
        assert!(stderr.contains(line), "no {line:?} in the log: {stderr}");
    }
    assert!(
        !env.dir.path().join("<2").exists() && !env.dir.path().join("=1.16,").exists(),
        "a package name reached the shell"
    );
    // What was pushed pulls into another store whole: the base's files
    // and the build's.
    let (_, list) = api.get("/environments/builds?limit=1").await;
    let pushed = list[0]["build"]["artifacts"][1].clone();
    assert_eq!(pushed["status"], "ready", "{list}");
    let other = tempfile::tempdir().expect("other store");
    let out = Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .args(["image", "pull", pushed["image_ref"].as_str().expect("ref")])
        .env("STACYVM_SERVER_DATA_DIR", other.path())
        .env("STACYVM_REGISTRY_USERNAME", "natbot")
        .env("STACYVM_REGISTRY_PASSWORD", "pw-native-1")
        .output()
        .expect("image pull");
    assert!(
        out.status.success(),
        "pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rootfs = std::fs::read_dir(other.path().join("native/images/rootfs"))
        .expect("rootfs")
        .flatten()
        .find(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .expect("pulled rootfs")
        .path();
    for f in [
        "usr/bin/jq",
        "usr/bin/python3",
        "etc/debian_version",
        "workspace",
    ] {
        assert!(rootfs.join(f).exists(), "{f} missing from the pulled image");
    }
    assert!(
        !rootfs
            .join("var/lib/apt/lists/partial")
            .join(".wh.")
            .exists(),
        "whiteouts are applied, not copied"
    );

    let sb = api.spawn(json!({ "image": image })).await;
    let id = sb["id"].as_str().expect("id");
    let out = api
        .exec(
            id,
            "jq -n '{a: 1}' -c; python3 -c 'import six; print(six.__name__)'; pwd; test -d /data && echo data",
        )
        .await;
    assert_eq!(out["stdout"], "{\"a\":1}\nsix\n/workspace\ndata\n", "{out}");
    // The sandbox's writes are its own, the image stays as built.
    api.exec(id, "rm /usr/bin/jq").await;
    let (s, _) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(s, 200);
    let again = api.spawn(json!({ "image": image })).await;
    let again_id = again["id"].as_str().expect("id");
    let out = api.exec(again_id, "jq --version").await;
    assert_eq!(out["exit_code"], 0, "{out}");
    api.delete(&format!("/sandboxes/{again_id}")).await;
    // PRoot runs the built image too, from a flattened copy.
    let sb = api
        .spawn(json!({ "image": image, "provider": "proot" }))
        .await;
    let pid = sb["id"].as_str().expect("id");
    let out = api
        .exec(
            pid,
            "jq -n '{a: 1}' -c; python3 -c 'import six; print(six.__name__)'",
        )
        .await;
    assert_eq!(out["stdout"], "{\"a\":1}\nsix\n", "{out}");
    api.delete(&format!("/sandboxes/{pid}")).await;

    // The same spec again: the layer is found by its cache key.
    let (s, b) = api
        .post("/environments/builds", json!({ "spec_id": spec_id }))
        .await;
    assert_eq!(s, 201, "{b}");
    let first: Value = {
        let (_, l) = api.get("/environments/builds?limit=2").await;
        l[1]["build"].clone()
    };
    let second = wait_build(&api, b["id"].as_str().expect("id")).await;
    assert_eq!(second["status"], "ready", "{second}");
    assert!(
        second["log"]
            .as_str()
            .unwrap_or_default()
            .contains("reusing"),
        "{second}"
    );
    assert_eq!(second["digest_local"], first["digest_local"], "{first}");
    // Build sandboxes are gone.
    assert!(sandboxes(&api).await.is_empty());

    // Logs from an offset, and the list with specs.
    let (s, v) = api
        .get(&format!(
            "/environments/builds/{}/logs?offset=6",
            second["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(s, 200);
    assert!(
        v.as_str().unwrap_or_default().starts_with("queued\n"),
        "{v}"
    );
    let (_, list) = api.get("/environments/builds").await;
    assert_eq!(list[0]["spec"]["id"], spec_id.as_str(), "{list}");
    // A Dockerfile with a build context, through the CLI: COPY of a
    // directory and of a renamed file, ENV for later steps, a relative
    // WORKDIR, RUN in both forms; a link in the context stays a link.
    let ctx = env.dir.path().join("ctx");
    std::fs::create_dir_all(ctx.join("app/lib")).expect("ctx");
    std::fs::write(ctx.join("app/main.py"), "print('hello from app')\n").expect("main");
    std::fs::write(ctx.join("app/lib/util.py"), "X = 1\n").expect("util");
    std::fs::write(ctx.join("settings.yml"), "mode: prod\n").expect("settings");
    std::os::unix::fs::symlink("/etc/shadow", ctx.join("app/secret")).expect("link");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {BASE}\nENV GREETING=\"hi there\" MODE=prod\nWORKDIR /srv\nWORKDIR site\nCOPY app app/\nCOPY settings.yml /etc/tool/config.yml\nRUN echo \"$GREETING $MODE\" > greeting && \\\n    python3 app/main.py > out.txt\nRUN [\"sh\", \"-c\", \"echo json-form > /srv/site/json\"]\n"
        ),
    )
    .expect("dockerfile");
    let out = env.cli(
        &server,
        &[
            "env",
            "create",
            "site",
            "--dockerfile",
            &ctx.join("Dockerfile").to_string_lossy(),
            "--context",
            &ctx.to_string_lossy(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let site = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = env.cli(&server, &["env", "build", &site]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let sb = api.spawn(json!({ "image": image })).await;
    let id = sb["id"].as_str().expect("id");
    let out = api
        .exec(
            id,
            "cd /srv/site && cat greeting out.txt json /etc/tool/config.yml app/lib/util.py && readlink app/secret",
        )
        .await;
    assert_eq!(
        out["stdout"], "hi there prod\nhello from app\njson-form\nmode: prod\nX = 1\n/etc/shadow\n",
        "{out}"
    );
    api.delete(&format!("/sandboxes/{id}")).await;
    // A context that leaves its root or holds a device is refused whole.
    for (name, kind) in [("../escape", b'0'), ("dev/tty", b'3')] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut body = h.to_vec();
        body.extend_from_slice(&[0u8; 1024]);
        let resp = api
            .http
            .put(format!("{}/environments/specs/{site}/context", api.base))
            .body(body)
            .send()
            .await
            .expect("put context");
        assert_eq!(resp.status(), 400, "{name}");
    }

    // The base image cannot go while a built image stands on it.
    let out = Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .args(["image", "rm", BASE])
        .env("STACYVM_SERVER_DATA_DIR", env.dir.path())
        .output()
        .expect("image rm");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is the base of"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_builds_push_with_a_secret_reference_and_refuse_wrong_credentials() {
    let _net = NetworkGuard;
    let env = Env::new(true);
    let registry = common::Registry::start_with_auth(env.dir.path(), "pushbot", "pw-9f3c1e");
    std::fs::create_dir_all(env.dir.path().join("secrets")).expect("secrets dir");
    std::fs::write(env.dir.path().join("secrets/REG_PW"), "pw-9f3c1e\n").expect("secret");
    let server = env.start();
    let api = common::Api::new(&server);
    let (s, conn) = api
        .post(
            "/environments/registry-connections",
            json!({"provider": "registry", "host": registry.addr, "username": "pushbot", "secret_ref": "REG_PW"}),
        )
        .await;
    assert_eq!(s, 201, "{conn}");
    let spec_id = spec(
        &api,
        json!({"name": "cli", "base_image": BASE, "apt_packages": ["jq"]}),
    )
    .await;
    let (s, b) = api
        .post(
            "/environments/builds",
            json!({"spec_id": spec_id, "provider": "docker", "targets": ["registry"]}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["artifacts"].as_array().map(Vec::len), Some(2), "{b}");
    let b = wait_build(&api, b["id"].as_str().expect("id")).await;
    assert_eq!(b["status"], "ready", "{b}");
    let pushed = b["artifacts"]
        .as_array()
        .expect("artifacts")
        .iter()
        .find(|a| a["target"] == "registry")
        .expect("registry artifact")
        .clone();
    assert_eq!(pushed["status"], "ready", "{pushed}");
    let target = pushed["image_ref"].as_str().expect("ref");
    assert!(target.starts_with(&format!("{}/pushbot/stacyvm-env:cli-", registry.addr)));
    // The registry has it, under the digest the build reports.
    let tag = target.rsplit(':').next().expect("tag");
    let resp = reqwest::Client::new()
        .get(format!(
            "http://{}/v2/pushbot/stacyvm-env/manifests/{tag}",
            registry.addr
        ))
        .basic_auth("pushbot", Some("pw-9f3c1e"))
        .header(
            "Accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .expect("registry");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("docker-content-digest")
            .and_then(|h| h.to_str().ok()),
        pushed["digest"].as_str(),
    );

    // The local image spawns on docker, with the packages.
    let local = b["artifacts"][0]["image_ref"].as_str().expect("local ref");
    let sb = api
        .spawn(json!({"image": local, "provider": "docker"}))
        .await;
    let id = sb["id"].as_str().expect("id");
    let out = api.exec(id, "jq --version && pwd").await;
    assert_eq!(out["stdout"], "jq-1.6\n/workspace\n", "{out}");
    api.delete(&format!("/sandboxes/{id}")).await;

    // A wrong password: the local image is made (reused), the push is
    // refused and says so; the secret appears nowhere.
    std::fs::write(env.dir.path().join("secrets/REG_PW"), "not-the-pw-77\n").expect("secret");
    let (s, b) = api
        .post(
            "/environments/builds",
            json!({"spec_id": spec_id, "provider": "docker", "targets": [conn["id"]]}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let b = wait_build(&api, b["id"].as_str().expect("id")).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert_eq!(b["artifacts"][0]["status"], "ready", "{b}");
    assert_eq!(b["artifacts"][1]["status"], "failed", "{b}");
    assert!(
        b["artifacts"][1]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("refused the credentials"),
        "{b}"
    );
    let text = b.to_string();
    let log = std::fs::read_to_string(env.dir.path().join("server.log")).unwrap_or_default();
    for secret in ["not-the-pw-77", "pw-9f3c1e"] {
        assert!(!text.contains(secret), "secret in the build: {text}");
        assert!(!log.contains(secret), "secret in the server log");
    }
    let (_, conns) = api.get("/environments/registry-connections").await;
    assert!(!conns.to_string().contains("REG_PW"), "{conns}");
    assert!(sandboxes(&api).await.is_empty());
    drop(server);
    let _ = Command::new("docker")
        .args(["image", "rm", "-f", local])
        .output();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_builds_fail_cleanly_cancel_stops_and_a_crash_is_settled() {
    let env = Env::new(false);
    env.import_native();
    let server = env.start();
    let api = common::Api::new(&server);

    // Targets and providers that cannot be: 400 before anything runs.
    let ok_spec = spec(&api, json!({"name": "ok", "base_image": BASE})).await;
    for (body, want) in [
        (
            json!({"spec_id": ok_spec, "targets": ["s3"]}),
            "invalid target",
        ),
        (
            json!({"spec_id": ok_spec, "targets": ["ghcr"]}),
            "no ghcr registry connection",
        ),
        (
            json!({"spec_id": ok_spec, "targets": ["rc-0000000000000000"]}),
            "not found",
        ),
        (json!({"spec_id": ok_spec, "provider": "nope"}), "nope"),
        (json!({"spec_id": "es-missing"}), "not found"),
        (json!({}), "spec_id is required"),
    ] {
        let (s, v) = api.post("/environments/builds", body.clone()).await;
        assert!(s == 400 || s == 404, "{body}: {s} {v}");
        assert!(
            v["message"].as_str().unwrap_or_default().contains(want),
            "{body}: {v}"
        );
    }
    let (s, v) = api.get("/environments/builds?limit=0").await;
    assert_eq!(s, 400, "{v}");

    // Dockerfiles outside the subset are refused when the spec is made,
    // naming the line; a COPY without an uploaded context fails the build.
    for (dockerfile, want) in [
        (
            format!("FROM {BASE}\nADD https://example.com/x /x\n"),
            "line 2: ADD is not supported",
        ),
        (format!("FROM {BASE} AS build\n"), "multi-stage"),
        ("RUN true\n".to_string(), "before FROM"),
    ] {
        let (s, v) = api
            .post(
                "/environments/specs",
                json!({"name": "df", "dockerfile": dockerfile}),
            )
            .await;
        assert_eq!(s, 400, "{v}");
        assert!(
            v["message"].as_str().unwrap_or_default().contains(want),
            "{v}"
        );
    }
    let (s, v) = api
        .post(
            "/environments/specs",
            json!({"name": "df", "base_image": "debian:trixie", "dockerfile": format!("FROM {BASE}\n")}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let no_ctx = spec(
        &api,
        json!({"name": "no-ctx", "dockerfile": format!("FROM {BASE}\nCOPY a /a\n")}),
    )
    .await;
    let (_, b) = api
        .post("/environments/builds", json!({"spec_id": no_ctx}))
        .await;
    let b = wait_build(&api, b["id"].as_str().expect("id")).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap_or_default()
            .contains("none was uploaded"),
        "{b}"
    );

    // A package Debian does not have: failed, the log kept with apt's
    // words, no sandbox left.
    let bad = spec(
        &api,
        json!({"name": "bad", "base_image": BASE, "apt_packages": ["no-such-package-stacyvm"]}),
    )
    .await;
    let (_, b) = api
        .post("/environments/builds", json!({"spec_id": bad}))
        .await;
    let b = wait_build(&api, b["id"].as_str().expect("id")).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap_or_default()
            .contains("exited with code 100"),
        "{b}"
    );
    assert!(
        b["log"]
            .as_str()
            .unwrap_or_default()
            .contains("Unable to locate package no-such-package-stacyvm"),
        "{b}"
    );
    assert_eq!(b["artifacts"][0]["status"], "failed", "{b}");
    let (s, v) = api
        .get(&format!(
            "/environments/builds/{}/spawn-config",
            b["id"].as_str().unwrap_or_default()
        ))
        .await;
    assert_eq!((s, v["ready"].clone()), (200, json!(false)), "{v}");

    // A base image that does not exist, and the host image (read-only /usr).
    for base in ["stacyvm-test/nope:1", "host"] {
        let sid = spec(
            &api,
            json!({"name": format!("base-{}", base.replace('/', "-")), "base_image": base}),
        )
        .await;
        let (_, b) = api
            .post("/environments/builds", json!({"spec_id": sid}))
            .await;
        let b = wait_build(&api, b["id"].as_str().expect("id")).await;
        assert_eq!(b["status"], "failed", "{b}");
        assert!(!b["error"].as_str().unwrap_or_default().is_empty(), "{b}");
    }
    // The Python the spec asks for must be the base's.
    let py = spec(
        &api,
        json!({"name": "py", "base_image": BASE, "python_version": "3.99"}),
    )
    .await;
    let (_, b) = api
        .post("/environments/builds", json!({"spec_id": py}))
        .await;
    let b = wait_build(&api, b["id"].as_str().expect("id")).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert!(
        b["log"]
            .as_str()
            .unwrap_or_default()
            .contains("the spec asks for 3.99"),
        "{b}"
    );
    assert!(sandboxes(&api).await.is_empty());

    // Cancel mid-apt: the sandbox goes at once, the build says canceled.
    let slow = spec(
        &api,
        json!({"name": "slow", "base_image": BASE, "apt_packages": ["gcc", "g++", "gdb"]}),
    )
    .await;
    let (_, b) = api
        .post("/environments/builds", json!({"spec_id": slow}))
        .await;
    let bid = b["id"].as_str().expect("id").to_string();
    wait_step(&api, &bid, "step 4/").await;
    assert_eq!(sandboxes(&api).await.len(), 1, "the build's sandbox runs");
    let (s, v) = api
        .post(&format!("/environments/builds/{bid}/cancel"), json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "canceled", "{v}");
    assert!(
        sandboxes(&api).await.is_empty(),
        "the build's sandbox is gone"
    );
    let (s, v) = api
        .post(&format!("/environments/builds/{bid}/cancel"), json!({}))
        .await;
    assert_eq!(s, 409, "{v}");

    // kill -9 mid-build: the restarted server settles the build and
    // removes its sandbox.
    let (_, b) = api
        .post("/environments/builds", json!({"spec_id": slow}))
        .await;
    let bid = b["id"].as_str().expect("id").to_string();
    wait_step(&api, &bid, "step 4/").await;
    // The running log is saved every 2 s: let one save happen.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let _ = Command::new("kill")
        .args(["-9", &server.pid().to_string()])
        .status();
    drop(server);
    let server = env.start();
    let api = common::Api::new(&server);
    let b = wait_build(&api, &bid).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap_or_default()
            .contains("server stopped"),
        "{b}"
    );
    assert!(
        b["log"].as_str().unwrap_or_default().contains("Get:"),
        "the log up to the crash is kept: {b}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sandboxes(&api).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the crashed build's sandbox stays"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
