//! The one task that owns the libp2p [`Swarm`]. See `docs/architecture.md`, "Event loop".
//!
//! ```text
//!   NodeHandle / messaging tasks            EventLoop (owns the Swarm)
//!   ---------------------------            ----------------------------------------------
//!   NetClient::get_record ---Command-----> kad.get_record   -> pending_get[QueryId]
//!   NetClient::put_record ---Command-----> store locally, kad.get_closest_peers
//!                                           -> pending_put_lookup[QueryId]
//!                                          then kad.put_record_to(those peers)
//!                                           -> pending_put[QueryId]
//!   NetClient::send_batch ---Command-----> direct.send_request -> pending_send[RequestId]
//!        <------------------oneshot------- reply when the query / request completes
//!   inbound worker <--mpsc (bounded)------ direct request (envelopes + ResponseChannel)
//!   NetClient::respond ------Command-----> direct.send_response
//!   publisher <--------------watch-------- dialable addresses changed
//! ```
//!
//! The loop never blocks and never awaits anything but its own inputs: storage and crypto run
//! in the messaging tasks (`crate::messaging`) on `spawn_blocking`. Local work (commands) is
//! served before new remote work (`select!` is biased towards commands). DHT records pushed by
//! peers are checked on `spawn_blocking` ([`crate::dht::check`]) and stored when the verdict
//! comes back through its own `select!` arm; peers that send undecodable requests,
//! forged envelopes or invalid records collect strikes and are blocked for a while once they
//! have too many.

use std::{
    collections::{hash_map::Entry, HashMap, VecDeque},
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use libp2p::{
    core::ConnectedPoint,
    identify, kad,
    multiaddr::Protocol,
    request_response::{self, OutboundRequestId, ResponseChannel},
    swarm::{ConnectionId, DialError, PeerAddresses, SwarmEvent},
    Multiaddr, PeerId, Swarm,
};
use meshchat_protocol::envelope::Envelope;
use meshchat_protocol::records::ValidRecord;
use meshchat_protocol::{MailboxReject, MailboxRequest, MailboxResponse};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};

mod closest;
pub(crate) use closest::Lookup;
mod groups;
mod nat;

/// What a closest-peers lookup is for: named in the debug log, and it decides how old a
/// remembered answer may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LookupPurpose {
    /// Storing an envelope on its mailbox's replicas.
    MailboxStore,
    /// A replica's periodic repair of a mailbox it holds.
    MailboxRepair,
    /// Collecting one of our 1:1 mailboxes.
    MailboxCollection,
    /// Collecting a group mailbox.
    GroupMailboxCollection,
}

impl LookupPurpose {
    fn as_str(self) -> &'static str {
        match self {
            Self::MailboxStore => "mailbox store",
            Self::MailboxRepair => "mailbox repair",
            Self::MailboxCollection => "mailbox collection",
            Self::GroupMailboxCollection => "group mailbox collection",
        }
    }

    /// How old a remembered answer may be for this purpose.
    fn max_age(self) -> std::time::Duration {
        match self {
            Self::MailboxRepair => closest::REPAIR_TTL,
            _ => closest::TTL,
        }
    }
}

pub(crate) use groups::{
    gossipsub_behaviour, topic_score_params, GossipInbound, GroupCommand, GroupNet, PublishOutcome,
};
pub(crate) use nat::{relay_server_config, NatNet, NatStatus};

use crate::{
    behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL},
    config::Limits,
    dht,
    direct::{DirectReply, DirectRequest, Framed, RejectReason},
};

/// Capacity of the command channel (handles wait when it is full).
pub(crate) const COMMAND_CAPACITY: usize = 64;
/// Capacity of the inbound-envelope channel; when full, new envelopes are answered `Busy`.
pub(crate) const INBOUND_CAPACITY: usize = 64;
/// A lookup replies this long after its first record even if the query is still running.
const GET_RECORD_GRACE: Duration = Duration::from_millis(500);
/// A lookup replies once it holds this many records.
const GET_RECORD_ENOUGH: usize = 4;
/// Pushed DHT records being checked at once; more are dropped (the pusher got its answer).
const MAX_PENDING_CHECKS: usize = 64;
/// How often deadlines (lookups, bans) are checked.
const TICK: Duration = Duration::from_millis(100);
/// Peers whose listen addresses (from identify) are remembered, least recently heard of
/// forgotten first (libp2p's `PeerAddresses` keeps up to 10 addresses each).
const MAX_HEARD_PEERS: NonZeroUsize = NonZeroUsize::new(4_096).expect("positive");

/// A record found by a lookup: untrusted, to be validated by the caller.
#[derive(Debug, Clone)]
pub(crate) struct FoundRecord {
    /// Who sent it (`None`: our own store).
    pub(crate) peer: Option<PeerId>,
    /// The value.
    pub(crate) value: Vec<u8>,
}

