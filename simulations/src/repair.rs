//! The first simulation of the project, kept so that its published figures stay reproducible
//! (`docs/performance.md`, "Offline delivery under churn"): `nodes` always-on nodes form a
//! DHT over loopback TCP; `users` recipients publish their prekey bundle and go offline; one
//! sender per recipient sends it `messages` messages (stored on the replicas closest to the
//! recipient's mailbox) and leaves; then `churn` percent of the always-on nodes die without
//! handing anything over, as many new ones join, and every remaining node runs one repair
//! round; finally the recipients come back one by one. One sender per recipient, because two
//! strangers starting a session from the same DHT bundle may pick the same one-time prekey,
//! which X3DH refuses.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use meshchat_node::{
    storage::{Direction, MessageFilter, Storage},
    Node, NodeConfig, NodeHandle, SendOutcome,
};
use meshchat_protocol::{Identity, PublicIdentity};
use rand::{rngs::OsRng, seq::SliceRandom};
use tempfile::TempDir;

/// How long a recipient may take to collect before its mail counts as lost.
const COLLECT_DEADLINE: Duration = Duration::from_secs(30);

/// The parameters of the run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RepairParams {
    /// Always-on nodes.
    pub(crate) nodes: usize,
    /// Offline recipients.
    pub(crate) users: usize,
    /// Messages each recipient receives.
    pub(crate) messages: usize,
    /// Percent of the always-on nodes that die (and as many that join).
    pub(crate) churn: usize,
}

struct Sim {
    home: TempDir,
    identity: Identity,
    handle: NodeHandle,
    addr: String,
}

fn config(home: &Path, bootstrap: &[String]) -> Result<NodeConfig> {
    let mut config = NodeConfig::new(home);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
    config.bootstrap = bootstrap
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    config.dht_server = true;
    config.send_timeout = Duration::from_millis(500);
    Ok(config)
}

async fn start_in(home: TempDir, identity: Identity, bootstrap: &[String]) -> Result<Sim> {
    let handle = Node::start(config(home.path(), bootstrap)?).await?;
    let addr = handle
        .status()
        .await?
        .listen_addrs
        .into_iter()
        .find(|a| a.contains("/tcp/"))
        .context("no TCP listen address")?;
    Ok(Sim {
        home,
        identity,
        handle,
        addr,
    })
}

async fn start(bootstrap: &[String]) -> Result<Sim> {
    let home = tempfile::tempdir()?;
    let identity = Identity::generate(&mut OsRng);
    Storage::open(home.path())?.save_identity(&identity)?;
    start_in(home, identity, bootstrap).await
}

fn received(storage: &Storage, from: &PublicIdentity) -> Result<usize> {
    Ok(storage
        .messages(&MessageFilter {
            peer: Some(*from),
            direction: Some(Direction::In),
            ..MessageFilter::default()
        })?
        .len())
}

/// Run it, printing progress and `RESULT` lines on stdout.
pub(crate) async fn run(p: RepairParams) -> Result<()> {
    let RepairParams {
        nodes,
        users,
        messages: per_user,
        churn,
    } = p;
    if nodes < 2 || users == 0 || churn > 90 {
        bail!("need --nodes >= 2, --users >= 1, --churn <= 90");
    }

    // The always-on nodes.
    let t = Instant::now();
    let mut servers: Vec<Sim> = Vec::with_capacity(nodes);
    servers.push(start(&[]).await?);
    let mut rng = OsRng;
    for _ in 1..nodes {
        // Bootstrap from the first node and one random earlier one.
        let mut boot = vec![servers[0].addr.clone()];
        if let Some(s) = servers.choose(&mut rng) {
            boot.push(s.addr.clone());
        }
        servers.push(start(&boot).await?);
    }
    let boot = vec![servers[0].addr.clone()];
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("{nodes} nodes up in {:.1?}", t.elapsed());

    // Recipients publish their bundle, then go offline.
    let mut away: Vec<(TempDir, Identity)> = Vec::new();
    for _ in 0..users {
        let u = start(&boot).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !u.handle.publish_records().await?.bundle_published {
            if Instant::now() > deadline {
                bail!("a recipient could not publish its bundle");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        u.handle.shutdown().await;
        let Sim { home, identity, .. } = u;
        away.push((home, identity));
    }

    // Senders: one per recipient, `per_user` messages each, then they leave.
    let mut senders = Vec::new();
    let mut stored = 0usize;
    let mut replicas = Vec::new();
    for (_, to) in &away {
        let s = start(&boot).await?;
        for n in 0..per_user {
            let report = s
                .handle
                .send_text(to.public(), format!("offline hello {n}"))
                .await?;
            match report.outcome {
                SendOutcome::Stored { replicas: n } => {
                    stored += 1;
                    replicas.push(n);
                }
                other => println!("a send ended {other:?}"),
            }
        }
        s.handle.shutdown().await;
        senders.push(s.identity.public());
    }
    let sent = users * per_user;
    println!(
        "{sent} messages sent, {stored} stored (replicas per message: min {}, max {})",
        replicas.iter().min().copied().unwrap_or(0),
        replicas.iter().max().copied().unwrap_or(0)
    );

    // Churn: some always-on nodes die abruptly (never the first, the bootstrap), as many join,
    // and the survivors repair.
    let dying = nodes * churn / 100;
    let mut order: Vec<usize> = (1..servers.len()).collect();
    order.shuffle(&mut rng);
    let mut doomed: Vec<usize> = order.into_iter().take(dying).collect();
    doomed.sort_unstable_by(|a, b| b.cmp(a));
    for i in doomed {
        let s = servers.remove(i);
        s.handle.shutdown_abruptly().await;
    }
    for _ in 0..dying {
        let s = start(&boot).await?;
        servers.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    let mut copies = 0;
    for s in &servers {
        copies += s.handle.repair_mailboxes().await;
    }
    println!(
        "churn: {dying} nodes died, {dying} joined; repair made {copies} new copies in {:.1?}",
        t.elapsed()
    );

    // The recipients come back, one by one.
    let mut delivered = 0usize;
    let mut times = Vec::new();
    for ((home, identity), from) in away.into_iter().zip(senders) {
        let started = Instant::now();
        let u = start_in(home, identity, &boot).await?;
        let got = loop {
            let storage = u.handle.storage().clone();
            let got = tokio::task::spawn_blocking(move || received(&storage, &from)).await??;
            if got >= per_user || started.elapsed() > COLLECT_DEADLINE {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let took = started.elapsed();
        delivered += got;
        if got >= per_user {
            times.push(took);
        }
        println!("recipient back: {got}/{per_user} messages after {took:.2?}");
        u.handle.shutdown().await;
    }
    times.sort();
    let share = delivered as f64 / sent as f64 * 100.0;
    println!(
        "RESULT nodes={nodes} churn={churn}% messages={sent} delivered={delivered} ({share:.1}%)"
    );
    if !times.is_empty() {
        println!(
            "RESULT time from recipient start to holding all its mail: median {:.0?}, max {:.0?}",
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
    for s in &servers {
        s.handle.shutdown_abruptly().await;
    }
    Ok(())
}
