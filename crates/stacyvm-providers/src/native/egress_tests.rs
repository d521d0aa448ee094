//! Per-sandbox egress rules on the native bridge, tried from inside
//! sandboxes against the lab's "outside" (see [`Lab`]): CIDR rules, the
//! tenant's hard denies, runtime changes, and domain rules through the
//! egress proxy (HTTP Host, TLS SNI, names that resolve to blocked
//! addresses, bytes that name nothing), with the denials reported.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use stacyvm_core::egress::{Domain, EgressRules};
use stacyvm_core::paths;
use stacyvm_core::provider::{Provider, SpawnSpec};

use super::isolation_tests::{lab_provider, py, Lab};
use super::tests::fixture;

async fn spawn_with_rules(p: &dyn Provider, rules: Option<EgressRules>) -> String {
    let id = paths::new_sandbox_id();
    let spec = SpawnSpec {
        id: id.clone(),
        image: "host".into(),
        memory_mb: 256,
        vcpus: 1,
        metadata: Default::default(),
        owner_id: String::new(),
        tenant_id: String::new(),
        expires_at: chrono::Utc::now() + chrono::Duration::minutes(5),
        network_mode: "bridge".into(),
        snapshot: None,
        egress: rules,
        volumes: Vec::new(),
    };
    p.spawn(&spec).await.expect("spawn");
    id
}

fn cidrs(l: &[&str]) -> Vec<stacyvm_core::cidr::Cidr> {
    l.iter().map(|c| c.parse().expect("cidr")).collect()
}

/// A DNS server on UDP 53 of `addr` in `ns`: A records for `names`.
fn serve_dns(lab: &mut Lab, ns: &str, addr: &str, names: &[(&str, String)]) {
    let names: Vec<(&str, &str)> = names.iter().map(|(n, ip)| (*n, ip.as_str())).collect();
    lab.spawn_in(ns, &crate::egress::dns::test_server_program(addr, &names));
}

/// Connects to each target in parallel, sends its payload (`http:NAME`:
/// a GET with that Host; `tls:NAME`: a ClientHello with that SNI;
/// `raw:TEXT`; `dns:NAME`: a UDP query) and prints `label=<first line>`,
/// `label=closed` (accepted, then closed with nothing said) or
/// `label=blocked`.
fn probe(targets: &[(&str, String, u16, String)]) -> String {
    let list: Vec<String> = targets
        .iter()
        .map(|(l, h, p, payload)| format!("({l:?}, {h:?}, {p}, {payload:?})"))
        .collect();
    format!(
        "import socket, ssl, struct, threading\nres = {{}}\n\
         def hello(name):\n  i, o = ssl.MemoryBIO(), ssl.MemoryBIO()\n  \
         s = ssl.create_default_context().wrap_bio(i, o, server_hostname=name)\n  \
         try: s.do_handshake()\n  except ssl.SSLWantReadError: pass\n  return o.read()\n\
         def query(name):\n  q = struct.pack('>HHHHHH', 7, 0x100, 1, 0, 0, 0)\n  \
         for l in name.split('.'): q += bytes([len(l)]) + l.encode()\n  return q + b'\\x00\\x00\\x01\\x00\\x01'\n\
         def go(label, host, port, payload):\n  kind, _, arg = payload.partition(':')\n  \
         try:\n    if kind == 'dns':\n      u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)\n      \
         u.sendto(query(arg), (host, port)); u.recvfrom(512); res[label] = 'answered'; return\n    \
         c = socket.create_connection((host, port), timeout=3)\n    \
         data = {{'http': lambda a: ('GET / HTTP/1.1\\r\\nHost: %s\\r\\n\\r\\n' % a).encode(), 'tls': hello, 'raw': lambda a: a.encode()}}[kind](arg)\n    \
         c.sendall(data)\n    line = c.makefile('rb').readline().decode(errors='replace').strip()\n    \
         res[label] = line or 'closed'\n  except OSError: res[label] = 'blocked'\n\
         ts = [threading.Thread(target=go, args=t) for t in [{}]]\n\
         [t.start() for t in ts]; [t.join() for t in ts]\n\
         print(' '.join(f'{{k}}={{v}}' for k, v in sorted(res.items())))",
        list.join(", ")
    )
}

