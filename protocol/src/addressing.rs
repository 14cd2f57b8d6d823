//! Addressing: the pair secret two contacts share and the mailbox keys derived from it. See
//! `docs/protocol.md`, section "Addressing and DHT records".
//!
//! Two contacts derive the same [`PairSecret`] from a static-static X25519 exchange of their
//! identity keys, without any message. From it each derives, per [`EPOCH_SECS`] epoch, the
//! mailbox key under which mail *to* one of them is stored ([`mailbox_key`]): a storing node sees
//! a key that changes every day and cannot be linked to either identity. Only the first message
//! to someone who does not know the sender yet goes to a mailbox anyone can compute from the
//! recipient's public identity ([`first_contact_mailbox`]). Presence records (where a contact's
//! node can be dialled) use keys derived from the same secret; see [`crate::records`].

use std::fmt;

use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::identity::{Identity, PublicIdentity};

/// The length of an addressing epoch: one day.
pub const EPOCH_SECS: u64 = 86_400;
/// The HKDF info of the pair secret.
pub const PAIR_KDF_INFO: &[u8] = b"meshchat/pair/v1";
/// The HKDF info prefix of a mailbox key.
pub const MAILBOX_KDF_INFO: &[u8] = b"meshchat/mailbox/v1";
/// The hash prefix of a first-contact mailbox key.
pub const FIRST_CONTACT_DOMAIN: &[u8] = b"meshchat/first-contact/v1";

/// The epoch of unix time `now`: `now / EPOCH_SECS`.
pub fn epoch(now: u64) -> u64 {
    now / EPOCH_SECS
}

/// The secret two identities share (symmetric: A's with B equals B's with A). Secret: zeroized on
/// drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PairSecret(Zeroizing<[u8; 32]>);

impl fmt::Debug for PairSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PairSecret(..)")
    }
}

impl PairSecret {
    /// The 32 secret bytes (for persistence or further derivation).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A pair secret from stored bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// HKDF-Expand with the pair secret as the pseudo-random key.
    pub(crate) fn expand(&self, info: &[&[u8]], out: &mut [u8]) {
        let hk = Hkdf::<Sha256>::from_prk(self.0.as_ref())
            .expect("invariant: a 32-byte PRK is long enough for HKDF-SHA256");
        hk.expand_multi_info(info, out)
            .expect("invariant: outputs here are at most 64 bytes");
    }
}

/// The secret `me` shares with `them`:
/// `HKDF(salt = min(A, B) || max(A, B), ikm = DH(me_x25519, them_x25519), info = "meshchat/pair/v1", 32)`
/// where `A`, `B` are the two Ed25519 public keys, ordered bytewise.
pub fn pair_secret(me: &Identity, them: &PublicIdentity) -> PairSecret {
    let dh = me.x25519_secret().diffie_hellman(&them.x25519_public());
    let (a, b) = (me.public(), *them);
    let (lo, hi) = if a.as_bytes() <= b.as_bytes() {
        (a, b)
    } else {
        (b, a)
    };
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(lo.as_bytes());
    salt[32..].copy_from_slice(hi.as_bytes());
    let hk = Hkdf::<Sha256>::new(Some(&salt), dh.as_bytes());
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand(PAIR_KDF_INFO, out.as_mut())
        .expect("invariant: 32 bytes is a valid HKDF-SHA256 output length");
    PairSecret(out)
}

/// The mailbox where mail to `recipient` from its pair partner is stored during `epoch`:
/// `HKDF-Expand(PRK = pair, info = "meshchat/mailbox/v1" || recipient || u64_le(epoch), 32)`.
pub fn mailbox_key(pair: &PairSecret, recipient: &PublicIdentity, epoch: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    pair.expand(
        &[MAILBOX_KDF_INFO, recipient.as_bytes(), &epoch.to_le_bytes()],
        &mut out,
    );
    out
}

/// The mailbox for first contact with `recipient` (anyone can compute it):
/// `SHA-256("meshchat/first-contact/v1" || recipient)`.
pub fn first_contact_mailbox(recipient: &PublicIdentity) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(FIRST_CONTACT_DOMAIN);
    h.update(recipient.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u8) -> Identity {
        Identity::from_seed(&[n; 32])
    }

    #[test]
    fn pair_secret_is_symmetric_and_distinct_per_pair() {
        let (a, b, c) = (id(1), id(2), id(3));
        let ab = pair_secret(&a, &b.public());
        assert_eq!(ab, pair_secret(&b, &a.public()));
        assert_ne!(ab, pair_secret(&a, &c.public()));
        assert_ne!(ab, pair_secret(&c, &b.public()));
        assert_eq!(format!("{ab:?}"), "PairSecret(..)");
    }

    #[test]
    fn pair_secret_is_not_the_raw_dh_output() {
        let (a, b) = (id(1), id(2));
        let dh = a
            .x25519_secret()
            .diffie_hellman(&b.public().x25519_public());
        assert_ne!(pair_secret(&a, &b.public()).as_bytes(), dh.as_bytes());
    }

    #[test]
    fn mailbox_keys_differ_by_direction_and_epoch() {
        let (a, b) = (id(1), id(2));
        let pair = pair_secret(&a, &b.public());
        let to_a = mailbox_key(&pair, &a.public(), 100);
        let to_b = mailbox_key(&pair, &b.public(), 100);
        assert_ne!(to_a, to_b);
        assert_ne!(to_a, mailbox_key(&pair, &a.public(), 101));
        // Both sides compute the same key for the same direction.
        let pair_b = pair_secret(&b, &a.public());
        assert_eq!(to_a, mailbox_key(&pair_b, &a.public(), 100));
        // Another pair's mailbox for the same recipient is unrelated.
        let other = pair_secret(&id(3), &a.public());
        assert_ne!(to_a, mailbox_key(&other, &a.public(), 100));
        // Not linkable to the public first-contact mailbox.
        assert_ne!(to_a, first_contact_mailbox(&a.public()));
    }

    #[test]
    fn epochs_are_days() {
        assert_eq!(epoch(0), 0);
        assert_eq!(epoch(EPOCH_SECS - 1), 0);
        assert_eq!(epoch(EPOCH_SECS), 1);
        assert_eq!(epoch(1_700_000_000), 19_675);
    }

    #[test]
    fn first_contact_mailbox_is_public_and_per_identity() {
        let a = id(1).public();
        assert_eq!(first_contact_mailbox(&a), first_contact_mailbox(&a));
        assert_ne!(
            first_contact_mailbox(&a),
            first_contact_mailbox(&id(2).public())
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn pair_secret_is_symmetric_for_any_keys(x in any::<[u8; 32]>(), y in any::<[u8; 32]>()) {
            let (a, b) = (Identity::from_seed(&x), Identity::from_seed(&y));
            prop_assert_eq!(pair_secret(&a, &b.public()), pair_secret(&b, &a.public()));
        }
    }
}
