//! Local operator commands: `config lint`, `doctor`, `db backup|restore|
//! check|pg-backup`, `upgrade rehearse` and `support bundle`
//! (spec/config-and-cli.md §5–7). They read this machine's config and
//! files; only `support bundle --include-server` talks to a server.

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
    /// Prepare upgrades.
    Upgrade {
        #[command(subcommand)]
        command: UpgradeCommand,
    },
    /// Collect diagnostics for a bug report, with secrets redacted.
    Support {
        #[command(subcommand)]
        command: SupportCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum UpgradeCommand {
    /// Check everything an upgrade depends on, without changing anything.
    ///
    /// Runs the production config lint, checks the database (integrity,
    /// schema version) and applies this build's migrations to a scratch
    /// copy, checks the planned backup path, optionally runs doctor, and
    /// prints the recommended upgrade steps. Exits 1 on any failure.
    Rehearse(crate::upgrade::RehearseArgs),
}

#[derive(Debug, Subcommand)]
pub enum SupportCommand {
    /// Write a redacted JSON bundle: version, platform, effective config,
    /// production lint, optionally doctor and server diagnostics.
    ///
    /// Every secret of the config and environment, and the API key used
    /// for --include-server, is removed before the file is written (0600).
    #[command(
        after_help = "Example:\n  stacyvm support bundle /tmp/stacyvm-support.json --include-doctor --include-server"
    )]
    Bundle(crate::support::BundleArgs),
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
        OpsCommand::Upgrade {
            command: UpgradeCommand::Rehearse(args),
        } => crate::upgrade::run(&args).await?,
        OpsCommand::Support {
            command: SupportCommand::Bundle(args),
        } => crate::support::run(&args).await?,
        OpsCommand::Db { command } => crate::db::run(command).await?,
    }
    Ok(ExitCode::SUCCESS)
}
