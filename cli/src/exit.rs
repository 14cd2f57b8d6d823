//! Exit codes, all in one place, and [`Failure`]: a user's mistake or an outcome the user must
//! act on, as one sentence plus an exit code. See `docs/architecture.md`, section "CLI".

use std::fmt;

use meshchat_node::{
    control::{ControlError, ControlErrorKind},
    storage::{StorageError, StorageErrorKind},
    ErrorKind, NodeError,
};

/// Success.
pub(crate) const OK: u8 = 0;
/// Anything not listed below (internal errors, an identity that already exists, the running node
/// stopped answering in the middle of a request so that its outcome is unknown…).
pub(crate) const GENERIC: u8 = 1;
/// Bad usage or input: unknown flag, mistyped user ID, bad multiaddr, bad name, message too long.
pub(crate) const USAGE: u8 = 2;
/// The home has no identity yet: run `meshchat init`.
pub(crate) const NO_IDENTITY: u8 = 3;
/// Not found: unknown contact.
pub(crate) const NOT_FOUND: u8 = 4;
/// The network could not do it: not delivered (only queued), node not reachable.
pub(crate) const UNAVAILABLE: u8 = 5;
/// Another meshchat process uses this home.
pub(crate) const HOME_IN_USE: u8 = 6;
/// Nothing arrived in time (`inbox --wait`).
pub(crate) const TIMEOUT: u8 = 7;
/// The home's `meshchat.toml` cannot be used (the message names the line and the problem).
pub(crate) const BAD_CONFIG: u8 = 8;

/// A failure to report to the user: one sentence, a stable kind (for `--json`) and an exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) kind: &'static str,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(code: u8, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self::new(USAGE, "invalid_input", message)
    }

    pub(crate) fn from_control_kind(kind: ControlErrorKind, message: String) -> Self {
        let code = match kind {
            ControlErrorKind::NotFound => NOT_FOUND,
            ControlErrorKind::InvalidInput => USAGE,
            ControlErrorKind::Unavailable => UNAVAILABLE,
            ControlErrorKind::HomeInUse => HOME_IN_USE,
            ControlErrorKind::NoIdentity => NO_IDENTITY,
            ControlErrorKind::Timeout => TIMEOUT,
            _ => GENERIC,
        };
        Self::new(code, kind.as_str(), message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Self {
        let (code, kind) = match e.kind() {
            StorageErrorKind::HomeInUse => (HOME_IN_USE, "home_in_use"),
            StorageErrorKind::NoIdentity => (NO_IDENTITY, "no_identity"),
            StorageErrorKind::NotFound => (NOT_FOUND, "not_found"),
            StorageErrorKind::InvalidInput => (USAGE, "invalid_input"),
            StorageErrorKind::AlreadyExists => (GENERIC, "already_exists"),
            _ => (GENERIC, "internal"),
        };
        Self::new(code, kind, e.to_string())
    }
}

impl From<NodeError> for Failure {
    fn from(e: NodeError) -> Self {
        if let NodeError::Storage(s) = e {
            return s.into();
        }
        let (code, kind) = match e.kind() {
            ErrorKind::NotFound => (NOT_FOUND, "not_found"),
            ErrorKind::InvalidInput => (USAGE, "invalid_input"),
            ErrorKind::Unavailable => (UNAVAILABLE, "unavailable"),
            ErrorKind::HomeInUse => (HOME_IN_USE, "home_in_use"),
            ErrorKind::NoIdentity => (NO_IDENTITY, "no_identity"),
            _ => (GENERIC, "internal"),
        };
        Self::new(code, kind, e.to_string())
    }
}

impl From<ControlError> for Failure {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::NotRunning { .. } => Self::new(UNAVAILABLE, "not_running", e.to_string()),
            // Not UNAVAILABLE: that says "not done, retry"; here the outcome is unknown (a send
            // may or may not be in the outbox).
            ControlError::Closed | ControlError::Io { .. } | ControlError::Timeout { .. } => {
                Self::new(
                    GENERIC,
                    "unreachable",
                    format!("the node running on this home is not answering ({e})"),
                )
            }
            other => Self::new(GENERIC, "internal", other.to_string()),
        }
    }
}
