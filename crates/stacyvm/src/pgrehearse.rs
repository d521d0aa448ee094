//! `stacyvm db pg-rehearse`: this build's migrations tried on a copy of a
//! Postgres database, never on the database itself.
//!
//! The source is only read (a `pg_dump`); the copy is a scratch database on
//! the same server that is dropped at the end, whatever happened. The
//! report says what the source holds, what the migrations did to the copy
//! and whether every record still reads.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use stacyvm_core::store::Store;
use stacyvm_store::{parse_dsn, pg, PostgresStore};

use crate::db::{pg_tool, split_dsn};

/// One line of the report.
#[derive(Debug, serde::Serialize)]
struct Check {
    name: String,
    status: &'static str,
    detail: String,
}

fn pass(name: &str, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status: "PASS",
        detail: detail.into(),
    }
}

fn fail(name: &str, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status: "FAIL",
        detail: detail.into(),
    }
}

pub async fn run(dsn: &str, json: bool) -> Result<()> {
    let mut checks = Vec::new();
    let opts = parse_dsn(dsn).map_err(|e| anyhow::anyhow!("{e}"))?;
    let source = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect_with(opts.clone())
        .await
        .map_err(|_| {
            anyhow::anyhow!("cannot connect to the Postgres database (check database.dsn)")
        })?;
    checks.push(pass("connect", "the database answers"));

    let versions = applied(&source).await?;
    let latest = pg::latest_version();
    checks.push(match versions.last() {
        None => pass(
            "schema",
            format!("fresh database; migrations 1..={latest} would be applied"),
        ),
        Some(&v) if v > latest => fail(
            "schema",
            format!(
                "the database is at version {v}, newer than this build ({latest}): a downgrade"
            ),
        ),
        Some(&v) => pass(
            "schema",
            format!(
                "at version {v}; {} migration(s) to apply (this build: {latest})",
                latest - v
            ),
        ),
    });
    let before = counts(&source).await?;
    source.close().await;

    let scratch = format!(
        "stacyvm_rehearse_{}_{}",
        chrono::Utc::now().format("%Y%m%d%H%M%S"),
        std::process::id()
    );
    let rehearsal = rehearse(dsn, &scratch, &before, &mut checks).await;
    // The copy goes, whatever happened above.
    let dropped = drop_database(dsn, &scratch).await;
    if let Err(e) = rehearsal {
        checks.push(fail("rehearsal", format!("{e:#}")));
    }
    match dropped {
        Ok(()) => checks.push(pass(
            "cleanup",
            format!("scratch database {scratch} dropped"),
        )),
        Err(e) => checks.push(fail(
            "cleanup",
            format!("scratch database {scratch} was not dropped: {e:#}; drop it by hand"),
        )),
    }

    let failed = checks.iter().filter(|c| c.status == "FAIL").count();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": failed == 0,
                "schema_version": versions.last(),
                "latest_schema_version": latest,
                "checks": checks,
            }))?
        );
    } else {
        println!("Postgres upgrade rehearsal");
        for c in &checks {
            println!("  [{}] {}: {}", c.status, c.name, c.detail);
        }
    }
    if failed > 0 {
        bail!("rehearsal failed: {failed} check(s) failed");
    }
    Ok(())
}

