//! End-to-end tests of the REST API on a real listener, with the mock
//! provider and a SQLite store in a temp dir.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use stacyvm_core::config::Config;
use stacyvm_core::events::EventBus;
use stacyvm_core::manager::Manager;
use stacyvm_core::metrics::Metrics;
use stacyvm_core::registry::Registry;
use stacyvm_providers::mock::MockProvider;
use stacyvm_store::SqliteStore;

mod common;

struct Server {
    base: String,
    http: reqwest::Client,
    manager: Arc<Manager>,
    _server: common::TestServer,
}

async fn start_with(cfg: Config) -> Server {
    let t = common::start_with(cfg).await;
    Server {
        base: format!("{}/api/v1", t.root),
        http: t.http.clone(),
        manager: t.manager.clone(),
        _server: t,
    }
}

async fn start() -> Server {
    start_with(Config::default()).await
}

impl Server {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> (u16, String, reqwest::header::HeaderMap) {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            rb = rb
                .body(b.to_string())
                .header("content-type", "application/json");
        }
        let r = rb.send().await.expect("send");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, r.text().await.expect("text"), headers)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let (s, t, _) = self.call(reqwest::Method::GET, path, None).await;
        (s, serde_json::from_str(&t).unwrap_or(Value::String(t)))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (s, t, _) = self
            .call(reqwest::Method::POST, path, Some(&body.to_string()))
            .await;
        (s, serde_json::from_str(&t).unwrap_or(Value::String(t)))
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        let (s, t, _) = self.call(reqwest::Method::DELETE, path, None).await;
        (s, serde_json::from_str(&t).unwrap_or(Value::String(t)))
    }

    async fn spawn(&self) -> String {
        let (s, v) = self.post("/sandboxes", json!({"ttl": "10m"})).await;
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().expect("id").to_string()
    }
}

fn assert_error(status: u16, v: &Value, want_status: u16, want_code: &str, contains: &str) {
    assert_eq!(status, want_status, "{v}");
    assert_eq!(v["code"], want_code, "{v}");
    let msg = v["message"].as_str().expect("message");
    assert!(
        msg.contains(contains),
        "message {msg:?} should contain {contains:?}"
    );
    assert_eq!(
        v.as_object().expect("object").len(),
        2,
        "exactly code and message: {v}"
    );
}

#[tokio::test]
async fn probes_are_compact_json_with_newline_and_request_id() {
    let s = start().await;
    let (status, text, headers) = s.call(reqwest::Method::GET, "/live", None).await;
    assert_eq!(status, 200);
    assert!(text.contains("\"status\":\"alive\""), "{text}");
    assert!(text.ends_with("}\n"));
    assert!(headers.get("x-request-id").is_some());
    let r = s
        .http
        .get(format!("{}/health", s.base))
        .header("X-Request-ID", "abc-123")
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let (status, v) = s.get("/ready").await;
    assert_eq!((status, v["status"].as_str()), (200, Some("ready")));
    assert_eq!(v["ready_providers"], 1);
}

#[tokio::test]
async fn spawn_get_list_destroy() {
    let s = start().await;
    let (status, v) = s
        .post(
            "/sandboxes",
            json!({"image": "host", "memory_mb": 256, "metadata": {"a": "b"}}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    assert!(stacyvm_core::paths::is_sandbox_id(&id));
    assert_eq!(
        (
            v["state"].as_str(),
            v["provider"].as_str(),
            v["memory_mb"].as_i64(),
            v["vcpus"].as_i64()
        ),
        (Some("running"), Some("mock"), Some(256), Some(1))
    );
    assert_eq!(v["metadata"]["a"], "b");
    assert_eq!(v["worker_id"], "local");
    let keys: Vec<&String> = v.as_object().expect("obj").keys().collect();
    assert_eq!(
        keys,
        [
            "id",
            "state",
            "provider",
            "image",
            "memory_mb",
            "vcpus",
            "worker_id",
            "created_at",
            "expires_at",
            "metadata",
            "preview_domain"
        ]
    );
    let (status, got) = s.get(&format!("/sandboxes/{id}")).await;
    assert_eq!((status, &got["id"]), (200, &v["id"]));
    let (_, list) = s.get("/sandboxes").await;
    assert_eq!(list.as_array().expect("array").len(), 1);
    let (status, v) = s.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!((status, v), (200, json!({"status": "destroyed"})));
    let (status, v) = s.get(&format!("/sandboxes/{id}")).await;
    assert_error(
        status,
        &v,
        404,
        "NOT_FOUND",
        &format!("sandbox destroyed: {id}"),
    );
    let (status, _) = s.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(status, 200, "destroy is idempotent");
    let (status, _) = s.delete("/sandboxes/sb-00000000").await;
    assert_eq!(status, 200, "unknown id destroys fine");
    let (_, list) = s.get("/sandboxes").await;
    assert_eq!(list, json!([]));
}

#[tokio::test]
async fn bad_input_is_typed_and_leaves_nothing_behind() {
    let mut cfg = Config::default();
    cfg.server.max_body_bytes = 4096;
    let s = start_with(cfg).await;
    let (st, v) = s.post("/sandboxes", json!({"ttl": "forever"})).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "parsing TTL");
    let (st, v) = s.post("/sandboxes", json!({"ttl": "-5m"})).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "ttl must be positive");
    let (st, t, _) = s
        .call(reqwest::Method::POST, "/sandboxes", Some("{not json"))
        .await;
    assert_error(
        st,
        &serde_json::from_str(&t).expect("json"),
        400,
        "BAD_REQUEST",
        "invalid request body",
    );
    let (st, v) = s.post("/sandboxes", json!({"memory_mb": "lots"})).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "invalid request body");
    let (st, v) = s.post("/sandboxes", json!({"memory_mb": -1})).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "memory_mb");
    let (st, v) = s.post("/sandboxes", json!({"network_mode": "host"})).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "network_mode");
    let (st, v) = s.post("/sandboxes", json!({"provider": "nope"})).await;
    assert_error(st, &v, 404, "NOT_FOUND", "provider not found: nope");
    let (st, v) = s.post("/sandboxes", json!({"ttl": "48h"})).await;
    assert_error(st, &v, 429, "RESOURCE_LIMIT", "ttl exceeds max ttl 24h0m0s");
    let (st, v) = s.post("/sandboxes", json!({"owner_id": "bad owner"})).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "owner_id");
    let r = s
        .http
        .post(format!("{}/sandboxes", s.base))
        .header("X-User-ID", "a/b")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let big = format!("{{\"image\":\"{}\"}}", "x".repeat(10_000));
    let (st, t, _) = s
        .call(reqwest::Method::POST, "/sandboxes", Some(&big))
        .await;
    assert_error(
        st,
        &serde_json::from_str(&t).expect("json"),
        413,
        "PAYLOAD_TOO_LARGE",
        "too large",
    );
    // A provider-side spawn failure leaves no record and frees the slot.
    let (st, _) = s.post("/sandboxes", json!({"image": "has space"})).await;
    assert_eq!(st, 400);
    let (_, list) = s.get("/sandboxes").await;
    assert_eq!(list, json!([]), "no partial record");
    assert!(s
        .manager
        .store()
        .list_active_sandboxes()
        .await
        .expect("list")
        .is_empty());
    let (st, v) = s.get("/sandboxes/not-an-id").await;
    assert_error(st, &v, 404, "NOT_FOUND", "sandbox not found");
    let (st, t, _) = s.call(reqwest::Method::PUT, "/sandboxes", Some("{}")).await;
    assert_error(
        st,
        &serde_json::from_str(&t).expect("json"),
        405,
        "METHOD_NOT_ALLOWED",
        "PUT",
    );
    let (st, v) = s.get("/nope").await;
    assert_error(st, &v, 404, "NOT_FOUND", "route not found");
}

