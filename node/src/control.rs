//! The control protocol between the `meshchat` CLI and the node running on the same home: a Unix
//! socket at `HOME/control.sock`, its framing, the typed requests and responses, the server that
//! answers them from a [`ControlBackend`] (the running node, or storage alone) and the client.
//! See `docs/architecture.md`, section "Control socket".
//!
//! # Protocol
//! ```text
//! client                                   server
//!   | -- frame(ControlRequest) ------------> |   validated like network input
//!   | <------------ frame(ControlResponse) -- |   one response, or for streams
//!   | <------------ frame(Message/Contact) -- |   any number of items …
//!   | <------------ frame(End | Error) ------ |   … then End (or Error)
//!   | -- next request, or close ----------->  |
//! frame = u32 big-endian length || payload (at most MAX_FRAME_BYTES);
//! payload = wire encoding (protocol/src/wire.rs) of the request or response.
//! ```
//! The socket is only for the owner (mode 0600 inside a 0700 home). Still, its bytes are treated
//! as untrusted: an oversized, truncated or undecodable frame closes that connection with a logged
//! typed error, and the server keeps serving others. Connections are limited by a semaphore
//! ([`MAX_CONNECTIONS`]); each request has a timeout; an idle connection is closed.

use std::{
    collections::HashMap,
    fmt, fs, io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::{stream::BoxStream, StreamExt};
use meshchat_protocol::{impl_wire, PublicIdentity, SafetyNumber, UserId, Wire, WireError};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::{mpsc, Semaphore},
    task::JoinHandle,
};

use crate::groups::{GroupSendReport, GroupView, InviteView, MemberView};
use crate::storage::{
    self, Contact, Direction, MessageFilter, Status, Storage, StorageError, StorageErrorKind,
    StoredMessage,
};

/// The socket's file name inside the home.
pub const SOCKET_NAME: &str = "control.sock";
/// The largest frame payload accepted in either direction.
pub const MAX_FRAME_BYTES: usize = 256 * 1024;
/// Control connections served at once; more are refused with an error frame.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest text a `Send` request may carry: the protocol's limit on a message.
pub const MAX_REQUEST_TEXT_BYTES: usize = meshchat_protocol::MAX_TEXT_BYTES;
/// Longest `to` or `user_id` field (a user ID is 61 characters; a name at most 64 characters).
pub const MAX_ADDRESSEE_BYTES: usize = 4 * storage::MAX_CONTACT_NAME_CHARS;
/// The longest `inbox --wait`.
pub const MAX_WAIT_SECS: u32 = 24 * 3600;
/// Time allowed for most requests.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for a `Send` (the node reports "queued" well before this).
pub const SEND_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// An idle connection (no request) is closed after this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Once a frame header arrived, its body must follow within this.
pub const FRAME_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Items per listing sent before the stream ends (a bound on the work of one request).
pub const MAX_LIST_ITEMS: usize = 100_000;
/// Messages read from storage at a time by `Inbox`.
const INBOX_BATCH: usize = 1024;
/// Lists inside one response (addresses, connected peers) are cut to this many entries.
pub const MAX_STATUS_LIST: usize = 256;
/// Message ids in one `MarkRead` (one read receipt's worth).
pub const MAX_MARK_READ_IDS: usize = meshchat_protocol::content::MAX_RECEIPT_IDS;
/// Our messages whose status a followed `Conversation` watches (the most recent ones).
const MAX_WATCHED_STATUSES: usize = 1024;
/// A followed `Conversation` re-reads storage at least this often (a missed event, a message
/// sent by another command).
const CONVERSATION_RESCAN: Duration = Duration::from_secs(3);
/// The text of a conversation's last message in a `Conversations` item is cut to this many
/// characters.
pub const MAX_PREVIEW_CHARS: usize = 120;

/// The path of the control socket of `home`.
pub fn socket_path(home: &Path) -> PathBuf {
    home.join(SOCKET_NAME)
}

// ---------------------------------------------------------------------------------------------
// Requests and responses
// ---------------------------------------------------------------------------------------------

/// What the CLI asks the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ControlRequest {
    /// The node's status ([`ControlResponse::Status`]).
    Status,
    /// The user ID of the home ([`ControlResponse::Id`]).
    Id,
    /// Add a contact ([`ControlResponse::Contact`]).
    ContactAdd {
        /// The name.
        name: String,
        /// Their user ID, as text.
        user_id: String,
    },
    /// All contacts: [`ControlResponse::Contact`] items then [`ControlResponse::End`].
    ContactList,
    /// Remove a contact ([`ControlResponse::Contact`], the removed one).
    ContactRemove {
        /// The name.
        name: String,
    },
    /// The safety number with a contact ([`ControlResponse::Verify`]); with `confirm`, also mark
    /// the contact verified.
    ContactVerify {
        /// The name.
        name: String,
        /// The user compared the numbers and confirmed.
        confirm: bool,
    },
    /// Send a text ([`ControlResponse::Sent`]).
    Send {
        /// A contact name or a user ID.
        to: String,
        /// The text.
        text: String,
    },
    /// Received messages, oldest first: [`ControlResponse::Message`] items then
    /// [`ControlResponse::End`]. Messages shown are marked read.
    Inbox {
        /// Only messages after this arrival index.
        after_index: Option<u64>,
        /// If nothing unread was listed, wait up to this long for a new message; if none comes,
        /// the stream ends with an `Error` of kind `Timeout`.
        wait_secs: Option<u32>,
        /// Keep streaming new messages until the client disconnects.
        follow: bool,
    },
    /// Stop the node ([`ControlResponse::Done`]).
    Shutdown,
    /// One conversation, both directions, in conversation order: [`ControlResponse::Message`]
    /// items; with `follow`, then new messages of either direction and
    /// [`ControlResponse::MessageStatus`] for every status change of our messages, as they
    /// happen, until the client leaves; then [`ControlResponse::End`]. Nothing is marked read
    /// (that is `MarkRead`, once the user has seen them).
    Conversation {
        /// A contact name or a user ID.
        peer: String,
        /// Only messages after this arrival index.
        after_index: Option<u64>,
        /// Only the last this many messages of the listing (at most [`MAX_LIST_ITEMS`]).
        last: Option<u32>,
        /// Keep streaming new messages and status changes until the client disconnects.
        follow: bool,
    },
    /// Every conversation (contacts, and user IDs we exchanged messages with), most recent
    /// first, then contacts without messages by name: [`ControlResponse::Conversation`] items
    /// then [`ControlResponse::End`].
    Conversations,
    /// The user has seen these incoming messages from `peer`: mark them read and, for 1:1
    /// messages, tell the sender (a read receipt, best effort) ([`ControlResponse::Done`]). Ids
    /// that are not incoming messages from `peer` are ignored.
    MarkRead {
        /// A contact name or a user ID.
        peer: String,
        /// Message ids, 32 hex digits each; 1 to [`MAX_MARK_READ_IDS`].
        ids: Vec<String>,
    },
    /// One group's messages, as `Conversation` (items are [`ControlResponse::Message`] with the
    /// author as `peer_user_id`, and with `follow` [`ControlResponse::MessageStatus`] for ours).
    /// Group messages are marked read with `MarkRead` and their author as `peer` (no receipt
    /// is sent for them).
    GroupConversation {
        /// The group's name, its id (64 hex digits) or an unambiguous prefix of 8 or more.
        group: String,
        /// Only the last this many messages of the listing (at most [`MAX_LIST_ITEMS`]).
        last: Option<u32>,
        /// Keep streaming new messages and status changes until the client disconnects.
        follow: bool,
    },
    /// Create a group ([`ControlResponse::Group`]).
    GroupCreate {
        /// Its name, 1 to 100 bytes.
        name: String,
    },
    /// Add a contact to a group and send them an invite ([`ControlResponse::Invite`]).
    GroupInvite {
        /// The group: name, id, or id prefix of at least 8 hex digits.
        group: String,
        /// A contact name or a user ID.
        contact: String,
    },
    /// Invites received and not answered: [`ControlResponse::Invite`] items then
    /// [`ControlResponse::End`].
    GroupInvites,
    /// Join a group by the code of a pending invite ([`ControlResponse::Group`]).
    GroupJoin {
        /// The invite code (16 hex digits).
        code: String,
    },
    /// Send a text to a group ([`ControlResponse::GroupSent`]).
    GroupSend {
        /// The group.
        group: String,
        /// The text.
        text: String,
    },
    /// A group's members: [`ControlResponse::Member`] items then [`ControlResponse::End`].
    GroupMembers {
        /// The group.
        group: String,
    },
    /// Leave a group ([`ControlResponse::Done`]).
    GroupLeave {
        /// The group.
        group: String,
    },
    /// Remove a member from a group ([`ControlResponse::Done`]).
    GroupRemove {
        /// The group.
        group: String,
        /// A contact name or a user ID.
        contact: String,
    },
    /// The groups we are in: [`ControlResponse::Group`] items then [`ControlResponse::End`].
    GroupList,
}
impl_wire!(ControlRequest, MAX_FRAME_BYTES);

