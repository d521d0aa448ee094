//! Online backup and offline restore of the SQLite database.
//!
//! Backup: the source is opened read-only and copied with `VACUUM INTO`,
//! which reads one consistent snapshot (WAL readers do not block writers,
//! so a running server keeps working). The copy is written to a temporary
//! file next to the output, checked with `PRAGMA integrity_check`, fsynced
//! and only then renamed into place, so the output path never holds a
//! half-written or unchecked file.
//!
//! Restore (server stopped): the backup is checked first and nothing is
//! touched if it is not a sound StacyVM database. The current database is
//! then saved as `<target>.pre-restore-<UTC time>` (a consistent
//! `VACUUM INTO` copy that includes committed WAL content, or a raw copy
//! of the files if the current database is too damaged for that), the
//! `-wal`/`-shm` sidecars are removed so SQLite cannot replay stale pages
//! over the restored file, and the backup is copied (again with `VACUUM
//! INTO`) to a temporary file, checked, fsynced and renamed over the
//! target. Every file written is mode 0600 and uses a rollback journal, so
//! it is complete without sidecar files.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection, SqliteConnection};

use crate::sqlite::MIGRATIONS;

/// A failed backup, restore or check. Messages name the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("database {0} does not exist")]
    SourceMissing(PathBuf),
    #[error("{0} is a directory; give the path of the backup file to write")]
    OutputIsDirectory(PathBuf),
    #[error("{0} already exists; pass --force to overwrite it")]
    OutputExists(PathBuf),
    #[error("the backup output {0} is the database itself")]
    SameFile(PathBuf),
    #[error("backup {0} does not exist or is not a file")]
    BackupMissing(PathBuf),
    #[error("{path} failed the integrity check: {detail}")]
    Integrity { path: PathBuf, detail: String },
    #[error("{path} is not a StacyVM database (no schema_migrations table)")]
    NotStacyvm { path: PathBuf },
    #[error(
        "{path} has schema version {found}, newer than this build's {known}; use a newer stacyvm"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {path}")]
    Sql {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Io { what, path, source }
}

fn sql_err(what: &'static str, path: &Path) -> impl FnOnce(sqlx::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Sql { what, path, source }
}

/// The newest schema version this build knows.
pub fn latest_schema_version() -> i64 {
    MIGRATIONS.iter().map(|(v, _)| *v).max().unwrap_or(0)
}

/// What [`inspect`] found in a database file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbInfo {
    /// Highest applied migration (0 if none).
    pub schema_version: i64,
    /// Rows per table, for comparing a backup with its source.
    pub tables: Vec<(String, i64)>,
}

/// Path of a sidecar file: `<db>-wal`, `<db>-shm`, `<db>-journal`.
pub fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

async fn open_ro(path: &Path) -> Result<SqliteConnection, BackupError> {
    SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(sql_err("opening", path))
}

