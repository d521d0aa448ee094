//! Pause and resume against the real binary on the native provider: the
//! state on the API, the time to live stopped while paused (the expiry
//! moves on by the pause), the reaper leaving paused sandboxes alone until
//! `defaults.max_paused`, and the next exec resuming by itself.

mod common;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

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
    let api = common::Api::new(&server);

    // Paused, then past its time to live: the reaper leaves it alone.
    let sb = api.spawn(json!({ "ttl": "2s" })).await;
    let id = sb["id"].as_str().expect("id").to_string();
    let before = common::expiry(&sb);
    let (s, v) = api
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "echo kept > /workspace/state"}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api
        .post(&format!("/sandboxes/{id}/pause"), Value::Null)
        .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("paused")), "{v}");
    let paused_at = Instant::now();
    let (s, v) = api
        .post(&format!("/sandboxes/{id}/pause"), Value::Null)
        .await;
    assert_eq!(
        (s, v["state"].as_str()),
        (200, Some("paused")),
        "pausing twice: {v}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (s, v) = api.delete("/sandboxes").await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("paused")), "{v}");

    // The next exec resumes it; its expiry moved on by the pause.
    let (s, v) = api
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": "cat /workspace/state"}),
        )
        .await;
    assert_eq!((s, v["stdout"].as_str()), (200, Some("kept\n")), "{v}");
    let paused_for = paused_at.elapsed();
    let (s, v) = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("running")), "{v}");
    let moved = (common::expiry(&v) - before)
        .to_std()
        .expect("moved forward");
    assert!(
        moved + Duration::from_millis(300) >= paused_for.saturating_sub(Duration::from_millis(300))
            && moved <= paused_for + Duration::from_secs(1),
        "expiry moved {moved:?} for a pause of {paused_for:?}"
    );
    let (s, v) = api
        .post(&format!("/sandboxes/{id}/resume"), Value::Null)
        .await;
    assert_eq!(
        (s, v["state"].as_str()),
        (200, Some("running")),
        "resuming twice: {v}"
    );

    // Paused past `defaults.max_paused` and expired: reaped.
    let sb = api.spawn(json!({ "ttl": "1s" })).await;
    let old = sb["id"].as_str().expect("id").to_string();
    let (s, v) = api
        .post(&format!("/sandboxes/{old}/pause"), Value::Null)
        .await;
    assert_eq!(s, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (s, v) = api.delete("/sandboxes").await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = api.get(&format!("/sandboxes/{old}")).await;
    assert_eq!(s, 404, "a sandbox paused past max_paused stays");

    // Bad input: unknown sandboxes, and a destroyed one.
    let (s, _) = api.post("/sandboxes/sb-00000000/pause", Value::Null).await;
    assert_eq!(s, 404);
    let (s, _) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(s, 200);
    let (s, _) = api
        .post(&format!("/sandboxes/{id}/resume"), Value::Null)
        .await;
    assert_eq!(s, 404);
}

/// `auto_resume: false`: the sandbox object says so, a paused sandbox
/// refuses execs and file operations with a 409 naming the resume route
/// (and stays paused), and an explicit resume brings it back as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_resume_off_waits_for_an_explicit_resume() {
    let dir = tempfile::tempdir().expect("dir");
    let server = common::Server::start(dir.path(), &[("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0")]);
    let api = common::Api::new(&server);
    let sb = api.spawn(json!({"auto_resume": false})).await;
    assert_eq!(sb["auto_resume"], json!(false), "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();
    api.exec(&id, "echo kept > /workspace/state").await;
    let (s, v) = api
        .post(&format!("/sandboxes/{id}/pause"), Value::Null)
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api
        .post(&format!("/sandboxes/{id}/exec"), json!({"command": "true"}))
        .await;
    assert_eq!(s, 409, "{v}");
    assert!(v.to_string().contains("/resume"), "{v}");
    let (s, v) = api
        .get(&format!("/sandboxes/{id}/files?path=/workspace/state"))
        .await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(api.state(&id).await, "paused");
    let (s, v) = api
        .post(&format!("/sandboxes/{id}/resume"), Value::Null)
        .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("running")), "{v}");
    let r = api.exec(&id, "cat /workspace/state").await;
    assert_eq!(r["stdout"], "kept\n", "{r}");
    // Without it, the object shows nothing and traffic resumes.
    let plain = api.spawn(json!({})).await;
    assert!(plain.get("auto_resume").is_none(), "{plain}");
    for id in [&id, plain["id"].as_str().expect("id")] {
        let (s, v) = api.delete(&format!("/sandboxes/{id}")).await;
        assert_eq!(s, 200, "{v}");
    }
}
