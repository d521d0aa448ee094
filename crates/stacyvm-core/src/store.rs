//! The persistence trait and its records.
//!
//! Implemented by `stacyvm-store` for SQLite and Postgres; callers never see
//! which. Not-found is `ErrorKind::NotFound`, uniqueness violations are
//! `ErrorKind::Conflict`. Sandboxes are soft-deleted (state `destroyed`).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The current time as records keep it: to the microsecond, the precision
/// of every engine (Postgres `TIMESTAMPTZ`), so a record read back from the
/// store equals the one that was written.
pub fn record_now() -> DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(6)
}

/// A persisted sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub state: String,
    pub provider: String,
    pub image: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    pub metadata: BTreeMap<String, String>,
    pub owner_id: String,
    pub tenant_id: String,
    pub vm_id: String,
    pub worker_id: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Seconds without activity after which `on_timeout` applies; 0: no
    /// idle timeout.
    #[serde(default)]
    pub idle_timeout_secs: i64,
    /// What a timeout (time to live or idle) does: `""`/`kill` destroys,
    /// `pause` pauses.
    #[serde(default)]
    pub on_timeout: String,
    /// When the idle timeout falls due; activity moves it on. Meaningful
    /// only with `idle_timeout_secs > 0`.
    #[serde(default)]
    pub idle_deadline: DateTime<Utc>,
}

/// Metadata key of a pooled sandbox (reserved): its slot number in the
/// pool host named by its `vm_id`.
pub const POOL_SLOT_KEY: &str = "stacyvm.sys.pool_slot";

impl SandboxRecord {
    /// The id its provider knows it by: a pool slot's (`host/slot`) for a
    /// pooled sandbox, the runtime of a moved sandbox, else its own.
    pub fn runtime_id(&self) -> String {
        if self.vm_id.is_empty() {
            self.id.clone()
        } else if self.pool_slot().is_some() {
            crate::provider::slot_runtime_id(&self.vm_id, &self.id)
        } else {
            self.vm_id.clone()
        }
    }

    /// A pooled sandbox's slot number in its pool host (`vm_id`).
    pub fn pool_slot(&self) -> Option<u32> {
        self.metadata.get(POOL_SLOT_KEY)?.parse().ok()
    }

    /// Whether this record is a pool host (nobody's; hidden from the API).
    pub fn is_pool_host(&self) -> bool {
        self.metadata
            .contains_key(crate::provider::POOL_HOST_METADATA)
    }
}

/// One synchronous exec, for the exec log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecLogRecord {
    pub sandbox_id: String,
    pub command: String,
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub duration: String,
    pub created_at: DateTime<Utc>,
}

/// A stored template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub name: String,
    pub version: i64,
    pub image: String,
    pub description: String,
    pub setup: Vec<String>,
    pub allowed_hosts: Vec<String>,
    pub memory_mb: i64,
    pub cpu_cores: i64,
    pub ttl_seconds: i64,
    pub env: BTreeMap<String, String>,
    pub secrets: Vec<stacyvm_api::TemplateSecret>,
    pub pool_size: i64,
    /// Files written into a sandbox spawned from the template: absolute
    /// path → text.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    pub provider: String,
    pub metadata: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A per-owner quota override; zero means "use the global default".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaRecord {
    pub owner_id: String,
    pub max_sandboxes: i64,
    pub max_ttl_seconds: i64,
    pub max_exec_timeout_seconds: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An operation audit row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpAuditRecord {
    pub id: i64,
    pub actor: String,
    pub action: String,
    pub sandbox_id: String,
    pub resource: String,
    pub provider: String,
    pub status: String,
    pub detail: String,
    pub tenant_id: String,
    pub request_id: String,
    pub created_at: DateTime<Utc>,
}

/// Filters for listing operation audit rows; empty fields do not filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpAuditFilter {
    pub actor: String,
    pub action: String,
    pub sandbox_id: String,
    pub tenant_id: String,
    pub since: Option<DateTime<Utc>>,
    pub limit: i64,
}

