//! Template warm pools: for every template with `pool_size > 0`, this
//! server keeps that many sandboxes spawned and set up ahead of demand. A
//! spawn from the template that asks for nothing the template does not
//! already say (image, provider, size, network) takes one: the sandbox is
//! handed to the caller (owner, tenant, metadata, time to live, idle
//! timeout) and the pool refills in the background.
//!
//! Pool sandboxes are real sandboxes (they count against
//! `defaults.max_sandboxes`), owned by nobody and visible to nobody until
//! claimed (the hidden `stacyvm.sys.pool` key, stamped with the template's
//! name and version). A changed or deleted template, or a smaller
//! `pool_size`, drains them; after a restart the pool takes back the ones
//! still current. Pools work on a single control plane (SQLite admission);
//! with shared admission (Postgres) spawns from templates do not use them,
//! nor in pool mode (`pool.enabled`), whose sandboxes live in pool hosts.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::json;
use stacyvm_api::{state, GoDuration, Sandbox, SpawnRequest, TemplatePool};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::setup::POOL_KEY;
use super::{Caller, Manager, LEASE_GRACE};
use crate::error::Result;
use crate::events::{self, kind};
use crate::store::{SandboxRecord, TemplateRecord};

/// How long a pool sandbox lives unclaimed before it is replaced.
const POOL_TTL: Duration = Duration::from_secs(6 * 3600);
/// Pool sandboxes set up at once (across templates).
const FILL_AT_ONCE: usize = 2;

/// The pools of this server.
#[derive(Debug, Default)]
pub(crate) struct Pools {
    by_template: Mutex<HashMap<String, Pool>>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct Pool {
    /// `name@updated_at` of the template the ready sandboxes were made for.
    stamp: String,
    target: i64,
    ready: VecDeque<String>,
    filling: usize,
    hits: u64,
    misses: u64,
    failures: u64,
}

/// The version stamp of a template's pool sandboxes.
pub(crate) fn stamp_of(t: &TemplateRecord) -> String {
    format!("{}@{}", t.name, t.updated_at.timestamp_micros())
}

/// Whether a spawn request (the template already merged) can take a pool
/// sandbox of `t`: it asks for nothing the template does not say.
pub(crate) fn compatible(req: &SpawnRequest, t: &TemplateRecord, provider: &str) -> bool {
    t.pool_size > 0
        && req.snapshot.is_empty()
        && req.image == t.image
        && (t.provider.is_empty() || t.provider == provider)
        && req.memory_mb == t.memory_mb
        && req.vcpus == t.cpu_cores
        && req.network_mode.is_empty()
        && req.network.is_none()
        && req.auto_resume.is_none()
        && req.volumes.is_empty()
}

impl Manager {
    /// A template's pool state (`None` without a pool).
    pub fn template_pool(&self, t: &TemplateRecord) -> Option<TemplatePool> {
        if t.pool_size <= 0 {
            return None;
        }
        let pools = self.pools.by_template.lock();
        let p = pools.get(&t.name);
        Some(TemplatePool {
            target: t.pool_size,
            ready: p
                .filter(|p| p.stamp == stamp_of(t))
                .map_or(0, |p| p.ready.len() as i64),
            hits: p.map_or(0, |p| p.hits),
            misses: p.map_or(0, |p| p.misses),
            failures: p.map_or(0, |p| p.failures),
        })
    }

