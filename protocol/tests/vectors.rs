//! Known-answer vectors: recompute every value listed in `docs/test-vectors.md` from fixed seeds
//! and a deterministic RNG, and compare with the file, so the document and the code cannot drift.
//!
//! When the format changes on purpose, regenerate the block:
//! `MESHCHAT_WRITE_VECTORS=1 cargo test -p meshchat-protocol --test vectors` rewrites it in place;
//! `MESHCHAT_PRINT_VECTORS=1` only prints it.

use meshchat_protocol::{
    addressing::{epoch, first_contact_mailbox, mailbox_key, pair_secret},
    content::{Content, MessageId},
    envelope::{self, Envelope},
    identity::{Identity, SafetyNumber, UserId},
    mailbox::MailboxKeys,
    prekey::{PrekeyBundle, PrekeySecrets},
    records::{bundle_record_key, validate_record, Presence, PresenceKeys, PresencePeer},
    wire::Wire,
};
use rand_chacha::{rand_core::SeedableRng, ChaCha20Rng};

/// The time every vector is computed at (2023-11-14T22:13:20Z).
const NOW: u64 = 1_700_000_000;
const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/test-vectors.md");
const BEGIN: &str = "<!-- vectors:begin -->";
const END: &str = "<!-- vectors:end -->";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every vector, in the order of the document.
fn compute() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, val: String| v.push((k.to_owned(), val));

    // Identities from a deterministic RNG seeded with 32 bytes of 0x42.
    let mut rng = ChaCha20Rng::from_seed([0x42; 32]);
    let alice = Identity::generate(&mut rng);
    let bob = Identity::generate(&mut rng);
    for (name, who) in [("alice", &alice), ("bob", &bob)] {
        put(&format!("{name}.seed"), hex(who.seed().as_ref()));
        put(&format!("{name}.public"), hex(who.public().as_bytes()));
        put(
            &format!("{name}.x25519_public"),
            hex(who.public().x25519_public().as_bytes()),
        );
        put(&format!("{name}.user_id"), who.user_id().to_string());
        put(
            &format!("{name}.recovery_phrase"),
            who.recovery_phrase().to_string(),
        );
    }
    put(
        "safety_number",
        SafetyNumber::compute(&alice.public(), &bob.public()).to_string(),
    );
    put(
        "alice.signature(test, \"meshchat\")",
        hex(&alice.sign(b"test", b"meshchat")),
    );

    // Addressing.
    let pair = pair_secret(&alice, &bob.public());
    let e = epoch(NOW);
    put("now", NOW.to_string());
    put("epoch", e.to_string());
    put("pair_secret(alice, bob)", hex(pair.as_bytes()));
    put(
        "mailbox_key(pair, bob, epoch)",
        hex(&mailbox_key(&pair, &bob.public(), e)),
    );
    put(
        "mailbox_key(pair, alice, epoch)",
        hex(&mailbox_key(&pair, &alice.public(), e)),
    );
    put(
        "first_contact_mailbox(bob)",
        hex(&first_contact_mailbox(&bob.public())),
    );

    // Bob's prekey bundle: his secrets from the same RNG, continuing.
    let (_secrets, bundle) = PrekeySecrets::generate(&bob, NOW, &mut rng);
    put(
        "bundle_record_key(bob)",
        hex(&bundle_record_key(&bob.public())),
    );
    put("bundle(bob).signed_bytes", hex(&bundle.signed_bytes()));
    put(
        "bundle(bob).wire",
        hex(&bundle.to_wire().expect("bundle encodes")),
    );

    // Alice's presence for the pair in this epoch.
    let keys = PresenceKeys::derive(&pair, &alice.public(), e);
    put(
        "presence_keys(pair, alice, epoch).public_key",
        hex(&keys.public_key()),
    );
    put(
        "presence_keys(pair, alice, epoch).dht_key",
        hex(&keys.dht_key()),
    );
    let presence = Presence {
        peers: vec![PresencePeer {
            peer_id: vec![0x00, 0x24, 0x08, 0x01, 0x12, 0x20, 0xaa, 0xbb],
            // /ip4/192.0.2.1/tcp/4001
            addrs: vec![vec![0x04, 192, 0, 2, 1, 0x06, 0x0f, 0xa1]],
        }],
    };
    let record = keys
        .seal(&presence, 1, NOW + 3600, &mut rng)
        .expect("presence seals");
    put(
        "presence_record(seq 1, expires now+3600).wire",
        hex(&record.to_wire().expect("record encodes")),
    );

    // Content and a sealed envelope from Alice to Bob's pair mailbox.
    let content = Content::Text {
        id: MessageId([0x11; 16]),
        seq: 1,
        sent_at_ms: NOW * 1000,
        body: "hello, bob".into(),
    };
    let content_bytes = content.encode().expect("content encodes");
    put("content(text \"hello, bob\").wire", hex(&content_bytes));
    let env = envelope::seal(
        &alice,
        &bob.public(),
        mailbox_key(&pair, &bob.public(), e),
        NOW,
        envelope::DEFAULT_TTL_SECS,
        &content_bytes,
        &mut rng,
    )
    .expect("envelope seals");
    put(
        "envelope(alice -> bob, content above).wire",
        hex(&env.to_wire().expect("envelope encodes")),
    );
    put("envelope.id", hex(&env.id()));

    // A pair envelope from Alice to Bob (established session), routed by Bob's pair mailbox.
    let pair_key = envelope::PairEnvelopeKey::derive(&pair, &bob.public(), e);
    put(
        "pair_envelope_key(pair, bob, epoch)",
        hex(pair_key.as_bytes()),
    );
    let route = MailboxKeys::derive(&pair, &bob.public(), e).id();
    put("pair_mailbox_id(pair, bob, epoch)", hex(&route));
    let env = envelope::seal_pair(
        &pair_key,
        route,
        NOW,
        envelope::DEFAULT_TTL_SECS,
        &content_bytes,
        &mut rng,
    )
    .expect("pair envelope seals");
    put(
        "pair_envelope(alice -> bob, content above).wire",
        hex(&env.to_wire().expect("envelope encodes")),
    );
    v
}

