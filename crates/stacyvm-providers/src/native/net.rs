//! `bridge` networking for native sandboxes: a host bridge with NAT, one
//! veth pair per sandbox, and an egress filter that lets sandboxes reach
//! the public internet and nothing else.
//!
//! Every native sandbox has its own network namespace. In `none` mode it
//! holds only loopback. In `bridge` mode the provider, after boot, creates
//! a veth pair whose inner end becomes `eth0` in the sandbox (address from
//! the bridge subnet, default route via the bridge), and whose host end is
//! an isolated port of the bridge (sandboxes cannot reach each other).
//! Sandboxes get no IPv6: `disable_ipv6` is set on the bridge, on the host
//! end and inside the namespace (`default`, `eth0`), so there is no
//! address, not even link-local, to talk from (the sandbox keeps `::1` on
//! its own loopback); the firewall drops IPv6 from the bridge as well.
//!
//! Host side, set up once per bridge and idempotently:
//! - the bridge itself, with the subnet's first address as gateway;
//! - an nftables table `inet stacyvm_<bridge>` that masquerades traffic
//!   leaving through another interface and drops, for new connections from
//!   the bridge: everything to the host itself (any of its addresses; the
//!   StacyVM API and every other host service), everything over IPv6,
//!   and forwarded traffic to [`BLOCKED_V4`] (cloud metadata, link-local,
//!   private, CGNAT, loopback, multicast, reserved and documentation
//!   ranges). The operator's `egress_deny` comes first, then
//!   `egress_allow`, then the built-in list. The host's IPv4 resolvers
//!   (nameservers of `/etc/resolv.conf`, read at setup) stay reachable on
//!   port 53, so a resolver on a private address keeps working. Nothing
//!   opens connections into a sandbox from another interface;
//! - `ip_forward` on, and, when iptables has a FORWARD chain (Docker sets
//!   its policy to DROP), accept rules for the bridge's traffic appended at
//!   the *end* of FORWARD (comment `stacyvm:<bridge>`): Docker's chains
//!   (`DOCKER-USER`, isolation, per-network drops) see the traffic first.
//!
//! - a `bridge`-family table (same name) whose sets pin each microVM tap
//!   to its address and MAC ([`Bridge::attach_tap`]): a VM's guest root
//!   holds NET_ADMIN in its own kernel, a native sandbox does not.
//!
//! Addresses are leased through files under `/run/stacyvm/net/<bridge>/`
//! (created with O_EXCL, so concurrent servers and tests never share one);
//! they live in /run because veths and namespaces do not survive a reboot.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use stacyvm_core::cidr::Cidr;
use stacyvm_core::{Error, Result};
use tracing::{info, warn};

/// Destinations no `bridge` sandbox may reach unless allowed: one list
/// for every provider.
pub use stacyvm_core::cidr::BLOCKED_EGRESS_V4 as BLOCKED_V4;

/// A parsed `a.b.c.d/len` IPv4 subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// Parses `10.88.0.0/16`; the prefix must leave room for a gateway and
    /// at least two sandboxes.
    pub fn parse(s: &str) -> std::result::Result<Subnet, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR subnet (like 10.88.0.0/16)"))?;
        let base: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|p| (8..=29).contains(p))
            .ok_or_else(|| format!("prefix /{len} must be between /8 and /29"))?;
        let mask = u32::MAX << (32 - prefix);
        if u32::from(base) & !mask != 0 {
            return Err(format!(
                "{s} has host bits set (did you mean {}/{prefix}?)",
                Ipv4Addr::from(u32::from(base) & mask)
            ));
        }
        Ok(Subnet { base, prefix })
    }

    fn size(&self) -> u32 {
        1u32 << (32 - self.prefix)
    }

    /// The gateway (the bridge's own address): the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// The `i`-th address usable by a sandbox (skips network, gateway and
    /// broadcast).
    fn host(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 2 + i % (self.size() - 3))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// Settings of the bridge network.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Bridge interface name (at most 15 bytes).
    pub name: String,
    pub subnet: Subnet,
    /// IPv4 destinations reachable despite [`BLOCKED_V4`].
    pub egress_allow: Vec<Cidr>,
    /// Extra IPv4 destinations dropped; beats `egress_allow`.
    pub egress_deny: Vec<Cidr>,
    /// Resolver config whose IPv4 nameservers stay reachable on port 53.
    pub resolv_conf: PathBuf,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        BridgeOptions {
            name: "stacyvm0".into(),
            subnet: Subnet {
                base: Ipv4Addr::new(10, 88, 0, 0),
                prefix: 16,
            },
            egress_allow: Vec::new(),
            egress_deny: Vec::new(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
        }
    }
}

