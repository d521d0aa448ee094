//! Rows to records, once for every engine.
//!
//! An engine implements [`Cols`] for its row type (SQLite keeps timestamps
//! as fixed-width RFC 3339 text, Postgres as `TIMESTAMPTZ`; both keep JSON
//! as text), and every mapper below works on either.

use chrono::{DateTime, Utc};
use stacyvm_core::store::{
    AdminAuditRecord, BuildRecord, EnvironmentSpecRecord, ExecLogRecord, LeaseRecord,
    OpAuditRecord, PolicyRecord, PortRecord, PreviewTokenRecord, QuotaRecord,
    RegistryConnectionRecord, SandboxRecord, SnapshotRecord, TemplateRecord, TenantMemberRecord,
    TenantRecord, VolumeRecord, WorkerRecord,
};
use stacyvm_core::{Error, Result};

use crate::codec::from_json;

/// Typed column access on one engine's rows.
pub(crate) trait Cols {
    fn text(&self, col: &str) -> String;
    fn int(&self, col: &str) -> i64;
    fn flag(&self, col: &str) -> bool;
    fn time(&self, col: &str) -> Result<DateTime<Utc>>;
    fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>>;

    fn json<T: serde::de::DeserializeOwned + Default>(&self, col: &str) -> T {
        from_json(&self.text(col))
    }
}

/// A column that holds a small integer.
fn int32(r: &impl Cols, col: &str) -> i32 {
    i32::try_from(r.int(col)).unwrap_or(i32::MAX)
}

pub(crate) fn sandbox(r: &impl Cols) -> Result<SandboxRecord> {
    Ok(SandboxRecord {
        id: r.text("id"),
        state: r.text("state"),
        provider: r.text("provider"),
        image: r.text("image"),
        memory_mb: r.int("memory_mb"),
        vcpus: r.int("vcpus"),
        metadata: r.json("metadata"),
        owner_id: r.text("owner_id"),
        tenant_id: r.text("tenant_id"),
        vm_id: r.text("vm_id"),
        worker_id: r.text("worker_id"),
        created_at: r.time("created_at")?,
        expires_at: r.time("expires_at")?,
        updated_at: r.time("updated_at")?,
        idle_timeout_secs: r.int("idle_timeout_secs"),
        on_timeout: r.text("on_timeout"),
        idle_deadline: r.time("idle_deadline")?,
    })
}

pub(crate) fn exec_log(r: &impl Cols) -> Result<ExecLogRecord> {
    Ok(ExecLogRecord {
        sandbox_id: r.text("sandbox_id"),
        command: r.text("command"),
        exit_code: int32(r, "exit_code"),
        stdout: r.text("stdout"),
        stderr: r.text("stderr"),
        duration: r.text("duration"),
        created_at: r.time("created_at")?,
    })
}

pub(crate) fn template(r: &impl Cols) -> Result<TemplateRecord> {
    Ok(TemplateRecord {
        name: r.text("name"),
        version: r.int("version"),
        image: r.text("image"),
        description: r.text("description"),
        setup: r.json("setup"),
        allowed_hosts: r.json("allowed_hosts"),
        memory_mb: r.int("memory_mb"),
        cpu_cores: r.int("cpu_cores"),
        ttl_seconds: r.int("ttl_seconds"),
        env: r.json("env"),
        secrets: r.json("secrets"),
        pool_size: r.int("pool_size"),
        files: r.json("files"),
        provider: r.text("provider"),
        metadata: r.json("metadata"),
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    })
}

pub(crate) fn quota(r: &impl Cols) -> Result<QuotaRecord> {
    Ok(QuotaRecord {
        owner_id: r.text("owner_id"),
        max_sandboxes: r.int("max_sandboxes"),
        max_ttl_seconds: r.int("max_ttl_seconds"),
        max_exec_timeout_seconds: r.int("max_exec_timeout_seconds"),
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    })
}

pub(crate) fn worker(r: &impl Cols) -> Result<WorkerRecord> {
    Ok(WorkerRecord {
        id: r.text("id"),
        hostname: r.text("hostname"),
        status: r.text("status"),
        providers: r.json("providers"),
        capabilities: r.json("capabilities"),
        capacity: serde_json::from_str(&r.text("capacity")).unwrap_or(serde_json::Value::Null),
        last_heartbeat: r.time("last_heartbeat")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    })
}

