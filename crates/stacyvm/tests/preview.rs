//! The preview proxy against the real binary on the native provider: a
//! real HTTP server and a WebSocket echo server inside a sandbox, reached
//! by Host and by path, with and without tokens; expired, revoked and
//! forged tokens refused; hostile Host headers and huge headers; a tenant
//! policy that forbids public ports; and nothing left when the sandbox
//! goes.

mod common;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const APP: &str = include_str!("fixtures/preview_app.py");
const APP_PORT: u16 = 8000;

/// Spawns a sandbox running the test app on [`APP_PORT`].
async fn sandbox_with_app(api: &common::Api) -> String {
    app_in(api, json!({})).await
}

/// Spawns a sandbox with `spawn` as its request, running the test app.
async fn app_in(api: &common::Api, spawn: serde_json::Value) -> String {
    let (s, sb) = api.post("/sandboxes", spawn).await;
    assert_eq!(s, 201, "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();
    let (s, v) = api
        .post(
            &format!("/sandboxes/{id}/files"),
            json!({ "path": "/workspace/app.py", "content": APP }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    api.exec(
        &id,
        &format!(
            "setsid python3 /workspace/app.py {APP_PORT} >/workspace/app.log 2>&1 </dev/null &"
        ),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = api
            .exec(
                &id,
                &format!("python3 -c \"import socket; socket.create_connection(('127.0.0.1', {APP_PORT}))\""),
            )
            .await;
        if v["exit_code"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the app did not listen: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    id
}

async fn text(r: reqwest::Response) -> (u16, String) {
    let s = r.status().as_u16();
    (s, r.text().await.expect("body"))
}

/// GET `url` with a preview token in its header.
async fn get_with_token(client: &reqwest::Client, url: &str, token: &str) -> (u16, String) {
    text(
        client
            .get(url)
            .header("X-StacyVM-Preview-Token", token)
            .send()
            .await
            .expect("get"),
    )
    .await
}

fn serve(dir: &std::path::Path) -> common::Server {
    common::Server::start(
        dir,
        &[
            ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
            ("STACYVM_SERVER_PREVIEW_DOMAIN", "preview.test"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_proxy_serves_http_sse_and_websockets_by_host_and_path() {
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(dir.path());
    let api = common::Api::new(&server);
    let id = sandbox_with_app(&api).await;
    let port = api.addr().port();
    let host = format!("{APP_PORT}-{id}.preview.test");
    let client = api.preview_client(&[&host]);
    let url = format!("http://{host}:{port}");

    // Nothing is reachable before it is exposed, and an unknown sandbox
    // looks the same.
    let (s, body) = text(client.get(format!("{url}/")).send().await.expect("get")).await;
    assert_eq!(s, 404, "{body}");
    let ghost = format!("{APP_PORT}-sb-00000000.preview.test");
    let ghost_client = api.preview_client(&[&ghost]);
    let (s, ghost_body) = text(
        ghost_client
            .get(format!("http://{ghost}:{port}/"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(s, 404);
    assert!(!ghost_body.contains("exist"), "{ghost_body}");

    let (s, exposed) = api
        .post(
            &format!("/sandboxes/{id}/ports/{APP_PORT}"),
            json!({"mode": "public"}),
        )
        .await;
    assert_eq!(s, 200, "{exposed}");
    assert_eq!(exposed["mode"], "public");
    assert_eq!(exposed["url"], format!("http://{host}:{port}/"));
    assert_eq!(exposed["path"], format!("/preview/{id}/{APP_PORT}/"));

    // Host form: the app sees its own path and the Host the client used.
    let (s, body) = text(
        client
            .get(format!("{url}/hello?x=1"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("path=/hello?x=1"), "{body}");
    assert!(body.contains(&format!("host={host}:{port}")), "{body}");
    // Odd casing and a trailing dot name the same preview.
    let upper = format!("{APP_PORT}-{}.PREVIEW.TEST", id.to_uppercase());
    let (s, _) = text(
        api.http
            .get(format!("{}/x", api.root))
            .header("Host", format!("{upper}.:{port}"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(s, 200);

    // Path form: the prefix is stripped, announced, and the page is
    // sandboxed off the API's origin.
    let r = api
        .http
        .get(format!("{}/preview/{id}/{APP_PORT}/a/b?y=2", api.root))
        .send()
        .await
        .expect("get");
    let csp = r
        .headers()
        .get("content-security-policy")
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    let (s, body) = text(r).await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("path=/a/b?y=2"), "{body}");
    assert!(
        body.contains(&format!("prefix=/preview/{id}/{APP_PORT}")),
        "{body}"
    );
    assert!(csp.starts_with("sandbox"), "{csp}");
    let r = api
        .http
        .get(format!("{}/preview/{id}/{APP_PORT}", api.root))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 302);
    assert_eq!(
        r.headers()["location"],
        format!("/preview/{id}/{APP_PORT}/").as_str()
    );

    // A 4 MiB body goes up and comes back whole.
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let r = client
        .post(format!("{url}/echo"))
        .body(big.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.bytes().await.expect("body").as_ref(), big.as_slice());

    // Server-sent events arrive as they are sent, not all at the end.
    let r = client.get(format!("{url}/sse")).send().await.expect("sse");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut stream = r.bytes_stream();
    let (mut seen, mut first, mut last) = (String::new(), None, None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        let now = Instant::now();
        first.get_or_insert(now);
        last = Some(now);
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert_eq!(seen, "data: event 0\n\ndata: event 1\n\ndata: event 2\n\n");
    let spread = last.expect("events") - first.expect("events");
    assert!(
        spread >= Duration::from_millis(400),
        "events 0 and 2 were sent 0.6 s apart but arrived {spread:?} apart (buffered)"
    );

    // WebSocket through the Host form: text and a 200 KiB binary message.
    let tcp = tokio::net::TcpStream::connect(api.addr())
        .await
        .expect("tcp");
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{host}:{port}/ws"), tcp)
        .await
        .expect("websocket handshake through the proxy");
    assert_eq!(resp.status().as_u16(), 101);
    ws.send(Message::text("hello sandbox")).await.expect("send");
    let got = ws.next().await.expect("reply").expect("frame");
    assert_eq!(got.into_text().expect("text").as_str(), "hello sandbox");
    let blob: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 256) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.expect("send");
    let got = ws.next().await.expect("reply").expect("frame");
    assert_eq!(got.into_data().as_ref(), blob.as_slice());
    ws.close(None).await.expect("close");

    // A port nothing listens on is a 502 that says so.
    let (s, _) = api
        .post(
            &format!("/sandboxes/{id}/ports/8001"),
            json!({"mode": "public"}),
        )
        .await;
    assert_eq!(s, 200);
    let empty = format!("8001-{id}.preview.test");
    let (s, body) = text(
        api.preview_client(&[&empty])
            .get(format!("http://{empty}:{port}/"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(s, 502, "{body}");
    assert!(
        body.contains("nothing accepts connections on port 8001"),
        "{body}"
    );

    // A huge header is refused by the server, which keeps serving.
    let r = client
        .get(format!("{url}/"))
        .header("x-huge", "a".repeat(512 * 1024))
        .send()
        .await;
    if let Ok(r) = r {
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    let (s, _) = text(client.get(format!("{url}/")).send().await.expect("get")).await;
    assert_eq!(s, 200);

    // The exposure changes are audited.
    let (s, audit) = api
        .get(&format!(
            "/admin/op-audit?action=preview.expose&sandbox_id={id}"
        ))
        .await;
    assert_eq!(s, 200, "{audit}");
    let rows = audit
        .as_array()
        .or_else(|| audit["records"].as_array())
        .or_else(|| audit["items"].as_array())
        .cloned()
        .unwrap_or_default();
    assert!(rows.len() >= 2, "{audit}");

    // Destroying the sandbox takes its previews with it.
    let (s, _) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(s, 200);
    let (s, _) = text(client.get(format!("{url}/")).send().await.expect("get")).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_ports_need_a_live_token_and_never_leak_it_to_the_sandbox() {
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(dir.path());
    let api = common::Api::new(&server);
    let id = sandbox_with_app(&api).await;
    let port = api.addr().port();
    let host = format!("{APP_PORT}-{id}.preview.test");
    let client = api.preview_client(&[&host]);
    let url = format!("http://{host}:{port}");

    // The default mode is token.
    let (s, exposed) = api
        .post(&format!("/sandboxes/{id}/ports/{APP_PORT}"), json!({}))
        .await;
    assert_eq!(s, 200, "{exposed}");
    assert_eq!(exposed["mode"], "token");
    let r = client.get(format!("{url}/")).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().contains_key("www-authenticate"));

    // Tokens need an exposed port and a sane lifetime.
    let (s, v) = api
        .post(&format!("/sandboxes/{id}/ports/9999/tokens"), json!({}))
        .await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = api
        .post(
            &format!("/sandboxes/{id}/ports/{APP_PORT}/tokens"),
            json!({"ttl": "10000h"}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = api
        .post(
            &format!("/sandboxes/{id}/ports/{APP_PORT}/tokens"),
            json!({"ttl": "banana"}),
        )
        .await;
    assert_eq!(s, 400, "{v}");

    let (s, tok) = api
        .post(
            &format!("/sandboxes/{id}/ports/{APP_PORT}/tokens"),
            json!({"ttl": "1h"}),
        )
        .await;
    assert_eq!(s, 201, "{tok}");
    let secret = tok["token"].as_str().expect("secret").to_string();
    let token_id = tok["id"].as_str().expect("id").to_string();
    assert!(secret.starts_with("svp_"), "{tok}");
    // The secret is shown once: listings never carry it.
    let (s, list) = api
        .get(&format!("/sandboxes/{id}/ports/{APP_PORT}/tokens"))
        .await;
    assert_eq!(s, 200);
    assert!(!list.to_string().contains(&secret), "{list}");

    // Header: admitted, and the app never sees the token.
    let (s, body) = text(
        client
            .get(format!("{url}/"))
            .header("X-StacyVM-Preview-Token", &secret)
            .header("Cookie", "app=1")
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("token=None"), "{body}");
    assert!(body.contains("cookie=app=1"), "{body}");
    assert!(!body.contains(&secret), "{body}");

    // Query: traded for an HttpOnly cookie, and dropped from the URL.
    let r = client
        .get(format!("{url}/page?stacyvm_token={secret}&keep=1"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 302);
    assert_eq!(r.headers()["location"], "/page?keep=1");
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("Path=/"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("pair").to_string();
    let (s, body) = text(
        client
            .get(format!("{url}/page?keep=1"))
            .header("Cookie", format!("app=2; {pair}"))
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("cookie=app=2|"), "{body}");

    // Forged, other-port and other-sandbox tokens are refused.
    for bad in [
        "svp_0000000000000000000000000000000000000000000000".to_string(),
        "not-a-token".to_string(),
        format!("{secret}x"),
    ] {
        let (s, _) = get_with_token(&client, &format!("{url}/"), &bad).await;
        assert_eq!(s, 401);
    }
    let (s, _) = api
        .post(
            &format!("/sandboxes/{id}/ports/8001"),
            json!({"mode": "token"}),
        )
        .await;
    assert_eq!(s, 200);
    let other = format!("8001-{id}.preview.test");
    let (s, _) = get_with_token(
        &api.preview_client(&[&other]),
        &format!("http://{other}:{port}/"),
        &secret,
    )
    .await;
    assert_eq!(s, 401, "a token for port 8000 opened port 8001");

    // Expired tokens are refused (the test controls the clock: 1 s).
    let (s, short) = api
        .post(
            &format!("/sandboxes/{id}/ports/{APP_PORT}/tokens"),
            json!({"ttl": "1s"}),
        )
        .await;
    assert_eq!(s, 201);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let short = short["token"].as_str().expect("t");
    let (s, body) = get_with_token(&client, &format!("{url}/"), short).await;
    assert_eq!(s, 401);
    assert!(body.contains("expired"), "{body}");

    // Revoked tokens are refused at once.
    let (s, v) = api
        .delete(&format!(
            "/sandboxes/{id}/ports/{APP_PORT}/tokens/{token_id}"
        ))
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, body) = get_with_token(&client, &format!("{url}/"), &secret).await;
    assert_eq!(s, 401);
    assert!(body.contains("revoked"), "{body}");

    // Unexposing drops the port.
    let (s, _) = api
        .delete(&format!("/sandboxes/{id}/ports/{APP_PORT}"))
        .await;
    assert_eq!(s, 200);
    let r = client.get(format!("{url}/")).send().await.expect("get");
    assert_eq!(r.status().as_u16(), 404);

    // A server-wide policy can forbid public ports.
    let (s, pol) = api
        .post(
            "/admin/policies",
            json!({"resource_type": "preview", "effect": "deny", "pattern": "public"}),
        )
        .await;
    assert!(s == 200 || s == 201, "{pol}");
    let (s, v) = api
        .post(
            &format!("/sandboxes/{id}/ports/{APP_PORT}"),
            json!({"mode": "public"}),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = api
        .post(
            &format!("/sandboxes/{id}/ports/{APP_PORT}"),
            json!({"mode": "token"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api
        .post(
            &format!("/sandboxes/{id}/ports/{APP_PORT}"),
            json!({"mode": "open"}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = api
        .post(&format!("/sandboxes/{id}/ports/0"), json!({}))
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_ids_and_tokens_spends_the_failed_auth_budget() {
    let dir = tempfile::tempdir().expect("dir");
    let server = common::Server::start(
        dir.path(),
        &[
            ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
            ("STACYVM_SERVER_PREVIEW_DOMAIN", "preview.test"),
            ("STACYVM_RATE_LIMIT_FAILED_AUTH_PER_MINUTE", "5"),
        ],
    );
    let api = common::Api::new(&server);
    let port = api.addr().port();
    let mut statuses = Vec::new();
    for i in 0..8 {
        let host = format!("{APP_PORT}-sb-0000000{i}.preview.test");
        let client = api.preview_client(&[&host]);
        let r = client
            .get(format!("http://{host}:{port}/"))
            .send()
            .await
            .expect("get");
        if r.status().as_u16() == 429 {
            let wait: u64 = r.headers()["retry-after"]
                .to_str()
                .expect("retry-after")
                .parse()
                .expect("seconds");
            assert!((1..=60).contains(&wait), "{wait}");
        }
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, vec![404, 404, 404, 404, 404, 429, 429, 429]);
    // The path form shares the budget.
    let r = reqwest::get(format!("{}/preview/sb-00000009/{APP_PORT}/", api.root))
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 429);
}

/// One HTTP/1.1 keep-alive connection, by hand: the tunnel is per
/// connection, so the test must see which connection carried what.
struct RawConn {
    tcp: tokio::net::TcpStream,
    host: String,
}

impl RawConn {
    async fn open(api: &common::Api, host: &str) -> RawConn {
        let tcp = tokio::net::TcpStream::connect(api.addr())
            .await
            .expect("connect");
        RawConn {
            tcp,
            host: format!("{host}:{}", api.addr().port()),
        }
    }

    /// GET `path` on this connection: the status and body, or why the
    /// connection could not carry it.
    async fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.tcp
            .write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let read = async {
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let status: u16 = head
                        .split(' ')
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| format!("bad status line: {head}"))?;
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .ok_or_else(|| format!("no content-length: {head}"))?;
                    while buf.len() < end + 4 + len {
                        let n = self.tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
                        if n == 0 {
                            return Err("closed in the body".to_string());
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                    return Ok((status, body));
                }
                let n = self.tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("closed".to_string());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .map_err(|_| "no answer in 10 s".to_string())?
    }
}

/// Connections opened as tunnels so far (the `preview_tunnel` operation).
async fn tunnels(api: &common::Api) -> u64 {
    let (s, v) = api.get("/metrics").await;
    assert_eq!(s, 200, "{v}");
    let ops = v["operations"].as_array().expect("operations");
    ops.iter()
        .find(|o| o["operation"] == "preview_tunnel")
        .map_or(0, |o| o["success_total"].as_u64().expect("success_total"))
}

/// Waits until `conn` can no longer carry a request (the tunnel closed).
async fn closes(conn: &mut RawConn, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match conn.get("/still-open").await {
            Err(_) => return,
            Ok((s, body)) => {
                assert!(
                    Instant::now() < deadline,
                    "the tunnel still carried requests 5 s after {what}: {s} {body}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_ports_ride_a_tunnel_that_closes_when_access_ends() {
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(dir.path());
    let api = common::Api::new(&server);
    let id = sandbox_with_app(&api).await;
    let host = format!("{APP_PORT}-{id}.preview.test");
    let expose = |mode: &'static str| {
        let api = &api;
        let id = id.clone();
        async move {
            let (s, v) = api
                .post(
                    &format!("/sandboxes/{id}/ports/{APP_PORT}"),
                    json!({ "mode": mode }),
                )
                .await;
            assert_eq!(s, 200, "{v}");
        }
    };
    expose("public").await;
    let before = tunnels(&api).await;

    // Two requests on one connection: the first opens a tunnel (the
    // forwarding headers are on it), the second rides it.
    let mut conn = RawConn::open(&api, &host).await;
    let (s, body) = conn.get("/one?x=1").await.expect("first request");
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("path=/one?x=1"), "{body}");
    assert!(body.contains("xff=127.0.0.1"), "{body}");
    assert!(body.contains("proto=http"), "{body}");
    assert!(body.contains(&format!("host={}", conn.host)), "{body}");
    let (s, body) = conn.get("/two").await.expect("second request");
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("path=/two"), "{body}");
    assert_eq!(tunnels(&api).await, before + 1, "one tunnel, two requests");

    // Token mode: the open tunnel closes, a new connection needs a token
    // (and the per-request proxy keeps it from the app).
    expose("token").await;
    closes(&mut conn, "the port went to token mode").await;
    let mut conn = RawConn::open(&api, &host).await;
    let (s, _) = conn.get("/").await.expect("refusal");
    assert_eq!(s, 401);

    // Pausing closes tunnels; the next request wakes the sandbox.
    expose("public").await;
    let mut conn = RawConn::open(&api, &host).await;
    assert_eq!(conn.get("/").await.expect("get").0, 200);
    let (s, v) = api.post(&format!("/sandboxes/{id}/pause"), json!({})).await;
    assert_eq!(s, 200, "{v}");
    closes(&mut conn, "the sandbox was paused").await;
    assert_eq!(api.state(&id).await, "paused");
    let mut conn = RawConn::open(&api, &host).await;
    assert_eq!(conn.get("/").await.expect("get").0, 200);
    assert_eq!(api.state(&id).await, "running", "preview traffic resumes");

    // Unexposing closes it too, and the port is gone for new connections.
    let (s, v) = api
        .delete(&format!("/sandboxes/{id}/ports/{APP_PORT}"))
        .await;
    assert_eq!(s, 200, "{v}");
    closes(&mut conn, "the port was unexposed").await;
    let mut conn = RawConn::open(&api, &host).await;
    assert_eq!(conn.get("/").await.expect("get").0, 404);

    // And so does destroying the sandbox.
    expose("public").await;
    let mut conn = RawConn::open(&api, &host).await;
    assert_eq!(conn.get("/").await.expect("get").0, 200);
    let (s, _) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(s, 200);
    closes(&mut conn, "the sandbox was destroyed").await;
    assert!(tunnels(&api).await >= before + 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_traffic_and_open_websockets_keep_a_sandbox_from_idling() {
    let dir = tempfile::tempdir().expect("dir");
    let server = serve(dir.path());
    let api = common::Api::new(&server);
    let id = app_in(&api, json!({"ttl": "10m", "idle_timeout": "3s"})).await;
    let (s, v) = api
        .post(
            &format!("/sandboxes/{id}/ports/{APP_PORT}"),
            json!({"mode": "public"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let host = format!("{APP_PORT}-{id}.preview.test");
    let prune = || async {
        let (s, v) = api.delete("/sandboxes").await;
        assert_eq!(s, 200, "{v}");
    };

    // Requests on one tunnel, a second apart, for twice the timeout.
    let mut conn = RawConn::open(&api, &host).await;
    for _ in 0..6 {
        assert_eq!(conn.get("/").await.expect("get").0, 200);
        tokio::time::sleep(Duration::from_secs(1)).await;
        prune().await;
        assert_eq!(
            api.state(&id).await,
            "running",
            "tunnel traffic is activity"
        );
    }
    drop(conn);

    // A silent WebSocket holds it busy while open.
    let tcp = tokio::net::TcpStream::connect(api.addr())
        .await
        .expect("tcp");
    let port = api.addr().port();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{host}:{port}/ws"), tcp)
        .await
        .expect("websocket through the tunnel");
    tokio::time::sleep(Duration::from_secs(5)).await;
    prune().await;
    assert_eq!(api.state(&id).await, "running", "an open WebSocket is busy");
    ws.send(Message::text("still here")).await.expect("send");
    let got = ws.next().await.expect("reply").expect("frame");
    assert_eq!(got.into_text().expect("text").as_str(), "still here");
    ws.close(None).await.expect("close");
    drop(ws);
    tokio::time::sleep(Duration::from_secs(4)).await;
    prune().await;
    assert_eq!(api.state(&id).await, "404", "idle once everything closed");
}