async fn probe_in(
    p: &dyn Provider,
    id: &str,
    targets: &[(&str, String, u16, String)],
) -> BTreeMap<String, String> {
    let r = py(p, id, &probe(targets)).await;
    let got: BTreeMap<String, String> = r
        .stdout
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(got.len(), targets.len(), "{r:?}");
    got
}

fn chains_of_table() -> String {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", crate::egress::TABLE])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// CIDR rules narrow what a sandbox reaches, at spawn and at runtime; a
/// tenant's hard deny beats the sandbox's allow; denied packets are
/// counted per destination; the operator's own limits stay; destroy
/// leaves no chain or set behind. A sandbox without rules next to it is
/// untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cidr_rules_narrow_at_spawn_and_at_runtime() {
    let mut lab = Lab::new();
    let fx = fixture();
    let p: Arc<dyn Provider> = Arc::new(lab_provider(&fx, &lab));
    let n = lab.n;
    let (outside, lan) = (lab.outside_ns.clone(), lab.lan_ns.clone());
    lab.serve(&outside, &[8080]);
    lab.serve(&lan, &[53, 80]);
    std::thread::sleep(Duration::from_millis(500));
    let public = format!("192.88.99.{n}");
    let targets = [
        ("public", public.clone(), 8080, "raw:hi".to_string()),
        (
            "allowed-private",
            format!("192.168.{n}.10"),
            80,
            "raw:hi".into(),
        ),
        ("resolver", format!("172.31.{n}.53"), 53, "raw:hi".into()),
        (
            "metadata",
            "169.254.169.254".to_string(),
            80,
            "raw:hi".into(),
        ),
    ];

    // Deny everything.
    let deny_all = EgressRules {
        deny: cidrs(&["0.0.0.0/0"]),
        ..EgressRules::default()
    };
    let a = spawn_with_rules(p.as_ref(), Some(deny_all)).await;
    let free = spawn_with_rules(p.as_ref(), None).await;
    let got = probe_in(p.as_ref(), &a, &targets).await;
    for (label, _, _, _) in &targets {
        assert_eq!(got[*label], "blocked", "{label}: {got:?}");
    }
    // The neighbour without rules keeps the bridge's defaults.
    let got = probe_in(p.as_ref(), &free, &targets).await;
    assert_eq!(got["public"], format!("10.214.{n}.1"), "{got:?}");
    assert_ne!(got["allowed-private"], "blocked", "{got:?}");
    assert_eq!(got["metadata"], "blocked", "{got:?}");
    let denied = p.egress_denials(&a).await.expect("denials");
    let hit = denied
        .iter()
        .find(|d| d.address == public && d.port == 8080)
        .unwrap_or_else(|| panic!("no denial of {public}:8080 in {denied:?}"));
    assert_eq!(
        (hit.protocol.as_str(), hit.reason.as_str()),
        ("tcp", "cidr")
    );
    assert!(hit.count >= 1 && hit.last_at.is_some(), "{hit:?}");

    // At runtime: allow the public host back; the rest stays denied.
    let allow_one = EgressRules {
        allow: cidrs(&[&format!("{public}/32"), "169.254.169.254/32"]),
        deny: cidrs(&["0.0.0.0/0"]),
        ..EgressRules::default()
    };
    p.set_egress(&a, Some(&allow_one))
        .await
        .expect("set egress");
    let got = probe_in(p.as_ref(), &a, &targets).await;
    assert_eq!(got["public"], format!("10.214.{n}.1"), "{got:?}");
    assert_eq!(got["allowed-private"], "blocked", "{got:?}");
    // A sandbox rule cannot open what the operator blocks.
    assert_eq!(got["metadata"], "blocked", "{got:?}");

    // A tenant's hard deny beats the sandbox's allow.
    let hard = EgressRules {
        enforced: cidrs(&[&format!("{public}/32")]),
        ..allow_one.clone()
    };
    p.set_egress(&a, Some(&hard)).await.expect("set egress");
    let got = probe_in(p.as_ref(), &a, &targets[..1]).await;
    assert_eq!(got["public"], "blocked", "{got:?}");

    // Rules removed: the bridge's defaults again.
    p.set_egress(&a, None).await.expect("clear egress");
    let got = probe_in(p.as_ref(), &a, &targets).await;
    assert_eq!(got["public"], format!("10.214.{n}.1"), "{got:?}");
    assert_ne!(got["allowed-private"], "blocked", "{got:?}");

    // Destroy removes the chains and sets of a sandbox with rules.
    p.set_egress(&a, Some(&allow_one))
        .await
        .expect("set egress");
    let key = crate::egress::Port::new(
        &lab.bridge,
        std::net::Ipv4Addr::UNSPECIFIED,
        std::net::Ipv4Addr::UNSPECIFIED,
        &super::net::host_if_name(&a),
    )
    .key;
    assert!(chains_of_table().contains(&format!("e_{key}")));
    p.destroy(&a).await.expect("destroy");
    p.destroy(&free).await.expect("destroy");
    let left = chains_of_table();
    assert!(!left.contains(&key), "egress rules of {a} left: {left}");
}

