//! Reachability with real nodes over loopback TCP: nodes that listen nowhere (as unreachable
//! as a node behind a NAT with no inbound) reserve a slot on a home server's relay, advertise
//! the relayed address in their presence records and receive messages through it; a node whose
//! relay goes away reserves on another and stays reachable; the relay refuses reservations and
//! circuits beyond its limits while the peers within them keep working. The same behaviour
//! behind real NATs is in `tests/tests/netns.rs`.

use std::time::Duration;

use libp2p::Multiaddr;
use meshchat_node::{
    storage::Storage, Node, NodeConfig, NodeEvent, NodeHandle, NodeStatus, SendOutcome,
};
use meshchat_protocol::Identity;
use rand::rngs::OsRng;
use tempfile::TempDir;
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(30);

struct TestNode {
    _home: TempDir,
    handle: NodeHandle,
    identity: Identity,
}

impl TestNode {
    async fn status(&self) -> NodeStatus {
        self.handle.status().await.expect("status")
    }
}

async fn start(configure: impl FnOnce(&mut NodeConfig)) -> TestNode {
    let home = tempfile::tempdir().expect("tempdir");
    let identity = Identity::generate(&mut OsRng);
    {
        let storage = Storage::open(home.path()).expect("open storage");
        storage.save_identity(&identity).expect("save identity");
    }
    let mut config = NodeConfig::new(home.path());
    configure(&mut config);
    let handle = Node::start(config).await.expect("node starts");
    TestNode {
        _home: home,
        handle,
        identity,
    }
}

/// A free loopback TCP port (the relay must know its own address before it starts: it hands
/// it out in reservations).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A home server on loopback: DHT server and relay, with `limits` applied to its relay.
async fn relay(
    limits: impl FnOnce(&mut meshchat_node::config::RelayLimits),
) -> (TestNode, Multiaddr) {
    let port = free_port();
    let listen: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr");
    let node = start(|c| {
        c.listen = vec![listen.clone()];
        c.external = vec![listen.clone()];
        c.home_server = true;
        limits(&mut c.relay);
    })
    .await;
    let addr = listen
        .with_p2p(node.handle.peer_id())
        .expect("no peer id yet");
    (node, addr)
}

/// A node that listens nowhere: it can dial out but nobody can dial it, like a node behind a
/// NAT without port forwarding.
async fn hidden(bootstrap: Vec<Multiaddr>, reservations: usize) -> TestNode {
    start(|c| {
        c.listen = Vec::new();
        c.bootstrap = bootstrap;
        c.relay_reservations = reservations;
        c.send_timeout = Duration::from_secs(15);
    })
    .await
}

/// Poll `node`'s status until `f` holds, or fail after [`WAIT`] saying `what`.
async fn until(node: &TestNode, what: &str, f: impl Fn(&NodeStatus) -> bool) -> NodeStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = node.status().await;
        if f(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn reserved_on(s: &NodeStatus, relay: &TestNode) -> bool {
    let r = format!(
        "/p2p/{}/p2p-circuit/p2p/{}",
        relay.handle.peer_id(),
        s.peer_id
    );
    s.relay_reservations.iter().any(|a| a.contains(&r))
}

/// A relayed address of `node` (from its reservations).
fn relayed_addr(s: &NodeStatus) -> Multiaddr {
    s.relay_reservations
        .first()
        .expect("a reservation")
        .parse()
        .expect("multiaddr")
}

async fn publish(node: &TestNode) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let report = node.handle.publish_records().await.expect("publish");
        if report.bundle_published && report.presence_failed == 0 && report.presence_published >= 1
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "records not published: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn befriend(a: &TestNode, b: &TestNode) {
    a.handle
        .add_contact("b".into(), b.identity.public())
        .await
        .expect("add");
    b.handle
        .add_contact("a".into(), a.identity.public())
        .await
        .expect("add");
    publish(a).await;
    publish(b).await;
}

