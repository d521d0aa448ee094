//! Snapshots of sandboxes and forks: the rules around
//! [`Provider::snapshot_sandbox`] (ownership and tenancy in the store,
//! the per-owner limit, audit). The provider holds the data.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use stacyvm_api::{ForkRequest, ForkResponse, Sandbox, SnapshotSummary, SpawnRequest};
use tracing::{info, warn};

use super::{Caller, Manager};
use crate::error::{Error, ErrorKind, Result};
use crate::paths;
use crate::provider::{capability, Provider};
use crate::store::SnapshotRecord;

/// Most children one fork starts.
pub const MAX_FORK: i64 = 16;

/// The API view of a snapshot record.
pub fn summary(r: &SnapshotRecord) -> SnapshotSummary {
    SnapshotSummary {
        image: r.image.clone(),
        provider: r.provider.clone(),
        created_at: r.created_at,
        id: r.id.clone(),
        memory_mb: r.memory_mb,
        vcpus: r.vcpus,
        size_bytes: r.size_bytes,
        source_sandbox_id: r.source_sandbox_id.clone(),
        network_mode: r.network_mode.clone(),
        owner_id: r.owner_id.clone(),
    }
}

impl Caller {
    /// Whether the snapshot `r` is visible to this caller (the rule of
    /// sandboxes: tenancy, then ownership).
    pub fn sees_snapshot(&self, r: &SnapshotRecord) -> bool {
        self.sees_owned(&r.tenant_id, &r.owner_id)
    }
}

impl Manager {
    /// Snapshots sandbox `id` (it keeps running): `POST
    /// /sandboxes/{id}/snapshot`.
    pub async fn snapshot_sandbox(&self, id: &str, caller: &Caller) -> Result<SnapshotSummary> {
        let rec = self.get(id, caller).await?;
        let provider = self.provider_of(&rec).await?;
        let res = self.snapshot_record(&provider, &rec, caller).await;
        self.audit(
            caller,
            &rec.owner_id,
            "sandbox.snapshot",
            &rec.id,
            res.as_ref().map_or("", |s| s.id.as_str()),
            &rec.provider,
            res.is_ok(),
            match &res {
                Ok(s) => format!("snapshot={} bytes={}", s.id, s.size_bytes),
                Err(e) => e.to_string(),
            },
        );
        res.map(|r| summary(&r))
    }

