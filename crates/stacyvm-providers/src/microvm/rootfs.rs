//! Guest root disks: an image-store rootfs turned into an ext4 file with
//! `mkfs.ext4 -d` (no loop mount, no privileged helper), once per (image,
//! size), shared read-only by every VM of that image. Each VM writes to
//! its own qcow2 overlay ([`super::qcow2`]).
//!
//! Cache layout: `CACHE/rootfs/<image id>-<MiB>m.ext4` (0444). A disk
//! appears by rename once complete; concurrent requests for one disk in
//! this process wait for a single build.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use stacyvm_core::{Error, Result};

/// Builds and caches root disks.
#[derive(Debug, Default)]
pub struct RootfsCache {
    dir: PathBuf,
    building: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

/// Bytes a tree holds (file sizes rounded up to 4 KiB blocks, plus one
/// block per entry for inodes and directories).
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            total += m.len().div_ceil(4096) * 4096 + 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

impl RootfsCache {
    pub fn new(cache: &Path) -> Self {
        Self {
            dir: cache.join("rootfs"),
            building: Mutex::default(),
        }
    }

    /// The cached disk of `key` with `free_mb` MiB free for the sandbox.
    pub fn path(&self, key: &str, free_mb: u64) -> PathBuf {
        self.dir.join(format!("{key}-{free_mb}m.ext4"))
    }

    /// The disk for rootfs directory `src` (image id `key`), built if
    /// missing. The file is sparse: its size is the content plus
    /// `free_mb`, its blocks only what `mkfs.ext4` wrote.
    pub async fn get(&self, key: &str, src: &Path, free_mb: u64) -> Result<PathBuf> {
        if key.is_empty() || key.contains('/') || key.starts_with('.') {
            return Err(Error::invalid(format!("bad image key {key:?}")));
        }
        let out = self.path(key, free_mb);
        if out.is_file() {
            return Ok(out);
        }
        let lock = self
            .building
            .lock()
            .map_err(|_| Error::internal("rootfs cache lock"))?
            .entry(out.clone())
            .or_default()
            .clone();
        let _g = lock.lock().await;
        if out.is_file() {
            return Ok(out);
        }
        let (dir, src, target) = (self.dir.clone(), src.to_path_buf(), out.clone());
        tokio::task::spawn_blocking(move || build(&dir, &src, free_mb, &target))
            .await
            .map_err(|e| Error::internal(format!("rootfs build task: {e}")))??;
        Ok(out)
    }
}

fn build(dir: &Path, src: &Path, free_mb: u64, out: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::internal(format!("creating {}: {e}", dir.display())))?;
    if !src.is_dir() {
        return Err(Error::invalid(format!(
            "image rootfs {} is missing",
            src.display()
        )));
    }
    // Content, 10% slack for ext4's metadata, the free space asked for, and
    // 64 MiB for the journal; rounded to MiB.
    let content = tree_bytes(src);
    let bytes = (content + content / 10 + (free_mb << 20) + (64 << 20)).div_ceil(1 << 20) << 20;
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .suffix(".ext4")
        .tempfile_in(dir)
        .map_err(|e| Error::internal(format!("creating a temp file in {}: {e}", dir.display())))?;
    tmp.as_file()
        .set_len(bytes)
        .map_err(|e| Error::internal(format!("sizing the rootfs disk: {e}")))?;
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-L", "stacyvm-root"])
        .args([
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
        ])
        .arg("-d")
        .arg(src)
        .arg(tmp.path())
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            Error::unavailable(format!(
                "running mkfs.ext4 (Debian: apt-get install e2fsprogs): {e}"
            ))
        })?;
    if !status.status.success() {
        return Err(Error::internal(format!(
            "mkfs.ext4 -d {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&status.stderr).trim()
        )));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o444))
        .map_err(|e| Error::internal(format!("making the rootfs disk read-only: {e}")))?;
    tmp.persist(out)
        .map_err(|e| Error::internal(format!("storing {}: {}", out.display(), e.error)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk holds the tree's files with their modes and owners
    /// (`debugfs` reads the image without mounting it), and concurrent
    /// requests build it once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn builds_once_and_keeps_content() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("bin")).expect("mkdir");
        std::fs::write(src.join("bin/hello"), b"#!/bin/sh\necho hi\n").expect("write");
        std::fs::set_permissions(
            src.join("bin/hello"),
            std::fs::Permissions::from_mode(0o751),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("bin/hello", src.join("link")).expect("symlink");
        let cache = Arc::new(RootfsCache::new(&tmp.path().join("cache")));
        let (a, b) = tokio::join!(cache.get("img1", &src, 8), cache.get("img1", &src, 8));
        let (a, b) = (a.expect("build"), b.expect("build"));
        assert_eq!(a, b);
        let m = std::fs::metadata(&a).expect("disk");
        assert_eq!(m.permissions().mode() & 0o777, 0o444);
        let builds: Vec<_> = std::fs::read_dir(tmp.path().join("cache/rootfs"))
            .expect("dir")
            .flatten()
            .collect();
        assert_eq!(builds.len(), 1, "one disk, no temp files left");
        let out = std::process::Command::new("debugfs")
            .args(["-R", "cat /bin/hello"])
            .arg(&a)
            .output()
            .expect("debugfs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "#!/bin/sh\necho hi\n");
        let stat = std::process::Command::new("debugfs")
            .args(["-R", "stat /bin/hello"])
            .arg(&a)
            .output()
            .expect("debugfs");
        let text = String::from_utf8_lossy(&stat.stdout);
        assert!(text.contains("Mode:  0751"), "{text}");
        assert!(cache.get("../x", &src, 8).await.is_err());
        assert!(cache
            .get("img2", &tmp.path().join("nope"), 8)
            .await
            .is_err());
    }
}
