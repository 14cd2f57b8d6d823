//! The Double Ratchet: per-message keys with forward secrecy and post-compromise security, after
//! Signal's specification (<https://signal.org/docs/specifications/doubleratchet/>). See
//! `docs/protocol.md`, section "Double Ratchet", for the byte-exact KDFs and header encoding.
//!
//! ```text
//!   root key ──KDF_RK(DH)──► root key ──KDF_RK(DH)──► root key …      (DH ratchet, HKDF-SHA256)
//!                 │                         │
//!                 ▼                         ▼
//!           chain key ─KDF_CK─► chain key ─KDF_CK─► …                 (symmetric, HMAC-SHA256)
//!                 │                │
//!                 ▼                ▼
//!           message key      message key  ─HKDF─► ChaCha20-Poly1305 key + nonce
//! ```
//!
//! Differences from the specification's pseudo-code, both invisible on the wire:
//! - The sending half of a DH ratchet step is taken lazily, by the next [`RatchetState::encrypt`],
//!   so that decryption needs no randomness (the receive half is taken by decryption, as usual).
//! - Decryption is transactional: every change is computed on the side and committed only once
//!   the AEAD tag verifies, so a forged, replayed or truncated message leaves the state untouched.
//!
//! Out-of-order messages are handled with skipped message keys under hard caps: at most
//! [`MAX_SKIP`] keys skipped per chain in one message, at most [`MAX_STORED_SKIPPED`] kept in all
//! (oldest evicted first), and each expires after [`SKIPPED_KEY_MAX_AGE_SECS`] or
//! [`SKIPPED_KEY_MAX_STEPS`] receiving ratchet steps, whichever comes first.

use std::fmt;

use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    ChaCha20Poly1305,
};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::{impl_wire, wire::Wire, WireError};

/// Most message keys one incoming message may make the receiver skip in one chain.
pub const MAX_SKIP: u32 = 1000;
/// Most skipped message keys a state keeps; beyond it the oldest are evicted.
pub const MAX_STORED_SKIPPED: usize = 2000;
/// A skipped message key is discarded once more than this many seconds passed since it was stored (30 days: longer than the
/// longest mailbox TTL, so a message that can still be delivered can still be read).
pub const SKIPPED_KEY_MAX_AGE_SECS: u64 = 30 * 86_400;
/// A skipped message key is discarded once the receiver has taken this many DH ratchet steps
/// since its chain (libsignal keeps 5 receiving chains; a mailbox network reorders more).
pub const SKIPPED_KEY_MAX_STEPS: u64 = 32;
/// Previous receiving ratchet keys remembered, so a replay on an old chain is reported as a
/// duplicate rather than attempted as a new ratchet step.
pub const MAX_PREVIOUS_RECEIVING_KEYS: usize = SKIPPED_KEY_MAX_STEPS as usize;
/// Largest plaintext one ratchet message carries (the envelope's largest bucket, less overhead).
pub const MAX_PLAINTEXT_BYTES: usize = 60 * 1024;
/// Length of the associated data both sides bind (the X3DH associated data).
pub const ASSOCIATED_DATA_LEN: usize = 80;
/// Length of an encoded [`RatchetHeader`]: version byte, 32-byte key, two `u32`.
pub const HEADER_BYTES: usize = 1 + 32 + 4 + 4;
/// Poly1305 tag length.
pub const TAG_BYTES: usize = 16;
/// Largest encoded [`RatchetMessage`].
pub const MAX_RATCHET_MESSAGE_BYTES: usize = HEADER_BYTES + 8 + MAX_PLAINTEXT_BYTES + TAG_BYTES;
/// Encoded size of one skipped key entry: key, counter, message key, time, step.
const SKIPPED_ENTRY_BYTES: usize = 32 + 4 + 32 + 8 + 8;
/// Largest encoded [`RatchetState`].
pub const MAX_RATCHET_STATE_BYTES: usize = 1
    + ASSOCIATED_DATA_LEN
    + 32 * 2 // sending key pair
    + 33 // receiving key
    + 32 // root key
    + 33 * 2 // chain keys
    + 4 * 3 // counters
    + 8 // step
    + 8 + 32 * MAX_PREVIOUS_RECEIVING_KEYS
    + 8 + SKIPPED_ENTRY_BYTES * MAX_STORED_SKIPPED;

/// HKDF info of the root-key KDF.
pub const KDF_RK_INFO: &[u8] = b"meshchat/ratchet/root/v1";
/// HKDF info of the per-message key expansion.
pub const MESSAGE_KEY_INFO: &[u8] = b"meshchat/ratchet/message/v1";
/// HMAC input that derives a message key from a chain key.
pub const KDF_CK_MESSAGE: u8 = 0x01;
/// HMAC input that derives the next chain key.
pub const KDF_CK_CHAIN: u8 = 0x02;

