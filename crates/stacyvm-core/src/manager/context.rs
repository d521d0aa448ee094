//! Build contexts: the files a spec's Dockerfile `COPY`s, uploaded as a tar
//! (`PUT /environments/specs/{id}/context`) and kept as
//! `<data_dir>/environments/contexts/<spec-id>.tar`.
//!
//! An upload is checked before it replaces the spec's context: at most
//! [`MAX_BYTES`] and [`MAX_ENTRIES`], relative paths without `..`, only
//! regular files, directories and symlinks (kept as links: the sandbox's
//! extraction never follows one). Its SHA-256 goes into the spec and the
//! build's cache key. A `COPY` selects entries from it into a new tar that
//! the sandbox extracts at the destination.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{Caller, Manager};
use crate::error::{Error, Result};
use crate::provider::ArchiveReport;

/// Largest context accepted (the tar, after decompression).
pub const MAX_BYTES: u64 = 256 << 20;
/// Most entries in a context.
pub const MAX_ENTRIES: u64 = 100_000;

/// Where spec contexts live.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("environments").join("contexts")
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::internal(what.to_string()).with_source(e)
}

/// The normalised relative path of a tar entry, or why it is refused.
fn entry_path(raw: &[u8]) -> Result<String> {
    let s = std::str::from_utf8(raw)
        .map_err(|_| Error::invalid("the context has a path that is not UTF-8"))?;
    if s.starts_with('/') {
        return Err(Error::invalid(format!(
            "the context has an absolute path {s:?}"
        )));
    }
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(Error::invalid(format!(
                    "the context has a path with '..' ({s:?})"
                )))
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// Checks a context tar; returns (entries, bytes of file data).
pub fn check(tar_path: &Path) -> Result<ArchiveReport> {
    let f = std::fs::File::open(tar_path).map_err(io_err("opening the context"))?;
    let mut ar = tar::Archive::new(f);
    let mut report = ArchiveReport::default();
    for e in ar
        .entries()
        .map_err(|e| Error::invalid(format!("the context is not a tar: {e}")))?
    {
        let e = e.map_err(|e| Error::invalid(format!("the context is not a tar: {e}")))?;
        report.entries += 1;
        if report.entries > MAX_ENTRIES {
            return Err(Error::limit(format!(
                "the context has more than {MAX_ENTRIES} entries"
            )));
        }
        let path = entry_path(&e.path_bytes())?;
        match e.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                report.bytes += e.size();
            }
            tar::EntryType::Directory | tar::EntryType::Symlink => {}
            // PAX and GNU long-name records carry the next entry's path.
            t if t.is_pax_global_extensions()
                || t.is_pax_local_extensions()
                || t.is_gnu_longname()
                || t.is_gnu_longlink() => {}
            t => {
                return Err(Error::invalid(format!(
                    "the context entry {path:?} is a {t:?}: only files, directories and symlinks"
                )))
            }
        }
    }
    Ok(report)
}

/// What one `COPY` source puts where: a tar to extract at `dir`.
#[derive(Debug)]
pub struct Selection {
    pub dir: String,
    pub tar: PathBuf,
    pub entries: u64,
}

