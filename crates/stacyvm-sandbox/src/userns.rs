//! The user namespace of a sandbox booted by a root server: sandbox root is
//! an unprivileged range of host ids, never host root.
//!
//! Done while the boot process is still host root:
//! 1. a private mount namespace in which a small tmpfs over `/run` stages
//!    what the sandbox needs from the host: its own state dir (`/run/sb`),
//!    its image layers (`/run/l<k>`) and read-only binds (`/run/b<k>`). The
//!    sandbox's ids can reach them there even though the server's data dir
//!    is 0700;
//! 2. a helper process (forked into that mount namespace, still host root)
//!    waits while the boot process unshares its user namespace, writes the
//!    id maps (a range needs CAP_SETUID in the parent namespace), and
//!    mounts each layer *idmapped* to the new namespace so the image's
//!    root-owned files belong to the sandbox's root (a plain bind, where
//!    the filesystem cannot be idmapped);
//! 3. the boot process becomes uid/gid 0 of its namespace and drops the
//!    host's supplementary groups.
//!
//! Every namespace unshared afterwards (mount, pid, …) is owned by the new
//! user namespace; files the sandbox creates belong to its host id range.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;
use nix::unistd::{ForkResult, Gid, Uid};
use stacyvm_agent_proto::boot::IdMap;

use crate::{io, sys, BootSpec, SetupError};

const NONE: Option<&str> = None;
/// Where host paths are staged inside the private mount namespace.
const STAGE: &str = "/run";

const OPEN_TREE_CLONE: u32 = 1;
const AT_EMPTY_PATH: u32 = 0x1000;
pub(crate) const AT_RECURSIVE: u32 = 0x8000;
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x4;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
pub(crate) struct MountAttr {
    pub(crate) attr_set: u64,
    pub(crate) attr_clr: u64,
    pub(crate) propagation: u64,
    pub(crate) userns_fd: u64,
}

/// One host directory staged for the sandbox.
struct Layer {
    source: PathBuf,
    target: PathBuf,
    /// Submounts come along (host binds such as /usr may have some).
    recursive: bool,
    /// Staged read-only (image layers and host binds); a volume mounted
    /// read-write is not.
    readonly: bool,
}

/// Enters a user namespace mapping `ids` (a range) to root; returns the
/// spec with host paths rewritten to their staged places.
pub(crate) fn enter_mapped(spec: &BootSpec, ids: IdMap) -> Result<BootSpec, SetupError> {
    let mut spec = spec.clone();
    sys(
        "unshare staging mount namespace",
        nix::sched::unshare(CloneFlags::CLONE_NEWNS),
    )?;
    sys(
        "make / private",
        mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE),
    )?;
    sys(
        "mount staging tmpfs",
        mount(
            Some("tmpfs"),
            STAGE,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=755,size=64k"),
        ),
    )?;
    // The sandbox's state dir: upper/work/merged, socket, console log.
    let sbdir = Path::new(&spec.root.upper)
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| SetupError::Other("upper dir has no parent".into()))?;
    let staged_sb = Path::new(STAGE).join("sb");
    mkdir(&staged_sb)?;
    sys(
        "stage sandbox dir",
        mount(Some(&sbdir), &staged_sb, NONE, MsFlags::MS_BIND, NONE),
    )?;
    let restage = |p: &str| -> String {
        match Path::new(p).strip_prefix(&sbdir) {
            Ok(rest) => staged_sb.join(rest).to_string_lossy().to_string(),
            Err(_) => p.to_string(),
        }
    };
    spec.root.upper = restage(&spec.root.upper);
    spec.root.work = restage(&spec.root.work);
    spec.root.merged = restage(&spec.root.merged);
    spec.socket = restage(&spec.socket);
    spec.console_log = restage(&spec.console_log);

    let mut layers = Vec::new();
    for (k, lower) in spec.root.lower.iter_mut().enumerate() {
        let target = Path::new(STAGE).join(format!("l{k}"));
        layers.push(Layer {
            source: PathBuf::from(&*lower),
            target: target.clone(),
            recursive: false,
            readonly: true,
        });
        *lower = target.to_string_lossy().to_string();
    }
    for (k, b) in spec.binds.iter_mut().enumerate() {
        let target = Path::new(STAGE).join(format!("b{k}"));
        let is_dir = io(
            format!("bind source {}", b.source),
            std::fs::metadata(&b.source),
        )?
        .is_dir();
        layers.push(Layer {
            source: PathBuf::from(&b.source),
            target: target.clone(),
            recursive: is_dir,
            readonly: b.readonly,
        });
        b.source = target.to_string_lossy().to_string();
    }
    for l in &layers {
        if l.recursive || l.source.is_dir() {
            mkdir(&l.target)?;
        } else {
            io(
                format!("create {}", l.target.display()),
                std::fs::write(&l.target, b""),
            )?;
        }
    }

    let parent = nix::unistd::getpid();
    let (go_r, go_w) = sys("pipe", nix::unistd::pipe())?;
    let (err_r, err_w) = sys("pipe", nix::unistd::pipe())?;
    // SAFETY: the boot process is single-threaded (see `crate::boot`).
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(SetupError::Sys {
            step: "fork id-map helper".into(),
            source: e,
        }),
        Ok(ForkResult::Child) => {
            drop(go_w);
            drop(err_r);
            let mut go = [0u8; 1];
            let _ = File::from(go_r).read(&mut go);
            let res = map_and_stage(parent.as_raw(), ids, &layers);
            let code = match res {
                Ok(()) => 0,
                Err(e) => {
                    let _ = File::from(err_w).write_all(e.to_string().as_bytes());
                    1
                }
            };
            // SAFETY: _exit skips the parent's atexit handlers and buffers,
            // which belong to the boot process.
            unsafe { nix::libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(go_r);
            drop(err_w);
            let unshared = nix::sched::unshare(CloneFlags::CLONE_NEWUSER);
            // Wake the helper either way; it fails on its own if we did.
            let _ = File::from(go_w).write_all(b"1");
            let mut msg = String::new();
            let _ = File::from(err_r).read_to_string(&mut msg);
            let status = nix::sys::wait::waitpid(child, None);
            sys("unshare user namespace", unshared)?;
            match status {
                Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => {}
                _ => {
                    return Err(SetupError::Other(format!(
                        "mapping the sandbox ids: {}",
                        if msg.is_empty() {
                            "helper died"
                        } else {
                            msg.trim()
                        }
                    )))
                }
            }
            sys("drop supplementary groups", nix::unistd::setgroups(&[]))?;
            let root_g = Gid::from_raw(0);
            let root_u = Uid::from_raw(0);
            sys(
                "become namespace root (gid)",
                nix::unistd::setresgid(root_g, root_g, root_g),
            )?;
            sys(
                "become namespace root (uid)",
                nix::unistd::setresuid(root_u, root_u, root_u),
            )?;
            Ok(spec)
        }
    }
}

