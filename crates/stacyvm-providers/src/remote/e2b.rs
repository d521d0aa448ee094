//! The E2B provider: StacyVM drives an E2B-compatible service (E2B's
//! cloud, a self-hosted E2B, or another StacyVM's E2B API) through E2B's
//! real wire contract (docs/e2b.md, "Wire contract"):
//! - the control plane (`X-API-Key`): `POST /sandboxes`, `GET` and
//!   `DELETE /sandboxes/{id}`, `POST /sandboxes/{id}/connect` (to recover
//!   a sandbox's envd token after a restart), `GET /v2/sandboxes`;
//! - envd (`X-Access-Token`), either by host (`https://49983-<id>.<domain>`,
//!   E2B's cloud) or at one URL with `E2b-Sandbox-Id` headers
//!   (`providers.e2b.sandbox_url`, a StacyVM or a proxy):
//!   `process.Process` for every exec (argv, env, cwd, stdin, signals, pty,
//!   deadlines), `filesystem.Filesystem` and `/files` for every file
//!   operation, `WatchDir` for watches.
//!
//! Commands run as root (E2B's `user="root"`), as on every other provider.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Value};
use stacyvm_api::FileInfo;
use stacyvm_core::config::E2bConfig;
use stacyvm_core::provider::{
    capability, format_mod_time, format_mode, ExecInput, ExecSpec, ExitStatus, FileStream, FsEvent,
    FsEvents, FsOp, Isolation, OutputChunk, OutputSink, Profile, Provider, RuntimeInfo,
    RuntimeStatus, SandboxIo, SpawnSpec, Spawned, StreamKind,
};
use stacyvm_core::{Error, ErrorKind, Result};
use tokio::sync::mpsc;

use super::http::parse_base_url;

/// envd's port in every E2B sandbox.
const ENVD_PORT: &str = "49983";
/// Metadata key naming the StacyVM sandbox an E2B sandbox belongs to.
const META_ID: &str = "stacyvm.id";
/// Bound on control-plane calls and unary envd calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest Connect message accepted from envd.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Most entries a glob walks through.
const MAX_GLOB_ENTRIES: usize = 10_000;
const B64: base64::engine::general_purpose::GeneralPurpose =
    base64::engine::general_purpose::STANDARD;

/// How to reach one sandbox's envd.
#[derive(Clone)]
struct Envd {
    id: String,
    token: String,
    /// E2B's domain of the sandbox (host routing).
    domain: String,
}

pub struct E2bProvider {
    api: Url,
    /// envd at one URL with `E2b-Sandbox-Id` (mode A); `None` = by host.
    sandbox_url: Option<Url>,
    template: String,
    key: HeaderValue,
    /// Control plane and unary calls (bounded).
    client: reqwest::Client,
    /// Streams (execs, transfers, watches): no overall deadline.
    streams: reqwest::Client,
    envds: Mutex<HashMap<String, Envd>>,
}

