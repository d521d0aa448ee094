//! Root filesystem: overlay root, read-only host binds, masks, /proc, /dev,
//! tmpfs mounts, then pivot_root.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::{io, sys, BootSpec, SetupError};

const NONE: Option<&str> = None;

fn inside(merged: &Path, p: &str) -> PathBuf {
    merged.join(p.trim_start_matches('/'))
}

/// The directory `target` inside `merged`, made where missing, reached
/// without following a symlink: a component that is a link or not a
/// directory is an error. (At boot nothing runs in the root yet and its
/// layers do not change, so what is checked is what gets mounted on.)
fn confined_dir(merged: &Path, target: &str) -> Result<PathBuf, SetupError> {
    let mut at = merged.to_path_buf();
    for comp in target.split('/').filter(|c| !c.is_empty()) {
        if comp == "." || comp == ".." {
            return Err(SetupError::Other(format!(
                "bind target {target:?}: '.' and '..' are not allowed"
            )));
        }
        at.push(comp);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(SetupError::Other(format!(
                    "bind target {target:?}: {comp:?} is a symlink in the sandbox's root"
                )))
            }
            Ok(m) if !m.is_dir() => {
                return Err(SetupError::Other(format!(
                    "bind target {target:?}: {comp:?} is not a directory in the sandbox's root"
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                io(format!("mkdir {}", at.display()), fs::create_dir(&at))?;
            }
            Err(e) => return io(format!("stat {}", at.display()), Err(e)),
        }
    }
    Ok(at)
}

fn mkdirs(p: &Path) -> Result<(), SetupError> {
    io(format!("mkdir {}", p.display()), fs::create_dir_all(p))
}

fn touch(p: &Path) -> Result<(), SetupError> {
    if let Some(parent) = p.parent() {
        mkdirs(parent)?;
    }
    if fs::symlink_metadata(p).is_err() {
        io(format!("create {}", p.display()), fs::write(p, b""))?;
    }
    Ok(())
}

/// Remounts `target` and every mount below it read-only (and nosuid,
/// nodev where the mount allows): one atomic mount_setattr(AT_RECURSIVE)
/// on kernels that have it (5.12+), else each mount found in mountinfo
/// (reading mountinfo on every bind cost a tenth of a sandbox boot).
fn remount_tree_ro(target: &Path) -> Result<(), SetupError> {
    use crate::userns::{
        MountAttr, AT_RECURSIVE, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY,
    };
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(target.as_os_str().as_bytes()) else {
        return Err(SetupError::Other(format!(
            "mount point {} has a NUL byte",
            target.display()
        )));
    };
    for set in [
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        MOUNT_ATTR_RDONLY,
    ] {
        let attr = MountAttr {
            attr_set: set,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: `path` is a NUL-terminated string and `attr` a valid
        // mount_attr of the size passed; both outlive the call.
        let rc = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_mount_setattr,
                nix::libc::AT_FDCWD,
                path.as_ptr(),
                AT_RECURSIVE,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    remount_tree_ro_each(target)
}

/// [`remount_tree_ro`] for kernels without mount_setattr.
fn remount_tree_ro_each(target: &Path) -> Result<(), SetupError> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let t = target.to_string_lossy().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(|m| m.replace("\\040", " ")))
        .filter(|m| *m == t || m.starts_with(&format!("{t}/")))
        .collect();
    points.sort();
    points.dedup();
    for m in points {
        let flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        // A remount may fail on mounts that carry locked flags; keep the
        // stricter original in that case.
        if mount(NONE, m.as_str(), NONE, flags, NONE).is_err() {
            sys(
                format!("remount {m} read-only"),
                mount(
                    NONE,
                    m.as_str(),
                    NONE,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    NONE,
                ),
            )?;
        }
    }
    Ok(())
}

/// Kernel interfaces of /proc hidden from the sandbox: files read as
/// empty, directories are empty and read-only (Docker's and runc's masked
/// paths, plus slabinfo, which helps heap exploitation).
const PROC_MASKED: [&str; 10] = [
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/latency_stats",
    "/proc/slabinfo",
    "/proc/acpi",
    "/proc/scsi",
    "/proc/asound",
];

/// Parts of /proc the sandbox may read but never write (a writable
/// `/proc/sys` would let a root sandbox without a user namespace set
/// `kernel.core_pattern`).
const PROC_READ_ONLY: [&str; 5] = [
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/irq",
    "/proc/bus",
    "/proc/fs",
];

/// Masks the /proc mounted under `root` as a sandbox's is.
pub(crate) fn mask_proc(root: &Path) -> Result<(), SetupError> {
    for p in PROC_MASKED {
        mask(&inside(root, p), p)?;
    }
    for p in PROC_READ_ONLY {
        read_only_self_bind(&inside(root, p), p)?;
    }
    Ok(())
}

/// Hides `t` (`what` inside the sandbox): a file behind /dev/null, a
/// directory behind an empty read-only tmpfs. A path this kernel does not
/// have is skipped; any other failure fails the boot.
fn mask(t: &Path, what: &str) -> Result<(), SetupError> {
    let md = match fs::symlink_metadata(t) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return io(format!("inspect {what}"), Err(e)),
    };
    if md.is_dir() {
        sys(
            format!("mask {what}"),
            mount(
                Some("tmpfs"),
                t,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=4k,mode=555"),
            ),
        )
    } else {
        sys(
            format!("mask {what}"),
            mount(Some("/dev/null"), t, NONE, MsFlags::MS_BIND, NONE),
        )
    }
}

