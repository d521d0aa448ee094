//! `stacyvm db backup|restore` on the real binary: a backup/restore drill
//! under concurrent writes, and every refusal (existing output, directory,
//! missing --yes, corrupt backup, database in use).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, Row, SqliteConnection};
use stacyvm_store::backup::open_rw;
use stacyvm_store::SqliteStore;

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");

fn stacyvm(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env_remove("STACYVM_CONFIG")
        .output()
        .expect("run stacyvm")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Creates a StacyVM database (schema applied) at `path`.
async fn create_db(path: &Path) {
    let store = SqliteStore::open(path).await.expect("open store");
    store.pool().close().await;
}

/// One transaction: a sandbox row and a provider row with the same index,
/// so a torn snapshot would show different counts.
async fn write_pair(c: &mut SqliteConnection, i: i64) {
    let mut tx = c.begin().await.expect("begin");
    sqlx::query("INSERT INTO sandboxes (id, provider, created_at, expires_at, updated_at, metadata) VALUES (?, 'drill', '2026-01-01T00:00:00.000000000Z', '2026-01-02T00:00:00.000000000Z', '2026-01-01T00:00:00.000000000Z', ?)")
        .bind(format!("sb-{i:08}"))
        .bind(format!("{{\"i\":\"{i}\",\"pad\":\"{}\"}}", "x".repeat(200)))
        .execute(&mut *tx)
        .await
        .expect("insert sandbox");
    sqlx::query("INSERT INTO provider_configs (name, config, enabled, updated_at) VALUES (?, '{}', 1, 'now')")
        .bind(format!("p-{i:08}"))
        .execute(&mut *tx)
        .await
        .expect("insert provider");
    tx.commit().await.expect("commit");
}

/// Opens `path` without changing its journal mode.
async fn open_plain(path: &Path) -> SqliteConnection {
    use sqlx::ConnectOptions;
    sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .connect()
        .await
        .expect("open")
}

/// Every row of every table, as text (`quote()` of each column), in a
/// stable order: two databases with equal dumps hold the same data.
async fn dump(path: &Path) -> Vec<String> {
    let mut c = open_plain(path).await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )
    .fetch_all(&mut c)
    .await
    .expect("tables");
    let mut out = Vec::new();
    for t in tables {
        let cols: Vec<String> = sqlx::query(&format!("PRAGMA table_info(\"{t}\")"))
            .fetch_all(&mut c)
            .await
            .expect("columns")
            .iter()
            .map(|r| r.get::<String, _>("name"))
            .collect();
        let expr: Vec<String> = cols.iter().map(|c| format!("quote(\"{c}\")")).collect();
        let q = format!(
            "SELECT {} FROM \"{t}\" ORDER BY rowid",
            expr.join(" || '|' || ")
        );
        for row in sqlx::query_scalar::<_, String>(&q)
            .fetch_all(&mut c)
            .await
            .expect("rows")
        {
            out.push(format!("{t}: {row}"));
        }
    }
    c.close().await.expect("close");
    out
}

async fn count(path: &Path, table: &str) -> (i64, i64) {
    let mut c = open_plain(path).await;
    let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(&mut c)
        .await
        .expect("count");
    let max: Option<String> = sqlx::query_scalar(&format!(
        "SELECT MAX({}) FROM {table}",
        if table == "sandboxes" { "id" } else { "name" }
    ))
    .fetch_one(&mut c)
    .await
    .expect("max");
    c.close().await.expect("close");
    let max_index = max
        .and_then(|m| m.rsplit('-').next().and_then(|n| n.parse::<i64>().ok()))
        .unwrap_or(-1);
    (n, max_index)
}

