//! Conversions between Rust values and column text.

use chrono::{DateTime, SecondsFormat, Utc};
use stacyvm_core::{Error, Result};

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
        _ => Error::internal("database error").with_source(e),
    }
}
