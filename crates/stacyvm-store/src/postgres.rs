//! Postgres engine (feature `postgres`): the store of a cluster.
//!
//! Several control planes and workers share one database. Timestamps are
//! `TIMESTAMPTZ` (microseconds); lease times come from the database's clock,
//! so machines whose clocks disagree still agree on who holds a lease.
//! Migrations run under an advisory lock: control planes starting together
//! on a fresh database apply each migration once.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
use stacyvm_core::store::{
    AdminAuditFilter, AdminAuditRecord, BuildRecord, EnvironmentSpecRecord, ExecLogRecord, Fence,
    LeaseRecord, OpAuditFilter, OpAuditRecord, PolicyRecord, PortRecord, PreviewTokenRecord,
    QuotaRecord, RegistryConnectionRecord, SandboxRecord, SnapshotRecord, Store, TemplateRecord,
    TenantMemberRecord, TenantRecord, VolumeRecord, WorkerRecord,
};
use stacyvm_core::{Error, ErrorKind, Result};

use crate::codec::{db_err, to_json};
use crate::rows::{self, Cols};

pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_initial.sql")),
    (
        2,
        include_str!("../migrations/postgres/0002_retention_indexes.sql"),
    ),
    (3, include_str!("../migrations/postgres/0003_snapshots.sql")),
    (4, include_str!("../migrations/postgres/0004_preview.sql")),
    (5, include_str!("../migrations/postgres/0005_lifecycle.sql")),
    (6, include_str!("../migrations/postgres/0006_volumes.sql")),
    (
        7,
        include_str!("../migrations/postgres/0007_registry_tenancy.sql"),
    ),
    (8, include_str!("../migrations/postgres/0008_builds.sql")),
];

/// The newest schema version this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.iter().map(|(v, _)| *v).max().unwrap_or(0)
}

/// The tables of the schema, for checks and rehearsals.
pub const TABLES: &[&str] = &[
    "sandboxes",
    "exec_logs",
    "provider_configs",
    "templates",
    "environment_specs",
    "environment_builds",
    "environment_artifacts",
    "registry_connections",
    "owner_quotas",
    "admin_audit_logs",
    "operation_audit_logs",
    "workers",
    "leases",
    "tenants",
    "tenant_members",
    "policies",
    "snapshots",
    "volumes",
    "sandbox_ports",
    "preview_tokens",
];

/// Key of the advisory lock held while migrating (`"stacyvm"` in ASCII).
const MIGRATION_LOCK: i64 = 0x0073_7461_6379_766d;

/// The Postgres store.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl Cols for PgRow {
    fn text(&self, col: &str) -> String {
        self.get(col)
    }
    fn int(&self, col: &str) -> i64 {
        self.get(col)
    }
    fn flag(&self, col: &str) -> bool {
        self.get(col)
    }
    fn time(&self, col: &str) -> Result<DateTime<Utc>> {
        Ok(self.get(col))
    }
    fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>> {
        Ok(self.get(col))
    }
}

/// Parses a DSN (`postgres://user:pass@host:port/db?…` or key=value), never
/// echoing it: the error names what is wrong, not the secret.
pub fn parse_dsn(dsn: &str) -> Result<PgConnectOptions> {
    dsn.parse::<PgConnectOptions>().map_err(|_| {
        Error::invalid("database.dsn is not a valid Postgres connection string (postgres://user:password@host:port/database)")
    })
}

/// `dsn` naming database `db` instead (URL or key=value form).
pub fn with_database(dsn: &str, db: &str) -> String {
    let dsn = dsn.trim();
    let Some(scheme_end) = dsn.find("://").map(|i| i + 3) else {
        // key=value: a later keyword overrides an earlier one.
        return format!("{dsn} dbname={db}");
    };
    let (base, query) = match dsn.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (dsn, None),
    };
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{db}?{q}"),
        None => format!("{host_part}/{db}"),
    }
}

impl PostgresStore {
    /// Connects (10 connections at most) and applies pending migrations.
    pub async fn connect(dsn: &str) -> Result<Self> {
        let opts = parse_dsn(dsn)?.application_name("stacyvm");
        Self::with_options(opts, 10).await
    }

    /// Connects with explicit options.
    pub async fn with_options(opts: PgConnectOptions, max: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts)
            .await
            .map_err(|e| {
                Error::new(ErrorKind::StoreUnavailable, "connecting to postgres").with_source(e)
            })?;
        let store = PostgresStore { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// The underlying pool (tooling and the event bridge).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applied migration versions, ascending.
    pub async fn applied_migrations(&self) -> Result<Vec<i64>> {
        sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)
    }

    async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
        let result = migrate_locked(&mut conn).await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await;
        result?;
        unlocked.map_err(db_err)?;
        Ok(())
    }
}

/// Key of the advisory lock admissions take (`"admit"`).
const ADMISSION_LOCK: i64 = 0x0061_646d_6974;

async fn insert_sandbox_in(conn: &mut sqlx::PgConnection, r: &SandboxRecord) -> Result<()> {
    sqlx::query(
        "INSERT INTO sandboxes (id, state, provider, image, memory_mb, vcpus, metadata, created_at, expires_at, updated_at, owner_id, vm_id, worker_id, tenant_id, idle_timeout_secs, on_timeout, idle_deadline) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
    )
    .bind(&r.id)
    .bind(&r.state)
    .bind(&r.provider)
    .bind(&r.image)
    .bind(r.memory_mb)
    .bind(r.vcpus)
    .bind(to_json(&r.metadata))
    .bind(r.created_at)
    .bind(r.expires_at)
    .bind(r.updated_at)
    .bind(&r.owner_id)
    .bind(&r.vm_id)
    .bind(&r.worker_id)
    .bind(&r.tenant_id)
    .bind(r.idle_timeout_secs)
    .bind(&r.on_timeout)
    .bind(r.idle_deadline)
    .execute(&mut *conn)
    .await
    .map_err(|e| conflict_as(e, || format!("sandbox {} already exists", r.id)))?;
    Ok(())
}