/// The IPv4 nameservers of a resolv.conf, split into those a sandbox can
/// be allowed to reach and loopback ones it never can (its loopback is its
/// own).
pub(crate) fn nameservers(text: &str) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
    let (mut reachable, mut loopback) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(IpAddr::V4(ip))) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let list = if ip.is_loopback() {
            &mut loopback
        } else {
            &mut reachable
        };
        if !list.contains(&ip) {
            list.push(ip);
        }
    }
    (reachable, loopback)
}

/// The nameservers of a resolv.conf a sandbox on a bridge can reach.
pub fn reachable_nameservers(text: &str) -> Vec<Ipv4Addr> {
    nameservers(text).0
}

/// An nft set of IPv4 intervals, with its elements when there are any.
fn nft_set<T: std::fmt::Display>(name: &str, elements: &[T]) -> String {
    let mut out = format!("  set {name} {{\n    type ipv4_addr; flags interval; auto-merge;\n");
    if !elements.is_empty() {
        let list: Vec<String> = elements.iter().map(ToString::to_string).collect();
        out.push_str(&format!("    elements = {{ {} }}\n", list.join(", ")));
    }
    out.push_str("  }\n");
    out
}

/// The nftables transaction that (re)creates the bridge's table, and
/// removes the `ip` table of earlier versions.
fn ruleset(opts: &BridgeOptions, resolvers: &[Ipv4Addr]) -> Result<String> {
    let mut allow = Vec::new();
    let mut deny = Vec::new();
    for (list, out) in [
        (&opts.egress_allow, &mut allow),
        (&opts.egress_deny, &mut deny),
    ] {
        for c in list {
            if !c.is_ipv4() {
                return Err(Error::unavailable(format!(
                    "egress rule {c}: bridge sandboxes have no IPv6, list IPv4 CIDRs only"
                )));
            }
            out.push(*c);
        }
    }
    let name = &opts.name;
    let table = format!("stacyvm_{name}");
    let mut sets = nft_set("blocked4", BLOCKED_V4);
    sets.push_str(&nft_set("allow4", &allow));
    sets.push_str(&nft_set("deny4", &deny));
    sets.push_str(&nft_set("resolvers4", resolvers));
    Ok(format!(
        "table ip {table} {{}}\n\
         delete table ip {table}\n\
         table inet {table} {{}}\n\
         delete table inet {table}\n\
         table inet {table} {{\n\
         {sets}\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             ip saddr {subnet} oifname != \"{name}\" masquerade\n\
           }}\n\
           chain input {{\n\
             type filter hook input priority filter; policy accept;\n\
             iifname \"{name}\" ct state established,related accept\n\
             iifname \"{name}\" ip daddr @resolvers4 meta l4proto {{ tcp, udp }} th dport 53 accept\n\
             iifname \"{name}\" ct status dnat ip daddr {gateway} meta l4proto tcp accept\n\
             iifname \"{name}\" drop\n\
           }}\n\
           chain forward {{\n\
             type filter hook forward priority filter; policy accept;\n\
             iifname \"{name}\" oifname \"{name}\" drop\n\
             oifname \"{name}\" ct state established,related accept\n\
             oifname \"{name}\" drop\n\
             iifname \"{name}\" ct state established,related accept\n\
             iifname \"{name}\" meta nfproto != ipv4 drop\n\
             iifname \"{name}\" ip daddr @deny4 drop\n\
             iifname \"{name}\" ip daddr @allow4 accept\n\
             iifname \"{name}\" ip daddr @resolvers4 meta l4proto {{ tcp, udp }} th dport 53 accept\n\
             iifname \"{name}\" ip daddr @blocked4 drop\n\
           }}\n\
         }}\n",
        subnet = opts.subnet,
        gateway = opts.subnet.gateway(),
    ))
}

/// The `bridge`-family table that pins each VM port (a tap, see
/// [`Bridge::attach_tap`]) to its own MAC and IPv4 address. A guest kernel
/// is the guest's: its root can change the address and MAC of `eth0`, and
/// without this would send from another sandbox's address (hijacking its
/// replies, poisoning the host's ARP cache) or, outside the subnet, past
/// the masquerade with a forged source. Veth ports of native sandboxes are
/// not listed (no code in them holds NET_ADMIN) and pass.
///
/// Unlike the `inet` table this one is never dropped: its sets hold the
/// VMs of every server on the bridge; only the chain is rewritten.
fn antispoof_ruleset(table: &str) -> String {
    format!(
        "table bridge {table} {{\n\
           set vmports {{ type ifname; }}\n\
           set bound4 {{ type ifname . ether_addr . ipv4_addr; }}\n\
           chain prerouting {{ type filter hook prerouting priority filter; policy accept; }}\n\
         }}\n\
         flush chain bridge {table} prerouting\n\
         table bridge {table} {{\n\
           chain prerouting {{\n\
             iifname != @vmports accept\n\
             ether type ip iifname . ether saddr . ip saddr @bound4 accept\n\
             ether type arp iifname . ether saddr . arp saddr ip @bound4 accept\n\
             drop\n\
           }}\n\
         }}\n"
    )
}