/// The kinds of error a client acts on (exit codes, retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ControlErrorKind {
    /// Unknown contact or message.
    NotFound,
    /// The request is wrong (bad name, bad user ID, message too long, duplicate contact).
    InvalidInput,
    /// The node cannot do it now (peer unreachable, node stopping, needs a running node).
    Unavailable,
    /// The home is used by another process.
    HomeInUse,
    /// No identity yet.
    NoIdentity,
    /// The request took longer than allowed, or nothing arrived in time.
    Timeout,
    /// Anything else.
    Internal,
}

impl ControlErrorKind {
    /// A stable lower-case name (for `--json`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::InvalidInput => "invalid_input",
            Self::Unavailable => "unavailable",
            Self::HomeInUse => "home_in_use",
            Self::NoIdentity => "no_identity",
            Self::Timeout => "timeout",
            Self::Internal => "internal",
        }
    }
}

/// The user ID (and, when known, the node's peer ID) of a home.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdView {
    /// `mc1…`.
    pub user_id: String,
    /// The libp2p peer ID of this home's node.
    pub peer_id: String,
}

/// A contact as shown to the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactView {
    /// The name.
    pub name: String,
    /// `mc1…`.
    pub user_id: String,
    /// Safety number confirmed.
    pub verified: bool,
    /// When added, ms since the epoch.
    pub added_at_ms: u64,
}

impl From<&Contact> for ContactView {
    fn from(c: &Contact) -> Self {
        Self {
            name: c.name.clone(),
            user_id: c.identity.user_id().to_string(),
            verified: c.verified,
            added_at_ms: c.added_at_ms,
        }
    }
}

/// The safety number of a contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyView {
    /// The contact (its `verified` after the request).
    pub contact: ContactView,
    /// Our user ID.
    pub own_user_id: String,
    /// Twelve groups of five digits.
    pub safety_number: String,
}

/// How far a sent message got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SendOutcome {
    /// The recipient's node acknowledged it.
    Delivered,
    /// Stored in the recipient's mailbox on this many peers.
    Stored {
        /// Replicas that acknowledged.
        replicas: u32,
    },
    /// Only in our outbox; the node retries.
    Queued {
        /// Why it is not further.
        reason: String,
    },
}

/// The result of a `Send`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendView {
    /// The message id, hex.
    pub message_id: String,
    /// The recipient's user ID.
    pub to_user_id: String,
    /// The recipient's contact name, if a contact.
    pub to_name: Option<String>,
    /// How far it got.
    pub outcome: SendOutcome,
}

/// The status of a message, as shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusView {
    /// In the outbox.
    Queued,
    /// On replicas.
    Stored {
        /// How many.
        replicas: u32,
    },
    /// Delivered (incoming: received).
    Delivered,
    /// Read.
    Read,
    /// Given up.
    Failed,
}

impl From<Status> for StatusView {
    fn from(s: Status) -> Self {
        match s {
            Status::Queued => Self::Queued,
            Status::Stored { replicas } => Self::Stored { replicas },
            Status::Delivered => Self::Delivered,
            Status::Read => Self::Read,
            Status::Failed => Self::Failed,
        }
    }
}

impl fmt::Display for StatusView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Queued => f.write_str("queued"),
            Self::Stored { replicas } => write!(f, "stored on {replicas} replicas"),
            Self::Delivered => f.write_str("delivered"),
            Self::Read => f.write_str("read"),
            Self::Failed => f.write_str("failed"),
        }
    }
}

/// A message as shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageView {
    /// Arrival index (pass as `after_index` to continue).
    pub index: u64,
    /// Message id, hex.
    pub id: String,
    /// The other side's user ID.
    pub peer_user_id: String,
    /// The other side's contact name, if a contact.
    pub peer_name: Option<String>,
    /// Sent by us.
    pub outgoing: bool,
    /// Sender's sequence number.
    pub seq: u64,
    /// Sender's clock, ms.
    pub sent_at_ms: u64,
    /// Our clock on arrival, ms.
    pub received_at_ms: u64,
    /// The text.
    pub text: String,
    /// Its status before this listing.
    pub status: StatusView,
    /// The group it was sent in (64 hex digits), `None` for a 1:1 message.
    pub group_id: Option<String>,
    /// That group's name, if this home still knows the group.
    pub group_name: Option<String>,
}

/// A status change of one of our messages (an item of a followed `Conversation`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageStatusView {
    /// The message id, hex (as in its [`MessageView`]).
    pub id: String,
    /// The recipient's user ID.
    pub peer_user_id: String,
    /// The new status.
    pub status: StatusView,
}

/// Who a conversation is with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConversationWith {
    /// One person.
    Peer {
        /// Their user ID.
        user_id: String,
        /// Their contact name, if a contact.
        name: Option<String>,
        /// The contact's safety number was confirmed.
        verified: bool,
    },
    /// A group we are in.
    Group {
        /// The group id, 64 hex digits.
        id: String,
        /// Its name.
        name: String,
        /// How many members it has.
        members: u64,
    },
}

/// One conversation in the list of conversations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationView {
    /// The person or group.
    pub with: ConversationWith,
    /// Messages in the conversation, both directions.
    pub messages: u64,
    /// Incoming messages not read yet.
    pub unread: u64,
    /// The last message's time (the sender's clock), ms; `None` without messages.
    pub last_at_ms: Option<u64>,
    /// The last message's text, cut to [`MAX_PREVIEW_CHARS`] characters.
    pub last_text: Option<String>,
    /// The last message is ours.
    pub last_outgoing: bool,
}

/// A connected peer in a status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectedView {
    /// Peer ID.
    pub peer_id: String,
    /// Remote address.
    pub addr: String,
    /// Through a relay.
    pub relayed: bool,
}

/// The node's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatusView {
    /// libp2p peer ID.
    pub peer_id: String,
    /// `mc1…`.
    pub user_id: String,
    /// Full dialable multiaddrs ending in `/p2p/PEER_ID`.
    pub listen_addrs: Vec<String>,
    /// Confirmed external addresses.
    pub external_addrs: Vec<String>,
    /// Connected peers.
    pub connected: Vec<ConnectedView>,
    /// Kademlia routing table size.
    pub routing_table_size: u64,
    /// AutoNAT's verdict.
    pub nat_status: String,
    /// Relay reservations held.
    pub relay_reservations: Vec<String>,
    /// Mailbox envelopes held for others.
    pub mailbox_replicas_held: u64,
    /// Hole punching, relay serving, LAN mode.
    pub reachability: ReachabilityView,
}

/// The rest of the reachability part of the status (see `docs/operations.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReachabilityView {
    /// Relayed connections upgraded to direct ones by hole punching.
    pub hole_punches_succeeded: u64,
    /// Hole punching attempts that failed.
    pub hole_punches_failed: u64,
    /// On a home server: what it relays for others.
    pub relay_server: Option<RelayServerView>,
    /// LAN-only operation.
    pub lan_only: bool,
    /// mDNS discovery on.
    pub mdns: bool,
}

/// What a home server relays for others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayServerView {
    /// Reservations held for peers.
    pub reservations: u64,
    /// Circuits relayed now.
    pub circuits: u64,
    /// Reservations refused since start.
    pub reservations_refused: u64,
    /// Circuits refused since start.
    pub circuits_refused: u64,
}

impl NodeStatusView {
    /// Cut every list to [`MAX_STATUS_LIST`] so the response always fits a frame.
    pub fn bounded(mut self) -> Self {
        self.listen_addrs.truncate(MAX_STATUS_LIST);
        self.external_addrs.truncate(MAX_STATUS_LIST);
        self.connected.truncate(MAX_STATUS_LIST);
        self.relay_reservations.truncate(MAX_STATUS_LIST);
        self
    }
}

/// What the node answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ControlResponse {
    /// Answer to `Id`.
    Id(IdView),
    /// Answer to `Status`.
    Status(NodeStatusView),
    /// A contact (answer to add/remove; an item of `ContactList`).
    Contact(ContactView),
    /// Answer to `ContactVerify`.
    Verify(VerifyView),
    /// Answer to `Send`.
    Sent(SendView),
    /// An item of `Inbox`.
    Message(MessageView),
    /// Done (answer to `Shutdown`).
    Done,
    /// End of a stream.
    End,
    /// The request failed; ends a request (or a stream).
    Error {
        /// What kind of failure.
        kind: ControlErrorKind,
        /// One sentence for the user.
        message: String,
    },
    /// An item of a followed `Conversation`: one of our messages changed status.
    MessageStatus(MessageStatusView),
    /// An item of `Conversations`.
    Conversation(ConversationView),
    /// A group (answer to `GroupCreate` and `GroupJoin`; an item of `GroupList`).
    Group(GroupView),
    /// An invite (answer to `GroupInvite`; an item of `GroupInvites`).
    Invite(InviteView),
    /// An item of `GroupMembers`.
    Member(MemberView),
    /// Answer to `GroupSend`.
    GroupSent(GroupSendReport),
}
impl_wire!(ControlResponse, MAX_FRAME_BYTES);

