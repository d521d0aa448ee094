//! The custom HTTP provider: StacyVM drives a sandbox backend that someone
//! else wrote, over the JSON/HTTP contract of `docs/custom-provider.md`
//! (spec: runtime.md §3.6).
//!
//! The backend is trusted code, but its answers are not trusted input: every
//! response is size-capped (JSON documents at [`MAX_JSON_BYTES`], listings at
//! [`MAX_LIST_BYTES`], NDJSON lines at [`MAX_LINE_BYTES`], file reads at the
//! caller's limit), every request ends within `providers.custom.timeout`,
//! and every failure becomes a typed [`Error`] that quotes the backend's
//! reason and says what to fix.
//!
//! A backend that implements only the spec works. A backend that lists
//! optional extensions in its `GET /health` answer
//! (`{"extensions": ["exit_status", …]}`) gets more: streamed exec output
//! with an exit code, stdin, backend-side timeouts, binary and streamed file
//! transfers, interactive execs. See [`Extensions`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use reqwest::header::{HeaderValue, ACCEPT};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde_json::{json, Map, Value};
use stacyvm_api::FileInfo;
use stacyvm_core::config::{Config, CustomConfig};
use stacyvm_core::provider::{
    capability, format_mod_time, format_mode, ArchiveLimits, ArchiveReport, ExecInput, ExecSpec,
    ExitStatus, FileStream, FsEvent, FsEvents, FsOp, Isolation, OutputChunk, OutputSink,
    PortStream, Profile, Provider, RuntimeStatus, SpawnSpec, Spawned, Stats, StreamKind,
};
use stacyvm_core::{paths, Error, ErrorKind, Result};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Largest JSON document accepted from a backend (spawn, status, exec
/// result, stat, error bodies are cut much shorter).
pub const MAX_JSON_BYTES: usize = 8 << 20;
/// Largest directory listing or glob result.
pub const MAX_LIST_BYTES: usize = 32 << 20;
/// Longest line of an NDJSON exec stream.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Largest file [`Provider::read_file`] buffers; streamed reads use the
/// caller's limit.
pub const MAX_READ_BYTES: u64 = 256 << 20;
/// Bytes of an error body kept as the backend's reason.
const MAX_REASON_BYTES: usize = 4096;
/// How long an error body may take to arrive.
const REASON_TIMEOUT: Duration = Duration::from_secs(5);
/// Characters of the reason quoted in an error message.
const MAX_REASON_CHARS: usize = 512;
/// Longest a directory watch stays open (the caller ends it sooner by
/// dropping its receiver).
const MAX_WATCH: Duration = Duration::from_secs(24 * 3600);
/// Deadline of a best-effort cleanup request.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the backend gets beyond an exec's own timeout to report it.
const EXEC_GRACE: Duration = Duration::from_secs(5);
/// The placeholder console log of the contract.
const CONSOLE_LINE: &str = "[INFO] console logs not available for custom provider";
/// Where the contract is documented, quoted in hints.
const CONTRACT_DOC: &str = "docs/custom-provider.md";

/// Optional features a backend declares in `GET /health`:
/// `{"extensions": ["exit_status", "stdin", …]}`. Unknown names are ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extensions {
    /// `POST /exec` with `"stream": true` ends with `{"exit_code": N}` (or
    /// `{"error": …}`); execs then stream while the command runs.
    pub exit_status: bool,
    /// `POST /exec` accepts `"stdin"` (base64).
    pub stdin: bool,
    /// `POST /exec` accepts `"timeout_ms"` and kills the command's process
    /// tree when it elapses, reporting `{"error", "kind": "exec_timeout"}`
    /// (or HTTP 408).
    pub timeout: bool,
    /// `POST /files` accepts `"encoding": "base64"` content.
    pub base64: bool,
    /// `PUT /files/raw?sandbox_id=&path=&mode=` takes the file as a raw
    /// (chunked) body and replaces the file only when the body is complete.
    pub raw_files: bool,
    /// `POST /exec` with `"interactive": true` first sends
    /// `{"exec_id": "…"}`; `POST /exec/input` then feeds stdin and signals.
    pub interactive: bool,
    /// (StacyVM workers) `"pty": [rows, cols]` in an interactive exec runs
    /// it on a terminal; `POST /exec/input {"resize": [rows, cols]}`.
    pub pty: bool,
    /// (StacyVM workers) `"user": {"uid", "gid"}` in `/exec`.
    pub user: bool,
    /// (StacyVM workers) `GET /logs/{id}?lines=` answers `{"lines": […]}`.
    pub logs: bool,
    /// (StacyVM workers) `GET /stats/{id}` answers `{"cpu_pct",
    /// "mem_bytes", "mem_limit_bytes"}`.
    pub stats: bool,
    /// (StacyVM workers) `GET /files/watch?sandbox_id=&path=&recursive=`
    /// streams NDJSON `{"events": [{"name", "op"}]}` batches.
    pub watch: bool,
    /// (StacyVM workers) `POST /pause/{id}` and `POST /resume/{id}` freeze
    /// and thaw a sandbox (idempotent); `GET /status/{id}` then says
    /// `paused`.
    pub pause: bool,
    /// (StacyVM workers) `GET /archive?sandbox_id=&path=&max_bytes=&max_entries=`
    /// streams a tar of `path`; `PUT /archive?…` extracts a tar body and
    /// answers `{"entries", "bytes"}`.
    pub archive: bool,
    /// (StacyVM workers) `GET /connect/{id}/{port}` with `Upgrade:
    /// stacyvm-port` answers 101 and then carries a TCP connection to the
    /// port inside the sandbox.
    pub connect: bool,
}

impl Extensions {
    /// Every extension name this provider understands.
    pub const ALL: [&'static str; 14] = [
        "exit_status",
        "stdin",
        "timeout",
        "base64",
        "raw_files",
        "interactive",
        "pty",
        "user",
        "logs",
        "stats",
        "watch",
        "pause",
        "archive",
        "connect",
    ];

    /// Reads the `extensions` array of a `/health` answer.
    pub fn from_health(v: &Value) -> Extensions {
        let mut e = Extensions::default();
        let Some(list) = v.get("extensions").and_then(Value::as_array) else {
            return e;
        };
        for name in list.iter().filter_map(Value::as_str) {
            match name {
                "exit_status" => e.exit_status = true,
                "stdin" => e.stdin = true,
                "timeout" => e.timeout = true,
                "base64" => e.base64 = true,
                "raw_files" => e.raw_files = true,
                "interactive" => e.interactive = true,
                "pty" => e.pty = true,
                "user" => e.user = true,
                "logs" => e.logs = true,
                "stats" => e.stats = true,
                "watch" => e.watch = true,
                "pause" => e.pause = true,
                "archive" => e.archive = true,
                "connect" => e.connect = true,
                _ => {}
            }
        }
        e
    }

    /// The names of the extensions that are on.
    pub fn names(&self) -> Vec<&'static str> {
        let flags = [
            self.exit_status,
            self.stdin,
            self.timeout,
            self.base64,
            self.raw_files,
            self.interactive,
            self.pty,
            self.user,
            self.logs,
            self.stats,
            self.watch,
            self.pause,
            self.archive,
            self.connect,
        ];
        let mut out = Vec::new();
        for (name, on) in Self::ALL.iter().zip(flags) {
            if on {
                out.push(*name);
            }
        }
        out
    }
}

/// Adds what a request needs beyond the contract (StacyVM workers: worker
/// credentials, the sandbox's lease, the provider to use). Called before
/// every request; `sandbox` is the sandbox it acts on, if any.
#[async_trait]
pub trait Decorate: Send + Sync + fmt::Debug {
    async fn decorate(&self, rb: RequestBuilder, sandbox: Option<&str>) -> Result<RequestBuilder>;

    /// The backend refused a call about `sandbox` with 409 (for a worker:
    /// the lease sent is not the current one): drop what was cached about
    /// it, so the next call sends the store's.
    fn refused(&self, _sandbox: &str) {}
}

/// A sandbox provider backed by a user's HTTP service.
pub struct CustomProvider {
    name: String,
    base: Url,
    /// `base` without credentials, for messages and `describe`.
    shown: String,
    /// The `X-API-Key` value (marked sensitive), if a key is configured.
    api_key: Option<HeaderValue>,
    timeout: Duration,
    client: reqwest::Client,
    /// What the last successful `/health` said; `None` until one answered.
    extensions: Mutex<Option<Extensions>>,
    decorate: Option<Arc<dyn Decorate>>,
    /// Capabilities the backend reported on `/health` (workers do).
    reported: Mutex<Option<Vec<String>>>,
    /// An HTTP/1.1-only client for port tunnels (an `Upgrade` needs
    /// HTTP/1.1; workers speak HTTP/2 when TLS offers it); `None`: `client`.
    tunnel: Option<reqwest::Client>,
}

impl fmt::Debug for CustomProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomProvider")
            .field("name", &self.name)
            .field("base", &self.shown)
            .field(
                "api_key",
                &if self.api_key.is_none() {
                    ""
                } else {
                    "[REDACTED]"
                },
            )
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Parses `providers.custom.base_url`: an absolute `http`/`https` URL.
pub fn parse_base_url(raw: &str) -> std::result::Result<Url, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("base_url is empty".into());
    }
    let url = Url::parse(raw).map_err(|e| format!("base_url {raw:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "base_url {raw:?} must start with http:// or https://"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("base_url {raw:?} has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "base_url {raw:?} must not have a query or fragment"
        ));
    }
    Ok(url)
}

