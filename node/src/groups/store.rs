//! The group store: every group this home belongs to, its sender and receiver chains, the
//! envelopes it has processed, its own envelopes still to be placed in the group mailbox, the
//! group control messages received over 1:1 and the invites waiting for the user, in the RocksDB
//! column family `groups`. See `docs/architecture.md`, "Groups".
//!
//! ```text
//! key                                        value
//! `g` ‖ group id (32)                        GroupRecord  (state, group secrets, status)
//! `c` ‖ group id (32)                        OwnChain     (our sender chain and its epoch)
//! `h` ‖ group id (32) ‖ member (32)          key id (16) of our chain last handed to them
//! `r` ‖ group id (32) ‖ key id (16)          ReceiverChain (a member's chain, as we receive)
//! `e` ‖ group id (32) ‖ envelope id (32)     SeenEnvelope (processed; how it first came)
//! `o` ‖ group id (32) ‖ envelope id (32)     PendingStore (our envelope, not yet on the mailbox)
//! `i` ‖ time ms (u64 BE) ‖ random (8)        InboxItem    (group control from a 1:1 sender)
//! `v` ‖ invite code (8)                      PendingInvite
//! ```
//!
//! Values are `wire`-encoded under stated limits; a damaged value reads as
//! [`StorageError::Corrupt`]. Writes go through [`Storage::commit_group`] (one batch, together
//! with a received message when there is one, durable on return). The store is synchronous: the
//! group service calls it on `spawn_blocking`.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use meshchat_protocol::{
    group::{
        GroupControl, GroupInvite, GroupState, ReceiverChain, SenderChain, MAX_GROUP_CONTROL_BYTES,
        MAX_GROUP_STATE_BYTES, MAX_INVITE_BYTES, MAX_SENDER_CHAIN_BYTES,
    },
    impl_wire, GroupId, PublicIdentity, Wire,
};
use rand::{rngs::OsRng, RngCore};
use rocksdb::{Direction as IterDirection, IteratorMode};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::{
    error::NodeError,
    storage::{now_ms, Storage, StorageError, StoredMessage, MAX_STORED_ENVELOPE_BYTES},
};

/// Group secrets kept per group (the newest; older mailboxes are still read with them).
pub(crate) const MAX_SECRETS: usize = 8;
/// Group control messages waiting in the inbox; more are dropped (logged).
pub(crate) const MAX_INBOX: usize = 4_096;
/// Invites waiting for the user; more are dropped (the oldest first).
pub(crate) const MAX_PENDING_INVITES: usize = 256;
/// Decoded group records kept in memory (the cache is emptied when it would grow past it).
const MAX_CACHED_RECORDS: usize = 1_024;

const KIND_GROUP: u8 = b'g';
const KIND_CHAIN: u8 = b'c';
const KIND_HANDED: u8 = b'h';
const KIND_RECEIVER: u8 = b'r';
const KIND_SEEN: u8 = b'e';
const KIND_PENDING: u8 = b'o';
const KIND_INBOX: u8 = b'i';
const KIND_INVITE: u8 = b'v';

/// Whether we are in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Membership {
    /// A member.
    Active,
    /// We left.
    Left,
    /// An admin removed us.
    Removed,
}

/// A group secret and the membership epoch it belongs to.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GroupSecret {
    pub(crate) epoch: u64,
    pub(crate) secret: [u8; 32],
}

impl std::fmt::Debug for GroupSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupSecret")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// One group, as this home knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GroupRecord {
    pub(crate) state: GroupState,
    /// Oldest first; the last one is current (group mail is stored under it).
    pub(crate) secrets: Vec<GroupSecret>,
    pub(crate) membership: Membership,
    pub(crate) joined_at_ms: u64,
    /// Unix seconds of the start of the last mailbox collection that reached a replica.
    pub(crate) last_collect: Option<u64>,
}
impl_wire!(
    GroupRecord,
    MAX_GROUP_STATE_BYTES + 8 + MAX_SECRETS * (8 + 32) + 4 + 8 + 9 + 64
);

