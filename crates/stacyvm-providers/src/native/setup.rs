//! The native provider's module: built from `providers.native.*`, with its
//! own `config lint` and `doctor` checks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stacyvm_core::checks::{self, Report};
use stacyvm_core::cidr::Cidr;
use stacyvm_core::config::Config;
use stacyvm_core::provider::Provider;
use stacyvm_core::{Error, Result};

use crate::registry::ProviderModule;

pub struct NativeModule;

/// A CIDR list of the config (validated at load; the key names an error).
fn parse_cidrs(key: &str, list: &[String]) -> Result<Vec<Cidr>> {
    list.iter()
        .map(|entry| {
            entry
                .parse()
                .map_err(|e| Error::invalid(format!("{key}: {entry:?}: {e}")))
        })
        .collect()
}

/// The host bridge every provider that offers `bridge` networking on it
/// shares (native sandboxes, microVMs): one subnet, one set of egress rules.
pub fn bridge_options(cfg: &Config) -> Result<super::net::BridgeOptions> {
    let n = &cfg.providers.native;
    Ok(super::net::BridgeOptions {
        name: n.bridge_name.clone(),
        subnet: super::net::Subnet::parse(&n.bridge_subnet)
            .map_err(|e| Error::invalid(format!("providers.native.bridge_subnet: {e}")))?,
        egress_allow: parse_cidrs("providers.native.egress_allow", &n.egress_allow)?,
        egress_deny: parse_cidrs("providers.native.egress_deny", &n.egress_deny)?,
        ..Default::default()
    })
}

/// The provider's options from `providers.native.*` and the server's data dir.
pub fn options(cfg: &Config) -> Result<super::NativeOptions> {
    let n = &cfg.providers.native;
    let agent = crate::agent::find_agent(&n.agent_path).ok_or_else(|| {
        Error::invalid("stacyvm-agent not found next to the stacyvm binary; build it (cargo build -p stacyvm-agent) or set providers.native.agent_path")
    })?;
    let data = Path::new(&cfg.server.data_dir);
    Ok(super::NativeOptions {
        state_dir: data.join("native"),
        agent_path: agent,
        pids_limit: u64::try_from(n.pids_limit).unwrap_or(512),
        hidden: vec![cfg.server.data_dir.clone()],
        network_mode: n.network_mode.clone(),
        bridge: bridge_options(cfg)?,
        warm_pool: usize::try_from(n.warm_pool).unwrap_or(0),
        pool_memory_mb: cfg.defaults.memory_mb,
        landlock: n.landlock,
        user_namespace: n.user_namespace,
        subordinate_ids: super::ids::IdRange::parse(&n.subordinate_ids)
            .map_err(|e| Error::invalid(format!("providers.native.subordinate_ids: {e}")))?,
        disk: super::disk::DiskCaps {
            per_sandbox: u64::try_from(n.disk_mb).unwrap_or(0) << 20,
            min_free: u64::try_from(n.disk_min_free_mb).unwrap_or(0) << 20,
            interval: Duration::from_secs(5),
        },
    })
}

#[async_trait]
impl ProviderModule for NativeModule {
    fn kind(&self) -> &'static str {
        "native"
    }

    fn enabled(&self, cfg: &Config) -> bool {
        cfg.providers.native.enabled
    }

    fn build(&self, cfg: &Config) -> Result<Arc<dyn Provider>> {
        Ok(Arc::new(super::NativeProvider::new(options(cfg)?)?))
    }

    fn lint(&self, cfg: &Config, p: bool, r: &mut Report) {
        let n = &cfg.providers.native;
        if n.pids_limit <= 0 {
            r.prod(
                p,
                "providers.native.pids_limit",
                "no process limit per sandbox",
                "set providers.native.pids_limit, e.g. 512",
            );
        } else {
            r.pass("providers.native.pids_limit", n.pids_limit.to_string());
        }
        if n.network_mode == "bridge" {
            r.warn(
                "providers.native.network_mode",
                "sandboxes get network access by default",
                "use none unless workloads need the network; spawns can still ask for bridge",
            );
        } else {
            r.pass("providers.native.network_mode", n.network_mode.clone());
        }
    }

    async fn doctor(&self, cfg: &Config, _production: bool, r: &mut Report) {
        check_native(r, cfg);
    }
}

