//! Environment builds whose steps ran in a microVM's guest.
//!
//! A guest's root is an ext4 disk of its own, with no overlay that
//! records what the steps changed. So the commit asks the guest's agent
//! for its root as a tar (one file system: `/proc`, `/sys`, `/dev`, `/tmp`
//! and `/run` stay out), unpacks it on the host with its owners, and diffs
//! it against the base image's flattened root ([`crate::image::layerdiff`]):
//! the layer holds what changed, with whiteouts for what went, over the
//! base's layers — the same kind of image, with the same id for the same
//! steps on the same base, that a native build makes, so every provider
//! runs it and a second build reuses it.

use std::io::Read;
use std::path::{Path, PathBuf};

use stacyvm_core::provider::{ArchiveLimits, BuiltImage, FileStream, ImageBuild, SandboxIo};
use stacyvm_core::{Error, Result};

use crate::image::layerdiff;
use crate::image::store::{ImageRecord, ImageStore};
use crate::native::{build as native_build, disk};

/// Bytes the data file system keeps free after a commit.
const MIN_FREE: u64 = 512 << 20;

/// An earlier build's image for `plan` on `base`, renamed to `plan.name`.
pub fn cached(images: &ImageStore, base: &str, plan: &ImageBuild) -> Result<Option<BuiltImage>> {
    let base = native_build::base_of(images, base)?;
    Ok(native_build::reuse(images, &base, &plan.cache_key, &plan.name)?.map(|r| built(r, true)))
}

fn built(rec: ImageRecord, reused: bool) -> BuiltImage {
    BuiltImage {
        image_ref: rec.names.first().cloned().unwrap_or_default(),
        digest: rec.id,
        size_bytes: rec.size_bytes,
        reused,
    }
}

/// Saves the root of the guest behind `io` as the image `plan.name` over
/// `base` (what a microVM provider's `commit_image` does). Nothing is
/// left behind on failure.
pub async fn commit(
    io: std::sync::Arc<dyn SandboxIo>,
    (images, provider, agent): (std::sync::Arc<ImageStore>, &'static str, PathBuf),
    base: &str,
    plan: &ImageBuild,
) -> Result<BuiltImage> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::unsupported(format!(
            "a {provider} build's commit needs a server running as root (the guest's files keep their owners)"
        )));
    }
    let root = io.archive_read("/", root_limits()).await?;
    let base = native_build::base_of(&images, base)?;
    if let Some(rec) = native_build::reuse(&images, &base, &plan.cache_key, &plan.name)? {
        return Ok(built(rec, true));
    }
    let (plan, rt) = (plan.clone(), tokio::runtime::Handle::current());
    tokio::task::spawn_blocking(move || {
        commit_blocking(&images, (provider, &agent), &base, &plan, root, rt)
    })
    .await
    .map_err(|e| Error::internal(format!("build commit task: {e}")))?
}

fn commit_blocking(
    images: &ImageStore,
    (provider, agent): (&str, &Path),
    base: &ImageRecord,
    plan: &ImageBuild,
    root: FileStream,
    rt: tokio::runtime::Handle,
) -> Result<BuiltImage> {
    let name = crate::image::import::normalize_name(&plan.name)?;
    let id = native_build::layer_id(&base.id, &plan.cache_key);
    let hex_id = id.trim_start_matches("sha256:").to_string();
    let store = images.rootfs_dir();
    std::fs::create_dir_all(&store)
        .map_err(|e| Error::internal("creating the image store").with_source(e))?;
    let st = nix::sys::statvfs::statvfs(&store)
        .map_err(|e| Error::internal("reading free space").with_source(e))?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    // The guest's whole root lands here before the diff.
    let need = base.size_bytes.saturating_mul(2).saturating_add(MIN_FREE);
    if free < need {
        return Err(Error::limit(format!(
            "committing the build needs about {} MiB (the guest's root, then the layer) and the data filesystem has {} MiB free",
            need >> 20,
            free >> 20
        )));
    }
    let flat = images.single_dir(base, provider, agent)?;
    let guest = store.join(format!(".{hex_id}.guest"));
    let tmp = store.join(format!(".{hex_id}.tmp"));
    for d in [&guest, &tmp] {
        let _ = crate::native::remove_tree(d);
    }
    let res = (|| -> Result<ImageRecord> {
        std::fs::create_dir(&guest)
            .map_err(|e| Error::internal("making the build's scratch dir").with_source(e))?;
        let reader = StreamReader {
            chunks: root.chunks,
            buf: Vec::new(),
            at: 0,
            rt,
        };
        let limits = stacyvm_sandbox::archive::Limits {
            max_bytes: free.saturating_sub(MIN_FREE) / 2,
            max_entries: disk::MAX_ENTRIES,
        };
        stacyvm_sandbox::archive::unpack_keeping_owners(
            &guest.to_string_lossy(),
            reader,
            limits,
            |_| Ok(()),
        )
        .map_err(crate::agent::client::map_err)?;
        let d = layerdiff::diff(&guest, &flat, &tmp, disk::MAX_ENTRIES)?;
        let dst = store.join(&hex_id);
        let _ = crate::native::remove_tree(&dst);
        std::fs::rename(&tmp, &dst)
            .map_err(|e| Error::internal("committing the built layer").with_source(e))?;
        images.record(ImageRecord {
            id: id.clone(),
            names: vec![name.clone()],
            layers: base.layers + 1,
            size_bytes: base.size_bytes + d.bytes,
            imported_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            source: format!("build:{}", plan.build_id),
            parent: Some(base.id.clone()),
            build_key: Some(plan.cache_key.clone()),
        })
    })();
    let _ = crate::native::remove_tree(&guest);
    if res.is_err() {
        let _ = crate::native::remove_tree(&tmp);
    }
    res.map(|r| built(r, false))
}

/// What a commit asks the guest for: its whole root.
fn root_limits() -> ArchiveLimits {
    ArchiveLimits {
        max_bytes: u64::MAX,
        max_entries: disk::MAX_ENTRIES,
    }
}

/// `Read` over a file stream's chunks, from a blocking thread.
struct StreamReader {
    chunks: tokio::sync::mpsc::Receiver<Result<Vec<u8>>>,
    buf: Vec<u8>,
    at: usize,
    rt: tokio::runtime::Handle,
}

impl Read for StreamReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at >= self.buf.len() {
            let chunks = &mut self.chunks;
            match self.rt.block_on(chunks.recv()) {
                Some(Ok(c)) => {
                    self.buf = c;
                    self.at = 0;
                }
                Some(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
