//! The E2B control plane on a real listener (mock provider, SQLite): the
//! objects, status codes and error shape the official SDKs parse
//! (docs/e2b.md, "Wire contract"). The SDKs themselves drive a real server
//! in tests/python/test_e2b_sdk.py.

use serde_json::{json, Value};
use stacyvm_core::config::Config;

mod common;

struct Server {
    root: String,
    http: reqwest::Client,
    _server: common::TestServer,
}

async fn start() -> Server {
    start_with(Config::default()).await
}

async fn start_with(cfg: Config) -> Server {
    let t = common::start_with(cfg).await;
    Server {
        root: t.root.clone(),
        http: t.http.clone(),
        _server: t,
    }
}

struct Reply {
    status: u16,
    body: Value,
    headers: reqwest::header::HeaderMap,
}

impl Server {
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self
            .http
            .request(m, format!("{}{path}", self.root))
            .header("X-API-KEY", "e2b_0123abcd");
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let r = rb.send().await.expect("send");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Reply {
            status,
            body,
            headers,
        }
    }

    async fn create(&self, body: Value) -> Value {
        let r = self
            .call("POST", "/v2/sandboxes", Some(&body.to_string()), &[])
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.body
    }
}

/// E2B's error shape: the status as a number, and a message.
fn assert_e2b_error(r: &Reply, status: u16, contains: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.body["code"], json!(status), "{}", r.body);
    let msg = r.body["message"].as_str().expect("message");
    assert!(msg.contains(contains), "{msg:?} lacks {contains:?}");
}

