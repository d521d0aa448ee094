//! Connection handling: handshake, request dispatch, routing of stdin,
//! window, signal and upload frames to the request they belong to.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use stacyvm_agent_proto::{
    AgentError, ErrorKind, Frame, Hello, Kind, Request, Response, SignalMsg, WindowMsg, FEATURES,
    MAX_CHUNK, MAX_FRAME, VERSION,
};

use crate::exec::{self, ExecHandle, ExecParams, Reaper, Window};
use crate::files;

/// The per-sandbox secret this agent proves it holds at every handshake.
static TOKEN: OnceLock<Vec<u8>> = OnceLock::new();

/// Sets the handshake token (once, before serving).
pub fn set_token(token: Vec<u8>) {
    let _ = TOKEN.set(token);
}

/// How long a streamed read waits for host credit before giving up.
const CREDIT_WAIT: Duration = Duration::from_secs(120);

/// One host connection.
pub struct Conn {
    writer: Mutex<Box<dyn Write + Send>>,
    execs: Mutex<HashMap<u32, Arc<ExecHandle>>>,
    uploads: Mutex<HashMap<u32, mpsc::Sender<Vec<u8>>>>,
    /// Streamed reads in flight: their credit (and cancellation).
    reads: Mutex<HashMap<u32, Arc<Window>>>,
    /// Directory watches in flight: their stop flags.
    watches: Mutex<HashMap<u32, Arc<AtomicBool>>>,
    /// TCP connections in flight (`Connect`): shut down on a `Signal`.
    sockets: Mutex<HashMap<u32, std::net::TcpStream>>,
}

