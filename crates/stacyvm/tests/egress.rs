//! Egress policies through the real binary on the native provider, on a
//! bridge of the test's own: bad policies are 400s naming the field, a
//! policy is enforced from the spawn and its denials reach the owner,
//! `PATCH` merges and `PUT` replaces at runtime, server-wide `egress`
//! allowlists and a template's `allowed_hosts` bound what a sandbox may
//! allow (403 beyond), deny rules take no domain.
//!
//! (What the rules let through and what not, with real targets, is tested
//! in the providers' crate against network namespaces of its own; here no
//! packet leaves the host: the only target is a private address.)

mod common;

use serde_json::{json, Value};

/// The test's bridge, its firewall tables and leases, removed on drop
/// (after the server, which is declared later and so dropped first).
struct BridgeGuard(String);

impl Drop for BridgeGuard {
    fn drop(&mut self) {
        let b = &self.0;
        let sh = |cmd: String| {
            let _ = std::process::Command::new("sh").args(["-c", &cmd]).output();
        };
        sh(format!(
            "ip link del {b}; nft delete table inet stacyvm_{b}; nft delete table bridge stacyvm_{b}; rm -rf /run/stacyvm/net/{b}"
        ));
        for spec in [
            format!("-o {b} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment stacyvm:{b} -j ACCEPT"),
            format!("-i {b} ! -o {b} -m comment --comment stacyvm:{b} -j ACCEPT"),
        ] {
            sh(format!("for i in 1 2 3; do iptables -w -D FORWARD {spec} || break; done"));
        }
    }
}

async fn patch(api: &common::Api, path: &str, body: Value) -> (u16, Value) {
    api.call(reqwest::Method::PATCH, path, body).await
}

