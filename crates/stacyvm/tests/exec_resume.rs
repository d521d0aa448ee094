//! Resumable exec streams against the real binary on the native provider:
//! a stream whose client connection is cut is read again from the last
//! offset with nothing lost or repeated and the true exit code at the end;
//! the Rust client resumes by itself through a proxy that drops its first
//! connection; a detached exec that fills its journal waits instead of
//! losing output; abandoned execs are killed after the resume window;
//! kill, listing and bad input.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(server: &common::Server) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: server.url.clone(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn spawn(&self) -> String {
        let (s, sb) = self
            .call(reqwest::Method::POST, "/sandboxes", Some(json!({})))
            .await;
        assert_eq!(s, 201, "{sb}");
        sb["id"].as_str().expect("id").to_string()
    }

    /// Starts a streamed exec; returns the open response and its exec id.
    async fn start(&self, id: &str, command: &str) -> (reqwest::Response, String) {
        let resp = self
            .http
            .post(format!("{}/sandboxes/{id}/exec", self.base))
            .json(&json!({ "command": command, "stream": true, "report_exit": true }))
            .send()
            .await
            .expect("exec");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "application/x-ndjson",
            "{:?}",
            resp.headers()
        );
        let exec_id = resp.headers()["x-stacyvm-exec-id"]
            .to_str()
            .expect("exec id")
            .to_string();
        assert!(exec_id.starts_with("ex-"), "{exec_id}");
        (resp, exec_id)
    }

    async fn info(&self, id: &str, exec_id: &str) -> Value {
        let (s, v) = self.get(&format!("/sandboxes/{id}/execs/{exec_id}")).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    /// Waits until the exec's info satisfies `ok`.
    async fn wait_info(&self, id: &str, exec_id: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.info(id, exec_id).await;
            if ok(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "exec never got there: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What an NDJSON exec stream said: output text in order, the offset of
/// the last output line, gaps and the exit record.
#[derive(Default, Debug)]
struct Read {
    text: String,
    stderr: String,
    offset: u64,
    gaps: Vec<Value>,
    exit: Option<Value>,
    lines: usize,
}

impl Read {
    fn take(&mut self, line: &[u8]) {
        let v: Value = serde_json::from_slice(line).expect("ndjson line");
        self.lines += 1;
        match v["type"].as_str() {
            Some("exit") => self.exit = Some(v),
            Some("gap") => self.gaps.push(v),
            Some(other) => panic!("unexpected line type {other}: {v}"),
            None => {
                let data = v["data"].as_str().expect("data");
                self.text.push_str(data);
                if v["stream"] == "stderr" {
                    self.stderr.push_str(data);
                }
                if let Some(o) = v["offset"].as_u64() {
                    assert!(o >= self.offset, "offsets went back: {v}");
                    self.offset = o;
                }
            }
        }
    }
}

/// Reads whole lines from `resp` until `stop` says so (then drops the
/// connection) or the stream ends.
async fn read_until(resp: reqwest::Response, into: &mut Read, stop: impl Fn(&Read) -> bool) {
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.expect("chunk"));
        while let Some(p) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=p).collect();
            into.take(&line[..line.len() - 1]);
            if stop(into) {
                return;
            }
        }
    }
    assert!(buf.is_empty(), "stream ended inside a line");
}

async fn resume(api: &Api, id: &str, exec_id: &str, offset: u64) -> reqwest::Response {
    let resp = api
        .http
        .get(format!(
            "{}/sandboxes/{id}/execs/{exec_id}/stream?offset={offset}",
            api.base
        ))
        .send()
        .await
        .expect("resume");
    assert_eq!(resp.status(), 200);
    resp
}

fn numbered(n: usize) -> String {
    (1..=n).map(|i| format!("line-{i}\n")).collect()
}