fn is_loopback(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl CustomProvider {
    /// Builds the provider from `providers.custom`; an empty or malformed
    /// `base_url`, an empty name or a zero timeout is `InvalidInput`.
    pub fn from_config(cfg: &CustomConfig) -> Result<CustomProvider> {
        let name = cfg.name.trim();
        if name.is_empty() {
            return Err(Error::invalid(
                "providers.custom.name is empty; set it to the provider's registry name, e.g. custom",
            ));
        }
        let base = parse_base_url(&cfg.base_url).map_err(|e| {
            Error::invalid(format!(
                "providers.custom: {e}; set providers.custom.base_url to the backend's address, e.g. http://127.0.0.1:8090"
            ))
        })?;
        let timeout = cfg.timeout.std();
        if timeout.is_zero() {
            return Err(Error::invalid(
                "providers.custom.timeout must be longer than 0s, e.g. 60s",
            ));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // A redirect could carry the API key to another host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("stacyvm/", env!("CARGO_PKG_VERSION")));
        if is_loopback(&base) {
            builder = builder.no_proxy();
        }
        let client = builder.build().map_err(|e| {
            Error::internal("building the custom provider's HTTP client").with_source(e)
        })?;
        let api_key = if cfg.api_key.is_empty() {
            None
        } else {
            let mut v = HeaderValue::from_str(cfg.api_key.expose()).map_err(|_| {
                Error::invalid(
                    "providers.custom.api_key contains characters an HTTP header cannot carry",
                )
            })?;
            v.set_sensitive(true);
            Some(v)
        };
        let mut shown = base.clone();
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        Ok(CustomProvider {
            name: name.to_string(),
            base,
            shown: shown.to_string(),
            api_key,
            timeout,
            client,
            extensions: Mutex::new(None),
            decorate: None,
            reported: Mutex::new(None),
            tunnel: None,
        })
    }

    /// A provider for a StacyVM worker: its own HTTP client (mutual TLS)
    /// and a decorator that adds credentials, lease and provider to every
    /// request.
    pub fn for_worker(
        cfg: &CustomConfig,
        client: reqwest::Client,
        decorate: Arc<dyn Decorate>,
    ) -> Result<CustomProvider> {
        let mut p = CustomProvider::from_config(cfg)?;
        p.client = client;
        p.decorate = Some(decorate);
        Ok(p)
    }

    /// Port tunnels (`connect`) go through `client` (HTTP/1.1 only).
    pub fn with_tunnel_client(mut self, client: reqwest::Client) -> CustomProvider {
        self.tunnel = Some(client);
        self
    }

    async fn decorated(&self, rb: RequestBuilder, id: Option<&str>) -> Result<RequestBuilder> {
        match &self.decorate {
            Some(d) => d.decorate(rb, id).await,
            None => Ok(rb),
        }
    }

    /// The backend's base URL.
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// `base` + escaped path segments.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.pop_if_empty();
            segs.extend(segments);
        }
        url
    }

    fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        let rb = self.client.request(method, self.url(segments));
        match &self.api_key {
            Some(key) => rb.header("X-API-Key", key.clone()),
            None => rb,
        }
    }

    fn hint_contract(&self) -> String {
        format!(
            "hint: the backend at {} must follow {CONTRACT_DOC}",
            self.shown
        )
    }

    /// A request that never reached an answer.
    fn transport_error(&self, op: &str, e: reqwest::Error) -> Error {
        if e.is_timeout() {
            Error::unavailable(format!(
                "{}: {op}: no answer from {} within {:?}; hint: check the backend's health and logs, or raise providers.custom.timeout",
                self.name, self.shown, self.timeout
            ))
        } else if e.is_connect() {
            Error::unavailable(format!(
                "{}: {op}: cannot connect to {}; hint: start the backend or fix providers.custom.base_url",
                self.name, self.shown
            ))
            .with_source(e.without_url())
        } else {
            Error::unavailable(format!(
                "{}: {op}: the connection to {} failed; hint: the backend may have crashed, see its logs",
                self.name, self.shown
            ))
            .with_source(e.without_url())
        }
    }

    /// An answer that is not the contract's.
    fn garbage(&self, op: &str, what: &str, body: &[u8]) -> Error {
        let start = String::from_utf8_lossy(&body[..body.len().min(64)]).into_owned();
        Error::internal(format!(
            "{}: {op}: the backend's answer is invalid: {what} (it starts with {start:?}); {}",
            self.name,
            self.hint_contract()
        ))
    }

    /// Sends a request; a non-2xx answer becomes a typed error.
    async fn send(&self, op: &str, id: Option<&str>, rb: RequestBuilder) -> Result<Response> {
        let rb = self.decorated(rb, id).await?;
        let resp = rb.send().await.map_err(|e| self.transport_error(op, e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.status_error(op, id, resp).await)
    }

    /// Maps a non-2xx answer (spec: 404, 410, 408, 429, 503, other) to an
    /// error; a JSON body's `kind` (extension) refines it.
    async fn status_error(&self, op: &str, id: Option<&str>, mut resp: Response) -> Error {
        let status = resp.status();
        let mut body = Vec::new();
        let read = async {
            while body.len() < MAX_REASON_BYTES {
                match resp.chunk().await {
                    Ok(Some(c)) => body.extend_from_slice(&c),
                    Ok(None) | Err(_) => break,
                }
            }
        };
        // The status is the answer; the reason gets a few seconds at most.
        let _ = tokio::time::timeout(self.timeout.min(REASON_TIMEOUT), read).await;
        body.truncate(MAX_REASON_BYTES);
        let (reason, kind) = parse_error_body(&body);
        if let (Some(d), Some(id), StatusCode::CONFLICT) = (&self.decorate, id, status) {
            d.refused(id);
        }
        debug!(provider = %self.name, op, status = status.as_u16(), reason = %reason, "backend refused");
        // A StacyVM worker is a peer: its refusals to protect the host
        // (devices, /proc) are the server's own 403, as they would be
        // locally. A user's backend cannot claim that kind.
        if self.decorate.is_some()
            && status == StatusCode::FORBIDDEN
            && serde_json::from_slice::<Value>(&body)
                .is_ok_and(|v| v.get("kind").and_then(Value::as_str) == Some("forbidden"))
        {
            return Error::forbidden(reason);
        }
        status_to_error(&self.name, op, id, status, &reason, kind)
    }

    /// Reads a body of at most `cap` bytes.
    async fn read_capped(&self, op: &str, mut resp: Response, cap: usize) -> Result<Vec<u8>> {
        if resp.content_length().is_some_and(|n| n > cap as u64) {
            return Err(self.too_big(op, cap));
        }
        let mut body = Vec::new();
        while let Some(c) = resp
            .chunk()
            .await
            .map_err(|e| self.transport_error(op, e))?
        {
            if body.len() + c.len() > cap {
                return Err(self.too_big(op, cap));
            }
            body.extend_from_slice(&c);
        }
        Ok(body)
    }

    fn too_big(&self, op: &str, cap: usize) -> Error {
        Error::internal(format!(
            "{}: {op}: the backend's answer is larger than {cap} bytes; {}",
            self.name,
            self.hint_contract()
        ))
    }

    async fn read_json(&self, op: &str, resp: Response, cap: usize) -> Result<Value> {
        let body = self.read_capped(op, resp, cap).await?;
        serde_json::from_slice(&body)
            .map_err(|e| self.garbage(op, &format!("not JSON: {e}"), &body))
    }

    fn archive_query(id: &str, path: &str, limits: ArchiveLimits) -> [(&'static str, String); 4] {
        [
            ("sandbox_id", id.to_string()),
            ("path", path.to_string()),
            ("max_bytes", limits.max_bytes.to_string()),
            ("max_entries", limits.max_entries.to_string()),
        ]
    }

    /// `POST /pause/{id}` or `POST /resume/{id}` (the `pause` extension).
    async fn freeze(&self, what: &str, id: &str) -> Result<()> {
        if !self.extensions().await.pause {
            return Err(Error::unsupported(format!(
                "{}: {what} (the backend does not declare the pause extension)",
                self.name
            )));
        }
        let op = if what == "pause" {
            "POST /pause"
        } else {
            "POST /resume"
        };
        self.send(op, Some(id), self.request(Method::POST, &[what, id]))
            .await
            .map(|_| ())
    }

    /// The backend's extensions, asking `/health` once if never known.
    async fn extensions(&self) -> Extensions {
        if let Some(e) = *self.extensions.lock().unwrap_or_else(|p| p.into_inner()) {
            return e;
        }
        // A backend that cannot answer now gets the plain contract; the
        // next call (or health probe) asks again.
        self.probe().await.unwrap_or_default()
    }

    /// `GET /health`; remembers the extensions it declares.
    async fn probe(&self) -> Result<Extensions> {
        let op = "GET /health";
        let rb = self
            .decorated(self.request(Method::GET, &["health"]), None)
            .await?;
        let resp = rb.send().await.map_err(|e| self.transport_error(op, e))?;
        let status = resp.status();
        if status.as_u16() >= 400 {
            let e = self.status_error(op, None, resp).await;
            return Err(Error::unavailable(format!(
                "{}: {op} answered HTTP {}: {}",
                self.name,
                status.as_u16(),
                e.detail()
            )));
        }
        // Any answer below 400 is healthy; a JSON body may list extensions.
        let body = self
            .read_capped(op, resp, MAX_JSON_BYTES)
            .await
            .unwrap_or_default();
        let parsed = serde_json::from_slice::<Value>(&body).ok();
        let ext = parsed
            .as_ref()
            .map(Extensions::from_health)
            .unwrap_or_default();
        if let Some(caps) = parsed
            .as_ref()
            .and_then(|v| v.get("capabilities"))
            .and_then(Value::as_array)
        {
            *self.reported.lock().unwrap_or_else(|p| p.into_inner()) = Some(
                caps.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            );
        }
        *self.extensions.lock().unwrap_or_else(|p| p.into_inner()) = Some(ext);
        Ok(ext)
    }

    /// Best-effort `DELETE /sandboxes/{id}` after a failed spawn.
    async fn cleanup(&self, id: &str) {
        let rb = self
            .request(Method::DELETE, &["sandboxes", id])
            .timeout(self.timeout.min(CLEANUP_TIMEOUT));
        let rb = match self.decorated(rb, Some(id)).await {
            Ok(rb) => rb,
            Err(e) => {
                warn!(provider = %self.name, runtime_id = id, error = %e, "cleanup after a failed spawn could not be sent");
                return;
            }
        };
        match rb.send().await {
            Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {
                debug!(provider = %self.name, runtime_id = id, "cleaned up after a failed spawn");
            }
            Ok(r) => warn!(provider = %self.name, runtime_id = id, status = r.status().as_u16(),
                "cleanup after a failed spawn was refused; the backend may keep a sandbox"),
            Err(e) => warn!(provider = %self.name, runtime_id = id, error = %e,
                "cleanup after a failed spawn failed; the backend may keep a sandbox"),
        }
    }

    async fn simple(
        &self,
        op: &str,
        id: &str,
        method: Method,
        segs: &[&str],
        body: Value,
    ) -> Result<()> {
        let rb = self.request(method, segs).json(&body);
        self.send(op, Some(id), rb).await?;
        Ok(())
    }

    /// Runs an exec in the buffered (spec) or streamed (extension) form.
    async fn run_exec(
        &self,
        id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
        input: Option<mpsc::Receiver<ExecInput>>,
    ) -> Result<ExitStatus> {
        let Some((prog, args)) = spec.argv.split_first() else {
            return Err(Error::invalid("empty command"));
        };
        let ext = self.extensions().await;
        if spec.pty.is_some() && !(ext.pty && input.is_some()) {
            return Err(Error::unsupported(format!(
                "{}: pty exec (the backend does not declare the pty extension)",
                self.name
            )));
        }
        let mut body = Map::new();
        body.insert("sandbox_id".into(), id.into());
        body.insert("command".into(), prog.as_str().into());
        // The orchestrator already built the argv (shell quoting included).
        body.insert("mode".into(), "argv".into());
        if !args.is_empty() {
            body.insert("args".into(), json!(args));
        }
        if !spec.env.is_empty() {
            body.insert("env".into(), json!(spec.env));
        }
        if !spec.workdir.is_empty() {
            body.insert("workdir".into(), spec.workdir.as_str().into());
        }
        match spec.user {
            Some(u) if ext.user => {
                body.insert("user".into(), json!({"uid": u.uid, "gid": u.gid}));
            }
            Some(u) if u.uid != 0 => {
                return Err(Error::unsupported(format!(
                    "{}: running a command as a user other than root",
                    self.name
                )));
            }
            _ => {}
        }
        if let Some((rows, cols)) = spec.pty {
            body.insert("pty".into(), json!([rows, cols]));
        }
        if let Some(stdin) = &spec.stdin {
            if !ext.stdin {
                return Err(Error::unsupported(format!(
                    "{}: stdin (the backend does not declare the stdin extension)",
                    self.name
                )));
            }
            body.insert(
                "stdin".into(),
                base64::engine::general_purpose::STANDARD
                    .encode(stdin)
                    .into(),
            );
        }
        if input.is_some() && !(ext.interactive && ext.exit_status) {
            return Err(Error::unsupported(format!(
                "{}: interactive exec (the backend does not declare the interactive and exit_status extensions)",
                self.name
            )));
        }
        // The whole exec, output included, ends within providers.custom.timeout.
        let (deadline, capped) = match spec.timeout {
            Some(t) if t + EXEC_GRACE <= self.timeout => (t + EXEC_GRACE, false),
            _ => (self.timeout, true),
        };
        if let (Some(t), true) = (spec.timeout, ext.timeout) {
            let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1);
            body.insert("timeout_ms".into(), ms.into());
        }
        let work = async {
            if ext.exit_status {
                self.exec_streamed(id, body, deadline, sink, input).await
            } else {
                self.exec_buffered(id, body, deadline, sink).await
            }
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) if capped && spec.timeout.is_none_or(|t| t > self.timeout) => {
                Err(Error::new(
                    ErrorKind::ExecTimeout,
                    format!(
                        "{id} (providers.custom.timeout of {:?} caps every exec; raise it for longer commands)",
                        self.timeout
                    ),
                ))
            }
            Err(_) => Err(Error::exec_timeout(id)),
        }
    }

    /// Spec exec: one JSON answer `{exit_code, stdout, stderr}`; output
    /// reaches the sink when the command has ended.
    async fn exec_buffered(
        &self,
        id: &str,
        body: Map<String, Value>,
        deadline: Duration,
        sink: OutputSink,
    ) -> Result<ExitStatus> {
        let op = "POST /exec";
        let rb = self
            .request(Method::POST, &["exec"])
            .timeout(deadline + Duration::from_secs(1))
            .json(&body);
        let resp = self.send(op, Some(id), rb).await?;
        let body = self.read_capped(op, resp, MAX_JSON_BYTES).await?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| self.garbage(op, &format!("not JSON: {e}"), &body))?;
        let Some(code) = v.get("exit_code").and_then(Value::as_i64) else {
            return Err(self.garbage(op, "no integer exit_code", &body));
        };
        for (kind, key) in [
            (StreamKind::Stdout, "stdout"),
            (StreamKind::Stderr, "stderr"),
        ] {
            let text = match v.get(key) {
                None | Some(Value::Null) => "",
                Some(Value::String(s)) => s.as_str(),
                Some(_) => return Err(self.garbage(op, &format!("{key} is not a string"), &body)),
            };
            if !text.is_empty() {
                let _ = sink
                    .send(OutputChunk {
                        stream: kind,
                        data: text.as_bytes().to_vec(),
                    })
                    .await;
            }
        }
        Ok(exit_status(code, None))
    }

    /// Extension exec: NDJSON output records while the command runs, then
    /// `{"exit_code": N}` or `{"error": …}`.
    async fn exec_streamed(
        &self,
        id: &str,
        mut body: Map<String, Value>,
        deadline: Duration,
        sink: OutputSink,
        input: Option<mpsc::Receiver<ExecInput>>,
    ) -> Result<ExitStatus> {
        let op = "POST /exec (stream)";
        body.insert("stream".into(), true.into());
        if input.is_some() {
            body.insert("interactive".into(), true.into());
        }
        let rb = self
            .request(Method::POST, &["exec"])
            .header(ACCEPT, HeaderValue::from_static("application/x-ndjson"))
            .timeout(deadline + Duration::from_secs(1))
            .json(&body);
        let resp = self.send(op, Some(id), rb).await?;
        let mut lines = Ndjson::new(resp);
        // Input is forwarded concurrently with reading the output, so a
        // command that does not read its stdin cannot stall its output.
        let (eid_tx, eid_rx) = tokio::sync::oneshot::channel::<String>();
        let mut eid_tx = Some(eid_tx);
        let forward = async {
            if let (Some(mut input), Ok(eid)) = (input, eid_rx.await) {
                while let Some(msg) = input.recv().await {
                    self.forward_input(id, &eid, msg).await;
                }
                // Dropping the input closes stdin.
                self.forward_input(id, &eid, ExecInput::CloseStdin).await;
            }
            std::future::pending::<Result<ExitStatus>>().await
        };
        let read = async {
            let mut bad_lines = 0usize;
            loop {
                let line = lines.next_line().await.map_err(|e| match e {
                    NdjsonError::Transport(e) => self.transport_error(op, e),
                    NdjsonError::TooLong => Error::internal(format!(
                        "{}: {op}: the backend sent an NDJSON line longer than {MAX_LINE_BYTES} bytes; {}",
                        self.name,
                        self.hint_contract()
                    )),
                })?;
                let Some(line) = line else {
                    return Err(Error::internal(format!(
                        "{}: {op}: the exec stream ended without an exit record; hint: the backend crashed or closed the connection early, see its logs",
                        self.name
                    )));
                };
                match parse_record(&line) {
                    Record::Skip => {}
                    Record::Output(stream, data) => {
                        // A closed receiver must not fail the exec.
                        let _ = sink.send(OutputChunk { stream, data }).await;
                    }
                    Record::Exit(status) => return Ok(status),
                    Record::Error(reason, kind) => {
                        return Err(match kind {
                            Some(ErrorKind::ExecTimeout) => Error::exec_timeout(id),
                            Some(k) => Error::new(k, reason),
                            None => Error::internal(format!(
                                "{}: {op}: the backend reported: {reason}",
                                self.name
                            )),
                        })
                    }
                    Record::ExecId(eid) => {
                        if let Some(tx) = eid_tx.take() {
                            let _ = tx.send(eid);
                        }
                    }
                    Record::Bad => {
                        bad_lines += 1;
                        if bad_lines == 1 {
                            warn!(
                                provider = %self.name,
                                sandbox_id = id,
                                "skipping an invalid NDJSON line from the backend"
                            );
                        }
                    }
                }
            }
        };
        tokio::select! {
            r = read => r,
            r = forward => r,
        }
    }

    /// `POST /exec/input`; failures are logged (the stream tells the outcome).
    async fn forward_input(&self, id: &str, exec_id: &str, msg: ExecInput) {
        let mut body = Map::new();
        body.insert("exec_id".into(), exec_id.into());
        match msg {
            ExecInput::Stdin(d) => {
                body.insert(
                    "stdin".into(),
                    base64::engine::general_purpose::STANDARD.encode(d).into(),
                );
            }
            ExecInput::CloseStdin => {
                body.insert("close_stdin".into(), true.into());
            }
            ExecInput::Signal(n) => {
                body.insert("signal".into(), n.into());
            }
            ExecInput::Resize(rows, cols) => {
                body.insert("resize".into(), json!([rows, cols]));
            }
        }
        let rb = self.request(Method::POST, &["exec", "input"]).json(&body);
        if let Err(e) = self.send("POST /exec/input", Some(id), rb).await {
            debug!(provider = %self.name, sandbox_id = id, error = %e, "exec input not delivered");
        }
    }

    fn file_query<'a>(id: &'a str, key: &'a str, value: &'a str) -> [(&'a str, &'a str); 2] {
        [("sandbox_id", id), (key, value)]
    }

    /// `GET /files/<sub>?sandbox_id=&<key>=<value>` as JSON of at most `max` bytes.
    async fn files_get(
        &self,
        op: &str,
        sub: &str,
        id: &str,
        key: &str,
        value: &str,
        max: usize,
    ) -> Result<Value> {
        let rb = self
            .request(Method::GET, &["files", sub])
            .query(&Self::file_query(id, key, value));
        let resp = self.send(op, Some(id), rb).await?;
        self.read_json(op, resp, max).await
    }

    /// A JSON array answer (`null` is empty).
    fn json_list(&self, op: &str, v: Value) -> Result<Vec<Value>> {
        match v {
            Value::Null => Ok(Vec::new()),
            Value::Array(a) => Ok(a),
            _ => Err(self.garbage(op, "not a JSON array", b"")),
        }
    }

    /// `PUT /files/raw` with a streamed body (extension `raw_files`).
    async fn put_raw(&self, id: &str, path: &str, mode: u32, body: reqwest::Body) -> Result<()> {
        let mode = octal(mode);
        let rb = self
            .request(Method::PUT, &["files", "raw"])
            .query(&[("sandbox_id", id), ("path", path), ("mode", mode.as_str())])
            .body(body);
        self.send("PUT /files/raw", Some(id), rb).await?;
        Ok(())
    }
}

