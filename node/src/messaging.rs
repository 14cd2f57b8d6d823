//! One-to-one messaging on top of the event loop: sending (seal, commit, deliver), receiving
//! (open, commit, acknowledge), the durable outbox with retries, and publishing this user's
//! prekey bundle and presence records. See `docs/architecture.md`, "Messaging", and
//! `docs/protocol.md`, "Direct delivery" and "DHT records".
//!
//! ```text
//! send_text ─► seal (ratchet) ─► commit_outgoing (session + message + outbox, one batch)
//!          └─► presence lookup ─► direct request ─► Accepted ─► mark_delivered
//!                                               └─► timeout  ─► Queued (outbox retries with backoff)
//! inbound  ─► seen? ─► open (copies of session, prekeys, replay cache) ─► commit_incoming ─► ack
//! publisher ─► bundle (rotated/replenished) + one presence record per contact, re-published
//!              before expiry, at each epoch and when our addresses change
//! ```
//!
//! All storage and ratchet work runs on `spawn_blocking`. Every read-modify-write of a peer's
//! ratchet state happens under that peer's lock (`PeerLocks`), so two sends, or a send and a
//! receive, never advance the same ratchet from the same starting state, while different peers
//! do not wait for each other. Prekeys and the replay cache, which only first messages change,
//! have one lock of their own (`prekey_lock`). An inbound envelope is opened (the sealed-sender
//! Diffie-Hellman and signature check: most of its cost) before any lock is taken, since only
//! then is its sender known; inbound envelopes are processed concurrently.
//!
//! Commits are group commits (`storage`, "Guarantees"): the batch is written under the peer's
//! lock, the lock is released, and the caller waits for the shared `fsync` that covers it before
//! sending or acknowledging anything. So the next message to or from the same peer is sealed
//! while the previous one waits for the disk, and many messages share one sync.
//!
//! Retries resend the exact envelope bytes stored in the outbox; the recipient's envelope-id
//! de-duplication answers a repeat with an acknowledgement and does not show it again.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex as StdMutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use meshchat_protocol::{
    addressing::{self, pair_secret},
    content::{Content, MessageId, ReceiptKind, MAX_RECEIPT_IDS, MAX_TEXT_BYTES},
    envelope::{Envelope, EnvelopeError, DEFAULT_TTL_SECS, MAX_TTL_SECS},
    mailbox::{MailboxKeys, MAX_DELETE_IDS},
    prekey::MAX_CLOCK_SKEW_SECS,
    records::{self, Presence, PresenceKeys, PresencePeer, PresenceRecord},
    replay::ReplayCache,
    session::{self, SessionError, SessionRecord},
    Identity, MailboxRequest, MailboxResponse, PrekeyBundle, PrekeySecrets, PublicIdentity,
    VerifiedBundle, Wire,
};
use rand::{rngs::OsRng, RngCore};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{
        broadcast, mpsc, oneshot, watch, Mutex, Notify, OwnedMutexGuard, OwnedSemaphorePermit,
        Semaphore,
    },
    task::{JoinHandle, JoinSet},
};

use crate::{
    batcher::Batcher,
    dht::{own_record, unix_now, unix_now_ms},
    direct::{DirectReply, DirectResponse, RejectReason},
    error::NodeError,
    event_loop::{InboundBatch, LoopStopped, NetClient},
    mailbox::{self, service::Pushed},
    node::{NodeEvent, SendOutcome, SendReport},
    pair_keys::PairKeys,
    storage::{
        Direction, IncomingOutcome, OutboxEntry, PendingWrite, Status, Storage, StoredMessage,
    },
};

/// A presence lookup result is reused for this long.
const PRESENCE_CACHE_TTL: Duration = Duration::from_secs(30);
/// After that, for this long, it is tried once before a new lookup (`known_route`).
const ROUTE_TTL: Duration = Duration::from_secs(60 * 60);
/// Pause between rounds of a delivery attempt that found nobody.
const DELIVERY_PAUSE: Duration = Duration::from_millis(300);
/// Longest pause between rounds of one delivery attempt.
const MAX_DELIVERY_PAUSE: Duration = Duration::from_secs(3);
/// Own records are re-published this often (and at every epoch change).
pub(crate) const REPUBLISH_INTERVAL: Duration = Duration::from_secs(15 * 60);
/// Longest wait before retrying a publication that failed (e.g. no DHT peers yet).
const MAX_PUBLISH_RETRY: Duration = Duration::from_secs(30);
/// After a change of our addresses, wait this long for more before re-publishing.
const ADDRESS_DEBOUNCE: Duration = Duration::from_millis(500);
/// How often the contact list is compared with the one presence was published for.
const CONTACT_CHECK: Duration = Duration::from_secs(5);
/// How often the outbox is scanned for due entries.
const OUTBOX_TICK: Duration = Duration::from_secs(1);
/// First retry delay of a record publication; doubled per attempt up to [`MAX_PUBLISH_RETRY`].
/// (The outbox's first delay is [`crate::NodeConfig::first_retry`].)
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(10 * 60);
/// How long a mailbox store waits for the other replicas' answers once a quorum acknowledged.
const STORE_GRACE: Duration = Duration::from_millis(500);
/// Peers whose outbox entries are retried concurrently.
const OUTBOX_PARALLEL_PEERS: usize = 4;
/// DHT puts in flight at once while publishing.
const PUBLISH_PARALLEL: usize = 8;
/// Refill the one-time prekeys when fewer than this many are left.
const ONE_TIME_LOW_WATER: usize = meshchat_protocol::prekey::DEFAULT_ONE_TIME_PREKEYS / 2;
/// How long presence records stay valid after the end of their epoch.
const PRESENCE_GRACE_SECS: u64 = 3600;
/// Envelope ids are remembered (for de-duplication) this long after first seen: longer than
/// any envelope can live.
const SEEN_RETENTION_MS: u64 = (meshchat_protocol::envelope::MAX_TTL_SECS as u64 + 86_400) * 1000;

/// Most texts to one peer sealed and committed together (in one ratchet pass and one write).
const MAX_SEAL_BATCH: usize = 64;
/// Inbound direct requests processed at once (opened in parallel, committed with shared syncs;
/// the envelopes of one request one after the other).
const INBOUND_PARALLEL: usize = 32;
/// Above this many peer locks, the ones nobody holds are dropped.
const PEER_LOCKS_PRUNE_AT: usize = 1024;

/// Mailboxes looked up at once while collecting.
const COLLECT_PARALLEL: usize = 8;
/// Fastest retry of a collection round that reached no replica.
const COLLECT_RETRY: Duration = Duration::from_millis(200);
/// Quick rounds after start-up and after a reconnect (1 s, 2 s, 3 s apart).
const COLLECT_FOLLOWUPS: u32 = 3;
/// The pause unit between those rounds.
const COLLECT_FOLLOWUP_PAUSE: Duration = Duration::from_secs(1);
/// Slowest retry of a collection round that reached no replica.
const MAX_COLLECT_RETRY: Duration = Duration::from_secs(5);
/// A current mailbox that held nothing in this many periodic rounds in a row is collected
/// every 2nd, then every 4th round (`2^steps` × `collect_interval`), never less often than
/// half the lifetime of the push subscription each collection renews.
const MAX_IDLE_STEPS: u32 = 2;
/// Mailboxes whose idleness, and whose peers that answered, are remembered (beyond, all are
/// forgotten: such a mailbox is collected every round, from its lookup's peers alone).
const MAX_REMEMBERED_MAILBOXES: usize = 4096;

/// Remember `value` for mailbox `id` in `map`, forgetting every other mailbox first if
/// [`MAX_REMEMBERED_MAILBOXES`] are remembered already.
fn remember<V>(map: &mut HashMap<[u8; 32], V>, id: [u8; 32], value: V) {
    if map.len() >= MAX_REMEMBERED_MAILBOXES && !map.contains_key(&id) {
        map.clear();
    }
    map.insert(id, value);
}

/// What one collection round did ([`crate::NodeHandle::collect_mail`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectReport {
    /// Mailboxes watched (first contact, and every live epoch of every pair).
    pub mailboxes: usize,
    /// FETCHes that replicas answered.
    pub replicas_answered: usize,
    /// Distinct envelopes fetched.
    pub envelopes: usize,
    /// New messages stored (and shown) by this round.
    pub new_messages: usize,
    /// Envelopes the replicas confirmed deleted.
    pub deleted: u64,
    /// Mailboxes left out of this periodic round: current ones that held nothing lately
    /// (their replicas push new mail; see [`crate::mailbox::Config::collect_interval`]).
    #[serde(default)]
    pub idle_skipped: usize,
    /// Mailboxes whose lookup of their closest peers came back short (timed out, cut short,
    /// or found fewer peers than the routing table knows): the peers that answered their last
    /// collection were asked too, and they are taken for empty only if `r` peers answered.
    #[serde(default)]
    pub short_lookups: usize,
}

/// What collecting one mailbox did ([`Messenger::collect_one`]).
#[derive(Debug, Default)]
struct Collected {
    /// FETCHes answered.
    answered: usize,
    /// Envelopes fetched.
    envelopes: usize,
    /// New messages stored.
    new: usize,
    /// Envelopes the replicas confirmed deleted.
    deleted: u64,
    /// The lookup of its closest peers came back short.
    short_lookup: bool,
    /// Peers asked.
    asked: usize,
}

impl Collected {
    /// Whether the answers say what the mailbox holds, so that an empty one may be collected
    /// less often: some peer answered, and either the lookup was sure or as many of the
    /// closest peers asked as a mailbox has replicas (`r`) answered.
    fn heard_enough(&self, replicas: usize) -> bool {
        let enough = replicas.max(1).min(self.asked.max(1));
        self.answered > 0 && (!self.short_lookup || self.answered >= enough)
    }
}

/// The `want` peers closest to mailbox `id` among `found` and `known`, closest first.
fn closest_of(id: &[u8; 32], found: &[PeerId], known: &[PeerId], want: usize) -> Vec<PeerId> {
    use libp2p::kad::KBucketKey;
    let target = KBucketKey::new(id.to_vec());
    let mut all: Vec<PeerId> = found.iter().chain(known).copied().collect();
    all.sort_by_cached_key(|p| target.distance(&KBucketKey::from(*p)));
    all.dedup();
    all.truncate(want);
    all
}

/// What one publication round did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishReport {
    /// The prekey bundle reached at least one DHT peer.
    pub bundle_published: bool,
    /// Presence records (one per contact) that reached at least one DHT peer.
    pub presence_published: usize,
    /// Presence records that could not be stored anywhere.
    pub presence_failed: usize,
}

impl PublishReport {
    fn complete(&self) -> bool {
        self.bundle_published && self.presence_failed == 0
    }
}

/// How a delivery attempt ended well.
#[derive(Debug, Clone, Copy)]
enum Delivered {
    /// The recipient's node acknowledged it.
    Direct,
    /// A quorum of mailbox replicas acknowledged it.
    Stored { replicas: usize },
}

/// Why a delivery attempt did not end in an acknowledgement.
#[derive(Debug, Clone)]
enum DeliveryFailure {
    /// Nobody answered in time (not found, not reachable, transient refusal).
    Unreachable(String),
    /// The recipient refused the envelope for good.
    Rejected(RejectReason),
}

fn shutting_down() -> DeliveryFailure {
    DeliveryFailure::Unreachable("the node is shutting down".into())
}

/// The result of processing one inbound envelope.
#[derive(Debug)]
struct Processed {
    response: DirectResponse,
    sender: Option<PublicIdentity>,
    new_message: Option<StoredMessage>,
    status_changes: Vec<StoredMessage>,
    prekeys_changed: bool,
    /// The commit that must be on disk before the response is sent, if not yet known to be.
    not_yet_durable: Option<PendingWrite>,
}

impl Processed {
    fn rejected(reason: RejectReason) -> Self {
        Self {
            response: DirectResponse::Rejected { reason },
            sender: None,
            new_message: None,
            status_changes: Vec::new(),
            prekeys_changed: false,
            not_yet_durable: None,
        }
    }

    /// An envelope processed before: acknowledged again, nothing else.
    fn duplicate(envelope_id: [u8; 32]) -> Self {
        Self {
            response: DirectResponse::Accepted {
                envelope_id,
                duplicate: true,
            },
            ..Self::rejected(RejectReason::Internal)
        }
    }
}

/// One lock per peer, held while that peer's ratchet state is read, advanced and written. Locks
/// nobody holds are dropped once there are many (a hostile sender can make new identities).
#[derive(Debug, Default)]
struct PeerLocks {
    map: StdMutex<HashMap<PublicIdentity, Arc<Mutex<()>>>>,
}

impl PeerLocks {
    fn get(&self, peer: &PublicIdentity) -> Arc<Mutex<()>> {
        let mut map = lock(&self.map);
        if map.len() >= PEER_LOCKS_PRUNE_AT {
            map.retain(|_, l| Arc::strong_count(l) > 1);
        }
        Arc::clone(map.entry(*peer).or_default())
    }
}

/// What processing an inbound envelope on `spawn_blocking` needs.
#[derive(Debug, Clone)]
struct OpenContext {
    storage: Storage,
    identity: Identity,
    peer_locks: Arc<PeerLocks>,
    prekey_lock: Arc<Mutex<()>>,
    pair_keys: Arc<PairKeys>,
    groups: Option<crate::groups::store::ControlSink>,
}

/// One of our messages: its recipient and its id.
type OurMessage = (PublicIdentity, [u8; 16]);

/// A text to seal as the message with this id.
type Text = ([u8; 16], String);

/// The result of sealing and committing outgoing texts.
#[derive(Debug)]
enum Sealed {
    /// Written (not yet durable): the messages and their envelopes, in order, and the write
    /// to wait for.
    Committed(Vec<(StoredMessage, Envelope)>, PendingWrite),
    /// No session with the peer yet and no bundle given: the texts back.
    NeedsBundle(Vec<Text>),
}

/// A text waiting in a peer's seal queue ([`Messenger::seal_queued`]).
#[derive(Debug)]
struct SealJob {
    text: Text,
    reply: oneshot::Sender<SealOutcome>,
}

/// What became of a queued text.
// A short-lived value, one per send: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum SealOutcome {
    /// Sealed and durably committed.
    Sealed(StoredMessage, Envelope),
    /// No session with the peer yet: the text back, to be sealed with a bundle.
    NeedsBundle(String),
    /// The batch it was part of failed as a whole: the text back, to be sealed alone (so that
    /// the error, if it is its own, is reported as such).
    Alone(String),
    /// Sealing it alone failed.
    Failed(NodeError),
}

/// Peers that serve a user, with their addresses (from a presence record).
pub(crate) type PeerAddrs = Vec<(PeerId, Vec<Multiaddr>)>;

/// The peers of the newest presence record among `found` that opens under `keys` at `now`,
/// other than `own` (empty when none opens). Used for contacts' and group members' presence.
pub(crate) fn newest_presence_peers(
    keys: &PresenceKeys,
    found: &[crate::event_loop::FoundRecord],
    now: u64,
    own: PeerId,
) -> PeerAddrs {
    let best = found
        .iter()
        .filter_map(|r| PresenceRecord::from_wire(&r.value).ok())
        .filter_map(|rec| keys.open(&rec, now).ok().map(|p| (rec.seq, p)))
        .max_by_key(|(seq, _)| *seq);
    let Some((_, presence)) = best else {
        return Vec::new();
    };
    presence
        .peers
        .iter()
        .filter_map(|p| {
            let peer = PeerId::from_bytes(&p.peer_id).ok()?;
            let addrs = p
                .addrs
                .iter()
                .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                .collect();
            Some((peer, addrs))
        })
        .filter(|(peer, _)| *peer != own)
        .collect()
}

