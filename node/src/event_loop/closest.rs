//! Closest-peer lookups, remembered for a minute (three for a repair) and shared while they run.
//!
//! Every mailbox operation starts with "the peers closest to this key": storing a message or a
//! group message, each collection round for each mailbox a user watches (its own, one per
//! conversation, its groups'), each repair. A Kademlia lookup costs ~24 requests; in a
//! 120-node group benchmark the nodes made ~110 of them a second, for replica sets that change
//! only with churn. So a lookup's answer is reused for [`TTL`] by later askers of the same key
//! (up to as many peers as it found), askers of a key being looked up wait for that lookup
//! instead of starting another. An answer is forgotten at once when it may have become wrong:
//! it names a peer that can no longer be dialled, or the routing table learns of a peer closer
//! to the key than the farthest one it names (a replica coming back, a new node) — the next
//! asker then looks up afresh.
//!
//! A lookup that has run for [`PATIENCE`] and already heard from as many peers as it asked for
//! is cut short by the event loop (Kademlia then answers with the closest peers that responded
//! so far): on a congested network a lookup otherwise runs to its 20 s timeout waiting for
//! peers slower than the ones it has, and every mailbox store waited for it (a `send` took
//! 42 s at its median among 1,000 nodes, docs/performance.md). A cut answer is not
//! remembered, and it is not [`Lookup::sure`].

use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

use libp2p::{
    kad::{self, KBucketDistance as Distance, KBucketKey},
    PeerId,
};
use tokio::sync::oneshot;

/// How long a lookup's answer is reused.
pub(super) const TTL: Duration = Duration::from_secs(60);
/// How long an answer is reused for a mailbox repair: three repair intervals. A replica's
/// repair rounds come 60 s ± 20 % after the last one ended, so with [`TTL`] the answer of the
/// last round had nearly always expired (1 of 5,017 repair lookups answered from memory among
/// 1,000 nodes, docs/performance.md); an answer that may have become wrong is forgotten at
/// once all the same ([`Closest::forget_peer`], [`Closest::peer_routed`]).
pub(super) const REPAIR_TTL: Duration = Duration::from_secs(180);
/// How long a lookup runs before it may be cut short.
pub(super) const PATIENCE: Duration = Duration::from_secs(5);
/// Answers remembered at once; beyond, expired ones are dropped, then all.
const MAX_CACHED: usize = 4_096;

/// A closest-peers answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Lookup {
    /// Closest first.
    pub(crate) peers: Vec<PeerId>,
    /// Whether the answer can be trusted to name the closest peers there are: false when the
    /// lookup timed out or was cut short, or ended with fewer peers than it asked for while
    /// the routing table knew of more (the peers it tried did not answer). Such an answer may
    /// name only far peers: among 1,000 nodes under churn most collection lookups were short
    /// (the median found 4 of 10), and recipients took far peers' silence for an empty
    /// mailbox (docs/performance.md).
    pub(crate) sure: bool,
}

type Reply = oneshot::Sender<Lookup>;

struct Cached {
    at: Instant,
    peers: Vec<PeerId>,
    /// How many peers the lookup asked for: it found all there were up to that many.
    asked: usize,
    /// The key in Kademlia's metric, and the distance of the farthest peer found.
    target: KBucketKey<Vec<u8>>,
    farthest: Distance,
}

impl Cached {
    /// Whether `peer`, newly in the routing table, leaves this answer as a lookup would give it.
    fn still_right_with(&self, peer: &PeerId) -> bool {
        self.peers.contains(peer)
            || (self.peers.len() >= self.asked
                && self.target.distance(&KBucketKey::from(*peer)) >= self.farthest)
    }
}

struct Running {
    key: Vec<u8>,
    count: usize,
    waiters: Vec<(usize, Reply)>,
    started: Instant,
    /// Cut short: its answer may miss closer peers.
    cut: bool,
}

