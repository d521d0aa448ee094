//! `stacyvm snapshot …`: snapshots of sandboxes and forks through the
//! server's API (`/sandboxes/{id}/snapshot`, `/fork`, `/snapshots`).

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use stacyvm_api::{ForkRequest, ForkResponse, SnapshotSummary};

use crate::cli::Conn;
use crate::image::human;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a running sandbox (it runs on) and print the snapshot id.
    #[command(
        after_help = "Example:\n  snap=$(stacyvm snapshot create sb-1a2b3c4d)\n  stacyvm spawn --snapshot \"$snap\""
    )]
    Create {
        /// Sandbox id.
        id: String,
    },
    /// Start children of a sandbox, each with its files (and, on qemu, its
    /// memory and processes) and private writes; prints their ids.
    #[command(after_help = "Example:\n  stacyvm snapshot fork sb-1a2b3c4d --count 4")]
    Fork {
        /// Sandbox id.
        id: String,
        /// Children to start (1-16).
        #[arg(long, short = 'n', default_value_t = 1)]
        count: i64,
        /// Time to live of each child, e.g. 30m.
        #[arg(long)]
        ttl: Option<String>,
        /// Keep the snapshot the children start from (default: deleted
        /// once they run).
        #[arg(long)]
        keep: bool,
    },
    /// List the snapshots you can see.
    #[command(alias = "list")]
    Ls,
    /// Show one snapshot.
    Inspect { id: String },
    /// Delete a snapshot (children started from it run on).
    #[command(alias = "delete")]
    Rm { id: String },
}

fn print_table(list: &[SnapshotSummary]) {
    println!(
        "{:<22} {:<12} {:<10} {:>10}  {:<20}  IMAGE",
        "ID", "SOURCE", "PROVIDER", "SIZE", "CREATED"
    );
    for s in list {
        println!(
            "{:<22} {:<12} {:<10} {:>10}  {:<20}  {}",
            if s.id.is_empty() { "-" } else { &s.id },
            if s.source_sandbox_id.is_empty() {
                "-"
            } else {
                &s.source_sandbox_id
            },
            s.provider,
            human(s.size_bytes),
            s.created_at.format("%Y-%m-%d %H:%M:%S"),
            s.image
        );
    }
}

pub async fn run(conn: &Conn, cmd: SnapshotCommand) -> Result<ExitCode> {
    let c = stacyvm_client::Client::new(&conn.url, conn.api_key.clone())?;
    match cmd {
        SnapshotCommand::Create { id } => {
            let s: SnapshotSummary = c
                .send_json(
                    Method::POST,
                    &format!("/sandboxes/{id}/snapshot"),
                    &serde_json::json!({}),
                )
                .await?;
            if conn.json {
                crate::cli::print_json(&s)?;
            } else {
                println!("{}", s.id);
                eprintln!("snapshot {} of {id} taken ({})", s.id, human(s.size_bytes));
            }
        }
        SnapshotCommand::Fork {
            id,
            count,
            ttl,
            keep,
        } => {
            let r: ForkResponse = c
                .send_json(
                    Method::POST,
                    &format!("/sandboxes/{id}/fork"),
                    &ForkRequest {
                        count,
                        ttl: ttl.unwrap_or_default(),
                        keep_snapshot: keep,
                        ..ForkRequest::default()
                    },
                )
                .await?;
            if conn.json {
                crate::cli::print_json(&r)?;
            } else {
                for s in &r.sandboxes {
                    println!("{}", s.id);
                }
                match &r.snapshot {
                    Some(s) => eprintln!(
                        "{} children of {id} started; snapshot {} kept",
                        r.sandboxes.len(),
                        s.id
                    ),
                    None => eprintln!("{} children of {id} started", r.sandboxes.len()),
                }
            }
        }
        SnapshotCommand::Ls => {
            let list: Vec<SnapshotSummary> = c.get_json("/snapshots").await?;
            if conn.json {
                crate::cli::print_json(&list)?;
            } else {
                print_table(&list);
            }
        }
        SnapshotCommand::Inspect { id } => {
            let s: SnapshotSummary = c.get_json(&format!("/snapshots/{id}")).await?;
            if conn.json {
                crate::cli::print_json(&s)?;
            } else {
                print_table(std::slice::from_ref(&s));
            }
        }
        SnapshotCommand::Rm { id } => {
            let v = c.delete_json(&format!("/snapshots/{id}")).await?;
            if conn.json {
                crate::cli::print_json(&v)?;
            } else {
                eprintln!("snapshot {id} deleted");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
