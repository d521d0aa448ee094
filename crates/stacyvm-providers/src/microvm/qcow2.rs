//! A writer of empty qcow2 (version 3) overlays on a raw backing file:
//! each microVM's writable layer over its image's shared, read-only ext4.
//!
//! The file is four 64 KiB clusters: the header (with a backing-format
//! extension and the backing file name), a one-cluster refcount table, one
//! refcount block (16-bit refcounts of the four clusters) and an all-zero
//! L1 table. QEMU allocates data clusters as the guest writes. Unwritten
//! reads fall through to the backing file.
//!
//! Layout per the qcow2 specification (QEMU `docs/interop/qcow2.txt`):
//! big-endian fields, header extension `0xE2792ACA` = backing file format.

use std::io::Write;
use std::path::{Path, PathBuf};

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// The largest virtual size one L1 cluster can map (8192 entries of
/// 512 MiB each): 4 TiB, far beyond any sandbox disk.
const MAX_SIZE: u64 = (CLUSTER / 8) * (CLUSTER / 8) * CLUSTER;

/// The format of an overlay's backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// An image's ext4 disk.
    Raw,
    /// A snapshot's frozen overlay (a chain).
    Qcow2,
}

/// Writes a qcow2 overlay of `size` bytes backed by `backing` (an absolute
/// path, at most 1023 bytes) to `out` (created, must not exist).
pub fn create_overlay(
    out: &Path,
    backing: &Path,
    format: Backing,
    size: u64,
) -> std::io::Result<()> {
    let bytes = overlay_bytes(backing, format, size)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)?;
    f.write_all(&bytes)?;
    f.sync_all()
}

/// The backing file named in the header of the qcow2 image at `path`
/// (`None` for an image without one).
pub fn backing_file(path: &Path) -> std::io::Result<Option<PathBuf>> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::ffi::OsStringExt;
    let mut f = std::fs::File::open(path)?;
    let mut h = [0u8; 20];
    f.read_exact(&mut h)?;
    if &h[..4] != b"QFI\xfb" {
        return Err(invalid("not a qcow2 image"));
    }
    let offset = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
    if offset == 0 || len == 0 {
        return Ok(None);
    }
    if len > 1023 {
        return Err(invalid("backing file name too long"));
    }
    let mut name = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut name)?;
    Ok(Some(PathBuf::from(std::ffi::OsString::from_vec(name))))
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg.to_string())
}

