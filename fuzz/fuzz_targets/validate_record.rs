//! What every DHT node runs on a PUT. Input: one length byte, the key, then the value. When the
//! length byte's top bit is set, the key is instead derived from the value (as an honest
//! publisher would), so the fuzzer also reaches the signature and time checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshchat_protocol::{
    bundle_record_key, validate_record, PrekeyBundle, PresenceRecord, RecordKind, Wire,
};
use meshchat_protocol_fuzz::NOW;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    if first & 0x80 == 0 {
        let key_len = usize::from(first).min(rest.len());
        let (key, value) = rest.split_at(key_len);
        let _ = validate_record(key, value, NOW);
        return;
    }
    let key = if first & 1 == 0 {
        PrekeyBundle::from_wire(rest).map(|b| bundle_record_key(&b.identity))
    } else {
        PresenceRecord::from_wire(rest).map(|r| r.key())
    };
    if let Ok(key) = key {
        if let Ok(valid) = validate_record(&key, rest, NOW) {
            assert!(valid.expires_at > NOW);
            assert_eq!(
                valid.kind,
                if first & 1 == 0 {
                    RecordKind::Bundle
                } else {
                    RecordKind::Presence
                }
            );
        }
    }
});