impl ControlResponse {
    fn error(kind: ControlErrorKind, message: impl Into<String>) -> Self {
        Self::Error {
            kind,
            message: message.into(),
        }
    }

    /// Whether this response ends the answer to a request.
    pub fn is_final(&self, request: &ControlRequest) -> bool {
        match self {
            Self::End | Self::Error { .. } => true,
            Self::Contact(_) => !matches!(request, ControlRequest::ContactList),
            Self::Group(_) => !matches!(request, ControlRequest::GroupList),
            Self::Invite(_) => !matches!(request, ControlRequest::GroupInvites),
            Self::Member(_) => false,
            Self::Message(_) | Self::MessageStatus(_) | Self::Conversation(_) => false,
            _ => true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// What went wrong on a control connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No node serves this home (no socket, or nobody listening on it).
    #[error("no meshchat node is running on {} (start one with `meshchat run`)", home.display())]
    NotRunning {
        /// The home.
        home: PathBuf,
    },
    /// The socket path exists and is not a socket; it is left alone.
    #[error("{} exists and is not a socket; remove it if it is not needed", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// Another process serves this socket.
    #[error("another node already serves {}", path.display())]
    AlreadyServing {
        /// The path.
        path: PathBuf,
    },
    /// The socket path is too long for a Unix socket.
    #[error("the control socket path {} is too long for a Unix socket; use a shorter --home", path.display())]
    PathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// An I/O error.
    #[error("control socket: {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A frame announced more than [`MAX_FRAME_BYTES`].
    #[error("control frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The connection ended inside a frame.
    #[error("control connection closed in the middle of a frame")]
    Truncated,
    /// The connection ended before a response.
    #[error("the node closed the control connection before answering")]
    Closed,
    /// The payload did not decode.
    #[error("undecodable control frame: {0}")]
    Wire(#[from] WireError),
    /// Took too long.
    #[error("control connection timed out while {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
    },
    /// The peer broke the protocol (e.g. sent while it should wait).
    #[error("control protocol violation: {0}")]
    Protocol(&'static str),
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> ControlError {
    move |source| ControlError::Io { op, source }
}

/// An error a backend reports for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError {
    /// The kind.
    pub kind: ControlErrorKind,
    /// One sentence for the user.
    pub message: String,
}

impl BackendError {
    /// A new error.
    pub fn new(kind: ControlErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<BackendError> for ControlResponse {
    fn from(e: BackendError) -> Self {
        ControlResponse::Error {
            kind: e.kind,
            message: e.message,
        }
    }
}

impl From<StorageError> for BackendError {
    fn from(e: StorageError) -> Self {
        let kind = match e.kind() {
            StorageErrorKind::HomeInUse => ControlErrorKind::HomeInUse,
            StorageErrorKind::NoIdentity => ControlErrorKind::NoIdentity,
            StorageErrorKind::NotFound => ControlErrorKind::NotFound,
            StorageErrorKind::AlreadyExists | StorageErrorKind::InvalidInput => {
                ControlErrorKind::InvalidInput
            }
            _ => ControlErrorKind::Internal,
        };
        BackendError::new(kind, e.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Backend
// ---------------------------------------------------------------------------------------------

/// What the control server needs from a node. The running node's `NodeHandle` implements it;
/// [`StorageBackend`] implements it with storage alone (for commands that need no network).
#[async_trait::async_trait]
pub trait ControlBackend: Send + Sync + 'static {
    /// The home's storage.
    fn storage(&self) -> &Storage;
    /// The node's status.
    async fn status(&self) -> Result<NodeStatusView, BackendError>;
    /// Send `text` to `to`; returns once delivered or durably queued (the node's own timeout).
    async fn send_text(
        &self,
        to: PublicIdentity,
        text: String,
    ) -> Result<SendOutcomeReport, BackendError>;
    /// A stream that yields whenever a new message may have been stored (it may also yield
    /// spuriously). `None`: this backend cannot wait for messages (no node).
    fn message_wakeups(&self) -> Option<BoxStream<'static, ()>>;
    /// What a followed `Conversation` reacts to: messages stored, status changes of ours.
    /// `None`: this backend cannot follow (no node). The default turns every
    /// [`ControlBackend::message_wakeups`] item into a [`ConversationEvent::Rescan`].
    fn conversation_events(&self) -> Option<BoxStream<'static, ConversationEvent>> {
        self.message_wakeups()
            .map(|w| w.map(|()| ConversationEvent::Rescan).boxed())
    }
    /// Add a contact. The default writes it to storage; the node also publishes its presence
    /// record for the new contact.
    async fn add_contact(
        &self,
        name: String,
        identity: PublicIdentity,
    ) -> Result<Contact, BackendError> {
        blocking(self.storage(), move |s| s.add_contact(&name, &identity)).await
    }
    /// The user has been shown these incoming messages; they are marked read in storage
    /// already, and each carries its status from before. The node sends read receipts for
    /// those that were not read yet.
    async fn messages_shown(&self, _shown: Vec<StoredMessage>) {}
    /// Stop the node.
    async fn shutdown(&self) -> Result<(), BackendError>;
    /// A group request (contacts already resolved). The default: unavailable (groups need the
    /// running node).
    async fn group(&self, _request: GroupRequest) -> Result<GroupAnswer, BackendError> {
        Err(BackendError::new(ControlErrorKind::Unavailable, NEEDS_NODE))
    }
}

/// A group request for a [`ControlBackend`], its contact resolved to an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupRequest {
    /// Create a group.
    Create {
        /// Its name.
        name: String,
    },
    /// Add `contact` to `group` and invite them.
    Invite {
        /// The group reference.
        group: String,
        /// Who.
        contact: PublicIdentity,
    },
    /// Pending invites.
    Invites,
    /// Join by invite code.
    Join {
        /// The code.
        code: String,
    },
    /// Send a text.
    Send {
        /// The group reference.
        group: String,
        /// The text.
        text: String,
    },
    /// The members.
    Members {
        /// The group reference.
        group: String,
    },
    /// Leave.
    Leave {
        /// The group reference.
        group: String,
    },
    /// Remove a member.
    Remove {
        /// The group reference.
        group: String,
        /// Who.
        member: PublicIdentity,
    },
    /// The groups we are in.
    List,
}

/// What a backend answers to a [`GroupRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupAnswer {
    /// One group (create, join).
    Group(GroupView),
    /// Groups (list).
    Groups(Vec<GroupView>),
    /// One invite (invite).
    Invite(InviteView),
    /// Invites (invites).
    Invites(Vec<InviteView>),
    /// Members (members).
    Members(Vec<MemberView>),
    /// A send report (send).
    Sent(GroupSendReport),
    /// Done (leave, remove).
    Done,
}

/// Something that may change what a followed `Conversation` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConversationEvent {
    /// A message from `peer` was stored.
    Received {
        /// Its sender.
        peer: PublicIdentity,
    },
    /// Our message `id` to `peer` moved to `status`.
    Status {
        /// The recipient.
        peer: PublicIdentity,
        /// The message.
        id: [u8; 16],
        /// Its new status.
        status: Status,
    },
    /// Anything may have changed (events were missed): re-read storage.
    Rescan,
}

/// What a backend's `send_text` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcomeReport {
    /// The message id.
    pub message_id: [u8; 16],
    /// How far it got.
    pub outcome: SendOutcome,
}

/// A backend with storage only: contacts, id and inbox listing work; network requests answer
/// `Unavailable`.
#[derive(Debug, Clone)]
pub struct StorageBackend {
    storage: Storage,
}

impl StorageBackend {
    /// Over `storage`.
    pub fn new(storage: Storage) -> Self {
        Self { storage }
    }
}

const NEEDS_NODE: &str = "this needs a running node (start one with `meshchat run`)";

#[async_trait::async_trait]
impl ControlBackend for StorageBackend {
    fn storage(&self) -> &Storage {
        &self.storage
    }
    async fn status(&self) -> Result<NodeStatusView, BackendError> {
        Err(BackendError::new(ControlErrorKind::Unavailable, NEEDS_NODE))
    }
    async fn send_text(
        &self,
        _: PublicIdentity,
        _: String,
    ) -> Result<SendOutcomeReport, BackendError> {
        Err(BackendError::new(ControlErrorKind::Unavailable, NEEDS_NODE))
    }
    fn message_wakeups(&self) -> Option<BoxStream<'static, ()>> {
        None
    }
    async fn shutdown(&self) -> Result<(), BackendError> {
        Err(BackendError::new(ControlErrorKind::Unavailable, NEEDS_NODE))
    }
}

// ---------------------------------------------------------------------------------------------
// Validation and dispatch
// ---------------------------------------------------------------------------------------------

fn invalid(message: impl Into<String>) -> BackendError {
    BackendError::new(ControlErrorKind::InvalidInput, message)
}

fn check_lookup_name(name: &str) -> Result<(), BackendError> {
    if name.is_empty()
        || name.chars().count() > storage::MAX_CONTACT_NAME_CHARS
        || name.chars().any(char::is_control)
    {
        return Err(invalid(
            "a contact name is 1 to 64 characters without control characters",
        ));
    }
    Ok(())
}

fn parse_user_id(text: &str) -> Result<UserId, BackendError> {
    if text.len() > MAX_ADDRESSEE_BYTES {
        return Err(invalid("not a valid user ID (far too long)"));
    }
    text.parse::<UserId>().map_err(|e| invalid(e.to_string()))
}

/// A `to` / `peer` field: a contact name or a user ID, checked for size only.
/// A group reference: a name (at most 100 bytes) or a hex id or prefix.
fn check_group_ref(group: &str) -> Result<(), BackendError> {
    if group.trim().is_empty()
        || group.len() > meshchat_protocol::group::MAX_GROUP_NAME_BYTES.max(64)
        || group.chars().any(char::is_control)
    {
        return Err(invalid(
            "a group is named by its name or its id (64 hex digits, or a prefix of at least 8)",
        ));
    }
    Ok(())
}

fn check_addressee(to: &str) -> Result<(), BackendError> {
    if to.is_empty() || to.len() > MAX_ADDRESSEE_BYTES || to.chars().any(char::is_control) {
        return Err(invalid("the recipient must be a contact name or a user ID"));
    }
    Ok(())
}

/// A message id: 32 hex digits.
fn parse_message_id(text: &str) -> Result<[u8; 16], BackendError> {
    let mut id = [0u8; 16];
    if text.len() != 32 || hex::decode_to_slice(text, &mut id).is_err() {
        return Err(invalid("a message id is 32 hex digits"));
    }
    Ok(id)
}

/// Check a request the way network input is checked: sizes, names, user IDs. Returns the
/// sentence for the user if it is refused.
pub fn validate(request: &ControlRequest) -> Result<(), BackendError> {
    match request {
        ControlRequest::Status
        | ControlRequest::Id
        | ControlRequest::ContactList
        | ControlRequest::Shutdown => Ok(()),
        ControlRequest::ContactAdd { name, user_id } => {
            storage::validate_contact_name(name).map_err(BackendError::from)?;
            parse_user_id(user_id).map(|_| ())
        }
        ControlRequest::ContactRemove { name } | ControlRequest::ContactVerify { name, .. } => {
            check_lookup_name(name)
        }
        ControlRequest::Send { to, text } => {
            if to.is_empty() || to.len() > MAX_ADDRESSEE_BYTES || to.chars().any(char::is_control) {
                return Err(invalid("the recipient must be a contact name or a user ID"));
            }
            if text.trim().is_empty() {
                return Err(invalid("the message is empty"));
            }
            if text.len() > MAX_REQUEST_TEXT_BYTES {
                return Err(invalid(format!(
                    "the message is {} bytes; the limit is {MAX_REQUEST_TEXT_BYTES} bytes",
                    text.len()
                )));
            }
            Ok(())
        }
        ControlRequest::Conversation { peer, last, .. } => {
            check_addressee(peer)?;
            match last {
                Some(n) if *n as usize > MAX_LIST_ITEMS => Err(invalid(format!(
                    "at most the last {MAX_LIST_ITEMS} messages can be listed"
                ))),
                _ => Ok(()),
            }
        }
        ControlRequest::Conversations => Ok(()),
        ControlRequest::GroupConversation { group, last, .. } => {
            if group.trim().is_empty()
                || group.len() > MAX_ADDRESSEE_BYTES
                || group.chars().any(char::is_control)
            {
                return Err(invalid("a group is named by its name or its id"));
            }
            match last {
                Some(n) if *n as usize > MAX_LIST_ITEMS => Err(invalid(format!(
                    "at most the last {MAX_LIST_ITEMS} messages can be listed"
                ))),
                _ => Ok(()),
            }
        }
        ControlRequest::GroupCreate { name } => {
            if name.trim().is_empty()
                || name.len() > meshchat_protocol::group::MAX_GROUP_NAME_BYTES
                || name.chars().any(char::is_control)
            {
                return Err(invalid(format!(
                    "a group name is 1 to {} bytes without control characters",
                    meshchat_protocol::group::MAX_GROUP_NAME_BYTES
                )));
            }
            Ok(())
        }
        ControlRequest::GroupInvite { group, contact }
        | ControlRequest::GroupRemove { group, contact } => {
            check_group_ref(group)?;
            check_addressee(contact)
        }
        ControlRequest::GroupMembers { group } | ControlRequest::GroupLeave { group } => {
            check_group_ref(group)
        }
        ControlRequest::GroupSend { group, text } => {
            check_group_ref(group)?;
            if text.trim().is_empty() {
                return Err(invalid("the message is empty"));
            }
            if text.len() > MAX_REQUEST_TEXT_BYTES {
                return Err(invalid(format!(
                    "the message is {} bytes; the limit is {MAX_REQUEST_TEXT_BYTES} bytes",
                    text.len()
                )));
            }
            Ok(())
        }
        ControlRequest::GroupJoin { code } => {
            if code.trim().len() != 16 || !code.trim().bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid("an invite code is 16 hex digits"));
            }
            Ok(())
        }
        ControlRequest::GroupInvites | ControlRequest::GroupList => Ok(()),
        ControlRequest::MarkRead { peer, ids } => {
            check_addressee(peer)?;
            if ids.is_empty() || ids.len() > MAX_MARK_READ_IDS {
                return Err(invalid(format!(
                    "mark 1 to {MAX_MARK_READ_IDS} messages read at a time"
                )));
            }
            ids.iter()
                .try_for_each(|id| parse_message_id(id).map(|_| ()))
        }
        ControlRequest::Inbox { wait_secs, .. } => match wait_secs {
            Some(s) if *s > MAX_WAIT_SECS => Err(invalid(format!(
                "--wait is at most {MAX_WAIT_SECS} seconds"
            ))),
            _ => Ok(()),
        },
    }
}

