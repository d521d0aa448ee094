//! Hostile connections against the real binary: slowloris clients that
//! never finish their headers are closed after `server.header_read_timeout`
//! while others are served; past `server.max_connections` new connections
//! are closed at once, and the server serves again when they go.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn addr(server: &common::Server) -> String {
    server
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/api/v1")
        .to_string()
}

/// A connection that sends the start of a request and then stalls.
fn slow(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .expect("partial request");
    s
}

/// Whether the server closed `s` within `within` (EOF, a reset, or an
/// error response followed by EOF).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. a 408 before the close
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn healthy(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out.starts_with(b"HTTP/1.1 200")
}

#[test]
fn slowloris_connections_are_closed_and_others_served() {
    let dir = tempfile::tempdir().expect("dir");
    let server = common::Server::start(dir.path(), &[("STACYVM_SERVER_HEADER_READ_TIMEOUT", "1s")]);
    let a = addr(&server);
    let mut stalled: Vec<TcpStream> = (0..30).map(|_| slow(&a)).collect();
    assert!(healthy(&a), "a normal request waits behind slow ones");
    let started = Instant::now();
    for (i, s) in stalled.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "stalled connection {i} still open after {:?}",
            started.elapsed()
        );
    }
    assert!(healthy(&a));
}

#[test]
fn connections_past_the_cap_are_closed_until_some_go() {
    let dir = tempfile::tempdir().expect("dir");
    let server = common::Server::start(dir.path(), &[("STACYVM_SERVER_MAX_CONNECTIONS", "10")]);
    let a = addr(&server);
    // The start-up probe's connection must be gone before counting.
    std::thread::sleep(Duration::from_secs(1));
    let held: Vec<TcpStream> = (0..10).map(|_| slow(&a)).collect();
    // Give the server a moment to count them.
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(&a).expect("connect");
    assert!(
        closed_within(&mut extra, Duration::from_secs(5)),
        "a connection past the cap stayed open"
    );
    assert!(!healthy(&a), "served past the cap");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !healthy(&a) {
        assert!(
            Instant::now() < deadline,
            "not serving after the held connections went"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
