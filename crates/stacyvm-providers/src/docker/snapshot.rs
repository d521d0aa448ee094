//! Snapshots of docker sandboxes: the engine's commit of the container
//! (its writable layer; the engine pauses it meanwhile) as the image
//! `stacyvm-snapshot:<snap-id>`, which children start from.
//!
//! The image name is reserved: a spawn that names it (or any image of the
//! `stacyvm-snapshot` repository) instead of the snapshot is refused, so
//! the snapshot's tenancy rules cannot be bypassed by naming its image.
//! Deleting a snapshot its children still run on untags the image; the
//! engine keeps its layers for them and the last child's removal removes
//! the image. Memory, processes and tmpfs mounts are not part of a docker
//! snapshot (a child boots fresh on the files); with `read_only_rootfs`
//! every writable path is a tmpfs, so that mode has no snapshots.

use std::collections::HashMap;

use bollard::query_parameters::{CommitContainerOptionsBuilder, RemoveImageOptionsBuilder};
use stacyvm_core::provider::SandboxSnapshot;
use stacyvm_core::{paths, Error, Result};
use tracing::{info, warn};

use super::{engine_err, is_status, spec, DockerProvider};

/// The repository of snapshot images.
pub const REPO: &str = "stacyvm-snapshot";
/// Labels of a snapshot image.
pub const LABEL_SNAPSHOT: &str = "stacyvm.snapshot";
pub const LABEL_SOURCE: &str = "stacyvm.snapshot.source";

/// The image children of `snap` start from.
pub fn image_of(snap: &str) -> String {
    format!("{REPO}:{snap}")
}

/// Whether an image reference names the snapshot repository (however it
/// is spelled: `docker.io/library/stacyvm-snapshot` is the same).
/// `sha256:…` is an image id to the engine, never a repository: refused
/// too (it would start any local image, a snapshot's among them).
pub fn is_reserved(image: &spec::ImageRef) -> bool {
    // Docker Hub's spellings of an official image: `x`, `library/x`,
    // `docker.io/x`, `docker.io/library/x`, `index.docker.io/…`,
    // `registry-1.docker.io/…`.
    let mut repo = image.repo.as_str();
    for host in ["docker.io/", "index.docker.io/", "registry-1.docker.io/"] {
        if let Some(rest) = repo.strip_prefix(host) {
            repo = rest;
            break;
        }
    }
    let repo = repo.strip_prefix("library/").unwrap_or(repo);
    repo == REPO || repo == "sha256"
}

