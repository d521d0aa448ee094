//! `pause`: pause and resume latency on one sandbox, sequentially, and the
//! first exec on a paused sandbox (it resumes by itself) against an exec
//! on a running one (the floor).

use std::time::Instant;

use anyhow::Result;
use hyper::Method;
use serde_json::json;

use super::{Args, Conn, Outcome};

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
    let exec = json!({"command": "true", "mode": "argv"});
    let (mut pause, mut resume, mut wake, mut floor) = (vec![], vec![], vec![], vec![]);
    for _ in 0..args.ops {
        let t = Instant::now();
        c.ok(Method::POST, &format!("/sandboxes/{id}/pause"), None)
            .await?;
        pause.push(t.elapsed());
        let t = Instant::now();
        c.ok(Method::POST, &format!("/sandboxes/{id}/resume"), None)
            .await?;
        resume.push(t.elapsed());
        c.ok(Method::POST, &format!("/sandboxes/{id}/pause"), None)
            .await?;
        let t = Instant::now();
        c.ok(
            Method::POST,
            &format!("/sandboxes/{id}/exec"),
            Some(exec.clone()),
        )
        .await?;
        wake.push(t.elapsed());
        let t = Instant::now();
        c.ok(
            Method::POST,
            &format!("/sandboxes/{id}/exec"),
            Some(exec.clone()),
        )
        .await?;
        floor.push(t.elapsed());
    }
    Ok(vec![
        Outcome::sequential("pause", pause),
        Outcome::sequential("resume", resume),
        Outcome::sequential("wake_exec", wake),
        Outcome::sequential("exec_floor", floor),
    ])
}