/// `0644`-style mode string.
fn octal(mode: u32) -> String {
    format!("{:04o}", mode & 0o7777)
}

fn exit_status(code: i64, signal: Option<i64>) -> ExitStatus {
    let signal = signal
        .and_then(|s| i32::try_from(s).ok())
        .filter(|s| *s > 0);
    let code = i32::try_from(code).unwrap_or(-1);
    ExitStatus { code, signal }
}

/// Reason and kind of an error body: JSON `{"error"|"message": …, "kind"?}`
/// or text.
fn parse_error_body(body: &[u8]) -> (String, Option<ErrorKind>) {
    let mut reason = String::new();
    let mut kind = None;
    if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) {
        for key in ["error", "message", "detail"] {
            if let Some(s) = m.get(key).and_then(Value::as_str) {
                reason = s.to_string();
                break;
            }
        }
        kind = m.get("kind").and_then(Value::as_str).and_then(parse_kind);
    }
    if reason.is_empty() {
        reason = String::from_utf8_lossy(body).into_owned();
    }
    (clean_reason(&reason), kind)
}

/// One line, printable, at most [`MAX_REASON_CHARS`] characters.
fn clean_reason(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.trim().chars().enumerate() {
        if i >= MAX_REASON_CHARS {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// The error kinds a backend may name (`"kind"` in an error body or record).
fn parse_kind(s: &str) -> Option<ErrorKind> {
    Some(match s {
        "invalid_input" => ErrorKind::InvalidInput,
        "not_found" => ErrorKind::NotFound,
        "sandbox_not_found" => ErrorKind::SandboxNotFound,
        "sandbox_destroyed" => ErrorKind::SandboxDestroyed,
        "conflict" => ErrorKind::Conflict,
        "exec_timeout" => ErrorKind::ExecTimeout,
        "resource_limit" => ErrorKind::ResourceLimit,
        "payload_too_large" => ErrorKind::PayloadTooLarge,
        "provider_unavailable" => ErrorKind::ProviderUnavailable,
        "unsupported" => ErrorKind::Unsupported,
        "internal" => ErrorKind::Internal,
        // Policy kinds (forbidden, provider_not_found) are the server's own.
        _ => return None,
    })
}

/// The contract's status mapping: 404 sandbox not found, 410 destroyed,
/// 408 exec timeout, 429 resource limit, 503 unavailable, other generic.
fn status_to_error(
    provider: &str,
    op: &str,
    id: Option<&str>,
    status: StatusCode,
    reason: &str,
    kind: Option<ErrorKind>,
) -> Error {
    let code = status.as_u16();
    let with_id = |id: Option<&str>| match (id, reason.is_empty()) {
        (Some(id), true) => id.to_string(),
        (Some(id), false) => format!("{id} ({reason})"),
        (None, _) => reason.to_string(),
    };
    let kind = kind.or(match code {
        404 => Some(ErrorKind::SandboxNotFound),
        410 => Some(ErrorKind::SandboxDestroyed),
        408 => Some(ErrorKind::ExecTimeout),
        429 => Some(ErrorKind::ResourceLimit),
        503 => Some(ErrorKind::ProviderUnavailable),
        _ => None,
    });
    match kind {
        Some(
            k @ (ErrorKind::SandboxNotFound | ErrorKind::SandboxDestroyed | ErrorKind::ExecTimeout),
        ) => Error::new(k, with_id(id)),
        Some(ErrorKind::ProviderUnavailable) => Error::unavailable(format!("{provider}: {reason}")),
        Some(ErrorKind::Internal) | None => {
            let hint = match code {
                401 | 403 => "check that providers.custom.api_key matches the backend's key",
                500..=599 => "see the backend's logs",
                300..=399 => "the backend must answer directly; redirects are not followed",
                _ => "the request or the backend does not follow docs/custom-provider.md",
            };
            Error::internal(format!(
                "{provider}: {op} failed (HTTP {code}): {reason}; hint: {hint}"
            ))
        }
        Some(k) => Error::new(k, reason.to_string()),
    }
}

/// One parsed NDJSON exec record.
#[derive(Debug, PartialEq)]
enum Record {
    Skip,
    Bad,
    Output(StreamKind, Vec<u8>),
    Exit(ExitStatus),
    Error(String, Option<ErrorKind>),
    ExecId(String),
}

fn parse_record(line: &[u8]) -> Record {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Record::Skip;
    }
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(line) else {
        return Record::Bad;
    };
    if let Some(code) = m.get("exit_code") {
        let signal = m.get("signal").and_then(Value::as_i64);
        return match code.as_i64() {
            Some(c) => Record::Exit(exit_status(c, signal)),
            None => Record::Bad,
        };
    }
    if let Some(err) = m.get("error") {
        let reason = err.as_str().map_or_else(|| err.to_string(), str::to_string);
        let kind = m.get("kind").and_then(Value::as_str).and_then(parse_kind);
        return Record::Error(clean_reason(&reason), kind);
    }
    if let Some(eid) = m.get("exec_id").and_then(Value::as_str) {
        return Record::ExecId(eid.to_string());
    }
    let stream = match m.get("stream").and_then(Value::as_str) {
        Some("stdout") => StreamKind::Stdout,
        Some("stderr") => StreamKind::Stderr,
        _ => return Record::Bad,
    };
    let Some(data) = m.get("data").and_then(Value::as_str) else {
        return Record::Bad;
    };
    let data = if m.get("encoding").and_then(Value::as_str) == Some("base64") {
        match base64::engine::general_purpose::STANDARD.decode(data) {
            Ok(d) => d,
            Err(_) => return Record::Bad,
        }
    } else {
        data.as_bytes().to_vec()
    };
    Record::Output(stream, data)
}

#[derive(Debug)]
enum NdjsonError {
    Transport(reqwest::Error),
    TooLong,
}

/// Splits a response body into lines of at most [`MAX_LINE_BYTES`].
struct Ndjson {
    resp: Response,
    buf: Vec<u8>,
    start: usize,
    done: bool,
}

impl Ndjson {
    fn new(resp: Response) -> Ndjson {
        Ndjson {
            resp,
            buf: Vec::new(),
            start: 0,
            done: false,
        }
    }

    /// The next line without its newline; `None` at the end. Cancel-safe:
    /// data is only moved into `buf` once a chunk has arrived.
    async fn next_line(&mut self) -> std::result::Result<Option<Vec<u8>>, NdjsonError> {
        loop {
            if let Some(pos) = self.buf[self.start..].iter().position(|b| *b == b'\n') {
                let line = self.buf[self.start..self.start + pos].to_vec();
                self.start += pos + 1;
                return Ok(Some(line));
            }
            if self.buf.len() - self.start > MAX_LINE_BYTES {
                return Err(NdjsonError::TooLong);
            }
            if self.done {
                if self.start == self.buf.len() {
                    return Ok(None);
                }
                let line = self.buf[self.start..].to_vec();
                self.start = self.buf.len();
                return Ok(Some(line));
            }
            match self.resp.chunk().await {
                Ok(Some(c)) => {
                    self.buf.drain(..self.start);
                    self.start = 0;
                    self.buf.extend_from_slice(&c);
                }
                Ok(None) => self.done = true,
                Err(e) => return Err(NdjsonError::Transport(e)),
            }
        }
    }
}

/// One line of a watch stream: a batch (`{}` keepalives are empty), or
/// the backend's error.
fn parse_watch_line(name: &str, line: &[u8]) -> Result<Vec<FsEvent>> {
    let bad = |why: &str| {
        Error::unavailable(format!(
            "{name}: GET /files/watch: {why}: {}",
            clean_reason(&String::from_utf8_lossy(&line[..line.len().min(200)]))
        ))
    };
    let v: Value = serde_json::from_slice(line).map_err(|_| bad("not a JSON line"))?;
    if let Some(err) = v.get("error") {
        let reason = err.as_str().unwrap_or("watch failed");
        let kind = v.get("kind").and_then(Value::as_str).and_then(parse_kind);
        return Err(Error::new(
            kind.unwrap_or(ErrorKind::ProviderUnavailable),
            clean_reason(reason),
        ));
    }
    let Some(events) = v.get("events") else {
        return Ok(Vec::new());
    };
    let events = events
        .as_array()
        .ok_or_else(|| bad("events is not an array"))?;
    events
        .iter()
        .map(|e| {
            let name = e.get("name").and_then(Value::as_str);
            let op = e.get("op").and_then(Value::as_str).and_then(FsOp::parse);
            match (name, op) {
                (Some(n), Some(op)) if n.len() <= 4096 && !n.contains('\0') => Ok(FsEvent {
                    name: n.to_string(),
                    op,
                }),
                _ => Err(bad("an event needs a name and an op")),
            }
        })
        .collect()
}

/// Reads a FileInfo object the way the contract's backends write it: Go
/// field names matched case-insensitively (`path`, `size`, `mode`, `IsDir`,
/// `ModTime`) or snake_case (`is_dir`, `mod_time`); `mode` as an octal or
/// symbolic string or a number. `dir` resolves relative paths (listings)
/// and `fixed` replaces the path (stat answers for the requested path).
fn decode_file_info(
    v: &Value,
    dir: &str,
    fixed: Option<&str>,
) -> std::result::Result<FileInfo, String> {
    let Value::Object(m) = v else {
        return Err("a FileInfo is not a JSON object".into());
    };
    let mut fields: BTreeMap<String, &Value> = BTreeMap::new();
    for (k, v) in m {
        let key: String = k
            .chars()
            .filter(|c| *c != '_')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        fields.entry(key).or_insert(v);
    }
    let text = |k: &str| fields.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let path = match fixed {
        Some(p) => p.to_string(),
        None => entry_path(dir, text("path"), text("name"))?,
    };
    let size = match fields.get("size") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("size {n} of {path:?} is not a byte count"))?,
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map_err(|_| format!("size {s:?} of {path:?} is not a number"))?,
        Some(other) => return Err(format!("size {other} of {path:?} is not a number")),
    };
    let (perm, mode_is_dir) = match fields.get("mode") {
        None | Some(Value::Null) => (None, None),
        Some(v) => {
            let (p, d) = parse_any_mode(v)
                .ok_or_else(|| format!("mode {v} of {path:?} is not a file mode"))?;
            (Some(p), d)
        }
    };
    let is_dir = match fields.get("isdir") {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_i64().is_some_and(|n| n != 0),
        Some(Value::String(s)) => matches!(s.as_str(), "true" | "1"),
        _ => mode_is_dir.unwrap_or(false),
    };
    let mod_time = match fields.get("modtime") {
        Some(Value::String(s)) => normalize_time(s),
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|s| DateTime::<Utc>::from_timestamp(s, 0))
            .map(format_mod_time)
            .unwrap_or_default(),
        _ => String::new(),
    };
    let name = path.rsplit('/').next().unwrap_or_default().to_string();
    Ok(FileInfo {
        path,
        size,
        mode: perm.map(format_mode).unwrap_or_default(),
        is_dir,
        mod_time,
        name,
    })
}

