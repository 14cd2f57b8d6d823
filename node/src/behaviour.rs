//! The composed libp2p [`NetworkBehaviour`] and the swarm that runs it: TCP and QUIC, noise,
//! yamux, DNS, circuit relay v2 (client always, server on home servers); block list, connection
//! and memory limits, identify, ping, Kademlia on the private protocol `/meshchat/kad/1.0.0`,
//! direct delivery, mailboxes, gossipsub for group channels, DCUtR hole punching, AutoNAT v2
//! and mDNS (when enabled). See `docs/architecture.md`, "Network".
//!
//! Order matters: the block list and the limits come first so that a refused connection is
//! refused before any other behaviour sets up state for it.

use std::num::NonZeroUsize;

use libp2p::{
    allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify,
    identity::Keypair,
    kad::{self, store::MemoryStore, store::MemoryStoreConfig},
    mdns, memory_connection_limits, noise, ping, relay, request_response,
    swarm::{behaviour::toggle::Toggle, NetworkBehaviour},
    tcp, yamux, StreamProtocol, Swarm,
};
use meshchat_protocol::{MailboxRequest, MailboxResponse};

use crate::{
    config::NodeConfig,
    direct::{self, DirectReply, DirectRequest},
    error::NodeError,
};

/// The Kademlia protocol id: a private DHT, separate from the public IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/meshchat/kad/1.0.0");
/// How long establishing a connection (transport, noise, yamux) may take.
pub(crate) const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(7);
/// The identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/meshchat/id/1.0.0";
/// How often Kademlia refreshes its whole routing table (a lookup of the node's own key, then
/// one of a random key in every bucket beyond its closest neighbour's: ~10 lookups of 20
/// peers). libp2p's default is every 5 minutes; in a quiet 400-node simulation those refreshes
/// were ~85 % of all Kademlia requests and, at about one new connection (a noise handshake)
/// per request, most of the CPU. The node's own lookups (mail collection, repair, records)
/// refresh the buckets they pass through, kad still bootstraps at once while its table holds
/// fewer than 20 peers, and a peer that stops answering is dropped when a lookup meets it.
pub(crate) const ROUTING_REFRESH: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// The direct-delivery behaviour.
pub(crate) type DirectBehaviour =
    request_response::Behaviour<direct::Codec<DirectRequest, DirectReply>>;

/// The mailbox behaviour (`/meshchat/mailbox/1.0.0`).
pub(crate) type MailboxBehaviour =
    request_response::Behaviour<direct::Codec<MailboxRequest, MailboxResponse>>;

/// The gossipsub behaviour: group channels, with a raised topic limit.
pub(crate) type GossipBehaviour = gossipsub::Behaviour<
    gossipsub::IdentityTransform,
    gossipsub::MaxCountSubscriptionFilter<gossipsub::AllowAllSubscriptionFilter>,
>;

/// Everything the node speaks.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) memory: memory_connection_limits::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) kad: kad::Behaviour<MemoryStore>,
    pub(crate) direct: DirectBehaviour,
    pub(crate) mailbox: MailboxBehaviour,
    /// Its streams do not keep a connection open, only its mesh does (`crate::keep_alive`).
    pub(crate) gossipsub: crate::keep_alive::Behaviour<GossipBehaviour>,
    pub(crate) relay_client: relay::client::Behaviour,
    /// Only on home servers (`meshchat serve`).
    pub(crate) relay_server: Toggle<relay::Behaviour>,
    pub(crate) dcutr: dcutr::Behaviour,
    /// Not on nodes that listen on the memory transport alone
    /// ([`NodeConfig::listens_only_in_memory`]).
    pub(crate) autonat_client: Toggle<autonat::v2::client::Behaviour>,
    /// Only on nodes that may be dialled back (home servers, DHT servers).
    pub(crate) autonat_server: Toggle<autonat::v2::server::Behaviour>,
    /// Only when enabled ([`NodeConfig::mdns`]).
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
}

impl Behaviour {
    fn new(
        key: &Keypair,
        relay_client: relay::client::Behaviour,
        config: &NodeConfig,
    ) -> Result<Self, NodeError> {
        let l = &config.limits;
        let peer_id = key.public().to_peer_id();
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_pending_incoming(Some(l.max_pending_incoming))
            .with_max_pending_outgoing(Some(l.max_pending_outgoing))
            .with_max_established_incoming(Some(l.max_established_incoming))
            .with_max_established_outgoing(Some(l.max_established_outgoing))
            .with_max_established(Some(l.max_established))
            .with_max_established_per_peer(Some(l.max_established_per_peer));

        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config
            .set_record_filtering(kad::StoreInserts::FilterBoth)
            .set_query_timeout(std::time::Duration::from_secs(20))
            // The node re-publishes its own records itself (crate::messaging), before they expire
            // and when its addresses change.
            .set_publication_interval(None)
            .set_periodic_bootstrap_interval(Some(ROUTING_REFRESH))
            .set_max_packet_size(l.max_dht_value_bytes + 4096);
        let store = MemoryStore::with_config(
            peer_id,
            MemoryStoreConfig {
                max_records: l.max_dht_records,
                max_value_bytes: l.max_dht_value_bytes,
                max_providers_per_key: 0,
                max_provided_keys: 0,
            },
        );
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
        if config.force_dht_server() {
            kad.set_mode(Some(kad::Mode::Server));
        }

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
                .with_agent_version(format!("meshchat/{}", env!("CARGO_PKG_VERSION")))
                .with_push_listen_addr_updates(true),
        );