    async fn snapshot_record(
        &self,
        provider: &Arc<dyn Provider>,
        rec: &crate::store::SandboxRecord,
        caller: &Caller,
    ) -> Result<SnapshotRecord> {
        if !provider
            .capabilities()
            .iter()
            .any(|c| c == capability::SANDBOX_SNAPSHOTS)
        {
            return Err(Error::unsupported(format!(
                "provider {} cannot snapshot sandboxes (native, docker and qemu can)",
                rec.provider
            )));
        }
        let limit = self.cfg.defaults.max_snapshots_per_owner;
        if limit > 0 {
            let held = self
                .store
                .list_snapshots(Some(&rec.tenant_id))
                .await?
                .iter()
                .filter(|s| s.owner_id == rec.owner_id)
                .count();
            if i64::try_from(held).unwrap_or(i64::MAX) >= limit {
                return Err(Error::limit(format!(
                    "owner {:?} keeps {held} snapshots, the most defaults.max_snapshots_per_owner allows; delete some (DELETE /api/v1/snapshots/{{id}})",
                    rec.owner_id
                )));
            }
        }
        super::vmpool::refuse_pooled(rec, "be snapshotted or forked")?;
        if crate::volumes::mounts_of(&rec.metadata)
            .iter()
            .any(|m| m.device)
        {
            // A microVM's snapshot is its whole machine, volume disks
            // included: a child would attach a volume another VM holds.
            return Err(Error::conflict(format!(
                "sandbox {} has volumes attached as disks (a microVM): it cannot be snapshotted or forked",
                rec.id
            )));
        }
        let snap_id = paths::new_snapshot_id();
        let target = if rec.vm_id.is_empty() {
            &rec.id
        } else {
            &rec.vm_id
        };
        let started = Instant::now();
        // No pause or resume meanwhile: a provider that freezes the
        // sandbox for the copy must find it as it left it.
        let made = {
            let _turn = self.pause_lock.lock().await;
            provider.snapshot_sandbox(target, &snap_id).await
        };
        self.metrics.observe(
            "snapshot",
            &rec.provider,
            started.elapsed(),
            made.as_ref().err().map(ToString::to_string).as_deref(),
        );
        let made = made?;
        let r = SnapshotRecord {
            id: snap_id,
            provider: rec.provider.clone(),
            source_sandbox_id: rec.id.clone(),
            image: rec.image.clone(),
            memory_mb: rec.memory_mb,
            vcpus: rec.vcpus,
            network_mode: made.network_mode,
            size_bytes: made.size_bytes,
            owner_id: rec.owner_id.clone(),
            tenant_id: rec.tenant_id.clone(),
            created_at: Utc::now(),
        };
        if let Err(e) = self.store.insert_snapshot(&r).await {
            if let Err(e2) = provider.delete_snapshot(&r.id).await {
                warn!(snapshot = %r.id, error = %e2, "removing an unrecorded snapshot failed");
            }
            return Err(e);
        }
        let _ = caller;
        info!(sandbox_id = %rec.id, snapshot = %r.id, bytes = r.size_bytes, "sandbox snapshot taken");
        Ok(r)
    }

    /// The snapshots this caller sees, oldest first.
    pub async fn list_snapshots(&self, caller: &Caller) -> Result<Vec<SnapshotSummary>> {
        let tenant = (!caller.sees_all_tenants()).then_some(caller.tenant_id.as_str());
        Ok(self
            .store
            .list_snapshots(tenant)
            .await?
            .iter()
            .filter(|r| caller.sees_snapshot(r))
            .map(summary)
            .collect())
    }

