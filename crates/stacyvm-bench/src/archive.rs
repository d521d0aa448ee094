//! `archive`: tar throughput through `/archive` against the same bytes
//! through the raw file routes (`PUT`/`GET /files`, the floor), in one
//! sandbox, alternating, best of three each.
//!
//! The archive holds one file of `--big-mib` MiB; the tar framing is built
//! here (a ustar header, the data, padding and the two end blocks) so the
//! body streams without a temporary file.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::{Method, Request};
use tokio::net::TcpStream;

use super::{big_chunk, hyper_util_io, Args, Conn, Outcome};

type Streamed = StreamBody<
    futures::stream::BoxStream<'static, Result<hyper::body::Frame<Bytes>, std::io::Error>>,
>;

/// A ustar header for one regular file.
fn header(name: &str, size: u64) -> Bytes {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let field = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
        let s = format!("{v:0w$o}", w = len - 1);
        h[at..at + len - 1].copy_from_slice(s.as_bytes());
    };
    field(&mut h, 100, 8, 0o644);
    field(&mut h, 108, 8, 0);
    field(&mut h, 116, 8, 0);
    field(&mut h, 124, 12, size);
    field(&mut h, 136, 12, 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    Bytes::copy_from_slice(&h)
}

/// PUTs `mib` MiB (as a file, or inside a tar) on a fresh connection.
async fn put(args: &Args, path: &str, mib: u64, tar: bool) -> Result<Duration> {
    let stream = TcpStream::connect(&args.addr).await?;
    stream.set_nodelay(true)?;
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake::<_, Streamed>(hyper_util_io::TokioIo(stream))
            .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let data = (0..mib).map(|i| Ok(hyper::body::Frame::data(big_chunk(i))));
    let body: futures::stream::BoxStream<'static, _> = if tar {
        let head = std::iter::once(Ok(hyper::body::Frame::data(header("big.bin", mib << 20))));
        // 1 MiB chunks need no padding; two zero blocks end the archive.
        let tail = std::iter::once(Ok(hyper::body::Frame::data(Bytes::from(vec![0u8; 1024]))));
        Box::pin(futures::stream::iter(head.chain(data).chain(tail)))
    } else {
        Box::pin(futures::stream::iter(data))
    };
    let len = (mib << 20) + if tar { 512 + 1024 } else { 0 };
    let mut req = Request::builder()
        .method(Method::PUT)
        .uri(format!("/api/v1{path}"))
        .header("host", &args.addr)
        .header("content-length", len.to_string());
    if let Some(k) = &args.api_key {
        req = req.header("x-api-key", k);
    }
    let t = Instant::now();
    let resp = tx.send_request(req.body(StreamBody::new(body))?).await?;
    let st = resp.status();
    let b = resp.into_body().collect().await?.to_bytes();
    if !st.is_success() {
        bail!("PUT {path} -> {st}: {}", String::from_utf8_lossy(&b));
    }
    Ok(t.elapsed())
}

/// GETs `path`, counting the bytes; (time, bytes).
async fn get(c: &mut Conn, path: &str) -> Result<(Duration, u64)> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(format!("/api/v1{path}"))
        .header("host", &c.host);
    if let Some(k) = &c.key {
        req = req.header("x-api-key", k);
    }
    let t = Instant::now();
    c.tx.ready().await?;
    let resp =
        c.tx.send_request(req.body(http_body_util::Full::new(Bytes::new()))?)
            .await?;
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
    Ok((t.elapsed(), n))
}

pub async fn run(args: &Args) -> Result<Vec<Outcome>> {
    let mut c = Conn::open(args).await?;
    let id = c.spawn(args).await?;
    let res = measure(args, &mut c, &id).await;
    let _ = c
        .ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;
    res
}

async fn measure(args: &Args, c: &mut Conn, id: &str) -> Result<Vec<Outcome>> {
    let mib = args.big_mib.min(1024);
    let (mut up_f, mut up_t, mut down_f, mut down_t) = (vec![], vec![], vec![], vec![]);
    for _ in 0..3 {
        up_f.push(
            put(
                args,
                &format!("/sandboxes/{id}/files?path=/workspace/raw.bin"),
                mib,
                false,
            )
            .await?,
        );
        up_t.push(
            put(
                args,
                &format!("/sandboxes/{id}/archive?path=/workspace/tardir"),
                mib,
                true,
            )
            .await?,
        );
        let (d, n) = get(c, &format!("/sandboxes/{id}/files?path=/workspace/raw.bin")).await?;
        if n != mib << 20 {
            bail!("file download: {n} bytes");
        }
        down_f.push(d);
        let (d, n) = get(
            c,
            &format!("/sandboxes/{id}/archive?path=/workspace/tardir"),
        )
        .await?;
        if n < mib << 20 {
            bail!("archive download: {n} bytes");
        }
        down_t.push(d);
    }
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    let rate = |v: &[Duration]| mib as f64 / best(v).as_secs_f64();
    println!(
        "archive {mib} MiB, best of 3: upload tar {:.0} MiB/s vs file {:.0} MiB/s ({:.0}%); download tar {:.0} MiB/s vs file {:.0} MiB/s ({:.0}%)",
        rate(&up_t),
        rate(&up_f),
        100.0 * rate(&up_t) / rate(&up_f),
        rate(&down_t),
        rate(&down_f),
        100.0 * rate(&down_t) / rate(&down_f),
    );
    let o = |name: &str, v: Vec<Duration>| Outcome {
        name: name.into(),
        wall: v.iter().sum(),
        latencies: {
            let mut v = v;
            v.sort();
            v
        },
        errors: 0,
        first_error: None,
    };
    Ok(vec![
        o("tar_up", up_t),
        o("file_up", up_f),
        o("tar_down", down_t),
        o("file_down", down_f),
    ])
}