#[tokio::test]
async fn exec_sync_modes_errors_and_timeouts() {
    let s = start().await;
    let id = s.spawn().await;
    let p = format!("/sandboxes/{id}/exec");
    let (st, v) = s
        .post(&p, json!({"command": "echo $((1+2)); echo e >&2; exit 4"}))
        .await;
    assert_eq!(st, 200);
    assert_eq!(
        (
            v["exit_code"].as_i64(),
            v["stdout"].as_str(),
            v["stderr"].as_str()
        ),
        (Some(4), Some("3\n"), Some("e\n"))
    );
    let keys: Vec<&String> = v.as_object().expect("obj").keys().collect();
    assert_eq!(keys, ["exit_code", "stdout", "stderr", "duration"]);
    assert!(stacyvm_api::duration::parse(v["duration"].as_str().expect("dur")).is_ok());
    let (_, v) = s
        .post(
            &p,
            json!({"command": "echo", "args": ["$HOME;echo pwned"], "mode": "argv"}),
        )
        .await;
    assert_eq!(v["stdout"], "$HOME;echo pwned\n");
    let (_, v) = s
        .post(&p, json!({"command": "echo", "args": ["$HOME;echo pwned"]}))
        .await;
    assert_eq!(v["stdout"], "$HOME;echo pwned\n", "shell mode quotes args");
    let (_, v) = s
        .post(
            &p,
            json!({"command": "cat", "mode": "argv", "stdin": "piped"}),
        )
        .await;
    assert_eq!(v["stdout"], "piped");
    let (st, v) = s
        .post(&p, json!({"command": "sleep 10", "timeout": "300ms"}))
        .await;
    assert_error(st, &v, 408, "TIMEOUT", &format!("exec timeout: {id}"));
    let (st, v) = s
        .post(&p, json!({"command": "true", "timeout": "soon"}))
        .await;
    assert_error(st, &v, 400, "BAD_REQUEST", "parsing exec timeout");
    let (st, v) = s
        .post(&p, json!({"command": "true", "timeout": "20m"}))
        .await;
    assert_error(
        st,
        &v,
        429,
        "RESOURCE_LIMIT",
        "exec timeout 20m0s exceeds max exec timeout 10m0s",
    );
    let (st, v) = s
        .post(&p, json!({"command": "true", "mode": "python"}))
        .await;
    assert_error(
        st,
        &v,
        400,
        "BAD_REQUEST",
        "unsupported exec mode \"python\"",
    );
    let (st, v) = s.post(&p, json!({"mode": "argv"})).await;
    assert_error(
        st,
        &v,
        400,
        "BAD_REQUEST",
        "argv exec mode requires command",
    );
    let (st, v) = s
        .post(&p, json!({"command": "true", "env": {"A=B": "x"}}))
        .await;
    assert_error(st, &v, 400, "BAD_REQUEST", "environment");
    let (st, v) = s
        .post("/sandboxes/sb-ffffffff/exec", json!({"command": "true"}))
        .await;
    assert_error(st, &v, 404, "NOT_FOUND", "sandbox not found: sb-ffffffff");
    let (_, v) = s
        .post(&p, json!({"command": "/no/such/program", "mode": "argv"}))
        .await;
    assert_eq!(v["exit_code"], 127);
    // `user`: root by name or number runs; a name the sandbox lacks, a
    // malformed or out-of-range id are 400; a uid the provider cannot
    // switch to (the mock runs on the host) is 501.
    for user in ["root", "0", "0:0"] {
        let (st, v) = s
            .post(&p, json!({"command": "echo ok", "user": user}))
            .await;
        assert_eq!((st, v["stdout"].as_str()), (200, Some("ok\n")), "{user}");
    }
    for (user, msg) in [
        (
            "nobody-here",
            "has no account in this sandbox's /etc/passwd",
        ),
        ("1000:staff", "expected a name, uid or uid:gid"),
        ("70000", "ids run from 0 to 65535"),
        (":5", "expected a name, uid or uid:gid"),
        ("5:70000", "ids run from 0 to 65535"),
    ] {
        let (st, v) = s.post(&p, json!({"command": "true", "user": user})).await;
        assert_error(st, &v, 400, "BAD_REQUEST", msg);
    }
    let (st, v) = s.post(&p, json!({"command": "true", "user": "1000"})).await;
    assert_eq!(st, 501, "{v}");
}