        let direct = DirectBehaviour::new(
            [(direct::PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(std::time::Duration::from_secs(15))
                .with_max_concurrent_streams(l.max_direct_streams),
        );

        let mailbox = MailboxBehaviour::new(
            [(
                crate::mailbox::PROTOCOL,
                request_response::ProtocolSupport::Full,
            )],
            request_response::Config::default()
                .with_request_timeout(std::time::Duration::from_secs(15))
                .with_max_concurrent_streams(l.max_direct_streams),
        );

        let gossipsub =
            crate::keep_alive::Behaviour::new(crate::event_loop::gossipsub_behaviour(config)?);
        let relay_server = Toggle::from(config.home_server.then(|| {
            relay::Behaviour::new(peer_id, crate::event_loop::relay_server_config(config))
        }));
        let autonat_server = Toggle::from(
            config
                .force_dht_server()
                .then(autonat::v2::server::Behaviour::default),
        );
        let mdns = if config.mdns {
            let m = mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id).map_err(|e| {
                NodeError::Transport {
                    reason: format!("mDNS: {e}"),
                }
            })?;
            Toggle::from(Some(m))
        } else {
            Toggle::from(None)
        };

        Ok(Self {
            blocked: allow_block_list::Behaviour::default(),
            limits: connection_limits::Behaviour::new(limits),
            memory: memory_connection_limits::Behaviour::with_max_percentage(l.max_memory_fraction),
            identify,
            ping: ping::Behaviour::default(),
            kad,
            direct,
            mailbox,
            gossipsub,
            relay_client,
            relay_server,
            dcutr: dcutr::Behaviour::new(peer_id),
            autonat_client: Toggle::from(
                (!config.listens_only_in_memory()).then(autonat::v2::client::Behaviour::default),
            ),
            autonat_server,
            mdns,
        })
    }
}

/// The in-process memory transport (`/memory/N` addresses; noise and yamux as over TCP), only
/// for a node that listens on such an address: `simulations/` runs a thousand real nodes in one
/// process, more connections than its file descriptors allow over loopback TCP. Any other node
/// gets a transport that dials and listens on nothing.
fn memory_transport(
    key: &Keypair,
    config: &NodeConfig,
) -> Result<
    libp2p::core::transport::Boxed<(libp2p::PeerId, libp2p::core::muxing::StreamMuxerBox)>,
    noise::Error,
> {
    use libp2p::{
        core::{
            muxing::StreamMuxerBox,
            transport::{MemoryTransport, OptionalTransport},
            upgrade::Version,
        },
        multiaddr::Protocol,
        Transport,
    };
    let wanted = config
        .listen
        .iter()
        .any(|a| matches!(a.iter().next(), Some(Protocol::Memory(_))));
    let memory = if wanted {
        OptionalTransport::some(MemoryTransport::default())
    } else {
        OptionalTransport::none()
    };
    Ok(memory
        .upgrade(Version::V1)
        .authenticate(noise::Config::new(key)?)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

/// Build the swarm: TCP (noise, yamux) and QUIC, DNS resolution, the relay client transport,
/// the composed behaviour, and the raised idle-connection timeout.
pub(crate) fn build_swarm(
    keypair: Keypair,
    config: &NodeConfig,
) -> Result<Swarm<Behaviour>, NodeError> {
    let transport_err = |e: &dyn std::fmt::Display| NodeError::Transport {
        reason: e.to_string(),
    };
    let idle = config.limits.idle_connection_timeout;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport_err(&e))?
        .with_quic()
        .with_other_transport(|key| {
            memory_transport(key, config)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| transport_err(&e))?
        .with_dns()
        .map_err(|e| transport_err(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| transport_err(&e))?
        .with_behaviour(|key, relay_client| {
            Behaviour::new(key, relay_client, config)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| transport_err(&e))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(idle)
                .with_notify_handler_buffer_size(NonZeroUsize::new(32).expect("invariant: 32 > 0"))
        })
        // Below AutoNAT v2's 10 s per request: a dial-back to a NAT that silently drops it then
        // fails in time to be reported as unreachable (otherwise the client never gets a
        // verdict and asks again every 5 s).
        .with_connection_timeout(CONNECTION_TIMEOUT)
        .build();
    Ok(swarm)
}
