//! Sessions: what the node calls to send and receive a 1:1 message. A session is one X3DH
//! handshake followed by a Double Ratchet; a [`SessionRecord`] holds the sessions with one peer;
//! [`seal_message`] and [`open_message`] wrap session messages in sealed envelopes;
//! [`seal_pair_message`] and [`open_pair_message`] in pair envelopes, once the session is
//! established and both partners route by pair mailboxes. See `docs/protocol.md`, section
//! "Session messages".
//!
//! ```text
//!  seal_message: record has a current session? ── no ──► X3DH against the peer's bundle,
//!                 │ yes                                    new session becomes current
//!                 ▼
//!          ratchet encrypt ──► SessionMessage::PreKey (until the first reply) or ::Normal
//!                 ──► envelope::seal (sealed sender, padded)
//!
//!  open_message:  envelope::open ──► sender + SessionMessage
//!     PreKey: a held session was made by this handshake? ── yes ──► decrypt with it
//!             (initiator, ephemeral) in the replay cache?  ── yes ──► Replay
//!             otherwise X3DH (responder) + decrypt ──► new current session, cache entry
//!     Normal: the session that knows the ratchet key, else each session in turn (current first)
//!     A previous session that decrypts becomes current again.
//! ```
//!
//! Rules of the record (as Signal's session records): an incoming pre-key message with a new
//! ephemeral key starts a new session that becomes current, and the one it replaces is kept as a
//! previous session (at most [`MAX_PREVIOUS_SESSIONS`]); a previous session that decrypts a
//! message is promoted back to current. When both sides initiate at once each ends up with both
//! sessions and they converge on whichever carries the next exchanged message. Until the
//! initiator has received a message on its session, its messages keep carrying the
//! [`PreKeyHeader`], so a lost or reordered first message does not break the session.
//!
//! Every operation is transactional: on error, the record, prekeys and replay cache the caller
//! passed are unchanged; on success [`open_message`] returns the new record and has updated the
//! prekeys and replay cache in place, which the caller persists together, atomically.

use std::fmt;

use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};

use crate::{
    envelope::{self, Envelope, EnvelopeError, PairEnvelopeKey},
    identity::{Identity, PublicIdentity},
    impl_wire,
    prekey::{PrekeySecrets, VerifiedBundle},
    ratchet::{
        RatchetError, RatchetMessage, RatchetState, MAX_RATCHET_MESSAGE_BYTES,
        MAX_RATCHET_STATE_BYTES,
    },
    replay::ReplayCache,
    wire::{Wire, WireError},
    x3dh::{self, PreKeyHeader, X3dhError, PREKEY_HEADER_BYTES},
};

pub use crate::ratchet::MAX_PLAINTEXT_BYTES;

/// Previous sessions a record keeps besides the current one.
pub const MAX_PREVIOUS_SESSIONS: usize = 4;
/// Largest encoded [`SessionMessage`]: version, variant, pre-key header, ratchet message.
pub const MAX_SESSION_MESSAGE_BYTES: usize =
    1 + 4 + (PREKEY_HEADER_BYTES - 1) + (MAX_RATCHET_MESSAGE_BYTES - 1);
/// Encoded size of the largest session: ratchet state, role, base key, pending header, time.
const MAX_SESSION_BYTES: usize = (MAX_RATCHET_STATE_BYTES - 1) + 1 + 32 + PREKEY_HEADER_BYTES + 8;
/// Largest encoded [`SessionRecord`].
pub const MAX_SESSION_RECORD_BYTES: usize =
    1 + (1 + MAX_SESSION_BYTES) + 8 + MAX_PREVIOUS_SESSIONS * MAX_SESSION_BYTES;

// A session message always fits an envelope.
const _: () = assert!(MAX_SESSION_MESSAGE_BYTES <= envelope::MAX_PAYLOAD_BYTES);

