//! Signed prekey bundles: what a user publishes in the DHT so that anyone can start an encrypted
//! session with them while they are offline. See `docs/protocol.md`, section "Prekey bundle".
//!
//! A [`PrekeyBundle`] holds an X25519 *signed prekey* and optional *one-time prekeys*, a version
//! and a validity window, all signed by the identity key (domain `"bundle"`). It arrives
//! unverified, as bytes anyone could have written; only [`PrekeyBundle::verify`] turns it into a
//! [`VerifiedBundle`], the only form the handshake accepts (the "unverified until checked" pattern
//! of arti's `tor-checkable`). Verification rejects a bad signature, an expired bundle, a bundle
//! created in the future (beyond [`MAX_CLOCK_SKEW_SECS`]), a validity window longer than
//! [`MAX_BUNDLE_VALIDITY_SECS`] (so a signed prekey must be rotated), more than
//! [`MAX_ONE_TIME_PREKEYS`] one-time prekeys, and duplicate prekey ids.
//!
//! The owner keeps the secret halves in [`PrekeySecrets`]: the current signed prekey, the
//! signed prekeys retired by rotation (kept for [`SIGNED_PREKEY_GRACE_SECS`] after their bundle
//! expired, so that messages sealed against an old bundle and held in a mailbox can still be
//! opened), and the unused one-time prekeys, each of which can be taken exactly once. Secrets are
//! zeroized on drop and never appear in `Debug` output.

use std::{collections::HashSet, fmt};

use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::identity::{Identity, PublicIdentity};

/// How long a signed prekey (and the bundle that carries it) is valid: 7 days.
pub const SIGNED_PREKEY_VALIDITY_SECS: u64 = 7 * 86_400;
/// The longest validity window a bundle may state (`expires_at - created_at`): 30 days.
/// [`PrekeyBundle::verify`] rejects longer windows, which forces signed-prekey rotation.
pub const MAX_BUNDLE_VALIDITY_SECS: u64 = 30 * 86_400;
/// How far in the future a bundle's `created_at` may lie (clocks disagree): 10 minutes.
pub const MAX_CLOCK_SKEW_SECS: u64 = 600;
/// The most one-time prekeys a bundle may carry.
pub const MAX_ONE_TIME_PREKEYS: usize = 100;
/// How many one-time prekeys [`PrekeySecrets::generate`] and [`PrekeySecrets::rotate`] keep
/// available.
pub const DEFAULT_ONE_TIME_PREKEYS: usize = 20;
/// A signed prekey is rotated this long before its bundle expires: 1 day.
pub const ROTATION_MARGIN_SECS: u64 = 86_400;
/// How long a retired signed prekey's secret is kept after its bundle expired: 31 days (the
/// longest envelope TTL, 30 days, plus a day), so mail sealed against it can still be opened.
pub const SIGNED_PREKEY_GRACE_SECS: u64 = 31 * 86_400;
/// The most retired signed prekeys kept (oldest dropped first).
pub const MAX_RETIRED_SIGNED_PREKEYS: usize = 16;
/// Largest wire encoding of a [`PrekeyBundle`] (100 one-time prekeys take 3,765 bytes).
pub const MAX_BUNDLE_BYTES: usize = 4096;
/// Largest wire encoding of [`PrekeySecrets`].
pub const MAX_PREKEY_SECRETS_BYTES: usize = 8192;

/// The signature domain of a bundle.
pub const BUNDLE_SIGNATURE_DOMAIN: &[u8] = b"bundle";

