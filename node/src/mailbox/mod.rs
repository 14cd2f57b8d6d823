//! Offline delivery, `/meshchat/mailbox/1.0.0`: mailboxes placed by Kademlia on the peers closest
//! to the mailbox id, stored and forwarded by them. See `docs/protocol.md`, section "Mailboxes".

pub(crate) mod service;
pub mod store;

use std::time::Duration;

use libp2p::StreamProtocol;

pub use store::{RateLimiter, ReplicaError, ReplicaLimits, ReplicaStore, StoreOutcome};

/// The protocol id of the mailbox protocol.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/meshchat/mailbox/1.0.0");

/// Placement, collection and repair settings, with their defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Replicas a sender stores each envelope on: the `r` closest peers to the mailbox id.
    /// Default 5.
    pub replicas: usize,
    /// Acknowledgements after which `send` reports "stored on N replicas". Default 3 (a
    /// majority of 5); when fewer peers exist than that, all of those found must acknowledge.
    pub quorum: usize,
    /// How often the recipient collects from all its mailboxes even without a reason. Default
    /// 60 s.
    pub collect_interval: Duration,
    /// How often a replica checks that the closest peers of each mailbox it holds have a copy,
    /// and sweeps expired envelopes. Default 60 s.
    pub repair_interval: Duration,
    /// Act as a replica for others (STORE, FETCH, DELETE, REPLICATE). Default true.
    pub serve: bool,
    /// The replica store's quotas, disk budget and rate limits.
    pub limits: ReplicaLimits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            replicas: 5,
            quorum: 3,
            collect_interval: Duration::from_secs(60),
            repair_interval: Duration::from_secs(60),
            serve: true,
            limits: ReplicaLimits::default(),
        }
    }
}
