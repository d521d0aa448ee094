//! The agent layer every agent-backed provider shares.
//!
//! [`client`] speaks the agent protocol over any byte stream (a unix
//! socket, an engine-attached exec stream, a VM's serial port or vsock);
//! [`session`] implements exec and every file operation on top of it once;
//! [`binary`] finds the agent binary. A provider implements the lifecycle
//! (spawn, status, destroy, recover, inventory) and hands out sessions.

pub mod binary;
pub mod client;
pub mod conns;
pub mod session;

pub use binary::{agent_problem, elf_is_static, find_agent, find_static_agent};
pub use client::AgentClient;
pub use conns::Connections;
pub use session::AgentSession;

/// Starts slot `slot` in the pool host whose agent `c` is.
pub async fn slot_open(
    c: &AgentClient,
    slot: &str,
    spec: &stacyvm_core::provider::SlotSpec,
) -> stacyvm_core::Result<()> {
    c.call(&stacyvm_agent_proto::Request::SlotOpen {
        id: slot.to_string(),
        uid: spec.uid,
        gid: spec.uid,
        private_network: spec.private_network,
    })
    .await
    .map(|_| ())
}

/// Ends slot `slot` of the pool host whose agent `c` is.
pub async fn slot_close(c: &AgentClient, slot: &str) -> stacyvm_core::Result<()> {
    c.call(&stacyvm_agent_proto::Request::SlotClose {
        id: slot.to_string(),
    })
    .await
    .map(|_| ())
}

/// The slots alive in a pool host, from its agent.
pub async fn slot_list(c: &AgentClient) -> stacyvm_core::Result<Vec<String>> {
    let v = c.call(&stacyvm_agent_proto::Request::SlotList).await?;
    serde_json::from_value(v.get("slots").cloned().unwrap_or_default())
        .map_err(|e| stacyvm_core::Error::internal(format!("the pool host's slot list: {e}")))
}
