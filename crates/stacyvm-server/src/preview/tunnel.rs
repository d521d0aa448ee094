//! Connection tunnels for public previews.
//!
//! The per-request proxy (`super::proxy`) parses every request and
//! response and hands each between hyper's server and client tasks,
//! which costs more than the app itself needs. For the common case — a
//! **public** port reached by the Host form on a plain-HTTP listener —
//! nothing per request needs the server: no credential to check, no
//! prefix to strip. So the first request of such a connection is read
//! here (peeked, so anything else still goes to hyper untouched),
//! admitted, sent upstream with the `X-Forwarded-*` headers, and from
//! then on one task copies the connection's bytes both ways until either
//! side closes.
//!
//! What the tunnel keeps of the proxy's promises:
//!
//! - **Access**: every second the tunnel asks again whether the port is
//!   still public and the sandbox running; unexposing the port, switching
//!   it to token mode, pausing or destroying the sandbox closes open
//!   tunnels within that second (as the 2 s exposure cache does for
//!   requests).
//! - **Credentials**: a first request that carries a preview token
//!   (header, cookie or query) goes to the per-request proxy, which
//!   removes it; so do requests with a body, the path form, E2B's envd
//!   port, heads that are not complete in the first segment, and
//!   pipelined requests.
//! - **Idle timeouts**: traffic is activity (checked each second), an
//!   upgraded connection (WebSocket) holds the sandbox busy while open.
//! - **Limits**: a tunnel is a connection of the server
//!   (`server.max_connections`).
//!
//! `preview.tunnel: false` sends every request through the per-request
//! proxy.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use stacyvm_core::provider::PortStream;
use stacyvm_core::services::previews::Admit;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::{host_target, Target, TOKEN_COOKIE, TOKEN_HEADER, TOKEN_QUERY};
use crate::AppState;

/// Longest request head the tunnel looks at; bigger ones go to hyper.
const MAX_HEAD: usize = 16 * 1024;
/// How often an open tunnel re-checks its admission and reports traffic.
const RECHECK: Duration = Duration::from_secs(1);

/// What became of a new connection.
pub enum Offer {
    /// The tunnel took it (and has closed it by now).
    Taken,
    /// Not a tunnel: serve it as HTTP, nothing of it read.
    Http(TcpStream),
}

/// The first request of a connection, when the tunnel may carry it.
#[derive(Debug, PartialEq)]
struct Head {
    target: Target,
    /// The request head to send upstream (forwarding headers set).
    upstream: Vec<u8>,
    /// Bytes of the client's head (read from the socket once taken).
    len: usize,
    upgrade: bool,
}

/// Serves `tcp` as a tunnel when its first request is for a public port
/// by the Host form; otherwise hands it back untouched.
pub async fn offer(st: &AppState, tcp: TcpStream, peer: SocketAddr, wait: Duration) -> Offer {
    let mut buf = vec![0u8; MAX_HEAD];
    let peeked = if wait.is_zero() {
        tcp.peek(&mut buf).await
    } else {
        match tokio::time::timeout(wait, tcp.peek(&mut buf)).await {
            Ok(r) => r,
            // Nothing sent within the header timeout: what hyper would do.
            Err(_) => return Offer::Taken,
        }
    };
    let n = match peeked {
        Ok(0) | Err(_) => return Offer::Taken,
        Ok(n) => n,
    };
    let envd = (!st.cfg.server.e2b_domain.is_empty()).then_some(st.cfg.server.e2b_domain.as_str());
    let Some(head) = parse(
        &buf[..n],
        &st.previews.domains,
        envd,
        &peer,
        &st.cfg.preview.scheme,
    ) else {
        return Offer::Http(tcp);
    };
    let started = Instant::now();
    let id = head.target.id.clone();
    let port = head.target.port;
    if !matches!(
        st.manager.previews().admit(&id, port, None).await,
        Ok(Admit::Open)
    ) {
        return Offer::Http(tcp);
    }
    // Refusals (a dead port, a paused sandbox that will not wake) are
    // the per-request proxy's to answer, with its status codes.
    let Ok(mut upstream) = st.manager.connect_port(&id, port).await else {
        return Offer::Http(tcp);
    };
    let mut tcp = tcp;
    let mut taken = vec![0u8; head.len];
    if tcp.read_exact(&mut taken).await.is_err()
        || upstream.write_all(&head.upstream).await.is_err()
    {
        return Offer::Taken;
    }
    st.manager
        .metrics()
        .observe("preview_tunnel", "", started.elapsed(), None);
    st.manager.preview_activity(&id);
    let busy = if head.upgrade {
        st.manager.preview_busy(&id)
    } else {
        None
    };
    let moved = Arc::new(AtomicU64::new(0));
    let relay = relay(tcp, upstream, moved.clone());
    tokio::pin!(relay);
    let mut tick = tokio::time::interval(RECHECK);
    tick.tick().await;
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = &mut relay => break,
            _ = tick.tick() => {
                if !still_open(st, &id, port).await {
                    tracing::debug!(sandbox_id = %id, port, "preview tunnel closed: the port is no longer public or the sandbox not running");
                    break;
                }
                let now = moved.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    st.manager.preview_activity(&id);
                }
            }
        }
    }
    drop(busy);
    Offer::Taken
}