/// Selects `source` (`""`: everything) of the context into `out` for a
/// `COPY … dest` with `to_dir` (the destination is a directory).
pub fn select(
    context: &Path,
    source: &str,
    dest: &str,
    to_dir: bool,
    out: &Path,
) -> Result<Selection> {
    // First pass: is the source a directory, a file, or missing?
    let is_dir = if source.is_empty() {
        true
    } else {
        let f = std::fs::File::open(context).map_err(io_err("opening the context"))?;
        let mut ar = tar::Archive::new(f);
        let mut kind = None;
        for e in ar.entries().map_err(io_err("reading the context"))? {
            let e = e.map_err(io_err("reading the context"))?;
            let p = entry_path(&e.path_bytes())?;
            if p == source {
                kind = Some(e.header().entry_type().is_dir());
            } else if p.starts_with(&format!("{source}/")) {
                kind = Some(true);
            }
            if kind == Some(true) {
                break;
            }
        }
        kind.ok_or_else(|| Error::invalid(format!("COPY {source}: not in the build context")))?
    };
    let dest_trim = dest.trim_end_matches("/.").trim_end_matches('/');
    let dest_trim = if dest_trim.is_empty() { "/" } else { dest_trim };
    let (dir, rename) = if is_dir || to_dir {
        (dest_trim.to_string(), None)
    } else {
        let (parent, name) = dest_trim.rsplit_once('/').unwrap_or(("", dest_trim));
        (
            if parent.is_empty() {
                "/".into()
            } else {
                parent.to_string()
            },
            Some(name.to_string()),
        )
    };
    let f = std::fs::File::open(context).map_err(io_err("opening the context"))?;
    let mut ar = tar::Archive::new(f);
    let o = std::fs::File::create(out).map_err(io_err("writing the copy"))?;
    let mut b = tar::Builder::new(o);
    let mut entries = 0;
    for e in ar.entries().map_err(io_err("reading the context"))? {
        let mut e = e.map_err(io_err("reading the context"))?;
        let p = entry_path(&e.path_bytes())?;
        let rel = if is_dir {
            if source.is_empty() {
                p.clone()
            } else if let Some(r) = p.strip_prefix(&format!("{source}/")) {
                r.to_string()
            } else {
                continue;
            }
        } else if p == source {
            rename
                .clone()
                .unwrap_or_else(|| source.rsplit('/').next().unwrap_or(source).to_string())
        } else {
            continue;
        };
        if rel.is_empty() {
            continue;
        }
        let mut h = e.header().clone();
        let mut data = Vec::new();
        if h.entry_type().is_file() {
            e.read_to_end(&mut data)
                .map_err(io_err("reading the context"))?;
        }
        match h.entry_type() {
            tar::EntryType::Symlink => {
                let target = e
                    .link_name()
                    .map_err(io_err("reading the context"))?
                    .map(|t| t.to_path_buf())
                    .unwrap_or_default();
                b.append_link(&mut h, &rel, &target)
                    .map_err(io_err("writing the copy"))?;
            }
            _ => {
                b.append_data(&mut h, &rel, data.as_slice())
                    .map_err(io_err("writing the copy"))?;
            }
        }
        entries += 1;
    }
    b.into_inner()
        .and_then(|mut f| f.flush())
        .map_err(io_err("writing the copy"))?;
    Ok(Selection {
        dir,
        tar: out.to_path_buf(),
        entries,
    })
}

