//! `stacyvm env …`: environment specs and registry connections through the
//! server's API (`/environments/…`). Builds are not in this release.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use stacyvm_api::{
    CreateEnvironmentSpec, CreateRegistryConnection, EnvironmentSpec, RegistryConnection,
};

use crate::cli::Conn;

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Create an environment spec: a base image and packages.
    #[command(
        after_help = "Example:\n  stacyvm env create web --base-image python:3.12 --pip flask==3.0.3 --apt curl"
    )]
    Create {
        name: String,
        #[arg(long)]
        base_image: String,
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
            python_packages,
            apt_packages,
            python_version,
        } => {
            let s: EnvironmentSpec = c
                .send_json(
                    Method::POST,
                    "/environments/specs",
                    &CreateEnvironmentSpec {
                        name,
                        base_image,
                        python_packages,
                        apt_packages,
                        python_version: python_version.unwrap_or_default(),
                        ..CreateEnvironmentSpec::default()
                    },
                )
                .await?;
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
        EnvCommand::Registry(cmd) => return registry(conn, &c, cmd).await,
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