/// Why a bundle was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The identity's signature over the bundle does not verify.
    #[error("prekey bundle of key {}: signature does not verify", hex_prefix(.identity))]
    BadSignature {
        /// Whose bundle it claims to be (the Ed25519 public key).
        identity: [u8; 32],
    },
    /// `now` is at or past `expires_at`.
    #[error("prekey bundle expired at {expires_at} (now {now})")]
    Expired {
        /// When it expired (unix seconds).
        expires_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// `created_at` lies more than [`MAX_CLOCK_SKEW_SECS`] after `now`.
    #[error("prekey bundle created at {created_at}, in the future (now {now})")]
    FromTheFuture {
        /// The stated creation time.
        created_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// `expires_at` is not after `created_at`, or the window exceeds
    /// [`MAX_BUNDLE_VALIDITY_SECS`].
    #[error("prekey bundle validity {created_at}..{expires_at} is empty or longer than {MAX_BUNDLE_VALIDITY_SECS} s")]
    BadValidity {
        /// The stated creation time.
        created_at: u64,
        /// The stated expiry.
        expires_at: u64,
    },
    /// More than [`MAX_ONE_TIME_PREKEYS`] one-time prekeys.
    #[error("prekey bundle carries {count} one-time prekeys (limit {MAX_ONE_TIME_PREKEYS})")]
    TooManyOneTimePrekeys {
        /// How many it carries.
        count: usize,
    },
    /// Two prekeys (signed or one-time) share an id.
    #[error("prekey bundle uses prekey id {id} twice")]
    DuplicatePrekeyId {
        /// The repeated id.
        id: u32,
    },
}

/// The first 8 bytes of a key in hex, for error messages.
pub(crate) fn hex_prefix(key: &[u8; 32]) -> String {
    key.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A public X25519 prekey and the id its owner finds the secret by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PrekeyPublic {
    /// The owner's id for this prekey (unique within a bundle).
    pub id: u32,
    /// The X25519 public key.
    pub key: [u8; 32],
}

/// A prekey bundle as it arrives: unverified. Call [`PrekeyBundle::verify`] before using it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrekeyBundle {
    /// Whose bundle this is; the signature must be by this key.
    pub identity: PublicIdentity,
    /// Increases with every change the owner publishes (a DHT node refuses older versions).
    pub version: u64,
    /// The signed prekey.
    pub signed_prekey: PrekeyPublic,
    /// One-time prekeys (each used for at most one handshake), at most [`MAX_ONE_TIME_PREKEYS`].
    pub one_time_prekeys: Vec<PrekeyPublic>,
    /// When the bundle was signed (unix seconds).
    pub created_at: u64,
    /// When it stops being valid (unix seconds).
    pub expires_at: u64,
    /// Ed25519 signature by `identity`, domain `"bundle"`, over [`PrekeyBundle::signed_bytes`].
    #[serde(with = "serde_big_array::BigArray")]
    pub signature: [u8; 64],
}

crate::impl_wire!(PrekeyBundle, MAX_BUNDLE_BYTES);

impl PrekeyBundle {
    /// The bytes the signature covers:
    /// `identity(32) || version(u64) || spk.id(u32) || spk.key(32) || n(u64) ||
    ///  n × (id(u32) || key(32)) || created_at(u64) || expires_at(u64)`, little-endian.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(32 + 8 + 36 + 8 + 36 * self.one_time_prekeys.len() + 16);
        m.extend_from_slice(self.identity.as_bytes());
        m.extend_from_slice(&self.version.to_le_bytes());
        m.extend_from_slice(&self.signed_prekey.id.to_le_bytes());
        m.extend_from_slice(&self.signed_prekey.key);
        m.extend_from_slice(&(self.one_time_prekeys.len() as u64).to_le_bytes());
        for k in &self.one_time_prekeys {
            m.extend_from_slice(&k.id.to_le_bytes());
            m.extend_from_slice(&k.key);
        }
        m.extend_from_slice(&self.created_at.to_le_bytes());
        m.extend_from_slice(&self.expires_at.to_le_bytes());
        m
    }

    /// Build and sign a bundle (the owner's side).
    pub fn sign(
        identity: &Identity,
        version: u64,
        signed_prekey: PrekeyPublic,
        one_time_prekeys: Vec<PrekeyPublic>,
        created_at: u64,
        expires_at: u64,
    ) -> Self {
        let mut b = Self {
            identity: identity.public(),
            version,
            signed_prekey,
            one_time_prekeys,
            created_at,
            expires_at,
            signature: [0; 64],
        };
        b.signature = identity.sign(BUNDLE_SIGNATURE_DOMAIN, &b.signed_bytes());
        b
    }

    /// Check everything about the bundle at time `now` (unix seconds). Cheap checks come first;
    /// the signature is checked last.
    pub fn verify(&self, now: u64) -> Result<VerifiedBundle, BundleError> {
        if self.expires_at <= self.created_at
            || self.expires_at - self.created_at > MAX_BUNDLE_VALIDITY_SECS
        {
            return Err(BundleError::BadValidity {
                created_at: self.created_at,
                expires_at: self.expires_at,
            });
        }
        if self.created_at > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(BundleError::FromTheFuture {
                created_at: self.created_at,
                now,
            });
        }
        if now >= self.expires_at {
            return Err(BundleError::Expired {
                expires_at: self.expires_at,
                now,
            });
        }
        if self.one_time_prekeys.len() > MAX_ONE_TIME_PREKEYS {
            return Err(BundleError::TooManyOneTimePrekeys {
                count: self.one_time_prekeys.len(),
            });
        }
        let mut ids = HashSet::with_capacity(self.one_time_prekeys.len() + 1);
        ids.insert(self.signed_prekey.id);
        for k in &self.one_time_prekeys {
            if !ids.insert(k.id) {
                return Err(BundleError::DuplicatePrekeyId { id: k.id });
            }
        }
        self.identity
            .verify(
                BUNDLE_SIGNATURE_DOMAIN,
                &self.signed_bytes(),
                &self.signature,
            )
            .map_err(|_| BundleError::BadSignature {
                identity: *self.identity.as_bytes(),
            })?;
        Ok(VerifiedBundle {
            bundle: self.clone(),
        })
    }
}

