//! Request ids, authentication/authorization, CORS, 404/405 bodies.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, OriginalUri, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use stacyvm_core::store::AdminAuditRecord;

use crate::auth::{self, AuthFailure, Perm};
use crate::error::ApiError;
use crate::ratelimit::Decision;
use crate::AppState;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id of this request (incoming `X-Request-ID` or a new UUID).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Reuses or creates `X-Request-ID` and echoes it on every response.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if resp.status().is_server_error() {
        resp = scrub_server_error(resp, &id).await;
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    resp
}

/// A 5xx error body says only its kind and the request id; the message
/// it had (host paths, agent stderr) goes to the log (F-17). Bodies that
/// are not the error shape (`/ready`'s 503 report) pass unchanged.
async fn scrub_server_error(mut resp: Response, request_id: &str) -> Response {
    let public = resp
        .headers_mut()
        .remove(crate::error::PUBLIC_MESSAGE)
        .is_some();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 256 * 1024).await else {
        return ApiError::new(parts.status, "INTERNAL_ERROR", "").into_response();
    };
    let Ok(err) = serde_json::from_slice::<stacyvm_api::ErrorBody>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let kind = match err.code.as_str() {
        _ if public => err.message.as_str(),
        "INTERNAL_ERROR" => "internal error",
        "UNAVAILABLE" => "provider unavailable",
        "NOT_IMPLEMENTED" => "unsupported operation",
        _ => "server error",
    };
    tracing::error!(
        request_id,
        status = parts.status.as_u16(),
        code = %err.code,
        message = %err.message,
        "request failed"
    );
    let mut out = crate::json::json_response(
        parts.status,
        &stacyvm_api::ErrorBody {
            code: err.code,
            message: format!("{kind} (request id {request_id})"),
        },
    );
    for (k, v) in &parts.headers {
        if k != header::CONTENT_LENGTH && k != header::CONTENT_TYPE {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// The client address: the socket peer, or the first `X-Forwarded-For`
/// hop when the peer is one of `server.trusted_proxies` (S-19).
pub fn remote_addr(req_headers: &HeaderMap, peer: Option<IpAddr>, trusted: &[String]) -> String {
    let Some(peer) = peer else {
        return String::new();
    };
    let peer_trusted = trusted.iter().any(|t| proxy_matches(t, peer));
    if peer_trusted {
        if let Some(first) = req_headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .and_then(|v| v.parse::<IpAddr>().ok())
        {
            return first.to_string();
        }
    }
    peer.to_string()
}

/// `t` is an address or a CIDR (`10.0.0.0/8`).
fn proxy_matches(t: &str, ip: IpAddr) -> bool {
    let (addr, bits) = match t.split_once('/') {
        Some((a, b)) => (a, b.parse::<u32>().ok()),
        None => (t, None),
    };
    let Ok(net) = addr.trim().parse::<IpAddr>() else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let bits = bits.unwrap_or(32).min(32);
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let bits = bits.unwrap_or(128).min(128);
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Authenticates the caller and checks the route's entry in the
/// permission table. Runs only on matched routes (route layer), so the
/// matched pattern is known. 401 = who are you; 403 = not allowed.
pub async fn authorize(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let matched = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let method = req.method().clone();
    // `/api/v1` routes by their table; the E2B API (outside it) by its own.
    let (route, perm) = match matched.strip_prefix("/api/v1") {
        Some(r) => (r.to_string(), auth::permission(&method, r)),
        // MCP: every role may connect; each tool checks its own scope.
        None if matched == "/mcp" => (matched.clone(), Some(Perm::Read)),
        None => (matched.clone(), auth::e2b_permission(&method, &matched)),
    };
    let Some(perm) = perm else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            format!("route {method} {route} has no permission entry"),
        )
        .into_response();
    };
    if perm == Perm::Open {
        return next.run(req).await;
    }
    if let Perm::Worker(scope) = perm {
        return worker_gate(st, req, next, scope).await;
    }
    let started = Instant::now();
    let h = req.headers();
    let bearer = header_str(h, "authorization").and_then(|v| {
        v.strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .map(str::trim)
    });
    let meta = AuditMeta::of(&req, &st);
    let (mut admin_key, mut api_key) =
        (header_str(h, "x-admin-api-key"), header_str(h, "x-api-key"));
    // The dashboard's session cookie stands for its key when no key is
    // sent (ui.rs): only with the session's CSRF token, or for a
    // WebSocket from this origin.
    let session = if admin_key.is_none() && api_key.is_none() && bearer.is_none() {
        match st.ui.credential_of(h) {
            Ok(c) => c,
            Err(r) => {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "FORBIDDEN",
                    match r {
                        crate::ui::Refusal::Csrf => "a request with the dashboard's session cookie needs its X-StacyVM-CSRF header",
                        crate::ui::Refusal::Origin => "a WebSocket with the dashboard's session cookie must come from this server's origin",
                    },
                )
                .into_response();
            }
        }
    } else {
        None
    };
    match &session {
        Some(crate::ui::Credential::Admin(k)) => admin_key = Some(k.as_str()),
        Some(crate::ui::Credential::Api(k)) => api_key = Some(k.as_str()),
        Some(crate::ui::Credential::Oidc(_)) | None => {}
    }
    let result = match &session {
        Some(crate::ui::Credential::Oidc(ident)) => Ok((**ident).clone()),
        _ => st.auth.authenticate(admin_key, api_key, bearer).await,
    };
    let ident = match result {
        Ok(i) => i,
        Err(f) => {
            // Failed attempts spend the client address's failed-auth
            // tokens (on by default, `rate_limit.failed_auth_per_minute`);
            // once exhausted they are refused without an audit write, and
            // the rows they may write share one server-wide budget, so an
            // anonymous flood from many addresses cannot fill the audit log.
            if st.failed_auth.enabled() {
                let key = st.failed_auth.key("", "", &meta.remote_addr);
                if let Decision::Limited {
                    limit,
                    retry_after_secs,
                } = st.failed_auth.check(&key)
                {
                    return rate_limited(limit, retry_after_secs);
                }
            }
            let actor = match &f {
                AuthFailure::BadToken(_) => "jwt:rejected",
                AuthFailure::BadKey => "key:rejected",
                AuthFailure::Missing => "anonymous",
            };
            let msg = f.to_string();
            match st.failed_auth_rows.take() {
                RowBudget::Write { suppressed } => {
                    if suppressed > 0 {
                        meta.write_suppressed(&st, suppressed).await;
                    }
                    meta.write(&st, actor, "", 401, started).await;
                }
                RowBudget::Skip => {}
            }
            tracing::info!(reason = %msg, path = %meta.path, "authentication failed");
            return ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", msg).into_response();
        }
    };
    let caller = match crate::tenancy::caller_of(&st, &ident, req.headers(), &meta.request_id).await
    {
        Ok(c) => c,
        Err(e) => {
            meta.write(
                &st,
                &ident.label(),
                "",
                i64::from(e.status.as_u16()),
                started,
            )
            .await;
            return e.into_response();
        }
    };
    if !perm.allows(caller.role) {
        meta.write(
            &st,
            &caller.caller.actor,
            &caller.caller.tenant_id,
            403,
            started,
        )
        .await;
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            format!(
                "role {} lacks scope {} required for {method} /api/v1{route}",
                caller.role.name(),
                perm.name()
            ),
        )
        .into_response();
    }
    let mut limit_headers = None;
    if st.ratelimit.enabled() {
        let key = st.ratelimit.key(
            &caller.identity.credential(),
            &caller.caller.owner_id,
            &meta.remote_addr,
        );
        match st.ratelimit.check(&key) {
            Decision::Allowed { limit, remaining } => limit_headers = Some((limit, remaining)),
            Decision::Limited {
                limit,
                retry_after_secs,
            } => return rate_limited(limit, retry_after_secs),
        }
    }
    // Long-lived work takes a slot of each per-caller cap (F-10); the
    // slot lives as long as the response body (or the WebSocket session,
    // which takes it out of the request).
    let mut slot = None;
    if let Some(per_sandbox) = crate::active::counted(&method, &route) {
        let sandbox = per_sandbox.then(|| {
            // Counted under the caller's tenant, so nobody can use up the
            // slots of a sandbox they cannot see.
            let id = req
                .uri()
                .path()
                .split('/')
                .skip_while(|s| *s != "sandboxes")
                .nth(1)
                .unwrap_or_default();
            format!("{}/{id}", caller.caller.tenant_id)
        });
        let credential = match caller.identity.credential() {
            c if c.is_empty() => format!("addr:{}", meta.remote_addr),
            c => format!("{c}\0{}", caller.caller.owner_id),
        };
        match st
            .active
            .try_acquire(sandbox.as_deref(), &credential, &caller.caller.tenant_id)
        {
            Ok(p) => {
                let s = crate::active::PermitSlot::default();
                *s.0.lock() = Some(p);
                req.extensions_mut().insert(s.clone());
                slot = Some(s);
            }
            Err(cap) => {
                return ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "RESOURCE_LIMIT",
                    cap.to_string(),
                )
                .into_response();
            }
        }
    }
    let actor = caller.caller.actor.clone();
    let tenant = caller.caller.tenant_id.clone();
    req.extensions_mut().insert(caller);
    let mut resp = next.run(req).await;
    if let Some(permit) = slot.and_then(|s| s.take()) {
        resp = resp.map(|body| {
            Body::new(Held {
                inner: body,
                _permit: permit,
            })
        });
    }
    if let Some((limit, remaining)) = limit_headers {
        let h = resp.headers_mut();
        h.insert("x-ratelimit-limit", HeaderValue::from(limit));
        h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
    }
    // Every change, every admin/tenant-admin route and WebSocket exec (a
    // GET that needs api:*); plain reads and metric scrapes are not.
    if method != Method::GET || matches!(perm, Perm::Admin | Perm::Tenant | Perm::Write) {
        meta.write(
            &st,
            &actor,
            &tenant,
            i64::from(resp.status().as_u16()),
            started,
        )
        .await;
    }
    resp
}

