//! Disk caps of native sandboxes.
//!
//! A sandbox writes into its overlay upper dir, which lives on the data
//! dir's filesystem next to the database: unbounded, one `dd` would fill
//! the host disk and fail every tenant's requests. The guard is a thread
//! that, every `interval`,
//! - measures each sandbox's upper dir (allocated blocks, not apparent
//!   sizes, so sparse files count for what they use) and ends a sandbox
//!   over its cap (`providers.native.disk_mb`) — also one holding more than
//!   [`MAX_ENTRIES`] files, which would make it expensive to measure;
//! - checks the filesystem's free space and, below
//!   `providers.native.disk_min_free_mb`, ends the largest sandbox.
//!
//! An ended sandbox's init is killed (identity-checked); the server then
//! finds it gone and marks it destroyed. The cap is enforced with the lag
//! of one interval; the free-space floor is what protects the database
//! when writes outrun it. tmpfs mounts (/tmp, /run, /dev/shm) are capped
//! by size at boot.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use tracing::warn;

use super::Meta;

/// Files a sandbox may hold before it counts as over its cap.
pub const MAX_ENTRIES: u64 = 2_000_000;

/// Settings of the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskCaps {
    /// Bytes a sandbox may allocate in its upper dir (0 = no cap).
    pub per_sandbox: u64,
    /// Free bytes the data filesystem keeps (0 = no floor).
    pub min_free: u64,
    pub interval: Duration,
}

impl Default for DiskCaps {
    fn default() -> Self {
        DiskCaps {
            per_sandbox: 10 << 30,
            min_free: 1 << 30,
            interval: Duration::from_secs(5),
        }
    }
}

/// Allocated bytes and entries under `dir`, stopping once past `stop`
/// bytes or [`MAX_ENTRIES`] entries (never follows links or leaves the
/// filesystem).
pub fn usage(dir: &Path, stop: u64) -> (u64, u64) {
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return (0, 0);
    };
    let dev = top.dev();
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            entries += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() && m.dev() == dev {
                stack.push(e.path());
            }
            if bytes > stop || entries > MAX_ENTRIES {
                return (bytes, entries);
            }
        }
    }
    (bytes, entries)
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks_available() * st.fragment_size())
}

/// Ends the sandbox at `dir` (its init, if still the recorded one).
fn end(dir: &Path, why: &str) {
    let meta: Option<Meta> = std::fs::read(dir.join("meta.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(init) = meta.as_ref().and_then(Meta::init) {
        warn!(sandbox_id = %dir.file_name().unwrap_or_default().to_string_lossy(), reason = why, "ending a sandbox over its disk limits");
        let _ = std::fs::write(dir.join("disk-exceeded"), why);
        init.kill();
    }
}

/// One pass over the sandboxes under `sandboxes`.
pub fn check(sandboxes: &Path, caps: DiskCaps) {
    let Ok(rd) = std::fs::read_dir(sandboxes) else {
        return;
    };
    let mut sizes: Vec<(u64, PathBuf)> = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("sb-") {
            continue;
        }
        let stop = if caps.per_sandbox > 0 {
            caps.per_sandbox
        } else {
            u64::MAX
        };
        let (bytes, entries) = usage(&e.path().join("upper"), stop);
        if caps.per_sandbox > 0 && bytes > caps.per_sandbox {
            end(
                &e.path(),
                &format!("more than {} MiB written", caps.per_sandbox >> 20),
            );
        } else if entries > MAX_ENTRIES {
            end(&e.path(), &format!("more than {MAX_ENTRIES} files"));
        } else {
            sizes.push((bytes, e.path()));
        }
    }
    if caps.min_free > 0 && free_bytes(sandboxes).is_some_and(|f| f < caps.min_free) {
        sizes.sort();
        if let Some((_, largest)) = sizes.last() {
            end(
                largest,
                &format!(
                    "the data filesystem fell below {} MiB free",
                    caps.min_free >> 20
                ),
            );
        }
    }
}

/// Runs [`check`] every interval while `alive` can be upgraded (the
/// provider exists).
pub fn spawn<T: Send + Sync + 'static>(alive: Weak<T>, sandboxes: PathBuf, caps: DiskCaps) {
    if caps.per_sandbox == 0 && caps.min_free == 0 {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("stacyvm-disk-guard".into())
        .spawn(move || loop {
            std::thread::sleep(caps.interval);
            if alive.upgrade().is_none() {
                return;
            }
            check(&sandboxes, caps);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_allocated_blocks_without_following_links() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("dirs");
        std::fs::write(dir.path().join("a/b/f"), vec![1u8; 1 << 20]).expect("file");
        let sparse = std::fs::File::create(dir.path().join("sparse")).expect("sparse");
        sparse.set_len(10 << 30).expect("truncate");
        std::os::unix::fs::symlink("/usr", dir.path().join("link")).expect("link");
        let (bytes, entries) = usage(dir.path(), u64::MAX);
        assert!((1 << 20..4 << 20).contains(&bytes), "{bytes}");
        assert_eq!(entries, 5);
        let (stopped, _) = usage(dir.path(), 1000);
        assert!(stopped > 1000);
    }
}
