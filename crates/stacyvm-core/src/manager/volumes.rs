//! Named persistent volumes: ownership and tenancy in the store, limits,
//! audit, and the claims of spawns that mount them (one read-write mount
//! at a time). The host holds the data ([`VolumeHost`]).

use std::sync::Arc;

use stacyvm_api::{CreateVolumeRequest, SpawnRequest, Volume, VolumeUse};
use tracing::info;

use super::{Caller, Manager};
use crate::error::{Error, ErrorKind, Result};
use crate::provider::{capability, ArchiveReport, FileStream, Provider};
use crate::store::VolumeRecord;
use crate::volumes::{self, Mounted, VolumeBind, VolumeHost};

/// What an operation in flight does with a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// A spawn mounting it read-only (or a running sandbox that does).
    Read,
    /// A spawn mounting it read-write (or a running sandbox that does).
    Write,
    /// An export or import: the server walks its files as root, so no
    /// sandbox may write to them meanwhile.
    Transfer,
    /// A deletion: nothing else.
    Delete,
    /// A microVM attaching it as a block device (or a running one that
    /// has): nothing else, not even readers.
    Device,
}

impl Use {
    fn conflicts(self, other: Use) -> bool {
        use Use::*;
        matches!(
            (self, other),
            (Delete | Device, _)
                | (_, Delete | Device)
                | (Write, Write)
                | (Write, Transfer)
                | (Transfer, Write)
        )
    }

    fn what(self) -> &'static str {
        match self {
            Use::Read => "a sandbox being spawned (read-only)",
            Use::Write => "a sandbox being spawned (read-write)",
            Use::Transfer => "an export or import",
            Use::Delete => "its deletion",
            Use::Device => "a microVM being spawned",
        }
    }
}

/// Volumes operations in flight have claimed: (volume id, use, claim).
#[derive(Debug, Default)]
pub(crate) struct Claims {
    held: parking_lot::Mutex<Vec<(String, Use, u64)>>,
    next: std::sync::atomic::AtomicU64,
}

/// An operation's claims; dropped when it ends (a spawn's record then
/// holds its mounts). Volumes lent to a microVM's spawn are given back
/// then too: the VM holds their images open by now, or never started.
#[derive(Debug)]
pub(crate) struct ClaimGuard {
    claims: Arc<Claims>,
    token: u64,
    lent: Vec<String>,
    host: Option<Arc<dyn VolumeHost>>,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if let Some(h) = &self.host {
            for id in &self.lent {
                h.give_back(id);
            }
        }
        self.claims.held.lock().retain(|(_, _, t)| *t != self.token);
    }
}

impl Caller {
    /// Whether the volume `r` is visible to this caller (the rule of
    /// sandboxes: tenancy, then ownership).
    pub fn sees_volume(&self, r: &VolumeRecord) -> bool {
        self.sees_owned(&r.tenant_id, &r.owner_id)
    }
}

impl Manager {
    /// Gives this server volumes (the host that keeps their data).
    pub fn attach_volumes(&self, host: Arc<dyn VolumeHost>) {
        *self.volume_host.write() = Some(host);
    }

    fn volume_host(&self) -> Result<Arc<dyn VolumeHost>> {
        self.volume_host.read().clone().ok_or_else(|| {
            Error::unsupported(
                "this server has no volumes (they need a server running as root, with loop devices)",
            )
        })
    }

    /// Running sandboxes' mounts of volume `id`.
    async fn volume_uses(&self, id: &str) -> Result<Vec<VolumeUse>> {
        Ok(self
            .active_records()
            .await?
            .iter()
            .flat_map(|r| {
                volumes::mounts_of(&r.metadata)
                    .into_iter()
                    .filter(|m| m.id == id)
                    .map(|m| VolumeUse {
                        sandbox_id: r.id.clone(),
                        path: m.path,
                        read_only: m.read_only,
                    })
            })
            .collect())
    }

