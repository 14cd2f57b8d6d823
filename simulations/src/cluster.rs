//! A cluster of real meshchat nodes in one process: the same `Node::start` as `meshchat run`,
//! each node with its own RocksDB home under one temporary folder, all on one tokio runtime.
//! Nodes can be stopped (cleanly or as a crash) and started again on their homes, send
//! messages, and be cut off from each other (a partition). See `docs/performance.md`,
//! "Simulations".
//!
//! Transports: the in-process memory transport (`/memory/N`, the default: noise and yamux
//! exactly as over TCP, but no file descriptor per connection, which is what lets a thousand
//! nodes fit in one process) or loopback TCP (`/ip4/127.0.0.1/tcp/0`, one descriptor per end
//! of every connection: a few hundred nodes at most under the usual limit of open files).
//!
//! Every node is a DHT server and a mailbox replica, like a node of a LAN-only cluster. A
//! (re)starting node bootstraps from a few random running nodes, and from the addresses its
//! home remembers.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::StreamExt;
use libp2p::{Multiaddr, PeerId};
use meshchat_node::{
    groups::GroupSendOutcome,
    storage::{Direction, MessageFilter, Storage},
    ErrorKind, Node, NodeConfig, NodeEvent, NodeHandle, SendOutcome,
};
use meshchat_protocol::{Identity, PublicIdentity};
use rand::{seq::SliceRandom, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tempfile::TempDir;
use tokio::{
    sync::{broadcast, oneshot, RwLock},
    task::JoinHandle,
};

use crate::journal::{Journal, NodeChange, SendRecord, SendResult};

/// How often a long run or a long set-up phase logs its progress.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Counts the items of a long phase and says when a progress line is due (every
/// [`PROGRESS_EVERY`]).
#[derive(Debug)]
pub(crate) struct Progress {
    /// Items done so far.
    pub(crate) done: usize,
    last: tokio::time::Instant,
}

impl Progress {
    /// `done` items already done.
    pub(crate) fn new(done: usize) -> Self {
        Self {
            done,
            last: tokio::time::Instant::now(),
        }
    }

    /// One more item done; whether to log now.
    pub(crate) fn step(&mut self) -> bool {
        self.done += 1;
        if self.last.elapsed() < PROGRESS_EVERY {
            return false;
        }
        self.last = tokio::time::Instant::now();
        true
    }
}

/// Homes created at once.
const HOME_PARALLEL: usize = 16;
/// Longest wait, after `Node::start` returned, for the node to report its listen address.
const LISTEN_WAIT: Duration = Duration::from_secs(30);
/// Nodes stopped at once by [`Cluster::stop_all`].
const STOP_PARALLEL: usize = 64;

/// How the nodes reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// libp2p's in-process memory transport (`/memory/N`), with noise and yamux.
    Memory,
    /// TCP on 127.0.0.1, with noise and yamux.
    Tcp,
}

/// How the nodes of a cluster are configured.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// How the nodes reach each other.
    pub transport: Transport,
    /// Where the temporary folder holding the homes is made (default: the system's).
    pub dir: Option<PathBuf>,
    /// How long `send` tries to reach a recipient directly before it stores the message in
    /// the recipient's mailbox.
    pub send_timeout: Duration,
    /// How often every node collects its mail and repairs the mailboxes it holds (both 60 s
    /// in a real node; shorter here to compress time).
    pub minute: Duration,
    /// How many random running nodes a (re)starting node bootstraps from.
    pub bootstrap_peers: usize,
    /// Close connections idle this long (None: the node's default, 60 s).
    pub idle_timeout: Option<Duration>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            transport: Transport::Memory,
            dir: None,
            send_timeout: Duration::from_secs(2),
            minute: Duration::from_secs(60),
            bootstrap_peers: 3,
            idle_timeout: None,
        }
    }
}

/// What went wrong in the harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// A home could not be created.
    #[error("creating the home of node {node}: {reason}")]
    Home {
        /// Which node.
        node: usize,
        /// Why.
        reason: String,
    },
    /// A node did not start.
    #[error("starting node {node}: {source}")]
    Start {
        /// Which node.
        node: usize,
        /// Why.
        source: meshchat_node::NodeError,
    },
    /// A node reported no listen address within 30 s of starting.
    #[error("node {node} reports no listen address 30 s after starting")]
    NoAddress {
        /// Which node.
        node: usize,
    },
    /// A node that should be running is not.
    #[error("node {node} is not running")]
    NotRunning {
        /// Which node.
        node: usize,
    },
    /// A node API call failed.
    #[error("node {node}: {source}")]
    Node {
        /// Which node.
        node: usize,
        /// Why.
        source: meshchat_node::NodeError,
    },
    /// A blocking task panicked or was cancelled.
    #[error("a harness task failed: {0}")]
    Task(String),
    /// Filesystem trouble (the temporary folder).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A running node.
