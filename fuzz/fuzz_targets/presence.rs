//! Presence records and their plaintext, read by the contact of the vector record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshchat_protocol::{Presence, PresenceRecord, Wire};
use meshchat_protocol_fuzz::{presence_keys, NOW};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Presence::from_wire(data) {
        let _ = p.validate();
    }
    if let Ok(rec) = PresenceRecord::from_wire(data) {
        let _ = rec.verify(NOW);
        let _ = presence_keys().open(&rec, NOW);
        let bytes = rec.to_wire().expect("a decoded record re-encodes");
        assert_eq!(bytes, data, "the encoding is canonical");
    }
});
