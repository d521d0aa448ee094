//! The docker provider's module: built from `providers.docker.*`, with its
//! own `config lint` and `doctor` checks.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stacyvm_core::checks::{self, Report};
use stacyvm_core::config::Config;
use stacyvm_core::provider::Provider;
use stacyvm_core::Result;

use crate::registry::ProviderModule;

pub struct DockerModule;

#[async_trait]
impl ProviderModule for DockerModule {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn enabled(&self, cfg: &Config) -> bool {
        cfg.providers.docker.enabled
    }

    fn build(&self, cfg: &Config) -> Result<Arc<dyn Provider>> {
        // The engine is contacted lazily: a stopped dockerd makes the
        // provider unhealthy, not the server fail to start.
        let agent =
            crate::agent::find_static_agent("").unwrap_or_else(|| PathBuf::from("stacyvm-agent"));
        let state_dir = Path::new(&cfg.server.data_dir).join("docker");
        Ok(Arc::new(super::DockerProvider::new(
            super::DockerOptions::new(cfg.providers.docker.clone(), state_dir, agent),
        )?))
    }

    fn lint(&self, cfg: &Config, p: bool, r: &mut Report) {
        lint_docker(r, cfg, p);
    }

    async fn doctor(&self, cfg: &Config, _production: bool, r: &mut Report) {
        check_docker(r, cfg).await;
    }
}

fn lint_docker(r: &mut Report, cfg: &Config, p: bool) {
    let d = &cfg.providers.docker;
    if d.runtime.trim().is_empty() {
        r.prod(
            p,
            "providers.docker.runtime",
            "no container runtime set",
            "set providers.docker.runtime (runc, or runsc for gVisor)",
        );
    } else {
        r.pass("providers.docker.runtime", d.runtime.clone());
    }
    if d.network_mode.trim().is_empty() {
        r.prod(
            p,
            "providers.docker.network_mode",
            "no network mode set",
            "set providers.docker.network_mode: none (or bridge if workloads need it)",
        );
    } else {
        r.pass("providers.docker.network_mode", d.network_mode.clone());
    }
    if d.seccomp_profile.trim().is_empty() || d.seccomp_profile == "unconfined" {
        r.prod(
            p,
            "providers.docker.seccomp_profile",
            format!(
                "seccomp profile {:?} does not filter syscalls",
                d.seccomp_profile
            ),
            "set providers.docker.seccomp_profile: default (or a profile path)",
        );
    } else {
        r.pass(
            "providers.docker.seccomp_profile",
            d.seccomp_profile.clone(),
        );
    }
    if d.added_caps.is_empty() {
        r.pass("providers.docker.added_caps", "none");
    } else {
        r.prod(
            p,
            "providers.docker.added_caps",
            format!("capabilities added: {}", d.added_caps.join(", ")),
            "remove providers.docker.added_caps",
        );
    }
    if d.dropped_caps.iter().any(|c| c.eq_ignore_ascii_case("ALL")) {
        r.pass("providers.docker.dropped_caps", "ALL");
    } else {
        r.prod(
            p,
            "providers.docker.dropped_caps",
            "not every capability is dropped",
            "set providers.docker.dropped_caps: [ALL]",
        );
    }
    if d.memory.trim().is_empty() || d.cpus <= 0.0 || d.pids_limit <= 0 {
        r.prod(
            p,
            "providers.docker.limits",
            format!(
                "memory {:?}, cpus {}, pids_limit {}: each must be set",
                d.memory, d.cpus, d.pids_limit
            ),
            "set providers.docker.memory, cpus and pids_limit",
        );
    } else {
        r.pass(
            "providers.docker.limits",
            format!(
                "memory {}, cpus {}, pids {}",
                d.memory, d.cpus, d.pids_limit
            ),
        );
    }
    if d.user.trim().is_empty() {
        r.prod(
            p,
            "providers.docker.user",
            "containers run as the image's user (often root)",
            "set providers.docker.user, e.g. 65534:65534",
        );
    } else {
        r.pass("providers.docker.user", d.user.clone());
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
    match std::fs::metadata(&socket) {
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
    let mut opts = super::DockerOptions::new(d.clone(), PathBuf::new(), PathBuf::new());
    opts.config.socket = socket.display().to_string();
    opts.engine_timeout = Duration::from_secs(3);
    let engine = match super::connect_engine(&opts).await {
        Ok(e) => e,
        Err(e) => {
            r.fail(
                "docker.daemon",
                format!("no answer from the engine: {e}"),
                "start dockerd and check `journalctl -u docker`; the user needs access to the socket",
            );
            return;
        }
    };
    match engine.version().await {
        Ok(v) => r.pass(
            "docker.daemon",
            format!(
                "Docker {} (API {})",
                v.version.as_deref().unwrap_or("?"),
                v.api_version.as_deref().unwrap_or("?")
            ),
        ),
        Err(e) => {
            r.fail(
                "docker.daemon",
                format!("no answer from the engine: {e}"),
                "start dockerd and check `journalctl -u docker`; the user needs access to the socket",
            );
            return;
        }
    }
    let info = match engine.info().await {
        Ok(i) => serde_json::to_value(i).unwrap_or_default(),
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
    match checks::which(path) {
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
