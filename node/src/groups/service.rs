//! The group service: everything group channels do beside the event loop. See
//! `docs/architecture.md`, "Groups".
//!
//! ```text
//! NodeHandle::group_* ─► lock ─► spawn_blocking: state, chains, commit ─► dispatch (publish,
//!                                                                         store, sender keys)
//! gossip_worker  ◄─ GossipInbound (event loop) ─► process ─► report Accept / Reject / Ignore
//! inbox_worker   ◄─ ControlSink (1:1 receive path) ─► invites, sender keys, ops, rekeys
//! collector      ─► group mailboxes ─► process (sorted by chain position)
//! maintenance    ─► held envelopes, sender-key requests, mailbox retries, presence records,
//!                   dialling members
//! ```
//!
//! This file holds the service, the user's operations and sending; [`receive`] the validation
//! and opening of what arrives and the control inbox; [`upkeep`] catch-up, retries, presence
//! and connections; [`keys`] asking for sender keys that do not arrive, and answering.
//!
//! One async lock (`lock`) serialises every read-modify-write of group state, chains and
//! seen marks; the storage work under it runs on `spawn_blocking`. Nothing waits on the network
//! while holding it. Envelopes that cannot be opened yet (the author's sender key has not
//! arrived, the author is in an epoch we have not reached, or an earlier message of the same
//! chain is missing for a moment) are *held* in memory (bounded) and retried when something
//! changes; the group mailbox holds them anyway.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex as StdMutex},
    time::{Duration, Instant},
};

use futures::StreamExt;

use libp2p::{
    gossipsub::{MessageAcceptance, TopicHash},
    multiaddr::Protocol,
    Multiaddr, PeerId,
};
use meshchat_protocol::{
    addressing::{self, PairSecret},
    group::{
        check_group_envelope, decode_group_envelope, group_key_id, open_group, seal_group,
        GroupBody, GroupControl, GroupError, GroupId, GroupInvite, GroupState, MembershipChange,
        MembershipOp, ReceiverChain, Role, SenderChain, SenderKeyDistribution, VerifiedInvite,
    },
    group_mailbox,
    records::{Presence, PresenceKeys, PresencePeer},
    Envelope, Identity, MailboxResponse, MessageId, PublicIdentity, Wire, MAX_TEXT_BYTES,
};
use rand::{rngs::OsRng, seq::SliceRandom, RngCore};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, watch, Mutex, Notify};

mod keys;
mod receive;
mod upkeep;

use super::{
    store::{
        self, code_bytes, decode_invite, Batch, ControlSink, GroupRecord, GroupStore, InboxItem,
        Membership, OwnChain, PendingInvite, PendingStore, SeenEnvelope, Via,
    },
    Config, GroupOpError, GroupSendOutcome, GroupSendReport, GroupView, InviteView, MemberView,
};
use crate::{
    dht::{own_record, unix_now, unix_now_ms},
    error::NodeError,
    event_loop::{GossipInbound, NetClient, PublishOutcome},
    mailbox::{self, ReplicaStore},
    messaging::{Messenger, PeerAddrs},
    node::NodeEvent,
    storage::{Direction, Status, Storage, StoredMessage},
};

/// Envelopes held at once (all groups).
const MAX_HELD: usize = 4_096;
/// Envelopes held at once per group.
const MAX_HELD_PER_GROUP: usize = 1_024;
/// How long an envelope waits for its sender key or epoch.
const HOLD_FOR_KEY: Duration = Duration::from_secs(600);
/// How long a message waits for an earlier one of its chain before it is stored anyway.
const HOLD_FOR_GAP: Duration = Duration::from_millis(1_500);
/// A gap wider than this is not waited for.
const MAX_GAP_WAIT: u32 = 32;
/// Control messages that wait for an op, a join or an epoch are kept this long.
const INBOX_KEEP_MS: u64 = 7 * 86_400_000;
/// Maintenance tick (held gaps).
const TICK: Duration = Duration::from_millis(500);
/// Slower maintenance (mailbox retries, presence, dialling).
const SLOW_TICK: Duration = Duration::from_secs(2);
/// Inbox retry tick (controls waiting for something).
const INBOX_TICK: Duration = Duration::from_secs(5);
/// First retry of a group-mailbox store; doubled up to [`MAX_STORE_BACKOFF`].
const FIRST_STORE_BACKOFF: Duration = Duration::from_secs(2);
const MAX_STORE_BACKOFF: Duration = Duration::from_secs(300);
/// Own group envelopes are retried for the mailbox until they are this old.
const PENDING_STORE_MAX_AGE_SECS: u64 = 86_400;
/// First pause before a failed sender-key hand-out is tried again; doubled up to the next.
const FIRST_HANDOUT_BACKOFF: Duration = Duration::from_secs(1);
const MAX_HANDOUT_BACKOFF: Duration = Duration::from_secs(300);
/// A sender-key hand-out is retried for this long at most.
const MAX_HANDOUT_RETRY: Duration = Duration::from_secs(86_400);
/// A sender key missing this long (plus a random share of [`KEY_REQUEST_SPREAD`]) may be asked
/// for with a `GroupBody::KeyRequest`: the hand-out usually arrives beside the message, or
/// within seconds. A member that has no current chain of its own waits
/// [`KEY_REQUEST_AFTER_SILENT`]: its request would first hand its chain to every member.
const KEY_REQUEST_AFTER: Duration = Duration::from_secs(10);
const KEY_REQUEST_AFTER_SILENT: Duration = Duration::from_secs(60);
const KEY_REQUEST_SPREAD: Duration = Duration::from_secs(5);
/// How many members, whatever the group's size, are expected to ask for one missing key in a
/// round: each member lacking it asks with probability `min(1, this / members)` (the owner's
/// answer wakes every hand-out of the key, so one request serves all).
const KEY_REQUEST_ASKERS: f64 = 4.0;
/// A key still missing (whether we asked, drew not to, or saw another member ask) is
/// considered again after this.
const KEY_REQUEST_AGAIN: Duration = Duration::from_secs(30);
/// Our key requests in one group are at least this far apart.
const KEY_REQUEST_EVERY: Duration = Duration::from_secs(10);
/// One member's key requests in a group are acted on at most this often.
const KEY_ANSWER_EVERY: Duration = Duration::from_secs(5);
/// Group presence records are re-published this often (and on a new day, a new secret, new
/// addresses).
const PRESENCE_REPUBLISH: Duration = Duration::from_secs(15 * 60);
/// A group presence lookup is reused this long.
const PRESENCE_TTL: Duration = Duration::from_secs(60);
/// Members whose presence (and dial backoff) is remembered at once; the maps are cleared when
/// they grow past it.
const MAX_REMEMBERED_MEMBERS: usize = 8_192;
/// Members dialled per group (all of a small group; a random sample of a large one).
const MAX_DIAL_MEMBERS: usize = 12;
/// First pause between lookups of a member we cannot reach; doubled up to the next.
const FIRST_DIAL_BACKOFF: Duration = Duration::from_millis(500);
const MAX_DIAL_BACKOFF: Duration = Duration::from_secs(60);
/// How long a dial may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Replicas a collection reads each group mailbox from.
const COLLECT_REPLICAS: usize = 3;
/// Group mailboxes fetched at once while collecting.
const COLLECT_PARALLEL: usize = 4;
/// A collection reads mailboxes back to this long before the last successful one.
const COLLECT_OVERLAP_SECS: u64 = 3_600;
/// Collections asked for by signs of being behind the membership are this far apart at least.
const BEHIND_COLLECT_EVERY: Duration = Duration::from_secs(2);
/// How often a member that holds membership ops for the ops before them reads the group
/// mailboxes again.
const BEHIND_RETRY_EVERY: Duration = Duration::from_secs(10);
/// Quick rounds after start, join and reconnect (1 s, 2 s, 3 s apart).
const COLLECT_FOLLOWUPS: u32 = 3;
/// Seen marks are kept this long (longer than a group envelope lives).
const SEEN_RETENTION_MS: u64 = (meshchat_protocol::group::GROUP_TTL_SECS as u64 + 86_400) * 1000;
/// The domain of the group presence secret.
const GROUP_PRESENCE_DOMAIN: &[u8] = b"meshchat/group-presence/v1";

