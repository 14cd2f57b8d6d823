//! The pair keys of this user's partners: which pair mailbox our messages to a partner are routed
//! by and which pair-envelope key seals them, and, for an inbound envelope, which partner's pair
//! mailbox its routing key is (so that it opens as a pair envelope, without a Diffie-Hellman).
//! See `docs/protocol.md`, "Pair envelopes", and `docs/architecture.md`, "Messaging".
//!
//! Every key here is derived from the static pair secret (one X25519 agreement per partner,
//! cached) and the epoch; a pair mailbox id costs one Ed25519 key generation more. Both are
//! cached: a message pays neither once its partner's keys for the day are known.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
};

use meshchat_protocol::{
    addressing::{self, pair_secret, PairSecret},
    envelope::{Envelope, PairEnvelopeKey},
    Identity, MailboxKeys, PublicIdentity,
};

use crate::error::NodeError;

/// Cached pair secrets and outgoing keys are all forgotten when there are more than this many.
const CACHE_MAX: usize = 4096;
/// Inbound indexes are kept for at most this many epochs (the oldest is dropped): mail can be
/// collected from every epoch of the longest TTL.
const EPOCHS_MAX: usize = 40;

/// What sealing a message to a partner with an established session uses.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    /// The partner's pair mailbox for the epoch (the envelope's routing key).
    pub(crate) routing_key: [u8; 32],
    /// The key of pair envelopes to the partner during the epoch.
    pub(crate) key: PairEnvelopeKey,
}

/// The partners whose pair mailboxes for one epoch are known, and those mailboxes' ids.
#[derive(Debug, Default)]
struct EpochIndex {
    peers: HashSet<PublicIdentity>,
    by_mailbox: HashMap<[u8; 32], PublicIdentity>,
}

#[derive(Debug, Default)]
struct Inner {
    secrets: HashMap<PublicIdentity, PairSecret>,
    outgoing: HashMap<PublicIdentity, (u64, Outgoing)>,
    incoming: BTreeMap<u64, EpochIndex>,
    /// Our partners as last read from storage; `None` until read, and again after
    /// [`PairKeys::partners_changed`].
    partners: Option<Vec<PublicIdentity>>,
    /// Counts [`PairKeys::partners_changed`] calls, so a list read across one is not kept.
    changes: u64,
}

/// The cache (shared by the send and receive paths; all methods are quick once warm, and run on
/// `spawn_blocking` like the rest of the crypto).
#[derive(Debug, Default)]
pub(crate) struct PairKeys {
    inner: Mutex<Inner>,
}

impl Inner {
    fn secret(&mut self, me: &Identity, peer: &PublicIdentity) -> PairSecret {
        if let Some(s) = self.secrets.get(peer) {
            return s.clone();
        }
        let s = pair_secret(me, peer);
        if self.secrets.len() >= CACHE_MAX {
            self.secrets.clear();
        }
        self.secrets.insert(*peer, s.clone());
        s
    }
}

impl PairKeys {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The routing key and sealing key of our messages to `to` during `epoch`.
    pub(crate) fn outgoing(&self, me: &Identity, to: &PublicIdentity, epoch: u64) -> Outgoing {
        let mut inner = self.lock();
        if let Some((e, out)) = inner.outgoing.get(to) {
            if *e == epoch {
                return out.clone();
            }
        }
        let pair = inner.secret(me, to);
        let out = Outgoing {
            routing_key: MailboxKeys::derive(&pair, to, epoch).id(),
            key: PairEnvelopeKey::derive(&pair, to, epoch),
        };
        if inner.outgoing.len() >= CACHE_MAX {
            inner.outgoing.clear();
        }
        inner.outgoing.insert(*to, (epoch, out.clone()));
        out
    }

    /// The set of partners may have grown (a session with a new peer was created): the next
    /// unknown routing key makes [`PairKeys::incoming`] read it again.
    pub(crate) fn partners_changed(&self) {
        let mut inner = self.lock();
        inner.partners = None;
        inner.changes += 1;
    }

