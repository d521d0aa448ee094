//! Tests of the custom HTTP provider against hostile backends (garbage,
//! hangs, 500s, endless streams, huge bodies, bad NDJSON), each a tiny HTTP
//! server started inside the test on 127.0.0.1; and the conformance suite
//! run through the reference backend of `examples/custom-provider`.

mod custom_conformance;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stacyvm_core::config::{CustomConfig, Dur, Secret};
use stacyvm_core::provider::{ExecSpec, OutputChunk, Provider};
use stacyvm_core::ErrorKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::http::CustomProvider;

/// What a hostile server does with one request.
enum Reply {
    /// Writes these bytes, then closes.
    Raw(Vec<u8>),
    /// Never answers (the connection stays open until the test ends).
    Hang,
    /// Writes `head`, then `chunk` forever.
    Endless(Vec<u8>, Vec<u8>),
    /// Reads the request body to the end, never answers.
    Drain,
    /// Writes the first bytes, waits for the signal, writes the second
    /// bytes, then keeps the connection open.
    Then(Vec<u8>, Arc<tokio::sync::Notify>, Vec<u8>),
}

/// One received request: `METHOD /path?query`, headers (lowercase) and body.
#[derive(Debug, Clone)]
struct Req {
    line: String,
    headers: String,
    body: Vec<u8>,
}

type Handler = Arc<dyn Fn(&Req) -> Reply + Send + Sync>;

/// An HTTP server on 127.0.0.1 that answers with `handler`; stops on drop.
struct Hostile {
    url: String,
    seen: Arc<Mutex<Vec<Req>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hostile {
    async fn start(handler: impl Fn(&Req) -> Reply + Send + Sync + 'static) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen: Arc<Mutex<Vec<Req>>> = Arc::default();
        let handler: Handler = Arc::new(handler);
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((sock, _)) = listener.accept().await {
                let (handler, seen) = (handler.clone(), seen2.clone());
                conns.spawn(serve_conn(sock, handler, seen));
            }
        });
        Hostile { url, seen, task }
    }

    fn provider(&self, timeout_secs: i64) -> CustomProvider {
        CustomProvider::from_config(&CustomConfig {
            enabled: true,
            name: "custom".into(),
            base_url: self.url.clone(),
            api_key: Secret::new("test-key"),
            timeout: Dur::secs(timeout_secs),
        })
        .expect("provider")
    }

    fn lines(&self) -> Vec<String> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .map(|r| r.line.clone())
            .collect()
    }

    fn request(&self, prefix: &str) -> Req {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .find(|r| r.line.starts_with(prefix))
            .cloned()
            .unwrap_or_else(|| panic!("no request {prefix}"))
    }
}

async fn serve_conn(mut sock: TcpStream, handler: Handler, seen: Arc<Mutex<Vec<Req>>>) {
    // One request per connection (the answers close it).
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut chunk = [0u8; 4096];
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let line = lines.next().unwrap_or_default().to_string();
    let line = line
        .rsplit_once(' ')
        .map_or(line.clone(), |(l, _)| l.to_string());
    let headers = lines.collect::<Vec<_>>().join("\n").to_ascii_lowercase();
    let len: usize = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = vec![0u8; 64 * 1024];
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let req = Req {
        line,
        headers,
        body,
    };
    let reply = handler(&req);
    seen.lock().expect("lock").push(req);
    match reply {
        Reply::Raw(bytes) => {
            let _ = sock.write_all(&bytes).await;
            let _ = sock.shutdown().await;
        }
        Reply::Hang => std::future::pending::<()>().await,
        Reply::Endless(head, chunk) => {
            if sock.write_all(&head).await.is_err() {
                return;
            }
            while sock.write_all(&chunk).await.is_ok() {}
        }
        Reply::Then(first, signal, second) => {
            if sock.write_all(&first).await.is_ok() {
                signal.notified().await;
                let _ = sock.write_all(&second).await;
            }
            std::future::pending::<()>().await;
        }
        Reply::Drain => {
            let mut chunk = vec![0u8; 64 * 1024];
            while let Ok(n) = sock.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
            }
            std::future::pending::<()>().await;
        }
    }
}

fn http(status: u16, content_type: &str, body: &[u8]) -> Reply {
    let mut out = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    Reply::Raw(out)
}

fn json(status: u16, body: &str) -> Reply {
    http(status, "application/json", body.as_bytes())
}

