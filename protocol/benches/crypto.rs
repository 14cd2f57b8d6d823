//! Cost of meshchat's end-to-end cryptography, composite operations next to the primitives they
//! are built from, in one run so the ratios hold on any machine. Results and how to read them:
//! `docs/performance.md`, section "Cryptography".
//!
//! ```text
//! cargo bench -p meshchat-protocol --bench crypto -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;

use chacha20poly1305::{
    aead::{Aead, KeyInit, Payload},
    ChaCha20Poly1305,
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ed25519_dalek::{Signer, SigningKey};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use meshchat_protocol::{
    envelope, open_message, open_pair_message, pair_secret, ratchet::ASSOCIATED_DATA_LEN,
    seal_message, seal_pair_message, x3dh, Identity, PairEnvelopeKey, PrekeySecrets,
    PublicIdentity, RatchetState, ReplayCache, SessionRecord,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

const NOW: u64 = 1_700_000_000;
const KIB: usize = 1024;

fn primitives(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut g = c.benchmark_group("primitive");

    let a = StaticSecret::random_from_rng(&mut rng);
    let b = PublicKey::from(&StaticSecret::random_from_rng(&mut rng));
    g.bench_function("x25519_dh", |bench| {
        bench.iter(|| black_box(&a).diffie_hellman(black_box(&b)))
    });
    g.bench_function("x25519_keygen", |bench| {
        bench.iter(|| PublicKey::from(&StaticSecret::random_from_rng(&mut rng)))
    });

    let sk = SigningKey::generate(&mut rng);
    let vk = sk.verifying_key();
    let msg = [0x42u8; 128];
    let sig = sk.sign(&msg);
    g.bench_function("ed25519_sign_128B", |bench| {
        bench.iter(|| black_box(&sk).sign(black_box(&msg)))
    });
    g.bench_function("ed25519_verify_strict_128B", |bench| {
        bench.iter(|| black_box(&vk).verify_strict(black_box(&msg), black_box(&sig)))
    });

    // What using an identity key costs besides signatures: decoding and validating the 32 bytes
    // (point decompression and small-order check), and its X25519 form for Diffie-Hellman.
    let ident = Identity::generate(&mut rng).public();
    let ident_bytes = *ident.as_bytes();
    g.bench_function("identity_decode_32B", |bench| {
        bench.iter(|| PublicIdentity::from_bytes(black_box(&ident_bytes)))
    });
    g.bench_function("identity_to_x25519", |bench| {
        bench.iter(|| black_box(&ident).x25519_public())
    });

    let cipher = ChaCha20Poly1305::new_from_slice(&[7u8; 32]).expect("32-byte key");
    let nonce = [0u8; 12];
    let plaintext = vec![0xabu8; KIB];
    let ciphertext = cipher
        .encrypt((&nonce).into(), plaintext.as_slice())
        .expect("encrypts");
    g.bench_function("chacha20poly1305_seal_1KiB", |bench| {
        bench.iter(|| {
            cipher.encrypt(
                (&nonce).into(),
                Payload {
                    msg: black_box(&plaintext),
                    aad: &[0u8; 120],
                },
            )
        })
    });
    g.bench_function("chacha20poly1305_open_1KiB", |bench| {
        bench.iter(|| cipher.decrypt((&nonce).into(), black_box(ciphertext.as_slice())))
    });
    g.bench_function("sha256_1KiB", |bench| {
        bench.iter(|| Sha256::digest(black_box(&plaintext)))
    });
    g.bench_function("hkdf_sha256_32B_to_64B", |bench| {
        bench.iter(|| {
            let mut okm = [0u8; 64];
            Hkdf::<Sha256>::new(Some(black_box(&[1u8; 32])), black_box(&[2u8; 32]))
                .expand(b"meshchat/ratchet/root/v1", &mut okm)
                .expect("valid length");
            okm
        })
    });
    g.bench_function("hmac_sha256_1B", |bench| {
        bench.iter(|| {
            let mut mac =
                <Hmac<Sha256> as Mac>::new_from_slice(black_box(&[3u8; 32])).expect("any key");
            mac.update(&[0x01]);
            mac.finalize().into_bytes()
        })
    });
    g.finish();
}

/// A ratchet pair after X3DH, Alice having sent once so both can send.
fn ratchet_pair(rng: &mut ChaCha20Rng) -> (RatchetState, RatchetState) {
    let mut sk = [0u8; 32];
    rng.fill_bytes(&mut sk);
    let ad = [9u8; ASSOCIATED_DATA_LEN];
    let spk = StaticSecret::random_from_rng(&mut *rng);
    let mut a = RatchetState::new_initiator(&sk, PublicKey::from(&spk).to_bytes(), ad, rng)
        .expect("initiator");
    let mut b = RatchetState::new_responder(&sk, &spk, ad);
    let m = a.encrypt(b"hello", rng).expect("encrypts");
    b.decrypt(&m, NOW).expect("decrypts");
    (a, b)
}

fn composite(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let mut g = c.benchmark_group("composite");
    let body = vec![0x61u8; KIB];

    // One message on a running chain: KDF_CK, HKDF of the message key, AEAD, both sides.
    let (mut a, mut b) = ratchet_pair(&mut rng);
    g.bench_function("ratchet_message_1KiB_same_chain", |bench| {
        bench.iter(|| {
            let m = a.encrypt(black_box(&body), &mut rng).expect("encrypts");
            b.decrypt(&m, NOW).expect("decrypts")
        })
    });

    // Every message turns the conversation around, so each one carries a DH ratchet step.
    let (mut a, mut b) = ratchet_pair(&mut rng);
    let mut a_to_b = false;
    g.bench_function("ratchet_message_1KiB_with_dh_step", |bench| {
        bench.iter(|| {
            a_to_b = !a_to_b;
            let (s, r) = if a_to_b {
                (&mut a, &mut b)
            } else {
                (&mut b, &mut a)
            };
            let m = s.encrypt(black_box(&body), &mut rng).expect("encrypts");
            r.decrypt(&m, NOW).expect("decrypts")
        })
    });

    // The handshake: verify the bundle, X3DH on both sides (with a one-time prekey).
    let alice = Identity::generate(&mut rng);
    let bob = Identity::generate(&mut rng);
    let (bob_prekeys, bob_bundle) = PrekeySecrets::generate(&bob, NOW, &mut rng);
    g.bench_function("handshake_verify_and_x3dh_both_sides", |bench| {
        bench.iter_batched(
            || bob_prekeys.clone(),
            |mut prekeys| {
                let verified = bob_bundle.verify(NOW).expect("verifies");
                let init = x3dh::initiate(&alice, &verified, &mut rng).expect("initiates");
                let resp = x3dh::respond(&bob, &alice.public(), &init.header, &mut prekeys, NOW)
                    .expect("responds");
                (init.keys.shared_secret, resp.keys.shared_secret)
            },
            BatchSize::SmallInput,
        )
    });

    // A first message end to end: handshake, ratchet set-up, envelope, both sides.
    let verified = bob_bundle.verify(NOW).expect("verifies");
    g.bench_function("first_message_1KiB_seal_and_open", |bench| {
        bench.iter_batched(
            || (bob_prekeys.clone(), ReplayCache::new()),
            |(mut prekeys, mut replay)| {
                let mut record = SessionRecord::new();
                let env = seal_message(
                    &alice,
                    &mut record,
                    Some(&verified),
                    &bob.public(),
                    [0; 32],
                    NOW,
                    envelope::DEFAULT_TTL_SECS,
                    &body,
                    &mut rng,
                )
                .expect("seals");
                open_message(&bob, &mut prekeys, &mut replay, |_| None, &env, NOW).expect("opens")
            },
            BatchSize::SmallInput,
        )
    });

    // The sealed-sender envelope alone, for a payload the size of a session message carrying
    // 1 KiB (1 KiB + 69 bytes of session-message framing and tag: the 4 KiB bucket).
    let payload = vec![0x62u8; KIB + 69];
    g.bench_function("envelope_1KiB_message_seal_and_open", |bench| {
        bench.iter(|| {
            let env = envelope::seal(
                &alice,
                &bob.public(),
                [0; 32],
                NOW,
                envelope::DEFAULT_TTL_SECS,
                black_box(&payload),
                &mut rng,
            )
            .expect("seals");
            envelope::open(&bob, &env, NOW).expect("opens")
        })
    });

    // A message of an established session through seal_message/open_message: ratchet plus
    // sealed-sender envelope (sign, verify, ephemeral DH each side).
    let mut a_record = SessionRecord::new();
    let mut b_prekeys = bob_prekeys.clone();
    let mut b_replay = ReplayCache::new();
    let env = seal_message(
        &alice,
        &mut a_record,
        Some(&verified),
        &bob.public(),
        [0; 32],
        NOW,
        envelope::DEFAULT_TTL_SECS,
        b"hi",
        &mut rng,
    )
    .expect("seals");
    let mut b_record = open_message(&bob, &mut b_prekeys, &mut b_replay, |_| None, &env, NOW)
        .expect("opens")
        .record;
    let reply = seal_message(
        &bob,
        &mut b_record,
        None,
        &alice.public(),
        [0; 32],
        NOW,
        envelope::DEFAULT_TTL_SECS,
        b"hi",
        &mut rng,
    )
    .expect("seals");
    let (mut a_prekeys, _) = PrekeySecrets::generate(&alice, NOW, &mut rng);
    let mut a_replay = ReplayCache::new();
    let a_rec = std::mem::take(&mut a_record);
    a_record = open_message(
        &alice,
        &mut a_prekeys,
        &mut a_replay,
        |_| Some(a_rec),
        &reply,
        NOW,
    )
    .expect("opens")
    .record;
    g.bench_function("session_message_1KiB_seal_and_open", |bench| {
        bench.iter(|| {
            let env = seal_message(
                &alice,
                &mut a_record,
                None,
                &bob.public(),
                [0; 32],
                NOW,
                envelope::DEFAULT_TTL_SECS,
                black_box(&body),
                &mut rng,
            )
            .expect("seals");
            let rec = std::mem::take(&mut b_record);
            let got = open_message(
                &bob,
                &mut b_prekeys,
                &mut b_replay,
                |_| Some(rec),
                &env,
                NOW,
            )
            .expect("opens");
            b_record = got.record;
            got.plaintext.len()
        })
    });

    // The same established session through pair envelopes (seal_pair_message /
    // open_pair_message): ratchet plus a symmetric envelope keyed by the pair secret, as the
    // node sends once the partner has written back.
    let a_key = PairEnvelopeKey::derive(&pair_secret(&alice, &bob.public()), &bob.public(), 7);
    let b_key = PairEnvelopeKey::derive(&pair_secret(&bob, &alice.public()), &bob.public(), 7);
    g.bench_function("pair_message_1KiB_seal_and_open", |bench| {
        bench.iter(|| {
            let env = seal_pair_message(
                &mut a_record,
                &bob.public(),
                &a_key,
                [0; 32],
                NOW,
                envelope::DEFAULT_TTL_SECS,
                black_box(&body),
                &mut rng,
            )
            .expect("seals");
            let rec = std::mem::take(&mut b_record);
            let got = open_pair_message(
                &bob,
                &mut b_prekeys,
                &mut b_replay,
                |_| Some(rec),
                &alice.public(),
                &b_key,
                &env,
                NOW,
            )
            .expect("opens");
            b_record = got.record;
            got.plaintext.len()
        })
    });
    g.finish();
}

criterion_group!(benches, primitives, composite);
criterion_main!(benches);