    /// If `envelope` is routed by the pair mailbox of one of our partners (for the epoch of its
    /// timestamp), that partner and the key to open it with. `partners` reads them from storage;
    /// it is asked only for an unknown routing key, and only once until
    /// [`PairKeys::partners_changed`], so envelopes with made-up routing keys cost no I/O.
    pub(crate) fn incoming(
        &self,
        me: &Identity,
        envelope: &Envelope,
        partners: impl FnOnce() -> Result<Vec<PublicIdentity>, NodeError>,
    ) -> Result<Option<(PublicIdentity, PairEnvelopeKey)>, NodeError> {
        let epoch = addressing::epoch(envelope.timestamp);
        let found = |inner: &mut Inner| {
            let peer = *inner
                .incoming
                .get(&epoch)?
                .by_mailbox
                .get(&envelope.routing_key)?;
            let pair = inner.secret(me, &peer);
            Some((peer, PairEnvelopeKey::derive(&pair, &me.public(), epoch)))
        };
        if let Some(hit) = found(&mut self.lock()) {
            return Ok(Some(hit));
        }
        // First contact is sealed sender, and its mailbox is nobody's pair mailbox.
        if envelope.routing_key == addressing::first_contact_mailbox(&me.public()) {
            return Ok(None);
        }
        let (cached, changes) = {
            let inner = self.lock();
            (inner.partners.clone(), inner.changes)
        };
        let partners = match cached {
            Some(list) => list,
            None => {
                let list = partners()?;
                let mut inner = self.lock();
                if inner.changes == changes {
                    inner.partners = Some(list.clone());
                }
                list
            }
        };
        let mut inner = self.lock();
        let missing: Vec<PublicIdentity> = {
            let known = inner.incoming.get(&epoch).map(|i| &i.peers);
            partners
                .into_iter()
                .filter(|p| known.is_none_or(|k| !k.contains(p)))
                .collect()
        };
        if !missing.is_empty() {
            let me_public = me.public();
            let ids: Vec<(PublicIdentity, [u8; 32])> = missing
                .iter()
                .map(|p| {
                    let pair = inner.secret(me, p);
                    (*p, MailboxKeys::derive(&pair, &me_public, epoch).id())
                })
                .collect();
            if !inner.incoming.contains_key(&epoch) && inner.incoming.len() >= EPOCHS_MAX {
                inner.incoming.pop_first();
            }
            let index = inner.incoming.entry(epoch).or_default();
            for (peer, id) in ids {
                index.peers.insert(peer);
                index.by_mailbox.insert(id, peer);
            }
        }
        Ok(found(&mut inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshchat_protocol::envelope::{open_pair, seal_pair, DEFAULT_TTL_SECS};
    use rand::rngs::OsRng;

    const NOW: u64 = 1_700_000_000;

    fn id(n: u8) -> Identity {
        Identity::from_seed(&[n; 32])
    }

    #[test]
    fn a_partner_is_found_by_its_pair_mailbox_and_its_key_opens_the_envelope() {
        let (alice, bob, carol) = (id(1), id(2), id(3));
        let epoch = addressing::epoch(NOW);
        let out = PairKeys::default().outgoing(&alice, &bob.public(), epoch);
        let env = seal_pair(
            &out.key,
            out.routing_key,
            NOW,
            DEFAULT_TTL_SECS,
            b"hi",
            &mut OsRng,
        )
        .expect("seals");

        let bobs = PairKeys::default();
        let mut asked = 0;
        let (sender, key) = bobs
            .incoming(&bob, &env, || {
                asked += 1;
                Ok(vec![carol.public(), alice.public()])
            })
            .expect("no storage error")
            .expect("alice's pair mailbox");
        assert_eq!(sender, alice.public());
        assert_eq!(open_pair(&key, &env, NOW).expect("opens"), b"hi");
        // Cached: the partners are not asked again.
        bobs.incoming(&bob, &env, || panic!("asked again"))
            .expect("ok")
            .expect("found");
        assert_eq!(asked, 1);

        // A routing key nobody's: not a pair envelope, and storage is not read again for it
        // (made-up routing keys cost no I/O) until the partners change.
        let mut stranger = env.clone();
        stranger.routing_key = [9; 32];
        assert!(bobs
            .incoming(&bob, &stranger, || panic!("asked for a made-up key"))
            .expect("ok")
            .is_none());
        bobs.partners_changed();
        let mut asked_again = false;
        assert!(bobs
            .incoming(&bob, &stranger, || {
                asked_again = true;
                Ok(vec![alice.public()])
            })
            .expect("ok")
            .is_none());
        assert!(
            asked_again,
            "a change makes the next unknown key read the partners"
        );
        // The first-contact mailbox: never asked.
        stranger.routing_key = addressing::first_contact_mailbox(&bob.public());
        assert!(bobs
            .incoming(&bob, &stranger, || panic!("asked"))
            .expect("ok")
            .is_none());
        // Another epoch's timestamp: the routing key is not that epoch's mailbox.
        let mut later = env;
        later.timestamp += 86_400;
        assert!(bobs
            .incoming(&bob, &later, || Ok(vec![alice.public()]))
            .expect("ok")
            .is_none());
    }

    #[test]
    fn a_new_partner_is_picked_up_and_old_epochs_are_dropped() {
        let (alice, bob) = (id(1), id(2));
        let bobs = PairKeys::default();
        let keys = PairKeys::default();
        // Bob first knows nobody; then Alice becomes a partner.
        let epoch = addressing::epoch(NOW);
        let out = keys.outgoing(&alice, &bob.public(), epoch);
        let env = seal_pair(
            &out.key,
            out.routing_key,
            NOW,
            DEFAULT_TTL_SECS,
            b"x",
            &mut OsRng,
        )
        .expect("seals");
        assert!(bobs
            .incoming(&bob, &env, || Ok(vec![]))
            .expect("ok")
            .is_none());
        bobs.partners_changed();
        assert!(bobs
            .incoming(&bob, &env, || Ok(vec![alice.public()]))
            .expect("ok")
            .is_some());
        // Many epochs: the index keeps at most EPOCHS_MAX.
        for e in 0..(EPOCHS_MAX as u64 + 5) {
            let mut env = env.clone();
            env.timestamp = NOW + e * 86_400;
            let _ = bobs.incoming(&bob, &env, || Ok(vec![alice.public()]));
        }
        assert_eq!(bobs.lock().incoming.len(), EPOCHS_MAX);
    }
}
