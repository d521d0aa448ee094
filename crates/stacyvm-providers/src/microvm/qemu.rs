//! The `qemu` provider: each sandbox is a QEMU `microvm` machine with its
//! own guest kernel, the static agent as its init, and the image's root
//! disk.
//!
//! Per sandbox (`<base>/<id>/`, 0700):
//! - `meta.json` — what the server knows (QEMU's pid identity, token, …);
//! - `disk.qcow2` — the writable layer over the image's shared ext4;
//! - `qemu.log` (QEMU's own stderr), `qmp.sock` (control), `agent.sock` (the agent's
//!   virtio-serial port), `console.sock` (the serial console; the server
//!   copies it into `console.log`, capped).
//!
//! A spawn starts QEMU paused (`-S`, its own process group), records the sandbox,
//! moves QEMU into the sandbox's cgroup, then resumes it over QMP and
//! waits for the agent's handshake. VMs outlive the server: a new
//! provider instance finds them through `meta.json` and reconnects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use stacyvm_core::provider::{
    capability, ExecInput, ExecSpec, ExitStatus, Isolation, OutputSink, Profile, Provider,
    RuntimeInfo, RuntimeStatus, SandboxIo, SandboxSnapshot, SpawnSpec, Spawned, Stats,
};
use stacyvm_core::{paths, Error, ErrorKind, Result};
use stacyvm_sandbox::cgroup::{self, Layout, Limits};
use stacyvm_sandbox::procs::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use super::kernel::{self, Kernel};
use super::rootfs::RootfsCache;
use super::snapshot::{self, SnapMeta};
use super::usersnap;
use super::{qcow2, qmp, Accel};
use crate::agent::{AgentClient, AgentSession};
use crate::image::store as images;
use crate::native::{ids, net};

/// The most a console log keeps (then it rotates to `console.log.1`).
const CONSOLE_CAP: u64 = 1 << 20;
/// How long reconnecting to a running guest's agent may take.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The smallest guest the kernel and agent boot in.
const MIN_MEMORY_MB: i64 = 96;
/// QEMU's own memory beside the guest's (cgroup limit = guest + this).
const VMM_OVERHEAD_MB: u64 = 192;

/// Settings of the qemu provider (`providers.qemu.*`).
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// Per-sandbox state (`<data_dir>/qemu/sandboxes`).
    pub base: PathBuf,
    /// Kernels, initramfs and root disks (`providers.qemu.cache_dir`).
    pub cache: PathBuf,
    /// The image store shared with the native provider.
    pub images_dir: PathBuf,
    /// Paths never exposed (the server's data dir).
    pub hidden: Vec<String>,
    /// The static `stacyvm-agent` (the guest's init).
    pub agent_path: PathBuf,
    /// `qemu-system-x86_64` (a name looked up in PATH, or a path).
    pub qemu_binary: String,
    pub accel: Accel,
    /// The Debian kernel package (a metapackage is resolved by apt).
    pub kernel_package: String,
    /// Used for spawns that name no image or `host`.
    pub default_image: String,
    pub max_sandboxes: usize,
    pub max_memory_mb: i64,
    pub max_vcpus: u32,
    /// MiB free in each sandbox's root disk.
    pub disk_mb: u64,
    /// QEMU start to agent handshake.
    pub boot_timeout: Duration,
    /// Hard cap of every exec.
    pub exec_timeout: Duration,
    /// Spawn by restoring a snapshot of a booted guest of the same shape
    /// (built in the background after the first cold boot).
    pub snapshots: bool,
    /// Where QEMU's unprivileged uids come from (leased like native's).
    pub subordinate_ids: ids::IdRange,
    /// Network of spawns that do not ask (`none` or `bridge`).
    pub network_mode: String,
    /// The native bridge `bridge` spawns join through a tap.
    pub bridge: net::BridgeOptions,
}

/// What is recorded of a sandbox (`meta.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Meta {
    id: String,
    image: String,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    owner_id: String,
    tenant_id: String,
    metadata: BTreeMap<String, String>,
    memory_mb: i64,
    vcpus: i64,
    accel: String,
    /// QEMU's pid, start time and boot id.
    pid: i32,
    start_time: u64,
    boot_id: String,
    #[serde(default)]
    cgroups: Vec<PathBuf>,
    token: String,
    /// The snapshot this VM was restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
    /// The unprivileged uid (= gid) QEMU runs as, leased (root servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    /// The VM's tap on the bridge (`bridge` networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    net: Option<net::Attachment>,
    /// The image's ext4 disk at the bottom of the VM's disk chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<PathBuf>,
}

impl Meta {
    fn qemu(&self) -> Identity {
        Identity {
            pid: self.pid,
            start_time: self.start_time,
            boot_id: self.boot_id.clone(),
        }
    }

    fn alive(&self) -> bool {
        self.qemu().alive()
    }

    fn token(&self) -> Option<Vec<u8>> {
        hex::decode(&self.token).ok().filter(|t| !t.is_empty())
    }
}

/// The guest kernel and the initramfs built for it and this agent.
#[derive(Debug, Clone)]
pub(super) struct Assets {
    pub(super) kernel: Kernel,
    pub(super) initrd: PathBuf,
}

#[derive(Debug)]
pub struct QemuProvider {
    opts: QemuOptions,
    qemu: Option<PathBuf>,
    images: Arc<images::ImageStore>,
    disks: RootfsCache,
    cgroups: Option<Layout>,
    assets: tokio::sync::Mutex<Option<Assets>>,
    /// The accelerator spawns use, once decided (`auto` probes KVM once).
    accel: tokio::sync::Mutex<Option<(Accel, String)>>,
    conns: crate::agent::Connections,
    starting: Mutex<usize>,
    /// Snapshot keys being built in the background.
    building: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Unprivileged uids for QEMU (root servers).
    ids: Option<Arc<ids::IdAllocator>>,
    bridge: Arc<net::Bridge>,
    /// Sandboxes being snapshotted (one snapshot of a VM at a time).
    freezing: Mutex<std::collections::HashSet<String>>,
}

fn read_meta(dir: &Path) -> Option<Meta> {
    std::fs::read(dir.join("meta.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Kills QEMU (if it is still the recorded process), waits for it to go,
/// removes the cgroups and the state dir.
fn teardown_blocking(dir: &Path, meta: Option<&Meta>) {
    if let Some(m) = meta {
        let q = m.qemu();
        q.kill();
        let until = Instant::now() + Duration::from_secs(5);
        while q.alive() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        if !m.cgroups.is_empty() {
            cgroup::destroy(&m.cgroups);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    if let Some(uid) = meta.and_then(|m| m.uid) {
        ids::release_lease(uid);
    }
    // QEMU is gone, and with it the tap: the lease and pins go now.
    if let Some(att) = meta.and_then(|m| m.net.as_ref()) {
        net::release(att);
    }
}

/// Releases a bridge attachment when dropped, unless disarmed (it was
/// recorded in `meta.json`, and teardown releases it from there).
struct NetGuard(Option<net::Attachment>);

impl Drop for NetGuard {
    fn drop(&mut self) {
        if let Some(att) = self.0.take() {
            net::release(&att);
        }
    }
}

/// Releases a leased uid when dropped.
pub(super) struct LeaseGuard(pub(super) Option<u32>);

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(u) = self.0 {
            ids::release_lease(u);
        }
    }
}

/// The host's memory in MiB (`MemTotal`).
pub(super) fn host_memory_mb() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: i64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024)
}

/// Kills QEMU processes started for `dir` that were never recorded.
fn kill_unrecorded(dir: &Path) {
    let needle = format!("path={}/qmp.sock", dir.display());
    let needle_qmp = format!("unix:{}/qmp.sock", dir.display());
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Some(ident) = Identity::of(pid) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains(&needle) || cmd.contains(&needle_qmp) {
            ident.kill();
        }
    }
}