    /// Every pool's state by template name (metrics).
    pub fn pool_stats(&self) -> Vec<(String, TemplatePool)> {
        let pools = self.pools.by_template.lock();
        let mut out: Vec<(String, TemplatePool)> = pools
            .iter()
            .map(|(name, p)| {
                (
                    name.clone(),
                    TemplatePool {
                        target: p.target,
                        ready: p.ready.len() as i64,
                        hits: p.hits,
                        misses: p.misses,
                        failures: p.failures,
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Hands a ready pool sandbox of `t` to the caller, or `None` when the
    /// pool is empty (a miss).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn claim_pooled(
        &self,
        t: &TemplateRecord,
        req: &SpawnRequest,
        owner: &str,
        caller: &Caller,
        ttl: GoDuration,
        (idle_timeout_secs, on_timeout): (i64, String),
    ) -> Result<Option<Sandbox>> {
        let stamp = stamp_of(t);
        loop {
            let id = {
                let mut pools = self.pools.by_template.lock();
                let p = pools.entry(t.name.clone()).or_default();
                match p.ready.pop_front().filter(|_| p.stamp == stamp) {
                    Some(id) => id,
                    None => {
                        p.misses += 1;
                        return Ok(None);
                    }
                }
            };
            let Some(rec) = self.cache.read().get(&id).cloned() else {
                continue;
            };
            if rec.state != state::RUNNING
                || rec.metadata.get(POOL_KEY).map(String::as_str) != Some(stamp.as_str())
            {
                continue;
            }
            if let Err(e) = self.reserve_slot(owner, ttl).await {
                self.pools
                    .by_template
                    .lock()
                    .entry(t.name.clone())
                    .or_default()
                    .ready
                    .push_front(id);
                return Err(e);
            }
            let now = crate::store::record_now();
            let mut claimed = (*rec).clone();
            claimed.owner_id = owner.to_string();
            claimed.tenant_id = caller.tenant_id.clone();
            claimed.metadata.remove(POOL_KEY);
            for (k, v) in req.metadata.clone().unwrap_or_default() {
                claimed.metadata.insert(k, v);
            }
            claimed.expires_at = now + chrono::Duration::nanoseconds(ttl.nanos());
            claimed.idle_timeout_secs = idle_timeout_secs;
            claimed.on_timeout = on_timeout.clone();
            claimed.idle_deadline = now + chrono::Duration::seconds(idle_timeout_secs);
            claimed.updated_at = now;
            let lease = self
                .store
                .renew_lease(&id, self.worker_id(), ttl.to_std() + LEASE_GRACE)
                .await;
            let saved = match lease {
                Ok(l) => {
                    self.store
                        .reassign_sandbox(&claimed, Some(&l.fence()))
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = saved {
                // Not ours to hand out after all: count it gone.
                warn!(sandbox_id = %id, error = %e, "claiming a pool sandbox failed");
                self.release_slot(owner);
                continue;
            }
            // The pool's own slot (owner "") becomes the caller's.
            self.release_slot("");
            let api = self.to_api(&claimed);
            self.cache.write().insert(id.clone(), Arc::new(claimed));
            if let Some(p) = self.pools.by_template.lock().get_mut(&t.name) {
                p.hits += 1;
            }
            self.pools.wake.notify_one();
            self.events.publish(
                kind::SANDBOX_CREATED,
                &id,
                events::data([
                    ("provider", json!(rec.provider)),
                    ("image", json!(rec.image)),
                    ("template", json!(t.name)),
                    ("from_pool", json!(true)),
                ]),
            );
            self.events.publish(kind::SANDBOX_RUNNING, &id, None);
            return Ok(Some(api));
        }
    }

    /// Keeps every template's pool filled until the handle is aborted:
    /// on start it takes back current pool sandboxes, then checks every
    /// two seconds and after every claim.
    pub fn start_pools(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            // Pool mode spawns into pool hosts: warm sandboxes of their
            // own would never be claimed.
            if me.shared_admission() || me.pool_mode() {
                return;
            }
            me.adopt_pool_sandboxes().await;
            loop {
                if let Err(e) = me.fill_pools().await {
                    warn!(error = %e, "template pool pass failed");
                }
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), me.pools.wake.notified()).await;
            }
        })
    }

    /// After a restart: pool sandboxes of current templates are ready
    /// again; the others go.
    async fn adopt_pool_sandboxes(self: &Arc<Self>) {
        let Ok(templates) = self.store.list_templates().await else {
            return;
        };
        let current: HashMap<String, &TemplateRecord> =
            templates.iter().map(|t| (stamp_of(t), t)).collect();
        for rec in self.cached() {
            let Some(stamp) = rec.metadata.get(POOL_KEY) else {
                continue;
            };
            match current.get(stamp) {
                Some(t) if rec.state == state::RUNNING && self.owns(&rec) => {
                    let mut pools = self.pools.by_template.lock();
                    let p = pools.entry(t.name.clone()).or_default();
                    p.stamp = stamp.clone();
                    p.ready.push_back(rec.id.clone());
                }
                _ => self.drain_one(&rec).await,
            }
        }
    }

    /// One pass: drain stale and surplus pool sandboxes, start spawns for
    /// what is missing.
    async fn fill_pools(self: &Arc<Self>) -> Result<()> {
        let templates = self.store.list_templates().await?;
        let wanted: HashMap<&str, &TemplateRecord> = templates
            .iter()
            .filter(|t| t.pool_size > 0)
            .map(|t| (t.name.as_str(), t))
            .collect();
        // What goes: pools of deleted templates or older versions, surplus.
        let mut drain = Vec::new();
        let mut spawn = Vec::new();
        {
            let mut pools = self.pools.by_template.lock();
            {
                // Reaped or destroyed meanwhile: no longer ready.
                let cache = self.cache.read();
                for p in pools.values_mut() {
                    p.ready.retain(|id| cache.contains_key(id));
                }
            }
            let busy: usize = pools.values().map(|p| p.filling).sum();
            let mut free = FILL_AT_ONCE.saturating_sub(busy);
            for (name, p) in pools.iter_mut() {
                match wanted.get(name.as_str()) {
                    Some(t) if p.stamp == stamp_of(t) => {
                        p.target = t.pool_size;
                        while p.ready.len() as i64 > t.pool_size {
                            drain.extend(p.ready.pop_back());
                        }
                    }
                    Some(t) => {
                        drain.extend(p.ready.drain(..));
                        p.stamp = stamp_of(t);
                        p.target = t.pool_size;
                    }
                    None => {
                        drain.extend(p.ready.drain(..));
                        p.target = 0;
                    }
                }
            }
            for t in wanted.values() {
                let p = pools.entry(t.name.clone()).or_default();
                if p.stamp.is_empty() {
                    p.stamp = stamp_of(t);
                    p.target = t.pool_size;
                }
                while free > 0 && (p.ready.len() + p.filling) < t.pool_size as usize {
                    p.filling += 1;
                    free -= 1;
                    spawn.push((*t).clone());
                }
            }
        }
        for id in drain {
            let rec = self.cache.read().get(&id).cloned();
            if let Some(rec) = rec {
                self.drain_one(&rec).await;
            }
        }
        for t in spawn {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.fill_one(t).await });
        }
        Ok(())
    }

