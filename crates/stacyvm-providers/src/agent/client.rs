//! Async host side of the agent protocol, over any byte stream (a unix
//! socket, an engine-attached stream, a VM's serial port).
//!
//! Everything an agent sends is untrusted: a sandbox may have replaced its
//! agent. Frames are bounded by the decoder; each request may have at most
//! [`ROUTE_BUDGET`] bytes queued unread (an agent that ignores flow control
//! loses its connection); every call has a deadline; and with a token the
//! handshake proves the agent belongs to the sandbox the host meant to
//! reach.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stacyvm_agent_proto::{
    self as proto, Decoder, Exit, FileStat, Frame, Hello, Kind, Request, Response, SignalMsg,
    WindowMsg, INITIAL_WINDOW, MAX_CHUNK,
};
use stacyvm_core::provider::{
    ExitStatus, FileStream, OutputChunk, OutputSink, PortStream, StreamKind,
};
use stacyvm_core::{Error, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Unread bytes one request may have queued on the host.
pub const ROUTE_BUDGET: usize = 8 * 1024 * 1024;
/// Deadline of a control request (stat, list, glob, remove …).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// A transfer that makes no progress for this long fails.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Connect and handshake deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JSON result (listing, glob) the host accepts.
pub const MAX_RESULT_BYTES: usize = 64 * 1024 * 1024;

struct Route {
    tx: mpsc::UnboundedSender<Frame>,
    queued: Arc<AtomicUsize>,
}

type Routes = Arc<Mutex<HashMap<u32, Route>>>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// The receiving end of one request's frames.
struct RouteRx {
    rx: mpsc::UnboundedReceiver<Frame>,
    queued: Arc<AtomicUsize>,
}

impl RouteRx {
    async fn recv(&mut self) -> Option<Frame> {
        let f = self.rx.recv().await?;
        self.queued.fetch_sub(f.body.len(), Ordering::SeqCst);
        Some(f)
    }

    /// The next frame within `limit`; `Err` when the deadline passes.
    async fn recv_within(&mut self, limit: Duration) -> Result<Option<Frame>> {
        tokio::time::timeout(limit, self.recv())
            .await
            .map_err(|_| silent(limit))
    }
}

/// A connection to one agent.
pub struct AgentClient {
    writer: Arc<tokio::sync::Mutex<Writer>>,
    routes: Routes,
    next: AtomicU32,
    closed: Arc<AtomicBool>,
    /// The task reading the connection: it holds the read half, so it is
    /// ended with the client (the connection then closes; a microVM's
    /// single-client agent port is free for the next one).
    reader: tokio::task::AbortHandle,
    pub agent_pid: u32,
    features: Vec<String>,
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("agent_pid", &self.agent_pid)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

pub fn map_err(e: proto::AgentError) -> Error {
    use proto::ErrorKind as K;
    match e.kind {
        K::NotFound => Error::not_found(e.message),
        K::InvalidInput => Error::invalid(e.message),
        K::PermissionDenied => Error::forbidden(e.message),
        K::AlreadyExists => Error::conflict(e.message),
        K::Unsupported => Error::unsupported(e.message),
        K::ResourceExhausted => Error::limit(e.message),
        K::TooLarge => Error::too_large(e.message),
        K::Internal => Error::internal(format!("agent: {}", e.message)),
    }
}

fn lost() -> Error {
    Error::unavailable("connection to the sandbox agent was lost")
}

fn silent(limit: Duration) -> Error {
    Error::unavailable(format!(
        "the sandbox agent did not answer within {}s",
        limit.as_secs()
    ))
}

/// Removes the route of a request when dropped (cancellation included).
struct RouteGuard {
    routes: Routes,
    id: u32,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        if let Ok(mut r) = self.routes.lock() {
            r.remove(&self.id);
        }
    }
}

/// Opens the unix socket at `path` without following a symlink in its
/// last component (a sandbox that can write the directory must not be
/// able to point the host at another socket), and connects to it.
fn open_socket_nofollow(path: &Path) -> Result<std::os::unix::net::UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::unavailable("opening the sandbox agent socket").with_source(e))?;
    let ft = fd
        .metadata()
        .map_err(|e| Error::unavailable("inspecting the sandbox agent socket").with_source(e))?
        .file_type();
    if !ft.is_socket() {
        return Err(Error::unavailable(
            "the sandbox agent socket was replaced by something that is not a socket",
        ));
    }
    std::os::unix::net::UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| Error::unavailable("connecting to the sandbox agent").with_source(e))
}

impl AgentClient {
    /// Connects to the agent socket at `path` (never through a symlink)
    /// and performs the handshake; with `token`, the agent must prove it
    /// holds it.
    pub async fn connect(path: &Path, token: Option<&[u8]>) -> Result<Arc<AgentClient>> {
        Self::connect_slot(path, token, "").await
    }