/// Runs `PRAGMA integrity_check`; anything but a single `ok` is an error
/// carrying SQLite's findings. Files that are not SQLite databases fail
/// here too ("file is not a database").
pub async fn integrity_check(path: &Path) -> Result<(), BackupError> {
    if !path.is_file() {
        return Err(BackupError::BackupMissing(path.to_path_buf()));
    }
    let mut conn = open_ro(path).await?;
    let rows: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await;
    let _ = conn.close().await;
    let rows = rows.map_err(|e| BackupError::Integrity {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if rows.len() == 1 && rows[0] == "ok" {
        Ok(())
    } else {
        Err(BackupError::Integrity {
            path: path.to_path_buf(),
            detail: rows.join("; "),
        })
    }
}

/// Reads the schema version and the row count of every table.
pub async fn inspect(path: &Path) -> Result<DbInfo, BackupError> {
    let mut conn = open_ro(path).await?;
    let result = inspect_conn(&mut conn, path).await;
    let _ = conn.close().await;
    result
}

async fn inspect_conn(conn: &mut SqliteConnection, path: &Path) -> Result<DbInfo, BackupError> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(sql_err("reading the schema of", path))?;
    if !names.iter().any(|n| n == "schema_migrations") {
        return Err(BackupError::NotStacyvm {
            path: path.to_path_buf(),
        });
    }
    let schema_version: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            .fetch_one(&mut *conn)
            .await
            .map_err(sql_err("reading schema_migrations of", path))?;
    let mut tables = Vec::with_capacity(names.len());
    for name in names {
        // Table names come from sqlite_master; quote them as identifiers.
        let q = format!("SELECT COUNT(*) FROM \"{}\"", name.replace('"', "\"\""));
        let n: i64 = sqlx::query_scalar(&q)
            .fetch_one(&mut *conn)
            .await
            .map_err(sql_err("counting rows of", path))?;
        tables.push((name, n));
    }
    Ok(DbInfo {
        schema_version,
        tables,
    })
}

/// Checks that `path` is a sound StacyVM database this build can open.
pub async fn verify(path: &Path) -> Result<DbInfo, BackupError> {
    integrity_check(path).await?;
    let info = inspect(path).await?;
    let known = latest_schema_version();
    if info.schema_version > known {
        return Err(BackupError::TooNew {
            path: path.to_path_buf(),
            found: info.schema_version,
            known,
        });
    }
    Ok(info)
}

fn fsync_file(path: &Path) -> Result<(), BackupError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_err("syncing", path))
}

fn fsync_dir(dir: &Path) -> Result<(), BackupError> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err("syncing directory", dir))
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A temporary sibling of `path` (same directory, so rename is atomic).
/// A temp name next to `path` that others cannot predict (128 random
/// bits), so nothing can be planted there in advance (F-20).
fn temp_sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "stacyvm.db".into());
    parent(path).join(format!(".{name}.{tag}-{}", random_hex()))
}

fn random_hex() -> String {
    use std::io::Read as _;
    let mut b = [0u8; 16];
    let read = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_err() {
        // Without /dev/urandom: still unique; exclusive creation below
        // keeps it safe even if guessed.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        b = (nanos ^ u128::from(std::process::id())).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Creates `path` empty with mode 0600, failing if anything is already
/// there (`O_CREAT|O_EXCL` also fails on a symlink, dangling or not), so
/// a copy is never readable by others while it is written and never
/// lands where a planted link points.
fn create_private_empty(path: &Path) -> Result<(), BackupError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(io_err("creating", path))
}

fn remove_if_exists(path: &Path) -> Result<(), BackupError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", path)(e)),
    }
}

fn create_parent(path: &Path) -> Result<(), BackupError> {
    let dir = parent(path);
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&dir)
            .map_err(io_err("creating directory", &dir))?;
    }
    Ok(())
}

/// `VACUUM INTO` from `source` into `dest` (which must not exist), then an
/// integrity check and fsync of `dest`.
async fn vacuum_into(source: &Path, dest: &Path) -> Result<(), BackupError> {
    // SQLite fills an existing empty file, keeping its 0600 mode.
    create_private_empty(dest)?;
    let mut conn = open_ro(source).await?;
    let dest_str = dest.to_string_lossy().into_owned();
    let result = sqlx::query("VACUUM INTO ?")
        .bind(&dest_str)
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    result.map_err(sql_err("copying (VACUUM INTO) from", source))?;
    // The copy inherits WAL mode; switch it to a rollback journal so the
    // file is self-contained and opening it (even read-only) leaves no
    // -wal/-shm files behind. The server switches back to WAL on open.
    let mut conn = SqliteConnectOptions::new()
        .filename(dest)
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(sql_err("opening", dest))?;
    let mode = sqlx::query_scalar::<_, String>("PRAGMA journal_mode = DELETE")
        .fetch_one(&mut conn)
        .await;
    let _ = conn.close().await;
    mode.map_err(sql_err("setting the journal mode of", dest))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(0o600))
        .map_err(io_err("setting permissions of", dest))?;
    integrity_check(dest).await?;
    fsync_file(dest)
}

/// The result of [`backup`].
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub output: PathBuf,
    pub info: DbInfo,
    pub bytes: u64,
}

