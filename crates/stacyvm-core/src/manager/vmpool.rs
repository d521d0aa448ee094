//! Pool mode (`pool.enabled`, spec runtime §5): several sandboxes share
//! one runtime, a **pool host**, each in a **slot** of it.
//!
//! A pool host is a sandbox record of nobody (`owner_id` empty) with the
//! reserved key `stacyvm.sys.pool_host` = its key: provider, image,
//! tenant, network mode and egress rules — sandboxes share a host only
//! when all of those are the same, so a tenant never shares a kernel, a
//! network namespace or an egress policy with another. Hosts are hidden
//! from every API caller, do not count against `defaults.max_sandboxes`,
//! never expire by time, and go when their last slot goes (gaps C-5, C-7).
//!
//! A pooled sandbox is an ordinary record (it counts against the owner's
//! and the server's limits) with `vm_id` = its host and
//! `stacyvm.sys.pool_slot` = its slot number; the slot map *is* the store,
//! so a restarted server finds its pooled sandboxes again and checks them
//! against the host's live slots (C-6). Its provider runs it as a slot:
//! its own uid (`10000 + slot`), pid and mount namespaces, private `/tmp`,
//! and its own `/workspace` (S-16; see `stacyvm_sandbox::pool`).
//!
//! With every host full and `pool.max_vms` reached, a spawn is refused
//! (429) or, with `pool.overflow: queue`, waits for a slot up to
//! `defaults.spawn_queue_timeout` (C-8).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};
use stacyvm_api::{state, GoDuration, PoolStatus, Sandbox, SpawnRequest};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{Caller, Manager};
use crate::error::{Error, ErrorKind, Result};
use crate::events::{self, kind};
use crate::provider::{capability, Provider, SlotSpec, POOL_HOST_METADATA};
use crate::store::{SandboxRecord, POOL_SLOT_KEY};

/// First uid (and gid) of slots: slot `n` runs as `SLOT_UID_BASE + n`.
pub(crate) const SLOT_UID_BASE: u32 = 10_000;
/// Time to live of a host record: it goes with its last slot, never by
/// time.
const HOST_TTL_SECS: i64 = 10 * 365 * 24 * 3600;

/// This server's pool bookkeeping (the hosts and slots are in the cache
/// and the store).
#[derive(Debug, Default)]
pub(crate) struct VmPool {
    /// Placement, one spawn at a time: a slot number is taken once.
    place: tokio::sync::Mutex<()>,
    /// A slot or a host went.
    freed: Notify,
    queued: AtomicUsize,
    claims: AtomicU64,
    hosts_spawned: AtomicU64,
}

/// What a pooled spawn was asked for, resolved by the ordinary spawn path.
pub(crate) struct PooledSpawn<'a> {
    pub provider: &'a Arc<dyn Provider>,
    pub holder: &'a str,
    pub image: &'a str,
    pub network: &'a str,
    pub egress: Option<crate::egress::EgressRules>,
    pub egress_metadata: BTreeMap<String, String>,
    pub ttl: GoDuration,
    pub lifecycle: (i64, String),
    pub owner: &'a str,
}

/// Why a spawn request cannot be pooled (`None`: it can).
pub(crate) fn unpoolable(req: &SpawnRequest, on_timeout: &str) -> Option<&'static str> {
    if !req.volumes.is_empty() {
        Some("volumes need a sandbox of their own")
    } else if !req.snapshot.is_empty() {
        Some("a snapshot's child needs a sandbox of its own")
    } else if on_timeout == "pause" {
        Some("a pooled sandbox shares its runtime and cannot be paused (on_timeout: pause)")
    } else {
        None
    }
}

impl Manager {
    /// Whether spawns go to pool hosts.
    pub(crate) fn pool_mode(&self) -> bool {
        self.cfg.pool.enabled
    }

    fn host_key(&self, p: &PooledSpawn<'_>, tenant: &str) -> String {
        let rules = serde_json::to_string(&p.egress).unwrap_or_default();
        let mut h = Sha256::new();
        for part in [p.provider.name(), p.image, tenant, p.network, &rules] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        hex::encode(&h.finalize()[..12])
    }