#[tokio::test]
async fn exec_stream_ndjson_with_optional_exit_record() {
    let s = start().await;
    let id = s.spawn().await;
    let r = s
        .http
        .post(format!("{}/sandboxes/{id}/exec", s.base))
        .body(json!({"command": "echo a; echo b >&2; echo c", "stream": true}).to_string())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    // The exec's id rides in a header: the body keeps the original shape.
    assert!(
        r.headers()["x-stacyvm-exec-id"]
            .to_str()
            .expect("id")
            .starts_with("ex-"),
        "{:?}",
        r.headers()
    );
    let text = r.text().await.expect("text");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("line is json"))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l.as_object().expect("obj").keys().collect::<Vec<_>>() == ["stream", "data"]),
        "only stream/data without opt-in: {text}"
    );
    let out: String = lines
        .iter()
        .filter(|l| l["stream"] == "stdout")
        .map(|l| l["data"].as_str().expect("data"))
        .collect();
    assert_eq!(out, "a\nc\n");
    let text = s
        .http
        .post(format!("{}/sandboxes/{id}/exec", s.base))
        .body(json!({"command": "exit 5", "stream": true, "report_exit": true}).to_string())
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    let last: Value = serde_json::from_str(text.lines().last().expect("a line")).expect("json");
    assert_eq!(
        (last["type"].as_str(), last["exit_code"].as_i64()),
        (Some("exit"), Some(5))
    );
    let text = s
        .http
        .post(format!("{}/sandboxes/{id}/exec", s.base))
        .body(json!({"command": "sleep 5", "stream": true, "timeout": "200ms"}).to_string())
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    let last: Value = serde_json::from_str(text.lines().last().expect("a line")).expect("json");
    assert_eq!(last["stream"], "stderr");
    assert_eq!(last["data"], format!("exec timeout: {id}"));
    // Pre-flight errors are ordinary JSON errors.
    let (st, v) = s
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "x", "stream": true, "mode": "bad"}),
        )
        .await;
    assert_error(st, &v, 400, "BAD_REQUEST", "unsupported exec mode");
}

#[tokio::test]
async fn exec_over_websocket() {
    let s = start().await;
    let id = s.spawn().await;
    let url = format!(
        "{}/sandboxes/{id}/exec/ws",
        s.base.replace("http://", "ws://")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"command": "echo ws; exit 3"}).to_string().into(),
    ))
    .await
    .expect("send");
    let mut out = String::new();
    let mut done = None;
    while let Some(msg) = ws.next().await {
        match msg.expect("msg") {
            tokio_tungstenite::tungstenite::Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                if v["type"] == "done" {
                    done = Some(v);
                } else {
                    out.push_str(v["data"].as_str().expect("data"));
                }
            }
            tokio_tungstenite::tungstenite::Message::Close(f) => {
                assert_eq!(f.map(|f| u16::from(f.code)), Some(1000));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(out, "ws\n");
    assert_eq!(done.expect("done message")["exit_code"], 3);
    // A bad first message closes with 1007.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "not json".into(),
    ))
    .await
    .expect("send");
    let mut code = None;
    while let Some(Ok(msg)) = ws.next().await {
        if let tokio_tungstenite::tungstenite::Message::Close(f) = msg {
            code = f.map(|f| u16::from(f.code));
            break;
        }
    }
    assert_eq!(code, Some(1007));
    // Unknown sandboxes fail before the upgrade with a JSON 404.
    let (st, v) = s.get("/sandboxes/sb-00000000/exec/ws").await;
    assert_eq!(st, 404, "{v}");
}