/// Worker routes (`/worker/{id}/…`): worker credentials, the route's
/// scope, and the path naming the credential's own worker. No API key,
/// no per-caller rate limit; failures spend the address's failed-auth
/// budget and are audited like other authentication failures.
async fn worker_gate(
    st: AppState,
    mut req: Request,
    next: Next,
    scope: stacyvm_cluster::token::Scope,
) -> Response {
    use crate::workerauth::WorkerAuthError;
    let started = Instant::now();
    let meta = AuditMeta::of(&req, &st);
    let h = req.headers();
    let worker = header_str(h, "x-worker-id").unwrap_or_default().to_string();
    let token = header_str(h, "x-worker-token")
        .or_else(|| {
            header_str(h, "authorization").and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
        })
        .unwrap_or_default()
        .to_string();
    let now = chrono::Utc::now().timestamp();
    let ident = match st.worker_auth.authenticate(&worker, &token, now) {
        Ok(i) => i,
        Err(WorkerAuthError::NotConfigured) => {
            return ApiError::unavailable("worker token is not configured").into_response()
        }
        Err(WorkerAuthError::Invalid(reason)) => {
            if st.failed_auth.enabled() {
                let key = st.failed_auth.key("", "", &meta.remote_addr);
                if let Decision::Limited {
                    limit,
                    retry_after_secs,
                } = st.failed_auth.check(&key)
                {
                    return rate_limited(limit, retry_after_secs);
                }
            }
            if let RowBudget::Write { suppressed } = st.failed_auth_rows.take() {
                if suppressed > 0 {
                    meta.write_suppressed(&st, suppressed).await;
                }
                meta.write(&st, "worker:rejected", "", 401, started).await;
            }
            tracing::info!(%reason, worker = %worker, path = %meta.path, "worker authentication failed");
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "invalid or missing worker credentials",
            )
            .into_response();
        }
    };
    let actor = format!("worker:{}", ident.worker_id);
    // `/worker/{id}/…`: the credential must be that worker's.
    let path_worker = meta
        .path
        .split('/')
        .skip_while(|s| *s != "worker")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let refusal = if path_worker != ident.worker_id {
        Some("worker credential does not match requested worker".to_string())
    } else if !ident.scopes.contains(&scope) {
        Some(format!(
            "worker credential lacks scope {} required for this route",
            scope.as_str()
        ))
    } else {
        None
    };
    if let Some(msg) = refusal {
        meta.write(&st, &actor, "", 403, started).await;
        return ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN", msg).into_response();
    }
    req.extensions_mut().insert(ident);
    let resp = next.run(req).await;
    // Heartbeats are frequent and change little: only failures are kept.
    if resp.status().is_client_error() || resp.status().is_server_error() {
        meta.write(&st, &actor, "", i64::from(resp.status().as_u16()), started)
            .await;
    }
    resp
}