/// How long a request may take (None: a stream that runs until the client leaves).
pub fn request_timeout(request: &ControlRequest) -> Option<Duration> {
    match request {
        ControlRequest::Send { .. }
        | ControlRequest::GroupSend { .. }
        | ControlRequest::GroupInvite { .. }
        | ControlRequest::GroupRemove { .. }
        | ControlRequest::GroupLeave { .. } => Some(SEND_REQUEST_TIMEOUT),
        ControlRequest::Inbox { follow: true, .. }
        | ControlRequest::Conversation { follow: true, .. }
        | ControlRequest::GroupConversation { follow: true, .. } => None,
        ControlRequest::Inbox {
            wait_secs: Some(s), ..
        } => Some(REQUEST_TIMEOUT + Duration::from_secs(u64::from(*s))),
        _ => Some(REQUEST_TIMEOUT),
    }
}

async fn blocking<T, F>(storage: &Storage, f: F) -> Result<T, BackendError>
where
    T: Send + 'static,
    F: FnOnce(&Storage) -> Result<T, StorageError> + Send + 'static,
{
    let storage = storage.clone();
    tokio::task::spawn_blocking(move || f(&storage))
        .await
        .map_err(|e| {
            BackendError::new(
                ControlErrorKind::Internal,
                format!("storage task failed: {e}"),
            )
        })?
        .map_err(BackendError::from)
}

/// Resolve a `to`: a contact name, else a user ID.
async fn resolve(
    storage: &Storage,
    to: String,
) -> Result<(PublicIdentity, Option<String>), BackendError> {
    let lookup = to.clone();
    let by_name = blocking(storage, move |s| match s.contact_by_name(&lookup) {
        Ok(c) => Ok(Some(c)),
        Err(StorageError::UnknownContact { .. }) => Ok(None),
        Err(e) => Err(e),
    })
    .await?;
    if let Some(c) = by_name {
        return Ok((c.identity, Some(c.name)));
    }
    let looks_like_id = to.len() > 40 && to.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("mc1"));
    match to.parse::<UserId>() {
        Ok(uid) => {
            let identity = uid.public();
            let name = blocking(storage, move |s| s.contact_by_identity(&identity))
                .await?
                .map(|c| c.name);
            Ok((identity, name))
        }
        Err(e) if looks_like_id => Err(invalid(e.to_string())),
        Err(_) => Err(BackendError::new(
            ControlErrorKind::NotFound,
            format!(
                "no contact named `{to}` (see `meshchat contact list`), and it is not a user ID"
            ),
        )),
    }
}

