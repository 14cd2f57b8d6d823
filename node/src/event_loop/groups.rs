//! The group-channel part of the event loop: the gossipsub behaviour's configuration and peer
//! scoring, the commands that subscribe, publish and report validation results, and the routing
//! of received group messages to the group service (`crate::groups`). See
//! `docs/architecture.md`, "Groups".
//!
//! Gossipsub runs anonymous (no author peer ID, no sequence number, no libp2p signature: the
//! author signs inside the encryption, see `docs/protocol.md`, "Groups"), with message ids
//! derived from the content, manual validation (a message is forwarded only after the group
//! service accepted it) and peer scoring on ([`peer_score_params`], [`topic_score_params`]).
//!
//! ```text
//! gossipsub Message ──► too large? ──► Reject here (score P4, strike)
//!                  └──► GossipInbound ─mpsc(bounded)─► group service ─► ReportValidation
//!                       (channel full: Ignore, no penalty)            Accept: forward
//!                                                                     Reject: P4 + strike
//! Publish ──► NoPeersSubscribedToTopic / InsufficientPeers / AllQueuesFull
//!        └──► kept (bounded, 10 min) and published once a peer subscribes to the topic
//! ```

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use libp2p::{
    gossipsub::{self, MessageAcceptance, TopicHash},
    PeerId,
};
use tokio::sync::{mpsc, oneshot};

use super::EventLoop;
use crate::{behaviour::GossipBehaviour, config::NodeConfig, error::NodeError};

/// The largest group envelope a member accepts (the largest sealed envelope).
pub(crate) const MAX_GROUP_MESSAGE_BYTES: usize = meshchat_protocol::envelope::MAX_ENVELOPE_BYTES;
/// Largest gossipsub frame: the largest envelope and room for framing. Messages between
/// [`MAX_GROUP_MESSAGE_BYTES`] and this are seen by the validator and rejected with a penalty;
/// larger frames are refused by gossipsub's codec before they are decoded.
pub(crate) const MAX_GOSSIP_BYTES: usize = MAX_GROUP_MESSAGE_BYTES + 4096;
/// Topics a node may be subscribed to (and track per remote peer): far above gossipsub's
/// default of 100, so that a user can be in many groups.
pub(crate) const MAX_TOPICS: usize = 4_096;
/// Capacity of the channel of received group messages to the group service; when it is full,
/// new messages are ignored (not forwarded, no penalty) and members catch up from the mailbox.
pub(crate) const GOSSIP_INBOUND_CAPACITY: usize = 256;
/// Messages kept per topic while no peer is subscribed to it.
const MAX_PENDING_PER_TOPIC: usize = 64;
/// Messages kept in total while no peer is subscribed to their topic.
const MAX_PENDING_TOTAL: usize = 1_024;
/// How long an unpublished message is kept for a peer to subscribe (it is in the group
/// mailbox anyway).
const PENDING_TTL: Duration = Duration::from_secs(600);

/// Weight of a group topic in the peer score.
pub(crate) const TOPIC_WEIGHT: f64 = 1.0;
/// P4: weight of the (squared, decaying) count of invalid messages in a group topic. With the
/// strike it also brings ([`STRIKE_SCORE`]), one invalid message costs 30 points: below the
/// gossip threshold (-10); a second one (4 × -20 - 20 = -100) passes the graylist threshold.
pub(crate) const INVALID_MESSAGE_WEIGHT: f64 = -20.0;
/// The invalid-message counter decays to nothing over this long.
pub(crate) const INVALID_MESSAGE_DECAY: Duration = Duration::from_secs(600);
/// P5: the application score of a peer is this much per strike against it (strikes come from
/// every protocol; a group message the group service rejects is one).
pub(crate) const STRIKE_SCORE: f64 = -10.0;

