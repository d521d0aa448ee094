//! The `docker` provider: one container per sandbox through the Docker
//! Engine API (`bollard`), with runc, gVisor (`runsc`) or Kata as the
//! container runtime.
//!
//! The container's entrypoint is the static `stacyvm-agent` (bind-mounted
//! read-only at `/.stacyvm/agent`) in `serve` mode, so exec, pty, signals,
//! timeouts and every file operation have exactly the native provider's
//! semantics and cost about a millisecond instead of an Engine exec round
//! trip. The agent listens on `/.stacyvm/run/agent.sock`, a bind mount of
//! the host dir `<state>/<id>/run/`:
//! - runc: the host connects to that socket directly;
//! - runtimes whose unix sockets stay inside their sandbox (gVisor's
//!   sentry, Kata's VM) are reached through one long-lived Engine exec of
//!   `stacyvm-agent relay`, which copies the same protocol bytes between
//!   its stdio and the socket.
//!
//! Secure defaults (gaps S-18, G-DOC-11): every capability dropped,
//! `no-new-privileges`, a pids limit, memory without extra swap, network
//! `none` unless configured, the configured (or image) user. Containers
//! carry `stacyvm.*` labels so a restarted server finds them again.

mod build;
mod link;
mod net;
pub mod setup;
mod snapshot;
mod sock;
mod spec;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::errors::Error as EngineError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, HostConfig, HostConfigLogConfig, Mount,
    MountType, MountVolumeOptions, MountVolumeOptionsDriverConfig, NetworkCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, DownloadFromContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StatsOptionsBuilder, UploadToContainerOptionsBuilder, WaitContainerOptions,
};
use bollard::Docker;
use chrono::Utc;
use futures::StreamExt;
use stacyvm_core::config::DockerConfig;
use stacyvm_core::provider::{
    capability, Isolation, Profile, Provider, RuntimeInfo, RuntimeStatus, SandboxIo,
    SandboxSnapshot, SpawnSpec, Spawned, Stats,
};
use stacyvm_core::{paths, Error, Result};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::agent::{AgentClient, AgentSession};

pub use self::spec::{parse_image, parse_memory, ImageRef};

/// Where the agent binary appears inside every container.
const AGENT_IN: &str = "/.stacyvm/agent";
/// The bind-mounted socket dir inside every container.
const RUN_IN: &str = "/.stacyvm/run";
/// The agent's socket inside every container.
const SOCK_IN: &str = "/.stacyvm/run/agent.sock";
/// Log lines quoted when a container dies during start.
const DEATH_LOG_LINES: usize = 20;
/// How long spawn waits for the agent to answer.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on (re)connecting to a running sandbox's agent: waiting for the
/// sandbox's connect lock, the connect, the handshake and reading the
/// user's home. A sandbox that plays its own agent and never answers
/// costs its own callers this long, nobody else anything.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on reading the image's /etc/passwd through the agent (the file is
/// sandbox-controlled: a symlink to /dev/zero must not be read forever).
const PASSWD_TIMEOUT: Duration = Duration::from_secs(3);
const PASSWD_MAX_BYTES: u64 = 1024 * 1024;
/// Size of the tmpfs behind `/.stacyvm/run` (it holds one socket).
const RUN_DIR_SIZE: &str = "1m";
/// Container log rotation: what the agent or a sandbox process writes to
/// the agent's stdout/stderr cannot fill the host's disk.
const LOG_MAX_SIZE: &str = "1m";
const LOG_MAX_FILES: &str = "2";
/// Size of a configured tmpfs mount that names none.
const DEFAULT_TMPFS_SIZE: &str = "64m";
/// Where the agent reads its handshake token: its stdin, which the
/// provider attaches to before start, writes the token to and closes
/// (`OpenStdin` + `StdinOnce`). Nothing of it stays in the container: not
/// in its config, its environment, a file or the agent's arguments.
const TOKEN_FROM: &str = "/proc/self/fd/0";
/// The host's copy of a sandbox's token, in its 0600 host dir.
const TOKEN_FILE: &str = "token";
/// Bound on handing the token to a starting agent.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the docker provider.
#[derive(Debug, Clone)]
pub struct DockerOptions {
    /// `providers.docker.*`.
    pub config: DockerConfig,
    /// Root of the provider's host state (`<data_dir>/docker`).
    pub state_dir: PathBuf,
    /// The static `stacyvm-agent` binary bind-mounted into containers.
    pub agent_path: PathBuf,
    /// Engine request timeout (connect, create, start, …).
    pub engine_timeout: Duration,
}

impl DockerOptions {
    pub fn new(config: DockerConfig, state_dir: PathBuf, agent_path: PathBuf) -> Self {
        DockerOptions {
            config,
            state_dir,
            agent_path,
            engine_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug)]
pub struct DockerProvider {
    opts: DockerOptions,
    /// The engine client, negotiated on first use (dockerd may start after us).
    engine: tokio::sync::OnceCell<Docker>,
    /// Open agent sessions by sandbox id.
    conns: Mutex<HashMap<String, AgentSession>>,
    /// Serialises connection setup per sandbox (a relay is one engine exec
    /// per sandbox); one sandbox's slow or hostile agent never holds up
    /// another's.
    connect_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Serialises removals of containers attached to the StacyVM bridge
    /// network (see [`Self::discard`]).
    leave_lock: tokio::sync::Mutex<()>,
    /// Host uid/gid of container root: non-zero under `userns-remap`.
    remap: tokio::sync::OnceCell<(u32, u32)>,
    /// Whether the storage driver caps a container's writable layer.
    layer_quota: tokio::sync::OnceCell<bool>,
    /// The bridge interface of `bridge_network`, once it and its egress
    /// filter are in place.
    bridge: tokio::sync::OnceCell<String>,
    /// (image id, user) → container uid/gid, learnt from the image's
    /// /etc/passwd; the run dir is created owned by that user.
    user_ids: Mutex<HashMap<(String, String), (u32, u32)>>,
    /// Per runtime name: whether its sockets reach the host (from engine info).
    socket_sharing: Mutex<HashMap<String, bool>>,
    /// Per-sandbox egress rules on the sandbox network, and their proxy.
    egress: crate::egress::Egress,
}

/// Whether containers of this runtime expose bind-mounted unix sockets to
/// the host by its name alone (runc shares the host kernel; gVisor and
/// Kata do not, see [`DockerProvider::shares_sockets`]).
fn direct_socket(runtime: &str) -> bool {
    matches!(runtime, "" | "runc" | "io.containerd.runc.v2" | "crun")
}

/// Whether a runtime's registered arguments let sockets bound inside reach
/// the host: gVisor with `--host-uds=create` (or `all`).
fn args_share_sockets(args: &[String]) -> bool {
    args.iter().any(|a| {
        matches!(
            a.as_str(),
            "--host-uds=create" | "--host-uds=all" | "-host-uds=create" | "-host-uds=all"
        )
    })
}

/// Finds a static `stacyvm-agent` for containers (see
/// [`crate::agent::find_static_agent`]).
pub fn find_static_agent() -> Option<PathBuf> {
    crate::agent::find_static_agent("")
}

/// Host threads gVisor's sentry keeps in the container's pids cgroup
/// (about 110 idle on this host, more under load).
const GVISOR_PIDS_ALLOWANCE: i64 = 512;

/// The container's pids cgroup limit for `providers.docker.pids_limit`
/// (≤ 0 → 256). Under gVisor the sentry's own threads share the cgroup and
/// hitting the limit ends the whole sandbox, so they get an allowance on
/// top: the sandbox's processes keep the configured headroom.
fn pids_cgroup_limit(configured: i64, runtime: &str) -> i64 {
    let base = if configured > 0 { configured } else { 256 };
    if runtime.contains("runsc") || runtime.contains("gvisor") {
        base + GVISOR_PIDS_ALLOWANCE
    } else {
        base
    }
}

/// Capabilities a build sandbox's root gets back (package installs).
const BUILD_CAPS: [&str; 7] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "SETUID",
    "SETGID",
    "KILL",
];

/// Capabilities of a pool host container (runc only), which its agent's
/// slot factory keeps to make slots (namespaces and mounts, the slot's
/// workspace and ids, a slot's own loopback, ending a slot and removing
/// its files); the agent
/// drops every one of them once the factory is forked, and slots run as
/// their own uid with none.
const POOL_HOST_CAPS: [&str; 9] = [
    "SYS_ADMIN",
    "NET_ADMIN",
    "SETUID",
    "SETGID",
    "SETPCAP",
    "CHOWN",
    "KILL",
    "DAC_OVERRIDE",
    "FOWNER",
];

fn is_pool_host(spec: &SpawnSpec) -> bool {
    spec.metadata
        .contains_key(stacyvm_core::provider::POOL_HOST_METADATA)
}

/// Maps an engine error to a typed error; `what` names the operation.
fn engine_err(what: &str, e: EngineError) -> Error {
    match e {
        EngineError::DockerResponseServerError {
            status_code,
            message,
        } => match status_code {
            400 => Error::invalid(format!("{what}: {message}")),
            404 => Error::not_found(format!("{what}: {message}")),
            409 => Error::conflict(format!("{what}: {message}")),
            _ => Error::unavailable(format!(
                "{what}: docker engine error {status_code}: {message}"
            )),
        },
        EngineError::RequestTimeoutError => Error::unavailable(format!(
            "{what}: the docker engine did not answer in time"
        )),
        EngineError::DockerStreamError { error } => {
            Error::unavailable(format!("{what}: {error}"))
        }
        EngineError::SocketNotFoundError(path) => Error::unavailable(format!(
            "{what}: docker socket {path} not found (is dockerd running? set providers.docker.socket)"
        )),
        e @ (EngineError::HyperResponseError { .. }
        | EngineError::IOError { .. }
        | EngineError::HttpClientError { .. }
        | EngineError::HyperLegacyError { .. }) => Error::unavailable(format!(
            "{what}: cannot reach the docker engine ({e}); is dockerd running?"
        )),
        e => Error::unavailable(format!("{what}: {e}")),
    }
}

