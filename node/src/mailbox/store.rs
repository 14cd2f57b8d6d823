//! The replica store: envelopes this node keeps for other people's mailboxes, in the RocksDB
//! column family `replicas`, with every limit that keeps one sender from filling the disk or a
//! victim's mailbox. See `docs/protocol.md`, section "Mailboxes", and `docs/architecture.md`,
//! "Storage layout".
//!
//! ```text
//! key   = mailbox id (32) || envelope id (32)      (ids ascending within a mailbox: FETCH pages)
//! value = wire(Envelope)                           (expires at timestamp + ttl, ≤ 30 days)
//! ```
//!
//! Counters (envelopes and bytes per mailbox, bytes in total) live in memory and are rebuilt by
//! a scan at open. Every write is synced before it is acknowledged; concurrent writes share a
//! sync (group commit). The store is synchronous:
//! async callers run it on `spawn_blocking`. [`RateLimiter`] is the per-peer token bucket the
//! mailbox service puts in front of it.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use meshchat_protocol::{
    envelope::{Envelope, EnvelopeError},
    MailboxReject, Wire,
};
use rocksdb::{Direction as IterDirection, IteratorMode, WriteBatch};

use crate::storage::{PendingWrite, Storage, StorageError};

/// The replica limits, with their defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReplicaLimits {
    /// Envelopes one mailbox may hold. Default 1,000.
    pub max_mailbox_envelopes: usize,
    /// Bytes (envelope wire bytes) one mailbox may hold. Default 16 MiB.
    pub max_mailbox_bytes: u64,
    /// Bytes all mailboxes together may hold: the disk budget. Default 512 MiB.
    pub max_total_bytes: u64,
    /// STORE/REPLICATE requests one peer may make per minute, on average. Default 600.
    pub stores_per_minute: u32,
    /// How many of them it may make in a burst. Default 300.
    pub store_burst: u32,
}

impl Default for ReplicaLimits {
    fn default() -> Self {
        Self {
            max_mailbox_envelopes: 1_000,
            max_mailbox_bytes: 16 * 1024 * 1024,
            max_total_bytes: 512 * 1024 * 1024,
            // 120 and 60 until 2026-12-06: a member storing a group's membership ops (one per
            // invitation, all in the same group mailbox, so on the same replicas) was refused
            // after 60, and the members that had missed those ops over gossipsub stayed behind
            // for minutes (a 200-member formation). 10 a second from one peer still bounds a
            // flood; the per-mailbox and disk quotas bound what it can fill.
            stores_per_minute: 600,
            store_burst: 300,
        }
    }
}

/// Why the replica store refused or failed an operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The envelope fails the keyless checks (expired, from the future, TTL, bucket).
    #[error("envelope refused: {0}")]
    Envelope(#[from] EnvelopeError),
    /// The mailbox already holds its quota of envelopes.
    #[error("mailbox {mailbox} holds {limit} envelopes, its quota")]
    MailboxCountQuota {
        /// The mailbox id, hex prefix.
        mailbox: String,
        /// The quota.
        limit: usize,
    },
    /// The mailbox would exceed its byte quota.
    #[error("mailbox {mailbox} would hold {would_hold} bytes, over its quota of {limit}")]
    MailboxByteQuota {
        /// The mailbox id, hex prefix.
        mailbox: String,
        /// Bytes it would hold.
        would_hold: u64,
        /// The quota.
        limit: u64,
    },
    /// The replica store as a whole would exceed its disk budget.
    #[error("replica store would hold {would_hold} bytes, over the disk budget of {limit}")]
    DiskBudget {
        /// Bytes it would hold.
        would_hold: u64,
        /// The budget.
        limit: u64,
    },
    /// RocksDB failed.
    #[error("replica storage: {0}")]
    Storage(#[from] StorageError),
}

impl ReplicaError {
    /// The answer a requesting peer gets.
    pub fn reject(&self) -> MailboxReject {
        match self {
            Self::Envelope(e) => MailboxReject::from(e),
            Self::MailboxCountQuota { .. } => MailboxReject::MailboxCountQuota,
            Self::MailboxByteQuota { .. } => MailboxReject::MailboxByteQuota,
            Self::DiskBudget { .. } => MailboxReject::DiskBudget,
            Self::Storage(_) => MailboxReject::Internal,
        }
    }
}

/// What [`ReplicaStore::store`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOutcome {
    /// The envelope's id.
    pub envelope_id: [u8; 32],
    /// It was held already (nothing written).
    pub duplicate: bool,
}

