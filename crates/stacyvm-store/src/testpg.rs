//! Scratch Postgres databases for tests.
//!
//! Tests that need Postgres read the server's address from
//! `STACYVM_TEST_PG_DSN` (a superuser DSN; `scripts/pg-throwaway start`
//! runs such a server on loopback and `scripts/test` exports it). Each
//! test gets a database of its own, so tests run in parallel; they are
//! dropped with the throwaway server.

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;

/// Name of the variable holding the superuser DSN.
pub const ENV: &str = "STACYVM_TEST_PG_DSN";

/// The superuser DSN. Panics with directions when it is not set: a test
/// that needs Postgres fails rather than skips.
pub fn admin_dsn() -> String {
    std::env::var(ENV).unwrap_or_else(|_| {
        panic!(
            "{ENV} is not set: this test needs a Postgres server. \
             Run `scripts/pg-throwaway start` and export {ENV}=$(scripts/pg-throwaway dsn) \
             (scripts/test does both)"
        )
    })
}

/// Creates an empty database and returns its DSN.
pub async fn fresh_database() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let admin = admin_dsn();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!(
        "t_{}_{}_{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("connecting to the test Postgres ({ENV}): {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
    let _ = conn.close().await;
    crate::postgres::with_database(&admin, &name)
}
