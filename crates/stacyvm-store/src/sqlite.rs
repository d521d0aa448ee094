//! SQLite engine.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use stacyvm_core::store::{
    AdminAuditFilter, AdminAuditRecord, BuildRecord, EnvironmentSpecRecord, ExecLogRecord, Fence,
    LeaseRecord, OpAuditFilter, OpAuditRecord, PolicyRecord, PortRecord, PreviewTokenRecord,
    QuotaRecord, RegistryConnectionRecord, SandboxRecord, SnapshotRecord, Store, TemplateRecord,
    TenantMemberRecord, TenantRecord, VolumeRecord, WorkerRecord,
};
use stacyvm_core::{Error, ErrorKind, Result};

use crate::codec::{db_err, parse_ts, to_json, ts};
use crate::rows::{self, Cols};

pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_initial.sql")),
    (
        2,
        include_str!("../migrations/sqlite/0002_retention_indexes.sql"),
    ),
    (3, include_str!("../migrations/sqlite/0003_snapshots.sql")),
    (4, include_str!("../migrations/sqlite/0004_preview.sql")),
    (5, include_str!("../migrations/sqlite/0005_lifecycle.sql")),
    (6, include_str!("../migrations/sqlite/0006_volumes.sql")),
    (
        7,
        include_str!("../migrations/sqlite/0007_registry_tenancy.sql"),
    ),
    (8, include_str!("../migrations/sqlite/0008_builds.sql")),
];

/// The SQLite store.
///
/// Reads share a small pool; writes go through one connection of their
/// own. SQLite admits one writer at a time, and a second connection that
/// finds the write lock taken sleeps in SQLite's busy handler (1 ms at
/// least); queued in-process behind one connection, concurrent writes wait
/// only for each other. WAL readers never wait for the writer.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies migrations.
    pub async fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Error::internal(format!("creating database directory {}", dir.display()))
                        .with_source(e)
                })?;
            }
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        // Switch the file to WAL on one connection first: switching needs an
        // exclusive lock, and pool connections opening in parallel would
        // otherwise race for it ("database is locked").
        {
            use sqlx::ConnectOptions;
            let mut first = opts
                .clone()
                .connect()
                .await
                .map_err(|e| Error::internal("opening sqlite database").with_source(e))?;
            sqlx::query("SELECT 1")
                .execute(&mut first)
                .await
                .map_err(db_err)?;
            use sqlx::Connection;
            let _ = first.close().await;
        }
        Self::with_options(opts, 4).await
    }

    /// A private in-memory database (tests).
    pub async fn in_memory() -> Result<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(db_err)?
            .foreign_keys(true);
        // One connection: every in-memory connection is its own database.
        Self::with_options(opts, 1).await
    }

    async fn with_options(opts: SqliteConnectOptions, max: u32) -> Result<Self> {
        let open = |n: u32| {
            SqlitePoolOptions::new()
                .max_connections(n)
                .min_connections(1)
                // A local file connection does not go stale; the default
                // ping before every query is one more round trip to the
                // connection's thread (the dearest part of a query here).
                .test_before_acquire(false)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(opts.clone())
        };
        let pool = open(max)
            .await
            .map_err(|e| Error::internal("opening sqlite database").with_source(e))?;
        // An in-memory database is one connection: it is also the writer.
        let writer = if max > 1 {
            open(1)
                .await
                .map_err(|e| Error::internal("opening sqlite database").with_source(e))?
        } else {
            pool.clone()
        };
        let store = SqliteStore { pool, writer };
        store.migrate().await?;
        Ok(store)
    }

    /// The underlying pool (backup tooling).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn migrate(&self) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
        )
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        for (version, sql) in MIGRATIONS {
            let mut tx = self.writer.begin().await.map_err(db_err)?;
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = ?")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_err)?;
            if done.is_some() {
                continue;
            }
            sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(|e| {
                Error::internal(format!("applying migration {version}")).with_source(e)
            })?;
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)")
                .bind(version)
                .bind(ts(Utc::now()))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)?;
            tracing::info!(version, "applied database migration");
        }
        Ok(())
    }
}

