//! `meshchat serve`: a home server. The same node as `meshchat run`, always a Kademlia server,
//! a circuit relay v2 server with limits raised for chat (`meshchat_node::config::RelayLimits`),
//! an AutoNAT server, and a mailbox replica with a larger disk budget. It listens on port 4001
//! (TCP and QUIC) unless told otherwise, takes `--external` as its public address, and prints
//! the multiaddrs friends should bootstrap from. See `docs/operations.md`, "A home server".

use std::time::Duration;

use libp2p::Multiaddr;
use meshchat_node::{config::RelayLimits, Node, NodeStatus};
use serde_json::json;

use crate::{
    args::ServeArgs,
    commands::{shutdown_signal, Ctx},
    config::{self, Source},
    conn,
    exit::{self, Failure},
    progress::Progress,
};

/// The port a home server listens on by default (TCP and UDP/QUIC).
pub(crate) const DEFAULT_PORT: u16 = 4001;
/// How much mail a home server holds for others, all mailboxes together (the per-mailbox
/// quotas stay as on every node).
pub(crate) const MAILBOX_BUDGET_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// How long the banner waits for the listeners to settle.
const SETTLE: Duration = Duration::from_millis(1500);

fn default_listen() -> Vec<Multiaddr> {
    [
        format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"),
        format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1"),
    ]
    .iter()
    .filter_map(|a| a.parse().ok())
    .collect()
}

/// The addresses friends should paste after `--bootstrap`: the public ones if known, else
/// every non-loopback listen address, else all of them.
pub(crate) fn bootstrap_addrs(s: &NodeStatus) -> Vec<String> {
    let direct = |a: &&String| !a.contains("/p2p-circuit");
    let external: Vec<String> = s.external_addrs.iter().filter(direct).cloned().collect();
    if !external.is_empty() {
        return external;
    }
    let loopback = |a: &String| a.starts_with("/ip4/127.") || a.starts_with("/ip6/::1/");
    let lan: Vec<String> = s
        .listen_addrs
        .iter()
        .filter(direct)
        .filter(|a| !loopback(a))
        .cloned()
        .collect();
    if lan.is_empty() {
        s.listen_addrs.clone()
    } else {
        lan
    }
}

fn relay_json(l: &RelayLimits) -> serde_json::Value {
    json!({
        "max_reservations": l.max_reservations,
        "max_reservations_per_peer": l.max_reservations_per_peer,
        "reservation_duration_secs": l.reservation_duration.as_secs(),
        "max_circuits": l.max_circuits,
        "max_circuits_per_peer": l.max_circuits_per_peer,
        "max_circuit_duration_secs": l.max_circuit_duration.as_secs(),
        "max_circuit_bytes": l.max_circuit_bytes,
    })
}

pub(crate) async fn serve(ctx: &Ctx, args: ServeArgs) -> Result<u8, Failure> {
    conn::require_initialised(&ctx.home)?;
    if conn::running(&ctx.home).await?.is_some() {
        return Err(Failure::new(
            exit::HOME_IN_USE,
            "home_in_use",
            format!(
                "a meshchat node is already running on {}; stop it before starting a home \
                 server on the same home",
                ctx.home.display()
            ),
        ));
    }
    let mut config = ctx.settings.node_config(&ctx.home);
    if ctx.settings.listen.source == Source::Default {
        config.listen = default_listen();
    }
    config.home_server = true;
    config.dht_server = true;
    // A home server is LAN-only only when told: it is where friends from outside come in.
    config.lan_only = ctx.settings.lan_only.value;
    config.serve_control = true;
    config.mailbox.limits.max_total_bytes = config
        .mailbox
        .limits
        .max_total_bytes
        .max(MAILBOX_BUDGET_BYTES);
    let relay = config.relay.clone();
    let budget = config.mailbox.limits.max_total_bytes;

    let p = Progress::start(ctx.progress(), "Starting the home server…");
    let handle = Node::start(config).await?;
    p.finish(None);
    if let Err(e) = config::remember_bootstrap(&ctx.settings.file, &args.node.bootstrap) {
        tracing::warn!("cannot remember the bootstrap addresses: {e}");
    }

    // Let every listener (TCP, QUIC, each interface) report its address before printing.
    let mut status = handle.status().await?;
    let deadline = tokio::time::Instant::now() + SETTLE;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let next = handle.status().await?;
        let settled = next.listen_addrs == status.listen_addrs
            && next.external_addrs == status.external_addrs;
        status = next;
        if settled {
            break;
        }
    }
    let friends = bootstrap_addrs(&status);
    let has_public = status
        .external_addrs
        .iter()
        .any(|a| !a.contains("/p2p-circuit"));
    if ctx.out.json {
        ctx.out.emit(
            "",
            json!({
                "event": "listening",
                "home_server": true,
                "user_id": status.user_id,
                "peer_id": status.peer_id,
                "listen_addrs": status.listen_addrs,
                "external_addrs": status.external_addrs,
                "bootstrap_addrs": friends,
                "relay": relay_json(&relay),
                "mailbox_budget_bytes": budget,
                "lan_only": status.lan_only,
                "mdns": status.mdns,
            }),
        );
    } else {
        println!(
            "meshchat home server running on {} (Ctrl-C to stop)",
            ctx.home.display()
        );
        println!("user ID: {}", status.user_id);
        println!("peer ID: {}", status.peer_id);
        println!("friends bootstrap from (paste after --bootstrap):");
        for a in &friends {
            println!("  {a}");
        }
        println!(
            "relay: {} reservations, {} circuits, each circuit up to {} min and {} MiB",
            relay.max_reservations,
            relay.max_circuits,
            relay.max_circuit_duration.as_secs() / 60,
            relay.max_circuit_bytes / (1024 * 1024)
        );
        println!(
            "mailbox replica: up to {} MiB of mail held for others",
            budget / (1024 * 1024)
        );
    }
    if !has_public && !status.lan_only && !ctx.quiet {
        eprintln!(
            "note: no public address is known yet. If friends reach this server through port \
             forwarding, pass --external /ip4/YOUR_PUBLIC_IP/tcp/{DEFAULT_PORT}; until then its \
             relay cannot give out reservations."
        );
    }

    tokio::select! {
        _ = shutdown_signal() => {}
        _ = handle.stopped() => {}
    }
    if ctx.progress() && !ctx.out.json {
        eprintln!("Shutting down…");
    }
    handle.shutdown().await;
    ctx.out.emit("Stopped.", json!({ "event": "stopped" }));
    Ok(exit::OK)
}
