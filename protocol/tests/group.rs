//! Group channels end to end, through the public API only: membership, invites, sender keys,
//! sealing and opening, removal, concurrent ops, limits and hostile bytes.

use std::collections::HashMap;

use meshchat_protocol::{
    addressing::epoch,
    content::{Content, ContentError, MessageId},
    envelope::{ciphertext_len, BUCKETS, MAX_ENVELOPE_BYTES},
    group::{
        check_group_envelope, decode_group_envelope, group_key_id, group_mailbox, open_group,
        seal_group, topic_for, Applied, GroupBody, GroupControl, GroupError, GroupId, GroupInvite,
        GroupPlaintext, GroupSnapshot, GroupState, MembershipChange, MembershipOp, ReceiverChain,
        Role, SenderChain, SenderKeyDistribution, GROUP_TOPIC_PREFIX, GROUP_TTL_SECS,
        INVITE_MAX_AGE_MS, MAX_GROUP_MEMBERS, MAX_GROUP_SKIP, MAX_GROUP_STORED_SKIPPED,
    },
    wire::Wire,
    Envelope, Identity, PublicIdentity,
};
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const NOW_MS: u64 = 1_700_000_000_000;
const NOW: u64 = NOW_MS / 1000;

fn id(n: u8) -> Identity {
    Identity::from_seed(&[n; 32])
}

fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// One member's device: identity, group state, own chain and the chains of the others.
struct Device {
    me: Identity,
    state: GroupState,
    secret: [u8; 32],
    chain: SenderChain,
    chain_epoch: u64,
    receivers: HashMap<[u8; 16], ReceiverChain>,
}

impl Device {
    fn public(&self) -> PublicIdentity {
        self.me.public()
    }

    fn distribution(&self) -> SenderKeyDistribution {
        self.chain
            .distribution(self.state.id(), self.chain_epoch, self.public())
    }

    /// Receive a hand-out as the node would: over 1:1 content, checked, then kept.
    fn receive_key(&mut self, from: &PublicIdentity, dist: SenderKeyDistribution) {
        let bytes = Content::Group(GroupControl::SenderKey(dist))
            .encode()
            .expect("encodes");
        let Content::Group(GroupControl::SenderKey(dist)) =
            Content::decode(&bytes).expect("decodes")
        else {
            panic!("wrong content")
        };
        dist.check(&self.state, from).expect("acceptable hand-out");
        self.receivers
            .insert(dist.key_id, ReceiverChain::from_distribution(&dist));
    }

    fn send(&mut self, text: &str, r: &mut ChaCha20Rng) -> Envelope {
        seal_group(
            &self.state,
            &self.me,
            &mut self.chain,
            &self.secret,
            GroupBody::Text(text.into()),
            MessageId::random(r),
            NOW_MS,
            r,
        )
        .expect("seals")
    }

    fn open(&mut self, env: &Envelope) -> Result<GroupPlaintext, GroupError> {
        let (key_id, _) = group_key_id(env)?;
        let chain = self
            .receivers
            .get_mut(&key_id)
            .ok_or(GroupError::UnknownSenderKey { key_id })?;
        open_group(&self.state, chain, env, NOW + 5)
    }

    fn new_chain(&mut self, r: &mut ChaCha20Rng) {
        self.chain = SenderChain::new(r);
        self.chain_epoch = self.state.epoch();
    }
}

fn text(p: &GroupPlaintext) -> &str {
    match &p.body {
        GroupBody::Text(t) => t,
        other => panic!("not a text: {other:?}"),
    }
}

/// Alice creates "friends" and adds seeds 2..=n one by one (each added member joins by invite
/// and applies the later Adds); then everyone hands its chain to everyone else.
fn group_of(n: u8, r: &mut ChaCha20Rng) -> Vec<Device> {
    let alice = id(1);
    let (state, secret, genesis) =
        GroupState::create(&alice, "friends", NOW_MS, r).expect("creates");
    assert_eq!(genesis.seq(), 0);
    assert_eq!(
        GroupState::from_genesis(&genesis).expect("genesis verifies"),
        state
    );
    let mut devices = vec![Device {
        me: alice,
        state,
        secret,
        chain: SenderChain::new(r),
        chain_epoch: 0,
        receivers: HashMap::new(),
    }];
    for k in 2..=n {
        let newcomer = id(k);
        let op = devices[0]
            .state
            .propose(
                &devices[0].me,
                MembershipChange::Add {
                    member: newcomer.public(),
                    role: Role::Member,
                },
                NOW_MS,
            )
            .expect("admin may add");
        for d in devices.iter_mut() {
            assert_eq!(d.state.apply(&op), Ok(Applied::Appended));
        }
        let invite = GroupInvite::new(
            &devices[0].state,
            &devices[0].me,
            &newcomer.public(),
            &devices[0].secret,
            NOW_MS,
        )
        .expect("invite");
        // Over 1:1 content and back.
        let bytes = Content::Group(GroupControl::Invite(invite))
            .encode()
            .expect("encodes");
        let Content::Group(GroupControl::Invite(invite)) =
            Content::decode(&bytes).expect("decodes")
        else {
            panic!("wrong content")
        };
        let verified = invite
            .verify_for(&newcomer.public(), &devices[0].public(), NOW_MS + 1000)
            .expect("verifies");
        let state = GroupState::from_invite(&verified);
        assert_eq!(state.head(), devices[0].state.head());
        assert_eq!(state.snapshot(), devices[0].state.snapshot());
        devices.push(Device {
            me: newcomer,
            state,
            secret: *verified.group_secret(),
            chain: SenderChain::new(r),
            chain_epoch: 0,
            receivers: HashMap::new(),
        });
    }
    for d in devices.iter_mut() {
        d.new_chain(r);
    }
    distribute_all(&mut devices);
    devices
}

