//! Prekey bundles (from the DHT) and persisted prekey secrets (from disk).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshchat_protocol::{prekey::PrekeySecrets, PrekeyBundle, Wire};
use meshchat_protocol_fuzz::NOW;

fuzz_target!(|data: &[u8]| {
    if let Ok(bundle) = PrekeyBundle::from_wire(data) {
        let _ = bundle.verify(NOW);
        let bytes = bundle.to_wire().expect("a decoded bundle re-encodes");
        assert_eq!(PrekeyBundle::from_wire(&bytes).as_ref(), Ok(&bundle));
    }
    if let Ok(secrets) = PrekeySecrets::from_wire(data) {
        let _ = secrets.bundle(&meshchat_protocol_fuzz::bob());
        let _ = secrets.needs_rotation(NOW);
        let bytes = secrets.to_wire().expect("decoded secrets re-encode");
        assert_eq!(PrekeySecrets::from_wire(&bytes).as_ref(), Ok(&secrets));
    }
});
