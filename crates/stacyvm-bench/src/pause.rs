//! `pause`: pause and resume latency on one sandbox, sequentially, and the
//! first exec on a paused sandbox (it resumes by itself) against an exec
//! on a running one (the floor).

use std::time::{Duration, Instant};

use anyhow::Result;
use hyper::Method;
use serde_json::json;

use super::{Args, Conn, Outcome};

fn outcome(name: &str, mut latencies: Vec<Duration>) -> Outcome {
    latencies.sort();
    Outcome {
        name: name.into(),
        wall: latencies.iter().sum(),
        latencies,
        errors: 0,
        first_error: None,
    }
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
        outcome("pause", pause),
        outcome("resume", resume),
        outcome("wake_exec", wake),
        outcome("exec_floor", floor),
    ])
}