/// Filters for listing admin audit rows; empty fields do not filter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdminAuditFilter {
    pub actor: String,
    pub method: String,
    pub tenant_id: String,
    pub since: Option<DateTime<Utc>>,
    pub limit: i64,
}

/// A tenant membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantMemberRecord {
    pub tenant_id: String,
    pub user_id: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub id: String,
    pub name: String,
    pub owner_id: String,
    /// JSON object text.
    pub settings: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A spawn policy; `tenant_id` "" = global.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub id: String,
    pub tenant_id: String,
    /// `image`, `provider` or `network`.
    pub resource_type: String,
    /// `allow` or `deny`.
    pub effect: String,
    pub pattern: String,
    pub priority: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A snapshot of a sandbox (the provider holds its data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// `snap-` + 16 hex digits.
    pub id: String,
    pub provider: String,
    /// The sandbox it was taken of.
    pub source_sandbox_id: String,
    pub image: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    /// The network mode of the source (children get the same).
    pub network_mode: String,
    pub size_bytes: u64,
    pub owner_id: String,
    pub tenant_id: String,
    pub created_at: DateTime<Utc>,
}

/// An environment spec: what a build makes (base image and packages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvironmentSpecRecord {
    pub id: String,
    pub owner_id: String,
    pub tenant_id: String,
    /// Unique per owner.
    pub name: String,
    pub base_image: String,
    pub python_packages: Vec<String>,
    pub apt_packages: Vec<String>,
    pub python_version: String,
    /// A Dockerfile (the subset `crate::dockerfile` parses), run after
    /// the packages.
    pub dockerfile: String,
    /// SHA-256 of the uploaded build context (`COPY` sources); empty when
    /// none was uploaded.
    pub context_sha256: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One place a build's image goes: the provider's own store (`local`) or
/// a registry connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// `local`, or the registry connection's provider (`ghcr`,
    /// `dockerhub`, `registry`).
    pub target: String,
    /// The registry connection pushed with (empty for `local`).
    #[serde(default)]
    pub connection_id: String,
    pub image_ref: String,
    #[serde(default)]
    pub digest: String,
    /// `pending`, `ready` or `failed`.
    pub status: String,
    #[serde(default)]
    pub error: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A build of an environment spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: String,
    pub spec_id: String,
    pub owner_id: String,
    pub tenant_id: String,
    /// The provider whose image store (or engine) gets the image.
    pub provider: String,
    /// The worker id of the control plane running it (set by the claim).
    pub builder: String,
    /// `queued`, `building`, `ready`, `failed` or `canceled`.
    pub status: String,
    pub current_step: String,
    /// The build's output (bounded; see `manager::builds`).
    pub log: String,
    pub image_size_bytes: u64,
    pub digest_local: String,
    pub error: String,
    pub artifacts: Vec<ArtifactRecord>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// A connection to a container registry builds push to. The credential is
/// a secret of the server's (`secret_ref` names it), never stored here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryConnectionRecord {
    pub id: String,
    pub owner_id: String,
    pub tenant_id: String,
    /// `ghcr`, `dockerhub` or `registry` (any OCI registry at `host`).
    pub provider: String,
    pub host: String,
    pub username: String,
    /// The name of a server secret (`<data_dir>/secrets/NAME` or
    /// `STACYVM_SECRET_NAME`), resolved when used.
    pub secret_ref: String,
    pub is_default: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A named persistent volume (the host holds its data).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// `vol-` + 16 hex digits.
    pub id: String,
    /// Unique within the tenant.
    pub name: String,
    /// Capacity of its file system.
    pub size_mb: i64,
    pub owner_id: String,
    pub tenant_id: String,
    pub created_at: DateTime<Utc>,
}

