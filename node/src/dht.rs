//! The DHT's admission rules: what this node stores for others. See `docs/protocol.md`, section
//! "DHT records", and `docs/architecture.md`, "Abuse limits".
//!
//! Kademlia runs with [`libp2p::kad::StoreInserts::FilterBoth`]: a record a peer pushes to us
//! is only handed to the event loop, which has it checked on `spawn_blocking` ([`check`]) and
//! stores it, back in the loop, only if the check passed ([`store_checked`]). [`check`] verifies
//! the record with `meshchat_protocol::records::validate_record` (typed key,
//! size, decode under a limit, signature, key bound to content, not expired), refuses a record
//! whose version/sequence number is older than the one held (rollback) or equal with different
//! bytes (equivocation), caps its local expiry at the record's own `expires_at`, and stores it
//! subject to the store's count and size limits (expired records are pruned to make room).
//! Provider records are never stored: meshchat does not use them.
//!
//! Records *found* by a lookup are untrusted too; the caller validates them for their purpose
//! (`PrekeyBundle::verify`, presence decryption) and picks the highest valid version.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::kad::{
    self,
    store::{MemoryStore, RecordStore},
    Record,
};
use meshchat_protocol::records::{validate_record, RecordError, ValidRecord};

/// Why a record pushed by a peer was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordRejected {
    /// The record itself is invalid (forged, expired, oversized, malformed, unknown kind…).
    #[error("invalid record: {0}")]
    Invalid(#[from] RecordError),
    /// A newer version is already held: storing this one would roll the key back.
    #[error("rollback refused: holding version {held}, offered {offered}")]
    Rollback {
        /// The version held.
        held: u64,
        /// The version offered.
        offered: u64,
    },
    /// Same version as held but different bytes: the publisher equivocates, keep the first.
    #[error("conflicting record for version {version}")]
    Conflict {
        /// The version.
        version: u64,
    },
    /// The value is larger than the store accepts.
    #[error("record value of {len} bytes exceeds the store limit")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// The store is full of unexpired records.
    #[error("record store full")]
    StoreFull,
    /// The key was written by someone else while the record was being checked.
    #[error("the key changed while the record was checked")]
    Raced,
}