/// The messaging state shared by the node's tasks and handles.
pub(crate) struct Messenger {
    storage: Storage,
    identity: Identity,
    me: PublicIdentity,
    peer_id: PeerId,
    net: NetClient,
    events: broadcast::Sender<NodeEvent>,
    addrs: watch::Receiver<Vec<Multiaddr>>,
    send_timeout: Duration,
    /// The outbox's first retry delay (doubled per attempt up to [`MAX_BACKOFF`]).
    first_retry: Duration,
    /// Serialises each peer's ratchet updates.
    peer_locks: Arc<PeerLocks>,
    /// Serialises changes of the prekey secrets and the replay cache.
    prekey_lock: Arc<Mutex<()>>,
    /// Pair mailboxes and pair-envelope keys of our partners.
    pair_keys: Arc<PairKeys>,
    /// Outgoing direct requests, batched per peer.
    batcher: Arc<Batcher>,
    /// Texts waiting to be sealed, per peer; a peer is in the map while its sealer runs.
    seal_queues: StdMutex<HashMap<PublicIdentity, VecDeque<SealJob>>>,
    /// Sealing and opening (about 100 µs of curve arithmetic each) run on `spawn_blocking`
    /// threads; this bounds how many at once to the number of cores. Without it, dozens of
    /// inbound envelopes opened at once outnumber the cores and starve the async workers that
    /// move every message through the network (each hop then waits for a time slice). A slot
    /// is never held while waiting for a peer's lock (so no cycle can form with those locks).
    cpu_slots: Arc<Semaphore>,
    publish_lock: Mutex<()>,
    /// What the last finished publication round did (whoever started it).
    last_publication: StdMutex<Option<PublishReport>>,
    publish_kick: Notify,
    outbox_kick: Notify,
    in_flight: StdMutex<HashSet<[u8; 16]>>,
    /// The task writing delivered marks after `send_text` answered (waited for at shutdown,
    /// see [`Messenger::finish_marks`]).
    marks: StdMutex<JoinSet<()>>,
    /// Messages acknowledged by their recipients, still to be marked delivered, and whether the
    /// task that writes them runs ([`Messenger::mark_delivered_later`]).
    marks_due: StdMutex<(Vec<OurMessage>, bool)>,
    wake_peers: StdMutex<HashSet<PublicIdentity>>,
    /// Who served each contact when we last looked: a presence record's peers or the peers a
    /// delivery reached, and when ([`Self::lookup_presence`], [`Self::known_route`]).
    presence_cache: StdMutex<HashMap<PublicIdentity, (Instant, PeerAddrs)>>,
    /// Presence lookups that went to the DHT (for tests).
    presence_lookups: std::sync::atomic::AtomicU64,
    /// Per current mailbox id: periodic rounds in a row that found it empty, and when the
    /// next periodic round should collect it again ([`Self::collect_due`]).
    idle_mailboxes: StdMutex<HashMap<[u8; 32], (u32, Instant)>>,
    /// Per watched mailbox id: the peers that answered its last collection, closest first. The
    /// next collection asks the closest of them and of its lookup's peers
    /// ([`Self::collect_one`]).
    known_replicas: StdMutex<HashMap<[u8; 32], Vec<PeerId>>>,
    published_contacts: StdMutex<Option<Vec<PublicIdentity>>>,
    mailbox: mailbox::Config,
    collect_kick: Notify,
    collect_lock: Mutex<()>,
    last_collect: StdMutex<Option<u64>>,
    watched: StdMutex<Vec<MailboxKeys>>,
    /// Messages collected from a mailbox whose senders still need a Delivered receipt (their
    /// status says "stored" until then), by sender; at most MAX_RECEIPT_IDS each.
    receipts_due: StdMutex<HashMap<PublicIdentity, Vec<MessageId>>>,
    receipt_kick: Notify,
    /// Where group control messages received over 1:1 go (`crate::groups`).
    group_sink: std::sync::OnceLock<crate::groups::store::ControlSink>,
}

impl std::fmt::Debug for Messenger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messenger")
            .field("me", &self.me)
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

/// Resolves once the node is stopping.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f).await?
}

fn wire_err(what: &'static str) -> impl FnOnce(meshchat_protocol::WireError) -> NodeError {
    move |source| NodeError::Wire { what, source }
}

fn crypto_err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Crypto {
        reason: e.to_string(),
    }
}

fn stopped(_: LoopStopped) -> NodeError {
    NodeError::Stopped
}

/// Retry delay after `attempts` failed attempts, the first after `first`.
fn backoff(first: Duration, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(16);
    first.saturating_mul(factor).min(MAX_BACKOFF)
}

fn load_session(storage: &Storage, peer: &PublicIdentity) -> Result<SessionRecord, NodeError> {
    match storage.session(peer)? {
        Some(bytes) => SessionRecord::from_wire(&bytes).map_err(wire_err("session record")),
        None => Ok(SessionRecord::new()),
    }
}

fn reject_reason_of(e: &SessionError) -> RejectReason {
    match e {
        SessionError::Envelope(env) if matches!(**env, EnvelopeError::Expired { .. }) => {
            RejectReason::Expired
        }
        SessionError::Envelope(env) if matches!(**env, EnvelopeError::FromTheFuture { .. }) => {
            RejectReason::FromTheFuture
        }
        SessionError::Replay { .. } | SessionError::Duplicate { .. } => RejectReason::Replayed,
        _ => RejectReason::Undecryptable,
    }
}

fn envelope_reject(e: &EnvelopeError) -> RejectReason {
    match e {
        EnvelopeError::Expired { .. } => RejectReason::Expired,
        EnvelopeError::FromTheFuture { .. } => RejectReason::FromTheFuture,
        _ => RejectReason::Malformed,
    }
}

