//! Identities: the long-term Ed25519 key of a user, its text form, its recovery phrase and the
//! safety number two users compare out of band. See `docs/protocol.md`, section "Identity".
//!
//! - An [`Identity`] is 256 bits of entropy, used as an Ed25519 seed. All verification uses
//!   `verify_strict` (no malleable or small-order signatures).
//! - A [`UserId`] is the public key in bech32m with the human prefix `mc` (`mc1…`, 61 characters):
//!   its checksum catches any mistyped or swapped character, so a typo is rejected, not sent to a
//!   stranger.
//! - The 24-word BIP-39 recovery phrase encodes the seed itself: the phrase is the identity.
//! - A [`SafetyNumber`] is 60 digits that both sides of a conversation compute identically.
//! - Diffie-Hellman with identity keys (X3DH, sealing, pair secrets) uses the birationally
//!   equivalent X25519 keys (as libsodium's `crypto_sign_ed25519_*_to_curve25519`).

use std::{fmt, str::FromStr};

use bech32::{primitives::decode::CheckedHrpstring, Bech32m, Hrp};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};
use zeroize::Zeroizing;

/// The human-readable prefix of a user ID.
pub const USER_ID_HRP: &str = "mc";
/// The length of a user ID in characters.
pub const USER_ID_LEN: usize = 61;
/// Words in a recovery phrase.
pub const RECOVERY_WORDS: usize = 24;

/// What can be wrong with a user ID, a key or a recovery phrase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The text is not a valid bech32m string (bad character, bad checksum, mixed case…).
    #[error("not a valid user ID (a meshchat user ID starts with `mc1` and is 61 characters; check for a typo): {reason}")]
    BadUserId {
        /// What the decoder found.
        reason: String,
    },
    /// The checksum is fine but the prefix is not `mc`.
    #[error("not a meshchat user ID: prefix `{found}`, expected `{USER_ID_HRP}`")]
    WrongPrefix {
        /// The prefix found.
        found: String,
    },
    /// The decoded payload is not 32 bytes.
    #[error("user ID holds {found} bytes, expected 32")]
    WrongLength {
        /// Bytes found.
        found: usize,
    },
    /// The 32 bytes are not a usable Ed25519 public key.
    #[error("not a valid public key")]
    BadKey,
    /// A word of the recovery phrase is not in the BIP-39 English list.
    #[error("recovery phrase: word {position} (`{word}`) is not a BIP-39 English word")]
    UnknownWord {
        /// 1-based position of the word.
        position: usize,
        /// The word.
        word: String,
    },
    /// Not 24 words.
    #[error("recovery phrase: {found} words, expected {RECOVERY_WORDS}")]
    WordCount {
        /// Words found.
        found: usize,
    },
    /// All words known but the checksum fails: a word is wrong or two are swapped.
    #[error("recovery phrase: checksum mismatch (a word is wrong or out of order)")]
    PhraseChecksum,
}

/// A signature did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("signature does not verify")]
pub struct BadSignature;

/// Prefix every signed message with a domain so a signature for one purpose is never valid for
/// another.
fn signed_message(domain: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + msg.len() + 10);
    m.extend_from_slice(b"meshchat/");
    m.extend_from_slice(domain);
    m.push(0);
    m.extend_from_slice(msg);
    m
}