impl std::fmt::Debug for E2bProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2bProvider")
            .field("api", &self.api.as_str())
            .field("sandbox_url", &self.sandbox_url.as_ref().map(Url::as_str))
            .field("api_key", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

fn is_loopback(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// E2B's error body: `{"code": <int>, "message"}` (control plane) or
/// Connect's `{"code": "<name>", "message"}` (envd).
fn error_of(status: StatusCode, body: &[u8], what: &str, id: Option<&str>) -> Error {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let msg = v["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned());
    let connect = v["code"].as_str().unwrap_or_default();
    if msg.contains("was not found") && status == StatusCode::BAD_GATEWAY {
        return Error::sandbox_not_found(id.unwrap_or_default());
    }
    let kind = match (connect, status.as_u16()) {
        ("not_found", _) | (_, 404) if id.is_some() && what.starts_with("sandbox") => {
            ErrorKind::SandboxNotFound
        }
        ("not_found", _) | ("", 404) => ErrorKind::NotFound,
        ("invalid_argument", _) | ("", 400) => ErrorKind::InvalidInput,
        ("already_exists", _) | ("", 409) => ErrorKind::Conflict,
        ("permission_denied", _) | ("", 403) => ErrorKind::Forbidden,
        ("resource_exhausted", _) | ("", 429) => ErrorKind::ResourceLimit,
        ("", 413) => ErrorKind::PayloadTooLarge,
        ("deadline_exceeded", _) => ErrorKind::ExecTimeout,
        ("unimplemented", _) | ("", 501) => ErrorKind::Unsupported,
        ("unauthenticated", _) | ("", 401) => {
            return Error::unavailable(format!(
            "e2b: {what}: the service refused the credentials ({msg}); check providers.e2b.api_key"
        ))
        }
        ("unavailable", _) | ("", 502..=504) => {
            return Error::unavailable(format!("e2b: {what}: {msg}"))
        }
        _ => return Error::internal(format!("e2b: {what} failed (HTTP {status}): {msg}")),
    };
    match kind {
        ErrorKind::SandboxNotFound => Error::sandbox_not_found(id.unwrap_or_default()),
        ErrorKind::ExecTimeout => Error::exec_timeout(id.unwrap_or_default()),
        k => Error::new(k, msg),
    }
}

fn unreachable(what: &str, e: &reqwest::Error) -> Error {
    Error::unavailable(format!("e2b: {what}: the service is unreachable: {e}"))
}

/// One Connect envelope.
fn envelope(v: &Value) -> Vec<u8> {
    let payload = serde_json::to_vec(v).unwrap_or_default();
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(0);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Reads Connect envelopes from a response body.
struct Envelopes {
    body: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    buf: BytesMut,
}

/// One message of a stream, or its end (with the trailer's error).
enum Message {
    Data(Value),
    End(Option<(String, String)>),
}

impl Envelopes {
    fn new(resp: reqwest::Response) -> Self {
        Envelopes {
            body: resp.bytes_stream().boxed(),
            buf: BytesMut::new(),
        }
    }

    async fn next(&mut self) -> Result<Message> {
        loop {
            if self.buf.len() >= 5 {
                let flags = self.buf[0];
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_MESSAGE {
                    return Err(Error::internal(format!(
                        "e2b: envd sent a {len}-byte message"
                    )));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let payload = self.buf.split_to(len);
                    let v: Value = serde_json::from_slice(&payload).map_err(|e| {
                        Error::internal(format!("e2b: envd sent a malformed message: {e}"))
                    })?;
                    if flags & 2 != 0 {
                        let err = v.get("error").map(|e| {
                            (
                                e["code"].as_str().unwrap_or("unknown").to_string(),
                                e["message"].as_str().unwrap_or_default().to_string(),
                            )
                        });
                        return Ok(Message::End(err));
                    }
                    return Ok(Message::Data(v));
                }
            }
            match self.body.next().await {
                Some(Ok(b)) => self.buf.extend_from_slice(&b),
                Some(Err(e)) => return Err(unreachable("reading a stream", &e)),
                None => {
                    return Err(Error::unavailable(
                        "e2b: envd closed the stream without its end",
                    ))
                }
            }
        }
    }
}

fn connect_error(code: &str, msg: &str, id: &str) -> Error {
    match code {
        "deadline_exceeded" => Error::exec_timeout(id),
        "not_found" => Error::not_found(msg.to_string()),
        "invalid_argument" => Error::invalid(msg.to_string()),
        "resource_exhausted" => Error::limit(msg.to_string()),
        "permission_denied" => Error::forbidden(msg.to_string()),
        "unimplemented" => Error::unsupported(msg.to_string()),
        "unavailable" => Error::unavailable(format!("e2b: {msg}")),
        _ => Error::internal(format!("e2b: envd: {code}: {msg}")),
    }
}

impl E2bProvider {
    /// Builds the provider from `providers.e2b`; a missing key or a bad
    /// URL is `InvalidInput` naming the setting.
    pub fn from_config(cfg: &E2bConfig) -> Result<Self> {
        let api = parse_base_url(&cfg.base_url).map_err(|e| {
            Error::invalid(format!(
                "providers.e2b.base_url: {e}; e.g. https://api.e2b.dev"
            ))
        })?;
        let sandbox_url = match cfg.sandbox_url.trim() {
            "" => None,
            s => Some(parse_base_url(s).map_err(|e| {
                Error::invalid(format!(
                    "providers.e2b.sandbox_url: {e}; leave it empty for E2B's cloud"
                ))
            })?),
        };
        if cfg.api_key.is_empty() {
            return Err(Error::invalid(
                "providers.e2b.api_key is empty; set it to the service's API key (E2B_API_KEY)",
            ));
        }
        let mut key = HeaderValue::from_str(cfg.api_key.expose()).map_err(|_| {
            Error::invalid("providers.e2b.api_key contains characters an HTTP header cannot carry")
        })?;
        key.set_sensitive(true);
        let local = is_loopback(&api) && sandbox_url.as_ref().is_none_or(is_loopback);
        let build = |timeout: Option<Duration>| {
            let mut b = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                // A redirect could carry the key elsewhere.
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("stacyvm/", env!("CARGO_PKG_VERSION")));
            if let Some(t) = timeout {
                b = b.timeout(t);
            }
            if local {
                b = b.no_proxy();
            }
            b.build()
                .map_err(|e| Error::internal("building the e2b HTTP client").with_source(e))
        };
        let template = match cfg.template.trim() {
            "" => "base".to_string(),
            t => t.to_string(),
        };
        Ok(E2bProvider {
            api,
            sandbox_url,
            template,
            key,
            client: build(Some(CALL_TIMEOUT))?,
            streams: build(None)?,
            envds: Mutex::new(HashMap::new()),
        })
    }

    fn url(&self, path: &str) -> Url {
        let mut u = self.api.clone();
        let base = u.path().trim_end_matches('/').to_string();
        u.set_path(&format!("{base}{path}"));
        u
    }

    /// A control-plane call; the JSON reply (or `Null` for none).
    async fn rest(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
        what: &str,
        id: Option<&str>,
    ) -> Result<(StatusCode, Value)> {
        let mut rb = self
            .client
            .request(method, self.url(path))
            .header("X-API-Key", self.key.clone());
        if !query.is_empty() {
            rb = rb.query(query);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.map_err(|e| unreachable(what, &e))?;
        let status = r.status();
        let bytes = r.bytes().await.map_err(|e| unreachable(what, &e))?;
        if !status.is_success() {
            return Err(error_of(status, &bytes, what, id));
        }
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| Error::internal(format!("e2b: {what}: the reply is not JSON: {e}")))?
        };
        Ok((status, v))
    }

    /// The envd of a sandbox; after a restart its token comes back from
    /// `connect` (which never shortens the sandbox's life).
    async fn envd(&self, id: &str) -> Result<Envd> {
        if let Some(e) = self.envds.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Ok(e.clone());
        }
        let (_, info) = self
            .rest(
                Method::GET,
                &format!("/sandboxes/{id}"),
                &[],
                None,
                "sandbox status",
                Some(id),
            )
            .await?;
        let left = info["endAt"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| (t.with_timezone(&Utc) - Utc::now()).num_seconds())
            .unwrap_or(300)
            .max(1);
        let (_, v) = self
            .rest(
                Method::POST,
                &format!("/sandboxes/{id}/connect"),
                &[],
                Some(json!({ "timeout": left })),
                "sandbox connect",
                Some(id),
            )
            .await?;
        Ok(self.remember(id, &v))
    }

    /// Keeps the envd token and domain of a create or connect reply.
    fn remember(&self, id: &str, reply: &Value) -> Envd {
        let e = Envd {
            id: id.to_string(),
            token: reply["envdAccessToken"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            domain: reply["domain"].as_str().unwrap_or("e2b.app").to_string(),
        };
        self.envds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), e.clone());
        e
    }

    fn io_for(&self, envd: Envd) -> E2bIo {
        let (base, headers) = match &self.sandbox_url {
            Some(u) => {
                let mut h = HeaderMap::new();
                if let Ok(v) = HeaderValue::from_str(&envd.id) {
                    h.insert("E2b-Sandbox-Id", v);
                }
                h.insert("E2b-Sandbox-Port", HeaderValue::from_static(ENVD_PORT));
                (u.as_str().trim_end_matches('/').to_string(), h)
            }
            None => (
                format!("https://{ENVD_PORT}-{}.{}", envd.id, envd.domain),
                HeaderMap::new(),
            ),
        };
        let mut headers = headers;
        if let Ok(mut v) = HeaderValue::from_str(&envd.token) {
            v.set_sensitive(true);
            if !envd.token.is_empty() {
                headers.insert("X-Access-Token", v);
            }
        }
        // Every call acts as root, like every other provider.
        headers.insert(
            reqwest::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {}", B64.encode("root:")))
                .unwrap_or(HeaderValue::from_static("")),
        );
        E2bIo {
            id: envd.id,
            base,
            headers,
            client: self.client.clone(),
            streams: self.streams.clone(),
        }
    }
}