impl Conn {
    /// Drops what the host of this session had in flight (a new host took
    /// over): streamed output and reads stop waiting for its credit,
    /// uploads end, stdin closes. Processes run on.
    fn forget_session(&self) {
        for h in self.execs.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            h.1.window.cancel();
        }
        for r in self.reads.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            r.1.cancel();
        }
        self.stop_watches();
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.close_sockets();
    }

    /// Aborts every TCP connection of this host connection.
    fn close_sockets(&self) {
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            let _ = s.1.shutdown(std::net::Shutdown::Both);
        }
    }

    pub(crate) fn reads_insert(&self, id: u32, w: Arc<Window>) {
        self.reads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, w);
    }

    pub(crate) fn uploads_insert(&self, id: u32, tx: mpsc::Sender<Vec<u8>>) {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
    }

    pub(crate) fn sockets_insert(&self, id: u32, s: std::net::TcpStream) {
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, s);
    }

    /// Drops the routes of a finished `Connect`.
    pub(crate) fn forget_connection(&self, id: u32) {
        self.reads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Ends every directory watch of this connection.
    fn stop_watches(&self) {
        for w in self
            .watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            w.1.store(true, Ordering::SeqCst);
        }
    }

    pub fn send(&self, f: &Frame) -> std::io::Result<()> {
        let bytes = f.encode();
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(&bytes)
    }

    /// Sends a frame made of `body` without building it in memory first.
    pub fn send_body(&self, kind: Kind, id: u32, body: &[u8]) -> std::io::Result<()> {
        let header = Frame::header(kind, id, body.len());
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(&header)?;
        w.write_all(body)
    }

    pub fn respond(&self, id: u32, r: Result<serde_json::Value, AgentError>) {
        let resp = match r {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(e),
        };
        let mut frame = Frame::json(Kind::Response, id, &resp);
        // Never send what the host must refuse (it would drop the whole
        // connection): a result too large for one frame is an error.
        if frame.body.len() + 5 > MAX_FRAME {
            frame = Frame::json(
                Kind::Response,
                id,
                &Response::err(AgentError::new(
                    ErrorKind::TooLarge,
                    "the result is too large for one reply; narrow the request",
                )),
            );
        }
        let _ = self.send(&frame);
    }

    /// Answers with `v`: inline when it fits one chunk, otherwise (when the
    /// host asked for `chunked` results) as `Data` frames of its JSON
    /// followed by `{"chunked": true}`.
    fn respond_json<T: serde::Serialize>(&self, id: u32, v: Result<T, AgentError>, chunked: bool) {
        let bytes = match v.and_then(|v| {
            serde_json::to_vec(&v).map_err(|e| AgentError::new(ErrorKind::Internal, e.to_string()))
        }) {
            Ok(b) => b,
            Err(e) => return self.respond_err(id, e),
        };
        if bytes.len() <= MAX_CHUNK || !chunked {
            let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            return self.respond(id, Ok(value));
        }
        for chunk in bytes.chunks(MAX_CHUNK) {
            if self.send_body(Kind::Data, id, chunk).is_err() {
                return;
            }
        }
        self.respond(id, Ok(serde_json::json!({"chunked": true})));
    }

    pub fn respond_err(&self, id: u32, e: AgentError) {
        self.respond(id, Err(e));
    }

    pub fn forget_exec(&self, id: u32) {
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

/// Accepts connections forever. `pid1` marks the sandbox init.
pub fn serve(listener: UnixListener, pid1: bool) {
    // 1 MiB file chunks reuse heap memory; at most 4 MiB of freed heap is
    // kept (idle sandboxes stay small).
    stacyvm_sandbox::tune_allocator(2 << 20, 4 << 20);
    let reaper = Arc::new(Reaper::default());
    {
        let r = reaper.clone();
        if crate::spawn_thread(move || r.run()).is_err() {
            eprintln!("stacyvm-agent: cannot start the reaper thread");
            return;
        }
    }
    if pid1 {
        eprintln!(
            "stacyvm-agent {} ready (pid 1, protocol {VERSION})",
            env!("CARGO_PKG_VERSION")
        );
    }
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let reaper = reaper.clone();
        if crate::spawn_thread(move || handle(stream, reaper, pid1)).is_err() {
            // Out of threads: drop this connection; the host reconnects.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn handle(stream: UnixStream, reaper: Arc<Reaper>, pid1: bool) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    // The Hello, read unbuffered: a connection for a pool slot goes on to
    // the slot's agent with nothing of it read past the Hello (the host
    // sends no other frame before the answer).
    let hello = match Frame::read_from(&mut &stream) {
        Ok(Some(f)) if f.kind == Kind::Hello => f,
        _ => return,
    };
    let slot = serde_json::from_slice::<Hello>(&hello.body)
        .map(|h| h.slot)
        .unwrap_or_default();
    if !slot.is_empty() {
        let conn = new_conn(Box::new(write_half));
        let handed = crate::slot::hand_off(&slot, &stream);
        // Echoing the slot tells the host the slot's agent has it.
        answer_hello(&hello, &conn, if handed { &slot } else { "" });
        return;
    }
    handle_stream(
        stream,
        Box::new(write_half),
        &reaper,
        pid1,
        Greeting::Received(hello),
    );
}

/// A connection a pool host's agent handed to this slot's agent, its
/// Hello answered there.
pub fn serve_handed(stream: UnixStream, reaper: Arc<Reaper>) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    handle_stream(stream, Box::new(write_half), &reaper, true, Greeting::Done);
}

/// Where a connection's handshake stands when it is served.
pub enum Greeting {
    /// The first frame must be the host's Hello.
    Expect,
    /// The Hello was read; answer it.
    Received(Frame),
    /// Answered elsewhere (a pool host's agent, for a slot).
    Done,
}

fn new_conn(write: Box<dyn Write + Send>) -> Arc<Conn> {
    Arc::new(Conn {
        writer: Mutex::new(write),
        execs: Mutex::new(HashMap::new()),
        uploads: Mutex::new(HashMap::new()),
        reads: Mutex::new(HashMap::new()),
        watches: Mutex::new(HashMap::new()),
        sockets: Mutex::new(HashMap::new()),
    })
}

/// Serves one host connection on `read` (and `write`, the same stream's
/// other half) until the host closes it: a unix socket, or a microVM's
/// virtio-serial port.
pub fn handle_stream<R: Read>(
    read: R,
    write: Box<dyn Write + Send>,
    reaper: &Arc<Reaper>,
    pid1: bool,
    greeting: Greeting,
) {
    let stream = read;
    let conn = new_conn(write);
    // Watches and TCP connections end with the connection (their threads
    // would otherwise wait for the next change or byte to find the host
    // gone).
    struct EndWatches(Arc<Conn>);
    impl Drop for EndWatches {
        fn drop(&mut self) {
            self.0.stop_watches();
            self.0.close_sockets();
        }
    }
    let _end = EndWatches(conn.clone());
    let mut reader = BufReader::with_capacity(256 * 1024, stream);
    // Handshake: the first frame must be Hello with our major version.
    let hello = match greeting {
        Greeting::Done => None,
        Greeting::Received(f) => Some(f),
        Greeting::Expect => match Frame::read_from(&mut reader) {
            Ok(Some(f)) if f.kind == Kind::Hello => Some(f),
            _ => return,
        },
    };
    if let Some(f) = hello {
        if !answer_hello(&f, &conn, "") {
            return;
        }
    }
    loop {
        let frame = match Frame::read_from(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => return,
        };
        if frame.kind == Kind::Hello && crate::guest::is_guest() {
            // A new host on a virtio port that never said the old one
            // left: a clone of a sandbox snapshot, whose agent was in its
            // source's session (the port's hang-up is a control message
            // the device may drop). What the old host ran is forgotten,
            // as at the end of a session, and the new one is answered.
            conn.forget_session();
            if !answer_hello(&frame, &conn, "") {
                return;
            }
            continue;
        }
        dispatch(frame, &conn, reaper, pid1);
    }
}

/// Answers a host's Hello (with the token proof when we have a token);
/// false when its protocol version is not ours.
fn answer_hello(f: &Frame, conn: &Conn, slot: &str) -> bool {
    let hello: Option<Hello> = serde_json::from_slice(&f.body).ok();
    let proof = match (TOKEN.get(), hello.as_ref()) {
        (Some(token), Some(h)) if !h.nonce.is_empty() => {
            stacyvm_agent_proto::handshake_proof(token, &h.nonce)
        }
        _ => String::new(),
    };
    let ours = Hello {
        version: VERSION,
        agent: format!("stacyvm-agent {}", env!("CARGO_PKG_VERSION")),
        pid: std::process::id(),
        nonce: String::new(),
        proof,
        features: FEATURES.iter().map(|f| (*f).to_string()).collect(),
        slot: slot.to_string(),
    };
    let _ = conn.send(&Frame::json(Kind::Hello, 0, &ours));
    hello.map(|h| h.version) == Some(VERSION)
}

fn dispatch(f: Frame, conn: &Arc<Conn>, reaper: &Arc<Reaper>, pid1: bool) {
    let id = f.id;
    match f.kind {
        Kind::Request => {
            let req: Request = match serde_json::from_slice(&f.body) {
                Ok(r) => r,
                Err(e) => {
                    return conn.respond_err(
                        id,
                        AgentError::new(ErrorKind::InvalidInput, format!("bad request: {e}")),
                    )
                }
            };
            request(id, req, conn, reaper, pid1);
        }
        Kind::Data => {
            let tx = conn
                .uploads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .cloned();
            if let Some(tx) = tx {
                let end = f.body.is_empty();
                let _ = tx.send(f.body);
                if end {
                    conn.uploads
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                }
            }
        }
        Kind::Stdin => {
            let h = conn
                .execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .cloned();
            if let Some(tx) = h.and_then(|h| h.stdin.clone()) {
                let _ = tx.send(f.body);
            }
        }
        Kind::Window => {
            let h = conn
                .execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .cloned();
            let Ok(w) = serde_json::from_slice::<WindowMsg>(&f.body) else {
                return;
            };
            if let Some(h) = h {
                h.window.grant(w.bytes);
            } else if let Some(r) = conn
                .reads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
            {
                r.grant(w.bytes);
            }
        }
        Kind::Resize => {
            let h = conn
                .execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .cloned();
            if let (Some(h), Ok(r)) = (
                h,
                serde_json::from_slice::<stacyvm_agent_proto::Resize>(&f.body),
            ) {
                h.resize(r.rows, r.cols);
            }
        }
        Kind::Signal => {
            // A signal to a TCP connection aborts it; to a streamed read
            // or a watch, cancels it; to an upload, aborts it (its channel
            // closes before the final chunk).
            if let Some(s) = conn
                .sockets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id)
            {
                let _ = s.shutdown(std::net::Shutdown::Both);
                if let Some(r) = conn
                    .reads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id)
                {
                    r.cancel();
                }
                conn.uploads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                return;
            }
            if let Some(w) = conn
                .watches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id)
            {
                w.store(true, Ordering::SeqCst);
                return;
            }
            if let Some(r) = conn
                .reads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
            {
                r.cancel();
                return;
            }
            if conn
                .uploads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id)
                .is_some()
            {
                return;
            }
            let h = conn
                .execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .cloned();
            if let (Some(h), Ok(s)) = (h, serde_json::from_slice::<SignalMsg>(&f.body)) {
                h.signal(s.signal);
            }
        }
        _ => {}
    }
}

