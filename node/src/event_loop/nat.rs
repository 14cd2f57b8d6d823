//! The reachability part of the event loop: AutoNAT v2 (is this node publicly reachable?),
//! circuit relay v2 (client reservations everywhere, a relay server on home servers), DCUtR
//! hole punching, and mDNS discovery for LAN-only clusters. See `docs/architecture.md`,
//! "Reachability", and `docs/operations.md`.
//!
//! ```text
//!   identify: peer speaks the relay hop protocol ──► relay candidate (address we dialled it on,
//!                                                    then its listen addresses)
//!   tick (500 ms): not public, fewer reservations than wanted ──► listen_on(relay/p2p-circuit)
//!        reservation accepted ──► relayed listen address ──► dialable addresses ──► presence
//!        listener closed (relay gone, refused) ──► backoff for that relay (1 s … 5 min),
//!                                                   another candidate is tried meanwhile
//!   AutoNAT v2 result per tested address ──► verdict public / private / unknown
//!        public ──► release reservations; Kademlia server mode (unless forced anyway)
//!   DCUtR result ──► counters; a direct connection joins the relayed one
//!   mDNS discovered ──► dial; on LAN-only nodes also straight into Kademlia
//! ```
//!
//! Everything here runs inside the event loop and never blocks; all state is bounded.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use libp2p::{
    autonat,
    core::transport::ListenerId,
    dcutr, identify, kad, mdns,
    multiaddr::Protocol,
    relay,
    swarm::{
        dial_opts::{DialOpts, PeerCondition},
        SwarmEvent,
    },
    Multiaddr, PeerId,
};

use super::EventLoop;
use crate::{
    behaviour::BehaviourEvent,
    config::{NodeConfig, RelayLimits},
};

/// How often the reservation policy is re-evaluated.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// First wait before retrying a relay whose reservation failed or ended.
const RESERVE_BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest wait before retrying a relay.
const RESERVE_BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);
/// Relays remembered as candidates; the one with most failures is forgotten beyond this.
const MAX_RELAY_CANDIDATES: usize = 16;
/// Addresses remembered per relay candidate.
const MAX_RELAY_ADDRS: usize = 8;
/// AutoNAT results remembered (one per tested address).
const MAX_TESTED_ADDRS: usize = 32;
/// Peers taken from one mDNS event; a LAN that answers with more is truncated.
const MAX_MDNS_PEERS_PER_EVENT: usize = 64;

/// libp2p's relay server with meshchat's [`RelayLimits`] (from `config.relay`) and libp2p's
/// default rate limiters.
///
/// libp2p refuses a new reservation or circuit only when the peer already holds *more* than
/// its per-peer limit; the limits passed are one less, so that "per peer N" means N.
pub(crate) fn relay_server_config(config: &NodeConfig) -> relay::Config {
    let l: &RelayLimits = &config.relay;
    let secs_cap = Duration::from_secs(u64::from(u32::MAX));
    relay::Config {
        max_reservations: l.max_reservations,
        max_reservations_per_peer: l.max_reservations_per_peer.saturating_sub(1),
        reservation_duration: l.reservation_duration.min(secs_cap),
        max_circuits: l.max_circuits,
        max_circuits_per_peer: l.max_circuits_per_peer.saturating_sub(1),
        max_circuit_duration: l.max_circuit_duration.min(secs_cap),
        max_circuit_bytes: l.max_circuit_bytes,
        ..relay::Config::default()
    }
}

/// Whether this node is publicly reachable, as far as it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Reachability {
    /// No verdict yet (no AutoNAT server tested an address).
    #[default]
    Unknown,
    /// A publicly routable address was confirmed by AutoNAT (on a LAN-only node: any
    /// address), or this home server was given its public address.
    Public,
    /// Dial-back tests failed: behind a NAT or a firewall.
    Private,
}

impl Reachability {
    /// `public`, `private` or `unknown`, as `status` shows it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Public => "public",
            Self::Private => "private",
        }
    }
}

/// What a home server relays for others, as `status` shows it.
#[derive(Debug, Clone, Default)]
pub(crate) struct RelayServing {
    pub(crate) reservations: usize,
    pub(crate) circuits: usize,
    pub(crate) reservations_refused: u64,
    pub(crate) circuits_refused: u64,
}