/// Why a message could not be sealed or opened. The caller's state is unchanged in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The envelope could not be opened (expired, not for us, tampered outside, bad signature…).
    /// Boxed, like the identities below, to keep the error (and every `Result` carrying it) small.
    #[error("envelope: {0}")]
    Envelope(Box<EnvelopeError>),
    /// The payload inside the envelope is not a valid session message.
    #[error("session message: {0}")]
    Wire(#[from] WireError),
    /// A pre-key message whose handshake was already accepted, and whose session is gone.
    #[error("replayed first message from {initiator:?}")]
    Replay {
        /// Who the handshake claims to come from.
        initiator: Box<PublicIdentity>,
    },
    /// The message was already received (or its key discarded after expiry or eviction).
    #[error("duplicate message {n} of its chain (already received, or its key was discarded)")]
    Duplicate {
        /// Its number in its chain.
        n: u32,
    },
    /// The key kept for this late message expired.
    #[error("message {n} arrived after its skipped key expired")]
    SkippedKeyExpired {
        /// Its number in its chain.
        n: u32,
    },
    /// The message does not authenticate under any session with the sender.
    #[error("message does not authenticate (tampered, truncated or from a lost session)")]
    Tampered,
    /// The message would skip more keys than allowed in one chain.
    #[error(
        "message would skip {requested} message keys (limit {})",
        crate::ratchet::MAX_SKIP
    )]
    TooManySkipped {
        /// Keys it would skip.
        requested: u64,
    },
    /// The first message names a prekey we do not hold (unknown, used, or past its grace).
    #[error("unknown {} prekey {id}", if *.one_time { "one-time" } else { "signed" })]
    UnknownPrekey {
        /// The prekey id.
        id: u32,
        /// Whether it is a one-time prekey.
        one_time: bool,
    },
    /// The first message uses our current signed prekey long after it expired: we failed to
    /// rotate it, and accepting would leave a replay window open.
    #[error("signed prekey {id} expired at {expired_at}: rotate the signed prekey")]
    StalePrekey {
        /// The prekey id.
        id: u32,
        /// When it stopped being acceptable (bundle expiry plus the grace period).
        expired_at: u64,
    },
    /// A normal message from a peer we have no session with.
    #[error("no session with {peer:?}")]
    NoSession {
        /// The sender.
        peer: Box<PublicIdentity>,
    },
    /// There is no session with the recipient yet and no bundle was given to start one.
    #[error("no session with {peer:?} yet: fetch their prekey bundle")]
    BundleRequired {
        /// The recipient.
        peer: Box<PublicIdentity>,
    },
    /// The bundle given belongs to someone other than the recipient.
    #[error("bundle of {found:?} given for a message to {expected:?}")]
    WrongBundle {
        /// The recipient.
        expected: Box<PublicIdentity>,
        /// Whose bundle it is.
        found: Box<PublicIdentity>,
    },
    /// A key in the handshake or a ratchet header is a low-order point.
    #[error("low-order key in the handshake or ratchet")]
    LowOrderKey,
    /// The plaintext exceeds [`MAX_PLAINTEXT_BYTES`].
    #[error("plaintext of {len} bytes exceeds the limit of {MAX_PLAINTEXT_BYTES} bytes")]
    PlaintextTooLarge {
        /// Its length.
        len: usize,
    },
    /// The session cannot send: it has not received its first message.
    #[error("session cannot send yet")]
    NoSendingChain,
    /// The sending chain reached 2^32 messages.
    #[error("message counter exhausted")]
    CounterExhausted,
}

impl From<EnvelopeError> for SessionError {
    fn from(e: EnvelopeError) -> Self {
        Self::Envelope(Box::new(e))
    }
}

impl From<RatchetError> for SessionError {
    fn from(e: RatchetError) -> Self {
        match e {
            RatchetError::Tampered => Self::Tampered,
            RatchetError::Duplicate { n } => Self::Duplicate { n },
            RatchetError::SkippedKeyExpired { n } => Self::SkippedKeyExpired { n },
            RatchetError::TooManySkipped { requested } => Self::TooManySkipped { requested },
            RatchetError::LowOrderKey => Self::LowOrderKey,
            RatchetError::PlaintextTooLarge { len } => Self::PlaintextTooLarge { len },
            RatchetError::NoSendingChain => Self::NoSendingChain,
            RatchetError::CounterExhausted => Self::CounterExhausted,
            RatchetError::Wire(w) => Self::Wire(w),
        }
    }
}

impl From<X3dhError> for SessionError {
    fn from(e: X3dhError) -> Self {
        match e {
            X3dhError::LowOrderKey { .. } => Self::LowOrderKey,
            X3dhError::UnknownSignedPrekey { id } => Self::UnknownPrekey {
                id,
                one_time: false,
            },
            X3dhError::UnknownOneTimePrekey { id } => Self::UnknownPrekey { id, one_time: true },
        }
    }
}