/// The `(tap, MAC, IPv4)` pins in `nft list set … bound4` output.
fn pins_in(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("\"svm") {
        rest = &rest[start + 1..];
        let Some(end) = rest.find('"') else { break };
        let tap = &rest[..end];
        // ` . <mac> . <ip>,` or ` . <mac> . <ip> }`
        let mut parts = rest[end + 1..]
            .split_whitespace()
            .filter(|w| *w != ".")
            .map(|w| w.trim_end_matches([',', '}']));
        let (Some(mac), Some(ip)) = (parts.next(), parts.next()) else {
            break;
        };
        let tap_ok = tap.len() <= 15 && tap.bytes().all(|b| b.is_ascii_alphanumeric());
        let mac_ok = mac.len() == 17 && mac.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
        if tap_ok && mac_ok && ip.parse::<Ipv4Addr>().is_ok() {
            out.push((tap.to_string(), mac.to_string(), ip.to_string()));
        }
        rest = &rest[end + 1..];
    }
    out
}

/// The MAC of the VM holding bridge address `ip`: locally administered,
/// unicast, and unique on the bridge because the lease is.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// The iptables FORWARD rules of a bridge (arguments after the chain):
/// replies to sandboxes, and what the nft table let through from them.
pub fn forward_rules(bridge: &str) -> [Vec<String>; 2] {
    let comment = format!("stacyvm:{bridge}");
    let with = |spec: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = spec.iter().map(|s| (*s).to_string()).collect();
        v.extend(["-m", "comment", "--comment", &comment, "-j", "ACCEPT"].map(String::from));
        v
    };
    [
        with(&[
            "-o",
            bridge,
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
        ]),
        with(&["-i", bridge, "!", "-o", bridge]),
    ]
}

/// The FORWARD rules earlier versions inserted at the top of the chain,
/// ahead of Docker's (removed on setup).
fn legacy_forward_rules(bridge: &str) -> [Vec<String>; 2] {
    let spec = |s: &[&str]| s.iter().map(|s| (*s).to_string()).collect::<Vec<String>>();
    [
        spec(&["-i", bridge, "!", "-o", bridge, "-j", "ACCEPT"]),
        spec(&[
            "-o",
            bridge,
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ]),
    ]
}

