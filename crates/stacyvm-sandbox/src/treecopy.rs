//! Copies a directory tree that a sandbox wrote (an overlay upper dir) into
//! a new directory, never following a link: every step is relative to a
//! directory descriptor opened with `O_NOFOLLOW`, so a writer that swaps a
//! directory for a symlink mid-copy gets its own link copied, never the
//! host file it names.
//!
//! Copied: directories, regular files (hard links kept, data through
//! `copy_file_range`: a reflink where the filesystem shares extents),
//! symlinks, FIFOs and overlay whiteouts (0/0 character devices), owners
//! (optionally shifted out of a user-namespace id block), modes, times;
//! overlay opacity (written for both the `trusted.` and the `user.` xattr
//! namespace, so an overlay reads it either way) and other `user.*`
//! xattrs. Not copied: sockets, other device nodes, `security.*` xattrs
//! (file capabilities name the writer's root id) and POSIX ACLs.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// Deepest directory nesting copied (one descriptor pair is open per
/// level).
pub const MAX_DEPTH: usize = 256;

/// Why a copy stopped (what it made so far is the caller's to remove).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// More entries than allowed, or nesting deeper than [`MAX_DEPTH`].
    #[error("{0}")]
    Limit(String),
    /// The destination filesystem lacks what the copy needs (xattrs).
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Io(String),
}

/// Host id `base + n` becomes `n`; ids outside the block become nobody
/// (65534).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shift {
    pub base: u32,
    pub count: u32,
}

impl Shift {
    fn map(self, id: u32) -> u32 {
        if id >= self.base && id - self.base < self.count {
            id - self.base
        } else {
            65534
        }
    }
}

/// What a copy made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    pub entries: u64,
    /// Allocated bytes of the source entries copied.
    pub bytes: u64,
    /// Bytes of file data copied (holes excluded).
    pub data: u64,
}

type Result<T> = std::result::Result<T, CopyError>;

fn errno(what: impl std::fmt::Display) -> impl FnOnce(nix::errno::Errno) -> CopyError {
    move |e| CopyError::Io(format!("{what}: {e}"))
}

/// Copies the tree at `src` to the new directory `dst` (see the module
/// docs for what is copied), shifting ids by `shift`.
/// At most `max_entries` entries and `max_bytes` bytes of file data (holes
/// are not copied and do not count).
pub fn copy_tree(
    src: &Path,
    dst: &Path,
    shift: Option<Shift>,
    max_entries: u64,
    max_bytes: u64,
) -> Result<Copied> {
    let s = open_dir(None, src.as_os_str())?;
    let parent = dst
        .parent()
        .ok_or_else(|| CopyError::Io("the destination has no parent".into()))?;
    let name = dst
        .file_name()
        .ok_or_else(|| CopyError::Io("the destination has no name".into()))?;
    let p = open_dir(None, parent.as_os_str())?;
    let st = nix::sys::stat::fstat(s.as_raw_fd()).map_err(errno(src.display()))?;
    let mut c = Copier {
        shift,
        max_entries,
        max_bytes,
        root: None,
        rel: PathBuf::new(),
        links: HashMap::new(),
        copied: Copied::default(),
        buf: Vec::new(),
    };
    c.dir(&s, &st, p.as_fd(), name, 0)?;
    Ok(c.copied)
}

struct Copier {
    shift: Option<Shift>,
    max_entries: u64,
    max_bytes: u64,
    /// The destination's top directory, and the path below it of the
    /// directory being filled.
    root: Option<OwnedFd>,
    rel: PathBuf,
    /// Source inode of a multiply-linked file → its first copy (relative
    /// to `root`, through directories this copy made), linked again for
    /// the source's other names.
    links: HashMap<u64, PathBuf>,
    copied: Copied,
    buf: Vec<u8>,
}

fn cstr(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| CopyError::Io("a name with NUL".into()))
}

