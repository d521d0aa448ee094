//! Event bus: fan-out to SSE subscribers, bounded history.
//!
//! Slow subscribers lose events rather than slowing publishers (each
//! subscriber has a 64-slot buffer, as in the original). In a cluster a
//! bridge (Postgres `LISTEN/NOTIFY`) carries what is published here to the
//! other control planes and [`EventBus::inject`]s theirs: subscribers see
//! the events of every control plane, and [`EventBus::subscribe_remote`]
//! sees only the others' (to invalidate caches).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use chrono::Utc;
use stacyvm_api::Event;
use tokio::sync::{broadcast, mpsc};

const HISTORY: usize = 1000;
const SUBSCRIBER_BUFFER: usize = 64;

/// Event type names.
pub mod kind {
    pub const SANDBOX_CREATED: &str = "sandbox.created";
    pub const SANDBOX_RUNNING: &str = "sandbox.running";
    pub const SANDBOX_DESTROYED: &str = "sandbox.destroyed";
    pub const SANDBOX_EXTENDED: &str = "sandbox.extended";
    pub const SANDBOX_PAUSED: &str = "sandbox.paused";
    pub const SANDBOX_RESUMED: &str = "sandbox.resumed";
    /// Its egress policy changed (`PATCH /sandboxes/{id}/network`).
    pub const SANDBOX_NETWORK_UPDATED: &str = "sandbox.network_updated";
    /// Its worker stopped heartbeating (a cluster).
    pub const SANDBOX_UNHEALTHY: &str = "sandbox.unhealthy";
    pub const EXEC_STARTED: &str = "exec.started";
    pub const EXEC_COMPLETED: &str = "exec.completed";
    pub const EXEC_FAILED: &str = "exec.failed";
    pub const EXEC_TIMEOUT: &str = "exec.timeout";
    pub const FILE_WRITTEN: &str = "file.written";
    pub const FILE_READ: &str = "file.read";
    pub const OPERATION_FAILED: &str = "operation.failed";
    pub const RESOURCE_LIMIT: &str = "resource.limit";
    pub const PROVIDER_FAILED: &str = "provider.failed";
    pub const RECONCILE_ACTION: &str = "reconcile.action";
    pub const SPAWN_QUEUED: &str = "spawn.queued";
    pub const SPAWN_DEQUEUED: &str = "spawn.dequeued";
    pub const SPAWN_QUEUE_TIMEOUT: &str = "spawn.queue_timeout";
    pub const QUOTA_SAVED: &str = "quota.saved";
    pub const QUOTA_DELETED: &str = "quota.deleted";
}

/// Counters shown in diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusStats {
    pub subscribers: usize,
    pub history_size: usize,
    pub events_total: u64,
}

#[derive(Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
    seq: AtomicU64,
    history: Mutex<VecDeque<Event>>,
    /// Where local events go to reach other control planes.
    bridge: OnceLock<mpsc::Sender<Event>>,
    /// Events of other control planes.
    remote: broadcast::Sender<Event>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        EventBus {
            tx,
            seq: AtomicU64::new(0),
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            bridge: OnceLock::new(),
            remote: broadcast::channel(1024).0,
        }
    }

    /// Publishes an event; never blocks.
    pub fn publish(
        &self,
        kind: &str,
        sandbox_id: &str,
        data: Option<BTreeMap<String, serde_json::Value>>,
    ) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let ev = Event {
            id: format!("evt-{n}"),
            kind: kind.to_string(),
            sandbox_id: sandbox_id.to_string(),
            timestamp: Utc::now(),
            data,
        };
        self.remember(&ev);
        if let Some(b) = self.bridge.get() {
            // A full bridge drops the event for other control planes only.
            let _ = b.try_send(ev.clone());
        }
        // No receivers is fine.
        let _ = self.tx.send(ev);
    }

    fn remember(&self, ev: &Event) {
        if let Ok(mut h) = self.history.lock() {
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(ev.clone());
        }
    }

    /// Sends every event published from now on to `tx` as well (once).
    pub fn bridge_to(&self, tx: mpsc::Sender<Event>) -> bool {
        self.bridge.set(tx).is_ok()
    }

    /// Delivers an event of another control plane to the subscribers here
    /// (not back to the bridge).
    pub fn inject(&self, ev: Event) {
        self.remember(&ev);
        let _ = self.tx.send(ev.clone());
        let _ = self.remote.send(ev);
    }

    /// Events of other control planes only.
    pub fn subscribe_remote(&self) -> broadcast::Receiver<Event> {
        self.remote.subscribe()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    pub fn stats(&self) -> BusStats {
        BusStats {
            subscribers: self.tx.receiver_count(),
            history_size: self.history.lock().map(|h| h.len()).unwrap_or(0),
            events_total: self.seq.load(Ordering::Relaxed),
        }
    }
}

/// Builds an event data map from string pairs.
pub fn data<const N: usize>(
    pairs: [(&str, serde_json::Value); N],
) -> Option<BTreeMap<String, serde_json::Value>> {
    Some(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}
