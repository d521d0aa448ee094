//! The web dashboard: its files, embedded in the binary and served at
//! `/ui/`, and browser sessions (docs/dashboard.md).
//!
//! A browser signs in once with a key (`POST /ui/session`); the server
//! keeps the key in memory under a random session id and gives the
//! browser only that id, in an `HttpOnly; SameSite=Strict` cookie, so no
//! script of the page — and no script an attacker slips into it — can read
//! a credential. Each API call the page makes is authenticated with the
//! session's key exactly as if it had sent the key itself (a removed key
//! stops working at once), and must carry the session's CSRF token in
//! `X-StacyVM-CSRF` (a cross-site form or fetch cannot read it); a
//! WebSocket opened with the cookie must come from the server's own
//! origin (cross-site WebSocket hijacking). Calls with a key header are
//! unchanged.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::AppState;

pub mod oidc;

/// The session cookie's name.
pub const COOKIE: &str = "stacyvm_session";
/// The header carrying the session's CSRF token.
pub const CSRF_HEADER: &str = "x-stacyvm-csrf";
/// A session unused this long ends.
const IDLE: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after sign-in, used or not.
const MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at once; the oldest go first.
const MAX_SESSIONS: usize = 10_000;

const INDEX: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const APP_CSS: &str = include_str!("../../web/app.css");
const TERM_JS: &str = include_str!("../../web/term.js");

/// The page's policy: its own scripts and styles only, no inline code,
/// no framing, API calls and WebSockets to this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What a session signed in with: a key (checked again on every call, so
/// a removed key stops working at once), or the identity an OIDC sign-in
/// proved (good until its ID token expires).
#[derive(Clone)]
pub enum Credential {
    Admin(String),
    Api(String),
    Oidc(Box<crate::auth::Identity>),
}

struct Session {
    credential: Credential,
    csrf: String,
    ends: Instant,
    used: Instant,
}

/// Sessions by the SHA-256 of their id (the id itself is kept nowhere),
/// and the OIDC sign-in when one is configured.
#[derive(Default)]
pub struct Sessions {
    map: parking_lot::Mutex<HashMap<String, Session>>,
    oidc: Option<oidc::SignIn>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sessions({})", self.map.lock().len())
    }
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn digest(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// Why a cookie-authenticated request is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `X-StacyVM-CSRF`, or not the session's.
    Csrf,
    /// A WebSocket from another origin.
    Origin,
}

impl Sessions {
    /// Sessions for a server configured with `a`.
    pub fn new(a: &stacyvm_core::config::AuthConfig) -> Self {
        Sessions {
            map: parking_lot::Mutex::default(),
            oidc: oidc::SignIn::new(a),
        }
    }

