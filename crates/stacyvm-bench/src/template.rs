//! `template`: spawn latency from a template whose setup runs a command,
//! three ways: claimed from its warm pool (`pool_claim`), spawned fresh
//! and set up (`setup_spawn`, the same template with the pool bypassed by
//! asking for another size), and a plain spawn with no template
//! (`plain_spawn`, the floor). Each spawned sandbox is destroyed outside
//! the timing; the pool refills between claims.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hyper::Method;
use serde_json::{json, Value};

use super::{Args, Conn, Outcome};

const NAME: &str = "bench-pool";

pub async fn run(args: &Args) -> Result<Vec<Outcome>> {
    let mut c = Conn::open(args).await?;
    let _ = c
        .ok(Method::DELETE, &format!("/templates/{NAME}"), None)
        .await;
    let mut t = json!({
        "name": NAME,
        "image": if args.image.is_empty() { "host" } else { args.image.as_str() },
        "pool_size": 2,
        "memory_mb": 256,
        "env": {"BENCH": "1"},
        "setup": ["mkdir -p /workspace/app && echo ready > /workspace/app/state"],
    });
    if !args.provider.is_empty() {
        t["provider"] = json!(args.provider);
    }
    c.ok(Method::POST, "/templates", Some(t)).await?;
    let res = measure(args, &mut c).await;
    let _ = c
        .ok(Method::DELETE, &format!("/templates/{NAME}"), None)
        .await;
    res
}

async fn ready(c: &mut Conn) -> Result<i64> {
    let b = c
        .ok(Method::GET, &format!("/templates/{NAME}"), None)
        .await?;
    let v: Value = serde_json::from_slice(&b)?;
    Ok(v["pool"]["ready"].as_i64().unwrap_or(0))
}

async fn wait_full(c: &mut Conn) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(120);
    while ready(c).await? < 2 {
        if Instant::now() > until {
            bail!("the template pool did not fill within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `POST /sandboxes` with `body`, timed; the new id.
pub(crate) async fn spawn_timed(c: &mut Conn, body: Value) -> Result<(Duration, String)> {
    let t = Instant::now();
    let b = c.ok(Method::POST, "/sandboxes", Some(body)).await?;
    let took = t.elapsed();
    let v: Value = serde_json::from_slice(&b)?;
    Ok((took, v["id"].as_str().unwrap_or_default().to_string()))
}

async fn measure(args: &Args, c: &mut Conn) -> Result<Vec<Outcome>> {
    let (mut claim, mut fresh, mut plain) = (vec![], vec![], vec![]);
    for _ in 0..args.ops {
        wait_full(c).await?;
        let (took, id) = spawn_timed(c, json!({"template": NAME, "ttl": "10m"})).await?;
        claim.push(took);
        c.ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
            .await?;
        let (took, id) =
            spawn_timed(c, json!({"template": NAME, "ttl": "10m", "memory_mb": 257})).await?;
        fresh.push(took);
        c.ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
            .await?;
        let mut body = json!({"ttl": "10m", "memory_mb": 256});
        if !args.provider.is_empty() {
            body["provider"] = json!(args.provider);
        }
        if !args.image.is_empty() {
            body["image"] = json!(args.image);
        }
        let (took, id) = spawn_timed(c, body).await?;
        plain.push(took);
        c.ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
            .await?;
    }
    Ok(vec![
        Outcome::sequential("pool_claim", claim),
        Outcome::sequential("setup_spawn", fresh),
        Outcome::sequential("plain_spawn", plain),
    ])
}
