//! The StacyVM agent protocol (version 1).
//!
//! One byte stream (unix socket, vsock, virtio-serial) carries many
//! concurrent requests. Every frame is
//!
//! ```text
//! +----------------+---------+----------------+-------------------+
//! | len: u32 (BE)  | kind u8 | id: u32 (BE)   | body (len-5 bytes)|
//! +----------------+---------+----------------+-------------------+
//! ```
//!
//! `len` counts kind + id + body and is at most [`MAX_FRAME`]. Control
//! bodies are JSON ([`Request`], [`Response`], [`Exit`], …); data bodies
//! (stdout, stderr, stdin, file chunks) are raw bytes. Output streams use
//! credit-based flow control: the agent sends at most [`INITIAL_WINDOW`]
//! unacknowledged output bytes per exec and the host grants more with
//! `Window` frames, so one slow consumer never blocks the others.
//! See `docs/agent-protocol.md`.

pub mod boot;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Protocol version spoken by this crate.
pub const VERSION: u32 = 1;
/// Largest frame (kind + id + body).
pub const MAX_FRAME: usize = 4 * 1024 * 1024;
/// Largest data body the sender produces (leaves room for the header).
pub const MAX_CHUNK: usize = 1024 * 1024;
/// Output bytes an exec may have in flight before the host grants more.
pub const INITIAL_WINDOW: u64 = 1024 * 1024;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host → agent, id 0: JSON [`Hello`]; the agent answers with its own.
    Hello = 1,
    /// Host → agent: JSON [`Request`].
    Request = 2,
    /// Agent → host: JSON [`Response`]; ends the request (except exec, which ends with `Exit`).
    Response = 3,
    /// Agent → host: raw stdout bytes of an exec.
    Stdout = 4,
    /// Agent → host: raw stderr bytes of an exec.
    Stderr = 5,
    /// Host → agent: raw stdin bytes; an empty body closes stdin.
    Stdin = 6,
    /// Agent → host: JSON [`Exit`]; ends an exec.
    Exit = 7,
    /// Either way: a raw chunk of file content (write upload / read download).
    Data = 8,
    /// Host → agent: JSON [`SignalMsg`] for a running exec.
    Signal = 9,
    /// Host → agent: JSON [`Resize`] for a PTY exec.
    Resize = 10,
    /// Host → agent: JSON [`WindowMsg`], more output credit for an exec.
    Window = 11,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Request,
            3 => Kind::Response,
            4 => Kind::Stdout,
            5 => Kind::Stderr,
            6 => Kind::Stdin,
            7 => Kind::Exit,
            8 => Kind::Data,
            9 => Kind::Signal,
            10 => Kind::Resize,
            11 => Kind::Window,
            _ => return None,
        })
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub id: u32,
    pub body: Vec<u8>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("frame length {0} outside 5..={MAX_FRAME}")]
    BadLength(usize),
    #[error("unknown frame kind {0}")]
    BadKind(u8),
}

impl Frame {
    pub fn new(kind: Kind, id: u32, body: Vec<u8>) -> Frame {
        Frame { kind, id, body }
    }

    pub fn json<T: Serialize>(kind: Kind, id: u32, v: &T) -> Frame {
        Frame {
            kind,
            id,
            body: serde_json::to_vec(v).unwrap_or_default(),
        }
    }

    /// The 9-byte prefix (length, kind, id) of a frame whose body is
    /// `body_len` bytes: lets large bodies be written without copying them
    /// into a frame first.
    pub fn header(kind: Kind, id: u32, body_len: usize) -> [u8; 9] {
        let mut h = [0u8; 9];
        h[..4].copy_from_slice(&((5 + body_len) as u32).to_be_bytes());
        h[4] = kind as u8;
        h[5..].copy_from_slice(&id.to_be_bytes());
        h
    }

    /// Encodes the frame with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let len = 5 + self.body.len();
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.encode())
    }

    /// Reads one frame; `Ok(None)` on a clean EOF before a frame starts.
    pub fn read_from(r: &mut impl Read) -> Result<Option<Frame>, FrameError> {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        if !(5..=MAX_FRAME).contains(&len) {
            return Err(FrameError::BadLength(len));
        }
        let mut buf = vec![0u8; len];
        r.read_exact(&mut buf)?;
        Self::from_parts(&buf).map(Some)
    }

    /// Decodes kind, id and body from a length-stripped buffer.
    pub fn from_parts(buf: &[u8]) -> Result<Frame, FrameError> {
        if buf.len() < 5 {
            return Err(FrameError::BadLength(buf.len()));
        }
        let kind = Kind::from_u8(buf[0]).ok_or(FrameError::BadKind(buf[0]))?;
        let id = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        Ok(Frame {
            kind,
            id,
            body: buf[5..].to_vec(),
        })
    }
}