/// What travels inside a sealed envelope between two users (wire type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionMessage {
    /// A message of a session the recipient may not have yet: carries the handshake.
    PreKey {
        /// What the responder needs to run X3DH.
        header: PreKeyHeader,
        /// The ratchet message.
        message: RatchetMessage,
    },
    /// A message of an established session.
    Normal(RatchetMessage),
}
impl_wire!(SessionMessage, MAX_SESSION_MESSAGE_BYTES);

impl SessionMessage {
    /// The ratchet message inside.
    pub fn ratchet_message(&self) -> &RatchetMessage {
        match self {
            Self::PreKey { message, .. } | Self::Normal(message) => message,
        }
    }
}

/// One session: a handshake and the ratchet that followed.
#[derive(Clone, Serialize, Deserialize)]
struct Session {
    ratchet: RatchetState,
    /// Whether we initiated it.
    initiator: bool,
    /// The initiator's ephemeral key `EK_A`: names the session on both sides.
    base_key: [u8; 32],
    /// Initiator only: the handshake header, attached until a message arrives on the session.
    pending_prekey: Option<PreKeyHeader>,
    /// When it was created (unix seconds).
    created_at: u64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &hex4(&self.base_key))
            .field("initiator", &self.initiator)
            .field("awaiting_reply", &self.pending_prekey.is_some())
            .field("created_at", &self.created_at)
            .field("ratchet", &self.ratchet)
            .finish()
    }
}

fn hex4(bytes: &[u8; 32]) -> String {
    bytes[..4].iter().map(|b| format!("{b:02x}")).collect()
}

impl Session {
    /// Decrypt a ratchet message; clears the pending pre-key header once the peer has answered.
    fn decrypt(&mut self, message: &RatchetMessage, now: u64) -> Result<Vec<u8>, RatchetError> {
        let plaintext = self.ratchet.decrypt(message, now)?;
        self.pending_prekey = None;
        Ok(plaintext)
    }
}

/// The sessions with one peer: the current one and up to [`MAX_PREVIOUS_SESSIONS`] previous
/// ones, most recent first (wire type; the node persists one per contact).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionRecord {
    current: Option<Session>,
    previous: Vec<Session>,
}
impl_wire!(SessionRecord, MAX_SESSION_RECORD_BYTES);

impl SessionRecord {
    /// A record with no session.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether there is a current session to send on.
    pub fn has_session(&self) -> bool {
        self.current.is_some()
    }

    /// The id of the current session (the initiator's ephemeral key, the same on both sides).
    pub fn current_session_id(&self) -> Option<[u8; 32]> {
        self.current.as_ref().map(|s| s.base_key)
    }

    /// Whether the current session is ours and still waiting for the peer's first message (its
    /// messages carry the pre-key header).
    pub fn awaiting_reply(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|s| s.pending_prekey.is_some())
    }

    /// How many sessions the record holds (current and previous).
    pub fn session_count(&self) -> usize {
        usize::from(self.current.is_some()) + self.previous.len()
    }

    /// Stop sending on the current session (it stays as a previous one, to read late messages):
    /// the next [`seal_message`] runs a new handshake. For when the peer lost its state.
    pub fn archive_current(&mut self) {
        if let Some(s) = self.current.take() {
            self.previous.insert(0, s);
            self.previous.truncate(MAX_PREVIOUS_SESSIONS);
        }
    }

    /// Make `session` current, keeping the old current as the most recent previous session.
    fn install(&mut self, session: Session) {
        self.archive_current();
        self.current = Some(session);
    }

    /// Make previous session `i` current again.
    fn promote(&mut self, i: usize) {
        let s = self.previous.remove(i);
        self.install(s);
    }

    /// Decrypt with the session at `slot` (`None` = current, `Some(i)` = previous `i`),
    /// promoting it on success.
    fn decrypt_at(
        &mut self,
        slot: Option<usize>,
        message: &RatchetMessage,
        now: u64,
    ) -> Result<Vec<u8>, RatchetError> {
        match slot {
            None => self
                .current
                .as_mut()
                .ok_or(RatchetError::Tampered)?
                .decrypt(message, now),
            Some(i) => {
                let plaintext = self
                    .previous
                    .get_mut(i)
                    .ok_or(RatchetError::Tampered)?
                    .decrypt(message, now)?;
                self.promote(i);
                Ok(plaintext)
            }
        }
    }

    /// All slots, current first.
    fn slots(&self) -> Vec<(Option<usize>, &Session)> {
        self.current
            .iter()
            .map(|s| (None, s))
            .chain(self.previous.iter().enumerate().map(|(i, s)| (Some(i), s)))
            .collect()
    }

    /// Decrypt a normal message: with the session that knows its ratchet key if there is one,
    /// otherwise with each session in turn. The current session's error wins.
    fn decrypt_normal(
        &mut self,
        peer: &PublicIdentity,
        message: &RatchetMessage,
        now: u64,
    ) -> Result<Vec<u8>, SessionError> {
        let slots: Vec<(Option<usize>, bool)> = self
            .slots()
            .into_iter()
            .map(|(slot, s)| (slot, s.ratchet.knows_ratchet_key(&message.header.dh)))
            .collect();
        if slots.is_empty() {
            return Err(SessionError::NoSession {
                peer: Box::new(*peer),
            });
        }
        if let Some((slot, _)) = slots.iter().find(|(_, knows)| *knows) {
            return Ok(self.decrypt_at(*slot, message, now)?);
        }
        let mut first_error = None;
        for (slot, _) in slots {
            match self.decrypt_at(slot, message, now) {
                Ok(plaintext) => return Ok(plaintext),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.map_or(SessionError::Tampered, SessionError::from))
    }

    /// The slot of the session we responded to with ephemeral `base_key`, if held.
    fn responder_slot(&self, base_key: &[u8; 32]) -> Option<Option<usize>> {
        self.slots()
            .into_iter()
            .find(|(_, s)| !s.initiator && &s.base_key == base_key)
            .map(|(slot, _)| slot)
    }
}