/// The peer score parameters (gossipsub v1.1 scoring) with meshchat's values:
/// - topic score cap 10 (what good behaviour in topics can add);
/// - P5 application score: [`STRIKE_SCORE`] per strike, weight 1 (a replay past gossipsub's
///   own delivery record, which P4 does not see, still costs score);
/// - P6 IP colocation: weight -5 above 10 peers per IP, loopback addresses whitelisted (local
///   meshes, tests and simulations run many nodes on 127.0.0.1);
/// - P7 behaviour penalty (re-grafting too early, broken IHAVE promises): weight -10 above a
///   threshold of 6, decaying over 10 minutes;
/// - counters decay once a second to zero below 0.1; scores of disconnected peers are kept for
///   an hour (reconnecting does not wash a penalty away).
pub(crate) fn peer_score_params() -> gossipsub::PeerScoreParams {
    let mut params = gossipsub::PeerScoreParams {
        topic_score_cap: 10.0,
        app_specific_weight: 1.0,
        ip_colocation_factor_weight: -5.0,
        ip_colocation_factor_threshold: 10.0,
        behaviour_penalty_weight: -10.0,
        behaviour_penalty_threshold: 6.0,
        behaviour_penalty_decay: gossipsub::score_parameter_decay(Duration::from_secs(600)),
        decay_interval: Duration::from_secs(1),
        decay_to_zero: 0.1,
        retain_score: Duration::from_secs(3600),
        ..gossipsub::PeerScoreParams::default()
    };
    params.ip_colocation_factor_whitelist.extend([
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]);
    params
}

/// The score thresholds: below -10 no gossip is exchanged with a peer, below -50 we do not
/// publish to it, below -80 everything it sends is ignored (graylist). Peer exchange is not
/// used (accept threshold 100 is out of reach with a topic cap of 10).
pub(crate) fn peer_score_thresholds() -> gossipsub::PeerScoreThresholds {
    gossipsub::PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 100.0,
        opportunistic_graft_threshold: 1.0,
    }
}

/// The parameters of every group topic:
/// - P1 time in mesh: +0.01 per second, capped at +3 (after 5 minutes);
/// - P2 first deliveries: +1 per message first delivered, capped at 20, decaying over a minute;
/// - P3/P3b mesh delivery deficits: off (group chats are quiet for hours; a quiet peer is not a
///   bad one);
/// - P4 invalid messages: [`INVALID_MESSAGE_WEIGHT`] × count², the count decaying over
///   [`INVALID_MESSAGE_DECAY`]. A message fails when it does not decode, is larger than an
///   envelope, is expired, a replay, forged or tampered with (see `crate::groups`).
pub(crate) fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: TOPIC_WEIGHT,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 300.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: gossipsub::score_parameter_decay(Duration::from_secs(60)),
        first_message_deliveries_cap: 20.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: INVALID_MESSAGE_WEIGHT,
        invalid_message_deliveries_decay: gossipsub::score_parameter_decay(INVALID_MESSAGE_DECAY),
        ..gossipsub::TopicScoreParams::default()
    }
}

/// The gossipsub behaviour with meshchat's stated parameters (see the module doc).
pub(crate) fn gossipsub_behaviour(config: &NodeConfig) -> Result<GossipBehaviour, NodeError> {
    let err = |e: &dyn std::fmt::Display| NodeError::Transport {
        reason: format!("gossipsub: {e}"),
    };
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| {
            use sha2::{Digest, Sha256};
            gossipsub::MessageId::from(Sha256::digest(&m.data).to_vec())
        })
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .heartbeat_interval(config.groups.heartbeat_interval)
        .duplicate_cache_time(config.groups.duplicate_cache_time)
        // Publish to every subscribed peer, not only the mesh: small groups deliver at once.
        .flood_publish(true)
        .build()
        .map_err(|e| err(&e))?;
    let filter = gossipsub::MaxCountSubscriptionFilter {
        filter: gossipsub::AllowAllSubscriptionFilter {},
        max_subscribed_topics: MAX_TOPICS,
        max_subscriptions_per_request: MAX_TOPICS,
    };
    let mut behaviour = gossipsub::Behaviour::new_with_subscription_filter(
        gossipsub::MessageAuthenticity::Anonymous,
        gossip_config,
        filter,
    )
    .map_err(|e| err(&e))?;
    behaviour
        .with_peer_score(peer_score_params(), peer_score_thresholds())
        .map_err(|e| err(&e))?;
    Ok(behaviour)
}

/// A group message received over gossipsub, for the group service to validate.
#[derive(Debug)]
pub(crate) struct GossipInbound {
    /// The peer that forwarded it (not necessarily the author: gossipsub runs anonymous).
    pub(crate) source: PeerId,
    /// Gossipsub's id of the message (SHA-256 of the data), for the validation report.
    pub(crate) id: gossipsub::MessageId,
    /// The topic it came on.
    pub(crate) topic: TopicHash,
    /// The bytes: a wire-encoded envelope, unchecked.
    pub(crate) data: Vec<u8>,
}

/// How a publish went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PublishOutcome {
    /// Sent to this many subscribed peers.
    Sent {
        /// Peers known to be subscribed to the topic when it was sent.
        peers: usize,
    },
    /// No subscribed peer is known yet: kept, and published once one subscribes.
    Queued,
    /// Refused (too large, not subscribed): will not be sent.
    Failed(String),
}

