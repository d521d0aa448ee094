//! `stacyvm env …`: environment specs, builds and registry connections
//! through the server's API (`/environments/…`).

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use stacyvm_api::{
    Build, BuildEntry, BuildSpawnConfig, CreateBuild, CreateEnvironmentSpec,
    CreateRegistryConnection, EnvironmentSpec, RegistryConnection,
};

use crate::cli::Conn;

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Create an environment spec: a base image and packages, and/or a
    /// Dockerfile (FROM, RUN, ENV, WORKDIR, COPY) with its context dir.
    #[command(
        after_help = "Examples:\n  stacyvm env create web --base-image python:3.12 --pip flask==3.0.3 --apt curl\n  stacyvm env create app --dockerfile ./Dockerfile --context ."
    )]
    Create {
        name: String,
        /// The base image (default: the Dockerfile's FROM).
        #[arg(long, required_unless_present = "dockerfile")]
        base_image: Option<String>,
        /// A Dockerfile of the supported subset, run after the packages.
        #[arg(long)]
        dockerfile: Option<std::path::PathBuf>,
        /// The directory the Dockerfile's COPY reads (uploaded as a tar;
        /// links are kept as links).
        #[arg(long, requires = "dockerfile")]
        context: Option<std::path::PathBuf>,
        /// A pip package (repeatable).
        #[arg(long = "pip")]
        python_packages: Vec<String>,
        /// An apt package (repeatable).
        #[arg(long = "apt")]
        apt_packages: Vec<String>,
        #[arg(long)]
        python_version: Option<String>,
    },
    /// List environment specs.
    #[command(alias = "list")]
    Ls,
    /// Delete an environment spec.
    #[command(alias = "delete")]
    Rm { id: String },
    /// Build a spec into an image (streams the build's log; the image
    /// name is printed on stdout when it is ready).
    #[command(
        after_help = "Examples:\n  stacyvm env build es-0123456789abcdef\n  stacyvm env build es-0123456789abcdef --provider docker --target registry\n  stacyvm spawn --image \"$(stacyvm env build es-0123456789abcdef)\""
    )]
    Build {
        /// The spec's id.
        spec_id: String,
        /// The provider the image is for (default: the server's default).
        #[arg(long)]
        provider: Option<String>,
        /// Push to: ghcr, dockerhub, registry (your default connection of
        /// that kind) or a connection id (repeatable). The provider's own
        /// store always gets the image.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Queue the build and return at once (its id on stdout).
        #[arg(long)]
        detach: bool,
    },
    /// List builds, newest first.
    Builds {
        /// At most this many (1-200).
        #[arg(long, default_value_t = 30)]
        limit: usize,
    },
    /// Show one build (status, step, artifacts; --json for everything).
    Show { build_id: String },
    /// Print a build's log; --follow streams it until the build ends.
    Logs {
        build_id: String,
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Stop a queued or running build.
    Cancel { build_id: String },
    /// Registry connections builds push with.
    #[command(subcommand)]
    Registry(RegistryCommand),
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Add a connection; --secret names a secret the server has
    /// (<data_dir>/secrets/NAME or STACYVM_SECRET_NAME), never the secret.
    #[command(
        after_help = "Example:\n  echo \"$TOKEN\" | sudo tee /var/lib/stacyvm/secrets/REGISTRY_TOKEN >/dev/null\n  stacyvm env registry add registry --host localhost:5000 --username ci --secret REGISTRY_TOKEN"
    )]
    Add {
        /// ghcr, dockerhub or registry.
        provider: String,
        /// registry only: host[:port].
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        username: String,
        /// The NAME of the server secret holding the password or token.
        #[arg(long = "secret")]
        secret_ref: String,
        #[arg(long)]
        default: bool,
    },
    /// List registry connections (never their secrets).
    #[command(alias = "list")]
    Ls,
    /// Delete a registry connection.
    #[command(alias = "delete")]
    Rm { id: String },
}

