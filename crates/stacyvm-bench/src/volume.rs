//! `volume`: disk throughput inside a sandbox on a named volume (an ext4
//! image, loop-mounted) against the sandbox's own disk (its overlay upper
//! dir) and, with `--host-dir`, the host writing to that directory (the
//! floor). Each op writes `--big-mib` MiB with `dd … conv=fsync` and reads
//! them back with `iflag=direct` (no page cache); the table's p50 is the
//! time of one pass, its ops/s the MiB/s.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use hyper::Method;
use serde_json::{json, Value};

use super::{Args, Conn, Outcome};

fn mibs(name: &str, mib: u64, times: Vec<Duration>) -> Outcome {
    let mut o = Outcome::sequential(name, times);
    // ops/s of the table = MiB/s.
    o.wall /= u32::try_from(mib.max(1)).unwrap_or(u32::MAX);
    o
}

async fn dd(c: &mut Conn, id: &str, dir: &str, mib: u64) -> Result<(Duration, Duration)> {
    let run = |cmd: String| json!({"command": cmd, "timeout": "600s"});
    let t = Instant::now();
    let w: Value = serde_json::from_slice(
        &c.ok(
            Method::POST,
            &format!("/sandboxes/{id}/exec"),
            Some(run(format!(
                "dd if=/dev/zero of={dir}/bench.bin bs=1M count={mib} conv=fsync 2>&1"
            ))),
        )
        .await?,
    )?;
    let write = t.elapsed();
    if w["exit_code"] != 0 {
        bail!("dd write in {dir}: {w}");
    }
    let t = Instant::now();
    let r: Value = serde_json::from_slice(
        &c.ok(
            Method::POST,
            &format!("/sandboxes/{id}/exec"),
            Some(run(format!(
                "dd if={dir}/bench.bin of=/dev/null bs=1M iflag=direct 2>&1; rm -f {dir}/bench.bin"
            ))),
        )
        .await?,
    )?;
    let read = t.elapsed();
    if r["exit_code"] != 0 {
        bail!("dd read in {dir}: {r}");
    }
    Ok((write, read))
}

fn host_dd(dir: &std::path::Path, mib: u64) -> Result<(Duration, Duration)> {
    let f = dir.join("stacyvm-bench.bin");
    let t = Instant::now();
    let st = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", f.display()),
            "bs=1M",
            &format!("count={mib}"),
            "conv=fsync",
        ])
        .stderr(std::process::Stdio::null())
        .status()?;
    let write = t.elapsed();
    let t = Instant::now();
    let st2 = std::process::Command::new("dd")
        .args([
            &format!("if={}", f.display()),
            "of=/dev/null",
            "bs=1M",
            "iflag=direct",
        ])
        .stderr(std::process::Stdio::null())
        .status()?;
    let read = t.elapsed();
    let _ = std::fs::remove_file(&f);
    if !st.success() || !st2.success() {
        bail!("host dd in {} failed", dir.display());
    }
    Ok((write, read))
}

pub async fn run(args: &Args) -> Result<Vec<Outcome>> {
    let mib = args.big_mib;
    let mut c = Conn::open(args).await?;
    let name = format!("bench-{}", std::process::id());
    c.ok(
        Method::POST,
        "/volumes",
        Some(json!({"name": name, "size_mb": (mib * 2).max(512)})),
    )
    .await?;
    let mut body = json!({"ttl": "30m", "volumes": [{"volume": name, "path": "/data"}]});
    if !args.provider.is_empty() {
        body["provider"] = json!(args.provider);
    }
    if !args.image.is_empty() {
        body["image"] = json!(args.image);
    }
    let sb: Value = serde_json::from_slice(&c.ok(Method::POST, "/sandboxes", Some(body)).await?)?;
    let id = sb["id"]
        .as_str()
        .ok_or_else(|| anyhow!("spawn returned no id: {sb}"))?
        .to_string();
    let res = async {
        let (mut vw, mut vr, mut sw, mut sr, mut hw, mut hr) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..args.ops {
            let (w, r) = dd(&mut c, &id, "/data", mib).await?;
            vw.push(w);
            vr.push(r);
            let (w, r) = dd(&mut c, &id, "/workspace", mib).await?;
            sw.push(w);
            sr.push(r);
            if let Some(dir) = &args.host_dir {
                let (w, r) = host_dd(dir, mib)?;
                hw.push(w);
                hr.push(r);
            }
        }
        let mut out = vec![
            mibs("vol_write", mib, vw),
            mibs("vol_read", mib, vr),
            mibs("own_write", mib, sw),
            mibs("own_read", mib, sr),
        ];
        if !hw.is_empty() {
            out.push(mibs("host_write", mib, hw));
            out.push(mibs("host_read", mib, hr));
        }
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    let _ = c
        .ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;
    let _ = c
        .ok(Method::DELETE, &format!("/volumes/{name}"), None)
        .await;
    res
}
