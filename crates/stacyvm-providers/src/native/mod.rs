//! The `native` provider: Linux namespaces + overlayfs + cgroups, with the
//! stacyvm agent as PID 1 of every sandbox.
//!
//! Per sandbox (`<data>/native/sandboxes/<id>/`): `upper/` and `work/` of
//! the overlay root, `merged/` (mount point, only mounted inside the
//! sandbox's mount namespace), `agent.sock` (the agent's socket, bound
//! before pivot_root so it is invisible inside), `console.log`, `boot.json`
//! and `meta.json`. Sandboxes live under the host's init, not under the
//! server: a restarted server re-adopts them through `agent.sock`.

pub mod build;
pub mod disk;
#[cfg(test)]
mod egress_tests;
pub mod ids;
#[cfg(test)]
pub(crate) mod isolation_tests;
pub mod net;
mod orphans;
mod pool;
#[cfg(test)]
mod security_tests;
pub mod setup;
pub mod snapshot;
#[cfg(test)]
mod snapshot_tests;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use stacyvm_agent_proto::boot::{BootSpec, IdMap, RootSpec};
use stacyvm_core::provider::{
    capability, Isolation, Profile, Provider, RuntimeInfo, RuntimeStatus, SandboxIo, SpawnSpec,
    Spawned, Stats,
};
use stacyvm_core::{paths, Error, ErrorKind, Result};
use stacyvm_sandbox::cgroup::{self, Layout, Limits};
use stacyvm_sandbox::procs::Identity;
use tracing::{info, warn};

use crate::agent::{AgentClient, AgentSession};
use crate::image::store as images;

/// Settings of the native provider.
#[derive(Debug, Clone)]
pub struct NativeOptions {
    /// Root of the provider's state (`<data_dir>/native`).
    pub state_dir: PathBuf,
    /// The `stacyvm-agent` binary.
    pub agent_path: PathBuf,
    /// Default pids limit per sandbox.
    pub pids_limit: u64,
    /// Paths never exposed (e.g. the server's data dir).
    pub hidden: Vec<String>,
    /// Network mode when a spawn does not name one: `none` or `bridge`.
    pub network_mode: String,
    /// The host bridge used by `bridge` mode.
    pub bridge: net::BridgeOptions,
    /// Pre-booted sandboxes kept ready (root mode, image `host`, network
    /// `none`); 0 disables the pool.
    pub warm_pool: usize,
    /// Memory limit (MiB) pool sandboxes boot with (sizes their /tmp);
    /// the spawn's own limit is applied when one is claimed.
    pub pool_memory_mb: i64,
    /// Landlock: sandboxes may write only beneath [`LANDLOCK_WRITABLE`].
    pub landlock: bool,
    /// A root server runs every sandbox in its own user namespace, its
    /// root mapped to a block of `subordinate_ids` (never host root).
    pub user_namespace: bool,
    pub subordinate_ids: ids::IdRange,
    /// Per-sandbox disk cap and the data filesystem's free-space floor.
    pub disk: disk::DiskCaps,
}

/// Where a sandbox may write when landlock is on: its workspace, scratch
/// space, devices and procfs; the rest of its root is read/execute only.
pub const LANDLOCK_WRITABLE: &[&str] = &[
    "/workspace",
    "/tmp",
    "/var/tmp",
    "/run",
    "/dev",
    "/proc",
    "/home",
    "/root",
];

#[derive(Debug)]
pub struct NativeProvider {
    opts: NativeOptions,
    images: Arc<images::ImageStore>,
    cgroups: Option<Layout>,
    /// The server is not root: sandboxes get a user namespace.
    rootless: bool,
    bridge: Arc<net::Bridge>,
    booter: Arc<Booter>,
    pool: Arc<pool::Pool>,
    conns: Mutex<HashMap<String, Arc<AgentClient>>>,
    /// Serialises connection setup per sandbox (a hung agent delays only
    /// its own sandbox).
    connecting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Snapshots of sandboxes (their files).
    snapshots: Arc<snapshot::Snapshots>,
    /// Held while the provider exists; the disk guard stops with it.
    _alive: Arc<()>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Meta {
    id: String,
    image: String,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    owner_id: String,
    tenant_id: String,
    metadata: BTreeMap<String, String>,
    init_pid: i32,
    /// Start time (clock ticks since boot) and boot id of the init: with
    /// the pid, the identity that survives pid reuse (0/empty: recorded by
    /// an older server).
    #[serde(default)]
    init_start: u64,
    #[serde(default)]
    boot_id: String,
    cgroups: Vec<PathBuf>,
    memory_mb: i64,
    /// Set in `bridge` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    net: Option<net::Attachment>,
    /// First host id of the sandbox's user namespace block (root servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id_base: Option<u32>,
    /// Hex secret the agent proves at every handshake (empty for
    /// sandboxes of older servers).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    token: String,
    /// The snapshot whose layer the sandbox's root stands on (children of
    /// `POST /sandboxes/{id}/snapshot` and `/fork`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
}

impl Meta {
    fn token(&self) -> Option<Vec<u8>> {
        hex::decode(&self.token).ok().filter(|t| !t.is_empty())
    }

    /// The sandbox init as a pid-reuse-proof identity, if it is still
    /// alive. Metadata of older servers has no start time: their init is
    /// recognised by being a `stacyvm-agent boot` process.
    fn init(&self) -> Option<Identity> {
        if self.init_start != 0 {
            let id = Identity {
                pid: self.init_pid,
                start_time: self.init_start,
                boot_id: self.boot_id.clone(),
            };
            return id.alive().then_some(id);
        }
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.init_pid)).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_agent_boot = args.first().is_some_and(|a| a.ends_with(b"stacyvm-agent"))
            && args.get(1) == Some(&&b"boot"[..]);
        is_agent_boot.then(|| Identity::of(self.init_pid)).flatten()
    }

    fn init_alive(&self) -> bool {
        self.init().is_some()
    }

    /// SIGKILLs the init if it is still the recorded process (its death
    /// ends the sandbox's pid namespace).
    #[cfg(test)]
    fn kill_init(&self) {
        if let Some(id) = self.init() {
            id.kill();
        }
    }
}

/// A provider dropped without `shutdown` (tests, a failed start) stops
/// its pool's refills: a boot still running then ends its own sandbox.
impl Drop for NativeProvider {
    fn drop(&mut self) {
        self.pool.stop_refills();
    }
}

pub use crate::agent::find_agent;

fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU (% of one CPU over a 100 ms window) and memory of a sandbox from
/// its cgroups; the memory limit falls back to the spawn's `memory_mb`.
/// Freezes or thaws a sandbox's cgroups (pause and resume of the native
/// and PRoot providers); `Unsupported` without a freezer cgroup.
pub(crate) async fn freeze_cgroups(cgroups: Vec<PathBuf>, frozen: bool) -> Result<()> {
    let done = tokio::task::spawn_blocking(move || cgroup::freeze(&cgroups, frozen))
        .await
        .map_err(|e| Error::internal(format!("freezer task: {e}")))?
        .map_err(|e| Error::internal(format!("the cgroup freezer failed: {e}")))?;
    if !done {
        return Err(Error::unsupported(
            "pausing: this sandbox has no freezer cgroup (a server without cgroups it may create)",
        ));
    }
    Ok(())
}

pub(crate) async fn cgroup_stats(cgroups: &[PathBuf], memory_mb: i64) -> Stats {
    let window = Duration::from_millis(100);
    let first = cgroup::usage(cgroups);
    tokio::time::sleep(window).await;
    let second = cgroup::usage(cgroups);
    let cpu_pct = match (first.cpu_ns, second.cpu_ns) {
        (Some(a), Some(b)) => (b.saturating_sub(a) as f64) / (window.as_nanos() as f64) * 100.0,
        _ => 0.0,
    };
    Stats {
        cpu_pct: (cpu_pct * 100.0).round() / 100.0,
        mem_bytes: second.memory_bytes.unwrap_or(0),
        mem_limit_bytes: second
            .memory_limit_bytes
            .unwrap_or((memory_mb.max(0) as u64) << 20),
    }
}

