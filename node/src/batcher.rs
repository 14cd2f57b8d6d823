//! Outgoing direct requests, batched per peer (`docs/protocol.md`, "Direct delivery").
//!
//! Every envelope for a libp2p peer joins that peer's queue. One request is in flight to a
//! peer, and a second only while [`SECOND_REQUEST_AT`] or more envelopes wait; each takes
//! along every queued envelope that fits one request ([`DirectRequest::fits`]), in queue
//! order. So a lone message leaves at once, alone (no waiting for company), and messages that
//! arrive while a request is in flight go out together in the next one: under load, one
//! stream, one frame and one sync at the recipient serve many messages, and with a full queue
//! the recipient opens the next batch while it syncs the previous one.
//!
//! ```text
//! send(peer, envelope) ─► queue[peer] ─► a free request slot? ─► spawn a drainer
//!        ▲                                                          │
//!        └───────── oneshot: that envelope's DirectResponse ◄───────┘ send_batch(≤ 64)
//! ```
//!
//! A drainer keeps its slot while the queue is non-empty, then gives it back. A caller that
//! stopped waiting (timeout) leaves its envelope behind; drainers skip such envelopes.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use libp2p::{Multiaddr, PeerId};
use meshchat_protocol::Envelope;
use tokio::sync::oneshot;

use crate::{
    direct::{DirectReply, DirectRequest, DirectResponse},
    event_loop::{LoopStopped, NetClient},
};

/// Direct requests in flight to one peer at once: the second only with a full queue
/// ([`SECOND_REQUEST_AT`]). Everything that queues up meanwhile goes in the next request, so
/// the batches are as large as the load makes them. Measured with 64 sends in flight
/// (`MESHCHAT_BENCH_PROFILE=5000`, `docs/performance.md`): always up to 2 or 4 requests made
/// the batches smaller and the throughput lower than 1; a second one only beside 32 waiting
/// envelopes gave 8,774-9,592 messages/s against 8,044-8,865 for 1. The cost: envelopes for a
/// peer wait behind its requests in flight (up to the request timeout if the peer stalls).
pub(crate) const REQUESTS_PER_PEER: usize = 2;

/// A second request goes out only while at least this many envelopes wait (a drainer that finds
/// fewer beside another request in flight leaves them to that one).
const SECOND_REQUEST_AT: usize = 32;

/// One envelope waiting for a request.
#[derive(Debug)]
struct Waiting {
    envelope: Envelope,
    addrs: Vec<Multiaddr>,
    reply: oneshot::Sender<Result<DirectResponse, String>>,
}

/// One peer's queue and the number of requests in flight to it.
#[derive(Debug, Default)]
struct PeerQueue {
    waiting: VecDeque<Waiting>,
    in_flight: usize,
}

/// The queues of all peers with envelopes waiting or requests in flight.
#[derive(Debug, Default)]
pub(crate) struct Batcher {
    queues: Mutex<HashMap<PeerId, PeerQueue>>,
}

