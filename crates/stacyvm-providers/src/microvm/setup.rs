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

// ----- firecracker ----------------------------------------------------

fn which(name: &str) -> Option<PathBuf> {
    stacyvm_core::checks::which(name)
}

fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".stacyvm-doctor-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

/// `providers.firecracker.data_dir`, else the server's data dir.
fn fc_data_dir(cfg: &Config) -> String {
    let f = &cfg.providers.firecracker;
    if f.data_dir.is_empty() {
        cfg.server.data_dir.clone()
    } else {
        f.data_dir.clone()
    }
}

/// The microVM cache (shared with qemu: initramfs, root disks, the KVM
/// probe's verdict).
fn fc_cache(cfg: &Config) -> PathBuf {
    std::env::var("STACYVM_MICROVM_CACHE")
        .ok()
        .filter(|s| !s.is_empty())
        .map_or_else(
            || cfg.providers.qemu.cache_in(&cfg.server.data_dir),
            PathBuf::from,
        )
}

/// The firecracker provider's options from `providers.firecracker.*` (the
/// initramfs's kernel modules and the cache are qemu's settings).
pub fn fc_options(cfg: &Config) -> Result<super::fcvm::FirecrackerOptions> {
    let f = &cfg.providers.firecracker;
    let data = PathBuf::from(fc_data_dir(cfg));
    let agent = resolve_agent(&f.agent_path)
        .or_else(|| crate::agent::find_static_agent(""))
        .unwrap_or_else(|| PathBuf::from(&f.agent_path));
    Ok(super::fcvm::FirecrackerOptions {
        base: data.join("firecracker").join("sandboxes"),
        cache: fc_cache(cfg),
        images_dir: Path::new(&cfg.server.data_dir)
            .join("native")
            .join("images"),
        hidden: vec![cfg.server.data_dir.clone()],
        agent_path: agent,
        firecracker_binary: f.firecracker_path.clone(),
        jailer: (!f.jailer_path.is_empty()).then(|| PathBuf::from(&f.jailer_path)),
        kernel_path: PathBuf::from(&f.kernel_path),
        kernel_package: cfg.providers.qemu.kernel_package.clone(),
        default_image: f.default_rootfs.clone(),
        max_sandboxes: usize::try_from(f.max_sandboxes).unwrap_or(0),
        max_memory_mb: f.max_memory_mb,
        max_vcpus: u32::try_from(f.max_vcpus).unwrap_or(1),
        disk_mb: u64::try_from(f.disk_mb).unwrap_or(0),
        boot_timeout: f.boot_timeout.std(),
        exec_timeout: f.default_timeout.std(),
        snapshots: f.snapshots,
        subordinate_ids: crate::native::ids::IdRange::parse(&cfg.providers.native.subordinate_ids)
            .map_err(|e| Error::invalid(format!("providers.native.subordinate_ids: {e}")))?,
        bridge: crate::native::setup::bridge_options(cfg)?,
    })
}

pub struct FirecrackerModule;

#[async_trait]
impl ProviderModule for FirecrackerModule {
    fn kind(&self) -> &'static str {
        "firecracker"
    }

    /// Naming it the default turns it on.
    fn enabled(&self, cfg: &Config) -> bool {
        cfg.providers.firecracker.enabled || cfg.providers.default == "firecracker"
    }

    fn build(&self, cfg: &Config) -> Result<Arc<dyn Provider>> {
        Ok(Arc::new(super::fcvm::FirecrackerProvider::new(
            fc_options(cfg)?,
        )?))
    }

    fn lint(&self, cfg: &Config, _p: bool, r: &mut Report) {
        let f = &cfg.providers.firecracker;
        if f.boot_timeout.std().is_zero() {
            r.fail(
                "providers.firecracker.boot_timeout",
                "0 gives every guest no time to boot",
                "leave it at 30s",
            );
        }
        if f.disk_mb < 16 {
            r.fail(
                "providers.firecracker.disk_mb",
                format!("{} MiB leaves sandboxes no room to write", f.disk_mb),
                "use at least 16 (default 2048)",
            );
        }
        if !(1..=32).contains(&f.max_vcpus) {
            r.fail(
                "providers.firecracker.max_vcpus",
                format!("{} is outside Firecracker's 1..=32", f.max_vcpus),
                "use the host's core count or fewer",
            );
        }
    }

    async fn doctor(&self, cfg: &Config, _production: bool, r: &mut Report) {
        fc_check(cfg, r).await;
    }
}

/// Resolves a relative agent path like the firecracker provider does:
/// next to the executable, then the working directory, then `$PATH`.
fn resolve_agent(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    if path.is_absolute() {
        return path.is_file().then(|| path.to_path_buf());
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let c = dir.join(path);
        if c.is_file() {
            return Some(c);
        }
    }
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    which(path.file_name()?.to_str()?)
}