fn distribute_all(devices: &mut [Device]) {
    let dists: Vec<(PublicIdentity, SenderKeyDistribution)> = devices
        .iter()
        .map(|d| (d.public(), d.distribution()))
        .collect();
    for d in devices.iter_mut() {
        for (from, dist) in &dists {
            if from != &d.public() {
                d.receive_key(from, dist.clone());
            }
        }
    }
}

#[test]
fn five_members_read_each_other_in_order_and_out_of_order() {
    let mut r = rng(1);
    let mut devices = group_of(5, &mut r);
    assert!(devices
        .iter()
        .all(|d| d.state.member_count() == 5 && d.state.head() == devices[0].state.head()));
    // Round 1: every member sends 4 messages; everyone else reads them in author order.
    // Round 2: 6 more each; read in reverse order (skipped keys), then a shuffled round 3.
    for round in 0..3 {
        let mut sent: Vec<(usize, String, Envelope)> = Vec::new();
        let per = if round == 0 { 4 } else { 6 };
        for (i, d) in devices.iter_mut().enumerate() {
            for m in 0..per {
                let body = format!("round {round} from {i} #{m}");
                let env = d.send(&body, &mut r);
                sent.push((i, body, env));
            }
        }
        match round {
            1 => sent.reverse(),
            2 => {
                let n = sent.len();
                for k in 0..n {
                    sent.swap(k, (k * 7 + 3) % n);
                }
            }
            _ => {}
        }
        for (j, reader) in devices.iter_mut().enumerate() {
            for (i, body, env) in &sent {
                if *i == j {
                    continue;
                }
                let p = reader.open(env).expect("member reads member");
                assert_eq!(text(&p), body);
                assert_eq!(p.author, id(*i as u8 + 1).public());
                assert_eq!(p.group, reader.state.id());
            }
            assert!(reader.receivers.values().all(|c| c.skipped_keys() == 0));
        }
    }
}

#[test]
fn group_envelopes_look_like_any_envelope_and_reveal_no_author() {
    let mut r = rng(2);
    let mut devices = group_of(2, &mut r);
    let env = devices[0].send("hello", &mut r);
    // A mailbox replica accepts it: bucket-sized, in its time window, 7-day TTL.
    env.check(NOW).expect("mailbox accepts");
    assert_eq!(env.ttl, GROUP_TTL_SECS);
    assert_eq!(env.ciphertext.len(), ciphertext_len(BUCKETS[0]));
    let long = devices[0].send(&"x".repeat(5000), &mut r);
    assert_eq!(long.ciphertext.len(), ciphertext_len(BUCKETS[3]));
    // Routed by today's group mailbox, which every member derives alike.
    let keys = group_mailbox(&devices[0].state.id(), &devices[0].secret, epoch(NOW));
    assert_eq!(env.routing_key, keys.id());
    let theirs = group_mailbox(&devices[1].state.id(), &devices[1].secret, epoch(NOW));
    assert_eq!(theirs.id(), keys.id());
    assert_ne!(
        group_mailbox(&devices[0].state.id(), &devices[0].secret, epoch(NOW) + 1).id(),
        keys.id()
    );
    keys.fetch(None, NOW, &mut r)
        .authorise(NOW)
        .expect("members can fetch the group mailbox");
    let bytes = env.to_wire().expect("encodes");
    let author = devices[0].public();
    assert!(!bytes.windows(32).any(|w| w == author.as_bytes().as_slice()));
    assert!(!bytes
        .windows(32)
        .any(|w| w == devices[0].state.id().0.as_slice()));
    assert_eq!(
        decode_group_envelope(&bytes).expect("decodes"),
        env,
        "round trip"
    );
}

#[test]
fn topics_and_ids_reveal_nothing_and_parse() {
    let mut r = rng(3);
    let (state, _, _) = GroupState::create(&id(1), "secret club", NOW_MS, &mut r).expect("create");
    let topic = state.topic();
    assert!(topic.starts_with(GROUP_TOPIC_PREFIX));
    assert_eq!(topic.len(), GROUP_TOPIC_PREFIX.len() + 64);
    assert_eq!(topic, topic_for(&state.group_public()));
    assert!(!topic.contains(&state.id().to_string()));
    assert_eq!(state.id(), GroupId::from_public(&state.group_public()));
    let text = state.id().to_string();
    assert_eq!(text.parse::<GroupId>(), Ok(state.id()));
    assert_eq!(text.to_uppercase().parse::<GroupId>(), Ok(state.id()));
    assert!(text[1..].parse::<GroupId>().is_err());
    assert!(format!("{}g", &text[1..]).parse::<GroupId>().is_err());
    let (other, _, _) = GroupState::create(&id(1), "secret club", NOW_MS, &mut r).expect("create");
    assert_ne!(other.id(), state.id());
    assert_ne!(other.topic(), topic);
    assert_eq!(
        GroupState::create(&id(1), "", NOW_MS, &mut r).map(|_| ()),
        Err(GroupError::BadName)
    );
    assert_eq!(
        GroupState::create(&id(1), &"n".repeat(101), NOW_MS, &mut r).map(|_| ()),
        Err(GroupError::BadName)
    );
}

