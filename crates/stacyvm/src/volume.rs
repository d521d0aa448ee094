//! `stacyvm volume …`: named persistent volumes through the server's API
//! (`/volumes`), and their backups: `export` writes a volume's files to a
//! tar (or tar.gz) file, `import` extracts one into a volume, with the
//! file's SHA-256 checked by the server before anything is kept.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use futures::StreamExt;
use reqwest::Method;
use sha2::Digest;
use stacyvm_api::{CreateVolumeRequest, Volume};

use crate::cli::Conn;
use crate::image::{human, progress_bar};

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume (a file system of its own, capped at its size).
    #[command(
        after_help = "Example:\n  stacyvm volume create data --size-mb 2048\n  stacyvm spawn --volume data:/data"
    )]
    Create {
        /// Name: lowercase letters, digits, '-', '_', '.'.
        name: String,
        /// Capacity in MiB (default 1024).
        #[arg(long)]
        size_mb: Option<i64>,
    },
    /// List volumes with their usage and the sandboxes mounting them.
    #[command(alias = "list")]
    Ls,
    /// Show one volume.
    Inspect { name: String },
    /// Delete a volume and its data (refused while a sandbox mounts it).
    #[command(alias = "delete")]
    Rm { name: String },
    /// Write a volume's files to a tar file (`.tar.gz`/`.tgz`: gzip), or
    /// to stdout with `-o -`.
    #[command(after_help = "Example:\n  stacyvm volume export data -o data-2026-11-30.tar.gz")]
    Export {
        name: String,
        /// Output file (`-`: stdout).
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// Compress with gzip (the default for .tar.gz/.tgz names).
        #[arg(long)]
        gzip: bool,
    },
    /// Extract a tar or tar.gz file into a volume (owners, modes and links
    /// as the archive has them; entries stay inside the volume).
    #[command(
        after_help = "Example:\n  stacyvm volume create restored && stacyvm volume import restored data-2026-11-30.tar.gz"
    )]
    Import { name: String, file: PathBuf },
}

fn print_table(list: &[Volume]) {
    println!(
        "{:<24} {:<20} {:>9} {:>10}  MOUNTED BY",
        "NAME", "ID", "SIZE", "USED"
    );
    for v in list {
        let by: Vec<String> = v
            .mounts
            .iter()
            .map(|m| {
                format!(
                    "{}:{}{}",
                    m.sandbox_id,
                    m.path,
                    if m.read_only { ":ro" } else { "" }
                )
            })
            .collect();
        println!(
            "{:<24} {:<20} {:>9} {:>10}  {}",
            v.name,
            v.id,
            format!("{} MiB", v.size_mb),
            human(v.used_bytes),
            if by.is_empty() {
                "-".into()
            } else {
                by.join(", ")
            }
        );
    }
}

pub async fn run(conn: &Conn, cmd: VolumeCommand) -> Result<ExitCode> {
    let c = stacyvm_client::Client::new(&conn.url, conn.api_key.clone())?;
    match cmd {
        VolumeCommand::Create { name, size_mb } => {
            let v: Volume = c
                .send_json(
                    Method::POST,
                    "/volumes",
                    &CreateVolumeRequest {
                        name,
                        size_mb: size_mb.unwrap_or(0),
                        ..CreateVolumeRequest::default()
                    },
                )
                .await?;
            if conn.json {
                crate::cli::print_json(&v)?;
            } else {
                println!("{}", v.name);
                eprintln!("volume {} created ({}, {} MiB)", v.name, v.id, v.size_mb);
            }
        }
        VolumeCommand::Ls => {
            let list: Vec<Volume> = c.get_json("/volumes").await?;
            if conn.json {
                crate::cli::print_json(&list)?;
            } else {
                print_table(&list);
            }
        }
        VolumeCommand::Inspect { name } => {
            let v: Volume = c.get_json(&format!("/volumes/{name}")).await?;
            if conn.json {
                crate::cli::print_json(&v)?;
            } else {
                print_table(std::slice::from_ref(&v));
            }
        }
        VolumeCommand::Rm { name } => {
            let v = c.delete_json(&format!("/volumes/{name}")).await?;
            if conn.json {
                crate::cli::print_json(&v)?;
            } else {
                eprintln!("volume {name} deleted");
            }
        }
        VolumeCommand::Export { name, output, gzip } => {
            let to_stdout = output.as_os_str() == "-";
            let lower = output.to_string_lossy().to_ascii_lowercase();
            let gzip = gzip || lower.ends_with(".tar.gz") || lower.ends_with(".tgz");
            let resp = c.volume_archive_get(&name, gzip).await?;
            let bar = progress_bar();
            bar.set_message("exporting");
            let mut body = resp.bytes_stream();
            let mut total = 0u64;
            if to_stdout {
                let mut out = std::io::stdout();
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.context("the export broke off")?;
                    out.write_all(&chunk)?;
                    total += chunk.len() as u64;
                    bar.set_position(total);
                }
                out.flush()?;
            } else {
                // Beside the target, renamed onto it when complete: a
                // broken export never leaves a truncated backup under its
                // name.
                let dir = output
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                let mut tmp = tempfile::NamedTempFile::new_in(dir)
                    .with_context(|| format!("creating a file in {}", dir.display()))?;
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.context("the export broke off")?;
                    tmp.write_all(&chunk)?;
                    total += chunk.len() as u64;
                    bar.set_position(total);
                }
                tmp.flush()?;
                if total == 0 {
                    bail!("the server sent an empty archive");
                }
                tmp.persist(&output)
                    .with_context(|| format!("writing {}", output.display()))?;
            }
            bar.finish_and_clear();
            eprintln!("volume {name}: {} exported", human(total));
        }
        VolumeCommand::Import { name, file } => {
            let mut f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let mut hash = sha2::Sha256::new();
            let len = std::io::copy(&mut f, &mut HashWriter(&mut hash))
                .with_context(|| format!("reading {}", file.display()))?;
            let sha = hex::encode(hash.finalize());
            let bar = progress_bar();
            bar.set_length(len);
            bar.set_message("importing");
            let file = tokio::fs::File::open(&file).await?;
            let counted = bar.clone();
            let stream =
                tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |chunk| {
                    if let Ok(c) = &chunk {
                        counted.inc(c.len() as u64);
                    }
                    chunk
                });
            let res = c
                .volume_archive_put(&name, reqwest::Body::wrap_stream(stream), len, &sha)
                .await;
            bar.finish_and_clear();
            let v = res?;
            if conn.json {
                crate::cli::print_json(&v)?;
            } else {
                eprintln!(
                    "volume {name}: {} entries ({}) imported",
                    v["entries"].as_u64().unwrap_or(0),
                    human(v["bytes"].as_u64().unwrap_or(0))
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

struct HashWriter<'a>(&'a mut sha2::Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
