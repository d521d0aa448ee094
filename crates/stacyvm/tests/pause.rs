//! Pause and resume against the real binary on the native provider: the
//! state on the API, the time to live stopped while paused (the expiry
//! moves on by the pause), the reaper leaving paused sandboxes alone until
//! `defaults.max_paused`, and the next exec resuming by itself.

mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
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

    async fn spawn(&self, ttl: &str) -> Value {
        let (s, v) = self
            .call(
                reqwest::Method::POST,
                "/sandboxes",
                Some(json!({ "ttl": ttl })),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        v
    }

    async fn post(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, None).await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }
}

fn expiry(v: &Value) -> chrono::DateTime<chrono::Utc> {
    v["expires_at"]
        .as_str()
        .expect("expires_at")
        .parse()
        .expect("time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_sandboxes_keep_their_time_and_wake_on_use() {
    let dir = tempfile::tempdir().expect("dir");
    let server = common::Server::start(
        dir.path(),
        &[
            ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
            ("STACYVM_DEFAULTS_MAX_PAUSED", "3s"),
        ],
    );
    let api = Api {
        http: reqwest::Client::new(),
        base: server.url.clone(),
    };

    // Paused, then past its time to live: the reaper leaves it alone.
    let sb = api.spawn("2s").await;
    let id = sb["id"].as_str().expect("id").to_string();
    let before = expiry(&sb);
    let (s, v) = api
        .call(
            reqwest::Method::POST,
            &format!("/sandboxes/{id}/exec"),
            Some(json!({"command": "echo kept > /workspace/state"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api.post(&format!("/sandboxes/{id}/pause")).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("paused")), "{v}");
    let paused_at = Instant::now();
    let (s, v) = api.post(&format!("/sandboxes/{id}/pause")).await;
    assert_eq!(
        (s, v["state"].as_str()),
        (200, Some("paused")),
        "pausing twice: {v}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (s, v) = api.call(reqwest::Method::DELETE, "/sandboxes", None).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("paused")), "{v}");

    // The next exec resumes it; its expiry moved on by the pause.
    let (s, v) = api
        .call(
            reqwest::Method::POST,
            &format!("/sandboxes/{id}/exec"),
            Some(json!({"command": "cat /workspace/state"})),
        )
        .await;
    assert_eq!((s, v["stdout"].as_str()), (200, Some("kept\n")), "{v}");
    let paused_for = paused_at.elapsed();
    let (s, v) = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("running")), "{v}");
    let moved = (expiry(&v) - before).to_std().expect("moved forward");
    assert!(
        moved + Duration::from_millis(300) >= paused_for.saturating_sub(Duration::from_millis(300))
            && moved <= paused_for + Duration::from_secs(1),
        "expiry moved {moved:?} for a pause of {paused_for:?}"
    );
    let (s, v) = api.post(&format!("/sandboxes/{id}/resume")).await;
    assert_eq!(
        (s, v["state"].as_str()),
        (200, Some("running")),
        "resuming twice: {v}"
    );

    // Paused past `defaults.max_paused` and expired: reaped.
    let sb = api.spawn("1s").await;
    let old = sb["id"].as_str().expect("id").to_string();
    let (s, v) = api.post(&format!("/sandboxes/{old}/pause")).await;
    assert_eq!(s, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (s, v) = api.call(reqwest::Method::DELETE, "/sandboxes", None).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = api.get(&format!("/sandboxes/{old}")).await;
    assert_eq!(s, 404, "a sandbox paused past max_paused stays");

    // Bad input: unknown sandboxes, and a destroyed one.
    let (s, _) = api.post("/sandboxes/sb-00000000/pause").await;
    assert_eq!(s, 404);
    let (s, _) = api
        .call(reqwest::Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = api.post(&format!("/sandboxes/{id}/resume")).await;
    assert_eq!(s, 404);
}
