//! Sealed envelopes: what crosses the network and sits in mailboxes. See `docs/protocol.md`,
//! section "Sealed envelope".
//!
//! Outside, an [`Envelope`] shows only a wire version, a 32-byte routing key (a mailbox key or a
//! recipient key), a timestamp and TTL, a fresh ephemeral X25519 key and a ciphertext whose length
//! is one of five fixed sizes. The buckets count payload bytes: every payload of up to 256 bytes
//! gives the same envelope length, every payload of 257 to 1,024 bytes the next one, and so on;
//! the fixed overhead of the sealed structure (141 bytes) comes on top. Who sent it, the sender's signature and the real payload size are
//! inside the ciphertext (a construction like Signal's sealed sender):
//!
//! ```text
//! e            = fresh X25519 key pair (one per envelope)
//! k            = HKDF-SHA256(salt = e_pub || R_x25519_pub, ikm = DH(e, R_x25519), info = "meshchat/envelope/v1", 32)
//! signature    = Sign_sender("envelope", R || e_pub || routing_key || timestamp || ttl || payload)
//! inner        = wire(SealedInner { recipient: R, sender, payload, signature })
//! B            = the smallest bucket of 256 B, 1 KiB, 4 KiB, 16 KiB, 64 KiB with len(payload) <= B
//! padded       = u32_le(len(inner)) || inner || zeros, exactly B + 141 bytes long
//! ciphertext   = ChaCha20-Poly1305(k, nonce = 0^12, aad = 0x01 || routing_key || timestamp || ttl || e_pub, padded)
//! ```
//!
//! The key `k` is used for exactly one encryption (it depends on a fresh `e`), so the zero nonce is
//! safe. The signature binds the sender to this recipient, this ephemeral key and these visible
//! fields, so a recipient cannot re-seal a signed message to someone else (the new recipient sees
//! [`EnvelopeError::WrongRecipient`]) and a mailbox node cannot extend the TTL.
//! [`open`] checks, in order: TTL limit and bucket length, the time window, decryption, padding,
//! the inner encoding, the recipient, and the signature; each failure has its own
//! [`EnvelopeError`] variant.
//!
//! # Pair envelopes
//!
//! Once two partners share a session and the recipient has written back, the sender routes its
//! messages by the recipient's pair mailbox (`crate::addressing`) and seals them with
//! [`seal_pair`] instead: the same wire type, shape and bucket sizes, but keyed by the pair
//! secret, so sealing and opening cost two HKDF and one AEAD pass instead of two Diffie-Hellman
//! agreements, a signature and its verification (about 240 µs of the 255 µs a message cost):
//!
//! ```text
//! K          = HKDF-Expand(PRK = pair secret, info = "meshchat/pair-envelope-key/v1" || R || u64_le(epoch(timestamp)), 32)
//! nonce      = 32 random bytes, top bit cleared      (sent in the `ephemeral` field)
//! k          = HKDF-SHA256(salt = nonce, ikm = K, info = "meshchat/pair-envelope/v1", 32)
//! padded     = u32_le(len(payload)) || payload || zeros, exactly B + 141 bytes long
//! ciphertext = ChaCha20-Poly1305(k, nonce = 0^12, aad = 0x01 || routing_key || timestamp || ttl || nonce, padded)
//! ```
//!
//! The recipient recognises the routing key as the pair mailbox of one of its partners for the
//! epoch of the timestamp, derives `K` and opens it with [`open_pair`]; success authenticates
//! that partner, and the Double Ratchet message inside is authenticated again by the session.
//! There is no signature, so neither partner can prove to a third party who wrote it.

use std::fmt;

use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    ChaCha20Poly1305, Key, Nonce,
};
use hkdf::Hkdf;
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{
    identity::{Identity, PublicIdentity},
    wire::{Wire, WireError, WIRE_VERSION},
};

use crate::prekey::hex_prefix;
pub use crate::prekey::MAX_CLOCK_SKEW_SECS;

/// The payload buckets. A payload of `n` bytes is padded as if it were `B` bytes long, `B` the
/// smallest bucket with `n <= B`: the padded plaintext is `B + PAD_OVERHEAD` bytes and the
/// ciphertext 16 bytes (the Poly1305 tag) more.
pub const BUCKETS: [usize; 5] = [256, 1024, 4096, 16_384, 65_536];
/// The Poly1305 tag length.
pub const TAG_BYTES: usize = 16;
/// Bytes the inner encoding adds to a payload: version (1), recipient (32), sender (32), payload
/// length (8), signature (64).
pub const INNER_OVERHEAD: usize = 1 + 32 + 32 + 8 + 64;
/// The length prefix in front of the inner encoding.
pub const PAD_PREFIX_BYTES: usize = 4;
/// What padding adds to the bucket: the length prefix and the inner overhead, 141 bytes.
pub const PAD_OVERHEAD: usize = PAD_PREFIX_BYTES + INNER_OVERHEAD;
/// The largest payload an envelope can carry: 64 KiB.
pub const MAX_PAYLOAD_BYTES: usize = BUCKETS[4];
/// Bytes of an envelope's wire encoding before the ciphertext: version (1), routing key (32),
/// timestamp (8), TTL (4), ephemeral key (32), ciphertext length (8).
pub const ENVELOPE_HEADER_BYTES: usize = 1 + 32 + 8 + 4 + 32 + 8;
/// The largest envelope: 85 + 65,536 + 141 + 16 = 65,778 bytes.
pub const MAX_ENVELOPE_BYTES: usize = ENVELOPE_HEADER_BYTES + BUCKETS[4] + PAD_OVERHEAD + TAG_BYTES;

