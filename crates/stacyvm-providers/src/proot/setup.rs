//! The PRoot provider's module: built from `providers.proot.*`, with its
//! own `config lint` and `doctor` checks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stacyvm_core::checks::Report;
use stacyvm_core::config::Config;
use stacyvm_core::provider::Provider;
use stacyvm_core::{Error, Result};

use crate::registry::ProviderModule;

pub struct ProotModule;

/// The provider's options from `providers.proot.*` (and the native
/// provider's subordinate id range, which both lease from).
pub fn options(cfg: &Config) -> Result<super::ProotOptions> {
    let pc = &cfg.providers.proot;
    let data = Path::new(&cfg.server.data_dir);
    Ok(super::ProotOptions {
        base: pc.workspace_base_in(&cfg.server.data_dir),
        // The image store the native provider uses.
        images_dir: data.join("native").join("images"),
        rootfs_path: pc.rootfs_in(&cfg.server.data_dir),
        hidden: vec![cfg.server.data_dir.clone()],
        agent_path: crate::agent::find_static_agent("")
            .unwrap_or_else(|| PathBuf::from("stacyvm-agent")),
        proot_binary: pc.proot_binary.clone(),
        max_sandboxes: usize::try_from(pc.max_sandboxes).unwrap_or(0),
        max_memory_mb: pc.max_memory_mb,
        pids_limit: u64::try_from(pc.pids_limit).unwrap_or(512),
        exec_timeout: pc.default_timeout.std(),
        subordinate_ids: crate::native::ids::IdRange::parse(&cfg.providers.native.subordinate_ids)
            .map_err(|e| Error::invalid(format!("providers.native.subordinate_ids: {e}")))?,
        disk: crate::native::disk::DiskCaps {
            per_sandbox: u64::try_from(pc.max_disk_mb).unwrap_or(0) << 20,
            min_free: 0,
            interval: Duration::from_secs(5),
        },
    })
}

#[async_trait]
impl ProviderModule for ProotModule {
    fn kind(&self) -> &'static str {
        "proot"
    }

    /// Naming it the default turns it on.
    fn enabled(&self, cfg: &Config) -> bool {
        cfg.providers.proot.enabled || cfg.providers.default == "proot"
    }

    fn build(&self, cfg: &Config) -> Result<Arc<dyn Provider>> {
        Ok(Arc::new(super::ProotProvider::new(options(cfg)?)?))
    }

    fn lint(&self, _cfg: &Config, p: bool, r: &mut Report) {
        r.prod(
            p,
            "providers.proot.enabled",
            "proot is ptrace-based path translation, not an isolation boundary",
            "use native, docker or firecracker for untrusted code",
        );
    }

    async fn doctor(&self, cfg: &Config, _production: bool, r: &mut Report) {
        check_proot(r, cfg);
    }
}

fn check_proot(r: &mut Report, cfg: &Config) {
    let pc = &cfg.providers.proot;
    match super::resolve_binary(&pc.proot_binary) {
        Some(p) => r.pass("proot.binary", p.display().to_string()),
        None => r.fail(
            "proot.binary",
            format!("{} not found in PATH", pc.proot_binary),
            "apt-get install proot or set providers.proot.proot_binary",
        ),
    }
    // Imported images have no host libc: the agent must be static.
    match crate::agent::find_static_agent("") {
        Some(p) if crate::agent::elf_is_static(&p) == Some(true) => {
            r.pass("proot.agent", format!("{} (static)", p.display()));
        }
        found => r.fail(
            "proot.agent",
            match found {
                Some(p) => format!("{} is not a static binary", p.display()),
                None => "stacyvm-agent not found".to_string(),
            },
            "build it with scripts/build-agent DIR and set STACYVM_AGENT_PATH, or install it next to stacyvm",
        ),
    }
    // rootfs_path is optional (image `rootfs`); workspace_base is created
    // at start when missing.
    let rootfs = pc.rootfs_in(&cfg.server.data_dir);
    match std::fs::metadata(&rootfs) {
        Ok(m) if m.is_dir() => r.pass("proot.rootfs", rootfs.display().to_string()),
        Ok(_) => r.fail(
            "proot.rootfs",
            format!("{} is not a directory", rootfs.display()),
            "point providers.proot.rootfs_path at a root directory, or leave it empty",
        ),
        Err(_) if pc.rootfs_path.is_empty() => r.pass(
            "proot.rootfs",
            "not set: images are `host` and imported ones (stacyvm image ls)",
        ),
        Err(_) => r.fail(
            "proot.rootfs",
            format!("{} does not exist", rootfs.display()),
            "unpack a root filesystem there, or leave providers.proot.rootfs_path empty",
        ),
    }
    let base = pc.workspace_base_in(&cfg.server.data_dir);
    match std::fs::metadata(&base) {
        Ok(m) if !m.is_dir() => r.fail(
            "proot.workspace_base",
            format!("{} is not a directory", base.display()),
            "point providers.proot.workspace_base at a directory, or leave it empty",
        ),
        Ok(_) => r.pass("proot.workspace_base", base.display().to_string()),
        Err(_) => r.pass(
            "proot.workspace_base",
            format!("{} (created at start, 0700)", base.display()),
        ),
    }
    if stacyvm_sandbox::proot::landlock_available() {
        r.pass(
            "proot.landlock",
            "enforced (sandboxes read and write only their own dirs)",
        );
    } else {
        r.warn(
            "proot.landlock",
            "this kernel does not enforce landlock: proot sandboxes are confined by proot, seccomp and their uid only",
            "use Linux 5.13 or later with landlock in the LSM list (lsm=…,landlock)",
        );
    }
    if nix::unistd::geteuid().is_root() {
        r.pass(
            "proot.mode",
            "root: each sandbox gets a leased uid, a private mount and network namespace",
        );
    } else {
        r.warn(
            "proot.mode",
            "rootless: sandboxes run as the server's own uid and share the host network",
            "run untrusted code only on a root server (or use the native provider)",
        );
    }
}