/// The QEMU binary: a path as is, a name through PATH.
pub fn resolve_binary(name: &str) -> Option<PathBuf> {
    stacyvm_core::checks::which(name)
}

impl QemuProvider {
    pub fn new(opts: QemuOptions) -> Result<Self> {
        crate::native::create_private_dir(&opts.base)?;
        let images = Arc::new(images::ImageStore::new(
            opts.images_dir.clone(),
            &opts.hidden,
        )?);
        let mut cgroups = cgroup::detect();
        if !cgroups.as_ref().is_some_and(cgroup::writable) {
            cgroups = None;
        }
        let p = Self {
            bridge: Arc::new(net::Bridge::new(opts.bridge.clone())),
            freezing: Mutex::default(),
            qemu: resolve_binary(&opts.qemu_binary),
            disks: RootfsCache::new(&opts.cache),
            images,
            cgroups,
            assets: tokio::sync::Mutex::new(None),
            accel: tokio::sync::Mutex::new(None),
            conns: crate::agent::Connections::default(),
            starting: Mutex::new(0),
            building: Arc::default(),
            ids: nix::unistd::geteuid().is_root().then(|| {
                let a = ids::IdAllocator::new(opts.subordinate_ids);
                a.sweep();
                Arc::new(a)
            }),
            opts,
        };
        p.sweep();
        usersnap::sweep(&p.user_snapshots());
        Ok(p)
    }

    /// Where sandbox snapshots live: `<data_dir>/qemu/snapshots`.
    fn user_snapshots(&self) -> PathBuf {
        self.opts
            .base
            .parent()
            .map_or_else(|| self.opts.base.join("snapshots"), |p| p.join("snapshots"))
    }

    /// Removes what dead VMs left (a VM that died while no server ran).
    fn sweep(&self) {
        let Ok(rd) = std::fs::read_dir(&self.opts.base) else {
            return;
        };
        for e in rd.flatten() {
            match read_meta(&e.path()) {
                Some(m) if m.alive() => {}
                Some(m) => teardown_blocking(&e.path(), Some(&m)),
                None => {
                    // Killed between QEMU's start and the record: find
                    // QEMU by the sockets on its command line.
                    kill_unrecorded(&e.path());
                    teardown_blocking(&e.path(), None);
                }
            }
        }
    }

    pub fn images(&self) -> &images::ImageStore {
        &self.images
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.opts.base.join(id)
    }

    fn meta(&self, id: &str) -> Result<Meta> {
        if !paths::is_sandbox_id(id) {
            return Err(Error::sandbox_not_found(id));
        }
        read_meta(&self.dir(id)).ok_or_else(|| Error::sandbox_not_found(id))
    }

    /// Sends `stop` or `cont` to a live VM's QMP socket.
    async fn vm_control(&self, id: &str, command: &str) -> Result<()> {
        if !self.meta(id)?.alive() {
            return Err(Error::sandbox_not_found(id));
        }
        qmp::execute(&self.dir(id).join("qmp.sock"), command, None)
            .await
            .map(|_| ())
    }

    /// Whether QEMU reports the VM stopped by `stop` (QMP `query-status`).
    async fn vm_paused(&self, id: &str) -> bool {
        qmp::execute(&self.dir(id).join("qmp.sock"), "query-status", None)
            .await
            .is_ok_and(|v| v.get("status").and_then(|s| s.as_str()) == Some("paused"))
    }

    fn live_count(&self) -> usize {
        std::fs::read_dir(&self.opts.base)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| read_meta(&e.path()).is_some_and(|m| m.alive()))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The kernel (downloaded once) and the initramfs for this agent.
    async fn assets(&self) -> Result<Assets> {
        let mut slot = self.assets.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let (cache, package, agent) = (
            self.opts.cache.clone(),
            self.opts.kernel_package.clone(),
            self.opts.agent_path.clone(),
        );
        let a = tokio::task::spawn_blocking(move || -> Result<Assets> {
            let kernel = kernel::install(&cache, &package)?;
            let initrd = kernel::initramfs_for(&cache, &agent, &kernel)?;
            Ok(Assets { kernel, initrd })
        })
        .await
        .map_err(|e| Error::internal(format!("guest kernel task: {e}")))??;
        *slot = Some(a.clone());
        Ok(a)
    }

    /// The accelerator to use: as configured, or for `auto` KVM when a
    /// guest boots with it (probed once per provider), TCG otherwise.
    async fn accel(&self) -> Result<(Accel, String)> {
        let mut slot = self.accel.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let decided = match self.opts.accel {
            Accel::Tcg => (Accel::Tcg, "tcg (configured)".to_string()),
            Accel::Kvm => match super::kvm_usable() {
                Ok(()) => (Accel::Kvm, "kvm (configured)".to_string()),
                Err(why) => {
                    return Err(Error::unavailable(format!(
                        "providers.qemu.accel is kvm but {why}; set accel: auto or tcg"
                    )))
                }
            },
            Accel::Auto => match super::kvm_usable() {
                Err(why) => (Accel::Tcg, format!("tcg ({why})")),
                Ok(()) => self.probed().await,
            },
        };
        info!(accel = %decided.1, "qemu provider accelerator");
        *slot = Some(decided.clone());
        Ok(decided)
    }