/// A sender key we lack: when to consider asking for it next, and the odds of asking then.
type KeyWant = (Instant, f64);

/// When our presence record for a group was last published: day, group secret, time, the
/// addresses it lists.
type Published = (u64, [u8; 32], Instant, Vec<Multiaddr>);

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f).await?
}

async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

fn wire_err(what: &'static str) -> impl FnOnce(meshchat_protocol::WireError) -> NodeError {
    move |source| NodeError::Wire { what, source }
}

fn refused(e: GroupError) -> NodeError {
    NodeError::Group(GroupOpError::Refused(e))
}

fn role_name(role: Role) -> String {
    match role {
        Role::Admin => "admin".into(),
        Role::Member => "member".into(),
    }
}

/// The pair secret a group's presence records are derived from: every member knows it, nobody
/// else does. `SHA-256(domain || group id || group secret)`.
fn presence_secret(group: &GroupId, secret: &[u8; 32]) -> PairSecret {
    let mut h = Sha256::new();
    h.update(GROUP_PRESENCE_DOMAIN);
    h.update(group.0);
    h.update(secret);
    PairSecret::from_bytes(h.finalize().into())
}

/// How an envelope reached the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// Over gossipsub, now.
    Gossip,
    /// From the group mailbox.
    Mailbox,
    /// Taken out of the held envelopes: how it first came, why it was held and until when.
    Held {
        first: Via,
        reason: HoldReason,
        until: Instant,
    },
}

impl Arrival {
    fn via(self) -> Via {
        match self {
            Self::Gossip => Via::Gossip,
            Self::Mailbox => Via::Other,
            Self::Held { first, .. } => first,
        }
    }

    /// Whether it may still wait for an earlier message of its chain (not once such a wait
    /// ran out).
    fn gap_ok(self, now: Instant) -> bool {
        match self {
            Self::Gossip | Self::Mailbox => true,
            Self::Held { reason, until, .. } => reason != HoldReason::Gap || until > now,
        }
    }
}

/// Why an envelope is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldReason {
    /// The author's sender key has not arrived.
    Key,
    /// The author writes from a membership epoch we have not reached.
    Epoch,
    /// An earlier message of the same chain is missing (for a moment).
    Gap,
    /// A membership op lies too far beyond the ops we have; the ops between are on their way
    /// (the group mailbox). Worth retrying only once our head has reached `ready_at`.
    Ops { ready_at: u64 },
}

impl HoldReason {
    /// A word for the debug log and [`GroupService::held_by_reason`].
    fn label(&self) -> &'static str {
        match self {
            Self::Key => "held: no sender key",
            Self::Epoch => "held: later epoch",
            Self::Gap => "held: earlier message missing",
            Self::Ops { .. } => "held: earlier ops missing",
        }
    }
}

/// Which held envelopes a stored one may let open (see [`GroupService::retry_held`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unblocks {
    /// None: nothing was stored.
    Nothing,
    /// Those waiting for an earlier message of this sender chain (a text or key request
    /// stored: it brings no key and changes no state).
    Chain([u8; 16]),
    /// Any: the state changed, a sender key arrived, or the caller cannot tell.
    All,
}

impl Unblocks {
    /// Whether an envelope held for `reason`, sealed with sender chain `key_id`, may open now.
    fn may_open(self, reason: HoldReason, key_id: &[u8; 16]) -> bool {
        match self {
            Self::Nothing => false,
            Self::Chain(k) => reason == HoldReason::Gap && k == *key_id,
            Self::All => true,
        }
    }

    /// What may open after a retried envelope opened and let `opened` open in turn.
    fn and(self, opened: Self) -> Self {
        match (self, opened) {
            (s, Self::Nothing) => s,
            (Self::Chain(a), Self::Chain(b)) if a == b => self,
            (Self::Nothing, o) => o,
            _ => Self::All,
        }
    }
}

#[cfg(test)]
mod unblocks_tests {
    use super::{HoldReason, Unblocks};

