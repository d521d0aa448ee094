//! The qemu provider's module: built from `providers.qemu.*`, with its own
//! `config lint` and `doctor` checks, and `stacyvm image kernel` (guest
//! kernel and initramfs ahead of the first spawn).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use stacyvm_core::checks::Report;
use stacyvm_core::config::Config;
use stacyvm_core::provider::Provider;
use stacyvm_core::{Error, Result};

use super::{kernel, Accel};
use crate::registry::ProviderModule;

pub struct QemuModule;

/// The static agent the guests boot (`STACYVM_AGENT_PATH`, else next to
/// the server).
fn agent() -> PathBuf {
    crate::agent::find_static_agent("").unwrap_or_else(|| PathBuf::from("stacyvm-agent"))
}

/// The provider's options from `providers.qemu.*`.
pub fn options(cfg: &Config) -> Result<super::qemu::QemuOptions> {
    let q = &cfg.providers.qemu;
    let data = Path::new(&cfg.server.data_dir);
    let accel = Accel::parse(&q.accel).ok_or_else(|| {
        Error::invalid(format!(
            "providers.qemu.accel {:?}: use auto, kvm or tcg",
            q.accel
        ))
    })?;
    Ok(super::qemu::QemuOptions {
        base: data.join("qemu").join("sandboxes"),
        cache: std::env::var("STACYVM_MICROVM_CACHE")
            .ok()
            .filter(|s| !s.is_empty())
            .map_or_else(|| q.cache_in(&cfg.server.data_dir), PathBuf::from),
        images_dir: data.join("native").join("images"),
        hidden: vec![cfg.server.data_dir.clone()],
        agent_path: agent(),
        qemu_binary: q.qemu_binary.clone(),
        accel,
        kernel_package: q.kernel_package.clone(),
        default_image: q.default_image.clone(),
        max_sandboxes: usize::try_from(q.max_sandboxes).unwrap_or(0),
        max_memory_mb: q.max_memory_mb,
        max_vcpus: u32::try_from(q.max_vcpus).unwrap_or(1),
        disk_mb: u64::try_from(q.disk_mb).unwrap_or(0),
        boot_timeout: q.boot_timeout.std(),
        exec_timeout: q.default_timeout.std(),
        snapshots: q.snapshots,
        network_mode: q.network_mode.clone(),
        bridge: crate::native::setup::bridge_options(cfg)?,
        subordinate_ids: crate::native::ids::IdRange::parse(&cfg.providers.native.subordinate_ids)
            .map_err(|e| Error::invalid(format!("providers.native.subordinate_ids: {e}")))?,
    })
}

#[async_trait]
impl ProviderModule for QemuModule {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    /// Naming it the default turns it on.
    fn enabled(&self, cfg: &Config) -> bool {
        cfg.providers.qemu.enabled || cfg.providers.default == "qemu"
    }

    fn build(&self, cfg: &Config) -> Result<Arc<dyn Provider>> {
        Ok(Arc::new(super::qemu::QemuProvider::new(options(cfg)?)?))
    }

    fn lint(&self, cfg: &Config, _p: bool, r: &mut Report) {
        let q = &cfg.providers.qemu;
        if Accel::parse(&q.accel).is_none() {
            r.fail(
                "providers.qemu.accel",
                format!("{:?} is not an accelerator", q.accel),
                "use auto, kvm or tcg",
            );
        }
        if q.boot_timeout.std().is_zero() {
            r.fail(
                "providers.qemu.boot_timeout",
                "0 gives every guest no time to boot",
                "leave it at 60s (TCG guests boot in seconds)",
            );
        }
        if q.disk_mb < 16 {
            r.fail(
                "providers.qemu.disk_mb",
                format!("{} MiB leaves sandboxes no room to write", q.disk_mb),
                "use at least 16 (default 2048)",
            );
        }
        if q.max_vcpus < 1 {
            r.fail(
                "providers.qemu.max_vcpus",
                "must be at least 1",
                "use the host's core count or fewer",
            );
        }
    }

    async fn doctor(&self, cfg: &Config, _production: bool, r: &mut Report) {
        check(cfg, r);
    }
}

fn check(cfg: &Config, r: &mut Report) {
    let q = &cfg.providers.qemu;
    match super::qemu::resolve_binary(&q.qemu_binary) {
        Some(p) => r.pass("qemu.binary", p.display().to_string()),
        None => r.fail(
            "qemu.binary",
            format!("{} not found in PATH", q.qemu_binary),
            "apt-get install qemu-system-x86 or set providers.qemu.qemu_binary",
        ),
    }
    match stacyvm_core::checks::which("mkfs.ext4") {
        Some(p) => r.pass("qemu.mkfs", p.display().to_string()),
        None => r.fail(
            "qemu.mkfs",
            "mkfs.ext4 not found (root disks are built with mkfs.ext4 -d)",
            "apt-get install e2fsprogs",
        ),
    }
    let a = agent();
    if crate::agent::elf_is_static(&a) == Some(true) {
        r.pass(
            "qemu.agent",
            format!("{} (static; the guests' init)", a.display()),
        );
    } else {
        r.fail(
            "qemu.agent",
            format!("{} is missing or not a static binary", a.display()),
            "build it with scripts/build-agent DIR and set STACYVM_AGENT_PATH, or install it next to stacyvm",
        );
    }
    let cache = options(cfg).map_or_else(|_| q.cache_in(&cfg.server.data_dir), |o| o.cache);
    match kernel::cached_any(&cache) {
        Some(k) if k.modules.iter().all(|m| m.is_file()) => r.pass(
            "qemu.kernel",
            format!("{} (and its virtio modules)", k.vmlinuz.display()),
        ),
        _ => r.warn(
            "qemu.kernel",
            format!(
                "no guest kernel in {} yet (the first spawn downloads it)",
                cache.display()
            ),
            "run `stacyvm image kernel` to fetch it now",
        ),
    }
    match (Accel::parse(&q.accel), super::kvm_usable()) {
        (Some(Accel::Tcg), _) => r.pass("qemu.accel", "tcg (configured)"),
        (Some(Accel::Kvm), Ok(())) => r.pass("qemu.accel", "kvm (configured; /dev/kvm opens)"),
        (Some(Accel::Kvm), Err(why)) => r.fail(
            "qemu.accel",
            format!("accel is kvm but {why}"),
            "set providers.qemu.accel to auto or tcg, or fix /dev/kvm access",
        ),
        (_, Ok(())) => r.pass(
            "qemu.accel",
            "auto: /dev/kvm opens; the first spawn boots a probe guest with KVM and falls back to TCG if it does not answer",
        ),
        (_, Err(why)) => r.warn(
            "qemu.accel",
            format!("auto: {why}; guests run under TCG (binary translation, boots take seconds)"),
            "use a host with VT-x/AMD-V and /dev/kvm for fast microVMs",
        ),
    }
}

/// `stacyvm image kernel`: downloads the guest kernel and builds the
/// initramfs for this agent; returns what it installed.
pub fn install(cfg: &Config) -> Result<(kernel::Kernel, PathBuf)> {
    let o = options(cfg)?;
    let k = kernel::install(&o.cache, &o.kernel_package)?;
    let initrd = kernel::initramfs_for(&o.cache, &o.agent_path, &k)?;
    Ok((k, initrd))
}