    /// The API view (usage 0 where this server does not hold the data).
    async fn volume_view(&self, r: &VolumeRecord) -> Result<Volume> {
        let host = self.volume_host.read().clone();
        let used_bytes = match host {
            Some(h) => h.used_bytes(&r.id).await.unwrap_or(0),
            None => 0,
        };
        Ok(Volume {
            id: r.id.clone(),
            name: r.name.clone(),
            size_mb: r.size_mb,
            used_bytes,
            owner_id: r.owner_id.clone(),
            tenant_id: r.tenant_id.clone(),
            created_at: r.created_at,
            mounts: self.volume_uses(&r.id).await?,
        })
    }

    /// Claims `wants` (volume, use) for an operation, or says what holds
    /// them. Claims of other operations are checked under the lock; the
    /// running sandboxes' mounts after the claim is in (an operation that
    /// ended before ours began has its record written by then), so two
    /// racing operations never both pass.
    async fn claim(&self, wants: &[(&VolumeRecord, Use)]) -> Result<ClaimGuard> {
        let claims = self.volume_claims.clone();
        let token = claims
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut held = claims.held.lock();
            for (r, u) in wants {
                if let Some((_, other, _)) = held
                    .iter()
                    .find(|(id, other, _)| *id == r.id && u.conflicts(*other))
                {
                    return Err(Error::conflict(format!(
                        "volume {:?} is in use by {}",
                        r.name,
                        other.what()
                    )));
                }
            }
            for (r, u) in wants {
                held.push((r.id.clone(), *u, token));
            }
        }
        let guard = ClaimGuard {
            claims,
            token,
            lent: Vec::new(),
            host: None,
        };
        let records = self.active_records().await?;
        for (r, u) in wants {
            let mut attached = false;
            let holders: Vec<String> = records
                .iter()
                .filter(|s| {
                    volumes::mounts_of(&s.metadata).iter().any(|m| {
                        let theirs = if m.device {
                            Use::Device
                        } else if m.read_only {
                            Use::Read
                        } else {
                            Use::Write
                        };
                        let hit = m.id == r.id && u.conflicts(theirs);
                        attached |= hit && m.device;
                        hit
                    })
                })
                .map(|s| s.id.clone())
                .collect();
            if attached {
                return Err(Error::conflict(format!(
                    "volume {:?} is attached to microVM {} (its guest owns the file system until the sandbox is destroyed)",
                    r.name,
                    holders.join(", ")
                )));
            }
            if !holders.is_empty() {
                return Err(Error::conflict(match u {
                    Use::Write => format!(
                        "volume {:?} is mounted read-write by {}: one sandbox at a time mounts a volume read-write (any number read-only)",
                        r.name,
                        holders.join(", ")
                    ),
                        Use::Transfer => format!(
                        "volume {:?} is mounted read-write by {}; export or import it when no sandbox writes to it",
                        r.name,
                        holders.join(", ")
                    ),
                    Use::Device => format!(
                        "volume {:?} is mounted by {}: a microVM mounts a volume alone (its guest owns the file system), so destroy {} first",
                        r.name,
                        holders.join(", "),
                        if holders.len() > 1 { "them" } else { "it" }
                    ),
                    _ => format!(
                        "volume {:?} is mounted by {}; destroy {} first",
                        r.name,
                        holders.join(", "),
                        if holders.len() > 1 { "them" } else { "it" }
                    ),
                }));
            }
        }
        Ok(guard)
    }

    /// `POST /volumes`.
    pub async fn create_volume(&self, req: CreateVolumeRequest, caller: &Caller) -> Result<Volume> {
        let host = self.volume_host()?;
        volumes::check_name(&req.name)?;
        let size_mb = if req.size_mb == 0 {
            volumes::DEFAULT_SIZE_MB
        } else {
            req.size_mb
        };
        let max = self.cfg.defaults.max_volume_mb;
        if size_mb < volumes::MIN_SIZE_MB || (max > 0 && size_mb > max) {
            return Err(Error::invalid(format!(
                "size_mb {size_mb}: a volume has {} to {} MiB (defaults.max_volume_mb)",
                volumes::MIN_SIZE_MB,
                if max > 0 { max } else { i64::MAX }
            )));
        }
        let owner = caller.owner_for(&req.owner_id)?;
        let tenant = caller.tenant_id.clone();
        let existing = self.store.list_volumes(Some(&tenant)).await?;
        if existing.iter().any(|v| v.name == req.name) {
            return Err(Error::conflict(format!(
                "a volume named {:?} already exists",
                req.name
            )));
        }
        let limit = self.cfg.defaults.max_volumes_per_owner;
        let held = existing.iter().filter(|v| v.owner_id == owner).count();
        if limit > 0 && i64::try_from(held).unwrap_or(i64::MAX) >= limit {
            return Err(Error::limit(format!(
                "owner {owner:?} keeps {held} volumes, the most defaults.max_volumes_per_owner allows; delete some (DELETE /api/v1/volumes/{{name}})"
            )));
        }
        let r = VolumeRecord {
            id: volumes::new_volume_id(),
            name: req.name.clone(),
            size_mb,
            owner_id: owner.clone(),
            tenant_id: tenant,
            created_at: crate::store::record_now(),
        };
        let res = async {
            host.create(&r.id, size_mb).await?;
            if let Err(e) = self.store.insert_volume(&r).await {
                let _ = host.remove(&r.id).await;
                return Err(e);
            }
            Ok(())
        }
        .await;
        self.audit(
            caller,
            &owner,
            "volume.create",
            "",
            &r.name,
            "",
            res.is_ok(),
            match &res {
                Ok(()) => format!("id={} size_mb={size_mb}", r.id),
                Err(e) => e.to_string(),
            },
        );
        res?;
        info!(volume = %r.id, name = %r.name, size_mb, "volume created");
        self.volume_view(&r).await
    }

    /// A volume by name (in the caller's tenant) or id, if the caller
    /// sees it.
    async fn find_volume(&self, name: &str, caller: &Caller) -> Result<VolumeRecord> {
        let missing = || Error::not_found(format!("volume {name:?}"));
        let found = if volumes::is_volume_id(name) {
            match self.store.get_volume(name).await {
                Ok(r) => Some(r),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            }
        } else {
            self.store
                .list_volumes(Some(&caller.tenant_id))
                .await?
                .into_iter()
                .find(|v| v.name == name)
        };
        found.filter(|r| caller.sees_volume(r)).ok_or_else(missing)
    }

    /// `GET /volumes`: the caller's volumes, oldest first.
    pub async fn list_volumes(&self, caller: &Caller) -> Result<Vec<Volume>> {
        let tenant = (!caller.sees_all_tenants()).then_some(caller.tenant_id.as_str());
        let mut out = Vec::new();
        for r in self.store.list_volumes(tenant).await? {
            if caller.sees_volume(&r) {
                out.push(self.volume_view(&r).await?);
            }
        }
        Ok(out)
    }

    /// `GET /volumes/{name}`.
    pub async fn get_volume(&self, name: &str, caller: &Caller) -> Result<Volume> {
        let r = self.find_volume(name, caller).await?;
        self.volume_view(&r).await
    }

    /// `DELETE /volumes/{name}`: refused while a sandbox mounts it.
    pub async fn delete_volume(&self, name: &str, caller: &Caller) -> Result<()> {
        let r = self.find_volume(name, caller).await?;
        let host = self.volume_host()?;
        let res = async {
            let _claim = self.claim(&[(&r, Use::Delete)]).await?;
            // The data first (a mount that cannot go is an error that keeps
            // everything), then the record.
            host.remove(&r.id).await?;
            match self.store.delete_volume(&r.id).await {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        .await;
        self.audit(
            caller,
            &r.owner_id,
            "volume.delete",
            "",
            &r.name,
            "",
            res.is_ok(),
            res.as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_else(|| format!("id={}", r.id)),
        );
        res
    }

    /// `GET /volumes/{name}/archive`: its files as a tar stream.
    pub async fn export_volume(&self, name: &str, caller: &Caller) -> Result<FileStream> {
        let r = self.find_volume(name, caller).await?;
        let host = self.volume_host()?;
        let claim = self.claim(&[(&r, Use::Transfer)]).await?;
        let stream = host.export(&r.id, self.archive_limits()).await?;
        // The claim lasts as long as the stream.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let mut chunks = stream.chunks;
        tokio::spawn(async move {
            let _claim = claim;
            while let Some(c) = chunks.recv().await {
                if tx.send(c).await.is_err() {
                    break;
                }
            }
        });
        Ok(FileStream {
            size: stream.size,
            chunks: rx,
        })
    }

    /// `PUT /volumes/{name}/archive`: extracts a tar stream into it.
    pub async fn import_volume(
        &self,
        name: &str,
        chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
        caller: &Caller,
    ) -> Result<ArchiveReport> {
        let r = self.find_volume(name, caller).await?;
        let host = self.volume_host()?;
        let _claim = self.claim(&[(&r, Use::Transfer)]).await?;
        let res = host.import(&r.id, chunks, self.archive_limits()).await;
        self.audit(
            caller,
            &r.owner_id,
            "volume.import",
            "",
            &r.name,
            "",
            res.is_ok(),
            match &res {
                Ok(rep) => format!("entries={} bytes={}", rep.entries, rep.bytes),
                Err(e) => e.to_string(),
            },
        );
        res
    }

    /// The volumes a spawn mounts: checked (visible to the caller, the
    /// provider mounts volumes, the sandbox runs on this host, one writer
    /// at a time), claimed until the spawn ends, with the metadata that
    /// records them on the sandbox.
    pub(super) async fn spawn_volumes(
        &self,
        req: &SpawnRequest,
        caller: &Caller,
        provider: &Arc<dyn Provider>,
        worker_id: &str,
    ) -> Result<Option<(Vec<VolumeBind>, String, ClaimGuard)>> {
        if req.volumes.is_empty() {
            return Ok(None);
        }
        let host = self.volume_host()?;
        if req.volumes.len() > volumes::MAX_PER_SANDBOX {
            return Err(Error::invalid(format!(
                "a sandbox mounts at most {} volumes",
                volumes::MAX_PER_SANDBOX
            )));
        }
        let mut wanted: Vec<(VolumeRecord, Mounted)> = Vec::new();
        for v in &req.volumes {
            let path = volumes::check_path(&v.path)?;
            let r = self.find_volume(&v.volume, caller).await?;
            if wanted.iter().any(|(w, _)| w.id == r.id) {
                return Err(Error::invalid(format!(
                    "volume {:?} is named twice",
                    v.volume
                )));
            }
            if wanted.iter().any(|(_, m)| {
                m.path == path
                    || path.starts_with(&format!("{}/", m.path))
                    || m.path.starts_with(&format!("{path}/"))
            }) {
                return Err(Error::invalid(format!(
                    "volume path {path:?} overlaps another volume's"
                )));
            }
            let m = Mounted {
                id: r.id.clone(),
                path,
                read_only: v.read_only,
                device: false,
            };
            wanted.push((r, m));
        }
        let caps = provider.capabilities();
        let block = !caps.iter().any(|c| c == capability::VOLUMES);
        if block && !caps.iter().any(|c| c == capability::BLOCK_VOLUMES) {
            return Err(Error::invalid(format!(
                "provider {} cannot mount volumes (native, docker and qemu can)",
                provider.name()
            )));
        }
        if worker_id != self.worker_id() {
            return Err(Error::invalid(
                "volumes live on the control plane's host: a spawn with volumes cannot run on a worker",
            ));
        }
        let wants: Vec<(&VolumeRecord, Use)> = wanted
            .iter()
            .map(|(r, m)| {
                let u = if block {
                    Use::Device
                } else if m.read_only {
                    Use::Read
                } else {
                    Use::Write
                };
                (r, u)
            })
            .collect();
        let mut guard = self.claim(&wants).await?;
        let mut binds = Vec::new();
        for (r, m) in &mut wanted {
            let host_path = if block {
                // The guest mounts the image itself: the host lets go of
                // it first (given back when the spawn ends, see ClaimGuard).
                guard.host = Some(host.clone());
                let img = host.lend(&r.id).await?;
                guard.lent.push(r.id.clone());
                m.device = true;
                img
            } else {
                host.path(&r.id).await?
            };
            binds.push(VolumeBind {
                id: r.id.clone(),
                host_path,
                target: m.path.clone(),
                read_only: m.read_only,
                device: block,
            });
        }
        let recorded: Vec<&Mounted> = wanted.iter().map(|(_, m)| m).collect();
        let json = serde_json::to_string(&recorded)
            .map_err(|e| Error::internal(format!("recording volume mounts: {e}")))?;
        Ok(Some((binds, json, guard)))
    }
}