impl Messenger {
    // Every argument is a distinct piece of the node the messenger is wired to.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        storage: Storage,
        identity: Identity,
        peer_id: PeerId,
        net: NetClient,
        events: broadcast::Sender<NodeEvent>,
        addrs: watch::Receiver<Vec<Multiaddr>>,
        send_timeout: Duration,
        first_retry: Duration,
        mailbox: mailbox::Config,
    ) -> Self {
        Self {
            first_retry,
            me: identity.public(),
            storage,
            identity,
            peer_id,
            net,
            events,
            addrs,
            send_timeout,
            peer_locks: Arc::default(),
            prekey_lock: Arc::default(),
            pair_keys: Arc::default(),
            batcher: Arc::default(),
            seal_queues: StdMutex::new(HashMap::new()),
            cpu_slots: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            )),
            publish_lock: Mutex::new(()),
            last_publication: StdMutex::new(None),
            publish_kick: Notify::new(),
            outbox_kick: Notify::new(),
            in_flight: StdMutex::new(HashSet::new()),
            marks: StdMutex::new(JoinSet::new()),
            marks_due: StdMutex::new((Vec::new(), false)),
            wake_peers: StdMutex::new(HashSet::new()),
            presence_cache: StdMutex::new(HashMap::new()),
            presence_lookups: std::sync::atomic::AtomicU64::new(0),
            idle_mailboxes: StdMutex::new(HashMap::new()),
            known_replicas: StdMutex::new(HashMap::new()),
            published_contacts: StdMutex::new(None),
            mailbox,
            collect_kick: Notify::new(),
            collect_lock: Mutex::new(()),
            last_collect: StdMutex::new(None),
            watched: StdMutex::new(Vec::new()),
            receipts_due: StdMutex::new(HashMap::new()),
            receipt_kick: Notify::new(),
            group_sink: std::sync::OnceLock::new(),
        }
    }

    /// Hand group control messages received over 1:1 to the group service from now on.
    pub(crate) fn set_group_sink(&self, sink: crate::groups::store::ControlSink) {
        let _ = self.group_sink.set(sink);
    }

    /// Use `peers` as `to`'s presence for a while (the group service found them through the
    /// group's presence records: group members need not be contacts).
    pub(crate) fn note_presence(&self, to: PublicIdentity, peers: PeerAddrs) {
        let peers: PeerAddrs = peers
            .into_iter()
            .filter(|(p, _)| *p != self.peer_id)
            .collect();
        if peers.is_empty() {
            return;
        }
        let mut cache = lock(&self.presence_cache);
        if cache
            .get(&to)
            .is_none_or(|(at, _)| at.elapsed() >= PRESENCE_CACHE_TTL)
        {
            cache.insert(to, (Instant::now(), peers));
        }
    }

    /// Send a group control message to `to` through the durable outbox (no message is shown
    /// for it). Returns once it is committed; delivery (directly, else to the recipient's
    /// mailbox, else retried by the outbox loop) goes on in the background.
    pub(crate) async fn send_control(
        self: &Arc<Self>,
        to: PublicIdentity,
        control: meshchat_protocol::GroupControl,
    ) -> Result<[u8; 16], NodeError> {
        self.send_control_with(to, control, None).await
    }

    /// What [`Self::send_control_with`] needs to reach `to`: nothing if we have a session with
    /// them, else their prekey bundle from the DHT (an error if it is not found within the send
    /// timeout). Lets a caller find out that `to` cannot be reached before it changes anything.
    pub(crate) async fn control_route(
        &self,
        to: &PublicIdentity,
    ) -> Result<Option<VerifiedBundle>, NodeError> {
        if *to == self.me {
            return Err(NodeError::ToSelf);
        }
        let storage = self.storage.clone();
        let who = *to;
        if blocking(move || Ok(load_session(&storage, &who)?.has_session())).await? {
            return Ok(None);
        }
        let deadline = Instant::now() + self.send_timeout;
        self.fetch_bundle(to, deadline).await.map(Some)
    }

    /// [`Self::send_control`] with the bundle [`Self::control_route`] found (used only if there
    /// is still no session with `to`).
    pub(crate) async fn send_control_with(
        self: &Arc<Self>,
        to: PublicIdentity,
        control: meshchat_protocol::GroupControl,
        bundle: Option<VerifiedBundle>,
    ) -> Result<[u8; 16], NodeError> {
        if to == self.me {
            return Err(NodeError::ToSelf);
        }
        let deadline = Instant::now() + self.send_timeout;
        let id = random_id();
        let content = Content::Group(control);
        lock(&self.in_flight).insert(id);
        let sealed = match self.seal_control_once(to, id, &content, bundle).await {
            Ok(Some(envelope)) => Ok(envelope),
            Ok(None) => match self.fetch_bundle(&to, deadline).await {
                Ok(bundle) => self
                    .seal_control_once(to, id, &content, Some(bundle))
                    .await
                    .and_then(|e| {
                        e.ok_or_else(|| NodeError::Crypto {
                            reason: "invariant: a bundle was given, yet the seal asked for one"
                                .into(),
                        })
                    }),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let envelope = match sealed {
            Ok(envelope) => envelope,
            Err(e) => {
                lock(&self.in_flight).remove(&id);
                return Err(e);
            }
        };
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let deadline = Instant::now() + me.send_timeout;
            let result = me.deliver_or_store(&to, &envelope, deadline).await;
            if let Err(e) = me.settle(&id, 0, result).await {
                tracing::debug!(error = %e, "settling a group control message failed");
            }
            lock(&me.in_flight).remove(&id);
        });
        Ok(id)
    }

    /// Seal `content` to `to` and commit session and outbox entry (no message); `None` when no
    /// session exists and no bundle was given.
    async fn seal_control_once(
        &self,
        to: PublicIdentity,
        id: [u8; 16],
        content: &Content,
        bundle: Option<VerifiedBundle>,
    ) -> Result<Option<Envelope>, NodeError> {
        let guard = self.peer_locks.get(&to).lock_owned().await;
        let storage = self.storage.clone();
        let identity = self.identity.clone();
        let routing = Arc::clone(&self.pair_keys);
        let content = content.clone();
        blocking(move || {
            let mut record = load_session(&storage, &to)?;
            let bundle = if record.has_session() { None } else { bundle };
            if !record.has_session() && bundle.is_none() {
                return Ok(None);
            }
            let envelope = seal_content(
                &identity,
                &routing,
                &mut record,
                bundle.as_ref(),
                &to,
                &content,
            )?;
            let envelope_bytes = envelope.to_wire().map_err(wire_err("envelope"))?;
            let session_bytes = record.to_wire().map_err(wire_err("session record"))?;
            storage.commit_outgoing_control(&to, &session_bytes, &id, &envelope_bytes)?;
            drop(guard);
            Ok(Some(envelope))
        })
        .await
    }

    /// Spawn the inbound worker, the publisher, the outbox loop, the mail collector and the
    /// worker for mail replicas push to us.
    pub(crate) fn spawn_tasks(
        self: &Arc<Self>,
        inbound: mpsc::Receiver<InboundBatch>,
        pushed: mpsc::Receiver<Pushed>,
        online: watch::Receiver<u64>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(Arc::clone(self).inbound_worker(inbound, shutdown.clone())),
            tokio::spawn(Arc::clone(self).publisher(shutdown.clone())),
            tokio::spawn(Arc::clone(self).outbox_loop(shutdown.clone())),
            tokio::spawn(Arc::clone(self).collector(online, shutdown.clone())),
            tokio::spawn(Arc::clone(self).push_worker(pushed, shutdown.clone())),
            tokio::spawn(Arc::clone(self).receipt_worker(shutdown)),
        ]
    }

    /// Wait (at most `limit`) for the delivered marks still being written, so that a node
    /// that stops right after a send leaves the message marked delivered.
    pub(crate) async fn finish_marks(&self, limit: Duration) {
        let mut marks = std::mem::take(&mut *lock(&self.marks));
        let drained =
            tokio::time::timeout(limit, async { while marks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("delivered marks still unwritten at shutdown");
        }
    }

    /// Mark our message `id` to `to` delivered soon, in one write with the other marks due by
    /// then; until it is written, `id` stays in `in_flight` (away from the outbox loop).
    fn mark_delivered_later(self: &Arc<Self>, to: PublicIdentity, id: [u8; 16]) {
        let start = {
            let mut due = lock(&self.marks_due);
            due.0.push((to, id));
            !std::mem::replace(&mut due.1, true)
        };
        if start {
            let me = Arc::clone(self);
            let mut marks = lock(&self.marks);
            while marks.try_join_next().is_some() {}
            marks.spawn(me.write_marks());
        }
    }

    /// Write the delivered marks due, all at once, until none are.
    async fn write_marks(self: Arc<Self>) {
        loop {
            let due = {
                let mut due = lock(&self.marks_due);
                if due.0.is_empty() {
                    due.1 = false;
                    return;
                }
                std::mem::take(&mut due.0)
            };
            let ids: Vec<[u8; 16]> = due.iter().map(|(_, id)| *id).collect();
            let storage = self.storage.clone();
            match blocking(move || Ok(storage.mark_delivered_many(&due)?)).await {
                Ok(changed) => changed.iter().for_each(|m| self.emit_status(m)),
                // Unmarked, their outbox entries stay: the outbox loop resends them and the
                // recipient acknowledges the copies as duplicates.
                Err(e) => tracing::warn!(error = %e, "marking delivered messages failed"),
            }
            let mut in_flight = lock(&self.in_flight);
            for id in &ids {
                in_flight.remove(id);
            }
        }
    }

    fn emit(&self, event: NodeEvent) {
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    fn emit_status(&self, m: &StoredMessage) {
        self.emit(NodeEvent::MessageStatus {
            id: m.id,
            peer: m.peer,
            status: m.status,
        });
    }

    /// Ask the publisher for a round now (e.g. a contact was added).
    pub(crate) fn trigger_publish(&self) {
        self.publish_kick.notify_one();
    }

    // ------------------------------------------------------------------------------------
    // Sending
    // ------------------------------------------------------------------------------------

    pub(crate) async fn send_text(
        self: &Arc<Self>,
        to: PublicIdentity,
        text: String,
    ) -> Result<SendReport, NodeError> {
        if text.is_empty() {
            return Err(NodeError::EmptyMessage);
        }
        if text.len() > MAX_TEXT_BYTES {
            return Err(NodeError::MessageTooLong {
                len: text.len(),
                max: MAX_TEXT_BYTES,
            });
        }
        if to == self.me {
            return Err(NodeError::ToSelf);
        }
        let deadline = Instant::now() + self.send_timeout;
        let id = random_id();
        // The outbox loop can see the entry as soon as it is written: keep it away until this
        // attempt has settled. (A fresh random id is never in flight already.)
        lock(&self.in_flight).insert(id);
        let (message, envelope) = match self.seal_text(to, id, text, deadline).await {
            Ok(sealed) => sealed,
            Err(e) => {
                lock(&self.in_flight).remove(&id);
                return Err(e);
            }
        };
        debug_assert_eq!(message.id, id);
        let result = self.deliver_or_store(&to, &envelope, deadline).await;
        tracing::debug!(
            message = %hex::encode(id),
            envelope = %crate::mailbox::short(&envelope.id()),
            mailbox = %crate::mailbox::short(&envelope.routing_key),
            ?result,
            "sent"
        );
        if matches!(result, Ok(Delivered::Direct)) {
            // The recipient has it durably: that is what the sender waits for. Marking it
            // delivered here is not synced anyway (a crash that loses the mark brings back the
            // outbox entry, whose resend is acknowledged as a duplicate), so it happens behind
            // the answer, with the message kept away from the outbox loop until it is written.
            self.mark_delivered_later(to, id);
            return Ok(SendReport {
                message_id: id,
                outcome: SendOutcome::Delivered,
            });
        }
        let outcome = self.settle(&id, 0, result).await;
        lock(&self.in_flight).remove(&id);
        Ok(SendReport {
            message_id: id,
            outcome: outcome?,
        })
    }

    /// Seal `text` as message `id` to `to` and commit it durably, in a batch with the other
    /// texts queued for `to` meanwhile ([`Self::seal_queued`]). Without a session, fetch the
    /// peer's bundle and seal it alone with it.
    async fn seal_text(
        self: &Arc<Self>,
        to: PublicIdentity,
        id: [u8; 16],
        text: String,
        deadline: Instant,
    ) -> Result<(StoredMessage, Envelope), NodeError> {
        let text = match self.seal_queued(to, (id, text)).await {
            SealOutcome::Sealed(message, envelope) => return Ok((message, envelope)),
            SealOutcome::Failed(e) => return Err(e),
            SealOutcome::Alone(text) => match self.seal_once(to, (id, text), None).await? {
                Ok(sealed) => return Ok(sealed),
                Err(text) => text,
            },
            SealOutcome::NeedsBundle(text) => text,
        };
        let bundle = self.fetch_bundle(&to, deadline).await?;
        match self.seal_once(to, (id, text), Some(bundle)).await? {
            Ok(sealed) => Ok(sealed),
            Err(_) => Err(NodeError::Crypto {
                reason: "invariant: a bundle was given, yet the seal asked for one".into(),
            }),
        }
    }

    /// Queue `text` for `to`'s sealer (starting one if none runs) and wait for what became of
    /// it.
    async fn seal_queued(self: &Arc<Self>, to: PublicIdentity, text: Text) -> SealOutcome {
        let (reply, outcome) = oneshot::channel();
        let start = {
            let mut queues = lock(&self.seal_queues);
            let start = !queues.contains_key(&to);
            queues
                .entry(to)
                .or_default()
                .push_back(SealJob { text, reply });
            start
        };
        if start {
            tokio::spawn(Arc::clone(self).sealer(to));
        }
        // A sealer drops a reply only when its task is cut short (the runtime stops).
        outcome
            .await
            .unwrap_or(SealOutcome::Failed(NodeError::Stopped))
    }

    /// Seal and commit the texts queued for `to`, all that are waiting (up to
    /// [`MAX_SEAL_BATCH`]) in one ratchet pass and one write, until none are. A batch's sync is
    /// awaited on its own task while the next batch is sealed, so that under load one sync
    /// covers many messages and the sealing never waits for the disk.
    async fn sealer(self: Arc<Self>, to: PublicIdentity) {
        loop {
            let jobs: Vec<SealJob> = {
                let mut queues = lock(&self.seal_queues);
                let Some(queue) = queues.get_mut(&to) else {
                    return;
                };
                if queue.is_empty() {
                    queues.remove(&to);
                    return;
                }
                let n = queue.len().min(MAX_SEAL_BATCH);
                queue.drain(..n).collect()
            };
            let (texts, replies): (Vec<Text>, Vec<_>) =
                jobs.into_iter().map(|j| (j.text, j.reply)).unzip();
            let alone = texts.len() == 1;
            let kept = (!alone).then(|| texts.clone());
            match self.commit_texts(to, texts, None).await {
                Ok(Sealed::Committed(sealed, pending)) => {
                    let storage = self.storage.clone();
                    tokio::spawn(async move {
                        if let Err(e) = storage.durable(pending).await {
                            // Written but perhaps not on disk: each send reports the failure.
                            tracing::warn!(error = %e, "syncing sealed messages failed");
                            for reply in replies {
                                let failed = NodeError::internal(format!(
                                    "the message could not be made durable: {e}"
                                ));
                                let _ = reply.send(SealOutcome::Failed(failed));
                            }
                            return;
                        }
                        for (reply, (message, envelope)) in replies.into_iter().zip(sealed) {
                            let _ = reply.send(SealOutcome::Sealed(message, envelope));
                        }
                    });
                }
                Ok(Sealed::NeedsBundle(texts)) => {
                    for (reply, (_, text)) in replies.into_iter().zip(texts) {
                        let _ = reply.send(SealOutcome::NeedsBundle(text));
                    }
                }
                Err(e) => match kept {
                    None => {
                        if let Some(reply) = replies.into_iter().next() {
                            let _ = reply.send(SealOutcome::Failed(e));
                        }
                    }
                    Some(texts) => {
                        tracing::debug!(error = %e, n = texts.len(), "a batch of texts failed to seal; sealing them one by one");
                        for (reply, (_, text)) in replies.into_iter().zip(texts) {
                            let _ = reply.send(SealOutcome::Alone(text));
                        }
                    }
                },
            }
        }
    }

    /// Seal one text alone and commit it durably: `Err(text)` when a bundle is needed.
    async fn seal_once(
        &self,
        to: PublicIdentity,
        text: Text,
        bundle: Option<VerifiedBundle>,
    ) -> Result<Result<(StoredMessage, Envelope), String>, NodeError> {
        match self.commit_texts(to, vec![text], bundle).await? {
            Sealed::Committed(mut sealed, pending) => {
                self.storage.durable(pending).await?;
                sealed
                    .pop()
                    .map(Ok)
                    .ok_or_else(|| NodeError::internal("one text sealed into no message"))
            }
            Sealed::NeedsBundle(mut texts) => texts
                .pop()
                .map(|(_, text)| Err(text))
                .ok_or_else(|| NodeError::internal("one text came back as none")),
        }
    }

    /// Under the peer's lock and a CPU slot, seal `texts` in order and write them in one batch
    /// (not yet durable: wait for the returned write).
    async fn commit_texts(
        &self,
        to: PublicIdentity,
        texts: Vec<Text>,
        bundle: Option<VerifiedBundle>,
    ) -> Result<Sealed, NodeError> {
        // The peer's lock first, then a CPU slot: a slot is never held while waiting for a lock
        // (see `cpu_slots`).
        let guard = self.peer_locks.get(&to).lock_owned().await;
        let slot = self.cpu_slot().await?;
        let storage = self.storage.clone();
        let identity = self.identity.clone();
        let routing = Arc::clone(&self.pair_keys);
        blocking(move || {
            let sealed =
                seal_and_commit(&storage, &identity, &routing, &to, texts, bundle.as_ref());
            drop(guard);
            drop(slot);
            sealed
        })
        .await
    }

    /// Record the result of a delivery attempt of our message `id` (after `attempts` earlier
    /// failed ones).
    async fn settle(
        &self,
        id: &[u8; 16],
        attempts: u32,
        result: Result<Delivered, DeliveryFailure>,
    ) -> Result<SendOutcome, NodeError> {
        let storage = self.storage.clone();
        let id = *id;
        match result {
            Ok(Delivered::Stored { replicas }) => {
                let n = u32::try_from(replicas).unwrap_or(u32::MAX);
                let changed = blocking(move || Ok(storage.mark_stored(&id, n)?)).await?;
                if let Some(m) = changed {
                    self.emit_status(&m);
                }
                Ok(SendOutcome::Stored { replicas: n })
            }
            Ok(Delivered::Direct) => {
                let changed = blocking(move || Ok(storage.mark_delivered(&id)?)).await?;
                if let Some(m) = changed {
                    self.emit_status(&m);
                }
                Ok(SendOutcome::Delivered)
            }
            Err(DeliveryFailure::Rejected(reason)) => {
                tracing::info!(id = %hex::encode(id), %reason, "recipient refused the message; giving up");
                let changed = blocking(move || Ok(storage.abandon(&id)?)).await?;
                if let Some(m) = changed {
                    self.emit_status(&m);
                }
                Ok(SendOutcome::Failed {
                    reason: format!("the recipient refused the message: {reason}"),
                })
            }
            Err(DeliveryFailure::Unreachable(reason)) => {
                let attempts = attempts.saturating_add(1);
                let next = unix_now_ms().saturating_add(
                    u64::try_from(backoff(self.first_retry, attempts).as_millis())
                        .unwrap_or(u64::MAX),
                );
                blocking(move || Ok(storage.reschedule(&id, attempts, next)?)).await?;
                Ok(SendOutcome::Queued { reason })
            }
        }
    }

    /// Find a valid prekey bundle of `to` in the DHT (highest version wins), retrying until
    /// `deadline`.
    async fn fetch_bundle(
        &self,
        to: &PublicIdentity,
        deadline: Instant,
    ) -> Result<VerifiedBundle, NodeError> {
        let key = records::bundle_record_key(to);
        loop {
            let found = self.net.get_record(key.clone()).await.map_err(stopped)?;
            let now = unix_now();
            let best = found
                .iter()
                .filter_map(|r| {
                    let checked = PrekeyBundle::from_wire(&r.value)
                        .map_err(|e| e.to_string())
                        .and_then(|b| b.verify(now).map_err(|e| e.to_string()));
                    match checked {
                        Ok(v) if v.identity() == to => Some(v),
                        Ok(_) => None,
                        Err(e) => {
                            tracing::debug!(peer = ?r.peer, error = %e, "ignoring an invalid bundle");
                            None
                        }
                    }
                })
                .max_by_key(|v| v.version());
            if let Some(b) = best {
                return Ok(b);
            }
            if Instant::now() + DELIVERY_PAUSE >= deadline {
                return Err(NodeError::NoBundle {
                    user: to.user_id().to_string(),
                });
            }
            tokio::time::sleep(DELIVERY_PAUSE).await;
        }
    }

    /// The peers (and addresses) `to` publishes to us, newest record of the current or the
    /// previous epoch; cached for a short while.
    async fn lookup_presence(&self, to: &PublicIdentity) -> Result<PeerAddrs, LoopStopped> {
        if let Some((at, peers)) = lock(&self.presence_cache).get(to) {
            if at.elapsed() < PRESENCE_CACHE_TTL {
                return Ok(peers.clone());
            }
        }
        self.presence_lookups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pair = pair_secret(&self.identity, to);
        let now = unix_now();
        let current = addressing::epoch(now);
        for epoch in [current, current.saturating_sub(1)] {
            let keys = PresenceKeys::derive(&pair, to, epoch);
            let found = self.net.get_record(keys.dht_key()).await?;
            let peers = newest_presence_peers(&keys, &found, now, self.peer_id);
            if !peers.is_empty() {
                lock(&self.presence_cache).insert(*to, (Instant::now(), peers.clone()));
                return Ok(peers);
            }
        }
        Ok(Vec::new())
    }

    fn forget_presence(&self, to: &PublicIdentity) {
        lock(&self.presence_cache).remove(to);
    }

    /// The peers that served `to` when we last looked (a presence record or a delivery),
    /// once that is too old to skip the lookup ([`PRESENCE_CACHE_TTL`]) but not older than
    /// [`ROUTE_TTL`]: worth one try before the DHT is asked again. A contact's node mostly
    /// keeps its peer ID and addresses, and a lookup costs a dozen new connections.
    fn known_route(&self, to: &PublicIdentity) -> Option<PeerAddrs> {
        let cache = lock(&self.presence_cache);
        let (at, peers) = cache.get(to)?;
        let age = at.elapsed();
        (age >= PRESENCE_CACHE_TTL && age < ROUTE_TTL && !peers.is_empty()).then(|| peers.clone())
    }

    /// `peers` just stored a message for `to`: they serve `to`, as of now.
    fn confirm_route(&self, to: &PublicIdentity, peers: PeerAddrs) {
        lock(&self.presence_cache).insert(*to, (Instant::now(), peers));
    }

    /// Deliver directly until `deadline`; if the recipient cannot be reached, store the
    /// envelope in its mailbox (`envelope.routing_key`) on the closest replicas.
    async fn deliver_or_store(
        &self,
        to: &PublicIdentity,
        envelope: &Envelope,
        deadline: Instant,
    ) -> Result<Delivered, DeliveryFailure> {
        match self.deliver(to, envelope, deadline).await {
            Ok(()) => Ok(Delivered::Direct),
            Err(DeliveryFailure::Unreachable(why)) => match self.store_in_mailbox(envelope).await {
                Ok(replicas) => Ok(Delivered::Stored { replicas }),
                Err(e) => Err(DeliveryFailure::Unreachable(format!(
                    "{why}; and the mailbox: {e}"
                ))),
            },
            Err(e) => Err(e),
        }
    }

    /// STORE `envelope` on the `r` peers closest to its mailbox id; `Ok(n)` when `n` replicas
    /// acknowledged durably and `n` reaches the quorum (or all peers found, if fewer exist):
    /// once all answered, or [`STORE_GRACE`] after the quorum.
    pub(crate) async fn store_in_mailbox(&self, envelope: &Envelope) -> Result<usize, String> {
        let expected = envelope.id();
        let peers = self
            .net
            .closest_peers(
                envelope.routing_key.to_vec(),
                self.mailbox.replicas.max(1),
                crate::event_loop::LookupPurpose::MailboxStore,
            )
            .await
            .map_err(|_| "the node is shutting down".to_owned())?
            .peers;
        if peers.is_empty() {
            return Err("no DHT peers to hold the mailbox".into());
        }
        let needed = self.mailbox.quorum.max(1).min(peers.len());
        // Answered at most [`STORE_GRACE`] after a quorum acknowledged: the other requests are
        // on their way and their replicas store the envelope all the same (a slow replica's
        // 15 s timeout is not on the path of `send`).
        let mut results: futures::stream::FuturesUnordered<_> = peers
            .iter()
            .map(|peer| async move {
                let r = self
                    .net
                    .mailbox_request(
                        *peer,
                        MailboxRequest::Store {
                            envelope: envelope.clone(),
                        },
                    )
                    .await;
                (*peer, r)
            })
            .collect();
        let mut acks = 0;
        let mut acked = Vec::new();
        let mut last = String::new();
        let mut grace_until: Option<tokio::time::Instant> = None;
        while let Some((peer, r)) = match grace_until {
            None => results.next().await,
            Some(until) => tokio::time::timeout_at(until, results.next())
                .await
                .ok()
                .flatten(),
        } {
            match r {
                Ok(Ok(MailboxResponse::Stored { envelope_id, .. })) if envelope_id == expected => {
                    acks += 1;
                    acked.push(peer);
                    if acks >= needed && grace_until.is_none() {
                        grace_until = Some(tokio::time::Instant::now() + STORE_GRACE);
                    }
                }
                Ok(Ok(MailboxResponse::Refused { reason })) => {
                    last = format!("replica {peer} refused: {reason}")
                }
                Ok(Ok(other)) => last = format!("replica {peer} answered {other:?}"),
                Ok(Err(e)) => last = format!("replica {peer} unreachable: {e}"),
                Err(LoopStopped) => return Err("the node is shutting down".into()),
            }
        }
        tracing::debug!(
            mailbox = %crate::mailbox::short(&envelope.routing_key),
            envelope = %crate::mailbox::short(&expected),
            ?acked,
            asked = peers.len(),
            needed,
            "stored an envelope in a mailbox"
        );
        if acks >= needed {
            Ok(acks)
        } else {
            Err(format!(
                "only {acks} of {needed} replicas acknowledged ({last})"
            ))
        }
    }

    // ------------------------------------------------------------------------------------
    // Collecting mail
    // ------------------------------------------------------------------------------------

    /// Ask the collector for a round now.
    pub(crate) fn trigger_collect(&self) {
        self.collect_kick.notify_one();
    }

    /// One collection round: from every watched mailbox, FETCH from the closest replicas,
    /// open and store each new envelope durably (deduplicated by envelope id), then DELETE
    /// what was collected; subscribe to pushes for the current mailboxes.
    pub(crate) async fn collect_mail(&self) -> Result<CollectReport, NodeError> {
        self.collect_due(false).await
    }

    /// A collection round; a `periodic` one leaves out the current mailboxes that held
    /// nothing lately until they are due again (their replicas push what arrives, and each
    /// collection renews that subscription): a user with many quiet conversations does not
    /// look up and ask ten replicas for each of them every minute.
    async fn collect_due(&self, periodic: bool) -> Result<CollectReport, NodeError> {
        let _round = self.collect_lock.lock().await;
        let started = unix_now();
        let keys = {
            let storage = self.storage.clone();
            let identity = self.identity.clone();
            let since = *lock(&self.last_collect);
            blocking(move || watched_mailboxes(&storage, &identity, since, started)).await?
        };
        *lock(&self.watched) = keys.iter().map(|(k, _)| k.clone()).collect();
        let mailboxes = keys.len();
        let keys: Vec<(MailboxKeys, bool)> = if periodic {
            let now = Instant::now();
            let idle = lock(&self.idle_mailboxes);
            // Older epochs are always collected: they leave the list once a round has.
            keys.into_iter()
                .filter(|(k, current)| {
                    !current || idle.get(&k.id()).is_none_or(|(_, due)| *due <= now)
                })
                .collect()
        } else {
            keys
        };
        let mut report = CollectReport {
            mailboxes,
            idle_skipped: mailboxes - keys.len(),
            ..CollectReport::default()
        };
        let seen_this_round: StdMutex<HashSet<[u8; 32]>> = StdMutex::new(HashSet::new());
        let counts: Vec<Result<Collected, NodeError>> = futures::stream::iter(keys)
            .map(|(keys, subscribe)| {
                let seen = &seen_this_round;
                async move {
                    let got = self.collect_one(&keys, subscribe, seen).await;
                    if subscribe {
                        if let Ok(c) = &got {
                            let heard = c.heard_enough(self.mailbox.replicas);
                            self.note_collected(keys.id(), heard, c.envelopes > 0);
                        }
                    }
                    got
                }
            })
            .buffer_unordered(COLLECT_PARALLEL)
            .collect()
            .await;
        for c in counts {
            let c = c?;
            report.replicas_answered += c.answered;
            report.envelopes += c.envelopes;
            report.new_messages += c.new;
            report.deleted += c.deleted;
            report.short_lookups += usize::from(c.short_lookup);
        }
        if report.replicas_answered > 0 {
            *lock(&self.last_collect) = Some(started);
        }
        tracing::debug!(?report, "mail collection round");
        Ok(report)
    }

    /// Remember how collecting current mailbox `id` went: it is due again after one interval
    /// if it held mail (or no replica answered), after twice as many as last time (up to
    /// [`MAX_IDLE_STEPS`] doublings) if it was empty.
    fn note_collected(&self, id: [u8; 32], answered: bool, had_mail: bool) {
        let mut idle = lock(&self.idle_mailboxes);
        let steps = match idle.get(&id) {
            _ if had_mail || !answered => 0,
            Some((steps, _)) => (steps + 1).min(MAX_IDLE_STEPS),
            None => 1,
        };
        let longest = self.mailbox.subscription / 2;
        let wait = crate::mailbox::quiet_wait(self.mailbox.collect_interval, steps, longest);
        remember(&mut idle, id, (steps, Instant::now() + wait));
    }

    /// Mail arrived for mailbox `id` (pushed): collect it in the next periodic round again.
    fn mailbox_active(&self, id: &[u8; 32]) {
        lock(&self.idle_mailboxes).remove(id);
    }

    /// Collect one mailbox from the `2r` peers closest to it: the closest among those its
    /// lookup found and those that answered its last collection. A lookup that came back short
    /// ([`crate::event_loop::Lookup::sure`]: it timed out, was cut short, or the peers it
    /// tried did not answer) may name only far peers; the peers that answered last time are
    /// the replicas of then, so one bad lookup does not hide every replica, and short lookups
    /// one after the other still close in on the mailbox.
    async fn collect_one(
        &self,
        keys: &MailboxKeys,
        subscribe: bool,
        seen_this_round: &StdMutex<HashSet<[u8; 32]>>,
    ) -> Result<Collected, NodeError> {
        let id = keys.id();
        let lookup = self
            .net
            .closest_peers(
                id.to_vec(),
                self.mailbox.replicas.max(1).saturating_mul(2),
                crate::event_loop::LookupPurpose::MailboxCollection,
            )
            .await
            .map_err(stopped)?;
        let want = self.mailbox.replicas.max(1).saturating_mul(2);
        let known = lock(&self.known_replicas)
            .get(&id)
            .cloned()
            .unwrap_or_default();
        let peers = closest_of(&id, &lookup.peers, &known, want);
        let results = futures::future::join_all(
            peers
                .iter()
                .map(|peer| self.collect_from(keys, *peer, subscribe, seen_this_round)),
        )
        .await;
        let mut total = Collected {
            short_lookup: !lookup.sure,
            asked: peers.len(),
            ..Collected::default()
        };
        let mut answering = Vec::with_capacity(peers.len());
        for (peer, r) in peers.iter().zip(results) {
            let (answered, envelopes, new, deleted) = r?;
            if answered > 0 {
                answering.push(*peer);
            }
            total.answered += answered;
            total.envelopes += envelopes;
            total.new += new;
            total.deleted += deleted;
        }
        if !answering.is_empty() {
            remember(&mut lock(&self.known_replicas), id, answering);
        }
        tracing::debug!(
            mailbox = %crate::mailbox::short(&id),
            ?peers,
            found = lookup.peers.len(),
            sure = lookup.sure,
            answered = total.answered,
            envelopes = total.envelopes,
            new = total.new,
            "collected a mailbox"
        );
        Ok(total)
    }

    /// Collect one mailbox from one replica.
    async fn collect_from(
        &self,
        keys: &MailboxKeys,
        peer: PeerId,
        subscribe: bool,
        seen_this_round: &StdMutex<HashSet<[u8; 32]>>,
    ) -> Result<(usize, usize, usize, u64), NodeError> {
        let mut answered = 0;
        let mut fetched = 0;
        let mut new = 0;
        let mut deleted = 0;
        let mut after = None;
        let mut done: Vec<[u8; 32]> = Vec::new();
        loop {
            let request = keys.fetch(after, unix_now(), &mut OsRng);
            let (envelopes, more) = match self.net.mailbox_request(peer, request).await {
                Err(LoopStopped) => return Err(NodeError::Stopped),
                Ok(Ok(MailboxResponse::Envelopes { envelopes, more })) => (envelopes, more),
                Ok(other) => {
                    tracing::debug!(%peer, ?other, "a replica did not answer a FETCH");
                    break;
                }
            };
            answered = 1;
            after = envelopes.last().map(Envelope::id);
            for envelope in envelopes {
                let id = envelope.id();
                if envelope.routing_key != keys.id() {
                    // A replica answering with another mailbox's mail: drop it.
                    continue;
                }
                if !lock(seen_this_round).insert(id) {
                    done.push(id);
                    continue;
                }
                fetched += 1;
                let (deletable, was_new) = self.take_mail(peer, envelope).await?;
                new += usize::from(was_new);
                if deletable {
                    done.push(id);
                }
            }
            if !more || after.is_none() {
                break;
            }
        }
        for chunk in done.chunks(MAX_DELETE_IDS) {
            let request = keys.delete(chunk.to_vec(), unix_now(), &mut OsRng);
            match self.net.mailbox_request(peer, request).await {
                Err(LoopStopped) => return Err(NodeError::Stopped),
                Ok(Ok(MailboxResponse::Deleted { count })) => deleted += u64::from(count),
                Ok(other) => tracing::debug!(%peer, ?other, "a replica did not answer a DELETE"),
            }
        }
        if subscribe && answered > 0 {
            let request = keys.subscribe(unix_now(), &mut OsRng);
            match self.net.mailbox_request(peer, request).await {
                Err(LoopStopped) => return Err(NodeError::Stopped),
                Ok(Ok(MailboxResponse::Subscribed)) => {}
                Ok(other) => tracing::debug!(%peer, ?other, "a replica refused a SUBSCRIBE"),
            }
        }
        Ok((answered, fetched, new, deleted))
    }

    /// Open and store one envelope from a mailbox (as if it had arrived directly). Returns
    /// (may be deleted from the replica, was a new message).
    async fn take_mail(&self, peer: PeerId, envelope: Envelope) -> Result<(bool, bool), NodeError> {
        let processed = match self.process_inbound(envelope).await {
            Ok(p) => p,
            Err(NodeError::Stopped) => return Err(NodeError::Stopped),
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot process mail from a mailbox");
                return Ok((false, false));
            }
        };
        let deletable = match processed.response {
            DirectResponse::Accepted { .. } => true,
            DirectResponse::Rejected { reason } => {
                tracing::debug!(%peer, %reason, "mail from a mailbox refused");
                !reason.is_transient()
            }
        };
        let was_new = processed.new_message.is_some();
        if let Some(m) = &processed.new_message {
            let mut due = lock(&self.receipts_due);
            let ids = due.entry(m.peer).or_default();
            if ids.len() < MAX_RECEIPT_IDS {
                ids.push(MessageId(m.id));
            }
            drop(due);
            self.receipt_kick.notify_one();
        }
        self.after_processed(processed);
        Ok((deletable, was_new))
    }

    /// Emit the events of a processed envelope and wake what it concerns.
    fn after_processed(&self, processed: Processed) {
        if let Some(m) = processed.new_message {
            self.emit(NodeEvent::MessageReceived(m));
        }
        for m in &processed.status_changes {
            self.emit_status(m);
        }
        if processed.prekeys_changed {
            self.trigger_publish();
        }
        if let Some(sender) = processed.sender {
            self.wake_outbox([sender]);
        }
    }

    /// Try what the outbox holds for `peers` now, whatever their backoff says (they showed
    /// that they are online, or asked for something we owe them).
    pub(crate) fn wake_outbox(&self, peers: impl IntoIterator<Item = PublicIdentity>) {
        lock(&self.wake_peers).extend(peers);
        self.outbox_kick.notify_one();
    }

    /// Collect at start, on every reconnect, when asked, and every `collect_interval`; a round
    /// that reached no replica is retried soon.
    async fn collector(
        self: Arc<Self>,
        mut online: watch::Receiver<u64>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut retry = COLLECT_RETRY;
        // The first round as soon as the bootstrap peers may have answered.
        let mut next = tokio::time::Instant::now() + COLLECT_RETRY / 2;
        // Right after start-up or a reconnect the routing table is still filling, so a round
        // may reach replicas that are not yet the closest: a few quick follow-up rounds.
        let mut followups = COLLECT_FOLLOWUPS;
        loop {
            // Only a round that came by the clock, with nothing to make up for, may leave
            // quiet mailboxes out.
            let periodic = tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                _ = self.collect_kick.notified() => false,
                changed = online.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Let the routing table fill before looking up.
                    tokio::time::sleep(COLLECT_RETRY).await;
                    followups = COLLECT_FOLLOWUPS;
                    false
                },
                _ = tokio::time::sleep_until(next) => followups == 0 && retry == COLLECT_RETRY,
            };
            match self.collect_due(periodic).await {
                Ok(report) if periodic && report.idle_skipped == report.mailboxes => {
                    next = tokio::time::Instant::now()
                        + crate::mailbox::jittered(self.mailbox.collect_interval);
                }
                Ok(report) if report.replicas_answered > 0 => {
                    retry = COLLECT_RETRY;
                    let wait = if followups > 0 {
                        followups -= 1;
                        COLLECT_FOLLOWUP_PAUSE * (COLLECT_FOLLOWUPS - followups)
                    } else {
                        crate::mailbox::jittered(self.mailbox.collect_interval)
                    };
                    next = tokio::time::Instant::now() + wait;
                }
                Ok(_) => {
                    next = tokio::time::Instant::now() + retry;
                    retry = (retry * 2).min(MAX_COLLECT_RETRY);
                }
                Err(NodeError::Stopped) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "collecting mail failed");
                    next = tokio::time::Instant::now() + retry;
                    retry = (retry * 2).min(MAX_COLLECT_RETRY);
                }
            }
        }
    }

    /// Mail a replica pushed to us: open, store durably, answer `Stored`, then DELETE it from
    /// that replica (the others are emptied by the next collection round).
    async fn push_worker(
        self: Arc<Self>,
        mut pushed: mpsc::Receiver<Pushed>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let item = tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                item = pushed.recv() => match item {
                    Some(item) => item,
                    None => return,
                },
            };
            let Pushed {
                peer,
                envelope,
                channel,
            } = item;
            let routing_key = envelope.routing_key;
            let envelope_id = envelope.id();
            self.mailbox_active(&routing_key);
            let ours = lock(&self.watched)
                .iter()
                .find(|k| k.id() == routing_key)
                .cloned();
            let Some(keys) = ours else {
                let refused = MailboxResponse::Refused {
                    reason: meshchat_protocol::MailboxReject::Malformed,
                };
                if self.net.mailbox_respond(channel, refused).await.is_err() {
                    return;
                }
                continue;
            };
            let (deletable, was_new) = match self.take_mail(peer, envelope).await {
                Ok(r) => r,
                Err(_) => return,
            };
            let response = if deletable {
                MailboxResponse::Stored {
                    envelope_id,
                    duplicate: !was_new,
                }
            } else {
                MailboxResponse::Refused {
                    reason: meshchat_protocol::MailboxReject::Internal,
                }
            };
            if self.net.mailbox_respond(channel, response).await.is_err() {
                return;
            }
            if deletable {
                let request = keys.delete(vec![envelope_id], unix_now(), &mut OsRng);
                if let Ok(Ok(r)) = self.net.mailbox_request(peer, request).await {
                    tracing::debug!(%peer, ?r, "deleted pushed mail from its replica");
                }
            }
        }
    }

    /// Try to hand `envelope` to `to`'s node directly until `deadline`: first to the peers a
    /// route already names (see [`Self::known_route`]) within half the time, then to those the
    /// presence records name, looked up again after each round that reached nobody.
    async fn deliver(
        &self,
        to: &PublicIdentity,
        envelope: &Envelope,
        deadline: Instant,
    ) -> Result<(), DeliveryFailure> {
        let mut last = String::from("no presence record of the recipient found in the DHT");
        let mut pause = DELIVERY_PAUSE;
        let mut known = self.known_route(to);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            if let Some(peers) = known.take() {
                let until = Instant::now() + remaining / 2;
                match self
                    .try_peers(envelope, peers.clone(), until, &mut last)
                    .await
                {
                    Err(LoopStopped) => return Err(shutting_down()),
                    Ok(Ok(())) => {
                        self.confirm_route(to, peers);
                        return Ok(());
                    }
                    // A route is a guess: whatever went wrong, the presence records decide.
                    Ok(Err(failure)) => {
                        if let DeliveryFailure::Rejected(reason) = failure {
                            last = format!("the recipient's node is {reason}");
                        }
                        self.forget_presence(to);
                        continue;
                    }
                }
            }
            match tokio::time::timeout(remaining, self.lookup_presence(to)).await {
                Err(_) => break,
                Ok(Err(LoopStopped)) => return Err(shutting_down()),
                Ok(Ok(peers)) if peers.is_empty() => {}
                Ok(Ok(peers)) => match self.try_peers(envelope, peers, deadline, &mut last).await {
                    Err(LoopStopped) => return Err(shutting_down()),
                    Ok(Err(DeliveryFailure::Unreachable(_))) => self.forget_presence(to),
                    Ok(done) => return done,
                },
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(remaining)).await;
            pause = (pause * 2).min(MAX_DELIVERY_PAUSE);
        }
        Err(DeliveryFailure::Unreachable(last))
    }

    /// Hand `envelope` to each of `peers` in turn until one stores it or `until` passes;
    /// `last` keeps why the last attempt failed.
    async fn try_peers(
        &self,
        envelope: &Envelope,
        peers: PeerAddrs,
        until: Instant,
        last: &mut String,
    ) -> Result<Result<(), DeliveryFailure>, LoopStopped> {
        let expected_id = envelope.id();
        for (peer, addrs) in peers {
            let remaining = until.saturating_duration_since(Instant::now());
            let attempt = self.batcher.send(&self.net, peer, addrs, envelope.clone());
            match tokio::time::timeout(remaining, attempt).await {
                Ok(Ok(Ok(DirectResponse::Accepted { envelope_id, .. }))) => {
                    if envelope_id == expected_id {
                        return Ok(Ok(()));
                    }
                    *last = format!("peer {peer} acknowledged a different envelope");
                }
                Ok(Ok(Ok(DirectResponse::Rejected { reason }))) => {
                    if !reason.is_transient() {
                        return Ok(Err(DeliveryFailure::Rejected(reason)));
                    }
                    *last = format!("the recipient's node is {reason}");
                }
                Ok(Ok(Err(e))) => *last = format!("cannot reach the recipient's node: {e}"),
                Ok(Err(LoopStopped)) => return Err(LoopStopped),
                Err(_) => {
                    *last = "the recipient's node did not answer in time".into();
                    break;
                }
            }
        }
        Ok(Err(DeliveryFailure::Unreachable(last.clone())))
    }

    // ------------------------------------------------------------------------------------
    // Receipts
    // ------------------------------------------------------------------------------------

    pub(crate) async fn mark_read(
        &self,
        peer: PublicIdentity,
        ids: Vec<[u8; 16]>,
    ) -> Result<(), NodeError> {
        let changed = {
            let storage = self.storage.clone();
            blocking(move || {
                let mut changed = Vec::new();
                for id in ids {
                    if storage.mark_read(&peer, &id)?.is_some() {
                        changed.push(MessageId(id));
                    }
                }
                Ok(changed)
            })
            .await?
        };
        self.send_receipt(peer, changed, ReceiptKind::Read).await
    }

    /// Tell `peer` that we showed its messages `ids`, already marked read in storage (the
    /// control socket's `Inbox` and `MarkRead`): read receipts of at most [`MAX_RECEIPT_IDS`]
    /// ids each; best effort.
    pub(crate) async fn send_read_receipts(
        &self,
        peer: PublicIdentity,
        ids: Vec<[u8; 16]>,
    ) -> Result<(), NodeError> {
        for chunk in ids.chunks(MAX_RECEIPT_IDS) {
            let chunk = chunk.iter().copied().map(MessageId).collect();
            self.send_receipt(peer, chunk, ReceiptKind::Read).await?;
        }
        Ok(())
    }

    /// Tell `peer` that we received (`Delivered`) or showed (`Read`) its messages `ids`: one
    /// receipt, sent directly or stored in its mailbox; best effort (logged when it fails).
    async fn send_receipt(
        &self,
        peer: PublicIdentity,
        ids: Vec<MessageId>,
        kind: ReceiptKind,
    ) -> Result<(), NodeError> {
        if ids.is_empty() {
            return Ok(());
        }
        let envelope = {
            let _guard = self.peer_locks.get(&peer).lock_owned().await;
            let storage = self.storage.clone();
            let identity = self.identity.clone();
            let routing = Arc::clone(&self.pair_keys);
            blocking(move || {
                let mut record = load_session(&storage, &peer)?;
                if !record.has_session() {
                    return Ok(None);
                }
                let content = Content::Receipt { kind, ids };
                let env = seal_content(&identity, &routing, &mut record, None, &peer, &content)?;
                let bytes = record.to_wire().map_err(wire_err("session record"))?;
                storage.save_session(&peer, &bytes)?;
                Ok(Some(env))
            })
            .await?
        };
        if let Some(env) = envelope {
            let deadline = Instant::now() + self.send_timeout;
            if let Err(e) = self.deliver_or_store(&peer, &env, deadline).await {
                tracing::debug!(?e, ?kind, "receipt not delivered");
            }
        }
        Ok(())
    }

    /// Sends the Delivered receipts for mail collected from mailboxes, one receipt per sender
    /// for everything collected since the last one.
    async fn receipt_worker(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                _ = self.receipt_kick.notified() => {}
            }
            let due: Vec<(PublicIdentity, Vec<MessageId>)> =
                lock(&self.receipts_due).drain().collect();
            for (peer, ids) in due {
                if let Err(e) = self.send_receipt(peer, ids, ReceiptKind::Delivered).await {
                    tracing::debug!(error = %e, "delivered receipt not sent");
                }
            }
        }
    }

    // ------------------------------------------------------------------------------------
    // Receiving
    // ------------------------------------------------------------------------------------

    /// Takes envelopes from the event loop and processes up to [`INBOUND_PARALLEL`] at once, so
    /// they are opened on both cores and share their commits' syncs.
    async fn inbound_worker(
        self: Arc<Self>,
        mut inbound: mpsc::Receiver<InboundBatch>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let slots = Arc::new(Semaphore::new(INBOUND_PARALLEL));
        loop {
            let permit = tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                permit = Arc::clone(&slots).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let item = tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                item = inbound.recv() => match item {
                    Some(item) => item,
                    None => return,
                },
            };
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                me.handle_inbound(item).await;
                drop(permit);
            });
        }
    }

    /// Process a batch of envelopes that arrived directly, answer it, and act on what they
    /// changed.
    async fn handle_inbound(&self, item: InboundBatch) {
        let InboundBatch {
            peer,
            envelopes,
            channel,
        } = item;
        let processed = match self.process_batch(envelopes).await {
            Ok(p) => p,
            Err(e) => {
                // Whatever was committed before the failure is acknowledged as a duplicate when
                // the sender tries again.
                tracing::warn!(%peer, error = %e, "cannot process an inbound batch");
                let reason = RejectReason::Internal;
                let _ = self
                    .net
                    .respond(channel, DirectReply::Refused { reason })
                    .await;
                return;
            }
        };
        let mut hostile = None;
        for p in &processed {
            if let DirectResponse::Rejected { reason } = p.response {
                tracing::debug!(%peer, %reason, "rejected an inbound envelope");
                if reason.is_hostile() {
                    hostile.get_or_insert(reason);
                }
            }
        }
        // One strike per request, however many of its envelopes were bad.
        if let Some(reason) = hostile {
            if self.net.strike(peer, reason.to_string()).await.is_err() {
                return;
            }
        }
        let reply = DirectReply::Each(processed.iter().map(|p| p.response).collect());
        if self.net.respond(channel, reply).await.is_err() {
            return;
        }
        // They are online: `after_processed` also retries what we owe them now.
        for p in processed {
            self.after_processed(p);
        }
    }

    /// Process one envelope (from a mailbox): [`Self::process_batch`] of one.
    async fn process_inbound(&self, envelope: Envelope) -> Result<Processed, NodeError> {
        self.process_batch(vec![envelope])
            .await?
            .pop()
            .ok_or_else(|| NodeError::internal("a batch of one gave no result"))
    }

    /// Open and commit `envelopes` one after the other on one blocking thread (a CPU slot
    /// for each), then wait once for the sync that covers all their commits: one result per
    /// envelope, in order, once every accepted one is durable.
    async fn process_batch(&self, envelopes: Vec<Envelope>) -> Result<Vec<Processed>, NodeError> {
        let ctx = OpenContext {
            storage: self.storage.clone(),
            identity: self.identity.clone(),
            peer_locks: Arc::clone(&self.peer_locks),
            prekey_lock: Arc::clone(&self.prekey_lock),
            pair_keys: Arc::clone(&self.pair_keys),
            groups: self.group_sink.get().cloned(),
        };
        let slots = Arc::clone(&self.cpu_slots);
        let runtime = tokio::runtime::Handle::current();
        let (processed, pending) = blocking(move || {
            let now = unix_now();
            let mut processed: Vec<Processed> = Vec::with_capacity(envelopes.len());
            let mut last = None;
            let mut carry = Carry::default();
            for envelope in &envelopes {
                if let Err(e) = envelope.check(now) {
                    processed.push(Processed::rejected(envelope_reject(&e)));
                    continue;
                }
                // A blocking-pool thread may wait on the runtime.
                let cpu = runtime
                    .block_on(Arc::clone(&slots).acquire_owned())
                    .map_err(|_| NodeError::Stopped)?;
                let slot = processed.len();
                let mut p = open_and_commit(&ctx, envelope, now, cpu, &mut carry, slot)?;
                last = last.max(p.not_yet_durable.take());
                processed.push(p);
            }
            // Write what is staged, and apply what the writes found.
            last = last.max(carry.finish(&ctx.storage, &mut processed)?);
            // One sync for the whole batch (or, if one is running, an async wait for it).
            let pending = match last {
                Some(pending) => ctx.storage.sync_unless_busy(pending)?,
                None => None,
            };
            if tracing::enabled!(tracing::Level::DEBUG) {
                for (envelope, p) in envelopes.iter().zip(&processed) {
                    tracing::debug!(
                        envelope = %crate::mailbox::short(&envelope.id()),
                        mailbox = %crate::mailbox::short(&envelope.routing_key),
                        new = ?p.new_message.as_ref().map(|m| hex::encode(m.id)),
                        response = ?p.response,
                        "opened an envelope"
                    );
                }
            }
            Ok((processed, pending))
        })
        .await?;
        if let Some(pending) = pending {
            self.storage.durable(pending).await?;
        }
        Ok(processed)
    }

    /// A slot for CPU-heavy work (sealing, opening); see `cpu_slots`.
    async fn cpu_slot(&self) -> Result<OwnedSemaphorePermit, NodeError> {
        Arc::clone(&self.cpu_slots)
            .acquire_owned()
            .await
            .map_err(|_| NodeError::Stopped)
    }

    // ------------------------------------------------------------------------------------
    // Outbox
    // ------------------------------------------------------------------------------------

    async fn outbox_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut last_prune: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                _ = self.outbox_kick.notified() => {},
                _ = tokio::time::sleep(OUTBOX_TICK) => {},
            }
            if let Err(e) = self.retry_due().await {
                if matches!(e, NodeError::Stopped) {
                    return;
                }
                tracing::warn!(error = %e, "outbox retry failed");
            }
            if last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
                last_prune = Some(Instant::now());
                let storage = self.storage.clone();
                let before = unix_now_ms().saturating_sub(SEEN_RETENTION_MS);
                if let Err(e) = blocking(move || Ok(storage.prune_seen(before)?)).await {
                    tracing::warn!(error = %e, "pruning seen envelope ids failed");
                }
            }
        }
    }

    /// Try every due outbox entry once; entries to one peer go in conversation order and stop
    /// at the first that cannot be delivered.
    async fn retry_due(&self) -> Result<(), NodeError> {
        let storage = self.storage.clone();
        let entries = blocking(move || {
            let mut out = Vec::new();
            for e in storage.outbox()? {
                let seq = storage
                    .message(&e.peer, Direction::Out, &e.message_id)?
                    .map_or(u64::MAX, |(_, m)| m.seq);
                out.push((e, seq));
            }
            // An entry may have been read before its commit's sync: never send one that a
            // crash could still take back (its ratchet step would be reused).
            storage.sync_barrier()?;
            Ok(out)
        })
        .await?;
        if entries.is_empty() {
            lock(&self.wake_peers).clear();
            return Ok(());
        }
        let now_ms = unix_now_ms();
        let woken: HashSet<PublicIdentity> = std::mem::take(&mut *lock(&self.wake_peers));
        let mut by_peer: BTreeMap<PublicIdentity, Vec<(OutboxEntry, u64)>> = BTreeMap::new();
        for (e, seq) in entries {
            if e.next_attempt_ms <= now_ms || woken.contains(&e.peer) {
                by_peer.entry(e.peer).or_default().push((e, seq));
            }
        }
        futures::stream::iter(by_peer.into_values())
            .for_each_concurrent(OUTBOX_PARALLEL_PEERS, |mut list| async move {
                list.sort_by_key(|(_, seq)| *seq);
                for (entry, _) in list {
                    match self.retry_one(&entry).await {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox entry retry failed");
                            break;
                        }
                    }
                }
            })
            .await;
        Ok(())
    }

    /// One retry; `Ok(false)` when the peer was unreachable (stop for this peer).
    async fn retry_one(&self, entry: &OutboxEntry) -> Result<bool, NodeError> {
        let id = entry.message_id;
        let now = unix_now();
        let envelope = match Envelope::from_wire(&entry.envelope) {
            Ok(env) if now < env.expires_at() => env,
            other => {
                let why = if other.is_ok() { "expired" } else { "corrupt" };
                tracing::info!(id = %hex::encode(id), why, "dropping an outbox entry");
                let storage = self.storage.clone();
                if let Some(m) = blocking(move || Ok(storage.abandon(&id)?)).await? {
                    self.emit_status(&m);
                }
                return Ok(true);
            }
        };
        if !lock(&self.in_flight).insert(id) {
            return Ok(true);
        }
        let deadline = Instant::now() + self.send_timeout;
        let result = self
            .deliver_or_store(&entry.peer, &envelope, deadline)
            .await;
        let reachable = !matches!(result, Err(DeliveryFailure::Unreachable(_)));
        let settled = self.settle(&id, entry.attempts, result).await;
        lock(&self.in_flight).remove(&id);
        settled?;
        Ok(reachable)
    }

    // ------------------------------------------------------------------------------------
    // Publishing
    // ------------------------------------------------------------------------------------

    /// Make sure prekey secrets exist (generated and saved on first start).
    pub(crate) async fn ensure_prekeys(&self) -> Result<(), NodeError> {
        let _guard = self.prekey_lock.lock().await;
        let storage = self.storage.clone();
        let identity = self.identity.clone();
        blocking(move || prepare_bundle(&storage, &identity, unix_now()).map(|_| ())).await
    }

    async fn publisher(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut addrs = self.addrs.clone();
        let mut next = tokio::time::Instant::now();
        let mut failures: u32 = 0;
        loop {
            tokio::select! {
                biased;
                _ = stopping(&mut shutdown) => return,
                _ = tokio::time::sleep_until(next) => {},
                _ = self.publish_kick.notified() => {},
                _ = tokio::time::sleep(CONTACT_CHECK) => {
                    // Contacts may be added behind our back (e.g. through storage directly).
                    match self.contacts_changed().await {
                        Ok(true) => {}
                        Ok(false) => continue,
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot read contacts");
                            continue;
                        }
                    }
                },
                changed = addrs.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tokio::time::sleep(ADDRESS_DEBOUNCE).await;
                    addrs.mark_unchanged();
                },
            }
            let result = self.publish_all().await;
            // Waits count from the end of the round, which can itself take as long as a DHT
            // query may (20 s): counted from its start, the first retries (2, 4, 8 s) would
            // follow at once, and a node short of DHT peers would publish without pause.
            let now = tokio::time::Instant::now();
            match result {
                Ok(report) if report.complete() => {
                    failures = 0;
                    next = now + REPUBLISH_INTERVAL.min(until_next_epoch());
                }
                Ok(report) => {
                    failures = failures.saturating_add(1);
                    tracing::debug!(?report, "publication incomplete; retrying");
                    next = now + backoff(FIRST_BACKOFF, failures).min(MAX_PUBLISH_RETRY);
                }
                Err(NodeError::Stopped) => return,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, "publishing records failed");
                    next = now + backoff(FIRST_BACKOFF, failures).min(MAX_PUBLISH_RETRY);
                }
            }
        }
    }

    /// Whether the contact list differs from the one presence was last published for.
    async fn contacts_changed(&self) -> Result<bool, NodeError> {
        let storage = self.storage.clone();
        let current = blocking(move || contact_set(&storage)).await?;
        Ok(lock(&self.published_contacts).as_ref() != Some(&current))
    }

    /// One publication round: the prekey bundle (rotated or replenished if due) and a presence
    /// record for every contact, listing this node's peer ID and dialable addresses.
    pub(crate) async fn publish_all(&self) -> Result<PublishReport, NodeError> {
        let _round = self.publish_lock.lock().await;
        let now = unix_now();
        let bundle_record = {
            let _guard = self.prekey_lock.lock().await;
            let storage = self.storage.clone();
            let identity = self.identity.clone();
            blocking(move || prepare_bundle(&storage, &identity, now)).await?
        };
        let (presence_records, contacts) = {
            let storage = self.storage.clone();
            let identity = self.identity.clone();
            let me = Presence {
                peers: vec![PresencePeer {
                    peer_id: self.peer_id.to_bytes(),
                    addrs: presence_addrs(&self.addrs.borrow()),
                }],
            };
            blocking(move || prepare_presence(&storage, &identity, &me, now)).await?
        };

        *lock(&self.published_contacts) = Some(contacts);
        let mut report = PublishReport::default();
        let (key, value, expires_at) = bundle_record;
        report.bundle_published = self.put(key, value, expires_at, now).await?;
        let results: Vec<Result<bool, NodeError>> = futures::stream::iter(presence_records)
            .map(|(key, value, expires_at)| self.put(key, value, expires_at, now))
            .buffer_unordered(PUBLISH_PARALLEL)
            .collect()
            .await;
        for r in results {
            if r? {
                report.presence_published += 1;
            } else {
                report.presence_failed += 1;
            }
        }
        tracing::debug!(?report, "published records");
        *lock(&self.last_publication) = Some(report.clone());
        Ok(report)
    }

    /// What the last finished publication round did, if one finished.
    pub(crate) fn last_publication(&self) -> Option<PublishReport> {
        lock(&self.last_publication).clone()
    }

    async fn put(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        expires_at: u64,
        now: u64,
    ) -> Result<bool, NodeError> {
        let record = own_record(key, value, expires_at, now);
        let began = Instant::now();
        let result = self.net.put_record(record).await.map_err(stopped)?;
        let ms = began.elapsed().as_millis() as u64;
        match result {
            Ok(()) => {
                tracing::debug!(ms, "DHT put done");
                Ok(true)
            }
            Err(e) => {
                tracing::debug!(ms, error = %e, "DHT put failed");
                Ok(false)
            }
        }
    }
}

