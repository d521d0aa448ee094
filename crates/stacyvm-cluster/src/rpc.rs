//! The worker's RPC server: what a control plane calls to run sandboxes on
//! this machine.
//!
//! It speaks the custom-provider contract (`docs/custom-provider.md`) with
//! every extension, plus three for clusters (`pty`, `user`, `fenced`), so
//! the control plane drives a worker with the same client it uses for any
//! HTTP backend, and the contract's conformance suite covers the pair.
//!
//! Every request must show, besides the transport's mutual TLS:
//! - `X-Worker-ID`: this worker's id;
//! - `X-Worker-Token`: a signed token for the audience `worker:rpc` and
//!   this worker, carrying the scope of the route (spawn, destroy, status,
//!   exec, files, logs), or the control plane's static token;
//! - `X-Stacyvm-Provider`: which of this worker's providers (default: its
//!   default one);
//! - on every request that acts on a sandbox, `X-Stacyvm-Lease:
//!   <holder>:<generation>`, the sandbox's lease as the control plane's
//!   store has it. The holder must be this worker, and the generation may
//!   never go back: a control plane acting on an old lease (one taken over
//!   since) is refused with 409 instead of touching a sandbox that is no
//!   longer its to touch.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::{json, Value};
use stacyvm_core::paths;
use stacyvm_core::provider::{
    ExecInput, ExecSpec, ExecUser, OutputChunk, Provider, SpawnSpec, StreamKind,
};
use stacyvm_core::registry::Registry;
use stacyvm_core::{Error, ErrorKind};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

use crate::token::{Audience, Scope, Verifier};

/// Extensions this server implements.
pub const EXTENSIONS: [&str; 15] = [
    "exit_status",
    "stdin",
    "timeout",
    "base64",
    "raw_files",
    "interactive",
    "pty",
    "user",
    "logs",
    "fenced",
    "stats",
    "watch",
    "pause",
    "archive",
    "connect",
];

/// Largest JSON request body (file writes in JSON are small; big files go
/// through `PUT /files/raw`).
const MAX_JSON_BODY: usize = 16 << 20;
/// Largest file a raw upload may carry.
pub const MAX_FILE_BYTES: u64 = 4 << 30;

/// The highest lease generation seen per sandbox, optionally on disk.
#[derive(Default)]
struct Fences {
    seen: HashMap<String, i64>,
    file: Option<std::path::PathBuf>,
}

impl Fences {
    /// Rewrites the file (temporary file, then rename: a crash leaves the
    /// old or the new map, never half of one). A failed write is logged;
    /// the in-memory map still fences this process.
    fn save(&self) {
        let Some(path) = &self.file else { return };
        let tmp = path.with_extension("tmp");
        let body = match serde_json::to_vec(&self.seen) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "encoding lease fences failed");
                return;
            }
        };
        if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::error!(path = %path.display(), error = %e, "saving lease fences failed");
        }
    }
}

/// How the control plane proves itself to this worker.
pub struct RpcAuth {
    pub worker_id: String,
    /// Signed tokens (audience `worker:rpc`).
    pub verifier: Verifier,
    /// The control plane's static token, if configured.
    pub static_token: Option<String>,
}

/// The worker's RPC state.
pub struct WorkerRpc {
    registry: Arc<Registry>,
    auth: RpcAuth,
    /// Highest lease generation seen per live sandbox.
    fences: parking_lot::Mutex<Fences>,
    /// No new sandboxes once set (drain).
    draining: AtomicBool,
    execs: parking_lot::Mutex<HashMap<String, mpsc::Sender<ExecInput>>>,
    running_execs: AtomicU64,
}

impl WorkerRpc {
    pub fn new(registry: Arc<Registry>, auth: RpcAuth) -> Arc<WorkerRpc> {
        Arc::new(WorkerRpc {
            registry,
            auth,
            fences: parking_lot::Mutex::default(),
            draining: AtomicBool::new(false),
            execs: parking_lot::Mutex::default(),
            running_execs: AtomicU64::new(0),
        })
    }

