//! StacyVM persistence.
//!
//! [`SqliteStore`] implements [`stacyvm_core::store::Store`] on an embedded
//! SQLite database in WAL mode; a Postgres implementation plugs in behind
//! the same trait. Migrations are embedded and versioned in
//! `schema_migrations`; each runs in its own transaction on open.
//!
//! [`contract`] is the store contract suite, written once against the trait
//! so every engine runs the same checks.

pub mod backup;
mod codec;
pub mod contract;
mod sqlite;

use std::path::Path;
use std::sync::Arc;

pub use sqlite::SqliteStore;
use stacyvm_core::config::Config;
use stacyvm_core::store::Store;

/// Opens the store the configuration asks for.
pub async fn open(cfg: &Config) -> stacyvm_core::Result<Arc<dyn Store>> {
    if cfg.is_postgres() {
        return Err(stacyvm_core::Error::unsupported(
            "database.driver postgres is not available in this build yet; use sqlite",
        ));
    }
    let path = cfg.sqlite_path();
    Ok(Arc::new(SqliteStore::open(Path::new(&path)).await?))
}
