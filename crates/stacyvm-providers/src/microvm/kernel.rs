//! The guest kernel and initramfs of a microVM.
//!
//! The kernel is Debian's `linux-image-cloud-amd64` (6.1): it boots under
//! QEMU's `microvm` machine with TCG, but its virtio drivers are modules,
//! so the initramfs carries them and the agent (`stacyvm-agent guest`, the
//! initramfs's `/init`) loads them in [`MODULES`] order.
//!
//! Cache layout (content-addressed by the sha256 of the `.deb`):
//! ```text
//! CACHE/debs/<sha256>.deb
//! CACHE/kernels/<sha256>-<module set>/vmlinuz
//! CACHE/kernels/<sha256>-<module set>/modules/<name>.ko
//! CACHE/initramfs/<sha256 of kernel, modules and agent>.cpio
//! ```
//! A kernel directory appears by rename once complete, so a half-written
//! one is never used.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use stacyvm_core::{Error, Result};

/// The Debian metapackage whose kernel the microVM boots.
pub const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

/// The modules the guest needs, in load (dependency) order, as paths
/// under `lib/modules/<version>/kernel/`.
pub const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_mmio.ko",
    "drivers/char/virtio_console.ko",
    "drivers/char/hw_random/virtio-rng.ko",
    "drivers/block/virtio_blk.ko",
    // virtio-net: `bridge` networking.
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    // vsock: the agent's transport under Firecracker.
    "net/vmw_vsock/vsock.ko",
    "net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    "net/vmw_vsock/vmw_vsock_virtio_transport.ko",
];

/// An unpacked kernel: its image and the modules of [`MODULES`].
#[derive(Debug, Clone)]
pub struct Kernel {
    pub vmlinuz: PathBuf,
    /// In load order.
    pub modules: Vec<PathBuf>,
}

fn io_err(what: &str, path: &Path, e: &io::Error) -> Error {
    Error::internal(format!("{what} {}: {e}", path.display()))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| Error::internal(format!("running {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Error::internal(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The versioned package a metapackage depends on (`apt-cache depends`),
/// e.g. `linux-image-cloud-amd64` → `linux-image-6.1.0-56-cloud-amd64`.
pub fn resolve_package(meta: &str) -> Result<String> {
    let out = run(Command::new("apt-cache").args(["depends", meta]))?;
    parse_depends(&out)
        .ok_or_else(|| Error::internal(format!("{meta} depends on no linux-image package")))
}

fn parse_depends(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
}

/// Downloads `package` with `apt-get download` (no install, nothing
/// touches `/boot`) into `cache/debs/<sha256>.deb` and returns that path.
/// `cache/debs/<package>.sha256` remembers the download: a versioned
/// package name names one build, so it is fetched once.
pub fn fetch_deb(cache: &Path, package: &str) -> Result<PathBuf> {
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| io_err("creating", &debs, &e))?;
    let index = debs.join(format!("{package}.sha256"));
    if let Ok(sum) = std::fs::read_to_string(&index) {
        let deb = debs.join(format!("{}.deb", sum.trim()));
        if sum.trim().len() == 64 && sha256_file(&deb).ok().as_deref() == Some(sum.trim()) {
            return Ok(deb);
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&debs)
        .map_err(|e| io_err("creating a temp dir in", &debs, &e))?;
    // apt's sandbox user may not write the temp dir (it then warns and
    // downloads as the caller, which is what we want).
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(tmp.path()))?;
    let mut found = None;
    for e in std::fs::read_dir(tmp.path()).map_err(|e| io_err("reading", tmp.path(), &e))? {
        let e = e.map_err(|e| io_err("reading", tmp.path(), &e))?;
        if e.file_name().to_string_lossy().ends_with(".deb") {
            found = Some(e.path());
        }
    }
    let deb =
        found.ok_or_else(|| Error::internal(format!("apt-get download {package}: no .deb")))?;
    let sum = sha256_file(&deb)?;
    let dest = debs.join(format!("{sum}.deb"));
    std::fs::rename(&deb, &dest).map_err(|e| io_err("moving", &deb, &e))?;
    let tmp_index = tmp.path().join("index");
    std::fs::write(&tmp_index, &sum).map_err(|e| io_err("writing", &tmp_index, &e))?;
    std::fs::rename(&tmp_index, &index).map_err(|e| io_err("writing", &index, &e))?;
    Ok(dest)
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).map_err(|e| io_err("opening", p, &e))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(|e| io_err("reading", p, &e))?;
    Ok(hex::encode(h.finalize()))
}

/// Unpacks the kernel image and [`MODULES`] of `deb` into
/// `cache/kernels/<sha256 of deb>/` (once) and returns them.
pub fn unpack(cache: &Path, deb: &Path) -> Result<Kernel> {
    let sum = sha256_file(deb)?;
    let kernels = cache.join("kernels");
    // The module set is part of the key: a new list unpacks again.
    let set = hex::encode(&Sha256::digest(MODULES.join("\n").as_bytes())[..4]);
    let dir = kernels.join(format!("{sum}-{set}"));
    let kernel = Kernel {
        vmlinuz: dir.join("vmlinuz"),
        modules: MODULES
            .iter()
            .map(|m| dir.join("modules").join(module_file(m)))
            .collect(),
    };
    if std::fs::metadata(&dir).is_ok() {
        return Ok(kernel);
    }
    std::fs::create_dir_all(&kernels).map_err(|e| io_err("creating", &kernels, &e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(&kernels)
        .map_err(|e| io_err("creating a temp dir in", &kernels, &e))?;
    let x = tmp.path().join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&x))?;
    let out = tmp.path().join("out");
    let out_modules = out.join("modules");
    std::fs::create_dir_all(&out_modules).map_err(|e| io_err("creating", &out_modules, &e))?;
    let image = find_one(&x.join("boot"), "vmlinuz-").map_err(|_| {
        Error::invalid(format!(
            "{} holds no kernel image (boot/vmlinuz-*): is it a linux-image package?",
            deb.display()
        ))
    })?;
    copy(&image, &out.join("vmlinuz"))?;
    let version = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();
    let tree = x.join("lib/modules").join(&version).join("kernel");
    for m in MODULES {
        copy(&tree.join(m), &out_modules.join(module_file(m)))?;
    }
    match std::fs::rename(&out, &dir) {
        Ok(()) => {}
        // Another caller unpacked the same deb first: theirs is as good.
        Err(_) if std::fs::metadata(&dir).is_ok() => {}
        Err(e) => return Err(io_err("renaming into", &dir, &e)),
    }
    Ok(kernel)
}

fn module_file(rel: &str) -> &str {
    rel.rsplit('/').next().unwrap_or(rel)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| io_err("copying", from, &e))
}

