//! `stacyvm doctor [--production]`: checks that this host can run the
//! configured providers (spec/config-and-cli.md §6).
//!
//! Unlike `config lint`, doctor looks at the machine: files, devices,
//! kernel features, the Docker engine. Each provider has its own function
//! below; a provider that is neither enabled nor the default gets one WARN
//! line and no further checks. With `--production` the spec's softer
//! findings (weak keys, missing database directory, the mock provider)
//! become failures. Any FAIL makes the command exit with status 1.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use stacyvm_core::config::{self, Config};

use crate::checks::{self, Report};
use crate::lint::provider_enabled;

/// Arguments of `stacyvm doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Treat production concerns (weak keys, mock provider, missing
    /// database directory) as failures.
    #[arg(long)]
    pub production: bool,
    /// Config file (default: ./stacyvm.yaml, then ~/.stacyvm/config.yaml).
    #[arg(long, short = 'c', env = "STACYVM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: &DoctorArgs) -> Result<()> {
    let report = diagnose(args.config.as_deref(), args.production).await;
    checks::finish(&report, args.json, "doctor")
}

/// Loads the config and runs every check; a config that does not load is
/// the only check reported.
pub async fn diagnose(config_path: Option<&Path>, production: bool) -> Report {
    let mut r = Report::default();
    let cfg = match config::load(config_path, std::env::vars()) {
        Ok(l) => {
            let src = l
                .source
                .as_ref()
                .map_or_else(|| "built-in defaults".into(), |p| p.display().to_string());
            r.pass("config", format!("loaded ({src})"));
            l.config
        }
        Err(e) => {
            r.fail(
                "config",
                e.to_string(),
                "fix the config file; `stacyvm config lint` shows the details",
            );
            return r;
        }
    };
    check_config(&mut r, &cfg, production);
    check_database(&mut r, &cfg, production).await;
    check_data_dir(&mut r, &cfg);
    check_native(&mut r, &cfg);
    check_docker(&mut r, &cfg).await;
    check_firecracker(&mut r, &cfg).await;
    check_proot(&mut r, &cfg);
    r
}

fn used(cfg: &Config, name: &str) -> bool {
    provider_enabled(cfg, name).unwrap_or(false) || cfg.providers.default == name
}

fn check_config(r: &mut Report, cfg: &Config, p: bool) {
    crate::lint::listen_rule(r, cfg, p);
    let a = &cfg.auth;
    let key_fix = "set it to a random value of at least 32 characters, e.g. `openssl rand -hex 32`";
    match a.api_key.expose().chars().count() {
        0 => r.prod(p, "auth.api_key", "not set: the API is open", key_fix),
        n if n < 32 => r.prod(p, "auth.api_key", format!("only {n} characters"), key_fix),
        _ => r.pass("auth.api_key", "set"),
    }
    if a.admin_api_key.is_empty() {
        r.prod(
            p,
            "auth.admin_api_key",
            "not set",
            "set auth.admin_api_key to its own random value",
        );
    } else if a.admin_api_key == a.api_key {
        r.prod(
            p,
            "auth.admin_api_key",
            "equal to auth.api_key",
            "give the admin key its own random value",
        );
    } else {
        r.pass("auth.admin_api_key", "set");
    }
    if a.admin_fallback_enabled {
        r.prod(
            p,
            "auth.admin_fallback_enabled",
            "the API key is accepted on admin routes when no admin key is set",
            "set auth.admin_fallback_enabled: false",
        );
    } else {
        r.pass("auth.admin_fallback_enabled", "false");
    }
    let default = cfg.providers.default.as_str();
    match provider_enabled(cfg, default) {
        Some(true) => r.pass("providers.default", format!("{default} (enabled)")),
        Some(false) => r.fail(
            "providers.default",
            format!("{default} is not enabled; the server will not start"),
            format!("set providers.{default}.enabled: true or pick an enabled provider"),
        ),
        None => r.fail(
            "providers.default",
            format!("unknown provider {default:?}"),
            "use native, docker, firecracker or proot",
        ),
    }
    if cfg.providers.mock.enabled {
        r.prod(
            p,
            "providers.mock",
            "enabled: it runs sandbox commands on the host without isolation",
            "set providers.mock.enabled: false outside tests",
        );
    }
}

