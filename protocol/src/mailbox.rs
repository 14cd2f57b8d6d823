//! Mailboxes: where sealed envelopes wait for an offline recipient, and how only that recipient
//! can read or empty them. See `docs/protocol.md`, section "Mailboxes".
//!
//! A mailbox is named by a 32-byte *mailbox id*. The storing nodes (the replicas, the peers
//! closest to the id in Kademlia XOR distance) see only that id and the envelopes, which are
//! sealed (sender hidden). Reading (FETCH) and emptying (DELETE) a mailbox need a signature by
//! the mailbox's *authorisation key*, an Ed25519 key whose public half hashes to the id:
//!
//! ```text
//! pair mailbox   seed = mailbox_key(P, R, epoch)          (secret: HKDF of the pair secret)
//!                id   = SHA-256("meshchat/mailbox-id/v1" || auth_public_key)
//! first contact  key  = R's identity key
//!                id   = SHA-256("meshchat/first-contact/v1" || R) = first_contact_mailbox(R)
//! ```
//!
//! So a replica checks `id` against the public key in the request and the signature against the
//! key, and learns nothing about whose mailbox it is (for pair mailboxes). A request carries a
//! timestamp that must lie within [`MAX_AUTH_AGE_SECS`] in the past or
//! [`MAX_CLOCK_SKEW_SECS`] in the future, and a random nonce.
//!
//! The requests and responses of `/meshchat/mailbox/1.0.0` ([`MailboxRequest`],
//! [`MailboxResponse`]) are wire types with stated limits; every way a replica refuses a request
//! has its own [`MailboxReject`].

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{
    addressing::{first_contact_mailbox, mailbox_key, PairSecret},
    envelope::{Envelope, MAX_ENVELOPE_BYTES},
    identity::{Identity, PublicIdentity},
    prekey::MAX_CLOCK_SKEW_SECS,
};

/// The hash prefix of a pair mailbox id.
pub const MAILBOX_ID_DOMAIN: &[u8] = b"meshchat/mailbox-id/v1";
/// The signature domain of FETCH and DELETE (framed as `"meshchat/" || domain || 0x00 || msg`).
pub const MAILBOX_SIGNATURE_DOMAIN: &[u8] = b"mailbox-request";
/// A request timestamp may lie at most this far in the past.
pub const MAX_AUTH_AGE_SECS: u64 = 300;
/// The most envelopes one FETCH response carries (the reader pages on with `after`).
pub const MAX_FETCH_ENVELOPES: usize = 16;
/// The most envelope ids one DELETE names.
pub const MAX_DELETE_IDS: usize = 256;
/// Largest wire encoding of a [`MailboxRequest`]: a STORE of the largest envelope, and room.
pub const MAX_REQUEST_BYTES: usize = MAX_ENVELOPE_BYTES + 256;
/// Largest wire encoding of a [`MailboxResponse`]: a full FETCH page of the largest envelopes.
pub const MAX_RESPONSE_BYTES: usize = MAX_FETCH_ENVELOPES * MAX_ENVELOPE_BYTES + 256;

/// Operation bytes inside the signed message.
const OP_FETCH: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_SUBSCRIBE: u8 = 3;

/// The id of the pair mailbox whose authorisation public key is `public_key`:
/// `SHA-256("meshchat/mailbox-id/v1" || public_key)`.
pub fn pair_mailbox_id(public_key: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(MAILBOX_ID_DOMAIN);
    h.update(public_key);
    h.finalize().into()
}

/// Whether `public_key` is the authorisation key of mailbox `id` (either kind).
pub fn key_opens(id: &[u8; 32], public_key: &[u8; 32]) -> bool {
    if pair_mailbox_id(public_key) == *id {
        return true;
    }
    match PublicIdentity::from_bytes(public_key) {
        Ok(identity) => first_contact_mailbox(&identity) == *id,
        Err(_) => false,
    }
}

/// The secret side of one mailbox: its id and the key that authorises FETCH and DELETE. Held by
/// the recipient; the sender of pair mail derives it too (it knows the pair secret) but only
/// needs [`MailboxKeys::id`].
#[derive(Clone)]
pub struct MailboxKeys {
    signing: SigningKey,
    id: [u8; 32],
}

