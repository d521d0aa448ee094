//! The egress proxy: where a sandbox with domain rules has its TCP
//! connections to denied addresses redirected (see the module above).
//!
//! For each connection it finds the sandbox by source address, reads the
//! first bytes until the TLS SNI or HTTP `Host` name is known
//! ([`super::sniff`], 10 s and 16 KiB at most), and refuses unless an
//! allowed domain matches. It then resolves the name itself (the sandbox's
//! resolvers, or the host's), keeps only addresses the operator and the
//! tenant permit, connects from the bridge's address to the port the
//! sandbox asked for, replays the bytes read and relays both ways. The
//! address the sandbox chose is never dialed: a domain rule means the
//! domain, whatever the sandbox resolved or wrote in `Host`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stacyvm_api::EgressDenial;
use stacyvm_core::egress::EgressRules;
use stacyvm_core::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use super::sniff::{sniff, Sniff};
use super::{Operator, Port};

/// Connections one sandbox may have open through the proxy at once (each
/// holds a task and up to 16 KiB while it is read): more are refused.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections through one provider's proxy at once, all sandboxes
/// together (each holds two descriptors once relayed).
pub const MAX_TOTAL_CONNECTIONS: usize = 4096;
/// A name the host's resolver does not answer within this is refused.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A relayed connection with no byte either way for this long is closed
/// (a sandbox cannot hold its share of the proxy's connections with idle
/// ones; protocols with keepalives are unaffected).
pub const RELAY_IDLE: Duration = Duration::from_secs(15 * 60);
/// Denial records kept per sandbox.
const MAX_RECORDS: usize = 256;

/// (Host/SNI name, port, reason) → (count, last time).
type DenialLog = HashMap<(String, u16, &'static str), (u64, chrono::DateTime<chrono::Utc>)>;
/// (bridge address, sandbox address) → its rules.
type Served = Arc<Mutex<HashMap<(Ipv4Addr, Ipv4Addr), Arc<Sandbox>>>>;

#[derive(Debug)]
struct Sandbox {
    rules: EgressRules,
    op: Operator,
    dns: Vec<Ipv4Addr>,
    gateway: Ipv4Addr,
    denials: Mutex<DenialLog>,
    open: Arc<tokio::sync::Semaphore>,
}

impl Sandbox {
    fn deny(&self, src: Ipv4Addr, host: &str, port: u16, reason: &'static str) {
        let mut d = self.denials.lock().unwrap_or_else(|p| p.into_inner());
        if d.len() >= MAX_RECORDS && !d.contains_key(&(host.to_string(), port, reason)) {
            if let Some(oldest) = d
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                d.remove(&oldest);
            }
        }
        let e = d
            .entry((host.to_string(), port, reason))
            .or_insert((0, chrono::Utc::now()));
        e.0 += 1;
        e.1 = chrono::Utc::now();
        // The first of a kind and then every hundredth: a loop cannot
        // flood the log.
        if e.0 == 1 || e.0.is_multiple_of(100) {
            info!(sandbox_ip = %src, host, port, reason, count = e.0, "egress denied");
        }
    }
}

/// Listeners (one per bridge address) and the sandboxes they serve.
#[derive(Debug)]
pub struct Proxy {
    listeners: tokio::sync::Mutex<HashMap<Ipv4Addr, (u16, tokio::task::JoinHandle<()>)>>,
    sandboxes: Served,
    total: Arc<tokio::sync::Semaphore>,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy {
            listeners: tokio::sync::Mutex::default(),
            sandboxes: Served::default(),
            total: Arc::new(tokio::sync::Semaphore::new(MAX_TOTAL_CONNECTIONS)),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for (_, (_, task)) in self.listeners.get_mut().drain() {
            task.abort();
        }
    }
}

