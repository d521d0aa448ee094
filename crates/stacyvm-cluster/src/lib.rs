//! StacyVM clusters: what several control planes and workers need to trust
//! each other.
//!
//! - [`token`]: signed worker tokens (HMAC-SHA256), their claims, scopes and
//!   audiences, issued centrally and verified by control planes and workers;
//! - [`rpc`]: the worker's RPC server (the custom-provider contract with
//!   fencing, served over mutual TLS).

pub mod remote;
pub mod rpc;
pub mod tls;
pub mod token;
