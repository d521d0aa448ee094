//! Root filesystem images for native sandboxes.
//!
//! `host` (the default) shows the host's `/usr`, `/bin`, `/sbin`, `/lib*`
//! and `/etc` read-only on top of an empty skeleton, never `/root`,
//! `/home`, `/var`, the server's data dir or secrets such as `/etc/shadow`.
//! Unpacked OCI images (content-addressed rootfs directories under
//! `images/rootfs/`) are used as read-only overlay lower layers.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use stacyvm_agent_proto::boot::BindSpec;
use stacyvm_core::{Error, Result};

/// Host top-level entries the `host` image exposes (read-only).
const HOST_DIRS: [&str; 8] = [
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc",
];
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
/// Files and directories under the exposed host dirs that stay hidden.
const HOST_SECRETS: [&str; 14] = [
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
    "/etc/stacyvm",
    "/etc/security/opasswd",
    "/etc/docker",
    "/etc/machine-id",
    "/etc/krb5.keytab",
    "/etc/postgresql",
];

#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    host_skel: PathBuf,
    hidden: Vec<String>,
}

impl ImageStore {
    pub fn new(root: PathBuf, hidden: &[String]) -> Result<Self> {
        let host_skel = root.join("host-skeleton");
        let store = ImageStore {
            root,
            host_skel,
            hidden: hidden.to_vec(),
        };
        store.ensure_skeleton()?;
        Ok(store)
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

    /// Image names available.
    pub fn names(&self) -> Vec<String> {
        vec!["host".to_string()]
    }

    /// Checks that an image exists, with a message telling how to get it.
    pub fn check(&self, image: &str) -> Result<()> {
        match image {
            "" | "host" => Ok(()),
            other => Err(Error::invalid(format!(
                "image {other:?} is not available to the native provider; use image \"host\" (the host's /usr and /etc, read-only) or import it first with `stacyvm image import FILE` (images directory: {})",
                self.root.display()
            ))),
        }
    }

    /// Overlay lower layers, read-only binds and masked paths of an image.
    pub fn layers(&self, image: &str) -> Result<(Vec<String>, Vec<BindSpec>, Vec<String>)> {
        self.check(image)?;
        let mut binds = Vec::new();
        for name in HOST_DIRS {
            let host = Path::new("/").join(name);
            if let Ok(m) = std::fs::symlink_metadata(&host) {
                if m.is_dir() && !m.file_type().is_symlink() {
                    binds.push(BindSpec {
                        source: host.to_string_lossy().to_string(),
                        target: format!("/{name}"),
                        readonly: true,
                    });
                }
            }
        }
        let mut masks: Vec<String> = HOST_SECRETS.iter().map(|s| (*s).to_string()).collect();
        for h in &self.hidden {
            if HOST_DIRS.iter().any(|d| h.starts_with(&format!("/{d}/"))) {
                masks.push(h.clone());
            }
        }
        Ok((
            vec![self.host_skel.to_string_lossy().to_string()],
            binds,
            masks,
        ))
    }
}