impl fmt::Debug for MailboxKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MailboxKeys")
            .field("id", &format_args!("{:02x?}", &self.id[..8]))
            .finish_non_exhaustive()
    }
}

impl MailboxKeys {
    /// The mailbox whose authorisation key has the Ed25519 seed `seed` (id: [`pair_mailbox_id`]
    /// of its public key). Used for group mailboxes (see [`crate::group::group_mailbox`]).
    pub(crate) fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let id = pair_mailbox_id(&signing.verifying_key().to_bytes());
        Self { signing, id }
    }

    /// The mailbox of mail to `recipient` from its pair partner in `epoch`: the Ed25519 seed is
    /// [`mailbox_key`]`(pair, recipient, epoch)`, the id [`pair_mailbox_id`] of its public key.
    pub fn derive(pair: &PairSecret, recipient: &PublicIdentity, epoch: u64) -> Self {
        let seed = Zeroizing::new(mailbox_key(pair, recipient, epoch));
        let signing = SigningKey::from_bytes(&seed);
        let id = pair_mailbox_id(&signing.verifying_key().to_bytes());
        Self { signing, id }
    }

    /// `identity`'s first-contact mailbox: the key is the identity key itself, the id
    /// [`first_contact_mailbox`].
    pub fn first_contact(identity: &Identity) -> Self {
        let signing = SigningKey::from_bytes(&identity.seed());
        Self {
            signing,
            id: first_contact_mailbox(&identity.public()),
        }
    }

    /// The mailbox id (what replicas see, and the Kademlia key placing them).
    pub fn id(&self) -> [u8; 32] {
        self.id
    }

    /// The authorisation public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    fn authorise<R: CryptoRngCore + ?Sized>(
        &self,
        op: u8,
        body: &[u8],
        now: u64,
        rng: &mut R,
    ) -> MailboxAuth {
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        let msg = signed_message(op, &self.id, now, &nonce, body);
        MailboxAuth {
            public_key: self.public_key(),
            timestamp: now,
            nonce,
            signature: self.signing.sign(&msg).to_bytes(),
        }
    }

    /// A signed FETCH of the envelopes after `after` (in id order; `None`: from the start).
    pub fn fetch<R: CryptoRngCore + ?Sized>(
        &self,
        after: Option<[u8; 32]>,
        now: u64,
        rng: &mut R,
    ) -> MailboxRequest {
        let auth = self.authorise(OP_FETCH, &fetch_body(&after), now, rng);
        MailboxRequest::Fetch {
            mailbox: self.id,
            after,
            auth,
        }
    }

    /// A signed DELETE of the envelopes `ids` (at most [`MAX_DELETE_IDS`]; more are refused by
    /// the replica as malformed).
    pub fn delete<R: CryptoRngCore + ?Sized>(
        &self,
        ids: Vec<[u8; 32]>,
        now: u64,
        rng: &mut R,
    ) -> MailboxRequest {
        let auth = self.authorise(OP_DELETE, &delete_body(&ids), now, rng);
        MailboxRequest::Delete {
            mailbox: self.id,
            ids,
            auth,
        }
    }

    /// A signed SUBSCRIBE: the replica pushes new mail for this mailbox to the requesting peer
    /// while its connection lasts.
    pub fn subscribe<R: CryptoRngCore + ?Sized>(&self, now: u64, rng: &mut R) -> MailboxRequest {
        let auth = self.authorise(OP_SUBSCRIBE, &[], now, rng);
        MailboxRequest::Subscribe {
            mailbox: self.id,
            auth,
        }
    }
}

fn fetch_body(after: &Option<[u8; 32]>) -> Vec<u8> {
    match after {
        None => vec![0],
        Some(a) => {
            let mut v = Vec::with_capacity(33);
            v.push(1);
            v.extend_from_slice(a);
            v
        }
    }
}