struct Live {
    handle: NodeHandle,
    stop_watcher: oneshot::Sender<()>,
    watcher: JoinHandle<()>,
}

struct Slot {
    home: PathBuf,
    identity: PublicIdentity,
    live: Arc<RwLock<Option<Live>>>,
    online: AtomicBool,
    addr: Mutex<Option<Multiaddr>>,
    peer_id: Mutex<Option<PeerId>>,
}

/// `n` real nodes in this process.
pub struct Cluster {
    config: ClusterConfig,
    journal: Arc<Journal>,
    slots: Vec<Slot>,
    by_identity: BTreeMap<PublicIdentity, usize>,
    rng: Mutex<ChaCha8Rng>,
    // Last, so the homes are removed after everything else is dropped.
    root: TempDir,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("nodes", &self.slots.len())
            .field("root", &self.root.path())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    /// Make the homes of `n` nodes, with identities drawn from `seed`. No node runs yet.
    pub async fn new(
        config: ClusterConfig,
        n: usize,
        seed: u64,
        journal: Arc<Journal>,
    ) -> Result<Self, ClusterError> {
        let root = match &config.dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                tempfile::Builder::new()
                    .prefix("meshchat-sim-")
                    .tempdir_in(dir)?
            }
            None => tempfile::Builder::new().prefix("meshchat-sim-").tempdir()?,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let identities: Vec<Identity> = (0..n).map(|_| Identity::generate(&mut rng)).collect();
        let mut slots = Vec::with_capacity(n);
        let mut by_identity = BTreeMap::new();
        let mut homes = Vec::with_capacity(n);
        for (i, identity) in identities.into_iter().enumerate() {
            let home = root.path().join(format!("node-{i:04}"));
            by_identity.insert(identity.public(), i);
            slots.push(Slot {
                home: home.clone(),
                identity: identity.public(),
                live: Arc::new(RwLock::new(None)),
                online: AtomicBool::new(false),
                addr: Mutex::new(None),
                peer_id: Mutex::new(None),
            });
            homes.push((i, home, identity));
        }
        // Creating a RocksDB home syncs several files: make a few at once.
        let mut homes = homes.into_iter();
        loop {
            let batch: Vec<_> = homes.by_ref().take(HOME_PARALLEL).collect();
            if batch.is_empty() {
                break;
            }
            let made = futures::future::join_all(batch.into_iter().map(|(i, h, identity)| {
                tokio::task::spawn_blocking(move || -> Result<(), (usize, String)> {
                    let fail = |e: &dyn std::fmt::Display| (i, e.to_string());
                    std::fs::create_dir_all(&h).map_err(|e| fail(&e))?;
                    let storage = Storage::open(&h).map_err(|e| fail(&e))?;
                    storage.save_identity(&identity).map_err(|e| fail(&e))
                })
            }))
            .await;
            for m in made {
                m.map_err(|e| ClusterError::Task(e.to_string()))?
                    .map_err(|(node, reason)| ClusterError::Home { node, reason })?;
            }
        }
        Ok(Self {
            config,
            journal,
            slots,
            by_identity,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_b007)),
            root,
        })
    }

    /// Number of nodes (running or not).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The folder holding the homes.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The journal the cluster writes to.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// The user identity of node `i`.
    pub fn identity(&self, i: usize) -> PublicIdentity {
        self.slots[i].identity
    }

    /// The node index of a user identity.
    pub fn index_of(&self, who: &PublicIdentity) -> Option<usize> {
        self.by_identity.get(who).copied()
    }

    /// The libp2p peer ID of node `i` (known once it has run).
    pub fn peer_id(&self, i: usize) -> Option<PeerId> {
        *lock(&self.slots[i].peer_id)
    }

    /// Whether node `i` is running.
    pub fn online(&self, i: usize) -> bool {
        self.slots[i].online.load(Ordering::SeqCst)
    }

    /// How many nodes are running.
    pub fn online_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.online.load(Ordering::SeqCst))
            .count()
    }

    /// A handle of node `i`, if it runs (for calls other than sends; see [`Cluster::send`]).
    pub async fn handle(&self, i: usize) -> Option<NodeHandle> {
        self.slots[i]
            .live
            .read()
            .await
            .as_ref()
            .map(|l| l.handle.clone())
    }

    fn node_config(&self, home: &Path, bootstrap: Vec<Multiaddr>) -> NodeConfig {
        let mut config = NodeConfig::new(home);
        let listen = match self.config.transport {
            Transport::Memory => "/memory/0",
            Transport::Tcp => "/ip4/127.0.0.1/tcp/0",
        };
        config.listen = vec![listen
            .parse()
            .expect("invariant: constant multiaddr parses")];
        config.bootstrap = bootstrap;
        config.dht_server = true;
        config.send_timeout = self.config.send_timeout;
        config.mailbox.collect_interval = self.config.minute;
        config.mailbox.repair_interval = self.config.minute;
        if let Some(idle) = self.config.idle_timeout {
            config.limits.idle_connection_timeout = idle;
        }
        config
    }

    /// Up to `bootstrap_peers` random running nodes other than `i`.
    fn pick_bootstrap(&self, i: usize) -> Vec<Multiaddr> {
        let mut candidates: Vec<Multiaddr> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(j, s)| *j != i && s.online.load(Ordering::SeqCst))
            .filter_map(|(_, s)| lock(&s.addr).clone())
            .collect();
        candidates.shuffle(&mut *lock(&self.rng));
        candidates.truncate(self.config.bootstrap_peers);
        candidates
    }

    /// Start node `i` on its home (a no-op if it runs).
    pub async fn start(&self, i: usize) -> Result<(), ClusterError> {
        let slot = &self.slots[i];
        let mut live = slot.live.write().await;
        if live.is_some() {
            return Ok(());
        }
        let bootstrap = self.pick_bootstrap(i);
        let mut attempt = 0;
        let handle = loop {
            let config = self.node_config(&slot.home, bootstrap.clone());
            match Node::start(config).await {
                Ok(h) => break h,
                // The previous run's database may still be closing.
                Err(e) if e.kind() == ErrorKind::HomeInUse && attempt < 50 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(source) => return Err(ClusterError::Start { node: i, source }),
            }
        };
        // The swarm reports its listen address once its event loop has polled the new
        // listener, which on a busy runtime (a thousand nodes starting) can come after
        // `Node::start` returned: ask until it is there.
        let listen_deadline = tokio::time::Instant::now() + LISTEN_WAIT;
        let addr: Multiaddr = loop {
            let status = handle
                .status()
                .await
                .map_err(|source| ClusterError::Node { node: i, source })?;
            if let Some(a) = status.listen_addrs.iter().find_map(|a| a.parse().ok()) {
                break a;
            }
            if tokio::time::Instant::now() >= listen_deadline {
                handle.shutdown_abruptly().await;
                return Err(ClusterError::NoAddress { node: i });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (stop_watcher, stopped) = oneshot::channel();
        let watcher = tokio::spawn(watch(
            Arc::clone(&self.journal),
            i,
            handle.subscribe(),
            stopped,
        ));
        *lock(&slot.addr) = Some(addr);
        *lock(&slot.peer_id) = Some(handle.peer_id());
        *live = Some(Live {
            handle,
            stop_watcher,
            watcher,
        });
        slot.online.store(true, Ordering::SeqCst);
        self.journal.node(i, NodeChange::Up);
        Ok(())
    }

    /// Start every node: the first alone, then the others `parallel` at a time (each
    /// bootstrapping from nodes already running).
    pub async fn start_all(&self, parallel: usize) -> Result<(), ClusterError> {
        if self.slots.is_empty() {
            return Ok(());
        }
        self.start(0).await?;
        let mut started = futures::stream::iter(1..self.slots.len())
            .map(|i| self.start(i))
            .buffer_unordered(parallel.max(1));
        let mut progress = Progress::new(1);
        while let Some(r) = started.next().await {
            r?;
            if progress.step() {
                let done = progress.done;
                tracing::info!("start: {done} of {} nodes running", self.slots.len());
            }
        }
        Ok(())
    }

    /// Stop node `i`: `crash` stops it without handing its mailbox replicas over (what a
    /// power cut looks like to the network); otherwise it hands them over first. Waits for its
    /// sends in flight. A no-op if it is not running.
    ///
    /// The node counts as offline from the call on (messages to it are "to-offline" while
    /// it finishes its sends), and again once the slot is ours: a start of the same node
    /// still in progress holds the slot and marks the node online at its end. (Marked only
    /// before, a start finishing meanwhile left a stopped node counted as running, and the
    /// end of a churn run never started it again: a 1,000-node run lost the one message
    /// whose recipient that was.)
    pub async fn stop(&self, i: usize, crash: bool) {
        let slot = &self.slots[i];
        slot.online.store(false, Ordering::SeqCst);
        let mut live = slot.live.write().await;
        slot.online.store(false, Ordering::SeqCst);
        let Some(l) = live.take() else { return };
        if crash {
            l.handle.shutdown_abruptly().await;
        } else {
            l.handle.shutdown().await;
        }
        let _ = l.stop_watcher.send(());
        let _ = l.watcher.await;
        *lock(&slot.addr) = None;
        drop(l.handle);
        self.journal.node(
            i,
            if crash {
                NodeChange::Crashed
            } else {
                NodeChange::Down
            },
        );
    }

    /// Stop every node (as crashes: the run is over, nothing needs handing over), many at a
    /// time: one after the other, a thousand nodes took minutes, the ones still running
    /// busy dialling the ones already gone.
    pub async fn stop_all(&self) {
        futures::stream::iter(0..self.slots.len())
            .map(|i| self.stop(i, true))
            .buffer_unordered(STOP_PARALLEL)
            .collect::<()>()
            .await;
    }

    /// Node `from` sends `text` to node `to`, journaled. `None` if `from` is not running.
    pub async fn send(
        &self,
        from: usize,
        to: usize,
        text: String,
        measured: bool,
        tag: &'static str,
    ) -> Option<SendRecord> {
        let live = Arc::clone(&self.slots[from].live).read_owned().await;
        let handle = live.as_ref()?.handle.clone();
        let recipient_online = self.online(to);
        let sent = self.journal.now();
        let result = handle.send_text(self.slots[to].identity, text).await;
        let returned = self.journal.now();
        drop(live);
        let (result, message_id) = match result {
            Ok(report) => (
                match report.outcome {
                    SendOutcome::Delivered => SendResult::Delivered,
                    SendOutcome::Stored { replicas } => SendResult::Stored { replicas },
                    SendOutcome::Queued { reason } => SendResult::Queued(reason),
                    SendOutcome::Failed { reason } => SendResult::Failed(reason),
                    other => SendResult::Queued(format!("{other:?}")),
                },
                Some(report.message_id),
            ),
            Err(e) => (SendResult::Error(e.to_string()), None),
        };
        let record = SendRecord {
            seq: 0,
            from,
            to,
            sent,
            returned,
            result,
            message_id,
            recipient_online,
            measured,
            tag,
            group: false,
        };
        self.journal.sent(record.clone());
        Some(record)
    }

    /// Node `from` sends `text` to group `group` (its id, hex), journaled as one record per
    /// member in `to` (the members it should reach). `None` if `from` is not running.
    pub async fn group_send(
        &self,
        from: usize,
        group: &str,
        to: &[usize],
        text: String,
        tag: &'static str,
    ) -> Option<SendResult> {
        let live = Arc::clone(&self.slots[from].live).read_owned().await;
        let handle = live.as_ref()?.handle.clone();
        let online: Vec<bool> = to.iter().map(|&m| self.online(m)).collect();
        let sent = self.journal.now();
        let result = handle.group_send(group, text).await;
        let returned = self.journal.now();
        drop(live);
        let (result, message_id) = match result {
            Ok(report) => {
                let id = hex::decode(&report.message_id)
                    .ok()
                    .and_then(|b| <[u8; 16]>::try_from(b).ok());
                let result = match report.outcome {
                    GroupSendOutcome::Published => SendResult::Published {
                        peers: report.peers,
                    },
                    GroupSendOutcome::Stored => SendResult::Stored {
                        replicas: u32::try_from(report.stored_replicas).unwrap_or(u32::MAX),
                    },
                    other => SendResult::Queued(format!("{other:?}")),
                };
                (result, id)
            }
            Err(e) => (SendResult::Error(e.to_string()), None),
        };
        for (&member, recipient_online) in to.iter().zip(online) {
            self.journal.sent(SendRecord {
                seq: 0,
                from,
                to: member,
                sent,
                returned,
                result: result.clone(),
                message_id,
                recipient_online,
                measured: true,
                tag,
                group: true,
            });
        }
        Some(result)
    }

    /// Make nodes `a` and `b` contacts of each other (both must run).
    pub async fn befriend(&self, a: usize, b: usize) -> Result<(), ClusterError> {
        for (me, other) in [(a, b), (b, a)] {
            let handle = self
                .handle(me)
                .await
                .ok_or(ClusterError::NotRunning { node: me })?;
            handle
                .add_contact(format!("node-{other:04}"), self.slots[other].identity)
                .await
                .map_err(|source| ClusterError::Node { node: me, source })?;
        }
        Ok(())
    }

    /// Partition the network: every running node in `half` refuses connections with every
    /// node outside it and the other way round (open connections across are closed). Nodes
    /// not running are not changed (the partition scenario stops nobody).
    pub async fn split(&self, half: &BTreeSet<usize>) -> Result<(), ClusterError> {
        let (inside, outside): (Vec<usize>, Vec<usize>) =
            (0..self.slots.len()).partition(|i| half.contains(i));
        let peers = |side: &[usize]| -> Vec<PeerId> {
            side.iter().filter_map(|&i| self.peer_id(i)).collect()
        };
        let (peers_in, peers_out) = (peers(&inside), peers(&outside));
        for i in 0..self.slots.len() {
            let Some(h) = self.handle(i).await else {
                continue;
            };
            let other = if half.contains(&i) {
                peers_out.clone()
            } else {
                peers_in.clone()
            };
            h.block_peers(other)
                .await
                .map_err(|source| ClusterError::Node { node: i, source })?;
        }
        Ok(())
    }

    /// End a partition: every running node accepts connections with every other again.
    pub async fn heal(&self) -> Result<(), ClusterError> {
        let all: Vec<PeerId> = (0..self.slots.len())
            .filter_map(|i| self.peer_id(i))
            .collect();
        for i in 0..self.slots.len() {
            let Some(h) = self.handle(i).await else {
                continue;
            };
            h.unblock_peers(all.clone())
                .await
                .map_err(|source| ClusterError::Node { node: i, source })?;
        }
        Ok(())
    }

    /// Connected peers of every running node.
    pub async fn connections(&self) -> Vec<usize> {
        futures::future::join_all((0..self.slots.len()).map(|i| async move {
            let h = self.handle(i).await?;
            h.status().await.ok().map(|s| s.connected.len())
        }))
        .await
        .into_iter()
        .flatten()
        .collect()
    }

    /// Wait until node `i`'s own publication rounds (it runs one whenever its contacts change)
    /// have put its prekey bundle and a presence record for each of its `contacts` contacts in
    /// the DHT, or `limit` passes; whether they did. Starts no round of its own: a forced
    /// round beside the node's would publish every record twice.
    pub async fn wait_published(
        &self,
        i: usize,
        contacts: usize,
        limit: Duration,
    ) -> Result<bool, ClusterError> {
        let handle = self
            .handle(i)
            .await
            .ok_or(ClusterError::NotRunning { node: i })?;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(report) = handle.last_publication() {
                if report.bundle_published
                    && report.presence_failed == 0
                    && report.presence_published >= contacts
                {
                    return Ok(true);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Routing-table sizes of the running nodes, smallest first.
    pub async fn routing_tables(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> =
            futures::future::join_all((0..self.slots.len()).map(|i| async move {
                let h = self.handle(i).await?;
                h.status().await.ok().map(|s| s.routing_table_size)
            }))
            .await
            .into_iter()
            .flatten()
            .collect();
        sizes.sort_unstable();
        sizes
    }

    /// Read every running node's storage and journal the incoming messages whose event the
    /// harness missed.
    pub async fn reconcile(&self) -> Result<(), ClusterError> {
        for i in 0..self.slots.len() {
            let Some(handle) = self.handle(i).await else {
                continue;
            };
            let storage = handle.storage().clone();
            let incoming = tokio::task::spawn_blocking(move || {
                storage.messages(&MessageFilter {
                    direction: Some(Direction::In),
                    ..MessageFilter::default()
                })
            })
            .await
            .map_err(|e| ClusterError::Task(e.to_string()))?
            .map_err(|e| ClusterError::Node {
                node: i,
                source: e.into(),
            })?;
            for (_, m) in incoming {
                self.journal.reconcile(i, m.id, m.received_at_ms);
            }
        }
        Ok(())
    }
}

/// Journal node `node`'s events until told to stop (then drain what is queued).
async fn watch(
    journal: Arc<Journal>,
    node: usize,
    mut events: broadcast::Receiver<NodeEvent>,
    mut stop: oneshot::Receiver<()>,
) {
    let on = |event: Result<NodeEvent, broadcast::error::RecvError>| -> bool {
        match event {
            Ok(NodeEvent::MessageReceived(m)) => journal.received(node, m.id),
            Ok(NodeEvent::MessageStatus { id, status, .. }) => journal.status(id, &status),
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => journal.lagged(n),
            Err(broadcast::error::RecvError::Closed) => return false,
        }
        true
    };
    loop {
        tokio::select! {
            biased;
            event = events.recv() => {
                if !on(event) {
                    return;
                }
            }
            _ = &mut stop => break,
        }
    }
    loop {
        match events.try_recv() {
            Ok(e) => {
                on(Ok(e));
            }
            Err(broadcast::error::TryRecvError::Lagged(n)) => journal.lagged(n),
            Err(_) => return,
        }
    }
}
