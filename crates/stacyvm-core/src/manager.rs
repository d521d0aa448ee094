//! The orchestrator: sandbox lifecycle, admission, exec and file routing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};
use serde_json::json;
use stacyvm_api::{
    duration, state, AdmissionDecision, FileInfo, GoDuration, Sandbox, SpawnRequest,
};
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::events::{self, kind, EventBus};
use crate::execs::{Attachment, ExecInfo, Finish, JournalItem};
use crate::metrics::Metrics;
use crate::paths;
use crate::provider::{
    find_account, Account, ExecSpec, ExecUser, ExitStatus, FileStream, OutputChunk, Provider,
    SpawnSpec, StreamKind,
};
use crate::registry::Registry;
use crate::services;
use crate::store::{
    ExecLogRecord, OpAuditRecord, QuotaRecord, SandboxRecord, Store, TemplateRecord,
};

mod idle;
pub mod migrate;
pub mod network;
mod pause;
mod pools;
mod setup;
pub use idle::on_timeout;
pub use setup::{check_template, RESERVED_PREFIX};
mod builds;
mod context;
mod environments;
pub mod placement;
mod registries;
mod snapshots;
mod vmpool;
mod volumes;
pub mod workers;
pub use snapshots::{summary as snapshot_summary, MAX_FORK};

/// Id of the control plane's own worker.
pub const LOCAL_WORKER: &str = "local";
/// Lease grace after expiry.
const LEASE_GRACE: Duration = Duration::from_secs(300);
/// Characters of an operation audit row's resource (an exec's command
/// line) that are kept.
pub const MAX_AUDIT_RESOURCE: usize = 256;
/// Upper bound of `limits.exec_output_bytes`: captured stdout/stderr of a
/// synchronous exec never exceeds this many bytes each.
pub const MAX_CAPTURE: usize = 32 * 1024 * 1024;

/// Which sandboxes a caller reaches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scope {
    /// Its tenant's sandboxes; without a tenant, every tenant's (the
    /// system, the admin key, an open server).
    #[default]
    Global,
    /// Only its tenant's sandboxes; "" is a tenant of its own (the
    /// sandboxes of callers without a tenant).
    Tenant,
    /// Only the sandboxes of its tenant that it owns.
    Owner,
}

/// Who is asking, for ownership, tenancy and audit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// Owner id to stamp on new sandboxes (already authorised).
    pub owner_id: String,
    /// Tenant of the verified identity; "" = none (see [`Scope`]).
    pub tenant_id: String,
    /// Audit actor.
    pub actor: String,
    pub request_id: String,
    pub scope: Scope,
    /// May name another owner in a spawn body's `owner_id` (a credential
    /// acting for its users); otherwise a foreign `owner_id` is 403.
    pub names_owners: bool,
}

impl Caller {
    /// Whether this caller reaches every tenant's sandboxes.
    pub fn sees_all_tenants(&self) -> bool {
        self.scope == Scope::Global && self.tenant_id.is_empty()
    }

    /// Whether `r` is visible to this caller (tenancy, then ownership).
    pub fn sees(&self, r: &SandboxRecord) -> bool {
        // A warm-pool sandbox is nobody's until it is claimed; a pool
        // host is the server's alone.
        if r.metadata.contains_key(setup::POOL_KEY) || r.is_pool_host() {
            return false;
        }
        self.sees_owned(&r.tenant_id, &r.owner_id)
    }

    /// Whether something of `tenant_id` and `owner_id` (a sandbox, a
    /// snapshot, a volume, a spec, a registry connection) is visible to
    /// this caller: tenancy, then ownership for owner-scoped callers.
    pub fn sees_owned(&self, tenant_id: &str, owner_id: &str) -> bool {
        self.sees_all_tenants()
            || (tenant_id == self.tenant_id
                && (self.scope != Scope::Owner || owner_id == self.owner_id))
    }

    /// The owner of a new sandbox. A body `owner_id` other than the
    /// caller's own is 403 unless the caller may name owners; then the
    /// caller's own (`X-User-ID`) still wins when it has one.
    pub fn owner_for(&self, asked: &str) -> Result<String> {
        let asked = asked.trim();
        if asked.is_empty() || asked == self.owner_id {
            return paths::normalize_owner(&self.owner_id);
        }
        if !self.names_owners {
            return Err(Error::forbidden(format!(
                "owner_id {asked:?} names another owner; this credential may not act for other users"
            )));
        }
        if !self.owner_id.is_empty() {
            return paths::normalize_owner(&self.owner_id);
        }
        paths::normalize_owner(asked)
    }
}

/// A directory to list: normalized, and empty meaning `/`.
fn dir_path(path: &str) -> Result<String> {
    if path.trim().is_empty() {
        Ok("/".to_string())
    } else {
        paths::normalize(path)
    }
}

/// `uid` or `uid:gid` as an identity; `None` for a name.
fn numeric_user(s: &str) -> Result<Option<ExecUser>> {
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let digits = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
    if !digits(u) || g.is_some_and(|g| !digits(g)) {
        if g.is_some() {
            return Err(Error::invalid(format!(
                "user {s:?}: expected a name, uid or uid:gid"
            )));
        }
        return Ok(None);
    }
    let parse = |v: &str| {
        v.parse::<u32>()
            .ok()
            .filter(|n| *n < 65536)
            .ok_or_else(|| Error::invalid(format!("user {s:?}: ids run from 0 to 65535")))
    };
    let uid = parse(u)?;
    let gid = match g {
        Some(g) => parse(g)?,
        None => uid,
    };
    Ok(Some(ExecUser { uid, gid }))
}

/// A resolved exec request.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub command: String,
    pub args: Vec<String>,
    pub mode: String,
    pub env: BTreeMap<String, String>,
    pub workdir: String,
    pub timeout: String,
    pub stdin: Option<Vec<u8>>,
    /// Pseudo-terminal size (rows, cols), if any.
    pub pty: Option<(u16, u16)>,
    /// Run as this account of the sandbox: a name from its `/etc/passwd`
    /// (whose home becomes `HOME` and the default working directory) or
    /// a numeric `uid[:gid]`. Empty = root.
    pub user: Option<String>,
}

/// Metadata kept with a sandbox but never shown by the API: the E2B
/// layer's `envVars` for the sandbox's processes (values are often
/// secrets, and E2B never returns them either).
pub const HIDDEN_METADATA: &[&str] = &["e2b.envs"];

/// The result of a synchronous exec.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecOutcome {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub duration: Duration,
}

/// Items of a streamed exec.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Output(OutputChunk),
    Exit {
        code: i32,
        duration: Duration,
    },
    /// The stream ended abnormally (timeout or provider error): its kind,
    /// and the message for the client.
    Failed {
        kind: ErrorKind,
        message: String,
    },
}

/// Spawn-queue counters for diagnostics.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub queued_total: AtomicU64,
    pub dequeued_total: AtomicU64,
    pub timeouts: AtomicU64,
    pub wait_count: AtomicU64,
    pub wait_total_ms: AtomicU64,
    pub wait_max_ms: AtomicU64,
    pub depth: AtomicUsize,
}

#[derive(Debug, Default)]
struct Admission {
    total: i64,
    per_owner: HashMap<String, i64>,
}

#[derive(Debug, Clone, Copy)]
enum Deny {
    Ttl,
    Total(i64),
    PerOwner(i64),
}

/// The sandbox orchestrator.
#[derive(Debug)]
pub struct Manager {
    cfg: Arc<Config>,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    events: Arc<EventBus>,
    metrics: Arc<Metrics>,
    cache: RwLock<HashMap<String, Arc<SandboxRecord>>>,
    admission: Mutex<Admission>,
    capacity_changed: Notify,
    pub queue: QueueStats,
    audit_tx: mpsc::Sender<AuditItem>,
    started: Instant,
    /// How sandboxes of other workers are reached (a cluster); `None` on a
    /// single machine.
    remote: RwLock<Option<Arc<dyn crate::cluster::Remote>>>,
    /// When the admin audit was last pruned ([`services::Audit`]).
    pub(crate) audit_pruned: Mutex<Option<Instant>>,
    /// Exposed ports the preview proxy has looked up recently.
    previews: services::previews::PreviewCache,
    /// Streamed execs and their output journals (resumable streams).
    execs: crate::execs::ExecJournal,
    /// Pause and resume one at a time (a resume moves the expiry once).
    pause_lock: tokio::sync::Mutex<()>,
    /// Activity clocks of sandboxes with an idle timeout.
    activity: Arc<idle::Activity>,
    /// Template warm pools.
    pools: pools::Pools,
    /// Where volumes keep their data (`None`: no volumes on this server).
    volume_host: RwLock<Option<Arc<dyn crate::volumes::VolumeHost>>>,
    /// Volumes claimed by spawns in flight.
    volume_claims: Arc<volumes::Claims>,
    /// Environment builds: the queue and the running build.
    builds: builds::Builds,
    /// Pool mode's placement and counters.
    vmpool: vmpool::VmPool,
}

#[derive(Debug)]
enum AuditItem {
    Op(OpAuditRecord),
    Exec(ExecLogRecord),
}

