//! Process identity that survives pid reuse.
//!
//! A pid alone names whatever process holds it *now*: after a reboot, or
//! once a sandbox's init has died, a stored pid may belong to an unrelated
//! host process. A sandbox init is therefore recorded as (pid, start time
//! in clock ticks since boot, boot id), and it is signalled only through a
//! pidfd taken *before* the identity is checked, so the check and the
//! signal are about the same process.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The kernel's id of this boot (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> String {
    // Read once: a process never outlives the boot it started in.
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

/// Start time of `pid` (field 22 of `/proc/<pid>/stat`), if it is alive
/// and not a zombie.
pub fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start with the state (3).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// A recorded process: alive and the same one only if all three match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub pid: i32,
    pub start_time: u64,
    pub boot_id: String,
}

impl Identity {
    /// The identity of the live process `pid`.
    pub fn of(pid: i32) -> Option<Identity> {
        Some(Identity {
            pid,
            start_time: start_time(pid)?,
            boot_id: boot_id(),
        })
    }

    /// Whether the process is still the one recorded.
    pub fn alive(&self) -> bool {
        self.start_time != 0
            && self.boot_id == boot_id()
            && start_time(self.pid) == Some(self.start_time)
    }

    /// Sends SIGKILL if (and only if) the process is still the recorded
    /// one; returns whether it was signalled.
    pub fn kill(&self) -> bool {
        let Some(pidfd) = pidfd_open(self.pid) else {
            return false;
        };
        // The pidfd pins the process: if it is the recorded one now, the
        // signal below reaches it and nothing else.
        if !self.alive() {
            return false;
        }
        // SAFETY: pidfd_send_signal takes a pidfd we own, a signal number
        // and no siginfo (NULL); nothing else is read or written.
        let rc = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                nix::libc::SIGKILL,
                std::ptr::null::<nix::libc::siginfo_t>(),
                0u32,
            )
        };
        rc == 0
    }

    /// Opens a namespace of the process (`ns` = "uts", "net", …) if it is
    /// still the recorded one after the open.
    pub fn open_ns(&self, ns: &str) -> std::io::Result<std::fs::File> {
        let f = std::fs::File::open(format!("/proc/{}/ns/{ns}", self.pid))?;
        if !self.alive() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the process is gone (its pid now belongs to another)",
            ));
        }
        Ok(f)
    }
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0u32) };
    if fd < 0 {
        return None;
    }
    let fd = i32::try_from(fd).ok()?;
    // SAFETY: the fd was just created by pidfd_open and is owned by no one else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes the child `cmd` starts enter `dir` and then become `uid` with
/// the single group `gid` (in that order, so `dir` may sit below
/// directories `uid` cannot traverse; the child keeps it as its working
/// directory only). For VMMs that run unprivileged in a private directory.
pub fn enter_as(
    cmd: &mut std::process::Command,
    dir: &std::path::Path,
    uid: u32,
    gid: u32,
) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let cdir = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: the closure runs in the forked child before exec and makes
    // only the async-signal-safe syscalls chdir(2), setgroups(2),
    // setresgid(2) and setresuid(2), on memory it owns.
    unsafe {
        cmd.pre_exec(move || {
            let groups = [gid];
            if libc::chdir(cdir.as_ptr()) != 0
                || libc::setgroups(1, groups.as_ptr()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Makes `fd` descriptor number `target` in the child `cmd` starts (and
/// only there: the parent's copy keeps close-on-exec, so no other child
/// forked meanwhile inherits it). The parent's copy closes when `cmd` is
/// dropped.
pub fn pass_fd(cmd: &mut std::process::Command, fd: OwnedFd, target: i32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and makes
    // only the async-signal-safe syscalls dup2(2) and fcntl(2).
    unsafe {
        cmd.pre_exec(move || {
            let src = fd.as_raw_fd();
            if src == target {
                let flags = libc::fcntl(src, libc::F_GETFD);
                if flags < 0 || libc::fcntl(src, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(src, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_pid_is_not_the_recorded_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let me = Identity::of(pid).expect("alive");
        assert!(me.alive());
        // Same pid, another start time (as after pid reuse or a reboot).
        let stranger = Identity {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(!stranger.alive());
        assert!(!stranger.kill(), "a stranger is never signalled");
        let other_boot = Identity {
            boot_id: "another-boot".into(),
            ..me.clone()
        };
        assert!(!other_boot.kill());
        assert!(child.try_wait().expect("wait").is_none(), "still running");
        assert!(me.kill());
        let st = child.wait().expect("wait");
        assert!(!st.success());
        assert!(!me.alive());
    }
}
