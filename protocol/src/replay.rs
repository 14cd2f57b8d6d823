//! The replay cache: the first messages of sessions a node has accepted, so that a captured
//! first message cannot be played back to open a second session. See `docs/protocol.md`,
//! section "Session messages".
//!
//! A handshake that consumed a one-time prekey cannot be replayed (the secret is gone), but one
//! made against the signed prekey alone can, for as long as the signed prekey's secret is kept.
//! The cache therefore remembers every accepted `(initiator identity, ephemeral key)` until the
//! signed prekey it was made against can no longer be used, and the session layer refuses a
//! pre-key message whose pair is already in it. Signed prekeys must be rotated (bundles are valid
//! for at most 30 days, secrets kept a bounded grace period after that), which is what lets
//! entries expire.
//!
//! The cache is bounded ([`MAX_REPLAY_ENTRIES`]); when full, the entry closest to expiry is
//! evicted, which re-opens a replay window only for that oldest handshake. The node persists the
//! cache ([`Wire`](crate::Wire)) atomically with the session the handshake created.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{identity::PublicIdentity, impl_wire};

/// Most entries the cache holds.
pub const MAX_REPLAY_ENTRIES: usize = 8192;
/// Encoded size of one entry: initiator, ephemeral, expiry.
const ENTRY_BYTES: usize = 32 + 32 + 8;
/// Largest encoded [`ReplayCache`].
pub const MAX_REPLAY_CACHE_BYTES: usize = 1 + 8 + ENTRY_BYTES * MAX_REPLAY_ENTRIES;

/// The handshakes already accepted, keyed by (initiator identity, ephemeral key), each with the
/// unix time after which it no longer needs to be remembered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayCache {
    entries: BTreeMap<([u8; 32], [u8; 32]), u64>,
}
impl_wire!(ReplayCache, MAX_REPLAY_CACHE_BYTES);

impl ReplayCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the handshake `(initiator, ephemeral)` was seen and its entry is live at `now`.
    pub fn contains(&self, initiator: &PublicIdentity, ephemeral: &[u8; 32], now: u64) -> bool {
        self.entries
            .get(&(*initiator.as_bytes(), *ephemeral))
            .is_some_and(|&expires_at| now < expires_at)
    }

    /// Remember `(initiator, ephemeral)` until `expires_at`. Drops expired entries first and, if
    /// the cache is still full, evicts the entry that expires soonest. Returns `false` if the
    /// pair was already present (its expiry is then extended, never shortened).
    pub fn insert(
        &mut self,
        initiator: &PublicIdentity,
        ephemeral: &[u8; 32],
        expires_at: u64,
        now: u64,
    ) -> bool {
        let key = (*initiator.as_bytes(), *ephemeral);
        if let Some(e) = self.entries.get_mut(&key) {
            let fresh = *e <= now;
            *e = (*e).max(expires_at);
            return fresh;
        }
        if self.entries.len() >= MAX_REPLAY_ENTRIES {
            self.expire(now);
        }
        while self.entries.len() >= MAX_REPLAY_ENTRIES {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, &exp)| exp)
                .map(|(k, _)| *k)
                .expect("invariant: a full cache has entries");
            self.entries.remove(&oldest);
        }
        self.entries.insert(key, expires_at);
        true
    }

    /// Drop every entry expired at `now`.
    pub fn expire(&mut self, now: u64) {
        self.entries.retain(|_, &mut expires_at| now < expires_at);
    }

    /// Entries held (live or not yet expired away).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{identity::Identity, wire::Wire};
    use proptest::prelude::*;

    const NOW: u64 = 1_700_000_000;

    fn who(n: u8) -> PublicIdentity {
        Identity::from_seed(&[n; 32]).public()
    }

    #[test]
    fn remembers_until_expiry() {
        let mut c = ReplayCache::new();
        let (a, b) = (who(1), who(2));
        assert!(!c.contains(&a, &[7; 32], NOW));
        assert!(c.insert(&a, &[7; 32], NOW + 100, NOW));
        assert!(c.contains(&a, &[7; 32], NOW + 99));
        assert!(!c.contains(&a, &[7; 32], NOW + 100));
        // Keyed by both halves.
        assert!(!c.contains(&b, &[7; 32], NOW));
        assert!(!c.contains(&a, &[8; 32], NOW));
        assert!(!c.insert(&a, &[7; 32], NOW + 50, NOW), "already present");
        assert!(c.contains(&a, &[7; 32], NOW + 99), "expiry never shortened");
        c.expire(NOW + 100);
        assert!(c.is_empty());
    }

    #[test]
    fn is_bounded_and_evicts_the_soonest_expiry() {
        let mut c = ReplayCache::new();
        let a = who(3);
        for i in 0..MAX_REPLAY_ENTRIES as u64 {
            let mut eph = [0u8; 32];
            eph[..8].copy_from_slice(&i.to_le_bytes());
            // Entry 5 expires first.
            let exp = if i == 5 { NOW + 10 } else { NOW + 1000 + i };
            c.insert(&a, &eph, exp, NOW);
        }
        assert_eq!(c.len(), MAX_REPLAY_ENTRIES);
        let bytes = c.to_wire().expect("a full cache fits its limit");
        assert!(bytes.len() <= MAX_REPLAY_CACHE_BYTES);
        c.insert(&a, &[0xff; 32], NOW + 5000, NOW);
        assert_eq!(c.len(), MAX_REPLAY_ENTRIES);
        let mut five = [0u8; 32];
        five[0] = 5;
        assert!(!c.contains(&a, &five, NOW));
        assert!(c.contains(&a, &[0xff; 32], NOW));
        let back = ReplayCache::from_wire(&c.to_wire().expect("enc")).expect("dec");
        assert_eq!(back, c);
    }

    proptest! {
        #[test]
        fn round_trips(entries in proptest::collection::vec((any::<u8>(), any::<[u8; 32]>(), any::<u64>()), 0..20)) {
            let mut c = ReplayCache::new();
            for (w, eph, exp) in entries {
                c.insert(&who(w % 4 + 1), &eph, exp, 0);
            }
            let bytes = c.to_wire().expect("enc");
            prop_assert_eq!(ReplayCache::from_wire(&bytes), Ok(c));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = ReplayCache::from_wire(&bytes);
        }
    }
}