/// The ciphertext length of an envelope whose payload fell in `bucket`.
pub const fn ciphertext_len(bucket: usize) -> usize {
    bucket + PAD_OVERHEAD + TAG_BYTES
}
/// The longest TTL an envelope may carry: 30 days.
pub const MAX_TTL_SECS: u32 = 30 * 86_400;
/// The TTL used when the user does not choose one: 14 days.
pub const DEFAULT_TTL_SECS: u32 = 14 * 86_400;
/// The signature domain of the sender's signature.
pub const ENVELOPE_SIGNATURE_DOMAIN: &[u8] = b"envelope";
/// The HKDF info of the envelope key.
pub const ENVELOPE_KDF_INFO: &[u8] = b"meshchat/envelope/v1";
/// Largest wire encoding of the inner structure.
const MAX_INNER_BYTES: usize = BUCKETS[4] + INNER_OVERHEAD;

/// Why an envelope could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// `now` is at or after `timestamp + ttl`.
    #[error("envelope expired at {expired_at} (now {now})")]
    Expired {
        /// `timestamp + ttl`.
        expired_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// The timestamp lies more than [`MAX_CLOCK_SKEW_SECS`] after `now`.
    #[error("envelope timestamp {timestamp} is in the future (now {now})")]
    FromTheFuture {
        /// The stated timestamp.
        timestamp: u64,
        /// The time of the check.
        now: u64,
    },
    /// The TTL exceeds [`MAX_TTL_SECS`].
    #[error("envelope TTL {ttl} s exceeds the limit of {MAX_TTL_SECS} s")]
    TtlTooLong {
        /// The stated TTL.
        ttl: u32,
    },
    /// The ciphertext length is not [`ciphertext_len`] of one of the [`BUCKETS`].
    #[error("envelope ciphertext of {len} bytes is not a padding bucket")]
    NotABucket {
        /// The ciphertext length.
        len: usize,
    },
    /// Decryption failed: the envelope is not for this identity, or it was tampered with.
    #[error("envelope cannot be decrypted (not for us, or tampered with)")]
    Undecryptable,
    /// The padding inside is malformed (length prefix too large or non-zero padding bytes).
    #[error("envelope padding is malformed")]
    BadPadding,
    /// The inner structure names another recipient: a signed message re-sealed to us.
    #[error("envelope was signed for key {}, not for us", hex_prefix(.intended))]
    WrongRecipient {
        /// The recipient the sender signed for (Ed25519 public key).
        intended: [u8; 32],
    },
    /// The sender's signature does not verify.
    #[error("envelope signature of key {} does not verify", hex_prefix(.sender))]
    BadSignature {
        /// Who the envelope claims is the sender (Ed25519 public key).
        sender: [u8; 32],
    },
    /// The payload is larger than [`MAX_PAYLOAD_BYTES`].
    #[error("payload of {len} bytes exceeds the limit of {MAX_PAYLOAD_BYTES} bytes")]
    TooLarge {
        /// The payload length.
        len: usize,
    },
    /// The inner structure did not decode.
    #[error("envelope inner structure: {0}")]
    Wire(#[from] WireError),
}

/// A sealed envelope (wire type; everything a relay or mailbox node sees).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The mailbox or recipient key it is routed by.
    pub routing_key: [u8; 32],
    /// When it was sealed (unix seconds).
    pub timestamp: u64,
    /// How long after `timestamp` it may be kept and delivered (seconds, ≤ [`MAX_TTL_SECS`]).
    pub ttl: u32,
    /// The sender's fresh ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// The padded, encrypted inner structure: [`ciphertext_len`] of a bucket.
    pub ciphertext: Vec<u8>,
}

crate::impl_wire!(Envelope, MAX_ENVELOPE_BYTES);

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field(
                "routing_key",
                &format_args!("{}…", hex_prefix(&self.routing_key)),
            )
            .field("timestamp", &self.timestamp)
            .field("ttl", &self.ttl)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

impl Envelope {
    /// The envelope's id: SHA-256 of its wire encoding (used to deduplicate and acknowledge).
    pub fn id(&self) -> [u8; 32] {
        let bytes = self.to_wire().unwrap_or_else(|_| {
            // Only an envelope larger than its own limit fails to encode; hash its fields so the
            // id is still well defined.
            let mut v = self.associated_data();
            v.extend_from_slice(&self.ciphertext);
            v
        });
        Sha256::digest(bytes).into()
    }

    /// When it expires: `timestamp + ttl` (unix seconds).
    pub fn expires_at(&self) -> u64 {
        self.timestamp.saturating_add(u64::from(self.ttl))
    }

    /// The checks anyone can make without a key (a mailbox node makes them before storing): the
    /// TTL limit, a bucket-sized ciphertext, and the time window at `now`.
    pub fn check(&self, now: u64) -> Result<(), EnvelopeError> {
        if self.ttl > MAX_TTL_SECS {
            return Err(EnvelopeError::TtlTooLong { ttl: self.ttl });
        }
        let len = self.ciphertext.len();
        if !BUCKETS.iter().any(|b| ciphertext_len(*b) == len) {
            return Err(EnvelopeError::NotABucket { len });
        }
        if self.timestamp > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(EnvelopeError::FromTheFuture {
                timestamp: self.timestamp,
                now,
            });
        }
        if now >= self.expires_at() {
            return Err(EnvelopeError::Expired {
                expired_at: self.expires_at(),
                now,
            });
        }
        Ok(())
    }

    /// The AEAD associated data: `0x01 || routing_key || timestamp || ttl || ephemeral`.
    fn associated_data(&self) -> Vec<u8> {
        header_bytes(&self.routing_key, self.timestamp, self.ttl, &self.ephemeral)
    }
}

fn header_bytes(routing_key: &[u8; 32], timestamp: u64, ttl: u32, ephemeral: &[u8; 32]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(77);
    ad.push(WIRE_VERSION);
    ad.extend_from_slice(routing_key);
    ad.extend_from_slice(&timestamp.to_le_bytes());
    ad.extend_from_slice(&ttl.to_le_bytes());
    ad.extend_from_slice(ephemeral);
    ad
}

