//! Group channels measured against bare gossipsub of the same shape, in one process
//! (`meshchat-sim group-bench`): N real meshchat nodes, M of them in one group, messages from a
//! few members, each timed from `group_send` until the last other member has it (stored,
//! decrypted, `MessageReceived`); then N bare libp2p gossipsub swarms with the node's own
//! gossipsub configuration, the same transport, the same connection graph (the meshchat run's
//! connections at the end of its measurement) and the same M subscribers, publishing payloads
//! of the size of a sealed group envelope on the same schedule. See `docs/performance.md`,
//! "Groups".
//!
//! ```text
//! N nodes ─► DHT forms ─► node 0 creates the group, invites M-1 (1:1), they join
//!   ─► every member sees M members (formation done)
//!   ─► warm-up: one message per sender (hands its sender key to every member)
//!   ─► measured: K messages, one at a time (each until all members have it, then a gap)
//!   ─► snapshot of the connection graph ─► nodes stop
//! N bare swarms ─► same graph dialled ─► M subscribe ─► same warm-up and K messages
//! ```

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use libp2p::{
    gossipsub::{self, IdentTopic, MessageAcceptance},
    identity::Keypair,
    multiaddr::Protocol,
    swarm::SwarmEvent,
    Multiaddr, PeerId, Swarm,
};
use meshchat_node::{groups, NodeConfig, NodeEvent, NodeHandle};
use meshchat_protocol::{
    group::{seal_group, GroupBody, GroupState, SenderChain},
    Identity, MessageId, Wire,
};
use rand::{rngs::OsRng, seq::SliceRandom, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::{
    sync::{broadcast, mpsc, oneshot},
    task::JoinSet,
    time::Instant,
};

use crate::{
    cluster::{Cluster, ClusterConfig, ClusterError},
    journal::Journal,
    report::Percentiles,
    scenario::SimError,
    sys, Transport,
};

/// The parameters of a group benchmark.
#[derive(Debug, Clone)]
pub struct GroupBenchParams {
    /// Nodes (users).
    pub nodes: usize,
    /// Group members (node 0 and the next `members - 1`).
    pub members: usize,
    /// Members that write (random, fixed by the seed).
    pub senders: usize,
    /// Measured messages (after one warm-up message per sender).
    pub messages: usize,
    /// Pause after a message reached everybody (or timed out), before the next.
    pub gap: Duration,
    /// Longest wait for one message to reach every member.
    pub message_timeout: Duration,
    /// Longest wait for the group to form (every member seeing every other).
    pub formation_timeout: Duration,
    /// Longest wait for the DHT to form before the group is created.
    pub settle: Duration,
    /// Pause between the warm-up and the measured messages (connections the hand-outs opened
    /// close after the node's idle timeout, 60 s, unless something keeps them).
    pub quiet: Duration,
    /// Nodes started at once.
    pub parallel_start: usize,
    /// Invitations sent at once by the creator.
    pub parallel_invites: usize,
    /// Seed of identities, senders and payloads.
    pub seed: u64,
    /// How the nodes are set up (transport, folder, timeouts).
    pub cluster: ClusterConfig,
    /// Also run bare gossipsub of the same shape.
    pub bare: bool,
}

impl Default for GroupBenchParams {
    fn default() -> Self {
        Self {
            nodes: 120,
            members: 100,
            senders: 10,
            messages: 40,
            gap: Duration::from_millis(250),
            message_timeout: Duration::from_secs(30),
            formation_timeout: Duration::from_secs(600),
            settle: Duration::from_secs(60),
            quiet: Duration::ZERO,
            parallel_start: 8,
            parallel_invites: 16,
            seed: 1,
            cluster: ClusterConfig::default(),
            bare: true,
        }
    }
}

/// The delivery figures of one run (meshchat or bare gossipsub).
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Messages sent.
    pub messages: usize,
    /// Deliveries expected (messages × other members).
    pub expected: usize,
    /// Deliveries seen (each member and message counted once).
    pub delivered: usize,
    /// Messages every other member had before the timeout.
    pub complete: usize,
    /// Deliveries seen a second time (a member shown a message twice).
    pub duplicates: u64,
    /// Send to the last member, over the complete messages (ms).
    pub time_to_all: Percentiles,
    /// Send to each member, over every delivery (ms).
    pub latency: Percentiles,
}

impl Figures {
    /// Share of the expected deliveries seen.
    pub fn ratio(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.delivered as f64 / self.expected as f64
        }
    }

    fn row(&self, label: &str) -> String {
        format!(
            "| {label} | {} | {} of {} | {:.2} % | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            self.messages,
            self.delivered,
            self.expected,
            self.ratio() * 100.0,
            self.complete,
            self.time_to_all.p50,
            self.time_to_all.p99,
            self.time_to_all.max,
            self.latency.p50,
            self.latency.p99,
        )
    }
}

/// How the group formed.
#[derive(Debug, Clone, Default)]
pub struct Formation {
    /// Members that joined (the creator included).
    pub joined: usize,
    /// Members that saw the whole membership when formation ended.
    pub converged: usize,
    /// Invitation attempts that failed (each failed one is sent again until the deadline).
    pub invite_failures: usize,
    /// Creation to the last invitation sent (s).
    pub invite_secs: f64,
    /// Creation to the last join (s).
    pub join_secs: f64,
    /// Creation to the median join (s).
    pub join_p50_secs: f64,
    /// Joins later than [`LATE_JOIN`] after creation: (node, seconds).
    pub late_joins: Vec<(usize, f64)>,
    /// Creation to every member seeing every member (s).
    pub converge_secs: f64,
}