fn find_one(dir: &Path, prefix: &str) -> Result<PathBuf> {
    for e in std::fs::read_dir(dir).map_err(|e| io_err("reading", dir, &e))? {
        let e = e.map_err(|e| io_err("reading", dir, &e))?;
        if e.file_name().to_string_lossy().starts_with(prefix) {
            return Ok(e.path());
        }
    }
    Err(Error::internal(format!(
        "no {prefix}* in {}",
        dir.display()
    )))
}

/// The kernel of `package` (a metapackage is resolved to the versioned
/// one), downloaded and unpacked into `cache` once.
pub fn install(cache: &Path, package: &str) -> Result<Kernel> {
    // `linux-image-6.1.0-56-cloud-amd64` names one build; anything else
    // (`linux-image-cloud-amd64`) is a metapackage apt resolves.
    let versioned = package
        .strip_prefix("linux-image-")
        .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()));
    let versioned = if versioned {
        package.to_string()
    } else {
        match resolve_package(package) {
            Ok(p) => p,
            // Offline: use what an earlier run downloaded.
            Err(e) => match cached_any(cache) {
                Some(k) => return Ok(k),
                None => return Err(Error::unavailable(format!(
                    "the guest kernel is not installed and {e}; run `stacyvm image kernel` where apt can reach Debian"
                ))),
            },
        }
    };
    let deb = fetch_deb(cache, &versioned)?;
    unpack(cache, &deb)
}

/// Any kernel already unpacked in `cache` (the newest).
pub fn cached_any(cache: &Path) -> Option<Kernel> {
    let rd = std::fs::read_dir(cache.join("kernels")).ok()?;
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let complete = e.path().join("vmlinuz").is_file()
            && MODULES
                .iter()
                .all(|m| e.path().join("modules").join(module_file(m)).is_file());
        if name.starts_with('.') || !complete {
            continue;
        }
        let t = e.metadata().and_then(|m| m.modified()).ok()?;
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, e.path()));
        }
    }
    let dir = best?.1;
    Some(Kernel {
        vmlinuz: dir.join("vmlinuz"),
        modules: MODULES
            .iter()
            .map(|m| dir.join("modules").join(module_file(m)))
            .collect(),
    })
}

/// The initramfs of `agent` for `kernel`, built once per (kernel, agent):
/// `cache/initramfs/<sha256 of kernel and agent>.cpio`.
pub fn initramfs_for(cache: &Path, agent: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let mut h = Sha256::new();
    for p in std::iter::once(&kernel.vmlinuz)
        .chain(kernel.modules.iter())
        .chain(std::iter::once(&agent.to_path_buf()))
    {
        let mut f = std::fs::File::open(p).map_err(|e| io_err("opening", p, &e))?;
        io::copy(&mut f, &mut h).map_err(|e| io_err("reading", p, &e))?;
    }
    let dir = cache.join("initramfs");
    std::fs::create_dir_all(&dir).map_err(|e| io_err("creating", &dir, &e))?;
    let out = dir.join(format!("{}.cpio", hex::encode(h.finalize())));
    if out.is_file() {
        return Ok(out);
    }
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempfile_in(&dir)
        .map_err(|e| io_err("creating a temp file in", &dir, &e))?;
    build_initramfs(agent, kernel, None, tmp.path())?;
    tmp.persist(&out)
        .map_err(|e| io_err("storing", &out, &e.error))?;
    Ok(out)
}