/// The addresses a presence record lists: at most [`records::MAX_ADDRS_PER_PEER`], each at most
/// [`records::MAX_ADDR_BYTES`]; routable ones before loopback ones.
fn presence_addrs(addrs: &[Multiaddr]) -> Vec<Vec<u8>> {
    let is_loopback = |a: &Multiaddr| {
        a.iter().any(|p| match p {
            libp2p::multiaddr::Protocol::Ip4(ip) => ip.is_loopback(),
            libp2p::multiaddr::Protocol::Ip6(ip) => ip.is_loopback(),
            _ => false,
        })
    };
    let mut sorted: Vec<&Multiaddr> = addrs.iter().collect();
    sorted.sort_by_key(|a| is_loopback(a));
    sorted
        .into_iter()
        .map(|a| a.to_vec())
        .filter(|b| b.len() <= records::MAX_ADDR_BYTES)
        .take(records::MAX_ADDRS_PER_PEER)
        .collect()
}

/// Time until the next presence epoch starts (at least a second).
fn until_next_epoch() -> Duration {
    let now = unix_now();
    let next = (addressing::epoch(now) + 1).saturating_mul(addressing::EPOCH_SECS);
    Duration::from_secs(next.saturating_sub(now).max(1))
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    id
}

/// The mailboxes `identity` watches: its first-contact mailbox; for everyone it has a
/// session with, the pair mailbox of every epoch that can still hold live mail (since the
/// last collection that reached a replica, `since`, and at most [`MAX_TTL_SECS`] back); for
/// a contact without a session, only the pair mailboxes new mail would go to now. The flag
/// marks the mailboxes new mail goes to now (subscribed to for pushes).
///
/// A peer writes to our pair mailboxes only once we have written to it (before that it uses
/// the first-contact mailbox), and we write only on a session, so a contact we have no session
/// with holds nothing in the pair mailboxes of past epochs. Not looking there saves a DHT
/// lookup and FETCHes per epoch, about 30 per such contact in every round that looks back the
/// whole TTL (the first after start, and any before a replica has answered).
fn watched_mailboxes(
    storage: &Storage,
    identity: &Identity,
    since: Option<u64>,
    now: u64,
) -> Result<Vec<(MailboxKeys, bool)>, NodeError> {
    // One scan of the sessions (it reads every record) serves both questions.
    let with_session: HashSet<PublicIdentity> = storage.session_peers()?.into_iter().collect();
    let peers = partners_with(storage, &with_session)?;
    let oldest = addressing::epoch(now.saturating_sub(u64::from(MAX_TTL_SECS)));
    let since = since.map_or(oldest, |t| {
        addressing::epoch(t.saturating_sub(MAX_CLOCK_SKEW_SECS))
    });
    let first = oldest.max(since);
    let last = addressing::epoch(now.saturating_add(MAX_CLOCK_SKEW_SECS));
    let me = identity.public();
    let current = addressing::epoch(now);
    let mut out = vec![(MailboxKeys::first_contact(identity), true)];
    for peer in peers {
        let pair = pair_secret(identity, &peer);
        let first = if with_session.contains(&peer) {
            first
        } else {
            first.max(current)
        };
        // Newest first: the mailboxes most likely to hold mail.
        for e in (first..=last).rev() {
            out.push((MailboxKeys::derive(&pair, &me, e), e >= current));
        }
    }
    Ok(out)
}