/// Incremental decoder for non-blocking readers: feed bytes, take frames.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf` (consumed frames are dropped in
    /// bulk, not with a memmove per frame).
    pos: usize,
}

impl Decoder {
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && (self.pos == self.buf.len() || self.pos >= 1 << 20) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, if buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let b = &self.buf[self.pos..];
        if b.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if !(5..=MAX_FRAME).contains(&len) {
            return Err(FrameError::BadLength(len));
        }
        if b.len() < 4 + len {
            return Ok(None);
        }
        let frame = Frame::from_parts(&b[4..4 + len])?;
        self.pos += 4 + len;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        Ok(Some(frame))
    }
}

/// Handshake body, both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    #[serde(default)]
    pub agent: String,
    #[serde(default)]
    pub pid: u32,
    /// Host → agent: a fresh random challenge. An agent that was given a
    /// per-sandbox token answers with [`Hello::proof`], so the host knows
    /// it reached that sandbox's agent and not a stand-in.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nonce: String,
    /// Agent → host: [`handshake_proof`] of the host's nonce.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub proof: String,
    /// Agent → host: optional protocol features it speaks ([`FEATURES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// Host → agent of a pool host (the `slots` feature): serve this
    /// connection from the named slot ([`Request::SlotOpen`]) instead of
    /// the host. The host's agent answers the Hello and hands the
    /// connection to the slot's agent, which serves every later frame.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub slot: String,
}

/// Features of this agent, announced in its `Hello`:
/// - `read_stream`: `ReadFile { stream: true }` answers with a header
///   `Response`, then `Data` under host credit (`Window`), ended by an
///   empty `Data` frame (or a second, error `Response`); a `Signal` frame
///   to the request cancels it.
/// - `write_flow`: during `WriteFile { flow: true }` the agent grants the
///   host upload credit with `Window` frames as chunks reach the disk.
/// - `chunked_results`: a `ListDir`/`Glob` result larger than
///   [`MAX_CHUNK`] arrives as `Data` frames of JSON followed by a
///   `Response` whose result is `{"chunked": true}`.
/// - `watch`: `Watch` answers with a header `Response`, then `Data`
///   frames, each a JSON array of [`WatchEvent`]s, until the host sends a
///   `Signal` to the request (then an empty `Data` frame ends it) or the
///   watch fails (a second, error `Response`).
/// - `connect`: `Connect` opens a TCP connection to a port on the
///   sandbox's loopback and answers with a `Response` (an error when
///   nothing listens there). Then bytes flow both ways as `Data` frames,
///   each direction under credit ([`INITIAL_WINDOW`] bytes, more granted
///   with `Window` frames as the other side consumes them); an empty
///   `Data` frame ends a direction (a half-close), a `Signal` to the
///   request aborts the connection. The request is over when both
///   directions have ended.
/// - `archive`: `ArchiveRead` and `ArchiveWrite` move directories as tar
///   streams (links stored as links, entries confined on extraction).
/// - `set_clock`: `SetClock` sets a microVM guest's wall clock.
pub const FEATURES: &[&str] = &[
    "read_stream",
    "write_flow",
    "chunked_results",
    "watch",
    "connect",
    "archive",
    "set_clock",
    "slots",
];

/// One change under a watched directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    /// Path relative to the watched directory (`sub/file` when recursive).
    pub name: String,
    pub op: WatchOp,
}

/// What happened to a [`WatchEvent`]'s path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchOp {
    /// Created, or moved in.
    Create,
    /// Content written.
    Write,
    /// Deleted.
    Remove,
    /// Moved away (renamed).
    Rename,
    /// Mode, owner or times changed.
    Chmod,
}

/// Domain separation for the handshake MAC.
const PROOF_CONTEXT: &[u8] = b"stacyvm-agent-hello-v1\0";

/// The agent's answer to a host nonce: hex HMAC-SHA256 keyed by the
/// sandbox token.
pub fn handshake_proof(token: &[u8], nonce: &str) -> String {
    use hmac::Mac;
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(token) else {
        return String::new();
    };
    mac.update(PROOF_CONTEXT);
    mac.update(nonce.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks an agent's proof in constant time.
pub fn verify_proof(token: &[u8], nonce: &str, proof: &str) -> bool {
    use hmac::Mac;
    let Ok(bytes) = hex::decode(proof) else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(token) else {
        return false;
    };
    mac.update(PROOF_CONTEXT);
    mac.update(nonce.as_bytes());
    !token.is_empty() && mac.verify_slice(&bytes).is_ok()
}

/// Error categories that map onto the server's error kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotFound,
    InvalidInput,
    PermissionDenied,
    AlreadyExists,
    Unsupported,
    /// A sandbox limit (processes, memory, disk) is exhausted.
    ResourceExhausted,
    /// The file (or result) is larger than the caller allows.
    TooLarge,
    Internal,
}

/// A failure reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        AgentError {
            kind,
            message: message.into(),
        }
    }
}

