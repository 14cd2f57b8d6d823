//! Group channels: create, invite, join, leave and remove members, and messages end-to-end
//! encrypted for the members only, carried by gossipsub and kept in the group's mailbox for
//! members that were offline. See `docs/architecture.md`, "Groups", and `docs/protocol.md`,
//! "Groups".
//!
//! ```text
//! group_send ─► seal (own sender chain) ─► commit (chain, message, pending store: one batch)
//!           ├─► sender key to members lacking it ─► 1:1 durable outbox (crate::messaging)
//!           ├─► gossipsub publish (kept by the event loop until a member subscribes)
//!           └─► STORE in the day's group mailbox (retried until a quorum holds it)
//! gossipsub ─► event loop ─► validate here (decode, size, replay, decrypt, signature, member)
//!                            └─► Accept (forward) / Reject (score P4, strike) / Ignore
//! 1:1 Content::Group ─► inbox (durable) ─► invites, sender keys, ops, rekeys applied in order
//! collector ─► FETCH every group mailbox of the last days ─► sorted by chain position ─► open
//! ```
//!
//! The public API is the `group_*` methods of [`crate::NodeHandle`] below; a group is named by
//! its name (unique per home) or its id in hex (64 digits, or an unambiguous prefix of at least
//! 8).

pub(crate) mod service;
pub(crate) mod store;

use std::time::Duration;

use libp2p::PeerId;
use meshchat_protocol::{GroupError, PublicIdentity};
use serde::{Deserialize, Serialize};

use crate::{error::NodeError, node::NodeHandle};

/// Group settings, with their defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// How long gossipsub remembers the ids of messages it has seen, to drop copies silently.
    /// A copy that arrives later is a replay and is rejected. Default 120 s.
    pub duplicate_cache_time: Duration,
    /// The gossipsub heartbeat (mesh maintenance, gossip). Default 700 ms.
    pub heartbeat_interval: Duration,
    /// How often every group mailbox is read even without a reason (members also read it when
    /// they start, join, and reconnect). Default 300 s.
    pub collect_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            duplicate_cache_time: Duration::from_secs(120),
            heartbeat_interval: Duration::from_millis(700),
            collect_interval: Duration::from_secs(300),
        }
    }
}

/// A group, as `group list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    /// The group id, 64 hex digits.
    pub id: String,
    /// Its name.
    pub name: String,
    /// The membership epoch (seq of the last membership change).
    pub epoch: u64,
    /// How many members it has.
    pub members: usize,
    /// Our role: `admin` or `member`.
    pub role: String,
    /// Its gossipsub topic (reveals nothing about name or members).
    pub topic: String,
}

/// A member of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// Their user ID.
    pub user_id: String,
    /// Their contact name, if they are a contact.
    pub name: Option<String>,
    /// `admin` or `member`.
    pub role: String,
    /// Whether this is us.
    pub is_me: bool,
}

/// An invite (received and waiting, or just sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteView {
    /// The code to join with (16 hex digits).
    pub code: String,
    /// The group id, 64 hex digits.
    pub group_id: String,
    /// The group's name.
    pub group_name: String,
    /// The inviter's user ID.
    pub from: String,
    /// The inviter's contact name, if a contact.
    pub from_name: Option<String>,
    /// Members (the invitee included).
    pub members: usize,
    /// When it arrived (or was sent), ms since the epoch.
    pub received_at_ms: u64,
}

/// How far a group message got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupSendOutcome {
    /// Sent over gossipsub to subscribed members (and stored in the group mailbox, if it could
    /// be).
    Published,
    /// No member was reachable over gossipsub yet; stored in the group mailbox (and kept to be
    /// published as soon as a member subscribes).
    Stored,
    /// Neither yet: kept on disk; the node stores it in the group mailbox as soon as it can,
    /// and publishes it when a member subscribes.
    Queued,
}

/// The result of [`NodeHandle::group_send`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSendReport {
    /// The message id, hex.
    pub message_id: String,
    /// Gossipsub peers subscribed to the group's topic it was sent to.
    pub peers: usize,
    /// Group mailbox replicas that acknowledged it.
    pub stored_replicas: usize,
    /// Summary.
    pub outcome: GroupSendOutcome,
}

/// How a peer stands with this node (gossipsub score, strikes): for diagnostics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PeerStandingView {
    /// Its gossipsub score (`None`: scoring does not know it).
    pub score: Option<f64>,
    /// Strikes against it (bad requests of any protocol).
    pub strikes: u32,
    /// Whether it is blocked now.
    pub banned: bool,
}

/// Why a group operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupOpError {
    /// No group has this name or id.
    #[error("no group `{group}` (see `meshchat group list`)")]
    UnknownGroup {
        /// What the user typed.
        group: String,
    },
    /// The name or id prefix fits several groups.
    #[error("`{group}` names several groups ({candidates}); use the group id")]
    Ambiguous {
        /// What the user typed.
        group: String,
        /// The ids that match (hex prefixes).
        candidates: String,
    },
    /// A group with this name exists already.
    #[error("a group named `{name}` exists already")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// No pending invite has this code.
    #[error("no pending invite with code `{code}` (see `meshchat group invites`)")]
    UnknownInvite {
        /// The code as given.
        code: String,
    },
    /// We are not (or no longer) a member of the group.
    #[error("you are not a member of group `{group}`")]
    NotMember {
        /// The group's name.
        group: String,
    },
    /// The protocol refused (no right to do it, group full, bad name…).
    #[error(transparent)]
    Refused(#[from] GroupError),
}