#[derive(Debug, Default)]
struct Counters {
    per_mailbox: HashMap<[u8; 32], (usize, u64)>,
    total_bytes: u64,
    total_envelopes: u64,
    /// Envelopes deleted at their mailbox owner's request (key as in the column family) and
    /// when they expire: see [`MAX_TOMBSTONES`].
    tombstones: HashMap<[u8; 64], u64>,
}

/// Most deleted envelopes a replica remembers (in memory; ~100 bytes each). Another replica's
/// repair hands on what it still holds, and without this memory a copy the recipient had
/// collected and deleted here was accepted again, pushed to the recipient, deleted, and handed
/// on again at the next repair, every minute until it expired (docs/protocol.md, "Mailboxes").
/// A restart forgets them: the next repair then costs one more push and delete per copy.
pub const MAX_TOMBSTONES: usize = 16_384;

impl Counters {
    fn add(&mut self, mailbox: [u8; 32], bytes: u64) {
        let e = self.per_mailbox.entry(mailbox).or_insert((0, 0));
        e.0 += 1;
        e.1 += bytes;
        self.total_bytes += bytes;
        self.total_envelopes += 1;
    }

    fn remove(&mut self, mailbox: &[u8; 32], bytes: u64) {
        if let Some(e) = self.per_mailbox.get_mut(mailbox) {
            e.0 = e.0.saturating_sub(1);
            e.1 = e.1.saturating_sub(bytes);
            if e.0 == 0 {
                self.per_mailbox.remove(mailbox);
            }
        }
        self.total_bytes = self.total_bytes.saturating_sub(bytes);
        self.total_envelopes = self.total_envelopes.saturating_sub(1);
    }

    /// Remember that `key` was deleted, until `expires_at`; at [`MAX_TOMBSTONES`], expired
    /// ones go first, then the one that expires soonest.
    fn bury(&mut self, key: [u8; 64], expires_at: u64, now: u64) {
        if self.tombstones.len() >= MAX_TOMBSTONES && !self.tombstones.contains_key(&key) {
            self.tombstones.retain(|_, until| *until > now);
            if self.tombstones.len() >= MAX_TOMBSTONES {
                let soonest = self
                    .tombstones
                    .iter()
                    .min_by_key(|(_, until)| **until)
                    .map(|(k, _)| *k);
                if let Some(k) = soonest {
                    self.tombstones.remove(&k);
                }
            }
        }
        self.tombstones.insert(key, expires_at);
    }

    fn buried(&self, key: &[u8; 64], now: u64) -> bool {
        self.tombstones.get(key).is_some_and(|until| *until > now)
    }
}

/// The envelopes held for others' mailboxes (see the module doc).
#[derive(Debug)]
pub struct ReplicaStore {
    storage: Storage,
    limits: ReplicaLimits,
    counters: Mutex<Counters>,
}

fn db_err(op: &'static str) -> impl FnOnce(rocksdb::Error) -> ReplicaError {
    move |source| ReplicaError::Storage(StorageError::Db { op, source })
}

fn hex_prefix(id: &[u8; 32]) -> String {
    hex::encode(&id[..8])
}

fn entry_key(mailbox: &[u8; 32], envelope_id: &[u8; 32]) -> [u8; 64] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(mailbox);
    k[32..].copy_from_slice(envelope_id);
    k
}

fn split_key(key: &[u8]) -> Option<([u8; 32], [u8; 32])> {
    if key.len() != 64 {
        return None;
    }
    let mut m = [0u8; 32];
    let mut e = [0u8; 32];
    m.copy_from_slice(&key[..32]);
    e.copy_from_slice(&key[32..]);
    Some((m, e))
}