fn open_dir(at: Option<BorrowedFd<'_>>, name: &OsStr) -> Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        Some(at.map_or(libc::AT_FDCWD, |f| f.as_raw_fd())),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno(format!("opening {}", name.to_string_lossy())))?;
    // SAFETY: openat returned a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Copier {
    fn ids(&self, st: &FileStat) -> (u32, u32) {
        match self.shift {
            Some(s) => (s.map(st.st_uid), s.map(st.st_gid)),
            None => (st.st_uid, st.st_gid),
        }
    }

    fn count(&mut self, st: &FileStat) -> Result<()> {
        self.copied.entries += 1;
        self.copied.bytes += st.st_blocks as u64 * 512;
        if self.copied.entries > self.max_entries {
            return Err(CopyError::Limit(format!(
                "more than {} files to copy",
                self.max_entries
            )));
        }
        Ok(())
    }

    /// Copies directory `s` (stat `st`) as `name` in `dparent`.
    fn dir(
        &mut self,
        s: &OwnedFd,
        st: &FileStat,
        dparent: BorrowedFd<'_>,
        name: &OsStr,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(CopyError::Limit(format!(
                "directories nest deeper than {MAX_DEPTH}"
            )));
        }
        self.count(st)?;
        nix::sys::stat::mkdirat(
            Some(dparent.as_raw_fd()),
            name,
            Mode::from_bits_truncate(0o700),
        )
        .map_err(errno(format!("mkdir {}", name.to_string_lossy())))?;
        let d = open_dir(Some(dparent), name)?;
        let top = self.root.is_none();
        if top {
            let dup = nix::unistd::dup(d.as_raw_fd()).map_err(errno("dup"))?;
            // SAFETY: dup returned a new descriptor we own.
            self.root = Some(unsafe { OwnedFd::from_raw_fd(dup) });
        } else {
            self.rel.push(name);
        }
        // Entries first (a Dir owns its descriptor: read from a duplicate).
        let dup = nix::unistd::dup(s.as_raw_fd()).map_err(errno("dup"))?;
        let mut listing = nix::dir::Dir::from_fd(dup).map_err(errno("reading a directory"))?;
        let mut names = Vec::new();
        for e in listing.iter() {
            let e = e.map_err(errno("reading a directory"))?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(e.file_name().to_owned());
            }
        }
        drop(listing);
        for n in names {
            self.entry(s, &d, &n, depth)?;
        }
        if !top {
            self.rel.pop();
        }
        copy_xattrs(s.as_raw_fd(), d.as_raw_fd(), true)?;
        self.finish(d.as_raw_fd(), st)?;
        Ok(())
    }

    fn entry(&mut self, s: &OwnedFd, d: &OwnedFd, name: &CStr, depth: usize) -> Result<()> {
        let os = OsStr::from_bytes(name.to_bytes());
        let st =
            match nix::sys::stat::fstatat(Some(s.as_raw_fd()), os, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                // Gone since the listing (an unfrozen sandbox): nothing to copy.
                Err(nix::errno::Errno::ENOENT) => return Ok(()),
                Err(e) => return Err(errno(format!("stat {}", os.to_string_lossy()))(e)),
            };
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        let (uid, gid) = self.ids(&st);
        match kind {
            SFlag::S_IFDIR => {
                let child = match open_dir(Some(s.as_fd()), os) {
                    Ok(c) => c,
                    Err(_) => return Ok(()), // swapped for a non-directory since the stat
                };
                let cst = nix::sys::stat::fstat(child.as_raw_fd()).map_err(errno("stat"))?;
                self.dir(&child, &cst, d.as_fd(), os, depth + 1)
            }
            SFlag::S_IFREG => self.file(s, d, os, &st),
            SFlag::S_IFLNK => {
                self.count(&st)?;
                let target = nix::fcntl::readlinkat(Some(s.as_raw_fd()), os)
                    .map_err(errno(format!("readlink {}", os.to_string_lossy())))?;
                nix::unistd::symlinkat(target.as_os_str(), Some(d.as_raw_fd()), os)
                    .map_err(errno(format!("symlink {}", os.to_string_lossy())))?;
                nix::unistd::fchownat(
                    Some(d.as_raw_fd()),
                    os,
                    Some(uid.into()),
                    Some(gid.into()),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(errno("chown"))?;
                set_times(d.as_raw_fd(), Some(os), &st)
            }
            SFlag::S_IFIFO | SFlag::S_IFCHR => {
                // Only the overlay's whiteouts (0/0) among character devices.
                if kind == SFlag::S_IFCHR && st.st_rdev != 0 {
                    return Ok(());
                }
                self.count(&st)?;
                nix::sys::stat::mknodat(
                    Some(d.as_raw_fd()),
                    os,
                    kind,
                    Mode::from_bits_truncate(st.st_mode & 0o7777),
                    0,
                )
                .map_err(errno(format!("mknod {}", os.to_string_lossy())))?;
                nix::unistd::fchownat(
                    Some(d.as_raw_fd()),
                    os,
                    Some(uid.into()),
                    Some(gid.into()),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(errno("chown"))?;
                nix::sys::stat::fchmodat(
                    Some(d.as_raw_fd()),
                    os,
                    Mode::from_bits_truncate(st.st_mode & 0o7777),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )
                .map_err(errno("chmod"))?;
                set_times(d.as_raw_fd(), Some(os), &st)
            }
            // Sockets and device nodes are not state a child can use.
            _ => Ok(()),
        }
    }

    fn file(&mut self, s: &OwnedFd, d: &OwnedFd, name: &OsStr, st: &FileStat) -> Result<()> {
        if st.st_nlink > 1 {
            if let (Some(first), Some(root)) = (self.links.get(&st.st_ino), &self.root) {
                let linked = nix::unistd::linkat(
                    Some(root.as_raw_fd()),
                    first.as_os_str(),
                    Some(d.as_raw_fd()),
                    name,
                    AtFlags::empty(),
                );
                if linked.is_ok() {
                    self.copied.entries += 1;
                    if self.copied.entries > self.max_entries {
                        return Err(CopyError::Limit(format!(
                            "more than {} files to copy",
                            self.max_entries
                        )));
                    }
                    return Ok(());
                }
                // Otherwise a copy of its own.
            }
        }
        self.count(st)?;
        let src = match nix::fcntl::openat(
            Some(s.as_raw_fd()),
            name,
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY,
            Mode::empty(),
        ) {
            // SAFETY: openat returned a new descriptor we own.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(errno(format!("open {}", name.to_string_lossy()))(e)),
        };
        let fst = nix::sys::stat::fstat(src.as_raw_fd()).map_err(errno("stat"))?;
        if SFlag::from_bits_truncate(fst.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
            return Ok(()); // swapped since the stat
        }
        let dst = nix::fcntl::openat(
            Some(d.as_raw_fd()),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(errno(format!("create {}", name.to_string_lossy())))?;
        // SAFETY: openat returned a new descriptor we own.
        let dst = unsafe { OwnedFd::from_raw_fd(dst) };
        self.data(&src, &dst, fst.st_size as u64)?;
        copy_xattrs(src.as_raw_fd(), dst.as_raw_fd(), false)?;
        self.finish(dst.as_raw_fd(), &fst)?;
        if fst.st_nlink > 1 {
            self.links.insert(fst.st_ino, self.rel.join(name));
        }
        Ok(())
    }

    /// File contents: `copy_file_range` (a reflink where the filesystem
    /// shares extents, an in-kernel copy elsewhere), read/write when the
    /// kernel cannot.
    fn data(&mut self, src: &OwnedFd, dst: &OwnedFd, size: u64) -> Result<()> {
        use nix::unistd::{lseek, Whence};
        let size_off = i64::try_from(size).unwrap_or(i64::MAX);
        // Only the data extents: holes stay holes (a sparse file the size
        // of a disk must not become one), and every byte copied counts
        // against the budget.
        let mut pos: i64 = 0;
        while pos < size_off {
            let start = match lseek(src.as_raw_fd(), pos, Whence::SeekData) {
                Ok(o) => o,
                Err(nix::errno::Errno::ENXIO) => break, // a hole to the end
                Err(e) => return Err(errno("finding file data")(e)),
            };
            let end = lseek(src.as_raw_fd(), start, Whence::SeekHole)
                .map_err(errno("finding file holes"))?
                .min(size_off);
            if end <= start {
                break;
            }
            self.extent(src, dst, start, end)?;
            pos = end;
        }
        // The size, holes at the end included.
        nix::unistd::ftruncate(dst.as_fd(), size_off).map_err(errno("sizing a file"))?;
        Ok(())
    }

    /// Copies bytes `start..end` of `src` to the same place in `dst`.
    fn extent(&mut self, src: &OwnedFd, dst: &OwnedFd, start: i64, end: i64) -> Result<()> {
        let len = u64::try_from(end - start).unwrap_or(0);
        self.copied.data = self.copied.data.saturating_add(len);
        if self.copied.data > self.max_bytes {
            return Err(CopyError::Limit(format!(
                "more than {} bytes of file data to copy",
                self.max_bytes
            )));
        }
        let (mut off_in, mut off_out) = (start, start);
        while off_in < end {
            let chunk = usize::try_from((end - off_in).min(1 << 30)).unwrap_or(1 << 30);
            // SAFETY: valid descriptors; the offsets are ours and updated
            // by the kernel.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    chunk,
                    0,
                )
            };
            if n > 0 {
                continue;
            }
            if n == 0 {
                return Ok(()); // shrunk since the stat
            }
            let e = nix::errno::Errno::last();
            if e == nix::errno::Errno::EINTR {
                continue;
            }
            if matches!(
                e,
                nix::errno::Errno::EXDEV
                    | nix::errno::Errno::EINVAL
                    | nix::errno::Errno::EOPNOTSUPP
                    | nix::errno::Errno::ENOSYS
            ) {
                return self.extent_by_read(src, dst, off_in, end);
            }
            return Err(errno("copying file data")(e));
        }
        Ok(())
    }

    fn extent_by_read(&mut self, src: &OwnedFd, dst: &OwnedFd, start: i64, end: i64) -> Result<()> {
        self.buf.resize(1 << 20, 0);
        let mut at = start;
        while at < end {
            let want = usize::try_from(end - at)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let n = match nix::sys::uio::pread(src.as_fd(), &mut self.buf[..want], at) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(errno("reading file data")(e)),
            };
            let mut off = 0;
            while off < n {
                match nix::sys::uio::pwrite(dst.as_fd(), &self.buf[off..n], at + off as i64) {
                    Ok(w) => off += w,
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(errno("writing file data")(e)),
                }
            }
            at += n as i64;
        }
        Ok(())
    }

    /// Owner, mode (after the owner: chown clears set-id bits), times.
    fn finish(&self, fd: RawFd, st: &FileStat) -> Result<()> {
        let (uid, gid) = self.ids(st);
        nix::unistd::fchown(fd, Some(uid.into()), Some(gid.into())).map_err(errno("chown"))?;
        nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(st.st_mode & 0o7777))
            .map_err(errno("chmod"))?;
        set_times(fd, None, st)
    }
}

