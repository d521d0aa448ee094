//! The host side of named volumes: one ext4 file system per volume, in a
//! sparse image file of the volume's size (`<data_dir>/volumes/<id>.img`),
//! loop-mounted `nosuid,nodev` at `<data_dir>/volumes/<id>/` (under the
//! 0700 data dir: no host user reaches it). The file system is the size
//! cap: a sandbox that fills its volume gets ENOSPC, the host's disk is
//! not touched beyond the image. Providers bind the mounted directory
//! into sandboxes (native: idmapped into the sandbox's user namespace,
//! where root is uid 0 on the volume; docker: a bind mount).
//!
//! Files on a volume belong to the ids a sandbox sees (0 = its root), so
//! every sandbox that mounts it later sees them the same. Mounts survive a
//! server restart; a host reboot is met by mounting again at the next use.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use async_trait::async_trait;
use stacyvm_core::provider::{ArchiveLimits, ArchiveReport, FileStream};
use stacyvm_core::volumes::{is_volume_id, VolumeHost};
use stacyvm_core::{Error, Result};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Volumes under one directory of the host.
#[derive(Debug)]
pub struct LoopVolumes {
    root: PathBuf,
    /// Free bytes the data file system keeps when a volume is created.
    min_free: u64,
    /// Serialises mounting (two spawns mounting one volume at once).
    lock: tokio::sync::Mutex<()>,
    /// Volumes lent to a microVM's spawn and not yet given back: never
    /// mounted here meanwhile (see [`VolumeHost::lend`]).
    lent: std::sync::Mutex<std::collections::HashSet<String>>,
}

fn run(what: &str, cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| Error::unavailable(format!("{what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::internal(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether `dir` is a mount point (its device differs from its parent's,
/// or /proc/self/mountinfo lists it).
fn is_mounted(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape(mp) == want)
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl LoopVolumes {
    /// Volumes under `root` (created 0700). Needs root and `mkfs.ext4`;
    /// `None` with the reason otherwise.
    pub fn new(root: PathBuf, min_free: u64) -> std::result::Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("volumes need a server running as root (loop mounts)".into());
        }
        if !Path::new("/dev/loop-control").exists() {
            return Err("volumes need loop devices (/dev/loop-control is missing)".into());
        }
        if which("mkfs.ext4").is_none() {
            return Err("volumes need mkfs.ext4 (Debian package e2fsprogs)".into());
        }
        std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
        std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| format!("making {} private: {e}", root.display()))?;
        Ok(LoopVolumes {
            root,
            min_free,
            lock: tokio::sync::Mutex::new(()),
            lent: std::sync::Mutex::default(),
        })
    }

    fn image(&self, id: &str) -> PathBuf {
        self.root.join(format!("{id}.img"))
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn check(id: &str) -> Result<()> {
        if is_volume_id(id) {
            Ok(())
        } else {
            Err(Error::not_found(format!("volume {id:?}")))
        }
    }

    /// Mounts volume `id` unless it is mounted — never while a microVM
    /// has it (lent for a spawn, or its image open in any process).
    async fn mount(&self, id: &str) -> Result<PathBuf> {
        let attached = || {
            Error::conflict(format!(
                "volume {id} is attached to a microVM as its disk; it is back once that sandbox is destroyed"
            ))
        };
        if self
            .lent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(id)
        {
            return Err(attached());
        }
        let (img, dir, id2) = (self.image(id), self.dir(id), id.to_string());
        let opened = blocking(move || {
            if is_mounted(&dir) {
                return Ok(None);
            }
            // A VM holds the image (after a restart nothing else says so).
            if image_in_use(&img) {
                return Ok(Some(()));
            }
            mount_image(&img, &dir, &id2).map(|_| None)
        })
        .await?;
        match opened {
            Some(()) => Err(attached()),
            None => Ok(self.dir(id)),
        }
    }

    fn usage_file(&self, id: &str) -> PathBuf {
        self.root.join(format!("{id}.usage"))
    }
}

/// Bytes in use on the file system mounted at `dir`.
fn used_at(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| Error::internal("reading the volume's usage").with_source(e))?;
    Ok((st.blocks() as u64 - st.blocks_free() as u64) * st.fragment_size() as u64)
}

/// Whether any process has the file `img` open (by device and inode, so
/// a hard link or a file moved since counts the same).
fn image_in_use(img: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = std::fs::metadata(img) else {
        return false;
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(m) = std::fs::metadata(fd.path()) {
                if m.dev() == want.dev() && m.ino() == want.ino() {
                    return true;
                }
            }
        }
    }
    false
}

