//! The live agent connections of a provider whose sandboxes outlive the
//! server (proot, qemu, firecracker): one connection per sandbox, made on
//! first use (after a restart too) by exactly one task, and a status that
//! asks the agent.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stacyvm_core::provider::RuntimeStatus;
use stacyvm_core::{Error, ErrorKind, Result};

use super::AgentClient;

/// One connection per sandbox id, and one connect in flight per id.
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<HashMap<String, Arc<AgentClient>>>,
    connecting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Connections {
    /// The open (not closed) connection to `id`.
    pub fn get(&self, id: &str) -> Option<Arc<AgentClient>> {
        let open = self.open.lock().ok()?;
        open.get(id).filter(|c| !c.is_closed()).cloned()
    }

    pub fn insert(&self, id: &str, c: Arc<AgentClient>) {
        if let Ok(mut open) = self.open.lock() {
            open.insert(id.to_string(), c);
        }
    }

    /// Removes `id`'s connection and returns it.
    pub fn take(&self, id: &str) -> Option<Arc<AgentClient>> {
        self.open.lock().ok()?.remove(id)
    }

    /// Forgets everything about `id` (its sandbox is gone).
    pub fn forget(&self, id: &str) {
        self.take(id);
        if let Ok(mut c) = self.connecting.lock() {
            c.remove(id);
        }
    }

    /// The lock that serialises (re)connecting to `id`; whoever holds it
    /// also keeps others from connecting meanwhile.
    pub fn connect_lock(&self, id: &str) -> Result<Arc<tokio::sync::Mutex<()>>> {
        Ok(self
            .connecting
            .lock()
            .map_err(|_| Error::internal("lock"))?
            .entry(id.to_string())
            .or_default()
            .clone())
    }

    /// The connection to `id`, made with `connect` when there is none (one
    /// connect per id at a time; the others wait and share it).
    pub async fn get_or_connect<F, Fut>(&self, id: &str, connect: F) -> Result<Arc<AgentClient>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Arc<AgentClient>>>,
    {
        if let Some(c) = self.get(id) {
            return Ok(c);
        }
        let lock = self.connect_lock(id)?;
        let _g = lock.lock().await;
        if let Some(c) = self.get(id) {
            return Ok(c);
        }
        let c = connect().await?;
        self.insert(id, c.clone());
        Ok(c)
    }
}

/// A sandbox's status from its agent: `running` when it answers a ping
/// within 5 s, `unhealthy` when connected but silent; no connection is
/// `SandboxNotFound`.
pub async fn ping_status(id: &str, client: Result<Arc<AgentClient>>) -> Result<RuntimeStatus> {
    let c = client.map_err(|e| {
        if e.kind() == ErrorKind::SandboxNotFound {
            e
        } else {
            Error::sandbox_not_found(id)
        }
    })?;
    let state = match tokio::time::timeout(Duration::from_secs(5), c.ping()).await {
        Ok(Ok(())) => "running",
        _ => "unhealthy",
    };
    Ok(RuntimeStatus {
        state: state.into(),
    })
}
