//! Importing container images (`docker save` tarballs and OCI image
//! layouts) into content-addressed rootfs directories.
//!
//! An image is identified by the SHA-256 of its config blob (as Docker
//! does). Its layers are applied in order into `rootfs/<id>/`, honouring
//! whiteouts (`.wh.<name>` deletes, `.wh..wh..opq` empties a directory).
//! Entries that would escape the rootfs (absolute paths, `..`, writing
//! through a symlink) are rejected. Device nodes are skipped.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stacyvm_core::{Error, Result};

/// An entry of the image index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `sha256:<hex>` of the config blob.
    pub id: String,
    /// Names (`repo:tag`) pointing at this image.
    pub names: Vec<String>,
    pub layers: usize,
    pub size_bytes: u64,
    pub imported_at: String,
    pub source: String,
    /// A built image: its rootfs holds only what the build changed, over
    /// this image (its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// A built image: the key of the steps that made it (see
    /// `stacyvm_core::manager::builds::cache_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_key: Option<String>,
}

/// Progress callback: (bytes done, bytes total, what).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64, &str);

#[derive(Debug, Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct OciIndex {
    manifests: Vec<OciDescriptor>,
}

#[derive(Debug, Deserialize)]
struct OciDescriptor {
    digest: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct OciManifest {
    config: OciDescriptor,
    layers: Vec<OciDescriptor>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::invalid(msg)
}

/// Normalises an image reference: `alpine` → `alpine:latest`.
pub fn normalize_name(name: &str) -> Result<String> {
    let n = name.trim();
    if n.is_empty() || n.len() > 255 || n.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(format!("invalid image name {name:?}")));
    }
    if !n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c))
    {
        return Err(bad(format!(
            "invalid image name {name:?}: use letters, digits and ._-/:@"
        )));
    }
    let last = n.rsplit('/').next().unwrap_or(n);
    Ok(if last.contains(':') || last.contains('@') {
        n.to_string()
    } else {
        format!("{n}:latest")
    })
}

/// Reads the whole tar into a map of member path → (offset, size) so that
/// members can be read in any order without extracting the archive.
fn index_tar(file: &mut fs::File) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut map = BTreeMap::new();
    file.seek(SeekFrom::Start(0))
        .map_err(|e| bad("reading image archive").with_source(e))?;
    let mut ar = tar::Archive::new(&mut *file);
    for entry in ar
        .entries_with_seek()
        .map_err(|e| bad("not a tar archive").with_source(e))?
    {
        let entry = entry.map_err(|e| bad("corrupt image archive").with_source(e))?;
        let path = entry
            .path()
            .map_err(|e| bad("bad member name").with_source(e))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        map.insert(path, (entry.raw_file_position(), entry.size()));
    }
    Ok(map)
}

fn member<'a>(
    file: &'a mut fs::File,
    idx: &BTreeMap<String, (u64, u64)>,
    name: &str,
) -> Result<io::Take<&'a mut fs::File>> {
    let name = name.trim_start_matches("./");
    let (off, size) = *idx
        .get(name)
        .ok_or_else(|| bad(format!("image archive has no member {name:?}")))?;
    file.seek(SeekFrom::Start(off))
        .map_err(|e| bad("reading image archive").with_source(e))?;
    Ok(file.take(size))
}

fn read_member(
    file: &mut fs::File,
    idx: &BTreeMap<String, (u64, u64)>,
    name: &str,
) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    member(file, idx, name)?
        .read_to_end(&mut buf)
        .map_err(|e| bad("reading image archive").with_source(e))?;
    Ok(buf)
}

fn blob_path(digest: &str) -> Result<String> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| bad(format!("unsupported digest {digest:?}")))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!("malformed digest {digest:?}")));
    }
    Ok(format!("blobs/sha256/{hex}"))
}

/// What an archive contains: config member, layer members, names.
struct Plan {
    config: String,
    layers: Vec<String>,
    names: Vec<String>,
}