fn is_status(e: &EngineError, code: u16) -> bool {
    matches!(e, EngineError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

/// Pulls `image` through the engine; `progress(done, total, status)` gets
/// the bytes downloaded so far over all layers (the total grows as the
/// engine learns layer sizes).
pub async fn pull_image(
    d: &Docker,
    image: &ImageRef,
    progress: &mut (dyn FnMut(u64, u64, &str) + Send),
) -> Result<()> {
    let full = image.full();
    let opts = CreateImageOptionsBuilder::default()
        .from_image(&image.repo)
        .tag(&image.tag)
        .build();
    let mut stream = d.create_image(Some(opts), None, None);
    let mut layers: std::collections::HashMap<String, (u64, u64)> = Default::default();
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(err) = info.error_detail.and_then(|d| d.message) {
                    return Err(pull_err(&full, &err));
                }
                let status = info.status.unwrap_or_default();
                if let (Some(id), Some(pd)) = (info.id, info.progress_detail) {
                    let e = layers.entry(id).or_default();
                    if let Some(c) = pd.current {
                        e.0 = c.max(0) as u64;
                    }
                    if let Some(t) = pd.total {
                        e.1 = t.max(0) as u64;
                    }
                    if status.starts_with("Download complete")
                        || status.starts_with("Pull complete")
                    {
                        e.0 = e.1.max(e.0);
                    }
                }
                let done = layers.values().map(|l| l.0.min(l.1.max(l.0))).sum();
                let total = layers.values().map(|l| l.1.max(l.0)).sum();
                progress(done, total, &status);
            }
            Err(EngineError::DockerResponseServerError { message, .. })
            | Err(EngineError::DockerStreamError { error: message }) => {
                return Err(pull_err(&full, &message))
            }
            Err(e) => return Err(engine_err(&format!("pulling image {full}"), e)),
        }
    }
    Ok(())
}

/// `stacyvm image pull --docker`: pulls `reference` into the engine named
/// by `providers.docker.socket` (or `DOCKER_HOST`/the default socket) and
/// returns the image id.
pub async fn pull_into_engine(
    config: &DockerConfig,
    reference: &str,
    progress: &mut (dyn FnMut(u64, u64, &str) + Send),
) -> Result<String> {
    let image = parse_image(reference)?;
    let opts = DockerOptions::new(config.clone(), PathBuf::new(), PathBuf::new());
    let d = connect_engine(&opts).await?;
    pull_image(&d, &image, progress).await?;
    let full = image.full();
    let info = d
        .inspect_image(&full)
        .await
        .map_err(|e| engine_err(&format!("inspecting image {full}"), e))?;
    Ok(info.id.unwrap_or(full))
}

/// Connects to the engine of `opts` and negotiates the API version.
async fn connect_engine(opts: &DockerOptions) -> Result<Docker> {
    let timeout = opts.engine_timeout.as_secs().max(1);
    let sock = opts.config.socket.trim();
    let d = if sock.is_empty() {
        Docker::connect_with_defaults()
    } else if sock.starts_with('/') {
        Docker::connect_with_unix(sock, timeout, bollard::API_DEFAULT_VERSION)
    } else {
        Docker::connect_with_host(sock)
    }
    .map_err(|e| engine_err("connecting to the docker engine", e))?
    .with_timeout(Duration::from_secs(timeout));
    d.negotiate_version()
        .await
        .map_err(|e| engine_err("negotiating the docker API version", e))
}

/// Classifies a failed pull: a missing image is the caller's problem (400),
/// anything else (registry down, TLS, auth backend) a 503 with the reason.
fn pull_err(image: &str, reason: &str) -> Error {
    let r = reason.to_ascii_lowercase();
    let missing = [
        "not found",
        "manifest unknown",
        "pull access denied",
        "repository does not exist",
        "no such image",
        "invalid reference",
    ];
    if missing.iter().any(|m| r.contains(m)) {
        Error::invalid(format!("image {image:?} is not available: {reason}"))
    } else {
        Error::unavailable(format!("pulling image {image:?} failed: {reason}"))
    }
}

/// A one-directory tar (for the workspace owned by the container user).
fn dir_tar(name: &str, uid: u32, gid: u32, mode: u32) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(mode);
    h.set_uid(u64::from(uid));
    h.set_gid(u64::from(gid));
    h.set_mtime(Utc::now().timestamp().max(0) as u64);
    b.append_data(&mut h, format!("{name}/"), std::io::empty())
        .map_err(|e| Error::internal("building workspace archive").with_source(e))?;
    b.into_inner()
        .map_err(|e| Error::internal("building workspace archive").with_source(e))
}

/// The content of the first regular file in a tar archive.
fn first_file(archive: &[u8]) -> Option<String> {
    let mut a = tar::Archive::new(archive);
    for entry in a.entries().ok()?.flatten() {
        let mut entry = entry;
        if entry.header().entry_type().is_file() {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut entry, &mut s).ok()?;
            return Some(s);
        }
    }
    None
}

impl DockerProvider {
    pub fn new(opts: DockerOptions) -> Result<Self> {
        std::fs::create_dir_all(&opts.state_dir).map_err(|e| {
            Error::internal(format!("creating {}", opts.state_dir.display())).with_source(e)
        })?;
        // Host state is root's alone: nothing below is meant for other
        // host users (the container reaches its run dir through its mount).
        std::fs::set_permissions(&opts.state_dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |e| Error::internal(format!("securing {}", opts.state_dir.display())).with_source(e),
        )?;
        Ok(DockerProvider {
            opts,
            engine: tokio::sync::OnceCell::new(),
            conns: Mutex::new(HashMap::new()),
            connect_locks: Mutex::new(HashMap::new()),
            leave_lock: tokio::sync::Mutex::new(()),
            remap: tokio::sync::OnceCell::new(),
            layer_quota: tokio::sync::OnceCell::new(),
            bridge: tokio::sync::OnceCell::new(),
            egress: crate::egress::Egress::new(),
            user_ids: Mutex::new(HashMap::new()),
            socket_sharing: Mutex::new(HashMap::new()),
        })
    }

    /// The negotiated engine client.
    pub async fn engine(&self) -> Result<&Docker> {
        self.engine
            .get_or_try_init(|| connect_engine(&self.opts))
            .await
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.opts.state_dir.join(id)
    }

