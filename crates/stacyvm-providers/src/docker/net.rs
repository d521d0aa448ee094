//! The sandbox network behind `network_mode: bridge`: a Docker bridge
//! network of StacyVM's own (`providers.docker.bridge_network`, created on
//! demand) where sandboxes reach the public internet and nothing else.
//!
//! - inter-container communication is off
//!   (`com.docker.network.bridge.enable_icc=false`): Docker drops traffic
//!   between two containers of the network;
//! - IPv6 is off: the network has no IPv6 and every container sets
//!   `net.ipv6.conf.{all,default}.disable_ipv6=1`, so there is no IPv6
//!   address (not even link-local) to talk from;
//! - egress filter (IPv4): rules in Docker's `DOCKER-USER` chain, scoped to
//!   the network's bridge interface, drop forwarding to cloud metadata and
//!   link-local (169.254/16), RFC 1918, CGNAT (100.64/10), loopback,
//!   multicast, reserved and documentation ranges; traffic to the host
//!   itself (any of its addresses) is dropped in `INPUT`, except replies to
//!   connections the host opened. Nothing is inserted ahead of Docker's own
//!   chains in `FORWARD`: only `DOCKER-USER`, which Docker evaluates first
//!   by design, and `INPUT`, where Docker has none.
//!
//! Every rule carries the comment `stacyvm:<network>`, so it can be found
//! and removed ([`remove_rules`]).

use std::collections::HashMap;
use std::process::Command;

use sha2::{Digest, Sha256};
use stacyvm_core::{Error, Result};

/// Destinations no `bridge` sandbox may reach unless allowed: one list
/// for every provider.
pub use stacyvm_core::cidr::BLOCKED_EGRESS_V4 as BLOCKED_V4;

/// Docker's option naming the bridge interface of a network.
pub const OPT_BRIDGE_NAME: &str = "com.docker.network.bridge.name";
/// Docker's option switching inter-container communication.
pub const OPT_ICC: &str = "com.docker.network.bridge.enable_icc";

/// The bridge interface of a StacyVM network: `svm` + 8 hex digits of the
/// network name's hash (interface names have at most 15 bytes).
pub fn bridge_name(network: &str) -> String {
    let d = Sha256::digest(network.as_bytes());
    format!("svm{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3])
}

/// The driver options of a new sandbox network.
pub fn network_options(network: &str) -> HashMap<String, String> {
    HashMap::from([
        (OPT_ICC.to_string(), "false".to_string()),
        (OPT_BRIDGE_NAME.to_string(), bridge_name(network)),
        (
            "com.docker.network.bridge.enable_ip_masquerade".to_string(),
            "true".to_string(),
        ),
    ])
}

/// Checks an existing network's options: it must be a bridge with
/// inter-container communication off and a named interface. Returns the
/// interface name.
pub fn check_existing(
    network: &str,
    driver: Option<&str>,
    ipv6: Option<bool>,
    options: &HashMap<String, String>,
) -> Result<String> {
    let ok = driver == Some("bridge")
        && ipv6 != Some(true)
        && options.get(OPT_ICC).map(String::as_str) == Some("false");
    match options.get(OPT_BRIDGE_NAME) {
        Some(br) if ok && !br.is_empty() => Ok(br.clone()),
        _ => Err(Error::unavailable(format!(
            "docker network {network:?} (providers.docker.bridge_network) exists but is not a StacyVM sandbox network (it needs the bridge driver, {OPT_ICC}=false, a {OPT_BRIDGE_NAME} and no IPv6); remove it with `docker network rm {network}` and StacyVM creates it"
        ))),
    }
}

/// The iptables rules of a network, as argument lists after `-I CHAIN`/`-D CHAIN`
/// (chain first). Order matters for `INPUT`: the ACCEPT of replies comes first.
///
/// `gateway`: the network's own address, where the egress proxy listens;
/// connections redirected there (sandboxes with domain rules) are
/// accepted, and no other redirected connection (none: not even those).
///
/// `allow`: IPv4 CIDRs reachable despite [`BLOCKED_V4`] (returned to
/// Docker's own chains before the drops); `dns`: resolvers reachable on
/// port 53 only (the engine's embedded DNS forwards from the sandbox's
/// network namespace to the host's resolvers, often private addresses).
pub fn rules(
    network: &str,
    bridge: &str,
    gateway: Option<&str>,
    allow: &[String],
    dns: &[String],
) -> Vec<Vec<String>> {
    let comment = format!("stacyvm:{network}");
    let mut out = Vec::new();
    let rule = |chain: &str, extra: &[&str], target: &str| -> Vec<String> {
        let mut r = vec![chain.to_string(), "-i".into(), bridge.to_string()];
        r.extend(extra.iter().map(|s| (*s).to_string()));
        r.extend([
            "-m".into(),
            "comment".into(),
            "--comment".into(),
            comment.clone(),
            "-j".into(),
            target.to_string(),
        ]);
        r
    };
    for ns in dns {
        for proto in ["udp", "tcp"] {
            out.push(rule(
                "DOCKER-USER",
                &["-d", ns.as_str(), "-p", proto, "--dport", "53"],
                "RETURN",
            ));
        }
    }
    for cidr in allow {
        out.push(rule("DOCKER-USER", &["-d", cidr.as_str()], "RETURN"));
    }
    for cidr in BLOCKED_V4 {
        out.push(rule("DOCKER-USER", &["-d", cidr], "DROP"));
    }
    out.push(rule(
        "INPUT",
        &["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED"],
        "ACCEPT",
    ));
    // Connections redirected to the egress proxy on the gateway (sandboxes
    // with domain rules; see `crate::egress`); a redirect anywhere else
    // (kube-proxy's service addresses, an operator's own) stays dropped.
    if let Some(gw) = gateway {
        out.push(rule(
            "INPUT",
            &[
                "-d",
                gw,
                "-p",
                "tcp",
                "-m",
                "conntrack",
                "--ctstate",
                "DNAT",
            ],
            "ACCEPT",
        ));
    }
    out.push(rule("INPUT", &[], "DROP"));
    out
}

fn iptables(args: &[String]) -> std::io::Result<std::process::Output> {
    Command::new("iptables").arg("-w").args(args).output()
}

/// Installs the rules of a network unless present (idempotent; rules
/// vanish with a host reboot or an iptables flush, so this runs once per
/// provider start).
/// The host's reachable IPv4 resolvers (from /etc/resolv.conf).
pub fn host_resolvers() -> Vec<String> {
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|t| crate::native::net::nameservers(&t).0)
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect()
}

