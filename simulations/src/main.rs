//! `meshchat-sim`: run one scenario of many real meshchat nodes in this process and write its
//! figures. See the crate documentation and `docs/performance.md`, "Simulations".
//!
//! ```text
//! cargo run --release -p meshchat-simulations -- steady --nodes 1000 --seed 1 --out sim-out/steady
//! cargo run --release -p meshchat-simulations -- churn --nodes 1000 --churn 30 --seed 1
//! ```

use std::{path::PathBuf, time::Duration};

mod repair;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use meshchat_simulations::{output, run, sys, ClusterConfig, Kind, Params, Transport};

/// One heap serves every node of a run: mimalloc keeps it compact and uncontended where glibc's
/// allocator spent a third of the CPU searching fragmented bins at 200 nodes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run real meshchat nodes in one process through a scenario; print a summary and write
/// messages.csv, nodes.csv, summary.txt, latency.svg and delivery.svg.
#[derive(Debug, Parser)]
#[command(name = "meshchat-sim", version)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Every node stays up; messages between contacts.
    Steady {
        #[command(flatten)]
        common: Common,
    },
    /// A share of the nodes leaves every minute, and each comes back later.
    Churn {
        #[command(flatten)]
        common: Common,
        /// Percent of the nodes that leave per minute (as many return).
        #[arg(long, default_value_t = 30.0)]
        churn: f64,
        /// Seconds a node stays away (default: one minute).
        #[arg(long)]
        offline: Option<f64>,
        /// Percent of the departures that are crashes (no hand-over of mailbox replicas).
        #[arg(long, default_value_t = 50.0)]
        crash: f64,
    },
    /// The nodes split into two halves that cannot reach each other, then heal.
    Partition {
        #[command(flatten)]
        common: Common,
        /// Seconds after the traffic starts when the network splits (default: a quarter of
        /// the duration).
        #[arg(long)]
        split_at: Option<f64>,
        /// Seconds the partition lasts (default: half the duration).
        #[arg(long)]
        length: Option<f64>,
    },
    /// The first simulation (docs/performance.md, "Offline delivery under churn"): offline
    /// recipients, mail stored on replicas, replicas die, repair, recipients return; over TCP.
    Repair {
        /// Always-on nodes.
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        /// Offline recipients.
        #[arg(long, default_value_t = 20)]
        users: usize,
        /// Messages each recipient receives.
        #[arg(long, default_value_t = 3)]
        messages: usize,
        /// Percent of the always-on nodes that die (as many join).
        #[arg(long, default_value_t = 20)]
        churn: usize,
    },
    /// One large group: members join by invitation, then random members write to it.
    Group {
        #[command(flatten)]
        common: Common,
        /// Members (default: every node).
        #[arg(long)]
        members: Option<usize>,
    },
    /// Group channels against bare gossipsub of the same shape, in this process: delivery
    /// ratio and time until every member has a message (docs/performance.md, "Groups").
    GroupBench {
        #[command(flatten)]
        args: meshchat_simulations::group_bench::GroupBenchArgs,
    },
    /// A share of the users go offline, receive mail, and all come back at once.
    Burst {
        #[command(flatten)]
        common: Common,
        /// Percent of the nodes that go away (one per conversation at most).
        #[arg(long, default_value_t = 20.0)]
        share: f64,
        /// Messages each of them receives while away.
        #[arg(long, default_value_t = 5)]
        messages: usize,
        /// Seconds they stay away after their mail was sent (default: one minute).
        #[arg(long)]
        away: Option<f64>,
    },
}

