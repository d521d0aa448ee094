//! Authentication and authorization end to end: every route × role
//! against the permission table, OIDC tokens from keys made here (openssl
//! CLI) served by a loopback JWKS server, bad tokens, identity and tenant
//! rules, and the audit rows they leave.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use serde_json::{json, Value};
use stacyvm_core::config::{Config, Secret};
use stacyvm_core::events::EventBus;
use stacyvm_core::manager::Manager;
use stacyvm_core::metrics::Metrics;
use stacyvm_core::registry::Registry;
use stacyvm_core::store::{AdminAuditFilter, OpAuditFilter, TenantMemberRecord};
use stacyvm_providers::mock::MockProvider;
use stacyvm_server::auth::Authenticator;
use stacyvm_server::{AppState, Perm, Role, E2B_ROUTE_PERMISSIONS, ROUTE_PERMISSIONS};
use stacyvm_store::SqliteStore;

const API_KEY: &str = "api-key-0123456789abcdef0123456789abcdef";
const ADMIN_KEY: &str = "admin-key-0123456789abcdef0123456789abcd";
const AUD: &str = "stacyvm-test";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A private key made with the openssl CLI, with its public JWK.
struct TestKey {
    pem: Vec<u8>,
    public_pem: Vec<u8>,
    jwk: Value,
    alg: Algorithm,
}

fn make_key(dir: &Path, name: &str, alg: Algorithm) -> TestKey {
    let path = dir.join(format!("{name}.pem"));
    let p = path.to_str().expect("path");
    match alg {
        Algorithm::RS256 => {
            openssl(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                p,
            ]);
        }
        Algorithm::ES256 | Algorithm::ES384 => {
            let curve = if alg == Algorithm::ES256 {
                "P-256"
            } else {
                "P-384"
            };
            openssl(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                &format!("ec_paramgen_curve:{curve}"),
                "-out",
                p,
            ]);
        }
        _ => unreachable!(),
    }
    let pem = std::fs::read(&path).expect("read key");
    let public_pem = openssl(&["pkey", "-in", p, "-pubout"]);
    let jwk = if alg == Algorithm::RS256 {
        let out =
            String::from_utf8(openssl(&["rsa", "-in", p, "-noout", "-modulus"])).expect("utf8");
        let hex_n = out.trim().trim_start_matches("Modulus=");
        let n = hex::decode(hex_n).expect("hex");
        json!({"kty":"RSA","kid":name,"alg":"RS256","use":"sig","n":b64(&n),"e":"AQAB"})
    } else {
        let der = openssl(&["pkey", "-in", p, "-pubout", "-outform", "DER"]);
        let (len, crv) = if alg == Algorithm::ES256 {
            (32, "P-256")
        } else {
            (48, "P-384")
        };
        let point = &der[der.len() - (2 * len + 1)..];
        assert_eq!(point[0], 4, "uncompressed point");
        json!({"kty":"EC","kid":name,"crv":crv,"x":b64(&point[1..=len]),"y":b64(&point[len + 1..])})
    };
    TestKey {
        pem,
        public_pem,
        jwk,
        alg,
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn sign(k: &TestKey, kid: &str, claims: &Value) -> String {
    let mut h = Header::new(k.alg);
    h.kid = Some(kid.to_string());
    let key = match k.alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&k.pem),
        _ => EncodingKey::from_ec_pem(&k.pem),
    }
    .expect("encoding key");
    jsonwebtoken::encode(&h, claims, &key).expect("sign")
}

fn claims(sub: &str, groups: &[&str]) -> Value {
    json!({"sub": sub, "email": format!("{sub}@example.test"), "iss": "https://idp.test",
           "aud": AUD, "exp": now() + 600, "iat": now(), "nbf": now() - 5, "groups": groups})
}

/// A JWKS endpoint on loopback whose key set the test can swap.
struct Jwks {
    url: String,
    set: Arc<Mutex<Value>>,
    hits: Arc<AtomicUsize>,
}

async fn jwks_server(keys: Vec<Value>) -> Jwks {
    let set = Arc::new(Mutex::new(json!({ "keys": keys })));
    let hits = Arc::new(AtomicUsize::new(0));
    let (s2, h2) = (set.clone(), hits.clone());
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let (s, h) = (s2.clone(), h2.clone());
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                axum::Json(s.lock().clone())
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/jwks", l.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    Jwks { url, set, hits }
}

struct Server {
    base: String,
    http: reqwest::Client,
    manager: Arc<Manager>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(mut cfg: Config, refetch: Duration) -> Server {
    let dir = tempfile::tempdir().expect("tmp");
    cfg.server.data_dir = dir.path().to_string_lossy().to_string();
    cfg.providers.default = "mock".into();
    cfg.providers.mock.enabled = true;
    let provider = Arc::new(MockProvider::new(dir.path().join("mock")).expect("mock"));
    let registry = Arc::new(Registry::new(vec![provider], "mock").expect("registry"));
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .expect("store"),
    );
    let manager = Manager::new(
        Arc::new(cfg.clone()),
        store,
        registry,
        Arc::new(EventBus::new()),
        Arc::new(Metrics::default()),
    );
    let mut auth = Authenticator::new(&cfg.auth).expect("auth config");
    if let Some(o) = auth.oidc_mut() {
        o.set_refetch_interval(refetch);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}/api/v1", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let state = AppState::with_auth(manager.clone(), auth);
    tokio::spawn(stacyvm_server::serve(listener, state, async move {
        let _ = rx.await;
    }));
    Server {
        base,
        http: reqwest::Client::new(),
        manager,
        _dir: dir,
        _stop: tx,
    }
}

fn oidc_config(jwks_url: &str) -> Config {
    let mut cfg = Config::default();
    cfg.auth.enabled = true;
    cfg.auth.api_key = Secret::new(API_KEY);
    cfg.auth.admin_api_key = Secret::new(ADMIN_KEY);
    cfg.auth.oidc_issuer = "https://idp.test".into();
    cfg.auth.oidc_audience = AUD.into();
    cfg.auth.oidc_jwks_url = jwks_url.into();
    cfg.auth.oidc_admin_groups = vec!["admins".into()];
    cfg.auth.oidc_operator_groups = vec!["ops".into()];
    cfg.auth.oidc_viewer_groups = vec!["viewers".into()];
    // Worker routes answer 401 to every API caller (an API key or a JWT
    // is not a worker credential), not 503 (nothing configured).
    cfg.auth.worker_token = Secret::new("worker-token-for-the-route-tests");
    cfg
}

/// How a request authenticates.
#[derive(Clone)]
enum Cred {
    None,
    ApiKey,
    AdminKey,
    Bearer(String),
}