fn rate_limited(limit: u64, retry_after_secs: u64) -> Response {
    let mut resp = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "RESOURCE_LIMIT",
        format!("rate limit exceeded; retry after {retry_after_secs}s"),
    )
    .into_response();
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    h.insert("x-ratelimit-limit", HeaderValue::from(limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(0u64));
    resp
}

/// The gate of an E2B envd call (routed by header, outside the route
/// table): the same failed-authentication throttle, rate limit and
/// request audit as `/api/v1`.
pub(crate) struct EnvdGate {
    meta: AuditMeta,
    started: Instant,
}

impl EnvdGate {
    pub(crate) fn start(st: &AppState, req: &Request) -> Self {
        EnvdGate {
            meta: AuditMeta::of(req, st),
            started: Instant::now(),
        }
    }

    /// A refused token: spends the client address's failed-auth tokens
    /// and writes an audit row within the server-wide budget. `Some`
    /// (seconds to wait) when the address is throttled.
    pub(crate) async fn refused(&self, st: &AppState) -> Option<u64> {
        if st.failed_auth.enabled() {
            let key = st.failed_auth.key("", "", &self.meta.remote_addr);
            if let Decision::Limited {
                retry_after_secs, ..
            } = st.failed_auth.check(&key)
            {
                return Some(retry_after_secs);
            }
        }
        match st.failed_auth_rows.take() {
            RowBudget::Write { suppressed } => {
                if suppressed > 0 {
                    self.meta.write_suppressed(st, suppressed).await;
                }
                self.meta
                    .write(st, "e2b-envd:rejected", "", 401, self.started)
                    .await;
            }
            RowBudget::Skip => {}
        }
        None
    }