/// A batch of envelopes pushed to us (1 to `MAX_BATCH_ENVELOPES`), waiting for the messaging
/// worker.
#[derive(Debug)]
pub(crate) struct InboundBatch {
    pub(crate) peer: PeerId,
    pub(crate) envelopes: Vec<Envelope>,
    pub(crate) channel: ResponseChannel<DirectReply>,
}

/// One mailbox request from a peer, waiting for the mailbox service (`crate::mailbox`).
#[derive(Debug)]
pub(crate) struct InboundMailbox {
    pub(crate) peer: PeerId,
    pub(crate) request: MailboxRequest,
    pub(crate) channel: ResponseChannel<MailboxResponse>,
}

/// A connection, as shown by `status`.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionInfo {
    pub(crate) addr: Multiaddr,
    pub(crate) relayed: bool,
}

/// The network part of the node status.
#[derive(Debug, Clone)]
pub(crate) struct NetStatus {
    pub(crate) peer_id: PeerId,
    pub(crate) listen_addrs: Vec<Multiaddr>,
    pub(crate) external_addrs: Vec<Multiaddr>,
    pub(crate) connected: Vec<(PeerId, ConnectionInfo)>,
    pub(crate) routing_table_size: usize,
    pub(crate) dht_records_held: usize,
    pub(crate) dht_server: bool,
    /// Reachability: AutoNAT verdict, relay reservations, hole punching, relay server.
    pub(crate) nat: NatStatus,
}

