//! Directory transfer as tar streams, inside the sandbox root.
//!
//! Packing walks a directory without following symlinks: regular files,
//! directories and symlinks (stored as links) go in; sockets, FIFOs and
//! devices are skipped and counted. Unpacking confines every entry to the
//! destination: absolute names, `..`, device nodes, FIFOs and hard links
//! to anything but a file of the same archive are refused; no symlink is
//! ever followed (a parent that is a symlink is refused, a symlink in the
//! way of a file is replaced). A refused or broken archive removes
//! everything the extraction created; extracted files belong to the
//! destination directory's owner.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use stacyvm_agent_proto::{AgentError, ErrorKind};

/// An I/O error on `path` as the agent protocol's typed error: what the
/// caller's path or the sandbox's state caused is the caller's error.
pub fn io_error(path: &str, e: &io::Error) -> AgentError {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        io::ErrorKind::DirectoryNotEmpty => {
            return AgentError::new(
                ErrorKind::InvalidInput,
                format!("directory {path:?} is not empty (use recursive)"),
            )
        }
        io::ErrorKind::IsADirectory => {
            return AgentError::new(ErrorKind::InvalidInput, format!("{path:?} is a directory"))
        }
        io::ErrorKind::NotADirectory => {
            return AgentError::new(
                ErrorKind::InvalidInput,
                format!("a component of {path:?} is not a directory"),
            )
        }
        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidFilename => ErrorKind::InvalidInput,
        _ => match e.raw_os_error() {
            // What the caller's path or the sandbox's state caused is the
            // caller's error (4xx), never an internal one.
            Some(libc::EIO | libc::ENXIO | libc::ENODEV | libc::EINVAL | libc::EOVERFLOW)
            | Some(libc::ELOOP | libc::ENAMETOOLONG | libc::EXDEV | libc::ESPIPE) => {
                ErrorKind::InvalidInput
            }
            Some(libc::EROFS | libc::EPERM | libc::ETXTBSY) => ErrorKind::PermissionDenied,
            Some(libc::ENOSPC | libc::EDQUOT | libc::EMFILE | libc::ENFILE | libc::ENOMEM) => {
                ErrorKind::ResourceExhausted
            }
            Some(libc::EFBIG) => ErrorKind::TooLarge,
            Some(libc::EBUSY) => ErrorKind::AlreadyExists,
            _ => ErrorKind::Internal,
        },
    };
    AgentError::new(kind, format!("{path}: {e}"))
}

use io_error as err;

fn invalid(msg: impl Into<String>) -> AgentError {
    AgentError::new(ErrorKind::InvalidInput, msg)
}

/// What a pack or unpack did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Entries left out when packing (sockets, FIFOs, devices).
    pub skipped: u64,
}

/// Limits of one transfer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_entries: u64,
}

impl Limits {
    fn check(&self, r: &Report) -> Result<(), AgentError> {
        if r.bytes > self.max_bytes {
            return Err(AgentError::new(
                ErrorKind::TooLarge,
                format!(
                    "the archive holds more than the limit of {} bytes",
                    self.max_bytes
                ),
            ));
        }
        if r.entries > self.max_entries {
            return Err(AgentError::new(
                ErrorKind::TooLarge,
                format!(
                    "the archive holds more than the limit of {} entries",
                    self.max_entries
                ),
            ));
        }
        Ok(())
    }
}

/// Writes a tar of `path` (a directory: its contents; a file or symlink:
/// that one entry) to `out`.
pub fn pack<W: Write>(path: &str, out: W, limits: Limits) -> Result<Report, AgentError> {
    pack_named(path, None, out, limits)
}

/// [`pack`], with a file or symlink stored under `name` instead of its own.
pub fn pack_named<W: Write>(
    path: &str,
    name: Option<&Path>,
    out: W,
    limits: Limits,
) -> Result<Report, AgentError> {
    let root = Path::new(path);
    let meta = fs::symlink_metadata(root).map_err(|e| err(path, &e))?;
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    let mut r = Report::default();
    if meta.is_dir() {
        walk(&mut b, root, Path::new(""), meta.dev(), &mut r, limits)?;
    } else {
        let name = match name {
            Some(n) => n.to_path_buf(),
            None => root
                .file_name()
                .map(PathBuf::from)
                .ok_or_else(|| invalid(format!("{path:?} names no file")))?,
        };
        add(&mut b, root, &name, &meta, &mut r, limits)?;
    }
    b.finish().map_err(|e| err(path, &e))?;
    Ok(r)
}

