//! User IDs, recovery phrases and public keys from arbitrary input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshchat_protocol::{Identity, PublicIdentity, UserId};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(id) = text.parse::<UserId>() {
        // A parsed ID prints back to an ID naming the same key.
        let again: UserId = id.to_string().parse().expect("a printed user ID parses");
        assert_eq!(again.public(), id.public());
    }
    if let Ok(identity) = Identity::from_recovery_phrase(&text) {
        let back = Identity::from_recovery_phrase(&identity.recovery_phrase())
            .expect("a printed phrase restores");
        assert_eq!(back.public(), identity.public());
    }
    if let Some(key) = data.get(..32) {
        let key: [u8; 32] = key.try_into().expect("32 bytes");
        if let Ok(public) = PublicIdentity::from_bytes(&key) {
            if let Some(sig) = data.get(32..96) {
                let sig: [u8; 64] = sig.try_into().expect("64 bytes");
                let _ = public.verify(b"fuzz", &data[96..], &sig);
            }
            let _ = public.x25519_public();
        }
    }
});
