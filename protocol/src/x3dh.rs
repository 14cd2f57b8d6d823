//! The X3DH-style handshake: how an initiator derives a shared secret with someone who is
//! offline, from the prekey bundle they published, and how the responder derives the same secret
//! from the first message. See `docs/protocol.md`, section "Handshake".
//!
//! ```text
//!   initiator A                                        responder B (bundle: IK_B, SPK_B, OPK_B)
//!   EK_A = fresh X25519 key
//!   DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)
//!   DH3 = DH(EK_A, SPK_B)   DH4 = DH(EK_A, OPK_B)  (if a one-time prekey was offered)
//!   SK  = HKDF(salt = 0^32, ikm = 0xFF^32 || DH1 || DH2 || DH3 [|| DH4], info = "meshchat/x3dh/v1", 32)
//!   AD  = "meshchat/x3dh/v1" || IK_A || IK_B           (Ed25519 public keys)
//!   ── PreKeyHeader { signed prekey id, one-time prekey id?, EK_A } + first ratchet message ──►
//! ```
//!
//! Identity keys take part as their X25519 equivalents ([`Identity::x25519_secret`],
//! [`PublicIdentity::x25519_public`]). Every DH output is checked: an all-zero output (a
//! low-order point) aborts the handshake. Bundles are used only once verified
//! ([`VerifiedBundle`]); the responder finds its secrets in [`PrekeySecrets`], consuming the
//! one-time prekey. A handshake without a one-time prekey can be replayed; the session layer
//! guards it with the [`ReplayCache`](crate::replay::ReplayCache).

use std::fmt;

use hkdf::Hkdf;
use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::{
    identity::{Identity, PublicIdentity},
    impl_wire,
    prekey::{PrekeySecrets, VerifiedBundle},
    ratchet::ASSOCIATED_DATA_LEN,
};

/// The HKDF info of the handshake, also the prefix of its associated data.
pub const X3DH_INFO: &[u8; 16] = b"meshchat/x3dh/v1";
/// Encoded size of a [`PreKeyHeader`] with a one-time prekey id.
pub const PREKEY_HEADER_BYTES: usize = 1 + 4 + 5 + 32;

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X3dhError {
    /// A Diffie-Hellman output was all zero: some key is a low-order point.
    #[error("handshake key {which} is a low-order point")]
    LowOrderKey {
        /// Which DH failed (`"DH1"` … `"DH4"`).
        which: &'static str,
    },
    /// The message names a signed prekey the responder does not hold (unknown, or retired past
    /// its grace period).
    #[error("unknown or expired signed prekey {id}")]
    UnknownSignedPrekey {
        /// The id named.
        id: u32,
    },
    /// The message names a one-time prekey the responder does not hold (unknown or used).
    #[error("unknown or already used one-time prekey {id}")]
    UnknownOneTimePrekey {
        /// The id named.
        id: u32,
    },
}

/// What the first message of a session carries so the responder can run the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PreKeyHeader {
    /// Id of the responder's signed prekey used.
    pub signed_prekey_id: u32,
    /// Id of the responder's one-time prekey used, if the bundle offered one.
    pub one_time_prekey_id: Option<u32>,
    /// The initiator's ephemeral X25519 public key `EK_A`.
    pub ephemeral: [u8; 32],
}
impl_wire!(PreKeyHeader, PREKEY_HEADER_BYTES);

/// The result of a handshake on either side: the shared secret and the associated data.
pub struct SharedKeys {
    /// `SK`, the first root key of the Double Ratchet.
    pub shared_secret: Zeroizing<[u8; 32]>,
    /// `AD = "meshchat/x3dh/v1" || IK_A || IK_B`.
    pub associated_data: [u8; ASSOCIATED_DATA_LEN],
}

impl fmt::Debug for SharedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedKeys").finish_non_exhaustive()
    }
}

/// The initiator's result: the header to send, the keys, and the responder's signed prekey
/// (its first ratchet key).
#[derive(Debug)]
pub struct Initiated {
    /// The header the first messages carry.
    pub header: PreKeyHeader,
    /// `SK` and `AD`.
    pub keys: SharedKeys,
    /// `SPK_B`, the responder's first ratchet public key.
    pub their_signed_prekey: [u8; 32],
}

