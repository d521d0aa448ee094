//! `stacyvm db backup|restore|check`: SQLite backups (spec/config-and-cli.md
//! §5, spec/cluster-and-security.md §12). The work is done by
//! [`stacyvm_store::backup`]; this module resolves paths, asks for
//! confirmation and refuses to restore under a running server.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use stacyvm_core::config;
use stacyvm_store::backup;

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Write a consistent copy of the SQLite database (safe while the
    /// server runs).
    ///
    /// Uses `VACUUM INTO` on a read-only connection, checks the copy with
    /// `PRAGMA integrity_check` and fsyncs it before it appears at OUTPUT.
    #[command(
        after_help = "Example:\n  stacyvm db backup /var/backups/stacyvm/stacyvm-$(date +%F).db"
    )]
    Backup {
        /// The backup file to write (its directory is created, mode 0750).
        output: PathBuf,
        #[command(flatten)]
        db: DbArgs,
        /// Replace OUTPUT if it exists (a directory is always refused).
        #[arg(long)]
        force: bool,
    },
    /// Replace the database with a backup (stop the server first).
    ///
    /// The backup is checked before anything changes; the current database
    /// is kept as <database>.pre-restore-<UTC time>, its -wal/-shm files
    /// are removed and the backup is copied in (mode 0600, fsync).
    #[command(
        after_help = "Example:\n  systemctl stop stacyvm\n  stacyvm db restore /var/backups/stacyvm/stacyvm-2026-01-31.db --yes\n  systemctl start stacyvm"
    )]
    Restore {
        /// The backup file to restore.
        backup: PathBuf,
        #[command(flatten)]
        db: DbArgs,
        /// Confirm that the current database may be replaced.
        #[arg(long)]
        yes: bool,
    },
    /// Dump a Postgres database with pg_dump.
    ///
    /// The DSN comes from --dsn, else database.dsn of the config, else
    /// STACYVM_DATABASE_DSN. Its password is handed to pg_dump through
    /// PGPASSWORD (never on a command line) and never printed.
    #[command(
        after_help = "Example:\n  stacyvm db pg-backup /var/backups/stacyvm/pg.sql --format plain"
    )]
    PgBackup {
        /// The dump file (or directory for --format directory).
        output: PathBuf,
        /// Postgres DSN (URL or key=value form).
        #[arg(long, hide_env_values = true)]
        dsn: Option<String>,
        /// pg_dump output format.
        #[arg(long, default_value = "plain", value_parser = ["plain", "custom", "directory", "tar"])]
        format: String,
        /// Config file to read database.dsn from.
        #[arg(long, short = 'c', env = "STACYVM_CONFIG")]
        config: Option<PathBuf>,
        /// Replace OUTPUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Rehearse a Postgres upgrade on a scratch copy; the database itself
    /// is only read.
    ///
    /// Copies the database (pg_dump | pg_restore) into a scratch database
    /// on the same server, applies this build's migrations to the copy,
    /// checks that every table is present with the same rows and that the
    /// records decode, prints a report and drops the copy. Needs the
    /// CREATEDB privilege and pg_dump/pg_restore in PATH. The DSN comes as
    /// for pg-backup and is never printed.
    #[command(after_help = "Example:\n  stacyvm db pg-rehearse --config /etc/stacyvm/config.yaml")]
    PgRehearse {
        /// Postgres DSN (URL or key=value form).
        #[arg(long, hide_env_values = true)]
        dsn: Option<String>,
        /// Config file to read database.dsn from.
        #[arg(long, short = 'c', env = "STACYVM_CONFIG")]
        config: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a database or backup file: integrity, schema version, rows.
    Check {
        /// The file to check (default: the configured database).
        file: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
}

#[derive(Debug, Args)]
pub struct DbArgs {
    /// The SQLite database (default: database.path of the config, or
    /// <server.data_dir>/stacyvm.db).
    #[arg(long)]
    pub database: Option<PathBuf>,
    /// Config file to read database settings from (default lookup
    /// otherwise).
    #[arg(long, short = 'c', env = "STACYVM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The database file `args` points at. Postgres has no file to copy.
pub fn database_path(args: &DbArgs) -> Result<PathBuf> {
    if let Some(p) = &args.database {
        return Ok(p.clone());
    }
    let loaded = config::load(args.config.as_deref(), std::env::vars())?;
    if loaded.config.is_postgres() {
        bail!("database.driver is postgres: back it up with pg_dump (db backup and restore handle SQLite only)");
    }
    Ok(loaded.config.sqlite_path())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The pid of a process holding `db` open in WAL mode, if any.
///
/// Every SQLite connection to a WAL database keeps a shared POSIX lock on
/// the "DMS" byte (offset 128) of the `-shm` file for as long as it is
/// open; asking whether an exclusive lock there would conflict tells
/// whether a server (or any other process) still uses the database. Locks
/// of this process are not reported, which is fine for a CLI.
pub fn holder_pid(db: &Path) -> Option<i32> {
    let shm = backup::sidecar(db, "-shm");
    let f = File::open(&shm).ok()?;
    let mut lk = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 128,
        l_len: 1,
        l_pid: 0,
    };
    nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETLK(&mut lk)).ok()?;
    if lk.l_type == libc::F_UNLCK as libc::c_short {
        None
    } else {
        Some(lk.l_pid)
    }
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn tables_json(info: &backup::DbInfo) -> serde_json::Value {
    info.tables
        .iter()
        .map(|(t, n)| (t.clone(), serde_json::Value::from(*n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

pub async fn run(command: DbCommand) -> Result<()> {
    match command {
        DbCommand::Backup { output, db, force } => {
            let source = database_path(&db)?;
            let r = backup::backup(&source, &output, force)
                .await
                .with_context(|| format!("backing up {}", source.display()))?;
            let out = absolute(&r.output);
            if db.json {
                print_json(&serde_json::json!({
                    "output": out,
                    "source": absolute(&source),
                    "bytes": r.bytes,
                    "schema_version": r.info.schema_version,
                    "integrity": "ok",
                    "tables": tables_json(&r.info),
                }))?;
            } else {
                println!("backup written: {}", out.display());
                eprintln!(
                    "integrity ok, schema version {}, {} bytes",
                    r.info.schema_version, r.bytes
                );
            }
        }
        DbCommand::Restore {
            backup: from,
            db,
            yes,
        } => {
            let target = database_path(&db)?;
            if !yes {
                bail!(
                    "restore replaces {} with {}; stop the server, then re-run with --yes",
                    target.display(),
                    from.display()
                );
            }
            if let Some(pid) = holder_pid(&target) {
                bail!(
                    "{} is open by process {pid} (a running server?); stop it before restoring",
                    target.display()
                );
            }
            let r = backup::restore(&from, &target)
                .await
                .with_context(|| format!("restoring {}", from.display()))?;
            let safety = r.safety_copy.as_deref().map(absolute);
            if db.json {
                print_json(&serde_json::json!({
                    "restored": absolute(&r.target),
                    "from": absolute(&from),
                    "safety_copy": safety,
                    "safety_copy_raw": r.safety_copy_raw,
                    "schema_version": r.info.schema_version,
                    "tables": tables_json(&r.info),
                }))?;
            } else {
                println!("restored: {}", absolute(&r.target).display());
                println!("from backup: {}", absolute(&from).display());
                match &safety {
                    Some(p) => {
                        println!("previous database saved as: {}", p.display());
                        if r.safety_copy_raw {
                            eprintln!("warning: the previous database could not be read consistently; its raw files were kept");
                        }
                    }
                    None => eprintln!("there was no previous database"),
                }
            }
        }
        DbCommand::PgBackup {
            output,
            dsn,
            format,
            config,
            force,
        } => pg_backup(&output, dsn, &format, config.as_deref(), force)?,
        DbCommand::PgRehearse { dsn, config, json } => {
            let dsn = resolve_dsn(dsn, config.as_deref())?;
            crate::pgrehearse::run(&dsn, json).await?;
        }
        DbCommand::Check { file, db } => {
            let path = match file {
                Some(f) => f,
                None => database_path(&db)?,
            };
            let info = backup::verify(&path)
                .await
                .with_context(|| format!("checking {}", path.display()))?;
            if db.json {
                print_json(&serde_json::json!({
                    "file": absolute(&path),
                    "integrity": "ok",
                    "schema_version": info.schema_version,
                    "latest_schema_version": backup::latest_schema_version(),
                    "tables": tables_json(&info),
                }))?;
            } else {
                println!(
                    "{}: integrity ok, schema version {}",
                    absolute(&path).display(),
                    info.schema_version
                );
                for (t, n) in &info.tables {
                    println!("  {t}: {n} row(s)");
                }
            }
        }
    }
    Ok(())
}

/// A DSN split into what may be shown and the password.
#[derive(Debug, PartialEq, Eq)]
pub struct SplitDsn {
    /// The DSN without its password (safe for argv).
    pub without_password: String,
    /// The password, decoded, if there was one.
    pub password: Option<String>,
}

/// Removes the password from a URL (`postgres://user:pw@host/db`) or
/// key=value (`host=db password=pw`) DSN.
pub fn split_dsn(dsn: &str) -> SplitDsn {
    let dsn = dsn.trim();
    if let Some((scheme, rest)) = dsn.split_once("://") {
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            if let Some((user, pw)) = userinfo.split_once(':') {
                return SplitDsn {
                    without_password: format!("{scheme}://{user}@{host}{tail}"),
                    password: Some(percent_decode(pw)),
                };
            }
        }
        return SplitDsn {
            without_password: dsn.to_string(),
            password: None,
        };
    }
    let mut kept = Vec::new();
    let mut password = None;
    for part in dsn.split_whitespace() {
        match part.split_once('=') {
            Some((k, v)) if k.eq_ignore_ascii_case("password") => {
                password = Some(v.trim_matches('\'').to_string());
            }
            _ => kept.push(part),
        }
    }
    SplitDsn {
        without_password: kept.join(" "),
        password,
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(Ok(v)) = s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The DSN: `--dsn`, else `database.dsn` of the config, else
/// `STACYVM_DATABASE_DSN`.
fn resolve_dsn(dsn: Option<String>, config_path: Option<&Path>) -> Result<String> {
    let dsn = match dsn.filter(|d| !d.trim().is_empty()) {
        Some(d) => d,
        None => {
            let from_config = config::load(config_path, std::env::vars())
                .map(|l| l.config.database.dsn.expose().to_string())
                .unwrap_or_default();
            if from_config.trim().is_empty() {
                std::env::var("STACYVM_DATABASE_DSN").unwrap_or_default()
            } else {
                from_config
            }
        }
    };
    if dsn.trim().is_empty() {
        bail!("no Postgres DSN: pass --dsn, set database.dsn or STACYVM_DATABASE_DSN");
    }
    Ok(dsn)
}

fn pg_backup(
    output: &Path,
    dsn: Option<String>,
    format: &str,
    config_path: Option<&Path>,
    force: bool,
) -> Result<()> {
    let dsn = resolve_dsn(dsn, config_path)?;
    match std::fs::symlink_metadata(output) {
        Ok(_) if !force => bail!(
            "{} already exists; pass --force to overwrite it",
            output.display()
        ),
        _ => {}
    }
    let Some(pg_dump) = stacyvm_core::checks::which("pg_dump") else {
        bail!("pg_dump not found in PATH; install the PostgreSQL client (apt-get install postgresql-client)");
    };
    let split = split_dsn(&dsn);
    let shown = crate::redact::url_without_credentials(&split.without_password);
    eprintln!(
        "running: {} --format={format} --file={} --dbname={shown}",
        pg_dump.display(),
        output.display()
    );
    pg_tool(
        &pg_dump,
        &dsn,
        &[
            format!("--format={format}"),
            format!("--file={}", output.display()),
            format!("--dbname={}", split.without_password),
        ],
    )?;
    println!("backup written: {}", absolute(output).display());
    Ok(())
}

/// Runs a Postgres client tool for `dsn`: the password goes through
/// `PGPASSWORD`, never argv, and is scrubbed from any error.
pub fn pg_tool(tool: &Path, dsn: &str, args: &[String]) -> Result<()> {
    let split = split_dsn(dsn);
    let mut cmd = std::process::Command::new(tool);
    cmd.args(args);
    if let Some(pw) = &split.password {
        cmd.env("PGPASSWORD", pw);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", tool.display()))?;
    if !out.status.success() {
        let mut r = crate::redact::Redactor::new();
        r.add_secret(dsn);
        if let Some(pw) = &split.password {
            r.add_secret(pw);
        }
        let name = tool.file_name().unwrap_or_default().to_string_lossy();
        bail!(
            "{name} failed ({}): {}",
            out.status,
            r.text(String::from_utf8_lossy(&out.stderr).trim())
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_passwords_are_split_off() {
        assert_eq!(
            split_dsn("postgres://app:p%40ss@db:5432/stacyvm?sslmode=require"),
            SplitDsn {
                without_password: "postgres://app@db:5432/stacyvm?sslmode=require".into(),
                password: Some("p@ss".into()),
            }
        );
        assert_eq!(
            split_dsn("host=db user=app password='s3cret' dbname=stacyvm"),
            SplitDsn {
                without_password: "host=db user=app dbname=stacyvm".into(),
                password: Some("s3cret".into()),
            }
        );
        assert_eq!(split_dsn("postgres://db/x").password, None);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%e2%82%ac"), "€");
    }
}