fn plan(file: &mut fs::File, idx: &BTreeMap<String, (u64, u64)>) -> Result<Plan> {
    if idx.contains_key("manifest.json") {
        let m: Vec<DockerManifest> =
            serde_json::from_slice(&read_member(file, idx, "manifest.json")?)
                .map_err(|e| bad(format!("manifest.json: {e}")))?;
        let m = m
            .into_iter()
            .next()
            .ok_or_else(|| bad("manifest.json lists no image"))?;
        return Ok(Plan {
            config: m.config,
            layers: m.layers,
            names: m.repo_tags.unwrap_or_default(),
        });
    }
    if idx.contains_key("index.json") {
        let index: OciIndex = serde_json::from_slice(&read_member(file, idx, "index.json")?)
            .map_err(|e| bad(format!("index.json: {e}")))?;
        let desc = index
            .manifests
            .into_iter()
            .next()
            .ok_or_else(|| bad("index.json lists no manifest"))?;
        let name = desc
            .annotations
            .get("org.opencontainers.image.ref.name")
            .cloned();
        let m: OciManifest =
            serde_json::from_slice(&read_member(file, idx, &blob_path(&desc.digest)?)?)
                .map_err(|e| bad(format!("OCI manifest: {e}")))?;
        let layers = m
            .layers
            .iter()
            .map(|l| blob_path(&l.digest))
            .collect::<Result<Vec<_>>>()?;
        return Ok(Plan {
            config: blob_path(&m.config.digest)?,
            layers,
            names: name.into_iter().collect(),
        });
    }
    Err(bad(
        "not a docker save or OCI image archive (no manifest.json or index.json)",
    ))
}

/// Opens a layer stream, transparently gunzipping.
pub(crate) fn layer_reader<'a, R: Read + 'a>(r: R) -> Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::new(r);
    let head = io::BufRead::fill_buf(&mut br).map_err(|e| bad("reading layer").with_source(e))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::GzDecoder::new(br)))
    } else {
        Ok(Box::new(br))
    }
}

/// A path inside the rootfs for a layer entry, or None if it must be rejected.
fn safe_rel(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::CurDir => {}
            _ => return None,
        }
    }
    if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    }
}

/// Whether any existing component of `rel` under `root` is a symlink
/// (writing through it could escape the rootfs).
fn through_symlink(root: &Path, rel: &Path) -> bool {
    let mut cur = root.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        cur.push(c);
        if fs::symlink_metadata(&cur)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
        {
            return true;
        }
    }
    false
}

fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = fs::remove_file(p);
        }
        Err(_) => {}
    }
}