/// What a peer's standing is (for tests and diagnostics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PeerStanding {
    /// Its gossipsub score, if scoring knows it.
    pub(crate) score: Option<f64>,
    /// Strikes against it (all protocols).
    pub(crate) strikes: u32,
    /// Whether it is blocked right now.
    pub(crate) banned: bool,
}

/// Group commands for the event loop (wrapped in `Command::Group`).
#[derive(Debug)]
pub(crate) enum GroupCommand {
    Subscribe {
        topic: String,
        reply: oneshot::Sender<Result<bool, String>>,
    },
    Unsubscribe {
        topic: String,
        reply: oneshot::Sender<bool>,
    },
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<PublishOutcome>,
    },
    ReportValidation {
        id: gossipsub::MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
        reason: &'static str,
    },
    TopicPeers {
        topic: String,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Standing {
        peer: PeerId,
        reply: oneshot::Sender<PeerStanding>,
    },
}

impl super::NetClient {
    async fn group_call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> GroupCommand,
    ) -> Result<T, super::LoopStopped> {
        self.call(|reply| super::Command::Group(make(reply))).await
    }

    /// Subscribe to a group topic (with its score parameters). `Ok(false)`: already subscribed.
    pub(crate) async fn group_subscribe(
        &self,
        topic: String,
    ) -> Result<Result<bool, String>, super::LoopStopped> {
        self.group_call(|reply| GroupCommand::Subscribe { topic, reply })
            .await
    }

    /// Leave a group topic. `false`: was not subscribed.
    pub(crate) async fn group_unsubscribe(
        &self,
        topic: String,
    ) -> Result<bool, super::LoopStopped> {
        self.group_call(|reply| GroupCommand::Unsubscribe { topic, reply })
            .await
    }

    /// Publish `data` (a wire envelope) on a group topic.
    pub(crate) async fn group_publish(
        &self,
        topic: String,
        data: Vec<u8>,
    ) -> Result<PublishOutcome, super::LoopStopped> {
        self.group_call(|reply| GroupCommand::Publish { topic, data, reply })
            .await
    }

    /// Report the group service's verdict on a received message: `Accept` forwards it,
    /// `Reject` penalises `source` (gossipsub P4, and a strike), `Ignore` drops it.
    pub(crate) async fn group_report(
        &self,
        id: gossipsub::MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
        reason: &'static str,
    ) -> Result<(), super::LoopStopped> {
        self.tx
            .send(super::Command::Group(GroupCommand::ReportValidation {
                id,
                source,
                acceptance,
                reason,
            }))
            .await
            .map_err(|_| super::LoopStopped)
    }

    /// [`Self::group_report`] from a blocking thread (the group service accepts a message as
    /// soon as it authenticated, before committing it).
    pub(crate) fn group_report_blocking(
        &self,
        id: gossipsub::MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
        reason: &'static str,
    ) -> Result<(), super::LoopStopped> {
        self.tx
            .blocking_send(super::Command::Group(GroupCommand::ReportValidation {
                id,
                source,
                acceptance,
                reason,
            }))
            .map_err(|_| super::LoopStopped)
    }

    /// The peers known to be subscribed to `topic`.
    pub(crate) async fn group_topic_peers(
        &self,
        topic: String,
    ) -> Result<Vec<PeerId>, super::LoopStopped> {
        self.group_call(|reply| GroupCommand::TopicPeers { topic, reply })
            .await
    }

    /// A peer's gossipsub score and strikes.
    pub(crate) async fn peer_standing(
        &self,
        peer: PeerId,
    ) -> Result<PeerStanding, super::LoopStopped> {
        self.group_call(|reply| GroupCommand::Standing { peer, reply })
            .await
    }
}

/// The loop's group state (owned by the event loop).
#[derive(Debug)]
pub(crate) struct GroupNet {
    /// Received messages go to the group service.
    inbound: mpsc::Sender<GossipInbound>,
    /// Messages not yet published because no peer was subscribed to their topic.
    pending: HashMap<TopicHash, VecDeque<(Instant, Vec<u8>)>>,
    pending_total: usize,
}

impl GroupNet {
    /// The loop's group state and the receiver of group messages (for the group service).
    pub(crate) fn new() -> (Self, mpsc::Receiver<GossipInbound>) {
        let (inbound, rx) = mpsc::channel(GOSSIP_INBOUND_CAPACITY);
        (
            Self {
                inbound,
                pending: HashMap::new(),
                pending_total: 0,
            },
            rx,
        )
    }

