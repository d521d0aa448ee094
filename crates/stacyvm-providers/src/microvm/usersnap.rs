//! Snapshots of running sandboxes (`POST /sandboxes/{id}/snapshot`,
//! `POST /sandboxes/{id}/fork`, spawns with a `snapshot`).
//!
//! Unlike a restore point (`snapshot.rs`: a freshly booted guest per
//! shape, RAM kept in a shared file), a sandbox snapshot holds what a
//! caller's sandbox had become: its processes, memory and files. It is
//! made while the VM is paused for a moment and then runs on:
//!
//! 1. QMP `stop` (QEMU drains and flushes the disk);
//! 2. `migrate` into `vmstate` with every RAM page (`x-ignore-shared` off:
//!    a clone's copy-on-write RAM is private, a booted VM's anonymous);
//! 3. the VM's qcow2 overlay copied sparsely and, when it sits on a restore
//!    point's disk, rebased onto the image's ext4 (`qemu-img rebase` copies
//!    in just the clusters the restore point held), so the snapshot
//!    depends on nothing but the image;
//! 4. `cont`, whatever happened.
//!
//! A child copies the snapshot's `disk.qcow2` as its own overlay and
//! loads `vmstate` into a QEMU started with `-incoming defer`: after its
//! start it needs nothing of the snapshot, which can be deleted while
//! children run. Files live under `<data_dir>/qemu/snapshots/<id>/`
//! (user data: the data dir, not the cache).

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use stacyvm_core::{Error, Result};

use super::{qmp, snapshot};

/// What is recorded of a sandbox snapshot (`meta.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserSnap {
    pub id: String,
    /// The sandbox it was taken of.
    pub source: String,
    pub image: String,
    pub memory_mb: i64,
    pub vcpus: i64,
    pub accel: String,
    /// The source had a NIC (`bridge`): children need one too.
    pub networked: bool,
    /// The handshake token of the source's agent (children answer with it).
    pub token: String,
    /// The image's ext4 disk the overlay is backed by.
    pub base: PathBuf,
    pub created_at: DateTime<Utc>,
    pub size_bytes: u64,
}

/// Whether `id` is a snapshot id the orchestrator makes (`snap-` and
/// lowercase hex): safe as a directory name.
pub fn is_id(id: &str) -> bool {
    id.strip_prefix("snap-").is_some_and(|h| {
        (1..=32).contains(&h.len())
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn checked(root: &Path, id: &str) -> Result<PathBuf> {
    if !is_id(id) {
        return Err(Error::invalid(format!("bad snapshot id {id:?}")));
    }
    Ok(root.join(id))
}

/// The complete snapshot `id`, if there is one.
pub fn find(root: &Path, id: &str) -> Option<(PathBuf, UserSnap)> {
    let dir = checked(root, id).ok()?;
    let meta: UserSnap =
        serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
    (dir.join("vmstate").is_file() && dir.join("disk.qcow2").is_file()).then_some((dir, meta))
}

/// Every complete snapshot.
pub fn list(root: &Path) -> Vec<UserSnap> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<UserSnap> = rd
        .flatten()
        .filter_map(|e| find(root, &e.file_name().to_string_lossy()).map(|(_, m)| m))
        .collect();
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    out
}

/// Deletes snapshot `id` (a missing one is fine).
pub fn remove(root: &Path, id: &str) -> Result<()> {
    let dir = checked(root, id)?;
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::internal(format!("removing {}: {e}", dir.display())))
        }
        _ => Ok(()),
    }
}

/// Removes build leftovers (`.tmp-*`) of snapshots a crash interrupted.
pub fn sweep(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The running VM a snapshot is taken of.
pub(super) struct Source<'a> {
    pub(super) id: &'a str,
    pub(super) dir: &'a Path,
    pub(super) image: &'a str,
    pub(super) memory_mb: i64,
    pub(super) vcpus: i64,
    pub(super) accel: &'a str,
    pub(super) networked: bool,
    pub(super) token: &'a str,
    /// The image's ext4 disk at the bottom of the VM's disk chain.
    pub(super) base: &'a Path,
    pub(super) qemu_img: &'a Path,
}

