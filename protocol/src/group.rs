//! Group channels: membership, sender keys, group messages and invites. See `docs/protocol.md`,
//! section "Groups".
//!
//! A group is named by a fresh Ed25519 *group key* ([`GroupId`] = SHA-256 of a domain and its
//! public half); its membership is a hash-chained log of signed [`MembershipOp`]s that every member
//! folds into a [`GroupState`] with the same deterministic rule (concurrent ops: lower hash wins).
//! Messages are encrypted Signal-style with per-member *sender chains* ([`SenderChain`] /
//! [`ReceiverChain`], HMAC-SHA256 chain keys) and travel as ordinary, bucket-padded [`Envelope`]s
//! routed by the day's group mailbox, so gossipsub and the mailbox service carry them unchanged.
//! Invites ([`GroupInvite`]) and sender-key hand-outs travel over the 1:1 channel as
//! [`GroupControl`] content.

use std::{fmt, str::FromStr};

use crate::ratchet::kdf_ck; // the chain step is the Double Ratchet's
use chacha20poly1305::{
    aead::{Aead, Payload},
    ChaCha20Poly1305,
};
use hkdf::Hkdf;
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::{
    addressing::EPOCH_SECS,
    content::{MessageId, MAX_TEXT_BYTES},
    envelope::{ciphertext_len, Envelope, BUCKETS, MAX_TTL_SECS, PAD_OVERHEAD, PAD_PREFIX_BYTES},
    identity::{Identity, PublicIdentity},
    mailbox::MailboxKeys,
    prekey::MAX_CLOCK_SKEW_SECS,
    wire::{Wire, WireError, WIRE_VERSION},
};

/// The most members a group may have.
pub const MAX_GROUP_MEMBERS: usize = 1_000;
/// The prefix of every group's gossipsub topic.
pub const GROUP_TOPIC_PREFIX: &str = "mc-g1-";
/// The longest group name, in bytes of UTF-8.
pub const MAX_GROUP_NAME_BYTES: usize = 100;
/// The TTL of a group message envelope: 7 days.
pub const GROUP_TTL_SECS: u32 = 7 * 86_400;
/// Most message keys one message may make a receiver chain skip.
pub const MAX_GROUP_SKIP: u32 = 1_000;
/// Most skipped message keys one receiver chain keeps (oldest evicted first).
pub const MAX_GROUP_STORED_SKIPPED: usize = 2_000;
/// How many ops behind the head a concurrent op can still win (the log window).
pub const FORK_WINDOW: usize = 32;
/// Most ops a state keeps outside its log (waiting for their predecessor, or lost ties).
pub const MAX_PENDING_OPS: usize = 64;
/// Op hashes remembered after they leave the window, to recognise re-deliveries.
pub const MAX_RECENT_OPS: usize = 256;
/// Departed members remembered, to accept their late messages from before they left.
pub const MAX_DEPARTED: usize = 1_000;
/// How long an invite stays valid: 14 days (the 1:1 mailbox TTL).
pub const INVITE_MAX_AGE_MS: u64 = 14 * 86_400_000;

/// The hash prefix of a group id.
pub const GROUP_ID_DOMAIN: &[u8] = b"meshchat/group-id/v1";
/// The hash prefix of a group topic.
pub const GROUP_TOPIC_DOMAIN: &[u8] = b"meshchat/group-topic/v1";
/// The HKDF info prefix of a group mailbox seed (followed by the day epoch, u64 LE).
pub const GROUP_MAILBOX_INFO: &[u8] = b"meshchat/group-mailbox/v1";
/// The HKDF info of a group message's AEAD key and nonce.
pub const GROUP_MESSAGE_KEY_INFO: &[u8] = b"meshchat/group-message/v1";
/// The signature domain of membership ops (author).
pub const OP_SIGNATURE_DOMAIN: &[u8] = b"group-op";
/// The signature domain of the genesis op's second signature (group key).
pub const GENESIS_SIGNATURE_DOMAIN: &[u8] = b"group-genesis";
/// The signature domain of group messages.
pub const MESSAGE_SIGNATURE_DOMAIN: &[u8] = b"group-message";
/// The signature domain of invites.
pub const INVITE_SIGNATURE_DOMAIN: &[u8] = b"group-invite";
/// HMAC input deriving a message key from a sender chain key.
pub const CHAIN_MESSAGE_INPUT: u8 = crate::ratchet::KDF_CK_MESSAGE;
/// HMAC input deriving the next sender chain key.
pub const CHAIN_NEXT_INPUT: u8 = crate::ratchet::KDF_CK_CHAIN;
/// Length of the key id in a group message header.
pub const KEY_ID_BYTES: usize = 16;
/// Most sender keys one [`GroupBody::KeyRequest`] may ask for.
pub const MAX_KEY_REQUEST_IDS: usize = 16;

/// Largest wire encoding of a [`MembershipOp`] (version, group, seq, prev, author, time,
/// the largest change (Create: variant, name, key), signature, group signature).
pub const MAX_OP_BYTES: usize =
    1 + 32 + 8 + 32 + 32 + 8 + (4 + 8 + MAX_GROUP_NAME_BYTES + 32) + 64 + (1 + 64);
/// Bytes per snapshot member: identity, role, added seq.
const SNAPSHOT_MEMBER_BYTES: usize = 32 + 4 + 8;
/// Largest wire encoding of a [`GroupSnapshot`].
pub const MAX_SNAPSHOT_BYTES: usize = 1
    + 32
    + (8 + MAX_GROUP_NAME_BYTES)
    + 8
    + 32
    + (8 + MAX_GROUP_MEMBERS * SNAPSHOT_MEMBER_BYTES)
    + 8;
/// Largest wire encoding of a [`GroupInvite`].
pub const MAX_INVITE_BYTES: usize =
    1 + 32 + 32 + (8 + MAX_GROUP_NAME_BYTES) + (MAX_SNAPSHOT_BYTES - 1) + 32 + 32 + 8 + 64;
/// Largest wire encoding of a [`SenderKeyDistribution`].
pub const MAX_DISTRIBUTION_BYTES: usize = 1 + 32 + 8 + 32 + 16 + 32 + 4;
/// Largest wire encoding of a [`GroupControl`]: the largest invite, after the variant index.
pub const MAX_GROUP_CONTROL_BYTES: usize = 4 + MAX_INVITE_BYTES;
/// Largest wire encoding of a [`GroupBody`]: a maximal text.
pub const MAX_GROUP_BODY_BYTES: usize = 1 + 4 + 8 + crate::content::MAX_TEXT_BYTES;
/// Largest wire encoding of a [`GroupPlaintext`].
pub const MAX_GROUP_PLAINTEXT_BYTES: usize =
    1 + 32 + 8 + 32 + 16 + 8 + (MAX_GROUP_BODY_BYTES - 1) + 64;
/// Largest wire encoding of a [`SenderChain`].
pub const MAX_SENDER_CHAIN_BYTES: usize = 1 + 16 + 32 + 4;
/// Largest wire encoding of a [`ReceiverChain`].
pub const MAX_RECEIVER_CHAIN_BYTES: usize =
    1 + 32 + 8 + 32 + 16 + 32 + 4 + 4 + 8 + MAX_GROUP_STORED_SKIPPED * (4 + 32);
/// Largest encoded roster: seq, head, rekey seq, members, departures.
const MAX_ROSTER_BYTES: usize = 8
    + 32
    + 8
    + (8 + MAX_GROUP_MEMBERS * SNAPSHOT_MEMBER_BYTES)
    + (8 + MAX_DEPARTED * (32 + 8 + 8));
/// Largest wire encoding of a [`GroupState`].
pub const MAX_GROUP_STATE_BYTES: usize = 1
    + 32
    + (8 + MAX_GROUP_NAME_BYTES)
    + MAX_ROSTER_BYTES
    + (8 + (FORK_WINDOW + 1) * (MAX_OP_BYTES - 1))
    + (8 + MAX_PENDING_OPS * (MAX_OP_BYTES - 1))
    + (8 + MAX_RECENT_OPS * 32);

/// A 64-byte signature with a serde form (bincode: 64 bytes, no length).
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Sig(#[serde(with = "serde_big_array::BigArray")] [u8; 64]);

/// A group's id: `SHA-256("meshchat/group-id/v1" || group_public_key)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupId(pub [u8; 32]);

impl GroupId {
    /// The id of the group whose group public key is `group_public`.
    pub fn from_public(group_public: &[u8; 32]) -> Self {
        let mut h = Sha256::new();
        h.update(GROUP_ID_DOMAIN);
        h.update(group_public);
        Self(h.finalize().into())
    }
}

impl fmt::Display for GroupId {
    /// 64 lower-case hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupId({self})")
    }
}

impl FromStr for GroupId {
    type Err = GroupError;
    /// 64 hex digits (either case, surrounding space ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const BAD: GroupError = GroupError::Malformed {
            why: "a group id is 64 hex digits",
        };
        let s = s.trim().as_bytes();
        if s.len() != 64 {
            return Err(BAD);
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
            let digit = |c: u8| (c as char).to_digit(16).ok_or(BAD);
            let (hi, lo) = (digit(pair[0])?, digit(pair[1])?);
            *o = u8::try_from(hi * 16 + lo).map_err(|_| BAD)?;
        }
        Ok(Self(out))
    }
}

/// A member's rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// May add and remove members (variant 0).
    Admin,
    /// May send and leave (variant 1).
    Member,
}

/// What a membership op does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// The genesis op (seq 0): the author is the creator and first admin (variant 0).
    Create {
        /// The group's name, 1 to [`MAX_GROUP_NAME_BYTES`] bytes.
        name: String,
        /// The group public key.
        group_public: [u8; 32],
    },
    /// An admin adds a member (variant 1).
    Add {
        /// Who.
        member: PublicIdentity,
        /// With which rights.
        role: Role,
    },
    /// An admin removes a member (variant 2).
    Remove {
        /// Who.
        member: PublicIdentity,
    },
    /// The author leaves (variant 3).
    Leave,
}

/// The signed part of a membership op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct OpBody {
    group: GroupId,
    seq: u64,
    prev: [u8; 32],
    author: PublicIdentity,
    issued_at_ms: u64,
    change: MembershipChange,
}

/// One signed entry of a group's membership log (wire type).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipOp {
    body: OpBody,
    signature: Sig,
    group_signature: Option<Sig>,
}

impl fmt::Debug for MembershipOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MembershipOp")
            .field("group", &self.body.group)
            .field("seq", &self.body.seq)
            .field("author", &self.body.author)
            .field("change", &self.body.change)
            .finish_non_exhaustive()
    }
}

impl MembershipOp {
    /// SHA-256 of the op's wire bytes.
    pub fn hash(&self) -> [u8; 32] {
        match self.to_wire() {
            Ok(bytes) => Sha256::digest(bytes).into(),
            // Only an op over its own limit fails to encode, and such an op is never accepted;
            // hash its fields so the value is still well defined.
            Err(_) => {
                let mut h = Sha256::new();
                h.update(format!("{:?}", self.body).as_bytes());
                h.update(self.signature.0);
                h.finalize().into()
            }
        }
    }

    /// Check the signatures and the rules that need no membership: genesis ops carry the group
    /// key's signature and a group id derived from it, later ops do not.
    fn verify_signatures(&self) -> Result<(), GroupError> {
        let body = self.body.to_wire()?;
        self.body
            .author
            .verify(OP_SIGNATURE_DOMAIN, &body, &self.signature.0)
            .map_err(|_| GroupError::Forged {
                why: "membership op signature does not verify",
            })?;
        match (&self.body.change, self.body.seq, &self.group_signature) {
            (MembershipChange::Create { name, group_public }, 0, Some(group_signature)) => {
                validate_name(name)?;
                if GroupId::from_public(group_public) != self.body.group {
                    return Err(GroupError::Forged {
                        why: "genesis names a group key of another group",
                    });
                }
                if self.body.prev != [0; 32] {
                    return Err(GroupError::Malformed {
                        why: "genesis op with a predecessor",
                    });
                }
                let key =
                    PublicIdentity::from_bytes(group_public).map_err(|_| GroupError::Forged {
                        why: "genesis group key is not a valid key",
                    })?;
                key.verify(GENESIS_SIGNATURE_DOMAIN, &body, &group_signature.0)
                    .map_err(|_| GroupError::Forged {
                        why: "genesis group key signature does not verify",
                    })
            }
            (MembershipChange::Create { .. }, 0, None) => Err(GroupError::Forged {
                why: "genesis op without the group key signature",
            }),
            (MembershipChange::Create { .. }, _, _) | (_, 0, _) => Err(GroupError::NotAllowed {
                why: "a group is created only by its genesis op (seq 0)",
            }),
            (_, _, Some(_)) => Err(GroupError::Malformed {
                why: "group key signature on an op other than genesis",
            }),
            (_, _, None) => Ok(()),
        }
    }

