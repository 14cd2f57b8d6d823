//! DHT records: prekey bundles and presence records, and the check every DHT node makes before
//! storing one. See `docs/protocol.md`, section "Addressing and DHT records".
//!
//! A record key is 33 bytes: a kind byte and 32 bytes.
//!
//! ```text
//! bundle:   0x01 || SHA-256("meshchat/bundle/v1" || identity)      value = wire(PrekeyBundle)
//! presence: 0x02 || SHA-256(derived presence public key)           value = wire(PresenceRecord)
//! ```
//!
//! A presence record tells a contact where the publisher's nodes can be dialled. Its signing key,
//! encryption key and DHT key are all derived from (pair secret, publisher, epoch), so a storing
//! node learns neither who published it nor for whom, yet can check that the writer holds the
//! derived signing key (the DHT key is the hash of the public key that signed the record). Its
//! plaintext ([`Presence`]) is padded to a multiple of [`PRESENCE_PAD`] bytes and encrypted with
//! XChaCha20-Poly1305 under a random 24-byte nonce.
//!
//! [`validate_record`] is what any DHT node runs on a PUT: typed key, bounded decode, signature,
//! key matches content, not expired, not valid for too long. It never panics.

use std::fmt;

use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    Key, XChaCha20Poly1305, XNonce,
};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{
    addressing::{PairSecret, EPOCH_SECS},
    identity::PublicIdentity,
    prekey::{BundleError, PrekeyBundle, MAX_BUNDLE_BYTES, MAX_CLOCK_SKEW_SECS},
    wire::{Wire, WireError},
};

/// The length of every record key: kind byte + 32 bytes.
pub const RECORD_KEY_LEN: usize = 33;
/// The hash prefix of a bundle record key.
pub const BUNDLE_KEY_DOMAIN: &[u8] = b"meshchat/bundle/v1";
/// The HKDF info prefix of the presence keys.
pub const PRESENCE_KDF_INFO: &[u8] = b"meshchat/presence/v1";
/// The signature domain of a presence record.
pub const PRESENCE_SIGNATURE_DOMAIN: &[u8] = b"presence";
/// The longest a presence record may stay valid: two epochs from `now`.
pub const MAX_PRESENCE_VALIDITY_SECS: u64 = 2 * EPOCH_SECS;
/// The most nodes (devices) a presence record lists.
pub const MAX_PRESENCE_PEERS: usize = 4;
/// The most addresses per node.
pub const MAX_ADDRS_PER_PEER: usize = 8;
/// The longest address (raw multiaddr bytes).
pub const MAX_ADDR_BYTES: usize = 128;
/// The longest peer id (raw libp2p `PeerId` bytes; an Ed25519 peer id is 38).
pub const MAX_PEER_ID_BYTES: usize = 64;
/// Largest wire encoding of a [`Presence`]: 1 + 8 + 4 × (8 + 64 + 8 + 8 × (8 + 128)) = 4,681
/// bytes, rounded up.
pub const MAX_PRESENCE_BYTES: usize = 4_800;
/// The presence plaintext is padded to a multiple of this.
pub const PRESENCE_PAD: usize = 512;
/// The largest padded presence plaintext.
pub const MAX_PRESENCE_PADDED: usize = 5_120;
/// Largest presence ciphertext: the padded plaintext and the 16-byte tag.
pub const MAX_PRESENCE_CIPHERTEXT: usize = MAX_PRESENCE_PADDED + 16;
/// Largest wire encoding of a [`PresenceRecord`]: 1 + 32 + 8 + 8 + 24 + 8 + 5,136 + 64.
pub const MAX_PRESENCE_RECORD_BYTES: usize = 1 + 32 + 8 + 8 + 24 + 8 + MAX_PRESENCE_CIPHERTEXT + 64;
/// The largest record value any kind allows (a DHT node may reject larger values unread).
pub const MAX_RECORD_VALUE_BYTES: usize = if MAX_BUNDLE_BYTES > MAX_PRESENCE_RECORD_BYTES {
    MAX_BUNDLE_BYTES
} else {
    MAX_PRESENCE_RECORD_BYTES
};