/// Makes `t` (`what` inside the sandbox) a read-only bind of itself. A
/// path this kernel does not have is skipped; any other failure fails
/// the boot (the mounts are this mount namespace's own, so the remount
/// works alike with and without a user namespace).
fn read_only_self_bind(t: &Path, what: &str) -> Result<(), SetupError> {
    match fs::symlink_metadata(t) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return io(format!("inspect {what}"), Err(e)),
    }
    sys(
        format!("bind {what}"),
        mount(Some(t), t, NONE, MsFlags::MS_BIND | MsFlags::MS_REC, NONE),
    )?;
    remount_tree_ro(t)
}

/// Mounts the overlay root with short relative layer names, so the
/// options shown in the sandbox's /proc/self/mountinfo name no host path:
/// from the sandbox dir (the upper dir's parent), `lower/<k>` are
/// symlinks to the layers and `upper`, `work` are relative. The kernel
/// resolves the names at mount time and shows them as given.
///
/// In a user namespace (`userxattr`), the overlay keeps its own metadata —
/// opaque directories, above all: a directory removed and made again must
/// not show the lower layer's files — in `user.overlay.*` xattrs; without
/// the option the kernel cannot write its `trusted.*` ones there, keeps
/// opacity only in memory and the upper dir on disk misses it (what a
/// snapshot of the sandbox copies). Kernels before 5.11 lack the option:
/// then without.
fn mount_overlay(
    r: &stacyvm_agent_proto::boot::RootSpec,
    in_userns: bool,
) -> Result<(), SetupError> {
    let upper = Path::new(&r.upper);
    let work = Path::new(&r.work);
    let sbdir = upper
        .parent()
        .ok_or_else(|| SetupError::Other("upper dir has no parent".into()))?;
    if work.parent() != Some(sbdir) {
        return Err(SetupError::Other(
            "upper and work dirs must share a parent".into(),
        ));
    }
    let links = sbdir.join("lower");
    match fs::remove_dir_all(&links) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return io(format!("clear {}", links.display()), Err(e));
        }
        _ => {}
    }
    mkdirs(&links)?;
    let mut lower = Vec::new();
    for (k, l) in r.lower.iter().enumerate() {
        io(
            format!("link layer {k}"),
            symlink(l, links.join(k.to_string())),
        )?;
        lower.push(format!("lower/{k}"));
    }
    let name = |p: &Path| -> String {
        p.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        name(upper),
        name(work)
    );
    sys("chdir sandbox dir", nix::unistd::chdir(sbdir))?;
    // `volatile` (Linux 5.10+): the upper layer is never synced, neither
    // by fsync inside nor at unmount. A sandbox does not outlive its host
    // (its processes die with it), so durability across a host crash buys
    // nothing and every sync costs a flush of the host filesystem.
    let mut tries = Vec::new();
    if in_userns {
        tries.push(format!("{opts},userxattr,volatile"));
        tries.push(format!("{opts},userxattr"));
    }
    tries.push(format!("{opts},volatile"));
    tries.push(opts);
    let mut mounted = Err(nix::errno::Errno::EINVAL);
    for o in &tries {
        mounted = mount(
            Some("overlay"),
            Path::new(&r.merged),
            Some("overlay"),
            MsFlags::empty(),
            Some(o.as_str()),
        );
        if mounted != Err(nix::errno::Errno::EINVAL) {
            break;
        }
    }
    // Not back to the server's working directory: as the sandbox's root
    // (an unprivileged host id) it may not be allowed in (e.g. /root, or a
    // 0700 data dir). Every later step uses absolute paths.
    sys("chdir /", nix::unistd::chdir("/"))?;
    sys("mount overlay root", mounted)
}

