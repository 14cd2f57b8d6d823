//! The files a run leaves in its output folder: `messages.csv` (one row per message),
//! `nodes.csv` (every node start and stop), `summary.txt` (the table printed on stdout),
//! `latency.svg` and `delivery.svg`. See `docs/performance.md`, "Simulations".

use std::{
    fs::{self, File},
    io::{BufWriter, Write},
    path::Path,
    time::Duration,
};

use crate::{
    journal::{self, NodeChange},
    plot,
    scenario::Outcome,
};

/// Writing the output folder failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// A file could not be written.
    #[error("writing {file}: {source}")]
    Io {
        /// Which file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// A figure could not be drawn.
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
}

fn io(file: &Path) -> impl Fn(std::io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        file: file.display().to_string(),
        source,
    }
}

/// Write every file of `outcome` into `dir` (created if missing); `bucket` is the time step
/// of the delivery-over-time figure.
pub fn write(outcome: &Outcome, dir: &Path, bucket: Duration) -> Result<(), OutputError> {
    fs::create_dir_all(dir).map_err(io(dir))?;

    let file = dir.join("messages.csv");
    let mut w = BufWriter::new(File::create(&file).map_err(io(&file))?);
    journal::write_csv(&outcome.records, &mut w).map_err(io(&file))?;
    w.flush().map_err(io(&file))?;

    let file = dir.join("nodes.csv");
    let mut w = BufWriter::new(File::create(&file).map_err(io(&file))?);
    writeln!(w, "time_ms,node,change").map_err(io(&file))?;
    for (at, node, change) in &outcome.changes {
        let name = match change {
            NodeChange::Up => "up",
            NodeChange::Down => "down",
            NodeChange::Crashed => "crashed",
        };
        writeln!(w, "{:.3},{node},{name}", at.as_secs_f64() * 1000.0).map_err(io(&file))?;
    }
    w.flush().map_err(io(&file))?;

    let file = dir.join("summary.txt");
    fs::write(&file, outcome.summary.to_string()).map_err(io(&file))?;

    let s = &outcome.summary;
    let title = format!("{}: {} nodes, seed {}", s.scenario, s.nodes, s.seed);
    plot::latency_cdf(
        &outcome.records,
        &format!("latency, {title}"),
        &dir.join("latency.svg"),
    )?;
    plot::delivery_over_time(
        &outcome.records,
        &outcome.changes,
        s.nodes,
        &outcome.marks,
        bucket,
        &format!("delivery, {title}"),
        &dir.join("delivery.svg"),
    )?;
    Ok(())
}
