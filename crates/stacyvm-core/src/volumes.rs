//! Named persistent volumes: the host side ([`VolumeHost`]) and the rules
//! shared by the manager and providers (names, mount paths, how a
//! sandbox's mounts are recorded).
//!
//! A volume is a file system of its own, capped at its size, that outlives
//! the sandboxes mounting it. The host keeps the data (the providers crate
//! implements [`VolumeHost`] with a loop-mounted ext4 image per volume);
//! the store keeps who owns it. A sandbox's mounts live in its hidden
//! metadata ([`MOUNTS_KEY`]), so every control plane and a restarted server
//! see which sandbox holds which volume.

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::provider::{ArchiveLimits, ArchiveReport, FileStream};

/// Hidden sandbox metadata: the volumes it mounts (JSON list of
/// [`Mounted`]).
pub const MOUNTS_KEY: &str = "stacyvm.sys.volumes";
/// Most volumes one sandbox mounts.
pub const MAX_PER_SANDBOX: usize = 8;
/// Size of a volume whose request names none.
pub const DEFAULT_SIZE_MB: i64 = 1024;
/// Smallest volume (ext4 needs room for its journal).
pub const MIN_SIZE_MB: i64 = 16;

/// One of a sandbox's volume mounts, as recorded in its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mounted {
    /// `vol-…`
    pub id: String,
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
    /// Attached as a block device (a microVM's guest mounts the volume's
    /// file system itself): the sandbox holds the volume alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub device: bool,
}

/// A volume as a provider mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeBind {
    pub id: String,
    /// The volume's directory on the host (its mounted file system).
    pub host_path: PathBuf,
    /// Where it appears in the sandbox.
    pub target: String,
    pub read_only: bool,
    /// `host_path` is the volume's image file, to attach as a block device
    /// (microVMs); the host has unmounted it (see [`VolumeHost::lend`]).
    pub device: bool,
}

/// The host side of volumes.
#[async_trait]
pub trait VolumeHost: Send + Sync + std::fmt::Debug {
    /// Makes volume `id` with a file system of `size_mb` MiB; refuses when
    /// the host lacks the space (a `ResourceLimit`).
    async fn create(&self, id: &str, size_mb: i64) -> Result<()>;
    /// Removes volume `id` and its data (unknown: `Ok`).
    async fn remove(&self, id: &str) -> Result<()>;
    /// The host directory providers mount (the volume's file system,
    /// mounted if it is not).
    async fn path(&self, id: &str) -> Result<PathBuf>;
    /// Bytes the volume's file system holds (while a microVM has it, what
    /// it held when lent).
    async fn used_bytes(&self, id: &str) -> Result<u64>;
    /// Unmounts volume `id` on the host and returns its image file, for a
    /// microVM to attach as a block device: two kernels must never mount
    /// one ext4 at once. Until [`VolumeHost::give_back`], and for as long
    /// as any process holds the image open, the host will not mount it.
    async fn lend(&self, id: &str) -> Result<PathBuf> {
        Err(Error::unsupported(format!(
            "volume {id}: this host cannot lend volumes as block devices"
        )))
    }
    /// Ends a lending's spawn window (the VM holds the image open by now,
    /// or failed to start); see [`VolumeHost::lend`].
    fn give_back(&self, _id: &str) {}
    /// The volume's files as a tar stream.
    async fn export(&self, id: &str, limits: ArchiveLimits) -> Result<FileStream>;
    /// Extracts a tar stream into the volume; entries stay inside it (see
    /// [`crate::provider::SandboxIo::archive_write`]).
    async fn import(
        &self,
        id: &str,
        chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
        limits: ArchiveLimits,
    ) -> Result<ArchiveReport>;
}

/// Whether `id` has the volume id shape (`vol-` + 16 hex digits).
pub fn is_volume_id(id: &str) -> bool {
    id.len() == 20
        && id.starts_with("vol-")
        && id[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A new volume id.
pub fn new_volume_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut b);
    format!("vol-{}", hex::encode(b))
}

/// Checks a volume name (see `CreateVolumeRequest::name`).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
        && !is_volume_id(name);
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "volume name {name:?}: 1-63 characters of lowercase letters, digits, '-', '_' and '.', starting with a letter or digit (and not shaped like a volume id)"
        )))
    }
}

/// Places a volume may not be mounted: the root, the kernel's interfaces,
/// and StacyVM's own paths inside a sandbox.
const FORBIDDEN: &[&str] = &["/proc", "/sys", "/dev", "/.stacyvm"];

/// Normalises and checks a mount path.
pub fn check_path(path: &str) -> Result<String> {
    let bad = |why: &str| Err(Error::invalid(format!("volume path {path:?}: {why}")));
    if !path.starts_with('/') {
        return bad("must be absolute");
    }
    if path.len() > 256 {
        return bad("longer than 256 bytes");
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return bad("must not contain '..'"),
            c if c.bytes().any(|b| b < 0x20 || b == 0x7f) => return bad("control characters"),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return bad("cannot be the root");
    }
    let norm = format!("/{}", parts.join("/"));
    if FORBIDDEN
        .iter()
        .any(|f| norm == *f || norm.starts_with(&format!("{f}/")))
    {
        return bad("not under /proc, /sys, /dev or /.stacyvm");
    }
    Ok(norm)
}

/// The mounts recorded in a sandbox's metadata.
pub fn mounts_of(metadata: &std::collections::BTreeMap<String, String>) -> Vec<Mounted> {
    metadata
        .get(MOUNTS_KEY)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        for good in ["data", "a", "my-vol_1.x", "0cache"] {
            check_name(good).expect(good);
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "Data",
            "-x",
            "a/b",
            "a b",
            "vol-0123456789abcdef",
            long.as_str(),
            "ü",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_path("/data").expect("ok"), "/data");
        assert_eq!(check_path("//work//x/./").expect("ok"), "/work/x");
        assert_eq!(check_path("/workspace").expect("ok"), "/workspace");
        for bad in [
            "",
            "data",
            "/",
            "/..",
            "/a/../b",
            "/proc",
            "/proc/x",
            "/sys/fs",
            "/dev",
            "/.stacyvm/a",
            "/a\nb",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_path("/device").is_ok(), "only /dev itself and below");
        let long = format!("/{}", "a".repeat(300));
        assert!(check_path(&long).is_err());
    }

    #[test]
    fn ids() {
        let id = new_volume_id();
        assert!(is_volume_id(&id), "{id}");
        assert!(!is_volume_id("vol-XYZ"));
        assert!(!is_volume_id("snap-0123456789abcdef"));
    }
}