/// A sandbox port the preview proxy serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortRecord {
    pub sandbox_id: String,
    pub port: u16,
    /// `public` or `token`.
    pub mode: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// An access token of a token-mode port (its secret is never stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviewTokenRecord {
    /// `pt-` + 16 hex digits.
    pub id: String,
    pub sandbox_id: String,
    pub port: u16,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub revoked: bool,
}

/// An admin audit row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminAuditRecord {
    pub id: i64,
    pub actor: String,
    pub method: String,
    pub path: String,
    pub status: i64,
    pub duration_ms: i64,
    pub request_id: String,
    pub remote_addr: String,
    pub user_agent: String,
    pub tenant_id: String,
    pub created_at: DateTime<Utc>,
}

/// A registered worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub hostname: String,
    pub status: String,
    pub providers: Vec<String>,
    pub capabilities: Vec<String>,
    pub capacity: serde_json::Value,
    pub last_heartbeat: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A lease (fencing token) on a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub resource_id: String,
    pub resource_type: String,
    pub holder_id: String,
    pub generation: i64,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl LeaseRecord {
    /// The fencing token this lease gives its holder.
    pub fn fence(&self) -> Fence {
        Fence {
            holder_id: self.holder_id.clone(),
            generation: self.generation,
        }
    }
}

/// A fencing token: who holds a sandbox's lease, at which generation.
///
/// A fenced write lands only while the sandbox's lease row still has this
/// holder and generation; a writer whose lease was taken over since gets
/// a `Conflict` and changes nothing (S-11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub holder_id: String,
    pub generation: i64,
}

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.holder_id, self.generation)
    }
}