    /// Creates the sandbox's host dir (root's alone, 0700).
    fn make_dir(&self, id: &str) -> Result<PathBuf> {
        let dir = self.dir(id);
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| Error::internal("creating sandbox dir").with_source(e))?;
        Ok(dir)
    }

    /// Host uid/gid that container root maps to: `(0, 0)` unless dockerd
    /// runs with `userns-remap` (engine info lists `name=userns`), then the
    /// start of the remapped range, which dockerd encodes in its root dir
    /// (`/var/lib/docker/100000.100000`).
    async fn remap(&self) -> Result<(u32, u32)> {
        self.remap
            .get_or_try_init(|| async {
                let info = self
                    .engine()
                    .await?
                    .info()
                    .await
                    .map_err(|e| engine_err("reading docker engine info", e))?;
                let userns = info
                    .security_options
                    .unwrap_or_default()
                    .iter()
                    .any(|o| o.split(',').any(|kv| kv == "name=userns"));
                if !userns {
                    return Ok((0, 0));
                }
                let root = info.docker_root_dir.unwrap_or_default();
                spec::remap_from_root_dir(&root).ok_or_else(|| {
                    Error::unavailable(format!(
                        "dockerd runs with userns-remap but its root dir {root:?} does not name the remapped ids (uid.gid)"
                    ))
                })
            })
            .await
            .copied()
    }

    /// Whether the storage driver can cap a container's writable layer
    /// (`storage_opt size`): btrfs, zfs, devicemapper, and overlay2 on xfs
    /// (mounted with `pquota`). overlay2 on ext4, the common case, cannot.
    async fn layer_quota(&self) -> bool {
        if self.opts.config.disk.trim().is_empty() {
            return false;
        }
        *self
            .layer_quota
            .get_or_init(|| async {
                let Ok(d) = self.engine().await else {
                    return false;
                };
                let Ok(info) = d.info().await else {
                    return false;
                };
                let driver = info.driver.unwrap_or_default();
                let backing = info
                    .driver_status
                    .unwrap_or_default()
                    .into_iter()
                    .find(|kv| kv.first().map(String::as_str) == Some("Backing Filesystem"))
                    .and_then(|kv| kv.get(1).cloned())
                    .unwrap_or_default();
                let ok = spec::driver_caps_layers(&driver, &backing);
                if !ok {
                    warn!(%driver, backing_fs = %backing, "the docker storage driver cannot cap a container's writable layer (providers.docker.disk is not applied); use read_only_rootfs with size-capped tmpfs mounts to bound sandbox disk use");
                }
                ok
            })
            .await
    }

    /// The network `bridge` stands for: StacyVM's own network, created on
    /// first use with its egress filter (see `net`); other names pass
    /// through unchanged.
    async fn network_for(&self, mode: &str) -> Result<String> {
        if mode != "bridge" {
            return Ok(mode.to_string());
        }
        let name = match self.opts.config.bridge_network.trim() {
            "" => "stacyvm-bridge",
            n => n,
        };
        self.bridge
            .get_or_try_init(|| self.ensure_bridge(name))
            .await?;
        Ok(name.to_string())
    }

    async fn ensure_bridge(&self, name: &str) -> Result<String> {
        let d = self.engine().await?;
        let bridge = match d.inspect_network(name, None).await {
            Ok(n) => net::check_existing(
                name,
                n.driver.as_deref(),
                n.enable_ipv6,
                &n.options.unwrap_or_default(),
            )?,
            Err(e) if is_status(&e, 404) => {
                let req = NetworkCreateRequest {
                    name: name.to_string(),
                    driver: Some("bridge".into()),
                    enable_ipv6: Some(false),
                    options: Some(net::network_options(name)),
                    labels: Some(HashMap::from([(
                        spec::LABEL_MANAGED.to_string(),
                        "true".to_string(),
                    )])),
                    ..Default::default()
                };
                match d.create_network(req).await {
                    Ok(_) => {}
                    // Another provider instance created it meanwhile.
                    Err(e) if is_status(&e, 409) => {}
                    Err(e) => return Err(engine_err("creating the sandbox network", e)),
                }
                net::bridge_name(name)
            }
            Err(e) => return Err(engine_err("inspecting the sandbox network", e)),
        };
        // The network's gateway: where the egress proxy listens, the only
        // address redirected connections may reach on the host.
        let gateway = d
            .inspect_network(name, None)
            .await
            .ok()
            .and_then(|n| n.ipam)
            .and_then(|i| i.config)
            .and_then(|c| c.into_iter().find_map(|c| c.gateway))
            .filter(|g| g.parse::<std::net::Ipv4Addr>().is_ok());
        let (n, b) = (name.to_string(), bridge.clone());
        let allow = self.opts.config.egress_allow.clone();
        tokio::task::spawn_blocking(move || {
            net::install_rules(&n, &b, gateway.as_deref(), &allow, &net::host_resolvers())
        })
        .await
        .map_err(|e| Error::internal("installing the egress filter").with_source(e))??;
        info!(network = %name, bridge = %bridge, "sandbox network ready (no inter-sandbox traffic, public internet only)");
        Ok(bridge)
    }

    /// Removes the sandbox network and its egress filter (tests, and
    /// operators uninstalling StacyVM). Containers still attached keep the
    /// network alive; the engine's refusal is returned then.
    pub async fn remove_bridge_network(&self) -> Result<()> {
        let name = match self.opts.config.bridge_network.trim() {
            "" => "stacyvm-bridge",
            n => n,
        };
        let d = self.engine().await?;
        let bridge = match d.inspect_network(name, None).await {
            Ok(n) => n
                .options
                .unwrap_or_default()
                .get(net::OPT_BRIDGE_NAME)
                .cloned()
                .unwrap_or_else(|| net::bridge_name(name)),
            Err(e) if is_status(&e, 404) => net::bridge_name(name),
            Err(e) => return Err(engine_err("inspecting the sandbox network", e)),
        };
        match d.remove_network(name).await {
            Ok(()) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(engine_err("removing the sandbox network", e)),
        }
        let n = name.to_string();
        let allow = self.opts.config.egress_allow.clone();
        tokio::task::spawn_blocking(move || {
            net::remove_rules(&n, &bridge, &allow, &net::host_resolvers())
        })
        .await
        .map_err(|e| Error::internal("removing the egress filter").with_source(e))?;
        Ok(())
    }

    /// Whether the host can connect to a socket the agent binds inside a
    /// container of `runtime`; otherwise the relay exec is used. Asks the
    /// engine for the runtime's arguments once per runtime name.
    async fn shares_sockets(&self, runtime: &str) -> bool {
        if direct_socket(runtime) {
            return true;
        }
        if let Some(v) = self
            .socket_sharing
            .lock()
            .ok()
            .and_then(|m| m.get(runtime).copied())
        {
            return v;
        }
        let Ok(d) = self.engine().await else {
            return false;
        };
        let Ok(info) = d.info().await else {
            return false;
        };
        let shared = info
            .runtimes
            .and_then(|mut r| r.remove(runtime))
            .and_then(|r| r.runtime_args)
            .is_some_and(|a| args_share_sockets(&a));
        if let Ok(mut m) = self.socket_sharing.lock() {
            m.insert(runtime.to_string(), shared);
        }
        shared
    }

    /// The spawn's network mode, or the configured one (empty = `none`).
    fn network_mode<'a>(&'a self, spec: &'a SpawnSpec) -> &'a str {
        match spec.network_mode.as_str() {
            "" => match self.opts.config.network_mode.as_str() {
                "" => "none",
                m => m,
            },
            m => m,
        }
    }

    /// Whether a container's agent keeps CAP_SETUID and CAP_SETGID (to
    /// run a command as another user). The default drops every
    /// capability, so it cannot; `added_caps: [SETUID, SETGID]` lets it.
    fn can_switch_users(&self) -> bool {
        let c = &self.opts.config;
        let norm = |s: &String| {
            s.trim()
                .to_ascii_uppercase()
                .trim_start_matches("CAP_")
                .to_string()
        };
        let has =
            |list: &[String], cap: &str| list.iter().any(|x| norm(x) == cap || norm(x) == "ALL");
        let keeps = |cap: &str| has(&c.added_caps, cap) || !has(&c.dropped_caps, cap);
        let root = matches!(c.user.trim(), "" | "0" | "0:0" | "root");
        root && keeps("SETUID") && keeps("SETGID")
    }

    fn runtime(&self) -> &str {
        match self.opts.config.runtime.as_str() {
            "" => "runc",
            r => r,
        }
    }

    fn security_opts(&self) -> Result<Vec<String>> {
        let mut out = vec!["no-new-privileges:true".to_string()];
        match self.opts.config.seccomp_profile.trim() {
            "" | "default" => {}
            "unconfined" => out.push("seccomp=unconfined".into()),
            path => {
                // The engine wants the profile's JSON, not its path (the CLI reads it).
                let json = std::fs::read_to_string(path).map_err(|e| {
                    Error::invalid(format!(
                        "providers.docker.seccomp_profile {path:?} cannot be read: {e}"
                    ))
                })?;
                out.push(format!("seccomp={json}"));
            }
        }
        Ok(out)
    }

    /// Makes sure the image exists locally, pulling it with progress logs.
    /// Returns its configured user and environment, and its id.
    /// The image's user, environment and id, and whether it is a
    /// snapshot's (pulled first when missing).
    async fn ensure_image(&self, image: &ImageRef) -> Result<(String, Vec<String>, String, bool)> {
        let d = self.engine().await?;
        let full = image.full();
        let found = match d.inspect_image(&full).await {
            Ok(i) => Some(i),
            Err(e) if is_status(&e, 404) => None,
            Err(e) => return Err(engine_err(&format!("inspecting image {full}"), e)),
        };
        let inspected = match found {
            Some(i) => i,
            None => {
                self.pull(image).await?;
                d.inspect_image(&full)
                    .await
                    .map_err(|e| engine_err(&format!("inspecting image {full}"), e))?
            }
        };
        let id = inspected.id.unwrap_or_else(|| full.clone());
        let cfg = inspected.config.unwrap_or_default();
        let is_snapshot = cfg
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(snapshot::LABEL_SNAPSHOT));
        Ok((
            cfg.user.unwrap_or_default(),
            cfg.env.unwrap_or_default(),
            id,
            is_snapshot,
        ))
    }

    /// Pulls an image, logging progress server-side.
    pub async fn pull(&self, image: &ImageRef) -> Result<()> {
        let d = self.engine().await?;
        let full = image.full();
        info!(image = %full, "pulling image");
        let started = Instant::now();
        let mut last = String::new();
        pull_image(d, image, &mut |_, _, status| {
            if status != last {
                debug!(image = %full, %status, "pull progress");
                last = status.to_string();
            }
        })
        .await?;
        info!(image = %full, elapsed_ms = started.elapsed().as_millis() as u64, "image pulled");
        Ok(())
    }

    /// The container's host config. `run_owner` is the host uid/gid that
    /// owns the run dir (the container user, remapped).
    async fn host_config(&self, spec: &SpawnSpec, run_owner: (u32, u32)) -> Result<HostConfig> {
        let c = &self.opts.config;
        let memory = if spec.memory_mb > 0 {
            spec.memory_mb.saturating_mul(1024 * 1024)
        } else {
            parse_memory(&c.memory)?
        };
        let cpus = if spec.vcpus > 0 {
            spec.vcpus as f64
        } else {
            c.cpus
        };
        let mut tmpfs: HashMap<String, String> = c
            .tmpfs
            .iter()
            .map(|(k, v)| (k.clone(), spec::capped_tmpfs(v, DEFAULT_TMPFS_SIZE)))
            .collect();
        if c.read_only_rootfs && !tmpfs.contains_key(paths::WORKSPACE) {
            // A read-only root still needs a writable workspace; it can
            // hold no more than the sandbox's memory anyway.
            tmpfs.insert(
                paths::WORKSPACE.into(),
                format!("mode=1777,nosuid,nodev,size={memory}"),
            );
        }
        let network = self.network_for(self.network_mode(spec)).await?;
        let sysctls = if network == "none" || network == "host" {
            None
        } else {
            Some(net::no_ipv6_sysctls())
        };
        let storage_opt = if self.layer_quota().await {
            Some(HashMap::from([(
                "size".to_string(),
                c.disk.trim().to_string(),
            )]))
        } else {
            None
        };
        // `/.stacyvm/run` is a tmpfs volume dockerd mounts on the host
        // (so the host reaches the socket): 1 MiB, no setuid, no devices,
        // no exec, only the container user may enter it. Removed with the
        // container (anonymous volume).
        let run_opts = format!(
            "size={RUN_DIR_SIZE},mode=0700,uid={},gid={},nosuid,nodev,noexec",
            run_owner.0, run_owner.1
        );
        let run_mount = Mount {
            target: Some(RUN_IN.into()),
            typ: Some(MountType::VOLUME),
            volume_options: Some(MountVolumeOptions {
                driver_config: Some(MountVolumeOptionsDriverConfig {
                    name: Some("local".into()),
                    options: Some(HashMap::from([
                        ("type".to_string(), "tmpfs".to_string()),
                        ("device".to_string(), "tmpfs".to_string()),
                        ("o".to_string(), run_opts),
                    ])),
                }),
                labels: Some(HashMap::from([(
                    spec::LABEL_SANDBOX.to_string(),
                    spec.id.clone(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(HostConfig {
            runtime: Some(self.runtime().to_string()),
            network_mode: Some(network),
            sysctls,
            readonly_rootfs: Some(c.read_only_rootfs),
            memory: Some(memory),
            // No swap beyond the memory limit: the limit is the limit.
            memory_swap: Some(memory),
            nano_cpus: Some((cpus * 1e9) as i64),
            pids_limit: Some(pids_cgroup_limit(c.pids_limit, self.runtime())),
            security_opt: Some(self.security_opts()?),
            cap_drop: Some(c.dropped_caps.clone()),
            cap_add: {
                let mut add = c.added_caps.clone();
                // A build's sandbox installs packages: root manages files
                // and drops to service users as dpkg and apt do (Docker's
                // own defaults, without NET_RAW, MKNOD, SYS_CHROOT,
                // SETFCAP, SETPCAP, AUDIT_WRITE). The caller cannot ask
                // for it: the key is reserved.
                if spec
                    .metadata
                    .contains_key(stacyvm_core::provider::IMAGE_BUILD_METADATA)
                {
                    for cap in BUILD_CAPS {
                        if !add.iter().any(|a| a.eq_ignore_ascii_case(cap)) {
                            add.push(cap.to_string());
                        }
                    }
                }
                if is_pool_host(spec) {
                    for cap in POOL_HOST_CAPS {
                        if !add.iter().any(|a| a.eq_ignore_ascii_case(cap)) {
                            add.push(cap.to_string());
                        }
                    }
                }
                (!add.is_empty()).then_some(add)
            },
            tmpfs: if tmpfs.is_empty() { None } else { Some(tmpfs) },
            storage_opt,
            binds: Some(vec![format!(
                "{}:{AGENT_IN}:ro",
                self.opts.agent_path.display()
            )]),
            mounts: Some(
                std::iter::once(run_mount)
                    .chain(spec.volumes.iter().map(|v| Mount {
                        target: Some(v.target.clone()),
                        source: Some(v.host_path.to_string_lossy().to_string()),
                        typ: Some(MountType::BIND),
                        read_only: Some(v.read_only),
                        bind_options: Some(bollard::models::MountBindOptions {
                            // Nothing mounted later on the host shows inside.
                            propagation: Some(
                                bollard::models::MountBindOptionsPropagationEnum::RPRIVATE,
                            ),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }))
                    .collect(),
            ),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_string(), LOG_MAX_SIZE.to_string()),
                    ("max-file".to_string(), LOG_MAX_FILES.to_string()),
                ])),
            }),
            auto_remove: Some(false),
            init: Some(false),
            ..Default::default()
        })
    }

    /// Removes a container and its host state, ignoring "already gone".
    async fn discard(&self, id: &str) {
        if let Ok(mut conns) = self.conns.lock() {
            conns.remove(id);
        }
        if let Ok(mut locks) = self.connect_locks.lock() {
            locks.remove(id);
        }
        if let Ok(d) = self.engine().await {
            // Docker 20.10's libnetwork can deadlock the whole engine when
            // two endpoints leave one user-defined network at the same
            // time (its store watch loop and the container-exit path take
            // the controller and network locks in opposite orders). So
            // containers on the StacyVM bridge network leave it one at a
            // time, with a pause for the watch loop to drain.
            let bridge = self.opts.config.bridge_network.trim().to_string();
            let inspected = d.inspect_container(id, None).await.ok();
            let on_bridge = !bridge.is_empty()
                && inspected.as_ref().is_some_and(|i| {
                    i.network_settings
                        .as_ref()
                        .and_then(|n| n.networks.as_ref())
                        .is_some_and(|n| n.contains_key(&bridge))
                });
            let image_id = inspected.and_then(|i| i.image);
            let _serial = if on_bridge {
                Some(self.leave_lock.lock().await)
            } else {
                None
            };
            // A paused container is thawed first (its processes must run
            // to die).
            let _ = d.unpause_container(id).await;
            let opts = RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build();
            match d.remove_container(id, Some(opts)).await {
                Ok(()) => {
                    if let Some(img) = &image_id {
                        self.release_snapshot_image(img).await;
                    }
                }
                Err(e) if is_status(&e, 404) => {}
                Err(e) => warn!(sandbox_id = %id, error = %e, "removing container failed"),
            }
            if on_bridge {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // The run dir volume goes with its container; one left by a
            // container removed out of band (`docker rm` without `-v`) is
            // found by its label.
            let filters = HashMap::from([(
                "label".to_string(),
                vec![format!("{}={id}", spec::LABEL_SANDBOX)],
            )]);
            let opts = bollard::query_parameters::ListVolumesOptionsBuilder::default()
                .filters(&filters)
                .build();
            if let Ok(list) = d.list_volumes(Some(opts)).await {
                for v in list.volumes.unwrap_or_default() {
                    if let Err(e) = d
                        .remove_volume(
                            &v.name,
                            None::<bollard::query_parameters::RemoveVolumeOptions>,
                        )
                        .await
                    {
                        warn!(sandbox_id = %id, volume = %v.name, error = %e, "removing the run dir volume failed");
                    }
                }
            }
        }
        // Its egress rules go once the container is gone (an address that
        // another sandbox holds by then keeps that one's rules: see
        // `egress::remove_script`).
        if let Some(port) = self.egress_marker(id) {
            self.egress.remove(&port).await;
        }
        let dir = self.dir(id);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %dir.display(), error = %e, "removing sandbox state failed");
            }
        }
    }

    /// Reads a text file of a (created or running) container through the archive API.
    async fn container_text(&self, id: &str, path: &str) -> Option<String> {
        let d = self.engine().await.ok()?;
        let opts = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let mut s = d.download_from_container(id, Some(opts));
        let mut buf = Vec::new();
        while let Some(chunk) = s.next().await {
            buf.extend_from_slice(&chunk.ok()?);
        }
        first_file(&buf)
    }

    /// The container uid/gid of `user` when it is known without looking
    /// into the image: root, numeric ids, or learnt before for this image.
    fn known_ids(&self, image_id: &str, user: &str) -> Option<(u32, u32)> {
        if is_root_user(user) {
            return Some((0, 0));
        }
        if user.split(':').all(|p| p.parse::<u32>().is_ok()) {
            return spec::resolve_user(user, "", "").ok();
        }
        self.user_ids
            .lock()
            .ok()?
            .get(&(image_id.to_string(), user.to_string()))
            .copied()
    }

    /// Resolves a named user through the created container's /etc/passwd
    /// and /etc/group, remembering the answer for the image.
    async fn resolve_ids(&self, id: &str, image_id: &str, user: &str) -> Result<(u32, u32)> {
        let passwd = self
            .container_text(id, "/etc/passwd")
            .await
            .unwrap_or_default();
        let group = self
            .container_text(id, "/etc/group")
            .await
            .unwrap_or_default();
        let ids = spec::resolve_user(user, &passwd, &group)?;
        if let Ok(mut m) = self.user_ids.lock() {
            m.insert((image_id.to_string(), user.to_string()), ids);
        }
        Ok(ids)
    }

    /// Gives `/workspace` to a non-root container user before start (the
    /// engine would create it as root, and the user has no capabilities).
    async fn prepare_workspace(&self, id: &str, (uid, gid): (u32, u32)) -> Result<()> {
        if uid == 0 || self.opts.config.read_only_rootfs {
            // Root owns it already; on a read-only root the workspace is a
            // world-writable tmpfs (see host_config).
            return Ok(());
        }
        let tar = dir_tar("workspace", uid, gid, 0o755)?;
        let opts = UploadToContainerOptionsBuilder::default().path("/").build();
        self.engine()
            .await?
            .upload_to_container(id, Some(opts), bollard::body_full(tar.into()))
            .await
            .map_err(|e| engine_err("creating the workspace", e))
    }

    /// Describes why a container stopped during start, with its last log lines.
    async fn death_report(&self, id: &str) -> Error {
        let Ok(d) = self.engine().await else {
            return Error::unavailable("the docker engine went away during spawn");
        };
        let state = d
            .inspect_container(id, None)
            .await
            .ok()
            .and_then(|c| c.state)
            .unwrap_or_default();
        let lines = self
            .tail_logs(id, DEATH_LOG_LINES)
            .await
            .unwrap_or_default();
        let logs = if lines.is_empty() {
            "no output".to_string()
        } else {
            lines.join("\n")
        };
        if state.oom_killed == Some(true) {
            return Error::invalid(format!(
                "the sandbox container was killed for exceeding its memory limit during start; raise memory_mb (last log lines: {logs})"
            ));
        }
        let code = state.exit_code.unwrap_or(-1);
        let err = state.error.filter(|e| !e.is_empty());
        Error::invalid(format!(
            "the sandbox container exited during start (exit code {code}{}); last log lines:\n{logs}",
            err.map(|e| format!(", {e}")).unwrap_or_default()
        ))
    }

    async fn tail_logs(&self, id: &str, lines: usize) -> Result<Vec<String>> {
        let d = self.engine().await?;
        let opts = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail(&if lines == 0 {
                "all".to_string()
            } else {
                lines.to_string()
            })
            .build();
        let mut s = d.logs(id, Some(opts));
        let mut out = Vec::new();
        while let Some(item) = s.next().await {
            match item {
                Ok(o) => {
                    let text = String::from_utf8_lossy(&o.into_bytes()).to_string();
                    out.extend(
                        text.lines()
                            .filter(|l| !l.trim().is_empty())
                            .map(str::to_string),
                    );
                }
                Err(e) if is_status(&e, 404) => return Err(Error::sandbox_not_found(id)),
                Err(e) => return Err(engine_err("reading container logs", e)),
            }
        }
        let skip = out.len().saturating_sub(lines.max(1));
        Ok(if lines == 0 {
            out
        } else {
            out.into_iter().skip(skip).collect()
        })
    }

    /// Connects to the agent of a running container: directly through the
    /// bind-mounted socket, or over an engine exec of the agent's relay.
    /// `run_dir` is the host side of the container's socket dir.
    async fn connect(
        &self,
        id: &str,
        runtime: &str,
        run_dir: &Path,
        token: Option<&[u8]>,
        slot: &str,
    ) -> Result<Arc<AgentClient>> {
        if self.shares_sockets(runtime).await {
            let pinned = sock::open_agent_socket(run_dir)?.ok_or_else(|| {
                Error::unavailable(format!("the agent of sandbox {id} has no socket"))
            })?;
            return AgentClient::connect_slot(&pinned.path(), token, slot).await;
        }
        self.relay(id, token, slot).await
    }

    /// Speaks the agent protocol over an Engine exec of `stacyvm-agent
    /// relay`, whose attached stream is the link (no host socket).
    async fn relay(&self, id: &str, token: Option<&[u8]>, slot: &str) -> Result<Arc<AgentClient>> {
        let d = self.engine().await?;
        let exec = d
            .create_exec(
                id,
                CreateExecOptions::<String> {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(false),
                    cmd: Some(vec![
                        AGENT_IN.into(),
                        "relay".into(),
                        "--socket".into(),
                        SOCK_IN.into(),
                    ]),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| match e {
                e if is_status(&e, 404) => Error::sandbox_not_found(id),
                e => engine_err("starting the agent relay", e),
            })?;
        let StartExecResults::Attached { output, input } = d
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| engine_err("starting the agent relay", e))?
        else {
            return Err(Error::internal("agent relay exec started detached"));
        };
        let exited = Box::pin(d.wait_container(id, None::<WaitContainerOptions>));
        AgentClient::handshake_slot(
            link::EngineStream::new(id, output, input, exited),
            token,
            slot,
        )
        .await
    }

    fn open_conn(&self, id: &str) -> Result<Option<AgentSession>> {
        let conns = self.conns.lock().map_err(|_| Error::internal("lock"))?;
        Ok(conns.get(id).filter(|c| !c.is_closed()).cloned())
    }

    /// Starts a created (or stopped) container and hands its agent the
    /// token on stdin. Already running is `Ok` (nothing is handed then).
    async fn start_with_token(&self, id: &str, token: &[u8]) -> Result<()> {
        let d = self.engine().await?;
        let opts = bollard::query_parameters::AttachContainerOptionsBuilder::default()
            .stdin(true)
            .stream(true)
            .build();
        let attached = tokio::time::timeout(TOKEN_TIMEOUT, d.attach_container(id, Some(opts)))
            .await
            .map_err(|_| Error::unavailable("attaching to the sandbox container timed out"))?
            .map_err(|e| match e {
                e if is_status(&e, 404) => Error::sandbox_not_found(id),
                e => engine_err("attaching to the sandbox container", e),
            })?;
        match d.start_container(id, None).await {
            Ok(()) => {}
            Err(e) if is_status(&e, 304) => return Ok(()),
            Err(e) if is_status(&e, 404) => return Err(Error::sandbox_not_found(id)),
            Err(EngineError::DockerResponseServerError { message, .. }) => {
                return Err(Error::invalid(message))
            }
            Err(e) => return Err(engine_err("starting the sandbox container", e)),
        }
        let mut input = attached.input;
        let line = format!("{}\n", hex::encode(token));
        tokio::time::timeout(TOKEN_TIMEOUT, async {
            input.write_all(line.as_bytes()).await?;
            input.flush().await?;
            input.shutdown().await
        })
        .await
        .map_err(|_| Error::unavailable("handing the agent its token timed out"))?
        .map_err(|e| Error::unavailable("handing the agent its token").with_source(e))?;
        Ok(())
    }

    /// The handshake token of a sandbox, from its host dir (found through
    /// its label, so a container created under another data dir works).
    /// `None` for containers made before tokens (their agent has none).
    fn sandbox_token(
        &self,
        id: &str,
        cfg: &bollard::models::ContainerConfig,
    ) -> Result<Option<Vec<u8>>> {
        let uses_token = cfg
            .entrypoint
            .as_ref()
            .is_some_and(|e| e.iter().any(|a| a == "--token-file"));
        if !uses_token {
            return Ok(None);
        }
        let dir = cfg
            .labels
            .as_ref()
            .and_then(|l| l.get(spec::LABEL_HOST_DIR))
            .map_or_else(|| self.dir(id), PathBuf::from);
        read_token(&dir).map(Some)
    }

    /// The connect lock of one sandbox.
    fn connect_lock(&self, id: &str) -> Result<Arc<tokio::sync::Mutex<()>>> {
        let mut locks = self
            .connect_locks
            .lock()
            .map_err(|_| Error::internal("lock"))?;
        Ok(locks.entry(id.to_string()).or_default().clone())
    }

    /// The live agent connection of a sandbox (re-connecting after a
    /// restart or a lost connection). Connecting is serialised per sandbox
    /// and bounded by [`CONNECT_TIMEOUT`], waiting included.
    async fn conn(&self, id: &str) -> Result<AgentSession> {
        if let Some(c) = self.open_conn(id)? {
            return Ok(c);
        }
        let (host, slot) = stacyvm_core::provider::split_slot_runtime_id(id).unwrap_or((id, ""));
        if !paths::is_sandbox_id(host) || !(slot.is_empty() || paths::is_sandbox_id(slot)) {
            return Err(Error::sandbox_not_found(id));
        }
        let lock = self.connect_lock(id)?;
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let timed_out = || {
            Error::unavailable(format!(
                "the agent of sandbox {id} did not answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            ))
        };
        let _g = tokio::time::timeout_at(deadline, lock.lock())
            .await
            .map_err(|_| timed_out())?;
        if let Some(c) = self.open_conn(id)? {
            return Ok(c);
        }
        tokio::time::timeout_at(deadline, self.reconnect(id))
            .await
            .map_err(|_| timed_out())?
    }

    /// Connects to a container's agent; for a pool slot's runtime id
    /// (`host/slot`), to the slot's agent in the host container.
    async fn reconnect(&self, runtime_id: &str) -> Result<AgentSession> {
        let (id, slot) =
            stacyvm_core::provider::split_slot_runtime_id(runtime_id).unwrap_or((runtime_id, ""));
        let d = self.engine().await?;
        let info = match d.inspect_container(id, None).await {
            Ok(i) => i,
            Err(e) if is_status(&e, 404) => return Err(Error::sandbox_not_found(id)),
            Err(e) => return Err(engine_err("inspecting the sandbox container", e)),
        };
        let cfg = info.config.clone().unwrap_or_default();
        if !spec::is_ours(cfg.labels.as_ref()) {
            return Err(Error::sandbox_not_found(id));
        }
        let state = info.state.clone().unwrap_or_default();
        if state.running != Some(true) {
            return Err(Error::unavailable(format!(
                "sandbox {id} is not running (container state {})",
                state.status.map(|s| s.to_string()).unwrap_or_default()
            )));
        }
        let runtime = info
            .host_config
            .as_ref()
            .and_then(|h| h.runtime.clone())
            .unwrap_or_default();
        // The socket dir is wherever the container's mount says (a
        // container adopted from another data dir keeps its old one).
        let run_dir = run_dir_of(&info)
            .ok_or_else(|| Error::unavailable(format!("sandbox {id} has no agent socket mount")))?;
        let token = self.sandbox_token(id, &cfg)?;
        let client = self
            .connect(id, &runtime, &run_dir, token.as_deref(), slot)
            .await?;
        let env = spec::parse_env(&cfg.env.unwrap_or_default());
        // A slot runs as its own uid whatever the container's user is.
        let user = if slot.is_empty() {
            cfg.user.as_deref().unwrap_or_default()
        } else {
            ""
        };
        let env = base_env(&client, env, user).await;
        let conn = AgentSession::new(runtime_id, client).with_env(env);
        self.conns
            .lock()
            .map_err(|_| Error::internal("lock"))?
            .insert(runtime_id.to_string(), conn.clone());
        Ok(conn)
    }

    /// Waits until a freshly started container's agent answers; a container
    /// that stops first is reported with its last log lines.
    async fn await_agent(
        &self,
        id: &str,
        run_dir: &Path,
        token: &[u8],
    ) -> Result<Arc<AgentClient>> {
        let d = self.engine().await?;
        let started = Instant::now();
        let direct = self.shares_sockets(self.runtime()).await;
        let mut tries = 0u32;
        loop {
            if direct {
                if let Some(pinned) = sock::open_agent_socket(run_dir)? {
                    if let Ok(c) = AgentClient::connect(&pinned.path(), Some(token)).await {
                        return Ok(c);
                    }
                }
            } else {
                match self.relay(id, Some(token), "").await {
                    Ok(connected) => return Ok(connected),
                    Err(e) => debug!(sandbox_id = %id, error = %e, "agent relay not ready"),
                }
            }
            tries += 1;
            // Check the container now and then: it may have died.
            if !direct || tries.is_multiple_of(100) {
                let running = d
                    .inspect_container(id, None)
                    .await
                    .ok()
                    .and_then(|c| c.state)
                    .and_then(|s| s.running);
                if running != Some(true) {
                    return Err(self.death_report(id).await);
                }
            }
            if started.elapsed() > AGENT_START_TIMEOUT {
                let logs = self
                    .tail_logs(id, DEATH_LOG_LINES)
                    .await
                    .unwrap_or_default();
                return Err(Error::unavailable(format!(
                    "the sandbox agent did not answer within {}s; last log lines:\n{}",
                    AGENT_START_TIMEOUT.as_secs(),
                    logs.join("\n")
                )));
            }
            tokio::time::sleep(Duration::from_millis(if direct { 1 } else { 50 })).await;
        }
    }

    async fn spawn_inner(&self, spec: &SpawnSpec, image: &ImageRef) -> Result<()> {
        let (image_user, image_env, image_id, is_snapshot) = self.ensure_image(image).await?;
        if spec.snapshot.is_none() {
            // However it was named: a snapshot's image is reached through
            // the snapshot (its tenancy), never as an image.
            if is_snapshot {
                return Err(Error::invalid(
                    "that image is a snapshot: spawn it with \"snapshot\", not by image name",
                ));
            }
        }
        let d = self.engine().await?;
        let dir = self.make_dir(&spec.id)?;
        let token = new_token(&dir)?;
        // A pool host's agent runs as root (see create_container): its run
        // dir is root's.
        let user = if is_pool_host(spec) {
            "0:0".to_string()
        } else if self.opts.config.user.is_empty() {
            image_user
        } else {
            self.opts.config.user.clone()
        };
        let remap = self.remap().await?;
        let host_ids = |(u, g): (u32, u32)| (remap.0.saturating_add(u), remap.1.saturating_add(g));
        let known = self.known_ids(&image_id, &user);
        let guess = known.unwrap_or((0, 0));
        self.create_container(spec, image, host_ids(guess)).await?;
        let ids = match known {
            Some(ids) => ids,
            None => {
                // A named user: its ids come from the image's /etc/passwd,
                // readable only once a container exists. The run dir must
                // belong to it, so the container is made again (once per
                // image and user; the answer is remembered).
                let ids = self.resolve_ids(&spec.id, &image_id, &user).await?;
                if ids != guess {
                    let opts = RemoveContainerOptionsBuilder::default()
                        .force(true)
                        .v(true)
                        .build();
                    d.remove_container(&spec.id, Some(opts))
                        .await
                        .map_err(|e| engine_err("re-creating the sandbox container", e))?;
                    self.create_container(spec, image, host_ids(ids)).await?;
                }
                ids
            }
        };
        self.prepare_workspace(&spec.id, ids).await?;
        self.start_with_token(&spec.id, &token)
            .await
            .map_err(|e| match e.kind() {
                stacyvm_core::ErrorKind::InvalidInput => Error::invalid(format!(
                    "the sandbox container failed to start: {}",
                    e.detail()
                )),
                _ => e,
            })?;
        let info = d
            .inspect_container(&spec.id, None)
            .await
            .map_err(|e| engine_err("inspecting the sandbox container", e))?;
        let run_dir = run_dir_of(&info)
            .ok_or_else(|| Error::internal("the sandbox container has no agent socket mount"))?;
        // The egress rules go in while the agent comes up (each costs a
        // kernel commit); both are done before the spawn returns, so no
        // command of the caller runs without them.
        let (ruled, client) = tokio::join!(
            async {
                match &spec.egress {
                    Some(rules) => self.apply_egress(&spec.id, &info, Some(rules)).await,
                    None => Ok(()),
                }
            },
            self.await_agent(&spec.id, &run_dir, &token)
        );
        ruled?;
        let client = client?;
        let env = tokio::time::timeout(
            CONNECT_TIMEOUT,
            base_env(&client, spec::parse_env(&image_env), &user),
        )
        .await
        .map_err(|_| Error::unavailable("the sandbox agent did not answer in time"))?;
        let conn = AgentSession::new(&spec.id, client).with_env(env);
        self.conns
            .lock()
            .map_err(|_| Error::internal("lock"))?
            .insert(spec.id.clone(), conn);
        Ok(())
    }

    /// The engine's view of sandbox `id`'s container; not found unless it
    /// exists and StacyVM made it.
    async fn inspect_ours(&self, id: &str) -> Result<bollard::models::ContainerInspectResponse> {
        if !paths::is_sandbox_id(id) {
            return Err(Error::sandbox_not_found(id));
        }
        let d = self.engine().await?;
        let info = match d.inspect_container(id, None).await {
            Ok(i) => i,
            Err(e) if is_status(&e, 404) => return Err(Error::sandbox_not_found(id)),
            Err(e) => return Err(engine_err("inspecting the sandbox container", e)),
        };
        if !spec::is_ours(info.config.as_ref().and_then(|c| c.labels.as_ref())) {
            return Err(Error::sandbox_not_found(id));
        }
        Ok(info)
    }

    /// Where a container sits on the sandbox network (`None`: not on it,
    /// as with `network_mode: none`).
    fn egress_port_of(
        &self,
        id: &str,
        info: &bollard::models::ContainerInspectResponse,
    ) -> Option<crate::egress::Port> {
        let name = match self.opts.config.bridge_network.trim() {
            "" => "stacyvm-bridge",
            n => n,
        };
        let networks = info.network_settings.as_ref()?.networks.as_ref()?;
        let ep = networks.get(name)?;
        let ip = ep.ip_address.as_deref()?.parse().ok()?;
        let gateway = ep.gateway.as_deref()?.parse().ok()?;
        let iface = self
            .bridge
            .get()
            .cloned()
            .unwrap_or_else(|| net::bridge_name(name));
        Some(crate::egress::Port::new(&iface, ip, gateway, id))
    }

    /// The place of a sandbox whose egress rules are in force (recorded in
    /// its host dir).
    fn egress_marker(&self, id: &str) -> Option<crate::egress::Port> {
        let text = std::fs::read(self.dir(id).join("egress.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    async fn apply_egress(
        &self,
        id: &str,
        info: &bollard::models::ContainerInspectResponse,
        rules: Option<&stacyvm_core::egress::EgressRules>,
    ) -> Result<()> {
        let Some(port) = self.egress_port_of(id, info) else {
            // Not on the sandbox network: nothing to filter (none), or a
            // network StacyVM does not manage.
            let mode = info
                .host_config
                .as_ref()
                .and_then(|h| h.network_mode.clone())
                .unwrap_or_default();
            return if mode == "none" || rules.is_none_or(|r| r.is_empty()) {
                Ok(())
            } else {
                Err(Error::unsupported(format!(
                    "egress rules apply to sandboxes on the sandbox network (network_mode bridge), not {mode:?}"
                )))
            };
        };
        let marker = self.dir(id).join("egress.json");
        if rules.is_some_and(|r| !r.is_empty()) {
            std::fs::write(&marker, serde_json::to_vec(&port).unwrap_or_default())
                .map_err(|e| Error::internal("recording egress rules").with_source(e))?;
            let resolvers = std::fs::read_to_string("/etc/resolv.conf")
                .map(|t| crate::native::net::reachable_nameservers(&t))
                .unwrap_or_default();
            let sandbox_net = info
                .network_settings
                .as_ref()
                .and_then(|n| n.networks.as_ref())
                .and_then(|n| {
                    n.values()
                        .find(|ep| ep.gateway.as_deref() == Some(&port.gateway.to_string()))
                })
                .and_then(|ep| ep.ip_prefix_len)
                .and_then(|len| {
                    let mask = u32::MAX
                        .checked_shl(32 - u32::try_from(len).ok()?.min(32))
                        .unwrap_or(0);
                    let base = std::net::Ipv4Addr::from(u32::from(port.ip) & mask);
                    format!("{base}/{len}").parse().ok()
                });
            let op = crate::egress::Operator {
                resolvers,
                // Unknown prefix: the gateway's /16, Docker's default.
                sandbox_net: vec![sandbox_net.unwrap_or_else(|| {
                    let base = std::net::Ipv4Addr::from(u32::from(port.gateway) & 0xffff_0000);
                    format!("{base}/16")
                        .parse()
                        .unwrap_or_else(|_| stacyvm_core::cidr::Cidr::from(port.gateway))
                })],
                ..crate::egress::Operator::default()
            };
            self.egress.apply(&port, rules, &op).await
        } else {
            self.egress.remove(&port).await;
            let _ = std::fs::remove_file(&marker);
            Ok(())
        }
    }

    /// After a pause (ours, or the engine's for a commit): the agent's
    /// connection is an engine stream, and one that did not survive it
    /// (seen under gVisor) is dropped now, so the next call connects
    /// afresh instead of failing on it.
    pub(super) async fn drop_dead_conn(&self, id: &str) {
        if let Ok(Some(c)) = self.open_conn(id) {
            let alive = tokio::time::timeout(Duration::from_secs(2), c.client().ping())
                .await
                .is_ok_and(|r| r.is_ok());
            if !alive {
                if let Ok(mut conns) = self.conns.lock() {
                    conns.remove(id);
                }
            }
        }
    }

    /// Creates (does not start) the sandbox container; `run_owner` owns
    /// its run dir on the host.
    async fn create_container(
        &self,
        spec: &SpawnSpec,
        image: &ImageRef,
        run_owner: (u32, u32),
    ) -> Result<()> {
        let mut labels = spec::labels(spec, &spec.image);
        labels.insert(
            spec::LABEL_HOST_DIR.to_string(),
            self.dir(&spec.id).display().to_string(),
        );
        // An image may carry labels of ours (a snapshot's or a build's
        // commit keeps the source container's; anyone can label an image),
        // which the engine gives every container of it unless set: the
        // sandbox's own (even empty) win.
        for k in [spec::LABEL_METADATA, spec::LABEL_OWNER, spec::LABEL_TENANT] {
            labels.entry(k.to_string()).or_default();
        }
        let body = ContainerCreateBody {
            image: Some(image.full()),
            entrypoint: Some({
                let mut e: Vec<String> = vec![
                    AGENT_IN.into(),
                    "serve".into(),
                    "--socket".into(),
                    SOCK_IN.into(),
                    "--token-file".into(),
                    TOKEN_FROM.into(),
                ];
                if is_pool_host(spec) {
                    e.push("--pool-host".into());
                }
                e
            }),
            cmd: Some(Vec::new()),
            // The engine creates the workdir; on a read-only root the
            // workspace is a tmpfs instead, whose mode a workdir would reset.
            working_dir: if self.opts.config.read_only_rootfs {
                None
            } else {
                Some(paths::WORKSPACE.into())
            },
            hostname: Some(spec.id.clone()),
            // A pool host's agent starts as root (its slot factory makes
            // the slots' users); slots never run as it.
            user: if is_pool_host(spec) {
                Some("0:0".into())
            } else if self.opts.config.user.is_empty() {
                None
            } else {
                Some(self.opts.config.user.clone())
            },
            labels: Some(labels),
            tty: Some(false),
            // The token arrives on stdin, once (see TOKEN_FROM).
            attach_stdin: Some(true),
            open_stdin: Some(true),
            stdin_once: Some(true),
            // The agent ignores SIGTERM as PID 1; stopping means killing.
            stop_signal: Some("SIGKILL".into()),
            host_config: Some(self.host_config(spec, run_owner).await?),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::default()
            .name(&spec.id)
            .build();
        self.engine()
            .await?
            .create_container(Some(opts), body)
            .await
            .map_err(|e| engine_err("creating the sandbox container", e))?;
        Ok(())
    }
}

/// The base environment of a sandbox's execs: the container's (image) env
/// plus `HOME` of a non-root user from the image's /etc/passwd (the agent's
/// default `/root` is not theirs), as `docker exec` would set it.
async fn base_env(
    client: &Arc<AgentClient>,
    mut env: BTreeMap<String, String>,
    user: &str,
) -> BTreeMap<String, String> {
    // HOME and PATH come from the agent unless the image sets them; the
    // container's HOSTNAME is not the exec's.
    env.remove("HOSTNAME");
    let name = user.split(':').next().unwrap_or_default();
    if name.is_empty() || name == "root" || name == "0" || env.contains_key("HOME") {
        return env;
    }
    let passwd = read_passwd(client).await.unwrap_or_default();
    let home = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && (f[0] == name || f[2] == name)).then(|| f[5].to_string())
    });
    env.insert(
        "HOME".into(),
        home.filter(|h| !h.is_empty()).unwrap_or_else(|| "/".into()),
    );
    env
}

/// The image's /etc/passwd through the agent: a regular file of at most
/// [`PASSWD_MAX_BYTES`], read within [`PASSWD_TIMEOUT`] (the sandbox may
/// have made it a FIFO, a device or a huge file). `None` otherwise.
async fn read_passwd(client: &Arc<AgentClient>) -> Option<String> {
    let read = client.read_all("/etc/passwd", PASSWD_MAX_BYTES);
    let data = tokio::time::timeout(PASSWD_TIMEOUT, read)
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&data).to_string())
}

/// Makes a sandbox's random handshake token and keeps the host's copy in
/// `<dir>/token` (0600, root's; the dir is 0700 and never visible inside).
fn new_token(dir: &Path) -> Result<Vec<u8>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let token: [u8; 32] = rand::random();
    let path = dir.join(TOKEN_FILE);
    let _ = std::fs::remove_file(&path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(hex::encode(token).as_bytes()))
        .map_err(|e| Error::internal("storing the sandbox token").with_source(e))?;
    Ok(token.to_vec())
}