    /// The KVM probe's verdict, remembered per host boot in
    /// `CACHE/accel.json` (a probe costs a guest boot, or its timeout).
    async fn probed(&self) -> (Accel, String) {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Verdict {
            boot_id: String,
            kvm: bool,
            why: String,
        }
        let file = self.opts.cache.join("accel.json");
        let boot_id = stacyvm_sandbox::procs::boot_id();
        let known = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Verdict>(&b).ok())
            .filter(|v| v.boot_id == boot_id);
        let v = match known {
            Some(v) => v,
            None => {
                let (kvm, why) = match self.probe_kvm().await {
                    Ok(()) => (true, "kvm (a probe guest booted)".to_string()),
                    Err(e) => (
                        false,
                        format!("tcg (a probe guest did not boot under KVM: {e})"),
                    ),
                };
                let v = Verdict { boot_id, kvm, why };
                let _ = std::fs::create_dir_all(&self.opts.cache);
                let tmp = file.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, serde_json::to_vec(&v).unwrap_or_default()).is_ok() {
                    let _ = std::fs::rename(&tmp, &file);
                }
                v
            }
        };
        if v.kvm {
            (Accel::Kvm, v.why)
        } else {
            (Accel::Tcg, v.why)
        }
    }

    /// Boots the initramfs alone under KVM and waits for the agent.
    async fn probe_kvm(&self) -> Result<()> {
        let assets = self.assets().await?;
        let dir = tempfile::Builder::new()
            .prefix(".kvm-probe-")
            .tempdir_in(&self.opts.base)
            .map_err(|e| Error::internal(format!("probe dir: {e}")))?;
        let probe = Launch {
            dir: dir.path(),
            assets: &assets,
            accel: Accel::Kvm,
            disk: None,
            memory_mb: 128,
            vcpus: 1,
            hostname: "kvm-probe",
            token: &rand::random::<[u8; 16]>(),
            memory_file: None,
            incoming: false,
            kill_on_drop: true,
            runas: None,
            volumes: &[],
            nic: None,
        };
        let res = async {
            let (pid, _child) = launch(self.qemu_path()?, &probe).await?;
            let ident = Identity::of(pid).ok_or_else(|| Error::internal("probe exited"))?;
            let r = async {
                qmp::execute(&dir.path().join("qmp.sock"), "cont", None).await?;
                wait_agent(
                    &dir.path().join("agent.sock"),
                    probe.token,
                    Duration::from_secs(10),
                    &ident,
                )
                .await
            }
            .await;
            ident.kill();
            r.map(|_| ())
        }
        .await;
        let _ = tokio::task::spawn_blocking(move || drop(dir)).await;
        res
    }

    fn qemu_path(&self) -> Result<&Path> {
        self.qemu.as_deref().ok_or_else(|| {
            Error::unavailable(format!(
                "{} not found; install it (Debian: apt-get install qemu-system-x86) or set providers.qemu.qemu_binary",
                self.opts.qemu_binary
            ))
        })
    }

    /// The live connection to a sandbox's agent (reconnecting after a
    /// server restart: the VM's port takes a new host connection).
    async fn client(&self, id: &str) -> Result<Arc<AgentClient>> {
        self.conns
            .get_or_connect(id, || async {
                let meta = self.meta(id)?;
                if !meta.alive() {
                    return Err(Error::sandbox_not_found(id));
                }
                let token = meta.token().unwrap_or_default();
                let c = wait_agent(
                    &self.dir(id).join("agent.sock"),
                    &token,
                    RECONNECT_TIMEOUT,
                    &meta.qemu(),
                )
                .await?;
                spawn_console_reader(self.dir(id));
                Ok(c)
            })
            .await
    }

    async fn teardown(&self, id: &str, meta: Option<Meta>) {
        self.conns.forget(id);
        let dir = self.dir(id);
        let _ = tokio::task::spawn_blocking(move || teardown_blocking(&dir, meta.as_ref())).await;
    }

    /// The image's root directory and its content key.
    /// The image a spawn gets (resolving `host` to the default image), its
    /// content key and its root directory.
    fn image_source(&self, image: &str) -> Result<(String, String, PathBuf)> {
        let image = if (image.is_empty() || image == "host") && !self.opts.default_image.is_empty()
        {
            self.opts.default_image.as_str()
        } else {
            image
        };
        if image.is_empty() || image == "host" {
            return Err(Error::invalid(
                "image \"host\" is not available to the qemu provider (a microVM has no host /usr); set providers.qemu.default_image or use an imported image: `stacyvm image import`, `stacyvm image pull` (see `stacyvm image ls`)",
            ));
        }
        self.images.check(image)?;
        let rec = self
            .images
            .find(image)
            .ok_or_else(|| Error::invalid(format!("image {image:?} disappeared")))?;
        let key = rec.id.trim_start_matches("sha256:").to_string();
        let dir = self
            .images
            .single_dir(&rec, "qemu", &self.opts.agent_path)?;
        Ok((image.to_string(), key, dir))
    }

    fn validate(&self, spec: &SpawnSpec) -> Result<()> {
        if !paths::is_sandbox_id(&spec.id) {
            return Err(Error::invalid(format!("bad sandbox id {:?}", spec.id)));
        }
        if spec.memory_mb < MIN_MEMORY_MB {
            return Err(Error::invalid(format!(
                "memory_mb {} is below the qemu provider's minimum of {MIN_MEMORY_MB}",
                spec.memory_mb
            )));
        }
        if self.opts.max_memory_mb > 0 && spec.memory_mb > self.opts.max_memory_mb {
            return Err(Error::invalid(format!(
                "memory_mb {} exceeds providers.qemu.max_memory_mb ({})",
                spec.memory_mb, self.opts.max_memory_mb
            )));
        }
        let max_vcpus = i64::from(self.opts.max_vcpus.max(1));
        if spec.vcpus < 1 || spec.vcpus > max_vcpus {
            return Err(Error::invalid(format!(
                "vcpus {} must be between 1 and {max_vcpus} (providers.qemu.max_vcpus)",
                spec.vcpus
            )));
        }
        // Whatever the caps say, a guest larger than the host cannot run.
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as i64);
        if spec.vcpus > host_cpus {
            return Err(Error::invalid(format!(
                "vcpus {} exceeds this host's {host_cpus} CPUs",
                spec.vcpus
            )));
        }
        if let Some(host_mb) = host_memory_mb() {
            if spec.memory_mb >= host_mb {
                return Err(Error::invalid(format!(
                    "memory_mb {} exceeds this host's {host_mb} MiB of memory",
                    spec.memory_mb
                )));
            }
        }
        match self.network_of(spec) {
            "none" | "bridge" => Ok(()),
            other => Err(Error::invalid(format!(
                "unsupported network_mode {other:?} for the qemu provider (allowed: none, bridge)"
            ))),
        }
    }

    /// The network a spawn gets: what it asks for, else the default.
    fn network_of<'s>(&'s self, spec: &'s SpawnSpec) -> &'s str {
        match spec.network_mode.as_str() {
            "" => self.opts.network_mode.as_str(),
            m => m,
        }
    }

    async fn spawn_counted(&self, spec: &SpawnSpec) -> Result<Spawned> {
        if let Some(id) = &spec.snapshot {
            return self.spawn_from_snapshot(spec, id).await;
        }
        let (image, key, src) = self.image_source(&spec.image)?;
        let assets = self.assets().await?;
        let (accel, _) = self.accel().await?;
        let base = self.disks.get(&key, &src, self.opts.disk_mb).await?;
        let networked = self.network_of(spec) == "bridge";
        let snap_key = snapshot::key(
            &key,
            spec.memory_mb,
            spec.vcpus,
            &assets.initrd,
            accel,
            networked,
        );
        // A boot snapshot is a guest past its init with a fixed set of
        // devices: a spawn with volume disks boots cold.
        let snapshots = self.opts.snapshots && spec.volumes.is_empty();
        let snap = if snapshots {
            snapshot::find(&self.opts.cache, &snap_key)
        } else {
            None
        };
        let res = self
            .spawn_from(spec, &assets, accel, &base, snap.as_ref())
            .await;
        let res = match (res, &snap) {
            (Err(e), Some((_, m))) => {
                // A snapshot that does not restore is of no use to anyone.
                warn!(snapshot = %m.id, error = %e, "restoring a snapshot failed; removing it and booting");
                let _ = snapshot::remove(&self.opts.cache, &m.id);
                self.spawn_from(spec, &assets, accel, &base, None).await
            }
            (res, _) => res,
        };
        if res.is_ok() && snapshots && snap.is_none() {
            self.build_snapshot_later(&assets, accel, &base, &image, &snap_key, spec);
        }
        res
    }

    /// A child of the sandbox snapshot `id`: its shape is the snapshot's.
    async fn spawn_from_snapshot(&self, spec: &SpawnSpec, id: &str) -> Result<Spawned> {
        if !spec.volumes.is_empty() {
            return Err(Error::invalid(
                "a qemu sandbox spawned from a snapshot cannot mount volumes (the snapshot is a whole machine, its disks fixed)",
            ));
        }
        let found = usersnap::find(&self.user_snapshots(), id)
            .ok_or_else(|| Error::not_found(format!("snapshot {id:?}")))?;
        let m = &found.1;
        if spec.memory_mb != m.memory_mb || spec.vcpus != m.vcpus {
            return Err(Error::invalid(format!(
                "snapshot {id} is a {} MiB, {} vCPU machine; a spawn from it cannot change that",
                m.memory_mb, m.vcpus
            )));
        }
        if (self.network_of(spec) == "bridge") != m.networked {
            return Err(Error::invalid(format!(
                "snapshot {id} was taken with network_mode {}; its children get the same",
                if m.networked { "bridge" } else { "none" }
            )));
        }
        let assets = self.assets().await?;
        let (accel, _) = self.accel().await?;
        if accel.as_str() != m.accel {
            return Err(Error::unavailable(format!(
                "snapshot {id} was taken under {} and this host runs guests under {}; a machine state restores only under the accelerator that made it",
                m.accel,
                accel.as_str()
            )));
        }
        self.spawn_with(
            spec,
            &assets,
            accel,
            &m.base.clone(),
            Restore::Snapshot(&found),
        )
        .await
        .map_err(|e| {
            if e.kind() == ErrorKind::Internal {
                Error::internal(format!("restoring snapshot {id}: {e}"))
            } else {
                e
            }
        })
    }

    /// Starts a background build of the snapshot `key` unless one runs.
    fn build_snapshot_later(
        &self,
        assets: &Assets,
        accel: Accel,
        base: &Path,
        image: &str,
        key: &str,
        spec: &SpawnSpec,
    ) {
        let Ok(qemu) = self.qemu_path().map(Path::to_path_buf) else {
            return;
        };
        if let Ok(mut b) = self.building.lock() {
            if !b.insert(key.to_string()) {
                return;
            }
        }
        let building = self.building.clone();
        let ids = self.ids.clone();
        let (cache, assets, base, image, key) = (
            self.opts.cache.clone(),
            assets.clone(),
            base.to_path_buf(),
            image.to_string(),
            key.to_string(),
        );
        let (memory_mb, vcpus, boot_timeout) = (spec.memory_mb, spec.vcpus, self.opts.boot_timeout);
        let networked = self.network_of(spec) == "bridge";
        tokio::spawn(async move {
            let runas = ids
                .as_ref()
                .and_then(|a| a.allocate(&cache.join("snapshots")).ok());
            // Released however the task ends, also when it is dropped
            // unfinished (the server or runtime shutting down).
            let _lease = LeaseGuard(runas);
            let t = snapshot::Template {
                runas,
                qemu: &qemu,
                cache: &cache,
                assets: &assets,
                accel,
                base: &base,
                image: &image,
                key: &key,
                memory_mb,
                vcpus,
                boot_timeout,
                networked,
            };
            match snapshot::build(&t).await {
                Ok(m) => info!(snapshot = %m.id, bytes = m.size_bytes, "qemu snapshot ready"),
                Err(e) => warn!(snapshot = %key, error = %e, "building a qemu snapshot failed"),
            }
            if let Ok(mut b) = building.lock() {
                b.remove(&key);
            }
        });
    }

    async fn spawn_from(
        &self,
        spec: &SpawnSpec,
        assets: &Assets,
        accel: Accel,
        base: &Path,
        snap: Option<&(PathBuf, SnapMeta)>,
    ) -> Result<Spawned> {
        let how = match snap {
            Some(s) => Restore::Point(s),
            None => Restore::Boot,
        };
        self.spawn_with(spec, assets, accel, base, how).await
    }

    async fn spawn_with(
        &self,
        spec: &SpawnSpec,
        assets: &Assets,
        accel: Accel,
        base: &Path,
        snap: Restore<'_>,
    ) -> Result<Spawned> {
        let dir = self.dir(&spec.id);
        if std::fs::symlink_metadata(&dir).is_ok() {
            return Err(Error::conflict(format!("sandbox {} exists", spec.id)));
        }
        crate::native::create_private_dir(&dir)?;
        // QEMU drops to a leased uid once it is set up.
        let uid = match &self.ids {
            Some(a) => match a.allocate(&dir) {
                Ok(u) => Some(u),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(e);
                }
            },
            None => None,
        };
        let mut slot: Option<Meta> = None;
        match self
            .start(
                spec,
                &dir,
                &Boot {
                    assets,
                    accel,
                    base,
                    snap,
                    uid,
                },
                &mut slot,
            )
            .await
        {
            Ok(c) => {
                self.conns.insert(&spec.id, c);
                info!(
                    sandbox_id = %spec.id,
                    image = %spec.image,
                    accel = accel.as_str(),
                    snapshot = snap.id(),
                    "qemu sandbox started"
                );
                Ok(Spawned {
                    runtime_id: spec.id.clone(),
                })
            }
            Err(e) => {
                let recorded = slot.is_some();
                self.teardown(&spec.id, slot).await;
                if let (Some(u), false) = (uid, recorded) {
                    ids::release_lease(u);
                }
                Err(e)
            }
        }
    }

    async fn start(
        &self,
        spec: &SpawnSpec,
        dir: &Path,
        how: &Boot<'_>,
        slot: &mut Option<Meta>,
    ) -> Result<Arc<AgentClient>> {
        let Boot {
            assets,
            accel,
            base,
            snap,
            uid,
        } = *how;

        let disk = dir.join("disk.qcow2");
        let size = std::fs::metadata(base)
            .map_err(|e| Error::internal(format!("root disk {}: {e}", base.display())))?
            .len();
        let overlay = match snap {
            Restore::Boot => Some((base.to_path_buf(), qcow2::Backing::Raw)),
            Restore::Point((sdir, _)) => Some((sdir.join("disk.qcow2"), qcow2::Backing::Qcow2)),
            // A child owns a copy of the snapshot's overlay (on the image's
            // ext4): the snapshot may go while the child runs.
            Restore::Snapshot((sdir, _)) => {
                usersnap::copy_sparse(&sdir.join("disk.qcow2"), &disk).await?;
                None
            }
        };
        if let Some((backing, format)) = overlay {
            qcow2::create_overlay(&disk, &backing, format, size)
                .map_err(|e| Error::internal(format!("creating {}: {e}", disk.display())))?;
        }
        let fresh: [u8; 32] = rand::random();
        let token =
            match snap {
                Restore::Point((_, m)) => hex::decode(&m.token)
                    .map_err(|_| Error::internal("snapshot token is not hex"))?,
                Restore::Snapshot((_, m)) => hex::decode(&m.token)
                    .map_err(|_| Error::internal("snapshot token is not hex"))?,
                Restore::Boot => fresh.to_vec(),
            };
        let mem = match snap {
            Restore::Point((sdir, _)) => Some(sdir.join("mem")),
            _ => None,
        };
        // `bridge`: a tap on the native bridge, pinned to the leased
        // address. Released here on any failure until meta.json has it.
        let (mut net_guard, tap) = if self.network_of(spec) == "bridge" {
            let (bridge, id) = (self.bridge.clone(), spec.id.clone());
            let (att, tap) = tokio::task::spawn_blocking(move || bridge.attach_tap(&id))
                .await
                .map_err(|e| Error::internal(format!("tap setup task: {e}")))??;
            let guard = NetGuard(Some(att.clone()));
            // In force before the VM sends its first packet.
            if let Some(rules) = &spec.egress {
                self.bridge.set_egress(&att, Some(rules)).await?;
            }
            (guard, Some(tap))
        } else {
            (NetGuard(None), None)
        };
        let guest_net = net_guard.0.as_ref().map(|att| self.guest_net(att));
        let launch_spec = Launch {
            dir,
            assets,
            accel,
            disk: Some(&disk),
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            hostname: match snap {
                Restore::Point((_, m)) => m.hostname.as_str(),
                _ => spec.id.as_str(),
            },
            token: &token,
            memory_file: mem.as_deref().map(|m| (m, false)),
            incoming: snap.is_restore(),
            kill_on_drop: false,
            runas: uid,
            volumes: &spec.volumes,
            nic: tap.as_ref().zip(guest_net.as_ref()).map(|(fd, g)| Nic {
                tap: fd,
                mac: net::mac_for(
                    net_guard
                        .0
                        .as_ref()
                        .map_or(std::net::Ipv4Addr::UNSPECIFIED, |a| a.ip),
                ),
                // A restored clone gets its address from `Reidentify`.
                boot_config: (!snap.is_restore()).then_some(g),
            }),
        };
        let (pid, _child) = launch(self.qemu_path()?, &launch_spec).await?;
        drop(tap);
        let ident = Identity::of(pid)
            .ok_or_else(|| Error::internal("QEMU exited right after it started"))?;
        let cgroups = match &self.cgroups {
            Some(layout) => {
                let limits = Limits {
                    memory_bytes: (u64::try_from(spec.memory_mb).unwrap_or(0) + VMM_OVERHEAD_MB)
                        << 20,
                    pids: 0,
                    cpu_quota_us: (u64::try_from(spec.vcpus).unwrap_or(1)) * 100_000,
                };
                match cgroup::create(layout, &spec.id, limits) {
                    Ok(dirs) => dirs,
                    Err(e) => {
                        ident.kill();
                        return Err(Error::internal(format!("creating cgroups: {e}")));
                    }
                }
            }
            None => Vec::new(),
        };
        let meta = Meta {
            id: spec.id.clone(),
            image: spec.image.clone(),
            created_at: Utc::now(),
            expires_at: spec.expires_at,
            owner_id: spec.owner_id.clone(),
            tenant_id: spec.tenant_id.clone(),
            metadata: spec.metadata.clone(),
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            accel: accel.as_str().to_string(),
            pid,
            start_time: ident.start_time,
            boot_id: ident.boot_id.clone(),
            cgroups: cgroups.clone(),
            token: hex::encode(&token),
            snapshot: snap.is_restore().then(|| snap.id().to_string()),
            uid,
            net: net_guard.0.take(),
            base: Some(match snap {
                Restore::Snapshot((_, m)) => m.base.clone(),
                _ => base.to_path_buf(),
            }),
        };
        *slot = Some(meta.clone());
        std::fs::write(
            dir.join("meta.json"),
            serde_json::to_vec(&meta).unwrap_or_default(),
        )
        .map_err(|e| Error::internal("recording the sandbox").with_source(e))?;
        for d in &cgroups {
            std::fs::write(d.join("cgroup.procs"), pid.to_string())
                .map_err(|e| Error::internal(format!("moving QEMU into {}: {e}", d.display())))?;
        }
        spawn_console_reader(dir.to_path_buf());
        let qmp_sock = dir.join("qmp.sock");
        match snap {
            Restore::Point((sdir, _)) => {
                restore_state(&qmp_sock, dir, &sdir.join("vmstate"), true).await?;
            }
            Restore::Snapshot((sdir, _)) => {
                restore_state(&qmp_sock, dir, &sdir.join("vmstate"), false).await?;
            }
            Restore::Boot => {}
        }
        qmp::execute(&qmp_sock, "cont", None).await?;
        let client = wait_agent(
            &dir.join("agent.sock"),
            &token,
            self.opts.boot_timeout,
            &ident,
        )
        .await
        .map_err(|e| {
            let tail = console_tail(dir, 15);
            if tail.is_empty() {
                e
            } else {
                Error::new(e.kind(), format!("{e}; guest console:\n{tail}"))
            }
        })?;
        if snap.is_restore() {
            let mut net = guest_net;
            if let (Some(n), Some(att)) = (net.as_mut(), meta.net.as_ref()) {
                n.mac = net::mac_for(att.ip);
            }
            client.reidentify(&spec.id, net).await?;
        }
        Ok(client)
    }

    /// What the guest configures on `eth0` for its bridge attachment.
    fn guest_net(&self, att: &net::Attachment) -> stacyvm_agent_proto::GuestNet {
        let subnet = self.bridge.options().subnet;
        stacyvm_agent_proto::GuestNet {
            address: att.ip.to_string(),
            prefix: subnet.prefix,
            gateway: subnet.gateway().to_string(),
            mac: String::new(),
            nameservers: self
                .bridge
                .resolvers()
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }
}

