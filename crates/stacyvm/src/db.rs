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