    /// [`AgentClient::connect`] to a pool host's agent, served by its slot
    /// `slot` (none when empty).
    pub async fn connect_slot(
        path: &Path,
        token: Option<&[u8]>,
        slot: &str,
    ) -> Result<Arc<AgentClient>> {
        let p = path.to_path_buf();
        let std_stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::task::spawn_blocking(move || open_socket_nofollow(&p)),
        )
        .await
        .map_err(|_| Error::unavailable("timed out connecting to the sandbox agent"))?
        .map_err(|e| Error::internal(format!("connect task: {e}")))??;
        std_stream
            .set_nonblocking(true)
            .map_err(|e| Error::unavailable("connecting to the sandbox agent").with_source(e))?;
        let stream = tokio::net::UnixStream::from_std(std_stream)
            .map_err(|e| Error::unavailable("connecting to the sandbox agent").with_source(e))?;
        Self::handshake_slot(stream, token, slot).await
    }

    /// Speaks the protocol over `stream`: version handshake (and proof of
    /// `token`), then a reader task that routes frames to requests.
    pub async fn handshake<S>(stream: S, token: Option<&[u8]>) -> Result<Arc<AgentClient>>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::handshake_slot(stream, token, "").await
    }

    /// [`AgentClient::handshake`], asking a pool host's agent to hand the
    /// connection to slot `slot` (none when empty).
    pub async fn handshake_slot<S>(
        stream: S,
        token: Option<&[u8]>,
        slot: &str,
    ) -> Result<Arc<AgentClient>>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let nonce = match token {
            Some(_) => hex::encode(rand::random::<[u8; 16]>()),
            None => String::new(),
        };
        let hello = Frame::json(
            Kind::Hello,
            0,
            &Hello {
                version: proto::VERSION,
                agent: "stacyvm".into(),
                pid: std::process::id(),
                nonce: nonce.clone(),
                proof: String::new(),
                features: Vec::new(),
                slot: slot.to_string(),
            },
        );
        let mut dec = Decoder::default();
        // Large reads: a 1 MiB file chunk arrives in a few syscalls.
        let mut buf = vec![0u8; 256 * 1024];
        let reply = tokio::time::timeout(CONNECT_TIMEOUT, async {
            wr.write_all(&hello.encode())
                .await
                .map_err(|e| Error::unavailable("agent handshake").with_source(e))?;
            loop {
                if let Some(f) = dec
                    .next_frame()
                    .map_err(|e| Error::unavailable(format!("agent handshake: {e}")))?
                {
                    return Ok::<Frame, Error>(f);
                }
                let n = rd
                    .read(&mut buf)
                    .await
                    .map_err(|e| Error::unavailable("agent handshake").with_source(e))?;
                if n == 0 {
                    return Err(Error::unavailable(
                        "agent closed the connection during the handshake",
                    ));
                }
                dec.push(&buf[..n]);
            }
        })
        .await
        .map_err(|_| Error::unavailable("agent handshake timed out"))??;
        let theirs: Hello = serde_json::from_slice(&reply.body)
            .map_err(|e| Error::unavailable(format!("agent handshake: {e}")))?;
        if reply.kind != Kind::Hello || theirs.version != proto::VERSION {
            return Err(Error::unavailable(format!(
                "agent speaks protocol {} but the server needs {}",
                theirs.version,
                proto::VERSION
            )));
        }
        if let Some(token) = token {
            if !proto::verify_proof(token, &nonce, &theirs.proof) {
                return Err(Error::unavailable(
                    "the sandbox agent failed to prove it belongs to this sandbox",
                ));
            }
        }
        if theirs.slot != slot {
            // The host's agent echoes the slot once that slot has the
            // connection; otherwise it has no such slot alive.
            return Err(Error::sandbox_not_found(slot));
        }
        let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let reader = {
            let routes = routes.clone();
            let closed = closed.clone();
            tokio::spawn(async move {
                'read: loop {
                    loop {
                        match dec.next_frame() {
                            Ok(Some(f)) => {
                                let over = {
                                    let Ok(r) = routes.lock() else { break 'read };
                                    match r.get(&f.id) {
                                        Some(route) => {
                                            let q = route
                                                .queued
                                                .fetch_add(f.body.len(), Ordering::SeqCst)
                                                + f.body.len();
                                            let over = q > ROUTE_BUDGET;
                                            if !over {
                                                let _ = route.tx.send(f);
                                            }
                                            over
                                        }
                                        None => false,
                                    }
                                };
                                if over {
                                    // The agent ignores flow control.
                                    tracing::warn!("sandbox agent overran its flow-control budget; dropping the connection");
                                    break 'read;
                                }
                            }
                            Ok(None) => break,
                            Err(_) => break 'read,
                        }
                    }
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => dec.push(&buf[..n]),
                    }
                }
                closed.store(true, Ordering::SeqCst);
                if let Ok(mut r) = routes.lock() {
                    r.clear();
                }
            })
            .abort_handle()
        };
        Ok(Arc::new(AgentClient {
            writer: Arc::new(tokio::sync::Mutex::new(Box::new(wr))),
            routes,
            next: AtomicU32::new(1),
            closed,
            reader,
            agent_pid: theirs.pid,
            features: theirs.features,
        }))
    }

    /// Closes the connection (our write side; the agent's end sees the
    /// host leave). Requests in flight fail as on a lost connection.
    pub async fn close(&self) {
        if let Ok(mut w) =
            tokio::time::timeout(std::time::Duration::from_secs(2), self.writer.lock()).await
        {
            let _ = w.shutdown().await;
        }
        self.reader.abort();
        self.closed.store(true, Ordering::SeqCst);
        if let Ok(mut r) = self.routes.lock() {
            r.clear();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    async fn send(&self, f: &Frame) -> Result<()> {
        self.write_whole(f.encode()).await
    }

    /// Sends a frame made of `body`.
    async fn send_body(&self, kind: Kind, id: u32, body: &[u8]) -> Result<()> {
        let header = Frame::header(kind, id, body.len());
        let mut bytes = Vec::with_capacity(header.len() + body.len());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(body);
        self.write_whole(bytes).await
    }

    /// Writes one whole frame. The write runs in a task of its own, so a
    /// caller that is dropped midway (a client that hung up) never leaves
    /// half a frame on the connection, which would desynchronise it for
    /// every later request.
    async fn write_whole(&self, bytes: Vec<u8>) -> Result<()> {
        let writer = self.writer.clone();
        tokio::spawn(async move {
            let mut w = writer.lock().await;
            w.write_all(&bytes).await
        })
        .await
        .map_err(|_| lost())?
        .map_err(|_| lost())
    }

    /// Asks the agent to stop request `id` (a read, an upload or an exec).
    async fn cancel(&self, id: u32) {
        let _ = self
            .send(&Frame::json(Kind::Signal, id, &SignalMsg { signal: 9 }))
            .await;
    }

    fn register(&self) -> Result<(u32, RouteRx, RouteGuard)> {
        if self.is_closed() {
            return Err(lost());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed).max(1);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        self.routes.lock().map_err(|_| lost())?.insert(
            id,
            Route {
                tx,
                queued: queued.clone(),
            },
        );
        Ok((
            id,
            RouteRx { rx, queued },
            RouteGuard {
                routes: self.routes.clone(),
                id,
            },
        ))
    }

    /// Sends a request and waits (at most [`CALL_TIMEOUT`]) for its
    /// `Response`, collecting up to `max_data` bytes of `Data` frames.
    async fn call_collect(
        &self,
        req: &Request,
        max_data: usize,
    ) -> Result<(serde_json::Value, Vec<u8>)> {
        let (id, mut rx, _guard) = self.register()?;
        self.send(&Frame::json(Kind::Request, id, req)).await?;
        let mut data = Vec::new();
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        loop {
            let f = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .map_err(|_| silent(CALL_TIMEOUT))?;
            let Some(f) = f else { return Err(lost()) };
            match f.kind {
                Kind::Data => {
                    if data.len() + f.body.len() > max_data {
                        return Err(Error::too_large(format!(
                            "the agent's reply is larger than {max_data} bytes"
                        )));
                    }
                    data.extend_from_slice(&f.body);
                }
                Kind::Response => return response(&f.body).map(|v| (v, data)),
                _ => {}
            }
        }
    }

    /// A control request without data.
    pub async fn call(&self, req: &Request) -> Result<serde_json::Value> {
        self.call_collect(req, 0).await.map(|(v, _)| v)
    }

    /// A request whose (possibly large) JSON result is decoded into `T`.
    async fn call_json<T: serde::de::DeserializeOwned>(&self, req: &Request) -> Result<T> {
        let (v, data) = self.call_collect(req, MAX_RESULT_BYTES).await?;
        let chunked = v.get("chunked").and_then(serde_json::Value::as_bool) == Some(true);
        let parsed = if chunked {
            serde_json::from_slice(&data)
        } else {
            serde_json::from_value(v)
        };
        parsed.map_err(|e| Error::internal(format!("agent sent a malformed result: {e}")))
    }

    pub async fn ping(&self) -> Result<()> {
        self.call(&Request::Ping).await.map(|_| ())
    }

    /// After a microVM resume: the guest's wall clock is set to the host's
    /// (it stood still while the VM was stopped). An older agent without
    /// the feature is left as it is; other failures are logged, not fatal.
    pub async fn resync_clock(&self, id: &str) {
        match self.set_clock().await {
            Ok(()) => {}
            Err(e) if e.kind() == stacyvm_core::ErrorKind::Unsupported => {}
            Err(e) => {
                tracing::warn!(sandbox_id = id, error = %e, "setting the guest clock after resume failed")
            }
        }
    }

    /// Sets a microVM guest's wall clock to the host's (after a pause).
    pub async fn set_clock(&self) -> Result<()> {
        if !self.has("set_clock") {
            return Err(Error::unsupported(
                "setting the guest clock (an older agent)",
            ));
        }
        let unix_nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        self.call(&Request::SetClock { unix_nanos })
            .await
            .map(|_| ())
    }

    /// A microVM clone's fresh identity (see `Request::Reidentify`).
    pub async fn reidentify(
        &self,
        hostname: &str,
        net: Option<stacyvm_agent_proto::GuestNet>,
    ) -> Result<()> {
        let unix_nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        self.call(&Request::Reidentify {
            hostname: hostname.to_string(),
            unix_nanos,
            seed: hex::encode(rand::random::<[u8; 32]>()),
            net,
        })
        .await
        .map(|_| ())
    }

    pub async fn stat(&self, path: &str) -> Result<FileStat> {
        self.call_json(&Request::Stat {
            path: path.to_string(),
        })
        .await
    }

    pub async fn list(&self, path: &str) -> Result<Vec<FileStat>> {
        self.call_json(&Request::ListDir {
            path: path.to_string(),
            chunked: true,
        })
        .await
    }

    pub async fn glob(&self, pattern: &str) -> Result<Vec<String>> {
        let v: Option<Vec<String>> = self
            .call_json(&Request::Glob {
                pattern: pattern.to_string(),
                chunked: true,
            })
            .await?;
        Ok(v.unwrap_or_default())
    }

    pub async fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        self.call(&Request::Remove {
            path: path.to_string(),
            recursive,
        })
        .await
        .map(|_| ())
    }

    pub async fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.call(&Request::Rename {
            from: from.to_string(),
            to: to.to_string(),
        })
        .await
        .map(|_| ())
    }

    pub async fn chmod(&self, path: &str, mode: u32) -> Result<()> {
        self.call(&Request::Chmod {
            path: path.to_string(),
            mode,
        })
        .await
        .map(|_| ())
    }

    /// Reads a whole (small) file, at most `max` bytes.
    pub async fn read_all(self: &Arc<Self>, path: &str, max: u64) -> Result<Vec<u8>> {
        self.read_stream(path, max).await?.collect().await
    }

    /// Streams a regular file of at most `max` bytes (see [`FileStream`]).
    pub async fn read_stream(self: &Arc<Self>, path: &str, max: u64) -> Result<FileStream> {
        if !self.has("read_stream") {
            let cap = usize::try_from(max)
                .unwrap_or(usize::MAX)
                .min(MAX_RESULT_BYTES);
            let (_, data) = self
                .call_collect(
                    &Request::ReadFile {
                        path: path.to_string(),
                        max_bytes: Some(max),
                        stream: false,
                    },
                    cap,
                )
                .await?;
            return Ok(FileStream::buffered(data));
        }
        let (id, mut rx, guard) = self.register()?;
        let req = Request::ReadFile {
            path: path.to_string(),
            max_bytes: Some(max),
            stream: true,
        };
        self.send(&Frame::json(Kind::Request, id, &req)).await?;
        let size = loop {
            let Some(f) = rx.recv_within(CALL_TIMEOUT).await? else {
                return Err(lost());
            };
            if f.kind == Kind::Response {
                let v = response(&f.body)?;
                break v
                    .get("size")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
            }
        };
        let chunks = self.stream_data(id, rx, guard, max, "the file grew beyond the limit");
        Ok(FileStream { size, chunks })
    }

    /// Packs `path` in the sandbox as a tar stream (the agent's `archive`
    /// feature); dropping the stream cancels it.
    pub async fn archive_read(
        self: &Arc<Self>,
        path: &str,
        max_bytes: u64,
        max_entries: u64,
    ) -> Result<FileStream> {
        if !self.has("archive") {
            return Err(Error::unsupported(
                "directory archives (this sandbox's agent predates them)",
            ));
        }
        let (id, mut rx, guard) = self.register()?;
        let req = Request::ArchiveRead {
            path: path.to_string(),
            max_bytes,
            max_entries,
        };
        self.send(&Frame::json(Kind::Request, id, &req)).await?;
        loop {
            let Some(f) = rx.recv_within(CALL_TIMEOUT).await? else {
                return Err(lost());
            };
            if f.kind == Kind::Response {
                response(&f.body)?;
                break;
            }
        }
        // The tar framing adds headers to the content: allow for them.
        let cap = max_bytes.saturating_add(max_entries.saturating_mul(1536));
        let chunks = self.stream_data(id, rx, guard, cap, "the archive grew beyond the limit");
        Ok(FileStream { size: 0, chunks })
    }

    /// Extracts the tar stream `input` into directory `path` in the
    /// sandbox; answers (entries, bytes). A refused archive, or one whose
    /// caller goes away, leaves nothing it created.
    pub async fn archive_write(
        self: &Arc<Self>,
        path: &str,
        input: mpsc::Receiver<Vec<u8>>,
        max_bytes: u64,
        max_entries: u64,
    ) -> Result<(u64, u64)> {
        if !self.has("archive") {
            return Err(Error::unsupported(
                "directory archives (this sandbox's agent predates them)",
            ));
        }
        let (id, rx, _guard) = self.register()?;
        let mut abort = KillOnDrop {
            client: Some(self.clone()),
            id,
        };
        let req = Request::ArchiveWrite {
            path: path.to_string(),
            max_bytes,
            max_entries,
        };
        // The tar stream is larger than its content (headers, padding).
        let cap = max_bytes
            .saturating_add(max_entries.saturating_mul(1536))
            .saturating_add(10240);
        let res = self.upload_req(id, rx, &req, true, input, cap).await;
        abort.client = None;
        let v = res?.1;
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        Ok((n("entries"), n("bytes")))
    }

    /// The `Data` frames of a streamed read after its header, as a channel
    /// (credit granted as the reader takes them); at most `max` bytes.
    fn stream_data(
        self: &Arc<Self>,
        id: u32,
        mut rx: RouteRx,
        guard: RouteGuard,
        max: u64,
        over: &'static str,
    ) -> mpsc::Receiver<Result<Vec<u8>>> {
        let (tx, chunks) = mpsc::channel::<Result<Vec<u8>>>(2);
        let client = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let mut total = 0u64;
            loop {
                let f = match rx.recv_within(IDLE_TIMEOUT).await {
                    Ok(Some(f)) => f,
                    Ok(None) => {
                        let _ = tx.send(Err(lost())).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                };
                match f.kind {
                    Kind::Data if f.body.is_empty() => return,
                    Kind::Data => {
                        let n = f.body.len() as u64;
                        total += n;
                        if total > max {
                            let _ = tx
                                .send(Err(Error::too_large(format!("{over} of {max} bytes"))))
                                .await;
                            break;
                        }
                        if tx.send(Ok(f.body)).await.is_err() {
                            break; // the reader went away
                        }
                        let w = Frame::json(Kind::Window, id, &WindowMsg { bytes: n });
                        if client.send(&w).await.is_err() {
                            let _ = tx.send(Err(lost())).await;
                            return;
                        }
                    }
                    Kind::Response => {
                        let _ = tx.send(response(&f.body).and(Err(lost()))).await;
                        return;
                    }
                    _ => {}
                }
            }
            // Stopped early: tell the agent to stop sending.
            client.cancel(id).await;
        });
        chunks
    }

    /// Watches a directory (the agent's `watch` feature): batches of
    /// events until the watch ends; dropping the receiver cancels it.
    pub async fn watch(
        self: &Arc<Self>,
        path: &str,
        recursive: bool,
    ) -> Result<stacyvm_core::provider::FsEvents> {
        use stacyvm_core::provider::{FsEvent, FsOp};
        if !self.has("watch") {
            return Err(Error::unsupported(
                "watching directories (this sandbox's agent predates watches)",
            ));
        }
        let (id, mut rx, guard) = self.register()?;
        let req = Request::Watch {
            path: path.to_string(),
            recursive,
        };
        self.send(&Frame::json(Kind::Request, id, &req)).await?;
        loop {
            let Some(f) = rx.recv_within(CALL_TIMEOUT).await? else {
                return Err(lost());
            };
            if f.kind == Kind::Response {
                response(&f.body)?;
                break;
            }
        }
        let (tx, events) = mpsc::channel(64);
        let client = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                // A watch may be quiet for as long as it likes; the reader
                // going away is noticed at its next event or its close.
                let f = tokio::select! {
                    f = rx.recv() => f,
                    () = tx.closed() => break,
                };
                let Some(f) = f else {
                    let _ = tx.send(Err(lost())).await;
                    return;
                };
                match f.kind {
                    Kind::Data if f.body.is_empty() => return,
                    Kind::Data => {
                        let batch: Vec<proto::WatchEvent> = match serde_json::from_slice(&f.body) {
                            Ok(b) => b,
                            Err(e) => {
                                let _ = tx
                                    .send(Err(Error::internal(format!(
                                        "agent sent a malformed watch event: {e}"
                                    ))))
                                    .await;
                                break;
                            }
                        };
                        let batch = batch
                            .into_iter()
                            .map(|e| FsEvent {
                                name: e.name,
                                op: match e.op {
                                    proto::WatchOp::Create => FsOp::Create,
                                    proto::WatchOp::Write => FsOp::Write,
                                    proto::WatchOp::Remove => FsOp::Remove,
                                    proto::WatchOp::Rename => FsOp::Rename,
                                    proto::WatchOp::Chmod => FsOp::Chmod,
                                },
                            })
                            .collect();
                        // A reader that falls behind by a whole channel
                        // loses batches rather than hold the connection's
                        // frames in memory.
                        match tx.try_send(Ok(batch)) {
                            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                            Err(mpsc::error::TrySendError::Closed(_)) => break,
                        }
                    }
                    Kind::Response => {
                        let _ = tx.send(response(&f.body).and(Err(lost()))).await;
                        return;
                    }
                    _ => {}
                }
            }
            client.cancel(id).await;
        });
        Ok(events)
    }

    /// Uploads a buffered file.
    pub async fn write_file(self: &Arc<Self>, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let (tx, rx) = mpsc::channel(1);
        let owned = data.to_vec();
        let _ = tx.try_send(owned);
        drop(tx);
        self.write_stream(path, mode, rx, u64::MAX)
            .await
            .map(|_| ())
    }

    /// Uploads a file from `input` (ended when the channel closes), at
    /// most `max` bytes; with the `write_flow` feature the host never has
    /// more than [`INITIAL_WINDOW`] bytes in flight. On any failure the
    /// agent discards the partial upload (the old file stays).
    pub async fn write_stream(
        self: &Arc<Self>,
        path: &str,
        mode: u32,
        input: mpsc::Receiver<Vec<u8>>,
        max: u64,
    ) -> Result<u64> {
        let (id, rx, _guard) = self.register()?;
        // An upload whose caller goes away (its future dropped) is
        // cancelled in the agent at once: the file is left as it was.
        let mut abort = KillOnDrop {
            client: Some(self.clone()),
            id,
        };
        let flow = self.has("write_flow");
        let req = Request::WriteFile {
            path: path.to_string(),
            mode,
            size: 0,
            flow,
        };
        let res = self.upload_req(id, rx, &req, flow, input, max).await;
        abort.client = None;
        res.map(|(total, _)| total)
    }

    /// Sends `req`, then `input` as `Data` frames (under the agent's credit
    /// with `flow`), then the empty end frame; answers the bytes sent and
    /// the agent's result.
    async fn upload_req(
        &self,
        id: u32,
        mut rx: RouteRx,
        req: &Request,
        flow: bool,
        mut input: mpsc::Receiver<Vec<u8>>,
        max: u64,
    ) -> Result<(u64, serde_json::Value)> {
        self.send(&Frame::json(Kind::Request, id, req)).await?;
        let mut credit = INITIAL_WINDOW;
        let mut total = 0u64;
        loop {
            let chunk = tokio::time::timeout(IDLE_TIMEOUT, input.recv()).await;
            let chunk = match chunk {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) => {
                    self.cancel(id).await;
                    return Err(Error::invalid(format!(
                        "the upload stalled for {}s",
                        IDLE_TIMEOUT.as_secs()
                    )));
                }
            };
            total += chunk.len() as u64;
            if total > max {
                self.cancel(id).await;
                return Err(Error::too_large(format!(
                    "the upload is larger than the limit of {max} bytes"
                )));
            }
            for piece in chunk.chunks(MAX_CHUNK) {
                while flow && credit < piece.len() as u64 {
                    let Some(f) = rx.recv_within(IDLE_TIMEOUT).await? else {
                        return Err(lost());
                    };
                    match f.kind {
                        Kind::Window => {
                            if let Ok(w) = serde_json::from_slice::<WindowMsg>(&f.body) {
                                credit = credit.saturating_add(w.bytes);
                            }
                        }
                        // An early answer is a failure (e.g. permission denied).
                        Kind::Response => return response(&f.body).map(|v| (total, v)),
                        _ => {}
                    }
                }
                self.send_body(Kind::Data, id, piece).await?;
                credit = credit.saturating_sub(piece.len() as u64);
            }
        }
        self.send_body(Kind::Data, id, &[]).await?;
        loop {
            let Some(f) = rx.recv_within(CALL_TIMEOUT).await? else {
                return Err(lost());
            };
            if f.kind == Kind::Response {
                return response(&f.body).map(|v| (total, v));
            }
        }
    }

    /// Runs a command; output goes to `sink` in order. Dropping the future
    /// kills the command's process group.
    pub async fn exec(
        self: &Arc<Self>,
        req: Request,
        stdin: Option<Vec<u8>>,
        sink: OutputSink,
    ) -> Result<Exit> {
        let (id, mut rx, guard) = self.register()?;
        self.send(&Frame::json(Kind::Request, id, &req)).await?;
        let mut killer = KillOnDrop {
            client: Some(self.clone()),
            id,
        };
        if let Some(data) = stdin {
            for chunk in data.chunks(MAX_CHUNK) {
                self.send(&Frame::new(Kind::Stdin, id, chunk.to_vec()))
                    .await?;
            }
            self.send(&Frame::new(Kind::Stdin, id, Vec::new())).await?;
        }
        while let Some(f) = rx.recv().await {
            match f.kind {
                Kind::Stdout | Kind::Stderr => {
                    let n = f.body.len() as u64;
                    let stream = if f.kind == Kind::Stdout {
                        StreamKind::Stdout
                    } else {
                        StreamKind::Stderr
                    };
                    // Forward first, then grant credit: a slow consumer slows the command.
                    let _ = sink
                        .send(OutputChunk {
                            stream,
                            data: f.body,
                        })
                        .await;
                    let _ = self
                        .send(&Frame::json(Kind::Window, id, &WindowMsg { bytes: n }))
                        .await;
                }
                Kind::Exit => {
                    killer.client = None;
                    drop(guard);
                    return serde_json::from_slice::<Exit>(&f.body).map_err(|e| {
                        Error::internal(format!("agent sent a bad exit record: {e}"))
                    });
                }
                Kind::Response => {
                    killer.client = None;
                    return response(&f.body).and_then(|_| {
                        Err(Error::internal("agent ended exec without an exit status"))
                    });
                }
                _ => {}
            }
        }
        killer.client = None;
        Err(lost())
    }

    /// A TCP connection to `port` on the sandbox's loopback, through the
    /// agent (the `connect` feature): the returned stream is ours, a task
    /// moves its bytes over the link under credit both ways. Dropping the
    /// stream aborts the connection.
    pub async fn connect_port(self: &Arc<Self>, port: u16) -> Result<PortStream> {
        if !self.has("connect") {
            return Err(Error::unsupported(
                "this sandbox's agent cannot open connections (it predates the preview proxy; respawn the sandbox)",
            ));
        }
        let (id, mut rx, guard) = self.register()?;
        self.send(&Frame::json(Kind::Request, id, &Request::Connect { port }))
            .await?;
        // The agent's dial has a 5 s deadline of its own.
        match rx.recv_within(CONNECT_TIMEOUT * 2).await? {
            Some(f) if f.kind == Kind::Response => {
                response(&f.body)?;
            }
            Some(_) => return Err(Error::internal("agent sent data before connecting")),
            None => return Err(lost()),
        }
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let client = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let (mut rd, mut wr) = tokio::io::split(theirs);
            let mut credit: u64 = INITIAL_WINDOW;
            let (mut up_open, mut down_open) = (true, true);
            let mut buf = vec![0u8; 64 * 1024];
            let mut aborted = false;
            while up_open || down_open {
                tokio::select! {
                    f = rx.recv(), if down_open || up_open => {
                        let Some(f) = f else { aborted = true; break };
                        match f.kind {
                            Kind::Data if f.body.is_empty() => {
                                down_open = false;
                                let _ = wr.shutdown().await;
                            }
                            Kind::Data if down_open => {
                                let n = f.body.len() as u64;
                                if wr.write_all(&f.body).await.is_err() {
                                    aborted = true;
                                    break;
                                }
                                let _ = client.send(&Frame::json(Kind::Window, id, &WindowMsg { bytes: n })).await;
                            }
                            Kind::Window => {
                                if let Ok(w) = serde_json::from_slice::<WindowMsg>(&f.body) {
                                    credit = credit.saturating_add(w.bytes);
                                }
                            }
                            Kind::Response => {
                                aborted = true;
                                break;
                            }
                            _ => {}
                        }
                    }
                    // After our side's EOF, notice the stream being dropped
                    // (a zero-byte write fails once nobody reads it).
                    () = tokio::time::sleep(Duration::from_secs(2)), if !up_open => {
                        if wr.write(&[]).await.is_err() {
                            aborted = true;
                            break;
                        }
                    }
                    n = rd.read(&mut buf[..usize::try_from(credit.min(64 * 1024)).unwrap_or(0)]), if up_open && credit > 0 => {
                        match n {
                            Ok(0) | Err(_) => {
                                up_open = false;
                                if client.send(&Frame::new(Kind::Data, id, Vec::new())).await.is_err() {
                                    aborted = true;
                                    break;
                                }
                            }
                            Ok(n) => {
                                credit -= n as u64;
                                if client.send_body(Kind::Data, id, &buf[..n]).await.is_err() {
                                    aborted = true;
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            if aborted {
                client.cancel(id).await;
            }
        });
        Ok(Box::new(ours))
    }

    /// An exec whose stdin and signals come from `input` while it runs.
    pub async fn exec_interactive(
        self: &Arc<Self>,
        req: Request,
        mut input: mpsc::Receiver<stacyvm_core::provider::ExecInput>,
        sink: OutputSink,
    ) -> Result<Exit> {
        use stacyvm_core::provider::ExecInput;
        let (id, mut rx, guard) = self.register()?;
        self.send(&Frame::json(Kind::Request, id, &req)).await?;
        let mut killer = KillOnDrop {
            client: Some(self.clone()),
            id,
        };
        // Closing stdin ends the input only when the sender is gone too:
        // signals and resizes still reach a process whose stdin is closed.
        let mut input_open = true;
        let mut stdin_open = true;
        loop {
            tokio::select! {
                msg = input.recv(), if input_open => match msg {
                    Some(ExecInput::Stdin(data)) if stdin_open => {
                        for chunk in data.chunks(MAX_CHUNK) {
                            self.send(&Frame::new(Kind::Stdin, id, chunk.to_vec())).await?;
                        }
                    }
                    Some(ExecInput::Stdin(_)) => {}
                    Some(ExecInput::Signal(sig)) => self.send(&Frame::json(Kind::Signal, id, &SignalMsg { signal: sig })).await?,
                    Some(ExecInput::Resize(rows, cols)) => self.send(&Frame::json(Kind::Resize, id, &proto::Resize { rows, cols })).await?,
                    Some(ExecInput::CloseStdin) => {
                        if stdin_open {
                            self.send(&Frame::new(Kind::Stdin, id, Vec::new())).await?;
                            stdin_open = false;
                        }
                    }
                    None => {
                        if stdin_open {
                            self.send(&Frame::new(Kind::Stdin, id, Vec::new())).await?;
                            stdin_open = false;
                        }
                        input_open = false;
                    }
                },
                f = rx.recv() => {
                    let Some(f) = f else { break };
                    match f.kind {
                        Kind::Stdout | Kind::Stderr => {
                            let n = f.body.len() as u64;
                            let stream = if f.kind == Kind::Stdout { StreamKind::Stdout } else { StreamKind::Stderr };
                            let _ = sink.send(OutputChunk { stream, data: f.body }).await;
                            let _ = self.send(&Frame::json(Kind::Window, id, &WindowMsg { bytes: n })).await;
                        }
                        Kind::Exit => {
                            killer.client = None;
                            drop(guard);
                            return serde_json::from_slice::<Exit>(&f.body).map_err(|e| Error::internal(format!("agent sent a bad exit record: {e}")));
                        }
                        Kind::Response => {
                            killer.client = None;
                            return response(&f.body).and_then(|_| Err(Error::internal("agent ended exec without an exit status")));
                        }
                        _ => {}
                    }
                }
            }
        }
        killer.client = None;
        Err(lost())
    }
}

fn response(body: &[u8]) -> Result<serde_json::Value> {
    let r: Response = serde_json::from_slice(body)
        .map_err(|e| Error::internal(format!("agent sent a bad response: {e}")))?;
    match (r.error, r.result) {
        (Some(e), _) => Err(map_err(e)),
        (None, v) => Ok(v.unwrap_or(serde_json::Value::Null)),
    }
}

/// Sends SIGKILL to an exec's process group if the exec future is dropped.
struct KillOnDrop {
    client: Option<Arc<AgentClient>>,
    id: u32,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let (Some(c), Ok(rt)) = (self.client.take(), tokio::runtime::Handle::try_current()) {
            let frame = Frame::json(Kind::Signal, self.id, &SignalMsg { signal: 9 });
            rt.spawn(async move {
                let _ = c.send(&frame).await;
            });
        }
    }
}

/// Converts an agent exit record into the provider result.
pub fn to_status(id: &str, e: Exit) -> Result<ExitStatus> {
    if e.timed_out {
        return Err(Error::exec_timeout(id));
    }
    Ok(ExitStatus {
        code: e.code,
        signal: e.signal,
    })
}

/// The agent request for an exec spec (shared by every provider that
/// runs the agent).
pub(crate) fn exec_request(spec: &stacyvm_core::provider::ExecSpec, stdin: bool) -> Request {
    Request::Exec {
        argv: spec.argv.clone(),
        env: spec.env.clone(),
        cwd: spec.workdir.clone(),
        uid: spec.user.map(|u| u.uid),
        gid: spec.user.map(|u| u.gid),
        stdin,
        pty: spec.pty.map(|(rows, cols)| proto::Resize { rows, cols }),
        timeout_ms: spec
            .timeout
            .map(|t| t.as_millis().min(u128::from(u64::MAX)) as u64),
    }
}

/// An agent `FileStat` in the contract's `FileInfo` shape.
pub(crate) fn to_info(s: proto::FileStat) -> stacyvm_api::FileInfo {
    use stacyvm_core::provider::{format_mod_time, format_mode};
    let name = s.path.rsplit('/').next().unwrap_or_default().to_string();
    stacyvm_api::FileInfo {
        path: s.path.clone(),
        size: s.size,
        mode: format_mode(s.mode),
        is_dir: s.is_dir,
        mod_time: format_mod_time(
            chrono::DateTime::<chrono::Utc>::from_timestamp(s.mtime, 0).unwrap_or_default(),
        ),
        name: if s.path == "/" { "/".into() } else { name },
    }
}

#[cfg(test)]
mod tests {
    //! Hostile agents: each fake agent speaks just enough of the protocol
    //! over an in-memory pipe to attack the host client.

    use super::*;
    use stacyvm_core::ErrorKind;
    use tokio::io::DuplexStream;

    /// Bytes either direction of the in-memory pipe buffers.
    const PIPE: usize = 64 * 1024;

    /// The agent end: reads frames the host sends.
    struct FakeAgent {
        io: DuplexStream,
        dec: Decoder,
    }

    impl FakeAgent {
        async fn frame(&mut self) -> Option<Frame> {
            let mut buf = vec![0u8; PIPE];
            loop {
                if let Some(f) = self.dec.next_frame().expect("host frames are valid") {
                    return Some(f);
                }
                let n = self.io.read(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                self.dec.push(&buf[..n]);
            }
        }

        async fn send(&mut self, f: &Frame) -> std::io::Result<()> {
            self.io.write_all(&f.encode()).await
        }

        /// Answers the host's Hello; `token` signs its nonce.
        async fn hello(&mut self, token: Option<&[u8]>, features: &[&str]) {
            let h = self.frame().await.expect("host hello");
            assert_eq!(h.kind, Kind::Hello);
            let theirs: Hello = serde_json::from_slice(&h.body).expect("hello json");
            let reply = Hello {
                version: proto::VERSION,
                agent: "fake".into(),
                pid: 42,
                nonce: String::new(),
                proof: token
                    .map(|t| proto::handshake_proof(t, &theirs.nonce))
                    .unwrap_or_default(),
                features: features.iter().map(|f| (*f).to_string()).collect(),
                slot: String::new(),
            };
            self.send(&Frame::json(Kind::Hello, 0, &reply))
                .await
                .expect("send hello");
        }
    }

    fn pipe() -> (DuplexStream, FakeAgent) {
        let (host, agent) = tokio::io::duplex(PIPE);
        (
            host,
            FakeAgent {
                io: agent,
                dec: Decoder::default(),
            },
        )
    }

    fn assert_unavailable<T: std::fmt::Debug>(r: Result<T>, what: &str) {
        let e = r.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{what}: {e}");
    }

    /// (a) An agent that answers a read and then floods Data frames,
    /// ignoring flow control, loses its connection once the unread bytes
    /// pass ROUTE_BUDGET: the host stops reading (memory stays bounded)
    /// and every later call fails as unavailable.
    #[tokio::test]
    async fn a_flooding_agent_is_cut_off_at_the_route_budget() {
        let (host, mut agent) = pipe();
        let flood = tokio::spawn(async move {
            agent.hello(None, &["read_stream"]).await;
            let req = agent.frame().await.expect("read request");
            let ok = Response {
                result: Some(serde_json::json!({"size": 1u64 << 40})),
                error: None,
            };
            agent
                .send(&Frame::json(Kind::Response, req.id, &ok))
                .await
                .expect("response");
            let chunk = Frame::new(Kind::Data, req.id, vec![7u8; MAX_CHUNK]);
            let mut written = 0usize;
            // Four times the budget, unless the host stops reading first.
            while written < 4 * ROUTE_BUDGET {
                let sent = tokio::time::timeout(Duration::from_secs(2), agent.send(&chunk)).await;
                match sent {
                    Ok(Ok(())) => written += MAX_CHUNK,
                    _ => break,
                }
            }
            (written, agent)
        });
        let client = AgentClient::handshake(host, None).await.expect("handshake");
        // The caller holds the stream without reading it.
        let stream = client.read_stream("/big", u64::MAX).await.expect("stream");
        let (written, _agent) = flood.await.expect("agent task");
        assert!(client.is_closed(), "the host kept the flooding agent");
        assert!(
            written <= ROUTE_BUDGET + 2 * proto::MAX_FRAME + 2 * PIPE + 256 * 1024,
            "the host accepted {written} bytes"
        );
        assert!(written < 4 * ROUTE_BUDGET, "the host never stopped reading");
        assert_unavailable(client.ping().await, "ping after the flood");
        drop(stream);
    }

    /// (b) An agent that never answers: a call fails after CALL_TIMEOUT
    /// (virtual time), and a handshake nobody answers after
    /// CONNECT_TIMEOUT.
    #[tokio::test(start_paused = true)]
    async fn a_silent_agent_times_out() {
        let (host, mut agent) = pipe();
        let silent = tokio::spawn(async move {
            agent.hello(None, &[]).await;
            // Read requests forever, answer none.
            while agent.frame().await.is_some() {}
        });
        let client = AgentClient::handshake(host, None).await.expect("handshake");
        let start = tokio::time::Instant::now();
        assert_unavailable(client.ping().await, "ping to a silent agent");
        assert!(start.elapsed() >= CALL_TIMEOUT, "{:?}", start.elapsed());
        assert_unavailable(
            client.stat("/etc").await.map(|_| ()),
            "stat to a silent agent",
        );
        drop(client);
        silent.abort();

        let (host, _agent) = pipe();
        let start = tokio::time::Instant::now();
        assert_unavailable(
            AgentClient::handshake(host, None).await,
            "handshake nobody answers",
        );
        assert!(start.elapsed() >= CONNECT_TIMEOUT, "{:?}", start.elapsed());
    }

    /// An upload dropped in the middle of a frame (its caller hung up)
    /// leaves the connection in step: the frame is finished, the upload
    /// cancelled, and the next request is understood.
    #[tokio::test]
    async fn a_dropped_upload_never_leaves_half_a_frame() {
        let (host, mut agent) = pipe();
        let hello = tokio::spawn(async move {
            agent.hello(None, &["write_flow"]).await;
            agent
        });
        let client = AgentClient::handshake(host, None).await.expect("handshake");
        let mut agent = hello.await.expect("agent");
        // A chunk far larger than the pipe: its frame cannot be written
        // until the agent reads, which it does not yet.
        let (tx, rx) = mpsc::channel(1);
        tx.send(vec![7u8; 4 * PIPE]).await.expect("chunk");
        let upload = client.write_stream("/w/f", 0o644, rx, u64::MAX);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), upload)
                .await
                .is_err(),
            "the upload is stuck mid-frame"
        );
        drop(tx);
        let ping = {
            let client = client.clone();
            tokio::spawn(async move { client.ping().await })
        };
        // The agent sees the request, the whole data frame, the cancel,
        // then the ping, each whole.
        let mut kinds = Vec::new();
        loop {
            let f = tokio::time::timeout(Duration::from_secs(10), agent.frame())
                .await
                .unwrap_or_else(|_| panic!("the connection is out of step after {kinds:?}"))
                .expect("frame");
            if f.kind == Kind::Data {
                assert_eq!(f.body.len(), 4 * PIPE, "the data frame arrives whole");
            }
            kinds.push(f.kind);
            if f.kind == Kind::Request {
                let req: Request = serde_json::from_slice(&f.body).expect("request");
                if req == Request::Ping {
                    agent
                        .send(&Frame::json(
                            Kind::Response,
                            f.id,
                            &proto::Response::ok(serde_json::json!({"pong": true})),
                        ))
                        .await
                        .expect("pong");
                    break;
                }
            }
        }
        assert_eq!(
            kinds,
            [Kind::Request, Kind::Data, Kind::Signal, Kind::Request],
            "request, data, cancel, ping"
        );
        ping.await.expect("task").expect("the ping is answered");
    }

    /// Runs a ping against an agent that answers the Hello and then
    /// sends `garbage`; returns the client.
    async fn ping_against(garbage: Vec<u8>) -> (Result<()>, Arc<AgentClient>) {
        let (host, mut agent) = pipe();
        let task = tokio::spawn(async move {
            agent.hello(None, &[]).await;
            let _ = agent.frame().await;
            let _ = agent.io.write_all(&garbage).await;
            // Keep the pipe open: the host must close on its own.
            let _ = agent.frame().await;
        });
        let client = AgentClient::handshake(host, None).await.expect("handshake");
        let r = tokio::time::timeout(Duration::from_secs(10), client.ping())
            .await
            .expect("the host must not wait for more after a malformed frame");
        task.abort();
        (r, client)
    }

    /// (c) Malformed frames (a length beyond MAX_FRAME, a length below the
    /// header, an unknown kind) close the connection with a typed error,
    /// during a call and during the handshake.
    #[tokio::test]
    async fn malformed_frames_close_the_connection() {
        let too_long = u32::MAX.to_be_bytes().to_vec();
        let too_short = 2u32.to_be_bytes().to_vec();
        let mut unknown_kind = 9u32.to_be_bytes().to_vec();
        unknown_kind.extend_from_slice(&[99, 0, 0, 0, 1, b'{', b'}', b' ', b' ']);
        for (name, garbage) in [
            ("length above MAX_FRAME", too_long.clone()),
            ("length below the header", too_short),
            ("unknown kind", unknown_kind),
        ] {
            let (r, client) = ping_against(garbage).await;
            assert_unavailable(r, name);
            assert!(client.is_closed(), "{name}: connection kept");
            assert_unavailable(client.ping().await, name);
        }

        let (host, mut agent) = pipe();
        let task = tokio::spawn(async move {
            let _ = agent.frame().await;
            let _ = agent.io.write_all(&too_long).await;
            let _ = agent.frame().await;
        });
        assert_unavailable(AgentClient::handshake(host, None).await, "malformed hello");
        task.abort();
    }

    /// (d) An agent that cannot prove it holds the sandbox's token (none,
    /// or one made with another token) is refused; the right one passes.
    #[tokio::test]
    async fn a_wrong_handshake_proof_is_refused() {
        let token = b"the sandbox's own token".to_vec();
        for (name, signer) in [
            ("no proof", None),
            ("another sandbox's token", Some(b"another token".to_vec())),
        ] {
            let (host, mut agent) = pipe();
            let task = tokio::spawn(async move {
                agent.hello(signer.as_deref(), &[]).await;
                let _ = agent.frame().await;
            });
            assert_unavailable(AgentClient::handshake(host, Some(&token)).await, name);
            task.abort();
        }
        let (host, mut agent) = pipe();
        let t = token.clone();
        let task = tokio::spawn(async move {
            agent.hello(Some(&t), &[]).await;
            let _ = agent.frame().await;
        });
        AgentClient::handshake(host, Some(&token))
            .await
            .expect("the right proof passes");
        task.abort();
    }
}