#[test]
fn replays_are_rejected_and_leave_the_chain_unchanged() {
    let mut r = rng(4);
    let mut devices = group_of(2, &mut r);
    let e0 = devices[0].send("zero", &mut r);
    let e1 = devices[0].send("one", &mut r);
    let e2 = devices[0].send("two", &mut r);
    let bob = &mut devices[1];
    assert_eq!(text(&bob.open(&e0).expect("reads")), "zero");
    assert_eq!(bob.open(&e0), Err(GroupError::Replay { iteration: 0 }));
    assert_eq!(text(&bob.open(&e2).expect("reads")), "two");
    let before = bob.receivers.values().next().expect("chain").to_wire();
    assert_eq!(bob.open(&e2), Err(GroupError::Replay { iteration: 2 }));
    assert_eq!(
        bob.receivers.values().next().expect("chain").to_wire(),
        before
    );
    assert_eq!(text(&bob.open(&e1).expect("late message reads")), "one");
    assert_eq!(bob.open(&e1), Err(GroupError::Replay { iteration: 1 }));
    assert!(!GroupError::Replay { iteration: 1 }.is_hostile());
}

#[test]
fn damaged_envelopes_each_get_their_own_error_and_change_nothing() {
    let mut r = rng(5);
    let mut devices = group_of(2, &mut r);
    let env = devices[0].send("hi", &mut r);
    let bob = &mut devices[1];
    let snapshot = |b: &Device| {
        b.receivers
            .values()
            .map(|c| c.to_wire().expect("enc"))
            .collect::<Vec<_>>()
    };
    let before = snapshot(bob);

    let mut truncated = env.clone();
    truncated.ciphertext.pop();
    let len = truncated.ciphertext.len();
    assert_eq!(bob.open(&truncated), Err(GroupError::NotABucket { len }));

    let mut oversized = env.clone();
    oversized.ciphertext = vec![0; ciphertext_len(BUCKETS[4]) + 1];
    assert_eq!(
        bob.open(&oversized),
        Err(GroupError::TooLarge {
            len: ciphertext_len(BUCKETS[4]) + 1
        })
    );
    let mut huge = env.to_wire().expect("enc");
    huge.resize(MAX_ENVELOPE_BYTES + 1, 0);
    assert!(matches!(
        decode_group_envelope(&huge),
        Err(GroupError::TooLarge { .. })
    ));
    let short = env.to_wire().expect("enc");
    assert!(matches!(
        decode_group_envelope(&short[..short.len() - 3]),
        Err(GroupError::Wire(_))
    ));

    let mut bad_header = env.clone();
    bad_header.ephemeral[31] = 1;
    assert!(matches!(
        bob.open(&bad_header),
        Err(GroupError::Malformed { .. })
    ));

    let mut flipped = env.clone();
    flipped.ciphertext[10] ^= 1;
    assert_eq!(bob.open(&flipped), Err(GroupError::Tampered));
    let mut retimed = env.clone();
    retimed.ttl += 1;
    assert_eq!(bob.open(&retimed), Err(GroupError::Tampered));
    let mut rerouted = env.clone();
    rerouted.routing_key[0] ^= 1;
    assert_eq!(bob.open(&rerouted), Err(GroupError::Tampered));
    // Claiming a later position of the same chain changes the key: tampered.
    let mut moved = env.clone();
    moved.ephemeral[16] = 5;
    assert_eq!(bob.open(&moved), Err(GroupError::Tampered));

    let mut unknown = env.clone();
    unknown.ephemeral[0] ^= 0xff;
    let (key_id, _) = group_key_id(&unknown).expect("header");
    assert_eq!(
        bob.open(&unknown),
        Err(GroupError::UnknownSenderKey { key_id })
    );
    assert!(!GroupError::UnknownSenderKey { key_id }.is_hostile());

    let mut far = env.clone();
    far.ephemeral[16..20].copy_from_slice(&(MAX_GROUP_SKIP + 1).to_le_bytes());
    assert_eq!(
        bob.open(&far),
        Err(GroupError::TooFarAhead {
            iteration: MAX_GROUP_SKIP + 1,
            next: 0
        })
    );

    let chain = bob.receivers.values_mut().next().expect("chain");
    assert_eq!(
        open_group(&bob.state, chain, &env, env.expires_at()),
        Err(GroupError::Expired)
    );
    assert_eq!(
        open_group(&bob.state, chain, &env, NOW - 3600),
        Err(GroupError::FromTheFuture)
    );
    assert_eq!(
        check_group_envelope(&env, NOW),
        Ok(group_key_id(&env).expect("header"))
    );

    assert_eq!(snapshot(bob), before, "a failed open changed the chain");
    assert_eq!(text(&bob.open(&env).expect("the genuine one reads")), "hi");
    for e in [
        GroupError::NotABucket { len: 1 },
        GroupError::TooLarge { len: 1 },
        GroupError::Tampered,
        GroupError::Malformed { why: "x" },
    ] {
        assert!(e.is_hostile(), "{e}");
    }
}

#[test]
fn the_skip_window_and_stored_key_cap_are_exact() {
    let mut r = rng(6);
    let mut devices = group_of(2, &mut r);
    let total = 3 * (MAX_GROUP_SKIP as usize + 1);
    let sent: Vec<Envelope> = (0..total)
        .map(|i| devices[0].send(&format!("m{i}"), &mut r))
        .collect();
    let bob = &mut devices[1];
    let step = MAX_GROUP_SKIP as usize + 1;
    // Each of these skips exactly MAX_GROUP_SKIP keys: accepted.
    for k in 1..=3 {
        let i = k * step - 1;
        assert_eq!(
            text(&bob.open(&sent[i]).expect("at the cap")),
            format!("m{i}")
        );
    }
    let chain = bob.receivers.values().next().expect("chain");
    assert_eq!(chain.skipped_keys(), MAX_GROUP_STORED_SKIPPED);
    // The oldest 1,000 were evicted; the rest still read.
    assert_eq!(bob.open(&sent[0]), Err(GroupError::Replay { iteration: 0 }));
    assert_eq!(
        text(&bob.open(&sent[step]).expect("kept")),
        format!("m{step}")
    );
    assert_eq!(
        bob.receivers
            .values()
            .next()
            .expect("chain")
            .next_iteration() as usize,
        total
    );
}