    fn sign(body: OpBody, author: &Identity) -> Result<Self, GroupError> {
        let bytes = body.to_wire()?;
        Ok(Self {
            signature: Sig(author.sign(OP_SIGNATURE_DOMAIN, &bytes)),
            body,
            group_signature: None,
        })
    }
    /// Who signed it.
    pub fn author(&self) -> &PublicIdentity {
        &self.body.author
    }
    /// Its position in the log (genesis: 0).
    pub fn seq(&self) -> u64 {
        self.body.seq
    }
    /// The hash of the op it follows (genesis: 32 zero bytes).
    pub fn prev(&self) -> [u8; 32] {
        self.body.prev
    }
    /// The group it belongs to.
    pub fn group(&self) -> GroupId {
        self.body.group
    }
    /// What it does.
    pub fn change(&self) -> &MembershipChange {
        &self.body.change
    }
    /// The author's clock when issued, unix milliseconds (informational).
    pub fn issued_at_ms(&self) -> u64 {
        self.body.issued_at_ms
    }
}

/// What [`GroupState::apply`] did with an op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The op extended the log (possibly together with ops it unblocked); nothing was dropped.
    Appended,
    /// The op was known already.
    Duplicate,
    /// The op (or ops it unblocked) won over ops of the log, which are dropped (oldest first).
    /// Their authors re-issue them on the new head if they are still valid.
    ReplacedHead {
        /// The ops no longer in the log.
        dropped: Vec<MembershipOp>,
    },
    /// The op lost the tie against a concurrent op with a lower hash; its author should re-issue
    /// it on the new head.
    Lost,
    /// The op was kept but waits for the op it follows (which this state has not seen yet).
    Pending,
}

/// A group's membership at one point of its log (wire type, inside [`GroupInvite`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSnapshot {
    /// The group.
    pub group: GroupId,
    /// Its name.
    pub name: String,
    /// The seq of the head op.
    pub epoch: u64,
    /// The hash of the head op.
    pub head: [u8; 32],
    /// The members: identity, role, seq of the op that added them (creator: 0).
    pub members: Vec<(PublicIdentity, Role, u64)>,
    /// The seq of the last Remove/Leave (0 if none): sender chains older than it are retired.
    pub rekey_epoch: u64,
}

/// One member of a roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Member {
    id: PublicIdentity,
    role: Role,
    added_seq: u64,
}

/// A member who left or was removed (kept to check late messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Departure {
    id: PublicIdentity,
    added_seq: u64,
    left_seq: u64,
}

/// The membership after some op of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Roster {
    seq: u64,
    head: [u8; 32],
    rekey_seq: u64,
    members: Vec<Member>,
    departed: Vec<Departure>,
}

impl Roster {
    fn find(&self, who: &PublicIdentity) -> Option<&Member> {
        self.members.iter().find(|m| &m.id == who)
    }

    /// Whether `op` may follow this roster (the caller checked `seq` and `prev`).
    fn check(&self, op: &MembershipOp) -> Result<(), GroupError> {
        let author = self.find(&op.body.author).ok_or(GroupError::NotMember)?;
        let is_admin = author.role == Role::Admin;
        match &op.body.change {
            MembershipChange::Create { .. } => Err(GroupError::NotAllowed {
                why: "a group is created only by its genesis op (seq 0)",
            }),
            MembershipChange::Add { member, .. } => {
                if !is_admin {
                    Err(GroupError::NotAllowed {
                        why: "only admins add members",
                    })
                } else if self.find(member).is_some() {
                    Err(GroupError::NotAllowed {
                        why: "already a member",
                    })
                } else if self.members.len() >= MAX_GROUP_MEMBERS {
                    Err(GroupError::TooManyMembers)
                } else {
                    Ok(())
                }
            }
            MembershipChange::Remove { member } => {
                if !is_admin {
                    Err(GroupError::NotAllowed {
                        why: "only admins remove members",
                    })
                } else if member == &op.body.author {
                    Err(GroupError::NotAllowed {
                        why: "an admin leaves with Leave, not Remove",
                    })
                } else if self.find(member).is_none() {
                    Err(GroupError::NotAllowed {
                        why: "removing someone who is not a member",
                    })
                } else {
                    Ok(())
                }
            }
            MembershipChange::Leave => Ok(()),
        }
    }

    /// Apply a checked op whose hash is `hash`.
    fn apply(&mut self, op: &MembershipOp, hash: [u8; 32]) {
        match &op.body.change {
            MembershipChange::Add { member, role } => self.members.push(Member {
                id: *member,
                role: *role,
                added_seq: op.body.seq,
            }),
            MembershipChange::Remove { member } => self.depart(member, op.body.seq),
            MembershipChange::Leave => self.depart(&op.body.author, op.body.seq),
            MembershipChange::Create { .. } => {}
        }
        self.seq = op.body.seq;
        self.head = hash;
    }

    /// `who` leaves at `seq`; the longest-standing member inherits admin rights if no admin is
    /// left.
    fn depart(&mut self, who: &PublicIdentity, seq: u64) {
        let Some(i) = self.members.iter().position(|m| &m.id == who) else {
            return;
        };
        let gone = self.members.remove(i);
        self.departed.push(Departure {
            id: gone.id,
            added_seq: gone.added_seq,
            left_seq: seq,
        });
        if self.departed.len() > MAX_DEPARTED {
            let excess = self.departed.len() - MAX_DEPARTED;
            self.departed.drain(..excess);
        }
        self.rekey_seq = seq;
        if !self.members.iter().any(|m| m.role == Role::Admin) {
            if let Some(heir) = self.members.iter_mut().min_by_key(|m| m.added_seq) {
                heir.role = Role::Admin;
            }
        }
    }

    /// The structural rules of a roster from the network or disk.
    fn validate(&self) -> Result<(), GroupError> {
        if self.members.len() > MAX_GROUP_MEMBERS {
            return Err(GroupError::TooManyMembers);
        }
        if self.departed.len() > MAX_DEPARTED {
            return Err(GroupError::Malformed {
                why: "too many departed members",
            });
        }
        let mut ids: Vec<&[u8; 32]> = self.members.iter().map(|m| m.id.as_bytes()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(GroupError::Malformed {
                why: "a member is listed twice",
            });
        }
        if self.rekey_seq > self.seq
            || self.members.iter().any(|m| m.added_seq > self.seq)
            || self
                .departed
                .iter()
                .any(|d| d.added_seq >= d.left_seq || d.left_seq > self.seq)
        {
            return Err(GroupError::Malformed {
                why: "membership dated after the head",
            });
        }
        if !self.members.is_empty() && !self.members.iter().any(|m| m.role == Role::Admin) {
            return Err(GroupError::Malformed {
                why: "members without an admin",
            });
        }
        Ok(())
    }
}

/// An op with its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KnownOp {
    hash: [u8; 32],
    op: MembershipOp,
}

/// The wire form of a [`GroupState`] (the current roster is recomputed on decode).
#[derive(Clone, Serialize, Deserialize)]
struct GroupStateRepr {
    group_public: [u8; 32],
    name: String,
    base: Roster,
    log: Vec<MembershipOp>,
    pool: Vec<MembershipOp>,
    recent: Vec<[u8; 32]>,
}

/// A member's view of a group: name, keys' public halves, membership log window (wire type,
/// persisted by the node).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "GroupStateRepr", into = "GroupStateRepr")]
pub struct GroupState {
    id: GroupId,
    group_public: [u8; 32],
    name: String,
    base: Roster,
    log: Vec<KnownOp>,
    pool: Vec<KnownOp>,
    recent: Vec<[u8; 32]>,
    current: Roster,
}

impl From<GroupState> for GroupStateRepr {
    fn from(s: GroupState) -> Self {
        Self {
            group_public: s.group_public,
            name: s.name,
            base: s.base,
            log: s.log.into_iter().map(|k| k.op).collect(),
            pool: s.pool.into_iter().map(|k| k.op).collect(),
            recent: s.recent,
        }
    }
}

impl TryFrom<GroupStateRepr> for GroupState {
    type Error = GroupError;
    fn try_from(r: GroupStateRepr) -> Result<Self, GroupError> {
        validate_name(&r.name)?;
        r.base.validate()?;
        if r.recent.len() > MAX_RECENT_OPS || r.pool.len() > MAX_PENDING_OPS {
            return Err(GroupError::Malformed {
                why: "state keeps more ops than allowed",
            });
        }
        let id = GroupId::from_public(&r.group_public);
        let mut known: Vec<KnownOp> = Vec::with_capacity(r.log.len() + r.pool.len());
        for op in r.log.into_iter().chain(r.pool) {
            if op.body.group != id {
                return Err(GroupError::WrongGroup);
            }
            if op.body.seq <= r.base.seq {
                return Err(GroupError::Malformed {
                    why: "stored op older than the base of the log",
                });
            }
            op.verify_signatures()?;
            let hash = op.hash();
            if !known.iter().any(|k| k.hash == hash) {
                known.push(KnownOp { hash, op });
            }
        }
        let mut state = GroupState {
            id,
            group_public: r.group_public,
            name: r.name,
            current: r.base.clone(),
            base: r.base,
            log: Vec::new(),
            pool: Vec::new(),
            recent: r.recent,
        };
        state.rebuild(known);
        Ok(state)
    }
}

impl fmt::Debug for GroupState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupState")
            .field("id", &self.id)
            .field("epoch", &self.current.seq)
            .field("members", &self.current.members.len())
            .finish_non_exhaustive()
    }
}

