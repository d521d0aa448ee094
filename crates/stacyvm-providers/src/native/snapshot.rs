//! Snapshots of native sandboxes: their files, as the overlay upper dir
//! holds them (`POST /sandboxes/{id}/snapshot`, `/fork`).
//!
//! Layout, beside the sandboxes (`<state>/snapshots/<snap-id>/`):
//! - `layer/`: a copy of the source's upper dir, made while the source is
//!   frozen, with its user-namespace ids shifted back to the sandbox's own
//!   (0 = sandbox root). A child mounts it as its topmost lower layer,
//!   idmapped into its own namespace like the image layers below it, over
//!   an empty upper dir of its own: every child starts with the source's
//!   files and writes privately;
//! - `snapshot.json`: what it was taken of;
//! - `deleted`: the snapshot was deleted while children still ran on its
//!   layer; the last of them to go removes the directory.
//!
//! The copy ([`stacyvm_sandbox::treecopy`]) never follows a link, so a
//! sandbox that swaps a directory for a symlink mid-copy gets its own link
//! copied, never the host file it names; it keeps owners, modes, times,
//! hard links, whiteouts and overlay opacity.
//!
//! Memory, processes and tmpfs mounts (`/tmp`, `/run`, `/dev/shm`) are
//! not part of a native snapshot: a child boots fresh on the files.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use stacyvm_core::{Error, Result};
pub use stacyvm_sandbox::treecopy::Shift;
use stacyvm_sandbox::treecopy::{self, CopyError};

use super::disk;

/// Where a provider with state dir `state` keeps its snapshots.
pub fn root(state: &Path) -> PathBuf {
    state.join("snapshots")
}

/// The layer children of `snap` mount (see [`Snapshots::layer`]).
pub fn layer_path(state: &Path, snap: &str) -> String {
    root(state)
        .join(snap)
        .join("layer")
        .to_string_lossy()
        .to_string()
}

/// What a snapshot was taken of (`snapshot.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Info {
    pub id: String,
    pub source: String,
    pub image: String,
    pub network_mode: String,
    pub created_at: DateTime<Utc>,
    pub size_bytes: u64,
}

/// The snapshots of one native provider.
#[derive(Debug)]
pub struct Snapshots {
    root: PathBuf,
    /// Children booting from a snapshot whose `meta.json` may not exist
    /// yet (child id → snapshot id); with the metas, what keeps a deleted
    /// snapshot's layer on disk. Also serialises every decision to remove
    /// a layer.
    pending: Mutex<HashMap<String, String>>,
}