    /// Pool hosts in the cache.
    fn pool_hosts(&self) -> Vec<Arc<SandboxRecord>> {
        self.cache
            .read()
            .values()
            .filter(|r| r.is_pool_host() && r.state != state::DESTROYED)
            .cloned()
            .collect()
    }

    /// Slot numbers in use in host `host`.
    fn slots_of(&self, host: &str) -> BTreeSet<u32> {
        self.cache
            .read()
            .values()
            .filter(|r| r.vm_id == host && r.state != state::DESTROYED)
            .filter_map(|r| r.pool_slot())
            .collect()
    }

    /// `GET /pool/status`.
    pub fn pool_status(&self) -> PoolStatus {
        let c = &self.cfg.pool;
        if !c.enabled {
            return PoolStatus {
                enabled: false,
                vms: None,
                max_vms: None,
                total_users: None,
                max_users_per_vm: None,
            };
        }
        let hosts = self.pool_hosts();
        let users: usize = hosts.iter().map(|h| self.slots_of(&h.id).len()).sum();
        PoolStatus {
            enabled: true,
            vms: Some(hosts.len() as i64),
            max_vms: Some(c.max_vms),
            total_users: Some(users as i64),
            max_users_per_vm: Some(c.max_users_per_vm),
        }
    }

    /// Pool counters for metrics: (hosts, users, queued, claims, hosts
    /// spawned).
    pub fn pool_counters(&self) -> (usize, usize, usize, u64, u64) {
        let hosts = self.pool_hosts();
        let users = hosts.iter().map(|h| self.slots_of(&h.id).len()).sum();
        (
            hosts.len(),
            users,
            self.vmpool.queued.load(Ordering::Relaxed),
            self.vmpool.claims.load(Ordering::Relaxed),
            self.vmpool.hosts_spawned.load(Ordering::Relaxed),
        )
    }

    /// A pooled spawn: a slot in a host with room, a new host while
    /// `pool.max_vms` allows, else refused or queued (`pool.overflow`).
    /// The caller has reserved the owner's admission slot.
    pub(crate) async fn spawn_pooled(
        &self,
        p: PooledSpawn<'_>,
        req: &SpawnRequest,
        caller: &Caller,
    ) -> Result<Sandbox> {
        if !p
            .provider
            .capabilities()
            .iter()
            .any(|c| c == capability::POOL_HOST)
        {
            return Err(Error::invalid(format!(
                "pool mode: provider {} cannot host pooled sandboxes (pool hosts run on native as root and on docker with runc); name another provider or turn pool.enabled off",
                p.provider.name()
            )));
        }
        let key = self.host_key(&p, &caller.tenant_id);
        let max_users = u32::try_from(self.cfg.pool.max_users_per_vm.max(1)).unwrap_or(1);
        let queue = self.cfg.pool.overflow == "queue";
        let deadline = tokio::time::Instant::now()
            + if self.cfg.defaults.spawn_queue_timeout.is_zero() {
                Duration::from_secs(30)
            } else {
                self.cfg.defaults.spawn_queue_timeout.std()
            };
        let mut queued_at: Option<Instant> = None;
        let result = loop {
            let freed = self.vmpool.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let placed = {
                let _g = self.vmpool.place.lock().await;
                match self.find_slot(&key, max_users) {
                    Some((host, n)) => Some(self.open_slot(&host, n, &p, req, caller).await),
                    None if (self.pool_hosts().len() as i64) < self.cfg.pool.max_vms => {
                        Some(match self.spawn_host(&key, &p, caller).await {
                            Ok(host) => {
                                let opened = self.open_slot(&host, 0, &p, req, caller).await;
                                if opened.is_err() {
                                    // A host nobody got into goes at once.
                                    let system = Caller {
                                        actor: "system:pool".into(),
                                        ..Caller::default()
                                    };
                                    if let Err(e) = self.destroy_record(&host, &system).await {
                                        warn!(host = %host.id, error = %e, "removing a pool host whose first slot failed");
                                    }
                                }
                                opened
                            }
                            Err(e) => Err(e),
                        })
                    }
                    None => None,
                }
            };
            if let Some(r) = placed {
                break r;
            }
            if !queue {
                self.pool_event(kind::RESOURCE_LIMIT, p.owner);
                break Err(Error::limit(format!(
                    "vm pool at capacity: {} pool hosts with {} sandboxes each (pool.max_vms, pool.max_users_per_vm)",
                    self.cfg.pool.max_vms, max_users
                )));
            }
            if queued_at.is_none() {
                queued_at = Some(Instant::now());
                self.vmpool.queued.fetch_add(1, Ordering::SeqCst);
                self.pool_event(kind::SPAWN_QUEUED, p.owner);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                self.pool_event(kind::SPAWN_QUEUE_TIMEOUT, p.owner);
                break Err(Error::limit(format!(
                    "vm pool at capacity: no slot came free within {}",
                    GoDuration::from_std(self.cfg.defaults.spawn_queue_timeout.std())
                )));
            }
        };
        if queued_at.is_some() {
            self.vmpool.queued.fetch_sub(1, Ordering::SeqCst);
        }
        result
    }

