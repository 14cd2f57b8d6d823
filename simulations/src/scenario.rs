//! The scenarios: steady state, churn, a partition that heals, a burst of offline recipients
//! returning at once (and a large group once group channels exist). Each starts a
//! [`Cluster`], pairs the users into conversations, opens the sessions (warm-up), runs its
//! measured traffic, waits for the stragglers, and returns the journal's records and a
//! [`Summary`]. See `docs/performance.md`, "Simulations", for what each one shows.
//!
//! ```text
//! start N nodes ─► DHT forms ─► pairs become contacts ─► warm-up (hello, reply)
//!   ─► measured traffic (Poisson, R msgs/s, random pair, random direction)
//!        + the scenario's events (churn / partition / burst)
//!   ─► every node back ─► drain (until all arrived, or the drain limit) ─► records, summary
//! ```
//!
//! The seed fixes the identities, the pairs, who sends when, and who leaves and joins when;
//! the timings of the network itself vary from run to run.
//!
//! Time: every interval of the node that matters here (mail collection, mailbox repair) is a
//! configuration knob, set to the scenario's "minute" so that a run of a few minutes of wall
//! time covers many repair rounds. A paused tokio clock is not used: libp2p's own timers
//! (`futures-timer`: Kademlia, identify, ping, idle connections) do not follow it, message and
//! record expiry and the daily epochs read the system clock, and auto-advance would fire every
//! timeout while real I/O is in flight.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use futures::StreamExt;
use rand::{seq::SliceRandom, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};

use crate::{
    cluster::{Cluster, ClusterConfig, ClusterError, Progress, PROGRESS_EVERY},
    journal::{Journal, MessageRecord, SendResult},
    report::{self, Summary},
    sys,
};

/// Contacts made and records published at once while the scenario sets up.
const SETUP_PARALLEL: usize = 32;

/// The harness parameters every scenario shares.
#[derive(Debug, Clone)]
pub struct Params {
    /// Nodes in the cluster (each one user).
    pub nodes: usize,
    /// Seed of everything the harness chooses.
    pub seed: u64,
    /// How the nodes are set up.
    pub cluster: ClusterConfig,
    /// Measured messages per second, over the whole network.
    pub rate: f64,
    /// Length of the measured traffic.
    pub duration: Duration,
    /// Longest wait, after the traffic and with every node back, for messages still on their
    /// way.
    pub drain: Duration,
    /// Nodes started at once while the cluster starts.
    pub parallel_start: usize,
    /// Sends in flight at once, at most.
    pub max_in_flight: usize,
    /// Longest wait for the DHT to form before the traffic starts.
    pub settle: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            nodes: 100,
            seed: 1,
            cluster: ClusterConfig::default(),
            rate: 10.0,
            duration: Duration::from_secs(120),
            drain: Duration::from_secs(180),
            parallel_start: 8,
            max_in_flight: 256,
            settle: Duration::from_secs(60),
        }
    }
}

/// Which scenario, with its own parameters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Kind {
    /// Every node stays up.
    Steady,
    /// Nodes leave and come back throughout the traffic.
    Churn {
        /// Share of the nodes that leave per minute (percent); as many come back.
        percent_per_minute: f64,
        /// How long a node that left stays away.
        offline: Duration,
        /// Share of the departures that are crashes (no hand-over of mailbox replicas),
        /// percent; the others shut down cleanly.
        crash_percent: f64,
    },
    /// The network splits into two random halves that cannot reach each other, then heals.
    Partition {
        /// When the split happens, after the traffic starts.
        split_at: Duration,
        /// How long it lasts.
        length: Duration,
    },
    /// One large group: members join by invitation, then random members write to it.
    Group {
        /// Members (the first node creates the group and invites the others).
        members: usize,
    },
    /// A share of the users go offline, their contacts write to them, and they all come back
    /// at the same moment.
    Burst {
        /// Share of the nodes that go offline (percent; at most one per conversation).
        percent: f64,
        /// Messages each of them receives while away.
        messages: usize,
        /// How long they stay away after the last of those messages was sent.
        away: Duration,
    },
}