fn delete_body(ids: &[[u8; 32]]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 32 * ids.len());
    v.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    for id in ids {
        v.extend_from_slice(id);
    }
    v
}

/// `"meshchat/mailbox-request" || 0x00 || op || mailbox || u64_le(timestamp) || nonce || body`.
fn signed_message(
    op: u8,
    mailbox: &[u8; 32],
    timestamp: u64,
    nonce: &[u8; 16],
    body: &[u8],
) -> Vec<u8> {
    let mut m =
        Vec::with_capacity(9 + MAILBOX_SIGNATURE_DOMAIN.len() + 1 + 1 + 32 + 8 + 16 + body.len());
    m.extend_from_slice(b"meshchat/");
    m.extend_from_slice(MAILBOX_SIGNATURE_DOMAIN);
    m.push(0);
    m.push(op);
    m.extend_from_slice(mailbox);
    m.extend_from_slice(&timestamp.to_le_bytes());
    m.extend_from_slice(nonce);
    m.extend_from_slice(body);
    m
}

/// The proof that a FETCH, DELETE or SUBSCRIBE comes from the holder of the mailbox's key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxAuth {
    /// The authorisation public key; the mailbox id must be derived from it.
    pub public_key: [u8; 32],
    /// When the request was made (unix seconds).
    pub timestamp: u64,
    /// Random, per request.
    pub nonce: [u8; 16],
    /// Ed25519 over the signed message (see the module doc).
    #[serde(with = "serde_big_array::BigArray")]
    pub signature: [u8; 64],
}

impl fmt::Debug for MailboxAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MailboxAuth")
            .field("timestamp", &self.timestamp)
            .finish_non_exhaustive()
    }
}

/// Why an authorisation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The public key is not the key of this mailbox.
    #[error("the key does not open this mailbox")]
    WrongKey,
    /// The public key is not a usable Ed25519 key.
    #[error("the authorisation key is not a valid Ed25519 key")]
    BadPublicKey,
    /// The signature does not verify.
    #[error("the request signature does not verify")]
    BadSignature,
    /// The timestamp is older than [`MAX_AUTH_AGE_SECS`].
    #[error("request timestamp {timestamp} is too old (now {now})")]
    Expired {
        /// The stated timestamp.
        timestamp: u64,
        /// The time of the check.
        now: u64,
    },
    /// The timestamp lies more than [`MAX_CLOCK_SKEW_SECS`] ahead.
    #[error("request timestamp {timestamp} is in the future (now {now})")]
    FromTheFuture {
        /// The stated timestamp.
        timestamp: u64,
        /// The time of the check.
        now: u64,
    },
}

impl MailboxAuth {
    fn verify(&self, op: u8, mailbox: &[u8; 32], body: &[u8], now: u64) -> Result<(), AuthError> {
        if self.timestamp.saturating_add(MAX_AUTH_AGE_SECS) < now {
            return Err(AuthError::Expired {
                timestamp: self.timestamp,
                now,
            });
        }
        if self.timestamp > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(AuthError::FromTheFuture {
                timestamp: self.timestamp,
                now,
            });
        }
        if !key_opens(mailbox, &self.public_key) {
            return Err(AuthError::WrongKey);
        }
        let key =
            VerifyingKey::from_bytes(&self.public_key).map_err(|_| AuthError::BadPublicKey)?;
        if key.is_weak() {
            return Err(AuthError::BadPublicKey);
        }
        let msg = signed_message(op, mailbox, self.timestamp, &self.nonce, body);
        key.verify_strict(&msg, &Signature::from_bytes(&self.signature))
            .map_err(|_| AuthError::BadSignature)
    }
}