/// An absolute, clean path for a listing entry (backends report absolute
/// paths, paths relative to the root, relative to the directory, or names).
fn entry_path(dir: &str, raw: &str, name: &str) -> std::result::Result<String, String> {
    let joined = if raw.starts_with('/') {
        raw.to_string()
    } else if !raw.is_empty() {
        let dir_rel = dir.trim_start_matches('/');
        if !dir_rel.is_empty() && (raw == dir_rel || raw.starts_with(&format!("{dir_rel}/"))) {
            format!("/{raw}")
        } else {
            format!("{}/{raw}", dir.trim_end_matches('/'))
        }
    } else if !name.is_empty() && !name.contains('/') {
        format!("{}/{name}", dir.trim_end_matches('/'))
    } else {
        return Err("an entry has neither a path nor a name".into());
    };
    paths::normalize(&joined).map_err(|e| format!("entry path {raw:?}: {}", e.detail()))
}

/// Permission bits (and whether the mode says directory) of an octal
/// string (`644`, `0755`, `0o700`), a symbolic string (`-rw-r--r--`,
/// `drwxr-xr-x`, Go's `dtrwxrwxrwx`) or a number (a unix `st_mode` or a Go
/// `FileMode`). Type bits are dropped (gaps C-14).
fn parse_any_mode(v: &Value) -> Option<(u32, Option<bool>)> {
    match v {
        Value::Number(n) => {
            let n = n.as_u64()?;
            let n = u32::try_from(n).ok()?;
            // Go FileMode: dir 1<<31, setuid 1<<23, setgid 1<<22, sticky 1<<20.
            let go_dir = n & (1 << 31) != 0;
            let mut perm = n & 0o7777;
            if n & (1 << 23) != 0 {
                perm |= 0o4000;
            }
            if n & (1 << 22) != 0 {
                perm |= 0o2000;
            }
            if n & (1 << 20) != 0 {
                perm |= 0o1000;
            }
            let unix_dir = n & 0o170000 == 0o040000;
            let typed = go_dir || n & 0o170000 != 0;
            Some((perm, typed.then_some(go_dir || unix_dir)))
        }
        Value::String(s) => parse_mode_text(s.trim()),
        _ => None,
    }
}