    /// The API's per-caller rate limit, keyed by the sandbox's token and
    /// owner. `Some` (seconds to wait) when limited.
    pub(crate) fn limited(&self, st: &AppState, sandbox: &str, owner: &str) -> Option<u64> {
        if !st.ratelimit.enabled() {
            return None;
        }
        let key = st
            .ratelimit
            .key(&format!("envd:{sandbox}"), owner, &self.meta.remote_addr);
        match st.ratelimit.check(&key) {
            Decision::Limited {
                retry_after_secs, ..
            } => Some(retry_after_secs),
            Decision::Allowed { .. } => None,
        }
    }

    /// The request's audit row (changes only, as for `/api/v1`).
    pub(crate) async fn finish(self, st: &AppState, actor: &str, tenant: &str, status: u16) {
        if self.meta.method != "GET" {
            self.meta
                .write(st, actor, tenant, i64::from(status), self.started)
                .await;
        }
    }
}

/// Audited paths are cut to this many bytes (at a character boundary).
pub const MAX_AUDIT_PATH: usize = 2048;

/// Cuts `s` to at most `max` bytes at a character boundary, marking the
/// cut with `…`.
pub fn truncate_str(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// What the server-wide budget of failed-authentication audit rows says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowBudget {
    /// Write the row; first one summary row for `suppressed` skipped ones.
    Write { suppressed: u64 },
    /// Over budget: count it, write nothing.
    Skip,
}