/// Walks one file system (`dev`): a mount point inside the tree is stored
/// as an empty directory, so `/proc`, `/sys` and other mounts stay out.
fn walk<W: Write>(
    b: &mut tar::Builder<W>,
    dir: &Path,
    rel: &Path,
    dev: u64,
    r: &mut Report,
    limits: Limits,
) -> Result<(), AgentError> {
    let shown = dir.to_string_lossy().to_string();
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| err(&shown, &e))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    // A stable order: the same tree gives the same archive.
    names.sort();
    for name in names {
        let full = dir.join(&name);
        let rel_name = rel.join(&name);
        let Ok(meta) = fs::symlink_metadata(&full) else {
            continue; // gone meanwhile
        };
        add(b, &full, &rel_name, &meta, r, limits)?;
        if meta.is_dir() && meta.dev() == dev {
            walk(b, &full, &rel_name, dev, r, limits)?;
        }
    }
    Ok(())
}

fn add<W: Write>(
    b: &mut tar::Builder<W>,
    full: &Path,
    name: &Path,
    meta: &fs::Metadata,
    r: &mut Report,
    limits: Limits,
) -> Result<(), AgentError> {
    let shown = full.to_string_lossy().to_string();
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_dir() || ft.is_symlink()) {
        r.skipped += 1;
        return Ok(());
    }
    r.entries += 1;
    if ft.is_file() {
        r.bytes += meta.len();
    }
    limits.check(r)?;
    if ft.is_dir() {
        b.append_dir(name, full).map_err(|e| err(&shown, &e))
    } else if ft.is_file() {
        // Exactly the size in the header: a file that grows meanwhile is
        // cut there, one that shrinks is padded with zeros (either way the
        // archive stays well-formed).
        let f = fs::File::open(full).map_err(|e| err(&shown, &e))?;
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
        let len = meta.len();
        let exact = io::BufReader::with_capacity(1 << 20, f)
            .take(len)
            .chain(io::repeat(0))
            .take(len);
        b.append_data(&mut h, name, exact)
            .map_err(|e| err(&shown, &e))
    } else {
        b.append_path_with_name(full, name)
            .map_err(|e| err(&shown, &e))
    }
}

/// A name from the archive as a relative path inside the destination, or
/// why not.
fn confined(name: &Path) -> Result<PathBuf, AgentError> {
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(invalid(format!(
                    "archive entry {:?} climbs out with ..",
                    name.display()
                )))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(invalid(format!(
                    "archive entry {:?} is an absolute path",
                    name.display()
                )))
            }
        }
    }
    Ok(out)
}

/// Undoes a failed extraction: what it created, newest first.
struct Created {
    paths: Vec<PathBuf>,
    done: bool,
}

impl Drop for Created {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for p in self.paths.iter().rev() {
            match fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => {
                    let _ = fs::remove_dir(p);
                }
                Ok(_) => {
                    let _ = fs::remove_file(p);
                }
                Err(_) => {}
            }
        }
    }
}

/// Makes sure every parent of `rel` under `root` is a real directory
/// (never a symlink), creating missing ones.
fn parents(root: &Path, rel: &Path, created: &mut Created) -> Result<(), AgentError> {
    let mut at = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        at.push(c);
        let shown = at.to_string_lossy().to_string();
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(invalid(format!(
                    "archive entry {:?} goes through the symlink {shown:?} (symlinks are never followed)",
                    rel.display()
                )))
            }
            Ok(_) => {
                return Err(invalid(format!(
                    "archive entry {:?}: {shown:?} is not a directory",
                    rel.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&at).map_err(|e| err(&shown, &e))?;
                created.paths.push(at.clone());
            }
            Err(e) => return Err(err(&shown, &e)),
        }
    }
    Ok(())
}

