//! `stacyvm-bench`: drives a running StacyVM server over HTTP with N
//! concurrent clients and prints latency percentiles and throughput.
//!
//! Each client owns one keep-alive HTTP/1.1 connection (hyper, no pooling
//! layer) so the numbers measure the server, not the client stack.
//! Scenarios: get, list, spawn, create→first exec, exec round trip,
//! file write+read (1 KiB, 1 MiB), destroy. Results print as a table, or
//! Markdown rows for docs/benchmarks.md with `--markdown`.
//!
//! Docker floors (no StacyVM server involved, for the docker provider's
//! targets): `engine_spawn` = raw Engine API create+start of a container
//! with the provider's security settings, `engine_exec` = Engine exec API
//! round trip of `true` (create, attach, drain, inspect for the exit code),
//! `cli_exec` = `docker exec <container> true`. `density` spawns `--ops`
//! sandboxes through the server and reports host memory per sandbox.

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use serde_json::{json, Value};
use tokio::net::TcpStream;

mod archive;
mod build;
mod egress;
mod pause;
mod preview;
mod template;
mod volume;

#[derive(Debug, Parser, Clone)]
#[command(name = "stacyvm-bench", about = "Benchmark a running StacyVM server")]
struct Args {
    /// Server address (host:port, no scheme).
    #[arg(long, default_value = "127.0.0.1:7423")]
    addr: String,
    /// API key sent as X-API-Key.
    #[arg(long, env = "STACYVM_API_KEY")]
    api_key: Option<String>,
    /// Provider to spawn on ("" = server default).
    #[arg(long, default_value = "")]
    provider: String,
    /// Image to spawn.
    #[arg(long, default_value = "")]
    image: String,
    /// Concurrent clients.
    #[arg(long, short = 'c', default_value_t = 8)]
    clients: usize,
    /// Requests per scenario for the cheap scenarios (get, list).
    #[arg(long, default_value_t = 50_000)]
    requests: usize,
    /// Operations per scenario for sandbox-heavy scenarios (spawn, exec, files).
    #[arg(long, default_value_t = 200)]
    ops: usize,
    /// Comma-separated scenarios: get,list,spawn,first_exec,exec,file_1k,file_1m,raw_1m,destroy,
    /// snapshot, fork, fork10 (providers with sandbox snapshots; 1 or 10
    /// children per fork; `--upper-mib`), preview (the preview
    /// proxy against direct access to the sandbox's port; bridged network),
    /// archive (tar throughput against the raw file routes, `--big-mib`),
    /// pause (pause, resume, and the first exec on a paused sandbox),
    /// template (a warm-pool claim against a spawn that runs the template's
    /// setup and a plain spawn), egress (bridged spawns with CIDR and domain
    /// policies against one without, and a runtime policy change), build
    /// (environment builds cold and cached against the same commands run by
    /// hand; `--image` is the base; `docker build` too on `--provider docker`),
    /// volume (dd on a named volume against the sandbox's own disk and,
    /// with `--host-dir`, the host; `--big-mib` per pass).
    #[arg(
        long,
        default_value = "get,list,spawn,first_exec,exec,file_1k,file_1m,destroy"
    )]
    scenarios: String,
    /// Print Markdown table rows.
    #[arg(long)]
    markdown: bool,
    /// Label for the provider column.
    #[arg(long, default_value = "")]
    label: String,
    /// Container runtime of the engine_* scenarios.
    #[arg(long, default_value = "runc")]
    runtime: String,
    /// MiB the source of `snapshot`/`fork`/`fork10` writes before the runs
    /// (its own files, in 1 MiB files).
    #[arg(long, default_value_t = 0)]
    upper_mib: u64,
    /// Size of the `bigfile` transfer in MiB.
    #[arg(long, default_value_t = 2048)]
    big_mib: u64,
    /// Pid of the server, whose resident memory `bigfile` samples.
    #[arg(long)]
    server_pid: Option<u32>,
    /// A host directory on the data disk: the `volume` scenario's floor.
    #[arg(long)]
    host_dir: Option<std::path::PathBuf>,
}