fn read_token(dir: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(dir.join(TOKEN_FILE)).map_err(|e| {
        Error::unavailable("the sandbox's agent token is missing from its host dir").with_source(e)
    })?;
    hex::decode(text.trim())
        .map_err(|e| Error::unavailable("the sandbox's agent token is corrupt").with_source(e))
}

/// Whether a container user is root (by name or id).
fn is_root_user(user: &str) -> bool {
    user.is_empty() || user == "root" || user == "0" || user.starts_with("0:")
}

/// The host side of a container's `/.stacyvm/run` (its mount's source).
fn run_dir_of(info: &ContainerInspectResponse) -> Option<PathBuf> {
    info.mounts
        .as_ref()?
        .iter()
        .find(|m| m.destination.as_deref() == Some(RUN_IN))
        .and_then(|m| m.source.clone())
        .map(PathBuf::from)
}

#[async_trait]
impl Provider for DockerProvider {
    fn name(&self) -> &str {
        "docker"
    }

    /// Starts a stopped sandbox container again (its writable layer, so
    /// the workspace, is kept) and waits until its agent answers.
    async fn recover(&self, id: &str) -> Result<()> {
        let d = self.engine().await?;
        let info = match d.inspect_container(id, None).await {
            Ok(i) => i,
            Err(e) if is_status(&e, 404) => return Err(Error::sandbox_not_found(id)),
            Err(e) => return Err(engine_err("inspecting the sandbox container", e)),
        };
        let cfg = info.config.unwrap_or_default();
        match self.sandbox_token(id, &cfg)? {
            Some(token) => self.start_with_token(id, &token).await?,
            None => match d.start_container(id, None).await {
                Ok(()) => {}
                Err(e) if is_status(&e, 304) => {}
                Err(e) if is_status(&e, 404) => return Err(Error::sandbox_not_found(id)),
                Err(e) => return Err(engine_err("restarting the sandbox container", e)),
            },
        }
        if let Ok(mut conns) = self.conns.lock() {
            conns.remove(id);
        }
        let started = Instant::now();
        loop {
            match self.conn(id).await {
                Ok(_) => return Ok(()),
                Err(e) if started.elapsed() > Duration::from_secs(15) => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// `providers.docker.memory`/`cpus` apply to spawns that name no size
    /// (gaps C-26: the original always overrode them with the server's
    /// defaults).
    fn default_resources(&self) -> Option<stacyvm_core::provider::ResourceDefaults> {
        let c = &self.opts.config;
        let memory = parse_memory(&c.memory).ok()?;
        Some(stacyvm_core::provider::ResourceDefaults {
            memory_mb: (memory / (1024 * 1024)).max(1),
            vcpus: (c.cpus.ceil() as i64).max(1),
        })
    }

    fn capabilities(&self) -> Vec<String> {
        let mut c: Vec<String> = capability::BASE.iter().map(|s| (*s).to_string()).collect();
        c.push(capability::RUNTIME_INVENTORY.into());
        c.push(capability::STATS.into());
        c.push(capability::EXEC_INTERACTIVE.into());
        c.push(capability::PTY.into());
        c.push(capability::WATCH.into());
        c.push(capability::PAUSE.into());
        c.push(capability::EGRESS.into());
        if !self.opts.config.read_only_rootfs {
            c.push(capability::SANDBOX_SNAPSHOTS.into());
            c.push(capability::IMAGE_BUILD.into());
        }
        c.push(capability::IMAGE_PUSH.into());
        c.push(capability::VOLUMES.into());
        if self.can_switch_users() {
            c.push(capability::EXEC_USER.into());
        }
        // Slots need a /proc of their own pid namespace, which gVisor
        // cannot list and Kata's guest agent cannot make: runc only.
        if self.runtime() == "runc" {
            c.push(capability::POOL_HOST.into());
        }
        c
    }

    fn profile(&self) -> Profile {
        let rt = self.runtime();
        let isolation = if rt.contains("runsc") || rt.contains("gvisor") {
            Isolation::UserSpaceKernel
        } else if rt.contains("kata") {
            Isolation::MicroVm
        } else {
            Isolation::Container
        };
        Profile {
            isolation,
            network_modes: vec!["none".into(), "bridge".into()],
            default_network: match self.opts.config.network_mode.as_str() {
                "" => "none".into(),
                m => m.into(),
            },
        }
    }

    fn describe(&self) -> BTreeMap<String, String> {
        let c = &self.opts.config;
        let mut m = BTreeMap::from([
            ("type".to_string(), "docker".to_string()),
            ("runtime".to_string(), self.runtime().to_string()),
            (
                "socket".to_string(),
                if c.socket.is_empty() {
                    std::env::var("DOCKER_HOST")
                        .unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
                } else {
                    c.socket.clone()
                },
            ),
            (
                "network_mode".to_string(),
                if c.network_mode.is_empty() {
                    "none".into()
                } else {
                    c.network_mode.clone()
                },
            ),
            ("default_image".to_string(), c.default_image.clone()),
            ("bridge_network".to_string(), c.bridge_network.clone()),
            (
                "disk".to_string(),
                match self.layer_quota.get() {
                    Some(false) => "not capped (storage driver cannot)".into(),
                    _ => c.disk.clone(),
                },
            ),
            (
                "read_only_rootfs".to_string(),
                c.read_only_rootfs.to_string(),
            ),
            ("user".to_string(), c.user.clone()),
            (
                "agent_path".to_string(),
                self.opts.agent_path.display().to_string(),
            ),
            (
                "exec_transport".to_string(),
                match self
                    .socket_sharing
                    .lock()
                    .ok()
                    .and_then(|m| m.get(self.runtime()).copied())
                {
                    _ if direct_socket(self.runtime()) => "agent socket".into(),
                    Some(true) => "agent socket (host-uds)".into(),
                    Some(false) => "agent relay over engine exec".into(),
                    None => "not probed yet".into(),
                },
            ),
        ]);
        if let Some(d) = self.engine.get() {
            m.insert("api_version".to_string(), d.client_version().to_string());
        }
        m
    }

    async fn health(&self) -> Result<()> {
        let d = self.engine().await?;
        d.ping()
            .await
            .map_err(|e| engine_err("pinging the docker engine", e))?;
        let info = d
            .info()
            .await
            .map_err(|e| engine_err("reading docker engine info", e))?;
        let runtimes: Vec<String> = info
            .runtimes
            .map(|r| {
                let mut k: Vec<String> = r.into_keys().collect();
                k.sort();
                k
            })
            .unwrap_or_default();
        let want = self.runtime();
        if !runtimes.iter().any(|r| r == want) {
            return Err(Error::unavailable(format!(
                "docker runtime {want:?} (providers.docker.runtime) is not registered with dockerd (registered: {}); add it under \"runtimes\" in /etc/docker/daemon.json and restart dockerd",
                runtimes.join(", ")
            )));
        }
        if let Some(problem) = crate::agent::agent_problem(&self.opts.agent_path) {
            return Err(Error::unavailable(problem));
        }
        // Learn the exec transport now, so `describe` can show it.
        self.shares_sockets(want).await;
        Ok(())
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned> {
        if !paths::is_sandbox_id(&spec.id) {
            return Err(Error::invalid(format!("bad sandbox id {:?}", spec.id)));
        }
        if is_pool_host(spec) && self.runtime() != "runc" {
            return Err(Error::unsupported(format!(
                "pool hosts run under runc only: a slot needs a /proc of its own pid namespace, which runtime {} cannot give",
                self.runtime()
            )));
        }
        // `host` (the orchestrator's default image) is not an image a
        // container can show: like the microVM providers, docker then uses
        // its own default image.
        let name = if spec.image.is_empty() || spec.image == "host" {
            self.opts.config.default_image.as_str()
        } else {
            spec.image.as_str()
        };
        let image = match &spec.snapshot {
            Some(snap) => self.snapshot_image(snap).await?,
            None => {
                let image = parse_image(name)?;
                if snapshot::is_reserved(&image) {
                    return Err(Error::invalid(format!(
                        "image {name:?} is reserved: snapshots are spawned with \"snapshot\", not by image name"
                    )));
                }
                image
            }
        };
        if !self.opts.agent_path.is_file() {
            return Err(Error::unavailable(format!(
                "agent binary {} not found; build it with scripts/build-agent or set STACYVM_AGENT_PATH",
                self.opts.agent_path.display()
            )));
        }
        let started = Instant::now();
        match self.spawn_inner(spec, &image).await {
            Ok(()) => {
                info!(sandbox_id = %spec.id, image = %image.full(), runtime = self.runtime(), elapsed_ms = started.elapsed().as_millis() as u64, "docker sandbox started");
                Ok(Spawned {
                    runtime_id: spec.id.clone(),
                })
            }
            Err(e) => {
                // Nothing of a failed spawn remains, but a container of
                // that name that StacyVM did not create stays untouched.
                let foreign = match self.engine().await {
                    Ok(d) => d.inspect_container(&spec.id, None).await.is_ok_and(|c| {
                        !spec::is_ours(c.config.as_ref().and_then(|c| c.labels.as_ref()))
                    }),
                    Err(_) => false,
                };
                if foreign {
                    let _ = tokio::fs::remove_dir_all(self.dir(&spec.id)).await;
                } else {
                    self.discard(&spec.id).await;
                }
                Err(e)
            }
        }
    }

    async fn io(&self, id: &str) -> Result<Arc<dyn SandboxIo>> {
        Ok(Arc::new(self.conn(id).await?))
    }

    async fn slot_open(
        &self,
        host: &str,
        slot: &str,
        spec: &stacyvm_core::provider::SlotSpec,
    ) -> Result<()> {
        let c = self.conn(host).await?;
        crate::agent::slot_open(c.client(), slot, spec).await
    }

    async fn slot_close(&self, host: &str, slot: &str) -> Result<()> {
        let c = match self.conn(host).await {
            Ok(c) => c,
            // The host is gone, and its slots with it.
            Err(e) if e.kind() == stacyvm_core::ErrorKind::SandboxNotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if let Ok(mut conns) = self.conns.lock() {
            conns.remove(&stacyvm_core::provider::slot_runtime_id(host, slot));
        }
        crate::agent::slot_close(c.client(), slot).await
    }

    async fn slots(&self, host: &str) -> Result<Vec<String>> {
        crate::agent::slot_list(self.conn(host).await?.client()).await
    }

    /// The engine's pause (the cgroup freezer under runc; gVisor stops
    /// its sandbox).
    async fn pause(&self, id: &str) -> Result<()> {
        if self.status(id).await?.state == "paused" {
            return Ok(());
        }
        let d = self.engine().await?;
        d.pause_container(id)
            .await
            .map_err(|e| engine_err("pausing the sandbox container", e))
    }

    async fn resume(&self, id: &str) -> Result<()> {
        if self.status(id).await?.state != "paused" {
            return Ok(());
        }
        let d = self.engine().await?;
        d.unpause_container(id)
            .await
            .map_err(|e| engine_err("resuming the sandbox container", e))?;
        self.drop_dead_conn(id).await;
        Ok(())
    }

    async fn snapshot_sandbox(&self, id: &str, snapshot_id: &str) -> Result<SandboxSnapshot> {
        self.take_snapshot(id, snapshot_id).await
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        self.remove_snapshot(snapshot_id).await
    }

    async fn cached_image(
        &self,
        plan: &stacyvm_core::provider::ImageBuild,
    ) -> Result<Option<stacyvm_core::provider::BuiltImage>> {
        self.cached_build(plan).await
    }

    async fn commit_image(
        &self,
        id: &str,
        plan: &stacyvm_core::provider::ImageBuild,
    ) -> Result<stacyvm_core::provider::BuiltImage> {
        self.commit_build(id, plan).await
    }

    async fn push_image(
        &self,
        image_ref: &str,
        target: &str,
        auth: &stacyvm_core::provider::RegistryAuth,
        log: stacyvm_core::provider::BuildLog,
    ) -> Result<String> {
        self.push_built(image_ref, target, auth, log).await
    }

    async fn set_egress(
        &self,
        id: &str,
        rules: Option<&stacyvm_core::egress::EgressRules>,
    ) -> Result<()> {
        let info = self.inspect_ours(id).await?;
        self.apply_egress(id, &info, rules).await
    }

    async fn egress_denials(&self, id: &str) -> Result<Vec<stacyvm_api::EgressDenial>> {
        if !paths::is_sandbox_id(id) {
            return Err(Error::sandbox_not_found(id));
        }
        Ok(match self.egress_marker(id) {
            Some(port) => self.egress.denials(&port).await,
            None => Vec::new(),
        })
    }

    async fn status(&self, id: &str) -> Result<RuntimeStatus> {
        let info = self.inspect_ours(id).await?;
        let state = info
            .state
            .and_then(|s| s.status)
            .map(|s| s.to_string())
            .unwrap_or_default();
        Ok(RuntimeStatus {
            state: spec::map_state(&state).to_string(),
        })
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        if !paths::is_sandbox_id(id) {
            return Ok(());
        }
        let d = self.engine().await?;
        match d.inspect_container(id, None).await {
            Ok(info) => {
                if !spec::is_ours(info.config.as_ref().and_then(|c| c.labels.as_ref())) {
                    // Never touch a container StacyVM did not create.
                    return Ok(());
                }
            }
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(engine_err("inspecting the sandbox container", e)),
        }
        self.discard(id).await;
        Ok(())
    }

    async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>> {
        if !paths::is_sandbox_id(id) {
            return Err(Error::sandbox_not_found(id));
        }
        self.status(id).await?;
        self.tail_logs(id, lines).await
    }

    async fn list_runtimes(&self) -> Result<Vec<RuntimeInfo>> {
        let d = self.engine().await?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{}=true", spec::LABEL_MANAGED),
                format!("{}=docker", spec::LABEL_PROVIDER),
            ],
        )]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = d
            .list_containers(Some(opts))
            .await
            .map_err(|e| engine_err("listing sandbox containers", e))?;
        let mut out = Vec::new();
        for c in list {
            let labels = c.labels.unwrap_or_default();
            if !spec::is_ours(Some(&labels)) {
                continue;
            }
            let name = c
                .names
                .as_ref()
                .and_then(|n| n.first())
                .map(|n| n.trim_start_matches('/').to_string())
                .unwrap_or_default();
            out.push(spec::runtime_info(
                &labels,
                &name,
                c.id.as_deref().unwrap_or_default(),
                c.image.as_deref().unwrap_or_default(),
                &c.state.map(|s| s.to_string()).unwrap_or_default(),
                c.created,
            ));
        }
        out.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        Ok(out)
    }

    /// The engine's tagged images (at most 1000).
    async fn local_images(&self) -> Vec<String> {
        let Ok(d) = self.engine().await else {
            return Vec::new();
        };
        let opts = bollard::query_parameters::ListImagesOptionsBuilder::default().build();
        match d.list_images(Some(opts)).await {
            Ok(list) => list
                .into_iter()
                .flat_map(|i| i.repo_tags)
                .filter(|t| t != "<none>:<none>" && !t.starts_with("stacyvm-snapshot:"))
                .take(1000)
                .collect(),
            Err(e) => {
                warn!(error = %e, "listing the engine's images failed");
                Vec::new()
            }
        }
    }

    async fn stats(&self, id: &str) -> Result<Stats> {
        self.status(id).await?;
        let d = self.engine().await?;
        // A non-streaming sample carries the previous one for the CPU delta.
        let opts = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(false)
            .build();
        let mut s = d.stats(id, Some(opts));
        let st = match s.next().await {
            Some(Ok(st)) => st,
            Some(Err(e)) if is_status(&e, 404) => return Err(Error::sandbox_not_found(id)),
            Some(Err(e)) => return Err(engine_err("reading container stats", e)),
            None => return Err(Error::unavailable("the engine returned no stats")),
        };
        let cpu = st.cpu_stats.unwrap_or_default();
        let pre = st.precpu_stats.unwrap_or_default();
        let total = |c: &bollard::models::ContainerCpuStats| {
            c.cpu_usage
                .as_ref()
                .and_then(|u| u.total_usage)
                .unwrap_or(0)
        };
        let cpus = cpu.online_cpus.unwrap_or_else(|| {
            cpu.cpu_usage
                .as_ref()
                .and_then(|u| u.percpu_usage.as_ref())
                .map_or(1, |p| p.len() as u32)
        });
        let mem = st.memory_stats.unwrap_or_default();
        let usage = mem.usage.unwrap_or(0);
        // Inactive file pages are reclaimable and not the sandbox's use
        // (v1: `total_inactive_file`, v2: `inactive_file`). Not all of
        // `cache`: that holds shared memory too (tmpfs, and gVisor's whole
        // application memory, which lives in a memfd).
        let cache = mem
            .stats
            .as_ref()
            .and_then(|s| {
                s.get("total_inactive_file")
                    .or_else(|| s.get("inactive_file"))
                    .copied()
            })
            .unwrap_or(0);
        Ok(Stats {
            cpu_pct: spec::cpu_percent(
                total(&cpu),
                total(&pre),
                cpu.system_cpu_usage.unwrap_or(0),
                pre.system_cpu_usage.unwrap_or(0),
                cpus,
            ),
            mem_bytes: usage.saturating_sub(cache),
            mem_limit_bytes: mem.limit.unwrap_or(0),
        })
    }
}

impl DockerProvider {
    /// Whether the provider's engine knows `runtime` (for `doctor` and tests).
    pub async fn has_runtime(&self, runtime: &str) -> Result<bool> {
        let info = self
            .engine()
            .await?
            .info()
            .await
            .map_err(|e| engine_err("reading docker engine info", e))?;
        Ok(info.runtimes.is_some_and(|r| r.contains_key(runtime)))
    }
}