/// What the sender signs: `recipient || ephemeral || routing_key || timestamp || ttl || payload`.
fn signed_bytes(
    recipient: &PublicIdentity,
    ephemeral: &[u8; 32],
    routing_key: &[u8; 32],
    timestamp: u64,
    ttl: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(108 + payload.len());
    m.extend_from_slice(recipient.as_bytes());
    m.extend_from_slice(ephemeral);
    m.extend_from_slice(routing_key);
    m.extend_from_slice(&timestamp.to_le_bytes());
    m.extend_from_slice(&ttl.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// The inside of an envelope.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SealedInner {
    recipient: PublicIdentity,
    sender: PublicIdentity,
    payload: Vec<u8>,
    #[serde(with = "serde_big_array::BigArray")]
    signature: [u8; 64],
}

impl fmt::Debug for SealedInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedInner")
            .field("recipient", &self.recipient)
            .field("sender", &self.sender)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

crate::impl_wire!(SealedInner, MAX_INNER_BYTES);

/// What [`open`] returns: who sent it (signature checked) and the payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Opened {
    /// The authenticated sender.
    pub sender: PublicIdentity,
    /// The payload.
    pub payload: Vec<u8>,
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field("sender", &self.sender)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// The bucket a payload of `payload_len` bytes falls in, if it fits at all.
pub fn bucket_for(payload_len: usize) -> Option<usize> {
    BUCKETS.iter().copied().find(|b| payload_len <= *b)
}

/// The envelope key for ephemeral public `e_pub`, recipient X25519 public `r_pub` and DH output.
fn envelope_key(e_pub: &[u8; 32], r_pub: &[u8; 32], dh: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(e_pub);
    salt[32..].copy_from_slice(r_pub);
    let hk = Hkdf::<Sha256>::new(Some(&salt), dh);
    let mut k = Zeroizing::new([0u8; 32]);
    hk.expand(ENVELOPE_KDF_INFO, k.as_mut())
        .expect("invariant: 32 bytes is a valid HKDF-SHA256 output length");
    k
}

/// Seal `payload` from `sender` to `recipient`. See the module doc for the construction.
#[allow(clippy::too_many_arguments)]
pub fn seal<R: CryptoRngCore + ?Sized>(
    sender: &Identity,
    recipient: &PublicIdentity,
    routing_key: [u8; 32],
    timestamp: u64,
    ttl: u32,
    payload: &[u8],
    rng: &mut R,
) -> Result<Envelope, EnvelopeError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(EnvelopeError::TooLarge { len: payload.len() });
    }
    if ttl > MAX_TTL_SECS {
        return Err(EnvelopeError::TtlTooLong { ttl });
    }
    let mut e_secret = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(e_secret.as_mut());
    let e_secret = x25519_dalek::StaticSecret::from(*e_secret);
    let ephemeral = x25519_dalek::PublicKey::from(&e_secret).to_bytes();
    let signature = sender.sign(
        ENVELOPE_SIGNATURE_DOMAIN,
        &signed_bytes(recipient, &ephemeral, &routing_key, timestamp, ttl, payload),
    );
    let inner = SealedInner {
        recipient: *recipient,
        sender: sender.public(),
        payload: payload.to_vec(),
        signature,
    };
    encrypt_inner(&inner, recipient, &e_secret, routing_key, timestamp, ttl)
}

/// Pad and encrypt an inner structure to `recipient` with the ephemeral secret `e_secret`.
fn encrypt_inner(
    inner: &SealedInner,
    recipient: &PublicIdentity,
    e_secret: &x25519_dalek::StaticSecret,
    routing_key: [u8; 32],
    timestamp: u64,
    ttl: u32,
) -> Result<Envelope, EnvelopeError> {
    let inner_bytes = Zeroizing::new(inner.to_wire()?);
    let bucket = bucket_for(inner.payload.len()).ok_or(EnvelopeError::TooLarge {
        len: inner.payload.len(),
    })?;
    let r_pub = recipient.x25519_public();
    let ephemeral = x25519_dalek::PublicKey::from(e_secret).to_bytes();
    let dh = e_secret.diffie_hellman(&r_pub);
    let k = envelope_key(&ephemeral, r_pub.as_bytes(), dh.as_bytes());
    let ad = header_bytes(&routing_key, timestamp, ttl, &ephemeral);
    let ciphertext =
        pad_and_encrypt(&k, &inner_bytes, bucket, &ad).ok_or(EnvelopeError::TooLarge {
            len: inner.payload.len(),
        })?;
    Ok(Envelope {
        routing_key,
        timestamp,
        ttl,
        ephemeral,
        ciphertext,
    })
}

/// `u32_le(len(content)) || content || zeros`, exactly `bucket + PAD_OVERHEAD` bytes, encrypted
/// under the one-time key `k` with a zero nonce and `ad` as associated data. `None` if `content`
/// does not fit (never for the callers, which chose `bucket` for it).
fn pad_and_encrypt(k: &[u8; 32], content: &[u8], bucket: usize, ad: &[u8]) -> Option<Vec<u8>> {
    let padded_len = bucket + PAD_OVERHEAD;
    if content.len() + PAD_PREFIX_BYTES > padded_len {
        return None;
    }
    let mut padded = Zeroizing::new(Vec::with_capacity(padded_len + TAG_BYTES));
    let len = u32::try_from(content.len()).ok()?;
    padded.extend_from_slice(&len.to_le_bytes());
    padded.extend_from_slice(content);
    padded.resize(padded_len, 0);
    ChaCha20Poly1305::new(Key::from_slice(k))
        .encrypt(
            Nonce::from_slice(&[0u8; 12]),
            Payload {
                msg: &padded,
                aad: ad,
            },
        )
        .ok()
}