/// What [`open_message`] returns. `Debug` shows the plaintext's length, never its bytes.
pub struct Received {
    /// The authenticated sender.
    pub sender: PublicIdentity,
    /// The decrypted plaintext.
    pub plaintext: Vec<u8>,
    /// The sender's session record after this message: persist it.
    pub record: SessionRecord,
    /// Whether this message started a new session (the replay cache and prekeys changed).
    pub new_session: bool,
}

impl fmt::Debug for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Received")
            .field("sender", &self.sender)
            .field("plaintext_len", &self.plaintext.len())
            .field("record", &self.record)
            .field("new_session", &self.new_session)
            .finish()
    }
}

/// The checks made before any state advances: the plaintext size and the TTL.
fn check_sealable(plaintext: &[u8], ttl: u32) -> Result<(), SessionError> {
    if plaintext.len() > MAX_PLAINTEXT_BYTES {
        return Err(SessionError::PlaintextTooLarge {
            len: plaintext.len(),
        });
    }
    if ttl > envelope::MAX_TTL_SECS {
        return Err(EnvelopeError::TtlTooLong { ttl }.into());
    }
    Ok(())
}

/// Encrypt `plaintext` with `session` (advancing it) and encode the session message: `PreKey`
/// while the handshake header is pending, `Normal` after.
fn encrypt_payload<R: CryptoRngCore + ?Sized>(
    session: &mut Session,
    plaintext: &[u8],
    rng: &mut R,
) -> Result<Vec<u8>, SessionError> {
    let message = session.ratchet.encrypt(plaintext, rng)?;
    let session_message = match session.pending_prekey {
        Some(header) => SessionMessage::PreKey { header, message },
        None => SessionMessage::Normal(message),
    };
    Ok(session_message.to_wire()?)
}

/// Encrypt `plaintext` for `recipient` and seal it in an envelope routed by `routing_key`.
///
/// Uses the record's current session, or, when there is none, runs the handshake against
/// `bundle` (required then, [`SessionError::BundleRequired`] otherwise) and makes the new session
/// current. On error `record` is unchanged.
#[allow(clippy::too_many_arguments)]
pub fn seal_message<R: CryptoRngCore + ?Sized>(
    me: &Identity,
    record: &mut SessionRecord,
    bundle: Option<&VerifiedBundle>,
    recipient: &PublicIdentity,
    routing_key: [u8; 32],
    now: u64,
    ttl: u32,
    plaintext: &[u8],
    rng: &mut R,
) -> Result<Envelope, SessionError> {
    check_sealable(plaintext, ttl)?;
    // A new session is built on the side and installed only once the envelope is sealed.
    let mut fresh = None;
    if record.current.is_none() {
        let bundle = bundle.ok_or_else(|| SessionError::BundleRequired {
            peer: Box::new(*recipient),
        })?;
        if bundle.identity() != recipient {
            return Err(SessionError::WrongBundle {
                expected: Box::new(*recipient),
                found: Box::new(*bundle.identity()),
            });
        }
        let init = x3dh::initiate(me, bundle, rng)?;
        let ratchet = RatchetState::new_initiator(
            &init.keys.shared_secret,
            init.their_signed_prekey,
            init.keys.associated_data,
            rng,
        )?;
        fresh = Some(Session {
            ratchet,
            initiator: true,
            base_key: init.header.ephemeral,
            pending_prekey: Some(init.header),
            created_at: now,
        });
    }
    // With the size and TTL checked, sealing cannot fail after encryption, so an existing
    // session advances in place.
    let session = match fresh.as_mut() {
        Some(s) => s,
        None => record
            .current
            .as_mut()
            .ok_or_else(|| SessionError::BundleRequired {
                peer: Box::new(*recipient),
            })?,
    };
    let payload = encrypt_payload(session, plaintext, rng)?;
    let envelope = envelope::seal(me, recipient, routing_key, now, ttl, &payload, rng)?;
    if let Some(s) = fresh {
        record.install(s);
    }
    Ok(envelope)
}

