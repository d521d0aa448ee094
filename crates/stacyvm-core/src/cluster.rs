//! The seam between the orchestrator and other machines: a control plane
//! reaches the sandboxes of a worker through a [`Remote`], implemented by
//! `stacyvm-cluster` (worker RPC over mutual TLS). Without one, every
//! sandbox is local.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;
use crate::provider::Provider;
use crate::store::WorkerRecord;

/// Builds providers that act on a worker's sandboxes.
#[async_trait]
pub trait Remote: Send + Sync + std::fmt::Debug {
    /// A provider that runs `provider` on `worker` (through its RPC
    /// address). Every call it makes carries the sandbox's lease.
    async fn provider(&self, worker: &WorkerRecord, provider: &str) -> Result<Arc<dyn Provider>>;

    /// The lease of `sandbox` changed (taken again for a destroy, re-taken
    /// after it was lost, or changed by another control plane): forget any
    /// copy of it kept for calls.
    fn lease_changed(&self, _sandbox: &str) {}
}