fn apply_layer(root: &Path, reader: Box<dyn Read + '_>) -> Result<()> {
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(true);
    for entry in ar
        .entries()
        .map_err(|e| bad("corrupt layer").with_source(e))?
    {
        let mut entry = entry.map_err(|e| bad("corrupt layer").with_source(e))?;
        let raw = entry
            .path()
            .map_err(|e| bad("bad layer entry name").with_source(e))?
            .into_owned();
        let Some(rel) = safe_rel(&raw) else {
            if raw.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err(bad(format!(
                    "layer entry {} escapes the image root",
                    raw.display()
                )));
            }
            continue; // "./" itself
        };
        if through_symlink(root, &rel) {
            return Err(bad(format!(
                "layer entry {} would be written through a symlink",
                rel.display()
            )));
        }
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
        if name == ".wh..wh..opq" {
            if let Ok(rd) = fs::read_dir(root.join(&parent)) {
                for e in rd.flatten() {
                    remove_any(&e.path());
                }
            }
            continue;
        }
        if let Some(target) = name.strip_prefix(".wh.") {
            // A whiteout names one entry of its own directory: `.wh..`
            // (`.`), `.wh...` (`..`) or a bare `.wh.` would delete the
            // image dir itself or everything next to it.
            if matches!(target, "" | "." | "..") {
                return Err(bad(format!(
                    "layer entry {} is a bad whiteout",
                    rel.display()
                )));
            }
            remove_any(&root.join(&parent).join(target));
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            continue;
        }
        let dest = root.join(&rel);
        if !kind.is_dir() {
            remove_any(&dest);
        }
        if let Some(p) = dest.parent() {
            fs::create_dir_all(p)
                .map_err(|e| Error::internal(format!("creating {}", p.display())).with_source(e))?;
        }
        if kind.is_hard_link() {
            let target = entry
                .link_name()
                .ok()
                .flatten()
                .and_then(|t| safe_rel(&t))
                .ok_or_else(|| bad(format!("hard link {} has a bad target", rel.display())))?;
            // The target is resolved by the kernel from `root`: a symlink
            // on the way (`x -> /var/lib`, then `leak -> x/stacyvm.db`)
            // would link a host file into the image. The last component is
            // not followed (link(2) links a symlink itself).
            if through_symlink(root, &target) {
                return Err(bad(format!(
                    "hard link {} points through a symlink",
                    rel.display()
                )));
            }
            fs::hard_link(root.join(target), &dest)
                .map_err(|e| bad(format!("hard link {}", rel.display())).with_source(e))?;
            continue;
        }
        entry
            .unpack(&dest)
            .map_err(|e| Error::internal(format!("unpacking {}", rel.display())).with_source(e))?;
    }
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                if m.is_dir() && !e.file_type().map(|t| t.is_symlink()).unwrap_or(false) {
                    stack.push(e.path());
                } else {
                    total += m.len();
                }
            }
        }
    }
    total
}

/// Imports an archive into `rootfs_dir/<id>`; returns the record (names
/// are the archive's tags plus `extra_name`).
pub fn import_archive(
    archive: &Path,
    rootfs_dir: &Path,
    extra_name: Option<&str>,
    progress: Progress<'_>,
) -> Result<ImageRecord> {
    let mut file = fs::File::open(archive)
        .map_err(|e| bad(format!("opening {}", archive.display())).with_source(e))?;
    let idx = index_tar(&mut file)?;
    let plan = plan(&mut file, &idx)?;
    let config = read_member(&mut file, &idx, &plan.config)?;
    let id = image_id(&config);
    let mut names = Vec::new();
    for n in plan.names.iter().map(String::as_str).chain(extra_name) {
        names.push(normalize_name(n)?);
    }
    if names.is_empty() {
        names.push(id[..19].to_string());
    }
    let total: u64 = plan
        .layers
        .iter()
        .filter_map(|l| idx.get(l.trim_start_matches("./")).map(|x| x.1))
        .sum();
    let layers = plan.layers.clone();
    let dir = unpack(
        rootfs_dir,
        &id,
        layers.len(),
        total,
        &mut |i| {
            // A handle of its own per layer: the reader outlives this call.
            let mut f = fs::File::open(archive)
                .map_err(|e| bad(format!("opening {}", archive.display())).with_source(e))?;
            let size = member(&mut f, &idx, &layers[i])?.limit();
            Ok((layer_reader(f.take(size))?, size))
        },
        progress,
    )?;
    Ok(ImageRecord {
        id,
        names,
        layers: plan.layers.len(),
        size_bytes: dir_size(&dir),
        imported_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        source: archive.display().to_string(),
        parent: None,
        build_key: None,
    })
}

/// Opens layer `i` of an image: its (decompressed) stream and its size in
/// bytes as stored (for progress).
pub(crate) type OpenLayer<'a> = dyn FnMut(usize) -> Result<(Box<dyn Read + 'a>, u64)> + 'a;

