//! The warm pool: sandboxes booted ahead of time so a spawn only claims one.
//!
//! A pool sandbox is a complete native sandbox (image `host`, network
//! `none`) under `sandboxes/pool-<hex>/`, with its agent connected. Claiming
//! one for sandbox `sb-…` renames its state dir and cgroups to the new id,
//! writes the spawn's limits into its cgroups (unless they are the pool's),
//! sets its hostname (the claiming thread enters its UTS namespace for one
//! call and returns) and records its
//! metadata: the result is indistinguishable from a sandbox booted for the
//! spawn, in a fraction of the time. The pool refills in the background
//! after every claim. Pool sandboxes never appear in the runtime inventory;
//! a restarted server removes the previous server's pool.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chrono::Utc;
use stacyvm_core::provider::SpawnSpec;
use stacyvm_core::{Error, Result};
use stacyvm_sandbox::cgroup::{self, Limits};
use tracing::{debug, warn};

use super::{teardown_state, Booter, Meta};
use crate::agent::AgentClient;

/// Name prefix of pool sandboxes' state dirs (never a sandbox id).
pub(crate) const PREFIX: &str = "pool-";

/// A booted, connected sandbox waiting to be claimed.
#[derive(Debug)]
pub(crate) struct Warm {
    pub meta: Meta,
    /// Its state dir.
    pub dir: std::path::PathBuf,
    pub client: Arc<AgentClient>,
    /// The cgroup limits it was booted with.
    pub limits: Limits,
}

#[derive(Debug)]
pub(crate) struct Pool {
    size: usize,
    ready: Mutex<Vec<Warm>>,
    /// Boots in flight.
    filling: AtomicUsize,
    /// Set at shutdown: no refills; boots that finish tear themselves down.
    closed: std::sync::atomic::AtomicBool,
}

/// The last owner of the pool went away without `close` (a provider
/// dropped while boots were in flight, a runtime shut down): the sandboxes
/// still waiting are torn down here, synchronously, so none outlives it.
impl Drop for Pool {
    fn drop(&mut self) {
        let ready = self.ready.get_mut().map(std::mem::take).unwrap_or_default();
        for w in ready {
            drop(Unhanded {
                dir: w.dir,
                meta: Some(w.meta),
            });
        }
    }
}

