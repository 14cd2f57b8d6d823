//! The public face of the node: [`Node::start`] and the cloneable [`NodeHandle`] that the CLI,
//! the control socket and tests drive. See `docs/architecture.md`, "Node API".
//!
//! Starting a node opens the home's RocksDB, loads the identity, builds the swarm, listens,
//! dials the bootstrap peers, then spawns the tasks of the node: the event loop (owning the
//! swarm), the inbound-envelope worker, the publisher (prekey bundle and presence records) and
//! the outbox retry loop (`crate::messaging`). [`NodeHandle::shutdown`] stops them all and waits
//! for them, so that once it returns only the handles keep the database open.

use std::{sync::Arc, time::Duration};

use libp2p::{Multiaddr, PeerId};
use meshchat_protocol::{PublicIdentity, UserId};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{broadcast, watch, Mutex},
    task::JoinHandle,
};

use crate::{
    behaviour,
    config::NodeConfig,
    control::{self, BackendError, ControlBackend, ControlErrorKind},
    error::NodeError,
    event_loop::{self, peer_of, strip_p2p, NetClient},
    groups::service::GroupService,
    mailbox::{service::Service, ReplicaStore},
    messaging::{CollectReport, Messenger, PublishReport},
    storage::{Contact, Status, Storage, StoredMessage},
};

/// Capacity of the event broadcast; a subscriber that falls further behind misses events
/// (`RecvError::Lagged`) and should re-read storage.
pub(crate) const EVENT_CAPACITY: usize = 256;
/// Longest wait at shutdown for delivered marks still being written.
const MARKS_WAIT: Duration = Duration::from_secs(2);
/// How long a clean shutdown may spend handing mailbox replicas to other peers.
const HAND_OFF_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `start` waits for the listeners to report their addresses.
const LISTEN_WAIT: Duration = Duration::from_secs(3);

/// What happened, for subscribers ([`NodeHandle::subscribe`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum NodeEvent {
    /// A new message arrived and is stored.
    MessageReceived(StoredMessage),
    /// One of our messages changed status (delivered, read, failed…).
    MessageStatus {
        /// The message.
        id: [u8; 16],
        /// Its recipient.
        peer: PublicIdentity,
        /// The new status.
        status: Status,
    },
    /// An invite into a group arrived (join it with [`NodeHandle::group_join`]).
    GroupInvite(crate::groups::InviteView),
}

/// One connected peer, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectedPeer {
    /// Its libp2p peer ID.
    pub peer_id: String,
    /// The address of (one of) the connection(s).
    pub addr: String,
    /// Whether the connection goes through a relay.
    pub relayed: bool,
}

/// What `meshchat status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeStatus {
    /// This node's libp2p peer ID (not the user's identity).
    pub peer_id: String,
    /// The user's ID (`mc1…`).
    pub user_id: String,
    /// Listen addresses as full multiaddrs ending in `/p2p/PEER_ID`.
    pub listen_addrs: Vec<String>,
    /// Confirmed external addresses, ending in `/p2p/PEER_ID`.
    pub external_addrs: Vec<String>,
    /// Connected peers.
    pub connected: Vec<ConnectedPeer>,
    /// Peers in the Kademlia routing table.
    pub routing_table_size: usize,
    /// Reachability as far as known: `public`, `private` (behind a NAT or firewall) or
    /// `unknown` (until AutoNAT has tested an address).
    pub nat_status: String,
    /// The relayed addresses this node is reachable at (accepted reservations), ending in
    /// `/p2p-circuit/p2p/PEER_ID`.
    pub relay_reservations: Vec<String>,
    /// Relayed connections upgraded to direct ones by hole punching (DCUtR), since start.
    pub hole_punches_succeeded: u64,
    /// Hole punching attempts that failed (those conversations stay on the relay).
    pub hole_punches_failed: u64,
    /// On a home server: what it relays for others.
    pub relay_server: Option<RelayServerStatus>,
    /// LAN-only operation (no relays; Kademlia server among the LAN's nodes).
    pub lan_only: bool,
    /// Whether mDNS discovery runs.
    pub mdns: bool,
    /// Mailbox replicas this node holds for others.
    pub mailbox_replicas_held: u64,
    /// DHT records this node holds (its own and others').
    pub dht_records_held: usize,
    /// Whether Kademlia runs in server mode (answers queries, stores records).
    pub dht_server: bool,
}