/// The channel control planes share events on.
pub const EVENTS_CHANNEL: &str = "stacyvm_events";
/// NOTIFY payloads must stay under 8000 bytes; an event's data is dropped
/// beyond this.
const MAX_PAYLOAD: usize = 7900;

impl PostgresStore {
    /// Carries `bus` events between control planes: what is published here
    /// is `NOTIFY`ed (tagged with `instance`), what others notify is
    /// injected here. Reconnects with backoff; events published while the
    /// database is away are not delivered to the others.
    pub fn bridge_events(
        &self,
        bus: std::sync::Arc<stacyvm_core::events::EventBus>,
        instance: String,
    ) -> tokio::task::JoinHandle<()> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<stacyvm_api::Event>(1024);
        bus.bridge_to(tx);
        let pool = self.pool.clone();
        let me = instance.clone();
        let send = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let mut v = serde_json::json!({"src": me, "event": ev});
                let mut text = v.to_string();
                if text.len() > MAX_PAYLOAD {
                    v["event"]["data"] = serde_json::Value::Null;
                    text = v.to_string();
                }
                if text.len() > MAX_PAYLOAD {
                    continue;
                }
                if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(EVENTS_CHANNEL)
                    .bind(&text)
                    .execute(&pool)
                    .await
                {
                    tracing::debug!(error = %e, "event not shared with other control planes");
                }
            }
        });
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let mut attempt = 0u32;
            loop {
                let listener = async {
                    let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
                    l.listen(EVENTS_CHANNEL).await?;
                    Ok::<_, sqlx::Error>(l)
                };
                let mut l = match listener.await {
                    Ok(l) => l,
                    Err(e) => {
                        attempt = (attempt + 1).min(10);
                        tracing::warn!(error = %e, attempt, "event bridge: cannot listen; retrying");
                        tokio::time::sleep(Duration::from_secs(2 * u64::from(attempt))).await;
                        continue;
                    }
                };
                attempt = 0;
                loop {
                    match l.recv().await {
                        Ok(n) => {
                            let Ok(v) = serde_json::from_str::<serde_json::Value>(n.payload())
                            else {
                                continue;
                            };
                            if v["src"].as_str() == Some(instance.as_str()) {
                                continue;
                            }
                            if let Ok(ev) =
                                serde_json::from_value::<stacyvm_api::Event>(v["event"].clone())
                            {
                                bus.inject(ev);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "event bridge: connection lost; reconnecting");
                            break;
                        }
                    }
                }
                if send.is_finished() {
                    return;
                }
            }
        })
    }
}

async fn migrate_locked(conn: &mut sqlx::PgConnection) -> Result<()> {
    use sqlx::Connection;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)",
    )
    .execute(&mut *conn)
    .await
    .map_err(db_err)?;
    for (version, sql) in MIGRATIONS {
        let mut tx = conn.begin().await.map_err(db_err)?;
        let done: Option<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                .bind(version)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        if done.is_some() {
            continue;
        }
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::internal(format!("applying migration {version}")).with_source(e))?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())")
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds a fence's holder and generation (see [`rows::fence_clause`]).
fn bind_fence<'q>(q: Query<'q>, fence: Option<&'q Fence>) -> Query<'q> {
    match fence {
        Some(f) => q.bind(f.holder_id.as_str()).bind(f.generation),
        None => q,
    }
}

fn not_found_if_zero(rows: u64, what: String) -> Result<()> {
    if rows == 0 {
        Err(Error::not_found(what))
    } else {
        Ok(())
    }
}

fn conflict_as(e: sqlx::Error, what: impl FnOnce() -> String) -> Error {
    match db_err(e) {
        e if e.kind() == ErrorKind::Conflict => Error::conflict(what()),
        e => e,
    }
}

fn secs(ttl: Duration) -> f64 {
    ttl.as_secs_f64().min(1e9)
}

#[async_trait]
impl Store for PostgresStore {
    fn engine(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn insert_sandbox(&self, r: &SandboxRecord) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        insert_sandbox_in(&mut conn, r).await
    }

    async fn insert_sandbox_admitted(
        &self,
        r: &SandboxRecord,
        max_total: i64,
        max_per_owner: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // Every admission of the cluster passes here one at a time.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(ADMISSION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let (total, owned): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE owner_id = $1 AND $1 != '') FROM sandboxes WHERE state != 'destroyed'",
        )
        .bind(&r.owner_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
        crate::rows::admit(total, owned, r, max_total, max_per_owner)?;
        insert_sandbox_in(&mut tx, r).await?;
        tx.commit().await.map_err(db_err)
    }

    async fn set_sandbox_runtime(
        &self,
        id: &str,
        state: &str,
        vm_id: &str,
        fence: Option<&Fence>,
    ) -> Result<()> {
        let sql = format!(
            "UPDATE sandboxes SET state = $1, vm_id = $2, updated_at = $3 WHERE id = $4{}",
            fence.map_or(String::new(), |_| rows::fence_clause(Some(5)))
        );
        let q = sqlx::query(&sql)
            .bind(state)
            .bind(vm_id)
            .bind(Utc::now())
            .bind(id);
        let r = bind_fence(q, fence)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        rows::updated(self, r.rows_affected(), id, fence, false).await
    }

