//! Wire types of the StacyVM REST API (`/api/v1`).
//!
//! Shared by the server, the CLI and the Rust client. Field order follows the
//! public contract (`spec/api.md`), because the original server emitted struct
//! fields in declaration order and some clients compare bodies textually.
//! This crate has no runtime dependencies beyond serde.

pub mod duration;
pub mod types;

pub use duration::GoDuration;
pub use types::*;

/// Prefix of every API route.
pub const API_PREFIX: &str = "/api/v1";

/// Default TCP port of the server.
pub const DEFAULT_PORT: u16 = 7423;