/// Clears the way for a non-directory at `full`: a file or symlink there
/// goes (it is replaced, never written through); a directory is refused.
fn clear(full: &Path, rel: &Path) -> Result<bool, AgentError> {
    let shown = full.to_string_lossy().to_string();
    match fs::symlink_metadata(full) {
        Ok(m) if m.is_dir() => Err(invalid(format!(
            "archive entry {:?} would replace a directory",
            rel.display()
        ))),
        Ok(_) => {
            fs::remove_file(full).map_err(|e| err(&shown, &e))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(err(&shown, &e)),
    }
}

/// Extracts the tar read from `input` into directory `dest` (created if
/// missing). `finish` runs on the input after the archive's end (an upload
/// checks that it really ended); on any error, its or ours, everything
/// created is removed again.
pub fn unpack<R: Read>(
    dest: &str,
    input: R,
    limits: Limits,
    finish: impl FnOnce(&mut R) -> io::Result<()>,
) -> Result<Report, AgentError> {
    unpack_as(dest, input, limits, finish, false)
}

/// [`unpack`], with every entry owned by the ids its header names instead
/// of the destination's owner (restoring a volume's backup, as root).
/// Set-id bits are dropped either way.
pub fn unpack_keeping_owners<R: Read>(
    dest: &str,
    input: R,
    limits: Limits,
    finish: impl FnOnce(&mut R) -> io::Result<()>,
) -> Result<Report, AgentError> {
    unpack_as(dest, input, limits, finish, true)
}

fn unpack_as<R: Read>(
    dest: &str,
    input: R,
    limits: Limits,
    finish: impl FnOnce(&mut R) -> io::Result<()>,
    keep_owners: bool,
) -> Result<Report, AgentError> {
    let root = PathBuf::from(dest);
    let mut created = Created {
        paths: Vec::new(),
        done: false,
    };
    match fs::symlink_metadata(&root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(invalid(format!("{dest:?} is not a directory"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(&root).map_err(|e| err(dest, &e))?;
        }
        Err(e) => return Err(err(dest, &e)),
    }
    let owner = fs::metadata(&root)
        .map(|m| (m.uid(), m.gid()))
        .map_err(|e| err(dest, &e))?;
    let mut archive = tar::Archive::new(input);
    let mut r = Report::default();
    // Regular files this archive wrote: the only targets hard links may name.
    let mut files: HashSet<PathBuf> = HashSet::new();
    let entries = archive
        .entries()
        .map_err(|e| invalid(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| invalid(format!("a broken tar archive: {e}")))?;
        let kind = entry.header().entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader) {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| invalid(format!("a broken tar entry name: {e}")))?
            .into_owned();
        let rel = confined(&name)?;
        let full = root.join(&rel);
        let shown = full.to_string_lossy().to_string();
        r.entries += 1;
        let mode = entry.header().mode().unwrap_or(0o644) & 0o1777;
        let owner = if keep_owners {
            let h = entry.header();
            (
                h.uid()
                    .ok()
                    .and_then(|u| u32::try_from(u).ok())
                    .unwrap_or(owner.0),
                h.gid()
                    .ok()
                    .and_then(|g| u32::try_from(g).ok())
                    .unwrap_or(owner.1),
            )
        } else {
            owner
        };
        let mtime = entry.header().mtime().unwrap_or(0);
        if rel.as_os_str().is_empty() {
            // The destination itself (`./`): nothing to create.
            if !kind.is_dir() {
                return Err(invalid("an archive entry names the destination itself"));
            }
            continue;
        }
        parents(&root, &rel, &mut created)?;
        match kind {
            k if k.is_dir() => match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(invalid(format!(
                        "archive directory {:?} is in the way of a file or symlink",
                        rel.display()
                    )))
                }
                Err(_) => {
                    fs::create_dir(&full).map_err(|e| err(&shown, &e))?;
                    created.paths.push(full.clone());
                    let _ = fs::set_permissions(&full, fs::Permissions::from_mode(mode | 0o700));
                    let _ = std::os::unix::fs::lchown(&full, Some(owner.0), Some(owner.1));
                }
            },
            k if k.is_file() => {
                r.bytes += entry.size();
                limits.check(&r)?;
                let existed = clear(&full, &rel)?;
                let f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&full)
                    .map_err(|e| err(&shown, &e))?;
                if !existed {
                    created.paths.push(full.clone());
                }
                let mut w = io::BufWriter::with_capacity(1 << 20, f);
                io::copy(&mut entry, &mut w)
                    .and_then(|_| w.flush())
                    .map_err(|e| invalid(format!("archive entry {:?}: {e}", rel.display())))?;
                drop(w);
                let _ = std::os::unix::fs::lchown(&full, Some(owner.0), Some(owner.1));
                let _ = fs::set_permissions(&full, fs::Permissions::from_mode(mode));
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                let _ = fs::File::options()
                    .write(true)
                    .open(&full)
                    .and_then(|f| f.set_modified(t));
                files.insert(rel.clone());
            }
            k if k.is_symlink() => {
                let target = entry
                    .link_name()
                    .map_err(|e| invalid(format!("a broken symlink target: {e}")))?
                    .ok_or_else(|| invalid(format!("symlink {:?} has no target", rel.display())))?
                    .into_owned();
                let existed = clear(&full, &rel)?;
                std::os::unix::fs::symlink(&target, &full).map_err(|e| err(&shown, &e))?;
                if !existed {
                    created.paths.push(full.clone());
                }
                let _ = std::os::unix::fs::lchown(&full, Some(owner.0), Some(owner.1));
            }
            k if k.is_hard_link() => {
                let target = entry
                    .link_name()
                    .map_err(|e| invalid(format!("a broken hard link target: {e}")))?
                    .ok_or_else(|| {
                        invalid(format!("hard link {:?} has no target", rel.display()))
                    })?;
                let Some(target_rel) = confined(&target).ok().filter(|t| files.contains(t)) else {
                    return Err(invalid(format!(
                        "hard link {:?} points at {:?}, which is not a file of this archive",
                        rel.display(),
                        target.display()
                    )));
                };
                let existed = clear(&full, &rel)?;
                fs::hard_link(root.join(&target_rel), &full).map_err(|e| err(&shown, &e))?;
                if !existed {
                    created.paths.push(full.clone());
                }
            }
            k if k.is_character_special() || k.is_block_special() => {
                return Err(invalid(format!(
                    "archive entry {:?} is a device node (not extracted)",
                    rel.display()
                )))
            }
            k if k.is_fifo() => {
                return Err(invalid(format!(
                    "archive entry {:?} is a FIFO (not extracted)",
                    rel.display()
                )))
            }
            other => {
                return Err(invalid(format!(
                    "archive entry {:?} has an unsupported type ({other:?})",
                    rel.display()
                )))
            }
        }
        limits.check(&r)?;
    }
    let mut input = archive.into_inner();
    finish(&mut input).map_err(|e| invalid(format!("the archive upload failed: {e}")))?;
    created.done = true;
    Ok(r)
}

