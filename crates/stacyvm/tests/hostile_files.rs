//! Hostile file requests against the real binary on the native provider,
//! with the server's resident memory watched: devices and procfs oddities
//! are typed 4xx answers, and a 2 GiB file goes up and down while the
//! server stays under 100 MB.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");
const GIB: u64 = 1 << 30;

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &Path) -> Server {
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let child = Command::new(BIN)
        .arg("serve")
        .env("STACYVM_SERVER_HOST", "127.0.0.1")
        .env("STACYVM_SERVER_PORT", port.to_string())
        .env("STACYVM_SERVER_DATA_DIR", data)
        .env("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")
        .env("STACYVM_LOGGING_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let s = Server {
        child,
        base: format!("http://127.0.0.1:{port}/api/v1"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "serve did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Samples the server's RSS every 20 ms until dropped; `peak()` is the max.
struct Watch {
    peak: Arc<AtomicU64>,
    on: Arc<AtomicBool>,
}

impl Watch {
    fn start(pid: u32) -> Watch {
        let peak = Arc::new(AtomicU64::new(rss(pid)));
        let on = Arc::new(AtomicBool::new(true));
        let (p, o) = (peak.clone(), on.clone());
        std::thread::spawn(move || {
            while o.load(Ordering::SeqCst) {
                p.fetch_max(rss(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watch { peak, on }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.on.store(false, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_reads_are_typed_and_a_2_gib_file_keeps_the_server_small() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = start(&dir.path().join("data"));
    let pid = s.child.id();
    let http = reqwest::Client::new();
    let v: serde_json::Value = http
        .post(format!("{}/sandboxes", s.base))
        .body(r#"{"ttl":"30m","memory_mb":256}"#)
        .send()
        .await
        .expect("spawn")
        .json()
        .await
        .expect("json");
    let id = v["id"].as_str().expect("id").to_string();
    let files = format!("{}/sandboxes/{id}/files", s.base);
    let watch = Watch::start(pid);

    // Devices, procfs oddities, FIFOs, huge sparse files: typed 4xx, at once.
    let r = http
        .post(format!("{}/sandboxes/{id}/exec", s.base))
        .body(r#"{"command":"mkfifo /workspace/p && truncate -s 100G /workspace/sparse"}"#)
        .send()
        .await
        .expect("exec");
    assert_eq!(r.status(), 200);
    for (path, want) in [
        ("/dev/zero", 400),
        ("/dev/urandom", 400),
        ("/workspace/p", 400),
        ("/workspace/sparse", 413),
    ] {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            http.get(&files).query(&[("path", path)]).send(),
        )
        .await
        .unwrap_or_else(|_| panic!("{path} hung"))
        .expect("read");
        assert_eq!(r.status().as_u16(), want, "{path}");
        let body: serde_json::Value = r.json().await.expect("json error body");
        assert!(body["code"].is_string(), "{path}: {body}");
    }
    let r = http
        .get(&files)
        .query(&[("path", "/proc/self/mem")])
        .send()
        .await
        .expect("read");
    assert!(
        r.status().is_client_error() || r.status().is_success(),
        "/proc/self/mem is never a 5xx: {}",
        r.status()
    );

    // 2 GiB up (streamed from a repeated 1 MiB chunk) and down.
    let chunk = bytes::Bytes::from(
        (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    );
    let c2 = chunk.clone();
    let body =
        futures::stream::iter((0..2 * 1024).map(move |_| Ok::<_, std::io::Error>(c2.clone())));
    let r = http
        .put(&files)
        .query(&[("path", "/workspace/big.bin")])
        .header("content-length", (2 * GIB).to_string())
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .expect("upload");
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let r = http
        .get(&files)
        .query(&[("path", "/workspace/big.bin")])
        .send()
        .await
        .expect("download");
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let (mut got, mut pos) = (0u64, 0usize);
    while let Some(part) = stream.next().await {
        let mut part = &part.expect("body")[..];
        while !part.is_empty() {
            let n = part.len().min(chunk.len() - pos);
            assert!(part[..n] == chunk[pos..pos + n], "bytes from {got} differ");
            part = &part[n..];
            pos = (pos + n) % chunk.len();
            got += n as u64;
        }
    }
    assert_eq!(got, 2 * GIB);
    let peak = watch.peak();
    assert!(
        peak < 100 * 1024 * 1024,
        "server RSS peaked at {} MiB during the 2 GiB transfer",
        peak >> 20
    );
    let _ = http
        .delete(format!("{}/sandboxes/{id}", s.base))
        .send()
        .await;
}
