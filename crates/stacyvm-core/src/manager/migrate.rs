//! Moving sandboxes off a draining worker (`worker.drain_policy: migrate`).
//!
//! A worker that drains with the `migrate` policy says so in its heartbeat
//! (`capacity.drain_policy`). A control plane then moves each of its
//! sandboxes to the worker placement picks (same image, size, tenant
//! policies), keeping the sandbox id, its record and its `/workspace`
//! files. Processes do not move: the sandbox restarts on its new worker.
//!
//! Each step acts under the sandbox's lease, so no other control plane
//! can act on it halfway:
//! 1. a fresh generation for the old worker fences out calls in flight;
//! 2. `/workspace` is read from the old worker (at most
//!    [`MAX_MOVE_BYTES`], [`MAX_MOVE_FILES`]);
//! 3. the lease is handed to the new worker in one step
//!    ([`crate::store::Store::transfer_lease`]);
//! 4. the new worker spawns the sandbox (under a runtime id and lease of
//!    its own: two workers on one host must not share runtime names) and
//!    gets the files;
//! 5. the record moves under the new lease;
//! 6. the old runtime is destroyed (the old worker accepts a destroy under
//!    a newer lease held by another worker: its copy is stale).
//!
//! A failure before step 5 hands the lease back and leaves the sandbox
//! where it was, untouched.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use stacyvm_api::state;
use tracing::{info, warn};

use super::placement::Want;
use super::workers::status;
use super::{Caller, Manager};
use crate::error::{Error, Result};
use crate::events::{self, kind};
use crate::provider::{Provider, SpawnSpec};
use crate::store::{Fence, SandboxRecord};

/// Most bytes of `/workspace` a move carries.
pub const MAX_MOVE_BYTES: u64 = 256 << 20;
/// Most entries (files and directories) of `/workspace` a move walks.
pub const MAX_MOVE_FILES: usize = 20_000;
/// The directory that moves with a sandbox.
const MOVED_DIR: &str = "/workspace";
/// How long one control plane may take to move one sandbox.
const MOVE_LEASE: Duration = Duration::from_secs(600);

/// One file of a moving workspace.
struct Moved {
    path: String,
    mode: u32,
    data: Vec<u8>,
}

impl Manager {
    /// Moves the sandboxes of workers that drain with the `migrate` policy
    /// to other workers; returns how many moved. One control plane moves
    /// a given sandbox (the one that takes its `migrate:` lease).
    pub async fn migrate_draining(&self) -> Result<usize> {
        if self.remote.read().is_none() {
            return Ok(0);
        }
        let workers = self.store.list_workers().await?;
        let draining: HashSet<&str> = workers
            .iter()
            .filter(|w| {
                w.status == status::DRAINING
                    && w.capacity.get("drain_policy").and_then(|v| v.as_str()) == Some("migrate")
            })
            .map(|w| w.id.as_str())
            .collect();
        if draining.is_empty() {
            return Ok(0);
        }
        let mut moved = 0;
        for rec in self.store.list_active_sandboxes().await? {
            if !draining.contains(rec.worker_id.as_str()) || rec.state != state::RUNNING {
                continue;
            }
            let key = format!("migrate:{}", rec.id);
            if self
                .store
                .acquire_lease(&key, "migration", self.worker_id(), MOVE_LEASE)
                .await
                .is_err()
            {
                continue;
            }
            let r = self.migrate(&rec).await;
            let _ = self.store.release_lease(&key, self.worker_id()).await;
            if let Err(e) = &r {
                if e.kind() == crate::ErrorKind::ResourceLimit {
                    // No worker has room yet: the next pass tries again.
                    tracing::debug!(sandbox_id = %rec.id, error = %e, "no worker can take a draining worker's sandbox yet");
                    continue;
                }
            }
            let ok = r.is_ok();
            let detail = match &r {
                Ok(to) => format!("moved from {} to {to}", rec.worker_id),
                Err(e) => format!("moving from {} failed: {e}", rec.worker_id),
            };
            self.audit(
                &Caller {
                    actor: "system:migrate".into(),
                    tenant_id: rec.tenant_id.clone(),
                    ..Caller::default()
                },
                &rec.owner_id,
                "sandbox.migrate",
                &rec.id,
                &rec.image,
                &rec.provider,
                ok,
                detail.clone(),
            );
            match r {
                Ok(to) => {
                    moved += 1;
                    info!(sandbox_id = %rec.id, from = %rec.worker_id, to = %to, "sandbox moved off a draining worker");
                    self.events.publish(
                        kind::RECONCILE_ACTION,
                        &rec.id,
                        events::data([
                            ("action", json!("migrated")),
                            ("from", json!(rec.worker_id)),
                            ("to", json!(to)),
                        ]),
                    );
                }
                Err(e) => {
                    warn!(sandbox_id = %rec.id, from = %rec.worker_id, error = %e, "moving a sandbox off a draining worker failed");
                }
            }
        }
        Ok(moved)
    }

