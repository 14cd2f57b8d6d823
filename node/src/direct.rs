//! Direct delivery, `/meshchat/direct/2.0.0`: a batch of sealed envelopes per request-response
//! stream, answered only after the recipient has made all of them durable. See
//! `docs/protocol.md`, section "Direct delivery".
//!
//! ```text
//! sender                                   recipient
//!   | -- u32 BE len || wire(DirectRequest) -> |  len checked against MAX before allocation
//!   |                                         |  open + commit each, one sync for the batch
//!   | <-- u32 BE len || wire(DirectReply) --- |  Each([Accepted{id, duplicate} | Rejected])
//!   |                                         |  or Refused{reason} for the whole request
//! ```
//!
//! A sender with several envelopes for the same peer sends them in one request
//! ([`MAX_BATCH_ENVELOPES`], [`MAX_REQUEST_BYTES`]): a lone message goes out at once, alone, and
//! messages that queue up behind requests already in flight go out together, so that the cost
//! of a stream (open, negotiate, frame, answer) and of the recipient's sync is shared.
//!
//! The codec is [`request_response`] with a custom [`Codec`]: frames are a big-endian `u32`
//! length followed by the value's `wire` encoding (`meshchat_protocol::wire`); a length above
//! the type's [`Wire::MAX_ENCODED`] is refused before anything is allocated, and the bytes are
//! decoded under the same limit. A request that is too large or does not decode is still handed
//! up, as [`Framed::Refused`], so that the node can answer it with a typed [`RejectReason`] and
//! count it against the peer (a failed read would be invisible above the connection handler);
//! decodable but bad envelopes (forged, expired, not for us) are answered the same way, each in
//! its place of the batch.

use std::{io, marker::PhantomData};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{request_response, StreamProtocol};
use meshchat_protocol::{envelope::MAX_ENVELOPE_BYTES, impl_wire, Envelope, Wire};
use serde::{Deserialize, Serialize};

/// The protocol id of direct delivery.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/meshchat/direct/2.0.0");

/// Most envelopes in one request.
pub const MAX_BATCH_ENVELOPES: usize = 64;

/// Largest encoded [`DirectRequest`]: one envelope of the largest size always fits; smaller ones
/// are packed up to this size.
pub const MAX_REQUEST_BYTES: usize = MAX_ENVELOPE_BYTES + 1024;

/// Bytes of a [`DirectRequest`] besides its envelopes (version byte, vector length).
const REQUEST_OVERHEAD_BYTES: usize = 1 + 8;

/// Bytes of an envelope inside a request besides its ciphertext (routing key, timestamp, ttl,
/// ephemeral key, ciphertext length).
const ENVELOPE_FIXED_BYTES: usize = 32 + 8 + 4 + 32 + 8;

/// Largest encoded [`DirectResponse`].
pub const MAX_RESPONSE_BYTES: usize = 64;

/// Largest encoded [`DirectReply`].
pub const MAX_REPLY_BYTES: usize = 16 + MAX_BATCH_ENVELOPES * MAX_RESPONSE_BYTES;

/// A batch of envelopes for the recipient, in the order they are to be processed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectRequest {
    /// 1 to [`MAX_BATCH_ENVELOPES`] envelopes.
    pub envelopes: Vec<Envelope>,
}

impl_wire!(DirectRequest, MAX_REQUEST_BYTES);

impl DirectRequest {
    /// The bytes `envelope` adds to an encoded request.
    pub fn cost(envelope: &Envelope) -> usize {
        ENVELOPE_FIXED_BYTES + envelope.ciphertext.len()
    }

    /// Whether a request whose envelopes cost `used` bytes so far ([`DirectRequest::cost`]),
    /// `count` of them, can take one more costing `more`.
    pub fn fits(count: usize, used: usize, more: usize) -> bool {
        count < MAX_BATCH_ENVELOPES && REQUEST_OVERHEAD_BYTES + used + more <= MAX_REQUEST_BYTES
    }

    /// Whether the request has an acceptable number of envelopes (the size was checked when it
    /// was read).
    pub fn check(&self) -> Result<(), RejectReason> {
        if (1..=MAX_BATCH_ENVELOPES).contains(&self.envelopes.len()) {
            Ok(())
        } else {
            Err(RejectReason::Malformed)
        }
    }
}

/// The recipient's answer to a [`DirectRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirectReply {
    /// One answer per envelope, in the order of the request.
    Each(Vec<DirectResponse>),
    /// The whole request was refused (too large, undecodable, no or too many envelopes, or
    /// the recipient is busy): none of its envelopes was processed.
    Refused {
        /// Why.
        reason: RejectReason,
    },
}

impl_wire!(DirectReply, MAX_REPLY_BYTES);