fn set_times(fd: RawFd, name: Option<&OsStr>, st: &FileStat) -> Result<()> {
    let ts = [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ];
    let rc = match name {
        Some(n) => {
            let c = cstr(n)?;
            // SAFETY: valid descriptor, NUL-terminated name, two timespecs.
            unsafe { libc::utimensat(fd, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) }
        }
        // SAFETY: valid descriptor and two timespecs.
        None => unsafe { libc::futimens(fd, ts.as_ptr()) },
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(errno("setting times")(nix::errno::Errno::last()))
    }
}

/// Overlay opacity and `user.*` xattrs from `src` to `dst` (see the module
/// docs).
fn copy_xattrs(src: RawFd, dst: RawFd, is_dir: bool) -> Result<()> {
    let names = list_xattrs(src);
    let mut opaque = false;
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let n = String::from_utf8_lossy(name);
        if n == "trusted.overlay.opaque" || n == "user.overlay.opaque" {
            opaque |= get_xattr(src, name).is_some_and(|v| v.first() == Some(&b'y'));
            continue;
        }
        if n.starts_with("user.overlay.") || !n.starts_with("user.") {
            continue;
        }
        if let Some(v) = get_xattr(src, name) {
            set_xattr(dst, name, &v)?;
        }
    }
    if opaque && is_dir {
        set_xattr(dst, b"trusted.overlay.opaque", b"y")?;
        set_xattr(dst, b"user.overlay.opaque", b"y")?;
    }
    Ok(())
}