impl Kind {
    /// The scenario's name.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Steady => "steady",
            Kind::Churn { .. } => "churn",
            Kind::Partition { .. } => "partition",
            Kind::Burst { .. } => "burst",
            Kind::Group { .. } => "group",
        }
    }

    fn params(&self) -> Vec<(String, String)> {
        let s = |d: &Duration| format!("{:.1}s", d.as_secs_f64());
        match self {
            Kind::Steady => Vec::new(),
            Kind::Churn {
                percent_per_minute,
                offline,
                crash_percent,
            } => vec![
                ("churn_per_minute".into(), format!("{percent_per_minute}%")),
                ("offline".into(), s(offline)),
                ("crashes".into(), format!("{crash_percent}%")),
            ],
            Kind::Group { members } => vec![("members".into(), members.to_string())],
            Kind::Partition { split_at, length } => vec![
                ("split_at".into(), s(split_at)),
                ("length".into(), s(length)),
            ],
            Kind::Burst {
                percent,
                messages,
                away,
            } => vec![
                ("offline_share".into(), format!("{percent}%")),
                ("messages_each".into(), messages.to_string()),
                ("away".into(), s(away)),
            ],
        }
    }
}

/// What a scenario failed on (not a low delivery ratio: that is a result).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The cluster could not be run.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The parameters make no sense.
    #[error("bad parameters: {0}")]
    Params(String),
}

/// The result of a run.
#[derive(Debug)]
pub struct Outcome {
    /// The figures.
    pub summary: Summary,
    /// One record per message (warm-up included, marked).
    pub records: Vec<MessageRecord>,
    /// Node ups and downs, with their times.
    pub changes: Vec<(Duration, usize, crate::journal::NodeChange)>,
    /// The scenario's marks.
    pub marks: Vec<(Duration, String)>,
}

/// Shared state of a running scenario.
struct Ctx {
    cluster: Arc<Cluster>,
    journal: Arc<Journal>,
    pairs: Vec<(usize, usize)>,
    params: Params,
    in_flight: Arc<Semaphore>,
    sends: JoinSet<()>,
    counter: u64,
}

impl Ctx {
    /// Send from `from` to `to` in the background (waits for a free slot first).
    async fn spawn_send(&mut self, from: usize, to: usize, measured: bool, tag: &'static str) {
        let Ok(permit) = Arc::clone(&self.in_flight).acquire_owned().await else {
            return;
        };
        self.counter += 1;
        let text = format!("sim message {} from {from} to {to}", self.counter);
        let cluster = Arc::clone(&self.cluster);
        self.sends.spawn(async move {
            cluster.send(from, to, text, measured, tag).await;
            drop(permit);
        });
        // Reap finished sends so the set stays small.
        while self.sends.try_join_next().is_some() {}
    }

    /// Wait for the sends in flight (at most `limit`).
    async fn wait_sends(&mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            while self.sends.join_next().await.is_some() {}
        })
        .await;
    }
}