    /// Moves one sandbox; returns the worker it went to.
    async fn migrate(&self, rec: &SandboxRecord) -> Result<String> {
        super::vmpool::refuse_pooled(rec, "move to another worker")?;
        let from = self.provider_of(rec).await?;
        let policies = self.store.list_policies(Some(&rec.tenant_id)).await?;
        let placed = self
            .place(
                &rec.provider,
                Want {
                    image: &rec.image,
                    policies: &policies,
                },
            )
            .await?;
        if placed.worker_id == rec.worker_id {
            return Err(Error::conflict("no other worker can take the sandbox"));
        }
        let ttl = (rec.expires_at - chrono::Utc::now())
            .to_std()
            .unwrap_or_default()
            + super::LEASE_GRACE;
        // 1. Fence out anything still acting under the old generation.
        let old = self
            .store
            .acquire_lease(&rec.id, "sandbox", &rec.worker_id, ttl)
            .await?
            .fence();
        self.lease_changed(&rec.id);
        let target = rec.runtime_id().to_string();
        // 2. The files.
        let files = read_tree(from.as_ref(), &target).await?;
        // 3. The lease, in one step.
        let new = self
            .store
            .transfer_lease(&rec.id, &old, &placed.worker_id, ttl)
            .await?
            .fence();
        self.lease_changed(&rec.id);
        // 4. The new runtime, with the files. It gets a runtime id of its
        // own (two workers on one host must not share runtime names), with
        // a lease of its own that worker RPC checks for it.
        let runtime = crate::paths::new_sandbox_id();
        if let Err(e) = self
            .store
            .acquire_lease(&runtime, "sandbox", &placed.worker_id, ttl)
            .await
        {
            self.hand_back(&rec.id, &new, &rec.worker_id, ttl).await;
            return Err(e);
        }
        let spec = SpawnSpec {
            id: runtime.clone(),
            image: rec.image.clone(),
            memory_mb: rec.memory_mb,
            vcpus: rec.vcpus,
            metadata: rec.metadata.clone(),
            owner_id: rec.owner_id.clone(),
            tenant_id: rec.tenant_id.clone(),
            expires_at: rec.expires_at,
            network_mode: String::new(),
            snapshot: None,
            egress: None,
            volumes: Vec::new(),
        };
        let landed = async {
            let spawned = placed.provider.spawn(&spec).await?;
            if let Err(e) = write_tree(placed.provider.as_ref(), &spawned.runtime_id, files).await {
                self.destroy_runtime(&placed.provider, &spawned.runtime_id)
                    .await;
                return Err(e);
            }
            Ok(spawned)
        }
        .await;
        let spawned = match landed {
            Ok(s) => s,
            Err(e) => {
                let _ = self.store.release_lease(&runtime, &placed.worker_id).await;
                self.hand_back(&rec.id, &new, &rec.worker_id, ttl).await;
                return Err(e);
            }
        };
        // 5. The record, under the new lease.
        let vm_id = spawned.runtime_id.clone();
        if let Err(e) = self
            .store
            .set_sandbox_worker(&rec.id, &placed.worker_id, &vm_id, state::RUNNING, &new)
            .await
        {
            self.destroy_runtime(&placed.provider, &spawned.runtime_id)
                .await;
            let _ = self.store.release_lease(&runtime, &placed.worker_id).await;
            self.hand_back(&rec.id, &new, &rec.worker_id, ttl).await;
            return Err(e);
        }
        self.cache.write().remove(&rec.id);
        // 6. The old copy goes.
        if let Err(e) = from.destroy(&target).await {
            warn!(sandbox_id = %rec.id, worker = %rec.worker_id, error = %e, "destroying the moved sandbox's old copy failed (its worker drops it when it stops)");
        }
        Ok(placed.worker_id)
    }

    /// Gives the lease back to the old worker after a failed move.
    async fn hand_back(&self, id: &str, lease: &Fence, to: &str, ttl: Duration) {
        if let Err(e) = self.store.transfer_lease(id, lease, to, ttl).await {
            warn!(sandbox_id = id, error = %e, "handing the lease back after a failed move failed");
        }
        self.lease_changed(id);
    }
}

/// Every regular file under [`MOVED_DIR`], with its mode.
async fn read_tree(p: &dyn Provider, runtime: &str) -> Result<Vec<Moved>> {
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut entries = 0usize;
    let mut dirs = vec![MOVED_DIR.to_string()];
    while let Some(dir) = dirs.pop() {
        for f in p.list_files(runtime, &dir).await? {
            // Directories count too: a symlink loop listed as directories
            // ends here instead of walking forever.
            entries += 1;
            if entries > MAX_MOVE_FILES {
                return Err(Error::too_large(format!(
                    "{MOVED_DIR} has more than {MAX_MOVE_FILES} entries to move"
                )));
            }
            if f.is_dir {
                dirs.push(f.path);
                continue;
            }
            // Symlinks and special files are not regular: the read refuses
            // them, and they stay behind.
            let mut s = match p
                .read_file_stream(runtime, &f.path, MAX_MOVE_BYTES - total)
                .await
            {
                Ok(s) => s,
                Err(e) if e.kind() == crate::ErrorKind::InvalidInput => continue,
                Err(e) => return Err(e),
            };
            let mut data = Vec::with_capacity(usize::try_from(s.size).unwrap_or(0));
            while let Some(c) = s.chunks.recv().await {
                data.extend_from_slice(&c?);
            }
            total += data.len() as u64;
            let mode = crate::paths::parse_mode(&f.mode).unwrap_or(0o644) & 0o7777;
            out.push(Moved {
                path: f.path,
                mode,
                data,
            });
        }
    }
    Ok(out)
}

/// Writes the moved files into the new runtime.
async fn write_tree(p: &dyn Provider, runtime: &str, files: Vec<Moved>) -> Result<()> {
    for f in files {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let n = f.data.len() as u64;
        let _ = tx.send(f.data).await;
        drop(tx);
        p.write_file_stream(runtime, &f.path, f.mode, rx, n.max(1))
            .await?;
    }
    Ok(())
}
