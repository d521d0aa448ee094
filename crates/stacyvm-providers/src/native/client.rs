//! Async host side of the agent protocol over a unix socket.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stacyvm_agent_proto::{
    self as proto, Decoder, Exit, Frame, Hello, Kind, Request, Response, SignalMsg, WindowMsg,
    MAX_CHUNK,
};
use stacyvm_core::provider::{ExitStatus, OutputChunk, OutputSink, StreamKind};
use stacyvm_core::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

type Routes = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Frame>>>>;

/// A connection to one agent.
#[derive(Debug)]
pub struct AgentClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    routes: Routes,
    next: AtomicU32,
    closed: Arc<AtomicBool>,
    pub agent_pid: u32,
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
        K::Internal => Error::internal(format!("agent: {}", e.message)),
    }
}

fn lost() -> Error {
    Error::unavailable("connection to the sandbox agent was lost")
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

impl AgentClient {
    /// Connects and performs the version handshake.
    pub async fn connect(path: &Path) -> Result<Arc<AgentClient>> {
        let stream = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(path))
            .await
            .map_err(|_| Error::unavailable("timed out connecting to the sandbox agent"))?
            .map_err(|e| {
                Error::unavailable(format!(
                    "connecting to the sandbox agent at {}",
                    path.display()
                ))
                .with_source(e)
            })?;
        let (mut rd, mut wr) = stream.into_split();
        let hello = Frame::json(
            Kind::Hello,
            0,
            &Hello {
                version: proto::VERSION,
                agent: "stacyvm".into(),
                pid: std::process::id(),
            },
        );
        wr.write_all(&hello.encode())
            .await
            .map_err(|e| Error::unavailable("agent handshake").with_source(e))?;
        let mut dec = Decoder::default();
        // Large reads: a 1 MiB file chunk arrives in a few syscalls.
        let mut buf = vec![0u8; 256 * 1024];
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
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
        let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
        let closed = Arc::new(AtomicBool::new(false));
        {
            let routes = routes.clone();
            let closed = closed.clone();
            tokio::spawn(async move {
                loop {
                    loop {
                        match dec.next_frame() {
                            Ok(Some(f)) => {
                                let tx = routes.lock().ok().and_then(|r| r.get(&f.id).cloned());
                                if let Some(tx) = tx {
                                    let _ = tx.send(f);
                                }
                            }
                            Ok(None) => break,
                            Err(_) => {
                                closed.store(true, Ordering::SeqCst);
                                if let Ok(mut r) = routes.lock() {
                                    r.clear();
                                }
                                return;
                            }
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
            });
        }
        Ok(Arc::new(AgentClient {
            writer: tokio::sync::Mutex::new(wr),
            routes,
            next: AtomicU32::new(1),
            closed,
            agent_pid: theirs.pid,
        }))
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    async fn send(&self, f: &Frame) -> Result<()> {
        let bytes = f.encode();
        let mut w = self.writer.lock().await;
        w.write_all(&bytes).await.map_err(|_| lost())
    }

    /// Sends a frame made of `body` without copying it into a frame.
    async fn send_body(&self, kind: Kind, id: u32, body: &[u8]) -> Result<()> {
        let header = Frame::header(kind, id, body.len());
        let mut w = self.writer.lock().await;
        w.write_all(&header).await.map_err(|_| lost())?;
        w.write_all(body).await.map_err(|_| lost())
    }

    fn register(&self) -> Result<(u32, mpsc::UnboundedReceiver<Frame>, RouteGuard)> {
        if self.is_closed() {
            return Err(lost());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed).max(1);
        let (tx, rx) = mpsc::unbounded_channel();
        self.routes.lock().map_err(|_| lost())?.insert(id, tx);
        Ok((
            id,
            rx,
            RouteGuard {
                routes: self.routes.clone(),
                id,
            },
        ))
    }

    /// Sends a request and waits for its `Response`, collecting `Data` frames.
    pub async fn call(&self, req: &Request) -> Result<(serde_json::Value, Vec<u8>)> {
        let (id, mut rx, _guard) = self.register()?;
        self.send(&Frame::json(Kind::Request, id, req)).await?;
        let mut data = Vec::new();
        while let Some(f) = rx.recv().await {
            match f.kind {
                Kind::Data => data.extend_from_slice(&f.body),
                Kind::Response => return response(&f.body).map(|v| (v, data)),
                _ => {}
            }
        }
        Err(lost())
    }

    /// Uploads a file in chunks.
    pub async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let (id, mut rx, _guard) = self.register()?;
        let req = Request::WriteFile {
            path: path.to_string(),
            mode,
            size: data.len() as u64,
        };
        self.send(&Frame::json(Kind::Request, id, &req)).await?;
        for chunk in data.chunks(MAX_CHUNK) {
            self.send_body(Kind::Data, id, chunk).await?;
        }
        self.send_body(Kind::Data, id, &[]).await?;
        while let Some(f) = rx.recv().await {
            if f.kind == Kind::Response {
                return response(&f.body).map(|_| ());
            }
        }
        Err(lost())
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
        let mut input_open = true;
        loop {
            tokio::select! {
                msg = input.recv(), if input_open => match msg {
                    Some(ExecInput::Stdin(data)) => {
                        for chunk in data.chunks(MAX_CHUNK) {
                            self.send(&Frame::new(Kind::Stdin, id, chunk.to_vec())).await?;
                        }
                    }
                    Some(ExecInput::Signal(sig)) => self.send(&Frame::json(Kind::Signal, id, &SignalMsg { signal: sig })).await?,
                    Some(ExecInput::Resize(rows, cols)) => self.send(&Frame::json(Kind::Resize, id, &proto::Resize { rows, cols })).await?,
                    Some(ExecInput::CloseStdin) | None => {
                        self.send(&Frame::new(Kind::Stdin, id, Vec::new())).await?;
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

    pub async fn ping(&self) -> Result<()> {
        self.call(&Request::Ping).await.map(|_| ())
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
        uid: None,
        gid: None,
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