/// Run scenario `kind`.
pub async fn run(params: Params, kind: Kind) -> Result<Outcome, SimError> {
    if params.nodes < 4 {
        return Err(SimError::Params("need at least 4 nodes".into()));
    }
    if params.rate.is_nan() || params.rate <= 0.0 {
        return Err(SimError::Params("the rate must be positive".into()));
    }
    let cpu0 = sys::cpu_seconds().unwrap_or(0.0);
    let rss_before = sys::memory().rss;
    let journal = Arc::new(Journal::new());
    let cluster = Arc::new(
        Cluster::new(
            params.cluster.clone(),
            params.nodes,
            params.seed,
            Arc::clone(&journal),
        )
        .await?,
    );
    let mut summary = Summary {
        scenario: kind.name().to_owned(),
        nodes: params.nodes,
        seed: params.seed,
        rss_before,
        ..Summary::default()
    };
    summary.params = vec![
        (
            "transport".into(),
            format!("{:?}", params.cluster.transport).to_lowercase(),
        ),
        ("rate".into(), format!("{}/s", params.rate)),
        (
            "duration".into(),
            format!("{:.0}s", params.duration.as_secs_f64()),
        ),
        (
            "minute".into(),
            format!("{:.1}s", params.cluster.minute.as_secs_f64()),
        ),
        (
            "send_timeout".into(),
            format!("{:.1}s", params.cluster.send_timeout.as_secs_f64()),
        ),
    ];
    if let Some(idle) = params.cluster.idle_timeout {
        summary
            .params
            .push(("idle_timeout".into(), format!("{:.0}s", idle.as_secs_f64())));
    }
    summary.params.extend(kind.params());

    // Start, let the DHT form.
    let mut phases: Vec<String> = Vec::new();
    let mut phase_start = journal.now();
    let mut phase = |name: &str, journal: &Journal| {
        let now = journal.now();
        let took = (now - phase_start).as_secs_f64();
        tracing::info!("{name}: {took:.1} s");
        phases.push(format!("{name} {took:.1} s"));
        phase_start = now;
    };
    cluster.start_all(params.parallel_start).await?;
    journal.mark("all up");
    phase("start", &journal);
    let want = (params.nodes - 1).min(8);
    let deadline = Instant::now() + params.settle;
    loop {
        let sizes = cluster.routing_tables().await;
        let smallest = sizes.first().copied().unwrap_or(0);
        if smallest >= want || Instant::now() >= deadline {
            tracing::info!(
                "routing tables: smallest {smallest}, median {}, largest {}",
                sizes.get(sizes.len() / 2).copied().unwrap_or(0),
                sizes.last().copied().unwrap_or(0)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    phase("routing tables", &journal);

    // Pairs of users: contacts of each other (not for the group, whose members meet through
    // the invitations).
    let one_to_one = !matches!(kind, Kind::Group { .. });
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed.wrapping_add(1));
    let mut order: Vec<usize> = (0..params.nodes).collect();
    order.shuffle(&mut rng);
    let pairs: Vec<(usize, usize)> = if one_to_one {
        order.chunks_exact(2).map(|c| (c[0], c[1])).collect()
    } else {
        Vec::new()
    };
    let mut befriended = futures::stream::iter(pairs.iter())
        .map(|&(a, b)| cluster.befriend(a, b))
        .buffer_unordered(SETUP_PARALLEL);
    while let Some(r) = befriended.next().await {
        r?;
    }
    drop(befriended);
    // Each node publishes presence records for its new contact as soon as it has it; wait for
    // that (the first messages can then go directly, and a first message finds the bundle),
    // all nodes at once, at most `settle`: a thousand nodes publishing together on two cores
    // take minutes, and a warm-up started earlier measures the set-up, not the network.
    let mut unpublished = 0;
    let publishers: Vec<usize> = if one_to_one {
        (0..params.nodes).collect()
    } else {
        Vec::new()
    };
    let mut published = futures::stream::iter(publishers.iter())
        .map(|&i| cluster.wait_published(i, 1, params.settle))
        // Waiting costs nothing: wait for every node at once.
        .buffer_unordered(publishers.len().max(1));
    let mut progress = Progress::new(0);
    while let Some(r) = published.next().await {
        unpublished += usize::from(!r?);
        if progress.step() {
            let done = progress.done;
            tracing::info!(
                "records: {done} of {} nodes published ({unpublished} incomplete)",
                publishers.len()
            );
        }
    }
    drop(published);
    phase("contacts", &journal);
    let mut ctx = Ctx {
        cluster: Arc::clone(&cluster),
        journal: Arc::clone(&journal),
        pairs,
        in_flight: Arc::new(Semaphore::new(params.max_in_flight.max(1))),
        params: params.clone(),
        sends: JoinSet::new(),
        counter: 0,
    };
    let warm_up_notes = if one_to_one {
        warm_up(&mut ctx).await
    } else {
        Vec::new()
    };
    phase("warm-up", &journal);
    let connections = cluster.connections().await;
    summary.rss_started = sys::memory().rss;
    summary.rss_per_node =
        summary.rss_started.saturating_sub(rss_before) as f64 / params.nodes as f64;
    summary.fds_started = sys::open_fds().unwrap_or(0);
    summary.setup_secs = journal.now().as_secs_f64();

    // The measured part, with a line of progress every 10 s.
    let progress = {
        let journal = Arc::clone(&journal);
        let cluster = Arc::clone(&cluster);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let connections = cluster.connections().await;
                tracing::info!(
                    "{:.0} s: {} messages sent, {} not arrived yet; {} nodes running, {:.1} connections each; {:.0} MiB",
                    journal.now().as_secs_f64(),
                    journal.measured_sends(),
                    journal.undelivered(),
                    cluster.online_count(),
                    connections.iter().sum::<usize>() as f64 / connections.len().max(1) as f64,
                    sys::mib(sys::memory().rss)
                );
            }
        })
    };
    journal.mark("traffic");
    let traffic_start = journal.now();
    let mut extra = vec![
        ("setup".to_owned(), phases.join(", ")),
        (
            "nodes whose records were not all published before the warm-up".to_owned(),
            unpublished.to_string(),
        ),
        (
            "connections per running node after the warm-up".to_owned(),
            format!(
                "mean {:.1}, max {}",
                connections.iter().sum::<usize>() as f64 / connections.len().max(1) as f64,
                connections.iter().max().copied().unwrap_or(0)
            ),
        ),
    ];
    match &kind {
        Kind::Steady => traffic(&mut ctx, params.duration, |_, _| "steady").await,
        Kind::Churn {
            percent_per_minute,
            offline,
            crash_percent,
        } => {
            churn(
                &mut ctx,
                *percent_per_minute,
                *offline,
                *crash_percent,
                &mut extra,
            )
            .await
        }
        Kind::Partition { split_at, length } => {
            partition(&mut ctx, *split_at, *length, &mut extra).await?
        }
        Kind::Burst {
            percent,
            messages,
            away,
        } => burst(&mut ctx, *percent, *messages, *away, &mut extra).await?,
        Kind::Group { members } => group(&mut ctx, *members, &mut extra).await?,
    }
    let traffic_end = journal.now();
    summary.traffic_secs = (traffic_end - traffic_start).as_secs_f64();

    // Everyone back (as many at once as at the start: one at a time, the ~300 nodes a
    // 1,000-node churn run has away at its end took ten minutes); wait for the stragglers.
    let away: Vec<usize> = (0..params.nodes).filter(|&i| !cluster.online(i)).collect();
    let mut returning = futures::stream::iter(away)
        .map(|i| cluster.start(i))
        .buffer_unordered(params.parallel_start.max(1));
    while let Some(started) = returning.next().await {
        started?;
    }
    journal.mark("drain");
    tracing::info!(
        "traffic over after {:.1} s; waiting for {} messages",
        summary.traffic_secs,
        journal.undelivered()
    );
    let send_limit = params.cluster.send_timeout * 4 + Duration::from_secs(30);
    ctx.wait_sends(send_limit).await;
    let deadline = Instant::now() + params.drain;
    while journal.undelivered() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    progress.abort();
    cluster.reconcile().await?;
    let records = journal.records();
    summary.total_secs = journal.now().as_secs_f64();
    summary.cpu_secs = sys::cpu_seconds().unwrap_or(0.0) - cpu0;
    summary.rss_peak = sys::memory().peak;
    summary.duplicates = journal.duplicates();
    report::tally(&records, &mut summary);
    summary.sent_per_sec = if summary.traffic_secs > 0.0 {
        summary.total.sent as f64 / summary.traffic_secs
    } else {
        0.0
    };
    let last_delivery = records
        .iter()
        .filter(|r| r.send.measured)
        .filter_map(|r| r.delivered)
        .max()
        .unwrap_or(traffic_end);
    let span = last_delivery.saturating_sub(traffic_start).as_secs_f64();
    summary.delivered_per_sec = if span > 0.0 {
        summary.total.delivered as f64 / span
    } else {
        0.0
    };
    if !warm_up_notes.is_empty() {
        extra.push(("warm-up".into(), warm_up_notes.join("; ")));
    }
    let lagged = journal.lagged_events();
    if lagged > 0 {
        extra.push((
            "events missed by the harness (reconciled from storage)".into(),
            lagged.to_string(),
        ));
    }
    summary.extra = extra;
    let changes = journal.node_changes();
    let marks = journal.marks();
    cluster.stop_all().await;
    drop(ctx);
    Ok(Outcome {
        summary,
        records,
        changes,
        marks,
    })
}