#[test]
fn non_members_forgers_and_removed_members_are_kept_out() {
    let mut r = rng(7);
    let mut devices = group_of(5, &mut r);
    let mallory = id(66);

    // A non-member's hand-out is refused; one relayed by someone else is refused too.
    let fake = SenderChain::new(&mut r).distribution(devices[0].state.id(), 0, mallory.public());
    assert_eq!(
        fake.check(&devices[0].state, &mallory.public()),
        Err(GroupError::NotMember)
    );
    assert!(matches!(
        devices[1]
            .distribution()
            .check(&devices[0].state, &mallory.public()),
        Err(GroupError::Forged { .. })
    ));
    let mut elsewhere = devices[1].distribution();
    elsewhere.group = GroupId([9; 32]);
    assert_eq!(
        elsewhere.check(&devices[0].state, &devices[1].public()),
        Err(GroupError::WrongGroup)
    );
    // A non-member cannot seal into the group, and cannot propose ops.
    let mut mallory_chain = SenderChain::new(&mut r);
    assert_eq!(
        seal_group(
            &devices[0].state,
            &mallory,
            &mut mallory_chain,
            &devices[0].secret,
            GroupBody::Text("let me in".into()),
            MessageId([1; 16]),
            NOW_MS,
            &mut r,
        ),
        Err(GroupError::NotMember)
    );
    assert_eq!(
        devices[0]
            .state
            .propose(&mallory, MembershipChange::Leave, NOW_MS),
        Err(GroupError::NotMember)
    );

    // Alice removes Erin; everyone (Erin too) applies it.
    let erin_pub = devices[4].public();
    let old_erin_chain_msg = devices[4].send("before removal", &mut r);
    let remove = devices[0]
        .state
        .propose(
            &devices[0].me,
            MembershipChange::Remove { member: erin_pub },
            NOW_MS,
        )
        .expect("admin removes");
    for d in devices.iter_mut() {
        assert_eq!(d.state.apply(&remove), Ok(Applied::Appended));
        assert!(!d.state.is_member(&erin_pub));
        assert_eq!(d.state.rekey_epoch(), remove.seq());
        assert!(d.chain_epoch < d.state.rekey_epoch(), "rotation due");
    }
    // The remover sends a fresh group secret to the remaining members over 1:1.
    let new_secret = [0x5e; 32];
    let rekey = Content::Group(GroupControl::Rekey {
        group: devices[0].state.id(),
        epoch: remove.seq(),
        group_secret: new_secret,
    });
    let dbg = format!("{rekey:?}");
    assert!(
        !dbg.contains("94, 94"),
        "debug output leaks the secret: {dbg}"
    );
    assert_eq!(
        Content::decode(&rekey.encode().expect("enc")).expect("dec"),
        rekey
    );
    let mut erin = devices.pop().expect("erin");
    for d in devices.iter_mut() {
        d.secret = new_secret;
        d.new_chain(&mut r);
    }
    distribute_all(&mut devices);
    // Erin's own old chain was still held by the others: her late messages are refused.
    assert_eq!(
        devices[1].open(&old_erin_chain_msg),
        Err(GroupError::AuthorDeparted)
    );
    // A hand-out from Erin is refused now.
    assert_eq!(
        erin.distribution().check(&devices[1].state, &erin.public()),
        Err(GroupError::NotMember)
    );

    // Messages under the new chains: members read them, Erin cannot.
    let env = devices[2].send("after removal", &mut r);
    assert_ne!(
        env.routing_key,
        group_mailbox(&erin.state.id(), &erin.secret, epoch(NOW)).id(),
        "Erin cannot even find the new mail"
    );
    for reader in [0usize, 1, 3] {
        assert_eq!(
            text(&devices[reader].open(&env).expect("member reads")),
            "after removal"
        );
    }
    let (key_id, _) = group_key_id(&env).expect("header");
    assert_eq!(
        erin.open(&env),
        Err(GroupError::UnknownSenderKey { key_id })
    );
    // Even trying every chain she holds fails.
    let erin_state = erin.state.clone();
    for chain in erin.receivers.values_mut() {
        assert!(open_group(&erin_state, chain, &env, NOW).is_err());
    }
    // Erin, no longer a member in her own state, cannot seal either.
    assert_eq!(
        seal_group(
            &erin.state,
            &erin.me,
            &mut erin.chain,
            &erin.secret,
            GroupBody::Text("still here?".into()),
            MessageId([2; 16]),
            NOW_MS,
            &mut r,
        ),
        Err(GroupError::NotMember)
    );
}

