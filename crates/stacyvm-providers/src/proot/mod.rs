//! The `proot` provider: the static `stacyvm-agent` runs under PRoot
//! (ptrace-based path translation) inside an image root, for hosts
//! without KVM or namespaces and as a user-space tier elsewhere.
//!
//! PRoot isolates nothing by itself (its binds are host paths, `-0` is a
//! fake root), so every sandbox is confined by the kernel before proot
//! starts: `stacyvm-agent proot --spec launch.json` joins the sandbox's
//! cgroups, starts a session, and on a root server enters a private mount
//! and network namespace, takes an unprivileged uid/gid leased from the
//! id allocator the native provider uses, then sets rlimits,
//! no_new_privs, landlock and a seccomp filter (see
//! `stacyvm_sandbox::proot`) and executes proot.
//!
//! Per sandbox (`<base>/<id>/`, 0700, the server's): `meta.json`,
//! `launch.json`, `console.log` (proot's and the agent's stderr),
//! `agent.sock` (bound by the launcher before it drops privileges and
//! inherited by the agent as fd 3: nothing inside can see or replace it)
//! and `rw/` (the sandbox's own: `/workspace`, `/tmp`, `/var/tmp`, `/run`,
//! `/root`, `/home`, `/dev/shm` and proot's scratch dir). The image is
//! shared and read-only (landlock, and root-owned files on root servers).
//! Sandboxes live on when the server stops; a new provider instance finds
//! them through `meta.json` and reconnects to `agent.sock`.

pub mod setup;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use stacyvm_agent_proto::boot::{BindSpec, ProotSpec, Stage};
use stacyvm_core::provider::{
    capability, ExecInput, ExecSpec, ExitStatus, Isolation, OutputSink, Profile, Provider,
    RuntimeInfo, RuntimeStatus, SandboxIo, SpawnSpec, Spawned, Stats,
};
use stacyvm_core::{paths, Error, ErrorKind, Result};
use stacyvm_sandbox::cgroup::{self, Layout, Limits};
use stacyvm_sandbox::procs::Identity;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::agent::{AgentClient, AgentSession};
use crate::image::store as images;
use crate::native::{disk, ids};

/// Where a root server's sandboxes see their staged dirs (an empty dir on
/// the host; a tmpfs in each sandbox's private mount namespace).
pub const STAGE_DIR: &str = "/run/stacyvm/proot-stage";

/// The agent's path inside a sandbox.
const AGENT_IN: &str = "/.stacyvm/agent";

/// Environment marker naming the sandbox (finds a launch the server
/// never recorded).
const MARKER: &str = "STACYVM_PROOT_SANDBOX";

/// How long a starting sandbox may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The sandbox's writable dirs: (name under `rw/`, path inside, mode).
const WRITABLE: [(&str, &str, u32); 7] = [
    ("workspace", "/workspace", 0o755),
    ("tmp", "/tmp", 0o1777),
    ("var-tmp", "/var/tmp", 0o1777),
    ("run", "/run", 0o755),
    ("root", "/root", 0o700),
    ("home", "/home", 0o755),
    ("shm", "/dev/shm", 0o1777),
];

/// Host device files every sandbox gets (bound at the same path).
const DEVICES: [&str; 8] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
];

/// Settings of the proot provider.
#[derive(Debug, Clone)]
pub struct ProotOptions {
    /// Per-sandbox state (`providers.proot.workspace_base`,
    /// default `<data_dir>/proot/sandboxes`).
    pub base: PathBuf,
    /// The image store shared with the native provider.
    pub images_dir: PathBuf,
    /// A plain root directory offered as image `rootfs`
    /// (`providers.proot.rootfs_path`); ignored when missing or empty.
    pub rootfs_path: PathBuf,
    /// Paths never exposed (the server's data dir).
    pub hidden: Vec<String>,
    /// The static `stacyvm-agent`.
    pub agent_path: PathBuf,
    /// `providers.proot.proot_binary` (a name looked up in PATH, or a path).
    pub proot_binary: String,
    pub max_sandboxes: usize,
    /// Memory cap per sandbox in MiB (a spawn asking more is refused).
    pub max_memory_mb: i64,
    pub pids_limit: u64,
    /// Hard cap of every exec (`providers.proot.default_timeout`).
    pub exec_timeout: Duration,
    pub subordinate_ids: ids::IdRange,
    pub disk: disk::DiskCaps,
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
    /// proot's pid, start time and boot id.
    pid: i32,
    start_time: u64,
    boot_id: String,
    /// The leased uid (= gid) on a root server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(default)]
    cgroups: Vec<PathBuf>,
    token: String,
}