impl GroupState {
    /// Create a group: a fresh group key signs the genesis op (with the creator), then is
    /// dropped. Returns the state, the random group secret and the genesis op.
    pub fn create<R: CryptoRngCore + ?Sized>(
        creator: &Identity,
        name: &str,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<(GroupState, [u8; 32], MembershipOp), GroupError> {
        validate_name(name)?;
        let group_key = Identity::generate(rng);
        let group_public = *group_key.public().as_bytes();
        let mut group_secret = [0u8; 32];
        rng.fill_bytes(&mut group_secret);
        let body = OpBody {
            group: GroupId::from_public(&group_public),
            seq: 0,
            prev: [0; 32],
            author: creator.public(),
            issued_at_ms: now_ms,
            change: MembershipChange::Create {
                name: name.to_owned(),
                group_public,
            },
        };
        let bytes = body.to_wire()?;
        let genesis = MembershipOp {
            signature: Sig(creator.sign(OP_SIGNATURE_DOMAIN, &bytes)),
            group_signature: Some(Sig(group_key.sign(GENESIS_SIGNATURE_DOMAIN, &bytes))),
            body,
        };
        let state = Self::from_genesis(&genesis)?;
        Ok((state, group_secret, genesis))
    }

    /// The state right after a genesis op (both signatures checked).
    pub fn from_genesis(genesis: &MembershipOp) -> Result<GroupState, GroupError> {
        genesis.verify_signatures()?;
        let MembershipChange::Create { name, group_public } = &genesis.body.change else {
            return Err(GroupError::NotAllowed {
                why: "not a genesis op",
            });
        };
        let base = Roster {
            seq: 0,
            head: genesis.hash(),
            rekey_seq: 0,
            members: vec![Member {
                id: genesis.body.author,
                role: Role::Admin,
                added_seq: 0,
            }],
            departed: Vec::new(),
        };
        Ok(GroupState {
            id: genesis.body.group,
            group_public: *group_public,
            name: name.clone(),
            current: base.clone(),
            base,
            log: Vec::new(),
            pool: Vec::new(),
            recent: Vec::new(),
        })
    }

    /// The state of a group joined by an invite: its snapshot. Forks at or before the
    /// snapshot's head cannot be revised by this state (see [`GroupError::Fork`]).
    pub fn from_invite(invite: &VerifiedInvite) -> GroupState {
        let body = &invite.invite.body;
        let snap = &body.snapshot;
        let base = Roster {
            seq: snap.epoch,
            head: snap.head,
            rekey_seq: snap.rekey_epoch,
            members: snap
                .members
                .iter()
                .map(|(id, role, added_seq)| Member {
                    id: *id,
                    role: *role,
                    added_seq: *added_seq,
                })
                .collect(),
            departed: Vec::new(),
        };
        GroupState {
            id: snap.group,
            group_public: body.group_public,
            name: body.name.clone(),
            current: base.clone(),
            base,
            log: Vec::new(),
            pool: Vec::new(),
            recent: Vec::new(),
        }
    }

    /// The group's id.
    pub fn id(&self) -> GroupId {
        self.id
    }
    /// The group public key.
    pub fn group_public(&self) -> [u8; 32] {
        self.group_public
    }
    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The gossipsub topic of the group.
    pub fn topic(&self) -> String {
        topic_for(&self.group_public)
    }
    /// The seq of the head op (the membership epoch).
    pub fn epoch(&self) -> u64 {
        self.current.seq
    }
    /// The hash of the head op.
    pub fn head(&self) -> [u8; 32] {
        self.current.head
    }
    /// The seq of the last Remove/Leave in the log (0 if none): a sender chain started before
    /// it must be replaced before the next send.
    pub fn rekey_epoch(&self) -> u64 {
        self.current.rekey_seq
    }
    /// The current members, in the order they were added.
    pub fn members(&self) -> impl Iterator<Item = (&PublicIdentity, Role)> {
        self.current.members.iter().map(|m| (&m.id, m.role))
    }
    /// How many members the group has.
    pub fn member_count(&self) -> usize {
        self.current.members.len()
    }
    /// Whether `who` is a current member.
    pub fn is_member(&self, who: &PublicIdentity) -> bool {
        self.role(who).is_some()
    }
    /// `who`'s role, if a member.
    pub fn role(&self, who: &PublicIdentity) -> Option<Role> {
        self.current
            .members
            .iter()
            .find(|m| &m.id == who)
            .map(|m| m.role)
    }
    /// Whether `who` was a member at `epoch` (as far as this state remembers departures).
    pub fn was_member_at(&self, who: &PublicIdentity, epoch: u64) -> bool {
        self.current
            .members
            .iter()
            .any(|m| &m.id == who && m.added_seq <= epoch)
            || self
                .current
                .departed
                .iter()
                .any(|d| &d.id == who && d.added_seq <= epoch && epoch < d.left_seq)
    }

    /// Whether `who` left or was removed (and this state still remembers it).
    pub fn has_departed(&self, who: &PublicIdentity) -> bool {
        !self.is_member(who) && self.current.departed.iter().any(|d| &d.id == who)
    }
    /// Sign `change` as the next op on the current head, after checking `author`'s rights.
    /// The op is not applied: the caller applies it (and broadcasts it).
    pub fn propose(
        &self,
        author: &Identity,
        change: MembershipChange,
        now_ms: u64,
    ) -> Result<MembershipOp, GroupError> {
        let seq = self
            .current
            .seq
            .checked_add(1)
            .ok_or(GroupError::Malformed {
                why: "membership log exhausted",
            })?;
        let op = MembershipOp::sign(
            OpBody {
                group: self.id,
                seq,
                prev: self.current.head,
                author: author.public(),
                issued_at_ms: now_ms,
                change,
            },
            author,
        )?;
        self.current.check(&op)?;
        Ok(op)
    }

    /// Fold an op into the log. On error the state is unchanged.
    ///
    /// The log is defined by the set of ops known, not by their order of arrival: from the base
    /// of the window, at each seq the valid op (rights checked against the membership it
    /// follows) with the lowest hash among those naming the current head as `prev` is taken.
    /// An op whose predecessor is unknown is kept ([`Applied::Pending`]) until it arrives.
    pub fn apply(&mut self, op: &MembershipOp) -> Result<Applied, GroupError> {
        if op.body.group != self.id {
            return Err(GroupError::WrongGroup);
        }
        let hash = op.hash();
        if self.knows(&hash) {
            return Ok(Applied::Duplicate);
        }
        // Before the signatures: a member far behind retries such an op each time it catches
        // up a little, and the answer depends on the seq alone.
        let limit = self.current.seq.saturating_add(MAX_PENDING_OPS as u64);
        if op.body.seq > limit {
            return Err(GroupError::Gap {
                have: self.current.seq,
                got: op.body.seq,
            });
        }
        op.to_wire()?;
        op.verify_signatures()?;
        if op.body.seq < self.base.seq {
            return Err(GroupError::Stale);
        }
        if op.body.seq == self.base.seq {
            return Err(GroupError::Fork);
        }
        if let Some(before) = self.roster_at(&op.body.prev) {
            if before.seq.checked_add(1) != Some(op.body.seq) {
                return Err(GroupError::Malformed {
                    why: "op seq does not follow its predecessor",
                });
            }
            before.check(op)?;
        } else if let Some(parent) = self.pool.iter().find(|k| k.hash == op.body.prev) {
            if parent.op.body.seq.checked_add(1) != Some(op.body.seq) {
                return Err(GroupError::Malformed {
                    why: "op seq does not follow its predecessor",
                });
            }
        }

        let mut next = self.clone();
        let old_log = std::mem::take(&mut next.log);
        let mut known = old_log.clone();
        known.append(&mut next.pool);
        known.push(KnownOp {
            hash,
            op: op.clone(),
        });
        let absorbed = next.rebuild_pool_bounded(known, &hash)?;
        let canonical =
            |h: &[u8; 32]| next.log.iter().any(|k| &k.hash == h) || absorbed.contains(h);
        let dropped: Vec<MembershipOp> = old_log
            .into_iter()
            .filter(|old| !canonical(&old.hash))
            .map(|k| k.op)
            .collect();
        let in_log = canonical(&hash);
        let competed = next.roster_at(&op.body.prev).is_some();
        *self = next;
        Ok(if !dropped.is_empty() {
            Applied::ReplacedHead { dropped }
        } else if in_log {
            Applied::Appended
        } else if competed {
            Applied::Lost
        } else {
            Applied::Pending
        })
    }

    /// The current membership, for an invite.
    pub fn snapshot(&self) -> GroupSnapshot {
        GroupSnapshot {
            group: self.id,
            name: self.name.clone(),
            epoch: self.current.seq,
            head: self.current.head,
            members: self
                .current
                .members
                .iter()
                .map(|m| (m.id, m.role, m.added_seq))
                .collect(),
            rekey_epoch: self.current.rekey_seq,
        }
    }

    /// Ops known to this state that are not in its log: pending ones and lost ties.
    pub fn pending_ops(&self) -> impl Iterator<Item = &MembershipOp> {
        self.pool.iter().map(|k| &k.op)
    }

    /// The ops of the log window after its base, oldest first (what a member who missed them
    /// needs to catch up).
    pub fn recent_ops(&self) -> impl Iterator<Item = &MembershipOp> {
        self.log.iter().map(|k| &k.op)
    }

    /// Whether the op with this hash is known (base head, log, pool or recently left).
    fn knows(&self, hash: &[u8; 32]) -> bool {
        &self.base.head == hash
            || self.log.iter().any(|k| &k.hash == hash)
            || self.pool.iter().any(|k| &k.hash == hash)
            || self.recent.contains(hash)
    }

    /// The roster right after the log op (or base) with this hash.
    fn roster_at(&self, hash: &[u8; 32]) -> Option<Roster> {
        if &self.base.head == hash {
            return Some(self.base.clone());
        }
        let i = self.log.iter().position(|k| &k.hash == hash)?;
        let mut r = self.base.clone();
        for k in &self.log[..=i] {
            r.apply(&k.op, k.hash);
        }
        Some(r)
    }

    /// Whether `who` could author an op this state cannot check yet: a member now or at the
    /// base, or someone a known op adds. Ops of other authors are evicted first when the pool
    /// is full.
    fn plausible_author(&self, who: &PublicIdentity) -> bool {
        self.current.find(who).is_some()
            || self.base.find(who).is_some()
            || self.log.iter().chain(&self.pool).any(|k| {
                matches!(&k.op.body.change, MembershipChange::Add { member, .. } if member == who)
            })
    }

    /// Recompute log and pool from `known`, evicting pool ops beyond [`MAX_PENDING_OPS`]
    /// (first those of implausible authors, then the highest); fails (leaving `self` half-built, so call it on a copy) if the op
    /// `new` would be evicted. Returns the hashes of the log ops moved into the base.
    fn rebuild_pool_bounded(
        &mut self,
        known: Vec<KnownOp>,
        new: &[u8; 32],
    ) -> Result<Vec<[u8; 32]>, GroupError> {
        let absorbed = self.rebuild(known);
        if self.pool.len() > MAX_PENDING_OPS {
            let implausible: Vec<bool> = self
                .pool
                .iter()
                .map(|k| !self.plausible_author(&k.op.body.author))
                .collect();
            let mut ranked: Vec<(bool, KnownOp)> = implausible
                .into_iter()
                .zip(std::mem::take(&mut self.pool))
                .collect();
            ranked.sort_by_key(|(implausible, k)| (*implausible, k.op.body.seq, k.hash));
            self.pool = ranked.into_iter().map(|(_, k)| k).collect();
            let evicted = self.pool.split_off(MAX_PENDING_OPS);
            if let Some(k) = evicted.iter().find(|k| &k.hash == new) {
                return Err(GroupError::Gap {
                    have: self.current.seq,
                    got: k.op.body.seq,
                });
            }
        }
        Ok(absorbed)
    }

    /// Recompute the log from the base over `known` ops, then move the base forward while the
    /// log is longer than [`FORK_WINDOW`]. Returns the hashes of the ops moved into the base.
    fn rebuild(&mut self, known: Vec<KnownOp>) -> Vec<[u8; 32]> {
        let mut roster = self.base.clone();
        let mut taken = vec![false; known.len()];
        let mut log_order = Vec::new();
        while let Some(follow) = roster.seq.checked_add(1) {
            let best = known
                .iter()
                .enumerate()
                .filter(|(i, k)| {
                    !taken[*i]
                        && k.op.body.seq == follow
                        && k.op.body.prev == roster.head
                        && roster.check(&k.op).is_ok()
                })
                .min_by_key(|(_, k)| k.hash)
                .map(|(i, _)| i);
            let Some(i) = best else { break };
            taken[i] = true;
            roster.apply(&known[i].op, known[i].hash);
            log_order.push(i);
        }
        let mut slots: Vec<Option<KnownOp>> = known.into_iter().map(Some).collect();
        self.log = log_order
            .iter()
            .filter_map(|i| slots.get_mut(*i).and_then(Option::take))
            .collect();
        self.pool = slots.into_iter().flatten().collect();
        self.current = roster;
        let mut absorbed = Vec::new();
        while self.log.len() > FORK_WINDOW {
            let oldest = self.log.remove(0);
            self.base.apply(&oldest.op, oldest.hash);
            self.remember(oldest.hash);
            absorbed.push(oldest.hash);
            let base_seq = self.base.seq;
            let (old, keep): (Vec<KnownOp>, Vec<KnownOp>) = std::mem::take(&mut self.pool)
                .into_iter()
                .partition(|k| k.op.body.seq <= base_seq);
            self.pool = keep;
            for k in old {
                self.remember(k.hash);
            }
        }
        absorbed
    }

    fn remember(&mut self, hash: [u8; 32]) {
        self.recent.push(hash);
        if self.recent.len() > MAX_RECENT_OPS {
            let excess = self.recent.len() - MAX_RECENT_OPS;
            self.recent.drain(..excess);
        }
    }
}

/// The gossipsub topic of the group with public key `group_public`:
/// `"mc-g1-" || hex(SHA-256("meshchat/group-topic/v1" || group_public))`.
pub fn topic_for(group_public: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(GROUP_TOPIC_DOMAIN);
    h.update(group_public);
    format!("{GROUP_TOPIC_PREFIX}{}", hex(&h.finalize()))
}

/// The group mailbox of day `day_epoch` (unix seconds / 86,400).
///
/// Ed25519 seed = `HKDF(salt = group_id, ikm = group_secret, info = "meshchat/group-mailbox/v1"
/// || u64_le(day_epoch), 32)`; id = `SHA-256("meshchat/mailbox-id/v1" || public key)`.
pub fn group_mailbox(group_id: &GroupId, group_secret: &[u8; 32], day_epoch: u64) -> MailboxKeys {
    let mut seed = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(&group_id.0), group_secret)
        .expand_multi_info(
            &[GROUP_MAILBOX_INFO, &day_epoch.to_le_bytes()],
            seed.as_mut(),
        )
        .expect("invariant: 32 bytes is a valid HKDF-SHA256 output length");
    MailboxKeys::from_seed(&seed)
}