struct Conn {
    tx: SendRequest<Full<Bytes>>,
    host: String,
    key: Option<String>,
}

impl Conn {
    async fn open(args: &Args) -> Result<Conn> {
        let stream = TcpStream::connect(&args.addr)
            .await
            .with_context(|| format!("connecting to {}", args.addr))?;
        stream.set_nodelay(true)?;
        let io = hyper_util_io::TokioIo(stream);
        let (tx, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            tx,
            host: args.addr.clone(),
            key: args.api_key.clone(),
        })
    }

    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes)> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("/api/v1{path}"))
            .header("host", &self.host);
        if let Some(k) = &self.key {
            b = b.header("x-api-key", k);
        }
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        let req = b.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        self.tx.ready().await?;
        let resp = self.tx.send_request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    async fn ok(&mut self, method: Method, path: &str, body: Option<Value>) -> Result<Bytes> {
        let (st, b) = self
            .call(
                method.clone(),
                path,
                body.map(|v| v.to_string().into_bytes()),
            )
            .await?;
        if !(200..300).contains(&st) {
            bail!("{method} {path} -> {st}: {}", String::from_utf8_lossy(&b));
        }
        Ok(b)
    }

    async fn spawn(&mut self, args: &Args) -> Result<String> {
        let mut body = json!({"ttl": "30m"});
        if !args.provider.is_empty() {
            body["provider"] = json!(args.provider);
        }
        if !args.image.is_empty() {
            body["image"] = json!(args.image);
        }
        let b = self.ok(Method::POST, "/sandboxes", Some(body)).await?;
        let v: Value = serde_json::from_slice(&b)?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("spawn returned no id"))
    }
}

/// Adapts tokio's TcpStream to hyper's IO traits.
mod hyper_util_io {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct TokioIo(pub tokio::net::TcpStream);

    impl hyper::rt::Read for TokioIo {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            mut buf: hyper::rt::ReadBufCursor<'_>,
        ) -> Poll<std::io::Result<()>> {
            // Read into an initialised scratch buffer, then copy: no unsafe code.
            let want = buf.remaining().min(64 * 1024);
            let mut scratch = vec![0u8; want];
            let mut rb = tokio::io::ReadBuf::new(&mut scratch);
            match tokio::io::AsyncRead::poll_read(Pin::new(&mut self.get_mut().0), cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    buf.put_slice(rb.filled());
                    Poll::Ready(Ok(()))
                }
                other => other,
            }
        }
    }

    impl hyper::rt::Write for TokioIo {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            tokio::io::AsyncWrite::poll_write(Pin::new(&mut self.get_mut().0), cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            tokio::io::AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().0), cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            tokio::io::AsyncWrite::poll_shutdown(Pin::new(&mut self.get_mut().0), cx)
        }
    }
}

#[derive(Debug)]
struct Outcome {
    name: String,
    latencies: Vec<Duration>,
    wall: Duration,
    errors: usize,
    first_error: Option<String>,
}

