#![doc = include_str!("../README.md")]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod addressing;
pub mod content;
pub mod envelope;
pub mod group;
pub mod identity;
pub mod mailbox;
pub mod prekey;
pub mod ratchet;
pub mod records;
pub mod replay;
pub mod session;
pub mod wire;
pub mod x3dh;

pub use addressing::{
    epoch, first_contact_mailbox, mailbox_key, pair_secret, PairSecret, EPOCH_SECS,
};
pub use content::{Content, ContentError, MessageId, ReceiptKind, MAX_TEXT_BYTES};
pub use envelope::{Envelope, EnvelopeError, Opened, PairEnvelopeKey};
pub use group::{
    group_key_id, group_mailbox, open_group, seal_group, topic_for, Applied, GroupBody,
    GroupControl, GroupError, GroupId, GroupInvite, GroupPlaintext, GroupSnapshot, GroupState,
    MembershipChange, MembershipOp, ReceiverChain, Role, SenderChain, SenderKeyDistribution,
    VerifiedInvite, GROUP_TOPIC_PREFIX, MAX_GROUP_MEMBERS,
};
pub use identity::{Identity, IdentityError, PublicIdentity, SafetyNumber, UserId};
pub use mailbox::{MailboxKeys, MailboxReject, MailboxRequest, MailboxResponse};
pub use prekey::{BundleError, PrekeyBundle, PrekeyPublic, PrekeySecrets, VerifiedBundle};
pub use ratchet::{RatchetError, RatchetMessage, RatchetState};
pub use records::{
    bundle_record_key, validate_record, Presence, PresenceKeys, PresencePeer, PresenceRecord,
    RecordError, RecordKind, ValidRecord,
};
pub use replay::ReplayCache;
pub use session::{
    open_message, open_pair_message, seal_message, seal_pair_message, Received, SessionError,
    SessionMessage, SessionRecord,
};
pub use wire::{Wire, WireError};
pub use x3dh::{PreKeyHeader, X3dhError};