/// Our own sender chain in a group (wire type, persisted by the node; secret).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct SenderChain {
    key_id: [u8; 16],
    chain_key: [u8; 32],
    iteration: u32,
}

impl fmt::Debug for SenderChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderChain")
            .field("key_id", &hex(&self.key_id))
            .field("iteration", &self.iteration)
            .finish_non_exhaustive()
    }
}

impl SenderChain {
    /// A fresh chain: random key id and chain key, iteration 0.
    pub fn new<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        let mut chain = Self {
            key_id: [0; KEY_ID_BYTES],
            chain_key: [0; 32],
            iteration: 0,
        };
        rng.fill_bytes(&mut chain.key_id);
        rng.fill_bytes(&mut chain.chain_key);
        chain
    }
    /// The key id (visible in every message header of the chain).
    pub fn key_id(&self) -> [u8; 16] {
        self.key_id
    }
    /// The iteration the next message will use.
    pub fn iteration(&self) -> u32 {
        self.iteration
    }
    /// The hand-out of this chain at its current position, for another member.
    pub fn distribution(
        &self,
        group: GroupId,
        epoch: u64,
        author: PublicIdentity,
    ) -> SenderKeyDistribution {
        SenderKeyDistribution {
            group,
            epoch,
            author,
            key_id: self.key_id,
            chain_key: self.chain_key,
            iteration: self.iteration,
        }
    }
}

/// A member's sender chain handed to another member over 1:1 (wire type, inside
/// [`GroupControl::SenderKey`]; secret).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderKeyDistribution {
    /// The group.
    pub group: GroupId,
    /// The membership epoch the chain was started in.
    pub epoch: u64,
    /// Whose chain.
    pub author: PublicIdentity,
    /// The chain's key id.
    pub key_id: [u8; 16],
    /// The chain key at `iteration`.
    pub chain_key: [u8; 32],
    /// The iteration of the next message.
    pub iteration: u32,
}

impl Drop for SenderKeyDistribution {
    fn drop(&mut self) {
        self.chain_key.zeroize();
    }
}

impl fmt::Debug for SenderKeyDistribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderKeyDistribution")
            .field("group", &self.group)
            .field("epoch", &self.epoch)
            .field("author", &self.author)
            .field("key_id", &hex(&self.key_id))
            .field("iteration", &self.iteration)
            .finish_non_exhaustive()
    }
}

impl SenderKeyDistribution {
    /// Whether a receiver holding `state` should accept this hand-out that arrived over the 1:1
    /// channel from `sender`: right group, sent by its author, who is a member, not from an
    /// epoch this state has not reached.
    pub fn check(&self, state: &GroupState, sender: &PublicIdentity) -> Result<(), GroupError> {
        if self.group != state.id {
            return Err(GroupError::WrongGroup);
        }
        if &self.author != sender {
            return Err(GroupError::Forged {
                why: "sender key handed out for another member",
            });
        }
        if state.is_member(&self.author) {
            Ok(())
        } else if self.epoch > state.epoch() {
            Err(GroupError::FutureEpoch {
                epoch: self.epoch,
                current: state.epoch(),
            })
        } else {
            Err(GroupError::NotMember)
        }
    }
}

/// A skipped message key of a receiver chain.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct SkippedGroupKey {
    iteration: u32,
    mk: [u8; 32],
}

/// Another member's sender chain as we receive on it (wire type, persisted by the node; secret).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct ReceiverChain {
    #[zeroize(skip)]
    group: GroupId,
    epoch: u64,
    #[zeroize(skip)]
    author: PublicIdentity,
    key_id: [u8; 16],
    chain_key: [u8; 32],
    next: u32,
    first: u32,
    skipped: Vec<SkippedGroupKey>,
}

impl fmt::Debug for ReceiverChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverChain")
            .field("group", &self.group)
            .field("author", &self.author)
            .field("key_id", &hex(&self.key_id))
            .field("next", &self.next)
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

impl ReceiverChain {
    /// The receiving side of a hand-out (check it first with [`SenderKeyDistribution::check`]).
    pub fn from_distribution(dist: &SenderKeyDistribution) -> Self {
        Self {
            group: dist.group,
            epoch: dist.epoch,
            author: dist.author,
            key_id: dist.key_id,
            chain_key: dist.chain_key,
            next: dist.iteration,
            first: dist.iteration,
            skipped: Vec::new(),
        }
    }
    /// Whose chain.
    pub fn author(&self) -> &PublicIdentity {
        &self.author
    }
    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }
    /// The epoch the chain was started in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// The chain's key id.
    pub fn key_id(&self) -> [u8; 16] {
        self.key_id
    }
    /// The next iteration not yet received in order.
    pub fn next_iteration(&self) -> u32 {
        self.next
    }
    /// The iteration the chain was handed over at: messages of the author's chain before it
    /// were sealed before we were given the key (e.g. before we joined) and stay unreadable
    /// to us; `open_group` reports them as [`GroupError::Replay`], which they are not.
    pub fn first_iteration(&self) -> u32 {
        self.first
    }
    /// Skipped message keys kept.
    pub fn skipped_keys(&self) -> usize {
        self.skipped.len()
    }
}

/// What a group message says.
// An op is a few hundred bytes in memory (decompressed keys); values are short-lived and boxing
// would only complicate every match.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupBody {
    /// A text, 1 to [`crate::MAX_TEXT_BYTES`] bytes of UTF-8 (variant 0).
    Text(String),
    /// A membership op, broadcast to the group (variant 1).
    Op(MembershipOp),
    /// The author holds messages of these sender chains (by `key_id`, 1 to
    /// [`MAX_KEY_REQUEST_IDS`]) and lacks their keys: their owner hands them out again
    /// (variant 2). Only the owner of a chain knows its `key_id` belongs to it; the request
    /// reveals nothing more to the members than that the author is waiting.
    KeyRequest {
        /// The key ids asked for.
        key_ids: Vec<[u8; KEY_ID_BYTES]>,
    },
}

impl fmt::Debug for GroupBody {
    /// Never prints the text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(t) => f.debug_struct("Text").field("len", &t.len()).finish(),
            Self::Op(op) => f.debug_tuple("Op").field(op).finish(),
            Self::KeyRequest { key_ids } => f
                .debug_struct("KeyRequest")
                .field(
                    "key_ids",
                    &key_ids.iter().map(|k| hex(k)).collect::<Vec<_>>(),
                )
                .finish(),
        }
    }
}

/// The decrypted content of a group message (wire type, inside the envelope's ciphertext).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPlaintext {
    /// The group.
    pub group: GroupId,
    /// The membership epoch the author sent in.
    pub epoch: u64,
    /// The author (signature checked).
    pub author: PublicIdentity,
    /// Random message id, for deduplication.
    pub id: MessageId,
    /// The author's clock, unix milliseconds.
    pub sent_at_ms: u64,
    /// The message.
    pub body: GroupBody,
    signature: Sig,
}

impl fmt::Debug for GroupPlaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupPlaintext")
            .field("group", &self.group)
            .field("epoch", &self.epoch)
            .field("author", &self.author)
            .field("id", &self.id)
            .field("sent_at_ms", &self.sent_at_ms)
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

/// Encrypt `body` from `author` as the next message of `chain`, in an envelope routed by the
/// group mailbox of the day of `now_ms`. `chain` advances only on success.
#[allow(clippy::too_many_arguments)]
pub fn seal_group<R: CryptoRngCore + ?Sized>(
    state: &GroupState,
    author: &Identity,
    chain: &mut SenderChain,
    group_secret: &[u8; 32],
    body: GroupBody,
    id: MessageId,
    now_ms: u64,
    _rng: &mut R,
) -> Result<Envelope, GroupError> {
    if !state.is_member(&author.public()) {
        return Err(GroupError::NotMember);
    }
    check_body(&body, state.id)?;
    if chain.iteration == u32::MAX {
        return Err(GroupError::CounterExhausted);
    }
    let timestamp = now_ms / 1000;
    let routing_key = group_mailbox(&state.id, group_secret, timestamp / EPOCH_SECS).id();
    let ttl = GROUP_TTL_SECS;
    let ephemeral = header(&chain.key_id, chain.iteration);
    let mut plaintext = GroupPlaintext {
        group: state.id,
        epoch: state.epoch(),
        author: author.public(),
        id,
        sent_at_ms: now_ms,
        body,
        signature: Sig([0; 64]),
    };
    let signed = signed_bytes(&ephemeral, &routing_key, timestamp, ttl, &plaintext)?;
    plaintext.signature = Sig(author.sign(MESSAGE_SIGNATURE_DOMAIN, &signed));
    let (next, mk) = kdf_ck(&chain.chain_key);
    let ciphertext = encrypt(&mk, &plaintext, &routing_key, timestamp, ttl, &ephemeral)?;
    chain.chain_key = *next;
    chain.iteration += 1;
    Ok(Envelope {
        routing_key,
        timestamp,
        ttl,
        ephemeral,
        ciphertext,
    })
}

/// The visible header of a group message: `key_id || u32_le(iteration) || 12 zero bytes`.
fn header(key_id: &[u8; KEY_ID_BYTES], iteration: u32) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..KEY_ID_BYTES].copy_from_slice(key_id);
    h[KEY_ID_BYTES..KEY_ID_BYTES + 4].copy_from_slice(&iteration.to_le_bytes());
    h
}

/// The limits of a message body; an op must name this group.
fn check_body(body: &GroupBody, group: GroupId) -> Result<(), GroupError> {
    match body {
        GroupBody::Text(t) if t.is_empty() => Err(GroupError::EmptyText),
        GroupBody::Text(t) if t.len() > MAX_TEXT_BYTES => {
            Err(GroupError::TooLarge { len: t.len() })
        }
        GroupBody::Op(op) if op.body.group != group => Err(GroupError::WrongGroup),
        GroupBody::KeyRequest { key_ids } if key_ids.is_empty() => Err(GroupError::Malformed {
            why: "key request names no key",
        }),
        GroupBody::KeyRequest { key_ids } if key_ids.len() > MAX_KEY_REQUEST_IDS => {
            Err(GroupError::Malformed {
                why: "key request names too many keys",
            })
        }
        _ => Ok(()),
    }
}

/// What the author signs: `header || routing_key || u64(timestamp) || u32(ttl) || group ||
/// u64(epoch) || author || id || u64(sent_at_ms) || wire(body)`.
fn signed_bytes(
    header: &[u8; 32],
    routing_key: &[u8; 32],
    timestamp: u64,
    ttl: u32,
    p: &GroupPlaintext,
) -> Result<Vec<u8>, GroupError> {
    let body = p.body.to_wire()?;
    let mut m = Vec::with_capacity(32 + 32 + 8 + 4 + 32 + 8 + 32 + 16 + 8 + body.len());
    m.extend_from_slice(header);
    m.extend_from_slice(routing_key);
    m.extend_from_slice(&timestamp.to_le_bytes());
    m.extend_from_slice(&ttl.to_le_bytes());
    m.extend_from_slice(&p.group.0);
    m.extend_from_slice(&p.epoch.to_le_bytes());
    m.extend_from_slice(p.author.as_bytes());
    m.extend_from_slice(&p.id.0);
    m.extend_from_slice(&p.sent_at_ms.to_le_bytes());
    m.extend_from_slice(&body);
    Ok(m)
}