impl Server {
    async fn send(
        &self,
        method: &str,
        path: &str,
        cred: &Cred,
        extra: &[(&str, &str)],
        body: Option<Value>,
    ) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self
            .http
            .request(m, format!("{}{path}", self.base))
            .timeout(Duration::from_secs(20));
        rb = match cred {
            Cred::None => rb,
            Cred::ApiKey => rb.header("X-API-Key", API_KEY),
            Cred::AdminKey => rb.header("X-Admin-API-Key", ADMIN_KEY),
            Cred::Bearer(t) => rb.header("Authorization", format!("Bearer {t}")),
        };
        for (k, v) in extra {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let r = rb.send().await.expect("send");
        let status = r.status().as_u16();
        if r.headers().get("content-type").is_some_and(|v| {
            v.to_str()
                .unwrap_or_default()
                .starts_with("text/event-stream")
        }) {
            return (status, Value::Null);
        }
        let text = r.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

fn concrete(path: &str) -> String {
    path.replace("{id}", "sb-0000dead")
        .replace("{name}", "no-such")
        .replace("{owner}", "someone")
        .replace("{tenant}", "acme")
        .replace("{user}", "someone")
        .replace("{policy}", "pol-00000000")
}

#[tokio::test]
async fn every_route_times_every_role_matches_the_permission_table() {
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let jwks = jwks_server(vec![rsa.jwk.clone()]).await;
    let mut cfg = oidc_config(&jwks.url);
    // Every route is tried anonymously: far more failures than one
    // address may make by default.
    cfg.rate_limit.failed_auth_per_minute = 0;
    let s = start(cfg, Duration::from_secs(10)).await;
    s.manager
        .store()
        .upsert_tenant_member(&TenantMemberRecord {
            tenant_id: "acme".into(),
            user_id: "tadmin".into(),
            role: "admin".into(),
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        })
        .await
        .expect("member");
    type Caller = (
        &'static str,
        Cred,
        Vec<(&'static str, &'static str)>,
        Option<Role>,
    );
    let callers: Vec<Caller> = vec![
        ("anonymous", Cred::None, vec![], None),
        (
            "viewer",
            Cred::Bearer(sign(&rsa, "rsa1", &claims("v", &["viewers"]))),
            vec![],
            Some(Role::Viewer),
        ),
        ("api key", Cred::ApiKey, vec![], Some(Role::Api)),
        (
            "oidc api",
            Cred::Bearer(sign(&rsa, "rsa1", &claims("u", &[]))),
            vec![],
            Some(Role::Api),
        ),
        (
            "operator",
            Cred::Bearer(sign(&rsa, "rsa1", &claims("o", &["ops"]))),
            vec![],
            Some(Role::Operator),
        ),
        (
            "tenant_admin",
            Cred::Bearer(sign(&rsa, "rsa1", &claims("tadmin", &[]))),
            vec![("X-Tenant-ID", "acme")],
            Some(Role::TenantAdmin),
        ),
        (
            "oidc admin",
            Cred::Bearer(sign(&rsa, "rsa1", &claims("a", &["admins"]))),
            vec![],
            Some(Role::Admin),
        ),
        ("admin key", Cred::AdminKey, vec![], Some(Role::Admin)),
    ];
    let mut checked = 0;
    // The E2B API (outside /api/v1) answers errors in E2B's shape: the
    // status as a number in `code`.
    let tables = ROUTE_PERMISSIONS
        .iter()
        .map(|rp| (rp, false))
        .chain(E2B_ROUTE_PERMISSIONS.iter().map(|rp| (rp, true)));
    for (rp, e2b) in tables {
        let path = if e2b {
            // The root: `/api/v1/../..` resolves to it.
            format!("/../..{}", concrete(rp.path))
        } else {
            concrete(rp.path)
        };
        let body = matches!(rp.method, "POST" | "PUT").then(|| json!({}));
        for (name, cred, extra, role) in &callers {
            let (st, v) = s.send(rp.method, &path, cred, extra, body.clone()).await;
            let want_allowed = match role {
                None => rp.perm == Perm::Open,
                Some(r) => rp.perm.allows(*r),
            };
            if want_allowed {
                assert!(
                    st != 401 && st != 403,
                    "{name} must reach {} {path}, got {st} {v}",
                    rp.method
                );
            } else {
                let want = if role.is_none() || matches!(rp.perm, Perm::Worker(_)) {
                    401
                } else {
                    403
                };
                assert_eq!(st, want, "{name} on {} {path}: {v}", rp.method);
                let code = match (want, e2b) {
                    (_, true) => json!(want),
                    (401, false) => json!("UNAUTHORIZED"),
                    _ => json!("FORBIDDEN"),
                };
                assert_eq!(v["code"], code, "{v}");
                if want == 403 {
                    let msg = v["message"].as_str().unwrap_or_default();
                    assert!(msg.contains(rp.perm.name()), "{msg}");
                }
            }
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        (ROUTE_PERMISSIONS.len() + E2B_ROUTE_PERMISSIONS.len()) * callers.len()
    );
}

#[tokio::test]
async fn every_registered_route_has_a_permission_entry() {
    // A request to a route missing from the table would be refused with
    // "has no permission entry"; probing every table row with the admin
    // key proves none of them is missing, and unknown paths stay 404.
    let s = start(
        {
            let mut c = Config::default();
            c.auth.admin_api_key = Secret::new(ADMIN_KEY);
            c
        },
        Duration::from_secs(10),
    )
    .await;
    // E2B routes live at the root: `/api/v1/../..` resolves to it.
    let rows = ROUTE_PERMISSIONS
        .iter()
        .map(|rp| (rp, concrete(rp.path)))
        .chain(
            E2B_ROUTE_PERMISSIONS
                .iter()
                .map(|rp| (rp, format!("/../..{}", concrete(rp.path)))),
        );
    for (rp, path) in rows {
        let body = matches!(rp.method, "POST" | "PUT").then(|| json!({}));
        let (st, v) = s.send(rp.method, &path, &Cred::AdminKey, &[], body).await;
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(
            !msg.starts_with("route not found"),
            "{} {} is in the table but not routed: {v}",
            rp.method,
            rp.path
        );
        assert!(st != 405, "{} {} not routed: {v}", rp.method, rp.path);
        assert!(
            !v["message"]
                .as_str()
                .unwrap_or_default()
                .contains("no permission entry"),
            "{v}"
        );
    }
}

async fn rejected(s: &Server, token: &str, contains: &str) {
    let (st, v) = s
        .send("GET", "/sandboxes", &Cred::Bearer(token.into()), &[], None)
        .await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["code"], "UNAUTHORIZED");
    let msg = v["message"].as_str().expect("message");
    assert!(
        msg.contains(contains),
        "{msg:?} should contain {contains:?}"
    );
}

#[tokio::test]
async fn oidc_accepts_rs256_es256_es384_and_refuses_bad_tokens() {
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let p256 = make_key(dir.path(), "ec256", Algorithm::ES256);
    let p384 = make_key(dir.path(), "ec384", Algorithm::ES384);
    let other = make_key(dir.path(), "rsa-evil", Algorithm::RS256);
    let jwks = jwks_server(vec![rsa.jwk.clone(), p256.jwk.clone(), p384.jwk.clone()]).await;
    let s = start(oidc_config(&jwks.url), Duration::from_secs(3600)).await;

    for (k, kid) in [(&rsa, "rsa1"), (&p256, "ec256"), (&p384, "ec384")] {
        let t = sign(k, kid, &claims("alice", &[]));
        let (st, v) = s
            .send("GET", "/sandboxes", &Cred::Bearer(t), &[], None)
            .await;
        assert_eq!(st, 200, "{kid}: {v}");
    }

    // Forged: signed by another key under a trusted kid.
    rejected(
        &s,
        &sign(&other, "rsa1", &claims("mallory", &["admins"])),
        "signature verification failed",
    )
    .await;
    // Expired beyond the 30 s leeway.
    let mut c = claims("alice", &[]);
    c["exp"] = json!(now() - 120);
    rejected(&s, &sign(&rsa, "rsa1", &c), "expired").await;
    // Not yet valid.
    let mut c = claims("alice", &[]);
    c["nbf"] = json!(now() + 600);
    rejected(&s, &sign(&rsa, "rsa1", &c), "not valid yet").await;
    // Issued in the future.
    let mut c = claims("alice", &[]);
    c["iat"] = json!(now() + 600);
    rejected(&s, &sign(&rsa, "rsa1", &c), "issued in the future").await;
    // Wrong audience and issuer.
    let mut c = claims("alice", &[]);
    c["aud"] = json!("someone-else");
    rejected(&s, &sign(&rsa, "rsa1", &c), "audience").await;
    let mut c = claims("alice", &[]);
    c["iss"] = json!("https://evil.test");
    rejected(&s, &sign(&rsa, "rsa1", &c), "issuer").await;
    // No exp.
    let mut c = claims("alice", &[]);
    c.as_object_mut().expect("obj").remove("exp");
    rejected(&s, &sign(&rsa, "rsa1", &c), "exp").await;
    // alg none.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT","kid":"rsa1"}"#),
        b64(claims("mallory", &["admins"]).to_string().as_bytes())
    );
    rejected(&s, &none, "algorithm \"none\" is not accepted").await;
    // HS256 "signed" with the RSA public key (alg confusion).
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rsa1".into());
    let hs = jsonwebtoken::encode(
        &h,
        &claims("mallory", &["admins"]),
        &EncodingKey::from_secret(&rsa.public_pem),
    )
    .expect("hs256");
    rejected(&s, &hs, "algorithm \"HS256\" is not accepted").await;
    // ES256 header on the RSA kid.
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("rsa1".into());
    let t = jsonwebtoken::encode(
        &h,
        &claims("mallory", &[]),
        &EncodingKey::from_ec_pem(&p256.pem).expect("ec"),
    )
    .expect("es");
    rejected(&s, &t, "does not match").await;
    // Garbage.
    rejected(&s, "not-a-jwt", "three dot-separated parts").await;

    // Every refusal left an audit row with status 401.
    let rows = s
        .manager
        .store()
        .list_admin_audit(&AdminAuditFilter {
            actor: "jwt:rejected".into(),
            limit: 100,
            ..AdminAuditFilter::default()
        })
        .await
        .expect("audit");
    assert_eq!(rows.len(), 11, "{rows:?}");
    assert!(rows
        .iter()
        .all(|r| r.status == 401 && r.path == "/api/v1/sandboxes"));
    assert!(
        rows.iter().all(|r| r.remote_addr == "127.0.0.1"),
        "{rows:?}"
    );
}

#[tokio::test]
async fn unknown_kid_refetches_jwks_at_a_limited_rate() {
    let dir = tempfile::tempdir().expect("tmp");
    let k1 = make_key(dir.path(), "k1", Algorithm::ES256);
    let k2 = make_key(dir.path(), "k2", Algorithm::ES256);
    let k3 = make_key(dir.path(), "k3", Algorithm::ES256);
    let jwks = jwks_server(vec![k1.jwk.clone()]).await;
    let s = start(oidc_config(&jwks.url), Duration::from_secs(2)).await;
    let ok = |t: String| Cred::Bearer(t);
    let (st, v) = s
        .send(
            "GET",
            "/sandboxes",
            &ok(sign(&k1, "k1", &claims("a", &[]))),
            &[],
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(jwks.hits.load(Ordering::SeqCst), 1);
    // Rotation: k2 appears at the IdP; a k2 token right after the first
    // fetch is refused without hammering the IdP…
    *jwks.set.lock() = json!({"keys": [k1.jwk.clone(), k2.jwk.clone()]});
    rejected(
        &s,
        &sign(&k2, "k2", &claims("a", &[])),
        "refetched less than",
    )
    .await;
    assert_eq!(jwks.hits.load(Ordering::SeqCst), 1);
    // …and accepted once the refetch interval has passed.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (st, v) = s
        .send(
            "GET",
            "/sandboxes",
            &ok(sign(&k2, "k2", &claims("a", &[]))),
            &[],
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(jwks.hits.load(Ordering::SeqCst), 2);
    // A kid the IdP never publishes stays unknown.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    rejected(&s, &sign(&k3, "k3", &claims("a", &[])), "unknown key id").await;
    assert_eq!(jwks.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn identity_and_tenant_are_never_self_asserted() {
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let jwks = jwks_server(vec![rsa.jwk.clone()]).await;
    let mut cfg = oidc_config(&jwks.url);
    cfg.auth.oidc_tenant_claim = "tenant".into();
    let s = start(cfg, Duration::from_secs(10)).await;
    let store = s.manager.store();
    store
        .upsert_tenant_member(&TenantMemberRecord {
            tenant_id: "acme".into(),
            user_id: "bob".into(),
            role: "operator".into(),
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        })
        .await
        .expect("member");
    let alice = Cred::Bearer(sign(&rsa, "rsa1", &claims("alice", &[])));

    // S-4: an OIDC user cannot name another owner.
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &alice,
            &[("X-User-ID", "bob")],
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    assert!(v["message"].as_str().expect("msg").contains("X-User-ID"));
    // The subject is the owner.
    let (st, v) = s
        .send("POST", "/sandboxes", &alice, &[], Some(json!({})))
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["owner_id"], "alice", "{v}");

    // S-3: the API key may name the user, but a tenant only with membership.
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::ApiKey,
            &[("X-User-ID", "carol"), ("X-Tenant-ID", "acme")],
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["message"].as_str().expect("msg").contains("not a member"),
        "{v}"
    );
    let (st, v) = s
        .send(
            "GET",
            "/sandboxes",
            &Cred::ApiKey,
            &[("X-Tenant-ID", "acme")],
            None,
        )
        .await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::ApiKey,
            &[("X-User-ID", "bob"), ("X-Tenant-ID", "acme")],
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let bob_box = v["id"].as_str().expect("id").to_string();
    assert_eq!(v["owner_id"], "bob");

    // The tenant from the token claim scopes list and get (dave is an
    // operator: he sees the whole tenant, not only what he owns).
    let mut c = claims("dave", &["ops"]);
    c["tenant"] = json!("acme");
    let dave = Cred::Bearer(sign(&rsa, "rsa1", &c));
    let (st, v) = s.send("GET", "/sandboxes", &dave, &[], None).await;
    assert_eq!(st, 200, "{v}");
    let ids: Vec<&str> = v
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|x| x["id"].as_str())
        .collect();
    assert_eq!(ids, vec![bob_box.as_str()], "{v}");
    // Alice (no tenant) may not switch into acme by header.
    let (st, v) = s
        .send(
            "GET",
            "/sandboxes",
            &alice,
            &[("X-Tenant-ID", "acme")],
            None,
        )
        .await;
    assert_eq!(st, 403, "{v}");
    // Dave in acme cannot see a sandbox outside it.
    let (st, _) = s.send("GET", "/sandboxes", &alice, &[], None).await;
    assert_eq!(st, 200);
    let others: Vec<String> = s
        .manager
        .list(&stacyvm_core::manager::Caller::default())
        .await
        .expect("list")
        .into_iter()
        .filter(|r| r.tenant_id.is_empty())
        .map(|r| r.id)
        .collect();
    assert_eq!(others.len(), 1);
    let (st, v) = s
        .send(
            "GET",
            &format!("/sandboxes/{}", others[0]),
            &dave,
            &[],
            None,
        )
        .await;
    assert_eq!(st, 404, "{v}");

    // The admin key may act in any tenant; the audit row carries it.
    let (st, v) = s
        .send(
            "DELETE",
            &format!("/sandboxes/{bob_box}"),
            &Cred::AdminKey,
            &[("X-Tenant-ID", "acme"), ("X-Forwarded-For", "203.0.113.9")],
            None,
        )
        .await;
    assert!(st == 200 || st == 204, "{st} {v}");
    let rows = store
        .list_admin_audit(&AdminAuditFilter {
            tenant_id: "acme".into(),
            method: "DELETE".into(),
            limit: 10,
            ..AdminAuditFilter::default()
        })
        .await
        .expect("audit");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].actor, "admin-key");
    // X-Forwarded-For is not believed from an untrusted peer (S-19).
    assert_eq!(rows[0].remote_addr, "127.0.0.1");
}

#[tokio::test]
async fn audit_export_is_admin_only_json_and_csv_with_since() {
    let mut cfg = Config::default();
    cfg.auth.api_key = Secret::new(API_KEY);
    cfg.auth.admin_api_key = Secret::new(ADMIN_KEY);
    cfg.server.trusted_proxies = vec!["127.0.0.0/8".into()];
    let s = start(cfg, Duration::from_secs(10)).await;
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::ApiKey,
            &[
                ("X-User-ID", "erin"),
                ("X-Forwarded-For", "198.51.100.7, 10.0.0.1"),
            ],
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = s
        .send("GET", "/admin/audit", &Cred::ApiKey, &[], None)
        .await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = s
        .send("GET", "/admin/audit?since=1h", &Cred::AdminKey, &[], None)
        .await;
    assert_eq!(st, 200, "{v}");
    let rows = v.as_array().expect("rows");
    let spawn = rows
        .iter()
        .find(|r| r["method"] == "POST" && r["path"] == "/api/v1/sandboxes")
        .expect("spawn row");
    assert_eq!(spawn["actor"], "api-key:erin");
    assert_eq!(spawn["status"], 201);
    // Trusted proxy: the first forwarded hop is the client.
    assert_eq!(spawn["remote_addr"], "198.51.100.7");
    assert!(!spawn["request_id"].as_str().expect("rid").is_empty());
    // The refused API-key call is audited too.
    assert!(rows
        .iter()
        .any(|r| r["path"] == "/api/v1/admin/audit" && r["status"] == 403));
    // since in the future → nothing.
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (st, v) = s
        .send(
            "GET",
            &format!("/admin/audit?since={}", future.replace('+', "%2B")),
            &Cred::AdminKey,
            &[],
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v.as_array().expect("rows").len(), 0, "{v}");
    let (st, v) = s
        .send(
            "GET",
            "/admin/audit?since=yesterday",
            &Cred::AdminKey,
            &[],
            None,
        )
        .await;
    assert_eq!(st, 400, "{v}");
    // CSV.
    let r = s
        .http
        .get(format!("{}/admin/op-audit?format=csv", s.base))
        .header("X-Admin-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    let text = r.text().await.expect("text");
    let mut lines = text.lines();
    assert!(lines
        .next()
        .expect("header")
        .starts_with("id,created_at,actor,action"));
    assert!(text.contains("sandbox.spawn"), "{text}");
}

#[tokio::test]
async fn misconfigured_auth_refuses_to_start() {
    let mut cfg = Config::default();
    cfg.auth.enabled = true;
    let e = Authenticator::new(&cfg.auth).expect_err("no credential");
    assert!(e.contains("auth.enabled is true"), "{e}");
    let mut cfg = Config::default();
    cfg.auth.oidc_issuer = "https://idp.test".into();
    let e = Authenticator::new(&cfg.auth).expect_err("issuer without keys");
    assert!(e.contains("oidc_jwks_url"), "{e}");
    let mut cfg = Config::default();
    cfg.auth.api_key = Secret::new("sha256:1234");
    let e = Authenticator::new(&cfg.auth).expect_err("short hash");
    assert!(e.contains("auth.api_key"), "{e}");
}

#[tokio::test]
async fn hashed_keys_and_admin_fallback() {
    use sha2::Digest as _;
    let mut cfg = Config::default();
    cfg.auth.api_key = Secret::new(format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(API_KEY.as_bytes()))
    ));
    cfg.auth.admin_fallback_enabled = true;
    let s = start(cfg, Duration::from_secs(10)).await;
    // No admin key configured + fallback: the API key is admin.
    let (st, v) = s
        .send("GET", "/admin/audit", &Cred::ApiKey, &[], None)
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s
        .send(
            "GET",
            "/sandboxes",
            &Cred::None,
            &[("X-API-Key", "sha256:x")],
            None,
        )
        .await;
    assert_eq!(st, 401, "{v}");
    assert_eq!(v["message"], "invalid API key");
}