impl Manager {
    /// `PUT /environments/specs/{id}/context`: replaces the spec's build
    /// context with the tar in `chunks` once it is checked.
    pub async fn put_spec_context(
        &self,
        id: &str,
        mut chunks: mpsc::Receiver<Vec<u8>>,
        caller: &Caller,
    ) -> Result<ArchiveReport> {
        let spec = self.find_spec(id, caller).await?;
        caller.owner_for(&spec.owner_id)?;
        let dir = dir(std::path::Path::new(&self.cfg.server.data_dir));
        std::fs::create_dir_all(&dir).map_err(io_err("creating the contexts dir"))?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            spec.id,
            hex::encode(rand::random::<[u8; 4]>())
        ));
        let res: Result<(ArchiveReport, String)> = async {
            let mut f = std::fs::File::create(&tmp).map_err(io_err("writing the context"))?;
            let mut h = Sha256::new();
            let mut total = 0u64;
            while let Some(c) = chunks.recv().await {
                total += c.len() as u64;
                if total > MAX_BYTES {
                    return Err(Error::limit(format!(
                        "the context is larger than {} MiB",
                        MAX_BYTES >> 20
                    )));
                }
                h.update(&c);
                f.write_all(&c).map_err(io_err("writing the context"))?;
            }
            f.sync_all().map_err(io_err("writing the context"))?;
            let t = tmp.clone();
            let report = tokio::task::spawn_blocking(move || check(&t))
                .await
                .map_err(|e| Error::internal(format!("context check: {e}")))??;
            Ok((report, hex::encode(h.finalize())))
        }
        .await;
        let (report, sum) = match res {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, dir.join(format!("{}.tar", spec.id)))
            .map_err(io_err("saving the context"))?;
        self.store
            .set_environment_spec_context(&spec.id, &sum)
            .await?;
        self.audit(
            caller,
            &spec.owner_id,
            "environment.context",
            "",
            &spec.id,
            "",
            true,
            format!(
                "entries={} bytes={} sha256={sum}",
                report.entries, report.bytes
            ),
        );
        Ok(report)
    }

    /// The context file of a spec.
    pub(super) fn context_file(&self, spec_id: &str) -> PathBuf {
        dir(Path::new(&self.cfg.server.data_dir)).join(format!("{spec_id}.tar"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, p, *data).expect("append");
        }
        for (p, t) in links {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, p, t).expect("link");
        }
        b.into_inner().expect("tar")
    }

    fn names(tar_path: &Path) -> Vec<String> {
        let mut ar = tar::Archive::new(std::fs::File::open(tar_path).expect("open"));
        ar.entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn copies_select_files_directories_and_renames() {
        let d = tempfile::tempdir().expect("dir");
        let ctx = d.path().join("ctx.tar");
        std::fs::write(
            &ctx,
            tar_of(
                &[
                    ("app/main.py", b"print(1)"),
                    ("app/lib/x.py", b"x"),
                    ("README", b"r"),
                ],
                &[("app/link", "/etc/shadow")],
            ),
        )
        .expect("write");
        let report = check(&ctx).expect("check");
        assert_eq!((report.entries, report.bytes), (4, 10));
        let out = d.path().join("out.tar");
        let s = select(&ctx, "app", "/srv/app/", true, &out).expect("dir");
        assert_eq!(s.dir, "/srv/app");
        assert_eq!(names(&out), ["main.py", "lib/x.py", "link"]);
        let s = select(&ctx, "README", "/doc/README.txt", false, &out).expect("file");
        assert_eq!(
            (s.dir.as_str(), names(&out)),
            ("/doc", vec!["README.txt".to_string()])
        );
        let s = select(&ctx, "README", "/doc/", true, &out).expect("into dir");
        assert_eq!(
            (s.dir.as_str(), names(&out)),
            ("/doc", vec!["README".to_string()])
        );
        let s = select(&ctx, "", "/w/.", true, &out).expect("all");
        assert_eq!((s.dir.as_str(), s.entries), ("/w", 4));
        let e = select(&ctx, "nope", "/x", false, &out).expect_err("missing");
        assert!(e.to_string().contains("not in the build context"), "{e}");
    }

    #[test]
    fn hostile_contexts_are_refused() {
        let d = tempfile::tempdir().expect("dir");
        let ctx = d.path().join("ctx.tar");
        // `..` and absolute names, written raw (the tar crate refuses to
        // build them).
        for bad in ["../escape", "/etc/passwd", "a/../../b"] {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..bad.len()].copy_from_slice(bad.as_bytes());
            h.set_size(0);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            let mut bytes = h.as_bytes().to_vec();
            bytes.extend_from_slice(&[0u8; 1024]);
            std::fs::write(&ctx, &bytes).expect("write");
            let e = check(&ctx).expect_err(bad).to_string();
            assert!(e.contains("absolute") || e.contains(".."), "{bad}: {e}");
        }
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Char);
        h.set_size(0);
        b.append_data(&mut h, "dev/null", &[][..]).expect("dev");
        std::fs::write(&ctx, b.into_inner().expect("tar")).expect("write");
        assert!(check(&ctx)
            .expect_err("device")
            .to_string()
            .contains("only files"));
        std::fs::write(&ctx, b"not a tar at all, just some bytes that go on").expect("write");
        assert!(check(&ctx).is_err());
    }
}