/// Backs `source` up to `output` (see the module docs). `force` replaces an
/// existing output file; a directory is always refused.
pub async fn backup(
    source: &Path,
    output: &Path,
    force: bool,
) -> Result<BackupReport, BackupError> {
    if !source.is_file() {
        return Err(BackupError::SourceMissing(source.to_path_buf()));
    }
    match fs::symlink_metadata(output) {
        Ok(m) if m.is_dir() => return Err(BackupError::OutputIsDirectory(output.to_path_buf())),
        Ok(_) if !force => return Err(BackupError::OutputExists(output.to_path_buf())),
        Ok(_) => {
            let same = match (fs::canonicalize(source), fs::canonicalize(output)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
            if same {
                return Err(BackupError::SameFile(output.to_path_buf()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("checking", output)(e)),
    }
    create_parent(output)?;
    let tmp = temp_sibling(output, "backup");
    if let Err(e) = vacuum_into(source, &tmp).await {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let info = match inspect(&tmp).await {
        Ok(i) => i,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if force {
        for suffix in ["-wal", "-shm", "-journal"] {
            remove_if_exists(&sidecar(output, suffix))?;
        }
    }
    fs::rename(&tmp, output).map_err(io_err("moving the backup to", output))?;
    fsync_dir(&parent(output))?;
    let bytes = fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(BackupReport {
        output: output.to_path_buf(),
        info,
        bytes,
    })
}

/// The result of [`restore`].
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub target: PathBuf,
    /// Where the previous database was saved, if there was one.
    pub safety_copy: Option<PathBuf>,
    /// Whether the safety copy is a raw file copy (the current database
    /// could not be read consistently).
    pub safety_copy_raw: bool,
    pub info: DbInfo,
}

/// Copies `from` to `to` with mode 0600 and fsyncs it.
fn copy_private(from: &Path, to: &Path) -> Result<(), BackupError> {
    let mut src = File::open(from).map_err(io_err("opening", from))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(io_err("creating", to))?;
    io::copy(&mut src, &mut dst).map_err(io_err("writing", to))?;
    dst.sync_all().map_err(io_err("syncing", to))
}

/// Saves the current database before it is replaced.
async fn safety_copy(target: &Path) -> Result<(PathBuf, bool), BackupError> {
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ");
    let mut s = target.as_os_str().to_owned();
    s.push(format!(".pre-restore-{stamp}"));
    let mut copy = PathBuf::from(s);
    let mut n = 1;
    while fs::symlink_metadata(&copy).is_ok() {
        let mut s = target.as_os_str().to_owned();
        s.push(format!(".pre-restore-{stamp}-{n}"));
        copy = PathBuf::from(s);
        n += 1;
    }
    // A consistent copy includes transactions still in the WAL.
    if vacuum_into(target, &copy).await.is_ok() {
        return Ok((copy, false));
    }
    let _ = fs::remove_file(&copy);
    // The current database is damaged: keep its bytes as they are, WAL
    // included, so nothing is lost.
    copy_private(target, &copy)?;
    let wal = sidecar(target, "-wal");
    if wal.is_file() {
        copy_private(&wal, &sidecar(&copy, "-wal"))?;
    }
    Ok((copy, true))
}

/// Restores `backup` over `target` (see the module docs). The caller has
/// made sure the server is stopped and the operator confirmed.
pub async fn restore(backup: &Path, target: &Path) -> Result<RestoreReport, BackupError> {
    if !backup.is_file() {
        return Err(BackupError::BackupMissing(backup.to_path_buf()));
    }
    // Everything below may change files; check the backup first.
    let info = verify(backup).await?;
    if fs::symlink_metadata(target).is_ok_and(|m| m.is_dir()) {
        return Err(BackupError::OutputIsDirectory(target.to_path_buf()));
    }
    if let (Ok(a), Ok(b)) = (fs::canonicalize(backup), fs::canonicalize(target)) {
        if a == b {
            return Err(BackupError::SameFile(target.to_path_buf()));
        }
    }
    create_parent(target)?;
    let tmp = temp_sibling(target, "restore");
    // A fresh consistent copy rather than a byte copy: it includes a WAL
    // the backup file may have next to it and is a self-contained file.
    if let Err(e) = vacuum_into(backup, &tmp).await {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let (safety, raw) = if target.is_file() {
        match safety_copy(target).await {
            Ok((p, raw)) => (Some(p), raw),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
    } else {
        (None, false)
    };
    for suffix in ["-wal", "-shm", "-journal"] {
        remove_if_exists(&sidecar(target, suffix))?;
    }
    fs::rename(&tmp, target).map_err(io_err("moving the restored database to", target))?;
    fsync_dir(&parent(target))?;
    integrity_check(target).await?;
    Ok(RestoreReport {
        target: target.to_path_buf(),
        safety_copy: safety,
        safety_copy_raw: raw,
        info,
    })
}

/// Copies `source` to a scratch file in `dir` and applies this build's
/// pending migrations to it: the database half of an upgrade rehearsal.
/// Returns (version before, version after).
pub async fn rehearse_migrations(source: &Path, dir: &Path) -> Result<(i64, i64), BackupError> {
    let scratch = dir.join("rehearsal.db");
    backup(source, &scratch, false).await?;
    let before = inspect(&scratch).await?.schema_version;
    let opened = crate::SqliteStore::open(&scratch).await;
    match opened {
        Ok(store) => store.pool().close().await,
        Err(e) => {
            return Err(BackupError::Integrity {
                path: scratch,
                detail: format!("applying migrations failed: {e}"),
            })
        }
    }
    integrity_check(&scratch).await?;
    let after = inspect(&scratch).await?.schema_version;
    Ok((before, after))
}

/// Opens (creating if needed) `path` read-write in WAL mode, for tests and
/// tools that write data.
pub async fn open_rw(path: &Path) -> Result<SqliteConnection, BackupError> {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(sql_err("opening", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SqliteStore;

    async fn seeded(dir: &Path) -> PathBuf {
        let db = dir.join("live.db");
        let store = SqliteStore::open(&db).await.expect("open");
        sqlx::query("INSERT INTO provider_configs (name, config, enabled, updated_at) VALUES ('a', '{}', 1, 'now')")
            .execute(store.pool())
            .await
            .expect("insert");
        // Keep the row in the WAL: the pool stays open, nothing checkpoints.
        std::mem::forget(store);
        db
    }

    /// F-20: temp copies have names nobody can predict, are 0600 from
    /// their first byte, and are never written through a planted link.
    #[tokio::test]
    async fn temp_copies_are_private_unpredictable_and_never_follow_links() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = seeded(dir.path()).await;
        let out = dir.path().join("backup.db");
        let a = temp_sibling(&out, "backup");
        let b = temp_sibling(&out, "backup");
        assert_ne!(a, b);
        let name = a.file_name().expect("name").to_string_lossy().into_owned();
        assert!(
            !name.ends_with(&format!("-{}", std::process::id())),
            "{name}"
        );
        assert!(name.len() >= ".backup.db.backup-".len() + 32, "{name}");
        // Created 0600 before any data is written.
        create_private_empty(&a).expect("create");
        let mode = fs::metadata(&a).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::remove_file(&a).expect("rm");
        // A planted symlink (dangling or not) is refused, its target kept.
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").expect("victim");
        std::os::unix::fs::symlink(&victim, &a).expect("link");
        assert!(vacuum_into(&db, &a).await.is_err());
        assert_eq!(fs::read(&victim).expect("read"), b"keep");
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).expect("link");
        assert!(vacuum_into(&db, &dangling).await.is_err());
        assert!(fs::symlink_metadata(dir.path().join("nowhere")).is_err());
        // A real copy is 0600.
        let copy = dir.path().join("copy.db");
        vacuum_into(&db, &copy).await.expect("vacuum");
        let mode = fs::metadata(&copy).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn backup_includes_wal_content_and_refuses_overwrites() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = seeded(dir.path()).await;
        assert!(sidecar(&db, "-wal").is_file());
        let out = dir.path().join("b/backup.db");
        let r = backup(&db, &out, false).await.expect("backup");
        let n = r
            .info
            .tables
            .iter()
            .find(|(t, _)| t == "provider_configs")
            .map(|(_, n)| *n);
        assert_eq!(n, Some(1));
        assert_eq!(
            fs::metadata(&out).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let e = backup(&db, &out, false).await.expect_err("exists");
        assert!(matches!(e, BackupError::OutputExists(_)), "{e}");
        backup(&db, &out, true).await.expect("forced");
        let e = backup(&db, dir.path(), true).await.expect_err("dir");
        assert!(matches!(e, BackupError::OutputIsDirectory(_)), "{e}");
        let e = backup(&db, &db, true).await.expect_err("same");
        assert!(matches!(e, BackupError::SameFile(_)), "{e}");
        let e = backup(&dir.path().join("nope.db"), &dir.path().join("x.db"), false)
            .await
            .expect_err("missing");
        assert!(matches!(e, BackupError::SourceMissing(_)), "{e}");
    }

    #[tokio::test]
    async fn restore_refuses_corrupt_and_foreign_files_without_touching_the_target() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = seeded(dir.path()).await;
        let before = fs::read(&db).expect("read");
        let wal_before = fs::read(sidecar(&db, "-wal")).expect("wal");
        let junk = dir.path().join("junk.db");
        fs::write(&junk, vec![0x5a; 8192]).expect("junk");
        let e = restore(&junk, &db).await.expect_err("junk");
        assert!(matches!(e, BackupError::Integrity { .. }), "{e}");
        // A real SQLite file that is not a StacyVM database.
        let foreign = dir.path().join("foreign.db");
        let mut c = open_rw(&foreign).await.expect("open");
        sqlx::query("CREATE TABLE t (x)")
            .execute(&mut c)
            .await
            .expect("create");
        c.close().await.expect("close");
        let e = restore(&foreign, &db).await.expect_err("foreign");
        assert!(matches!(e, BackupError::NotStacyvm { .. }), "{e}");
        // A truncated copy of a real backup.
        let good = dir.path().join("good.db");
        backup(&db, &good, false).await.expect("backup");
        let bytes = fs::read(&good).expect("read");
        let cut = dir.path().join("cut.db");
        fs::write(&cut, &bytes[..bytes.len() / 2]).expect("cut");
        assert!(restore(&cut, &db).await.is_err());
        assert_eq!(fs::read(&db).expect("read"), before);
        assert_eq!(fs::read(sidecar(&db, "-wal")).expect("wal"), wal_before);
        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains("pre-restore")),
            "{names:?}"
        );
    }

    async fn provider_rows(path: &Path) -> i64 {
        inspect(path)
            .await
            .expect("inspect")
            .tables
            .iter()
            .find(|(t, _)| t == "provider_configs")
            .map_or(-1, |(_, n)| *n)
    }

    #[tokio::test]
    async fn restore_keeps_wal_only_data_in_the_safety_copy() {
        let dir = tempfile::tempdir().expect("tmp");
        // An empty StacyVM database as the backup.
        let empty = dir.path().join("empty.db");
        let store = SqliteStore::open(&empty).await.expect("open");
        store.pool().close().await;
        let backup_file = dir.path().join("backup.db");
        backup(&empty, &backup_file, false).await.expect("backup");
        // The live database has a committed row that is still only in its
        // WAL (as after a crash).
        let db = seeded(dir.path()).await;
        assert!(fs::metadata(sidecar(&db, "-wal")).expect("wal").len() > 0);
        let r = restore(&backup_file, &db).await.expect("restore");
        let safety = r.safety_copy.expect("safety copy");
        assert!(!r.safety_copy_raw);
        assert_eq!(provider_rows(&safety).await, 1);
        assert_eq!(provider_rows(&db).await, 0);
        assert!(!sidecar(&db, "-wal").exists());
        // A fresh machine: no database yet, parent directories created.
        let fresh = dir.path().join("new/data/stacyvm.db");
        let r = restore(&backup_file, &fresh).await.expect("restore fresh");
        assert!(r.safety_copy.is_none());
        assert_eq!(provider_rows(&fresh).await, 0);
    }
}