/// A user's secret identity key.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    /// The X25519 forms of the key, derived once: every envelope opened and every pair secret
    /// needs them, and deriving them costs a SHA-512 and a point conversion each time.
    x25519_secret: x25519_dalek::StaticSecret,
    x25519_public: x25519_dalek::PublicKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A new identity from 256 bits of the given randomness.
    pub fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Self::from_seed(&seed)
    }

    /// The identity whose Ed25519 seed is `seed`.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(seed);
        let x25519_secret = x25519_dalek::StaticSecret::from(signing.to_scalar_bytes());
        let x25519_public =
            x25519_dalek::PublicKey::from(signing.verifying_key().to_montgomery().to_bytes());
        Self {
            signing,
            x25519_secret,
            x25519_public,
        }
    }

    /// The 32-byte seed (secret).
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The 24-word BIP-39 (English) phrase that encodes the seed.
    pub fn recovery_phrase(&self) -> Zeroizing<String> {
        let m = bip39::Mnemonic::from_entropy(self.seed().as_ref())
            .expect("invariant: 32 bytes is a valid BIP-39 entropy length");
        Zeroizing::new(m.to_string())
    }

    /// Restore the identity from its recovery phrase (case and surrounding space are ignored).
    pub fn from_recovery_phrase(phrase: &str) -> Result<Self, IdentityError> {
        let normalized = phrase.trim().to_lowercase();
        let words: Vec<&str> = normalized.split_whitespace().collect();
        if words.len() != RECOVERY_WORDS {
            return Err(IdentityError::WordCount { found: words.len() });
        }
        let joined = Zeroizing::new(words.join(" "));
        let m = bip39::Mnemonic::parse_in_normalized(bip39::Language::English, &joined).map_err(
            |e| match e {
                bip39::Error::UnknownWord(i) => IdentityError::UnknownWord {
                    position: i + 1,
                    word: words.get(i).map(|w| (*w).to_owned()).unwrap_or_default(),
                },
                bip39::Error::BadWordCount(n) => IdentityError::WordCount { found: n },
                _ => IdentityError::PhraseChecksum,
            },
        )?;
        let entropy = Zeroizing::new(m.to_entropy());
        let seed: [u8; 32] =
            entropy
                .as_slice()
                .try_into()
                .map_err(|_| IdentityError::WordCount {
                    found: m.word_count(),
                })?;
        let seed = Zeroizing::new(seed);
        Ok(Self::from_seed(&seed))
    }

    /// The public half.
    pub fn public(&self) -> PublicIdentity {
        PublicIdentity {
            key: self.signing.verifying_key(),
        }
    }

    /// The text user ID of this identity.
    pub fn user_id(&self) -> UserId {
        self.public().user_id()
    }

    /// Sign `msg` for the purpose `domain` (see `docs/protocol.md`, "Signatures").
    pub fn sign(&self, domain: &[u8], msg: &[u8]) -> [u8; 64] {
        self.signing.sign(&signed_message(domain, msg)).to_bytes()
    }

    /// The X25519 secret equivalent to this Ed25519 key, for Diffie-Hellman.
    pub fn x25519_secret(&self) -> x25519_dalek::StaticSecret {
        self.x25519_secret.clone()
    }

    /// The X25519 public key equivalent to this Ed25519 key (the same as
    /// `self.public().x25519_public()`, without converting again).
    pub fn x25519_public(&self) -> x25519_dalek::PublicKey {
        self.x25519_public
    }
}

/// A user's public identity key: validated, so holding one means it is a usable Ed25519 key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicIdentity {
    key: VerifyingKey,
}

impl PartialOrd for PublicIdentity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for PublicIdentity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicIdentity({})", self.user_id())
    }
}

impl PublicIdentity {
    /// Validate 32 bytes as a public identity key: a canonical point that is not of small order.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, IdentityError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| IdentityError::BadKey)?;
        if key.is_weak() {
            return Err(IdentityError::BadKey);
        }
        Ok(Self { key })
    }

    /// The 32 bytes of the key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.key.as_bytes()
    }

    /// Check a signature made by [`Identity::sign`] for `domain` (strict verification).
    pub fn verify(&self, domain: &[u8], msg: &[u8], sig: &[u8; 64]) -> Result<(), BadSignature> {
        let sig = Signature::from_bytes(sig);
        self.key
            .verify_strict(&signed_message(domain, msg), &sig)
            .map_err(|_| BadSignature)
    }

    /// The X25519 public key equivalent to this Ed25519 key.
    pub fn x25519_public(&self) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(self.key.to_montgomery().to_bytes())
    }

    /// The text form.
    pub fn user_id(&self) -> UserId {
        let hrp = Hrp::parse(USER_ID_HRP).expect("invariant: constant HRP is valid");
        let text = bech32::encode::<Bech32m>(hrp, self.as_bytes())
            .expect("invariant: 32 bytes fit in a bech32m string");
        UserId { text, key: *self }
    }
}

impl Serialize for PublicIdentity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.as_bytes().serialize(s)
    }
}

impl<'de> Deserialize<'de> for PublicIdentity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = <[u8; 32]>::deserialize(d)?;
        Self::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

/// A user ID in text: `mc1` followed by 58 bech32m characters.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct UserId {
    text: String,
    key: PublicIdentity,
}

impl UserId {
    /// The identity this ID names.
    pub fn public(&self) -> PublicIdentity {
        self.key
    }

    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({})", self.text)
    }
}

