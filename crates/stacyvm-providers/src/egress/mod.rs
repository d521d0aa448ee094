//! Per-sandbox egress rules on a host bridge (native and microVM sandboxes
//! on the native bridge, Docker containers on StacyVM's Docker network).
//!
//! One nftables table, `inet stacyvm_egress`, shared by every bridge and
//! server on the host and never dropped as a whole:
//! - map `sb_out` (`bridge . source address : jump e_<key>`), looked up
//!   from a `forward` chain at priority filter − 5, for every packet a
//!   sandbox sends, so a changed policy applies at once, to connections
//!   already open as well;
//! - map `sb_nat` (same key : `jump n_<key>`), from a `prerouting` nat
//!   chain at priority dstnat − 5, for sandboxes with domain rules: their
//!   new TCP connections to denied addresses are redirected to the egress
//!   proxy ([`proxy`]) on the bridge's own address;
//! - per sandbox, chains `e_<key>`/`n_<key>` and sets `s_<key>_hard`
//!   (tenant denies), `<key>_allow`, `<key>_deny`, `<key>_dns` and
//!   `s_<key>_log`, a dynamic set with counters of denied destinations
//!   (address, protocol, port), kept an hour.
//!
//! These rules only narrow: the bridge's own table (the operator's
//! blocked ranges and `egress_deny`) still judges what they let through,
//! and the proxy applies the same limits to the addresses it dials.
//! A sandbox cannot forge its source address: native sandboxes hold no
//! `CAP_NET_ADMIN`, VM taps are pinned to their address, Docker drops the
//! capability.

pub mod dns;
pub mod proxy;
pub mod sniff;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::sync::Arc;

use stacyvm_api::EgressDenial;
use stacyvm_core::cidr::{Cidr, BLOCKED_EGRESS_V4};
use stacyvm_core::egress::EgressRules;
use stacyvm_core::{Error, Result};

/// The shared table.
pub const TABLE: &str = "stacyvm_egress";

/// Where a sandbox sits on a bridge.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Port {
    /// The bridge interface its traffic arrives on.
    pub iface: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The bridge's own address (where the proxy listens and dials from).
    pub gateway: Ipv4Addr,
    /// Names its chains and sets: 10 hex digits of its id's hash.
    pub key: String,
}

impl Port {
    pub fn new(iface: &str, ip: Ipv4Addr, gateway: Ipv4Addr, sandbox_id: &str) -> Port {
        use sha2::Digest;
        let h = sha2::Sha256::digest(sandbox_id.as_bytes());
        Port {
            iface: iface.to_string(),
            ip,
            gateway,
            key: hex::encode(&h[..5]),
        }
    }
}

/// The operator's limits, which the proxy applies to the addresses it
/// dials (the kernel applies them to forwarded traffic).
#[derive(Debug, Clone, Default)]
pub struct Operator {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    /// The host's resolvers: what sandboxes query when their policy names
    /// none.
    pub resolvers: Vec<Ipv4Addr>,
    /// The sandboxes' own network (the bridge subnet): never reachable
    /// through the proxy, whatever `allow` says (the kernel drops traffic
    /// between sandboxes; the proxy must not relay it).
    pub sandbox_net: Vec<Cidr>,
}

/// Whether `ip` is one of this host's own addresses (on any interface):
/// traffic the proxy sent there would be local, past every filter of the
/// bridge. Unknown (the interface list unreadable) counts as local.
pub fn is_local(ip: Ipv4Addr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs.into_iter().any(|a| {
            a.address
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .is_some_and(|sin| sin.ip() == ip)
        }),
        Err(_) => true,
    }
}

impl Operator {
    /// Whether the operator lets a sandbox reach `ip` through the proxy.
    /// The host itself and the sandboxes' network never: the proxy's own
    /// connections leave from the host, where the bridge's filters do not
    /// apply.
    pub fn permits(&self, ip: Ipv4Addr) -> bool {
        if is_local(ip) {
            return false;
        }
        let ip = IpAddr::V4(ip);
        if self
            .deny
            .iter()
            .chain(&self.sandbox_net)
            .any(|c| c.contains(ip))
        {
            return false;
        }
        self.allow.iter().any(|c| c.contains(ip))
            || !BLOCKED_EGRESS_V4
                .iter()
                .filter_map(|c| c.parse::<Cidr>().ok())
                .any(|c| c.contains(ip))
    }
}

fn set(name: &str, elements: &[String], extra: &str) -> String {
    let mut s = format!(
        "add set inet {TABLE} {name} {{ type ipv4_addr; flags interval; auto-merge; {extra}}}\n\
         flush set inet {TABLE} {name}\n"
    );
    if !elements.is_empty() {
        s.push_str(&format!(
            "add element inet {TABLE} {name} {{ {} }}\n",
            elements.join(", ")
        ));
    }
    s
}

