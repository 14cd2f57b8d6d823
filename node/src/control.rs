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
            Self::Message(_) => false,
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
    /// Add a contact. The default writes it to storage; the node also publishes its presence
    /// record for the new contact.
    async fn add_contact(
        &self,
        name: String,
        identity: PublicIdentity,
    ) -> Result<Contact, BackendError> {
        blocking(self.storage(), move |s| s.add_contact(&name, &identity)).await
    }
    /// The user has been shown these incoming messages (the node may send read receipts).
    async fn messages_shown(&self, _shown: Vec<StoredMessage>) {}
    /// Stop the node.
    async fn shutdown(&self) -> Result<(), BackendError>;
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
        ControlRequest::Send { .. } => Some(SEND_REQUEST_TIMEOUT),
        ControlRequest::Inbox { follow: true, .. } => None,
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
        ControlRequest::Shutdown => {
            let result = backend.shutdown().await;
            single(result.map(|()| ControlResponse::Done))
        }
    };
    let _ = out.send(response).await;
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
        for (index, m, name) in batch {
            last = Some(index);
            // In the first listing only unread messages count as new; after it, every one does.
            fresh |= !first_round || m.status != Status::Read;
            let view = message_view(index, &m, name);
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