impl Proxy {
    /// The proxy's port on `gateway`, listening from the first call.
    pub async fn listen(&self, gateway: Ipv4Addr) -> Result<u16> {
        let mut l = self.listeners.lock().await;
        if let Some((port, task)) = l.get(&gateway) {
            if !task.is_finished() {
                return Ok(*port);
            }
        }
        let listener = TcpListener::bind(SocketAddr::from((gateway, 0)))
            .await
            .map_err(|e| Error::internal(format!("egress proxy on {gateway}")).with_source(e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::internal("egress proxy address").with_source(e))?
            .port();
        let sandboxes = self.sandboxes.clone();
        let total = self.total.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let SocketAddr::V4(peer) = peer else { continue };
                let sb = sandboxes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&(gateway, *peer.ip()))
                    .cloned();
                match sb {
                    Some(sb) => match (
                        sb.open.clone().try_acquire_owned(),
                        total.clone().try_acquire_owned(),
                    ) {
                        (Ok(permit), Ok(all)) => {
                            tokio::spawn(async move {
                                serve(conn, *peer.ip(), sb).await;
                                drop((permit, all));
                            });
                        }
                        _ => sb.deny(*peer.ip(), "", 0, "too_many_connections"),
                    },
                    None => debug!(peer = %peer, "egress proxy: not a sandbox with domain rules"),
                }
            }
        });
        l.insert(gateway, (port, task));
        info!(%gateway, port, "egress proxy listening");
        Ok(port)
    }

    pub fn register(&self, port: &Port, rules: EgressRules, op: Operator, dns: Vec<Ipv4Addr>) {
        let mut map = self.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
        let key = (port.gateway, port.ip);
        // A runtime change keeps the denials seen so far.
        let denials = map
            .get(&key)
            .map(|old| {
                old.denials
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            })
            .unwrap_or_default();
        // And the count of open connections.
        let open = map.get(&key).map_or_else(
            || Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            |old| old.open.clone(),
        );
        map.insert(
            key,
            Arc::new(Sandbox {
                rules,
                op,
                dns,
                gateway: port.gateway,
                denials: Mutex::new(denials),
                open,
            }),
        );
    }

    pub fn forget(&self, port: &Port) {
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(port.gateway, port.ip));
    }

    pub fn denials(&self, port: &Port) -> Vec<EgressDenial> {
        let map = self.sandboxes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sb) = map.get(&(port.gateway, port.ip)) else {
            return Vec::new();
        };
        let d = sb.denials.lock().unwrap_or_else(|p| p.into_inner());
        d.iter()
            .map(|((host, p, reason), (count, at))| EgressDenial {
                address: String::new(),
                host: host.clone(),
                port: *p,
                protocol: "tcp".into(),
                reason: (*reason).into(),
                count: *count,
                last_at: Some(*at),
            })
            .collect()
    }
}

/// The destination the sandbox dialed before the redirect.
fn original_dst(conn: &TcpStream) -> Option<SocketAddrV4> {
    let sin = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::OriginalDst).ok()?;
    Some(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ))
}