/// What a home server relays for others (`status` on `meshchat serve`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayServerStatus {
    /// Peers' reservations held now.
    pub reservations: u64,
    /// Circuits relayed now.
    pub circuits: u64,
    /// Reservations refused (over the limits) since start.
    pub reservations_refused: u64,
    /// Circuits refused (over the limits, or no reservation) since start.
    pub circuits_refused: u64,
}

/// How [`NodeHandle::send_text`] ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SendOutcome {
    /// The recipient's node acknowledged it (it is durably stored there).
    Delivered,
    /// The recipient could not be reached in time; the envelope is durably stored in its
    /// mailbox on `replicas` peers (at least the quorum), and the recipient collects it there.
    Stored {
        /// Replicas that acknowledged.
        replicas: u32,
    },
    /// The recipient could not be reached in time; the message is durably in the outbox and
    /// will be retried.
    Queued {
        /// Why it is not delivered yet.
        reason: String,
    },
    /// The recipient's node refused the message for good (e.g. it cannot decrypt it); it will
    /// not be retried.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The result of [`NodeHandle::send_text`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReport {
    /// The id of the message (random, chosen by us).
    pub message_id: [u8; 16],
    /// Where it is.
    pub outcome: SendOutcome,
}

/// Entry point: [`Node::start`].
#[derive(Debug)]
pub struct Node;

impl Node {
    /// Start a node on `config.home` (which must hold an identity) and return its handle.
    pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
        let home = config.home.clone();
        let storage = tokio::task::spawn_blocking(move || Storage::open(&home)).await??;
        let (identity, keypair, remembered) = {
            let storage = storage.clone();
            tokio::task::spawn_blocking(move || {
                Ok::<_, NodeError>((
                    storage.load_identity()?,
                    storage.node_keypair()?,
                    storage.bootstrap_addrs()?,
                ))
            })
            .await??
        };

        let mut bootstrap: Vec<Multiaddr> = Vec::new();
        for addr in &config.bootstrap {
            if peer_of(addr).is_none() {
                return Err(NodeError::BadAddress {
                    addr: addr.to_string(),
                    reason: "a bootstrap address must end in /p2p/PEER_ID".into(),
                });
            }
            bootstrap.push(addr.clone());
        }
        if !config.bootstrap.is_empty() {
            let strings: Vec<String> = config.bootstrap.iter().map(ToString::to_string).collect();
            let storage = storage.clone();
            tokio::task::spawn_blocking(move || storage.remember_bootstrap(&strings)).await??;
        }
        for s in remembered {
            match s.parse::<Multiaddr>() {
                Ok(a) if peer_of(&a).is_some() && !bootstrap.contains(&a) => bootstrap.push(a),
                _ => tracing::debug!(addr = %s, "ignoring a remembered bootstrap address"),
            }
        }

