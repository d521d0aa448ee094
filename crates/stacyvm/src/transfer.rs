//! `stacyvm cp`: directories and files between this machine and a sandbox,
//! as tar streams (`/sandboxes/{id}/archive`), with a progress bar.
//!
//! Uploads are packed to a temporary file first (its SHA-256 goes in a
//! header the server checks before keeping anything; the bar knows the
//! total). Downloads are spooled to a temporary file, then extracted here
//! with the same rules the sandbox side uses: entries stay inside the
//! destination, links are stored as links and never followed, devices,
//! FIFOs and hard links out of the archive are refused, and a refused
//! archive leaves nothing behind. A sandbox's archive is untrusted input.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use sha2::Digest;
use stacyvm_sandbox::archive::{self, Limits};

use crate::cli::Conn;
use crate::image::{human, progress_bar};

/// `ID:PATH` (a sandbox id, then an absolute path), else a local path.
fn remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    let id_ok = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && path.starts_with('/')).then_some((id, path))
}

const UNLIMITED: Limits = Limits {
    max_bytes: u64::MAX,
    max_entries: u64::MAX,
};

fn agent_err(e: stacyvm_agent_proto::AgentError) -> anyhow::Error {
    anyhow!("{}", e.message)
}

/// Hashes what passes through.
struct Hashing<W> {
    inner: W,
    hash: sha2::Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.hash.update(&b[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub async fn run(conn: &Conn, src: &str, dest: &str) -> Result<ExitCode> {
    let client = stacyvm_client::Client::new(&conn.url, conn.api_key.clone())?;
    match (remote(src), remote(dest)) {
        (None, Some((id, path))) => upload(&client, src, id, path).await,
        (Some((id, path)), None) => download(&client, id, path, dest).await,
        (Some(_), Some(_)) => bail!("copy between two sandboxes: copy to this machine first"),
        (None, None) => bail!(
            "one side must be a sandbox path, ID:/absolute/path (e.g. sb-1a2b3c4d:/workspace)"
        ),
    }
}

/// Local `src` into the sandbox at `dest`: a directory's contents go into
/// `dest` (created); a file goes to `dest`, or into it when it ends with
/// `/`.
/// A local file or directory packed as a tar (never following a link) in
/// a temporary file, ready to upload with its length and SHA-256.
pub(crate) struct Packed {
    pub body: reqwest::Body,
    pub len: u64,
    pub sha: String,
    pub report: archive::Report,
}

/// Packs `src` (named `name` when a single file is renamed), then counts
/// the upload on `bar`.
pub(crate) async fn pack(
    src: &str,
    name: Option<PathBuf>,
    bar: &indicatif::ProgressBar,
) -> Result<Packed> {
    bar.set_message("packing");
    let spool = tempfile::tempfile().context("creating a temporary file")?;
    let src_owned = src.to_string();
    let (spool, sha, len, report) = tokio::task::spawn_blocking(move || {
        let mut w = Hashing {
            inner: std::io::BufWriter::new(spool),
            hash: sha2::Sha256::new(),
            bytes: 0,
        };
        let r = archive::pack_named(&src_owned, name.as_deref(), &mut w, UNLIMITED)
            .map_err(agent_err)?;
        w.flush()?;
        let sha = hex::encode(w.hash.finalize());
        let file = w.inner.into_inner().map_err(|e| e.into_error())?;
        Ok::<_, anyhow::Error>((file, sha, w.bytes, r))
    })
    .await??;
    bar.set_length(len);
    bar.set_message("uploading");
    let mut file = tokio::fs::File::from_std(spool);
    tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(0)).await?;
    let counted = bar.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |c| {
        if let Ok(c) = &c {
            counted.inc(c.len() as u64);
        }
        c
    });
    Ok(Packed {
        body: reqwest::Body::wrap_stream(stream),
        len,
        sha,
        report,
    })
}

async fn upload(
    client: &stacyvm_client::Client,
    src: &str,
    id: &str,
    dest: &str,
) -> Result<ExitCode> {
    let meta = std::fs::symlink_metadata(src).with_context(|| format!("reading {src}"))?;
    let (into, name): (String, Option<PathBuf>) = if meta.is_dir() || dest.ends_with('/') {
        (dest.to_string(), None)
    } else {
        let p = Path::new(dest);
        let parent = p
            .parent()
            .map_or("/".into(), |p| p.to_string_lossy().to_string());
        (parent, p.file_name().map(PathBuf::from))
    };
    let bar = progress_bar();
    let packed = pack(src, name, &bar).await?;
    let (len, sha, report) = (packed.len, packed.sha.clone(), packed.report);
    let res = client.archive_put(id, &into, packed.body, len, &sha).await;
    bar.finish_and_clear();
    let v = res?;
    eprintln!(
        "copied {} entries ({}) to {id}:{into}",
        v["entries"].as_u64().unwrap_or(report.entries),
        human(v["bytes"].as_u64().unwrap_or(report.bytes)),
    );
    Ok(ExitCode::SUCCESS)
}

/// The sandbox's `path` to local `dest`: a directory's contents go into
/// `dest` (created); a file goes to `dest`, or into it when it is a
/// directory.
async fn download(
    client: &stacyvm_client::Client,
    id: &str,
    path: &str,
    dest: &str,
) -> Result<ExitCode> {
    let resp = client.archive_get(id, path).await?;
    let bar = progress_bar();
    bar.set_message("downloading");
    let mut spool = tempfile::tempfile().context("creating a temporary file")?;
    let mut body = resp.bytes_stream();
    let mut total = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the download broke off")?;
        spool.write_all(&chunk)?;
        total += chunk.len() as u64;
        bar.set_position(total);
    }
    bar.finish_and_clear();
    let dest = PathBuf::from(dest);
    let report =
        tokio::task::spawn_blocking(move || -> Result<archive::Report> {
            use std::io::Seek;
            spool.seek(std::io::SeekFrom::Start(0))?;
            let input = std::io::BufReader::new(spool);
            // Peek: one regular-file entry named like the source is a file copy.
            let single_file =
                is_single_file(&mut std::io::BufReader::new(input.get_ref().try_clone()?))?;
            let mut input = input;
            input.seek(std::io::SeekFrom::Start(0))?;
            match single_file {
                Some(entry) if !dest.is_dir() => {
                    // Extract beside the target, then rename onto it.
                    let parent = dest
                        .parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(Path::new("."));
                    std::fs::create_dir_all(parent)?;
                    let stage = tempfile::Builder::new()
                        .prefix(".stacyvm-cp-")
                        .tempdir_in(parent)?;
                    let r =
                        archive::unpack(&stage.path().to_string_lossy(), input, UNLIMITED, |_| {
                            Ok(())
                        })
                        .map_err(agent_err)?;
                    std::fs::rename(stage.path().join(&entry), &dest)
                        .with_context(|| format!("moving the file to {}", dest.display()))?;
                    Ok(r)
                }
                _ => archive::unpack(&dest.to_string_lossy(), input, UNLIMITED, |_| Ok(()))
                    .map_err(agent_err),
            }
        })
        .await??;
    eprintln!(
        "copied {} entries ({}) from {id}:{path}",
        report.entries,
        human(report.bytes)
    );
    Ok(ExitCode::SUCCESS)
}

/// The name of the archive's only entry when it is a regular file.
fn is_single_file<R: Read>(input: R) -> Result<Option<PathBuf>> {
    let mut a = tar::Archive::new(input);
    let mut found = None;
    for (i, e) in a.entries()?.enumerate() {
        let e = e?;
        if i > 0 || !e.header().entry_type().is_file() {
            return Ok(None);
        }
        found = Some(e.path()?.into_owned());
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_paths_are_id_colon_absolute_path() {
        assert_eq!(
            remote("sb-1a2b:/workspace"),
            Some(("sb-1a2b", "/workspace"))
        );
        assert_eq!(remote("./sb-1:/x"), None);
        assert_eq!(remote("sb-1:relative"), None);
        assert_eq!(remote("/tmp/a:b"), None);
        assert_eq!(remote("plain"), None);
    }
}