/// The names of the groups this home knows, by id (hex): read when a listing shows a group
/// message. Empty if the group state cannot be read (the messages are shown without it).
async fn group_names(storage: &Storage) -> HashMap<String, String> {
    let storage = storage.clone();
    tokio::task::spawn_blocking(move || {
        let store = crate::groups::store::GroupStore::open(storage).ok()?;
        let groups = store.groups().ok()?;
        Some(
            groups
                .into_iter()
                .map(|r| (hex::encode(r.state.id().0), r.state.name().to_owned()))
                .collect::<HashMap<_, _>>(),
        )
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default()
}

fn message_view(index: u64, m: &StoredMessage, name: Option<String>) -> MessageView {
    MessageView {
        index,
        id: hex::encode(m.id),
        peer_user_id: m.peer.user_id().to_string(),
        peer_name: name,
        outgoing: m.direction == Direction::Out,
        seq: m.seq,
        sent_at_ms: m.sent_at_ms,
        received_at_ms: m.received_at_ms,
        text: m.body.clone(),
        status: m.status.into(),
        group_id: m.group.map(hex::encode),
        group_name: None,
    }
}

/// Read incoming messages after `after` (contact names resolved), mark them read, return them.
async fn fetch_incoming(
    storage: &Storage,
    after: Option<u64>,
) -> Result<Vec<(u64, StoredMessage, Option<String>)>, BackendError> {
    blocking(storage, move |s| {
        let found = s.messages(&MessageFilter {
            peer: None,
            after_index: after,
            direction: Some(Direction::In),
            limit: Some(INBOX_BATCH),
        })?;
        let mut out = Vec::with_capacity(found.len());
        for (index, m) in found {
            let name = s.contact_by_identity(&m.peer)?.map(|c| c.name);
            if m.status != Status::Read {
                s.mark_read(&m.peer, &m.id)?;
            }
            out.push((index, m, name));
        }
        Ok(out)
    })
    .await
}

/// Answer one (validated) request, sending the responses to `out`. Returns when the answer is
/// complete, or when `out` is closed (the client left).
pub async fn handle_request<B: ControlBackend>(
    backend: Arc<B>,
    request: ControlRequest,
    out: mpsc::Sender<ControlResponse>,
) {
    let storage = backend.storage().clone();
    let single = |r: Result<ControlResponse, BackendError>| r.unwrap_or_else(ControlResponse::from);
    let response = match request {
        ControlRequest::Status => single(
            backend
                .status()
                .await
                .map(|s| ControlResponse::Status(s.bounded())),
        ),
        ControlRequest::Id => single(
            blocking(&storage, |s| {
                let identity = s.load_identity()?;
                let peer_id = s.node_keypair()?.public().to_peer_id();
                Ok(ControlResponse::Id(IdView {
                    user_id: identity.user_id().to_string(),
                    peer_id: peer_id.to_string(),
                }))
            })
            .await,
        ),
        ControlRequest::ContactAdd { name, user_id } => single(match parse_user_id(&user_id) {
            Err(e) => Err(e),
            Ok(uid) => backend
                .add_contact(name, uid.public())
                .await
                .map(|c| ControlResponse::Contact((&c).into())),
        }),
        ControlRequest::ContactRemove { name } => single(
            blocking(&storage, move |s| {
                s.remove_contact(&name)
                    .map(|c| ControlResponse::Contact((&c).into()))
            })
            .await,
        ),
        ControlRequest::ContactVerify { name, confirm } => single(
            blocking(&storage, move |s| {
                let own = s.load_identity()?.public();
                let contact = if confirm {
                    s.set_verified(&name, true)?
                } else {
                    s.contact_by_name(&name)?
                };
                Ok(ControlResponse::Verify(VerifyView {
                    safety_number: SafetyNumber::compute(&own, &contact.identity).to_string(),
                    own_user_id: own.user_id().to_string(),
                    contact: (&contact).into(),
                }))
            })
            .await,
        ),
        ControlRequest::ContactList => match blocking(&storage, |s| s.contacts()).await {
            Ok(contacts) => {
                for c in contacts.iter().take(MAX_LIST_ITEMS) {
                    if out.send(ControlResponse::Contact(c.into())).await.is_err() {
                        return;
                    }
                }
                ControlResponse::End
            }
            Err(e) => e.into(),
        },
        ControlRequest::Send { to, text } => single(
            async {
                let (identity, to_name) = resolve(&storage, to).await?;
                // The sender must have an identity: say so before the node does anything.
                blocking(&storage, |s| s.load_identity().map(|_| ())).await?;
                let report = backend.send_text(identity, text).await?;
                Ok(ControlResponse::Sent(SendView {
                    message_id: hex::encode(report.message_id),
                    to_user_id: identity.user_id().to_string(),
                    to_name,
                    outcome: report.outcome,
                }))
            }
            .await,
        ),
        ControlRequest::Inbox {
            after_index,
            wait_secs,
            follow,
        } => inbox(&*backend, &storage, after_index, wait_secs, follow, &out).await,
        ControlRequest::Conversation {
            peer,
            after_index,
            last,
            follow,
        } => {
            let scope = match resolve(&storage, peer).await {
                Ok((identity, name)) => Ok(Scope::Peer(identity, name)),
                Err(e) => Err(e),
            };
            match scope {
                Ok(scope) => {
                    conversation(&*backend, &storage, scope, after_index, last, follow, &out).await
                }
                Err(e) => e.into(),
            }
        }
        ControlRequest::GroupConversation {
            group,
            last,
            follow,
        } => match resolve_group(&*backend, &group).await {
            Ok(id) => {
                conversation(
                    &*backend,
                    &storage,
                    Scope::Group(id),
                    None,
                    last,
                    follow,
                    &out,
                )
                .await
            }
            Err(e) => e.into(),
        },
        ControlRequest::Conversations => conversations(&*backend, &storage, &out).await,
        ControlRequest::MarkRead { peer, ids } => {
            single(mark_read(&*backend, &storage, peer, ids).await)
        }
        ControlRequest::Shutdown => {
            let result = backend.shutdown().await;
            single(result.map(|()| ControlResponse::Done))
        }
        ControlRequest::GroupCreate { name } => {
            group_request(&*backend, &out, GroupRequest::Create { name }).await
        }
        ControlRequest::GroupInvite { group, contact } => match resolve(&storage, contact).await {
            Ok((contact, _)) => {
                group_request(&*backend, &out, GroupRequest::Invite { group, contact }).await
            }
            Err(e) => e.into(),
        },
        ControlRequest::GroupInvites => group_request(&*backend, &out, GroupRequest::Invites).await,
        ControlRequest::GroupJoin { code } => {
            group_request(&*backend, &out, GroupRequest::Join { code }).await
        }
        ControlRequest::GroupSend { group, text } => {
            group_request(&*backend, &out, GroupRequest::Send { group, text }).await
        }
        ControlRequest::GroupMembers { group } => {
            group_request(&*backend, &out, GroupRequest::Members { group }).await
        }
        ControlRequest::GroupLeave { group } => {
            group_request(&*backend, &out, GroupRequest::Leave { group }).await
        }
        ControlRequest::GroupRemove { group, contact } => match resolve(&storage, contact).await {
            Ok((member, _)) => {
                group_request(&*backend, &out, GroupRequest::Remove { group, member }).await
            }
            Err(e) => e.into(),
        },
        ControlRequest::GroupList => group_request(&*backend, &out, GroupRequest::List).await,
    };
    let _ = out.send(response).await;
}

/// Answer a group request: lists as a stream of items, then the final response.
async fn group_request<B: ControlBackend>(
    backend: &B,
    out: &mpsc::Sender<ControlResponse>,
    request: GroupRequest,
) -> ControlResponse {
    let answer = match backend.group(request).await {
        Ok(a) => a,
        Err(e) => return e.into(),
    };
    let items: Vec<ControlResponse> = match answer {
        GroupAnswer::Group(v) => return ControlResponse::Group(v),
        GroupAnswer::Invite(v) => return ControlResponse::Invite(v),
        GroupAnswer::Sent(r) => return ControlResponse::GroupSent(r),
        GroupAnswer::Done => return ControlResponse::Done,
        GroupAnswer::Groups(v) => v.into_iter().map(ControlResponse::Group).collect(),
        GroupAnswer::Invites(v) => v.into_iter().map(ControlResponse::Invite).collect(),
        GroupAnswer::Members(v) => v.into_iter().map(ControlResponse::Member).collect(),
    };
    for item in items.into_iter().take(MAX_LIST_ITEMS) {
        if out.send(item).await.is_err() {
            return ControlResponse::End;
        }
    }
    ControlResponse::End
}

/// The `Inbox` stream; returns its final response.
async fn inbox<B: ControlBackend>(
    backend: &B,
    storage: &Storage,
    after_index: Option<u64>,
    wait_secs: Option<u32>,
    follow: bool,
    out: &mpsc::Sender<ControlResponse>,
) -> ControlResponse {
    let waiting = follow || wait_secs.is_some();
    // Subscribe before listing so nothing stored in between is missed.
    let mut wakeups = match (waiting, backend.message_wakeups()) {
        (false, _) => None,
        (true, Some(w)) => Some(w),
        (true, None) => {
            return ControlResponse::error(
                ControlErrorKind::Unavailable,
                "waiting for messages needs a running node",
            )
        }
    };
    let mut last = after_index;
    let mut fresh = false;
    let mut expired = false;
    let deadline = wait_secs
        .filter(|_| !follow)
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(u64::from(s)));
    let mut first_round = true;
    loop {
        let batch = match fetch_incoming(storage, last).await {
            Ok(b) => b,
            Err(e) => return e.into(),
        };
        let complete = batch.len() < INBOX_BATCH;
        let mut shown = Vec::with_capacity(batch.len());
        let names = if batch.iter().any(|(_, m, _)| m.group.is_some()) {
            group_names(storage).await
        } else {
            HashMap::new()
        };
        for (index, m, name) in batch {
            last = Some(index);
            // In the first listing only unread messages count as new; after it, every one does.
            fresh |= !first_round || m.status != Status::Read;
            let mut view = message_view(index, &m, name);
            view.group_name = view.group_id.as_ref().and_then(|g| names.get(g).cloned());
            if out.send(ControlResponse::Message(view)).await.is_err() {
                return ControlResponse::End; // the client left
            }
            shown.push(m);
        }
        if !shown.is_empty() {
            backend.messages_shown(shown).await;
        }
        if !complete {
            continue; // a full batch: fetch the rest before waiting
        }
        first_round = false;
        let Some(w) = wakeups.as_mut() else {
            return ControlResponse::End;
        };
        if !follow && fresh {
            return ControlResponse::End;
        }
        if expired {
            return ControlResponse::error(
                ControlErrorKind::Timeout,
                format!(
                    "no new message arrived within {} seconds",
                    wait_secs.unwrap_or(0)
                ),
            );
        }
        let until_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        // Wake-ups say a message may have been stored; the periodic re-scan covers a missed one.
        tokio::select! {
            () = until_deadline => expired = true, // one last look at storage, then give up
            next = w.next() => if next.is_none() {
                return ControlResponse::error(ControlErrorKind::Unavailable, "the node stopped");
            },
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = out.closed() => return ControlResponse::End,
        }
    }
}

/// What a `Conversation` or `GroupConversation` shows.
#[derive(Debug, Clone)]
enum Scope {
    /// The 1:1 conversation with this peer (and its contact name).
    Peer(PublicIdentity, Option<String>),
    /// A group's messages.
    Group([u8; 32]),
}

impl Scope {
    fn matches(&self, m: &StoredMessage) -> bool {
        match self {
            Scope::Peer(peer, _) => m.peer == *peer && m.group.is_none(),
            Scope::Group(id) => m.group == Some(*id),
        }
    }
}

/// Contact names of message authors, looked up once each.
#[derive(Debug, Default)]
struct Names(std::collections::BTreeMap<PublicIdentity, Option<String>>);

impl Names {
    fn of(
        &mut self,
        s: &Storage,
        scope: &Scope,
        who: &PublicIdentity,
    ) -> Result<Option<String>, StorageError> {
        if let Scope::Peer(_, name) = scope {
            return Ok(name.clone());
        }
        if let Some(n) = self.0.get(who) {
            return Ok(n.clone());
        }
        let name = s.contact_by_identity(who)?.map(|c| c.name);
        self.0.insert(*who, name.clone());
        Ok(name)
    }
}

/// A listed message: arrival index, message, its author's contact name.
type Listed = (u64, StoredMessage, Option<String>);

/// Our messages of a followed conversation whose status may still change (not read yet): the
/// most recent [`MAX_WATCHED_STATUSES`], by arrival index.
#[derive(Debug, Default)]
struct Watched(std::collections::BTreeMap<u64, ([u8; 16], Status)>);

impl Watched {
    fn note(&mut self, index: u64, m: &StoredMessage) {
        if m.direction != Direction::Out || m.status == Status::Read {
            return;
        }
        self.0.insert(index, (m.id, m.status));
        while self.0.len() > MAX_WATCHED_STATUSES {
            self.0.pop_first();
        }
    }

    fn watches(&self, id: &[u8; 16]) -> bool {
        self.0.values().any(|(i, _)| i == id)
    }

    /// Record `status` for `id`; whether it is news (unwatched ids always are: the client keeps
    /// only progress).
    fn update(&mut self, id: &[u8; 16], status: Status) -> bool {
        let Some((&index, &(_, old))) = self.0.iter().find(|(_, (i, _))| i == id) else {
            return true;
        };
        if !old.advances_to(status) {
            return false;
        }
        if status == Status::Read {
            self.0.remove(&index);
        } else {
            self.0.insert(index, (*id, status));
        }
        true
    }
}

/// The first listing of a conversation: its last `keep` messages (1:1: in conversation order;
/// a group: in arrival order), and the arrival index to follow from.
fn list_conversation(
    s: &Storage,
    scope: &Scope,
    after_index: Option<u64>,
    keep: usize,
) -> Result<(Vec<Listed>, Option<u64>), StorageError> {
    let mut names = Names::default();
    match scope {
        Scope::Peer(peer, _) => {
            let mut all = s.messages(&MessageFilter {
                peer: Some(*peer),
                after_index,
                direction: None,
                limit: None,
            })?;
            let newest = all.iter().map(|(index, _)| *index).max();
            let skip = all.len().saturating_sub(keep);
            all.drain(..skip);
            let listed = all
                .into_iter()
                .map(|(i, m)| names.of(s, scope, &m.peer).map(|n| (i, m, n)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((listed, newest.max(after_index)))
        }
        Scope::Group(_) => {
            // Group messages are only in the arrival index: read it all once, keep the tail.
            let mut tail: std::collections::VecDeque<(u64, StoredMessage)> =
                std::collections::VecDeque::new();
            let mut after = after_index;
            loop {
                let batch = s.messages(&MessageFilter {
                    peer: None,
                    after_index: after,
                    direction: None,
                    limit: Some(INBOX_BATCH),
                })?;
                let complete = batch.len() < INBOX_BATCH;
                for (index, m) in batch {
                    after = Some(index);
                    if scope.matches(&m) {
                        tail.push_back((index, m));
                        if tail.len() > keep {
                            tail.pop_front();
                        }
                    }
                }
                if complete {
                    break;
                }
            }
            let listed = tail
                .into_iter()
                .map(|(i, m)| names.of(s, scope, &m.peer).map(|n| (i, m, n)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((listed, after))
        }
    }
}

/// Messages of the conversation after arrival index `after`, in arrival order. While a 1:1
/// conversation is empty (`after` is `None`) the conversation itself is read (it is small);
/// after that the arrival index is, so a long conversation is not re-read.
async fn conversation_since(
    storage: &Storage,
    scope: Scope,
    after: Option<u64>,
) -> Result<Vec<Listed>, BackendError> {
    blocking(storage, move |s| {
        let mut names = Names::default();
        let Some(mut after) = after else {
            let (mut all, _) = list_conversation(s, &scope, None, MAX_LIST_ITEMS)?;
            all.sort_by_key(|(index, ..)| *index);
            return Ok(all);
        };
        let mut out = Vec::new();
        loop {
            let batch = s.messages(&MessageFilter {
                peer: None,
                after_index: Some(after),
                direction: None,
                limit: Some(INBOX_BATCH),
            })?;
            let complete = batch.len() < INBOX_BATCH;
            for (index, m) in batch {
                after = index;
                if scope.matches(&m) && out.len() < MAX_LIST_ITEMS {
                    let name = names.of(s, &scope, &m.peer)?;
                    out.push((index, m, name));
                }
            }
            if complete {
                return Ok(out);
            }
        }
    })
    .await
}

fn status_item(peer: &PublicIdentity, id: &[u8; 16], status: Status) -> ControlResponse {
    ControlResponse::MessageStatus(MessageStatusView {
        id: hex::encode(id),
        peer_user_id: peer.user_id().to_string(),
        status: status.into(),
    })
}

/// The `Conversation` and `GroupConversation` streams; returns the final response.
async fn conversation<B: ControlBackend>(
    backend: &B,
    storage: &Storage,
    scope: Scope,
    after_index: Option<u64>,
    last: Option<u32>,
    follow: bool,
    out: &mpsc::Sender<ControlResponse>,
) -> ControlResponse {
    // Subscribe before listing so nothing stored in between is missed.
    let mut events = match (follow, backend.conversation_events()) {
        (false, _) => None,
        (true, Some(e)) => Some(e),
        (true, None) => {
            return ControlResponse::error(
                ControlErrorKind::Unavailable,
                "following a conversation needs a running node",
            )
        }
    };
    // Whose outgoing messages these are: the peer's (1:1), or ours (a group's).
    let owner = match &scope {
        Scope::Peer(peer, _) => *peer,
        Scope::Group(_) => match blocking(storage, |s| s.load_identity()).await {
            Ok(me) => me.public(),
            Err(e) => return e.into(),
        },
    };
    let keep = last
        .map_or(MAX_LIST_ITEMS, |n| n as usize)
        .min(MAX_LIST_ITEMS);
    let listed_scope = scope.clone();
    let listing = blocking(storage, move |s| {
        list_conversation(s, &listed_scope, after_index, keep)
    })
    .await;
    let (listing, mut last_index) = match listing {
        Ok(l) => l,
        Err(e) => return e.into(),
    };
    let mut watched = Watched::default();
    for (index, m, name) in &listing {
        watched.note(*index, m);
        let view = message_view(*index, m, name.clone());
        if out.send(ControlResponse::Message(view)).await.is_err() {
            return ControlResponse::End; // the client left
        }
    }
    let Some(events) = events.as_mut() else {
        return ControlResponse::End;
    };
    let mut rescan = tokio::time::interval(CONVERSATION_RESCAN);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rescan.reset();
    loop {
        // What to do after this wake-up: look for new messages, re-read watched statuses,
        // forward one status change.
        let (statuses, forward) = tokio::select! {
            event = events.next() => match event {
                None => return ControlResponse::error(ControlErrorKind::Unavailable, "the node stopped"),
                Some(ConversationEvent::Received { peer }) => {
                    // A group message may come from anyone.
                    if matches!(scope, Scope::Peer(..)) && peer != owner {
                        continue;
                    }
                    (false, None)
                }
                Some(ConversationEvent::Status { peer, id, status }) if peer == owner => {
                    if matches!(scope, Scope::Group(_)) && !watched.watches(&id) {
                        // One of our messages: to a person, or to another group.
                        (false, None)
                    } else {
                        (false, Some((id, status)))
                    }
                }
                Some(ConversationEvent::Rescan) => (true, None),
                Some(_) => continue,
            },
            _ = rescan.tick() => (true, None),
            () = out.closed() => return ControlResponse::End,
        };
        let fresh = match conversation_since(storage, scope.clone(), last_index).await {
            Ok(f) => f,
            Err(e) => return e.into(),
        };
        let mut listed = Vec::with_capacity(fresh.len());
        for (index, m, name) in fresh {
            last_index = last_index.max(Some(index));
            watched.note(index, &m);
            listed.push(m.id);
            let view = message_view(index, &m, name);
            if out.send(ControlResponse::Message(view)).await.is_err() {
                return ControlResponse::End;
            }
        }
        let mut changes = Vec::new();
        if let Some((id, status)) = forward {
            // A message listed just now carries its current status already.
            if !listed.contains(&id) && watched.update(&id, status) {
                changes.push((id, status));
            }
        }
        if statuses {
            let ids: Vec<[u8; 16]> = watched.0.values().map(|(id, _)| *id).collect();
            let current = blocking(storage, move |s| {
                let mut now = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some((_, m)) = s.message(&owner, Direction::Out, &id)? {
                        now.push((id, m.status));
                    }
                }
                Ok(now)
            })
            .await;
            match current {
                Ok(current) => {
                    for (id, status) in current {
                        if watched.update(&id, status) {
                            changes.push((id, status));
                        }
                    }
                }
                Err(e) => return e.into(),
            }
        }
        for (id, status) in changes {
            if out.send(status_item(&owner, &id, status)).await.is_err() {
                return ControlResponse::End;
            }
        }
    }
}

/// The group `reference` names among the groups we are in (its name, its id, or an
/// unambiguous prefix of 8 or more hex digits of its id).
async fn resolve_group<B: ControlBackend>(
    backend: &B,
    reference: &str,
) -> Result<[u8; 32], BackendError> {
    let groups = match backend.group(GroupRequest::List).await? {
        GroupAnswer::Groups(g) => g,
        _ => {
            return Err(BackendError::new(
                ControlErrorKind::Internal,
                "unexpected answer to a group list",
            ))
        }
    };
    let wanted = reference.trim();
    let lower = wanted.to_ascii_lowercase();
    let hex_prefix = lower.len() >= 8 && lower.bytes().all(|b| b.is_ascii_hexdigit());
    let by_name: Vec<&GroupView> = groups.iter().filter(|g| g.name == wanted).collect();
    let by_id: Vec<&GroupView> = groups
        .iter()
        .filter(|g| hex_prefix && g.id.starts_with(&lower))
        .collect();
    let found = match (by_name.as_slice(), by_id.as_slice()) {
        ([one], _) | ([], [one]) => *one,
        ([], []) => {
            return Err(BackendError::new(
                ControlErrorKind::NotFound,
                format!(
                    "no group `{}` (see `meshchat group list`)",
                    wanted.chars().take(80).collect::<String>()
                ),
            ))
        }
        _ => {
            return Err(invalid(format!(
                "`{}` names several groups; use the group's id (see `meshchat group list`)",
                wanted.chars().take(80).collect::<String>()
            )))
        }
    };
    let mut id = [0u8; 32];
    hex::decode_to_slice(&found.id, &mut id).map_err(|_| {
        BackendError::new(
            ControlErrorKind::Internal,
            "a group id is not 64 hex digits",
        )
    })?;
    Ok(id)
}

/// One conversation's summary while `Conversations` reads the messages.
#[derive(Debug, Default)]
struct Summary {
    messages: u64,
    unread: u64,
    /// Arrival index, time, text and direction of the last message.
    last: Option<(u64, u64, String, bool)>,
}

impl Summary {
    fn add(&mut self, index: u64, m: &StoredMessage) {
        self.messages += 1;
        if m.direction == Direction::In && m.status != Status::Read {
            self.unread += 1;
        }
        if self.last.as_ref().is_none_or(|(i, ..)| index > *i) {
            let preview: String = m.body.chars().take(MAX_PREVIEW_CHARS).collect();
            self.last = Some((index, m.sent_at_ms, preview, m.direction == Direction::Out));
        }
    }

    fn view(self, with: ConversationWith) -> ConversationView {
        let (last_at_ms, last_text, last_outgoing) = match self.last {
            Some((_, at, text, out)) => (Some(at), Some(text), out),
            None => (None, None, false),
        };
        ConversationView {
            with,
            messages: self.messages,
            unread: self.unread,
            last_at_ms,
            last_text,
            last_outgoing,
        }
    }
}

/// The `Conversations` listing (it reads every message once); returns its final response.
async fn conversations<B: ControlBackend>(
    backend: &B,
    storage: &Storage,
    out: &mpsc::Sender<ControlResponse>,
) -> ControlResponse {
    // Groups need the node; with storage alone there are only people.
    let groups = match backend.group(GroupRequest::List).await {
        Ok(GroupAnswer::Groups(g)) => g,
        _ => Vec::new(),
    };
    let views = blocking(storage, move |s| {
        let contacts = s.contacts()?;
        let mut by_peer: std::collections::BTreeMap<PublicIdentity, Summary> =
            std::collections::BTreeMap::new();
        let mut by_group: std::collections::BTreeMap<[u8; 32], Summary> =
            std::collections::BTreeMap::new();
        let mut after = None;
        loop {
            let batch = s.messages(&MessageFilter {
                peer: None,
                after_index: after,
                direction: None,
                limit: Some(INBOX_BATCH),
            })?;
            let complete = batch.len() < INBOX_BATCH;
            for (index, m) in batch {
                after = Some(index);
                match m.group {
                    Some(g) => by_group.entry(g).or_default().add(index, &m),
                    None => by_peer.entry(m.peer).or_default().add(index, &m),
                }
            }
            if complete {
                break;
            }
        }
        // (last arrival index, view) for those with messages; the others by name.
        let mut with_messages = Vec::new();
        let mut without = Vec::new();
        let mut known = std::collections::BTreeSet::new();
        for c in &contacts {
            known.insert(c.identity);
            let summary = by_peer.remove(&c.identity).unwrap_or_default();
            let last = summary.last.as_ref().map(|l| l.0);
            let view = summary.view(ConversationWith::Peer {
                user_id: c.identity.user_id().to_string(),
                name: Some(c.name.clone()),
                verified: c.verified,
            });
            match last {
                Some(i) => with_messages.push((i, view)),
                None => without.push((c.name.clone(), view)),
            }
        }
        for (peer, summary) in by_peer {
            if known.contains(&peer) {
                continue;
            }
            let last = summary.last.as_ref().map_or(0, |l| l.0);
            let view = summary.view(ConversationWith::Peer {
                user_id: peer.user_id().to_string(),
                name: None,
                verified: false,
            });
            with_messages.push((last, view));
        }
        for g in groups {
            let mut id = [0u8; 32];
            if hex::decode_to_slice(&g.id, &mut id).is_err() {
                continue;
            }
            let summary = by_group.remove(&id).unwrap_or_default();
            let last = summary.last.as_ref().map(|l| l.0);
            let view = summary.view(ConversationWith::Group {
                id: g.id,
                name: g.name.clone(),
                members: g.members as u64,
            });
            match last {
                Some(i) => with_messages.push((i, view)),
                None => without.push((g.name, view)),
            }
        }
        with_messages.sort_by_key(|(last, _)| std::cmp::Reverse(*last));
        without.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(with_messages
            .into_iter()
            .map(|(_, v)| v)
            .chain(without.into_iter().map(|(_, v)| v))
            .take(MAX_LIST_ITEMS)
            .collect::<Vec<_>>())
    })
    .await;
    match views {
        Ok(views) => {
            for v in views {
                if out.send(ControlResponse::Conversation(v)).await.is_err() {
                    return ControlResponse::End;
                }
            }
            ControlResponse::End
        }
        Err(e) => e.into(),
    }
}

/// `MarkRead`: mark the incoming messages `ids` from `peer` read, then let the backend tell
/// the sender about the 1:1 ones.
async fn mark_read<B: ControlBackend>(
    backend: &B,
    storage: &Storage,
    peer: String,
    ids: Vec<String>,
) -> Result<ControlResponse, BackendError> {
    let (identity, _) = resolve(storage, peer).await?;
    let ids = ids
        .iter()
        .map(|id| parse_message_id(id))
        .collect::<Result<Vec<_>, _>>()?;
    let shown = blocking(storage, move |s| {
        let mut shown = Vec::new();
        for id in ids {
            if let Some((_, m)) = s.message(&identity, Direction::In, &id)? {
                if m.status != Status::Read {
                    s.mark_read(&identity, &id)?;
                    // Receipts are for 1:1 messages.
                    if m.group.is_none() {
                        shown.push(m);
                    }
                }
            }
        }
        Ok(shown)
    })
    .await?;
    if !shown.is_empty() {
        backend.messages_shown(shown).await;
    }
    Ok(ControlResponse::Done)
}

/// Validate and answer `request` in this process (no socket), as the server would: returns the
/// receiver of the responses (the last one is final, see [`ControlResponse::is_final`]).
pub fn local_request<B: ControlBackend>(
    backend: Arc<B>,
    request: ControlRequest,
) -> mpsc::Receiver<ControlResponse> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        if let Err(e) = validate(&request) {
            let _ = tx.send(e.into()).await;
            return;
        }
        let timeout = request_timeout(&request);
        let err_tx = tx.clone();
        let work = handle_request(backend, request, tx);
        match timeout {
            Some(t) => {
                if tokio::time::timeout(t, work).await.is_err() {
                    let _ = err_tx
                        .send(ControlResponse::error(
                            ControlErrorKind::Timeout,
                            "the request timed out",
                        ))
                        .await;
                }
            }
            None => work.await,
        }
    });
    rx
}

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

/// Read one frame: `Ok(None)` on a clean end of stream before a frame started.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, ControlError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r
            .read(&mut header[got..])
            .await
            .map_err(io_err("reading a frame"))?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ControlError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(ControlError::FrameTooLarge {
            len,
            limit: MAX_FRAME_BYTES,
        });
    }
    let mut body = vec![0u8; len];
    match tokio::time::timeout(FRAME_BODY_TIMEOUT, r.read_exact(&mut body)).await {
        Err(_) => Err(ControlError::Timeout {
            what: "reading a frame body",
        }),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ControlError::Truncated),
        Ok(Err(e)) => Err(ControlError::Io {
            op: "reading a frame",
            source: e,
        }),
        Ok(Ok(_)) => Ok(Some(body)),
    }
}

