//! The replica side of `/meshchat/mailbox/1.0.0`: answers STORE, FETCH, DELETE, REPLICATE and
//! SUBSCRIBE from peers, pushes new mail to subscribed recipients, and keeps the mail it holds
//! on the closest peers of each mailbox (repair, hand-off). See `docs/protocol.md`, "Mailboxes".
//!
//! ```text
//! event loop --InboundMailbox--> serve() --task each, ≤16 at once--> spawn_blocking: auth check + ReplicaStore
//!                                        <--MailboxRespond--
//! STORE (new) --> Deliver to subscribers of that mailbox (spawned, best effort)
//! DELIVER (we are the recipient) --> handed to messaging (crate::messaging) to open
//! repair tick --> for each mailbox: closest r peers --> REPLICATE what they may miss
//! ```

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex as StdMutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use libp2p::{request_response::ResponseChannel, PeerId};
use meshchat_protocol::{
    envelope::Envelope, mailbox::MAX_FETCH_ENVELOPES, MailboxReject, MailboxRequest,
    MailboxResponse,
};
use tokio::sync::{mpsc, watch, Semaphore};

use super::{short, Config, RateLimiter, ReplicaStore};
use crate::{
    dht::unix_now,
    event_loop::{InboundMailbox, NetClient},
};

/// Subscriptions held at once (per node); more are refused as `Busy`.
const MAX_SUBSCRIPTIONS: usize = 4096;
/// Requests answered at once (each on the blocking pool while it reads or writes).
const MAX_SERVING: usize = 16;
/// Replications in flight at once during repair.
const REPAIR_PARALLEL: usize = 8;
/// A push that failed is tried again after these waits (then left to the next collection).
const PUSH_RETRIES: [Duration; 4] = [
    Duration::from_secs(5),
    Duration::from_secs(15),
    Duration::from_secs(45),
    Duration::from_secs(135),
];
/// Failed pushes waiting to be tried again at once; more are not retried.
const MAX_PUSH_RETRYING: usize = 256;
/// A mailbox whose repair changed nothing (the same closest peers, the same mail, no copy
/// newly accepted) is repaired again after 2, then 4 intervals instead of every interval
/// (`2^steps`), until something changes.
const MAX_QUIET_STEPS: u32 = 2;

/// An envelope a replica pushed to us (we are its recipient).
#[derive(Debug)]
pub(crate) struct Pushed {
    pub(crate) peer: PeerId,
    pub(crate) envelope: Envelope,
    pub(crate) channel: ResponseChannel<MailboxResponse>,
}

/// The replica service state.
#[derive(Debug)]
pub(crate) struct Service {
    store: Arc<ReplicaStore>,
    net: NetClient,
    config: Config,
    rate: StdMutex<RateLimiter<PeerId>>,
    subscriptions: StdMutex<HashMap<[u8; 32], HashMap<PeerId, Instant>>>,
    /// When each mailbox is due for repair by the clock.
    repairs: StdMutex<RepairSchedule>,
    /// Permits for failed pushes waiting to be retried ([`MAX_PUSH_RETRYING`]).
    push_retrying: Arc<Semaphore>,
}

/// Push `envelope` to subscriber `peer`; if that fails (the peer unreachable for a while, busy,
/// a partition that heals), try again after each of [`PUSH_RETRIES`], while a retry permit is
/// free. Without retries, such mail would wait for the subscriber's next collection, which for
/// a quiet mailbox comes only every few minutes.
async fn push(net: NetClient, peer: PeerId, envelope: Envelope, retrying: Arc<Semaphore>) {
    let mut waits = PUSH_RETRIES.iter();
    let mut permit = None;
    loop {
        let request = MailboxRequest::Deliver {
            envelope: envelope.clone(),
        };
        match net.mailbox_request(peer, request).await {
            Ok(Ok(MailboxResponse::Stored { .. })) => {
                tracing::debug!(%peer, "pushed mail to a subscriber");
                return;
            }
            Err(_) => return,
            Ok(Ok(MailboxResponse::Refused { reason })) if !reason.is_transient() => {
                tracing::debug!(%peer, %reason, "a subscriber refused a push");
                return;
            }
            other => tracing::debug!(%peer, ?other, "push to a subscriber failed"),
        }
        if permit.is_none() {
            permit = Arc::clone(&retrying).try_acquire_owned().ok();
        }
        let (Some(_), Some(wait)) = (&permit, waits.next()) else {
            return;
        };
        tokio::time::sleep(*wait).await;
    }
}