impl Cols for SqliteRow {
    fn text(&self, col: &str) -> String {
        self.get(col)
    }
    fn int(&self, col: &str) -> i64 {
        self.get(col)
    }
    fn flag(&self, col: &str) -> bool {
        self.get::<i64, _>(col) != 0
    }
    fn time(&self, col: &str) -> Result<DateTime<Utc>> {
        parse_ts(self.get(col))
    }
    fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>> {
        self.get::<Option<&str>, _>(col).map(parse_ts).transpose()
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

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

fn ttl_chrono(ttl: Duration) -> chrono::Duration {
    chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX)
}

#[async_trait]
impl Store for SqliteStore {
    fn engine(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn insert_sandbox(&self, r: &SandboxRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO sandboxes (id, state, provider, image, memory_mb, vcpus, metadata, created_at, expires_at, updated_at, owner_id, vm_id, worker_id, tenant_id, idle_timeout_secs, on_timeout, idle_deadline) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.state)
        .bind(&r.provider)
        .bind(&r.image)
        .bind(r.memory_mb)
        .bind(r.vcpus)
        .bind(to_json(&r.metadata))
        .bind(ts(r.created_at))
        .bind(ts(r.expires_at))
        .bind(ts(r.updated_at))
        .bind(&r.owner_id)
        .bind(&r.vm_id)
        .bind(&r.worker_id)
        .bind(&r.tenant_id)
        .bind(r.idle_timeout_secs)
        .bind(&r.on_timeout)
        .bind(ts(r.idle_deadline))
        .execute(&self.writer)
        .await
        .map_err(|e| match db_err(e) {
            e if e.kind() == ErrorKind::Conflict => Error::conflict(format!("sandbox {} already exists", r.id)),
            e => e,
        })?;
        Ok(())
    }