/// The table's fixed part, idempotent (every apply carries it).
fn base() -> String {
    format!(
        "add table inet {TABLE}\n\
         add map inet {TABLE} sb_out {{ type ifname . ipv4_addr : verdict; }}\n\
         add map inet {TABLE} sb_nat {{ type ifname . ipv4_addr : verdict; }}\n\
         add chain inet {TABLE} forward {{ type filter hook forward priority filter - 5; policy accept; }}\n\
         flush chain inet {TABLE} forward\n\
         add rule inet {TABLE} forward iifname . ip saddr vmap @sb_out\n\
         add chain inet {TABLE} prerouting {{ type nat hook prerouting priority dstnat - 5; policy accept; }}\n\
         flush chain inet {TABLE} prerouting\n\
         add rule inet {TABLE} prerouting iifname . ip saddr vmap @sb_nat\n"
    )
}

/// The transaction that puts `rules` in force for `port` (`proxy`: the
/// egress proxy's port on the gateway, when the rules have domains).
///
/// `fresh`: the sandbox's chains may not exist yet (its first rules in
/// this process), so they and the table's fixed part are declared too.
/// Declaring a chain costs a kernel commit of ~16 ms here; a change of an
/// existing sandbox's rules (flushes and adds only) about 4 ms.
pub fn apply_script(
    port: &Port,
    rules: &EgressRules,
    dns: &[Ipv4Addr],
    proxy: Option<u16>,
    fresh: bool,
) -> String {
    let k = &port.key;
    let strs = |l: &[Cidr]| l.iter().map(ToString::to_string).collect::<Vec<_>>();
    let dns: Vec<String> = if rules.domains.is_empty() {
        Vec::new()
    } else {
        dns.iter().map(ToString::to_string).collect()
    };
    let mut s = if fresh { base() } else { String::new() };
    s.push_str(&set(&format!("s_{k}_hard"), &strs(&rules.enforced), ""));
    s.push_str(&set(&format!("s_{k}_allow"), &strs(&rules.allow), ""));
    s.push_str(&set(&format!("s_{k}_deny"), &strs(&rules.deny), ""));
    s.push_str(&set(&format!("s_{k}_dns"), &dns, ""));
    if fresh {
        s.push_str(&format!(
            "add chain inet {TABLE} e_{k}\n\
             add chain inet {TABLE} n_{k}\n"
        ));
    }
    s.push_str(&format!(
        "add set inet {TABLE} s_{k}_log {{ type ipv4_addr . inet_proto . inet_service; size 256; flags dynamic,timeout; timeout 1h; counter; }}\n\
         flush chain inet {TABLE} e_{k}\n\
         add rule inet {TABLE} e_{k} ip daddr @s_{k}_hard meta l4proto {{ tcp, udp }} update @s_{k}_log {{ ip daddr . meta l4proto . th dport }}\n\
         add rule inet {TABLE} e_{k} ip daddr @s_{k}_hard drop\n\
         add rule inet {TABLE} e_{k} ip daddr @s_{k}_allow return\n\
         add rule inet {TABLE} e_{k} ip daddr @s_{k}_dns meta l4proto {{ tcp, udp }} th dport 53 return\n\
         add rule inet {TABLE} e_{k} ip daddr @s_{k}_deny meta l4proto {{ tcp, udp }} update @s_{k}_log {{ ip daddr . meta l4proto . th dport }}\n\
         add rule inet {TABLE} e_{k} ip daddr @s_{k}_deny drop\n\
         flush chain inet {TABLE} n_{k}\n"
    ));
    if let Some(p) = proxy {
        s.push_str(&format!(
            "add rule inet {TABLE} n_{k} ip daddr @s_{k}_hard return\n\
             add rule inet {TABLE} n_{k} ip daddr @s_{k}_allow return\n\
             add rule inet {TABLE} n_{k} ip daddr @s_{k}_dns th dport 53 return\n\
             add rule inet {TABLE} n_{k} ip daddr @s_{k}_deny meta l4proto tcp redirect to :{p}\n"
        ));
    }
    let key = format!("\"{}\" . {}", port.iface, port.ip);
    s.push_str(&format!(
        "add element inet {TABLE} sb_out {{ {key} : jump e_{k} }}\n\
         add element inet {TABLE} sb_nat {{ {key} : jump n_{k} }}\n"
    ));
    s
}

