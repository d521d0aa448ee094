//! Images built in native sandboxes (environment builds): what the build's
//! steps changed, saved as a layer over the base image in the image store.
//!
//! The sandbox's overlay upper dir is copied (frozen, never following a
//! link, ids shifted back to the sandbox's own, whiteouts and opacity
//! kept: [`stacyvm_sandbox::treecopy`]) into `rootfs/<id>/`; the record
//! names its parent, so spawns mount `[layer, base layers…]`. The id is
//! derived from the base image's id and the build's cache key: a second
//! build of the same steps on the same base finds the layer and reuses it.

use std::path::Path;

use sha2::{Digest, Sha256};
use stacyvm_core::{Error, Result};
use stacyvm_sandbox::treecopy::{self, CopyError, Shift};

use super::disk;
use crate::image::import::normalize_name;
use crate::image::store::{ImageRecord, ImageStore};

/// The id of the layer built from `build_key` on `parent`.
pub fn layer_id(parent: &str, build_key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"stacyvm-build\0");
    h.update(parent.as_bytes());
    h.update([0]);
    h.update(build_key.as_bytes());
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// The imported image a build stands on; the `host` image has the host's
/// `/usr` read-only and cannot be built on.
pub fn base_of(images: &ImageStore, base: &str) -> Result<ImageRecord> {
    if base.is_empty() || base == "host" {
        return Err(Error::invalid(
            "the host image cannot be built on (its /usr is the host's, read-only); build on an imported image such as debian:bookworm (stacyvm image import)",
        ));
    }
    images.check(base)?;
    images
        .find(base)
        .ok_or_else(|| Error::invalid(format!("base image {base:?} is not available")))
}

/// Names an earlier build's image `name` when it was built from
/// `build_key` on `base` as it is now.
pub fn reuse(
    images: &ImageStore,
    base: &ImageRecord,
    build_key: &str,
    name: &str,
) -> Result<Option<ImageRecord>> {
    let Some(mut rec) = images.find_built(&base.id, build_key) else {
        return Ok(None);
    };
    rec.names = vec![normalize_name(name)?];
    images.record(rec).map(Some)
}

/// What [`commit`] needs.
pub struct Commit<'a> {
    pub upper: &'a Path,
    pub shift: Option<Shift>,
    pub base: &'a ImageRecord,
    pub build_key: &'a str,
    pub name: &'a str,
    pub build_id: &'a str,
    /// Bytes the data filesystem keeps free.
    pub min_free: u64,
}