async fn rehearse(
    dsn: &str,
    scratch: &str,
    before: &[(String, Option<i64>)],
    checks: &mut Vec<Check>,
) -> Result<()> {
    let (Some(pg_dump), Some(pg_restore)) = (
        stacyvm_core::checks::which("pg_dump"),
        stacyvm_core::checks::which("pg_restore"),
    ) else {
        bail!("pg_dump and pg_restore are needed (apt-get install postgresql-client)");
    };
    let mut admin =
        PgConnection::connect_with(&parse_dsn(dsn).map_err(|e| anyhow::anyhow!("{e}"))?)
            .await
            .context("connecting")?;
    sqlx::query(&format!("CREATE DATABASE {scratch}"))
        .execute(&mut admin)
        .await
        .context("creating the scratch database (does the role have CREATEDB?)")?;
    let _ = admin.close().await;

    let dump = tempfile::Builder::new()
        .prefix("stacyvm-rehearse-")
        .tempfile()
        .context("temporary dump file")?;
    let t = Instant::now();
    let plain = split_dsn(dsn).without_password;
    pg_tool(
        &pg_dump,
        dsn,
        &[
            "--format=custom".into(),
            format!("--file={}", dump.path().display()),
            format!("--dbname={plain}"),
        ],
    )?;
    let copy_dsn = pg::with_database(dsn, scratch);
    pg_tool(
        &pg_restore,
        &copy_dsn,
        &[
            "--no-owner".into(),
            "--exit-on-error".into(),
            format!("--dbname={}", split_dsn(&copy_dsn).without_password),
            dump.path().display().to_string(),
        ],
    )?;
    let size = Path::new(dump.path())
        .metadata()
        .map(|m| m.len())
        .unwrap_or(0);
    checks.push(pass(
        "copy",
        format!(
            "copied into {scratch} ({size} bytes dumped) in {:.1?}",
            t.elapsed()
        ),
    ));

    let t = Instant::now();
    let store = PostgresStore::connect(&copy_dsn)
        .await
        .map_err(|e| anyhow::anyhow!("migrating the copy: {e}"))?;
    let versions = applied(store.pool()).await?;
    checks.push(pass(
        "migrate",
        format!(
            "the copy is at version {} after {:.1?}",
            versions.last().copied().unwrap_or(0),
            t.elapsed()
        ),
    ));

    let after = counts(store.pool()).await?;
    let mut lost = Vec::new();
    for ((table, was), (_, now)) in before.iter().zip(&after) {
        match (was, now) {
            (_, None) => lost.push(format!("{table} is missing")),
            (Some(a), Some(b)) if a != b => {
                lost.push(format!("{table}: {a} rows before, {b} after"))
            }
            _ => {}
        }
    }
    checks.push(if lost.is_empty() {
        pass(
            "tables",
            format!("all {} tables present, every row kept", after.len()),
        )
    } else {
        fail("tables", lost.join("; "))
    });

    // Every record still decodes into this build's types.
    let read = async {
        let s: &dyn Store = &store;
        let n = s.list_active_sandboxes().await?.len()
            + s.list_templates().await?.len()
            + s.list_quotas().await?.len()
            + s.list_workers().await?.len()
            + s.list_leases().await?.len()
            + s.list_tenants().await?.len()
            + s.list_snapshots(None).await?.len();
        Ok::<_, stacyvm_core::Error>(n)
    };
    checks.push(match read.await {
        Ok(n) => pass("records", format!("{n} records read back with this build")),
        Err(e) => fail("records", e.to_string()),
    });
    store.pool().close().await;
    Ok(())
}

async fn applied(pool: &PgPool) -> Result<Vec<i64>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('schema_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .context("reading the schema")?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .context("reading schema_migrations")
}

/// Rows per known table (`None`: the table does not exist).
async fn counts(pool: &PgPool) -> Result<Vec<(String, Option<i64>)>> {
    let mut out = Vec::new();
    for t in pg::TABLES {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(*t)
            .fetch_one(pool)
            .await
            .context("reading the schema")?;
        let n = if exists {
            Some(
                sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
                    .fetch_one(pool)
                    .await
                    .with_context(|| format!("counting {t}"))?,
            )
        } else {
            None
        };
        out.push(((*t).to_string(), n));
    }
    Ok(out)
}

async fn drop_database(dsn: &str, name: &str) -> Result<()> {
    let mut admin =
        PgConnection::connect_with(&parse_dsn(dsn).map_err(|e| anyhow::anyhow!("{e}"))?)
            .await
            .context("connecting")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .context("dropping")?;
    let _ = admin.close().await;
    Ok(())
}
