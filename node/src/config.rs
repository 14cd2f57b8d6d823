//! Node configuration: where the home is, what to listen on, whom to bootstrap from, and the
//! limits that keep one hostile peer from exhausting the node (see `docs/architecture.md`,
//! "Configuration" and "Abuse limits").
//!
//! Every limit has a stated default here; [`NodeConfig::new`] gives a node that listens on all
//! interfaces over TCP and QUIC with those defaults.

use std::{path::PathBuf, time::Duration};

use libp2p::Multiaddr;

/// How a node is run and what it may spend.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeConfig {
    /// The home directory (`--home`): RocksDB lives in `home/db`, the control socket at
    /// `home/control.sock`.
    pub home: PathBuf,
    /// Addresses to listen on. Default: `/ip4/0.0.0.0/tcp/0` and `/ip4/0.0.0.0/udp/0/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers (full multiaddrs ending in `/p2p/PEER_ID`). Addresses remembered in the
    /// home's config are dialled too.
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses this node is known to be reachable at (`serve --external`); they are confirmed
    /// as external addresses at start.
    pub external: Vec<Multiaddr>,
    /// LAN-only operation: no bootstrap needed, Kademlia forced into server mode, no relays.
    pub lan_only: bool,
    /// A home server (`meshchat serve`): always-on DHT server, relay server with
    /// [`NodeConfig::relay`]'s limits, AutoNAT server. Without [`NodeConfig::external`] it
    /// takes its publicly routable listen addresses as external (and, when `lan_only`, its
    /// LAN ones).
    pub home_server: bool,
    /// Force Kademlia server mode even without a confirmed external address (tests on
    /// loopback, private networks). Implied by `lan_only` and `home_server`.
    pub dht_server: bool,
    /// Discover peers on the local network by mDNS (LAN-only clusters). Default: off here;
    /// the CLI decides (see `docs/operations.md`).
    pub mdns: bool,
    /// How many relays a node that is not known to be publicly reachable keeps a reservation
    /// on (circuit relay v2), so that peers can reach it through them. Default
    /// [`DEFAULT_RELAY_RESERVATIONS`]; 0 never reserves. Home servers and LAN-only nodes never
    /// reserve.
    pub relay_reservations: usize,
    /// The relay server's limits (only used by home servers, [`NodeConfig::home_server`]).
    pub relay: RelayLimits,
    /// Serve the control socket (`home/control.sock`) for the CLI.
    pub serve_control: bool,
    /// How long `send_text` tries to reach the recipient directly before it reports the message
    /// as queued in the outbox.
    pub send_timeout: Duration,
    /// How long a message (or a group control: an invite, a sender key) that could be neither
    /// delivered nor stored in a mailbox waits before the outbox tries it again; the wait
    /// doubles after each failure, up to 10 minutes. A peer that shows it is online (a message
    /// from it, a group member asking for its sender key) is tried at once. Default 2 s.
    pub first_retry: Duration,
    /// Connection and record limits.
    pub limits: Limits,
    /// Offline delivery: replicas per envelope, quorum, collection and repair intervals, and
    /// the replica store's quotas (see [`crate::mailbox::Config`]).
    pub mailbox: crate::mailbox::Config,
    /// Group channels: gossipsub duplicate window, heartbeat, mailbox collection (see
    /// [`crate::groups::Config`]).
    pub groups: crate::groups::Config,
}

impl NodeConfig {
    /// The default configuration for a node whose home is `home`.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self {
            home: home.into(),
            listen: vec![
                "/ip4/0.0.0.0/tcp/0"
                    .parse()
                    .expect("invariant: constant multiaddr parses"),
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("invariant: constant multiaddr parses"),
            ],
            bootstrap: Vec::new(),
            external: Vec::new(),
            lan_only: false,
            home_server: false,
            dht_server: false,
            mdns: false,
            relay_reservations: DEFAULT_RELAY_RESERVATIONS,
            relay: RelayLimits::default(),
            serve_control: false,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            first_retry: DEFAULT_FIRST_RETRY,
            limits: Limits::default(),
            mailbox: crate::mailbox::Config::default(),
            groups: crate::groups::Config::default(),
        }
    }

    /// Whether Kademlia is forced into server mode (otherwise libp2p decides from confirmed
    /// external addresses).
    pub fn force_dht_server(&self) -> bool {
        self.dht_server || self.lan_only || self.home_server
    }

    /// Whether the node listens on the in-process memory transport alone (the simulations).
    /// Such a node does not test its reachability with AutoNAT: all it could test are the
    /// ephemeral `/memory/` ports it is observed at, a new candidate with every connection,
    /// which servers dial back in vain.
    pub fn listens_only_in_memory(&self) -> bool {
        use libp2p::multiaddr::Protocol;
        !self.listen.is_empty()
            && self
                .listen
                .iter()
                .all(|a| matches!(a.iter().next(), Some(Protocol::Memory(_))))
    }
}

/// Default for [`NodeConfig::send_timeout`].
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`NodeConfig::first_retry`].
pub const DEFAULT_FIRST_RETRY: Duration = Duration::from_secs(2);