/// The recipient's answer to one envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirectResponse {
    /// The envelope is durably stored (or was already: `duplicate`); the sender may forget it.
    Accepted {
        /// SHA-256 of the envelope's wire bytes, as computed by the recipient.
        envelope_id: [u8; 32],
        /// The recipient had already processed this envelope.
        duplicate: bool,
    },
    /// The envelope was refused.
    Rejected {
        /// Why.
        reason: RejectReason,
    },
}

impl_wire!(DirectResponse, MAX_RESPONSE_BYTES);

/// Why a recipient refused an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum RejectReason {
    /// The envelope's lifetime is over.
    #[error("envelope expired")]
    Expired,
    /// The envelope's timestamp lies in the future.
    #[error("envelope timestamp in the future")]
    FromTheFuture,
    /// It does not decrypt (not for this recipient, tampered, forged signature, unknown session).
    #[error("envelope does not decrypt or verify")]
    Undecryptable,
    /// A handshake or message already seen (replay of a different envelope).
    #[error("replayed message")]
    Replayed,
    /// The request or its plaintext is not a valid message.
    #[error("malformed request or content")]
    Malformed,
    /// The request is larger than the protocol allows.
    #[error("request too large")]
    TooLarge,
    /// The recipient is overloaded; try again later.
    #[error("recipient busy")]
    Busy,
    /// The recipient failed locally (disk); try again later.
    #[error("recipient internal error")]
    Internal,
}

impl RejectReason {
    /// Whether sending the same envelope again later can succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, RejectReason::Busy | RejectReason::Internal)
    }

    /// Whether the envelope shows the peer misbehaving (a strike against it).
    pub fn is_hostile(self) -> bool {
        matches!(
            self,
            RejectReason::Undecryptable
                | RejectReason::Malformed
                | RejectReason::Replayed
                | RejectReason::TooLarge
        )
    }
}

/// Why the bytes of a request were refused by the codec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announced more than the limit (nothing more was read).
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The frame's bytes do not decode.
    #[error("undecodable frame: {0}")]
    Malformed(#[from] meshchat_protocol::WireError),
}

impl FrameError {
    /// The answer to give the sender.
    pub fn reason(&self) -> RejectReason {
        match self {
            FrameError::TooLarge { .. } => RejectReason::TooLarge,
            FrameError::Malformed(_) => RejectReason::Malformed,
        }
    }
}

/// A request as read off a stream: the value, or why its bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framed<T> {
    /// A well-formed request.
    Value(T),
    /// Bytes that were refused (answered with [`FrameError::reason`]).
    Refused(FrameError),
}

/// Read a request frame: I/O errors fail the stream; a too-large prefix or undecodable bytes
/// come back as [`Framed::Refused`].
async fn read_framed<V: Wire, T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Framed<V>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > V::MAX_ENCODED {
        return Ok(Framed::Refused(FrameError::TooLarge {
            len,
            limit: V::MAX_ENCODED,
        }));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(match V::from_wire(&buf) {
        Ok(v) => Framed::Value(v),
        Err(e) => Framed::Refused(FrameError::Malformed(e)),
    })
}

