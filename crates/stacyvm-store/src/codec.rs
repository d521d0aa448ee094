//! Conversions between Rust values and column text.

use chrono::{DateTime, SecondsFormat, Utc};
use stacyvm_core::{Error, ErrorKind, Result};

/// Fixed-width RFC 3339 UTC with nanoseconds: text order = time order.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

pub fn parse_ts(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| Error::internal(format!("corrupt timestamp {s:?} in database")).with_source(e))
}

pub fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

pub fn from_json<T: serde::de::DeserializeOwned + Default>(s: &str) -> T {
    serde_json::from_str(s).unwrap_or_default()
}

pub fn db_err(e: sqlx::Error) -> Error {
    match &e {
        sqlx::Error::RowNotFound => Error::not_found("row"),
        sqlx::Error::Database(d) if d.is_unique_violation() => Error::conflict("already exists"),
        e2 if unreachable(e2) => Error::new(
            ErrorKind::StoreUnavailable,
            "the database cannot be reached",
        )
        .with_source(e),
        _ => Error::internal("database error").with_source(e),
    }
}

/// Errors that say the database is away (network, restart, pool
/// exhausted), as opposed to errors in what was asked of it: the first
/// are 503 and retried, the second are bugs.
fn unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        // SQLSTATE class 08 (connection exception), 57P0x (the server is
        // shutting down or restarting), 53300 (too many connections).
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P0") || c == "53300"),
        _ => false,
    }
}