impl Manager {
    /// Creates the manager and its background audit writer.
    pub fn new(
        cfg: Arc<Config>,
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        events: Arc<EventBus>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (audit_tx, audit_rx) = mpsc::channel(4096);
        let cfg_exec = cfg.exec.clone();
        let m = Arc::new(Manager {
            cfg,
            store: store.clone(),
            registry,
            events,
            metrics,
            cache: RwLock::new(HashMap::new()),
            admission: Mutex::new(Admission::default()),
            capacity_changed: Notify::new(),
            queue: QueueStats::default(),
            audit_tx,
            started: Instant::now(),
            remote: RwLock::new(None),
            audit_pruned: Mutex::new(None),
            previews: services::previews::PreviewCache::default(),
            execs: crate::execs::ExecJournal::new(crate::execs::JournalLimits {
                buffer_bytes: usize::try_from(cfg_exec.buffer_bytes).unwrap_or(usize::MAX),
                history_bytes: usize::try_from(cfg_exec.history_bytes).unwrap_or(usize::MAX),
                keep_finished: cfg_exec.keep_finished.std(),
                keep_per_sandbox: cfg_exec.keep_per_sandbox as usize,
                max_running_per_sandbox: cfg_exec.max_running_per_sandbox as usize,
            }),
            pause_lock: tokio::sync::Mutex::new(()),
            activity: Arc::default(),
            pools: pools::Pools::default(),
            builds: builds::Builds::default(),
            vmpool: vmpool::VmPool::default(),
            volume_host: RwLock::new(None),
            volume_claims: Arc::default(),
        });
        tokio::spawn(audit_writer(store, audit_rx));
        // Another control plane changed a sandbox: drop the cached copy
        // (the next lookup reads the store).
        let weak = Arc::downgrade(&m);
        let mut remote = m.events.subscribe_remote();
        tokio::spawn(async move {
            loop {
                let ev = match remote.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Missed some: forget every cached record.
                        match weak.upgrade() {
                            Some(m) => m.cache.write().clear(),
                            None => return,
                        }
                        continue;
                    }
                    Err(_) => return,
                };
                let Some(m) = weak.upgrade() else { return };
                if !ev.sandbox_id.is_empty()
                    && (ev.kind.starts_with("sandbox.") || ev.kind.starts_with("preview."))
                {
                    m.previews.evict(&ev.sandbox_id);
                }
                if !ev.sandbox_id.is_empty() && ev.kind.starts_with("sandbox.") {
                    m.lease_changed(&ev.sandbox_id);
                    let gone = m.cache.write().remove(&ev.sandbox_id);
                    // Spawned here, destroyed there: its slot is free again.
                    if let (Some(rec), true) = (gone, ev.kind == kind::SANDBOX_DESTROYED) {
                        m.release_slot(&rec.owner_id);
                    }
                }
            }
        });
        m
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// The store, for the binary's maintenance commands and for tests.
    /// Request handlers go through the manager and its services instead.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
    /// Templates: CRUD with validation and defaults.
    pub fn templates(&self) -> services::Templates<'_> {
        services::Templates { m: self }
    }
    /// Per-owner quotas: CRUD, usage, events and queue wake-ups.
    pub fn quotas(&self) -> services::Quotas<'_> {
        services::Quotas { m: self }
    }
    /// Tenants, members and policies.
    pub fn tenancy(&self) -> services::Tenancy<'_> {
        services::Tenancy { m: self }
    }
    /// The audit trail: writes, retention and exports.
    pub fn previews(&self) -> services::Previews<'_> {
        services::Previews { m: self }
    }

    pub(crate) fn previews_cache(&self) -> &services::previews::PreviewCache {
        &self.previews
    }

    /// A sandbox's record for work no caller asked for (the preview
    /// proxy): the cache, else the store.
    pub async fn live_record(&self, id: &str) -> Result<Arc<SandboxRecord>> {
        if let Some(r) = self.cache.read().get(id).cloned() {
            return Ok(r);
        }
        let rec = match self.store.get_sandbox(id).await {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::sandbox_not_found(id)),
            Err(e) => return Err(e),
        };
        if rec.state == state::DESTROYED {
            return Err(Error::sandbox_destroyed(id));
        }
        Ok(Arc::new(rec))
    }

    /// A TCP connection to `port` inside sandbox `id`, wherever it runs
    /// (the preview proxy, after [`services::Previews::admit`]).
    pub async fn connect_port(&self, id: &str, port: u16) -> Result<crate::provider::PortStream> {
        let rec = self.live_record(id).await?;
        // A preview request wakes a paused sandbox.
        let rec = self
            .wake(
                rec,
                &Caller {
                    actor: "system:preview".into(),
                    ..Caller::default()
                },
            )
            .await?;
        let provider = self.provider_of(&rec).await?;
        let target = rec.runtime_id().to_string();
        provider.connect(&target, port).await
    }

    /// An operation audit row about `rec` (services' changes).
    pub(crate) fn audit_op(
        &self,
        caller: &Caller,
        rec: &SandboxRecord,
        action: &str,
        resource: &str,
        ok: bool,
        detail: String,
    ) {
        self.audit(
            caller,
            &rec.owner_id,
            action,
            &rec.id,
            resource,
            &rec.provider,
            ok,
            detail,
        );
    }

    pub fn audit_trail(&self) -> services::Audit<'_> {
        services::Audit { m: self }
    }
    /// Is the store reachable? Its engine name either way.
    pub async fn store_health(&self) -> (Result<()>, &'static str) {
        (self.store.ping().await, self.store.engine())
    }
    /// Every sandbox not yet destroyed, of every control plane and worker.
    pub async fn active_records(&self) -> Result<Vec<SandboxRecord>> {
        self.store.list_active_sandboxes().await
    }
    /// Every sandbox lease (held or expired).
    pub async fn leases(&self) -> Result<Vec<crate::store::LeaseRecord>> {
        self.store.list_leases().await
    }
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
    /// This process's worker id: `worker.id` when set (every control plane
    /// of a cluster has its own), else `local` (one machine).
    pub fn worker_id(&self) -> &str {
        if self.cfg.worker.id.is_empty() {
            LOCAL_WORKER
        } else {
            &self.cfg.worker.id
        }
    }

    /// Tells the remote seam a sandbox's lease changed (see
    /// [`crate::cluster::Remote::lease_changed`]).
    pub(crate) fn lease_changed(&self, sandbox: &str) {
        if let Some(r) = self.remote.read().as_ref() {
            r.lease_changed(sandbox);
        }
    }

    /// Makes this a control plane of a cluster: sandboxes of other
    /// workers are reached through `remote`, and spawns are placed on any
    /// eligible worker.
    pub fn attach_remote(&self, remote: Arc<dyn crate::cluster::Remote>) {
        *self.remote.write() = Some(remote);
    }

    /// Whether this control plane places sandboxes on other workers.
    pub fn is_clustered(&self) -> bool {
        self.remote.read().is_some()
    }

    /// The provider that acts on `rec`: a local one, or the sandbox's
    /// worker through its RPC.
    pub async fn provider_of(&self, rec: &SandboxRecord) -> Result<Arc<dyn Provider>> {
        if self.owns(rec) {
            return self.registry.get(&rec.provider);
        }
        let Some(remote) = self.remote.read().clone() else {
            return Err(Error::unavailable(format!(
                "sandbox {} lives on worker {:?}; this control plane has no worker RPC configured",
                rec.id, rec.worker_id
            )));
        };
        let worker = match self.store.get_worker(&rec.worker_id).await {
            Ok(w) => w,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::unavailable(format!(
                    "sandbox {} lives on worker {:?}, which is not registered",
                    rec.id, rec.worker_id
                )))
            }
            Err(e) => return Err(e),
        };
        remote.provider(&worker, &rec.provider).await
    }

    /// Who holds (or should hold) the lease of `rec`.
    fn holder_of<'a>(&'a self, rec: &'a SandboxRecord) -> &'a str {
        if self.owns(rec) {
            self.worker_id()
        } else {
            &rec.worker_id
        }
    }

    /// Whether a sandbox lives here. On SQLite (one machine) the rows
    /// written before this control plane had an id of its own (`local`,
    /// or empty in old rows) are its own too.
    pub fn owns(&self, rec: &SandboxRecord) -> bool {
        rec.worker_id == self.worker_id()
            || (self.store.engine() == "sqlite"
                && (rec.worker_id.is_empty() || rec.worker_id == LOCAL_WORKER))
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The wire object for a record.
    pub fn to_api(&self, r: &SandboxRecord) -> Sandbox {
        Sandbox {
            id: r.id.clone(),
            state: r.state.clone(),
            provider: r.provider.clone(),
            image: r.image.clone(),
            memory_mb: r.memory_mb,
            vcpus: r.vcpus,
            owner_id: r.owner_id.clone(),
            tenant_id: r.tenant_id.clone(),
            vm_id: r.vm_id.clone(),
            worker_id: r.worker_id.clone(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            metadata: {
                let shown: BTreeMap<String, String> = r
                    .metadata
                    .iter()
                    .filter(|(k, _)| {
                        !HIDDEN_METADATA.contains(&k.as_str()) && !k.starts_with(RESERVED_PREFIX)
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (!shown.is_empty()).then_some(shown)
            },
            preview_domain: self.cfg.server.preview_domain.clone(),
            idle_timeout: idle::shown(r).0,
            on_timeout: idle::shown(r).1,
            network: network::policy_of(&r.metadata),
            auto_resume: (!pause::auto_resumes(r)).then_some(false),
        }
    }

    // ----- lookup -------------------------------------------------------

    /// Finds a live sandbox visible to `caller`.
    pub async fn get(&self, id: &str, caller: &Caller) -> Result<Arc<SandboxRecord>> {
        if let Some(r) = self.cache.read().get(id).cloned() {
            return check_tenant(r, caller);
        }
        if !paths::is_sandbox_id(id) && id.len() > 128 {
            return Err(Error::sandbox_not_found(id));
        }
        let rec = match self.store.get_sandbox(id).await {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::sandbox_not_found(id)),
            Err(e) => return Err(e),
        };
        if rec.state == state::DESTROYED {
            if !caller.sees(&rec) {
                return Err(Error::sandbox_not_found(id));
            }
            return Err(Error::sandbox_destroyed(id));
        }
        check_tenant(Arc::new(rec), caller)
    }

    /// Live sandboxes visible to `caller`, newest first.
    pub async fn list(&self, caller: &Caller) -> Result<Vec<SandboxRecord>> {
        let mut all = self.store.list_active_sandboxes().await?;
        all.retain(|r| caller.sees(r));
        Ok(all)
    }

    /// Cached live sandboxes (cheap; for metrics).
    pub fn cached(&self) -> Vec<Arc<SandboxRecord>> {
        self.cache.read().values().cloned().collect()
    }

    // ----- admission ----------------------------------------------------

    fn effective_limits(&self, quota: Option<&QuotaRecord>) -> (GoDuration, i64) {
        let d = &self.cfg.defaults;
        let max_ttl = match quota {
            Some(q) if q.max_ttl_seconds > 0 => GoDuration::from_secs(q.max_ttl_seconds),
            _ => d.max_ttl.0,
        };
        let per_owner = match quota {
            Some(q) if q.max_sandboxes > 0 => q.max_sandboxes,
            _ => d.max_sandboxes_per_owner,
        };
        (max_ttl, per_owner)
    }

    /// A 429-kind limit error when `ttl` exceeds `owner`'s max TTL.
    pub(crate) async fn check_ttl_allowed(&self, ttl: GoDuration, owner: &str) -> Result<()> {
        let quota = self.quota_for(owner).await?;
        let (max_ttl, _) = self.effective_limits(quota.as_ref());
        if !max_ttl.is_zero() && ttl > max_ttl {
            return Err(Error::limit(format!("ttl exceeds max ttl {max_ttl}")));
        }
        Ok(())
    }

    async fn quota_for(&self, owner: &str) -> Result<Option<QuotaRecord>> {
        if owner.is_empty() {
            return Ok(None);
        }
        match self.store.get_quota(owner).await {
            Ok(q) => Ok(Some(q)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn evaluate(
        &self,
        adm: &Admission,
        owner: &str,
        ttl: GoDuration,
        max_ttl: GoDuration,
        per_owner: i64,
    ) -> Option<Deny> {
        if !max_ttl.is_zero() && ttl > max_ttl {
            return Some(Deny::Ttl);
        }
        let max = self.cfg.defaults.max_sandboxes;
        if max > 0 && adm.total >= max {
            return Some(Deny::Total(max));
        }
        if per_owner > 0
            && !owner.is_empty()
            && adm.per_owner.get(owner).copied().unwrap_or(0) >= per_owner
        {
            return Some(Deny::PerOwner(per_owner));
        }
        None
    }

    fn deny_error(&self, d: Deny, max_ttl: GoDuration) -> Error {
        match d {
            Deny::Ttl => Error::limit(format!("ttl exceeds max ttl {max_ttl}")),
            Deny::Total(n) => Error::limit(format!("max sandboxes reached ({n})")),
            Deny::PerOwner(n) => Error::limit(format!("max sandboxes per owner reached ({n})")),
        }
    }

    /// Reserves a slot for `owner`, queueing when configured. The slot is
    /// released by `release_slot` on failure or destroy.
    async fn reserve_slot(&self, owner: &str, ttl: GoDuration) -> Result<()> {
        let quota = self.quota_for(owner).await?;
        let (max_ttl, per_owner) = self.effective_limits(quota.as_ref());
        if self.shared_admission() {
            // Counted in the store when the record is written.
            if !max_ttl.is_zero() && ttl > max_ttl {
                return Err(self.deny_error(Deny::Ttl, max_ttl));
            }
            return Ok(());
        }
        let queue_mode = self.cfg.defaults.spawn_overflow == "queue";
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut queued_at: Option<Instant> = None;
        loop {
            let notified = self.capacity_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut adm = self.admission.lock();
                match self.evaluate(&adm, owner, ttl, max_ttl, per_owner) {
                    None => {
                        adm.total += 1;
                        if !owner.is_empty() {
                            *adm.per_owner.entry(owner.to_string()).or_default() += 1;
                        }
                        drop(adm);
                        if let Some(q) = queued_at {
                            self.dequeued(q);
                        }
                        return Ok(());
                    }
                    Some(Deny::Ttl) => return Err(self.deny_error(Deny::Ttl, max_ttl)),
                    Some(d) if !queue_mode => {
                        drop(adm);
                        self.events.publish(
                            kind::RESOURCE_LIMIT,
                            "",
                            events::data([
                                ("operation", json!("spawn")),
                                ("owner_id", json!(owner)),
                            ]),
                        );
                        return Err(self.deny_error(d, max_ttl));
                    }
                    Some(_) => {}
                }
            }
            if queued_at.is_none() {
                let max_queue =
                    usize::try_from(self.cfg.defaults.max_spawn_queue.max(1)).unwrap_or(100);
                let depth = self.queue.depth.fetch_add(1, Ordering::SeqCst);
                if depth >= max_queue {
                    self.queue.depth.fetch_sub(1, Ordering::SeqCst);
                    return Err(Error::limit(format!("spawn queue full ({max_queue})")));
                }
                self.queue.queued_total.fetch_add(1, Ordering::Relaxed);
                self.events.publish(
                    kind::SPAWN_QUEUED,
                    "",
                    events::data([
                        ("operation", json!("spawn")),
                        ("owner_id", json!(owner)),
                        ("depth", json!(depth + 1)),
                    ]),
                );
                queued_at = Some(Instant::now());
                let t = if self.cfg.defaults.spawn_queue_timeout.is_zero() {
                    Duration::from_secs(30)
                } else {
                    self.cfg.defaults.spawn_queue_timeout.std()
                };
                deadline = Some(tokio::time::Instant::now() + t);
            }
            let Some(dl) = deadline else { continue };
            if tokio::time::timeout_at(dl, notified).await.is_err() {
                self.queue.depth.fetch_sub(1, Ordering::SeqCst);
                self.queue.timeouts.fetch_add(1, Ordering::Relaxed);
                let t = GoDuration::from_std(self.cfg.defaults.spawn_queue_timeout.std());
                self.events.publish(
                    kind::SPAWN_QUEUE_TIMEOUT,
                    "",
                    events::data([("operation", json!("spawn")), ("owner_id", json!(owner))]),
                );
                return Err(Error::limit(format!("spawn queue timeout after {t}")));
            }
        }
    }

    fn dequeued(&self, since: Instant) {
        self.queue.depth.fetch_sub(1, Ordering::SeqCst);
        self.queue.dequeued_total.fetch_add(1, Ordering::Relaxed);
        let ms = since.elapsed().as_millis() as u64;
        self.queue.wait_count.fetch_add(1, Ordering::Relaxed);
        self.queue.wait_total_ms.fetch_add(ms, Ordering::Relaxed);
        self.queue.wait_max_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn release_slot(&self, owner: &str) {
        if self.shared_admission() {
            self.capacity_changed.notify_waiters();
            return;
        }
        {
            let mut adm = self.admission.lock();
            adm.total = (adm.total - 1).max(0);
            if let Some(c) = adm.per_owner.get_mut(owner) {
                *c -= 1;
                if *c <= 0 {
                    adm.per_owner.remove(owner);
                }
            }
        }
        self.capacity_changed.notify_waiters();
    }

    /// Whether admission is counted in the store (several control planes
    /// share it: Postgres) rather than in this process.
    pub fn shared_admission(&self) -> bool {
        self.store.engine() != "sqlite"
    }

    /// Writes a new record through the store's admission (shared mode),
    /// waiting for room when `defaults.spawn_overflow` is `queue`.
    async fn insert_admitted(&self, rec: &SandboxRecord) -> Result<()> {
        let quota = self.quota_for(&rec.owner_id).await?;
        let (_, per_owner) = self.effective_limits(quota.as_ref());
        let max = self.cfg.defaults.max_sandboxes;
        let queue_mode = self.cfg.defaults.spawn_overflow == "queue";
        let wait = if self.cfg.defaults.spawn_queue_timeout.is_zero() {
            Duration::from_secs(30)
        } else {
            self.cfg.defaults.spawn_queue_timeout.std()
        };
        let deadline = Instant::now() + wait;
        loop {
            match self
                .store
                .insert_sandbox_admitted(rec, max, per_owner)
                .await
            {
                Err(e) if e.kind() == ErrorKind::ResourceLimit => {
                    if !queue_mode || Instant::now() >= deadline {
                        self.events.publish(
                            kind::RESOURCE_LIMIT,
                            "",
                            events::data([
                                ("operation", json!("spawn")),
                                ("owner_id", json!(rec.owner_id)),
                            ]),
                        );
                        return Err(e);
                    }
                    // Another control plane may free room: poll.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                r => return r,
            }
        }
    }

    /// Wakes queued spawns (after quota changes).
    pub fn wake_queue(&self) {
        self.capacity_changed.notify_waiters();
    }

    /// Preflight: would a spawn be admitted now?
    pub async fn admission(&self, req: &SpawnRequest, owner: &str) -> Result<AdmissionDecision> {
        let owner = paths::normalize_owner(owner)?;
        let ttl = self.parse_ttl(&req.ttl)?;
        let quota = self.quota_for(&owner).await?;
        let (max_ttl, per_owner) = self.effective_limits(quota.as_ref());
        // Shared admission: the cluster's live sandboxes, from the store.
        let counted;
        let local;
        let adm = if self.shared_admission() {
            let mut a = Admission::default();
            for r in self.store.list_active_sandboxes().await? {
                if r.is_pool_host() {
                    continue;
                }
                a.total += 1;
                if !r.owner_id.is_empty() {
                    *a.per_owner.entry(r.owner_id).or_default() += 1;
                }
            }
            counted = a;
            &counted
        } else {
            local = self.admission.lock();
            &*local
        };
        let deny = self.evaluate(adm, &owner, ttl, max_ttl, per_owner);
        let queue_mode = self.cfg.defaults.spawn_overflow == "queue";
        let (reason, queueable) = match deny {
            None => ("", false),
            Some(Deny::Ttl) => ("max_ttl", false),
            Some(Deny::Total(_)) => ("max_sandboxes", queue_mode),
            Some(Deny::PerOwner(_)) => ("max_sandboxes_per_owner", queue_mode),
        };
        let owner_active = adm.per_owner.get(&owner).copied().unwrap_or(0);
        Ok(AdmissionDecision {
            allowed: deny.is_none(),
            queueable,
            reason: reason.to_string(),
            active_sandboxes: if matches!(deny, Some(Deny::Ttl)) {
                0
            } else {
                adm.total
            },
            max_sandboxes: self.cfg.defaults.max_sandboxes,
            active_owner_sandboxes: if owner.is_empty() { 0 } else { owner_active },
            max_owner_sandboxes: if owner.is_empty() { 0 } else { per_owner },
            max_ttl: if max_ttl.is_zero() {
                String::new()
            } else {
                max_ttl.to_string()
            },
        })
    }

    fn parse_ttl(&self, ttl: &str) -> Result<GoDuration> {
        if ttl.trim().is_empty() {
            let d = self.cfg.defaults.ttl.0;
            return Ok(if d.is_zero() {
                GoDuration::from_secs(1800)
            } else {
                d
            });
        }
        let d =
            duration::parse(ttl.trim()).map_err(|e| Error::invalid(format!("parsing TTL: {e}")))?;
        if d <= 0 {
            return Err(Error::invalid(format!("ttl must be positive, got {ttl:?}")));
        }
        Ok(GoDuration(d))
    }

    // ----- spawn ------------------------------------------------------------

    /// Spawns a sandbox. `req.template` merges a stored template first.
    pub async fn spawn(&self, req: SpawnRequest, caller: &Caller) -> Result<Sandbox> {
        if let Some(k) = req
            .metadata
            .as_ref()
            .and_then(|md| md.keys().find(|k| k.starts_with(RESERVED_PREFIX)))
        {
            return Err(Error::invalid(format!(
                "metadata key {k:?}: the prefix {RESERVED_PREFIX:?} is reserved"
            )));
        }
        self.spawn_as(req, caller, None).await
    }

    /// A spawn; `pool` (a template's stamp) makes a warm-pool sandbox.
    /// Internal callers may set reserved metadata keys ([`Manager::spawn`]
    /// refuses them).
    pub(crate) async fn spawn_as(
        &self,
        mut req: SpawnRequest,
        caller: &Caller,
        pool: Option<&str>,
    ) -> Result<Sandbox> {
        let started = Instant::now();
        let mut template = None;
        // The template allowlist the sandbox's egress stays within: its
        // template's, or for a snapshot's child the source sandbox's.
        let mut allowed_hosts = Vec::new();
        if !req.snapshot.is_empty() {
            allowed_hosts = self.apply_snapshot(&mut req, caller).await?;
        } else if !req.template.is_empty() {
            let t = self.get_template(&req.template).await?;
            merge_template(&mut req, &t);
            allowed_hosts = t.allowed_hosts.clone();
            template = Some(t);
        }
        let d = &self.cfg.defaults;
        let image = if req.image.trim().is_empty() {
            if self.pool_mode() && !self.cfg.pool.image.is_empty() {
                self.cfg.pool.image.clone()
            } else {
                d.image.clone()
            }
        } else {
            req.image.trim().to_string()
        };
        let owner = caller.owner_for(&req.owner_id)?;
        let policies = self
            .store
            .list_policies(Some(caller.tenant_id.as_str()))
            .await?;
        let want = placement::Want {
            image: &image,
            policies: &policies,
        };
        let placed = match self.place(&req.provider, want).await {
            Ok(p) => p,
            Err(e) => {
                if e.kind() == ErrorKind::Forbidden {
                    self.audit(
                        caller,
                        &owner,
                        "sandbox.spawn",
                        "",
                        &image,
                        &req.provider,
                        false,
                        e.to_string(),
                    );
                }
                return Err(e);
            }
        };
        let provider = placed.provider.clone();
        let provider_name = provider.name().to_string();
        let ttl = self.parse_ttl(&req.ttl)?;
        let lifecycle = idle::lifecycle(&req, ttl, provider.as_ref())?;
        // Pool mode: a slot in a shared runtime (not for a template's warm
        // pool nor a build, which need a sandbox of their own).
        let is_build = req
            .metadata
            .as_ref()
            .is_some_and(|m| m.contains_key(crate::provider::IMAGE_BUILD_METADATA));
        let pooled = self.pool_mode() && pool.is_none() && !is_build;
        if pooled {
            if let Some(why) = vmpool::unpoolable(&req, &lifecycle.1) {
                return Err(Error::invalid(format!("pool mode: {why}")));
            }
        }
        let memory_mb = if req.memory_mb == 0 {
            if d.memory_mb > 0 {
                d.memory_mb
            } else {
                512
            }
        } else {
            req.memory_mb
        };
        let vcpus = if req.vcpus == 0 {
            d.vcpus.max(1)
        } else {
            req.vcpus
        };
        if memory_mb < 0 {
            return Err(Error::invalid(format!(
                "memory_mb must be positive, got {memory_mb}"
            )));
        }
        if vcpus < 0 {
            return Err(Error::invalid(format!(
                "vcpus must be positive, got {vcpus}"
            )));
        }
        if let Some(md) = &req.metadata {
            if md.len() > 64 || md.iter().any(|(k, v)| k.len() > 256 || v.len() > 4096) {
                return Err(Error::invalid(
                    "metadata is limited to 64 keys, keys of 256 bytes and values of 4096 bytes",
                ));
            }
        }
        if let Some(t) = &template {
            // A secret this server lacks is a 400 before anything runs.
            self.check_secrets(t)?;
        }
        let user_metadata = req.metadata.clone();
        if req.auto_resume == Some(false) {
            req.metadata
                .get_or_insert_with(BTreeMap::new)
                .insert(pause::AUTO_RESUME_KEY.into(), "false".into());
        }
        if let Some(t) = &template {
            let md = req.metadata.get_or_insert_with(BTreeMap::new);
            md.extend(setup::env_metadata(t)?);
            if let Some(stamp) = pool {
                md.insert(setup::POOL_KEY.into(), stamp.to_string());
            }
        }
        let profile = placed.profile.clone();
        let network = if req.network_mode.is_empty() {
            profile.default_network.clone()
        } else if profile.network_modes.contains(&req.network_mode) {
            req.network_mode.clone()
        } else {
            return Err(Error::invalid(format!(
                "provider {provider_name} does not support network_mode {:?} (it supports: {})",
                req.network_mode,
                profile.network_modes.join(", ")
            )));
        };
        for (t, v) in [
            ("image", image.as_str()),
            ("provider", provider_name.as_str()),
            ("network", network.as_str()),
        ] {
            if let Err(e) = crate::policy::check(&policies, t, v) {
                self.audit(
                    caller,
                    &owner,
                    "sandbox.spawn",
                    "",
                    &image,
                    &provider_name,
                    false,
                    e.to_string(),
                );
                return Err(e);
            }
        }
        let egress =
            self.spawn_egress(&req, &allowed_hosts, &policies, provider.as_ref(), &network)?;
        let volumes = self
            .spawn_volumes(&req, caller, &provider, &placed.worker_id)
            .await?;
        // A provider's own defaults win over the server's when the request
        // names no size (gaps C-26); the spec then carries 0 so the
        // provider applies its exact setting (fractional CPUs included).
        let pd = provider.default_resources();
        let (memory_mb, spec_memory_mb) = match pd {
            Some(d) if req.memory_mb == 0 => (d.memory_mb, 0),
            _ => (memory_mb, memory_mb),
        };
        let (vcpus, spec_vcpus) = match pd {
            Some(d) if req.vcpus == 0 => (d.vcpus, 0),
            _ => (vcpus, vcpus),
        };
        if pooled {
            self.reserve_slot(&owner, ttl).await?;
            let res = self
                .spawn_pooled(
                    vmpool::PooledSpawn {
                        provider: &provider,
                        holder: &placed.worker_id,
                        image: &image,
                        network: &network,
                        egress: egress.rules.clone(),
                        egress_metadata: egress.metadata.clone(),
                        ttl,
                        lifecycle: lifecycle.clone(),
                        owner: &owner,
                    },
                    &req,
                    caller,
                )
                .await;
            return self
                .finish_spawn(
                    res,
                    template.as_ref(),
                    &owner,
                    &image,
                    &provider_name,
                    started,
                    caller,
                    "pooled=true",
                )
                .await;
        }
        // Spawns the template allows come from its warm pool when one is
        // ready.
        // (Only when the caller's egress rules are the ones a pool
        // sandbox was spawned with: the template's alone.)
        if let (Some(t), None) = (&template, pool) {
            let pool_rules = crate::egress::effective(
                None,
                &crate::egress::Limits::new(&[], &t.allowed_hosts)?,
            )?;
            if !self.shared_admission()
                && pools::compatible(&req, t, &provider_name)
                && egress.rules == pool_rules
            {
                let asked = SpawnRequest {
                    metadata: user_metadata,
                    ..SpawnRequest::default()
                };
                if let Some(sb) = self
                    .claim_pooled(t, &asked, &owner, caller, ttl, lifecycle.clone())
                    .await?
                {
                    self.metrics
                        .observe("spawn", &provider_name, started.elapsed(), None);
                    self.audit(
                        caller,
                        &owner,
                        "sandbox.spawn",
                        &sb.id,
                        &image,
                        &provider_name,
                        true,
                        format!("state=running template={} from_pool=true", t.name),
                    );
                    return Ok(sb);
                }
            }
        }
        req.metadata
            .get_or_insert_with(BTreeMap::new)
            .extend(egress.metadata);
        let (binds, _claims) = match volumes {
            Some((binds, recorded, claims)) => {
                req.metadata
                    .get_or_insert_with(BTreeMap::new)
                    .insert(crate::volumes::MOUNTS_KEY.into(), recorded);
                (binds, Some(claims))
            }
            None => (Vec::new(), None),
        };
        self.reserve_slot(&owner, ttl).await?;
        let res = self
            .spawn_reserved(
                &provider,
                (egress.rules, binds),
                &placed.worker_id,
                &image,
                (memory_mb, spec_memory_mb),
                (vcpus, spec_vcpus),
                ttl,
                lifecycle,
                &owner,
                &req,
                caller,
            )
            .await;
        self.finish_spawn(
            res,
            template.as_ref(),
            &owner,
            &image,
            &provider_name,
            started,
            caller,
            "",
        )
        .await
    }

    /// The end of a spawn: the template's files and setup in the new
    /// sandbox (a failure removes it and gives its admission slot back),
    /// then metrics, events and the audit row.
    #[allow(clippy::too_many_arguments)]
    async fn finish_spawn(
        &self,
        res: Result<Sandbox>,
        template: Option<&TemplateRecord>,
        owner: &str,
        image: &str,
        provider_name: &str,
        started: Instant,
        caller: &Caller,
        detail: &str,
    ) -> Result<Sandbox> {
        // A template's files and setup, in the new sandbox; a failure
        // removes it (and gives its admission slot back).
        let mut released = false;
        let res = match (res, template) {
            (Ok(sb), Some(t)) if setup::acts(t) => {
                let rec = self.cache.read().get(&sb.id).cloned();
                let ran = match &rec {
                    Some(rec) => self.run_template(rec, t).await,
                    None => Err(Error::sandbox_not_found(&sb.id)),
                };
                match (ran, rec) {
                    (Ok(()), _) => Ok(sb),
                    (Err(e), rec) => {
                        if let Some(rec) = rec {
                            let system = Caller {
                                actor: "system:setup".into(),
                                ..Caller::default()
                            };
                            if let Err(d) = self.destroy_record(&rec, &system).await {
                                warn!(sandbox_id = %rec.id, error = %d, "removing a sandbox whose setup failed");
                            }
                            released = true;
                        }
                        Err(e)
                    }
                }
            }
            (r, _) => r,
        };
        let took = started.elapsed();
        match &res {
            Ok(sb) => {
                self.metrics.observe("spawn", provider_name, took, None);
                self.audit(
                    caller,
                    owner,
                    "sandbox.spawn",
                    &sb.id,
                    image,
                    provider_name,
                    true,
                    if detail.is_empty() {
                        "state=running".into()
                    } else {
                        format!("state=running {detail}")
                    },
                );
            }
            Err(e) => {
                if !released {
                    self.release_slot(owner);
                }
                self.metrics
                    .observe("spawn", provider_name, took, Some(&e.to_string()));
                self.events.publish(
                    kind::OPERATION_FAILED,
                    "",
                    events::data([
                        ("operation", json!("spawn")),
                        ("provider", json!(provider_name)),
                        ("error", json!(e.to_string())),
                    ]),
                );
                self.audit(
                    caller,
                    owner,
                    "sandbox.spawn",
                    "",
                    image,
                    provider_name,
                    false,
                    e.to_string(),
                );
            }
        }
        res
    }

    #[allow(clippy::too_many_arguments)]
    async fn spawn_reserved(
        &self,
        provider: &Arc<dyn Provider>,
        (egress, volumes): (
            Option<crate::egress::EgressRules>,
            Vec<crate::volumes::VolumeBind>,
        ),
        holder: &str,
        image: &str,
        (memory_mb, spec_memory_mb): (i64, i64),
        (vcpus, spec_vcpus): (i64, i64),
        ttl: GoDuration,
        (idle_timeout_secs, on_timeout): (i64, String),
        owner: &str,
        req: &SpawnRequest,
        caller: &Caller,
    ) -> Result<Sandbox> {
        let mut id = paths::new_sandbox_id();
        while self.cache.read().contains_key(&id) {
            id = paths::new_sandbox_id();
        }
        let now = crate::store::record_now();
        let expires_at = now + chrono::Duration::nanoseconds(ttl.nanos());
        let metadata = req.metadata.clone().unwrap_or_default();
        let spec = SpawnSpec {
            id: id.clone(),
            image: image.to_string(),
            memory_mb: spec_memory_mb,
            vcpus: spec_vcpus,
            metadata: metadata.clone(),
            owner_id: owner.to_string(),
            tenant_id: caller.tenant_id.clone(),
            expires_at,
            network_mode: req.network_mode.clone(),
            snapshot: (!req.snapshot.is_empty()).then(|| req.snapshot.clone()),
            egress,
            volumes,
        };
        let lease_ttl = ttl.to_std() + LEASE_GRACE;
        let shared = self.shared_admission();
        if shared {
            // The record first, in state creating: the cluster's count
            // includes spawns in flight.
            let pending = SandboxRecord {
                id: id.clone(),
                state: state::CREATING.into(),
                provider: provider.name().to_string(),
                image: image.to_string(),
                memory_mb,
                vcpus,
                metadata: metadata.clone(),
                owner_id: owner.to_string(),
                tenant_id: caller.tenant_id.clone(),
                vm_id: String::new(),
                worker_id: holder.into(),
                created_at: now,
                expires_at,
                updated_at: now,
                idle_timeout_secs,
                on_timeout: on_timeout.clone(),
                idle_deadline: now + chrono::Duration::seconds(idle_timeout_secs),
            };
            self.insert_admitted(&pending).await?;
        }
        let (spawned, leased) = if holder == self.worker_id() {
            // The id is new: its lease is written while the provider works.
            tokio::join!(
                provider.spawn(&spec),
                self.store.acquire_lease(&id, "sandbox", holder, lease_ttl)
            )
        } else {
            // A worker acts only under a lease it holds: take it first.
            match self
                .store
                .acquire_lease(&id, "sandbox", holder, lease_ttl)
                .await
            {
                Ok(l) => (provider.spawn(&spec).await, Ok(l)),
                Err(e) => return Err(e),
            }
        };
        let (spawned, fence) = match (spawned, leased) {
            (Ok(s), Ok(l)) => (s, l.fence()),
            (Ok(s), Err(e)) => {
                self.destroy_runtime(provider, &s.runtime_id).await;
                self.abandon(&id, shared).await;
                return Err(e);
            }
            (Err(e), Ok(_)) => {
                let _ = self.store.release_lease(&id, holder).await;
                self.abandon(&id, shared).await;
                return Err(e);
            }
            (Err(e), Err(_)) => {
                self.abandon(&id, shared).await;
                return Err(e);
            }
        };
        let rec = SandboxRecord {
            id: id.clone(),
            state: state::RUNNING.into(),
            provider: provider.name().to_string(),
            image: image.to_string(),
            memory_mb,
            vcpus,
            metadata,
            owner_id: owner.to_string(),
            tenant_id: caller.tenant_id.clone(),
            vm_id: if spawned.runtime_id == id {
                String::new()
            } else {
                spawned.runtime_id.clone()
            },
            worker_id: holder.into(),
            created_at: now,
            expires_at,
            updated_at: now,
            idle_timeout_secs,
            on_timeout,
            idle_deadline: now + chrono::Duration::seconds(idle_timeout_secs),
        };
        let saved = if shared {
            self.store
                .set_sandbox_runtime(&id, state::RUNNING, &rec.vm_id, Some(&fence))
                .await
        } else {
            self.store.insert_sandbox(&rec).await
        };
        if let Err(e) = saved {
            self.destroy_runtime(provider, &spawned.runtime_id).await;
            self.abandon(&id, shared).await;
            let _ = self.store.release_lease(&id, holder).await;
            return Err(e);
        }
        let api = self.to_api(&rec);
        self.cache.write().insert(id.clone(), Arc::new(rec));
        self.events.publish(
            kind::SANDBOX_CREATED,
            &id,
            events::data([
                ("provider", json!(provider.name())),
                ("image", json!(image)),
            ]),
        );
        self.events.publish(kind::SANDBOX_RUNNING, &id, None);
        info!(sandbox_id = %id, provider = provider.name(), image, "sandbox spawned");
        Ok(api)
    }

    /// A spawn that failed after its record was written (shared
    /// admission) leaves it destroyed, so it counts no more. Unfenced: the
    /// record never ran and was never anyone else's to act on.
    async fn abandon(&self, id: &str, shared: bool) {
        if shared {
            if let Err(e) = self
                .store
                .set_sandbox_state(id, state::DESTROYED, None)
                .await
            {
                warn!(sandbox_id = id, error = %e, "marking a failed spawn destroyed failed");
            }
        }
    }

    async fn destroy_runtime(&self, provider: &Arc<dyn Provider>, runtime_id: &str) {
        if let Err(e) = provider.destroy(runtime_id).await {
            warn!(runtime_id, provider = provider.name(), error = %e, "cleanup of runtime failed");
        }
    }

    // ----- destroy / extend / prune ----------------------------------------

    /// Destroys a sandbox. Unknown and already destroyed ids succeed.
    pub async fn destroy(&self, id: &str, caller: &Caller) -> Result<()> {
        let rec = match self.get(id, caller).await {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), ErrorKind::SandboxDestroyed) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::SandboxNotFound && caller.sees_all_tenants() => {
                return Ok(())
            }
            Err(e) if e.kind() == ErrorKind::SandboxNotFound => {
                // A scoped caller gets 200 only for ids that do not exist at all.
                return match self.store.get_sandbox(id).await {
                    Ok(_) => Err(e),
                    Err(_) => Ok(()),
                };
            }
            Err(e) => return Err(e),
        };
        self.destroy_record(&rec, caller).await
    }

    async fn destroy_record(&self, rec: &SandboxRecord, caller: &Caller) -> Result<()> {
        let started = Instant::now();
        let lease_ttl = LEASE_GRACE;
        let holder = self.holder_of(rec).to_string();
        // The destroy acts under a fresh generation: an older holder's
        // writes (a worker taken over) are refused from here on.
        let fence = match self
            .store
            .acquire_lease(&rec.id, "sandbox", &holder, lease_ttl)
            .await
        {
            Ok(l) => {
                self.lease_changed(&rec.id);
                Some(l.fence())
            }
            Err(e) if e.kind() == ErrorKind::Conflict => return Err(e),
            Err(e) => {
                warn!(sandbox_id = %rec.id, error = %e, "lease acquire before destroy failed");
                None
            }
        };
        let mut detail = String::new();
        let pooled = rec.pool_slot().is_some();
        match self.provider_of(rec).await {
            Ok(p) => {
                let target = if rec.vm_id.is_empty() {
                    &rec.id
                } else {
                    &rec.vm_id
                };
                let gone = if pooled {
                    // Its slot, not the host it shares.
                    detail = "pooled=true".into();
                    p.slot_close(&rec.vm_id, &rec.id).await
                } else {
                    p.destroy(target).await
                };
                if let Err(e) = gone {
                    warn!(sandbox_id = %rec.id, error = %e, "provider destroy failed");
                    detail = format!("provider_error={e}");
                    self.events.publish(
                        kind::PROVIDER_FAILED,
                        &rec.id,
                        events::data([
                            ("operation", json!("destroy")),
                            ("provider", json!(rec.provider)),
                            ("error", json!(e.to_string())),
                        ]),
                    );
                }
            }
            Err(e) => {
                warn!(sandbox_id = %rec.id, error = %e, "no provider reaches the sandbox to destroy it");
                detail = "provider_unavailable=true".into();
            }
        }
        match self
            .store
            .set_sandbox_state(&rec.id, state::DESTROYED, fence.as_ref())
            .await
        {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let _ = self.store.release_lease(&rec.id, &holder).await;
        if !rec.vm_id.is_empty() && !pooled {
            // A moved sandbox's runtime has a lease of its own.
            let _ = self.store.release_lease(&rec.vm_id, &holder).await;
        }
        let was_cached = self.cache.write().remove(&rec.id).is_some();
        if was_cached && !rec.is_pool_host() {
            self.release_slot(&rec.owner_id);
        }
        self.previews.evict(&rec.id);
        self.execs.forget_sandbox(&rec.id);
        if let Err(e) = self.store.delete_sandbox_ports(&rec.id).await {
            warn!(sandbox_id = %rec.id, error = %e, "dropping the preview ports of a destroyed sandbox failed");
        }
        self.metrics
            .observe("destroy", &rec.provider, started.elapsed(), None);
        self.events.publish(kind::SANDBOX_DESTROYED, &rec.id, None);
        // The reaper has no tenant; the row belongs to the sandbox's.
        let stamped;
        let caller = if caller.tenant_id.is_empty() && !rec.tenant_id.is_empty() {
            stamped = Caller {
                tenant_id: rec.tenant_id.clone(),
                ..caller.clone()
            };
            &stamped
        } else {
            caller
        };
        self.audit(
            caller,
            &rec.owner_id,
            "sandbox.destroy",
            &rec.id,
            &rec.image,
            &rec.provider,
            true,
            detail,
        );
        info!(sandbox_id = %rec.id, "sandbox destroyed");
        if pooled {
            self.slot_freed(&rec.vm_id).await;
        }
        Ok(())
    }

    /// Sets `expires_at = now + ttl` (bounded by the effective max TTL) and
    /// renews the lease to match.
    pub async fn extend(&self, id: &str, ttl: &str, caller: &Caller) -> Result<Sandbox> {
        if ttl.trim().is_empty() {
            return Err(Error::invalid("ttl is required"));
        }
        let d = duration::parse(ttl.trim())
            .map_err(|e| Error::invalid(format!("invalid ttl format: {e}")))?;
        if d <= 0 {
            return Err(Error::invalid("ttl must be positive"));
        }
        let rec = self.get(id, caller).await?;
        self.check_ttl_allowed(GoDuration(d), &rec.owner_id).await?;
        let expires_at = crate::store::record_now() + chrono::Duration::nanoseconds(d);
        let lease_ttl = GoDuration(d).to_std() + LEASE_GRACE;
        let holder = self.holder_of(&rec).to_string();
        // The lease first, then the record under it (fenced).
        let lease = match self.store.renew_lease(id, &holder, lease_ttl).await {
            Ok(l) => l,
            // A missing lease is re-acquired; one held elsewhere is a conflict.
            Err(e) => self
                .store
                .acquire_lease(id, "sandbox", &holder, lease_ttl)
                .await
                .map_err(|_| e)?,
        };
        // Renewing moves the generation too.
        self.lease_changed(id);
        self.store
            .set_sandbox_expiry(id, expires_at, Some(&lease.fence()))
            .await
            .map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    Error::sandbox_not_found(id)
                } else {
                    e
                }
            })?;
        let mut updated = (*rec).clone();
        updated.expires_at = expires_at;
        updated.updated_at = crate::store::record_now();
        self.audit(
            caller,
            &rec.owner_id,
            "sandbox.extend",
            id,
            &rec.image,
            &rec.provider,
            true,
            format!(
                "ttl={} expires_at={}",
                GoDuration(d),
                expires_at.to_rfc3339()
            ),
        );
        let api = self.to_api(&updated);
        self.cache.write().insert(id.to_string(), Arc::new(updated));
        self.events.publish(
            kind::SANDBOX_EXTENDED,
            id,
            events::data([("expires_at", json!(expires_at))]),
        );
        Ok(api)
    }

    /// Applies `on_timeout` (destroy, or pause) to every live sandbox past
    /// its expiry or its idle timeout. Returns how many.
    pub async fn prune(&self) -> Result<u64> {
        let system = Caller {
            actor: "system:reaper".into(),
            ..Caller::default()
        };
        let idle = self.reap_idle(&system).await?;
        let expired = self.store.list_expired_sandboxes(Utc::now()).await?;
        let mut n = 0;
        let max_paused = self.cfg.defaults.max_paused.std();
        for rec in expired {
            // A paused sandbox's time to live is stopped; it goes only
            // after `defaults.max_paused`.
            if rec.state == state::PAUSED {
                let paused_for = (Utc::now() - rec.updated_at).to_std().unwrap_or_default();
                if max_paused.is_zero() || paused_for < max_paused {
                    continue;
                }
            }
            match self.time_out(&rec, "ttl", &system).await {
                Ok(()) => n += 1,
                Err(e) => warn!(sandbox_id = %rec.id, error = %e, "reaping expired sandbox failed"),
            }
        }
        Ok(n + idle)
    }

    /// Deletes stored rows past their retention: admin and operation
    /// audit (`auth.admin_audit_retention`), exec logs
    /// (`database.exec_log_retention`) and destroyed sandboxes
    /// (`database.sandbox_retention`); 0 keeps that kind forever. Returns
    /// how many rows went.
    pub async fn apply_retention(&self) -> Result<u64> {
        let cutoff = |d: crate::config::Dur| {
            if d.is_zero() || d.0.is_negative() {
                return None;
            }
            chrono::Duration::from_std(d.std())
                .ok()
                .map(|keep| Utc::now() - keep)
        };
        let mut n = 0;
        if let Some(t) = cutoff(self.cfg.auth.admin_audit_retention) {
            n += self.store.prune_audit(t).await?;
        }
        if let Some(t) = cutoff(self.cfg.database.exec_log_retention) {
            n += self.store.prune_exec_logs(t).await?;
        }
        if let Some(t) = cutoff(self.cfg.database.sandbox_retention) {
            n += self.store.prune_destroyed_sandboxes(t).await?;
        }
        Ok(n)
    }

    /// Runs `prune` and `apply_retention` every `interval` until the
    /// returned handle is aborted.
    pub fn start_reaper(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match me.prune().await {
                    Ok(0) => {}
                    Ok(n) => info!(count = n, "reaped expired sandboxes"),
                    Err(e) => warn!(error = %e, "reaper pass failed"),
                }
                match me.apply_retention().await {
                    Ok(0) => {}
                    Ok(n) => info!(rows = n, "deleted rows past their retention"),
                    Err(e) => warn!(error = %e, "retention pass failed"),
                }
            }
        })
    }

    // ----- reconcile ---------------------------------------------------------

    /// Startup reconciliation of stored records against provider runtimes,
    /// then adoption of unknown runtimes. Never aborts on one bad record.
    pub async fn reconcile(&self) -> Result<()> {
        let records = self.store.list_active_sandboxes().await?;
        for rec in records {
            if !self.owns(&rec) {
                // Sandboxes of other workers and control planes are theirs
                // to reconcile.
                continue;
            }
            let provider = match self.registry.get(&rec.provider) {
                Ok(p) => p,
                Err(_) => {
                    self.reconcile_state(&rec.id, state::ERROR).await;
                    self.events.publish(
                        kind::PROVIDER_FAILED,
                        &rec.id,
                        events::data([
                            ("operation", json!("reconcile.status")),
                            ("provider", json!(rec.provider)),
                            ("error", json!("provider not registered")),
                        ]),
                    );
                    warn!(sandbox_id = %rec.id, provider = %rec.provider, "provider of stored sandbox is not registered");
                    continue;
                }
            };
            if rec.pool_slot().is_some() {
                self.reconcile_pooled(&provider, rec).await;
                continue;
            }
            let target = rec.runtime_id();
            match provider.status(&target).await {
                Ok(st) if st.state == state::DESTROYED => {
                    self.mark_destroyed(&rec, "runtime destroyed").await
                }
                Ok(st) => {
                    let mut new_state = if st.state.is_empty() {
                        state::RUNNING.to_string()
                    } else {
                        st.state
                    };
                    // A stopped runtime is brought back rather than left
                    // counting as active forever (gaps C-25).
                    if new_state == state::STOPPED {
                        match provider.recover(&target).await {
                            Ok(()) => {
                                info!(sandbox_id = %rec.id, "stopped sandbox recovered");
                                new_state = state::RUNNING.to_string();
                            }
                            Err(e) => {
                                warn!(sandbox_id = %rec.id, error = %e, "stopped sandbox could not be recovered");
                            }
                        }
                    }
                    let mut r = rec.clone();
                    if new_state != rec.state {
                        self.reconcile_state(&rec.id, &new_state).await;
                        r.state = new_state;
                    }
                    self.reapply_egress(&provider, &r).await;
                    self.adopt_into_cache(r);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::SandboxNotFound
                            | ErrorKind::SandboxDestroyed
                            | ErrorKind::NotFound
                    ) =>
                {
                    self.mark_destroyed(&rec, "runtime missing").await;
                }
                Err(e) => {
                    warn!(sandbox_id = %rec.id, error = %e, "status during reconcile failed");
                    self.reconcile_state(&rec.id, state::ERROR).await;
                }
            }
        }
        for provider in self.registry.all() {
            let runtimes = match provider.list_runtimes().await {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::Unsupported => continue,
                Err(e) => {
                    warn!(provider = provider.name(), error = %e, "runtime inventory failed");
                    continue;
                }
            };
            for rt in runtimes {
                if rt.state == state::DESTROYED || self.cache.read().contains_key(&rt.sandbox_id) {
                    continue;
                }
                if let Ok(existing) = self.store.get_sandbox(&rt.sandbox_id).await {
                    if existing.state == state::DESTROYED {
                        // The store says it is gone: finish the job.
                        self.destroy_runtime(&provider, &rt.sandbox_id).await;
                    }
                    continue;
                }
                if !provider.adopts_unknown_runtimes() {
                    // Never acknowledged to anyone (the server stopped
                    // between boot and record): reap it.
                    warn!(sandbox_id = %rt.sandbox_id, provider = provider.name(), "destroying a runtime the store never recorded");
                    self.destroy_runtime(&provider, &rt.sandbox_id).await;
                    self.events.publish(
                        kind::RECONCILE_ACTION,
                        &rt.sandbox_id,
                        events::data([
                            ("action", json!("reaped_unrecorded")),
                            ("provider", json!(provider.name())),
                        ]),
                    );
                    continue;
                }
                self.adopt_runtime(&provider, rt).await;
            }
        }
        self.drop_empty_hosts().await;
        Ok(())
    }

    /// Sets the state of a sandbox this process holds, under its lease.
    async fn reconcile_state(&self, id: &str, state: &str) {
        if let Err(e) = self
            .set_state_under_lease(id, self.worker_id(), state)
            .await
        {
            warn!(sandbox_id = id, state, error = %e, "reconcile could not record the state");
        }
    }

    /// Sets a sandbox's state under the lease `holder` has on it now: a
    /// compare-and-set on the lease, so a lease that changes hands between
    /// the read and the write makes the write a `Conflict` that changes
    /// nothing. A lease held by someone else is a `Conflict` too; a
    /// sandbox without a lease row (released, or from before leases) is
    /// written plainly.
    pub(crate) async fn set_state_under_lease(
        &self,
        id: &str,
        holder: &str,
        state: &str,
    ) -> Result<()> {
        let fence = match self.store.get_lease(id).await {
            Ok(l) if l.holder_id == holder => Some(l.fence()),
            Ok(l) => {
                return Err(Error::conflict(format!(
                    "sandbox {id:?} is leased to {:?}, not {holder:?}",
                    l.holder_id
                )))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        self.store
            .set_sandbox_state(id, state, fence.as_ref())
            .await
    }

    async fn mark_destroyed(&self, rec: &SandboxRecord, reason: &str) {
        // Clean up whatever the runtime left behind (destroy is idempotent).
        if let Ok(p) = self.provider_of(rec).await {
            if rec.pool_slot().is_some() {
                // Its slot only: the host is shared.
                if let Err(e) = p.slot_close(&rec.vm_id, &rec.id).await {
                    warn!(sandbox_id = %rec.id, error = %e, "closing the slot of a missing pooled sandbox failed");
                }
            } else {
                let target = if rec.vm_id.is_empty() {
                    &rec.id
                } else {
                    &rec.vm_id
                };
                self.destroy_runtime(&p, target).await;
            }
        }
        self.reconcile_state(&rec.id, state::DESTROYED).await;
        let _ = self.store.release_lease(&rec.id, self.worker_id()).await;
        self.previews.evict(&rec.id);
        self.execs.forget_sandbox(&rec.id);
        let _ = self.store.delete_sandbox_ports(&rec.id).await;
        self.events.publish(
            kind::RECONCILE_ACTION,
            &rec.id,
            events::data([
                ("action", json!("marked_destroyed")),
                ("provider", json!(rec.provider)),
                ("reason", json!(reason)),
            ]),
        );
        info!(sandbox_id = %rec.id, reason, "reconcile marked sandbox destroyed");
    }

    fn adopt_into_cache(&self, r: SandboxRecord) {
        // A pool host is not a sandbox of anyone's limits.
        if !r.is_pool_host() {
            let mut adm = self.admission.lock();
            adm.total += 1;
            if !r.owner_id.is_empty() {
                *adm.per_owner.entry(r.owner_id.clone()).or_default() += 1;
            }
        }
        self.cache.write().insert(r.id.clone(), Arc::new(r));
    }

    async fn adopt_runtime(&self, provider: &Arc<dyn Provider>, rt: crate::provider::RuntimeInfo) {
        let now = crate::store::record_now();
        let created_at = rt.created_at.unwrap_or(now);
        let ttl = chrono::Duration::nanoseconds(self.cfg.defaults.ttl.0.nanos().max(1));
        let mut expires_at = rt.expires_at.unwrap_or(created_at + ttl);
        if expires_at < now && rt.expires_at.is_none() {
            expires_at = now + ttl;
        }
        let rec = SandboxRecord {
            id: rt.sandbox_id.clone(),
            state: if rt.state.is_empty() {
                state::RUNNING.into()
            } else {
                rt.state.clone()
            },
            provider: provider.name().to_string(),
            image: if rt.image.is_empty() {
                self.cfg.defaults.image.clone()
            } else {
                rt.image.clone()
            },
            memory_mb: self.cfg.defaults.memory_mb,
            vcpus: self.cfg.defaults.vcpus,
            metadata: rt.metadata.clone(),
            owner_id: rt.owner_id.clone(),
            tenant_id: rt.tenant_id.clone(),
            vm_id: String::new(),
            worker_id: self.worker_id().into(),
            created_at,
            expires_at,
            updated_at: now,
            idle_timeout_secs: 0,
            on_timeout: String::new(),
            idle_deadline: now,
        };
        let lease_ttl = (expires_at - now).to_std().unwrap_or_default() + LEASE_GRACE;
        if self
            .store
            .acquire_lease(&rec.id, "sandbox", self.worker_id(), lease_ttl)
            .await
            .is_err()
        {
            return;
        }
        if let Err(e) = self.store.insert_sandbox(&rec).await {
            warn!(sandbox_id = %rec.id, error = %e, "adopting runtime failed");
            return;
        }
        self.events.publish(
            kind::RECONCILE_ACTION,
            &rec.id,
            events::data([
                ("action", json!("adopted_runtime")),
                ("provider", json!(rec.provider)),
                ("image", json!(rec.image)),
            ]),
        );
        info!(sandbox_id = %rec.id, provider = %rec.provider, "adopted runtime");
        self.adopt_into_cache(rec);
    }

    // ----- exec -----------------------------------------------------------

    /// Resolves the exec deadline (spec/api.md §3.9).
    pub async fn resolve_timeout(&self, timeout: &str, owner: &str) -> Result<Option<Duration>> {
        let d = if timeout.trim().is_empty() {
            self.cfg.defaults.default_exec_timeout.0
        } else {
            GoDuration(
                duration::parse(timeout.trim())
                    .map_err(|e| Error::invalid(format!("parsing exec timeout: {e}")))?,
            )
        };
        if d.is_negative() {
            return Err(Error::invalid(format!(
                "exec timeout must not be negative, got {d}"
            )));
        }
        let quota = self.quota_for(owner).await?;
        let max = match &quota {
            Some(q) if q.max_exec_timeout_seconds > 0 => {
                GoDuration::from_secs(q.max_exec_timeout_seconds)
            }
            _ => self.cfg.defaults.max_exec_timeout.0,
        };
        if !max.is_zero() && d > max {
            return Err(Error::limit(format!(
                "exec timeout {d} exceeds max exec timeout {max}"
            )));
        }
        Ok(if d.is_zero() { None } else { Some(d.to_std()) })
    }

    async fn exec_target(
        &self,
        id: &str,
        caller: &Caller,
    ) -> Result<(Arc<SandboxRecord>, Arc<dyn Provider>)> {
        let rec = self.get(id, caller).await?;
        // The next exec or file operation wakes a paused sandbox.
        let rec = self.wake(rec, caller).await?;
        self.touch(&rec);
        let p = self.provider_of(&rec).await?;
        Ok((rec, p))
    }

    async fn prepare_exec(&self, rec: &SandboxRecord, req: &ExecRequest) -> Result<ExecSpec> {
        let argv = paths::build_argv(&req.mode, &req.command, &req.args)?;
        let total: usize = argv.iter().map(String::len).sum::<usize>()
            + req
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if total > 1024 * 1024 {
            return Err(Error::invalid(
                "command, arguments and environment exceed 1 MiB",
            ));
        }
        for (k, v) in &req.env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return Err(Error::invalid(format!(
                    "invalid environment variable name {k:?}"
                )));
            }
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(Error::invalid(
                "command and arguments must not contain NUL bytes",
            ));
        }
        let workdir = if req.workdir.trim().is_empty() {
            String::new()
        } else {
            paths::normalize(&req.workdir)?
        };
        let timeout = self.resolve_timeout(&req.timeout, &rec.owner_id).await?;
        // The template's environment and secrets, under the request's own.
        let mut env = self.base_env(rec)?;
        env.extend(req.env.clone());
        let mut spec = ExecSpec {
            argv,
            env,
            workdir,
            timeout,
            stdin: req.stdin.clone(),
            pty: req.pty,
            user: None,
        };
        if let Some(name) = req.user.as_deref().filter(|u| !u.is_empty()) {
            spec.user = Some(match numeric_user(name)? {
                Some(u) => u,
                None => {
                    let acct = self.account_of(rec, name).await?.ok_or_else(|| {
                        Error::invalid(format!(
                            "user {name:?} has no account in this sandbox's /etc/passwd"
                        ))
                    })?;
                    for (k, v) in [
                        ("HOME", &acct.home),
                        ("USER", &acct.name),
                        ("LOGNAME", &acct.name),
                    ] {
                        spec.env.entry(k.to_string()).or_insert_with(|| v.clone());
                    }
                    // The home is the default working directory where it
                    // exists (an image may name one it lacks).
                    if spec.workdir.is_empty() && self.is_dir(rec, &acct.home).await {
                        spec.workdir = acct.home.clone();
                    }
                    ExecUser {
                        uid: acct.uid,
                        gid: acct.gid,
                    }
                }
            });
        }
        Ok(spec)
    }

    /// Whether `path` is a directory in the sandbox (asked of its provider).
    async fn is_dir(&self, rec: &SandboxRecord, path: &str) -> bool {
        let Ok(provider) = self.provider_of(rec).await else {
            return false;
        };
        let target = if rec.vm_id.is_empty() {
            &rec.id
        } else {
            &rec.vm_id
        };
        provider
            .stat_file(target, path)
            .await
            .is_ok_and(|i| i.is_dir)
    }

    /// The account named `name` in the sandbox's `/etc/passwd` (read
    /// through its provider, not audited as a caller's file read);
    /// `None` when there is none.
    pub async fn account_of(&self, rec: &SandboxRecord, name: &str) -> Result<Option<Account>> {
        if name == "root" {
            return Ok(Some(Account {
                name: "root".into(),
                uid: 0,
                gid: 0,
                home: "/root".into(),
            }));
        }
        let provider = self.provider_of(rec).await?;
        let target = rec.runtime_id().to_string();
        let text = match provider
            .read_file_stream(&target, "/etc/passwd", 1024 * 1024)
            .await
        {
            Ok(s) => s.collect().await?,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(find_account(&String::from_utf8_lossy(&text), name))
    }

    fn command_text(req: &ExecRequest) -> String {
        let mut s = req.command.clone();
        for a in &req.args {
            s.push(' ');
            s.push_str(a);
        }
        s.chars().take(2048).collect()
    }

    /// Runs a command to completion and returns its captured output.
    pub async fn exec(&self, id: &str, req: &ExecRequest, caller: &Caller) -> Result<ExecOutcome> {
        let (rec, provider) = self.exec_target(id, caller).await?;
        // A command that runs is activity for as long as it runs.
        let _busy = self.hold_busy(&rec);
        let spec = self.prepare_exec(&rec, req).await?;
        let target = rec.runtime_id().to_string();
        self.events.publish(
            kind::EXEC_STARTED,
            id,
            events::data([("command", json!(Self::command_text(req)))]),
        );
        let started = Instant::now();
        let (tx, mut rx) = mpsc::channel::<OutputChunk>(64);
        let cap = match usize::try_from(self.cfg.limits.exec_output_bytes) {
            Ok(n) if n > 0 => n.min(MAX_CAPTURE),
            _ => MAX_CAPTURE,
        };
        let collect = async move {
            let mut out = Vec::new();
            let mut err = Vec::new();
            while let Some(c) = rx.recv().await {
                let buf = match c.stream {
                    StreamKind::Stdout => &mut out,
                    StreamKind::Stderr => &mut err,
                };
                let room = cap.saturating_sub(buf.len());
                buf.extend_from_slice(&c.data[..c.data.len().min(room)]);
            }
            (out, err)
        };
        let (res, (stdout, stderr)) = tokio::join!(provider.exec(&target, &spec, tx), collect);
        let took = started.elapsed();
        let mode = if req.mode.is_empty() {
            "shell"
        } else {
            req.mode.as_str()
        };
        match res {
            Ok(status) => {
                self.metrics.observe("exec", &rec.provider, took, None);
                self.events.publish(
                    kind::EXEC_COMPLETED,
                    id,
                    events::data([
                        ("exit_code", json!(status.code)),
                        ("duration", json!(GoDuration::from_std(took).to_string())),
                    ]),
                );
                let dur = GoDuration::from_std(took).to_string();
                self.audit(
                    caller,
                    &rec.owner_id,
                    "exec",
                    id,
                    &Self::command_text(req),
                    &rec.provider,
                    true,
                    format!("exit={} duration={dur} mode={mode}", status.code),
                );
                let log = ExecLogRecord {
                    sandbox_id: id.to_string(),
                    command: Self::command_text(req),
                    exit_code: status.code,
                    stdout: self.redact_secrets(&rec, truncate_lossy(&stdout, 64 * 1024)),
                    stderr: self.redact_secrets(&rec, truncate_lossy(&stderr, 64 * 1024)),
                    duration: dur,
                    created_at: Utc::now(),
                };
                let _ = self.audit_tx.try_send(AuditItem::Exec(log));
                Ok(ExecOutcome {
                    exit_code: status.code,
                    stdout,
                    stderr,
                    duration: took,
                })
            }
            Err(e) => {
                self.exec_failed(id, &rec, req, caller, &e, took);
                Err(e)
            }
        }
    }

    fn exec_failed(
        &self,
        id: &str,
        rec: &SandboxRecord,
        req: &ExecRequest,
        caller: &Caller,
        e: &Error,
        took: Duration,
    ) {
        self.metrics
            .observe("exec", &rec.provider, took, Some(&e.to_string()));
        let k = if e.kind() == ErrorKind::ExecTimeout {
            kind::EXEC_TIMEOUT
        } else {
            kind::EXEC_FAILED
        };
        self.events
            .publish(k, id, events::data([("error", json!(e.to_string()))]));
        self.audit(
            caller,
            &rec.owner_id,
            "exec",
            id,
            &Self::command_text(req),
            &rec.provider,
            false,
            e.to_string(),
        );
    }

    /// Starts a streamed exec. Pre-flight errors are returned directly;
    /// afterwards everything arrives on the channel, ending with `Exit` or
    /// `Failed`. Dropping the receiver kills the command.
    pub async fn exec_stream(
        self: &Arc<Self>,
        id: &str,
        req: &ExecRequest,
        caller: &Caller,
    ) -> Result<mpsc::Receiver<StreamEvent>> {
        self.exec_stream_with(id, req, caller, None).await
    }

    /// `exec_stream` with live stdin and signals from `input` (interactive).
    /// The command is killed as soon as the receiver is dropped.
    pub async fn exec_stream_with(
        self: &Arc<Self>,
        id: &str,
        req: &ExecRequest,
        caller: &Caller,
        input: Option<mpsc::Receiver<crate::provider::ExecInput>>,
    ) -> Result<mpsc::Receiver<StreamEvent>> {
        let mut att = self
            .exec_start(id, req, caller, input, Duration::ZERO)
            .await?;
        let (tx, rx) = mpsc::channel::<StreamEvent>(64);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    item = att.next() => item,
                    () = tx.closed() => return,
                };
                let ev = match item {
                    Some(JournalItem::Output { stream, data, .. }) => {
                        StreamEvent::Output(OutputChunk {
                            stream,
                            data: data.to_vec(),
                        })
                    }
                    Some(JournalItem::Gap { .. }) => continue,
                    Some(JournalItem::End(Finish::Exit { code, duration })) => {
                        StreamEvent::Exit { code, duration }
                    }
                    Some(JournalItem::End(Finish::Failed { kind, message })) => {
                        StreamEvent::Failed { kind, message }
                    }
                    None => return,
                };
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    /// Starts a streamed exec with an id and an output journal, and returns
    /// a reader attached at offset 0. The command keeps running for
    /// `resume_window` after its last reader detaches (0 = killed at once),
    /// so a client whose connection dropped can reattach
    /// ([`Manager::exec_attach`]).
    pub async fn exec_start(
        self: &Arc<Self>,
        id: &str,
        req: &ExecRequest,
        caller: &Caller,
        input: Option<mpsc::Receiver<crate::provider::ExecInput>>,
        resume_window: Duration,
    ) -> Result<Attachment> {
        let (rec, provider) = self.exec_target(id, caller).await?;
        let spec = self.prepare_exec(&rec, req).await?;
        let target = rec.runtime_id().to_string();
        let entry = self.execs.start(&rec.id, &Self::command_text(req))?;
        let att = entry.attach(0);
        let me = Arc::clone(self);
        let id = id.to_string();
        let req = req.clone();
        let caller = caller.clone();
        self.events.publish(
            kind::EXEC_STARTED,
            &id,
            events::data([
                ("command", json!(Self::command_text(&req))),
                ("exec_id", json!(entry.id)),
            ]),
        );
        let busy = self.hold_busy(&rec);
        tokio::spawn(async move {
            let _busy = busy;
            let started = Instant::now();
            let (tx, mut rx) = mpsc::channel::<OutputChunk>(64);
            let sink = Arc::clone(&entry);
            // Output goes to the journal; a full journal makes this wait,
            // which makes the command wait. `false` = killed.
            let forward = async move {
                while let Some(c) = rx.recv().await {
                    if !sink.push(c.stream, c.data).await {
                        return false;
                    }
                }
                true
            };
            let run: std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<ExitStatus>> + Send + '_>,
            > = match input {
                Some(input) => Box::pin(provider.exec_interactive(&target, &spec, tx, input)),
                None => Box::pin(provider.exec(&target, &spec, tx)),
            };
            let stop = entry.stop_requested(resume_window);
            tokio::pin!(run);
            tokio::pin!(forward);
            tokio::pin!(stop);
            let mut forward_done = false;
            let res: std::result::Result<Result<ExitStatus>, String> = loop {
                tokio::select! {
                    r = &mut run => break Ok(r),
                    // A killed journal ends `forward`; `stop` names why.
                    _ = &mut forward, if !forward_done => forward_done = true,
                    why = &mut stop => break Err(why),
                }
            };
            let res = match res {
                Ok(r) => r,
                Err(why) => {
                    // Dropping `run` kills the command.
                    me.audit(
                        &caller,
                        &rec.owner_id,
                        "exec_stream",
                        &id,
                        &Self::command_text(&req),
                        &rec.provider,
                        false,
                        why.clone(),
                    );
                    entry.kill(&why);
                    entry.finish(Finish::Failed {
                        kind: ErrorKind::Conflict,
                        message: format!("exec {} stopped: {why}", entry.id),
                    });
                    return;
                }
            };
            // Drain output that is still buffered.
            if !forward_done {
                tokio::select! {
                    _ = &mut forward => {}
                    _ = &mut stop => {}
                }
            }
            let took = started.elapsed();
            match res {
                Ok(status) => {
                    me.metrics.observe("exec_stream", &rec.provider, took, None);
                    me.events.publish(
                        kind::EXEC_COMPLETED,
                        &id,
                        events::data([
                            ("exit_code", json!(status.code)),
                            ("duration", json!(GoDuration::from_std(took).to_string())),
                            ("exec_id", json!(entry.id)),
                        ]),
                    );
                    me.audit(
                        &caller,
                        &rec.owner_id,
                        "exec_stream",
                        &id,
                        &Self::command_text(&req),
                        &rec.provider,
                        true,
                        format!(
                            "exit={} duration={} mode={}",
                            status.code,
                            GoDuration::from_std(took),
                            if req.mode.is_empty() {
                                "shell"
                            } else {
                                &req.mode
                            }
                        ),
                    );
                    entry.finish(Finish::Exit {
                        code: status.code,
                        duration: took,
                    });
                }
                Err(e) => {
                    me.exec_failed(&id, &rec, &req, &caller, &e, took);
                    // Server-side failures name only their kind to the
                    // client (host paths, agent stderr stay in the log).
                    let text = if matches!(
                        e.kind(),
                        ErrorKind::Internal
                            | ErrorKind::ProviderUnavailable
                            | ErrorKind::Unsupported
                    ) {
                        warn!(sandbox_id = %id, error = %e, "streamed exec failed");
                        e.kind().prefix().to_string()
                    } else {
                        e.to_string()
                    };
                    entry.finish(Finish::Failed {
                        kind: e.kind(),
                        message: text,
                    });
                }
            }
        });
        Ok(att)
    }

    /// Running and recent streamed execs of a sandbox, newest first.
    pub async fn execs(&self, id: &str, caller: &Caller) -> Result<Vec<ExecInfo>> {
        let rec = self.get(id, caller).await?;
        Ok(self.execs.list(&rec.id))
    }

    /// One streamed exec.
    pub async fn exec_info(&self, id: &str, exec_id: &str, caller: &Caller) -> Result<ExecInfo> {
        let rec = self.get(id, caller).await?;
        Ok(self.execs.get(&rec.id, exec_id)?.info())
    }

    /// Reattaches to a streamed exec at `offset`.
    pub async fn exec_attach(
        &self,
        id: &str,
        exec_id: &str,
        offset: u64,
        caller: &Caller,
    ) -> Result<Attachment> {
        let rec = self.get(id, caller).await?;
        Ok(self.execs.get(&rec.id, exec_id)?.attach(offset))
    }

    /// Kills a running streamed exec (audited); a finished one is a conflict.
    pub async fn exec_kill(&self, id: &str, exec_id: &str, caller: &Caller) -> Result<ExecInfo> {
        let rec = self.get(id, caller).await?;
        let entry = self.execs.get(&rec.id, exec_id)?;
        if !entry.kill("killed by the caller") {
            return Err(Error::conflict(format!("exec {exec_id} has already ended")));
        }
        self.audit(
            caller,
            &rec.owner_id,
            "exec.kill",
            &rec.id,
            exec_id,
            &rec.provider,
            true,
            entry.command.clone(),
        );
        // The exec task records the end as soon as the command is gone.
        let _ = tokio::time::timeout(Duration::from_secs(5), entry.wait_finished()).await;
        Ok(entry.info())
    }

    // ----- files ----------------------------------------------------------

    async fn file_op<T, F, Fut>(
        &self,
        op: &str,
        id: &str,
        resource: &str,
        caller: &Caller,
        detail: impl FnOnce(&T) -> String,
        f: F,
    ) -> Result<T>
    where
        F: FnOnce(Arc<dyn Provider>, String) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let (rec, provider) = self.exec_target(id, caller).await?;
        let target = rec.runtime_id().to_string();
        let started = Instant::now();
        let res = {
            let _busy = self.hold_busy(&rec);
            f(provider, target).await
        };
        let took = started.elapsed();
        let metric = format!("file_{op}");
        let action = format!("file.{op}");
        match &res {
            Ok(v) => {
                self.metrics.observe(&metric, &rec.provider, took, None);
                self.audit(
                    caller,
                    &rec.owner_id,
                    &action,
                    id,
                    resource,
                    &rec.provider,
                    true,
                    detail(v),
                );
            }
            Err(e) => {
                self.metrics
                    .observe(&metric, &rec.provider, took, Some(&e.to_string()));
                self.audit(
                    caller,
                    &rec.owner_id,
                    &action,
                    id,
                    resource,
                    &rec.provider,
                    false,
                    e.to_string(),
                );
            }
        }
        res
    }

    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        data: Vec<u8>,
        mode: &str,
        caller: &Caller,
    ) -> Result<()> {
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(data);
        drop(tx);
        self.write_file_stream(id, path, rx, mode, caller)
            .await
            .map(|_| ())
    }

    /// Writes a file from `chunks` (the upload ends when the channel
    /// closes), at most `limits.max_file_bytes`; returns its size. The
    /// provider streams it: the server holds a few chunks at a time.
    pub async fn write_file_stream(
        &self,
        id: &str,
        path: &str,
        chunks: mpsc::Receiver<Vec<u8>>,
        mode: &str,
        caller: &Caller,
    ) -> Result<u64> {
        let path = paths::normalize(path)?;
        let mode = paths::parse_mode(mode)?;
        let max = self.cfg.limits.max_file_bytes;
        let p2 = path.clone();
        let len = self
            .file_op(
                "write",
                id,
                &path,
                caller,
                |n: &u64| format!("bytes={n} mode={mode:04o}"),
                |p, t| async move { p.write_file_stream(&t, &p2, mode, chunks, max).await },
            )
            .await?;
        self.events.publish(
            kind::FILE_WRITTEN,
            id,
            events::data([("path", json!(path)), ("bytes", json!(len))]),
        );
        Ok(len)
    }

    /// Reads a whole file (bounded by `limits.max_file_bytes`).
    pub async fn read_file(&self, id: &str, path: &str, caller: &Caller) -> Result<Vec<u8>> {
        self.read_file_stream(id, path, caller)
            .await?
            .collect()
            .await
    }

    /// Streams a regular file of at most `limits.max_file_bytes`.
    pub async fn read_file_stream(
        &self,
        id: &str,
        path: &str,
        caller: &Caller,
    ) -> Result<FileStream> {
        let path = paths::normalize(path)?;
        let max = self.cfg.limits.max_file_bytes;
        let p2 = path.clone();
        let stream = self
            .file_op(
                "read",
                id,
                &path,
                caller,
                |s: &FileStream| format!("bytes={}", s.size),
                |p, t| async move { p.read_file_stream(&t, &p2, max).await },
            )
            .await?;
        let stream = FileStream {
            size: stream.size,
            chunks: self.busy_while(id, stream.chunks),
        };
        self.events.publish(
            kind::FILE_READ,
            id,
            events::data([("path", json!(path)), ("bytes", json!(stream.size))]),
        );
        Ok(stream)
    }

    /// The bounds of one archive transfer (`limits.max_archive_*`).
    pub fn archive_limits(&self) -> crate::provider::ArchiveLimits {
        crate::provider::ArchiveLimits {
            max_bytes: self.cfg.limits.max_archive_bytes,
            max_entries: self.cfg.limits.max_archive_entries,
        }
    }

    /// `path` (a directory's contents, or one file) as a tar stream.
    pub async fn archive_read(&self, id: &str, path: &str, caller: &Caller) -> Result<FileStream> {
        let path = paths::normalize(path)?;
        let limits = self.archive_limits();
        let p2 = path.clone();
        let stream = self
            .file_op(
                "archive_read",
                id,
                &path,
                caller,
                |_: &FileStream| String::new(),
                |p, t| async move { p.archive_read(&t, &p2, limits).await },
            )
            .await?;
        Ok(FileStream {
            size: stream.size,
            chunks: self.busy_while(id, stream.chunks),
        })
    }

    /// Extracts the tar stream `chunks` into directory `path`.
    pub async fn archive_write(
        &self,
        id: &str,
        path: &str,
        chunks: mpsc::Receiver<Vec<u8>>,
        caller: &Caller,
    ) -> Result<crate::provider::ArchiveReport> {
        let path = paths::normalize(path)?;
        let limits = self.archive_limits();
        let p2 = path.clone();
        let report = self
            .file_op(
                "archive_write",
                id,
                &path,
                caller,
                |r: &crate::provider::ArchiveReport| {
                    format!("entries={} bytes={}", r.entries, r.bytes)
                },
                |p, t| async move { p.archive_write(&t, &p2, chunks, limits).await },
            )
            .await?;
        self.events.publish(
            kind::FILE_WRITTEN,
            id,
            events::data([
                ("path", json!(path)),
                ("bytes", json!(report.bytes)),
                ("entries", json!(report.entries)),
            ]),
        );
        Ok(report)
    }

    pub async fn list_files(&self, id: &str, path: &str, caller: &Caller) -> Result<Vec<FileInfo>> {
        let path = dir_path(path)?;
        let p2 = path.clone();
        self.file_op(
            "list",
            id,
            &path,
            caller,
            |v: &Vec<FileInfo>| format!("count={}", v.len()),
            |p, t| async move { p.list_files(&t, &p2).await },
        )
        .await
    }

    /// Lists `path` and the directories below it, `depth` levels deep
    /// (1 = its children), at most `max` entries (more is `ResourceLimit`);
    /// every entry's `path` is absolute. One audited operation. A
    /// directory below the first level that cannot be listed (it vanished,
    /// or is unreadable) is skipped, as `find` would.
    pub async fn list_tree(
        &self,
        id: &str,
        path: &str,
        depth: u32,
        max: usize,
        caller: &Caller,
    ) -> Result<Vec<FileInfo>> {
        let path = dir_path(path)?;
        let p2 = path.clone();
        self.file_op(
            "list",
            id,
            &path,
            caller,
            |v: &Vec<FileInfo>| format!("count={} depth={depth}", v.len()),
            |p, t| async move {
                let mut out: Vec<FileInfo> = Vec::new();
                let mut level = vec![p2];
                for n in 0..depth.max(1) {
                    let mut next = Vec::new();
                    for d in level {
                        let items = match p.list_files(&t, &d).await {
                            Ok(items) => items,
                            Err(_) if n > 0 => continue,
                            Err(e) => return Err(e),
                        };
                        for mut i in items {
                            if !i.path.starts_with('/') {
                                i.path = format!("{}/{}", d.trim_end_matches('/'), i.name);
                            }
                            if i.is_dir {
                                next.push(i.path.clone());
                            }
                            out.push(i);
                            if out.len() > max {
                                return Err(Error::limit(format!(
                                    "more than {max} entries; list less deep"
                                )));
                            }
                        }
                    }
                    level = next;
                }
                Ok(out)
            },
        )
        .await
    }

    pub async fn delete_file(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
        caller: &Caller,
    ) -> Result<()> {
        let path = paths::normalize(path)?;
        if path == "/" {
            return Err(Error::invalid("refusing to delete the sandbox root"));
        }
        let p2 = path.clone();
        self.file_op(
            "delete",
            id,
            &path,
            caller,
            |_| format!("recursive={recursive}"),
            |p, t| async move { p.delete_file(&t, &p2, recursive).await },
        )
        .await
    }

    pub async fn move_file(&self, id: &str, old: &str, new: &str, caller: &Caller) -> Result<()> {
        let old = paths::normalize(old).map_err(|e| e.context("old_path"))?;
        let new = paths::normalize(new).map_err(|e| e.context("new_path"))?;
        if old == "/" || new == "/" {
            return Err(Error::invalid("cannot move the sandbox root"));
        }
        let res = format!("{old} -> {new}");
        self.file_op(
            "move",
            id,
            &res,
            caller,
            |_| String::new(),
            |p, t| async move { p.move_file(&t, &old, &new).await },
        )
        .await
    }

    pub async fn chmod_file(
        &self,
        id: &str,
        path: &str,
        mode: &str,
        caller: &Caller,
    ) -> Result<()> {
        let path = paths::normalize(path)?;
        if mode.trim().is_empty() {
            return Err(Error::invalid("mode is required"));
        }
        let mode = paths::parse_mode(mode)?;
        let p2 = path.clone();
        self.file_op(
            "chmod",
            id,
            &path,
            caller,
            |_| format!("mode={mode:04o}"),
            |p, t| async move { p.chmod_file(&t, &p2, mode).await },
        )
        .await
    }

    pub async fn stat_file(&self, id: &str, path: &str, caller: &Caller) -> Result<FileInfo> {
        let path = paths::normalize(path)?;
        let p2 = path.clone();
        self.file_op(
            "stat",
            id,
            &path,
            caller,
            |_| String::new(),
            |p, t| async move { p.stat_file(&t, &p2).await },
        )
        .await
    }

    /// Watches a directory of the sandbox (see
    /// [`crate::provider::SandboxIo::watch_dir`]); dropping the receiver
    /// ends the watch.
    pub async fn watch_dir(
        &self,
        id: &str,
        path: &str,
        recursive: bool,
        caller: &Caller,
    ) -> Result<crate::provider::FsEvents> {
        let path = paths::normalize(path)?;
        let p2 = path.clone();
        self.file_op(
            "watch",
            id,
            &path,
            caller,
            |_| format!("recursive={recursive}"),
            |p, t| async move { p.watch_dir(&t, &p2, recursive).await },
        )
        .await
        .map(|events| self.busy_while(id, events))
    }

    pub async fn glob_files(
        &self,
        id: &str,
        pattern: &str,
        caller: &Caller,
    ) -> Result<Vec<String>> {
        let pattern = paths::normalize_pattern(pattern)?;
        let p2 = pattern.clone();
        self.file_op(
            "glob",
            id,
            &pattern,
            caller,
            |v: &Vec<String>| format!("count={}", v.len()),
            |p, t| async move { p.glob_files(&t, &p2).await },
        )
        .await
    }

    pub async fn logs(&self, id: &str, lines: usize, caller: &Caller) -> Result<Vec<String>> {
        let (rec, provider) = self.exec_target(id, caller).await?;
        if rec.pool_slot().is_some() {
            // The console is its pool host's (other sandboxes' too).
            return Ok(Vec::new());
        }
        let target = rec.runtime_id().to_string();
        provider.logs(&target, lines).await
    }

    pub async fn stats(&self, id: &str, caller: &Caller) -> Result<Option<crate::provider::Stats>> {
        let (rec, provider) = self.exec_target(id, caller).await?;
        if rec.pool_slot().is_some() {
            // Usage is counted per runtime: its pool host's is shared.
            return Ok(None);
        }
        let target = rec.runtime_id().to_string();
        match provider.stats(&target).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == ErrorKind::Unsupported => Ok(None),
            Err(e) => Err(e),
        }
    }

    // ----- templates ------------------------------------------------------

    pub async fn get_template(&self, name: &str) -> Result<TemplateRecord> {
        self.templates().get(name).await
    }

    // ----- audit ----------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn audit(
        &self,
        caller: &Caller,
        owner: &str,
        action: &str,
        sandbox_id: &str,
        resource: &str,
        provider: &str,
        ok: bool,
        detail: String,
    ) {
        let actor = if !caller.actor.is_empty() {
            caller.actor.clone()
        } else {
            owner.to_string()
        };
        let rec = OpAuditRecord {
            id: 0,
            actor,
            action: action.to_string(),
            sandbox_id: sandbox_id.to_string(),
            // An exec's resource is its command line: keep a short prefix
            // (argv may carry secrets; F-17), retention removes the rest.
            resource: resource.chars().take(MAX_AUDIT_RESOURCE).collect(),
            provider: provider.to_string(),
            status: if ok {
                "success".into()
            } else {
                "failure".into()
            },
            detail: detail.chars().take(2048).collect(),
            tenant_id: caller.tenant_id.clone(),
            request_id: caller.request_id.clone(),
            created_at: Utc::now(),
        };
        if self.audit_tx.try_send(AuditItem::Op(rec)).is_err() {
            warn!(action, "audit queue full; record dropped");
        }
    }

    /// Waits until queued audit records are written (tests and shutdown).
    pub async fn flush_audit(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // A zero-sized marker: the writer processes items in order.
        let marker = OpAuditRecord {
            id: -1,
            actor: String::new(),
            action: String::new(),
            sandbox_id: String::new(),
            resource: String::new(),
            provider: String::new(),
            status: String::new(),
            detail: String::new(),
            tenant_id: String::new(),
            request_id: String::new(),
            created_at: Utc::now(),
        };
        FLUSH.lock().push(tx);
        let _ = self.audit_tx.send(AuditItem::Op(marker)).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
    }
}