/// The AEAD of a message key: key and nonce from `HKDF(salt = 0^32, ikm = mk, info, 44)`, with
/// the group's own `info`.
fn message_cipher(mk: &[u8; 32]) -> (ChaCha20Poly1305, [u8; 12]) {
    crate::ratchet::message_cipher_with(mk, GROUP_MESSAGE_KEY_INFO)
}

/// The AEAD associated data, as the envelope's: `0x01 || routing_key || u64(timestamp) ||
/// u32(ttl) || header`.
fn associated_data(routing_key: &[u8; 32], timestamp: u64, ttl: u32, header: &[u8; 32]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(77);
    ad.push(WIRE_VERSION);
    ad.extend_from_slice(routing_key);
    ad.extend_from_slice(&timestamp.to_le_bytes());
    ad.extend_from_slice(&ttl.to_le_bytes());
    ad.extend_from_slice(header);
    ad
}

/// Pad the plaintext's wire form into an envelope bucket and encrypt it under `mk`.
fn encrypt(
    mk: &[u8; 32],
    plaintext: &GroupPlaintext,
    routing_key: &[u8; 32],
    timestamp: u64,
    ttl: u32,
    header: &[u8; 32],
) -> Result<Vec<u8>, GroupError> {
    let inner = Zeroizing::new(plaintext.to_wire()?);
    let padded = pad(&inner)?;
    let (cipher, nonce) = message_cipher(mk);
    cipher
        .encrypt(
            (&nonce).into(),
            Payload {
                msg: &padded,
                aad: &associated_data(routing_key, timestamp, ttl, header),
            },
        )
        .map_err(|_| GroupError::TooLarge { len: padded.len() })
}

/// `u32_le(len(inner)) || inner || zeros`, `B + PAD_OVERHEAD` bytes for the smallest bucket `B`
/// that holds it (so the ciphertext has an envelope bucket length).
fn pad(inner: &[u8]) -> Result<Zeroizing<Vec<u8>>, GroupError> {
    let need = PAD_PREFIX_BYTES + inner.len();
    let bucket = BUCKETS
        .iter()
        .copied()
        .find(|b| need <= b + PAD_OVERHEAD)
        .ok_or(GroupError::TooLarge { len: inner.len() })?;
    let len = u32::try_from(inner.len()).map_err(|_| GroupError::TooLarge { len: inner.len() })?;
    let mut padded = Zeroizing::new(Vec::with_capacity(bucket + PAD_OVERHEAD));
    padded.extend_from_slice(&len.to_le_bytes());
    padded.extend_from_slice(inner);
    padded.resize(bucket + PAD_OVERHEAD, 0);
    Ok(padded)
}

/// The inverse of [`pad`].
fn unpad(padded: &[u8]) -> Result<&[u8], GroupError> {
    let (prefix, rest) = padded
        .split_at_checked(PAD_PREFIX_BYTES)
        .ok_or(GroupError::BadPadding)?;
    let len = u32::from_le_bytes(prefix.try_into().map_err(|_| GroupError::BadPadding)?);
    let len = usize::try_from(len).map_err(|_| GroupError::BadPadding)?;
    let (inner, padding) = rest.split_at_checked(len).ok_or(GroupError::BadPadding)?;
    if padding.iter().any(|b| *b != 0) {
        return Err(GroupError::BadPadding);
    }
    Ok(inner)
}

/// The sender key id and iteration in a group envelope's header (no cryptography): to find the
/// receiver chain, and to sort a batch of envelopes of one chain.
pub fn group_key_id(env: &Envelope) -> Result<([u8; 16], u32), GroupError> {
    let h = &env.ephemeral;
    if h[KEY_ID_BYTES + 4..].iter().any(|b| *b != 0) {
        return Err(GroupError::Malformed {
            why: "group message header padding is not zero",
        });
    }
    let mut key_id = [0u8; KEY_ID_BYTES];
    key_id.copy_from_slice(&h[..KEY_ID_BYTES]);
    let mut it = [0u8; 4];
    it.copy_from_slice(&h[KEY_ID_BYTES..KEY_ID_BYTES + 4]);
    Ok((key_id, u32::from_le_bytes(it)))
}

/// The checks anyone can make on a group envelope at `now` (unix seconds), without a key: size,
/// TTL, time window, header padding.
pub fn check_group_envelope(env: &Envelope, now: u64) -> Result<([u8; 16], u32), GroupError> {
    let len = env.ciphertext.len();
    if len > ciphertext_len(BUCKETS[BUCKETS.len() - 1]) {
        return Err(GroupError::TooLarge { len });
    }
    if !BUCKETS.iter().any(|b| ciphertext_len(*b) == len) {
        return Err(GroupError::NotABucket { len });
    }
    if env.ttl > MAX_TTL_SECS {
        return Err(GroupError::Malformed {
            why: "envelope TTL over the limit",
        });
    }
    if env.timestamp > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(GroupError::FromTheFuture);
    }
    if now >= env.expires_at() {
        return Err(GroupError::Expired);
    }
    group_key_id(env)
}

/// Decode a group envelope from untrusted bytes (an input over the envelope limit is
/// [`GroupError::TooLarge`]).
pub fn decode_group_envelope(bytes: &[u8]) -> Result<Envelope, GroupError> {
    Envelope::from_wire(bytes).map_err(|e| match e {
        WireError::TooLarge { len, .. } => GroupError::TooLarge { len },
        other => GroupError::Wire(other),
    })
}

/// Where the message key of an opened message came from, to commit after authentication.
enum KeySource {
    /// A stored skipped key (its index).
    Skipped(usize),
    /// The chain advanced: the next chain key and the keys skipped on the way.
    Advance {
        next: Zeroizing<[u8; 32]>,
        skipped: Vec<SkippedGroupKey>,
    },
}

/// Decrypt and check a group envelope at `now` (unix seconds) with the author's chain. On any
/// error `chain` is unchanged.
pub fn open_group(
    state: &GroupState,
    chain: &mut ReceiverChain,
    env: &Envelope,
    now: u64,
) -> Result<GroupPlaintext, GroupError> {
    let (key_id, iteration) = check_group_envelope(env, now)?;
    if key_id != chain.key_id {
        return Err(GroupError::UnknownSenderKey { key_id });
    }
    if chain.group != state.id {
        return Err(GroupError::WrongGroup);
    }

    // 1. The message key, computed on the side.
    let (mk, source) = if iteration < chain.next {
        let i = chain
            .skipped
            .iter()
            .position(|k| k.iteration == iteration)
            .ok_or(GroupError::Replay { iteration })?;
        (Zeroizing::new(chain.skipped[i].mk), KeySource::Skipped(i))
    } else {
        if iteration - chain.next > MAX_GROUP_SKIP {
            return Err(GroupError::TooFarAhead {
                iteration,
                next: chain.next,
            });
        }
        let mut ck = Zeroizing::new(chain.chain_key);
        let mut skipped = Vec::new();
        for n in chain.next..iteration {
            let (next, mk) = kdf_ck(&ck);
            skipped.push(SkippedGroupKey {
                iteration: n,
                mk: *mk,
            });
            ck = next;
        }
        let (next, mk) = kdf_ck(&ck);
        (mk, KeySource::Advance { next, skipped })
    };

    // 2. Decrypt, unpad, decode.
    let (cipher, nonce) = message_cipher(&mk);
    let padded = Zeroizing::new(
        cipher
            .decrypt(
                (&nonce).into(),
                Payload {
                    msg: &env.ciphertext,
                    aad: &associated_data(&env.routing_key, env.timestamp, env.ttl, &env.ephemeral),
                },
            )
            .map_err(|_| GroupError::Tampered)?,
    );
    let plaintext = GroupPlaintext::from_wire(unpad(&padded)?)?;

    // 3. Who wrote it, and may they.
    if plaintext.group != state.id {
        return Err(GroupError::Forged {
            why: "message names another group",
        });
    }
    if plaintext.author != chain.author {
        return Err(GroupError::Forged {
            why: "sender key belongs to another member",
        });
    }
    let signed = signed_bytes(
        &env.ephemeral,
        &env.routing_key,
        env.timestamp,
        env.ttl,
        &plaintext,
    )?;
    plaintext
        .author
        .verify(MESSAGE_SIGNATURE_DOMAIN, &signed, &plaintext.signature.0)
        .map_err(|_| GroupError::Forged {
            why: "message signature does not verify",
        })?;
    match &plaintext.body {
        GroupBody::Op(op) if op.body.group != state.id => {
            return Err(GroupError::Forged {
                why: "membership op of another group",
            })
        }
        body => check_body(body, state.id)?,
    }
    if plaintext.epoch > state.epoch() {
        // We lag behind the author: fine if we already know them as a member.
        if !state.is_member(&plaintext.author) {
            return Err(GroupError::FutureEpoch {
                epoch: plaintext.epoch,
                current: state.epoch(),
            });
        }
    } else if !state.was_member_at(&plaintext.author, plaintext.epoch) {
        return Err(GroupError::Forged {
            why: "author was not a member at that epoch",
        });
    } else if !state.is_member(&plaintext.author) {
        return Err(GroupError::AuthorDeparted);
    }

    // 4. Authentic: commit.
    match source {
        KeySource::Skipped(i) => {
            chain.skipped.remove(i);
        }
        KeySource::Advance { next, mut skipped } => {
            chain.chain_key = *next;
            chain.next = iteration.saturating_add(1);
            chain.skipped.append(&mut skipped);
            if chain.skipped.len() > MAX_GROUP_STORED_SKIPPED {
                let excess = chain.skipped.len() - MAX_GROUP_STORED_SKIPPED;
                chain.skipped.drain(..excess);
            }
        }
    }
    Ok(plaintext)
}

/// The signed part of an invite.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct InviteBody {
    group_public: [u8; 32],
    group_secret: [u8; 32],
    name: String,
    snapshot: GroupSnapshot,
    inviter: PublicIdentity,
    invitee: PublicIdentity,
    issued_at_ms: u64,
}

impl Drop for InviteBody {
    fn drop(&mut self) {
        self.group_secret.zeroize();
    }
}

/// An invitation into a group, sent by an admin to the invitee over 1:1 (wire type, inside
/// [`GroupControl::Invite`]; holds the group secret).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInvite {
    body: InviteBody,
    signature: Sig,
}

impl fmt::Debug for GroupInvite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupInvite")
            .field("group", &self.body.snapshot.group)
            .field("inviter", &self.body.inviter)
            .field("invitee", &self.body.invitee)
            .field("members", &self.body.snapshot.members.len())
            .finish_non_exhaustive()
    }
}