#[tokio::test]
async fn file_routes() {
    let s = start().await;
    let id = s.spawn().await;
    let f = |p: &str| format!("/sandboxes/{id}/files{p}");
    let (st, v) = s
        .post(
            &f(""),
            json!({"path": "/workspace/d/a.txt", "content": "hello", "mode": "600"}),
        )
        .await;
    assert_eq!((st, v), (200, json!({"status": "written"})));
    let r = s
        .http
        .get(format!("{}{}", s.base, f("")))
        .query(&[("path", "/workspace/d/a.txt")])
        .send()
        .await
        .expect("read");
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.text().await.expect("text"), "hello");
    let (_, v) = s
        .post(
            &f(""),
            json!({"path": "rel.bin", "content": "AAEC/w==", "encoding": "base64"}),
        )
        .await;
    assert_eq!(v["status"], "written");
    let r = s
        .http
        .get(format!("{}{}", s.base, f("")))
        .query(&[("path", "/workspace/rel.bin")])
        .send()
        .await
        .expect("read");
    assert_eq!(
        r.bytes().await.expect("bytes").to_vec(),
        vec![0u8, 1, 2, 255]
    );
    let (_, v) = s.get(&f("/stat?path=/workspace/d/a.txt")).await;
    assert_eq!(
        (
            v["path"].as_str(),
            v["size"].as_i64(),
            v["mode"].as_str(),
            v["is_dir"].as_bool()
        ),
        (
            Some("/workspace/d/a.txt"),
            Some(5),
            Some("600"),
            Some(false)
        )
    );
    let (_, v) = s.get(&f("/list?path=/workspace")).await;
    let paths: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["path"].as_str().expect("p"))
        .collect();
    assert_eq!(paths, ["/workspace/d", "/workspace/rel.bin"]);
    let (_, v) = s.get(&f("/glob?pattern=/workspace/d/*.txt")).await;
    assert_eq!(v, json!(["/workspace/d/a.txt"]));
    let (_, v) = s.get(&f("/glob?pattern=/workspace/*.zzz")).await;
    assert_eq!(v, json!([]), "no match is [] not null");
    let (_, v) = s
        .post(
            &f("/chmod"),
            json!({"path": "/workspace/d/a.txt", "mode": "755"}),
        )
        .await;
    assert_eq!(v, json!({"status": "chmod applied"}));
    let (_, v) = s
        .post(
            &f("/move"),
            json!({"old_path": "/workspace/d/a.txt", "new_path": "/workspace/e/b.txt"}),
        )
        .await;
    assert_eq!(v, json!({"status": "moved"}));
    let (st, v) = s.get(&f("/stat?path=/workspace/d/a.txt")).await;
    assert_error(st, &v, 404, "NOT_FOUND", "not found");
    let (st, v) = s.delete(&f("?path=/workspace/e")).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "not empty");
    let (st, v) = s.delete(&f("?path=/workspace/e&recursive=true")).await;
    assert_eq!((st, v), (200, json!({"status": "deleted"})));
    // Bad input on every route.
    let (st, v) = s.get(&f("")).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "path query parameter required");
    let (st, v) = s.get(&f("/glob")).await;
    assert_error(
        st,
        &v,
        400,
        "BAD_REQUEST",
        "pattern query parameter required",
    );
    for (method, path, body) in [
        ("GET", f("?path=../../etc/passwd"), None),
        ("GET", f("/stat?path=/../etc"), None),
        ("GET", f("/list?path=../../.."), None),
        ("DELETE", f("?path=../../x"), None),
        ("GET", f("/glob?pattern=/workspace/../../*"), None),
        (
            "POST",
            f(""),
            Some(json!({"path": "../../etc/x", "content": "x"})),
        ),
        (
            "POST",
            f("/move"),
            Some(json!({"old_path": "/workspace/a", "new_path": "../../../x"})),
        ),
        (
            "POST",
            f("/chmod"),
            Some(json!({"path": "/../x", "mode": "644"})),
        ),
        ("POST", f(""), Some(json!({"path": "", "content": "x"}))),
        (
            "POST",
            f(""),
            Some(json!({"path": "a\u{0}b", "content": "x"})),
        ),
        (
            "POST",
            f("/chmod"),
            Some(json!({"path": "/workspace", "mode": "rwx"})),
        ),
        (
            "POST",
            f(""),
            Some(json!({"path": "x", "content": "!!", "encoding": "base64"})),
        ),
    ] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let (st, t, _) = s
            .call(m, &path, body.map(|b| b.to_string()).as_deref())
            .await;
        let v: Value = serde_json::from_str(&t).expect("json");
        assert_eq!(st, 400, "{method} {path}: {v}");
        assert_eq!(v["code"], "BAD_REQUEST");
    }
}

#[tokio::test]
async fn extend_admission_and_prune() {
    let s = start().await;
    let id = s.spawn().await;
    let p = format!("/sandboxes/{id}/extend");
    let (st, v) = s.post(&p, json!({})).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "ttl is required");
    let (st, v) = s.post(&p, json!({"ttl": "abc"})).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "invalid ttl format");
    let (st, v) = s.post(&p, json!({"ttl": "0s"})).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "ttl must be positive");
    let (st, v) = s.post(&p, json!({"ttl": "30h"})).await;
    assert_error(st, &v, 429, "RESOURCE_LIMIT", "max ttl");
    let (st, v) = s.post(&p, json!({"ttl": "2h"})).await;
    assert_eq!(st, 200);
    let exp = chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().expect("exp"))
        .expect("rfc3339");
    let delta = exp.with_timezone(&chrono::Utc) - chrono::Utc::now();
    assert!(delta > chrono::Duration::minutes(119) && delta <= chrono::Duration::hours(2));
    let lease = s.manager.store().get_lease(&id).await.expect("lease");
    assert!(
        lease.expires_at > exp.with_timezone(&chrono::Utc),
        "lease follows the extension"
    );
    let (st, v) = s.post("/sandboxes/admission", json!({"ttl": "10m"})).await;
    assert_eq!(st, 200);
    let keys: Vec<&String> = v.as_object().expect("obj").keys().collect();
    assert_eq!(
        keys,
        [
            "allowed",
            "queueable",
            "active_sandboxes",
            "max_sandboxes",
            "max_ttl"
        ],
        "no worker keys (Python SDK)"
    );
    assert_eq!(
        (v["allowed"].as_bool(), v["active_sandboxes"].as_i64()),
        (Some(true), Some(1))
    );
    s.manager
        .store()
        .set_sandbox_expiry(&id, chrono::Utc::now() - chrono::Duration::seconds(1), None)
        .await
        .expect("expire");
    let (st, v) = s.delete("/sandboxes").await;
    assert_eq!((st, v), (200, json!({"pruned": 1})));
    let (_, list) = s.get("/sandboxes").await;
    assert_eq!(list, json!([]));
}