impl Pool {
    pub fn new(size: usize) -> Self {
        Pool {
            size,
            ready: Mutex::new(Vec::new()),
            filling: AtomicUsize::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Stops refills; boots in flight tear themselves down when they end.
    pub fn stop_refills(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Stops the pool and tears down every sandbox it holds, waiting (at
    /// most `wait`) for boots in flight. Pool sandboxes hold no user state:
    /// none may outlive the server that booted them.
    pub async fn close(&self, booter: &Booter, wait: std::time::Duration) {
        self.closed.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let drained: Vec<Warm> = self
                .ready
                .lock()
                .map(|mut r| std::mem::take(&mut *r))
                .unwrap_or_default();
            for w in drained {
                let dir = booter.opts.state_dir.join("sandboxes").join(&w.meta.id);
                teardown_state(dir, Some(w.meta), booter.bridge.clone()).await;
            }
            if self.filling.load(Ordering::SeqCst) == 0 || tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn ready_count(&self) -> usize {
        self.ready.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Takes a ready sandbox whose init is still alive.
    pub fn take(&self) -> Option<Warm> {
        let mut ready = self.ready.lock().ok()?;
        while let Some(w) = ready.pop() {
            if w.meta.init_alive() {
                return Some(w);
            }
        }
        None
    }

    /// Starts background boots until ready + in flight reaches the size.
    /// Needs a tokio runtime; without one it does nothing (the next spawn
    /// calls it again).
    pub fn refill(self: &Arc<Self>, booter: &Arc<Booter>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        loop {
            let have = self.ready_count() + self.filling.load(Ordering::SeqCst);
            if have >= self.size {
                return;
            }
            self.filling.fetch_add(1, Ordering::SeqCst);
            let pool = self.clone();
            let booter = booter.clone();
            // A runtime task: a runtime that shuts down drops the boot at
            // its next await, and the boot's unwind guard returns its id
            // lease and cgroups. (Running boots on blocking threads kept
            // them off the claiming worker, but a boot that ended during a
            // shutdown could no longer clean up: its id lease leaked.)
            rt.spawn(pool.fill_one(booter));
        }
    }

    /// Boots one sandbox into the pool (counted in `filling` by the caller).
    async fn fill_one(self: Arc<Self>, booter: Arc<Booter>) {
        match boot_one(&booter, &self.closed).await {
            Ok(w) if self.closed.load(Ordering::SeqCst) => {
                let dir = booter.opts.state_dir.join("sandboxes").join(&w.meta.id);
                teardown_state(dir, Some(w.meta), booter.bridge.clone()).await;
            }
            Ok(w) => {
                if let Ok(mut r) = self.ready.lock() {
                    r.push(w);
                }
            }
            // Not retried until the next claim: a persistent failure (e.g.
            // out of pids) must not spin.
            Err(e) => warn!(error = %e, "booting a warm pool sandbox failed"),
        }
        self.filling.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn boot_one(booter: &Booter, closed: &std::sync::atomic::AtomicBool) -> Result<Warm> {
    let id = format!("{PREFIX}{:08x}", rand::random::<u32>());
    let spec = SpawnSpec {
        id: id.clone(),
        image: "host".into(),
        memory_mb: booter.opts.pool_memory_mb,
        vcpus: 1,
        metadata: Default::default(),
        owner_id: String::new(),
        tenant_id: String::new(),
        expires_at: Utc::now() + chrono::Duration::days(3650),
        network_mode: "none".into(),
        snapshot: None,
        egress: None,
        volumes: Vec::new(),
    };
    let dir = booter.opts.state_dir.join("sandboxes").join(&id);
    let memory_bytes = (spec.memory_mb.max(16) as u64) * 1024 * 1024;
    let meta = match booter.boot(&spec, memory_bytes, &dir).await {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    // Until the sandbox is handed to the pool, a boot dropped at an await
    // (its runtime shutting down) tears it down on the spot.
    let mut guard = Unhanded {
        dir: dir.clone(),
        meta: Some(meta.clone()),
    };
    // The provider went away while this boot ran: nobody will claim or
    // tear down this sandbox (its init is killed before the first await).
    if closed.load(Ordering::SeqCst) {
        teardown_state(dir, guard.meta.take(), booter.bridge.clone()).await;
        return Err(Error::unavailable("the warm pool was closed during a boot"));
    }
    let ready = std::fs::write(
        dir.join("meta.json"),
        serde_json::to_vec(&meta).unwrap_or_default(),
    )
    .map_err(|e| Error::internal("writing pool metadata").with_source(e));
    let client = match ready {
        Ok(()) => AgentClient::connect(&dir.join("agent.sock"), meta.token().as_deref()).await,
        Err(e) => Err(e),
    };
    match client {
        Ok(client) => {
            debug!(pool_id = %id, "warm pool sandbox ready");
            guard.meta = None;
            Ok(Warm {
                meta,
                dir: guard.dir.clone(),
                client,
                limits: booter.limits(&spec, memory_bytes),
            })
        }
        Err(e) => {
            teardown_state(dir, guard.meta.take(), booter.bridge.clone()).await;
            Err(e)
        }
    }
}

/// A booted pool sandbox not yet handed over. Dropped armed (its boot
/// cancelled at an await), it is torn down synchronously: init killed,
/// cgroups, state dir and id lease gone. Pool sandboxes have no network.
struct Unhanded {
    dir: std::path::PathBuf,
    meta: Option<Meta>,
}

impl Drop for Unhanded {
    fn drop(&mut self) {
        let Some(meta) = self.meta.take() else {
            return;
        };
        let init = meta.init();
        if let Some(i) = &init {
            i.kill();
        }
        for _ in 0..500 {
            if !init.as_ref().is_some_and(super::Identity::alive) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        cgroup::destroy(&meta.cgroups);
        let _ = super::remove_tree(&self.dir);
        if let Some(base) = meta.id_base {
            super::ids::release_lease(base);
        }
    }
}

/// Turns a warm sandbox into `spec`'s sandbox (see the module docs).
/// On error the warm sandbox is gone (torn down) and nothing named
/// `spec.id` is left behind.
pub(crate) async fn claim(
    booter: &Booter,
    warm: Warm,
    spec: &SpawnSpec,
    limits: Limits,
) -> Result<(Meta, Arc<AgentClient>)> {
    let base = booter.opts.state_dir.join("sandboxes");
    let old_dir = base.join(&warm.meta.id);
    let new_dir = base.join(&spec.id);
    let mut meta = warm.meta;
    if let Err(e) = std::fs::rename(&old_dir, &new_dir) {
        teardown_state(old_dir, Some(meta), booter.bridge.clone()).await;
        return Err(Error::internal("claiming a pool sandbox").with_source(e));
    }
    if let (Some(ids), Some(base)) = (&booter.ids, meta.id_base) {
        ids.reassign(base, &new_dir);
    }
    let res = (|| {
        // cgroups take the sandbox's name (kept as they are if the
        // hierarchy refuses the rename: meta records the real paths).
        for dir in &mut meta.cgroups {
            let renamed = dir.with_file_name(&spec.id);
            if std::fs::rename(&*dir, &renamed).is_ok() {
                *dir = renamed;
            }
        }
        // A spawn asking for the pool's own size keeps the limits the
        // sandbox was booted with.
        if limits != warm.limits {
            cgroup::set_limits(&meta.cgroups, limits)
                .map_err(|e| Error::internal(format!("applying limits: {e}")))?;
        }
        set_hostname(&meta, &spec.id)?;
        meta.id = spec.id.clone();
        meta.image = spec.image.clone();
        meta.created_at = Utc::now();
        meta.expires_at = spec.expires_at;
        meta.owner_id = spec.owner_id.clone();
        meta.tenant_id = spec.tenant_id.clone();
        meta.metadata = spec.metadata.clone();
        meta.memory_mb = spec.memory_mb;
        super::rewrite_in_place(
            &new_dir.join("meta.json"),
            &serde_json::to_vec(&meta).unwrap_or_default(),
        )
        .map_err(|e| Error::internal("writing sandbox metadata").with_source(e))
    })();
    match res {
        Ok(()) => Ok((meta, warm.client)),
        Err(e) => {
            teardown_state(new_dir, Some(meta), booter.bridge.clone()).await;
            Err(e)
        }
    }
}

/// Sets the hostname inside the claimed sandbox: the calling thread joins
/// the sandbox's UTS namespace for one `sethostname` and returns to its own
/// before anything else runs on it (no await in between). A thread that
/// cannot return aborts the server rather than serve from a sandbox's
/// namespace. Done in place because a helper thread costs more than the
/// whole claim when the CPUs are busy (its wake-up waits for a CPU).
fn set_hostname(meta: &Meta, name: &str) -> Result<()> {
    use nix::sched::{setns, CloneFlags};
    thread_local! {
        /// This thread's own UTS namespace, opened before it ever left it.
        static HOME: std::io::Result<std::fs::File> = std::fs::File::open("/proc/thread-self/ns/uts");
    }
    // Only the recorded init's namespace: a reused pid must never lead the
    // server into a stranger's (or the host's) UTS namespace.
    let init = meta
        .init()
        .ok_or_else(|| Error::internal("the warm sandbox's init is gone"))?;
    let ns = init
        .open_ns("uts")
        .map_err(|e| Error::internal("opening the sandbox UTS namespace").with_source(e))?;
    HOME.with(|home| {
        let home = home
            .as_ref()
            .map_err(|e| Error::internal(format!("opening this thread's UTS namespace: {e}")))?;
        setns(&ns, CloneFlags::CLONE_NEWUTS)
            .map_err(|e| Error::internal("entering the sandbox UTS namespace").with_source(e))?;
        let set = nix::unistd::sethostname(name);
        if let Err(e) = setns(home, CloneFlags::CLONE_NEWUTS) {
            tracing::error!(error = %e, "a server thread could not leave a sandbox's UTS namespace; aborting");
            std::process::abort();
        }
        set.map_err(|e| Error::internal("setting the sandbox hostname").with_source(e))
    })
}

/// Removes pool sandboxes a previous server left (they are not sandboxes
/// anyone owns). Synchronous: runs at provider construction.
pub(crate) fn clear_leftovers(sandboxes: &Path) {
    let Ok(rd) = std::fs::read_dir(sandboxes) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with(PREFIX) {
            continue;
        }
        let dir = e.path();
        let meta: Option<Meta> = std::fs::read(dir.join("meta.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(m) = &meta {
            // Only the recorded process: after a reboot the pid is someone else's.
            if let Some(init) = m.init() {
                init.kill();
                for _ in 0..5_000 {
                    if !init.alive() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
            cgroup::destroy(&m.cgroups);
        }
        let _ = super::remove_tree(&dir);
        if let Some(base) = meta.as_ref().and_then(|m| m.id_base) {
            super::ids::release_lease(base);
        }
    }
}