/// Writes the initramfs: `agent` as `/init`, the kernel's modules under
/// `/lib/modules` with their load order in `/lib/modules/load`, `/dev/console`,
/// and `busybox` (if given) as `/bin/busybox` with `/bin/sh` and `/bin/echo`
/// linked to it.
pub fn build_initramfs(
    agent: &Path,
    kernel: &Kernel,
    busybox: Option<&Path>,
    out: &Path,
) -> Result<()> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| io_err("reading", p, &e));
    let file = std::fs::File::create(out).map_err(|e| io_err("creating", out, &e))?;
    let mut w = CpioWriter::new(io::BufWriter::new(file));
    let werr = |e: io::Error| io_err("writing", out, &e);
    for d in [
        "dev",
        "proc",
        "sys",
        "tmp",
        "bin",
        "lib",
        "lib/modules",
        "workspace",
    ] {
        w.dir(d, 0o755).map_err(werr)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1).map_err(werr)?;
    w.file("init", 0o755, &read(agent)?).map_err(werr)?;
    let mut order = String::new();
    for m in &kernel.modules {
        let name = m.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        w.file(&format!("lib/modules/{name}"), 0o644, &read(m)?)
            .map_err(werr)?;
        order.push_str(name);
        order.push('\n');
    }
    w.file("lib/modules/load", 0o644, order.as_bytes())
        .map_err(werr)?;
    if let Some(b) = busybox {
        w.file("bin/busybox", 0o755, &read(b)?).map_err(werr)?;
        for l in ["sh", "echo", "cat", "ls"] {
            w.symlink(&format!("bin/{l}"), "busybox").map_err(werr)?;
        }
    }
    let mut inner = w.finish().map_err(werr)?;
    inner.flush().map_err(werr)
}

/// A writer of cpio archives in the "newc" format (the one the kernel
/// unpacks as an initramfs). Entries carry uid and gid 0 and mtime 0, so
/// the same inputs give the same bytes.
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self { out, ino: 0 }
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, 2, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, 1, (0, 0), data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name too long"))?;
        if name != "TRAILER!!!" {
            self.ino += 1;
        }
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, written: usize) -> io::Result<()> {
        let n = (4 - written % 4) % 4;
        self.out.write_all(&[0; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(h: &[u8], i: usize) -> u32 {
        let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).expect("test step");
        u32::from_str_radix(s, 16).expect("test step")
    }

    #[test]
    fn newc_entry_layout() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("init", 0o755, b"hello").expect("test step");
        let out = w.finish().expect("test step");
        assert_eq!(&out[..6], b"070701");
        assert_eq!(field(&out, 1), S_IFREG | 0o755);
        assert_eq!(field(&out, 6), 5); // filesize
        assert_eq!(field(&out, 11), 5); // namesize with NUL
                                        // 110-byte header + "init\0" = 115, padded to 116; data at 116.
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(&out[116..121], b"hello");
        // data padded to 124, then the trailer.
        assert_eq!(&out[124..130], b"070701");
        assert_eq!(&out[124 + 110..124 + 110 + 11], b"TRAILER!!!\0");
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn devices_and_symlinks() {
        let mut w = CpioWriter::new(Vec::new());
        w.char_dev("dev/console", 0o600, 5, 1).expect("test step");
        let dev = w.finish().expect("test step");
        assert_eq!(field(&dev, 1), S_IFCHR | 0o600);
        assert_eq!((field(&dev, 9), field(&dev, 10)), (5, 1));

        let mut w = CpioWriter::new(Vec::new());
        w.symlink("bin/sh", "busybox").expect("test step");
        let link = w.finish().expect("test step");
        assert_eq!(field(&link, 1), S_IFLNK | 0o777);
        assert_eq!(field(&link, 6), 7);
    }

    #[test]
    fn cpio_tool_reads_it() {
        // The reference reader, when installed: `cpio -t` lists what we wrote.
        let Ok(out) = Command::new("cpio").arg("--version").output() else {
            return;
        };
        if !out.status.success() {
            return;
        }
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).expect("test step");
        w.file("bin/a", 0o644, b"abc").expect("test step");
        w.symlink("bin/b", "a").expect("test step");
        let bytes = w.finish().expect("test step");
        let mut child = Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("test step");
        child
            .stdin
            .take()
            .expect("test step")
            .write_all(&bytes)
            .expect("test step");
        let out = child.wait_with_output().expect("test step");
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "bin\nbin/a\nbin/b\n");
    }

    #[test]
    fn metapackage_dependency() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(parse_depends("x\n  Depends: libc6\n"), None);
    }
}