    /// Keeps the lease generations seen in `path` (JSON), loaded now and
    /// rewritten whenever one moves, so a restarted worker still refuses
    /// the generations it refused before. An unreadable file is an error:
    /// starting with no memory would accept stale leases again.
    pub fn persist_fences(&self, path: impl Into<std::path::PathBuf>) -> Result<(), String> {
        let path = path.into();
        let map = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<HashMap<String, i64>>(&b)
                .map_err(|e| format!("reading lease fences {}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(format!("reading lease fences {}: {e}", path.display())),
        };
        let mut f = self.fences.lock();
        for (k, v) in map {
            let seen = f.seen.entry(k).or_insert(v);
            *seen = (*seen).max(v);
        }
        f.file = Some(path);
        f.save();
        Ok(())
    }

    /// Forgets a destroyed sandbox's fence (the map holds live ones).
    fn forget_fence(&self, sandbox: &str) {
        let mut f = self.fences.lock();
        if f.seen.remove(sandbox).is_some() {
            f.save();
        }
    }

    /// Stops taking new sandboxes (existing ones keep being served).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The routes (serve them over TLS: see [`crate::tls`]).
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/health", get(health))
            .route("/spawn", post(spawn))
            .route("/exec", post(exec))
            .route("/exec/input", post(exec_input))
            .route(
                "/files",
                post(write_file).get(read_file).delete(delete_file),
            )
            .route("/files/raw", put(write_raw))
            .route("/files/list", get(list_files))
            .route("/files/stat", get(stat_file))
            .route("/files/glob", get(glob_files))
            .route("/files/move", post(move_file))
            .route("/files/chmod", post(chmod_file))
            .route("/status/{id}", get(status))
            .route("/sandboxes/{id}", delete(destroy))
            .route("/logs/{id}", get(logs))
            .route("/stats/{id}", get(stats))
            .route("/pause/{id}", post(pause))
            .route("/archive", get(archive_read).put(archive_write))
            .route("/connect/{id}/{port}", get(connect_port))
            .route("/resume/{id}", post(resume))
            .route("/files/watch", get(watch_files))
            .layer(middleware::from_fn_with_state(self.clone(), authenticate))
            .with_state(self.clone())
    }

    fn provider(&self, h: &HeaderMap) -> Result<Arc<dyn Provider>, Fail> {
        let name = header(h, "x-stacyvm-provider");
        self.registry.get(name).map_err(Fail::from)
    }

    /// Checks the lease the control plane acts under (see the module doc).
    fn fence(&self, h: &HeaderMap, sandbox: &str) -> Result<(), Fail> {
        self.fence_as(h, sandbox, false)
    }

    /// As [`Self::fence`]; with `moved_away`, a lease now held by another
    /// worker at a generation newer than any seen here is accepted too:
    /// the sandbox moved (a drain with `migrate`), and this copy may only
    /// be destroyed.
    fn fence_as(&self, h: &HeaderMap, sandbox: &str, moved_away: bool) -> Result<(), Fail> {
        let raw = header(h, "x-stacyvm-lease");
        let Some((holder, gen)) = raw.rsplit_once(':') else {
            return Err(Fail::new(
                StatusCode::CONFLICT,
                "conflict",
                "no lease: X-Stacyvm-Lease <holder>:<generation> is required",
            ));
        };
        let gen: i64 = gen.parse().map_err(|_| {
            Fail::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "bad lease generation",
            )
        })?;
        if holder != self.auth.worker_id {
            let seen = self.fences.lock().seen.get(sandbox).copied();
            if moved_away && seen.is_some_and(|s| gen > s) {
                return Ok(());
            }
            return Err(Fail::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("lease of {sandbox} is held by {holder:?}, not this worker"),
            ));
        }
        let mut fences = self.fences.lock();
        let seen = fences.seen.get(sandbox).copied();
        match seen {
            Some(seen) if gen < seen => Err(Fail::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "stale lease generation {gen} for {sandbox} (generation {seen} is current)"
                ),
            )),
            Some(seen) if gen == seen => Ok(()),
            _ => {
                fences.seen.insert(sandbox.to_string(), gen);
                fences.save();
                Ok(())
            }
        }
    }
}

impl WorkerRpc {
    /// The sandbox a request names, checked and fenced.
    fn target(&self, h: &HeaderMap, id: &str) -> Result<String, Fail> {
        let id = sandbox_id(id)?.to_string();
        self.fence(h, &id)?;
        Ok(id)
    }
}

impl RpcAuth {
    /// From config: the control planes' static token (`auth.worker_token`)
    /// and any signing keys for tokens of the audience `worker:rpc`.
    pub fn from_config(cfg: &stacyvm_core::config::Config, worker_id: &str) -> RpcAuth {
        let a = &cfg.auth;
        let keys: Vec<String> = std::iter::once(a.worker_signing_key.expose().to_string())
            .chain(a.worker_signing_keys.iter().map(|k| k.expose().to_string()))
            .filter(|k| !k.trim().is_empty())
            .collect();
        RpcAuth {
            worker_id: worker_id.to_string(),
            verifier: Verifier::new(&keys, &a.worker_revoked_token_ids),
            static_token: Some(a.worker_token.expose().trim().to_string())
                .filter(|s| !s.is_empty()),
        }
    }
}