/// The kind of a DHT record (the first byte of its key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordKind {
    /// A prekey bundle (0x01).
    Bundle,
    /// A presence record (0x02).
    Presence,
}

impl RecordKind {
    /// The key's kind byte.
    pub fn byte(self) -> u8 {
        match self {
            Self::Bundle => 0x01,
            Self::Presence => 0x02,
        }
    }

    /// The kind of a kind byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0x01 => Some(Self::Bundle),
            0x02 => Some(Self::Presence),
            _ => None,
        }
    }
}

/// Why a record was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The key is not [`RECORD_KEY_LEN`] bytes.
    #[error("record key of {len} bytes, expected {RECORD_KEY_LEN}")]
    BadKeyLength {
        /// Its length.
        len: usize,
    },
    /// The key's kind byte is unknown.
    #[error("unknown record kind 0x{kind:02x}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// The value does not decode (too large, malformed…).
    #[error("record value: {0}")]
    Wire(#[from] WireError),
    /// The bundle inside does not verify.
    #[error("bundle record: {0}")]
    Bundle(#[from] BundleError),
    /// The key is not the one derived from the value's content.
    #[error("{kind:?} record stored under a key that does not match its content")]
    KeyMismatch {
        /// The record's kind.
        kind: RecordKind,
    },
    /// The presence record's public key is not a usable Ed25519 key.
    #[error("presence record: bad public key")]
    BadPublicKey,
    /// The presence record's signature does not verify.
    #[error("presence record: signature does not verify")]
    BadSignature,
    /// The record has expired.
    #[error("record expired at {expires_at} (now {now})")]
    Expired {
        /// Its expiry.
        expires_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// The record claims validity further ahead than [`MAX_PRESENCE_VALIDITY_SECS`].
    #[error("record valid until {expires_at}, too far ahead of now ({now})")]
    ExpiryTooFar {
        /// Its expiry.
        expires_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// The presence ciphertext is not a padded length.
    #[error("presence ciphertext of {len} bytes is not a padded length")]
    BadCiphertextLength {
        /// Its length.
        len: usize,
    },
    /// The record was signed by another key than the reader derived: not the record looked for.
    #[error("presence record belongs to another key")]
    NotOurRecord,
    /// Decryption failed.
    #[error("presence record cannot be decrypted")]
    Undecryptable,
    /// The padding inside is malformed.
    #[error("presence record padding is malformed")]
    BadPadding,
    /// The presence content breaks a limit.
    #[error("presence: {what} ({found}, limit {limit})")]
    PresenceLimit {
        /// Which limit.
        what: &'static str,
        /// The value found.
        found: usize,
        /// The limit.
        limit: usize,
    },
}

/// What [`validate_record`] accepted: enough for a DHT node to refuse a rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidRecord {
    /// The record's kind.
    pub kind: RecordKind,
    /// The bundle's version or the presence record's sequence number: a node holding a record
    /// under the same key with a higher number keeps that one.
    pub version_or_seq: u64,
    /// When it expires (unix seconds): a node drops it then.
    pub expires_at: u64,
}

/// The DHT key of `identity`'s prekey bundle:
/// `0x01 || SHA-256("meshchat/bundle/v1" || identity)`.
pub fn bundle_record_key(identity: &PublicIdentity) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(BUNDLE_KEY_DOMAIN);
    h.update(identity.as_bytes());
    let mut key = Vec::with_capacity(RECORD_KEY_LEN);
    key.push(RecordKind::Bundle.byte());
    key.extend_from_slice(&h.finalize());
    key
}

/// The DHT key of a presence record signed by `public_key`: `0x02 || SHA-256(public_key)`.
pub fn presence_record_key(public_key: &[u8; 32]) -> Vec<u8> {
    let mut key = Vec::with_capacity(RECORD_KEY_LEN);
    key.push(RecordKind::Presence.byte());
    key.extend_from_slice(&Sha256::digest(public_key));
    key
}

/// One node (device) of the publisher: its libp2p peer id and addresses, as raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresencePeer {
    /// The raw `PeerId` bytes (at most [`MAX_PEER_ID_BYTES`]).
    pub peer_id: Vec<u8>,
    /// Raw multiaddr bytes (at most [`MAX_ADDRS_PER_PEER`], each at most [`MAX_ADDR_BYTES`]).
    pub addrs: Vec<Vec<u8>>,
}