impl DockerProvider {
    pub(super) async fn take_snapshot(&self, id: &str, snap: &str) -> Result<SandboxSnapshot> {
        if self.opts.config.read_only_rootfs {
            return Err(Error::unsupported(
                "docker sandboxes with read_only_rootfs keep their files on tmpfs mounts, which a snapshot cannot take",
            ));
        }
        if !paths::is_snapshot_id(snap) {
            return Err(Error::invalid(format!("bad snapshot id {snap:?}")));
        }
        let d = self.engine().await?;
        let info = match d
            .inspect_container(
                id,
                Some(bollard::query_parameters::InspectContainerOptions { size: true }),
            )
            .await
        {
            Ok(i) if spec::is_ours(i.config.as_ref().and_then(|c| c.labels.as_ref())) => i,
            Ok(_) => return Err(Error::sandbox_not_found(id)),
            Err(e) if is_status(&e, 404) => return Err(Error::sandbox_not_found(id)),
            Err(e) => return Err(engine_err("inspecting the sandbox container", e)),
        };
        // The commit writes the container's layer again: it must fit
        // beside what the engine keeps, with a GiB to spare.
        let layer = u64::try_from(info.size_rw.unwrap_or(0)).unwrap_or(0);
        if let Ok(sys) = d.info().await {
            if let Some(root) = sys
                .docker_root_dir
                .filter(|r| std::path::Path::new(r).is_dir())
            {
                if let Ok(st) = nix::sys::statvfs::statvfs(root.as_str()) {
                    let free = st.blocks_available() * st.fragment_size();
                    if free < layer.saturating_add(1 << 30) {
                        return Err(Error::limit(format!(
                            "a snapshot of {id} needs {} MiB and the engine's disk has {} MiB free (a GiB is kept)",
                            layer >> 20,
                            free >> 20
                        )));
                    }
                }
            }
        }
        let network_mode = match info
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.as_deref())
        {
            Some("none") | None => "none",
            Some(_) => "bridge",
        };
        let base_size = match info.image.as_deref() {
            Some(img) => d.inspect_image(img).await.ok().and_then(|i| i.size),
            None => None,
        };
        let opts = CommitContainerOptionsBuilder::default()
            .container(id)
            .repo(REPO)
            .tag(snap)
            .comment(&format!("StacyVM snapshot of {id}"))
            .pause(true)
            .build();
        let config = bollard::models::ContainerConfig {
            labels: Some(HashMap::from([
                (LABEL_SNAPSHOT.to_string(), snap.to_string()),
                (LABEL_SOURCE.to_string(), id.to_string()),
            ])),
            ..Default::default()
        };
        let committed = d.commit_container(opts, config).await;
        // The engine paused the container for the commit.
        self.drop_dead_conn(id).await;
        committed.map_err(|e| {
            if is_status(&e, 404) {
                Error::sandbox_not_found(id)
            } else {
                engine_err("committing the sandbox container", e)
            }
        })?;
        let size = d
            .inspect_image(&image_of(snap))
            .await
            .ok()
            .and_then(|i| i.size)
            .unwrap_or(0);
        let size_bytes = u64::try_from(size.saturating_sub(base_size.unwrap_or(0))).unwrap_or(0);
        info!(sandbox_id = %id, snapshot = %snap, bytes = size_bytes, "docker sandbox snapshot taken");
        Ok(SandboxSnapshot {
            size_bytes,
            network_mode: network_mode.into(),
        })
    }

    /// The image a child of `snap` starts from; NotFound when the snapshot
    /// does not exist (never pulled: snapshots live in this engine only).
    pub(super) async fn snapshot_image(&self, snap: &str) -> Result<spec::ImageRef> {
        let missing = || Error::not_found(format!("snapshot {snap:?}"));
        if !paths::is_snapshot_id(snap) {
            return Err(missing());
        }
        let d = self.engine().await?;
        match d.inspect_image(&image_of(snap)).await {
            Ok(i) => {
                let labelled = i
                    .config
                    .and_then(|c| c.labels)
                    .is_some_and(|l| l.get(LABEL_SNAPSHOT).map(String::as_str) == Some(snap));
                if !labelled {
                    return Err(missing());
                }
            }
            Err(e) if is_status(&e, 404) => return Err(missing()),
            Err(e) => return Err(engine_err("inspecting the snapshot image", e)),
        }
        spec::parse_image(&image_of(snap))
    }

    /// Untags the snapshot's image; its layers stay while children run.
    pub(super) async fn remove_snapshot(&self, snap: &str) -> Result<()> {
        if !paths::is_snapshot_id(snap) {
            return Ok(());
        }
        let d = self.engine().await?;
        let image = match d.inspect_image(&image_of(snap)).await {
            Ok(i) => i,
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(e) => return Err(engine_err("inspecting the snapshot image", e)),
        };
        // In use: untag only (the engine keeps the layers for the
        // children); unused: the image goes.
        let opts = RemoveImageOptionsBuilder::default().build();
        match d.remove_image(&image_of(snap), Some(opts), None).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) if is_status(&e, 409) => {
                let opts = RemoveImageOptionsBuilder::default().force(true).build();
                match d.remove_image(&image_of(snap), Some(opts), None).await {
                    Ok(_) => {
                        info!(snapshot = %snap, image = ?image.id, "snapshot untagged; its children run on");
                        Ok(())
                    }
                    Err(e) if is_status(&e, 404) => Ok(()),
                    Err(e) => Err(engine_err("removing the snapshot image", e)),
                }
            }
            Err(e) => Err(engine_err("removing the snapshot image", e)),
        }
    }

    /// After a container's removal: its image, if it is a deleted
    /// snapshot's (untagged) that no other container uses, goes too.
    pub(super) async fn release_snapshot_image(&self, image_id: &str) {
        let Ok(d) = self.engine().await else { return };
        let Ok(image) = d.inspect_image(image_id).await else {
            return;
        };
        let is_snapshot = image
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .is_some_and(|l| l.contains_key(LABEL_SNAPSHOT));
        let tagged = image.repo_tags.as_ref().is_some_and(|t| !t.is_empty());
        if !is_snapshot || tagged {
            return;
        }
        let opts = RemoveImageOptionsBuilder::default().build();
        match d.remove_image(image_id, Some(opts), None).await {
            Ok(_) => {
                info!(image = %image_id, "a deleted snapshot's image went with its last child")
            }
            // Another child still runs on it.
            Err(e) if is_status(&e, 409) || is_status(&e, 404) => {}
            Err(e) => {
                warn!(image = %image_id, error = %e, "removing a deleted snapshot's image failed")
            }
        }
    }
}
