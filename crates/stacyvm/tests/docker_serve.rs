//! The real `stacyvm` binary serving the docker provider over REST, and a
//! server restart in between: stored sandboxes are re-attached, a stored
//! sandbox whose container is gone is marked destroyed, and a labelled
//! container missing from the store is adopted.
//!
//! Needs root, a running dockerd and the static agent (`scripts/test`
//! provides all three).

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");
const IMAGE: &str = "stacyvm-test/docker-busybox:1";

fn static_agent() -> PathBuf {
    let p = std::env::var("STACYVM_AGENT_PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .map_or_else(
            || PathBuf::from("/var/cache/stacyvm/agent/stacyvm-agent"),
            PathBuf::from,
        );
    assert!(
        p.is_file(),
        "static agent {} missing: run scripts/build-agent /var/cache/stacyvm/agent",
        p.display()
    );
    p
}

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI (test setup only)")
}

/// The engine's memory limit and NanoCpus of a container, as "MEM NANO".
fn memory_and_cpus(id: &str) -> String {
    let out = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}",
        id,
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Server {
    child: Child,
    url: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn start(data: &Path) -> Server {
    let port = free_port();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("server.log"))
        .expect("log");
    let child = Command::new(BIN)
        .arg("serve")
        .env("STACYVM_SERVER_HOST", "127.0.0.1")
        .env("STACYVM_SERVER_PORT", port.to_string())
        .env("STACYVM_SERVER_DATA_DIR", data)
        .env("STACYVM_LOGGING_LEVEL", "info")
        .env("STACYVM_PROVIDERS_NATIVE_ENABLED", "false")
        .env("STACYVM_PROVIDERS_DOCKER_ENABLED", "true")
        .env("STACYVM_PROVIDERS_DEFAULT", "docker")
        .env("STACYVM_DEFAULTS_IMAGE", IMAGE)
        .env("STACYVM_DEFAULTS_MEMORY_MB", "256")
        // The provider's own sizes win over defaults.* (gaps C-26).
        .env("STACYVM_PROVIDERS_DOCKER_MEMORY", "64m")
        .env("STACYVM_PROVIDERS_DOCKER_CPUS", "0.5")
        .env("STACYVM_AGENT_PATH", static_agent())
        .current_dir(data)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn serve");
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}/api/v1"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "stacyvm serve did not listen within 30 s: {}",
        std::fs::read_to_string(data.join("server.log")).unwrap_or_default()
    );
}

impl Server {
    /// Stops the server with SIGTERM (sandboxes keep running).
    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-15")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes the test's containers whatever happens.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for id in &self.0 {
            let _ = docker(&["rm", "-fv", id]);
        }
    }
}

async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = client.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let v = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, v)
}

async fn spawn(s: &Server, owner: &str) -> String {
    let (status, v) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes", s.url),
        Some(json!({"provider": "docker", "image": IMAGE, "owner_id": owner, "metadata": {"suite": "docker_serve"}})),
    )
    .await;
    assert!(status == 200 || status == 201, "spawn: {status} {v}");
    assert_eq!(v["provider"], "docker", "{v}");
    v["id"].as_str().expect("id").to_string()
}