fn parse_mode_text(s: &str) -> Option<(u32, Option<bool>)> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        let n = u32::from_str_radix(digits, 8).ok()?;
        let is_dir = (n & 0o170000 != 0).then_some(n & 0o170000 == 0o040000);
        return Some((n & 0o7777, is_dir));
    }
    // Symbolic: optional type letters (ls: one of -dlcbps; Go: any of
    // dalTLDpSugct?), then exactly nine rwx characters.
    let chars: Vec<char> = s.chars().collect();
    if chars.len() < 9 {
        return None;
    }
    let (prefix, rwx) = chars.split_at(chars.len() - 9);
    let mut perm = 0u32;
    for (i, c) in rwx.iter().enumerate() {
        let bit = 1 << (8 - i);
        let want = ['r', 'w', 'x'][i % 3];
        match *c {
            '-' => {}
            c if c == want => perm |= bit,
            // ls shows setuid/setgid/sticky in the x positions.
            's' | 'S' | 't' | 'T' if i % 3 == 2 => {
                if c.is_ascii_lowercase() {
                    perm |= bit;
                }
                perm |= match i {
                    2 => 0o4000,
                    5 => 0o2000,
                    _ => 0o1000,
                };
            }
            _ => return None,
        }
    }
    let mut is_dir = false;
    for c in prefix {
        match c {
            'd' => is_dir = true,
            'u' => perm |= 0o4000,
            'g' => perm |= 0o2000,
            't' => perm |= 0o1000,
            '-' | 'a' | 'l' | 'T' | 'L' | 'D' | 'p' | 'S' | 'c' | '?' | 'b' | 's' => {}
            _ => return None,
        }
    }
    Some((perm, Some(is_dir)))
}

/// RFC 3339 (any offset) → UTC seconds; anything else → empty.
fn normalize_time(s: &str) -> String {
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| format_mod_time(t.with_timezone(&Utc)))
        .unwrap_or_default()
}

/// A runtime id from a spawn answer must be usable in URLs and logs.
fn valid_runtime_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id != "."
        && id != ".."
        && !id.chars().any(|c| c.is_control() || c.is_whitespace())
}

