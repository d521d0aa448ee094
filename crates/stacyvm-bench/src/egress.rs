//! `egress`: what egress policies cost. Spawn latency of a `bridge`
//! sandbox with no policy (`br_spawn`, the floor), with a CIDR policy
//! (`cidr_spawn`: deny all but one block) and with domain rules
//! (`dom_spawn`: the redirect to the egress proxy as well); and a runtime
//! change of one sandbox's policy (`net_patch`, `PATCH …/network`
//! alternating two policies). Spawned sandboxes are destroyed outside
//! the timing.

use std::time::Instant;

use anyhow::Result;
use hyper::Method;
use serde_json::{json, Value};

use super::template::spawn_timed;
use super::{Args, Conn, Outcome};

pub async fn run(args: &Args) -> Result<Vec<Outcome>> {
    let mut c = Conn::open(args).await?;
    let base = |network: Option<Value>| {
        let mut b = json!({"ttl": "10m", "network_mode": "bridge"});
        if !args.provider.is_empty() {
            b["provider"] = json!(args.provider);
        }
        if !args.image.is_empty() {
            b["image"] = json!(args.image);
        }
        if let Some(n) = network {
            b["network"] = n;
        }
        b
    };
    let cidr = json!({"allow_out": ["1.1.1.0/24"], "deny_out": ["0.0.0.0/0"]});
    let domains =
        json!({"allow_out": ["pypi.org", "*.pythonhosted.org"], "deny_out": ["0.0.0.0/0"]});
    let (mut plain, mut with_cidr, mut with_domains, mut patches) =
        (vec![], vec![], vec![], vec![]);
    for _ in 0..args.ops {
        for (body, into) in [
            (base(None), &mut plain),
            (base(Some(cidr.clone())), &mut with_cidr),
            (base(Some(domains.clone())), &mut with_domains),
        ] {
            let (took, id) = spawn_timed(&mut c, body).await?;
            into.push(took);
            c.ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
                .await?;
        }
    }
    let (_, id) = spawn_timed(&mut c, base(Some(cidr.clone()))).await?;
    for i in 0..args.ops {
        let body = if i % 2 == 0 {
            domains.clone()
        } else {
            cidr.clone()
        };
        let t = Instant::now();
        c.ok(Method::PUT, &format!("/sandboxes/{id}/network"), Some(body))
            .await?;
        patches.push(t.elapsed());
    }
    c.ok(Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await?;
    Ok(vec![
        Outcome::sequential("br_spawn", plain),
        Outcome::sequential("cidr_spawn", with_cidr),
        Outcome::sequential("dom_spawn", with_domains),
        Outcome::sequential("net_patch", patches),
    ])
}
