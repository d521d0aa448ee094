//! Pushing native images to an OCI registry (environment builds).
//!
//! An image of the store is a chain of rootfs directories (a build's
//! layer over its base). Each becomes a gzip layer blob, base first, made
//! by walking the directory without following a link: owners, modes and
//! times as stored; overlay whiteouts (0/0 character devices) become
//! `.wh.<name>` files and opaque directories get `.wh..wh..opq`, the OCI
//! spellings; other device nodes, FIFOs and sockets are left out (imports
//! skip them too). The config names the layers' diff ids and gives the
//! image `/bin/sh` in `/workspace`. Blobs are pushed whole from memory.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::secrets::RegistryAuth as OciAuth;
use oci_client::{manifest, Client, Reference};
use sha2::{Digest, Sha256};
use stacyvm_core::provider::{BuildLog, RegistryAuth};
use stacyvm_core::{Error, Result};

use super::store::ImageStore;

/// Writes through to `w`, hashing what passes (the uncompressed tar: the
/// layer's diff id).
struct Tee<W> {
    hash: Sha256,
    w: W,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::internal(format!("packing a layer: {what}")).with_source(e)
}

fn empty_file(b: &mut tar::Builder<impl Write>, name: &str) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(0);
    h.set_mode(0o644);
    b.append_data(&mut h, name, std::io::empty())
        .map_err(io(name))
}

fn walk(root: &Path, rel: &str, b: &mut tar::Builder<impl Write>) -> Result<()> {
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(io(rel))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for n in names {
        let n = n.to_string_lossy().to_string();
        let name = if rel.is_empty() {
            n.clone()
        } else {
            format!("{rel}/{n}")
        };
        let path = dir.join(&n);
        let md = std::fs::symlink_metadata(&path).map_err(io(&name))?;
        let ft = md.file_type();
        if ft.is_char_device() && md.rdev() == 0 {
            let wh = if rel.is_empty() {
                format!(".wh.{n}")
            } else {
                format!("{rel}/.wh.{n}")
            };
            empty_file(b, &wh)?;
            continue;
        }
        if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() || ft.is_socket() {
            continue;
        }
        b.append_path_with_name(&path, &name).map_err(io(&name))?;
        if ft.is_dir() {
            if stacyvm_sandbox::treecopy::is_opaque_dir(&path) {
                empty_file(b, &format!("{name}/.wh..wh..opq"))?;
            }
            walk(root, &name, b)?;
        }
    }
    Ok(())
}

/// One rootfs dir as a gzip layer blob and its diff id.
pub fn layer_blob(dir: &Path) -> Result<(Vec<u8>, String)> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(Tee {
        hash: Sha256::new(),
        w: gz,
    });
    b.follow_symlinks(false);
    walk(dir, "", &mut b)?;
    let tee = b.into_inner().map_err(io("finishing"))?;
    let diff_id = format!("sha256:{}", hex::encode(tee.hash.finalize()));
    let blob = tee.w.finish().map_err(io("compressing"))?;
    Ok((blob, diff_id))
}

/// Pushes `image` of `store` to `target` (`host/repo:tag`); returns the
/// manifest's digest.
pub async fn push(
    store: &ImageStore,
    image: &str,
    target: &str,
    auth: &RegistryAuth,
    log: BuildLog,
) -> Result<String> {
    let reference: Reference = target
        .parse()
        .map_err(|e| Error::invalid(format!("invalid image reference {target:?}: {e}")))?;
    let (mut dirs, _, _) = store.layers(image)?;
    if store.find(image).is_none() {
        return Err(Error::invalid(format!(
            "the host image cannot be pushed ({image:?})"
        )));
    }
    dirs.reverse();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        log(&format!("packing layer {}/{}\n", i + 1, dirs.len()));
        let d = std::path::PathBuf::from(d);
        let (blob, diff) = tokio::task::spawn_blocking(move || layer_blob(&d))
            .await
            .map_err(|e| Error::internal(format!("layer task: {e}")))??;
        log(&format!(
            "layer {}/{}: {} MiB compressed\n",
            i + 1,
            dirs.len(),
            blob.len() >> 20
        ));
        diff_ids.push(diff);
        layers.push(ImageLayer::new(
            blob,
            manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE.to_string(),
            None,
        ));
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/workspace",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = Config::new(
        serde_json::to_vec(&config).unwrap_or_default(),
        manifest::IMAGE_CONFIG_MEDIA_TYPE.to_string(),
        None,
    );
    let registry = reference.resolve_registry().to_string();
    let client = Client::new(ClientConfig {
        protocol: if super::pull::is_loopback_registry(&registry) {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        },
        ..Default::default()
    });
    let oci_auth = OciAuth::Basic(auth.username.clone(), auth.password.clone());
    log(&format!("pushing {} layers to {target}\n", layers.len()));
    let refused = |e: oci_client::errors::OciDistributionError| {
        let msg = e.to_string().replace(&auth.password, "<redacted>");
        let lower = msg.to_ascii_lowercase();
        if lower.contains("unauthorized")
            || lower.contains("authentication")
            || lower.contains("401")
        {
            Error::forbidden(format!(
                "the registry {} refused the credentials of {}: {msg}",
                auth.host, auth.username
            ))
        } else {
            Error::unavailable(format!("pushing to {target}: {msg}"))
        }
    };
    client
        .push(&reference, &layers, config, &oci_auth, None)
        .await
        .map_err(refused)?;
    client
        .fetch_manifest_digest(&reference, &oci_auth)
        .await
        .map_err(refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteouts_and_opaque_dirs_take_their_oci_spellings() {
        let d = tempfile::tempdir().expect("dir");
        let root = d.path();
        std::fs::create_dir_all(root.join("etc/app")).expect("dirs");
        std::fs::write(root.join("etc/app/conf"), b"x=1").expect("file");
        std::os::unix::fs::symlink("/etc/shadow", root.join("etc/link")).expect("link");
        nix::sys::stat::mknod(
            &root.join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .expect("whiteout (root)");
        std::fs::create_dir(root.join("opaque")).expect("dir");
        stacyvm_sandbox::treecopy::mark_opaque_dir(&root.join("opaque")).expect("xattr (root)");
        let (blob, diff) = layer_blob(root).expect("blob");
        assert!(diff.starts_with("sha256:") && diff.len() == 71);
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(blob.as_slice()));
        let mut names = Vec::new();
        for e in ar.entries().expect("entries") {
            let e = e.expect("entry");
            let p = e.path().expect("path").display().to_string();
            if p == "etc/link" {
                assert_eq!(e.header().entry_type(), tar::EntryType::Symlink);
                assert_eq!(
                    e.link_name()
                        .expect("link")
                        .expect("target")
                        .display()
                        .to_string(),
                    "/etc/shadow"
                );
            }
            names.push(p);
        }
        for want in [
            "etc/.wh.gone",
            "opaque/.wh..wh..opq",
            "etc/app/conf",
            "etc/link",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert!(!names.iter().any(|n| n == "etc/gone"), "{names:?}");
    }
}
