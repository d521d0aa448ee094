//! Root filesystem images for native sandboxes.
//!
//! `host` (the default) shows the host's `/usr`, `/bin`, `/sbin` and
//! `/lib*` read-only and a synthesized `/etc` (see [`super::hostetc`]) on
//! top of an empty skeleton, never the host's own `/etc`, `/root`, `/home`,
//! `/var` or the server's data dir.
//! Unpacked OCI images (content-addressed rootfs directories under
//! `images/rootfs/`) are used as read-only overlay lower layers.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use stacyvm_agent_proto::boot::BindSpec;
use stacyvm_core::{Error, Result};

pub use super::import::{import_archive, normalize_name, ImageRecord, Progress};

/// Host top-level entries the `host` image exposes (read-only).
const HOST_DIRS: [&str; 7] = ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// Empty directories every root has.
const SKELETON_DIRS: [&str; 11] = [
    "proc",
    "dev",
    "tmp",
    "run",
    "workspace",
    "root",
    "home",
    "var/tmp",
    "var/log",
    "opt",
    "mnt",
];
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    host_skel: PathBuf,
    /// The synthesized `/etc` layer of the `host` image.
    host_etc: PathBuf,
    hidden: Vec<String>,
    /// Serialises index updates within this process.
    lock: std::sync::Mutex<()>,
}

/// Index file of imported images.
const INDEX: &str = "index.json";

impl ImageStore {
    pub fn new(root: PathBuf, hidden: &[String]) -> Result<Self> {
        let host_skel = root.join("host-skeleton");
        let host_etc = super::hostetc::ensure_layer(Path::new("/etc"), &root.join("host-etc"))?;
        let store = ImageStore {
            root,
            host_skel,
            host_etc,
            hidden: hidden.to_vec(),
            lock: std::sync::Mutex::new(()),
        };
        store.ensure_skeleton()?;
        store.drop_stale_flattening();
        Ok(store)
    }

