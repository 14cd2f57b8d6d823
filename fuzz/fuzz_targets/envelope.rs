//! Sealed envelopes and pair envelopes, opened by the recipient of the vector envelopes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshchat_protocol::{envelope, Envelope, Wire};
use meshchat_protocol_fuzz::{bob, pair_envelope_key, NOW};

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::from_wire(data) {
        let _ = env.id();
        let _ = env.check(NOW);
        let _ = envelope::open(&bob(), &env, NOW);
        let _ = envelope::open_pair(&pair_envelope_key(), &env, NOW);
        let bytes = env.to_wire().expect("a decoded envelope re-encodes");
        assert_eq!(bytes, data, "the encoding is canonical");
    }
});