/// Runs `iptables -w <op> FORWARD <spec>`; true when it succeeded.
fn iptables_forward(op: &str, spec: &[String]) -> bool {
    std::process::Command::new("iptables")
        .args(["-w", op, "FORWARD"])
        .args(spec)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Turns IPv6 off on one interface of the current network namespace (a
/// kernel without IPv6 has nothing to turn off).
fn disable_ipv6(iface: &str) -> std::io::Result<()> {
    let path = Path::new("/proc/sys/net/ipv6/conf")
        .join(iface)
        .join("disable_ipv6");
    match std::fs::write(path, "1") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// What a sandbox holds on the bridge (kept in its meta.json).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub bridge: String,
    pub ip: Ipv4Addr,
    pub host_if: String,
    /// A VM's tap (pinned in the anti-spoofing sets) rather than a veth.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tap: bool,
}

/// Runs a tool, feeding `stdin`; a non-zero exit is an error with its stderr.
fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut cmd = std::process::Command::new(tool);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        Error::unavailable(format!(
            "bridge networking needs `{tool}` (Debian: apt-get install iproute2 nftables): {e}"
        ))
    })?;
    if let (Some(text), Some(mut w)) = (stdin, child.stdin.take()) {
        let _ = w.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::internal(format!("waiting for {tool}")).with_source(e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn iface_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The host-side veth name of a sandbox: short (IFNAMSIZ is 16) and
/// derived from the id, so teardown finds it without state.
pub fn host_if_name(sandbox_id: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(sandbox_id.as_bytes());
    format!(
        "svm{:02x}{:02x}{:02x}{:02x}{:02x}",
        h[0], h[1], h[2], h[3], h[4]
    )
}

/// The bridge of one server, set up on first use.
#[derive(Debug)]
pub struct Bridge {
    opts: BridgeOptions,
    lease_dir: PathBuf,
    ready: std::sync::OnceLock<()>,
    /// Why VM taps cannot be pinned here (the kernel lacks nftables'
    /// bridge family), once setup has tried.
    no_pins: std::sync::OnceLock<Option<String>>,
    /// Per-sandbox egress rules and their proxy.
    egress: crate::egress::Egress,
}

impl Bridge {
    pub fn new(opts: BridgeOptions) -> Self {
        let lease_dir = PathBuf::from("/run/stacyvm/net").join(&opts.name);
        Bridge {
            opts,
            lease_dir,
            ready: std::sync::OnceLock::new(),
            no_pins: std::sync::OnceLock::new(),
            egress: crate::egress::Egress::new(),
        }
    }

    /// A sandbox's place for the egress rules.
    fn egress_port(&self, att: &Attachment) -> crate::egress::Port {
        crate::egress::Port::new(
            &att.bridge,
            att.ip,
            self.opts.subnet.gateway(),
            &att.host_if,
        )
    }

    fn egress_marker(&self, att: &Attachment) -> PathBuf {
        egress_marker(att)
    }

    /// Puts a sandbox's egress rules in force (`None`: the bridge's
    /// defaults only).
    pub async fn set_egress(
        &self,
        att: &Attachment,
        rules: Option<&stacyvm_core::egress::EgressRules>,
    ) -> Result<()> {
        let port = self.egress_port(att);
        let marker = self.egress_marker(att);
        if rules.is_some_and(|r| !r.is_empty()) {
            std::fs::write(&marker, b"")
                .map_err(|e| Error::internal("marking egress rules").with_source(e))?;
            let op = crate::egress::Operator {
                allow: self.opts.egress_allow.clone(),
                deny: self.opts.egress_deny.clone(),
                resolvers: self.resolvers(),
                sandbox_net: self
                    .opts
                    .subnet
                    .to_string()
                    .parse::<Cidr>()
                    .into_iter()
                    .collect(),
            };
            self.egress.apply(&port, rules, &op).await
        } else {
            self.egress.remove(&port).await;
            let _ = std::fs::remove_file(&marker);
            Ok(())
        }
    }

    /// What a sandbox's egress rules refused lately.
    pub async fn egress_denials(&self, att: &Attachment) -> Vec<stacyvm_api::EgressDenial> {
        self.egress.denials(&self.egress_port(att)).await
    }

    /// [`Bridge::set_egress`] for a sandbox that may have no attachment
    /// (`none` mode: nothing to reach, nothing to filter).
    pub async fn set_egress_of(
        &self,
        att: Option<&Attachment>,
        rules: Option<&stacyvm_core::egress::EgressRules>,
    ) -> Result<()> {
        match att {
            Some(att) => self.set_egress(att, rules).await,
            None => Ok(()),
        }
    }

    /// [`Bridge::egress_denials`] likewise.
    pub async fn egress_denials_of(
        &self,
        att: Option<&Attachment>,
    ) -> Vec<stacyvm_api::EgressDenial> {
        match att {
            Some(att) => self.egress_denials(att).await,
            None => Vec::new(),
        }
    }

    pub fn options(&self) -> &BridgeOptions {
        &self.opts
    }

    /// Creates the bridge, its address and the firewall table if missing.
    /// Safe to run concurrently from several processes (flock).
    pub fn ensure(&self) -> Result<()> {
        if self.ready.get().is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.lease_dir)
            .map_err(|e| Error::internal("creating the lease dir").with_source(e))?;
        let lock = std::fs::File::create(self.lease_dir.join(".lock"))
            .map_err(|e| Error::internal("creating the bridge lock").with_source(e))?;
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::internal("locking the bridge").with_source(e))?;
        let name = self.opts.name.as_str();
        let gw = format!("{}/{}", self.opts.subnet.gateway(), self.opts.subnet.prefix);
        if !iface_exists(name) {
            run("ip", &["link", "add", name, "type", "bridge"], None)?;
            info!(bridge = name, subnet = %self.opts.subnet, "created the native bridge");
        }
        // No IPv6 on the bridge: no link-local address a sandbox could use.
        disable_ipv6(name)
            .map_err(|e| Error::internal("disabling IPv6 on the bridge").with_source(e))?;
        // `replace` is idempotent; the bridge must be up even with no ports.
        run("ip", &["addr", "replace", &gw, "dev", name], None)?;
        run("ip", &["link", "set", name, "up"], None)?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| Error::internal("enabling ip_forward").with_source(e))?;
        let (resolvers, loopback) = match std::fs::read_to_string(&self.opts.resolv_conf) {
            Ok(text) => nameservers(&text),
            Err(e) => {
                warn!(path = %self.opts.resolv_conf.display(), error = %e, "no resolver config: bridge sandboxes get no DNS exception");
                (Vec::new(), Vec::new())
            }
        };
        if !loopback.is_empty() {
            warn!(
                bridge = name,
                resolvers = ?loopback,
                "the host resolver is on loopback, which bridge sandboxes cannot reach (their loopback is their own); point /etc/resolv.conf at a reachable resolver"
            );
        }
        // One transaction: create-if-missing, drop, recreate.
        run("nft", &["-f", "-"], Some(&ruleset(&self.opts, &resolvers)?))?;
        // Separately: a kernel without nftables' bridge family still runs
        // native bridge sandboxes (no code in them can spoof); only VM
        // taps, which need the pins, are refused there.
        let table = format!("stacyvm_{name}");
        let pins = run("nft", &["-f", "-"], Some(&antispoof_ruleset(&table)));
        if let Err(e) = &pins {
            warn!(bridge = name, error = %e, "no nftables bridge family: microVMs cannot join this bridge");
        }
        let _ = self.no_pins.set(pins.err().map(|e| e.to_string()));
        self.prune_pins();
        // Egress rules of sandboxes whose lease is gone (their server
        // died); a lease younger than a minute may be a spawn whose veth
        // is still being made.
        crate::egress::prune(name, |port| {
            let lease = self.lease_dir.join(port.ip.to_string());
            std::fs::read_to_string(&lease).is_ok_and(|owner| iface_exists(owner.trim()))
                || !self.stale(&lease) && lease.exists()
        });
        self.allow_in_iptables_forward();
        let _ = self.ready.set(());
        Ok(())
    }

    /// Drops anti-spoofing pins whose tap is gone (a VM whose server died
    /// before it could release them): the sets hold the taps of every
    /// server on the bridge, so only absent interfaces are touched.
    fn prune_pins(&self) {
        let table = format!("stacyvm_{}", self.opts.name);
        let Ok(out) = std::process::Command::new("nft")
            .args(["list", "set", "bridge", &table, "bound4"])
            .output()
        else {
            return;
        };
        let mut script = String::new();
        for (tap, mac, ip) in pins_in(&String::from_utf8_lossy(&out.stdout)) {
            if !iface_exists(&tap) {
                script.push_str(&format!(
                    "delete element bridge {table} bound4 {{ \"{tap}\" . {mac} . {ip} }}\n\
                     delete element bridge {table} vmports {{ \"{tap}\" }}\n"
                ));
            }
        }
        if !script.is_empty() {
            if let Err(e) = run("nft", &["-f", "-"], Some(&script)) {
                warn!(bridge = %self.opts.name, error = %e, "pruning stale VM pins failed");
            }
        }
    }

    /// Docker sets the iptables FORWARD policy to DROP, which would also
    /// drop the bridge's traffic: accept it there, at the end of the chain
    /// so that Docker's own chains (and the operator's `DOCKER-USER`
    /// rules) judge it first. What reaches these rules has passed the nft
    /// table's filter (an nft drop is final whatever iptables says).
    fn allow_in_iptables_forward(&self) {
        let name = self.opts.name.as_str();
        // Rules of earlier versions sat at the top of FORWARD, bypassing
        // Docker's chains (bounded: a racing copy is removed too).
        for spec in legacy_forward_rules(name) {
            for _ in 0..8 {
                if !iptables_forward("-D", &spec) {
                    break;
                }
            }
        }
        for spec in forward_rules(name) {
            if iptables_forward("-C", &spec) {
                continue;
            }
            if !iptables_forward("-A", &spec) {
                // No iptables (or no FORWARD chain): nothing else can be dropping.
                tracing::debug!(bridge = name, "iptables FORWARD rule not added");
            }
        }
    }

    /// Takes a free address for `sandbox_id`. A lease whose veth is gone
    /// (its sandbox died with a crashed server) and that is older than a
    /// minute is reclaimed.
    fn lease(&self, sandbox_id: &str, host_if: &str) -> Result<Ipv4Addr> {
        use sha2::Digest;
        let h = sha2::Sha256::digest(sandbox_id.as_bytes());
        let start = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let n = self.opts.subnet.size() - 3;
        for i in 0..n {
            let ip = self.opts.subnet.host(start.wrapping_add(i));
            let path = self.lease_dir.join(ip.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let _ = f.write_all(host_if.as_bytes());
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if self.stale(&path) {
                        let _ = std::fs::remove_file(&path);
                        if let Ok(mut f) = std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&path)
                        {
                            let _ = f.write_all(host_if.as_bytes());
                            return Ok(ip);
                        }
                    }
                }
                Err(e) => {
                    return Err(Error::internal("leasing a bridge address").with_source(e));
                }
            }
        }
        Err(Error::limit(format!(
            "no free address left in the bridge subnet {}",
            self.opts.subnet
        )))
    }

    fn stale(&self, lease: &Path) -> bool {
        let Ok(owner) = std::fs::read_to_string(lease) else {
            return false;
        };
        let old = std::fs::metadata(lease)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > 60);
        old && !owner.is_empty() && !iface_exists(owner.trim())
    }

    /// Connects the (booted) sandbox whose PID 1 is `init_pid` to the bridge.
    pub fn attach(&self, sandbox_id: &str, init_pid: i32) -> Result<Attachment> {
        let att = self.reserve(sandbox_id)?;
        self.connect(&att, init_pid).map(|()| att)
    }

    /// The first half of [`Bridge::attach`]: sets the bridge up and leases
    /// an address (egress rules for it can be put in place while
    /// [`Bridge::connect`] wires the sandbox).
    pub fn reserve(&self, sandbox_id: &str) -> Result<Attachment> {
        self.ensure()?;
        let host_if = host_if_name(sandbox_id);
        let ip = self.lease(sandbox_id, &host_if)?;
        Ok(Attachment {
            bridge: self.opts.name.clone(),
            ip,
            host_if,
            tap: false,
        })
    }

    /// The second half: the veth pair into the sandbox whose PID 1 is
    /// `init_pid`. On failure everything of `att` is released.
    pub fn connect(&self, att: &Attachment, init_pid: i32) -> Result<()> {
        let res = self.wire(att, init_pid);
        if res.is_err() {
            self.detach(att);
        }
        res
    }

    fn wire(&self, att: &Attachment, init_pid: i32) -> Result<()> {
        let pid = init_pid.to_string();
        // Opened before anything is created: a pid that is gone fails here.
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|e| Error::internal("opening the sandbox network namespace").with_source(e))?;
        // The inner end is created directly in the sandbox's namespace.
        run(
            "ip",
            &[
                "link",
                "add",
                &att.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &pid,
            ],
            None,
        )?;
        // No IPv6 on either end, before any link is up (so no link-local
        // address is ever configured). Inside, from a thread that joins the
        // sandbox's network namespace and then exits.
        disable_ipv6(&att.host_if)
            .map_err(|e| Error::internal("disabling IPv6 on the host veth").with_source(e))?;
        std::thread::spawn(move || -> std::io::Result<()> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            // Not `all`: that would take `::1` from the sandbox's own loopback.
            for iface in ["default", "eth0"] {
                disable_ipv6(iface)?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| Error::internal("IPv6 setup thread panicked"))?
        .map_err(|e| Error::internal("disabling IPv6 in the sandbox").with_source(e))?;
        run(
            "ip",
            &["-batch", "-"],
            Some(&format!(
                "link set {h} master {b}\nlink set {h} type bridge_slave isolated on\nlink set {h} up\n",
                h = att.host_if,
                b = att.bridge
            )),
        )?;
        let netns = format!("--net=/proc/{pid}/ns/net");
        run(
            "nsenter",
            &[&netns, "ip", "-batch", "-"],
            Some(&format!(
                "addr add {ip}/{len} dev eth0\nlink set eth0 up\nroute add default via {gw}\n",
                ip = att.ip,
                len = self.opts.subnet.prefix,
                gw = self.opts.subnet.gateway()
            )),
        )
    }

    /// Removes what a sandbox held: its veth (gone anyway once its
    /// namespace dies) and its address lease.
    pub fn detach(&self, att: &Attachment) {
        self.egress.forget(&self.egress_port(att));
        release(att);
    }

    /// The bridge's IPv4 resolvers a sandbox may query (the host's
    /// non-loopback nameservers).
    pub fn resolvers(&self) -> Vec<Ipv4Addr> {
        std::fs::read_to_string(&self.opts.resolv_conf)
            .map(|t| nameservers(&t).0)
            .unwrap_or_default()
    }

    /// Connects a VM to the bridge through a new tap, which is returned
    /// open (hand it to the VMM; it disappears when the VMM's copy closes).
    /// The port is isolated like a veth and pinned to the VM's leased
    /// address and [`mac_for`] it in the anti-spoofing sets before it is
    /// up.
    pub fn attach_tap(&self, sandbox_id: &str) -> Result<(Attachment, std::os::fd::OwnedFd)> {
        let (att, tap) = self.attach_tap_with(sandbox_id, None)?;
        let tap = tap.ok_or_else(|| Error::internal("tap queue missing"))?;
        Ok((att, tap))
    }

    /// Like [`Bridge::attach_tap`], for a VMM that opens its tap by name
    /// itself (Firecracker): the tap is persistent and owned by `owner`
    /// (the VMM's uid), and [`release`] deletes it.
    pub fn attach_owned_tap(&self, sandbox_id: &str, owner: u32) -> Result<Attachment> {
        self.attach_tap_with(sandbox_id, Some(owner))
            .map(|(a, _)| a)
    }

    fn attach_tap_with(
        &self,
        sandbox_id: &str,
        owner: Option<u32>,
    ) -> Result<(Attachment, Option<std::os::fd::OwnedFd>)> {
        self.ensure()?;
        if let Some(Some(why)) = self.no_pins.get() {
            return Err(Error::unavailable(format!(
                "microVMs need the anti-spoofing pins of an nftables bridge table, which this kernel refused ({why}); enable CONFIG_NF_TABLES_BRIDGE (module nf_tables with bridge support) or use network_mode none"
            )));
        }
        let host_if = host_if_name(sandbox_id);
        let ip = self.lease(sandbox_id, &host_if)?;
        let att = Attachment {
            bridge: self.opts.name.clone(),
            ip,
            host_if: host_if.clone(),
            tap: true,
        };
        let res = (|| {
            let tap = match owner {
                None => Some(stacyvm_sandbox::ifconfig::open_tap(&host_if)),
                Some(uid) => stacyvm_sandbox::ifconfig::create_owned_tap(&host_if, uid)
                    .err()
                    .map(Err),
            }
            .transpose()
            .map_err(|e| Error::internal(format!("creating tap {host_if} (/dev/net/tun): {e}")))?;
            disable_ipv6(&host_if)
                .map_err(|e| Error::internal("disabling IPv6 on the tap").with_source(e))?;
            let table = format!("stacyvm_{}", att.bridge);
            run(
                "nft",
                &["-f", "-"],
                Some(&format!(
                    "add element bridge {table} bound4 {{ \"{h}\" . {mac} . {ip} }}\n\
                     add element bridge {table} vmports {{ \"{h}\" }}\n",
                    h = host_if,
                    mac = mac_for(ip),
                )),
            )?;
            run(
                "ip",
                &["-batch", "-"],
                Some(&format!(
                    "link set {h} master {b}\nlink set {h} type bridge_slave isolated on\nlink set {h} up\n",
                    h = host_if,
                    b = att.bridge
                )),
            )?;
            Ok(tap)
        })();
        match res {
            Ok(tap) => Ok((att, tap)),
            Err(e) => {
                self.detach(&att);
                Err(e)
            }
        }
    }
}