/// The RPC URL others reach a worker at: `worker.advertise_url`, else the
/// listen address with the scheme TLS implies ("" without a listener).
pub fn advertised_url(cfg: &stacyvm_core::config::Config, listen: &str) -> String {
    if !cfg.worker.advertise_url.is_empty() {
        return cfg.worker.advertise_url.clone();
    }
    if listen.is_empty() {
        return String::new();
    }
    let scheme = if cfg.worker.rpc_tls.enabled {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{listen}")
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
}

/// An error answer in the contract's shape: `{"error", "kind"}`.
#[derive(Debug)]
struct Fail {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl Fail {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Fail {
        Fail {
            status,
            kind,
            message: message.into(),
        }
    }
}

fn kind_of(k: ErrorKind) -> (StatusCode, &'static str) {
    match k {
        ErrorKind::InvalidInput => (StatusCode::BAD_REQUEST, "invalid_input"),
        ErrorKind::SandboxNotFound => (StatusCode::NOT_FOUND, "sandbox_not_found"),
        ErrorKind::SandboxDestroyed => (StatusCode::GONE, "sandbox_destroyed"),
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        ErrorKind::Conflict => (StatusCode::CONFLICT, "conflict"),
        ErrorKind::ExecTimeout => (StatusCode::REQUEST_TIMEOUT, "exec_timeout"),
        ErrorKind::ResourceLimit => (StatusCode::TOO_MANY_REQUESTS, "resource_limit"),
        ErrorKind::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        ErrorKind::ProviderUnavailable | ErrorKind::StoreUnavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "provider_unavailable")
        }
        ErrorKind::Unsupported => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
        ErrorKind::SetupFailed => (StatusCode::UNPROCESSABLE_ENTITY, "setup_failed"),
        // A refusal to protect the host (a device, /proc): the control
        // plane reports it as its own 403.
        ErrorKind::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
        ErrorKind::ProviderNotFound | ErrorKind::Internal => {
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        }
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let (status, kind) = kind_of(e.kind());
        let message = if e.kind() == ErrorKind::ProviderNotFound {
            format!("this worker has no such provider: {}", e.detail())
        } else {
            e.to_string()
        };
        Fail::new(status, kind, message)
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.message, "kind": self.kind})),
        )
            .into_response()
    }
}

type Answer = Result<Response, Fail>;

fn ok(v: Value) -> Answer {
    Ok(Json(v).into_response())
}