/// The result of a group benchmark.
#[derive(Debug, Clone, Default)]
pub struct GroupBenchOutcome {
    /// Parameters, as printed.
    pub params: Vec<(String, String)>,
    /// The group's formation.
    pub formation: Formation,
    /// Size of one sealed group envelope of the measured texts (the bare payload), bytes.
    pub payload_bytes: usize,
    /// Connections of the graph both runs used, and the mean degree.
    pub edges: usize,
    /// Mean connections per node.
    pub mean_degree: f64,
    /// Connections among the nodes when the measured messages began.
    pub edges_at_start: usize,
    /// CPU time the process used during the measured meshchat messages, seconds.
    pub cpu_secs: f64,
    /// The same for the bare gossipsub messages.
    pub bare_cpu_secs: Option<f64>,
    /// CPU time the process used during the quiet pause (nothing sent), seconds.
    pub quiet_cpu_secs: f64,
    /// How long the sender's `group_send` took (sealed, committed, handed to gossipsub), over
    /// the measured messages, ms: the part of the time to all spent before anybody can have it.
    pub send_call: Percentiles,
    /// Each sender's first message (its sender key handed to every member first).
    pub warm_up: Figures,
    /// The measured meshchat messages.
    pub meshchat: Figures,
    /// Bare gossipsub's warm-up messages.
    pub bare_warm_up: Option<Figures>,
    /// Bare gossipsub, same shape.
    pub bare: Option<Figures>,
    /// Phases and their lengths.
    pub phases: Vec<(String, f64)>,
    /// Resident memory after the group formed, MiB.
    pub rss_mib: f64,
}

impl GroupBenchOutcome {
    /// Median time-to-all of meshchat over bare gossipsub.
    pub fn ratio_of_medians(&self) -> Option<f64> {
        let bare = self.bare.as_ref()?;
        (bare.time_to_all.p50 > 0.0).then(|| self.meshchat.time_to_all.p50 / bare.time_to_all.p50)
    }
}

impl fmt::Display for GroupBenchOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# group-bench")?;
        for (k, v) in &self.params {
            writeln!(f, "- {k}: {v}")?;
        }
        let fo = &self.formation;
        writeln!(
            f,
            "- formation: {} joined, {} saw every member; invitations sent in {:.1} s ({} attempts failed and were sent again), joins p50 {:.1} s, last join at {:.1} s, converged at {:.1} s",
            fo.joined, fo.converged, fo.invite_secs, fo.invite_failures, fo.join_p50_secs, fo.join_secs, fo.converge_secs
        )?;
        if !fo.late_joins.is_empty() {
            let late: Vec<String> = fo
                .late_joins
                .iter()
                .map(|(i, at)| format!("node {i} at {at:.1} s"))
                .collect();
            writeln!(
                f,
                "- joins later than {} s: {}",
                LATE_JOIN.as_secs(),
                late.join(", ")
            )?;
        }
        writeln!(
            f,
            "- graph: {} connections, mean degree {:.1} (at the start of the measured messages: {}); payload {} bytes (one sealed group envelope)",
            self.edges, self.mean_degree, self.edges_at_start, self.payload_bytes
        )?;
        let quiet = self
            .phases
            .iter()
            .find(|(k, _)| k == "quiet")
            .map(|(_, s)| *s);
        if let Some(q) = quiet.filter(|q| *q > 0.0) {
            writeln!(
                f,
                "- CPU time during the quiet pause: {:.1} s in {:.0} s ({:.0} % of one core)",
                self.quiet_cpu_secs,
                q,
                100.0 * self.quiet_cpu_secs / q
            )?;
        }
        writeln!(
            f,
            "- meshchat `group_send` call (seal, commit, hand to gossipsub), measured messages: p50 {:.0} ms, p99 {:.0} ms",
            self.send_call.p50, self.send_call.p99
        )?;
        match self.bare_cpu_secs {
            Some(b) => writeln!(
                f,
                "- CPU time during the measured messages: meshchat {:.1} s, bare gossipsub {:.1} s",
                self.cpu_secs, b
            )?,
            None => writeln!(
                f,
                "- CPU time during the measured messages: meshchat {:.1} s",
                self.cpu_secs
            )?,
        }
        let phases: Vec<String> = self
            .phases
            .iter()
            .map(|(k, s)| format!("{k} {s:.1} s"))
            .collect();
        writeln!(f, "- phases: {}", phases.join(", "))?;
        writeln!(
            f,
            "- resident memory after formation: {:.0} MiB",
            self.rss_mib
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "| run | messages | deliveries | ratio | complete | all p50 ms | all p99 ms | all max ms | each p50 ms | each p99 ms |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|")?;
        writeln!(f, "{}", self.meshchat.row("meshchat"))?;
        if let Some(b) = &self.bare {
            writeln!(f, "{}", b.row("bare gossipsub"))?;
        }
        writeln!(
            f,
            "{}",
            self.warm_up
                .row("meshchat first message per sender (sender key hand-out)")
        )?;
        if let Some(b) = &self.bare_warm_up {
            writeln!(f, "{}", b.row("bare gossipsub first message per sender"))?;
        }
        if let Some(r) = self.ratio_of_medians() {
            writeln!(f)?;
            writeln!(
                f,
                "time until all members have a message, median: meshchat / bare gossipsub = {r:.2}x"
            )?;
        }
        Ok(())
    }
}