/// Decrypt `env`'s ciphertext under its one-time key `k` (its visible fields authenticated) and
/// return the padded plaintext.
fn decrypt_padded(k: &[u8; 32], env: &Envelope) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    Ok(Zeroizing::new(
        ChaCha20Poly1305::new(Key::from_slice(k))
            .decrypt(
                Nonce::from_slice(&[0u8; 12]),
                Payload {
                    msg: &env.ciphertext,
                    aad: &env.associated_data(),
                },
            )
            .map_err(|_| EnvelopeError::Undecryptable)?,
    ))
}

/// The content of a padded plaintext `u32_le(len) || content || zeros`: the length must fit
/// and every padding byte must be zero.
fn unpad(padded: &[u8]) -> Result<&[u8], EnvelopeError> {
    let (prefix, rest) = padded
        .split_at_checked(PAD_PREFIX_BYTES)
        .ok_or(EnvelopeError::BadPadding)?;
    let len = u32::from_le_bytes(prefix.try_into().map_err(|_| EnvelopeError::BadPadding)?);
    let len = usize::try_from(len).map_err(|_| EnvelopeError::BadPadding)?;
    let (content, padding) = rest
        .split_at_checked(len)
        .ok_or(EnvelopeError::BadPadding)?;
    if padding.iter().any(|b| *b != 0) {
        return Err(EnvelopeError::BadPadding);
    }
    Ok(content)
}

/// Decrypt and unpad an envelope addressed to `recipient` (no time checks, no signature check).
fn decrypt_inner(recipient: &Identity, env: &Envelope) -> Result<SealedInner, EnvelopeError> {
    let e_pub = x25519_dalek::PublicKey::from(env.ephemeral);
    let dh = recipient.x25519_secret().diffie_hellman(&e_pub);
    if !dh.was_contributory() {
        return Err(EnvelopeError::Undecryptable);
    }
    let r_pub = recipient.x25519_public();
    let k = envelope_key(&env.ephemeral, r_pub.as_bytes(), dh.as_bytes());
    let padded = decrypt_padded(&k, env)?;
    let inner = unpad(&padded)?;
    Ok(SealedInner::from_wire(inner)?)
}

/// Open an envelope addressed to `recipient` at time `now` (unix seconds): check it, decrypt it,
/// check that it was signed for `recipient`, and verify the sender's signature.
pub fn open(recipient: &Identity, env: &Envelope, now: u64) -> Result<Opened, EnvelopeError> {
    env.check(now)?;
    let inner = decrypt_inner(recipient, env)?;
    if inner.recipient != recipient.public() {
        return Err(EnvelopeError::WrongRecipient {
            intended: *inner.recipient.as_bytes(),
        });
    }
    let msg = signed_bytes(
        &inner.recipient,
        &env.ephemeral,
        &env.routing_key,
        env.timestamp,
        env.ttl,
        &inner.payload,
    );
    inner
        .sender
        .verify(ENVELOPE_SIGNATURE_DOMAIN, &msg, &inner.signature)
        .map_err(|_| EnvelopeError::BadSignature {
            sender: *inner.sender.as_bytes(),
        })?;
    Ok(Opened {
        sender: inner.sender,
        payload: inner.payload,
    })
}

// ------------------------------------------------------------------------------------------
// Pair envelopes
// ------------------------------------------------------------------------------------------

/// The HKDF info prefix of a pair-envelope key.
pub const PAIR_ENVELOPE_KEY_INFO: &[u8] = b"meshchat/pair-envelope-key/v1";
/// The HKDF info of the per-envelope key of a pair envelope.
pub const PAIR_ENVELOPE_KDF_INFO: &[u8] = b"meshchat/pair-envelope/v1";

/// The key that seals pair envelopes to one recipient from its pair partner during one epoch.
///
/// `K = HKDF-Expand(PRK = pair secret, info = "meshchat/pair-envelope-key/v1" || recipient ||
/// u64_le(epoch), 32)`: both partners derive it, it differs per direction (the recipient is in
/// the info) and per day. Secret: zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PairEnvelopeKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for PairEnvelopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairEnvelopeKey(..)")
    }
}

impl PairEnvelopeKey {
    /// The key for pair envelopes to `recipient` during `epoch`.
    pub fn derive(
        pair: &crate::addressing::PairSecret,
        recipient: &PublicIdentity,
        epoch: u64,
    ) -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        pair.expand(
            &[
                PAIR_ENVELOPE_KEY_INFO,
                recipient.as_bytes(),
                &epoch.to_le_bytes(),
            ],
            k.as_mut(),
        );
        Self(k)
    }

    /// The 32 secret bytes (for test vectors).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The one-time key of the envelope with nonce `nonce`:
    /// `HKDF-SHA256(salt = nonce, ikm = K, info = "meshchat/pair-envelope/v1", 32)`.
    fn envelope_key(&self, nonce: &[u8; 32]) -> Zeroizing<[u8; 32]> {
        let hk = Hkdf::<Sha256>::new(Some(nonce), self.0.as_ref());
        let mut k = Zeroizing::new([0u8; 32]);
        hk.expand(PAIR_ENVELOPE_KDF_INFO, k.as_mut())
            .expect("invariant: 32 bytes is a valid HKDF-SHA256 output length");
        k
    }
}

