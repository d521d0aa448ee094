//! StacyVM core: configuration, the error taxonomy, the provider and store
//! traits, the provider registry, the event bus and the orchestrator.
//!
//! No HTTP and no SQL here: the server (`stacyvm-server`) and the store
//! (`stacyvm-store`) depend on this crate, never the other way round.

pub mod checks;
pub mod cidr;
pub mod cluster;
pub mod config;
pub mod dockerfile;
pub mod egress;
pub mod error;
pub mod events;
pub mod execs;
pub mod manager;
pub mod metrics;
pub mod paths;
pub mod policy;
pub mod provider;
pub mod registry;
pub mod secrets;
pub mod services;
pub mod store;
pub mod volumes;

pub use error::{Error, ErrorKind, Result};