/// The plaintext of a presence record: where the publisher can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The publisher's nodes, at most [`MAX_PRESENCE_PEERS`].
    pub peers: Vec<PresencePeer>,
}

crate::impl_wire!(Presence, MAX_PRESENCE_BYTES);

impl Presence {
    /// Check the limits.
    pub fn validate(&self) -> Result<(), RecordError> {
        let limit = |what, found, limit| {
            if found > limit {
                Err(RecordError::PresenceLimit { what, found, limit })
            } else {
                Ok(())
            }
        };
        limit("peers", self.peers.len(), MAX_PRESENCE_PEERS)?;
        for p in &self.peers {
            limit("peer id bytes", p.peer_id.len(), MAX_PEER_ID_BYTES)?;
            limit("addresses per peer", p.addrs.len(), MAX_ADDRS_PER_PEER)?;
            for a in &p.addrs {
                limit("address bytes", a.len(), MAX_ADDR_BYTES)?;
            }
        }
        Ok(())
    }
}

/// A presence record as stored in the DHT (wire type).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    /// The derived Ed25519 public key that signed it.
    pub public_key: [u8; 32],
    /// Increases with every publication under this key.
    pub seq: u64,
    /// When it stops being valid (unix seconds).
    pub expires_at: u64,
    /// The XChaCha20-Poly1305 nonce (random).
    pub nonce: [u8; 24],
    /// The encrypted, padded [`Presence`].
    pub ciphertext: Vec<u8>,
    /// Ed25519 signature by `public_key`, domain `"presence"`, over [`PresenceRecord::signed_bytes`].
    #[serde(with = "serde_big_array::BigArray")]
    pub signature: [u8; 64],
}

crate::impl_wire!(PresenceRecord, MAX_PRESENCE_RECORD_BYTES);

impl fmt::Debug for PresenceRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresenceRecord")
            .field("seq", &self.seq)
            .field("expires_at", &self.expires_at)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

impl PresenceRecord {
    /// The associated data of the encryption: `public_key || u64_le(seq) || u64_le(expires_at)`.
    fn associated_data(&self) -> Vec<u8> {
        let mut ad = Vec::with_capacity(48);
        ad.extend_from_slice(&self.public_key);
        ad.extend_from_slice(&self.seq.to_le_bytes());
        ad.extend_from_slice(&self.expires_at.to_le_bytes());
        ad
    }

    /// What the signature covers, before the domain prefix:
    /// `public_key || u64_le(seq) || u64_le(expires_at) || nonce || ciphertext`.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut m = self.associated_data();
        m.extend_from_slice(&self.nonce);
        m.extend_from_slice(&self.ciphertext);
        m
    }

    /// The record's DHT key: `0x02 || SHA-256(public_key)`.
    pub fn key(&self) -> Vec<u8> {
        presence_record_key(&self.public_key)
    }

    /// The checks anyone can make: ciphertext length, validity window at `now`, signature.
    pub fn verify(&self, now: u64) -> Result<(), RecordError> {
        let len = self.ciphertext.len();
        if len < 16 + PRESENCE_PAD
            || !(len - 16).is_multiple_of(PRESENCE_PAD)
            || len > MAX_PRESENCE_CIPHERTEXT
        {
            return Err(RecordError::BadCiphertextLength { len });
        }
        if now >= self.expires_at {
            return Err(RecordError::Expired {
                expires_at: self.expires_at,
                now,
            });
        }
        if self.expires_at
            > now
                .saturating_add(MAX_PRESENCE_VALIDITY_SECS)
                .saturating_add(MAX_CLOCK_SKEW_SECS)
        {
            return Err(RecordError::ExpiryTooFar {
                expires_at: self.expires_at,
                now,
            });
        }
        let key =
            VerifyingKey::from_bytes(&self.public_key).map_err(|_| RecordError::BadPublicKey)?;
        if key.is_weak() {
            return Err(RecordError::BadPublicKey);
        }
        key.verify_strict(
            &presence_signed_message(&self.signed_bytes()),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| RecordError::BadSignature)
    }
}