        let swarm = behaviour::build_swarm(keypair, &config)?;
        let local_peer_id = *swarm.local_peer_id();
        let (mut event_loop, net, inbound_rx, addrs_rx, extras) =
            event_loop::new(swarm, config.limits.clone(), config.force_dht_server());
        event_loop.nat_setup(&config);
        {
            let swarm = event_loop.swarm_mut();
            for addr in &config.listen {
                swarm
                    .listen_on(addr.clone())
                    .map_err(|source| NodeError::Listen {
                        addr: addr.clone(),
                        source,
                    })?;
            }
            for addr in &config.external {
                swarm.add_external_address(addr.clone());
            }
            for addr in &bootstrap {
                let Some(peer) = peer_of(addr) else { continue };
                if peer == local_peer_id {
                    continue;
                }
                swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, strip_p2p(addr));
                if let Err(e) = swarm.dial(addr.clone()) {
                    tracing::warn!(%addr, error = %e, "cannot dial bootstrap peer");
                }
            }
        }
        let loop_task = tokio::spawn(event_loop.run());
        let replica_store = {
            let storage = storage.clone();
            let limits = config.mailbox.limits.clone();
            tokio::task::spawn_blocking(move || ReplicaStore::open(storage, limits))
                .await?
                .map_err(|e| NodeError::internal(format!("opening the mailbox replicas: {e}")))?
        };
        let service = Arc::new(Service::new(
            Arc::new(replica_store),
            net.clone(),
            config.mailbox.clone(),
        ));
        let (pushed_tx, pushed_rx) = tokio::sync::mpsc::channel(event_loop::INBOUND_CAPACITY);

        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let messenger = Arc::new(Messenger::new(
            storage.clone(),
            identity.clone(),
            local_peer_id,
            net.clone(),
            events.clone(),
            addrs_rx.clone(),
            config.send_timeout,
            config.first_retry,
            config.mailbox.clone(),
        ));
        messenger.ensure_prekeys().await?;
        let (groups, group_sink) = GroupService::new(
            storage.clone(),
            identity.clone(),
            local_peer_id,
            net.clone(),
            Arc::clone(&messenger),
            Arc::clone(service.store()),
            events.clone(),
            addrs_rx.clone(),
            config.groups.clone(),
            config.mailbox.clone(),
        )?;
        // Before the messenger receives anything: group controls go to the group inbox.
        messenger.set_group_sink(group_sink);
        let mut tasks = vec![loop_task];
        tasks.extend(
            groups
                .start(extras.groups, extras.online.clone(), shutdown_rx.clone())
                .await?,
        );
        tasks.push(tokio::spawn(Arc::clone(&service).serve(
            extras.mailbox,
            pushed_tx,
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(
            Arc::clone(&service).repair_loop(shutdown_rx.clone()),
        ));
        tasks.extend(messenger.spawn_tasks(inbound_rx, pushed_rx, extras.online, shutdown_rx));

        let handle = NodeHandle {
            inner: Arc::new(Inner {
                net,
                messenger,
                service,
                groups,
                storage,
                user_id: identity.user_id(),
                peer_id: local_peer_id,
                events,
                shutdown: shutdown_tx,
                tasks: Mutex::new(tasks),
                control: Mutex::new(None),
            }),
        };

        // Let the listeners come up so `status` (and `run`'s banner) show real addresses.
        if !config.listen.is_empty() {
            let mut rx = addrs_rx;
            let _ = tokio::time::timeout(LISTEN_WAIT, rx.wait_for(|a| !a.is_empty())).await;
        }

        if config.serve_control {
            let path = control::socket_path(&config.home);
            match control::serve(handle.clone(), &path) {
                Ok(server) => *handle.inner.control.lock().await = Some(server),
                Err(e) => {
                    handle.shutdown().await;
                    return Err(NodeError::Control {
                        reason: e.to_string(),
                    });
                }
            }
        }
        tracing::info!(peer_id = %local_peer_id, user_id = %handle.inner.user_id, "node started");
        Ok(handle)
    }
}

pub(crate) struct Inner {
    pub(crate) net: NetClient,
    pub(crate) messenger: Arc<Messenger>,
    service: Arc<Service>,
    pub(crate) groups: Arc<GroupService>,
    storage: Storage,
    user_id: UserId,
    peer_id: PeerId,
    events: broadcast::Sender<NodeEvent>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    control: Mutex<Option<control::ControlServer>>,
}

/// A running node. Cheap to clone; every clone drives the same node.
#[derive(Clone)]
pub struct NodeHandle {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("peer_id", &self.inner.peer_id)
            .field("user_id", &self.inner.user_id)
            .finish_non_exhaustive()
    }
}

impl NodeHandle {
    /// The node's libp2p peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// The user's ID.
    pub fn user_id(&self) -> &UserId {
        &self.inner.user_id
    }