/// Removes a sandbox's state. Directories the sandbox (or overlayfs, whose
/// `work/work` is mode 000) left unreadable are opened up first: without
/// CAP_DAC_OVERRIDE (rootless mode) they could not be emptied otherwise.
pub(crate) fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let mut stack = vec![dir.to_path_buf()];
            while let Some(d) = stack.pop() {
                let _ = std::fs::set_permissions(
                    &d,
                    std::os::unix::fs::PermissionsExt::from_mode(0o700),
                );
                if let Ok(rd) = std::fs::read_dir(&d) {
                    for e in rd.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            stack.push(e.path());
                        }
                    }
                }
            }
            std::fs::remove_dir_all(dir)
        }
        r => r,
    }
}

/// An IPv4 and an IPv6 TCP socket made in the network namespace of
/// `pid`, by a thread of its own that enters it and ends (a thread that
/// changed namespace never runs anything else).
fn netns_sockets(pid: i32) -> Result<Vec<(tokio::net::TcpSocket, std::net::IpAddr)>> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|e| {
        Error::unavailable("the sandbox's network namespace is gone").with_source(e)
    })?;
    std::thread::Builder::new()
        .name("netns-socket".into())
        .spawn(move || -> Result<Vec<(tokio::net::TcpSocket, IpAddr)>> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                Error::internal(format!("entering the sandbox's network namespace: {e}"))
            })?;
            let mut out = Vec::new();
            let v4 = tokio::net::TcpSocket::new_v4()
                .map_err(|e| Error::internal("socket in the sandbox").with_source(e))?;
            out.push((v4, IpAddr::V4(Ipv4Addr::LOCALHOST)));
            if let Ok(v6) = tokio::net::TcpSocket::new_v6() {
                out.push((v6, IpAddr::V6(Ipv6Addr::LOCALHOST)));
            }
            Ok(out)
        })
        .map_err(|e| Error::unavailable("no thread for a sandbox connection").with_source(e))?
        .join()
        .map_err(|_| Error::internal("the namespace thread panicked"))?
}

/// Whether `pid` is a live process (zombies count as dead).
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start())
            .is_some_and(|r| !(r.starts_with('Z') || r.starts_with('X'))),
        Err(_) => false,
    }
}

impl NativeProvider {
    pub fn new(opts: NativeOptions) -> Result<Self> {
        // Only the server may enter the provider's state: sandboxes' upper
        // dirs, sockets and metadata are nobody else's business.
        for d in [opts.state_dir.clone(), opts.state_dir.join("sandboxes")] {
            std::fs::create_dir_all(&d)
                .map_err(|e| Error::internal(format!("creating {}", d.display())).with_source(e))?;
            private_dir(&d)?;
        }
        let images = images::ImageStore::new(opts.state_dir.join("images"), &opts.hidden)?;
        let rootless = !nix::unistd::geteuid().is_root();
        let mut cgroups = cgroup::detect();
        if rootless && !cgroups.as_ref().is_some_and(cgroup::writable) {
            warn!(
                "native provider in rootless mode (user namespaces) without a delegated cgroup: \
                 memory and cpu limits are not enforced; processes are bounded by RLIMIT_NPROC"
            );
            cgroups = None;
        }
        let images = Arc::new(images);
        let bridge = Arc::new(net::Bridge::new(opts.bridge.clone()));
        let ids = (!rootless && opts.user_namespace).then(|| {
            let a = ids::IdAllocator::new(opts.subordinate_ids);
            a.sweep();
            Arc::new(a)
        });
        if !rootless && !opts.user_namespace {
            warn!("providers.native.user_namespace is off: sandbox root is host root");
        }
        let booter = Arc::new(Booter {
            opts: opts.clone(),
            images: images.clone(),
            cgroups: cgroups.clone(),
            rootless,
            bridge: bridge.clone(),
            ids,
        });
        // Setting a claimed sandbox's hostname needs setns from the host,
        // which a rootless server cannot do: no pool there.
        let pool_size = if rootless { 0 } else { opts.warm_pool };
        let pool = Arc::new(pool::Pool::new(pool_size));
        pool::clear_leftovers(&opts.state_dir.join("sandboxes"));
        if !rootless {
            orphans::reap(&opts.state_dir.join("sandboxes"));
        }
        let snapshots = Arc::new(snapshot::Snapshots::new(snapshot::root(&opts.state_dir))?);
        snapshots.sweep(&snapshots_in_use(&opts.state_dir.join("sandboxes")));
        let p = NativeProvider {
            images,
            snapshots,
            rootless,
            cgroups,
            bridge,
            booter,
            pool,
            conns: Mutex::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
            _alive: Arc::new(()),
            opts,
        };
        disk::spawn(
            Arc::downgrade(&p._alive),
            p.opts.state_dir.join("sandboxes"),
            p.opts.disk,
        );
        p.pool.refill(&p.booter);
        Ok(p)
    }

    /// The spawn's network mode, or the provider's default.
    fn network_mode<'a>(&'a self, spec: &'a SpawnSpec) -> &'a str {
        match spec.network_mode.as_str() {
            "" => match self.opts.network_mode.as_str() {
                "" => "none",
                m => m,
            },
            m => m,
        }
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.opts.state_dir.join("sandboxes").join(id)
    }

    /// The image store (for `stacyvm image …`).
    pub fn images(&self) -> &images::ImageStore {
        &self.images
    }

    fn meta(&self, id: &str) -> Result<Meta> {
        if !paths::is_sandbox_id(id) {
            return Err(Error::sandbox_not_found(id));
        }
        let text = std::fs::read_to_string(self.dir(id).join("meta.json"))
            .map_err(|_| Error::sandbox_not_found(id))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::internal(format!("corrupt sandbox metadata of {id}: {e}")))
    }

    /// The cached connection to a sandbox's agent, if it is still open.
    fn open_client(&self, id: &str) -> Result<Option<Arc<AgentClient>>> {
        let conns = self.conns.lock().map_err(|_| Error::internal("lock"))?;
        Ok(conns.get(id).filter(|c| !c.is_closed()).cloned())
    }

    /// The live connection to a sandbox's agent (re-connecting after a
    /// restart); for a pool slot's runtime id, to the slot's agent.
    async fn client(&self, id: &str) -> Result<Arc<AgentClient>> {
        if let Some(c) = self.open_client(id)? {
            return Ok(c);
        }
        let lock = self
            .connecting
            .lock()
            .map_err(|_| Error::internal("lock"))?
            .entry(id.to_string())
            .or_default()
            .clone();
        let _g = lock.lock().await;
        // Another task may have connected while we waited.
        if let Some(c) = self.open_client(id)? {
            return Ok(c);
        }
        let (host, slot) = stacyvm_core::provider::split_slot_runtime_id(id).unwrap_or((id, ""));
        let meta = self.meta(host)?;
        if !pid_alive(meta.init_pid) {
            return Err(Error::sandbox_not_found(id));
        }
        let c = AgentClient::connect_slot(
            &self.dir(host).join("agent.sock"),
            meta.token().as_deref(),
            slot,
        )
        .await?;
        self.conns
            .lock()
            .map_err(|_| Error::internal("lock"))?
            .insert(id.to_string(), c.clone());
        Ok(c)
    }

    /// Serves a spawn from the warm pool when it asks for what the pool
    /// holds (image `host`, network `none`); refills the pool either way.
    async fn claim_warm(&self, spec: &SpawnSpec, memory_bytes: u64) -> Option<Spawned> {
        if self.pool.size() == 0 {
            return None;
        }
        let eligible = matches!(spec.image.as_str(), "" | "host") && spec.network_mode == "none";
        let warm = if eligible { self.pool.take() } else { None };
        self.pool.refill(&self.booter);
        let warm = warm?;
        let limits = self.booter.limits(spec, memory_bytes);
        match pool::claim(&self.booter, warm, spec, limits).await {
            Ok((meta, client)) => {
                if let Ok(mut conns) = self.conns.lock() {
                    conns.insert(spec.id.clone(), client);
                }
                info!(sandbox_id = %spec.id, init_pid = meta.init_pid, "native sandbox claimed from the warm pool");
                Some(Spawned {
                    runtime_id: spec.id.clone(),
                })
            }
            Err(e) => {
                warn!(error = %e, "claiming a warm sandbox failed; booting a new one");
                None
            }
        }
    }

    /// Kills everything of a sandbox and removes its state.
    async fn freeze(&self, id: &str, frozen: bool) -> Result<()> {
        if !paths::is_sandbox_id(id) {
            return Err(Error::sandbox_not_found(id));
        }
        freeze_cgroups(self.meta(id)?.cgroups.clone(), frozen).await
    }

    /// Drops the cached connection of a runtime id (a pool slot's, too).
    fn forget_client(&self, id: &str) {
        if let Ok(mut conns) = self.conns.lock() {
            conns.remove(id);
        }
    }

    async fn teardown(&self, id: &str, meta: Option<Meta>) {
        if let Ok(mut conns) = self.conns.lock() {
            // The sandbox's connection, and those of its pool slots.
            let slots = format!("{id}/");
            conns.retain(|k, _| k != id && !k.starts_with(&slots));
        }
        if let Ok(mut c) = self.connecting.lock() {
            c.remove(id);
        }
        let from_snapshot = meta.as_ref().is_some_and(|m| m.snapshot.is_some());
        teardown_state(self.dir(id), meta, self.bridge.clone()).await;
        if from_snapshot {
            // The last child of a deleted snapshot takes its layer along.
            let (snaps, sandboxes) = (
                self.snapshots.clone(),
                self.opts.state_dir.join("sandboxes"),
            );
            let _ = tokio::task::spawn_blocking(move || snaps.sweep(&snapshots_in_use(&sandboxes)))
                .await;
        }
    }
}