/// Why a ratchet operation failed. A failed decryption never changes the state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RatchetError {
    /// The AEAD tag did not verify: the message was altered, truncated, is not for this session,
    /// or its header was forged.
    #[error("message does not authenticate (tampered, truncated or not for this session)")]
    Tampered,
    /// The message was already received, or its key was discarded (evicted or its chain aged
    /// out); its key is gone either way.
    #[error("message {n} of its chain was already received or its key was discarded")]
    Duplicate {
        /// The message number in its chain.
        n: u32,
    },
    /// The key for this late message was kept, but has expired.
    #[error("message {n} arrived after its skipped key expired")]
    SkippedKeyExpired {
        /// The message number in its chain.
        n: u32,
    },
    /// Accepting the message would skip more than [`MAX_SKIP`] keys in one chain.
    #[error("message would skip {requested} keys in one chain (limit {MAX_SKIP})")]
    TooManySkipped {
        /// Keys the message asks us to skip.
        requested: u64,
    },
    /// A peer's ratchet key is a low-order point (the Diffie-Hellman output is all zero).
    #[error("peer ratchet key is a low-order point")]
    LowOrderKey,
    /// The plaintext exceeds [`MAX_PLAINTEXT_BYTES`].
    #[error("plaintext of {len} bytes exceeds the limit of {MAX_PLAINTEXT_BYTES}")]
    PlaintextTooLarge {
        /// Its length.
        len: usize,
    },
    /// This side cannot send yet: a responder state has not received a message.
    #[error("no sending chain: the session has not received its first message")]
    NoSendingChain,
    /// A chain reached 2^32 messages.
    #[error("message counter exhausted")]
    CounterExhausted,
    /// The header could not be encoded.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// The header every ratchet message carries in clear (inside the sealed envelope).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RatchetHeader {
    /// The sender's current ratchet public key (X25519).
    pub dh: [u8; 32],
    /// Messages in the sender's previous sending chain.
    pub pn: u32,
    /// This message's number in the current sending chain.
    pub n: u32,
}
impl_wire!(RatchetHeader, HEADER_BYTES);

/// One encrypted ratchet message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatchetMessage {
    /// The header (authenticated as associated data).
    pub header: RatchetHeader,
    /// ChaCha20-Poly1305 ciphertext and tag.
    pub ciphertext: Vec<u8>,
}
impl_wire!(RatchetMessage, MAX_RATCHET_MESSAGE_BYTES);

/// A message key kept for a message that has not arrived yet.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct SkippedKey {
    dh: [u8; 32],
    n: u32,
    mk: [u8; 32],
    stored_at: u64,
    step: u64,
}

/// The whole state of one side of a Double Ratchet session; serializable so the node persists it.
///
/// Secret fields are wiped on drop. `Debug` shows only public values.
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct RatchetState {
    #[serde(with = "serde_big_array::BigArray")]
    ad: [u8; ASSOCIATED_DATA_LEN],
    dhs_secret: [u8; 32],
    dhs_public: [u8; 32],
    dhr: Option<[u8; 32]>,
    rk: [u8; 32],
    cks: Option<[u8; 32]>,
    ckr: Option<[u8; 32]>,
    ns: u32,
    nr: u32,
    pn: u32,
    /// Receiving DH ratchet steps taken so far.
    step: u64,
    /// Earlier receiving ratchet keys, oldest first.
    previous_dhr: Vec<[u8; 32]>,
    /// Skipped message keys, oldest first.
    skipped: Vec<SkippedKey>,
}
impl_wire!(RatchetState, MAX_RATCHET_STATE_BYTES);