impl GroupInvite {
    /// An invite of `invitee` (already added to `state` by an applied Add op) by the admin
    /// `inviter`.
    pub fn new(
        state: &GroupState,
        inviter: &Identity,
        invitee: &PublicIdentity,
        group_secret: &[u8; 32],
        now_ms: u64,
    ) -> Result<Self, GroupError> {
        if state.role(&inviter.public()) != Some(Role::Admin) {
            return Err(GroupError::NotAllowed {
                why: "only admins invite",
            });
        }
        if !state.is_member(invitee) {
            return Err(GroupError::BadInvite {
                why: "the invitee is not a member yet: apply the Add op first",
            });
        }
        let body = InviteBody {
            group_public: state.group_public,
            group_secret: *group_secret,
            name: state.name.clone(),
            snapshot: state.snapshot(),
            inviter: inviter.public(),
            invitee: *invitee,
            issued_at_ms: now_ms,
        };
        let signature = Sig(inviter.sign(INVITE_SIGNATURE_DOMAIN, &body.to_wire()?));
        Ok(Self { body, signature })
    }
    /// Check the signature, the group id, the snapshot, that the inviter is an admin and the
    /// invitee a member in it, and the age at `now_ms`. The caller also checks that the invitee
    /// is itself and the inviter the 1:1 sender (or uses [`GroupInvite::verify_for`]).
    pub fn verify(self, now_ms: u64) -> Result<VerifiedInvite, GroupError> {
        let b = &self.body;
        let snap = &b.snapshot;
        validate_name(&b.name)?;
        if snap.members.len() > MAX_GROUP_MEMBERS {
            return Err(GroupError::TooManyMembers);
        }
        let signed = b.to_wire()?;
        b.inviter
            .verify(INVITE_SIGNATURE_DOMAIN, &signed, &self.signature.0)
            .map_err(|_| GroupError::BadInvite {
                why: "the inviter's signature does not verify",
            })?;
        if GroupId::from_public(&b.group_public) != snap.group {
            return Err(GroupError::BadInvite {
                why: "the group id is not derived from the group key",
            });
        }
        if b.name != snap.name {
            return Err(GroupError::BadInvite {
                why: "the invite and its snapshot name the group differently",
            });
        }
        let roster = Roster {
            seq: snap.epoch,
            head: snap.head,
            rekey_seq: snap.rekey_epoch,
            members: snap
                .members
                .iter()
                .map(|(id, role, added_seq)| Member {
                    id: *id,
                    role: *role,
                    added_seq: *added_seq,
                })
                .collect(),
            departed: Vec::new(),
        };
        roster.validate().map_err(|e| match e {
            GroupError::TooManyMembers => e,
            _ => GroupError::BadInvite {
                why: "the snapshot is inconsistent",
            },
        })?;
        if roster.find(&b.inviter).map(|m| m.role) != Some(Role::Admin) {
            return Err(GroupError::BadInvite {
                why: "the inviter is not an admin of the group",
            });
        }
        if roster.find(&b.invitee).is_none() {
            return Err(GroupError::BadInvite {
                why: "the invitee is not in the snapshot",
            });
        }
        let skew_ms = MAX_CLOCK_SKEW_SECS * 1000;
        if b.issued_at_ms > now_ms.saturating_add(skew_ms) {
            return Err(GroupError::FromTheFuture);
        }
        if now_ms > b.issued_at_ms.saturating_add(INVITE_MAX_AGE_MS) {
            return Err(GroupError::Expired);
        }
        Ok(VerifiedInvite { invite: self })
    }
    /// [`GroupInvite::verify`], plus: the invitee is `me` and the inviter is `from` (the
    /// authenticated 1:1 sender).
    pub fn verify_for(
        self,
        me: &PublicIdentity,
        from: &PublicIdentity,
        now_ms: u64,
    ) -> Result<VerifiedInvite, GroupError> {
        if &self.body.invitee != me {
            return Err(GroupError::BadInvite {
                why: "the invite is for someone else",
            });
        }
        if &self.body.inviter != from {
            return Err(GroupError::BadInvite {
                why: "the invite was forwarded by someone other than its inviter",
            });
        }
        self.verify(now_ms)
    }
    /// A short code for the user: hex of the first 8 bytes of SHA-256 of the wire bytes.
    pub fn code(&self) -> String {
        let digest: [u8; 32] = match self.to_wire() {
            Ok(bytes) => Sha256::digest(bytes).into(),
            Err(_) => Sha256::digest(self.signature.0).into(),
        };
        hex(&digest[..8])
    }
    /// The group the invite is for (unverified).
    pub fn group(&self) -> GroupId {
        self.body.snapshot.group
    }
    /// Who invites (unverified).
    pub fn inviter(&self) -> &PublicIdentity {
        &self.body.inviter
    }
    /// Who is invited (unverified).
    pub fn invitee(&self) -> &PublicIdentity {
        &self.body.invitee
    }
    /// The group's name (unverified).
    pub fn name(&self) -> &str {
        &self.body.name
    }
    /// The inviter's clock when issued, unix milliseconds.
    pub fn issued_at_ms(&self) -> u64 {
        self.body.issued_at_ms
    }
}

/// An invite whose checks passed ([`GroupInvite::verify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedInvite {
    invite: GroupInvite,
}

impl VerifiedInvite {
    /// The group.
    pub fn group(&self) -> GroupId {
        self.invite.group()
    }
    /// The group public key.
    pub fn group_public(&self) -> [u8; 32] {
        self.invite.body.group_public
    }
    /// The group secret (for the group mailbox).
    pub fn group_secret(&self) -> &[u8; 32] {
        &self.invite.body.group_secret
    }
    /// The group's name.
    pub fn name(&self) -> &str {
        &self.invite.body.name
    }
    /// The admin who invited.
    pub fn inviter(&self) -> &PublicIdentity {
        &self.invite.body.inviter
    }
    /// Who is invited.
    pub fn invitee(&self) -> &PublicIdentity {
        &self.invite.body.invitee
    }
    /// The membership the invite was issued at.
    pub fn snapshot(&self) -> &GroupSnapshot {
        &self.invite.body.snapshot
    }
    /// The short code ([`GroupInvite::code`]).
    pub fn code(&self) -> String {
        self.invite.code()
    }
    /// The invite itself.
    pub fn invite(&self) -> &GroupInvite {
        &self.invite
    }
}

/// Group control messages carried over the 1:1 channel (inside [`crate::Content::Group`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupControl {
    /// An invitation (variant 0).
    Invite(GroupInvite),
    /// A sender chain hand-out (variant 1).
    SenderKey(SenderKeyDistribution),
    /// A membership op, sent directly (e.g. to a member who missed it) (variant 2).
    Op(MembershipOp),
    /// The new group secret after a removal, from the remover to the remaining members
    /// (variant 3).
    Rekey {
        /// The group.
        group: GroupId,
        /// The epoch of the removal.
        epoch: u64,
        /// The new group secret.
        group_secret: [u8; 32],
    },
}

impl fmt::Debug for GroupControl {
    /// Never prints a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invite(i) => f.debug_tuple("Invite").field(i).finish(),
            Self::SenderKey(d) => f.debug_tuple("SenderKey").field(d).finish(),
            Self::Op(op) => f.debug_tuple("Op").field(op).finish(),
            Self::Rekey { group, epoch, .. } => f
                .debug_struct("Rekey")
                .field("group", group)
                .field("epoch", epoch)
                .finish_non_exhaustive(),
        }
    }
}

impl GroupControl {
    /// The structural limits (name length, member count); full checks happen where the value
    /// is used ([`GroupInvite::verify`], [`GroupState::apply`], [`SenderKeyDistribution::check`]).
    pub fn validate(&self) -> Result<(), GroupError> {
        match self {
            Self::Invite(i) => {
                validate_name(&i.body.name)?;
                if i.body.snapshot.members.len() > MAX_GROUP_MEMBERS {
                    return Err(GroupError::TooManyMembers);
                }
                Ok(())
            }
            Self::Op(op) => match &op.body.change {
                MembershipChange::Create { name, .. } => validate_name(name),
                _ => Ok(()),
            },
            Self::SenderKey(_) | Self::Rekey { .. } => Ok(()),
        }
    }
    /// The group it concerns.
    pub fn group(&self) -> GroupId {
        match self {
            Self::Invite(i) => i.group(),
            Self::SenderKey(d) => d.group,
            Self::Op(op) => op.group(),
            Self::Rekey { group, .. } => *group,
        }
    }
}

/// Why a group operation failed. Every failure leaves the caller's state unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// A structural rule is broken (header padding, inconsistent fields, bad hex…).
    #[error("malformed group data: {why}")]
    Malformed {
        /// Which rule.
        why: &'static str,
    },
    /// A value did not decode.
    #[error("group data: {0}")]
    Wire(#[from] WireError),
    /// A value exceeds its size limit.
    #[error("group data of {len} bytes is too large")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// The envelope's ciphertext length is not a padding bucket (truncated or extended).
    #[error("group envelope ciphertext of {len} bytes is not a padding bucket")]
    NotABucket {
        /// The ciphertext length.
        len: usize,
    },
    /// The padding inside the ciphertext is malformed.
    #[error("group message padding is malformed")]
    BadPadding,
    /// Decryption failed: the ciphertext or a visible field was altered.
    #[error("group message does not authenticate (tampered)")]
    Tampered,
    /// This chain position was already consumed (or lies before the hand-out we hold).
    #[error("group message {iteration} of its chain was already received (replay)")]
    Replay {
        /// The iteration.
        iteration: u32,
    },
    /// The iteration lies more than the skip limit ahead of the chain.
    #[error("group message {iteration} is too far ahead of its chain (next {next})")]
    TooFarAhead {
        /// The message's iteration.
        iteration: u32,
        /// The chain's next iteration.
        next: u32,
    },
    /// No chain with this key id is held (its hand-out has not arrived yet).
    #[error("unknown sender key {}", hex(.key_id))]
    UnknownSenderKey {
        /// The key id in the header.
        key_id: [u8; 16],
    },
    /// A signature does not verify, or a member claims to be someone else.
    #[error("forged group data: {why}")]
    Forged {
        /// What was wrong.
        why: &'static str,
    },
    /// The author is not a member.
    #[error("not a member of the group")]
    NotMember,
    /// The author has no right to do this.
    #[error("not allowed: {why}")]
    NotAllowed {
        /// Which rule.
        why: &'static str,
    },
    /// The op is older than the part of the log this state can still revise.
    #[error("membership op is older than the log window")]
    Stale,
    /// The op competes with the oldest op this state knows, whose predecessor it does not know.
    #[error("membership op forks history this state cannot revise")]
    Fork,
    /// The op lies too far ahead of the head to be kept; apply the ops before it first.
    #[error("membership op {got} is too far ahead of the head {have}")]
    Gap {
        /// The head seq.
        have: u64,
        /// The op's seq.
        got: u64,
    },
    /// A message or hand-out from a membership epoch this state has not reached yet.
    #[error("group epoch {epoch} is ahead of ours ({current})")]
    FutureEpoch {
        /// The stated epoch.
        epoch: u64,
        /// Our epoch.
        current: u64,
    },
    /// The data names another group.
    #[error("data for another group")]
    WrongGroup,
    /// The group is full.
    #[error("group is full ({MAX_GROUP_MEMBERS} members)")]
    TooManyMembers,
    /// The group name is empty or longer than [`MAX_GROUP_NAME_BYTES`].
    #[error("group name must be 1 to {MAX_GROUP_NAME_BYTES} bytes")]
    BadName,
    /// An empty text message.
    #[error("empty group message")]
    EmptyText,
    /// The author left or was removed; messages they sent before are no longer accepted.
    #[error("the author is no longer a member")]
    AuthorDeparted,
    /// The invite fails a check.
    #[error("bad invite: {why}")]
    BadInvite {
        /// Which check.
        why: &'static str,
    },
    /// The envelope or invite is past its lifetime.
    #[error("expired")]
    Expired,
    /// The envelope or invite is dated in the future beyond the clock skew allowed.
    #[error("dated in the future")]
    FromTheFuture,
    /// The sender chain reached 2^32 messages.
    #[error("sender chain exhausted")]
    CounterExhausted,
}

impl GroupError {
    /// Whether the error shows the peer misbehaving (rather than delay, reordering or a race).
    pub fn is_hostile(&self) -> bool {
        matches!(
            self,
            Self::Malformed { .. }
                | Self::Wire(_)
                | Self::TooLarge { .. }
                | Self::NotABucket { .. }
                | Self::BadPadding
                | Self::Tampered
                | Self::Forged { .. }
                | Self::NotMember
                | Self::NotAllowed { .. }
                | Self::WrongGroup
                | Self::TooManyMembers
                | Self::BadName
                | Self::EmptyText
                | Self::BadInvite { .. }
        )
    }
}

crate::impl_wire!(MembershipOp, MAX_OP_BYTES);
crate::impl_wire!(OpBody, MAX_OP_BYTES);
crate::impl_wire!(InviteBody, MAX_INVITE_BYTES);
crate::impl_wire!(GroupSnapshot, MAX_SNAPSHOT_BYTES);
crate::impl_wire!(GroupState, MAX_GROUP_STATE_BYTES);
crate::impl_wire!(SenderChain, MAX_SENDER_CHAIN_BYTES);
crate::impl_wire!(ReceiverChain, MAX_RECEIVER_CHAIN_BYTES);
crate::impl_wire!(SenderKeyDistribution, MAX_DISTRIBUTION_BYTES);
crate::impl_wire!(GroupBody, MAX_GROUP_BODY_BYTES);
crate::impl_wire!(GroupPlaintext, MAX_GROUP_PLAINTEXT_BYTES);
crate::impl_wire!(GroupInvite, MAX_INVITE_BYTES);
crate::impl_wire!(GroupControl, MAX_GROUP_CONTROL_BYTES);