/// Unmounts volume `id`'s directory if it is mounted.
/// Unmounts volume `id`'s directory if it is mounted; a file system still
/// in use on the host (a sandbox the server lost track of) stays, and the
/// removal is refused.
fn unmount_dir(dir: &Path, id: &str) -> Result<()> {
    if !is_mounted(dir) {
        return Ok(());
    }
    run("umount", Command::new("umount").arg(dir)).map_err(|e| {
        warn!(volume = %id, error = %e, "unmounting a volume failed");
        Error::conflict(format!(
            "volume {id} is still in use on the host (a sandbox the server no longer tracks?); it was not removed"
        ))
    })
}

/// `e` without host paths under `root` in its message (they are no
/// business of a caller).
fn scrub(e: Error, root: &Path) -> Error {
    let root = root.to_string_lossy();
    if !e.detail().contains(root.as_ref()) {
        return e;
    }
    Error::new(e.kind(), e.detail().replace(root.as_ref(), "<volumes>"))
}

/// How long an export waits for its reader, and an import for its next
/// chunk, before giving up (a stalled client holds a thread and the
/// volume's transfer claim).
const TRANSFER_IDLE: std::time::Duration = std::time::Duration::from_secs(120);

/// Mounts the image `img` of volume `id` at `dir` unless it is mounted.
fn mount_image(img: &Path, dir: &Path, id: &str) -> Result<PathBuf> {
    if is_mounted(dir) {
        return Ok(dir.to_path_buf());
    }
    if !img.is_file() {
        return Err(Error::not_found(format!(
            "the data of volume {id} is missing ({})",
            img.display()
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::internal(format!("creating {}", dir.display())).with_source(e))?;
    run(
        &format!("mounting volume {id}"),
        Command::new("mount")
            .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
            .arg(img)
            .arg(dir),
    )?;
    Ok(dir.to_path_buf())
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::internal(format!("volume task: {e}"))))
}

/// `Write` into a channel of chunks (the export's stream).
struct ChunkWriter {
    tx: mpsc::Sender<Result<Vec<u8>>>,
    buf: Vec<u8>,
    rt: tokio::runtime::Handle,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 256 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.buf);
        let tx = self.tx.clone();
        let sent = self
            .rt
            .block_on(async move { tokio::time::timeout(TRANSFER_IDLE, tx.send(Ok(chunk))).await });
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the reader left",
            )),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the reader stopped reading",
            )),
        }
    }
}

