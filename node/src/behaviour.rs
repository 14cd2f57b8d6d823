//! The composed libp2p [`NetworkBehaviour`] and the swarm that runs it: TCP and QUIC, noise,
//! yamux, DNS; block list, connection and memory limits, identify, ping, Kademlia on the private
//! protocol `/meshchat/kad/1.0.0`, and direct delivery. See `docs/architecture.md`, "Network".
//!
//! Order matters: the block list and the limits come first so that a refused connection is
//! refused before any other behaviour sets up state for it.

use std::num::NonZeroUsize;

use libp2p::{
    allow_block_list, connection_limits, identify,
    identity::Keypair,
    kad::{self, store::MemoryStore, store::MemoryStoreConfig},
    memory_connection_limits, noise, ping, request_response,
    swarm::NetworkBehaviour,
    tcp, yamux, StreamProtocol, Swarm,
};
use meshchat_protocol::{envelope::Envelope, MailboxRequest, MailboxResponse};

use crate::{
    config::NodeConfig,
    direct::{self, DirectResponse},
    error::NodeError,
};

/// The Kademlia protocol id: a private DHT, separate from the public IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/meshchat/kad/1.0.0");
/// The identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/meshchat/id/1.0.0";

/// The direct-delivery behaviour.
pub(crate) type DirectBehaviour =
    request_response::Behaviour<direct::Codec<Envelope, DirectResponse>>;

/// The mailbox behaviour (`/meshchat/mailbox/1.0.0`).
pub(crate) type MailboxBehaviour =
    request_response::Behaviour<direct::Codec<MailboxRequest, MailboxResponse>>;

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
}

impl Behaviour {
    fn new(key: &Keypair, config: &NodeConfig) -> Self {
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

        Self {
            blocked: allow_block_list::Behaviour::default(),
            limits: connection_limits::Behaviour::new(limits),
            memory: memory_connection_limits::Behaviour::with_max_percentage(l.max_memory_fraction),
            identify,
            ping: ping::Behaviour::default(),
            kad,
            direct,
            mailbox,
        }
    }
}

/// Build the swarm: TCP (noise, yamux) and QUIC, DNS resolution, the composed behaviour, and the
/// raised idle-connection timeout.
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
        .with_dns()
        .map_err(|e| transport_err(&e))?
        .with_behaviour(|key| Behaviour::new(key, config))
        .map_err(|e| transport_err(&e))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(idle)
                .with_notify_handler_buffer_size(NonZeroUsize::new(32).expect("invariant: 32 > 0"))
        })
        .build();
    Ok(swarm)
}