static FLUSH: Mutex<Vec<tokio::sync::oneshot::Sender<()>>> = Mutex::new(Vec::new());

async fn audit_writer(store: Arc<dyn Store>, mut rx: mpsc::Receiver<AuditItem>) {
    while let Some(item) = rx.recv().await {
        let res = match item {
            AuditItem::Op(r) if r.id == -1 => {
                for tx in FLUSH.lock().drain(..) {
                    let _ = tx.send(());
                }
                Ok(())
            }
            AuditItem::Op(r) => store.insert_op_audit(&r).await,
            AuditItem::Exec(r) => store.insert_exec_log(&r).await,
        };
        if let Err(e) = res {
            warn!(error = %e, "writing audit record failed");
        }
    }
}

fn check_tenant(r: Arc<SandboxRecord>, caller: &Caller) -> Result<Arc<SandboxRecord>> {
    if !caller.sees(&r) {
        return Err(Error::sandbox_not_found(&r.id));
    }
    Ok(r)
}

fn truncate_lossy(b: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&b[..b.len().min(max)]).into_owned()
}

/// Applies a template under an explicit spawn request.
pub fn merge_template(req: &mut SpawnRequest, t: &TemplateRecord) {
    if req.image.is_empty() {
        req.image = t.image.clone();
    }
    if req.memory_mb == 0 {
        req.memory_mb = t.memory_mb;
    }
    if req.vcpus == 0 {
        req.vcpus = t.cpu_cores;
    }
    if req.ttl.is_empty() && t.ttl_seconds > 0 {
        req.ttl = format!("{}s", t.ttl_seconds);
    }
    if req.provider.is_empty() {
        req.provider = t.provider.clone();
    }
    let md = req.metadata.get_or_insert_with(BTreeMap::new);
    for (k, v) in &t.metadata {
        md.entry(k.clone()).or_insert_with(|| v.clone());
    }
    md.entry("template".into())
        .or_insert_with(|| t.name.clone());
}

/// Parses an RFC 3339 timestamp.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}
