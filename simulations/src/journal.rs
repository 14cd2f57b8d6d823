//! The journal of a run: every message sent (when, by whom, to whom, how `send` ended), every
//! message a node received, the status changes the senders saw, and when nodes came and went.
//! At the end it joins them into one [`MessageRecord`] per message, the rows of
//! `messages.csv`. See `docs/performance.md`, "Simulations".
//!
//! Times are offsets from the start of the run, taken from a monotonic clock when the harness
//! sees the event. A message counts as delivered when the recipient's node has it durably
//! (its `MessageReceived` event, or, if the harness missed the event, the arrival time its
//! storage recorded).

use std::{
    collections::{HashMap, HashSet},
    io::Write,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use meshchat_node::storage::Status;

/// How one `send_text` call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendResult {
    /// The recipient's node acknowledged it directly.
    Delivered,
    /// Stored in the recipient's mailbox on this many replicas.
    Stored {
        /// Replicas that acknowledged.
        replicas: u32,
    },
    /// A group message offered to gossipsub peers (and the group mailbox).
    Published {
        /// Gossipsub peers it went to.
        peers: usize,
    },
    /// Neither reachable nor stored yet: in the sender's outbox, retried later.
    Queued(String),
    /// Refused for good by the recipient.
    Failed(String),
    /// `send_text` returned an error (nothing was sent).
    Error(String),
}

impl SendResult {
    /// A short name for the CSV.
    pub fn name(&self) -> &'static str {
        match self {
            SendResult::Delivered => "delivered",
            SendResult::Stored { .. } => "stored",
            SendResult::Published { .. } => "published",
            SendResult::Queued(_) => "queued",
            SendResult::Failed(_) => "failed",
            SendResult::Error(_) => "error",
        }
    }
}

/// One `send_text` call.
#[derive(Debug, Clone)]
pub struct SendRecord {
    /// Order of the call in the run.
    pub seq: u64,
    /// Sending node (index in the cluster).
    pub from: usize,
    /// Receiving node.
    pub to: usize,
    /// When `send_text` was called.
    pub sent: Duration,
    /// When it returned.
    pub returned: Duration,
    /// How it ended.
    pub result: SendResult,
    /// The message id, when the message was written (not for [`SendResult::Error`]).
    pub message_id: Option<[u8; 16]>,
    /// Whether the recipient's node was running when the send started.
    pub recipient_online: bool,
    /// Part of the measured traffic (not the warm-up that opens the sessions).
    pub measured: bool,
    /// Which part of the scenario it belongs to (e.g. `partition`, `cross-half`).
    pub tag: &'static str,
    /// A group message: one record per member it should reach (`to`), all with the same id.
    pub group: bool,
}

/// How a delivered message reached its recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    /// Over a direct connection between the two nodes.
    Direct,
    /// Over a connection through a circuit relay (never on loopback without NAT).
    Relayed,
    /// Stored on mailbox replicas and collected (fetched or pushed) from there.
    Mailbox,
    /// A group message (over gossipsub or through the group mailbox: the receiving node does
    /// not say which).
    Group,
}

impl Path {
    /// The CSV name.
    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relayed => "relayed",
            Path::Mailbox => "mailbox",
            Path::Group => "group",
        }
    }
}

/// One message of the run, as `messages.csv` lists it.
#[derive(Debug, Clone)]
pub struct MessageRecord {
    /// The send.
    pub send: SendRecord,
    /// When the recipient's node had it durably.
    pub delivered: Option<Duration>,
    /// Send to delivery.
    pub latency: Option<Duration>,
    /// How it got there (None: not delivered).
    pub path: Option<Path>,
}

/// A node came up or went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeChange {
    /// Started.
    Up,
    /// Stopped cleanly (handing its mailbox replicas over).
    Down,
    /// Stopped as if it crashed (no hand-over).
    Crashed,
}

#[derive(Debug, Default)]
struct Trail {
    stored: Option<Duration>,
    delivered: Option<Duration>,
}

#[derive(Debug, Default)]
struct Inner {
    next_seq: u64,
    sends: Vec<SendRecord>,
    /// (message id, receiving node) -> when.
    received: HashMap<([u8; 16], usize), Duration>,
    duplicates: u64,
    statuses: HashMap<[u8; 16], Trail>,
    nodes: Vec<(Duration, usize, NodeChange)>,
    marks: Vec<(Duration, String)>,
    lagged: u64,
}

/// Everything that happened in a run; shared by the harness tasks.
#[derive(Debug)]
pub struct Journal {
    t0: Instant,
    t0_unix_ms: u64,
    inner: Mutex<Inner>,
}