#[derive(Debug, Args)]
struct Common {
    /// Nodes (users) in the network.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Seed of identities, pairs, traffic and churn.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output folder (default: sim-out/SCENARIO-NODES-SEED).
    #[arg(long)]
    out: Option<PathBuf>,
    /// How nodes connect: memory (in-process, no file descriptor per connection) or tcp
    /// (127.0.0.1).
    #[arg(long, value_enum, default_value_t = Transport::Memory)]
    transport: Transport,
    /// Where the temporary folder of node homes goes (default: the system's temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Measured messages per second over the whole network.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Seconds of measured traffic.
    #[arg(long, default_value_t = 120.0)]
    duration: f64,
    /// Longest wait in seconds, with every node back, for messages still on their way.
    #[arg(long, default_value_t = 180.0)]
    drain: f64,
    /// Seconds in a "minute": the nodes' mail-collection and mailbox-repair interval, and the
    /// unit of churn rates (60 in a real node).
    #[arg(long, default_value_t = 60.0)]
    minute: f64,
    /// Milliseconds `send` tries to reach the recipient directly before storing in its mailbox.
    #[arg(long, default_value_t = 2000)]
    send_timeout_ms: u64,
    /// Sends in flight at most.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Nodes started at once while the network starts.
    #[arg(long, default_value_t = 8)]
    parallel_start: usize,
    /// Random running nodes a (re)starting node bootstraps from.
    #[arg(long, default_value_t = 3)]
    bootstrap_peers: usize,
    /// Seconds after which an idle connection is closed (default: the node's, 60).
    #[arg(long)]
    idle_timeout: Option<f64>,
    /// Log level of the nodes (RUST_LOG syntax), to stderr.
    #[arg(long, default_value = "warn,meshchat_simulations=info")]
    log: String,
}

fn secs(s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("{s} is not a duration in seconds"))
}

impl Common {
    fn params(&self) -> Result<Params> {
        Ok(Params {
            nodes: self.nodes,
            seed: self.seed,
            cluster: ClusterConfig {
                transport: self.transport,
                dir: self.dir.clone(),
                send_timeout: Duration::from_millis(self.send_timeout_ms),
                minute: secs(self.minute)?,
                bootstrap_peers: self.bootstrap_peers,
                idle_timeout: self.idle_timeout.map(secs).transpose()?,
            },
            rate: self.rate,
            duration: secs(self.duration)?,
            drain: secs(self.drain)?,
            parallel_start: self.parallel_start,
            max_in_flight: self.max_in_flight,
            settle: Duration::from_secs(120),
        })
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")
    };
    let (common, kind) = match &cli.scenario {
        Scenario::Repair {
            nodes,
            users,
            messages,
            churn,
        } => {
            return runtime()?.block_on(repair::run(repair::RepairParams {
                nodes: *nodes,
                users: *users,
                messages: *messages,
                churn: *churn,
            }))
        }
        Scenario::GroupBench { args } => {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log))
                .with_writer(std::io::stderr)
                .init();
            let params = args.params()?;
            let outcome = runtime()?.block_on(meshchat_simulations::group_bench::run(params))?;
            println!("{outcome}");
            return Ok(());
        }
        Scenario::Steady { common } => (common, Kind::Steady),
        Scenario::Churn {
            common,
            churn,
            offline,
            crash,
        } => (
            common,
            Kind::Churn {
                percent_per_minute: *churn,
                offline: secs(offline.unwrap_or(common.minute))?,
                crash_percent: *crash,
            },
        ),
        Scenario::Partition {
            common,
            split_at,
            length,
        } => (
            common,
            Kind::Partition {
                split_at: secs(split_at.unwrap_or(common.duration / 4.0))?,
                length: secs(length.unwrap_or(common.duration / 2.0))?,
            },
        ),
        Scenario::Group { common, members } => (
            common,
            Kind::Group {
                members: members.unwrap_or(common.nodes),
            },
        ),
        Scenario::Burst {
            common,
            share,
            messages,
            away,
        } => (
            common,
            Kind::Burst {
                percent: *share,
                messages: *messages,
                away: secs(away.unwrap_or(common.minute))?,
            },
        ),
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&common.log))
        .with_writer(std::io::stderr)
        .init();
    let params = common.params()?;
    if params.cluster.transport == Transport::Tcp {
        // Two descriptors per connection inside one process, plus the databases.
        if let Some(limit) = sys::fd_limit() {
            let need = params.nodes as u64 * 60;
            if limit < need {
                eprintln!(
                    "warning: {} nodes over TCP may need ~{need} open files; the limit is {limit} (use --transport memory or raise `ulimit -n`)",
                    params.nodes
                );
            }
        }
    }
    let out = common.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "sim-out/{}-{}-{}",
            kind.name(),
            params.nodes,
            params.seed
        ))
    });
    let bucket = params
        .cluster
        .minute
        .mul_f64(0.25)
        .max(Duration::from_secs(1));
    let outcome = runtime()?.block_on(run(params, kind))?;
    println!("{}", outcome.summary);
    output::write(&outcome, &out, bucket)?;
    println!("wrote {}", out.display());
    if outcome.summary.total.sent == 0 {
        bail!("no message was sent");
    }
    Ok(())
}