/// Removes what a sandbox held on its bridge: its veth or tap (a veth is
/// gone anyway once its namespace dies, a tap once its VMM exits), a tap's
/// anti-spoofing entries, and the address lease.
pub fn release(att: &Attachment) {
    // The egress rules go before the address: once the lease is free
    // another sandbox may hold it, and its rules must stay.
    let marker = egress_marker(att);
    if marker.exists() {
        crate::egress::remove_blocking(&crate::egress::Port::new(
            &att.bridge,
            att.ip,
            Ipv4Addr::UNSPECIFIED,
            &att.host_if,
        ));
        let _ = std::fs::remove_file(&marker);
    }
    if iface_exists(&att.host_if) {
        let _ = run("ip", &["link", "del", &att.host_if], None);
    }
    if att.tap {
        let table = format!("stacyvm_{}", att.bridge);
        let _ = run(
            "nft",
            &["-f", "-"],
            Some(&format!(
                "delete element bridge {table} vmports {{ \"{h}\" }}\n",
                h = att.host_if
            )),
        );
        let _ = run(
            "nft",
            &["-f", "-"],
            Some(&format!(
                "delete element bridge {table} bound4 {{ \"{h}\" . {mac} . {ip} }}\n",
                h = att.host_if,
                mac = mac_for(att.ip),
                ip = att.ip
            )),
        );
    }
    let lease = PathBuf::from("/run/stacyvm/net")
        .join(&att.bridge)
        .join(att.ip.to_string());
    if std::fs::read_to_string(&lease).is_ok_and(|o| o.trim() == att.host_if) {
        let _ = std::fs::remove_file(lease);
    }
}