/// Encrypt `plaintext` with the record's current session and seal it in a pair envelope under
/// `key`, routed by `routing_key` (the recipient's pair mailbox for the epoch of `now`). See
/// [`envelope::seal_pair`]: for partners whose session is established (the recipient has
/// written back), about ten times cheaper than [`seal_message`] (no Diffie-Hellman, no
/// signature; `docs/performance.md`, "Pair envelopes").
///
/// Never starts a session: without one, [`SessionError::BundleRequired`]. On error `record` is
/// unchanged.
#[allow(clippy::too_many_arguments)]
pub fn seal_pair_message<R: CryptoRngCore + ?Sized>(
    record: &mut SessionRecord,
    recipient: &PublicIdentity,
    key: &PairEnvelopeKey,
    routing_key: [u8; 32],
    now: u64,
    ttl: u32,
    plaintext: &[u8],
    rng: &mut R,
) -> Result<Envelope, SessionError> {
    check_sealable(plaintext, ttl)?;
    let session = record
        .current
        .as_mut()
        .ok_or_else(|| SessionError::BundleRequired {
            peer: Box::new(*recipient),
        })?;
    // With the size and TTL checked, sealing cannot fail after encryption, so the session
    // advances in place (as in `seal_message`).
    let payload = encrypt_payload(session, plaintext, rng)?;
    Ok(envelope::seal_pair(
        key,
        routing_key,
        now,
        ttl,
        &payload,
        rng,
    )?)
}

/// When a replay-cache entry for a handshake on signed prekey `id` may expire (when the prekey's
/// secret can no longer be used), or why the handshake must be refused: a current prekey past its
/// deadline means rotation is overdue, and accepting it would need an entry kept for ever.
fn replay_expiry(prekeys: &PrekeySecrets, id: u32, now: u64) -> Result<u64, SessionError> {
    let expired_at = prekeys
        .signed_prekey_deadline(id)
        .ok_or(SessionError::UnknownPrekey {
            id,
            one_time: false,
        })?;
    if now >= expired_at {
        return Err(SessionError::StalePrekey { id, expired_at });
    }
    Ok(expired_at)
}

/// Open an envelope addressed to `me`, received at `now`, and decrypt the session message in it.
///
/// `record` is asked for the sender's session record once the sender is known (`None` if there
/// is none). A pre-key message that starts a new session consumes its one-time prekey from
/// `prekeys` and is remembered in `replay`; both are changed only on success. On success the
/// caller persists the returned record, `prekeys` and `replay` together; on error nothing changed.
pub fn open_message(
    me: &Identity,
    prekeys: &mut PrekeySecrets,
    replay: &mut ReplayCache,
    record: impl FnOnce(&PublicIdentity) -> Option<SessionRecord>,
    envelope: &Envelope,
    now: u64,
) -> Result<Received, SessionError> {
    let opened = envelope::open(me, envelope, now)?;
    open_payload(
        me,
        prekeys,
        replay,
        record,
        opened.sender,
        &opened.payload,
        now,
    )
}

/// Open a pair envelope that `sender` sealed to `me` under `key` (see [`seal_pair_message`]),
/// received at `now`, and decrypt the session message in it. Otherwise as [`open_message`]:
/// `record` is asked for the sender's session record, and on error nothing changed.
#[allow(clippy::too_many_arguments)]
pub fn open_pair_message(
    me: &Identity,
    prekeys: &mut PrekeySecrets,
    replay: &mut ReplayCache,
    record: impl FnOnce(&PublicIdentity) -> Option<SessionRecord>,
    sender: &PublicIdentity,
    key: &PairEnvelopeKey,
    envelope: &Envelope,
    now: u64,
) -> Result<Received, SessionError> {
    let payload = envelope::open_pair(key, envelope, now)?;
    open_payload(me, prekeys, replay, record, *sender, &payload, now)
}