/// Default for [`NodeConfig::relay_reservations`]: two relays, so that losing one leaves the
/// node reachable while it finds another.
pub const DEFAULT_RELAY_RESERVATIONS: usize = 2;

/// What a home server's relay (circuit relay v2) grants, with defaults raised for chat from
/// libp2p's (2 minutes and 128 KiB per circuit) but still bounded. On top of these, libp2p's
/// rate limits apply: per peer, 30 reservations and 30 circuits in a burst, then one every
/// 2 minutes; per IP address, 60 in a burst, then one a minute. See `docs/operations.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayLimits {
    /// Reservations held for all peers together. Default 128.
    pub max_reservations: usize,
    /// Reservations one peer may hold (at least 1). Default 2.
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before the peer must renew it (peers renew by themselves).
    /// Default 1 hour.
    pub reservation_duration: Duration,
    /// Circuits relayed at once, for all peers. Default 64.
    pub max_circuits: usize,
    /// Circuits one peer may have open (as either end) when it opens another (at least 1).
    /// Default 8.
    pub max_circuits_per_peer: usize,
    /// How long one circuit may last; the peers then reconnect (or have upgraded to a direct
    /// connection by hole punching). Default 30 minutes.
    pub max_circuit_duration: Duration,
    /// Bytes one circuit may carry, both directions together. Default 64 MiB.
    pub max_circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_reservations_per_peer: 2,
            reservation_duration: Duration::from_secs(60 * 60),
            max_circuits: 64,
            max_circuits_per_peer: 8,
            max_circuit_duration: Duration::from_secs(30 * 60),
            max_circuit_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Connection, memory and record-store limits, with their defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Incoming connections still in the handshake. Default 64.
    pub max_pending_incoming: u32,
    /// Outgoing connections still in the handshake. Default 64.
    pub max_pending_outgoing: u32,
    /// Established incoming connections. Default 256.
    pub max_established_incoming: u32,
    /// Established outgoing connections. Default 128.
    pub max_established_outgoing: u32,
    /// Established connections in total. Default 384.
    pub max_established: u32,
    /// Established connections to one peer. Default 4.
    pub max_established_per_peer: u32,
    /// Refuse new connections once the process uses this fraction of the machine's memory.
    /// Default 0.9.
    pub max_memory_fraction: f64,
    /// Close a connection that has had no open stream for this long. Default 60 s (libp2p's
    /// default of 10 s would drop contacts between messages).
    pub idle_connection_timeout: Duration,
    /// DHT records held for others. Default 4096.
    pub max_dht_records: usize,
    /// Largest DHT record value accepted. Default 16 KiB.
    pub max_dht_value_bytes: usize,
    /// Bad requests (undecodable, forged, expired envelopes; invalid records) a peer may send
    /// before it is disconnected and blocked for [`Limits::ban_duration`]. Default 8.
    pub max_strikes: u32,
    /// How long a peer that used up its strikes stays blocked. Default 10 minutes.
    pub ban_duration: Duration,
    /// Concurrent inbound/outbound direct-delivery streams per connection. Default 32.
    pub max_direct_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pending_incoming: 64,
            max_pending_outgoing: 64,
            max_established_incoming: 256,
            max_established_outgoing: 128,
            max_established: 384,
            max_established_per_peer: 4,
            max_memory_fraction: 0.9,
            idle_connection_timeout: Duration::from_secs(60),
            max_dht_records: 4096,
            max_dht_value_bytes: 16 * 1024,
            max_strikes: 8,
            ban_duration: Duration::from_secs(600),
            max_direct_streams: 32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_listen_on_tcp_and_quic_and_raise_the_idle_timeout() {
        let c = NodeConfig::new("/tmp/x");
        let listen: Vec<String> = c.listen.iter().map(ToString::to_string).collect();
        assert_eq!(listen, ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]);
        assert!(c.limits.idle_connection_timeout > Duration::from_secs(10));
        assert!(!c.force_dht_server());
        let lan = NodeConfig {
            lan_only: true,
            ..NodeConfig::new("/tmp/x")
        };
        assert!(lan.force_dht_server());
        assert!(!c.listens_only_in_memory());
        let sim = NodeConfig {
            listen: vec!["/memory/0".parse().expect("a memory multiaddr")],
            ..NodeConfig::new("/tmp/x")
        };
        assert!(sim.listens_only_in_memory());
        let nowhere = NodeConfig {
            listen: Vec::new(),
            ..NodeConfig::new("/tmp/x")
        };
        assert!(!nowhere.listens_only_in_memory());
    }

    #[test]
    fn relay_limits_are_raised_for_chat_but_bounded() {
        let l = RelayLimits::default();
        assert!(l.max_circuit_duration >= Duration::from_secs(30 * 60));
        assert!(l.max_circuit_bytes >= 64 * 1024 * 1024);
        assert!(l.max_circuit_duration <= Duration::from_secs(u64::from(u32::MAX)));
        assert!(l.max_reservations > 0 && l.max_reservations_per_peer > 0);
        assert!(l.max_circuits > 0 && l.max_circuits_per_peer > 0);
        assert_eq!(
            NodeConfig::new("/tmp/x").relay_reservations,
            DEFAULT_RELAY_RESERVATIONS
        );
    }
}