pub async fn run(conn: &Conn, cmd: EnvCommand) -> Result<ExitCode> {
    let c = stacyvm_client::Client::new(&conn.url, conn.api_key.clone())?;
    match cmd {
        EnvCommand::Create {
            name,
            base_image,
            dockerfile,
            context,
            python_packages,
            apt_packages,
            python_version,
        } => {
            let dockerfile = match &dockerfile {
                Some(p) => std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?,
                None => String::new(),
            };
            let s: EnvironmentSpec = c
                .send_json(
                    Method::POST,
                    "/environments/specs",
                    &CreateEnvironmentSpec {
                        name,
                        base_image: base_image.unwrap_or_default(),
                        dockerfile,
                        python_packages,
                        apt_packages,
                        python_version: python_version.unwrap_or_default(),
                        ..CreateEnvironmentSpec::default()
                    },
                )
                .await?;
            if let Some(dir) = context {
                let bar = crate::image::progress_bar();
                let src = dir.to_string_lossy().to_string();
                let packed = crate::transfer::pack(&src, None, &bar).await?;
                let res = c
                    .spec_context_put(&s.id, packed.body, packed.len, &packed.sha)
                    .await;
                bar.finish_and_clear();
                let v = res?;
                eprintln!(
                    "build context {}: {} entries ({}) uploaded",
                    dir.display(),
                    v["entries"].as_u64().unwrap_or(0),
                    crate::image::human(v["bytes"].as_u64().unwrap_or(0))
                );
            }
            if conn.json {
                crate::cli::print_json(&s)?;
            } else {
                println!("{}", s.id);
                eprintln!("environment spec {} created ({})", s.name, s.id);
            }
        }
        EnvCommand::Ls => {
            let list: Vec<EnvironmentSpec> = c.get_json("/environments/specs").await?;
            if conn.json {
                crate::cli::print_json(&list)?;
            } else {
                println!("{:<20} {:<24} {:<28} PACKAGES", "ID", "NAME", "BASE IMAGE");
                for s in &list {
                    let pkgs: Vec<String> = s
                        .apt_packages
                        .iter()
                        .map(|p| format!("apt:{p}"))
                        .chain(s.python_packages.iter().map(|p| format!("pip:{p}")))
                        .collect();
                    println!(
                        "{:<20} {:<24} {:<28} {}",
                        s.id,
                        s.name,
                        s.base_image,
                        if pkgs.is_empty() {
                            "-".into()
                        } else {
                            pkgs.join(" ")
                        }
                    );
                }
            }
        }
        EnvCommand::Rm { id } => {
            let v = c.delete_json(&format!("/environments/specs/{id}")).await?;
            if conn.json {
                crate::cli::print_json(&v)?;
            } else {
                eprintln!("environment spec {id} deleted");
            }
        }
        EnvCommand::Build {
            spec_id,
            provider,
            targets,
            detach,
        } => {
            let b: Build = c
                .send_json(
                    Method::POST,
                    "/environments/builds",
                    &CreateBuild {
                        spec_id,
                        targets,
                        provider: provider.unwrap_or_default(),
                        ..CreateBuild::default()
                    },
                )
                .await?;
            if detach {
                if conn.json {
                    crate::cli::print_json(&b)?;
                } else {
                    println!("{}", b.id);
                    eprintln!("build {} queued", b.id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            eprintln!("build {} queued; following its log (Ctrl-C leaves it running; `stacyvm env cancel {}` stops it)", b.id, b.id);
            follow_log(&c, &b.id, false).await?;
            let b: Build = c
                .get_json(&format!("/environments/builds/{}", b.id))
                .await?;
            return finish(conn, &c, &b).await;
        }
        EnvCommand::Builds { limit } => {
            let list: Vec<BuildEntry> = c
                .get_json(&format!("/environments/builds?limit={limit}"))
                .await?;
            if conn.json {
                crate::cli::print_json(&list)?;
            } else {
                println!(
                    "{:<36} {:<16} {:<9} {:<9} IMAGE",
                    "ID", "SPEC", "PROVIDER", "STATUS"
                );
                for e in &list {
                    let image = e
                        .build
                        .artifacts
                        .iter()
                        .find(|a| a.target == "local")
                        .map(|a| a.image_ref.as_str())
                        .unwrap_or("-");
                    println!(
                        "{:<36} {:<16} {:<9} {:<9} {}",
                        e.build.id, e.spec.name, e.build.provider, e.build.status, image
                    );
                }
            }
        }
        EnvCommand::Show { build_id } => {
            let b: Build = c
                .get_json(&format!("/environments/builds/{build_id}"))
                .await?;
            if conn.json {
                crate::cli::print_json(&b)?;
            } else {
                println!("build     {}", b.id);
                println!("spec      {}", b.spec_id);
                println!("provider  {}", b.provider);
                println!("status    {} ({})", b.status, b.current_step);
                if !b.error.is_empty() {
                    println!("error     {}", b.error);
                }
                for a in &b.artifacts {
                    println!(
                        "artifact  {:<9} {:<8} {}{}",
                        a.target,
                        a.status,
                        a.image_ref,
                        if a.error.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", a.error)
                        }
                    );
                }
            }
        }
        EnvCommand::Logs { build_id, follow } => {
            follow_log(&c, &build_id, !follow).await?;
        }
        EnvCommand::Cancel { build_id } => {
            let b: Build = c
                .send_json(
                    Method::POST,
                    &format!("/environments/builds/{build_id}/cancel"),
                    &serde_json::json!({}),
                )
                .await?;
            if conn.json {
                crate::cli::print_json(&b)?;
            } else {
                eprintln!("build {} {}", b.id, b.status);
            }
        }
        EnvCommand::Registry(cmd) => return registry(conn, &c, cmd).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// Copies a build's log to stderr from the start (`once`: what there is
/// now; otherwise until the build ends, reconnecting after a dropped
/// connection from where it stopped).
async fn follow_log(c: &stacyvm_client::Client, id: &str, once: bool) -> Result<()> {
    use std::io::Write;
    let mut offset = 0u64;
    let mut retries = 0;
    loop {
        let mut resp = c.build_logs(id, offset, !once).await?;
        let res: Result<()> = async {
            while let Some(chunk) = resp.chunk().await? {
                offset += chunk.len() as u64;
                let mut err = std::io::stderr().lock();
                err.write_all(&chunk)?;
                err.flush()?;
            }
            Ok(())
        }
        .await;
        if once {
            return res;
        }
        let b: Build = c.get_json(&format!("/environments/builds/{id}")).await?;
        if matches!(b.status.as_str(), "ready" | "failed" | "canceled") {
            // What the end wrote after the stream closed.
            let rest = usize::try_from(offset)
                .ok()
                .and_then(|o| b.log.as_bytes().get(o..))
                .unwrap_or_default();
            std::io::stderr().write_all(rest)?;
            return Ok(());
        }
        retries += 1;
        if retries > 30 {
            return res.and_then(|()| Err(anyhow::anyhow!("the log stream keeps closing")));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Reports a finished build: its image on stdout when ready; exit 1 when
/// it failed or was canceled.
async fn finish(conn: &Conn, c: &stacyvm_client::Client, b: &Build) -> Result<ExitCode> {
    if conn.json {
        crate::cli::print_json(b)?;
    }
    if b.status != "ready" {
        eprintln!(
            "build {} {}: {}",
            b.id,
            b.status,
            if b.error.is_empty() { "-" } else { &b.error }
        );
        return Ok(ExitCode::FAILURE);
    }
    let sc: BuildSpawnConfig = c
        .get_json(&format!("/environments/builds/{}/spawn-config", b.id))
        .await?;
    if !conn.json {
        println!("{}", sc.image);
        eprintln!(
            "image {} ready for provider {} (stacyvm spawn --provider {} --image {})",
            sc.image, sc.provider, sc.provider, sc.image
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn registry(
    conn: &Conn,
    c: &stacyvm_client::Client,
    cmd: RegistryCommand,
) -> Result<ExitCode> {
    match cmd {
        RegistryCommand::Add {
            provider,
            host,
            username,
            secret_ref,
            default,
        } => {
            let r: RegistryConnection = c
                .send_json(
                    Method::POST,
                    "/environments/registry-connections",
                    &CreateRegistryConnection {
                        provider,
                        host: host.unwrap_or_default(),
                        username,
                        secret_ref,
                        is_default: default,
                        ..CreateRegistryConnection::default()
                    },
                )
                .await?;
            if conn.json {
                crate::cli::print_json(&r)?;
            } else {
                println!("{}", r.id);
                eprintln!(
                    "registry connection {} added ({} {} as {})",
                    r.id, r.provider, r.host, r.username
                );
            }
        }
        RegistryCommand::Ls => {
            let list: Vec<RegistryConnection> =
                c.get_json("/environments/registry-connections").await?;
            if conn.json {
                crate::cli::print_json(&list)?;
            } else {
                println!(
                    "{:<20} {:<10} {:<28} {:<20} DEFAULT",
                    "ID", "PROVIDER", "HOST", "USERNAME"
                );
                for r in &list {
                    println!(
                        "{:<20} {:<10} {:<28} {:<20} {}",
                        r.id,
                        r.provider,
                        r.host,
                        r.username,
                        if r.is_default { "yes" } else { "" }
                    );
                }
            }
        }
        RegistryCommand::Rm { id } => {
            let v = c
                .delete_json(&format!("/environments/registry-connections/{id}"))
                .await?;
            if conn.json {
                crate::cli::print_json(&v)?;
            } else {
                eprintln!("registry connection {id} deleted");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