/// Unpacks `n` layers in order into `rootfs_dir/<id hex>` unless that
/// image is already complete: into a private partial dir first, renamed
/// into place at the end, so a crash never leaves a half image in use.
pub(crate) fn unpack<'a>(
    rootfs_dir: &Path,
    id: &str,
    n: usize,
    total: u64,
    open: &mut OpenLayer<'a>,
    progress: Progress<'_>,
) -> Result<PathBuf> {
    let dir = rootfs_dir.join(id.trim_start_matches("sha256:"));
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    let tmp = rootfs_dir.join(format!(".partial-{}-{}", std::process::id(), &id[7..19]));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| Error::internal("creating image dir").with_source(e))?;
    let mut done = 0;
    for i in 0..n {
        progress(done, total, &format!("layer {}/{n}", i + 1));
        let applied = open(i).and_then(|(r, size)| apply_layer(&tmp, r).map(|()| size));
        match applied {
            Ok(size) => done += size,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        }
    }
    progress(total, total, "done");
    fs::write(tmp.join(".complete"), id)
        .map_err(|e| Error::internal("finishing image").with_source(e))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&tmp, &dir).map_err(|e| Error::internal("finishing image").with_source(e))?;
    Ok(dir)
}

/// The image id: the sha256 of its config JSON (as Docker computes it).
pub(crate) fn image_id(config: &[u8]) -> String {
    format!("sha256:{}", hex_digest(config))
}

pub(crate) fn dir_size_of(p: &Path) -> u64 {
    dir_size(p)
}