/// `Read` over upload chunks (the import's stream); a closed channel is
/// the end.
struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
    rt: tokio::runtime::Handle,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at >= self.buf.len() {
            let rx = &mut self.rx;
            let next = self
                .rt
                .block_on(async { tokio::time::timeout(TRANSFER_IDLE, rx.recv()).await })
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "the upload stalled")
                })?;
            match next {
                Some(c) if c.is_empty() => return Ok(0),
                Some(c) => {
                    self.buf = c;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn archive_limits(l: ArchiveLimits) -> stacyvm_sandbox::archive::Limits {
    stacyvm_sandbox::archive::Limits {
        max_bytes: l.max_bytes,
        max_entries: l.max_entries,
    }
}

#[async_trait]
impl VolumeHost for LoopVolumes {
    async fn create(&self, id: &str, size_mb: i64) -> Result<()> {
        Self::check(id)?;
        let size = u64::try_from(size_mb).unwrap_or(0) * 1024 * 1024;
        // One creation at a time: each sees the space the last one took.
        let _g = self.lock.lock().await;
        let st = nix::sys::statvfs::statvfs(&self.root)
            .map_err(|e| Error::internal("reading free space").with_source(e))?;
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        if free < size.saturating_add(self.min_free) {
            return Err(Error::limit(format!(
                "a {size_mb} MiB volume does not fit: the data file system has {} MiB free and keeps {} MiB",
                free >> 20,
                self.min_free >> 20
            )));
        }
        let (img, id2) = (self.image(id), id.to_string());
        let made = blocking(move || {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&img)
                .map_err(|e| Error::conflict(format!("volume {id2} exists: {e}")))?;
            // The space is taken now (not promised by a sparse file): the
            // host's disk never runs out under volumes that fill later.
            nix::fcntl::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                nix::fcntl::FallocateFlags::empty(),
                0,
                i64::try_from(size).unwrap_or(i64::MAX),
            )
            .map_err(|e| Error::limit(format!("reserving {size_mb} MiB for the volume: {e}")))?;
            drop(f);
            run(
                "making the volume's file system",
                Command::new("mkfs.ext4")
                    .args([
                        "-q",
                        "-F",
                        "-m",
                        "0",
                        "-L",
                        &id2[..id2.len().min(16)],
                        "-E",
                        "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1",
                    ])
                    .arg(&img),
            )
        })
        .await;
        let made = match made {
            Ok(()) => self.mount(id).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = made {
            let _ = std::fs::remove_file(self.image(id));
            let _ = std::fs::remove_dir(self.dir(id));
            return Err(scrub(e, &self.root));
        }
        info!(volume = %id, size_mb, "volume file system made");
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<()> {
        if !is_volume_id(id) {
            return Ok(());
        }
        let _g = self.lock.lock().await;
        let me = self.dir(id);
        let id2 = id.to_string();
        blocking(move || unmount_dir(&me, &id2)).await?;
        let _ = std::fs::remove_file(self.usage_file(id));
        for r in [
            std::fs::remove_file(self.image(id)),
            std::fs::remove_dir(self.dir(id)),
        ] {
            if let Err(e) = r {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(Error::internal(format!("removing volume {id}")).with_source(e));
                }
            }
        }
        Ok(())
    }

    async fn path(&self, id: &str) -> Result<PathBuf> {
        Self::check(id)?;
        let _g = self.lock.lock().await;
        self.mount(id).await.map_err(|e| scrub(e, &self.root))
    }

    async fn used_bytes(&self, id: &str) -> Result<u64> {
        match self.path(id).await {
            Ok(dir) => used_at(&dir),
            // Attached to a microVM: what it held when lent.
            Err(e) if e.kind() == stacyvm_core::ErrorKind::Conflict => {
                let text = std::fs::read_to_string(self.usage_file(id)).unwrap_or_default();
                Ok(text.trim().parse().unwrap_or(0))
            }
            Err(e) => Err(e),
        }
    }

    async fn lend(&self, id: &str) -> Result<PathBuf> {
        Self::check(id)?;
        let _g = self.lock.lock().await;
        // Mounted first (a volume never mounted since a reboot has a
        // journal to replay on the host), its usage noted, then let go.
        let dir = self.mount(id).await.map_err(|e| scrub(e, &self.root))?;
        if let Ok(used) = used_at(&dir) {
            let _ = std::fs::write(self.usage_file(id), used.to_string());
        }
        let id2 = id.to_string();
        blocking(move || unmount_dir(&dir, &id2)).await?;
        self.lent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_string());
        info!(volume = %id, "volume lent to a microVM");
        Ok(self.image(id))
    }

    fn give_back(&self, id: &str) {
        self.lent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    async fn export(&self, id: &str, limits: ArchiveLimits) -> Result<FileStream> {
        let dir = self.path(id).await?;
        let (tx, rx) = mpsc::channel(8);
        let (rt, root) = (tokio::runtime::Handle::current(), self.root.clone());
        tokio::task::spawn_blocking(move || {
            let mut w = ChunkWriter {
                tx: tx.clone(),
                buf: Vec::new(),
                rt: rt.clone(),
            };
            let path = dir.to_string_lossy().to_string();
            let packed = stacyvm_sandbox::archive::pack(&path, &mut w, archive_limits(limits))
                .and_then(|r| {
                    w.flush()
                        .map(|()| r)
                        .map_err(|e| stacyvm_sandbox::archive::io_error(&path, &e))
                });
            if let Err(e) = packed {
                let e = scrub(crate::agent::client::map_err(e), &root);
                let _ = rt
                    .block_on(async { tokio::time::timeout(TRANSFER_IDLE, tx.send(Err(e))).await });
            }
        });
        Ok(FileStream {
            size: 0,
            chunks: rx,
        })
    }

    async fn import(
        &self,
        id: &str,
        chunks: mpsc::Receiver<Vec<u8>>,
        limits: ArchiveLimits,
    ) -> Result<ArchiveReport> {
        let dir = self.path(id).await?;
        let (rt, root) = (tokio::runtime::Handle::current(), self.root.clone());
        blocking(move || {
            let r = ChunkReader {
                rx: chunks,
                buf: Vec::new(),
                at: 0,
                rt,
            };
            let path = dir.to_string_lossy().to_string();
            let report = stacyvm_sandbox::archive::unpack_keeping_owners(
                &path,
                r,
                archive_limits(limits),
                |_| Ok(()),
            )
            .map_err(|e| scrub(crate::agent::client::map_err(e), &root))?;
            Ok(ArchiveReport {
                entries: report.entries,
                bytes: report.bytes,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_names_are_unescaped() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/x\\134y"), "/x\\y");
        assert_eq!(unescape("/end\\04"), "/end\\04");
    }
}