/// Seal `content` for `to` with the session in `record` (advancing it).
fn seal_content(
    identity: &Identity,
    routing: &PairKeys,
    record: &mut SessionRecord,
    bundle: Option<&VerifiedBundle>,
    to: &PublicIdentity,
    content: &Content,
) -> Result<Envelope, NodeError> {
    let plaintext = content.encode().map_err(|e| NodeError::Crypto {
        reason: format!("cannot encode the message: {e}"),
    })?;
    let now = unix_now();
    // Pair mailboxes and pair envelopes only once the peer has written to us (so it knows us
    // and watches them); before that, the first-contact mailbox it always watches, and sealed
    // sender.
    if record.has_session() && !record.awaiting_reply() {
        let out = routing.outgoing(identity, to, addressing::epoch(now));
        session::seal_pair_message(
            record,
            to,
            &out.key,
            out.routing_key,
            now,
            DEFAULT_TTL_SECS,
            &plaintext,
            &mut OsRng,
        )
        .map_err(crypto_err)
    } else {
        let starts_session = !record.has_session();
        let sealed = session::seal_message(
            identity,
            record,
            bundle,
            to,
            addressing::first_contact_mailbox(to),
            now,
            DEFAULT_TTL_SECS,
            &plaintext,
            &mut OsRng,
        )
        .map_err(crypto_err)?;
        if starts_session {
            // A new partner: its pair envelopes must be recognised once it writes back.
            routing.partners_changed();
        }
        Ok(sealed)
    }
}