    /// A spawn event of pool placement (limit, queued, queue timeout).
    fn pool_event(&self, kind: &str, owner: &str) {
        self.events.publish(
            kind,
            "",
            events::data([
                ("operation", json!("spawn")),
                ("owner_id", json!(owner)),
                ("reason", json!("pool")),
            ]),
        );
    }

    /// The fullest host of `key` with a free slot, and that slot's number
    /// (the lowest free one): filling hosts before opening new ones.
    fn find_slot(&self, key: &str, max_users: u32) -> Option<(Arc<SandboxRecord>, u32)> {
        let mut best: Option<(Arc<SandboxRecord>, BTreeSet<u32>)> = None;
        for h in self.pool_hosts() {
            if h.state != state::RUNNING
                || h.metadata.get(POOL_HOST_METADATA).map(String::as_str) != Some(key)
            {
                continue;
            }
            let used = self.slots_of(&h.id);
            if used.len() as u32 >= max_users {
                continue;
            }
            if best.as_ref().is_none_or(|(_, u)| used.len() > u.len()) {
                best = Some((h, used));
            }
        }
        let (host, used) = best?;
        let n = (0..max_users).find(|n| !used.contains(n))?;
        Some((host, n))
    }

    async fn spawn_host(
        &self,
        key: &str,
        p: &PooledSpawn<'_>,
        caller: &Caller,
    ) -> Result<Arc<SandboxRecord>> {
        let mut metadata = p.egress_metadata.clone();
        metadata.insert(POOL_HOST_METADATA.into(), key.to_string());
        let req = SpawnRequest {
            metadata: Some(metadata),
            network_mode: p.network.to_string(),
            ..SpawnRequest::default()
        };
        let system = Caller {
            actor: "system:pool".into(),
            tenant_id: caller.tenant_id.clone(),
            ..Caller::default()
        };
        let c = &self.cfg.pool;
        let memory = if c.memory_mb > 0 { c.memory_mb } else { 2048 };
        let vcpus = c.vcpus.max(1);
        let sb = self
            .spawn_reserved(
                p.provider,
                (p.egress.clone(), Vec::new()),
                p.holder,
                p.image,
                (memory, memory),
                (vcpus, vcpus),
                GoDuration::from_secs(HOST_TTL_SECS),
                (0, String::new()),
                "",
                &req,
                &system,
            )
            .await?;
        self.vmpool.hosts_spawned.fetch_add(1, Ordering::Relaxed);
        info!(host = %sb.id, provider = p.provider.name(), image = p.image, "pool host spawned");
        self.cache
            .read()
            .get(&sb.id)
            .cloned()
            .ok_or_else(|| Error::sandbox_not_found(&sb.id))
    }

