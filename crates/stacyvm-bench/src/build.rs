//! `build`: environment builds of a small spec (apt `jq`, pip `six`) on
//! `--image` for `--provider`, sequentially, `--ops` times:
//! - `build_cold`: a spec never built before (a unique `RUN` step defeats
//!   the cache): the packages downloaded and installed, the result
//!   committed;
//! - `build_warm`: the same spec again, found by its cache key;
//! - `build_floor`: the same commands run by hand in a fresh bridged
//!   sandbox of the base image (spawn, execs, destroy): the work without
//!   the build's bookkeeping and commit; on docker, `docker run --rm` of
//!   the base with them (a sandbox drops the capabilities apt needs);
//! - `docker_build` (`--provider docker`): `docker build --no-cache` of the
//!   equivalent Dockerfile with the Docker CLI on the same engine.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hyper::Method;
use serde_json::{json, Value};

use super::{Args, Conn, Outcome};

const APT: &str = "apt-get update && apt-get install -y --no-install-recommends jq && apt-get clean && rm -rf /var/lib/apt/lists/*";
const PIP: &str = "python3 -m pip install --no-cache-dir six==1.16.0";

/// Runs a build of `spec` to its end; its duration and final state.
async fn build(c: &mut Conn, args: &Args, spec: &str) -> Result<(Duration, Value)> {
    let t = Instant::now();
    let mut body = json!({"spec_id": spec});
    if !args.provider.is_empty() {
        body["provider"] = json!(args.provider);
    }
    let b: Value = serde_json::from_slice(
        &c.ok(Method::POST, "/environments/builds", Some(body))
            .await?,
    )?;
    let id = b["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no build id: {b}"))?
        .to_string();
    // The followed log ends when the build does.
    c.ok(
        Method::GET,
        &format!("/environments/builds/{id}/logs?follow=1"),
        None,
    )
    .await?;
    let took = t.elapsed();
    let v: Value = serde_json::from_slice(
        &c.ok(Method::GET, &format!("/environments/builds/{id}"), None)
            .await?,
    )?;
    if v["status"] != "ready" {
        bail!("build {id} {}: {}", v["status"], v["error"]);
    }
    Ok((took, v))
}

pub async fn run(args: &Args) -> Result<Vec<Outcome>> {
    if args.image.is_empty() {
        bail!("--image names the base image of the build scenario (one with apt and python3)");
    }
    let mut c = Conn::open(args).await?;
    let nonce = format!("{:x}", rand_u64());
    let (mut cold, mut warm, mut floor, mut docker) = (vec![], vec![], vec![], vec![]);
    let mut specs = Vec::new();
    let mut images = Vec::new();
    for i in 0..args.ops {
        let mark = format!("{nonce}-{i}");
        let dockerfile = format!("FROM {}\nRUN echo {mark} > /bench-mark\n", args.image);
        let spec: Value = serde_json::from_slice(
            &c.ok(
                Method::POST,
                "/environments/specs",
                Some(json!({
                    "name": format!("bench-{mark}"),
                    "apt_packages": ["jq"],
                    "python_packages": ["six==1.16.0"],
                    "dockerfile": dockerfile,
                })),
            )
            .await?,
        )?;
        let spec = spec["id"]
            .as_str()
            .ok_or_else(|| anyhow!("no spec id"))?
            .to_string();
        specs.push(spec.clone());
        let (t, v) = build(&mut c, args, &spec).await?;
        cold.push(t);
        images.push(
            v["artifacts"][0]["image_ref"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        let (t, v) = build(&mut c, args, &spec).await?;
        if !v["log"].as_str().unwrap_or_default().contains("reusing") {
            bail!("the second build of {spec} did not reuse the first");
        }
        warm.push(t);

        let cmd = format!(
            "export DEBIAN_FRONTEND=noninteractive PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1; {APT} && {PIP} && echo {mark}-floor > /bench-mark"
        );
        if args.provider == "docker" {
            let t = Instant::now();
            let out = std::process::Command::new("docker")
                .args(["run", "--rm", &args.image, "sh", "-c", &cmd])
                .output()
                .context("docker run (the Docker CLI)")?;
            if !out.status.success() {
                bail!("docker run: {}", String::from_utf8_lossy(&out.stderr));
            }
            floor.push(t.elapsed());
            docker.push(docker_build(&args.image, &format!("{mark}-docker"))?);
            continue;
        }
        // The floor: the same commands in a fresh bridged sandbox.
        let t = Instant::now();
        let mut body = json!({"ttl": "30m", "image": args.image, "network_mode": "bridge"});
        if !args.provider.is_empty() {
            body["provider"] = json!(args.provider);
        }
        let sb: Value =
            serde_json::from_slice(&c.ok(Method::POST, "/sandboxes", Some(body)).await?)?;
        let id = sb["id"]
            .as_str()
            .ok_or_else(|| anyhow!("no sandbox id"))?
            .to_string();
        let out: Value = serde_json::from_slice(
            &c.ok(
                Method::POST,
                &format!("/sandboxes/{id}/exec"),
                Some(json!({"command": cmd, "timeout": "600s"})),
            )
            .await?,
        )?;
        c.ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
            .await?;
        if out["exit_code"] != 0 {
            bail!("the floor's commands failed: {out}");
        }
        floor.push(t.elapsed());
    }
    for s in specs {
        let _ = c
            .ok(Method::DELETE, &format!("/environments/specs/{s}"), None)
            .await;
    }
    if args.provider == "docker" {
        for i in &images {
            let _ = std::process::Command::new("docker")
                .args(["image", "rm", "-f", i])
                .output();
        }
    }
    let mut out = vec![
        Outcome::sequential("build_cold", cold),
        Outcome::sequential("build_warm", warm),
        Outcome::sequential("build_floor", floor),
    ];
    if !docker.is_empty() {
        out.push(Outcome::sequential("docker_build", docker));
    }
    Ok(out)
}

/// `docker build --no-cache` of the equivalent Dockerfile (the engine's
/// default bridge: the network the Engine's builder uses).
fn docker_build(base: &str, mark: &str) -> Result<Duration> {
    let dir = std::env::temp_dir().join(format!("stacyvm-bench-build-{mark}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {base}\nENV DEBIAN_FRONTEND=noninteractive PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1\nRUN {APT}\nRUN {PIP}\nRUN echo {mark} > /bench-mark && mkdir -p /workspace /output /data\nWORKDIR /workspace\n"
        ),
    )?;
    let tag = format!("stacyvm-bench-build:{mark}");
    let t = Instant::now();
    let out = std::process::Command::new("docker")
        .args(["build", "--no-cache", "-q", "-t", &tag])
        .arg(&dir)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .context("docker build (the Docker CLI)")?;
    let took = t.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::process::Command::new("docker")
        .args(["image", "rm", "-f", &tag])
        .output();
    if !out.status.success() {
        bail!("docker build: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}