    /// A new session for `credential`, ending after `lifetime` (at most
    /// twelve hours): its id and CSRF token.
    pub fn create(&self, credential: Credential, lifetime: Duration) -> (String, String) {
        let (id, csrf) = (random_hex(), random_hex());
        let now = Instant::now();
        let mut map = self.map.lock();
        map.retain(|_, s| live(s, now));
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.ends)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            digest(&id),
            Session {
                credential,
                csrf: csrf.clone(),
                ends: now + lifetime.min(MAX_AGE),
                used: now,
            },
        );
        (id, csrf)
    }

    /// The session `id` names, if live (its use recorded): its key and
    /// CSRF token.
    fn get(&self, id: &str) -> Option<(Credential, String)> {
        let now = Instant::now();
        let mut map = self.map.lock();
        let key = digest(id);
        match map.get_mut(&key) {
            Some(s) if live(s, now) => {
                s.used = now;
                Some((s.credential.clone(), s.csrf.clone()))
            }
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    fn remove(&self, id: &str) {
        self.map.lock().remove(&digest(id));
    }

    /// The credential of a request that carries no key header but the
    /// session cookie: `Ok(None)` without a (live) session, `Err` when the
    /// request is not the page's own (no CSRF token, a foreign origin).
    pub fn credential_of(&self, h: &HeaderMap) -> Result<Option<Credential>, Refusal> {
        let Some(id) = cookie(h, COOKIE) else {
            return Ok(None);
        };
        let Some((cred, csrf)) = self.get(&id) else {
            return Ok(None);
        };
        let websocket = h
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        if websocket {
            // Browsers send no custom headers on a WebSocket; they always
            // send Origin, which must be this server.
            if !same_origin(h) {
                return Err(Refusal::Origin);
            }
            return Ok(Some(cred));
        }
        let sent = h
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if subtle::ConstantTimeEq::ct_eq(sent.as_bytes(), csrf.as_bytes()).into() {
            Ok(Some(cred))
        } else {
            Err(Refusal::Csrf)
        }
    }
}

fn live(s: &Session, now: Instant) -> bool {
    now.duration_since(s.used) < IDLE && now < s.ends
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie(h: &HeaderMap, name: &str) -> Option<String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Whether the request's `Origin` is the host it was sent to.
pub(crate) fn same_origin(h: &HeaderMap) -> bool {
    let (Some(origin), Some(host)) = (
        h.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        h.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) else {
        return false;
    };
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    rest.is_some_and(|o| o.eq_ignore_ascii_case(host))
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /` and `GET /ui`: to the dashboard.
pub async fn root() -> Response {
    (StatusCode::FOUND, [(header::LOCATION, "/ui/")]).into_response()
}

/// `GET /ui/`.
pub async fn index() -> Response {
    page(INDEX, "text/html; charset=utf-8")
}

/// `GET /ui/app.js`.
pub async fn app_js() -> Response {
    page(APP_JS, "text/javascript; charset=utf-8")
}

/// `GET /ui/term.js`.
pub async fn term_js() -> Response {
    page(TERM_JS, "text/javascript; charset=utf-8")
}

/// `GET /ui/app.css`.
pub async fn app_css() -> Response {
    page(APP_CSS, "text/css; charset=utf-8")
}

fn answer(status: StatusCode, v: serde_json::Value) -> Response {
    let mut r = (status, axum::Json(v)).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    answer(
        status,
        serde_json::json!({"error": code, "message": message}),
    )
}

fn session_cookie(st: &AppState, value: &str, max_age: u64) -> HeaderValue {
    cookie_value(
        st,
        COOKIE,
        value,
        &format!("Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}"),
    )
}

#[derive(Deserialize)]
pub struct SignIn {
    #[serde(default)]
    key: String,
    /// `api` (default) or `admin`.
    #[serde(default)]
    kind: String,
}

/// `POST /ui/session`: signs in with a key; the answer sets the cookie.
pub async fn sign_in(State(st): State<AppState>, req: axum::extract::Request) -> Response {
    let addr = client_addr(&st, &req);
    let headers = req.headers().clone();
    let Ok(body) = axum::body::to_bytes(req.into_body(), 64 * 1024).await else {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            "a sign-in is a small JSON body",
        );
    };
    if !st.auth.enabled() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "this server has no credentials configured: the dashboard needs no sign-in",
        );
    }
    // A form posted from another site is not JSON; a fetch from one
    // cannot send JSON without a preflight this server does not grant.
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_body {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "sign in with a JSON body: {\"key\": \"…\", \"kind\": \"api\"|\"admin\"}",
        );
    }
    let Ok(req) = serde_json::from_slice::<SignIn>(&body) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "sign in with {\"key\": \"…\", \"kind\": \"api\"|\"admin\"}",
        );
    };
    let credential = match req.kind.as_str() {
        "admin" => Credential::Admin(req.key),
        "" | "api" => Credential::Api(req.key),
        other => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                &format!("kind {other:?}: api or admin"),
            )
        }
    };
    let ident = match authenticate(&st, &credential).await {
        Ok(i) => i,
        Err(e) => {
            if spend_failed(&st, &addr) {
                return refuse(
                    StatusCode::TOO_MANY_REQUESTS,
                    "RATE_LIMITED",
                    "too many failed sign-ins from this address; retry later",
                );
            }
            tracing::info!(reason = %e, "dashboard sign-in refused");
            return refuse(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "the key is not valid",
            );
        }
    };
    let (id, csrf) = st.ui.create(credential, MAX_AGE);
    let mut r = answer(StatusCode::OK, signed_in(&ident, &csrf));
    r.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(&st, &id, MAX_AGE.as_secs()),
    );
    r
}

/// What the page is told about who signed in: the role, what it may do
/// (so it shows no control the API would refuse), its tenant.
fn signed_in(ident: &crate::auth::Identity, csrf: &str) -> serde_json::Value {
    use crate::auth::Perm;
    let may = |p: Perm| p.allows(ident.role);
    serde_json::json!({
        "auth": true,
        "role": ident.role.name(),
        "who": ident.label(),
        "tenant": ident.tenant_id,
        "csrf": csrf,
        "can": {
            "write": may(Perm::Write),
            "operate": may(Perm::Operate),
            "shared": may(Perm::Shared),
            "tenant": may(Perm::Tenant),
            "admin": may(Perm::Admin),
        },
    })
}

/// The client's address (through trusted proxies), for rate limits.
fn client_addr(st: &AppState, req: &axum::extract::Request) -> String {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    crate::middleware::remote_addr(req.headers(), peer, &st.cfg.server.trusted_proxies)
}

/// The dashboard's own files (`/`, `/ui/` and its scripts and styles),
/// for `stacyvm serve` and `stacyvm web-ui` alike.
pub fn files<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    use axum::routing::get;
    axum::Router::new()
        .route("/", get(root))
        .route("/ui", get(root))
        .route("/ui/", get(index))
        .route("/ui/app.js", get(app_js))
        .route("/ui/app.css", get(app_css))
        .route("/ui/term.js", get(term_js))
}

/// Spends one of the address's failed-authentication tokens, as a bad
/// key on the API does: whether the address is now limited.
fn spend_failed(st: &AppState, addr: &str) -> bool {
    if !st.failed_auth.enabled() {
        return false;
    }
    let k = st.failed_auth.key("", "", addr);
    matches!(
        st.failed_auth.check(&k),
        crate::ratelimit::Decision::Limited { .. }
    )
}

fn cookie_value(st: &AppState, name: &str, value: &str, rest: &str) -> HeaderValue {
    let secure = if st.cfg.preview.scheme == "https" {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!("{name}={value}; {rest}{secure}"))
        .unwrap_or_else(|_| HeaderValue::from_static("stacyvm_none=; Max-Age=0"))
}

/// The state cookie of an OIDC sign-in: sent back on the issuer's
/// redirect (a top-level navigation, hence `Lax`), only to the callback.
fn state_cookie(st: &AppState, value: &str, max_age: u64) -> HeaderValue {
    cookie_value(
        st,
        oidc::STATE_COOKIE,
        value,
        &format!("Path=/ui/oidc; HttpOnly; SameSite=Lax; Max-Age={max_age}"),
    )
}

/// Back to the page after an OIDC sign-in that failed: the page shows
/// the message for `code`; the detail stays in the server's log.
fn back_to_page(st: &AppState, code: &str) -> Response {
    see_other(
        &format!("/ui/#signin-error={code}"),
        state_cookie(st, "", 0),
    )
}

/// A `303` to `location` (never cached) setting `cookie`; a location
/// that cannot be a header goes back to the page.
fn see_other(location: &str, cookie: HeaderValue) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SEE_OTHER;
    let h = r.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(location).unwrap_or_else(|_| HeaderValue::from_static("/ui/")),
    );
    h.insert(header::SET_COOKIE, cookie);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /ui/oidc/start`: to the issuer's sign-in page.
pub async fn oidc_start(State(st): State<AppState>, req: axum::extract::Request) -> Response {
    let addr = client_addr(&st, &req);
    let headers = req.headers();
    let Some(flow) = st.ui.oidc.as_ref() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "OIDC sign-in is not configured (auth.oidc_client_id, auth.oidc_issuer)",
        );
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match flow.start(&st.cfg.preview.scheme, host, &addr).await {
        Ok(started) => {
            if HeaderValue::from_str(&started.location).is_err() {
                return back_to_page(&st, "unavailable");
            }
            let mut r = see_other(
                &started.location,
                state_cookie(&st, &started.state, oidc::PENDING_FOR.as_secs()),
            );
            r.headers_mut().insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            r
        }
        Err(f) => {
            tracing::warn!(detail = %f.detail, "dashboard OIDC sign-in could not start");
            back_to_page(&st, f.code)
        }
    }
}

/// `GET /ui/oidc/callback`: the issuer sends the browser back here.
pub async fn oidc_callback(State(st): State<AppState>, req: axum::extract::Request) -> Response {
    let Some(flow) = st.ui.oidc.as_ref() else {
        return back_to_page(&st, "unavailable");
    };
    let Some(verifier) = st.auth.oidc() else {
        return back_to_page(&st, "unavailable");
    };
    let addr = client_addr(&st, &req);
    let q: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    let bound = cookie(req.headers(), oidc::STATE_COOKIE);
    let result = if get("error").is_empty() {
        flow.finish(verifier, get("state"), bound.as_deref(), get("code"))
            .await
    } else {
        Err(oidc::Failure {
            code: "denied",
            detail: format!("the issuer answered {:?}", get("error")),
        })
    };
    match result {
        Ok(done) => {
            let who = done.identity.label();
            let role = done.identity.role.name();
            let (id, _) = st
                .ui
                .create(Credential::Oidc(Box::new(done.identity)), done.lifetime);
            tracing::info!(%who, %role, "dashboard OIDC sign-in");
            let mut r = see_other("/ui/", state_cookie(&st, "", 0));
            r.headers_mut().append(
                header::SET_COOKIE,
                session_cookie(&st, &id, done.lifetime.min(MAX_AGE).as_secs()),
            );
            r
        }
        Err(f) => {
            // A browser's stale or foreign callback is routine; an issuer
            // that answers badly is a misconfiguration worth a warning.
            if matches!(f.code, "exchange" | "token" | "unavailable") {
                tracing::warn!(code = f.code, detail = %f.detail, "dashboard OIDC sign-in failed");
            } else {
                tracing::info!(code = f.code, detail = %f.detail, "dashboard OIDC sign-in refused");
            }
            if spend_failed(&st, &addr) {
                return back_to_page(&st, "rate_limited");
            }
            back_to_page(&st, f.code)
        }
    }
}

async fn authenticate(
    st: &AppState,
    c: &Credential,
) -> Result<crate::auth::Identity, crate::auth::AuthFailure> {
    match c {
        Credential::Admin(k) => st.auth.authenticate(Some(k), None, None).await,
        Credential::Api(k) => st.auth.authenticate(None, Some(k), None).await,
        Credential::Oidc(ident) => Ok((**ident).clone()),
    }
}

/// `GET /ui/session`: who the page is signed in as, and its CSRF token.
pub async fn current(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if !st.auth.enabled() {
        return answer(
            StatusCode::OK,
            serde_json::json!({"auth": false, "role": "admin", "who": "", "csrf": "", "tenant": "",
                "can": {"write": true, "operate": true, "shared": true, "tenant": true, "admin": true}}),
        );
    }
    // Signed-out answers say whether OIDC sign-in is offered.
    let signed_out = |message: &str| {
        answer(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "UNAUTHORIZED", "message": message, "oidc": st.ui.oidc.is_some()}),
        )
    };
    let Some(id) = cookie(&headers, COOKIE) else {
        return signed_out("not signed in");
    };
    let Some((cred, csrf)) = st.ui.get(&id) else {
        return signed_out("the session ended");
    };
    match authenticate(&st, &cred).await {
        Ok(ident) => answer(StatusCode::OK, signed_in(&ident, &csrf)),
        Err(_) => {
            // The key was removed: the session goes with it.
            st.ui.remove(&id);
            signed_out("the session's key is no longer valid")
        }
    }
}

