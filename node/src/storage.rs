//! Persistent state of one home: identity, contacts, sessions, messages, outbox, own DHT records,
//! replay cache, processed-envelope ids and config, in one RocksDB at `HOME/db`. See
//! `docs/architecture.md`, section "Storage".
//!
//! # Guarantees
//! - Everything that belongs together is written in one `WriteBatch`: an outgoing message, its
//!   ratchet state and its outbox entry ([`Storage::commit_outgoing`]); an incoming envelope's
//!   session, prekey and replay-cache changes, its message and its "seen" mark
//!   ([`Storage::commit_incoming`]). A crash leaves either all of it or none of it.
//! - Writes that a user was told about or that were acknowledged to a peer are synced to disk
//!   before the call that makes them returns: a message `send` reported as sent survives
//!   `kill -9` and a power failure.
//! - Group commit: the hot commits ([`Storage::commit_outgoing`], [`Storage::commit_incoming`],
//!   status changes) write their batch without waiting for the disk, release the write lock,
//!   and then wait until one `fsync` of the write-ahead log covers their batch
//!   ([`Storage::wait_durable`]). One caller at a time runs that `fsync` for every batch
//!   written before it started, so concurrent commits share one sync instead of queueing for
//!   one each. Between the write and the sync a batch is visible to readers of this process;
//!   whoever tells a peer or the user about state it read must first wait for
//!   [`Storage::sync_barrier`] (an acknowledgement of a duplicate, an outbox resend).
//! - The one deliberate exception: the `delivered` mark ([`Storage::mark_delivered`]) is not
//!   waited for. Losing it in a power failure only brings back the outbox entry it deleted; the
//!   entry is resent, the recipient answers the duplicate with an acknowledgement, and the mark
//!   is written again. Any later synced write (RocksDB's log is sequential) makes it durable too.
//! - Every value this module owns is encoded with the protocol's `wire` format under a stated
//!   limit; a damaged value on disk is a typed [`StorageError::Corrupt`], never a panic.
//!   Protocol-owned values (ratchet sessions, prekey secrets, the replay cache, envelopes) are
//!   stored as the wire bytes the caller hands in, and decoded (with their own limits) by it.
//! - RocksDB's `LOCK` file allows one process per home; a second one gets
//!   [`StorageError::HomeInUse`] naming the holder's pid when it is known.
//!
//! All methods are synchronous; async callers use `tokio::task::spawn_blocking`.
//!
//! # Layout
//! | column family | key | value |
//! | --- | --- | --- |
//! | `identity` | `seed` / `node_key` / `prekeys` | [`StoredIdentity`] / `StoredNodeKey` / caller bytes |
//! | `contacts` | `n` ‖ lower-cased name | [`Contact`] |
//! | `contacts` | `i` ‖ identity (32) | lower-cased name (UTF-8) |
//! | `sessions` | identity (32) | caller bytes (a `SessionRecord`) |
//! | `messages` | `M` ‖ peer (32) ‖ direction (1) ‖ id (16) | `MessageRecord` (arrival index + [`StoredMessage`]) |
//! | `messages` | `A` ‖ arrival index (u64 BE) | the `M` key |
//! | `messages` | `C` ‖ peer (32) ‖ direction (1) ‖ seq (u64 BE) ‖ id (16) | empty (conversation order; not for group messages) |
//! | `messages` | `O` ‖ id (16) | peer (32) of our outgoing message with that id |
//! | `messages` | `S` ‖ peer (32) | next outgoing seq (`StoredCounter`) |
//! | `outbox` | message id (16) | [`OutboxEntry`] |
//! | `records` | `r` ‖ DHT key | record value (caller bytes) |
//! | `records` | `q` ‖ name | last sequence number handed out (`StoredCounter`) |
//! | `replay` | `cache` | caller bytes (a `ReplayCache`) |
//! | `seen` | envelope id (32) | time first seen, ms (`StoredCounter`) |
//! | `meta` | `arrival_next` / `bootstrap` | `StoredCounter` / `StoredBootstrap` |
//! | `groups` | see `crate::groups::store` | group state, chains, invites |
//!
//! Direction bytes: `0` incoming, `1` outgoing.

use std::{
    collections::HashSet,
    fmt, fs,
    io::ErrorKind as IoErrorKind,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use meshchat_protocol::{impl_wire, Identity, PublicIdentity, UserId, Wire, WireError};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, Direction as IterDirection,
    IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

/// Column families, in the order they are opened.
const CF_IDENTITY: &str = "identity";
const CF_CONTACTS: &str = "contacts";
const CF_SESSIONS: &str = "sessions";
const CF_MESSAGES: &str = "messages";
const CF_OUTBOX: &str = "outbox";
const CF_RECORDS: &str = "records";
const CF_REPLAY: &str = "replay";
const CF_SEEN: &str = "seen";
const CF_META: &str = "meta";
/// Envelopes this node keeps as a mailbox replica for others (`crate::mailbox::store`).
pub(crate) const CF_REPLICAS: &str = "replicas";
/// Group state, sender and receiver chains, invites (`crate::groups::store`).
pub(crate) const CF_GROUPS: &str = "groups";
const COLUMN_FAMILIES: [&str; 11] = [
    CF_IDENTITY,
    CF_CONTACTS,
    CF_SESSIONS,
    CF_MESSAGES,
    CF_OUTBOX,
    CF_RECORDS,
    CF_REPLAY,
    CF_SEEN,
    CF_META,
    CF_REPLICAS,
    CF_GROUPS,
];

const KEY_SEED: &[u8] = b"seed";
const KEY_NODE_KEY: &[u8] = b"node_key";
const KEY_PREKEYS: &[u8] = b"prekeys";
const KEY_REPLAY: &[u8] = b"cache";
const KEY_ARRIVAL_NEXT: &[u8] = b"arrival_next";
const KEY_BOOTSTRAP: &[u8] = b"bootstrap";

/// Longest contact name, in characters.
pub const MAX_CONTACT_NAME_CHARS: usize = 64;
/// Largest message body stored, in bytes (the protocol's text limit is below it).
pub const MAX_STORED_BODY_BYTES: usize = 64 * 1024;
/// Largest envelope kept in the outbox, in bytes.
pub const MAX_STORED_ENVELOPE_BYTES: usize = 128 * 1024;
// Storage must hold whatever the protocol produces.
const _: () = assert!(MAX_STORED_BODY_BYTES >= meshchat_protocol::MAX_TEXT_BYTES);
const _: () = assert!(MAX_STORED_ENVELOPE_BYTES >= meshchat_protocol::envelope::MAX_ENVELOPE_BYTES);
/// Largest protocol-owned blob (session record, prekey secrets, replay cache) stored, in bytes.
pub const MAX_STORED_BLOB_BYTES: usize = 1024 * 1024;
/// Largest own DHT record (key or value) stored, in bytes.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Bootstrap addresses remembered (the newest are kept).
pub const MAX_BOOTSTRAP_ADDRS: usize = 32;
/// Longest bootstrap address remembered, in bytes.
pub const MAX_BOOTSTRAP_ADDR_BYTES: usize = 512;

/// The name of the file, beside `db/`, holding the pid of the process that has the home open.
const PID_FILE: &str = "meshchat.pid";

/// All memtables of all column families together; above it RocksDB flushes the largest.
/// (Unbounded, each of the dozen column families could hold two 64 MiB memtables.)
const MEMTABLE_BUDGET_BYTES: usize = 16 * 1024 * 1024;
/// One column family's memtable size before it is flushed.
const MEMTABLE_BYTES: usize = 4 * 1024 * 1024;
/// The block cache, shared by every column family (RocksDB's default is 32 MiB each).
const BLOCK_CACHE_BYTES: usize = 4 * 1024 * 1024;
/// Largest buffer of a file being written (the write-ahead log), instead of 1 MiB.
const WRITE_BUFFER_BYTES: u64 = 256 * 1024;

/// Database-wide memory bounds (`docs/performance.md`, "Memory").
fn tune_memory(opts: &mut Options) {
    opts.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
    opts.set_writable_file_max_buffer_size(WRITE_BUFFER_BYTES);
    // No periodic statistics dumps into the info log, nor their in-memory history.
    opts.set_stats_dump_period_sec(0);
    opts.set_stats_persist_period_sec(0);
}

/// The options of every column family: small memtables and the one shared block cache.
fn cf_options(cache: &Cache) -> Options {
    let mut opts = Options::default();
    opts.set_write_buffer_size(MEMTABLE_BYTES);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    opts.set_block_based_table_factory(&table);
    opts
}

/// What went wrong in storage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// Another process (or another `Storage` in this process) has the home open.
    #[error("this home ({}) is in use by another meshchat process{}", home.display(), pid_hint(*pid))]
    HomeInUse {
        /// The home directory.
        home: PathBuf,
        /// The pid recorded by the process holding it, if known.
        pid: Option<u32>,
    },
    /// `init` has not been run in this home.
    #[error("no identity in {}; run `meshchat init` first", home.display())]
    NoIdentity {
        /// The home directory.
        home: PathBuf,
    },
    /// The home already holds an identity; it is never overwritten.
    #[error("{} already holds the identity {user_id}; refusing to overwrite it", home.display())]
    IdentityExists {
        /// The home directory.
        home: PathBuf,
        /// The identity that is there.
        user_id: String,
    },
    /// The home directory could not be created or read.
    #[error("cannot use {}: {source}", path.display())]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// RocksDB failed.
    #[error("database error while {op}: {source}")]
    Db {
        /// What storage was doing.
        op: &'static str,
        /// RocksDB's error.
        #[source]
        source: rocksdb::Error,
    },
    /// A stored value does not decode: the disk or the database is damaged.
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A value could not be encoded for storage (it exceeds its limit).
    #[error("cannot store {what}: {source}")]
    Encode {
        /// Which value.
        what: &'static str,
        /// The wire error.
        #[source]
        source: WireError,
    },
    /// A value is larger than storage accepts.
    #[error("{what} is too large: {len} bytes, the limit is {limit}")]
    TooLarge {
        /// Which value.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A contact name is not acceptable.
    #[error("invalid contact name {name:?}: {reason}")]
    InvalidName {
        /// The name given (possibly shortened).
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A contact with this name exists already.
    #[error("a contact named `{name}` already exists")]
    ContactNameTaken {
        /// The existing contact's name.
        name: String,
    },
    /// This identity is already a contact (under `name`).
    #[error("this user ID is already a contact, named `{name}`")]
    ContactExists {
        /// The existing contact's name.
        name: String,
    },
    /// No contact has this name.
    #[error("no contact named `{name}` (see `meshchat contact list`)")]
    UnknownContact {
        /// The name asked for.
        name: String,
    },
    /// The user tried to add their own identity as a contact.
    #[error("that is your own user ID; a contact must be someone else")]
    SelfContact,
    /// No message with this id.
    #[error("no outgoing message with id {id}")]
    UnknownMessage {
        /// The id, hex.
        id: String,
    },
    /// The caller passed values that contradict each other (a bug in the caller).
    #[error("inconsistent arguments: {0}")]
    Inconsistent(&'static str),
    /// A sync of the write-ahead log did not finish (its task was cancelled or panicked, or
    /// the storage is closing): the write is not known to be durable.
    #[error("the sync of the write-ahead log was interrupted")]
    SyncInterrupted,
}

fn pid_hint(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!(" (pid {pid})"),
        None => String::new(),
    }
}

/// The few things a caller of storage acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageErrorKind {
    /// The home is locked by another process.
    HomeInUse,
    /// No identity yet.
    NoIdentity,
    /// The thing exists already (identity, contact).
    AlreadyExists,
    /// The thing asked for does not exist.
    NotFound,
    /// The caller's input is unacceptable.
    InvalidInput,
    /// Stored data is damaged.
    Corrupt,
    /// Anything else (I/O, RocksDB).
    Internal,
}

impl StorageError {
    /// The category of this error.
    pub fn kind(&self) -> StorageErrorKind {
        match self {
            Self::HomeInUse { .. } => StorageErrorKind::HomeInUse,
            Self::NoIdentity { .. } => StorageErrorKind::NoIdentity,
            Self::IdentityExists { .. }
            | Self::ContactNameTaken { .. }
            | Self::ContactExists { .. } => StorageErrorKind::AlreadyExists,
            Self::UnknownContact { .. } | Self::UnknownMessage { .. } => StorageErrorKind::NotFound,
            Self::InvalidName { .. }
            | Self::TooLarge { .. }
            | Self::SelfContact
            | Self::Encode { .. }
            | Self::Inconsistent(_) => StorageErrorKind::InvalidInput,
            Self::Corrupt { .. } => StorageErrorKind::Corrupt,
            Self::Io { .. } | Self::Db { .. } | Self::SyncInterrupted => StorageErrorKind::Internal,
        }
    }
}

fn db_err(op: &'static str) -> impl FnOnce(rocksdb::Error) -> StorageError {
    move |source| StorageError::Db { op, source }
}

fn corrupt(what: &'static str) -> impl FnOnce(WireError) -> StorageError {
    move |e| StorageError::Corrupt {
        what,
        detail: e.to_string(),
    }
}

fn encode<T: Wire>(what: &'static str, value: &T) -> Result<Vec<u8>, StorageError> {
    value
        .to_wire()
        .map_err(|source| StorageError::Encode { what, source })
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Stored types
// ---------------------------------------------------------------------------------------------

/// The identity seed as stored.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredIdentity {
    /// The Ed25519 seed (secret).
    pub seed: [u8; 32],
    /// When the identity was saved in this home, ms.
    pub saved_at_ms: u64,
}
impl_wire!(StoredIdentity, 64);

impl fmt::Debug for StoredIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredIdentity")
            .field("saved_at_ms", &self.saved_at_ms)
            .finish_non_exhaustive()
    }
}

