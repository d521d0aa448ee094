//! Flattens a layered image (an environment build: its layer over its
//! base, with overlay whiteouts and opaque directories) into one plain
//! directory tree, for providers that run single-layer images (PRoot, the
//! microVM disks). Run by `stacyvm-agent flatten` in a process of its own:
//! it enters a private mount namespace, mounts the layers as a read-only
//! overlay (the kernel applies whiteouts and opacity), copies the merged
//! view with [`crate::treecopy::copy_tree`] and exits, taking the mount
//! with it — nothing is ever mounted in the server's namespace.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;

use crate::{io, sys, SetupError};

/// Copies the merged view of `layers` (topmost first, at least two) to the
/// new directory `out`.
pub fn flatten(out: &Path, layers: &[PathBuf]) -> Result<crate::treecopy::Copied, SetupError> {
    if layers.len() < 2 {
        return Err(SetupError::Other(
            "flattening needs at least two layers".into(),
        ));
    }
    for l in layers {
        let s = l.to_string_lossy();
        if s.contains([':', ',', '\n']) || !l.is_absolute() {
            return Err(SetupError::Other(format!(
                "layer path {s:?} cannot be mounted"
            )));
        }
    }
    sys(
        "unshare mount namespace",
        nix::sched::unshare(CloneFlags::CLONE_NEWNS),
    )?;
    sys(
        "make mounts private",
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    let parent = out
        .parent()
        .ok_or_else(|| SetupError::Other("the destination has no parent".into()))?;
    let mnt = parent.join(".flatten-mnt");
    let _ = std::fs::remove_dir(&mnt);
    io("mkdir mount point", std::fs::create_dir(&mnt))?;
    let lower = layers
        .iter()
        .map(|l| l.to_string_lossy().to_string())
        .collect::<Vec<_>>()
        .join(":");
    // Layers built in a user namespace keep their opacity in user.*
    // xattrs (and, copied by the image store, in trusted.* too).
    let mounted = ["userxattr,", ""].iter().any(|extra| {
        let opts = format!("{extra}lowerdir={lower}");
        mount(
            Some("overlay"),
            &mnt,
            Some("overlay"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .is_ok()
    });
    if !mounted {
        let _ = std::fs::remove_dir(&mnt);
        return Err(SetupError::Other(
            "mounting the layers as an overlay failed (flattening needs root)".into(),
        ));
    }
    let copied = crate::treecopy::copy_tree(&mnt, out, None, u64::MAX, u64::MAX)
        .map_err(|e| SetupError::Other(format!("copying the merged layers: {e}")));
    let _ = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(&mnt);
    let copied = copied?;
    // The merged view still shows the markers of the other xattr
    // namespace, which the copy turns into opacity: a single tree has
    // nothing below it to hide.
    unmark(out, 0);
    Ok(copied)
}

/// Removes overlay opacity markers from every directory under `dir` (a
/// tree this process just made; links are never followed).
fn unmark(dir: &Path, depth: usize) {
    use std::os::unix::ffi::OsStrExt;
    if depth > crate::treecopy::MAX_DEPTH {
        return;
    }
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) {
        for name in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
            // SAFETY: both are valid NUL-terminated strings.
            unsafe {
                libc::lremovexattr(c.as_ptr(), name.as_ptr());
            }
        }
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            unmark(&e.path(), depth + 1);
        }
    }
}