async fn check_database(r: &mut Report, cfg: &Config, p: bool) {
    if cfg.is_postgres() {
        r.fail(
            "database.driver",
            "postgres is not available in this build",
            "use database.driver: sqlite",
        );
        return;
    }
    r.pass("database.driver", "sqlite");
    let path = cfg.sqlite_path();
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.is_relative() {
        r.warn(
            "database.path",
            format!("{} is relative to the working directory", path.display()),
            "use an absolute path, e.g. /var/lib/stacyvm/stacyvm.db",
        );
    }
    match fs::metadata(&parent) {
        // The default location is inside server.data_dir, which serve
        // creates (checked below).
        Err(_) if cfg.database.path.trim().is_empty() => {
            r.pass(
                "database.path",
                format!("{} (created with server.data_dir)", path.display()),
            );
            return;
        }
        Err(_) => {
            r.prod(
                p,
                "database.path",
                format!("directory {} does not exist", parent.display()),
                format!("create it: install -d -m 0750 {}", parent.display()),
            );
            return;
        }
        Ok(m) if !m.is_dir() => {
            r.fail(
                "database.path",
                format!("{} is not a directory", parent.display()),
                "point database.path into a directory",
            );
            return;
        }
        Ok(_) => {
            if let Err(e) = probe_writable(&parent) {
                r.fail(
                    "database.path",
                    format!("cannot write in {}: {e}", parent.display()),
                    "run stacyvm as the directory's owner or fix its permissions",
                );
                return;
            }
        }
    }
    if !path.is_relative() {
        r.pass("database.path", path.display().to_string());
    }
    if !path.is_file() {
        r.pass(
            "database.integrity",
            "no database yet; created on first start",
        );
        return;
    }
    match stacyvm_store::backup::verify(&path).await {
        Ok(info) => r.pass(
            "database.integrity",
            format!("ok (schema version {})", info.schema_version),
        ),
        Err(e) => r.fail(
            "database.integrity",
            e.to_string(),
            "restore the latest backup: stacyvm db restore BACKUP --yes",
        ),
    }
}

/// Creates and removes a file in `dir`.
fn probe_writable(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".stacyvm-doctor-{}", std::process::id()));
    fs::write(&probe, b"")?;
    fs::remove_file(&probe)
}