    /// Opens slot `n` of `host` for a new sandbox and records it.
    async fn open_slot(
        &self,
        host: &SandboxRecord,
        n: u32,
        p: &PooledSpawn<'_>,
        req: &SpawnRequest,
        caller: &Caller,
    ) -> Result<Sandbox> {
        let mut id = crate::paths::new_sandbox_id();
        while self.cache.read().contains_key(&id) {
            id = crate::paths::new_sandbox_id();
        }
        let now = crate::store::record_now();
        let expires_at = now + chrono::Duration::nanoseconds(p.ttl.nanos());
        let lease_ttl = p.ttl.to_std() + super::LEASE_GRACE;
        self.store
            .acquire_lease(&id, "sandbox", p.holder, lease_ttl)
            .await?;
        let spec = SlotSpec {
            uid: SLOT_UID_BASE + n,
            // A host without a way out gives each slot a loopback of its
            // own; a bridged one shares its network (its slots are one
            // tenant's, under one egress policy).
            private_network: p.network == "none",
        };
        if let Err(e) = p.provider.slot_open(&host.id, &id, &spec).await {
            let _ = self.store.release_lease(&id, p.holder).await;
            return Err(e);
        }
        let mut metadata = req.metadata.clone().unwrap_or_default();
        metadata.extend(p.egress_metadata.clone());
        metadata.insert(POOL_SLOT_KEY.into(), n.to_string());
        let (idle_timeout_secs, on_timeout) = p.lifecycle.clone();
        let rec = SandboxRecord {
            id: id.clone(),
            state: state::RUNNING.into(),
            provider: host.provider.clone(),
            // What it runs is its host's: the image and the size it shares.
            image: host.image.clone(),
            memory_mb: host.memory_mb,
            vcpus: host.vcpus,
            metadata,
            owner_id: p.owner.to_string(),
            tenant_id: caller.tenant_id.clone(),
            vm_id: host.id.clone(),
            worker_id: p.holder.into(),
            created_at: now,
            expires_at,
            updated_at: now,
            idle_timeout_secs,
            on_timeout,
            idle_deadline: now + chrono::Duration::seconds(idle_timeout_secs),
        };
        if let Err(e) = self.store.insert_sandbox(&rec).await {
            let _ = p.provider.slot_close(&host.id, &id).await;
            let _ = self.store.release_lease(&id, p.holder).await;
            return Err(e);
        }
        let api = self.to_api(&rec);
        self.cache.write().insert(id.clone(), Arc::new(rec));
        self.vmpool.claims.fetch_add(1, Ordering::Relaxed);
        self.events.publish(
            kind::SANDBOX_CREATED,
            &id,
            events::data([
                ("provider", json!(host.provider)),
                ("image", json!(host.image)),
                ("pooled", json!(true)),
            ]),
        );
        self.events.publish(kind::SANDBOX_RUNNING, &id, None);
        info!(sandbox_id = %id, host = %host.id, slot = n, "pooled sandbox spawned");
        Ok(api)
    }

    /// After a pooled sandbox went: wakes queued spawns, and destroys its
    /// host when no slot is left in it.
    pub(crate) async fn slot_freed(&self, host_id: &str) {
        {
            let _g = self.vmpool.place.lock().await;
            let host = self.cache.read().get(host_id).cloned();
            if let Some(host) = host {
                if self.slots_of(host_id).is_empty() {
                    let system = Caller {
                        actor: "system:pool".into(),
                        ..Caller::default()
                    };
                    if let Err(e) = Box::pin(self.destroy_record(&host, &system)).await {
                        warn!(host = host_id, error = %e, "destroying an empty pool host failed");
                    }
                }
            }
        }
        self.vmpool.freed.notify_waiters();
    }