/// The reachability part of the node status.
#[derive(Debug, Clone)]
pub(crate) struct NatStatus {
    pub(crate) reachability: Reachability,
    /// Accepted reservations: the relayed addresses this node is reachable at.
    pub(crate) reservations: Vec<Multiaddr>,
    pub(crate) hole_punches_succeeded: u64,
    pub(crate) hole_punches_failed: u64,
    /// `Some` on home servers.
    pub(crate) relay_server: Option<RelayServing>,
    pub(crate) lan_only: bool,
    pub(crate) mdns: bool,
}

/// A peer that offers the relay hop protocol.
#[derive(Debug, Default)]
struct RelayCandidate {
    addrs: Vec<Multiaddr>,
    /// Which address to try next (rotates on failure).
    next_addr: usize,
    failures: u32,
    retry_at: Option<Instant>,
}

/// One relay listener (a reservation, pending or accepted).
#[derive(Debug)]
struct Reservation {
    relay: PeerId,
    accepted: bool,
    /// The listen addresses the reservation gave (`…/p2p/RELAY/p2p-circuit/p2p/US`).
    addrs: Vec<Multiaddr>,
}

/// The loop's reachability state (owned by the event loop).
#[derive(Debug, Default)]
pub(crate) struct NatNet {
    home_server: bool,
    lan_only: bool,
    force_dht_server: bool,
    mdns: bool,
    external_configured: bool,
    want_reservations: usize,
    relays: HashMap<PeerId, RelayCandidate>,
    reservations: HashMap<ListenerId, Reservation>,
    /// The address we dialled each connected peer on (non-relayed connections).
    dialed: HashMap<PeerId, Multiaddr>,
    /// AutoNAT results: tested address → reachable.
    tested: HashMap<Multiaddr, bool>,
    reachability: Reachability,
    hole_punches_succeeded: u64,
    hole_punches_failed: u64,
    serving: RelayServing,
    /// Reservations held for each peer (home servers).
    served: HashMap<PeerId, usize>,
    next_check: Option<Instant>,
}

/// Whether `addr` goes through a relay.
pub(crate) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

/// Whether `addr` can be reached from the internet at large: not loopback, not a private,
/// shared (CGNAT), link-local, multicast or unspecified address. DNS names count as public.
pub(crate) fn is_public(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => is_public_v4(ip),
        Some(Protocol::Ip6(ip)) => is_public_v6(ip),
        Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) | Protocol::Dnsaddr(_)) => {
            true
        }
        _ => false,
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    let shared = o[0] == 100 && (o[1] & 0xc0) == 64;
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || shared
        || o[0] == 0)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let unique_local = (s[0] & 0xfe00) == 0xfc00;
    let link_local = (s[0] & 0xffc0) == 0xfe80;
    match ip.to_ipv4_mapped() {
        Some(v4) => is_public_v4(v4),
        None => {
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || unique_local
                || link_local)
        }
    }
}

fn is_loopback(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    }
}

/// `addr` without a trailing `/p2p/…`.
fn without_peer(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    RESERVE_BACKOFF_START
        .saturating_mul(1u32 << shift)
        .min(RESERVE_BACKOFF_MAX)
}

impl EventLoop {
    /// Take the node's settings; called once before the loop runs.
    pub(crate) fn nat_setup(&mut self, config: &NodeConfig) {
        let nat = &mut self.nat;
        nat.home_server = config.home_server;
        nat.lan_only = config.lan_only;
        nat.force_dht_server = config.force_dht_server();
        nat.mdns = config.mdns;
        nat.external_configured = !config.external.is_empty();
        nat.want_reservations = config.relay_reservations;
        self.nat_update_kad_mode();
    }