/// Everyone we may share a pair mailbox with: contacts and peers we have a session with.
fn partners(storage: &Storage) -> Result<Vec<PublicIdentity>, NodeError> {
    partners_with(storage, &storage.session_peers()?.into_iter().collect())
}

/// [`partners`], given the peers we have a session with (read by the caller).
fn partners_with(
    storage: &Storage,
    with_session: &HashSet<PublicIdentity>,
) -> Result<Vec<PublicIdentity>, NodeError> {
    let mut peers: Vec<PublicIdentity> = storage
        .contacts()?
        .into_iter()
        .map(|c| c.identity)
        .collect();
    peers.extend(with_session.iter().copied());
    peers.sort();
    peers.dedup();
    Ok(peers)
}

/// Seal `texts` in order (the bundle, if given and needed, starts the session with the first)
/// and write the session, the messages and their outbox entries in one batch (durable once the
/// returned write is waited for). Call under the peer's lock.
fn seal_and_commit(
    storage: &Storage,
    identity: &Identity,
    routing: &PairKeys,
    to: &PublicIdentity,
    texts: Vec<Text>,
    bundle: Option<&VerifiedBundle>,
) -> Result<Sealed, NodeError> {
    let mut record = load_session(storage, to)?;
    let mut bundle = if record.has_session() { None } else { bundle };
    if !record.has_session() && bundle.is_none() {
        return Ok(Sealed::NeedsBundle(texts));
    }
    // Content sequence numbers start at 1.
    let mut seq = storage.next_seq(to)?.max(1);
    let mut sealed = Vec::with_capacity(texts.len());
    let mut wires = Vec::with_capacity(texts.len());
    for (id, text) in texts {
        let sent_at_ms = unix_now_ms();
        let content = Content::Text {
            id: MessageId(id),
            seq,
            sent_at_ms,
            body: text,
        };
        let envelope = seal_content(identity, routing, &mut record, bundle.take(), to, &content)?;
        wires.push(envelope.to_wire().map_err(wire_err("envelope"))?);
        let Content::Text { body, .. } = content else {
            return Err(NodeError::internal("a text content changed its kind"));
        };
        let message = StoredMessage {
            id,
            peer: *to,
            direction: Direction::Out,
            seq,
            sent_at_ms,
            received_at_ms: sent_at_ms,
            body,
            status: Status::Queued,
            group: None,
        };
        sealed.push((message, envelope));
        seq = seq.saturating_add(1);
    }
    let session_bytes = record.to_wire().map_err(wire_err("session record"))?;
    let messages: Vec<(&StoredMessage, &[u8])> = sealed
        .iter()
        .zip(&wires)
        .map(|((m, _), w)| (m, w.as_slice()))
        .collect();
    let (_, pending) = storage.commit_outgoing_many(to, &session_bytes, &messages, seq)?;
    Ok(Sealed::Committed(sealed, pending))
}

/// Consecutive envelopes of one request from the same sender: that sender's lock held, its
/// session state carried in memory from one envelope to the next, their commits staged for one
/// write ([`Storage::commit_incoming_many`]). Flushed when an envelope of another sender comes,
/// before an envelope that needs the prekey lock, and at the end of the request; at most one
/// peer's lock is held at a time (taken after the CPU slot was given back, as always).
#[derive(Default)]
struct Carry {
    sender: Option<PublicIdentity>,
    guard: Option<OwnedMutexGuard<()>>,
    /// The sender's session state after the staged envelopes.
    record: Option<SessionRecord>,
    staged: Vec<Staged>,
    /// What the flushes wrote, each staged envelope with its outcome (see [`Carry::finish`]).
    settled: Vec<(Staged, IncomingOutcome)>,
    /// The last write of the flushes.
    pending: Option<PendingWrite>,
}

/// An opened envelope whose commit is staged in a [`Carry`].
#[derive(Debug)]
struct Staged {
    /// Its place in the request.
    slot: usize,
    envelope_id: [u8; 32],
    message: Option<StoredMessage>,
}

impl Carry {
    fn has_staged(&self, envelope_id: &[u8; 32]) -> bool {
        self.staged.iter().any(|s| s.envelope_id == *envelope_id)
    }

    /// Write the staged envelopes and the sender's session state in one batch (not yet
    /// durable: see `pending`), and release the sender's lock.
    fn flush(&mut self, storage: &Storage) -> Result<(), NodeError> {
        let staged = std::mem::take(&mut self.staged);
        let record = self.record.take();
        let sender = self.sender.take();
        if let (Some(sender), Some(record), false) = (sender, record, staged.is_empty()) {
            let session_bytes = record.to_wire().map_err(wire_err("session record"))?;
            let entries: Vec<(&[u8; 32], Option<&StoredMessage>)> = staged
                .iter()
                .map(|s| (&s.envelope_id, s.message.as_ref()))
                .collect();
            let (outcomes, pending) =
                storage.commit_incoming_many(&sender, &session_bytes, None, None, &entries)?;
            self.pending = self.pending.max(Some(pending));
            self.settled.extend(staged.into_iter().zip(outcomes));
        }
        self.guard = None;
        Ok(())
    }