/// Boots sandboxes; shared with the warm pool's background tasks.
#[derive(Debug)]
struct Booter {
    opts: NativeOptions,
    images: Arc<images::ImageStore>,
    cgroups: Option<Layout>,
    rootless: bool,
    bridge: Arc<net::Bridge>,
    /// Id blocks of sandbox user namespaces (root server with
    /// `user_namespace`).
    ids: Option<Arc<ids::IdAllocator>>,
}

/// Undoes a boot's host-side setup unless disarmed (see `Booter::boot`).
struct Unwind {
    lease: Option<(Arc<ids::IdAllocator>, u32)>,
    cgroups: Option<Vec<PathBuf>>,
    armed: bool,
}

impl Drop for Unwind {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some((ids, base)) = self.lease.take() {
            ids.release(base);
        }
        if let Some(dirs) = self.cgroups.take() {
            // Waiting for the cgroups to empty blocks: not on this thread.
            let _ = std::thread::Builder::new()
                .name("stacyvm-boot-unwind".into())
                .spawn(move || cgroup::destroy(&dirs));
        }
    }
}

/// Makes `dir` accessible to its owner only.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::internal(format!("restricting {}", dir.display())).with_source(e))
}

/// Creates `dir` (and its parents) and makes it accessible to its owner
/// only: the state dir of a sandbox of any provider.
/// Replaces a small state file's contents without truncating it to zero
/// first: on ext4 a truncating rewrite frees and journals the old blocks
/// (about 0.3 ms on the claim path), an overwrite in place costs
/// microseconds. The new bytes are padded with spaces to the old length and
/// written in one call, so a process killed at any point leaves the old or
/// the new document (JSON and the trimmed readers allow trailing spaces);
/// only then is the padding cut.
pub(crate) fn rewrite_in_place(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let old = f.metadata()?.len() as usize;
    let mut buf = bytes.to_vec();
    if buf.len() < old {
        buf.resize(old, b' ');
    }
    f.write_all_at(&buf, 0)?;
    if bytes.len() < old {
        f.set_len(bytes.len() as u64)?;
    }
    Ok(())
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::internal(format!("creating {}", dir.display())).with_source(e))?;
    private_dir(dir)
}

/// How long `stacyvm-agent boot` may take.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

impl Booter {
    /// The cgroup limits of a spawn.
    pub(crate) fn limits(&self, spec: &SpawnSpec, memory_bytes: u64) -> Limits {
        Limits {
            memory_bytes,
            pids: self.opts.pids_limit,
            cpu_quota_us: (spec.vcpus.max(1) as u64) * 100_000,
        }
    }