fn check_data_dir(r: &mut Report, cfg: &Config) {
    let dir = Path::new(&cfg.server.data_dir);
    // The directory itself, or the closest ancestor that exists (the
    // server creates the rest).
    let mut existing = dir.to_path_buf();
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p.to_path_buf(),
            _ => {
                existing = PathBuf::from(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        r.fail(
            "server.data_dir",
            format!("{} is not a directory", existing.display()),
            "point server.data_dir at a directory",
        );
        return;
    }
    if let Err(e) = probe_writable(&existing) {
        r.fail(
            "server.data_dir",
            format!("cannot write in {}: {e}", existing.display()),
            "run stacyvm as the directory's owner or fix its permissions",
        );
        return;
    }
    let what = if existing == dir {
        "writable".to_string()
    } else {
        format!("will be created under {}", existing.display())
    };
    match nix::sys::statvfs::statvfs(&existing) {
        Ok(s) => {
            let free = s.blocks_available() * s.fragment_size();
            let gib = free as f64 / (1u64 << 30) as f64;
            if free < 1 << 30 {
                r.warn(
                    "server.data_dir",
                    format!("{} ({what}): only {gib:.2} GiB free", dir.display()),
                    "free space or move server.data_dir; images and sandboxes need room",
                );
            } else {
                r.pass(
                    "server.data_dir",
                    format!("{} ({what}, {gib:.1} GiB free)", dir.display()),
                );
            }
        }
        Err(_) => r.pass("server.data_dir", format!("{} ({what})", dir.display())),
    }
}

/// `name` found in `$PATH` (or `name` itself when it contains a slash).
pub fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return is_executable(Path::new(name)).then(|| PathBuf::from(name));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|c| is_executable(c))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `p` is an ELF executable without a program interpreter
/// (statically linked). `None` if it is not a readable 64-bit ELF file.
pub fn elf_is_static(p: &Path) -> Option<bool> {
    let mut f = fs::File::open(p).ok()?;
    let mut head = vec![0u8; 64];
    f.read_exact(&mut head).ok()?;
    // 64-bit little-endian ELF only (the architectures StacyVM targets).
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return None;
    }
    let phoff = u64::from_le_bytes(head[0x20..0x28].try_into().ok()?);
    let phentsize = u64::from(u16::from_le_bytes(head[0x36..0x38].try_into().ok()?));
    let phnum = u64::from(u16::from_le_bytes(head[0x38..0x3a].try_into().ok()?));
    let data = fs::read(p).ok()?;
    for i in 0..phnum {
        let off = usize::try_from(phoff + i * phentsize).ok()?;
        let ty = u32::from_le_bytes(data.get(off..off + 4)?.try_into().ok()?);
        // PT_INTERP: the binary needs a dynamic loader.
        if ty == 3 {
            return Some(false);
        }
    }
    Some(true)
}