/// Write one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> Result<(), ControlError> {
    if payload.len() > MAX_FRAME_BYTES {
        return Err(ControlError::FrameTooLarge {
            len: payload.len(),
            limit: MAX_FRAME_BYTES,
        });
    }
    let len = u32::try_from(payload.len()).expect("invariant: MAX_FRAME_BYTES fits in u32");
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf).await.map_err(io_err("writing a frame"))?;
    w.flush().await.map_err(io_err("writing a frame"))
}

async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    r: &ControlResponse,
) -> Result<(), ControlError> {
    let bytes = match r.to_wire() {
        Ok(b) => b,
        // Only an oversized answer fails to encode; tell the client instead.
        Err(e) => ControlResponse::error(
            ControlErrorKind::Internal,
            format!("response too large: {e}"),
        )
        .to_wire()?,
    };
    write_frame(w, &bytes).await
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// A running control server. Dropping it (or [`ControlServer::shutdown`]) stops accepting,
/// closes the connections and removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl ControlServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop serving and remove the socket.
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        // Drop removes the file.
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = fs::remove_file(&self.path);
    }
}

/// Remove `path` if it is a socket nobody listens on; refuse if it is something else or live.
fn clear_stale_socket(path: &Path) -> Result<(), ControlError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspecting the socket path")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ControlError::AlreadyServing {
            path: path.to_path_buf(),
        }),
        Err(_) => {
            tracing::info!(path = %path.display(), "removing a stale control socket");
            fs::remove_file(path).map_err(io_err("removing a stale socket"))
        }
    }
}