/// A bundle whose signature, validity and limits have been checked. Only
/// [`PrekeyBundle::verify`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBundle {
    bundle: PrekeyBundle,
}

impl VerifiedBundle {
    /// Whose bundle it is.
    pub fn identity(&self) -> &PublicIdentity {
        &self.bundle.identity
    }
    /// The signed prekey.
    pub fn signed_prekey(&self) -> &PrekeyPublic {
        &self.bundle.signed_prekey
    }
    /// The one-time prekeys.
    pub fn one_time_prekeys(&self) -> &[PrekeyPublic] {
        &self.bundle.one_time_prekeys
    }
    /// The bundle's version.
    pub fn version(&self) -> u64 {
        self.bundle.version
    }
    /// When it expires (unix seconds).
    pub fn expires_at(&self) -> u64 {
        self.bundle.expires_at
    }
    /// When it was signed (unix seconds).
    pub fn created_at(&self) -> u64 {
        self.bundle.created_at
    }
    /// The bundle as it was received (for re-publishing or storing).
    pub fn bundle(&self) -> &PrekeyBundle {
        &self.bundle
    }
}

/// 32 secret bytes, zeroized on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct SecretBytes([u8; 32]);

impl SecretBytes {
    fn generate<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        let mut s = Self([0; 32]);
        rng.fill_bytes(&mut s.0);
        s
    }
    fn static_secret(&self) -> x25519_dalek::StaticSecret {
        x25519_dalek::StaticSecret::from(self.0)
    }
    fn public(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&self.static_secret()).to_bytes()
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SignedPrekeySecret {
    id: u32,
    secret: SecretBytes,
    created_at: u64,
    expires_at: u64,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
struct OneTimeSecret {
    id: u32,
    secret: SecretBytes,
}

/// The owner's secret prekeys (persisted by the node; wire type). See the module doc.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrekeySecrets {
    version: u64,
    next_id: u32,
    current: SignedPrekeySecret,
    retired: Vec<SignedPrekeySecret>,
    one_time: Vec<OneTimeSecret>,
}