impl FromStr for UserId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let checked =
            CheckedHrpstring::new::<Bech32m>(s).map_err(|e| IdentityError::BadUserId {
                reason: e.to_string(),
            })?;
        let hrp = checked.hrp();
        if !hrp.as_str().eq_ignore_ascii_case(USER_ID_HRP) {
            return Err(IdentityError::WrongPrefix {
                found: hrp.to_string(),
            });
        }
        let data: Vec<u8> = checked.byte_iter().collect();
        let bytes: [u8; 32] = data
            .as_slice()
            .try_into()
            .map_err(|_| IdentityError::WrongLength { found: data.len() })?;
        let key = PublicIdentity::from_bytes(&bytes)?;
        Ok(key.user_id())
    }
}

/// Sixty digits that two users compare to verify each other (order-independent).
#[derive(Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    digits: String,
}

/// Iterations of SHA-512 per fingerprint half (as Signal's numeric fingerprints).
const FINGERPRINT_ITERATIONS: usize = 5200;

fn fingerprint_half(id: &PublicIdentity) -> String {
    let mut hash = {
        let mut h = Sha512::new();
        h.update([0u8, 0]); // fingerprint version 0
        h.update(id.as_bytes());
        h.update(id.as_bytes());
        h.finalize()
    };
    for _ in 1..FINGERPRINT_ITERATIONS {
        let mut h = Sha512::new();
        h.update(hash);
        h.update(id.as_bytes());
        hash = h.finalize();
    }
    let mut out = String::with_capacity(30);
    for chunk in hash[..30].chunks_exact(5) {
        let mut v: u64 = 0;
        for b in chunk {
            v = (v << 8) | u64::from(*b);
        }
        out.push_str(&format!("{:05}", v % 100_000));
    }
    out
}

impl SafetyNumber {
    /// The safety number of the pair `a`, `b`; `compute(a, b) == compute(b, a)`.
    pub fn compute(a: &PublicIdentity, b: &PublicIdentity) -> Self {
        let (x, y) = (fingerprint_half(a), fingerprint_half(b));
        let digits = if x <= y { x + &y } else { y + &x };
        Self { digits }
    }

    /// The 60 digits without spaces.
    pub fn digits(&self) -> &str {
        &self.digits
    }
}

impl fmt::Display for SafetyNumber {
    /// Twelve groups of five digits, as people read them aloud.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups: Vec<&str> = (0..12).map(|i| &self.digits[i * 5..i * 5 + 5]).collect();
        f.write_str(&groups.join(" "))
    }
}