/// The size of a sealed group envelope carrying `text` (what the bare run publishes).
pub fn sealed_size(text: &str) -> Result<usize, SimError> {
    let err = |e: &dyn fmt::Display| SimError::Params(format!("sealing a sample: {e}"));
    let author = Identity::generate(&mut OsRng);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let (state, secret, _) =
        GroupState::create(&author, "sim", now_ms, &mut OsRng).map_err(|e| err(&e))?;
    let mut chain = SenderChain::new(&mut OsRng);
    let envelope = seal_group(
        &state,
        &author,
        &mut chain,
        &secret,
        GroupBody::Text(text.to_owned()),
        MessageId::random(&mut OsRng),
        now_ms,
        &mut OsRng,
    )
    .map_err(|e| err(&e))?;
    Ok(envelope.to_wire().map_err(|e| err(&e))?.len())
}

fn node_err(node: usize) -> impl FnOnce(meshchat_node::NodeError) -> SimError {
    move |source| SimError::Cluster(ClusterError::Node { node, source })
}

async fn handle(cluster: &Cluster, i: usize) -> Result<NodeHandle, SimError> {
    cluster
        .handle(i)
        .await
        .ok_or(SimError::Cluster(ClusterError::NotRunning { node: i }))
}

/// A join later than this after the group's creation is reported by node: an invitation
/// that waited in the invitee's mailbox for a collection instead of being pushed.
pub const LATE_JOIN: Duration = Duration::from_secs(60);

/// Node 0 creates a group and invites nodes `1..members`; each joins when its invitation
/// arrives. Done when every member sees `members` members (or `timeout`). Returns the group id,
/// how it went and the nodes that joined (node 0 included).
pub async fn form_group(
    cluster: &Cluster,
    members: usize,
    parallel_invites: usize,
    timeout: Duration,
) -> Result<(String, Formation, Vec<usize>), SimError> {
    let creator = handle(cluster, 0).await?;
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let view = creator.group_create("sim").await.map_err(node_err(0))?;
    let gid = view.id.clone();
    let invitees: Vec<usize> = (1..members).collect();

    // Listen for the invitation before it is sent; join on the event (or, if the event was
    // missed, on the pending invite found by polling).
    let mut joiners: JoinSet<Option<(usize, Duration)>> = JoinSet::new();
    for &i in &invitees {
        let h = handle(cluster, i).await?;
        let events = h.subscribe();
        let gid = gid.clone();
        joiners.spawn(async move { join_when_invited(i, h, events, &gid, deadline, t0).await });
    }
    // A failed invitation (typically: the invitee's prekey bundle not found yet while the
    // network is still publishing) is sent again, as a user would, until the deadline.
    let mut invite_failures = 0;
    let mut pending = invitees.clone();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut failed = Vec::new();
        for chunk in pending.chunks(parallel_invites.max(1)) {
            let r = futures::future::join_all(chunk.iter().map(|&i| {
                let creator = creator.clone();
                let gid = gid.clone();
                let who = cluster.identity(i);
                async move { (i, creator.group_invite(&gid, &who).await) }
            }))
            .await;
            for (i, x) in r {
                if let Err(e) = x {
                    invite_failures += 1;
                    failed.push(i);
                    tracing::warn!("an invitation to node {i} failed (sent again): {e}");
                }
            }
        }
        pending = failed;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let invite_secs = t0.elapsed().as_secs_f64();
    tracing::info!("{} invitations sent in {invite_secs:.1} s", invitees.len());
    let mut in_group = vec![0];
    let mut join_times = Vec::new();
    let mut late_joins = Vec::new();
    let mut progress = tokio::time::interval(Duration::from_secs(10));
    progress.tick().await;
    loop {
        tokio::select! {
            r = joiners.join_next() => match r {
                None => break,
                Some(Ok(Some((i, at)))) => {
                    in_group.push(i);
                    join_times.push(at);
                    if at > LATE_JOIN {
                        // Which peer, to find it in a debug log of the nodes.
                        tracing::warn!(
                            "node {i} ({:?}) joined only {:.1} s after the group was created",
                            cluster.peer_id(i),
                            at.as_secs_f64()
                        );
                        late_joins.push((i, at.as_secs_f64()));
                    }
                }
                Some(_) => {}
            },
            _ = progress.tick() => tracing::info!("{} of {members} joined", in_group.len()),
        }
    }
    in_group.sort_unstable();
    join_times.sort_unstable();
    let last_join = join_times.last().copied().unwrap_or_default();
    let joined = in_group.len();
    tracing::info!(
        "{joined} of {members} joined; last at {:.1} s",
        last_join.as_secs_f64()
    );

    // Every member must see the whole membership (the later Add ops reach earlier members over
    // gossipsub or the group mailbox). Invitees that did not join are added nonetheless (the
    // creator added them), so the membership the others see is `members`.
    let converged = wait_converged(cluster, &in_group, &gid, members, deadline).await;
    let formation = Formation {
        joined,
        converged,
        invite_failures,
        invite_secs,
        join_secs: last_join.as_secs_f64(),
        join_p50_secs: join_times
            .get(join_times.len() / 2)
            .map_or(0.0, Duration::as_secs_f64),
        late_joins,
        converge_secs: t0.elapsed().as_secs_f64(),
    };
    tracing::info!(
        "{converged} of {members} members see every member after {:.1} s",
        formation.converge_secs
    );
    Ok((gid, formation, in_group))
}