fn request(id: u32, req: Request, conn: &Arc<Conn>, reaper: &Arc<Reaper>, pid1: bool) {
    match req {
        Request::Ping => conn.respond(id, Ok(serde_json::json!({"pong": true}))),
        Request::Exec {
            argv,
            env,
            cwd,
            uid,
            gid,
            stdin,
            pty,
            timeout_ms,
        } => {
            let (stdin_tx, stdin_rx) = if stdin {
                let (tx, rx) = mpsc::channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            let handle = Arc::new(ExecHandle {
                stdin: stdin_tx,
                pgid: Arc::new(Mutex::new(None)),
                pending_signal: Mutex::new(None),
                pending_resize: Mutex::new(None),
                window: Window::new(),
                pty: Mutex::new(None),
            });
            conn.execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, handle.clone());
            let params = ExecParams {
                argv,
                env,
                cwd,
                uid,
                gid,
                stdin,
                timeout: timeout_ms.map(Duration::from_millis),
                pty: pty.map(|r| (r.rows, r.cols)),
            };
            let (c, r) = (conn.clone(), reaper.clone());
            if crate::spawn_thread(move || exec::run(id, params, c, r, handle, stdin_rx)).is_err() {
                conn.forget_exec(id);
                conn.respond_err(id, exhausted());
            }
        }
        Request::WriteFile {
            path,
            mode,
            size: _,
            flow,
        } => {
            // Register the upload route before any Data frame can arrive.
            let (tx, rx) = mpsc::channel::<Vec<u8>>();
            conn.uploads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, tx);
            let c = conn.clone();
            let spawned = crate::spawn_thread(move || {
                let res = (|| {
                    let mut up = files::Upload::start(&path, mode)?;
                    loop {
                        match rx.recv_timeout(Duration::from_secs(120)) {
                            Ok(d) if d.is_empty() => break,
                            Ok(d) => {
                                if let Err(e) = up.write(&d) {
                                    up.abort();
                                    return Err(e);
                                }
                                if flow {
                                    // The chunk is on disk: the host may send more.
                                    let w = WindowMsg {
                                        bytes: d.len() as u64,
                                    };
                                    let _ = c.send(&Frame::json(Kind::Window, id, &w));
                                }
                            }
                            Err(_) => {
                                up.abort();
                                return Err(AgentError::new(
                                    ErrorKind::InvalidInput,
                                    "upload ended before its last chunk",
                                ));
                            }
                        }
                    }
                    up.finish()
                })();
                c.uploads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                c.respond(id, res.map(|n| serde_json::json!({"size": n})));
            });
            if spawned.is_err() {
                conn.uploads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                conn.respond_err(id, exhausted());
            }
        }
        Request::ReadFile {
            path,
            max_bytes,
            stream: true,
        } => {
            let window = Window::new();
            conn.reads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, window.clone());
            let c = conn.clone();
            let spawned = crate::spawn_thread(move || {
                stream_file(id, &path, max_bytes.unwrap_or(u64::MAX), &c, &window);
                c.reads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
            if spawned.is_err() {
                conn.reads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                conn.respond_err(id, exhausted());
            }
        }
        Request::Watch { path, recursive } => {
            let stop = Arc::new(AtomicBool::new(false));
            conn.watches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, stop.clone());
            let c = conn.clone();
            let spawned = crate::spawn_thread(move || {
                crate::watch::run(id, &path, recursive, &c, &stop);
                c.watches
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
            if spawned.is_err() {
                conn.watches
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                conn.respond_err(id, exhausted());
            }
        }
        Request::Connect { port } => crate::tcp::start(id, port, conn),
        Request::ArchiveRead {
            path,
            max_bytes,
            max_entries,
        } => {
            let window = Window::new();
            conn.reads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, window.clone());
            let c = conn.clone();
            let limits = stacyvm_sandbox::archive::Limits {
                max_bytes,
                max_entries,
            };
            let spawned = crate::spawn_thread(move || {
                stream_archive(id, &path, limits, &c, &window);
                c.reads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
            if spawned.is_err() {
                conn.reads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                conn.respond_err(id, exhausted());
            }
        }
        Request::ArchiveWrite {
            path,
            max_bytes,
            max_entries,
        } => {
            let (tx, rx) = mpsc::channel::<Vec<u8>>();
            conn.uploads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, tx);
            let c = conn.clone();
            let limits = stacyvm_sandbox::archive::Limits {
                max_bytes,
                max_entries,
            };
            let spawned = crate::spawn_thread(move || {
                let credit = c.clone();
                // Each chunk taken is credit for the next one.
                let reader = stacyvm_sandbox::archive::ChunkReader::new(
                    rx,
                    Duration::from_secs(120),
                    move |n| {
                        let w = WindowMsg { bytes: n as u64 };
                        let _ = credit.send(&Frame::json(Kind::Window, id, &w));
                    },
                );
                let res = stacyvm_sandbox::archive::unpack(&path, reader, limits, |r| r.drain());
                c.uploads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                c.respond(
                    id,
                    res.map(|r| serde_json::json!({"entries": r.entries, "bytes": r.bytes})),
                );
            });
            if spawned.is_err() {
                conn.uploads
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                conn.respond_err(id, exhausted());
            }
        }
        other => {
            let c = conn.clone();
            if crate::spawn_thread(move || simple(id, other, &c, pid1)).is_err() {
                conn.respond_err(id, exhausted());
            }
        }
    }
}

pub(crate) fn exhausted() -> AgentError {
    AgentError::new(
        ErrorKind::ResourceExhausted,
        "the sandbox is out of processes or memory; retry when its processes exit",
    )
}

fn to_json<T: serde::Serialize>(v: T) -> Result<serde_json::Value, AgentError> {
    serde_json::to_value(v).map_err(|e| AgentError::new(ErrorKind::Internal, e.to_string()))
}

fn simple(id: u32, req: Request, conn: &Arc<Conn>, pid1: bool) {
    let res: Result<serde_json::Value, AgentError> = match req {
        Request::ReadFile {
            path, max_bytes, ..
        } => read_file(id, &path, max_bytes.unwrap_or(u64::MAX), conn),
        Request::ListDir { path, chunked } => {
            return conn.respond_json(id, files::list(&path), chunked);
        }
        Request::Stat { path } => files::stat_of(&path, true).and_then(to_json),
        Request::Remove { path, recursive } => {
            files::remove(&path, recursive).map(|()| serde_json::json!({}))
        }
        Request::Rename { from, to } => files::rename(&from, &to).map(|()| serde_json::json!({})),
        Request::Chmod { path, mode } => files::chmod(&path, mode).map(|()| serde_json::json!({})),
        Request::Mkdir { path } => files::mkdir(&path).map(|()| serde_json::json!({})),
        Request::Glob { pattern, chunked } => {
            return conn.respond_json(id, files::glob(&pattern), chunked);
        }
        Request::Shutdown => {
            conn.respond(id, Ok(serde_json::json!({})));
            if pid1 {
                // Killing every process of the namespace ends the sandbox.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(-1),
                    nix::sys::signal::Signal::SIGKILL,
                );
                if crate::guest::is_guest() {
                    // A microVM's init must not exit (the kernel panics):
                    // it powers the machine off.
                    crate::guest::power_off();
                }
                std::process::exit(0);
            }
            return;
        }
        Request::Reidentify {
            hostname,
            unix_nanos,
            seed,
            net,
        } => {
            if crate::guest::is_guest() {
                crate::guest::reidentify(&hostname, unix_nanos, &seed, net.as_ref())
                    .map(|()| serde_json::json!({}))
                    .map_err(|e| AgentError::new(ErrorKind::Internal, e))
            } else {
                Err(AgentError::new(
                    ErrorKind::Internal,
                    "reidentify is for microVM guests only",
                ))
            }
        }
        Request::SlotOpen {
            id,
            uid,
            gid,
            private_network,
        } => crate::slot::open(&id, uid, gid, private_network).map(|()| serde_json::json!({})),
        Request::SlotClose { id } => crate::slot::close(&id).map(|()| serde_json::json!({})),
        Request::SlotList => crate::slot::list().map(|ids| serde_json::json!({ "slots": ids })),
        Request::SetClock { unix_nanos } => {
            if crate::guest::is_guest() {
                crate::guest::set_clock(unix_nanos)
                    .map(|()| serde_json::json!({}))
                    .map_err(|e| AgentError::new(ErrorKind::Internal, e))
            } else {
                // A sandbox sharing the host's kernel shares its clock.
                Err(AgentError::new(
                    ErrorKind::Internal,
                    "set_clock is for microVM guests only",
                ))
            }
        }
        Request::Ping
        | Request::Exec { .. }
        | Request::WriteFile { .. }
        | Request::Watch { .. }
        | Request::Connect { .. }
        | Request::ArchiveRead { .. }
        | Request::ArchiveWrite { .. } => Err(AgentError::new(ErrorKind::Internal, "unreachable")),
    };
    conn.respond(id, res);
}

