//! Pseudo-terminals for interactive execs.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::{sys, SetupError};

/// A new pty pair: (master, slave), sized `rows` × `cols`.
pub fn open(rows: u16, cols: u16) -> Result<(OwnedFd, OwnedFd), SetupError> {
    let ws = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pair = sys("openpty", nix::pty::openpty(Some(&ws), None))?;
    Ok((pair.master, pair.slave))
}

/// Makes `cmd` run on the pty `slave` as its controlling terminal, in a
/// new session.
pub fn attach(cmd: &mut Command, slave: &OwnedFd) -> Result<(), SetupError> {
    let dup = |step: &str| -> Result<Stdio, SetupError> {
        Ok(Stdio::from(crate::io(step, slave.try_clone())?))
    };
    cmd.stdin(dup("dup pty for stdin")?)
        .stdout(dup("dup pty for stdout")?)
        .stderr(dup("dup pty for stderr")?);
    // SAFETY: the closure runs in the forked child before exec and only
    // makes the async-signal-safe syscalls setsid(2) and ioctl(2).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Resizes the terminal behind `master`.
pub fn resize(master: &impl AsRawFd, rows: u16, cols: u16) -> Result<(), SetupError> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the winsize we own; the fd is a pty master.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(SetupError::Io {
            step: "TIOCSWINSZ".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
