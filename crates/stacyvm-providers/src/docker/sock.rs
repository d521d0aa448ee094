//! Opening the agent socket in a directory the sandbox can write.
//!
//! The host side of `/.stacyvm/run` is writable from inside the container,
//! so `agent.sock` there may be anything the sandbox made it: a symlink to
//! another sandbox's socket (or any host socket), a FIFO, a socket of a
//! stand-in "agent". A plain `connect(path)` follows a symlink on the host.
//! Here the directory is opened first, the entry is opened relative to it
//! with `O_PATH | O_NOFOLLOW` (`/proc/self/fd/<dir>/agent.sock`, which is
//! `openat(dir, "agent.sock")`) and must be a socket. The agent client is
//! handed that dir-relative path: it opens the last component again with
//! `O_NOFOLLOW`, checks it is a socket and connects through
//! `/proc/self/fd/<sock>`, so a swap in between is refused, never followed.
//! A stand-in socket of the sandbox itself is caught by the authenticated
//! handshake, not here.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use stacyvm_core::{Error, Result};

/// The socket's name inside the run dir.
pub const SOCK_NAME: &str = "agent.sock";

/// The opened run dir holding a socket: connect through
/// [`PinnedSocket::path`] while it is alive.
#[derive(Debug)]
pub struct PinnedSocket {
    dir: File,
}

impl PinnedSocket {
    /// `agent.sock` relative to the opened dir (no path lookup outside
    /// it); its last component must be opened with `O_NOFOLLOW`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/self/fd/{}/{SOCK_NAME}",
            self.dir.as_raw_fd()
        ))
    }
}

fn open_path(p: &Path, dir: bool) -> std::io::Result<File> {
    let mut flags = nix::libc::O_PATH | nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC;
    if dir {
        flags |= nix::libc::O_DIRECTORY;
    }
    OpenOptions::new().read(true).custom_flags(flags).open(p)
}

/// Opens `<run_dir>/agent.sock` without following a symlink at any point
/// the sandbox controls. `Ok(None)` when there is no such entry yet (the
/// agent has not bound it); an entry that is not a socket is an error.
pub fn open_agent_socket(run_dir: &Path) -> Result<Option<PinnedSocket>> {
    let dir = open_path(run_dir, true).map_err(|e| {
        Error::unavailable("opening the sandbox's agent socket directory").with_source(e)
    })?;
    let entry = PathBuf::from(format!("/proc/self/fd/{}/{SOCK_NAME}", dir.as_raw_fd()));
    let sock = match open_path(&entry, false) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::unavailable("opening the sandbox's agent socket").with_source(e))
        }
    };
    let meta = sock
        .metadata()
        .map_err(|e| Error::unavailable("inspecting the sandbox's agent socket").with_source(e))?;
    if !meta.file_type().is_socket() {
        return Err(Error::unavailable(
            "the sandbox's agent socket was replaced by something that is not a socket",
        ));
    }
    drop(sock);
    Ok(Some(PinnedSocket { dir }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_and_non_sockets_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let run = dir.path().join("run");
        let other = dir.path().join("other");
        std::fs::create_dir_all(&run).expect("run");
        std::fs::create_dir_all(&other).expect("other");
        assert!(open_agent_socket(&run).expect("empty").is_none());
        let target = other.join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&target).expect("bind");
        // A symlink to another socket is not followed.
        std::os::unix::fs::symlink(&target, run.join(SOCK_NAME)).expect("symlink");
        let e = open_agent_socket(&run).expect_err("symlink");
        assert_eq!(
            e.kind(),
            stacyvm_core::ErrorKind::ProviderUnavailable,
            "{e}"
        );
        std::fs::remove_file(run.join(SOCK_NAME)).expect("rm");
        // A regular file is not a socket.
        std::fs::write(run.join(SOCK_NAME), b"x").expect("file");
        assert!(open_agent_socket(&run).is_err());
        std::fs::remove_file(run.join(SOCK_NAME)).expect("rm");
        // The run dir itself being a symlink is refused too.
        let link = dir.path().join("run-link");
        std::os::unix::fs::symlink(&other, &link).expect("dir symlink");
        assert!(open_agent_socket(&link).is_err());
        // A real socket connects through the pinned path.
        let real = std::os::unix::net::UnixListener::bind(run.join(SOCK_NAME)).expect("bind");
        let pinned = open_agent_socket(&run).expect("open").expect("present");
        std::os::unix::net::UnixStream::connect(pinned.path()).expect("connect");
        real.set_nonblocking(true).expect("nb");
        assert!(
            real.accept().is_ok(),
            "the pinned socket got the connection"
        );
        listener.set_nonblocking(true).expect("nb");
        assert!(listener.accept().is_err(), "the symlink target got nothing");
    }
}