impl GroupOpError {
    /// What the caller can do about it.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            Self::UnknownGroup { .. } | Self::UnknownInvite { .. } => ErrorKind::NotFound,
            Self::Ambiguous { .. }
            | Self::NameTaken { .. }
            | Self::NotMember { .. }
            | Self::Refused(_) => ErrorKind::InvalidInput,
        }
    }
}

/// The gossipsub behaviour type of a node (anonymous, content-addressed, with a raised topic
/// limit).
pub type ComparisonGossipsub = libp2p::gossipsub::Behaviour<
    libp2p::gossipsub::IdentityTransform,
    libp2p::gossipsub::MaxCountSubscriptionFilter<libp2p::gossipsub::AllowAllSubscriptionFilter>,
>;

/// The gossipsub behaviour exactly as a node configured with `config` builds it (message ids,
/// validation, heartbeat, flood publishing, peer scoring), and the score parameters it sets on
/// every group topic: for benchmarks that run bare gossipsub beside real nodes with the same
/// parameters (`simulations/`, `meshchat-sim group-bench`; `docs/performance.md`, "Groups").
#[doc(hidden)]
pub fn gossipsub_as_configured(
    config: &crate::NodeConfig,
) -> Result<(ComparisonGossipsub, libp2p::gossipsub::TopicScoreParams), NodeError> {
    Ok((
        crate::event_loop::gossipsub_behaviour(config)?,
        crate::event_loop::topic_score_params(),
    ))
}

impl NodeHandle {
    /// Create a group with `name` (1 to 100 bytes, not used by another group of this home);
    /// we are its first member and admin.
    pub async fn group_create(&self, name: &str) -> Result<GroupView, NodeError> {
        self.inner.groups.create(name).await
    }

    /// Add `contact` to `group` (we must be an admin) and send them an invite over the 1:1
    /// channel (through the durable outbox). Returns the invite as sent.
    pub async fn group_invite(
        &self,
        group: &str,
        contact: &PublicIdentity,
    ) -> Result<InviteView, NodeError> {
        self.inner.groups.invite(group, contact).await
    }

    /// Invites received and not yet answered, oldest first.
    pub async fn group_invites(&self) -> Result<Vec<InviteView>, NodeError> {
        self.inner.groups.invites().await
    }

    /// Join the group of the pending invite with `code`.
    pub async fn group_join(&self, code: &str) -> Result<GroupView, NodeError> {
        self.inner.groups.join(code).await
    }

    /// Send `text` to everybody in `group`. Returns once it is durably queued and was offered
    /// to gossipsub and to the group mailbox, saying how far it got.
    pub async fn group_send(
        &self,
        group: &str,
        text: String,
    ) -> Result<GroupSendReport, NodeError> {
        self.inner.groups.send(group, text).await
    }

    /// Test hook, not a supported API: the group envelopes this node holds because it cannot
    /// open them yet, counted by why (no sender key, a later epoch, an earlier message or ops
    /// missing). `simulations/` prints it for members that missed messages.
    #[doc(hidden)]
    pub fn group_held(&self) -> Vec<(&'static str, usize)> {
        self.inner.groups.held_by_reason()
    }

    /// The members of `group`, in the order they were added.
    pub async fn group_members(&self, group: &str) -> Result<Vec<MemberView>, NodeError> {
        self.inner.groups.members(group).await
    }

    /// Leave `group` (the other members are told; we stop receiving its messages).
    pub async fn group_leave(&self, group: &str) -> Result<(), NodeError> {
        self.inner.groups.leave(group).await
    }

    /// Remove `member` from `group` (we must be an admin): every remaining member then starts a
    /// new sender chain and the group mailbox gets a new secret, so they cannot read what
    /// follows.
    pub async fn group_remove(
        &self,
        group: &str,
        member: &PublicIdentity,
    ) -> Result<(), NodeError> {
        self.inner.groups.remove(group, member).await
    }

    /// The groups we are a member of.
    pub async fn group_list(&self) -> Result<Vec<GroupView>, NodeError> {
        self.inner.groups.list().await
    }

    /// Read every group mailbox now (the node also does this at start, on join, on reconnect
    /// and periodically). Returns how many new messages it stored.
    pub async fn group_collect(&self) -> Result<usize, NodeError> {
        self.inner.groups.collect_all().await
    }

    /// Peers known to be subscribed to `group`'s topic (our gossipsub view of the group).
    pub async fn group_topic_peers(&self, group: &str) -> Result<Vec<PeerId>, NodeError> {
        self.inner.groups.topic_peers(group).await
    }

    /// How `peer` stands with this node: gossipsub score, strikes, ban.
    pub async fn peer_standing(&self, peer: PeerId) -> Result<PeerStandingView, NodeError> {
        let s = self
            .inner
            .net
            .peer_standing(peer)
            .await
            .map_err(|_| NodeError::Stopped)?;
        Ok(PeerStandingView {
            score: s.score,
            strikes: s.strikes,
            banned: s.banned,
        })
    }

    /// Try to decrypt a group envelope (wire bytes) with every sender key this home holds for
    /// `group`, whatever its membership now: the text, if one of them opens it. For tests and
    /// audits of what a (removed) member can read.
    #[doc(hidden)]
    pub async fn group_try_open(
        &self,
        group: &str,
        envelope: Vec<u8>,
    ) -> Result<Option<String>, NodeError> {
        self.inner.groups.try_open(group, envelope).await
    }
}