impl RecordRejected {
    /// Whether the record shows the pushing peer misbehaving (a strike against it).
    pub fn is_hostile(&self) -> bool {
        !matches!(
            self,
            RecordRejected::StoreFull | RecordRejected::Conflict { .. }
        )
    }
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The local `Instant` at which a record whose `expires_at` is the given unix time expires.
pub(crate) fn instant_for(expires_at: u64, now: u64) -> Instant {
    Instant::now() + Duration::from_secs(expires_at.saturating_sub(now))
}

/// Phase one of admitting a record a peer pushed, run off the event loop (it verifies
/// signatures): validate it and compare it with `held`, the value held under its key when the
/// push arrived. `Ok(None)`: it is exactly what we hold (a refresh; nothing to store).
pub(crate) fn check(
    record: &Record,
    held: Option<&[u8]>,
    max_value_bytes: usize,
    now: u64,
) -> Result<Option<ValidRecord>, RecordRejected> {
    if record.value.len() > max_value_bytes {
        return Err(RecordRejected::TooLarge {
            len: record.value.len(),
        });
    }
    let valid = validate_record(record.key.as_ref(), &record.value, now)?;
    if let Some(held) = held {
        // A held record that no longer validates (expired) may be replaced by anything valid.
        if let Ok(held_valid) = validate_record(record.key.as_ref(), held, now) {
            if held_valid.version_or_seq > valid.version_or_seq {
                return Err(RecordRejected::Rollback {
                    held: held_valid.version_or_seq,
                    offered: valid.version_or_seq,
                });
            }
            if held_valid.version_or_seq == valid.version_or_seq {
                if held == record.value.as_slice() {
                    return Ok(None);
                }
                return Err(RecordRejected::Conflict {
                    version: valid.version_or_seq,
                });
            }
        }
    }
    Ok(Some(valid))
}

/// Phase two, in the event loop: store a record [`check`] accepted, provided the store still
/// holds `held` under its key (otherwise another write won the race and the record is dropped;
/// its publisher re-publishes). Its local expiry is capped at its own `expires_at`; expired
/// records are pruned to make room.
pub(crate) fn store_checked(
    store: &mut MemoryStore,
    mut record: Record,
    valid: &ValidRecord,
    held: Option<&[u8]>,
    now: u64,
) -> Result<(), RecordRejected> {
    if store
        .get(&record.key)
        .as_deref()
        .map(|r| r.value.as_slice())
        != held
    {
        return Err(RecordRejected::Raced);
    }
    let own_expiry = instant_for(valid.expires_at, now);
    record.expires = Some(record.expires.map_or(own_expiry, |e| e.min(own_expiry)));
    match store.put(record.clone()) {
        Ok(()) => Ok(()),
        Err(kad::store::Error::MaxRecords) => {
            let at = Instant::now();
            store.retain(|_, r| !r.is_expired(at));
            store.put(record).map_err(|_| RecordRejected::StoreFull)
        }
        Err(kad::store::Error::ValueTooLarge) => Err(RecordRejected::TooLarge {
            len: record.value.len(),
        }),
        Err(kad::store::Error::MaxProvidedKeys) => Err(RecordRejected::StoreFull),
    }
}

/// Both phases at once (for callers that may block).
#[cfg(test)]
pub(crate) fn admit(
    store: &mut MemoryStore,
    record: Record,
    max_value_bytes: usize,
    now: u64,
) -> Result<ValidRecord, RecordRejected> {
    let held = store.get(&record.key).map(|r| r.value.clone());
    let checked = check(&record, held.as_deref(), max_value_bytes, now)?;
    let valid = match checked {
        Some(v) => v,
        None => {
            return validate_record(record.key.as_ref(), &record.value, now).map_err(Into::into)
        }
    };
    store_checked(store, record, &valid, held.as_deref(), now)?;
    Ok(valid)
}

/// A record of ours to publish, with its local expiry set from its `expires_at`.
pub(crate) fn own_record(key: Vec<u8>, value: Vec<u8>, expires_at: u64, now: u64) -> Record {
    let mut r = Record::new(key, value);
    r.expires = Some(instant_for(expires_at, now));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::PeerId;
    use meshchat_protocol::{records::bundle_record_key, Identity, PrekeySecrets, Wire};
    use rand::rngs::OsRng;

    const NOW: u64 = 1_700_000_000;

    fn store(max_records: usize) -> MemoryStore {
        MemoryStore::with_config(
            PeerId::random(),
            kad::store::MemoryStoreConfig {
                max_records,
                max_value_bytes: 16 * 1024,
                ..Default::default()
            },
        )
    }

    fn bundle_record(identity: &Identity, at: u64) -> Record {
        let (_, bundle) = PrekeySecrets::generate(identity, at, &mut OsRng);
        Record::new(
            bundle_record_key(&identity.public()),
            bundle.to_wire().expect("encode"),
        )
    }

    #[test]
    fn a_valid_record_is_stored_with_its_own_expiry() {
        let mut s = store(10);
        let id = Identity::generate(&mut OsRng);
        let r = bundle_record(&id, NOW);
        let valid = admit(&mut s, r.clone(), 16 * 1024, NOW).expect("admitted");
        let held = s.get(&r.key).expect("stored");
        assert_eq!(held.value, r.value);
        let expiry = held.expires.expect("expiry set");
        let expected = instant_for(valid.expires_at, NOW);
        assert!(expiry <= expected);
    }

    #[test]
    fn rollback_and_equivocation_are_refused_and_upgrades_accepted() {
        let mut s = store(10);
        let id = Identity::generate(&mut OsRng);
        let (mut secrets, v1) = PrekeySecrets::generate(&id, NOW, &mut OsRng);
        let v2 = secrets.rotate(&id, NOW, &mut OsRng);
        let key = bundle_record_key(&id.public());
        let rec = |b: &meshchat_protocol::PrekeyBundle| {
            Record::new(key.clone(), b.to_wire().expect("encode"))
        };
        admit(&mut s, rec(&v1), 16 * 1024, NOW).expect("v1");
        admit(&mut s, rec(&v2), 16 * 1024, NOW).expect("upgrade to v2");
        assert_eq!(
            admit(&mut s, rec(&v1), 16 * 1024, NOW),
            Err(RecordRejected::Rollback {
                held: v2.version,
                offered: v1.version
            })
        );
        // The same version again is a harmless refresh.
        admit(&mut s, rec(&v2), 16 * 1024, NOW).expect("refresh");
        // Same version, different bytes (other keys, validly signed): refused.
        let (_, fake) = PrekeySecrets::generate(&id, NOW, &mut OsRng);
        let same_version = meshchat_protocol::PrekeyBundle::sign(
            &id,
            v2.version,
            fake.signed_prekey,
            fake.one_time_prekeys.clone(),
            fake.created_at,
            fake.expires_at,
        );
        assert!(matches!(
            admit(&mut s, rec(&same_version), 16 * 1024, NOW),
            Err(RecordRejected::Conflict { .. })
        ));
        assert_eq!(s.get(&rec(&v2).key).expect("held").value, rec(&v2).value);
    }

    #[test]
    fn invalid_oversized_and_overflowing_records_are_refused() {
        let mut s = store(2);
        let id = Identity::generate(&mut OsRng);
        let mut forged = bundle_record(&id, NOW);
        let last = forged.value.len() - 1;
        forged.value[last] ^= 1;
        let err = admit(&mut s, forged.clone(), 16 * 1024, NOW).expect_err("forged");
        assert!(matches!(err, RecordRejected::Invalid(_)), "{err:?}");
        assert!(err.is_hostile());
        assert!(s.get(&forged.key).is_none());

        let big = Record::new(forged.key.clone(), vec![0u8; 16 * 1024 + 1]);
        assert!(matches!(
            admit(&mut s, big, 16 * 1024, NOW),
            Err(RecordRejected::TooLarge { .. })
        ));

        // Two slots: a third valid record does not fit while the others are unexpired.
        for _ in 0..2 {
            let r = bundle_record(&Identity::generate(&mut OsRng), NOW);
            admit(&mut s, r, 16 * 1024, NOW).expect("fits");
        }
        let third = bundle_record(&Identity::generate(&mut OsRng), NOW);
        assert_eq!(
            admit(&mut s, third, 16 * 1024, NOW),
            Err(RecordRejected::StoreFull)
        );
    }

    /// Kademlia's closest-peer iterator (libp2p-kad is patched in from vendor/libp2p-kad, which
    /// changed how it fills its buffer) yields every peer of the routing table once, closest
    /// first, exactly as a full sort of the table does.
    #[test]
    fn closest_local_peers_come_closest_first_and_each_once() {
        use libp2p::{
            kad::{self, store::MemoryStore, KBucketKey, RoutingUpdate},
            Multiaddr,
        };

        let local = PeerId::random();
        let mut kad = kad::Behaviour::new(local, MemoryStore::new(local));
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("multiaddr");
        let mut peers = Vec::new();
        for _ in 0..400 {
            let peer = PeerId::random();
            if matches!(kad.add_address(&peer, addr.clone()), RoutingUpdate::Success) {
                peers.push(peer);
            }
        }
        assert!(peers.len() > 40, "several buckets filled: {}", peers.len());
        for _ in 0..50 {
            let target = KBucketKey::from(PeerId::random());
            let got: Vec<PeerId> = kad
                .get_closest_local_peers(&target)
                .map(|k| *k.preimage())
                .collect();
            let mut want = peers.clone();
            want.sort_by_key(|p| target.distance(&KBucketKey::from(*p)));
            assert_eq!(got, want);
        }
    }
}