impl fmt::Debug for RatchetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RatchetState")
            .field("sending_key", &hex_short(&self.dhs_public))
            .field("receiving_key", &self.dhr.as_ref().map(hex_short))
            .field("ns", &self.ns)
            .field("nr", &self.nr)
            .field("pn", &self.pn)
            .field("step", &self.step)
            .field("skipped", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

fn hex_short(bytes: &[u8; 32]) -> String {
    bytes[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// `KDF_RK(rk, dh) = HKDF(salt = rk, ikm = dh, info = KDF_RK_INFO, 64)` split into (root, chain).
fn kdf_rk(rk: &[u8; 32], dh_out: &[u8; 32]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let mut okm = Zeroizing::new([0u8; 64]);
    Hkdf::<Sha256>::new(Some(rk), dh_out)
        .expand(KDF_RK_INFO, okm.as_mut())
        .expect("invariant: 64 bytes is a valid HKDF-SHA256 output length");
    let mut root = Zeroizing::new([0u8; 32]);
    let mut chain = Zeroizing::new([0u8; 32]);
    root.copy_from_slice(&okm[..32]);
    chain.copy_from_slice(&okm[32..]);
    (root, chain)
}

fn hmac(key: &[u8; 32], input: u8) -> Zeroizing<[u8; 32]> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .expect("invariant: HMAC accepts keys of any length");
    mac.update(&[input]);
    Zeroizing::new(mac.finalize().into_bytes().into())
}

/// `KDF_CK(ck)` = (next chain key `HMAC(ck, 0x02)`, message key `HMAC(ck, 0x01)`).
/// Shared with the group sender chains (`group.rs`), which use the same chain step.
pub(crate) fn kdf_ck(ck: &[u8; 32]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    (hmac(ck, KDF_CK_CHAIN), hmac(ck, KDF_CK_MESSAGE))
}

/// The AEAD key and nonce of a message key: `HKDF(salt = 0^32, ikm = mk, info, 44)`.
fn message_cipher(mk: &[u8; 32]) -> (ChaCha20Poly1305, [u8; 12]) {
    message_cipher_with(mk, MESSAGE_KEY_INFO)
}

/// As [`message_cipher`], under another `info` (the group sender chains use their own).
pub(crate) fn message_cipher_with(mk: &[u8; 32], info: &[u8]) -> (ChaCha20Poly1305, [u8; 12]) {
    let mut okm = Zeroizing::new([0u8; 44]);
    Hkdf::<Sha256>::new(Some(&[0u8; 32]), mk)
        .expand(info, okm.as_mut())
        .expect("invariant: 44 bytes is a valid HKDF-SHA256 output length");
    let cipher = ChaCha20Poly1305::new_from_slice(&okm[..32])
        .expect("invariant: ChaCha20-Poly1305 keys are 32 bytes");
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&okm[32..]);
    (cipher, nonce)
}

fn dh(secret: &[u8; 32], public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, RatchetError> {
    let shared = StaticSecret::from(*secret).diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(RatchetError::LowOrderKey);
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

fn random_secret<R: CryptoRngCore + ?Sized>(rng: &mut R) -> ([u8; 32], [u8; 32]) {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(bytes.as_mut());
    let secret = StaticSecret::from(*bytes);
    (secret.to_bytes(), PublicKey::from(&secret).to_bytes())
}

impl RatchetState {
    /// The initiator's state after X3DH: `sk` is the shared secret, `their_ratchet_key` the
    /// responder's signed prekey (its first ratchet key), `ad` the X3DH associated data.
    ///
    /// Takes the first sending step at once: `DHs = new key pair`,
    /// `(RK, CKs) = KDF_RK(sk, DH(DHs, their_ratchet_key))`.
    pub fn new_initiator<R: CryptoRngCore + ?Sized>(
        sk: &[u8; 32],
        their_ratchet_key: [u8; 32],
        ad: [u8; ASSOCIATED_DATA_LEN],
        rng: &mut R,
    ) -> Result<Self, RatchetError> {
        let (dhs_secret, dhs_public) = random_secret(rng);
        let shared = dh(&dhs_secret, &their_ratchet_key)?;
        let (rk, cks) = kdf_rk(sk, &shared);
        Ok(Self {
            ad,
            dhs_secret,
            dhs_public,
            dhr: Some(their_ratchet_key),
            rk: *rk,
            cks: Some(*cks),
            ckr: None,
            ns: 0,
            nr: 0,
            pn: 0,
            step: 0,
            previous_dhr: Vec::new(),
            skipped: Vec::new(),
        })
    }

    /// The responder's state after X3DH: its ratchet key pair is the signed prekey it was
    /// contacted on; `RK = sk`. It can send only after it has decrypted the first message.
    pub fn new_responder(
        sk: &[u8; 32],
        signed_prekey: &StaticSecret,
        ad: [u8; ASSOCIATED_DATA_LEN],
    ) -> Self {
        Self {
            ad,
            dhs_secret: signed_prekey.to_bytes(),
            dhs_public: PublicKey::from(signed_prekey).to_bytes(),
            dhr: None,
            rk: *sk,
            cks: None,
            ckr: None,
            ns: 0,
            nr: 0,
            pn: 0,
            step: 0,
            previous_dhr: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// The associated data this session binds (X3DH: prefix, initiator, responder).
    pub fn associated_data(&self) -> &[u8; ASSOCIATED_DATA_LEN] {
        &self.ad
    }

    /// This side's current ratchet public key.
    pub fn sending_ratchet_key(&self) -> [u8; 32] {
        self.dhs_public
    }

    /// Whether this side has received at least one message of the session.
    pub fn has_received(&self) -> bool {
        self.ckr.is_some()
    }

    /// Whether `key` is a ratchet key this state has received on (current or remembered chain,
    /// or a chain it still holds skipped keys of): a message carrying it belongs here.
    pub fn knows_ratchet_key(&self, key: &[u8; 32]) -> bool {
        self.dhr.as_ref() == Some(key)
            || self.previous_dhr.contains(key)
            || self.skipped.iter().any(|k| &k.dh == key)
    }

    /// Skipped message keys currently stored.
    pub fn skipped_keys(&self) -> usize {
        self.skipped.len()
    }

    /// Encrypt `plaintext` as the next message of the sending chain, taking the sending half of
    /// a DH ratchet step first if a new ratchet key was received since the last send.
    pub fn encrypt<R: CryptoRngCore + ?Sized>(
        &mut self,
        plaintext: &[u8],
        rng: &mut R,
    ) -> Result<RatchetMessage, RatchetError> {
        if plaintext.len() > MAX_PLAINTEXT_BYTES {
            return Err(RatchetError::PlaintextTooLarge {
                len: plaintext.len(),
            });
        }
        if self.ns == u32::MAX {
            return Err(RatchetError::CounterExhausted);
        }
        let cks = match self.cks {
            Some(ck) => Zeroizing::new(ck),
            None => {
                let dhr = self.dhr.ok_or(RatchetError::NoSendingChain)?;
                let (secret, public) = random_secret(rng);
                let shared = dh(&secret, &dhr)?;
                let (rk, ck) = kdf_rk(&self.rk, &shared);
                self.dhs_secret = secret;
                self.dhs_public = public;
                self.rk = *rk;
                ck
            }
        };
        let (next, mk) = kdf_ck(&cks);
        let header = RatchetHeader {
            dh: self.dhs_public,
            pn: self.pn,
            n: self.ns,
        };
        let aad = self.aad(&header)?;
        let (cipher, nonce) = message_cipher(&mk);
        let ciphertext = cipher
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| RatchetError::PlaintextTooLarge {
                len: plaintext.len(),
            })?;
        self.cks = Some(*next);
        self.ns += 1;
        Ok(RatchetMessage { header, ciphertext })
    }

    fn aad(&self, header: &RatchetHeader) -> Result<Vec<u8>, RatchetError> {
        let mut aad = Vec::with_capacity(ASSOCIATED_DATA_LEN + HEADER_BYTES);
        aad.extend_from_slice(&self.ad);
        aad.extend_from_slice(&header.to_wire()?);
        Ok(aad)
    }

    /// Drop skipped keys that have expired at `now` and evict the oldest beyond
    /// [`MAX_STORED_SKIPPED`] (decryption does this as it commits). Dropped keys are wiped.
    pub fn expire_skipped(&mut self, now: u64) {
        let step = self.step;
        self.skipped.retain(|k| !is_expired(k, now, step));
        if self.skipped.len() > MAX_STORED_SKIPPED {
            let excess = self.skipped.len() - MAX_STORED_SKIPPED;
            self.skipped.drain(..excess);
        }
    }

    /// Decrypt `message` received at `now` (unix seconds). On success the state advances; on any
    /// error it is exactly as before.
    pub fn decrypt(&mut self, message: &RatchetMessage, now: u64) -> Result<Vec<u8>, RatchetError> {
        let header = message.header;
        let aad = self.aad(&header)?;

        // 1. A key we skipped earlier.
        if let Some(i) = self
            .skipped
            .iter()
            .position(|k| k.dh == header.dh && k.n == header.n)
        {
            if is_expired(&self.skipped[i], now, self.step) {
                return Err(RatchetError::SkippedKeyExpired { n: header.n });
            }
            let plaintext = open(&self.skipped[i].mk, &message.ciphertext, &aad)?;
            self.skipped.remove(i);
            self.expire_skipped(now);
            return Ok(plaintext);
        }

        // 2. Compute the new receiving chain on the side.
        let mut new_skipped: Vec<SkippedKey> = Vec::new();
        let mut ckr = self.ckr.map(Zeroizing::new);
        let mut nr = self.nr;
        let mut step = self.step;
        let mut ratchet: Option<(Zeroizing<[u8; 32]>, u32)> = None; // (new root key, new pn)
        if Some(header.dh) != self.dhr {
            if self.previous_dhr.contains(&header.dh) {
                return Err(RatchetError::Duplicate { n: header.n });
            }
            if let (Some(ck), Some(dhr)) = (ckr.as_ref(), self.dhr) {
                skip(ck, nr, header.pn, dhr, step, &mut new_skipped)?;
            }
            let shared = dh(&self.dhs_secret, &header.dh)?;
            let (rk, ck) = kdf_rk(&self.rk, &shared);
            ckr = Some(ck);
            nr = 0;
            step += 1;
            // The sending chain being closed is the current one if we sent since the last step;
            // otherwise it was already closed and its length already recorded in `pn`.
            let pn = if self.cks.is_some() { self.ns } else { self.pn };
            ratchet = Some((rk, pn));
        }
        if header.n < nr {
            return Err(RatchetError::Duplicate { n: header.n });
        }
        let ck = ckr.ok_or(RatchetError::Tampered)?;
        let ck = skip(&ck, nr, header.n, header.dh, step, &mut new_skipped)?;
        let (next, mk) = kdf_ck(&ck);
        let plaintext = open(&mk, &message.ciphertext, &aad)?;

        // 3. Authentic: commit.
        if let Some((rk, pn)) = ratchet {
            if let Some(old) = self.dhr.replace(header.dh) {
                self.previous_dhr.push(old);
                if self.previous_dhr.len() > MAX_PREVIOUS_RECEIVING_KEYS {
                    self.previous_dhr.remove(0);
                }
            }
            self.rk = *rk;
            self.pn = pn;
            self.ns = 0;
            self.cks.zeroize();
            self.cks = None;
            self.step = step;
        }
        self.ckr = Some(*next);
        self.nr = header.n.saturating_add(1);
        for key in &mut new_skipped {
            key.stored_at = now;
        }
        self.skipped.append(&mut new_skipped);
        self.expire_skipped(now);
        Ok(plaintext)
    }
}

fn is_expired(key: &SkippedKey, now: u64, step: u64) -> bool {
    now.saturating_sub(key.stored_at) > SKIPPED_KEY_MAX_AGE_SECS
        || step.saturating_sub(key.step) >= SKIPPED_KEY_MAX_STEPS
}

/// Advance chain key `ck` from message `from` to `until`, storing the skipped keys; returns the
/// chain key for message `until`.
fn skip(
    ck: &[u8; 32],
    from: u32,
    until: u32,
    dh: [u8; 32],
    step: u64,
    out: &mut Vec<SkippedKey>,
) -> Result<Zeroizing<[u8; 32]>, RatchetError> {
    let mut ck = Zeroizing::new(*ck);
    if until <= from {
        return Ok(ck);
    }
    let requested = u64::from(until - from);
    if requested > u64::from(MAX_SKIP) {
        return Err(RatchetError::TooManySkipped { requested });
    }
    for n in from..until {
        let (next, mk) = kdf_ck(&ck);
        out.push(SkippedKey {
            dh,
            n,
            mk: *mk,
            stored_at: 0,
            step,
        });
        ck = next;
    }
    Ok(ck)
}

fn open(mk: &[u8; 32], ciphertext: &[u8], aad: &[u8]) -> Result<Vec<u8>, RatchetError> {
    let (cipher, nonce) = message_cipher(mk);
    cipher
        .decrypt(
            (&nonce).into(),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| RatchetError::Tampered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::{RngCore, SeedableRng};

    const NOW: u64 = 1_700_000_000;

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    /// Alice (initiator) and Bob (responder) sharing a secret, as after X3DH.
    fn pair(seed: u64) -> (RatchetState, RatchetState, ChaCha20Rng) {
        let mut r = rng(seed);
        let mut sk = [0u8; 32];
        r.fill_bytes(&mut sk);
        let mut ad = [0u8; ASSOCIATED_DATA_LEN];
        r.fill_bytes(&mut ad);
        let spk = StaticSecret::random_from_rng(&mut r);
        let alice = RatchetState::new_initiator(&sk, PublicKey::from(&spk).to_bytes(), ad, &mut r)
            .expect("initiator");
        let bob = RatchetState::new_responder(&sk, &spk, ad);
        (alice, bob, r)
    }

    fn bytes(s: &RatchetState) -> Vec<u8> {
        s.to_wire().expect("state encodes")
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_conversation_both_ways_decrypts() {
        let (mut a, mut b, mut r) = pair(1);
        assert_eq!(
            b.encrypt(b"too early", &mut r),
            Err(RatchetError::NoSendingChain)
        );
        for round in 0..5u8 {
            for i in 0..3u8 {
                let m = a.encrypt(&[round, i, 0xa], &mut r).expect("a encrypts");
                assert_eq!(b.decrypt(&m, NOW).expect("b decrypts"), [round, i, 0xa]);
            }
            for i in 0..2u8 {
                let m = b.encrypt(&[round, i, 0xb], &mut r).expect("b encrypts");
                assert_eq!(a.decrypt(&m, NOW).expect("a decrypts"), [round, i, 0xb]);
            }
        }
        assert_eq!(a.skipped_keys() + b.skipped_keys(), 0);
    }

    #[test]
    fn every_round_trip_changes_the_ratchet_keys() {
        let (mut a, mut b, mut r) = pair(2);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..4 {
            let m = a.encrypt(b"x", &mut r).expect("enc");
            assert!(seen.insert(m.header.dh) || m.header.n > 0);
            b.decrypt(&m, NOW).expect("dec");
            let m = b.encrypt(b"y", &mut r).expect("enc");
            assert!(seen.insert(m.header.dh));
            a.decrypt(&m, NOW).expect("dec");
        }
        assert_eq!(seen.len(), 8);
    }

    #[test]
    fn out_of_order_within_and_across_chains() {
        let (mut a, mut b, mut r) = pair(3);
        let first: Vec<_> = (0..5u8)
            .map(|i| a.encrypt(&[i], &mut r).expect("enc"))
            .collect();
        // Bob gets message 3 first, replies; Alice's next chain starts.
        assert_eq!(b.decrypt(&first[3], NOW).expect("dec"), [3]);
        let reply = b.encrypt(b"r", &mut r).expect("enc");
        a.decrypt(&reply, NOW).expect("dec");
        let second = a.encrypt(b"second chain", &mut r).expect("enc");
        assert_eq!(second.header.pn, 5);
        // The new chain's message makes Bob skip the rest of the first chain (message 4).
        assert_eq!(b.decrypt(&second, NOW).expect("dec"), b"second chain");
        assert_eq!(b.skipped_keys(), 4); // 0, 1, 2 and 4
        for i in [4u8, 0, 2, 1] {
            assert_eq!(b.decrypt(&first[i as usize], NOW).expect("late"), [i]);
        }
        assert_eq!(b.skipped_keys(), 0);
    }

    #[test]
    fn a_failed_decryption_leaves_the_state_untouched() {
        let (mut a, mut b, mut r) = pair(4);
        let m0 = a.encrypt(b"zero", &mut r).expect("enc");
        let m1 = a.encrypt(b"one", &mut r).expect("enc");
        b.decrypt(&m1, NOW).expect("dec"); // stores the skipped key of m0
        let reply = b.encrypt(b"r", &mut r).expect("enc");
        a.decrypt(&reply, NOW).expect("dec");
        let m2 = a.encrypt(b"two", &mut r).expect("enc"); // new DH ratchet step
        let before = bytes(&b);

        let mut flipped = m2.clone();
        flipped.ciphertext[0] ^= 1;
        assert_eq!(b.decrypt(&flipped, NOW), Err(RatchetError::Tampered));
        let mut truncated = m2.clone();
        truncated
            .ciphertext
            .truncate(truncated.ciphertext.len() - 1);
        assert_eq!(b.decrypt(&truncated, NOW), Err(RatchetError::Tampered));
        let mut header = m2.clone();
        header.header.pn += 1;
        assert_eq!(b.decrypt(&header, NOW), Err(RatchetError::Tampered));
        let mut forged_key = m2.clone();
        forged_key.header.dh[5] ^= 0x40;
        assert_eq!(b.decrypt(&forged_key, NOW), Err(RatchetError::Tampered));
        let mut skipped = m0.clone();
        skipped.ciphertext[3] ^= 1;
        assert_eq!(b.decrypt(&skipped, NOW), Err(RatchetError::Tampered));
        let mut low_order = m2.clone();
        low_order.header.dh = [0; 32];
        assert_eq!(b.decrypt(&low_order, NOW), Err(RatchetError::LowOrderKey));
        let mut far = m2.clone();
        far.header.n = MAX_SKIP + 1;
        assert_eq!(
            b.decrypt(&far, NOW),
            Err(RatchetError::TooManySkipped {
                requested: u64::from(MAX_SKIP) + 1
            })
        );
        assert_eq!(bytes(&b), before, "state changed by a failed decryption");

        assert_eq!(b.decrypt(&m2, NOW).expect("genuine"), b"two");
        assert_eq!(b.decrypt(&m0, NOW).expect("genuine late"), b"zero");
    }

    #[test]
    fn replays_are_duplicates_on_current_and_old_chains() {
        let (mut a, mut b, mut r) = pair(5);
        let m0 = a.encrypt(b"0", &mut r).expect("enc");
        b.decrypt(&m0, NOW).expect("dec");
        assert_eq!(b.decrypt(&m0, NOW), Err(RatchetError::Duplicate { n: 0 }));
        let m1 = a.encrypt(b"1", &mut r).expect("enc");
        let m2 = a.encrypt(b"2", &mut r).expect("enc");
        b.decrypt(&m2, NOW).expect("dec");
        b.decrypt(&m1, NOW).expect("late dec");
        assert_eq!(b.decrypt(&m1, NOW), Err(RatchetError::Duplicate { n: 1 }));
        // After a round trip m0 lives on an old chain.
        let reply = b.encrypt(b"r", &mut r).expect("enc");
        a.decrypt(&reply, NOW).expect("dec");
        let m3 = a.encrypt(b"3", &mut r).expect("enc");
        b.decrypt(&m3, NOW).expect("dec");
        assert_eq!(b.decrypt(&m0, NOW), Err(RatchetError::Duplicate { n: 0 }));
        assert_eq!(
            a.decrypt(&reply, NOW),
            Err(RatchetError::Duplicate { n: 0 })
        );
    }

    #[test]
    fn the_skip_cap_is_exact() {
        let (mut a, mut b, mut r) = pair(6);
        let msgs: Vec<_> = (0..=MAX_SKIP + 1)
            .map(|i| a.encrypt(&i.to_le_bytes(), &mut r).expect("enc"))
            .collect();
        let mut b2 = b.clone();
        // Message MAX_SKIP + 1 skips MAX_SKIP + 1 keys: refused.
        assert!(matches!(
            b.decrypt(&msgs[MAX_SKIP as usize + 1], NOW),
            Err(RatchetError::TooManySkipped { .. })
        ));
        // Message MAX_SKIP skips exactly MAX_SKIP keys: accepted, and every skipped one still reads.
        b2.decrypt(&msgs[MAX_SKIP as usize], NOW)
            .expect("at the cap");
        assert_eq!(b2.skipped_keys(), MAX_SKIP as usize);
        b2.decrypt(&msgs[MAX_SKIP as usize + 1], NOW).expect("next");
        for m in msgs.iter().take(MAX_SKIP as usize).rev() {
            b2.decrypt(m, NOW).expect("late message within the cap");
        }
        assert_eq!(b2.skipped_keys(), 0);
    }

    #[test]
    fn stored_skipped_keys_are_capped_oldest_first() {
        let (mut a, mut b, mut r) = pair(7);
        // Three chains of MAX_SKIP + 1 messages each; Bob sees only the last of each.
        let mut chains = Vec::new();
        for _ in 0..3 {
            let msgs: Vec<_> = (0..=MAX_SKIP)
                .map(|_| a.encrypt(b"m", &mut r).expect("enc"))
                .collect();
            b.decrypt(msgs.last().expect("non-empty"), NOW)
                .expect("dec");
            let reply = b.encrypt(b"r", &mut r).expect("enc");
            a.decrypt(&reply, NOW).expect("dec");
            chains.push(msgs);
        }
        assert_eq!(b.skipped_keys(), MAX_STORED_SKIPPED);
        // The first chain was evicted, the second and third are kept.
        assert_eq!(
            b.decrypt(&chains[0][0], NOW),
            Err(RatchetError::Duplicate { n: 0 })
        );
        assert_eq!(
            b.decrypt(&chains[0][MAX_SKIP as usize - 1], NOW),
            Err(RatchetError::Duplicate { n: MAX_SKIP - 1 })
        );
        b.decrypt(&chains[1][0], NOW).expect("kept");
        b.decrypt(&chains[2][7], NOW).expect("kept");
        assert!(b.to_wire().expect("fits").len() <= MAX_RATCHET_STATE_BYTES);
    }

    #[test]
    fn skipped_keys_expire_with_time() {
        let (mut a, mut b, mut r) = pair(8);
        let m0 = a.encrypt(b"0", &mut r).expect("enc");
        let m1 = a.encrypt(b"1", &mut r).expect("enc");
        let m2 = a.encrypt(b"2", &mut r).expect("enc");
        b.decrypt(&m2, NOW).expect("dec");
        assert_eq!(
            b.decrypt(&m0, NOW + SKIPPED_KEY_MAX_AGE_SECS)
                .expect("in time"),
            b"0"
        );
        let late = NOW + SKIPPED_KEY_MAX_AGE_SECS + 1;
        assert_eq!(
            b.decrypt(&m1, late),
            Err(RatchetError::SkippedKeyExpired { n: 1 })
        );
        b.expire_skipped(late);
        assert_eq!(b.skipped_keys(), 0);
        assert_eq!(b.decrypt(&m1, late), Err(RatchetError::Duplicate { n: 1 }));
    }

    #[test]
    fn skipped_keys_expire_after_enough_ratchet_steps() {
        let (mut a, mut b, mut r) = pair(9);
        let lost = a.encrypt(b"lost", &mut r).expect("enc");
        let kept_back = a.encrypt(b"kept back", &mut r).expect("enc");
        let m = a.encrypt(b"x", &mut r).expect("enc");
        b.decrypt(&m, NOW).expect("dec");
        for step in 0..SKIPPED_KEY_MAX_STEPS {
            let reply = b.encrypt(b"r", &mut r).expect("enc");
            a.decrypt(&reply, NOW).expect("dec");
            let m = a.encrypt(b"x", &mut r).expect("enc");
            b.decrypt(&m, NOW).expect("dec");
            if step == SKIPPED_KEY_MAX_STEPS - 2 {
                assert_eq!(
                    b.decrypt(&kept_back, NOW).expect("still kept"),
                    b"kept back"
                );
            }
        }
        assert_eq!(b.skipped_keys(), 0);
        assert_eq!(b.decrypt(&lost, NOW), Err(RatchetError::Duplicate { n: 0 }));
    }

    #[test]
    fn received_message_keys_and_old_chain_keys_are_erased() {
        let (mut a, mut b, mut r) = pair(10);
        let m0 = a.encrypt(b"secret", &mut r).expect("enc");
        b.decrypt(&m0, NOW).expect("dec");
        let m1 = a.encrypt(b"more", &mut r).expect("enc");
        let ckr = b.ckr.expect("receiving chain");
        let (_, mk) = kdf_ck(&ckr);
        b.decrypt(&m1, NOW).expect("dec");
        let after = bytes(&b);
        assert!(!contains(&after, &ckr), "old chain key kept");
        assert!(!contains(&after, mk.as_ref()), "used message key kept");
        // Sending side: the chain key used for a message is gone after sending it.
        let cks = a.cks.expect("sending chain");
        a.encrypt(b"next", &mut r).expect("enc");
        assert!(!contains(&bytes(&a), &cks));
    }

    #[test]
    fn state_resumes_from_its_wire_form() {
        let (mut a, mut b, mut r) = pair(11);
        let early = a.encrypt(b"early", &mut r).expect("enc");
        let m = a.encrypt(b"hello", &mut r).expect("enc");
        b.decrypt(&m, NOW).expect("dec");
        let mut b = RatchetState::from_wire(&bytes(&b)).expect("decodes");
        let mut a = RatchetState::from_wire(&bytes(&a)).expect("decodes");
        let reply = b.encrypt(b"reply", &mut r).expect("enc");
        assert_eq!(a.decrypt(&reply, NOW).expect("dec"), b"reply");
        assert_eq!(
            b.decrypt(&early, NOW).expect("skipped key survived"),
            b"early"
        );
        let dbg = format!("{b:?}");
        assert!(!dbg.contains(&format!("{:?}", b.rk)));
    }

    #[test]
    fn oversized_plaintext_is_refused_and_the_largest_fits() {
        let (mut a, mut b, mut r) = pair(12);
        assert_eq!(
            a.encrypt(&vec![0; MAX_PLAINTEXT_BYTES + 1], &mut r),
            Err(RatchetError::PlaintextTooLarge {
                len: MAX_PLAINTEXT_BYTES + 1
            })
        );
        let m = a
            .encrypt(&vec![7; MAX_PLAINTEXT_BYTES], &mut r)
            .expect("largest");
        let wire = m.to_wire().expect("fits");
        assert_eq!(wire.len(), MAX_RATCHET_MESSAGE_BYTES);
        let back = RatchetMessage::from_wire(&wire).expect("decodes");
        assert_eq!(
            b.decrypt(&back, NOW).expect("dec").len(),
            MAX_PLAINTEXT_BYTES
        );
    }

    #[test]
    fn header_encoding_is_byte_exact() {
        let h = RatchetHeader {
            dh: [0xab; 32],
            pn: 0x0102_0304,
            n: 5,
        };
        let mut expect = vec![1u8];
        expect.extend_from_slice(&[0xab; 32]);
        expect.extend_from_slice(&[4, 3, 2, 1, 5, 0, 0, 0]);
        assert_eq!(h.to_wire().expect("enc"), expect);
    }

    #[test]
    fn kdfs_match_their_definitions() {
        // KDF_CK against a direct HMAC computation.
        let ck = [9u8; 32];
        let (next, mk) = kdf_ck(&ck);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&ck).expect("key");
        mac.update(&[0x02]);
        assert_eq!(next.as_slice(), mac.finalize().into_bytes().as_slice());
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&ck).expect("key");
        mac.update(&[0x01]);
        assert_eq!(mk.as_slice(), mac.finalize().into_bytes().as_slice());
        // KDF_RK against a direct HKDF computation.
        let (root, chain) = kdf_rk(&[1; 32], &[2; 32]);
        let mut okm = [0u8; 64];
        Hkdf::<Sha256>::new(Some(&[1; 32]), &[2; 32])
            .expand(b"meshchat/ratchet/root/v1", &mut okm)
            .expect("hkdf");
        assert_eq!(root.as_slice(), &okm[..32]);
        assert_eq!(chain.as_slice(), &okm[32..]);
    }

    fn arb_header() -> impl Strategy<Value = RatchetHeader> {
        (any::<[u8; 32]>(), any::<u32>(), any::<u32>()).prop_map(|(dh, pn, n)| RatchetHeader {
            dh,
            pn,
            n,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn headers_and_messages_round_trip(
            header in arb_header(),
            ciphertext in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let bytes = header.to_wire().expect("enc");
            prop_assert_eq!(bytes.len(), HEADER_BYTES);
            prop_assert_eq!(RatchetHeader::from_wire(&bytes), Ok(header));
            let m = RatchetMessage { header, ciphertext };
            let bytes = m.to_wire().expect("enc");
            prop_assert_eq!(RatchetMessage::from_wire(&bytes), Ok(m));
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = RatchetHeader::from_wire(&bytes);
            let _ = RatchetMessage::from_wire(&bytes);
            let _ = RatchetState::from_wire(&bytes);
        }

        #[test]
        fn arbitrary_messages_never_panic_or_change_the_state(
            header in arb_header(),
            ciphertext in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let (mut a, mut b, mut r) = pair(13);
            let m = a.encrypt(b"hi", &mut r).expect("enc");
            b.decrypt(&m, NOW).expect("dec");
            let before = bytes(&b);
            let forged = RatchetMessage { header, ciphertext };
            let result = b.decrypt(&forged, NOW);
            prop_assert!(result.is_err());
            prop_assert_eq!(bytes(&b), before);
        }

        #[test]
        fn any_delivery_order_within_the_cap_reads_every_message_once(
            order in Just((0..40usize).collect::<Vec<_>>()).prop_shuffle(),
            replies_after in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let (mut a, mut b, mut r) = pair(14);
            // Alice sends 40 messages in 4 chains (a reply from Bob between chains).
            let mut sent = Vec::new();
            for i in 0..40u8 {
                sent.push((i, a.encrypt(&[i], &mut r).expect("enc")));
                if i % 10 == 9 {
                    // Bob can reply only once he has read something of the current chain.
                    b.decrypt(&sent[i as usize].1, NOW).expect("dec");
                    let reply = b.encrypt(b"r", &mut r).expect("enc");
                    a.decrypt(&reply, NOW).expect("dec");
                }
            }
            let mut got = [false; 40];
            for (k, &i) in order.iter().enumerate() {
                let (want, m) = &sent[i];
                match b.decrypt(m, NOW) {
                    Ok(p) => { prop_assert_eq!(&p, &[*want]); got[i] = true; }
                    Err(RatchetError::Duplicate { .. }) => prop_assert!(i % 10 == 9, "only pre-read messages are duplicates"),
                    Err(e) => prop_assert!(false, "{e}"),
                }
                if replies_after[k] {
                    let reply = b.encrypt(b"r", &mut r);
                    if let Ok(reply) = reply { a.decrypt(&reply, NOW).expect("dec"); }
                }
            }
            for (i, g) in got.iter().enumerate() {
                prop_assert!(*g || i % 10 == 9);
            }
        }
    }
}