impl GroupRecord {
    /// The current group secret.
    pub(crate) fn secret(&self) -> Option<&[u8; 32]> {
        self.secrets.last().map(|s| &s.secret)
    }

    /// Add a secret for `epoch` (kept sorted by epoch; at most [`MAX_SECRETS`]). Returns false
    /// if it was known.
    pub(crate) fn add_secret(&mut self, epoch: u64, secret: [u8; 32]) -> bool {
        if self.secrets.iter().any(|s| s.secret == secret) {
            return false;
        }
        self.secrets.push(GroupSecret { epoch, secret });
        // Equal epochs (two removals at once): a fixed order every member agrees on.
        self.secrets
            .sort_by(|a, b| a.epoch.cmp(&b.epoch).then(a.secret.cmp(&b.secret)));
        let excess = self.secrets.len().saturating_sub(MAX_SECRETS);
        self.secrets.drain(..excess);
        true
    }
}

/// Our sender chain in a group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OwnChain {
    pub(crate) chain: SenderChain,
    /// The membership epoch it was started in.
    pub(crate) epoch: u64,
}
impl_wire!(OwnChain, MAX_SENDER_CHAIN_BYTES + 16);

/// How an envelope first reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Via {
    /// Gossipsub: a later copy over gossipsub (past its duplicate window) is a replay.
    Gossip,
    /// The group mailbox: the author may still publish it to us once (it was kept until a
    /// member subscribed), so a later gossip copy is ignored, not punished.
    Other,
    /// We sent it.
    Own,
}

/// An envelope processed (or sent) in a group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SeenEnvelope {
    pub(crate) via: Via,
    pub(crate) at_ms: u64,
}
impl_wire!(SeenEnvelope, 32);

/// One of our envelopes not yet stored on enough group-mailbox replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PendingStore {
    pub(crate) envelope: Vec<u8>,
    pub(crate) attempts: u32,
    pub(crate) next_attempt_ms: u64,
    /// Our message it carries (its status follows), if a text.
    pub(crate) message_id: Option<[u8; 16]>,
}
impl_wire!(PendingStore, MAX_STORED_ENVELOPE_BYTES + 64);

/// A group control message received over 1:1, waiting to be applied (some wait for an op or a
/// join first).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InboxItem {
    pub(crate) sender: PublicIdentity,
    pub(crate) control: Vec<u8>,
    pub(crate) received_at_ms: u64,
}
impl_wire!(InboxItem, MAX_GROUP_CONTROL_BYTES + 64);

/// An invite the user has not answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PendingInvite {
    pub(crate) invite: Vec<u8>,
    pub(crate) from: PublicIdentity,
    pub(crate) received_at_ms: u64,
}
impl_wire!(PendingInvite, MAX_INVITE_BYTES + 64);

/// Keys and values of a scan.
type Entries = Vec<(Vec<u8>, Vec<u8>)>;