    /// Flush, and complete the results of the staged envelopes (`processed`, by their slots)
    /// with what the writes found: the new message, or that it was a duplicate. Returns the
    /// last write.
    fn finish(
        mut self,
        storage: &Storage,
        processed: &mut [Processed],
    ) -> Result<Option<PendingWrite>, NodeError> {
        self.flush(storage)?;
        for (staged, outcome) in self.settled {
            let Some(p) = processed.get_mut(staged.slot) else {
                continue;
            };
            match outcome {
                IncomingOutcome::New { .. } => p.new_message = staged.message,
                IncomingOutcome::Duplicate | IncomingOutcome::DuplicateMessage => {
                    if let DirectResponse::Accepted { duplicate, .. } = &mut p.response {
                        *duplicate = true;
                    }
                }
            }
        }
        Ok(self.pending)
    }
}

/// Open an inbound envelope of a request on copies of the stored state and stage its commit in
/// `carry` (or, for a message that starts a session, commit it at once with the prekeys and
/// the replay cache); the caller flushes `carry` and waits for the sync. A duplicate is
/// acknowledged without changes (once its first copy is on disk).
///
/// First try without the prekey lock: the envelope is opened, then the sender's lock is taken
/// (or found held by `carry`) and its session loaded (or carried). Only a message that starts
/// a new session changes the prekeys and the replay cache; such a message, or one refused for a
/// reason that depends on them, is processed again from the start under the prekey lock, so
/// that their updates never race.
fn open_and_commit(
    ctx: &OpenContext,
    envelope: &Envelope,
    now: u64,
    cpu_slot: OwnedSemaphorePermit,
    carry: &mut Carry,
    slot: usize,
) -> Result<Processed, NodeError> {
    let envelope_id = envelope.id();
    if carry.has_staged(&envelope_id) {
        // A copy earlier in this request: durable with the request's write.
        return Ok(Processed::duplicate(envelope_id));
    }
    if ctx.storage.seen(&envelope_id)? {
        drop(cpu_slot);
        ctx.storage.sync_barrier()?;
        return Ok(Processed::duplicate(envelope_id));
    }
    let mut cpu_slot = Some(cpu_slot);
    if let Some(processed) = try_open_and_commit(
        ctx,
        envelope,
        envelope_id,
        now,
        Some((&mut *carry, slot)),
        &mut cpu_slot,
    )? {
        return Ok(processed);
    }
    // Rare (first messages): the second opening runs without a CPU slot, and without the
    // carried lock (the prekey lock comes first).
    drop(cpu_slot);
    carry.flush(&ctx.storage)?;
    let _prekeys = ctx.prekey_lock.blocking_lock();
    try_open_and_commit(ctx, envelope, envelope_id, now, None, &mut None)?.ok_or_else(|| {
        NodeError::Crypto {
            reason: "invariant: processing under the prekey lock always ends".into(),
        }
    })
}

/// Whether opening failed for a reason that may be gone with the newest prekeys and replay
/// cache (they are read without a lock on the first try).
fn depends_on_prekeys(e: &SessionError) -> bool {
    matches!(
        e,
        SessionError::Replay { .. }
            | SessionError::UnknownPrekey { .. }
            | SessionError::StalePrekey { .. }
    )
}

/// One try of [`open_and_commit`]. With a `carry` (the prekey lock is not held), the commit is
/// staged there, and `None` comes back when the envelope needs the prekey lock; without one
/// (`exclusive`: the prekey lock is held), it is committed at once.
fn try_open_and_commit(
    ctx: &OpenContext,
    envelope: &Envelope,
    envelope_id: [u8; 32],
    now: u64,
    mut carry: Option<(&mut Carry, usize)>,
    cpu_slot: &mut Option<OwnedSemaphorePermit>,
) -> Result<Option<Processed>, NodeError> {
    let exclusive = carry.is_none();
    let storage = &ctx.storage;
    let accepted = |duplicate| DirectResponse::Accepted {
        envelope_id,
        duplicate,
    };
    let prekey_bytes = storage.prekeys()?.ok_or_else(|| NodeError::Crypto {
        reason: "no prekey secrets saved".into(),
    })?;
    let mut prekeys =
        PrekeySecrets::from_wire(&prekey_bytes).map_err(wire_err("prekey secrets"))?;
    // The replay cache (up to 8,192 handshakes, ~590 KB) matters only to a message that
    // starts a session, and those are processed again under the prekey lock (`exclusive`).
    // Before that, an empty cache: nothing is a replay of it, so such a message either starts
    // a session or fails on its prekeys, and either way comes back exclusively.
    let replay_bytes = if exclusive {
        storage.replay_cache()?
    } else {
        None
    };
    let mut replay = match &replay_bytes {
        Some(b) => ReplayCache::from_wire(b).map_err(wire_err("replay cache"))?,
        None => ReplayCache::new(),
    };
    let mut load_error = None;
    let mut peer_guard: Option<OwnedMutexGuard<()>> = None;
    let mut seen_meanwhile = false;
    let mut load_record = |sender: &PublicIdentity| {
        // The envelope is open and its sender known: from here to the write, hold the
        // sender's lock. The expensive part is done: give the CPU slot back first (it is
        // never held while waiting for a peer's lock).
        drop(cpu_slot.take());
        let mut carried = None;
        match carry.as_mut() {
            Some((c, _)) if c.sender == Some(*sender) && c.record.is_some() => {
                // The lock is held since an earlier envelope of this request.
                carried = c.record.clone();
            }
            Some((c, _)) => {
                // Another sender: write what is staged and let its lock go first.
                if let Err(e) = c.flush(storage) {
                    load_error = Some(e);
                    return None;
                }
                c.guard = Some(ctx.peer_locks.get(sender).blocking_lock_owned());
                c.sender = Some(*sender);
            }
            None => peer_guard = Some(ctx.peer_locks.get(sender).blocking_lock_owned()),
        }
        // Another copy of this envelope may have been committed while we opened it.
        match storage.seen(&envelope_id) {
            Ok(false) => {}
            Ok(true) => {
                seen_meanwhile = true;
                return None;
            }
            Err(e) => {
                load_error = Some(e.into());
                return None;
            }
        }
        if carried.is_some() {
            return carried;
        }
        match load_session(storage, sender) {
            Ok(r) => {
                if let Some((c, _)) = carry.as_mut() {
                    c.record = Some(r.clone());
                }
                Some(r)
            }
            Err(e) => {
                load_error = Some(e);
                None
            }
        }
    };
    // Routed by a partner's pair mailbox: a pair envelope (no Diffie-Hellman).
    let pair = ctx
        .pair_keys
        .incoming(&ctx.identity, envelope, || partners(storage))?;
    let as_pair = pair.map(|(sender, key)| {
        session::open_pair_message(
            &ctx.identity,
            &mut prekeys,
            &mut replay,
            &mut load_record,
            &sender,
            &key,
            envelope,
            now,
        )
    });
    let opened = match as_pair {
        Some(Err(SessionError::Envelope(e))) if *e == EnvelopeError::Undecryptable => None,
        other => other,
    };
    // Not routed by a pair mailbox, or not sealed as a pair envelope (mail sealed before pair
    // envelopes existed): sealed sender.
    let opened = opened.unwrap_or_else(|| {
        session::open_message(
            &ctx.identity,
            &mut prekeys,
            &mut replay,
            &mut load_record,
            envelope,
            now,
        )
    });
    if let Some(e) = load_error {
        return Err(e);
    }
    if seen_meanwhile {
        drop(peer_guard);
        storage.sync_barrier()?;
        return Ok(Some(Processed::duplicate(envelope_id)));
    }
    let received = match opened {
        Ok(r) if r.new_session && !exclusive => return Ok(None),
        Ok(r) => r,
        Err(e) if !exclusive && depends_on_prekeys(&e) => return Ok(None),
        Err(e) => {
            tracing::debug!(error = %e, "inbound envelope does not open");
            return Ok(Some(Processed::rejected(reject_reason_of(&e))));
        }
    };
    let sender = received.sender;
    let new_session = received.new_session;
    // `open_message` changes the prekeys and the replay cache only when it starts a session,
    // which happens only under the prekey lock; there, compare the bytes to be sure.
    let (prekeys_changed, new_prekeys, replay_changed, new_replay) = if exclusive {
        let new_prekeys = prekeys.to_wire().map_err(wire_err("prekey secrets"))?;
        let new_replay = replay.to_wire().map_err(wire_err("replay cache"))?;
        (
            new_prekeys != prekey_bytes,
            new_prekeys,
            replay_bytes.as_deref() != Some(new_replay.as_slice()),
            new_replay,
        )
    } else {
        (false, Vec::new(), false, Vec::new())
    };
    let session_after = received.record;

    let (message, receipt, malformed) = match Content::decode(&received.plaintext) {
        Ok(Content::Text {
            id,
            seq,
            sent_at_ms,
            body,
        }) => (
            Some(StoredMessage {
                id: id.0,
                peer: sender,
                direction: Direction::In,
                seq,
                sent_at_ms,
                received_at_ms: unix_now_ms(),
                body,
                status: Status::Delivered,
                group: None,
            }),
            None,
            false,
        ),
        Ok(Content::Receipt { kind, ids }) => (None, Some((kind, ids)), false),
        // Group control (invites, sender keys, ops, rekeys): into the group inbox, durably,
        // before this envelope is committed and acknowledged.
        Ok(Content::Group(control)) => {
            let accepted = match &ctx.groups {
                Some(sink) => sink.accept(&sender, control)?,
                // Not yet wired (cannot happen once the node runs): refuse for now, so the
                // sender retries.
                None => {
                    return Err(NodeError::internal(
                        "no group service to take group controls",
                    ))
                }
            };
            (None, None, !accepted)
        }
        Err(e) => {
            tracing::debug!(sender = %sender.user_id(), error = %e, "authenticated envelope with malformed content");
            (None, None, true)
        }
    };
    let mut processed = Processed {
        response: accepted(false),
        sender: Some(sender),
        new_message: None,
        status_changes: Vec::new(),
        prekeys_changed,
        not_yet_durable: None,
    };
    match carry.as_mut() {
        // Staged: written with the sender's other envelopes of this request; the outcome
        // (new, or a message id seen before) is applied by `Messenger::process_batch`.
        Some((c, slot)) => {
            c.record = Some(session_after);
            c.staged.push(Staged {
                slot: *slot,
                envelope_id,
                message,
            });
        }
        None => {
            let session_bytes = session_after
                .to_wire()
                .map_err(wire_err("session record"))?;
            let (outcome, pending) = storage.commit_incoming_pending(
                &envelope_id,
                &sender,
                &session_bytes,
                prekeys_changed.then_some(new_prekeys.as_slice()),
                replay_changed.then_some(new_replay.as_slice()),
                message.as_ref(),
            )?;
            if new_session {
                // A new partner (or a new session with one): recognise its pair envelopes.
                ctx.pair_keys.partners_changed();
            }
            // The next envelope from this sender is decrypted while this one waits for the
            // disk: the sync is left to the caller (`Messenger::process_batch`, once per
            // request), which answers only once the commit is durable.
            drop(peer_guard);
            processed.not_yet_durable = Some(pending);
            match outcome {
                IncomingOutcome::New { .. } => processed.new_message = message,
                IncomingOutcome::Duplicate | IncomingOutcome::DuplicateMessage => {
                    processed.response = accepted(true);
                }
            }
        }
    }
    if let Some((kind, ids)) = receipt {
        let status = match kind {
            ReceiptKind::Delivered => Status::Delivered,
            ReceiptKind::Read => Status::Read,
        };
        for id in ids {
            if let Some(m) = storage.set_status_from(&sender, &id.0, status)? {
                processed.status_changes.push(m);
            }
        }
    }
    if malformed {
        processed.response = DirectResponse::Rejected {
            reason: RejectReason::Malformed,
        };
    }
    Ok(Some(processed))
}

/// Load (or create) the prekey secrets, rotate or replenish them if due, save, and return the
/// bundle record to publish: (key, value, expires_at).
fn prepare_bundle(
    storage: &Storage,
    identity: &Identity,
    now: u64,
) -> Result<(Vec<u8>, Vec<u8>, u64), NodeError> {
    let (secrets, changed) = match storage.prekeys()? {
        None => (PrekeySecrets::generate(identity, now, &mut OsRng).0, true),
        Some(bytes) => {
            let mut s = PrekeySecrets::from_wire(&bytes).map_err(wire_err("prekey secrets"))?;
            if s.needs_rotation(now) {
                s.rotate(identity, now, &mut OsRng);
                (s, true)
            } else if s.one_time_count() < ONE_TIME_LOW_WATER {
                let changed = s.replenish(identity, &mut OsRng).is_some();
                (s, changed)
            } else {
                (s, false)
            }
        }
    };
    if changed {
        let bytes = secrets.to_wire().map_err(wire_err("prekey secrets"))?;
        storage.save_prekeys(&bytes)?;
    }
    // The DHT bundle carries the signed prekey only. Anyone can read a DHT record, so two
    // strangers writing first messages at once could pick the same one-time prekey, and the
    // second message could never be opened. First messages without a one-time prekey are
    // protected against replay by the replay cache and by signed-prekey rotation
    // (docs/protocol.md, "Handshake"; docs/threat-model.md).
    let full = secrets.bundle(identity);
    let bundle = PrekeyBundle::sign(
        identity,
        full.version,
        full.signed_prekey,
        Vec::new(),
        full.created_at,
        full.expires_at,
    );
    let value = bundle.to_wire().map_err(wire_err("prekey bundle"))?;
    let key = records::bundle_record_key(&identity.public());
    storage.put_own_record(&key, &value)?;
    Ok((key, value, bundle.expires_at))
}

/// The identities of all contacts, sorted.
fn contact_set(storage: &Storage) -> Result<Vec<PublicIdentity>, NodeError> {
    let mut set: Vec<PublicIdentity> = storage
        .contacts()?
        .into_iter()
        .map(|c| c.identity)
        .collect();
    set.sort();
    Ok(set)
}

/// Records to publish: (key, value, expires_at).
type RecordList = Vec<(Vec<u8>, Vec<u8>, u64)>;

/// One presence record per contact for the current epoch, and the contacts they are for.
fn prepare_presence(
    storage: &Storage,
    identity: &Identity,
    presence: &Presence,
    now: u64,
) -> Result<(RecordList, Vec<PublicIdentity>), NodeError> {
    let contacts = storage.contacts()?;
    let mut set: Vec<PublicIdentity> = contacts.iter().map(|c| c.identity).collect();
    set.sort();
    if contacts.is_empty() {
        return Ok((Vec::new(), set));
    }
    let seq = storage.bump_record_seq("presence")?;
    let epoch = addressing::epoch(now);
    let expires_at = (epoch + 1)
        .saturating_mul(addressing::EPOCH_SECS)
        .saturating_add(PRESENCE_GRACE_SECS);
    let me = identity.public();
    let mut out = Vec::with_capacity(contacts.len());
    for c in contacts {
        let pair = pair_secret(identity, &c.identity);
        let keys = PresenceKeys::derive(&pair, &me, epoch);
        let record = keys
            .seal(presence, seq, expires_at, &mut OsRng)
            .map_err(crypto_err)?;
        let value = record.to_wire().map_err(wire_err("presence record"))?;
        out.push((keys.dht_key(), value, expires_at));
    }
    Ok((out, set))
}

#[cfg(test)]
mod tests {
    //! Real nodes on loopback: many messages in flight at once, both ways, and first messages
    //! from several strangers at once (the prekey lock's path).

    use std::time::Duration;

    use libp2p::Multiaddr;
    use meshchat_protocol::{replay::ReplayCache, Identity, PublicIdentity, Wire};
    use rand::rngs::OsRng;
    use tempfile::TempDir;

