//! cgroup v1 (one hierarchy per controller) and v2 (unified) support.
//!
//! The provider creates one cgroup per sandbox under the server's own
//! cgroup in each hierarchy, writes the limits, and the sandbox init joins
//! them before unsharing its cgroup namespace.

use std::fs;
use std::path::{Path, PathBuf};

use crate::{io, SetupError};

/// Limits for one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// CPU quota in microseconds per 100 ms period.
    pub cpu_quota_us: u64,
}

/// Which cgroup layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Pure cgroup v2 at the given mount.
    V2(PathBuf),
    /// v1 controllers: (controller, directory of this process's cgroup).
    V1(Vec<(String, PathBuf)>),
}

/// Detects the layout from /sys/fs/cgroup and /proc/self/cgroup.
pub fn detect() -> Option<Layout> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").is_file() {
        let own = own_path("")?;
        return Some(Layout::V2(root.join(own.trim_start_matches('/'))));
    }
    let mut v = Vec::new();
    // cpuacct only for usage (stats), freezer for pause/resume; when
    // co-mounted with cpu both names lead to one hierarchy, kept once.
    let mut seen = Vec::new();
    for ctl in ["memory", "pids", "cpu", "cpuacct", "freezer"] {
        let mount = root.join(ctl);
        if !mount.join("cgroup.procs").is_file() {
            continue;
        }
        let real = fs::canonicalize(&mount).unwrap_or_else(|_| mount.clone());
        if seen.contains(&real) {
            continue;
        }
        seen.push(real);
        let own = own_path(ctl).unwrap_or_default();
        v.push((ctl.to_string(), mount.join(own.trim_start_matches('/'))));
    }
    if v.is_empty() {
        None
    } else {
        Some(Layout::V1(v))
    }
}

/// Whether this process may create cgroups under its own (a delegated
/// subtree when not root).
pub fn writable(layout: &Layout) -> bool {
    let dirs: Vec<&Path> = match layout {
        Layout::V2(base) => vec![base.as_path()],
        Layout::V1(v) => v.iter().map(|(_, d)| d.as_path()).collect(),
    };
    dirs.iter()
        .all(|d| nix::unistd::access(*d, nix::unistd::AccessFlags::W_OK).is_ok())
}

/// This process's cgroup path for a v1 controller ("" = the v2 entry).
fn own_path(controller: &str) -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctls, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controller.is_empty() && ctls.is_empty() {
            return Some(path.to_string());
        }
        if !controller.is_empty() && ctls.split(',').any(|c| c == controller) {
            return Some(path.to_string());
        }
    }
    None
}

fn write(path: &Path, value: &str) -> Result<(), SetupError> {
    io(
        format!("writing {value} to {}", path.display()),
        fs::write(path, value),
    )
}

/// The cgroup directories [`create`] makes for `name` (without creating them).
pub fn paths(layout: &Layout, name: &str) -> Vec<PathBuf> {
    match layout {
        Layout::V2(base) => vec![base.join("stacyvm").join(name)],
        Layout::V1(ctls) => ctls
            .iter()
            .map(|(_, base)| base.join("stacyvm").join(name))
            .collect(),
    }
}

/// Creates the sandbox cgroups and applies limits; returns the directories
/// to join.
pub fn create(layout: &Layout, name: &str, limits: Limits) -> Result<Vec<PathBuf>, SetupError> {
    match layout {
        Layout::V2(base) => {
            let parent = base.join("stacyvm");
            io("creating cgroup", fs::create_dir_all(&parent))?;
            // Enable controllers for children (ignore ones the parent lacks).
            let _ = fs::write(parent.join("cgroup.subtree_control"), "+memory +pids +cpu");
            let dir = parent.join(name);
            io("creating cgroup", fs::create_dir_all(&dir))?;
            if limits.memory_bytes > 0 {
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                let _ = fs::write(dir.join("memory.swap.max"), "0");
            }
            if limits.pids > 0 {
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
            }
            if limits.cpu_quota_us > 0 {
                let _ = fs::write(
                    dir.join("cpu.max"),
                    format!("{} 100000", limits.cpu_quota_us),
                );
            }
            Ok(vec![dir])
        }
        Layout::V1(ctls) => {
            let mut dirs = Vec::new();
            for (ctl, base) in ctls {
                let dir = base.join("stacyvm").join(name);
                io(format!("creating {ctl} cgroup"), fs::create_dir_all(&dir))?;
                match ctl.as_str() {
                    "memory" if limits.memory_bytes > 0 => {
                        write(
                            &dir.join("memory.limit_in_bytes"),
                            &limits.memory_bytes.to_string(),
                        )?;
                        let _ = fs::write(
                            dir.join("memory.memsw.limit_in_bytes"),
                            limits.memory_bytes.to_string(),
                        );
                        let _ = fs::write(dir.join("memory.swappiness"), "0");
                    }
                    "pids" if limits.pids > 0 => {
                        write(&dir.join("pids.max"), &limits.pids.to_string())?
                    }
                    "cpu" if limits.cpu_quota_us > 0 => {
                        let _ = fs::write(dir.join("cpu.cfs_period_us"), "100000");
                        let _ = fs::write(
                            dir.join("cpu.cfs_quota_us"),
                            limits.cpu_quota_us.to_string(),
                        );
                    }
                    _ => {}
                }
                dirs.push(dir);
            }
            Ok(dirs)
        }
    }
}