/// Persistence for everything the control plane remembers.
#[async_trait]
pub trait Store: Debug + Send + Sync + 'static {
    /// Engine name (`sqlite`, `postgres`).
    fn engine(&self) -> &'static str;
    /// A cheap round trip to the database.
    async fn ping(&self) -> Result<()>;

    /// Inserts a new sandbox; a duplicate id is a conflict.
    async fn insert_sandbox(&self, rec: &SandboxRecord) -> Result<()>;
    /// Inserts `rec` only if, counting it, at most `max_total` sandboxes
    /// (0 = no limit) and at most `max_per_owner` of its owner (0 = no
    /// limit, or no owner) are live; otherwise `ResourceLimit` naming the
    /// limit. Atomic across every process sharing the store: the cluster's
    /// admission.
    async fn insert_sandbox_admitted(
        &self,
        rec: &SandboxRecord,
        max_total: i64,
        max_per_owner: i64,
    ) -> Result<()>;
    /// Records a spawned sandbox's state and runtime id. With a fence,
    /// only while the lease still matches it (else `Conflict`).
    async fn set_sandbox_runtime(
        &self,
        id: &str,
        state: &str,
        vm_id: &str,
        fence: Option<&Fence>,
    ) -> Result<()>;
    /// Any sandbox, destroyed or not; unknown id is not-found.
    async fn get_sandbox(&self, id: &str) -> Result<SandboxRecord>;
    /// Non-destroyed sandboxes, newest first.
    async fn list_active_sandboxes(&self) -> Result<Vec<SandboxRecord>>;
    /// Moves a sandbox to another worker: its worker id, runtime id and
    /// state, under the fence of the lease its new worker holds.
    async fn set_sandbox_worker(
        &self,
        id: &str,
        worker_id: &str,
        vm_id: &str,
        state: &str,
        fence: &Fence,
    ) -> Result<()>;
    /// Sets the state (and `updated_at`); unknown id is not-found. With a
    /// fence, only while the lease still matches it (else `Conflict`).
    async fn set_sandbox_state(&self, id: &str, state: &str, fence: Option<&Fence>) -> Result<()>;
    /// Sets `expires_at` of a non-destroyed sandbox; else not-found. With a
    /// fence, only while the lease still matches it (else `Conflict`).
    async fn set_sandbox_expiry(
        &self,
        id: &str,
        expires_at: DateTime<Utc>,
        fence: Option<&Fence>,
    ) -> Result<()>;
    /// Hands a live sandbox to a new owner (a claimed warm-pool sandbox):
    /// sets its owner, tenant, metadata, expiry, idle timeout and
    /// `on_timeout` from `rec`. With a fence, only while the lease still
    /// matches it (else `Conflict`).
    async fn reassign_sandbox(&self, rec: &SandboxRecord, fence: Option<&Fence>) -> Result<()>;
    /// Replaces the metadata of a non-destroyed sandbox (`updated_at` is
    /// left alone); else not-found.
    async fn set_sandbox_metadata(
        &self,
        id: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<()>;
    /// Non-destroyed sandboxes with `expires_at < now`.
    async fn list_expired_sandboxes(&self, now: DateTime<Utc>) -> Result<Vec<SandboxRecord>>;
    /// Running sandboxes with an idle timeout whose `idle_deadline < now`.
    async fn list_idle_sandboxes(&self, now: DateTime<Utc>) -> Result<Vec<SandboxRecord>>;
    /// Moves each sandbox's `idle_deadline` on to the given time (never
    /// back; unknown ids are skipped). `updated_at` is left alone.
    async fn set_idle_deadlines(&self, deadlines: &[(String, DateTime<Utc>)]) -> Result<()>;

    async fn insert_exec_log(&self, rec: &ExecLogRecord) -> Result<()>;
    async fn list_exec_logs(&self, sandbox_id: &str, limit: i64) -> Result<Vec<ExecLogRecord>>;
    /// Deletes exec logs created before `before`; returns how many.
    async fn prune_exec_logs(&self, before: DateTime<Utc>) -> Result<u64>;
    /// Deletes destroyed sandboxes (and their exec logs) last updated
    /// before `before`; live sandboxes are never touched. Returns how many
    /// sandboxes were removed.
    async fn prune_destroyed_sandboxes(&self, before: DateTime<Utc>) -> Result<u64>;

    /// Creates a template; a duplicate name is a conflict.
    async fn create_template(&self, t: &TemplateRecord) -> Result<()>;
    async fn get_template(&self, name: &str) -> Result<TemplateRecord>;
    /// Ordered by name.
    async fn list_templates(&self) -> Result<Vec<TemplateRecord>>;
    /// Replaces every mutable field; `created_at` is preserved. Not-found if missing.
    async fn update_template(&self, t: &TemplateRecord) -> Result<TemplateRecord>;
    async fn delete_template(&self, name: &str) -> Result<()>;

    /// Insert or replace; `created_at` of an existing row is preserved.
    async fn upsert_quota(&self, q: &QuotaRecord) -> Result<QuotaRecord>;
    async fn get_quota(&self, owner_id: &str) -> Result<QuotaRecord>;
    /// Ordered by owner id.
    async fn list_quotas(&self) -> Result<Vec<QuotaRecord>>;
    async fn delete_quota(&self, owner_id: &str) -> Result<()>;

    async fn insert_op_audit(&self, rec: &OpAuditRecord) -> Result<()>;
    /// Newest first.
    async fn list_op_audit(&self, filter: &OpAuditFilter) -> Result<Vec<OpAuditRecord>>;
    async fn insert_admin_audit(&self, rec: &AdminAuditRecord) -> Result<()>;
    /// Newest first; limit default 100, cap 500.
    async fn list_admin_audit(&self, filter: &AdminAuditFilter) -> Result<Vec<AdminAuditRecord>>;
    /// Deletes admin and operation audit rows older than `before`; returns
    /// the number removed.
    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64>;

    /// Insert or update (role); `created_at` of an existing row is kept.
    async fn upsert_tenant_member(&self, m: &TenantMemberRecord) -> Result<TenantMemberRecord>;
    /// Not found when `user_id` is not a member of `tenant_id`.
    async fn get_tenant_member(&self, tenant_id: &str, user_id: &str)
        -> Result<TenantMemberRecord>;
    /// Oldest first.
    async fn list_tenant_members(&self, tenant_id: &str) -> Result<Vec<TenantMemberRecord>>;
    async fn delete_tenant_member(&self, tenant_id: &str, user_id: &str) -> Result<()>;

    /// Conflict on a duplicate id.
    async fn create_tenant(&self, t: &TenantRecord) -> Result<()>;
    async fn get_tenant(&self, id: &str) -> Result<TenantRecord>;
    /// Newest first.
    async fn list_tenants(&self) -> Result<Vec<TenantRecord>>;
    async fn update_tenant(&self, t: &TenantRecord) -> Result<()>;
    /// Removes the tenant with its members and tenant policies.
    async fn delete_tenant(&self, id: &str) -> Result<()>;

    /// Conflict on a duplicate id.
    async fn create_policy(&self, p: &PolicyRecord) -> Result<()>;
    /// `Some(t)`: tenant `t` and global; `None`: global only. Priority
    /// ascending, then oldest first.
    async fn list_policies(&self, tenant_id: Option<&str>) -> Result<Vec<PolicyRecord>>;
    /// Deletes policy `id` only if it belongs to `tenant_id` ("" = global).
    async fn delete_policy(&self, tenant_id: &str, id: &str) -> Result<()>;

    /// Insert or update; `created_at` of an existing row is preserved.
    /// Exposes a port (or changes its mode).
    async fn put_port(&self, r: &PortRecord) -> Result<()>;
    /// Unknown → `NotFound`.
    async fn get_port(&self, sandbox_id: &str, port: u16) -> Result<PortRecord>;
    /// A sandbox's exposed ports, by port.
    async fn list_ports(&self, sandbox_id: &str) -> Result<Vec<PortRecord>>;
    /// Unexposes a port and drops its tokens; unknown → `NotFound`.
    async fn delete_port(&self, sandbox_id: &str, port: u16) -> Result<()>;
    /// Drops every port and token of a sandbox; how many ports.
    async fn delete_sandbox_ports(&self, sandbox_id: &str) -> Result<u64>;
    async fn insert_preview_token(&self, r: &PreviewTokenRecord) -> Result<()>;
    /// By the hash of its secret; unknown → `NotFound`.
    async fn find_preview_token(&self, hash: &str) -> Result<PreviewTokenRecord>;
    /// A port's tokens, oldest first.
    async fn list_preview_tokens(
        &self,
        sandbox_id: &str,
        port: u16,
    ) -> Result<Vec<PreviewTokenRecord>>;
    /// Marks a token revoked; unknown (for this sandbox) → `NotFound`.
    async fn revoke_preview_token(&self, sandbox_id: &str, id: &str) -> Result<()>;

    async fn insert_snapshot(&self, r: &SnapshotRecord) -> Result<()>;
    async fn get_snapshot(&self, id: &str) -> Result<SnapshotRecord>;
    /// One tenant's snapshots, or every snapshot with `None`; oldest first.
    async fn list_snapshots(&self, tenant_id: Option<&str>) -> Result<Vec<SnapshotRecord>>;
    async fn delete_snapshot(&self, id: &str) -> Result<()>;

    /// (owner, name) taken is a `Conflict`.
    async fn insert_environment_spec(&self, r: &EnvironmentSpecRecord) -> Result<()>;
    async fn get_environment_spec(&self, id: &str) -> Result<EnvironmentSpecRecord>;
    /// One tenant's specs, or all with `None`; newest first.
    async fn list_environment_specs(
        &self,
        tenant_id: Option<&str>,
    ) -> Result<Vec<EnvironmentSpecRecord>>;
    /// Records the checksum of a spec's uploaded build context.
    async fn set_environment_spec_context(&self, id: &str, sha256: &str) -> Result<()>;
    /// Deletes the spec and the records of its builds.
    async fn delete_environment_spec(&self, id: &str) -> Result<()>;

    async fn insert_build(&self, r: &BuildRecord) -> Result<()>;
    async fn get_build(&self, id: &str) -> Result<BuildRecord>;
    /// Replaces a build's row (NotFound when it is gone).
    async fn update_build(&self, r: &BuildRecord) -> Result<()>;
    /// One tenant's builds, or all with `None`; newest first, at most `limit`.
    async fn list_builds(&self, tenant_id: Option<&str>, limit: usize) -> Result<Vec<BuildRecord>>;
    /// Saves a running build's log (only while it is `building`: a final
    /// state is never overwritten); returns its status now.
    async fn save_build_log(&self, id: &str, log: &str, now: DateTime<Utc>) -> Result<String>;
    /// Moves a build from `queued` to `building` unless another server
    /// (or a cancel) got there first: true when this caller may run it.
    async fn claim_build(&self, id: &str, builder: &str, now: DateTime<Utc>) -> Result<bool>;
    /// Builds still `queued` or `building` (for a restarting server).
    async fn unfinished_builds(&self) -> Result<Vec<BuildRecord>>;

    /// (owner, provider, username) taken is a `Conflict`.
    async fn insert_registry_connection(&self, r: &RegistryConnectionRecord) -> Result<()>;
    /// One tenant's connections, or all with `None`; newest first.
    async fn list_registry_connections(
        &self,
        tenant_id: Option<&str>,
    ) -> Result<Vec<RegistryConnectionRecord>>;
    async fn delete_registry_connection(&self, id: &str) -> Result<()>;

    /// A name already taken in the tenant is a `Conflict`.
    async fn insert_volume(&self, r: &VolumeRecord) -> Result<()>;
    async fn get_volume(&self, id: &str) -> Result<VolumeRecord>;
    /// One tenant's volumes, or every volume with `None`; oldest first.
    async fn list_volumes(&self, tenant_id: Option<&str>) -> Result<Vec<VolumeRecord>>;
    async fn delete_volume(&self, id: &str) -> Result<()>;

    async fn upsert_worker(&self, w: &WorkerRecord) -> Result<WorkerRecord>;
    /// Ordered by id.
    async fn list_workers(&self) -> Result<Vec<WorkerRecord>>;
    /// One worker; `NotFound` when it never registered or was deleted.
    async fn get_worker(&self, id: &str) -> Result<WorkerRecord>;
    /// Removes a worker's row (its leases stay and expire).
    async fn delete_worker(&self, id: &str) -> Result<()>;

    /// Takes the lease when free, expired or already held by `holder`
    /// (generation + 1); else conflict.
    async fn acquire_lease(
        &self,
        resource_id: &str,
        resource_type: &str,
        holder_id: &str,
        ttl: Duration,
    ) -> Result<LeaseRecord>;
    /// Extends a lease held (unexpired) by `holder`; else conflict.
    async fn renew_lease(
        &self,
        resource_id: &str,
        holder_id: &str,
        ttl: Duration,
    ) -> Result<LeaseRecord>;
    /// Drops a lease held by `holder`; not-found when it is not.
    async fn release_lease(&self, resource_id: &str, holder_id: &str) -> Result<()>;
    /// Hands a lease from its holder (as `from` names it, generation
    /// included) to `to`, generation + 1, in one step: nobody else can
    /// take it in between. A lease that moved on is a `Conflict`.
    async fn transfer_lease(
        &self,
        resource_id: &str,
        from: &Fence,
        to: &str,
        ttl: Duration,
    ) -> Result<LeaseRecord>;
    async fn get_lease(&self, resource_id: &str) -> Result<LeaseRecord>;
    /// Ordered by resource id.
    async fn list_leases(&self) -> Result<Vec<LeaseRecord>>;
}