/// Marks a sandbox with egress rules (kept in /run with the leases, so a
/// restarted server, or a teardown without the bridge at hand, still
/// removes them).
fn egress_marker(att: &Attachment) -> PathBuf {
    let key =
        crate::egress::Port::new(&att.bridge, att.ip, Ipv4Addr::UNSPECIFIED, &att.host_if).key;
    PathBuf::from("/run/stacyvm/net")
        .join(&att.bridge)
        .join(format!("egress-{key}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_read_from_nft_output() {
        let text = "table bridge stacyvm_x {\n\tset bound4 {\n\t\ttype ifname . ether_addr . ipv4_addr\n\t\telements = { \"svm05c08b47da\" . 52:54:0a:59:9c:4c . 10.89.156.76,\n\t\t\t     \"svm767391d69e\" . 52:54:0a:58:f5:34 . 10.88.245.52 }\n\t}\n}\n";
        assert_eq!(
            pins_in(text),
            [
                (
                    "svm05c08b47da".to_string(),
                    "52:54:0a:59:9c:4c".to_string(),
                    "10.89.156.76".to_string()
                ),
                (
                    "svm767391d69e".to_string(),
                    "52:54:0a:58:f5:34".to_string(),
                    "10.88.245.52".to_string()
                ),
            ]
        );
        assert!(pins_in(
            "table bridge stacyvm_x { set bound4 { type ifname . ether_addr . ipv4_addr } }"
        )
        .is_empty());
        assert!(pins_in("\"svm1\" . nonsense . 1.2.3.4").is_empty());
    }

    #[test]
    fn subnets_parse_and_reject_bad_input() {
        let s = Subnet::parse("10.88.0.0/16").expect("valid");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(s.host(0), Ipv4Addr::new(10, 88, 0, 2));
        // Wraps inside the usable range, never the broadcast address.
        let small = Subnet::parse("192.168.5.0/29").expect("valid");
        let hosts: Vec<_> = (0..20).map(|i| small.host(i)).collect();
        assert!(hosts.iter().all(|h| {
            let last = h.octets()[3];
            (2..=6).contains(&last)
        }));
        for bad in [
            "10.88.0.0",
            "10.88.0.1/16",
            "10.88.0.0/33",
            "x/16",
            "10.0.0.0/30",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(s.to_string(), "10.88.0.0/16");
    }

    #[test]
    fn nameservers_split_reachable_from_loopback() {
        let (ok, lo) = nameservers(
            "# comment\nsearch example\nnameserver 10.255.255.53\nnameserver 127.0.0.53\n\
             nameserver fd00::1\nnameserver 10.255.255.53\nnameserver bogus\nnameserver 1.1.1.1\n",
        );
        assert_eq!(
            ok,
            [Ipv4Addr::new(10, 255, 255, 53), Ipv4Addr::new(1, 1, 1, 1)]
        );
        assert_eq!(lo, [Ipv4Addr::new(127, 0, 0, 53)]);
    }

    /// The table holds the deny, allow, built-in and resolver sets in that
    /// order of precedence, drops IPv6 and the host, and is valid for the
    /// installed nft (`--check` changes nothing).
    #[test]
    fn ruleset_filters_in_order_and_passes_nft_check() {
        let opts = BridgeOptions {
            name: "svmcheck0".into(),
            egress_allow: vec!["10.1.0.0/16".parse().expect("cidr")],
            egress_deny: vec![
                "10.1.2.0/24".parse().expect("cidr"),
                "192.88.99.1".parse().expect("cidr"),
            ],
            ..BridgeOptions::default()
        };
        let rs = ruleset(&opts, &[Ipv4Addr::new(10, 255, 255, 53)]).expect("ruleset")
            + &antispoof_ruleset("stacyvm_svmcheck0");
        assert!(
            rs.contains("iifname . ether saddr . ip saddr @bound4 accept"),
            "{rs}"
        );
        for cidr in BLOCKED_V4 {
            assert!(rs.contains(cidr), "{cidr} missing");
        }
        assert!(rs.contains("table inet stacyvm_svmcheck0 {\n"), "{rs}");
        assert!(
            rs.contains("delete table ip stacyvm_svmcheck0"),
            "legacy table removed"
        );
        assert!(
            rs.contains("elements = { 10.1.2.0/24, 192.88.99.1/32 }"),
            "{rs}"
        );
        assert!(rs.contains("elements = { 10.255.255.53 }"), "{rs}");
        let forward = rs.split("chain forward").nth(1).expect("forward chain");
        let pos = |needle: &str| {
            forward
                .find(needle)
                .unwrap_or_else(|| panic!("{needle} missing: {forward}"))
        };
        assert!(pos("nfproto != ipv4 drop") < pos("@deny4 drop"));
        assert!(pos("@deny4 drop") < pos("@allow4 accept"));
        assert!(pos("@allow4 accept") < pos("@resolvers4"));
        assert!(pos("@resolvers4") < pos("@blocked4 drop"));
        let input = rs.split("chain input").nth(1).expect("input chain");
        assert!(input.contains("iifname \"svmcheck0\" drop"), "{input}");
        let out = std::process::Command::new("nft")
            .args(["--check", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                if let Some(mut w) = c.stdin.take() {
                    w.write_all(rs.as_bytes())?;
                }
                c.wait_with_output()
            })
            .expect("nft (apt-get install nftables)");
        assert!(
            out.status.success(),
            "{}\n{rs}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v6 = BridgeOptions {
            egress_allow: vec!["fd00::/8".parse().expect("cidr")],
            ..BridgeOptions::default()
        };
        assert!(ruleset(&v6, &[]).is_err(), "IPv6 egress rules are refused");
    }

    #[test]
    fn forward_rules_are_marked_accepts_and_legacy_ones_are_not() {
        let ours = forward_rules("stacyvm0");
        for r in &ours {
            assert!(r.windows(2).any(|w| w == ["--comment", "stacyvm:stacyvm0"]));
            assert_eq!(r.last().map(String::as_str), Some("ACCEPT"));
        }
        for r in legacy_forward_rules("stacyvm0") {
            assert!(!r.contains(&"--comment".to_string()));
            assert!(!ours.contains(&r));
        }
    }

    #[test]
    fn host_interface_names_fit_ifnamsiz() {
        let n = host_if_name("sb-0123456789abcdef");
        assert!(n.len() <= 15, "{n}");
        assert_ne!(n, host_if_name("sb-0123456789abcdee"));
    }
}
