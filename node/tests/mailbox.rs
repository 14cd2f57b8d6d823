//! Offline delivery with real nodes over loopback TCP, each with its own RocksDB home: a message
//! to an offline user is stored on the replicas closest to its mailbox, the sender leaves, and
//! the recipient collects it when it comes back; a stranger can neither read nor empty the
//! mailbox; a collected message is never delivered twice; replicas survive losses and hand their
//! mail to new members; quotas stop a flood.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use libp2p::{
    noise, request_response,
    swarm::{Swarm, SwarmEvent},
    tcp, yamux, Multiaddr, PeerId,
};
use meshchat_node::{
    direct::{Codec, Framed},
    storage::{Direction, MessageFilter, Status, Storage},
    Node, NodeConfig, NodeEvent, NodeHandle, SendOutcome,
};
use meshchat_protocol::{
    addressing::first_contact_mailbox,
    envelope::{ciphertext_len, Envelope, BUCKETS},
    mailbox::{MailboxAuth, MailboxKeys},
    Identity, MailboxReject, MailboxRequest, MailboxResponse, PublicIdentity,
};
use rand::rngs::OsRng;
use tempfile::TempDir;
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(40);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

struct TestNode {
    home: TempDir,
    handle: NodeHandle,
    identity: Identity,
    addr: Multiaddr,
}

fn config(home: &std::path::Path, bootstrap: Vec<Multiaddr>) -> NodeConfig {
    let mut config = NodeConfig::new(home);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    config.bootstrap = bootstrap;
    config.dht_server = true;
    config.send_timeout = Duration::from_secs(2);
    config
}

async fn start_in(home: TempDir, identity: Identity, config: NodeConfig) -> TestNode {
    let handle = Node::start(config).await.expect("node starts");
    let status = handle.status().await.expect("status");
    let addr: Multiaddr = status
        .listen_addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .expect("a TCP listen address")
        .parse()
        .expect("multiaddr");
    TestNode {
        home,
        handle,
        identity,
        addr,
    }
}

/// A node with a fresh identity in its own home.
async fn start(bootstrap: Vec<Multiaddr>) -> TestNode {
    start_cfg(bootstrap, |_| {}).await
}

/// [`start`] with a changed configuration.
async fn start_cfg(bootstrap: Vec<Multiaddr>, change: impl FnOnce(&mut NodeConfig)) -> TestNode {
    let home = tempfile::tempdir().expect("tempdir");
    let identity = Identity::generate(&mut OsRng);
    Storage::open(home.path())
        .expect("open storage")
        .save_identity(&identity)
        .expect("save identity");
    let mut config = config(home.path(), bootstrap);
    change(&mut config);
    start_in(home, identity, config).await
}

/// `n` always-on nodes that hold mail (the first is everybody's bootstrap).
async fn servers(n: usize) -> Vec<TestNode> {
    servers_cfg(n, |_| {}).await
}