    /// Reconcile of a pooled record after a restart: running when its
    /// host's agent still has its slot, else destroyed.
    pub(crate) async fn reconcile_pooled(&self, provider: &Arc<dyn Provider>, rec: SandboxRecord) {
        match provider.slots(&rec.vm_id).await {
            Ok(live) if live.contains(&rec.id) => self.adopt_into_cache(rec),
            Ok(_) => self.mark_destroyed(&rec, "pool slot missing").await,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::SandboxNotFound | ErrorKind::SandboxDestroyed | ErrorKind::NotFound
                ) =>
            {
                self.mark_destroyed(&rec, "pool host missing").await
            }
            Err(e) => {
                warn!(sandbox_id = %rec.id, error = %e, "pool slot status during reconcile failed");
                self.reconcile_state(&rec.id, state::ERROR).await;
            }
        }
    }

    /// After reconcile: hosts left with no sandbox go, and slots no
    /// record names (a server stopped between opening a slot and
    /// recording its sandbox) are closed.
    pub(crate) async fn drop_empty_hosts(&self) {
        for h in self.pool_hosts() {
            let known: BTreeSet<String> = self
                .cache
                .read()
                .values()
                .filter(|r| r.vm_id == h.id && r.pool_slot().is_some())
                .map(|r| r.id.clone())
                .collect();
            if !known.is_empty() {
                let Ok(provider) = self.provider_of(&h).await else {
                    continue;
                };
                if let Ok(live) = provider.slots(&h.id).await {
                    for s in live.iter().filter(|s| !known.contains(*s)) {
                        warn!(host = %h.id, slot = %s, "closing a pool slot no sandbox record names");
                        if let Err(e) = provider.slot_close(&h.id, s).await {
                            warn!(host = %h.id, slot = %s, error = %e, "closing an unrecorded pool slot failed");
                        }
                    }
                }
                continue;
            }
            let system = Caller {
                actor: "system:pool".into(),
                ..Caller::default()
            };
            info!(host = %h.id, "destroying a pool host with no sandbox left");
            if let Err(e) = self.destroy_record(&h, &system).await {
                warn!(host = %h.id, error = %e, "destroying an empty pool host failed");
            }
        }
    }
}

/// A typed refusal (409, with the reason) of what a pooled sandbox cannot
/// do on its own.
pub(crate) fn refuse_pooled(rec: &SandboxRecord, what: &str) -> Result<()> {
    if rec.pool_slot().is_some() {
        return Err(Error::conflict(format!(
            "sandbox {} is pooled (pool mode): it shares its runtime with other sandboxes, so it cannot {what}",
            rec.id
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_cannot_be_pooled_is_named() {
        let plain = SpawnRequest::default();
        assert_eq!(unpoolable(&plain, ""), None);
        assert_eq!(unpoolable(&plain, "kill"), None);
        assert!(unpoolable(&plain, "pause").is_some_and(|w| w.contains("paused")));
        let vol = SpawnRequest {
            volumes: vec![stacyvm_api::VolumeMount {
                volume: "v".into(),
                path: "/data".into(),
                read_only: false,
            }],
            ..SpawnRequest::default()
        };
        assert!(unpoolable(&vol, "").is_some_and(|w| w.contains("volumes")));
        let snap = SpawnRequest {
            snapshot: "snap-1".into(),
            ..SpawnRequest::default()
        };
        assert!(unpoolable(&snap, "").is_some_and(|w| w.contains("snapshot")));
    }

    #[test]
    fn pooled_records_name_their_slot() {
        let now = chrono::Utc::now();
        let mut r = SandboxRecord {
            id: "sb-00000001".into(),
            state: state::RUNNING.into(),
            provider: "native".into(),
            image: "host".into(),
            memory_mb: 256,
            vcpus: 1,
            metadata: BTreeMap::new(),
            owner_id: String::new(),
            tenant_id: String::new(),
            vm_id: "sb-000000aa".into(),
            worker_id: "local".into(),
            created_at: now,
            expires_at: now,
            updated_at: now,
            idle_timeout_secs: 0,
            on_timeout: String::new(),
            idle_deadline: now,
        };
        assert_eq!(
            r.runtime_id(),
            "sb-000000aa",
            "a moved sandbox: its runtime"
        );
        r.metadata.insert(POOL_SLOT_KEY.into(), "3".into());
        assert_eq!(r.pool_slot(), Some(3));
        assert_eq!(r.runtime_id(), "sb-000000aa/sb-00000001");
        assert_eq!(
            crate::provider::split_slot_runtime_id(&r.runtime_id()),
            Some(("sb-000000aa", "sb-00000001"))
        );
        assert!(!r.is_pool_host());
        r.metadata.insert(POOL_HOST_METADATA.into(), "k".into());
        assert!(r.is_pool_host());
    }
}