/// A request of `/meshchat/mailbox/1.0.0` (wire type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MailboxRequest {
    /// Keep this envelope in the mailbox `envelope.routing_key` (from a sender).
    Store {
        /// The sealed envelope; its `routing_key` is the mailbox id.
        envelope: Envelope,
    },
    /// The envelopes of `mailbox` after `after` (ids in ascending order).
    Fetch {
        /// The mailbox id.
        mailbox: [u8; 32],
        /// Page on from this envelope id (exclusive).
        after: Option<[u8; 32]>,
        /// The recipient's authorisation.
        auth: MailboxAuth,
    },
    /// Drop these envelopes from `mailbox` (collected by the recipient).
    Delete {
        /// The mailbox id.
        mailbox: [u8; 32],
        /// Envelope ids (SHA-256 of their wire bytes), at most [`MAX_DELETE_IDS`].
        ids: Vec<[u8; 32]>,
        /// The recipient's authorisation.
        auth: MailboxAuth,
    },
    /// A copy of an envelope from another replica (repair, hand-off); same checks as STORE.
    Replicate {
        /// The sealed envelope.
        envelope: Envelope,
    },
    /// Push new mail for `mailbox` to this peer while it stays connected.
    Subscribe {
        /// The mailbox id.
        mailbox: [u8; 32],
        /// The recipient's authorisation.
        auth: MailboxAuth,
    },
    /// From a replica to a subscribed recipient: new mail (answered `Stored` once durable).
    Deliver {
        /// The sealed envelope.
        envelope: Envelope,
    },
}

crate::impl_wire!(MailboxRequest, MAX_REQUEST_BYTES);

impl MailboxRequest {
    /// Check the authorisation of a FETCH, DELETE or SUBSCRIBE at `now` (STORE and REPLICATE
    /// need none, nor does DELIVER, which the recipient opens itself) and the DELETE id limit.
    pub fn authorise(&self, now: u64) -> Result<(), MailboxReject> {
        match self {
            Self::Store { .. } | Self::Replicate { .. } | Self::Deliver { .. } => Ok(()),
            Self::Fetch {
                mailbox,
                after,
                auth,
            } => auth
                .verify(OP_FETCH, mailbox, &fetch_body(after), now)
                .map_err(MailboxReject::from),
            Self::Delete { mailbox, ids, auth } => {
                if ids.len() > MAX_DELETE_IDS {
                    return Err(MailboxReject::Malformed);
                }
                auth.verify(OP_DELETE, mailbox, &delete_body(ids), now)
                    .map_err(MailboxReject::from)
            }
            Self::Subscribe { mailbox, auth } => auth
                .verify(OP_SUBSCRIBE, mailbox, &[], now)
                .map_err(MailboxReject::from),
        }
    }
}

/// A replica's answer (wire type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MailboxResponse {
    /// The envelope is durably stored (or already was: `duplicate`).
    Stored {
        /// SHA-256 of the envelope's wire bytes.
        envelope_id: [u8; 32],
        /// It was held already.
        duplicate: bool,
    },
    /// A page of the mailbox, ascending by envelope id.
    Envelopes {
        /// At most [`MAX_FETCH_ENVELOPES`].
        envelopes: Vec<Envelope>,
        /// More follow after the last one.
        more: bool,
    },
    /// How many of the named envelopes were dropped.
    Deleted {
        /// The count.
        count: u32,
    },
    /// The subscription is in place.
    Subscribed,
    /// The request was refused.
    Refused {
        /// Why.
        reason: MailboxReject,
    },
}

crate::impl_wire!(MailboxResponse, MAX_RESPONSE_BYTES);