/// The transaction that removes everything of `port`: with `elements`,
/// its map elements (the transaction fails if they point at another
/// sandbox's chains: an address another sandbox holds by now keeps that
/// one's), then its chains and sets. `idempotent`: each object is
/// declared before it is deleted, so a missing one is no error (at the
/// price of a slower commit).
pub fn remove_script(port: &Port, elements: bool, idempotent: bool) -> String {
    let k = &port.key;
    let key = format!("\"{}\" . {}", port.iface, port.ip);
    let mut s = String::new();
    if idempotent {
        s.push_str(&base());
        s.push_str(&format!(
            "add chain inet {TABLE} e_{k}\n\
             add chain inet {TABLE} n_{k}\n"
        ));
    }
    if elements {
        // Re-adding the element as this sandbox's fails (and the whole
        // transaction with it) when it points at another sandbox's chain.
        for (map, chain) in [("sb_out", "e"), ("sb_nat", "n")] {
            s.push_str(&format!(
                "add element inet {TABLE} {map} {{ {key} : jump {chain}_{k} }}\n\
                 delete element inet {TABLE} {map} {{ {key} }}\n"
            ));
        }
    }
    s.push_str(&format!(
        "delete chain inet {TABLE} e_{k}\n\
         delete chain inet {TABLE} n_{k}\n"
    ));
    for name in ["hard", "allow", "deny", "dns"] {
        if idempotent {
            s.push_str(&format!(
                "add set inet {TABLE} s_{k}_{name} {{ type ipv4_addr; flags interval; auto-merge; }}\n"
            ));
        }
        s.push_str(&format!("delete set inet {TABLE} s_{k}_{name}\n"));
    }
    if idempotent {
        s.push_str(&format!(
            "add set inet {TABLE} s_{k}_log {{ type ipv4_addr . inet_proto . inet_service; size 256; flags dynamic,timeout; timeout 1h; counter; }}\n"
        ));
    }
    s.push_str(&format!("delete set inet {TABLE} s_{k}_log\n"));
    s
}

/// Removes the rules of `port` (teardown paths, which are not async).
pub fn remove_blocking(port: &Port) {
    remove_now(port);
}

fn remove_now(port: &Port) {
    // One transaction: re-adding the map elements as the sandbox's own
    // fails, and with it everything, when the address is another
    // sandbox's by now (nft refuses a different verdict for a key); then
    // only the sandbox's chains and sets go.
    if nft(&remove_script(port, true, false)).is_ok() {
        return;
    }
    if nft(&remove_script(port, false, false)).is_ok() {
        return;
    }
    if let Err(e) = nft(&remove_script(port, false, true)) {
        tracing::warn!(error = %e, "removing a sandbox's egress rules");
    }
}

/// Runs `nft -f -` on `script`.
fn nft(script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::unavailable("egress rules need `nft` (Debian: apt-get install nftables)")
                .with_source(e)
        })?;
    if let Some(mut w) = child.stdin.take() {
        let _ = w.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::internal("waiting for nft").with_source(e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The sandboxes with rules on bridge `iface`, from `nft -j list map`
/// output of `sb_out` (gateway unknown: unspecified).
fn ports_in(json: &str, iface: &str) -> Vec<Port> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for e in item["map"]["elem"].as_array().into_iter().flatten() {
            let parts = e[0]["concat"].as_array().cloned().unwrap_or_default();
            let target = e[1]["jump"]["target"].as_str().unwrap_or_default();
            let (Some(dev), Some(ip), Some(key)) = (
                parts.first().and_then(|p| p.as_str()),
                parts
                    .get(1)
                    .and_then(|p| p.as_str()?.parse::<Ipv4Addr>().ok()),
                target.strip_prefix("e_"),
            ) else {
                continue;
            };
            let key_ok = key.len() == 10 && key.bytes().all(|b| b.is_ascii_hexdigit());
            if dev == iface && key_ok {
                out.push(Port {
                    iface: dev.to_string(),
                    ip,
                    gateway: Ipv4Addr::UNSPECIFIED,
                    key: key.to_string(),
                });
            }
        }
    }
    out
}

/// Removes the rules of every sandbox on bridge `iface` that `keep`
/// rejects: those whose server died before it could remove them.
pub fn prune(iface: &str, keep: impl Fn(&Port) -> bool) {
    let Ok(out) = std::process::Command::new("nft")
        .args(["-j", "list", "map", "inet", TABLE, "sb_out"])
        .output()
    else {
        return;
    };
    for port in ports_in(&String::from_utf8_lossy(&out.stdout), iface) {
        if !keep(&port) {
            remove_now(&port);
        }
    }
}

