//! Content: the application plaintext a ratchet message carries in a 1:1 conversation. See
//! `docs/protocol.md`, section "Content".
//!
//! Three kinds exist: a [`Content::Text`] message (a random 16-byte id for deduplication and
//! receipts, a per-conversation sequence number for ordering, the sender's clock in milliseconds
//! and a UTF-8 body of at most [`MAX_TEXT_BYTES`]), and a [`Content::Receipt`] acknowledging
//! that messages were delivered or read, and [`Content::Group`] control messages of group
//! channels (invites, sender keys, membership ops, rekeys; see [`crate::group`]). Decode with [`Content::decode`], which applies the
//! limits after the wire decoder (the wire limit alone already bounds every allocation).

use std::fmt;

use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};

use crate::{
    group::{GroupControl, GroupError, MAX_GROUP_CONTROL_BYTES},
    wire::{Wire, WireError},
};

/// The largest text body in bytes of UTF-8: the stated maximum message size. It leaves room for
/// the session layer's headers inside the largest envelope bucket (64 KiB).
pub const MAX_TEXT_BYTES: usize = 60_000;
/// The most message ids one receipt may acknowledge.
pub const MAX_RECEIPT_IDS: usize = 512;
/// Largest wire encoding of a [`Content`]: a text of [`MAX_TEXT_BYTES`] (version 1, variant 4,
/// id 16, seq 8, time 8, length 8).
pub const MAX_CONTENT_BYTES: usize = 1 + 4 + 16 + 8 + 8 + 8 + MAX_TEXT_BYTES;

// A maximal text must fit a session plaintext (and so an envelope).
const _: () = assert!(MAX_CONTENT_BYTES <= crate::session::MAX_PLAINTEXT_BYTES);
// The largest group control message (a 1,000-member invite) fits the same limit.
const _: () = assert!(1 + 4 + (MAX_GROUP_CONTROL_BYTES - 1) <= MAX_CONTENT_BYTES);

/// A message id: 16 random bytes chosen by the sender.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// A fresh random id.
    pub fn random<R: CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        Self(id)
    }
}

impl fmt::Display for MessageId {
    /// 32 lower-case hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// What a receipt reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReceiptKind {
    /// The messages reached the recipient's device (variant index 0).
    Delivered,
    /// The recipient displayed them (variant index 1).
    Read,
}

/// The plaintext of a 1:1 message.
// Group control values (invites, ops) are large in memory; content values are short-lived.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// A text message (variant index 0).
    Text {
        /// Random id, for deduplication and receipts.
        id: MessageId,
        /// The sender's sequence number in this conversation (starts at 1, increases by 1).
        seq: u64,
        /// The sender's clock when sent, unix milliseconds.
        sent_at_ms: u64,
        /// The text, 1 to [`MAX_TEXT_BYTES`] bytes of UTF-8.
        body: String,
    },
    /// A delivery or read receipt (variant index 1).
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// The acknowledged messages, 1 to [`MAX_RECEIPT_IDS`].
        ids: Vec<MessageId>,
    },
    /// A group control message: invite, sender key, membership op or rekey (variant index 2).
    Group(GroupControl),
}

crate::impl_wire!(Content, MAX_CONTENT_BYTES);

impl fmt::Debug for Content {
    /// Never prints the body: logs must not leak plaintext.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text {
                id,
                seq,
                sent_at_ms,
                body,
            } => f
                .debug_struct("Text")
                .field("id", id)
                .field("seq", seq)
                .field("sent_at_ms", sent_at_ms)
                .field("body_len", &body.len())
                .finish(),
            Self::Receipt { kind, ids } => f
                .debug_struct("Receipt")
                .field("kind", kind)
                .field("ids", ids)
                .finish(),
            Self::Group(g) => f.debug_tuple("Group").field(g).finish(),
        }
    }
}

/// Why content could not be encoded or was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContentError {
    /// The text body is empty.
    #[error("empty text message")]
    EmptyText,
    /// The text body exceeds [`MAX_TEXT_BYTES`].
    #[error("text of {len} bytes exceeds the limit of {MAX_TEXT_BYTES} bytes")]
    TextTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A receipt acknowledges nothing.
    #[error("receipt without message ids")]
    EmptyReceipt,
    /// A receipt lists more than [`MAX_RECEIPT_IDS`] ids.
    #[error("receipt with {count} ids exceeds the limit of {MAX_RECEIPT_IDS}")]
    TooManyIds {
        /// How many it lists.
        count: usize,
    },
    /// The bytes are not a content value.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A group control message breaks a limit.
    #[error("group control: {0}")]
    Group(#[from] GroupError),
}

impl Content {
    /// Check the limits.
    pub fn validate(&self) -> Result<(), ContentError> {
        match self {
            Self::Text { body, .. } if body.is_empty() => Err(ContentError::EmptyText),
            Self::Text { body, .. } if body.len() > MAX_TEXT_BYTES => {
                Err(ContentError::TextTooLong { len: body.len() })
            }
            Self::Receipt { ids, .. } if ids.is_empty() => Err(ContentError::EmptyReceipt),
            Self::Receipt { ids, .. } if ids.len() > MAX_RECEIPT_IDS => {
                Err(ContentError::TooManyIds { count: ids.len() })
            }
            Self::Group(g) => Ok(g.validate()?),
            _ => Ok(()),
        }
    }

    /// Validate, then encode.
    pub fn encode(&self) -> Result<Vec<u8>, ContentError> {
        self.validate()?;
        Ok(self.to_wire()?)
    }

