//! Providers that forward to a sandbox backend over the network.
//!
//! - [`http`]: the custom HTTP provider ("bring your own backend"), the
//!   contract of `docs/custom-provider.md`.

pub mod http;
pub mod setup;

#[cfg(test)]
mod tests;
