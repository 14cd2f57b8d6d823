//! Offline delivery, `/meshchat/mailbox/1.0.0`: mailboxes placed by Kademlia on the peers closest
//! to the mailbox id, stored and forwarded by them. See `docs/protocol.md`, section "Mailboxes".

pub(crate) mod service;
pub mod store;

use std::time::Duration;

use libp2p::StreamProtocol;

pub use store::{RateLimiter, ReplicaError, ReplicaLimits, ReplicaStore, StoreOutcome};

/// The protocol id of the mailbox protocol.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/meshchat/mailbox/1.0.0");

/// The share of a period by which each collection and repair round is moved, at random, earlier
/// or later: nodes started together (a home server's friends after a power cut, a simulation)
/// would otherwise run their rounds in step and load their replicas all at once.
pub const JITTER: f64 = 0.2;

/// `period` moved by a uniformly random share of at most ±[`JITTER`].
pub(crate) fn jittered(period: Duration) -> Duration {
    use rand::Rng;
    let factor = rand::thread_rng().gen_range((1.0 - JITTER)..=(1.0 + JITTER));
    period.mul_f64(factor)
}

/// The first bytes of a mailbox id, in hex, for the debug log.
pub(crate) fn short(mailbox: &[u8; 32]) -> String {
    hex::encode(&mailbox[..6])
}

/// When a round that comes every `interval` (± [`JITTER`]) next takes up something it found
/// quiet: `2^steps` intervals later, at most `longest` (and never less than one interval),
/// counted from the earliest such a round can come. The collection of an empty mailbox and
/// the repair of a mailbox that changed nothing back off this way.
pub(crate) fn quiet_wait(interval: Duration, steps: u32, longest: Duration) -> Duration {
    interval
        .saturating_mul(1 << steps)
        .min(longest.max(interval))
        .saturating_sub(interval.mul_f64(JITTER))
}

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
    /// 60 s; each wait is drawn from ±[`JITTER`] of it. A current mailbox found empty is then
    /// collected after 2, then 4 intervals (at most 300 s) until it holds mail again
    /// (`docs/protocol.md`, "Collection").
    pub collect_interval: Duration,
    /// How often a replica checks that the closest peers of each mailbox it holds have a copy,
    /// and sweeps expired envelopes. Default 60 s; each wait is drawn from ±[`JITTER`] of it.
    pub repair_interval: Duration,
    /// How long a replica pushes new mail to a recipient that subscribed to a mailbox (each
    /// collection renews the subscription; a mailbox found empty is collected at least every
    /// half of it). Default 600 s.
    pub subscription: Duration,
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
            subscription: Duration::from_secs(600),
            serve: true,
            limits: ReplicaLimits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_wait_doubles_up_to_its_cap_from_the_earliest_round() {
        let (minute, s) = (Duration::from_secs(60), Duration::from_secs);
        let early = minute.mul_f64(JITTER);
        assert_eq!(quiet_wait(minute, 0, s(300)), minute - early);
        assert_eq!(quiet_wait(minute, 2, s(300)), s(240) - early);
        assert_eq!(quiet_wait(minute, 3, s(300)), s(300) - early, "capped");
        assert_eq!(
            quiet_wait(minute, 2, s(10)),
            minute - early,
            "never under one"
        );
        assert_eq!(quiet_wait(minute, 2, Duration::MAX), s(240) - early);
    }

    #[test]
    fn jittered_periods_stay_within_the_stated_share_and_are_spread() {
        let period = Duration::from_secs(60);
        let waits: Vec<Duration> = (0..1000).map(|_| jittered(period)).collect();
        let (lo, hi) = (period.mul_f64(1.0 - JITTER), period.mul_f64(1.0 + JITTER));
        assert!(waits.iter().all(|w| *w >= lo && *w <= hi));
        // Spread over the window, not one value: both outer fifths are hit.
        let fifth = period.mul_f64(JITTER * 2.0 / 5.0);
        assert!(waits.iter().any(|w| *w < lo + fifth));
        assert!(waits.iter().any(|w| *w > hi - fifth));
    }
}