/// A token bucket for failed-authentication audit rows across all
/// addresses: [`FailedAuthRows::PER_MINUTE`] a minute with the same burst.
/// Skipped rows are counted and summarised in one row once the budget
/// refills.
#[derive(Debug)]
pub struct FailedAuthRows {
    state: parking_lot::Mutex<(f64, Instant, u64)>,
}

impl Default for FailedAuthRows {
    fn default() -> Self {
        FailedAuthRows {
            state: parking_lot::Mutex::new((Self::PER_MINUTE, Instant::now(), 0)),
        }
    }
}

impl FailedAuthRows {
    pub const PER_MINUTE: f64 = 120.0;

    pub fn take(&self) -> RowBudget {
        let mut g = self.state.lock();
        let (tokens, last, suppressed) = &mut *g;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * Self::PER_MINUTE / 60.0)
            .min(Self::PER_MINUTE);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            RowBudget::Write {
                suppressed: std::mem::take(suppressed),
            }
        } else {
            *suppressed += 1;
            RowBudget::Skip
        }
    }
}

/// Request facts for the admin audit log.
struct AuditMeta {
    method: String,
    path: String,
    request_id: String,
    remote_addr: String,
    user_agent: String,
}

impl AuditMeta {
    fn of(req: &Request, st: &AppState) -> Self {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        AuditMeta {
            method: req.method().to_string(),
            // Nested routers see the path without `/api/v1`.
            path: truncate_str(
                req.extensions()
                    .get::<OriginalUri>()
                    .map_or_else(|| req.uri().path(), |u| u.0.path()),
                MAX_AUDIT_PATH,
            ),
            request_id: req
                .extensions()
                .get::<RequestId>()
                .map(|r| r.0.clone())
                .unwrap_or_default(),
            remote_addr: remote_addr(req.headers(), peer, &st.cfg.server.trusted_proxies),
            user_agent: header_str(req.headers(), "user-agent")
                .unwrap_or_default()
                .chars()
                .take(256)
                .collect(),
        }
    }

    /// One row standing for `n` failed attempts that were not recorded.
    async fn write_suppressed(&self, st: &AppState, n: u64) {
        let rec = AdminAuditRecord {
            id: 0,
            actor: "audit:suppressed".into(),
            method: String::new(),
            path: format!("{n} failed authentication attempts were not recorded individually"),
            status: 401,
            duration_ms: 0,
            request_id: self.request_id.clone(),
            remote_addr: String::new(),
            user_agent: String::new(),
            tenant_id: String::new(),
            created_at: chrono::Utc::now(),
        };
        st.audit_admin(rec).await;
    }

    async fn write(&self, st: &AppState, actor: &str, tenant: &str, status: i64, started: Instant) {
        let rec = AdminAuditRecord {
            id: 0,
            actor: actor.to_string(),
            method: self.method.clone(),
            path: self.path.clone(),
            status,
            duration_ms: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
            request_id: self.request_id.clone(),
            remote_addr: self.remote_addr.clone(),
            user_agent: self.user_agent.clone(),
            tenant_id: tenant.to_string(),
            created_at: chrono::Utc::now(),
        };
        st.audit_admin(rec).await;
    }
}

