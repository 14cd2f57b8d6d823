//! The DHT's admission rules: what this node stores for others. See `docs/protocol.md`, section
//! "DHT records", and `docs/architecture.md`, "Abuse limits".
//!
//! Kademlia runs with [`libp2p::kad::StoreInserts::FilterBoth`]: a record a peer pushes to us
//! is only handed to the event loop, which calls [`admit`] before anything reaches the store.
//! [`admit`] checks the record with `meshchat_protocol::records::validate_record` (typed key,
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
}

impl RecordRejected {
    /// Whether the record shows the pushing peer misbehaving (a strike against it).
    pub fn is_hostile(&self) -> bool {
        !matches!(self, RecordRejected::StoreFull | RecordRejected::Conflict { .. })
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

/// Validate `record` (pushed by a peer) and store it if it is admissible. Returns what was
/// stored.
pub(crate) fn admit(
    store: &mut MemoryStore,
    mut record: Record,
    max_value_bytes: usize,
    now: u64,
) -> Result<ValidRecord, RecordRejected> {
    if record.value.len() > max_value_bytes {
        return Err(RecordRejected::TooLarge {
            len: record.value.len(),
        });
    }
    let valid = validate_record(record.key.as_ref(), &record.value, now)?;
    if let Some(held) = store.get(&record.key) {
        if let Ok(held_valid) = validate_record(held.key.as_ref(), &held.value, now) {
            if held_valid.version_or_seq > valid.version_or_seq {
                return Err(RecordRejected::Rollback {
                    held: held_valid.version_or_seq,
                    offered: valid.version_or_seq,
                });
            }
            if held_valid.version_or_seq == valid.version_or_seq {
                if held.value == record.value {
                    // A refresh of what we hold: keep it (and its expiry).
                    return Ok(valid);
                }
                return Err(RecordRejected::Conflict {
                    version: valid.version_or_seq,
                });
            }
        }
    }
    let own_expiry = instant_for(valid.expires_at, now);
    record.expires = Some(record.expires.map_or(own_expiry, |e| e.min(own_expiry)));
    match store.put(record.clone()) {
        Ok(()) => Ok(valid),
        Err(kad::store::Error::MaxRecords) => {
            let at = Instant::now();
            store.retain(|_, r| !r.is_expired(at));
            store.put(record).map_err(|_| RecordRejected::StoreFull)?;
            Ok(valid)
        }
        Err(kad::store::Error::ValueTooLarge) => Err(RecordRejected::TooLarge {
            len: record.value.len(),
        }),
        Err(kad::store::Error::MaxProvidedKeys) => Err(RecordRejected::StoreFull),
    }
}

/// A record of ours to publish, with its local expiry set from its `expires_at`.
pub(crate) fn own_record(key: Vec<u8>, value: Vec<u8>, expires_at: u64, now: u64) -> Record {
    let mut r = Record::new(key, value);
    r.expires = Some(instant_for(expires_at, now));
    r
}