/// `"meshchat/presence" || 0x00 || msg`, the same framing as identity signatures.
fn presence_signed_message(msg: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(msg.len() + 18);
    m.extend_from_slice(b"meshchat/");
    m.extend_from_slice(PRESENCE_SIGNATURE_DOMAIN);
    m.push(0);
    m.extend_from_slice(msg);
    m
}

/// The keys of one publisher's presence for one pair and epoch. Both contacts derive the same
/// keys: the publisher to write, the other to find and read.
#[derive(Clone)]
pub struct PresenceKeys {
    signing: SigningKey,
    encryption: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for PresenceKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresenceKeys")
            .field(
                "public_key",
                &format_args!("{:02x?}", &self.public_key()[..8]),
            )
            .finish_non_exhaustive()
    }
}

impl PresenceKeys {
    /// Derive the keys: `okm = HKDF-Expand(PRK = pair, info = "meshchat/presence/v1" ||
    /// publisher || u64_le(epoch), 64)`; the Ed25519 seed is `okm[0..32]`, the XChaCha20-Poly1305
    /// key `okm[32..64]`.
    pub fn derive(pair: &PairSecret, publisher: &PublicIdentity, epoch: u64) -> Self {
        let mut okm = Zeroizing::new([0u8; 64]);
        pair.expand(
            &[
                PRESENCE_KDF_INFO,
                publisher.as_bytes(),
                &epoch.to_le_bytes(),
            ],
            okm.as_mut(),
        );
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&okm[..32]);
        let mut encryption = Zeroizing::new([0u8; 32]);
        encryption.copy_from_slice(&okm[32..]);
        Self {
            signing: SigningKey::from_bytes(&seed),
            encryption,
        }
    }

    /// The derived Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The DHT key the record lives under: `0x02 || SHA-256(public_key)`.
    pub fn dht_key(&self) -> Vec<u8> {
        presence_record_key(&self.public_key())
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(Key::from_slice(self.encryption.as_ref()))
    }

    /// Encrypt and sign `presence` (the publisher's side).
    pub fn seal<R: CryptoRngCore + ?Sized>(
        &self,
        presence: &Presence,
        seq: u64,
        expires_at: u64,
        rng: &mut R,
    ) -> Result<PresenceRecord, RecordError> {
        presence.validate()?;
        let body = presence.to_wire()?;
        let padded_len = (4 + body.len()).div_ceil(PRESENCE_PAD) * PRESENCE_PAD;
        let mut padded = Zeroizing::new(Vec::with_capacity(padded_len + 16));
        let body_len = u32::try_from(body.len()).expect("invariant: presence is below 5 KiB");
        padded.extend_from_slice(&body_len.to_le_bytes());
        padded.extend_from_slice(&body);
        padded.resize(padded_len, 0);
        let mut record = PresenceRecord {
            public_key: self.public_key(),
            seq,
            expires_at,
            nonce: [0; 24],
            ciphertext: Vec::new(),
            signature: [0; 64],
        };
        rng.fill_bytes(&mut record.nonce);
        record.ciphertext = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&record.nonce),
                Payload {
                    msg: &padded,
                    aad: &record.associated_data(),
                },
            )
            .map_err(|_| RecordError::Undecryptable)?;
        record.signature = self
            .signing
            .sign(&presence_signed_message(&record.signed_bytes()))
            .to_bytes();
        Ok(record)
    }

    /// Verify and decrypt a record found under [`PresenceKeys::dht_key`] (the reader's side).
    pub fn open(&self, record: &PresenceRecord, now: u64) -> Result<Presence, RecordError> {
        if record.public_key != self.public_key() {
            return Err(RecordError::NotOurRecord);
        }
        record.verify(now)?;
        let padded = Zeroizing::new(
            self.cipher()
                .decrypt(
                    XNonce::from_slice(&record.nonce),
                    Payload {
                        msg: &record.ciphertext,
                        aad: &record.associated_data(),
                    },
                )
                .map_err(|_| RecordError::Undecryptable)?,
        );
        let (prefix, rest) = padded.split_at_checked(4).ok_or(RecordError::BadPadding)?;
        let len = u32::from_le_bytes(prefix.try_into().map_err(|_| RecordError::BadPadding)?);
        let len = usize::try_from(len).map_err(|_| RecordError::BadPadding)?;
        let (body, padding) = rest.split_at_checked(len).ok_or(RecordError::BadPadding)?;
        if padding.iter().any(|b| *b != 0) {
            return Err(RecordError::BadPadding);
        }
        let presence = Presence::from_wire(body)?;
        presence.validate()?;
        Ok(presence)
    }
}