pub(crate) fn lease(r: &impl Cols) -> Result<LeaseRecord> {
    Ok(LeaseRecord {
        resource_id: r.text("resource_id"),
        resource_type: r.text("resource_type"),
        holder_id: r.text("holder_id"),
        generation: r.int("generation"),
        expires_at: r.time("expires_at")?,
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    })
}

pub(crate) fn tenant(r: &impl Cols) -> Result<TenantRecord> {
    Ok(TenantRecord {
        id: r.text("id"),
        name: r.text("name"),
        owner_id: r.text("owner_id"),
        settings: r.text("settings"),
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    })
}

pub(crate) fn member(r: &impl Cols) -> Result<TenantMemberRecord> {
    Ok(TenantMemberRecord {
        tenant_id: r.text("tenant_id"),
        user_id: r.text("user_id"),
        role: r.text("role"),
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    })
}

pub(crate) fn policy(r: &impl Cols) -> Result<PolicyRecord> {
    Ok(PolicyRecord {
        id: r.text("id"),
        tenant_id: r.text("tenant_id"),
        resource_type: r.text("resource_type"),
        effect: r.text("effect"),
        pattern: r.text("pattern"),
        priority: r.int("priority"),
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    })
}

pub(crate) fn op_audit(r: &impl Cols) -> Result<OpAuditRecord> {
    Ok(OpAuditRecord {
        id: r.int("id"),
        actor: r.text("actor"),
        action: r.text("action"),
        sandbox_id: r.text("sandbox_id"),
        resource: r.text("resource"),
        provider: r.text("provider"),
        status: r.text("status"),
        detail: r.text("detail"),
        tenant_id: r.text("tenant_id"),
        request_id: r.text("request_id"),
        created_at: r.time("created_at")?,
    })
}

pub(crate) fn admin_audit(r: &impl Cols) -> Result<AdminAuditRecord> {
    Ok(AdminAuditRecord {
        id: r.int("id"),
        actor: r.text("actor"),
        method: r.text("method"),
        path: r.text("path"),
        status: r.int("status"),
        duration_ms: r.int("duration_ms"),
        request_id: r.text("request_id"),
        remote_addr: r.text("remote_addr"),
        user_agent: r.text("user_agent"),
        tenant_id: r.text("tenant_id"),
        created_at: r.time("created_at")?,
    })
}

pub(crate) fn snapshot(r: &impl Cols) -> Result<SnapshotRecord> {
    Ok(SnapshotRecord {
        id: r.text("id"),
        provider: r.text("provider"),
        source_sandbox_id: r.text("source_sandbox_id"),
        image: r.text("image"),
        memory_mb: r.int("memory_mb"),
        vcpus: r.int("vcpus"),
        network_mode: r.text("network_mode"),
        size_bytes: u64::try_from(r.int("size_bytes")).unwrap_or(0),
        owner_id: r.text("owner_id"),
        tenant_id: r.text("tenant_id"),
        created_at: r.time("created_at")?,
    })
}

pub(crate) fn environment_spec(r: &impl Cols) -> Result<EnvironmentSpecRecord> {
    Ok(EnvironmentSpecRecord {
        id: r.text("id"),
        owner_id: r.text("owner_id"),
        tenant_id: r.text("tenant_id"),
        name: r.text("name"),
        base_image: r.text("base_image"),
        python_packages: r.json("python_packages"),
        apt_packages: r.json("apt_packages"),
        python_version: r.text("python_version"),
        dockerfile: r.text("dockerfile"),
        context_sha256: r.text("context_sha256"),
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    })
}

pub(crate) fn build(r: &impl Cols) -> Result<BuildRecord> {
    Ok(BuildRecord {
        id: r.text("id"),
        spec_id: r.text("spec_id"),
        owner_id: r.text("owner_id"),
        tenant_id: r.text("tenant_id"),
        provider: r.text("provider"),
        builder: r.text("builder"),
        status: r.text("status"),
        current_step: r.text("current_step"),
        log: r.text("log_blob"),
        image_size_bytes: u64::try_from(r.int("image_size_bytes")).unwrap_or(0),
        digest_local: r.text("digest_local"),
        error: r.text("error"),
        artifacts: r.json("artifacts"),
        created_at: r.time("created_at")?,
        finished_at: r.opt_time("finished_at")?,
        updated_at: r.time("updated_at")?,
    })
}