fn key(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(kind);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

pub(crate) fn group_key(g: &GroupId) -> Vec<u8> {
    key(KIND_GROUP, &[&g.0])
}
pub(crate) fn chain_key(g: &GroupId) -> Vec<u8> {
    key(KIND_CHAIN, &[&g.0])
}
pub(crate) fn handed_key(g: &GroupId, member: &PublicIdentity) -> Vec<u8> {
    key(KIND_HANDED, &[&g.0, member.as_bytes()])
}
pub(crate) fn receiver_key(g: &GroupId, key_id: &[u8; 16]) -> Vec<u8> {
    key(KIND_RECEIVER, &[&g.0, key_id])
}
pub(crate) fn seen_key(g: &GroupId, envelope_id: &[u8; 32]) -> Vec<u8> {
    key(KIND_SEEN, &[&g.0, envelope_id])
}
pub(crate) fn pending_key(g: &GroupId, envelope_id: &[u8; 32]) -> Vec<u8> {
    key(KIND_PENDING, &[&g.0, envelope_id])
}
pub(crate) fn invite_key(code: &[u8; 8]) -> Vec<u8> {
    key(KIND_INVITE, &[code])
}

/// An invite code (16 hex digits) as bytes.
pub(crate) fn code_bytes(code: &str) -> Option<[u8; 8]> {
    let bytes = hex::decode(code.trim()).ok()?;
    bytes.try_into().ok()
}

fn corrupt(what: &'static str) -> impl FnOnce(meshchat_protocol::WireError) -> StorageError {
    move |e| StorageError::Corrupt {
        what,
        detail: e.to_string(),
    }
}

fn encode<T: Wire>(what: &'static str, value: &T) -> Result<Vec<u8>, NodeError> {
    value
        .to_wire()
        .map_err(|source| NodeError::Wire { what, source })
}

/// Writes that belong together, committed with [`GroupStore::commit`].
#[derive(Debug, Default)]
pub(crate) struct Batch {
    puts: Vec<(Vec<u8>, Vec<u8>)>,
    deletes: Vec<Vec<u8>>,
    /// Group records written, to cache once committed: (key, bytes, record).
    records: Vec<(Vec<u8>, Arc<[u8]>, GroupRecord)>,
}

impl Batch {
    pub(crate) fn put<T: Wire>(
        &mut self,
        key: Vec<u8>,
        what: &'static str,
        value: &T,
    ) -> Result<(), NodeError> {
        self.puts.push((key, encode(what, value)?));
        Ok(())
    }

    /// Write a group record (under its key), and cache it decoded once committed.
    pub(crate) fn put_group(&mut self, rec: &GroupRecord) -> Result<(), NodeError> {
        let key = group_key(&rec.state.id());
        let bytes = encode("group record", rec)?;
        self.records
            .push((key.clone(), Arc::from(bytes.as_slice()), rec.clone()));
        self.puts.push((key, bytes));
        Ok(())
    }

    pub(crate) fn put_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.puts.push((key, value));
    }

    pub(crate) fn delete(&mut self, key: Vec<u8>) {
        self.deletes.push(key);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

/// Decoded group records by key, with the bytes they were decoded from.
type RecordCache = HashMap<Vec<u8>, (Arc<[u8]>, GroupRecord)>;

/// The group column family (see the module doc). Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct GroupStore {
    storage: Storage,
    inbox_len: Arc<AtomicUsize>,
    records: Arc<Mutex<RecordCache>>,
}

impl GroupStore {
    /// Open over `storage`, counting the inbox.
    pub(crate) fn open(storage: Storage) -> Result<Self, NodeError> {
        let store = Self {
            storage,
            inbox_len: Arc::new(AtomicUsize::new(0)),
            records: Arc::new(Mutex::new(HashMap::new())),
        };
        let n = store.scan(&[KIND_INBOX])?.len();
        store.inbox_len.store(n, Ordering::Relaxed);
        Ok(store)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let (db, cf) = self.storage.group_cf();
        db.get_cf(cf, key).map_err(|source| StorageError::Db {
            op: "reading group state",
            source,
        })
    }

    fn get_wire<T: Wire>(&self, key: &[u8], what: &'static str) -> Result<Option<T>, NodeError> {
        match self.get(key)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(T::from_wire(&bytes).map_err(corrupt(what))?)),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, RecordCache> {
        // A map of decoded values, consistent after any panic.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, key: Vec<u8>, bytes: Arc<[u8]>, rec: GroupRecord) {
        let mut cache = self.cache();
        if cache.len() >= MAX_CACHED_RECORDS && !cache.contains_key(&key) {
            cache.clear();
        }
        cache.insert(key, (bytes, rec));
    }

    /// The group record stored as `bytes` under `key`: the cached one if it was decoded from
    /// the same bytes, else decoded (and cached).
    fn decode_record(&self, key: &[u8], bytes: &[u8]) -> Result<GroupRecord, NodeError> {
        if let Some((cached, rec)) = self.cache().get(key) {
            if **cached == *bytes {
                return Ok(rec.clone());
            }
        }
        let rec = GroupRecord::from_wire(bytes).map_err(corrupt("group record"))?;
        self.remember(key.to_vec(), Arc::from(bytes), rec.clone());
        Ok(rec)
    }

    /// Every (key, value) whose key starts with `prefix`.
    fn scan(&self, prefix: &[u8]) -> Result<Entries, StorageError> {
        let (db, cf) = self.storage.group_cf();
        let mut out = Vec::new();
        for item in db.iterator_cf(cf, IteratorMode::From(prefix, IterDirection::Forward)) {
            let (k, v) = item.map_err(|source| StorageError::Db {
                op: "listing group state",
                source,
            })?;
            if !k.starts_with(prefix) {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Commit `batch` and, if given, a group message, in one batch (durable on return).
    /// Returns the message's arrival index if it was stored (not a duplicate).
    pub(crate) fn commit(
        &self,
        batch: Batch,
        message: Option<&StoredMessage>,
    ) -> Result<Option<u64>, NodeError> {
        if batch.is_empty() && message.is_none() {
            return Ok(None);
        }
        let index = self
            .storage
            .commit_group(&batch.puts, &batch.deletes, message)?;
        for (key, bytes, rec) in batch.records {
            self.remember(key, bytes, rec);
        }
        Ok(index)
    }

    // --- groups --------------------------------------------------------------------------

    pub(crate) fn group(&self, g: &GroupId) -> Result<Option<GroupRecord>, NodeError> {
        let key = group_key(g);
        match self.get(&key)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(self.decode_record(&key, &bytes)?)),
        }
    }

    /// Every group this home knows (members or not any more).
    pub(crate) fn groups(&self) -> Result<Vec<GroupRecord>, NodeError> {
        self.scan(&[KIND_GROUP])?
            .into_iter()
            .map(|(k, v)| self.decode_record(&k, &v))
            .collect()
    }

    pub(crate) fn own_chain(&self, g: &GroupId) -> Result<Option<OwnChain>, NodeError> {
        self.get_wire(&chain_key(g), "sender chain")
    }

    /// The key id of our chain last handed to `member`.
    pub(crate) fn handed(
        &self,
        g: &GroupId,
        member: &PublicIdentity,
    ) -> Result<Option<[u8; 16]>, NodeError> {
        Ok(self
            .get(&handed_key(g, member))?
            .and_then(|v| <[u8; 16]>::try_from(v.as_slice()).ok()))
    }

    pub(crate) fn receiver_chain(
        &self,
        g: &GroupId,
        key_id: &[u8; 16],
    ) -> Result<Option<ReceiverChain>, NodeError> {
        self.get_wire(&receiver_key(g, key_id), "receiver chain")
    }

    pub(crate) fn seen(
        &self,
        g: &GroupId,
        envelope_id: &[u8; 32],
    ) -> Result<Option<SeenEnvelope>, NodeError> {
        self.get_wire(&seen_key(g, envelope_id), "seen envelope")
    }

    /// Our envelopes not yet on the group mailbox, with their keys.
    pub(crate) fn pending_stores(&self) -> Result<Vec<(Vec<u8>, PendingStore)>, NodeError> {
        self.scan(&[KIND_PENDING])?
            .into_iter()
            .map(|(k, v)| {
                let p = PendingStore::from_wire(&v).map_err(corrupt("pending group envelope"))?;
                Ok((k, p))
            })
            .collect()
    }

    /// Seen marks older than `before_ms`, to delete (envelopes that old have expired).
    pub(crate) fn stale_seen(&self, before_ms: u64) -> Result<Vec<Vec<u8>>, NodeError> {
        Ok(self
            .scan(&[KIND_SEEN])?
            .into_iter()
            .filter(|(_, v)| {
                SeenEnvelope::from_wire(v)
                    .map(|s| s.at_ms < before_ms)
                    .unwrap_or(true)
            })
            .map(|(k, _)| k)
            .collect())
    }

    // --- the control inbox ---------------------------------------------------------------

    /// The inbox, oldest first.
    pub(crate) fn inbox(&self) -> Result<Vec<(Vec<u8>, InboxItem)>, NodeError> {
        let items = self.scan(&[KIND_INBOX])?;
        self.inbox_len.store(items.len(), Ordering::Relaxed);
        items
            .into_iter()
            .map(|(k, v)| {
                let item = InboxItem::from_wire(&v).map_err(corrupt("group inbox item"))?;
                Ok((k, item))
            })
            .collect()
    }

    /// Note that `n` inbox items were removed (by a committed batch).
    pub(crate) fn inbox_removed(&self, n: usize) {
        let _ = self
            .inbox_len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    /// Append a control message to the inbox (durable on return). `Ok(false)`: the inbox is
    /// full and the message was dropped.
    fn push_inbox(
        &self,
        sender: &PublicIdentity,
        control: &GroupControl,
    ) -> Result<bool, NodeError> {
        if self.inbox_len.load(Ordering::Relaxed) >= MAX_INBOX {
            return Ok(false);
        }
        let now = now_ms();
        let item = InboxItem {
            sender: *sender,
            control: encode("group control", control)?,
            received_at_ms: now,
        };
        let mut k = Vec::with_capacity(17);
        k.push(KIND_INBOX);
        k.extend_from_slice(&now.to_be_bytes());
        k.extend_from_slice(&OsRng.next_u64().to_be_bytes());
        let mut batch = Batch::default();
        batch.put(k, "group inbox item", &item)?;
        self.commit(batch, None)?;
        self.inbox_len.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    // --- invites -------------------------------------------------------------------------

    pub(crate) fn invites(&self) -> Result<Vec<(Vec<u8>, PendingInvite)>, NodeError> {
        self.scan(&[KIND_INVITE])?
            .into_iter()
            .map(|(k, v)| {
                let p = PendingInvite::from_wire(&v).map_err(corrupt("pending invite"))?;
                Ok((k, p))
            })
            .collect()
    }

    pub(crate) fn invite(&self, code: &[u8; 8]) -> Result<Option<PendingInvite>, NodeError> {
        self.get_wire(&invite_key(code), "pending invite")
    }
}

/// Decode a stored invite.
pub(crate) fn decode_invite(p: &PendingInvite) -> Result<GroupInvite, NodeError> {
    GroupInvite::from_wire(&p.invite)
        .map_err(corrupt("pending invite"))
        .map_err(NodeError::from)
}

/// Where the 1:1 receive path (`crate::messaging`) hands group control messages: they are
/// written to the group inbox before the envelope carrying them is committed and acknowledged,
/// so none is lost in a crash (a repeat is harmless: applying one is idempotent).
#[derive(Debug, Clone)]
pub(crate) struct ControlSink {
    store: GroupStore,
    kick: Arc<Notify>,
}

impl ControlSink {
    pub(crate) fn new(store: GroupStore, kick: Arc<Notify>) -> Self {
        Self { store, kick }
    }

    /// Take a control message from `sender` (synchronous: call on a blocking thread).
    /// `Ok(false)`: it breaks a structural limit (the envelope is refused as malformed).
    pub(crate) fn accept(
        &self,
        sender: &PublicIdentity,
        control: GroupControl,
    ) -> Result<bool, NodeError> {
        if let Err(e) = control.validate() {
            tracing::debug!(sender = %sender.user_id(), error = %e, "malformed group control");
            return Ok(false);
        }
        if !self.store.push_inbox(sender, &control)? {
            tracing::warn!(sender = %sender.user_id(), "group inbox full: dropping a group control message");
        }
        self.kick.notify_one();
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshchat_protocol::Identity;

    fn record() -> GroupRecord {
        let creator = Identity::from_seed(&[1; 32]);
        let (state, secret, _) = GroupState::create(&creator, "g", 0, &mut OsRng).expect("a group");
        let mut rec = GroupRecord {
            state,
            secrets: Vec::new(),
            membership: Membership::Active,
            joined_at_ms: 0,
            last_collect: None,
        };
        assert!(rec.add_secret(0, secret));
        rec
    }

    #[test]
    fn the_newest_secret_is_current_and_at_most_eight_are_kept() {
        let mut rec = record();
        assert!(
            !rec.add_secret(0, rec.secrets[0].secret),
            "a known secret is not added"
        );
        for epoch in 1..=10u8 {
            assert!(rec.add_secret(u64::from(epoch), [epoch; 32]));
        }
        assert_eq!(rec.secrets.len(), MAX_SECRETS);
        assert_eq!(rec.secret(), Some(&[10; 32]));
        assert_eq!(rec.secrets[0].epoch, 3, "the oldest went first");
        // Two secrets for one epoch (two removals at once): the same order everywhere.
        rec.add_secret(10, [0xff; 32]);
        assert_eq!(rec.secret(), Some(&[0xff; 32]));
    }

    #[test]
    fn a_group_record_round_trips_and_a_damaged_one_is_refused() {
        let rec = record();
        let bytes = rec.to_wire().expect("encodes");
        let back = GroupRecord::from_wire(&bytes).expect("decodes");
        assert_eq!(back.state.id(), rec.state.id());
        assert_eq!(back.secret(), rec.secret());
        assert!(GroupRecord::from_wire(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn a_cached_record_follows_every_write_and_a_damaged_one_is_still_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = GroupStore::open(Storage::open(dir.path()).expect("open")).expect("store");
        let mut rec = record();
        let gid = rec.state.id();
        let mut batch = Batch::default();
        batch.put_group(&rec).expect("encodes");
        store.commit(batch, None).expect("commit");
        assert_eq!(
            store.group(&gid).expect("read").map(|r| r.secrets),
            Some(rec.secrets.clone())
        );
        // A write through the typed path is what the next read returns.
        rec.add_secret(1, [7; 32]);
        let mut batch = Batch::default();
        batch.put_group(&rec).expect("encodes");
        store.commit(batch, None).expect("commit");
        assert_eq!(
            store
                .group(&gid)
                .expect("read")
                .and_then(|r| r.secret().copied()),
            Some([7; 32])
        );
        // So is one written as raw bytes (decoded again, since the bytes differ).
        rec.add_secret(2, [8; 32]);
        let mut batch = Batch::default();
        batch.put_raw(group_key(&gid), rec.to_wire().expect("encodes"));
        store.commit(batch, None).expect("commit");
        assert_eq!(store.groups().expect("list")[0].secret(), Some(&[8; 32]));
        // Damaged bytes are not served from the cache.
        let mut bytes = rec.to_wire().expect("encodes");
        bytes.truncate(bytes.len() - 1);
        let mut batch = Batch::default();
        batch.put_raw(group_key(&gid), bytes);
        store.commit(batch, None).expect("commit");
        assert!(store.group(&gid).is_err());
    }

    #[test]
    fn invite_codes_are_sixteen_hex_digits() {
        assert_eq!(
            code_bytes("00112233445566ff"),
            Some([0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0xff])
        );
        assert_eq!(
            code_bytes(" 00112233445566FF "),
            Some([0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0xff])
        );
        assert_eq!(code_bytes("0011223344556"), None);
        assert_eq!(code_bytes("zz112233445566ff"), None);
    }
}
