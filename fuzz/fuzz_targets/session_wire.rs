//! The session layer's wire types: session messages (from peers, inside envelopes) and the
//! persisted session records and replay cache (from disk).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshchat_protocol::{
    ratchet::{RatchetMessage, RatchetState},
    replay::ReplayCache,
    session::{SessionMessage, SessionRecord},
    x3dh::PreKeyHeader,
    Wire,
};

fn check<T: Wire>(data: &[u8]) {
    if let Ok(v) = T::from_wire(data) {
        let _ = v.to_wire();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => check::<SessionMessage>(rest),
        1 => check::<SessionRecord>(rest),
        2 => check::<ReplayCache>(rest),
        3 => check::<RatchetMessage>(rest),
        4 => check::<RatchetState>(rest),
        _ => check::<PreKeyHeader>(rest),
    }
});