#[test]
fn membership_rights_and_succession() {
    let mut r = rng(8);
    let mut devices = group_of(4, &mut r);
    let (alice, bob, carol) = (id(1), id(2), id(3));
    let state = devices[0].state.clone();
    // Members may not add or remove; nobody removes themselves; nobody is added twice.
    assert!(matches!(
        state.propose(
            &bob,
            MembershipChange::Add {
                member: id(9).public(),
                role: Role::Member
            },
            NOW_MS
        ),
        Err(GroupError::NotAllowed { .. })
    ));
    assert!(matches!(
        state.propose(
            &bob,
            MembershipChange::Remove {
                member: carol.public()
            },
            NOW_MS
        ),
        Err(GroupError::NotAllowed { .. })
    ));
    assert!(matches!(
        state.propose(
            &alice,
            MembershipChange::Remove {
                member: alice.public()
            },
            NOW_MS
        ),
        Err(GroupError::NotAllowed { .. })
    ));
    assert!(matches!(
        state.propose(
            &alice,
            MembershipChange::Add {
                member: bob.public(),
                role: Role::Admin
            },
            NOW_MS
        ),
        Err(GroupError::NotAllowed { .. })
    ));
    assert!(matches!(
        state.propose(
            &alice,
            MembershipChange::Create {
                name: "again".into(),
                group_public: [1; 32]
            },
            NOW_MS
        ),
        Err(GroupError::NotAllowed { .. })
    ));
    // A member may not invite.
    assert!(matches!(
        GroupInvite::new(&state, &bob, &carol.public(), &[0; 32], NOW_MS),
        Err(GroupError::NotAllowed { .. })
    ));
    // The last admin leaves: the longest-standing member (Bob, added first) becomes admin.
    let leave = state
        .propose(&alice, MembershipChange::Leave, NOW_MS)
        .expect("anyone may leave");
    for d in devices.iter_mut() {
        assert_eq!(d.state.apply(&leave), Ok(Applied::Appended));
        assert_eq!(d.state.role(&bob.public()), Some(Role::Admin));
        assert_eq!(d.state.role(&carol.public()), Some(Role::Member));
        assert_eq!(d.state.role(&alice.public()), None);
        assert!(d.state.has_departed(&alice.public()));
        assert!(d.state.was_member_at(&alice.public(), leave.seq() - 1));
        assert!(!d.state.was_member_at(&alice.public(), leave.seq()));
    }
    // Bob can now remove Carol.
    let rm = devices[1]
        .state
        .propose(
            &bob,
            MembershipChange::Remove {
                member: carol.public(),
            },
            NOW_MS,
        )
        .expect("the new admin removes");
    assert_eq!(devices[1].state.apply(&rm), Ok(Applied::Appended));
    assert_eq!(devices[1].state.apply(&rm), Ok(Applied::Duplicate));
    assert_eq!(devices[1].state.member_count(), 2);
}

#[test]
fn ops_arriving_before_their_predecessor_wait_and_then_apply() {
    let mut r = rng(9);
    let devices = group_of(2, &mut r);
    let alice = &devices[0];
    let mut ahead = alice.state.clone();
    let mut ops = Vec::new();
    for k in 0..3u8 {
        let op = ahead
            .propose(
                &alice.me,
                MembershipChange::Add {
                    member: id(20 + k).public(),
                    role: Role::Member,
                },
                NOW_MS,
            )
            .expect("propose");
        assert_eq!(ahead.apply(&op), Ok(Applied::Appended));
        ops.push(op);
    }
    let mut bob = devices[1].state.clone();
    assert_eq!(bob.apply(&ops[2]), Ok(Applied::Pending));
    assert_eq!(bob.apply(&ops[1]), Ok(Applied::Pending));
    assert_eq!(bob.apply(&ops[1]), Ok(Applied::Duplicate));
    assert_eq!(bob.pending_ops().count(), 2);
    assert_eq!(bob.apply(&ops[0]), Ok(Applied::Appended));
    assert_eq!(bob.head(), ahead.head());
    assert_eq!(bob.epoch(), ahead.epoch());
    assert_eq!(bob.pending_ops().count(), 0);
    assert_eq!(bob.recent_ops().count(), 3);
    // Persisted and restored, the state is the same.
    let back = GroupState::from_wire(&bob.to_wire().expect("enc")).expect("dec");
    assert_eq!(back, bob);
}

/// Proposals on an older head, by several admins; returns all ops.
fn forked_ops(r: &mut ChaCha20Rng) -> (GroupState, Vec<MembershipOp>) {
    let devices = group_of(4, r);
    let (alice, bob) = (id(1), id(2));
    let mut base = devices[0].state.clone();
    let promote = base
        .propose(
            &alice,
            MembershipChange::Add {
                member: id(30).public(),
                role: Role::Admin,
            },
            NOW_MS,
        )
        .expect("propose");
    base.apply(&promote).expect("apply");
    let admin2 = id(30);
    let mut ops = Vec::new();
    // Three concurrent ops on the same head by three different authors.
    let a1 = base
        .propose(
            &alice,
            MembershipChange::Add {
                member: id(40).public(),
                role: Role::Member,
            },
            NOW_MS,
        )
        .expect("a1");
    let b1 = base
        .propose(
            &admin2,
            MembershipChange::Remove {
                member: id(4).public(),
            },
            NOW_MS,
        )
        .expect("b1");
    let c1 = base
        .propose(&bob, MembershipChange::Leave, NOW_MS)
        .expect("c1");
    // A follow-up on each branch.
    for (first, author, change) in [
        (
            &a1,
            &admin2,
            MembershipChange::Add {
                member: id(41).public(),
                role: Role::Member,
            },
        ),
        (
            &b1,
            &alice,
            MembershipChange::Remove {
                member: id(3).public(),
            },
        ),
        (&c1, &alice, MembershipChange::Leave),
    ] {
        let mut branch = base.clone();
        branch.apply(first).expect("branch");
        let second = branch.propose(author, change, NOW_MS).expect("second");
        ops.push(second);
    }
    ops.extend([a1, b1, c1]);
    (base, ops)
}