/// Copies a frozen build sandbox's upper dir into the image store as a
/// new image over `c.base`. Nothing is left behind on failure.
pub fn commit(images: &ImageStore, c: &Commit<'_>) -> Result<ImageRecord> {
    let name = normalize_name(c.name)?;
    let id = layer_id(&c.base.id, c.build_key);
    if let Some(rec) = reuse(images, c.base, c.build_key, &name)? {
        return Ok(rec);
    }
    let (need, entries) = disk::usage(c.upper, u64::MAX);
    if entries > disk::MAX_ENTRIES {
        return Err(Error::limit(format!(
            "the build made more than {} files",
            disk::MAX_ENTRIES
        )));
    }
    let root = images.rootfs_dir();
    std::fs::create_dir_all(&root)
        .map_err(|e| Error::internal("creating the image store").with_source(e))?;
    let st = nix::sys::statvfs::statvfs(&root)
        .map_err(|e| Error::internal("reading free space").with_source(e))?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    if free < need.saturating_add(c.min_free) {
        return Err(Error::limit(format!(
            "the built layer needs {} MiB and the data filesystem has {} MiB free, {} MiB of which it keeps (providers.native.disk_min_free_mb)",
            need >> 20,
            free >> 20,
            c.min_free >> 20
        )));
    }
    let hex_id = id.trim_start_matches("sha256:").to_string();
    let tmp = root.join(format!(".{hex_id}.tmp"));
    let _ = super::remove_tree(&tmp);
    let res = (|| -> Result<ImageRecord> {
        let copied = treecopy::copy_tree(
            c.upper,
            &tmp,
            c.shift,
            disk::MAX_ENTRIES,
            need.saturating_add(64 << 20),
        )
        .map_err(|e| match e {
            CopyError::Limit(m) => Error::limit(format!("the built layer cannot be saved: {m}")),
            CopyError::Unsupported(m) => Error::unsupported(m),
            CopyError::Io(m) => Error::internal(format!("saving the built layer: {m}")),
        })?;
        let dst = root.join(&hex_id);
        let _ = super::remove_tree(&dst);
        std::fs::rename(&tmp, &dst)
            .map_err(|e| Error::internal("committing the built layer").with_source(e))?;
        let size = disk::usage(&dst, u64::MAX).0.max(copied.bytes);
        images.record(ImageRecord {
            id: id.clone(),
            names: vec![name.clone()],
            layers: c.base.layers + 1,
            size_bytes: c.base.size_bytes + size,
            imported_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            source: format!("build:{}", c.build_id),
            parent: Some(c.base.id.clone()),
            build_key: Some(c.build_key.to_string()),
        })
    })();
    if res.is_err() {
        let _ = super::remove_tree(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> (ImageStore, ImageRecord) {
        let images = ImageStore::new(dir.join("images"), &[]).expect("store");
        let base_id = format!("sha256:{}", "ab".repeat(32));
        std::fs::create_dir_all(images.rootfs_dir().join("ab".repeat(32)).join("etc"))
            .expect("base rootfs");
        let base = images
            .record(ImageRecord {
                id: base_id,
                names: vec!["debian:bookworm".into()],
                layers: 1,
                size_bytes: 10,
                imported_at: String::new(),
                source: "test".into(),
                parent: None,
                build_key: None,
            })
            .expect("record");
        (images, base)
    }

    #[test]
    fn a_committed_build_is_a_layer_over_its_base_and_is_reused() {
        let d = tempfile::tempdir().expect("dir");
        let (images, base) = store(d.path());
        let upper = d.path().join("upper");
        std::fs::create_dir_all(upper.join("usr/bin")).expect("upper");
        std::fs::write(upper.join("usr/bin/tool"), b"#!/bin/sh\n").expect("file");
        // The base has two files; the build removed one (an overlay
        // whiteout) and replaced a directory (opaque).
        let base_root = images.rootfs_of(&base);
        std::fs::write(base_root.join("etc/keep"), b"k").expect("base file");
        std::fs::write(base_root.join("etc/gone"), b"g").expect("base file");
        std::fs::create_dir_all(base_root.join("opt/old")).expect("base dir");
        std::fs::write(base_root.join("opt/old/a"), b"a").expect("base file");
        std::fs::create_dir_all(upper.join("etc")).expect("upper etc");
        nix::sys::stat::mknod(
            &upper.join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .expect("whiteout (root)");
        std::fs::create_dir_all(upper.join("opt/old")).expect("upper dir");
        std::fs::write(upper.join("opt/old/b"), b"b").expect("upper file");
        stacyvm_sandbox::treecopy::mark_opaque_dir(&upper.join("opt/old")).expect("opaque");
        let c = Commit {
            upper: &upper,
            shift: None,
            base: &base,
            build_key: "key-1",
            name: "local/stacyvm-env:web-1",
            build_id: "b1",
            min_free: 0,
        };
        let rec = commit(&images, &c).expect("commit");
        assert_eq!(rec.parent.as_deref(), Some(base.id.as_str()));
        assert_eq!(rec.id, layer_id(&base.id, "key-1"));
        assert!(images.rootfs_of(&rec).join("usr/bin/tool").is_file());
        let (lower, _, _) = images.layers("local/stacyvm-env:web-1").expect("layers");
        assert_eq!(
            lower,
            [
                images.rootfs_of(&rec).display().to_string(),
                images.rootfs_of(&base).display().to_string()
            ]
        );
        // Reuse: the same key on the same base, under a new name.
        let again = reuse(&images, &base, "key-1", "local/stacyvm-env:web-2")
            .expect("reuse")
            .expect("found");
        assert_eq!(again.id, rec.id);
        assert!(images.find("local/stacyvm-env:web-2").is_some());
        assert!(reuse(&images, &base, "key-2", "x:y")
            .expect("reuse")
            .is_none());
        // The base stays while the build stands on it; single-layer
        // providers refuse the build.
        let e = images.remove("debian:bookworm").expect_err("in use");
        assert!(e.to_string().contains("is the base of"), "{e}");
        // Single-layer providers get a flattened copy, made once.
        let agent = crate::agent::find_agent("").expect("stacyvm-agent built (cargo build --bins)");
        assert_eq!(
            images.single_dir(&base, "qemu", &agent).expect("base"),
            images.rootfs_of(&base)
        );
        let flat = images.single_dir(&rec, "qemu", &agent).expect("flattened");
        assert!(flat.join("usr/bin/tool").is_file());
        assert_eq!(std::fs::read(flat.join("etc/keep")).expect("kept"), b"k");
        assert!(
            std::fs::symlink_metadata(flat.join("etc/gone")).is_err(),
            "the whiteout removed the base's file"
        );
        assert!(flat.join("opt/old/b").is_file());
        assert!(
            !flat.join("opt/old/a").exists(),
            "the opaque directory hid the base's contents"
        );
        assert!(
            !stacyvm_sandbox::treecopy::is_opaque_dir(&flat.join("opt/old")),
            "no overlay marker is left"
        );
        assert_eq!(
            images.single_dir(&rec, "proot", &agent).expect("again"),
            flat,
            "the copy is made once"
        );
        images
            .remove("local/stacyvm-env:web-2")
            .expect("remove build");
        assert!(!flat.exists(), "the flattened copy goes with its image");
        images.remove("debian:bookworm").expect("remove base");
        // The host image cannot be built on.
        assert!(base_of(&images, "host").is_err());
        assert!(base_of(&images, "").is_err());
    }

    #[test]
    fn a_commit_that_does_not_fit_leaves_nothing() {
        let d = tempfile::tempdir().expect("dir");
        let (images, base) = store(d.path());
        let upper = d.path().join("upper");
        std::fs::create_dir_all(&upper).expect("upper");
        std::fs::write(upper.join("f"), b"x").expect("file");
        let c = Commit {
            upper: &upper,
            shift: None,
            base: &base,
            build_key: "k",
            name: "a:b",
            build_id: "b",
            min_free: u64::MAX / 2,
        };
        let e = commit(&images, &c).expect_err("no room");
        assert!(e.to_string().contains("free"), "{e}");
        let left: Vec<_> = std::fs::read_dir(images.rootfs_dir())
            .expect("rootfs")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "only the base: {left:?}");
    }
}