/// The bytes of an overlay (see [`create_overlay`]).
pub fn overlay_bytes(backing: &Path, format: Backing, size: u64) -> std::io::Result<Vec<u8>> {
    let name = backing
        .to_str()
        .ok_or_else(|| invalid("backing path is not UTF-8"))?;
    if !backing.is_absolute() || name.is_empty() || name.len() > 1023 {
        return Err(invalid(
            "backing path must be absolute and under 1024 bytes",
        ));
    }
    if size == 0 || size > MAX_SIZE || !size.is_multiple_of(512) {
        return Err(invalid(
            "size must be a non-zero multiple of 512 up to 4 TiB",
        ));
    }
    let l2_span = (CLUSTER / 8) * CLUSTER;
    let l1_size = size.div_ceil(l2_span);
    let (refcount_table, refcount_block, l1_table) = (CLUSTER, 2 * CLUSTER, 3 * CLUSTER);

    let mut h = Vec::with_capacity(CLUSTER as usize);
    let be32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_be_bytes());
    let be64 = |v: &mut Vec<u8>, x: u64| v.extend_from_slice(&x.to_be_bytes());
    // Header (104 bytes for version 3 without the compression type field).
    h.extend_from_slice(b"QFI\xfb");
    be32(&mut h, 3); // version
    let ext_fmt: &[u8] = match format {
        Backing::Raw => b"raw",
        Backing::Qcow2 => b"qcow2",
    };
    // extensions: format (8 + 3 padded to 8) + end (8)
    let backing_offset = 104 + 8 + 8 + 8;
    be64(&mut h, backing_offset); // backing_file_offset
    be32(&mut h, name.len() as u32); // backing_file_size
    be32(&mut h, CLUSTER_BITS);
    be64(&mut h, size);
    be32(&mut h, 0); // crypt_method
    be32(&mut h, l1_size as u32);
    be64(&mut h, l1_table);
    be64(&mut h, refcount_table);
    be32(&mut h, 1); // refcount_table_clusters
    be32(&mut h, 0); // nb_snapshots
    be64(&mut h, 0); // snapshots_offset
    be64(&mut h, 0); // incompatible_features
    be64(&mut h, 0); // compatible_features
    be64(&mut h, 0); // autoclear_features
    be32(&mut h, 4); // refcount_order: 16-bit refcounts
    be32(&mut h, 104); // header_length
    debug_assert_eq!(h.len(), 104);
    // Backing file format name.
    be32(&mut h, 0xE279_2ACA);
    be32(&mut h, ext_fmt.len() as u32);
    h.extend_from_slice(ext_fmt);
    h.resize(h.len() + (8 - ext_fmt.len() % 8) % 8, 0);
    // End of extensions.
    be32(&mut h, 0);
    be32(&mut h, 0);
    debug_assert_eq!(h.len() as u64, backing_offset);
    h.extend_from_slice(name.as_bytes());

    let mut out = vec![0u8; 4 * CLUSTER as usize];
    out[..h.len()].copy_from_slice(&h);
    // The refcount table's one entry points at the refcount block.
    let rt = refcount_table as usize;
    out[rt..rt + 8].copy_from_slice(&refcount_block.to_be_bytes());
    // Clusters 0..4 (header, refcount table, refcount block, L1) are used once.
    let rb = refcount_block as usize;
    for i in 0..4 {
        out[rb + 2 * i..rb + 2 * i + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    // The L1 table stays zero: nothing is allocated yet.
    let _ = l1_table;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"))
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"))
    }

    #[test]
    fn header_fields() {
        let b =
            overlay_bytes(Path::new("/images/base.ext4"), Backing::Raw, 3 << 30).expect("bytes");
        assert_eq!(&b[..4], b"QFI\xfb");
        assert_eq!(u32_at(&b, 4), 3);
        let off = u64_at(&b, 8) as usize;
        let len = u32_at(&b, 16) as usize;
        assert_eq!(&b[off..off + len], b"/images/base.ext4");
        assert_eq!(u32_at(&b, 20), 16);
        assert_eq!(u64_at(&b, 24), 3 << 30);
        assert_eq!(u32_at(&b, 36), 6, "3 GiB / 512 MiB per L2 table");
        assert_eq!(u64_at(&b, 48), CLUSTER, "refcount table");
        assert_eq!(u64_at(&b, CLUSTER as usize), 2 * CLUSTER, "refcount block");
        assert_eq!(u32_at(&b, 96), 4);
        assert_eq!(u32_at(&b, 100), 104);
        assert_eq!(u32_at(&b, 104), 0xE279_2ACA);
        assert_eq!(&b[112..115], b"raw");
        assert_eq!(b.len() as u64, 4 * CLUSTER);
    }

    #[test]
    fn the_backing_file_reads_back() {
        let d = tempfile::tempdir().expect("tmp");
        let o = d.path().join("o.qcow2");
        create_overlay(&o, Path::new("/images/base.ext4"), Backing::Raw, 1 << 30).expect("create");
        assert_eq!(
            backing_file(&o).expect("read"),
            Some(PathBuf::from("/images/base.ext4"))
        );
        let junk = d.path().join("junk");
        std::fs::write(&junk, [0u8; 64]).expect("write");
        assert!(backing_file(&junk).is_err());
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(overlay_bytes(Path::new("relative.ext4"), Backing::Raw, 1 << 30).is_err());
        assert!(overlay_bytes(Path::new("/a"), Backing::Raw, 0).is_err());
        assert!(overlay_bytes(Path::new("/a"), Backing::Raw, 1000).is_err());
        assert!(overlay_bytes(Path::new("/a"), Backing::Raw, MAX_SIZE + 512).is_err());
        let long = format!("/{}", "x".repeat(1100));
        assert!(overlay_bytes(Path::new(&long), Backing::Raw, 1 << 30).is_err());
    }

    /// The reference implementation agrees: `qemu-img check` finds no
    /// error and `qemu-img info` reads the backing file and its format.
    #[test]
    fn qemu_img_accepts_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let base = dir.path().join("base.raw");
        std::fs::File::create(&base)
            .and_then(|f| f.set_len(64 << 20))
            .expect("base");
        let ov = dir.path().join("ov.qcow2");
        create_overlay(&ov, &base, Backing::Raw, 64 << 20).expect("overlay");
        assert!(
            create_overlay(&ov, &base, Backing::Raw, 64 << 20).is_err(),
            "never overwrites"
        );
        // A chain: an overlay of the overlay.
        let top = dir.path().join("top.qcow2");
        create_overlay(&top, &ov, Backing::Qcow2, 64 << 20).expect("chain");
        let check = std::process::Command::new("qemu-img")
            .arg("check")
            .arg(&ov)
            .output()
            .expect("qemu-img (Debian qemu-utils; scripts/test installs it)");
        assert!(
            check.status.success(),
            "{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&ov)
            .output()
            .expect("qemu-img info");
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
        assert_eq!(v["format"], "qcow2");
        assert_eq!(v["virtual-size"], 64 << 20);
        assert_eq!(v["backing-filename"], base.to_str().expect("utf8"));
        assert_eq!(v["backing-filename-format"], "raw");
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--backing-chain", "--output=json"])
            .arg(&top)
            .output()
            .expect("qemu-img info");
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
        assert_eq!(v[0]["backing-filename-format"], "qcow2");
        assert_eq!(v[1]["filename"], ov.to_str().expect("utf8"));
        assert_eq!(v[2]["format"], "raw");
    }
}