/// Which mailboxes a repair or hand-over round covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// A round by the clock: the mailboxes due ([`RepairSchedule`]).
    Due,
    /// Every mailbox (a repair asked for).
    All,
    /// Every mailbox, to the closest peers other than this node, which is stopping.
    Leaving,
}

/// When each mailbox a replica holds is due for repair by the clock. Each repair looks the
/// mailbox up and sends every envelope to each of its closest peers again. A mailbox whose
/// repair changed nothing — the same closest peers, the same mail, no copy newly accepted —
/// waits 2, then 4 intervals ([`MAX_QUIET_STEPS`]); new mail, another replica set or a copy
/// someone lacked brings it back to every interval. That serves mail kept for days for a user
/// who is away; among 1,000 busy nodes, where a mailbox holds mail for a minute or two and
/// keeps changing, only 443 of 5,653 repairs were quiet (docs/performance.md).
#[derive(Debug, Default)]
struct RepairSchedule {
    by_mailbox: HashMap<[u8; 32], Quiet>,
}

#[derive(Debug)]
struct Quiet {
    steps: u32,
    /// The closest peers of the last repair, sorted.
    targets: Vec<PeerId>,
    /// [`fingerprint`] of the mail the last repair handed out.
    contents: u64,
    due: Instant,
}

impl RepairSchedule {
    fn due(&self, mailbox: &[u8; 32], now: Instant) -> bool {
        self.by_mailbox.get(mailbox).is_none_or(|q| q.due <= now)
    }

    /// A repair of `mailbox` at `now` handed `contents` to `targets`, who accepted `copies`
    /// they lacked. Returns what made it due every interval, if anything (for the debug log).
    fn repaired(
        &mut self,
        mailbox: [u8; 32],
        targets: &[PeerId],
        contents: u64,
        copies: usize,
        interval: Duration,
        now: Instant,
    ) -> Option<&'static str> {
        let mut targets = targets.to_vec();
        targets.sort_unstable();
        let busy = match self.by_mailbox.get(&mailbox) {
            None => Some("new mail or first repair"),
            Some(_) if copies > 0 => Some("a copy was lacking"),
            Some(q) if q.targets != targets => Some("other closest peers"),
            Some(q) if q.contents != contents => Some("other mail"),
            Some(_) => None,
        };
        let steps = match (busy, self.by_mailbox.get(&mailbox)) {
            (None, Some(q)) => (q.steps + 1).min(MAX_QUIET_STEPS),
            _ => 0,
        };
        let wait = super::quiet_wait(interval, steps, Duration::MAX);
        self.by_mailbox.insert(
            mailbox,
            Quiet {
                steps,
                targets,
                contents,
                due: now + wait,
            },
        );
        busy
    }

    /// New mail arrived in `mailbox`: repair it in the next round.
    fn changed(&mut self, mailbox: &[u8; 32]) {
        self.by_mailbox.remove(mailbox);
    }

    /// Forget the mailboxes no longer held.
    fn keep_only(&mut self, held: &[[u8; 32]]) {
        let held: HashSet<&[u8; 32]> = held.iter().collect();
        self.by_mailbox.retain(|m, _| held.contains(m));
    }
}

/// Which envelopes a repair handed out, in one number.
fn fingerprint(envelopes: &[Envelope]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut ids: Vec<[u8; 32]> = envelopes.iter().map(Envelope::id).collect();
    ids.sort_unstable();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ids.hash(&mut h);
    h.finish()
}