async fn serve(mut conn: TcpStream, src: Ipv4Addr, sb: Arc<Sandbox>) {
    let Some(dst) = original_dst(&conn) else {
        return;
    };
    let port = dst.port();
    let mut buf = Vec::with_capacity(2048);
    let sniffed = tokio::time::timeout(SNIFF_TIMEOUT, async {
        let mut chunk = [0u8; 4096];
        loop {
            match sniff(&buf) {
                Sniff::More => {}
                done => return done,
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return Sniff::Nameless,
                // Bounded: sniff decides by MAX_SNIFF (+ a TLS header).
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .unwrap_or(Sniff::Nameless);
    let host = match sniffed {
        Sniff::Name(h) => h,
        _ => {
            sb.deny(src, "", port, "no_name");
            return;
        }
    };
    if !sb.rules.allows_name(&host) {
        sb.deny(src, &host, port, "domain");
        return;
    }
    // The sandbox's resolvers, those the operator lets it reach (or the
    // host's own); none left: the host's resolver. The name is absolute
    // (a trailing dot), so no search domain is appended to it.
    let servers: Vec<Ipv4Addr> = sb
        .dns
        .iter()
        .copied()
        .filter(|ip| (sb.op.permits(*ip) || sb.op.resolvers.contains(ip)) && sb.rules.may_dial(*ip))
        .collect();
    let resolved = if servers.is_empty() {
        let absolute = format!("{host}.");
        let looked = tokio::time::timeout(
            RESOLVE_TIMEOUT,
            tokio::net::lookup_host((absolute.as_str(), port)),
        )
        .await;
        match looked {
            Ok(r) => r.map(|it| {
                it.filter_map(|a| match a {
                    SocketAddr::V4(a) => Some(*a.ip()),
                    SocketAddr::V6(_) => None,
                })
                .collect::<Vec<_>>()
            }),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "resolver timed out",
            )),
        }
    } else {
        super::dns::resolve(&host, &servers, sb.gateway).await
    };
    let addrs = match resolved {
        Ok(a) if !a.is_empty() => a,
        _ => {
            sb.deny(src, &host, port, "resolve_failed");
            return;
        }
    };
    let permitted: Vec<Ipv4Addr> = addrs
        .into_iter()
        .filter(|ip| sb.op.permits(*ip) && sb.rules.may_dial(*ip))
        .collect();
    if permitted.is_empty() {
        sb.deny(src, &host, port, "resolved_blocked");
        return;
    }
    let mut upstream = None;
    for ip in permitted {
        let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
            return;
        };
        if sock.bind(SocketAddr::from((sb.gateway, 0))).is_err() {
            return;
        }
        if let Ok(Ok(s)) =
            tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(SocketAddr::from((ip, port)))).await
        {
            upstream = Some(s);
            break;
        }
    }
    let Some(mut upstream) = upstream else {
        debug!(host, port, "egress proxy: no resolved address answered");
        return;
    };
    let _ = upstream.set_nodelay(true);
    let _ = conn.set_nodelay(true);
    if upstream.write_all(&buf).await.is_err() {
        return;
    }
    relay(conn, upstream, RELAY_IDLE).await;
}

/// A stream that notes when it last read anything.
struct Active<S> {
    inner: S,
    last: Arc<std::sync::atomic::AtomicU64>,
    start: std::time::Instant,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Active<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last.store(ms, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Active<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies both ways until both ends are done, or until nothing has moved
/// either way for `idle`.
async fn relay(a: TcpStream, b: TcpStream, idle: Duration) {
    let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = std::time::Instant::now();
    let mut a = Active {
        inner: a,
        last: last.clone(),
        start,
    };
    let mut b = Active {
        inner: b,
        last: last.clone(),
        start,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let tick = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = &mut copy => return,
            () = tokio::time::sleep(tick) => {
                let now = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
                let quiet = now.saturating_sub(last.load(std::sync::atomic::Ordering::Relaxed));
                if Duration::from_millis(quiet) >= idle {
                    debug!("egress proxy: an idle relayed connection closed");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    #[tokio::test]
    async fn relays_close_when_idle_and_live_ones_carry_on() {
        let (mut client, proxy_in) = pair().await;
        let (proxy_out, mut server) = pair().await;
        let idle = Duration::from_millis(1000);
        let relay = tokio::spawn(relay(proxy_in, proxy_out, idle));
        // Traffic every 100 ms keeps it open past the idle limit.
        for _ in 0..6 {
            client.write_all(b"ping").await.expect("write");
            let mut got = [0u8; 4];
            server.read_exact(&mut got).await.expect("read");
            assert_eq!(&got, b"ping");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!relay.is_finished(), "a live relay stays");
        // Then nothing: it closes, and both ends see it.
        tokio::time::timeout(Duration::from_secs(3), relay)
            .await
            .expect("the idle relay ended")
            .expect("join");
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), server.read_to_end(&mut rest))
            .await
            .expect("the server sees the end")
            .expect("read");
        assert_eq!(n, 0);
    }
}
