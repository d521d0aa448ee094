//! E2B's in-sandbox API ("envd") on the server's listener, for requests
//! that carry `E2b-Sandbox-Id` (the SDKs' `E2B_SANDBOX_URL` mode): `GET
//! /health`, `GET`/`POST /files`, Connect `process.Process/Start` and
//! the unary `filesystem.Filesystem` calls, each one translated onto the
//! manager as the sandbox's owner. Wire facts: docs/e2b.md, "Wire contract".
//!
//! Access: every call but `/health` must carry `X-Access-Token`, the
//! sandbox's `envdAccessToken` from create or connect: an HMAC of the
//! sandbox id under a key kept in the data dir ([`EnvdKeys`]), so it
//! needs no storage and survives restarts, and one sandbox's token opens
//! no other.

// The helpers here fail with the finished HTTP response (an error is
// built once per failed call and returned as is); boxing it buys nothing.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stacyvm_api::FileInfo;
use stacyvm_core::manager::{Caller, ExecRequest, Scope, StreamEvent};
use stacyvm_core::provider::StreamKind;
use stacyvm_core::provider::{Account, ExecInput};
use stacyvm_core::store::SandboxRecord;
use stacyvm_core::{Error, ErrorKind};

use crate::AppState;

mod watch;

/// The port envd listens on in an E2B sandbox; the SDKs name it in
/// `E2b-Sandbox-Port`.
const ENVD_PORT: &str = "49983";
/// Most entries one `ListDir` returns (a deep listing is walked in the
/// server, level by level).
const MAX_LIST_ENTRIES: usize = 100_000;
/// Most files in one multipart upload.
const MAX_PARTS: usize = 1000;
/// Most bytes a multipart body may carry before its first boundary.
const MAX_PREAMBLE: usize = 8 * 1024;
/// Largest Connect request body (a Start or a filesystem call).
const MAX_RPC_BYTES: usize = 1024 * 1024;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The key envd access tokens are derived from.
#[derive(Debug)]
pub struct EnvdKeys {
    key: [u8; 32],
}

impl EnvdKeys {
    /// Loads `<data_dir>/e2b-envd.key`, creating it (0600) on first use;
    /// a data dir that cannot hold it gets a key for this process only
    /// (tokens then end with the process), with a warning.
    pub fn load(data_dir: &str) -> Self {
        let path = Path::new(data_dir).join("e2b-envd.key");
        match Self::read_or_create(&path) {
            Ok(key) => EnvdKeys { key },
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot keep the E2B envd token key; tokens last until the server stops");
                EnvdKeys {
                    key: rand::random(),
                }
            }
        }
    }

    fn read_or_create(path: &Path) -> std::io::Result<[u8; 32]> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(b) = std::fs::read(path) {
            if let Ok(k) = <[u8; 32]>::try_from(b.as_slice()) {
                return Ok(k);
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let key: [u8; 32] = rand::random();
        let tmp = path.with_extension("key.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&key)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(key)
    }

    /// The envd access token of one sandbox: bound to its id, start time,
    /// tenant and owner, so a token kept from a destroyed sandbox opens
    /// nothing when its id is issued again.
    pub fn token(&self, r: &SandboxRecord) -> String {
        use hmac::Mac;
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("hmac takes any key");
        mac.update(b"stacyvm e2b envd access v2\0");
        for part in [
            r.id.as_str(),
            &r.created_at
                .timestamp_nanos_opt()
                .unwrap_or_default()
                .to_string(),
            r.tenant_id.as_str(),
            r.owner_id.as_str(),
        ] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        hex::encode(mac.finalize().into_bytes())
    }

    fn verify(&self, r: &SandboxRecord, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        let want = self.token(r);
        want.len() == token.len() && bool::from(want.as_bytes().ct_eq(token.as_bytes()))
    }
}

/// Whether a request is for envd (routed by header, mode A).
pub fn is_envd(h: &HeaderMap) -> bool {
    h.contains_key("e2b-sandbox-id")
}

/// envd's plain-HTTP error body (`/health`, `/files`, routing).
fn http_error(status: StatusCode, message: impl Into<String>) -> Response {
    super::error(status, message)
}

/// A Connect error: the status of the code, `{"code": "<code>", "message"}`.
fn rpc_error(code: &'static str, message: impl Into<String>) -> Response {
    let status = match code {
        "invalid_argument" => StatusCode::BAD_REQUEST,
        "unauthenticated" => StatusCode::UNAUTHORIZED,
        "permission_denied" => StatusCode::FORBIDDEN,
        "not_found" => StatusCode::NOT_FOUND,
        "already_exists" => StatusCode::CONFLICT,
        "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
        "unimplemented" => StatusCode::NOT_IMPLEMENTED,
        "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    crate::json::json_response(status, &json!({"code": code, "message": message.into()}))
}

/// The Connect code of a StacyVM error.
fn code_of(e: &Error) -> &'static str {
    code_of_kind(e.kind())
}

/// The Connect code of an error kind.
fn code_of_kind(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidInput => "invalid_argument",
        ErrorKind::SandboxNotFound | ErrorKind::SandboxDestroyed | ErrorKind::NotFound => {
            "not_found"
        }
        ErrorKind::Conflict => "already_exists",
        ErrorKind::ResourceLimit | ErrorKind::PayloadTooLarge => "resource_exhausted",
        ErrorKind::Forbidden => "permission_denied",
        ErrorKind::ExecTimeout => "deadline_exceeded",
        ErrorKind::ProviderUnavailable | ErrorKind::StoreUnavailable => "unavailable",
        ErrorKind::Unsupported => "unimplemented",
        ErrorKind::SetupFailed => "failed_precondition",
        ErrorKind::ProviderNotFound | ErrorKind::Internal => "internal",
    }
}

fn rpc_fail(e: Error) -> Response {
    let code = code_of(&e);
    let api = crate::error::ApiError::from(e);
    rpc_error(code, api.message)
}