    /// Decode untrusted bytes, then validate.
    pub fn decode(bytes: &[u8]) -> Result<Self, ContentError> {
        let c = Self::from_wire(bytes)?;
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(body: &str) -> Content {
        Content::Text {
            id: MessageId([0x11; 16]),
            seq: 1,
            sent_at_ms: 1_700_000_000_000,
            body: body.into(),
        }
    }

    #[test]
    fn text_layout_is_as_documented() {
        let bytes = text("hi").encode().expect("encodes");
        let mut expect = vec![1u8, 0, 0, 0, 0];
        expect.extend_from_slice(&[0x11; 16]);
        expect.extend_from_slice(&1u64.to_le_bytes());
        expect.extend_from_slice(&1_700_000_000_000u64.to_le_bytes());
        expect.extend_from_slice(&2u64.to_le_bytes());
        expect.extend_from_slice(b"hi");
        assert_eq!(bytes, expect);
        assert_eq!(Content::decode(&bytes), Ok(text("hi")));
    }

    #[test]
    fn receipt_layout_is_as_documented() {
        let r = Content::Receipt {
            kind: ReceiptKind::Read,
            ids: vec![MessageId([2; 16])],
        };
        let bytes = r.encode().expect("encodes");
        let mut expect = vec![1u8, 1, 0, 0, 0, 1, 0, 0, 0];
        expect.extend_from_slice(&1u64.to_le_bytes());
        expect.extend_from_slice(&[2; 16]);
        assert_eq!(bytes, expect);
        assert_eq!(Content::decode(&bytes), Ok(r));
    }

    #[test]
    fn the_longest_text_fits_and_one_byte_more_does_not() {
        let max = text(&"a".repeat(MAX_TEXT_BYTES));
        let bytes = max.encode().expect("encodes");
        assert_eq!(bytes.len(), MAX_CONTENT_BYTES);
        assert!(Content::decode(&bytes).is_ok());
        let over = text(&"a".repeat(MAX_TEXT_BYTES + 1));
        assert_eq!(
            over.encode(),
            Err(ContentError::TextTooLong {
                len: MAX_TEXT_BYTES + 1
            })
        );
        // Even if someone encodes it anyway, the decoder refuses it.
        let mut forged = bytes.clone();
        forged.push(b'a');
        let len_at = 1 + 4 + 16 + 8 + 8;
        forged[len_at..len_at + 8].copy_from_slice(&(MAX_TEXT_BYTES as u64 + 1).to_le_bytes());
        assert!(matches!(
            Content::decode(&forged),
            Err(ContentError::Wire(WireError::TooLarge { .. }))
        ));
    }

    #[test]
    fn empty_and_oversized_values_are_rejected() {
        assert_eq!(text("").encode(), Err(ContentError::EmptyText));
        let empty = Content::Receipt {
            kind: ReceiptKind::Delivered,
            ids: vec![],
        };
        assert_eq!(empty.encode(), Err(ContentError::EmptyReceipt));
        let many = Content::Receipt {
            kind: ReceiptKind::Delivered,
            ids: vec![MessageId([0; 16]); MAX_RECEIPT_IDS + 1],
        };
        assert_eq!(
            many.validate(),
            Err(ContentError::TooManyIds {
                count: MAX_RECEIPT_IDS + 1
            })
        );
        // Decoding enforces the same limits.
        let bytes = many.to_wire().expect("within the wire limit");
        assert_eq!(
            Content::decode(&bytes),
            Err(ContentError::TooManyIds {
                count: MAX_RECEIPT_IDS + 1
            })
        );
        let bytes = text("").to_wire().expect("encodes");
        assert_eq!(Content::decode(&bytes), Err(ContentError::EmptyText));
    }

    #[test]
    fn invalid_utf8_and_unknown_variants_are_rejected() {
        let mut bytes = text("ab").encode().expect("encodes");
        let n = bytes.len();
        bytes[n - 1] = 0xff;
        assert!(matches!(
            Content::decode(&bytes),
            Err(ContentError::Wire(WireError::Malformed { .. }))
        ));
        let mut bytes = text("ab").encode().expect("encodes");
        bytes[1] = 7;
        assert!(matches!(
            Content::decode(&bytes),
            Err(ContentError::Wire(_))
        ));
    }

    #[test]
    fn debug_never_shows_the_body() {
        let dbg = format!("{:?}", text("my secret plans"));
        assert!(!dbg.contains("secret"));
        assert!(dbg.contains("body_len: 15"));
        assert_eq!(
            MessageId([0xab; 16]).to_string(),
            "abababababababababababababababab"
        );
    }

    fn arb_content() -> impl Strategy<Value = Content> {
        prop_oneof![
            (any::<[u8; 16]>(), any::<u64>(), any::<u64>(), ".{1,200}").prop_map(
                |(id, seq, sent_at_ms, body)| Content::Text {
                    id: MessageId(id),
                    seq,
                    sent_at_ms,
                    body
                }
            ),
            (
                any::<bool>(),
                proptest::collection::vec(any::<[u8; 16]>(), 1..MAX_RECEIPT_IDS)
            )
                .prop_map(|(read, ids)| Content::Receipt {
                    kind: if read {
                        ReceiptKind::Read
                    } else {
                        ReceiptKind::Delivered
                    },
                    ids: ids.into_iter().map(MessageId).collect()
                }),
        ]
    }

    proptest! {
        #[test]
        fn content_round_trips(c in arb_content()) {
            let bytes = c.encode().expect("encodes");
            prop_assert_eq!(Content::decode(&bytes), Ok(c));
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..1000)) {
            let _ = Content::decode(&bytes);
        }
    }
}
