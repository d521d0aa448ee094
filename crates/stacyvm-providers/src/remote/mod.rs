//! Providers that forward to a sandbox backend over the network.
//!
//! - [`http`]: the custom HTTP provider ("bring your own backend"), the
//!   contract of `docs/custom-provider.md`.
//! - [`e2b`]: an E2B-compatible service (E2B's cloud, a self-hosted E2B,
//!   another StacyVM) through E2B's own API.

pub mod e2b;
pub mod http;
pub mod setup;

#[cfg(test)]
mod tests;