async fn put(api: &common::Api, path: &str, body: Value) -> (u16, Value) {
    api.call(reqwest::Method::PUT, path, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policies_through_the_api() {
    let n = std::process::id() % 200 + 20;
    let bridge = format!("svmapi{n}");
    let _guard = BridgeGuard(bridge.clone());
    let dir = tempfile::tempdir().expect("dir");
    let subnet = format!("10.91.{n}.0/24");
    // A low soft limit on open files, as systemd gives (the server inherits
    // it and must raise it).
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(hard > 1024, "hard limit {hard}");
    setrlimit(Resource::RLIMIT_NOFILE, 1024, hard).expect("setrlimit");
    let server = common::Server::start(
        dir.path(),
        &[
            ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
            ("STACYVM_PROVIDERS_NATIVE_BRIDGE_NAME", &bridge),
            ("STACYVM_PROVIDERS_NATIVE_BRIDGE_SUBNET", &subnet),
        ],
    );
    let api = common::Api::new(&server);

    // Each relayed connection holds descriptors: the server runs with its
    // open-files soft limit raised to the hard one.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid())).expect("limits");
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line")
        .split_whitespace()
        .collect();
    assert_eq!(files[3], files[4], "soft = hard: {limits}");
    assert_eq!(files[3], hard.to_string(), "{limits}");

    // Bad policies: a 400 naming what is wrong; nothing spawned.
    let many: Vec<String> = (0..300)
        .map(|i| format!("1.1.{}.{}", i / 256, i % 256))
        .collect();
    for (body, needle) in [
        (json!({"allow_out": ["not a host!"]}), "network.allow_out"),
        (json!({"deny_out": ["evil.example"]}), "network.deny_out"),
        (json!({"allow_out": ["fd00::/8"]}), "IPv6"),
        (json!({"allow_out": ["10.0.0.1/8"]}), "host bits"),
        (json!({"allow_out": ["*"]}), "network.allow_out"),
        (
            json!({"dns_servers": ["dns.google"]}),
            "network.dns_servers",
        ),
        (json!({"allow_out": many}), "at most"),
        (json!({"allow_out": 5}), ""),
    ] {
        let (s, v) = api
            .post(
                "/sandboxes",
                json!({"network_mode": "bridge", "network": body}),
            )
            .await;
        assert_eq!(s, 400, "{body}: {v}");
        assert!(v.to_string().contains(needle), "{body}: {v}");
    }
    let (_, list) = api.get("/sandboxes").await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    // Deny everything: enforced from the spawn, denials shown.
    let sb = api
        .spawn(json!({"network_mode": "bridge", "network": {"deny_all": true}}))
        .await;
    assert_eq!(sb["network"], json!({"deny_out": ["0.0.0.0/0"]}), "{sb}");
    let id = sb["id"].as_str().expect("id").to_string();
    let r = api
        .exec(
            &id,
            "python3 -c \"import socket\ntry: socket.create_connection(('10.255.255.1', 80), timeout=1)\nexcept OSError: print('refused')\"",
        )
        .await;
    assert_eq!(r["stdout"], "refused\n", "{r}");
    let path = format!("/sandboxes/{id}/network");
    let (s, net) = api.get(&path).await;
    assert_eq!(s, 200, "{net}");
    assert_eq!(net["network_mode"], "bridge", "{net}");
    assert_eq!(net["policy"]["deny_out"], json!(["0.0.0.0/0"]), "{net}");
    let denied = net["denied"].as_array().expect("denied");
    assert!(
        denied.iter().any(|d| d["address"] == "10.255.255.1"
            && d["port"] == 80
            && d["protocol"] == "tcp"
            && d["reason"] == "cidr"
            && d["count"].as_u64() >= Some(1)),
        "{net}"
    );

    // PATCH merges; a bad one changes nothing.
    let (s, net) = patch(
        &api,
        &path,
        json!({"allow_out": ["1.1.1.1", "*.Example.com"]}),
    )
    .await;
    assert_eq!(s, 200, "{net}");
    assert_eq!(
        net["policy"],
        json!({"allow_out": ["1.1.1.1/32", "*.example.com"], "deny_out": ["0.0.0.0/0"]}),
        "{net}"
    );
    let (s, v) = patch(&api, &path, json!({"deny_out": ["bad name"]})).await;
    assert_eq!(s, 400, "{v}");
    let (_, sbv) = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(sbv["network"], net["policy"], "{sbv}");
    // PUT replaces; an empty policy is none.
    let (s, net) = put(&api, &path, json!({"deny_out": ["10.0.0.0/8"]})).await;
    assert_eq!(
        (s, &net["policy"]),
        (200, &json!({"deny_out": ["10.0.0.0/8"]})),
        "{net}"
    );
    let (s, net) = put(&api, &path, json!({})).await;
    assert_eq!(s, 200, "{net}");
    assert!(
        net.get("policy").is_none() && net.get("effective").is_none(),
        "{net}"
    );
    let (_, sbv) = api.get(&format!("/sandboxes/{id}")).await;
    assert!(sbv.get("network").is_none(), "{sbv}");
    let (s, v) = api.get("/sandboxes/sb-00000000/network").await;
    assert_eq!(s, 404, "{v}");

    // A server-wide egress allowlist bounds every policy.
    let (s, v) = api
        .post(
            "/admin/policies",
            json!({"resource_type": "egress", "effect": "deny", "pattern": "evil.example"}),
        )
        .await;
    assert_eq!(s, 400, "a deny rule takes no domain: {v}");
    let (s, pol) = api
        .post(
            "/admin/policies",
            json!({"resource_type": "egress", "effect": "allow", "pattern": "*.example.com"}),
        )
        .await;
    assert!(s == 200 || s == 201, "{pol}");
    let pol_id = pol["policy"]["id"].as_str().expect("policy id").to_string();
    let (s, v) = api
        .post(
            "/sandboxes",
            json!({"network_mode": "bridge", "network": {"allow_out": ["pypi.org"]}}),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    assert!(v.to_string().contains("pypi.org"), "{v}");
    let (s, v) = patch(&api, &path, json!({"allow_out": ["pypi.org"]})).await;
    assert_eq!(s, 403, "{v}");
    let sb2 = api.spawn(json!({"network_mode": "bridge"})).await;
    let id2 = sb2["id"].as_str().expect("id").to_string();
    let (_, net2) = api.get(&format!("/sandboxes/{id2}/network")).await;
    assert_eq!(
        net2["effective"],
        json!({"allow_out": ["*.example.com"], "deny_out": ["0.0.0.0/0"]}),
        "no policy of its own: the allowlist and nothing else: {net2}"
    );
    let (s, v) = api.delete(&format!("/admin/policies/{pol_id}")).await;
    assert!(s == 200 || s == 204, "{v}");

    // A template's allowed_hosts: the sandbox's allowlist.
    let (s, v) = api
        .post(
            "/templates",
            json!({"name": "bad-hosts", "image": "host", "allowed_hosts": ["no such thing!"]}),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = api
        .post(
            "/templates",
            json!({"name": "pkgs", "image": "host", "allowed_hosts": ["pypi.org", "files.pythonhosted.org"]}),
        )
        .await;
    assert!(s == 200 || s == 201, "{v}");
    let (s, v) = api
        .post(
            "/sandboxes",
            json!({"template": "pkgs", "network_mode": "bridge", "network": {"allow_out": ["evil.example"]}}),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    let sb3 = api
        .spawn(json!({"template": "pkgs", "network_mode": "bridge", "network": {"allow_out": ["pypi.org"]}}))
        .await;
    let id3 = sb3["id"].as_str().expect("id").to_string();
    let (_, net3) = api.get(&format!("/sandboxes/{id3}/network")).await;
    assert_eq!(
        net3["effective"],
        json!({"allow_out": ["pypi.org"], "deny_out": ["0.0.0.0/0"]}),
        "{net3}"
    );
    // The bound holds for later changes too.
    let (s, v) = patch(
        &api,
        &format!("/sandboxes/{id3}/network"),
        json!({"allow_out": ["evil.example"]}),
    )
    .await;
    assert_eq!(s, 403, "{v}");

    // The CLI: a policy at spawn, shown, replaced, cleared; a bad one is
    // refused with the server's reason.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_stacyvm"))
            .args(args)
            .env("STACYVM_URL", server.url.trim_end_matches("/api/v1"))
            .output()
            .expect("run the cli");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&[
        "spawn",
        "--network",
        "bridge",
        "--deny-all",
        "--allow-out",
        "1.1.1.1",
        "--json",
    ]);
    assert!(ok, "{err}");
    let sb4: Value = serde_json::from_str(&out).expect("spawn json");
    assert_eq!(
        sb4["network"],
        json!({"allow_out": ["1.1.1.1/32"], "deny_out": ["0.0.0.0/0"]}),
        "{sb4}"
    );
    let id4 = sb4["id"].as_str().expect("id").to_string();
    let (ok, out, err) = cli(&["network", &id4]);
    assert!(ok, "{err}");
    assert!(
        out.contains("allow out:    1.1.1.1/32") && out.contains("deny out:     0.0.0.0/0"),
        "{out}"
    );
    let (ok, out, err) = cli(&["network", &id4, "--deny-out", "10.0.0.0/8"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("allow out:    -") && out.contains("deny out:     10.0.0.0/8"),
        "{out}"
    );
    let (ok, _, err) = cli(&["network", &id4, "--deny-out", "evil.example"]);
    assert!(!ok && err.contains("deny_out"), "{err}");
    let (ok, out, err) = cli(&["network", &id4, "--clear"]);
    assert!(ok, "{err}");
    assert!(out.contains("policy:       none"), "{out}");

    for id in [&id, &id2, &id3, &id4] {
        let (s, v) = api.delete(&format!("/sandboxes/{id}")).await;
        assert_eq!(s, 200, "{v}");
    }
    drop(server);
}

/// After a restart the rules of a sandbox with domain rules point at the
/// new server's egress proxy (the old one's port died with it): they are
/// re-applied when the sandbox is adopted, and its policy is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_rules_follow_the_proxy_across_a_restart() {
    let n = (std::process::id() + 97) % 200 + 20;
    let bridge = format!("svmapr{n}");
    let _guard = BridgeGuard(bridge.clone());
    let dir = tempfile::tempdir().expect("dir");
    let subnet = format!("10.92.{n}.0/24");
    let gateway = format!("10.92.{n}.1");
    let env = [
        ("STACYVM_PROVIDERS_NATIVE_WARM_POOL", "0"),
        ("STACYVM_PROVIDERS_NATIVE_BRIDGE_NAME", bridge.as_str()),
        ("STACYVM_PROVIDERS_NATIVE_BRIDGE_SUBNET", subnet.as_str()),
    ];
    let server = common::Server::start(dir.path(), &env);
    let api = common::Api::new(&server);
    let sb = api
        .spawn(json!({"network_mode": "bridge", "network": {"allow_out": ["example.com"], "deny_all": true}}))
        .await;
    let id = sb["id"].as_str().expect("id").to_string();
    let r = api.exec(&id, "ip -4 -o addr show dev eth0").await;
    let ip = r["stdout"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .unwrap_or_default()
        .to_string();
    assert!(ip.starts_with(&format!("10.92.{n}.")), "{r}");
    // The port the sandbox's denied TCP is redirected to, from the kernel.
    let redirect_port = || -> Option<u16> {
        let sh = |cmd: &str| {
            String::from_utf8_lossy(
                &std::process::Command::new("sh")
                    .args(["-c", cmd])
                    .output()
                    .expect("sh")
                    .stdout,
            )
            .into_owned()
        };
        let map = sh("nft list map inet stacyvm_egress sb_nat");
        let key = format!("\"{bridge}\" . {ip} : jump ");
        let chain = map
            .split(&key)
            .nth(1)?
            .split(|c: char| c == ',' || c.is_whitespace())
            .next()?
            .to_string();
        let rules = sh(&format!("nft list chain inet stacyvm_egress {chain}"));
        rules
            .split("redirect to :")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let listening = |port: u16| std::net::TcpStream::connect((gateway.as_str(), port)).is_ok();
    let first = redirect_port().expect("a redirect to the proxy");
    assert!(listening(first), "the proxy listens on {gateway}:{first}");

    drop(server);
    assert!(!listening(first), "the old proxy is gone with its server");
    let server = common::Server::start(dir.path(), &env);
    let api = common::Api::new(&server);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let now = loop {
        if let Some(p) = redirect_port().filter(|p| *p != first && listening(*p)) {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rules still point at {first}: {:?}",
            redirect_port()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(listening(now));
    let (s, net) = api.get(&format!("/sandboxes/{id}/network")).await;
    assert_eq!(s, 200, "{net}");
    assert_eq!(
        net["policy"],
        json!({"allow_out": ["example.com"], "deny_out": ["0.0.0.0/0"]}),
        "{net}"
    );
    let (s, v) = api.delete(&format!("/sandboxes/{id}")).await;
    assert_eq!(s, 200, "{v}");
    drop(server);
}
