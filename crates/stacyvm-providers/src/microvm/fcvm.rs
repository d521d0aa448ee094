//! The `firecracker` provider: each sandbox is a Firecracker microVM with
//! the guest kernel at `providers.firecracker.kernel_path` (an
//! uncompressed `vmlinux`), the initramfs the `qemu` provider builds (the
//! static agent as init, the virtio modules of the Debian kernel), and a
//! raw copy of the image's ext4 root disk. The agent is reached over
//! Firecracker's hybrid vsock (`stacyvm.transport=vsock`).
//!
//! Per sandbox (`<base>/<id>/`, 0700, Firecracker's working directory):
//! - `meta.json` — pid identity, token, uid, cgroups, snapshot;
//! - `disk.raw` — the VM's own root disk: a sparse copy (reflinked where
//!   the filesystem can) of the image's ext4, or of a restore point's disk;
//! - `api.sock` (Firecracker's API), `vsock.sock` (the hybrid vsock; the
//!   agent listens on guest port 1024), `firecracker.log`.
//!
//! Drive and vsock paths are given to Firecracker relative to its working
//! directory, so a restore point (`PUT /snapshot/create`, recording those
//! paths) loads in any VM directory with that VM's own disk and socket
//! (`PUT /snapshot/load`, memory mapped privately from the snapshot's
//! file: clones share the pages they have not written).
//!
//! Firecracker runs as a leased unprivileged uid (with `/dev/kvm`'s group)
//! when the server is root; the VM directory, its disk, and the kernel and
//! initramfs (hard-linked or copied when not world-readable) are its own.
//! The guest has no serial port (`8250.nr_uarts=0`): nothing a guest
//! writes can fill the host's disk; `logs` is Firecracker's own log.
//!
//! No Firecracker binary runs on this project's CI hosts (no KVM that
//! boots guests, see `doctor`): the API sequences are tested against the
//! recording fake of `firecracker.rs`, the process handling with a fake
//! VMM, and the conformance suite runs here automatically where a
//! `firecracker` binary and a KVM that boots guests exist.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use stacyvm_core::provider::{
    capability, ExecInput, ExecSpec, ExitStatus, Isolation, OutputSink, Profile, Provider,
    RuntimeInfo, RuntimeStatus, SandboxIo, SpawnSpec, Spawned, Stats,
};
use stacyvm_core::{paths, Error, Result};
use stacyvm_sandbox::cgroup::{self, Layout, Limits};
use stacyvm_sandbox::procs::Identity;
use tracing::{info, warn};

use super::firecracker::{vsock_connect, FcApi, VmConfig};
use super::kernel;
use super::qemu::{host_memory_mb, LeaseGuard};
use super::rootfs::RootfsCache;
use super::usersnap::copy_sparse;
use crate::agent::{AgentClient, AgentSession};
use crate::image::store as images;
use crate::native::{ids, net};

/// The guest vsock port the agent listens on.
const AGENT_PORT: u32 = super::AGENT_VSOCK_PORT;
/// Every VM has its own vsock device: the same CID in each is fine.
const GUEST_CID: u32 = 3;
const MIN_MEMORY_MB: i64 = 96;
const VMM_OVERHEAD_MB: u64 = 64;
/// Kernel command line of Firecracker guests: no serial port at all.
const FC_KERNEL_ARGS: &str =
    "quiet panic=-1 reboot=k pci=off 8250.nr_uarts=0 stacyvm.transport=vsock stacyvm.root=vda";

/// Settings of the firecracker provider (`providers.firecracker.*`).
#[derive(Debug, Clone)]
pub struct FirecrackerOptions {
    /// Per-sandbox state.
    pub base: PathBuf,
    /// The microVM cache shared with qemu (initramfs, root disks) and
    /// this provider's restore points (`fc-snapshots/`).
    pub cache: PathBuf,
    pub images_dir: PathBuf,
    pub hidden: Vec<String>,
    pub agent_path: PathBuf,
    /// `firecracker` (a name looked up in PATH, or a path).
    pub firecracker_binary: String,
    /// Firecracker's `jailer`: when set, every VMM starts through it
    /// (chroot in the VM directory, its own uid, /dev nodes of its own).
    pub jailer: Option<PathBuf>,
    /// Uncompressed `vmlinux` (Firecracker boots no bzImage on x86_64).
    pub kernel_path: PathBuf,
    /// The Debian kernel package whose modules the initramfs carries.
    pub kernel_package: String,
    /// Used for spawns that name no image or `host`.
    pub default_image: String,
    pub max_sandboxes: usize,
    pub max_memory_mb: i64,
    pub max_vcpus: u32,
    pub disk_mb: u64,
    pub boot_timeout: Duration,
    pub exec_timeout: Duration,
    /// Restore points (built after the first boot of a shape).
    pub snapshots: bool,
    pub subordinate_ids: ids::IdRange,
    /// The native bridge `bridge` spawns join (its egress rules, per-tap
    /// anti-spoofing pins).
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
    pid: i32,
    start_time: u64,
    boot_id: String,
    #[serde(default)]
    cgroups: Vec<PathBuf>,
    token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    /// The VM's tap on the bridge (persistent, owned by the VMM's uid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    net: Option<net::Attachment>,
}

impl Meta {
    fn vmm(&self) -> Identity {
        Identity {
            pid: self.pid,
            start_time: self.start_time,
            boot_id: self.boot_id.clone(),
        }
    }
}

/// A restore point (`cache/fc-snapshots/<key>/meta.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FcSnapMeta {
    pub id: String,
    pub image: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    pub token: String,
    pub created_at: DateTime<Utc>,
}

fn read_meta(dir: &Path) -> Option<Meta> {
    serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()
}

/// Kills the VMM (if it is still the recorded process), waits for it,
/// removes the cgroups and the state dir, releases the uid.
fn teardown_blocking(dir: &Path, meta: Option<&Meta>) {
    if let Some(m) = meta {
        let v = m.vmm();
        v.kill();
        let until = Instant::now() + Duration::from_secs(5);
        while v.alive() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        if !m.cgroups.is_empty() {
            cgroup::destroy(&m.cgroups);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    // A jailer on a cgroup v1 host makes `firecracker/<id>` in each
    // hierarchy and removes nothing (empty once the VMM is gone).
    if let Some(m) = meta {
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let _ = std::fs::remove_dir(h.path().join("firecracker").join(&m.id));
            }
        }
    }
    if let Some(uid) = meta.and_then(|m| m.uid) {
        ids::release_lease(uid);
    }
    // The tap is persistent: release deletes it with its pins and lease.
    if let Some(att) = meta.and_then(|m| m.net.as_ref()) {
        net::release(att);
    }
}

/// Releases a bridge attachment when dropped, unless taken (recorded in
/// `meta.json`; teardown releases it from there).
struct TapGuard(Option<net::Attachment>);

impl Drop for TapGuard {
    fn drop(&mut self) {
        if let Some(att) = self.0.take() {
            net::release(&att);
        }
    }
}

/// Whether `path` is an uncompressed ELF kernel (what Firecracker boots),
/// or why not.
pub fn check_vmlinux(path: &Path) -> std::result::Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if &magic == b"\x7fELF" {
        return Ok(());
    }
    // A bzImage has "HdrS" at 0x202 (the x86 boot protocol header).
    let mut hdr = [0u8; 4];
    let bz =
        f.seek(SeekFrom::Start(0x202)).is_ok() && f.read_exact(&mut hdr).is_ok() && &hdr == b"HdrS";
    Err(if bz {
        format!(
            "{} is a compressed bzImage; Firecracker boots an uncompressed vmlinux (extract it with the kernel's scripts/extract-vmlinux)",
            path.display()
        )
    } else {
        format!("{} is not an ELF kernel image", path.display())
    })
}