/// File metadata as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub path: String,
    pub size: u64,
    /// Permission bits (no type bits).
    pub mode: u32,
    pub is_dir: bool,
    pub is_symlink: bool,
    /// Seconds since the epoch.
    pub mtime: i64,
}

/// Requests (host → agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    /// Runs a command. Output arrives as `Stdout`/`Stderr` frames and the
    /// request ends with one `Exit` frame (or a `Response` error if it
    /// could not start).
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        #[serde(default)]
        cwd: String,
        #[serde(default)]
        uid: Option<u32>,
        #[serde(default)]
        gid: Option<u32>,
        /// Keep stdin open for `Stdin` frames (else it is /dev/null).
        #[serde(default)]
        stdin: bool,
        /// Run on a pseudo-terminal of this size.
        #[serde(default)]
        pty: Option<Resize>,
        /// Kill the whole process group after this many milliseconds.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Writes a file from the `Data` frames that follow (an empty `Data`
    /// frame ends the upload); parents are created.
    WriteFile {
        path: String,
        mode: u32,
        size: u64,
        /// The `write_flow` feature (see [`FEATURES`]).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        flow: bool,
    },
    /// Reads a file: `Data` frames, then a `Response` with the size.
    ReadFile {
        path: String,
        /// Refuse files larger than this (and stop a growing file there).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bytes: Option<u64>,
        /// The `read_stream` feature (see [`FEATURES`]).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stream: bool,
    },
    ListDir {
        path: String,
        /// The `chunked_results` feature.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        chunked: bool,
    },
    Stat {
        path: String,
    },
    /// Deleting a missing path succeeds.
    Remove {
        path: String,
        recursive: bool,
    },
    /// Creates the parent of `to`.
    Rename {
        from: String,
        to: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Mkdir {
        path: String,
    },
    Glob {
        pattern: String,
        /// The `chunked_results` feature.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        chunked: bool,
    },
    /// Watches a directory for changes (the `watch` feature).
    Watch {
        path: String,
        /// Subdirectories too, including ones made while watching.
        #[serde(default)]
        recursive: bool,
    },
    /// Opens a TCP connection to `port` on the sandbox's loopback (the
    /// `connect` feature): the preview proxy's way into sandboxes whose
    /// network the host cannot enter directly.
    Connect {
        port: u16,
    },
    /// Packs `path` (a directory's contents, or one file) as a tar stream
    /// (the `archive` feature): answered like a streamed `ReadFile`.
    ArchiveRead {
        path: String,
        max_bytes: u64,
        max_entries: u64,
    },
    /// Extracts the tar stream of the `Data` frames that follow into the
    /// directory `path` (created if missing), with upload credit as for
    /// `WriteFile { flow: true }`; an empty `Data` frame ends it. Answers
    /// `{"entries": N, "bytes": N}`. A refused archive, or one whose upload
    /// is cancelled, leaves nothing it created.
    ArchiveWrite {
        path: String,
        max_bytes: u64,
        max_entries: u64,
    },
    /// Stops every process and exits the agent (sandbox teardown).
    Shutdown,
    /// MicroVM guests only, after a snapshot restore: a fresh identity
    /// for the clone (hostname, wall clock, random seed mixed into and
    /// reseeding the kernel's CRNG, a new `/etc/machine-id` if the image
    /// has one).
    Reidentify {
        hostname: String,
        /// The host's wall clock, nanoseconds since the epoch.
        unix_nanos: i64,
        /// Hex of 32 or more random bytes.
        seed: String,
        /// The clone's network interface, when the VM has one: the
        /// template's guest left `eth0` down and unaddressed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        net: Option<GuestNet>,
    },
    /// microVM guests only (feature `set_clock`): sets the wall clock to
    /// the host's, after a pause (a stopped VM's clock stands still).
    SetClock {
        /// The host's wall clock, nanoseconds since the epoch.
        unix_nanos: i64,
    },
    /// Pool hosts only (feature `slots`): starts a slot — a logical
    /// sandbox inside this one, with its own pid and mount namespaces, its
    /// own `uid`/`gid`, a private `/tmp` and a `/workspace` in which only
    /// its own directory `/workspace/<id>` (mode 0700, its uid's) is
    /// visible. Its agent runs as that uid with no capabilities. Opening a
    /// slot that exists succeeds (idempotent).
    SlotOpen {
        /// `sb-` and 8 lowercase hex digits.
        id: String,
        uid: u32,
        gid: u32,
        /// A network namespace of its own (loopback only): its ports,
        /// loopback and abstract sockets are nobody else's. Without it the
        /// slot shares the host's network (a bridged host's way out).
        #[serde(default)]
        private_network: bool,
    },
    /// Pool hosts only: ends a slot (every process in it) and removes its
    /// workspace. Closing an unknown slot succeeds.
    SlotClose {
        id: String,
    },
    /// Pool hosts only: the ids of the slots alive. Answers `{"slots": […]}`.
    SlotList,
}