/// A group name: 1 to [`MAX_GROUP_NAME_BYTES`] bytes, no control characters.
fn validate_name(name: &str) -> Result<(), GroupError> {
    if name.is_empty() || name.len() > MAX_GROUP_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(GroupError::BadName);
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::Content;
    use hmac::{Hmac, Mac};
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    const NOW_MS: u64 = 1_700_000_000_000;
    const NOW: u64 = NOW_MS / 1000;

    fn id(n: u8) -> Identity {
        Identity::from_seed(&[n; 32])
    }

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    /// Alice (admin) and Bob, Carol (members); Alice's chain; Bob's copy of it.
    struct Fixture {
        state: GroupState,
        secret: [u8; 32],
        alice_chain: SenderChain,
        bob_has_alice: ReceiverChain,
        r: ChaCha20Rng,
    }

    fn fixture() -> Fixture {
        let mut r = rng(1);
        let (mut state, secret, _) =
            GroupState::create(&id(1), "g", NOW_MS, &mut r).expect("create");
        for k in [2u8, 3] {
            let op = state
                .propose(
                    &id(1),
                    MembershipChange::Add {
                        member: id(k).public(),
                        role: Role::Member,
                    },
                    NOW_MS,
                )
                .expect("add");
            state.apply(&op).expect("apply");
        }
        let alice_chain = SenderChain::new(&mut r);
        let bob_has_alice = ReceiverChain::from_distribution(&alice_chain.distribution(
            state.id(),
            state.epoch(),
            id(1).public(),
        ));
        Fixture {
            state,
            secret,
            alice_chain,
            bob_has_alice,
            r,
        }
    }

    /// A plaintext signed by `signer` for position (`chain`'s key id, `iteration`).
    fn signed(
        f: &Fixture,
        signer: &Identity,
        author: PublicIdentity,
        key_id: [u8; 16],
        iteration: u32,
        body: GroupBody,
    ) -> (GroupPlaintext, [u8; 32]) {
        let routing_key = group_mailbox(&f.state.id, &f.secret, NOW / EPOCH_SECS).id();
        let mut p = GroupPlaintext {
            group: f.state.id,
            epoch: f.state.epoch(),
            author,
            id: MessageId([7; 16]),
            sent_at_ms: NOW_MS,
            body,
            signature: Sig([0; 64]),
        };
        let h = header(&key_id, iteration);
        let m = signed_bytes(&h, &routing_key, NOW, GROUP_TTL_SECS, &p).expect("bytes");
        p.signature = Sig(signer.sign(MESSAGE_SIGNATURE_DOMAIN, &m));
        (p, routing_key)
    }

    /// Encrypt `p` as message `iteration` of `chain` (whatever the plaintext says).
    fn seal_raw(chain: &SenderChain, iteration: u32, p: &GroupPlaintext, rk: [u8; 32]) -> Envelope {
        let mut ck = Zeroizing::new(chain.chain_key);
        for _ in chain.iteration..iteration {
            ck = kdf_ck(&ck).0;
        }
        let (_, mk) = kdf_ck(&ck);
        let ephemeral = header(&chain.key_id, iteration);
        let ciphertext = encrypt(&mk, p, &rk, NOW, GROUP_TTL_SECS, &ephemeral).expect("encrypts");
        Envelope {
            routing_key: rk,
            timestamp: NOW,
            ttl: GROUP_TTL_SECS,
            ephemeral,
            ciphertext,
        }
    }

    fn text(s: &str) -> GroupBody {
        GroupBody::Text(s.into())
    }

    #[test]
    fn a_genuine_raw_message_opens() {
        let mut f = fixture();
        let kid = f.alice_chain.key_id;
        let (p, rk) = signed(&f, &id(1), id(1).public(), kid, 0, text("hi"));
        let env = seal_raw(&f.alice_chain, 0, &p, rk);
        let opened = open_group(&f.state, &mut f.bob_has_alice, &env, NOW).expect("opens");
        assert_eq!(opened, p);
        // And seal_group produces the same kind of envelope.
        let env = seal_group(
            &f.state,
            &id(1),
            &mut f.alice_chain,
            &f.secret,
            text("again"),
            MessageId([1; 16]),
            NOW_MS,
            &mut f.r,
        )
        .expect("seals");
        assert_eq!(env.routing_key, rk);
        assert_eq!(group_key_id(&env), Ok((kid, 0)));
        assert_eq!(
            open_group(&f.state, &mut f.bob_has_alice, &env, NOW),
            Err(GroupError::Replay { iteration: 0 })
        );
    }

    #[test]
    fn a_key_request_seals_and_opens_and_must_name_one_to_sixteen_keys() {
        let mut f = fixture();
        let wanted = vec![[9u8; KEY_ID_BYTES], [8u8; KEY_ID_BYTES]];
        let env = seal_group(
            &f.state,
            &id(1),
            &mut f.alice_chain,
            &f.secret,
            GroupBody::KeyRequest {
                key_ids: wanted.clone(),
            },
            MessageId([1; 16]),
            NOW_MS,
            &mut f.r,
        )
        .expect("seals");
        let opened = open_group(&f.state, &mut f.bob_has_alice, &env, NOW).expect("opens");
        assert_eq!(opened.body, GroupBody::KeyRequest { key_ids: wanted });
        assert!(!format!("{:?}", opened.body).is_empty());

        let iteration = f.alice_chain.iteration();
        for key_ids in [
            Vec::new(),
            vec![[1u8; KEY_ID_BYTES]; MAX_KEY_REQUEST_IDS + 1],
        ] {
            let refused = seal_group(
                &f.state,
                &id(1),
                &mut f.alice_chain,
                &f.secret,
                GroupBody::KeyRequest { key_ids },
                MessageId([2; 16]),
                NOW_MS,
                &mut f.r,
            );
            assert!(
                matches!(refused, Err(GroupError::Malformed { .. })),
                "{refused:?}"
            );
            assert_eq!(
                f.alice_chain.iteration(),
                iteration,
                "the chain did not move"
            );
        }
        // One signed by its author anyway is refused by the receiver, as hostile.
        let kid = f.alice_chain.key_id;
        let (p, rk) = signed(
            &f,
            &id(1),
            id(1).public(),
            kid,
            iteration,
            GroupBody::KeyRequest {
                key_ids: Vec::new(),
            },
        );
        let env = seal_raw(&f.alice_chain, iteration, &p, rk);
        let err = open_group(&f.state, &mut f.bob_has_alice, &env, NOW).expect_err("refused");
        assert!(err.is_hostile(), "{err}");
    }

    #[test]
    fn a_forged_or_altered_signature_is_caught() {
        let mut f = fixture();
        let kid = f.alice_chain.key_id;
        let before = f.bob_has_alice.to_wire().expect("enc");
        // Bob (who holds Alice's chain key) writes as Alice: he cannot sign as her.
        let (p, rk) = signed(&f, &id(2), id(1).public(), kid, 0, text("from alice?"));
        let env = seal_raw(&f.alice_chain, 0, &p, rk);
        assert_eq!(
            open_group(&f.state, &mut f.bob_has_alice, &env, NOW),
            Err(GroupError::Forged {
                why: "message signature does not verify"
            })
        );
        // Alice's genuine message with its text changed after signing.
        let (mut p, rk) = signed(&f, &id(1), id(1).public(), kid, 0, text("real"));
        p.body = text("fake");
        let env = seal_raw(&f.alice_chain, 0, &p, rk);
        assert!(matches!(
            open_group(&f.state, &mut f.bob_has_alice, &env, NOW),
            Err(GroupError::Forged { .. })
        ));
        // Alice's genuine signed message re-encrypted at another position of her chain.
        let (p, rk) = signed(&f, &id(1), id(1).public(), kid, 0, text("once"));
        let env = seal_raw(&f.alice_chain, 1, &p, rk);
        assert_eq!(
            open_group(&f.state, &mut f.bob_has_alice, &env, NOW),
            Err(GroupError::Forged {
                why: "message signature does not verify"
            })
        );
        assert_eq!(f.bob_has_alice.to_wire().expect("enc"), before);
        assert!(GroupError::Forged { why: "" }.is_hostile());
    }

    #[test]
    fn a_message_on_another_members_chain_is_caught() {
        let mut f = fixture();
        // Bob seals a message signed by himself, under Alice's chain (whose key he holds).
        let kid = f.alice_chain.key_id;
        let (p, rk) = signed(&f, &id(2), id(2).public(), kid, 0, text("it's me, bob"));
        let env = seal_raw(&f.alice_chain, 0, &p, rk);
        assert_eq!(
            open_group(&f.state, &mut f.bob_has_alice, &env, NOW),
            Err(GroupError::Forged {
                why: "sender key belongs to another member"
            })
        );
        // The chain was not consumed: Alice's real message 0 still opens.
        let (p, rk) = signed(&f, &id(1), id(1).public(), kid, 0, text("real"));
        let env = seal_raw(&f.alice_chain, 0, &p, rk);
        assert!(open_group(&f.state, &mut f.bob_has_alice, &env, NOW).is_ok());
    }

    #[test]
    fn a_non_member_chain_is_caught() {
        let mut f = fixture();
        let mallory = id(66);
        let chain = SenderChain::new(&mut f.r);
        // Even a receiver that took Mallory's hand-out without checking it refuses her messages.
        let mut held = ReceiverChain::from_distribution(&chain.distribution(
            f.state.id,
            f.state.epoch(),
            mallory.public(),
        ));
        let (p, rk) = signed(&f, &mallory, mallory.public(), chain.key_id, 0, text("hi"));
        let env = seal_raw(&chain, 0, &p, rk);
        assert_eq!(
            open_group(&f.state, &mut held, &env, NOW),
            Err(GroupError::Forged {
                why: "author was not a member at that epoch"
            })
        );
        // A message naming another group, or from an epoch before the author joined.
        let kid = f.alice_chain.key_id;
        let (mut p, rk) = signed(&f, &id(1), id(1).public(), kid, 0, text("x"));
        p.group = GroupId([1; 32]);
        let env = seal_raw(&f.alice_chain, 0, &p, rk);
        assert!(matches!(
            open_group(&f.state, &mut f.bob_has_alice, &env, NOW),
            Err(GroupError::Forged { .. })
        ));
    }

    #[test]
    fn bad_padding_is_caught() {
        let mut f = fixture();
        let kid = f.alice_chain.key_id;
        let (p, rk) = signed(&f, &id(1), id(1).public(), kid, 0, text("pad"));
        let inner = p.to_wire().expect("enc");
        let (_, mk) = kdf_ck(&f.alice_chain.chain_key);
        let ephemeral = header(&kid, 0);
        for corrupt in 0..2 {
            let mut padded = pad(&inner).expect("pads").to_vec();
            if corrupt == 0 {
                let n = padded.len();
                padded[n - 1] = 1; // a non-zero padding byte
            } else {
                let too_long = padded.len() as u32; // longer than what follows the prefix
                padded[..4].copy_from_slice(&too_long.to_le_bytes());
            }
            let (cipher, nonce) = message_cipher(&mk);
            let ciphertext = cipher
                .encrypt(
                    (&nonce).into(),
                    Payload {
                        msg: &padded,
                        aad: &associated_data(&rk, NOW, GROUP_TTL_SECS, &ephemeral),
                    },
                )
                .expect("enc");
            let env = Envelope {
                routing_key: rk,
                timestamp: NOW,
                ttl: GROUP_TTL_SECS,
                ephemeral,
                ciphertext,
            };
            assert_eq!(
                open_group(&f.state, &mut f.bob_has_alice, &env, NOW),
                Err(GroupError::BadPadding)
            );
        }
        assert_eq!(f.bob_has_alice.next_iteration(), 0);
    }

    #[test]
    fn layouts_and_kdfs_are_as_documented() {
        let h = header(&[0xaa; 16], 0x0102_0304);
        let mut expect = vec![0xaa; 16];
        expect.extend_from_slice(&[4, 3, 2, 1]);
        expect.extend_from_slice(&[0; 12]);
        assert_eq!(h.to_vec(), expect);
        // Chain KDF: HMAC-SHA256(ck, 0x01) / (ck, 0x02).
        let ck = [9u8; 32];
        let (next, mk) = kdf_ck(&ck);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&ck).expect("key");
        mac.update(&[0x02]);
        assert_eq!(next.as_slice(), mac.finalize().into_bytes().as_slice());
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&ck).expect("key");
        mac.update(&[0x01]);
        assert_eq!(mk.as_slice(), mac.finalize().into_bytes().as_slice());
        // Group id and topic.
        let mut d = Sha256::new();
        d.update(b"meshchat/group-id/v1");
        d.update([5u8; 32]);
        assert_eq!(
            GroupId::from_public(&[5; 32]).0,
            <[u8; 32]>::from(d.finalize())
        );
        // Padded sizes hit the envelope buckets exactly.
        assert_eq!(pad(&[0; 10]).expect("pad").len(), BUCKETS[0] + PAD_OVERHEAD);
        let most = BUCKETS[0] + PAD_OVERHEAD - PAD_PREFIX_BYTES;
        assert_eq!(
            pad(&vec![0; most]).expect("pad").len(),
            BUCKETS[0] + PAD_OVERHEAD
        );
        assert_eq!(
            pad(&vec![0; most + 1]).expect("pad").len(),
            BUCKETS[1] + PAD_OVERHEAD
        );
        // The largest text fits the largest bucket.
        assert!(PAD_PREFIX_BYTES + MAX_GROUP_PLAINTEXT_BYTES <= BUCKETS[4] + PAD_OVERHEAD);
        // Membership op layout: version, group, seq, prev, author, time, change...
        let f = fixture();
        let op = f
            .state
            .propose(&id(2), MembershipChange::Leave, 42)
            .expect("leave");
        let bytes = op.to_wire().expect("enc");
        let mut expect = vec![1u8];
        expect.extend_from_slice(&f.state.id.0);
        expect.extend_from_slice(&(f.state.epoch() + 1).to_le_bytes());
        expect.extend_from_slice(&f.state.head());
        expect.extend_from_slice(id(2).public().as_bytes());
        expect.extend_from_slice(&42u64.to_le_bytes());
        expect.extend_from_slice(&3u32.to_le_bytes()); // Leave
        expect.extend_from_slice(&op.signature.0);
        expect.push(0); // no group signature
        assert_eq!(bytes, expect);
        assert_eq!(op.hash(), <[u8; 32]>::from(Sha256::digest(&bytes)));
    }

    /// An op signed by `author` with arbitrary fields.
    fn raw_op(
        state: &GroupState,
        author: &Identity,
        seq: u64,
        prev: [u8; 32],
        c: MembershipChange,
    ) -> MembershipOp {
        MembershipOp::sign(
            OpBody {
                group: state.id,
                seq,
                prev,
                author: author.public(),
                issued_at_ms: NOW_MS,
                change: c,
            },
            author,
        )
        .expect("signs")
    }

    #[test]
    fn crafted_ops_are_refused_and_change_nothing() {
        let f = fixture();
        let mut state = f.state.clone();
        let (seq, head) = (state.epoch() + 1, state.head());
        let add = |m: u8| MembershipChange::Add {
            member: id(m).public(),
            role: Role::Member,
        };
        // A member adds or removes.
        assert_eq!(
            state.apply(&raw_op(&state, &id(2), seq, head, add(9))),
            Err(GroupError::NotAllowed {
                why: "only admins add members"
            })
        );
        assert!(matches!(
            state.apply(&raw_op(
                &state,
                &id(2),
                seq,
                head,
                MembershipChange::Remove {
                    member: id(3).public()
                }
            )),
            Err(GroupError::NotAllowed { .. })
        ));
        // A non-member leaves.
        assert_eq!(
            state.apply(&raw_op(&state, &id(9), seq, head, MembershipChange::Leave)),
            Err(GroupError::NotMember)
        );
        // A bad signature.
        let mut forged = raw_op(&state, &id(1), seq, head, add(9));
        forged.body.change = add(10);
        assert!(matches!(
            state.apply(&forged),
            Err(GroupError::Forged { .. })
        ));
        // Create later in the log; a group signature on an ordinary op.
        assert!(matches!(
            state.apply(&raw_op(
                &state,
                &id(1),
                seq,
                head,
                MembershipChange::Create {
                    name: "x".into(),
                    group_public: [1; 32]
                }
            )),
            Err(GroupError::NotAllowed { .. })
        ));
        let mut extra = raw_op(&state, &id(1), seq, head, add(9));
        extra.group_signature = Some(Sig([0; 64]));
        assert!(matches!(
            state.apply(&extra),
            Err(GroupError::Malformed { .. })
        ));
        // A seq that does not follow its predecessor.
        assert!(matches!(
            state.apply(&raw_op(&state, &id(1), seq + 1, head, add(9))),
            Err(GroupError::Malformed { .. })
        ));
        // Another group; too old; too far ahead.
        let mut other = raw_op(&state, &id(1), seq, head, add(9));
        other.body.group = GroupId([3; 32]);
        assert_eq!(state.apply(&other), Err(GroupError::WrongGroup));
        assert_eq!(
            state.apply(&raw_op(&state, &id(1), 0, [0; 32], add(9))),
            Err(GroupError::NotAllowed {
                why: "a group is created only by its genesis op (seq 0)"
            })
        );
        let far = seq + MAX_PENDING_OPS as u64 + 5;
        assert_eq!(
            state.apply(&raw_op(&state, &id(1), far, [8; 32], add(9))),
            Err(GroupError::Gap {
                have: seq - 1,
                got: far
            })
        );
        assert_eq!(state, f.state, "a refused op changed the state");
        // Pending ops of someone the group never heard of are kept, but give way to others'
        // when the pool is full.
        for k in 0..MAX_PENDING_OPS as u8 {
            assert_eq!(
                state.apply(&raw_op(
                    &state,
                    &id(99),
                    seq + 1,
                    [k; 32],
                    MembershipChange::Leave
                )),
                Ok(Applied::Pending)
            );
        }
        let legit = raw_op(&state, &id(2), seq + 2, [8; 32], MembershipChange::Leave);
        assert_eq!(state.apply(&legit), Ok(Applied::Pending));
        assert_eq!(state.pending_ops().count(), MAX_PENDING_OPS);
        assert!(state.pending_ops().any(|o| o == &legit));
        // A genesis op with a broken group signature.
        let mut r = rng(2);
        let (_, _, mut genesis) = GroupState::create(&id(1), "g", NOW_MS, &mut r).expect("create");
        genesis.group_signature = Some(Sig([0; 64]));
        assert!(matches!(
            GroupState::from_genesis(&genesis),
            Err(GroupError::Forged { .. })
        ));
    }

    #[test]
    fn the_window_moves_and_old_ops_are_stale_or_duplicate() {
        let f = fixture();
        let mut state = f.state.clone();
        let mut ops = Vec::new();
        for k in 0..(FORK_WINDOW as u8 + 5) {
            let op = state
                .propose(
                    &id(1),
                    MembershipChange::Add {
                        member: id(100 + k).public(),
                        role: Role::Member,
                    },
                    NOW_MS,
                )
                .expect("add");
            assert_eq!(state.apply(&op), Ok(Applied::Appended));
            ops.push(op);
        }
        assert_eq!(state.log.len(), FORK_WINDOW);
        assert_eq!(state.apply(&ops[0]), Ok(Applied::Duplicate));
        // A sibling of an op that left the window.
        let old = raw_op(
            &state,
            &id(1),
            ops[0].seq(),
            ops[0].prev(),
            MembershipChange::Leave,
        );
        assert_eq!(state.apply(&old), Err(GroupError::Stale));
        let at_base = raw_op(
            &state,
            &id(1),
            state.base.seq,
            [0; 32],
            MembershipChange::Leave,
        );
        assert_eq!(state.apply(&at_base), Err(GroupError::Fork));
        let back = GroupState::from_wire(&state.to_wire().expect("enc")).expect("dec");
        assert_eq!(back, state);
    }

    fn signed_invite(body: InviteBody, signer: &Identity) -> GroupInvite {
        let signature = Sig(signer.sign(INVITE_SIGNATURE_DOMAIN, &body.to_wire().expect("enc")));
        GroupInvite { body, signature }
    }

    #[test]
    fn crafted_invites_are_refused() {
        let f = fixture();
        let good =
            GroupInvite::new(&f.state, &id(1), &id(3).public(), &f.secret, NOW_MS).expect("invite");
        assert!(good.clone().verify(NOW_MS).is_ok());
        // A member (not an admin) signs a well-formed invite.
        let mut body = good.body.clone();
        body.inviter = id(2).public();
        assert_eq!(
            signed_invite(body, &id(2)).verify(NOW_MS),
            Err(GroupError::BadInvite {
                why: "the inviter is not an admin of the group"
            })
        );
        // Signed by someone other than the named inviter.
        assert_eq!(
            signed_invite(good.body.clone(), &id(2)).verify(NOW_MS),
            Err(GroupError::BadInvite {
                why: "the inviter's signature does not verify"
            })
        );
        // The invitee is not in the snapshot.
        let mut body = good.body.clone();
        body.invitee = id(50).public();
        assert_eq!(
            signed_invite(body, &id(1)).verify(NOW_MS),
            Err(GroupError::BadInvite {
                why: "the invitee is not in the snapshot"
            })
        );
        // The snapshot altered after signing.
        let mut tampered = good.clone();
        tampered
            .body
            .snapshot
            .members
            .push((id(51).public(), Role::Admin, 1));
        assert_eq!(
            tampered.verify(NOW_MS),
            Err(GroupError::BadInvite {
                why: "the inviter's signature does not verify"
            })
        );
        // A group key that does not give the group id; a listed-twice member.
        let mut body = good.body.clone();
        body.group_public = [4; 32];
        assert!(matches!(
            signed_invite(body, &id(1)).verify(NOW_MS),
            Err(GroupError::BadInvite { .. })
        ));
        let mut body = good.body.clone();
        let first = body.snapshot.members[0];
        body.snapshot.members.push(first);
        assert_eq!(
            signed_invite(body, &id(1)).verify(NOW_MS),
            Err(GroupError::BadInvite {
                why: "the snapshot is inconsistent"
            })
        );
        // More than 1,000 members: refused by the content decoder already.
        let mut body = good.body.clone();
        for i in 0..MAX_GROUP_MEMBERS as u32 {
            let mut seed = [9u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            body.snapshot
                .members
                .push((Identity::from_seed(&seed).public(), Role::Member, 1));
        }
        let big = Content::Group(GroupControl::Invite(signed_invite(body, &id(1))));
        let bytes = big.to_wire().expect("within the wire limit");
        assert_eq!(
            Content::decode(&bytes),
            Err(crate::content::ContentError::Group(
                GroupError::TooManyMembers
            ))
        );
    }

    #[test]
    fn stored_states_are_validated() {
        let f = fixture();
        let mut repr = GroupStateRepr::from(f.state.clone());
        let dup = repr.base.members[0].clone();
        repr.base.members.push(dup);
        assert!(GroupState::try_from(repr).is_err());
        let mut repr = GroupStateRepr::from(f.state.clone());
        repr.name = String::new();
        assert_eq!(GroupState::try_from(repr), Err(GroupError::BadName));
        let repr = GroupStateRepr::from(f.state.clone());
        assert_eq!(GroupState::try_from(repr), Ok(f.state.clone()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn random_padded_plaintexts_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = unpad(&bytes);
            let _ = GroupPlaintext::from_wire(&bytes);
            let _ = OpBody::from_wire(&bytes);
            let _ = InviteBody::from_wire(&bytes);
        }
    }
}
