#![doc = include_str!("../README.md")]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod args;
mod commands;
mod conn;
mod exit;
mod output;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::{args::Cli, exit::Failure};

/// Logs go to stderr: RUST_LOG if set, else a level chosen by -v; -q silences them.
fn init_tracing(cli: &Cli) {
    if cli.quiet {
        return;
    }
    let default = match cli.verbose {
        0 => "error,meshchat=warn,meshchat_node=warn",
        1 => "warn,meshchat=info,meshchat_node=info",
        2 => "info,meshchat=debug,meshchat_node=debug",
        _ => "debug,meshchat=trace,meshchat_node=trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn report(failure: &Failure, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({ "error": failure.kind, "message": failure.message })
        );
    }
    eprintln!("error: {}", failure.message);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli);
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::GENERIC);
        }
    };
    let result = runtime.block_on(commands::run(cli));
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            report(&failure, json);
            ExitCode::from(failure.code)
        }
    }
}