/// Resolves once the node is stopping.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Service {
    pub(crate) fn new(store: Arc<ReplicaStore>, net: NetClient, config: Config) -> Self {
        let rate = RateLimiter::new(config.limits.stores_per_minute, config.limits.store_burst);
        Self {
            store,
            net,
            config,
            rate: StdMutex::new(rate),
            subscriptions: StdMutex::new(HashMap::new()),
            repairs: StdMutex::new(RepairSchedule::default()),
            push_retrying: Arc::new(Semaphore::new(MAX_PUSH_RETRYING)),
        }
    }

    pub(crate) fn store(&self) -> &Arc<ReplicaStore> {
        &self.store
    }

    /// Answer mailbox requests until shutdown; returns once every request being answered is
    /// (no answer is left running on the store after the node stopped).
    pub(crate) async fn serve(
        self: Arc<Self>,
        inbound: mpsc::Receiver<InboundMailbox>,
        pushed: mpsc::Sender<Pushed>,
        shutdown: watch::Receiver<bool>,
    ) {
        let serving = Arc::new(Semaphore::new(MAX_SERVING));
        self.serve_until_stopped(inbound, pushed, shutdown, &serving)
            .await;
        let all = u32::try_from(MAX_SERVING).unwrap_or(u32::MAX);
        let _ = serving.acquire_many(all).await;
    }

    async fn serve_until_stopped(
        self: Arc<Self>,
        mut inbound: mpsc::Receiver<InboundMailbox>,
        pushed: mpsc::Sender<Pushed>,
        mut shutdown: watch::Receiver<bool>,
        serving: &Arc<Semaphore>,
    ) {
        loop {
            let item = tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                item = inbound.recv() => match item {
                    Some(item) => item,
                    None => return,
                },
            };
            let InboundMailbox {
                peer,
                request,
                channel,
            } = item;
            if let MailboxRequest::Deliver { envelope } = request {
                if let Err(
                    mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p),
                ) = pushed.try_send(Pushed {
                    peer,
                    envelope,
                    channel,
                }) {
                    let refused = MailboxResponse::Refused {
                        reason: MailboxReject::Busy,
                    };
                    if self.net.mailbox_respond(p.channel, refused).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            // Requests are answered concurrently, up to `MAX_SERVING` at once; beyond that this
            // loop waits and the event loop's queue fills, then refuses as `Busy`. One at a
            // time, the 3 replicas of a 200-member group's mailbox refused most of its members'
            // collections (each request waited for the synced store before it).
            let Ok(permit) = Arc::clone(serving).acquire_owned().await else {
                return;
            };
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                this.answer(peer, request, channel).await;
                // This task's reference to the store goes before its slot: `serve` returns once
                // every slot is back.
                drop(this);
                drop(permit);
            });
        }
    }

    /// Answer one request (a strike first if it was hostile).
    async fn answer(
        self: &Arc<Self>,
        peer: PeerId,
        request: MailboxRequest,
        channel: ResponseChannel<MailboxResponse>,
    ) {
        let response = self.handle(peer, request).await;
        if let MailboxResponse::Refused { reason } = &response {
            tracing::debug!(%peer, %reason, "refused a mailbox request");
            if reason.is_hostile() && self.net.strike(peer, reason.to_string()).await.is_err() {
                return;
            }
        }
        let _ = self.net.mailbox_respond(channel, response).await;
    }

    async fn handle(self: &Arc<Self>, peer: PeerId, request: MailboxRequest) -> MailboxResponse {
        let refused = |reason| MailboxResponse::Refused { reason };
        if !self.config.serve {
            return refused(MailboxReject::Busy);
        }
        if matches!(
            request,
            MailboxRequest::Store { .. } | MailboxRequest::Replicate { .. }
        ) && !lock(&self.rate).check(&peer, Instant::now())
        {
            return refused(MailboxReject::RateLimited);
        }
        let now = unix_now();
        let this = Arc::clone(self);
        let result = tokio::task::spawn_blocking(move || this.handle_blocking(peer, request, now))
            .await
            .unwrap_or_else(|_| (refused(MailboxReject::Internal), None));
        let (response, push) = result;
        if let Some(envelope) = push {
            self.push_to_subscribers(envelope);
        }
        response
    }

    /// The synchronous part: authorisation and the store. Returns the answer and, for a new
    /// envelope, the envelope to push to subscribers.
    fn handle_blocking(
        &self,
        peer: PeerId,
        request: MailboxRequest,
        now: u64,
    ) -> (MailboxResponse, Option<Envelope>) {
        let refused = |reason| (MailboxResponse::Refused { reason }, None);
        if let Err(reason) = request.authorise(now) {
            return refused(reason);
        }
        match request {
            MailboxRequest::Store { envelope } | MailboxRequest::Replicate { envelope } => {
                match self.store.store(&envelope, now) {
                    Ok(out) => {
                        if !out.duplicate {
                            lock(&self.repairs).changed(&envelope.routing_key);
                        }
                        (
                            MailboxResponse::Stored {
                                envelope_id: out.envelope_id,
                                duplicate: out.duplicate,
                            },
                            (!out.duplicate).then_some(envelope),
                        )
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "mailbox store refused");
                        refused(e.reject())
                    }
                }
            }
            MailboxRequest::Fetch { mailbox, after, .. } => {
                match self.store.fetch(&mailbox, after, MAX_FETCH_ENVELOPES, now) {
                    Ok((envelopes, more)) => (MailboxResponse::Envelopes { envelopes, more }, None),
                    Err(e) => refused(e.reject()),
                }
            }
            MailboxRequest::Delete { mailbox, ids, .. } => {
                match self.store.delete(&mailbox, &ids, now) {
                    Ok(count) => (MailboxResponse::Deleted { count }, None),
                    Err(e) => refused(e.reject()),
                }
            }
            MailboxRequest::Subscribe { mailbox, .. } => {
                let mut subs = lock(&self.subscriptions);
                let total: usize = subs.values().map(HashMap::len).sum();
                if total >= MAX_SUBSCRIPTIONS {
                    let now_i = Instant::now();
                    subs.retain(|_, peers| {
                        peers.retain(|_, until| *until > now_i);
                        !peers.is_empty()
                    });
                    if subs.values().map(HashMap::len).sum::<usize>() >= MAX_SUBSCRIPTIONS {
                        return refused(MailboxReject::Busy);
                    }
                }
                tracing::debug!(%peer, mailbox = %short(&mailbox), "a recipient subscribed");
                subs.entry(mailbox)
                    .or_default()
                    .insert(peer, Instant::now() + self.config.subscription);
                (MailboxResponse::Subscribed, None)
            }
            MailboxRequest::Deliver { .. } => refused(MailboxReject::Malformed),
        }
    }

    fn push_to_subscribers(&self, envelope: Envelope) {
        let now = Instant::now();
        let peers: Vec<PeerId> = {
            let mut subs = lock(&self.subscriptions);
            let peers = subs.get_mut(&envelope.routing_key).map(|peers| {
                peers.retain(|_, until| *until > now);
                peers.keys().copied().collect()
            });
            peers.unwrap_or_default()
        };
        tracing::debug!(
            mailbox = %short(&envelope.routing_key),
            subscribers = peers.len(),
            "new mail"
        );
        for peer in peers {
            let net = self.net.clone();
            let envelope = envelope.clone();
            let retrying = Arc::clone(&self.push_retrying);
            tokio::spawn(push(net, peer, envelope, retrying));
        }
    }

    /// Sweep expired mail, then hand copies of every mailbox's mail to those of its `r`
    /// closest peers that lack them (REPLICATE is idempotent: a holder answers `duplicate`).
    /// Returns how many copies were newly accepted.
    pub(crate) async fn repair(&self) -> usize {
        self.repair_round(Round::All).await
    }

    async fn repair_round(&self, round: Round) -> usize {
        let store = Arc::clone(&self.store);
        let now = unix_now();
        match tokio::task::spawn_blocking(move || store.sweep(now)).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(swept = n, "expired mailbox replicas dropped"),
            Ok(Err(e)) => tracing::warn!(error = %e, "sweeping mailbox replicas failed"),
            _ => {}
        }
        self.hand_over_round(round).await
    }

    /// Hand every mailbox's mail to the `r` closest peers other than this node, which is
    /// stopping (a clean shutdown).
    pub(crate) async fn hand_over(&self) -> usize {
        self.hand_over_round(Round::Leaving).await
    }

    async fn hand_over_round(&self, round: Round) -> usize {
        let leaving = round == Round::Leaving;
        let mut copies = 0;
        let mailboxes = self.store.mailboxes();
        lock(&self.repairs).keep_only(&mailboxes);
        let mut skipped = 0;
        for mailbox in mailboxes {
            if round == Round::Due && !lock(&self.repairs).due(&mailbox, Instant::now()) {
                skipped += 1;
                continue;
            }
            let Ok(crate::event_loop::Lookup { peers: targets, .. }) = self
                .net
                .closest_peers(
                    mailbox.to_vec(),
                    self.config.replicas,
                    crate::event_loop::LookupPurpose::MailboxRepair,
                )
                .await
            else {
                return copies;
            };
            let store = Arc::clone(&self.store);
            let now = unix_now();
            let envelopes =
                match tokio::task::spawn_blocking(move || store.all(&mailbox, now)).await {
                    Ok(Ok(e)) => e,
                    _ => continue,
                };
            let mut jobs: Vec<(PeerId, Envelope)> = Vec::new();
            for peer in &targets {
                for e in &envelopes {
                    jobs.push((*peer, e.clone()));
                }
            }
            let results: Vec<bool> = futures::stream::iter(jobs)
                .map(|(peer, envelope)| async move {
                    matches!(
                        self.net
                            .mailbox_request(peer, MailboxRequest::Replicate { envelope })
                            .await,
                        Ok(Ok(MailboxResponse::Stored {
                            duplicate: false,
                            ..
                        }))
                    )
                })
                .buffer_unordered(REPAIR_PARALLEL)
                .collect()
                .await;
            let accepted = results.into_iter().filter(|b| *b).count();
            copies += accepted;
            if !leaving {
                let busy = lock(&self.repairs).repaired(
                    mailbox,
                    &targets,
                    fingerprint(&envelopes),
                    accepted,
                    self.config.repair_interval,
                    Instant::now(),
                );
                tracing::debug!(
                    mailbox = %short(&mailbox),
                    why = busy.unwrap_or("quiet"),
                    ?targets,
                    envelopes = envelopes.len(),
                    accepted,
                    "mailbox repaired"
                );
            }
        }
        if leaving || copies > 0 || skipped > 0 {
            tracing::debug!(copies, leaving, skipped, "mailbox replicas handed over");
        }
        copies
    }

    /// The repair loop: every `repair_interval` (±[`super::JITTER`]) until shutdown.
    pub(crate) async fn repair_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                _ = tokio::time::sleep(super::jittered(self.config.repair_interval)) => {
                    self.repair_round(Round::Due).await;
                }
            }
        }
    }

    /// Peers subscribed to any mailbox (for tests and status).
    #[allow(dead_code)]
    pub(crate) fn subscribers(&self) -> HashSet<PeerId> {
        lock(&self.subscriptions)
            .values()
            .flat_map(|m| m.keys().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_repair_that_changes_nothing_waits_two_then_four_intervals() {
        let mut s = RepairSchedule::default();
        let (m, t0) = ([1u8; 32], Instant::now());
        let peers = vec![PeerId::random(), PeerId::random(), PeerId::random()];
        assert!(s.due(&m, t0), "a mailbox never repaired is due");
        assert_eq!(
            s.repaired(m, &peers, 7, 0, MINUTE, t0),
            Some("new mail or first repair")
        );
        // First seen: the next round (which comes 48–72 s later) repairs it again.
        assert!(s.due(&m, t0 + MINUTE.mul_f64(1.0 - super::super::JITTER)));
        let t1 = t0 + MINUTE;
        // The same peers in another order, the same mail: quiet.
        let mut shuffled = peers.clone();
        shuffled.reverse();
        assert_eq!(s.repaired(m, &shuffled, 7, 0, MINUTE, t1), None);
        assert!(!s.due(&m, t1 + MINUTE), "quiet once: two intervals");
        assert!(s.due(&m, t1 + MINUTE * 2));
        let t2 = t1 + MINUTE * 2;
        s.repaired(m, &peers, 7, 0, MINUTE, t2);
        assert!(!s.due(&m, t2 + MINUTE * 3), "quiet twice: four intervals");
        assert!(s.due(&m, t2 + MINUTE * 4));
        let t3 = t2 + MINUTE * 4;
        s.repaired(m, &peers, 7, 0, MINUTE, t3);
        assert!(s.due(&m, t3 + MINUTE * 4), "never more than four");
    }

    #[test]
    fn new_mail_another_replica_or_a_copy_someone_lacked_brings_a_mailbox_back() {
        let peers = vec![PeerId::random(), PeerId::random(), PeerId::random()];
        let (m, t0) = ([2u8; 32], Instant::now());
        let quiet = |s: &mut RepairSchedule| {
            s.repaired(m, &peers, 7, 0, MINUTE, t0);
            s.repaired(m, &peers, 7, 0, MINUTE, t0);
            assert!(!s.due(&m, t0 + MINUTE));
        };
        let later = t0 + MINUTE;
        let mut s = RepairSchedule::default();
        quiet(&mut s);
        s.changed(&m);
        assert!(s.due(&m, t0), "new mail: due at once");

        let mut s = RepairSchedule::default();
        quiet(&mut s);
        let other = vec![peers[0], peers[1], PeerId::random()];
        assert_eq!(
            s.repaired(m, &other, 7, 0, MINUTE, t0),
            Some("other closest peers")
        );
        assert!(s.due(&m, later), "another replica set: every interval");

        let mut s = RepairSchedule::default();
        quiet(&mut s);
        assert_eq!(s.repaired(m, &peers, 8, 0, MINUTE, t0), Some("other mail"));
        assert!(
            s.due(&m, later),
            "other mail (some collected): every interval"
        );

        let mut s = RepairSchedule::default();
        quiet(&mut s);
        assert_eq!(
            s.repaired(m, &peers, 7, 1, MINUTE, t0),
            Some("a copy was lacking")
        );
        assert!(s.due(&m, later), "a copy someone lacked: every interval");

        let mut s = RepairSchedule::default();
        quiet(&mut s);
        s.keep_only(&[[3u8; 32]]);
        assert!(s.due(&m, t0), "a mailbox no longer held is forgotten");
    }
}