/// What the handles ask the loop to do.
#[derive(Debug)]
pub(crate) enum Command {
    Status(oneshot::Sender<NetStatus>),
    GetRecord {
        key: Vec<u8>,
        reply: oneshot::Sender<Vec<FoundRecord>>,
    },
    PutRecord {
        record: kad::Record,
        reply: oneshot::Sender<Result<(), String>>,
    },
    LocalRecord {
        key: Vec<u8>,
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
    SendBatch {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        envelopes: Vec<Envelope>,
        reply: oneshot::Sender<Result<DirectReply, String>>,
    },
    Respond {
        channel: ResponseChannel<DirectReply>,
        reply: DirectReply,
    },
    Strike {
        peer: PeerId,
        reason: String,
    },
    ClosestPeers {
        key: Vec<u8>,
        count: NonZeroUsize,
        /// What the caller wants them for.
        purpose: LookupPurpose,
        reply: oneshot::Sender<Lookup>,
    },
    MailboxRequest {
        peer: PeerId,
        request: MailboxRequest,
        reply: oneshot::Sender<Result<MailboxResponse, String>>,
    },
    MailboxRespond {
        channel: ResponseChannel<MailboxResponse>,
        response: MailboxResponse,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Test hook (simulations): refuse, or accept again, every connection with `peers`.
    SetBlocked {
        peers: Vec<PeerId>,
        blocked: bool,
        reply: oneshot::Sender<()>,
    },
    /// Test hook: end every closest-peers lookup at once, or no longer.
    StuntLookups {
        on: bool,
        reply: oneshot::Sender<()>,
    },
    Shutdown(oneshot::Sender<()>),
    /// Group channels (gossipsub): see [`groups`].
    Group(GroupCommand),
}

/// The front of the event loop: cheap to clone, every method sends one [`Command`].
#[derive(Debug, Clone)]
pub(crate) struct NetClient {
    tx: mpsc::Sender<Command>,
    mailbox_slots: Arc<PeerSlots>,
}

/// Mailbox requests in flight to one peer at most. Every node drops inbound streams beyond its
/// per-connection limit (`Limits::max_direct_streams`, 32): a replica pushing a burst of new
/// mail to a subscriber (each envelope at once) lost the pushes above it ("Dropping inbound
/// stream because we are at capacity", seen in group simulations; test
/// `a_burst_pushed_to_a_slow_subscriber_arrives_whole`), and so would a member storing a burst
/// of group messages on the same few replicas. Above this limit requests wait for a slot.
const MAILBOX_IN_FLIGHT_PER_PEER: usize = 16;

/// One semaphore per peer with mailbox requests in flight (removed when none are).
#[derive(Debug, Default)]
struct PeerSlots(std::sync::Mutex<HashMap<PeerId, Arc<tokio::sync::Semaphore>>>);

/// A slot for one mailbox request to `peer`; dropping it (also when the request's future is
/// dropped midway) frees the slot and forgets the peer once nobody holds or awaits one.
struct MailboxSlot {
    slots: Arc<PeerSlots>,
    peer: PeerId,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl PeerSlots {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Arc<tokio::sync::Semaphore>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn acquire(self: &Arc<Self>, peer: PeerId) -> MailboxSlot {
        let semaphore =
            Arc::clone(self.lock().entry(peer).or_insert_with(|| {
                Arc::new(tokio::sync::Semaphore::new(MAILBOX_IN_FLIGHT_PER_PEER))
            }));
        MailboxSlot {
            slots: Arc::clone(self),
            peer,
            // The semaphore is never closed.
            permit: semaphore.acquire_owned().await.ok(),
        }
    }
}

impl Drop for MailboxSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut map = self.slots.lock();
        if let Some(s) = map.get(&self.peer) {
            // Only the map holds it and nobody is in flight: forget the peer.
            if Arc::strong_count(s) == 1 && s.available_permits() == MAILBOX_IN_FLIGHT_PER_PEER {
                map.remove(&self.peer);
            }
        }
    }
}

/// The event loop has stopped.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the network event loop has stopped")]
pub(crate) struct LoopStopped;

impl NetClient {
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, LoopStopped> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| LoopStopped)?;
        rx.await.map_err(|_| LoopStopped)
    }

    pub(crate) async fn status(&self) -> Result<NetStatus, LoopStopped> {
        self.call(Command::Status).await
    }

    pub(crate) async fn get_record(&self, key: Vec<u8>) -> Result<Vec<FoundRecord>, LoopStopped> {
        self.call(|reply| Command::GetRecord { key, reply }).await
    }

    pub(crate) async fn put_record(
        &self,
        record: kad::Record,
    ) -> Result<Result<(), String>, LoopStopped> {
        self.call(|reply| Command::PutRecord { record, reply })
            .await
    }

    pub(crate) async fn local_record(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, LoopStopped> {
        self.call(|reply| Command::LocalRecord { key, reply }).await
    }

    /// Send `envelopes` (1 to `MAX_BATCH_ENVELOPES`, packed with `DirectRequest::fits`) to
    /// `peer` in one direct request.
    pub(crate) async fn send_batch(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        envelopes: Vec<Envelope>,
    ) -> Result<Result<DirectReply, String>, LoopStopped> {
        self.call(|reply| Command::SendBatch {
            peer,
            addrs,
            envelopes,
            reply,
        })
        .await
    }

    pub(crate) async fn respond(
        &self,
        channel: ResponseChannel<DirectReply>,
        reply: DirectReply,
    ) -> Result<(), LoopStopped> {
        self.tx
            .send(Command::Respond { channel, reply })
            .await
            .map_err(|_| LoopStopped)
    }

    pub(crate) async fn strike(&self, peer: PeerId, reason: String) -> Result<(), LoopStopped> {
        self.tx
            .send(Command::Strike { peer, reason })
            .await
            .map_err(|_| LoopStopped)
    }

    /// The `count` peers closest to `key` in the DHT (fewer if the DHT has fewer), closest
    /// first; never this node (Kademlia leaves the local peer out of every query's results).
    /// The lookup ends once those `count` have answered, so asking for the few a caller uses
    /// costs fewer requests than Kademlia's default of 20.
    /// `purpose` names the caller in the debug log (what the lookups of a busy network are for)
    /// and says how old a remembered answer may be.
    pub(crate) async fn closest_peers(
        &self,
        key: Vec<u8>,
        count: usize,
        purpose: LookupPurpose,
    ) -> Result<Lookup, LoopStopped> {
        let count = NonZeroUsize::new(count).unwrap_or(NonZeroUsize::MIN);
        self.call(|reply| Command::ClosestPeers {
            key,
            count,
            purpose,
            reply,
        })
        .await
    }

    pub(crate) async fn mailbox_request(
        &self,
        peer: PeerId,
        request: MailboxRequest,
    ) -> Result<Result<MailboxResponse, String>, LoopStopped> {
        let _slot = self.mailbox_slots.acquire(peer).await;
        self.call(|reply| Command::MailboxRequest {
            peer,
            request,
            reply,
        })
        .await
    }

    pub(crate) async fn mailbox_respond(
        &self,
        channel: ResponseChannel<MailboxResponse>,
        response: MailboxResponse,
    ) -> Result<(), LoopStopped> {
        self.tx
            .send(Command::MailboxRespond { channel, response })
            .await
            .map_err(|_| LoopStopped)
    }

    pub(crate) async fn dial(&self, addr: Multiaddr) -> Result<Result<(), String>, LoopStopped> {
        self.call(|reply| Command::Dial { addr, reply }).await
    }

    /// Test hook (simulations): block (closing their connections) or unblock `peers`.
    pub(crate) async fn set_blocked(
        &self,
        peers: Vec<PeerId>,
        blocked: bool,
    ) -> Result<(), LoopStopped> {
        self.call(|reply| Command::SetBlocked {
            peers,
            blocked,
            reply,
        })
        .await
    }

    /// Test hook: from now on (`on`), every closest-peers lookup ends as soon as it starts,
    /// answering [`Lookup::sure`] false with the peers that had answered by then (none) — the
    /// short lookups of a saturated network, on demand.
    pub(crate) async fn stunt_lookups(&self, on: bool) -> Result<(), LoopStopped> {
        self.call(|reply| Command::StuntLookups { on, reply }).await
    }

    pub(crate) async fn shutdown(&self) -> Result<(), LoopStopped> {
        self.call(Command::Shutdown).await
    }
}

struct PendingGet {
    records: Vec<FoundRecord>,
    reply: oneshot::Sender<Vec<FoundRecord>>,
    deadline: Option<Instant>,
}

