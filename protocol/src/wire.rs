//! The wire format: how every value that crosses the network or sits on disk becomes bytes.
//!
//! One rule for all of them (see `docs/protocol.md`, section "Wire format"):
//!
//! ```text
//! +---------+----------------------------------------------+
//! | version | bincode 2, fixed-width little-endian integers |
//! |  1 byte | lengths as u64, no trailing bytes             |
//! +---------+----------------------------------------------+
//! ```
//!
//! Every decode states its limit: the whole input, version byte included, may not be longer than
//! the limit of the type ([`Wire::MAX_ENCODED`]), bincode is told the same limit so that no length
//! prefix can make it allocate more, and the decoder must consume the input to its last byte.
//! Hostile bytes get a [`WireError`], never a panic.

use bincode::config;
use serde::{de::DeserializeOwned, Serialize};

/// The only wire version this implementation speaks.
pub const WIRE_VERSION: u8 = 1;

/// Why bytes could not be decoded (or, rarely, a value encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The input was empty: not even a version byte.
    #[error("empty input")]
    Empty,
    /// The first byte names a wire version this implementation does not speak.
    #[error("unsupported wire version {found} (this implementation speaks {WIRE_VERSION})")]
    UnsupportedVersion {
        /// The version byte that arrived.
        found: u8,
    },
    /// The input is longer than the limit for this type.
    #[error("{what}: {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The type being decoded.
        what: &'static str,
        /// Length of the input.
        len: usize,
        /// The stated limit.
        limit: usize,
    },
    /// The input ended before the value did.
    #[error("{what}: truncated input")]
    Truncated {
        /// The type being decoded.
        what: &'static str,
    },
    /// The value decoded but bytes were left over.
    #[error("{what}: {extra} trailing bytes after the value")]
    TrailingBytes {
        /// The type being decoded.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// The bytes do not form a value of this type.
    #[error("{what}: malformed: {reason}")]
    Malformed {
        /// The type being decoded.
        what: &'static str,
        /// bincode's account of what was wrong.
        reason: String,
    },
    /// A value could not be encoded (only for values larger than their own limit).
    #[error("{what}: cannot encode: {reason}")]
    Encode {
        /// The type being encoded.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

fn base_config() -> config::Configuration<config::LittleEndian, config::Fixint, config::NoLimit> {
    config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

/// Encode `value` as version byte + bincode body, refusing to produce more than `LIMIT` bytes.
pub fn encode<T: Serialize, const LIMIT: usize>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, WireError> {
    let mut out = vec![WIRE_VERSION];
    let body =
        bincode::serde::encode_to_vec(value, base_config().with_limit::<LIMIT>()).map_err(|e| {
            WireError::Encode {
                what,
                reason: e.to_string(),
            }
        })?;
    out.extend_from_slice(&body);
    if out.len() > LIMIT {
        return Err(WireError::Encode {
            what,
            reason: format!("{} bytes exceeds the limit of {LIMIT}", out.len()),
        });
    }
    Ok(out)
}

/// Decode a value from `bytes` under the limit `LIMIT` (which counts the version byte).
pub fn decode<T: DeserializeOwned, const LIMIT: usize>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, WireError> {
    if bytes.len() > LIMIT {
        return Err(WireError::TooLarge {
            what,
            len: bytes.len(),
            limit: LIMIT,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion { found: version });
    }
    let (value, used) =
        bincode::serde::decode_from_slice::<T, _>(body, base_config().with_limit::<LIMIT>())
            .map_err(|e| match e {
                bincode::error::DecodeError::UnexpectedEnd { .. } => WireError::Truncated { what },
                bincode::error::DecodeError::LimitExceeded => WireError::TooLarge {
                    what,
                    len: bytes.len(),
                    limit: LIMIT,
                },
                other => WireError::Malformed {
                    what,
                    reason: other.to_string(),
                },
            })?;
    if used != body.len() {
        return Err(WireError::TrailingBytes {
            what,
            extra: body.len() - used,
        });
    }
    Ok(value)
}

/// A type with a wire form and a stated maximum encoded size.
///
/// Implement it with [`impl_wire!`](crate::impl_wire); the methods are the only way values of the
/// type are turned into bytes and back.
pub trait Wire: Sized {
    /// The largest encoding accepted, version byte included.
    const MAX_ENCODED: usize;
    /// A name for errors and logs.
    const NAME: &'static str;
    /// Encode to the wire form.
    fn to_wire(&self) -> Result<Vec<u8>, WireError>;
    /// Decode from the wire form, under [`Self::MAX_ENCODED`].
    fn from_wire(bytes: &[u8]) -> Result<Self, WireError>;
}

/// Implement [`Wire`] for a serde type with a constant limit.
#[macro_export]
macro_rules! impl_wire {
    ($ty:ty, $limit:expr) => {
        impl $crate::wire::Wire for $ty {
            const MAX_ENCODED: usize = $limit;
            const NAME: &'static str = stringify!($ty);
            fn to_wire(&self) -> Result<Vec<u8>, $crate::wire::WireError> {
                $crate::wire::encode::<Self, { $limit }>(stringify!($ty), self)
            }
            fn from_wire(bytes: &[u8]) -> Result<Self, $crate::wire::WireError> {
                $crate::wire::decode::<Self, { $limit }>(stringify!($ty), bytes)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Sample {
        id: u32,
        body: Vec<u8>,
        name: String,
    }
    impl_wire!(Sample, 256);

    #[test]
    fn round_trip_and_layout() {
        let s = Sample {
            id: 7,
            body: vec![1, 2],
            name: "a".into(),
        };
        let bytes = s.to_wire().expect("encodes");
        // version, u32 LE, u64 len + 2 bytes, u64 len + 1 byte
        assert_eq!(
            bytes,
            [
                vec![1u8, 7, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 2],
                vec![1, 0, 0, 0, 0, 0, 0, 0, b'a']
            ]
            .concat()
        );
        assert_eq!(Sample::from_wire(&bytes), Ok(s));
    }

    #[test]
    fn rejects_wrong_version_truncation_trailing_and_oversize() {
        let s = Sample {
            id: 1,
            body: vec![9; 10],
            name: String::new(),
        };
        let bytes = s.to_wire().expect("encodes");
        let mut wrong = bytes.clone();
        wrong[0] = 2;
        assert_eq!(
            Sample::from_wire(&wrong),
            Err(WireError::UnsupportedVersion { found: 2 })
        );
        assert!(matches!(
            Sample::from_wire(&bytes[..bytes.len() - 1]),
            Err(WireError::Truncated { .. })
        ));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            Sample::from_wire(&trailing),
            Err(WireError::TrailingBytes { extra: 1, .. })
        ));
        assert!(matches!(
            Sample::from_wire(&[1u8; 300]),
            Err(WireError::TooLarge { .. })
        ));
        assert_eq!(Sample::from_wire(&[]), Err(WireError::Empty));
        let big = Sample {
            id: 1,
            body: vec![0; 300],
            name: String::new(),
        };
        assert!(matches!(big.to_wire(), Err(WireError::Encode { .. })));
    }

    #[test]
    fn hostile_length_prefix_does_not_allocate() {
        // version, id, then a body length of u64::MAX: must fail cleanly, not abort.
        let mut bytes = vec![1u8, 0, 0, 0, 0];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Sample::from_wire(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Sample::from_wire(&bytes);
        }

        #[test]
        fn round_trips(id in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..100), name in ".{0,20}") {
            let s = Sample { id, body, name };
            let bytes = s.to_wire().expect("encodes");
            prop_assert_eq!(Sample::from_wire(&bytes), Ok(s));
        }
    }
}
