//! `stacyvm image import|ls|rm`: the native provider's local image store
//! under `<server.data_dir>/native/images`. A running server sees changes
//! immediately.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use comfy_table::{presets, Table};
use indicatif::{ProgressBar, ProgressStyle};
use stacyvm_core::config;
use stacyvm_providers::image::ImageStore;

use crate::cli::ImageCommand;

fn store(cfg: &config::Config) -> Result<ImageStore> {
    let data = PathBuf::from(&cfg.server.data_dir);
    let root = data.join("native").join("images");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    Ok(ImageStore::new(
        root,
        std::slice::from_ref(&cfg.server.data_dir),
    )?)
}

pub(crate) fn human(bytes: u64) -> String {
    let mut v = bytes as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if v < 1024.0 {
            return format!("{v:.1} {unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.1} TiB")
}

/// A byte progress bar on a terminal, nothing otherwise.
pub(crate) fn progress_bar() -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:16} [{bar:30}] {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Reports an imported image: summary on stderr, id on stdout.
fn done(rec: &stacyvm_providers::image::ImageRecord) {
    eprintln!(
        "imported {} ({} layers, {})",
        rec.names.join(", "),
        rec.layers,
        human(rec.size_bytes)
    );
    #[allow(clippy::print_stdout)]
    {
        println!("{}", rec.id);
    }
}

pub async fn run(config_path: Option<PathBuf>, cmd: ImageCommand) -> Result<()> {
    let cfg = config::load(config_path.as_deref(), std::env::vars())?.config;
    let store = store(&cfg)?;
    match cmd {
        ImageCommand::Import { file, docker, name } => {
            let bar = progress_bar();
            let mut report = |done: u64, total: u64, what: &str| {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(what.to_string());
            };
            let rec = match (file, docker) {
                (_, Some(image)) => stacyvm_providers::image::pull::import_from_docker(
                    &store,
                    &image,
                    name.as_deref(),
                    &mut report,
                )
                .await
                .with_context(|| format!("importing {image} from Docker"))?,
                (Some(file), None) => store
                    .import(&file, name.as_deref(), &mut report)
                    .with_context(|| format!("importing {}", file.display()))?,
                (None, None) => anyhow::bail!("give an archive file or --docker IMAGE"),
            };
            bar.finish_and_clear();
            done(&rec);
        }
        ImageCommand::Pull {
            reference,
            docker: true,
            ..
        } => {
            let bar = progress_bar();
            let mut report = |done: u64, total: u64, status: &str| {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(status.chars().take(16).collect::<String>());
            };
            let id = stacyvm_providers::docker::pull_into_engine(
                &cfg.providers.docker,
                &reference,
                &mut report,
            )
            .await
            .with_context(|| format!("pulling {reference} into the Docker engine"))?;
            bar.finish_and_clear();
            eprintln!("pulled {reference} into the Docker engine");
            #[allow(clippy::print_stdout)]
            {
                println!("{id}");
            }
        }
        ImageCommand::Pull {
            reference,
            name,
            insecure,
            docker: false,
        } => {
            let bar = progress_bar();
            let mut report = |done: u64, total: u64, what: &str| {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(what.to_string());
            };
            let credentials = match (
                std::env::var("STACYVM_REGISTRY_USERNAME"),
                std::env::var("STACYVM_REGISTRY_PASSWORD"),
            ) {
                (Ok(u), Ok(p)) if !u.is_empty() => Some((u, p)),
                _ => None,
            };
            let opts = stacyvm_providers::image::pull::PullOptions {
                insecure,
                credentials,
                name,
            };
            let rec = stacyvm_providers::image::pull::pull_registry(
                &store,
                &reference,
                &opts,
                &mut report,
            )
            .await
            .with_context(|| format!("pulling {reference}"))?;
            bar.finish_and_clear();
            done(&rec);
        }
        ImageCommand::Ls { json } => {
            let list = store.list();
            #[allow(clippy::print_stdout)]
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut t = Table::new();
                t.load_preset(presets::NOTHING);
                t.set_header(["NAME", "ID", "LAYERS", "SIZE", "IMPORTED"]);
                t.add_row([
                    "host".to_string(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "built in (host /usr and /etc, read-only)".into(),
                ]);
                for r in list {
                    t.add_row([
                        r.names.join(", "),
                        r.id.chars().take(19).collect(),
                        r.layers.to_string(),
                        human(r.size_bytes),
                        r.imported_at,
                    ]);
                }
                println!("{t}");
            }
        }
        ImageCommand::Kernel => {
            eprintln!("installing the microVM guest kernel (apt-get download, once) …");
            let (k, initrd) = tokio::task::spawn_blocking(move || {
                stacyvm_providers::microvm::setup::install(&cfg)
            })
            .await??;
            println!("kernel     {}", k.vmlinuz.display());
            for m in &k.modules {
                println!("module     {}", m.display());
            }
            println!("initramfs  {}", initrd.display());
        }
        ImageCommand::Rm { image } => {
            let rec = store.remove(&image)?;
            eprintln!("removed {} ({})", rec.names.join(", "), rec.id);
        }
    }
    Ok(())
}