    /// Spawns and sets up one pool sandbox of `t`.
    async fn fill_one(self: Arc<Self>, t: TemplateRecord) {
        let system = Caller {
            actor: "system:pool".into(),
            ..Caller::default()
        };
        let max = self.cfg.defaults.max_ttl.std();
        let ttl = if max.is_zero() {
            POOL_TTL
        } else {
            POOL_TTL.min(max)
        };
        let req = SpawnRequest {
            template: t.name.clone(),
            ttl: GoDuration::from_std(ttl).to_string(),
            ..SpawnRequest::default()
        };
        let stamp = stamp_of(&t);
        let res = self.spawn_as(req, &system, Some(&stamp)).await;
        let stale = {
            let mut pools = self.pools.by_template.lock();
            let p = pools.entry(t.name.clone()).or_default();
            p.filling = p.filling.saturating_sub(1);
            match res {
                Ok(sb) if p.stamp == stamp => {
                    p.ready.push_back(sb.id);
                    None
                }
                // The template changed while this one was set up.
                Ok(sb) => Some(sb.id),
                Err(e) => {
                    p.failures += 1;
                    warn!(template = %t.name, error = %e, "filling the template pool failed");
                    None
                }
            }
        };
        if let Some(id) = stale {
            let rec = self.cache.read().get(&id).cloned();
            if let Some(rec) = rec {
                self.drain_one(&rec).await;
            }
        } else if self
            .pools
            .by_template
            .lock()
            .get(&t.name)
            .is_some_and(|p| p.failures > 0 && p.ready.is_empty())
        {
            // Do not spin on a template whose setup keeps failing.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        self.pools.wake.notify_one();
    }

    async fn drain_one(&self, rec: &SandboxRecord) {
        let system = Caller {
            actor: "system:pool".into(),
            ..Caller::default()
        };
        match self.destroy_record(rec, &system).await {
            Ok(()) => info!(sandbox_id = %rec.id, "drained a template pool sandbox"),
            Err(e) => warn!(sandbox_id = %rec.id, error = %e, "draining a pool sandbox failed"),
        }
    }
}