impl Meta {
    fn proot(&self) -> Identity {
        Identity {
            pid: self.pid,
            start_time: self.start_time,
            boot_id: self.boot_id.clone(),
        }
    }

    fn alive(&self) -> bool {
        self.proot().alive()
    }

    fn token(&self) -> Option<Vec<u8>> {
        hex::decode(&self.token).ok().filter(|t| !t.is_empty())
    }
}

/// Where the sandbox's root comes from.
#[derive(Debug, Clone)]
struct Root {
    /// The directory proot uses as `/`.
    dir: PathBuf,
    /// The synthesized `/etc` of the `host` image.
    etc: Option<PathBuf>,
    /// Host dirs shown at the same path (the `host` image).
    host_dirs: Vec<String>,
}

#[derive(Debug)]
pub struct ProotProvider {
    opts: ProotOptions,
    proot: Option<PathBuf>,
    images: Arc<images::ImageStore>,
    cgroups: Option<Layout>,
    rootless: bool,
    ids: Option<Arc<ids::IdAllocator>>,
    landlock: bool,
    conns: crate::agent::Connections,
    /// Spawns in flight (they count against `max_sandboxes`).
    starting: Mutex<usize>,
    _alive: Arc<()>,
}

/// Resolves `proot` like a shell: a path as is, a name through PATH.
pub fn resolve_binary(name: &str) -> Option<PathBuf> {
    stacyvm_core::checks::which(name)
}

/// Processes whose status satisfies `pick` (given the status text).
fn scan_procs(pick: &dyn Fn(i32, &str) -> bool) -> Vec<Identity> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // The identity first: the status read after it belongs to the
        // same process if the identity still holds when it is killed.
        let Some(id) = Identity::of(pid) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if pick(pid, &status) {
            out.push(id);
        }
    }
    out
}

fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.split_whitespace().next())
}