/// The libp2p keypair of this home (protobuf encoding).
#[derive(Clone, Serialize, Deserialize)]
struct StoredNodeKey {
    protobuf: Vec<u8>,
}
impl_wire!(StoredNodeKey, 1024);

/// A counter or timestamp.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct StoredCounter {
    value: u64,
}
impl_wire!(StoredCounter, 16);

/// Remembered bootstrap addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredBootstrap {
    addrs: Vec<String>,
}
impl_wire!(
    StoredBootstrap,
    16 + MAX_BOOTSTRAP_ADDRS * (8 + MAX_BOOTSTRAP_ADDR_BYTES)
);

/// A contact: a name the user chose for someone's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// The name as the user typed it (unique, case-insensitively).
    pub name: String,
    /// Their identity.
    pub identity: PublicIdentity,
    /// Whether the user compared safety numbers and confirmed.
    pub verified: bool,
    /// When the contact was added, ms since the epoch.
    pub added_at_ms: u64,
}
impl_wire!(Contact, 512);

/// Which way a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// Received from the peer.
    In,
    /// Sent by us to the peer.
    Out,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Self::In => 0,
            Self::Out => 1,
        }
    }
}

/// The delivery status of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Written to our outbox, not yet anywhere else.
    Queued,
    /// Stored in the recipient's mailbox on `replicas` peers.
    Stored {
        /// How many replicas acknowledged it.
        replicas: u32,
    },
    /// The recipient's node acknowledged it (or, for incoming messages: received).
    Delivered,
    /// The recipient showed it (or, for incoming messages: the user saw it).
    Read,
    /// Given up.
    Failed,
}

impl Status {
    fn rank(self) -> u8 {
        match self {
            Self::Queued => 0,
            Self::Failed => 1,
            Self::Stored { .. } => 2,
            Self::Delivered => 3,
            Self::Read => 4,
        }
    }

    /// Whether moving from `self` to `next` is progress (statuses never go backwards, so a late
    /// "stored" never hides a "delivered").
    pub fn advances_to(self, next: Status) -> bool {
        match (self, next) {
            (Self::Stored { replicas: a }, Self::Stored { replicas: b }) => b > a,
            _ => next.rank() > self.rank(),
        }
    }
}

/// A message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Chosen by the sender, random.
    pub id: [u8; 16],
    /// The other side of the conversation.
    pub peer: PublicIdentity,
    /// In or out.
    pub direction: Direction,
    /// The sender's sequence number in this conversation.
    pub seq: u64,
    /// The sender's clock when it was written, ms.
    pub sent_at_ms: u64,
    /// Our clock when it was stored, ms (for outgoing: equal to `sent_at_ms`).
    pub received_at_ms: u64,
    /// The text.
    pub body: String,
    /// Delivery status.
    pub status: Status,
    /// For a group message, the group's id: `peer` is then its author (ourselves for our own),
    /// and the message is in no 1:1 conversation. `None` for 1:1 messages.
    pub group: Option<[u8; 32]>,
}

/// A message and its arrival index, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MessageRecord {
    index: u64,
    message: StoredMessage,
}
impl_wire!(MessageRecord, MAX_STORED_BODY_BYTES + 256);

/// An envelope waiting to be delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// The message it carries.
    pub message_id: [u8; 16],
    /// The recipient.
    pub peer: PublicIdentity,
    /// The envelope's wire bytes.
    pub envelope: Vec<u8>,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// When to try next, ms since the epoch (0: now).
    pub next_attempt_ms: u64,
}
impl_wire!(OutboxEntry, MAX_STORED_ENVELOPE_BYTES + 256);

/// What [`Storage::commit_incoming`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IncomingOutcome {
    /// New envelope: everything was written (and the message, if any, stored under `index`).
    New {
        /// The arrival index of the stored message, if a message was stored.
        index: Option<u64>,
    },
    /// This envelope was processed before: nothing was changed.
    Duplicate,
    /// New envelope, state written, but its message id was already stored for this peer, so the
    /// message is not stored (or shown) again.
    DuplicateMessage,
}

/// A record this node publishes: (DHT key, value).
pub type OwnRecord = (Vec<u8>, Vec<u8>);

/// Which messages [`Storage::messages`] returns.
#[derive(Debug, Clone, Default)]
pub struct MessageFilter {
    /// Only this conversation (ordered per conversation), or all (ordered by arrival).
    pub peer: Option<PublicIdentity>,
    /// Only messages with an arrival index above this.
    pub after_index: Option<u64>,
    /// Only this direction.
    pub direction: Option<Direction>,
    /// At most this many (None: all).
    pub limit: Option<usize>,
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

const MSG_KEY_LEN: usize = 1 + 32 + 1 + 16;

fn message_key(peer: &PublicIdentity, direction: Direction, id: &[u8; 16]) -> Vec<u8> {
    let mut k = Vec::with_capacity(MSG_KEY_LEN);
    k.push(b'M');
    k.extend_from_slice(peer.as_bytes());
    k.push(direction.byte());
    k.extend_from_slice(id);
    k
}

fn arrival_key(index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'A');
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn conversation_prefix(peer: &PublicIdentity) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 32 + 1 + 8 + 16);
    k.push(b'C');
    k.extend_from_slice(peer.as_bytes());
    k
}

fn conversation_key(m: &StoredMessage) -> Vec<u8> {
    let mut k = conversation_prefix(&m.peer);
    k.push(m.direction.byte());
    k.extend_from_slice(&m.seq.to_be_bytes());
    k.extend_from_slice(&m.id);
    k
}

fn outgoing_id_key(id: &[u8; 16]) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(b'O');
    k.extend_from_slice(id);
    k
}

fn seq_key(peer: &PublicIdentity) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(b'S');
    k.extend_from_slice(peer.as_bytes());
    k
}