impl fmt::Debug for SafetyNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SafetyNumber({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u8) -> Identity {
        Identity::from_seed(&[n; 32])
    }

    #[test]
    fn user_id_round_trips_and_has_the_stated_form() {
        let a = id(1);
        let uid = a.user_id();
        assert!(uid.as_str().starts_with("mc1"));
        assert_eq!(uid.as_str().len(), USER_ID_LEN);
        let parsed: UserId = uid.as_str().parse().expect("parses");
        assert_eq!(parsed.public(), a.public());
        // Upper case is the same ID.
        let upper: UserId = uid.as_str().to_uppercase().parse().expect("parses");
        assert_eq!(upper.public(), a.public());
    }

    #[test]
    fn every_single_character_typo_is_caught() {
        let uid = id(2).user_id().to_string();
        let alphabet = "qpzry9x8gf2tvdw0s3jn54khce6mua7l";
        for pos in 3..uid.len() {
            for c in alphabet.chars() {
                let mut typo: Vec<char> = uid.chars().collect();
                if typo[pos] == c {
                    continue;
                }
                typo[pos] = c;
                let typo: String = typo.into_iter().collect();
                assert!(typo.parse::<UserId>().is_err(), "typo accepted: {typo}");
            }
        }
    }

    #[test]
    fn swapped_neighbours_wrong_prefix_and_truncation_are_caught() {
        let uid = id(3).user_id().to_string();
        let mut chars: Vec<char> = uid.chars().collect();
        let i = chars.iter().skip(10).position(|_| true).expect("long") + 10;
        if chars[i] != chars[i + 1] {
            chars.swap(i, i + 1);
            let swapped: String = chars.into_iter().collect();
            assert!(swapped.parse::<UserId>().is_err());
        }
        assert!(uid[..uid.len() - 1].parse::<UserId>().is_err());
        let hrp = Hrp::parse("xx").expect("hrp");
        let other = bech32::encode::<Bech32m>(hrp, id(3).public().as_bytes()).expect("enc");
        assert!(matches!(
            other.parse::<UserId>(),
            Err(IdentityError::WrongPrefix { .. })
        ));
        // Bech32 (not m) with the right prefix is refused too.
        let hrp = Hrp::parse(USER_ID_HRP).expect("hrp");
        let old = bech32::encode::<bech32::Bech32>(hrp, id(3).public().as_bytes()).expect("enc");
        assert!(old.parse::<UserId>().is_err());
    }

    #[test]
    fn recovery_phrase_restores_the_same_identity() {
        let a = Identity::generate(&mut rand_core::OsRng);
        let phrase = a.recovery_phrase();
        assert_eq!(phrase.split(' ').count(), RECOVERY_WORDS);
        let b = Identity::from_recovery_phrase(&format!("  {}\n", phrase.to_uppercase()))
            .expect("restores");
        assert_eq!(a.public(), b.public());
    }

    #[test]
    fn wrong_recovery_words_are_caught() {
        let phrase = id(4).recovery_phrase();
        let words: Vec<&str> = phrase.split(' ').collect();
        let mut unknown = words.clone();
        unknown[5] = "meshchat";
        assert_eq!(
            Identity::from_recovery_phrase(&unknown.join(" ")).map(|_| ()),
            Err(IdentityError::UnknownWord {
                position: 6,
                word: "meshchat".into()
            })
        );
        let mut wrong = words.clone();
        wrong[0] = if words[0] == "abandon" {
            "ability"
        } else {
            "abandon"
        };
        assert_eq!(
            Identity::from_recovery_phrase(&wrong.join(" ")).map(|_| ()),
            Err(IdentityError::PhraseChecksum)
        );
        assert_eq!(
            Identity::from_recovery_phrase(&words[..23].join(" ")).map(|_| ()),
            Err(IdentityError::WordCount { found: 23 })
        );
    }

    #[test]
    fn signatures_are_domain_separated_and_strict() {
        let a = id(5);
        let sig = a.sign(b"test", b"hello");
        assert!(a.public().verify(b"test", b"hello", &sig).is_ok());
        assert!(a.public().verify(b"other", b"hello", &sig).is_err());
        assert!(a.public().verify(b"test", b"hellO", &sig).is_err());
        assert!(id(6).public().verify(b"test", b"hello", &sig).is_err());
    }

    #[test]
    fn small_order_keys_are_rejected() {
        // The identity point (small order).
        let mut ident = [0u8; 32];
        ident[0] = 1;
        assert_eq!(
            PublicIdentity::from_bytes(&ident),
            Err(IdentityError::BadKey)
        );
    }

    #[test]
    fn x25519_conversion_agrees() {
        let (a, b) = (id(7), id(8));
        let ab = a
            .x25519_secret()
            .diffie_hellman(&b.public().x25519_public());
        let ba = b
            .x25519_secret()
            .diffie_hellman(&a.public().x25519_public());
        assert_eq!(ab.as_bytes(), ba.as_bytes());
        // The cached forms are the converted ones.
        assert_eq!(a.x25519_public(), a.public().x25519_public());
        assert_eq!(
            a.x25519_public(),
            x25519_dalek::PublicKey::from(&a.x25519_secret())
        );
        assert_ne!(a.x25519_public(), b.x25519_public());
    }

    #[test]
    fn safety_number_is_symmetric_and_distinct() {
        let (a, b, c) = (id(9).public(), id(10).public(), id(11).public());
        let ab = SafetyNumber::compute(&a, &b);
        assert_eq!(ab, SafetyNumber::compute(&b, &a));
        assert_ne!(ab, SafetyNumber::compute(&a, &c));
        assert_eq!(ab.digits().len(), 60);
        assert_eq!(ab.to_string().split(' ').count(), 12);
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics_the_user_id_parser(s in ".{0,100}") {
            let _ = s.parse::<UserId>();
        }

        #[test]
        fn arbitrary_phrases_never_panic(s in "([a-z]{3,8} ){0,30}") {
            let _ = Identity::from_recovery_phrase(&s);
        }

        #[test]
        fn ids_round_trip(seed in any::<[u8; 32]>()) {
            let a = Identity::from_seed(&seed);
            let back: UserId = a.user_id().to_string().parse().expect("parses");
            prop_assert_eq!(back.public(), a.public());
        }
    }
}
