#![doc = include_str!("../README.md")]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod args;
mod chat;
mod commands;
mod config;
mod conn;
mod demo;
mod exit;
mod generate;
mod group;
mod output;
mod progress;
mod qr;
mod serve;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::{args::Cli, exit::Failure};

/// Logs go to stderr. -q silences them; otherwise `--log-level`, else the level chosen by -v,
/// else MESHCHAT_LOG / RUST_LOG, else the file's `log_level`, else warnings only.
pub(crate) fn init_tracing(quiet: bool, verbose: u8, level: &config::Setting<Option<String>>) {
    if quiet {
        return;
    }
    let by_verbose = match verbose {
        0 => "error,meshchat=warn,meshchat_node=warn",
        1 => "warn,meshchat=info,meshchat_node=info",
        2 => "info,meshchat=debug,meshchat_node=debug",
        _ => "debug,meshchat=trace,meshchat_node=trace",
    };
    let chosen = match (&level.value, level.source) {
        (Some(l), config::Source::Flag) => l.as_str(),
        _ if verbose > 0 => by_verbose,
        (Some(l), _) => l.as_str(),
        (None, _) => by_verbose,
    };
    let filter = EnvFilter::try_new(chosen).unwrap_or_else(|_| EnvFilter::new(by_verbose));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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

/// A command line clap refused: its own message on stderr (and, with `--json`, one JSON error
/// line on stdout), exit code 2. Help and version go to stdout with exit code 0.
fn parse_failure(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::from(exit::OK);
    }
    if std::env::args_os().any(|a| a == "--json") {
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or_default();
        let message = first.strip_prefix("error: ").unwrap_or(first);
        println!(
            "{}",
            serde_json::json!({ "error": "invalid_input", "message": message })
        );
    }
    let _ = e.print();
    ExitCode::from(exit::USAGE)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_failure(&e),
    };
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