/// What any DHT node checks before storing `value` under `key` at time `now`. Never panics;
/// decodes at most [`MAX_RECORD_VALUE_BYTES`].
pub fn validate_record(key: &[u8], value: &[u8], now: u64) -> Result<ValidRecord, RecordError> {
    if key.len() != RECORD_KEY_LEN {
        return Err(RecordError::BadKeyLength { len: key.len() });
    }
    let kind = RecordKind::from_byte(key[0]).ok_or(RecordError::UnknownKind { kind: key[0] })?;
    match kind {
        RecordKind::Bundle => {
            let bundle = PrekeyBundle::from_wire(value)?;
            if bundle_record_key(&bundle.identity) != key {
                return Err(RecordError::KeyMismatch { kind });
            }
            let verified = bundle.verify(now)?;
            Ok(ValidRecord {
                kind,
                version_or_seq: verified.version(),
                expires_at: verified.expires_at(),
            })
        }
        RecordKind::Presence => {
            let record = PresenceRecord::from_wire(value)?;
            if record.key() != key {
                return Err(RecordError::KeyMismatch { kind });
            }
            record.verify(now)?;
            Ok(ValidRecord {
                kind,
                version_or_seq: record.seq,
                expires_at: record.expires_at,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        addressing::{epoch, pair_secret},
        identity::Identity,
        prekey::PrekeySecrets,
    };
    use proptest::prelude::*;
    use rand_core::OsRng;

    const NOW: u64 = 1_700_000_000;

    fn id(n: u8) -> Identity {
        Identity::from_seed(&[n; 32])
    }

    fn presence() -> Presence {
        Presence {
            peers: vec![PresencePeer {
                peer_id: vec![0, 36, 8, 1, 18, 32, 1, 2, 3],
                addrs: vec![vec![4, 127, 0, 0, 1, 6, 0x1f, 0x90]],
            }],
        }
    }

    fn keys() -> (PresenceKeys, PresenceKeys) {
        let (a, b) = (id(1), id(2));
        let e = epoch(NOW);
        let publisher = PresenceKeys::derive(&pair_secret(&a, &b.public()), &a.public(), e);
        let reader = PresenceKeys::derive(&pair_secret(&b, &a.public()), &a.public(), e);
        (publisher, reader)
    }

    #[test]
    fn both_contacts_derive_the_same_presence_keys_and_no_one_else_does() {
        let (publisher, reader) = keys();
        assert_eq!(publisher.public_key(), reader.public_key());
        assert_eq!(publisher.dht_key(), reader.dht_key());
        assert_eq!(publisher.dht_key().len(), RECORD_KEY_LEN);
        assert_eq!(publisher.dht_key()[0], 0x02);
        let (a, b, c) = (id(1), id(2), id(3));
        let e = epoch(NOW);
        let pair = pair_secret(&a, &b.public());
        // Other epoch, other direction, other pair: other keys.
        assert_ne!(
            PresenceKeys::derive(&pair, &a.public(), e + 1).dht_key(),
            publisher.dht_key()
        );
        assert_ne!(
            PresenceKeys::derive(&pair, &b.public(), e).dht_key(),
            publisher.dht_key()
        );
        assert_ne!(
            PresenceKeys::derive(&pair_secret(&a, &c.public()), &a.public(), e).dht_key(),
            publisher.dht_key()
        );
        // The DHT key reveals nothing derivable from the identity.
        assert_ne!(publisher.dht_key(), bundle_record_key(&a.public()));
    }

    #[test]
    fn presence_round_trips_and_validates() {
        let (publisher, reader) = keys();
        let rec = publisher
            .seal(&presence(), 7, NOW + 3600, &mut OsRng)
            .expect("seals");
        let bytes = rec.to_wire().expect("encodes");
        let v = validate_record(&publisher.dht_key(), &bytes, NOW).expect("valid");
        assert_eq!(
            v,
            ValidRecord {
                kind: RecordKind::Presence,
                version_or_seq: 7,
                expires_at: NOW + 3600
            }
        );
        let back = PresenceRecord::from_wire(&bytes).expect("decodes");
        assert_eq!(reader.open(&back, NOW).expect("opens"), presence());
        assert_eq!(rec.ciphertext.len(), PRESENCE_PAD + 16);
    }

    #[test]
    fn the_largest_presence_fits_its_limits() {
        let peer = PresencePeer {
            peer_id: vec![1; MAX_PEER_ID_BYTES],
            addrs: vec![vec![2; MAX_ADDR_BYTES]; MAX_ADDRS_PER_PEER],
        };
        let big = Presence {
            peers: vec![peer; MAX_PRESENCE_PEERS],
        };
        assert!(big.to_wire().expect("fits").len() <= MAX_PRESENCE_BYTES);
        let (publisher, reader) = keys();
        let rec = publisher
            .seal(&big, 1, NOW + 60, &mut OsRng)
            .expect("seals");
        assert!(rec.ciphertext.len() <= MAX_PRESENCE_CIPHERTEXT);
        let bytes = rec.to_wire().expect("fits");
        assert!(bytes.len() <= MAX_PRESENCE_RECORD_BYTES);
        assert!(validate_record(&rec.key(), &bytes, NOW).is_ok());
        assert_eq!(reader.open(&rec, NOW).expect("opens"), big);
    }

    #[test]
    fn presence_over_its_limits_is_refused() {
        let (publisher, _) = keys();
        let mut p = presence();
        p.peers = vec![p.peers[0].clone(); MAX_PRESENCE_PEERS + 1];
        assert!(matches!(
            publisher.seal(&p, 1, NOW + 60, &mut OsRng),
            Err(RecordError::PresenceLimit { what: "peers", .. })
        ));
        let mut p = presence();
        p.peers[0].addrs = vec![vec![0; MAX_ADDR_BYTES + 1]];
        assert!(matches!(
            p.validate(),
            Err(RecordError::PresenceLimit {
                what: "address bytes",
                ..
            })
        ));
        let mut p = presence();
        p.peers[0].addrs = vec![vec![0; 4]; MAX_ADDRS_PER_PEER + 1];
        assert!(matches!(
            p.validate(),
            Err(RecordError::PresenceLimit {
                what: "addresses per peer",
                ..
            })
        ));
        let mut p = presence();
        p.peers[0].peer_id = vec![0; MAX_PEER_ID_BYTES + 1];
        assert!(matches!(
            p.validate(),
            Err(RecordError::PresenceLimit {
                what: "peer id bytes",
                ..
            })
        ));
    }

    #[test]
    fn a_forged_or_misplaced_presence_record_is_rejected() {
        let (publisher, _) = keys();
        let rec = publisher
            .seal(&presence(), 7, NOW + 3600, &mut OsRng)
            .expect("seals");
        // Tampered ciphertext: bad signature.
        let mut t = rec.clone();
        t.ciphertext[0] ^= 1;
        let bytes = t.to_wire().expect("encodes");
        assert_eq!(
            validate_record(&rec.key(), &bytes, NOW),
            Err(RecordError::BadSignature)
        );
        // A higher seq without the key: bad signature.
        let mut t = rec.clone();
        t.seq += 1;
        assert_eq!(t.verify(NOW), Err(RecordError::BadSignature));
        // Someone's own valid record placed under another key.
        let (other, _) = {
            let e = epoch(NOW);
            let pair = pair_secret(&id(3), &id(4).public());
            (PresenceKeys::derive(&pair, &id(3).public(), e), ())
        };
        let theirs = other
            .seal(&presence(), 99, NOW + 3600, &mut OsRng)
            .expect("seals");
        let bytes = theirs.to_wire().expect("encodes");
        assert_eq!(
            validate_record(&publisher.dht_key(), &bytes, NOW),
            Err(RecordError::KeyMismatch {
                kind: RecordKind::Presence
            })
        );
        // The reader opening someone else's record.
        assert_eq!(keys().1.open(&theirs, NOW), Err(RecordError::NotOurRecord));
        // A small-order public key.
        let mut t = rec.clone();
        t.public_key = [0; 32];
        t.public_key[0] = 1;
        assert_eq!(t.verify(NOW), Err(RecordError::BadPublicKey));
    }

    #[test]
    fn presence_times_are_enforced() {
        let (publisher, _) = keys();
        let rec = publisher
            .seal(&presence(), 1, NOW + 60, &mut OsRng)
            .expect("seals");
        let bytes = rec.to_wire().expect("encodes");
        assert_eq!(
            validate_record(&rec.key(), &bytes, NOW + 60),
            Err(RecordError::Expired {
                expires_at: NOW + 60,
                now: NOW + 60
            })
        );
        let far = NOW + MAX_PRESENCE_VALIDITY_SECS + MAX_CLOCK_SKEW_SECS + 1;
        let rec = publisher
            .seal(&presence(), 1, far, &mut OsRng)
            .expect("seals");
        assert_eq!(
            rec.verify(NOW),
            Err(RecordError::ExpiryTooFar {
                expires_at: far,
                now: NOW
            })
        );
        assert!(rec.verify(NOW + 2).is_ok());
    }

    #[test]
    fn presence_ciphertext_must_be_padded_and_decryptable() {
        let (publisher, reader) = keys();
        let rec = publisher
            .seal(&presence(), 1, NOW + 60, &mut OsRng)
            .expect("seals");
        let mut t = rec.clone();
        t.ciphertext.push(0);
        assert_eq!(
            t.verify(NOW),
            Err(RecordError::BadCiphertextLength {
                len: PRESENCE_PAD + 17
            })
        );
        // Correctly signed (by the derived key) but encrypted under another key.
        let mut t = rec.clone();
        t.ciphertext = vec![0; PRESENCE_PAD + 16];
        t.signature = publisher
            .signing
            .sign(&presence_signed_message(&t.signed_bytes()))
            .to_bytes();
        assert!(t.verify(NOW).is_ok());
        assert_eq!(reader.open(&t, NOW), Err(RecordError::Undecryptable));
    }

    fn seal_raw(keys: &PresenceKeys, padded: &[u8]) -> PresenceRecord {
        let mut r = PresenceRecord {
            public_key: keys.public_key(),
            seq: 1,
            expires_at: NOW + 60,
            nonce: [3; 24],
            ciphertext: Vec::new(),
            signature: [0; 64],
        };
        r.ciphertext = keys
            .cipher()
            .encrypt(
                XNonce::from_slice(&r.nonce),
                Payload {
                    msg: padded,
                    aad: &r.associated_data(),
                },
            )
            .expect("encrypts");
        r.signature = keys
            .signing
            .sign(&presence_signed_message(&r.signed_bytes()))
            .to_bytes();
        r
    }

    #[test]
    fn bad_presence_padding_is_rejected() {
        let (publisher, reader) = keys();
        let body = presence().to_wire().expect("encodes");
        let mut padded = (body.len() as u32).to_le_bytes().to_vec();
        padded.extend_from_slice(&body);
        padded.resize(PRESENCE_PAD, 0);
        padded[PRESENCE_PAD - 1] = 1;
        assert_eq!(
            reader.open(&seal_raw(&publisher, &padded), NOW),
            Err(RecordError::BadPadding)
        );
        let mut padded = 9999u32.to_le_bytes().to_vec();
        padded.resize(PRESENCE_PAD, 0);
        assert_eq!(
            reader.open(&seal_raw(&publisher, &padded), NOW),
            Err(RecordError::BadPadding)
        );
        let mut padded = 3u32.to_le_bytes().to_vec();
        padded.extend_from_slice(&[1, 0, 0]);
        padded.resize(PRESENCE_PAD, 0);
        assert!(matches!(
            reader.open(&seal_raw(&publisher, &padded), NOW),
            Err(RecordError::Wire(_))
        ));
    }

    #[test]
    fn bundle_records_validate_against_their_identity() {
        let a = id(1);
        let (_, bundle) = PrekeySecrets::generate(&a, NOW, &mut OsRng);
        let bytes = bundle.to_wire().expect("encodes");
        let key = bundle_record_key(&a.public());
        assert_eq!(key.len(), RECORD_KEY_LEN);
        assert_eq!(key[0], 0x01);
        let v = validate_record(&key, &bytes, NOW).expect("valid");
        assert_eq!(v.kind, RecordKind::Bundle);
        assert_eq!(v.version_or_seq, bundle.version);
        assert_eq!(v.expires_at, bundle.expires_at);
        // Under someone else's key.
        assert_eq!(
            validate_record(&bundle_record_key(&id(2).public()), &bytes, NOW),
            Err(RecordError::KeyMismatch {
                kind: RecordKind::Bundle
            })
        );
        // Expired, forged.
        assert!(matches!(
            validate_record(&key, &bytes, bundle.expires_at),
            Err(RecordError::Bundle(BundleError::Expired { .. }))
        ));
        let mut t = bundle.clone();
        t.version += 1;
        assert!(matches!(
            validate_record(&key, &t.to_wire().expect("encodes"), NOW),
            Err(RecordError::Bundle(BundleError::BadSignature { .. }))
        ));
        // A presence record under a bundle key is a bundle that does not decode.
        assert!(matches!(
            validate_record(&key, &[1, 2, 3], NOW),
            Err(RecordError::Wire(_))
        ));
    }

    #[test]
    fn bad_keys_and_oversized_values_are_rejected() {
        assert_eq!(
            validate_record(&[1; 32], &[], NOW),
            Err(RecordError::BadKeyLength { len: 32 })
        );
        assert_eq!(
            validate_record(&[], &[], NOW),
            Err(RecordError::BadKeyLength { len: 0 })
        );
        let mut key = vec![9u8];
        key.extend_from_slice(&[0; 32]);
        assert_eq!(
            validate_record(&key, &[], NOW),
            Err(RecordError::UnknownKind { kind: 9 })
        );
        key[0] = 0x01;
        assert!(matches!(
            validate_record(&key, &vec![1; MAX_BUNDLE_BYTES + 1], NOW),
            Err(RecordError::Wire(WireError::TooLarge { .. }))
        ));
        key[0] = 0x02;
        assert!(matches!(
            validate_record(&key, &vec![1; MAX_PRESENCE_RECORD_BYTES + 1], NOW),
            Err(RecordError::Wire(WireError::TooLarge { .. }))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_records_never_panic(kind in 0u8..4, rest in any::<[u8; 32]>(), value in proptest::collection::vec(any::<u8>(), 0..7000)) {
            let mut key = vec![kind];
            key.extend_from_slice(&rest);
            let _ = validate_record(&key, &value, NOW);
            let _ = Presence::from_wire(&value);
            let _ = PresenceRecord::from_wire(&value);
        }

        #[test]
        fn presence_records_round_trip(seq in any::<u64>(), n in 0usize..=MAX_PRESENCE_PEERS, addr in proptest::collection::vec(any::<u8>(), 0..MAX_ADDR_BYTES)) {
            let (publisher, reader) = keys();
            let p = Presence { peers: vec![PresencePeer { peer_id: vec![7; 38], addrs: vec![addr; 2] }; n] };
            let rec = publisher.seal(&p, seq, NOW + 100, &mut OsRng).expect("seals");
            let bytes = rec.to_wire().expect("encodes");
            prop_assert_eq!(validate_record(&rec.key(), &bytes, NOW).map(|v| v.version_or_seq), Ok(seq));
            let back = PresenceRecord::from_wire(&bytes).expect("decodes");
            prop_assert_eq!(reader.open(&back, NOW).expect("opens"), p.clone());
            prop_assert_eq!(Presence::from_wire(&p.to_wire().expect("encodes")).expect("decodes"), p);
        }
    }
}