async fn next_text(rx: &mut broadcast::Receiver<NodeEvent>) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            if let NodeEvent::MessageReceived(m) = rx.recv().await.expect("events") {
                return m.body;
            }
        }
    })
    .await
    .expect("a message arrives")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_nobody_can_dial_is_reachable_through_a_relay() {
    let (r, r_addr) = relay(|_| {}).await;
    let a = hidden(vec![r_addr.clone()], 1).await;
    let b = hidden(vec![r_addr.clone()], 1).await;

    // Both reserve a slot on the home server's relay and list the relayed address.
    let sa = until(&a, "a reservation", |s| reserved_on(s, &r)).await;
    let sb = until(&b, "b reservation", |s| reserved_on(s, &r)).await;
    assert!(
        sb.listen_addrs.iter().any(|l| l.contains("/p2p-circuit")),
        "the relayed address is a listen address: {sb:#?}"
    );
    assert_ne!(sa.nat_status, "public", "{sa:#?}");
    let rs = until(&r, "two reservations held", |s| {
        s.relay_server.as_ref().is_some_and(|x| x.reservations >= 2)
    })
    .await;
    assert_eq!(rs.nat_status, "public", "given its address: {rs:#?}");

    // Presence carries the relayed address; A reaches B through the relay only.
    befriend(&a, &b).await;
    let mut b_events = b.handle.subscribe();
    let report = a
        .handle
        .send_text(b.identity.public(), "through the relay".into())
        .await
        .expect("send");
    assert_eq!(report.outcome, SendOutcome::Delivered);
    assert_eq!(next_text(&mut b_events).await, "through the relay");

    let mut a_events = a.handle.subscribe();
    let reply = b
        .handle
        .send_text(a.identity.public(), "and back".into())
        .await
        .expect("reply");
    assert_eq!(reply.outcome, SendOutcome::Delivered);
    assert_eq!(next_text(&mut a_events).await, "and back");

    // The connection is shown as relayed (nothing listens, so hole punching cannot succeed).
    let sa = a.status().await;
    let to_b = sa
        .connected
        .iter()
        .find(|c| c.peer_id == b.handle.peer_id().to_string())
        .unwrap_or_else(|| panic!("A is connected to B: {sa:#?}"));
    assert_eq!(sa.hole_punches_succeeded, 0, "{sa:#?}");
    assert!(to_b.relayed, "{to_b:?}");
    assert!(to_b.addr.contains("/p2p-circuit"), "{to_b:?}");
    let rs = r.status().await;
    assert!(
        rs.relay_server.as_ref().is_some_and(|x| x.circuits >= 1),
        "the relay carries the circuit: {rs:#?}"
    );
    for n in [&a, &b, &r] {
        n.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_relay_is_replaced_and_messages_keep_arriving() {
    let (r1, r1_addr) = relay(|_| {}).await;
    let (r2, r2_addr) = relay(|_| {}).await;
    let a = hidden(vec![r1_addr.clone(), r2_addr.clone()], 1).await;
    let b = hidden(vec![r1_addr.clone(), r2_addr.clone()], 1).await;
    until(&a, "a reservation", |s| {
        reserved_on(s, &r1) || reserved_on(s, &r2)
    })
    .await;
    let sb = until(&b, "b reservation", |s| {
        reserved_on(s, &r1) || reserved_on(s, &r2)
    })
    .await;
    let (gone, other) = if reserved_on(&sb, &r1) {
        (r1, r2)
    } else {
        (r2, r1)
    };
    befriend(&a, &b).await;
    let mut b_events = b.handle.subscribe();
    let first = a
        .handle
        .send_text(b.identity.public(), "first".into())
        .await
        .expect("send");
    assert_eq!(first.outcome, SendOutcome::Delivered);
    assert_eq!(next_text(&mut b_events).await, "first");

    // B's relay goes away; B reserves on the other one and publishes the new address.
    gone.handle.shutdown().await;
    let sb = until(&b, "a reservation on the remaining relay", |s| {
        reserved_on(s, &other) && !reserved_on(s, &gone)
    })
    .await;
    assert_eq!(sb.relay_reservations.len(), 1, "{sb:#?}");
    publish(&b).await;

    let second = a
        .handle
        .send_text(b.identity.public(), "second".into())
        .await
        .expect("send");
    assert_eq!(second.outcome, SendOutcome::Delivered, "{second:?}");
    assert_eq!(next_text(&mut b_events).await, "second");
    for n in [&a, &b, &other] {
        n.handle.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_refuses_beyond_its_limits_and_the_others_keep_working() {
    let (r, r_addr) = relay(|l| {
        l.max_reservations = 2;
        l.max_circuits_per_peer = 1;
    })
    .await;
    let mut reservers = Vec::new();
    for _ in 0..3 {
        reservers.push(hidden(vec![r_addr.clone()], 1).await);
    }
    // Two get a slot; the third is refused (and keeps being refused while the slots are full).
    until(&r, "a refused reservation", |s| {
        s.relay_server
            .as_ref()
            .is_some_and(|x| x.reservations == 2 && x.reservations_refused >= 1)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut with = Vec::new();
    let mut without = Vec::new();
    for n in reservers {
        let s = n.status().await;
        if reserved_on(&s, &r) {
            with.push((n, s));
        } else {
            without.push(n);
        }
    }
    assert_eq!(with.len(), 2, "exactly the limit holds a reservation");
    assert_eq!(without.len(), 1);

    // Circuits: one per peer. X opens one to P1; its second, to P2, is refused; Y still gets
    // one to P2; X's circuit still carries messages.
    let x = hidden(vec![r_addr.clone()], 0).await;
    let y = hidden(vec![r_addr.clone()], 0).await;
    let (p1, s1) = &with[0];
    let (p2, s2) = &with[1];
    x.handle
        .dial(relayed_addr(s1))
        .await
        .expect("X reaches P1 through the relay");
    let refused = x.handle.dial(relayed_addr(s2)).await;
    assert!(
        refused.is_err(),
        "a second circuit for X is refused: {refused:?}"
    );
    y.handle
        .dial(relayed_addr(s2))
        .await
        .expect("Y reaches P2 through the relay");
    let rs = r.status().await;
    let served = rs.relay_server.expect("a relay");
    assert!(served.circuits_refused >= 1, "{served:?}");
    assert_eq!(served.reservations, 2, "{served:?}");

    befriend(&x, p1).await;
    let mut p1_events = p1.handle.subscribe();
    let sent = x
        .handle
        .send_text(p1.identity.public(), "still through".into())
        .await
        .expect("send");
    assert_eq!(sent.outcome, SendOutcome::Delivered);
    assert_eq!(next_text(&mut p1_events).await, "still through");
    let sx = x.status().await;
    assert!(
        sx.connected
            .iter()
            .any(|c| c.peer_id == p1.handle.peer_id().to_string() && c.relayed),
        "{sx:#?}"
    );
    for n in [&x, &y, p1, p2, &without[0], &r] {
        n.handle.shutdown().await;
    }
}