/// Verifies the caller and the route's scope.
async fn authenticate(State(w): State<Arc<WorkerRpc>>, req: Request, next: Next) -> Response {
    let h = req.headers();
    let target = header(h, "x-worker-id");
    if target != w.auth.worker_id {
        return Fail::new(
            StatusCode::FORBIDDEN,
            "worker_auth",
            format!("this is worker {:?}, not {target:?}", w.auth.worker_id),
        )
        .into_response();
    }
    let token = match header(h, "x-worker-token") {
        "" => header(h, "authorization")
            .strip_prefix("Bearer ")
            .unwrap_or(""),
        t => t,
    };
    let scope = scope_of(req.uri().path(), req.method());
    let now = chrono::Utc::now().timestamp();
    let allowed = if token.starts_with(crate::token::PREFIX) {
        match w
            .auth
            .verifier
            .verify(token, Audience::Rpc, Some(&w.auth.worker_id), now)
        {
            Ok(v) => match scope {
                None => true,
                Some(s) => v.allows(s),
            }
            .then_some(())
            .ok_or_else(|| format!("the token lacks scope {}", scope.map_or("", Scope::as_str))),
            Err(e) => Err(e.to_string()),
        }
    } else {
        match &w.auth.static_token {
            Some(t)
                if !token.is_empty()
                    && t.len() == token.len()
                    && bool::from(t.as_bytes().ct_eq(token.as_bytes())) =>
            {
                Ok(())
            }
            _ => Err("invalid or missing worker credentials".to_string()),
        }
    };
    match allowed {
        Ok(()) => next.run(req).await,
        Err(reason) => {
            tracing::info!(%reason, path = %req.uri().path(), "worker RPC refused");
            let status = if reason.contains("lacks scope") {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            // Not "forbidden": that kind reaches API clients as their own
            // 403; a refused control plane is the operator's problem.
            Fail::new(status, "worker_auth", reason).into_response()
        }
    }
}

fn scope_of(path: &str, method: &axum::http::Method) -> Option<Scope> {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    match first {
        "health" => None,
        "spawn" => Some(Scope::Spawn),
        "exec" => Some(Scope::Exec),
        "files" | "archive" => Some(Scope::Files),
        "connect" => Some(Scope::Exec),
        "status" | "stats" => Some(Scope::Status),
        "logs" => Some(Scope::Logs),
        "sandboxes" if method == axum::http::Method::DELETE => Some(Scope::Destroy),
        _ => Some(Scope::Spawn),
    }
}

async fn health(State(w): State<Arc<WorkerRpc>>, h: HeaderMap) -> Answer {
    let p = w.provider(&h)?;
    p.health().await?;
    ok(json!({
        "status": if w.is_draining() { "draining" } else { "ok" },
        "worker_id": w.auth.worker_id,
        "provider": p.name(),
        "capabilities": p.capabilities(),
        "extensions": EXTENSIONS,
        "running_execs": w.running_execs.load(Ordering::Relaxed),
    }))
}

#[derive(Deserialize)]
struct SpawnBody {
    image: String,
    #[serde(default)]
    memory_mb: i64,
    #[serde(default)]
    vcpus: i64,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    sandbox_id: String,
    #[serde(default)]
    owner_id: String,
    #[serde(default)]
    tenant_id: String,
    #[serde(default)]
    network_mode: String,
    #[serde(default)]
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn sandbox_id(id: &str) -> Result<&str, Fail> {
    if paths::is_sandbox_id(id) {
        Ok(id)
    } else {
        Err(Fail::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            format!("{id:?} is not a sandbox id"),
        ))
    }
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Fail> {
    serde_json::from_slice(bytes).map_err(|e| {
        Fail::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            format!("bad request body: {e}"),
        )
    })
}

async fn spawn(State(w): State<Arc<WorkerRpc>>, h: HeaderMap, raw: axum::body::Bytes) -> Answer {
    if w.is_draining() {
        return Err(Fail::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_unavailable",
            format!("worker {} is draining", w.auth.worker_id),
        ));
    }
    let b: SpawnBody = body(&raw)?;
    let id = w.target(&h, &b.sandbox_id)?;
    let p = w.provider(&h)?;
    let spec = SpawnSpec {
        id: id.clone(),
        image: b.image,
        memory_mb: b.memory_mb,
        vcpus: b.vcpus,
        metadata: b.metadata,
        owner_id: b.owner_id,
        tenant_id: b.tenant_id,
        expires_at: b
            .expires_at
            .unwrap_or_else(|| chrono::Utc::now() + chrono::Duration::minutes(30)),
        network_mode: b.network_mode,
        snapshot: None,
        egress: None,
        volumes: Vec::new(),
    };
    let s = p.spawn(&spec).await?;
    tracing::info!(sandbox_id = %id, provider = p.name(), "sandbox spawned for the control plane");
    ok(json!({"id": s.runtime_id}))
}

#[derive(Deserialize)]
struct ExecBody {
    sandbox_id: String,
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    workdir: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    interactive: bool,
    #[serde(default)]
    pty: Option<(u16, u16)>,
    #[serde(default)]
    user: Option<UserBody>,
}

#[derive(Deserialize)]
struct UserBody {
    uid: u32,
    gid: u32,
}

fn record(v: &Value) -> axum::body::Bytes {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    line.into()
}