impl Default for Journal {
    fn default() -> Self {
        Self::new()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Journal {
    /// A journal whose clock starts now.
    pub fn new() -> Self {
        Self {
            t0: Instant::now(),
            t0_unix_ms: unix_ms(),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Time since the start of the run.
    pub fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Record a send; its `seq` is assigned here.
    pub fn sent(&self, mut send: SendRecord) {
        let mut inner = self.lock();
        send.seq = inner.next_seq;
        inner.next_seq += 1;
        inner.sends.push(send);
    }

    /// Node `node` has message `id` durably (from its `MessageReceived` event).
    pub fn received(&self, node: usize, id: [u8; 16]) {
        let at = self.now();
        self.received_at(node, id, at);
    }

    fn received_at(&self, node: usize, id: [u8; 16], at: Duration) {
        let mut inner = self.lock();
        match inner.received.get(&(id, node)) {
            Some(_) => inner.duplicates += 1,
            None => {
                inner.received.insert((id, node), at);
            }
        }
    }

    /// Node `node`'s storage says it received `id` at unix time `received_at_ms`; used for the
    /// messages whose event the harness missed (a node stopping, a lagging subscriber).
    pub fn reconcile(&self, node: usize, id: [u8; 16], received_at_ms: u64) {
        if self.lock().received.contains_key(&(id, node)) {
            return;
        }
        let at = Duration::from_millis(received_at_ms.saturating_sub(self.t0_unix_ms));
        self.received_at(node, id, at);
    }

    /// A status change the sender's node reported for its message `id`.
    pub fn status(&self, id: [u8; 16], status: &Status) {
        let at = self.now();
        let mut inner = self.lock();
        let trail = inner.statuses.entry(id).or_default();
        match status {
            Status::Stored { .. } => {
                trail.stored.get_or_insert(at);
            }
            Status::Delivered | Status::Read => {
                trail.delivered.get_or_insert(at);
            }
            _ => {}
        }
    }

    /// A subscriber fell behind by `n` events (their messages are reconciled from storage).
    pub fn lagged(&self, n: u64) {
        self.lock().lagged += n;
    }

    /// A node came or went.
    pub fn node(&self, node: usize, change: NodeChange) {
        let at = self.now();
        self.lock().nodes.push((at, node, change));
    }

    /// A named moment of the scenario (shown in the plots and the summary).
    pub fn mark(&self, what: impl Into<String>) {
        let at = self.now();
        let what = what.into();
        tracing::info!("{what} at {:.1} s", at.as_secs_f64());
        self.lock().marks.push((at, what));
    }

    /// The marks so far.
    pub fn marks(&self) -> Vec<(Duration, String)> {
        self.lock().marks.clone()
    }

    /// Every up/down change so far.
    pub fn node_changes(&self) -> Vec<(Duration, usize, NodeChange)> {
        self.lock().nodes.clone()
    }

    /// Messages received more than once (a duplicate shown to the user would be a bug).
    pub fn duplicates(&self) -> u64 {
        self.lock().duplicates
    }

    /// Events missed by lagging subscribers.
    pub fn lagged_events(&self) -> u64 {
        self.lock().lagged
    }

    /// Measured sends that wrote a message which has not arrived yet.
    pub fn undelivered(&self) -> usize {
        let inner = self.lock();
        inner
            .sends
            .iter()
            .filter(|s| s.measured)
            .filter(|s| {
                s.message_id
                    .is_some_and(|id| !inner.received.contains_key(&(id, s.to)))
            })
            .count()
    }

    /// How many measured sends so far.
    pub fn measured_sends(&self) -> usize {
        self.lock().sends.iter().filter(|s| s.measured).count()
    }

    /// Whether these messages have all arrived, each at its node: `(message id, node)`.
    pub fn all_received(&self, wanted: &[([u8; 16], usize)]) -> bool {
        let inner = self.lock();
        wanted.iter().all(|k| inner.received.contains_key(k))
    }

    /// When message `id` arrived at `node`, if it did.
    pub fn received_time(&self, id: [u8; 16], node: usize) -> Option<Duration> {
        self.lock().received.get(&(id, node)).copied()
    }

    /// One record per send, in order, joined with its reception and the sender's statuses.
    pub fn records(&self) -> Vec<MessageRecord> {
        let inner = self.lock();
        let mut out: Vec<MessageRecord> = inner
            .sends
            .iter()
            .map(|send| {
                let reception = send
                    .message_id
                    .and_then(|id| inner.received.get(&(id, send.to)).copied());
                let trail = send.message_id.and_then(|id| inner.statuses.get(&id));
                let delivered = reception.map(|at| {
                    // A direct acknowledgement proves the recipient had it by then.
                    match send.result {
                        SendResult::Delivered => at.min(send.returned),
                        _ => at,
                    }
                });
                let path = reception.map(|at| match &send.result {
                    _ if send.group => Path::Group,
                    SendResult::Delivered => Path::Direct,
                    SendResult::Stored { .. } => Path::Mailbox,
                    // Retried from the outbox: through the mailbox if it was stored there
                    // before it arrived.
                    _ => match trail.and_then(|t| t.stored) {
                        Some(stored) if stored <= at => Path::Mailbox,
                        _ => Path::Direct,
                    },
                });
                MessageRecord {
                    send: send.clone(),
                    delivered,
                    latency: delivered.map(|d| d.saturating_sub(send.sent)),
                    path,
                }
            })
            .collect();
        out.sort_by_key(|r| r.send.seq);
        out
    }

    /// The distinct message ids of the measured sends.
    pub fn measured_ids(&self) -> HashSet<[u8; 16]> {
        self.lock()
            .sends
            .iter()
            .filter(|s| s.measured)
            .filter_map(|s| s.message_id)
            .collect()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// Write `messages.csv`: one row per message (warm-up included, marked in `measured`).
pub fn write_csv(records: &[MessageRecord], out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "seq,message_id,from,to,tag,measured,sent_ms,send_returned_ms,send_outcome,stored_replicas,recipient_online,delivered,delivered_ms,latency_ms,path"
    )?;
    for r in records {
        let s = &r.send;
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            s.seq,
            s.message_id.map(hex::encode).unwrap_or_default(),
            s.from,
            s.to,
            s.tag,
            s.measured,
            ms(s.sent),
            ms(s.returned),
            s.result.name(),
            match s.result {
                SendResult::Stored { replicas } => replicas.to_string(),
                _ => String::new(),
            },
            s.recipient_online,
            r.delivered.is_some(),
            r.delivered.map(ms).unwrap_or_default(),
            r.latency.map(ms).unwrap_or_default(),
            r.path.map(Path::name).unwrap_or("none"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(to: usize, id: u8, result: SendResult) -> SendRecord {
        SendRecord {
            seq: 0,
            from: 0,
            to,
            sent: Duration::from_millis(10),
            returned: Duration::from_millis(20),
            result,
            message_id: Some([id; 16]),
            recipient_online: true,
            measured: true,
            tag: "test",
            group: false,
        }
    }

    #[test]
    fn joins_sends_with_receptions_and_classifies_the_path() {
        let j = Journal::new();
        j.sent(send(1, 1, SendResult::Delivered));
        j.sent(send(1, 2, SendResult::Stored { replicas: 5 }));
        j.sent(send(1, 3, SendResult::Queued("x".into())));
        j.sent(send(1, 4, SendResult::Queued("x".into())));
        j.sent(send(1, 5, SendResult::Delivered));
        j.received(1, [1; 16]);
        j.received(1, [2; 16]);
        j.status([3; 16], &Status::Stored { replicas: 3 });
        j.received(1, [3; 16]);
        j.received(1, [4; 16]);
        j.received(1, [4; 16]);
        // Received by the wrong node: not a delivery.
        j.received(2, [5; 16]);
        let r = j.records();
        let paths: Vec<Option<Path>> = r.iter().map(|r| r.path).collect();
        assert_eq!(
            paths,
            [
                Some(Path::Direct),
                Some(Path::Mailbox),
                Some(Path::Mailbox),
                Some(Path::Direct),
                None
            ]
        );
        assert_eq!(
            r.iter().map(|r| r.send.seq).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        // A direct delivery is no later than the acknowledgement.
        assert!(r[0]
            .delivered
            .is_some_and(|d| d <= Duration::from_millis(20)));
        assert_eq!(j.duplicates(), 1);
        assert_eq!(j.undelivered(), 1);
        let mut csv = Vec::new();
        write_csv(&r, &mut csv).expect("write");
        let text = String::from_utf8(csv).expect("utf8");
        assert_eq!(text.lines().count(), 6);
        assert!(text
            .lines()
            .nth(2)
            .is_some_and(|l| l.contains(",stored,5,")));
        assert!(text
            .lines()
            .nth(5)
            .is_some_and(|l| l.ends_with(",false,,,none")));
    }

    #[test]
    fn reconciled_receptions_count_once() {
        let j = Journal::new();
        j.sent(send(1, 7, SendResult::Stored { replicas: 5 }));
        j.reconcile(1, [7; 16], unix_ms());
        j.reconcile(1, [7; 16], unix_ms());
        assert_eq!(j.undelivered(), 0);
        assert_eq!(j.duplicates(), 0);
    }
}