#[tokio::test]
async fn quotas_limit_spawns_per_owner() {
    let s = start().await;
    let (st, v, _) = s
        .call(
            reqwest::Method::PUT,
            "/quotas/alice",
            Some(&json!({"max_sandboxes": 1, "max_ttl": "1h"}).to_string()),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let v: Value = serde_json::from_str(&v).expect("json");
    assert_eq!(
        (v["max_ttl"].as_str(), v["max_exec_timeout"].as_str()),
        (Some("1h0m0s"), Some("0s"))
    );
    let spawn_as = |owner: &'static str, ttl: &'static str| {
        let http = s.http.clone();
        let url = format!("{}/sandboxes", s.base);
        async move {
            http.post(url)
                .header("X-User-ID", owner)
                .body(json!({"ttl": ttl}).to_string())
                .send()
                .await
                .expect("send")
        }
    };
    assert_eq!(spawn_as("alice", "10m").await.status(), 201);
    let r = spawn_as("alice", "10m").await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        v["message"],
        "resource limit exceeded: max sandboxes per owner reached (1)"
    );
    assert_eq!(
        spawn_as("bob", "10m").await.status(),
        201,
        "other owners unaffected"
    );
    let (_, v) = s.get("/quotas/alice/usage").await;
    assert_eq!(
        v,
        json!({"owner_id": "alice", "active_sandboxes": 1, "max_sandboxes": 1, "max_ttl": "1h0m0s", "max_exec_timeout": "10m0s", "quota_configured": true})
    );
    let (_, v) = s.get("/quotas/summary").await;
    assert_eq!(
        v,
        json!({"total": 1, "with_max_sandboxes": 1, "with_max_ttl": 1, "with_max_exec_timeout": 0})
    );
    let (st, t, _) = s
        .call(
            reqwest::Method::PUT,
            "/quotas/alice",
            Some(&json!({"max_ttl": "1.5s"}).to_string()),
        )
        .await;
    assert_eq!(st, 400, "{t}");
    let (st, _, _) = s
        .call(reqwest::Method::PUT, "/quotas/bad%20owner", Some("{}"))
        .await;
    assert_eq!(st, 400);
    let (st, v) = s.delete("/quotas/alice").await;
    assert_eq!((st, v), (200, json!({"status": "deleted"})));
    let (st, v) = s.get("/quotas/alice").await;
    assert_error(st, &v, 404, "NOT_FOUND", "not found: owner_quota \"alice\"");
    assert_eq!(
        spawn_as("alice", "10m").await.status(),
        201,
        "quota removed"
    );
}

#[tokio::test]
async fn overflow_queue_waits_for_capacity() {
    let mut cfg = Config::default();
    cfg.defaults.max_sandboxes = 1;
    cfg.defaults.spawn_overflow = "queue".into();
    cfg.defaults.spawn_queue_timeout = stacyvm_core::config::Dur::secs(10);
    let s = Arc::new(start_with(cfg).await);
    let first = s.spawn().await;
    let s2 = s.clone();
    let waiter = tokio::spawn(async move { s2.post("/sandboxes", json!({"ttl": "5m"})).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "second spawn queues while the cap is reached"
    );
    let (_, v) = s.post("/sandboxes/admission", json!({})).await;
    assert_eq!(
        (
            v["allowed"].as_bool(),
            v["queueable"].as_bool(),
            v["reason"].as_str()
        ),
        (Some(false), Some(true), Some("max_sandboxes"))
    );
    s.delete(&format!("/sandboxes/{first}")).await;
    let (st, v) = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("dequeued")
        .expect("task");
    assert_eq!(st, 201, "{v}");
}

#[tokio::test]
async fn reject_mode_caps_total_sandboxes() {
    let mut cfg = Config::default();
    cfg.defaults.max_sandboxes = 2;
    let s = start_with(cfg).await;
    s.spawn().await;
    s.spawn().await;
    let (st, v) = s.post("/sandboxes", json!({})).await;
    assert_error(st, &v, 429, "RESOURCE_LIMIT", "max sandboxes reached (2)");
}

#[tokio::test]
async fn concurrent_spawns_are_not_serialised_and_respect_the_cap() {
    let mut cfg = Config::default();
    cfg.defaults.max_sandboxes = 10;
    let s = Arc::new(start_with(cfg).await);
    let futs = (0..16).map(|_| {
        let s = s.clone();
        async move { s.post("/sandboxes", json!({})).await.0 }
    });
    let codes = futures::future::join_all(futs).await;
    assert_eq!(codes.iter().filter(|c| **c == 201).count(), 10, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 6, "{codes:?}");
}

/// A template naming a provider that does not exist is refused on create
/// and on replace, with the provider's name; the stored template stays.
#[tokio::test]
async fn templates_refuse_unknown_providers() {
    let s = start().await;
    let (st, v) = s
        .post(
            "/templates",
            json!({"name": "t", "image": "host", "provider": "nope"}),
        )
        .await;
    assert_error(st, &v, 404, "NOT_FOUND", "provider not found: nope");
    let (st, v) = s
        .post("/templates", json!({"name": "t", "image": "host"}))
        .await;
    assert_eq!(st, 201, "{v}");
    let r = s
        .http
        .put(format!("{}/templates/t", s.base))
        .json(&json!({"image": "host", "provider": "nope"}))
        .send()
        .await
        .expect("send");
    let st = r.status().as_u16();
    let v: Value = r.json().await.expect("json");
    assert_error(st, &v, 404, "NOT_FOUND", "provider not found: nope");
    let (st, v) = s.get("/templates/t").await;
    assert_eq!((st, v["provider"].as_str()), (200, None), "unchanged: {v}");
}

#[tokio::test]
async fn templates_crud_aliases_and_spawn() {
    let s = start().await;
    let (st, v) = s.post("/templates", json!({"name": "py", "image": "host", "vcpus": 2, "ttl": "15m", "metadata": {"k": "v"}})).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        (
            v["cpu_cores"].as_i64(),
            v["vcpus"].as_i64(),
            v["ttl_seconds"].as_i64(),
            v["ttl"].as_str(),
            v["memory_mb"].as_i64()
        ),
        (Some(2), Some(2), Some(900), Some("15m0s"), Some(512))
    );
    let (st, v) = s
        .post("/templates", json!({"name": "py", "image": "host"}))
        .await;
    assert_error(st, &v, 409, "CONFLICT", "conflict: template already exists");
    let (st, v) = s.post("/templates", json!({"image": "host"})).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "template name is required");
    let (st, v) = s.post("/templates", json!({"name": "x"})).await;
    assert_error(st, &v, 400, "BAD_REQUEST", "template image is required");
    let (st, v) = s
        .post(
            "/templates",
            json!({"name": "x", "image": "i", "ttl": "soon"}),
        )
        .await;
    assert_error(st, &v, 400, "BAD_REQUEST", "invalid ttl");
    let (_, v) = s.get("/templates").await;
    assert_eq!(v.as_array().expect("array").len(), 1);
    let (st, t, _) = s
        .call(
            reqwest::Method::PUT,
            "/templates/py",
            Some(&json!({"image": "other"}).to_string()),
        )
        .await;
    assert_eq!(st, 200, "{t}");
    let v: Value = serde_json::from_str(&t).expect("json");
    assert_eq!(
        (v["image"].as_str(), v["memory_mb"].as_i64()),
        (Some("other"), Some(512))
    );
    assert_ne!(v["created_at"], "0001-01-01T00:00:00Z");
    let (st, t, _) = s
        .call(reqwest::Method::POST, "/templates/py/spawn", None)
        .await;
    assert_eq!(st, 201, "spawn from template with no body: {t}");
    let (_, list) = s.get("/sandboxes").await;
    let sb = &list[0];
    assert_eq!(
        (
            sb["image"].as_str(),
            sb["vcpus"].as_i64(),
            sb["metadata"]["template"].as_str(),
            sb["metadata"]["k"].as_str()
        ),
        (Some("other"), Some(1), Some("py"), None)
    );
    let (st, _) = s.post("/sandboxes", json!({"template": "py"})).await;
    assert_eq!(st, 201, "spawn request can name a template");
    let (st, v) = s.post("/templates/nope/spawn", json!({})).await;
    assert_error(st, &v, 404, "NOT_FOUND", "template \"nope\"");
    let (st, _) = s.delete("/templates/py").await;
    assert_eq!(st, 200);
    let (st, v) = s.get("/templates/py").await;
    assert_error(st, &v, 404, "NOT_FOUND", "not found: template \"py\"");
}