/// A chunked NDJSON answer made of these lines (each gets a newline).
fn ndjson(lines: &[&str]) -> Reply {
    let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
    for l in lines {
        let data = format!("{l}\n");
        out.extend_from_slice(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes());
    }
    out.extend_from_slice(b"0\r\n\r\n");
    Reply::Raw(out)
}

fn chunked_head(content_type: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n").into_bytes()
}

fn chunk_of(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

const ALL_EXTENSIONS: &str = r#"{"status":"ok","extensions":["exit_status","stdin","timeout","base64","raw_files","interactive"]}"#;

fn argv(args: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: args.iter().map(|s| s.to_string()).collect(),
        ..ExecSpec::default()
    }
}

/// Runs an exec, collecting stdout.
async fn exec(p: &CustomProvider, spec: ExecSpec) -> (stacyvm_core::Result<i32>, String) {
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(8);
    let collect = async move {
        let mut out = Vec::new();
        while let Some(c) = rx.recv().await {
            if out.len() < 1 << 20 {
                out.extend_from_slice(&c.data);
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    let (r, out) = tokio::join!(p.exec("sb-12345678", &spec, tx), collect);
    (r.map(|s| s.code), out)
}

mod custom_hostile {
    use super::*;

    #[tokio::test]
    async fn garbage_spawn_answer_is_an_error_and_the_sandbox_is_deleted() {
        let srv = Hostile::start(|r| {
            if r.line.starts_with("POST /spawn") {
                http(200, "text/html", b"<html>oops</html>")
            } else {
                json(404, "{}")
            }
        })
        .await;
        let p = srv.provider(5);
        let spec = crate::conformance::spawn_spec("alpine");
        let e = p.spawn(&spec).await.expect_err("garbage");
        assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("not JSON") && msg.contains("<html>") && msg.contains("hint"),
            "{msg}"
        );
        let delete = format!("DELETE /sandboxes/{}", spec.id);
        assert!(srv.lines().contains(&delete), "{:?}", srv.lines());
    }

    #[tokio::test]
    async fn spawn_without_a_usable_id_deletes_what_it_got() {
        for answer in [
            r#"{"id":""}"#,
            r#"{"id":42}"#,
            r#"{"id":"has space"}"#,
            "{\"id\":\"ok\"",
        ] {
            let a = answer.to_string();
            let srv = Hostile::start(move |r| {
                if r.line.starts_with("POST /spawn") {
                    json(200, &a)
                } else {
                    json(200, "{}")
                }
            })
            .await;
            let spec = crate::conformance::spawn_spec("alpine");
            let e = srv.provider(5).spawn(&spec).await.expect_err(answer);
            assert_eq!(e.kind(), ErrorKind::Internal, "{answer}: {e}");
            assert!(
                srv.lines()
                    .iter()
                    .any(|l| l.starts_with("DELETE /sandboxes/")),
                "{answer}: {:?}",
                srv.lines()
            );
        }
    }

    #[tokio::test]
    async fn spawn_sends_the_contracts_body() {
        let srv = Hostile::start(|r| {
            if r.line.starts_with("POST /spawn") {
                json(200, r#"{"id":"rt-1"}"#)
            } else {
                json(404, "{}")
            }
        })
        .await;
        let mut spec = crate::conformance::spawn_spec("alpine:3");
        spec.memory_mb = 0;
        spec.metadata.clear();
        let s = srv.provider(5).spawn(&spec).await.expect("spawn");
        assert_eq!(s.runtime_id, "rt-1");
        let req = srv.request("POST /spawn");
        assert!(
            req.headers.contains("x-api-key: test-key"),
            "{}",
            req.headers
        );
        let body: serde_json::Value = serde_json::from_slice(&req.body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"image": "alpine:3", "vcpus": 1, "sandbox_id": spec.id}),
            "zero values omitted, no disk_size_mb"
        );
    }

    #[tokio::test]
    async fn server_errors_carry_the_backends_reason_and_a_hint() {
        let srv = Hostile::start(|r| {
            if r.line.starts_with("POST /spawn") {
                json(500, r#"{"error":"disk full on /var/lib/backend"}"#)
            } else {
                json(200, "{}")
            }
        })
        .await;
        let spec = crate::conformance::spawn_spec("alpine");
        let e = srv.provider(5).spawn(&spec).await.expect_err("500");
        assert_eq!(e.kind(), ErrorKind::Internal);
        let msg = e.to_string();
        assert!(
            msg.contains("disk full on /var/lib/backend")
                && msg.contains("HTTP 500")
                && msg.contains("logs"),
            "{msg}"
        );
        assert!(
            srv.lines()
                .contains(&format!("DELETE /sandboxes/{}", spec.id)),
            "a 5xx spawn may have left something: cleaned up"
        );
    }

    #[tokio::test]
    async fn statuses_map_over_the_wire() {
        let srv = Hostile::start(|r| {
            let l = r.line.as_str();
            if l.starts_with("GET /status/gone") {
                json(410, r#"{"error":"destroyed yesterday"}"#)
            } else if l.starts_with("GET /status/") {
                json(404, "no such sandbox")
            } else if l.starts_with("POST /spawn") {
                json(429, r#"{"error":"backend full (10 sandboxes)"}"#)
            } else if l.starts_with("GET /health") {
                json(503, r#"{"error":"draining"}"#)
            } else if l.starts_with("GET /files/stat") {
                json(404, r#"{"error":"no such file","kind":"not_found"}"#)
            } else if l.starts_with("DELETE /files") {
                json(
                    400,
                    r#"{"error":"directory not empty","kind":"invalid_input"}"#,
                )
            } else if l.starts_with("POST /exec") {
                json(408, r#"{"error":"took too long"}"#)
            } else if l.starts_with("DELETE /sandboxes/") {
                json(404, "{}")
            } else {
                json(401, r#"{"error":"bad key"}"#)
            }
        })
        .await;
        let p = srv.provider(5);
        let e = p.status("sb-1").await.expect_err("404");
        assert_eq!(e.kind(), ErrorKind::SandboxNotFound, "{e}");
        assert_eq!(
            p.status("gone").await.expect_err("410").kind(),
            ErrorKind::SandboxDestroyed
        );
        let e = p
            .spawn(&crate::conformance::spawn_spec("a"))
            .await
            .expect_err("429");
        assert_eq!(e.kind(), ErrorKind::ResourceLimit);
        assert!(e.to_string().contains("backend full"), "{e}");
        let e = p.health().await.expect_err("503");
        assert_eq!(e.kind(), ErrorKind::ProviderUnavailable);
        assert!(e.to_string().contains("draining"), "{e}");
        assert_eq!(
            p.stat_file("sb-1", "/x").await.expect_err("kind").kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            p.delete_file("sb-1", "/d", false)
                .await
                .expect_err("kind")
                .kind(),
            ErrorKind::InvalidInput
        );
        let (r, _) = exec(&p, argv(&["true"])).await;
        assert_eq!(r.expect_err("408").kind(), ErrorKind::ExecTimeout);
        let e = p.glob_files("sb-1", "/*").await.expect_err("401");
        assert!(e.to_string().contains("providers.custom.api_key"), "{e}");
        p.destroy("sb-1")
            .await
            .expect("destroying a missing sandbox is ok");
        assert!(
            srv.lines().iter().any(|l| l == "GET /status/sb-1"),
            "{:?}",
            srv.lines()
        );
    }

    #[tokio::test]
    async fn ids_are_escaped_in_paths() {
        let srv = Hostile::start(|_| json(200, r#"{"state":"paused"}"#)).await;
        let st = srv.provider(5).status("a/b c").await.expect("status");
        assert_eq!(st.state, "paused");
        assert_eq!(srv.lines(), vec!["GET /status/a%2Fb%20c".to_string()]);
    }

    #[tokio::test]
    async fn a_hung_backend_times_out_with_a_hint() {
        let srv = Hostile::start(|_| Reply::Hang).await;
        let p = srv.provider(1);
        let started = Instant::now();
        let e = p.status("sb-1").await.expect_err("hang");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
        assert!(e.to_string().contains("providers.custom.timeout"), "{e}");
        let e = p.health().await.expect_err("hang");
        assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
        // An exec on a hung backend is an exec timeout (the cap).
        let (r, _) = exec(&p, argv(&["true"])).await;
        let e = r.expect_err("hang");
        assert_eq!(e.kind(), ErrorKind::ExecTimeout, "{e}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[tokio::test]
    async fn an_unreachable_backend_says_to_start_it() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let p = CustomProvider::from_config(&CustomConfig {
            enabled: true,
            base_url: format!("http://127.0.0.1:{port}"),
            ..CustomConfig::default()
        })
        .expect("provider");
        let e = p.health().await.expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::ProviderUnavailable);
        assert!(e.to_string().contains("start the backend"), "{e}");
    }

    #[tokio::test]
    async fn huge_and_endless_json_bodies_are_capped() {
        let srv = Hostile::start(|r| {
            if r.line.starts_with("GET /status/big") {
                // Announces 2 GiB, sends zeros until the client leaves.
                Reply::Endless(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2147483648\r\n\r\n".to_vec(),
                    vec![b'0'; 64 * 1024],
                )
            } else {
                Reply::Endless(chunked_head("application/json"), chunk_of(&[b' '; 64 * 1024]))
            }
        })
        .await;
        let p = srv.provider(20);
        let started = Instant::now();
        let e = p.status("big").await.expect_err("2 GiB");
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(e.to_string().contains("larger than"), "{e}");
        let e = p
            .list_files("sb-1", "/workspace")
            .await
            .expect_err("endless");
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(e.to_string().contains("larger than"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "refused without reading it all"
        );
    }

    #[tokio::test]
    async fn reads_never_exceed_max_bytes() {
        let srv = Hostile::start(|r| {
            if r.line.contains("path=%2Fannounced") {
                Reply::Endless(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2147483648\r\n\r\n".to_vec(),
                    vec![7u8; 64 * 1024],
                )
            } else if r.line.contains("path=%2Fliar") {
                // Announces 10 bytes, sends 20.
                Reply::Raw(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234567890123456789".to_vec(),
                )
            } else {
                Reply::Endless(
                    chunked_head("application/octet-stream"),
                    chunk_of(&[7u8; 64 * 1024]),
                )
            }
        })
        .await;
        let p = srv.provider(20);
        let e = p
            .read_file_stream("sb-1", "/announced", 1 << 20)
            .await
            .expect_err("announced 2 GiB");
        assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
        let e = p
            .read_file_stream("sb-1", "/endless", 1 << 20)
            .await
            .expect_err("endless");
        assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
        let got = p
            .read_file("sb-1", "/liar")
            .await
            .expect("hyper stops at the length");
        assert_eq!(got, b"0123456789");
        let req = srv.request("GET /files?sandbox_id=sb-1&path=%2Fannounced");
        assert!(req.line.ends_with("max_bytes=1048576"), "{}", req.line);
    }

    #[tokio::test]
    async fn an_endless_exec_stream_ends_at_the_timeout() {
        let srv = Hostile::start(|r| {
            if r.line.starts_with("GET /health") {
                json(200, ALL_EXTENSIONS)
            } else {
                let rec = chunk_of(b"{\"stream\":\"stdout\",\"data\":\"y\\n\"}\n");
                Reply::Endless(chunked_head("application/x-ndjson"), rec)
            }
        })
        .await;
        let p = srv.provider(2);
        let started = Instant::now();
        let (r, out) = exec(&p, argv(&["yes"])).await;
        let e = r.expect_err("endless");
        assert_eq!(e.kind(), ErrorKind::ExecTimeout, "{e}");
        assert!(e.to_string().contains("providers.custom.timeout"), "{e}");
        assert!(
            out.starts_with("y\ny\n"),
            "output streamed before the timeout"
        );
        assert!(started.elapsed() < Duration::from_secs(15));
        // With a shorter exec timeout, that one applies.
        let mut spec = argv(&["yes"]);
        spec.timeout = Some(Duration::from_millis(100));
        let p = srv.provider(30);
        let started = Instant::now();
        let (r, _) = exec(&p, spec).await;
        assert_eq!(r.expect_err("endless").kind(), ErrorKind::ExecTimeout);
        assert!(started.elapsed() < Duration::from_secs(20));
        let req = srv.request("POST /exec");
        assert!(
            req.headers.contains("accept: application/x-ndjson"),
            "{}",
            req.headers
        );
    }

    #[tokio::test]
    async fn an_oversized_ndjson_line_is_refused() {
        let srv = Hostile::start(|r| {
            if r.line.starts_with("GET /health") {
                json(200, ALL_EXTENSIONS)
            } else {
                Reply::Endless(
                    chunked_head("application/x-ndjson"),
                    chunk_of(&[b'x'; 64 * 1024]),
                )
            }
        })
        .await;
        let (r, _) = exec(&srv.provider(20), argv(&["x"])).await;
        let e = r.expect_err("long line");
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(e.to_string().contains("longer than"), "{e}");
    }

    #[tokio::test]
    async fn garbage_ndjson_lines_are_skipped_and_the_exit_record_counts() {
        let srv = Hostile::start(|r| {
            if r.line.starts_with("GET /health") {
                json(200, ALL_EXTENSIONS)
            } else if r.body.windows(4).any(|w| w == b"fail") {
                ndjson(&[r#"{"stream":"stdout","data":"partial\n"}"#])
            } else {
                ndjson(&[
                    "garbage",
                    r#"{"stream":"stdout","data":"ok\n"}"#,
                    r#"{"stream":"nope","data":"x"}"#,
                    r#"{"stream":"stderr","data":"AAE=","encoding":"base64"}"#,
                    r#"{"exit_code":3}"#,
                ])
            }
        })
        .await;
        let p = srv.provider(10);
        let (r, out) = exec(&p, argv(&["x"])).await;
        assert_eq!(r.expect("exit record"), 3);
        assert_eq!(out, "ok\n\u{0}\u{1}");
        let body: serde_json::Value =
            serde_json::from_slice(&srv.request("POST /exec").body).expect("json");
        assert_eq!(body["stream"], true);
        assert_eq!(body["mode"], "argv");
        let (r, _) = exec(&p, argv(&["fail"])).await;
        let e = r.expect_err("no exit record");
        assert!(e.to_string().contains("without an exit record"), "{e}");
    }

    #[tokio::test]
    async fn a_plain_backend_gets_buffered_execs() {
        let srv = Hostile::start(|r| {
            if r.line.starts_with("GET /health") {
                http(200, "text/plain", b"ok")
            } else if r.line.starts_with("POST /exec") {
                json(200, r#"{"exit_code":2,"stdout":"out","stderr":"err"}"#)
            } else {
                json(200, "{}")
            }
        })
        .await;
        let p = srv.provider(10);
        p.health().await.expect("healthy");
        let (r, out) = exec(&p, argv(&["sh", "-c", "x"])).await;
        assert_eq!(r.expect("exec"), 2);
        assert_eq!(out, "outerr");
        let body: serde_json::Value =
            serde_json::from_slice(&srv.request("POST /exec").body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"sandbox_id": "sb-12345678", "command": "sh", "mode": "argv", "args": ["-c", "x"]})
        );
        let mut spec = argv(&["cat"]);
        spec.stdin = Some(b"x".to_vec());
        let (r, _) = exec(&p, spec).await;
        assert_eq!(
            r.expect_err("no stdin extension").kind(),
            ErrorKind::Unsupported
        );
        let e = p
            .write_file("sb-1", "/workspace/b", &[0xff, 0], 0o644)
            .await
            .expect_err("binary without base64");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        p.write_file("sb-1", "/workspace/t", b"text", 0o600)
            .await
            .expect("text write");
        let body: serde_json::Value =
            serde_json::from_slice(&srv.request("POST /files").body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"sandbox_id": "sb-1", "path": "/workspace/t", "content": "text", "mode": "0600"})
        );
    }

    #[tokio::test]
    async fn a_garbage_exec_answer_is_an_error() {
        let srv = Hostile::start(|r| {
            if r.line.starts_with("GET /health") {
                json(200, "{}")
            } else {
                json(200, r#"{"stdout":"no exit code"}"#)
            }
        })
        .await;
        let (r, _) = exec(&srv.provider(10), argv(&["x"])).await;
        let e = r.expect_err("garbage");
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(e.to_string().contains("exit_code"), "{e}");
    }

    #[tokio::test]
    async fn a_refused_streamed_upload_is_payload_too_large() {
        let srv = Hostile::start(|r| {
            if r.line.starts_with("GET /health") {
                json(200, ALL_EXTENSIONS)
            } else {
                Reply::Drain
            }
        })
        .await;
        let p = srv.provider(20);
        let (tx, rx) = mpsc::channel(2);
        let feed = tokio::spawn(async move {
            for _ in 0..8 {
                if tx.send(vec![1u8; 1 << 20]).await.is_err() {
                    break;
                }
            }
        });
        let started = Instant::now();
        let e = p
            .write_file_stream("sb-1", "/workspace/x", 0o644, rx, 3 << 20)
            .await
            .expect_err("over the limit");
        feed.await.expect("feeder");
        assert_eq!(e.kind(), ErrorKind::PayloadTooLarge, "{e}");
        assert!(started.elapsed() < Duration::from_secs(15));
    }

    #[tokio::test]
    async fn listings_are_normalised_whatever_the_backend_writes() {
        let srv = Hostile::start(|r| {
            if r.line.starts_with("GET /files/list") {
                json(
                    200,
                    r#"[{"Path":"workspace/d/b.py","Size":8,"Mode":"-rw-r--r--","IsDir":false,"ModTime":"2024-01-02T03:04:05.5+01:00"},
                        {"path":"/workspace/d/sub","size":4096,"mode":"0755","is_dir":true,"mod_time":"2024-01-02T02:04:05Z"}]"#,
                )
            } else if r.line.starts_with("GET /files/glob") {
                json(200, "null")
            } else {
                json(200, r#"{"path":"ignored","size":5,"mode":33188,"isdir":false,"modtime":"bad"}"#)
            }
        })
        .await;
        let p = srv.provider(10);
        let list = p.list_files("sb-1", "/workspace/d").await.expect("list");
        let got: Vec<_> = list
            .iter()
            .map(|f| {
                (
                    f.path.as_str(),
                    f.mode.as_str(),
                    f.is_dir,
                    f.mod_time.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("/workspace/d/b.py", "644", false, "2024-01-02T02:04:05Z"),
                ("/workspace/d/sub", "755", true, "2024-01-02T02:04:05Z"),
            ]
        );
        assert!(p.glob_files("sb-1", "/x*").await.expect("glob").is_empty());
        let st = p.stat_file("sb-1", "/workspace/a.txt").await.expect("stat");
        assert_eq!(
            (
                st.path.as_str(),
                st.name.as_str(),
                st.mode.as_str(),
                st.mod_time.as_str()
            ),
            ("/workspace/a.txt", "a.txt", "644", "")
        );
    }

    #[tokio::test]
    async fn doctor_reports_health_and_extensions() {
        let srv = Hostile::start(|_| json(200, ALL_EXTENSIONS)).await;
        let mut cfg = stacyvm_core::config::Config::default();
        cfg.providers.custom.enabled = true;
        cfg.providers.custom.base_url = srv.url.clone();
        let find = |checks: &[crate::remote::http::Check]| {
            checks
                .iter()
                .find(|c| c.0 == "providers.custom.health")
                .cloned()
                .expect("health check")
        };
        let health = find(&crate::remote::http::doctor(&cfg).await);
        assert_eq!(health.1, "pass", "{health:?}");
        assert!(health.2.contains("raw_files"), "{health:?}");
        let down = Hostile::start(|_| json(500, r#"{"error":"database locked"}"#)).await;
        cfg.providers.custom.base_url = down.url.clone();
        let health = find(&crate::remote::http::doctor(&cfg).await);
        assert_eq!(health.1, "fail", "{health:?}");
        assert!(health.2.contains("database locked"), "{health:?}");
        assert!(health.3.is_some(), "a failed check says how to fix it");
    }

    #[tokio::test]
    async fn a_command_that_ignores_stdin_cannot_stall_interactive_output() {
        // The backend answers no input request; the output after the
        // exec id comes only once the input request has arrived.
        let seen = Arc::new(tokio::sync::Notify::new());
        let srv = Hostile::start(move |r| {
            if r.line.starts_with("GET /health") {
                json(200, ALL_EXTENSIONS)
            } else if r.line.starts_with("POST /exec/input") {
                seen.notify_one();
                Reply::Hang
            } else {
                let mut head = chunked_head("application/x-ndjson");
                head.extend(chunk_of(b"{\"exec_id\":\"e1\"}\n"));
                let tick = chunk_of(b"{\"stream\":\"stdout\",\"data\":\"tick\\n\"}\n");
                Reply::Then(head, seen.clone(), tick)
            }
        })
        .await;
        let p = srv.provider(40);
        let (in_tx, in_rx) = mpsc::channel(4);
        in_tx
            .send(stacyvm_core::provider::ExecInput::Stdin(b"x".to_vec()))
            .await
            .expect("send");
        let (tx, mut rx) = mpsc::channel::<OutputChunk>(8);
        let spec = argv(&["cat"]);
        let run = p.exec_interactive("sb-1", &spec, tx, in_rx);
        tokio::pin!(run);
        let started = Instant::now();
        tokio::select! {
            c = rx.recv() => assert_eq!(c.map(|c| c.data).as_deref(), Some(&b"tick\n"[..])),
            r = &mut run => panic!("the exec ended first: {r:?}"),
        }
        // A forwarder that blocked the reader would hold the output until
        // the input request timed out (40 s).
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "output flowed while the input request hung"
        );
    }
}