/// How a VM comes up: booted from the image's disk, or restored from a
/// snapshot of that image.
#[derive(Clone, Copy)]
struct Boot<'a> {
    assets: &'a Assets,
    accel: Accel,
    base: &'a Path,
    snap: Restore<'a>,
    /// QEMU's unprivileged uid.
    uid: Option<u32>,
}

/// Where a VM's state comes from.
#[derive(Clone, Copy)]
enum Restore<'a> {
    /// A cold boot of the image.
    Boot,
    /// A restore point of its shape (RAM in a shared file).
    Point(&'a (PathBuf, SnapMeta)),
    /// A snapshot of a sandbox (RAM in the stream).
    Snapshot(&'a (PathBuf, usersnap::UserSnap)),
}

impl Restore<'_> {
    fn is_restore(&self) -> bool {
        !matches!(self, Restore::Boot)
    }

    fn id(&self) -> &str {
        match self {
            Restore::Boot => "",
            Restore::Point((_, m)) => &m.id,
            Restore::Snapshot((_, m)) => &m.id,
        }
    }
}

/// Loads a snapshot's device state into a QEMU started with `-incoming
/// defer` (its RAM is already mapped from the snapshot's file).
async fn restore_state(
    qmp_sock: &Path,
    dir: &Path,
    vmstate: &Path,
    ignore_shared: bool,
) -> Result<()> {
    qmp::execute(
        qmp_sock,
        "migrate-set-capabilities",
        Some(serde_json::json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": ignore_shared}
        ]})),
    )
    .await?;
    let _ = dir;
    // The state travels over a socket pair whose far end QEMU receives
    // over QMP: QEMU (an unprivileged uid by now) opens no path of ours.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| Error::internal(format!("socket pair: {e}")))?;
    qmp::execute_with_fd(
        qmp_sock,
        std::os::fd::OwnedFd::from(theirs),
        "restore",
        "migrate-incoming",
        Some(serde_json::json!({ "uri": "fd:restore" })),
    )
    .await?;
    ours.set_nonblocking(true)
        .map_err(|e| Error::internal(format!("socket pair: {e}")))?;
    let mut stream = tokio::net::UnixStream::from_std(ours)
        .map_err(|e| Error::internal(format!("socket pair: {e}")))?;
    let mut state = tokio::fs::File::open(vmstate)
        .await
        .map_err(|e| Error::internal(format!("opening {}: {e}", vmstate.display())))?;
    tokio::io::copy(&mut state, &mut stream)
        .await
        .map_err(|e| Error::internal(format!("sending the snapshot state: {e}")))?;
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = qmp::execute(qmp_sock, "query-status", None).await?;
        match st.get("status").and_then(serde_json::Value::as_str) {
            Some("inmigrate") if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Some("paused") | Some("prelaunch") | Some("running") => break,
            other => {
                let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
                return Err(Error::internal(format!(
                    "restoring the snapshot failed (QEMU status {other:?}): {}",
                    log.trim()
                )));
            }
        }
    }
    Ok(())
}