/// Snapshots the running VM `src` as `id` under `root` (see the module
/// docs). The VM is paused meanwhile and resumed however this ends.
pub(super) async fn create(root: &Path, id: &str, src: &Source<'_>) -> Result<UserSnap> {
    let target = checked(root, id)?;
    if target.exists() {
        return Err(Error::conflict(format!("snapshot {id} exists")));
    }
    crate::native::create_private_dir(root)?;
    let tmp = root.join(format!(".tmp-{id}"));
    let _ = std::fs::remove_dir_all(&tmp);
    crate::native::create_private_dir(&tmp)?;
    let qmp_sock = src.dir.join("qmp.sock");
    qmp::execute(&qmp_sock, "stop", None).await?;
    let res = freeze(&tmp, &qmp_sock, src).await;
    // The sandbox runs on whatever became of the snapshot.
    let resumed = qmp::execute(&qmp_sock, "cont", None).await;
    let built = match (res, resumed) {
        (Ok(()), Ok(_)) => Ok(()),
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
    };
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let meta = UserSnap {
        id: id.to_string(),
        source: src.id.to_string(),
        image: src.image.to_string(),
        memory_mb: src.memory_mb,
        vcpus: src.vcpus,
        accel: src.accel.to_string(),
        networked: src.networked,
        token: src.token.to_string(),
        base: src.base.to_path_buf(),
        created_at: Utc::now(),
        size_bytes: allocated(&tmp),
    };
    let done = std::fs::write(
        tmp.join("meta.json"),
        serde_json::to_vec_pretty(&meta).unwrap_or_default(),
    )
    .and_then(|()| std::fs::rename(&tmp, &target));
    if let Err(e) = done {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::internal(format!("storing snapshot {id}: {e}")));
    }
    Ok(meta)
}

/// Steps 2 and 3 of [`create`], with the VM stopped.
async fn freeze(tmp: &Path, qmp_sock: &Path, src: &Source<'_>) -> Result<()> {
    snapshot::migrate_out(qmp_sock, &tmp.join("vmstate"), false).await?;
    let disk = tmp.join("disk.qcow2");
    copy_sparse(&src.dir.join("disk.qcow2"), &disk).await?;
    let backing = super::qcow2::backing_file(&disk)
        .map_err(|e| Error::internal(format!("reading the overlay's header: {e}")))?;
    if backing.as_deref() != Some(src.base) {
        let out = tokio::process::Command::new(src.qemu_img)
            .args(["rebase", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(src.base)
            .arg(&disk)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| {
                Error::unavailable(format!(
                    "running {} (Debian: apt-get install qemu-utils): {e}",
                    src.qemu_img.display()
                ))
            })?;
        if !out.status.success() {
            return Err(Error::internal(format!(
                "qemu-img rebase of the snapshot's disk failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// Copies `from` to `to` keeping holes (`cp --sparse=always`, which also
/// reflinks where the filesystem can).
pub(super) async fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    let out = tokio::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto", "--"])
        .arg(from)
        .arg(to)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| Error::internal(format!("running cp: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "copying {}: {}",
            from.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_before_any_path_is_built() {
        assert!(is_id("snap-0123456789abcdef"));
        for bad in [
            "",
            "snap-",
            "snap-../x",
            "snap-ABC",
            "../snap-1",
            "snap-1/2",
            "sb-1234",
            "snap-0123456789abcdef0123456789abcdef0",
        ] {
            assert!(!is_id(bad), "{bad:?}");
        }
        let d = tempfile::tempdir().expect("tmp");
        assert!(remove(d.path(), "snap-../../etc").is_err());
        assert!(remove(d.path(), "snap-00ff").is_ok(), "missing is fine");
        assert!(find(d.path(), "../x").is_none());
    }

    #[test]
    fn incomplete_snapshots_are_not_found_and_swept() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path().join("snap-00aa");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("meta.json"), b"{}").expect("meta");
        assert!(find(d.path(), "snap-00aa").is_none(), "bad meta, no data");
        std::fs::create_dir_all(d.path().join(".tmp-snap-00bb")).expect("tmp");
        sweep(d.path());
        assert!(!d.path().join(".tmp-snap-00bb").exists());
        assert!(list(d.path()).is_empty());
    }
}