/// Buffered read (hosts without `read_stream`): regular files only, at
/// most `max` bytes.
fn read_file(
    id: u32,
    path: &str,
    max: u64,
    conn: &Arc<Conn>,
) -> Result<serde_json::Value, AgentError> {
    use std::io::Read;
    let (mut f, _) = files::open_regular(path, max)?;
    let mut total = 0u64;
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let n = f.read(&mut buf).map_err(|e| files::err(path, &e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > max {
            return Err(files::too_large(path, max));
        }
        conn.send_body(Kind::Data, id, &buf[..n])
            .map_err(|e| files::err(path, &e))?;
    }
    Ok(serde_json::json!({"size": total}))
}

/// Streamed read (`read_stream`): a header response with the size, then
/// chunks as the host grants credit, then an empty chunk; a failure after
/// the header is a second (error) response.
/// Sends `Data` frames under the host's credit.
struct CreditWriter<'a> {
    id: u32,
    conn: &'a Arc<Conn>,
    window: &'a Window,
    buf: Vec<u8>,
}

impl CreditWriter<'_> {
    fn send_buffered(&mut self) -> std::io::Result<()> {
        let mut at = 0;
        while at < self.buf.len() {
            let want = (self.buf.len() - at) as u64;
            let Some(credit) = self.window.take_within(want, CREDIT_WAIT) else {
                return Err(std::io::Error::other("the host stopped reading"));
            };
            let n = usize::try_from(credit)
                .unwrap_or(0)
                .min(self.buf.len() - at);
            if n == 0 {
                continue;
            }
            self.window.grant(credit - n as u64);
            self.conn
                .send_body(Kind::Data, self.id, &self.buf[at..at + n])
                .map_err(|_| std::io::Error::other("the host went away"))?;
            at += n;
        }
        self.buf.clear();
        Ok(())
    }
}