#[tokio::test]
async fn events_metrics_and_providers() {
    let s = start().await;
    let mut sse = s
        .http
        .get(format!("{}/events", s.base))
        .send()
        .await
        .expect("sse");
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let id = s.spawn().await;
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !seen.contains("sandbox.running") {
        let chunk = tokio::time::timeout_at(deadline, sse.chunk())
            .await
            .expect("event in time")
            .expect("chunk")
            .expect("data");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let created = seen
        .lines()
        .find(|l| l.contains("sandbox.created"))
        .expect("created event");
    let ev: Value = serde_json::from_str(created.trim_start_matches("data: ")).expect("event json");
    assert_eq!(ev["sandbox_id"], id.as_str());
    assert!(ev["id"].as_str().expect("id").starts_with("evt-"));
    s.post(&format!("/sandboxes/{id}/exec"), json!({"command": "true"}))
        .await;
    let (st, text, headers) = s
        .call(reqwest::Method::GET, "/metrics/prometheus", None)
        .await;
    assert_eq!(st, 200);
    assert!(headers["content-type"]
        .to_str()
        .expect("ct")
        .starts_with("text/plain; version=0.0.4"));
    assert!(text.contains("stacyvm_uptime_seconds "));
    assert!(
        text.contains("stacyvm_sandboxes_total{state=\"running\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("stacyvm_operation_success_total{operation=\"exec\",provider=\"mock\"} 1"),
        "{text}"
    );
    let (_, m) = s.get("/metrics").await;
    assert_eq!(m["sandboxes"]["total"], 1);
    let (_, d) = s.get("/diagnostics").await;
    assert_eq!(d["store"]["healthy"], true);
    for key in [
        "build",
        "events",
        "generated_at",
        "leases",
        "limits",
        "operations",
        "process",
        "providers",
        "quotas",
        "rate_limit",
        "redactions",
        "remediation",
        "sandboxes",
        "scheduler",
        "store",
        "workers",
    ] {
        assert!(d.get(key).is_some(), "diagnostics has {key}");
    }
    assert!(d["build"]["goarch"].is_string() && d["process"]["memory"]["alloc"].is_number());
    let (_, p) = s.get("/providers").await;
    assert_eq!(p[0]["name"], "mock");
    assert_eq!(p[0]["default"], true);
    let (_, p) = s.get("/providers/mock").await;
    assert_eq!(
        (p["sandbox_count"].as_i64(), p["config"]["type"].as_str()),
        (Some(1), Some("mock"))
    );
    let (st, v) = s.get("/providers/nope").await;
    assert_error(st, &v, 404, "NOT_FOUND", "provider not found: nope");
    let (_, v) = s.post("/providers/test", json!({})).await;
    assert_eq!(v, json!({"mock": true}));
    let (_, v) = s.get("/snapshots").await;
    assert_eq!(v, json!([]));
    let (_, v) = s.get("/system/stats").await;
    assert!(v["load1"].is_number());
    // The audit trail has the spawn and the exec.
    s.manager.flush_audit().await;
    let rows = s
        .manager
        .store()
        .list_op_audit(&Default::default())
        .await
        .expect("audit");
    let actions: Vec<&str> = rows.iter().map(|r| r.action.as_str()).collect();
    assert!(
        actions.contains(&"sandbox.spawn") && actions.contains(&"exec"),
        "{actions:?}"
    );
}

#[tokio::test]
async fn api_key_protects_everything_but_probes() {
    let mut cfg = Config::default();
    cfg.auth.api_key = stacyvm_core::config::Secret::new("k".repeat(40));
    let s = start_with(cfg).await;
    let (st, _) = s.get("/live").await;
    assert_eq!(st, 200);
    for path in [
        "/sandboxes",
        "/templates",
        "/metrics",
        "/quotas",
        "/providers",
    ] {
        let (st, v) = s.get(path).await;
        assert_error(st, &v, 401, "UNAUTHORIZED", "authentication required");
    }
    let r = s
        .http
        .get(format!("{}/sandboxes", s.base))
        .header("X-API-Key", "k".repeat(40))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let r = s
        .http
        .get(format!("{}/sandboxes", s.base))
        .header("X-API-Key", "wrong")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    // CORS preflight is answered before auth; by default no origin is
    // allowed.
    let r = s
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/sandboxes", s.base))
        .header("Origin", "https://app.example")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn restart_reconciles_running_and_vanished_sandboxes() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cfg = Config::default();
    cfg.server.data_dir = dir.path().to_string_lossy().to_string();
    let make = || async {
        let provider = Arc::new(MockProvider::new(dir.path().join("mock")).expect("mock"));
        let registry = Arc::new(Registry::new(vec![provider], "mock").expect("registry"));
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("db.sqlite"))
                .await
                .expect("store"),
        );
        Manager::new(
            Arc::new(cfg.clone()),
            store,
            registry,
            Arc::new(EventBus::new()),
            Arc::new(Metrics::default()),
        )
    };
    let who = stacyvm_core::manager::Caller::default();
    let (kept, gone) = {
        let m = make().await;
        let a = m
            .spawn(stacyvm_api::SpawnRequest::default(), &who)
            .await
            .expect("a");
        let b = m
            .spawn(stacyvm_api::SpawnRequest::default(), &who)
            .await
            .expect("b");
        (a.id, b.id)
    };
    // The runtime of `gone` disappears while the server is down.
    std::fs::remove_dir_all(dir.path().join("mock").join(&gone)).expect("remove runtime");
    // A runtime nobody recorded appears (adoption).
    let orphan = stacyvm_core::paths::new_sandbox_id();
    std::fs::create_dir_all(dir.path().join("mock").join(&orphan).join("workspace"))
        .expect("orphan");
    std::fs::write(
        dir.path()
            .join("mock")
            .join(&orphan)
            .join(".stacyvm-mock.json"),
        r#"{"image":"host"}"#,
    )
    .expect("meta");
    let m = make().await;
    m.reconcile().await.expect("reconcile");
    assert_eq!(m.get(&kept, &who).await.expect("kept").state, "running");
    let e = m.get(&gone, &who).await.expect_err("gone");
    assert_eq!(e.kind(), stacyvm_core::ErrorKind::SandboxDestroyed);
    assert_eq!(
        m.get(&orphan, &who).await.expect("adopted").provider,
        "mock"
    );
    let out = m
        .exec(
            &kept,
            &stacyvm_core::manager::ExecRequest {
                command: "echo back".into(),
                ..Default::default()
            },
            &who,
        )
        .await
        .expect("exec after restart");
    assert_eq!(out.stdout, b"back\n");
    let _ = BTreeMap::<u8, u8>::new();
}