/// Serves one envd request for the sandbox named in `E2b-Sandbox-Id`.
pub async fn handle(st: AppState, req: Request) -> Response {
    let h = req.headers();
    let id = h
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let port = h
        .get("e2b-sandbox-port")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(ENVD_PORT)
        .to_string();
    let request_id = req
        .extensions()
        .get::<crate::middleware::RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    // The sandbox as the system sees it; the caller is then its owner.
    let system = Caller {
        request_id: request_id.clone(),
        ..Default::default()
    };
    let rec = match st.manager.get(&id, &system).await {
        // A paused sandbox wakes at its next operation.
        Ok(r) if r.state == "running" || r.state == stacyvm_api::state::PAUSED => r,
        _ => {
            return http_error(
                StatusCode::BAD_GATEWAY,
                format!("The sandbox {id:?} was not found"),
            )
        }
    };
    if port != ENVD_PORT {
        return http_error(
            StatusCode::BAD_GATEWAY,
            format!("The sandbox {id:?} is running but port {port} is not open"),
        );
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    if method == Method::GET && path == "/health" {
        return StatusCode::NO_CONTENT.into_response();
    }
    let token = h
        .get("x-access-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let is_rpc = path.starts_with("/process.") || path.starts_with("/filesystem.");
    let throttled = |wait: u64| {
        let msg = format!("rate limit exceeded; retry after {wait}s");
        let mut r = if is_rpc {
            rpc_error("resource_exhausted", msg)
        } else {
            http_error(StatusCode::TOO_MANY_REQUESTS, msg)
        };
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait));
        r
    };
    let gate = crate::middleware::EnvdGate::start(&st, &req);
    let by_token = st.e2b_keys.verify(&rec, token);
    // A signed URL opens one path for one operation, nothing else.
    let signed_path = (!by_token && signed(&st, &rec, &req))
        .then(|| query::<PathQuery>(&req).path.unwrap_or_default());
    if !by_token && signed_path.is_none() {
        // Failed attempts are throttled and audited as on /api/v1.
        if let Some(wait) = gate.refused(&st).await {
            return throttled(wait);
        }
        let msg = "missing or wrong X-Access-Token for this sandbox";
        // Connect calls get Connect's code, so the SDK raises its
        // authentication error rather than "unreachable".
        return if is_rpc {
            rpc_error("unauthenticated", msg)
        } else {
            http_error(StatusCode::UNAUTHORIZED, msg)
        };
    }
    let caller = Caller {
        owner_id: rec.owner_id.clone(),
        tenant_id: rec.tenant_id.clone(),
        actor: if rec.owner_id.is_empty() {
            "e2b-envd".into()
        } else {
            format!("e2b-envd:{}", rec.owner_id)
        },
        request_id,
        scope: Scope::Owner,
        names_owners: false,
    };
    // The create's envVars, under each call's own envs.
    let sandbox_envs: BTreeMap<String, String> = rec
        .metadata
        .get(super::control::META_ENVS)
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default();
    if let Some(wait) = gate.limited(&st, &rec.id, &rec.owner_id) {
        return throttled(wait);
    }
    let asked = match requested_user(&req, is_rpc) {
        Ok(u) => u,
        Err(msg) => {
            return if is_rpc {
                rpc_error("invalid_argument", msg)
            } else {
                http_error(StatusCode::BAD_REQUEST, msg)
            }
        }
    };
    let user = match account(&st, &rec, asked.as_deref()).await {
        Ok(a) => a,
        Err(msg) => {
            return if is_rpc {
                rpc_error("unauthenticated", msg)
            } else {
                http_error(StatusCode::UNAUTHORIZED, msg)
            }
        }
    };
    let (audit_st, actor, tenant) = (st.clone(), caller.actor.clone(), caller.tenant_id.clone());
    let env = Env {
        st,
        id,
        caller,
        sandbox_envs,
        user,
        signed_path,
    };
    let resp = match (method, path.as_str()) {
        (Method::GET, "/files") => env.download(req).await,
        (Method::POST, "/files") => env.upload(req).await,
        (Method::POST, rpc) if rpc.starts_with("/process.Process/") => {
            match rpc.trim_start_matches("/process.Process/") {
                "Start" => env.start(req).await,
                "Connect" => env.attach(req).await,
                m => {
                    let m = m.to_string();
                    env.process_call(&m, req).await
                }
            }
        }
        (Method::POST, "/filesystem.Filesystem/WatchDir") => env.watch_stream(req).await,
        (Method::POST, rpc) if rpc.starts_with("/filesystem.Filesystem/") => {
            let m = rpc
                .trim_start_matches("/filesystem.Filesystem/")
                .to_string();
            env.filesystem(&m, req).await
        }
        (m, p) => http_error(
            StatusCode::NOT_FOUND,
            format!("route not found: {m} {p} (envd)"),
        ),
    };
    gate.finish(&audit_st, &actor, &tenant, resp.status().as_u16())
        .await;
    resp
}

/// One envd call: the sandbox and its owner as the caller.
struct Env {
    st: AppState,
    id: String,
    caller: Caller,
    sandbox_envs: BTreeMap<String, String>,
    /// The account the call acts as.
    user: Account,
    /// Set when a signed URL, not the token, let the call in: the one
    /// path it may read or write.
    signed_path: Option<String>,
}

/// The user a call names: `Authorization: Basic base64("<user>:")` on
/// RPCs, `?username=` on `/files`; `None` = the default user.
fn requested_user(req: &Request, is_rpc: bool) -> Result<Option<String>, String> {
    if !is_rpc {
        #[derive(Default, Deserialize)]
        struct Q {
            username: Option<String>,
        }
        let q: Q = query(req);
        return Ok(q.username.filter(|u| !u.is_empty()));
    }
    let Some(v) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| "Authorization is not text")?;
    let Some(b) = v.strip_prefix("Basic ") else {
        return Err("Authorization: expected Basic with the user name".into());
    };
    let raw = B64
        .decode(b.trim())
        .map_err(|_| "Authorization: Basic is not base64")?;
    let text = String::from_utf8(raw).map_err(|_| "Authorization: the user is not UTF-8")?;
    let name = text.split(':').next().unwrap_or_default();
    Ok(Some(name.to_string()).filter(|n| !n.is_empty()))
}

/// Accounts already looked up, by sandbox (id and start time) and name.
static ACCOUNTS: LazyLock<parking_lot::Mutex<HashMap<String, Account>>> =
    LazyLock::new(Default::default);

/// The account a call acts as. The default is `user` (E2B's), or root in
/// an image that has no such account; a name the sandbox lacks is an
/// error.
async fn account(
    st: &AppState,
    rec: &SandboxRecord,
    asked: Option<&str>,
) -> Result<Account, String> {
    let name = asked.unwrap_or(DEFAULT_USER);
    if name.len() > 64 || name.contains(['\0', ':', '\n']) {
        return Err(format!("user {name:?} is not a valid account name"));
    }
    let key = format!(
        "{}\0{}\0{name}",
        rec.id,
        rec.created_at.timestamp_nanos_opt().unwrap_or_default()
    );
    if let Some(a) = ACCOUNTS.lock().get(&key) {
        return Ok(a.clone());
    }
    let found = st
        .manager
        .account_of(rec, name)
        .await
        .map_err(|e| format!("looking up user {name:?}: {e}"))?;
    // The default user is best effort: an image without it, or a provider
    // that cannot switch users (docker without CAP_SETUID), runs as root.
    let switches = st.manager.registry().get(&rec.provider).is_ok_and(|p| {
        p.capabilities()
            .iter()
            .any(|c| c == stacyvm_core::provider::capability::EXEC_USER)
    });
    let acct = match (found, asked) {
        (Some(a), None) if a.uid != 0 && !switches => root_account(),
        (Some(a), _) => a,
        (None, None) => root_account(),
        (None, Some(_)) => return Err(format!("user {name:?} does not exist in this sandbox")),
    };
    let mut map = ACCOUNTS.lock();
    // Entries of destroyed sandboxes are never asked for again; a full
    // map starts over rather than grow.
    if map.len() >= 4096 {
        map.clear();
    }
    map.insert(key, acct.clone());
    Ok(acct)
}