impl Write for CreditWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= MAX_CHUNK {
            self.send_buffered()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buffered()
    }
}

/// Packs `path` as a tar stream to the host (an `ArchiveRead`).
fn stream_archive(
    id: u32,
    path: &str,
    limits: stacyvm_sandbox::archive::Limits,
    conn: &Arc<Conn>,
    window: &Window,
) {
    if let Err(e) = std::fs::symlink_metadata(path) {
        return conn.respond_err(id, files::err(path, &e));
    }
    conn.respond(id, Ok(serde_json::json!({})));
    let mut w = CreditWriter {
        id,
        conn,
        window,
        buf: Vec::with_capacity(MAX_CHUNK),
    };
    match stacyvm_sandbox::archive::pack(path, &mut w, limits).and_then(|_| {
        w.flush()
            .map_err(|e| AgentError::new(ErrorKind::Internal, e.to_string()))
    }) {
        Ok(()) => {
            let _ = conn.send_body(Kind::Data, id, &[]);
        }
        // Cancelled by the host: nobody to tell.
        Err(_) if window.is_cancelled() => {}
        Err(e) => conn.respond_err(id, e),
    }
}

fn stream_file(id: u32, path: &str, max: u64, conn: &Arc<Conn>, window: &Window) {
    use std::io::Read;
    let (mut f, size) = match files::open_regular(path, max) {
        Ok(x) => x,
        Err(e) => return conn.respond_err(id, e),
    };
    conn.respond(id, Ok(serde_json::json!({ "size": size })));
    let mut total = 0u64;
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let Some(credit) = window.take_within(MAX_CHUNK as u64, CREDIT_WAIT) else {
            // Cancelled, or the host stopped reading: just stop.
            return;
        };
        let want = usize::try_from(credit).unwrap_or(MAX_CHUNK).min(MAX_CHUNK);
        let n = match f.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) => return conn.respond_err(id, files::err(path, &e)),
        };
        if n == 0 {
            let _ = conn.send_body(Kind::Data, id, &[]);
            return;
        }
        // Unused credit goes back for the next round.
        window.grant(credit - n as u64);
        total += n as u64;
        if total > max {
            return conn.respond_err(id, files::too_large(path, max));
        }
        if conn.send_body(Kind::Data, id, &buf[..n]).is_err() {
            return;
        }
    }
}