/// The elements of a `s_<key>_log` set in `nft -j list set` output.
fn logged(json: &str) -> Vec<EgressDenial> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let sets = v["nftables"].as_array().cloned().unwrap_or_default();
    for s in sets {
        for e in s["set"]["elem"].as_array().cloned().unwrap_or_default() {
            let elem = &e["elem"];
            let parts = elem["val"]["concat"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let (Some(addr), Some(proto), Some(port)) = (
                parts.first().and_then(|p| p.as_str()),
                parts.get(1).and_then(|p| p.as_str()),
                parts.get(2).and_then(serde_json::Value::as_u64),
            ) else {
                continue;
            };
            // `expires` counts down from the set's timeout (an hour) after
            // the last update: the time of that update.
            let last_at = elem["expires"].as_i64().map(|left| {
                chrono::Utc::now() - chrono::Duration::seconds(3600 - left.clamp(0, 3600))
            });
            out.push(EgressDenial {
                address: addr.to_string(),
                host: String::new(),
                port: u16::try_from(port).unwrap_or(0),
                protocol: proto.to_string(),
                reason: "cidr".into(),
                count: elem["counter"]["packets"].as_u64().unwrap_or(0),
                last_at,
            });
        }
    }
    out
}

/// Egress rules and the proxy of one provider.
#[derive(Debug, Default)]
pub struct Egress {
    proxy: Arc<proxy::Proxy>,
    /// Sandboxes (keys) whose chains this process created or updated.
    known: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Egress {
    pub fn new() -> Egress {
        Egress::default()
    }

    /// Puts `rules` in force for `port` (`None` or rules that deny
    /// nothing: only the operator's limits). Atomic: the old rules hold
    /// until the new ones do.
    pub async fn apply(
        &self,
        port: &Port,
        rules: Option<&EgressRules>,
        op: &Operator,
    ) -> Result<()> {
        let Some(rules) = rules.filter(|r| !r.is_empty()) else {
            self.remove(port).await;
            return Ok(());
        };
        let proxy_port = if rules.proxied() {
            Some(self.proxy.listen(port.gateway).await?)
        } else {
            None
        };
        let dns = rules.dns.clone().unwrap_or_else(|| op.resolvers.clone());
        let known = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&port.key);
        let p = port.clone();
        let rules_c = rules.clone();
        let dns_c = dns.clone();
        tokio::task::spawn_blocking(move || {
            let script = |fresh| apply_script(&p, &rules_c, &dns_c, proxy_port, fresh);
            if known && nft(&script(false)).is_ok() {
                return Ok(());
            }
            let full = script(true);
            nft(&full).or_else(|first| {
                // A stale element (a sandbox that held this address and
                // whose server died) points elsewhere: drop it, retry.
                let key = format!("\"{}\" . {}", p.iface, p.ip);
                for map in ["sb_out", "sb_nat"] {
                    let _ = nft(&format!("delete element inet {TABLE} {map} {{ {key} }}\n"));
                }
                nft(&full).map_err(|_| first)
            })
        })
        .await
        .map_err(|e| Error::internal(format!("egress task: {e}")))?
        .map_err(|e| e.context("applying the sandbox's egress rules"))?;
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port.key.clone());
        if rules.proxied() {
            self.proxy.register(port, rules.clone(), op.clone(), dns);
        } else {
            self.proxy.forget(port);
        }
        Ok(())
    }

    /// Removes everything of `port` (idempotent).
    pub async fn remove(&self, port: &Port) {
        self.forget(port);
        let port = port.clone();
        let _ = tokio::task::spawn_blocking(move || remove_now(&port)).await;
    }

    /// Stops serving `port` in the proxy (its rules are removed by
    /// [`remove_blocking`]).
    pub fn forget(&self, port: &Port) {
        self.proxy.forget(port);
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&port.key);
    }

    /// What `port`'s rules refused lately: the kernel's drops, then the
    /// proxy's, newest first.
    pub async fn denials(&self, port: &Port) -> Vec<EgressDenial> {
        let set = format!("s_{}_log", port.key);
        let json = tokio::task::spawn_blocking(move || {
            std::process::Command::new("nft")
                .args(["-j", "list", "set", "inet", TABLE, &set])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
        let mut out = logged(&json);
        out.extend(self.proxy.denials(port));
        out.sort_by_key(|d| std::cmp::Reverse(d.last_at));
        out.truncate(256);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], domains: &[&str], deny: &[&str]) -> EgressRules {
        EgressRules {
            allow: allow.iter().map(|c| c.parse().expect("valid")).collect(),
            domains: domains
                .iter()
                .map(|d| stacyvm_core::egress::Domain::parse(d).expect("valid"))
                .collect(),
            deny: deny.iter().map(|c| c.parse().expect("valid")).collect(),
            dns: None,
            enforced: vec!["1.2.3.4/32".parse().expect("valid")],
        }
    }

    #[test]
    fn scripts_name_only_their_sandbox() {
        let port = Port::new(
            "svmeg1",
            Ipv4Addr::new(10, 89, 1, 5),
            Ipv4Addr::new(10, 89, 1, 1),
            "sb-1",
        );
        assert_eq!(port.key.len(), 10);
        let s = apply_script(
            &port,
            &rules(&["8.8.8.8/32"], &[], &["0.0.0.0/0"]),
            &[],
            None,
            true,
        );
        assert!(
            s.contains(&format!("\"svmeg1\" . 10.89.1.5 : jump e_{}", port.key)),
            "{s}"
        );
        assert!(!s.contains("redirect"), "no domains, no proxy: {s}");
        let s = apply_script(
            &port,
            &rules(&[], &["*.example.com"], &["0.0.0.0/0"]),
            &[Ipv4Addr::new(9, 9, 9, 9)],
            Some(4567),
            false,
        );
        assert!(s.contains("redirect to :4567"), "{s}");
        assert!(!s.contains("add chain"), "an update declares no chain: {s}");
        assert!(
            s.contains("add element inet stacyvm_egress ") && s.contains("9.9.9.9"),
            "{s}"
        );
        let r = remove_script(&port, false, false);
        assert!(r.contains(&format!("delete chain inet {TABLE} e_{}", port.key)));
        assert!(
            !r.contains("element"),
            "another sandbox's elements stay: {r}"
        );
        let r = remove_script(&port, true, true);
        assert!(
            r.contains("delete element") && r.contains("add chain"),
            "{r}"
        );
    }

    #[test]
    fn operator_limits_hold_for_the_proxy() {
        let op = Operator {
            allow: vec!["192.168.5.0/24".parse().expect("valid")],
            deny: vec![
                "192.168.5.7/32".parse().expect("valid"),
                "8.8.8.8/32".parse().expect("valid"),
            ],
            resolvers: vec![],
            sandbox_net: vec!["10.88.0.0/16".parse().expect("valid")],
        };
        assert!(op.permits(Ipv4Addr::new(1, 1, 1, 1)));
        assert!(!op.permits(Ipv4Addr::new(169, 254, 169, 254)));
        assert!(!op.permits(Ipv4Addr::new(127, 0, 0, 1)));
        assert!(op.permits(Ipv4Addr::new(192, 168, 5, 6)));
        assert!(!op.permits(Ipv4Addr::new(192, 168, 5, 7)));
        assert!(!op.permits(Ipv4Addr::new(8, 8, 8, 8)));
        // The host itself and the sandboxes' network, whatever `allow` says.
        let open = Operator {
            allow: vec!["0.0.0.0/0".parse().expect("valid")],
            ..op.clone()
        };
        assert!(!open.permits(Ipv4Addr::LOCALHOST));
        assert!(!open.permits(Ipv4Addr::new(10, 88, 3, 4)));
        assert!(open.permits(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(is_local(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn map_elements_are_read_per_bridge() {
        let json = r#"{"nftables": [{"metainfo": {}}, {"map": {"name": "sb_out", "elem": [
            [{"concat": ["svmeg84", "10.89.84.58"]}, {"jump": {"target": "e_a711837bf6"}}],
            [{"concat": ["other", "10.1.1.1"]}, {"jump": {"target": "e_0011223344"}}],
            [{"concat": ["svmeg84", "10.89.84.9"]}, {"jump": {"target": "e_bad; drop"}}]]}}]}"#;
        let ports = ports_in(json, "svmeg84");
        assert_eq!(ports.len(), 1, "{ports:?}");
        assert_eq!(
            (ports[0].ip, ports[0].key.as_str()),
            (Ipv4Addr::new(10, 89, 84, 58), "a711837bf6")
        );
    }

    #[test]
    fn logged_denials_are_read_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {}}, {"set": {"name": "x_log", "elem": [
            {"elem": {"val": {"concat": ["192.88.99.9", "tcp", 8080]}, "timeout": 3600, "expires": 3590, "counter": {"packets": 3, "bytes": 180}}}]}}]}"#;
        let d = logged(json);
        assert_eq!(d.len(), 1);
        assert_eq!(
            (d[0].address.as_str(), d[0].port, d[0].count),
            ("192.88.99.9", 8080, 3)
        );
        assert_eq!(d[0].protocol, "tcp");
        assert!(logged("not json").is_empty());
    }
}
