//! Text generated from the clap definition of the command line: shell completion scripts
//! (`meshchat completions SHELL`, clap_complete) and the manual page (`meshchat man`,
//! clap_mangen). See `docs/cli.md`, sections "completions" and "man".

use std::io::Write;

use clap::CommandFactory;

use crate::{
    args::Cli,
    exit::{self, Failure},
};

/// Print the completion script for `shell` on stdout.
pub(crate) fn completions(shell: clap_complete::Shell) -> Result<u8, Failure> {
    let mut cmd = Cli::command();
    // Into a buffer first: clap_complete panics when its writer fails (`| head`).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "meshchat", &mut script);
    write_stdout(&script)
}

/// Write `bytes` to stdout; a reader that went away (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> Result<u8, Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(exit::OK),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(exit::OK),
        Err(e) => Err(Failure::new(exit::GENERIC, "internal", e.to_string())),
    }
}

/// Print the manual page (roff) on stdout: name, synopsis, description, global options, the list
/// of subcommands, then a COMMANDS section with every subcommand's usage, description and
/// arguments (nested ones too), and the version.
pub(crate) fn man() -> Result<u8, Failure> {
    let io = |e: std::io::Error| Failure::new(exit::GENERIC, "internal", e.to_string());
    let cmd = Cli::command();
    let page = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    page.render_title(&mut out).map_err(io)?;
    page.render_name_section(&mut out).map_err(io)?;
    page.render_synopsis_section(&mut out).map_err(io)?;
    page.render_description_section(&mut out).map_err(io)?;
    page.render_options_section(&mut out).map_err(io)?;
    page.render_subcommands_section(&mut out).map_err(io)?;
    out.extend_from_slice(b".SH COMMANDS\n");
    for sub in cmd.get_subcommands() {
        commands_section(&mut out, "meshchat", sub);
    }
    page.render_version_section(&mut out).map_err(io)?;
    write_stdout(&out)
}

/// Text for roff: backslashes and dashes escaped, no line starting with a control character.
fn roff_text(s: &str) -> String {
    let escaped = s.replace('\\', "\\e").replace('-', "\\-");
    escaped
        .lines()
        .map(|l| {
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One subcommand as `.SS usage`, its description, and a `.TP` per argument.
fn commands_section(out: &mut Vec<u8>, parent: &str, sub: &clap::Command) {
    let name = format!("{parent} {}", sub.get_name());
    let mut usage_cmd = sub.clone().bin_name(&name).disable_help_flag(true);
    let usage = usage_cmd.render_usage().to_string();
    let usage = usage.trim().trim_start_matches("Usage:").trim().to_owned();
    let mut text = format!(".SS \"{}\"\n", roff_text(&usage).replace('"', "\\(dq"));
    if let Some(about) = sub.get_long_about().or(sub.get_about()) {
        text.push_str(&format!("{}\n", roff_text(&about.to_string())));
    }
    for arg in sub.get_arguments() {
        if arg.is_hide_set() || arg.is_global_set() {
            continue;
        }
        let id = arg.get_id().as_str();
        if id == "help" || id == "version" {
            continue;
        }
        let head = match (arg.get_long(), arg.get_short()) {
            (Some(l), Some(s)) => format!("\\fB\\-{s}\\fR, \\fB\\-\\-{}\\fR", roff_text(l)),
            (Some(l), None) => format!("\\fB\\-\\-{}\\fR", roff_text(l)),
            (None, Some(s)) => format!("\\fB\\-{s}\\fR"),
            (None, None) => format!("\\fI{}\\fR", id.to_uppercase()),
        };
        let value = match (
            arg.get_long().is_some() || arg.get_short().is_some(),
            arg.get_action().takes_values(),
        ) {
            (true, true) => arg
                .get_value_names()
                .and_then(|v| v.first())
                .map(|v| format!(" \\fI{}\\fR", roff_text(v.as_str())))
                .unwrap_or_default(),
            _ => String::new(),
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| roff_text(&h.to_string()))
            .unwrap_or_default();
        text.push_str(&format!(".TP\n{head}{value}\n{help}\n"));
    }
    out.extend_from_slice(text.as_bytes());
    for nested in sub.get_subcommands() {
        if nested.get_name() != "help" {
            commands_section(out, &name, nested);
        }
    }
}