crate::impl_wire!(PrekeySecrets, MAX_PREKEY_SECRETS_BYTES);

impl fmt::Debug for PrekeySecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrekeySecrets")
            .field("version", &self.version)
            .field("signed_prekey_id", &self.current.id)
            .field("expires_at", &self.current.expires_at)
            .field(
                "retired_ids",
                &self.retired.iter().map(|s| s.id).collect::<Vec<_>>(),
            )
            .field(
                "one_time_ids",
                &self.one_time.iter().map(|s| s.id).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl PrekeySecrets {
    /// Fresh secrets (a signed prekey valid for [`SIGNED_PREKEY_VALIDITY_SECS`] and
    /// [`DEFAULT_ONE_TIME_PREKEYS`] one-time prekeys) and the bundle to publish.
    ///
    /// The version starts at `now × 1000`, so an identity restored on a new machine publishes
    /// bundles that outrank the ones its old machine published.
    pub fn generate<R: CryptoRngCore + ?Sized>(
        identity: &Identity,
        now: u64,
        rng: &mut R,
    ) -> (Self, PrekeyBundle) {
        let mut s = Self {
            version: now.saturating_mul(1000),
            next_id: 2,
            current: SignedPrekeySecret {
                id: 1,
                secret: SecretBytes::generate(rng),
                created_at: now,
                expires_at: now.saturating_add(SIGNED_PREKEY_VALIDITY_SECS),
            },
            retired: Vec::new(),
            one_time: Vec::new(),
        };
        s.refill_one_time(rng);
        let bundle = s.bundle(identity);
        (s, bundle)
    }

    fn fresh_id(&mut self) -> u32 {
        let id = self.next_id;
        // Ids wrap after 4 billion keys; 0 is never used.
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    fn refill_one_time<R: CryptoRngCore + ?Sized>(&mut self, rng: &mut R) {
        while self.one_time.len() < DEFAULT_ONE_TIME_PREKEYS {
            let id = self.fresh_id();
            self.one_time.push(OneTimeSecret {
                id,
                secret: SecretBytes::generate(rng),
            });
        }
    }

    /// Replace the signed prekey with a fresh one (the old secret is kept for
    /// [`SIGNED_PREKEY_GRACE_SECS`] after its bundle expired), drop retired prekeys past their
    /// grace period, top the one-time prekeys back up, and return the new bundle to publish.
    pub fn rotate<R: CryptoRngCore + ?Sized>(
        &mut self,
        identity: &Identity,
        now: u64,
        rng: &mut R,
    ) -> PrekeyBundle {
        let id = self.fresh_id();
        let new = SignedPrekeySecret {
            id,
            secret: SecretBytes::generate(rng),
            created_at: now,
            expires_at: now.saturating_add(SIGNED_PREKEY_VALIDITY_SECS),
        };
        let old = std::mem::replace(&mut self.current, new);
        self.retired.push(old);
        self.retired
            .retain(|s| now < s.expires_at.saturating_add(SIGNED_PREKEY_GRACE_SECS));
        if self.retired.len() > MAX_RETIRED_SIGNED_PREKEYS {
            let excess = self.retired.len() - MAX_RETIRED_SIGNED_PREKEYS;
            self.retired.drain(..excess);
        }
        self.refill_one_time(rng);
        self.version = self.version.saturating_add(1).max(now.saturating_mul(1000));
        self.bundle(identity)
    }

    /// Whether the signed prekey should be rotated now (it expires within
    /// [`ROTATION_MARGIN_SECS`], or `now` is before its creation: the clock went back).
    pub fn needs_rotation(&self, now: u64) -> bool {
        now.saturating_add(ROTATION_MARGIN_SECS) >= self.current.expires_at
            || now.saturating_add(MAX_CLOCK_SKEW_SECS) < self.current.created_at
    }

    /// The current public bundle, signed by `identity` (deterministic for a given state).
    pub fn bundle(&self, identity: &Identity) -> PrekeyBundle {
        PrekeyBundle::sign(
            identity,
            self.version,
            PrekeyPublic {
                id: self.current.id,
                key: self.current.secret.public(),
            },
            self.one_time
                .iter()
                .map(|s| PrekeyPublic {
                    id: s.id,
                    key: s.secret.public(),
                })
                .collect(),
            self.current.created_at,
            self.current.expires_at,
        )
    }

    /// The secret of signed prekey `id`, if it is the current one or a retired one still within
    /// its grace period at `now`.
    pub fn signed_secret(&self, id: u32, now: u64) -> Option<x25519_dalek::StaticSecret> {
        if self.current.id == id {
            return Some(self.current.secret.static_secret());
        }
        self.retired
            .iter()
            .find(|s| s.id == id && now < s.expires_at.saturating_add(SIGNED_PREKEY_GRACE_SECS))
            .map(|s| s.secret.static_secret())
    }

    /// When signed prekey `id` (current or retired) stops being acceptable: its bundle's expiry
    /// plus [`SIGNED_PREKEY_GRACE_SECS`]; `None` if it is not held. The session layer refuses a
    /// current prekey past this point (rotation is overdue) and keeps replay-cache entries
    /// until it.
    pub fn signed_prekey_deadline(&self, id: u32) -> Option<u64> {
        std::iter::once(&self.current)
            .chain(self.retired.iter())
            .find(|s| s.id == id)
            .map(|s| s.expires_at.saturating_add(SIGNED_PREKEY_GRACE_SECS))
    }

    /// Take one-time prekey `id`: returns its secret once and forgets it (bumping the version,
    /// so the next [`PrekeySecrets::bundle`] no longer offers it).
    pub fn take_one_time(&mut self, id: u32) -> Option<x25519_dalek::StaticSecret> {
        let pos = self.one_time.iter().position(|s| s.id == id)?;
        let s = self.one_time.remove(pos);
        self.version = self.version.saturating_add(1);
        Some(s.secret.static_secret())
    }

    /// The current bundle version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many one-time prekeys are still unused.
    pub fn one_time_count(&self) -> usize {
        self.one_time.len()
    }

    /// Top the one-time prekeys back up to [`DEFAULT_ONE_TIME_PREKEYS`]; returns the new bundle
    /// if any were added.
    pub fn replenish<R: CryptoRngCore + ?Sized>(
        &mut self,
        identity: &Identity,
        rng: &mut R,
    ) -> Option<PrekeyBundle> {
        if self.one_time.len() >= DEFAULT_ONE_TIME_PREKEYS {
            return None;
        }
        self.refill_one_time(rng);
        self.version = self.version.saturating_add(1);
        Some(self.bundle(identity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Wire;
    use proptest::prelude::*;
    use rand_core::OsRng;

    const NOW: u64 = 1_700_000_000;

    fn alice() -> Identity {
        Identity::from_seed(&[0xa1; 32])
    }

    #[test]
    fn generated_bundle_verifies_and_round_trips() {
        let a = alice();
        let (secrets, bundle) = PrekeySecrets::generate(&a, NOW, &mut OsRng);
        let v = bundle.verify(NOW).expect("verifies");
        assert_eq!(v.identity(), &a.public());
        assert_eq!(v.one_time_prekeys().len(), DEFAULT_ONE_TIME_PREKEYS);
        assert_eq!(v.expires_at(), NOW + SIGNED_PREKEY_VALIDITY_SECS);
        assert_eq!(v.version(), secrets.version());
        let bytes = bundle.to_wire().expect("encodes");
        assert_eq!(PrekeyBundle::from_wire(&bytes), Ok(bundle.clone()));
        assert_eq!(secrets.bundle(&a), bundle, "bundle() is deterministic");
        // The public keys match the secrets.
        let spk = secrets
            .signed_secret(v.signed_prekey().id, NOW)
            .expect("current secret");
        assert_eq!(
            x25519_dalek::PublicKey::from(&spk).to_bytes(),
            v.signed_prekey().key
        );
    }

    #[test]
    fn a_bundle_with_the_maximum_one_time_prekeys_fits_its_limit() {
        let a = alice();
        let otks = (0..MAX_ONE_TIME_PREKEYS as u32)
            .map(|i| PrekeyPublic {
                id: i + 10,
                key: [7; 32],
            })
            .collect();
        let b = PrekeyBundle::sign(
            &a,
            1,
            PrekeyPublic {
                id: 1,
                key: [9; 32],
            },
            otks,
            NOW,
            NOW + 10,
        );
        let bytes = b.to_wire().expect("fits");
        assert_eq!(bytes.len(), 3765);
        assert!(b.verify(NOW).is_ok());
    }

    #[test]
    fn tampered_or_foreign_signatures_are_rejected() {
        let a = alice();
        let (_, bundle) = PrekeySecrets::generate(&a, NOW, &mut OsRng);
        let mut t = bundle.clone();
        t.signed_prekey.key[0] ^= 1;
        assert_eq!(
            t.verify(NOW),
            Err(BundleError::BadSignature {
                identity: *a.public().as_bytes()
            })
        );
        let mut t = bundle.clone();
        t.version += 1;
        assert!(matches!(
            t.verify(NOW),
            Err(BundleError::BadSignature { .. })
        ));
        let mut t = bundle.clone();
        t.one_time_prekeys.pop();
        assert!(matches!(
            t.verify(NOW),
            Err(BundleError::BadSignature { .. })
        ));
        // Claiming to be someone else.
        let mut t = bundle;
        t.identity = Identity::from_seed(&[2; 32]).public();
        assert!(matches!(
            t.verify(NOW),
            Err(BundleError::BadSignature { .. })
        ));
    }

    #[test]
    fn expired_and_future_bundles_are_rejected() {
        let a = alice();
        let (_, bundle) = PrekeySecrets::generate(&a, NOW, &mut OsRng);
        let exp = NOW + SIGNED_PREKEY_VALIDITY_SECS;
        assert!(bundle.verify(exp - 1).is_ok());
        assert_eq!(
            bundle.verify(exp),
            Err(BundleError::Expired {
                expires_at: exp,
                now: exp
            })
        );
        assert!(bundle.verify(NOW - MAX_CLOCK_SKEW_SECS).is_ok());
        assert_eq!(
            bundle.verify(NOW - MAX_CLOCK_SKEW_SECS - 1),
            Err(BundleError::FromTheFuture {
                created_at: NOW,
                now: NOW - MAX_CLOCK_SKEW_SECS - 1
            })
        );
    }

    #[test]
    fn overlong_or_empty_validity_is_rejected() {
        let a = alice();
        let spk = PrekeyPublic {
            id: 1,
            key: [1; 32],
        };
        let ok = PrekeyBundle::sign(&a, 1, spk, vec![], NOW, NOW + MAX_BUNDLE_VALIDITY_SECS);
        assert!(ok.verify(NOW).is_ok());
        let long = PrekeyBundle::sign(&a, 1, spk, vec![], NOW, NOW + MAX_BUNDLE_VALIDITY_SECS + 1);
        assert!(matches!(
            long.verify(NOW),
            Err(BundleError::BadValidity { .. })
        ));
        let empty = PrekeyBundle::sign(&a, 1, spk, vec![], NOW, NOW);
        assert!(matches!(
            empty.verify(NOW),
            Err(BundleError::BadValidity { .. })
        ));
    }

    #[test]
    fn too_many_one_time_prekeys_are_rejected() {
        let a = alice();
        let otks = (0..=MAX_ONE_TIME_PREKEYS as u32)
            .map(|i| PrekeyPublic {
                id: i + 2,
                key: [3; 32],
            })
            .collect();
        let b = PrekeyBundle::sign(
            &a,
            1,
            PrekeyPublic {
                id: 1,
                key: [1; 32],
            },
            otks,
            NOW,
            NOW + 60,
        );
        assert_eq!(
            b.verify(NOW),
            Err(BundleError::TooManyOneTimePrekeys {
                count: MAX_ONE_TIME_PREKEYS + 1
            })
        );
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let a = alice();
        let spk = PrekeyPublic {
            id: 1,
            key: [1; 32],
        };
        let dup = vec![
            PrekeyPublic {
                id: 5,
                key: [2; 32],
            },
            PrekeyPublic {
                id: 5,
                key: [3; 32],
            },
        ];
        let b = PrekeyBundle::sign(&a, 1, spk, dup, NOW, NOW + 60);
        assert_eq!(b.verify(NOW), Err(BundleError::DuplicatePrekeyId { id: 5 }));
        let clash = vec![PrekeyPublic {
            id: 1,
            key: [2; 32],
        }];
        let b = PrekeyBundle::sign(&a, 1, spk, clash, NOW, NOW + 60);
        assert_eq!(b.verify(NOW), Err(BundleError::DuplicatePrekeyId { id: 1 }));
    }

    #[test]
    fn one_time_prekeys_are_taken_once_and_leave_the_bundle() {
        let a = alice();
        let (mut s, b1) = PrekeySecrets::generate(&a, NOW, &mut OsRng);
        let otk = b1.one_time_prekeys[3];
        let secret = s.take_one_time(otk.id).expect("first take");
        assert_eq!(x25519_dalek::PublicKey::from(&secret).to_bytes(), otk.key);
        assert!(s.take_one_time(otk.id).is_none(), "taken twice");
        let b2 = s.bundle(&a);
        assert!(b2.version > b1.version);
        assert!(!b2.one_time_prekeys.contains(&otk));
        assert_eq!(b2.one_time_prekeys.len(), DEFAULT_ONE_TIME_PREKEYS - 1);
        let b3 = s.replenish(&a, &mut OsRng).expect("replenished");
        assert_eq!(b3.one_time_prekeys.len(), DEFAULT_ONE_TIME_PREKEYS);
        assert!(b3.version > b2.version);
        assert!(s.replenish(&a, &mut OsRng).is_none());
        // A signed prekey id is not a one-time prekey.
        assert!(s.take_one_time(b1.signed_prekey.id).is_none());
    }

    #[test]
    fn rotation_keeps_old_secrets_for_the_grace_period_only() {
        let a = alice();
        let (mut s, b1) = PrekeySecrets::generate(&a, NOW, &mut OsRng);
        assert!(!s.needs_rotation(NOW));
        let rot_time = NOW + SIGNED_PREKEY_VALIDITY_SECS - ROTATION_MARGIN_SECS;
        assert!(!s.needs_rotation(rot_time - 1));
        assert!(s.needs_rotation(rot_time));
        let b2 = s.rotate(&a, rot_time, &mut OsRng);
        assert!(b2.verify(rot_time).is_ok());
        assert!(b2.version > b1.version);
        assert_ne!(b2.signed_prekey.id, b1.signed_prekey.id);
        assert!(!s.needs_rotation(rot_time));
        let old = b1.signed_prekey.id;
        let deadline = b1.expires_at + SIGNED_PREKEY_GRACE_SECS;
        assert!(s.signed_secret(old, deadline - 1).is_some());
        assert!(s.signed_secret(old, deadline).is_none());
        assert!(s.signed_secret(b2.signed_prekey.id, deadline).is_some());
        assert!(s.signed_secret(999_999, NOW).is_none());
        // A later rotation prunes it for good.
        s.rotate(&a, deadline, &mut OsRng);
        assert!(s.signed_secret(old, b1.expires_at).is_none());
        // Retired keys are bounded.
        let mut t = rot_time;
        for _ in 0..40 {
            t += 3600;
            s.rotate(&a, t, &mut OsRng);
        }
        assert!(s.retired.len() <= MAX_RETIRED_SIGNED_PREKEYS);
        // All ids in the published bundle stay distinct.
        assert!(s.bundle(&a).verify(t).is_ok());
    }

    #[test]
    fn a_clock_that_went_back_asks_for_rotation() {
        let a = alice();
        let (s, _) = PrekeySecrets::generate(&a, NOW, &mut OsRng);
        assert!(s.needs_rotation(NOW - MAX_CLOCK_SKEW_SECS - 1));
    }

    #[test]
    fn secrets_round_trip_and_never_show_in_debug() {
        let a = alice();
        let (s, _) = PrekeySecrets::generate(&a, NOW, &mut OsRng);
        let bytes = s.to_wire().expect("encodes");
        let back = PrekeySecrets::from_wire(&bytes).expect("decodes");
        assert_eq!(back, s);
        let dbg = format!("{s:?}");
        let secret_hex: String = s
            .current
            .secret
            .0
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!dbg.contains(&secret_hex));
        assert!(!dbg.contains(&format!("{:?}", s.current.secret.0)));
        assert!(dbg.contains("signed_prekey_id"));
    }

    #[test]
    fn secrets_with_the_most_keys_fit_their_limit() {
        let a = alice();
        let (mut s, _) = PrekeySecrets::generate(&a, NOW, &mut OsRng);
        for i in 0..MAX_RETIRED_SIGNED_PREKEYS + 1 {
            s.rotate(&a, NOW + i as u64, &mut OsRng);
        }
        while s.one_time.len() < MAX_ONE_TIME_PREKEYS {
            let id = s.fresh_id();
            s.one_time.push(OneTimeSecret {
                id,
                secret: SecretBytes::generate(&mut OsRng),
            });
        }
        let bytes = s.to_wire().expect("fits");
        assert!(bytes.len() <= MAX_PREKEY_SECRETS_BYTES);
    }

    fn arb_prekey() -> impl Strategy<Value = PrekeyPublic> {
        (any::<u32>(), any::<[u8; 32]>()).prop_map(|(id, key)| PrekeyPublic { id, key })
    }

    proptest! {
        #[test]
        fn bundles_round_trip(
            seed in any::<[u8; 32]>(),
            version in any::<u64>(),
            spk in arb_prekey(),
            otks in proptest::collection::vec(arb_prekey(), 0..MAX_ONE_TIME_PREKEYS),
            created in any::<u64>(),
            expires in any::<u64>(),
        ) {
            let b = PrekeyBundle::sign(&Identity::from_seed(&seed), version, spk, otks, created, expires);
            let bytes = b.to_wire().expect("encodes");
            prop_assert_eq!(PrekeyBundle::from_wire(&bytes), Ok(b));
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            if let Ok(b) = PrekeyBundle::from_wire(&bytes) {
                let _ = b.verify(NOW);
            }
            let _ = PrekeySecrets::from_wire(&bytes);
        }

        #[test]
        fn secrets_round_trip(now in 0u64..u64::MAX / 2, takes in proptest::collection::vec(0u32..40, 0..10)) {
            let a = alice();
            let (mut s, _) = PrekeySecrets::generate(&a, now, &mut OsRng);
            for t in takes {
                let _ = s.take_one_time(t);
            }
            let bytes = s.to_wire().expect("encodes");
            prop_assert_eq!(PrekeySecrets::from_wire(&bytes).expect("decodes"), s);
        }
    }
}