async fn exec(State(w): State<Arc<WorkerRpc>>, h: HeaderMap, raw: axum::body::Bytes) -> Answer {
    let b: ExecBody = body(&raw)?;
    let id = w.target(&h, &b.sandbox_id)?;
    let p = w.provider(&h)?;
    let stdin = match &b.stdin {
        Some(s) => Some(B64.decode(s).map_err(|_| {
            Fail::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "stdin is not base64",
            )
        })?),
        None => None,
    };
    let mut argv = vec![b.command];
    argv.extend(b.args);
    let spec = ExecSpec {
        argv,
        env: b.env,
        workdir: b.workdir,
        timeout: b.timeout_ms.map(Duration::from_millis),
        stdin,
        pty: b.pty,
        user: b.user.map(|u| ExecUser {
            uid: u.uid,
            gid: u.gid,
        }),
    };
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(64);
    if !b.stream {
        // The plain contract: one answer when the command has ended.
        let collect = async {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            while let Some(c) = rx.recv().await {
                match c.stream {
                    StreamKind::Stdout => out.extend_from_slice(&c.data),
                    StreamKind::Stderr => err.extend_from_slice(&c.data),
                }
            }
            (out, err)
        };
        let (status, (out, err)) = tokio::join!(p.exec(&id, &spec, tx), collect);
        let status = status?;
        return ok(json!({
            "exit_code": status.code,
            "stdout": String::from_utf8_lossy(&out),
            "stderr": String::from_utf8_lossy(&err),
        }));
    }
    // Streamed: output records while it runs, then the exit record. The
    // exec runs in its own task; a client that goes away drops the body,
    // which drops the receiver and, for interactive execs, their input.
    let (lines_tx, lines_rx) = mpsc::channel::<axum::body::Bytes>(64);
    let input = if b.interactive {
        let (in_tx, in_rx) = mpsc::channel::<ExecInput>(64);
        let exec_id = uuid_like();
        w.execs.lock().insert(exec_id.clone(), in_tx);
        let _ = lines_tx.send(record(&json!({"exec_id": exec_id}))).await;
        Some((exec_id, in_rx))
    } else {
        None
    };
    let w2 = w.clone();
    w.running_execs.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        let forward = {
            let lines_tx = lines_tx.clone();
            async move {
                while let Some(c) = rx.recv().await {
                    let r = json!({"stream": c.stream.as_str(), "data": B64.encode(&c.data), "encoding": "base64"});
                    if lines_tx.send(record(&r)).await.is_err() {
                        // The caller is gone; keep draining so the exec is not blocked.
                        while rx.recv().await.is_some() {}
                        break;
                    }
                }
            }
        };
        let (exec_id, run) = match input {
            Some((eid, in_rx)) => (
                Some(eid),
                futures::future::Either::Left(p.exec_interactive(&id, &spec, tx, in_rx)),
            ),
            None => (None, futures::future::Either::Right(p.exec(&id, &spec, tx))),
        };
        let (status, ()) = tokio::join!(run, forward);
        if let Some(eid) = exec_id {
            w2.execs.lock().remove(&eid);
        }
        w2.running_execs.fetch_sub(1, Ordering::Relaxed);
        let last = match status {
            Ok(s) => json!({"exit_code": s.code, "signal": s.signal}),
            Err(e) => {
                let (_, kind) = kind_of(e.kind());
                json!({"error": e.to_string(), "kind": kind})
            }
        };
        let _ = lines_tx.send(record(&last)).await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(lines_rx).map(Ok::<_, std::io::Error>);
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(|e| Fail::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

fn uuid_like() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[derive(Deserialize)]
struct InputBody {
    exec_id: String,
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    close_stdin: bool,
    #[serde(default)]
    signal: Option<i32>,
    #[serde(default)]
    resize: Option<(u16, u16)>,
}

async fn exec_input(State(w): State<Arc<WorkerRpc>>, raw: axum::body::Bytes) -> Answer {
    // (`w` is the table of running execs.)
    let b: InputBody = body(&raw)?;
    let Some(tx) = w.execs.lock().get(&b.exec_id).cloned() else {
        return Err(Fail::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such running exec",
        ));
    };
    if let Some(s) = b.stdin {
        let data = B64.decode(s).map_err(|_| {
            Fail::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "stdin is not base64",
            )
        })?;
        let _ = tx.send(ExecInput::Stdin(data)).await;
    }
    if let Some(sig) = b.signal {
        let _ = tx.send(ExecInput::Signal(sig)).await;
    }
    if let Some((r, c)) = b.resize {
        let _ = tx.send(ExecInput::Resize(r, c)).await;
    }
    if b.close_stdin {
        // Signals may still follow: the exec leaves the table when it ends.
        let _ = tx.send(ExecInput::CloseStdin).await;
    }
    ok(json!({}))
}

fn path_of(p: &str) -> Result<String, Fail> {
    let n = paths::normalize(p).map_err(Fail::from)?;
    if n != p {
        return Err(Fail::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            format!("path {p:?} is not absolute and clean"),
        ));
    }
    Ok(n)
}

#[derive(Deserialize)]
struct WriteBody {
    sandbox_id: String,
    path: String,
    content: String,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    encoding: String,
}