impl Snapshots {
    pub fn new(root: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&root)
            .map_err(|e| Error::internal(format!("creating {}", root.display())).with_source(e))?;
        super::private_dir(&root)?;
        Ok(Snapshots {
            root,
            pending: Mutex::new(HashMap::new()),
        })
    }

    fn dir(&self, snap: &str) -> PathBuf {
        self.root.join(snap)
    }

    /// The layer a child of `snap` mounts.
    pub fn layer(&self, snap: &str) -> PathBuf {
        self.dir(snap).join("layer")
    }

    /// Copies `upper` into a new snapshot `info.id` (the caller has frozen
    /// the source). Refuses when the copy would leave the filesystem with
    /// less than `min_free` bytes; nothing is left behind on failure.
    pub fn take(
        &self,
        upper: &Path,
        info: &mut Info,
        shift: Option<Shift>,
        min_free: u64,
    ) -> Result<()> {
        if !stacyvm_core::paths::is_snapshot_id(&info.id) {
            return Err(Error::invalid(format!("bad snapshot id {:?}", info.id)));
        }
        let (need, entries) = disk::usage(upper, u64::MAX);
        if entries > disk::MAX_ENTRIES {
            return Err(Error::limit(format!(
                "the sandbox holds more than {} files; a snapshot cannot copy them",
                disk::MAX_ENTRIES
            )));
        }
        let free = free_bytes(&self.root)?;
        if free < need.saturating_add(min_free) {
            return Err(Error::limit(format!(
                "a snapshot needs {} MiB and the data filesystem has {} MiB free, {} MiB of which it keeps (providers.native.disk_min_free_mb)",
                need >> 20,
                free >> 20,
                min_free >> 20
            )));
        }
        let dir = self.dir(&info.id);
        if dir.exists() {
            return Err(Error::conflict(format!("snapshot {} exists", info.id)));
        }
        let tmp = self.root.join(format!(".{}.tmp", info.id));
        let _ = super::remove_tree(&tmp);
        let res = (|| -> Result<()> {
            std::fs::create_dir(&tmp)
                .map_err(|e| Error::internal("creating the snapshot dir").with_source(e))?;
            super::private_dir(&tmp)?;
            let copied = treecopy::copy_tree(
                upper,
                &tmp.join("layer"),
                shift,
                disk::MAX_ENTRIES,
                // What the upper dir holds now, and room for what a
                // sandbox the freezer could not stop writes meanwhile.
                need.saturating_add(64 << 20),
            )
            .map_err(|e| match e {
                CopyError::Limit(m) => {
                    Error::limit(format!("the sandbox cannot be snapshotted: {m}"))
                }
                CopyError::Unsupported(m) => Error::unsupported(m),
                CopyError::Io(m) => Error::internal(format!("copying the sandbox's files: {m}")),
            })?;
            info.size_bytes = disk::usage(&tmp.join("layer"), u64::MAX)
                .0
                .max(copied.bytes);
            std::fs::write(
                tmp.join("snapshot.json"),
                serde_json::to_vec_pretty(info).unwrap_or_default(),
            )
            .map_err(|e| Error::internal("writing snapshot.json").with_source(e))?;
            std::fs::rename(&tmp, &dir)
                .map_err(|e| Error::internal("committing the snapshot").with_source(e))
        })();
        if res.is_err() {
            let _ = super::remove_tree(&tmp);
        }
        res
    }

    /// What snapshot `snap` was taken of, if it exists and is not deleted.
    pub fn info(&self, snap: &str) -> Option<Info> {
        if !stacyvm_core::paths::is_snapshot_id(snap) || self.dir(snap).join("deleted").exists() {
            return None;
        }
        let text = std::fs::read(self.dir(snap).join("snapshot.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Records that `child` boots from `snap` (until [`Snapshots::settle`]);
    /// a snapshot that does not exist (or was deleted) is a NotFound.
    pub fn claim(&self, child: &str, snap: &str) -> Result<PathBuf> {
        let mut pending = self.pending.lock().map_err(|_| Error::internal("lock"))?;
        if self.info(snap).is_none() {
            return Err(Error::not_found(format!("snapshot {snap:?}")));
        }
        pending.insert(child.to_string(), snap.to_string());
        Ok(self.layer(snap))
    }

    /// The boot of `child` is over (its `meta.json` names the snapshot, or
    /// it failed).
    pub fn settle(&self, child: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(child);
        }
    }

    /// Deletes `snap`: at once when no sandbox in `in_use` (snapshot ids of
    /// live sandboxes' metadata) runs on it, else when the last one goes.
    pub fn delete(&self, snap: &str, in_use: &HashSet<String>) -> Result<()> {
        if !stacyvm_core::paths::is_snapshot_id(snap) {
            return Ok(());
        }
        let pending = self.pending.lock().map_err(|_| Error::internal("lock"))?;
        let dir = self.dir(snap);
        if !dir.exists() {
            return Ok(());
        }
        if in_use.contains(snap) || pending.values().any(|s| s == snap) {
            return std::fs::write(dir.join("deleted"), b"")
                .map_err(|e| Error::internal("marking the snapshot deleted").with_source(e));
        }
        super::remove_tree(&dir)
            .map_err(|e| Error::internal(format!("removing snapshot {snap}")).with_source(e))
    }

    /// Removes the layers of deleted snapshots nothing runs on any more,
    /// and copies a crash interrupted.
    pub fn sweep(&self, in_use: &HashSet<String>) {
        let Ok(pending) = self.pending.lock() else {
            return;
        };
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let stale_tmp = name.starts_with('.') && name.ends_with(".tmp") && {
                // A copy in progress is fresh; one a crash left is old.
                e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(3600))
            };
            let unused_deleted = e.path().join("deleted").exists()
                && !in_use.contains(&name)
                && !pending.values().any(|s| *s == name);
            if stale_tmp || unused_deleted {
                if let Err(err) = super::remove_tree(&e.path()) {
                    tracing::warn!(snapshot = %name, error = %err, "removing a deleted snapshot failed");
                }
            }
        }
    }
}

fn free_bytes(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| Error::internal("reading free space").with_source(e))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}