/// The loop itself; see the module doc.
pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    inbound: mpsc::Sender<InboundBatch>,
    addrs: watch::Sender<Vec<Multiaddr>>,
    limits: Limits,
    dht_server: bool,
    pending_get: HashMap<kad::QueryId, PendingGet>,
    pending_put: HashMap<kad::QueryId, oneshot::Sender<Result<(), String>>>,
    /// Puts still looking up the peers to store on (see `Command::PutRecord`).
    pending_put_lookup: HashMap<kad::QueryId, (kad::Record, oneshot::Sender<Result<(), String>>)>,
    pending_send: HashMap<OutboundRequestId, oneshot::Sender<Result<DirectReply, String>>>,
    pending_dial: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>>,
    /// Closest-peer lookups: remembered for a minute, shared while they run ([`closest`]).
    closest: closest::Closest<kad::QueryId>,
    /// Test hook ([`NetClient::stunt_lookups`]): every closest-peers lookup ends at once.
    stunted_lookups: bool,
    pending_mailbox: HashMap<OutboundRequestId, oneshot::Sender<Result<MailboxResponse, String>>>,
    /// Where peers said they listen (identify), to dial them again for a mailbox request once
    /// the connection closed: a replica pushing new mail to a subscriber that is not in its
    /// routing table (Kademlia keeps 20 peers a bucket; clients none) had no address for it.
    /// Among 1,000 nodes 4,459 push attempts failed to dial while 3,077 arrived
    /// (docs/performance.md).
    /// It is the swarm's own address cache (which request-response keeps for 100 peers), larger;
    /// an address that fails to dial is dropped from it.
    heard: PeerAddresses,
    mailbox_inbound: mpsc::Sender<InboundMailbox>,
    online: watch::Sender<u64>,
    connections: HashMap<PeerId, HashMap<ConnectionId, ConnectionInfo>>,
    strikes: HashMap<PeerId, u32>,
    bans: VecDeque<(Instant, PeerId)>,
    checks: JoinSet<PendingCheck>,
    /// Group channels (gossipsub): see [`groups`].
    groups: GroupNet,
    /// Reachability (relay, hole punching, AutoNAT, mDNS): see [`nat`].
    nat: NatNet,
}

/// A pushed record whose check runs on `spawn_blocking`: who pushed it, the record, the value
/// held under its key when it arrived, and the verdict.
type PendingCheck = (
    PeerId,
    kad::Record,
    Option<Vec<u8>>,
    Result<Option<ValidRecord>, dht::RecordRejected>,
);

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("peer_id", self.swarm.local_peer_id())
            .finish_non_exhaustive()
    }
}