/// Seal `payload` in a pair envelope: an envelope between two partners who already share a
/// session, routed by the recipient's pair mailbox. See the module doc and `docs/protocol.md`,
/// "Pair envelopes".
///
/// No Diffie-Hellman and no signature: the key comes from the pair secret, so only the two
/// partners can seal or open it, and the Double Ratchet message inside authenticates the sender.
/// Outside it is indistinguishable in shape and size from a sealed-sender envelope: the
/// `ephemeral` field carries a random nonce with its top bit cleared (as in every X25519 public
/// key), and the ciphertext has the same bucket lengths.
pub fn seal_pair<R: CryptoRngCore + ?Sized>(
    key: &PairEnvelopeKey,
    routing_key: [u8; 32],
    timestamp: u64,
    ttl: u32,
    payload: &[u8],
    rng: &mut R,
) -> Result<Envelope, EnvelopeError> {
    if ttl > MAX_TTL_SECS {
        return Err(EnvelopeError::TtlTooLong { ttl });
    }
    let bucket = bucket_for(payload.len()).ok_or(EnvelopeError::TooLarge { len: payload.len() })?;
    let mut nonce = [0u8; 32];
    rng.fill_bytes(&mut nonce);
    nonce[31] &= 0x7f;
    let k = key.envelope_key(&nonce);
    let ad = header_bytes(&routing_key, timestamp, ttl, &nonce);
    let ciphertext = pad_and_encrypt(&k, payload, bucket, &ad)
        .ok_or(EnvelopeError::TooLarge { len: payload.len() })?;
    Ok(Envelope {
        routing_key,
        timestamp,
        ttl,
        ephemeral: nonce,
        ciphertext,
    })
}