fn check_native(r: &mut Report, cfg: &Config) {
    if !used(cfg, "native") {
        r.warn(
            "native",
            "not enabled; native checks skipped",
            "ignore unless you use the native provider (providers.native.enabled)",
        );
        return;
    }
    let n = &cfg.providers.native;
    let root = nix::unistd::geteuid().is_root();
    if root {
        r.pass("native.root", "running as root");
    } else {
        let read = |p: &str| fs::read_to_string(p).ok();
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
    match stacyvm_providers::native::find_agent(&n.agent_path) {
        Some(p) if is_executable(&p) => match elf_is_static(&p) {
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
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
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
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
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
        .filter(|t| which(t).is_none())
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
    let text = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
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
    let (kind, have): (&str, Vec<&str>) = match fs::read_to_string(root.join("cgroup.controllers"))
    {
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

/// Where the Docker engine listens, from config, `DOCKER_HOST` or the
/// default socket. `Err` for non-unix endpoints, which doctor cannot probe.
fn docker_socket(cfg: &Config) -> Result<PathBuf, String> {
    let configured = cfg.providers.docker.socket.trim();
    let raw = if configured.is_empty() {
        std::env::var("DOCKER_HOST").unwrap_or_default()
    } else {
        configured.to_string()
    };
    if raw.is_empty() {
        return Ok(PathBuf::from("/var/run/docker.sock"));
    }
    if let Some(p) = raw.strip_prefix("unix://") {
        return Ok(PathBuf::from(p));
    }
    if raw.starts_with('/') {
        return Ok(PathBuf::from(raw));
    }
    Err(raw)
}

async fn check_docker(r: &mut Report, cfg: &Config) {
    if !used(cfg, "docker") {
        r.warn(
            "docker",
            "not enabled; docker checks skipped",
            "ignore unless you use the docker provider (providers.docker.enabled)",
        );
        return;
    }
    let d = &cfg.providers.docker;
    let socket = match docker_socket(cfg) {
        Ok(s) => s,
        Err(endpoint) => {
            r.warn(
                "docker.socket",
                format!("{endpoint} is not a unix socket; the engine was not probed"),
                "check the engine with `docker -H <endpoint> info`",
            );
            return;
        }
    };
    match fs::metadata(&socket) {
        Ok(m) if m.file_type().is_socket() => {
            r.pass("docker.socket", socket.display().to_string());
        }
        Ok(_) => {
            r.fail(
                "docker.socket",
                format!("{} is not a socket", socket.display()),
                "set providers.docker.socket to the engine's unix socket",
            );
            return;
        }
        Err(_) => {
            r.fail(
                "docker.socket",
                format!("{} does not exist", socket.display()),
                "start the engine (systemctl start docker, or dockerd) or set providers.docker.socket",
            );
            return;
        }
    }
    let version = match crate::engine::get_json(&socket, "/version", Duration::from_secs(3)).await {
        Ok(v) => v,
        Err(e) => {
            r.fail(
                "docker.daemon",
                format!("no answer from the engine: {e}"),
                "start dockerd and check `journalctl -u docker`; the user needs access to the socket",
            );
            return;
        }
    };
    r.pass(
        "docker.daemon",
        format!(
            "Docker {} (API {})",
            version["Version"].as_str().unwrap_or("?"),
            version["ApiVersion"].as_str().unwrap_or("?")
        ),
    );
    let info = match crate::engine::get_json(&socket, "/info", Duration::from_secs(3)).await {
        Ok(v) => v,
        Err(e) => {
            r.fail(
                "docker.runtime",
                format!("cannot read the engine's runtimes: {e}"),
                "check the engine with `docker info`",
            );
            return;
        }
    };
    let runtime = if d.runtime.is_empty() {
        "runc"
    } else {
        d.runtime.as_str()
    };
    let runtimes = info["Runtimes"].as_object().cloned().unwrap_or_default();
    let names: Vec<&str> = runtimes.keys().map(String::as_str).collect();
    match runtimes.get(runtime) {
        Some(rt) => {
            r.pass("docker.runtime", format!("{runtime} is registered"));
            if runtime == "runsc" {
                check_runsc(r, cfg, rt);
            }
        }
        None => r.fail(
            "docker.runtime",
            format!(
                "runtime {runtime:?} is not registered (engine has: {})",
                names.join(", ")
            ),
            "register it under \"runtimes\" in /etc/docker/daemon.json and restart dockerd, or set providers.docker.runtime: runc",
        ),
    }
    let security: Vec<String> = info["SecurityOptions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if security.iter().any(|s| s.contains("seccomp")) {
        r.pass("docker.seccomp", "the engine supports seccomp");
    } else {
        r.warn(
            "docker.seccomp",
            "the engine reports no seccomp support; containers run without a syscall filter",
            "use a dockerd built with seccomp (Debian's docker.io is)",
        );
    }
    if d.network_mode.trim().is_empty() {
        r.warn(
            "docker.network_mode",
            "empty (treated as none)",
            "set providers.docker.network_mode explicitly: none or bridge",
        );
    } else {
        r.pass("docker.network_mode", d.network_mode.clone());
    }
    if d.dropped_caps.is_empty() {
        r.warn(
            "docker.dropped_caps",
            "no capability is dropped",
            "set providers.docker.dropped_caps: [ALL]",
        );
    } else {
        r.pass("docker.dropped_caps", d.dropped_caps.join(", "));
    }
}

/// gVisor specifics: its binary exists, and its network stack is off or
/// unused (it fails on these hosts; see docs/providers.md).
fn check_runsc(r: &mut Report, cfg: &Config, rt: &serde_json::Value) {
    let path = rt["path"].as_str().unwrap_or("runsc");
    match which(path) {
        Some(p) => r.pass("docker.runsc", format!("{} found", p.display())),
        None => r.fail(
            "docker.runsc",
            format!("the runsc binary {path:?} of the runsc runtime is missing"),
            "install gVisor (apt-get install runsc) or fix its path in /etc/docker/daemon.json",
        ),
    }
    let args: Vec<&str> = rt["runtimeArgs"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if args.contains(&"--network=none") || cfg.providers.docker.network_mode == "none" {
        r.pass("docker.runsc_network", "gVisor networking is off");
    } else {
        r.warn(
            "docker.runsc_network",
            "gVisor's own network stack is in use; it fails on some hosts (PVM guests)",
            "add \"--network=none\" to the runsc runtimeArgs in /etc/docker/daemon.json or set providers.docker.network_mode: none",
        );
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
    match tokio::time::timeout(Duration::from_secs(5), child).await {
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

async fn check_firecracker(r: &mut Report, cfg: &Config) {
    if !used(cfg, "firecracker") {
        r.warn(
            "firecracker",
            "not enabled; microVM checks skipped",
            "ignore unless you use microVMs (providers.firecracker.enabled)",
        );
        return;
    }
    let f = &cfg.providers.firecracker;
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
    match fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
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
    if Path::new(&f.kernel_path).is_file() {
        r.pass("firecracker.kernel", f.kernel_path.clone());
    } else {
        r.fail(
            "firecracker.kernel",
            format!("{} does not exist", f.kernel_path),
            "put a guest kernel (vmlinux) there or set providers.firecracker.kernel_path",
        );
    }
    let data = Path::new(&f.data_dir);
    match fs::metadata(data) {
        Ok(m) if m.is_dir() => match probe_writable(data) {
            Ok(()) => r.pass("firecracker.data_dir", f.data_dir.clone()),
            Err(e) => r.fail(
                "firecracker.data_dir",
                format!("cannot write in {}: {e}", f.data_dir),
                "run stacyvm as the directory's owner or fix its permissions",
            ),
        },
        Ok(_) => r.fail(
            "firecracker.data_dir",
            format!("{} is not a directory", f.data_dir),
            "point providers.firecracker.data_dir at a directory",
        ),
        Err(_) => r.warn(
            "firecracker.data_dir",
            format!("{} does not exist yet", f.data_dir),
            format!("create it: install -d -m 0750 {}", f.data_dir),
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

fn check_proot(r: &mut Report, cfg: &Config) {
    if !used(cfg, "proot") {
        r.warn(
            "proot",
            "not enabled; proot checks skipped",
            "ignore unless you use the proot provider (providers.proot.enabled)",
        );
        return;
    }
    let pc = &cfg.providers.proot;
    match stacyvm_providers::proot::resolve_binary(&pc.proot_binary) {
        Some(p) => r.pass("proot.binary", p.display().to_string()),
        None => r.fail(
            "proot.binary",
            format!("{} not found in PATH", pc.proot_binary),
            "apt-get install proot or set providers.proot.proot_binary",
        ),
    }
    // Imported images have no host libc: the agent must be static.
    match stacyvm_providers::agent::find_static_agent("") {
        Some(p) if elf_is_static(&p) == Some(true) => {
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
    match fs::metadata(&rootfs) {
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
    match fs::metadata(&base) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_elf_are_told_apart() {
        // The test binary itself is dynamically linked.
        let me = std::env::current_exe().expect("exe");
        assert_eq!(elf_is_static(&me), Some(false));
        let dir = tempfile::tempdir().expect("tmp");
        let not_elf = dir.path().join("script");
        fs::write(&not_elf, "#!/bin/sh\n").expect("write");
        assert_eq!(elf_is_static(&not_elf), None);
        // A minimal static ELF header: no program headers at all.
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        let f = dir.path().join("static");
        fs::write(&f, &h).expect("write");
        assert_eq!(elf_is_static(&f), Some(true));
    }

    #[test]
    fn user_namespace_availability() {
        assert!(userns_available(Some("15000\n"), None).is_ok());
        assert!(userns_available(Some("15000\n"), Some("1\n")).is_ok());
        assert!(userns_available(Some("0\n"), None).is_err());
        assert!(userns_available(None, None).is_err());
        let e = userns_available(Some("100"), Some("0")).expect_err("debian switch off");
        assert!(e.contains("unprivileged_userns_clone"), "{e}");
    }

    #[test]
    fn which_needs_the_executable_bit() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("tool");
        fs::write(&f, "#!/bin/sh\n").expect("write");
        assert_eq!(which(f.to_str().expect("utf8")), None);
        fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(which(f.to_str().expect("utf8")), Some(f));
        assert!(which("sh").is_some());
    }
}