pub fn build_root(spec: &BootSpec) -> Result<(), SetupError> {
    sys(
        "make / private",
        mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE),
    )?;
    let r = &spec.root;
    let merged = Path::new(&r.merged);
    mkdirs(merged)?;
    mkdirs(Path::new(&r.upper))?;
    mkdirs(Path::new(&r.work))?;
    mount_overlay(r, spec.userns.is_some())?;

    for b in &spec.binds {
        let src = Path::new(&b.source);
        let meta = io(format!("bind source {}", b.source), fs::metadata(src))?;
        let dst = if b.confined {
            if !meta.is_dir() {
                return Err(SetupError::Other(format!(
                    "bind source for {:?} is not a directory",
                    b.target
                )));
            }
            confined_dir(merged, &b.target)?
        } else {
            let dst = inside(merged, &b.target);
            if meta.is_dir() {
                mkdirs(&dst)?;
            } else {
                touch(&dst)?;
            }
            dst
        };
        sys(
            format!("bind {} -> {}", b.source, b.target),
            mount(
                Some(src),
                &dst,
                NONE,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                NONE,
            ),
        )?;
        if b.readonly {
            remount_tree_ro(&dst)?;
        }
    }

    // Kernel interfaces.
    let proc_dir = inside(merged, "/proc");
    mkdirs(&proc_dir)?;
    sys(
        "mount /proc",
        mount(
            Some("proc"),
            &proc_dir,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            NONE,
        ),
    )?;
    mask_proc(merged)?;
    build_dev(merged)?;

    let tmp_size = if spec.tmp_size_mb > 0 {
        format!("size={}m,", spec.tmp_size_mb)
    } else {
        String::new()
    };
    for (p, mode, extra) in [
        ("/tmp", "1777", tmp_size.as_str()),
        ("/run", "755", "size=64m,"),
        ("/dev/shm", "1777", "size=64m,"),
    ] {
        let t = inside(merged, p);
        mkdirs(&t)?;
        let opts = format!("{extra}mode={mode}");
        sys(
            format!("mount tmpfs {p}"),
            mount(
                Some("tmpfs"),
                &t,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(opts.as_str()),
            ),
        )?;
    }
    mkdirs(&inside(merged, "/workspace"))?;

    for m in &spec.masks {
        let t = inside(merged, m);
        match fs::symlink_metadata(&t) {
            Ok(md) if md.is_dir() => {
                sys(
                    format!("mask {m}"),
                    mount(
                        Some("tmpfs"),
                        &t,
                        Some("tmpfs"),
                        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                        Some("size=4k,mode=000"),
                    ),
                )?;
            }
            Ok(md) if md.is_file() => {
                sys(
                    format!("mask {m}"),
                    mount(Some("/dev/null"), &t, NONE, MsFlags::MS_BIND, NONE),
                )?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn build_dev(merged: &Path) -> Result<(), SetupError> {
    let dev = inside(merged, "/dev");
    mkdirs(&dev)?;
    sys(
        "mount /dev",
        mount(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=755,size=64k"),
        ),
    )?;
    // Device nodes are created directly (cheaper than six bind mounts); the
    // sandbox loses CAP_MKNOD afterwards, so it cannot create others.
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let dst = dev.join(name);
        let mode = nix::sys::stat::Mode::from_bits_truncate(0o666);
        let made = nix::sys::stat::mknod(
            &dst,
            nix::sys::stat::SFlag::S_IFCHR,
            mode,
            nix::sys::stat::makedev(major, minor),
        );
        if made == Err(nix::errno::Errno::EPERM) {
            // In a user namespace (rootless mode) mknod is not allowed:
            // bind the host's node instead, still visible before pivot.
            touch(&dst)?;
            sys(
                format!("bind /dev/{name}"),
                mount(
                    Some(&Path::new("/dev").join(name)),
                    &dst,
                    NONE,
                    MsFlags::MS_BIND,
                    NONE,
                ),
            )?;
            continue;
        }
        sys(format!("mknod /dev/{name}"), made)?;
        // mknod honours the umask; make sure the node is world-usable.
        io(
            format!("chmod /dev/{name}"),
            fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(0o666)),
        )?;
    }
    let pts = dev.join("pts");
    mkdirs(&pts)?;
    sys(
        "mount devpts",
        mount(
            Some("devpts"),
            &pts,
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=620"),
        ),
    )?;
    io("ptmx link", symlink("pts/ptmx", dev.join("ptmx")))?;
    mkdirs(&dev.join("shm"))?;
    for (l, t) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        io(format!("/dev/{l} link"), symlink(t, dev.join(l)))?;
    }
    Ok(())
}

/// Makes `merged` the root and detaches the host tree.
pub fn pivot(merged: &Path) -> Result<(), SetupError> {
    let old = merged.join(".oldroot");
    mkdirs(&old)?;
    sys("chdir new root", nix::unistd::chdir(merged))?;
    sys("pivot_root", nix::unistd::pivot_root(".", ".oldroot"))?;
    sys("chdir /", nix::unistd::chdir("/"))?;
    sys(
        "detach old root",
        umount2("/.oldroot", MntFlags::MNT_DETACH),
    )?;
    let _ = fs::remove_dir("/.oldroot");
    Ok(())
}