    fn keep(&mut self, topic: TopicHash, data: Vec<u8>) {
        self.expire(Instant::now());
        if self.pending_total >= MAX_PENDING_TOTAL {
            // Drop the oldest message of some topic; the group mailbox holds it anyway.
            if let Some(q) = self.pending.values_mut().find(|q| !q.is_empty()) {
                q.pop_front();
                self.pending_total = self.pending_total.saturating_sub(1);
            }
        }
        let queue = self.pending.entry(topic).or_default();
        if queue.len() >= MAX_PENDING_PER_TOPIC {
            queue.pop_front();
            self.pending_total = self.pending_total.saturating_sub(1);
        }
        queue.push_back((Instant::now(), data));
        self.pending_total += 1;
    }

    fn expire(&mut self, now: Instant) {
        let mut total = 0;
        self.pending.retain(|_, q| {
            while q
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > PENDING_TTL)
            {
                q.pop_front();
            }
            total += q.len();
            !q.is_empty()
        });
        self.pending_total = total;
    }
}

impl EventLoop {
    pub(super) fn on_gossipsub(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                if message.data.len() > MAX_GROUP_MESSAGE_BYTES {
                    tracing::debug!(peer = %propagation_source, len = message.data.len(), "oversized group message");
                    self.group_verdict(
                        &message_id,
                        propagation_source,
                        MessageAcceptance::Reject,
                        "oversized group message",
                    );
                    return;
                }
                let item = GossipInbound {
                    source: propagation_source,
                    id: message_id,
                    topic: message.topic,
                    data: message.data,
                };
                if let Err(e) = self.groups.inbound.try_send(item) {
                    let item = match e {
                        mpsc::error::TrySendError::Full(i)
                        | mpsc::error::TrySendError::Closed(i) => i,
                    };
                    tracing::debug!("group service busy: ignoring a group message");
                    self.group_verdict(&item.id, item.source, MessageAcceptance::Ignore, "busy");
                }
            }
            gossipsub::Event::Subscribed { peer_id, topic, .. } => {
                tracing::debug!(peer = %peer_id, %topic, "peer subscribed to a group topic");
                self.publish_pending(&topic);
            }
            gossipsub::Event::Unsubscribed { peer_id, topic } => {
                tracing::debug!(peer = %peer_id, %topic, "peer unsubscribed from a group topic");
            }
            other => tracing::trace!(?other, "gossipsub event"),
        }
    }

    fn group_verdict(
        &mut self,
        id: &gossipsub::MessageId,
        source: PeerId,
        acceptance: MessageAcceptance,
        reason: &'static str,
    ) {
        let reject = matches!(acceptance, MessageAcceptance::Reject);
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(id, &source, acceptance);
        if reject {
            self.strike(source, reason);
            // A peer at the limit was blocked and its count reset: it keeps the full penalty.
            let strikes = self
                .strikes
                .get(&source)
                .copied()
                .unwrap_or(self.limits.max_strikes);
            self.swarm
                .behaviour_mut()
                .gossipsub
                .set_application_score(&source, STRIKE_SCORE * f64::from(strikes));
        }
    }

    /// Publish what was kept for `topic`, oldest first, now that a peer subscribed.
    fn publish_pending(&mut self, topic: &TopicHash) {
        let Some(mut queue) = self.groups.pending.remove(topic) else {
            return;
        };
        self.groups.pending_total = self.groups.pending_total.saturating_sub(queue.len());
        let now = Instant::now();
        while let Some((at, data)) = queue.pop_front() {
            if now.duration_since(at) > PENDING_TTL {
                continue;
            }
            match self
                .swarm
                .behaviour_mut()
                .gossipsub
                .publish(topic.clone(), data.clone())
            {
                Ok(_) | Err(gossipsub::PublishError::Duplicate) => {
                    tracing::debug!(%topic, "published a kept group message");
                }
                Err(
                    gossipsub::PublishError::NoPeersSubscribedToTopic
                    | gossipsub::PublishError::AllQueuesFull(_),
                ) => {
                    // Still nobody to send to (e.g. the subscriber's score is too low): keep
                    // the rest for the next subscription.
                    queue.push_front((at, data));
                    self.groups.pending_total += queue.len();
                    self.groups.pending.insert(topic.clone(), queue);
                    return;
                }
                Err(e) => tracing::debug!(%topic, error = %e, "dropping a kept group message"),
            }
        }
    }

    fn subscribed_peers(&self, topic: &TopicHash) -> Vec<PeerId> {
        self.swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .filter(|(_, topics)| topics.contains(&topic))
            .map(|(p, _)| *p)
            .collect()
    }

    pub(super) fn on_group_command(&mut self, command: GroupCommand) {
        match command {
            GroupCommand::Subscribe { topic, reply } => {
                let topic = gossipsub::IdentTopic::new(topic);
                let gossip = &mut self.swarm.behaviour_mut().gossipsub;
                let result = gossip.subscribe(&topic).map_err(|e| e.to_string());
                if result.is_ok() {
                    if let Err(e) = gossip.set_topic_params(topic, topic_score_params()) {
                        tracing::warn!(error = e, "cannot set group topic score parameters");
                    }
                }
                let _ = reply.send(result);
            }
            GroupCommand::Unsubscribe { topic, reply } => {
                let topic = gossipsub::IdentTopic::new(topic);
                let hash = topic.hash();
                if let Some(q) = self.groups.pending.remove(&hash) {
                    self.groups.pending_total = self.groups.pending_total.saturating_sub(q.len());
                }
                let was = self.swarm.behaviour_mut().gossipsub.unsubscribe(&topic);
                let _ = reply.send(was);
            }
            GroupCommand::Publish { topic, data, reply } => {
                let hash = gossipsub::IdentTopic::new(topic).hash();
                let peers = self.subscribed_peers(&hash).len();
                let outcome = match self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(hash.clone(), data.clone())
                {
                    Ok(_) => PublishOutcome::Sent { peers },
                    Err(gossipsub::PublishError::Duplicate) => PublishOutcome::Sent { peers: 0 },
                    Err(
                        gossipsub::PublishError::NoPeersSubscribedToTopic
                        | gossipsub::PublishError::AllQueuesFull(_),
                    ) => {
                        self.groups.keep(hash, data);
                        PublishOutcome::Queued
                    }
                    Err(e) => PublishOutcome::Failed(e.to_string()),
                };
                let _ = reply.send(outcome);
            }
            GroupCommand::ReportValidation {
                id,
                source,
                acceptance,
                reason,
            } => self.group_verdict(&id, source, acceptance, reason),
            GroupCommand::TopicPeers { topic, reply } => {
                let hash = gossipsub::IdentTopic::new(topic).hash();
                let _ = reply.send(self.subscribed_peers(&hash));
            }
            GroupCommand::Standing { peer, reply } => {
                let score = self.swarm.behaviour().gossipsub.peer_score(&peer);
                let strikes = self.strikes.get(&peer).copied().unwrap_or(0);
                let banned = self.bans.iter().any(|(_, p)| *p == peer);
                let _ = reply.send(PeerStanding {
                    score,
                    strikes,
                    banned,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stated_score_parameters_are_valid() {
        peer_score_params()
            .validate()
            .expect("peer score parameters");
        peer_score_thresholds()
            .validate()
            .expect("peer score thresholds");
        topic_score_params().validate().expect("topic parameters");
        // Loopback meshes (tests, simulations, one machine) are not punished for colocation.
        assert!(peer_score_params()
            .ip_colocation_factor_whitelist
            .contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }

    #[test]
    fn one_invalid_message_stops_gossip_and_two_graylist() {
        let t = peer_score_thresholds();
        let one = INVALID_MESSAGE_WEIGHT * TOPIC_WEIGHT + STRIKE_SCORE;
        let two = 4.0 * INVALID_MESSAGE_WEIGHT * TOPIC_WEIGHT + 2.0 * STRIKE_SCORE;
        assert!(one < t.gossip_threshold && one > t.graylist_threshold);
        assert!(two < t.graylist_threshold);
    }

    #[test]
    fn kept_messages_are_bounded_per_topic_and_in_all() {
        let (mut net, _rx) = GroupNet::new();
        for i in 0..(MAX_PENDING_PER_TOPIC + 10) {
            net.keep(TopicHash::from_raw("a"), vec![i as u8]);
        }
        assert_eq!(net.pending_total, MAX_PENDING_PER_TOPIC);
        for t in 0..(MAX_PENDING_TOTAL / MAX_PENDING_PER_TOPIC + 2) {
            for _ in 0..MAX_PENDING_PER_TOPIC {
                net.keep(TopicHash::from_raw(format!("t{t}")), vec![0]);
            }
        }
        assert!(net.pending_total <= MAX_PENDING_TOTAL);
        let counted: usize = net.pending.values().map(VecDeque::len).sum();
        assert_eq!(counted, net.pending_total);
    }
}