/// The group `/dev/kvm` belongs to (Firecracker needs it as its gid).
fn kvm_gid() -> Option<u32> {
    std::fs::metadata("/dev/kvm").ok().map(|m| m.gid())
}

/// Puts `file` into the VM directory `dir` as `name` for the VMM, which
/// only ever opens paths relative to its working directory (it may not
/// traverse the server's private directories): a hard link when its mode
/// lets every user read it, else a copy owned by the VMM's `uid`. Returns
/// the name to give Firecracker.
fn give(file: &Path, dir: &Path, name: &str, uid: Option<u32>) -> Result<PathBuf> {
    let target = dir.join(name);
    let readable = std::fs::metadata(file)
        .map(|m| m.permissions().mode() & 0o004 != 0)
        .unwrap_or(false);
    if !(readable && std::fs::hard_link(file, &target).is_ok()) {
        std::fs::copy(file, &target)
            .map_err(|e| Error::internal(format!("copying {}: {e}", file.display())))?;
        if let Some(uid) = uid {
            std::os::unix::fs::chown(&target, Some(uid), None)
                .map_err(|e| Error::internal(format!("chown {}: {e}", target.display())))?;
        }
    }
    Ok(PathBuf::from(name))
}

#[derive(Debug)]
pub struct FirecrackerProvider {
    opts: FirecrackerOptions,
    binary: Option<PathBuf>,
    images: Arc<images::ImageStore>,
    disks: RootfsCache,
    cgroups: Option<Layout>,
    initrd: tokio::sync::Mutex<Option<PathBuf>>,
    conns: crate::agent::Connections,
    starting: Mutex<usize>,
    building: Arc<Mutex<std::collections::HashSet<String>>>,
    ids: Option<Arc<ids::IdAllocator>>,
    bridge: Arc<net::Bridge>,
}

impl FirecrackerProvider {
    pub fn new(opts: FirecrackerOptions) -> Result<Self> {
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
            binary: stacyvm_core::checks::which(&opts.firecracker_binary),
            disks: RootfsCache::new(&opts.cache),
            images,
            cgroups,
            initrd: tokio::sync::Mutex::new(None),
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
        Ok(p)
    }