fn ends_in(v: &Value, secs: i64) -> i64 {
    let end =
        chrono::DateTime::parse_from_rfc3339(v["endAt"].as_str().expect("endAt")).expect("time");
    (end.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds() - secs
}

#[tokio::test]
async fn create_get_timeouts_and_kill_speak_e2b() {
    let s = start().await;
    let sb = s
        .create(
            json!({"templateID": "base", "timeout": 120, "metadata": {"who": "me"}, "envVars": {}}),
        )
        .await;
    let id = sb["sandboxID"].as_str().expect("sandboxID").to_string();
    assert_eq!(sb["templateID"], "base");
    assert_eq!(sb["clientID"], "stacyvm");
    assert!(sb["envdVersion"]
        .as_str()
        .is_some_and(|v| v.split('.').count() == 3));
    assert!(sb.get("domain").is_some(), "domain is present (null)");

    let d = s.call("GET", &format!("/sandboxes/{id}"), None, &[]).await;
    assert_eq!(d.status, 200, "{}", d.body);
    for key in [
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "envdVersion",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
    ] {
        assert!(d.body.get(key).is_some(), "{key} missing: {}", d.body);
    }
    assert_eq!(d.body["state"], "running");
    // The layer's own keys stay hidden.
    assert_eq!(d.body["metadata"], json!({"who": "me"}));
    assert!(ends_in(&d.body, 120).abs() <= 5, "{}", d.body);

    // set_timeout overwrites, shorter included.
    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(r#"{"timeout": 30}"#),
            &[],
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let d = s.call("GET", &format!("/sandboxes/{id}"), None, &[]).await;
    assert!(ends_in(&d.body, 30).abs() <= 5, "{}", d.body);
    // refresh and connect only extend.
    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{id}/refreshes"),
            Some(r#"{"duration": 10}"#),
            &[],
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let d = s.call("GET", &format!("/sandboxes/{id}"), None, &[]).await;
    assert!(
        ends_in(&d.body, 30).abs() <= 5,
        "a shorter refresh kept the end: {}",
        d.body
    );
    let c = s
        .call(
            "POST",
            &format!("/v2/sandboxes/{id}/connect"),
            Some(r#"{"timeout": 600}"#),
            &[],
        )
        .await;
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(c.body["sandboxID"], json!(id));
    let d = s.call("GET", &format!("/sandboxes/{id}"), None, &[]).await;
    assert!(ends_in(&d.body, 600).abs() <= 5, "{}", d.body);
    // Connect without a body (older SDKs).
    let c = s
        .call("POST", &format!("/sandboxes/{id}/connect"), None, &[])
        .await;
    assert_eq!(c.status, 200, "{}", c.body);

    // Pause and resume: the mock provider cannot pause (E2B's 501 shape);
    // resuming a running sandbox is a conflict. (Paused sandboxes through
    // E2B's API: tests/e2b_pause.rs in the stacyvm crate, on native.)
    let r = s
        .call("POST", &format!("/sandboxes/{id}/pause"), Some("{}"), &[])
        .await;
    assert_e2b_error(&r, 501, "pause is not supported");
    let r = s
        .call("POST", &format!("/sandboxes/{id}/resume"), Some("{}"), &[])
        .await;
    assert_e2b_error(&r, 409, "not paused");
    let m = s
        .call("GET", &format!("/sandboxes/{id}/metrics"), None, &[])
        .await;
    assert_eq!(m.status, 200, "{}", m.body);
    assert!(m.body.is_array(), "{}", m.body);

    let k = s
        .call("DELETE", &format!("/sandboxes/{id}"), None, &[])
        .await;
    assert_eq!(k.status, 204, "{}", k.body);
    let k = s
        .call("DELETE", &format!("/sandboxes/{id}"), None, &[])
        .await;
    assert_e2b_error(&k, 404, "not found");
    let d = s.call("GET", &format!("/sandboxes/{id}"), None, &[]).await;
    assert_e2b_error(&d, 404, "not found");
    let r = s
        .call(
            "POST",
            &format!("/sandboxes/{id}/timeout"),
            Some(r#"{"timeout": 30}"#),
            &[],
        )
        .await;
    assert_e2b_error(&r, 404, "not found");
}

#[tokio::test]
async fn bad_input_gets_e2b_errors_and_spawns_nothing() {
    let s = start().await;
    let r = s
        .call("POST", "/v2/sandboxes", Some("{not json"), &[])
        .await;
    assert_e2b_error(&r, 400, "");
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(r#"{"metadata": {"e2b.template": "x"}}"#),
            &[],
        )
        .await;
    assert_e2b_error(&r, 400, "reserved");
    let r = s
        .call("POST", "/v2/sandboxes", Some(r#"{"timeout": -5}"#), &[])
        .await;
    assert_e2b_error(&r, 400, "timeout");
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some(&json!({"envVars": {"A": "x".repeat(5000)}}).to_string()),
            &[],
        )
        .await;
    assert_e2b_error(&r, 400, "envVars");
    let r = s
        .call(
            "POST",
            "/v2/sandboxes",
            Some("{}"),
            &[("Idempotency-Key", "Not Valid!")],
        )
        .await;
    assert_e2b_error(&r, 400, "Idempotency-Key");
    let r = s
        .call("POST", "/sandboxes/sb-0000dead/timeout", Some("{}"), &[])
        .await;
    assert_e2b_error(&r, 400, "timeout is required");
    let r = s
        .call("GET", "/v2/sandboxes?state=sleeping", None, &[])
        .await;
    assert_e2b_error(&r, 400, "state");
    let r = s
        .call("GET", "/v2/sandboxes?nextToken=garbage!", None, &[])
        .await;
    assert_e2b_error(&r, 400, "nextToken");
    let r = s.call("GET", "/v2/sandboxes?limit=0", None, &[]).await;
    assert_e2b_error(&r, 400, "limit");
    // Routes StacyVM lacks, as newer SDKs may call them.
    let r = s
        .call(
            "POST",
            "/v2/sandboxes/sb-0000dead/snapshots",
            Some("{}"),
            &[],
        )
        .await;
    assert_e2b_error(&r, 404, "route not found");
    let r = s.call("PUT", "/v2/sandboxes", Some("{}"), &[]).await;
    assert_eq!(r.body["code"], json!(r.status), "{}", r.body);
    // /api/v1 keeps its own error shape.
    let r = s.call("GET", "/api/v1/nope", None, &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["code"], "NOT_FOUND");
    let l = s.call("GET", "/v2/sandboxes", None, &[]).await;
    assert_eq!(l.body, json!([]), "nothing was spawned");
}

#[tokio::test]
async fn idempotency_key_makes_a_retried_create_one_sandbox() {
    let s = start().await;
    let create = |key: &'static str| {
        let s = &s;
        async move {
            s.call(
                "POST",
                "/v2/sandboxes",
                Some("{}"),
                &[("Idempotency-Key", key)],
            )
            .await
        }
    };
    let (a, b) = tokio::join!(create("retry-1"), create("retry-1"));
    assert_eq!((a.status, b.status), (201, 201), "{} {}", a.body, b.body);
    assert_eq!(a.body["sandboxID"], b.body["sandboxID"]);
    let c = create("retry-2").await;
    assert_ne!(c.body["sandboxID"], a.body["sandboxID"]);
    let l = s.call("GET", "/v2/sandboxes", None, &[]).await;
    assert_eq!(l.body.as_array().map(Vec::len), Some(2), "{}", l.body);
    // Once the first is gone, the key makes a new sandbox.
    let id = a.body["sandboxID"].as_str().expect("id");
    s.call("DELETE", &format!("/sandboxes/{id}"), None, &[])
        .await;
    let d = create("retry-1").await;
    assert_eq!(d.status, 201);
    assert_ne!(d.body["sandboxID"], a.body["sandboxID"]);
}

#[tokio::test]
async fn list_filters_by_metadata_and_state_and_pages() {
    let s = start().await;
    let mut mine = Vec::new();
    for i in 0..3 {
        let sb = s
            .create(json!({"metadata": {"suite": "pages", "n": i.to_string()}}))
            .await;
        mine.push(sb["sandboxID"].as_str().expect("id").to_string());
    }
    s.create(json!({"metadata": {"suite": "other"}})).await;

    let q = "metadata=suite%3Dpages";
    let mut seen = Vec::new();
    let mut token = String::new();
    for page in 0..3 {
        let path = if token.is_empty() {
            format!("/v2/sandboxes?{q}&limit=2")
        } else {
            format!("/v2/sandboxes?{q}&limit=2&nextToken={token}")
        };
        let r = s.call("GET", &path, None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        for sb in r.body.as_array().expect("array") {
            assert_eq!(sb["state"], "running");
            assert_eq!(sb["metadata"]["suite"], "pages");
            seen.push(sb["sandboxID"].as_str().expect("id").to_string());
        }
        match r.headers.get("x-next-token") {
            Some(t) => token = t.to_str().expect("token").to_string(),
            None => {
                assert_eq!(page, 1, "two pages of 2 and 1");
                break;
            }
        }
    }
    assert_eq!(seen, mine, "every match once, oldest first");
    let r = s
        .call(
            "GET",
            &format!("/v2/sandboxes?{q}&order=desc&limit=1"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.body[0]["sandboxID"], json!(mine[2]));
    let r = s.call("GET", "/v2/sandboxes?state=paused", None, &[]).await;
    assert_eq!(r.body, json!([]));
    let r = s
        .call("GET", "/v2/sandboxes?state=running,paused", None, &[])
        .await;
    assert_eq!(r.body.as_array().map(Vec::len), Some(4));
    // The v1 route: all matches, no pagination.
    let r = s.call("GET", &format!("/sandboxes?{q}"), None, &[]).await;
    assert_eq!(r.body.as_array().map(Vec::len), Some(3));
    // Reserved keys are never a filter.
    let r = s
        .call(
            "GET",
            "/v2/sandboxes?metadata=e2b.template%3Dbase",
            None,
            &[],
        )
        .await;
    assert_eq!(r.body, json!([]));
}

/// envd calls are routed by `E2b-Sandbox-Id`, need the sandbox's own
/// token, and answer bad input with typed errors.
#[tokio::test]
async fn envd_routing_tokens_and_bad_input() {
    let s = start().await;
    let a = s.create(json!({})).await;
    let b = s.create(json!({})).await;
    let id = a["sandboxID"].as_str().expect("id");
    let token = a["envdAccessToken"].as_str().expect("token");
    let other = b["envdAccessToken"].as_str().expect("token");
    assert_ne!(token, other);
    // A reader's view of the sandbox carries no token.
    let d = s.call("GET", &format!("/sandboxes/{id}"), None, &[]).await;
    assert!(d.body.get("envdAccessToken").is_none(), "{}", d.body);

    let envd = |extra: Vec<(&'static str, String)>| {
        let mut h: Vec<(&'static str, String)> = vec![
            ("E2b-Sandbox-Id", id.to_string()),
            ("E2b-Sandbox-Port", "49983".to_string()),
        ];
        h.extend(extra);
        h
    };
    let send = |method: &'static str,
                path: &'static str,
                headers: Vec<(&'static str, String)>,
                body: Vec<u8>| {
        let s = &s;
        async move {
            let m = reqwest::Method::from_bytes(method.as_bytes()).expect("m");
            let mut rb = s.http.request(m, format!("{}{path}", s.root)).body(body);
            for (k, v) in headers {
                rb = rb.header(k, v);
            }
            let r = rb.send().await.expect("send");
            let st = r.status().as_u16();
            let text = r.text().await.expect("text");
            (
                st,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
            )
        }
    };
    let tok = |t: &str| ("X-Access-Token", t.to_string());
    let json_ct = ("Content-Type", "application/json".to_string());
    let stream_ct = ("Content-Type", "application/connect+json".to_string());

    // A multipart body with no boundary near its start is refused, not
    // buffered.
    let (st, v) = send(
        "POST",
        "/files?path=/workspace/x",
        envd(vec![
            tok(token),
            ("Content-Type", "multipart/form-data; boundary=xyz".into()),
        ]),
        vec![b'a'; 64 * 1024],
    )
    .await;
    assert_eq!(st, 400, "{v}");
    // Health needs no token; everything else needs this sandbox's.
    let (st, _) = send("GET", "/health", envd(vec![]), vec![]).await;
    assert_eq!(st, 204);
    let (st, v) = send(
        "POST",
        "/filesystem.Filesystem/Stat",
        envd(vec![json_ct.clone()]),
        br#"{"path":"/"}"#.to_vec(),
    )
    .await;
    assert_eq!(st, 401, "{v}");
    let (st, v) = send(
        "POST",
        "/filesystem.Filesystem/Stat",
        envd(vec![json_ct.clone(), tok(other)]),
        br#"{"path":"/"}"#.to_vec(),
    )
    .await;
    // Connect's own code: the SDK raises its authentication error.
    assert_eq!(
        (st, v["code"].as_str()),
        (401, Some("unauthenticated")),
        "{v}"
    );
    let (st, v) = send(
        "GET",
        "/files?path=/etc/hostname",
        envd(vec![tok(other)]),
        vec![],
    )
    .await;
    assert_eq!(st, 401, "{v}");
    // Unknown sandboxes and ports: E2B's 502s.
    let (st, v) = send(
        "GET",
        "/health",
        vec![("E2b-Sandbox-Id", "sb-00000000".into())],
        vec![],
    )
    .await;
    assert_eq!(st, 502, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("was not found"),
        "{v}"
    );
    let (st, v) = send(
        "GET",
        "/health",
        vec![
            ("E2b-Sandbox-Id", id.to_string()),
            ("E2b-Sandbox-Port", "49999".into()),
        ],
        vec![],
    )
    .await;
    assert_eq!(st, 502, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("port 49999"),
        "{v}"
    );

    // Connect bad input: wrong content type, short or lying envelopes,
    // compressed flags, non-JSON, missing fields.
    let start = "/process.Process/Start";
    let (st, v) = send(
        "POST",
        start,
        envd(vec![tok(token), json_ct.clone()]),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("invalid_argument")),
        "{v}"
    );
    for body in [
        vec![0u8, 0, 0],
        vec![0u8, 0, 0, 0, 9, b'{', b'}'],
        vec![1u8, 0, 0, 0, 2, b'{', b'}'],
        vec![0u8, 0, 0, 0, 3, b'n', b'o', b'!'],
        vec![0u8, 0, 0, 0, 2, b'{', b'}'],
    ] {
        let (st, v) = send(
            "POST",
            start,
            envd(vec![tok(token), stream_ct.clone()]),
            body.clone(),
        )
        .await;
        assert_eq!(
            (st, v["code"].as_str()),
            (400, Some("invalid_argument")),
            "{body:?}: {v}"
        );
    }
    let (st, v) = send(
        "POST",
        "/filesystem.Filesystem/ListDir",
        envd(vec![tok(token), json_ct.clone()]),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("invalid_argument")),
        "{v}"
    );
    let (st, v) = send(
        "POST",
        "/filesystem.Filesystem/Stat",
        envd(vec![tok(token), json_ct.clone()]),
        b"[1,2".to_vec(),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("invalid_argument")),
        "{v}"
    );
    let (st, v) = send(
        "POST",
        "/filesystem.Filesystem/Stat",
        envd(vec![tok(token), json_ct.clone()]),
        br#"{"path":"/no/such/file"}"#.to_vec(),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")), "{v}");
    let (st, v) = send(
        "POST",
        "/process.Process/SendSignal",
        envd(vec![tok(token), json_ct.clone()]),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("invalid_argument")),
        "{v}"
    );
    let (st, v) = send(
        "POST",
        "/process.Process/SendSignal",
        envd(vec![tok(token), json_ct.clone()]),
        br#"{"process":{"pid":999999},"signal":"SIGNAL_SIGKILL"}"#.to_vec(),
    )
    .await;
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")), "{v}");
    let (st, v) = send(
        "POST",
        "/process.Process/Frobnicate",
        envd(vec![tok(token), json_ct.clone()]),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (501, Some("unimplemented")),
        "{v}"
    );
    let (st, v) = send("GET", "/nope", envd(vec![tok(token)]), vec![]).await;
    assert_eq!((st, v["code"].as_u64()), (404, Some(404)), "{v}");
    let (st, v) = send("GET", "/files", envd(vec![tok(token)]), vec![]).await;
    assert_eq!((st, v["code"].as_u64()), (400, Some(400)), "{v}");
    let (st, v) = send(
        "POST",
        "/files",
        envd(vec![
            tok(token),
            ("Content-Type", "multipart/form-data; boundary=x".into()),
        ]),
        b"garbage".to_vec(),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    // Watchers and users: (path, Authorization, body) → (status, code).
    let basic = |u: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:"))
        )
    };
    let cases: Vec<(&'static str, Option<String>, &str, u16, &str)> = vec![
        (
            "/filesystem.Filesystem/CreateWatcher",
            None,
            "{}",
            400,
            "invalid_argument",
        ),
        // The mock cannot watch: a typed refusal, not a hang.
        (
            "/filesystem.Filesystem/CreateWatcher",
            None,
            r#"{"path":"/workspace"}"#,
            501,
            "unimplemented",
        ),
        (
            "/filesystem.Filesystem/GetWatcherEvents",
            None,
            r#"{"watcherId":"w1-0"}"#,
            404,
            "not_found",
        ),
        (
            "/filesystem.Filesystem/RemoveWatcher",
            None,
            "{}",
            404,
            "not_found",
        ),
        (
            "/filesystem.Filesystem/Stat",
            Some(basic("ghost")),
            r#"{"path":"/"}"#,
            401,
            "unauthenticated",
        ),
        (
            "/filesystem.Filesystem/Stat",
            Some("Basic !!".into()),
            r#"{"path":"/"}"#,
            400,
            "invalid_argument",
        ),
        (
            "/filesystem.Filesystem/Stat",
            Some("Bearer x".into()),
            r#"{"path":"/"}"#,
            400,
            "invalid_argument",
        ),
        (
            "/filesystem.Filesystem/Stat",
            Some(basic("a:b\nc")),
            r#"{"path":"/"}"#,
            401,
            "unauthenticated",
        ),
    ];
    for (path, auth, body, want_st, want_code) in cases {
        let mut h = envd(vec![tok(token), json_ct.clone()]);
        if let Some(a) = &auth {
            h.push(("Authorization", a.clone()));
        }
        let (st, v) = send("POST", path, h, body.as_bytes().to_vec()).await;
        assert_eq!(
            (st, v["code"].as_str()),
            (want_st, Some(want_code)),
            "{path} {auth:?} {body}: {v}"
        );
    }
    // root always exists; an unknown user of /files is 401.
    let mut h = envd(vec![tok(token), json_ct.clone()]);
    h.push(("Authorization", basic("root")));
    let (st, v) = send(
        "POST",
        "/filesystem.Filesystem/Stat",
        h,
        br#"{"path":"/"}"#.to_vec(),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = send(
        "GET",
        "/files?path=/etc/hostname&username=ghost",
        envd(vec![tok(token)]),
        vec![],
    )
    .await;
    assert_eq!((st, v["code"].as_u64()), (401, Some(401)), "{v}");
    let (st, v) = send(
        "POST",
        "/filesystem.Filesystem/WatchDir",
        envd(vec![tok(token), stream_ct.clone()]),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("invalid_argument")),
        "a streaming call needs an envelope: {v}"
    );
    // After a kill the token opens nothing.
    s.call("DELETE", &format!("/sandboxes/{id}"), None, &[])
        .await;
    let (st, v) = send(
        "GET",
        "/files?path=/etc/hostname",
        envd(vec![tok(token)]),
        vec![],
    )
    .await;
    assert_eq!(st, 502, "{v}");
}

/// envd uploads stream to the sandbox: bounded by the file limit, not by
/// the API's body limit, and checked against the file limit per file.
#[tokio::test]
async fn envd_uploads_are_bounded_by_the_file_limit() {
    let mut cfg = Config::default();
    cfg.server.max_body_bytes = 1024 * 1024;
    cfg.limits.max_file_bytes = 3 * 1024 * 1024;
    let s = start_with(cfg).await;
    let sb = s.create(json!({})).await;
    let id = sb["sandboxID"].as_str().expect("id").to_string();
    let token = sb["envdAccessToken"].as_str().expect("token").to_string();
    let upload = |len: usize| {
        let (s, id, token) = (&s, id.clone(), token.clone());
        async move {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let r = s
                .http
                .post(format!("{}/files?path=/workspace/up.bin", s.root))
                .header("E2b-Sandbox-Id", id)
                .header("X-Access-Token", token)
                .header("Content-Type", "application/octet-stream")
                .body(body)
                .send()
                .await
                .expect("send");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    // Twice the API's body limit, under the file limit: stored whole.
    let (st, body) = upload(2 * 1024 * 1024).await;
    assert_eq!(st, 200, "{body}");
    let r = s
        .http
        .get(format!("{}/files?path=/workspace/up.bin", s.root))
        .header("E2b-Sandbox-Id", &id)
        .header("X-Access-Token", &token)
        .send()
        .await
        .expect("read");
    assert_eq!(r.bytes().await.expect("bytes").len(), 2 * 1024 * 1024);
    // Over the file limit: refused, up front when declared...
    let (st, body) = upload(4 * 1024 * 1024).await;
    assert_eq!(st, 413, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["code"], 413, "E2B's error shape: {v}");
    // ...and when streamed without a length, once the limit is passed;
    // the file then stays as it was (the write is abandoned, never
    // finished with what had arrived).
    let chunks = (0..64).map(|_| Ok::<Vec<u8>, std::io::Error>(vec![7u8; 64 * 1024]));
    let r = s
        .http
        .post(format!("{}/files?path=/workspace/up.bin", s.root))
        .header("E2b-Sandbox-Id", &id)
        .header("X-Access-Token", &token)
        .header("Content-Type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 413);
    let r = s
        .http
        .get(format!("{}/files?path=/workspace/up.bin", s.root))
        .header("E2b-Sandbox-Id", &id)
        .header("X-Access-Token", &token)
        .send()
        .await
        .expect("read");
    assert_eq!(r.bytes().await.expect("bytes").len(), 2 * 1024 * 1024);
}

/// envd transfers and processes take the same per-sandbox slots as
/// `/api/v1`: with one slot, an open download refuses an upload until
/// the download is gone.
#[tokio::test]
async fn envd_transfers_take_the_per_sandbox_slots() {
    let mut cfg = Config::default();
    cfg.limits.max_active_per_sandbox = 1;
    let s = start_with(cfg).await;
    let sb = s.create(json!({})).await;
    let id = sb["sandboxID"].as_str().expect("id").to_string();
    let token = sb["envdAccessToken"].as_str().expect("token").to_string();
    let upload = || {
        s.http
            .post(format!("{}/files?path=/workspace/f.bin", s.root))
            .header("E2b-Sandbox-Id", &id)
            .header("X-Access-Token", &token)
            .header("Content-Type", "application/octet-stream")
            .body(vec![7u8; 4 * 1024 * 1024])
            .send()
    };
    assert_eq!(upload().await.expect("upload").status(), 200);
    let open = s
        .http
        .get(format!("{}/files?path=/workspace/f.bin", s.root))
        .header("E2b-Sandbox-Id", &id)
        .header("X-Access-Token", &token)
        .send()
        .await
        .expect("download");
    assert_eq!(open.status(), 200);
    let r = upload().await.expect("upload");
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], 429, "{v}");
    drop(open);
    let mut freed = false;
    for _ in 0..50 {
        if upload().await.expect("upload").status() == 200 {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(freed, "the slot comes back once the download is gone");
}

/// A create's envVars (often secrets) are never shown: not by E2B's
/// routes, not by /api/v1 to anyone who may read the sandbox.
#[tokio::test]
async fn env_vars_are_never_shown() {
    let s = start().await;
    let sb = s
        .create(json!({"envVars": {"TOKEN": "s3cret"}, "metadata": {"a": "b"}}))
        .await;
    let id = sb["sandboxID"].as_str().expect("id");
    for path in [
        format!("/sandboxes/{id}"),
        "/v2/sandboxes".to_string(),
        format!("/api/v1/sandboxes/{id}"),
        "/api/v1/sandboxes".to_string(),
    ] {
        let r = s.call("GET", &path, None, &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert!(!r.body.to_string().contains("s3cret"), "{path}: {}", r.body);
    }
}

/// `Content-Encoding: gzip` uploads (the SDKs' `gzip=True`) are inflated
/// as they stream, bounded by what they inflate to: a bomb is a 413 and
/// leaves the file as it was; a corrupt or unknown encoding is a 400.
#[tokio::test]
async fn envd_gzip_uploads_inflate_within_the_file_limit() {
    use std::io::Write;
    let mut cfg = Config::default();
    cfg.limits.max_file_bytes = 3 * 1024 * 1024;
    let s = start_with(cfg).await;
    let sb = s.create(json!({})).await;
    let id = sb["sandboxID"].as_str().expect("id").to_string();
    let token = sb["envdAccessToken"].as_str().expect("token").to_string();
    let gz = |data: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).expect("gzip");
        e.finish().expect("gzip")
    };
    let send = |body: Vec<u8>, encoding: &'static str| {
        let (s, id, token) = (&s, id.clone(), token.clone());
        async move {
            let r = s
                .http
                .post(format!("{}/files?path=/workspace/g.txt", s.root))
                .header("E2b-Sandbox-Id", id)
                .header("X-Access-Token", token)
                .header("Content-Type", "application/octet-stream")
                .header("Content-Encoding", encoding)
                .body(body)
                .send()
                .await
                .expect("send");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    let read = || async {
        s.http
            .get(format!("{}/files?path=/workspace/g.txt", s.root))
            .header("E2b-Sandbox-Id", &id)
            .header("X-Access-Token", &token)
            .send()
            .await
            .expect("read")
            .bytes()
            .await
            .expect("bytes")
    };
    let text = "compressed hello\n".repeat(1000);
    let (st, body) = send(gz(text.as_bytes()), "gzip").await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(read().await, text.as_bytes());
    // 16 MiB of zeros in a few KiB: refused once it inflates past 3 MiB.
    let bomb = gz(&vec![0u8; 16 * 1024 * 1024]);
    assert!(bomb.len() < 64 * 1024);
    let (st, body) = send(bomb, "gzip").await;
    assert_eq!(st, 413, "{body}");
    assert_eq!(
        read().await,
        text.as_bytes(),
        "a refused upload changes nothing"
    );
    let mut corrupt = gz(b"some text that will be cut");
    corrupt.truncate(corrupt.len() - 6);
    let (st, body) = send(corrupt, "gzip").await;
    assert_eq!(st, 400, "{body}");
    let (st, body) = send(b"x".to_vec(), "br").await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(read().await, text.as_bytes());
}

/// envd calls meet the API's gates: a stream of bad tokens is throttled
/// per address, calls count against the rate limit, and changes are in
/// the request audit under the sandbox's owner.
#[tokio::test]
async fn envd_calls_are_throttled_rate_limited_and_audited() {
    let mut cfg = Config::default();
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.requests_per_minute = 6;
    cfg.rate_limit.burst = 6;
    cfg.rate_limit.failed_auth_per_minute = 3;
    let s = start_with(cfg).await;
    let sb = s.create(json!({})).await;
    let id = sb["sandboxID"].as_str().expect("id").to_string();
    let token = sb["envdAccessToken"].as_str().expect("token").to_string();
    let stat = |token: String| {
        let (s, id) = (&s, id.clone());
        async move {
            let r = s
                .http
                .post(format!("{}/filesystem.Filesystem/Stat", s.root))
                .header("E2b-Sandbox-Id", id)
                .header("X-Access-Token", token)
                .header("Content-Type", "application/json")
                .body(r#"{"path":"/"}"#)
                .send()
                .await
                .expect("send");
            let st = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (st, v["code"].as_str().unwrap_or_default().to_string())
        }
    };
    // Bad tokens: refused, then throttled.
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(stat("forged".into()).await);
    }
    assert_eq!(codes[0], (401, "unauthenticated".into()), "{codes:?}");
    assert!(
        codes.contains(&(429, "resource_exhausted".into())),
        "bad tokens are throttled: {codes:?}"
    );
    // Good calls: served until the rate limit, then refused.
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(stat(token.clone()).await.0);
    }
    assert_eq!(seen[0], 200, "{seen:?}");
    assert!(seen.contains(&429), "envd calls are rate limited: {seen:?}");
    // Audited: the RPCs (POSTs) under the owner, the refusals as rejected.
    s._server.manager.flush_audit().await;
    let rows = s
        ._server
        .manager
        .store()
        .list_admin_audit(&stacyvm_core::store::AdminAuditFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("audit");
    assert!(
        rows.iter().any(|r| r.actor.starts_with("e2b-envd")
            && r.path.contains("Filesystem/Stat")
            && r.status == 200),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r.actor == "e2b-envd:rejected" && r.status == 401),
        "{rows:?}"
    );
}

/// A `Connect` reader holds a per-sandbox slot while it reads, like the
/// process it watches and any transfer.
#[tokio::test]
async fn envd_connect_readers_take_a_slot() {
    use futures::StreamExt;
    let mut cfg = Config::default();
    cfg.limits.max_active_per_sandbox = 2;
    let s = start_with(cfg).await;
    let sb = s.create(json!({})).await;
    let id = sb["sandboxID"].as_str().expect("id").to_string();
    let token = sb["envdAccessToken"].as_str().expect("token").to_string();
    let envelope = |v: Value| {
        let p = serde_json::to_vec(&v).expect("json");
        let mut out = vec![0u8];
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(&p);
        out
    };
    let stream = |rpc: &'static str, body: Value| {
        s.http
            .post(format!("{}/process.Process/{rpc}", s.root))
            .header("E2b-Sandbox-Id", &id)
            .header("X-Access-Token", &token)
            .header("Content-Type", "application/connect+json")
            .body(envelope(body))
            .send()
    };
    let start = stream(
        "Start",
        json!({"process": {"cmd": "/bin/sh", "args": ["-c", "sleep 3"], "cwd": "/workspace"}}),
    )
    .await
    .expect("start");
    assert_eq!(start.status(), 200);
    let mut body = start.bytes_stream();
    let first = body.next().await.expect("first").expect("bytes");
    let msg: Value = serde_json::from_slice(&first[5..]).expect("start event");
    let pid = msg["event"]["start"]["pid"].as_u64().expect("pid");
    // The process holds one slot, this reader the other...
    let reader = stream("Connect", json!({"process": {"pid": pid}}))
        .await
        .expect("connect");
    assert_eq!(reader.status(), 200);
    // ...so a second reader is refused.
    let r = stream("Connect", json!({"process": {"pid": pid}}))
        .await
        .expect("connect");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], "resource_exhausted", "{v}");
    drop(reader);
    drop(body);
}

/// Host routing (E2B's mode B, `server.e2b_domain`) and the SDKs' signed
/// file URLs: `<port>-<id>.<domain>` reaches the sandbox's envd; a signed
/// URL opens one path for one operation until it expires.
#[tokio::test]
async fn host_routing_and_signed_file_urls() {
    use base64::Engine;
    use sha2::Digest;
    let mut cfg = Config::default();
    cfg.server.e2b_domain = "sbx.test".into();
    let s = start_with(cfg).await;
    let sb = s.create(json!({})).await;
    assert_eq!(sb["domain"], "sbx.test", "{sb}");
    let id = sb["sandboxID"].as_str().expect("id").to_string();
    let token = sb["envdAccessToken"].as_str().expect("token").to_string();
    let host = format!("49983-{id}.sbx.test");
    let call =
        |method: &'static str, url: String, host: String, token: Option<String>, body: Vec<u8>| {
            let s = &s;
            async move {
                let m = reqwest::Method::from_bytes(method.as_bytes()).expect("m");
                let mut rb = s
                    .http
                    .request(m, format!("{}{url}", s.root))
                    .header("Host", host)
                    .body(body);
                if let Some(t) = token {
                    rb = rb.header("X-Access-Token", t);
                }
                let r = rb.send().await.expect("send");
                (r.status().as_u16(), r.text().await.unwrap_or_default())
            }
        };
    let (st, _) = call("GET", "/health".into(), host.clone(), None, vec![]).await;
    assert_eq!(st, 204);
    let (st, body) = call(
        "POST",
        "/files?path=/workspace/h.txt".into(),
        host.clone(),
        Some(token.clone()),
        b"routed by host".to_vec(),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let sign = |path: &str, op: &str, exp: Option<i64>| {
        let raw = match exp {
            None => format!("{path}:{op}::{token}"),
            Some(e) => format!("{path}:{op}::{token}:{e}"),
        };
        // As the SDK sends it: percent-encoded in the query.
        format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(sha2::Sha256::digest(raw.as_bytes()))
        )
        .replace('+', "%2B")
        .replace('/', "%2F")
    };
    let later = chrono::Utc::now().timestamp() + 300;
    let earlier = chrono::Utc::now().timestamp() - 5;
    let read = |sig: String, exp: Option<i64>| {
        let mut url = format!("/files?path=/workspace/h.txt&signature={sig}");
        if let Some(e) = exp {
            url.push_str(&format!("&signature_expiration={e}"));
        }
        call("GET", url, host.clone(), None, vec![])
    };
    let (st, body) = read(sign("/workspace/h.txt", "read", None), None).await;
    assert_eq!((st, body.as_str()), (200, "routed by host"));
    let (st, _) = read(sign("/workspace/h.txt", "read", Some(later)), Some(later)).await;
    assert_eq!(st, 200, "an unexpired signature");
    let (st, _) = read(
        sign("/workspace/h.txt", "read", Some(earlier)),
        Some(earlier),
    )
    .await;
    assert_eq!(st, 401, "an expired signature");
    let (st, _) = read(
        sign("/workspace/h.txt", "read", Some(later)),
        Some(later + 1),
    )
    .await;
    assert_eq!(st, 401, "an extended expiration");
    let (st, _) = read(sign("/workspace/other", "read", None), None).await;
    assert_eq!(st, 401, "another path's signature");
    let (st, _) = read(sign("/workspace/h.txt", "write", None), None).await;
    assert_eq!(st, 401, "a write signature does not read");
    // A signed write writes its path only.
    let w = sign("/workspace/up.txt", "write", None);
    let boundary = "xyzzy";
    let multipart = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/workspace/up.txt\"\r\n\r\nok\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/etc/evil\"\r\n\r\nx\r\n--{boundary}--\r\n"
    );
    let r = s
        .http
        .post(format!(
            "{}/files?signature={w}&path=/workspace/up.txt",
            s.root
        ))
        .header("Host", &host)
        .header(
            "Content-Type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(multipart)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403, "a second part elsewhere is refused");
    let (st, _) = call(
        "POST",
        format!("/files?path=/workspace/up.txt&signature={w}"),
        host.clone(),
        None,
        b"signed".to_vec(),
    )
    .await;
    assert_eq!(st, 200);
    // RPCs need the token; other ports are not envd; other names are not
    // served by an open loopback server.
    let (st, _) = call(
        "POST",
        format!("/filesystem.Filesystem/Stat?signature={w}"),
        host.clone(),
        None,
        br#"{"path":"/"}"#.to_vec(),
    )
    .await;
    assert_eq!(st, 401);
    let (st, body) = call(
        "GET",
        "/health".into(),
        format!("3000-{id}.sbx.test"),
        None,
        vec![],
    )
    .await;
    assert_eq!(st, 502, "{body}");
    let (st, _) = call("GET", "/health".into(), "evil.test".into(), None, vec![]).await;
    assert_eq!(st, 421);
}