pub(crate) fn registry_connection(r: &impl Cols) -> Result<RegistryConnectionRecord> {
    Ok(RegistryConnectionRecord {
        id: r.text("id"),
        owner_id: r.text("owner_id"),
        tenant_id: r.text("tenant_id"),
        provider: r.text("provider"),
        host: r.text("host"),
        username: r.text("username"),
        secret_ref: r.text("secret_ref"),
        is_default: r.flag("is_default"),
        created_at: r.time("created_at")?,
        updated_at: r.time("updated_at")?,
    })
}

pub(crate) fn volume(r: &impl Cols) -> Result<VolumeRecord> {
    Ok(VolumeRecord {
        id: r.text("id"),
        name: r.text("name"),
        size_mb: r.int("size_mb"),
        owner_id: r.text("owner_id"),
        tenant_id: r.text("tenant_id"),
        created_at: r.time("created_at")?,
    })
}

/// `AND EXISTS (…)`: the sandbox's lease still has the fence's holder and
/// generation. `first` numbers Postgres placeholders (`$n`); `None` uses
/// SQLite's `?`. Bind the holder, then the generation.
pub(crate) fn fence_clause(first: Option<usize>) -> String {
    let (h, g) = match first {
        Some(n) => (format!("${n}"), format!("${}", n + 1)),
        None => ("?".to_string(), "?".to_string()),
    };
    format!(
        " AND EXISTS (SELECT 1 FROM leases WHERE leases.resource_id = sandboxes.id \
         AND leases.holder_id = {h} AND leases.generation = {g})"
    )
}

/// The outcome of a sandbox update that changed `rows` rows. None: the
/// sandbox is not there (or, for `live_only`, destroyed), or its lease
/// moved on from the fence.
pub(crate) async fn updated(
    store: &(impl stacyvm_core::store::Store + ?Sized),
    rows: u64,
    id: &str,
    fence: Option<&stacyvm_core::store::Fence>,
    live_only: bool,
) -> Result<()> {
    if rows > 0 {
        return Ok(());
    }
    Err(update_missed(store, id, fence, live_only).await)
}

async fn update_missed(
    store: &(impl stacyvm_core::store::Store + ?Sized),
    id: &str,
    fence: Option<&stacyvm_core::store::Fence>,
    live_only: bool,
) -> Error {
    let missing = Error::not_found(format!("sandbox {id:?}"));
    let Some(f) = fence else { return missing };
    match store.get_sandbox(id).await {
        Ok(rec) if !(live_only && rec.state == "destroyed") => {
            let now = match store.get_lease(id).await {
                Ok(l) => l.fence().to_string(),
                Err(_) => "no lease".to_string(),
            };
            Error::conflict(format!(
                "stale lease for sandbox {id:?}: acting as {f}, the lease is now {now}"
            ))
        }
        Ok(_) => missing,
        Err(e) if e.kind() == stacyvm_core::ErrorKind::NotFound => missing,
        Err(e) => e,
    }
}

/// The admission rule of [`stacyvm_core::store::Store::insert_sandbox_admitted`],
/// given the live counts before `rec`.
pub(crate) fn admit(
    total: i64,
    owned: i64,
    rec: &SandboxRecord,
    max_total: i64,
    max_per_owner: i64,
) -> Result<()> {
    if max_total > 0 && total >= max_total {
        return Err(Error::limit(format!("max sandboxes reached ({max_total})")));
    }
    if max_per_owner > 0 && !rec.owner_id.is_empty() && owned >= max_per_owner {
        return Err(Error::limit(format!(
            "max sandboxes per owner reached ({max_per_owner})"
        )));
    }
    Ok(())
}

pub(crate) fn port(r: &impl Cols) -> Result<PortRecord> {
    Ok(PortRecord {
        sandbox_id: r.text("sandbox_id"),
        port: u16::try_from(r.int("port")).unwrap_or(0),
        mode: r.text("mode"),
        created_by: r.text("created_by"),
        created_at: r.time("created_at")?,
    })
}

pub(crate) fn preview_token(r: &impl Cols) -> Result<PreviewTokenRecord> {
    Ok(PreviewTokenRecord {
        id: r.text("id"),
        sandbox_id: r.text("sandbox_id"),
        port: u16::try_from(r.int("port")).unwrap_or(0),
        hash: r.text("hash"),
        created_by: r.text("created_by"),
        created_at: r.time("created_at")?,
        expires_at: r.time("expires_at")?,
        revoked: r.int("revoked") != 0,
    })
}