#[tokio::test]
async fn cors_preflight_passes_before_auth_with_exact_origins() {
    let mut cfg = Config::default();
    cfg.auth.api_key = Secret::new(API_KEY);
    cfg.server.cors_allowed_origins = vec!["https://app.example".into()];
    let s = start(cfg, Duration::from_secs(10)).await;
    let pre = |origin: &'static str| {
        s.http
            .request(reqwest::Method::OPTIONS, format!("{}/sandboxes", s.base))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "PATCH")
            .send()
    };
    let r = pre("https://app.example").await.expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(r.headers()["access-control-allow-methods"]
        .to_str()
        .expect("str")
        .contains("PATCH"));
    let r = pre("https://app.example.evil").await.expect("send");
    assert_eq!(r.status(), 403);
    let r = s
        .http
        .get(format!("{}/sandboxes", s.base))
        .header("Origin", "https://app.example")
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert!(r.headers()["access-control-expose-headers"]
        .to_str()
        .expect("str")
        .contains("X-Request-ID"));
}

#[test]
fn docs_security_md_lists_the_permission_table() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/security.md"),
    )
    .expect("docs/security.md");
    let rows: Vec<&str> = doc
        .lines()
        .filter(|l| {
            l.starts_with("| GET |")
                || l.starts_with("| POST |")
                || l.starts_with("| PUT |")
                || l.starts_with("| PATCH |")
                || l.starts_with("| DELETE |")
        })
        .collect();
    assert_eq!(rows.len(), ROUTE_PERMISSIONS.len(), "one row per route");
    for rp in ROUTE_PERMISSIONS {
        let needs = match rp.perm {
            Perm::Open => "open".to_string(),
            p => format!("`{}`", p.name()),
        };
        let cells: Vec<&str> = Role::ALL
            .iter()
            .map(|r| if rp.perm.allows(*r) { "yes" } else { "no" })
            .collect();
        let want = format!(
            "| {} | `/api/v1{}` | {needs} | {} |",
            rp.method,
            rp.path,
            cells.join(" | ")
        );
        assert!(
            rows.contains(&want.as_str()),
            "missing or stale row: {want}"
        );
    }
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_per_bucket() {
    let mut cfg = Config::default();
    cfg.auth.api_key = Secret::new(API_KEY);
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.requests_per_minute = 1;
    cfg.rate_limit.burst = 2;
    cfg.rate_limit.key_by = "owner".into();
    cfg.rate_limit.failed_auth_per_minute = 2;
    let s = start(cfg, Duration::from_secs(10)).await;
    let get = |user: &'static str| {
        s.http
            .get(format!("{}/sandboxes", s.base))
            .header("X-API-Key", API_KEY)
            .header("X-User-ID", user)
            .send()
    };
    let r = get("ann").await.expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit"], "2");
    assert_eq!(r.headers()["x-ratelimit-remaining"], "1");
    assert_eq!(get("ann").await.expect("send").status(), 200);
    let r = get("ann").await.expect("send");
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("str")
        .parse()
        .expect("secs");
    assert!((1..=60).contains(&retry), "{retry}");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], "RESOURCE_LIMIT");
    assert!(v["message"]
        .as_str()
        .expect("msg")
        .contains("rate limit exceeded"));
    // Another owner has its own bucket; probes are never limited.
    assert_eq!(get("ben").await.expect("send").status(), 200);
    let (st, _) = s.send("GET", "/live", &Cred::None, &[], None).await;
    assert_eq!(st, 200);
    // Failed attempts spend the address's bucket; past it they are 429 and
    // leave no audit row.
    let bad = Cred::Bearer("x.y.z".into());
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(s.send("GET", "/sandboxes", &bad, &[], None).await.0);
    }
    assert_eq!(codes, vec![401, 401, 429, 429]);
    let rows = s
        .manager
        .store()
        .list_admin_audit(&AdminAuditFilter {
            actor: "jwt:rejected".into(),
            ..AdminAuditFilter::default()
        })
        .await
        .expect("audit");
    assert_eq!(rows.len(), 2, "{rows:?}");
}