    /// Creates a sandbox's state dir (0700; owned by the sandbox's root
    /// when it has a user namespace) and leases its id block.
    fn prepare_dir(&self, dir: &Path) -> Result<Option<u32>> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::internal("creating sandbox dir").with_source(e))?;
        private_dir(dir)?;
        let Some(ids) = &self.ids else {
            return Ok(None);
        };
        let base = ids.allocate(dir)?;
        if let Err(e) = std::os::unix::fs::chown(dir, Some(base), Some(base)) {
            ids.release(base);
            return Err(Error::internal("handing the sandbox dir to its ids").with_source(e));
        }
        Ok(Some(base))
    }

    async fn boot(&self, spec: &SpawnSpec, memory_bytes: u64, dir: &Path) -> Result<Meta> {
        let id_base = self.prepare_dir(dir)?;
        // If this future is dropped mid-boot (a cancelled request, a server
        // shutting down), the uncommitted init dies with its boot process;
        // the guard returns its id lease and cgroups.
        let mut unwind = Unwind {
            lease: self.ids.clone().zip(id_base),
            cgroups: self.cgroups.as_ref().map(|l| cgroup::paths(l, &spec.id)),
            armed: true,
        };
        let res = self.boot_prepared(spec, memory_bytes, dir, id_base).await;
        if res.is_ok() {
            unwind.armed = false;
        }
        res
    }

    async fn boot_prepared(
        &self,
        spec: &SpawnSpec,
        memory_bytes: u64,
        dir: &Path,
        id_base: Option<u32>,
    ) -> Result<Meta> {
        let (mut lower, mut binds, masks) = self.images.layers(&spec.image)?;
        if let Some(snap) = &spec.snapshot {
            lower.insert(0, snapshot::layer_path(&self.opts.state_dir, snap));
        }
        // Volumes: their file systems, idmapped like the image (uid 0 on
        // the volume is the sandbox's root).
        for v in &spec.volumes {
            binds.push(stacyvm_agent_proto::boot::BindSpec {
                source: v.host_path.to_string_lossy().to_string(),
                target: v.target.clone(),
                readonly: v.read_only,
                confined: true,
            });
        }
        let cgroups = match &self.cgroups {
            Some(layout) => cgroup::create(layout, &spec.id, self.limits(spec, memory_bytes))
                .map_err(|e| Error::internal(format!("creating cgroups: {e}")))?,
            None => Vec::new(),
        };
        let pool_host = spec
            .metadata
            .contains_key(stacyvm_core::provider::POOL_HOST_METADATA);
        if pool_host && id_base.is_none() {
            return Err(Error::unsupported(
                "a native pool host needs a user namespace with a range of ids for its slots' users: run the server as root (providers.native.subordinate_ids)",
            ));
        }
        let token = hex::encode(rand::random::<[u8; 32]>());
        let boot = BootSpec {
            pool_host,
            token: token.clone(),
            id: spec.id.clone(),
            hostname: spec.id.clone(),
            root: RootSpec {
                lower,
                upper: dir.join("upper").to_string_lossy().to_string(),
                work: dir.join("work").to_string_lossy().to_string(),
                merged: dir.join("merged").to_string_lossy().to_string(),
            },
            binds,
            masks,
            socket: dir.join("agent.sock").to_string_lossy().to_string(),
            console_log: dir.join("console.log").to_string_lossy().to_string(),
            cgroups: cgroups
                .iter()
                .map(|p| p.to_string_lossy().to_string())
                .collect(),
            network: if spec.network_mode.is_empty() {
                "none".into()
            } else {
                spec.network_mode.clone()
            },
            tmp_size_mb: (memory_bytes / (2 * 1024 * 1024)).max(16),
            seccomp: true,
            userns: match id_base {
                Some(base) => Some(IdMap {
                    uid: base,
                    gid: base,
                    count: ids::PER_SANDBOX,
                }),
                None => self.rootless.then(|| IdMap {
                    uid: nix::unistd::getuid().as_raw(),
                    gid: nix::unistd::getgid().as_raw(),
                    count: 1,
                }),
            },
            nproc_limit: if self.rootless && cgroups.is_empty() {
                self.opts.pids_limit
            } else {
                0
            },
            landlock_write: if self.opts.landlock {
                LANDLOCK_WRITABLE
                    .iter()
                    .map(|p| (*p).to_string())
                    .chain(
                        spec.volumes
                            .iter()
                            .filter(|v| !v.read_only)
                            .map(|v| v.target.clone()),
                    )
                    .collect()
            } else {
                Vec::new()
            },
        };
        let boot_path = dir.join("boot.json");
        std::fs::write(
            &boot_path,
            serde_json::to_vec_pretty(&boot).unwrap_or_default(),
        )
        .map_err(|e| Error::internal("writing boot spec").with_source(e))?;
        // The boot process reports the init's pid on stdout and commits the
        // init (drops its parent-death signal) only when told so on stdin,
        // which happens once the sandbox is recorded in `meta.json`: an init
        // nobody can find never outlives its boot. A timeout or a dropped
        // future kills the boot process (kill_on_drop), and an uncommitted
        // init with it.
        let fail = |cgroups: &Vec<PathBuf>, e: Error| {
            let cg = cgroups.clone();
            std::thread::spawn(move || cgroup::destroy(&cg));
            e
        };
        let mut child = match tokio::process::Command::new(&self.opts.agent_path)
            .arg("boot")
            .arg("--spec")
            .arg(&boot_path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                return Err(fail(
                    &cgroups,
                    Error::unavailable(format!("starting {}", self.opts.agent_path.display()))
                        .with_source(e),
                ))
            }
        };
        let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT;
        let timed_out = || {
            Error::internal(format!(
                "sandbox boot timed out after {}s",
                BOOT_TIMEOUT.as_secs()
            ))
        };
        let mut stdout = child.stdout.take().map(tokio::io::BufReader::new);
        let mut stderr = child.stderr.take();
        let mut line = String::new();
        let reported = match stdout.as_mut() {
            Some(out) => {
                use tokio::io::AsyncBufReadExt;
                tokio::time::timeout_at(deadline, out.read_line(&mut line)).await
            }
            None => Ok(Ok(0)),
        };
        let init_pid: Option<i32> = match reported {
            Err(_) => return Err(fail(&cgroups, timed_out())),
            Ok(_) => line.trim().parse().ok(),
        };
        let Some(init_pid) = init_pid else {
            // Setup failed: the boot process exits with its reason on stderr.
            let mut msg = String::new();
            if let Some(err) = stderr.as_mut() {
                use tokio::io::AsyncReadExt;
                let _ = tokio::time::timeout_at(deadline, err.read_to_string(&mut msg)).await;
            }
            let _ = child.kill().await;
            let msg = msg.trim();
            return Err(fail(
                &cgroups,
                if msg.is_empty() {
                    Error::internal("sandbox boot did not report the init pid")
                } else if msg.contains("in the sandbox's root") {
                    // A volume path the image (or snapshot) redirects.
                    Error::invalid(format!("volume path refused: {msg}"))
                } else {
                    Error::internal(format!("sandbox setup failed: {msg}"))
                },
            ));
        };
        let Some(init) = Identity::of(init_pid) else {
            let _ = child.kill().await;
            return Err(fail(
                &cgroups,
                Error::internal("the sandbox init exited right after boot"),
            ));
        };
        let meta = Meta {
            id: spec.id.clone(),
            image: spec.image.clone(),
            created_at: Utc::now(),
            expires_at: spec.expires_at,
            owner_id: spec.owner_id.clone(),
            tenant_id: spec.tenant_id.clone(),
            metadata: spec.metadata.clone(),
            init_pid,
            init_start: init.start_time,
            boot_id: init.boot_id,
            cgroups: cgroups.clone(),
            memory_mb: spec.memory_mb,
            net: None,
            id_base,
            token,
            snapshot: spec.snapshot.clone(),
        };
        if let Err(e) = std::fs::write(
            dir.join("meta.json"),
            serde_json::to_vec(&meta).unwrap_or_default(),
        ) {
            let _ = child.kill().await;
            return Err(fail(
                &cgroups,
                Error::internal("recording the sandbox").with_source(e),
            ));
        }
        let committed = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stdin = child
                .stdin
                .take()
                .ok_or_else(|| Error::internal("boot process has no stdin"))?;
            stdin
                .write_all(b"commit\n")
                .await
                .map_err(|e| Error::internal("committing the sandbox init").with_source(e))?;
            drop(stdin);
            let mut msg = String::new();
            if let Some(err) = stderr.as_mut() {
                let _ = err.read_to_string(&mut msg).await;
            }
            let status = child
                .wait()
                .await
                .map_err(|e| Error::internal("waiting for the boot process").with_source(e))?;
            if status.success() {
                Ok(())
            } else {
                Err(Error::internal(format!(
                    "committing the sandbox init failed: {}",
                    msg.trim()
                )))
            }
        };
        match tokio::time::timeout_at(deadline, committed).await {
            Ok(Ok(())) => Ok(meta),
            failed => {
                // Not committed: the init dies with its boot process.
                let _ = child.kill().await;
                let _ = std::fs::remove_file(dir.join("meta.json"));
                Err(fail(
                    &cgroups,
                    match failed {
                        Ok(Err(e)) => e,
                        _ => timed_out(),
                    },
                ))
            }
        }
    }
}