fn mode_of(m: &str) -> Result<u32, Fail> {
    if m.trim().is_empty() {
        return Ok(0o644);
    }
    u32::from_str_radix(m.trim(), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            Fail::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                format!("mode {m:?} is not octal"),
            )
        })
}

async fn write_file(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> Answer {
    if raw.len() > MAX_JSON_BODY {
        return Err(Fail::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "use PUT /files/raw",
        ));
    }
    let b: WriteBody = body(&raw)?;
    let id = w.target(&h, &b.sandbox_id)?;
    let data = if b.encoding == "base64" {
        B64.decode(&b.content).map_err(|_| {
            Fail::new(
                StatusCode::BAD_REQUEST,
                "invalid_input",
                "content is not base64",
            )
        })?
    } else {
        b.content.into_bytes()
    };
    w.provider(&h)?
        .write_file(&id, &path_of(&b.path)?, &data, mode_of(&b.mode)?)
        .await?;
    ok(json!({}))
}

#[derive(Deserialize)]
struct FileQuery {
    sandbox_id: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    pattern: String,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    max_bytes: Option<u64>,
}

async fn write_raw(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    Query(q): Query<FileQuery>,
    req: Request,
) -> Answer {
    let id = w.target(&h, &q.sandbox_id)?;
    let path = path_of(&q.path)?;
    let mode = mode_of(&q.mode)?;
    let p = w.provider(&h)?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
    let write = p.write_file_stream(&id, &path, mode, rx, MAX_FILE_BYTES);
    use stacyvm_core::provider::{feed, Feed};
    let size = match feed(
        req.into_body().into_data_stream(),
        tx,
        MAX_FILE_BYTES,
        write,
    )
    .await
    {
        Ok(n) => n,
        Err(Feed::Body(m)) => {
            return Err(Fail::new(StatusCode::BAD_REQUEST, "invalid_input", m));
        }
        Err(Feed::TooLarge(m)) => {
            return Err(Fail::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                m,
            ));
        }
        Err(Feed::Write(e)) => return Err(e.into()),
    };
    ok(json!({"size": size}))
}