    /// Removes half-made flattened copies whose server is gone
    /// (`flat/<id>.tmp-<pid>-<n>`).
    fn drop_stale_flattening(&self) {
        let Ok(rd) = std::fs::read_dir(self.root.join("flat")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some((_, rest)) = name.split_once(".tmp-") else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or_default();
            if pid.is_empty() || !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    fn ensure_skeleton(&self) -> Result<()> {
        let err =
            |e: std::io::Error| Error::internal("preparing the host image skeleton").with_source(e);
        std::fs::create_dir_all(&self.host_skel).map_err(err)?;
        for d in SKELETON_DIRS {
            std::fs::create_dir_all(self.host_skel.join(d)).map_err(err)?;
        }
        for (d, mode) in [("tmp", 0o1777), ("var/tmp", 0o1777), ("root", 0o700)] {
            std::fs::set_permissions(
                self.host_skel.join(d),
                std::fs::Permissions::from_mode(mode),
            )
            .map_err(err)?;
        }
        // The home of the image's unprivileged account, owned by it (the
        // layer is id-mapped, so on-disk ids are the sandbox's ids).
        let uid = super::hostetc::DEFAULT_UID;
        let home = self
            .host_skel
            .join("home")
            .join(super::hostetc::DEFAULT_USER);
        std::fs::create_dir_all(&home).map_err(err)?;
        // A server without root (PRoot only) cannot give it away; its
        // sandboxes then see the directory as their own.
        if let Err(e) = std::os::unix::fs::chown(&home, Some(uid), Some(uid)) {
            if e.kind() != std::io::ErrorKind::PermissionDenied {
                return Err(err(e));
            }
        }
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
        for name in HOST_DIRS {
            let host = Path::new("/").join(name);
            let skel = self.host_skel.join(name);
            match std::fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(&host).map_err(err)?;
                    if std::fs::symlink_metadata(&skel).is_err() {
                        symlink(&target, &skel).map_err(err)?;
                    }
                }
                Ok(m) if m.is_dir() => std::fs::create_dir_all(&skel).map_err(err)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Where unpacked images live (`<root>/rootfs`).
    pub(crate) fn rootfs_dir(&self) -> PathBuf {
        self.root.join("rootfs")
    }

    /// Imported images (the built-in `host` image is not listed).
    pub fn list(&self) -> Vec<ImageRecord> {
        std::fs::read(self.root.join(INDEX))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, list: &[ImageRecord]) -> Result<()> {
        let tmp = self.root.join(format!("{INDEX}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(list).unwrap_or_default())
            .map_err(|e| Error::internal("writing image index").with_source(e))?;
        std::fs::rename(&tmp, self.root.join(INDEX))
            .map_err(|e| Error::internal("writing image index").with_source(e))
    }

    /// Image names available: `host` plus every imported name.
    pub fn names(&self) -> Vec<String> {
        let mut v = vec!["host".to_string()];
        for r in self.list() {
            v.extend(r.names);
        }
        v
    }

    /// Finds an imported image by name (`alpine` = `alpine:latest`) or id prefix.
    pub fn find(&self, image: &str) -> Option<ImageRecord> {
        let list = self.list();
        let by_name = normalize_name(image)
            .ok()
            .and_then(|n| list.iter().find(|r| r.names.contains(&n)).cloned());
        by_name.or_else(|| {
            let id = image.strip_prefix("sha256:").unwrap_or(image);
            if id.len() >= 12 {
                list.into_iter()
                    .find(|r| r.id.trim_start_matches("sha256:").starts_with(id))
            } else {
                None
            }
        })
    }

    /// Imports a `docker save` or OCI archive; the name moves to the new image.
    pub fn import(
        &self,
        archive: &Path,
        name: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<ImageRecord> {
        std::fs::create_dir_all(self.rootfs_dir())
            .map_err(|e| Error::internal("creating image store").with_source(e))?;
        let rec = import_archive(archive, &self.rootfs_dir(), name, progress)?;
        self.record(rec)
    }

    /// Adds (or merges) an unpacked image into the index; its names move
    /// to it from any other image.
    pub(crate) fn record(&self, mut rec: ImageRecord) -> Result<ImageRecord> {
        let mut seen = std::collections::HashSet::new();
        rec.names.retain(|n| seen.insert(n.clone()));
        let _g = self
            .lock
            .lock()
            .map_err(|_| Error::internal("image index lock"))?;
        let mut list = self.list();
        for r in &mut list {
            r.names.retain(|n| !rec.names.contains(n));
        }
        match list.iter_mut().find(|r| r.id == rec.id) {
            Some(existing) => {
                for n in &rec.names {
                    if !existing.names.contains(n) {
                        existing.names.push(n.clone());
                    }
                }
            }
            None => list.push(rec.clone()),
        }
        list.retain(|r| !r.names.is_empty() || r.id == rec.id);
        self.save(&list)?;
        Ok(list.into_iter().find(|r| r.id == rec.id).unwrap_or(rec))
    }

    /// Removes an image (all its names) and its rootfs. An image built
    /// images stand on stays (409) until they are removed.
    pub fn remove(&self, image: &str) -> Result<ImageRecord> {
        let rec = self
            .find(image)
            .ok_or_else(|| Error::not_found(format!("image {image:?}")))?;
        let _g = self
            .lock
            .lock()
            .map_err(|_| Error::internal("image index lock"))?;
        let mut list = self.list();
        if let Some(child) = list
            .iter()
            .find(|r| r.parent.as_deref() == Some(rec.id.as_str()))
        {
            return Err(Error::conflict(format!(
                "image {image:?} is the base of {} (built on it); remove that first",
                child
                    .names
                    .first()
                    .cloned()
                    .unwrap_or_else(|| child.id.clone())
            )));
        }
        list.retain(|r| r.id != rec.id);
        self.save(&list)?;
        let dir = self.rootfs_dir().join(rec.id.trim_start_matches("sha256:"));
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(
            self.root
                .join("flat")
                .join(rec.id.trim_start_matches("sha256:")),
        );
        Ok(rec)
    }

    /// The rootfs directory of an imported image.
    pub fn rootfs_of(&self, rec: &ImageRecord) -> PathBuf {
        self.rootfs_dir().join(rec.id.trim_start_matches("sha256:"))
    }

    /// The rootfs dirs of an image, topmost first: a built image's own
    /// layer, then its parent's (at most 32 deep).
    fn chain(&self, rec: &ImageRecord) -> Result<Vec<String>> {
        let list = self.list();
        let mut out = vec![self.rootfs_of(rec).to_string_lossy().to_string()];
        let mut cur = rec.clone();
        while let Some(parent) = cur.parent.clone() {
            if out.len() >= 32 {
                return Err(Error::invalid(format!(
                    "image {} is built on more than 32 layers",
                    rec.id
                )));
            }
            cur = list
                .iter()
                .find(|r| r.id == parent)
                .cloned()
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "image {} was built on {parent}, which is gone",
                        rec.id
                    ))
                })?;
            out.push(self.rootfs_of(&cur).to_string_lossy().to_string());
        }
        Ok(out)
    }

    /// The one rootfs dir of an image, for providers that run single-layer
    /// images (microVM disks, PRoot). A built image (a layer over its
    /// base, with overlay whiteouts) is flattened once, by `agent flatten`
    /// in a mount namespace of its own, into `flat/<id>/rootfs`; that
    /// takes root, and without it the image is refused with the reason.
    pub fn single_dir(&self, rec: &ImageRecord, provider: &str, agent: &Path) -> Result<PathBuf> {
        if rec.parent.is_none() {
            return Ok(self.rootfs_of(rec));
        }
        let name = rec.names.first().cloned().unwrap_or_else(|| rec.id.clone());
        let hex = rec.id.trim_start_matches("sha256:");
        let flat = self.root.join("flat");
        let done = flat.join(hex);
        if done.join("rootfs").is_dir() {
            return Ok(done.join("rootfs"));
        }
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::invalid(format!(
                "image {name} is an environment build layered over its base; the {provider} provider runs it flattened, which takes a server running as root (spawn it on native instead)"
            )));
        }
        let layers = self.chain(rec)?;
        // Spawns flattening the same image at once each copy on their own.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = flat.join(format!("{hex}.tmp-{}-{seq}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::internal("making the flattened image's dir").with_source(e))?;
        let out = std::process::Command::new(agent)
            .arg("flatten")
            .arg("--out")
            .arg(tmp.join("rootfs"))
            .args(&layers)
            .output()
            .map_err(|e| Error::internal("running stacyvm-agent flatten").with_source(e))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::internal(format!(
                "flattening image {name} for {provider}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // Another spawn may have flattened it meanwhile: the first wins.
        if std::fs::rename(&tmp, &done).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        if done.join("rootfs").is_dir() {
            Ok(done.join("rootfs"))
        } else {
            Err(Error::internal(format!("image {name}: no flattened copy")))
        }
    }

    /// An image built from `build_key` on `parent` (an image id).
    pub fn find_built(&self, parent: &str, build_key: &str) -> Option<ImageRecord> {
        self.list().into_iter().find(|r| {
            r.parent.as_deref() == Some(parent) && r.build_key.as_deref() == Some(build_key)
        })
    }

    /// Checks that an image exists, with a message telling how to get it.
    pub fn check(&self, image: &str) -> Result<()> {
        if image.is_empty() || image == "host" || self.find(image).is_some() {
            return Ok(());
        }
        Err(Error::invalid(format!(
            "image {image:?} is not available to the native provider; use image \"host\" (the host's /usr read-only and a synthesized /etc) or get it first: `stacyvm image pull {image}` (from a registry), `stacyvm image import --docker {image}` (from the local Docker engine) or `docker save {image} -o image.tar && stacyvm image import image.tar` (see `stacyvm image ls`)"
        )))
    }

    /// Overlay lower layers, read-only binds and masked paths of an image.
    pub fn layers(&self, image: &str) -> Result<(Vec<String>, Vec<BindSpec>, Vec<String>)> {
        self.check(image)?;
        if !(image.is_empty() || image == "host") {
            let rec = self
                .find(image)
                .ok_or_else(|| Error::invalid(format!("image {image:?} disappeared")))?;
            return Ok((self.chain(&rec)?, Vec::new(), Vec::new()));
        }
        let mut binds = Vec::new();
        for name in HOST_DIRS {
            let host = Path::new("/").join(name);
            if let Ok(m) = std::fs::symlink_metadata(&host) {
                if m.is_dir() && !m.file_type().is_symlink() {
                    binds.push(BindSpec {
                        source: host.to_string_lossy().to_string(),
                        target: format!("/{name}"),
                        readonly: true,
                        confined: false,
                    });
                }
            }
        }
        let mut masks: Vec<String> = Vec::new();
        for h in &self.hidden {
            if HOST_DIRS.iter().any(|d| h.starts_with(&format!("/{d}/"))) {
                masks.push(h.clone());
            }
        }
        Ok((
            vec![
                self.host_etc.to_string_lossy().to_string(),
                self.host_skel.to_string_lossy().to_string(),
            ],
            binds,
            masks,
        ))
    }
}