/// Whether the directory at `path` is marked opaque for overlayfs
/// (`trusted.overlay.opaque` or `user.overlay.opaque` = `y`). The path is
/// opened `O_NOFOLLOW`: a link is never a directory here.
pub fn is_opaque_dir(path: &std::path::Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(dir) = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_DIRECTORY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) else {
        return false;
    };
    // SAFETY: `open` returned a descriptor this function owns.
    let dir = unsafe { std::os::fd::OwnedFd::from_raw_fd(dir) };
    [b"trusted.overlay.opaque".as_slice(), b"user.overlay.opaque"]
        .iter()
        .any(|n| get_xattr(dir.as_raw_fd(), n).is_some_and(|v| v.first() == Some(&b'y')))
}

/// Marks the directory at `path` opaque for overlayfs (both spellings).
pub fn mark_opaque_dir(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    set_xattr(f.as_raw_fd(), b"trusted.overlay.opaque", b"y")
        .map_err(|e| std::io::Error::other(format!("{e:?}")))
}

fn list_xattrs(fd: RawFd) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::flistxattr(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return buf;
        }
        if nix::errno::Errno::last() != nix::errno::Errno::ERANGE || buf.len() >= 1 << 20 {
            return Vec::new();
        }
        buf.resize(buf.len() * 4, 0);
    }
}

fn get_xattr(fd: RawFd, name: &[u8]) -> Option<Vec<u8>> {
    let c = CString::new(name).ok()?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: valid descriptor, NUL-terminated name, writable buffer.
        let n = unsafe { libc::fgetxattr(fd, c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Some(buf);
        }
        if nix::errno::Errno::last() != nix::errno::Errno::ERANGE || buf.len() >= 1 << 16 {
            return None;
        }
        buf.resize(buf.len() * 16, 0);
    }
}

fn set_xattr(fd: RawFd, name: &[u8], value: &[u8]) -> Result<()> {
    let c = CString::new(name).map_err(|_| CopyError::Io("an xattr name with NUL".into()))?;
    // SAFETY: valid descriptor, NUL-terminated name, readable value.
    let rc = unsafe { libc::fsetxattr(fd, c.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc == 0 {
        return Ok(());
    }
    match nix::errno::Errno::last() {
        // A filesystem without (user) xattrs: opacity is lost, which the
        // child's overlay would need; say so.
        nix::errno::Errno::EOPNOTSUPP => Err(CopyError::Unsupported(
            "the destination filesystem does not support the extended attributes overlay layers need".into(),
        )),
        e => Err(errno(format!(
            "setting xattr {}",
            String::from_utf8_lossy(name)
        ))(e)),
    }
}