fn contact_name_key(name: &str) -> Vec<u8> {
    let mut k = vec![b'n'];
    k.extend_from_slice(name.to_lowercase().as_bytes());
    k
}

fn contact_identity_key(identity: &PublicIdentity) -> Vec<u8> {
    let mut k = vec![b'i'];
    k.extend_from_slice(identity.as_bytes());
    k
}

fn prefixed(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + rest.len());
    k.push(prefix);
    k.extend_from_slice(rest);
    k
}

/// Check a contact name: 1 to 64 characters, no control characters, no surrounding spaces, and
/// not itself a user ID (so that `send TO` is never ambiguous).
pub fn validate_contact_name(name: &str) -> Result<(), StorageError> {
    let shown = || {
        name.chars()
            .take(MAX_CONTACT_NAME_CHARS + 8)
            .collect::<String>()
    };
    let refuse = |reason| {
        Err(StorageError::InvalidName {
            name: shown(),
            reason,
        })
    };
    let chars = name.chars().count();
    if chars == 0 {
        return refuse("a name cannot be empty");
    }
    if chars > MAX_CONTACT_NAME_CHARS {
        return refuse("a name is at most 64 characters");
    }
    if name.chars().any(char::is_control) {
        return refuse("a name cannot contain control characters");
    }
    if name.trim() != name {
        return refuse("a name cannot start or end with spaces");
    }
    if name.parse::<UserId>().is_ok() {
        return refuse("a name cannot be a user ID");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------------------------

struct Inner {
    db: DB,
    home: PathBuf,
    /// Serialises read-check-write sequences (seen check, counters, contact uniqueness).
    write_lock: Mutex<()>,
    /// Group commit: how many batches were written and how many of them are known synced.
    sync: Mutex<SyncState>,
    /// Signalled whenever a sync of the write-ahead log ends.
    synced: Condvar,
    /// The same for async waiters ([`Storage::durable`]): the synced count after each
    /// sync (sent also when a sync failed, so waiters look again).
    synced_tx: tokio::sync::watch::Sender<u64>,
}

/// Where a pending write stands ([`Storage::durability`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// It is on disk.
    Durable,
    /// A sync is running (it may or may not cover the write): wait for its end.
    Syncing,
    /// No sync is running: someone must start one ([`Storage::wait_durable`]).
    Idle,
}

/// Group-commit bookkeeping ([`Storage::wait_durable`]). Batches are numbered in the order their
/// writes returned; a sync that starts after batch `n` returned covers batches `1..=n`.
#[derive(Debug, Default)]
struct SyncState {
    /// Batches written so far.
    written: u64,
    /// Every batch up to this number is on disk.
    synced: u64,
    /// A thread is syncing the write-ahead log right now.
    syncing: bool,
    /// Syncs run so far.
    syncs: u64,
}

/// A batch that is in the database but perhaps not yet on disk: [`Storage::wait_durable`]
/// returns once it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "a pending write is not durable until `Storage::wait_durable` returns"]
pub struct PendingWrite(u64);

/// The RocksDB of one home. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("home", &self.inner.home)
            .finish_non_exhaustive()
    }
}

impl Storage {
    /// Open (creating if needed) the database of `home`. Fails with
    /// [`StorageError::HomeInUse`] if another process, or another `Storage` in this process,
    /// has it open.
    pub fn open(home: &Path) -> Result<Storage, StorageError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StorageError::Io { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(home)
            .map_err(io_err(home))?;
        let db_path = home.join("db");

        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(4);
        opts.set_max_open_files(256);
        opts.set_max_total_wal_size(64 * 1024 * 1024);
        tune_memory(&mut opts);
        let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);