/// The request-response codec: `u32` big-endian length prefix, `wire` payload, limits from
/// [`Wire::MAX_ENCODED`] of each type.
#[derive(Debug)]
pub struct Codec<Req, Resp> {
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Default for Codec<Req, Resp> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Read one frame of at most `max` bytes (length checked before allocation).
pub async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {max} bytes"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Write one frame.
pub async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

async fn read_value<V: Wire, T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<V> {
    let bytes = read_frame(io, V::MAX_ENCODED).await?;
    V::from_wire(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_value<V: Wire, T: AsyncWrite + Unpin + Send>(io: &mut T, v: V) -> io::Result<()> {
    let bytes = v
        .to_wire()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    write_frame(io, &bytes).await
}

impl<Req, Resp> request_response::Codec for Codec<Req, Resp>
where
    Req: Wire + Send + 'static,
    Resp: Wire + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Framed<Req>;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Framed<Req>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_framed(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_value(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Framed<Req>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Framed::Value(v) => write_value(io, v).await,
            Framed::Refused(e) => Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_value(io, res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use libp2p::request_response::Codec as _;

    type TestCodec = Codec<DirectResponse, DirectResponse>;

    fn block<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn response_round_trips_through_the_frame() {
        let resp = DirectResponse::Accepted {
            envelope_id: [7; 32],
            duplicate: true,
        };
        let mut out = Cursor::new(Vec::new());
        block(TestCodec::default().write_response(&PROTOCOL, &mut out, resp)).expect("writes");
        let bytes = out.into_inner();
        assert_eq!(
            u32::from_be_bytes(bytes[..4].try_into().expect("4")) as usize,
            bytes.len() - 4
        );
        let mut input = Cursor::new(bytes);
        let back = block(TestCodec::default().read_response(&PROTOCOL, &mut input)).expect("reads");
        assert_eq!(back, resp);
    }

    #[test]
    fn an_oversized_length_prefix_is_refused_before_reading() {
        // Claims 4 GiB but carries 3 bytes: refused from the prefix alone.
        let mut input = Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        let got = block(TestCodec::default().read_request(&PROTOCOL, &mut input)).expect("read");
        assert_eq!(
            got,
            Framed::Refused(FrameError::TooLarge {
                len: u32::MAX as usize,
                limit: MAX_RESPONSE_BYTES
            })
        );
        assert_eq!(input.position(), 4, "nothing read beyond the prefix");
        // A response with such a prefix is an error for the requester.
        let mut input = Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        let err =
            block(TestCodec::default().read_response(&PROTOCOL, &mut input)).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn garbage_is_refused_and_truncated_frames_are_errors() {
        let mut garbage = Cursor::new(vec![0, 0, 0, 3, 9, 9, 9]);
        let got = block(TestCodec::default().read_request(&PROTOCOL, &mut garbage)).expect("read");
        assert!(
            matches!(got, Framed::Refused(FrameError::Malformed(_))),
            "{got:?}"
        );
        assert_eq!(
            match got {
                Framed::Refused(e) => e.reason(),
                Framed::Value(_) => unreachable!(),
            },
            RejectReason::Malformed
        );
        let mut short = Cursor::new(vec![0, 0, 0, 10, 1]);
        assert!(block(TestCodec::default().read_request(&PROTOCOL, &mut short)).is_err());
        let mut empty = Cursor::new(Vec::new());
        assert!(block(TestCodec::default().read_request(&PROTOCOL, &mut empty)).is_err());
    }

    fn envelope(ciphertext_len: usize) -> Envelope {
        Envelope {
            routing_key: [1; 32],
            timestamp: 2,
            ttl: 3,
            ephemeral: [4; 32],
            ciphertext: vec![5; ciphertext_len],
        }
    }

    #[test]
    fn a_request_costs_what_its_envelopes_cost() {
        let envelopes = vec![envelope(300), envelope(1200), envelope(0)];
        let request = DirectRequest {
            envelopes: envelopes.clone(),
        };
        let used: usize = envelopes.iter().map(DirectRequest::cost).sum();
        assert_eq!(
            request.to_wire().expect("encodes").len(),
            REQUEST_OVERHEAD_BYTES + used
        );
    }

    #[test]
    fn packing_stops_at_the_count_and_the_size() {
        // A largest envelope always fits alone, and nothing fits beside it.
        let largest = envelope(MAX_ENVELOPE_BYTES - 1 - ENVELOPE_FIXED_BYTES);
        assert_eq!(
            largest.to_wire().expect("encodes").len(),
            MAX_ENVELOPE_BYTES
        );
        let cost = DirectRequest::cost(&largest);
        assert!(DirectRequest::fits(0, 0, cost));
        assert!(!DirectRequest::fits(1, cost, cost));
        // Packed to the limit, a request encodes and decodes under it.
        let mut request = DirectRequest {
            envelopes: Vec::new(),
        };
        let mut used = 0;
        loop {
            let next = envelope(4_000);
            let more = DirectRequest::cost(&next);
            if !DirectRequest::fits(request.envelopes.len(), used, more) {
                break;
            }
            used += more;
            request.envelopes.push(next);
        }
        let bytes = request.to_wire().expect("encodes");
        assert!(bytes.len() <= MAX_REQUEST_BYTES);
        assert_eq!(DirectRequest::from_wire(&bytes).expect("decodes"), request);
        // Small envelopes stop at the count.
        let small = DirectRequest::cost(&envelope(300));
        assert!(DirectRequest::fits(MAX_BATCH_ENVELOPES - 1, 0, small));
        assert!(!DirectRequest::fits(MAX_BATCH_ENVELOPES, 0, small));
    }

    #[test]
    fn only_one_to_the_most_envelopes_pass_the_check() {
        let with = |n| DirectRequest {
            envelopes: vec![envelope(300); n],
        };
        assert_eq!(with(0).check(), Err(RejectReason::Malformed));
        assert_eq!(with(1).check(), Ok(()));
        assert_eq!(with(MAX_BATCH_ENVELOPES).check(), Ok(()));
        assert_eq!(
            with(MAX_BATCH_ENVELOPES + 1).check(),
            Err(RejectReason::Malformed)
        );
    }

    #[test]
    fn a_full_reply_fits_its_limit() {
        let reply = DirectReply::Each(vec![
            DirectResponse::Accepted {
                envelope_id: [0xff; 32],
                duplicate: true,
            };
            MAX_BATCH_ENVELOPES
        ]);
        let bytes = reply.to_wire().expect("encodes under the limit");
        assert_eq!(DirectReply::from_wire(&bytes).expect("decodes"), reply);
    }

    #[test]
    fn reasons_are_classified() {
        assert!(RejectReason::Busy.is_transient());
        assert!(!RejectReason::Undecryptable.is_transient());
        assert!(RejectReason::Undecryptable.is_hostile());
        assert!(!RejectReason::Expired.is_hostile());
    }
}