/// Kills every process of a sandbox: its cgroups' processes; on a root
/// server every process of its leased uid (nothing else has it); else
/// every process proot traces and every one in proot's session; then
/// proot. Blocking.
fn kill_all(meta: &Meta) {
    cgroup::destroy(&meta.cgroups);
    let proot = meta.proot();
    let uid = meta.uid.map(|u| u.to_string());
    let pid = meta.pid.to_string();
    for _ in 0..200 {
        let traced = proot.alive();
        let victims = scan_procs(&|p, status| {
            if p == meta.pid || meta.pid <= 0 {
                return false;
            }
            if let Some(u) = &uid {
                return status_field(status, "Uid:") == Some(u.as_str());
            }
            // A session id stays taken while the session exists, so it
            // still names this sandbox after proot is gone.
            (traced && status_field(status, "TracerPid:") == Some(pid.as_str()))
                || session_of(p) == Some(meta.pid)
        });
        let proot_alive = proot.alive();
        if victims.is_empty() {
            if proot_alive {
                proot.kill();
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            return;
        }
        for v in &victims {
            v.kill();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    warn!(sandbox_id = %meta.id, "proot sandbox processes survived 200 kill rounds");
}

/// The session id of a process.
fn session_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // state ppid pgrp session
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// proot processes started for `id` that no metadata records (a server
/// stopped between launch and record).
fn kill_unrecorded(id: &str) {
    let marker = format!("{MARKER}={id}");
    for _ in 0..50 {
        let found = scan_procs(&|p, _| {
            std::fs::read(format!("/proc/{p}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()))
        });
        if found.is_empty() {
            return;
        }
        for f in &found {
            f.kill();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Removes a sandbox's state (see [`crate::native::remove_tree`]).
fn remove_tree(dir: &Path) {
    if let Err(e) = crate::native::remove_tree(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %dir.display(), error = %e, "removing proot sandbox state failed");
        }
    }
}

/// Ends a sandbox completely: processes, cgroups, state dir, id lease.
fn teardown_blocking(dir: &Path, id: &str, meta: Option<&Meta>) {
    match meta {
        Some(m) => kill_all(m),
        None => kill_unrecorded(id),
    }
    remove_tree(dir);
    if let Some(uid) = meta.and_then(|m| m.uid) {
        ids::release_lease(uid);
    }
}

fn read_meta(dir: &Path) -> Option<Meta> {
    let text = std::fs::read_to_string(dir.join("meta.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The disk guard: every interval, ends sandboxes whose writable dirs
/// hold more than the cap (allocated blocks) or too many files.
fn guard_disk(alive: Weak<()>, base: PathBuf, caps: disk::DiskCaps) {
    if caps.per_sandbox == 0 {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("stacyvm-proot-disk".into())
        .spawn(move || loop {
            std::thread::sleep(caps.interval);
            if alive.upgrade().is_none() {
                return;
            }
            let Ok(rd) = std::fs::read_dir(&base) else {
                continue;
            };
            for e in rd.flatten() {
                let (bytes, entries) = disk::usage(&e.path().join("rw"), caps.per_sandbox);
                if bytes > caps.per_sandbox || entries > disk::MAX_ENTRIES {
                    if let Some(meta) = read_meta(&e.path()) {
                        warn!(sandbox_id = %meta.id, bytes, entries, "proot sandbox over its disk cap; ending it");
                        kill_all(&meta);
                    }
                }
            }
        });
}

impl ProotProvider {
    pub fn new(opts: ProotOptions) -> Result<Self> {
        crate::native::create_private_dir(&opts.base)?;
        let images = Arc::new(images::ImageStore::new(
            opts.images_dir.clone(),
            &opts.hidden,
        )?);
        let rootless = !nix::unistd::geteuid().is_root();
        let mut cgroups = cgroup::detect();
        if rootless && !cgroups.as_ref().is_some_and(cgroup::writable) {
            cgroups = None;
        }
        let ids = (!rootless).then(|| {
            let a = ids::IdAllocator::new(opts.subordinate_ids);
            a.sweep();
            Arc::new(a)
        });
        if !rootless {
            std::fs::create_dir_all(STAGE_DIR)
                .map_err(|e| Error::internal(format!("creating {STAGE_DIR}")).with_source(e))?;
        }
        let p = ProotProvider {
            proot: resolve_binary(&opts.proot_binary),
            images,
            cgroups,
            rootless,
            ids,
            landlock: stacyvm_sandbox::proot::landlock_available(),
            conns: crate::agent::Connections::default(),
            starting: Mutex::new(0),
            _alive: Arc::new(()),
            opts,
        };
        p.sweep();
        guard_disk(Arc::downgrade(&p._alive), p.opts.base.clone(), p.opts.disk);
        Ok(p)
    }

    /// Removes what dead or never-recorded sandboxes left: state dirs
    /// whose proot is gone, and unrecorded launches.
    fn sweep(&self) {
        let Ok(rd) = std::fs::read_dir(&self.opts.base) else {
            return;
        };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            if !paths::is_sandbox_id(&id) {
                continue;
            }
            match read_meta(&e.path()) {
                Some(m) if m.alive() => {}
                meta => {
                    info!(sandbox_id = %id, "removing a dead or unrecorded proot sandbox");
                    teardown_blocking(&e.path(), &id, meta.as_ref());
                }
            }
        }
    }

    /// The image store (shared with the native provider).
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

    async fn freeze(&self, id: &str, frozen: bool) -> Result<()> {
        let meta = self.meta(id)?;
        if !meta.alive() {
            return Err(Error::sandbox_not_found(id));
        }
        crate::native::freeze_cgroups(meta.cgroups.clone(), frozen).await
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

    /// Resolves an image to the root proot uses.
    fn root_for(&self, image: &str) -> Result<Root> {
        if image == "rootfs" {
            let usable = std::fs::read_dir(&self.opts.rootfs_path)
                .map(|mut rd| rd.next().is_some())
                .unwrap_or(false);
            if !usable {
                return Err(Error::invalid(format!(
                    "image \"rootfs\" means providers.proot.rootfs_path ({}), which is missing or empty; unpack a root filesystem there or use image \"host\" or an imported image",
                    self.opts.rootfs_path.display()
                )));
            }
            return Ok(Root {
                dir: self.opts.rootfs_path.clone(),
                etc: None,
                host_dirs: Vec::new(),
            });
        }
        let (lower, binds, _masks) = self.images.layers(image).map_err(|e| {
            if e.kind() == ErrorKind::InvalidInput {
                Error::invalid(e.detail().replace("native provider", "proot provider"))
            } else {
                e
            }
        })?;
        if image.is_empty() || image == "host" {
            let etc = lower.first().map(|l| Path::new(l).join("etc"));
            let dir = lower
                .get(1)
                .map(PathBuf::from)
                .ok_or_else(|| Error::internal("the host image has no skeleton layer"))?;
            return Ok(Root {
                dir,
                etc,
                host_dirs: binds.into_iter().map(|b| b.target).collect(),
            });
        }
        let dir = match self.images.find(image) {
            Some(rec) if lower.len() > 1 => {
                self.images
                    .single_dir(&rec, "proot", &self.opts.agent_path)?
            }
            _ => lower
                .first()
                .map(PathBuf::from)
                .ok_or_else(|| Error::internal(format!("image {image:?} has no layer")))?,
        };
        Ok(Root {
            dir,
            etc: None,
            host_dirs: Vec::new(),
        })
    }

    /// Creates the sandbox's writable dirs, owned by its uid.
    fn make_rw(&self, dir: &Path, owner: Option<u32>) -> Result<PathBuf> {
        let err = |e: std::io::Error| Error::internal("creating the sandbox's dirs").with_source(e);
        let rw = dir.join("rw");
        std::fs::create_dir_all(&rw).map_err(err)?;
        std::fs::set_permissions(&rw, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        let mut all = vec![(rw.clone(), 0o700)];
        for (name, _, mode) in WRITABLE {
            all.push((rw.join(name), mode));
        }
        all.push((rw.join(".proot"), 0o700));
        for (d, mode) in &all {
            std::fs::create_dir_all(d).map_err(err)?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(*mode)).map_err(err)?;
            if let Some(uid) = owner {
                std::os::unix::fs::chown(d, Some(uid), Some(uid)).map_err(err)?;
            }
        }
        Ok(rw)
    }

    /// The launch spec of a sandbox.
    fn launch_spec(
        &self,
        spec: &SpawnSpec,
        dir: &Path,
        root: &Root,
        uid: Option<u32>,
        cgroups: &[PathBuf],
        proot: &Path,
    ) -> ProotSpec {
        let s = |p: &Path| p.to_string_lossy().to_string();
        let rw_host = dir.join("rw");
        // What proot is given: staged paths on a root server, the real
        // ones otherwise.
        let (stage, root_dir, etc_dir, rw, agent) = if uid.is_some() {
            let st = Path::new(STAGE_DIR);
            let mut binds = vec![
                BindSpec {
                    source: s(&root.dir),
                    target: "root".into(),
                    readonly: true,
                    confined: false,
                },
                BindSpec {
                    source: s(&rw_host),
                    target: "rw".into(),
                    readonly: false,
                    confined: false,
                },
                BindSpec {
                    source: s(&self.opts.agent_path),
                    target: "agent".into(),
                    readonly: true,
                    confined: false,
                },
            ];
            if let Some(etc) = &root.etc {
                binds.push(BindSpec {
                    source: s(etc),
                    target: "etc".into(),
                    readonly: true,
                    confined: false,
                });
            }
            (
                Some(Stage {
                    dir: STAGE_DIR.into(),
                    binds,
                    tmp: s(&rw_host.join(".proot")),
                }),
                st.join("root"),
                root.etc.as_ref().map(|_| st.join("etc")),
                st.join("rw"),
                st.join("agent"),
            )
        } else {
            (
                None,
                root.dir.clone(),
                root.etc.clone(),
                rw_host.clone(),
                self.opts.agent_path.clone(),
            )
        };
        let mut args: Vec<String> = vec!["-0".into()];
        args.push("-r".into());
        args.push(s(&root_dir));
        let mut bind = |host: String, guest: &str| {
            args.push("-b".into());
            args.push(format!("{host}:{guest}"));
        };
        for d in &root.host_dirs {
            bind(d.clone(), d);
        }
        if let Some(etc) = &etc_dir {
            bind(s(etc), "/etc");
        }
        for (name, inside, _) in WRITABLE {
            bind(s(&rw.join(name)), inside);
        }
        for dev in DEVICES {
            if std::fs::symlink_metadata(dev).is_ok() {
                bind(dev.to_string(), dev);
            }
        }
        bind("/proc".into(), "/proc");
        bind(s(&agent), AGENT_IN);
        args.extend(
            [
                "-w",
                "/workspace",
                AGENT_IN,
                "serve",
                "--listen-fd",
                "3",
                "--token-file",
                "-",
            ]
            .map(String::from),
        );
        let env = vec![
            (
                "PATH".to_string(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
            ("HOME".into(), "/root".into()),
            ("LANG".into(), "C.UTF-8".into()),
            (MARKER.into(), spec.id.clone()),
        ];
        // Landlock: read/execute the root, the host dirs it shows and
        // what proot itself loads; every access to the sandbox's dirs.
        let mut read = vec![s(&root_dir), s(&agent), "/proc".to_string()];
        if let Some(etc) = &etc_dir {
            read.push(s(etc));
        }
        for d in &root.host_dirs {
            read.push(d.clone());
        }
        for p in [
            "/usr",
            "/lib",
            "/lib64",
            "/etc/ld.so.cache",
            "/etc/ld.so.preload",
        ] {
            read.push(p.into());
        }
        read.push(s(proot));
        read.retain(|p| std::fs::symlink_metadata(p).is_ok() || p.starts_with(STAGE_DIR));
        read.sort();
        read.dedup();
        let devices: Vec<String> = DEVICES
            .iter()
            .filter(|d| std::fs::symlink_metadata(d).is_ok())
            .map(|d| (*d).to_string())
            .collect();
        let (nproc_limit, as_limit) = if cgroups.is_empty() {
            // Without cgroups: RLIMIT_NPROC counts the processes of the
            // leased uid (this sandbox alone); a rootless server's uid is
            // shared with the server, so no process cap there.
            let nproc = if uid.is_some() {
                self.opts.pids_limit
            } else {
                0
            };
            (nproc, (spec.memory_mb.max(0) as u64) << 20)
        } else {
            (0, 0)
        };
        ProotSpec {
            id: spec.id.clone(),
            proot: s(proot),
            args,
            env,
            socket: s(&dir.join("agent.sock")),
            cgroups: cgroups.iter().map(|p| s(p)).collect(),
            stage,
            ids: uid.map(|u| (u, u)),
            nproc_limit,
            as_limit,
            read,
            // proot's scratch dir is /tmp: the sandbox's own `.proot` in
            // a root server's mount namespace, the host's otherwise.
            write: vec![s(&rw), "/tmp".into()],
            devices,
        }
    }

    /// The live connection to a sandbox's agent (reconnecting after a
    /// restart).
    async fn client(&self, id: &str) -> Result<Arc<AgentClient>> {
        self.conns
            .get_or_connect(id, || async {
                let meta = self.meta(id)?;
                if !meta.alive() {
                    return Err(Error::sandbox_not_found(id));
                }
                AgentClient::connect(&self.dir(id).join("agent.sock"), meta.token().as_deref())
                    .await
            })
            .await
    }

    async fn teardown(&self, id: &str, meta: Option<Meta>) {
        self.conns.forget(id);
        let dir = self.dir(id);
        let id = id.to_string();
        let _ =
            tokio::task::spawn_blocking(move || teardown_blocking(&dir, &id, meta.as_ref())).await;
    }

    /// The last lines of a sandbox's console log, for error messages.
    fn console_tail(dir: &Path, n: usize) -> String {
        let text = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].join("; ")
    }

    /// Starts the sandbox's proot and connects to its agent. The caller
    /// removes everything on error.
    async fn start(
        &self,
        spec: &SpawnSpec,
        dir: &Path,
        root: &Root,
        uid: Option<u32>,
        slot: &mut Option<Meta>,
    ) -> Result<Arc<AgentClient>> {
        let proot = self.proot.clone().ok_or_else(|| {
            Error::unavailable(format!(
                "proot binary {:?} not found; install it (Debian: apt-get install proot) or set providers.proot.proot_binary",
                self.opts.proot_binary
            ))
        })?;
        self.make_rw(dir, uid)?;
        let cgroups = match &self.cgroups {
            Some(layout) => cgroup::create(
                layout,
                &spec.id,
                Limits {
                    memory_bytes: (spec.memory_mb.max(0) as u64) << 20,
                    pids: self.opts.pids_limit,
                    cpu_quota_us: (spec.vcpus.max(1) as u64) * 100_000,
                },
            )
            .map_err(|e| Error::internal(format!("creating cgroups: {e}")))?,
            None => Vec::new(),
        };
        let launch = self.launch_spec(spec, dir, root, uid, &cgroups, &proot);
        let token: [u8; 32] = rand::random();
        // Recorded before anything runs: a failure from here on is torn
        // down through this record (cgroups, uid).
        *slot = Some(Meta {
            id: spec.id.clone(),
            image: spec.image.clone(),
            created_at: Utc::now(),
            expires_at: spec.expires_at,
            owner_id: spec.owner_id.clone(),
            tenant_id: spec.tenant_id.clone(),
            metadata: spec.metadata.clone(),
            memory_mb: spec.memory_mb,
            pid: 0,
            start_time: 0,
            boot_id: String::new(),
            uid,
            cgroups: cgroups.clone(),
            token: hex::encode(token),
        });
        let launch_path = dir.join("launch.json");
        std::fs::write(
            &launch_path,
            serde_json::to_vec_pretty(&launch).unwrap_or_default(),
        )
        .map_err(|e| Error::internal("writing the launch spec").with_source(e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("console.log"))
            .map_err(|e| Error::internal("creating the console log").with_source(e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Error::internal("creating the console log").with_source(e))?;
        let mut child = tokio::process::Command::new(&self.opts.agent_path)
            .arg("proot")
            .arg("--spec")
            .arg(&launch_path)
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| {
                Error::unavailable(format!("starting {}", self.opts.agent_path.display()))
                    .with_source(e)
            })?;
        // A launcher (or proot) that dies at once may be gone before it
        // can be identified: that is the same failure as dying later, with
        // the console saying why.
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            return Err(self
                .death_report(dir, &mut child, "it exited at once".into())
                .await);
        };
        let Some(identity) = Identity::of(pid) else {
            return Err(self
                .death_report(dir, &mut child, "it exited at once".into())
                .await);
        };
        if let Some(m) = slot.as_mut() {
            m.pid = pid;
            m.start_time = identity.start_time;
            m.boot_id = identity.boot_id.clone();
        }
        if let Some(m) = slot.as_ref() {
            std::fs::write(
                dir.join("meta.json"),
                serde_json::to_vec(m).unwrap_or_default(),
            )
            .map_err(|e| Error::internal("writing sandbox metadata").with_source(e))?;
        }
        if let Some(mut stdin) = child.stdin.take() {
            let sent = stdin.write_all(hex::encode(token).as_bytes()).await;
            drop(stdin);
            if let Err(e) = sent {
                return Err(self.death_report(dir, &mut child, e.to_string()).await);
            }
        }
        let connect = async {
            let deadline = tokio::time::Instant::now() + START_TIMEOUT;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    return Err(None);
                }
                match AgentClient::connect(&dir.join("agent.sock"), Some(&token)).await {
                    Ok(c) => return Ok(c),
                    Err(e) if tokio::time::Instant::now() >= deadline => return Err(Some(e)),
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        };
        let client = match connect.await {
            Ok(c) => c,
            Err(cause) => {
                let why = cause.map(|e| e.to_string()).unwrap_or_default();
                return Err(self.death_report(dir, &mut child, why).await);
            }
        };
        // Never waited for: the child is reaped by tokio when it exits
        // (and by init after a server restart).
        drop(child);
        // Every command runs through /bin/sh in shell mode: an image
        // without one is no use.
        if client.stat("/bin/sh").await.is_err() {
            return Err(Error::invalid(format!(
                "image {:?} has no /bin/sh; the proot provider needs a POSIX shell in the image",
                if spec.image.is_empty() {
                    "host"
                } else {
                    &spec.image
                }
            )));
        }
        Ok(client)
    }

    /// The error of a sandbox whose proot or agent did not come up.
    async fn death_report(
        &self,
        dir: &Path,
        child: &mut tokio::process::Child,
        cause: String,
    ) -> Error {
        let code = match tokio::time::timeout(Duration::from_millis(500), child.wait()).await {
            Ok(Ok(s)) => s.code().map_or("killed".to_string(), |c| c.to_string()),
            _ => "still running".into(),
        };
        let tail = Self::console_tail(dir, 8);
        Error::unavailable(format!(
            "the proot sandbox did not start (launcher/proot exit: {code}; {cause}): {tail}; check that proot runs on this host (`{} --version`) and `stacyvm doctor`",
            self.opts.proot_binary
        ))
    }
}

#[async_trait]
impl Provider for ProotProvider {
    fn name(&self) -> &str {
        "proot"
    }

    /// Every sandbox was recorded by the server before its spawn was
    /// acknowledged: an unknown one is destroyed, not adopted.
    fn adopts_unknown_runtimes(&self) -> bool {
        false
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
        c.push("user-space".into());
        c
    }

    fn profile(&self) -> Profile {
        Profile {
            isolation: Isolation::Process,
            network_modes: vec!["none".into()],
            default_network: "none".into(),
        }
    }

    fn describe(&self) -> BTreeMap<String, String> {
        let limits = if self.cgroups.is_some() {
            "cgroups (memory, pids, cpu)"
        } else if self.rootless {
            "RLIMIT_AS per process (no cgroup delegated; no process cap)"
        } else {
            "RLIMIT_AS per process, RLIMIT_NPROC per sandbox uid"
        };
        BTreeMap::from([
            ("type".to_string(), "proot".to_string()),
            (
                "proot".to_string(),
                self.proot
                    .as_ref()
                    .map_or_else(|| "not found".into(), |p| p.display().to_string()),
            ),
            (
                "agent_path".to_string(),
                self.opts.agent_path.display().to_string(),
            ),
            (
                "state_dir".to_string(),
                self.opts.base.display().to_string(),
            ),
            ("images".to_string(), self.images.names().join(",")),
            ("limits".to_string(), limits.to_string()),
            (
                "mode".to_string(),
                if self.rootless {
                    "rootless (sandboxes run as the server's uid; host network)".into()
                } else {
                    "root (a leased uid, private mount and network namespace per sandbox)".into()
                },
            ),
            (
                "landlock".to_string(),
                if self.landlock {
                    "enforced"
                } else {
                    "unavailable"
                }
                .to_string(),
            ),
            ("isolation".to_string(), "user-space".to_string()),
        ])
    }

    async fn health(&self) -> Result<()> {
        if self.proot.is_none() {
            return Err(Error::unavailable(format!(
                "proot binary {:?} not found in PATH; install it (Debian: apt-get install proot) or set providers.proot.proot_binary",
                self.opts.proot_binary
            )));
        }
        if crate::agent::elf_is_static(&self.opts.agent_path) != Some(true) {
            return Err(Error::unavailable(format!(
                "agent {} is missing or not a static binary (images have no host libc); build one with scripts/build-agent or set STACYVM_AGENT_PATH",
                self.opts.agent_path.display()
            )));
        }
        let meta = std::fs::metadata(&self.opts.base).map_err(|e| {
            Error::unavailable(format!(
                "state dir {} is not usable",
                self.opts.base.display()
            ))
            .with_source(e)
        })?;
        if !meta.is_dir() {
            return Err(Error::unavailable(format!(
                "{} is not a directory",
                self.opts.base.display()
            )));
        }
        Ok(())
    }

    async fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned> {
        if !paths::is_sandbox_id(&spec.id) {
            return Err(Error::invalid(format!("bad sandbox id {:?}", spec.id)));
        }
        if spec.memory_mb < 16 {
            return Err(Error::invalid(format!(
                "memory_mb {} is below the minimum of 16",
                spec.memory_mb
            )));
        }
        if self.opts.max_memory_mb > 0 && spec.memory_mb > self.opts.max_memory_mb {
            return Err(Error::invalid(format!(
                "memory_mb {} exceeds providers.proot.max_memory_mb ({})",
                spec.memory_mb, self.opts.max_memory_mb
            )));
        }
        if spec.vcpus < 1 || spec.vcpus > 256 {
            return Err(Error::invalid(format!(
                "vcpus {} must be between 1 and 256",
                spec.vcpus
            )));
        }
        match spec.network_mode.as_str() {
            "" | "none" => {}
            other => {
                return Err(Error::invalid(format!(
                    "unsupported network_mode {other:?} for the proot provider (allowed: none)"
                )))
            }
        }
        let root = self.root_for(&spec.image)?;
        {
            let mut starting = self.starting.lock().map_err(|_| Error::internal("lock"))?;
            let max = self.opts.max_sandboxes;
            if max > 0 && self.live_count() + *starting >= max {
                return Err(Error::limit(format!(
                    "proot sandboxes: max sandboxes reached ({max}, providers.proot.max_sandboxes)"
                )));
            }
            *starting += 1;
        }
        let res = self.spawn_counted(spec, &root).await;
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
        // A frozen agent cannot answer a ping: ask the freezer first.
        if let Ok(meta) = self.meta(id) {
            if meta.alive() && cgroup::is_frozen(&meta.cgroups) {
                return Ok(RuntimeStatus {
                    state: "paused".into(),
                });
            }
        }
        crate::agent::conns::ping_status(id, self.client(id).await).await
    }

    /// The cgroup freezer: proot, the agent and every process it traces
    /// stop where they stand.
    async fn pause(&self, id: &str) -> Result<()> {
        self.freeze(id, true).await
    }

    async fn resume(&self, id: &str) -> Result<()> {
        self.freeze(id, false).await
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

    async fn local_images(&self) -> Vec<String> {
        self.images().names()
    }

    async fn stats(&self, id: &str) -> Result<Stats> {
        let meta = self.meta(id)?;
        if !meta.alive() {
            return Err(Error::sandbox_not_found(id));
        }
        if meta.cgroups.is_empty() {
            return Err(Error::unsupported(
                "proot: stats need cgroups (this server has none it may create)",
            ));
        }
        Ok(crate::native::cgroup_stats(&meta.cgroups, meta.memory_mb).await)
    }

    /// proot's and the agent's stderr (the last `lines` lines; the file
    /// counts against the sandbox's disk cap).
    async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>> {
        self.meta(id)?;
        let text = tokio::fs::read_to_string(self.dir(id).join("console.log"))
            .await
            .unwrap_or_default();
        let all: Vec<String> = text
            .lines()
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

impl ProotProvider {
    async fn spawn_counted(&self, spec: &SpawnSpec, root: &Root) -> Result<Spawned> {
        let dir = self.dir(&spec.id);
        if std::fs::symlink_metadata(&dir).is_ok() {
            return Err(Error::conflict(format!("sandbox {} exists", spec.id)));
        }
        crate::native::create_private_dir(&dir)?;
        let uid = match &self.ids {
            Some(a) => match a.allocate(&dir) {
                Ok(u) => Some(u),
                Err(e) => {
                    remove_tree(&dir);
                    return Err(e);
                }
            },
            None => None,
        };
        let mut slot = None;
        match self.start(spec, &dir, root, uid, &mut slot).await {
            Ok(c) => {
                self.conns.insert(&spec.id, c);
                info!(sandbox_id = %spec.id, image = %spec.image, "proot sandbox started");
                Ok(Spawned {
                    runtime_id: spec.id.clone(),
                })
            }
            Err(e) => {
                let cgroups = slot.as_ref().map(|m| m.cgroups.clone());
                self.teardown(&spec.id, slot).await;
                if let Some(base) = uid {
                    ids::release_lease(base);
                }
                if let Some(cg) = cgroups {
                    let _ = tokio::task::spawn_blocking(move || cgroup::destroy(&cg)).await;
                }
                Err(e)
            }
        }
    }
}