/// Mutated request bodies on every decoding route: never a 5xx, always the
/// error JSON, and the server keeps serving.
#[tokio::test]
async fn fuzzed_bodies_never_cause_server_errors() {
    let s = start().await;
    let id = s.spawn().await;
    let routes = [
        "/sandboxes".to_string(),
        "/sandboxes/admission".to_string(),
        format!("/sandboxes/{id}/exec"),
        format!("/sandboxes/{id}/extend"),
        format!("/sandboxes/{id}/files"),
        format!("/sandboxes/{id}/files/move"),
        format!("/sandboxes/{id}/files/chmod"),
        "/templates".to_string(),
    ];
    let seeds = [
        r#"{"image":"host","ttl":"1m","memory_mb":64,"metadata":{"a":"b"}}"#,
        r#"{"command":"echo hi","args":["a"],"mode":"argv","env":{"A":"1"},"timeout":"1s","workdir":"/tmp"}"#,
        r#"{"path":"/workspace/f","content":"x","mode":"644","old_path":"/workspace/f","new_path":"/workspace/g"}"#,
        r#"{"name":"t","image":"host","ttl":"1m","vcpus":1}"#,
    ];
    // xorshift: deterministic, bounded.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let specials: [&[u8]; 10] = [
        b"\"",
        b"{",
        b"}",
        b"[",
        b"\\",
        b"-1",
        b"1e999",
        b"\xff\xfe",
        b"null",
        b"\"..\\/..\"",
    ];
    for i in 0..400 {
        let mut body = seeds[i % seeds.len()].as_bytes().to_vec();
        for _ in 0..(1 + next() % 4) {
            let pos = (next() as usize) % (body.len() + 1);
            match next() % 3 {
                0 if !body.is_empty() => {
                    body.remove(pos.min(body.len() - 1));
                }
                1 => {
                    let sp = specials[(next() as usize) % specials.len()];
                    body.splice(pos..pos, sp.iter().copied());
                }
                _ => {
                    let b = (next() % 256) as u8;
                    body.insert(pos, b);
                }
            }
        }
        let route = &routes[(next() as usize) % routes.len()];
        let r = s
            .http
            .post(format!("{}{route}", s.base))
            .body(body.clone())
            .send()
            .await
            .expect("send");
        let status = r.status().as_u16();
        let text = r.text().await.expect("text");
        assert!(
            status < 500,
            "{route} with {:?} -> {status} {text}",
            String::from_utf8_lossy(&body)
        );
        if status >= 400 {
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("error body is JSON: {text}"));
            assert!(v["code"].is_string() && v["message"].is_string(), "{text}");
        }
    }
    let (st, _) = s.get("/live").await;
    assert_eq!(st, 200, "server still serving");
}