/// Domain rules mean the name: the proxy lets through HTTP and TLS whose
/// Host/SNI an allowed domain matches, to the addresses *it* resolves
/// with the sandbox's resolver, and refuses other names, the apex of a
/// wildcard, names resolving to blocked addresses and bytes naming
/// nothing; the sandbox reaches its resolver and nothing else on UDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_rules_go_through_the_proxy_by_name() {
    let mut lab = Lab::new();
    let fx = fixture();
    let p: Arc<dyn Provider> = Arc::new(lab_provider(&fx, &lab));
    let n = lab.n;
    let outside = lab.outside_ns.clone();
    let lan = lab.lan_ns.clone();
    let public = format!("192.88.99.{n}");
    lab.serve(&outside, &[8080]);
    lab.serve(&lan, &[53, 80]);
    serve_dns(
        &mut lab,
        &outside,
        &public,
        &[
            ("allowed.test", public.clone()),
            ("a.b.wild.test", public.clone()),
            ("wild.test", public.clone()),
            ("other.test", public.clone()),
            ("meta.test", "169.254.169.254".into()),
            // An address of the host itself (added below), public-looking.
            ("local.test", format!("192.88.98.{n}")),
        ],
    );
    // The host answers on a public-looking address of its own (removed
    // with the lab's veth): what a name resolving to the host would reach.
    super::isolation_tests::host(&format!("ip addr add 192.88.98.{n}/32 dev svmto{n}"));
    let host_app = std::net::TcpListener::bind(format!("192.88.98.{n}:8080")).expect("host app");
    std::thread::sleep(Duration::from_millis(700));
    let rules = EgressRules {
        domains: ["allowed.test", "*.wild.test", "meta.test", "local.test"]
            .iter()
            .map(|d| Domain::parse(d).expect("domain"))
            .collect(),
        deny: cidrs(&["0.0.0.0/0"]),
        dns: Some(vec![public.parse().expect("ip")]),
        ..EgressRules::default()
    };
    let a = spawn_with_rules(p.as_ref(), Some(rules)).await;
    let denied_public = format!("192.88.99.{}", n + 1);
    let via = format!("10.214.{n}.1");
    let targets = [
        (
            "http-allowed",
            public.clone(),
            8080,
            "http:allowed.test".to_string(),
        ),
        // The address the sandbox dials does not matter: the name does.
        (
            "http-allowed-elsewhere",
            denied_public.clone(),
            8080,
            "http:allowed.test".into(),
        ),
        (
            "tls-wildcard",
            public.clone(),
            8080,
            "tls:a.b.wild.test".into(),
        ),
        ("tls-apex", public.clone(), 8080, "tls:wild.test".into()),
        ("http-other", public.clone(), 8080, "http:other.test".into()),
        (
            "http-metadata-name",
            public.clone(),
            8080,
            "http:meta.test".into(),
        ),
        (
            "nameless",
            public.clone(),
            8080,
            "raw:SSH-2.0-probe\r\n".into(),
        ),
        (
            "http-host-name",
            public.clone(),
            8080,
            "http:local.test".into(),
        ),
        ("dns-own", public.clone(), 53, "dns:allowed.test".into()),
        (
            "dns-host",
            format!("172.31.{n}.53"),
            53,
            "dns:allowed.test".into(),
        ),
    ];
    let got = probe_in(p.as_ref(), &a, &targets).await;
    assert_eq!(got["http-allowed"], via, "{got:?}");
    assert_eq!(got["http-allowed-elsewhere"], via, "{got:?}");
    assert_eq!(got["tls-wildcard"], via, "{got:?}");
    for refused in [
        "tls-apex",
        "http-other",
        "http-metadata-name",
        "nameless",
        "http-host-name",
    ] {
        assert_eq!(got[refused], "closed", "{refused}: {got:?}");
    }
    assert_eq!(got["dns-own"], "answered", "{got:?}");
    assert_eq!(got["dns-host"], "blocked", "{got:?}");

    let denied = p.egress_denials(&a).await.expect("denials");
    let reason_of = |host: &str| {
        denied
            .iter()
            .find(|d| d.host == host)
            .map(|d| d.reason.clone())
            .unwrap_or_default()
    };
    assert_eq!(reason_of("wild.test"), "domain", "{denied:?}");
    assert_eq!(reason_of("other.test"), "domain", "{denied:?}");
    assert_eq!(reason_of("meta.test"), "resolved_blocked", "{denied:?}");
    // The host's own addresses are never dialed for a sandbox, public or not.
    assert_eq!(reason_of("local.test"), "resolved_blocked", "{denied:?}");
    host_app.set_nonblocking(true).expect("nonblocking");
    assert!(
        host_app.accept().is_err(),
        "the proxy connected to the host"
    );
    assert!(
        denied
            .iter()
            .any(|d| d.reason == "no_name" && d.port == 8080),
        "{denied:?}"
    );
    assert!(
        denied.iter().any(|d| d.reason == "cidr"
            && d.address == format!("172.31.{n}.53")
            && d.protocol == "udp"),
        "{denied:?}"
    );

    // A sandbox cannot pile up connections in the proxy: past 256 open at
    // once (none naming a host yet), new ones are closed at once.
    let flood = format!(
        "import socket, time\n\
         held = []\n\
         for i in range(270):\n  held.append(socket.create_connection(({public:?}, 8080), timeout=3))\n\
         time.sleep(1)\n\
         closed = 0\n\
         for c in held:\n  c.setblocking(False)\n  \
         try:\n    closed += c.recv(1) == b''\n  \
         except BlockingIOError: pass\n  \
         except OSError: closed += 1\n\
         print(closed)"
    );
    let r = py(p.as_ref(), &a, &flood).await;
    let closed: usize = r.stdout.trim().parse().unwrap_or_else(|_| panic!("{r:?}"));
    assert!(
        (14..=20).contains(&closed),
        "270 held, 256 allowed: {closed} closed: {r:?}"
    );
    let denied = p.egress_denials(&a).await.expect("denials");
    assert!(
        denied.iter().any(|d| d.reason == "too_many_connections"),
        "{denied:?}"
    );

    // Without domain rules the proxy no longer serves the sandbox.
    let cidr_only = EgressRules {
        deny: cidrs(&["0.0.0.0/0"]),
        ..EgressRules::default()
    };
    p.set_egress(&a, Some(&cidr_only))
        .await
        .expect("set egress");
    let got = probe_in(p.as_ref(), &a, &targets[..1]).await;
    assert_eq!(got["http-allowed"], "blocked", "{got:?}");
    p.destroy(&a).await.expect("destroy");
}