/// Starts QEMU (paused, or waiting for an incoming migration) in its own
/// process group, its stderr in
/// `qemu.log`; returns its pid once QMP listens. QEMU is not killed
/// when the server goes (VMs outlive restarts); tokio reaps it.
pub(super) async fn launch(qemu: &Path, l: &Launch<'_>) -> Result<(i32, tokio::process::Child)> {
    let mut append = String::from(super::KERNEL_ARGS);
    if l.accel == Accel::Tcg {
        append.push(' ');
        append.push_str(super::TCG_ARGS);
    }
    if l.disk.is_some() {
        append.push_str(" stacyvm.root=vda");
    }
    if !l.volumes.is_empty() {
        append.push(' ');
        append.push_str(&super::volumes_arg(l.volumes)?);
    }
    append.push_str(&format!(
        " stacyvm.hostname={} stacyvm.token={}",
        l.hostname,
        hex::encode(l.token)
    ));
    if let Some(g) = l.nic.as_ref().and_then(|n| n.boot_config) {
        append.push_str(&format!(
            " stacyvm.net={}/{},{}",
            g.address, g.prefix, g.gateway
        ));
        if !g.nameservers.is_empty() {
            append.push_str(&format!(" stacyvm.dns={}", g.nameservers.join(",")));
        }
    }
    let sock = |n: &str| l.dir.join(n).to_string_lossy().to_string();
    let mut cmd = tokio::process::Command::new(qemu);
    // Guest RAM is always the backend `mem` (a file for snapshot
    // templates and their clones, anonymous otherwise): a migration stream
    // names RAM blocks, and a sandbox snapshot's children must find the
    // block its source had.
    let machine = "microvm,rtc=on,memory-backend=mem";
    cmd.args(["-M", machine])
        .args(match l.accel {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            _ => ["-accel", "tcg", "-cpu", "max"],
        })
        .args(["-m", &l.memory_mb.to_string()])
        .args(["-smp", &l.vcpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args([
            "-sandbox",
            // QEMU installs its seccomp filter before `-runas` drops to the
            // leased uid, so set*id must stay allowed then; once dropped,
            // QEMU holds no capability to regain root with them.
            if l.runas.is_some() {
                "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
            } else {
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            },
        ])
        .arg("-kernel")
        .arg(&l.assets.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&l.assets.initrd)
        .args(["-append", &append])
        .args([
            "-chardev",
            &format!(
                "socket,id=con,path={},server=on,wait=off",
                sock("console.sock")
            ),
            "-serial",
            "chardev:con",
        ])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", sock("qmp.sock")),
        ])
        .args(["-device", "virtio-serial-device"])
        .args([
            "-chardev",
            &format!(
                "socket,id=agent,path={},server=on,wait=off",
                sock("agent.sock")
            ),
            "-device",
            &format!("virtserialport,chardev=agent,name={}", super::AGENT_PORT),
        ])
        .args(["-device", "virtio-rng-device"]);
    if let Some(u) = l.runas {
        cmd.args(["-runas", &format!("{u}:{u}")]);
    }
    if l.incoming {
        cmd.args(["-incoming", "defer"]);
    } else {
        cmd.arg("-S");
    }
    match l.memory_file {
        Some((path, share)) => cmd.args([
            "-object",
            &format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
                l.memory_mb,
                path.display(),
                if share { "on" } else { "off" }
            ),
        ]),
        None => cmd.args([
            "-object",
            &format!("memory-backend-ram,id=mem,size={}M", l.memory_mb),
        ]),
    };
    if let Some(disk) = l.disk {
        cmd.args([
            "-blockdev",
            &format!(
                "driver=qcow2,node-name=root,file.driver=file,file.filename={}",
                disk.display()
            ),
            "-device",
            "virtio-blk-device,drive=root",
        ]);
    }
    for (i, v) in l.volumes.iter().enumerate() {
        if !v.device {
            return Err(Error::internal(format!(
                "volume {} was not lent as a disk",
                v.id
            )));
        }
        cmd.args([
            "-blockdev",
            &format!(
                "driver=raw,node-name=vol{i},read-only={},file.driver=file,file.filename={}",
                if v.read_only { "on" } else { "off" },
                v.host_path.display()
            ),
            "-device",
            &format!(
                "virtio-blk-device,drive=vol{i},serial={}",
                super::volume_serial(i)
            ),
        ]);
    }
    if let Some(nic) = &l.nic {
        let fd = nic
            .tap
            .try_clone()
            .map_err(|e| Error::internal(format!("duplicating the tap: {e}")))?;
        stacyvm_sandbox::procs::pass_fd(cmd.as_std_mut(), fd, TAP_FD);
        cmd.args([
            "-netdev",
            &format!("tap,id=net0,fd={TAP_FD},vhost=off"),
            "-device",
            &format!("virtio-net-device,netdev=net0,mac={}", nic.mac),
        ]);
    }
    let log = std::fs::File::create(l.dir.join("qemu.log"))
        .map_err(|e| Error::internal(format!("creating qemu.log: {e}")))?;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .process_group(0)
        .kill_on_drop(l.kill_on_drop)
        .spawn()
        .map_err(|e| Error::unavailable(format!("starting {}: {e}", qemu.display())))?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| Error::internal("QEMU exited at once"))?;
    let qmp = l.dir.join("qmp.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let err = std::fs::read_to_string(l.dir.join("qemu.log")).unwrap_or_default();
            return Err(start_error(&status.to_string(), err.trim()));
        }
        if tokio::net::UnixStream::connect(&qmp).await.is_ok() {
            return Ok((pid, child));
        }
        if Instant::now() >= deadline {
            let _ = child.start_kill();
            return Err(Error::internal(
                "QEMU did not open its QMP socket within 30 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The typed error of a QEMU that exited during start.
fn start_error(status: &str, err: &str) -> Error {
    if err.contains("failed to initialize kvm") || err.contains("Could not access KVM") {
        Error::unavailable(format!("QEMU cannot use KVM: {err}"))
    } else if err.contains("cannot set up guest memory") {
        Error::limit(format!("QEMU cannot allocate the guest's memory: {err}"))
    } else {
        Error::internal(format!("QEMU failed to start ({status}): {err}"))
    }
}

/// One VM to start.
pub(super) struct Launch<'a> {
    pub(super) dir: &'a Path,
    pub(super) assets: &'a Assets,
    pub(super) accel: Accel,
    /// The writable root disk (qcow2); `None` boots the initramfs alone.
    pub(super) disk: Option<&'a Path>,
    pub(super) memory_mb: i64,
    pub(super) vcpus: i64,
    pub(super) hostname: &'a str,
    pub(super) token: &'a [u8],
    /// Guest RAM in this file (`share`: writes go to the file, a
    /// snapshot's template; else copy-on-write of it, a restored clone).
    pub(super) memory_file: Option<(&'a Path, bool)>,
    /// Wait for an incoming migration (a restore) instead of booting.
    pub(super) incoming: bool,
    /// Kill QEMU when the returned child is dropped (snapshot templates).
    pub(super) kill_on_drop: bool,
    /// The uid (= gid) QEMU drops to once set up (`-runas`).
    pub(super) runas: Option<u32>,
    /// A virtio-net NIC on this tap; `None`: no network device at all.
    pub(super) nic: Option<Nic<'a>>,
    /// Volumes attached as virtio-blk disks (`VolumeBind::device`), which
    /// the guest mounts (`stacyvm.volumes` on its command line).
    pub(super) volumes: &'a [stacyvm_core::volumes::VolumeBind],
}

/// A VM's network card.
pub(super) struct Nic<'a> {
    /// The tap's queue, handed to QEMU as an inherited descriptor.
    pub(super) tap: &'a std::os::fd::OwnedFd,
    pub(super) mac: String,
    /// Put on the kernel command line for a booting guest (a restored
    /// clone is configured by `Reidentify` instead; a snapshot template
    /// leaves `eth0` down).
    pub(super) boot_config: Option<&'a stacyvm_agent_proto::GuestNet>,
}

/// The descriptor number a VM's tap has in QEMU.
const TAP_FD: i32 = 3;

/// Connects to the agent's port until it answers the handshake, QEMU
/// dies, or `timeout` passes. QEMU holds the host's bytes until the guest
/// opens the port, so each attempt waits up to the client's handshake
/// timeout.
pub(super) async fn wait_agent(
    sock: &Path,
    token: &[u8],
    timeout: Duration,
    qemu: &Identity,
) -> Result<Arc<AgentClient>> {
    let deadline = Instant::now() + timeout;
    loop {
        if !qemu.alive() {
            return Err(Error::internal(
                "QEMU exited before the guest agent answered",
            ));
        }
        if Instant::now() >= deadline {
            return Err(Error::unavailable(format!(
                "the guest agent did not answer within {timeout:?}"
            )));
        }
        match tokio::net::UnixStream::connect(sock).await {
            Ok(stream) => {
                // Short attempts: right after another host connection
                // closed, the guest's previous session may swallow this
                // one's hello before it notices; the next attempt lands.
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_secs(3));
                if let Ok(Ok(c)) =
                    tokio::time::timeout(left, AgentClient::handshake(stream, Some(token))).await
                {
                    return Ok(c);
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Copies the serial console into `console.log` (rotated at
/// [`CONSOLE_CAP`] to `console.log.1`) until QEMU closes it.
fn spawn_console_reader(dir: PathBuf) {
    tokio::spawn(async move {
        let Ok(mut s) = tokio::net::UnixStream::connect(dir.join("console.sock")).await else {
            return;
        };
        let log = dir.join("console.log");
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            if size + n as u64 > CONSOLE_CAP {
                let _ = std::fs::rename(&log, dir.join("console.log.1"));
            }
            let Ok(mut f) = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .await
            else {
                return;
            };
            if f.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
}

fn console_tail(dir: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[async_trait]
impl Provider for QemuProvider {
    fn name(&self) -> &str {
        "qemu"
    }

    fn adopts_unknown_runtimes(&self) -> bool {
        false
    }

    fn capabilities(&self) -> Vec<String> {
        let mut c: Vec<String> = capability::BASE.iter().map(|s| (*s).to_string()).collect();
        c.push(capability::RUNTIME_INVENTORY.into());
        if self.cgroups.is_some() {
            c.push(capability::STATS.into());
        }
        c.push(capability::EXEC_INTERACTIVE.into());
        c.push(capability::PTY.into());
        c.push(capability::WATCH.into());
        c.push(capability::EXEC_USER.into());
        c.push(capability::PAUSE.into());
        c.push(capability::EGRESS.into());
        if self.opts.snapshots {
            c.push(capability::SNAPSHOTS.into());
        }
        c.push(capability::SANDBOX_SNAPSHOTS.into());
        c.push(capability::BLOCK_VOLUMES.into());
        if nix::unistd::geteuid().is_root() {
            // The commit unpacks the guest's root with its owners.
            c.push(capability::IMAGE_BUILD.into());
        }
        c.push("microvm".into());
        c
    }

    async fn cached_image(
        &self,
        plan: &stacyvm_core::provider::ImageBuild,
    ) -> Result<Option<stacyvm_core::provider::BuiltImage>> {
        let (base, _, _) = self.image_source(&plan.base_image)?;
        super::build::cached(&self.images, &base, plan)
    }

    async fn commit_image(
        &self,
        id: &str,
        plan: &stacyvm_core::provider::ImageBuild,
    ) -> Result<stacyvm_core::provider::BuiltImage> {
        let (base, _, _) = self.image_source(&plan.base_image)?;
        super::build::commit(
            self.io(id).await?,
            (self.images.clone(), "qemu", self.opts.agent_path.clone()),
            &base,
            plan,
        )
        .await
    }

    async fn snapshots(&self) -> Result<Vec<stacyvm_api::SnapshotSummary>> {
        let cache = self.opts.cache.clone();
        let list = tokio::task::spawn_blocking(move || snapshot::list(&cache))
            .await
            .map_err(|e| Error::internal(format!("snapshot listing task: {e}")))?;
        Ok(list
            .into_iter()
            .map(|m| stacyvm_api::SnapshotSummary {
                image: m.image,
                provider: "qemu".into(),
                created_at: m.created_at,
                id: m.id,
                memory_mb: m.memory_mb,
                vcpus: m.vcpus,
                size_bytes: m.size_bytes,
                ..Default::default()
            })
            .collect())
    }

    async fn snapshot_sandbox(&self, id: &str, snapshot_id: &str) -> Result<SandboxSnapshot> {
        let meta = self.meta(id)?;
        if !meta.alive() {
            return Err(Error::sandbox_not_found(id));
        }
        let base = match &meta.base {
            Some(b) => b.clone(),
            // Recorded since sandbox snapshots exist; older VMs: find it.
            None => {
                let (_, key, src) = self.image_source(&meta.image)?;
                self.disks.get(&key, &src, self.opts.disk_mb).await?
            }
        };
        let qemu_img = self
            .qemu
            .as_ref()
            .and_then(|q| q.parent().map(|d| d.join("qemu-img")))
            .filter(|p| p.is_file())
            .or_else(|| resolve_binary("qemu-img"))
            .ok_or_else(|| {
                Error::unavailable("qemu-img not found (Debian: apt-get install qemu-utils)")
            })?;
        {
            let mut f = self.freezing.lock().map_err(|_| Error::internal("lock"))?;
            if !f.insert(id.to_string()) {
                return Err(Error::conflict(format!(
                    "sandbox {id} is being snapshotted already"
                )));
            }
        }
        // The frozen agent must be waiting for a new host, not inside a
        // session no child could finish (what snapshot templates do too):
        // close this server's connection and let the agent see it. Until
        // the snapshot is done, requests wait on the reconnect lock.
        let lock = self.conns.connect_lock(id)?;
        let _reconnect = lock.lock().await;
        if let Some(c) = self.conns.take(id) {
            c.close().await;
        }
        tokio::time::sleep(snapshot::SETTLE).await;
        let src = usersnap::Source {
            id,
            dir: &self.dir(id),
            image: &meta.image,
            memory_mb: meta.memory_mb,
            vcpus: meta.vcpus,
            accel: &meta.accel,
            networked: meta.net.is_some(),
            token: &meta.token,
            base: &base,
            qemu_img: &qemu_img,
        };
        let res = usersnap::create(&self.user_snapshots(), snapshot_id, &src).await;
        if let Ok(mut f) = self.freezing.lock() {
            f.remove(id);
        }
        let m = res?;
        info!(
            sandbox_id = id,
            snapshot = snapshot_id,
            bytes = m.size_bytes,
            "qemu sandbox snapshot taken"
        );
        Ok(SandboxSnapshot {
            size_bytes: m.size_bytes,
            network_mode: if m.networked { "bridge" } else { "none" }.into(),
        })
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        let root = self.user_snapshots();
        let id = snapshot_id.to_string();
        tokio::task::spawn_blocking(move || usersnap::remove(&root, &id))
            .await
            .map_err(|e| Error::internal(format!("snapshot removal task: {e}")))?
    }

    fn profile(&self) -> Profile {
        Profile {
            isolation: Isolation::MicroVm,
            network_modes: vec!["none".into(), "bridge".into()],
            default_network: self.opts.network_mode.clone(),
        }
    }

    fn describe(&self) -> BTreeMap<String, String> {
        let accel = self
            .accel
            .try_lock()
            .ok()
            .and_then(|a| a.as_ref().map(|(_, why)| why.clone()))
            .unwrap_or_else(|| {
                format!("{} (decided at the first spawn)", self.opts.accel.as_str())
            });
        BTreeMap::from([
            ("type".to_string(), "qemu".to_string()),
            (
                "qemu".to_string(),
                self.qemu
                    .as_ref()
                    .map_or_else(|| "not found".into(), |p| p.display().to_string()),
            ),
            ("accel".to_string(), accel),
            ("machine".to_string(), "microvm".to_string()),
            (
                "kernel_package".to_string(),
                self.opts.kernel_package.clone(),
            ),
            (
                "cache_dir".to_string(),
                self.opts.cache.display().to_string(),
            ),
            (
                "state_dir".to_string(),
                self.opts.base.display().to_string(),
            ),
            (
                "agent_path".to_string(),
                self.opts.agent_path.display().to_string(),
            ),
            ("images".to_string(), self.images.names()[1..].join(",")),
            ("isolation".to_string(), "microvm".to_string()),
        ])
    }

    async fn health(&self) -> Result<()> {
        self.qemu_path()?;
        if crate::agent::elf_is_static(&self.opts.agent_path) != Some(true) {
            return Err(Error::unavailable(format!(
                "agent {} is missing or not a static binary (it is the guest's init); build one with scripts/build-agent or set STACYVM_AGENT_PATH",
                self.opts.agent_path.display()
            )));
        }
        if let Accel::Kvm = self.opts.accel {
            super::kvm_usable().map_err(|why| {
                Error::unavailable(format!("providers.qemu.accel is kvm but {why}"))
            })?;
        }
        Ok(())
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned> {
        self.validate(spec)?;
        {
            let mut starting = self.starting.lock().map_err(|_| Error::internal("lock"))?;
            let max = self.opts.max_sandboxes;
            if max > 0 && self.live_count() + *starting >= max {
                return Err(Error::limit(format!(
                    "qemu sandboxes: max sandboxes reached ({max}, providers.qemu.max_sandboxes)"
                )));
            }
            *starting += 1;
        }
        let res = self.spawn_counted(spec).await;
        if let Ok(mut s) = self.starting.lock() {
            *s = s.saturating_sub(1);
        }
        res
    }

    async fn io(&self, id: &str) -> Result<Arc<dyn SandboxIo>> {
        Ok(Arc::new(AgentSession::new(id, self.client(id).await?)))
    }

    async fn exec(&self, id: &str, spec: &ExecSpec, sink: OutputSink) -> Result<ExitStatus> {
        self.io(id)
            .await?
            .exec(
                &crate::agent::session::capped(spec, self.opts.exec_timeout),
                sink,
            )
            .await
    }

    async fn exec_interactive(
        &self,
        id: &str,
        spec: &ExecSpec,
        sink: OutputSink,
        input: tokio::sync::mpsc::Receiver<ExecInput>,
    ) -> Result<ExitStatus> {
        self.io(id)
            .await?
            .exec_interactive(
                &crate::agent::session::capped(spec, self.opts.exec_timeout),
                sink,
                input,
            )
            .await
    }

    async fn status(&self, id: &str) -> Result<RuntimeStatus> {
        // A stopped guest's agent cannot answer a ping: ask QEMU first.
        if let Ok(meta) = self.meta(id) {
            if meta.alive() && self.vm_paused(id).await {
                return Ok(RuntimeStatus {
                    state: "paused".into(),
                });
            }
        }
        crate::agent::conns::ping_status(id, self.client(id).await).await
    }

    /// QMP `stop`: the guest's vCPUs halt where they stand, its memory
    /// kept; the agent answers nothing until `cont`.
    async fn set_egress(
        &self,
        runtime_id: &str,
        rules: Option<&stacyvm_core::egress::EgressRules>,
    ) -> Result<()> {
        let meta = self.meta(runtime_id)?;
        self.bridge.set_egress_of(meta.net.as_ref(), rules).await
    }

    async fn egress_denials(&self, runtime_id: &str) -> Result<Vec<stacyvm_api::EgressDenial>> {
        let meta = self.meta(runtime_id)?;
        Ok(self.bridge.egress_denials_of(meta.net.as_ref()).await)
    }

    async fn pause(&self, id: &str) -> Result<()> {
        self.vm_control(id, "stop").await
    }

    /// QMP `cont`, then the guest's wall clock is set to the host's (it
    /// stood still while the VM was stopped).
    async fn resume(&self, id: &str) -> Result<()> {
        self.vm_control(id, "cont").await?;
        self.client(id).await?.resync_clock(id).await;
        Ok(())
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        if !paths::is_sandbox_id(id) {
            return Ok(());
        }
        let meta = self.meta(id).ok();
        if meta.is_none() && std::fs::symlink_metadata(self.dir(id)).is_err() {
            return Ok(());
        }
        self.teardown(id, meta).await;
        Ok(())
    }

    async fn stats(&self, id: &str) -> Result<Stats> {
        let meta = self.meta(id)?;
        if !meta.alive() {
            return Err(Error::sandbox_not_found(id));
        }
        if meta.cgroups.is_empty() {
            return Err(Error::unsupported(
                "qemu: stats need cgroups (this server has none it may create)",
            ));
        }
        Ok(crate::native::cgroup_stats(&meta.cgroups, meta.memory_mb).await)
    }

    /// The guest's serial console (kernel messages and the agent's).
    async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>> {
        self.meta(id)?;
        let dir = self.dir(id);
        let mut text = tokio::fs::read_to_string(dir.join("console.log.1"))
            .await
            .unwrap_or_default();
        text.push_str(
            &tokio::fs::read_to_string(dir.join("console.log"))
                .await
                .unwrap_or_default(),
        );
        let all: Vec<String> = text
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        let skip = all.len().saturating_sub(lines);
        Ok(all.into_iter().skip(skip).collect())
    }

    async fn list_runtimes(&self) -> Result<Vec<RuntimeInfo>> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.opts.base) else {
            return Ok(out);
        };
        for e in rd.flatten() {
            let Some(meta) = read_meta(&e.path()) else {
                continue;
            };
            let state = if meta.alive() { "running" } else { "destroyed" };
            out.push(RuntimeInfo {
                sandbox_id: meta.id,
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