/// Why a replica refused a mailbox request. Each limit has its own reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum MailboxReject {
    /// The envelope's lifetime is over.
    #[error("envelope expired")]
    EnvelopeExpired,
    /// The envelope's timestamp lies in the future.
    #[error("envelope timestamp in the future")]
    EnvelopeFromTheFuture,
    /// The envelope's TTL exceeds the maximum.
    #[error("envelope TTL too long")]
    TtlTooLong,
    /// The envelope's ciphertext is not a padding bucket.
    #[error("envelope ciphertext is not a padding bucket")]
    NotABucket,
    /// The mailbox holds as many envelopes as its quota allows.
    #[error("mailbox envelope quota reached")]
    MailboxCountQuota,
    /// The mailbox holds as many bytes as its quota allows.
    #[error("mailbox byte quota reached")]
    MailboxByteQuota,
    /// The replica's disk budget for all mailboxes is used up.
    #[error("replica disk budget exhausted")]
    DiskBudget,
    /// The requesting peer sends too fast.
    #[error("rate limited")]
    RateLimited,
    /// The authorisation key does not open this mailbox.
    #[error("the key does not open this mailbox")]
    WrongKey,
    /// The authorisation key is not a valid key.
    #[error("invalid authorisation key")]
    BadPublicKey,
    /// The authorisation signature does not verify.
    #[error("bad request signature")]
    BadSignature,
    /// The request timestamp is too old.
    #[error("request timestamp too old")]
    AuthExpired,
    /// The request timestamp lies in the future.
    #[error("request timestamp in the future")]
    AuthFromTheFuture,
    /// The request does not decode or breaks a protocol limit.
    #[error("malformed request")]
    Malformed,
    /// The request is larger than the protocol allows.
    #[error("request too large")]
    TooLarge,
    /// The replica is overloaded; try again later.
    #[error("replica busy")]
    Busy,
    /// The replica failed locally; try again later.
    #[error("replica internal error")]
    Internal,
}

impl From<AuthError> for MailboxReject {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::WrongKey => Self::WrongKey,
            AuthError::BadPublicKey => Self::BadPublicKey,
            AuthError::BadSignature => Self::BadSignature,
            AuthError::Expired { .. } => Self::AuthExpired,
            AuthError::FromTheFuture { .. } => Self::AuthFromTheFuture,
        }
    }
}

impl From<&crate::envelope::EnvelopeError> for MailboxReject {
    fn from(e: &crate::envelope::EnvelopeError) -> Self {
        use crate::envelope::EnvelopeError as E;
        match e {
            E::Expired { .. } => Self::EnvelopeExpired,
            E::FromTheFuture { .. } => Self::EnvelopeFromTheFuture,
            E::TtlTooLong { .. } => Self::TtlTooLong,
            E::NotABucket { .. } => Self::NotABucket,
            _ => Self::Malformed,
        }
    }
}