/// Whether an open tunnel may stay: the port is still public and the
/// sandbox running (a paused sandbox is woken by the next request, which
/// the per-request path does).
async fn still_open(st: &AppState, id: &str, port: u16) -> bool {
    if !matches!(
        st.manager.previews().admit(id, port, None).await,
        Ok(Admit::Open)
    ) {
        return false;
    }
    use stacyvm_api::types::state;
    matches!(st.manager.live_record(id).await,
        Ok(r) if ![state::PAUSED, state::STOPPED, state::EXPIRED, state::DESTROYED, state::ERROR]
            .contains(&r.state.as_str()))
}

/// Reads the head in `bytes` and decides whether the tunnel may carry
/// its connection: one complete request, alone in the segment, with no
/// body and no credential, for a host-form preview.
fn parse(
    bytes: &[u8],
    domains: &[String],
    envd_domain: Option<&str>,
    peer: &SocketAddr,
    scheme: &str,
) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 96];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    // Pipelined data after the head: the per-request path keeps order.
    if len != bytes.len() {
        return None;
    }
    let (method, path, version) = (req.method?, req.path?, req.version?);
    let mut host = None;
    let mut upgrade = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return None;
            }
            host = Some(std::str::from_utf8(h.value).ok()?);
        } else if name.eq_ignore_ascii_case("content-length") {
            if std::str::from_utf8(h.value).ok()?.trim() != "0" {
                return None;
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case(TOKEN_HEADER)
        {
            return None;
        } else if name.eq_ignore_ascii_case("cookie") {
            let v = std::str::from_utf8(h.value).ok()?;
            if v.split(';')
                .any(|c| c.trim_start().starts_with(&format!("{TOKEN_COOKIE}=")))
            {
                return None;
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    if !path.starts_with('/') {
        return None;
    }
    if let Some((_, q)) = path.split_once('?') {
        if q.split('&')
            .any(|kv| kv.split('=').next() == Some(TOKEN_QUERY))
        {
            return None;
        }
    }
    let host = host?;
    let target = host_target(host, domains)?;
    if target.port == 49983
        && envd_domain.is_some_and(|d| host_target(host, &[d.to_string()]).is_some())
    {
        return None;
    }
    let mut up = Vec::with_capacity(len + 128);
    up.extend_from_slice(method.as_bytes());
    up.push(b' ');
    up.extend_from_slice(path.as_bytes());
    up.extend_from_slice(if version == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    for h in req.headers.iter() {
        let n = h.name;
        if [
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-forwarded-prefix",
        ]
        .iter()
        .any(|f| n.eq_ignore_ascii_case(f))
        {
            continue;
        }
        up.extend_from_slice(n.as_bytes());
        up.extend_from_slice(b": ");
        up.extend_from_slice(h.value);
        up.extend_from_slice(b"\r\n");
    }
    up.extend_from_slice(format!("x-forwarded-for: {}\r\n", peer.ip()).as_bytes());
    up.extend_from_slice(b"x-forwarded-host: ");
    up.extend_from_slice(host.as_bytes());
    up.extend_from_slice(b"\r\nx-forwarded-proto: ");
    up.extend_from_slice(scheme.as_bytes());
    up.extend_from_slice(b"\r\n\r\n");
    Some(Head {
        target,
        upstream: up,
        len,
        upgrade,
    })
}

/// Moves bytes both ways until both directions have ended or one fails;
/// counts them in `moved`. Dropping the future ends the tunnel.
///
/// One task copies both directions through 256 KiB buffers. Measured
/// against the alternatives on the bench (docs/benchmarks.md): splice(2)
/// through a pipe, from this task or from a blocking thread per
/// direction, was slower both in latency and in throughput here (zero-copy
/// keeps the upstream socket's receive memory pinned until the client has
/// read it, which shrinks the window the app may send into); so were
/// threads copying.
async fn relay(client: TcpStream, mut upstream: PortStream, moved: Arc<AtomicU64>) {
    let mut client = Counted {
        inner: client,
        moved,
    };
    let _ = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        RELAY_BUFFER,
        RELAY_BUFFER,
    )
    .await;
}

/// Bytes per read of the relay, each way.
const RELAY_BUFFER: usize = 256 * 1024;

/// A stream that counts the bytes read from and written to it.
struct Counted<T> {
    inner: T,
    moved: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.moved.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "192.0.2.7:5555".parse().expect("test")
    }
    fn doms() -> Vec<String> {
        vec!["localhost".into()]
    }
    const ID: &str = "sb-01234abc";

    fn get(extra: &str) -> Vec<u8> {
        format!("GET /x?a=1 HTTP/1.1\r\nHost: 8080-{ID}.LocalHost:7400\r\n{extra}\r\n").into_bytes()
    }

    #[test]
    fn a_plain_get_for_a_host_form_preview_is_carried_with_forwarding_headers() {
        let bytes = get("Connection: keep-alive\r\nX-Forwarded-For: 6.6.6.6\r\n");
        let h = parse(&bytes, &doms(), None, &peer(), "http").expect("carried");
        assert_eq!(h.target.id, ID);
        assert_eq!(h.target.port, 8080);
        assert_eq!(h.len, bytes.len());
        assert!(!h.upgrade);
        let up = String::from_utf8(h.upstream).expect("test");
        assert!(up.starts_with("GET /x?a=1 HTTP/1.1\r\n"), "{up}");
        assert!(up.contains("Connection: keep-alive\r\n"), "{up}");
        assert!(up.contains("x-forwarded-for: 192.0.2.7\r\n"), "{up}");
        assert!(
            !up.contains("6.6.6.6"),
            "the client's own X-Forwarded-For is replaced: {up}"
        );
        assert!(
            up.contains(&format!("x-forwarded-host: 8080-{ID}.LocalHost:7400\r\n")),
            "{up}"
        );
        assert!(up.contains("x-forwarded-proto: http\r\n"), "{up}");
        assert!(up.ends_with("\r\n\r\n"), "{up}");
        let mut hs = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut hs);
        assert_eq!(
            req.parse(up.as_bytes()).expect("test"),
            httparse::Status::Complete(up.len())
        );
    }

    #[test]
    fn a_websocket_upgrade_is_carried_and_marked() {
        let bytes = get("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\n");
        let h = parse(&bytes, &doms(), None, &peer(), "http").expect("carried");
        assert!(h.upgrade);
        assert!(String::from_utf8(h.upstream)
            .expect("test")
            .contains("Upgrade: websocket\r\n"));
    }

    #[test]
    fn credentials_bodies_and_other_targets_go_to_the_per_request_proxy() {
        let refused: Vec<Vec<u8>> = vec![
            get("X-StacyVM-Preview-Token: svp_x\r\n"),
            get("Cookie: a=1; stacyvm_preview_token=svp_x\r\n"),
            format!("GET /?stacyvm_token=svp_x HTTP/1.1\r\nHost: 8080-{ID}.localhost\r\n\r\n")
                .into_bytes(),
            format!("GET /?b=2&stacyvm_token HTTP/1.1\r\nHost: 8080-{ID}.localhost\r\n\r\n")
                .into_bytes(),
            get("Content-Length: 5\r\n"),
            get("Transfer-Encoding: chunked\r\n"),
            get("Expect: 100-continue\r\n"),
            // the path form, the API, no host, two hosts
            format!("GET /preview/{ID}/8080/ HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes(),
            b"GET /api/v1/sandboxes HTTP/1.1\r\nHost: localhost:7400\r\n\r\n".to_vec(),
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            get(&format!("Host: 9090-{ID}.localhost\r\n")),
            // incomplete, pipelined, not HTTP/1, absolute form
            format!("GET / HTTP/1.1\r\nHost: 8080-{ID}.localhost\r\n").into_bytes(),
            [get(""), get("")].concat(),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            format!("GET http://x/ HTTP/1.1\r\nHost: 8080-{ID}.localhost\r\n\r\n").into_bytes(),
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
        ];
        for bytes in refused {
            assert_eq!(
                parse(&bytes, &doms(), None, &peer(), "http"),
                None,
                "{}",
                String::from_utf8_lossy(&bytes)
            );
        }
        // A cookie of another name is fine.
        assert!(parse(
            &get("Cookie: stacyvm_preview_tokenx=1; z=2\r\n"),
            &doms(),
            None,
            &peer(),
            "http"
        )
        .is_some());
        assert!(parse(
            &get("Content-Length: 0\r\n"),
            &doms(),
            None,
            &peer(),
            "http"
        )
        .is_some());
    }

    #[test]
    fn the_e2b_envd_port_under_a_shared_domain_stays_e2b() {
        let bytes = format!("GET / HTTP/1.1\r\nHost: 49983-{ID}.localhost\r\n\r\n").into_bytes();
        assert!(parse(&bytes, &doms(), Some("localhost"), &peer(), "http").is_none());
        assert!(parse(&bytes, &doms(), None, &peer(), "http").is_some());
    }

    /// client <-> [a  relay  b] <-> app, on loopback.
    async fn pair() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        use tokio::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").await.expect("test");
        let addr = l.local_addr().expect("test");
        let (client, a) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (app, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (
            (client.expect("test"), a.expect("test").0),
            (b.expect("test").0, app.expect("test")),
        )
    }

    /// Bytes both ways in order, half-closes passed on, and a dropped
    /// relay closes both sides.
    async fn relays_whole_streams() {
        let ((mut client, a), (b, mut app)) = pair().await;
        let moved = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(relay(a, Box::new(b), moved.clone()));
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("test");
            client.shutdown().await.expect("test");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("test");
            back
        });
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.expect("test");
        assert_eq!(got.len(), big.len());
        assert!(got == big, "bytes arrive in order");
        app.write_all(b"reply after the client's half-close")
            .await
            .expect("test");
        app.shutdown().await.expect("test");
        assert_eq!(
            writer.await.expect("test"),
            b"reply after the client's half-close"
        );
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("test")
            .expect("test");
        assert_eq!(moved.load(Ordering::Relaxed), big.len() as u64 + 35);

        // Closing a tunnel (dropping its relay) ends both connections.
        let ((mut client, a), (b, mut app)) = pair().await;
        let task = tokio::spawn(relay(a, Box::new(b), Arc::new(AtomicU64::new(0))));
        client.write_all(b"ping").await.expect("test");
        let mut four = [0u8; 4];
        app.read_exact(&mut four).await.expect("test");
        task.abort();
        let mut rest = Vec::new();
        let ends = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = client.read_to_end(&mut rest).await;
            let _ = app.read_to_end(&mut rest).await;
        });
        ends.await.expect("both sides see the end");
        assert!(rest.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relay_carries_whole_streams_and_ends_both_sides() {
        relays_whole_streams().await;
    }
}
