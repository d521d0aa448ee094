//! The rules around templates, quotas, tenancy and audit: core services
//! beside the [`Manager`](crate::manager::Manager), sharing its store.
//!
//! Routes reach these through `manager.templates()`, `manager.quotas()`,
//! `manager.tenancy()` and `manager.audit_trail()`; they never hold the store
//! (a test in `stacyvm-server` keeps it so). Validation, defaults, events
//! and the admission queue's wake-ups live here, so every front door (the
//! REST API, the E2B API, MCP, any control plane of a cluster) applies
//! the same rules.

pub mod audit;
pub mod previews;
pub mod quotas;
pub mod templates;
pub mod tenancy;

pub use audit::Audit;
pub use previews::Previews;
pub use quotas::Quotas;
pub use templates::Templates;
pub use tenancy::{PolicyInput, Tenancy, TenantInput};

/// A short random suffix for generated ids (`tenant-1a2b3c4d`).
fn random_suffix() -> String {
    hex::encode(rand::random::<[u8; 4]>())
}

/// An id a caller may choose: 1–128 letters, digits, `-`, `_`, `.`, `@`.
pub fn check_id(kind: &str, id: &str) -> crate::Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(crate::Error::invalid(format!(
            "{kind} must be 1-128 characters of letters, digits, '-', '_', '.', '@'"
        )))
    }
}