/// One sandbox's envd.
struct E2bIo {
    id: String,
    base: String,
    headers: HeaderMap,
    client: reqwest::Client,
    streams: reqwest::Client,
}

fn file_info(e: &Value) -> FileInfo {
    let path = e["path"].as_str().unwrap_or_default().to_string();
    let is_dir = e["type"] == "FILE_TYPE_DIRECTORY";
    let mode = e["mode"].as_u64().unwrap_or(0) as u32;
    let size = match &e["size"] {
        Value::String(s) => s.parse().unwrap_or(0),
        v => v.as_u64().unwrap_or(0),
    };
    let mod_time = e["modifiedTime"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default();
    FileInfo {
        name: e["name"].as_str().unwrap_or_default().to_string(),
        path,
        size,
        mode: format_mode(mode & 0o7777),
        is_dir,
        mod_time: format_mod_time(mod_time),
    }
}

impl E2bIo {
    /// A unary Connect call.
    async fn unary(&self, rpc: &str, body: Value) -> Result<Value> {
        let r = self
            .client
            .post(format!("{}/{rpc}", self.base))
            .headers(self.headers.clone())
            .header("Content-Type", "application/json")
            .header("Connect-Protocol-Version", "1")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| unreachable(rpc, &e))?;
        let status = r.status();
        let bytes = r.bytes().await.map_err(|e| unreachable(rpc, &e))?;
        if !status.is_success() {
            return Err(error_of(status, &bytes, rpc, Some(&self.id)));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::internal(format!("e2b: {rpc}: the reply is not JSON: {e}")))
    }

    /// A server-streaming Connect call.
    async fn stream(
        &self,
        rpc: &str,
        body: Value,
        deadline: Option<Duration>,
    ) -> Result<Envelopes> {
        let mut rb = self
            .streams
            .post(format!("{}/{rpc}", self.base))
            .headers(self.headers.clone())
            .header("Content-Type", "application/connect+json")
            .header("Connect-Protocol-Version", "1")
            .body(envelope(&body));
        if let Some(d) = deadline {
            rb = rb.header("Connect-Timeout-Ms", d.as_millis().max(1).to_string());
        }
        let r = rb.send().await.map_err(|e| unreachable(rpc, &e))?;
        let status = r.status();
        if !status.is_success() {
            let bytes = r.bytes().await.unwrap_or_default();
            return Err(error_of(status, &bytes, rpc, Some(&self.id)));
        }
        Ok(Envelopes::new(r))
    }

    async fn run(
        &self,
        spec: &ExecSpec,
        sink: OutputSink,
        mut input: Option<mpsc::Receiver<ExecInput>>,
    ) -> Result<ExitStatus> {
        if spec.user.is_some_and(|u| u.uid != 0) {
            return Err(Error::unsupported(
                "e2b: running a command as a numeric uid (E2B names users)",
            ));
        }
        let Some((cmd, args)) = spec.argv.split_first() else {
            return Err(Error::invalid("empty command"));
        };
        // The provider contract's default working directory (made at spawn).
        let cwd = if spec.workdir.is_empty() {
            "/workspace"
        } else {
            spec.workdir.as_str()
        };
        let process = json!({"cmd": cmd, "args": args, "envs": spec.env, "cwd": cwd});
        let wants_stdin = spec.stdin.is_some() || input.is_some();
        let mut body = json!({"process": process, "stdin": wants_stdin});
        if let Some((rows, cols)) = spec.pty {
            body["pty"] = json!({"size": {"rows": rows, "cols": cols}});
        }
        let mut events = self
            .stream("process.Process/Start", body, spec.timeout)
            .await?;
        let pty = spec.pty.is_some();
        let mut pid: Option<u64> = None;
        let mut pending: Vec<ExecInput> = Vec::new();
        if let Some(data) = &spec.stdin {
            pending.push(ExecInput::Stdin(data.clone()));
            pending.push(ExecInput::CloseStdin);
        }
        // A client-side bound beyond the server's own deadline.
        let limit = spec
            .timeout
            .map(|t| tokio::time::Instant::now() + t + Duration::from_secs(5));
        loop {
            let next = async {
                match &mut input {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let expired = async {
                match limit {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = events.next() => match msg? {
                    Message::Data(v) => {
                        let ev = &v["event"];
                        if let Some(p) = ev["start"]["pid"].as_u64() {
                            pid = Some(p);
                            for i in std::mem::take(&mut pending) {
                                self.send_input(p, pty, i).await?;
                            }
                        } else if let Some(d) = ev.get("data") {
                            for (key, kind) in [("stdout", StreamKind::Stdout), ("pty", StreamKind::Stdout), ("stderr", StreamKind::Stderr)] {
                                if let Some(b) = d[key].as_str() {
                                    let data = B64.decode(b).map_err(|e| Error::internal(format!("e2b: envd sent bad base64: {e}")))?;
                                    if sink.send(OutputChunk { stream: kind, data }).await.is_err() {
                                        // The reader went away: stop the command.
                                        if let Some(p) = pid {
                                            let _ = self.send_input(p, pty, ExecInput::Signal(9)).await;
                                        }
                                        return Err(Error::internal("exec output reader went away"));
                                    }
                                }
                            }
                        } else if let Some(end) = ev.get("end") {
                            let code = end["exitCode"].as_i64().unwrap_or(0) as i32;
                            return Ok(ExitStatus { code, signal: None });
                        }
                    }
                    Message::End(None) => return Err(Error::internal("e2b: the process stream ended without an exit")),
                    Message::End(Some((code, msg))) => return Err(connect_error(&code, &msg, &self.id)),
                },
                i = next => match i {
                    Some(i) => match pid {
                        Some(p) => self.send_input(p, pty, i).await?,
                        None => pending.push(i),
                    },
                    // Dropping the input closes stdin.
                    None => {
                        input = None;
                        match pid {
                            Some(p) => self.send_input(p, pty, ExecInput::CloseStdin).await?,
                            None => pending.push(ExecInput::CloseStdin),
                        }
                    }
                },
                () = expired => {
                    if let Some(p) = pid {
                        let _ = self.send_input(p, pty, ExecInput::Signal(9)).await;
                    }
                    return Err(Error::exec_timeout(&self.id));
                }
            }
        }
    }

    async fn send_input(&self, pid: u64, pty: bool, i: ExecInput) -> Result<()> {
        let process = json!({"pid": pid});
        let res = match i {
            ExecInput::Stdin(data) => {
                let key = if pty { "pty" } else { "stdin" };
                self.unary(
                    "process.Process/SendInput",
                    json!({"process": process, "input": {key: B64.encode(data)}}),
                )
                .await
            }
            ExecInput::CloseStdin if pty => {
                // A terminal's end of input is ^D.
                self.unary(
                    "process.Process/SendInput",
                    json!({"process": process, "input": {"pty": B64.encode([4u8])}}),
                )
                .await
            }
            ExecInput::CloseStdin => {
                self.unary("process.Process/CloseStdin", json!({"process": process}))
                    .await
            }
            ExecInput::Signal(n) => {
                let signal = match n {
                    9 => "SIGNAL_SIGKILL",
                    15 => "SIGNAL_SIGTERM",
                    n => {
                        return Err(Error::unsupported(format!(
                            "e2b: signal {n} (envd sends SIGKILL and SIGTERM only)"
                        )))
                    }
                };
                self.unary(
                    "process.Process/SendSignal",
                    json!({"process": process, "signal": signal}),
                )
                .await
            }
            ExecInput::Resize(rows, cols) => {
                self.unary(
                    "process.Process/Update",
                    json!({"process": process, "pty": {"size": {"rows": rows, "cols": cols}}}),
                )
                .await
            }
        };
        match res {
            // The process ended meanwhile: nothing left to feed.
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Ok(()),
        }
    }

    async fn sh(&self, argv: &[&str]) -> Result<(i32, String)> {
        let spec = ExecSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let (tx, mut rx) = mpsc::channel::<OutputChunk>(16);
        let collect = async move {
            let mut err = Vec::new();
            while let Some(c) = rx.recv().await {
                if c.stream == StreamKind::Stderr && err.len() < 64 * 1024 {
                    err.extend_from_slice(&c.data);
                }
            }
            err
        };
        let (res, err) = tokio::join!(self.run(&spec, tx, None), collect);
        Ok((res?.code, String::from_utf8_lossy(&err).trim().to_string()))
    }

    async fn upload(&self, path: &str, body: reqwest::Body) -> Result<()> {
        let r = self
            .streams
            .post(format!("{}/files", self.base))
            .headers(self.headers.clone())
            .query(&[("path", path), ("username", "root")])
            .header("Content-Type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .map_err(|e| unreachable("upload", &e))?;
        let status = r.status();
        if !status.is_success() {
            let bytes = r.bytes().await.unwrap_or_default();
            return Err(error_of(status, &bytes, "upload", Some(&self.id)));
        }
        Ok(())
    }

    async fn chmod_if(&self, path: &str, mode: u32) -> Result<()> {
        if mode == 0o644 {
            return Ok(());
        }
        self.chmod_file(path, mode).await
    }

    async fn list_depth(&self, path: &str, depth: u64) -> Result<Vec<Value>> {
        let v = self
            .unary(
                "filesystem.Filesystem/ListDir",
                json!({"path": path, "depth": depth}),
            )
            .await?;
        Ok(v["entries"].as_array().cloned().unwrap_or_default())
    }
}

#[async_trait]
impl SandboxIo for E2bIo {
    async fn exec(&self, spec: &ExecSpec, sink: OutputSink) -> Result<ExitStatus> {
        self.run(spec, sink, None).await
    }

    async fn exec_interactive(
        &self,
        spec: &ExecSpec,
        sink: OutputSink,
        input: mpsc::Receiver<ExecInput>,
    ) -> Result<ExitStatus> {
        self.run(spec, sink, Some(input)).await
    }

    async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        self.upload(path, reqwest::Body::from(data.to_vec()))
            .await?;
        self.chmod_if(path, mode).await
    }

    async fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        self.read_file_stream(path, 1 << 30).await?.collect().await
    }

    async fn read_file_stream(&self, path: &str, max_bytes: u64) -> Result<FileStream> {
        let r = self
            .streams
            .get(format!("{}/files", self.base))
            .headers(self.headers.clone())
            .query(&[("path", path), ("username", "root")])
            .send()
            .await
            .map_err(|e| unreachable("download", &e))?;
        let status = r.status();
        if !status.is_success() {
            let bytes = r.bytes().await.unwrap_or_default();
            return Err(error_of(status, &bytes, "download", Some(&self.id)));
        }
        let size = r.content_length().unwrap_or(0);
        if size > max_bytes {
            return Err(Error::too_large(format!(
                "{path} is {size} bytes, more than the limit of {max_bytes}"
            )));
        }
        let (tx, chunks) = mpsc::channel(2);
        let mut body = r.bytes_stream();
        let path = path.to_string();
        tokio::spawn(async move {
            let mut total = 0u64;
            while let Some(c) = body.next().await {
                let item = match c {
                    Ok(b) => {
                        total += b.len() as u64;
                        if total > max_bytes {
                            let _ = tx
                                .send(Err(Error::too_large(format!(
                                    "{path} grew beyond the limit of {max_bytes} bytes"
                                ))))
                                .await;
                            return;
                        }
                        Ok(b.to_vec())
                    }
                    Err(e) => Err(unreachable("download", &e)),
                };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(FileStream { size, chunks })
    }

    async fn write_file_stream(
        &self,
        path: &str,
        mode: u32,
        chunks: mpsc::Receiver<Vec<u8>>,
        max_bytes: u64,
    ) -> Result<u64> {
        let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = total.clone();
        let chunks =
            futures::stream::unfold(
                chunks,
                |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
            );
        let stream = chunks.map(move |c| {
            let n = counted.fetch_add(c.len() as u64, std::sync::atomic::Ordering::SeqCst)
                + c.len() as u64;
            if n > max_bytes {
                Err(std::io::Error::other(format!(
                    "the upload exceeds the limit of {max_bytes} bytes"
                )))
            } else {
                Ok(Bytes::from(c))
            }
        });
        let res = self.upload(path, reqwest::Body::wrap_stream(stream)).await;
        let n = total.load(std::sync::atomic::Ordering::SeqCst);
        if n > max_bytes {
            return Err(Error::too_large(format!(
                "the upload exceeds the limit of {max_bytes} bytes"
            )));
        }
        res?;
        self.chmod_if(path, mode).await?;
        Ok(n)
    }

    async fn list_files(&self, path: &str) -> Result<Vec<FileInfo>> {
        Ok(self
            .list_depth(path, 1)
            .await?
            .iter()
            .map(file_info)
            .collect())
    }

    async fn delete_file(&self, path: &str, recursive: bool) -> Result<()> {
        // envd always removes recursively: a plain delete of a non-empty
        // directory is refused here first.
        if !recursive {
            match self.stat_file(path).await {
                Ok(i) if i.is_dir && !self.list_depth(path, 1).await?.is_empty() => {
                    return Err(Error::invalid(format!(
                        "directory {path:?} is not empty (use recursive)"
                    )))
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.unary("filesystem.Filesystem/Remove", json!({"path": path}))
            .await
            .map(|_| ())
    }

    async fn move_file(&self, old: &str, new: &str) -> Result<()> {
        self.unary(
            "filesystem.Filesystem/Move",
            json!({"source": old, "destination": new}),
        )
        .await
        .map(|_| ())
    }

    async fn chmod_file(&self, path: &str, mode: u32) -> Result<()> {
        let (code, err) = self
            .sh(&["chmod", &format!("{:o}", mode & 0o7777), "--", path])
            .await?;
        match code {
            0 => Ok(()),
            _ if err.contains("No such file") => Err(Error::not_found(format!("{path}: {err}"))),
            _ => Err(Error::invalid(format!("chmod {path}: {err}"))),
        }
    }

    async fn stat_file(&self, path: &str) -> Result<FileInfo> {
        let v = self
            .unary("filesystem.Filesystem/Stat", json!({"path": path}))
            .await?;
        Ok(file_info(&v["entry"]))
    }

    async fn glob_files(&self, pattern: &str) -> Result<Vec<String>> {
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: true,
        };
        let pat = glob::Pattern::new(pattern)
            .map_err(|e| Error::invalid(format!("invalid glob pattern {pattern:?}: {}", e.msg)))?;
        // The deepest directory without wildcards, and how far below it
        // the pattern reaches.
        let parts: Vec<&str> = pattern.split('/').collect();
        let fixed = parts
            .iter()
            .take_while(|p| !p.contains(['*', '?', '[']))
            .count();
        let base = match parts[..fixed].join("/") {
            b if b.is_empty() => "/".to_string(),
            b => b,
        };
        if fixed == parts.len() {
            return match self.stat_file(&base).await {
                Ok(_) => Ok(vec![base]),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(e),
            };
        }
        let depth = if parts[fixed..].contains(&"**") {
            16
        } else {
            (parts.len() - fixed) as u64
        };
        match self.stat_file(&base).await {
            Ok(i) if i.is_dir => {}
            Ok(_) => return Ok(Vec::new()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
        let entries = match self.list_depth(&base, depth).await {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::ResourceLimit => {
                return Err(Error::too_large(format!(
                    "glob {pattern:?} walks more than {MAX_GLOB_ENTRIES} entries; narrow the pattern"
                )))
            }
            Err(e) => return Err(e),
        };
        let mut out: Vec<String> = entries
            .iter()
            .filter_map(|e| e["path"].as_str())
            .filter(|p| pat.matches_with(p, opts))
            .map(str::to_string)
            .collect();
        if out.len() > MAX_GLOB_ENTRIES {
            return Err(Error::too_large(format!(
                "glob {pattern:?} matches more than {MAX_GLOB_ENTRIES} paths; narrow the pattern"
            )));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn watch_dir(&self, path: &str, recursive: bool) -> Result<FsEvents> {
        let mut events = self
            .stream(
                "filesystem.Filesystem/WatchDir",
                json!({"path": path, "recursive": recursive}),
                None,
            )
            .await?;
        // The first message says the watch is in place (or why not).
        match events.next().await? {
            Message::Data(_) => {}
            Message::End(None) => return Err(Error::internal("e2b: the watch ended at once")),
            Message::End(Some((code, msg))) => return Err(connect_error(&code, &msg, &self.id)),
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = events.next() => m,
                    () = tx.closed() => return,
                };
                let batch = match msg {
                    Ok(Message::Data(v)) => {
                        let f = &v["filesystem"];
                        let op = match f["type"].as_str().unwrap_or_default() {
                            "EVENT_TYPE_CREATE" => FsOp::Create,
                            "EVENT_TYPE_WRITE" => FsOp::Write,
                            "EVENT_TYPE_REMOVE" => FsOp::Remove,
                            "EVENT_TYPE_RENAME" => FsOp::Rename,
                            "EVENT_TYPE_CHMOD" => FsOp::Chmod,
                            // keepalives and unknown kinds
                            _ => continue,
                        };
                        Ok(vec![FsEvent {
                            name: f["name"].as_str().unwrap_or_default().to_string(),
                            op,
                        }])
                    }
                    Ok(Message::End(None)) => return,
                    Ok(Message::End(Some((code, msg)))) => Err(connect_error(&code, &msg, "")),
                    Err(e) => Err(e),
                };
                let end = batch.is_err();
                if tx.send(batch).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

#[async_trait]
impl Provider for E2bProvider {
    fn name(&self) -> &str {
        "e2b"
    }

    fn capabilities(&self) -> Vec<String> {
        let mut c: Vec<String> = capability::BASE.iter().map(|s| (*s).to_string()).collect();
        c.push(capability::RUNTIME_INVENTORY.into());
        c.push(capability::EXEC_INTERACTIVE.into());
        c.push(capability::PTY.into());
        c.push(capability::WATCH.into());
        c
    }

    fn profile(&self) -> Profile {
        Profile {
            isolation: Isolation::Remote,
            ..Profile::default()
        }
    }

    fn describe(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("base_url".to_string(), self.api.to_string()),
            (
                "sandbox_url".to_string(),
                self.sandbox_url
                    .as_ref()
                    .map(Url::to_string)
                    .unwrap_or_else(|| format!("https://{ENVD_PORT}-<id>.<domain>")),
            ),
            ("template".to_string(), self.template.clone()),
        ])
    }

    async fn health(&self) -> Result<()> {
        self.rest(
            Method::GET,
            "/v2/sandboxes",
            &[("limit", "1".to_string())],
            None,
            "health",
            None,
        )
        .await
        .map(|_| ())
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned> {
        let template = match spec.image.trim() {
            "" => self.template.clone(),
            t => t.to_string(),
        };
        let ttl = (spec.expires_at - Utc::now()).num_seconds().max(1);
        let mut metadata = spec.metadata.clone();
        metadata.insert(META_ID.into(), spec.id.clone());
        let (_, v) = self
            .rest(
                Method::POST,
                "/sandboxes",
                &[],
                Some(json!({"templateID": template, "timeout": ttl, "metadata": metadata})),
                "sandbox create",
                None,
            )
            .await
            .map_err(|e| match e.kind() {
                // An unknown template is the caller's to fix.
                ErrorKind::NotFound => Error::invalid(format!("e2b: template {template:?}: {e}")),
                _ => e,
            })?;
        let id = v["sandboxID"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::internal("e2b: sandbox create: the reply has no sandboxID"))?
            .to_string();
        let envd = self.remember(&id, &v);
        // Every sandbox has /workspace, the default working directory.
        let made = self
            .io_for(envd)
            .unary(
                "filesystem.Filesystem/MakeDir",
                json!({"path": "/workspace"}),
            )
            .await;
        match made {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Conflict => {}
            Err(e) => {
                let _ = self.destroy(&id).await;
                return Err(e);
            }
        }
        Ok(Spawned { runtime_id: id })
    }

    async fn io(&self, runtime_id: &str) -> Result<Arc<dyn SandboxIo>> {
        let envd = self.envd(runtime_id).await?;
        Ok(Arc::new(self.io_for(envd)))
    }

    async fn status(&self, runtime_id: &str) -> Result<RuntimeStatus> {
        let (_, v) = self
            .rest(
                Method::GET,
                &format!("/sandboxes/{runtime_id}"),
                &[],
                None,
                "sandbox status",
                Some(runtime_id),
            )
            .await?;
        let state = match v["state"].as_str().unwrap_or_default() {
            "running" => "running",
            "paused" => "stopped",
            _ => "error",
        };
        Ok(RuntimeStatus {
            state: state.to_string(),
        })
    }

    async fn destroy(&self, runtime_id: &str) -> Result<()> {
        self.envds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(runtime_id);
        match self
            .rest(
                Method::DELETE,
                &format!("/sandboxes/{runtime_id}"),
                &[],
                None,
                "sandbox kill",
                Some(runtime_id),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::SandboxNotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn logs(&self, _runtime_id: &str, _lines: usize) -> Result<Vec<String>> {
        Ok(vec![
            "[INFO] console logs are not available from the e2b provider".to_string(),
        ])
    }

    async fn list_runtimes(&self) -> Result<Vec<RuntimeInfo>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        // Bounded: at most 100 pages of 100.
        for _ in 0..100 {
            let mut q = vec![("limit", "100".to_string())];
            if let Some(t) = &token {
                q.push(("nextToken", t.clone()));
            }
            let r = self
                .client
                .get(self.url("/v2/sandboxes"))
                .header("X-API-Key", self.key.clone())
                .query(&q)
                .send()
                .await
                .map_err(|e| unreachable("sandbox list", &e))?;
            let status = r.status();
            let next = r
                .headers()
                .get("x-next-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = r
                .bytes()
                .await
                .map_err(|e| unreachable("sandbox list", &e))?;
            if !status.is_success() {
                return Err(error_of(status, &bytes, "sandbox list", None));
            }
            let list: Vec<Value> = serde_json::from_slice(&bytes).unwrap_or_default();
            for s in list {
                let meta: BTreeMap<String, String> =
                    serde_json::from_value(s["metadata"].clone()).unwrap_or_default();
                // Only sandboxes this server made.
                if !meta.contains_key(META_ID) {
                    continue;
                }
                let time = |k: &str| {
                    s[k].as_str()
                        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                        .map(|t| t.with_timezone(&Utc))
                };
                out.push(RuntimeInfo {
                    sandbox_id: s["sandboxID"].as_str().unwrap_or_default().to_string(),
                    state: match s["state"].as_str() {
                        Some("paused") => "stopped".into(),
                        _ => "running".into(),
                    },
                    image: s["templateID"].as_str().unwrap_or_default().to_string(),
                    created_at: time("startedAt"),
                    expires_at: time("endAt"),
                    metadata: meta,
                    owner_id: String::new(),
                    tenant_id: String::new(),
                });
            }
            match next {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_kinds() {
        let e = error_of(
            StatusCode::BAD_GATEWAY,
            br#"{"message":"The sandbox \"x\" was not found"}"#,
            "stat",
            Some("x"),
        );
        assert_eq!(e.kind(), ErrorKind::SandboxNotFound);
        let e = error_of(
            StatusCode::NOT_FOUND,
            br#"{"code":"not_found","message":"/a: no such file"}"#,
            "filesystem.Filesystem/Stat",
            Some("x"),
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = error_of(
            StatusCode::NOT_FOUND,
            br#"{"code":404,"message":"nope"}"#,
            "sandbox status",
            Some("x"),
        );
        assert_eq!(e.kind(), ErrorKind::SandboxNotFound);
        let e = error_of(StatusCode::UNAUTHORIZED, b"{}", "health", None);
        assert_eq!(e.kind(), ErrorKind::ProviderUnavailable);
        assert!(e.to_string().contains("providers.e2b.api_key"), "{e}");
        let e = error_of(StatusCode::TOO_MANY_REQUESTS, b"garbage", "exec", None);
        assert_eq!(e.kind(), ErrorKind::ResourceLimit);
    }

    #[test]
    fn config_is_checked() {
        let mut c = E2bConfig::default();
        assert!(E2bProvider::from_config(&c).is_err(), "no key");
        c.api_key = stacyvm_core::config::Secret::new("k");
        assert!(E2bProvider::from_config(&c).is_ok());
        c.sandbox_url = "ftp://x".into();
        assert!(E2bProvider::from_config(&c).is_err());
        c.sandbox_url = String::new();
        c.base_url = "not a url".into();
        assert!(E2bProvider::from_config(&c).is_err());
    }
}
