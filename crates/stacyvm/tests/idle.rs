//! Idle timeouts and `on_timeout` against the real binary on the native
//! provider: execs, a running command and preview traffic keep a sandbox
//! alive; an idle one is destroyed, or paused and woken by the next call;
//! a sandbox paused by its time to live comes back with a fresh one.
//!
//! Time is the test's: timeouts of a second or two and explicit reaper
//! passes (`DELETE /sandboxes`); the background reaper runs every 30 s.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

fn start(dir: &std::path::Path) -> common::Server {
    common::Server::start(
        dir,
        &[
            ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
            ("STACYVM_DEFAULTS_TTL", "20m"),
        ],
    )
}

async fn prune(api: &common::Api) -> u64 {
    let (s, v) = api.delete("/sandboxes").await;
    assert_eq!(s, 200, "{v}");
    v["pruned"].as_u64().expect("pruned")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_keeps_a_sandbox_and_idleness_ends_it() {
    let dir = tempfile::tempdir().expect("dir");
    let server = start(dir.path());
    let api = common::Api::new(&server);

    let sb = api.spawn(json!({"ttl": "10m", "idle_timeout": "2s"})).await;
    assert_eq!(
        (sb["idle_timeout"].as_str(), sb["on_timeout"].as_str()),
        (Some("2s"), Some("kill")),
        "{sb}"
    );
    let id = sb["id"].as_str().expect("id").to_string();

    // An exec every second for four seconds: never idle for two.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        api.exec(&id, "true").await;
        prune(&api).await;
        assert_eq!(api.state(&id).await, "running");
    }

    // A command that runs longer than the idle timeout holds it busy.
    let long = {
        let http = api.http.clone();
        let url = format!("{}/sandboxes/{id}/exec", api.base);
        tokio::spawn(async move {
            http.post(url)
                .json(&json!({"command": "sleep 3.5; echo done"}))
                .send()
                .await
                .expect("exec")
                .json::<Value>()
                .await
                .expect("json")
        })
    };
    tokio::time::sleep(Duration::from_millis(3000)).await;
    prune(&api).await;
    assert_eq!(
        api.state(&id).await,
        "running",
        "a running command is activity"
    );
    let out = long.await.expect("join");
    assert_eq!(out["stdout"], "done\n", "{out}");

    // A file read counts too.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (s, _) = api
        .get(&format!("/sandboxes/{id}/files/list?path=/workspace"))
        .await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    prune(&api).await;
    assert_eq!(api.state(&id).await, "running");

    // Then nothing for longer than the timeout: destroyed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(prune(&api).await, 1);
    assert_eq!(api.state(&id).await, "404");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_traffic_is_activity() {
    let dir = tempfile::tempdir().expect("dir");
    let server = start(dir.path());
    let api = common::Api::new(&server);
    let root = server.url.trim_end_matches("/api/v1").to_string();

    let sb = api.spawn(json!({"ttl": "10m", "idle_timeout": "2s"})).await;
    let id = sb["id"].as_str().expect("id").to_string();
    api.exec(
        &id,
        "mkdir -p /workspace/site && echo hello > /workspace/site/index.html && \
         cd /workspace/site && setsid python3 -m http.server 8080 --bind 127.0.0.1 \
         >/dev/null 2>&1 </dev/null & sleep 0.5",
    )
    .await;
    let (s, v) = api
        .post(
            &format!("/sandboxes/{id}/ports/8080"),
            json!({"mode": "public"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let page = format!("{root}/preview/{id}/8080/");
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let r = api.http.get(&page).send().await.expect("preview");
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.text().await.expect("body"), "hello\n");
        prune(&api).await;
        assert_eq!(api.state(&id).await, "running", "preview requests keep it");
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(prune(&api).await, 1);
    assert_eq!(api.state(&id).await, "404");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_timeout_pause_pauses_and_the_next_call_resumes() {
    let dir = tempfile::tempdir().expect("dir");
    let server = start(dir.path());
    let api = common::Api::new(&server);

    // Idle: paused, its files and processes kept; an exec wakes it.
    let sb = api
        .spawn(json!({"ttl": "10m", "idle_timeout": "1s", "on_timeout": "pause"}))
        .await;
    assert_eq!(sb["on_timeout"], "pause", "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();
    api.exec(
        &id,
        "echo kept > /workspace/state; setsid sleep 1000 >/dev/null 2>&1 </dev/null &",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(prune(&api).await, 1);
    assert_eq!(api.state(&id).await, "paused");
    let before = common::expiry(&api.get(&format!("/sandboxes/{id}")).await.1);
    let out = api
        .exec(
            &id,
            "cat /workspace/state; pgrep -x sleep >/dev/null && echo alive",
        )
        .await;
    assert_eq!(out["stdout"], "kept\nalive\n", "{out}");
    let (_, v) = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(v["state"], "running");
    assert!(
        common::expiry(&v) >= before,
        "the time to live stood still: {v}"
    );
    // Its idle clock starts again from the resume.
    prune(&api).await;
    assert_eq!(api.state(&id).await, "running");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(prune(&api).await, 1);
    assert_eq!(api.state(&id).await, "paused");
    let (s, v) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(s, 200, "a paused sandbox can be destroyed: {v}");

    // The time to live: paused at its end, then resumed with a fresh one.
    let sb = api.spawn(json!({"ttl": "2s", "on_timeout": "pause"})).await;
    let id = sb["id"].as_str().expect("id").to_string();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(prune(&api).await, 1);
    assert_eq!(api.state(&id).await, "paused", "paused, not destroyed");
    prune(&api).await;
    assert_eq!(api.state(&id).await, "paused", "left alone while paused");
    let (s, v) = api
        .post(&format!("/sandboxes/{id}/resume"), json!({"ttl": "5m"}))
        .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("running")), "{v}");
    let left = common::expiry(&v) - chrono::Utc::now();
    assert!(
        left > chrono::Duration::seconds(290) && left <= chrono::Duration::seconds(300),
        "a fresh five minutes: {left:?}"
    );
    let (s, v) = api
        .post(
            &format!("/sandboxes/{id}/resume"),
            json!({"ttl": "forever"}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = api
        .post(&format!("/sandboxes/{id}/resume"), json!({"ttl": "100h"}))
        .await;
    assert_eq!(s, 429, "beyond the max TTL: {v}");

    // Woken by an exec instead: `defaults.ttl` (20m here).
    let sb = api.spawn(json!({"ttl": "2s", "on_timeout": "pause"})).await;
    let id2 = sb["id"].as_str().expect("id").to_string();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(prune(&api).await, 1);
    assert_eq!(api.state(&id2).await, "paused");
    api.exec(&id2, "true").await;
    let (_, v) = api.get(&format!("/sandboxes/{id2}")).await;
    let left = common::expiry(&v) - chrono::Utc::now();
    assert!(
        left > chrono::Duration::minutes(19) && left <= chrono::Duration::minutes(20),
        "defaults.ttl after a wake: {left:?}"
    );
    for id in [id, id2] {
        let (s, _) = api.delete(&format!("/sandboxes/{id}")).await;
        assert_eq!(s, 200);
    }
}