/// [`servers`], each configured with `change`.
async fn servers_cfg(n: usize, change: fn(&mut NodeConfig)) -> Vec<TestNode> {
    let first = start_cfg(Vec::new(), change).await;
    let boot = first.addr.clone();
    let mut out = vec![first];
    for _ in 1..n {
        out.push(start_cfg(vec![boot.clone()], change).await);
    }
    // Let every server learn about the others.
    for s in &out[1..] {
        s.handle.dial(boot.clone()).await.expect("dial");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    out
}

/// A user that was online once (its prekey bundle is in the DHT) and is now offline.
async fn user_gone_offline(boot: &Multiaddr) -> (TempDir, Identity) {
    let b = start(vec![boot.clone()]).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let report = b.handle.publish_records().await.expect("publish");
        if report.bundle_published {
            break;
        }
        assert!(Instant::now() < deadline, "bundle not published");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.handle.shutdown().await;
    (b.home, b.identity)
}

/// The next message `rx` reports within `limit`, if one comes.
async fn message_within(
    rx: &mut broadcast::Receiver<NodeEvent>,
    limit: Duration,
) -> Option<meshchat_node::storage::StoredMessage> {
    tokio::time::timeout(limit, async {
        loop {
            match rx.recv().await {
                Ok(NodeEvent::MessageReceived(m)) => return m,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => panic!("event stream closed"),
            }
        }
    })
    .await
    .ok()
}

async fn next_message(
    rx: &mut broadcast::Receiver<NodeEvent>,
) -> meshchat_node::storage::StoredMessage {
    message_within(rx, WAIT).await.expect("a message arrives")
}

fn incoming(storage: &Storage, peer: &PublicIdentity) -> Vec<String> {
    storage
        .messages(&MessageFilter {
            peer: Some(*peer),
            direction: Some(Direction::In),
            ..MessageFilter::default()
        })
        .expect("messages")
        .into_iter()
        .map(|(_, m)| m.body)
        .collect()
}

fn held(nodes: &[TestNode]) -> u64 {
    nodes.iter().map(|n| n.handle.mailbox_replicas().0).sum()
}

/// Wait until `f` holds.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A sends to offline B; the outcome must be "stored on N replicas".
async fn send_stored(a: &TestNode, to: &PublicIdentity, text: &str) -> ([u8; 16], u32) {
    let report = a.handle.send_text(*to, text.into()).await.expect("send");
    let SendOutcome::Stored { replicas } = report.outcome else {
        panic!("expected Stored, got {:?}", report.outcome);
    };
    let (_, mine) = a
        .handle
        .storage()
        .message(to, Direction::Out, &report.message_id)
        .expect("read")
        .expect("stored");
    assert_eq!(mine.status, Status::Stored { replicas });
    assert!(a.handle.storage().outbox().expect("outbox").is_empty());
    (report.message_id, replicas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offline_recipient_collects_after_the_sender_left_and_never_twice() {
    let mut servers = servers(6).await;
    let boot = servers[0].addr.clone();
    let (b_home, b_identity) = user_gone_offline(&boot).await;

    let a = start(vec![boot.clone()]).await;
    let (id, replicas) = send_stored(&a, &b_identity.public(), "while you were away").await;
    assert_eq!(replicas, 5, "stored on the default r = 5 replicas");
    assert_eq!(held(&servers), 5);
    let a_public = a.identity.public();
    a.handle.shutdown().await;

    // One replica goes away before B returns, so it misses B's DELETE.
    // (Not the first server: it is everybody's bootstrap.)
    let holder = 1 + servers[1..]
        .iter()
        .position(|s| s.handle.mailbox_replicas().0 == 1)
        .expect("a server holds a copy");
    let missed = servers.remove(holder);
    let missed_home = missed.home;
    let missed_identity = missed.identity;
    missed.handle.shutdown().await;
    drop(missed.handle);

    // B comes back on its home and collects it from the mailbox.
    let started = Instant::now();
    let b_config = config(b_home.path(), vec![boot.clone()]);
    let b = Node::start(b_config).await.expect("B restarts");
    let mut b_events = b.subscribe();
    let got = match incoming(b.storage(), &a_public).is_empty() {
        true => next_message(&mut b_events).await.body,
        false => incoming(b.storage(), &a_public).remove(0),
    };
    assert_eq!(got, "while you were away");
    println!("B held its mail {:?} after starting", started.elapsed());
    assert_eq!(incoming(b.storage(), &a_public), ["while you were away"]);
    let _ = id;

    // Events so far (the one MessageReceived) are consumed.
    while b_events.try_recv().is_ok() {}

    // B deleted it from every replica it reached.
    eventually("the replicas are emptied", || held(&servers) == 0).await;

    // The replica that missed the DELETE comes back still holding the message: B fetches it
    // again, recognises it, does not show it twice, and deletes it there too.
    let back = {
        let config = config(missed_home.path(), vec![boot.clone()]);
        start_in(missed_home, missed_identity, config).await
    };
    assert_eq!(
        back.handle.mailbox_replicas().0,
        1,
        "kept on disk across the restart"
    );
    back.handle.dial(b_addr(&b).await).await.expect("dial B");
    let mut report = b.collect_mail().await.expect("collect");
    let deadline = Instant::now() + WAIT;
    while back.handle.mailbox_replicas().0 > 0 {
        assert!(
            Instant::now() < deadline,
            "the returning replica is emptied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        report = b.collect_mail().await.expect("collect");
    }
    assert_eq!(report.new_messages, 0);
    assert_eq!(incoming(b.storage(), &a_public), ["while you were away"]);
    while let Ok(event) = b_events.try_recv() {
        assert!(
            !matches!(event, NodeEvent::MessageReceived(_)),
            "no second MessageReceived event"
        );
    }

    b.shutdown().await;
    back.handle.shutdown().await;
    for s in &servers {
        s.handle.shutdown().await;
    }
}

async fn b_addr(handle: &NodeHandle) -> Multiaddr {
    handle
        .status()
        .await
        .expect("status")
        .listen_addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .expect("tcp")
        .parse()
        .expect("multiaddr")
}

/// B comes back on its home and waits for the message from `from`.
async fn return_and_receive(
    home: TempDir,
    identity: Identity,
    bootstrap: Multiaddr,
    from: &PublicIdentity,
    text: &str,
) -> TestNode {
    let config = config(home.path(), vec![bootstrap]);
    let b = start_in(home, identity, config).await;
    let mut events = b.handle.subscribe();
    if incoming(b.handle.storage(), from).is_empty() {
        assert_eq!(next_message(&mut events).await.body, text);
    }
    assert_eq!(incoming(b.handle.storage(), from), [text]);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mail_survives_two_of_five_replicas_dying() {
    let mut servers = servers(6).await;
    let boot = servers[0].addr.clone();
    let (b_home, b_identity) = user_gone_offline(&boot).await;
    let a = start(vec![boot.clone()]).await;
    let (_, replicas) = send_stored(&a, &b_identity.public(), "two are gone").await;
    assert_eq!(replicas, 5);
    let a_public = a.identity.public();
    a.handle.shutdown().await;

    // Two holders die without handing anything over.
    for _ in 0..2 {
        let i = 1 + servers[1..]
            .iter()
            .position(|s| s.handle.mailbox_replicas().0 == 1)
            .expect("a holder");
        let dead = servers.remove(i);
        dead.handle.shutdown_abruptly().await;
    }
    let b = return_and_receive(b_home, b_identity, boot, &a_public, "two are gone").await;
    b.handle.shutdown().await;
    for s in &servers {
        s.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repair_carries_mail_to_new_nodes_when_all_original_replicas_leave() {
    let mut old = servers(5).await;
    let boot = old[0].addr.clone();
    let (b_home, b_identity) = user_gone_offline(&boot).await;
    let a = start(vec![boot.clone()]).await;
    send_stored(&a, &b_identity.public(), "carried over").await;
    let a_public = a.identity.public();
    a.handle.shutdown().await;
    let first_copies = held(&old);
    assert!(
        first_copies >= 3,
        "stored on at least a quorum: {first_copies}"
    );

    // Five new nodes join; then the original ones die one by one, without any hand-off. After
    // each death the survivors run a repair round (as their repair timer would).
    let mut new = Vec::new();
    for _ in 0..5 {
        new.push(start(vec![boot.clone()]).await);
    }
    let new_boot = new[0].addr.clone();
    for n in &new[1..] {
        n.handle.dial(new_boot.clone()).await.expect("dial");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Some(dead) = old.pop() {
        for n in old.iter().chain(&new) {
            n.handle.repair_mailboxes().await;
        }
        dead.handle.shutdown_abruptly().await;
        drop(dead);
    }
    let on_new = held(&new);
    assert!(on_new >= 1, "repair handed the mail to new nodes");

    let b = return_and_receive(b_home, b_identity, new_boot, &a_public, "carried over").await;
    eventually("the new replicas are emptied", || held(&new) == 0).await;
    b.handle.shutdown().await;
    for n in &new {
        n.handle.shutdown().await;
    }
}

/// B, online, its bundle published, subscribed to its first-contact mailbox, never collecting
/// by the clock during a test: only a push can bring it mail. (A sender who is not B's contact
/// finds no presence record of B and falls back to the mailbox.)
async fn subscribed_recipient(boot: &Multiaddr) -> TestNode {
    subscribed_recipient_cfg(boot, |_| {}).await
}

/// [`subscribed_recipient`] with a changed configuration.
async fn subscribed_recipient_cfg(
    boot: &Multiaddr,
    change: impl FnOnce(&mut NodeConfig),
) -> TestNode {
    let b = start_cfg(vec![boot.clone()], |c| {
        c.mailbox.collect_interval = Duration::from_secs(3600);
        change(c);
    })
    .await;
    let deadline = Instant::now() + WAIT;
    while !b
        .handle
        .publish_records()
        .await
        .expect("publish")
        .bundle_published
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.handle.collect_mail().await.expect("collect");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_push_new_mail_to_an_online_recipient_at_once() {
    let servers = servers(5).await;
    let boot = servers[0].addr.clone();
    let b = subscribed_recipient(&boot).await;
    let mut events = b.handle.subscribe();
    let a = start(vec![boot.clone()]).await;
    send_stored(&a, &b.identity.public(), "pushed").await;
    let stored_at = Instant::now();
    let got = message_within(&mut events, Duration::from_secs(3))
        .await
        .expect("pushed within 3 s, long before any poll");
    assert_eq!(got.body, "pushed");
    println!(
        "pushed mail arrived {:?} after send returned",
        stored_at.elapsed()
    );
    for n in [&a.handle, &b.handle] {
        n.shutdown().await;
    }
    for s in &servers {
        s.handle.shutdown().await;
    }
}

/// A replica pushes to a subscriber it is no longer connected to and that is not in its
/// routing table (a DHT client: Kademlia keeps no address for it), dialling it where it said
/// it listens. In this small network the swarm's own address cache (identify's listen
/// addresses, 100 peers) still knows B, so the test passes without the event loop's larger
/// memory of them (`heard`, 4,096 peers) too: it guards the path, not the size. Among 1,000
/// nodes that cache had long forgotten most subscribers (docs/performance.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_dials_a_subscriber_it_knows_only_from_its_subscription() {
    fn brief(c: &mut NodeConfig) {
        c.limits.idle_connection_timeout = Duration::from_secs(1);
    }
    let servers = servers_cfg(5, brief).await;
    let boot = servers[0].addr.clone();
    let b = subscribed_recipient_cfg(&boot, |c| {
        c.dht_server = false;
        brief(c);
    })
    .await;
    let mut events = b.handle.subscribe();
    // Every connection of B's closes: a push has to dial it.
    let deadline = Instant::now() + WAIT;
    while !b
        .handle
        .status()
        .await
        .expect("status")
        .connected
        .is_empty()
    {
        assert!(Instant::now() < deadline, "B's connections never closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let a = start_cfg(vec![boot.clone()], brief).await;
    send_stored(&a, &b.identity.public(), "dialled back").await;
    let got = message_within(&mut events, Duration::from_secs(3))
        .await
        .expect("pushed within 3 s: the replica dialled B");
    assert_eq!(got.body, "dialled back");
    for n in [&a.handle, &b.handle] {
        n.shutdown().await;
    }
    for s in &servers {
        s.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_that_failed_is_tried_again_once_the_subscriber_is_reachable() {
    let servers = servers(5).await;
    let boot = servers[0].addr.clone();
    let b = subscribed_recipient(&boot).await;
    let a = start(vec![boot.clone()]).await;
    // B stays connected to A (so no reconnect makes it collect) but refuses every replica:
    // the pushes of A's mail fail.
    b.handle.dial(a.addr.clone()).await.expect("dial");
    let replicas: Vec<PeerId> = servers.iter().map(|s| s.handle.peer_id()).collect();
    b.handle.block_peers(replicas.clone()).await.expect("block");
    let mut events = b.handle.subscribe();
    send_stored(&a, &b.identity.public(), "pushed again").await;
    assert!(
        message_within(&mut events, Duration::from_secs(1))
            .await
            .is_none(),
        "nothing arrives while B refuses its replicas"
    );
    b.handle.unblock_peers(replicas).await.expect("unblock");
    let got = message_within(&mut events, Duration::from_secs(20))
        .await
        .expect("a replica pushed it again");
    assert_eq!(got.body, "pushed again");
    for n in [&a.handle, &b.handle] {
        n.shutdown().await;
    }
    for s in &servers {
        s.handle.shutdown().await;
    }
}

/// A recipient whose lookups of its mailbox's closest peers come back short — as they did
/// among 1,000 nodes under churn, timing out having heard from a few far peers or none —
/// still collects its mail: from the replicas its last sure lookup named. Its pushes have
/// lapsed (a one-second subscription), so nothing else brings the mail; without that memory
/// the collection asks nobody and finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recipient_whose_lookups_come_back_short_collects_from_the_replicas_it_knew() {
    fn brief(c: &mut NodeConfig) {
        c.mailbox.subscription = Duration::from_secs(1);
    }
    let servers = servers_cfg(5, brief).await;
    let boot = servers[0].addr.clone();
    // Its first collection looked up the replicas of its mailbox normally.
    let b = subscribed_recipient(&boot).await;
    b.handle.stunt_lookups(true).await.expect("hook");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = start(vec![boot.clone()]).await;
    send_stored(&a, &b.identity.public(), "found all the same").await;
    let report = b.handle.collect_mail().await.expect("collect");
    assert!(report.short_lookups >= 1, "the hook works: {report:?}");
    assert!(report.replicas_answered >= 1, "{report:?}");
    assert_eq!(
        incoming(b.handle.storage(), &a.identity.public()),
        vec!["found all the same".to_owned()],
        "{report:?}"
    );
    for n in [&a.handle, &b.handle] {
        n.shutdown().await;
    }
    for s in &servers {
        s.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mail_its_recipient_deleted_is_not_handed_back_by_repair() {
    let servers = servers(5).await;
    let boot = servers[0].addr.clone();
    // Neither A nor B holds mail for others: the servers are the only replicas.
    let b = subscribed_recipient_cfg(&boot, |c| c.mailbox.serve = false).await;
    let a = start_cfg(vec![boot.clone()], |c| c.mailbox.serve = false).await;
    b.handle.dial(a.addr.clone()).await.expect("dial");
    let all: Vec<PeerId> = servers.iter().map(|s| s.handle.peer_id()).collect();
    b.handle.block_peers(all.clone()).await.expect("block");
    let mut events = b.handle.subscribe();
    let (_, replicas) = send_stored(&a, &b.identity.public(), "collected once").await;
    eventually("every replica holds it", || {
        held(&servers) == u64::from(replicas)
    })
    .await;

    // One holder stays cut off from B: its pushes fail and B never deletes its copy. The others
    // push again (after 5 s), B stores it and deletes their copies.
    let holders: Vec<usize> = (0..servers.len())
        .filter(|&i| servers[i].handle.mailbox_replicas().0 == 1)
        .collect();
    let holdout = holders[0];
    let emptied = &holders[1..];
    let others: Vec<PeerId> = all
        .iter()
        .copied()
        .filter(|p| *p != servers[holdout].handle.peer_id())
        .collect();
    b.handle.unblock_peers(others).await.expect("unblock");
    let got = message_within(&mut events, Duration::from_secs(20))
        .await
        .expect("a replica pushed it again");
    assert_eq!(got.body, "collected once");
    eventually("only the cut-off holder still has it", || {
        held(&servers) == 1
    })
    .await;

    // B refuses every server again, so a copy taken back would stay where it landed (its push
    // fails). The holdout's repair offers its copy to the closest peers: those B emptied answer
    // `duplicate` and keep nothing. (A server the sender never reached may take a copy: it
    // never held it, so nothing was deleted there.)
    b.handle.block_peers(all.clone()).await.expect("block");
    let copies = servers[holdout].handle.repair_mailboxes().await;
    for &i in emptied {
        assert_eq!(
            servers[i].handle.mailbox_replicas().0,
            0,
            "server {i}, emptied by the recipient, took the collected mail back"
        );
    }
    assert!(
        copies <= servers.len() - holders.len(),
        "{copies} copies accepted, but only {} servers never held it",
        servers.len() - holders.len()
    );

    // Once B reaches the servers again, a collection empties them all, and B shows the message
    // once.
    b.handle.unblock_peers(all).await.expect("unblock");
    b.handle.collect_mail().await.expect("collect");
    eventually("no replica holds it", || held(&servers) == 0).await;
    assert_eq!(
        incoming(b.handle.storage(), &a.identity.public()),
        ["collected once"]
    );
    for n in [&a.handle, &b.handle] {
        n.shutdown().await;
    }
    for s in &servers {
        s.handle.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// A raw client speaking /meshchat/mailbox/1.0.0: a stranger, a flooder
// ---------------------------------------------------------------------------------------------

type RawMailbox = request_response::Behaviour<Codec<MailboxRequest, MailboxResponse>>;

fn raw_swarm() -> Swarm<RawMailbox> {
    raw_mailbox_swarm(request_response::ProtocolSupport::Outbound, 100)
}

/// A swarm speaking only the mailbox protocol, taking at most `streams` inbound streams per
/// connection at once (a node takes 32).
fn raw_mailbox_swarm(
    support: request_response::ProtocolSupport,
    streams: usize,
) -> Swarm<RawMailbox> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| {
            RawMailbox::new(
                [(meshchat_node::mailbox::PROTOCOL, support)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(10))
                    .with_max_concurrent_streams(streams),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

async fn ask(
    swarm: &mut Swarm<RawMailbox>,
    node: &TestNode,
    request: MailboxRequest,
) -> MailboxResponse {
    let peer: PeerId = node.handle.peer_id();
    let id = swarm.behaviour_mut().send_request_with_addresses(
        &peer,
        Framed::Value(request),
        vec![node.addr.clone()],
    );
    tokio::time::timeout(WAIT, async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) if request_id == id => return response,
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    request_id,
                    error,
                    ..
                }) if request_id == id => panic!("request failed: {error}"),
                _ => {}
            }
        }
    })
    .await
    .expect("the node answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stranger_can_neither_read_nor_empty_someone_elses_mailbox() {
    let servers = servers(5).await;
    let boot = servers[0].addr.clone();
    let (b_home, b_identity) = user_gone_offline(&boot).await;
    let a = start(vec![boot.clone()]).await;
    send_stored(&a, &b_identity.public(), "for bob only").await;
    let a_public = a.identity.public();
    a.handle.shutdown().await;
    let holder = servers
        .iter()
        .find(|s| s.handle.mailbox_replicas().0 == 1)
        .expect("a holder");
    let mailbox = first_contact_mailbox(&b_identity.public());

    let mut eve = raw_swarm();
    let eve_keys = MailboxKeys::first_contact(&Identity::generate(&mut OsRng));
    // Her own key for Bob's mailbox.
    let MailboxRequest::Fetch { auth, .. } = eve_keys.fetch(None, unix_now(), &mut OsRng) else {
        unreachable!()
    };
    let fetch = MailboxRequest::Fetch {
        mailbox,
        after: None,
        auth: auth.clone(),
    };
    assert_eq!(
        ask(&mut eve, holder, fetch).await,
        MailboxResponse::Refused {
            reason: MailboxReject::WrongKey
        }
    );
    // Bob's public key with her signature.
    let MailboxRequest::Delete { auth, .. } =
        eve_keys.delete(vec![[0; 32]], unix_now(), &mut OsRng)
    else {
        unreachable!()
    };
    let delete = MailboxRequest::Delete {
        mailbox,
        ids: vec![[0; 32]],
        auth: MailboxAuth {
            public_key: *b_identity.public().as_bytes(),
            ..auth
        },
    };
    assert_eq!(
        ask(&mut eve, holder, delete).await,
        MailboxResponse::Refused {
            reason: MailboxReject::BadSignature
        }
    );
    // A request Bob really signed, replayed after the window: refused as expired.
    let old = MailboxKeys::first_contact(&b_identity).fetch(None, unix_now() - 3600, &mut OsRng);
    assert_eq!(
        ask(&mut eve, holder, old).await,
        MailboxResponse::Refused {
            reason: MailboxReject::AuthExpired
        }
    );
    assert_eq!(holder.handle.mailbox_replicas().0, 1, "nothing was deleted");

    // Bob still gets his mail.
    let b = return_and_receive(b_home, b_identity, boot, &a_public, "for bob only").await;
    b.handle.shutdown().await;
    for s in &servers {
        s.handle.shutdown().await;
    }
}

fn junk(mailbox: u8, n: u32) -> Envelope {
    let mut ephemeral = [0u8; 32];
    ephemeral[..4].copy_from_slice(&n.to_le_bytes());
    Envelope {
        routing_key: [mailbox; 32],
        timestamp: unix_now(),
        ttl: 3600,
        ephemeral,
        ciphertext: vec![7; ciphertext_len(BUCKETS[0])],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_stop_a_flood_while_other_mailboxes_keep_working() {
    let node = start_cfg(Vec::new(), |c| {
        c.mailbox.limits.max_mailbox_envelopes = 5;
        c.mailbox.limits.store_burst = 12;
        c.mailbox.limits.stores_per_minute = 1;
    })
    .await;
    let mut flooder = raw_swarm();
    let stored = |r: &MailboxResponse| {
        matches!(
            r,
            MailboxResponse::Stored {
                duplicate: false,
                ..
            }
        )
    };
    // Flooding one mailbox: the first five fit, then its quota stops the rest.
    for n in 0..5 {
        assert!(stored(
            &ask(
                &mut flooder,
                &node,
                MailboxRequest::Store {
                    envelope: junk(1, n)
                }
            )
            .await
        ));
    }
    assert_eq!(
        ask(
            &mut flooder,
            &node,
            MailboxRequest::Store {
                envelope: junk(1, 99)
            }
        )
        .await,
        MailboxResponse::Refused {
            reason: MailboxReject::MailboxCountQuota
        }
    );
    // Another mailbox still takes mail.
    assert!(stored(
        &ask(
            &mut flooder,
            &node,
            MailboxRequest::Store {
                envelope: junk(2, 0)
            }
        )
        .await
    ));
    // The flooder's own rate: its burst is spent and it refills at 1 a minute.
    let mut limited = false;
    let mut third = 0;
    for n in 1..20 {
        let r = ask(
            &mut flooder,
            &node,
            MailboxRequest::Store {
                envelope: junk(3, n),
            },
        )
        .await;
        if r == (MailboxResponse::Refused {
            reason: MailboxReject::RateLimited,
        }) {
            limited = true;
            break;
        }
        assert!(stored(&r), "{r:?}");
        third += 1;
    }
    // Burst of 12: 5 + 1 refused + 1 before, so 5 more.
    assert_eq!(third, 5);
    assert!(limited, "the per-peer rate limit stops a fast sender");
    // Another peer is not affected by the flooder's rate limit.
    let mut other = raw_swarm();
    assert!(stored(
        &ask(
            &mut other,
            &node,
            MailboxRequest::Store {
                envelope: junk(4, 0)
            }
        )
        .await
    ));
    // An expired envelope has its own refusal.
    let mut expired = junk(5, 0);
    expired.timestamp -= 7200;
    assert_eq!(
        ask(
            &mut other,
            &node,
            MailboxRequest::Store { envelope: expired }
        )
        .await,
        MailboxResponse::Refused {
            reason: MailboxReject::EnvelopeExpired
        }
    );
    assert_eq!(node.handle.mailbox_replicas().0, 5 + 1 + 5 + 1);
    node.handle.shutdown().await;
}

/// Mail collected from a mailbox is acknowledged to its sender with a Delivered receipt, so the
/// sender's status moves on from "stored on N replicas" to "delivered".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sender_sees_delivered_once_the_recipient_collected() {
    let servers = servers(6).await;
    let boot = servers[0].addr.clone();
    let (b_home, b_identity) = user_gone_offline(&boot).await;
    let a = start(vec![boot.clone()]).await;
    let b_public = b_identity.public();
    let (id, _) = send_stored(&a, &b_public, "collect me").await;

    let b = return_and_receive(b_home, b_identity, boot, &a.identity.public(), "collect me").await;
    eventually("the sender's message is marked delivered", || {
        a.handle
            .storage()
            .message(&b_public, Direction::Out, &id)
            .ok()
            .flatten()
            .is_some_and(|(_, m)| m.status == Status::Delivered)
    })
    .await;

    b.handle.shutdown().await;
    a.handle.shutdown().await;
    for s in &servers {
        s.handle.shutdown().await;
    }
}

/// A replica pushes a burst of new mail to a subscriber at most 16 requests at a time. Every
/// node takes 32 inbound streams per connection at once and drops the rest; a replica used to
/// push each new envelope at once, so a burst of 48 to a subscriber slower than the burst lost
/// 16 pushes (seen in a 100-member group simulation as "Dropping inbound stream because we are
/// at capacity"). Here the subscriber has a node's limit and answers each push after 300 ms:
/// every push arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_pushed_to_a_slow_subscriber_arrives_whole() {
    const BURST: u32 = 48;
    let node = start(Vec::new()).await;
    let keys = MailboxKeys::first_contact(&Identity::generate(&mut OsRng));
    let mut subscriber = raw_mailbox_swarm(request_response::ProtocolSupport::Full, 32);
    let r = ask(
        &mut subscriber,
        &node,
        keys.subscribe(unix_now(), &mut OsRng),
    )
    .await;
    assert_eq!(r, MailboxResponse::Subscribed);

    // Another peer stores the burst, 16 requests at a time (as a node does): the replica stores
    // them faster than the subscriber takes them.
    let mut storer = raw_swarm();
    let peer = node.handle.peer_id();
    let mut next = 0;
    let mut store_next = |storer: &mut Swarm<RawMailbox>| {
        if next < BURST {
            let mut envelope = junk(0, next);
            envelope.routing_key = keys.id();
            storer.behaviour_mut().send_request_with_addresses(
                &peer,
                Framed::Value(MailboxRequest::Store { envelope }),
                vec![node.addr.clone()],
            );
            next += 1;
        }
    };
    for _ in 0..16 {
        store_next(&mut storer);
    }
    let mut stored = 0;
    let mut pushed = 0;
    let mut waiting: Vec<(Instant, request_response::ResponseChannel<MailboxResponse>)> =
        Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let deadline = Instant::now() + Duration::from_secs(20);
    while (pushed < BURST || stored < BURST) && Instant::now() < deadline {
        tokio::select! {
            e = storer.select_next_some() => {
                if let SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Response { response, .. },
                    ..
                }) = e
                {
                    assert!(
                        matches!(response, MailboxResponse::Stored { duplicate: false, .. }),
                        "{response:?}"
                    );
                    stored += 1;
                    store_next(&mut storer);
                }
            }
            e = subscriber.select_next_some() => {
                if let SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Request { request, channel, .. },
                    ..
                }) = e
                {
                    assert!(matches!(request, Framed::Value(MailboxRequest::Deliver { .. })));
                    pushed += 1;
                    waiting.push((Instant::now() + Duration::from_millis(300), channel));
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let (due, later): (Vec<_>, Vec<_>) =
                    waiting.drain(..).partition(|(at, _)| *at <= now);
                waiting = later;
                for (_, channel) in due {
                    let _ = subscriber.behaviour_mut().send_response(
                        channel,
                        MailboxResponse::Stored {
                            envelope_id: [0; 32],
                            duplicate: false,
                        },
                    );
                }
            }
        }
    }
    assert_eq!(stored, BURST, "the replica stored the whole burst");
    assert_eq!(pushed, BURST, "every envelope was pushed to the subscriber");
    node.handle.shutdown().await;
}