#[tokio::test]
async fn raw_upload_extension_is_binary_safe() {
    let s = start().await;
    let id = s.spawn().await;
    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let r = s
        .http
        .put(format!("{}/sandboxes/{id}/files", s.base))
        .query(&[("path", "/workspace/raw.bin"), ("mode", "600")])
        .body(data.clone())
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200);
    let back = s
        .http
        .get(format!("{}/sandboxes/{id}/files", s.base))
        .query(&[("path", "/workspace/raw.bin")])
        .send()
        .await
        .expect("get")
        .bytes()
        .await
        .expect("bytes");
    assert!(back.to_vec() == data, "raw round trip");
    let (_, v) = s
        .get(&format!(
            "/sandboxes/{id}/files/stat?path=/workspace/raw.bin"
        ))
        .await;
    assert_eq!(v["mode"], "600");
    let r = s
        .http
        .put(format!("{}/sandboxes/{id}/files", s.base))
        .body("x")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 400, "path is required");
}

#[tokio::test]
async fn interactive_websocket_exec_takes_stdin_and_signals() {
    use tokio_tungstenite::tungstenite::Message as M;
    let s = start().await;
    let id = s.spawn().await;
    let url = format!(
        "{}/sandboxes/{id}/exec/ws",
        s.base.replace("http://", "ws://")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    ws.send(M::Text(
        json!({"command": "cat", "mode": "argv", "interactive": true})
            .to_string()
            .into(),
    ))
    .await
    .expect("start");
    ws.send(M::Text(
        json!({"type": "stdin", "data": "hello\n"})
            .to_string()
            .into(),
    ))
    .await
    .expect("stdin");
    let next_json = |m: M| -> Option<Value> {
        if let M::Text(t) = m {
            serde_json::from_str(&t).ok()
        } else {
            None
        }
    };
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo in time")
        .expect("msg")
        .expect("ok");
    assert_eq!(
        next_json(first).expect("json"),
        json!({"stream": "stdout", "data": "hello\n"})
    );
    ws.send(M::Text(json!({"type": "stdin_close"}).to_string().into()))
        .await
        .expect("close stdin");
    let mut done = None;
    while let Some(Ok(m)) = ws.next().await {
        if let Some(v) = next_json(m) {
            if v["type"] == "done" {
                done = Some(v);
                break;
            }
        }
    }
    assert_eq!(done.expect("done")["exit_code"], 0);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    ws.send(M::Text(
        json!({"command": "sleep 30", "interactive": true})
            .to_string()
            .into(),
    ))
    .await
    .expect("start");
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(M::Text(
        json!({"type": "signal", "signal": 15}).to_string().into(),
    ))
    .await
    .expect("signal");
    let mut done = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        if let Some(v) = next_json(m) {
            if v["type"] == "done" {
                done = Some(v);
                break;
            }
        }
    }
    assert_eq!(done.expect("done after SIGTERM")["exit_code"], 143);
}

/// `idle_timeout` and `on_timeout` are checked before anything runs, and
/// shown on the sandbox; an idle sandbox is reaped, a used one is not.
#[tokio::test]
async fn idle_timeouts_are_checked_and_applied() {
    let s = start().await;
    for (body, contains) in [
        (json!({"idle_timeout": "soon"}), "parsing idle_timeout"),
        (json!({"idle_timeout": "500ms"}), "at least 1s"),
        (json!({"idle_timeout": "-5s"}), "idle_timeout"),
        (
            json!({"ttl": "1m", "idle_timeout": "2m"}),
            "longer than the time to live",
        ),
        (json!({"on_timeout": "explode"}), "\"kill\" or \"pause\""),
        (
            json!({"on_timeout": "pause"}),
            "needs a provider that can pause",
        ),
    ] {
        let (st, v) = s.post("/sandboxes", body.clone()).await;
        assert_error(st, &v, 400, "BAD_REQUEST", contains);
    }
    let (_, list) = s.get("/sandboxes").await;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(0),
        "nothing spawned: {list}"
    );

    let (st, v) = s
        .post("/sandboxes", json!({"ttl": "10m", "idle_timeout": "90s"}))
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        (v["idle_timeout"].as_str(), v["on_timeout"].as_str()),
        (Some("1m30s"), Some("kill")),
        "{v}"
    );
    let (st, v) = s
        .post("/sandboxes", json!({"ttl": "10m", "idle_timeout": "1s"}))
        .await;
    assert_eq!(st, 201, "{v}");
    let idle = v["id"].as_str().expect("id").to_string();
    let used = s.spawn().await;
    let (_, plain) = s.get(&format!("/sandboxes/{used}")).await;
    assert!(
        plain.get("idle_timeout").is_none() && plain.get("on_timeout").is_none(),
        "no idle keys on a sandbox without one: {plain}"
    );
    // Untouched past its idle timeout: reaped by the next pass.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let (st, v) = s.delete("/sandboxes").await;
    assert_eq!((st, v), (200, json!({"pruned": 1})));
    let (st, _) = s.get(&format!("/sandboxes/{idle}")).await;
    assert_eq!(st, 404, "the idle sandbox is gone");
    let (st, _) = s.get(&format!("/sandboxes/{used}")).await;
    assert_eq!(st, 200, "the one without an idle timeout stays");

    // Activity on this control plane since the last pass keeps it.
    let (_, v) = s
        .post("/sandboxes", json!({"ttl": "10m", "idle_timeout": "1s"}))
        .await;
    let busy = v["id"].as_str().expect("id").to_string();
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let (st, v) = s
        .post(
            &format!("/sandboxes/{busy}/exec"),
            json!({"command": "echo hi"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = s.delete("/sandboxes").await;
    assert_eq!(v, json!({"pruned": 0}), "an exec just ran");
    let (st, _) = s.get(&format!("/sandboxes/{busy}")).await;
    assert_eq!(st, 200);
}