#[async_trait]
impl Provider for CustomProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Vec<String> {
        let mut caps: Vec<String> = capability::BASE.iter().map(|s| s.to_string()).collect();
        let ext = *self.extensions.lock().unwrap_or_else(|p| p.into_inner());
        let reported = self
            .reported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        if let Some(ext) = ext {
            // What the backend can do and the contract can carry.
            let reaches =
                |c: &str, on: bool| on && (reported.is_empty() || reported.iter().any(|r| r == c));
            for (c, on) in [
                (
                    capability::EXEC_INTERACTIVE,
                    ext.interactive && ext.exit_status,
                ),
                (
                    capability::PTY,
                    ext.pty && ext.interactive && ext.exit_status,
                ),
                (capability::EXEC_USER, ext.user),
                (capability::STATS, ext.stats),
                (capability::WATCH, ext.watch),
                (capability::PAUSE, ext.pause),
            ] {
                if reaches(c, on) {
                    caps.push(c.to_string());
                }
            }
        }
        caps
    }

    fn profile(&self) -> Profile {
        // The backend decides the isolation and the network; the contract
        // carries no network mode.
        Profile {
            isolation: Isolation::Remote,
            network_modes: vec!["none".into()],
            default_network: "none".into(),
        }
    }

    fn describe(&self) -> BTreeMap<String, String> {
        let ext = self
            .extensions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|e| e.names().join(","))
            .unwrap_or_default();
        BTreeMap::from([
            ("type".to_string(), "custom".to_string()),
            ("base_url".to_string(), self.shown.clone()),
            ("timeout".to_string(), format!("{:?}", self.timeout)),
            ("extensions".to_string(), ext),
            (
                "isolation".to_string(),
                "defined by the backend (trusted code)".to_string(),
            ),
        ])
    }

    async fn health(&self) -> Result<()> {
        self.probe().await.map(|_| ())
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned> {
        let op = "POST /spawn";
        let mut body = Map::new();
        body.insert("image".into(), spec.image.as_str().into());
        if spec.memory_mb > 0 {
            body.insert("memory_mb".into(), spec.memory_mb.into());
        }
        if spec.vcpus > 0 {
            body.insert("vcpus".into(), spec.vcpus.into());
        }
        if !spec.metadata.is_empty() {
            body.insert("metadata".into(), json!(spec.metadata));
        }
        // Extension: the id StacyVM would like; backends may use it.
        body.insert("sandbox_id".into(), spec.id.as_str().into());
        // A StacyVM worker keeps who owns the sandbox and until when; a
        // user's backend is not told.
        if self.decorate.is_some() {
            for (k, v) in [
                ("owner_id", &spec.owner_id),
                ("tenant_id", &spec.tenant_id),
                ("network_mode", &spec.network_mode),
            ] {
                if !v.is_empty() {
                    body.insert(k.into(), v.as_str().into());
                }
            }
            body.insert("expires_at".into(), json!(spec.expires_at));
        }
        let rb = self.request(Method::POST, &["spawn"]).json(&body);
        let rb = self.decorated(rb, Some(&spec.id)).await?;
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => {
                if !e.is_connect() {
                    // The backend may have created it before failing.
                    self.cleanup(&spec.id).await;
                }
                return Err(self.transport_error(op, e));
            }
        };
        if !resp.status().is_success() {
            let server_side = resp.status().is_server_error();
            let err = self.status_error(op, None, resp).await;
            if server_side {
                self.cleanup(&spec.id).await;
            }
            return Err(err);
        }
        let body = match self.read_capped(op, resp, MAX_JSON_BYTES).await {
            Ok(b) => b,
            Err(e) => {
                self.cleanup(&spec.id).await;
                return Err(e);
            }
        };
        let parsed = serde_json::from_slice::<Value>(&body);
        let id = parsed
            .as_ref()
            .ok()
            .and_then(|v| v.get("id"))
            .and_then(Value::as_str)
            .map(str::to_string);
        match (parsed, id) {
            (Ok(_), Some(id)) if valid_runtime_id(&id) => Ok(Spawned { runtime_id: id }),
            (parsed, id) => {
                // Whatever the backend made must not outlive this error.
                let victim = id
                    .filter(|i| valid_runtime_id(i))
                    .unwrap_or_else(|| spec.id.clone());
                self.cleanup(&victim).await;
                let what = match parsed {
                    Err(e) => format!("not JSON: {e}"),
                    Ok(_) => {
                        "no usable \"id\" (a non-empty string of at most 255 printable characters)"
                            .into()
                    }
                };
                Err(self.garbage(op, &what, &body))
            }
        }
    }

    async fn exec(&self, id: &str, spec: &ExecSpec, sink: OutputSink) -> Result<ExitStatus> {
        self.run_exec(id, spec, sink, None).await
    }

    async fn exec_interactive(
        &self,
        id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
        input: mpsc::Receiver<ExecInput>,
    ) -> Result<ExitStatus> {
        self.run_exec(id, spec, sink, Some(input)).await
    }

    async fn write_file(&self, id: &str, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let ext = self.extensions().await;
        if ext.raw_files {
            return self.put_raw(id, path, mode, data.to_vec().into()).await;
        }
        let mut body = Map::new();
        body.insert("sandbox_id".into(), id.into());
        body.insert("path".into(), path.into());
        match std::str::from_utf8(data) {
            Ok(text) if !ext.base64 => {
                body.insert("content".into(), text.into());
            }
            _ if ext.base64 => {
                body.insert(
                    "content".into(),
                    base64::engine::general_purpose::STANDARD.encode(data).into(),
                );
                body.insert("encoding".into(), "base64".into());
            }
            _ => {
                return Err(Error::unsupported(format!(
                    "{}: writing binary content (the backend declares neither the base64 nor the raw_files extension)",
                    self.name
                )))
            }
        }
        if mode != 0 {
            body.insert("mode".into(), octal(mode).into());
        }
        self.simple(
            "POST /files",
            id,
            Method::POST,
            &["files"],
            Value::Object(body),
        )
        .await
    }

    async fn read_file(&self, id: &str, path: &str) -> Result<Vec<u8>> {
        self.read_file_stream(id, path, MAX_READ_BYTES)
            .await?
            .collect()
            .await
    }

    async fn read_file_stream(&self, id: &str, path: &str, max_bytes: u64) -> Result<FileStream> {
        let op = "GET /files";
        let max = max_bytes.to_string();
        let rb = self.request(Method::GET, &["files"]).query(&[
            ("sandbox_id", id),
            ("path", path),
            ("max_bytes", max.as_str()),
        ]);
        let mut resp = self.send(op, Some(id), rb).await?;
        let too_large = || {
            Error::too_large(format!(
                "{path:?} is larger than the limit of {max_bytes} bytes"
            ))
        };
        let Some(size) = resp.content_length() else {
            // No length announced: buffer at most max_bytes.
            let mut data = Vec::new();
            while let Some(c) = resp
                .chunk()
                .await
                .map_err(|e| self.transport_error(op, e))?
            {
                if (data.len() + c.len()) as u64 > max_bytes {
                    return Err(too_large());
                }
                data.extend_from_slice(&c);
            }
            return Ok(FileStream::buffered(data));
        };
        if size > max_bytes {
            return Err(too_large());
        }
        let (tx, rx) = mpsc::channel(4);
        let name = self.name.clone();
        // Owned by the receiver: it ends when the body ends, fails or the
        // reader drops the stream (a failed send).
        tokio::spawn(async move {
            let mut got = 0u64;
            loop {
                match resp.chunk().await {
                    Ok(Some(c)) => {
                        got += c.len() as u64;
                        if got > size {
                            let _ = tx
                                .send(Err(Error::internal(format!(
                                    "{name}: GET /files: the backend sent more than the {size} bytes it announced"
                                ))))
                                .await;
                            return;
                        }
                        if tx.send(Ok(c.to_vec())).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Error::unavailable(format!(
                                "{name}: GET /files: the transfer broke after {got} of {size} bytes"
                            ))
                            .with_source(e.without_url())))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(FileStream { size, chunks: rx })
    }

    async fn write_file_stream(
        &self,
        id: &str,
        path: &str,
        mode: u32,
        mut chunks: mpsc::Receiver<Vec<u8>>,
        max_bytes: u64,
    ) -> Result<u64> {
        let too_large = || {
            Error::too_large(format!(
                "the upload is larger than the limit of {max_bytes} bytes"
            ))
        };
        if !self.extensions().await.raw_files {
            let mut data = Vec::new();
            while let Some(c) = chunks.recv().await {
                if (data.len() + c.len()) as u64 > max_bytes {
                    return Err(too_large());
                }
                data.extend_from_slice(&c);
            }
            self.write_file(id, path, &data, mode).await?;
            return Ok(data.len() as u64);
        }
        let over = Arc::new(AtomicBool::new(false));
        let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (over2, total2) = (over.clone(), total.clone());
        let stream = futures::stream::unfold(chunks, move |mut rx| {
            let (over, total) = (over2.clone(), total2.clone());
            async move {
                let c = rx.recv().await?;
                let n = total.fetch_add(c.len() as u64, Ordering::SeqCst) + c.len() as u64;
                if n > max_bytes {
                    over.store(true, Ordering::SeqCst);
                    // An error ends the chunked body without its last chunk:
                    // the backend discards the partial upload.
                    let e = std::io::Error::other("upload over the limit");
                    return Some((Err(e), rx));
                }
                Some((Ok::<Vec<u8>, std::io::Error>(c), rx))
            }
        });
        let res = self
            .put_raw(id, path, mode, reqwest::Body::wrap_stream(stream))
            .await;
        if over.load(Ordering::SeqCst) {
            return Err(too_large());
        }
        res?;
        Ok(total.load(Ordering::SeqCst))
    }

    async fn list_files(&self, id: &str, path: &str) -> Result<Vec<FileInfo>> {
        let op = "GET /files/list";
        let v = self
            .files_get(op, "list", id, "path", path, MAX_LIST_BYTES)
            .await?;
        let items = self.json_list(op, v)?;
        let mut out = Vec::with_capacity(items.len());
        for item in &items {
            out.push(decode_file_info(item, path, None).map_err(|e| self.garbage(op, &e, b""))?);
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    async fn delete_file(&self, id: &str, path: &str, recursive: bool) -> Result<()> {
        let body = json!({"sandbox_id": id, "path": path, "recursive": recursive});
        self.simple("DELETE /files", id, Method::DELETE, &["files"], body)
            .await
    }

    async fn move_file(&self, id: &str, old: &str, new: &str) -> Result<()> {
        let body = json!({"sandbox_id": id, "old_path": old, "new_path": new});
        self.simple(
            "POST /files/move",
            id,
            Method::POST,
            &["files", "move"],
            body,
        )
        .await
    }

    async fn chmod_file(&self, id: &str, path: &str, mode: u32) -> Result<()> {
        let body = json!({"sandbox_id": id, "path": path, "mode": octal(mode)});
        self.simple(
            "POST /files/chmod",
            id,
            Method::POST,
            &["files", "chmod"],
            body,
        )
        .await
    }

    async fn stat_file(&self, id: &str, path: &str) -> Result<FileInfo> {
        let op = "GET /files/stat";
        let v = self
            .files_get(op, "stat", id, "path", path, MAX_JSON_BYTES)
            .await?;
        decode_file_info(&v, path, Some(path)).map_err(|e| self.garbage(op, &e, b""))
    }

    async fn glob_files(&self, id: &str, pattern: &str) -> Result<Vec<String>> {
        let op = "GET /files/glob";
        let v = self
            .files_get(op, "glob", id, "pattern", pattern, MAX_LIST_BYTES)
            .await?;
        let items = self.json_list(op, v)?;
        let mut out = Vec::with_capacity(items.len());
        for item in &items {
            let Some(s) = item.as_str() else {
                return Err(self.garbage(op, "a match is not a string", b""));
            };
            let abs = if s.starts_with('/') {
                s.to_string()
            } else {
                format!("/{s}")
            };
            out.push(paths::normalize(&abs).map_err(|e| self.garbage(op, e.detail(), b""))?);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn status(&self, id: &str) -> Result<RuntimeStatus> {
        let op = "GET /status";
        let rb = self.request(Method::GET, &["status", id]);
        let resp = self.send(op, Some(id), rb).await?;
        let body = self.read_capped(op, resp, MAX_JSON_BYTES).await?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(RuntimeStatus {
                state: "running".into(),
            });
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| self.garbage(op, &format!("not JSON: {e}"), &body))?;
        let state = match v.get("state") {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(self.garbage(op, "state is not a string", &body)),
        };
        if state.len() > 64 || state.chars().any(|c| c.is_control()) {
            return Err(self.garbage(op, "state is not a short printable word", &body));
        }
        let state = if state.is_empty() { "running" } else { state };
        Ok(RuntimeStatus {
            state: state.to_string(),
        })
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        let rb = self.request(Method::DELETE, &["sandboxes", id]);
        match self.send("DELETE /sandboxes", Some(id), rb).await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::SandboxNotFound | ErrorKind::SandboxDestroyed
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn pause(&self, id: &str) -> Result<()> {
        self.freeze("pause", id).await
    }

    async fn archive_read(
        &self,
        id: &str,
        path: &str,
        limits: ArchiveLimits,
    ) -> Result<FileStream> {
        if !self.extensions().await.archive {
            return Err(Error::unsupported(format!(
                "{}: directory archives (the backend does not declare the archive extension)",
                self.name
            )));
        }
        let op = "GET /archive";
        let rb = self
            .request(Method::GET, &["archive"])
            .query(&Self::archive_query(id, path, limits));
        let mut resp = self.send(op, Some(id), rb).await?;
        let (tx, rx) = mpsc::channel(4);
        let name = self.name.clone();
        // Frames: type byte, u32 length, bytes (data, error, end).
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::new();
            let mut got = 0u64;
            let broke = |got: u64| {
                Error::unavailable(format!(
                    "{name}: GET /archive: the transfer broke after {got} bytes"
                ))
            };
            loop {
                while buf.len() >= 5 {
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                    if len > 16 << 20 {
                        let _ = tx.send(Err(broke(got))).await;
                        return;
                    }
                    if buf.len() < 5 + len {
                        break;
                    }
                    let kind = buf[0];
                    let data: Vec<u8> = buf[5..5 + len].to_vec();
                    buf.drain(..5 + len);
                    match kind {
                        0 => {
                            got += data.len() as u64;
                            if tx.send(Ok(data)).await.is_err() {
                                return;
                            }
                        }
                        1 => {
                            let (reason, kind) = parse_error_body(&data);
                            let kind = kind.unwrap_or(ErrorKind::ProviderUnavailable);
                            let _ = tx.send(Err(Error::new(kind, reason))).await;
                            return;
                        }
                        _ => return,
                    }
                }
                match resp.chunk().await {
                    Ok(Some(c)) => buf.extend_from_slice(&c),
                    // No end frame: cut off.
                    Ok(None) => {
                        let _ = tx.send(Err(broke(got))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(broke(got).with_source(e.without_url()))).await;
                        return;
                    }
                }
            }
        });
        Ok(FileStream {
            size: 0,
            chunks: rx,
        })
    }

    async fn archive_write(
        &self,
        id: &str,
        path: &str,
        chunks: mpsc::Receiver<Vec<u8>>,
        limits: ArchiveLimits,
    ) -> Result<ArchiveReport> {
        if !self.extensions().await.archive {
            return Err(Error::unsupported(format!(
                "{}: directory archives (the backend does not declare the archive extension)",
                self.name
            )));
        }
        let op = "PUT /archive";
        let stream = futures::stream::unfold(chunks, |mut rx| async move {
            let c = rx.recv().await?;
            Some((Ok::<Vec<u8>, std::io::Error>(c), rx))
        });
        let rb = self
            .request(Method::PUT, &["archive"])
            .query(&Self::archive_query(id, path, limits))
            .body(reqwest::Body::wrap_stream(stream));
        let resp = self.send(op, Some(id), rb).await?;
        let v = self.read_json(op, resp, MAX_JSON_BYTES).await?;
        match (
            v.get("entries").and_then(Value::as_u64),
            v.get("bytes").and_then(Value::as_u64),
        ) {
            (Some(entries), Some(bytes)) => Ok(ArchiveReport { entries, bytes }),
            _ => Err(self.garbage(
                op,
                "entries and bytes must be numbers",
                v.to_string().as_bytes(),
            )),
        }
    }

    async fn connect(&self, id: &str, port: u16) -> Result<PortStream> {
        if !self.extensions().await.connect {
            return Err(Error::unsupported(format!(
                "{}: connecting to sandbox ports (the backend does not declare the connect extension)",
                self.name
            )));
        }
        let op = "GET /connect";
        let port_s = port.to_string();
        let client = self.tunnel.as_ref().unwrap_or(&self.client);
        let mut rb = client.request(Method::GET, self.url(&["connect", id, port_s.as_str()]));
        if let Some(key) = &self.api_key {
            rb = rb.header("X-API-Key", key.clone());
        }
        let rb = rb
            .header(reqwest::header::CONNECTION, "upgrade")
            .header(reqwest::header::UPGRADE, "stacyvm-port");
        let rb = self.decorated(rb, Some(id)).await?;
        let resp = rb.send().await.map_err(|e| self.transport_error(op, e))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(self.status_error(op, Some(id), resp).await);
        }
        let up = resp
            .upgrade()
            .await
            .map_err(|e| self.transport_error(op, e))?;
        Ok(Box::new(up))
    }

    async fn resume(&self, id: &str) -> Result<()> {
        self.freeze("resume", id).await
    }

    async fn stats(&self, id: &str) -> Result<Stats> {
        if !self.extensions().await.stats {
            return Err(Error::unsupported(format!(
                "{}: stats (the backend does not declare the stats extension)",
                self.name
            )));
        }
        let op = "GET /stats";
        let resp = self
            .send(op, Some(id), self.request(Method::GET, &["stats", id]))
            .await?;
        let v = self.read_json(op, resp, MAX_JSON_BYTES).await?;
        let num = |k: &str| {
            v.get(k)
                .and_then(Value::as_f64)
                .filter(|n| n.is_finite() && *n >= 0.0)
        };
        match (num("cpu_pct"), num("mem_bytes"), num("mem_limit_bytes")) {
            (Some(cpu), Some(mem), Some(limit)) => Ok(Stats {
                cpu_pct: cpu,
                mem_bytes: mem as u64,
                mem_limit_bytes: limit as u64,
            }),
            _ => Err(self.garbage(
                op,
                "cpu_pct, mem_bytes and mem_limit_bytes must be non-negative numbers",
                v.to_string().as_bytes(),
            )),
        }
    }

    async fn watch_dir(&self, id: &str, path: &str, recursive: bool) -> Result<FsEvents> {
        if !self.extensions().await.watch {
            return Err(Error::unsupported(format!(
                "{}: watching directories (the backend does not declare the watch extension)",
                self.name
            )));
        }
        let op = "GET /files/watch";
        let rb = self
            .request(Method::GET, &["files", "watch"])
            .query(&[
                ("sandbox_id", id),
                ("path", path),
                ("recursive", if recursive { "true" } else { "false" }),
            ])
            .header(ACCEPT, HeaderValue::from_static("application/x-ndjson"))
            .timeout(MAX_WATCH);
        let resp = self.send(op, Some(id), rb).await?;
        let (tx, rx) = mpsc::channel(16);
        let name = self.name.clone();
        tokio::spawn(async move {
            let mut lines = Ndjson::new(resp);
            loop {
                let line = tokio::select! {
                    l = lines.next_line() => l,
                    () = tx.closed() => return,
                };
                let batch = match line {
                    Ok(Some(l)) => parse_watch_line(&name, &l),
                    Ok(None) => return,
                    Err(NdjsonError::TooLong) => Err(Error::unavailable(format!(
                        "{name}: {op}: a line longer than {MAX_LINE_BYTES} bytes"
                    ))),
                    Err(NdjsonError::Transport(e)) => Err(Error::unavailable(format!(
                        "{name}: {op}: the watch stream broke: {e}"
                    ))),
                };
                let end = batch.is_err();
                match batch {
                    Ok(b) if b.is_empty() => continue,
                    b => {
                        if tx.send(b).await.is_err() || end {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>> {
        if self.extensions().await.logs {
            let op = "GET /logs";
            let n = lines.to_string();
            let rb = self
                .request(Method::GET, &["logs", id])
                .query(&[("lines", n.as_str())]);
            let resp = self.send(op, Some(id), rb).await?;
            let v = self.read_json(op, resp, MAX_JSON_BYTES).await?;
            return match v.get("lines").and_then(Value::as_array) {
                Some(l) => Ok(l
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()),
                None => Err(self.garbage(op, "no \"lines\" array", v.to_string().as_bytes())),
            };
        }
        Ok(if lines == 0 {
            Vec::new()
        } else {
            vec![CONSOLE_LINE.to_string()]
        })
    }
}

/// One check result: (name, `pass`|`warn`|`fail`, message, fix).
pub type Check = (String, &'static str, String, Option<String>);

fn check(name: &str, level: &'static str, msg: impl Into<String>, fix: Option<&str>) -> Check {
    (name.to_string(), level, msg.into(), fix.map(str::to_string))
}

/// `config lint` checks of `providers.custom` (nothing when disabled).
pub fn lint(cfg: &Config, production: bool) -> Vec<Check> {
    let c = &cfg.providers.custom;
    let mut out = Vec::new();
    if !c.enabled {
        return out;
    }
    if c.name.trim().is_empty() {
        out.push(check(
            "providers.custom.name",
            "fail",
            "the custom provider has no name",
            Some("set providers.custom.name, e.g. custom"),
        ));
    }
    match parse_base_url(&c.base_url) {
        Err(e) => out.push(check(
            "providers.custom.base_url",
            "fail",
            e,
            Some("set providers.custom.base_url to the backend's address, e.g. http://127.0.0.1:8090"),
        )),
        Ok(url) => {
            if !url.username().is_empty() || url.password().is_some() {
                out.push(check(
                    "providers.custom.base_url",
                    "warn",
                    "base_url carries credentials; they are sent to the backend and may be logged",
                    Some("remove the user:password part and use providers.custom.api_key"),
                ));
            } else if url.scheme() == "http" && !is_loopback(&url) {
                out.push(check(
                    "providers.custom.base_url",
                    if production { "warn" } else { "pass" },
                    format!("{url} is plain HTTP to another host: the API key and file contents cross the network unencrypted"),
                    Some("put the backend behind https:// or reach it over loopback"),
                ));
            } else {
                out.push(check("providers.custom.base_url", "pass", format!("{url}"), None));
            }
        }
    }
    if c.api_key.is_empty() {
        out.push(check(
            "providers.custom.api_key",
            if production { "fail" } else { "pass" },
            if production {
                "no API key: anyone who can reach the backend can run commands in its sandboxes"
            } else {
                "no API key (acceptable for a loopback backend in development)"
            },
            production.then_some("set providers.custom.api_key (or STACYVM_PROVIDERS_CUSTOM_API_KEY) and start the backend with the same key"),
        ));
    } else {
        out.push(check("providers.custom.api_key", "pass", "set", None));
    }
    if c.timeout.is_zero() {
        out.push(check(
            "providers.custom.timeout",
            "fail",
            "timeout is 0s: every request would fail at once",
            Some("set providers.custom.timeout, e.g. 60s"),
        ));
    } else {
        out.push(check(
            "providers.custom.timeout",
            "pass",
            format!("{:?} per request; it also caps every exec", c.timeout.std()),
            None,
        ));
    }
    out
}

/// `doctor` checks: the lint checks plus a live `GET /health`.
pub async fn doctor(cfg: &Config) -> Vec<Check> {
    let c = &cfg.providers.custom;
    let mut out = lint(cfg, false);
    if !c.enabled {
        return out;
    }
    let p = match CustomProvider::from_config(c) {
        Ok(p) => p,
        Err(e) => {
            out.push(check(
                "providers.custom.health",
                "fail",
                e.to_string(),
                None,
            ));
            return out;
        }
    };
    match p.probe().await {
        Ok(ext) => {
            let names = ext.names();
            let msg = if names.is_empty() {
                format!(
                    "{} answers /health (plain contract: execs are buffered, text files only)",
                    p.shown
                )
            } else {
                format!(
                    "{} answers /health; extensions: {}",
                    p.shown,
                    names.join(", ")
                )
            };
            out.push(check("providers.custom.health", "pass", msg, None));
        }
        Err(e) => out.push(check(
            "providers.custom.health",
            "fail",
            e.to_string(),
            Some(
                "start the backend (see docs/custom-provider.md) or fix providers.custom.base_url",
            ),
        )),
    }
    out
}

#[cfg(test)]
mod custom_http_unit {
    use stacyvm_core::config::Secret;

    use super::*;

    #[test]
    fn modes_of_every_shape_normalise_to_permission_bits() {
        let m = |v: Value| parse_any_mode(&v).map(|(p, d)| (format_mode(p), d));
        assert_eq!(m(json!("644")), Some(("644".into(), None)));
        assert_eq!(m(json!("0755")), Some(("755".into(), None)));
        assert_eq!(m(json!("40755")), Some(("755".into(), Some(true))));
        assert_eq!(m(json!("-rw-r--r--")), Some(("644".into(), Some(false))));
        assert_eq!(m(json!("drwxr-xr-x")), Some(("755".into(), Some(true))));
        assert_eq!(m(json!("drwxrwxrwt")), Some(("1777".into(), Some(true))));
        assert_eq!(m(json!("dtrwxrwxrwx")), Some(("1777".into(), Some(true))));
        assert_eq!(m(json!("Lrwxrwxrwx")), Some(("777".into(), Some(false))));
        assert_eq!(m(json!(0o100600)), Some(("600".into(), Some(false))));
        assert_eq!(m(json!(0o40700)), Some(("700".into(), Some(true))));
        assert_eq!(
            m(json!((1u64 << 31) | 0o755)),
            Some(("755".into(), Some(true)))
        );
        assert_eq!(m(json!(420)), Some(("644".into(), None)));
        assert_eq!(m(json!("rwx")), None);
        assert_eq!(m(json!("-rw-r--r-X")), None);
        assert_eq!(m(json!(true)), None);
    }

    #[test]
    fn file_info_accepts_go_and_snake_case_keys() {
        let go = json!({"Path": "/workspace/a", "Size": 5, "Mode": "-rw-------", "IsDir": false,
            "ModTime": "2024-05-01T12:00:00.123+02:00"});
        let snake = json!({"path": "a", "size": "5", "mode": 384, "is_dir": false,
            "mod_time": "2024-05-01T10:00:00Z"});
        let lower = json!({"path": "workspace/a", "size": 5, "mode": "0600", "isdir": false,
            "modtime": 1_714_557_600});
        for v in [go, snake, lower] {
            let f = decode_file_info(&v, "/workspace", None).expect("decodes");
            assert_eq!(
                (
                    f.path.as_str(),
                    f.size,
                    f.mode.as_str(),
                    f.is_dir,
                    f.mod_time.as_str(),
                    f.name.as_str()
                ),
                ("/workspace/a", 5, "600", false, "2024-05-01T10:00:00Z", "a"),
                "{v}"
            );
        }
        let dir = decode_file_info(
            &json!({"name": "sub", "mode": "drwxr-xr-x"}),
            "/workspace/d",
            None,
        )
        .expect("dir");
        assert_eq!(
            (dir.path.as_str(), dir.is_dir, dir.mode.as_str()),
            ("/workspace/d/sub", true, "755")
        );
        assert!(decode_file_info(&json!({"path": "/../x"}), "/", None).is_err());
        assert!(decode_file_info(&json!({"size": 1}), "/", None).is_err());
        assert!(decode_file_info(&json!({"path": "/a", "size": -1}), "/", None).is_err());
        assert!(decode_file_info(&json!([1]), "/", None).is_err());
    }

    #[test]
    fn records_parse_and_bad_lines_are_recognised() {
        assert_eq!(
            parse_record(br#"{"stream":"stdout","data":"hi\n"}"#),
            Record::Output(StreamKind::Stdout, b"hi\n".to_vec())
        );
        assert_eq!(
            parse_record(br#"{"stream":"stderr","data":"AAE=","encoding":"base64"}"#),
            Record::Output(StreamKind::Stderr, vec![0, 1])
        );
        assert_eq!(
            parse_record(br#"{"exit_code":137,"signal":9}"#),
            Record::Exit(ExitStatus {
                code: 137,
                signal: Some(9)
            })
        );
        assert_eq!(
            parse_record(br#"{"error":"too slow","kind":"exec_timeout"}"#),
            Record::Error("too slow".into(), Some(ErrorKind::ExecTimeout))
        );
        assert_eq!(parse_record(b"  "), Record::Skip);
        for bad in [
            &b"{nope"[..],
            b"[]",
            br#"{"stream":"stdin","data":"x"}"#,
            br#"{"exit_code":"0"}"#,
        ] {
            assert_eq!(
                parse_record(bad),
                Record::Bad,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn statuses_map_to_the_contracts_kinds() {
        let k = |code: u16, kind: Option<ErrorKind>| {
            status_to_error(
                "custom",
                "op",
                Some("sb-1"),
                StatusCode::from_u16(code).expect("code"),
                "why",
                kind,
            )
        };
        assert_eq!(k(404, None).kind(), ErrorKind::SandboxNotFound);
        assert_eq!(k(404, None).to_string(), "sandbox not found: sb-1 (why)");
        assert_eq!(k(410, None).kind(), ErrorKind::SandboxDestroyed);
        assert_eq!(k(408, None).kind(), ErrorKind::ExecTimeout);
        assert_eq!(k(429, None).kind(), ErrorKind::ResourceLimit);
        assert_eq!(k(503, None).kind(), ErrorKind::ProviderUnavailable);
        assert_eq!(k(400, None).kind(), ErrorKind::Internal);
        assert!(
            k(401, None).to_string().contains("api_key"),
            "{}",
            k(401, None)
        );
        assert_eq!(
            k(404, Some(ErrorKind::NotFound)).kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            k(400, Some(ErrorKind::InvalidInput)).kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            parse_kind("forbidden"),
            None,
            "policy kinds stay the server's"
        );
        let (reason, kind) = parse_error_body(br#"{"error":"no\nsuch file","kind":"not_found"}"#);
        assert_eq!(
            (reason.as_str(), kind),
            ("no such file", Some(ErrorKind::NotFound))
        );
        let (reason, _) = parse_error_body(&[b'x'; 5000]);
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS + 1);
    }

    #[test]
    fn config_lint_reports_each_problem() {
        let mut cfg = Config::default();
        assert!(lint(&cfg, true).is_empty(), "disabled: nothing to say");
        cfg.providers.custom.enabled = true;
        cfg.providers.custom.timeout = stacyvm_core::config::Dur::secs(0);
        let levels: BTreeMap<String, &str> =
            lint(&cfg, true).into_iter().map(|c| (c.0, c.1)).collect();
        assert_eq!(levels["providers.custom.base_url"], "fail");
        assert_eq!(levels["providers.custom.api_key"], "fail");
        assert_eq!(levels["providers.custom.timeout"], "fail");
        cfg.providers.custom.base_url = "http://127.0.0.1:8090".into();
        cfg.providers.custom.api_key = stacyvm_core::config::Secret::new("k");
        cfg.providers.custom.timeout = stacyvm_core::config::Dur::secs(30);
        assert!(
            lint(&cfg, true).iter().all(|c| c.1 == "pass"),
            "{:?}",
            lint(&cfg, true)
        );
        cfg.providers.custom.base_url = "ftp://x".into();
        assert!(CustomProvider::from_config(&cfg.providers.custom).is_err());
        cfg.providers.custom.base_url = String::new();
        let e = CustomProvider::from_config(&cfg.providers.custom).expect_err("empty base_url");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn urls_escape_ids_and_keep_a_base_path() {
        let mut c = CustomConfig {
            enabled: true,
            base_url: "http://127.0.0.1:1/api/".into(),
            ..CustomConfig::default()
        };
        let p = CustomProvider::from_config(&c).expect("provider");
        assert_eq!(
            p.url(&["status", "a/b c?"]).as_str(),
            "http://127.0.0.1:1/api/status/a%2Fb%20c%3F"
        );
        c.base_url = "http://127.0.0.1:1".into();
        let p = CustomProvider::from_config(&c).expect("provider");
        assert_eq!(p.url(&["health"]).as_str(), "http://127.0.0.1:1/health");
        // Neither the key nor URL credentials show in Debug, describe or errors.
        c.base_url = "http://user:url-secret@127.0.0.1:1".into();
        c.api_key = Secret::new("key-secret");
        let p = CustomProvider::from_config(&c).expect("provider");
        let shown = format!("{p:?} {:?} {}", p.describe(), p.garbage("op", "x", b""));
        assert!(
            !shown.contains("url-secret")
                && !shown.contains("key-secret")
                && shown.contains("[REDACTED]"),
            "{shown}"
        );
        c.api_key = Secret::new("bad\nkey");
        let e = CustomProvider::from_config(&c).expect_err("header-unsafe key");
        assert!(e.to_string().contains("providers.custom.api_key"), "{e}");
        assert!(!valid_runtime_id("a b") && !valid_runtime_id("..") && valid_runtime_id("sb-1"));
    }
}
