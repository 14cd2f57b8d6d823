//! Group decoders (ops, snapshots, invites, sender keys, stored states) and the opening of group
//! envelopes, as gossipsub peers, mailbox replicas and 1:1 contacts deliver them.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshchat_protocol::{
    group::{
        decode_group_envelope, group_key_id, open_group, GroupBody, GroupControl, GroupInvite,
        GroupPlaintext, GroupSnapshot, GroupState, MembershipOp, ReceiverChain, SenderChain,
        SenderKeyDistribution,
    },
    Identity, Wire,
};
use meshchat_protocol_fuzz::{alice, bob, NOW};
use rand_core::{CryptoRng, RngCore};

/// A deterministic byte stream (the fixture must be the same on every run).
struct Counter(u64);

impl RngCore for Counter {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        self.0
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            *b = (self.next_u64() >> 33) as u8;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl CryptoRng for Counter {}

/// A group of Alice and Bob, and Bob's copy of Alice's chain (key id: 16 × the first stream
/// bytes; the fuzzer finds it by comparison tracing).
fn fixture() -> &'static (GroupState, ReceiverChain) {
    static F: OnceLock<(GroupState, ReceiverChain)> = OnceLock::new();
    F.get_or_init(|| {
        let mut r = Counter(7);
        let a: Identity = alice();
        let (mut state, _, _) =
            GroupState::create(&a, "fuzz", NOW * 1000, &mut r).expect("invariant: creates");
        let add = state
            .propose(
                &a,
                meshchat_protocol::group::MembershipChange::Add {
                    member: bob().public(),
                    role: meshchat_protocol::group::Role::Member,
                },
                NOW * 1000,
            )
            .expect("invariant: admin adds");
        state.apply(&add).expect("invariant: applies");
        let chain = SenderChain::new(&mut r);
        let receiver = ReceiverChain::from_distribution(&chain.distribution(
            state.id(),
            state.epoch(),
            a.public(),
        ));
        (state, receiver)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(op) = MembershipOp::from_wire(data) {
        assert_eq!(op.to_wire().expect("re-encodes"), data, "canonical");
        let mut state = fixture().0.clone();
        let _ = state.apply(&op);
    }
    if let Ok(control) = GroupControl::from_wire(data) {
        assert_eq!(control.to_wire().expect("re-encodes"), data, "canonical");
        let _ = control.validate();
    }
    if let Ok(invite) = GroupInvite::from_wire(data) {
        let _ = invite.code();
        let _ = invite.verify(NOW * 1000);
    }
    if let Ok(dist) = SenderKeyDistribution::from_wire(data) {
        let _ = dist.check(&fixture().0, &alice().public());
    }
    let _ = GroupSnapshot::from_wire(data);
    let _ = GroupState::from_wire(data);
    let _ = ReceiverChain::from_wire(data);
    let _ = SenderChain::from_wire(data);
    let _ = GroupPlaintext::from_wire(data);
    let _ = GroupBody::from_wire(data);
    if let Ok(env) = decode_group_envelope(data) {
        let _ = group_key_id(&env);
        let (state, receiver) = fixture();
        let mut chain = receiver.clone();
        let before = chain.to_wire().expect("encodes");
        if open_group(state, &mut chain, &env, NOW).is_err() {
            assert_eq!(
                chain.to_wire().expect("encodes"),
                before,
                "failed open changed the chain"
            );
        }
    }
});
