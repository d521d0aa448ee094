//! Host id ranges of sandbox user namespaces (root servers).
//!
//! Every sandbox gets its own block of [`PER_SANDBOX`] uids and gids from
//! the configured subordinate range (`providers.native.subordinate_ids`,
//! `START:COUNT` as in /etc/subuid): its root is the first id of the block,
//! an unprivileged host id nothing else uses. Blocks are leased with
//! `O_EXCL` files under `/run/stacyvm/ids/` named by their first id, so
//! servers with different data dirs on one host never share a block, and
//! the leases vanish with the sandboxes at reboot.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use stacyvm_core::{Error, Result};

/// Ids per sandbox (uid and gid 0..65535 inside).
pub const PER_SANDBOX: u32 = 65536;
/// Default subordinate range: 15,258 sandboxes' worth, far above the ids
/// of ordinary accounts and of /etc/subuid's usual 100000+ entries.
pub const DEFAULT_RANGE: &str = "100000000:1000000000";
const LEASES: &str = "/run/stacyvm/ids";

/// A parsed `START:COUNT` range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    pub count: u32,
}

impl IdRange {
    pub fn parse(s: &str) -> std::result::Result<IdRange, String> {
        let (a, b) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not START:COUNT (e.g. {DEFAULT_RANGE})"))?;
        let start: u32 = a
            .trim()
            .parse()
            .map_err(|_| format!("start {a:?} is not a number"))?;
        let count: u32 = b
            .trim()
            .parse()
            .map_err(|_| format!("count {b:?} is not a number"))?;
        if start < 65536 {
            return Err(format!(
                "start {start} overlaps ordinary host accounts; use 65536 or more"
            ));
        }
        if count < PER_SANDBOX {
            return Err(format!(
                "count {count} is smaller than one sandbox's {PER_SANDBOX} ids"
            ));
        }
        if u64::from(start) + u64::from(count) > u64::from(u32::MAX) {
            return Err("the range runs past the largest uid".into());
        }
        Ok(IdRange { start, count })
    }

    /// How many sandboxes fit.
    pub fn slots(&self) -> u32 {
        self.count / PER_SANDBOX
    }
}

/// Leases id blocks of one range.
#[derive(Debug)]
pub struct IdAllocator {
    range: IdRange,
    dir: PathBuf,
}

impl IdAllocator {
    pub fn new(range: IdRange) -> Self {
        IdAllocator {
            range,
            dir: PathBuf::from(LEASES),
        }
    }

    #[cfg(test)]
    fn with_dir(range: IdRange, dir: PathBuf) -> Self {
        IdAllocator { range, dir }
    }

    /// Leases a free block for the sandbox whose state dir is `owner`;
    /// returns its first id.
    pub fn allocate(&self, owner: &Path) -> Result<u32> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::internal("creating the id lease dir").with_source(e))?;
        // A lease names its sandbox's state dir: for the server's eyes only.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::internal("restricting the id lease dir").with_source(e))?;
        let slots = self.range.slots();
        let first = rand::random::<u32>() % slots;
        for i in 0..slots {
            let slot = (first + i) % slots;
            let base = self.range.start + slot * PER_SANDBOX;
            let path = self.dir.join(base.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut f) => {
                    let _ = f.write_all(owner.as_os_str().as_encoded_bytes());
                    return Ok(base);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(Error::internal("leasing sandbox ids").with_source(e));
                }
            }
        }
        Err(Error::limit(format!(
            "all {slots} id ranges of providers.native.subordinate_ids are in use"
        )))
    }

    /// Records that the block now belongs to the sandbox at `owner`
    /// (a warm sandbox was claimed under a new name).
    pub fn reassign(&self, base: u32, owner: &Path) {
        let _ = super::rewrite_in_place(
            &self.dir.join(base.to_string()),
            owner.as_os_str().as_encoded_bytes(),
        );
    }

    pub fn release(&self, base: u32) {
        let _ = std::fs::remove_file(self.dir.join(base.to_string()));
    }

    pub fn lease_dir(&self) -> &Path {
        &self.dir
    }

    /// Drops leases whose sandbox state dir no longer exists (a server
    /// killed between teardown steps).
    pub fn sweep(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let Ok(owner) = std::fs::read(e.path()) else {
                continue;
            };
            // Trimmed: a lease rewritten in place may end in padding.
            let owner = PathBuf::from(String::from_utf8_lossy(&owner).trim_end().to_string());
            if !owner.as_os_str().is_empty() && std::fs::symlink_metadata(&owner).is_err() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Releases the host-wide lease of the block starting at `base`.
pub fn release_lease(base: u32) {
    let _ = std::fs::remove_file(Path::new(LEASES).join(base.to_string()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_with_reasons() {
        assert_eq!(
            IdRange::parse(DEFAULT_RANGE).expect("default"),
            IdRange {
                start: 100_000_000,
                count: 1_000_000_000
            }
        );
        assert!(IdRange::parse("1000:100000").is_err(), "ordinary ids");
        assert!(
            IdRange::parse("100000:1000").is_err(),
            "smaller than a block"
        );
        assert!(IdRange::parse("4000000000:1000000000").is_err(), "past u32");
        assert!(IdRange::parse("abc").is_err());
    }

    #[test]
    fn blocks_are_exclusive_and_released() {
        let dir = tempfile::tempdir().expect("tmp");
        let range = IdRange {
            start: 1_000_000,
            count: 3 * PER_SANDBOX,
        };
        let a = IdAllocator::with_dir(range, dir.path().join("ids"));
        let owners: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("sb{i}"))).collect();
        let mut got = Vec::new();
        for o in &owners {
            std::fs::create_dir_all(o).expect("owner");
            got.push(a.allocate(o).expect("lease"));
        }
        got.sort_unstable();
        assert_eq!(got, vec![1_000_000, 1_065_536, 1_131_072]);
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("ids")), 0o700, "lease dir private");
        assert_eq!(
            mode(&dir.path().join("ids").join("1000000")),
            0o600,
            "lease private"
        );
        let e = a.allocate(&owners[0]).expect_err("full");
        assert_eq!(e.kind(), stacyvm_core::ErrorKind::ResourceLimit);
        a.release(1_065_536);
        let fresh = dir.path().join("sb-fresh");
        std::fs::create_dir_all(&fresh).expect("fresh");
        assert_eq!(a.allocate(&fresh).expect("freed block"), 1_065_536);
        // A lease whose sandbox dir is gone is swept; the others stay.
        let lease = dir.path().join("ids").join("1131072");
        let owner = std::fs::read_to_string(&lease).expect("lease");
        std::fs::remove_dir(&owner).expect("rm");
        a.sweep();
        assert!(std::fs::symlink_metadata(&lease).is_err(), "swept");
        let left = std::fs::read_dir(dir.path().join("ids"))
            .expect("ids")
            .count();
        assert_eq!(left, 2);
    }
}
