//! Shared fixtures of the fuzz targets: the identities and time of `docs/test-vectors.md`, so the
//! seed corpus built from those vectors reaches past decryption and signature checks.

use meshchat_protocol::{
    addressing::{epoch, pair_secret},
    records::PresenceKeys,
    Identity,
};

/// The time of the vectors.
pub const NOW: u64 = 1_700_000_000;

fn seed(hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("invariant: constant hex");
    }
    out
}

/// Alice of the vectors.
pub fn alice() -> Identity {
    Identity::from_seed(&seed(
        "a4ddf31f7f32ba696f14ce50ecf3f21e3e100e83bdf47966e7b07468e9500b6e",
    ))
}

/// Bob of the vectors (the recipient of the vector envelope).
pub fn bob() -> Identity {
    Identity::from_seed(&seed(
        "e106b40d369f5c94f5dd2a13d9131585121002ed9e313d2dc9e49ff534c50bd1",
    ))
}

/// The presence keys Bob uses to read Alice's vector presence record.
pub fn presence_keys() -> PresenceKeys {
    let (a, b) = (alice(), bob());
    PresenceKeys::derive(&pair_secret(&b, &a.public()), &a.public(), epoch(NOW))
}

/// The key Bob opens Alice's vector pair envelope with.
pub fn pair_envelope_key() -> meshchat_protocol::PairEnvelopeKey {
    let (a, b) = (alice(), bob());
    meshchat_protocol::PairEnvelopeKey::derive(&pair_secret(&b, &a.public()), &b.public(), epoch(NOW))
}