fn root_account() -> Account {
    Account {
        name: "root".into(),
        uid: 0,
        gid: 0,
        home: "/root".into(),
    }
}

/// E2B's default user.
const DEFAULT_USER: &str = "user";

#[derive(Debug, Default, Deserialize)]
struct PathQuery {
    path: Option<String>,
}

/// Paths of E2B calls: absolute, or relative to (and `~` for) the
/// user's home.
fn resolve(home: &str, p: &str) -> String {
    let home = home.trim_end_matches('/');
    if let Some(rest) = p.strip_prefix('~') {
        format!("{home}{rest}")
    } else if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{home}/{p}")
    }
}

fn query<T: serde::de::DeserializeOwned + Default>(req: &Request) -> T {
    axum::extract::Query::<T>::try_from_uri(req.uri())
        .map(|q| q.0)
        .unwrap_or_default()
}

impl Env {
    fn resolve(&self, p: &str) -> String {
        resolve(&self.user.home, p)
    }

    /// The exec identity of the call's user (`None` = root).
    fn as_user(&self) -> Option<String> {
        (self.user.uid != 0).then(|| format!("{}:{}", self.user.uid, self.user.gid))
    }

    /// A slot of the per-sandbox, per-credential and per-tenant caps on
    /// concurrent execs and transfers, as `/api/v1` takes for its own.
    /// A full cap is the call's failure: 429 on `/files`, Connect's
    /// `resource_exhausted` on RPCs.
    fn permit(&self, rpc: bool) -> Result<crate::active::Permit, Response> {
        self.st
            .active
            .try_acquire(
                Some(&format!("{}/{}", self.caller.tenant_id, self.id)),
                &format!("e2b-envd\0{}", self.caller.owner_id),
                &self.caller.tenant_id,
            )
            .map_err(|cap| {
                if rpc {
                    rpc_error("resource_exhausted", cap.to_string())
                } else {
                    http_error(StatusCode::TOO_MANY_REQUESTS, cap.to_string())
                }
            })
    }

    /// `GET /files?path=`: the file's bytes, streamed.
    async fn download(&self, req: Request) -> Response {
        let permit = match self.permit(false) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let q: PathQuery = query(&req);
        let Some(path) = q.path.filter(|p| !p.is_empty()) else {
            return http_error(StatusCode::BAD_REQUEST, "path is required");
        };
        let path = self.resolve(&path);
        match self
            .st
            .manager
            .read_file_stream(&self.id, &path, &self.caller)
            .await
        {
            Ok(fs) => {
                use futures::StreamExt;
                let size = fs.size;
                // The slot lives as long as the body.
                let stream = tokio_stream::wrappers::ReceiverStream::new(fs.chunks).map(move |c| {
                    let _held = &permit;
                    c.map(Bytes::from)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                });
                let mut resp = Response::new(Body::from_stream(stream));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                if let Ok(v) = HeaderValue::from_str(&size.to_string()) {
                    resp.headers_mut().insert(header::CONTENT_LENGTH, v);
                }
                resp
            }
            Err(e) => file_error(e),
        }
    }