fn mkdir(p: &Path) -> Result<(), SetupError> {
    io(format!("mkdir {}", p.display()), std::fs::create_dir_all(p))
}

/// Runs in the helper (host root, staging mount namespace).
fn map_and_stage(pid: i32, ids: IdMap, layers: &[Layer]) -> Result<(), SetupError> {
    io(
        "writing uid_map",
        std::fs::write(
            format!("/proc/{pid}/uid_map"),
            format!("0 {} {}\n", ids.uid, ids.count),
        ),
    )?;
    io(
        "writing gid_map",
        std::fs::write(
            format!("/proc/{pid}/gid_map"),
            format!("0 {} {}\n", ids.gid, ids.count),
        ),
    )?;
    let userns = io(
        "opening the sandbox user namespace",
        File::open(format!("/proc/{pid}/ns/user")),
    )?;
    for l in layers {
        if let Err(e) = idmapped_bind(
            &l.source,
            &l.target,
            l.recursive,
            l.readonly,
            userns.as_raw_fd(),
        ) {
            // Filesystems that cannot be idmapped are bound as they are:
            // their files then show as nobody:nogroup inside.
            let _ = e;
            let mut flags = MsFlags::MS_BIND;
            if l.recursive {
                flags |= MsFlags::MS_REC;
            }
            sys(
                format!("stage {}", l.source.display()),
                mount(Some(&l.source), &l.target, NONE, flags, NONE),
            )?;
        }
    }
    Ok(())
}

/// Clones the mount of `source`, idmaps it to `userns` (read-only unless
/// `readonly` is false) and attaches it at `target`.
fn idmapped_bind(
    source: &Path,
    target: &Path,
    recursive: bool,
    readonly: bool,
    userns: RawFd,
) -> Result<(), SetupError> {
    let src = path_cstr(source)?;
    let dst = path_cstr(target)?;
    let mut flags = OPEN_TREE_CLONE | nix::libc::O_CLOEXEC as u32;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: open_tree reads a NUL-terminated path and returns a new fd
    // (or -1); no memory is shared with the kernel beyond the call.
    let fd = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_open_tree,
            nix::libc::AT_FDCWD,
            src.as_ptr(),
            flags,
        )
    };
    if fd < 0 {
        return Err(os_err("open_tree", source));
    }
    let fd = RawFd::try_from(fd).map_err(|_| SetupError::Other("open_tree fd".into()))?;
    // SAFETY: `fd` was just returned by open_tree and is owned by nobody else.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | if readonly { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::try_from(userns).unwrap_or(0),
    };
    let empty = c"";
    let mut at = AT_EMPTY_PATH;
    if recursive {
        at |= AT_RECURSIVE;
    }
    // SAFETY: `attr` is a valid mount_attr of the size passed; the path is
    // the empty C string with AT_EMPTY_PATH, so the fd itself is changed.
    let rc = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            at,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(os_err("mount_setattr idmap", source));
    }
    // SAFETY: attaches the detached tree `tree` at the NUL-terminated path
    // `dst`; both stay valid for the call.
    let rc = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            nix::libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(os_err("move_mount", source));
    }
    Ok(())
}

fn path_cstr(p: &Path) -> Result<CString, SetupError> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| SetupError::Other(format!("path {} contains NUL", p.display())))
}

fn os_err(step: &str, p: &Path) -> SetupError {
    SetupError::Io {
        step: format!("{step} {}", p.display()),
        source: std::io::Error::last_os_error(),
    }
}

/// Whether this kernel can idmap mounts (mount_setattr exists).
pub fn idmap_supported() -> bool {
    // SAFETY: a probe call with an invalid fd touches no memory; ENOSYS
    // means the syscall does not exist.
    let rc = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_mount_setattr,
            -1,
            c"".as_ptr(),
            0,
            std::ptr::null::<MountAttr>(),
            0usize,
        )
    };
    !(rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(nix::libc::ENOSYS))
}