/// The responder's result: the keys and its signed prekey secret (its first ratchet key pair).
pub struct Responded {
    /// `SK` and `AD`.
    pub keys: SharedKeys,
    /// The secret of `SPK_B`.
    pub signed_prekey: StaticSecret,
}

impl fmt::Debug for Responded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responded").finish_non_exhaustive()
    }
}

/// `AD = "meshchat/x3dh/v1" || IK_A || IK_B`.
pub fn associated_data(
    initiator: &PublicIdentity,
    responder: &PublicIdentity,
) -> [u8; ASSOCIATED_DATA_LEN] {
    let mut ad = [0u8; ASSOCIATED_DATA_LEN];
    ad[..16].copy_from_slice(X3DH_INFO);
    ad[16..48].copy_from_slice(initiator.as_bytes());
    ad[48..].copy_from_slice(responder.as_bytes());
    ad
}

fn dh(
    secret: &StaticSecret,
    public: &PublicKey,
    which: &'static str,
) -> Result<Zeroizing<[u8; 32]>, X3dhError> {
    let shared = secret.diffie_hellman(public);
    if !shared.was_contributory() {
        return Err(X3dhError::LowOrderKey { which });
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

fn derive(
    dhs: &[&Zeroizing<[u8; 32]>],
    initiator: &PublicIdentity,
    responder: &PublicIdentity,
) -> SharedKeys {
    let mut ikm = Zeroizing::new(Vec::with_capacity(32 * 5));
    ikm.extend_from_slice(&[0xff; 32]);
    for d in dhs {
        ikm.extend_from_slice(d.as_ref());
    }
    let mut sk = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(&[0u8; 32]), &ikm)
        .expand(X3DH_INFO, sk.as_mut())
        .expect("invariant: 32 bytes is a valid HKDF-SHA256 output length");
    SharedKeys {
        shared_secret: sk,
        associated_data: associated_data(initiator, responder),
    }
}

/// The initiator's side: run the handshake against a verified bundle. Uses one of the bundle's
/// one-time prekeys (chosen at random, so that two initiators who fetched the same bundle rarely
/// pick the same one) when it offers any.
pub fn initiate<R: CryptoRngCore + ?Sized>(
    me: &Identity,
    bundle: &VerifiedBundle,
    rng: &mut R,
) -> Result<Initiated, X3dhError> {
    let mut ek_bytes = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(ek_bytes.as_mut());
    let ek = StaticSecret::from(*ek_bytes);
    let spk = *bundle.signed_prekey();
    let spk_public = PublicKey::from(spk.key);
    let otks = bundle.one_time_prekeys();
    let otk = if otks.is_empty() {
        None
    } else {
        let i = (rng.next_u64() % otks.len() as u64) as usize;
        otks.get(i).copied()
    };

    let dh1 = dh(&me.x25519_secret(), &spk_public, "DH1")?;
    let dh2 = dh(&ek, &bundle.identity().x25519_public(), "DH2")?;
    let dh3 = dh(&ek, &spk_public, "DH3")?;
    let dh4 = otk
        .map(|k| dh(&ek, &PublicKey::from(k.key), "DH4"))
        .transpose()?;
    let mut parts = vec![&dh1, &dh2, &dh3];
    if let Some(d) = dh4.as_ref() {
        parts.push(d);
    }
    let keys = derive(&parts, &me.public(), bundle.identity());
    Ok(Initiated {
        header: PreKeyHeader {
            signed_prekey_id: spk.id,
            one_time_prekey_id: otk.map(|k| k.id),
            ephemeral: PublicKey::from(&ek).to_bytes(),
        },
        keys,
        their_signed_prekey: spk.key,
    })
}

/// The responder's side: derive the same keys from the header of a first message sent by
/// `initiator`. Takes (consumes) the one-time prekey from `prekeys`; the caller keeps the change
/// only if the first message then decrypts.
pub fn respond(
    me: &Identity,
    initiator: &PublicIdentity,
    header: &PreKeyHeader,
    prekeys: &mut PrekeySecrets,
    now: u64,
) -> Result<Responded, X3dhError> {
    let spk = prekeys.signed_secret(header.signed_prekey_id, now).ok_or(
        X3dhError::UnknownSignedPrekey {
            id: header.signed_prekey_id,
        },
    )?;
    let ek = PublicKey::from(header.ephemeral);
    let ik_a = initiator.x25519_public();
    let dh1 = dh(&spk, &ik_a, "DH1")?;
    let dh2 = dh(&me.x25519_secret(), &ek, "DH2")?;
    let dh3 = dh(&spk, &ek, "DH3")?;
    let dh4 = match header.one_time_prekey_id {
        Some(id) => {
            let otk = prekeys
                .take_one_time(id)
                .ok_or(X3dhError::UnknownOneTimePrekey { id })?;
            Some(dh(&otk, &ek, "DH4")?)
        }
        None => None,
    };
    let mut parts = vec![&dh1, &dh2, &dh3];
    if let Some(d) = dh4.as_ref() {
        parts.push(d);
    }
    let keys = derive(&parts, initiator, &me.public());
    Ok(Responded {
        keys,
        signed_prekey: spk,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{prekey::PrekeyBundle, wire::Wire};
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    const NOW: u64 = 1_700_000_000;

    fn setup(seed: u64) -> (Identity, Identity, PrekeySecrets, PrekeyBundle, ChaCha20Rng) {
        let mut r = ChaCha20Rng::seed_from_u64(seed);
        let alice = Identity::generate(&mut r);
        let bob = Identity::generate(&mut r);
        let (secrets, bundle) = PrekeySecrets::generate(&bob, NOW, &mut r);
        (alice, bob, secrets, bundle, r)
    }

    #[test]
    fn both_sides_agree_with_a_one_time_prekey_and_consume_it() {
        let (alice, bob, mut secrets, bundle, mut r) = setup(1);
        let verified = bundle.verify(NOW).expect("verifies");
        let init = initiate(&alice, &verified, &mut r).expect("initiate");
        let otk = init
            .header
            .one_time_prekey_id
            .expect("bundle offers one-time prekeys");
        let before = secrets.one_time_count();
        let resp =
            respond(&bob, &alice.public(), &init.header, &mut secrets, NOW).expect("respond");
        assert_eq!(*init.keys.shared_secret, *resp.keys.shared_secret);
        assert_eq!(init.keys.associated_data, resp.keys.associated_data);
        assert_eq!(&init.keys.associated_data[..16], b"meshchat/x3dh/v1");
        assert_eq!(
            &init.keys.associated_data[16..48],
            alice.public().as_bytes()
        );
        assert_eq!(&init.keys.associated_data[48..], bob.public().as_bytes());
        assert_eq!(
            PublicKey::from(&resp.signed_prekey).to_bytes(),
            init.their_signed_prekey
        );
        assert_eq!(secrets.one_time_count(), before - 1);
        // The same header again: the one-time prekey is gone.
        assert_eq!(
            respond(&bob, &alice.public(), &init.header, &mut secrets, NOW).map(|_| ()),
            Err(X3dhError::UnknownOneTimePrekey { id: otk })
        );
    }

    #[test]
    fn both_sides_agree_without_a_one_time_prekey() {
        let (alice, bob, mut secrets, mut bundle, mut r) = setup(2);
        bundle = PrekeyBundle::sign(
            &bob,
            bundle.version,
            bundle.signed_prekey,
            vec![],
            bundle.created_at,
            bundle.expires_at,
        );
        let verified = bundle.verify(NOW).expect("verifies");
        let init = initiate(&alice, &verified, &mut r).expect("initiate");
        assert_eq!(init.header.one_time_prekey_id, None);
        let resp =
            respond(&bob, &alice.public(), &init.header, &mut secrets, NOW).expect("respond");
        assert_eq!(*init.keys.shared_secret, *resp.keys.shared_secret);
        // Without a one-time prekey the responder can derive it again: this is the replay the
        // session layer's replay cache exists for.
        let again = respond(&bob, &alice.public(), &init.header, &mut secrets, NOW).expect("again");
        assert_eq!(*again.keys.shared_secret, *init.keys.shared_secret);
    }

    #[test]
    fn the_secret_matches_the_specified_derivation() {
        let (alice, bob, secrets, bundle, mut r) = setup(3);
        let verified = bundle.verify(NOW).expect("verifies");
        let init = initiate(&alice, &verified, &mut r).expect("initiate");
        let mut s = secrets.clone();
        let spk = s
            .signed_secret(init.header.signed_prekey_id, NOW)
            .expect("spk");
        let otk = s
            .take_one_time(init.header.one_time_prekey_id.expect("otk"))
            .expect("otk secret");
        let ek = PublicKey::from(init.header.ephemeral);
        let mut ikm = vec![0xffu8; 32];
        ikm.extend_from_slice(
            spk.diffie_hellman(&alice.public().x25519_public())
                .as_bytes(),
        );
        ikm.extend_from_slice(bob.x25519_secret().diffie_hellman(&ek).as_bytes());
        ikm.extend_from_slice(spk.diffie_hellman(&ek).as_bytes());
        ikm.extend_from_slice(otk.diffie_hellman(&ek).as_bytes());
        let mut sk = [0u8; 32];
        Hkdf::<Sha256>::new(Some(&[0; 32]), &ikm)
            .expand(b"meshchat/x3dh/v1", &mut sk)
            .expect("hkdf");
        assert_eq!(*init.keys.shared_secret, sk);
    }

    #[test]
    fn a_different_identity_or_unknown_prekey_does_not_agree() {
        let (alice, bob, mut secrets, bundle, mut r) = setup(4);
        let verified = bundle.verify(NOW).expect("verifies");
        let init = initiate(&alice, &verified, &mut r).expect("initiate");
        let mallory = Identity::generate(&mut r);
        let resp = respond(
            &bob,
            &mallory.public(),
            &init.header,
            &mut secrets.clone(),
            NOW,
        )
        .expect("derives something");
        assert_ne!(*resp.keys.shared_secret, *init.keys.shared_secret);
        let mut unknown = init.header;
        unknown.signed_prekey_id = 4242;
        assert_eq!(
            respond(&bob, &alice.public(), &unknown, &mut secrets, NOW).map(|_| ()),
            Err(X3dhError::UnknownSignedPrekey { id: 4242 })
        );
    }

    #[test]
    fn low_order_keys_are_rejected() {
        let (alice, bob, mut secrets, bundle, mut r) = setup(5);
        let verified = bundle.verify(NOW).expect("verifies");
        let mut init = initiate(&alice, &verified, &mut r).expect("initiate");
        init.header.ephemeral = [0; 32];
        init.header.one_time_prekey_id = None;
        assert_eq!(
            respond(&bob, &alice.public(), &init.header, &mut secrets, NOW).map(|_| ()),
            Err(X3dhError::LowOrderKey { which: "DH2" })
        );
        // A bundle whose signed prekey is a low-order point (signed by its owner, so it verifies).
        let bad = PrekeyBundle::sign(
            &bob,
            1,
            crate::prekey::PrekeyPublic {
                id: 1,
                key: [0; 32],
            },
            vec![],
            NOW,
            NOW + 60,
        )
        .verify(NOW)
        .expect("verifies");
        assert_eq!(
            initiate(&alice, &bad, &mut r).map(|_| ()),
            Err(X3dhError::LowOrderKey { which: "DH1" })
        );
    }

    proptest! {
        #[test]
        fn headers_round_trip(spk in any::<u32>(), otk in any::<Option<u32>>(), eph in any::<[u8; 32]>()) {
            let h = PreKeyHeader { signed_prekey_id: spk, one_time_prekey_id: otk, ephemeral: eph };
            let bytes = h.to_wire().expect("enc");
            prop_assert!(bytes.len() <= PREKEY_HEADER_BYTES);
            prop_assert_eq!(PreKeyHeader::from_wire(&bytes), Ok(h));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = PreKeyHeader::from_wire(&bytes);
        }
    }
}