fn line_value(o: &Output, prefix: &str) -> PathBuf {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in\n{}", text(o)));
    PathBuf::from(line.trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_concurrent_writes_then_restore_matches() {
    let dir = tempfile::tempdir().expect("tmp");
    let live = dir.path().join("data/stacyvm.db");
    create_db(&live).await;

    // A writer commits pairs of rows until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicI64::new(0));
    let writer = {
        let (stop, written, live) = (stop.clone(), written.clone(), live.clone());
        tokio::spawn(async move {
            let mut c = open_rw(&live).await.expect("writer open");
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                write_pair(&mut c, i).await;
                i += 1;
                written.store(i, Ordering::SeqCst);
            }
            c.close().await.expect("writer close");
        })
    };
    while written.load(Ordering::SeqCst) < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before_backup = written.load(Ordering::SeqCst);
    let backup = dir.path().join("backups/nightly.db");
    let (d, b, l) = (dir.path().to_path_buf(), backup.clone(), live.clone());
    let out = tokio::task::spawn_blocking(move || {
        stacyvm(
            &d,
            &[
                "db",
                "backup",
                b.to_str().expect("utf8"),
                "--database",
                l.to_str().expect("utf8"),
            ],
        )
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(line_value(&out, "backup written: "), backup);
    // Let the writer go on after the backup, then stop it.
    let after_backup = written.load(Ordering::SeqCst);
    while written.load(Ordering::SeqCst) < after_backup + 50 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer");

    // The backup is one consistent snapshot: both tables hold the same
    // contiguous prefix 0..k, and k covers everything committed before
    // the backup started.
    let (sandboxes, max_sb) = count(&backup, "sandboxes").await;
    let (providers, max_p) = count(&backup, "provider_configs").await;
    assert_eq!(sandboxes, providers, "torn snapshot");
    assert_eq!(max_sb, sandboxes - 1, "gap in the sandboxes rows");
    assert_eq!(max_p, providers - 1, "gap in the provider rows");
    assert!(sandboxes >= before_backup, "{sandboxes} < {before_backup}");
    let live_final = dump(&live).await;
    let backup_dump = dump(&backup).await;
    assert!(live_final.len() > backup_dump.len());

    // Restore and compare: the live database now equals the backup, and
    // the data written after the backup survives in the safety copy.
    let out = stacyvm(
        dir.path(),
        &[
            "db",
            "restore",
            backup.to_str().expect("utf8"),
            "--database",
            live.to_str().expect("utf8"),
            "--yes",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let safety = line_value(&out, "previous database saved as: ");
    // Stale WAL pages of the old database are gone.
    assert!(!stacyvm_store::backup::sidecar(&live, "-wal").exists());
    assert!(
        safety.to_string_lossy().contains("stacyvm.db.pre-restore-"),
        "{}",
        safety.display()
    );
    assert_eq!(dump(&live).await, backup_dump);
    assert_eq!(dump(&safety).await, live_final);
    use std::os::unix::fs::PermissionsExt;
    for p in [&live, &safety, &backup] {
        let mode = std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
    // The server's store opens the restored database.
    let store = SqliteStore::open(&live).await.expect("reopen");
    store.pool().close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_leave_everything_untouched() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let live = d.join("stacyvm.db");
    create_db(&live).await;
    let mut c = open_rw(&live).await.expect("open");
    for i in 0..10 {
        write_pair(&mut c, i).await;
    }
    c.close().await.expect("close");
    let live_s = live.to_str().expect("utf8");
    let original = std::fs::read(&live).expect("read");

    // Existing output without --force, and a directory even with --force.
    let existing = d.join("existing.db");
    std::fs::write(&existing, b"keep me").expect("write");
    let out = stacyvm(d, &["db", "backup", "existing.db", "--database", live_s]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--force"), "{}", text(&out));
    assert_eq!(std::fs::read(&existing).expect("read"), b"keep me");
    std::fs::create_dir(d.join("adir")).expect("mkdir");
    let out = stacyvm(
        d,
        &["db", "backup", "adir", "--database", live_s, "--force"],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("is a directory"), "{}", text(&out));
    let out = stacyvm(
        d,
        &[
            "db",
            "backup",
            "existing.db",
            "--database",
            live_s,
            "--force",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let good = d.join("existing.db");

    // Restore needs --yes.
    let out = stacyvm(d, &["db", "restore", "existing.db", "--database", live_s]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--yes"), "{}", text(&out));

    // A corrupt backup: a valid one with garbage written into its pages.
    let mut bytes = std::fs::read(&good).expect("read");
    let len = bytes.len();
    for b in &mut bytes[len / 2..] {
        *b = 0xa5;
    }
    std::fs::write(d.join("corrupt.db"), &bytes).expect("write");
    std::fs::write(d.join("notsqlite.db"), b"hello, not a database").expect("write");
    for bad in ["corrupt.db", "notsqlite.db", "missing.db"] {
        let out = stacyvm(d, &["db", "restore", bad, "--database", live_s, "--yes"]);
        assert!(!out.status.success(), "{bad}: {}", text(&out));
        assert_eq!(std::fs::read(&live).expect("read"), original, "{bad}");
    }
    let names: Vec<String> = std::fs::read_dir(d)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("pre-restore")),
        "{names:?}"
    );

    // A process holding the database open (as a running server does).
    let mut holder = open_rw(&live).await.expect("open");
    sqlx::query("SELECT COUNT(*) FROM sandboxes")
        .execute(&mut holder)
        .await
        .expect("read");
    let out = stacyvm(
        d,
        &[
            "db",
            "restore",
            "existing.db",
            "--database",
            live_s,
            "--yes",
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("open by process {}", std::process::id())),
        "{}",
        text(&out)
    );
    holder.close().await.expect("close");
    let out = stacyvm(
        d,
        &[
            "db",
            "restore",
            "existing.db",
            "--database",
            live_s,
            "--yes",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));

    // `db check` reports a sound file and refuses a corrupt one.
    let out = stacyvm(d, &["db", "check", "existing.db", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["integrity"], "ok");
    assert_eq!(v["tables"]["sandboxes"], 10);
    let out = stacyvm(d, &["db", "check", "corrupt.db"]);
    assert!(!out.status.success(), "{}", text(&out));
}

const HARDENED: &str = "auth:
  enabled: true
  api_key: 0123456789abcdef0123456789abcdef-api
  admin_api_key: 0123456789abcdef0123456789abcdef-adm
  admin_fallback_enabled: false
  admin_audit_retention: 720h
server:
  cors_allowed_origins: [\"https://app.example.com\"]
rate_limit:
  enabled: true
database:
  path: /var/lib/stacyvm/stacyvm.db
defaults:
  max_sandboxes: 20
  max_sandboxes_per_owner: 4
  default_exec_timeout: 60s
logging:
  format: json
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_rehearsal_checks_without_changing_anything() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    std::fs::write(d.join("prod.yaml"), HARDENED).expect("config");
    let live = d.join("stacyvm.db");
    create_db(&live).await;
    let mut c = open_rw(&live).await.expect("open");
    write_pair(&mut c, 0).await;
    c.close().await.expect("close");
    let before = std::fs::read(&live).expect("read");
    let live_s = live.to_str().expect("utf8");
    let out = stacyvm(
        d,
        &[
            "upgrade",
            "rehearse",
            "--config",
            "prod.yaml",
            "--database",
            live_s,
            "--backup-output",
            "pre-upgrade.db",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for want in [
        "== config lint (production) ==",
        "== database ==",
        "[PASS] database.integrity: ok",
        "[PASS] database.migrations: a scratch copy migrated",
        "[PASS] backup.output: pre-upgrade.db is free",
        "== recommended steps ==",
        "1. Back up the database while the server still runs: stacyvm db backup pre-upgrade.db",
        "6. If anything fails",
    ] {
        assert!(stdout.contains(want), "{want:?} missing:\n{}", text(&out));
    }
    // Nothing was written: same database bytes, no backup, no scratch dir.
    assert_eq!(std::fs::read(&live).expect("read"), before);
    let names: Vec<String> = std::fs::read_dir(d)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains("pre-upgrade") || n.contains("rehearsal")),
        "{names:?}"
    );

    // An existing backup output and a corrupt database are failures.
    std::fs::write(d.join("pre-upgrade.db"), b"old").expect("write");
    let out = stacyvm(
        d,
        &[
            "upgrade",
            "rehearse",
            "--config",
            "prod.yaml",
            "--database",
            live_s,
            "--backup-output",
            "pre-upgrade.db",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], false);
    assert_eq!(v["steps"].as_array().map(Vec::len), Some(6));
    let backup_section = v["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .find(|s| s["name"] == "backup")
        .expect("backup section");
    assert!(backup_section["report"]["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .any(|c| c["name"] == "backup.output" && c["status"] == "fail"));
    std::fs::write(d.join("broken.db"), vec![1u8; 8192]).expect("write");
    let out = stacyvm(
        d,
        &[
            "upgrade",
            "rehearse",
            "--config",
            "prod.yaml",
            "--database",
            "broken.db",
            "--backup-output",
            "x.db",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("[FAIL] database.integrity"),
        "{}",
        text(&out)
    );
    // The default (production-weak) config fails the lint section.
    let out = stacyvm(
        d,
        &[
            "upgrade",
            "rehearse",
            "--database",
            live_s,
            "--backup-output",
            "y.db",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("[FAIL] auth.api_key"),
        "{}",
        text(&out)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A server process, killed if the test fails before stopping it.
struct Served(std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `stacyvm serve` on the mock provider (no root or kernel features
/// needed), with its data under `data`.
fn serve(data: &Path, port: u16) -> Served {
    let log = std::fs::File::create(data.join(format!("server-{port}.log"))).expect("log");
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").current_dir(data).env("HOME", data);
    for (k, _) in std::env::vars() {
        if k.starts_with("STACYVM_") {
            cmd.env_remove(k);
        }
    }
    let child = Served(
        cmd.env("STACYVM_SERVER_HOST", "127.0.0.1")
            .env("STACYVM_SERVER_PORT", port.to_string())
            .env("STACYVM_SERVER_DATA_DIR", data)
            .env("STACYVM_PROVIDERS_DEFAULT", "mock")
            .env("STACYVM_PROVIDERS_MOCK_ENABLED", "true")
            .env("STACYVM_PROVIDERS_NATIVE_ENABLED", "false")
            .env("STACYVM_LOGGING_LEVEL", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn serve"),
    );
    // Wait until it listens (the loop ends when it does; no timing assertion).
    for _ in 0..600 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("stacyvm serve did not listen on {port}");
}

/// Stops the server with SIGTERM (a graceful shutdown) and waits.
fn stop(mut s: Served) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(s.0.id()).expect("pid"));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = s.0.wait();
}

/// The drill against a real server: sandboxes are created through the API
/// while `db backup` runs; restore is refused while the server holds the
/// database; after it stops, the restore matches the backup row for row
/// and the server starts on it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_against_a_running_server() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let port = free_port();
    let server = serve(&data, port);
    let url = format!("http://127.0.0.1:{port}");
    let client = stacyvm_client::Client::new(&url, None).expect("client");

    let stop_flag = Arc::new(AtomicBool::new(false));
    let created = Arc::new(AtomicI64::new(0));
    let writer = {
        let (stop_flag, created, client) = (stop_flag.clone(), created.clone(), client.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            while !stop_flag.load(Ordering::SeqCst) {
                let req = stacyvm_api::SpawnRequest {
                    image: "drill".into(),
                    ..Default::default()
                };
                let sb = client.spawn(&req).await.expect("spawn");
                ids.push(sb.id);
                created.fetch_add(1, Ordering::SeqCst);
            }
            ids
        })
    };
    while created.load(Ordering::SeqCst) < 5 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = created.load(Ordering::SeqCst);
    let db = data.join("stacyvm.db");
    let backup = dir.path().join("drill.db");
    let (d, b, l) = (dir.path().to_path_buf(), backup.clone(), db.clone());
    let out = tokio::task::spawn_blocking(move || {
        stacyvm(
            &d,
            &[
                "db",
                "backup",
                b.to_str().expect("utf8"),
                "--database",
                l.to_str().expect("utf8"),
            ],
        )
    })
    .await
    .expect("join");
    assert!(out.status.success(), "{}", text(&out));
    let after = created.load(Ordering::SeqCst);
    while created.load(Ordering::SeqCst) < after + 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_flag.store(true, Ordering::SeqCst);
    let ids = writer.await.expect("writer");

    // Every sandbox created before the backup started is in it.
    let mut c = open_plain(&backup).await;
    let in_backup: Vec<String> = sqlx::query_scalar("SELECT id FROM sandboxes ORDER BY id")
        .fetch_all(&mut c)
        .await
        .expect("ids");
    c.close().await.expect("close");
    for id in &ids[..usize::try_from(before).expect("count")] {
        assert!(in_backup.contains(id), "{id} missing from the backup");
    }
    assert!(
        in_backup.len() < ids.len(),
        "sandboxes created after the backup"
    );

    // The running server holds the database: restore refuses.
    let db_s = db.to_str().expect("utf8");
    let out = stacyvm(
        dir.path(),
        &["db", "restore", "drill.db", "--database", db_s, "--yes"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("open by process {}", server.0.id())),
        "{}",
        text(&out)
    );
    stop(server);

    let out = stacyvm(
        dir.path(),
        &["db", "restore", "drill.db", "--database", db_s, "--yes"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(dump(&db).await, dump(&backup).await);

    // The server starts on the restored database and knows its sandboxes.
    let server = serve(&data, port);
    let listed: Vec<String> = client
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|s| s.id)
        .collect();
    for id in &in_backup {
        assert!(
            listed.contains(id),
            "{id} not listed after restore: {listed:?}"
        );
    }
    stop(server);
}