/// Make the loop and its client; the caller spawns [`EventLoop::run`].
pub(crate) fn new(
    swarm: Swarm<Behaviour>,
    limits: Limits,
    dht_server: bool,
) -> (
    EventLoop,
    NetClient,
    mpsc::Receiver<InboundBatch>,
    watch::Receiver<Vec<Multiaddr>>,
    LoopExtras,
) {
    let (tx, commands) = mpsc::channel(COMMAND_CAPACITY);
    let (mailbox_inbound, mailbox_rx) = mpsc::channel(INBOUND_CAPACITY);
    let (online, online_rx) = watch::channel(0);
    let (inbound, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
    let (addrs, addrs_rx) = watch::channel(Vec::new());
    let (group_net, group_rx) = GroupNet::new();
    let event_loop = EventLoop {
        swarm,
        commands,
        inbound,
        addrs,
        limits,
        dht_server,
        pending_get: HashMap::new(),
        pending_put: HashMap::new(),
        pending_put_lookup: HashMap::new(),
        pending_send: HashMap::new(),
        pending_dial: HashMap::new(),
        closest: closest::Closest::default(),
        stunted_lookups: false,
        pending_mailbox: HashMap::new(),
        heard: PeerAddresses::new(MAX_HEARD_PEERS),
        mailbox_inbound,
        online,
        connections: HashMap::new(),
        strikes: HashMap::new(),
        bans: VecDeque::new(),
        checks: JoinSet::new(),
        groups: group_net,
        nat: NatNet::default(),
    };
    let extras = LoopExtras {
        groups: group_rx,
        mailbox: mailbox_rx,
        online: online_rx,
    };
    let net = NetClient {
        tx,
        mailbox_slots: Arc::default(),
    };
    (event_loop, net, inbound_rx, addrs_rx, extras)
}

/// The other outputs of the loop: mailbox requests from peers, and a counter that goes up
/// every time the node goes from no connection to at least one (a reconnect).
#[derive(Debug)]
pub(crate) struct LoopExtras {
    pub(crate) mailbox: mpsc::Receiver<InboundMailbox>,
    pub(crate) online: watch::Receiver<u64>,
    /// Group messages received over gossipsub, for the group service (`crate::groups`).
    pub(crate) groups: mpsc::Receiver<GossipInbound>,
}

impl EventLoop {
    /// Mutable access to the swarm before the loop runs (listen, dial bootstrap peers).
    pub(crate) fn swarm_mut(&mut self) -> &mut Swarm<Behaviour> {
        &mut self.swarm
    }

    /// Run until a `Shutdown` command arrives or every client is gone.
    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown(reply)) => {
                        tracing::debug!("event loop: shutting down");
                        // Drop the swarm (closing listeners and connections) before answering.
                        drop(self);
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) => self.on_command(command),
                    None => return,
                },
                Some(done) = self.checks.join_next(), if !self.checks.is_empty() => match done {
                    Ok((source, record, held, result)) => self.on_checked(source, record, held, result),
                    Err(e) => tracing::warn!(error = %e, "a DHT record check failed"),
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let due: Vec<kad::QueryId> = self
            .pending_get
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.finish_get(id);
        }
        for (id, count) in self.closest.overdue(now) {
            let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) else {
                continue;
            };
            let heard = query.stats().num_successes();
            if usize::try_from(heard).is_ok_and(|n| n >= count) {
                tracing::debug!(heard, count, "closest-peers lookup cut short");
                query.finish();
                self.closest.cut(id);
            }
        }
        self.nat_tick();
        while let Some((until, peer)) = self.bans.front().copied() {
            if until > now {
                break;
            }
            self.bans.pop_front();
            self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            tracing::debug!(%peer, "ban lifted");
        }
    }

    fn finish_get(&mut self, id: kad::QueryId) {
        if let Some(p) = self.pending_get.remove(&id) {
            if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                q.finish();
            }
            let _ = p.reply.send(p.records);
        }
    }

    fn strike(&mut self, peer: PeerId, reason: &str) {
        let count = self.strikes.entry(peer).or_insert(0);
        *count += 1;
        tracing::debug!(%peer, strikes = *count, reason, "strike against peer");
        if *count >= self.limits.max_strikes {
            self.strikes.remove(&peer);
            tracing::info!(%peer, "peer sent too many bad requests: blocked for {:?}", self.limits.ban_duration);
            self.swarm.behaviour_mut().blocked.block_peer(peer);
            self.bans
                .push_back((Instant::now() + self.limits.ban_duration, peer));
        }
    }

    fn dialable_addrs(&self) -> Vec<Multiaddr> {
        let local = *self.swarm.local_peer_id();
        let mut out: Vec<Multiaddr> = Vec::new();
        for a in self
            .swarm
            .external_addresses()
            .chain(self.swarm.listeners())
            .filter(|a| !is_unspecified(a))
        {
            // Relayed listen addresses end in our own peer ID; the external form does not.
            let mut a = a.clone();
            if a.iter().last() == Some(Protocol::P2p(local)) {
                a.pop();
            }
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    fn publish_addrs(&self) {
        let addrs = self.dialable_addrs();
        self.addrs.send_if_modified(|old| {
            if *old == addrs {
                false
            } else {
                *old = addrs;
                true
            }
        });
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(reply) => {
                let peer_id = *self.swarm.local_peer_id();
                let with_p2p = |a: &Multiaddr| a.clone().with_p2p(peer_id).unwrap_or_else(|a| a);
                let routing_table_size = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .kbuckets()
                    .map(|b| b.num_entries())
                    .sum();
                let dht_records_held = {
                    use libp2p::kad::store::RecordStore;
                    self.swarm.behaviour_mut().kad.store_mut().records().count()
                };
                let status = NetStatus {
                    peer_id,
                    listen_addrs: self.swarm.listeners().map(with_p2p).collect(),
                    external_addrs: self.swarm.external_addresses().map(with_p2p).collect(),
                    // One line per peer: a direct connection if there is one.
                    connected: self
                        .connections
                        .iter()
                        .filter_map(|(p, conns)| {
                            conns
                                .values()
                                .min_by_key(|c| c.relayed)
                                .map(|c| (*p, c.clone()))
                        })
                        .collect(),
                    routing_table_size,
                    dht_records_held,
                    dht_server: self.dht_server,
                    nat: self.nat_status(),
                };
                let _ = reply.send(status);
            }
            Command::GetRecord { key, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_record(kad::RecordKey::new(&key));
                self.pending_get.insert(
                    id,
                    PendingGet {
                        records: Vec::new(),
                        reply,
                        deadline: None,
                    },
                );
            }
            Command::PutRecord { mut record, reply } => {
                // Kademlia's own `put_record` stores nowhere when its lookup runs out of time
                // (on a busy DHT, most of them did). Instead: store locally as it would, look
                // up the closest peers, and store on those the lookup found — after a timeout
                // too, on the closest it had reached by then.
                use libp2p::kad::store::RecordStore;
                record.publisher = Some(*self.swarm.local_peer_id());
                let kad = &mut self.swarm.behaviour_mut().kad;
                match kad.store_mut().put(record.clone()) {
                    Ok(()) => {
                        let id = kad.get_closest_peers(record.key.to_vec());
                        self.pending_put_lookup.insert(id, (record, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(format!("local store refused the record: {e}")));
                    }
                }
            }
            Command::LocalRecord { key, reply } => {
                use libp2p::kad::store::RecordStore;
                let value = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .store_mut()
                    .get(&kad::RecordKey::new(&key))
                    .map(|r| r.value.clone());
                let _ = reply.send(value);
            }
            Command::SendBatch {
                peer,
                addrs,
                envelopes,
                reply,
            } => {
                if peer == *self.swarm.local_peer_id() {
                    let _ = reply.send(Err("that peer is this node".into()));
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .direct
                    .send_request_with_addresses(
                        &peer,
                        Framed::Value(DirectRequest { envelopes }),
                        addrs,
                    );
                self.pending_send.insert(id, reply);
            }
            Command::Respond { channel, reply } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .direct
                    .send_response(channel, reply)
                    .is_err()
                {
                    tracing::debug!("response dropped: the requesting connection is gone");
                }
            }
            Command::Strike { peer, reason } => self.strike(peer, &reason),
            Command::ClosestPeers {
                key,
                count,
                purpose,
                reply,
            } => {
                if self.stunted_lookups {
                    // Test hook: the lookup ends at once, as one that timed out before any
                    // peer answered.
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    let id = kad.get_n_closest_peers(key.clone(), count);
                    if let Some(mut query) = kad.query_mut(&id) {
                        query.finish();
                    }
                    self.closest
                        .started(id, key, count.get(), reply, Instant::now());
                    return;
                }
                if purpose == LookupPurpose::MailboxRepair {
                    let local = *self.swarm.local_peer_id();
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    if let Some(peers) = closest::neighbourhood(kad, local, &key, count.get()) {
                        tracing::debug!(
                            count,
                            purpose = purpose.as_str(),
                            "closest-peers answered from the routing table"
                        );
                        let _ = reply.send(Lookup { peers, sure: true });
                        return;
                    }
                }
                let max_age = purpose.max_age();
                let purpose = purpose.as_str();
                let Some(reply) =
                    self.closest
                        .ask(&key, count.get(), Instant::now(), max_age, reply)
                else {
                    tracing::debug!(
                        count,
                        purpose,
                        "closest-peers answered without a new lookup"
                    );
                    return;
                };
                tracing::debug!(count, purpose, "closest-peers lookup started");
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_n_closest_peers(key.clone(), count);
                self.closest
                    .started(id, key, count.get(), reply, Instant::now());
            }
            Command::MailboxRequest {
                peer,
                request,
                reply,
            } => {
                if peer == *self.swarm.local_peer_id() {
                    let _ = reply.send(Err("that peer is this node".into()));
                    return;
                }
                // Without a connection, the dial also tries where the peer said it listens
                // (besides what Kademlia knows).
                let addrs = self.heard.get(&peer).collect();
                let id = self
                    .swarm
                    .behaviour_mut()
                    .mailbox
                    .send_request_with_addresses(&peer, Framed::Value(request), addrs);
                self.pending_mailbox.insert(id, reply);
            }
            Command::MailboxRespond { channel, response } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .mailbox
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!("mailbox response dropped: the connection is gone");
                }
            }
            Command::Dial { addr, reply } => {
                let Some(peer) = peer_of(&addr) else {
                    let _ = reply.send(Err(format!("{addr} does not end in /p2p/PEER_ID")));
                    return;
                };
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, strip_p2p(&addr));
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                match self.swarm.dial(addr) {
                    Ok(()) => self.pending_dial.entry(peer).or_default().push(reply),
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
            Command::StuntLookups { on, reply } => {
                self.stunted_lookups = on;
                let _ = reply.send(());
            }
            Command::SetBlocked {
                peers,
                blocked,
                reply,
            } => {
                let list = &mut self.swarm.behaviour_mut().blocked;
                for peer in peers {
                    if blocked {
                        list.block_peer(peer);
                    } else {
                        list.unblock_peer(peer);
                    }
                }
                let _ = reply.send(());
            }
            // Handled in `run` before dispatch.
            Command::Shutdown(_) => {}
            Command::Group(c) => self.on_group_command(c),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.nat_observe(&event);
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.on_gossipsub(e),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => self.on_relay_client(e),
            SwarmEvent::Behaviour(BehaviourEvent::RelayServer(e)) => self.on_relay_server(e),
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(e)) => self.on_dcutr(e),
            SwarmEvent::Behaviour(BehaviourEvent::AutonatClient(e)) => self.on_autonat_client(e),
            SwarmEvent::Behaviour(BehaviourEvent::AutonatServer(e)) => self.on_autonat_server(e),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(e)) => self.on_mdns(e),
            SwarmEvent::Behaviour(BehaviourEvent::Direct(e)) => self.on_direct(e),
            SwarmEvent::Behaviour(BehaviourEvent::Mailbox(e)) => self.on_mailbox(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let dht = info.protocols.contains(&KAD_PROTOCOL);
                for addr in info.listen_addrs {
                    if is_unspecified(&addr) {
                        continue;
                    }
                    if dht {
                        // A DHT peer: let Kademlia know where it listens.
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                    self.heard.add(peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(_) => {}
            SwarmEvent::NewListenAddr { address, .. } => {
                let peer_id = *self.swarm.local_peer_id();
                tracing::info!(
                    "listening on {}",
                    address.clone().with_p2p(peer_id).unwrap_or(address)
                );
                self.publish_addrs();
            }
            SwarmEvent::ExpiredListenAddr { .. }
            | SwarmEvent::ExternalAddrConfirmed { .. }
            | SwarmEvent::ExternalAddrExpired { .. } => self.publish_addrs(),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let addr = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address.clone(),
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
                };
                let relayed = endpoint.is_relayed();
                tracing::debug!(peer = %peer_id, dialer = endpoint.is_dialer(), "connection established");
                if self.connections.is_empty() {
                    self.online.send_modify(|n| *n = n.wrapping_add(1));
                }
                self.connections
                    .entry(peer_id)
                    .or_default()
                    .insert(connection_id, ConnectionInfo { addr, relayed });
                for reply in self.pending_dial.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(()));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, ?cause, "connection closed");
                if let Entry::Occupied(mut e) = self.connections.entry(peer_id) {
                    e.get_mut().remove(&connection_id);
                    if e.get().is_empty() {
                        e.remove();
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, %error, "outgoing connection failed");
                if let (Some(peer), DialError::Transport(failed)) = (peer_id, &error) {
                    for (addr, _) in failed {
                        self.heard.remove(&peer, addr);
                    }
                }
                if let Some(peer) = peer_id {
                    self.closest.forget_peer(&peer);
                    for reply in self.pending_dial.remove(&peer).unwrap_or_default() {
                        let _ = reply.send(Err(error.to_string()));
                    }
                }
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!(%error, "incoming connection failed");
            }
            _ => {}
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => {
                if self.checks.len() >= MAX_PENDING_CHECKS {
                    tracing::debug!(peer = %source, "dropping a pushed DHT record: too many checks pending");
                    return;
                }
                let max = self.limits.max_dht_value_bytes;
                if record.value.len() > max {
                    let e = dht::RecordRejected::TooLarge {
                        len: record.value.len(),
                    };
                    self.on_checked(source, record, None, Err(e));
                    return;
                }
                let held = {
                    use libp2p::kad::store::RecordStore;
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .store_mut()
                        .get(&record.key)
                        .map(|r| r.value.clone())
                };
                // Signature checks leave the loop; the result comes back through `checks`.
                self.checks.spawn_blocking(move || {
                    let result = dht::check(&record, held.as_deref(), max, dht::unix_now());
                    (source, record, held, result)
                });
            }
            kad::Event::RoutingUpdated { peer, .. } => self.closest.peer_routed(&peer),
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => {
                tracing::debug!(
                    kind = query_kind(&result),
                    requests = stats.num_requests(),
                    took = ?stats.duration(),
                    last = step.last,
                    "kad query progressed"
                );
                self.on_query_progressed(id, result, step)
            }
            _ => {}
        }
    }

    fn on_query_progressed(
        &mut self,
        id: kad::QueryId,
        result: kad::QueryResult,
        step: kad::ProgressStep,
    ) {
        match result {
            kad::QueryResult::GetRecord(Ok(kad::GetRecordOk::FoundRecord(r))) => {
                let enough = if let Some(p) = self.pending_get.get_mut(&id) {
                    p.records.push(FoundRecord {
                        peer: r.peer,
                        value: r.record.value,
                    });
                    p.deadline.get_or_insert(Instant::now() + GET_RECORD_GRACE);
                    p.records.len() >= GET_RECORD_ENOUGH
                } else {
                    false
                };
                if enough || step.last {
                    self.finish_get(id);
                }
            }
            kad::QueryResult::GetRecord(_) => self.finish_get(id),
            kad::QueryResult::PutRecord(result) => {
                if let Some(reply) = self.pending_put.remove(&id) {
                    let _ = reply.send(result.map(|_| ()).map_err(|e| e.to_string()));
                }
            }
            kad::QueryResult::GetClosestPeers(result) => {
                let (peers, complete) = match result {
                    Ok(ok) => (ok.peers, true),
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => (peers, false),
                };
                let peers: Vec<PeerId> = peers.into_iter().map(|p| p.peer_id).collect();
                // Requests and time are on the "kad query progressed" line just before.
                tracing::debug!(found = peers.len(), complete, "closest-peers lookup done");
                let sure = complete && {
                    let asked = self.closest.asked(id).unwrap_or(0);
                    peers.len() >= asked || {
                        let known: usize = (self.swarm.behaviour_mut().kad.kbuckets())
                            .map(|b| b.num_entries())
                            .sum();
                        peers.len() >= asked.min(known)
                    }
                };
                if let Some((record, reply)) = self.pending_put_lookup.remove(&id) {
                    if peers.is_empty() {
                        let _ = reply.send(Err("no DHT peers to store the record on".into()));
                    } else {
                        let put = self.swarm.behaviour_mut().kad.put_record_to(
                            record,
                            peers.into_iter(),
                            kad::Quorum::One,
                        );
                        self.pending_put.insert(put, reply);
                    }
                } else {
                    self.closest.finished(id, peers, sure, Instant::now());
                }
            }
            kad::QueryResult::Bootstrap(Ok(_)) => {}
            other => tracing::trace!(?other, "kad query result not acted on"),
        }
    }

    /// Phase two of admitting a pushed record (see [`crate::dht`]).
    fn on_checked(
        &mut self,
        source: PeerId,
        record: kad::Record,
        held: Option<Vec<u8>>,
        result: Result<Option<ValidRecord>, dht::RecordRejected>,
    ) {
        let key_len = record.key.as_ref().len();
        let stored = match result {
            Ok(None) => Ok(None),
            Ok(Some(valid)) => {
                let store = self.swarm.behaviour_mut().kad.store_mut();
                dht::store_checked(store, record, &valid, held.as_deref(), dht::unix_now())
                    .map(|()| Some(valid))
            }
            Err(e) => Err(e),
        };
        match stored {
            Ok(Some(valid)) => tracing::debug!(
                peer = %source,
                version = valid.version_or_seq,
                "stored a DHT record"
            ),
            Ok(None) => tracing::trace!(peer = %source, "DHT record refreshed"),
            Err(e) => {
                tracing::debug!(peer = %source, key_len, error = %e, "refused a DHT record");
                if e.is_hostile() {
                    self.strike(source, "invalid DHT record");
                }
            }
        }
    }

    fn on_direct(&mut self, event: request_response::Event<Framed<DirectRequest>, DirectReply>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let checked = match request {
                        Framed::Value(request) => request.check().map(|()| request.envelopes),
                        Framed::Refused(e) => {
                            tracing::debug!(%peer, error = %e, "refused a direct request");
                            Err(e.reason())
                        }
                    };
                    let envelopes = match checked {
                        Ok(envelopes) => envelopes,
                        Err(reason) => {
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .direct
                                .send_response(channel, DirectReply::Refused { reason });
                            self.strike(peer, "undecodable direct request");
                            return;
                        }
                    };
                    let item = InboundBatch {
                        peer,
                        envelopes,
                        channel,
                    };
                    if let Err(e) = self.inbound.try_send(item) {
                        let (item, reason) = match e {
                            mpsc::error::TrySendError::Full(i) => (i, RejectReason::Busy),
                            mpsc::error::TrySendError::Closed(i) => (i, RejectReason::Internal),
                        };
                        tracing::debug!(%peer, ?reason, "inbound direct request refused");
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .direct
                            .send_response(item.channel, DirectReply::Refused { reason });
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_send.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "direct delivery attempt failed");
                if let Some(reply) = self.pending_send.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound direct request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

impl EventLoop {
    fn on_mailbox(
        &mut self,
        event: request_response::Event<Framed<MailboxRequest>, MailboxResponse>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let request = match request {
                        Framed::Value(r) => r,
                        Framed::Refused(e) => {
                            tracing::debug!(%peer, error = %e, "refused a mailbox request");
                            let reason = match e.reason() {
                                RejectReason::TooLarge => MailboxReject::TooLarge,
                                _ => MailboxReject::Malformed,
                            };
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .mailbox
                                .send_response(channel, MailboxResponse::Refused { reason });
                            self.strike(peer, "undecodable mailbox request");
                            return;
                        }
                    };
                    let item = InboundMailbox {
                        peer,
                        request,
                        channel,
                    };
                    if let Err(e) = self.mailbox_inbound.try_send(item) {
                        let (item, reason) = match e {
                            mpsc::error::TrySendError::Full(i) => (i, MailboxReject::Busy),
                            mpsc::error::TrySendError::Closed(i) => (i, MailboxReject::Internal),
                        };
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .mailbox
                            .send_response(item.channel, MailboxResponse::Refused { reason });
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_mailbox.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "mailbox request failed");
                if let Some(reply) = self.pending_mailbox.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound mailbox request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

/// Whether the address listens on all interfaces (not dialable as such).
fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// The peer ID at the end of a `/p2p/` multiaddr (for a relayed address
/// `…/p2p/RELAY/p2p-circuit/p2p/PEER`, the peer, not the relay).
pub(crate) fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

/// The address without its trailing `/p2p/` part (a relay's stays).
pub(crate) fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// What a Kademlia query was, for the debug line of each step.
fn query_kind(result: &kad::QueryResult) -> &'static str {
    match result {
        kad::QueryResult::Bootstrap(_) => "bootstrap",
        kad::QueryResult::GetClosestPeers(_) => "closest",
        kad::QueryResult::GetRecord(_) => "get",
        kad::QueryResult::PutRecord(_) => "put",
        kad::QueryResult::RepublishRecord(_) => "republish",
        _ => "other",
    }
}
