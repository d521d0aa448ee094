//! `preview`: the preview proxy against direct access to the same port.
//!
//! One sandbox on a bridged network runs a small keep-alive HTTP/1.1
//! server (Python's threading server). The floor is a client on this host
//! talking to the sandbox's own address over the bridge; the measured path
//! is the same request through `stacyvm serve`'s preview proxy
//! (`{port}-{id}.localhost`). Latency: sequential small GETs on one
//! keep-alive connection each, alternating blocks of 100 between the two
//! paths so drift hits both. Throughput: 64 MiB downloads, eleven each,
//! alternating, compared by their medians.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use serde_json::{json, Value};
use tokio::net::TcpStream;

use super::{hyper_util_io, Args, Conn, Outcome};

const PORT: u16 = 8080;
const BIG_MIB: u64 = 64;
const BIG_ROUNDS: usize = 11;

const SERVER: &str = r#"
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
CHUNK = bytes(range(256)) * 1024
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *a):
        pass
    def do_GET(self):
        if self.path.startswith("/big/"):
            n = int(self.path.split("/")[2]) * 1024 * 1024
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n > 0:
                k = min(n, len(CHUNK))
                self.wfile.write(CHUNK[:k])
                n -= k
            return
        body = b"hello preview"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// A keep-alive connection to `addr` sending `Host: host`.
struct Client {
    tx: SendRequest<Full<Bytes>>,
    host: String,
}

impl Client {
    async fn open(addr: &str, host: &str) -> Result<Client> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util_io::TokioIo(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client {
            tx,
            host: host.to_string(),
        })
    }

    /// GETs `path`; the bytes received.
    async fn get(&mut self, path: &str) -> Result<u64> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("host", &self.host)
            .body(Full::new(Bytes::new()))?;
        self.tx.ready().await?;
        let resp = self.tx.send_request(req).await?;
        if !resp.status().is_success() {
            bail!("GET {path} -> {}", resp.status());
        }
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(d) = frame?.into_data() {
                n += d.len() as u64;
            }
        }
        Ok(n)
    }
}

async fn exec(c: &mut Conn, id: &str, command: &str) -> Result<String> {
    let b = c
        .ok(
            Method::POST,
            &format!("/sandboxes/{id}/exec"),
            Some(json!({ "command": command })),
        )
        .await?;
    let v: Value = serde_json::from_slice(&b)?;
    if v["exit_code"] != 0 {
        bail!("{command}: {v}");
    }
    Ok(v["stdout"].as_str().unwrap_or_default().to_string())
}

/// Runs the comparison; rows for the table, then the throughput line.
pub async fn run(args: &Args) -> Result<Vec<Outcome>> {
    let mut c = Conn::open(args).await?;
    let mut body = json!({"ttl": "30m", "network_mode": "bridge"});
    if !args.provider.is_empty() {
        body["provider"] = json!(args.provider);
    }
    if !args.image.is_empty() {
        body["image"] = json!(args.image);
    }
    let v: Value = serde_json::from_slice(&c.ok(Method::POST, "/sandboxes", Some(body)).await?)?;
    let id = v["id"]
        .as_str()
        .ok_or_else(|| anyhow!("spawn returned no id"))?
        .to_string();
    let res = measure(args, &mut c, &id).await;
    let _ = c
        .ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;
    res
}

async fn measure(args: &Args, c: &mut Conn, id: &str) -> Result<Vec<Outcome>> {
    c.ok(
        Method::POST,
        &format!("/sandboxes/{id}/files"),
        Some(json!({"path": "/workspace/srv.py", "content": SERVER})),
    )
    .await?;
    exec(
        c,
        id,
        &format!("setsid python3 /workspace/srv.py {PORT} >/workspace/srv.log 2>&1 </dev/null &"),
    )
    .await?;
    let ip = exec(
        c,
        id,
        "ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -n1",
    )
    .await?
    .trim()
    .to_string();
    if ip.is_empty() {
        bail!("the sandbox has no bridged address (is network_mode bridge available?)");
    }
    c.ok(
        Method::POST,
        &format!("/sandboxes/{id}/ports/{PORT}"),
        Some(json!({"mode": "public"})),
    )
    .await?;
    let direct_addr = format!("{ip}:{PORT}");
    let proxy_host = format!("{PORT}-{id}.localhost");
    // Wait for the server (direct) and the exposure (proxy).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut direct, mut proxy) = loop {
        let d = Client::open(&direct_addr, &direct_addr).await;
        let p = Client::open(&args.addr, &proxy_host).await;
        if let (Ok(mut d), Ok(mut p)) = (d, p) {
            if d.get("/").await.is_ok() && p.get("/").await.is_ok() {
                break (d, p);
            }
        }
        if Instant::now() > deadline {
            bail!("the sandbox's server did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let n = args.requests.clamp(200, 20_000);
    let (mut lat_d, mut lat_p) = (Vec::with_capacity(n), Vec::with_capacity(n));
    // Warm both paths, then alternate blocks.
    for _ in 0..100 {
        direct.get("/").await?;
        proxy.get("/").await?;
    }
    let mut done = 0;
    while done < n {
        let block = (n - done).min(100);
        for _ in 0..block {
            let t = Instant::now();
            direct.get("/").await?;
            lat_d.push(t.elapsed());
        }
        for _ in 0..block {
            let t = Instant::now();
            proxy.get("/").await?;
            lat_p.push(t.elapsed());
        }
        done += block;
    }
    let (mut big_d, mut big_p) = (Vec::new(), Vec::new());
    let path = format!("/big/{BIG_MIB}");
    for _ in 0..BIG_ROUNDS {
        let t = Instant::now();
        let got = direct.get(&path).await?;
        big_d.push(t.elapsed());
        let t = Instant::now();
        let got_p = proxy.get(&path).await?;
        big_p.push(t.elapsed());
        if got != BIG_MIB << 20 || got_p != got {
            bail!("short download: direct {got}, proxy {got_p} bytes");
        }
    }
    // The median of alternating rounds: single downloads on this VM vary
    // by 2x from one to the next, for both paths.
    let rate = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        BIG_MIB as f64 / v[v.len() / 2].as_secs_f64()
    };
    let (rd, rp) = (rate(&big_d), rate(&big_p));
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (md, mp) = (med(&mut lat_d.clone()), med(&mut lat_p.clone()));
    println!(
        "preview: p50 direct {:.3} ms, proxy {:.3} ms ({:.2}x); {BIG_MIB} MiB download median of {BIG_ROUNDS}: direct {rd:.0} MiB/s, proxy {rp:.0} MiB/s ({:.0}%)",
        md.as_secs_f64() * 1000.0,
        mp.as_secs_f64() * 1000.0,
        mp.as_secs_f64() / md.as_secs_f64(),
        100.0 * rp / rd,
    );
    Ok(vec![
        Outcome::sequential("pv_direct", lat_d),
        Outcome::sequential("pv_proxy", lat_p),
        Outcome::sequential("pv_64m_dir", big_d),
        Outcome::sequential("pv_64m_prx", big_p),
    ])
}
