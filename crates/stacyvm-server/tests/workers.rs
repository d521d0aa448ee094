//! Worker registration and credentials on the control plane: the workers
//! routes, signed and static worker tokens, central token issuance, lease
//! renewal on a worker's behalf, and every way a worker credential can be
//! wrong.

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use stacyvm_core::config::{Config, Secret};
use stacyvm_core::store::AdminAuditFilter;

const ADMIN: &str = "admin-key-for-the-worker-tests-000";
const SIGNING: &str = "signing-key-for-the-worker-tests-0123456789";

async fn server(f: impl FnOnce(&mut Config)) -> common::TestServer {
    let mut cfg = Config::default();
    cfg.auth.admin_api_key = Secret::new(ADMIN);
    cfg.auth.worker_signing_key = Secret::new(SIGNING);
    cfg.rate_limit.failed_auth_per_minute = 0;
    f(&mut cfg);
    common::start_with(cfg).await
}

async fn admin(
    s: &common::TestServer,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = s
        .http
        .request(
            method.parse().expect("method"),
            format!("{}/api/v1{path}", s.root),
        )
        .header("X-Admin-API-Key", ADMIN);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.expect("send");
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

async fn as_worker(
    s: &common::TestServer,
    path: &str,
    worker: &str,
    token: &str,
    body: Value,
) -> (u16, Value) {
    let r = s
        .http
        .post(format!("{}/api/v1{path}", s.root))
        .header("X-Worker-ID", worker)
        .header("X-Worker-Token", token)
        .json(&body)
        .send()
        .await
        .expect("send");
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

async fn issue(s: &common::TestServer, body: Value) -> String {
    let (st, v) = admin(s, "POST", "/admin/worker-tokens", Some(body)).await;
    assert_eq!(st, 200, "{v}");
    assert!(v["token"]
        .as_str()
        .expect("token")
        .starts_with("stacyvm-worker-v1."));
    assert_eq!(v["token_id"].as_str().expect("id").len(), 32);
    v["token"].as_str().expect("token").to_string()
}

#[tokio::test]
async fn a_worker_registers_heartbeats_and_is_listed() {
    let s = server(|_| {}).await;
    let t = issue(&s, json!({"worker_id": "w1", "ttl": "2m"})).await;
    let hb = json!({"hostname": "box-1", "providers": ["native"], "capabilities": ["remote_worker"],
                    "capacity": {"max_sandboxes": 4, "rpc_url": "https://10.0.0.5:7430"}});
    let (st, v) = as_worker(&s, "/worker/w1/heartbeat", "w1", &t, hb.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "online");
    assert_eq!(v["stale"], false);
    let created = v["created_at"].clone();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut draining = hb;
    draining["status"] = json!("draining");
    let (st, v) = as_worker(&s, "/worker/w1/heartbeat", "w1", &t, draining).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "draining");
    assert_eq!(v["created_at"], created, "created_at is kept");
    let (st, list) = admin(&s, "GET", "/workers", None).await;
    assert_eq!(st, 200);
    assert_eq!(list.as_array().expect("list").len(), 1);
    assert_eq!(list[0]["capacity"]["rpc_url"], "https://10.0.0.5:7430");
    // Registration and the status change are audited; beats that change
    // nothing are not.
    s.manager.flush_audit().await;
    let rows = s
        .manager
        .store()
        .list_op_audit(&Default::default())
        .await
        .expect("audit");
    let details: Vec<&str> = rows
        .iter()
        .filter(|r| r.action == "worker.heartbeat")
        .map(|r| r.detail.as_str())
        .collect();
    assert_eq!(details.len(), 2, "{details:?}");
    assert!(
        details.iter().any(|d| d.starts_with("online -> draining")),
        "{details:?}"
    );
    let (st, _) = admin(&s, "DELETE", "/admin/workers/w1", None).await;
    assert_eq!(st, 200);
    let (st, v) = admin(&s, "GET", "/workers/w1", None).await;
    assert_eq!(st, 404, "{v}");
    let (st, _) = admin(&s, "DELETE", "/admin/workers/w1", None).await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn a_heartbeat_without_rpc_url_registers_but_says_so() {
    let s = server(|_| {}).await;
    let t = issue(&s, json!({"worker_id": "w-norpc"})).await;
    let (st, v) = as_worker(&s, "/worker/w-norpc/heartbeat", "w-norpc", &t, json!({})).await;
    assert_eq!(st, 200, "{v}");
    s.manager.flush_audit().await;
    let rows = s
        .manager
        .store()
        .list_op_audit(&Default::default())
        .await
        .expect("audit");
    let row = rows
        .iter()
        .find(|r| r.action == "worker.heartbeat")
        .expect("audited");
    assert!(row.detail.contains("no rpc_url"), "{}", row.detail);
    for bad in [
        json!({"capacity": {"rpc_url": "ftp://x:1"}}),
        json!({"capacity": {"rpc_url": "https://host-without-port"}}),
        json!({"capacity": {"rpc_url": "https://u:p@h:1"}}),
        json!({"capacity": "big"}),
        json!({"status": "sleeping"}),
        json!({"providers": ["a b"]}),
        json!({"capacity": {"pad": "x".repeat(66_000)}}),
    ] {
        let (st, v) = as_worker(&s, "/worker/w-norpc/heartbeat", "w-norpc", &t, bad.clone()).await;
        assert!(
            st == 400 || st == 413,
            "{}: {st} {v}",
            &bad.to_string()[..80.min(bad.to_string().len())]
        );
    }
    // A long image list (what a registry-heavy worker reports) fits.
    let images: Vec<String> = (0..400)
        .map(|i| format!("registry.example:5000/team/app-{i:04}:v1.2.3"))
        .collect();
    let (st, v) = as_worker(
        &s,
        "/worker/w-norpc/heartbeat",
        "w-norpc",
        &t,
        json!({"capacity": {"images": images}}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test]
async fn wrong_worker_credentials_are_refused_and_audited() {
    let s = server(|c| {
        c.auth
            .worker_tokens
            .insert("w-static".into(), Secret::new("static-token-of-w-static"));
    })
    .await;
    let heartbeat_only = issue(
        &s,
        json!({"worker_id": "w1", "scopes": ["worker:heartbeat"]}),
    )
    .await;
    let rpc = issue(&s, json!({"worker_id": "w1", "audience": "worker:rpc"})).await;
    // A token minted with another key, one with an unknown scope, one expired.
    let now = chrono::Utc::now().timestamp();
    let forged = stacyvm_cluster::token::sign(
        b"not-the-control-plane-signing-key-0000",
        &stacyvm_cluster::token::Issue::new(
            "w1",
            stacyvm_cluster::token::Audience::ControlPlane,
            60,
        ),
        now,
    )
    .expect("sign")
    .0;
    let expired = stacyvm_cluster::token::sign(
        SIGNING.as_bytes(),
        &stacyvm_cluster::token::Issue::new(
            "w1",
            stacyvm_cluster::token::Audience::ControlPlane,
            60,
        ),
        now - 120,
    )
    .expect("sign")
    .0;
    let cases: Vec<(&str, &str, &str, u16)> = vec![
        ("/worker/w1/heartbeat", "w1", "", 401),
        ("/worker/w1/heartbeat", "w1", &forged, 401),
        ("/worker/w1/heartbeat", "w1", &expired, 401),
        ("/worker/w1/heartbeat", "w1", &rpc, 401),
        ("/worker/w1/heartbeat", "w2", &heartbeat_only, 401),
        ("/worker/w2/heartbeat", "w1", &heartbeat_only, 403),
        (
            "/worker/w1/leases/sb-00000001/renew",
            "w1",
            &heartbeat_only,
            403,
        ),
        ("/worker/w-static/heartbeat", "w-static", "wrong", 401),
        (
            "/worker/w1/heartbeat",
            "w1",
            "static-token-of-w-static",
            401,
        ),
    ];
    for (path, worker, token, want) in cases {
        let (st, v) = as_worker(&s, path, worker, token, json!({"ttl": "30s"})).await;
        assert_eq!(st, want, "{path} as {worker}: {v}");
        assert!(v["message"].is_string(), "{v}");
    }
    let (st, v) = as_worker(
        &s,
        "/worker/w-static/heartbeat",
        "w-static",
        "static-token-of-w-static",
        json!({}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    // An admin key is not a worker credential.
    let (st, _) = admin(&s, "POST", "/worker/w1/heartbeat", Some(json!({}))).await;
    assert_eq!(st, 401);
    s.manager.flush_audit().await;
    let rows = s
        .manager
        .store()
        .list_admin_audit(&AdminAuditFilter {
            actor: "worker:rejected".into(),
            ..Default::default()
        })
        .await
        .expect("audit");
    assert!(
        rows.len() >= 6,
        "failed worker logins are audited: {}",
        rows.len()
    );
}

#[tokio::test]
async fn leases_are_renewed_only_by_their_holder() {
    let s = server(|_| {}).await;
    let store = s.manager.store().clone();
    let l = store
        .acquire_lease("sb-0000aaaa", "sandbox", "w1", Duration::from_secs(60))
        .await
        .expect("lease");
    let t1 = issue(&s, json!({"worker_id": "w1", "scopes": ["worker:lease"]})).await;
    let t2 = issue(&s, json!({"worker_id": "w2"})).await;
    let (st, v) = as_worker(
        &s,
        "/worker/w1/leases/sb-0000aaaa/renew",
        "w1",
        &t1,
        json!({"ttl": "90s"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["lease"]["generation"], l.generation + 1);
    assert_eq!(v["lease"]["holder_id"], "w1");
    let (st, v) = as_worker(
        &s,
        "/worker/w2/leases/sb-0000aaaa/renew",
        "w2",
        &t2,
        json!({"ttl": "90s"}),
    )
    .await;
    assert_eq!(st, 409, "{v}");
    let (st, v) = as_worker(
        &s,
        "/worker/w1/leases/sb-0000aaaa/renew",
        "w1",
        &t1,
        json!({"ttl": "-1s"}),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(
        v["message"],
        "invalid input: ttl must be a positive duration"
    );
    let (st, v) = admin(
        &s,
        "POST",
        "/admin/workers/w1/leases/sb-0000aaaa/renew",
        Some(json!({"ttl": "1m"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["lease"]["generation"], l.generation + 2);
}

#[tokio::test]
async fn token_issuance_refuses_bad_requests_and_needs_a_key() {
    let s = server(|_| {}).await;
    for (body, msg) in [
        (json!({}), "worker_id is required"),
        (
            json!({"worker_id": "w", "ttl": "16m"}),
            "ttl exceeds maximum allowed worker token lifetime of 15m",
        ),
        (
            json!({"worker_id": "w", "ttl": "soon"}),
            "invalid ttl; use a Go duration like 5m or 15m",
        ),
        (
            json!({"worker_id": "w", "audience": "everyone"}),
            "audience must be worker:control-plane or worker:rpc",
        ),
        (
            json!({"worker_id": "w", "scopes": ["worker:root"]}),
            "only worker:* scopes may be issued; scope \"worker:root\" is not permitted",
        ),
    ] {
        let (st, v) = admin(&s, "POST", "/admin/worker-tokens", Some(body.clone())).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["message"], msg, "{body}");
    }
    let issued = s
        .manager
        .store()
        .list_op_audit(&Default::default())
        .await
        .expect("audit");
    assert!(issued.iter().all(|r| r.action != "worker.token_issued"));
    issue(&s, json!({"worker_id": "w"})).await;
    s.manager.flush_audit().await;
    let issued = s
        .manager
        .store()
        .list_op_audit(&Default::default())
        .await
        .expect("audit");
    let row = issued
        .iter()
        .find(|r| r.action == "worker.token_issued")
        .expect("audited");
    assert!(
        !row.detail.contains("stacyvm-worker-v1."),
        "the token itself is never audited"
    );

    let no_key = server(|c| c.auth.worker_signing_key = Secret::default()).await;
    let (st, v) = admin(
        &no_key,
        "POST",
        "/admin/worker-tokens",
        Some(json!({"worker_id": "w"})),
    )
    .await;
    assert_eq!(st, 503, "{v}");
    assert!(
        v["message"]
            .as_str()
            .expect("msg")
            .contains("auth.worker_signing_key"),
        "{v}"
    );
    let (st, v) = as_worker(&no_key, "/worker/w/heartbeat", "w", "x", json!({})).await;
    assert_eq!(st, 503, "{v}");
    let msg = v["message"].as_str().expect("message");
    assert!(
        msg.starts_with("worker token is not configured (request id "),
        "{msg}"
    );
}

/// Placement with remote workers: a test double of the worker RPC seam
/// runs every "remote" sandbox on this server's mock provider, so the
/// record's worker shows the decision.
#[derive(Debug)]
struct Here(std::sync::Arc<stacyvm_core::registry::Registry>);

#[async_trait::async_trait]
impl stacyvm_core::cluster::Remote for Here {
    async fn provider(
        &self,
        _worker: &stacyvm_core::store::WorkerRecord,
        provider: &str,
    ) -> stacyvm_core::Result<std::sync::Arc<dyn stacyvm_core::provider::Provider>> {
        self.0.get(provider)
    }
}

#[tokio::test]
async fn placement_prefers_workers_with_the_image_and_follows_worker_policies() {
    let s = server(|c| c.worker.local_sandboxes = false).await;
    s.manager
        .attach_remote(std::sync::Arc::new(Here(s.manager.registry().clone())));
    let provider = s
        .manager
        .registry()
        .get("")
        .expect("default")
        .name()
        .to_string();
    for (w, images) in [
        ("w-a", json!([])),
        ("w-b", json!(["docker.io/library/alpine:3"])),
    ] {
        let t = issue(&s, json!({"worker_id": w, "ttl": "2m"})).await;
        let hb = json!({"providers": [provider], "capacity": {"max_sandboxes": 3,
                        "rpc_url": format!("https://{w}.test:7430"), "images": images}});
        let (st, v) = as_worker(&s, &format!("/worker/{w}/heartbeat"), w, &t, hb).await;
        assert_eq!(st, 200, "{v}");
    }
    let spawn = |image: &'static str, tenant: Option<&'static str>| {
        let s = &s;
        async move {
            let mut rb = s
                .http
                .post(format!("{}/api/v1/sandboxes", s.root))
                .header("X-Admin-API-Key", ADMIN)
                .json(&json!({"image": image}));
            if let Some(t) = tenant {
                rb = rb.header("X-Tenant-ID", t);
            }
            let r = rb.send().await.expect("send");
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let ids = std::sync::Mutex::new(Vec::<String>::new());
    let worker_of = |v: &Value| {
        let id = v["id"].as_str().expect("id").to_string();
        ids.lock().expect("ids").push(id.clone());
        let m = s.manager.clone();
        async move { m.store().get_sandbox(&id).await.expect("record").worker_id }
    };
    // The worker with the image wins while it has room, though it is
    // busier (alpine:3 and docker.io/library/alpine:3 are one image).
    for _ in 0..3 {
        let (st, v) = spawn("alpine:3", None).await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(worker_of(&v).await, "w-b");
    }
    // Full: the other worker takes it. Another image: the least loaded.
    let (st, v) = spawn("alpine:3", None).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(worker_of(&v).await, "w-a");
    let (st, v) = spawn("busybox", None).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(worker_of(&v).await, "w-a");

    // A tenant whose policies permit only w-a: its sandboxes go there even
    // when the image is on w-b; a policy that permits no eligible worker
    // is a 403 naming the policies, and audited.
    for (t, effect, pattern) in [("t-only-a", "allow", "w-a"), ("t-none", "deny", "w-*")] {
        let (st, v) = admin(
            &s,
            "POST",
            "/admin/tenants",
            Some(json!({"id": t, "name": t})),
        )
        .await;
        assert_eq!(st, 201, "{v}");
        let (st, v) = admin(
            &s,
            "POST",
            &format!("/admin/tenants/{t}/policies"),
            Some(json!({"resource_type": "worker", "effect": effect, "pattern": pattern})),
        )
        .await;
        assert_eq!(st, 201, "{v}");
    }
    // Room again on both.
    let done: Vec<String> = ids.lock().expect("ids").drain(..).collect();
    for id in done {
        let (st, v) = admin(&s, "DELETE", &format!("/sandboxes/{id}"), None).await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, v) = spawn("alpine:3", Some("t-only-a")).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(worker_of(&v).await, "w-a");
    let (st, v) = spawn("alpine:3", Some("t-none")).await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or("")
            .contains("worker policies"),
        "{v}"
    );
    s.manager.flush_audit().await;
    let rows = s
        .manager
        .store()
        .list_op_audit(&Default::default())
        .await
        .expect("audit");
    assert!(
        rows.iter().any(|r| r.action == "sandbox.spawn"
            && r.status == "failure"
            && r.tenant_id == "t-none"
            && r.detail.contains("worker policies")),
        "the refusal is audited"
    );
    // A malformed worker policy is refused when it is written.
    let (st, v) = admin(
        &s,
        "POST",
        "/admin/tenants/t-none/policies",
        Some(json!({"resource_type": "workers", "effect": "allow", "pattern": "w-a"})),
    )
    .await;
    assert_eq!(st, 400, "{v}");
}
