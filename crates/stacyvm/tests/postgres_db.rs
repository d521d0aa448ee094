//! `stacyvm db pg-backup` and `db pg-rehearse` against a real Postgres
//! (`STACYVM_TEST_PG_DSN`; `scripts/test` starts a throwaway server).

use std::process::{Command, Output};

use sqlx::Connection;
use stacyvm_core::store::Store;
use stacyvm_store::{testpg, PostgresStore};

const BIN: &str = env!("CARGO_BIN_EXE_stacyvm");

fn stacyvm(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("STACYVM_DATABASE_DSN")
        .envs(env.iter().copied())
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("run stacyvm")
}

fn password_of(dsn: &str) -> String {
    let rest = dsn.split_once("://").expect("url dsn").1;
    let userinfo = rest.split_once('@').expect("userinfo").0;
    userinfo.split_once(':').expect("password").1.to_string()
}

fn all_output(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn scratch_databases() -> Vec<String> {
    let mut c = sqlx::PgConnection::connect(&testpg::admin_dsn())
        .await
        .expect("connect");
    sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'stacyvm_rehearse_%'")
        .fetch_all(&mut c)
        .await
        .expect("list databases")
}

#[tokio::test]
async fn pg_backup_dumps_without_printing_the_password() {
    let dsn = testpg::fresh_database().await;
    let store = PostgresStore::connect(&dsn).await.expect("connect");
    stacyvm_store::contract::insert_sample(&store, "sb-0000b4c1").await;
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("dump.sql");
    let o = stacyvm(
        &["db", "pg-backup", out.to_str().expect("utf8")],
        &[("STACYVM_DATABASE_DSN", &dsn)],
    );
    let text = all_output(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        !text.contains(&password_of(&dsn)),
        "password printed: {text}"
    );
    assert!(text.contains("backup written"), "{text}");
    let dump = std::fs::read_to_string(&out).expect("dump");
    assert!(dump.contains("sb-0000b4c1"), "the dump holds the rows");
    // An existing output is refused; a wrong password fails without echoing it.
    let o = stacyvm(
        &[
            "db",
            "pg-backup",
            out.to_str().expect("utf8"),
            "--dsn",
            &dsn,
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(all_output(&o).contains("already exists"));
    let wrong = dsn.replace(&password_of(&dsn), "not-the-password-42");
    let o = stacyvm(
        &[
            "db",
            "pg-backup",
            dir.path().join("x.sql").to_str().expect("utf8"),
            "--dsn",
            &wrong,
        ],
        &[],
    );
    let text = all_output(&o);
    assert!(!o.status.success(), "{text}");
    assert!(!text.contains("not-the-password-42"), "{text}");
    assert!(text.contains("pg_dump failed"), "{text}");
}

#[tokio::test]
async fn pg_rehearse_migrates_a_copy_and_leaves_the_source_alone() {
    let dsn = testpg::fresh_database().await;
    let store = PostgresStore::connect(&dsn).await.expect("connect");
    stacyvm_store::contract::insert_sample(&store, "sb-0000c0de").await;
    // Make the source look like an older release: without migrations 3 and 4.
    sqlx::raw_sql(
        "DROP TABLE snapshots; DROP TABLE sandbox_ports; DROP TABLE preview_tokens; \
         DELETE FROM schema_migrations WHERE version >= 3",
    )
    .execute(store.pool())
    .await
    .expect("downgrade");
    let o = stacyvm(&["db", "pg-rehearse", "--dsn", &dsn, "--json"], &[]);
    let text = all_output(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        !text.contains(&password_of(&dsn)),
        "password printed: {text}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["schema_version"], 2);
    let detail = |name: &str| {
        report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {report}"))["detail"]
            .as_str()
            .expect("detail")
            .to_string()
    };
    let latest = report["latest_schema_version"].as_i64().expect("latest");
    assert!(latest >= 5, "{report}");
    assert!(
        detail("schema").contains(&format!("{} migration(s) to apply", latest - 2)),
        "{report}"
    );
    assert!(
        detail("migrate").contains(&format!("at version {latest}")),
        "{report}"
    );
    assert!(detail("tables").contains("every row kept"), "{report}");
    // The source is untouched and the copy is gone.
    let versions = store.applied_migrations().await.expect("versions");
    assert_eq!(versions, vec![1, 2], "the source was migrated");
    assert_eq!(store.list_active_sandboxes().await.expect("list").len(), 1);
    let mine: Vec<String> = scratch_databases()
        .await
        .into_iter()
        .filter(|d| d.ends_with(&format!("_{}", o_pid(&report))))
        .collect();
    assert!(mine.is_empty(), "scratch database left: {mine:?}");
}

/// The pid part of the scratch database name, from the cleanup check.
fn o_pid(report: &serde_json::Value) -> String {
    let cleanup = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "cleanup")
        .expect("cleanup check");
    let detail = cleanup["detail"].as_str().expect("detail");
    let name = detail
        .split_whitespace()
        .find(|w| w.starts_with("stacyvm_rehearse_"))
        .expect("scratch name");
    name.rsplit('_').next().expect("pid").to_string()
}

#[tokio::test]
async fn pg_rehearse_reports_an_unreachable_database() {
    let o = stacyvm(
        &[
            "db",
            "pg-rehearse",
            "--dsn",
            "postgres://u:s3cr3t-pw@127.0.0.1:1/x",
        ],
        &[],
    );
    let text = all_output(&o);
    assert!(!o.status.success());
    assert!(text.contains("cannot connect"), "{text}");
    assert!(!text.contains("s3cr3t-pw"), "{text}");
    let o = stacyvm(&["db", "pg-rehearse"], &[]);
    assert!(
        all_output(&o).contains("no Postgres DSN"),
        "{}",
        all_output(&o)
    );
}

#[tokio::test]
async fn lint_and_doctor_check_postgres_without_showing_the_dsn() {
    let dsn = testpg::fresh_database().await;
    PostgresStore::connect(&dsn).await.expect("migrate");
    let env = [
        ("STACYVM_DATABASE_DRIVER", "postgres"),
        ("STACYVM_DATABASE_DSN", dsn.as_str()),
    ];
    let o = stacyvm(&["doctor"], &env);
    let text = all_output(&o);
    assert!(
        text.contains("[PASS] database.driver: postgres 1"),
        "{text}"
    );
    let schema = format!("schema version {}", stacyvm_store::pg::latest_version());
    assert!(text.contains(&schema), "{text}");
    assert!(!text.contains(&password_of(&dsn)), "{text}");
    let remote = "postgres://app:hunter2-secret@10.255.0.1:5432/stacyvm";
    let o = stacyvm(
        &["config", "lint", "--production"],
        &[
            ("STACYVM_DATABASE_DRIVER", "postgres"),
            ("STACYVM_DATABASE_DSN", remote),
        ],
    );
    let text = all_output(&o);
    assert!(
        text.contains(
            "[FAIL] database.dsn: the database at 10.255.0.1 is reached without requiring TLS"
        ),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    let o = stacyvm(
        &["doctor"],
        &[
            ("STACYVM_DATABASE_DRIVER", "postgres"),
            (
                "STACYVM_DATABASE_DSN",
                "postgres://app:hunter2-secret@127.0.0.1:1/x",
            ),
        ],
    );
    let text = all_output(&o);
    assert!(
        text.contains("[FAIL] database.driver: postgres: cannot connect"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}