async fn read_file(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    Query(q): Query<FileQuery>,
) -> Answer {
    let id = w.target(&h, &q.sandbox_id)?;
    let max = q.max_bytes.unwrap_or(MAX_FILE_BYTES).min(MAX_FILE_BYTES);
    let fs = w
        .provider(&h)?
        .read_file_stream(&id, &path_of(&q.path)?, max)
        .await?;
    let size = fs.size;
    let stream = tokio_stream::wrappers::ReceiverStream::new(fs.chunks).map(|c| {
        c.map(axum::body::Bytes::from)
            .map_err(|e| std::io::Error::other(e.to_string()))
    });
    Response::builder()
        .header("content-type", "application/octet-stream")
        .header("content-length", size)
        .body(Body::from_stream(stream))
        .map_err(|e| Fail::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

async fn list_files(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    Query(q): Query<FileQuery>,
) -> Answer {
    let id = w.target(&h, &q.sandbox_id)?;
    let l = w.provider(&h)?.list_files(&id, &path_of(&q.path)?).await?;
    ok(serde_json::to_value(l).unwrap_or_default())
}

async fn stat_file(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    Query(q): Query<FileQuery>,
) -> Answer {
    let id = w.target(&h, &q.sandbox_id)?;
    let f = w.provider(&h)?.stat_file(&id, &path_of(&q.path)?).await?;
    ok(serde_json::to_value(f).unwrap_or_default())
}

async fn glob_files(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    Query(q): Query<FileQuery>,
) -> Answer {
    let id = w.target(&h, &q.sandbox_id)?;
    let pattern = paths::normalize_pattern(&q.pattern).map_err(Fail::from)?;
    let g = w.provider(&h)?.glob_files(&id, &pattern).await?;
    ok(json!(g))
}

#[derive(Deserialize)]
struct PathBody {
    sandbox_id: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    recursive: bool,
    #[serde(default)]
    old_path: String,
    #[serde(default)]
    new_path: String,
    #[serde(default)]
    mode: String,
}

async fn delete_file(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> Answer {
    let b: PathBody = body(&raw)?;
    let id = w.target(&h, &b.sandbox_id)?;
    w.provider(&h)?
        .delete_file(&id, &path_of(&b.path)?, b.recursive)
        .await?;
    ok(json!({}))
}

async fn move_file(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> Answer {
    let b: PathBody = body(&raw)?;
    let id = w.target(&h, &b.sandbox_id)?;
    w.provider(&h)?
        .move_file(&id, &path_of(&b.old_path)?, &path_of(&b.new_path)?)
        .await?;
    ok(json!({}))
}

async fn chmod_file(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    raw: axum::body::Bytes,
) -> Answer {
    let b: PathBody = body(&raw)?;
    let id = w.target(&h, &b.sandbox_id)?;
    w.provider(&h)?
        .chmod_file(&id, &path_of(&b.path)?, mode_of(&b.mode)?)
        .await?;
    ok(json!({}))
}

async fn status(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Answer {
    let id = w.target(&h, &id)?;
    let s = w.provider(&h)?.status(&id).await?;
    ok(json!({"id": id, "state": s.state}))
}

async fn destroy(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Answer {
    let id = sandbox_id(&id)?.to_string();
    w.fence_as(&h, &id, true)?;
    match w.provider(&h)?.destroy(&id).await {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::SandboxNotFound | ErrorKind::NotFound) => {}
        Err(e) => return Err(e.into()),
    }
    w.forget_fence(&id);
    tracing::info!(sandbox_id = %id, "sandbox destroyed for the control plane");
    ok(json!({}))
}

async fn stats(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Answer {
    let id = w.target(&h, &id)?;
    let s = w.provider(&h)?.stats(&id).await?;
    ok(json!({
        "cpu_pct": s.cpu_pct,
        "mem_bytes": s.mem_bytes,
        "mem_limit_bytes": s.mem_limit_bytes,
    }))
}

/// `POST /pause/{id}`: the cgroup freezer, the engine's pause or the VM's
/// stop, as the worker's provider does it (fenced like every change).
async fn pause(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Answer {
    let id = w.target(&h, &id)?;
    w.provider(&h)?.pause(&id).await?;
    ok(json!({}))
}

/// `POST /resume/{id}`.
async fn resume(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Answer {
    let id = w.target(&h, &id)?;
    w.provider(&h)?.resume(&id).await?;
    ok(json!({}))
}

#[derive(Deserialize)]
struct ArchiveQuery {
    sandbox_id: String,
    path: String,
    max_bytes: u64,
    max_entries: u64,
}

impl ArchiveQuery {
    fn limits(&self) -> stacyvm_core::provider::ArchiveLimits {
        stacyvm_core::provider::ArchiveLimits {
            max_bytes: self.max_bytes,
            max_entries: self.max_entries,
        }
    }
}

/// `GET /archive?sandbox_id=&path=&max_bytes=&max_entries=`: the tar
/// stream of `path` (chunked; its length is not known ahead).
async fn archive_read(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    Query(q): Query<ArchiveQuery>,
) -> Answer {
    let id = w.target(&h, &q.sandbox_id)?;
    let fs = w
        .provider(&h)?
        .archive_read(&id, &path_of(&q.path)?, q.limits())
        .await?;
    // Framed (`archive_frame`): an error part way (a limit, a file that
    // went away) reaches the control plane with its kind, and a cut-off
    // transfer is told from a complete one.
    let frames = futures::stream::unfold(Some(fs.chunks), |rx| async move {
        let mut rx = rx?;
        Some(match rx.recv().await {
            Some(Ok(data)) => (
                Ok::<_, std::io::Error>(archive_frame(FRAME_DATA, &data)),
                Some(rx),
            ),
            Some(Err(e)) => {
                let (_, kind) = kind_of(e.kind());
                let body = json!({"error": e.detail(), "kind": kind}).to_string();
                (Ok(archive_frame(FRAME_ERROR, body.as_bytes())), None)
            }
            None => (Ok(archive_frame(FRAME_END, b"")), None),
        })
    });
    Response::builder()
        .header("content-type", ARCHIVE_FRAMED)
        .body(Body::from_stream(frames))
        .map_err(|e| Fail::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// Content type of a framed archive stream: frames of one type byte, a
/// big-endian u32 length and that many bytes — data, an error (JSON
/// `{"error", "kind"}`, last) or the end (empty, last).
pub const ARCHIVE_FRAMED: &str = "application/vnd.stacyvm.archive-frames";
pub const FRAME_DATA: u8 = 0;
pub const FRAME_ERROR: u8 = 1;
pub const FRAME_END: u8 = 2;

fn archive_frame(kind: u8, data: &[u8]) -> axum::body::Bytes {
    let mut out = Vec::with_capacity(5 + data.len());
    out.push(kind);
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
    out.into()
}

/// `PUT /archive?…`: extracts the tar body into `path`; `{"entries",
/// "bytes"}`. A body that breaks off leaves nothing (the provider's
/// extraction sees its channel close before the end).
async fn archive_write(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    Query(q): Query<ArchiveQuery>,
    req: Request,
) -> Answer {
    let id = w.target(&h, &q.sandbox_id)?;
    let path = path_of(&q.path)?;
    let p = w.provider(&h)?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
    let write = p.archive_write(&id, &path, rx, q.limits());
    let pump = async move {
        let mut body = req.into_body().into_data_stream();
        while let Some(c) = body.next().await {
            match c {
                Ok(b) => {
                    if tx.send(b.to_vec()).await.is_err() {
                        return;
                    }
                }
                // Dropping `tx` without the end: the extraction is undone.
                Err(_) => return,
            }
        }
    };
    let (report, ()) = tokio::join!(write, pump);
    let r = report?;
    ok(json!({"entries": r.entries, "bytes": r.bytes}))
}

/// `GET /connect/{id}/{port}` with `Upgrade: stacyvm-port`: 101, then the
/// connection carries the bytes of a TCP connection to `port` inside the
/// sandbox (the preview proxy of a control plane). The port is dialled
/// before the answer, so a closed port is an error, not an empty tunnel.
async fn connect_port(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    axum::extract::Path((id, port)): axum::extract::Path<(String, u16)>,
    mut req: Request,
) -> Answer {
    let id = w.target(&h, &id)?;
    if port == 0 {
        return Err(Fail::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "port must be 1-65535",
        ));
    }
    let wants = h
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(CONNECT_PROTOCOL));
    if !wants {
        return Err(Fail::new(
            StatusCode::BAD_REQUEST,
            "invalid_input",
            format!("connect needs Upgrade: {CONNECT_PROTOCOL}"),
        ));
    }
    let mut upstream = w.provider(&h)?.connect(&id, port).await?;
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let mut client = hyper_util::rt::TokioIo::new(up);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(axum::http::header::CONNECTION, "upgrade")
        .header(axum::http::header::UPGRADE, CONNECT_PROTOCOL)
        .body(Body::empty())
        .map_err(|e| Fail::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// The `Upgrade` protocol name of a port tunnel.
pub const CONNECT_PROTOCOL: &str = "stacyvm-port";

#[derive(Deserialize)]
struct WatchQuery {
    sandbox_id: String,
    path: String,
    #[serde(default)]
    recursive: bool,
}

/// How often an idle watch stream says it is alive (a control plane that
/// went away is noticed on the next write).
const WATCH_KEEPALIVE: Duration = Duration::from_secs(15);

/// `GET /files/watch?sandbox_id=&path=&recursive=`: NDJSON, one
/// `{"events": [{"name", "op"}]}` per batch, `{}` keepalives, and a last
/// `{"error", "kind"}` if the watch fails. The stream ends when the
/// directory goes away; the watch ends when the caller hangs up.
async fn watch_files(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    Query(q): Query<WatchQuery>,
) -> Answer {
    let id = w.target(&h, &q.sandbox_id)?;
    let mut events = w
        .provider(&h)?
        .watch_dir(&id, &path_of(&q.path)?, q.recursive)
        .await?;
    let (tx, rx) = mpsc::channel::<axum::body::Bytes>(16);
    tokio::spawn(async move {
        let mut keepalive = tokio::time::interval(WATCH_KEEPALIVE);
        keepalive.tick().await;
        loop {
            let line = tokio::select! {
                ev = events.recv() => match ev {
                    Some(Ok(batch)) => json!({"events": batch
                        .iter()
                        .map(|e| json!({"name": e.name, "op": e.op.as_str()}))
                        .collect::<Vec<_>>()}),
                    Some(Err(e)) => {
                        let (_, kind) = kind_of(e.kind());
                        let _ = tx.send(record(&json!({"error": e.to_string(), "kind": kind}))).await;
                        return;
                    }
                    None => return,
                },
                _ = keepalive.tick() => json!({}),
                () = tx.closed() => return,
            };
            if tx.send(record(&line)).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::io::Error>);
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(|e| Fail::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    lines: Option<usize>,
}

async fn logs(
    State(w): State<Arc<WorkerRpc>>,
    h: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<LogsQuery>,
) -> Answer {
    let id = w.target(&h, &id)?;
    let l = w
        .provider(&h)?
        .logs(&id, q.lines.unwrap_or(100).min(10_000))
        .await?;
    ok(json!({"lines": l}))
}