    /// The home's storage (sync API: call it from `spawn_blocking` in async code).
    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// Peer ID, addresses, connections, routing table.
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        let s = self
            .inner
            .net
            .status()
            .await
            .map_err(|_| NodeError::Stopped)?;
        Ok(NodeStatus {
            peer_id: s.peer_id.to_string(),
            user_id: self.inner.user_id.to_string(),
            listen_addrs: s.listen_addrs.iter().map(ToString::to_string).collect(),
            external_addrs: s.external_addrs.iter().map(ToString::to_string).collect(),
            connected: s
                .connected
                .into_iter()
                .map(|(p, c)| ConnectedPeer {
                    peer_id: p.to_string(),
                    addr: c.addr.to_string(),
                    relayed: c.relayed,
                })
                .collect(),
            routing_table_size: s.routing_table_size,
            nat_status: s.nat.reachability.as_str().into(),
            relay_reservations: s.nat.reservations.iter().map(ToString::to_string).collect(),
            hole_punches_succeeded: s.nat.hole_punches_succeeded,
            hole_punches_failed: s.nat.hole_punches_failed,
            relay_server: s.nat.relay_server.map(|r| RelayServerStatus {
                reservations: r.reservations as u64,
                circuits: r.circuits as u64,
                reservations_refused: r.reservations_refused,
                circuits_refused: r.circuits_refused,
            }),
            lan_only: s.nat.lan_only,
            mdns: s.nat.mdns,
            mailbox_replicas_held: self.inner.service.store().totals().0,
            dht_records_held: s.dht_records_held,
            dht_server: s.dht_server,
        })
    }

    /// Encrypt `text` for `to`, commit it to the outbox, and deliver it directly. Returns
    /// `Delivered` once the recipient acknowledged it, or `Queued` once it is durably in the
    /// outbox and the recipient could not be reached within the configured send timeout.
    pub async fn send_text(
        &self,
        to: PublicIdentity,
        text: String,
    ) -> Result<SendReport, NodeError> {
        self.inner.messenger.send_text(to, text).await
    }

    /// Collect mail now: FETCH from the replicas of every watched mailbox, store what is new
    /// durably, DELETE it from the replicas. The node also does this by itself at start, on
    /// reconnect and every `mailbox.collect_interval`.
    pub async fn collect_mail(&self) -> Result<CollectReport, NodeError> {
        self.inner.messenger.collect_mail().await
    }

    /// Run one repair round now: sweep expired mail and hand copies of what this node holds to
    /// the closest peers of each mailbox that lack them. Returns the copies newly accepted.
    pub async fn repair_mailboxes(&self) -> usize {
        self.inner.service.repair().await
    }

    /// (envelopes, bytes) this node holds as a mailbox replica for others.
    pub fn mailbox_replicas(&self) -> (u64, u64) {
        self.inner.service.store().totals()
    }

    /// Events: received messages, status changes of ours.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    /// Add a contact and publish our presence record for them.
    pub async fn add_contact(
        &self,
        name: String,
        identity: PublicIdentity,
    ) -> Result<Contact, NodeError> {
        let storage = self.inner.storage.clone();
        let contact =
            tokio::task::spawn_blocking(move || storage.add_contact(&name, &identity)).await??;
        self.inner.messenger.trigger_publish();
        self.inner.messenger.trigger_collect();
        Ok(contact)
    }

    /// Publish (now) the prekey bundle and a presence record for every contact; returns once
    /// the DHT answered.
    pub async fn publish_records(&self) -> Result<PublishReport, NodeError> {
        self.inner.messenger.publish_all().await
    }

    /// What the node's last finished publication round did (its own rounds run at start, when
    /// contacts or addresses change and before records expire), without starting one.
    pub fn last_publication(&self) -> Option<PublishReport> {
        self.inner.messenger.last_publication()
    }

    /// Mark incoming messages from `peer` as read and tell the sender (a read receipt, sent
    /// directly; best effort).
    pub async fn mark_read(
        &self,
        peer: PublicIdentity,
        ids: Vec<[u8; 16]>,
    ) -> Result<(), NodeError> {
        self.inner.messenger.mark_read(peer, ids).await
    }

    /// The value this node's DHT store holds under `key` (its own records and those it keeps for
    /// others), if any.
    pub async fn local_record(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, NodeError> {
        self.inner
            .net
            .local_record(key)
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Test hook, not a supported API: refuse every connection with `peers` (closing the open
    /// ones) until [`NodeHandle::unblock_peers`]. `simulations/` partitions a network with it.
    #[doc(hidden)]
    pub async fn block_peers(&self, peers: Vec<PeerId>) -> Result<(), NodeError> {
        self.inner
            .net
            .set_blocked(peers, true)
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Test hook, not a supported API: accept connections with `peers` again (see
    /// [`NodeHandle::block_peers`]; this also lifts a ban for misbehaviour).
    #[doc(hidden)]
    pub async fn unblock_peers(&self, peers: Vec<PeerId>) -> Result<(), NodeError> {
        self.inner
            .net
            .set_blocked(peers, false)
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Test hook, not a supported API: from now on (`on`), every closest-peers lookup of this
    /// node ends as soon as it starts, having heard from no peer — as lookups time out on a
    /// saturated network. Tests show that mail still arrives.
    #[doc(hidden)]
    pub async fn stunt_lookups(&self, on: bool) -> Result<(), NodeError> {
        self.inner
            .net
            .stunt_lookups(on)
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Dial a peer (a multiaddr ending in `/p2p/PEER_ID`) and wait for the connection.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        self.inner
            .net
            .dial(addr.clone())
            .await
            .map_err(|_| NodeError::Stopped)?
            .map_err(|reason| NodeError::BadAddress {
                addr: addr.to_string(),
                reason,
            })
    }

    /// Stop the node: the event loop (closing every connection and listener), all tasks and the
    /// control socket. Returns once they have stopped. Idempotent.
    pub async fn shutdown(&self) {
        self.stop_tasks().await;
        let server = self.inner.control.lock().await.take();
        if let Some(server) = server {
            server.shutdown().await;
        }
    }

    /// Stop like [`NodeHandle::shutdown`] but without handing mailbox replicas to other peers
    /// first: what the network sees when a node crashes or loses power (for tests and
    /// simulations of churn).
    pub async fn shutdown_abruptly(&self) {
        self.inner.shutdown.send_replace(true);
        self.shutdown().await;
    }

    /// Resolves once a shutdown has been requested (by [`NodeHandle::shutdown`] or a control
    /// client's `Shutdown`); `meshchat run` waits on this and then calls `shutdown`.
    pub async fn stopped(&self) {
        let mut rx = self.inner.shutdown.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Stop everything but the control socket (so a control client asking for the shutdown
    /// still gets its answer).
    async fn stop_tasks(&self) {
        self.inner.messenger.finish_marks(MARKS_WAIT).await;
        // A replica leaving cleanly hands its mail to the closest peers first.
        if !*self.inner.shutdown.borrow() && self.inner.service.store().totals().0 > 0 {
            let handed =
                tokio::time::timeout(HAND_OFF_TIMEOUT, self.inner.service.hand_over()).await;
            tracing::debug!(?handed, "mailbox hand-off before shutdown");
        }
        self.inner.shutdown.send_replace(true);
        let _ = self.inner.net.shutdown().await;
        let tasks: Vec<JoinHandle<()>> = self.inner.tasks.lock().await.drain(..).collect();
        for t in tasks {
            if let Err(e) = t.await {
                if e.is_panic() {
                    tracing::error!(error = %e, "a node task panicked");
                }
            }
        }
    }
}

fn backend_error(e: NodeError) -> BackendError {
    use crate::error::ErrorKind;
    let kind = match e.kind() {
        ErrorKind::NotFound => ControlErrorKind::NotFound,
        ErrorKind::InvalidInput => ControlErrorKind::InvalidInput,
        ErrorKind::Unavailable => ControlErrorKind::Unavailable,
        ErrorKind::HomeInUse => ControlErrorKind::HomeInUse,
        ErrorKind::NoIdentity => ControlErrorKind::NoIdentity,
        _ => ControlErrorKind::Internal,
    };
    BackendError::new(kind, e.to_string())
}

/// The running node answers the control socket.
#[async_trait::async_trait]
impl ControlBackend for NodeHandle {
    fn storage(&self) -> &Storage {
        NodeHandle::storage(self)
    }

    async fn status(&self) -> Result<control::NodeStatusView, BackendError> {
        let s = NodeHandle::status(self).await.map_err(backend_error)?;
        Ok(control::NodeStatusView {
            peer_id: s.peer_id,
            user_id: s.user_id,
            listen_addrs: s.listen_addrs,
            external_addrs: s.external_addrs,
            connected: s
                .connected
                .into_iter()
                .map(|c| control::ConnectedView {
                    peer_id: c.peer_id,
                    addr: c.addr,
                    relayed: c.relayed,
                })
                .collect(),
            routing_table_size: s.routing_table_size as u64,
            nat_status: s.nat_status,
            relay_reservations: s.relay_reservations,
            reachability: control::ReachabilityView {
                hole_punches_succeeded: s.hole_punches_succeeded,
                hole_punches_failed: s.hole_punches_failed,
                relay_server: s.relay_server.map(|r| control::RelayServerView {
                    reservations: r.reservations,
                    circuits: r.circuits,
                    reservations_refused: r.reservations_refused,
                    circuits_refused: r.circuits_refused,
                }),
                lan_only: s.lan_only,
                mdns: s.mdns,
            },
            mailbox_replicas_held: s.mailbox_replicas_held,
        })
    }

    async fn send_text(
        &self,
        to: PublicIdentity,
        text: String,
    ) -> Result<control::SendOutcomeReport, BackendError> {
        let report = NodeHandle::send_text(self, to, text)
            .await
            .map_err(backend_error)?;
        let outcome = match report.outcome {
            SendOutcome::Delivered => control::SendOutcome::Delivered,
            SendOutcome::Stored { replicas } => control::SendOutcome::Stored { replicas },
            SendOutcome::Queued { reason } => control::SendOutcome::Queued { reason },
            SendOutcome::Failed { reason } => {
                return Err(BackendError::new(ControlErrorKind::Unavailable, reason))
            }
        };
        Ok(control::SendOutcomeReport {
            message_id: report.message_id,
            outcome,
        })
    }

    fn message_wakeups(&self) -> Option<futures::stream::BoxStream<'static, ()>> {
        use futures::StreamExt;
        let rx = self.subscribe();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(NodeEvent::MessageReceived(_))
                    | Err(broadcast::error::RecvError::Lagged(_)) => return Some(((), rx)),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Some(stream.boxed())
    }

    fn conversation_events(
        &self,
    ) -> Option<futures::stream::BoxStream<'static, control::ConversationEvent>> {
        use control::ConversationEvent;
        use futures::StreamExt;
        let rx = self.subscribe();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                let event = match rx.recv().await {
                    Ok(NodeEvent::MessageReceived(m)) => {
                        ConversationEvent::Received { peer: m.peer }
                    }
                    Ok(NodeEvent::MessageStatus { id, peer, status }) => {
                        ConversationEvent::Status { peer, id, status }
                    }
                    // Events of other kinds (groups, …) do not concern a conversation.
                    #[allow(unreachable_patterns)]
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => ConversationEvent::Rescan,
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                return Some((event, rx));
            }
        });
        Some(stream.boxed())
    }

    async fn add_contact(
        &self,
        name: String,
        identity: PublicIdentity,
    ) -> Result<Contact, BackendError> {
        NodeHandle::add_contact(self, name, identity)
            .await
            .map_err(backend_error)
    }

    async fn messages_shown(&self, shown: Vec<StoredMessage>) {
        let mut by_peer: std::collections::BTreeMap<PublicIdentity, Vec<[u8; 16]>> =
            std::collections::BTreeMap::new();
        for m in shown {
            // Group messages get no read receipts (the author learns nothing of who read).
            if m.direction == crate::storage::Direction::In
                && m.status != Status::Read
                && m.group.is_none()
            {
                by_peer.entry(m.peer).or_default().push(m.id);
            }
        }
        for (peer, ids) in by_peer {
            // Receipts may wait for an unreachable peer; do not hold up the listing.
            // They are marked read in storage already: only the receipts are left to send.
            let handle = self.clone();
            tokio::spawn(async move {
                if let Err(e) = handle.inner.messenger.send_read_receipts(peer, ids).await {
                    tracing::debug!(error = %e, "sending read receipts failed");
                }
            });
        }
    }

    async fn shutdown(&self) -> Result<(), BackendError> {
        self.stop_tasks().await;
        Ok(())
    }

    async fn group(
        &self,
        request: control::GroupRequest,
    ) -> Result<control::GroupAnswer, BackendError> {
        use control::{GroupAnswer, GroupRequest};
        let answer = match request {
            GroupRequest::Create { name } => self.group_create(&name).await.map(GroupAnswer::Group),
            GroupRequest::Invite { group, contact } => self
                .group_invite(&group, &contact)
                .await
                .map(GroupAnswer::Invite),
            GroupRequest::Invites => self.group_invites().await.map(GroupAnswer::Invites),
            GroupRequest::Join { code } => self.group_join(&code).await.map(GroupAnswer::Group),
            GroupRequest::Send { group, text } => {
                self.group_send(&group, text).await.map(GroupAnswer::Sent)
            }
            GroupRequest::Members { group } => {
                self.group_members(&group).await.map(GroupAnswer::Members)
            }
            GroupRequest::Leave { group } => {
                self.group_leave(&group).await.map(|()| GroupAnswer::Done)
            }
            GroupRequest::Remove { group, member } => self
                .group_remove(&group, &member)
                .await
                .map(|()| GroupAnswer::Done),
            GroupRequest::List => self.group_list().await.map(GroupAnswer::Groups),
        };
        answer.map_err(backend_error)
    }
}
