//! The node's error type and the small [`ErrorKind`] a caller acts on (retry, exit code, message).
//! See `docs/architecture.md`, "Errors".
//!
//! What a *remote peer* sends wrong is not a [`NodeError`]: those are [`crate::direct::RejectReason`]s
//! and [`crate::dht::RecordRejected`]s, logged at debug and counted against the peer.

use libp2p::{Multiaddr, TransportError};

use crate::storage::{StorageError, StorageErrorKind};

/// What the caller can do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The thing asked for does not exist (unknown contact, message, record).
    NotFound,
    /// The request itself is wrong (message too long, bad address); retrying will not help.
    InvalidInput,
    /// The network or the node cannot do it now (peer unreachable, node stopping); retry later.
    Unavailable,
    /// Another process runs a node on this home.
    HomeInUse,
    /// The home has no identity yet (`meshchat init`).
    NoIdentity,
    /// A bug or a broken disk: not the caller's fault.
    Internal,
}

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The storage layer failed (home in use, no identity, unknown contact, disk error…).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The libp2p swarm could not be built.
    #[error("cannot set up the network transport: {reason}")]
    Transport {
        /// What failed.
        reason: String,
    },
    /// Listening on an address failed (port in use, unsupported address…).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        #[source]
        source: TransportError<std::io::Error>,
    },
    /// A multiaddr given by the user cannot be used (e.g. a bootstrap address without `/p2p/`).
    #[error("bad address {addr}: {reason}")]
    BadAddress {
        /// The address as given.
        addr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The text is longer than one message may be.
    #[error("message is {len} bytes; the limit is {max} bytes")]
    MessageTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The text is empty.
    #[error("the message is empty")]
    EmptyMessage,
    /// The recipient is this user.
    #[error("that is your own user ID; you cannot send a message to yourself")]
    ToSelf,
    /// No session with the recipient yet, and no valid prekey bundle of theirs could be found in
    /// the DHT, so the first message cannot be encrypted.
    #[error("no prekey bundle for {user} found in the network (has this user run meshchat since you connected to the same network?)")]
    NoBundle {
        /// The recipient's user ID.
        user: String,
    },
    /// Encrypting or decrypting failed locally (corrupt session state).
    #[error("end-to-end encryption failed: {reason}")]
    Crypto {
        /// What failed.
        reason: String,
    },
    /// Stored protocol state could not be encoded or decoded.
    #[error("{what}: {source}")]
    Wire {
        /// Which value.
        what: &'static str,
        /// The wire error.
        #[source]
        source: meshchat_protocol::WireError,
    },
    /// The control socket could not be served.
    #[error("cannot serve the control socket: {reason}")]
    Control {
        /// Why.
        reason: String,
    },
    /// The node is shutting down (or has stopped) and cannot take the request.
    #[error("the node is shutting down")]
    Stopped,
    /// A background task failed.
    #[error("internal error: {reason}")]
    Internal {
        /// What failed.
        reason: String,
    },
    /// A group operation failed (unknown group or invite, no right to do it…).
    #[error(transparent)]
    Group(#[from] crate::groups::GroupOpError),
}

impl NodeError {
    /// What the caller can do about it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            NodeError::Storage(e) => storage_kind(e),
            NodeError::Group(e) => e.kind(),
            NodeError::Listen { .. }
            | NodeError::NoBundle { .. }
            | NodeError::Stopped
            | NodeError::Control { .. } => ErrorKind::Unavailable,
            NodeError::BadAddress { .. }
            | NodeError::MessageTooLong { .. }
            | NodeError::EmptyMessage
            | NodeError::ToSelf => ErrorKind::InvalidInput,
            NodeError::Transport { .. }
            | NodeError::Crypto { .. }
            | NodeError::Wire { .. }
            | NodeError::Internal { .. } => ErrorKind::Internal,
        }
    }

    pub(crate) fn internal(reason: impl std::fmt::Display) -> Self {
        NodeError::Internal {
            reason: reason.to_string(),
        }
    }
}

fn storage_kind(e: &StorageError) -> ErrorKind {
    match e.kind() {
        StorageErrorKind::HomeInUse => ErrorKind::HomeInUse,
        StorageErrorKind::NoIdentity => ErrorKind::NoIdentity,
        StorageErrorKind::NotFound => ErrorKind::NotFound,
        StorageErrorKind::AlreadyExists | StorageErrorKind::InvalidInput => ErrorKind::InvalidInput,
        _ => ErrorKind::Internal,
    }
}

impl From<tokio::task::JoinError> for NodeError {
    fn from(e: tokio::task::JoinError) -> Self {
        NodeError::internal(format!("background task failed: {e}"))
    }
}
