//! Sandbox inits nobody owns, found at provider start and killed.
//!
//! Every native sandbox init is a `stacyvm-agent boot --spec
//! <state>/sandboxes/<name>/boot.json` process, so its command line says
//! which state dir it belongs to. An init is an orphan when
//! - it belongs to this provider's state dir but no sandbox metadata there
//!   names it nor one of its ancestors (a server killed between boot and
//!   writing the metadata; a pool host's slot factory and slot inits are
//!   forks of its init, with its command line), or
//! - the state dir it belongs to no longer exists at all (its data dir was
//!   deleted: nothing may outlive its data dir).
//!
//! Inits of other live state dirs (other servers on the host) are never
//! touched.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use stacyvm_sandbox::procs::Identity;
use tracing::warn;

use super::Meta;

/// One `stacyvm-agent boot` process.
#[derive(Debug)]
struct BootProc {
    pid: i32,
    /// `<state>/sandboxes/<name>`.
    sandbox_dir: PathBuf,
}

fn boot_processes() -> Vec<BootProc> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_boot = args.first().is_some_and(|a| a.ends_with(b"stacyvm-agent"))
            && args.get(1) == Some(&&b"boot"[..])
            && args.get(2) == Some(&&b"--spec"[..]);
        let Some(spec) = args.get(3).filter(|_| is_boot) else {
            continue;
        };
        let spec = PathBuf::from(String::from_utf8_lossy(spec).to_string());
        if let Some(dir) = spec.parent() {
            out.push(BootProc {
                pid,
                sandbox_dir: dir.to_path_buf(),
            });
        }
    }
    out
}

/// The cgroup directories `pid` is in (read from the host's view).
fn cgroups_of(pid: i32) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Vec::new();
    };
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let name = rel.rsplit('/').next().unwrap_or_default();
        // Only sandbox cgroups, never the host's own.
        if !(name.starts_with("sb-") || name.starts_with(super::pool::PREFIX)) {
            continue;
        }
        if ctls.is_empty() {
            for v2 in [root.to_path_buf(), root.join("unified")] {
                if v2.join("cgroup.controllers").is_file() {
                    dirs.push(v2.join(rel));
                }
            }
        } else if let Some(ctl) = ctls.split(',').next() {
            let ctl = ctl.trim_start_matches("name=");
            dirs.push(root.join(ctl).join(rel));
        }
    }
    dirs
}

/// The parent pid of `pid` (host view).
fn parent_of(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether `pid` is a fork of one of the `inits` (a pool host's slot
/// factory and slot inits run the init's command line too), at most a
/// few generations down.
fn descends_from(pid: i32, inits: &HashSet<i32>) -> bool {
    let mut p = pid;
    for _ in 0..4 {
        match parent_of(p) {
            Some(pp) if inits.contains(&pp) => return true,
            Some(pp) if pp > 1 => p = pp,
            _ => return false,
        }
    }
    false
}

/// Kills orphaned inits (see the module docs); returns how many.
pub(crate) fn reap(sandboxes: &Path) -> usize {
    let ours = std::fs::canonicalize(sandboxes).unwrap_or_else(|_| sandboxes.to_path_buf());
    let mut known = HashSet::new();
    if let Ok(rd) = std::fs::read_dir(&ours) {
        for e in rd.flatten() {
            let meta: Option<Meta> = std::fs::read(e.path().join("meta.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(id) = meta.as_ref().and_then(Meta::init) {
                known.insert(id.pid);
            }
        }
    }
    let mut reaped = 0;
    for p in boot_processes() {
        let Some(parent) = p.sandbox_dir.parent() else {
            continue;
        };
        let parent_real = std::fs::canonicalize(parent).ok();
        let orphan = match &parent_real {
            Some(dir) if *dir == ours => !known.contains(&p.pid) && !descends_from(p.pid, &known),
            Some(_) => false,
            // The whole state dir is gone.
            None => true,
        };
        if !orphan {
            continue;
        }
        let Some(id) = Identity::of(p.pid) else {
            continue;
        };
        let cgroups = cgroups_of(p.pid);
        if id.kill() {
            reaped += 1;
            warn!(pid = p.pid, dir = %p.sandbox_dir.display(), "killed an orphaned sandbox nobody owns");
            // Kills whatever else is left in its cgroups and waits (boundedly)
            // for them to empty before removing them.
            stacyvm_sandbox::cgroup::destroy(&cgroups);
        }
    }
    reaped
}