/// The cache and the lookups in flight, by query id `Q` (Kademlia's `QueryId`).
pub(super) struct Closest<Q> {
    cache: HashMap<Vec<u8>, Cached>,
    running: HashMap<Q, Running>,
    by_key: HashMap<Vec<u8>, Q>,
}

impl<Q: Hash + Eq + Copy> Default for Closest<Q> {
    fn default() -> Self {
        Self {
            cache: HashMap::new(),
            running: HashMap::new(),
            by_key: HashMap::new(),
        }
    }
}

impl<Q: Hash + Eq + Copy> Closest<Q> {
    /// Answer `reply` from a remembered lookup or join one in flight that asks for at least
    /// `count`; otherwise hand `reply` back: the caller starts a lookup and calls
    /// [`Self::started`].
    /// `max_age` is how old a remembered answer may be ([`TTL`] or [`REPAIR_TTL`]).
    pub(super) fn ask(
        &mut self,
        key: &[u8],
        count: usize,
        now: Instant,
        max_age: Duration,
        reply: Reply,
    ) -> Option<Reply> {
        if let Some(c) = self.cache.get(key) {
            if now.saturating_duration_since(c.at) < max_age
                && (c.peers.len() >= count || c.asked >= count)
            {
                let _ = reply.send(Lookup {
                    peers: c.peers.iter().take(count).copied().collect(),
                    sure: true,
                });
                return None;
            }
        }
        if let Some(running) = self
            .by_key
            .get(key)
            .and_then(|id| self.running.get_mut(id))
            .filter(|r| r.count >= count)
        {
            running.waiters.push((count, reply));
            return None;
        }
        Some(reply)
    }

    /// A lookup for `key` (up to `count` peers) started as query `id` at `now`, for `reply`.
    pub(super) fn started(
        &mut self,
        id: Q,
        key: Vec<u8>,
        count: usize,
        reply: Reply,
        now: Instant,
    ) {
        self.by_key.insert(key.clone(), id);
        self.running.insert(
            id,
            Running {
                key,
                count,
                waiters: vec![(count, reply)],
                started: now,
                cut: false,
            },
        );
    }

    /// How many peers lookup `id` asks for, while it runs.
    pub(super) fn asked(&self, id: Q) -> Option<usize> {
        self.running.get(&id).map(|r| r.count)
    }

    /// Lookups that have run for [`PATIENCE`] and were not cut short yet, with the number of
    /// peers each asked for.
    pub(super) fn overdue(&self, now: Instant) -> Vec<(Q, usize)> {
        self.running
            .iter()
            .filter(|(_, r)| !r.cut && now.saturating_duration_since(r.started) >= PATIENCE)
            .map(|(id, r)| (*id, r.count))
            .collect()
    }

    /// Lookup `id` is being cut short: its answer is passed on but not remembered.
    pub(super) fn cut(&mut self, id: Q) {
        if let Some(r) = self.running.get_mut(&id) {
            r.cut = true;
        }
    }

    /// Query `id` ended with `peers` (closest first); `sure` as in [`Lookup::sure`]. Answers
    /// its askers and remembers a sure, non-empty answer that was not cut short. False if `id`
    /// is not a lookup of this cache.
    pub(super) fn finished(&mut self, id: Q, peers: Vec<PeerId>, sure: bool, now: Instant) -> bool {
        let Some(running) = self.running.remove(&id) else {
            return false;
        };
        if self.by_key.get(&running.key) == Some(&id) {
            self.by_key.remove(&running.key);
        }
        // A lookup cut short heard from enough peers, but it may not have reached the closest.
        let sure = sure && !running.cut;
        for (count, reply) in running.waiters {
            let _ = reply.send(Lookup {
                peers: peers.iter().take(count).copied().collect(),
                sure,
            });
        }
        if sure && !peers.is_empty() {
            if self.cache.len() >= MAX_CACHED {
                self.cache
                    .retain(|_, c| now.saturating_duration_since(c.at) < REPAIR_TTL);
                if self.cache.len() >= MAX_CACHED {
                    self.cache.clear();
                }
            }
            let target = KBucketKey::new(running.key.clone());
            let farthest = peers
                .iter()
                .map(|p| target.distance(&KBucketKey::from(*p)))
                .max()
                .unwrap_or_default();
            self.cache.insert(
                running.key,
                Cached {
                    at: now,
                    peers,
                    asked: running.count,
                    target,
                    farthest,
                },
            );
        }
        true
    }