#[tokio::test]
async fn tenants_members_policies_and_tenant_audit() {
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let jwks = jwks_server(vec![rsa.jwk.clone()]).await;
    let s = start(oidc_config(&jwks.url), Duration::from_secs(10)).await;
    let admin = Cred::AdminKey;
    let (st, v) = s
        .send(
            "POST",
            "/admin/tenants",
            &admin,
            &[],
            Some(json!({"id":"acme","name":"Acme","settings":{"tier":"gold"}})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["tenant"]["settings"], "{\"tier\":\"gold\"}");
    let (st, v) = s
        .send(
            "POST",
            "/admin/tenants",
            &admin,
            &[],
            Some(json!({"id":"acme","name":"again"})),
        )
        .await;
    assert_eq!(st, 409, "{v}");
    let (st, v) = s
        .send(
            "POST",
            "/admin/tenants",
            &admin,
            &[],
            Some(json!({"name":"Globex"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let globex = v["tenant"]["id"].as_str().expect("id").to_string();
    assert!(globex.starts_with("tenant-"), "{globex}");
    let (st, v) = s
        .send("POST", "/admin/tenants", &admin, &[], Some(json!({})))
        .await;
    assert_eq!(st, 400, "{v}");

    // Members: unknown roles are refused.
    let (st, v) = s
        .send(
            "PUT",
            "/admin/tenants/acme/members/tara",
            &admin,
            &[],
            Some(json!({"role":"root"})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v["message"]
        .as_str()
        .expect("m")
        .contains("role must be viewer, operator, or admin"));
    let (st, v) = s
        .send(
            "PUT",
            "/admin/tenants/acme/members/tara",
            &admin,
            &[],
            Some(json!({"role":"admin"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s
        .send(
            "PUT",
            "/admin/tenants/acme/members/vic",
            &admin,
            &[],
            Some(json!({"role":"viewer"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");

    // tara is tenant_admin of acme only.
    let tara = Cred::Bearer(sign(&rsa, "rsa1", &claims("tara", &[])));
    let acme = [("X-Tenant-ID", "acme")];
    let (st, v) = s
        .send("GET", "/admin/tenants/acme/members", &tara, &acme, None)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["members"].as_array().expect("members").len(), 2);
    let (st, v) = s
        .send(
            "GET",
            &format!("/admin/tenants/{globex}/members"),
            &tara,
            &acme,
            None,
        )
        .await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = s
        .send("GET", "/admin/tenants/acme/members", &tara, &[], None)
        .await;
    assert_eq!(st, 403, "without the tenant she is a plain user: {v}");
    let (st, v) = s.send("GET", "/admin/tenants", &tara, &acme, None).await;
    assert_eq!(st, 403, "{v}");
    // A viewer membership narrows the role.
    let vic = Cred::Bearer(sign(&rsa, "rsa1", &claims("vic", &[])));
    let (st, v) = s
        .send("POST", "/sandboxes", &vic, &acme, Some(json!({})))
        .await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["message"].as_str().expect("m").contains("role viewer"),
        "{v}"
    );

    // Policies: bad patterns are refused; an allow list restricts.
    let (st, v) = s
        .send(
            "POST",
            "/admin/tenants/acme/policies",
            &tara,
            &acme,
            Some(json!({"resource_type":"image","effect":"allow","pattern":"[oops"})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .expect("m")
            .contains("does not compile"),
        "{v}"
    );
    let (st, v) = s
        .send(
            "POST",
            "/admin/tenants/acme/policies",
            &tara,
            &acme,
            Some(
                json!({"resource_type":"image","effect":"allow","pattern":"python:*","priority":5}),
            ),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let allow_id = v["policy"]["id"].as_str().expect("id").to_string();
    let (st, v) = s
        .send(
            "POST",
            "/admin/policies",
            &admin,
            &[],
            Some(json!({"resource_type":"network","effect":"deny","pattern":"bridge"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = s
        .send("GET", "/admin/tenants/acme/policies", &tara, &acme, None)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["policies"].as_array().expect("p").len(),
        2,
        "tenant + global: {v}"
    );

    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &tara,
            &acme,
            Some(json!({"image":"ubuntu:24.04"})),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["message"]
            .as_str()
            .expect("m")
            .contains("not in the allowed image list"),
        "{v}"
    );
    // Omitting the image does not bypass the check (default image is not python:*).
    let (st, v) = s
        .send("POST", "/sandboxes", &tara, &acme, Some(json!({})))
        .await;
    assert_eq!(st, 403, "{v}");
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &tara,
            &acme,
            Some(json!({"image":"python:3.12"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["tenant_id"], "acme", "tenant stamped: {v}");
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &tara,
            &acme,
            Some(json!({"image":"python:3.12","network_mode":"bridge"})),
        )
        .await;
    assert_eq!(st, 403, "global deny: {v}");
    // Template spawns are checked too.
    let (st, v) = s
        .send(
            "POST",
            "/templates",
            &admin,
            &[],
            Some(json!({"name":"ubu","image":"ubuntu:24.04"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = s
        .send(
            "POST",
            "/templates/ubu/spawn",
            &tara,
            &acme,
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    // Another tenant's policy cannot be deleted through acme's path…
    let (st, v) = s
        .send(
            "DELETE",
            &format!("/admin/tenants/{globex}/policies/{allow_id}"),
            &admin,
            &[],
            None,
        )
        .await;
    assert_eq!(st, 404, "{v}");
    // …but through its own.
    let (st, _) = s
        .send(
            "DELETE",
            &format!("/admin/tenants/acme/policies/{allow_id}"),
            &tara,
            &acme,
            None,
        )
        .await;
    assert_eq!(st, 204);
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &tara,
            &acme,
            Some(json!({"image":"ubuntu:24.04"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");

    // Per-tenant audit export with a time filter.
    let (st, v) = s
        .send(
            "GET",
            "/admin/tenants/acme/audit?since=1h",
            &tara,
            &acme,
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let ops = v["op_audit"].as_array().expect("ops");
    assert!(
        ops.iter()
            .any(|o| o["action"] == "sandbox.spawn" && o["status"] == "failure"),
        "{v}"
    );
    assert!(ops.iter().all(|o| o["tenant_id"] == "acme"));
    let adm = v["admin_audit"].as_array().expect("admin");
    assert!(
        adm.iter()
            .any(|a| a["status"] == 400 && a["path"] == "/api/v1/admin/tenants/acme/policies"),
        "{v}"
    );
    let future = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339()
        .replace('+', "%2B");
    let (st, v) = s
        .send(
            "GET",
            &format!("/admin/tenants/acme/audit?since={future}"),
            &tara,
            &acme,
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["op_audit"].as_array().expect("ops").len(), 0);
    assert_eq!(v["admin_audit"].as_array().expect("adm").len(), 0);

    // Delete removes members and tenant policies with it.
    let (st, _) = s
        .send("DELETE", "/admin/tenants/acme", &admin, &[], None)
        .await;
    assert_eq!(st, 204);
    let (st, _) = s
        .send("GET", "/admin/tenants/acme", &admin, &[], None)
        .await;
    assert_eq!(st, 404);
    assert!(s
        .manager
        .store()
        .list_tenant_members("acme")
        .await
        .expect("m")
        .is_empty());
}

#[tokio::test]
async fn every_route_refuses_oversized_bodies_with_json_413() {
    let mut cfg = Config::default();
    cfg.auth.admin_api_key = Secret::new(ADMIN_KEY);
    cfg.server.max_body_bytes = 1024;
    cfg.auth.worker_token = Secret::new("worker-token-for-the-route-tests");
    // The raw upload route (PUT /files) streams; its bound is the file limit.
    cfg.limits.max_file_bytes = 1024;
    // PUT /archive streams too: content plus tar framing per entry.
    cfg.limits.max_archive_bytes = 1024;
    cfg.limits.max_archive_entries = 1;
    let archive_limit = stacyvm_server::routes::files::archive_body_limit(&cfg.limits);
    let s = start(cfg, Duration::from_secs(10)).await;
    let big = "x".repeat(archive_limit as usize + 1);
    // Oversized headers: 431 with the JSON error shape, before auth.
    let (st, v) = s
        .send(
            "GET",
            "/sandboxes",
            &Cred::None,
            &[("X-Filler", &"h".repeat(70_000))],
            None,
        )
        .await;
    assert_eq!(st, 431, "{v}");
    assert_eq!(v["code"], "HEADERS_TOO_LARGE", "{v}");
    for rp in ROUTE_PERMISSIONS {
        let m = reqwest::Method::from_bytes(rp.method.as_bytes()).expect("method");
        for (chunked, cred) in [(false, true), (false, false), (true, true)] {
            if chunked && !matches!(rp.method, "POST" | "PUT") {
                continue;
            }
            let mut rb = s
                .http
                .request(m.clone(), format!("{}{}", s.base, concrete(rp.path)))
                .timeout(Duration::from_secs(20));
            if cred {
                rb = rb.header("X-Admin-API-Key", ADMIN_KEY);
            }
            rb = if chunked {
                let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(big.clone())];
                rb.body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            } else {
                rb.body(big.clone())
            };
            let r = rb.send().await.expect("send");
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            if !chunked {
                // A declared length over the limit is refused before
                // authentication and routing, on every route.
                assert_eq!(status, 413, "{} {} (cred {cred}): {v}", rp.method, rp.path);
                assert_eq!(v["code"], "PAYLOAD_TOO_LARGE", "{v}");
            } else {
                // A streamed body is cut by the extractor that reads it.
                assert!(
                    status == 413 || status < 500,
                    "{} {}: {status} {v}",
                    rp.method,
                    rp.path
                );
                if status == 413 {
                    assert_eq!(v["code"], "PAYLOAD_TOO_LARGE", "{v}");
                }
            }
        }
    }
}

#[tokio::test]
async fn oidc_static_public_keys_rsa_p256_p384() {
    let dir = tempfile::tempdir().expect("tmp");
    for (alg, kid) in [
        (Algorithm::RS256, "r"),
        (Algorithm::ES256, "e2"),
        (Algorithm::ES384, "e3"),
    ] {
        let k = make_key(dir.path(), kid, alg);
        let other = make_key(dir.path(), &format!("{kid}-other"), alg);
        let mut cfg = Config::default();
        cfg.auth.oidc_issuer = "https://idp.test".into();
        cfg.auth.oidc_audience = AUD.into();
        cfg.auth.oidc_public_key = String::from_utf8(k.public_pem.clone()).expect("pem");
        let s = start(cfg, Duration::from_secs(10)).await;
        let (st, v) = s
            .send(
                "GET",
                "/sandboxes",
                &Cred::Bearer(sign(&k, "any", &claims("pat", &[]))),
                &[],
                None,
            )
            .await;
        assert_eq!(st, 200, "{kid}: {v}");
        rejected(
            &s,
            &sign(&other, "any", &claims("pat", &[])),
            "signature verification failed",
        )
        .await;
        // Without any credential the OIDC-only server is closed.
        let (st, _) = s.send("GET", "/templates", &Cred::None, &[], None).await;
        assert_eq!(st, 401);
    }
}

#[tokio::test]
async fn lifecycle_audit_carries_actor_tenant_and_request_id() {
    let mut cfg = Config::default();
    cfg.auth.admin_api_key = Secret::new(ADMIN_KEY);
    let s = start(cfg, Duration::from_secs(10)).await;
    let acme = [
        ("X-Tenant-ID", "acme"),
        ("X-User-ID", "ops"),
        ("X-Request-ID", "req-lifecycle-1"),
    ];
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::AdminKey,
            &acme,
            Some(json!({"ttl":"1s"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let (st, v) = s
        .send(
            "POST",
            &format!("/sandboxes/{id}/extend"),
            &Cred::AdminKey,
            &acme,
            Some(json!({"ttl":"2s"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s
        .send(
            "POST",
            &format!("/sandboxes/{id}/exec"),
            &Cred::AdminKey,
            &acme,
            Some(json!({"command":"sh","args":["-c","exit 4"]})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (st, v) = s
        .send("DELETE", "/sandboxes", &Cred::AdminKey, &[], None)
        .await;
    assert_eq!(st, 200, "{v}");
    s.manager.flush_audit().await;
    let (st, v) = s
        .send(
            "GET",
            &format!("/admin/op-audit?sandbox_id={id}"),
            &Cred::AdminKey,
            &[],
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let rows = v.as_array().expect("rows");
    let find = |a: &str| {
        rows.iter()
            .find(|r| r["action"] == a)
            .unwrap_or_else(|| panic!("no {a} row in {v}"))
    };
    for a in ["sandbox.spawn", "sandbox.extend", "exec"] {
        let r = find(a);
        assert_eq!(r["tenant_id"], "acme", "{r}");
        assert_eq!(r["actor"], "admin-key:ops", "{r}");
        assert_eq!(r["request_id"], "req-lifecycle-1", "{r}");
    }
    assert!(find("exec")["detail"]
        .as_str()
        .expect("d")
        .contains("exit=4"));
    let d = find("sandbox.destroy");
    assert_eq!(d["actor"], "system:reaper", "{d}");
    assert_eq!(d["tenant_id"], "acme", "reaped rows keep the tenant: {d}");
}

#[tokio::test]
async fn websocket_origin_must_be_listed_and_admin_aliases_are_admin_only() {
    let mut cfg = Config::default();
    cfg.auth.api_key = Secret::new(API_KEY);
    cfg.auth.admin_api_key = Secret::new(ADMIN_KEY);
    cfg.server.cors_allowed_origins = vec!["https://app.example".into()];
    let s = start(cfg, Duration::from_secs(10)).await;
    let (st, v) = s
        .send("POST", "/sandboxes", &Cred::ApiKey, &[], Some(json!({})))
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let (st, v) = s
        .send(
            "GET",
            &format!("/sandboxes/{id}/exec/ws"),
            &Cred::ApiKey,
            &[("Origin", "https://evil.example")],
            None,
        )
        .await;
    assert_eq!(st, 403, "{v}");
    assert!(v["message"].as_str().expect("m").contains("origin"), "{v}");
    // A listed origin gets past the check (then needs an upgrade: 400).
    let (st, v) = s
        .send(
            "GET",
            &format!("/sandboxes/{id}/exec/ws"),
            &Cred::ApiKey,
            &[("Origin", "https://app.example")],
            None,
        )
        .await;
    assert_eq!(st, 400, "{v}");
    for path in ["/admin/quotas", "/admin/metrics", "/admin/diagnostics"] {
        let (st, _) = s.send("GET", path, &Cred::ApiKey, &[], None).await;
        assert_eq!(st, 403, "{path}");
        let (st, v) = s.send("GET", path, &Cred::AdminKey, &[], None).await;
        assert_eq!(st, 200, "{path}: {v}");
    }
    let (st, v) = s
        .send(
            "PUT",
            "/admin/quotas/zed",
            &Cred::AdminKey,
            &[],
            Some(json!({"max_sandboxes": 2})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s
        .send(
            "PUT",
            "/quotas/zed",
            &Cred::ApiKey,
            &[],
            Some(json!({"max_sandboxes": 9})),
        )
        .await;
    assert_eq!(st, 403, "quota writes are admin-only: {v}");
}

#[tokio::test]
async fn audit_retention_prunes_old_rows() {
    let mut cfg = Config::default();
    cfg.auth.admin_api_key = Secret::new(ADMIN_KEY);
    cfg.auth.admin_audit_retention = stacyvm_core::config::Dur::secs(1);
    let s = start(cfg, Duration::from_secs(10)).await;
    let (st, _) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::AdminKey,
            &[("X-Request-ID", "old-1")],
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 201);
    s.manager.flush_audit().await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (st, _) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::AdminKey,
            &[("X-Request-ID", "new-1")],
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 201);
    s.manager.flush_audit().await;
    let store = s.manager.store();
    let admin = store
        .list_admin_audit(&AdminAuditFilter::default())
        .await
        .expect("admin");
    assert!(admin.iter().all(|r| r.request_id != "old-1"), "{admin:?}");
    assert!(admin.iter().any(|r| r.request_id == "new-1"), "{admin:?}");
    let ops = store
        .list_op_audit(&stacyvm_core::store::OpAuditFilter::default())
        .await
        .expect("ops");
    assert!(ops.iter().all(|r| r.request_id != "old-1"), "{ops:?}");
}

#[tokio::test]
async fn jwks_http_errors_are_reported() {
    let jwks = jwks_server(vec![]).await;
    let dir = tempfile::tempdir().expect("tmp");
    let k = make_key(dir.path(), "k", Algorithm::ES256);
    let s = start(
        oidc_config(&format!("{}-missing", jwks.url)),
        Duration::from_secs(10),
    )
    .await;
    rejected(
        &s,
        &sign(&k, "k", &claims("a", &[])),
        "fetching JWKS: HTTP 404",
    )
    .await;
}

#[tokio::test]
async fn events_are_scoped_to_the_callers_tenant() {
    let mut cfg = Config::default();
    cfg.auth.admin_api_key = Secret::new(ADMIN_KEY);
    let s = start(cfg, Duration::from_secs(10)).await;
    let mut resp = s
        .http
        .get(format!("{}/events", s.base))
        .header("X-Admin-API-Key", ADMIN_KEY)
        .header("X-Tenant-ID", "acme")
        .send()
        .await
        .expect("sse");
    assert_eq!(resp.status(), 200);
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::AdminKey,
            &[("X-Tenant-ID", "acme")],
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let mine = v["id"].as_str().expect("id").to_string();
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::AdminKey,
            &[("X-Tenant-ID", "globex")],
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let theirs = v["id"].as_str().expect("id").to_string();
    for id in [&theirs, &mine] {
        let (st, _) = s
            .send(
                "DELETE",
                &format!("/sandboxes/{id}"),
                &Cred::AdminKey,
                &[],
                None,
            )
            .await;
        assert_eq!(st, 200);
    }
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !text.contains(&format!("\"sandbox.destroyed\",\"sandbox_id\":\"{mine}\"")) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(c))) => text.push_str(&String::from_utf8_lossy(&c)),
            _ => break,
        }
    }
    assert!(
        text.contains(&format!("\"sandbox.created\",\"sandbox_id\":\"{mine}\"")),
        "{text}"
    );
    assert!(
        text.contains(&format!("\"sandbox.destroyed\",\"sandbox_id\":\"{mine}\"")),
        "{text}"
    );
    assert!(!text.contains(&theirs), "other tenant leaked: {text}");
}

#[tokio::test]
async fn api_key_may_be_barred_from_naming_users() {
    let mut cfg = Config::default();
    cfg.auth.api_key = Secret::new(API_KEY);
    cfg.auth.admin_api_key = Secret::new(ADMIN_KEY);
    cfg.auth.api_key_acts_for_users = false;
    let s = start(cfg, Duration::from_secs(10)).await;
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::ApiKey,
            &[("X-User-ID", "eve")],
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["message"]
            .as_str()
            .expect("m")
            .contains("api_key_acts_for_users"),
        "{v}"
    );
    let (st, v) = s
        .send("POST", "/sandboxes", &Cred::ApiKey, &[], Some(json!({})))
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::AdminKey,
            &[("X-User-ID", "eve")],
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["owner_id"], "eve");
    // F-14: the body's owner_id is no way around it (403, nothing made),
    // for the API key and for an OIDC-like caller alike.
    let before = s
        .manager
        .list(&stacyvm_core::manager::Caller::default())
        .await
        .expect("list")
        .len();
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::ApiKey,
            &[],
            Some(json!({"owner_id": "alice"})),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    assert!(
        v["message"].as_str().expect("m").contains("owner_id"),
        "{v}"
    );
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes/admission",
            &Cred::ApiKey,
            &[],
            Some(json!({"owner_id": "alice"})),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    let after = s
        .manager
        .list(&stacyvm_core::manager::Caller::default())
        .await
        .expect("list")
        .len();
    assert_eq!(before, after);
    // The admin key may still name the owner in the body.
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::AdminKey,
            &[],
            Some(json!({"owner_id": "alice"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["owner_id"], "alice");
}

/// Reads an SSE response for `wait`, returning what arrived.
async fn read_sse(resp: &mut reqwest::Response, wait: Duration) -> String {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(c))) => text.push_str(&String::from_utf8_lossy(&c)),
            _ => return text,
        }
    }
}

async fn sse(s: &Server, cred: &Cred, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut rb = s.http.get(format!("{}/events", s.base));
    rb = match cred {
        Cred::ApiKey => rb.header("X-API-Key", API_KEY),
        Cred::AdminKey => rb.header("X-Admin-API-Key", ADMIN_KEY),
        Cred::Bearer(t) => rb.header("Authorization", format!("Bearer {t}")),
        Cred::None => rb,
    };
    for (k, v) in extra {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.expect("sse");
    assert_eq!(r.status(), 200);
    r
}

/// F-6: a caller without a tenant is in a tenant of its own, and inside a
/// tenant viewers and api callers only reach what they own: list, get,
/// exec, files and the exec command lines on `/events`.
#[tokio::test]
async fn no_tenant_is_a_tenant_and_owners_are_scoped_inside_one() {
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let jwks = jwks_server(vec![rsa.jwk.clone()]).await;
    let mut cfg = oidc_config(&jwks.url);
    cfg.auth.oidc_tenant_claim = "tenant".into();
    let s = start(cfg, Duration::from_secs(10)).await;
    let token = |sub: &str, tenant: Option<&str>, groups: &[&str]| {
        let mut c = claims(sub, groups);
        if let Some(t) = tenant {
            c["tenant"] = json!(t);
        }
        Cred::Bearer(sign(&rsa, "rsa1", &c))
    };
    let alice = token("alice", Some("acme"), &[]);
    let carol = token("carol", Some("acme"), &[]);
    let oscar = token("oscar", Some("acme"), &["ops"]);
    let bob = token("bob", None, &[]);
    let (st, v) = s
        .send("POST", "/sandboxes", &alice, &[], Some(json!({})))
        .await;
    assert_eq!(st, 201, "{v}");
    let a = v["id"].as_str().expect("id").to_string();
    let (st, v) = s
        .send("POST", "/sandboxes", &bob, &[], Some(json!({})))
        .await;
    assert_eq!(st, 201, "{v}");
    let b = v["id"].as_str().expect("id").to_string();

    let mut bob_events = sse(&s, &bob, &[]).await;
    let mut key_events = sse(&s, &Cred::ApiKey, &[]).await;
    let mut carol_events = sse(&s, &carol, &[]).await;
    let mut alice_events = sse(&s, &alice, &[]).await;
    let mut oscar_events = sse(&s, &oscar, &[]).await;
    let (st, v) = s
        .send(
            "POST",
            &format!("/sandboxes/{a}/exec"),
            &alice,
            &[],
            Some(json!({"command": "echo TOP-SECRET-ARGV"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");

    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("list")
            .iter()
            .filter_map(|x| x["id"].as_str().map(str::to_string))
            .collect()
    };
    let file = format!("/sandboxes/{a}/files?path=/etc/hostname");
    let exec = format!("/sandboxes/{a}/exec");
    let get = format!("/sandboxes/{a}");
    // Bob (no tenant claim), the API key (no X-Tenant-ID) and Carol (same
    // tenant, another owner) reach nothing of Alice's.
    for (who, cred) in [("bob", &bob), ("api key", &Cred::ApiKey), ("carol", &carol)] {
        let (st, v) = s.send("GET", "/sandboxes", cred, &[], None).await;
        assert_eq!(st, 200, "{who}");
        assert!(!ids(&v).contains(&a), "{who} lists {a}: {v}");
        let (st, _) = s.send("GET", &get, cred, &[], None).await;
        assert_eq!(st, 404, "{who} get");
        let (st, _) = s
            .send("POST", &exec, cred, &[], Some(json!({"command": "id"})))
            .await;
        assert_eq!(st, 404, "{who} exec");
        let (st, _) = s.send("GET", &file, cred, &[], None).await;
        assert_eq!(st, 404, "{who} files");
        let (st, _) = s.send("DELETE", &get, cred, &[], None).await;
        assert_eq!(st, 404, "{who} destroy");
    }
    // The API key acting for a member of acme (X-Tenant-ID) is scoped to
    // that member's sandboxes too.
    s.manager
        .store()
        .upsert_tenant_member(&TenantMemberRecord {
            tenant_id: "acme".into(),
            user_id: "carl".into(),
            role: "operator".into(),
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        })
        .await
        .expect("member");
    let carl = [("X-User-ID", "carl"), ("X-Tenant-ID", "acme")];
    let (st, v) = s
        .send("GET", "/sandboxes", &Cred::ApiKey, &carl, None)
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(ids(&v).is_empty(), "{v}");
    let (st, _) = s.send("GET", &get, &Cred::ApiKey, &carl, None).await;
    assert_eq!(st, 404);
    let (st, _) = s
        .send(
            "POST",
            &exec,
            &Cred::ApiKey,
            &carl,
            Some(json!({"command": "id"})),
        )
        .await;
    assert_eq!(st, 404);
    // The admin key in acme reaches it.
    let (st, _) = s
        .send(
            "GET",
            &get,
            &Cred::AdminKey,
            &[("X-Tenant-ID", "acme")],
            None,
        )
        .await;
    assert_eq!(st, 200);
    // Bob sees his own sandbox; the service API key without a tenant sees
    // the sandboxes without a tenant.
    let (_, v) = s.send("GET", "/sandboxes", &bob, &[], None).await;
    assert_eq!(ids(&v), vec![b.clone()]);
    let (_, v) = s.send("GET", "/sandboxes", &Cred::ApiKey, &[], None).await;
    assert_eq!(ids(&v), vec![b.clone()]);
    // Alice and an operator of her tenant reach it; the admin sees all.
    let (_, v) = s.send("GET", "/sandboxes", &alice, &[], None).await;
    assert_eq!(ids(&v), vec![a.clone()]);
    let (_, v) = s.send("GET", "/sandboxes", &oscar, &[], None).await;
    assert_eq!(ids(&v), vec![a.clone()]);
    let (st, _) = s.send("GET", &get, &oscar, &[], None).await;
    assert_eq!(st, 200);
    let (_, v) = s
        .send("GET", "/sandboxes", &Cred::AdminKey, &[], None)
        .await;
    assert_eq!(ids(&v).len(), 2, "{v}");

    // The exec command line only reaches callers who see the sandbox.
    let wait = Duration::from_millis(700);
    let alice_text = read_sse(&mut alice_events, wait).await;
    assert!(alice_text.contains("TOP-SECRET-ARGV"), "{alice_text}");
    assert!(read_sse(&mut oscar_events, wait)
        .await
        .contains("TOP-SECRET-ARGV"));
    for (who, stream) in [
        ("bob", &mut bob_events),
        ("api key", &mut key_events),
        ("carol", &mut carol_events),
    ] {
        let text = read_sse(stream, wait).await;
        assert!(!text.contains("TOP-SECRET-ARGV"), "{who}: {text}");
        assert!(!text.contains(&a), "{who}: {text}");
    }
}

/// `auth.owner_scoping: false` lets every member of a tenant reach the
/// tenant's sandboxes (tenancy still holds).
#[tokio::test]
async fn owner_scoping_can_be_switched_off() {
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let jwks = jwks_server(vec![rsa.jwk.clone()]).await;
    let mut cfg = oidc_config(&jwks.url);
    cfg.auth.oidc_tenant_claim = "tenant".into();
    cfg.auth.owner_scoping = false;
    let s = start(cfg, Duration::from_secs(10)).await;
    let token = |sub: &str, tenant: Option<&str>| {
        let mut c = claims(sub, &[]);
        if let Some(t) = tenant {
            c["tenant"] = json!(t);
        }
        Cred::Bearer(sign(&rsa, "rsa1", &c))
    };
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &token("alice", Some("acme")),
            &[],
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let a = v["id"].as_str().expect("id").to_string();
    let (st, _) = s
        .send(
            "GET",
            &format!("/sandboxes/{a}"),
            &token("carol", Some("acme")),
            &[],
            None,
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = s
        .send(
            "GET",
            &format!("/sandboxes/{a}"),
            &token("bob", None),
            &[],
            None,
        )
        .await;
    assert_eq!(st, 404);
}

/// An open server (no credential) is on loopback; a web page that rebinds
/// its own name to 127.0.0.1, or posts cross-origin, gets nothing.
#[tokio::test]
async fn open_server_refuses_foreign_hosts_and_cross_origin_requests() {
    let s = start(Config::default(), Duration::from_secs(10)).await;
    let port = s
        .base
        .split(':')
        .nth(2)
        .and_then(|p| p.split('/').next())
        .expect("port");
    let req = |host: String| {
        s.http
            .get(format!("{}/sandboxes", s.base))
            .header("Host", host)
            .send()
    };
    for ok in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "LOCALHOST".to_string(),
        format!("[::1]:{port}"),
    ] {
        let r = req(ok.clone()).await.expect("send");
        assert_eq!(r.status(), 200, "{ok}");
    }
    for bad in [
        format!("evil.example:{port}"),
        "rebind.attacker.test".to_string(),
        format!("127.0.0.1.nip.io:{port}"),
        format!("localhost.evil:{port}"),
    ] {
        let r = req(bad.clone()).await.expect("send");
        assert_eq!(r.status(), 421, "{bad}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["code"], "MISDIRECTED_REQUEST", "{v}");
    }
    // A simple cross-origin POST (no preflight) does not spawn.
    let r = s
        .http
        .post(format!("{}/sandboxes", s.base))
        .header("Origin", "https://evil.example")
        .header("Content-Type", "text/plain")
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let pre = s
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/sandboxes", s.base))
        .header("Origin", "https://evil.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .expect("send");
    assert_eq!(pre.status(), 403);
    assert!(s
        .manager
        .list(&stacyvm_core::manager::Caller::default())
        .await
        .expect("list")
        .is_empty());
    // Non-browser clients (no Origin) work as in the quickstart.
    let (st, v) = s
        .send("POST", "/sandboxes", &Cred::None, &[], Some(json!({})))
        .await;
    assert_eq!(st, 201, "{v}");

    // With a credential the server listens everywhere and any Host works.
    let mut cfg = Config::default();
    cfg.auth.api_key = Secret::new(API_KEY);
    let s = start(cfg, Duration::from_secs(10)).await;
    let r = s
        .http
        .get(format!("{}/sandboxes", s.base))
        .header("Host", "api.example.com")
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
}

/// F-13: the bucket is the credential that authenticated, not whatever
/// the caller puts in `X-API-Key`.
#[tokio::test]
async fn rate_limit_keys_on_the_credential_that_authenticated() {
    for key_by in ["owner", "api_key"] {
        let mut cfg = Config::default();
        cfg.auth.api_key = Secret::new(API_KEY);
        cfg.auth.admin_api_key = Secret::new(ADMIN_KEY);
        cfg.rate_limit.enabled = true;
        cfg.rate_limit.requests_per_minute = 1;
        cfg.rate_limit.burst = 1;
        cfg.rate_limit.key_by = key_by.into();
        let s = start(cfg, Duration::from_secs(10)).await;
        let mut codes = Vec::new();
        for i in 0..10 {
            // The valid key in X-Admin-API-Key, a fresh junk X-API-Key.
            let r = s
                .http
                .get(format!("{}/sandboxes", s.base))
                .header("X-Admin-API-Key", API_KEY)
                .header("X-API-Key", format!("junk-{i}"))
                .send()
                .await
                .expect("send");
            codes.push(r.status().as_u16());
        }
        assert_eq!(codes[0], 200, "{key_by}: {codes:?}");
        assert!(codes[1..].iter().all(|c| *c == 429), "{key_by}: {codes:?}");
        // The admin key is another credential with its own bucket.
        let (st, _) = s
            .send("GET", "/sandboxes", &Cred::AdminKey, &[], None)
            .await;
        assert_eq!(st, 200, "{key_by}");
    }
    // OIDC: one bucket per subject, whatever else the request carries.
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let jwks = jwks_server(vec![rsa.jwk.clone()]).await;
    let mut cfg = oidc_config(&jwks.url);
    cfg.rate_limit.enabled = true;
    cfg.rate_limit.requests_per_minute = 1;
    cfg.rate_limit.burst = 1;
    let s = start(cfg, Duration::from_secs(10)).await;
    let erin = Cred::Bearer(sign(&rsa, "rsa1", &claims("erin", &[])));
    let (st, _) = s
        .send("GET", "/sandboxes", &erin, &[("X-API-Key", "a")], None)
        .await;
    assert_eq!(st, 200);
    let (st, _) = s
        .send("GET", "/sandboxes", &erin, &[("X-API-Key", "b")], None)
        .await;
    assert_eq!(st, 429);
    let fred = Cred::Bearer(sign(&rsa, "rsa1", &claims("fred", &[])));
    let (st, _) = s.send("GET", "/sandboxes", &fred, &[], None).await;
    assert_eq!(st, 200);
}

/// F-8.2: 10,000 unauthenticated requests with long paths from 10,000
/// addresses leave a bounded number of short audit rows.
#[tokio::test]
async fn unauthenticated_floods_keep_the_audit_log_bounded() {
    use futures::StreamExt as _;
    let mut cfg = Config::default();
    cfg.auth.api_key = Secret::new(API_KEY);
    // The test client is a trusted proxy, so every request may come from
    // its own address (the worst case for per-address limits).
    cfg.server.trusted_proxies = vec!["127.0.0.1".into()];
    let s = start(cfg, Duration::from_secs(10)).await;
    let long = "a".repeat(8000);
    let t0 = std::time::Instant::now();
    let codes: Vec<u16> = futures::stream::iter(0..10_000u32)
        .map(|i| {
            let url = format!("{}/sandboxes/{long}{i}", s.base);
            let xff = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
            let http = s.http.clone();
            async move {
                http.get(url)
                    .header("X-Forwarded-For", xff)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(codes.iter().all(|c| *c == 401), "{:?}", &codes[..20]);
    // The row budget: 120 at once, then 2 a second (plus as many rows
    // summarising what was skipped).
    let budget = 121 + 2 * t0.elapsed().as_secs() as usize;
    let rows = s
        .manager
        .store()
        .list_admin_audit(&AdminAuditFilter {
            limit: 500,
            ..AdminAuditFilter::default()
        })
        .await
        .expect("audit");
    assert!(
        rows.len() <= 2 * budget,
        "{} rows, budget {budget}",
        rows.len()
    );
    assert!(rows.len() < 1000, "{} rows", rows.len());
    assert!(rows.iter().all(|r| r.path.len() <= 2048), "paths are cut");
    assert!(rows.iter().any(|r| r.path.ends_with('…')));
    // Past the row budget the rest is counted, and said so in one row.
    let (st, _) = s.send("GET", "/sandboxes", &Cred::None, &[], None).await;
    assert_eq!(st, 401);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (st, _) = s.send("GET", "/sandboxes", &Cred::None, &[], None).await;
    assert_eq!(st, 401);
    let rows = s
        .manager
        .store()
        .list_admin_audit(&AdminAuditFilter {
            actor: "audit:suppressed".into(),
            ..AdminAuditFilter::default()
        })
        .await
        .expect("audit");
    assert!(!rows.is_empty());
    assert!(rows[0].path.contains("were not recorded"), "{rows:?}");
    // One address alone is limited sooner: 429 and no row at all.
    let mut codes = Vec::new();
    for _ in 0..40 {
        codes.push(s.send("GET", "/sandboxes", &Cred::None, &[], None).await.0);
    }
    assert!(codes.contains(&429), "{codes:?}");
}

/// F-8.3/8.4: the reaper deletes exec logs, audit rows and destroyed
/// sandboxes past their retention (all on by default).
#[tokio::test]
async fn reaper_applies_retention_to_exec_logs_audit_and_destroyed_sandboxes() {
    let d = Config::default();
    assert!(!d.database.exec_log_retention.is_zero());
    assert!(!d.database.sandbox_retention.is_zero());
    assert!(!d.auth.admin_audit_retention.is_zero());
    let mut cfg = Config::default();
    cfg.auth.admin_api_key = Secret::new(ADMIN_KEY);
    cfg.database.exec_log_retention = stacyvm_core::config::Dur::secs(1);
    cfg.database.sandbox_retention = stacyvm_core::config::Dur::secs(1);
    cfg.auth.admin_audit_retention = stacyvm_core::config::Dur::secs(1);
    let s = start(cfg, Duration::from_secs(10)).await;
    let (st, v) = s
        .send("POST", "/sandboxes", &Cred::AdminKey, &[], Some(json!({})))
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    for i in 0..3 {
        let (st, v) = s
            .send(
                "POST",
                &format!("/sandboxes/{id}/exec"),
                &Cred::AdminKey,
                &[],
                Some(json!({"command": format!("echo {i}")})),
            )
            .await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, _) = s
        .send(
            "DELETE",
            &format!("/sandboxes/{id}"),
            &Cred::AdminKey,
            &[],
            None,
        )
        .await;
    assert_eq!(st, 200);
    s.manager.flush_audit().await;
    let store = s.manager.store().clone();
    assert_eq!(store.list_exec_logs(&id, 10).await.expect("logs").len(), 3);
    assert!(store.get_sandbox(&id).await.is_ok());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let reaper = s.manager.start_reaper(Duration::from_millis(100));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store.get_sandbox(&id).await.is_ok() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reaper.abort();
    assert!(
        store.get_sandbox(&id).await.is_err(),
        "destroyed row pruned"
    );
    assert!(store
        .list_exec_logs(&id, 10)
        .await
        .expect("logs")
        .is_empty());
    let ops = store
        .list_op_audit(&stacyvm_core::store::OpAuditFilter::default())
        .await
        .expect("ops");
    assert!(ops.is_empty(), "{ops:?}");
    let admin = store
        .list_admin_audit(&AdminAuditFilter::default())
        .await
        .expect("admin");
    assert!(admin.is_empty(), "{admin:?}");
}

/// F-17: the operation audit keeps only a short prefix of an exec's
/// command line.
#[tokio::test]
async fn op_audit_keeps_a_truncated_exec_command() {
    let s = start(Config::default(), Duration::from_secs(10)).await;
    let (st, v) = s
        .send("POST", "/sandboxes", &Cred::None, &[], Some(json!({})))
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let cmd = format!("echo {}", "S".repeat(5000));
    let (st, v) = s
        .send(
            "POST",
            &format!("/sandboxes/{id}/exec"),
            &Cred::None,
            &[],
            Some(json!({ "command": cmd })),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    s.manager.flush_audit().await;
    let rows = s
        .manager
        .store()
        .list_op_audit(&stacyvm_core::store::OpAuditFilter {
            action: "exec".into(),
            ..Default::default()
        })
        .await
        .expect("ops");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(rows[0].resource.starts_with("echo SSS"));
    assert!(
        rows[0].resource.chars().count() <= 256,
        "{}",
        rows[0].resource.len()
    );
}

/// F-18: a slow JWKS fetch (an unknown `kid`) does not hold up tokens
/// whose key is cached; oversized documents and redirects are refused.
#[tokio::test]
async fn jwks_fetch_is_single_flight_bounded_and_never_redirected() {
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let set = json!({ "keys": [rsa.jwk.clone()] });
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hits = Arc::new(AtomicUsize::new(0));
    let (s2, slow2, hits2) = (set.clone(), slow.clone(), hits.clone());
    let app = axum::Router::new()
        .route(
            "/jwks",
            axum::routing::get(move || {
                let (s, slow, hits) = (s2.clone(), slow2.clone(), hits2.clone());
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    if slow.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    axum::Json(s)
                }
            }),
        )
        .route(
            "/big",
            axum::routing::get(|| async {
                format!("{{\"keys\":[],\"pad\":\"{}\"}}", "x".repeat(2 << 20))
            }),
        )
        .route(
            "/redirect",
            axum::routing::get(|| async {
                (
                    axum::http::StatusCode::FOUND,
                    [(axum::http::header::LOCATION, "/jwks")],
                )
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });

    let s = start(
        oidc_config(&format!("{base}/jwks")),
        Duration::from_millis(0),
    )
    .await;
    let good = Cred::Bearer(sign(&rsa, "rsa1", &claims("gina", &[])));
    let (st, _) = s.send("GET", "/sandboxes", &good, &[], None).await;
    assert_eq!(st, 200);
    slow.store(true, Ordering::SeqCst);
    let unknown = Cred::Bearer(sign(&rsa, "nope", &claims("gina", &[])));
    let stalled = {
        let (http, base) = (s.http.clone(), s.base.clone());
        let Cred::Bearer(t) = unknown else {
            unreachable!()
        };
        tokio::spawn(async move {
            http.get(format!("{base}/sandboxes"))
                .bearer_auth(t)
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = std::time::Instant::now();
    let (st, _) = s.send("GET", "/sandboxes", &good, &[], None).await;
    assert_eq!(st, 200);
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "a cached key waited {:?} for the JWKS fetch",
        t0.elapsed()
    );
    // A second unknown kid while the fetch is in flight waits for it and
    // does not start another one.
    let (st, _) = s
        .send(
            "GET",
            "/sandboxes",
            &Cred::Bearer(sign(&rsa, "nope2", &claims("gina", &[]))),
            &[],
            None,
        )
        .await;
    assert_eq!(st, 401);
    assert_eq!(stalled.await.expect("join").expect("send"), 401);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "one initial fetch, one refetch"
    );

    for (path, why) in [("/big", "larger than"), ("/redirect", "HTTP 302")] {
        let s = start(
            oidc_config(&format!("{base}{path}")),
            Duration::from_secs(10),
        )
        .await;
        rejected(&s, &sign(&rsa, "rsa1", &claims("gina", &[])), why).await;
    }
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// F-10: concurrent execs over the per-sandbox and per-credential caps get
/// a typed 429, slots come back when execs end, and 20 parallel
/// maximum-output execs keep the server's memory bounded.
#[tokio::test]
async fn concurrent_execs_over_the_caps_get_429_and_memory_stays_bounded() {
    let mut cfg = Config::default();
    cfg.limits.max_active_per_sandbox = 3;
    let s = start(cfg, Duration::from_secs(10)).await;
    let (st, v) = s
        .send("POST", "/sandboxes", &Cred::None, &[], Some(json!({})))
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let exec = |cmd: &'static str| {
        let (http, url) = (s.http.clone(), format!("{}/sandboxes/{id}/exec", s.base));
        tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({ "command": cmd }))
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .expect("send");
            let st = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (st, v)
        })
    };
    let running: Vec<_> = (0..8).map(|_| exec("sleep 1")).collect();
    let mut codes = Vec::new();
    for h in running {
        let (st, v) = h.await.expect("join");
        if st == 429 {
            assert_eq!(v["code"], "RESOURCE_LIMIT", "{v}");
            assert!(
                v["message"]
                    .as_str()
                    .expect("m")
                    .contains("max_active_per_sandbox"),
                "{v}"
            );
        }
        codes.push(st);
    }
    codes.sort_unstable();
    assert_eq!(codes, vec![200, 200, 200, 429, 429, 429, 429, 429]);
    let (st, _) = exec("true").await.expect("join");
    assert_eq!(st, 200, "slots are released when execs end");
    assert_eq!(s.manager.store().ping().await.ok(), Some(()));

    // 20 parallel execs that each print 8 MiB of NUL bytes to stdout and
    // to stderr (JSON-escaped six-fold): the per-credential cap admits 8
    // and limits.exec_output_bytes (1 MiB) bounds what each one holds.
    let mut cfg = Config::default();
    cfg.limits.max_active_per_credential = 8;
    let s = start(cfg, Duration::from_secs(10)).await;
    let (st, v) = s
        .send("POST", "/sandboxes", &Cred::None, &[], Some(json!({})))
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let before = vm_hwm_kib();
    let big = "head -c 8388608 /dev/zero; head -c 8388608 /dev/zero >&2; sleep 1";
    let running: Vec<_> = (0..20)
        .map(|_| {
            let (http, url) = (s.http.clone(), format!("{}/sandboxes/{id}/exec", s.base));
            tokio::spawn(async move {
                let r = http
                    .post(url)
                    .json(&json!({ "command": big }))
                    .timeout(Duration::from_secs(120))
                    .send()
                    .await
                    .expect("send");
                let st = r.status().as_u16();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                let out = v["stdout"].as_str().map_or(0, str::len);
                (st, out)
            })
        })
        .collect();
    let mut ok = 0;
    let mut limited = 0;
    for h in running {
        match h.await.expect("join") {
            (200, out) => {
                ok += 1;
                assert_eq!(out, 1024 * 1024, "stdout cut at limits.exec_output_bytes");
            }
            (429, _) => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((ok, limited), (8, 12));
    let grown_mib = vm_hwm_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 400, "peak RSS grew by {grown_mib} MiB");
}

/// F-17: provider details, quotas and admission counts are server-wide
/// facts for the admin (and global operators) only.
#[tokio::test]
async fn provider_config_quotas_and_global_counts_are_admin_only() {
    let mut cfg = Config::default();
    cfg.auth.api_key = Secret::new(API_KEY);
    cfg.auth.admin_api_key = Secret::new(ADMIN_KEY);
    let s = start(cfg, Duration::from_secs(10)).await;
    for owner in ["ann", "bob"] {
        let (st, v) = s
            .send(
                "POST",
                "/sandboxes",
                &Cred::AdminKey,
                &[("X-User-ID", owner)],
                Some(json!({})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
        let (st, v) = s
            .send(
                "PUT",
                &format!("/quotas/{owner}"),
                &Cred::AdminKey,
                &[],
                Some(json!({"max_sandboxes": 5})),
            )
            .await;
        assert_eq!(st, 200, "{v}");
    }
    let ann = [("X-User-ID", "ann")];
    // Provider details: no host paths for the API key, all for the admin.
    let (st, v) = s
        .send("GET", "/providers/mock", &Cred::ApiKey, &ann, None)
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(
        !v.to_string().contains(s._dir.path().to_str().expect("p")),
        "{v}"
    );
    assert_eq!(v["config"], json!({}), "{v}");
    assert_eq!(v["sandbox_count"], 1, "only ann's own: {v}");
    let (_, v) = s
        .send("GET", "/providers/mock", &Cred::AdminKey, &[], None)
        .await;
    assert!(v["config"]["base_dir"].is_string(), "{v}");
    assert_eq!(v["sandbox_count"], 2, "{v}");
    // Quotas: ann sees her own, not bob's.
    let (st, v) = s.send("GET", "/quotas", &Cred::ApiKey, &ann, None).await;
    assert_eq!(st, 200);
    let owners: Vec<&str> = v
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|q| q["owner_id"].as_str())
        .collect();
    assert_eq!(owners, vec!["ann"], "{v}");
    let (_, v) = s
        .send("GET", "/quotas/summary", &Cred::ApiKey, &ann, None)
        .await;
    assert_eq!(v["total"], 1, "{v}");
    for path in ["/quotas/bob", "/quotas/bob/usage"] {
        let (st, _) = s.send("GET", path, &Cred::ApiKey, &ann, None).await;
        assert_eq!(st, 404, "{path}");
        let (st, _) = s.send("GET", path, &Cred::AdminKey, &[], None).await;
        assert_eq!(st, 200, "{path}");
    }
    let (st, v) = s
        .send("GET", "/quotas/ann/usage", &Cred::ApiKey, &ann, None)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["active_sandboxes"], 1);
    let (_, v) = s.send("GET", "/quotas", &Cred::AdminKey, &[], None).await;
    assert_eq!(v.as_array().expect("list").len(), 2);
    // Admission: no global counts for the API key.
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes/admission",
            &Cred::ApiKey,
            &ann,
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["active_sandboxes"], 0, "{v}");
    assert_eq!(v["active_owner_sandboxes"], 1, "{v}");
    let (_, v) = s
        .send(
            "POST",
            "/sandboxes/admission",
            &Cred::AdminKey,
            &[],
            Some(json!({})),
        )
        .await;
    assert_eq!(v["active_sandboxes"], 2, "{v}");
    // A failed health check names host paths: only the admin reads them.
    let base = s._dir.path().join("mock");
    let moved = s._dir.path().join("mock-away");
    std::fs::rename(&base, &moved).expect("hide mock base");
    // Health results are cached for 2 s.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let dir = s._dir.path().to_str().expect("p").to_string();
    for path in ["/providers", "/providers/mock"] {
        let (st, v) = s.send("GET", path, &Cred::ApiKey, &ann, None).await;
        assert_eq!(st, 200, "{v}");
        assert!(!v.to_string().contains(&dir), "{path}: {v}");
        assert!(v.to_string().contains("unhealthy"), "{path}: {v}");
        let (_, v) = s.send("GET", path, &Cred::AdminKey, &[], None).await;
        assert!(v.to_string().contains(&dir), "{path}: {v}");
    }
    std::fs::rename(&moved, &base).expect("restore mock base");
}

/// Snapshots of sandboxes and forks follow the rules of sandboxes: a
/// snapshot belongs to its sandbox's tenant and owner; others in the
/// tenant with the owner scope, and other tenants, see no such snapshot
/// (list, get, spawn from, delete: 404), an operator sees the tenant's.
/// A child starts with the source's files and gets the snapshot's image;
/// naming another is a 400. A fork starts N children, all or none, and
/// drops its snapshot unless asked to keep it. The per-owner limit is a
/// 429; snapshot and delete are audited. The mock provider stands in for a
/// provider that snapshots (qemu has its own tests for the machine state).
#[tokio::test]
async fn snapshots_and_forks_follow_tenancy_limits_and_audit() {
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let jwks = jwks_server(vec![rsa.jwk.clone()]).await;
    let mut cfg = oidc_config(&jwks.url);
    cfg.auth.oidc_tenant_claim = "tenant".into();
    cfg.defaults.max_snapshots_per_owner = 3;
    let s = start(cfg, Duration::from_secs(10)).await;
    let token = |sub: &str, tenant: Option<&str>, groups: &[&str]| {
        let mut c = claims(sub, groups);
        if let Some(t) = tenant {
            c["tenant"] = json!(t);
        }
        Cred::Bearer(sign(&rsa, "rsa1", &c))
    };
    let alice = token("alice", Some("acme"), &[]);
    let carol = token("carol", Some("acme"), &[]);
    let oscar = token("oscar", Some("acme"), &["ops"]);
    let bob = token("bob", None, &[]);

    let (st, v) = s
        .send("POST", "/sandboxes", &alice, &[], Some(json!({})))
        .await;
    assert_eq!(st, 201, "{v}");
    let a = v["id"].as_str().expect("id").to_string();
    let (st, v) = s
        .send(
            "POST",
            &format!("/sandboxes/{a}/files"),
            &alice,
            &[],
            Some(json!({"path": "/workspace/f", "content": "alpha"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");

    let (st, v) = s
        .send(
            "POST",
            &format!("/sandboxes/{a}/snapshot"),
            &alice,
            &[],
            None,
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let snap = v["id"].as_str().expect("snapshot id").to_string();
    assert!(snap.starts_with("snap-"), "{v}");
    assert_eq!(v["source_sandbox_id"], a.as_str(), "{v}");
    assert_eq!(v["owner_id"], "alice", "{v}");
    assert_eq!(v["provider"], "mock", "{v}");

    let listed = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("list")
            .iter()
            .filter_map(|x| x["id"].as_str().map(str::to_string))
            .collect()
    };
    for (who, cred, sees) in [
        ("alice", &alice, true),
        ("oscar", &oscar, true),
        ("carol", &carol, false),
        ("bob", &bob, false),
    ] {
        let (st, v) = s.send("GET", "/snapshots", cred, &[], None).await;
        assert_eq!(st, 200, "{who}: {v}");
        assert_eq!(listed(&v).contains(&snap), sees, "{who} lists: {v}");
        let (st, v) = s
            .send("GET", &format!("/snapshots/{snap}"), cred, &[], None)
            .await;
        assert_eq!(st, if sees { 200 } else { 404 }, "{who} gets: {v}");
        if !sees {
            let (st, v) = s
                .send(
                    "POST",
                    "/sandboxes",
                    cred,
                    &[],
                    Some(json!({"snapshot": snap})),
                )
                .await;
            assert_eq!(st, 404, "{who} spawns from it: {v}");
            let (st, v) = s
                .send("DELETE", &format!("/snapshots/{snap}"), cred, &[], None)
                .await;
            assert_eq!(st, 404, "{who} deletes it: {v}");
            let (st, v) = s
                .send("POST", &format!("/sandboxes/{a}/snapshot"), cred, &[], None)
                .await;
            assert_eq!(st, 404, "{who} snapshots another's sandbox: {v}");
        }
    }

    // A child has the source's files; it cannot change what the snapshot is.
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &alice,
            &[],
            Some(json!({"snapshot": snap})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let child = v["id"].as_str().expect("id").to_string();
    let body = s
        .http
        .get(format!(
            "{}/sandboxes/{child}/files?path=/workspace/f",
            s.base
        ))
        .bearer_auth(match &alice {
            Cred::Bearer(t) => t.clone(),
            _ => unreachable!(),
        })
        .send()
        .await
        .expect("read")
        .text()
        .await
        .expect("body");
    assert_eq!(body, "alpha");
    for bad in [
        json!({"snapshot": snap, "image": "other:1"}),
        json!({"snapshot": snap, "memory_mb": 4096}),
        json!({"snapshot": snap, "template": "t"}),
    ] {
        let (st, v) = s
            .send("POST", "/sandboxes", &alice, &[], Some(bad.clone()))
            .await;
        assert_eq!(st, 400, "{bad}: {v}");
    }
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &alice,
            &[],
            Some(json!({"snapshot": "snap-0000000000000000"})),
        )
        .await;
    assert_eq!(st, 404, "{v}");

    // Fork: N children, the snapshot gone unless kept.
    let (st, v) = s
        .send(
            "POST",
            &format!("/sandboxes/{a}/fork"),
            &alice,
            &[],
            Some(json!({"count": 2})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["sandboxes"].as_array().map(Vec::len), Some(2), "{v}");
    assert!(v.get("snapshot").is_none(), "{v}");
    let (_, v) = s.send("GET", "/snapshots", &alice, &[], None).await;
    assert_eq!(
        listed(&v),
        std::slice::from_ref(&snap),
        "the fork's snapshot is gone: {v}"
    );
    for bad in [
        json!({"count": 17}),
        json!({"count": -1}),
        json!({"ttl": "soon"}),
    ] {
        let (st, v) = s
            .send(
                "POST",
                &format!("/sandboxes/{a}/fork"),
                &alice,
                &[],
                Some(bad.clone()),
            )
            .await;
        assert_eq!(st, 400, "{bad}: {v}");
    }
    let (st, v) = s
        .send(
            "POST",
            &format!("/sandboxes/{a}/fork"),
            &alice,
            &[],
            Some(json!({"keep_snapshot": true})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert!(
        v["snapshot"]["id"]
            .as_str()
            .is_some_and(|i| i.starts_with("snap-")),
        "{v}"
    );

    // The limit (3 per owner): two kept so far, one more fits.
    let (st, v) = s
        .send(
            "POST",
            &format!("/sandboxes/{a}/snapshot"),
            &alice,
            &[],
            None,
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = s
        .send(
            "POST",
            &format!("/sandboxes/{a}/snapshot"),
            &alice,
            &[],
            None,
        )
        .await;
    assert_eq!(st, 429, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("max_snapshots_per_owner"),
        "{v}"
    );

    let (st, v) = s
        .send("DELETE", &format!("/snapshots/{snap}"), &alice, &[], None)
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = s
        .send("GET", &format!("/snapshots/{snap}"), &alice, &[], None)
        .await;
    assert_eq!(st, 404);
    // The child started from it runs on.
    let (st, v) = s
        .send("GET", &format!("/sandboxes/{child}"), &alice, &[], None)
        .await;
    assert_eq!(st, 200, "{v}");

    s.manager.flush_audit().await;
    let rows = s
        .manager
        .store()
        .list_op_audit(&OpAuditFilter {
            tenant_id: "acme".into(),
            ..Default::default()
        })
        .await
        .expect("audit");
    let count = |action: &str, ok: bool| {
        let status = if ok { "success" } else { "failure" };
        rows.iter()
            .filter(|r| r.action == action && r.status == status)
            .count()
    };
    assert_eq!(count("sandbox.snapshot", true), 4, "{rows:?}");
    assert_eq!(
        count("sandbox.snapshot", false),
        1,
        "the refused one: {rows:?}"
    );
    assert_eq!(count("snapshot.delete", true), 1, "{rows:?}");
}

/// A snapshot's children keep the source's egress: its policy (unless a
/// child names its own) and its template's allowlist, which still bounds
/// the child's policy (403 beyond it). The mock provider (no network) stands
/// in for a provider that snapshots.
#[tokio::test]
async fn snapshot_children_keep_the_source_egress_limits() {
    let s = start(Config::default(), Duration::from_secs(10)).await;
    let (st, v) = s
        .send(
            "POST",
            "/templates",
            &Cred::None,
            &[],
            Some(json!({"name": "pkgs", "image": "host", "allowed_hosts": ["pypi.org", "*.pythonhosted.org"]})),
        )
        .await;
    assert!(st == 200 || st == 201, "{v}");
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::None,
            &[],
            Some(json!({"template": "pkgs", "network": {"allow_out": ["pypi.org"]}})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let a = v["id"].as_str().expect("id").to_string();
    let (st, v) = s
        .send(
            "POST",
            &format!("/sandboxes/{a}/fork"),
            &Cred::None,
            &[],
            Some(json!({"count": 1})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let child = v["sandboxes"][0]["id"]
        .as_str()
        .expect("child id")
        .to_string();
    let (st, net) = s
        .send(
            "GET",
            &format!("/sandboxes/{child}/network"),
            &Cred::None,
            &[],
            None,
        )
        .await;
    assert_eq!(st, 200, "{net}");
    assert_eq!(net["policy"], json!({"allow_out": ["pypi.org"]}), "{net}");
    assert_eq!(
        net["effective"],
        json!({"allow_out": ["pypi.org"], "deny_out": ["0.0.0.0/0"]}),
        "{net}"
    );
    // The template's allowlist still bounds the child.
    let (st, v) = s
        .send(
            "PATCH",
            &format!("/sandboxes/{child}/network"),
            &Cred::None,
            &[],
            Some(json!({"allow_out": ["evil.example"]})),
        )
        .await;
    assert_eq!(st, 403, "{v}");
    // A spawn from a kept snapshot with a policy of its own, beyond it: 403.
    let (st, v) = s
        .send(
            "POST",
            &format!("/sandboxes/{a}/snapshot"),
            &Cred::None,
            &[],
            None,
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let snap = v["id"].as_str().expect("snapshot").to_string();
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &Cred::None,
            &[],
            Some(json!({"snapshot": snap, "network": {"allow_out": ["evil.example"]}})),
        )
        .await;
    assert_eq!(st, 403, "{v}");
}

/// Volumes follow the rules of sandboxes: another tenant, and another
/// owner for owner-scoped callers, finds no volume by name or id (404 on
/// get, delete, export and mount), a name is unique only within its
/// tenant, viewers cannot create, and a provider without volumes refuses
/// a mount with a 400 naming it. Real volume file systems (the server
/// tests run as root).
#[tokio::test]
async fn volumes_follow_tenancy_and_roles() {
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let jwks = jwks_server(vec![rsa.jwk.clone()]).await;
    let mut cfg = oidc_config(&jwks.url);
    cfg.auth.oidc_tenant_claim = "tenant".into();
    let s = start(cfg, Duration::from_secs(10)).await;
    let host = stacyvm_providers::volumes::LoopVolumes::new(dir.path().join("volumes"), 0)
        .expect("volumes (root with loop devices)");
    s.manager.attach_volumes(std::sync::Arc::new(host));
    // Unmounts what a failing run leaves.
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            for mp in text.lines().filter_map(|l| l.split(' ').nth(4)) {
                if std::path::Path::new(mp).starts_with(&self.0) {
                    let _ = std::process::Command::new("umount")
                        .args(["-l", mp])
                        .status();
                }
            }
        }
    }
    let _unmount = Unmount(dir.path().join("volumes"));
    let token = |sub: &str, tenant: Option<&str>, groups: &[&str]| {
        let mut c = claims(sub, groups);
        if let Some(t) = tenant {
            c["tenant"] = json!(t);
        }
        Cred::Bearer(sign(&rsa, "rsa1", &c))
    };
    let alice = token("alice", Some("acme"), &[]);
    let carol = token("carol", Some("acme"), &[]);
    let oscar = token("oscar", Some("acme"), &["ops"]);
    let bob = token("bob", Some("other"), &[]);
    let vera = token("vera", Some("acme"), &["viewers"]);
    let (st, v) = s
        .send(
            "POST",
            "/volumes",
            &vera,
            &[],
            Some(json!({"name": "mine", "size_mb": 16})),
        )
        .await;
    assert_eq!(st, 403, "a viewer creates nothing: {v}");

    let (st, v) = s
        .send(
            "POST",
            "/volumes",
            &alice,
            &[],
            Some(json!({"name": "data", "size_mb": 16})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(v["owner_id"], "alice", "{v}");
    // Another tenant: the same name is its own volume; alice's is not there.
    let (st, v) = s
        .send(
            "POST",
            "/volumes",
            &bob,
            &[],
            Some(json!({"name": "data", "size_mb": 16})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let bobs = v["id"].as_str().expect("id").to_string();
    for (who, cred, sees) in [
        ("alice", &alice, true),
        ("oscar", &oscar, true),
        ("carol", &carol, false),
        ("bob", &bob, false),
    ] {
        for path in [format!("/volumes/{id}"), format!("/volumes/{id}/archive")] {
            let (st, v) = s.send("GET", &path, cred, &[], None).await;
            assert_eq!(st == 200, sees, "{who} GET {path}: {st} {v}");
            if !sees {
                assert_eq!(st, 404, "{who} GET {path}: {v}");
            }
        }
        let (st, v) = s.send("GET", "/volumes", cred, &[], None).await;
        assert_eq!(st, 200, "{v}");
        let ids: Vec<&str> = v
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|x| x["id"].as_str())
            .collect();
        assert_eq!(ids.contains(&id.as_str()), sees, "{who} lists: {v}");
        if !sees {
            let (st, v) = s
                .send(
                    "POST",
                    "/sandboxes",
                    cred,
                    &[],
                    Some(json!({"volumes": [{"volume": id, "path": "/d"}]})),
                )
                .await;
            assert_eq!(st, 404, "{who} mounts another's volume: {v}");
            let (st, v) = s
                .send("DELETE", &format!("/volumes/{id}"), cred, &[], None)
                .await;
            assert_eq!(st, 404, "{who} deletes another's volume: {v}");
        }
    }
    // Bob's "data" by name is bob's.
    let (st, v) = s.send("GET", "/volumes/data", &bob, &[], None).await;
    assert_eq!((st, v["id"].as_str()), (200, Some(bobs.as_str())), "{v}");
    // The mock provider has no volumes: a 400 that names it.
    let (st, v) = s
        .send(
            "POST",
            "/sandboxes",
            &alice,
            &[],
            Some(json!({"volumes": [{"volume": "data", "path": "/d"}]})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot mount volumes"),
        "{v}"
    );
    for (cred, name) in [(&alice, "data"), (&bob, "data")] {
        let (st, v) = s
            .send("DELETE", &format!("/volumes/{name}"), cred, &[], None)
            .await;
        assert_eq!(st, 200, "{v}");
    }
}

/// Registry connections hold a reference to a server secret, never the
/// secret (gaps S-14): a `secret_ref` that names no secret of the server
/// (a password pasted in, say) is a 400 and stored nowhere; the secret
/// never appears in any answer; connections follow tenancy; bad providers
/// and hosts are 400s.
#[tokio::test]
async fn registry_connections_store_references_never_secrets() {
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let jwks = jwks_server(vec![rsa.jwk.clone()]).await;
    let mut cfg = oidc_config(&jwks.url);
    cfg.auth.oidc_tenant_claim = "tenant".into();
    let s = start(cfg, Duration::from_secs(10)).await;
    let secrets = s._dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets dir");
    std::fs::write(secrets.join("REGISTRY_TOKEN"), "s3cret-token-value\n").expect("secret");
    let token = |sub: &str, tenant: &str| {
        let mut c = claims(sub, &[]);
        c["tenant"] = json!(tenant);
        Cred::Bearer(sign(&rsa, "rsa1", &c))
    };
    let alice = token("alice", "acme");
    let bob = token("bob", "other");
    let path = "/environments/registry-connections";
    for (body, want) in [
        (
            json!({"provider": "registry", "host": "localhost:5000", "username": "ci", "secret_ref": "hunter2-plain-password!"}),
            400,
        ),
        (
            json!({"provider": "registry", "host": "localhost:5000", "username": "ci", "secret_ref": "NOT_SET"}),
            400,
        ),
        (
            json!({"provider": "quay", "username": "ci", "secret_ref": "REGISTRY_TOKEN"}),
            400,
        ),
        (
            json!({"provider": "registry", "host": "bad host/x", "username": "ci", "secret_ref": "REGISTRY_TOKEN"}),
            400,
        ),
        (
            json!({"provider": "ghcr", "host": "evil.example", "username": "ci", "secret_ref": "REGISTRY_TOKEN"}),
            400,
        ),
        (
            json!({"provider": "registry", "host": "localhost:5000", "username": "", "secret_ref": "REGISTRY_TOKEN"}),
            400,
        ),
    ] {
        let (st, v) = s.send("POST", path, &alice, &[], Some(body.clone())).await;
        assert_eq!(st, want, "{body}: {v}");
        assert!(!v.to_string().contains("hunter2"), "{v}");
    }
    let (st, v) = s.send("GET", path, &alice, &[], None).await;
    assert_eq!(
        (st, v.as_array().map(Vec::len)),
        (200, Some(0)),
        "nothing stored: {v}"
    );

    let (st, v) = s
        .send(
            "POST",
            path,
            &alice,
            &[],
            Some(json!({"provider": "registry", "host": "localhost:5000", "username": "ci", "secret_ref": "REGISTRY_TOKEN", "is_default": true})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(
        (v["owner_id"].as_str(), v["host"].as_str()),
        (Some("alice"), Some("localhost:5000")),
        "{v}"
    );
    assert!(v.get("secret_ref").is_none(), "{v}");
    let (st, v) = s.send("GET", path, &alice, &[], None).await;
    assert_eq!(st, 200, "{v}");
    let text = v.to_string();
    assert!(
        text.contains(&id) && !text.contains("s3cret") && !text.contains("secret_ref"),
        "{text}"
    );
    // Another tenant sees nothing and deletes nothing.
    let (st, v) = s.send("GET", path, &bob, &[], None).await;
    assert_eq!((st, v.as_array().map(Vec::len)), (200, Some(0)), "{v}");
    let (st, v) = s
        .send("DELETE", &format!("{path}/{id}"), &bob, &[], None)
        .await;
    assert_eq!(st, 404, "{v}");
    let (st, v) = s
        .send("DELETE", &format!("{path}/{id}"), &alice, &[], None)
        .await;
    assert_eq!(st, 200, "{v}");
    // Nothing of the secret in the database file either.
    let db = std::fs::read(s._dir.path().join("db.sqlite")).expect("db");
    assert!(!String::from_utf8_lossy(&db).contains("s3cret-token-value"));
}

/// Environment specs: required fields and package names checked (an
/// option or a shell word is not a package), lists trimmed and
/// de-duplicated, one name per owner, suggestions, and tenancy.
#[tokio::test]
async fn environment_specs_are_checked_and_follow_tenancy() {
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let jwks = jwks_server(vec![rsa.jwk.clone()]).await;
    let mut cfg = oidc_config(&jwks.url);
    cfg.auth.oidc_tenant_claim = "tenant".into();
    let s = start(cfg, Duration::from_secs(10)).await;
    let token = |sub: &str, tenant: &str| {
        let mut c = claims(sub, &[]);
        c["tenant"] = json!(tenant);
        Cred::Bearer(sign(&rsa, "rsa1", &c))
    };
    let alice = token("alice", "acme");
    let bob = token("bob", "other");
    let path = "/environments/specs";
    for body in [
        json!({"name": "web"}),
        json!({"base_image": "python:3.12"}),
        json!({"name": "web", "base_image": "python:3.12", "python_packages": ["--index-url=http://evil.example"]}),
        json!({"name": "web", "base_image": "python:3.12", "apt_packages": ["curl; rm -rf /"]}),
        json!({"name": "web", "base_image": "python 3.12"}),
        json!({"name": "web", "base_image": "python:3.12", "python_version": "three"}),
        json!({"name": "web", "base_image": "python:3.12", "unknown": 1}),
    ] {
        let (st, v) = s.send("POST", path, &alice, &[], Some(body.clone())).await;
        assert_eq!(st, 400, "{body}: {v}");
    }
    let (st, v) = s
        .send(
            "POST",
            path,
            &alice,
            &[],
            Some(json!({"name": "web", "base_image": "python:3.12", "python_packages": [" requests ", "requests", "flask==3.0.3"], "apt_packages": ["curl"], "python_version": "3.12"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(
        v["python_packages"],
        json!(["requests", "flask==3.0.3"]),
        "{v}"
    );
    assert_eq!(v["owner_id"], "alice", "{v}");
    let (st, v) = s
        .send(
            "POST",
            path,
            &alice,
            &[],
            Some(json!({"name": "web", "base_image": "debian:12"})),
        )
        .await;
    assert_eq!(st, 409, "{v}");
    let (st, v) = s
        .send(
            "GET",
            &format!("{path}/{id}/suggestions"),
            &alice,
            &[],
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["suggestions"],
        json!(["pytest", "python-dotenv", "pandas", "numpy"]),
        "{v}"
    );
    for (cred, sees) in [(&alice, true), (&bob, false)] {
        let (st, v) = s
            .send("GET", &format!("{path}/{id}"), cred, &[], None)
            .await;
        assert_eq!(st == 200, sees, "{v}");
        let (st, v) = s.send("GET", path, cred, &[], None).await;
        assert_eq!(st, 200);
        assert_eq!(v.to_string().contains(&id), sees, "{v}");
    }
    let (st, v) = s
        .send("DELETE", &format!("{path}/{id}"), &bob, &[], None)
        .await;
    assert_eq!(st, 404, "{v}");
    let (st, v) = s
        .send("DELETE", &format!("{path}/{id}"), &alice, &[], None)
        .await;
    assert_eq!(st, 200, "{v}");
}

/// Builds and build contexts follow the spec's tenancy: another tenant
/// cannot build, upload a context to, or see the spec's builds.
#[tokio::test]
async fn builds_of_another_tenants_spec_are_not_found() {
    let dir = tempfile::tempdir().expect("tmp");
    let rsa = make_key(dir.path(), "rsa1", Algorithm::RS256);
    let jwks = jwks_server(vec![rsa.jwk.clone()]).await;
    let mut cfg = oidc_config(&jwks.url);
    cfg.auth.oidc_tenant_claim = "tenant".into();
    let s = start(cfg, Duration::from_secs(10)).await;
    let token = |sub: &str, tenant: &str| {
        let mut c = claims(sub, &[]);
        c["tenant"] = json!(tenant);
        Cred::Bearer(sign(&rsa, "rsa1", &c))
    };
    let alice = token("alice", "acme");
    let bob = token("bob", "other");
    let (st, v) = s
        .send(
            "POST",
            "/environments/specs",
            &alice,
            &[],
            Some(json!({"name": "web", "base_image": "debian:12"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let spec = v["id"].as_str().expect("id").to_string();
    let (st, v) = s
        .send(
            "POST",
            "/environments/builds",
            &bob,
            &[],
            Some(json!({"spec_id": spec})),
        )
        .await;
    assert_eq!(st, 404, "{v}");
    let (st, v) = s
        .send(
            "PUT",
            &format!("/environments/specs/{spec}/context"),
            &bob,
            &[],
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 404, "{v}");
    // The owner gets past tenancy to the provider's answer (this test
    // server's provider cannot build).
    let (st, v) = s
        .send(
            "POST",
            "/environments/builds",
            &alice,
            &[],
            Some(json!({"spec_id": spec})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(v.to_string().contains("cannot build images"), "{v}");
    let (st, v) = s.send("GET", "/environments/builds", &bob, &[], None).await;
    assert_eq!((st, v), (200, json!([])));
}