/// Largest accepted total of header names and values; beyond about
/// 400 KB hyper itself answers 431 without a body.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Refuses headers over [`MAX_HEADER_BYTES`] (431) and a declared body over `server.max_body_bytes` on every route
/// before authentication or routing (S-20); bodies without a length are
/// capped by the extractors' limit, and a plain-text 413 from them is
/// turned into the JSON error shape.
pub async fn body_limit(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "HEADERS_TOO_LARGE",
            format!("request headers too large ({header_bytes} bytes, limit {MAX_HEADER_BYTES})"),
        )
        .into_response();
    }
    // The raw upload and E2B's envd upload stream to the sandbox (with
    // their own per-file cap): their bound is the file limit.
    let put_tail = (req.method() == axum::http::Method::PUT)
        .then(|| {
            req.uri()
                .path()
                .strip_prefix("/api/v1/sandboxes/")
                .and_then(|rest| rest.split_once('/'))
                .map(|(_, tail)| tail)
        })
        .flatten();
    let raw_upload = put_tail == Some("files")
        || (req.method() == axum::http::Method::POST
            && req.uri().path() == "/files"
            && crate::e2b::envd::is_envd(req.headers()));
    let limit = if raw_upload {
        st.cfg.limits.max_file_bytes
    } else if put_tail == Some("archive")
        || (req.method() == axum::http::Method::PUT
            && req
                .uri()
                .path()
                .strip_prefix("/api/v1/volumes/")
                .is_some_and(|rest| rest.ends_with("/archive")))
    {
        // An archive upload streams too: its content is bounded by
        // `limits.max_archive_*`, its tar framing by the entry count.
        crate::routes::files::archive_body_limit(&st.cfg.limits)
    } else {
        st.cfg.server.max_body_bytes
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // E2B's routes (and envd) answer in E2B's error shape.
    let e2b = !req.uri().path().starts_with("/api/") && req.uri().path() != "/mcp";
    let refuse = |limit: u64| {
        if e2b {
            crate::e2b::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body too large (limit {limit} bytes)"),
            )
        } else {
            too_large(limit)
        }
    };
    if declared.is_some_and(|n| n > limit) {
        return refuse(limit);
    }
    let resp = next.run(req).await;
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json {
        return refuse(limit);
    }
    resp
}

fn too_large(limit: u64) -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        format!("request body too large (limit {limit} bytes)"),
    )
    .into_response()
}

/// Whether a `Host` header names this machine's loopback interface:
/// `localhost`, `127.0.0.1` or `[::1]`, with any port.
fn is_local_host_header(host: &str) -> bool {
    let h = host.trim();
    let name = if let Some(rest) = h.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inner, port)) if port.is_empty() || port.starts_with(':') => inner,
            _ => return false,
        }
    } else {
        match h.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
            Some(_) => return false,
            None => h,
        }
    };
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1" || name == "::1"
}

/// DNS-rebinding guard: while the API is open (no credential) and bound
/// to loopback, a request whose `Host` is not `localhost`, `127.0.0.1`
/// or `[::1]` (any port) came through a name that resolved here by
/// accident or by design (a web page rebinding its own domain): 421.
pub async fn host_guard(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if st.host_checked {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                req.uri()
                    .authority()
                    .map(axum::http::uri::Authority::as_str)
            });
        if let Some(h) = host {
            // Names under `server.e2b_domain` are the operator's own.
            let e2b_routed =
                crate::e2b::envd::host_route(&st.cfg.server.e2b_domain, req.headers()).is_some();
            if !is_local_host_header(h) && !e2b_routed {
                return ApiError::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "MISDIRECTED_REQUEST",
                    "this server has no credential configured and only answers requests for localhost, 127.0.0.1 or [::1]; configure auth.api_key to serve other names",
                )
                .into_response();
            }
        }
    }
    next.run(req).await
}

const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
const ALLOW_HEADERS: &str =
    "Content-Type, X-API-Key, X-Admin-API-Key, X-Request-ID, X-User-ID, X-Tenant-ID, Authorization";
const EXPOSE_HEADERS: &str = "X-Request-ID, X-RateLimit-Limit, X-RateLimit-Remaining, Retry-After";