    async fn get_sandbox(&self, id: &str) -> Result<SandboxRecord> {
        let row = sqlx::query("SELECT * FROM sandboxes WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("sandbox {id:?}")))?;
        rows::sandbox(&row)
    }

    async fn list_active_sandboxes(&self) -> Result<Vec<SandboxRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM sandboxes WHERE state != 'destroyed' ORDER BY created_at DESC, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::sandbox).collect()
    }

    async fn set_sandbox_state(&self, id: &str, state: &str, fence: Option<&Fence>) -> Result<()> {
        let sql = format!(
            "UPDATE sandboxes SET state = $1, updated_at = $2 WHERE id = $3{}",
            fence.map_or(String::new(), |_| rows::fence_clause(Some(4)))
        );
        let q = sqlx::query(&sql).bind(state).bind(Utc::now()).bind(id);
        let r = bind_fence(q, fence)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        rows::updated(self, r.rows_affected(), id, fence, false).await
    }

    async fn set_sandbox_expiry(
        &self,
        id: &str,
        expires_at: DateTime<Utc>,
        fence: Option<&Fence>,
    ) -> Result<()> {
        let sql = format!(
            "UPDATE sandboxes SET expires_at = $1, updated_at = $2 WHERE id = $3 AND state != 'destroyed'{}",
            fence.map_or(String::new(), |_| rows::fence_clause(Some(4)))
        );
        let q = sqlx::query(&sql).bind(expires_at).bind(Utc::now()).bind(id);
        let r = bind_fence(q, fence)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        rows::updated(self, r.rows_affected(), id, fence, true).await
    }

    async fn reassign_sandbox(&self, r: &SandboxRecord, fence: Option<&Fence>) -> Result<()> {
        let sql = format!(
            "UPDATE sandboxes SET owner_id = $1, tenant_id = $2, metadata = $3, expires_at = $4, idle_timeout_secs = $5, \
             on_timeout = $6, idle_deadline = $7, updated_at = $8 WHERE id = $9 AND state != 'destroyed'{}",
            fence.map_or(String::new(), |_| rows::fence_clause(Some(10)))
        );
        let q = sqlx::query(&sql)
            .bind(&r.owner_id)
            .bind(&r.tenant_id)
            .bind(to_json(&r.metadata))
            .bind(r.expires_at)
            .bind(r.idle_timeout_secs)
            .bind(&r.on_timeout)
            .bind(r.idle_deadline)
            .bind(Utc::now())
            .bind(&r.id);
        let res = bind_fence(q, fence)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        rows::updated(self, res.rows_affected(), &r.id, fence, true).await
    }

    async fn set_sandbox_metadata(
        &self,
        id: &str,
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let res = sqlx::query(
            "UPDATE sandboxes SET metadata = $1 WHERE id = $2 AND state != 'destroyed'",
        )
        .bind(to_json(metadata))
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        rows::updated(self, res.rows_affected(), id, None, true).await
    }

    async fn list_expired_sandboxes(&self, now: DateTime<Utc>) -> Result<Vec<SandboxRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM sandboxes WHERE state != 'destroyed' AND expires_at < $1 ORDER BY expires_at",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::sandbox).collect()
    }

    async fn list_idle_sandboxes(&self, now: DateTime<Utc>) -> Result<Vec<SandboxRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM sandboxes WHERE idle_timeout_secs > 0 AND state = 'running' AND idle_deadline < $1 ORDER BY idle_deadline",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::sandbox).collect()
    }

    async fn set_idle_deadlines(&self, deadlines: &[(String, DateTime<Utc>)]) -> Result<()> {
        if deadlines.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = deadlines.iter().map(|(id, _)| id.as_str()).collect();
        let ats: Vec<DateTime<Utc>> = deadlines.iter().map(|(_, at)| *at).collect();
        sqlx::query(
            "UPDATE sandboxes AS s SET idle_deadline = d.at \
             FROM UNNEST($1::text[], $2::timestamptz[]) AS d(id, at) \
             WHERE s.id = d.id AND s.idle_deadline < d.at AND s.state != 'destroyed'",
        )
        .bind(&ids)
        .bind(&ats)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn insert_exec_log(&self, r: &ExecLogRecord) -> Result<()> {
        sqlx::query("INSERT INTO exec_logs (sandbox_id, command, exit_code, stdout, stderr, duration, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(&r.sandbox_id)
            .bind(&r.command)
            .bind(i64::from(r.exit_code))
            .bind(&r.stdout)
            .bind(&r.stderr)
            .bind(&r.duration)
            .bind(r.created_at)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn list_exec_logs(&self, sandbox_id: &str, limit: i64) -> Result<Vec<ExecLogRecord>> {
        let rows =
            sqlx::query("SELECT * FROM exec_logs WHERE sandbox_id = $1 ORDER BY id DESC LIMIT $2")
                .bind(sandbox_id)
                .bind(limit.clamp(1, 1000))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
        rows.iter().map(rows::exec_log).collect()
    }

    async fn prune_exec_logs(&self, before: DateTime<Utc>) -> Result<u64> {
        let r = sqlx::query("DELETE FROM exec_logs WHERE created_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(r.rows_affected())
    }

    async fn prune_destroyed_sandboxes(&self, before: DateTime<Utc>) -> Result<u64> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        sqlx::query(
            "DELETE FROM exec_logs WHERE sandbox_id IN \
             (SELECT id FROM sandboxes WHERE state = 'destroyed' AND updated_at < $1)",
        )
        .bind(before)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let r = sqlx::query("DELETE FROM sandboxes WHERE state = 'destroyed' AND updated_at < $1")
            .bind(before)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(r.rows_affected())
    }

    async fn create_template(&self, t: &TemplateRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO templates (name, version, image, description, setup, allowed_hosts, memory_mb, cpu_cores, ttl_seconds, env, secrets, pool_size, provider, metadata, created_at, updated_at, files) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
        )
        .bind(&t.name)
        .bind(t.version)
        .bind(&t.image)
        .bind(&t.description)
        .bind(to_json(&t.setup))
        .bind(to_json(&t.allowed_hosts))
        .bind(t.memory_mb)
        .bind(t.cpu_cores)
        .bind(t.ttl_seconds)
        .bind(to_json(&t.env))
        .bind(to_json(&t.secrets))
        .bind(t.pool_size)
        .bind(&t.provider)
        .bind(to_json(&t.metadata))
        .bind(t.created_at)
        .bind(t.updated_at)
        .bind(to_json(&t.files))
        .execute(&self.pool)
        .await
        .map_err(|e| conflict_as(e, || "template already exists".into()))?;
        Ok(())
    }

    async fn get_template(&self, name: &str) -> Result<TemplateRecord> {
        let row = sqlx::query("SELECT * FROM templates WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("template {name:?}")))?;
        rows::template(&row)
    }

    async fn list_templates(&self) -> Result<Vec<TemplateRecord>> {
        let rows = sqlx::query("SELECT * FROM templates ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(rows::template).collect()
    }

    async fn update_template(&self, t: &TemplateRecord) -> Result<TemplateRecord> {
        let row = sqlx::query(
            "UPDATE templates SET version = $1, image = $2, description = $3, setup = $4, allowed_hosts = $5, memory_mb = $6, cpu_cores = $7, \
             ttl_seconds = $8, env = $9, secrets = $10, pool_size = $11, provider = $12, metadata = $13, updated_at = $14, files = $16 WHERE name = $15 RETURNING *",
        )
        .bind(t.version)
        .bind(&t.image)
        .bind(&t.description)
        .bind(to_json(&t.setup))
        .bind(to_json(&t.allowed_hosts))
        .bind(t.memory_mb)
        .bind(t.cpu_cores)
        .bind(t.ttl_seconds)
        .bind(to_json(&t.env))
        .bind(to_json(&t.secrets))
        .bind(t.pool_size)
        .bind(&t.provider)
        .bind(to_json(&t.metadata))
        .bind(t.updated_at)
        .bind(&t.name)
        .bind(to_json(&t.files))
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?
        .ok_or_else(|| Error::not_found(format!("template {:?}", t.name)))?;
        rows::template(&row)
    }

    async fn delete_template(&self, name: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM templates WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("template {name:?}"))
    }

    async fn upsert_quota(&self, q: &QuotaRecord) -> Result<QuotaRecord> {
        let row = sqlx::query(
            "INSERT INTO owner_quotas (owner_id, max_sandboxes, max_ttl_seconds, max_exec_timeout_seconds, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT(owner_id) DO UPDATE SET max_sandboxes = excluded.max_sandboxes, max_ttl_seconds = excluded.max_ttl_seconds, \
             max_exec_timeout_seconds = excluded.max_exec_timeout_seconds, updated_at = excluded.updated_at RETURNING *",
        )
        .bind(&q.owner_id)
        .bind(q.max_sandboxes)
        .bind(q.max_ttl_seconds)
        .bind(q.max_exec_timeout_seconds)
        .bind(q.created_at)
        .bind(q.updated_at)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        rows::quota(&row)
    }

    async fn get_quota(&self, owner_id: &str) -> Result<QuotaRecord> {
        let row = sqlx::query("SELECT * FROM owner_quotas WHERE owner_id = $1")
            .bind(owner_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("owner_quota {owner_id:?}")))?;
        rows::quota(&row)
    }

    async fn list_quotas(&self) -> Result<Vec<QuotaRecord>> {
        let rows = sqlx::query("SELECT * FROM owner_quotas ORDER BY owner_id")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(rows::quota).collect()
    }

    async fn delete_quota(&self, owner_id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM owner_quotas WHERE owner_id = $1")
            .bind(owner_id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("owner_quota {owner_id:?}"))
    }

    async fn insert_op_audit(&self, r: &OpAuditRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO operation_audit_logs (actor, action, sandbox_id, resource, provider, status, detail, tenant_id, request_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&r.actor)
        .bind(&r.action)
        .bind(&r.sandbox_id)
        .bind(&r.resource)
        .bind(&r.provider)
        .bind(&r.status)
        .bind(&r.detail)
        .bind(&r.tenant_id)
        .bind(&r.request_id)
        .bind(r.created_at)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn list_op_audit(&self, f: &OpAuditFilter) -> Result<Vec<OpAuditRecord>> {
        let limit = if f.limit <= 0 { 100 } else { f.limit.min(500) };
        let rows = sqlx::query(
            "SELECT * FROM operation_audit_logs WHERE ($1 = '' OR actor = $1) AND ($2 = '' OR action = $2) AND ($3 = '' OR sandbox_id = $3) \
             AND ($4 = '' OR tenant_id = $4) AND ($5::timestamptz IS NULL OR created_at >= $5) ORDER BY created_at DESC, id DESC LIMIT $6",
        )
        .bind(&f.actor)
        .bind(&f.action)
        .bind(&f.sandbox_id)
        .bind(&f.tenant_id)
        .bind(f.since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::op_audit).collect()
    }

    async fn insert_admin_audit(&self, r: &AdminAuditRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO admin_audit_logs (actor, method, path, status, duration_ms, request_id, remote_addr, user_agent, tenant_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&r.actor)
        .bind(&r.method)
        .bind(&r.path)
        .bind(r.status)
        .bind(r.duration_ms)
        .bind(&r.request_id)
        .bind(&r.remote_addr)
        .bind(&r.user_agent)
        .bind(&r.tenant_id)
        .bind(r.created_at)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn list_admin_audit(&self, f: &AdminAuditFilter) -> Result<Vec<AdminAuditRecord>> {
        let limit = if f.limit <= 0 { 100 } else { f.limit.min(500) };
        let rows = sqlx::query(
            "SELECT * FROM admin_audit_logs WHERE ($1 = '' OR actor = $1) AND ($2 = '' OR method = $2) \
             AND ($3 = '' OR tenant_id = $3) AND ($4::timestamptz IS NULL OR created_at >= $4) ORDER BY created_at DESC, id DESC LIMIT $5",
        )
        .bind(&f.actor)
        .bind(&f.method)
        .bind(&f.tenant_id)
        .bind(f.since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::admin_audit).collect()
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64> {
        let a = sqlx::query("DELETE FROM admin_audit_logs WHERE created_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        let o = sqlx::query("DELETE FROM operation_audit_logs WHERE created_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(a.rows_affected() + o.rows_affected())
    }

    async fn upsert_tenant_member(&self, m: &TenantMemberRecord) -> Result<TenantMemberRecord> {
        let row = sqlx::query(
            "INSERT INTO tenant_members (tenant_id, user_id, role, created_at, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT(tenant_id, user_id) DO UPDATE SET role = excluded.role, updated_at = excluded.updated_at RETURNING *",
        )
        .bind(&m.tenant_id)
        .bind(&m.user_id)
        .bind(&m.role)
        .bind(m.created_at)
        .bind(m.updated_at)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        rows::member(&row)
    }

    async fn get_tenant_member(
        &self,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<TenantMemberRecord> {
        let row = sqlx::query("SELECT * FROM tenant_members WHERE tenant_id = $1 AND user_id = $2")
            .bind(tenant_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| {
                Error::not_found(format!("tenant member {user_id:?} of {tenant_id:?}"))
            })?;
        rows::member(&row)
    }

    async fn list_tenant_members(&self, tenant_id: &str) -> Result<Vec<TenantMemberRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM tenant_members WHERE tenant_id = $1 ORDER BY created_at ASC, user_id ASC",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::member).collect()
    }

    async fn delete_tenant_member(&self, tenant_id: &str, user_id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM tenant_members WHERE tenant_id = $1 AND user_id = $2")
            .bind(tenant_id)
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("member {user_id:?}"))
    }

    async fn create_tenant(&self, t: &TenantRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO tenants (id, name, owner_id, settings, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.owner_id)
        .bind(&t.settings)
        .bind(t.created_at)
        .bind(t.updated_at)
        .execute(&self.pool)
        .await
        .map_err(|e| conflict_as(e, || format!("tenant {:?} already exists", t.id)))?;
        Ok(())
    }

    async fn get_tenant(&self, id: &str) -> Result<TenantRecord> {
        let row = sqlx::query("SELECT * FROM tenants WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("tenant {id:?}")))?;
        rows::tenant(&row)
    }

    async fn list_tenants(&self) -> Result<Vec<TenantRecord>> {
        let rows = sqlx::query("SELECT * FROM tenants ORDER BY created_at DESC, id ASC")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(rows::tenant).collect()
    }

    async fn update_tenant(&self, t: &TenantRecord) -> Result<()> {
        let r = sqlx::query(
            "UPDATE tenants SET name = $1, owner_id = $2, settings = $3, updated_at = $4 WHERE id = $5",
        )
        .bind(&t.name)
        .bind(&t.owner_id)
        .bind(&t.settings)
        .bind(t.updated_at)
        .bind(&t.id)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("tenant {:?}", t.id))
    }

    async fn delete_tenant(&self, id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let r = sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if r.rows_affected() == 0 {
            return Err(Error::not_found(format!("tenant {id:?}")));
        }
        for sql in [
            "DELETE FROM tenant_members WHERE tenant_id = $1",
            "DELETE FROM policies WHERE tenant_id = $1",
        ] {
            sqlx::query(sql)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    async fn create_policy(&self, p: &PolicyRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO policies (id, tenant_id, resource_type, effect, pattern, priority, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&p.id)
        .bind(&p.tenant_id)
        .bind(&p.resource_type)
        .bind(&p.effect)
        .bind(&p.pattern)
        .bind(p.priority)
        .bind(p.created_at)
        .bind(p.updated_at)
        .execute(&self.pool)
        .await
        .map_err(|e| conflict_as(e, || format!("policy {:?} already exists", p.id)))?;
        Ok(())
    }

    async fn list_policies(&self, tenant_id: Option<&str>) -> Result<Vec<PolicyRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM policies WHERE tenant_id = '' OR ($1::text IS NOT NULL AND tenant_id = $1) \
             ORDER BY priority ASC, created_at ASC, id ASC",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::policy).collect()
    }

    async fn delete_policy(&self, tenant_id: &str, id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM policies WHERE id = $1 AND tenant_id = $2")
            .bind(id)
            .bind(tenant_id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("policy {id:?}"))
    }

    async fn put_port(&self, r: &PortRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO sandbox_ports (sandbox_id, port, mode, created_by, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sandbox_id, port) DO UPDATE SET mode = excluded.mode, created_by = excluded.created_by",
        )
        .bind(&r.sandbox_id)
        .bind(i64::from(r.port))
        .bind(&r.mode)
        .bind(&r.created_by)
        .bind(r.created_at)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn get_port(&self, sandbox_id: &str, port: u16) -> Result<PortRecord> {
        let row = sqlx::query("SELECT * FROM sandbox_ports WHERE sandbox_id = $1 AND port = $2")
            .bind(sandbox_id)
            .bind(i64::from(port))
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| {
                Error::not_found(format!(
                    "port {port} of sandbox {sandbox_id} is not exposed"
                ))
            })?;
        rows::port(&row)
    }

    async fn list_ports(&self, sandbox_id: &str) -> Result<Vec<PortRecord>> {
        let rows =
            sqlx::query("SELECT * FROM sandbox_ports WHERE sandbox_id = $1 ORDER BY port ASC")
                .bind(sandbox_id)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
        rows.iter().map(rows::port).collect()
    }

    async fn delete_port(&self, sandbox_id: &str, port: u16) -> Result<()> {
        sqlx::query("DELETE FROM preview_tokens WHERE sandbox_id = $1 AND port = $2")
            .bind(sandbox_id)
            .bind(i64::from(port))
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        let r = sqlx::query("DELETE FROM sandbox_ports WHERE sandbox_id = $1 AND port = $2")
            .bind(sandbox_id)
            .bind(i64::from(port))
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        not_found_if_zero(
            r.rows_affected(),
            format!("port {port} of sandbox {sandbox_id} (not exposed)"),
        )
    }

    async fn delete_sandbox_ports(&self, sandbox_id: &str) -> Result<u64> {
        sqlx::query("DELETE FROM preview_tokens WHERE sandbox_id = $1")
            .bind(sandbox_id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        let r = sqlx::query("DELETE FROM sandbox_ports WHERE sandbox_id = $1")
            .bind(sandbox_id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(r.rows_affected())
    }

    async fn insert_preview_token(&self, r: &PreviewTokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO preview_tokens (id, sandbox_id, port, hash, created_by, created_at, expires_at, revoked) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&r.id)
        .bind(&r.sandbox_id)
        .bind(i64::from(r.port))
        .bind(&r.hash)
        .bind(&r.created_by)
        .bind(r.created_at)
        .bind(r.expires_at)
        .bind(i64::from(r.revoked))
        .execute(&self.pool)
        .await
        .map_err(|e| conflict_as(e, || "preview token id or secret already exists".to_string()))?;
        Ok(())
    }

    async fn find_preview_token(&self, hash: &str) -> Result<PreviewTokenRecord> {
        let row = sqlx::query("SELECT * FROM preview_tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found("preview token"))?;
        rows::preview_token(&row)
    }

    async fn list_preview_tokens(
        &self,
        sandbox_id: &str,
        port: u16,
    ) -> Result<Vec<PreviewTokenRecord>> {
        let rows = sqlx::query("SELECT * FROM preview_tokens WHERE sandbox_id = $1 AND port = $2 ORDER BY created_at ASC, id ASC")
            .bind(sandbox_id)
            .bind(i64::from(port))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(rows::preview_token).collect()
    }

    async fn revoke_preview_token(&self, sandbox_id: &str, id: &str) -> Result<()> {
        let r =
            sqlx::query("UPDATE preview_tokens SET revoked = 1 WHERE sandbox_id = $1 AND id = $2")
                .bind(sandbox_id)
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("preview token {id:?}"))
    }

    async fn insert_snapshot(&self, r: &SnapshotRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO snapshots (id, provider, source_sandbox_id, image, memory_mb, vcpus, network_mode, size_bytes, owner_id, tenant_id, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&r.id)
        .bind(&r.provider)
        .bind(&r.source_sandbox_id)
        .bind(&r.image)
        .bind(r.memory_mb)
        .bind(r.vcpus)
        .bind(&r.network_mode)
        .bind(i64::try_from(r.size_bytes).unwrap_or(i64::MAX))
        .bind(&r.owner_id)
        .bind(&r.tenant_id)
        .bind(r.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| conflict_as(e, || format!("snapshot {:?} already exists", r.id)))?;
        Ok(())
    }

    async fn get_snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        let row = sqlx::query("SELECT * FROM snapshots WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("snapshot {id:?}")))?;
        rows::snapshot(&row)
    }

    async fn list_snapshots(&self, tenant_id: Option<&str>) -> Result<Vec<SnapshotRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM snapshots WHERE $1::text IS NULL OR tenant_id = $1 ORDER BY created_at ASC, id ASC",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::snapshot).collect()
    }

    async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM snapshots WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("snapshot {id:?}"))
    }

    async fn insert_volume(&self, r: &VolumeRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO volumes (id, name, size_mb, owner_id, tenant_id, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&r.id)
        .bind(&r.name)
        .bind(r.size_mb)
        .bind(&r.owner_id)
        .bind(&r.tenant_id)
        .bind(r.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            conflict_as(e, || {
                format!("a volume named {:?} already exists in this tenant", r.name)
            })
        })?;
        Ok(())
    }

    async fn get_volume(&self, id: &str) -> Result<VolumeRecord> {
        let row = sqlx::query("SELECT * FROM volumes WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("volume {id:?}")))?;
        rows::volume(&row)
    }

    async fn list_volumes(&self, tenant_id: Option<&str>) -> Result<Vec<VolumeRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM volumes WHERE $1::text IS NULL OR tenant_id = $1 ORDER BY created_at ASC, id ASC",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::volume).collect()
    }

    async fn delete_volume(&self, id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM volumes WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("volume {id:?}"))
    }

    async fn insert_environment_spec(&self, r: &EnvironmentSpecRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO environment_specs (id, owner_id, tenant_id, name, base_image, python_packages, apt_packages, python_version, dockerfile, context_sha256, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&r.id)
        .bind(&r.owner_id)
        .bind(&r.tenant_id)
        .bind(&r.name)
        .bind(&r.base_image)
        .bind(to_json(&r.python_packages))
        .bind(to_json(&r.apt_packages))
        .bind(&r.python_version)
        .bind(&r.dockerfile)
        .bind(&r.context_sha256)
        .bind(r.created_at)
        .bind(r.updated_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            conflict_as(e, || {
                format!(
                    "an environment spec named {:?} already exists for {:?}",
                    r.name, r.owner_id
                )
            })
        })?;
        Ok(())
    }

    async fn get_environment_spec(&self, id: &str) -> Result<EnvironmentSpecRecord> {
        let row = sqlx::query("SELECT * FROM environment_specs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("environment spec {id:?}")))?;
        rows::environment_spec(&row)
    }

    async fn list_environment_specs(
        &self,
        tenant_id: Option<&str>,
    ) -> Result<Vec<EnvironmentSpecRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM environment_specs WHERE $1::text IS NULL OR tenant_id = $1 ORDER BY created_at DESC, id DESC",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::environment_spec).collect()
    }

    async fn insert_build(&self, r: &BuildRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO environment_builds (id, spec_id, owner_id, tenant_id, provider, builder, status, current_step, log_blob, image_size_bytes, digest_local, error, artifacts, created_at, finished_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
        .bind(&r.id)
        .bind(&r.spec_id)
        .bind(&r.owner_id)
        .bind(&r.tenant_id)
        .bind(&r.provider)
        .bind(&r.builder)
        .bind(&r.status)
        .bind(&r.current_step)
        .bind(&r.log)
        .bind(i64::try_from(r.image_size_bytes).unwrap_or(i64::MAX))
        .bind(&r.digest_local)
        .bind(&r.error)
        .bind(to_json(&r.artifacts))
        .bind(r.created_at)
        .bind(r.finished_at)
        .bind(r.updated_at)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn get_build(&self, id: &str) -> Result<BuildRecord> {
        let row = sqlx::query("SELECT * FROM environment_builds WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("build {id:?}")))?;
        rows::build(&row)
    }

    async fn update_build(&self, r: &BuildRecord) -> Result<()> {
        let res = sqlx::query(
            "UPDATE environment_builds SET status = $1, current_step = $2, log_blob = $3, image_size_bytes = $4, digest_local = $5, error = $6, artifacts = $7, finished_at = $8, updated_at = $9 WHERE id = $10",
        )
        .bind(&r.status)
        .bind(&r.current_step)
        .bind(&r.log)
        .bind(i64::try_from(r.image_size_bytes).unwrap_or(i64::MAX))
        .bind(&r.digest_local)
        .bind(&r.error)
        .bind(to_json(&r.artifacts))
        .bind(r.finished_at)
        .bind(r.updated_at)
        .bind(&r.id)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        not_found_if_zero(res.rows_affected(), format!("build {:?}", r.id))
    }

    async fn list_builds(&self, tenant_id: Option<&str>, limit: usize) -> Result<Vec<BuildRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = sqlx::query("SELECT * FROM environment_builds WHERE $1::text IS NULL OR tenant_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2")
            .bind(tenant_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(rows::build).collect()
    }

    async fn save_build_log(&self, id: &str, log: &str, now: DateTime<Utc>) -> Result<String> {
        sqlx::query(
            "UPDATE environment_builds SET log_blob = $1, updated_at = $2 WHERE id = $3 AND status = 'building'",
        )
        .bind(log)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM environment_builds WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_err)?;
        status.ok_or_else(|| Error::not_found(format!("build {id:?}")))
    }

    async fn claim_build(&self, id: &str, builder: &str, now: DateTime<Utc>) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE environment_builds SET status = 'building', builder = $1, updated_at = $2 WHERE id = $3 AND status = 'queued'",
        )
        .bind(builder)
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(r.rows_affected() == 1)
    }

    async fn unfinished_builds(&self) -> Result<Vec<BuildRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM environment_builds WHERE status IN ('queued', 'building') ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::build).collect()
    }

    async fn set_environment_spec_context(&self, id: &str, sha256: &str) -> Result<()> {
        let r = sqlx::query("UPDATE environment_specs SET context_sha256 = $1 WHERE id = $2")
            .bind(sha256)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("environment spec {id:?}"))
    }

    async fn delete_environment_spec(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM environment_builds WHERE spec_id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        let r = sqlx::query("DELETE FROM environment_specs WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("environment spec {id:?}"))
    }

    async fn insert_registry_connection(&self, r: &RegistryConnectionRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO registry_connections (id, owner_id, tenant_id, provider, host, username, secret_ref, is_default, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&r.id)
        .bind(&r.owner_id)
        .bind(&r.tenant_id)
        .bind(&r.provider)
        .bind(&r.host)
        .bind(&r.username)
        .bind(&r.secret_ref)
        .bind(r.is_default)
        .bind(r.created_at)
        .bind(r.updated_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            conflict_as(e, || {
                format!(
                    "a {} connection for {:?} already exists",
                    r.provider, r.username
                )
            })
        })?;
        Ok(())
    }

    async fn list_registry_connections(
        &self,
        tenant_id: Option<&str>,
    ) -> Result<Vec<RegistryConnectionRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM registry_connections WHERE $1::text IS NULL OR tenant_id = $1 ORDER BY created_at DESC, id DESC",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::registry_connection).collect()
    }

    async fn delete_registry_connection(&self, id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM registry_connections WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("registry connection {id:?}"))
    }

    async fn upsert_worker(&self, w: &WorkerRecord) -> Result<WorkerRecord> {
        let row = sqlx::query(
            "INSERT INTO workers (id, hostname, status, providers, capabilities, capacity, last_heartbeat, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT(id) DO UPDATE SET hostname = excluded.hostname, status = excluded.status, providers = excluded.providers, \
             capabilities = excluded.capabilities, capacity = excluded.capacity, last_heartbeat = excluded.last_heartbeat, updated_at = excluded.updated_at \
             RETURNING *",
        )
        .bind(&w.id)
        .bind(&w.hostname)
        .bind(&w.status)
        .bind(to_json(&w.providers))
        .bind(to_json(&w.capabilities))
        .bind(to_json(&w.capacity))
        .bind(w.last_heartbeat)
        .bind(w.created_at)
        .bind(w.updated_at)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        rows::worker(&row)
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query("SELECT * FROM workers ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(rows::worker).collect()
    }

    async fn get_worker(&self, id: &str) -> Result<WorkerRecord> {
        let row = sqlx::query("SELECT * FROM workers WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("worker {id:?}")))?;
        rows::worker(&row)
    }

    async fn delete_worker(&self, id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM workers WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("worker {id:?}"))
    }

    async fn acquire_lease(
        &self,
        resource_id: &str,
        resource_type: &str,
        holder_id: &str,
        ttl: Duration,
    ) -> Result<LeaseRecord> {
        if resource_id.is_empty() || holder_id.is_empty() || ttl.is_zero() {
            return Err(Error::conflict(
                "lease needs a resource, a holder and a positive ttl",
            ));
        }
        // One statement: a fresh row, or the expired (or own) row taken
        // over. Concurrent acquirers serialise on the primary key; the
        // loser's update finds a live row held by another and returns none.
        let row = sqlx::query(
            "INSERT INTO leases (resource_id, resource_type, holder_id, generation, expires_at, created_at, updated_at) \
             VALUES ($1, $2, $3, 1, clock_timestamp() + make_interval(secs => $4), clock_timestamp(), clock_timestamp()) \
             ON CONFLICT(resource_id) DO UPDATE SET holder_id = excluded.holder_id, resource_type = excluded.resource_type, \
             generation = leases.generation + 1, expires_at = excluded.expires_at, updated_at = excluded.updated_at \
             WHERE leases.expires_at <= clock_timestamp() OR leases.holder_id = excluded.holder_id \
             RETURNING *",
        )
        .bind(resource_id)
        .bind(resource_type)
        .bind(holder_id)
        .bind(secs(ttl))
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        match row {
            Some(row) => rows::lease(&row),
            None => Err(Error::conflict("lease is held by another worker")),
        }
    }

    async fn renew_lease(
        &self,
        resource_id: &str,
        holder_id: &str,
        ttl: Duration,
    ) -> Result<LeaseRecord> {
        if ttl.is_zero() {
            return Err(Error::conflict("lease ttl must be positive"));
        }
        let row = sqlx::query(
            "UPDATE leases SET generation = generation + 1, expires_at = clock_timestamp() + make_interval(secs => $1), updated_at = clock_timestamp() \
             WHERE resource_id = $2 AND holder_id = $3 AND expires_at > clock_timestamp() RETURNING *",
        )
        .bind(secs(ttl))
        .bind(resource_id)
        .bind(holder_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        match row {
            Some(row) => rows::lease(&row),
            None => Err(Error::conflict(
                "lease is not held by worker or has expired",
            )),
        }
    }

    async fn release_lease(&self, resource_id: &str, holder_id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM leases WHERE resource_id = $1 AND holder_id = $2")
            .bind(resource_id)
            .bind(holder_id)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("lease {resource_id:?}"))
    }

    async fn transfer_lease(
        &self,
        resource_id: &str,
        from: &Fence,
        to: &str,
        ttl: Duration,
    ) -> Result<LeaseRecord> {
        if ttl.is_zero() || to.is_empty() {
            return Err(Error::invalid(
                "a lease transfer needs a holder and a positive ttl",
            ));
        }
        let r = sqlx::query(
            "UPDATE leases SET holder_id = $1, generation = generation + 1, \
             expires_at = clock_timestamp() + make_interval(secs => $2), updated_at = clock_timestamp() \
             WHERE resource_id = $3 AND holder_id = $4 AND generation = $5",
        )
            .bind(to)
            .bind(secs(ttl))
            .bind(resource_id)
            .bind(&from.holder_id)
            .bind(from.generation)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        if r.rows_affected() == 0 {
            return Err(Error::conflict(format!(
                "lease {resource_id:?} is no longer {from}"
            )));
        }
        self.get_lease(resource_id).await
    }

    async fn set_sandbox_worker(
        &self,
        id: &str,
        worker_id: &str,
        vm_id: &str,
        state: &str,
        fence: &Fence,
    ) -> Result<()> {
        let sql = format!("UPDATE sandboxes SET worker_id = $1, vm_id = $2, state = $3, updated_at = $4 WHERE id = $5{}", rows::fence_clause(Some(6)));
        let q = sqlx::query(&sql)
            .bind(worker_id)
            .bind(vm_id)
            .bind(state)
            .bind(Utc::now())
            .bind(id);
        let r = bind_fence(q, Some(fence))
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        rows::updated(self, r.rows_affected(), id, Some(fence), false).await
    }

    async fn get_lease(&self, resource_id: &str) -> Result<LeaseRecord> {
        let row = sqlx::query("SELECT * FROM leases WHERE resource_id = $1")
            .bind(resource_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("lease {resource_id:?}")))?;
        rows::lease(&row)
    }

    async fn list_leases(&self) -> Result<Vec<LeaseRecord>> {
        let rows = sqlx::query("SELECT * FROM leases ORDER BY resource_id")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(rows::lease).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testpg;

    crate::store_contract_tests!(postgres, async {
        PostgresStore::connect(&testpg::fresh_database().await)
            .await
            .expect("connect")
    });

    /// Separate pools (as separate control planes would be) race for the
    /// same leases: one winner per resource.
    #[tokio::test]
    async fn lease_race_across_pools() {
        let dsn = testpg::fresh_database().await;
        let mut stores = Vec::new();
        for _ in 0..6 {
            stores.push(PostgresStore::connect(&dsn).await.expect("connect"));
        }
        let ttl = Duration::from_secs(30);
        for round in 0..10 {
            let id = format!("sb-{round:08}");
            let results = futures::future::join_all(stores.iter().enumerate().map(|(i, s)| {
                let id = id.clone();
                async move {
                    s.acquire_lease(&id, "sandbox", &format!("cp-{i}"), ttl)
                        .await
                }
            }))
            .await;
            let won = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(won, 1, "round {round}: {results:?}");
        }
    }

    /// Control planes starting together on a fresh database migrate it once.
    #[tokio::test]
    async fn concurrent_first_opens_migrate_once() {
        let dsn = testpg::fresh_database().await;
        let opens = futures::future::join_all((0..4).map(|_| PostgresStore::connect(&dsn))).await;
        let stores: Vec<_> = opens.into_iter().map(|r| r.expect("open")).collect();
        let versions = stores[0].applied_migrations().await.expect("versions");
        let expected: Vec<i64> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, expected);
    }

    #[test]
    fn with_database_replaces_only_the_database() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5/postgres", "t1"),
            "postgres://u:p@127.0.0.1:5/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h:5/postgres?sslmode=disable", "t1"),
            "postgres://u:p@h:5/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:5", "t1"), "postgres://h:5/t1");
        assert_eq!(
            with_database("host=h dbname=a password=x", "t1"),
            "host=h dbname=a password=x dbname=t1"
        );
    }

    #[tokio::test]
    async fn a_bad_dsn_names_no_secret() {
        let e = parse_dsn("postgres://user:hunter2@[::1:5432/db").expect_err("bad dsn");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = PostgresStore::connect("postgres://user:hunter2@127.0.0.1:1/db")
            .await
            .expect_err("nothing listens on port 1");
        assert_eq!(e.kind(), ErrorKind::StoreUnavailable, "{e}");
        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
    }
}