    /// The reachability part of `status`.
    pub(super) fn nat_status(&self) -> NatStatus {
        let local = *self.swarm.local_peer_id();
        let nat = &self.nat;
        let mut reservations: Vec<Multiaddr> = Vec::new();
        for r in nat.reservations.values().filter(|r| r.accepted) {
            if r.addrs.is_empty() {
                reservations.push(Multiaddr::empty().with(Protocol::P2p(r.relay)));
            }
            for a in &r.addrs {
                let a = if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
                    a.clone()
                } else {
                    a.clone().with(Protocol::P2p(local))
                };
                if !reservations.contains(&a) {
                    reservations.push(a);
                }
            }
        }
        reservations.sort();
        NatStatus {
            reachability: nat.reachability,
            reservations,
            hole_punches_succeeded: nat.hole_punches_succeeded,
            hole_punches_failed: nat.hole_punches_failed,
            relay_server: nat.home_server.then(|| RelayServing {
                reservations: nat.served.values().sum(),
                ..nat.serving.clone()
            }),
            lan_only: nat.lan_only,
            mdns: nat.mdns,
        }
    }

    /// Whether this node should hold relay reservations now.
    fn wants_relays(&self) -> bool {
        let nat = &self.nat;
        !nat.home_server
            && !nat.lan_only
            && nat.want_reservations > 0
            && nat.reachability != Reachability::Public
    }

    /// Called on every loop tick: keep the wanted number of reservations.
    pub(super) fn nat_tick(&mut self) {
        let now = Instant::now();
        if self.nat.next_check.is_some_and(|t| t > now) {
            return;
        }
        self.nat.next_check = Some(now + CHECK_INTERVAL);
        // External addresses added directly (`--external`) raise no swarm event.
        self.nat_recompute_reachability();
        if !self.wants_relays() {
            if !self.nat.reservations.is_empty() {
                let ids: Vec<ListenerId> =
                    self.nat.reservations.drain().map(|(id, _)| id).collect();
                tracing::info!("publicly reachable: releasing relay reservations");
                for id in ids {
                    self.swarm.remove_listener(id);
                }
            }
            return;
        }
        while self.nat.reservations.len() < self.nat.want_reservations {
            let in_use: Vec<PeerId> = self.nat.reservations.values().map(|r| r.relay).collect();
            let pick = self
                .nat
                .relays
                .iter()
                .filter(|(p, c)| {
                    !in_use.contains(p)
                        && !c.addrs.is_empty()
                        && c.retry_at.is_none_or(|t| t <= now)
                })
                .min_by_key(|(p, c)| (!self.swarm.is_connected(p), c.failures))
                .map(|(p, _)| *p);
            let Some(relay) = pick else { break };
            let Some(candidate) = self.nat.relays.get_mut(&relay) else {
                break;
            };
            let base = candidate.addrs[candidate.next_addr % candidate.addrs.len()].clone();
            let addr = base.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
            match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    tracing::debug!(%addr, "asking for a relay reservation");
                    self.nat.reservations.insert(
                        id,
                        Reservation {
                            relay,
                            accepted: false,
                            addrs: Vec::new(),
                        },
                    );
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "cannot listen through the relay");
                    self.relay_failed(relay, now);
                }
            }
        }
    }

    /// A reservation on `relay` failed or ended: back off from it, try its next address.
    fn relay_failed(&mut self, relay: PeerId, now: Instant) {
        if let Some(c) = self.nat.relays.get_mut(&relay) {
            c.failures = c.failures.saturating_add(1);
            c.next_addr = c.next_addr.wrapping_add(1);
            c.retry_at = Some(now + backoff(c.failures));
        }
    }

    /// Remember (or refresh) a relay candidate learned through identify.
    fn add_relay_candidate(&mut self, peer: PeerId, info: &identify::Info) {
        let mut addrs: Vec<Multiaddr> = Vec::new();
        if let Some(a) = self.nat.dialed.get(&peer) {
            addrs.push(a.clone());
        }
        let mut listed: Vec<Multiaddr> = info
            .listen_addrs
            .iter()
            .filter(|a| !is_relayed(a) && !super::is_unspecified(a))
            .map(without_peer)
            .collect();
        // Public addresses first, loopback last.
        listed.sort_by_key(|a| (!is_public(a), is_loopback(a)));
        for a in listed {
            if addrs.len() >= MAX_RELAY_ADDRS {
                break;
            }
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        if addrs.is_empty() {
            return;
        }
        if !self.nat.relays.contains_key(&peer) && self.nat.relays.len() >= MAX_RELAY_CANDIDATES {
            // Forget the worst candidate not in use.
            let in_use: Vec<PeerId> = self.nat.reservations.values().map(|r| r.relay).collect();
            let worst = self
                .nat
                .relays
                .iter()
                .filter(|(p, _)| !in_use.contains(p))
                .max_by_key(|(_, c)| c.failures)
                .map(|(p, _)| *p);
            match worst {
                Some(w) => {
                    self.nat.relays.remove(&w);
                }
                None => return,
            }
        }
        let c = self.nat.relays.entry(peer).or_default();
        if c.addrs != addrs {
            tracing::debug!(%peer, ?addrs, "relay candidate");
            c.addrs = addrs;
            c.next_addr = 0;
        }
    }

    /// Pin Kademlia's mode unless forced into server mode: server once publicly reachable,
    /// client otherwise (a relayed or LAN address confirmed is not enough to serve the DHT).
    fn nat_update_kad_mode(&mut self) {
        if self.nat.force_dht_server {
            return;
        }
        let mode = if self.nat.reachability == Reachability::Public {
            kad::Mode::Server
        } else {
            kad::Mode::Client
        };
        self.swarm.behaviour_mut().kad.set_mode(Some(mode));
    }

    fn nat_recompute_reachability(&mut self) {
        let nat = &self.nat;
        let confirmed = nat
            .tested
            .iter()
            .any(|(a, ok)| *ok && (nat.lan_only || is_public(a)));
        let failed = nat.tested.values().any(|ok| !ok);
        // A home server told its address (`--external`), or on a public one.
        let configured = nat.home_server
            && self.swarm.external_addresses().any(|a| {
                !is_relayed(a) && (nat.external_configured || nat.lan_only || is_public(a))
            });
        let verdict = if confirmed {
            Reachability::Public
        } else if failed {
            Reachability::Private
        } else if configured {
            Reachability::Public
        } else {
            Reachability::Unknown
        };
        if verdict != nat.reachability {
            tracing::info!("reachability: {}", verdict.as_str());
            self.nat.reachability = verdict;
            self.nat_update_kad_mode();
            // Act on it now rather than at the next check.
            self.nat.next_check = None;
        }
    }

    /// Sees every swarm event before the main dispatch (addresses, connections).
    pub(super) fn nat_observe(&mut self, event: &SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
                    self.add_relay_candidate(*peer_id, info);
                } else if self.nat.relays.contains_key(peer_id)
                    && !self.nat.reservations.values().any(|r| r.relay == *peer_id)
                {
                    // It stopped relaying.
                    self.nat.relays.remove(peer_id);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if let libp2p::core::ConnectedPoint::Dialer { address, .. } = endpoint {
                    if !endpoint.is_relayed() {
                        self.nat.dialed.insert(*peer_id, without_peer(address));
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.nat.dialed.remove(peer_id);
            }
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if let Some(r) = self.nat.reservations.get_mut(listener_id) {
                    if !r.addrs.contains(address) {
                        r.addrs.push(address.clone());
                    }
                    tracing::info!("reachable through a relay at {address}");
                } else if self.nat.home_server
                    && !self.nat.external_configured
                    && !is_relayed(address)
                    && (is_public(address) || (self.nat.lan_only && !is_loopback(address)))
                {
                    // A home server on a public address (a VPS): that is where friends reach it.
                    self.swarm.add_external_address(address.clone());
                }
            }
            SwarmEvent::ExpiredListenAddr {
                listener_id,
                address,
            } => {
                if let Some(r) = self.nat.reservations.get_mut(listener_id) {
                    r.addrs.retain(|a| a != address);
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(r) = self.nat.reservations.remove(listener_id) {
                    match reason {
                        Ok(()) if r.accepted => {
                            tracing::info!(relay = %r.relay, "relay reservation ended; looking for a relay")
                        }
                        Ok(()) => tracing::debug!(relay = %r.relay, "relay listener closed"),
                        Err(e) => {
                            tracing::info!(relay = %r.relay, error = %e, "relay reservation failed; trying again later or elsewhere")
                        }
                    }
                    if r.accepted {
                        // It worked until now: retry this relay soon, from a clean slate.
                        if let Some(c) = self.nat.relays.get_mut(&r.relay) {
                            c.failures = 0;
                        }
                    }
                    self.relay_failed(r.relay, Instant::now());
                    self.nat.next_check = None;
                }
            }
            SwarmEvent::ExternalAddrConfirmed { .. } | SwarmEvent::ExternalAddrExpired { .. } => {
                self.nat_recompute_reachability();
            }
            _ => {}
        }
    }

    pub(super) fn on_relay_client(&mut self, event: relay::client::Event) {
        match event {
            relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            } => {
                for r in self.nat.reservations.values_mut() {
                    if r.relay == relay_peer_id {
                        r.accepted = true;
                    }
                }
                if let Some(c) = self.nat.relays.get_mut(&relay_peer_id) {
                    c.failures = 0;
                    c.retry_at = None;
                }
                if renewal {
                    tracing::debug!(relay = %relay_peer_id, "relay reservation renewed");
                } else {
                    tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
                }
            }
            other => tracing::debug!(event = ?other, "relay client"),
        }
    }

    pub(super) fn on_relay_server(&mut self, event: relay::Event) {
        let s = &mut self.nat.serving;
        match event {
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                if !renewed {
                    *self.nat.served.entry(src_peer_id).or_insert(0) += 1;
                }
                tracing::debug!(peer = %src_peer_id, renewed, "relay: reservation accepted");
            }
            relay::Event::ReservationReqDenied {
                src_peer_id,
                status,
            } => {
                s.reservations_refused = s.reservations_refused.saturating_add(1);
                tracing::info!(peer = %src_peer_id, ?status, "relay: reservation refused");
            }
            relay::Event::ReservationClosed { src_peer_id }
            | relay::Event::ReservationTimedOut { src_peer_id } => {
                if let Some(n) = self.nat.served.get_mut(&src_peer_id) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.nat.served.remove(&src_peer_id);
                    }
                }
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                s.circuits = s.circuits.saturating_add(1);
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "relay: circuit opened");
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => {
                s.circuits_refused = s.circuits_refused.saturating_add(1);
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, ?status, "relay: circuit refused");
            }
            relay::Event::CircuitClosed {
                src_peer_id,
                dst_peer_id,
                error,
            } => {
                s.circuits = s.circuits.saturating_sub(1);
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, ?error, "relay: circuit closed");
            }
            other => tracing::debug!(event = ?other, "relay server"),
        }
    }

    pub(super) fn on_dcutr(&mut self, event: dcutr::Event) {
        let peer = event.remote_peer_id;
        match event.result {
            Ok(_) => {
                self.nat.hole_punches_succeeded = self.nat.hole_punches_succeeded.saturating_add(1);
                tracing::info!(%peer, "hole punching succeeded: direct connection");
            }
            Err(e) => {
                self.nat.hole_punches_failed = self.nat.hole_punches_failed.saturating_add(1);
                tracing::info!(%peer, error = %e, "hole punching failed: staying on the relay");
            }
        }
    }

    pub(super) fn on_autonat_client(&mut self, event: autonat::v2::client::Event) {
        let ok = event.result.is_ok();
        tracing::debug!(addr = %event.tested_addr, server = %event.server, ok, "AutoNAT result");
        // Candidates observed over relayed connections (`/p2p/…`, `…/p2p-circuit`) say nothing
        // about this node's own reachability: a dial-back through a relay succeeds for anyone.
        let direct_ip = matches!(
            event.tested_addr.iter().next(),
            Some(Protocol::Ip4(_) | Protocol::Ip6(_))
        );
        if !direct_ip || is_relayed(&event.tested_addr) {
            return;
        }
        if !self.nat.tested.contains_key(&event.tested_addr)
            && self.nat.tested.len() >= MAX_TESTED_ADDRS
        {
            // Make room: forget a failure first (a success decides the verdict).
            let victim = self
                .nat
                .tested
                .iter()
                .min_by_key(|(_, ok)| **ok)
                .map(|(a, _)| a.clone());
            if let Some(v) = victim {
                self.nat.tested.remove(&v);
            }
        }
        self.nat.tested.insert(event.tested_addr, ok);
        self.nat_recompute_reachability();
    }

    pub(super) fn on_autonat_server(&mut self, event: autonat::v2::server::Event) {
        tracing::debug!(?event, "AutoNAT server: tested a peer's address");
    }

    pub(super) fn on_mdns(&mut self, event: mdns::Event) {
        match event {
            mdns::Event::Discovered(list) => {
                let local = *self.swarm.local_peer_id();
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in list {
                    if peer == local {
                        continue;
                    }
                    if !by_peer.contains_key(&peer) && by_peer.len() >= MAX_MDNS_PEERS_PER_EVENT {
                        continue;
                    }
                    let addrs = by_peer.entry(peer).or_default();
                    if addrs.len() < MAX_RELAY_ADDRS && !addrs.contains(&addr) {
                        addrs.push(addr);
                    }
                }
                for (peer, addrs) in by_peer {
                    tracing::debug!(%peer, ?addrs, "found a peer on the local network");
                    if self.nat.lan_only {
                        // Every LAN-only node is a DHT server: no need to wait for identify.
                        for a in &addrs {
                            self.swarm
                                .behaviour_mut()
                                .kad
                                .add_address(&peer, without_peer(a));
                        }
                    }
                    if self.swarm.is_connected(&peer) {
                        continue;
                    }
                    let opts = DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "cannot dial a peer found by mDNS");
                    }
                }
            }
            mdns::Event::Expired(list) => {
                tracing::debug!(n = list.len(), "mDNS records expired");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    #[test]
    fn public_addresses_are_told_from_private_ones() {
        for p in [
            "/ip4/203.0.113.7/tcp/4001",
            "/ip4/8.8.8.8/udp/1/quic-v1",
            "/ip6/2001:db8::1/tcp/1",
            "/dns4/example.org/tcp/4001",
        ] {
            assert!(is_public(&a(p)), "{p}");
        }
        for p in [
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/10.1.2.3/tcp/1",
            "/ip4/192.168.1.2/tcp/1",
            "/ip4/172.16.0.1/tcp/1",
            "/ip4/100.64.0.1/tcp/1",
            "/ip4/169.254.1.1/tcp/1",
            "/ip4/0.0.0.0/tcp/1",
            "/ip6/::1/tcp/1",
            "/ip6/fd00::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
        ] {
            assert!(!is_public(&a(p)), "{p}");
        }
    }

    #[test]
    fn relayed_addresses_are_recognised_and_peers_stripped() {
        let relayed =
            a("/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWBQ58zWXNYqJ5jiHWi5KiE5DHZXBwMN6zdzYpqFL7vQYq/p2p-circuit");
        assert!(is_relayed(&relayed));
        assert!(!is_relayed(&a("/ip4/203.0.113.7/tcp/4001")));
        assert_eq!(
            without_peer(&a(
                "/ip4/1.2.3.4/tcp/1/p2p/12D3KooWBQ58zWXNYqJ5jiHWi5KiE5DHZXBwMN6zdzYpqFL7vQYq"
            )),
            a("/ip4/1.2.3.4/tcp/1")
        );
        // Only the trailing peer goes: the relay's stays.
        assert_eq!(without_peer(&relayed), relayed);
    }

    #[test]
    fn backoff_doubles_from_one_second_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(30), RESERVE_BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), RESERVE_BACKOFF_MAX);
    }

    #[test]
    fn per_peer_limits_mean_what_they_say() {
        let mut config = NodeConfig::new("/tmp/x");
        config.relay.max_circuits_per_peer = 1;
        config.relay.max_reservations_per_peer = 1;
        config.relay.max_circuit_bytes = 1234;
        let c = relay_server_config(&config);
        // libp2p refuses when the peer holds more than the value: 0 allows exactly one.
        assert_eq!(c.max_circuits_per_peer, 0);
        assert_eq!(c.max_reservations_per_peer, 0);
        assert_eq!(c.max_circuit_bytes, 1234);
        assert_eq!(c.max_circuit_duration, config.relay.max_circuit_duration);
    }
}