/// CORS with exact-origin lists (`*` = any; empty = none, the default);
/// preflights are answered before auth, and a request carrying an
/// `Origin` that is not allowed is refused (403) instead of run.
pub async fn cors(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if !req.uri().path().starts_with("/api/v1") {
        return next.run(req).await;
    }
    let origins = &st.cfg.server.cors_allowed_origins;
    let any = origins.iter().any(|o| o == "*");
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let allowed_origin = match (&origin, any) {
        (_, true) => Some("*".to_string()),
        (Some(o), false) if origins.iter().any(|x| x == o) => Some(o.clone()),
        _ => None,
    };
    // The dashboard's own calls: a browser sends `Origin` on same-origin
    // POSTs too; they are not cross-origin.
    let same_origin = origin.is_some() && crate::ui::same_origin(req.headers());
    let is_preflight = req.method() == Method::OPTIONS;
    let mut resp = if is_preflight {
        if origin.is_some() && allowed_origin.is_none() {
            let mut r = Response::new(Body::from("CORS origin is not allowed"));
            *r.status_mut() = StatusCode::FORBIDDEN;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            return r;
        }
        Response::new(Body::empty())
    } else if let (Some(o), None, false) = (&origin, &allowed_origin, same_origin) {
        // A browser sends simple cross-origin requests (a form POST, a
        // text/plain fetch) without a preflight; they must not run.
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "FORBIDDEN",
            format!(
                "cross-origin requests from {o:?} are not allowed (server.cors_allowed_origins)"
            ),
        )
        .into_response();
    } else {
        next.run(req).await
    };
    set_cors_headers(resp.headers_mut(), allowed_origin.as_deref(), any);
    resp
}

fn set_cors_headers(h: &mut HeaderMap, origin: Option<&str>, any: bool) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(ALLOW_METHODS),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOW_HEADERS),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
    if !any {
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    if let Some(o) = origin.and_then(|o| HeaderValue::from_str(o).ok()) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
    }
}

pub async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        format!("route not found: {method} {}", uri.path()),
    )
}

pub async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

/// A response body that holds a slot until it is done (or dropped); every
/// frame passes through, trailers included.
struct Held<P> {
    inner: Body,
    _permit: P,
}

impl<P: Unpin> http_body::Body for Held<P> {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tower::ServiceExt as _;

    #[tokio::test]
    async fn server_errors_say_only_kind_and_request_id() {
        let app = axum::Router::new()
            .route(
                "/agent",
                get(|| async {
                    ApiError::from(stacyvm_core::Error::unavailable(
                        "connecting to the sandbox agent at /var/lib/stacyvm/docker/sb-1/run/agent.sock",
                    ))
                }),
            )
            .route(
                "/setup",
                get(|| async {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "INTERNAL_ERROR",
                        "sandbox setup failed: mount /var/lib/stacyvm/native: EPERM",
                    )
                }),
            )
            .route(
                "/ready",
                get(|| async {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::CONTENT_TYPE, "application/json")],
                        r#"{"status":"not_ready"}"#,
                    )
                }),
            )
            .layer(axum::middleware::from_fn(request_id));
        for path in ["/agent", "/setup"] {
            let resp = app
                .clone()
                .oneshot(
                    Request::get(path)
                        .header("x-request-id", "rid-42")
                        .body(Body::empty())
                        .expect("req"),
                )
                .await
                .expect("resp");
            assert!(resp.status().is_server_error());
            let bytes = axum::body::to_bytes(resp.into_body(), 4096)
                .await
                .expect("body");
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains("/var/lib"), "{path}: {text}");
            assert!(!text.contains("setup failed"), "{path}: {text}");
            assert!(text.contains("request id rid-42"), "{path}: {text}");
        }
        let resp = app
            .oneshot(Request::get("/ready").body(Body::empty()).expect("req"))
            .await
            .expect("resp");
        let bytes = axum::body::to_bytes(resp.into_body(), 4096)
            .await
            .expect("body");
        assert_eq!(&bytes[..], br#"{"status":"not_ready"}"#);
    }
}
