//! Progress on the waits a person notices (starting a node, reaching the network, sending,
//! waiting for mail), on stderr: a spinner when stderr is a terminal, one plain line per step
//! otherwise, nothing at all with `--json` or `-q`. See `docs/cli.md`, section "Progress".

use std::{io::IsTerminal, time::Duration};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One wait in progress.
#[derive(Debug)]
pub(crate) struct Progress {
    spinner: Option<ProgressBar>,
    enabled: bool,
}

impl Progress {
    /// Announce a wait (nothing if `enabled` is false).
    pub(crate) fn start(enabled: bool, message: impl Into<String>) -> Progress {
        let message = message.into();
        if !enabled {
            return Progress {
                spinner: None,
                enabled,
            };
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {elapsed:.dim}") {
                bar.set_style(style);
            }
            bar.set_message(message);
            bar.enable_steady_tick(Duration::from_millis(100));
            Progress {
                spinner: Some(bar),
                enabled,
            }
        } else {
            eprintln!("{message}");
            Progress {
                spinner: None,
                enabled,
            }
        }
    }

    /// The wait goes on with a new description.
    pub(crate) fn step(&self, message: impl Into<String>) {
        if !self.enabled {
            return;
        }
        match &self.spinner {
            Some(bar) => bar.set_message(message.into()),
            None => eprintln!("{}", message.into()),
        }
    }

    /// The wait is over; `outcome`, if any, stays on stderr as a line.
    pub(crate) fn finish(self, outcome: Option<&str>) {
        if let Some(bar) = &self.spinner {
            bar.finish_and_clear();
        }
        if let (true, Some(line)) = (self.enabled, outcome) {
            eprintln!("{line}");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.spinner {
            bar.finish_and_clear();
        }
    }
}