    /// Removes what VMs that died while no server ran left behind.
    fn sweep(&self) {
        let Ok(rd) = std::fs::read_dir(&self.opts.base) else {
            return;
        };
        for e in rd.flatten() {
            let meta = read_meta(&e.path());
            if !meta.as_ref().is_some_and(|m| m.vmm().alive()) {
                teardown_blocking(&e.path(), meta.as_ref());
            }
        }
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

    fn binary(&self) -> Result<&Path> {
        self.binary.as_deref().ok_or_else(|| {
            Error::unavailable(format!(
                "{} not found; install Firecracker and set providers.firecracker.firecracker_path",
                self.opts.firecracker_binary
            ))
        })
    }

    /// The jailer, when configured (it needs a root server).
    fn jailer(&self) -> Result<Option<&Path>> {
        match &self.opts.jailer {
            None => Ok(None),
            Some(j) if !nix::unistd::geteuid().is_root() => Err(Error::unavailable(format!(
                "providers.firecracker.jailer_path ({}) needs a server running as root",
                j.display()
            ))),
            Some(j) => Ok(Some(j.as_path())),
        }
    }

    /// The initramfs (the agent and the Debian kernel's modules).
    async fn initrd(&self) -> Result<PathBuf> {
        let mut slot = self.initrd.lock().await;
        if let Some(i) = slot.as_ref() {
            return Ok(i.clone());
        }
        let (cache, package, agent) = (
            self.opts.cache.clone(),
            self.opts.kernel_package.clone(),
            self.opts.agent_path.clone(),
        );
        let i = tokio::task::spawn_blocking(move || -> Result<PathBuf> {
            let k = kernel::install(&cache, &package)?;
            kernel::initramfs_for(&cache, &agent, &k)
        })
        .await
        .map_err(|e| Error::internal(format!("initramfs task: {e}")))??;
        *slot = Some(i.clone());
        Ok(i)
    }

    fn validate(&self, spec: &SpawnSpec) -> Result<()> {
        if !paths::is_sandbox_id(&spec.id) {
            return Err(Error::invalid(format!("bad sandbox id {:?}", spec.id)));
        }
        if spec.memory_mb < MIN_MEMORY_MB {
            return Err(Error::invalid(format!(
                "memory_mb {} is below the firecracker provider's minimum of {MIN_MEMORY_MB}",
                spec.memory_mb
            )));
        }
        if self.opts.max_memory_mb > 0 && spec.memory_mb > self.opts.max_memory_mb {
            return Err(Error::invalid(format!(
                "memory_mb {} exceeds providers.firecracker.max_memory_mb ({})",
                spec.memory_mb, self.opts.max_memory_mb
            )));
        }
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as i64);
        let max = i64::from(self.opts.max_vcpus.clamp(1, 32)).min(host_cpus);
        if spec.vcpus < 1 || spec.vcpus > max {
            return Err(Error::invalid(format!(
                "vcpus {} must be between 1 and {max} (providers.firecracker.max_vcpus, this host's CPUs)",
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
        if spec.snapshot.is_some() {
            return Err(Error::unsupported(
                "the firecracker provider does not snapshot sandboxes yet (the qemu provider does)",
            ));
        }
        match spec.network_mode.as_str() {
            "" | "none" | "bridge" => Ok(()),
            other => Err(Error::invalid(format!(
                "unsupported network_mode {other:?} for the firecracker provider (allowed: none, bridge)"
            ))),
        }
    }

    /// The image a spawn gets, its content key and its root directory.
    fn image_source(&self, image: &str) -> Result<(String, String, PathBuf)> {
        let image = if (image.is_empty() || image == "host") && !self.opts.default_image.is_empty()
        {
            self.opts.default_image.as_str()
        } else {
            image
        };
        if image.is_empty() || image == "host" {
            return Err(Error::invalid(
                "image \"host\" is not available to the firecracker provider; set providers.firecracker.default_rootfs or use an imported image (`stacyvm image import`)",
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
            .single_dir(&rec, "firecracker", &self.opts.agent_path)?;
        Ok((image.to_string(), key, dir))
    }

    fn snapshot_root(&self) -> PathBuf {
        self.opts.cache.join("fc-snapshots")
    }

    /// The restore point of a shape, when complete.
    fn find_snapshot(&self, key: &str) -> Option<(PathBuf, FcSnapMeta)> {
        let dir = self.snapshot_root().join(key);
        let m: FcSnapMeta =
            serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
        ["vmstate", "mem", "disk.raw"]
            .iter()
            .all(|f| dir.join(f).is_file())
            .then_some((dir, m))
    }

    async fn client(&self, id: &str) -> Result<Arc<AgentClient>> {
        self.conns
            .get_or_connect(id, || async {
                let meta = self.meta(id)?;
                if !meta.vmm().alive() {
                    return Err(Error::sandbox_not_found(id));
                }
                let token = hex::decode(&meta.token).unwrap_or_default();
                let root = vmm_root(
                    &self.dir(id),
                    self.binary()?,
                    id,
                    self.opts.jailer.is_some(),
                )?;
                wait_agent(
                    &root.join("vsock.sock"),
                    &token,
                    Duration::from_secs(30),
                    &meta.vmm(),
                )
                .await
            })
            .await
    }

    async fn teardown(&self, id: &str, meta: Option<Meta>) {
        self.conns.forget(id);
        let dir = self.dir(id);
        let _ = tokio::task::spawn_blocking(move || teardown_blocking(&dir, meta.as_ref())).await;
    }

    async fn spawn_counted(&self, spec: &SpawnSpec) -> Result<Spawned> {
        let (image, key, src) = self.image_source(&spec.image)?;
        check_vmlinux(&self.opts.kernel_path).map_err(Error::unavailable)?;
        let initrd = self.initrd().await?;
        let base = self.disks.get(&key, &src, self.opts.disk_mb).await?;
        let snap_key = fc_snapshot_key(
            &key,
            spec.memory_mb,
            spec.vcpus,
            &initrd,
            &self.opts.kernel_path,
        );
        // Networked VMs boot: a restore point records its tap's name, and
        // renaming it per clone needs `network_overrides`, which older
        // Firecracker releases lack.
        let networked = spec.network_mode == "bridge";
        let snap = if self.opts.snapshots && !networked {
            self.find_snapshot(&snap_key)
        } else {
            None
        };
        let res = self.spawn_from(spec, &initrd, &base, snap.as_ref()).await;
        let res = match (res, &snap) {
            (Err(e), Some((dir, m))) => {
                warn!(snapshot = %m.id, error = %e, "restoring a firecracker snapshot failed; removing it and booting");
                let _ = std::fs::remove_dir_all(dir);
                self.spawn_from(spec, &initrd, &base, None).await
            }
            (res, _) => res,
        };
        if res.is_ok() && self.opts.snapshots && snap.is_none() && !networked {
            self.build_snapshot_later(&initrd, &base, &image, &snap_key, spec);
        }
        res
    }

    async fn spawn_from(
        &self,
        spec: &SpawnSpec,
        initrd: &Path,
        base: &Path,
        snap: Option<&(PathBuf, FcSnapMeta)>,
    ) -> Result<Spawned> {
        let dir = self.dir(&spec.id);
        if std::fs::symlink_metadata(&dir).is_ok() {
            return Err(Error::conflict(format!("sandbox {} exists", spec.id)));
        }
        crate::native::create_private_dir(&dir)?;
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
            .start(spec, &dir, initrd, base, snap, uid, &mut slot)
            .await
        {
            Ok(c) => {
                self.conns.insert(&spec.id, c);
                info!(sandbox_id = %spec.id, snapshot = snap.map_or("", |(_, m)| m.id.as_str()), "firecracker sandbox started");
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

    #[allow(clippy::too_many_arguments)]
    async fn start(
        &self,
        spec: &SpawnSpec,
        dir: &Path,
        initrd: &Path,
        base: &Path,
        snap: Option<&(PathBuf, FcSnapMeta)>,
        uid: Option<u32>,
        slot: &mut Option<Meta>,
    ) -> Result<Arc<AgentClient>> {
        let binary = self.binary()?;
        let jailer = self.jailer()?;
        let root = vmm_root(dir, binary, &spec.id, jailer.is_some())?;
        let dir_for_log = dir;
        let dir = root.as_path();
        let disk_src = snap.map_or_else(|| base.to_path_buf(), |(d, _)| d.join("disk.raw"));
        copy_sparse(&disk_src, &dir.join("disk.raw")).await?;
        let token = match snap {
            Some((_, m)) => hex::decode(&m.token).map_err(|_| Error::internal("snapshot token"))?,
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        let (kernel, initrd) = prepare_dir(dir, &self.opts.kernel_path, initrd, uid)?;
        if let Some((sdir, _)) = snap {
            give(&sdir.join("vmstate"), dir, "snap.vmstate", uid)?;
            give(&sdir.join("mem"), dir, "snap.mem", uid)?;
        }
        // `bridge`: a persistent tap the VMM's uid may open, pinned to the
        // leased address; released here on failure until meta.json has it.
        let mut nic_guard = TapGuard(None);
        let nic = if spec.network_mode == "bridge" {
            let (bridge, id, owner) = (self.bridge.clone(), spec.id.clone(), uid.unwrap_or(0));
            let att = tokio::task::spawn_blocking(move || bridge.attach_owned_tap(&id, owner))
                .await
                .map_err(|e| Error::internal(format!("tap setup task: {e}")))??;
            nic_guard.0 = Some(att.clone());
            // In force before the VM sends its first packet.
            if let Some(rules) = &spec.egress {
                self.bridge.set_egress(&att, Some(rules)).await?;
            }
            let subnet = self.bridge.options().subnet;
            let dns: Vec<String> = self
                .bridge
                .resolvers()
                .iter()
                .map(ToString::to_string)
                .collect();
            let cmdline = format!(
                " stacyvm.net={}/{},{}{}",
                att.ip,
                subnet.prefix,
                subnet.gateway(),
                if dns.is_empty() {
                    String::new()
                } else {
                    format!(" stacyvm.dns={}", dns.join(","))
                }
            );
            let n = (
                super::firecracker::Nic {
                    host_dev_name: att.host_if.clone(),
                    guest_mac: net::mac_for(att.ip),
                },
                cmdline,
            );
            nic_guard.0 = Some(att);
            Some(n)
        } else {
            None
        };
        let vmm = Vmm {
            binary,
            jailer,
            log_dir: dir_for_log,
        };
        let (pid, _child) = launch(&vmm, dir, &spec.id, uid, false).await?;
        let ident =
            Identity::of(pid).ok_or_else(|| Error::internal("firecracker exited at once"))?;
        let cgroups = match &self.cgroups {
            Some(layout) => {
                let limits = Limits {
                    memory_bytes: (u64::try_from(spec.memory_mb).unwrap_or(0) + VMM_OVERHEAD_MB)
                        << 20,
                    pids: 0,
                    cpu_quota_us: u64::try_from(spec.vcpus).unwrap_or(1) * 100_000,
                };
                match cgroup::create(layout, &spec.id, limits) {
                    Ok(d) => d,
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
            pid,
            start_time: ident.start_time,
            boot_id: ident.boot_id.clone(),
            cgroups: cgroups.clone(),
            token: hex::encode(&token),
            snapshot: snap.map(|(_, m)| m.id.clone()),
            uid,
            net: nic_guard.0.take(),
        };
        *slot = Some(meta.clone());
        std::fs::write(
            dir_for_log.join("meta.json"),
            serde_json::to_vec(&meta).unwrap_or_default(),
        )
        .map_err(|e| Error::internal("recording the sandbox").with_source(e))?;
        for d in &cgroups {
            std::fs::write(d.join("cgroup.procs"), pid.to_string()).map_err(|e| {
                Error::internal(format!("moving firecracker into {}: {e}", d.display()))
            })?;
        }
        let api = FcApi::new(&dir.join("api.sock"));
        match snap {
            Some(_) => {
                api.snapshot_load(Path::new("snap.vmstate"), Path::new("snap.mem"))
                    .await?
            }
            None => {
                let mut c = vm_config(
                    spec.vcpus,
                    spec.memory_mb,
                    &kernel,
                    &initrd,
                    &spec.id,
                    &token,
                )?;
                if let Some((card, cmdline)) = nic {
                    c.nic = Some(card);
                    c.boot_args.push_str(&cmdline);
                }
                api.configure_and_start(&c).await?
            }
        }
        let client = wait_agent(
            &dir.join("vsock.sock"),
            &token,
            self.opts.boot_timeout,
            &ident,
        )
        .await
        .map_err(|e| {
            let log = log_tail(dir_for_log, 10);
            if log.is_empty() {
                e
            } else {
                Error::new(e.kind(), format!("{e}; firecracker log:\n{log}"))
            }
        })?;
        if snap.is_some() {
            client.reidentify(&spec.id, None).await?;
        }
        Ok(client)
    }

    /// Starts a background build of the restore point `key` unless one runs.
    fn build_snapshot_later(
        &self,
        initrd: &Path,
        base: &Path,
        image: &str,
        key: &str,
        spec: &SpawnSpec,
    ) {
        let Ok(binary) = self.binary().map(Path::to_path_buf) else {
            return;
        };
        if let Ok(mut b) = self.building.lock() {
            if !b.insert(key.to_string()) {
                return;
            }
        }
        let building = self.building.clone();
        let ids = self.ids.clone();
        let t = Template {
            binary,
            jailer: self.opts.jailer.clone(),
            root: self.snapshot_root(),
            kernel: self.opts.kernel_path.clone(),
            initrd: initrd.to_path_buf(),
            base: base.to_path_buf(),
            image: image.to_string(),
            key: key.to_string(),
            memory_mb: spec.memory_mb,
            vcpus: spec.vcpus,
            boot_timeout: self.opts.boot_timeout,
        };
        tokio::spawn(async move {
            let runas = ids.as_ref().and_then(|a| a.allocate(&t.root).ok());
            let _lease = LeaseGuard(runas);
            match build_snapshot(&t, runas).await {
                Ok(m) => info!(snapshot = %m.id, "firecracker restore point ready"),
                Err(e) => {
                    warn!(snapshot = %t.key, error = %e, "building a firecracker restore point failed")
                }
            }
            if let Ok(mut b) = building.lock() {
                b.remove(&t.key);
            }
        });
    }
}

/// The restore-point key of a shape: image, memory, vCPUs, initramfs and
/// kernel (a new agent or kernel makes new ones).
pub fn fc_snapshot_key(
    image_key: &str,
    memory_mb: i64,
    vcpus: i64,
    initrd: &Path,
    kernel: &Path,
) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(initrd.to_string_lossy().as_bytes());
    h.update([0]);
    h.update(kernel.to_string_lossy().as_bytes());
    if let Ok(m) = std::fs::metadata(kernel) {
        h.update(m.len().to_le_bytes());
        h.update(m.mtime().to_le_bytes());
    }
    let short = &image_key[..image_key.len().min(16)];
    format!(
        "{short}-{memory_mb}m-{vcpus}c-{}-fc",
        &hex::encode(h.finalize())[..12]
    )
}

/// The boot configuration of a VM: drive and vsock relative to its
/// directory (see the module docs), our kernel command line.
fn vm_config(
    vcpus: i64,
    memory_mb: i64,
    kernel: &Path,
    initrd: &Path,
    hostname: &str,
    token: &[u8],
) -> Result<VmConfig> {
    Ok(VmConfig {
        vcpus: u8::try_from(vcpus).map_err(|_| Error::invalid("too many vCPUs"))?,
        memory_mib: u32::try_from(memory_mb).map_err(|_| Error::invalid("bad memory size"))?,
        kernel: kernel.to_path_buf(),
        initrd: initrd.to_path_buf(),
        boot_args: format!(
            "{FC_KERNEL_ARGS} stacyvm.hostname={hostname} stacyvm.token={}",
            hex::encode(token)
        ),
        rootfs: PathBuf::from("disk.raw"),
        vsock_uds: PathBuf::from("vsock.sock"),
        guest_cid: GUEST_CID,
        nic: None,
    })
}

/// Gives the VMM's uid its directory, disk, kernel and initramfs; returns
/// the kernel and initramfs paths it opens.
fn prepare_dir(
    dir: &Path,
    kernel: &Path,
    initrd: &Path,
    uid: Option<u32>,
) -> Result<(PathBuf, PathBuf)> {
    if let Some(u) = uid {
        for p in [dir.to_path_buf(), dir.join("disk.raw")] {
            std::os::unix::fs::chown(&p, Some(u), kvm_gid())
                .map_err(|e| Error::internal(format!("chown {}: {e}", p.display())))?;
        }
    }
    Ok((
        give(kernel, dir, "vmlinux", uid)?,
        give(initrd, dir, "initrd.cpio", uid)?,
    ))
}

/// How a VMM is started.
struct Vmm<'a> {
    binary: &'a Path,
    jailer: Option<&'a Path>,
    /// Where `firecracker.log` goes (outside a jail).
    log_dir: &'a Path,
}

/// The directory Firecracker works in: the VM directory, or with the
/// jailer its jail root, `<dir>/<binary name>/<id>/root` (the jailer's
/// layout with `--chroot-base-dir <dir>`). Created (0700) if missing.
fn vmm_root(dir: &Path, binary: &Path, id: &str, jailed: bool) -> Result<PathBuf> {
    if !jailed {
        return Ok(dir.to_path_buf());
    }
    let name = binary
        .file_name()
        .ok_or_else(|| Error::invalid(format!("bad firecracker path {}", binary.display())))?;
    let root = dir.join(name).join(id).join("root");
    std::fs::create_dir_all(&root)
        .map_err(|e| Error::internal(format!("creating the jail {}: {e}", root.display())))?;
    Ok(root)
}

/// The jailer's arguments for VM `id` (see `docs/notes/firecracker-api.md`
/// §3: two argv entries per flag, Firecracker's own after `--`, no second
/// `--id`). With a unified cgroup hierarchy `--cgroup-version 2` keeps it
/// from creating cgroups of its own (the server's hold the VMM).
fn jailer_args(binary: &Path, id: &str, uid: u32, gid: u32, chroot_base: &Path) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--id".into(),
        id.into(),
        "--exec-file".into(),
        binary.display().to_string(),
        "--uid".into(),
        uid.to_string(),
        "--gid".into(),
        gid.to_string(),
        "--chroot-base-dir".into(),
        chroot_base.display().to_string(),
    ];
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        a.extend(["--cgroup-version".into(), "2".into()]);
    }
    a.extend(
        ["--", "--api-sock", "api.sock", "--level", "Warning"]
            .iter()
            .map(|s| (*s).to_string()),
    );
    a
}

/// Starts Firecracker for the VM whose working directory is `dir`, in its
/// own process group, as `uid` with `/dev/kvm`'s group when given (through
/// the jailer when configured); waits for its API socket. Not killed when
/// the server goes.
async fn launch(
    vmm: &Vmm<'_>,
    dir: &Path,
    id: &str,
    uid: Option<u32>,
    kill_on_drop: bool,
) -> Result<(i32, tokio::process::Child)> {
    let log = std::fs::File::create(vmm.log_dir.join("firecracker.log"))
        .map_err(|e| Error::internal(format!("creating firecracker.log: {e}")))?;
    let log2 = log
        .try_clone()
        .map_err(|e| Error::internal(format!("firecracker.log: {e}")))?;
    let mut cmd = match vmm.jailer {
        Some(j) => {
            let u = uid.ok_or_else(|| Error::unavailable("the jailer needs a leased uid"))?;
            let base = dir
                .ancestors()
                .nth(3)
                .ok_or_else(|| Error::internal("jail root outside its VM directory"))?;
            let mut c = tokio::process::Command::new(j);
            c.args(jailer_args(vmm.binary, id, u, kvm_gid().unwrap_or(u), base));
            c
        }
        None => {
            let mut c = tokio::process::Command::new(vmm.binary);
            c.args(["--api-sock", "api.sock", "--id", id, "--level", "Warning"]);
            c
        }
    };
    cmd.stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(kill_on_drop);
    match uid.filter(|_| vmm.jailer.is_none()) {
        // Into the directory as root, then the leased uid with /dev/kvm's
        // group: the VMM never needs to reach the directory by its path.
        Some(u) => {
            stacyvm_sandbox::procs::enter_as(cmd.as_std_mut(), dir, u, kvm_gid().unwrap_or(u))
                .map_err(|e| Error::internal(format!("VMM credentials: {e}")))?
        }
        None => {
            cmd.current_dir(dir);
        }
    }
    let mut child = cmd.spawn().map_err(|e| {
        Error::unavailable(format!(
            "starting {}: {e}",
            vmm.jailer.unwrap_or(vmm.binary).display()
        ))
    })?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| Error::internal("firecracker exited at once"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::internal(format!(
                "firecracker exited during start ({status}): {}",
                log_tail(vmm.log_dir, 10)
            )));
        }
        if tokio::net::UnixStream::connect(dir.join("api.sock"))
            .await
            .is_ok()
        {
            return Ok((pid, child));
        }
        if Instant::now() >= deadline {
            let _ = child.start_kill();
            return Err(Error::internal(
                "firecracker did not open its API socket within 10 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Connects to the agent over the hybrid vsock until it answers the
/// handshake, the VMM dies, or `timeout` passes.
async fn wait_agent(
    uds: &Path,
    token: &[u8],
    timeout: Duration,
    vmm: &Identity,
) -> Result<Arc<AgentClient>> {
    let deadline = Instant::now() + timeout;
    loop {
        if !vmm.alive() {
            return Err(Error::internal(
                "firecracker exited before the guest agent answered",
            ));
        }
        if Instant::now() >= deadline {
            return Err(Error::unavailable(format!(
                "the guest agent did not answer within {timeout:?}"
            )));
        }
        if let Ok(s) = vsock_connect(uds, AGENT_PORT).await {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(3));
            if let Ok(Ok(c)) =
                tokio::time::timeout(left, AgentClient::handshake(s, Some(token))).await
            {
                return Ok(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn log_tail(dir: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(dir.join("firecracker.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A restore point to build.
struct Template {
    binary: PathBuf,
    jailer: Option<PathBuf>,
    root: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    base: PathBuf,
    image: String,
    key: String,
    memory_mb: i64,
    vcpus: i64,
    boot_timeout: Duration,
}

/// Boots a template in a build directory, lets its agent answer and
/// settle with no host, pauses it, snapshots it (device state `vmstate`,
/// memory `mem`; its disk `disk.raw` stays), kills it, and publishes the
/// directory by rename. The template is killed whatever happens.
async fn build_snapshot(t: &Template, uid: Option<u32>) -> Result<FcSnapMeta> {
    std::fs::create_dir_all(&t.root)
        .map_err(|e| Error::internal(format!("creating {}: {e}", t.root.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&t.root)
        .map_err(|e| Error::internal(format!("restore point build dir: {e}")))?;
    let out = tmp.path();
    let root = vmm_root(out, &t.binary, "stacyvm-snapshot", t.jailer.is_some())?;
    let dir = root.as_path();
    copy_sparse(&t.base, &dir.join("disk.raw")).await?;
    let (kernel, initrd) = prepare_dir(dir, &t.kernel, &t.initrd, uid)?;
    let token: [u8; 32] = rand::random();
    let vmm = Vmm {
        binary: &t.binary,
        jailer: t.jailer.as_deref(),
        log_dir: out,
    };
    let (pid, child) = launch(&vmm, dir, "stacyvm-snapshot", uid, true).await?;
    let ident = Identity::of(pid).ok_or_else(|| Error::internal("firecracker exited"))?;
    let api = FcApi::new(&dir.join("api.sock"));
    api.configure_and_start(&vm_config(
        t.vcpus,
        t.memory_mb,
        &kernel,
        &initrd,
        "stacyvm-snapshot",
        &token,
    )?)
    .await?;
    let client = wait_agent(&dir.join("vsock.sock"), &token, t.boot_timeout, &ident).await?;
    client.ping().await?;
    client.close().await;
    drop(client);
    tokio::time::sleep(super::snapshot::SETTLE).await;
    api.pause().await?;
    // Written by the VMM in its working directory.
    api.snapshot_create(Path::new("vmstate"), Path::new("mem"))
        .await?;
    ident.kill();
    drop(child);
    // Back to root, readable through the hard links clones get (the
    // directory stays private to the server); the content is a freshly
    // booted template, the same in every clone.
    let _ = std::os::unix::fs::chown(out, Some(0), Some(0));
    for f in ["vmstate", "mem", "disk.raw"] {
        let p = out.join(f);
        if dir != out {
            std::fs::rename(dir.join(f), &p)
                .map_err(|e| Error::internal(format!("moving {f} out of the jail: {e}")))?;
        }
        let _ = std::os::unix::fs::chown(&p, Some(0), Some(0));
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644));
    }
    for f in [
        "api.sock",
        "vsock.sock",
        "firecracker.log",
        "vmlinux",
        "initrd.cpio",
    ] {
        let _ = std::fs::remove_file(out.join(f));
    }
    if let Some(name) = t.binary.file_name() {
        let _ = std::fs::remove_dir_all(out.join(name));
    }
    let dir = out;
    let meta = FcSnapMeta {
        id: t.key.clone(),
        image: t.image.clone(),
        memory_mb: t.memory_mb,
        vcpus: t.vcpus,
        token: hex::encode(token),
        created_at: Utc::now(),
    };
    std::fs::write(
        dir.join("meta.json"),
        serde_json::to_vec_pretty(&meta).unwrap_or_default(),
    )
    .map_err(|e| Error::internal(format!("writing the restore point's meta: {e}")))?;
    let built = tmp.keep();
    let target = t.root.join(&t.key);
    if std::fs::rename(&built, &target).is_err() {
        // Another server won the race: its copy serves as well.
        let _ = std::fs::remove_dir_all(&built);
    }
    Ok(meta)
}

#[async_trait]
impl Provider for FirecrackerProvider {
    fn name(&self) -> &str {
        "firecracker"
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
        if nix::unistd::geteuid().is_root() {
            // As qemu's (microvm/build.rs): the steps in the guest.
            c.push(capability::IMAGE_BUILD.into());
        }
        c.push("microvm".into());
        c.push("vsock_agent".into());
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
            (
                self.images.clone(),
                "firecracker",
                self.opts.agent_path.clone(),
            ),
            &base,
            plan,
        )
        .await
    }

    fn profile(&self) -> Profile {
        Profile {
            isolation: Isolation::MicroVm,
            network_modes: vec!["none".into(), "bridge".into()],
            default_network: "none".into(),
        }
    }

    fn describe(&self) -> BTreeMap<String, String> {
        let mut d = BTreeMap::new();
        d.insert(
            "firecracker".into(),
            self.binary.as_ref().map_or_else(
                || format!("{} (not found)", self.opts.firecracker_binary),
                |p| p.display().to_string(),
            ),
        );
        d.insert("kernel".into(), self.opts.kernel_path.display().to_string());
        d.insert(
            "kernel_check".into(),
            check_vmlinux(&self.opts.kernel_path).map_or_else(|e| e, |()| "vmlinux (ELF)".into()),
        );
        d.insert("default_image".into(), self.opts.default_image.clone());
        let kvm = super::kvm_boots_guests(&self.opts.cache);
        d.insert(
            "certified".into(),
            match (&self.binary, kvm) {
                (Some(_), Ok(())) => "runnable here: firecracker and a guest-booting KVM exist (the conformance suite runs on this host)".into(),
                (None, Err(why)) => format!("not certified on this host: no firecracker binary; no KVM that boots guests ({why})"),
                (None, Ok(())) => "not certified on this host: no firecracker binary".into(),
                (Some(_), Err(why)) => format!("not certified on this host: no KVM that boots guests ({why})"),
            },
        );
        d
    }

    async fn health(&self) -> Result<()> {
        self.binary()?;
        super::kvm_usable()
            .map_err(|why| Error::unavailable(format!("firecracker needs KVM: {why}")))?;
        check_vmlinux(&self.opts.kernel_path).map_err(Error::unavailable)
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned> {
        self.validate(spec)?;
        {
            let mut s = self.starting.lock().map_err(|_| Error::internal("lock"))?;
            let live = std::fs::read_dir(&self.opts.base)
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| read_meta(&e.path()).is_some_and(|m| m.vmm().alive()))
                        .count()
                })
                .unwrap_or(0);
            if self.opts.max_sandboxes > 0 && live + *s >= self.opts.max_sandboxes {
                return Err(Error::limit(format!(
                    "the firecracker provider runs its maximum of {} sandboxes (providers.firecracker.max_sandboxes)",
                    self.opts.max_sandboxes
                )));
            }
            *s += 1;
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
        // A paused guest's agent cannot answer a ping: ask the VMM first.
        if let Ok(meta) = self.meta(id) {
            if meta.vmm().alive() && FcApi::new(&self.dir(id).join("api.sock")).is_paused().await {
                return Ok(RuntimeStatus {
                    state: "paused".into(),
                });
            }
        }
        crate::agent::conns::ping_status(id, self.client(id).await).await
    }

    /// `PATCH /vm {"state": "Paused"}`: the vCPUs stop, memory kept.
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
        if !self.meta(id)?.vmm().alive() {
            return Err(Error::sandbox_not_found(id));
        }
        FcApi::new(&self.dir(id).join("api.sock")).pause().await
    }

    /// `PATCH /vm {"state": "Resumed"}`, then the guest's wall clock is
    /// set to the host's (it stood still while paused).
    async fn resume(&self, id: &str) -> Result<()> {
        if !self.meta(id)?.vmm().alive() {
            return Err(Error::sandbox_not_found(id));
        }
        FcApi::new(&self.dir(id).join("api.sock")).resume().await?;
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
        if !meta.vmm().alive() {
            return Err(Error::sandbox_not_found(id));
        }
        if meta.cgroups.is_empty() {
            return Err(Error::unsupported(
                "firecracker: stats need cgroups (this server has none it may create)",
            ));
        }
        Ok(crate::native::cgroup_stats(&meta.cgroups, meta.memory_mb).await)
    }

    /// Firecracker's own log (the guest has no serial port).
    async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>> {
        self.meta(id)?;
        Ok(log_tail(&self.dir(id), lines)
            .lines()
            .map(str::to_string)
            .collect())
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
            let state = if meta.vmm().alive() {
                "running"
            } else {
                "destroyed"
            };
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

#[cfg(test)]
mod tests {
    use super::*;
    use stacyvm_core::ErrorKind;

    #[test]
    fn only_an_uncompressed_elf_kernel_is_accepted() {
        let d = tempfile::tempdir().expect("tmp");
        let elf = d.path().join("vmlinux");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01rest").expect("write");
        assert_eq!(check_vmlinux(&elf), Ok(()));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzimage = d.path().join("vmlinuz");
        std::fs::write(&bzimage, &bz).expect("write");
        let e = check_vmlinux(&bzimage).expect_err("bzImage");
        assert!(
            e.contains("bzImage") && e.contains("extract-vmlinux"),
            "{e}"
        );
        let junk = d.path().join("junk");
        std::fs::write(&junk, b"no").expect("write");
        assert!(check_vmlinux(&junk).is_err());
        assert!(check_vmlinux(&d.path().join("missing")).is_err());
    }

    #[test]
    fn boot_config_has_no_serial_port_and_relative_paths() {
        let c = vm_config(
            2,
            256,
            Path::new("/k/vmlinux"),
            Path::new("/i/x.cpio"),
            "sb-00000001",
            &[0xab; 4],
        )
        .expect("config");
        assert_eq!(c.rootfs, Path::new("disk.raw"));
        assert_eq!(c.vsock_uds, Path::new("vsock.sock"));
        assert!(c.boot_args.contains("8250.nr_uarts=0"), "{}", c.boot_args);
        assert!(!c.boot_args.contains("console=ttyS0"), "{}", c.boot_args);
        assert!(c
            .boot_args
            .contains("stacyvm.transport=vsock stacyvm.root=vda"));
        assert!(c
            .boot_args
            .ends_with("stacyvm.hostname=sb-00000001 stacyvm.token=abababab"));
        assert!(vm_config(300, 256, Path::new("/k"), Path::new("/i"), "h", &[]).is_err());
        let k = fc_snapshot_key(
            "0123456789abcdef0123",
            256,
            1,
            Path::new("/i/a.cpio"),
            Path::new("/k/vmlinux"),
        );
        assert!(
            k.starts_with("0123456789abcdef-256m-1c-") && k.ends_with("-fc"),
            "{k}"
        );
        assert_ne!(
            k,
            fc_snapshot_key(
                "0123456789abcdef0123",
                256,
                1,
                Path::new("/i/b.cpio"),
                Path::new("/k/vmlinux")
            )
        );
    }

    /// A stand-in for the `firecracker` binary: serves the API on
    /// `--api-sock` (relative to its working directory, as the provider
    /// starts it), records every request as a JSON line to
    /// `$STACYVM_FAKE_FC_RECORD`, and boots nothing (no vsock socket).
    const FAKE_FC: &str = r#"#!/usr/bin/env python3
import json, os, socket, sys, http.server, socketserver
args = sys.argv[1:]
sock = args[args.index("--api-sock") + 1]
record = os.environ["STACYVM_FAKE_FC_RECORD"]
state = {"v": "Not started"}
class H(http.server.BaseHTTPRequestHandler):
    def address_string(self): return "uds"
    def log_message(self, *a): pass
    def _do(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"null")
        tap_owner = None
        if self.path.startswith("/network-interfaces/"):
            try: tap_owner = open("/sys/class/net/%s/owner" % body["host_dev_name"]).read().strip()
            except OSError: tap_owner = "missing"
        with open(record, "a") as f:
            f.write(json.dumps({"method": self.command, "path": self.path, "body": body,
                                "uid": os.getuid(), "cwd": os.getcwd(), "tap_owner": tap_owner}) + "\n")
        if self.command == "GET":
            out = json.dumps({"state": state["v"]}).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
        else:
            if self.path == "/actions": state["v"] = "Running"
            self.send_response(204); self.send_header("Content-Length", "0"); self.end_headers()
    do_GET = do_PUT = do_PATCH = _do
class S(socketserver.UnixStreamServer):
    def get_request(self):
        r, _ = self.socket.accept(); return r, ("uds", 0)
S(sock, H).serve_forever()
"#;

    /// A stand-in for Firecracker's `jailer`, doing what its docs say it
    /// does short of the chroot: parse its flags (two argv entries each,
    /// Firecracker's after `--`), make and chown the jail root
    /// `<chroot-base>/<exec name>/<id>/root`, enter it, drop to uid/gid,
    /// and exec the binary with `--id` and the passed-through arguments.
    const FAKE_JAILER: &str = r#"#!/usr/bin/env python3
import json, os, sys
a = sys.argv[1:]
sep = a.index("--")
flags, extra = a[:sep], a[sep + 1:]
assert all(not f.startswith("--") or "=" not in f for f in flags), flags
get = lambda n: flags[flags.index(n) + 1]
idv, exe, uid, gid, base = get("--id"), get("--exec-file"), int(get("--uid")), int(get("--gid")), get("--chroot-base-dir")
assert "--id" not in extra, "a second --id is a duplicate-argument error"
with open(os.environ["STACYVM_FAKE_FC_RECORD"], "a") as f:
    f.write(json.dumps({"jailer": a}) + "\n")
root = os.path.join(base, os.path.basename(exe), idv, "root")
os.makedirs(root, exist_ok=True)
os.chown(root, uid, gid)
os.chdir(root)
os.setgroups([gid]); os.setgid(gid); os.setuid(uid)
os.execv(exe, [exe, "--id", idv] + extra)
"#;

    /// The provider's process handling with the fake VMM: the boot
    /// sequence it sends (drive and vsock relative to the VM directory,
    /// no serial port), the VMM run as a leased uid in the VM directory
    /// with the kernel and initramfs it can read, and a guest that never
    /// answers: the spawn fails with a typed error naming the timeout,
    /// the VMM is killed, and nothing is left (directory, cgroup, lease).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vmm_whose_guest_never_answers_is_torn_down() {
        let fx = super::super::tests::fixture();
        let tools = tempfile::Builder::new()
            .prefix("stacyvm-fake-fc-")
            .tempdir_in("/tmp")
            .expect("tmp");
        std::fs::set_permissions(tools.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let bin = tools.path().join("firecracker");
        std::fs::write(&bin, FAKE_FC).expect("fake");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let kernel = tools.path().join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF fake kernel").expect("kernel");
        // Not world-readable: the provider must copy it for the VMM's uid.
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let record = tools.path().join("calls.jsonl");
        std::fs::write(&record, b"").expect("record");
        std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        // SAFETY-free: nextest runs each test in its own process.
        std::env::set_var("STACYVM_FAKE_FC_RECORD", &record);
        let q = fx.opts();
        let opts = FirecrackerOptions {
            base: fx.path().join("firecracker/sandboxes"),
            cache: q.cache,
            images_dir: q.images_dir,
            hidden: q.hidden,
            agent_path: q.agent_path,
            firecracker_binary: bin.display().to_string(),
            jailer: None,
            kernel_path: kernel.clone(),
            kernel_package: q.kernel_package,
            default_image: String::new(),
            max_sandboxes: 0,
            max_memory_mb: 1024,
            max_vcpus: 2,
            disk_mb: 64,
            boot_timeout: Duration::from_secs(2),
            exec_timeout: Duration::from_secs(10),
            snapshots: true,
            subordinate_ids: q.subordinate_ids,
            bridge: q.bridge,
        };
        let base = opts.base.clone();
        let p = FirecrackerProvider::new(opts).expect("provider");
        let mut spec = crate::conformance::spawn_spec(super::super::tests::BUSYBOX_TAG);
        spec.memory_mb = 128;
        let e = p.spawn(&spec).await.expect_err("no guest answers");
        assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
        assert!(e.to_string().contains("did not answer"), "{e}");

        let calls: Vec<serde_json::Value> = std::fs::read_to_string(&record)
            .expect("record")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        let seq: Vec<String> = calls
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    c["method"].as_str().unwrap_or(""),
                    c["path"].as_str().unwrap_or("")
                )
            })
            .collect();
        assert_eq!(
            seq,
            [
                "PUT /machine-config",
                "PUT /boot-source",
                "PUT /drives/rootfs",
                "PUT /vsock",
                "PUT /entropy",
                "PUT /actions"
            ]
        );
        let vm_dir = base.join(&spec.id);
        for c in &calls {
            assert_eq!(
                c["cwd"],
                vm_dir.display().to_string(),
                "runs in the VM directory"
            );
            if nix::unistd::geteuid().is_root() {
                assert_ne!(c["uid"], 0, "the VMM runs as a leased uid");
            }
        }
        assert_eq!(
            calls[0]["body"],
            serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128})
        );
        assert_eq!(calls[2]["body"]["path_on_host"], "disk.raw");
        assert_eq!(calls[3]["body"]["uds_path"], "vsock.sock");
        let boot = &calls[1]["body"];
        assert!(
            boot["boot_args"]
                .as_str()
                .unwrap_or("")
                .contains("8250.nr_uarts=0"),
            "{boot}"
        );
        // Only names in its own directory: the VMM cannot reach the
        // server's (an unreadable kernel was copied in for its uid).
        assert_eq!(boot["kernel_image_path"], "vmlinux", "{boot}");
        assert_eq!(boot["initrd_path"], "initrd.cpio", "{boot}");
        assert!(!vm_dir.exists(), "VM directory left behind");
        let needle = bin.display().to_string();
        for e in std::fs::read_dir("/proc").expect("proc").flatten() {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&cmd).contains(&needle),
                "the fake VMM is still running"
            );
        }
        // Bad input never starts a VMM.
        let mut big = crate::conformance::spawn_spec(super::super::tests::BUSYBOX_TAG);
        big.vcpus = 64;
        assert_eq!(
            p.spawn(&big).await.expect_err("vcpus").kind(),
            ErrorKind::InvalidInput
        );
        let mut odd = crate::conformance::spawn_spec(super::super::tests::BUSYBOX_TAG);
        odd.network_mode = "host".into();
        assert_eq!(
            p.spawn(&odd).await.expect_err("net").kind(),
            ErrorKind::InvalidInput
        );
        // `bridge`: a persistent tap the VMM's uid owns, pinned, named in
        // `PUT /network-interfaces/eth0` before the start; on failure tap,
        // pins and lease go.
        let lab = crate::native::isolation_tests::Lab::new();
        let mut o2 = p.opts.clone();
        o2.bridge = lab.bridge_options();
        let p2 = FirecrackerProvider::new(o2).expect("provider");
        std::fs::write(&record, b"").expect("reset record");
        let mut b = crate::conformance::spawn_spec(super::super::tests::BUSYBOX_TAG);
        b.memory_mb = 128;
        b.network_mode = "bridge".into();
        let e = p2.spawn(&b).await.expect_err("no guest answers");
        assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
        let calls: Vec<serde_json::Value> = std::fs::read_to_string(&record)
            .expect("record")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        let tap = net::host_if_name(&b.id);
        let nic = calls
            .iter()
            .find(|c| c["path"] == "/network-interfaces/eth0")
            .expect("a network card");
        assert_eq!(nic["body"]["host_dev_name"], tap.as_str());
        assert_eq!(
            nic["tap_owner"],
            nic["uid"].to_string(),
            "the VMM's uid owns its tap: {nic}"
        );
        let mac = nic["body"]["guest_mac"].as_str().expect("mac").to_string();
        let boot = calls
            .iter()
            .find(|c| c["path"] == "/boot-source")
            .expect("boot");
        let args = boot["body"]["boot_args"].as_str().unwrap_or_default();
        let n = lab.n;
        assert!(args.contains(&format!("stacyvm.net=10.89.{n}.")), "{args}");
        assert!(
            args.contains(&format!("/24,10.89.{n}.1 stacyvm.dns=172.31.{n}.53")),
            "{args}"
        );
        let ip: std::net::Ipv4Addr = args
            .split("stacyvm.net=")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.parse().ok())
            .expect("address");
        assert_eq!(mac, net::mac_for(ip));
        assert!(
            !Path::new("/sys/class/net").join(&tap).exists(),
            "tap {tap} left"
        );
        let pins = std::process::Command::new("nft")
            .args([
                "list",
                "set",
                "bridge",
                &format!("stacyvm_{}", lab.bridge),
                "vmports",
            ])
            .output()
            .expect("nft");
        assert!(
            !String::from_utf8_lossy(&pins.stdout).contains(&tap),
            "pin left"
        );
        assert!(
            !Path::new("/run/stacyvm/net")
                .join(&lab.bridge)
                .join(ip.to_string())
                .exists(),
            "lease left"
        );
        drop(lab);

        // Through the jailer: its flags, Firecracker in the jail root
        // (files put there beforehand) as the leased uid; nothing left.
        if nix::unistd::geteuid().is_root() {
            let jailer = tools.path().join("jailer");
            std::fs::write(&jailer, FAKE_JAILER).expect("fake jailer");
            std::fs::set_permissions(&jailer, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            let mut o3 = p.opts.clone();
            o3.jailer = Some(jailer);
            let p3 = FirecrackerProvider::new(o3).expect("provider");
            std::fs::write(&record, b"").expect("reset record");
            let mut j = crate::conformance::spawn_spec(super::super::tests::BUSYBOX_TAG);
            j.memory_mb = 128;
            let e = p3.spawn(&j).await.expect_err("no guest answers");
            assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
            let lines: Vec<serde_json::Value> = std::fs::read_to_string(&record)
                .expect("record")
                .lines()
                .map(|l| serde_json::from_str(l).expect("json"))
                .collect();
            let argv: Vec<String> = lines[0]["jailer"]
                .as_array()
                .expect("jailer argv")
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect();
            let vm_dir = base.join(&j.id);
            let flag = |n: &str| argv[argv.iter().position(|a| a == n).expect(n) + 1].clone();
            assert_eq!(flag("--id"), j.id);
            assert_eq!(flag("--exec-file"), bin.display().to_string());
            assert_eq!(flag("--chroot-base-dir"), vm_dir.display().to_string());
            assert_ne!(flag("--uid"), "0", "{argv:?}");
            let tail: Vec<&str> = argv
                .iter()
                .skip_while(|a| *a != "--")
                .map(String::as_str)
                .collect();
            assert_eq!(tail, ["--", "--api-sock", "api.sock", "--level", "Warning"]);
            let root = vm_dir.join("firecracker").join(&j.id).join("root");
            let fc_calls: Vec<&serde_json::Value> =
                lines.iter().filter(|l| l.get("path").is_some()).collect();
            assert_eq!(fc_calls.len(), 6, "{lines:?}");
            for c in fc_calls {
                assert_eq!(c["cwd"], root.display().to_string(), "in the jail");
                assert_eq!(c["uid"].to_string(), flag("--uid"));
            }
            assert!(!vm_dir.exists(), "jail left behind");
        }

        std::fs::write(&kernel, vec![0u8; 0x300]).expect("not elf");
        let mut k = crate::conformance::spawn_spec(super::super::tests::BUSYBOX_TAG);
        k.memory_mb = 128;
        let e = p.spawn(&k).await.expect_err("bad kernel");
        assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
        assert!(e.to_string().contains("not an ELF kernel"), "{e}");
    }
}

/// The conformance suite on Firecracker, where a `firecracker` binary, an
/// uncompressed kernel (`STACYVM_FC_KERNEL`, default
/// `/var/lib/stacyvm/vmlinux.bin`) and a KVM that boots guests exist.
/// Elsewhere every case says loudly that it did not run.
#[cfg(test)]
mod conformance_on_firecracker {
    use std::sync::Arc;

    use stacyvm_core::provider::Provider;

    use super::*;

    pub struct FcFixture {
        /// Owns the directory (and the imported image) the VMs use.
        _inner: super::super::tests::Fixture,
        opts: FirecrackerOptions,
    }

    impl crate::conformance::Fixture for FcFixture {
        fn provider(&self) -> Arc<dyn Provider> {
            Arc::new(FirecrackerProvider::new(self.opts.clone()).expect("firecracker provider"))
        }
        fn image(&self) -> String {
            super::super::tests::BUSYBOX_TAG.into()
        }
        fn survives_restart(&self) -> bool {
            true
        }
        /// `PATCH /vm` Paused and Resumed.
        fn supports_pause(&self) -> bool {
            true
        }
    }

    /// The fixture, or `None` (and why, on stderr) on hosts that cannot
    /// run Firecracker guests.
    pub fn fc_fixture() -> Option<FcFixture> {
        let kernel = std::env::var("STACYVM_FC_KERNEL")
            .unwrap_or_else(|_| "/var/lib/stacyvm/vmlinux.bin".into());
        let cache = std::env::var("STACYVM_MICROVM_CACHE")
            .unwrap_or_else(|_| "/var/cache/stacyvm/microvm".into());
        let missing: Vec<String> = [
            stacyvm_core::checks::which("firecracker")
                .is_none()
                .then(|| "no firecracker binary in PATH".to_string()),
            check_vmlinux(Path::new(&kernel)).err(),
            super::super::kvm_boots_guests(Path::new(&cache)).err(),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !missing.is_empty() {
            eprintln!(
                "SKIPPED: firecracker conformance did not run on this host: {}",
                missing.join("; ")
            );
            return None;
        }
        let inner = super::super::tests::fixture();
        let q = inner.opts();
        let opts = FirecrackerOptions {
            base: inner.path().join("firecracker/sandboxes"),
            cache: q.cache,
            images_dir: q.images_dir,
            hidden: q.hidden,
            agent_path: q.agent_path,
            firecracker_binary: "firecracker".into(),
            jailer: stacyvm_core::checks::which("jailer"),
            kernel_path: PathBuf::from(kernel),
            kernel_package: q.kernel_package,
            default_image: String::new(),
            max_sandboxes: 0,
            max_memory_mb: 2048,
            max_vcpus: 2,
            disk_mb: 64,
            boot_timeout: Duration::from_secs(30),
            exec_timeout: Duration::from_secs(120),
            snapshots: true,
            subordinate_ids: q.subordinate_ids,
            bridge: q.bridge,
        };
        Some(FcFixture {
            _inner: inner,
            opts,
        })
    }

    crate::conformance_tests!(firecracker_conformance, optional fc_fixture());
}
