//! The custom provider end to end with the real binary: `stacyvm serve`
//! with `providers.default: custom` in front of the bubblewrap reference
//! backend (`examples/custom-provider/backend.py`): spawn, exec and a file
//! round trip over REST; and an enabled provider without `base_url` stops
//! the server at startup.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");
const KEY: &str = "e2e-backend-key";

/// The reference backend; exits when its stdin (held here) closes.
struct Backend {
    child: Child,
    url: String,
}

impl Backend {
    fn start() -> Backend {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/custom-provider/backend.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--port", "0", "--ephemeral", "--exit-on-stdin-eof"])
            .args(["--api-key", KEY])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the reference backend (python3)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("address line");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("backend did not start: {line:?}"))
            .to_string();
        Backend { child, url }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-15")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn serve(data: &Path, port: u16, base_url: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .env("STACYVM_SERVER_HOST", "127.0.0.1")
        .env("STACYVM_SERVER_PORT", port.to_string())
        .env("STACYVM_SERVER_DATA_DIR", data)
        .env("STACYVM_LOGGING_LEVEL", "warn")
        .env("STACYVM_PROVIDERS_NATIVE_ENABLED", "false")
        .env("STACYVM_PROVIDERS_CUSTOM_ENABLED", "true")
        .env("STACYVM_PROVIDERS_CUSTOM_BASE_URL", base_url)
        .env("STACYVM_PROVIDERS_CUSTOM_API_KEY", KEY)
        .env("STACYVM_PROVIDERS_DEFAULT", "custom")
        .current_dir(data)
        .stdout(Stdio::null());
    cmd
}

fn start(data: &Path, base_url: &str) -> Server {
    let port = free_port();
    let log = std::fs::File::create(data.join("server.log")).expect("log");
    let child = serve(data, port, base_url)
        .stderr(log)
        .spawn()
        .expect("spawn serve");
    let s = Server {
        child,
        url: format!("http://127.0.0.1:{port}/api/v1"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "stacyvm serve did not listen within 30 s: {}",
            std::fs::read_to_string(data.join("server.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json::<Value>().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_provider_serves_spawn_exec_and_files() {
    let backend = Backend::start();
    let data = tempfile::tempdir().expect("tmp");
    let s = start(data.path(), &backend.url);
    let (status, v) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes", s.url),
        Some(json!({})),
    )
    .await;
    assert!(status == 200 || status == 201, "spawn: {status} {v}");
    assert_eq!(v["provider"], "custom", "providers.default: custom: {v}");
    let id = v["id"].as_str().expect("id").to_string();

    let (status, v) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes/{id}/exec", s.url),
        Some(json!({"command": "echo hello > greeting; cat greeting; echo oops >&2; exit 4"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (
            v["stdout"].as_str(),
            v["stderr"].as_str(),
            v["exit_code"].as_i64()
        ),
        (Some("hello\n"), Some("oops\n"), Some(4)),
        "{v}"
    );

    // A binary file up, listed, read back byte for byte, seen by commands.
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    use base64::Engine as _;
    let (status, v) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes/{id}/files", s.url),
        Some(json!({"path": "/workspace/dir/blob.bin", "content": base64::engine::general_purpose::STANDARD.encode(&bytes), "encoding": "base64", "mode": "640"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let got = reqwest::get(format!(
        "{}/sandboxes/{id}/files?path=/workspace/dir/blob.bin",
        s.url
    ))
    .await
    .expect("read");
    assert_eq!(got.status().as_u16(), 200);
    assert!(
        got.bytes().await.expect("body").as_ref() == bytes.as_slice(),
        "round trip differs"
    );
    let (status, v) = call(
        reqwest::Method::GET,
        format!("{}/sandboxes/{id}/files/list?path=/workspace/dir", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v[0]["path"], "/workspace/dir/blob.bin", "{v}");
    assert_eq!(
        (
            v[0]["size"].as_u64(),
            v[0]["mode"].as_str(),
            v[0]["is_dir"].as_bool()
        ),
        (Some(70_000), Some("640"), Some(false)),
        "{v}"
    );
    let (status, v) = call(
        reqwest::Method::POST,
        format!("{}/sandboxes/{id}/exec", s.url),
        Some(json!({"command": "wc -c < /workspace/dir/blob.bin"})),
    )
    .await;
    assert_eq!(
        (status, v["stdout"].as_str()),
        (200, Some("70000\n")),
        "{v}"
    );
    let (status, v) = call(
        reqwest::Method::GET,
        format!("{}/sandboxes/{id}/files?path=/workspace/missing", s.url),
        None,
    )
    .await;
    assert_eq!(status, 404, "a missing file is a 404: {v}");

    let (status, v) = call(
        reqwest::Method::DELETE,
        format!("{}/sandboxes/{id}", s.url),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // The backend no longer has it.
    let resp = reqwest::Client::new()
        .get(format!("{}/status/{id}", backend.url))
        .header("X-API-Key", KEY)
        .send()
        .await
        .expect("backend status");
    assert_eq!(resp.status().as_u16(), 404);
}

#[test]
fn custom_provider_without_base_url_is_a_startup_error() {
    let data = tempfile::tempdir().expect("tmp");
    let mut child = serve(data.path(), free_port(), "")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve kept running with providers.custom.enabled and no base_url");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert!(!status.success());
    assert!(err.contains("providers.custom.base_url"), "{err}");
}