impl MailboxReject {
    /// Whether the same request may succeed later (quotas drain, rate limits refill).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Busy
                | Self::Internal
                | Self::RateLimited
                | Self::MailboxCountQuota
                | Self::MailboxByteQuota
                | Self::DiskBudget
        )
    }

    /// Whether the request shows the peer misbehaving (a strike against it).
    pub fn is_hostile(self) -> bool {
        matches!(
            self,
            Self::WrongKey
                | Self::BadPublicKey
                | Self::BadSignature
                | Self::Malformed
                | Self::TooLarge
                | Self::NotABucket
                | Self::TtlTooLong
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addressing::pair_secret, wire::Wire};
    use proptest::prelude::*;
    use rand::{rngs::StdRng, SeedableRng};

    const NOW: u64 = 1_700_000_000;

    fn id(n: u8) -> Identity {
        Identity::from_seed(&[n; 32])
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    fn pair_keys() -> (Identity, Identity, MailboxKeys) {
        let (a, b) = (id(1), id(2));
        let keys = MailboxKeys::derive(&pair_secret(&a, &b.public()), &b.public(), 19_675);
        (a, b, keys)
    }

    #[test]
    fn both_sides_derive_the_same_mailbox_and_it_rotates() {
        let (a, b, keys) = pair_keys();
        let theirs = MailboxKeys::derive(&pair_secret(&b, &a.public()), &b.public(), 19_675);
        assert_eq!(keys.id(), theirs.id());
        assert_eq!(keys.public_key(), theirs.public_key());
        let tomorrow = MailboxKeys::derive(&pair_secret(&a, &b.public()), &b.public(), 19_676);
        assert_ne!(keys.id(), tomorrow.id());
        let other_way = MailboxKeys::derive(&pair_secret(&a, &b.public()), &a.public(), 19_675);
        assert_ne!(keys.id(), other_way.id());
        // The public id is neither the secret seed nor the first-contact mailbox.
        assert_ne!(
            keys.id(),
            mailbox_key(&pair_secret(&a, &b.public()), &b.public(), 19_675)
        );
        assert_ne!(keys.id(), first_contact_mailbox(&b.public()));
        assert_eq!(keys.id(), pair_mailbox_id(&keys.public_key()));
        assert!(key_opens(&keys.id(), &keys.public_key()));
    }

    #[test]
    fn first_contact_key_is_the_identity_key() {
        let b = id(2);
        let keys = MailboxKeys::first_contact(&b);
        assert_eq!(keys.public_key(), *b.public().as_bytes());
        assert_eq!(keys.id(), first_contact_mailbox(&b.public()));
        assert!(key_opens(&keys.id(), &keys.public_key()));
        assert!(!key_opens(&keys.id(), id(3).public().as_bytes()));
        let req = keys.fetch(None, NOW, &mut rng());
        assert_eq!(req.authorise(NOW), Ok(()));
    }

    #[test]
    fn signed_requests_verify_and_round_trip() {
        let (_, _, keys) = pair_keys();
        let mut r = rng();
        for req in [
            keys.fetch(None, NOW, &mut r),
            keys.fetch(Some([9; 32]), NOW, &mut r),
            keys.delete(vec![[1; 32], [2; 32]], NOW, &mut r),
            keys.subscribe(NOW, &mut r),
        ] {
            assert_eq!(req.authorise(NOW), Ok(()));
            assert_eq!(req.authorise(NOW + MAX_AUTH_AGE_SECS), Ok(()));
            let bytes = req.to_wire().expect("encodes");
            assert_eq!(MailboxRequest::from_wire(&bytes), Ok(req));
        }
    }

    #[test]
    fn expired_and_future_requests_are_refused() {
        let (_, _, keys) = pair_keys();
        let req = keys.fetch(None, NOW, &mut rng());
        assert_eq!(
            req.authorise(NOW + MAX_AUTH_AGE_SECS + 1),
            Err(MailboxReject::AuthExpired)
        );
        assert_eq!(
            req.authorise(NOW - MAX_CLOCK_SKEW_SECS - 1),
            Err(MailboxReject::AuthFromTheFuture)
        );
    }

    #[test]
    fn another_key_cannot_fetch_or_delete() {
        let (a, b, keys) = pair_keys();
        let mut r = rng();
        // Eve signs with her own identity for Bob's pair mailbox id.
        let eve = MailboxKeys::first_contact(&id(9));
        let MailboxRequest::Fetch { after, auth, .. } = eve.fetch(None, NOW, &mut r) else {
            unreachable!()
        };
        let forged = MailboxRequest::Fetch {
            mailbox: keys.id(),
            after,
            auth,
        };
        assert_eq!(forged.authorise(NOW), Err(MailboxReject::WrongKey));
        // Eve copies Bob's public key but cannot sign.
        let MailboxRequest::Delete { auth, .. } = eve.delete(vec![[1; 32]], NOW, &mut r) else {
            unreachable!()
        };
        let forged = MailboxRequest::Delete {
            mailbox: keys.id(),
            ids: vec![[1; 32]],
            auth: MailboxAuth {
                public_key: keys.public_key(),
                ..auth
            },
        };
        assert_eq!(forged.authorise(NOW), Err(MailboxReject::BadSignature));
        // Alice (the sender) could derive the key; but a first-contact key of Alice does not
        // open Bob's first-contact mailbox.
        let alice_fc = MailboxKeys::first_contact(&a);
        let MailboxRequest::Fetch { auth, .. } = alice_fc.fetch(None, NOW, &mut r) else {
            unreachable!()
        };
        let forged = MailboxRequest::Fetch {
            mailbox: first_contact_mailbox(&b.public()),
            after: None,
            auth,
        };
        assert_eq!(forged.authorise(NOW), Err(MailboxReject::WrongKey));
    }

    #[test]
    fn a_signature_covers_the_request_body() {
        let (_, _, keys) = pair_keys();
        let req = keys.delete(vec![[1; 32]], NOW, &mut rng());
        let MailboxRequest::Delete { mailbox, auth, .. } = req else {
            unreachable!()
        };
        // The same signature, other ids: refused.
        let changed = MailboxRequest::Delete {
            mailbox,
            ids: vec![[2; 32]],
            auth: auth.clone(),
        };
        assert_eq!(changed.authorise(NOW), Err(MailboxReject::BadSignature));
        // A DELETE signature replayed as a FETCH: refused (the op byte is signed).
        let as_fetch = MailboxRequest::Fetch {
            mailbox,
            after: None,
            auth,
        };
        assert_eq!(as_fetch.authorise(NOW), Err(MailboxReject::BadSignature));
    }

    #[test]
    fn too_many_delete_ids_are_malformed() {
        let (_, _, keys) = pair_keys();
        let req = keys.delete(vec![[0; 32]; MAX_DELETE_IDS + 1], NOW, &mut rng());
        assert_eq!(req.authorise(NOW), Err(MailboxReject::Malformed));
    }

    #[test]
    fn request_layout_is_stable() {
        // Fetch: version, tag u32 = 1, mailbox, option tag + after, auth.
        let auth = MailboxAuth {
            public_key: [3; 32],
            timestamp: 5,
            nonce: [4; 16],
            signature: [6; 64],
        };
        let req = MailboxRequest::Fetch {
            mailbox: [2; 32],
            after: None,
            auth,
        };
        let bytes = req.to_wire().expect("encodes");
        let mut expected = vec![1u8, 1, 0, 0, 0];
        expected.extend_from_slice(&[2; 32]);
        expected.push(0);
        expected.extend_from_slice(&[3; 32]);
        expected.extend_from_slice(&5u64.to_le_bytes());
        expected.extend_from_slice(&[4; 16]);
        expected.extend_from_slice(&[6; 64]);
        assert_eq!(bytes, expected);
        let resp = MailboxResponse::Deleted { count: 2 };
        assert_eq!(
            resp.to_wire().expect("encodes"),
            vec![1, 2, 0, 0, 0, 2, 0, 0, 0]
        );
    }

    #[test]
    fn rejections_are_classified() {
        assert!(MailboxReject::RateLimited.is_transient());
        assert!(MailboxReject::MailboxCountQuota.is_transient());
        assert!(!MailboxReject::BadSignature.is_transient());
        assert!(MailboxReject::BadSignature.is_hostile());
        assert!(!MailboxReject::EnvelopeExpired.is_hostile());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = MailboxRequest::from_wire(&bytes);
            let _ = MailboxResponse::from_wire(&bytes);
            if let Ok(req) = MailboxRequest::from_wire(&bytes) {
                let _ = req.authorise(NOW);
            }
        }

        #[test]
        fn requests_round_trip_and_forgeries_fail(
            seed in any::<[u8; 32]>(),
            ids in proptest::collection::vec(any::<[u8; 32]>(), 0..8),
            flip in 0usize..64,
        ) {
            let keys = MailboxKeys::first_contact(&Identity::from_seed(&seed));
            let req = keys.delete(ids.clone(), NOW, &mut rng());
            let bytes = req.to_wire().expect("encodes");
            prop_assert_eq!(MailboxRequest::from_wire(&bytes), Ok(req.clone()));
            prop_assert_eq!(req.authorise(NOW), Ok(()));
            let MailboxRequest::Delete { mailbox, auth, .. } = req else { unreachable!() };
            let mut sig = auth.signature;
            sig[flip] ^= 1;
            let forged = MailboxRequest::Delete { mailbox, ids, auth: MailboxAuth { signature: sig, ..auth } };
            prop_assert!(forged.authorise(NOW).is_err());
        }

        #[test]
        fn responses_round_trip(count in any::<u32>(), more in any::<bool>()) {
            for resp in [
                MailboxResponse::Deleted { count },
                MailboxResponse::Envelopes { envelopes: Vec::new(), more },
                MailboxResponse::Stored { envelope_id: [count as u8; 32], duplicate: more },
                MailboxResponse::Refused { reason: MailboxReject::DiskBudget },
            ] {
                let bytes = resp.to_wire().expect("encodes");
                prop_assert_eq!(MailboxResponse::from_wire(&bytes), Ok(resp));
            }
        }
    }
}