        // Column families created by a later version are opened too (RocksDB requires it).
        let mut names: Vec<String> = COLUMN_FAMILIES.iter().map(|s| (*s).to_owned()).collect();
        if let Ok(existing) = DB::list_cf(&opts, &db_path) {
            for name in existing {
                if name != "default" && !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        let descriptors = names
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options(&cache)));
        let db = DB::open_cf_descriptors(&opts, &db_path, descriptors).map_err(|source| {
            if is_lock_error(&source) {
                StorageError::HomeInUse {
                    home: home.to_path_buf(),
                    pid: read_pid(home),
                }
            } else {
                StorageError::Db {
                    op: "opening the database",
                    source,
                }
            }
        })?;
        // The database holds the identity seed: only the owner may read it, whatever the
        // permissions of the home directory.
        if let Err(e) = fs::set_permissions(&db_path, fs::Permissions::from_mode(0o700)) {
            tracing::warn!(path = %db_path.display(), error = %e, "cannot restrict the database directory");
        }
        // Best effort: lets a second process name us in its HomeInUse error.
        if let Err(e) = fs::write(home.join(PID_FILE), std::process::id().to_string()) {
            tracing::debug!(error = %e, "could not write the pid file");
        }
        Ok(Storage {
            inner: Arc::new(Inner {
                db,
                home: home.to_path_buf(),
                write_lock: Mutex::new(()),
                sync: Mutex::new(SyncState::default()),
                synced: Condvar::new(),
                synced_tx: tokio::sync::watch::Sender::new(0),
            }),
        })
    }

    /// The home directory this storage belongs to.
    pub fn home(&self) -> &Path {
        &self.inner.home
    }

    fn cf(&self, name: &'static str) -> &ColumnFamily {
        self.inner
            .db
            .cf_handle(name)
            .expect("invariant: every column family is created at open")
    }

    /// The database and the mailbox-replica column family (owned by `crate::mailbox::store`).
    pub(crate) fn replica_cf(&self) -> (&DB, &ColumnFamily) {
        (&self.inner.db, self.cf(CF_REPLICAS))
    }

    /// The database and the group column family (owned by `crate::groups::store`; written only
    /// through [`Storage::commit_group`]).
    pub(crate) fn group_cf(&self) -> (&DB, &ColumnFamily) {
        (&self.inner.db, self.cf(CF_GROUPS))
    }

    /// Commit group state (`puts` and `deletes` in the `groups` column family) and, if given, a
    /// group message, in one batch; durable when this returns. Returns the message's arrival
    /// index, or `None` when there is no message or one with its id is stored already for that
    /// peer and direction (it is not stored twice).
    pub(crate) fn commit_group(
        &self,
        puts: &[(Vec<u8>, Vec<u8>)],
        deletes: &[Vec<u8>],
        message: Option<&StoredMessage>,
    ) -> Result<Option<u64>, StorageError> {
        for (_, value) in puts {
            Self::check_blob("group state", value)?;
        }
        if let Some(m) = message {
            if m.group.is_none() {
                return Err(StorageError::Inconsistent(
                    "commit_group needs a group message",
                ));
            }
            Self::check_message(m)?;
        }
        let guard = self.lock();
        let cf = self.cf(CF_GROUPS);
        let mut batch = WriteBatch::default();
        for key in deletes {
            batch.delete_cf(cf, key);
        }
        for (key, value) in puts {
            batch.put_cf(cf, key, value);
        }
        let mut index = None;
        if let Some(m) = message {
            let duplicate = self
                .get(CF_MESSAGES, &message_key(&m.peer, m.direction, &m.id))?
                .is_some();
            if !duplicate {
                index = Some(self.stage_message(&mut batch, m)?);
            }
        }
        let pending = self.write_pending(batch, false, "committing group state")?;
        drop(guard);
        self.wait_durable(pending)?;
        Ok(index)
    }

    /// Commit an outgoing control envelope (no message is shown for it): the new session state,
    /// its outbox entry (retried like a message's) and the index that names `peer` as the
    /// recipient of `message_id`, in one batch; durable when this returns.
    pub(crate) fn commit_outgoing_control(
        &self,
        peer: &PublicIdentity,
        session_bytes: &[u8],
        message_id: &[u8; 16],
        envelope_bytes: &[u8],
    ) -> Result<(), StorageError> {
        Self::check_blob("session", session_bytes)?;
        if envelope_bytes.len() > MAX_STORED_ENVELOPE_BYTES {
            return Err(StorageError::TooLarge {
                what: "envelope",
                len: envelope_bytes.len(),
                limit: MAX_STORED_ENVELOPE_BYTES,
            });
        }
        let guard = self.lock();
        if self
            .get(CF_MESSAGES, &outgoing_id_key(message_id))?
            .is_some()
        {
            return Err(StorageError::Inconsistent(
                "an outgoing message with this id exists already",
            ));
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_SESSIONS), peer.as_bytes(), session_bytes);
        self.stage_outbox_entry(&mut batch, peer, message_id, envelope_bytes)?;
        batch.put_cf(
            self.cf(CF_MESSAGES),
            outgoing_id_key(message_id),
            peer.as_bytes(),
        );
        let pending = self.write_pending(batch, false, "committing a control envelope")?;
        drop(guard);
        self.wait_durable(pending)
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // A panic while holding the lock leaves no partial state (all writes are batches).
        self.inner
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner
            .db
            .get_cf(self.cf(cf), key)
            .map_err(db_err("reading"))
    }

    fn get_wire<T: Wire>(
        &self,
        cf: &'static str,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StorageError> {
        match self.get(cf, key)? {
            None => Ok(None),
            Some(bytes) => T::from_wire(&bytes).map(Some).map_err(corrupt(what)),
        }
    }

    fn write(&self, batch: WriteBatch, sync: bool, op: &'static str) -> Result<(), StorageError> {
        self.write_pending(batch, sync, op).map(|_| ())
    }

    /// Write `batch` (synced or not) and number it for [`Storage::wait_durable`].
    pub(crate) fn write_pending(
        &self,
        batch: WriteBatch,
        sync: bool,
        op: &'static str,
    ) -> Result<PendingWrite, StorageError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.inner.db.write_opt(batch, &wo).map_err(db_err(op))?;
        let mut state = self.sync_state();
        state.written += 1;
        Ok(PendingWrite(state.written))
    }

    /// Syncs of the write-ahead log so far (for benchmarks: syncs per message).
    pub fn syncs(&self) -> u64 {
        self.sync_state().syncs
    }

    fn sync_state(&self) -> MutexGuard<'_, SyncState> {
        // The state is a few counters, consistent after any panic.
        self.inner
            .sync
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Block until `pending` is on disk. If no sync is running, this caller syncs the
    /// write-ahead log for every batch written so far; otherwise it waits for the running sync
    /// and, if that one started before `pending` was written, for the next. Concurrent commits
    /// therefore share `fsync`s (group commit).
    pub fn wait_durable(&self, pending: PendingWrite) -> Result<(), StorageError> {
        let mut state = self.sync_state();
        loop {
            if state.synced >= pending.0 {
                return Ok(());
            }
            if state.syncing {
                state = self
                    .inner
                    .synced
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            // Every batch numbered up to `target` was written before this sync starts, so the
            // sync covers it (RocksDB's `SyncWAL` syncs all live log files).
            let target = state.written;
            state.syncing = true;
            drop(state);
            let result = self.inner.db.flush_wal(true);
            state = self.sync_state();
            state.syncing = false;
            if result.is_ok() {
                state.synced = state.synced.max(target);
                state.syncs += 1;
            }
            self.inner.synced.notify_all();
            self.inner.synced_tx.send_replace(state.synced);
            result.map_err(db_err("syncing the write-ahead log"))?;
        }
    }

    /// [`Storage::wait_durable`] when no sync is running (this thread syncs); otherwise return
    /// at once with `Some(pending)`, to be awaited without holding a thread (see
    /// [`Storage::durable`]). Under load, the writers of a group commit then do not each park
    /// a thread on the condition variable until the running sync ends.
    pub fn sync_unless_busy(
        &self,
        pending: PendingWrite,
    ) -> Result<Option<PendingWrite>, StorageError> {
        match self.durability(pending) {
            Durability::Durable => Ok(None),
            Durability::Syncing => Ok(Some(pending)),
            Durability::Idle => self.wait_durable(pending).map(|()| None),
        }
    }

    /// Where `pending` stands now.
    pub fn durability(&self, pending: PendingWrite) -> Durability {
        let state = self.sync_state();
        if state.synced >= pending.0 {
            Durability::Durable
        } else if state.syncing {
            Durability::Syncing
        } else {
            Durability::Idle
        }
    }

    /// Resolve once `pending` is on disk: wait for a running sync without holding a thread (on
    /// a channel that changes at the end of every sync), and if none is running, sync on the
    /// blocking pool. The async counterpart of [`Storage::wait_durable`], for the writes
    /// [`Storage::sync_unless_busy`] handed back.
    pub async fn durable(&self, pending: PendingWrite) -> Result<(), StorageError> {
        // Subscribed before looking, so the end of the sync seen running is not missed.
        let mut synced = self.inner.synced_tx.subscribe();
        loop {
            match self.durability(pending) {
                Durability::Durable => return Ok(()),
                Durability::Syncing => synced
                    .changed()
                    .await
                    .map_err(|_| StorageError::SyncInterrupted)?,
                Durability::Idle => {
                    let storage = self.clone();
                    return tokio::task::spawn_blocking(move || storage.wait_durable(pending))
                        .await
                        .map_err(|_| StorageError::SyncInterrupted)?;
                }
            }
        }
    }

    /// Block until everything written so far is on disk (cheap when it already is). Call this
    /// before acting outside the process on state that was read from the database.
    pub fn sync_barrier(&self) -> Result<(), StorageError> {
        let written = PendingWrite(self.sync_state().written);
        self.wait_durable(written)
    }

    fn put_one(
        &self,
        cf: &'static str,
        key: &[u8],
        value: &[u8],
        sync: bool,
        op: &'static str,
    ) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(cf), key, value);
        self.write(batch, sync, op)
    }

    fn blob(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.get(cf, key)
    }

    fn check_blob(what: &'static str, bytes: &[u8]) -> Result<(), StorageError> {
        if bytes.len() > MAX_STORED_BLOB_BYTES {
            return Err(StorageError::TooLarge {
                what,
                len: bytes.len(),
                limit: MAX_STORED_BLOB_BYTES,
            });
        }
        Ok(())
    }

    // --- identity ------------------------------------------------------------------------

    /// Save the identity of this home. Refuses (never overwrites) if one is there.
    pub fn save_identity(&self, identity: &Identity) -> Result<(), StorageError> {
        let _guard = self.lock();
        if let Some(existing) = self.load_identity_opt()? {
            return Err(StorageError::IdentityExists {
                home: self.inner.home.clone(),
                user_id: existing.user_id().to_string(),
            });
        }
        let stored = StoredIdentity {
            seed: *identity.seed(),
            saved_at_ms: now_ms(),
        };
        let bytes = encode("identity", &stored)?;
        self.put_one(CF_IDENTITY, KEY_SEED, &bytes, true, "saving the identity")
    }

    fn load_identity_opt(&self) -> Result<Option<Identity>, StorageError> {
        Ok(self
            .get_wire::<StoredIdentity>(CF_IDENTITY, KEY_SEED, "identity")?
            .map(|s| Identity::from_seed(&s.seed)))
    }

    /// The identity of this home, or [`StorageError::NoIdentity`].
    pub fn load_identity(&self) -> Result<Identity, StorageError> {
        self.load_identity_opt()?
            .ok_or_else(|| StorageError::NoIdentity {
                home: self.inner.home.clone(),
            })
    }

    /// Whether `init` has been run.
    pub fn has_identity(&self) -> Result<bool, StorageError> {
        Ok(self.get(CF_IDENTITY, KEY_SEED)?.is_some())
    }

    /// The libp2p keypair of this home: generated (Ed25519) and stored on first use. It is not
    /// the user's identity key, so the peer ID does not reveal who runs the node.
    pub fn node_keypair(&self) -> Result<libp2p::identity::Keypair, StorageError> {
        let _guard = self.lock();
        if let Some(stored) =
            self.get_wire::<StoredNodeKey>(CF_IDENTITY, KEY_NODE_KEY, "node key")?
        {
            return libp2p::identity::Keypair::from_protobuf_encoding(&stored.protobuf).map_err(
                |e| StorageError::Corrupt {
                    what: "node key",
                    detail: e.to_string(),
                },
            );
        }
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let protobuf = keypair
            .to_protobuf_encoding()
            .map_err(|e| StorageError::Corrupt {
                what: "node key",
                detail: format!("cannot encode a fresh key: {e}"),
            })?;
        let bytes = encode("node key", &StoredNodeKey { protobuf })?;
        self.put_one(
            CF_IDENTITY,
            KEY_NODE_KEY,
            &bytes,
            true,
            "saving the node key",
        )?;
        Ok(keypair)
    }

    /// The prekey secrets (caller's wire bytes), if saved.
    pub fn prekeys(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.blob(CF_IDENTITY, KEY_PREKEYS)
    }

    /// Save the prekey secrets (caller's wire bytes). Synced: a published bundle must never
    /// refer to secrets that were lost.
    pub fn save_prekeys(&self, bytes: &[u8]) -> Result<(), StorageError> {
        Self::check_blob("prekey secrets", bytes)?;
        self.put_one(CF_IDENTITY, KEY_PREKEYS, bytes, true, "saving prekeys")
    }

    /// The replay cache (caller's wire bytes), if saved.
    pub fn replay_cache(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.blob(CF_REPLAY, KEY_REPLAY)
    }

    /// Save the replay cache (caller's wire bytes), synced.
    pub fn save_replay_cache(&self, bytes: &[u8]) -> Result<(), StorageError> {
        Self::check_blob("replay cache", bytes)?;
        self.put_one(
            CF_REPLAY,
            KEY_REPLAY,
            bytes,
            true,
            "saving the replay cache",
        )
    }

    // --- contacts ------------------------------------------------------------------------

    /// Add a contact. The name must pass [`validate_contact_name`] and be unused
    /// (case-insensitively); the identity must not be a contact already, nor our own.
    pub fn add_contact(
        &self,
        name: &str,
        identity: &PublicIdentity,
    ) -> Result<Contact, StorageError> {
        validate_contact_name(name)?;
        let _guard = self.lock();
        if let Some(own) = self.load_identity_opt()? {
            if own.public() == *identity {
                return Err(StorageError::SelfContact);
            }
        }
        if let Some(existing) =
            self.get_wire::<Contact>(CF_CONTACTS, &contact_name_key(name), "contact")?
        {
            return Err(StorageError::ContactNameTaken {
                name: existing.name,
            });
        }
        if let Some(existing) = self.contact_by_identity(identity)? {
            return Err(StorageError::ContactExists {
                name: existing.name,
            });
        }
        let contact = Contact {
            name: name.to_owned(),
            identity: *identity,
            verified: false,
            added_at_ms: now_ms(),
        };
        self.write_contact(&contact, true)?;
        Ok(contact)
    }

    fn write_contact(&self, contact: &Contact, index: bool) -> Result<(), StorageError> {
        let cf = self.cf(CF_CONTACTS);
        let mut batch = WriteBatch::default();
        batch.put_cf(
            cf,
            contact_name_key(&contact.name),
            encode("contact", contact)?,
        );
        if index {
            batch.put_cf(
                cf,
                contact_identity_key(&contact.identity),
                contact.name.to_lowercase().as_bytes(),
            );
        }
        self.write(batch, true, "saving a contact")
    }

    /// Remove the contact named `name` (conversations and sessions are kept).
    pub fn remove_contact(&self, name: &str) -> Result<Contact, StorageError> {
        let _guard = self.lock();
        let contact = self.contact_by_name(name)?;
        let cf = self.cf(CF_CONTACTS);
        let mut batch = WriteBatch::default();
        batch.delete_cf(cf, contact_name_key(&contact.name));
        batch.delete_cf(cf, contact_identity_key(&contact.identity));
        self.write(batch, true, "removing a contact")?;
        Ok(contact)
    }

    /// All contacts, by name.
    pub fn contacts(&self) -> Result<Vec<Contact>, StorageError> {
        let mut out = Vec::new();
        let iter = self.inner.db.iterator_cf(
            self.cf(CF_CONTACTS),
            IteratorMode::From(b"n", IterDirection::Forward),
        );
        for item in iter {
            let (key, value) = item.map_err(db_err("listing contacts"))?;
            if key.first() != Some(&b'n') {
                break;
            }
            out.push(Contact::from_wire(&value).map_err(corrupt("contact"))?);
        }
        Ok(out)
    }

    /// The contact named `name` (case-insensitive), or [`StorageError::UnknownContact`].
    pub fn contact_by_name(&self, name: &str) -> Result<Contact, StorageError> {
        if name.chars().count() > MAX_CONTACT_NAME_CHARS {
            return Err(StorageError::UnknownContact {
                name: name.chars().take(MAX_CONTACT_NAME_CHARS).collect(),
            });
        }
        self.get_wire::<Contact>(CF_CONTACTS, &contact_name_key(name), "contact")?
            .ok_or_else(|| StorageError::UnknownContact {
                name: name.to_owned(),
            })
    }

    /// The contact with this identity, if any.
    pub fn contact_by_identity(
        &self,
        identity: &PublicIdentity,
    ) -> Result<Option<Contact>, StorageError> {
        let Some(name) = self.get(CF_CONTACTS, &contact_identity_key(identity))? else {
            return Ok(None);
        };
        let mut key = vec![b'n'];
        key.extend_from_slice(&name);
        match self.get_wire::<Contact>(CF_CONTACTS, &key, "contact")? {
            Some(c) if c.identity == *identity => Ok(Some(c)),
            _ => Err(StorageError::Corrupt {
                what: "contact index",
                detail: "the identity index names a missing or different contact".into(),
            }),
        }
    }

    /// Mark the contact `name` as verified (or not).
    pub fn set_verified(&self, name: &str, verified: bool) -> Result<Contact, StorageError> {
        let _guard = self.lock();
        let mut contact = self.contact_by_name(name)?;
        contact.verified = verified;
        self.write_contact(&contact, false)?;
        Ok(contact)
    }

    // --- sessions ------------------------------------------------------------------------

    /// Every identity a session record is stored with.
    pub fn session_peers(&self) -> Result<Vec<PublicIdentity>, StorageError> {
        let mut out = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(CF_SESSIONS), IteratorMode::Start)
        {
            let (key, _) = item.map_err(db_err("listing sessions"))?;
            if let Some(p) = <[u8; 32]>::try_from(&key[..])
                .ok()
                .and_then(|k| PublicIdentity::from_bytes(&k).ok())
            {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// The stored session record (ratchet state) with `peer`, if any.
    pub fn session(&self, peer: &PublicIdentity) -> Result<Option<Vec<u8>>, StorageError> {
        self.blob(CF_SESSIONS, peer.as_bytes())
    }

    /// Save a session record on its own (e.g. after receiving a receipt-only envelope the caller
    /// commits with [`Storage::commit_incoming`] instead; this is for re-handshakes). Synced.
    pub fn save_session(&self, peer: &PublicIdentity, bytes: &[u8]) -> Result<(), StorageError> {
        Self::check_blob("session", bytes)?;
        self.put_one(
            CF_SESSIONS,
            peer.as_bytes(),
            bytes,
            true,
            "saving a session",
        )
    }

    // --- messages ------------------------------------------------------------------------

    fn read_counter(
        &self,
        cf: &'static str,
        key: &[u8],
        what: &'static str,
    ) -> Result<u64, StorageError> {
        Ok(self
            .get_wire::<StoredCounter>(cf, key, what)?
            .map_or(0, |c| c.value))
    }

    /// The sequence number the next outgoing message to `peer` gets (0 for the first).
    pub fn next_seq(&self, peer: &PublicIdentity) -> Result<u64, StorageError> {
        self.read_counter(CF_MESSAGES, &seq_key(peer), "sequence counter")
    }

    fn check_message(m: &StoredMessage) -> Result<(), StorageError> {
        if m.body.len() > MAX_STORED_BODY_BYTES {
            return Err(StorageError::TooLarge {
                what: "message body",
                len: m.body.len(),
                limit: MAX_STORED_BODY_BYTES,
            });
        }
        Ok(())
    }

    /// Put a new message and its indexes into `batch`; returns its arrival index.
    fn stage_message(
        &self,
        batch: &mut WriteBatch,
        m: &StoredMessage,
    ) -> Result<u64, StorageError> {
        let first = self.stage_messages(batch, [m])?;
        Ok(first)
    }

    /// Put new messages and their indexes into `batch`, numbered in order from the arrival
    /// counter; returns the arrival index of the first (the others follow it).
    fn stage_messages<'a>(
        &self,
        batch: &mut WriteBatch,
        messages: impl IntoIterator<Item = &'a StoredMessage>,
    ) -> Result<u64, StorageError> {
        let first = self.read_counter(CF_META, KEY_ARRIVAL_NEXT, "arrival counter")?;
        let exhausted = || StorageError::Corrupt {
            what: "arrival counter",
            detail: "exhausted".into(),
        };
        let cf = self.cf(CF_MESSAGES);
        let mut index = first;
        for m in messages {
            let key = message_key(&m.peer, m.direction, &m.id);
            let record = MessageRecord {
                index,
                message: m.clone(),
            };
            batch.put_cf(cf, &key, encode("message", &record)?);
            batch.put_cf(cf, arrival_key(index), &key);
            if m.group.is_none() {
                batch.put_cf(cf, conversation_key(m), []);
            }
            if m.direction == Direction::Out {
                batch.put_cf(cf, outgoing_id_key(&m.id), m.peer.as_bytes());
            }
            index = index.checked_add(1).ok_or_else(exhausted)?;
        }
        batch.put_cf(
            self.cf(CF_META),
            KEY_ARRIVAL_NEXT,
            encode("arrival counter", &StoredCounter { value: index })?,
        );
        Ok(first)
    }

    /// Commit an outgoing message in one synced batch: the new session state, the message
    /// (normally `Queued`), its outbox entry with the envelope, and the next sequence number for
    /// the peer. Returns the message's arrival index. Once this returns, the message survives a
    /// crash.
    pub fn commit_outgoing(
        &self,
        peer: &PublicIdentity,
        session_bytes: &[u8],
        message: &StoredMessage,
        envelope_bytes: &[u8],
        next_seq: u64,
    ) -> Result<u64, StorageError> {
        let (index, pending) =
            self.commit_outgoing_pending(peer, session_bytes, message, envelope_bytes, next_seq)?;
        self.wait_durable(pending)?;
        Ok(index)
    }

    /// As [`Storage::commit_outgoing`], without waiting for the disk: the batch is written (and
    /// visible to this process) when this returns, durable once [`Storage::wait_durable`] returns
    /// for the [`PendingWrite`]. Lets the caller release its own locks before the sync, so that
    /// concurrent commits share it.
    pub fn commit_outgoing_pending(
        &self,
        peer: &PublicIdentity,
        session_bytes: &[u8],
        message: &StoredMessage,
        envelope_bytes: &[u8],
        next_seq: u64,
    ) -> Result<(u64, PendingWrite), StorageError> {
        self.commit_outgoing_many(peer, session_bytes, &[(message, envelope_bytes)], next_seq)
    }

    /// [`Storage::commit_outgoing_pending`] for several messages to `peer` sealed one after the
    /// other from one session state: `session_bytes` is the state after the last of them. All
    /// or nothing, in one batch; returns the arrival index of the first message (the others
    /// follow it in order).
    pub fn commit_outgoing_many(
        &self,
        peer: &PublicIdentity,
        session_bytes: &[u8],
        messages: &[(&StoredMessage, &[u8])],
        next_seq: u64,
    ) -> Result<(u64, PendingWrite), StorageError> {
        if messages.is_empty() {
            return Err(StorageError::Inconsistent(
                "commit_outgoing needs at least one message",
            ));
        }
        for (message, envelope_bytes) in messages {
            if message.direction != Direction::Out || message.peer != *peer {
                return Err(StorageError::Inconsistent(
                    "commit_outgoing needs outgoing messages to `peer`",
                ));
            }
            Self::check_message(message)?;
            if envelope_bytes.len() > MAX_STORED_ENVELOPE_BYTES {
                return Err(StorageError::TooLarge {
                    what: "envelope",
                    len: envelope_bytes.len(),
                    limit: MAX_STORED_ENVELOPE_BYTES,
                });
            }
        }
        Self::check_blob("session", session_bytes)?;
        let mut ids: Vec<&[u8; 16]> = messages.iter().map(|(m, _)| &m.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != messages.len() {
            return Err(StorageError::Inconsistent(
                "two outgoing messages with the same id",
            ));
        }
        let _guard = self.lock();
        for id in ids {
            if self.get(CF_MESSAGES, &outgoing_id_key(id))?.is_some() {
                return Err(StorageError::Inconsistent(
                    "an outgoing message with this id exists already",
                ));
            }
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_SESSIONS), peer.as_bytes(), session_bytes);
        let index = self.stage_messages(&mut batch, messages.iter().map(|(m, _)| *m))?;
        for (message, envelope_bytes) in messages {
            self.stage_outbox_entry(&mut batch, peer, &message.id, envelope_bytes)?;
        }
        batch.put_cf(
            self.cf(CF_MESSAGES),
            seq_key(peer),
            encode("sequence counter", &StoredCounter { value: next_seq })?,
        );
        let pending = self.write_pending(batch, false, "committing outgoing messages")?;
        Ok((index, pending))
    }

    /// Put a new outbox entry (first attempt due now) for our envelope to `peer` into `batch`.
    fn stage_outbox_entry(
        &self,
        batch: &mut WriteBatch,
        peer: &PublicIdentity,
        message_id: &[u8; 16],
        envelope_bytes: &[u8],
    ) -> Result<(), StorageError> {
        let entry = OutboxEntry {
            message_id: *message_id,
            peer: *peer,
            envelope: envelope_bytes.to_vec(),
            attempts: 0,
            next_attempt_ms: 0,
        };
        batch.put_cf(
            self.cf(CF_OUTBOX),
            message_id,
            encode("outbox entry", &entry)?,
        );
        Ok(())
    }

    /// Whether the envelope with this id was processed already.
    pub fn seen(&self, envelope_id: &[u8; 32]) -> Result<bool, StorageError> {
        Ok(self.get(CF_SEEN, envelope_id)?.is_some())
    }

    /// Record an envelope as processed without other changes (e.g. one that could not be
    /// opened), so it is not tried again. Returns false if it was already marked.
    pub fn mark_seen(&self, envelope_id: &[u8; 32]) -> Result<bool, StorageError> {
        let guard = self.lock();
        if self.seen(envelope_id)? {
            drop(guard);
            self.sync_barrier()?;
            return Ok(false);
        }
        let value = encode("seen mark", &StoredCounter { value: now_ms() })?;
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_SEEN), envelope_id, value);
        let pending = self.write_pending(batch, false, "marking an envelope seen")?;
        drop(guard);
        self.wait_durable(pending)?;
        Ok(true)
    }

    /// Forget seen marks older than `before_ms` (envelopes that old are expired anyway).
    pub fn prune_seen(&self, before_ms: u64) -> Result<usize, StorageError> {
        let _guard = self.lock();
        let cf = self.cf(CF_SEEN);
        let mut batch = WriteBatch::default();
        let mut n = 0;
        for item in self.inner.db.iterator_cf(cf, IteratorMode::Start) {
            let (key, value) = item.map_err(db_err("pruning seen marks"))?;
            let keep = StoredCounter::from_wire(&value)
                .map(|c| c.value >= before_ms)
                .unwrap_or(false);
            if !keep {
                batch.delete_cf(cf, key);
                n += 1;
            }
        }
        self.write(batch, false, "pruning seen marks")?;
        Ok(n)
    }

    /// Commit everything an incoming envelope changed, in one synced batch: the seen mark, the
    /// sender's session, the prekey secrets and replay cache if they changed, and the message if
    /// it carried one. An envelope already seen changes nothing ([`IncomingOutcome::Duplicate`]);
    /// a message id already stored for this sender is not stored twice. Whatever the outcome,
    /// it is on disk when this returns (a duplicate's first copy included).
    pub fn commit_incoming(
        &self,
        envelope_id: &[u8; 32],
        sender: &PublicIdentity,
        session_bytes: &[u8],
        prekeys_bytes: Option<&[u8]>,
        replay_bytes: Option<&[u8]>,
        message: Option<&StoredMessage>,
    ) -> Result<IncomingOutcome, StorageError> {
        let (outcome, pending) = self.commit_incoming_pending(
            envelope_id,
            sender,
            session_bytes,
            prekeys_bytes,
            replay_bytes,
            message,
        )?;
        self.wait_durable(pending)?;
        Ok(outcome)
    }

    /// As [`Storage::commit_incoming`], without waiting for the disk: acknowledge the envelope
    /// only once [`Storage::wait_durable`] returned for the [`PendingWrite`] (for a duplicate it
    /// stands for every write so far, the first copy's commit among them).
    pub fn commit_incoming_pending(
        &self,
        envelope_id: &[u8; 32],
        sender: &PublicIdentity,
        session_bytes: &[u8],
        prekeys_bytes: Option<&[u8]>,
        replay_bytes: Option<&[u8]>,
        message: Option<&StoredMessage>,
    ) -> Result<(IncomingOutcome, PendingWrite), StorageError> {
        let (mut outcomes, pending) = self.commit_incoming_many(
            sender,
            session_bytes,
            prekeys_bytes,
            replay_bytes,
            &[(envelope_id, message)],
        )?;
        let outcome = outcomes.pop().ok_or(StorageError::Inconsistent(
            "one envelope committed gave no outcome",
        ))?;
        Ok((outcome, pending))
    }

    /// [`Storage::commit_incoming_pending`] for several envelopes from `sender` opened one after
    /// the other from one session state: `session_bytes` is the state after the last of them.
    /// One batch, all or nothing; an outcome per envelope, in order (an envelope seen before, in
    /// the database or earlier in `envelopes`, is a [`IncomingOutcome::Duplicate`] and changes
    /// nothing).
    pub fn commit_incoming_many(
        &self,
        sender: &PublicIdentity,
        session_bytes: &[u8],
        prekeys_bytes: Option<&[u8]>,
        replay_bytes: Option<&[u8]>,
        envelopes: &[(&[u8; 32], Option<&StoredMessage>)],
    ) -> Result<(Vec<IncomingOutcome>, PendingWrite), StorageError> {
        Self::check_blob("session", session_bytes)?;
        if let Some(b) = prekeys_bytes {
            Self::check_blob("prekey secrets", b)?;
        }
        if let Some(b) = replay_bytes {
            Self::check_blob("replay cache", b)?;
        }
        for (_, message) in envelopes {
            if let Some(m) = message {
                if m.direction != Direction::In || m.peer != *sender {
                    return Err(StorageError::Inconsistent(
                        "commit_incoming needs an incoming message from `sender`",
                    ));
                }
                Self::check_message(m)?;
            }
        }
        let _guard = self.lock();
        let mut batch = WriteBatch::default();
        let mut seen_here: HashSet<[u8; 32]> = HashSet::new();
        let mut keys_here: HashSet<Vec<u8>> = HashSet::new();
        let mut outcomes = Vec::with_capacity(envelopes.len());
        // Messages to store, in order, with the position of their outcome.
        let mut to_store: Vec<(usize, &StoredMessage)> = Vec::new();
        for (envelope_id, message) in envelopes {
            if seen_here.contains(*envelope_id) || self.seen(envelope_id)? {
                outcomes.push(IncomingOutcome::Duplicate);
                continue;
            }
            seen_here.insert(**envelope_id);
            batch.put_cf(
                self.cf(CF_SEEN),
                envelope_id,
                encode("seen mark", &StoredCounter { value: now_ms() })?,
            );
            let mut outcome = IncomingOutcome::New { index: None };
            if let Some(m) = message {
                let key = message_key(sender, Direction::In, &m.id);
                if keys_here.contains(&key) || self.get(CF_MESSAGES, &key)?.is_some() {
                    outcome = IncomingOutcome::DuplicateMessage;
                } else {
                    keys_here.insert(key);
                    to_store.push((outcomes.len(), m));
                }
            }
            outcomes.push(outcome);
        }
        if seen_here.is_empty() {
            // Every envelope was processed before: nothing to write.
            return Ok((outcomes, PendingWrite(self.sync_state().written)));
        }
        batch.put_cf(self.cf(CF_SESSIONS), sender.as_bytes(), session_bytes);
        if let Some(b) = prekeys_bytes {
            batch.put_cf(self.cf(CF_IDENTITY), KEY_PREKEYS, b);
        }
        if let Some(b) = replay_bytes {
            batch.put_cf(self.cf(CF_REPLAY), KEY_REPLAY, b);
        }
        if !to_store.is_empty() {
            let first = self.stage_messages(&mut batch, to_store.iter().map(|(_, m)| *m))?;
            for (k, (at, _)) in to_store.iter().enumerate() {
                outcomes[*at] = IncomingOutcome::New {
                    index: Some(first + k as u64),
                };
            }
        }
        let pending = self.write_pending(batch, false, "committing incoming envelopes")?;
        Ok((outcomes, pending))
    }

    fn read_message_at(&self, key: &[u8]) -> Result<Option<MessageRecord>, StorageError> {
        self.get_wire::<MessageRecord>(CF_MESSAGES, key, "message")
    }

    /// Messages matching `filter`, each with its arrival index. Without a peer: all
    /// conversations, oldest arrival first. With a peer: that conversation in conversation order
    /// (each side's messages in the order of its sequence numbers, the two sides interleaved by
    /// send time).
    pub fn messages(
        &self,
        filter: &MessageFilter,
    ) -> Result<Vec<(u64, StoredMessage)>, StorageError> {
        let limit = filter.limit.unwrap_or(usize::MAX);
        let wanted = |index: u64, m: &StoredMessage| {
            filter.after_index.is_none_or(|a| index > a)
                && filter.direction.is_none_or(|d| m.direction == d)
        };
        let cf = self.cf(CF_MESSAGES);
        let mut out = Vec::new();
        match &filter.peer {
            None => {
                let start = arrival_key(filter.after_index.map_or(0, |a| a.saturating_add(1)));
                let iter = self
                    .inner
                    .db
                    .iterator_cf(cf, IteratorMode::From(&start, IterDirection::Forward));
                for item in iter {
                    if out.len() >= limit {
                        break;
                    }
                    let (key, value) = item.map_err(db_err("listing messages"))?;
                    if key.first() != Some(&b'A') {
                        break;
                    }
                    if value.len() != MSG_KEY_LEN || value.first() != Some(&b'M') {
                        return Err(StorageError::Corrupt {
                            what: "message index",
                            detail: format!("index entry of {} bytes", value.len()),
                        });
                    }
                    // Filter by direction before reading the message.
                    if let Some(d) = filter.direction {
                        if value[33] != d.byte() {
                            continue;
                        }
                    }
                    let record = self.read_message_at(&value)?.ok_or(StorageError::Corrupt {
                        what: "message index",
                        detail: "the arrival index names a missing message".into(),
                    })?;
                    if wanted(record.index, &record.message) {
                        out.push((record.index, record.message));
                    }
                }
            }
            Some(peer) => {
                let prefix = conversation_prefix(peer);
                let iter = self
                    .inner
                    .db
                    .iterator_cf(cf, IteratorMode::From(&prefix, IterDirection::Forward));
                let (mut incoming, mut outgoing) = (Vec::new(), Vec::new());
                for item in iter {
                    let (key, _) = item.map_err(db_err("listing a conversation"))?;
                    if !key.starts_with(&prefix) {
                        break;
                    }
                    if key.len() != prefix.len() + 1 + 8 + 16 {
                        return Err(StorageError::Corrupt {
                            what: "conversation index",
                            detail: format!("key of {} bytes", key.len()),
                        });
                    }
                    let direction = match key[prefix.len()] {
                        0 => Direction::In,
                        1 => Direction::Out,
                        other => {
                            return Err(StorageError::Corrupt {
                                what: "conversation index",
                                detail: format!("direction byte {other}"),
                            })
                        }
                    };
                    let id: [u8; 16] = key[key.len() - 16..]
                        .try_into()
                        .expect("invariant: length checked above");
                    let record = self
                        .read_message_at(&message_key(peer, direction, &id))?
                        .ok_or(StorageError::Corrupt {
                            what: "conversation index",
                            detail: "names a missing message".into(),
                        })?;
                    if wanted(record.index, &record.message) {
                        match direction {
                            Direction::In => incoming.push((record.index, record.message)),
                            Direction::Out => outgoing.push((record.index, record.message)),
                        }
                    }
                }
                // Merge the two seq-ordered sides by send time, keeping each side's order.
                let (mut i, mut o) = (
                    incoming.into_iter().peekable(),
                    outgoing.into_iter().peekable(),
                );
                while out.len() < limit {
                    let take_in = match (i.peek(), o.peek()) {
                        (Some(a), Some(b)) => a.1.sent_at_ms <= b.1.sent_at_ms,
                        (Some(_), None) => true,
                        (None, Some(_)) => false,
                        (None, None) => break,
                    };
                    let next = if take_in { i.next() } else { o.next() };
                    out.extend(next);
                }
            }
        }
        Ok(out)
    }

    /// One message by peer, direction and id.
    pub fn message(
        &self,
        peer: &PublicIdentity,
        direction: Direction,
        id: &[u8; 16],
    ) -> Result<Option<(u64, StoredMessage)>, StorageError> {
        Ok(self
            .read_message_at(&message_key(peer, direction, id))?
            .map(|r| (r.index, r.message)))
    }

    /// The peer of our outgoing message `id`.
    fn outgoing_peer(&self, id: &[u8; 16]) -> Result<Option<PublicIdentity>, StorageError> {
        let Some(bytes) = self.get(CF_MESSAGES, &outgoing_id_key(id))? else {
            return Ok(None);
        };
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| StorageError::Corrupt {
                what: "outgoing message index",
                detail: format!("{} bytes instead of 32", bytes.len()),
            })?;
        PublicIdentity::from_bytes(&arr)
            .map(Some)
            .map_err(|e| StorageError::Corrupt {
                what: "outgoing message index",
                detail: e.to_string(),
            })
    }

    /// Stage a status change (forward only) of the message at `key`; returns the new message if
    /// it changed.
    fn stage_status(
        &self,
        batch: &mut WriteBatch,
        key: &[u8],
        status: Status,
    ) -> Result<Option<StoredMessage>, StorageError> {
        let Some(mut record) = self.read_message_at(key)? else {
            return Ok(None);
        };
        if !record.message.status.advances_to(status) {
            return Ok(None);
        }
        record.message.status = status;
        batch.put_cf(self.cf(CF_MESSAGES), key, encode("message", &record)?);
        Ok(Some(record.message))
    }

    /// Move our outgoing message `message_id` to `status` if that is progress (statuses never go
    /// backwards). Returns the updated message if it changed.
    pub fn set_status(
        &self,
        message_id: &[u8; 16],
        status: Status,
    ) -> Result<Option<StoredMessage>, StorageError> {
        let guard = self.lock();
        let peer = self
            .outgoing_peer(message_id)?
            .ok_or_else(|| StorageError::UnknownMessage {
                id: hex::encode(message_id),
            })?;
        let mut batch = WriteBatch::default();
        let changed = self.stage_status(
            &mut batch,
            &message_key(&peer, Direction::Out, message_id),
            status,
        )?;
        if changed.is_some() {
            let pending = self.write_pending(batch, false, "updating a message status")?;
            drop(guard);
            self.wait_durable(pending)?;
        }
        Ok(changed)
    }

    /// As [`Storage::set_status`], for a receipt that came from `peer`: ignored (Ok(None)) unless
    /// the message was sent to that peer, so nobody can change the status of messages sent to
    /// someone else.
    pub fn set_status_from(
        &self,
        peer: &PublicIdentity,
        message_id: &[u8; 16],
        status: Status,
    ) -> Result<Option<StoredMessage>, StorageError> {
        match self.outgoing_peer(message_id)? {
            Some(p) if p == *peer => self.set_status(message_id, status),
            _ => Ok(None),
        }
    }

    /// Mark an incoming message as read by the user. Returns the message if it changed.
    pub fn mark_read(
        &self,
        peer: &PublicIdentity,
        message_id: &[u8; 16],
    ) -> Result<Option<StoredMessage>, StorageError> {
        let _guard = self.lock();
        let mut batch = WriteBatch::default();
        let changed = self.stage_status(
            &mut batch,
            &message_key(peer, Direction::In, message_id),
            Status::Read,
        )?;
        if changed.is_some() {
            self.write(batch, false, "marking a message read")?;
        }
        Ok(changed)
    }

    // --- outbox --------------------------------------------------------------------------

    /// Every envelope still waiting for delivery.
    pub fn outbox(&self) -> Result<Vec<OutboxEntry>, StorageError> {
        let mut out = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(CF_OUTBOX), IteratorMode::Start)
        {
            let (_, value) = item.map_err(db_err("reading the outbox"))?;
            out.push(OutboxEntry::from_wire(&value).map_err(corrupt("outbox entry"))?);
        }
        Ok(out)
    }

    /// Record a failed attempt: `attempts` so far, next try at `next_attempt_ms`. Not synced
    /// (losing it only means an earlier retry). No-op if the entry is gone.
    pub fn reschedule(
        &self,
        message_id: &[u8; 16],
        attempts: u32,
        next_attempt_ms: u64,
    ) -> Result<(), StorageError> {
        let _guard = self.lock();
        let Some(mut entry) =
            self.get_wire::<OutboxEntry>(CF_OUTBOX, message_id, "outbox entry")?
        else {
            return Ok(());
        };
        entry.attempts = attempts;
        entry.next_attempt_ms = next_attempt_ms;
        let bytes = encode("outbox entry", &entry)?;
        self.put_one(CF_OUTBOX, message_id, &bytes, false, "rescheduling")
    }

    /// The recipient acknowledged `message_id`: in one batch, drop its outbox entry and mark it
    /// delivered. Returns the updated message if its status changed. Not waited for (see the
    /// module's guarantees: a lost mark is recomputed by resending the outbox entry).
    pub fn mark_delivered(
        &self,
        message_id: &[u8; 16],
    ) -> Result<Option<StoredMessage>, StorageError> {
        self.finish_outgoing(message_id, Status::Delivered, false)
    }

    /// [`Storage::mark_delivered`] for many messages at once, each named with its recipient,
    /// in one (unsynced) batch; returns the messages whose status changed. An id that is not an
    /// outgoing message to the peer named with it changes nothing.
    pub fn mark_delivered_many(
        &self,
        messages: &[(PublicIdentity, [u8; 16])],
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let guard = self.lock();
        let mut batch = WriteBatch::default();
        let mut changed = Vec::new();
        for (peer, id) in messages {
            let key = message_key(peer, Direction::Out, id);
            let Some(mut record) = self.read_message_at(&key)? else {
                continue;
            };
            batch.delete_cf(self.cf(CF_OUTBOX), id);
            if record.message.status.advances_to(Status::Delivered) {
                record.message.status = Status::Delivered;
                batch.put_cf(self.cf(CF_MESSAGES), &key, encode("message", &record)?);
                changed.push(record.message);
            }
        }
        self.write(batch, false, "marking messages delivered")?;
        drop(guard);
        Ok(changed)
    }

    /// `message_id` is stored on `replicas` mailbox replicas: in one synced batch, drop its
    /// outbox entry (the recipient collects it from the mailbox) and mark it stored.
    pub fn mark_stored(
        &self,
        message_id: &[u8; 16],
        replicas: u32,
    ) -> Result<Option<StoredMessage>, StorageError> {
        self.finish_outgoing(message_id, Status::Stored { replicas }, true)
    }

    /// Give up on `message_id`: drop its outbox entry and mark it failed (one synced batch).
    pub fn abandon(&self, message_id: &[u8; 16]) -> Result<Option<StoredMessage>, StorageError> {
        self.finish_outgoing(message_id, Status::Failed, true)
    }

    /// Drop the outbox entry of `message_id` and move it to `status`; with `durable`, return
    /// only once that is on disk.
    fn finish_outgoing(
        &self,
        message_id: &[u8; 16],
        status: Status,
        durable: bool,
    ) -> Result<Option<StoredMessage>, StorageError> {
        let guard = self.lock();
        let peer = self
            .outgoing_peer(message_id)?
            .ok_or_else(|| StorageError::UnknownMessage {
                id: hex::encode(message_id),
            })?;
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_OUTBOX), message_id);
        let changed = self.stage_status(
            &mut batch,
            &message_key(&peer, Direction::Out, message_id),
            status,
        )?;
        let pending = self.write_pending(batch, false, "finishing an outgoing message")?;
        drop(guard);
        if durable {
            self.wait_durable(pending)?;
        }
        Ok(changed)
    }

    // --- own DHT records -----------------------------------------------------------------

    /// Save a record this node publishes (re-published after a restart).
    pub fn put_own_record(&self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        for (what, len) in [("record key", key.len()), ("record value", value.len())] {
            if len > MAX_RECORD_BYTES {
                return Err(StorageError::TooLarge {
                    what,
                    len,
                    limit: MAX_RECORD_BYTES,
                });
            }
        }
        self.put_one(
            CF_RECORDS,
            &prefixed(b'r', key),
            value,
            true,
            "saving a record",
        )
    }

    /// Forget a record this node published.
    pub fn delete_own_record(&self, key: &[u8]) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_RECORDS), prefixed(b'r', key));
        self.write(batch, true, "deleting a record")
    }

    /// Every record this node publishes, as (key, value).
    pub fn own_records(&self) -> Result<Vec<OwnRecord>, StorageError> {
        let mut out = Vec::new();
        let iter = self.inner.db.iterator_cf(
            self.cf(CF_RECORDS),
            IteratorMode::From(b"r", IterDirection::Forward),
        );
        for item in iter {
            let (key, value) = item.map_err(db_err("listing records"))?;
            if key.first() != Some(&b'r') {
                break;
            }
            out.push((key[1..].to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// Hand out the next sequence number for the record series `name` (1 for the first),
    /// durably, so a restarted node never republishes an older sequence number.
    pub fn bump_record_seq(&self, name: &str) -> Result<u64, StorageError> {
        let _guard = self.lock();
        let key = prefixed(b'q', name.as_bytes());
        let next = self
            .read_counter(CF_RECORDS, &key, "record sequence")?
            .saturating_add(1);
        let bytes = encode("record sequence", &StoredCounter { value: next })?;
        self.put_one(CF_RECORDS, &key, &bytes, true, "bumping a record sequence")?;
        Ok(next)
    }

    // --- config --------------------------------------------------------------------------

    /// Bootstrap addresses remembered from earlier `--bootstrap` flags.
    pub fn bootstrap_addrs(&self) -> Result<Vec<String>, StorageError> {
        Ok(self
            .get_wire::<StoredBootstrap>(CF_META, KEY_BOOTSTRAP, "bootstrap list")?
            .map(|b| b.addrs)
            .unwrap_or_default())
    }

    /// Remember bootstrap addresses (added to the ones known, newest kept, at most
    /// [`MAX_BOOTSTRAP_ADDRS`]). Addresses longer than [`MAX_BOOTSTRAP_ADDR_BYTES`] are refused.
    pub fn remember_bootstrap(&self, addrs: &[String]) -> Result<(), StorageError> {
        if let Some(a) = addrs.iter().find(|a| a.len() > MAX_BOOTSTRAP_ADDR_BYTES) {
            return Err(StorageError::TooLarge {
                what: "bootstrap address",
                len: a.len(),
                limit: MAX_BOOTSTRAP_ADDR_BYTES,
            });
        }
        let _guard = self.lock();
        let mut list = self.bootstrap_addrs()?;
        for a in addrs {
            list.retain(|x| x != a);
            list.push(a.clone());
        }
        let excess = list.len().saturating_sub(MAX_BOOTSTRAP_ADDRS);
        list.drain(..excess);
        let bytes = encode("bootstrap list", &StoredBootstrap { addrs: list })?;
        self.put_one(
            CF_META,
            KEY_BOOTSTRAP,
            &bytes,
            true,
            "saving bootstrap addresses",
        )
    }
}

/// RocksDB reports a held `LOCK` file as an I/O error: "While lock file: …/LOCK: Resource
/// temporarily unavailable" (another process) or "lock hold by current process … /LOCK: No locks
/// available" (this process). Match those, not any message containing "lock" ("block …").
fn is_lock_error(e: &rocksdb::Error) -> bool {
    let s = e.to_string();
    s.contains("/LOCK")
        || s.contains("While lock file")
        || s.contains("lock hold by current process")
}

fn read_pid(home: &Path) -> Option<u32> {
    match fs::read_to_string(home.join(PID_FILE)) {
        Ok(s) => s.trim().parse().ok(),
        Err(e) if e.kind() == IoErrorKind::NotFound => None,
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_only_moves_forward() {
        use Status::*;
        assert!(Queued.advances_to(Stored { replicas: 1 }));
        assert!(Stored { replicas: 1 }.advances_to(Stored { replicas: 3 }));
        assert!(!Stored { replicas: 3 }.advances_to(Stored { replicas: 2 }));
        assert!(!Delivered.advances_to(Stored { replicas: 5 }));
        assert!(Delivered.advances_to(Read));
        assert!(!Read.advances_to(Delivered));
        assert!(Failed.advances_to(Delivered));
        assert!(!Delivered.advances_to(Failed));
        assert!(!Queued.advances_to(Queued));
    }

    #[test]
    fn contact_names_are_validated() {
        assert!(validate_contact_name("alice").is_ok());
        assert!(validate_contact_name("Bob Smith").is_ok());
        assert!(validate_contact_name("").is_err());
        assert!(validate_contact_name(" bob").is_err());
        assert!(validate_contact_name("a\nb").is_err());
        assert!(validate_contact_name(&"x".repeat(65)).is_err());
        assert!(validate_contact_name(&"é".repeat(64)).is_ok());
        let uid = Identity::from_seed(&[1; 32]).user_id().to_string();
        assert!(validate_contact_name(&uid).is_err());
    }

    fn test_message(peer: &PublicIdentity, n: u8) -> StoredMessage {
        StoredMessage {
            id: [n; 16],
            peer: *peer,
            direction: Direction::Out,
            seq: u64::from(n),
            sent_at_ms: 1,
            received_at_ms: 1,
            body: format!("message {n}"),
            status: Status::Queued,
            group: None,
        }
    }

    #[test]
    fn one_sync_covers_every_batch_written_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open");
        let peer = Identity::from_seed(&[2; 32]).public();
        let syncs = || storage.sync_state().syncs;
        let before = syncs();
        let pending: Vec<PendingWrite> = (1..=5u8)
            .map(|n| {
                storage
                    .commit_outgoing_pending(&peer, b"state", &test_message(&peer, n), b"env", 9)
                    .expect("commit")
                    .1
            })
            .collect();
        // Written and visible before any sync.
        assert_eq!(syncs(), before);
        assert!(storage
            .message(&peer, Direction::Out, &[3; 16])
            .expect("read")
            .is_some());
        storage.wait_durable(pending[4]).expect("durable");
        assert_eq!(syncs(), before + 1, "one sync for the last batch");
        for p in &pending[..4] {
            storage.wait_durable(*p).expect("durable");
        }
        assert_eq!(syncs(), before + 1, "the earlier batches rode on that sync");
        storage.sync_barrier().expect("barrier");
        assert_eq!(syncs(), before + 1, "nothing new to sync");
        // A delivered mark is written without a sync; a barrier then syncs it.
        storage.mark_delivered(&[1; 16]).expect("delivered");
        assert_eq!(syncs(), before + 1);
        storage.sync_barrier().expect("barrier");
        assert_eq!(syncs(), before + 2);
        drop(storage);
        let storage = Storage::open(dir.path()).expect("reopen");
        assert_eq!(storage.outbox().expect("outbox").len(), 4);
        let (_, m) = storage
            .message(&peer, Direction::Out, &[1; 16])
            .expect("read")
            .expect("stored");
        assert_eq!(m.status, Status::Delivered);
    }

    #[test]
    fn concurrent_commits_all_persist_with_at_most_one_sync_each() {
        const THREADS: u8 = 16;
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open");
        let peer = Identity::from_seed(&[3; 32]).public();
        let before = storage.sync_state().syncs;
        let start = Arc::new(std::sync::Barrier::new(usize::from(THREADS)));
        let threads: Vec<_> = (1..=THREADS)
            .map(|n| {
                let storage = storage.clone();
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    storage
                        .commit_outgoing(&peer, b"state", &test_message(&peer, n), b"env", 1)
                        .expect("commit");
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let syncs = storage.sync_state().syncs - before;
        assert!(
            (1..=u64::from(THREADS)).contains(&syncs),
            "{syncs} syncs for {THREADS} commits"
        );
        drop(storage);
        let storage = Storage::open(dir.path()).expect("reopen");
        assert_eq!(
            storage.outbox().expect("outbox").len(),
            usize::from(THREADS)
        );
    }

    #[test]
    fn a_duplicate_incoming_envelope_waits_for_the_first_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(dir.path()).expect("open");
        let sender = Identity::from_seed(&[4; 32]).public();
        let (first, p1) = storage
            .commit_incoming_pending(&[9; 32], &sender, b"state", None, None, None)
            .expect("commit");
        assert_eq!(first, IncomingOutcome::New { index: None });
        let (again, p2) = storage
            .commit_incoming_pending(&[9; 32], &sender, b"state", None, None, None)
            .expect("commit");
        assert_eq!(again, IncomingOutcome::Duplicate);
        // Acknowledging the duplicate waits for the first copy's batch.
        assert!(p2 >= p1);
        let before = storage.sync_state().syncs;
        storage.wait_durable(p2).expect("durable");
        assert_eq!(storage.sync_state().syncs, before + 1);
        storage.wait_durable(p1).expect("durable");
        assert_eq!(storage.sync_state().syncs, before + 1);
    }

    #[test]
    fn lock_errors_are_recognised() {
        // The message RocksDB gives when another process holds the LOCK file.
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Storage::open(dir.path()).expect("first open");
        match Storage::open(dir.path()) {
            Err(StorageError::HomeInUse { pid, .. }) => {
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("expected HomeInUse, got {other:?}"),
        }
        drop(first);
    }
}