impl Outcome {
    /// Sequential measurements without errors: the wall time is their sum.
    fn sequential(name: &str, mut latencies: Vec<Duration>) -> Outcome {
        latencies.sort();
        Outcome {
            name: name.into(),
            wall: latencies.iter().sum(),
            latencies,
            errors: 0,
            first_error: None,
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// Runs `total` operations over `clients` connections; `op` gets the
/// connection and a sequence number and returns the measured latency.
async fn run<F, Fut>(args: &Args, name: &str, total: usize, op: F) -> Result<Outcome>
where
    F: Fn(Conn, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = (Conn, Result<Duration>)> + Send,
{
    let clients = args.clients.max(1).min(total.max(1));
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..clients {
        let mut conn = Conn::open(args).await?;
        let op = op.clone();
        let counter = counter.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut first_error = None;
            loop {
                let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let (c, r) = op(conn, i).await;
                conn = c;
                match r {
                    Ok(d) => lat.push(d),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut errors = 0;
    let mut first_error = None;
    for h in handles {
        let (l, e, f) = h.await?;
        latencies.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let wall = start.elapsed();
    latencies.sort();
    Ok(Outcome {
        name: name.to_string(),
        latencies,
        wall,
        errors,
        first_error,
    })
}

fn timed<T>(start: Instant, r: Result<T>) -> Result<Duration> {
    r.map(|_| start.elapsed())
}

async fn scenario(args: &Args, name: &str) -> Result<Outcome> {
    let a = args.clone();
    match name {
        "get" | "list" => {
            let mut c = Conn::open(args).await?;
            let id = c.spawn(args).await?;
            let path = if name == "get" {
                format!("/sandboxes/{id}")
            } else {
                "/sandboxes".to_string()
            };
            let out = run(args, name, args.requests, move |mut c, _| {
                let path = path.clone();
                async move {
                    let t = Instant::now();
                    let r = c.ok(Method::GET, &path, None).await;
                    (c, timed(t, r))
                }
            })
            .await;
            c.ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
                .await?;
            out
        }
        "spawn" | "destroy" | "first_exec" => {
            let owned = name.to_string();
            let out = run(args, name, args.ops, move |mut c, _| {
                let a = a.clone();
                let name = owned.clone();
                async move {
                    let r = async {
                        let t = Instant::now();
                        let id = c.spawn(&a).await?;
                        let mut d = t.elapsed();
                        if name == "first_exec" {
                            c.ok(
                                Method::POST,
                                &format!("/sandboxes/{id}/exec"),
                                Some(json!({"command": "true", "mode": "argv"})),
                            )
                            .await?;
                            d = t.elapsed();
                        }
                        let t2 = Instant::now();
                        c.ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
                            .await?;
                        if name == "destroy" {
                            d = t2.elapsed();
                        }
                        Ok(d)
                    }
                    .await;
                    (c, r)
                }
            })
            .await;
            out
        }
        "exec" | "file_1k" | "file_1m" | "raw_1m" => {
            let mut c = Conn::open(args).await?;
            let id = c.spawn(args).await?;
            let size = match name {
                "file_1k" => 1024,
                "file_1m" | "raw_1m" => 1024 * 1024,
                _ => 0,
            };
            let raw = name == "raw_1m";
            let content: String = (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            let id2 = id.clone();
            let out = run(args, name, args.ops, move |mut c, i| {
                let id = id2.clone();
                let content = content.clone();
                async move {
                    let t = Instant::now();
                    let r = async {
                        if size == 0 {
                            c.ok(
                                Method::POST,
                                &format!("/sandboxes/{id}/exec"),
                                Some(json!({"command": "true", "mode": "argv"})),
                            )
                            .await?;
                        } else {
                            let path = format!("/workspace/bench-{i}.txt");
                            if raw {
                                let url = format!("/sandboxes/{id}/files?path={path}");
                                let (st, b) = c
                                    .call(Method::PUT, &url, Some(content.clone().into_bytes()))
                                    .await?;
                                if st != 200 {
                                    bail!("PUT file -> {st}: {}", String::from_utf8_lossy(&b));
                                }
                            } else {
                                c.ok(
                                    Method::POST,
                                    &format!("/sandboxes/{id}/files"),
                                    Some(json!({"path": path, "content": content})),
                                )
                                .await?;
                            }
                            let back = c
                                .ok(
                                    Method::GET,
                                    &format!("/sandboxes/{id}/files?path={path}"),
                                    None,
                                )
                                .await?;
                            if back.len() != size {
                                bail!("read {} bytes, wrote {size}", back.len());
                            }
                        }
                        Ok(())
                    }
                    .await;
                    (c, timed(t, r))
                }
            })
            .await;
            c.ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
                .await?;
            out
        }
        "snapshot" | "fork" | "fork10" => {
            // One source sandbox (with `--upper-mib` MiB of its own files,
            // in 1 MiB files of random bytes); each op snapshots it (then
            // deletes the snapshot) or forks 1 or 10 children from it (then
            // destroys them).
            let mut c = Conn::open(args).await?;
            let id = c.spawn(args).await?;
            let fill = format!(
                "echo state > /workspace/state && mkdir -p /workspace/fill && i=0; \
                 while [ $i -lt {} ]; do head -c 1048576 /dev/urandom > /workspace/fill/$i; i=$((i+1)); done",
                args.upper_mib
            );
            c.ok(
                Method::POST,
                &format!("/sandboxes/{id}/exec"),
                Some(json!({"command": fill, "timeout": "600s"})),
            )
            .await?;
            let count = if name == "fork10" { 10 } else { 1 };
            let fork = name != "snapshot";
            let id2 = id.clone();
            let out = run(args, name, args.ops, move |mut c, _| {
                let id = id2.clone();
                async move {
                    let t = Instant::now();
                    let r = async {
                        let (path, body) = if fork {
                            (format!("/sandboxes/{id}/fork"), json!({"count": count}))
                        } else {
                            (format!("/sandboxes/{id}/snapshot"), json!({}))
                        };
                        let v: serde_json::Value =
                            serde_json::from_slice(&c.ok(Method::POST, &path, Some(body)).await?)?;
                        let d = t.elapsed();
                        let cleanup: Vec<String> = if fork {
                            v["sandboxes"]
                                .as_array()
                                .map(|a| {
                                    a.iter()
                                        .map(|s| {
                                            format!(
                                                "/sandboxes/{}",
                                                s["id"].as_str().unwrap_or_default()
                                            )
                                        })
                                        .collect()
                                })
                                .unwrap_or_default()
                        } else {
                            eprintln!(
                                "snapshot {}: {} bytes",
                                v["id"].as_str().unwrap_or_default(),
                                v["size_bytes"]
                            );
                            vec![format!(
                                "/snapshots/{}",
                                v["id"].as_str().unwrap_or_default()
                            )]
                        };
                        if cleanup.len() != if fork { count } else { 1 } {
                            bail!("expected {count} children: {v}");
                        }
                        for u in cleanup {
                            c.ok(Method::DELETE, &u, None).await?;
                        }
                        Ok(d)
                    }
                    .await;
                    (c, r)
                }
            })
            .await;
            c.ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
                .await?;
            out
        }
        "engine_spawn" | "engine_exec" | "cli_exec" => engine::scenario(args, name).await,
        "density" => density(args).await,
        "bigfile" => bigfile(args).await,
        other => bail!("unknown scenario {other:?}"),
    }
}

/// `MemAvailable` after dropping the page cache (bytes).
fn mem_available() -> Result<u64> {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let kb: u64 = text
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no MemAvailable in /proc/meminfo"))?;
    Ok(kb * 1024)
}

/// Spawns `--ops` idle sandboxes, reports host memory per sandbox, destroys them.
async fn density(args: &Args) -> Result<Outcome> {
    let before = mem_available()?;
    let ids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let a = args.clone();
    let ids2 = ids.clone();
    let out = run(args, "density", args.ops, move |mut c, _| {
        let a = a.clone();
        let ids = ids2.clone();
        async move {
            let t = Instant::now();
            let r = c.spawn(&a).await;
            if let Ok(id) = &r {
                if let Ok(mut v) = ids.lock() {
                    v.push(id.clone());
                }
            }
            (c, timed(t, r))
        }
    })
    .await?;
    // Let the sandboxes settle before measuring.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = mem_available()?;
    let ids: Vec<String> = ids.lock().map(|v| v.clone()).unwrap_or_default();
    let n = ids.len().max(1) as f64;
    let per = before.saturating_sub(after) as f64 / n / (1024.0 * 1024.0);
    println!(
        "density: {} idle sandboxes cost {per:.2} MiB of host memory each (MemAvailable {:.0} → {:.0} MiB)",
        ids.len(),
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    let mut c = Conn::open(args).await?;
    for id in ids {
        let _ = c
            .ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
            .await;
    }
    Ok(out)
}

/// Resident memory of `pid` (bytes), from /proc.
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Deterministic 1 MiB chunk `i` of the big file.
fn big_chunk(i: u64) -> Bytes {
    let mut v = vec![0u8; 1 << 20];
    for (j, b) in v.iter_mut().enumerate() {
        *b = (j as u64).wrapping_mul(2_654_435_761).wrapping_add(i) as u8;
    }
    Bytes::from(v)
}

/// Streams `--big-mib` MiB into a sandbox (`PUT /files`) and back
/// (`GET /files`) while sampling the server's resident memory; the floor
/// is the same bytes written to and read from a host file by this process.
async fn bigfile(args: &Args) -> Result<Outcome> {
    use http_body_util::StreamBody;
    let mib = args.big_mib;
    let mut c = Conn::open(args).await?;
    let id = c.spawn(args).await?;
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = args.server_pid.map(|pid| {
        let (peak, on) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while on.load(std::sync::atomic::Ordering::SeqCst) {
                peak.fetch_max(rss_of(pid), std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    });
    let start_rss = args.server_pid.map_or(0, rss_of);
    // Upload on a connection whose body is a stream.
    let stream = TcpStream::connect(&args.addr).await?;
    let io = hyper_util_io::TokioIo(stream);
    type Streamed = StreamBody<
        futures::stream::BoxStream<'static, Result<hyper::body::Frame<Bytes>, std::io::Error>>,
    >;
    let (mut tx, conn) = hyper::client::conn::http1::handshake::<_, Streamed>(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let body: futures::stream::BoxStream<'static, _> = Box::pin(futures::stream::iter(
        (0..mib).map(|i| Ok(hyper::body::Frame::data(big_chunk(i)))),
    ));
    let mut req = Request::builder()
        .method(Method::PUT)
        .uri(format!(
            "/api/v1/sandboxes/{id}/files?path=/workspace/big.bin"
        ))
        .header("host", &args.addr)
        .header("content-length", (mib << 20).to_string());
    if let Some(k) = &args.api_key {
        req = req.header("x-api-key", k);
    }
    let t = Instant::now();
    let resp = tx.send_request(req.body(StreamBody::new(body))?).await?;
    let st = resp.status();
    let b = resp.into_body().collect().await?.to_bytes();
    if !st.is_success() {
        bail!("upload -> {st}: {}", String::from_utf8_lossy(&b));
    }
    let up = t.elapsed();
    // Download, checking every byte.
    let t = Instant::now();
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(format!(
            "/api/v1/sandboxes/{id}/files?path=/workspace/big.bin"
        ))
        .header("host", &args.addr);
    if let Some(k) = &args.api_key {
        req = req.header("x-api-key", k);
    }
    c.tx.ready().await?;
    let resp =
        c.tx.send_request(req.body(Full::new(Bytes::new()))?)
            .await?;
    if !resp.status().is_success() {
        bail!("download -> {}", resp.status());
    }
    let mut body = resp.into_body();
    let (mut got, mut chunk_i, mut pos) = (0u64, 0u64, 0usize);
    let mut want = big_chunk(0);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        for b in data.iter() {
            if *b != want[pos] {
                bail!("download differs at byte {got}");
            }
            got += 1;
            pos += 1;
            if pos == want.len() {
                chunk_i += 1;
                want = big_chunk(chunk_i);
                pos = 0;
            }
        }
    }
    let down = t.elapsed();
    if got != mib << 20 {
        bail!("downloaded {got} bytes of {}", mib << 20);
    }
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    if let Some(h) = sampler {
        let _ = h.await;
    }
    let _ = c
        .ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;
    // Floor: the same bytes through a host file, no server, no sandbox.
    let path = std::env::temp_dir().join(format!("stacyvm-bench-{}.bin", std::process::id()));
    let t = Instant::now();
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for i in 0..mib {
            f.write_all(&big_chunk(i))?;
        }
        f.flush()?;
    }
    let floor_up = t.elapsed();
    let t = Instant::now();
    {
        use std::io::Read;
        let mut f = std::fs::File::open(&path)?;
        let mut buf = vec![0u8; 1 << 20];
        while f.read(&mut buf)? > 0 {}
    }
    let floor_down = t.elapsed();
    let _ = std::fs::remove_file(&path);
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    println!(
        "bigfile {mib} MiB: upload {:.1} s ({:.0} MiB/s), download+verify {:.1} s ({:.0} MiB/s); \
         server RSS {:.1} MiB before, peak {:.1} MiB{}; floor (host file, this process): write {:.1} s ({:.0} MiB/s), read {:.1} s ({:.0} MiB/s)",
        up.as_secs_f64(),
        rate(up),
        down.as_secs_f64(),
        rate(down),
        start_rss as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        if args.server_pid.is_none() { " (pass --server-pid to sample)" } else { "" },
        floor_up.as_secs_f64(),
        rate(floor_up),
        floor_down.as_secs_f64(),
        rate(floor_down),
    );
    Ok(Outcome {
        name: "bigfile".into(),
        latencies: vec![up, down],
        wall: up + down,
        errors: 0,
        first_error: None,
    })
}

/// Docker Engine floors measured without StacyVM.
mod engine {
    use super::{timed, Args, Outcome};
    use anyhow::{anyhow, bail, Result};
    use bollard::exec::{CreateExecOptions, StartExecResults};
    use bollard::models::{ContainerCreateBody, HostConfig};
    use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
    use bollard::Docker;
    use futures::StreamExt;
    use std::time::{Duration, Instant};

    fn body(args: &Args) -> ContainerCreateBody {
        ContainerCreateBody {
            image: Some(args.image.clone()),
            cmd: Some(vec!["sleep".into(), "3600".into()]),
            working_dir: Some("/workspace".into()),
            host_config: Some(HostConfig {
                runtime: Some(args.runtime.clone()),
                network_mode: Some("none".into()),
                memory: Some(256 * 1024 * 1024),
                memory_swap: Some(256 * 1024 * 1024),
                pids_limit: Some(256),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn create_start(d: &Docker, args: &Args, name: &str) -> Result<()> {
        d.create_container(
            Some(CreateContainerOptionsBuilder::default().name(name).build()),
            body(args),
        )
        .await?;
        d.start_container(name, None).await?;
        Ok(())
    }

    async fn remove(d: &Docker, name: &str) {
        let _ = d
            .remove_container(
                name,
                Some(RemoveContainerOptionsBuilder::default().force(true).build()),
            )
            .await;
    }

    /// One Engine exec API round trip: create, start attached, drain, inspect.
    async fn exec_true(d: &Docker, name: &str) -> Result<()> {
        let e = d
            .create_exec(
                name,
                CreateExecOptions::<String> {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(vec!["true".into()]),
                    ..Default::default()
                },
            )
            .await?;
        if let StartExecResults::Attached { mut output, .. } = d.start_exec(&e.id, None).await? {
            while let Some(o) = output.next().await {
                o?;
            }
        }
        let code = d.inspect_exec(&e.id).await?.exit_code;
        if code != Some(0) {
            bail!("exec exit code {code:?}");
        }
        Ok(())
    }

    /// Runs `--ops` operations on `--clients` tasks (no server connection).
    async fn run_plain<F, Fut>(args: &Args, name: &str, op: F) -> Result<Outcome>
    where
        F: Fn(usize) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<Duration>> + Send,
    {
        let total = args.ops;
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let start = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..args.clients.max(1).min(total.max(1)) {
            let (op, counter) = (op.clone(), counter.clone());
            handles.push(tokio::spawn(async move {
                let (mut lat, mut errors, mut first) = (Vec::new(), 0, None);
                loop {
                    let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    match op(i).await {
                        Ok(d) => lat.push(d),
                        Err(e) => {
                            errors += 1;
                            first.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                (lat, errors, first)
            }));
        }
        let mut out = Outcome {
            name: name.to_string(),
            latencies: Vec::new(),
            wall: Duration::ZERO,
            errors: 0,
            first_error: None,
        };
        for h in handles {
            let (l, e, f) = h.await?;
            out.latencies.extend(l);
            out.errors += e;
            if out.first_error.is_none() {
                out.first_error = f;
            }
        }
        out.wall = start.elapsed();
        out.latencies.sort();
        Ok(out)
    }

    pub async fn scenario(args: &Args, name: &str) -> Result<Outcome> {
        if args.image.is_empty() {
            bail!("{name} needs --image");
        }
        let d = Docker::connect_with_defaults()?
            .negotiate_version()
            .await
            .map_err(|e| anyhow!("docker engine: {e}"))?;
        let tag = std::process::id();
        match name {
            "engine_spawn" => {
                let (a, d2) = (args.clone(), d.clone());
                run_plain(args, name, move |i| {
                    let (a, d) = (a.clone(), d2.clone());
                    async move {
                        let n = format!("stacyvm-bench-{tag}-{i}");
                        let t = Instant::now();
                        let r = timed(t, create_start(&d, &a, &n).await);
                        remove(&d, &n).await;
                        r
                    }
                })
                .await
            }
            _ => {
                let n = format!("stacyvm-bench-{tag}-exec");
                create_start(&d, args, &n).await?;
                let (d2, n2, cli) = (d.clone(), n.clone(), name == "cli_exec");
                let out = run_plain(args, name, move |_| {
                    let (d, n) = (d2.clone(), n2.clone());
                    async move {
                        let t = Instant::now();
                        let r = if cli {
                            tokio::process::Command::new("docker")
                                .args(["exec", &n, "true"])
                                .status()
                                .await
                                .map_err(anyhow::Error::from)
                                .and_then(|s| {
                                    if s.success() {
                                        Ok(())
                                    } else {
                                        Err(anyhow!("docker exec: {s}"))
                                    }
                                })
                        } else {
                            exec_true(&d, &n).await
                        };
                        timed(t, r)
                    }
                })
                .await;
                // Give the last exec a moment before removal.
                tokio::time::sleep(Duration::from_millis(10)).await;
                remove(&d, &n).await;
                out
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let label = if args.label.is_empty() {
        if args.provider.is_empty() {
            "default".to_string()
        } else {
            args.provider.clone()
        }
    } else {
        args.label.clone()
    };
    if !args.markdown {
        println!(
            "{:<11} {:>9} {:>4} {:>9} {:>9} {:>9} {:>9} {:>10} {:>6}",
            "scenario", "provider", "c", "n", "p50 ms", "p95 ms", "p99 ms", "ops/s", "errors"
        );
    }
    for name in args
        .scenarios
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let outcomes = if name == "preview" {
            preview::run(&args).await?
        } else if name == "archive" {
            archive::run(&args).await?
        } else if name == "pause" {
            pause::run(&args).await?
        } else if name == "template" {
            template::run(&args).await?
        } else if name == "egress" {
            egress::run(&args).await?
        } else if name == "build" {
            build::run(&args).await?
        } else if name == "volume" {
            volume::run(&args).await?
        } else {
            vec![scenario(&args, name).await?]
        };
        for o in outcomes {
            print_row(&args, &label, name, o);
        }
    }
    Ok(())
}

fn print_row(args: &Args, label: &str, name: &str, o: Outcome) {
    {
        let n = o.latencies.len();
        let rate = n as f64 / o.wall.as_secs_f64();
        let (p50, p95, p99) = (
            pct(&o.latencies, 50.0),
            pct(&o.latencies, 95.0),
            pct(&o.latencies, 99.0),
        );
        if args.markdown {
            println!(
                "| {} | {label} | {} | {n} | {} | {} | {} | {rate:.0} | {} |",
                o.name,
                args.clients,
                ms(p50),
                ms(p95),
                ms(p99),
                o.errors
            );
        } else {
            println!(
                "{:<11} {label:>9} {:>4} {n:>9} {:>9} {:>9} {:>9} {rate:>10.0} {:>6}",
                o.name,
                args.clients,
                ms(p50),
                ms(p95),
                ms(p99),
                o.errors
            );
        }
        if let Some(e) = o.first_error {
            eprintln!("{name}: first error: {e}");
        }
    }
}