/// Serve the control protocol on `path` (normally [`socket_path`] of the home) with `backend`.
/// A stale socket file (no listener) is removed first. Must be called inside a tokio runtime.
pub fn serve<B: ControlBackend>(backend: B, path: &Path) -> Result<ControlServer, ControlError> {
    // sockaddr_un holds 108 bytes including the terminating NUL.
    if path.as_os_str().len() >= 108 {
        return Err(ControlError::PathTooLong {
            path: path.to_path_buf(),
        });
    }
    clear_stale_socket(path)?;
    let listener = UnixListener::bind(path).map_err(io_err("binding the socket"))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(io_err("restricting the socket to its owner"))?;
    let backend = Arc::new(backend);
    let task = tokio::spawn(accept_loop(listener, backend));
    Ok(ControlServer {
        path: path.to_path_buf(),
        task,
    })
}

async fn accept_loop<B: ControlBackend>(listener: UnixListener, backend: Arc<B>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let backend = backend.clone();
                        connections.spawn(async move {
                            if let Err(e) = serve_connection(stream, backend).await {
                                tracing::warn!(error = %e, "control connection closed");
                            }
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!("refusing a control connection: {MAX_CONNECTIONS} already open");
                        connections.spawn(async move {
                            let busy = ControlResponse::error(
                                ControlErrorKind::Unavailable,
                                "the node is busy with too many control connections; try again",
                            );
                            let _ = tokio::time::timeout(Duration::from_secs(1), write_response(&mut stream, &busy)).await;
                        });
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Serve one connection: requests one at a time until the client closes.
async fn serve_connection<B: ControlBackend>(
    stream: UnixStream,
    backend: Arc<B>,
) -> Result<(), ControlError> {
    let (mut reader, mut writer) = stream.into_split();
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut reader)).await {
            Err(_) => {
                return Err(ControlError::Timeout {
                    what: "waiting for a request",
                })
            }
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(f))) => f,
            Ok(Err(e)) => {
                if matches!(e, ControlError::FrameTooLarge { .. }) {
                    let _ = write_response(
                        &mut writer,
                        &ControlResponse::error(ControlErrorKind::InvalidInput, e.to_string()),
                    )
                    .await;
                }
                return Err(e);
            }
        };
        let request = match ControlRequest::from_wire(&frame) {
            Ok(r) => r,
            Err(e) => {
                let _ = write_response(
                    &mut writer,
                    &ControlResponse::error(
                        ControlErrorKind::InvalidInput,
                        format!("undecodable request: {e}"),
                    ),
                )
                .await;
                return Err(ControlError::Wire(e));
            }
        };
        if let Err(e) = validate(&request) {
            tracing::debug!(?request, error = %e.message, "control request refused");
            write_response(&mut writer, &e.into()).await?;
            continue;
        }
        tracing::debug!(?request, "control request");
        let timeout = request_timeout(&request);
        let (tx, mut rx) = mpsc::channel::<ControlResponse>(16);
        let work = handle_request(backend.clone(), request, tx);
        let work = async move {
            match timeout {
                Some(t) => tokio::time::timeout(t, work).await.is_ok(),
                None => {
                    work.await;
                    true
                }
            }
        };
        tokio::pin!(work);
        let mut work_done = false;
        let mut probe = [0u8; 1];
        loop {
            tokio::select! {
                biased;
                response = rx.recv() => match response {
                    Some(r) => write_response(&mut writer, &r).await?,
                    None => break, // the handler finished and everything was written
                },
                in_time = &mut work, if !work_done => {
                    work_done = true;
                    if !in_time {
                        // The handler (and its sender) are dropped; answer for it.
                        while let Ok(r) = rx.try_recv() {
                            write_response(&mut writer, &r).await?;
                        }
                        write_response(&mut writer, &ControlResponse::error(
                            ControlErrorKind::Timeout, "the request timed out")).await?;
                        break;
                    }
                },
                read = reader.read(&mut probe) => match read {
                    Ok(0) => return Ok(()), // the client left; drop the work
                    Ok(_) => return Err(ControlError::Protocol("a request arrived before the previous answer ended")),
                    Err(e) => return Err(io_err("reading")(e)),
                },
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// A connection to the node serving a home.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connect to the node serving `home`; [`ControlError::NotRunning`] if there is none.
    pub async fn connect(home: &Path) -> Result<Client, ControlError> {
        let path = socket_path(home);
        match UnixStream::connect(&path).await {
            Ok(stream) => Ok(Client { stream }),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                Err(ControlError::NotRunning {
                    home: home.to_path_buf(),
                })
            }
            Err(e) => Err(io_err("connecting")(e)),
        }
    }

    /// Send a request; read its responses with [`Client::next_response`].
    pub async fn send(&mut self, request: &ControlRequest) -> Result<(), ControlError> {
        let bytes = request.to_wire()?;
        write_frame(&mut self.stream, &bytes).await
    }

    /// The next response ([`ControlError::Closed`] if the node closed the connection).
    pub async fn next_response(&mut self) -> Result<ControlResponse, ControlError> {
        match read_frame(&mut self.stream).await? {
            None => Err(ControlError::Closed),
            Some(bytes) => Ok(ControlResponse::from_wire(&bytes)?),
        }
    }

    /// Send a request and return its single response (for requests that are not streams).
    pub async fn call(
        &mut self,
        request: &ControlRequest,
    ) -> Result<ControlResponse, ControlError> {
        self.send(request).await?;
        self.next_response().await
    }
}
