//! StacyVM providers.
//!
//! Each backend is a module behind a feature. [`conformance`] is the shared
//! suite every provider must pass; [`conformance_tests!`] emits one test per
//! case for a provider fixture.

pub mod agent;
pub mod conformance;
#[cfg(feature = "docker")]
pub mod docker;
pub mod egress;
pub mod hostfs;
pub mod image;
#[cfg(feature = "microvm")]
pub mod microvm;
#[cfg(feature = "mock")]
pub mod mock;
pub mod native;
#[cfg(feature = "proot")]
pub mod proot;
pub mod registry;
#[cfg(feature = "custom")]
pub mod remote;
pub mod volumes;