/// Moves the calling process into `dir`.
pub fn join(dir: &Path) -> Result<(), SetupError> {
    write(&dir.join("cgroup.procs"), &std::process::id().to_string())
}

/// Freezes (`true`) or thaws every process of a sandbox's cgroups (v2
/// `cgroup.freeze`, v1 `freezer.state`) and waits, at most 5 s, until the
/// kernel reports it done. `Ok(false)` when the sandbox has no freezer.
pub fn freeze(dirs: &[PathBuf], frozen: bool) -> Result<bool, SetupError> {
    for dir in dirs {
        let (file, value) = if dir.join("cgroup.freeze").is_file() {
            ("cgroup.freeze", if frozen { "1" } else { "0" })
        } else if dir.join("freezer.state").is_file() {
            ("freezer.state", if frozen { "FROZEN" } else { "THAWED" })
        } else {
            continue;
        };
        write(&dir.join(file), value)?;
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while is_frozen(std::slice::from_ref(dir)) != frozen {
            if std::time::Instant::now() > until {
                return Err(SetupError::Other(format!(
                    "{} did not become {value} within 5 s",
                    dir.join(file).display()
                )));
            }
            // v1 re-tries freezing tasks that were busy on each write.
            if file == "freezer.state" && frozen {
                let _ = fs::write(dir.join(file), value);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        return Ok(true);
    }
    Ok(false)
}

/// Whether a sandbox's processes are frozen (v2: `frozen 1` in
/// `cgroup.events`; v1: `freezer.state` is `FROZEN`).
pub fn is_frozen(dirs: &[PathBuf]) -> bool {
    dirs.iter().any(|d| {
        if let Ok(ev) = fs::read_to_string(d.join("cgroup.events")) {
            if d.join("cgroup.freeze").is_file() {
                return ev.lines().any(|l| l.trim() == "frozen 1");
            }
        }
        fs::read_to_string(d.join("freezer.state")).is_ok_and(|s| s.trim() == "FROZEN")
    })
}

/// Kills every process in the cgroups and removes them (best effort,
/// retried). What cannot be removed within 5 s (a loaded host, tasks still
/// exiting) is retried by a background thread for another minute, so a
/// destroyed sandbox leaves no cgroup behind.
pub fn destroy(dirs: &[PathBuf]) {
    // Frozen tasks die only once thawed.
    let _ = freeze(dirs, false);
    for dir in dirs {
        kill_all(dir);
    }
    let mut left: Vec<PathBuf> = dirs.to_vec();
    // Processes of a killed PID namespace take a moment to exit; poll with
    // a growing pause (≤ 5 s in total), killing what appeared meanwhile.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut pause = std::time::Duration::from_micros(500);
    loop {
        left.retain(|dir| !remove(dir));
        if left.is_empty() {
            return;
        }
        if std::time::Instant::now() > until {
            break;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    }
    let _ = std::thread::Builder::new()
        .name("cgroup-reaper".into())
        .spawn(move || {
            for _ in 0..600 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                left.retain(|dir| !remove(dir));
                if left.is_empty() {
                    return;
                }
            }
        });
}

/// Removes an (empty) cgroup directory; `true` when it is gone. One that
/// still has tasks gets them killed again (v1 has no `cgroup.kill`, and a
/// task may have forked after the first kill).
fn remove(dir: &std::path::Path) -> bool {
    if !dir.exists() || fs::remove_dir(dir).is_ok() {
        return true;
    }
    kill_all(dir);
    false
}

/// SIGKILLs every task of one cgroup (`cgroup.kill` where there is one).
fn kill_all(dir: &std::path::Path) {
    if dir.join("cgroup.kill").is_file() {
        let _ = fs::write(dir.join("cgroup.kill"), "1");
    } else if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether a cgroup still has processes.
pub fn populated(dirs: &[PathBuf]) -> bool {
    dirs.iter().any(|d| {
        fs::read_to_string(d.join("cgroup.procs"))
            .map(|s| !s.trim().is_empty())
            .unwrap_or(false)
    })
}

/// Peak/current memory and OOM kills of a sandbox (v1 or v2).
pub fn memory_usage(dirs: &[PathBuf]) -> (u64, u64) {
    for d in dirs {
        let read = |f: &str| {
            fs::read_to_string(d.join(f))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        if let Some(cur) = read("memory.current").or_else(|| read("memory.usage_in_bytes")) {
            let limit = read("memory.max")
                .or_else(|| read("memory.limit_in_bytes"))
                .unwrap_or(0);
            return (cur, limit);
        }
    }
    (0, 0)
}

/// Resource usage read from a sandbox's cgroups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Total CPU time used, in nanoseconds.
    pub cpu_ns: Option<u64>,
    pub memory_bytes: Option<u64>,
    /// `None` when unlimited.
    pub memory_limit_bytes: Option<u64>,
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Reads usage from the directories [`create`] returned (v1 or v2).
pub fn usage(dirs: &[PathBuf]) -> Usage {
    let mut u = Usage::default();
    for d in dirs {
        // v2
        if let Some(m) = read_u64(&d.join("memory.current")) {
            u.memory_bytes = Some(m);
            u.memory_limit_bytes = read_u64(&d.join("memory.max"));
        }
        if let Ok(stat) = fs::read_to_string(d.join("cpu.stat")) {
            for line in stat.lines() {
                if let Some(v) = line.strip_prefix("usage_usec ") {
                    u.cpu_ns = v.trim().parse::<u64>().ok().map(|us| us * 1000);
                }
            }
        }
        // v1
        if let Some(m) = read_u64(&d.join("memory.usage_in_bytes")) {
            u.memory_bytes = Some(m);
            // v1 reports "unlimited" as a huge page-rounded number.
            u.memory_limit_bytes =
                read_u64(&d.join("memory.limit_in_bytes")).filter(|l| *l < (1 << 62));
        }
        if let Some(ns) = read_u64(&d.join("cpuacct.usage")) {
            u.cpu_ns = Some(ns);
        }
    }
    u
}

/// Writes `limits` into existing sandbox cgroups (v1 or v2, recognised by
/// their files); used when a pre-booted sandbox is claimed.
pub fn set_limits(dirs: &[PathBuf], limits: Limits) -> Result<(), SetupError> {
    for d in dirs {
        if limits.memory_bytes > 0 {
            let m = limits.memory_bytes.to_string();
            if d.join("memory.max").is_file() {
                write(&d.join("memory.max"), &m)?;
            } else if d.join("memory.limit_in_bytes").is_file() {
                // memsw must stay >= the memory limit: order the writes so
                // each one is valid whether the limit grows or shrinks.
                let memsw = d.join("memory.memsw.limit_in_bytes");
                if memsw.is_file() {
                    let _ = fs::write(&memsw, "-1");
                }
                write(&d.join("memory.limit_in_bytes"), &m)?;
                if memsw.is_file() {
                    let _ = fs::write(&memsw, &m);
                }
            }
        }
        if limits.pids > 0 && d.join("pids.max").is_file() {
            write(&d.join("pids.max"), &limits.pids.to_string())?;
        }
        if limits.cpu_quota_us > 0 {
            if d.join("cpu.max").is_file() {
                let _ = fs::write(d.join("cpu.max"), format!("{} 100000", limits.cpu_quota_us));
            } else if d.join("cpu.cfs_quota_us").is_file() {
                let _ = fs::write(d.join("cpu.cfs_period_us"), "100000");
                let _ = fs::write(d.join("cpu.cfs_quota_us"), limits.cpu_quota_us.to_string());
            }
        }
    }
    Ok(())
}