async fn exec(s: &Server, id: &str, command: &str) -> (u16, Value) {
    call(
        reqwest::Method::POST,
        format!("{}/sandboxes/{id}/exec", s.url),
        Some(json!({"command": command})),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_sandboxes_over_rest_survive_a_restart() {
    assert!(
        nix_is_root(),
        "docker serve tests need root (CI runs as root)"
    );
    common::ensure_docker_image(IMAGE);
    let data = tempfile::tempdir().expect("tmp");
    let other = tempfile::tempdir().expect("tmp");
    let mut containers = Containers(Vec::new());

    let s = start(data.path());
    let kept = spawn(&s, "alice").await;
    let gone = spawn(&s, "bob").await;
    containers.0.extend([kept.clone(), gone.clone()]);
    let (status, v) = exec(&s, &kept, "echo hello > greeting; cat greeting; id -u").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["stdout"], "hello\n0\n", "{v}");
    assert_eq!(v["exit_code"], 0);
    // Files through the API; relative paths resolve against /workspace.
    let (status, v) = call(
        reqwest::Method::GET,
        format!("{}/sandboxes/{kept}/files?path=greeting", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = call(
        reqwest::Method::GET,
        format!("{}/sandboxes/{kept}/files/glob?pattern=*.nothing", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!([]), "no match is [] (gaps C-3)");
    // providers.docker.memory/cpus, not defaults.memory_mb, size a spawn
    // that names none (gaps C-26): the record says so and so does the engine.
    let (status, v) = call(
        reqwest::Method::GET,
        format!("{}/sandboxes/{kept}", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["memory_mb"].as_i64(), v["vcpus"].as_i64()),
        (Some(64), Some(1)),
        "{v}"
    );
    assert_eq!(
        memory_and_cpus(&kept),
        format!("{} 500000000", 64 * 1024 * 1024)
    );
    // An explicit size still wins over the provider's.
    let (status, v) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes", s.url),
        Some(json!({"provider": "docker", "image": IMAGE, "memory_mb": 96, "vcpus": 2})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let sized = v["id"].as_str().expect("id").to_string();
    containers.0.push(sized.clone());
    assert_eq!(
        (v["memory_mb"].as_i64(), v["vcpus"].as_i64()),
        (Some(96), Some(2)),
        "{v}"
    );
    assert_eq!(
        memory_and_cpus(&sized),
        format!("{} 2000000000", 96 * 1024 * 1024)
    );
    let (status, _) = call(
        reqwest::Method::DELETE,
        format!("{}/sandboxes/{sized}", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200);
    // Stats come from the engine (the 64 MiB limit above).
    let (status, v) = call(
        reqwest::Method::GET,
        format!("{}/sandboxes/{kept}/stats", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["supported"], true, "{v}");
    assert_eq!(v["mem_limit_bytes"], 64 * 1024 * 1024, "{v}");
    assert!(v["mem_bytes"].as_u64().unwrap_or(0) > 0, "{v}");
    let (status, v) = call(
        reqwest::Method::GET,
        format!("{}/sandboxes/{kept}/logs", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // Bad input is a typed 4xx with the engine's reason.
    let (status, v) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes", s.url),
        Some(json!({"provider": "docker", "image": "Not/A//Valid"})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    s.stop();

    // While the server is down: one container disappears, and another
    // server (another store) creates one this store does not know.
    assert!(docker(&["rm", "-fv", &gone]).status.success());
    let s2 = start(other.path());
    let orphan = spawn(&s2, "carol").await;
    containers.0.push(orphan.clone());
    s2.stop();

    let s = start(data.path());
    let (status, v) = exec(&s, &kept, "cat greeting").await;
    assert_eq!(
        (status, v["stdout"].clone()),
        (200, json!("hello\n")),
        "{v}"
    );
    let (status, v) = call(
        reqwest::Method::GET,
        format!("{}/sandboxes/{gone}", s.url),
        None,
    )
    .await;
    assert_eq!(status, 404, "missing container → destroyed: {v}");
    let (status, v) = call(
        reqwest::Method::GET,
        format!("{}/sandboxes/{orphan}", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "orphan adopted: {v}");
    assert_eq!(v["provider"], "docker");
    assert_eq!(v["owner_id"], "carol", "{v}");
    assert_eq!(v["metadata"]["suite"], "docker_serve", "{v}");
    let (status, v) = exec(&s, &orphan, "echo adopted").await;
    assert_eq!(
        (status, v["stdout"].clone()),
        (200, json!("adopted\n")),
        "{v}"
    );
    for id in [&kept, &orphan] {
        let (status, _) = call(
            reqwest::Method::DELETE,
            format!("{}/sandboxes/{id}", s.url),
            None,
        )
        .await;
        assert_eq!(status, 200);
        assert!(
            !docker(&["inspect", id]).status.success(),
            "container {id} removed"
        );
    }
    s.stop();
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `stacyvm image pull --docker` pulls through the Engine API from a
/// registry on loopback (Debian's docker-registry) and prints the image id;
/// a tag the registry lacks is a clear error and exit code 1.
#[test]
fn cli_pulls_into_the_docker_engine() {
    assert!(nix_is_root(), "docker tests need root (CI runs as root)");
    common::ensure_docker_image(IMAGE);
    let dir = tempfile::tempdir().expect("tmp");
    let registry = common::Registry::start(dir.path());
    let addr = &registry.addr;
    let remote = format!("{addr}/cli/busybox:1");
    assert!(docker(&["tag", IMAGE, &remote]).status.success());
    let pushed = docker(&["push", &remote]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    assert!(docker(&["rmi", &remote]).status.success());

    let data = dir.path().join("stacyvm");
    let out = Command::new(BIN)
        .args(["image", "pull", "--docker", &remote])
        .env("STACYVM_SERVER_DATA_DIR", &data)
        .output()
        .expect("cli");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("sha256:"),
        "prints the image id: {stdout}"
    );
    let inspected = docker(&["image", "inspect", "-f", "{{.Id}}", &remote]);
    assert_eq!(String::from_utf8_lossy(&inspected.stdout).trim(), stdout);
    let _ = docker(&["rmi", &remote]);

    let out = Command::new(BIN)
        .args(["image", "pull", "--docker", &format!("{addr}/cli/none:1")])
        .env("STACYVM_SERVER_DATA_DIR", &data)
        .output()
        .expect("cli");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not available"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(registry);
}

/// A sandbox whose container was stopped while the server was down (a
/// host or engine restart) is started again at startup, workspace intact,
/// instead of staying `stopped` and counting as active forever (gaps C-25).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_containers_are_recovered_at_startup() {
    assert!(nix_is_root(), "docker tests need root (CI runs as root)");
    common::ensure_docker_image(IMAGE);
    let data = tempfile::tempdir().expect("tmp");
    let mut containers = Containers(Vec::new());
    let s = start(data.path());
    let id = spawn(&s, "carol").await;
    containers.0.push(id.clone());
    let (status, v) = exec(&s, &id, "echo kept > /workspace/state").await;
    assert_eq!(status, 200, "{v}");
    s.stop();
    let out = docker(&["kill", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = docker(&["inspect", "-f", "{{.State.Running}}", &id]);
    assert_eq!(String::from_utf8_lossy(&st.stdout).trim(), "false");

    let s = start(data.path());
    let (status, v) = call(
        reqwest::Method::GET,
        format!("{}/sandboxes/{id}", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "running", "{v}");
    let (status, v) = exec(&s, &id, "cat /workspace/state").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["stdout"], "kept\n", "{v}");
    let (status, _) = call(
        reqwest::Method::DELETE,
        format!("{}/sandboxes/{id}", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200);
}

/// The preview proxy reaches a docker sandbox through its agent: busybox
/// httpd inside the container, public and token ports, a server that is
/// not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_reaches_a_server_in_a_container() {
    common::ensure_docker_image(IMAGE);
    let dir = tempfile::tempdir().expect("tmp");
    let s = start(dir.path());
    let id = spawn(&s, "preview").await;
    let (st, v) = exec(
        &s,
        &id,
        "mkdir -p /workspace/www && echo 'hello from the container' > /workspace/www/index.html && httpd -p 127.0.0.1:8000 -h /workspace/www",
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["exit_code"], 0, "{v}");
    let root = s.url.trim_end_matches("/api/v1").to_string();
    let addr: std::net::SocketAddr = root.trim_start_matches("http://").parse().expect("addr");
    let host = format!("8000-{id}.localhost");
    let client = reqwest::Client::builder()
        .resolve(&host, addr)
        .build()
        .expect("client");
    let url = format!("http://{host}:{}/index.html", addr.port());
    assert_eq!(
        client
            .get(&url)
            .send()
            .await
            .expect("get")
            .status()
            .as_u16(),
        404
    );

    let (st, v) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes/{id}/ports/8000", s.url),
        Some(json!({"mode": "public"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let mut ok = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let r = client.get(&url).send().await.expect("get");
        if r.status().as_u16() == 200 {
            ok = Some(r.text().await.expect("body"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ok.as_deref(), Some("hello from the container\n"));
    // The path form, on the API's own address.
    let r = reqwest::get(format!("{root}/preview/{id}/8000/index.html"))
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().await.expect("body"), "hello from the container\n");

    // Token mode: refused without, served with.
    let (st, _) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes/{id}/ports/8000", s.url),
        Some(json!({"mode": "token"})),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        client
            .get(&url)
            .send()
            .await
            .expect("get")
            .status()
            .as_u16(),
        401
    );
    let (st, tok) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes/{id}/ports/8000/tokens", s.url),
        Some(json!({"ttl": "5m"})),
    )
    .await;
    assert_eq!(st, 201, "{tok}");
    let r = client
        .get(&url)
        .header(
            "X-StacyVM-Preview-Token",
            tok["token"].as_str().expect("token"),
        )
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);

    // Nothing listens on 8001: a 502 naming the port.
    let (st, _) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes/{id}/ports/8001", s.url),
        Some(json!({"mode": "public"})),
    )
    .await;
    assert_eq!(st, 200);
    let r = reqwest::get(format!("{root}/preview/{id}/8001/"))
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 502);
    assert!(r.text().await.expect("body").contains("port 8001"));

    let (st, _) = call(
        reqwest::Method::DELETE,
        format!("{}/sandboxes/{id}", s.url),
        None,
    )
    .await;
    assert_eq!(st, 200);
}