    /// `POST /files`: multipart (each part's filename is its target path;
    /// `?path=` wins for a single file) or a raw body to `?path=`.
    async fn upload(&self, req: Request) -> Response {
        let _permit = match self.permit(false) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let q: PathQuery = query(&req);
        let ctype = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let max = self.st.cfg.limits.max_file_bytes;
        let mut written = Vec::new();
        if ctype.starts_with("multipart/form-data") {
            let boundary = match multer::parse_boundary(&ctype) {
                Ok(b) => b,
                Err(e) => return http_error(StatusCode::BAD_REQUEST, format!("multipart: {e}")),
            };
            // Bounded: the whole upload by the file limit, the number of
            // parts, and the bytes before the first boundary (a body that
            // never shows one must not be buffered whole).
            let marker = format!("--{boundary}").into_bytes();
            let mut head: Option<Vec<u8>> = Some(Vec::new());
            use futures::StreamExt;
            let stream = req.into_body().into_data_stream().map(move |chunk| {
                let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()))?;
                if let Some(h) = head.as_mut() {
                    h.extend_from_slice(&chunk[..chunk.len().min(MAX_PREAMBLE)]);
                    if h.windows(marker.len()).any(|w| w == marker.as_slice()) {
                        head = None;
                    } else if h.len() >= MAX_PREAMBLE {
                        return Err(std::io::Error::other(
                            "no multipart boundary in the first 8 KiB",
                        ));
                    }
                }
                Ok::<_, std::io::Error>(chunk)
            });
            let constraints = multer::Constraints::new()
                .size_limit(multer::SizeLimit::new().whole_stream(max).per_field(max));
            let mut mp = multer::Multipart::with_constraints(stream, boundary, constraints);
            let mut parts = 0;
            loop {
                let field = match mp.next_field().await {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        return http_error(StatusCode::BAD_REQUEST, format!("multipart: {e}"))
                    }
                };
                parts += 1;
                if parts > MAX_PARTS {
                    return http_error(
                        StatusCode::BAD_REQUEST,
                        format!("more than {MAX_PARTS} files in one upload"),
                    );
                }
                let target = match (&q.path, field.file_name()) {
                    (Some(p), _) if !p.is_empty() && parts == 1 => p.clone(),
                    (_, Some(name)) if !name.is_empty() => name.to_string(),
                    _ => return http_error(StatusCode::BAD_REQUEST, "a file part without a path"),
                };
                if self.signed_path.as_ref().is_some_and(|p| *p != target) {
                    return http_error(
                        StatusCode::FORBIDDEN,
                        "a signed URL writes only the path it was signed for",
                    );
                }
                let path = self.resolve(&target);
                if let Err(r) = self.write_stream(&path, field, max).await {
                    return r;
                }
                written.push(json!({"name": base_name(&path), "type": "file", "path": path}));
            }
            if written.is_empty() {
                return http_error(StatusCode::BAD_REQUEST, "no file in the upload");
            }
        } else {
            let Some(target) = q.path.filter(|p| !p.is_empty()) else {
                return http_error(StatusCode::BAD_REQUEST, "path is required for a raw upload");
            };
            let gzip = match req
                .headers()
                .get(header::CONTENT_ENCODING)
                .map(|v| v.as_bytes().to_ascii_lowercase())
                .as_deref()
            {
                None | Some(b"identity") => false,
                Some(b"gzip") => true,
                Some(_) => {
                    return http_error(
                        StatusCode::BAD_REQUEST,
                        "Content-Encoding must be gzip or identity",
                    )
                }
            };
            let path = self.resolve(&target);
            let body = req.into_body().into_data_stream();
            let res = if gzip {
                // Bounded like any upload, by what it inflates to.
                self.write_stream(&path, Box::pin(gunzip(body)), max).await
            } else {
                self.write_stream(&path, body, max).await
            };
            if let Err(r) = res {
                return r;
            }
            written.push(json!({"name": base_name(&path), "type": "file", "path": path}));
        }
        crate::json::json_response(StatusCode::OK, &written)
    }

    /// Streams one upload into the sandbox, at most `max` bytes.
    async fn write_stream<S, E>(&self, path: &str, body: S, max: u64) -> Result<(), Response>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        // A user other than root gets the parents it lacks made as itself
        // and the file given to it, as envd's own writes would.
        let owner = self.as_user();
        if let Some(u) = &owner {
            let parent = match path.rsplit_once('/') {
                Some(("", _)) | None => "/",
                Some((d, _)) => d,
            };
            let missing = matches!(
                self.st.manager.stat_file(&self.id, parent, &self.caller).await,
                Err(e) if e.kind() == ErrorKind::NotFound
            );
            if missing {
                self.run(&["mkdir", "-p", "--", parent], Some(u.clone()))
                    .await
                    .map_err(|_| {
                        http_error(
                            StatusCode::FORBIDDEN,
                            format!("user {:?} cannot create {parent}", self.user.name),
                        )
                    })?;
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let write = self
            .st
            .manager
            .write_file_stream(&self.id, path, rx, "", &self.caller);
        use stacyvm_core::provider::{feed, Feed};
        let wrote = match feed(body, tx, max, write).await {
            Ok(_) => Ok(()),
            Err(Feed::Body(m)) => return Err(http_error(StatusCode::BAD_REQUEST, m)),
            Err(Feed::TooLarge(m)) => return Err(http_error(StatusCode::PAYLOAD_TOO_LARGE, m)),
            Err(Feed::Write(e)) => Err(e),
        };
        wrote.map_err(file_error)?;
        if let Some(u) = owner {
            self.run(&["chown", "-h", "--", &u, path], None)
                .await
                .map_err(|_| {
                    http_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("giving {path} to user {:?} failed", self.user.name),
                    )
                })?;
        }
        Ok(())
    }

    /// `process.Process/Start`: starts the process and streams its events.
    /// The process is registered (see [`Proc`]): it outlives this request
    /// (a client that goes away stops reading, not the process) and can
    /// be listed, reattached, fed and signalled until it exits.
    async fn start(&self, req: Request) -> Response {
        let timeout_ms = req
            .headers()
            .get("connect-timeout-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| *ms > 0);
        let body = match read_envelope(req).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        let start: StartRequest = match serde_json::from_value(body) {
            Ok(s) => s,
            Err(e) => return rpc_error("invalid_argument", format!("StartRequest: {e}")),
        };
        let Some(mut process) = start.process else {
            return rpc_error("invalid_argument", "process is required");
        };
        if process.cmd.is_empty() {
            return rpc_error("invalid_argument", "process.cmd is required");
        }
        // The SDKs hard-code /bin/bash for commands and ptys; an image
        // without it (busybox, alpine) runs them with /bin/sh, which takes
        // the same `-l -c` and `-i -l`.
        if process.cmd == "/bin/bash" {
            let stat = self
                .st
                .manager
                .stat_file(&self.id, "/bin/bash", &self.caller)
                .await;
            if matches!(&stat, Err(e) if e.kind() == ErrorKind::NotFound) {
                process.cmd = "/bin/sh".into();
            }
        }
        let pty = match &start.pty {
            None => None,
            Some(p) => {
                let size = &p["size"];
                let rows = size["rows"].as_u64().unwrap_or(24).clamp(1, 1000) as u16;
                let cols = size["cols"].as_u64().unwrap_or(80).clamp(1, 1000) as u16;
                Some((rows, cols))
            }
        };
        if let Some(tag) = &start.tag {
            if tag.len() > 256 {
                return rpc_error("invalid_argument", "tag is longer than 256 bytes");
            }
        }
        // Reserved before the process starts, so concurrent starts cannot
        // pass the cap together.
        let Some(reservation) = PROCS.reserve(&self.id) else {
            return rpc_error(
                "resource_exhausted",
                format!("{MAX_PROCS_PER_SANDBOX} processes already run in this sandbox"),
            );
        };
        // The per-sandbox and per-tenant caps on concurrent execs of
        // /api/v1 apply to envd's processes too, for as long as they run.
        let permit = match self.permit(true) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let exec = ExecRequest {
            command: process.cmd.clone(),
            args: process.args.clone(),
            mode: "argv".into(),
            env: {
                let u = &self.user;
                let mut e: BTreeMap<String, String> = [
                    ("HOME", u.home.as_str()),
                    ("USER", u.name.as_str()),
                    ("LOGNAME", u.name.as_str()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
                e.extend(self.sandbox_envs.clone());
                e.extend(process.envs.clone());
                e
            },
            user: self.as_user(),
            workdir: self.resolve(process.cwd.as_deref().unwrap_or("~")),
            timeout: timeout_ms.map(|ms| format!("{ms}ms")).unwrap_or_default(),
            pty,
            ..Default::default()
        };
        let (input, input_rx) = tokio::sync::mpsc::channel(64);
        let rx = match self
            .st
            .manager
            .exec_stream_with(&self.id, &exec, &self.caller, Some(input_rx))
            .await
        {
            Ok(rx) => rx,
            Err(e) => return rpc_fail(e),
        };
        // `"stdin": false`: the process reads end-of-file.
        if start.stdin == Some(false) && pty.is_none() {
            let _ = input.send(ExecInput::CloseStdin).await;
        }
        let proc = PROCS.register(&self.id, process, start.tag, pty.is_some(), input);
        drop(reservation);
        let (tx, out) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(16);
        tokio::spawn(forward(proc, rx, Some(tx), permit));
        connect_stream(out)
    }

    /// `process.Process/Connect`: the start event, then what the process
    /// prints from now on, then its end.
    async fn attach(&self, req: Request) -> Response {
        let body = match read_envelope(req).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        let proc = match PROCS.select(&self.id, &body["process"]) {
            Ok(p) => p,
            Err(r) => return r,
        };
        // A reader holds a slot for as long as it reads, like any stream.
        let permit = match self.permit(true) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let mut sub = proc.watchers.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(16);
        let pid = proc.pid;
        tokio::spawn(async move {
            let _permit = permit;
            if tx
                .send(Ok(envelope(0, &json!({"event": {"start": {"pid": pid}}}))))
                .await
                .is_err()
            {
                return;
            }
            loop {
                match sub.recv().await {
                    Ok(b) => {
                        if tx.send(Ok(b)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Ok(envelope(
                                2,
                                &json!({"error": {"code": "resource_exhausted", "message": format!("this reader fell {n} messages behind the process")}}),
                            )))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        connect_stream(out)
    }

    /// The unary `process.Process` calls.
    async fn process_call(&self, method: &str, req: Request) -> Response {
        match method {
            "StreamInput" => return self.stream_input(req).await,
            "List" | "SendInput" | "CloseStdin" | "SendSignal" | "Update" => {}
            other => {
                return rpc_error(
                    "unimplemented",
                    format!("process.Process/{other} does not exist"),
                )
            }
        }
        let body = match read_unary(req).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        if method == "List" {
            return crate::json::json_response(
                StatusCode::OK,
                &json!({"processes": PROCS.list(&self.id)}),
            );
        }
        let proc = match PROCS.select(&self.id, &body["process"]) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let input = match method {
            "SendInput" => match decode_input(&body["input"], proc.pty) {
                Ok(i) => i,
                Err(r) => return r,
            },
            "CloseStdin" => ExecInput::CloseStdin,
            "SendSignal" => match body["signal"].as_str().unwrap_or_default() {
                "SIGNAL_SIGKILL" | "9" => ExecInput::Signal(9),
                "SIGNAL_SIGTERM" | "15" => ExecInput::Signal(15),
                other => {
                    return rpc_error(
                        "invalid_argument",
                        format!("signal {other:?}: expected SIGNAL_SIGKILL or SIGNAL_SIGTERM"),
                    )
                }
            },
            "Update" => {
                let size = &body["pty"]["size"];
                match (size["rows"].as_u64(), size["cols"].as_u64()) {
                    (Some(r), Some(c)) if proc.pty => {
                        ExecInput::Resize(r.clamp(1, 1000) as u16, c.clamp(1, 1000) as u16)
                    }
                    _ => {
                        return rpc_error(
                            "invalid_argument",
                            "Update needs pty.size of a pty process",
                        )
                    }
                }
            }
            other => {
                return rpc_error(
                    "unimplemented",
                    format!("process.Process/{other} is not supported"),
                )
            }
        };
        match proc.send(input).await {
            Ok(()) => crate::json::json_response(StatusCode::OK, &json!({})),
            Err(r) => r,
        }
    }

    /// `process.Process/StreamInput`: a client stream of stdin chunks.
    async fn stream_input(&self, req: Request) -> Response {
        let ctype_ok = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/connect+json"));
        if !ctype_ok {
            return rpc_error(
                "invalid_argument",
                "StreamInput needs application/connect+json",
            );
        }
        let b = match read_body(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let msgs = match split_envelopes(&b) {
            Ok(m) => m,
            Err(r) => return r,
        };
        let mut proc: Option<Arc<Proc>> = None;
        for m in msgs {
            if let Some(start) = m.get("start") {
                proc = match PROCS.select(&self.id, &start["process"]) {
                    Ok(p) => Some(p),
                    Err(r) => return r,
                };
            } else if let Some(data) = m.get("data") {
                let Some(p) = &proc else {
                    return rpc_error("invalid_argument", "data before start");
                };
                let input = match decode_input(&data["input"], p.pty) {
                    Ok(i) => i,
                    Err(r) => return r,
                };
                if let Err(r) = p.send(input).await {
                    return r;
                }
            }
        }
        let mut body = envelope(0, &json!({})).to_vec();
        body.extend_from_slice(&envelope(2, &json!({})));
        let mut resp = Response::new(Body::from(body));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/connect+json"),
        );
        resp
    }

    /// The unary `filesystem.Filesystem` calls.
    async fn filesystem(&self, method: &str, req: Request) -> Response {
        let body = match read_unary(req).await {
            Ok(v) => v,
            Err(r) => return r,
        };
        let path_of = |k: &str| -> Result<String, Response> {
            match body
                .get(k)
                .and_then(Value::as_str)
                .filter(|p| !p.is_empty())
            {
                Some(p) => Ok(self.resolve(p)),
                None => Err(rpc_error("invalid_argument", format!("{k} is required"))),
            }
        };
        let m = &self.st.manager;
        let res: Result<Value, Response> = async {
            match method {
                "Stat" => {
                    let p = path_of("path")?;
                    let info = m
                        .stat_file(&self.id, &p, &self.caller)
                        .await
                        .map_err(rpc_fail)?;
                    Ok(json!({"entry": entry(&info, &p)}))
                }
                "ListDir" => {
                    let p = path_of("path")?;
                    // A big listing holds memory: it takes a slot like a
                    // transfer does.
                    let _permit = self.permit(true)?;
                    let depth = body
                        .get("depth")
                        .and_then(Value::as_u64)
                        .unwrap_or(1)
                        .clamp(1, 16);
                    let mut out = Vec::new();
                    self.list(&p, depth, &mut out).await?;
                    Ok(json!({"entries": out}))
                }
                "MakeDir" => {
                    let p = path_of("path")?;
                    match m.stat_file(&self.id, &p, &self.caller).await {
                        Ok(i) if i.is_dir => {
                            return Err(rpc_error("already_exists", format!("{p} already exists")))
                        }
                        Ok(_) => {
                            return Err(rpc_error(
                                "invalid_argument",
                                format!("{p} exists and is not a directory"),
                            ))
                        }
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => return Err(rpc_fail(e)),
                    }
                    self.run(&["mkdir", "-p", "--", &p], self.as_user()).await?;
                    let info = m
                        .stat_file(&self.id, &p, &self.caller)
                        .await
                        .map_err(rpc_fail)?;
                    Ok(json!({"entry": entry(&info, &p)}))
                }
                "Move" => {
                    let (from, to) = (path_of("source")?, path_of("destination")?);
                    m.move_file(&self.id, &from, &to, &self.caller)
                        .await
                        .map_err(rpc_fail)?;
                    let info = m
                        .stat_file(&self.id, &to, &self.caller)
                        .await
                        .map_err(rpc_fail)?;
                    Ok(json!({"entry": entry(&info, &to)}))
                }
                "Remove" => {
                    let p = path_of("path")?;
                    match m.delete_file(&self.id, &p, true, &self.caller).await {
                        Ok(()) => Ok(json!({})),
                        Err(e) if e.kind() == ErrorKind::NotFound => Ok(json!({})),
                        Err(e) => Err(rpc_fail(e)),
                    }
                }
                "CreateWatcher" | "GetWatcherEvents" | "RemoveWatcher" => {
                    self.watcher_call(method, &body).await
                }
                other => Err(rpc_error(
                    "unimplemented",
                    format!("filesystem.Filesystem/{other} does not exist"),
                )),
            }
        }
        .await;
        match res {
            Ok(v) => crate::json::json_response(StatusCode::OK, &v),
            Err(r) => r,
        }
    }

    /// Lists `dir` to `depth` levels (children only), as EntryInfo.
    async fn list(&self, dir: &str, depth: u64, out: &mut Vec<Value>) -> Result<(), Response> {
        let depth = u32::try_from(depth).unwrap_or(16);
        let items = self
            .st
            .manager
            .list_tree(&self.id, dir, depth, MAX_LIST_ENTRIES, &self.caller)
            .await
            .map_err(rpc_fail)?;
        out.extend(items.iter().map(|i| entry(i, &i.path)));
        Ok(())
    }

    /// Runs a helper command in the sandbox as `user` (`None` = root);
    /// fails on a nonzero exit with its stderr.
    async fn run(&self, argv: &[&str], user: Option<String>) -> Result<(), Response> {
        let req = ExecRequest {
            command: argv[0].to_string(),
            args: argv[1..].iter().map(|s| s.to_string()).collect(),
            mode: "argv".into(),
            timeout: "30s".into(),
            user,
            ..Default::default()
        };
        let out = self
            .st
            .manager
            .exec(&self.id, &req, &self.caller)
            .await
            .map_err(rpc_fail)?;
        if out.exit_code != 0 {
            return Err(rpc_error(
                "invalid_argument",
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(())
    }
}

/// A gzip body, inflated as it arrives. Compressed input goes to the
/// decoder 1 KiB at a time and what it inflates to is handed on at once
/// (deflate expands at most ~1000:1), so a bomb never holds more than
/// about a megabyte before the upload bound sees it.
fn gunzip<S, E>(body: S) -> impl futures::Stream<Item = Result<Bytes, String>> + Send
where
    S: futures::Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display,
{
    use std::io::Write;
    let decoder = flate2::write::GzDecoder::new(Vec::new());
    futures::stream::unfold(
        (body, Some(decoder), Bytes::new()),
        |(mut body, mut decoder, mut pending)| async move {
            use futures::StreamExt;
            loop {
                let dec = decoder.as_mut()?;
                if !pending.is_empty() {
                    let piece = pending.split_to(pending.len().min(1024));
                    if let Err(e) = dec.write_all(&piece) {
                        let err = Err(format!("the gzip body is corrupt: {e}"));
                        return Some((err, (body, None, pending)));
                    }
                    if !dec.get_ref().is_empty() {
                        let out = Bytes::from(std::mem::take(dec.get_mut()));
                        return Some((Ok(out), (body, decoder, pending)));
                    }
                    continue;
                }
                match body.next().await {
                    Some(Ok(chunk)) => pending = chunk,
                    Some(Err(e)) => {
                        let err = Err(format!("reading the upload: {e}"));
                        return Some((err, (body, None, pending)));
                    }
                    None => {
                        let mut dec = decoder.take()?;
                        if let Err(e) = dec.try_finish() {
                            let err = Err(format!("the gzip body is truncated: {e}"));
                            return Some((err, (body, None, pending)));
                        }
                        let rest = std::mem::take(dec.get_mut());
                        if rest.is_empty() {
                            return None;
                        }
                        return Some((Ok(Bytes::from(rest)), (body, None, pending)));
                    }
                }
            }
        },
    )
}

fn base_name(p: &str) -> String {
    p.rsplit('/').next().unwrap_or(p).to_string()
}

/// envd's `EntryInfo` of a StacyVM `FileInfo` at `path`.
fn entry(i: &FileInfo, path: &str) -> Value {
    let mode = u32::from_str_radix(i.mode.trim_start_matches("0o"), 8).unwrap_or(0);
    let (kind, bits) = if i.is_dir {
        ("FILE_TYPE_DIRECTORY", mode & 0o7777)
    } else {
        ("FILE_TYPE_FILE", mode & 0o7777)
    };
    let name = if i.name.is_empty() {
        base_name(path)
    } else {
        i.name.clone()
    };
    json!({
        "name": name,
        "type": kind,
        "path": path,
        "size": i.size.to_string(),
        "mode": bits,
        "permissions": permissions(i.is_dir, bits),
        "owner": "root",
        "group": "root",
        "modifiedTime": i.mod_time,
    })
}

fn permissions(dir: bool, bits: u32) -> String {
    let mut s = String::from(if dir { "d" } else { "-" });
    for shift in [6u32, 3, 0] {
        let b = (bits >> shift) & 7;
        s.push(if b & 4 != 0 { 'r' } else { '-' });
        s.push(if b & 2 != 0 { 'w' } else { '-' });
        s.push(if b & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn file_error(e: Error) -> Response {
    let api = crate::error::ApiError::from(e);
    http_error(api.status, api.message)
}

/// One Connect envelope: flags, big-endian length, JSON.
fn envelope(flags: u8, v: &Value) -> Bytes {
    let payload = serde_json::to_vec(v).unwrap_or_default();
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Bytes::from(out)
}

async fn read_body(req: Request) -> Result<Bytes, Response> {
    axum::body::to_bytes(req.into_body(), MAX_RPC_BYTES)
        .await
        .map_err(|_| {
            rpc_error(
                "resource_exhausted",
                format!("request larger than {MAX_RPC_BYTES} bytes"),
            )
        })
}

/// The one message of a server-streaming request.
async fn read_envelope(req: Request) -> Result<Value, Response> {
    let ctype_ok = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/connect+json"));
    if !ctype_ok {
        return Err(rpc_error(
            "invalid_argument",
            "a streaming call needs Content-Type application/connect+json",
        ));
    }
    let b = read_body(req).await?;
    if b.len() < 5 {
        return Err(rpc_error(
            "invalid_argument",
            "a Connect envelope is at least 5 bytes",
        ));
    }
    let flags = b[0];
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    if flags & 0x01 != 0 {
        return Err(rpc_error(
            "invalid_argument",
            "compressed envelopes are not supported",
        ));
    }
    if b.len() != 5 + len {
        return Err(rpc_error(
            "invalid_argument",
            format!("envelope says {len} bytes, the body has {}", b.len() - 5),
        ));
    }
    serde_json::from_slice(&b[5..])
        .map_err(|e| rpc_error("invalid_argument", format!("message is not JSON: {e}")))
}

/// The JSON body of a unary call.
async fn read_unary(req: Request) -> Result<Value, Response> {
    let ctype_ok = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !ctype_ok {
        return Err(rpc_error(
            "invalid_argument",
            "a unary call needs Content-Type application/json",
        ));
    }
    let b = read_body(req).await?;
    if b.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&b)
        .map_err(|e| rpc_error("invalid_argument", format!("message is not JSON: {e}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StartRequest {
    process: Option<ProcessConfig>,
    pty: Option<Value>,
    tag: Option<String>,
    stdin: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default)]
struct ProcessConfig {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

/// Routes envd requests (those with `E2b-Sandbox-Id`) before anything else.
pub async fn dispatch(
    axum::extract::State(st): axum::extract::State<AppState>,
    mut req: Request,
    next: axum::middleware::Next,
) -> Response {
    if is_envd(req.headers()) {
        return handle(st, req).await;
    }
    // Host routing (E2B's mode B): `<port>-<id>.<server.e2b_domain>`.
    if let Some((port, id)) = host_route(&st.cfg.server.e2b_domain, req.headers()) {
        if let (Ok(i), Ok(p)) = (HeaderValue::from_str(&id), HeaderValue::from_str(&port)) {
            let h = req.headers_mut();
            h.insert("e2b-sandbox-id", i);
            h.insert("e2b-sandbox-port", p);
            return handle(st, req).await;
        }
    }
    next.run(req).await
}

/// The port and sandbox id a `Host` of `<port>-<id>.<domain>` names.
pub fn host_route(domain: &str, h: &HeaderMap) -> Option<(String, String)> {
    let domain = domain.trim().trim_matches('.').to_ascii_lowercase();
    if domain.is_empty() {
        return None;
    }
    let host = h.get(header::HOST)?.to_str().ok()?.to_ascii_lowercase();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_string(),
        _ => host,
    };
    let label = host.strip_suffix(&format!(".{domain}"))?;
    let (port, id) = label.split_once('-')?;
    let port_ok = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    if !port_ok || id.is_empty() || id.contains('.') {
        return None;
    }
    Some((port.to_string(), id.to_string()))
}

/// Whether a `/files` request carries a valid signature of the SDKs'
/// `download_url`/`upload_url`: `v1_` + unpadded base64 of SHA-256 over
/// `path:op:user:token[:expiration]` with the sandbox's envd token,
/// unexpired.
fn signed(st: &AppState, rec: &SandboxRecord, req: &Request) -> bool {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    let op = match (req.method(), req.uri().path()) {
        (&Method::GET, "/files") => "read",
        (&Method::POST, "/files") => "write",
        _ => return false,
    };
    #[derive(Default, Deserialize)]
    struct Q {
        path: Option<String>,
        username: Option<String>,
        signature: Option<String>,
        signature_expiration: Option<String>,
    }
    let q: Q = query(req);
    let (Some(path), Some(sig)) = (q.path, q.signature) else {
        return false;
    };
    let token = st.e2b_keys.token(rec);
    let user = q.username.unwrap_or_default();
    let raw = match &q.signature_expiration {
        None => format!("{path}:{op}:{user}:{token}"),
        Some(exp) => {
            let Ok(at) = exp.parse::<i64>() else {
                return false;
            };
            if at <= chrono::Utc::now().timestamp() {
                return false;
            }
            format!("{path}:{op}:{user}:{token}:{exp}")
        }
    };
    let want = format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD
            .encode(sha2::Sha256::digest(raw.as_bytes()))
    );
    want.as_bytes().ct_eq(sig.as_bytes()).into()
}

/// A process envd started, until it exits.
struct Proc {
    pid: u32,
    sandbox: String,
    config: ProcessConfig,
    tag: Option<String>,
    pty: bool,
    /// Stdin, signals and resizes; `None` once the process has ended.
    input: parking_lot::Mutex<Option<tokio::sync::mpsc::Sender<ExecInput>>>,
    /// Envelopes for `Connect` readers (the starting request has its own).
    watchers: tokio::sync::broadcast::Sender<Bytes>,
}

impl Proc {
    async fn send(&self, input: ExecInput) -> Result<(), Response> {
        let tx = self.input.lock().clone();
        match tx {
            Some(tx) if tx.send(input).await.is_ok() => Ok(()),
            _ => Err(rpc_error(
                "not_found",
                format!("process {} has ended", self.pid),
            )),
        }
    }
}

/// Most processes envd runs at once in one sandbox.
const MAX_PROCS_PER_SANDBOX: usize = 256;
/// How long a process waits for the reader of its `Start` stream.
const PRIMARY_STALL: Duration = Duration::from_secs(10);

/// Every running envd process, by pid.
struct Procs {
    next: AtomicU32,
    map: parking_lot::Mutex<HashMap<u32, Arc<Proc>>>,
    /// Starts under way per sandbox (see [`Procs::reserve`]).
    pending: parking_lot::Mutex<HashMap<String, usize>>,
}

static PROCS: LazyLock<Procs> = LazyLock::new(|| Procs {
    next: AtomicU32::new(1000),
    map: Default::default(),
    pending: Default::default(),
});

/// A place under a sandbox's process cap, held from the check until the
/// process is registered (or its start failed).
struct Reservation(String);

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut p = PROCS.pending.lock();
        if let Some(n) = p.get_mut(&self.0) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                p.remove(&self.0);
            }
        }
    }
}

impl Procs {
    /// A place for one more process of `sandbox`; `None` at the cap
    /// (running and starting processes together).
    fn reserve(&self, sandbox: &str) -> Option<Reservation> {
        let map = self.map.lock();
        let mut pending = self.pending.lock();
        let running = map.values().filter(|p| p.sandbox == sandbox).count();
        let starting = pending.get(sandbox).copied().unwrap_or(0);
        if running + starting >= MAX_PROCS_PER_SANDBOX {
            return None;
        }
        *pending.entry(sandbox.to_string()).or_default() += 1;
        Some(Reservation(sandbox.to_string()))
    }

    fn register(
        &self,
        sandbox: &str,
        config: ProcessConfig,
        tag: Option<String>,
        pty: bool,
        input: tokio::sync::mpsc::Sender<ExecInput>,
    ) -> Arc<Proc> {
        let pid = self.next.fetch_add(1, Ordering::Relaxed);
        let proc = Arc::new(Proc {
            pid,
            sandbox: sandbox.to_string(),
            config,
            tag,
            pty,
            input: parking_lot::Mutex::new(Some(input)),
            // Bounds what a reader that stops reading makes the server keep.
            watchers: tokio::sync::broadcast::channel(64).0,
        });
        self.map.lock().insert(pid, proc.clone());
        proc
    }

    /// The process a `ProcessSelector` (`{"pid": N}` or `{"tag": "…"}`)
    /// names in this sandbox; another sandbox's is not found.
    fn select(&self, sandbox: &str, sel: &Value) -> Result<Arc<Proc>, Response> {
        let map = self.map.lock();
        let found = if let Some(pid) = sel.get("pid").and_then(Value::as_u64) {
            map.get(&(pid as u32)).cloned()
        } else if let Some(tag) = sel.get("tag").and_then(Value::as_str) {
            map.values()
                .find(|p| p.sandbox == sandbox && p.tag.as_deref() == Some(tag))
                .cloned()
        } else {
            return Err(rpc_error(
                "invalid_argument",
                "process needs a pid or a tag",
            ));
        };
        match found {
            Some(p) if p.sandbox == sandbox => Ok(p),
            _ => Err(rpc_error("not_found", format!("process {sel} not found"))),
        }
    }

    fn list(&self, sandbox: &str) -> Vec<Value> {
        let mut out: Vec<Value> = self
            .map
            .lock()
            .values()
            .filter(|p| p.sandbox == sandbox)
            .map(|p| {
                let mut v = json!({"pid": p.pid, "config": p.config});
                if let Some(t) = &p.tag {
                    v["tag"] = json!(t);
                }
                v
            })
            .collect();
        out.sort_by_key(|v| v["pid"].as_u64());
        out
    }

    fn remove(&self, pid: u32) {
        self.map.lock().remove(&pid);
    }
}

/// Turns a process's events into Connect envelopes for the starting
/// request (while it reads) and every `Connect` reader, until it ends.
async fn forward(
    proc: Arc<Proc>,
    mut rx: tokio::sync::mpsc::Receiver<StreamEvent>,
    mut primary: Option<tokio::sync::mpsc::Sender<Result<Bytes, std::convert::Infallible>>>,
    _permit: crate::active::Permit,
) {
    let keepalive = Duration::from_secs(30);
    let data_key = if proc.pty { "pty" } else { "stdout" };
    let emit = |b: Bytes, primary: &mut Option<tokio::sync::mpsc::Sender<_>>| {
        let _ = proc.watchers.send(b.clone());
        let p = primary.clone();
        async move {
            // A starting reader that stops reading is let go after a
            // while, so the process and its other readers go on.
            match p {
                Some(tx) => tx.send_timeout(Ok(b), PRIMARY_STALL).await.is_ok(),
                None => false,
            }
        }
    };
    let start = envelope(0, &json!({"event": {"start": {"pid": proc.pid}}}));
    if let Some(tx) = &primary {
        if tx.send(Ok(start)).await.is_err() {
            primary = None;
        }
    }
    let finish = loop {
        let ev = match tokio::time::timeout(keepalive, rx.recv()).await {
            Err(_) => {
                let b = envelope(0, &json!({"event": {"keepalive": {}}}));
                if !emit(b, &mut primary).await {
                    primary = None;
                }
                continue;
            }
            Ok(None) => {
                break vec![envelope(
                    2,
                    &json!({"error": {"code": "internal", "message": "the process stream ended without an exit"}}),
                )];
            }
            Ok(Some(ev)) => ev,
        };
        match ev {
            StreamEvent::Output(chunk) => {
                let key = match chunk.stream {
                    StreamKind::Stderr if !proc.pty => "stderr",
                    _ => data_key,
                };
                let b = envelope(
                    0,
                    &json!({"event": {"data": {key: B64.encode(&chunk.data)}}}),
                );
                if !emit(b, &mut primary).await {
                    primary = None;
                }
            }
            StreamEvent::Exit { code, .. } => {
                let status = format!("exit status {code}");
                let mut end = json!({"exitCode": code, "exited": true, "status": status});
                if code != 0 {
                    end["error"] = json!(status);
                }
                break vec![
                    envelope(0, &json!({"event": {"end": end}})),
                    envelope(2, &json!({})),
                ];
            }
            StreamEvent::Failed { kind, message: msg } => {
                let code = code_of_kind(kind);
                break vec![envelope(
                    2,
                    &json!({"error": {"code": code, "message": msg}}),
                )];
            }
        }
    };
    // Nothing reaches the process any more; it leaves the registry before
    // its readers see the end.
    proc.input.lock().take();
    PROCS.remove(proc.pid);
    for b in finish {
        if !emit(b, &mut primary).await {
            primary = None;
        }
    }
}

/// A Connect server-streaming response of envelopes from `out`.
fn connect_stream(
    out: tokio::sync::mpsc::Receiver<Result<Bytes, std::convert::Infallible>>,
) -> Response {
    let mut resp = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(out),
    ));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/connect+json"),
    );
    resp
}

/// The bytes of a `ProcessInput` (`{"stdin": b64}` or `{"pty": b64}`).
fn decode_input(v: &Value, pty: bool) -> Result<ExecInput, Response> {
    let key = if pty { "pty" } else { "stdin" };
    let Some(b64) = v
        .get(key)
        .or_else(|| v.get("stdin"))
        .and_then(Value::as_str)
    else {
        return Err(rpc_error(
            "invalid_argument",
            format!("input.{key} is required"),
        ));
    };
    let bytes = B64
        .decode(b64)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(b64))
        .map_err(|e| rpc_error("invalid_argument", format!("input is not base64: {e}")))?;
    Ok(ExecInput::Stdin(bytes))
}

/// The messages of a client stream (end-of-stream envelopes skipped).
fn split_envelopes(mut b: &[u8]) -> Result<Vec<Value>, Response> {
    let mut out = Vec::new();
    while !b.is_empty() {
        if b.len() < 5 {
            return Err(rpc_error("invalid_argument", "a truncated envelope"));
        }
        let flags = b[0];
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if b.len() < 5 + len {
            return Err(rpc_error("invalid_argument", "a truncated envelope"));
        }
        if flags & 0x01 != 0 {
            return Err(rpc_error(
                "invalid_argument",
                "compressed envelopes are not supported",
            ));
        }
        if flags & 0x02 == 0 {
            out.push(
                serde_json::from_slice(&b[5..5 + len]).map_err(|e| {
                    rpc_error("invalid_argument", format!("message is not JSON: {e}"))
                })?,
            );
        }
        b = &b[5 + len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, nanos: i64, owner: &str) -> SandboxRecord {
        let t = chrono::DateTime::from_timestamp_nanos(nanos);
        SandboxRecord {
            id: id.into(),
            state: "running".into(),
            provider: "native".into(),
            image: "host".into(),
            memory_mb: 512,
            vcpus: 1,
            metadata: BTreeMap::new(),
            owner_id: owner.into(),
            tenant_id: String::new(),
            vm_id: String::new(),
            worker_id: "local".into(),
            created_at: t,
            expires_at: t,
            updated_at: t,
            idle_timeout_secs: 0,
            on_timeout: String::new(),
            idle_deadline: t,
        }
    }

    /// A token names one sandbox: not another id, not a later sandbox
    /// that got the same id, not another owner's.
    #[test]
    fn a_token_opens_one_sandbox_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let keys = EnvdKeys::load(&dir.path().to_string_lossy());
        let a = record("sb-0000aaaa", 1_000, "alice");
        let t = keys.token(&a);
        assert!(keys.verify(&a, &t));
        assert!(!keys.verify(&record("sb-0000bbbb", 1_000, "alice"), &t));
        assert!(
            !keys.verify(&record("sb-0000aaaa", 2_000, "alice"), &t),
            "a reused id"
        );
        assert!(!keys.verify(&record("sb-0000aaaa", 1_000, "bob"), &t));
        assert!(!keys.verify(&a, ""));
        // The key persists: a restarted server accepts the same token.
        let again = EnvdKeys::load(&dir.path().to_string_lossy());
        assert!(again.verify(&a, &t));
        let mode = std::fs::metadata(dir.path().join("e2b-envd.key"))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .expect("key file");
        assert_eq!(mode, 0o600);
    }
}
