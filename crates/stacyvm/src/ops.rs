//! Operator commands that work on this machine's files rather than on a
//! server: `config lint`, `doctor`, `db backup|restore`, `upgrade
//! rehearse` and `support bundle` (spec/config-and-cli.md §5–7).

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

/// The operator subcommands, flattened into the top-level command list.
#[derive(Debug, Subcommand)]
pub enum OpsCommand {
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Check that this host can run the configured providers.
    ///
    /// Exits with status 1 when any check fails.
    Doctor(crate::doctor::DoctorArgs),
    /// Back up, restore and check the SQLite database.
    Db {
        #[command(subcommand)]
        command: crate::db::DbCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a config file against the production rules (no host access).
    ///
    /// Exits with status 1 when any check fails; with --production, weak
    /// settings (missing keys, open CORS, no rate limit, …) are failures.
    Lint(crate::lint::LintArgs),
}

pub async fn run(command: OpsCommand) -> Result<ExitCode> {
    match command {
        OpsCommand::Config {
            command: ConfigCommand::Lint(args),
        } => crate::lint::run(&args)?,
        OpsCommand::Doctor(args) => crate::doctor::run(&args).await?,
        OpsCommand::Db { command } => crate::db::run(command).await?,
    }
    Ok(ExitCode::SUCCESS)
}
