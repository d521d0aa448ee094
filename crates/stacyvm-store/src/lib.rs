//! StacyVM persistence.
//!
//! [`SqliteStore`] implements [`stacyvm_core::store::Store`] on an embedded
//! SQLite database in WAL mode (one machine); [`PostgresStore`] implements
//! it on Postgres (a cluster: several control planes and workers). Migrations are embedded and versioned in
//! `schema_migrations`; each runs in its own transaction on open.
//!
//! [`contract`] is the store contract suite, written once against the trait
//! so every engine runs the same checks.

pub mod backup;
mod codec;
pub mod contract;
#[cfg(feature = "postgres")]
mod postgres;
mod rows;
mod sqlite;
#[cfg(feature = "postgres")]
pub mod testpg;

use std::path::Path;
use std::sync::Arc;

#[cfg(feature = "postgres")]
pub use postgres::{parse_dsn, PostgresStore};
/// Postgres schema facts (versions, tables) for tooling.
#[cfg(feature = "postgres")]
pub mod pg {
    pub use crate::postgres::{latest_version, with_database, TABLES};
}
pub use sqlite::SqliteStore;
use stacyvm_core::config::Config;
use stacyvm_core::store::Store;

/// Opens the store the configuration asks for.
pub async fn open(cfg: &Config) -> stacyvm_core::Result<Arc<dyn Store>> {
    if cfg.is_postgres() {
        #[cfg(feature = "postgres")]
        return Ok(Arc::new(
            PostgresStore::connect(cfg.database.dsn.expose()).await?,
        ));
        #[cfg(not(feature = "postgres"))]
        return Err(stacyvm_core::Error::unsupported(
            "database.driver postgres: this build has no Postgres engine (feature `postgres`)",
        ));
    }
    let path = cfg.sqlite_path();
    Ok(Arc::new(SqliteStore::open(Path::new(&path)).await?))
}