fn check_native(r: &mut Report, cfg: &Config) {
    let n = &cfg.providers.native;
    let root = nix::unistd::geteuid().is_root();
    if root {
        r.pass("native.root", "running as root");
    } else {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        match userns_available(
            read("/proc/sys/user/max_user_namespaces").as_deref(),
            read("/proc/sys/kernel/unprivileged_userns_clone").as_deref(),
        ) {
            Ok(()) => r.warn(
                "native.root",
                "not root: rootless mode, sandboxes get a user namespace and no warm pool",
                "run stacyvm serve as root for full isolation, cgroup limits and the warm pool",
            ),
            Err(why) => r.fail(
                "native.root",
                format!("not root, and rootless mode is impossible: {why}"),
                "run stacyvm serve as root, or allow user namespaces (sysctl user.max_user_namespaces=15000)",
            ),
        }
    }
    match crate::agent::find_agent(&n.agent_path) {
        Some(p) if checks::is_executable(&p) => match crate::agent::elf_is_static(&p) {
            Some(true) => r.pass("native.agent", format!("{} (static)", p.display())),
            Some(false) => r.warn(
                "native.agent",
                format!("{} is dynamically linked; it fails in images without a matching libc", p.display()),
                "build it static: RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release --target x86_64-unknown-linux-gnu -p stacyvm-agent",
            ),
            None => r.fail(
                "native.agent",
                format!("{} is not an ELF executable", p.display()),
                "point providers.native.agent_path at the stacyvm-agent binary",
            ),
        },
        Some(p) => r.fail(
            "native.agent",
            format!("{} is missing or not executable", p.display()),
            "install stacyvm-agent next to stacyvm or set providers.native.agent_path",
        ),
        None => r.fail(
            "native.agent",
            "stacyvm-agent not found next to the stacyvm binary",
            "install stacyvm-agent next to stacyvm or set providers.native.agent_path",
        ),
    }
    let missing: Vec<&str> = ["mnt", "pid", "uts", "ipc", "net", "cgroup"]
        .into_iter()
        .filter(|ns| !Path::new("/proc/self/ns").join(ns).exists())
        .collect();
    if missing.is_empty() {
        r.pass("native.namespaces", "mnt, pid, uts, ipc, net, cgroup");
    } else {
        r.fail(
            "native.namespaces",
            format!("the kernel lacks namespaces: {}", missing.join(", ")),
            "use a kernel built with CONFIG_*_NS for each, or another provider",
        );
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if filesystems
        .lines()
        .any(|l| l.trim_end().ends_with("overlay"))
    {
        r.pass("native.overlayfs", "available");
    } else {
        r.fail(
            "native.overlayfs",
            "the kernel has no overlayfs",
            "load it: modprobe overlay (and add it to /etc/modules)",
        );
    }
    check_cgroups(r, root);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if status.lines().any(|l| l.starts_with("Seccomp:")) {
        r.pass("native.seccomp", "available");
    } else {
        r.fail(
            "native.seccomp",
            "the kernel has no seccomp",
            "use a kernel with CONFIG_SECCOMP_FILTER",
        );
    }
    let bridge_tools: Vec<&str> = ["ip", "nft"]
        .into_iter()
        .filter(|t| checks::which(t).is_none())
        .collect();
    if bridge_tools.is_empty() {
        r.pass(
            "native.network",
            format!("default {}; ip and nft found", n.network_mode),
        );
    } else {
        let msg = format!(
            "bridge networking needs {} in PATH",
            bridge_tools.join(" and ")
        );
        let fix = "install iproute2 and nftables";
        if n.network_mode == "bridge" {
            r.fail("native.network", msg, fix);
        } else {
            r.warn(
                "native.network",
                format!("{msg} (spawns asking for bridge fail)"),
                fix,
            );
        }
    }
}

/// Whether unprivileged user namespaces are allowed, from the contents of
/// `user.max_user_namespaces` and Debian's `kernel.unprivileged_userns_clone`
/// (absent on other kernels).
fn userns_available(max: Option<&str>, unprivileged: Option<&str>) -> Result<(), String> {
    match max {
        Some(m) if m.trim() != "0" => {}
        _ => return Err("user.max_user_namespaces is 0".into()),
    }
    if unprivileged.is_some_and(|u| u.trim() == "0") {
        return Err("kernel.unprivileged_userns_clone is 0".into());
    }
    Ok(())
}

/// This process's own cgroup directories (where a rootless server would
/// create sandbox cgroups).
fn own_cgroup_dirs() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if ctls.is_empty() {
            if root.join("cgroup.controllers").is_file() {
                dirs.push(root.join(rel));
            }
        } else {
            for ctl in ["memory", "pids", "cpu"] {
                if ctls.split(',').any(|c| c == ctl)
                    && root.join(ctl).join("cgroup.procs").is_file()
                {
                    dirs.push(root.join(ctl).join(rel));
                }
            }
        }
    }
    dirs
}

fn check_cgroups(r: &mut Report, root_user: bool) {
    if !root_user {
        let dirs = own_cgroup_dirs();
        let writable = !dirs.is_empty()
            && dirs
                .iter()
                .all(|d| nix::unistd::access(d.as_path(), nix::unistd::AccessFlags::W_OK).is_ok());
        if !writable {
            r.warn(
                "native.cgroups",
                "rootless without a delegated cgroup: memory and cpu limits are not enforced",
                "run as root, or start stacyvm in a delegated cgroup (systemd: Delegate=yes)",
            );
            return;
        }
    }
    let root = Path::new("/sys/fs/cgroup");
    let wanted = ["memory", "pids", "cpu"];
    let (kind, have): (&str, Vec<&str>) =
        match std::fs::read_to_string(root.join("cgroup.controllers")) {
            Ok(ctl) => (
                "v2",
                wanted
                    .into_iter()
                    .filter(|w| ctl.split_whitespace().any(|c| c == *w))
                    .collect(),
            ),
            Err(_) => (
                "v1",
                wanted
                    .into_iter()
                    .filter(|w| root.join(w).join("cgroup.procs").is_file())
                    .collect(),
            ),
        };
    let missing: Vec<&str> = wanted.into_iter().filter(|w| !have.contains(w)).collect();
    if have.is_empty() {
        r.fail(
            "native.cgroups",
            "no memory, pids or cpu cgroup controller is mounted under /sys/fs/cgroup",
            "mount cgroups (systemd does) so sandbox limits can be enforced",
        );
    } else if missing.is_empty() {
        r.pass("native.cgroups", format!("{kind}: memory, pids, cpu"));
    } else {
        r.warn(
            "native.cgroups",
            format!("{kind}: missing {} (those limits are not enforced)", missing.join(", ")),
            "enable the missing controllers (cgroup_enable= kernel parameters or systemd delegation)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_namespace_availability() {
        assert!(userns_available(Some("15000\n"), None).is_ok());
        assert!(userns_available(Some("15000\n"), Some("1\n")).is_ok());
        assert!(userns_available(Some("0\n"), None).is_err());
        assert!(userns_available(None, None).is_err());
        let e = userns_available(Some("100"), Some("0")).expect_err("debian switch off");
        assert!(e.contains("unprivileged_userns_clone"), "{e}");
    }
}
