//! `Connect`: a TCP connection to a port on the sandbox's loopback,
//! carried over the agent link (the preview proxy's way into sandboxes
//! whose network namespace the host cannot enter: containers under
//! gVisor, microVMs).
//!
//! Two threads per connection. The reader sends what the sandbox's server
//! writes as `Data` frames, taking host credit ([`Window`]) before each;
//! an empty frame says the server closed its side. The writer takes the
//! host's `Data` frames from the upload route and grants the host credit
//! as each chunk is written to the socket, so a server that stops reading
//! holds at most one window of the host's bytes here; an empty frame
//! half-closes the socket. A `Signal` aborts both (the socket is shut
//! down). The request's routes are dropped when both threads are done.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use stacyvm_agent_proto::{AgentError, ErrorKind, Frame, Kind, WindowMsg, MAX_CHUNK};

use crate::exec::Window;
use crate::server::Conn;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long either direction waits for the other side's credit or data
/// before the connection is dropped as abandoned.
const IDLE_LIMIT: Duration = Duration::from_secs(3600);
/// Largest read from the socket per frame.
const READ_CHUNK: usize = 64 * 1024;

/// Dials `port` on loopback (IPv4, then IPv6).
fn dial(port: u16) -> Result<TcpStream, AgentError> {
    let mut last = None;
    for ip in [
        std::net::IpAddr::V4(Ipv4Addr::LOCALHOST),
        std::net::IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        match TcpStream::connect_timeout(&SocketAddr::new(ip, port), CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    let e = last.map_or_else(|| "no address".to_string(), |e| e.to_string());
    Err(AgentError::new(
        ErrorKind::NotFound,
        format!("nothing accepts connections on port {port} in the sandbox ({e})"),
    ))
}

/// Handles `Connect { port }` for request `id`.
pub fn start(id: u32, port: u16, conn: &Arc<Conn>) {
    let c = conn.clone();
    let spawned = crate::spawn_thread(move || {
        let sock = match dial(port) {
            Ok(s) => s,
            Err(e) => return c.respond_err(id, e),
        };
        let _ = sock.set_nodelay(true);
        let (Ok(reader), Ok(writer), Ok(control)) =
            (sock.try_clone(), sock.try_clone(), sock.try_clone())
        else {
            return c.respond_err(id, crate::server::exhausted());
        };
        // Routes exist before the host learns the connection is open.
        let window = Window::new();
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        c.reads_insert(id, window.clone());
        c.uploads_insert(id, tx);
        c.sockets_insert(id, control);
        let left = Arc::new(AtomicUsize::new(2));
        let done = {
            let c = c.clone();
            let left = left.clone();
            move || {
                if left.fetch_sub(1, Ordering::SeqCst) == 1 {
                    c.forget_connection(id);
                }
            }
        };
        c.respond(id, Ok(serde_json::json!({"connected": true, "port": port})));
        let w = {
            let (c, done) = (c.clone(), done.clone());
            move || {
                write_side(id, writer, &rx, &c);
                done();
            }
        };
        if crate::spawn_thread(w).is_err() {
            let _ = sock.shutdown(Shutdown::Both);
            done();
        }
        read_side(id, reader, &window, &c);
        done();
    });
    if spawned.is_err() {
        conn.respond_err(id, crate::server::exhausted());
    }
}

/// Server → host, under the host's credit.
fn read_side(id: u32, mut sock: TcpStream, window: &Window, conn: &Conn) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let Some(credit) = window.take_within(READ_CHUNK as u64, IDLE_LIMIT) else {
            let _ = sock.shutdown(Shutdown::Both);
            return;
        };
        let want = usize::try_from(credit)
            .unwrap_or(READ_CHUNK)
            .min(READ_CHUNK);
        match sock.read(&mut buf[..want]) {
            Ok(0) | Err(_) => {
                let _ = conn.send_body(Kind::Data, id, &[]);
                return;
            }
            Ok(n) => {
                // Unused credit goes back.
                window.grant(credit - n as u64);
                if conn.send_body(Kind::Data, id, &buf[..n]).is_err() {
                    let _ = sock.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }
}

/// Host → server; credit back to the host as chunks reach the socket.
fn write_side(id: u32, mut sock: TcpStream, rx: &mpsc::Receiver<Vec<u8>>, conn: &Conn) {
    loop {
        match rx.recv_timeout(IDLE_LIMIT) {
            Ok(d) if d.is_empty() => {
                let _ = sock.shutdown(Shutdown::Write);
                return;
            }
            Ok(d) => {
                for chunk in d.chunks(MAX_CHUNK) {
                    if sock.write_all(chunk).is_err() {
                        let _ = sock.shutdown(Shutdown::Both);
                        return;
                    }
                }
                let w = WindowMsg {
                    bytes: d.len() as u64,
                };
                let _ = conn.send(&Frame::json(Kind::Window, id, &w));
            }
            Err(_) => {
                // The host went away (or aborted): nothing more to write.
                let _ = sock.shutdown(Shutdown::Write);
                return;
            }
        }
    }
}