/// `Read` over upload chunks arriving on a channel; an empty chunk or a
/// closed channel is the end. `on_chunk` is told each chunk's size as it
/// is taken (the host's credit).
pub struct ChunkReader<F: FnMut(usize)> {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
    done: bool,
    on_chunk: F,
    idle: std::time::Duration,
}

impl<F: FnMut(usize)> ChunkReader<F> {
    pub fn new(
        rx: std::sync::mpsc::Receiver<Vec<u8>>,
        idle: std::time::Duration,
        on_chunk: F,
    ) -> Self {
        ChunkReader {
            rx,
            buf: Vec::new(),
            at: 0,
            done: false,
            on_chunk,
            idle,
        }
    }

    /// Reads what is left up to the end marker: tar stops at its end
    /// blocks, and writers pad the last record (up to 10 KiB); more than
    /// 1 MiB after the end is refused (it is not this archive).
    pub fn drain(&mut self) -> io::Result<()> {
        let mut sink = [0u8; 8192];
        let mut after = 0usize;
        loop {
            let n = self.read(&mut sink)?;
            if n == 0 {
                return Ok(());
            }
            after += n;
            if after > 1024 * 1024 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "more than 1 MiB of data after the end of the archive",
                ));
            }
        }
    }
}

impl<F: FnMut(usize)> Read for ChunkReader<F> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at >= self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv_timeout(self.idle) {
                Ok(c) if c.is_empty() => {
                    self.done = true;
                    return Ok(0);
                }
                Ok(c) => {
                    (self.on_chunk)(c.len());
                    self.buf = c;
                    self.at = 0;
                }
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upload ended before its last chunk",
                    ))
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: Limits = Limits {
        max_bytes: u64::MAX,
        max_entries: u64::MAX,
    };

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().expect("tar")
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    /// A raw entry whose name bypasses the builder's own checks.
    fn raw(
        b: &mut tar::Builder<Vec<u8>>,
        kind: tar::EntryType,
        name: &str,
        link: &str,
        data: &[u8],
    ) {
        let mut h = header(kind, data.len() as u64);
        {
            let gnu = h.as_gnu_mut().expect("gnu");
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).expect("append");
    }

    #[test]
    fn a_tree_round_trips_with_links_as_links() {
        let src = tempfile::tempdir().expect("src");
        let s = src.path();
        fs::create_dir_all(s.join("a/b")).expect("mkdir");
        fs::create_dir(s.join("empty")).expect("mkdir");
        fs::write(s.join("a/b/f.txt"), b"hello").expect("write");
        fs::write(s.join("top.bin"), vec![7u8; 100_000]).expect("write");
        let long = "x".repeat(150);
        fs::write(s.join("a").join(&long), b"long name").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", s.join("abs-link")).expect("symlink");
        std::os::unix::fs::symlink("b/f.txt", s.join("a/rel-link")).expect("symlink");
        fs::set_permissions(s.join("top.bin"), fs::Permissions::from_mode(0o750)).expect("chmod");
        let mut tar = Vec::new();
        let packed = pack(&s.to_string_lossy(), &mut tar, BIG).expect("pack");
        // a, a/b, a/b/f.txt, a/<long>, a/rel-link, abs-link, empty, top.bin
        assert_eq!(packed.entries, 8, "{packed:?}");
        assert_eq!(packed.bytes, 100_000 + 5 + 9);

        let dst = tempfile::tempdir().expect("dst");
        let d = dst.path().join("out");
        let r = unpack(&d.to_string_lossy(), tar.as_slice(), BIG, |_| Ok(())).expect("unpack");
        assert_eq!((r.entries, r.bytes), (packed.entries, packed.bytes));
        assert_eq!(fs::read(d.join("a/b/f.txt")).expect("read"), b"hello");
        assert_eq!(
            fs::read(d.join("a").join(&long)).expect("read"),
            b"long name"
        );
        assert_eq!(
            fs::metadata(d.join("top.bin"))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777,
            0o750
        );
        assert!(d.join("empty").is_dir());
        assert_eq!(
            fs::read_link(d.join("abs-link")).expect("link"),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            fs::read_link(d.join("a/rel-link")).expect("link"),
            Path::new("b/f.txt")
        );
    }

    #[test]
    fn hostile_entries_are_refused_and_nothing_stays() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "..",
                tar_of(|b| raw(b, tar::EntryType::Regular, "../escape", "", b"x")),
            ),
            (
                "absolute",
                tar_of(|b| raw(b, tar::EntryType::Regular, "/etc/escape", "", b"x")),
            ),
            (
                "upload failed",
                tar_of(|b| raw(b, tar::EntryType::Regular, "fine", "", b"x")),
            ),
            (
                "device",
                tar_of(|b| raw(b, tar::EntryType::Char, "dev/null2", "", b"")),
            ),
            (
                "FIFO",
                tar_of(|b| raw(b, tar::EntryType::Fifo, "fifo", "", b"")),
            ),
            (
                "not a file of this archive",
                tar_of(|b| raw(b, tar::EntryType::Link, "pw", "../../etc/passwd", b"")),
            ),
            (
                "not a file of this archive",
                tar_of(|b| raw(b, tar::EntryType::Link, "pw", "/etc/passwd", b"")),
            ),
            (
                "symlinks are never followed",
                tar_of(|b| {
                    raw(b, tar::EntryType::Regular, "ok.txt", "", b"fine");
                    raw(b, tar::EntryType::Symlink, "out", "/tmp", b"");
                    raw(b, tar::EntryType::Regular, "out/planted", "", b"x");
                }),
            ),
        ];
        for (want, tar) in cases {
            let dst = tempfile::tempdir().expect("dst");
            let d = dst.path().join("d");
            fs::create_dir(&d).expect("mkdir");
            fs::write(d.join("keep"), b"old").expect("write");
            // The upload is cut after a good archive: what it made goes.
            let cut = want == "upload failed";
            let e = unpack(&d.to_string_lossy(), tar.as_slice(), BIG, |_| {
                if cut {
                    Err(io::Error::other("cut"))
                } else {
                    Ok(())
                }
            })
            .expect_err(want);
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{want}: {e:?}");
            assert!(e.message.contains(want), "{want}: {}", e.message);
            let left: Vec<_> = fs::read_dir(&d)
                .expect("list")
                .map(|e| e.expect("entry").file_name())
                .collect();
            assert_eq!(
                left,
                vec![std::ffi::OsString::from("keep")],
                "{want}: created files stayed"
            );
        }
        assert!(!Path::new("/tmp/planted").exists());
    }

    #[test]
    fn files_whose_size_lies_still_make_a_well_formed_archive() {
        // /proc files say 0 bytes and have content; /sys files say 4096
        // and have less. The archive must still parse to its end.
        for dir in ["/proc/self", "/sys/kernel/mm/transparent_hugepage"] {
            if !Path::new(dir).exists() {
                continue;
            }
            let mut tar = Vec::new();
            let limits = Limits {
                max_bytes: 1 << 30,
                max_entries: 100_000,
            };
            let packed = pack(dir, &mut tar, limits).expect(dir);
            let mut n = 0u64;
            for e in tar::Archive::new(tar.as_slice()).entries().expect("tar") {
                let mut e = e.expect("entry");
                io::copy(&mut e, &mut io::sink()).expect("content");
                n += 1;
            }
            assert_eq!(n, packed.entries, "{dir}");
        }
    }

    #[test]
    fn a_symlink_in_the_way_is_replaced_not_written_through() {
        let outside = tempfile::tempdir().expect("outside");
        let victim = outside.path().join("victim");
        fs::write(&victim, b"original").expect("write");
        let dst = tempfile::tempdir().expect("dst");
        std::os::unix::fs::symlink(&victim, dst.path().join("f")).expect("symlink");
        let tar = tar_of(|b| raw(b, tar::EntryType::Regular, "f", "", b"new"));
        unpack(&dst.path().to_string_lossy(), tar.as_slice(), BIG, |_| {
            Ok(())
        })
        .expect("unpack");
        assert_eq!(fs::read(&victim).expect("read"), b"original");
        assert_eq!(fs::read(dst.path().join("f")).expect("read"), b"new");
        assert!(!fs::symlink_metadata(dst.path().join("f"))
            .expect("meta")
            .file_type()
            .is_symlink());
    }

    #[test]
    fn limits_and_garbage_are_typed() {
        let tar = tar_of(|b| {
            raw(b, tar::EntryType::Regular, "a", "", &[1u8; 600]);
            raw(b, tar::EntryType::Regular, "b", "", &[1u8; 600]);
        });
        let dst = tempfile::tempdir().expect("dst");
        let small = Limits {
            max_bytes: 1000,
            max_entries: 10,
        };
        let e = unpack(&dst.path().to_string_lossy(), tar.as_slice(), small, |_| {
            Ok(())
        })
        .expect_err("bytes");
        assert_eq!(e.kind, ErrorKind::TooLarge);
        let few = Limits {
            max_bytes: u64::MAX,
            max_entries: 1,
        };
        let e = unpack(&dst.path().to_string_lossy(), tar.as_slice(), few, |_| {
            Ok(())
        })
        .expect_err("entries");
        assert_eq!(e.kind, ErrorKind::TooLarge);
        assert_eq!(fs::read_dir(dst.path()).expect("list").count(), 0);
        let e = unpack(
            &dst.path().to_string_lossy(),
            &b"this is not a tar archive at all, just text that goes on and on"[..],
            BIG,
            |_| Ok(()),
        )
        .expect_err("garbage");
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{e:?}");
        // A pack over the limit is refused too.
        let src = tempfile::tempdir().expect("src");
        fs::write(src.path().join("x"), vec![0u8; 2000]).expect("write");
        let e = pack(&src.path().to_string_lossy(), Vec::new(), small).expect_err("pack limit");
        assert_eq!(e.kind, ErrorKind::TooLarge);
    }
}
