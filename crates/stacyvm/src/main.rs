//! `stacyvm`: the server (`serve`) and the command-line client.

#![allow(clippy::print_stdout)]

mod checks;
mod cli;
mod db;
mod docs;
mod doctor;
mod env;
mod image;
mod install;
mod interactive;
mod lint;
mod ops;
mod pgrehearse;
mod redact;
mod serve;
mod snapshot;
mod support;
mod transfer;
mod tui;
mod upgrade;
mod volume;
mod webui;
mod worker;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