    /// One snapshot; one the caller may not see does not exist for it.
    pub async fn get_snapshot(&self, id: &str, caller: &Caller) -> Result<SnapshotRecord> {
        let missing = || Error::not_found(format!("snapshot {id:?}"));
        if !paths::is_snapshot_id(id) {
            return Err(missing());
        }
        match self.store.get_snapshot(id).await {
            Ok(r) if caller.sees_snapshot(&r) => Ok(r),
            Ok(_) => Err(missing()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(missing()),
            Err(e) => Err(e),
        }
    }

    /// Deletes a snapshot (children started from it run on).
    pub async fn delete_snapshot(&self, id: &str, caller: &Caller) -> Result<()> {
        let r = self.get_snapshot(id, caller).await?;
        let res = self.remove_snapshot(&r).await;
        self.audit(
            caller,
            &r.owner_id,
            "snapshot.delete",
            &r.source_sandbox_id,
            &r.id,
            &r.provider,
            res.is_ok(),
            res.as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        res
    }

    async fn remove_snapshot(&self, r: &SnapshotRecord) -> Result<()> {
        // Data first: a row without data is found and deleted again; data
        // without a row would be lost to its owner.
        match self.registry.get(&r.provider) {
            Ok(p) => p.delete_snapshot(&r.id).await?,
            Err(e) => {
                warn!(snapshot = %r.id, error = %e, "provider gone; dropping the record only")
            }
        }
        match self.store.delete_snapshot(&r.id).await {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The spawn request of a child of snapshot `id`: provider, image,
    /// size and network are the snapshot's; asking for others is a 400.
    /// The child keeps the source sandbox's egress: its policy unless the
    /// request names one, and its template allowlist, which is returned
    /// (a source whose record is gone is a 409: its limits are unknown).
    pub(super) async fn apply_snapshot(
        &self,
        req: &mut SpawnRequest,
        caller: &Caller,
    ) -> Result<Vec<String>> {
        if !req.template.is_empty() {
            return Err(Error::invalid(
                "a spawn starts from a template or from a snapshot, not both",
            ));
        }
        let s = self.get_snapshot(&req.snapshot, caller).await?;
        for (field, asked, has) in [
            ("provider", &req.provider, &s.provider),
            ("image", &req.image, &s.image),
            ("network_mode", &req.network_mode, &s.network_mode),
        ] {
            if !asked.is_empty() && asked != has {
                return Err(Error::invalid(format!(
                    "snapshot {} has {field} {has:?}; its children cannot have {asked:?}",
                    s.id
                )));
            }
        }
        for (field, asked, has) in [
            ("memory_mb", req.memory_mb, s.memory_mb),
            ("vcpus", req.vcpus, s.vcpus),
        ] {
            if asked != 0 && asked != has {
                return Err(Error::invalid(format!(
                    "snapshot {} has {field} {has}; its children cannot have {asked}",
                    s.id
                )));
            }
        }
        let source = match self.store.get_sandbox(&s.source_sandbox_id).await {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::conflict(format!(
                    "snapshot {}: the record of its source sandbox {} is gone, so its network limits cannot be carried over",
                    s.id, s.source_sandbox_id
                )))
            }
            Err(e) => return Err(e),
        };
        if req.network.is_none() {
            req.network = super::network::policy_of(&source.metadata);
        }
        req.provider = s.provider;
        req.image = s.image;
        req.network_mode = s.network_mode;
        req.memory_mb = s.memory_mb;
        req.vcpus = s.vcpus;
        Ok(super::network::allowed_hosts_of(&source.metadata))
    }

    /// `POST /sandboxes/{id}/fork`: snapshots sandbox `id` and starts
    /// `count` children of it, all or none. The snapshot is deleted once
    /// they run unless `keep_snapshot` asks for it.
    pub async fn fork(&self, id: &str, req: &ForkRequest, caller: &Caller) -> Result<ForkResponse> {
        let count = if req.count == 0 { 1 } else { req.count };
        if !(1..=MAX_FORK).contains(&count) {
            return Err(Error::invalid(format!(
                "count {count}: a fork starts 1 to {MAX_FORK} sandboxes"
            )));
        }
        // Bad TTLs are refused before the source is paused.
        self.parse_ttl(&req.ttl)?;
        let snap = self.snapshot_sandbox(id, caller).await?;
        let spawn = |_: i64| {
            let child = SpawnRequest {
                snapshot: snap.id.clone(),
                ttl: req.ttl.clone(),
                metadata: req.metadata.clone(),
                ..Default::default()
            };
            self.spawn(child, caller)
        };
        let results = futures::future::join_all((0..count).map(spawn)).await;
        let mut children: Vec<Sandbox> = Vec::new();
        let mut failure = None;
        for r in results {
            match r {
                Ok(sb) => children.push(sb),
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        let snap_id = snap.id.clone();
        let forget = |reason: &'static str| {
            let snap_id = snap_id.clone();
            async move {
                if let Ok(r) = self.get_snapshot(&snap_id, caller).await {
                    if let Err(e) = self.remove_snapshot(&r).await {
                        warn!(snapshot = %snap_id, error = %e, reason, "removing a fork's snapshot failed");
                    }
                }
            }
        };
        if let Some(e) = failure {
            for c in &children {
                if let Err(e2) = self.destroy(&c.id, caller).await {
                    warn!(sandbox_id = %c.id, error = %e2, "destroying a fork child after a failed sibling");
                }
            }
            forget("fork failed").await;
            return Err(e);
        }
        let snapshot = if req.keep_snapshot {
            Some(snap)
        } else {
            forget("fork done").await;
            None
        };
        Ok(ForkResponse {
            sandboxes: children,
            snapshot,
        })
    }
}