#[test]
fn concurrent_ops_converge_whatever_the_order() {
    let mut r = rng(10);
    let (base, ops) = forked_ops(&mut r);
    let mut reference = base.clone();
    for op in &ops {
        reference.apply(op).expect("applies");
    }
    // The winner at the fork is the lowest-hash op; its follow-up extends it.
    let first_round: Vec<&MembershipOp> =
        ops.iter().filter(|o| o.seq() == base.epoch() + 1).collect();
    let winner = first_round
        .iter()
        .min_by_key(|o| o.hash())
        .expect("three ops");
    assert_eq!(reference.epoch(), base.epoch() + 2);
    assert!(reference.recent_ops().any(|o| o == *winner));
    // Two specific orders: the winner first, and the winner last.
    let mut winner_last = base.clone();
    for op in ops.iter().filter(|o| o != winner) {
        winner_last.apply(op).expect("applies");
    }
    let outcome = winner_last.apply(winner).expect("applies");
    assert!(
        matches!(outcome, Applied::ReplacedHead { ref dropped } if !dropped.is_empty()),
        "{outcome:?}"
    );
    assert_eq!(winner_last.head(), reference.head());
    let mut winner_first = base.clone();
    assert_eq!(winner_first.apply(winner), Ok(Applied::Appended));
    for op in first_round.iter().filter(|o| **o != *winner) {
        assert_eq!(winner_first.apply(op), Ok(Applied::Lost));
    }
    assert_eq!(winner_first.epoch(), base.epoch() + 1);
    // The losing authors re-issue on the new head, where still valid; it applies everywhere.
    let authors = [id(1), id(2), id(30)];
    let mut reissued = 0;
    for loser in first_round.iter().filter(|o| **o != *winner) {
        let author = authors
            .iter()
            .find(|a| &a.public() == loser.author())
            .expect("known author");
        if let Ok(again) = winner_first.propose(author, loser.change().clone(), NOW_MS + 1) {
            assert_eq!(again.prev(), winner_first.head());
            let mut elsewhere = winner_last.clone();
            assert_eq!(winner_first.apply(&again), Ok(Applied::Appended));
            // Where the winner's follow-up is already applied, the re-issued op competes
            // with it; either way both sides agree once they hold the same ops.
            elsewhere.apply(&again).expect("applies");
            let follow_up = winner_last.recent_ops().last().expect("follow-up").clone();
            winner_first.apply(&follow_up).expect("applies");
            assert_eq!(winner_first.head(), elsewhere.head());
            reissued += 1;
            break;
        }
    }
    assert_eq!(reissued, 1, "some loser could re-issue");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_order_of_concurrent_ops_gives_the_same_log(order in Just((0..6usize).collect::<Vec<_>>()).prop_shuffle()) {
        let mut r = rng(11);
        let (base, ops) = forked_ops(&mut r);
        let mut reference = base.clone();
        for op in &ops {
            reference.apply(op).expect("applies");
        }
        let mut state = base.clone();
        for &i in &order {
            let outcome = state.apply(&ops[i]);
            prop_assert!(outcome.is_ok(), "{:?}", outcome);
        }
        prop_assert_eq!(state.head(), reference.head());
        prop_assert_eq!(state.snapshot(), reference.snapshot());
        // Applying everything again changes nothing.
        for op in &ops {
            prop_assert_eq!(state.apply(op), Ok(Applied::Duplicate));
        }
    }
}

#[test]
fn invites_are_checked() {
    let mut r = rng(12);
    let devices = group_of(3, &mut r);
    let alice = &devices[0];
    let carol = id(3);
    let invite = GroupInvite::new(
        &alice.state,
        &alice.me,
        &carol.public(),
        &alice.secret,
        NOW_MS,
    )
    .expect("invite");
    assert_eq!(invite.code().len(), 16);
    assert_eq!(
        invite.clone().verify(NOW_MS).expect("ok").code(),
        invite.code()
    );
    // Wrong inviter (presented as from someone else), wrong invitee.
    assert!(matches!(
        invite
            .clone()
            .verify_for(&carol.public(), &id(2).public(), NOW_MS),
        Err(GroupError::BadInvite { .. })
    ));
    assert!(matches!(
        invite
            .clone()
            .verify_for(&id(2).public(), &alice.public(), NOW_MS),
        Err(GroupError::BadInvite { .. })
    ));
    // Age.
    assert_eq!(
        invite.clone().verify(NOW_MS + INVITE_MAX_AGE_MS + 1),
        Err(GroupError::Expired)
    );
    assert_eq!(
        invite.clone().verify(NOW_MS - 3_600_000),
        Err(GroupError::FromTheFuture)
    );
    // Any byte of the signed part altered: the signature no longer verifies (or it no longer
    // decodes).
    let bytes = invite.to_wire().expect("enc");
    for at in (1..bytes.len() - 64).step_by(7) {
        let mut t = bytes.clone();
        t[at] ^= 0x01;
        if let Ok(tampered) = GroupInvite::from_wire(&t) {
            let result = tampered.verify(NOW_MS);
            assert!(
                matches!(
                    result,
                    Err(GroupError::BadInvite { .. })
                        | Err(GroupError::BadName)
                        | Err(GroupError::TooManyMembers)
                ),
                "byte {at}: {result:?}"
            );
        }
    }
    // Someone not yet added cannot be invited.
    assert!(matches!(
        GroupInvite::new(
            &alice.state,
            &alice.me,
            &id(50).public(),
            &alice.secret,
            NOW_MS
        ),
        Err(GroupError::BadInvite { .. })
    ));
}