/// Decrypt the session message `payload` that `sender` sent (its envelope is open).
fn open_payload(
    me: &Identity,
    prekeys: &mut PrekeySecrets,
    replay: &mut ReplayCache,
    record: impl FnOnce(&PublicIdentity) -> Option<SessionRecord>,
    sender: PublicIdentity,
    payload: &[u8],
    now: u64,
) -> Result<Received, SessionError> {
    let message = SessionMessage::from_wire(payload)?;
    let mut record = record(&sender).unwrap_or_default();
    let (plaintext, new_session) = match message {
        SessionMessage::Normal(m) => (record.decrypt_normal(&sender, &m, now)?, false),
        SessionMessage::PreKey { header, message } => {
            if let Some(slot) = record.responder_slot(&header.ephemeral) {
                // A further first-phase message of a session this handshake already made.
                (record.decrypt_at(slot, &message, now)?, false)
            } else if replay.contains(&sender, &header.ephemeral, now) {
                return Err(SessionError::Replay {
                    initiator: Box::new(sender),
                });
            } else {
                let mut new_prekeys = prekeys.clone();
                let responded = x3dh::respond(me, &sender, &header, &mut new_prekeys, now)?;
                let expires_at = replay_expiry(prekeys, header.signed_prekey_id, now)?;
                let mut session = Session {
                    ratchet: RatchetState::new_responder(
                        &responded.keys.shared_secret,
                        &responded.signed_prekey,
                        responded.keys.associated_data,
                    ),
                    initiator: false,
                    base_key: header.ephemeral,
                    pending_prekey: None,
                    created_at: now,
                };
                let plaintext = session.decrypt(&message, now)?;
                record.install(session);
                replay.insert(&sender, &header.ephemeral, expires_at, now);
                *prekeys = new_prekeys;
                (plaintext, true)
            }
        }
    };
    Ok(Received {
        sender,
        plaintext,
        record,
        new_session,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ratchet::MAX_RATCHET_STATE_BYTES, replay::MAX_REPLAY_CACHE_BYTES};

    /// The limits `docs/protocol.md` states, so the document and the code cannot drift apart.
    #[test]
    fn limits_are_as_documented() {
        assert_eq!(MAX_PLAINTEXT_BYTES, 61_440);
        assert_eq!(MAX_RATCHET_MESSAGE_BYTES, 61_505);
        assert_eq!(PREKEY_HEADER_BYTES, 42);
        assert_eq!(MAX_SESSION_MESSAGE_BYTES, 61_550);
        assert_eq!(MAX_RATCHET_STATE_BYTES, 169_336);
        assert_eq!(MAX_SESSION_RECORD_BYTES, 847_100);
        assert_eq!(MAX_REPLAY_CACHE_BYTES, 589_833);
        assert_eq!(SessionMessage::MAX_ENCODED, MAX_SESSION_MESSAGE_BYTES);
    }

    #[test]
    fn session_message_layout_is_byte_exact() {
        let header = PreKeyHeader {
            signed_prekey_id: 7,
            one_time_prekey_id: Some(9),
            ephemeral: [0xee; 32],
        };
        let message = RatchetMessage {
            header: crate::ratchet::RatchetHeader {
                dh: [0xdd; 32],
                pn: 2,
                n: 3,
            },
            ciphertext: vec![0xcc; 17],
        };
        let bytes = SessionMessage::PreKey {
            header,
            message: message.clone(),
        }
        .to_wire()
        .expect("enc");
        let mut expect = vec![1u8, 0, 0, 0, 0, 7, 0, 0, 0, 1, 9, 0, 0, 0];
        expect.extend_from_slice(&[0xee; 32]);
        expect.extend_from_slice(&[0xdd; 32]);
        expect.extend_from_slice(&[2, 0, 0, 0, 3, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0, 0]);
        expect.extend_from_slice(&[0xcc; 17]);
        assert_eq!(bytes, expect);
        let normal = SessionMessage::Normal(message).to_wire().expect("enc");
        assert_eq!(&normal[..5], &[1, 1, 0, 0, 0]);
        assert_eq!(&normal[5..], &expect[46..]);
    }
}