/// Open every conversation: the first of each pair writes, then the second answers, so both
/// sides hold an established session (and the measured messages use the pair mailboxes, not
/// the first-contact one). A send that found no prekey bundle yet is retried. What did not
/// work out within the limit is reported, not fatal: the measured traffic shows its effect.
async fn warm_up(ctx: &mut Ctx) -> Vec<String> {
    let limit = ctx.params.settle.max(Duration::from_secs(30));
    let mut notes = Vec::new();
    for (round, name) in [(0, "hello"), (1, "reply")] {
        let deadline = Instant::now() + limit;
        let mut todo: Vec<(usize, usize)> = ctx
            .pairs
            .iter()
            .map(|&(a, b)| if round == 0 { (a, b) } else { (b, a) })
            .collect();
        let mut ids = Vec::new();
        let mut refused = 0;
        // Why sends failed (and were tried again), by error text.
        let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
        while !todo.is_empty() {
            let cluster = Arc::clone(&ctx.cluster);
            let sem = Arc::clone(&ctx.in_flight);
            let results = futures::future::join_all(todo.iter().map(|&(from, to)| {
                let cluster = Arc::clone(&cluster);
                let sem = Arc::clone(&sem);
                async move {
                    let _permit = sem.acquire_owned().await.ok()?;
                    cluster
                        .send(from, to, format!("{name} from {from}"), false, name)
                        .await
                        .map(|r| (from, to, r))
                }
            }))
            .await;
            let mut again = Vec::new();
            for (from, to, r) in results.into_iter().flatten() {
                match (&r.result, r.message_id) {
                    (SendResult::Error(e), _) => {
                        // One line per kind of error, not per user it names.
                        let kind: Vec<&str> = e
                            .split_whitespace()
                            .map(|w| if w.starts_with("mc1") { "<user>" } else { w })
                            .collect();
                        *errors.entry(kind.join(" ")).or_default() += 1;
                        again.push((from, to));
                    }
                    (_, None) => again.push((from, to)),
                    (SendResult::Failed(why), _) => {
                        refused += 1;
                        tracing::warn!("node {to} refused the {name} of node {from}: {why}");
                    }
                    (_, Some(id)) => ids.push((id, to)),
                }
            }
            if !again.is_empty() && Instant::now() > deadline {
                notes.push(format!("{} {name} messages could not be sent", again.len()));
                break;
            }
            if !again.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            todo = again;
        }
        if refused > 0 {
            notes.push(format!(
                "{refused} {name} messages refused by the recipient"
            ));
        }
        for (error, n) in &errors {
            notes.push(format!(
                "{n} {name} sends failed and were tried again: {error}"
            ));
            tracing::info!("warm-up: {}", notes.last().map_or("", |s| s.as_str()));
        }
        while !ctx.journal.all_received(&ids) {
            if Instant::now() > deadline {
                let missing = ids
                    .iter()
                    .filter(|(id, to)| ctx.journal.received_time(*id, *to).is_none())
                    .count();
                notes.push(format!(
                    "{missing} of {} {name} messages had not arrived after {:.0} s",
                    ids.len(),
                    limit.as_secs_f64()
                ));
                tracing::warn!("warm-up: {}", notes.last().map_or("", |s| s.as_str()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    notes
}

/// Measured traffic for `length`: messages at the configured rate (Poisson arrivals), each
/// between the two users of a random pair, in a random direction, from a running node.
/// `tag` names the part of the scenario a message belongs to.
async fn traffic(ctx: &mut Ctx, length: Duration, tag: impl Fn(usize, usize) -> &'static str) {
    let mut rng = ChaCha8Rng::seed_from_u64(ctx.params.seed.wrapping_add(2));
    traffic_with(ctx, length, &mut rng, tag, || false).await;
}

/// [`traffic`] with the caller's random source, stopping early when `stop` says so.
async fn traffic_with(
    ctx: &mut Ctx,
    length: Duration,
    rng: &mut ChaCha8Rng,
    tag: impl Fn(usize, usize) -> &'static str,
    stop: impl Fn() -> bool,
) {
    let start = Instant::now();
    let end = start + length;
    let mut next = start;
    loop {
        // Exponential gaps: a Poisson stream of `rate` messages per second.
        let u: f64 = rng.gen_range(f64::EPSILON..1.0);
        next += Duration::from_secs_f64(-u.ln() / ctx.params.rate);
        if next >= end || stop() {
            break;
        }
        tokio::time::sleep_until(next).await;
        let mut pick = None;
        for _ in 0..32 {
            let &(a, b) = ctx
                .pairs
                .choose(rng)
                .expect("invariant: at least two pairs");
            let (from, to) = if rng.gen_bool(0.5) { (a, b) } else { (b, a) };
            if ctx.cluster.online(from) {
                pick = Some((from, to));
                break;
            }
        }
        if let Some((from, to)) = pick {
            let t = tag(from, to);
            ctx.spawn_send(from, to, true, t).await;
        }
    }
    tokio::time::sleep_until(end).await;
}

/// One churn event.
#[derive(Debug, Clone, Copy)]
enum Change {
    Leave { crash: bool },
    Join,
}

/// Churn: every minute `percent` of the nodes leave at random moments (a `crash_percent`
/// share of them as crashes) and each comes back `offline` later, while the traffic runs.
async fn churn(
    ctx: &mut Ctx,
    percent: f64,
    offline: Duration,
    crash_percent: f64,
    extra: &mut Vec<(String, String)>,
) {
    let n = ctx.params.nodes;
    let minute = ctx.params.cluster.minute;
    let length = ctx.params.duration;
    let mut rng = ChaCha8Rng::seed_from_u64(ctx.params.seed.wrapping_add(3));
    // The schedule: departures uniform in each minute, among the nodes present then.
    let per_minute = ((percent / 100.0) * n as f64).round() as usize;
    let minutes = (length.as_secs_f64() / minute.as_secs_f64()).ceil() as usize;
    let mut leaves: Vec<Duration> = Vec::new();
    for m in 0..minutes {
        for _ in 0..per_minute {
            let t = minute.mul_f64(m as f64 + rng.gen_range(0.0..1.0));
            if t < length {
                leaves.push(t);
            }
        }
    }
    leaves.sort();
    let mut back_at = vec![Duration::ZERO; n];
    let mut events: Vec<(Duration, usize, Change)> = Vec::new();
    let mut crashes = 0usize;
    for t in leaves {
        let present: Vec<usize> = (0..n).filter(|&i| back_at[i] <= t).collect();
        let Some(&i) = present.choose(&mut rng) else {
            continue;
        };
        let crash = rng.gen_bool((crash_percent / 100.0).clamp(0.0, 1.0));
        crashes += usize::from(crash);
        back_at[i] = t + offline;
        events.push((t, i, Change::Leave { crash }));
        events.push((t + offline, i, Change::Join));
    }
    events.sort_by_key(|(t, _, _)| *t);
    let departures = events
        .iter()
        .filter(|(_, _, c)| matches!(c, Change::Leave { .. }))
        .count();
    extra.push((
        "churn".into(),
        format!(
            "{departures} departures ({crashes} crashes) and as many returns over {minutes} minute(s) of {:.0} s",
            minute.as_secs_f64()
        ),
    ));

    // Run the schedule beside the traffic.
    let cluster = Arc::clone(&ctx.cluster);
    let start = Instant::now();
    let driver = tokio::spawn(async move {
        let mut actions = JoinSet::new();
        for (t, i, change) in events {
            if t >= length {
                break;
            }
            tokio::time::sleep_until(start + t).await;
            let cluster = Arc::clone(&cluster);
            actions.spawn(async move {
                match change {
                    Change::Leave { crash } => cluster.stop(i, crash).await,
                    Change::Join => {
                        if let Err(e) = cluster.start(i).await {
                            tracing::warn!(node = i, error = %e, "a returning node did not start");
                        }
                    }
                }
            });
            while actions.try_join_next().is_some() {}
        }
        while actions.join_next().await.is_some() {}
    });
    let mut rng = ChaCha8Rng::seed_from_u64(ctx.params.seed.wrapping_add(2));
    let cluster = Arc::clone(&ctx.cluster);
    traffic_with(
        ctx,
        length,
        &mut rng,
        move |_, to| {
            if cluster.online(to) {
                "to-online"
            } else {
                "to-offline"
            }
        },
        || false,
    )
    .await;
    let _ = driver.await;
}

/// A partition: at `split_at` the nodes split into two random halves that refuse each other's
/// connections; `length` later it heals. Messages are tagged by when they were sent and
/// whether they cross the halves.
async fn partition(
    ctx: &mut Ctx,
    split_at: Duration,
    length: Duration,
    extra: &mut Vec<(String, String)>,
) -> Result<(), SimError> {
    let n = ctx.params.nodes;
    let total = ctx.params.duration;
    if split_at + length > total {
        return Err(SimError::Params(
            "the partition must end before the traffic does".into(),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(ctx.params.seed.wrapping_add(4));
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let half_a: BTreeSet<usize> = order[..n / 2].iter().copied().collect();
    let cross = ctx
        .pairs
        .iter()
        .filter(|(a, b)| half_a.contains(a) != half_a.contains(b))
        .count();
    extra.push((
        "halves".into(),
        format!(
            "{} and {} nodes; {cross} of {} conversations cross the cut",
            half_a.len(),
            n - half_a.len(),
            ctx.pairs.len()
        ),
    ));
    let phase = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let mut rng = ChaCha8Rng::seed_from_u64(ctx.params.seed.wrapping_add(2));
    let tag = {
        let phase = Arc::clone(&phase);
        let half_a = half_a.clone();
        move |from: usize, to: usize| {
            let crossing = half_a.contains(&from) != half_a.contains(&to);
            match (phase.load(std::sync::atomic::Ordering::SeqCst), crossing) {
                (0, _) => "before",
                (1, false) => "split-same-half",
                (1, true) => "split-across",
                _ => "after",
            }
        }
    };
    traffic_with(ctx, split_at, &mut rng, &tag, || false).await;

    ctx.journal.mark("split");
    let t = Instant::now();
    ctx.cluster.split(&half_a).await?;
    phase.store(1, std::sync::atomic::Ordering::SeqCst);
    extra.push((
        "split took".into(),
        format!("{:.2} s", t.elapsed().as_secs_f64()),
    ));
    traffic_with(ctx, length, &mut rng, &tag, || false).await;

    ctx.journal.mark("heal");
    ctx.cluster.heal().await?;
    phase.store(2, std::sync::atomic::Ordering::SeqCst);
    let rest = total - split_at - length;
    traffic_with(ctx, rest, &mut rng, &tag, || false).await;
    Ok(())
}

/// A burst: `percent` of the nodes (one per conversation at most) shut down; their contacts
/// send each of them `messages` messages; `away` later they all start at the same moment.
/// Background traffic between the other users runs throughout. Reports the time from a
/// returning node's start to it holding all its mail.
async fn burst(
    ctx: &mut Ctx,
    percent: f64,
    messages: usize,
    away: Duration,
    extra: &mut Vec<(String, String)>,
) -> Result<(), SimError> {
    let n = ctx.params.nodes;
    let k = (((percent / 100.0) * n as f64).round() as usize).clamp(1, ctx.pairs.len());
    let mut rng = ChaCha8Rng::seed_from_u64(ctx.params.seed.wrapping_add(5));
    let mut chosen = ctx.pairs.clone();
    chosen.shuffle(&mut rng);
    chosen.truncate(k);
    // (away, writer)
    let gone: Vec<(usize, usize)> = chosen
        .into_iter()
        .map(|(a, b)| if rng.gen_bool(0.5) { (a, b) } else { (b, a) })
        .collect();
    let gone_set: BTreeSet<usize> = gone.iter().map(|(a, _)| *a).collect();
    extra.push((
        "burst".into(),
        format!("{k} users away, {messages} messages each"),
    ));

    ctx.journal.mark("leave");
    futures::future::join_all(gone.iter().map(|&(a, _)| ctx.cluster.stop(a, false))).await;

    // Their contacts write to them, beside background traffic among the others.
    let background = {
        let cluster = Arc::clone(&ctx.cluster);
        let pairs: Vec<(usize, usize)> = ctx
            .pairs
            .iter()
            .copied()
            .filter(|(a, b)| !gone_set.contains(a) && !gone_set.contains(b))
            .collect();
        let journal = Arc::clone(&ctx.journal);
        let rate = ctx.params.rate;
        let seed = ctx.params.seed;
        let sem = Arc::clone(&ctx.in_flight);
        let length = ctx.params.duration;
        tokio::spawn(async move {
            background_traffic(cluster, journal, pairs, rate, seed, sem, length).await
        })
    };
    for _ in 0..messages {
        for &(to, from) in &gone {
            ctx.spawn_send(from, to, true, "burst").await;
        }
    }
    ctx.wait_sends(ctx.params.cluster.send_timeout * 4 + Duration::from_secs(60))
        .await;
    let burst_ids: Vec<Vec<([u8; 16], usize)>> = {
        let records = ctx.journal.records();
        gone.iter()
            .map(|&(to, _)| {
                records
                    .iter()
                    .filter(|r| r.send.tag == "burst" && r.send.to == to)
                    .filter_map(|r| r.send.message_id.map(|id| (id, to)))
                    .collect()
            })
            .collect()
    };
    tokio::time::sleep(away).await;

    // All back at once.
    ctx.journal.mark("return");
    let t0 = ctx.journal.now();
    let started = futures::future::join_all(gone.iter().map(|&(a, _)| ctx.cluster.start(a))).await;
    for s in started {
        s?;
    }
    let all_started = ctx.journal.now() - t0;
    let deadline = Instant::now() + ctx.params.drain;
    let mut times: Vec<f64> = Vec::new();
    let mut pending = burst_ids;
    while !pending.is_empty() && Instant::now() < deadline {
        pending.retain(|ids| {
            if ctx.journal.all_received(ids) {
                let last = ids
                    .iter()
                    .filter_map(|(id, to)| ctx.journal.received_time(*id, *to))
                    .max()
                    .unwrap_or(t0);
                times.push(last.saturating_sub(t0).as_secs_f64() * 1000.0);
                false
            } else {
                true
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p = report::Percentiles::of(times);
    extra.push((
        "returning users holding all their mail".into(),
        format!(
            "{} of {k}; time from the common start: p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms (starting all {k} took {:.0} ms)",
            p.n,
            p.p50,
            p.p90,
            p.max,
            all_started.as_secs_f64() * 1000.0
        ),
    ));
    let _ = background.await;
    Ok(())
}

/// A large group: node 0 creates it and invites `members - 1` others, who join as their
/// invitation arrives; then for the traffic's length random members write to it. Every
/// message is journaled once per other member it should reach.
async fn group(
    ctx: &mut Ctx,
    members: usize,
    extra: &mut Vec<(String, String)>,
) -> Result<(), SimError> {
    let n = ctx.params.nodes;
    let m = members.clamp(2, n);
    let node_err = |node: usize| move |source| ClusterError::Node { node, source };
    let creator = ctx
        .cluster
        .handle(0)
        .await
        .ok_or(ClusterError::NotRunning { node: 0 })?;
    let view = creator.group_create("sim").await.map_err(node_err(0))?;
    let gid = view.id.clone();

    // Invitations (1:1 messages from the creator), then every invitee joins.
    let t = Instant::now();
    let invitees: Vec<usize> = (1..m).collect();
    let mut invite_failures = 0;
    for chunk in invitees.chunks(16) {
        let r = futures::future::join_all(chunk.iter().map(|&i| {
            let creator = creator.clone();
            let gid = gid.clone();
            let who = ctx.cluster.identity(i);
            async move { creator.group_invite(&gid, &who).await }
        }))
        .await;
        for x in r {
            if let Err(e) = x {
                invite_failures += 1;
                tracing::warn!("an invitation failed: {e}");
            }
        }
    }
    let invited = t.elapsed();
    let deadline = Instant::now() + ctx.params.settle;
    let joined: Vec<Option<usize>> = futures::future::join_all(invitees.iter().map(|&i| {
        let cluster = Arc::clone(&ctx.cluster);
        let gid = gid.clone();
        async move {
            let h = cluster.handle(i).await?;
            while Instant::now() < deadline {
                if let Ok(invites) = h.group_invites().await {
                    if let Some(inv) = invites.iter().find(|v| v.group_id == gid) {
                        return match h.group_join(&inv.code).await {
                            Ok(_) => Some(i),
                            Err(e) => {
                                tracing::warn!("node {i} could not join: {e}");
                                None
                            }
                        };
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            None
        }
    }))
    .await;
    let mut in_group: Vec<usize> = vec![0];
    in_group.extend(joined.into_iter().flatten());
    let joined_at = t.elapsed();
    // The group is formed when every member knows every member (the Add ops after its own
    // reach a member over gossipsub or from the group mailbox): a member writes only to the
    // members it knows of.
    let converged = crate::group_bench::wait_converged(
        &ctx.cluster,
        &in_group,
        &gid,
        in_group.len(),
        deadline.max(Instant::now() + Duration::from_secs(10)),
    )
    .await;
    extra.push((
        "group".into(),
        format!(
            "{} of {m} members in; inviting took {:.1} s ({invite_failures} failed), joining {:.1} s more; {converged} of them knew every member {:.1} s later",
            in_group.len(),
            invited.as_secs_f64(),
            joined_at.saturating_sub(invited).as_secs_f64(),
            t.elapsed().saturating_sub(joined_at).as_secs_f64()
        ),
    ));
    ctx.journal.mark("group formed");
    // Let gossipsub learn the subscriptions (a few heartbeats).
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Traffic: random members write.
    let mut rng = ChaCha8Rng::seed_from_u64(ctx.params.seed.wrapping_add(7));
    let start = Instant::now();
    let end = start + ctx.params.duration;
    let mut next = start;
    let mut counter = 0u64;
    let in_group = Arc::new(in_group);
    loop {
        let u: f64 = rng.gen_range(f64::EPSILON..1.0);
        next += Duration::from_secs_f64(-u.ln() / ctx.params.rate);
        if next >= end {
            break;
        }
        tokio::time::sleep_until(next).await;
        let &from = in_group
            .choose(&mut rng)
            .expect("invariant: the creator is in");
        if !ctx.cluster.online(from) {
            continue;
        }
        let Ok(permit) = Arc::clone(&ctx.in_flight).acquire_owned().await else {
            break;
        };
        counter += 1;
        let cluster = Arc::clone(&ctx.cluster);
        let gid = gid.clone();
        let members = Arc::clone(&in_group);
        ctx.sends.spawn(async move {
            let to: Vec<usize> = members.iter().copied().filter(|&x| x != from).collect();
            let text = format!("group message {counter} from {from}");
            cluster.group_send(from, &gid, &to, text, "group").await;
            drop(permit);
        });
        while ctx.sends.try_join_next().is_some() {}
    }
    tokio::time::sleep_until(end).await;
    Ok(())
}

/// Background traffic among `pairs` for `length` (used beside the burst).
async fn background_traffic(
    cluster: Arc<Cluster>,
    _journal: Arc<Journal>,
    pairs: Vec<(usize, usize)>,
    rate: f64,
    seed: u64,
    sem: Arc<Semaphore>,
    length: Duration,
) {
    if pairs.is_empty() {
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(6));
    let start = Instant::now();
    let end = start + length;
    let mut next = start;
    let mut sends = JoinSet::new();
    let mut counter = 0u64;
    loop {
        let u: f64 = rng.gen_range(f64::EPSILON..1.0);
        next += Duration::from_secs_f64(-u.ln() / rate);
        if next >= end {
            break;
        }
        tokio::time::sleep_until(next).await;
        let &(a, b) = pairs.choose(&mut rng).expect("invariant: not empty");
        let (from, to) = if rng.gen_bool(0.5) { (a, b) } else { (b, a) };
        let Ok(permit) = Arc::clone(&sem).acquire_owned().await else {
            break;
        };
        counter += 1;
        let cluster = Arc::clone(&cluster);
        let text = format!("background {counter} from {from} to {to}");
        sends.spawn(async move {
            cluster.send(from, to, text, true, "background").await;
            drop(permit);
        });
        while sends.try_join_next().is_some() {}
    }
    while sends.join_next().await.is_some() {}
}