    use super::{lock, PeerAddrs, PRESENCE_CACHE_TTL, ROUTE_TTL};
    use crate::{
        storage::{Direction, MessageFilter, Storage},
        Node, NodeConfig, NodeHandle, SendOutcome,
    };
    use std::time::Instant;

    struct TestNode {
        _home: TempDir,
        handle: NodeHandle,
        identity: Identity,
        addr: Multiaddr,
    }

    async fn start(bootstrap: Vec<Multiaddr>) -> TestNode {
        start_with(bootstrap, |_| {}).await
    }

    async fn start_with(
        bootstrap: Vec<Multiaddr>,
        adjust: impl FnOnce(&mut NodeConfig),
    ) -> TestNode {
        let home = tempfile::tempdir().expect("tempdir");
        let identity = Identity::generate(&mut OsRng);
        Storage::open(home.path())
            .expect("open storage")
            .save_identity(&identity)
            .expect("save identity");
        let mut config = NodeConfig::new(home.path());
        config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
        config.bootstrap = bootstrap;
        config.dht_server = true;
        config.send_timeout = Duration::from_secs(20);
        adjust(&mut config);
        let handle = Node::start(config).await.expect("node starts");
        let addr = handle
            .status()
            .await
            .expect("status")
            .listen_addrs
            .iter()
            .find(|a| a.contains("/tcp/"))
            .expect("a TCP address")
            .parse()
            .expect("multiaddr");
        TestNode {
            _home: home,
            handle,
            identity,
            addr,
        }
    }

    /// Make `a` and `b` contacts of each other.
    async fn befriend(a: &TestNode, b: &TestNode, name_of_b: &str, name_of_a: &str) {
        a.handle
            .add_contact(name_of_b.into(), b.identity.public())
            .await
            .expect("contact");
        b.handle
            .add_contact(name_of_a.into(), a.identity.public())
            .await
            .expect("contact");
    }

    async fn publish(n: &TestNode, contacts: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = n.handle.publish_records().await.expect("publish");
            if r.bundle_published && r.presence_published == contacts {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "records not published: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The incoming messages `storage` holds from `peer`.
    fn incoming(storage: &Storage, peer: &PublicIdentity) -> Vec<crate::storage::StoredMessage> {
        storage
            .messages(&MessageFilter {
                peer: Some(*peer),
                direction: Some(Direction::In),
                ..MessageFilter::default()
            })
            .expect("messages")
            .into_iter()
            .map(|(_, m)| m)
            .collect()
    }

    async fn send_many(from: &TestNode, to: PublicIdentity, n: usize, tag: &str) {
        let sends = (0..n).map(|i| {
            let handle = from.handle.clone();
            let text = format!("{tag} {i}");
            tokio::spawn(async move { handle.send_text(to, text).await })
        });
        for (i, task) in futures::future::join_all(sends)
            .await
            .into_iter()
            .enumerate()
        {
            let report = task.expect("task").expect("send");
            assert_eq!(report.outcome, SendOutcome::Delivered, "{tag} {i}");
        }
    }

    /// Make `a`'s presence entry for `to` look `age` old, naming `peers` (or what it holds).
    fn age_route(a: &TestNode, to: &PublicIdentity, age: Duration, peers: Option<PeerAddrs>) {
        let mut cache = lock(&a.handle.inner.messenger.presence_cache);
        let entry = cache.get_mut(to).expect("a presence entry");
        entry.0 = Instant::now().checked_sub(age).expect("an earlier instant");
        if let Some(peers) = peers {
            entry.1 = peers;
        }
    }

    fn presence_lookups(n: &TestNode) -> u64 {
        n.handle
            .inner
            .messenger
            .presence_lookups
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_known_route_is_tried_before_the_dht_and_a_dead_one_falls_back_to_it() {
        let a = start(Vec::new()).await;
        let b = start(vec![a.addr.clone()]).await;
        befriend(&a, &b, "b", "a").await;
        publish(&a, 1).await;
        publish(&b, 1).await;
        let to = b.identity.public();
        send_many(&a, to, 1, "hello").await;
        let looked_up = presence_lookups(&a);
        assert!(looked_up >= 1, "the first message looks b up");

        // Past the presence cache's TTL, within the route's: b's node is asked directly.
        age_route(&a, &to, PRESENCE_CACHE_TTL + Duration::from_secs(1), None);
        send_many(&a, to, 1, "again").await;
        assert_eq!(
            presence_lookups(&a),
            looked_up,
            "no lookup for a known route"
        );
        // The delivery confirmed the route: fresh again, so no lookup either.
        send_many(&a, to, 1, "and again").await;
        assert_eq!(presence_lookups(&a), looked_up);

        // A route to a node that is gone (a peer nobody runs, at a port nobody listens on):
        // the message still goes directly, after a lookup.
        let gone: PeerAddrs = vec![(
            libp2p::PeerId::random(),
            vec!["/ip4/127.0.0.1/tcp/1".parse().expect("multiaddr")],
        )];
        age_route(
            &a,
            &to,
            PRESENCE_CACHE_TTL + Duration::from_secs(1),
            Some(gone),
        );
        send_many(&a, to, 1, "after a move").await;
        assert_eq!(
            presence_lookups(&a),
            looked_up + 1,
            "a dead route is looked up"
        );

        // Older than the route's TTL: looked up first.
        age_route(&a, &to, ROUTE_TTL + Duration::from_secs(1), None);
        send_many(&a, to, 1, "much later").await;
        assert_eq!(presence_lookups(&a), looked_up + 2);
        let got = incoming(b.handle.storage(), &a.identity.public());
        assert_eq!(got.len(), 5, "every message arrived once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiet_mailbox_is_collected_less_often_and_again_every_round_once_it_holds_mail() {
        const EVERY: Duration = Duration::from_secs(1);
        let a = start(Vec::new()).await;
        let b = start_with(vec![a.addr.clone()], |c| c.mailbox.collect_interval = EVERY).await;
        let messenger = &b.handle.inner.messenger;
        let own = meshchat_protocol::addressing::first_contact_mailbox(&b.identity.public());
        let steps = || lock(&messenger.idle_mailboxes).get(&own).map(|(s, _)| *s);
        // The clock's rounds find b's own mailbox empty again and again: it backs off.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while steps() != Some(super::MAX_IDLE_STEPS) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no back-off: {:?}",
                steps()
            );
            tokio::time::sleep(EVERY).await;
        }
        // Right after a round, a periodic one leaves it out; one asked for does not.
        let full = b.handle.collect_mail().await.expect("collect");
        assert_eq!((full.mailboxes, full.idle_skipped), (1, 0));
        assert!(full.replicas_answered > 0);
        let periodic = messenger.collect_due(true).await.expect("collect");
        assert_eq!((periodic.idle_skipped, periodic.replicas_answered), (1, 0));

        // Mail in it: a first message from a stranger, who finds no presence record of b and
        // stores it on a (the only replica), which pushes it to b. The back-off starts over.
        let c = start_with(vec![a.addr.clone()], |c| {
            c.send_timeout = Duration::from_secs(2);
        })
        .await;
        publish(&b, 0).await;
        c.handle
            .add_contact("b".into(), b.identity.public())
            .await
            .expect("contact");
        let report = c
            .handle
            .send_text(b.identity.public(), "hello, stranger".into())
            .await
            .expect("send");
        assert!(
            matches!(report.outcome, SendOutcome::Stored { .. }),
            "{:?}",
            report.outcome
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while incoming(b.handle.storage(), &c.identity.public()).is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the mail never came"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            steps() <= Some(1),
            "the back-off did not start over: {:?}",
            steps()
        );

        // A round whose lookup comes back short (it ends at once, having heard from nobody)
        // asks the replica that answered last time all the same.
        b.handle.stunt_lookups(true).await.expect("hook");
        let short = b.handle.collect_mail().await.expect("collect");
        assert_eq!(short.short_lookups, short.mailboxes, "{short:?}");
        assert!(
            short.replicas_answered > 0,
            "asked the replica it knew: {short:?}"
        );
    }

    #[test]
    fn remembered_mailboxes_are_bounded_and_a_known_one_is_updated_in_place() {
        let mut map = std::collections::HashMap::new();
        for i in 0..super::MAX_REMEMBERED_MAILBOXES {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            super::remember(&mut map, id, i);
        }
        assert_eq!(map.len(), super::MAX_REMEMBERED_MAILBOXES);
        super::remember(&mut map, [0u8; 32], 7);
        assert_eq!(
            map.len(),
            super::MAX_REMEMBERED_MAILBOXES,
            "updated, not cleared"
        );
        assert_eq!(map[&[0u8; 32]], 7);
        super::remember(&mut map, [0xff; 32], 1);
        assert_eq!(
            map.len(),
            1,
            "a new one when full: the others are forgotten"
        );
    }

    #[test]
    fn silence_after_a_short_lookup_counts_only_when_enough_close_peers_answered() {
        let c = |answered, asked, short_lookup| super::Collected {
            answered,
            asked,
            short_lookup,
            ..super::Collected::default()
        };
        assert!(c(1, 10, false).heard_enough(5), "a sure lookup");
        assert!(!c(0, 10, false).heard_enough(5), "nobody answered");
        assert!(!c(4, 10, true).heard_enough(5), "short, 4 of the 5 needed");
        assert!(c(5, 10, true).heard_enough(5), "short, but 5 answered");
        assert!(c(2, 2, true).heard_enough(5), "all of a small network");
        assert!(!c(0, 0, true).heard_enough(5));
    }

    #[test]
    fn the_peers_asked_are_the_closest_of_the_lookup_and_of_last_time() {
        let id = [7u8; 32];
        let target = libp2p::kad::KBucketKey::new(id.to_vec());
        let mut all: Vec<libp2p::PeerId> = (0..30).map(|_| libp2p::PeerId::random()).collect();
        all.sort_by_key(|p| target.distance(&libp2p::kad::KBucketKey::from(*p)));
        // A short lookup found far peers; the closest answered last time.
        let found = [all[20], all[3], all[25]];
        let known = [all[0], all[3], all[1]];
        assert_eq!(
            super::closest_of(&id, &found, &known, 4),
            vec![all[0], all[1], all[3], all[20]],
            "closest first, each once, at most 4"
        );
        assert_eq!(
            super::closest_of(&id, &[], &known, 10),
            vec![all[0], all[1], all[3]]
        );
        assert_eq!(
            super::closest_of(&id, &found, &[], 2),
            vec![all[3], all[20]]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_messages_in_flight_both_ways_each_arrive_once_in_order() {
        const N: usize = 40;
        let a = start(Vec::new()).await;
        let b = start(vec![a.addr.clone()]).await;
        befriend(&a, &b, "b", "a").await;
        publish(&a, 1).await;
        publish(&b, 1).await;
        // The handshake, then both sides write at once: every send and every receive of the
        // pair advances the same two ratchets concurrently.
        send_many(&a, b.identity.public(), 1, "hello").await;
        send_many(&b, a.identity.public(), 1, "hello back").await;
        tokio::join!(
            send_many(&a, b.identity.public(), N, "a to b"),
            send_many(&b, a.identity.public(), N, "b to a"),
        );
        for (to, from) in [(&b, &a), (&a, &b)] {
            let got = incoming(to.handle.storage(), &from.identity.public());
            assert_eq!(got.len(), N + 1, "every message stored once");
            let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=N as u64 + 1).collect::<Vec<_>>(), "in order");
            // Delivered marks are written just after `send_text` answers.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while !from.handle.storage().outbox().expect("outbox").is_empty() {
                assert!(tokio::time::Instant::now() < deadline, "outbox not emptied");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn first_messages_from_several_strangers_at_once_all_open() {
        const SENDERS: usize = 4;
        let r = start(Vec::new()).await;
        let mut senders = Vec::new();
        for _ in 0..SENDERS {
            senders.push(start(vec![r.addr.clone()]).await);
        }
        for (i, s) in senders.iter().enumerate() {
            befriend(s, &r, "r", &format!("s{i}")).await;
        }
        publish(&r, SENDERS).await;
        for s in &senders {
            publish(s, 1).await;
        }
        // Each first message starts a session: each changes the replay cache, so they are
        // committed one after another under the prekey lock, none losing another's entry.
        let to = r.identity.public();
        futures::future::join_all(senders.iter().map(|s| send_many(s, to, 1, "first message")))
            .await;
        let storage = r.handle.storage();
        for s in &senders {
            assert_eq!(incoming(storage, &s.identity.public()).len(), 1);
        }
        let cache = storage
            .replay_cache()
            .expect("read")
            .expect("a replay cache");
        let cache = ReplayCache::from_wire(&cache).expect("decodes");
        assert_eq!(cache.len(), SENDERS, "one entry per handshake");
    }

    /// Pair mailboxes of past epochs are looked at only for peers with a session: a contact
    /// without one cannot have written there (it writes to the first-contact mailbox until we
    /// have written to it), and each epoch costs a DHT lookup and FETCHes per round.
    #[test]
    fn past_pair_mailboxes_are_watched_only_for_peers_with_a_session() {
        use meshchat_protocol::{
            addressing::{pair_secret, EPOCH_SECS},
            mailbox::MailboxKeys,
            session::SessionRecord,
        };

        let home = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(home.path()).expect("open storage");
        let me = Identity::generate(&mut OsRng);
        storage.save_identity(&me).expect("save identity");
        let contact = Identity::generate(&mut OsRng).public();
        let partner = Identity::generate(&mut OsRng).public();
        storage.add_contact("carol", &contact).expect("contact");
        storage
            .save_session(&partner, &SessionRecord::new().to_wire().expect("encode"))
            .expect("session");
        // Mid-epoch, so the clock-skew margin stays inside the current epoch.
        let current = 20_000;
        let now = current * EPOCH_SECS + EPOCH_SECS / 2;
        let ids_of = |peer: &PublicIdentity, epochs: std::ops::RangeInclusive<u64>| {
            let pair = pair_secret(&me, peer);
            epochs
                .map(|e| MailboxKeys::derive(&pair, &me.public(), e).id())
                .collect::<std::collections::BTreeSet<_>>()
        };
        let watched = |since: Option<u64>| {
            super::watched_mailboxes(&storage, &me, since, now)
                .expect("watched")
                .into_iter()
                .map(|(keys, _)| keys.id())
                .collect::<std::collections::BTreeSet<_>>()
        };

        // First round after start: the whole TTL back for the partner, now for the contact.
        let oldest = (now - u64::from(super::MAX_TTL_SECS)) / EPOCH_SECS;
        let mut want = ids_of(&partner, oldest..=current);
        want.extend(ids_of(&contact, current..=current));
        want.insert(MailboxKeys::first_contact(&me).id());
        assert_eq!(watched(None), want);
        assert_eq!(want.len(), 1 + 31 + 1);

        // Later rounds: back to the last collection (minus the skew margin) for the partner.
        let since = now - 3 * EPOCH_SECS;
        let from = (since - super::MAX_CLOCK_SKEW_SECS) / EPOCH_SECS;
        let mut want = ids_of(&partner, from..=current);
        want.extend(ids_of(&contact, current..=current));
        want.insert(MailboxKeys::first_contact(&me).id());
        assert_eq!(watched(Some(since)), want);

        // Once the contact has a session too, its past epochs are watched like the partner's.
        storage
            .save_session(&contact, &SessionRecord::new().to_wire().expect("encode"))
            .expect("session");
        let mut want = ids_of(&partner, oldest..=current);
        want.extend(ids_of(&contact, oldest..=current));
        want.insert(MailboxKeys::first_contact(&me).id());
        assert_eq!(watched(None), want);
    }
}