    /// `peer` could not be dialled: forget every answer that names it.
    pub(super) fn forget_peer(&mut self, peer: &PeerId) {
        self.cache.retain(|_, c| !c.peers.contains(peer));
    }

    /// `peer` entered the routing table (or its entry changed): forget every answer that a
    /// lookup would now give differently (`peer` is closer than the farthest peer it names, or
    /// it found fewer peers than it asked for).
    pub(super) fn peer_routed(&mut self, peer: &PeerId) {
        self.cache.retain(|_, c| c.still_right_with(peer));
    }
}

/// The `count` peers of the routing table closest to `key`, if this node (`local`) is itself
/// closer to `key` than the farthest of them: then the key lies in this node's own
/// neighbourhood, which Kademlia keeps complete (a node learns of every peer that comes near
/// it, whose own lookups pass by it, and drops a peer whose dial failed), and a network lookup
/// would find the same peers at the cost of ~20 requests, most of them new connections.
/// `None` when the table holds fewer than `count` peers or this node is farther from `key`
/// than they are: a replica holding mail for a key outside its neighbourhood must look up
/// the peers that should hold it. Used for mailbox repairs (docs/protocol.md, "Repair and
/// hand-off").
pub(super) fn neighbourhood(
    kad: &mut kad::Behaviour<kad::store::MemoryStore>,
    local: PeerId,
    key: &[u8],
    count: usize,
) -> Option<Vec<PeerId>> {
    let target = KBucketKey::new(key.to_vec());
    let own = target.distance(&KBucketKey::from(local));
    let nearest: Vec<KBucketKey<PeerId>> =
        kad.get_closest_local_peers(&target).take(count).collect();
    let farthest = nearest.last()?;
    (nearest.len() == count && own < target.distance(farthest))
        .then(|| nearest.into_iter().map(|k| *k.preimage()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    fn ask(
        c: &mut Closest<u32>,
        key: &[u8],
        count: usize,
        now: Instant,
    ) -> (bool, oneshot::Receiver<Lookup>, Option<Reply>) {
        let (tx, rx) = oneshot::channel();
        let back = c.ask(key, count, now, TTL, tx);
        (back.is_none(), rx, back)
    }

    /// Ask for `count` peers of key `k` at `at`, start lookup `id` and finish it with `found`.
    fn looked_up(
        c: &mut Closest<u32>,
        id: u32,
        count: usize,
        found: Vec<PeerId>,
        at: Instant,
    ) -> bool {
        let (_, _, reply) = ask(c, b"k", count, at);
        c.started(id, b"k".to_vec(), count, reply.expect("handed back"), at);
        c.finished(id, found, true, at)
    }

    #[test]
    fn an_answer_is_reused_for_a_minute_then_looked_up_again() {
        let mut c = Closest::default();
        let t0 = Instant::now();
        let found = peers(5);
        let (answered, _rx, reply) = ask(&mut c, b"k", 5, t0);
        assert!(!answered, "nothing remembered: look it up");
        c.started(1, b"k".to_vec(), 5, reply.expect("handed back"), t0);
        assert!(c.finished(1, found.clone(), true, t0));
        let (answered, mut rx, _) = ask(&mut c, b"k", 3, t0 + Duration::from_secs(59));
        assert!(answered);
        assert_eq!(rx.try_recv().expect("answered").peers, found[..3].to_vec());
        let (answered, _, _) = ask(&mut c, b"k", 3, t0 + TTL);
        assert!(!answered, "expired");
        let (answered, _, _) = ask(&mut c, b"other", 3, t0);
        assert!(!answered, "per key");
    }

    #[test]
    fn a_repair_reuses_an_answer_for_three_minutes_unless_it_may_be_wrong() {
        let mut c = Closest::default();
        let t0 = Instant::now();
        let found = peers(5);
        assert!(looked_up(&mut c, 1, 5, found.clone(), t0));
        let repair = |c: &mut Closest<u32>, at: Instant| {
            let (tx, mut rx) = oneshot::channel();
            let answered = c.ask(b"k", 5, at, REPAIR_TTL, tx).is_none();
            (answered, rx.try_recv().ok().map(|l| l.peers))
        };
        let later = t0 + TTL + Duration::from_secs(30);
        assert!(!ask(&mut c, b"k", 5, later).0, "too old for a store");
        assert_eq!(repair(&mut c, later), (true, Some(found.clone())));
        assert!(
            !repair(&mut c, t0 + REPAIR_TTL).0,
            "too old for a repair too"
        );
        // Still young enough, but it names a peer that could not be dialled.
        c.forget_peer(&found[2]);
        assert!(!repair(&mut c, later).0);
    }

    #[test]
    fn more_peers_than_were_asked_for_need_a_new_lookup_unless_there_are_no_more() {
        let mut c = Closest::default();
        let t0 = Instant::now();
        looked_up(&mut c, 1, 3, peers(3), t0);
        assert!(!ask(&mut c, b"k", 10, t0).0, "asked for 3: more may exist");
        // A lookup for 10 that found 4: the network has no more; 10 are answered with those.
        let (_, _, reply) = ask(&mut c, b"small", 10, t0);
        c.started(2, b"small".to_vec(), 10, reply.expect("handed back"), t0);
        c.finished(2, peers(4), true, t0);
        let (answered, mut rx, _) = ask(&mut c, b"small", 10, t0);
        assert!(answered);
        assert_eq!(rx.try_recv().expect("answered").peers.len(), 4);
    }

    #[test]
    fn askers_during_a_lookup_share_it_and_a_timed_out_or_empty_one_is_not_kept() {
        let mut c = Closest::default();
        let t0 = Instant::now();
        let (_, mut first, reply) = ask(&mut c, b"k", 5, t0);
        c.started(7, b"k".to_vec(), 5, reply.expect("handed back"), t0);
        let (joined, mut second, _) = ask(&mut c, b"k", 2, t0);
        assert!(joined, "waits for the running lookup");
        assert!(!ask(&mut c, b"k", 6, t0).0, "wants more than it asks for");
        let found = peers(5);
        assert!(c.finished(7, found.clone(), false, t0));
        let (first, second) = (first.try_recv(), second.try_recv());
        assert_eq!(
            first.expect("answered"),
            Lookup {
                peers: found.clone(),
                sure: false
            }
        );
        assert_eq!(second.expect("answered").peers, found[..2].to_vec());
        assert!(
            !ask(&mut c, b"k", 2, t0).0,
            "a timed-out lookup is not remembered"
        );
        looked_up(&mut c, 8, 2, Vec::new(), t0);
        assert!(!ask(&mut c, b"k", 2, t0).0, "nor an empty one");
        assert!(!c.finished(99, Vec::new(), true, t0), "not ours");
    }

    #[test]
    fn a_lookup_is_overdue_after_the_patience_once_and_a_cut_answer_is_not_kept() {
        let mut c = Closest::default();
        let t0 = Instant::now();
        let (_, mut rx, reply) = ask(&mut c, b"k", 3, t0);
        c.started(1, b"k".to_vec(), 3, reply.expect("handed back"), t0);
        assert!(c.overdue(t0 + PATIENCE / 2).is_empty());
        assert_eq!(c.overdue(t0 + PATIENCE), vec![(1, 3)]);
        c.cut(1);
        assert!(c.overdue(t0 + PATIENCE * 2).is_empty(), "cut once");
        let found = peers(3);
        assert!(c.finished(1, found.clone(), true, t0 + PATIENCE));
        let answer = rx.try_recv().expect("answered");
        assert_eq!(
            answer,
            Lookup {
                peers: found,
                sure: false
            },
            "not sure"
        );
        assert!(
            !ask(&mut c, b"k", 3, t0 + PATIENCE).0,
            "a cut answer is not remembered"
        );
    }

    #[test]
    fn an_answer_is_forgotten_when_a_closer_peer_is_routed() {
        let mut c = Closest::default();
        let t0 = Instant::now();
        let target = KBucketKey::new(b"k".to_vec());
        let mut all = peers(40);
        all.sort_by_key(|p| target.distance(&KBucketKey::from(*p)));
        let (closer, found, farther) = (all[0], all[1..4].to_vec(), all[39]);
        looked_up(&mut c, 1, 3, found.clone(), t0);
        c.peer_routed(&farther);
        c.peer_routed(&found[2]);
        assert!(
            ask(&mut c, b"k", 3, t0).0,
            "a farther or a named peer changes nothing"
        );
        c.peer_routed(&closer);
        assert!(
            !ask(&mut c, b"k", 3, t0).0,
            "a closer peer: looked up again"
        );
        // An answer with fewer peers than asked for: any new peer may belong in it.
        looked_up(&mut c, 2, 5, found.clone(), t0);
        assert!(ask(&mut c, b"k", 5, t0).0);
        c.peer_routed(&farther);
        assert!(!ask(&mut c, b"k", 5, t0).0);
    }

    #[test]
    fn an_answer_naming_an_undialable_peer_is_forgotten() {
        let mut c = Closest::default();
        let t0 = Instant::now();
        let found = peers(3);
        looked_up(&mut c, 1, 3, found.clone(), t0);
        c.forget_peer(&PeerId::random());
        assert!(ask(&mut c, b"k", 3, t0).0, "another peer: kept");
        c.forget_peer(&found[1]);
        assert!(!ask(&mut c, b"k", 3, t0).0, "forgotten");
    }

    /// A repair is answered from the routing table exactly when this node is among the
    /// closest to the key: then the answer is the table's `count` closest, as a full sort of
    /// every peer gives them; for a key farther away, a lookup.
    #[test]
    fn the_routing_table_answers_for_keys_in_this_nodes_neighbourhood_only() {
        use libp2p::{kad::store::MemoryStore, Multiaddr};

        let local = PeerId::random();
        let mut kad = kad::Behaviour::new(local, MemoryStore::new(local));
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("multiaddr");
        let mut table = Vec::new();
        for _ in 0..30 {
            let peer = PeerId::random();
            if matches!(
                kad.add_address(&peer, addr.clone()),
                kad::RoutingUpdate::Success
            ) {
                table.push(peer);
            }
        }
        let count = 5;
        assert!(table.len() > count);
        let (mut near, mut far) = (0, 0);
        for i in 0..2_000u32 {
            let key = i.to_be_bytes().to_vec();
            let target = KBucketKey::new(key.clone());
            let mut by_distance = table.clone();
            by_distance.sort_by_key(|p| target.distance(&KBucketKey::from(*p)));
            let own = target.distance(&KBucketKey::from(local));
            let inside = own < target.distance(&KBucketKey::from(by_distance[count - 1]));
            let got = neighbourhood(&mut kad, local, &key, count);
            if inside {
                near += 1;
                assert_eq!(got, Some(by_distance[..count].to_vec()), "key {i}");
            } else {
                far += 1;
                assert_eq!(got, None, "key {i}: this node is not among the closest");
            }
        }
        assert!(
            near > 100 && far > 100,
            "both cases seen: {near} near, {far} far"
        );
        let mut empty = kad::Behaviour::new(local, MemoryStore::new(local));
        assert_eq!(
            neighbourhood(&mut empty, local, b"k", count),
            None,
            "no peers"
        );
    }
}
