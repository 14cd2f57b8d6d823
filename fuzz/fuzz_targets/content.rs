//! Ratchet plaintexts (what a peer's session delivers).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshchat_protocol::Content;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Content::decode(data) {
        let bytes = c.encode().expect("decoded content re-encodes");
        assert_eq!(bytes, data, "the encoding is canonical");
    }
});
