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

use super::{Config, RateLimiter, ReplicaStore};
use crate::{
    dht::unix_now,
    event_loop::{InboundMailbox, NetClient},
};

/// How long a SUBSCRIBE lasts unless renewed.
pub(crate) const SUBSCRIPTION_SECS: u64 = 600;
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
                    Ok(out) => (
                        MailboxResponse::Stored {
                            envelope_id: out.envelope_id,
                            duplicate: out.duplicate,
                        },
                        (!out.duplicate).then_some(envelope),
                    ),
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
                subs.entry(mailbox).or_default().insert(
                    peer,
                    Instant::now() + Duration::from_secs(SUBSCRIPTION_SECS),
                );
                (MailboxResponse::Subscribed, None)
            }
            MailboxRequest::Deliver { .. } => refused(MailboxReject::Malformed),
        }
    }

    fn push_to_subscribers(&self, envelope: Envelope) {
        let now = Instant::now();
        let peers: Vec<PeerId> = {
            let mut subs = lock(&self.subscriptions);
            let Some(peers) = subs.get_mut(&envelope.routing_key) else {
                return;
            };
            peers.retain(|_, until| *until > now);
            peers.keys().copied().collect()
        };
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
        let store = Arc::clone(&self.store);
        let now = unix_now();
        match tokio::task::spawn_blocking(move || store.sweep(now)).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(swept = n, "expired mailbox replicas dropped"),
            Ok(Err(e)) => tracing::warn!(error = %e, "sweeping mailbox replicas failed"),
            _ => {}
        }
        self.hand_over(false).await
    }

    /// Hand every mailbox's mail to its closest peers; with `leaving`, to the `r` closest other
    /// than this node (a clean shutdown).
    pub(crate) async fn hand_over(&self, leaving: bool) -> usize {
        let mut copies = 0;
        for mailbox in self.store.mailboxes() {
            let Ok(targets) = self
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
            copies += results.into_iter().filter(|b| *b).count();
        }
        if leaving || copies > 0 {
            tracing::debug!(copies, leaving, "mailbox replicas handed over");
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
                    self.repair().await;
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