pub fn install_rules(
    network: &str,
    bridge: &str,
    gateway: Option<&str>,
    allow: &[String],
    dns: &[String],
) -> Result<()> {
    // Inserted at position 1 in reverse order, so the list's order holds.
    for r in rules(network, bridge, gateway, allow, dns).iter().rev() {
        let (chain, spec) = r
            .split_first()
            .ok_or_else(|| Error::internal("empty rule"))?;
        let mut check = vec!["-C".to_string(), chain.clone()];
        check.extend(spec.iter().cloned());
        if iptables(&check).is_ok_and(|o| o.status.success()) {
            continue;
        }
        let mut insert = vec!["-I".to_string(), chain.clone(), "1".into()];
        insert.extend(spec.iter().cloned());
        let out = iptables(&insert).map_err(|e| {
            Error::unavailable("running iptables for the sandbox network (is it installed?)")
                .with_source(e)
        })?;
        if !out.status.success() {
            return Err(Error::unavailable(format!(
                "installing the sandbox network's egress filter failed: iptables {}: {}",
                insert.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// Removes every rule of a network (all copies).
pub fn remove_rules(network: &str, bridge: &str, allow: &[String], dns: &[String]) {
    // The proxy accept names the gateway: found by its comment (and any
    // of an earlier version without it).
    let comment = format!("stacyvm:{network}");
    if let Ok(out) = iptables(&["-S".to_string(), "INPUT".to_string()]) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // (`-S` quotes the comment.)
            let words: Vec<&str> = line
                .split_whitespace()
                .map(|w| w.trim_matches('"'))
                .collect();
            if words.first() == Some(&"-A")
                && words.contains(&comment.as_str())
                && words.contains(&"DNAT")
            {
                let mut del: Vec<String> = words.iter().map(|w| (*w).to_string()).collect();
                del[0] = "-D".into();
                let _ = iptables(&del);
            }
        }
    }
    for r in rules(network, bridge, None, allow, dns) {
        let Some((chain, spec)) = r.split_first() else {
            continue;
        };
        let mut del = vec!["-D".to_string(), chain.clone()];
        del.extend(spec.iter().cloned());
        // Bounded: a rule inserted twice by a race is deleted twice.
        for _ in 0..8 {
            if !iptables(&del).is_ok_and(|o| o.status.success()) {
                break;
            }
        }
    }
}

/// Container sysctls that leave a sandbox without IPv6.
pub fn no_ipv6_sysctls() -> HashMap<String, String> {
    HashMap::from([
        (
            "net.ipv6.conf.all.disable_ipv6".to_string(),
            "1".to_string(),
        ),
        (
            "net.ipv6.conf.default.disable_ipv6".to_string(),
            "1".to_string(),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_ranges_return_before_the_drops() {
        let br = bridge_name("stacyvm-bridge");
        let rs = rules(
            "stacyvm-bridge",
            &br,
            None,
            &["203.0.113.80/32".to_string()],
            &["10.255.255.53".to_string()],
        );
        let pos = |target: &str, d: &str| {
            rs.iter()
                .position(|r| r.contains(&d.to_string()) && r.last() == Some(&target.to_string()))
                .unwrap_or_else(|| panic!("no {target} for {d}: {rs:?}"))
        };
        assert!(pos("RETURN", "203.0.113.80/32") < pos("DROP", "203.0.113.0/24"));
        assert!(pos("RETURN", "10.255.255.53") < pos("DROP", "10.0.0.0/8"));
        let dns: Vec<_> = rs
            .iter()
            .filter(|r| r.contains(&"10.255.255.53".to_string()))
            .collect();
        assert_eq!(dns.len(), 2, "udp and tcp");
        assert!(
            dns.iter().all(|r| r.contains(&"53".to_string())),
            "port 53 only"
        );
        assert_eq!(rs.len(), BLOCKED_V4.len() + 5);
    }

    #[test]
    fn rules_are_scoped_to_the_bridge_and_marked() {
        let br = bridge_name("stacyvm-bridge");
        assert!(br.len() <= 15 && br.starts_with("svm"), "{br}");
        assert_eq!(br, bridge_name("stacyvm-bridge"), "deterministic");
        assert_ne!(br, bridge_name("other"));
        assert_eq!(
            rules("stacyvm-bridge", &br, None, &[], &[]).len(),
            BLOCKED_V4.len() + 2,
            "no gateway known: no redirect accepted"
        );
        let rs = rules("stacyvm-bridge", &br, Some("172.30.0.1"), &[], &[]);
        assert_eq!(rs.len(), BLOCKED_V4.len() + 3);
        for r in &rs {
            assert!(
                r[0] == "DOCKER-USER" || r[0] == "INPUT",
                "only DOCKER-USER and INPUT: {r:?}"
            );
            assert_eq!(&r[1..3], ["-i".to_string(), br.clone()]);
            assert!(r.contains(&"stacyvm:stacyvm-bridge".to_string()));
        }
        for must in [
            "169.254.0.0/16",
            "10.0.0.0/8",
            "100.64.0.0/10",
            "127.0.0.0/8",
        ] {
            assert!(rs.iter().any(|r| r.contains(&must.to_string())), "{must}");
        }
        let input: Vec<_> = rs.iter().filter(|r| r[0] == "INPUT").collect();
        assert!(input[0].contains(&"ACCEPT".to_string()), "replies first");
        assert!(
            input[1].contains(&"DNAT".to_string())
                && input[1].contains(&"tcp".to_string())
                && input[1].contains(&"172.30.0.1".to_string()),
            "then connections redirected to the egress proxy on the gateway"
        );
        assert!(input[2].contains(&"DROP".to_string()));
    }

    #[test]
    fn existing_networks_must_be_ours() {
        let good = network_options("n");
        assert_eq!(
            check_existing("n", Some("bridge"), Some(false), &good).expect("ok"),
            bridge_name("n")
        );
        let mut icc = good.clone();
        icc.insert(OPT_ICC.into(), "true".into());
        assert!(check_existing("n", Some("bridge"), None, &icc).is_err());
        assert!(check_existing("n", Some("bridge"), Some(true), &good).is_err());
        assert!(check_existing("n", Some("overlay"), None, &good).is_err());
        assert!(check_existing("n", Some("bridge"), None, &HashMap::new()).is_err());
    }
}