/// Runs `bin args…` with a 5 s limit; its stdout, or why it failed.
async fn probe_output(bin: &Path, args: &[&str]) -> Result<String, String> {
    let child = tokio::process::Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(std::time::Duration::from_secs(5), child).await {
        Err(_) => Err("no answer within 5 s".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(out)) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Ok(Ok(out)) => Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

async fn fc_check(cfg: &Config, r: &mut Report) {
    let f = &cfg.providers.firecracker;
    // Certification = this project's conformance suite passing on the
    // host, which runs only where Firecracker and a KVM that boots guests
    // exist (see `fcvm` tests); say which is missing.
    let fc_bin = which(&f.firecracker_path).or_else(|| which("firecracker"));
    let kvm_boots = super::kvm_boots_guests(&fc_cache(cfg));
    let missing: Vec<String> = [
        fc_bin
            .is_none()
            .then(|| "no firecracker binary".to_string()),
        match &kvm_boots {
            Ok(()) => None,
            Err(why) => Some(format!("no KVM that boots guests ({why})")),
        },
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        r.pass(
            "firecracker.provider",
            "firecracker and a guest-booting KVM are here: the conformance suite runs on it (cargo nextest run -E 'test(/firecracker_conformance/)')",
        );
    } else {
        r.warn(
            "firecracker.provider",
            format!(
                "not certified on this host: {} (the provider's API calls are tested against a recording fake of Firecracker's socket; its conformance suite runs only where both exist)",
                missing.join(", ")
            ),
            "use providers.qemu for microVMs here (KVM where a guest boots with it, else TCG)",
        );
    }
    let fc = which(&f.firecracker_path).or_else(|| which("firecracker"));
    match (fc, which("qemu-system-x86_64")) {
        (Some(p), _) => match probe_output(&p, &["--version"]).await {
            Ok(out) => r.pass(
                "firecracker.binary",
                format!(
                    "{} ({})",
                    p.display(),
                    out.lines().next().unwrap_or_default().trim()
                ),
            ),
            Err(e) => r.fail(
                "firecracker.binary",
                format!("{} does not run: {e}", p.display()),
                "reinstall firecracker for this architecture",
            ),
        },
        (None, Some(q)) => {
            r.warn(
                "firecracker.binary",
                format!(
                    "{} not found; microVMs use QEMU ({})",
                    f.firecracker_path,
                    q.display()
                ),
                "install firecracker and set providers.firecracker.firecracker_path to use it",
            );
            match probe_output(&q, &["-machine", "help"]).await {
                Ok(out) if out.lines().any(|l| l.split_whitespace().next() == Some("microvm")) => {
                    r.pass("firecracker.qemu", "QEMU has the microvm machine type");
                }
                Ok(_) => r.fail(
                    "firecracker.qemu",
                    format!("{} has no microvm machine type", q.display()),
                    "install a QEMU built with microvm support (Debian's qemu-system-x86 is)",
                ),
                Err(e) => r.fail(
                    "firecracker.qemu",
                    format!("{} does not run: {e}", q.display()),
                    "reinstall qemu-system-x86",
                ),
            }
        }
        (None, None) => r.fail(
            "firecracker.binary",
            format!("neither {} nor qemu-system-x86_64 found", f.firecracker_path),
            "install firecracker (set providers.firecracker.firecracker_path) or apt-get install qemu-system-x86",
        ),
    }
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => r.pass("firecracker.kvm", "/dev/kvm is usable"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => r.fail(
            "firecracker.kvm",
            "/dev/kvm does not exist",
            "enable virtualisation (VT-x/AMD-V or nested virtualisation) and load kvm_intel or kvm_amd",
        ),
        Err(e) => r.fail(
            "firecracker.kvm",
            format!("cannot open /dev/kvm: {e}"),
            "run stacyvm as root or add its user to the kvm group",
        ),
    }
    match super::fcvm::check_vmlinux(Path::new(&f.kernel_path)) {
        Ok(()) => r.pass(
            "firecracker.kernel",
            format!("{} (uncompressed ELF vmlinux)", f.kernel_path),
        ),
        Err(why) => r.fail(
            "firecracker.kernel",
            why,
            "put an uncompressed guest kernel (vmlinux) there or set providers.firecracker.kernel_path",
        ),
    }
    let data_dir = fc_data_dir(cfg);
    let data = Path::new(&data_dir);
    match std::fs::metadata(data) {
        Ok(m) if m.is_dir() => match probe_writable(data) {
            Ok(()) => r.pass("firecracker.data_dir", data_dir.clone()),
            Err(e) => r.fail(
                "firecracker.data_dir",
                format!("cannot write in {}: {e}", data_dir),
                "run stacyvm as the directory's owner or fix its permissions",
            ),
        },
        Ok(_) => r.fail(
            "firecracker.data_dir",
            format!("{} is not a directory", data_dir),
            "point providers.firecracker.data_dir at a directory",
        ),
        Err(_) => r.warn(
            "firecracker.data_dir",
            format!("{} does not exist yet", data_dir),
            format!("create it: install -d -m 0750 {}", data_dir),
        ),
    }
    match resolve_agent(&f.agent_path) {
        Some(p) => r.pass("firecracker.agent", p.display().to_string()),
        None => r.fail(
            "firecracker.agent",
            format!(
                "{} not found (next to stacyvm, in the working directory or PATH)",
                f.agent_path
            ),
            "set providers.firecracker.agent_path to the static stacyvm-agent binary",
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