#[test]
fn a_thousand_member_invite_fits_one_message() {
    let mut r = rng(13);
    let alice = id(1);
    let name = "n".repeat(100);
    let (mut state, secret, _) = GroupState::create(&alice, &name, NOW_MS, &mut r).expect("create");
    let members: Vec<Identity> = (0..MAX_GROUP_MEMBERS as u32 - 1)
        .map(|i| {
            let mut seed = [7u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            Identity::from_seed(&seed)
        })
        .collect();
    for m in &members {
        let op = state
            .propose(
                &alice,
                MembershipChange::Add {
                    member: m.public(),
                    role: Role::Member,
                },
                NOW_MS,
            )
            .expect("room left");
        assert_eq!(state.apply(&op), Ok(Applied::Appended));
    }
    assert_eq!(state.member_count(), MAX_GROUP_MEMBERS);
    assert_eq!(
        state.propose(
            &alice,
            MembershipChange::Add {
                member: id(200).public(),
                role: Role::Member
            },
            NOW_MS
        ),
        Err(GroupError::TooManyMembers)
    );
    let last = members.last().expect("members");
    let invite = GroupInvite::new(&state, &alice, &last.public(), &secret, NOW_MS).expect("invite");
    let content = Content::Group(GroupControl::Invite(invite));
    let bytes = content.encode().expect("fits the 1:1 content limit");
    assert!(bytes.len() <= meshchat_protocol::content::MAX_CONTENT_BYTES);
    assert!(bytes.len() > 44_000, "{} bytes", bytes.len());
    let Content::Group(GroupControl::Invite(back)) = Content::decode(&bytes).expect("decodes")
    else {
        panic!("wrong content")
    };
    let verified = back
        .verify_for(&last.public(), &alice.public(), NOW_MS)
        .expect("verifies");
    let joined = GroupState::from_invite(&verified);
    assert_eq!(joined.member_count(), MAX_GROUP_MEMBERS);
    assert_eq!(joined.head(), state.head());
    // The full state persists within its limit.
    let stored = state.to_wire().expect("state fits its limit");
    assert_eq!(GroupState::from_wire(&stored).expect("decodes"), state);
}

#[test]
fn chains_and_states_resume_from_their_wire_form() {
    let mut r = rng(14);
    let mut devices = group_of(2, &mut r);
    let early = devices[0].send("early", &mut r);
    let late = devices[0].send("late", &mut r);
    // Bob reads the late one, persists, restarts, reads the early one.
    assert_eq!(text(&devices[1].open(&late).expect("reads")), "late");
    let bob = &mut devices[1];
    let restored: HashMap<_, _> = bob
        .receivers
        .iter()
        .map(|(k, c)| {
            (
                *k,
                ReceiverChain::from_wire(&c.to_wire().expect("enc")).expect("dec"),
            )
        })
        .collect();
    bob.receivers = restored;
    bob.state = GroupState::from_wire(&bob.state.to_wire().expect("enc")).expect("dec");
    assert_eq!(text(&bob.open(&early).expect("skipped key kept")), "early");
    // Alice's chain resumes where it was.
    let alice = &mut devices[0];
    alice.chain = SenderChain::from_wire(&alice.chain.to_wire().expect("enc")).expect("dec");
    assert_eq!(alice.chain.iteration(), 2);
    let next = alice.send("after restart", &mut r);
    assert_eq!(group_key_id(&next).expect("header").1, 2);
    assert_eq!(
        text(&devices[1].open(&next).expect("reads")),
        "after restart"
    );
    // Debug output shows no key.
    let dist = devices[0].distribution();
    let dbg = format!(
        "{:?} {:?} {:?}",
        devices[0].chain, dist, devices[1].receivers
    );
    assert!(!dbg.contains(&format!("{:?}", dist.chain_key)[1..20]));
}

#[test]
fn group_ops_travel_inside_group_messages() {
    let mut r = rng(15);
    let mut devices = group_of(3, &mut r);
    let op = devices[0]
        .state
        .propose(
            &devices[0].me,
            MembershipChange::Add {
                member: id(60).public(),
                role: Role::Member,
            },
            NOW_MS,
        )
        .expect("propose");
    devices[0].state.apply(&op).expect("apply");
    let a = &mut devices[0];
    let env = seal_group(
        &a.state,
        &a.me,
        &mut a.chain,
        &a.secret,
        GroupBody::Op(op.clone()),
        MessageId([3; 16]),
        NOW_MS,
        &mut r,
    )
    .expect("seals");
    // Bob reads it before he knows the op (the message's epoch is ahead of his, but Alice
    // is a member he knows), then applies it.
    let p = devices[1].open(&env).expect("reads");
    assert!(p.epoch > devices[1].state.epoch());
    let GroupBody::Op(received) = p.body else {
        panic!("not an op")
    };
    assert_eq!(devices[1].state.apply(&received), Ok(Applied::Appended));
    assert_eq!(devices[1].state.head(), devices[0].state.head());
    // Empty texts are refused at sealing.
    let a = &mut devices[0];
    assert_eq!(
        seal_group(
            &a.state,
            &a.me,
            &mut a.chain,
            &a.secret,
            GroupBody::Text(String::new()),
            MessageId([4; 16]),
            NOW_MS,
            &mut r,
        ),
        Err(GroupError::EmptyText)
    );
}

#[test]
fn content_limits_apply_to_group_control() {
    let mut r = rng(16);
    let devices = group_of(2, &mut r);
    let dist = devices[0].distribution();
    let c = Content::Group(GroupControl::SenderKey(dist));
    let bytes = c.encode().expect("enc");
    // Variant index 2, then GroupControl variant 1.
    assert_eq!(&bytes[..9], &[1, 2, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(Content::decode(&bytes).expect("dec"), c);
    let op = devices[0]
        .state
        .propose(&devices[0].me, MembershipChange::Leave, NOW_MS)
        .expect("leave");
    assert_eq!(
        Content::decode(
            &Content::Group(GroupControl::Op(op.clone()))
                .encode()
                .expect("enc")
        )
        .expect("dec"),
        Content::Group(GroupControl::Op(op))
    );
    // An unknown GroupControl variant is refused by the decoder.
    let mut unknown = bytes.clone();
    unknown[5] = 9;
    assert!(matches!(
        Content::decode(&unknown),
        Err(ContentError::Wire(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Random trees of ops (each proposed on a random earlier point, by an admin of that point)
    /// applied in two random orders give the same log.
    #[test]
    fn random_op_trees_converge(seed in any::<u64>(), n in 3usize..10) {
        use rand::seq::SliceRandom;
        use rand_core::RngCore;
        let mut r = rng(seed);
        let devices = group_of(3, &mut r);
        let base = devices[0].state.clone();
        let people: Vec<Identity> = (1..=3).chain(70..90).map(id).collect();
        let mut nodes = vec![base.clone()];
        let mut ops = Vec::new();
        for k in 0..n {
            let parent = nodes[(r.next_u32() as usize) % nodes.len()].clone();
            let admins: Vec<&Identity> = people
                .iter()
                .filter(|p| parent.role(&p.public()) == Some(Role::Admin))
                .collect();
            let Some(author) = admins.choose(&mut r).copied() else { continue };
            let change = match r.next_u32() % 3 {
                0 => MembershipChange::Add {
                    member: id(70 + (r.next_u32() % 20) as u8).public(),
                    role: if r.next_u32().is_multiple_of(2) { Role::Admin } else { Role::Member },
                },
                1 => {
                    let others: Vec<PublicIdentity> = parent
                        .members()
                        .map(|(m, _)| *m)
                        .filter(|m| m != &author.public())
                        .collect();
                    match others.choose(&mut r) {
                        Some(m) => MembershipChange::Remove { member: *m },
                        None => MembershipChange::Leave,
                    }
                }
                _ => MembershipChange::Leave,
            };
            if let Ok(op) = parent.propose(author, change, NOW_MS + k as u64) {
                let mut child = parent.clone();
                prop_assert_eq!(child.apply(&op), Ok(Applied::Appended));
                nodes.push(child);
                ops.push(op);
            }
        }
        let mut results = Vec::new();
        for _ in 0..2 {
            let mut order = ops.clone();
            order.shuffle(&mut r);
            let mut state = base.clone();
            for op in &order {
                let outcome = state.apply(op);
                prop_assert!(outcome.is_ok(), "{:?}", outcome);
            }
            results.push((state.head(), state.snapshot()));
        }
        prop_assert_eq!(&results[0], &results[1]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_any_group_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let _ = MembershipOp::from_wire(&bytes);
        let _ = GroupSnapshot::from_wire(&bytes);
        let _ = GroupState::from_wire(&bytes);
        let _ = SenderChain::from_wire(&bytes);
        let _ = ReceiverChain::from_wire(&bytes);
        let _ = SenderKeyDistribution::from_wire(&bytes);
        let _ = GroupBody::from_wire(&bytes);
        let _ = GroupPlaintext::from_wire(&bytes);
        let _ = GroupControl::from_wire(&bytes);
        if let Ok(invite) = GroupInvite::from_wire(&bytes) {
            let _ = invite.verify(NOW_MS);
        }
        let _ = Content::decode(&bytes);
        let _ = decode_group_envelope(&bytes);
        let _ = String::from_utf8_lossy(&bytes).parse::<GroupId>();
        // With a Content::Group prefix, so the decoder reaches the group types.
        let mut prefixed = vec![1u8, 2, 0, 0, 0];
        prefixed.extend_from_slice(&bytes);
        let _ = Content::decode(&prefixed);
    }

    #[test]
    fn arbitrary_envelopes_never_panic_open_or_change_the_chain(
        rk in any::<[u8; 32]>(),
        header in any::<[u8; 32]>(),
        ts in any::<u64>(),
        ttl in any::<u32>(),
        bucket in 0usize..3,
        junk in any::<u8>(),
        keep_key_id in any::<bool>(),
    ) {
        let mut r = rng(17);
        let (state, _, _) = GroupState::create(&id(1), "g", NOW_MS, &mut r).expect("create");
        let chain = SenderChain::new(&mut r);
        let mut receiver = ReceiverChain::from_distribution(&chain.distribution(state.id(), 0, id(1).public()));
        let before = receiver.to_wire().expect("enc");
        let mut ephemeral = header;
        if keep_key_id {
            ephemeral[..16].copy_from_slice(&chain.key_id());
            ephemeral[20..].fill(0);
        }
        let env = Envelope { routing_key: rk, timestamp: ts, ttl, ephemeral, ciphertext: vec![junk; ciphertext_len(BUCKETS[bucket])] };
        prop_assert!(open_group(&state, &mut receiver, &env, NOW).is_err());
        prop_assert!(open_group(&state, &mut receiver, &env, ts.saturating_add(1)).is_err());
        prop_assert_eq!(receiver.to_wire().expect("enc"), before);
    }
}
