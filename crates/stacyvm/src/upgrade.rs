//! `stacyvm upgrade rehearse`: everything that can be checked before an
//! upgrade without touching the live system (spec/config-and-cli.md §5).
//!
//! Sections: the production config lint; the database (exists, passes the
//! integrity check, schema not newer than this build, and this build's
//! migrations applied to a scratch copy made with `VACUUM INTO` succeed);
//! the planned backup (directory usable, output free); optionally `doctor
//! --production`. Then the recommended steps. Any FAIL exits with status 1.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use serde_json::json;
use stacyvm_core::config;
use stacyvm_store::backup;

use crate::checks::Report;

/// Arguments of `stacyvm upgrade rehearse`.
#[derive(Debug, Args)]
pub struct RehearseArgs {
    /// Config file (must exist; default lookup otherwise).
    #[arg(long, short = 'c', env = "STACYVM_CONFIG")]
    pub config: Option<PathBuf>,
    /// The SQLite database (default: from the config).
    #[arg(long)]
    pub database: Option<PathBuf>,
    /// Where the pre-upgrade backup will go (default:
    /// <database dir>/stacyvm-upgrade-<UTC time>.db).
    #[arg(long)]
    pub backup_output: Option<PathBuf>,
    /// Also run `doctor --production`.
    #[arg(long)]
    pub include_doctor: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn steps(backup_output: &Path) -> Vec<String> {
    let b = backup_output.display();
    vec![
        format!("Back up the database while the server still runs: stacyvm db backup {b}"),
        "Stop the server: systemctl stop stacyvm".into(),
        "Install the new stacyvm and stacyvm-agent binaries side by side (keep the old ones)".into(),
        "Check the host with the new binary: stacyvm doctor --production".into(),
        "Start the server (migrations apply on start) and wait for GET /ready to return 200".into(),
        format!("If anything fails: stop the server, run stacyvm db restore {b} --yes, reinstall the old binaries and start again"),
    ]
}

pub async fn run(args: &RehearseArgs) -> Result<()> {
    let mut sections: Vec<(&str, Report)> = Vec::new();
    let loaded = config::load(args.config.as_deref(), std::env::vars());
    let mut lint = Report::default();
    let cfg = match loaded {
        Ok(l) => {
            lint.pass("config", "loaded and validated");
            lint.extend(crate::lint::lint(&l.config, true));
            Some(l.config)
        }
        Err(e) => {
            lint.fail(
                "config",
                e.to_string(),
                "fix the config; `stacyvm config lint` shows the details",
            );
            None
        }
    };
    sections.push(("config lint (production)", lint));

    let mut db = Report::default();
    let path = match (&args.database, &cfg) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(c)) if c.is_postgres() => {
            db.fail(
                "database.source",
                "database.driver is postgres; this rehearsal covers SQLite",
                "back up with pg_dump and rehearse migrations on a restored copy",
            );
            None
        }
        (None, Some(c)) => Some(c.sqlite_path()),
        (None, None) => None,
    };
    let backup_output = match (&args.backup_output, &path) {
        (Some(b), _) => b.clone(),
        (None, Some(p)) => {
            let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
            parent(p).join(format!("stacyvm-upgrade-{stamp}.db"))
        }
        (None, None) => PathBuf::from(format!(
            "stacyvm-upgrade-{}.db",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
        )),
    };
    if let Some(p) = &path {
        check_database(&mut db, p, &backup_output).await;
    }
    sections.push(("database", db));

    let mut b = Report::default();
    check_backup_target(&mut b, &backup_output);
    sections.push(("backup", b));

    if args.include_doctor {
        let report = crate::doctor::diagnose(args.config.as_deref(), true).await;
        sections.push(("doctor (production)", report));
    }

    let failures: usize = sections.iter().map(|(_, r)| r.failures()).sum();
    let steps = steps(&backup_output);
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = json!({
            "ok": failures == 0,
            "backup_output": backup_output,
            "sections": sections.iter().map(|(name, r)| json!({"name": name, "report": r.to_json()})).collect::<Vec<_>>(),
            "steps": steps,
        });
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
    } else {
        for (name, r) in &sections {
            writeln!(out, "== {name} ==")?;
            r.write_text(&mut out)?;
            writeln!(out)?;
        }
        writeln!(out, "== recommended steps ==")?;
        for (i, s) in steps.iter().enumerate() {
            writeln!(out, "{}. {s}", i + 1)?;
        }
    }
    out.flush()?;
    if failures > 0 {
        anyhow::bail!("upgrade rehearsal found {failures} failing check(s)");
    }
    Ok(())
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

async fn check_database(r: &mut Report, path: &Path, backup_output: &Path) {
    if !path.is_file() {
        r.fail(
            "database.source",
            format!("{} does not exist", path.display()),
            "pass --database or fix database.path; a fresh install needs no rehearsal",
        );
        return;
    }
    r.pass("database.source", path.display().to_string());
    if let Err(e) = backup::integrity_check(path).await {
        r.fail(
            "database.integrity",
            e.to_string(),
            "restore the latest good backup before upgrading",
        );
        return;
    }
    r.pass("database.integrity", "ok");
    let info = match backup::inspect(path).await {
        Ok(i) => i,
        Err(e) => {
            r.fail(
                "database.schema",
                e.to_string(),
                "point --database at the StacyVM database",
            );
            return;
        }
    };
    let known = backup::latest_schema_version();
    let pending = known - info.schema_version;
    if pending < 0 {
        r.fail(
            "database.schema",
            format!(
                "schema version {} is newer than this build's {known}",
                info.schema_version
            ),
            "use a stacyvm at least as new as the one that wrote this database",
        );
        return;
    }
    r.pass(
        "database.schema",
        if pending == 0 {
            format!("version {known}, up to date")
        } else {
            format!(
                "version {}, {pending} migration(s) to apply",
                info.schema_version
            )
        },
    );
    // Scratch space next to the backup (same disk as the real copy), or
    // the system temp dir if that directory is not there yet.
    let scratch = tempfile::Builder::new()
        .prefix(".stacyvm-rehearsal-")
        .tempdir_in(parent(backup_output))
        .or_else(|_| tempfile::tempdir());
    match scratch {
        Ok(dir) => match backup::rehearse_migrations(path, dir.path()).await {
            Ok((before, after)) => r.pass(
                "database.migrations",
                format!("a scratch copy migrated from version {before} to {after}; integrity ok"),
            ),
            Err(e) => r.fail(
                "database.migrations",
                e.to_string(),
                "do not upgrade; report this with `stacyvm support bundle`",
            ),
        },
        Err(e) => r.fail(
            "database.migrations",
            format!("no scratch directory: {e}"),
            "free disk space or set TMPDIR",
        ),
    }
}

fn check_backup_target(r: &mut Report, out: &Path) {
    let dir = parent(out);
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => r.pass("backup.directory", dir.display().to_string()),
        Ok(_) => r.fail(
            "backup.directory",
            format!("{} is not a directory", dir.display()),
            "choose another --backup-output",
        ),
        Err(_) => r.fail(
            "backup.directory",
            format!("{} does not exist", dir.display()),
            format!("create it: install -d -m 0750 {}", dir.display()),
        ),
    }
    if std::fs::symlink_metadata(out).is_ok() {
        r.fail(
            "backup.output",
            format!("{} already exists", out.display()),
            "choose a new --backup-output; never overwrite an earlier backup",
        );
    } else {
        r.pass("backup.output", format!("{} is free", out.display()));
    }
}