/// Open a pair envelope with `key` at time `now`: the same checks as [`open`] (TTL limit, bucket
/// length, time window, decryption, padding), and the payload back. The caller derived `key`
/// for the partner the envelope's routing key belongs to and the epoch of its timestamp, so
/// success authenticates that partner as the sender.
pub fn open_pair(
    key: &PairEnvelopeKey,
    env: &Envelope,
    now: u64,
) -> Result<Vec<u8>, EnvelopeError> {
    env.check(now)?;
    let k = key.envelope_key(&env.ephemeral);
    let padded = decrypt_padded(&k, env)?;
    let payload = unpad(&padded)?;
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(EnvelopeError::BadPadding);
    }
    Ok(payload.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_core::OsRng;

    const NOW: u64 = 1_700_000_000;
    const TTL: u32 = DEFAULT_TTL_SECS;

    fn id(n: u8) -> Identity {
        Identity::from_seed(&[n; 32])
    }

    fn sealed(payload: &[u8]) -> Envelope {
        seal(
            &id(1),
            &id(2).public(),
            [7; 32],
            NOW,
            TTL,
            payload,
            &mut OsRng,
        )
        .expect("seals")
    }

    #[test]
    fn round_trip_reveals_sender_and_payload() {
        let env = sealed(b"hello bob");
        let bytes = env.to_wire().expect("encodes");
        let env = Envelope::from_wire(&bytes).expect("decodes");
        let opened = open(&id(2), &env, NOW + 5).expect("opens");
        assert_eq!(opened.sender, id(1).public());
        assert_eq!(opened.payload, b"hello bob");
        // Nothing about the sender is visible outside.
        let sender_key = id(1).public();
        assert!(!bytes
            .windows(32)
            .any(|w| w == sender_key.as_bytes().as_slice()));
    }

    #[test]
    fn sizes_are_determined_by_the_bucket_alone() {
        // A 10-byte and a 200-byte payload give the same envelope length.
        let small = sealed(&[1; 10]).to_wire().expect("encodes");
        let larger = sealed(&[1; 200]).to_wire().expect("encodes");
        assert_eq!(small.len(), larger.len());
        assert_eq!(small.len(), ENVELOPE_HEADER_BYTES + ciphertext_len(256));
        assert_eq!(small.len(), 85 + 256 + 141 + 16);
        assert_eq!(sealed(&[]).to_wire().expect("encodes").len(), small.len());
        // Every boundary lands exactly in its bucket.
        for (i, bucket) in BUCKETS.iter().enumerate() {
            let at = sealed(&vec![0xab; *bucket]);
            assert_eq!(at.ciphertext.len(), ciphertext_len(*bucket));
            if i + 1 < BUCKETS.len() {
                let over = sealed(&vec![0xab; bucket + 1]);
                assert_eq!(over.ciphertext.len(), ciphertext_len(BUCKETS[i + 1]));
            }
        }
        let biggest = sealed(&vec![0; MAX_PAYLOAD_BYTES]);
        assert_eq!(
            biggest.to_wire().expect("encodes").len(),
            MAX_ENVELOPE_BYTES
        );
        assert_eq!(
            open(&id(2), &biggest, NOW).expect("opens").payload.len(),
            MAX_PAYLOAD_BYTES
        );
    }

    #[test]
    fn payloads_within_one_bucket_look_identical_in_size() {
        let a = sealed(&[0; 257]).to_wire().expect("encodes");
        let b = sealed(&[0; 1024]).to_wire().expect("encodes");
        assert_eq!(a.len(), b.len());
        assert_eq!(a.len(), ENVELOPE_HEADER_BYTES + ciphertext_len(1024));
    }

    #[test]
    fn too_large_payload_and_ttl_are_refused_when_sealing() {
        let r = seal(
            &id(1),
            &id(2).public(),
            [0; 32],
            NOW,
            TTL,
            &vec![0; MAX_PAYLOAD_BYTES + 1],
            &mut OsRng,
        );
        assert_eq!(
            r,
            Err(EnvelopeError::TooLarge {
                len: MAX_PAYLOAD_BYTES + 1
            })
        );
        let r = seal(
            &id(1),
            &id(2).public(),
            [0; 32],
            NOW,
            MAX_TTL_SECS + 1,
            b"x",
            &mut OsRng,
        );
        assert_eq!(
            r,
            Err(EnvelopeError::TtlTooLong {
                ttl: MAX_TTL_SECS + 1
            })
        );
    }

    #[test]
    fn expired_and_future_envelopes_are_rejected() {
        let env = sealed(b"x");
        let end = NOW + u64::from(TTL);
        assert!(open(&id(2), &env, end - 1).is_ok());
        assert_eq!(
            open(&id(2), &env, end),
            Err(EnvelopeError::Expired {
                expired_at: end,
                now: end
            })
        );
        assert!(open(&id(2), &env, NOW - MAX_CLOCK_SKEW_SECS).is_ok());
        assert_eq!(
            open(&id(2), &env, NOW - MAX_CLOCK_SKEW_SECS - 1),
            Err(EnvelopeError::FromTheFuture {
                timestamp: NOW,
                now: NOW - MAX_CLOCK_SKEW_SECS - 1
            })
        );
    }

    #[test]
    fn an_overlong_ttl_on_the_wire_is_rejected() {
        let mut env = sealed(b"x");
        env.ttl = MAX_TTL_SECS + 1;
        assert_eq!(
            open(&id(2), &env, NOW),
            Err(EnvelopeError::TtlTooLong {
                ttl: MAX_TTL_SECS + 1
            })
        );
    }

    #[test]
    fn a_mailbox_node_cannot_extend_the_ttl() {
        let mut env = sealed(b"x");
        env.ttl -= 1; // any change of a visible field breaks the AEAD
        assert_eq!(open(&id(2), &env, NOW), Err(EnvelopeError::Undecryptable));
        let mut env = sealed(b"x");
        env.routing_key[0] ^= 1;
        assert_eq!(open(&id(2), &env, NOW), Err(EnvelopeError::Undecryptable));
        let mut env = sealed(b"x");
        env.timestamp -= 1;
        assert_eq!(open(&id(2), &env, NOW), Err(EnvelopeError::Undecryptable));
    }

    #[test]
    fn the_wrong_key_or_a_flipped_bit_cannot_decrypt() {
        let env = sealed(b"x");
        assert_eq!(open(&id(3), &env, NOW), Err(EnvelopeError::Undecryptable));
        let mut t = env.clone();
        t.ciphertext[10] ^= 1;
        assert_eq!(open(&id(2), &t, NOW), Err(EnvelopeError::Undecryptable));
        let mut t = env.clone();
        t.ephemeral[0] ^= 1;
        assert_eq!(open(&id(2), &t, NOW), Err(EnvelopeError::Undecryptable));
        // A small-order ephemeral key gives no shared secret.
        let mut t = env;
        t.ephemeral = [0; 32];
        assert_eq!(open(&id(2), &t, NOW), Err(EnvelopeError::Undecryptable));
    }

    #[test]
    fn a_ciphertext_that_is_not_a_bucket_is_rejected() {
        let mut env = sealed(b"x");
        env.ciphertext.pop();
        let len = ciphertext_len(256) - 1;
        assert_eq!(
            open(&id(2), &env, NOW),
            Err(EnvelopeError::NotABucket { len })
        );
        assert_eq!(env.check(NOW), Err(EnvelopeError::NotABucket { len }));
    }

    /// Encrypt arbitrary padded bytes to `recipient` (for padding tests).
    fn encrypt_raw(recipient: &PublicIdentity, padded: &[u8]) -> Envelope {
        let e = x25519_dalek::StaticSecret::random_from_rng(OsRng);
        let ephemeral = x25519_dalek::PublicKey::from(&e).to_bytes();
        let dh = e.diffie_hellman(&recipient.x25519_public());
        let k = envelope_key(
            &ephemeral,
            recipient.x25519_public().as_bytes(),
            dh.as_bytes(),
        );
        raw_envelope(&k, ephemeral, padded)
    }

    /// An envelope whose ciphertext is `padded` as it is, encrypted under the one-time key `k`,
    /// with the test header (routing key 7s, `NOW`, `TTL`) and `ephemeral`.
    fn raw_envelope(k: &[u8; 32], ephemeral: [u8; 32], padded: &[u8]) -> Envelope {
        let ad = header_bytes(&[7; 32], NOW, TTL, &ephemeral);
        let ciphertext = ChaCha20Poly1305::new(Key::from_slice(k))
            .encrypt(
                Nonce::from_slice(&[0; 12]),
                Payload {
                    msg: padded,
                    aad: &ad,
                },
            )
            .expect("encrypts");
        Envelope {
            routing_key: [7; 32],
            timestamp: NOW,
            ttl: TTL,
            ephemeral,
            ciphertext,
        }
    }

    #[test]
    fn bad_padding_is_rejected() {
        let sender = id(1);
        let recipient = id(2).public();
        let inner = SealedInner {
            recipient,
            sender: sender.public(),
            payload: b"hi".to_vec(),
            signature: [0; 64],
        };
        let inner_bytes = inner.to_wire().expect("encodes");
        // A non-zero byte in the padding.
        let mut padded = (inner_bytes.len() as u32).to_le_bytes().to_vec();
        padded.extend_from_slice(&inner_bytes);
        padded.resize(256 + PAD_OVERHEAD, 0);
        padded[256 + PAD_OVERHEAD - 1] = 1;
        let env = encrypt_raw(&recipient, &padded);
        assert_eq!(open(&id(2), &env, NOW), Err(EnvelopeError::BadPadding));
        // A length prefix longer than the bucket.
        let mut padded = 1000u32.to_le_bytes().to_vec();
        padded.resize(256 + PAD_OVERHEAD, 0);
        let env = encrypt_raw(&recipient, &padded);
        assert_eq!(open(&id(2), &env, NOW), Err(EnvelopeError::BadPadding));
        // An inner structure cut short (the rest zero): a wire error.
        let mut padded = 50u32.to_le_bytes().to_vec();
        padded.extend_from_slice(&inner_bytes[..50]);
        padded.resize(256 + PAD_OVERHEAD, 0);
        let env = encrypt_raw(&recipient, &padded);
        assert!(matches!(
            open(&id(2), &env, NOW),
            Err(EnvelopeError::Wire(WireError::Truncated { .. }))
        ));
        // Garbage inside a correctly padded envelope: a wire error.
        let mut padded = 4u32.to_le_bytes().to_vec();
        padded.extend_from_slice(&[9, 9, 9, 9]);
        padded.resize(256 + PAD_OVERHEAD, 0);
        let env = encrypt_raw(&recipient, &padded);
        assert!(matches!(
            open(&id(2), &env, NOW),
            Err(EnvelopeError::Wire(WireError::UnsupportedVersion {
                found: 9
            }))
        ));
    }

    #[test]
    fn a_message_resealed_to_someone_else_is_caught() {
        let (alice, bob, carol) = (id(1), id(2), id(3));
        let env = seal(
            &alice,
            &bob.public(),
            [7; 32],
            NOW,
            TTL,
            b"for bob",
            &mut OsRng,
        )
        .expect("seals");
        // Bob decrypts the inner structure and re-seals it, unchanged, to Carol.
        let inner = decrypt_inner(&bob, &env).expect("bob decrypts");
        let e = x25519_dalek::StaticSecret::random_from_rng(OsRng);
        let forged = encrypt_inner(&inner, &carol.public(), &e, [7; 32], NOW, TTL).expect("seals");
        assert_eq!(
            open(&carol, &forged, NOW),
            Err(EnvelopeError::WrongRecipient {
                intended: *bob.public().as_bytes()
            })
        );
    }

    #[test]
    fn a_forged_or_altered_signature_is_caught() {
        let (alice, bob) = (id(1), id(2));
        let env = seal(
            &alice,
            &bob.public(),
            [7; 32],
            NOW,
            TTL,
            b"real",
            &mut OsRng,
        )
        .expect("seals");
        let mut inner = decrypt_inner(&bob, &env).expect("decrypts");
        // Someone who knows the envelope key swaps the payload but cannot re-sign it.
        inner.payload = b"fake".to_vec();
        let e = x25519_dalek::StaticSecret::random_from_rng(OsRng);
        let forged = encrypt_inner(&inner, &bob.public(), &e, [7; 32], NOW, TTL).expect("seals");
        assert_eq!(
            open(&bob, &forged, NOW),
            Err(EnvelopeError::BadSignature {
                sender: *alice.public().as_bytes()
            })
        );
        // Claiming another sender with the real signature fails too.
        let mut inner = decrypt_inner(&bob, &env).expect("decrypts");
        inner.sender = id(9).public();
        let forged = encrypt_inner(&inner, &bob.public(), &e, [7; 32], NOW, TTL).expect("seals");
        assert!(matches!(
            open(&bob, &forged, NOW),
            Err(EnvelopeError::BadSignature { .. })
        ));
    }

    #[test]
    fn ids_differ_per_envelope_and_are_stable() {
        let a = sealed(b"same");
        let b = sealed(b"same");
        assert_ne!(a.id(), b.id(), "fresh ephemeral key per envelope");
        let again = Envelope::from_wire(&a.to_wire().expect("encodes")).expect("decodes");
        assert_eq!(a.id(), again.id());
    }

    #[test]
    fn debug_output_shows_no_plaintext() {
        let env = sealed(b"secret words");
        let opened = open(&id(2), &env, NOW).expect("opens");
        assert!(!format!("{opened:?}").contains("secret"));
        assert!(!format!("{opened:?}").contains("115, 101, 99"));
    }

    fn pair_key(recipient: u8, epoch: u64) -> PairEnvelopeKey {
        let pair = crate::addressing::pair_secret(&id(1), &id(2).public());
        PairEnvelopeKey::derive(&pair, &id(recipient).public(), epoch)
    }

    fn pair_sealed(payload: &[u8]) -> Envelope {
        seal_pair(&pair_key(2, 5), [7; 32], NOW, TTL, payload, &mut OsRng).expect("seals")
    }

    #[test]
    fn pair_envelopes_round_trip_for_both_partners_only() {
        let env = pair_sealed(b"hello bob");
        let back = Envelope::from_wire(&env.to_wire().expect("encodes")).expect("decodes");
        // Bob derives the same key from his side of the pair secret.
        let bobs_pair = crate::addressing::pair_secret(&id(2), &id(1).public());
        let bobs = PairEnvelopeKey::derive(&bobs_pair, &id(2).public(), 5);
        assert_eq!(
            open_pair(&bobs, &back, NOW + 5).expect("opens"),
            b"hello bob"
        );
        // The other direction, another epoch, another pair: no.
        for wrong in [pair_key(1, 5), pair_key(2, 6)] {
            assert_eq!(
                open_pair(&wrong, &back, NOW),
                Err(EnvelopeError::Undecryptable)
            );
        }
        let carols = crate::addressing::pair_secret(&id(3), &id(1).public());
        let carols = PairEnvelopeKey::derive(&carols, &id(3).public(), 5);
        assert_eq!(
            open_pair(&carols, &back, NOW),
            Err(EnvelopeError::Undecryptable)
        );
        // Nor does the sealed-sender path open it.
        assert_eq!(open(&id(2), &back, NOW), Err(EnvelopeError::Undecryptable));
    }

    #[test]
    fn pair_envelopes_look_like_sealed_sender_envelopes() {
        for payload in [
            &b""[..],
            &[1; 200],
            &[2; 257],
            &[3; 4096],
            &[4; MAX_PAYLOAD_BYTES],
        ] {
            let pair = pair_sealed(payload).to_wire().expect("encodes");
            let sealed = sealed(payload).to_wire().expect("encodes");
            assert_eq!(
                pair.len(),
                sealed.len(),
                "payload of {} bytes",
                payload.len()
            );
        }
        // The nonce has an X25519 key's top bit (clear), and differs per envelope.
        let (a, b) = (pair_sealed(b"same"), pair_sealed(b"same"));
        assert_eq!(a.ephemeral[31] & 0x80, 0);
        assert_ne!(a.ephemeral, b.ephemeral);
        assert_ne!(a.ciphertext, b.ciphertext);
        let env = pair_sealed(b"secret words");
        assert!(!env.ciphertext.windows(6).any(|w| w == b"secret"));
        assert_eq!(format!("{:?}", pair_key(2, 5)), "PairEnvelopeKey(..)");
    }

    #[test]
    fn pair_envelopes_are_checked_like_any_other() {
        let key = pair_key(2, 5);
        let env = pair_sealed(b"x");
        let end = NOW + u64::from(TTL);
        assert!(open_pair(&key, &env, end - 1).is_ok());
        assert!(matches!(
            open_pair(&key, &env, end),
            Err(EnvelopeError::Expired { .. })
        ));
        assert!(matches!(
            open_pair(&key, &env, NOW - MAX_CLOCK_SKEW_SECS - 1),
            Err(EnvelopeError::FromTheFuture { .. })
        ));
        for tamper in 0..5 {
            let mut t = env.clone();
            match tamper {
                0 => t.ttl -= 1,
                1 => t.routing_key[0] ^= 1,
                2 => t.timestamp -= 1,
                3 => t.ephemeral[0] ^= 1,
                _ => t.ciphertext[3] ^= 1,
            }
            assert_eq!(
                open_pair(&key, &t, NOW),
                Err(EnvelopeError::Undecryptable),
                "tamper {tamper}"
            );
        }
        let mut t = env;
        t.ciphertext.pop();
        assert!(matches!(
            open_pair(&key, &t, NOW),
            Err(EnvelopeError::NotABucket { .. })
        ));
        assert_eq!(
            seal_pair(
                &key,
                [0; 32],
                NOW,
                TTL,
                &vec![0; MAX_PAYLOAD_BYTES + 1],
                &mut OsRng
            ),
            Err(EnvelopeError::TooLarge {
                len: MAX_PAYLOAD_BYTES + 1
            })
        );
        assert_eq!(
            seal_pair(&key, [0; 32], NOW, MAX_TTL_SECS + 1, b"x", &mut OsRng),
            Err(EnvelopeError::TtlTooLong {
                ttl: MAX_TTL_SECS + 1
            })
        );
    }

    /// Encrypt arbitrary padded bytes under a pair key (for padding tests).
    fn pair_raw(key: &PairEnvelopeKey, padded: &[u8]) -> Envelope {
        let nonce = [5u8; 32];
        raw_envelope(&key.envelope_key(&nonce), nonce, padded)
    }

    #[test]
    fn pair_envelopes_with_bad_padding_are_rejected() {
        let key = pair_key(2, 5);
        let full = 256 + PAD_OVERHEAD;
        let mut padded = 2u32.to_le_bytes().to_vec();
        padded.extend_from_slice(b"hi");
        padded.resize(full, 0);
        assert_eq!(
            open_pair(&key, &pair_raw(&key, &padded), NOW).expect("opens"),
            b"hi"
        );
        padded[full - 1] = 1;
        assert_eq!(
            open_pair(&key, &pair_raw(&key, &padded), NOW),
            Err(EnvelopeError::BadPadding)
        );
        let mut padded = (full as u32).to_le_bytes().to_vec();
        padded.resize(full, 0);
        assert_eq!(
            open_pair(&key, &pair_raw(&key, &padded), NOW),
            Err(EnvelopeError::BadPadding)
        );
        let mut padded = u32::MAX.to_le_bytes().to_vec();
        padded.resize(full, 0);
        assert_eq!(
            open_pair(&key, &pair_raw(&key, &padded), NOW),
            Err(EnvelopeError::BadPadding)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn pair_envelopes_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..3000), rk in any::<[u8; 32]>(), ttl in 1u32..MAX_TTL_SECS) {
            let env = seal_pair(&pair_key(2, 9), rk, NOW, ttl, &payload, &mut OsRng).expect("seals");
            let back = Envelope::from_wire(&env.to_wire().expect("encodes")).expect("decodes");
            prop_assert_eq!(back.ciphertext.len(), ciphertext_len(bucket_for(payload.len()).expect("fits")));
            prop_assert_eq!(open_pair(&pair_key(2, 9), &back, NOW).expect("opens"), payload);
        }

        #[test]
        fn arbitrary_envelopes_never_panic_open_pair(rk in any::<[u8; 32]>(), e in any::<[u8; 32]>(), ts in any::<u64>(), ttl in any::<u32>(), bucket in 0usize..3, junk in any::<u8>()) {
            let env = Envelope { routing_key: rk, timestamp: ts, ttl, ephemeral: e, ciphertext: vec![junk; ciphertext_len(BUCKETS[bucket])] };
            let _ = open_pair(&pair_key(2, 9), &env, NOW);
        }

        #[test]
        fn envelopes_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..3000), rk in any::<[u8; 32]>(), ttl in 1u32..MAX_TTL_SECS) {
            let env = seal(&id(1), &id(2).public(), rk, NOW, ttl, &payload, &mut OsRng).expect("seals");
            let bytes = env.to_wire().expect("encodes");
            prop_assert_eq!(bytes.len(), ENVELOPE_HEADER_BYTES + env.ciphertext.len());
            let back = Envelope::from_wire(&bytes).expect("decodes");
            let opened = open(&id(2), &back, NOW).expect("opens");
            prop_assert_eq!(opened.payload, payload);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            if let Ok(env) = Envelope::from_wire(&bytes) {
                let _ = open(&id(2), &env, NOW);
            }
            let _ = SealedInner::from_wire(&bytes);
        }

        #[test]
        fn arbitrary_envelopes_never_panic_open(rk in any::<[u8; 32]>(), e in any::<[u8; 32]>(), ts in any::<u64>(), ttl in any::<u32>(), bucket in 0usize..3, junk in any::<u8>()) {
            let env = Envelope { routing_key: rk, timestamp: ts, ttl, ephemeral: e, ciphertext: vec![junk; ciphertext_len(BUCKETS[bucket])] };
            let _ = open(&id(2), &env, NOW);
            let _ = env.id();
        }
    }
}