    async fn insert_sandbox_admitted(
        &self,
        r: &SandboxRecord,
        max_total: i64,
        max_per_owner: i64,
    ) -> Result<()> {
        // The writer is one connection: writes are already serial, and
        // this transaction's count and insert see no other write between.
        let mut tx = self.writer.begin().await.map_err(db_err)?;
        let (total, owned): (i64, i64) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(CASE WHEN owner_id = ? AND ? != '' THEN 1 ELSE 0 END), 0) FROM sandboxes WHERE state != 'destroyed'",
        )
        .bind(&r.owner_id)
        .bind(&r.owner_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_err)?;
        crate::rows::admit(total, owned, r, max_total, max_per_owner)?;
        sqlx::query(
            "INSERT INTO sandboxes (id, state, provider, image, memory_mb, vcpus, metadata, created_at, expires_at, updated_at, owner_id, vm_id, worker_id, tenant_id, idle_timeout_secs, on_timeout, idle_deadline) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.state)
        .bind(&r.provider)
        .bind(&r.image)
        .bind(r.memory_mb)
        .bind(r.vcpus)
        .bind(to_json(&r.metadata))
        .bind(ts(r.created_at))
        .bind(ts(r.expires_at))
        .bind(ts(r.updated_at))
        .bind(&r.owner_id)
        .bind(&r.vm_id)
        .bind(&r.worker_id)
        .bind(&r.tenant_id)
        .bind(r.idle_timeout_secs)
        .bind(&r.on_timeout)
        .bind(ts(r.idle_deadline))
        .execute(&mut *tx)
        .await
        .map_err(|e| match db_err(e) {
            e if e.kind() == ErrorKind::Conflict => Error::conflict(format!("sandbox {} already exists", r.id)),
            e => e,
        })?;
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
            "UPDATE sandboxes SET state = ?, vm_id = ?, updated_at = ? WHERE id = ?{}",
            fence.map_or(String::new(), |_| rows::fence_clause(None))
        );
        let q = sqlx::query(&sql)
            .bind(state)
            .bind(vm_id)
            .bind(ts(Utc::now()))
            .bind(id);
        let r = bind_fence(q, fence)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        rows::updated(self, r.rows_affected(), id, fence, false).await
    }

    async fn get_sandbox(&self, id: &str) -> Result<SandboxRecord> {
        let row = sqlx::query("SELECT * FROM sandboxes WHERE id = ?")
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
            "UPDATE sandboxes SET state = ?, updated_at = ? WHERE id = ?{}",
            fence.map_or(String::new(), |_| rows::fence_clause(None))
        );
        let q = sqlx::query(&sql).bind(state).bind(ts(Utc::now())).bind(id);
        let r = bind_fence(q, fence)
            .execute(&self.writer)
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
            "UPDATE sandboxes SET expires_at = ?, updated_at = ? WHERE id = ? AND state != 'destroyed'{}",
            fence.map_or(String::new(), |_| rows::fence_clause(None))
        );
        let q = sqlx::query(&sql)
            .bind(ts(expires_at))
            .bind(ts(Utc::now()))
            .bind(id);
        let r = bind_fence(q, fence)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        rows::updated(self, r.rows_affected(), id, fence, true).await
    }

    async fn reassign_sandbox(&self, r: &SandboxRecord, fence: Option<&Fence>) -> Result<()> {
        let sql = format!(
            "UPDATE sandboxes SET owner_id = ?, tenant_id = ?, metadata = ?, expires_at = ?, idle_timeout_secs = ?, \
             on_timeout = ?, idle_deadline = ?, updated_at = ? WHERE id = ? AND state != 'destroyed'{}",
            fence.map_or(String::new(), |_| rows::fence_clause(None))
        );
        let q = sqlx::query(&sql)
            .bind(&r.owner_id)
            .bind(&r.tenant_id)
            .bind(to_json(&r.metadata))
            .bind(ts(r.expires_at))
            .bind(r.idle_timeout_secs)
            .bind(&r.on_timeout)
            .bind(ts(r.idle_deadline))
            .bind(ts(Utc::now()))
            .bind(&r.id);
        let res = bind_fence(q, fence)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        rows::updated(self, res.rows_affected(), &r.id, fence, true).await
    }

    async fn set_sandbox_metadata(
        &self,
        id: &str,
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let res =
            sqlx::query("UPDATE sandboxes SET metadata = ? WHERE id = ? AND state != 'destroyed'")
                .bind(to_json(metadata))
                .bind(id)
                .execute(&self.writer)
                .await
                .map_err(db_err)?;
        rows::updated(self, res.rows_affected(), id, None, true).await
    }

    async fn list_expired_sandboxes(&self, now: DateTime<Utc>) -> Result<Vec<SandboxRecord>> {
        let rows = sqlx::query("SELECT * FROM sandboxes WHERE state != 'destroyed' AND expires_at < ? ORDER BY expires_at")
            .bind(ts(now))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(rows::sandbox).collect()
    }

    async fn list_idle_sandboxes(&self, now: DateTime<Utc>) -> Result<Vec<SandboxRecord>> {
        let rows = sqlx::query(
            "SELECT * FROM sandboxes WHERE idle_timeout_secs > 0 AND state = 'running' AND idle_deadline < ? ORDER BY idle_deadline",
        )
        .bind(ts(now))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::sandbox).collect()
    }

    async fn set_idle_deadlines(&self, deadlines: &[(String, DateTime<Utc>)]) -> Result<()> {
        if deadlines.is_empty() {
            return Ok(());
        }
        let mut tx = self.writer.begin().await.map_err(db_err)?;
        for (id, at) in deadlines {
            sqlx::query(
                "UPDATE sandboxes SET idle_deadline = ? WHERE id = ? AND idle_deadline < ? AND state != 'destroyed'",
            )
            .bind(ts(*at))
            .bind(id)
            .bind(ts(*at))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    async fn insert_exec_log(&self, r: &ExecLogRecord) -> Result<()> {
        sqlx::query("INSERT INTO exec_logs (sandbox_id, command, exit_code, stdout, stderr, duration, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)")
            .bind(&r.sandbox_id)
            .bind(&r.command)
            .bind(r.exit_code)
            .bind(&r.stdout)
            .bind(&r.stderr)
            .bind(&r.duration)
            .bind(ts(r.created_at))
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn prune_exec_logs(&self, before: DateTime<Utc>) -> Result<u64> {
        let r = sqlx::query("DELETE FROM exec_logs WHERE created_at < ?")
            .bind(ts(before))
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        Ok(r.rows_affected())
    }

    async fn prune_destroyed_sandboxes(&self, before: DateTime<Utc>) -> Result<u64> {
        let cutoff = ts(before);
        let mut tx = self.writer.begin().await.map_err(db_err)?;
        sqlx::query(
            "DELETE FROM exec_logs WHERE sandbox_id IN \
             (SELECT id FROM sandboxes WHERE state = 'destroyed' AND updated_at < ?)",
        )
        .bind(&cutoff)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        let r = sqlx::query("DELETE FROM sandboxes WHERE state = 'destroyed' AND updated_at < ?")
            .bind(&cutoff)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(r.rows_affected())
    }

    async fn list_exec_logs(&self, sandbox_id: &str, limit: i64) -> Result<Vec<ExecLogRecord>> {
        let rows =
            sqlx::query("SELECT * FROM exec_logs WHERE sandbox_id = ? ORDER BY id DESC LIMIT ?")
                .bind(sandbox_id)
                .bind(limit.clamp(1, 1000))
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
        rows.iter().map(rows::exec_log).collect()
    }

    async fn create_template(&self, t: &TemplateRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO templates (name, version, image, description, setup, allowed_hosts, memory_mb, cpu_cores, ttl_seconds, env, secrets, pool_size, provider, metadata, created_at, updated_at, files) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .bind(ts(t.created_at))
        .bind(ts(t.updated_at))
        .bind(to_json(&t.files))
        .execute(&self.writer)
        .await
        .map_err(|e| match db_err(e) {
            e if e.kind() == ErrorKind::Conflict => Error::conflict("template already exists"),
            e => e,
        })?;
        Ok(())
    }

    async fn get_template(&self, name: &str) -> Result<TemplateRecord> {
        let row = sqlx::query("SELECT * FROM templates WHERE name = ?")
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
        let r = sqlx::query(
            "UPDATE templates SET version = ?, image = ?, description = ?, setup = ?, allowed_hosts = ?, memory_mb = ?, cpu_cores = ?, ttl_seconds = ?, env = ?, secrets = ?, pool_size = ?, provider = ?, metadata = ?, updated_at = ?, files = ? WHERE name = ?",
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
        .bind(ts(t.updated_at))
        .bind(to_json(&t.files))
        .bind(&t.name)
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("template {:?}", t.name))?;
        self.get_template(&t.name).await
    }

    async fn delete_template(&self, name: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM templates WHERE name = ?")
            .bind(name)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("template {name:?}"))
    }

    async fn upsert_quota(&self, q: &QuotaRecord) -> Result<QuotaRecord> {
        sqlx::query(
            "INSERT INTO owner_quotas (owner_id, max_sandboxes, max_ttl_seconds, max_exec_timeout_seconds, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT(owner_id) DO UPDATE SET max_sandboxes = excluded.max_sandboxes, max_ttl_seconds = excluded.max_ttl_seconds, \
             max_exec_timeout_seconds = excluded.max_exec_timeout_seconds, updated_at = excluded.updated_at",
        )
        .bind(&q.owner_id)
        .bind(q.max_sandboxes)
        .bind(q.max_ttl_seconds)
        .bind(q.max_exec_timeout_seconds)
        .bind(ts(q.created_at))
        .bind(ts(q.updated_at))
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        self.get_quota(&q.owner_id).await
    }

    async fn get_quota(&self, owner_id: &str) -> Result<QuotaRecord> {
        let row = sqlx::query("SELECT * FROM owner_quotas WHERE owner_id = ?")
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
        let r = sqlx::query("DELETE FROM owner_quotas WHERE owner_id = ?")
            .bind(owner_id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("owner_quota {owner_id:?}"))
    }

    async fn insert_op_audit(&self, r: &OpAuditRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO operation_audit_logs (actor, action, sandbox_id, resource, provider, status, detail, tenant_id, request_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .bind(ts(r.created_at))
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn list_op_audit(&self, f: &OpAuditFilter) -> Result<Vec<OpAuditRecord>> {
        let limit = if f.limit <= 0 { 100 } else { f.limit.min(500) };
        let since = f.since.map(ts).unwrap_or_default();
        let rows = sqlx::query(
            "SELECT * FROM operation_audit_logs WHERE (? = '' OR actor = ?) AND (? = '' OR action = ?) AND (? = '' OR sandbox_id = ?) \
             AND (? = '' OR tenant_id = ?) AND (? = '' OR created_at >= ?) ORDER BY created_at DESC, id DESC LIMIT ?",
        )
        .bind(&f.actor)
        .bind(&f.actor)
        .bind(&f.action)
        .bind(&f.action)
        .bind(&f.sandbox_id)
        .bind(&f.sandbox_id)
        .bind(&f.tenant_id)
        .bind(&f.tenant_id)
        .bind(&since)
        .bind(&since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::op_audit).collect()
    }

    async fn insert_admin_audit(&self, r: &AdminAuditRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO admin_audit_logs (actor, method, path, status, duration_ms, request_id, remote_addr, user_agent, tenant_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .bind(ts(r.created_at))
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn list_admin_audit(&self, f: &AdminAuditFilter) -> Result<Vec<AdminAuditRecord>> {
        let limit = if f.limit <= 0 { 100 } else { f.limit.min(500) };
        let since = f.since.map(ts).unwrap_or_default();
        let rows = sqlx::query(
            "SELECT * FROM admin_audit_logs WHERE (? = '' OR actor = ?) AND (? = '' OR method = ?) \
             AND (? = '' OR tenant_id = ?) AND (? = '' OR created_at >= ?) ORDER BY created_at DESC, id DESC LIMIT ?",
        )
        .bind(&f.actor)
        .bind(&f.actor)
        .bind(&f.method)
        .bind(&f.method)
        .bind(&f.tenant_id)
        .bind(&f.tenant_id)
        .bind(&since)
        .bind(&since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::admin_audit).collect()
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64> {
        let cutoff = ts(before);
        let a = sqlx::query("DELETE FROM admin_audit_logs WHERE created_at < ?")
            .bind(&cutoff)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        let o = sqlx::query("DELETE FROM operation_audit_logs WHERE created_at < ?")
            .bind(&cutoff)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        Ok(a.rows_affected() + o.rows_affected())
    }

    async fn upsert_tenant_member(&self, m: &TenantMemberRecord) -> Result<TenantMemberRecord> {
        sqlx::query(
            "INSERT INTO tenant_members (tenant_id, user_id, role, created_at, updated_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT(tenant_id, user_id) DO UPDATE SET role = excluded.role, updated_at = excluded.updated_at",
        )
        .bind(&m.tenant_id)
        .bind(&m.user_id)
        .bind(&m.role)
        .bind(ts(m.created_at))
        .bind(ts(m.updated_at))
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        self.get_tenant_member(&m.tenant_id, &m.user_id).await
    }

    async fn get_tenant_member(
        &self,
        tenant_id: &str,
        user_id: &str,
    ) -> Result<TenantMemberRecord> {
        let row = sqlx::query("SELECT * FROM tenant_members WHERE tenant_id = ? AND user_id = ?")
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
            "SELECT * FROM tenant_members WHERE tenant_id = ? ORDER BY created_at ASC, user_id ASC",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::member).collect()
    }

    async fn delete_tenant_member(&self, tenant_id: &str, user_id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM tenant_members WHERE tenant_id = ? AND user_id = ?")
            .bind(tenant_id)
            .bind(user_id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("member {user_id:?}"))
    }

    async fn create_tenant(&self, t: &TenantRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO tenants (id, name, owner_id, settings, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.owner_id)
        .bind(&t.settings)
        .bind(ts(t.created_at))
        .bind(ts(t.updated_at))
        .execute(&self.writer)
        .await
        .map_err(|e| match db_err(e) {
            e if e.kind() == ErrorKind::Conflict => Error::conflict(format!("tenant {:?} already exists", t.id)),
            e => e,
        })?;
        Ok(())
    }

    async fn get_tenant(&self, id: &str) -> Result<TenantRecord> {
        let row = sqlx::query("SELECT * FROM tenants WHERE id = ?")
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
            "UPDATE tenants SET name = ?, owner_id = ?, settings = ?, updated_at = ? WHERE id = ?",
        )
        .bind(&t.name)
        .bind(&t.owner_id)
        .bind(&t.settings)
        .bind(ts(t.updated_at))
        .bind(&t.id)
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("tenant {:?}", t.id))
    }

    async fn delete_tenant(&self, id: &str) -> Result<()> {
        let mut tx = self.writer.begin().await.map_err(db_err)?;
        let r = sqlx::query("DELETE FROM tenants WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if r.rows_affected() == 0 {
            return Err(Error::not_found(format!("tenant {id:?}")));
        }
        sqlx::query("DELETE FROM tenant_members WHERE tenant_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        sqlx::query("DELETE FROM policies WHERE tenant_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    async fn create_policy(&self, p: &PolicyRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO policies (id, tenant_id, resource_type, effect, pattern, priority, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&p.id)
        .bind(&p.tenant_id)
        .bind(&p.resource_type)
        .bind(&p.effect)
        .bind(&p.pattern)
        .bind(p.priority)
        .bind(ts(p.created_at))
        .bind(ts(p.updated_at))
        .execute(&self.writer)
        .await
        .map_err(|e| match db_err(e) {
            e if e.kind() == ErrorKind::Conflict => Error::conflict(format!("policy {:?} already exists", p.id)),
            e => e,
        })?;
        Ok(())
    }

    async fn list_policies(&self, tenant_id: Option<&str>) -> Result<Vec<PolicyRecord>> {
        let rows = match tenant_id {
            Some(t) => sqlx::query(
                "SELECT * FROM policies WHERE tenant_id = ? OR tenant_id = '' ORDER BY priority ASC, created_at ASC, id ASC",
            )
            .bind(t),
            None => sqlx::query(
                "SELECT * FROM policies WHERE tenant_id = '' ORDER BY priority ASC, created_at ASC, id ASC",
            ),
        }
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::policy).collect()
    }

    async fn delete_policy(&self, tenant_id: &str, id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM policies WHERE id = ? AND tenant_id = ?")
            .bind(id)
            .bind(tenant_id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("policy {id:?}"))
    }

    async fn put_port(&self, r: &PortRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO sandbox_ports (sandbox_id, port, mode, created_by, created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (sandbox_id, port) DO UPDATE SET mode = excluded.mode, created_by = excluded.created_by",
        )
        .bind(&r.sandbox_id)
        .bind(i64::from(r.port))
        .bind(&r.mode)
        .bind(&r.created_by)
        .bind(ts(r.created_at))
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn get_port(&self, sandbox_id: &str, port: u16) -> Result<PortRecord> {
        let row = sqlx::query("SELECT * FROM sandbox_ports WHERE sandbox_id = ? AND port = ?")
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
            sqlx::query("SELECT * FROM sandbox_ports WHERE sandbox_id = ? ORDER BY port ASC")
                .bind(sandbox_id)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?;
        rows.iter().map(rows::port).collect()
    }

    async fn delete_port(&self, sandbox_id: &str, port: u16) -> Result<()> {
        sqlx::query("DELETE FROM preview_tokens WHERE sandbox_id = ? AND port = ?")
            .bind(sandbox_id)
            .bind(i64::from(port))
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        let r = sqlx::query("DELETE FROM sandbox_ports WHERE sandbox_id = ? AND port = ?")
            .bind(sandbox_id)
            .bind(i64::from(port))
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        not_found_if_zero(
            r.rows_affected(),
            format!("port {port} of sandbox {sandbox_id} (not exposed)"),
        )
    }

    async fn delete_sandbox_ports(&self, sandbox_id: &str) -> Result<u64> {
        sqlx::query("DELETE FROM preview_tokens WHERE sandbox_id = ?")
            .bind(sandbox_id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        let r = sqlx::query("DELETE FROM sandbox_ports WHERE sandbox_id = ?")
            .bind(sandbox_id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        Ok(r.rows_affected())
    }

    async fn insert_preview_token(&self, r: &PreviewTokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO preview_tokens (id, sandbox_id, port, hash, created_by, created_at, expires_at, revoked) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.sandbox_id)
        .bind(i64::from(r.port))
        .bind(&r.hash)
        .bind(&r.created_by)
        .bind(ts(r.created_at))
        .bind(ts(r.expires_at))
        .bind(i64::from(r.revoked))
        .execute(&self.writer)
        .await
        .map_err(|e| match db_err(e) {
            e if e.kind() == ErrorKind::Conflict => Error::conflict("preview token id or secret already exists"),
            e => e,
        })?;
        Ok(())
    }

    async fn find_preview_token(&self, hash: &str) -> Result<PreviewTokenRecord> {
        let row = sqlx::query("SELECT * FROM preview_tokens WHERE hash = ?")
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
        let rows = sqlx::query("SELECT * FROM preview_tokens WHERE sandbox_id = ? AND port = ? ORDER BY created_at ASC, id ASC")
            .bind(sandbox_id)
            .bind(i64::from(port))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter().map(rows::preview_token).collect()
    }

    async fn revoke_preview_token(&self, sandbox_id: &str, id: &str) -> Result<()> {
        let r =
            sqlx::query("UPDATE preview_tokens SET revoked = 1 WHERE sandbox_id = ? AND id = ?")
                .bind(sandbox_id)
                .bind(id)
                .execute(&self.writer)
                .await
                .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("preview token {id:?}"))
    }

    async fn insert_snapshot(&self, r: &SnapshotRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO snapshots (id, provider, source_sandbox_id, image, memory_mb, vcpus, network_mode, size_bytes, owner_id, tenant_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .bind(ts(r.created_at))
        .execute(&self.writer)
        .await
        .map_err(|e| match db_err(e) {
            e if e.kind() == ErrorKind::Conflict => {
                Error::conflict(format!("snapshot {:?} already exists", r.id))
            }
            e => e,
        })?;
        Ok(())
    }

    async fn get_snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        let row = sqlx::query("SELECT * FROM snapshots WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("snapshot {id:?}")))?;
        rows::snapshot(&row)
    }

    async fn list_snapshots(&self, tenant_id: Option<&str>) -> Result<Vec<SnapshotRecord>> {
        let rows = match tenant_id {
            Some(t) => sqlx::query(
                "SELECT * FROM snapshots WHERE tenant_id = ? ORDER BY created_at ASC, id ASC",
            )
            .bind(t),
            None => sqlx::query("SELECT * FROM snapshots ORDER BY created_at ASC, id ASC"),
        }
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::snapshot).collect()
    }

    async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM snapshots WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("snapshot {id:?}"))
    }

    async fn insert_volume(&self, r: &VolumeRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO volumes (id, name, size_mb, owner_id, tenant_id, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.name)
        .bind(r.size_mb)
        .bind(&r.owner_id)
        .bind(&r.tenant_id)
        .bind(ts(r.created_at))
        .execute(&self.writer)
        .await
        .map_err(|e| match db_err(e) {
            e if e.kind() == ErrorKind::Conflict => Error::conflict(format!(
                "a volume named {:?} already exists in this tenant",
                r.name
            )),
            e => e,
        })?;
        Ok(())
    }

    async fn get_volume(&self, id: &str) -> Result<VolumeRecord> {
        let row = sqlx::query("SELECT * FROM volumes WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("volume {id:?}")))?;
        rows::volume(&row)
    }

    async fn list_volumes(&self, tenant_id: Option<&str>) -> Result<Vec<VolumeRecord>> {
        let rows = match tenant_id {
            Some(t) => sqlx::query(
                "SELECT * FROM volumes WHERE tenant_id = ? ORDER BY created_at ASC, id ASC",
            )
            .bind(t),
            None => sqlx::query("SELECT * FROM volumes ORDER BY created_at ASC, id ASC"),
        }
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::volume).collect()
    }

    async fn delete_volume(&self, id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM volumes WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("volume {id:?}"))
    }

    async fn insert_environment_spec(&self, r: &EnvironmentSpecRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO environment_specs (id, owner_id, tenant_id, name, base_image, python_packages, apt_packages, python_version, dockerfile, context_sha256, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .bind(ts(r.created_at))
        .bind(ts(r.updated_at))
        .execute(&self.writer)
        .await
        .map_err(|e| match db_err(e) {
            e if e.kind() == ErrorKind::Conflict => Error::conflict(format!(
                "an environment spec named {:?} already exists for {:?}",
                r.name, r.owner_id
            )),
            e => e,
        })?;
        Ok(())
    }

    async fn get_environment_spec(&self, id: &str) -> Result<EnvironmentSpecRecord> {
        let row = sqlx::query("SELECT * FROM environment_specs WHERE id = ?")
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
        let rows = match tenant_id {
            Some(t) => sqlx::query(
                "SELECT * FROM environment_specs WHERE tenant_id = ? ORDER BY created_at DESC, id DESC",
            )
            .bind(t),
            None => sqlx::query("SELECT * FROM environment_specs ORDER BY created_at DESC, id DESC"),
        }
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::environment_spec).collect()
    }

    async fn insert_build(&self, r: &BuildRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO environment_builds (id, spec_id, owner_id, tenant_id, provider, builder, status, current_step, log_blob, image_size_bytes, digest_local, error, artifacts, created_at, finished_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .bind(ts(r.created_at))
        .bind(r.finished_at.map(ts))
        .bind(ts(r.updated_at))
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn get_build(&self, id: &str) -> Result<BuildRecord> {
        let row = sqlx::query("SELECT * FROM environment_builds WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("build {id:?}")))?;
        rows::build(&row)
    }

    async fn update_build(&self, r: &BuildRecord) -> Result<()> {
        let res = sqlx::query(
            "UPDATE environment_builds SET status = ?, current_step = ?, log_blob = ?, image_size_bytes = ?, digest_local = ?, error = ?, artifacts = ?, finished_at = ?, updated_at = ? WHERE id = ?",
        )
        .bind(&r.status)
        .bind(&r.current_step)
        .bind(&r.log)
        .bind(i64::try_from(r.image_size_bytes).unwrap_or(i64::MAX))
        .bind(&r.digest_local)
        .bind(&r.error)
        .bind(to_json(&r.artifacts))
        .bind(r.finished_at.map(ts))
        .bind(ts(r.updated_at))
        .bind(&r.id)
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        not_found_if_zero(res.rows_affected(), format!("build {:?}", r.id))
    }

    async fn list_builds(&self, tenant_id: Option<&str>, limit: usize) -> Result<Vec<BuildRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match tenant_id {
            Some(t) => sqlx::query(
                "SELECT * FROM environment_builds WHERE tenant_id = ? ORDER BY created_at DESC, id DESC LIMIT ?",
            )
            .bind(t),
            None => sqlx::query(
                "SELECT * FROM environment_builds ORDER BY created_at DESC, id DESC LIMIT ?",
            ),
        }
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::build).collect()
    }

    async fn save_build_log(&self, id: &str, log: &str, now: DateTime<Utc>) -> Result<String> {
        sqlx::query(
            "UPDATE environment_builds SET log_blob = ?, updated_at = ? WHERE id = ? AND status = 'building'",
        )
        .bind(log)
        .bind(ts(now))
        .bind(id)
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM environment_builds WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.writer)
                .await
                .map_err(db_err)?;
        status.ok_or_else(|| Error::not_found(format!("build {id:?}")))
    }

    async fn claim_build(&self, id: &str, builder: &str, now: DateTime<Utc>) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE environment_builds SET status = 'building', builder = ?, updated_at = ? WHERE id = ? AND status = 'queued'",
        )
        .bind(builder)
        .bind(ts(now))
        .bind(id)
        .execute(&self.writer)
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
        let r = sqlx::query("UPDATE environment_specs SET context_sha256 = ? WHERE id = ?")
            .bind(sha256)
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("environment spec {id:?}"))
    }

    async fn delete_environment_spec(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM environment_builds WHERE spec_id = ?")
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        let r = sqlx::query("DELETE FROM environment_specs WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("environment spec {id:?}"))
    }

    async fn insert_registry_connection(&self, r: &RegistryConnectionRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO registry_connections (id, owner_id, tenant_id, provider, host, username, secret_ref, is_default, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(&r.owner_id)
        .bind(&r.tenant_id)
        .bind(&r.provider)
        .bind(&r.host)
        .bind(&r.username)
        .bind(&r.secret_ref)
        .bind(r.is_default)
        .bind(ts(r.created_at))
        .bind(ts(r.updated_at))
        .execute(&self.writer)
        .await
        .map_err(|e| match db_err(e) {
            e if e.kind() == ErrorKind::Conflict => Error::conflict(format!(
                "a {} connection for {:?} already exists",
                r.provider, r.username
            )),
            e => e,
        })?;
        Ok(())
    }

    async fn list_registry_connections(
        &self,
        tenant_id: Option<&str>,
    ) -> Result<Vec<RegistryConnectionRecord>> {
        let rows = match tenant_id {
            Some(t) => sqlx::query(
                "SELECT * FROM registry_connections WHERE tenant_id = ? ORDER BY created_at DESC, id DESC",
            )
            .bind(t),
            None => sqlx::query(
                "SELECT * FROM registry_connections ORDER BY created_at DESC, id DESC",
            ),
        }
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(rows::registry_connection).collect()
    }

    async fn delete_registry_connection(&self, id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM registry_connections WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        not_found_if_zero(r.rows_affected(), format!("registry connection {id:?}"))
    }

    async fn upsert_worker(&self, w: &WorkerRecord) -> Result<WorkerRecord> {
        sqlx::query(
            "INSERT INTO workers (id, hostname, status, providers, capabilities, capacity, last_heartbeat, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT(id) DO UPDATE SET hostname = excluded.hostname, status = excluded.status, providers = excluded.providers, \
             capabilities = excluded.capabilities, capacity = excluded.capacity, last_heartbeat = excluded.last_heartbeat, updated_at = excluded.updated_at",
        )
        .bind(&w.id)
        .bind(&w.hostname)
        .bind(&w.status)
        .bind(to_json(&w.providers))
        .bind(to_json(&w.capabilities))
        .bind(to_json(&w.capacity))
        .bind(ts(w.last_heartbeat))
        .bind(ts(w.created_at))
        .bind(ts(w.updated_at))
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        let row = sqlx::query("SELECT * FROM workers WHERE id = ?")
            .bind(&w.id)
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
        let row = sqlx::query("SELECT * FROM workers WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .ok_or_else(|| Error::not_found(format!("worker {id:?}")))?;
        rows::worker(&row)
    }

    async fn delete_worker(&self, id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM workers WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
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
        let now = Utc::now();
        let expires = now + ttl_chrono(ttl);
        let r = sqlx::query(
            "INSERT INTO leases (resource_id, resource_type, holder_id, generation, expires_at, created_at, updated_at) VALUES (?, ?, ?, 1, ?, ?, ?) \
             ON CONFLICT(resource_id) DO UPDATE SET holder_id = excluded.holder_id, resource_type = excluded.resource_type, \
             generation = leases.generation + 1, expires_at = excluded.expires_at, updated_at = excluded.updated_at \
             WHERE leases.expires_at <= excluded.updated_at OR leases.holder_id = excluded.holder_id \
             RETURNING *",
        )
        .bind(resource_id)
        .bind(resource_type)
        .bind(holder_id)
        .bind(ts(expires))
        .bind(ts(now))
        .bind(ts(now))
        .fetch_optional(&self.writer)
        .await
        .map_err(db_err)?;
        match r {
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
        let now = Utc::now();
        let r = sqlx::query(
            "UPDATE leases SET generation = generation + 1, expires_at = ?, updated_at = ? WHERE resource_id = ? AND holder_id = ? AND expires_at > ?",
        )
        .bind(ts(now + ttl_chrono(ttl)))
        .bind(ts(now))
        .bind(resource_id)
        .bind(holder_id)
        .bind(ts(now))
        .execute(&self.writer)
        .await
        .map_err(db_err)?;
        if r.rows_affected() == 0 {
            return Err(Error::conflict(
                "lease is not held by worker or has expired",
            ));
        }
        self.get_lease(resource_id).await
    }

    async fn release_lease(&self, resource_id: &str, holder_id: &str) -> Result<()> {
        let r = sqlx::query("DELETE FROM leases WHERE resource_id = ? AND holder_id = ?")
            .bind(resource_id)
            .bind(holder_id)
            .execute(&self.writer)
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
        let now = Utc::now();
        let r = sqlx::query("UPDATE leases SET holder_id = ?, generation = generation + 1, expires_at = ?, updated_at = ? WHERE resource_id = ? AND holder_id = ? AND generation = ?")
            .bind(to)
            .bind(ts(now + ttl_chrono(ttl)))
            .bind(ts(now))
            .bind(resource_id)
            .bind(&from.holder_id)
            .bind(from.generation)
            .execute(&self.writer)
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
        let sql = format!("UPDATE sandboxes SET worker_id = ?, vm_id = ?, state = ?, updated_at = ? WHERE id = ?{}", rows::fence_clause(None));
        let q = sqlx::query(&sql)
            .bind(worker_id)
            .bind(vm_id)
            .bind(state)
            .bind(ts(Utc::now()))
            .bind(id);
        let r = bind_fence(q, Some(fence))
            .execute(&self.writer)
            .await
            .map_err(db_err)?;
        rows::updated(self, r.rows_affected(), id, Some(fence), false).await
    }

    async fn get_lease(&self, resource_id: &str) -> Result<LeaseRecord> {
        let row = sqlx::query("SELECT * FROM leases WHERE resource_id = ?")
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

    crate::store_contract_tests!(sqlite_memory, async {
        SqliteStore::in_memory().await.expect("open")
    });
    // A file database with a multi-connection pool exercises WAL and busy handling.
    crate::store_contract_tests!(sqlite_file, async {
        let dir = tempfile::tempdir().expect("tmp").keep();
        SqliteStore::open(&dir.join("contract.db"))
            .await
            .expect("open")
    });

    #[tokio::test]
    async fn file_database_survives_reopen_and_uses_wal() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("sub").join("s.db");
        {
            let s = SqliteStore::open(&path).await.expect("open");
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(s.pool())
                .await
                .expect("pragma");
            assert_eq!(mode, "wal");
            crate::contract::insert_sample(&s, "sb-0000aaaa").await;
        }
        let s = SqliteStore::open(&path).await.expect("reopen");
        assert_eq!(
            s.get_sandbox("sb-0000aaaa").await.expect("get").id,
            "sb-0000aaaa"
        );
        let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
            .fetch_all(s.pool())
            .await
            .expect("versions");
        let expected: Vec<i64> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, expected);
        assert_eq!(*expected.last().expect("migrations"), 8);
    }
}