    #[test]
    fn a_stored_text_retries_only_the_gaps_of_its_own_chain() {
        let (mine, other) = ([1; 16], [2; 16]);
        let text = Unblocks::Chain(mine);
        assert!(text.may_open(HoldReason::Gap, &mine));
        assert!(!text.may_open(HoldReason::Gap, &other));
        // A text brings no sender key, no epoch and no op.
        assert!(!text.may_open(HoldReason::Key, &mine));
        assert!(!text.may_open(HoldReason::Epoch, &mine));
        assert!(!text.may_open(HoldReason::Ops { ready_at: 0 }, &mine));
        for reason in [
            HoldReason::Key,
            HoldReason::Epoch,
            HoldReason::Gap,
            HoldReason::Ops { ready_at: 3 },
        ] {
            assert!(Unblocks::All.may_open(reason, &other));
            assert!(!Unblocks::Nothing.may_open(reason, &mine));
        }
    }

    #[test]
    fn what_opens_in_a_retry_widens_what_the_next_round_retries() {
        let (a, b) = ([1; 16], [2; 16]);
        let text = Unblocks::Chain(a);
        assert_eq!(text.and(Unblocks::Nothing), text);
        assert_eq!(text.and(Unblocks::Chain(a)), text);
        assert_eq!(text.and(Unblocks::Chain(b)), Unblocks::All);
        assert_eq!(text.and(Unblocks::All), Unblocks::All);
        assert_eq!(
            Unblocks::Nothing.and(Unblocks::Chain(b)),
            Unblocks::Chain(b)
        );
    }
}

#[derive(Debug)]
struct Held {
    group: GroupId,
    /// `envelope.id()`, computed once (it encodes and hashes the envelope).
    id: [u8; 32],
    envelope: Envelope,
    first: Via,
    reason: HoldReason,
    until: Instant,
    order: (u64, [u8; 16], u32),
}

/// What an opened message changed (a membership op) or asks for (a key request), for the async
/// side to act on.
#[derive(Debug, Default)]
struct Effects {
    /// The state changed (retry what waits for it).
    changed: bool,
    /// We are no longer a member.
    left: bool,
    /// Our ops the log dropped: re-issue them on the new head.
    reissue: Vec<MembershipOp>,
    /// We must give the group mailbox a new secret (someone left, we are the first admin).
    rekey: bool,
    /// A member asked for these sender keys (a `KeyRequest`; boxed: an identity is large).
    key_request: Option<Box<(PublicIdentity, Vec<[u8; 16]>)>>,
    /// Members whose Leave lost a tie against a concurrent op: as the first admin we complete
    /// their departure with a Remove (they no longer listen to re-issue it themselves).
    complete_leave: Vec<PublicIdentity>,
}

/// The result of trying to open one envelope.
#[derive(Debug)]
enum Opened {
    /// Opened and committed (the message, if a new text; what its op changed; whether the
    /// gossipsub verdict, Accept, was reported already).
    Stored {
        message: Option<Box<StoredMessage>>,
        effects: Effects,
        reported: bool,
        unblocks: Unblocks,
    },
    /// Not now; `verified` if it authenticated (only the order is waited for).
    Hold { reason: HoldReason, verified: bool },
    /// Processed before.
    Duplicate,
    /// Accepted over gossipsub before and here again: a replay.
    Replay,
    /// Not for us (unknown topic, not a member).
    NotOurs,
    /// Dropped without blame (expired, too far ahead, author departed…).
    Drop(GroupError),
    /// Hostile: fails to decode, forged, tampered, replayed chain position…
    Bad(GroupError),
}

impl Opened {
    /// A word for the debug log.
    fn label(&self) -> &'static str {
        match self {
            Self::Stored { .. } => "stored",
            Self::Hold { reason, .. } => reason.label(),
            Self::Duplicate => "duplicate",
            Self::Replay => "replay",
            Self::NotOurs => "not ours",
            Self::Drop(_) => "dropped",
            Self::Bad(_) => "bad",
        }
    }
}

/// A gossipsub message's id and the peer it came from: its verdict is reported as soon as it
/// authenticates.
type GossipOrigin = (libp2p::gossipsub::MessageId, PeerId);

/// A sealed group message, ready to dispatch.
#[derive(Debug)]
struct Sealed {
    group: GroupId,
    envelope: Envelope,
    topic: String,
    handouts: Vec<(PublicIdentity, SenderKeyDistribution)>,
    message_id: [u8; 16],
    text: bool,
}

/// What happened to a control message from the inbox.
#[derive(Debug)]
enum InboxOutcome {
    /// Applied (or useless) and removed; effects on `group`, and an invite to announce.
    Done {
        group: Option<GroupId>,
        effects: Effects,
        invite: Option<Box<InviteView>>,
        new_secret: bool,
    },
    /// Waits for something (an op, a join, an epoch).
    Keep,
}

/// The group service (see the module doc).
pub(crate) struct GroupService {
    store: GroupStore,
    storage: Storage,
    identity: Identity,
    me: PublicIdentity,
    peer_id: PeerId,
    net: NetClient,
    messenger: Arc<Messenger>,
    replicas: Arc<ReplicaStore>,
    events: broadcast::Sender<NodeEvent>,
    addrs: watch::Receiver<Vec<Multiaddr>>,
    config: Config,
    mailbox: mailbox::Config,
    kick: Arc<Notify>,
    collect_kick: Notify,
    lock: Mutex<()>,
    retry_lock: Mutex<()>,
    topics: StdMutex<HashMap<TopicHash, GroupId>>,
    held: StdMutex<Vec<Held>>,
    distributing: StdMutex<HashSet<(GroupId, PublicIdentity, [u8; 16])>>,
    presence: StdMutex<HashMap<(GroupId, PublicIdentity), (Instant, PeerAddrs)>>,
    dial_backoff: StdMutex<HashMap<PublicIdentity, (Instant, Duration)>>,
    published: StdMutex<HashMap<GroupId, Published>>,
    store_in_flight: StdMutex<HashSet<Vec<u8>>>,
    /// When a sign of being behind the membership last asked for a collection.
    behind_at: StdMutex<Option<Instant>>,
    /// Sender keys we hold envelopes for and lack: when to consider asking for each, and the
    /// odds of asking then (bounded by the held envelopes).
    key_wants: StdMutex<HashMap<(GroupId, [u8; 16]), KeyWant>>,
    /// When we last asked for keys in each group.
    key_asked: StdMutex<HashMap<GroupId, Instant>>,
    /// When we last acted on a member's key request in a group.
    key_answered: StdMutex<HashMap<(GroupId, PublicIdentity), Instant>>,
    /// Wakes the sender-key hand-outs of a group that wait to be tried again.
    handout_wake: StdMutex<HashMap<GroupId, Arc<Notify>>>,
}