impl Batcher {
    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, PeerQueue>> {
        // Plain queues, consistent after any panic.
        self.queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hand `envelope` to `peer` (dialling `addrs` if need be) in the next request that has room
    /// for it: the recipient's answer to it, or why the request failed.
    pub(crate) async fn send(
        self: &Arc<Self>,
        net: &NetClient,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        envelope: Envelope,
    ) -> Result<Result<DirectResponse, String>, LoopStopped> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queues = self.queues();
            let queue = queues.entry(peer).or_default();
            queue.waiting.push_back(Waiting {
                envelope,
                addrs,
                reply,
            });
            let start = queue.in_flight == 0
                || (queue.in_flight < REQUESTS_PER_PEER
                    && queue.waiting.len() >= SECOND_REQUEST_AT);
            if start {
                queue.in_flight += 1;
            }
            start
        };
        if start {
            tokio::spawn(Arc::clone(self).drain(net.clone(), peer));
        }
        // A drainer drops the reply only when the event loop stopped.
        answer.await.map_err(|_| LoopStopped)
    }

    /// One request slot of `peer`: send what is queued, batch after batch, until nothing is.
    async fn drain(self: Arc<Self>, net: NetClient, peer: PeerId) {
        loop {
            let batch = self.take(&peer);
            let Some(addrs) = batch.last().map(|w| w.addrs.clone()) else {
                return;
            };
            let count = batch.len();
            let (envelopes, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|w| (w.envelope, w.reply)).unzip();
            let answers: Vec<Result<DirectResponse, String>> =
                match net.send_batch(peer, addrs, envelopes).await {
                    Err(LoopStopped) => {
                        // Nothing will be sent any more: let every waiter know (by dropping its
                        // reply) and free the slot.
                        drop(replies);
                        self.abandon(&peer);
                        return;
                    }
                    Ok(Err(e)) => vec![Err(e); count],
                    Ok(Ok(DirectReply::Refused { reason })) => {
                        vec![Ok(DirectResponse::Rejected { reason }); count]
                    }
                    Ok(Ok(DirectReply::Each(each))) if each.len() == count => {
                        each.into_iter().map(Ok).collect()
                    }
                    Ok(Ok(DirectReply::Each(each))) => vec![
                        Err(format!(
                            "the recipient answered {} of {count} envelopes",
                            each.len()
                        ));
                        count
                    ],
                };
            for (reply, answer) in replies.into_iter().zip(answers) {
                // The caller may have stopped waiting.
                let _ = reply.send(answer);
            }
        }
    }

    /// The next batch for `peer`, in queue order; empty (and the slot given back) when nothing
    /// is waiting.
    fn take(&self, peer: &PeerId) -> Vec<Waiting> {
        let mut queues = self.queues();
        let Some(queue) = queues.get_mut(peer) else {
            return Vec::new();
        };
        let mut batch = Vec::new();
        let mut used = 0;
        let small = queue.in_flight > 1 && queue.waiting.len() < SECOND_REQUEST_AT;
        while let Some(next) = queue.waiting.front() {
            if small {
                // Another request is in flight: it takes these when it is answered.
                break;
            }
            if next.reply.is_closed() {
                // Its sender gave up waiting (and will retry or store it elsewhere).
                queue.waiting.pop_front();
                continue;
            }
            let cost = DirectRequest::cost(&next.envelope);
            if !batch.is_empty() && !DirectRequest::fits(batch.len(), used, cost) {
                break;
            }
            used += cost;
            batch.extend(queue.waiting.pop_front());
        }
        if batch.is_empty() {
            queue.in_flight = queue.in_flight.saturating_sub(1);
            if queue.in_flight == 0 && queue.waiting.is_empty() {
                queues.remove(peer);
            }
        }
        batch
    }

    /// The event loop stopped: drop `peer`'s waiting envelopes (their callers see
    /// [`LoopStopped`]) and give the slot back.
    fn abandon(&self, peer: &PeerId) {
        let mut queues = self.queues();
        if let Some(queue) = queues.get_mut(peer) {
            queue.waiting.clear();
            queue.in_flight = queue.in_flight.saturating_sub(1);
            if queue.in_flight == 0 {
                queues.remove(peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct::MAX_BATCH_ENVELOPES;
    use meshchat_protocol::envelope::MAX_ENVELOPE_BYTES;

    fn envelope(tag: u8, ciphertext_len: usize) -> Envelope {
        Envelope {
            routing_key: [tag; 32],
            timestamp: 1,
            ttl: 1,
            ephemeral: [0; 32],
            ciphertext: vec![0; ciphertext_len],
        }
    }

    /// Queue `envelopes` for `peer` as if their senders waited; the receivers keep them open.
    fn queue(
        batcher: &Batcher,
        peer: PeerId,
        envelopes: impl IntoIterator<Item = Envelope>,
    ) -> Vec<oneshot::Receiver<Result<DirectResponse, String>>> {
        let mut queues = batcher.queues();
        let queue = queues.entry(peer).or_default();
        queue.in_flight = 1;
        envelopes
            .into_iter()
            .map(|envelope| {
                let (reply, answer) = oneshot::channel();
                queue.waiting.push_back(Waiting {
                    envelope,
                    addrs: Vec::new(),
                    reply,
                });
                answer
            })
            .collect()
    }

    fn tags(batch: &[Waiting]) -> Vec<u8> {
        batch.iter().map(|w| w.envelope.routing_key[0]).collect()
    }

    #[test]
    fn batches_keep_queue_order_and_stop_at_the_count() {
        let batcher = Batcher::default();
        let peer = PeerId::random();
        let n = MAX_BATCH_ENVELOPES + 3;
        let _answers = queue(&batcher, peer, (0..n).map(|i| envelope(i as u8, 300)));
        let first = batcher.take(&peer);
        assert_eq!(
            tags(&first),
            (0..MAX_BATCH_ENVELOPES as u8).collect::<Vec<_>>()
        );
        let second = batcher.take(&peer);
        assert_eq!(
            tags(&second),
            (MAX_BATCH_ENVELOPES as u8..n as u8).collect::<Vec<_>>()
        );
        // Nothing left: the slot is given back and the peer forgotten.
        assert!(batcher.take(&peer).is_empty());
        assert!(batcher.queues().is_empty());
    }

    #[test]
    fn a_second_request_takes_only_a_full_queue() {
        let batcher = Batcher::default();
        let peer = PeerId::random();
        let _answers = queue(
            &batcher,
            peer,
            (0..SECOND_REQUEST_AT - 1).map(|i| envelope(i as u8, 300)),
        );
        // Two requests in flight, fewer envelopes waiting than a second one is for: this
        // drainer leaves them to the other request and gives its slot back.
        batcher.queues().get_mut(&peer).expect("queued").in_flight = 2;
        assert!(batcher.take(&peer).is_empty());
        assert_eq!(batcher.queues()[&peer].in_flight, 1);
        // The one left in flight takes them all.
        assert_eq!(batcher.take(&peer).len(), SECOND_REQUEST_AT - 1);
        // With a full queue, a second request takes its share at once.
        let _more = queue(
            &batcher,
            peer,
            (0..SECOND_REQUEST_AT).map(|i| envelope(i as u8, 300)),
        );
        batcher.queues().get_mut(&peer).expect("queued").in_flight = 2;
        assert_eq!(batcher.take(&peer).len(), SECOND_REQUEST_AT);
    }

    #[test]
    fn large_envelopes_split_batches_and_abandoned_ones_are_skipped() {
        let batcher = Batcher::default();
        let peer = PeerId::random();
        // The largest envelope: its wire form (version byte and 84 fixed bytes besides the
        // ciphertext) is exactly the envelope limit.
        let largest = MAX_ENVELOPE_BYTES - 85;
        let mut answers = queue(
            &batcher,
            peer,
            [
                envelope(1, 300),
                envelope(2, largest),
                envelope(3, largest),
                envelope(4, 300),
                envelope(5, 300),
            ],
        );
        // The sender of envelope 4 stopped waiting.
        drop(answers.remove(3));
        assert_eq!(tags(&batcher.take(&peer)), [1, 2]);
        assert_eq!(tags(&batcher.take(&peer)), [3, 5]);
        assert!(batcher.take(&peer).is_empty());
    }
}