/// The `name = value` lines between the markers of the document.
fn parse(doc: &str) -> Vec<(String, String)> {
    let start = doc
        .find(BEGIN)
        .expect("begin marker in docs/test-vectors.md");
    let end = doc.find(END).expect("end marker in docs/test-vectors.md");
    doc[start + BEGIN.len()..end]
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn render(vectors: &[(String, String)]) -> String {
    let mut out = format!("{BEGIN}\n```text\n");
    for (k, v) in vectors {
        out.push_str(&format!("{k} = {v}\n"));
    }
    out.push_str(&format!("```\n{END}"));
    out
}

#[test]
fn document_matches_the_code() {
    let fresh = compute();
    if std::env::var_os("MESHCHAT_PRINT_VECTORS").is_some() {
        println!("{}", render(&fresh));
    }
    let doc = std::fs::read_to_string(DOC).expect("docs/test-vectors.md is readable");
    if std::env::var_os("MESHCHAT_WRITE_VECTORS").is_some() {
        let start = doc.find(BEGIN).expect("begin marker");
        let end = doc.find(END).expect("end marker") + END.len();
        let new = format!("{}{}{}", &doc[..start], render(&fresh), &doc[end..]);
        std::fs::write(DOC, new).expect("docs/test-vectors.md is writable");
        return;
    }
    let listed = parse(&doc);
    let mut problems = Vec::new();
    for (k, v) in &fresh {
        match listed.iter().find(|(lk, _)| lk == k) {
            None => problems.push(format!("missing in the document: {k}")),
            Some((_, lv)) if lv != v => {
                problems.push(format!("{k}:\n  document: {lv}\n  code:     {v}"))
            }
            Some(_) => {}
        }
    }
    for (k, _) in &listed {
        if !fresh.iter().any(|(fk, _)| fk == k) {
            problems.push(format!("in the document but not computed: {k}"));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/test-vectors.md disagrees with the code (MESHCHAT_WRITE_VECTORS=1 regenerates it):\n{}",
        problems.join("\n")
    );
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The document's values, read back, behave as the spec says (decode, verify, open).
#[test]
fn documented_values_decode_verify_and_open() {
    let doc = std::fs::read_to_string(DOC).expect("docs/test-vectors.md is readable");
    let listed = parse(&doc);
    let get = |k: &str| {
        listed
            .iter()
            .find(|(lk, _)| lk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} listed"))
    };
    let alice = Identity::from_recovery_phrase(&get("alice.recovery_phrase")).expect("phrase");
    let bob_seed: [u8; 32] = unhex(&get("bob.seed")).try_into().expect("32 bytes");
    let bob = Identity::from_seed(&bob_seed);
    let alice_id: UserId = get("alice.user_id").parse().expect("user id");
    assert_eq!(alice_id.public(), alice.public());
    assert_eq!(hex(alice.public().as_bytes()), get("alice.public"));

    let bundle = PrekeyBundle::from_wire(&unhex(&get("bundle(bob).wire"))).expect("bundle");
    let key = unhex(&get("bundle_record_key(bob)"));
    assert!(validate_record(&key, &unhex(&get("bundle(bob).wire")), NOW).is_ok());
    assert_eq!(
        bundle.verify(NOW).expect("verifies").identity(),
        &bob.public()
    );

    let pkey = unhex(&get("presence_keys(pair, alice, epoch).dht_key"));
    let rec = unhex(&get("presence_record(seq 1, expires now+3600).wire"));
    assert!(validate_record(&pkey, &rec, NOW).is_ok());

    let env = Envelope::from_wire(&unhex(&get("envelope(alice -> bob, content above).wire")))
        .expect("envelope");
    let opened = envelope::open(&bob, &env, NOW).expect("bob opens it");
    assert_eq!(opened.sender, alice.public());
    let content = Content::decode(&opened.payload).expect("content");
    assert!(matches!(content, Content::Text { ref body, .. } if body == "hello, bob"));

    // Bob derives the pair-envelope key from his side and opens Alice's pair envelope.
    let env = Envelope::from_wire(&unhex(&get(
        "pair_envelope(alice -> bob, content above).wire",
    )))
    .expect("pair envelope");
    let pair = pair_secret(&bob, &alice.public());
    let e = epoch(env.timestamp);
    assert_eq!(
        hex(&MailboxKeys::derive(&pair, &bob.public(), e).id()),
        hex(&env.routing_key)
    );
    let key = envelope::PairEnvelopeKey::derive(&pair, &bob.public(), e);
    let payload = envelope::open_pair(&key, &env, NOW).expect("bob opens it");
    assert_eq!(payload, opened.payload);
}