impl std::fmt::Debug for GroupService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupService")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl GroupService {
    /// The service, and the sink the 1:1 receive path hands group controls to.
    // Every argument is a distinct piece of the node the service is wired to.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        storage: Storage,
        identity: Identity,
        peer_id: PeerId,
        net: NetClient,
        messenger: Arc<Messenger>,
        replicas: Arc<ReplicaStore>,
        events: broadcast::Sender<NodeEvent>,
        addrs: watch::Receiver<Vec<Multiaddr>>,
        config: Config,
        mailbox: mailbox::Config,
    ) -> Result<(Arc<Self>, ControlSink), NodeError> {
        let store = GroupStore::open(storage.clone())?;
        let kick = Arc::new(Notify::new());
        let sink = ControlSink::new(store.clone(), Arc::clone(&kick));
        let service = Arc::new(Self {
            me: identity.public(),
            store,
            storage,
            identity,
            peer_id,
            net,
            messenger,
            replicas,
            events,
            addrs,
            config,
            mailbox,
            kick,
            collect_kick: Notify::new(),
            lock: Mutex::new(()),
            retry_lock: Mutex::new(()),
            topics: StdMutex::new(HashMap::new()),
            held: StdMutex::new(Vec::new()),
            distributing: StdMutex::new(HashSet::new()),
            presence: StdMutex::new(HashMap::new()),
            dial_backoff: StdMutex::new(HashMap::new()),
            published: StdMutex::new(HashMap::new()),
            store_in_flight: StdMutex::new(HashSet::new()),
            behind_at: StdMutex::new(None),
            key_wants: StdMutex::new(HashMap::new()),
            key_asked: StdMutex::new(HashMap::new()),
            key_answered: StdMutex::new(HashMap::new()),
            handout_wake: StdMutex::new(HashMap::new()),
        });
        Ok((service, sink))
    }

    /// Subscribe to every group we are in, then spawn the workers.
    pub(crate) async fn start(
        self: &Arc<Self>,
        gossip: mpsc::Receiver<GossipInbound>,
        online: watch::Receiver<u64>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, NodeError> {
        let store = self.store.clone();
        let groups = blocking(move || store.groups()).await?;
        for rec in groups.iter().filter(|r| r.membership == Membership::Active) {
            self.subscribe(&rec.state).await;
        }
        Ok(vec![
            tokio::spawn(Arc::clone(self).gossip_worker(gossip, shutdown.clone())),
            tokio::spawn(Arc::clone(self).inbox_worker(shutdown.clone())),
            tokio::spawn(Arc::clone(self).collector(online, shutdown.clone())),
            tokio::spawn(Arc::clone(self).maintenance(shutdown)),
        ])
    }

    /// Something showed that we are behind the membership log (a message or a sender key
    /// from an author we do not know as a member yet, an op far ahead): read the group
    /// mailboxes now, where the missing ops are, rather than at the next periodic collection.
    /// At most once per [`BEHIND_COLLECT_EVERY`].
    pub(super) fn note_behind(&self) {
        let mut at = lock(&self.behind_at);
        if at.is_some_and(|t| t.elapsed() < BEHIND_COLLECT_EVERY) {
            return;
        }
        *at = Some(Instant::now());
        self.collect_kick.notify_one();
    }

    fn emit(&self, event: NodeEvent) {
        let _ = self.events.send(event);
    }

    async fn subscribe(&self, state: &GroupState) {
        let topic = state.topic();
        lock(&self.topics).insert(
            libp2p::gossipsub::IdentTopic::new(topic.clone()).hash(),
            state.id(),
        );
        match self.net.group_subscribe(topic).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(group = %state.id(), error = %e, "cannot subscribe to a group topic")
            }
            Err(_) => {}
        }
    }

    async fn unsubscribe(&self, group: &GroupId, topic: String) {
        lock(&self.topics).retain(|_, g| g != group);
        let _ = self.net.group_unsubscribe(topic).await;
    }

    // ------------------------------------------------------------------------------------
    // Looking groups up
    // ------------------------------------------------------------------------------------

    /// The group `reference` names among the groups we are in: its name, its id in hex, or an
    /// unambiguous prefix of at least 8 hex digits.
    async fn resolve(&self, reference: &str) -> Result<GroupRecord, NodeError> {
        let store = self.store.clone();
        let groups = blocking(move || store.groups()).await?;
        let active: Vec<GroupRecord> = groups
            .into_iter()
            .filter(|r| r.membership == Membership::Active)
            .collect();
        let wanted = reference.trim();
        let by_name: Vec<&GroupRecord> =
            active.iter().filter(|r| r.state.name() == wanted).collect();
        let lower = wanted.to_ascii_lowercase();
        let by_id: Vec<&GroupRecord> = if lower.len() >= 8
            && lower.len() <= 64
            && lower.bytes().all(|b| b.is_ascii_hexdigit())
        {
            active
                .iter()
                .filter(|r| r.state.id().to_string().starts_with(&lower))
                .collect()
        } else {
            Vec::new()
        };
        let candidates = if by_name.len() == 1 || (by_name.len() > 1 && by_id.is_empty()) {
            by_name
        } else if !by_id.is_empty() {
            by_id
        } else {
            by_name
        };
        match candidates.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(NodeError::Group(GroupOpError::UnknownGroup {
                group: wanted.chars().take(80).collect(),
            })),
            many => Err(NodeError::Group(GroupOpError::Ambiguous {
                group: wanted.chars().take(80).collect(),
                candidates: many
                    .iter()
                    .map(|r| r.state.id().to_string()[..16].to_owned())
                    .collect::<Vec<_>>()
                    .join(", "),
            })),
        }
    }

    fn view(&self, rec: &GroupRecord) -> GroupView {
        GroupView {
            id: rec.state.id().to_string(),
            name: rec.state.name().to_owned(),
            epoch: rec.state.epoch(),
            members: rec.state.member_count(),
            role: rec
                .state
                .role(&self.me)
                .map_or_else(|| "none".into(), role_name),
            topic: rec.state.topic(),
        }
    }

    /// The view of a verified invite (call on a blocking thread: reads the contacts).
    fn invite_view(&self, invite: &VerifiedInvite, received_at_ms: u64) -> InviteView {
        let from = *invite.inviter();
        let from_name = self
            .storage
            .contact_by_identity(&from)
            .ok()
            .flatten()
            .map(|c| c.name);
        InviteView {
            code: invite.code(),
            group_id: invite.group().to_string(),
            group_name: invite.name().to_owned(),
            from: from.user_id().to_string(),
            from_name,
            members: invite.snapshot().members.len(),
            received_at_ms,
        }
    }

    // ------------------------------------------------------------------------------------
    // The user's operations
    // ------------------------------------------------------------------------------------

    pub(crate) async fn create(self: &Arc<Self>, name: &str) -> Result<GroupView, NodeError> {
        let name = name.to_owned();
        let rec = {
            let _guard = self.lock.lock().await;
            let store = self.store.clone();
            let identity = self.identity.clone();
            blocking(move || {
                if store
                    .groups()?
                    .iter()
                    .any(|r| r.membership == Membership::Active && r.state.name() == name)
                {
                    return Err(NodeError::Group(GroupOpError::NameTaken { name }));
                }
                let (state, secret, _genesis) =
                    GroupState::create(&identity, &name, unix_now_ms(), &mut OsRng)
                        .map_err(refused)?;
                let mut rec = GroupRecord {
                    state,
                    secrets: Vec::new(),
                    membership: Membership::Active,
                    joined_at_ms: unix_now_ms(),
                    last_collect: None,
                };
                rec.add_secret(0, secret);
                let mut batch = Batch::default();
                batch.put_group(&rec)?;
                store.commit(batch, None)?;
                Ok(rec)
            })
            .await?
        };
        self.subscribe(&rec.state).await;
        self.kick_presence(rec.state.id());
        tracing::info!(group = %rec.state.id(), "created a group");
        Ok(self.view(&rec))
    }

    pub(crate) async fn invite(
        self: &Arc<Self>,
        group: &str,
        contact: &PublicIdentity,
    ) -> Result<InviteView, NodeError> {
        if *contact == self.me {
            return Err(NodeError::ToSelf);
        }
        let rec = self.resolve(group).await?;
        let gid = rec.state.id();
        // Reachable first (a session, or a prekey bundle found): an invitation that cannot be
        // sent must not leave the contact added to the group.
        let route = self.messenger.control_route(contact).await?;
        let (sealed, rec) = if rec.state.is_member(contact) {
            (None, rec)
        } else {
            let change = MembershipChange::Add {
                member: *contact,
                role: Role::Member,
            };
            let (sealed, rec, effects) = self.change_membership(gid, change).await?;
            (Some((sealed, effects)), rec)
        };
        if let Some((sealed, effects)) = sealed {
            let me = Arc::clone(self);
            tokio::spawn(async move {
                me.dispatch(sealed).await;
                me.act_on(gid, effects).await;
            });
        }
        let secret = *rec
            .secret()
            .ok_or_else(|| NodeError::internal("a group without a secret"))?;
        let now_ms = unix_now_ms();
        let invite = GroupInvite::new(&rec.state, &self.identity, contact, &secret, now_ms)
            .map_err(refused)?;
        let view = InviteView {
            code: invite.code(),
            group_id: gid.to_string(),
            group_name: rec.state.name().to_owned(),
            from: self.me.user_id().to_string(),
            from_name: None,
            members: rec.state.member_count(),
            received_at_ms: now_ms,
        };
        self.messenger
            .send_control_with(*contact, GroupControl::Invite(invite), route)
            .await?;
        tracing::info!(group = %gid, invitee = %contact.user_id(), "invited a member");
        self.hand_current_chain(gid, *contact).await;
        Ok(view)
    }

    /// Hand our sender chain, at its current position, to `member` (one we just invited)
    /// unless it has it or is being handed it. Our own envelopes only hand the chain to those
    /// who were members when they were sealed, so without this the member added last would
    /// never get it until we write again: it would hold every op we sealed before its
    /// invitation (found in the group mailbox) for lack of a key, and ask for it. With the
    /// chain in hand those are below its start and dropped at once.
    async fn hand_current_chain(self: &Arc<Self>, gid: GroupId, member: PublicIdentity) {
        let _guard = self.lock.lock().await;
        let store = self.store.clone();
        let current = blocking(move || {
            let Some(rec) = store.group(&gid)? else {
                return Ok(None);
            };
            let handed = store.handed(&gid, &member)?;
            Ok(store
                .own_chain(&gid)?
                // A chain retired by a removal is replaced (and handed out) at our next send.
                .filter(|own| own.epoch >= rec.state.rekey_epoch())
                .filter(|own| handed != Some(own.chain.key_id())))
        })
        .await;
        let own = match current {
            Ok(Some(own)) => own,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read our sender chain");
                return;
            }
        };
        let key_id = own.chain.key_id();
        if !lock(&self.distributing).insert((gid, member, key_id)) {
            return;
        }
        let dist = own.chain.distribution(gid, own.epoch, self.me);
        let me = Arc::clone(self);
        tokio::spawn(async move { me.hand_out(gid, member, dist).await });
    }

    pub(crate) async fn invites(self: &Arc<Self>) -> Result<Vec<InviteView>, NodeError> {
        let this = Arc::clone(self);
        blocking(move || {
            let now_ms = unix_now_ms();
            let mut out: Vec<InviteView> = this
                .store
                .invites()?
                .iter()
                .filter_map(|(_, p)| {
                    // Expired (or damaged) invites are not shown.
                    let invite = decode_invite(p).ok()?.verify(now_ms).ok()?;
                    Some(this.invite_view(&invite, p.received_at_ms))
                })
                .collect();
            out.sort_by_key(|v| v.received_at_ms);
            Ok(out)
        })
        .await
    }

    pub(crate) async fn join(self: &Arc<Self>, code: &str) -> Result<GroupView, NodeError> {
        let unknown = || {
            NodeError::Group(GroupOpError::UnknownInvite {
                code: code.chars().take(40).collect(),
            })
        };
        let code_key = code_bytes(code).ok_or_else(unknown)?;
        let rec = {
            let _guard = self.lock.lock().await;
            let store = self.store.clone();
            let me = self.me;
            blocking(move || {
                let Some(pending) = store.invite(&code_key)? else {
                    return Ok(None);
                };
                let invite = decode_invite(&pending)?;
                let verified = invite
                    .verify_for(&me, &pending.from, unix_now_ms())
                    .map_err(refused)?;
                let gid = verified.group();
                let mut batch = Batch::default();
                batch.delete(store::invite_key(&code_key));
                if let Some(existing) = store.group(&gid)? {
                    if existing.membership == Membership::Active {
                        store.commit(batch, None)?;
                        return Ok(Some(existing));
                    }
                }
                let mut rec = GroupRecord {
                    state: GroupState::from_invite(&verified),
                    secrets: Vec::new(),
                    membership: Membership::Active,
                    joined_at_ms: unix_now_ms(),
                    last_collect: None,
                };
                rec.add_secret(verified.snapshot().epoch, *verified.group_secret());
                batch.put_group(&rec)?;
                // A new membership: a new sender chain.
                batch.delete(store::chain_key(&gid));
                store.commit(batch, None)?;
                Ok(Some(rec))
            })
            .await?
            .ok_or_else(unknown)?
        };
        self.subscribe(&rec.state).await;
        self.kick_presence(rec.state.id());
        self.kick.notify_one();
        self.collect_kick.notify_one();
        tracing::info!(group = %rec.state.id(), "joined a group");
        Ok(self.view(&rec))
    }

    pub(crate) async fn send(
        self: &Arc<Self>,
        group: &str,
        text: String,
    ) -> Result<GroupSendReport, NodeError> {
        if text.is_empty() {
            return Err(NodeError::EmptyMessage);
        }
        if text.len() > MAX_TEXT_BYTES {
            return Err(NodeError::MessageTooLong {
                len: text.len(),
                max: MAX_TEXT_BYTES,
            });
        }
        let rec = self.resolve(group).await?;
        let gid = rec.state.id();
        let sealed = {
            let _guard = self.lock.lock().await;
            let this = Arc::clone(self);
            blocking(move || {
                this.seal_blocking(gid, GroupBody::Text(text), None)
                    .map(|(s, _)| s)
            })
            .await?
        };
        let message_id = hex::encode(sealed.message_id);
        let (peers, stored) = self.dispatch(sealed).await;
        let outcome = match (peers, stored) {
            (Some(_), _) => GroupSendOutcome::Published,
            (None, n) if n > 0 => GroupSendOutcome::Stored,
            _ => GroupSendOutcome::Queued,
        };
        Ok(GroupSendReport {
            message_id,
            peers: peers.unwrap_or(0),
            stored_replicas: stored,
            outcome,
        })
    }

    /// Envelopes held now (all groups), counted by why: see [`HoldReason`].
    pub(crate) fn held_by_reason(&self) -> Vec<(&'static str, usize)> {
        let mut counts: Vec<(&'static str, usize)> = Vec::new();
        for h in lock(&self.held).iter() {
            let label = h.reason.label();
            match counts.iter_mut().find(|(l, _)| *l == label) {
                Some((_, n)) => *n += 1,
                None => counts.push((label, 1)),
            }
        }
        counts
    }

    pub(crate) async fn members(&self, group: &str) -> Result<Vec<MemberView>, NodeError> {
        let rec = self.resolve(group).await?;
        let storage = self.storage.clone();
        let me = self.me;
        let members: Vec<(PublicIdentity, Role)> =
            rec.state.members().map(|(id, role)| (*id, role)).collect();
        blocking(move || {
            members
                .into_iter()
                .map(|(id, role)| {
                    Ok(MemberView {
                        user_id: id.user_id().to_string(),
                        name: storage.contact_by_identity(&id)?.map(|c| c.name),
                        role: role_name(role),
                        is_me: id == me,
                    })
                })
                .collect()
        })
        .await
    }

    pub(crate) async fn leave(self: &Arc<Self>, group: &str) -> Result<(), NodeError> {
        let rec = self.resolve(group).await?;
        let gid = rec.state.id();
        let (sealed, _, effects) = self.change_membership(gid, MembershipChange::Leave).await?;
        self.dispatch(sealed).await;
        self.act_on(gid, effects).await;
        tracing::info!(group = %gid, "left a group");
        Ok(())
    }

    pub(crate) async fn remove(
        self: &Arc<Self>,
        group: &str,
        member: &PublicIdentity,
    ) -> Result<(), NodeError> {
        let rec = self.resolve(group).await?;
        let gid = rec.state.id();
        if !rec.state.is_member(member) {
            return Err(refused(GroupError::NotMember));
        }
        // The remover also gives the group mailbox a new secret (`apply_op` makes it,
        // `act_on` hands it to the remaining members).
        let (sealed, _, effects) = self
            .change_membership(gid, MembershipChange::Remove { member: *member })
            .await?;
        self.dispatch(sealed).await;
        self.act_on(gid, effects).await;
        tracing::info!(group = %gid, removed = %member.user_id(), "removed a member");
        Ok(())
    }

    pub(crate) async fn list(&self) -> Result<Vec<GroupView>, NodeError> {
        let store = self.store.clone();
        let groups = blocking(move || store.groups()).await?;
        Ok(groups
            .iter()
            .filter(|r| r.membership == Membership::Active)
            .map(|r| self.view(r))
            .collect())
    }

    pub(crate) async fn topic_peers(&self, group: &str) -> Result<Vec<PeerId>, NodeError> {
        let rec = self.resolve(group).await?;
        self.net
            .group_topic_peers(rec.state.topic())
            .await
            .map_err(|_| NodeError::Stopped)
    }

    pub(crate) async fn try_open(
        &self,
        group: &str,
        envelope: Vec<u8>,
    ) -> Result<Option<String>, NodeError> {
        let wanted = group.trim().to_ascii_lowercase();
        let store = self.store.clone();
        blocking(move || {
            let Some(rec) = store
                .groups()?
                .into_iter()
                .find(|r| r.state.id().to_string() == wanted || r.state.name() == wanted)
            else {
                return Ok(None);
            };
            let Ok(env) = decode_group_envelope(&envelope) else {
                return Ok(None);
            };
            let Ok((key_id, _)) = group_key_id(&env) else {
                return Ok(None);
            };
            let Some(mut chain) = store.receiver_chain(&rec.state.id(), &key_id)? else {
                return Ok(None);
            };
            // Open as if the author were still a member: what matters is the key.
            Ok(match open_group(&rec.state, &mut chain, &env, unix_now()) {
                Ok(pt) => match pt.body {
                    GroupBody::Text(t) => Some(t),
                    GroupBody::Op(_) | GroupBody::KeyRequest { .. } => Some(String::new()),
                },
                Err(GroupError::AuthorDeparted) => Some(String::new()),
                Err(_) => None,
            })
        })
        .await
    }

    // ------------------------------------------------------------------------------------
    // Sealing and dispatching our messages
    // ------------------------------------------------------------------------------------

    /// Propose `change`, broadcast it as a group message sealed in the membership it is made
    /// in, and apply it; a removal also gets the group mailbox a new secret. Returns the sealed
    /// op message and the record after the change.
    async fn change_membership(
        self: &Arc<Self>,
        gid: GroupId,
        change: MembershipChange,
    ) -> Result<(Sealed, GroupRecord, Effects), NodeError> {
        let guard = self.lock.lock().await;
        let this = Arc::clone(self);
        let (sealed, rec, effects) = blocking(move || {
            let rec = this.active_record(&gid)?;
            let op = rec
                .state
                .propose(&this.identity, change, unix_now_ms())
                .map_err(refused)?;
            let (sealed, rec) = this.seal_blocking(gid, GroupBody::Op(op.clone()), Some(&op))?;
            let (rec, effects) = rec.ok_or_else(|| NodeError::internal("op not applied"))?;
            Ok((sealed, rec, effects))
        })
        .await?;
        drop(guard);
        Ok((sealed, rec, effects))
    }

    fn active_record(&self, gid: &GroupId) -> Result<GroupRecord, NodeError> {
        match self.store.group(gid)? {
            Some(rec) if rec.membership == Membership::Active => Ok(rec),
            Some(rec) => Err(NodeError::Group(GroupOpError::NotMember {
                group: rec.state.name().to_owned(),
            })),
            None => Err(NodeError::Group(GroupOpError::UnknownGroup {
                group: gid.to_string(),
            })),
        }
    }

    /// Seal `body` as our next message in `gid` and commit it (chain, seen mark, pending
    /// mailbox store, our own copy of a text) in one batch. With `apply`, the op is applied
    /// after sealing (the message is sealed in the membership the op was made in) and the new
    /// state is committed in the same batch. Call under `lock`, on a blocking thread.
    fn seal_blocking(
        &self,
        gid: GroupId,
        body: GroupBody,
        apply: Option<&MembershipOp>,
    ) -> Result<(Sealed, Option<(GroupRecord, Effects)>), NodeError> {
        let mut rec = self.active_record(&gid)?;
        if !rec.state.is_member(&self.me) {
            return Err(NodeError::Group(GroupOpError::NotMember {
                group: rec.state.name().to_owned(),
            }));
        }
        let mut own = match self.store.own_chain(&gid)? {
            // A chain started before the last removal is retired.
            Some(own) if own.epoch >= rec.state.rekey_epoch() => own,
            _ => OwnChain {
                chain: SenderChain::new(&mut OsRng),
                epoch: rec.state.epoch(),
            },
        };
        let key_id = own.chain.key_id();
        let mut handouts = Vec::new();
        {
            let mut distributing = lock(&self.distributing);
            for (member, _) in rec.state.members() {
                if *member == self.me
                    || distributing.contains(&(gid, *member, key_id))
                    || self.store.handed(&gid, member)? == Some(key_id)
                {
                    continue;
                }
                distributing.insert((gid, *member, key_id));
                handouts.push((*member, own.chain.distribution(gid, own.epoch, self.me)));
            }
        }
        let secret = *rec
            .secret()
            .ok_or_else(|| NodeError::internal("a group without a secret"))?;
        let id = MessageId::random(&mut OsRng);
        let now_ms = unix_now_ms();
        let iteration = own.chain.iteration();
        let text = match &body {
            GroupBody::Text(t) => Some(t.clone()),
            GroupBody::Op(_) | GroupBody::KeyRequest { .. } => None,
        };
        let sealed = seal_group(
            &rec.state,
            &self.identity,
            &mut own.chain,
            &secret,
            body,
            id,
            now_ms,
            &mut OsRng,
        );
        let envelope = match sealed {
            Ok(e) => e,
            Err(e) => {
                let mut distributing = lock(&self.distributing);
                for (member, _) in &handouts {
                    distributing.remove(&(gid, *member, key_id));
                }
                return Err(refused(e));
            }
        };
        let envelope_id = envelope.id();
        let mut batch = Batch::default();
        batch.put(store::chain_key(&gid), "sender chain", &own)?;
        batch.put(
            store::seen_key(&gid, &envelope_id),
            "seen envelope",
            &SeenEnvelope {
                via: Via::Own,
                at_ms: now_ms,
            },
        )?;
        batch.put(
            store::pending_key(&gid, &envelope_id),
            "pending group envelope",
            &PendingStore {
                envelope: envelope.to_wire().map_err(wire_err("envelope"))?,
                attempts: 0,
                next_attempt_ms: now_ms.saturating_add(duration_ms(FIRST_STORE_BACKOFF)),
                message_id: text.as_ref().map(|_| id.0),
            },
        )?;
        let message = text.map(|body| StoredMessage {
            id: id.0,
            peer: self.me,
            direction: Direction::Out,
            seq: u64::from(iteration) + 1,
            sent_at_ms: now_ms,
            received_at_ms: now_ms,
            body,
            status: Status::Queued,
            group: Some(gid.0),
        });
        let applied = match apply {
            Some(op) => {
                let effects = self.apply_op(&mut rec, op).map_err(refused)?;
                batch.put_group(&rec)?;
                Some((rec.clone(), effects))
            }
            None => None,
        };
        let topic = rec.state.topic();
        if let Err(e) = self.store.commit(batch, message.as_ref()) {
            let mut distributing = lock(&self.distributing);
            for (member, _) in &handouts {
                distributing.remove(&(gid, *member, key_id));
            }
            return Err(e);
        }
        Ok((
            Sealed {
                group: gid,
                envelope,
                topic,
                handouts,
                message_id: id.0,
                text: message.is_some(),
            },
            applied,
        ))
    }

    /// Send our sender key to those who lack it, publish the envelope and store it in the group
    /// mailbox. Returns (gossipsub peers if published, mailbox replicas that acknowledged).
    async fn dispatch(self: &Arc<Self>, sealed: Sealed) -> (Option<usize>, usize) {
        let Sealed {
            group,
            envelope,
            topic,
            handouts,
            message_id,
            text,
        } = sealed;
        for (member, dist) in handouts {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.hand_out(group, member, dist).await });
        }
        let bytes = match envelope.to_wire() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode our group envelope");
                return (None, 0);
            }
        };
        let envelope_id = envelope.id();
        let pending = store::pending_key(&group, &envelope_id);
        lock(&self.store_in_flight).insert(pending.clone());
        let (published, stored) = tokio::join!(
            self.net.group_publish(topic, bytes),
            self.messenger.store_in_mailbox(&envelope)
        );
        let peers = match published {
            Ok(PublishOutcome::Sent { peers }) => Some(peers),
            Ok(PublishOutcome::Queued) => None,
            Ok(PublishOutcome::Failed(e)) => {
                tracing::warn!(%group, error = %e, "group message not published");
                None
            }
            Err(_) => None,
        };
        let replicas = match stored {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(%group, error = %e, "group message not yet in the group mailbox");
                0
            }
        };
        let status = if peers.is_some_and(|n| n > 0) {
            Some(Status::Delivered)
        } else if replicas > 0 {
            Some(Status::Stored {
                replicas: u32::try_from(replicas).unwrap_or(u32::MAX),
            })
        } else {
            None
        };
        let store = self.store.clone();
        let storage = self.storage.clone();
        let done = replicas > 0;
        let result = blocking(move || {
            let mut changed = None;
            if text {
                if let Some(status) = status {
                    changed = storage.set_status(&message_id, status)?;
                }
            }
            if done {
                let mut batch = Batch::default();
                batch.delete(pending);
                store.commit(batch, None)?;
            }
            Ok(changed)
        })
        .await;
        lock(&self.store_in_flight).remove(&store::pending_key(&group, &envelope_id));
        match result {
            Ok(Some(m)) => self.emit(NodeEvent::MessageStatus {
                id: m.id,
                peer: m.peer,
                status: m.status,
            }),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "recording a group send failed"),
        }
        (peers, replicas)
    }

    /// Hand our sender chain to `member` over 1:1 and remember it once it is in the outbox.
    /// The hand-out carries the chain at the position of the message that needed it, so a
    /// failed one (typically: no session yet and the member's prekey bundle not found in time)
    /// is retried with that same distribution, with backoff, until it is in the outbox, the
    /// member has left, our chain was retired, or a day passed; later sends do not hand out
    /// this chain to `member` meanwhile.
    async fn hand_out(
        self: Arc<Self>,
        group: GroupId,
        member: PublicIdentity,
        dist: SenderKeyDistribution,
    ) {
        let key_id = dist.key_id;
        let started = Instant::now();
        let mut backoff = FIRST_HANDOUT_BACKOFF;
        loop {
            self.note_member_presence(group, member).await;
            match self
                .messenger
                .send_control(member, GroupControl::SenderKey(dist.clone()))
                .await
            {
                Ok(_) => {
                    let store = self.store.clone();
                    let r = blocking(move || {
                        let mut batch = Batch::default();
                        batch.put_raw(store::handed_key(&group, &member), key_id.to_vec());
                        store.commit(batch, None)?;
                        Ok(())
                    })
                    .await;
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "cannot record a sender key hand-out");
                    }
                    break;
                }
                Err(NodeError::Stopped) => break,
                Err(e) => {
                    tracing::debug!(%group, member = %member.user_id(), error = %e, "sender key not handed out yet");
                }
            }
            if started.elapsed() > MAX_HANDOUT_RETRY {
                break;
            }
            // A member asking for a key of ours (`answer_key_request`) cuts the wait short.
            let wake = Arc::clone(lock(&self.handout_wake).entry(group).or_default());
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = wake.notified() => {}
            }
            backoff = (backoff * 2).min(MAX_HANDOUT_BACKOFF);
            let store = self.store.clone();
            let still_wanted = blocking(move || {
                let Some(rec) = store.group(&group)? else {
                    return Ok(false);
                };
                let current = store.own_chain(&group)?.map(|o| o.chain.key_id());
                Ok(rec.membership == Membership::Active
                    && rec.state.is_member(&member)
                    && current == Some(key_id))
            })
            .await;
            if !matches!(still_wanted, Ok(true)) {
                break;
            }
        }
        lock(&self.distributing).remove(&(group, member, key_id));
    }

    /// Tell the remaining members the group mailbox's new secret (after our removal of
    /// someone, or a departure we rekey for).
    async fn send_rekey(self: &Arc<Self>, rec: &GroupRecord) {
        let Some(latest) = rec.secrets.last() else {
            return;
        };
        let gid = rec.state.id();
        for (member, _) in rec.state.members() {
            if *member == self.me {
                continue;
            }
            let control = GroupControl::Rekey {
                group: gid,
                epoch: latest.epoch,
                group_secret: latest.secret,
            };
            let me = Arc::clone(self);
            let member = *member;
            tokio::spawn(async move {
                me.note_member_presence(gid, member).await;
                if let Err(e) = me.messenger.send_control(member, control).await {
                    tracing::debug!(member = %member.user_id(), error = %e, "rekey not sent");
                }
            });
        }
        self.kick_presence(gid);
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