/// How a microVM guest configures `eth0` (given at boot on the kernel
/// command line, or to a restored clone by `Reidentify`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNet {
    /// IPv4 address, dotted.
    pub address: String,
    /// Prefix length of the subnet.
    pub prefix: u8,
    /// Default gateway, dotted.
    pub gateway: String,
    /// The interface's MAC (`aa:bb:cc:dd:ee:ff`); empty keeps the device's.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// Written to `/etc/resolv.conf` when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

/// Terminal answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AgentError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    pub fn ok(v: serde_json::Value) -> Self {
        Response {
            error: None,
            result: Some(v),
        }
    }
    pub fn err(e: AgentError) -> Self {
        Response {
            error: Some(e),
            result: None,
        }
    }
}

/// End of an exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// Exit code, or 128 + signal when killed by a signal.
    pub code: i32,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub timed_out: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalMsg {
    pub signal: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowMsg {
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let f = Frame::json(Kind::Request, 7, &Request::Ping);
        let bytes = f.encode();
        let back = Frame::read_from(&mut &bytes[..])
            .expect("read")
            .expect("frame");
        assert_eq!(back, f);
        let mut d = Decoder::default();
        d.push(&bytes[..3]);
        assert!(d.next_frame().expect("partial").is_none());
        d.push(&bytes[3..]);
        assert_eq!(d.next_frame().expect("full"), Some(f));
    }

    #[test]
    fn rejects_bad_lengths_and_kinds() {
        assert!(matches!(
            Frame::read_from(&mut &[0u8, 0, 0, 1, 1][..]),
            Err(FrameError::BadLength(1))
        ));
        assert!(matches!(
            Frame::read_from(&mut &[0xffu8, 0, 0, 0][..]),
            Err(FrameError::BadLength(_))
        ));
        assert!(matches!(
            Frame::read_from(&mut &[0u8, 0, 0, 5, 99, 0, 0, 0, 0][..]),
            Err(FrameError::BadKind(99))
        ));
        assert!(Frame::read_from(&mut &[][..]).expect("eof").is_none());
    }

    #[test]
    fn handshake_proof_binds_token_and_nonce() {
        let p = handshake_proof(b"secret-a", "n1");
        assert_eq!(p.len(), 64);
        assert!(verify_proof(b"secret-a", "n1", &p));
        assert!(
            !verify_proof(b"secret-b", "n1", &p),
            "another sandbox's token"
        );
        assert!(!verify_proof(b"secret-a", "n2", &p), "a replayed proof");
        assert!(!verify_proof(b"secret-a", "n1", "zz"), "not hex");
        assert!(
            !verify_proof(b"", "n1", &handshake_proof(b"", "n1")),
            "empty token"
        );
    }

    #[test]
    fn request_json_shape() {
        let r = Request::Stat { path: "/x".into() };
        assert_eq!(
            serde_json::to_string(&r).expect("json"),
            r#"{"op":"stat","path":"/x"}"#
        );
    }

    proptest! {
        /// The decoder never panics and never yields a frame it could not re-encode.
        #[test]
        fn decoder_survives_arbitrary_bytes(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut d = Decoder::default();
            for c in chunks {
                d.push(&c);
                while let Ok(Some(f)) = d.next_frame() {
                    let _ = f.encode();
                }
            }
        }

        #[test]
        fn reader_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut r = &bytes[..];
            while let Ok(Some(_)) = Frame::read_from(&mut r) {}
        }

        #[test]
        fn request_decoding_never_panics(s in "\\PC{0,200}") {
            let _ = serde_json::from_str::<Request>(&s);
        }

        #[test]
        fn frames_round_trip(kind in 1u8..=11, id in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let f = Frame::new(Kind::from_u8(kind).expect("kind"), id, body);
            let enc = f.encode();
            let mut d = Decoder::default();
            d.push(&enc);
            prop_assert_eq!(d.next_frame().expect("ok"), Some(f));
        }
    }
}