/// `DELETE /ui/session`: signs out (needs the CSRF token).
pub async fn sign_out(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE) {
        if st.ui.credential_of(&headers) == Err(Refusal::Csrf) {
            return refuse(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                "sign-out needs the X-StacyVM-CSRF header",
            );
        }
        st.ui.remove(&id);
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&st, "", 0));
    r
}

impl PartialEq for Credential {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Credential::Admin(a), Credential::Admin(b))
            | (Credential::Api(a), Credential::Api(b)) => {
                subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes()).into()
            }
            (Credential::Oidc(a), Credential::Oidc(b)) => a == b,
            _ => false,
        }
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.write_str(match self {
            Credential::Admin(_) => "Credential::Admin(…)",
            Credential::Api(_) => "Credential::Api(…)",
            Credential::Oidc(_) => "Credential::Oidc(…)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn a_session_needs_its_csrf_token_and_websockets_their_own_origin() {
        let s = Sessions::default();
        let (id, csrf) = s.create(Credential::Api("k1".into()), MAX_AGE);
        let c = format!("a=b; {COOKIE}={id}");
        assert_eq!(s.credential_of(&headers(&[])), Ok(None));
        assert_eq!(
            s.credential_of(&headers(&[("cookie", &format!("{COOKIE}=nope"))])),
            Ok(None),
            "an unknown session is no session"
        );
        assert_eq!(
            s.credential_of(&headers(&[("cookie", &c)])),
            Err(Refusal::Csrf)
        );
        assert_eq!(
            s.credential_of(&headers(&[("cookie", &c), (CSRF_HEADER, "guess")])),
            Err(Refusal::Csrf)
        );
        assert_eq!(
            s.credential_of(&headers(&[("cookie", &c), (CSRF_HEADER, &csrf)])),
            Ok(Some(Credential::Api("k1".into())))
        );
        let ws = |origin: &str| {
            s.credential_of(&headers(&[
                ("cookie", &c),
                ("upgrade", "websocket"),
                ("host", "127.0.0.1:7400"),
                ("origin", origin),
            ]))
        };
        assert_eq!(
            ws("http://127.0.0.1:7400"),
            Ok(Some(Credential::Api("k1".into())))
        );
        assert_eq!(ws("http://evil.example"), Err(Refusal::Origin));
        assert_eq!(ws("null"), Err(Refusal::Origin));
        s.remove(&id);
        assert_eq!(
            s.credential_of(&headers(&[("cookie", &c), (CSRF_HEADER, &csrf)])),
            Ok(None)
        );
    }

    #[test]
    fn ids_are_random_and_stored_only_as_digests() {
        let s = Sessions::default();
        let (a, _) = s.create(Credential::Admin("x".into()), MAX_AGE);
        let (b, _) = s.create(Credential::Admin("x".into()), MAX_AGE);
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let map = s.map.lock();
        assert!(!map.contains_key(&a) && map.contains_key(&digest(&a)));
        assert!(!format!("{:?}", Credential::Api("secret".into())).contains("secret"));
    }

    #[test]
    fn the_page_forbids_inline_script_and_framing() {
        let r = page(INDEX, "text/html");
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .expect("csp");
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"));
        assert!(csp.contains("frame-ancestors 'none'"));
        assert!(!INDEX.contains("<script>"), "no inline script in the page");
        for (name, js) in [("app.js", APP_JS), ("term.js", TERM_JS)] {
            for sink in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
            ] {
                assert!(
                    !js.contains(sink),
                    "{name}: API strings never become HTML ({sink})"
                );
            }
        }
    }
}