/// Snapshot ids the sandboxes under `sandboxes` (alive or not yet torn
/// down) stand on.
fn snapshots_in_use(sandboxes: &Path) -> std::collections::HashSet<String> {
    let mut used = std::collections::HashSet::new();
    if let Ok(rd) = std::fs::read_dir(sandboxes) {
        for e in rd.flatten() {
            let meta: Option<Meta> = std::fs::read(e.path().join("meta.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(s) = meta.and_then(|m| m.snapshot) {
                used.insert(s);
            }
        }
    }
    used
}

/// Kills a sandbox's processes (SIGKILL of its PID 1 ends the whole pid
/// namespace), then removes its cgroups, veth, address lease and state dir.
async fn teardown_state(dir: PathBuf, meta: Option<Meta>, bridge: Arc<net::Bridge>) {
    let cgroups = meta.as_ref().map(|m| m.cgroups.clone()).unwrap_or_default();
    let init = meta.as_ref().and_then(Meta::init);
    if let Some(i) = &init {
        i.kill();
    }
    let att = meta.as_ref().and_then(|m| m.net.clone());
    let id_base = meta.as_ref().and_then(|m| m.id_base);
    let _ = tokio::task::spawn_blocking(move || {
        // A paused sandbox's init dies only once thawed.
        if cgroup::is_frozen(&cgroups) {
            let _ = cgroup::freeze(&cgroups, false);
        }
        for _ in 0..10_000 {
            if !init.as_ref().is_some_and(Identity::alive) {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        cgroup::destroy(&cgroups);
        if let Some(att) = att {
            bridge.detach(&att);
        }
        if let Err(e) = remove_tree(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %dir.display(), error = %e, "removing sandbox state failed");
            }
        }
        if let Some(base) = id_base {
            ids::release_lease(base);
        }
    })
    .await;
}

#[async_trait]
impl Provider for NativeProvider {
    fn name(&self) -> &str {
        "native"
    }

    /// Every sandbox this provider runs was recorded by the server before
    /// the spawn was acknowledged: one the store does not know was never
    /// handed to anyone and is destroyed, not adopted.
    fn adopts_unknown_runtimes(&self) -> bool {
        false
    }

    async fn shutdown(&self) {
        self.pool.close(&self.booter, Duration::from_secs(30)).await;
    }

    fn capabilities(&self) -> Vec<String> {
        let mut c: Vec<String> = capability::BASE.iter().map(|s| (*s).to_string()).collect();
        c.push(capability::RUNTIME_INVENTORY.into());
        if self.cgroups.is_some() {
            c.push(capability::STATS.into());
            c.push(capability::PAUSE.into());
        }
        c.push(capability::EXEC_INTERACTIVE.into());
        c.push(capability::PTY.into());
        c.push(capability::WATCH.into());
        // A rootless sandbox maps one uid: there is no other to become
        // (and has no bridge to filter).
        if !self.rootless {
            c.push(capability::POOL_HOST.into());
            c.push(capability::EXEC_USER.into());
            c.push(capability::EGRESS.into());
            // Copying an upper dir recreates overlay whiteouts (device
            // nodes), which takes a root server.
            c.push(capability::SANDBOX_SNAPSHOTS.into());
            c.push(capability::VOLUMES.into());
            // Built images are upper dirs copied like snapshots.
            c.push(capability::IMAGE_BUILD.into());
            c.push(capability::IMAGE_PUSH.into());
        }
        c.push("namespaces".into());
        c
    }

    async fn set_egress(
        &self,
        runtime_id: &str,
        rules: Option<&stacyvm_core::egress::EgressRules>,
    ) -> Result<()> {
        if !paths::is_sandbox_id(runtime_id) {
            return Err(Error::sandbox_not_found(runtime_id));
        }
        let meta = self.meta(runtime_id)?;
        self.bridge.set_egress_of(meta.net.as_ref(), rules).await
    }

    async fn egress_denials(&self, runtime_id: &str) -> Result<Vec<stacyvm_api::EgressDenial>> {
        if !paths::is_sandbox_id(runtime_id) {
            return Err(Error::sandbox_not_found(runtime_id));
        }
        let meta = self.meta(runtime_id)?;
        Ok(self.bridge.egress_denials_of(meta.net.as_ref()).await)
    }

    /// The sandbox's files: its upper dir copied while it is frozen (a
    /// paused sandbox stays paused), ids shifted to the sandbox's own.
    async fn snapshot_sandbox(
        &self,
        id: &str,
        snapshot_id: &str,
    ) -> Result<stacyvm_core::provider::SandboxSnapshot> {
        if self.rootless {
            return Err(Error::unsupported(
                "a rootless native provider has no snapshots",
            ));
        }
        let meta = self.meta(id)?;
        if !meta.init_alive() {
            return Err(Error::sandbox_not_found(id));
        }
        let was_frozen = cgroup::is_frozen(&meta.cgroups);
        if !was_frozen {
            freeze_cgroups(meta.cgroups.clone(), true).await?;
        }
        let network_mode = if meta.net.is_some() { "bridge" } else { "none" };
        let mut info = snapshot::Info {
            id: snapshot_id.to_string(),
            source: id.to_string(),
            image: meta.image.clone(),
            network_mode: network_mode.to_string(),
            created_at: Utc::now(),
            size_bytes: 0,
        };
        let (snaps, upper) = (self.snapshots.clone(), self.dir(id).join("upper"));
        let shift = meta.id_base.map(|base| snapshot::Shift {
            base,
            count: ids::PER_SANDBOX,
        });
        let min_free = self.opts.disk.min_free;
        let taken = tokio::task::spawn_blocking(move || {
            snaps
                .take(&upper, &mut info, shift, min_free)
                .map(|()| info)
        })
        .await
        .unwrap_or_else(|e| Err(Error::internal(format!("snapshot task: {e}"))));
        if !was_frozen {
            if let Err(e) = freeze_cgroups(meta.cgroups.clone(), false).await {
                warn!(sandbox_id = %id, error = %e, "thawing the sandbox after its snapshot failed");
            }
        }
        let info = match taken {
            Ok(i) => i,
            // Destroyed while it was copied.
            Err(_) if !self.dir(id).join("meta.json").exists() => {
                return Err(Error::sandbox_not_found(id))
            }
            Err(e) => return Err(e),
        };
        info!(sandbox_id = %id, snapshot = %snapshot_id, bytes = info.size_bytes, "native sandbox snapshot taken");
        Ok(stacyvm_core::provider::SandboxSnapshot {
            size_bytes: info.size_bytes,
            network_mode: info.network_mode,
        })
    }

    async fn cached_image(
        &self,
        plan: &stacyvm_core::provider::ImageBuild,
    ) -> Result<Option<stacyvm_core::provider::BuiltImage>> {
        let base = build::base_of(&self.images, &plan.base_image)?;
        Ok(
            build::reuse(&self.images, &base, &plan.cache_key, &plan.name)?.map(|rec| {
                stacyvm_core::provider::BuiltImage {
                    image_ref: rec.names.first().cloned().unwrap_or_default(),
                    digest: rec.id,
                    size_bytes: rec.size_bytes,
                    reused: true,
                }
            }),
        )
    }

    async fn push_image(
        &self,
        image_ref: &str,
        target: &str,
        auth: &stacyvm_core::provider::RegistryAuth,
        log: stacyvm_core::provider::BuildLog,
    ) -> Result<String> {
        crate::image::push::push(&self.images, image_ref, target, auth, log).await
    }

    async fn commit_image(
        &self,
        id: &str,
        plan: &stacyvm_core::provider::ImageBuild,
    ) -> Result<stacyvm_core::provider::BuiltImage> {
        if self.rootless {
            return Err(Error::unsupported(
                "a rootless native provider cannot build images",
            ));
        }
        let meta = self.meta(id)?;
        if !meta.init_alive() {
            return Err(Error::sandbox_not_found(id));
        }
        let base = build::base_of(&self.images, &meta.image)?;
        // The build is over: the sandbox stays frozen until it is removed.
        freeze_cgroups(meta.cgroups.clone(), true).await?;
        let images = self.images.clone();
        let upper = self.dir(id).join("upper");
        let shift = meta.id_base.map(|base| snapshot::Shift {
            base,
            count: ids::PER_SANDBOX,
        });
        let (key, name, build_id) = (
            plan.cache_key.clone(),
            plan.name.clone(),
            plan.build_id.clone(),
        );
        let min_free = self.opts.disk.min_free;
        let rec = tokio::task::spawn_blocking(move || {
            build::commit(
                &images,
                &build::Commit {
                    upper: &upper,
                    shift,
                    base: &base,
                    build_key: &key,
                    name: &name,
                    build_id: &build_id,
                    min_free,
                },
            )
        })
        .await
        .unwrap_or_else(|e| Err(Error::internal(format!("image commit task: {e}"))))?;
        info!(sandbox_id = %id, image = %rec.id, bytes = rec.size_bytes, "native build committed");
        Ok(stacyvm_core::provider::BuiltImage {
            image_ref: rec.names.first().cloned().unwrap_or_default(),
            digest: rec.id,
            size_bytes: rec.size_bytes,
            reused: false,
        })
    }

    /// Children keep running: their layer goes with the last of them.
    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        let (snaps, sandboxes) = (
            self.snapshots.clone(),
            self.opts.state_dir.join("sandboxes"),
        );
        let id = snapshot_id.to_string();
        tokio::task::spawn_blocking(move || snaps.delete(&id, &snapshots_in_use(&sandboxes)))
            .await
            .unwrap_or_else(|e| Err(Error::internal(format!("snapshot removal task: {e}"))))
    }

    fn profile(&self) -> Profile {
        // (Rootless mode refuses bridge at spawn, saying why: no veth
        // without root.)
        Profile {
            isolation: Isolation::Container,
            network_modes: vec!["none".into(), "bridge".into()],
            default_network: match self.opts.network_mode.as_str() {
                "" => "none".into(),
                m => m.into(),
            },
        }
    }

    fn describe(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("type".to_string(), "native".to_string()),
            (
                "agent_path".to_string(),
                self.opts.agent_path.display().to_string(),
            ),
            (
                "state_dir".to_string(),
                self.opts.state_dir.display().to_string(),
            ),
            (
                "cgroups".to_string(),
                match &self.cgroups {
                    Some(Layout::V2(_)) => "v2".into(),
                    Some(Layout::V1(_)) => "v1".into(),
                    None => "none".into(),
                },
            ),
            ("images".to_string(), self.images.names().join(",")),
            (
                "mode".to_string(),
                if self.rootless {
                    "rootless (user namespace)".into()
                } else if self.booter.ids.is_some() {
                    "root (a user namespace per sandbox)".into()
                } else {
                    "root (no user namespace)".into()
                },
            ),
        ])
    }

    async fn health(&self) -> Result<()> {
        if !self.opts.agent_path.is_file() {
            return Err(Error::unavailable(format!(
                "agent binary {} not found; build it or set providers.native.agent_path",
                self.opts.agent_path.display()
            )));
        }
        let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !fs.contains("overlay") {
            return Err(Error::unavailable(
                "the kernel has no overlayfs (modprobe overlay)",
            ));
        }
        if self.rootless {
            let max =
                std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
            if max.trim() == "0" {
                return Err(Error::unavailable(
                    "rootless mode needs user namespaces: sysctl user.max_user_namespaces is 0 (or run the server as root)",
                ));
            }
        } else if self.cgroups.is_none() {
            return Err(Error::unavailable(
                "no usable cgroup hierarchy under /sys/fs/cgroup",
            ));
        }
        Ok(())
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned> {
        let host = host_memory_bytes();
        let memory_bytes = (spec.memory_mb.max(0) as u64) * 1024 * 1024;
        if memory_bytes < 16 * 1024 * 1024 {
            return Err(Error::invalid(format!(
                "memory_mb {} is below the minimum of 16",
                spec.memory_mb
            )));
        }
        if host > 0 && memory_bytes > host {
            return Err(Error::invalid(format!(
                "memory_mb {} exceeds host memory ({} MiB)",
                spec.memory_mb,
                host / 1024 / 1024
            )));
        }
        if spec.vcpus < 1 || spec.vcpus > 256 {
            return Err(Error::invalid(format!(
                "vcpus {} must be between 1 and 256",
                spec.vcpus
            )));
        }
        match self.network_mode(spec) {
            "bridge" if self.rootless => {
                return Err(Error::invalid(
                    "network_mode bridge needs a server running as root (rootless mode has loopback only)",
                ))
            }
            "none" | "bridge" => {}
            other => {
                return Err(Error::invalid(format!(
                    "unsupported network_mode {other:?} for the native provider (allowed: none, bridge)"
                )))
            }
        }
        self.images.check(&spec.image)?;
        let mut resolved = spec.clone();
        resolved.network_mode = self.network_mode(spec).to_string();
        let spec = &resolved;
        let dir = self.dir(&spec.id);
        let booted = match &spec.snapshot {
            // A child of a snapshot: its layer stays while the child boots
            // (until its meta.json names it), whatever a delete does.
            Some(snap) => {
                if self.rootless {
                    return Err(Error::unsupported(
                        "a rootless native provider has no snapshots",
                    ));
                }
                self.snapshots.claim(&spec.id, snap)?;
                let booted = self.booter.boot(spec, memory_bytes, &dir).await;
                self.snapshots.settle(&spec.id);
                booted
            }
            None => {
                let pool_host = spec
                    .metadata
                    .contains_key(stacyvm_core::provider::POOL_HOST_METADATA);
                if !pool_host {
                    if let Some(spawned) = self.claim_warm(spec, memory_bytes).await {
                        return Ok(spawned);
                    }
                }
                self.booter.boot(spec, memory_bytes, &dir).await
            }
        };
        let mut meta = match booted {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        if self.network_mode(spec) == "bridge" {
            let (bridge, id) = (self.bridge.clone(), spec.id.clone());
            let reserved = tokio::task::spawn_blocking(move || bridge.reserve(&id))
                .await
                .unwrap_or_else(|e| Err(Error::internal(format!("bridge setup task: {e}"))));
            let att = match reserved {
                Ok(att) => att,
                Err(e) => {
                    self.teardown(&spec.id, Some(meta)).await;
                    return Err(e.context("connecting the sandbox to the bridge"));
                }
            };
            meta.net = Some(att.clone());
            // The egress rules go in while the veth is made (each costs a
            // kernel commit): both are done before the spawn returns, so
            // no command of the caller runs without them.
            let (bridge, pid, a) = (self.bridge.clone(), meta.init_pid, att.clone());
            let (wired, ruled) = tokio::join!(
                tokio::task::spawn_blocking(move || bridge.connect(&a, pid)),
                async {
                    match &spec.egress {
                        Some(rules) => self.bridge.set_egress(&att, Some(rules)).await,
                        None => Ok(()),
                    }
                }
            );
            let wired =
                wired.unwrap_or_else(|e| Err(Error::internal(format!("bridge setup task: {e}"))));
            if let Err(e) = wired
                .map_err(|e| e.context("connecting the sandbox to the bridge"))
                .and(ruled)
            {
                self.teardown(&spec.id, Some(meta)).await;
                return Err(e);
            }
        }
        let write_meta = std::fs::write(
            dir.join("meta.json"),
            serde_json::to_vec(&meta).unwrap_or_default(),
        );
        let connected = match write_meta {
            Ok(()) => AgentClient::connect(&dir.join("agent.sock"), meta.token().as_deref()).await,
            Err(e) => Err(Error::internal("writing sandbox metadata").with_source(e)),
        };
        match connected {
            Ok(c) => {
                self.conns
                    .lock()
                    .map_err(|_| Error::internal("lock"))?
                    .insert(spec.id.clone(), c);
                info!(sandbox_id = %spec.id, init_pid = meta.init_pid, "native sandbox booted");
                Ok(Spawned {
                    runtime_id: spec.id.clone(),
                })
            }
            Err(e) => {
                self.teardown(&spec.id, Some(meta)).await;
                Err(e)
            }
        }
    }

    async fn io(&self, id: &str) -> Result<Arc<dyn SandboxIo>> {
        Ok(Arc::new(AgentSession::new(id, self.client(id).await?)))
    }

    async fn slot_open(
        &self,
        host: &str,
        slot: &str,
        spec: &stacyvm_core::provider::SlotSpec,
    ) -> Result<()> {
        crate::agent::slot_open(&*self.client(host).await?, slot, spec).await
    }

    async fn slot_close(&self, host: &str, slot: &str) -> Result<()> {
        let c = match self.client(host).await {
            Ok(c) => c,
            // The host is gone, and its slots with it.
            Err(e) if e.kind() == ErrorKind::SandboxNotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        self.forget_client(&stacyvm_core::provider::slot_runtime_id(host, slot));
        crate::agent::slot_close(&c, slot).await
    }

    async fn slots(&self, host: &str) -> Result<Vec<String>> {
        crate::agent::slot_list(&*self.client(host).await?).await
    }

    /// The cgroup freezer: every process of the sandbox, the agent too,
    /// stops where it stands.
    async fn pause(&self, id: &str) -> Result<()> {
        self.freeze(id, true).await
    }

    async fn resume(&self, id: &str) -> Result<()> {
        self.freeze(id, false).await
    }

    async fn status(&self, id: &str) -> Result<RuntimeStatus> {
        // A frozen agent cannot answer a ping: ask the freezer first.
        if let Ok(meta) = self.meta(id) {
            if meta.init().is_some_and(|i| i.alive()) && cgroup::is_frozen(&meta.cgroups) {
                return Ok(RuntimeStatus {
                    state: "paused".into(),
                });
            }
        }
        let c = self.client(id).await.map_err(|e| {
            if e.kind() == ErrorKind::SandboxNotFound {
                e
            } else {
                Error::sandbox_not_found(id)
            }
        })?;
        match tokio::time::timeout(Duration::from_secs(5), c.ping()).await {
            Ok(Ok(())) => Ok(RuntimeStatus {
                state: "running".into(),
            }),
            _ => Ok(RuntimeStatus {
                state: "unhealthy".into(),
            }),
        }
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        if !paths::is_sandbox_id(id) {
            return Ok(());
        }
        let meta = self.meta(id).ok();
        if meta.is_none() && !self.dir(id).exists() {
            return Ok(());
        }
        self.teardown(id, meta).await;
        Ok(())
    }

    /// CPU (% of one CPU over a 100 ms window) and memory from the
    /// sandbox's cgroups; the memory limit falls back to the spawn's.
    async fn local_images(&self) -> Vec<String> {
        self.images().names()
    }

    /// Straight into the sandbox's network namespace: a socket made
    /// there by a short-lived thread, connected to the sandbox's loopback
    /// from here. No agent hop, the kernel moves the bytes.
    async fn connect(&self, id: &str, port: u16) -> Result<stacyvm_core::provider::PortStream> {
        if stacyvm_core::provider::split_slot_runtime_id(id).is_some() {
            // A pool slot's network may be its own: its agent connects.
            return self.io(id).await?.connect(port).await;
        }
        let meta = self.meta(id)?;
        let Some(init) = meta.init() else {
            return Err(Error::sandbox_not_found(id));
        };
        let sockets = match netns_sockets(init.pid) {
            Ok(s) => s,
            // A server without the right to enter it goes through the agent.
            Err(e) => {
                tracing::debug!(sandbox_id = id, error = %e, "netns connect failed; using the agent");
                return self.io(id).await?.connect(port).await;
            }
        };
        // The namespace was the init's when the file was opened.
        if !init.alive() {
            return Err(Error::sandbox_not_found(id));
        }
        let mut last = None;
        for (sock, ip) in sockets {
            let addr = std::net::SocketAddr::new(ip, port);
            match tokio::time::timeout(Duration::from_secs(5), sock.connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(Box::new(s));
                }
                Ok(Err(e)) => last = Some(e.to_string()),
                Err(_) => last = Some("timed out".into()),
            }
        }
        Err(Error::not_found(format!(
            "nothing accepts connections on port {port} in sandbox {id} ({})",
            last.unwrap_or_default()
        )))
    }

    async fn stats(&self, id: &str) -> Result<Stats> {
        let meta = self.meta(id)?;
        if !meta.init_alive() {
            return Err(Error::sandbox_not_found(id));
        }
        if meta.cgroups.is_empty() {
            return Err(Error::unsupported(
                "native: stats need cgroups (this server runs rootless without a delegated cgroup)",
            ));
        }
        Ok(cgroup_stats(&meta.cgroups, meta.memory_mb).await)
    }

    async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>> {
        self.meta(id)?;
        let text = tokio::fs::read_to_string(self.dir(id).join("console.log"))
            .await
            .unwrap_or_default();
        let all: Vec<String> = text
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect();
        let skip = all.len().saturating_sub(lines);
        Ok(all.into_iter().skip(skip).collect())
    }

    async fn list_runtimes(&self) -> Result<Vec<RuntimeInfo>> {
        let base = self.opts.state_dir.join("sandboxes");
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&base) else {
            return Ok(out);
        };
        for entry in rd.flatten() {
            let id = entry.file_name().to_string_lossy().to_string();
            if id.starts_with(pool::PREFIX) {
                continue;
            }
            let Ok(meta) = self.meta(&id) else { continue };
            let state = if meta.init_alive() {
                "running"
            } else {
                "destroyed"
            };
            out.push(RuntimeInfo {
                sandbox_id: id,
                state: state.into(),
                image: meta.image,
                created_at: Some(meta.created_at),
                metadata: meta.metadata,
                owner_id: meta.owner_id,
                tenant_id: meta.tenant_id,
                expires_at: Some(meta.expires_at),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub struct Fixture {
        dir: tempfile::TempDir,
        pool: usize,
        landlock: bool,
        pub disk: disk::DiskCaps,
    }

    pub fn fixture() -> Fixture {
        assert!(
            nix::unistd::geteuid().is_root(),
            "native provider tests need root (CI runs as root)"
        );
        Fixture {
            dir: tempfile::tempdir().expect("tmp"),
            pool: 0,
            landlock: false,
            disk: disk::DiskCaps::default(),
        }
    }

    /// A provider as an unprivileged server runs it (rootless mode: one
    /// mapped id, no warm pool, no cgroup limits without delegation). As
    /// root this is [`fixture`]: the cases run rootless when
    /// `native_conformance_passes_rootless` re-runs them as nobody.
    pub fn rootless_fixture() -> Fixture {
        if nix::unistd::geteuid().is_root() {
            return fixture();
        }
        Fixture {
            dir: tempfile::tempdir().expect("tmp"),
            pool: 0,
            landlock: false,
            disk: disk::DiskCaps::default(),
        }
    }

    /// A provider whose sandboxes run under landlock.
    pub fn landlock_fixture() -> Fixture {
        let mut fx = fixture();
        fx.landlock = true;
        fx
    }

    /// A provider with a warm pool of `size`.
    pub fn pooled_fixture(size: usize) -> Fixture {
        let mut fx = fixture();
        fx.pool = size;
        fx
    }

    impl Fixture {
        pub fn state_dir(&self) -> std::path::PathBuf {
            self.dir.path().join("native")
        }

        pub fn make(&self) -> NativeProvider {
            self.make_with_pool(self.pool)
        }

        pub fn make_with_pool(&self, pool: usize) -> NativeProvider {
            let agent = find_agent("").expect("stacyvm-agent binary not found next to the test binary: run `cargo build --bins` first");
            NativeProvider::new(NativeOptions {
                state_dir: self.dir.path().join("native"),
                agent_path: agent,
                pids_limit: 512,
                hidden: vec![],
                network_mode: "none".into(),
                bridge: net::BridgeOptions::default(),
                warm_pool: pool,
                pool_memory_mb: 256,
                landlock: self.landlock,
                user_namespace: true,
                subordinate_ids: ids::IdRange::parse(ids::DEFAULT_RANGE).expect("range"),
                disk: self.disk,
            })
            .expect("native")
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            // Kill whatever a failed test left running (synchronously: we
            // may be inside the test's runtime).
            let base = self.dir.path().join("native/sandboxes");
            let Ok(rd) = std::fs::read_dir(&base) else {
                return;
            };
            for e in rd.flatten() {
                let Ok(text) = std::fs::read_to_string(e.path().join("meta.json")) else {
                    continue;
                };
                let Ok(meta) = serde_json::from_str::<Meta>(&text) else {
                    continue;
                };
                let init = meta.init();
                meta.kill_init();
                for _ in 0..500 {
                    if !init.as_ref().is_some_and(Identity::alive) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                cgroup::destroy(&meta.cgroups);
                if let Some(base) = meta.id_base {
                    ids::release_lease(base);
                }
            }
        }
    }

    impl crate::conformance::Fixture for Fixture {
        fn provider(&self) -> Arc<dyn Provider> {
            Arc::new(self.make())
        }
        /// The freezer needs the cgroups a root server makes.
        fn supports_pause(&self) -> bool {
            nix::unistd::geteuid().is_root()
        }
        fn image(&self) -> String {
            "host".into()
        }
        fn survives_restart(&self) -> bool {
            true
        }
        fn supports_users(&self) -> bool {
            self.make()
                .capabilities()
                .iter()
                .any(|c| c == capability::EXEC_USER)
        }
    }

    crate::conformance_tests!(native_conformance, fixture());
    // Every spawn of the suite that can be served from the pool is.
    crate::conformance_tests!(native_pooled_conformance, pooled_fixture(1));
    // Landlock must not break anything the contract promises.
    crate::conformance_tests!(native_landlock_conformance, landlock_fixture());
    // Rootless mode (see `native_conformance_passes_rootless`).
    crate::conformance_tests!(native_rootless_conformance, rootless_fixture());

    /// The whole suite on a rootless server: this test binary re-runs the
    /// `native_rootless_conformance` cases as uid/gid 65534 (`setpriv`),
    /// with its own temp dir, and every case must pass.
    #[test]
    fn native_conformance_passes_rootless() {
        if !nix::unistd::geteuid().is_root() {
            return; // already the unprivileged copy
        }
        let tmp = tempfile::tempdir().expect("tmp");
        std::os::unix::fs::chown(tmp.path(), Some(65534), Some(65534)).expect("chown");
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&exe)
            .args([
                "native::tests::native_rootless_conformance::",
                "--test-threads=2",
            ])
            .env("TMPDIR", tmp.path())
            .env("HOME", tmp.path())
            .current_dir(tmp.path())
            .output()
            .expect("setpriv (util-linux)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "rootless suite failed:\n{stdout}\n{stderr}"
        );
        let passed = stdout
            .lines()
            .filter(|l| l.starts_with("test ") && l.ends_with(" ... ok"))
            .count();
        assert!(passed >= 15, "only {passed} rootless cases ran:\n{stdout}");
    }

    /// With landlock, writes outside the writable set fail for commands
    /// and for the file API alike (403), even where the overlay root would
    /// allow them; the workspace and /tmp stay writable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn landlock_limits_writes_to_the_writable_set() {
        let fx = landlock_fixture();
        let p = fx.make();
        let id = crate::conformance::spawn(&p, "host").await;
        let r = crate::conformance::sh(
            &p,
            &id,
            "touch /workspace/ok /tmp/ok && echo writable; touch /opt/x 2>/dev/null || echo denied; cat /usr/bin/env > /dev/null && echo readable",
        )
        .await;
        assert_eq!(r.stdout, "writable\ndenied\nreadable\n", "{r:?}");
        let e = p
            .write_file(&id, "/opt/y", b"x", 0o644)
            .await
            .expect_err("file API outside the writable set");
        assert_eq!(e.kind(), ErrorKind::Forbidden, "{e}");
        p.write_file(&id, "/workspace/y", b"x", 0o644)
            .await
            .expect("workspace write");
        // Without landlock the same write succeeds (the overlay root is writable).
        let plain = fixture();
        let q = plain.make();
        let id2 = crate::conformance::spawn(&q, "host").await;
        q.write_file(&id2, "/opt/y", b"x", 0o644)
            .await
            .expect("overlay root writable without landlock");
        q.destroy(&id2).await.expect("destroy");
        p.destroy(&id).await.expect("destroy");
    }

    /// Waits until the pool holds `n` ready sandboxes.
    async fn pool_ready(p: &NativeProvider, n: usize) {
        for _ in 0..400 {
            if p.pool.ready_count() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("warm pool did not reach {n} ready sandboxes in 10 s");
    }

    /// The claiming thread enters the sandbox's UTS namespace only for the
    /// `sethostname` call: afterwards it is back in its own namespace with
    /// the host's name, and the sandbox has its id as hostname. A claim of
    /// the pool's own size keeps the pool's limits.
    #[tokio::test(flavor = "current_thread")]
    async fn a_claim_leaves_the_claiming_thread_in_its_own_uts_namespace() {
        let fx = pooled_fixture(1);
        let p = fx.make();
        pool_ready(&p, 1).await;
        let ns = || std::fs::read_link("/proc/thread-self/ns/uts").expect("own uts ns");
        let (ns_before, host_before) = (ns(), nix::unistd::gethostname().expect("hostname"));
        let mut spec = crate::conformance::spawn_spec("host");
        spec.memory_mb = 256;
        spec.vcpus = 1;
        p.spawn(&spec).await.expect("spawn");
        // current_thread: the claim ran on this very thread.
        assert_eq!(ns(), ns_before);
        assert_eq!(nix::unistd::gethostname().expect("hostname"), host_before);
        let meta = p.meta(&spec.id).expect("meta");
        assert_eq!(meta.memory_mb, 256);
        let out = crate::conformance::sh(&p, &spec.id, "cat /proc/sys/kernel/hostname").await;
        assert_eq!(out.stdout.trim(), spec.id);
        for dir in &meta.cgroups {
            if let Ok(v) = std::fs::read_to_string(dir.join("memory.limit_in_bytes")) {
                assert_eq!(v.trim(), (256u64 << 20).to_string());
            }
        }
        p.destroy(&spec.id).await.expect("destroy");
        p.shutdown().await;
    }

    /// A claimed warm sandbox is the spawn's sandbox in every visible way:
    /// hostname, cgroup names and limits, state dir, inventory; pool
    /// sandboxes never show in the inventory; the pool refills; a new
    /// provider instance removes the previous one's pool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn warm_pool_claims_look_like_fresh_sandboxes() {
        let fx = pooled_fixture(2);
        let p = fx.make();
        pool_ready(&p, 2).await;
        assert!(p.list_runtimes().await.expect("inventory").is_empty());
        let pool_dirs = |fx: &Fixture| -> usize {
            std::fs::read_dir(fx.state_dir().join("sandboxes"))
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with(pool::PREFIX))
                        .count()
                })
                .unwrap_or(0)
        };
        assert_eq!(pool_dirs(&fx), 2);
        let warm_pids: Vec<i32> = std::fs::read_dir(fx.state_dir().join("sandboxes"))
            .expect("state")
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("meta.json")).ok())
            .filter_map(|b| serde_json::from_slice::<Meta>(&b).ok())
            .map(|m| m.init_pid)
            .collect();

        let mut spec = crate::conformance::spawn_spec("host");
        spec.memory_mb = 96;
        spec.vcpus = 2;
        p.spawn(&spec).await.expect("spawn");
        let id = spec.id.clone();
        let meta = p.meta(&id).expect("meta under the sandbox id");
        assert!(warm_pids.contains(&meta.init_pid), "served from the pool");
        assert_eq!(meta.id, id);
        assert_eq!(meta.memory_mb, 96);
        assert!(!meta.cgroups.is_empty());
        for dir in &meta.cgroups {
            assert_eq!(
                dir.file_name().and_then(|n| n.to_str()),
                Some(id.as_str()),
                "cgroup renamed: {dir:?}"
            );
            for (file, want) in [
                ("memory.limit_in_bytes", (96u64 << 20).to_string()),
                ("memory.max", (96u64 << 20).to_string()),
                ("cpu.cfs_quota_us", "200000".to_string()),
            ] {
                if let Ok(v) = std::fs::read_to_string(dir.join(file)) {
                    assert_eq!(v.trim(), want, "{}", dir.join(file).display());
                }
            }
        }
        let r = crate::conformance::sh(
            &p,
            &id,
            "hostname; echo x > /workspace/f && cat /workspace/f; ps -e | wc -l",
        )
        .await;
        assert_eq!(r.stdout, format!("{id}\nx\n5\n"), "{r:?}");
        let inv = p.list_runtimes().await.expect("inventory");
        assert_eq!(inv.len(), 1);
        assert_eq!(inv[0].sandbox_id, id);
        // A spawn the pool cannot serve boots normally.
        let mut busy = crate::conformance::spawn_spec("host");
        busy.network_mode = "bridge".into();
        p.spawn(&busy).await.expect("bridge spawn");
        assert!(p.meta(&busy.id).expect("meta").net.is_some());
        pool_ready(&p, 2).await;
        assert_eq!(pool_dirs(&fx), 2, "refilled");

        // Restart: the new instance clears the old pool (and fills its own
        // only when configured to).
        let q = fx.make_with_pool(0);
        assert_eq!(pool_dirs(&fx), 0, "old pool removed");
        let ids: Vec<_> = q
            .list_runtimes()
            .await
            .expect("inventory")
            .into_iter()
            .map(|r| r.sandbox_id)
            .collect();
        assert_eq!(ids.len(), 2, "{ids:?}");
        for id in [&spec.id, &busy.id] {
            q.destroy(id).await.expect("destroy");
        }
        assert!(q.list_runtimes().await.expect("inventory").is_empty());
    }

    /// The same suite on an imported image (busybox, two layers with whiteouts).
    pub struct BusyboxFixture {
        inner: Fixture,
    }

    const BUSYBOX_TAG: &str = "stacyvm-test/busybox:1";

    pub fn busybox_fixture() -> BusyboxFixture {
        let inner = fixture();
        let archive = crate::image::import::tests::busybox_archive(inner.dir.path(), BUSYBOX_TAG);
        inner
            .make()
            .images()
            .import(&archive, None, &mut |_, _, _| {})
            .expect("import busybox image");
        BusyboxFixture { inner }
    }

    impl crate::conformance::Fixture for BusyboxFixture {
        fn provider(&self) -> Arc<dyn Provider> {
            self.inner.provider()
        }
        fn image(&self) -> String {
            BUSYBOX_TAG.into()
        }
        fn supports_pause(&self) -> bool {
            crate::conformance::Fixture::supports_pause(&self.inner)
        }
        fn survives_restart(&self) -> bool {
            true
        }
    }

    crate::conformance_tests!(native_busybox_conformance, busybox_fixture());

    #[tokio::test]
    async fn imported_image_is_the_root_and_unknown_images_say_how_to_get_them() {
        let fx = busybox_fixture();
        let p = fx.inner.make();
        let id = crate::conformance::spawn(&p, BUSYBOX_TAG).await;
        let r = crate::conformance::sh(&p, &id, "cat /etc/os-release; ls /gone 2>&1; ls /opaque; test -e /usr/bin/python3 || echo no-host-usr").await;
        assert_eq!(r.stdout.lines().next(), Some("NAME=stacyvm-test-busybox"));
        assert!(r.stdout.contains("No such file"), "whiteout applied: {r:?}");
        assert!(
            r.stdout.contains("new") && !r.stdout.contains("sub"),
            "opaque dir applied: {r:?}"
        );
        assert!(
            r.stdout.contains("no-host-usr"),
            "host /usr not mounted into imported images"
        );
        // Writes land in the sandbox's upper dir, never in the image.
        crate::conformance::sh(&p, &id, "echo changed > /etc/os-release").await;
        let rec = p.images().find(BUSYBOX_TAG).expect("record");
        assert_eq!(
            std::fs::read_to_string(p.images().rootfs_of(&rec).join("etc/os-release"))
                .expect("image file"),
            "NAME=stacyvm-test-busybox\n"
        );
        p.destroy(&id).await.expect("destroy");
        let spec = SpawnSpec {
            id: paths::new_sandbox_id(),
            image: "alpine:3.20".into(),
            memory_mb: 64,
            vcpus: 1,
            metadata: BTreeMap::new(),
            owner_id: String::new(),
            tenant_id: String::new(),
            expires_at: Utc::now(),
            network_mode: String::new(),
            snapshot: None,
            egress: None,
            volumes: Vec::new(),
        };
        let e = p.spawn(&spec).await.expect_err("unknown image");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("stacyvm image import"), "{e}");
        p.images().remove(BUSYBOX_TAG).expect("rm");
        assert!(p.images().find(BUSYBOX_TAG).is_none());
    }
}
