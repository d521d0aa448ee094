//! `bridge` networking for native sandboxes: a host bridge with NAT, one
//! veth pair per sandbox.
//!
//! Every native sandbox has its own network namespace. In `none` mode it
//! holds only loopback. In `bridge` mode the provider, after boot, creates
//! a veth pair whose inner end becomes `eth0` in the sandbox (address from
//! the bridge subnet, default route via the bridge), and whose host end is
//! an isolated port of the bridge (sandboxes cannot reach each other).
//!
//! Host side, set up once per bridge and idempotently:
//! - the bridge itself, with the subnet's first address as gateway;
//! - an nftables table `ip stacyvm_<bridge>` that masquerades traffic
//!   leaving through another interface and drops every new connection from
//!   the bridge to the host itself (the StacyVM API and any other host
//!   service stay unreachable from sandboxes);
//! - `ip_forward` on, and, when iptables has a FORWARD chain (Docker sets
//!   its policy to DROP), accept rules for the bridge's traffic there.
//!
//! Addresses are leased through files under `/run/stacyvm/net/<bridge>/`
//! (created with O_EXCL, so concurrent servers and tests never share one);
//! they live in /run because veths and namespaces do not survive a reboot.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use stacyvm_core::{Error, Result};
use tracing::info;

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
}

impl Default for BridgeOptions {
    fn default() -> Self {
        BridgeOptions {
            name: "stacyvm0".into(),
            subnet: Subnet::parse("10.88.0.0/16").expect("valid default"),
        }
    }
}

/// What a sandbox holds on the bridge (kept in its meta.json).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub bridge: String,
    pub ip: Ipv4Addr,
    pub host_if: String,
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
}

impl Bridge {
    pub fn new(opts: BridgeOptions) -> Self {
        let lease_dir = PathBuf::from("/run/stacyvm/net").join(&opts.name);
        Bridge {
            opts,
            lease_dir,
            ready: std::sync::OnceLock::new(),
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
        // `replace` is idempotent; the bridge must be up even with no ports.
        run("ip", &["addr", "replace", &gw, "dev", name], None)?;
        run("ip", &["link", "set", name, "up"], None)?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| Error::internal("enabling ip_forward").with_source(e))?;
        // One transaction: create-if-missing, drop, recreate.
        let table = format!("stacyvm_{name}");
        let rules = format!(
            "table ip {table} {{}}\n\
             delete table ip {table}\n\
             table ip {table} {{\n\
               chain postrouting {{\n\
                 type nat hook postrouting priority srcnat; policy accept;\n\
                 ip saddr {subnet} oifname != \"{name}\" masquerade\n\
               }}\n\
               chain input {{\n\
                 type filter hook input priority filter; policy accept;\n\
                 iifname \"{name}\" ct state established,related accept\n\
                 iifname \"{name}\" drop\n\
               }}\n\
               chain forward {{\n\
                 type filter hook forward priority filter; policy accept;\n\
                 iifname \"{name}\" oifname \"{name}\" drop\n\
               }}\n\
             }}\n",
            subnet = self.opts.subnet,
        );
        run("nft", &["-f", "-"], Some(&rules))?;
        self.allow_in_iptables_forward();
        let _ = self.ready.set(());
        Ok(())
    }

    /// Docker sets the iptables FORWARD policy to DROP, which would also
    /// drop the bridge's traffic; accept it there (idempotently).
    fn allow_in_iptables_forward(&self) {
        let name = self.opts.name.as_str();
        let rules: [&[&str]; 2] = [
            &["-i", name, "!", "-o", name, "-j", "ACCEPT"],
            &[
                "-o",
                name,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ],
        ];
        for rule in rules {
            let mut check = vec!["-C", "FORWARD"];
            check.extend_from_slice(rule);
            if run("iptables", &check, None).is_ok() {
                continue;
            }
            let mut insert = vec!["-I", "FORWARD"];
            insert.extend_from_slice(rule);
            if let Err(e) = run("iptables", &insert, None) {
                // No iptables at all: nothing else can be dropping.
                tracing::debug!(error = %e, "iptables FORWARD rule not added");
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
        self.ensure()?;
        let host_if = host_if_name(sandbox_id);
        let ip = self.lease(sandbox_id, &host_if)?;
        let att = Attachment {
            bridge: self.opts.name.clone(),
            ip,
            host_if: host_if.clone(),
        };
        let res = self.wire(&att, init_pid);
        if res.is_err() {
            self.detach(&att);
        }
        res.map(|()| att)
    }

    fn wire(&self, att: &Attachment, init_pid: i32) -> Result<()> {
        let pid = init_pid.to_string();
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
        if iface_exists(&att.host_if) {
            let _ = run("ip", &["link", "del", &att.host_if], None);
        }
        let lease = self.lease_dir.join(att.ip.to_string());
        if std::fs::read_to_string(&lease).is_ok_and(|o| o.trim() == att.host_if) {
            let _ = std::fs::remove_file(lease);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn host_interface_names_fit_ifnamsiz() {
        let n = host_if_name("sb-0123456789abcdef");
        assert!(n.len() <= 15, "{n}");
        assert_ne!(n, host_if_name("sb-0123456789abcdee"));
    }
}