fn serve(dir: &std::path::Path, env: &[(&str, &str)]) -> common::Server {
    let mut all = vec![("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")];
    all.extend_from_slice(env);
    common::Server::start(dir, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumes_from_its_offset_after_the_connection_is_cut() {
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(dir.path(), &[]);
    let api = Api::new(&server);
    let id = api.spawn().await;

    // ~2 s of numbered lines on stdout, a few on stderr, then exit 7.
    let (resp, exec_id) = api
        .start(
            &id,
            "for i in $(seq 1 300); do echo line-$i; [ $((i % 100)) = 0 ] && echo err-$i >&2; sleep 0.006; done; exit 7",
        )
        .await;
    let mut got = Read::default();
    read_until(resp, &mut got, |r| r.text.contains("line-40\n")).await;
    // The connection is gone; the exec goes on without a reader.
    let v = api.wait_info(&id, &exec_id, |v| v["attached"] == 0).await;
    assert_eq!(v["state"], "running", "{v}");
    let (s, list) = api.get(&format!("/sandboxes/{id}/execs")).await;
    assert_eq!(s, 200, "{list}");
    assert!(
        list.as_array()
            .expect("list")
            .iter()
            .any(|e| e["id"] == exec_id.as_str()
                && e["command"].as_str().unwrap_or("").contains("seq 1 300")),
        "{list}"
    );

    let before = got.offset;
    read_until(resume(&api, &id, &exec_id, before).await, &mut got, |_| {
        false
    })
    .await;
    assert!(got.gaps.is_empty(), "{:?}", got.gaps);
    let exit = got
        .exit
        .clone()
        .expect("the exit record ends the resumed stream");
    assert_eq!(exit["exit_code"], 7, "{exit}");
    // Everything exactly once (stdout and stderr are separate pipes: their
    // relative order is the order the server read them in).
    let mut want_err = String::new();
    for i in (100..=300).step_by(100) {
        want_err.push_str(&format!("err-{i}\n"));
    }
    assert_eq!(got.stderr, want_err);
    let want_out = numbered(300);
    let out_only: String = got
        .text
        .lines()
        .filter(|l| l.starts_with("line-"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(out_only, want_out);
    assert_eq!(got.text.len(), want_out.len() + want_err.len());
    let want = got.text.clone();
    assert_eq!(got.offset, want.len() as u64);

    // Finished execs stay readable: from 0 again, and from the end (only
    // the exit record).
    let mut again = Read::default();
    read_until(resume(&api, &id, &exec_id, 0).await, &mut again, |_| false).await;
    assert_eq!(again.text, want);
    assert_eq!(again.exit.expect("exit")["exit_code"], 7);
    let mut tail = Read::default();
    read_until(
        resume(&api, &id, &exec_id, want.len() as u64).await,
        &mut tail,
        |_| false,
    )
    .await;
    assert_eq!((tail.text.as_str(), tail.lines), ("", 1));
    let v = api.info(&id, &exec_id).await;
    assert_eq!(
        (
            v["state"].as_str(),
            v["exit_code"].as_i64(),
            v["output_bytes"].as_u64()
        ),
        (Some("exited"), Some(7), Some(want.len() as u64)),
        "{v}"
    );
}

/// A loopback proxy to `target` that cuts its first connection after
/// `cut_after` bytes of response and forwards later ones whole.
async fn cutting_proxy(target: std::net::SocketAddr, cut_after: usize) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut client, _)) = listener.accept().await {
            let cut = std::mem::take(&mut first).then_some(cut_after);
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut sent = 0usize;
                    let mut buf = vec![0u8; 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let n = match cut {
                            Some(c) if sent + n >= c => {
                                let _ = cw.write_all(&buf[..c - sent]).await;
                                return;
                            }
                            _ => n,
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        sent += n;
                    }
                };
                tokio::select! {
                    _ = up => {}
                    () = down => {}
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_resumes_a_dropped_stream_by_itself() {
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(dir.path(), &[]);
    let api = Api::new(&server);
    let id = api.spawn().await;
    let target: std::net::SocketAddr = server
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/api/v1")
        .parse()
        .expect("addr");
    // The first connection (the POST) dies 3 KiB into the response,
    // mid-line.
    let proxy = cutting_proxy(target, 3000).await;
    let client = stacyvm_client::Client::new(&format!("http://{proxy}"), None).expect("client");
    let req = stacyvm_api::ExecRequest {
        command: "for i in $(seq 1 2000); do echo line-$i; done; sleep 0.3; exit 3".into(),
        ..Default::default()
    };
    let mut out = String::new();
    let mut exits = Vec::new();
    let code = client
        .exec_stream(&id, &req, |item| match item {
            stacyvm_client::StreamItem::Stdout(s) => out.push_str(&s),
            stacyvm_client::StreamItem::Stderr(s) => panic!("stderr: {s}"),
            stacyvm_client::StreamItem::Exit(c) => exits.push(c),
        })
        .await
        .expect("the stream survives the cut");
    assert_eq!(code, Some(3));
    assert_eq!(exits, vec![3]);
    assert_eq!(out, numbered(2000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_exec_waits_when_its_journal_is_full_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    // History large enough for whatever loopback socket buffers held when
    // the client went (the guarantee covers what was in flight, up to
    // `history_bytes`).
    let server = serve(
        dir.path(),
        &[
            ("STACYVM_EXEC_BUFFER_BYTES", "1048576"),
            ("STACYVM_EXEC_HISTORY_BYTES", "12582912"),
        ],
    );
    let api = Api::new(&server);
    let id = api.spawn().await;
    // ~19 MB, far more than the journal keeps (1 MiB unread + 12 MiB
    // history).
    let (resp, exec_id) = api.start(&id, "seq 1 2500000; echo done >&2; exit 0").await;
    let mut got = Read::default();
    read_until(resp, &mut got, |r| r.lines >= 3).await;
    let v = api.wait_info(&id, &exec_id, |v| v["attached"] == 0).await;
    // Nobody reads: the command waits instead of the journal growing or
    // dropping output.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v2 = api.info(&id, &exec_id).await;
    assert_eq!(v2["state"], "running", "{v2}");
    let kept =
        v2["output_bytes"].as_u64().expect("bytes") - v2["retained_from"].as_u64().expect("from");
    assert!(
        kept <= 13 * 1048576 + 65536,
        "journal holds {kept} bytes: {v2}"
    );
    assert!(
        v2["output_bytes"].as_u64() < Some(16_000_000),
        "the command ran on while nobody read: {v2} (was {v})"
    );
    read_until(
        resume(&api, &id, &exec_id, got.offset).await,
        &mut got,
        |_| false,
    )
    .await;
    assert!(got.gaps.is_empty(), "{:?}", got.gaps);
    assert_eq!(got.exit.as_ref().expect("exit")["exit_code"], 0);
    // stdout whole and in order; stderr's line wherever the server read it.
    let want_out: String = (1..=2500000).map(|i| format!("{i}\n")).collect();
    assert_eq!(got.stderr, "done\n");
    let out_only = got.text.replacen("done\n", "", 1);
    assert!(
        out_only == want_out,
        "output differs ({} bytes, want {})",
        out_only.len(),
        want_out.len()
    );
    let want = got.text.clone();
    // Reading from 0 now: the early bytes were evicted, and the gap says so.
    let mut late = Read::default();
    read_until(resume(&api, &id, &exec_id, 0).await, &mut late, |_| false).await;
    assert_eq!(late.gaps.len(), 1, "{:?}", late.gaps);
    let resumed_at = late.gaps[0]["offset"].as_u64().expect("gap offset");
    assert_eq!(late.gaps[0]["lost_bytes"].as_u64(), Some(resumed_at));
    assert!(
        want.ends_with(&late.text),
        "the kept tail is not the output's tail"
    );
    assert_eq!(late.text.len() as u64 + resumed_at, want.len() as u64);
}

/// Whether `pattern` names a live process in the sandbox.
async fn running(api: &Api, id: &str, pattern: &str) -> bool {
    let (s, v) = api
        .call(
            reqwest::Method::POST,
            &format!("/sandboxes/{id}/exec"),
            Some(json!({ "command": format!("pgrep -f '{pattern}' >/dev/null && echo yes || echo no") })),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    v["stdout"].as_str().expect("stdout").trim() == "yes"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_execs_are_killed_after_the_window_and_kill_works() {
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(dir.path(), &[("STACYVM_EXEC_RESUME_WINDOW", "1s")]);
    let api = Api::new(&server);
    let id = api.spawn().await;

    // Abandoned: killed about a second after its client left.
    let (resp, abandoned) = api.start(&id, "echo up; exec sleep 41.5").await;
    let mut got = Read::default();
    read_until(resp, &mut got, |r| r.text.contains("up")).await;
    assert!(running(&api, &id, "slee[p] 41.5").await);
    let v = api
        .wait_info(&id, &abandoned, |v| v["state"] != "running")
        .await;
    assert_eq!(v["state"], "killed", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("no client attached for 1s"),
        "{v}"
    );
    assert!(
        !running(&api, &id, "slee[p] 41.5").await,
        "the command outlived its exec"
    );
    // Reading it back ends with the reason, not a made-up exit code.
    let mut back = Read::default();
    read_until(resume(&api, &id, &abandoned, 0).await, &mut back, |_| false).await;
    assert!(back.exit.is_none());
    assert!(
        back.text.starts_with("up\n") && back.text.contains("stopped"),
        "{back:?}"
    );

    // Kill while attached: the reader sees the end at once.
    let (resp, killed) = api.start(&id, "echo up; exec sleep 42.5").await;
    let reader = tokio::spawn(async move {
        let mut r = Read::default();
        read_until(resp, &mut r, |_| false).await;
        r
    });
    api.wait_info(&id, &killed, |v| v["output_bytes"].as_u64() > Some(0))
        .await;
    let (s, v) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/sandboxes/{id}/execs/{killed}"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "killed", "{v}");
    let r = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the reader saw the end")
        .expect("join");
    assert!(r.text.contains("killed by the caller"), "{r:?}");
    assert!(!running(&api, &id, "slee[p] 42.5").await);
    let (s, v) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/sandboxes/{id}/execs/{killed}"),
            None,
        )
        .await;
    assert_eq!(s, 409, "{v}");

    // Bad input and other sandboxes' execs.
    let other = api.spawn().await;
    for (path, want) in [
        (format!("/sandboxes/{id}/execs/ex-0000000000000000"), 404),
        (format!("/sandboxes/{other}/execs/{killed}"), 404),
        (format!("/sandboxes/{other}/execs/{killed}/stream"), 404),
        (
            format!("/sandboxes/{id}/execs/{killed}/stream?offset=-1"),
            400,
        ),
        (
            format!("/sandboxes/{id}/execs/{killed}/stream?offset=abc"),
            400,
        ),
        (format!("/sandboxes/sb-00000000/execs/{killed}"), 404),
    ] {
        let (s, v) = api.get(&path).await;
        assert_eq!(s, want, "{path}: {v}");
        assert!(v["message"].is_string(), "{path}: {v}");
    }
    let (s, list) = api.get(&format!("/sandboxes/{other}/execs")).await;
    assert_eq!((s, list), (200, json!([])));

    // Destroying the sandbox forgets its execs.
    let (s, _) = api
        .call(reqwest::Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = api.get(&format!("/sandboxes/{id}/execs/{killed}")).await;
    assert_eq!(s, 404);
}