fn hex_digest(b: &[u8]) -> String {
    let d = Sha256::digest(b);
    d.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn add_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, data).expect("append file");
    }

    fn add_dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o755);
        h.set_entry_type(tar::EntryType::Directory);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, path, &[][..]).expect("append dir");
    }

    fn add_symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o777);
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        b.append_link(&mut h, path, target).expect("append link");
    }

    /// A busybox image: (config JSON, layer 1 tar, layer 2 tar.gz). Layer 1
    /// has busybox and its applets plus files that layer 2 deletes (a
    /// whiteout and an opaque directory). Needs Debian's busybox-static.
    pub fn busybox_image(tag: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let busybox =
            fs::read("/bin/busybox").expect("/bin/busybox (apt-get install busybox-static)");
        let list = std::process::Command::new("/bin/busybox")
            .arg("--list")
            .output()
            .expect("busybox --list");
        let mut l1 = tar::Builder::new(Vec::new());
        for d in ["bin/", "etc/", "tmp/", "gone/", "opaque/", "opaque/sub/"] {
            add_dir(&mut l1, d);
        }
        add_file(&mut l1, "bin/busybox", &busybox, 0o755);
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" && !applet.is_empty() {
                add_symlink(&mut l1, &format!("bin/{applet}"), "busybox");
            }
        }
        add_file(
            &mut l1,
            "etc/os-release",
            b"NAME=stacyvm-test-busybox\n",
            0o644,
        );
        add_file(&mut l1, "gone/file", b"deleted by layer 2", 0o644);
        add_file(&mut l1, "opaque/sub/old", b"hidden by opaque", 0o644);
        let l1 = l1.into_inner().expect("layer1");
        let mut l2 = tar::Builder::new(Vec::new());
        add_file(&mut l2, ".wh.gone", b"", 0o644);
        add_dir(&mut l2, "opaque/");
        add_file(&mut l2, "opaque/.wh..wh..opq", b"", 0o644);
        add_file(&mut l2, "opaque/new", b"layer 2", 0o644);
        let l2 = l2.into_inner().expect("layer2");
        // Docker refuses configs without rootfs.diff_ids (digests of the
        // uncompressed layers).
        let diff_ids = [
            format!("sha256:{}", hex_digest(&l1)),
            format!("sha256:{}", hex_digest(&l2)),
        ];
        let config =
            serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids}, "tag": tag})
            .to_string();
        // Layer 2 is gzipped, as registries serve them.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &l2).expect("gzip");
        let l2 = gz.finish().expect("gzip");
        (config.into_bytes(), l1, l2)
    }

    /// A `docker save`-style archive of [`busybox_image`].
    pub fn busybox_archive(dir: &Path, tag: &str) -> PathBuf {
        let (config, l1, l2) = busybox_image(tag);
        let manifest = serde_json::json!([{"Config": "config.json", "RepoTags": [tag], "Layers": ["l1/layer.tar", "l2/layer.tar.gz"]}]).to_string();
        let mut outer = tar::Builder::new(Vec::new());
        add_file(&mut outer, "manifest.json", manifest.as_bytes(), 0o644);
        add_file(&mut outer, "config.json", &config, 0o644);
        add_file(&mut outer, "l1/layer.tar", &l1, 0o644);
        add_file(&mut outer, "l2/layer.tar.gz", &l2, 0o644);
        let path = dir.join("busybox.tar");
        fs::write(&path, outer.into_inner().expect("outer")).expect("write archive");
        path
    }

    #[test]
    fn imports_layers_with_whiteouts() {
        let dir = tempfile::tempdir().expect("tmp");
        let archive = busybox_archive(dir.path(), "test/busybox:1");
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(&rootfs).expect("mkdir");
        let mut calls = 0;
        let rec = import_archive(&archive, &rootfs, Some("bb"), &mut |_, _, _| calls += 1)
            .expect("import");
        assert!(calls >= 2, "progress reported");
        assert_eq!(
            rec.names,
            vec!["test/busybox:1".to_string(), "bb:latest".to_string()]
        );
        assert_eq!(rec.layers, 2);
        let root = rootfs.join(rec.id.trim_start_matches("sha256:"));
        assert!(root.join("bin/busybox").is_file());
        assert_eq!(
            fs::read_link(root.join("bin/sh")).expect("sh link"),
            Path::new("busybox")
        );
        assert!(!root.join("gone").exists(), "whiteout removed the dir");
        assert!(!root.join("opaque/sub").exists(), "opaque dir emptied");
        assert_eq!(fs::read(root.join("opaque/new")).expect("new"), b"layer 2");
        // Importing again is idempotent (same id, no re-extraction needed).
        let again = import_archive(&archive, &rootfs, None, &mut |_, _, _| {}).expect("again");
        assert_eq!(again.id, rec.id);
    }

    fn archive_with_layer(dir: &Path, layer: Vec<u8>) -> PathBuf {
        let manifest =
            serde_json::json!([{"Config": "c.json", "RepoTags": ["evil:1"], "Layers": ["l.tar"]}])
                .to_string();
        let mut outer = tar::Builder::new(Vec::new());
        add_file(&mut outer, "manifest.json", manifest.as_bytes(), 0o644);
        add_file(&mut outer, "c.json", b"{}", 0o644);
        add_file(&mut outer, "l.tar", &layer, 0o644);
        let p = dir.join("evil.tar");
        fs::write(&p, outer.into_inner().expect("outer")).expect("write");
        p
    }

    #[test]
    fn rejects_layers_that_escape() {
        let dir = tempfile::tempdir().expect("tmp");
        let rootfs = dir.path().join("rootfs");
        fs::create_dir_all(&rootfs).expect("mkdir");
        // A symlink to the host followed by a file written through it.
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).expect("outside");
        let mut l = tar::Builder::new(Vec::new());
        add_symlink(&mut l, "link", &outside.to_string_lossy());
        add_file(&mut l, "link/pwned", b"x", 0o644);
        let a = archive_with_layer(dir.path(), l.into_inner().expect("layer"));
        let e = import_archive(&a, &rootfs, None, &mut |_, _, _| {}).expect_err("through symlink");
        assert!(e.to_string().contains("through a symlink"), "{e}");
        assert!(!outside.join("pwned").exists(), "nothing written outside");
        // Raw `..` entries (bypassing the tar builder's own checks).
        let mut h = tar::Header::new_old();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.as_old_mut().name[..13].copy_from_slice(b"../escape.txt");
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend_from_slice(b"x");
        raw.resize(1024, 0);
        raw.extend_from_slice(&[0u8; 1024]);
        let a = archive_with_layer(dir.path(), raw);
        let e = import_archive(&a, &rootfs, None, &mut |_, _, _| {}).expect_err("dot-dot");
        assert!(e.to_string().contains("escapes"), "{e}");
        assert!(!dir.path().join("escape.txt").exists());
        assert!(
            fs::read_dir(&rootfs).expect("rootfs").next().is_none(),
            "failed imports leave nothing behind"
        );
        // Not an image at all.
        let junk = dir.path().join("junk.tar");
        fs::write(&junk, b"not a tar").expect("junk");
        assert!(import_archive(&junk, &rootfs, None, &mut |_, _, _| {}).is_err());
    }

    /// A layer that plants a symlink to the host and hard-links a host
    /// file through it; whiteouts naming `.`, `..` or nothing.
    #[test]
    fn hostile_links_and_whiteouts_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let rootfs = dir.path().join("rootfs");
        // Another, complete image next to the one being imported.
        let other = rootfs.join("other-image");
        fs::create_dir_all(&other).expect("mkdir");
        fs::write(other.join("keep"), b"in use").expect("keep");
        let outside = dir.path().join("var-lib");
        fs::create_dir_all(&outside).expect("outside");
        let secret = outside.join("stacyvm.db");
        fs::write(&secret, b"key hashes").expect("secret");
        let mut l = tar::Builder::new(Vec::new());
        add_symlink(&mut l, "x", &outside.to_string_lossy());
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Link);
        h.set_mtime(1_700_000_000);
        l.append_link(&mut h, "leak", "x/stacyvm.db")
            .expect("hard link");
        let a = archive_with_layer(dir.path(), l.into_inner().expect("layer"));
        let e = import_archive(&a, &rootfs, None, &mut |_, _, _| {}).expect_err("link via symlink");
        assert_eq!(e.kind(), stacyvm_core::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("through a symlink"), "{e}");
        assert_eq!(
            std::os::unix::fs::MetadataExt::nlink(&fs::metadata(&secret).expect("secret")),
            1,
            "the host file got no new link"
        );
        for bad_name in [".wh..", ".wh...", ".wh.", "sub/.wh..."] {
            let mut l = tar::Builder::new(Vec::new());
            add_dir(&mut l, "sub/");
            add_file(&mut l, "sub/f", b"x", 0o644);
            add_file(&mut l, bad_name, b"", 0o644);
            let a = archive_with_layer(dir.path(), l.into_inner().expect("layer"));
            let e = import_archive(&a, &rootfs, None, &mut |_, _, _| {}).expect_err(bad_name);
            assert_eq!(
                e.kind(),
                stacyvm_core::ErrorKind::InvalidInput,
                "{bad_name}: {e}"
            );
            assert!(e.to_string().contains("bad whiteout"), "{bad_name}: {e}");
        }
        // Nothing outside the partial dir changed, and it is gone.
        assert_eq!(fs::read(other.join("keep")).expect("kept"), b"in use");
        assert_eq!(fs::read(&secret).expect("secret"), b"key hashes");
        let left: Vec<_> = fs::read_dir(&rootfs)
            .expect("rootfs")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("other-image")]);
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(normalize_name("alpine").expect("n"), "alpine:latest");
        assert_eq!(
            normalize_name("localhost:5000/x").expect("n"),
            "localhost:5000/x:latest"
        );
        assert_eq!(normalize_name("a/b:1.2").expect("n"), "a/b:1.2");
        assert!(normalize_name("bad name").is_err());
        assert!(normalize_name("").is_err());
        assert!(normalize_name("x;rm").is_err());
    }
}