impl ReplicaStore {
    /// Open the store over `storage`'s `replicas` column family, rebuilding the counters.
    pub fn open(storage: Storage, limits: ReplicaLimits) -> Result<Self, ReplicaError> {
        let mut counters = Counters::default();
        {
            let (db, cf) = storage.replica_cf();
            for item in db.iterator_cf(cf, IteratorMode::Start) {
                let (key, value) = item.map_err(db_err("scanning mailbox replicas"))?;
                if let Some((mailbox, _)) = split_key(&key) {
                    counters.add(mailbox, value.len() as u64);
                }
            }
        }
        Ok(Self {
            storage,
            limits,
            counters: Mutex::new(counters),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &ReplicaLimits {
        &self.limits
    }

    fn counters(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write `batch` without waiting for the disk, to be made durable by [`Self::durable`]
    /// once the counters' lock is released: concurrent requests then share one sync of the
    /// write-ahead log (group commit, see [`Storage::wait_durable`]) instead of each holding
    /// the lock across its own.
    fn write(&self, batch: WriteBatch, op: &'static str) -> Result<PendingWrite, ReplicaError> {
        self.storage
            .write_pending(batch, false, op)
            .map_err(ReplicaError::Storage)
    }

    fn durable(&self, pending: PendingWrite) -> Result<(), ReplicaError> {
        self.storage
            .wait_durable(pending)
            .map_err(ReplicaError::Storage)
    }

    /// Keep `envelope` in the mailbox `envelope.routing_key`, after the keyless envelope checks
    /// at `now` and the quotas; durable (synced) when it returns `Ok`.
    pub fn store(&self, envelope: &Envelope, now: u64) -> Result<StoreOutcome, ReplicaError> {
        envelope.check(now)?;
        let bytes = envelope.to_wire().map_err(|source| {
            ReplicaError::Storage(StorageError::Encode {
                what: "replica envelope",
                source,
            })
        })?;
        let mailbox = envelope.routing_key;
        let envelope_id = envelope.id();
        let key = entry_key(&mailbox, &envelope_id);
        let mut counters = self.counters();
        if counters.buried(&key, now) {
            // Collected and deleted by its recipient: not kept, not pushed again.
            return Ok(StoreOutcome {
                envelope_id,
                duplicate: true,
            });
        }
        let (db, cf) = self.storage.replica_cf();
        if db
            .get_pinned_cf(cf, key)
            .map_err(db_err("reading a mailbox replica"))?
            .is_some()
        {
            // Held already, perhaps by a concurrent store whose sync is still running: durable
            // before it is acknowledged, like a new one.
            drop(counters);
            self.storage.sync_barrier().map_err(ReplicaError::Storage)?;
            return Ok(StoreOutcome {
                envelope_id,
                duplicate: true,
            });
        }
        let len = bytes.len() as u64;
        let (count, held) = counters
            .per_mailbox
            .get(&mailbox)
            .copied()
            .unwrap_or((0, 0));
        if count >= self.limits.max_mailbox_envelopes {
            return Err(ReplicaError::MailboxCountQuota {
                mailbox: hex_prefix(&mailbox),
                limit: self.limits.max_mailbox_envelopes,
            });
        }
        if held + len > self.limits.max_mailbox_bytes {
            return Err(ReplicaError::MailboxByteQuota {
                mailbox: hex_prefix(&mailbox),
                would_hold: held + len,
                limit: self.limits.max_mailbox_bytes,
            });
        }
        if counters.total_bytes + len > self.limits.max_total_bytes {
            return Err(ReplicaError::DiskBudget {
                would_hold: counters.total_bytes + len,
                limit: self.limits.max_total_bytes,
            });
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, key, &bytes);
        let pending = self.write(batch, "storing a mailbox replica")?;
        counters.add(mailbox, len);
        drop(counters);
        self.durable(pending)?;
        Ok(StoreOutcome {
            envelope_id,
            duplicate: false,
        })
    }

    /// Up to `max` unexpired envelopes of `mailbox` with ids after `after`, ascending by id, and
    /// whether more follow.
    pub fn fetch(
        &self,
        mailbox: &[u8; 32],
        after: Option<[u8; 32]>,
        max: usize,
        now: u64,
    ) -> Result<(Vec<Envelope>, bool), ReplicaError> {
        let (db, cf) = self.storage.replica_cf();
        let start = entry_key(mailbox, &after.unwrap_or([0; 32]));
        let mut out = Vec::new();
        for item in db.iterator_cf(cf, IteratorMode::From(&start, IterDirection::Forward)) {
            let (key, value) = item.map_err(db_err("reading mailbox replicas"))?;
            let Some((m, id)) = split_key(&key) else {
                continue;
            };
            if m != *mailbox {
                break;
            }
            if after == Some(id) {
                continue;
            }
            let Ok(env) = Envelope::from_wire(&value) else {
                continue;
            };
            if now >= env.expires_at() {
                continue;
            }
            if out.len() == max {
                return Ok((out, true));
            }
            out.push(env);
        }
        Ok((out, false))
    }

    /// Every unexpired envelope of `mailbox` (for repair and hand-off).
    pub fn all(&self, mailbox: &[u8; 32], now: u64) -> Result<Vec<Envelope>, ReplicaError> {
        Ok(self.fetch(mailbox, None, usize::MAX, now)?.0)
    }

    /// Drop the envelopes `ids` from `mailbox`; returns how many were held. Those held are
    /// remembered until they expire: a later STORE or REPLICATE of one is answered as a
    /// duplicate and not kept ([`MAX_TOMBSTONES`]). (The caller checked that the mailbox's
    /// owner asked.)
    pub fn delete(
        &self,
        mailbox: &[u8; 32],
        ids: &[[u8; 32]],
        now: u64,
    ) -> Result<u32, ReplicaError> {
        let mut counters = self.counters();
        let (db, cf) = self.storage.replica_cf();
        let mut batch = WriteBatch::default();
        let mut removed = Vec::new();
        for id in ids {
            let key = entry_key(mailbox, id);
            if let Some(v) = db
                .get_pinned_cf(cf, key)
                .map_err(db_err("reading a mailbox replica"))?
            {
                if !removed.iter().any(|(k, _, _)| *k == key) {
                    let expires_at = Envelope::from_wire(&v).map_or(0, |e| e.expires_at());
                    removed.push((key, v.len() as u64, expires_at));
                    batch.delete_cf(cf, key);
                }
            }
        }
        if removed.is_empty() {
            return Ok(0);
        }
        let pending = self.write(batch, "deleting mailbox replicas")?;
        for (key, len, expires_at) in &removed {
            counters.remove(mailbox, *len);
            if *expires_at > now {
                counters.bury(*key, *expires_at, now);
            }
        }
        drop(counters);
        self.durable(pending)?;
        Ok(u32::try_from(removed.len()).unwrap_or(u32::MAX))
    }

    /// Drop every expired (or undecodable) envelope; returns how many.
    pub fn sweep(&self, now: u64) -> Result<usize, ReplicaError> {
        let mut counters = self.counters();
        counters.tombstones.retain(|_, until| *until > now);
        let (db, cf) = self.storage.replica_cf();
        let mut batch = WriteBatch::default();
        let mut removed = Vec::new();
        for item in db.iterator_cf(cf, IteratorMode::Start) {
            let (key, value) = item.map_err(db_err("sweeping mailbox replicas"))?;
            let keep = Envelope::from_wire(&value).is_ok_and(|e| now < e.expires_at());
            if !keep {
                batch.delete_cf(cf, &key);
                removed.push((split_key(&key), value.len() as u64));
            }
        }
        if removed.is_empty() {
            return Ok(0);
        }
        let pending = self.write(batch, "sweeping mailbox replicas")?;
        for (key, len) in &removed {
            if let Some((mailbox, _)) = key {
                counters.remove(mailbox, *len);
            }
        }
        drop(counters);
        self.durable(pending)?;
        Ok(removed.len())
    }

    /// The mailboxes holding at least one envelope.
    pub fn mailboxes(&self) -> Vec<[u8; 32]> {
        self.counters().per_mailbox.keys().copied().collect()
    }

    /// (envelopes, bytes) held in all mailboxes.
    pub fn totals(&self) -> (u64, u64) {
        let c = self.counters();
        (c.total_envelopes, c.total_bytes)
    }

    /// (envelopes, bytes) held in `mailbox`.
    pub fn mailbox_totals(&self, mailbox: &[u8; 32]) -> (usize, u64) {
        self.counters()
            .per_mailbox
            .get(mailbox)
            .copied()
            .unwrap_or((0, 0))
    }
}

/// A per-key token bucket: `rate_per_minute` tokens a minute, at most `burst` saved up. The map
/// is bounded: when it holds [`RateLimiter::MAX_KEYS`] keys, buckets that have refilled are
/// forgotten, and if none has, the request is refused.
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_token: Duration,
    burst: u32,
    buckets: HashMap<K, (f64, Instant)>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// The most keys tracked at once.
    pub const MAX_KEYS: usize = 4096;

    /// A limiter refilling `rate_per_minute` tokens a minute up to `burst`.
    pub fn new(rate_per_minute: u32, burst: u32) -> Self {
        Self {
            per_token: Duration::from_secs(60) / rate_per_minute.max(1),
            burst: burst.max(1),
            buckets: HashMap::new(),
        }
    }

    fn level(&self, (tokens, at): (f64, Instant), now: Instant) -> f64 {
        let refill = now.saturating_duration_since(at).as_secs_f64() / self.per_token.as_secs_f64();
        (tokens + refill).min(f64::from(self.burst))
    }

    /// Take one token for `key` at `now`; `false` if the bucket is empty.
    pub fn check(&mut self, key: &K, now: Instant) -> bool {
        if !self.buckets.contains_key(key) && self.buckets.len() >= Self::MAX_KEYS {
            let burst = f64::from(self.burst);
            let full: Vec<K> = self
                .buckets
                .iter()
                .filter(|(_, b)| self.level(**b, now) >= burst)
                .map(|(k, _)| k.clone())
                .collect();
            for k in full {
                self.buckets.remove(&k);
            }
            if self.buckets.len() >= Self::MAX_KEYS {
                return false;
            }
        }
        let current = self
            .buckets
            .get(key)
            .map_or(f64::from(self.burst), |b| self.level(*b, now));
        if current < 1.0 {
            self.buckets.insert(key.clone(), (current, now));
            return false;
        }
        self.buckets.insert(key.clone(), (current - 1.0, now));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshchat_protocol::envelope::{ciphertext_len, BUCKETS, DEFAULT_TTL_SECS};

    const NOW: u64 = 1_700_000_000;

    fn envelope(mailbox: u8, n: u8, ttl: u32) -> Envelope {
        Envelope {
            routing_key: [mailbox; 32],
            timestamp: NOW,
            ttl,
            ephemeral: [n; 32],
            ciphertext: vec![n; ciphertext_len(BUCKETS[0])],
        }
    }

    fn open(limits: ReplicaLimits) -> (tempfile::TempDir, ReplicaStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("opens");
        (dir, ReplicaStore::open(storage, limits).expect("store"))
    }

    #[test]
    fn concurrent_stores_of_the_same_envelopes_count_each_once_and_share_syncs() {
        let (_dir, store) = open(ReplicaLimits::default());
        let store = std::sync::Arc::new(store);
        let envs: Vec<Envelope> = (0..64).map(|n| envelope(3, n, DEFAULT_TTL_SECS)).collect();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = std::sync::Arc::clone(&store);
                let mut envs = envs.clone();
                envs.rotate_left(t * 16);
                std::thread::spawn(move || {
                    envs.iter()
                        .filter(|e| !store.store(e, NOW).expect("stored").duplicate)
                        .count()
                })
            })
            .collect();
        let new: usize = threads.into_iter().map(|t| t.join().expect("thread")).sum();
        assert_eq!(
            new, 64,
            "each envelope is new to exactly one of the concurrent stores"
        );
        assert_eq!(store.totals().0, 64);
        assert_eq!(store.mailbox_totals(&[3; 32]).0, 64);
        assert_eq!(store.all(&[3; 32], NOW).expect("all").len(), 64);
        // Acknowledged only once synced, through the shared group commit (the syncs it counts);
        // 256 stores, at most one sync each.
        let syncs = store.storage.syncs();
        assert!((1..=256).contains(&syncs), "{syncs} syncs");
    }

    #[test]
    fn stores_fetches_pages_and_deletes_durably() {
        let dir = tempfile::tempdir().expect("tempdir");
        let envs: Vec<Envelope> = (0..5).map(|n| envelope(1, n, DEFAULT_TTL_SECS)).collect();
        let ids: Vec<[u8; 32]> = {
            let store = ReplicaStore::open(
                Storage::open(dir.path()).expect("opens"),
                ReplicaLimits::default(),
            )
            .expect("store");
            for e in &envs {
                assert!(!store.store(e, NOW).expect("stored").duplicate);
            }
            assert!(store.store(&envs[0], NOW).expect("again").duplicate);
            store
                .store(&envelope(2, 9, DEFAULT_TTL_SECS), NOW)
                .expect("other mailbox");
            envs.iter().map(Envelope::id).collect()
        };
        // Reopened: still there, counters rebuilt.
        let store = ReplicaStore::open(
            Storage::open(dir.path()).expect("reopens"),
            ReplicaLimits::default(),
        )
        .expect("store");
        assert_eq!(store.totals().0, 6);
        assert_eq!(store.mailbox_totals(&[1; 32]).0, 5);
        let (page, more) = store.fetch(&[1; 32], None, 3, NOW).expect("fetch");
        assert_eq!((page.len(), more), (3, true));
        let after = page.last().map(Envelope::id);
        let (rest, more) = store.fetch(&[1; 32], after, 3, NOW).expect("fetch");
        assert_eq!((rest.len(), more), (2, false));
        let mut got: Vec<[u8; 32]> = page.iter().chain(&rest).map(Envelope::id).collect();
        let mut want = ids.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "every envelope exactly once, only this mailbox");
        assert_eq!(store.delete(&[1; 32], &ids[..2], NOW).expect("delete"), 2);
        assert_eq!(store.delete(&[1; 32], &ids[..2], NOW).expect("again"), 0);
        // Deleting under another mailbox id removes nothing.
        assert_eq!(
            store.delete(&[2; 32], &ids[2..], NOW).expect("wrong box"),
            0
        );
        assert_eq!(store.all(&[1; 32], NOW).expect("all").len(), 3);
        assert_eq!(store.totals().0, 4);
    }

    #[test]
    fn an_envelope_its_recipient_deleted_is_not_taken_back_until_it_expires() {
        let (_d, store) = open(ReplicaLimits::default());
        let e = envelope(1, 1, 600);
        let id = e.id();
        assert!(!store.store(&e, NOW).expect("stored").duplicate);
        assert_eq!(store.delete(&[1; 32], &[id], NOW).expect("delete"), 1);
        // Another replica's repair hands it on again: answered as held, not kept (so not
        // pushed to the recipient once more).
        let again = store.store(&e, NOW + 60).expect("answered");
        assert!(again.duplicate);
        assert_eq!(again.envelope_id, id);
        assert_eq!(store.totals().0, 0);
        assert!(store.all(&[1; 32], NOW + 60).expect("all").is_empty());
        // An id never held is not remembered: deleting it first does not refuse it later.
        let other = envelope(1, 2, 600);
        assert_eq!(
            store.delete(&[1; 32], &[other.id()], NOW).expect("delete"),
            0
        );
        assert!(!store.store(&other, NOW).expect("stored").duplicate);
        // Swept once the envelope would have expired.
        store.sweep(NOW + 600).expect("sweep");
        assert!(store.counters().tombstones.is_empty());
    }

    #[test]
    fn the_tombstones_are_bounded_and_the_soonest_to_expire_goes_first() {
        let mut c = Counters::default();
        for i in 0..MAX_TOMBSTONES {
            let mut key = [0u8; 64];
            key[..8].copy_from_slice(&(i as u64).to_be_bytes());
            c.bury(key, NOW + 1_000 + i as u64, NOW);
        }
        let newest = [9u8; 64];
        c.bury(newest, NOW + 5_000_000, NOW);
        assert_eq!(c.tombstones.len(), MAX_TOMBSTONES);
        assert!(c.buried(&newest, NOW));
        assert!(
            !c.buried(&[0u8; 64], NOW),
            "the soonest to expire made room"
        );
        // Expired ones make room first.
        let later = NOW + 2_000;
        let fresh = [7u8; 64];
        c.bury(fresh, later + 10, later);
        assert!(c.tombstones.len() < MAX_TOMBSTONES);
        assert!(c.buried(&fresh, later) && c.buried(&newest, later));
    }

    #[test]
    fn invalid_envelopes_are_refused_with_their_own_error() {
        let (_d, store) = open(ReplicaLimits::default());
        let expired = envelope(1, 1, 10);
        assert_eq!(
            store
                .store(&expired, NOW + 10)
                .map_err(|e| e.reject())
                .err(),
            Some(MailboxReject::EnvelopeExpired)
        );
        let mut bad = envelope(1, 2, 10);
        bad.ciphertext.pop();
        assert_eq!(
            store.store(&bad, NOW).map_err(|e| e.reject()).err(),
            Some(MailboxReject::NotABucket)
        );
        let future = envelope(1, 3, 10);
        assert_eq!(
            store
                .store(&future, NOW - 100_000)
                .map_err(|e| e.reject())
                .err(),
            Some(MailboxReject::EnvelopeFromTheFuture)
        );
        assert_eq!(store.totals(), (0, 0));
    }

    #[test]
    fn quotas_stop_a_flood_while_other_mailboxes_keep_working() {
        let one = envelope(1, 0, DEFAULT_TTL_SECS)
            .to_wire()
            .expect("enc")
            .len() as u64;
        let (_d, store) = open(ReplicaLimits {
            max_mailbox_envelopes: 3,
            max_mailbox_bytes: one * 10,
            max_total_bytes: one * 6,
            ..ReplicaLimits::default()
        });
        for n in 0..3 {
            store
                .store(&envelope(1, n, DEFAULT_TTL_SECS), NOW)
                .expect("within quota");
        }
        let err = store
            .store(&envelope(1, 3, DEFAULT_TTL_SECS), NOW)
            .expect_err("count quota");
        assert_eq!(err.reject(), MailboxReject::MailboxCountQuota);
        // Another mailbox still works…
        for n in 0..3 {
            store
                .store(&envelope(2, n, DEFAULT_TTL_SECS), NOW)
                .expect("other mailbox");
        }
        // …until the disk budget is used up.
        let err = store
            .store(&envelope(3, 0, DEFAULT_TTL_SECS), NOW)
            .expect_err("budget");
        assert_eq!(err.reject(), MailboxReject::DiskBudget);
        // Collecting frees room.
        store
            .delete(&[1; 32], &[envelope(1, 0, DEFAULT_TTL_SECS).id()], NOW)
            .expect("delete");
        store
            .store(&envelope(3, 0, DEFAULT_TTL_SECS), NOW)
            .expect("room again");

        let (_d2, small) = open(ReplicaLimits {
            max_mailbox_bytes: one,
            ..ReplicaLimits::default()
        });
        small
            .store(&envelope(1, 0, DEFAULT_TTL_SECS), NOW)
            .expect("first");
        let err = small
            .store(&envelope(1, 1, DEFAULT_TTL_SECS), NOW)
            .expect_err("bytes");
        assert_eq!(err.reject(), MailboxReject::MailboxByteQuota);
    }

    #[test]
    fn the_sweep_drops_expired_envelopes_and_fetch_hides_them() {
        let (_d, store) = open(ReplicaLimits::default());
        store.store(&envelope(1, 0, 60), NOW).expect("short");
        store
            .store(&envelope(1, 1, DEFAULT_TTL_SECS), NOW)
            .expect("long");
        assert_eq!(
            store
                .fetch(&[1; 32], None, 10, NOW + 61)
                .expect("fetch")
                .0
                .len(),
            1
        );
        assert_eq!(store.sweep(NOW + 61).expect("sweep"), 1);
        assert_eq!(store.totals().0, 1);
        assert_eq!(store.sweep(NOW + 61).expect("sweep"), 0);
        assert_eq!(
            store
                .sweep(NOW + u64::from(DEFAULT_TTL_SECS))
                .expect("sweep"),
            1
        );
        assert!(store.mailboxes().is_empty());
    }

    #[test]
    fn the_rate_limiter_refills_and_is_per_key() {
        let mut rl = RateLimiter::new(60, 3);
        let t = Instant::now();
        assert!((0..3).all(|_| rl.check(&"a", t)));
        assert!(!rl.check(&"a", t));
        assert!(rl.check(&"b", t), "another peer is not affected");
        assert!(!rl.check(&"a", t + Duration::from_millis(500)));
        assert!(rl.check(&"a", t + Duration::from_millis(1_100)));
    }
}