/// Wait until each of `nodes` sees `members` members in group `gid` (or `deadline`); how many
/// do.
pub async fn wait_converged(
    cluster: &Cluster,
    nodes: &[usize],
    gid: &str,
    members: usize,
    deadline: Instant,
) -> usize {
    let mut last_report = Instant::now();
    loop {
        let counts = futures::future::join_all(nodes.iter().map(|&i| async move {
            let h = cluster.handle(i).await?;
            let list = h.group_list().await.ok()?;
            list.iter().find(|g| g.id == gid).map(|g| g.members)
        }))
        .await;
        let converged = counts.iter().filter(|c| **c == Some(members)).count();
        if converged == nodes.len() || Instant::now() >= deadline {
            return converged;
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            // How far behind the others are: the membership sizes they see.
            let mut seen: Vec<usize> = counts.iter().map(|c| c.unwrap_or(0)).collect();
            seen.sort_unstable();
            let at = |q: usize| seen[(seen.len() - 1) * q / 100];
            tracing::info!(
                "{converged} of {} see all {members} members; sizes seen: min {}, p10 {}, median {}, p90 {}",
                nodes.len(),
                at(0),
                at(10),
                at(50),
                at(90)
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn join_when_invited(
    i: usize,
    h: NodeHandle,
    mut events: broadcast::Receiver<NodeEvent>,
    gid: &str,
    deadline: Instant,
    t0: Instant,
) -> Option<(usize, Duration)> {
    let mut poll = tokio::time::interval(Duration::from_secs(2));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let code = tokio::select! {
            event = events.recv() => match event {
                Ok(NodeEvent::GroupInvite(v)) if v.group_id == gid => Some(v.code),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => None,
                Err(broadcast::error::RecvError::Closed) => return None,
            },
            _ = poll.tick() => h
                .group_invites()
                .await
                .ok()
                .and_then(|v| v.into_iter().find(|v| v.group_id == gid).map(|v| v.code)),
            _ = tokio::time::sleep_until(deadline) => return None,
        };
        if let Some(code) = code {
            return match h.group_join(&code).await {
                Ok(_) => Some((i, t0.elapsed())),
                Err(e) => {
                    tracing::warn!("node {i} could not join: {e}");
                    None
                }
            };
        }
    }
}

/// One message of a run: (sender, when sent, message key) — the key is the meshchat message
/// id or the bare payload's number.
type Sent = (usize, Instant, Vec<u8>);

/// Deliveries of a run: message key → member → when.
type Seen = Arc<Mutex<HashMap<Vec<u8>, HashMap<usize, Instant>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The figures of `sent` messages, each expected at every member but its sender.
fn figures(
    sent: &[Sent],
    members: &[usize],
    seen: &HashMap<Vec<u8>, HashMap<usize, Instant>>,
    duplicates: u64,
) -> Figures {
    let mut out = Figures {
        messages: sent.len(),
        duplicates,
        ..Figures::default()
    };
    let mut all = Vec::new();
    let mut each = Vec::new();
    for (from, at, key) in sent {
        let got = seen.get(key);
        let mut last = Duration::ZERO;
        let mut missing = false;
        for m in members.iter().filter(|m| *m != from) {
            out.expected += 1;
            match got.and_then(|g| g.get(m)) {
                Some(t) => {
                    out.delivered += 1;
                    let d = t.saturating_duration_since(*at);
                    each.push(d.as_secs_f64() * 1000.0);
                    last = last.max(d);
                }
                None => missing = true,
            }
        }
        if !missing {
            out.complete += 1;
            all.push(last.as_secs_f64() * 1000.0);
        }
    }
    out.time_to_all = Percentiles::of(all);
    out.latency = Percentiles::of(each);
    out
}

/// Wait until every member but `from` has `key` in `seen`, or `timeout`.
async fn wait_all(seen: &Seen, key: &[u8], from: usize, members: &[usize], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let done = lock(seen).get(key).is_some_and(|g| {
            members
                .iter()
                .filter(|m| **m != from)
                .all(|m| g.contains_key(m))
        });
        if done {
            return;
        }
        if Instant::now() >= deadline {
            let missing: Vec<usize> = {
                let seen = lock(seen);
                let got = seen.get(key);
                members
                    .iter()
                    .copied()
                    .filter(|m| *m != from && !got.is_some_and(|g| g.contains_key(m)))
                    .collect()
            };
            tracing::info!(
                "a message from node {from} reached {} of {} members in {:.0} s; missing: {:?}{}",
                members.len() - 1 - missing.len(),
                members.len() - 1,
                timeout.as_secs_f64(),
                &missing[..missing.len().min(8)],
                if missing.len() > 8 { " …" } else { "" },
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Log what all members hold unopened, all told; then, for up to 10 members that missed a
/// measured message within `timeout`, how many they missed, what their node holds unopened and
/// how many connections it has: what the next run needs to tell a member cut off from the mesh
/// from one waiting for sender keys.
async fn report_laggards(
    sent: &[Sent],
    by_node: &HashMap<usize, NodeHandle>,
    seen: &HashMap<Vec<u8>, HashMap<usize, Instant>>,
    timeout: Duration,
) {
    let mut missed: BTreeMap<usize, usize> = BTreeMap::new();
    for (from, at, key) in sent {
        let got = seen.get(key);
        for m in by_node.keys().filter(|m| *m != from) {
            let in_time = got
                .and_then(|g| g.get(m))
                .is_some_and(|t| t.duration_since(*at) <= timeout);
            if !in_time {
                *missed.entry(*m).or_default() += 1;
            }
        }
    }
    // What the members hold unopened, all told (an envelope held for a key that never comes
    // is retried, and costs, while it is held).
    let mut held: BTreeMap<&'static str, (usize, usize)> = BTreeMap::new();
    for h in by_node.values() {
        for (reason, n) in h.group_held() {
            let e = held.entry(reason).or_default();
            e.0 += 1;
            e.1 += n;
        }
    }
    tracing::info!("held unopened after the measured messages (members, envelopes): {held:?}");
    for (m, n) in missed.iter().take(10) {
        let Some(h) = by_node.get(m) else {
            continue;
        };
        let connections = h.status().await.map_or(0, |s| s.connected.len());
        tracing::info!(
            "node {m} missed {n} of {} measured messages within {:.0} s; holds unopened: {:?}; {connections} connections",
            sent.len(),
            timeout.as_secs_f64(),
            h.group_held(),
        );
    }
}

/// The schedule both runs follow: one warm-up message per sender, then `messages` measured
/// ones from random senders.
fn schedule(params: &GroupBenchParams, members: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed.wrapping_add(11));
    let mut senders: Vec<usize> = members.to_vec();
    senders.shuffle(&mut rng);
    senders.truncate(params.senders.clamp(1, members.len()));
    let measured = (0..params.messages)
        .map(|_| {
            *senders
                .choose(&mut rng)
                .expect("invariant: at least one sender")
        })
        .collect();
    (senders, measured)
}

/// Journal receptions of group messages by node into `seen` (the cluster's own journal keeps
/// them too; this map is keyed like the bare run's).
fn watch_receptions(
    cluster: &Cluster,
    handles: &[(usize, NodeHandle)],
    seen: &Seen,
    dups: &Arc<std::sync::atomic::AtomicU64>,
) -> JoinSet<()> {
    let _ = cluster;
    let mut set = JoinSet::new();
    for (i, h) in handles {
        let mut events = h.subscribe();
        let seen = Arc::clone(seen);
        let dups = Arc::clone(dups);
        let i = *i;
        set.spawn(async move {
            loop {
                match events.recv().await {
                    Ok(NodeEvent::MessageReceived(m)) if m.group.is_some() => {
                        let now = Instant::now();
                        let mut s = lock(&seen);
                        let per = s.entry(m.id.to_vec()).or_default();
                        if per.insert(i, now).is_some() {
                            dups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("node {i}: the benchmark missed {n} events");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    set
}

/// Run the meshchat part; returns the connection graph for the bare run.
async fn run_meshchat(
    params: &GroupBenchParams,
    out: &mut GroupBenchOutcome,
) -> Result<(Vec<(usize, usize)>, Vec<usize>), SimError> {
    let journal = Arc::new(Journal::new());
    let cluster = Cluster::new(params.cluster.clone(), params.nodes, params.seed, journal).await?;
    let mut phase_start = Instant::now();
    let mut phase = |name: &str, out: &mut GroupBenchOutcome| {
        let s = phase_start.elapsed().as_secs_f64();
        tracing::info!("{name}: {s:.1} s");
        out.phases.push((name.to_owned(), s));
        phase_start = Instant::now();
    };
    cluster.start_all(params.parallel_start).await?;
    phase("start", out);
    let want = (params.nodes - 1).min(8);
    let deadline = Instant::now() + params.settle;
    loop {
        let sizes = cluster.routing_tables().await;
        if sizes.first().copied().unwrap_or(0) >= want || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    phase("routing tables", out);

    let (gid, formation, members) = form_group(
        &cluster,
        params.members,
        params.parallel_invites,
        params.formation_timeout,
    )
    .await?;
    out.formation = formation;
    out.rss_mib = sys::mib(sys::memory().rss);
    phase("group formation", out);

    // The members that joined write and are expected to read.
    let mut handles = Vec::new();
    for &i in &members {
        handles.push((i, handle(&cluster, i).await?));
    }
    let by_node: HashMap<usize, NodeHandle> = handles.iter().cloned().collect();
    let seen: Seen = Arc::default();
    let dups = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut watchers = watch_receptions(&cluster, &handles, &seen, &dups);
    let (senders, measured) = schedule(params, &members);

    let send = |from: usize, n: usize| {
        let h = by_node.get(&from).cloned();
        let gid = gid.clone();
        async move {
            let text = format!("group bench message {n} from node {from:04}");
            let h = h?;
            let at = Instant::now();
            match h.group_send(&gid, text).await {
                Ok(report) => hex::decode(&report.message_id)
                    .ok()
                    .map(|id| ((from, at, id), at.elapsed())),
                Err(e) => {
                    tracing::warn!("node {from} could not send: {e}");
                    None
                }
            }
        }
    };
    // Warm-up: every sender's first message hands its sender key to every member.
    let mut warm: Vec<Sent> = Vec::new();
    for (n, &from) in senders.iter().enumerate() {
        if let Some((s, _)) = send(from, n).await {
            wait_all(&seen, &s.2, from, &members, params.message_timeout).await;
            warm.push(s);
        }
        tokio::time::sleep(params.gap).await;
    }
    out.warm_up = figures(&warm, &members, &lock(&seen), 0);
    phase("warm-up", out);
    if !params.quiet.is_zero() {
        let cpu_start = sys::cpu_seconds().unwrap_or(0.0);
        tokio::time::sleep(params.quiet).await;
        out.quiet_cpu_secs = sys::cpu_seconds().unwrap_or(0.0) - cpu_start;
        phase("quiet", out);
    }
    out.edges_at_start = graph(&cluster, params.nodes).await.len();
    let cpu_start = sys::cpu_seconds().unwrap_or(0.0);
    let mut sent: Vec<Sent> = Vec::new();
    let mut send_calls = Vec::new();
    for (n, &from) in measured.iter().enumerate() {
        if let Some((s, took)) = send(from, senders.len() + n).await {
            send_calls.push(took.as_secs_f64() * 1e3);
            wait_all(&seen, &s.2, from, &members, params.message_timeout).await;
            sent.push(s);
        }
        tokio::time::sleep(params.gap).await;
    }
    // Stragglers of timed-out messages still count as delivered (not as complete).
    out.cpu_secs = sys::cpu_seconds().unwrap_or(0.0) - cpu_start;
    out.send_call = Percentiles::of(send_calls);
    let dup = dups.load(std::sync::atomic::Ordering::Relaxed);
    out.meshchat = figures(&sent, &members, &lock(&seen), dup);
    phase("measured messages", out);
    let seen_now = lock(&seen).clone();
    report_laggards(&sent, &by_node, &seen_now, params.message_timeout).await;

    // The connection graph, for the bare run.
    let edges = graph(&cluster, params.nodes).await;
    watchers.abort_all();
    drop(handles);
    cluster.stop_all().await;
    drop(cluster);
    phase("stop", out);
    Ok((edges.into_iter().collect(), members))
}

/// The connections among the cluster's nodes, each as (lower index, higher index).
async fn graph(cluster: &Cluster, nodes: usize) -> BTreeSet<(usize, usize)> {
    let index: HashMap<PeerId, usize> = (0..nodes)
        .filter_map(|i| cluster.peer_id(i).map(|p| (p, i)))
        .collect();
    let mut edges: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in 0..nodes {
        let Some(h) = cluster.handle(i).await else {
            continue;
        };
        let Ok(status) = h.status().await else {
            continue;
        };
        for c in &status.connected {
            let Ok(p) = c.peer_id.parse::<PeerId>() else {
                continue;
            };
            if let Some(&j) = index.get(&p) {
                if i != j {
                    edges.insert((i.min(j), i.max(j)));
                }
            }
        }
    }
    edges
}

/// A command for a bare gossipsub swarm.
enum BareCommand {
    Dial(Multiaddr),
    Subscribe(oneshot::Sender<()>),
    Publish(Vec<u8>),
    /// Connected peers and mesh peers in the topic.
    Status(oneshot::Sender<(usize, usize)>),
}

impl fmt::Debug for BareCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dial(_) => "Dial",
            Self::Subscribe(_) => "Subscribe",
            Self::Publish(_) => "Publish",
            Self::Status(_) => "Status",
        })
    }
}

type BareSwarm = Swarm<groups::ComparisonGossipsub>;

fn bare_swarm(transport: Transport, config: &NodeConfig) -> Result<BareSwarm, SimError> {
    let err = |e: &dyn fmt::Display| SimError::Params(format!("bare swarm: {e}"));
    let (behaviour, _) = groups::gossipsub_as_configured(config).map_err(|e| err(&e))?;
    let idle = Duration::from_secs(3600);
    let builder =
        libp2p::SwarmBuilder::with_existing_identity(Keypair::generate_ed25519()).with_tokio();
    let swarm = match transport {
        Transport::Tcp => builder
            .with_tcp(
                libp2p::tcp::Config::default().nodelay(true),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )
            .map_err(|e| err(&e))?
            .with_behaviour(|_| behaviour)
            .map_err(|e| err(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
        Transport::Memory => builder
            .with_other_transport(|key| {
                use libp2p::{
                    core::{muxing::StreamMuxerBox, transport::MemoryTransport, upgrade::Version},
                    Transport as _,
                };
                let noise = libp2p::noise::Config::new(key)
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
                Ok(MemoryTransport::default()
                    .upgrade(Version::V1)
                    .authenticate(noise)
                    .multiplex(libp2p::yamux::Config::default())
                    .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer))))
            })
            .map_err(|e| err(&e))?
            .with_behaviour(|_| behaviour)
            .map_err(|e| err(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
    };
    Ok(swarm)
}

/// Drive one bare swarm: listen, obey commands, accept every message at once (the node
/// validates before forwarding; here validation is free) and note when each arrived.
async fn drive_bare(
    mut swarm: BareSwarm,
    index: usize,
    topic: IdentTopic,
    topic_params: gossipsub::TopicScoreParams,
    mut commands: mpsc::Receiver<BareCommand>,
    seen: Seen,
    connected: mpsc::Sender<()>,
) {
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => return,
                Some(BareCommand::Dial(addr)) => {
                    if let Err(e) = swarm.dial(addr) {
                        tracing::warn!("bare {index}: dial failed: {e}");
                    }
                }
                Some(BareCommand::Subscribe(done)) => {
                    let g = swarm.behaviour_mut();
                    if g.subscribe(&topic).is_ok() {
                        let _ = g.set_topic_params(topic.clone(), topic_params.clone());
                    }
                    let _ = done.send(());
                }
                Some(BareCommand::Publish(data)) => {
                    if let Err(e) = swarm.behaviour_mut().publish(topic.clone(), data) {
                        tracing::warn!("bare {index}: publish failed: {e}");
                    }
                }
                Some(BareCommand::Status(reply)) => {
                    let hash = topic.hash();
                    let mesh = swarm.behaviour().mesh_peers(&hash).count();
                    let _ = reply.send((swarm.connected_peers().count(), mesh));
                }
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::Behaviour(gossipsub::Event::Message { propagation_source, message_id, message }) => {
                    let now = Instant::now();
                    swarm.behaviour_mut().report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        MessageAcceptance::Accept,
                    );
                    if let Some(key) = message.data.get(..8) {
                        lock(&seen).entry(key.to_vec()).or_default().entry(index).or_insert(now);
                    }
                }
                SwarmEvent::ConnectionEstablished { .. } => {
                    let _ = connected.try_send(());
                }
                _ => {}
            },
        }
    }
}

/// Run bare gossipsub over `edges` with the same members and schedule.
async fn run_bare(
    params: &GroupBenchParams,
    edges: &[(usize, usize)],
    members: &[usize],
    payload_bytes: usize,
    out: &mut GroupBenchOutcome,
) -> Result<(), SimError> {
    let t = Instant::now();
    let config = NodeConfig::new(std::env::temp_dir());
    let (_, topic_params) =
        groups::gossipsub_as_configured(&config).map_err(|e| SimError::Params(e.to_string()))?;
    let topic = IdentTopic::new("mc-g1-bare-gossipsub-benchmark");
    let seen: Seen = Arc::default();
    let (connected_tx, mut connected_rx) = mpsc::channel(edges.len() * 2 + 64);
    let mut tasks = JoinSet::new();
    let mut commands = Vec::with_capacity(params.nodes);
    let mut addrs = Vec::with_capacity(params.nodes);
    let listen: Multiaddr = match params.cluster.transport {
        Transport::Memory => "/memory/0",
        Transport::Tcp => "/ip4/127.0.0.1/tcp/0",
    }
    .parse()
    .expect("invariant: constant multiaddr parses");
    for i in 0..params.nodes {
        let mut swarm = bare_swarm(params.cluster.transport, &config)?;
        swarm
            .listen_on(listen.clone())
            .map_err(|e| SimError::Params(format!("bare swarm {i} cannot listen: {e}")))?;
        // The listen address is reported on the first poll.
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        addrs.push(addr.with(Protocol::P2p(*swarm.local_peer_id())));
        let (tx, rx) = mpsc::channel(256);
        commands.push(tx);
        tasks.spawn(drive_bare(
            swarm,
            i,
            topic.clone(),
            topic_params.clone(),
            rx,
            Arc::clone(&seen),
            connected_tx.clone(),
        ));
    }
    let command = |i: usize, c: BareCommand| {
        let tx = commands[i].clone();
        async move {
            let _ = tx.send(c).await;
        }
    };
    for &(a, b) in edges {
        command(a, BareCommand::Dial(addrs[b].clone())).await;
    }
    // Both ends report each connection.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut established = 0;
    while established < edges.len() * 2 && Instant::now() < deadline {
        if tokio::time::timeout(Duration::from_secs(1), connected_rx.recv())
            .await
            .is_ok()
        {
            established += 1;
        }
    }
    let members = members.to_vec();
    for &i in &members {
        let (tx, rx) = oneshot::channel();
        command(i, BareCommand::Subscribe(tx)).await;
        let _ = rx.await;
    }
    // Let the mesh form: subscriptions exchanged and a few heartbeats.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut mesh = Vec::new();
    for &i in &members {
        let (tx, rx) = oneshot::channel();
        command(i, BareCommand::Status(tx)).await;
        if let Ok((_, m)) = rx.await {
            mesh.push(m);
        }
    }
    mesh.sort_unstable();
    tracing::info!(
        "bare: {established} of {} connection ends up, mesh peers per member: min {}, median {}",
        edges.len() * 2,
        mesh.first().copied().unwrap_or(0),
        mesh.get(mesh.len() / 2).copied().unwrap_or(0)
    );
    out.phases
        .push(("bare setup".into(), t.elapsed().as_secs_f64()));

    let (senders, measured) = schedule(params, &members);
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed.wrapping_add(12));
    let mut counter = 0u64;
    let mut publish = |from: usize| {
        // The first 8 bytes number the message (the key both sides use); the rest is random.
        let mut data = vec![0u8; payload_bytes.max(8)];
        rng.fill_bytes(&mut data);
        counter += 1;
        data[..8].copy_from_slice(&counter.to_le_bytes());
        let key = data[..8].to_vec();
        let tx = commands[from].clone();
        async move {
            let at = Instant::now();
            let _ = tx.send(BareCommand::Publish(data)).await;
            (from, at, key)
        }
    };
    let t = Instant::now();
    let mut warm = Vec::new();
    for &from in &senders {
        let s = publish(from).await;
        wait_all(&seen, &s.2, from, &members, params.message_timeout).await;
        warm.push(s);
        tokio::time::sleep(params.gap).await;
    }
    out.bare_warm_up = Some(figures(&warm, &members, &lock(&seen), 0));
    let cpu_start = sys::cpu_seconds().unwrap_or(0.0);
    let mut sent = Vec::new();
    for &from in &measured {
        let s = publish(from).await;
        wait_all(&seen, &s.2, from, &members, params.message_timeout).await;
        sent.push(s);
        tokio::time::sleep(params.gap).await;
    }
    out.bare_cpu_secs = Some(sys::cpu_seconds().unwrap_or(0.0) - cpu_start);
    out.bare = Some(figures(&sent, &members, &lock(&seen), 0));
    out.phases
        .push(("bare messages".into(), t.elapsed().as_secs_f64()));
    drop(commands);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Run the benchmark: meshchat first, then (if asked) bare gossipsub on the same graph.
pub async fn run(params: GroupBenchParams) -> Result<GroupBenchOutcome, SimError> {
    if params.members < 2 || params.members > params.nodes {
        return Err(SimError::Params(
            "members must be between 2 and the number of nodes".into(),
        ));
    }
    if params.messages == 0 {
        return Err(SimError::Params("at least one measured message".into()));
    }
    let payload_bytes = sealed_size("group bench message 0000 from node 0000")?;
    let mut out = GroupBenchOutcome {
        payload_bytes,
        params: vec![
            ("nodes".into(), params.nodes.to_string()),
            ("members".into(), params.members.to_string()),
            (
                "messages".into(),
                format!(
                    "{} measured, from {} senders, one at a time, {} ms apart",
                    params.messages,
                    params.senders.min(params.members),
                    params.gap.as_millis()
                ),
            ),
            (
                "transport".into(),
                format!("{:?}", params.cluster.transport).to_lowercase(),
            ),
            ("seed".into(), params.seed.to_string()),
            (
                "minute (1:1 mail collection)".into(),
                format!("{:.0} s", params.cluster.minute.as_secs_f64()),
            ),
            (
                "message timeout".into(),
                format!("{:.0} s", params.message_timeout.as_secs_f64()),
            ),
            (
                "quiet before the measured messages".into(),
                format!("{:.0} s", params.quiet.as_secs_f64()),
            ),
        ],
        ..GroupBenchOutcome::default()
    };
    let (edges, members) = run_meshchat(&params, &mut out).await?;
    out.edges = edges.len();
    out.mean_degree = edges.len() as f64 * 2.0 / params.nodes as f64;
    if params.bare {
        run_bare(&params, &edges, &members, payload_bytes, &mut out).await?;
    }
    Ok(out)
}

/// `meshchat-sim group-bench` arguments.
#[derive(Debug, clap::Args)]
pub struct GroupBenchArgs {
    /// Nodes (users) in the network.
    #[arg(long, default_value_t = 120)]
    pub nodes: usize,
    /// Group members (at most the number of nodes; the protocol allows 1,000).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Members that write.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Measured messages (after one warm-up message per sender).
    #[arg(long, default_value_t = 40)]
    pub messages: usize,
    /// Milliseconds between a message reaching everybody and the next.
    #[arg(long, default_value_t = 250)]
    pub gap_ms: u64,
    /// Seconds one message may take to reach every member.
    #[arg(long, default_value_t = 30.0)]
    pub message_timeout: f64,
    /// Seconds the group may take to form.
    #[arg(long, default_value_t = 300.0)]
    pub formation_timeout: f64,
    /// Invitations the creator sends at once.
    #[arg(long, default_value_t = 16)]
    pub parallel_invites: usize,
    /// Nodes started at once.
    #[arg(long, default_value_t = 8)]
    pub parallel_start: usize,
    /// Seed of identities, senders and payloads.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How nodes connect: memory (in-process) or tcp (127.0.0.1); both runs use it.
    #[arg(long, value_enum, default_value_t = Transport::Memory)]
    pub transport: Transport,
    /// Where the temporary folder of node homes goes (default: the system's temp dir).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// Seconds between a node's 1:1 mail collections (60 in a real node): invitations to
    /// members who are not contacts travel through their mailbox, so this paces the formation;
    /// it does not touch group messages, which go over gossipsub.
    #[arg(long, default_value_t = 10.0)]
    pub minute: f64,
    /// Seconds to wait between the warm-up and the measured messages: the connections the
    /// sender-key hand-outs opened close after the idle timeout (60 s) unless something
    /// still uses them, as in a group that has been talking for a while.
    #[arg(long, default_value_t = 0.0)]
    pub quiet: f64,
    /// Skip the bare gossipsub run.
    #[arg(long)]
    pub no_bare: bool,
    /// Log level (RUST_LOG syntax), to stderr.
    #[arg(long, default_value = "warn,meshchat_simulations=info")]
    pub log: String,
}

impl GroupBenchArgs {
    /// The parameters these arguments describe.
    pub fn params(&self) -> Result<GroupBenchParams, SimError> {
        let secs = |s: f64| {
            Duration::try_from_secs_f64(s)
                .map_err(|_| SimError::Params(format!("{s} is not a duration in seconds")))
        };
        Ok(GroupBenchParams {
            nodes: self.nodes,
            members: self.members,
            senders: self.senders,
            messages: self.messages,
            gap: Duration::from_millis(self.gap_ms),
            message_timeout: secs(self.message_timeout)?,
            formation_timeout: secs(self.formation_timeout)?,
            settle: Duration::from_secs(120),
            quiet: secs(self.quiet)?,
            parallel_start: self.parallel_start,
            parallel_invites: self.parallel_invites,
            seed: self.seed,
            cluster: ClusterConfig {
                transport: self.transport,
                dir: self.dir.clone(),
                send_timeout: Duration::from_secs(2),
                minute: secs(self.minute)?,
                bootstrap_peers: 3,
                idle_timeout: None,
            },
            bare: !self.no_bare,
        })
    }
}
