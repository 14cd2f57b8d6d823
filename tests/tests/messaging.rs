//! End-to-end: real `meshchat` processes, each with its own home and RocksDB, on loopback.
//! Two users and a third node that is the only bootstrap; contact exchange; messages both ways;
//! `inbox --json` shows sender and time.

use std::time::Duration;

use meshchat_tests::{eventually, Daemon, Home};

/// A user with a running node bootstrapped from `bootstrap`.
struct User {
    home: Home,
    id: String,
    node: Option<Daemon>,
}

impl User {
    fn new(bootstrap: &str) -> User {
        let home = Home::new();
        let id = home.init();
        let node = home.spawn_run(["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", bootstrap]);
        User {
            home,
            id,
            node: Some(node),
        }
    }

    fn inbox(&self) -> Vec<serde_json::Value> {
        self.home
            .json(["inbox"])
            .into_iter()
            .filter(|m| m.get("text").is_some())
            .collect()
    }
}

fn texts(msgs: &[serde_json::Value]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| m.get("text").and_then(|t| t.as_str()).map(str::to_owned))
        .collect()
}

#[test]
fn two_users_exchange_messages_through_a_bootstrap_node() {
    let hub_home = Home::new();
    hub_home.init();
    let hub = hub_home.spawn_run(["--listen", "/ip4/127.0.0.1/tcp/0", "--dht-server"]);
    let boot = hub.tcp_addr();
    assert!(boot.contains("/p2p/12D3"), "a full multiaddr: {boot}");

    let alice = User::new(&boot);
    let bob = User::new(&boot);
    alice.home.ok(["contact", "add", "bob", &bob.id]);
    bob.home.ok(["contact", "add", "alice", &alice.id]);

    // Alice → Bob, through Alice's running node; `send` returns once Bob has it durably.
    let sent = alice.home.json(["send", "bob", "hello bob"]);
    assert_eq!(
        sent.last()
            .and_then(|v| v.get("outcome"))
            .and_then(|o| o.as_str()),
        Some("delivered"),
        "send output: {sent:?}"
    );
    let inbox = eventually(Duration::from_secs(10), || {
        let m = bob.inbox();
        (!m.is_empty()).then_some(m)
    })
    .expect("bob receives the message");
    assert_eq!(texts(&inbox), ["hello bob"]);
    let msg = &inbox[0];
    assert_eq!(
        msg["from_name"], "alice",
        "sender shown by contact name: {msg}"
    );
    assert_eq!(msg["from"], alice.id.as_str());
    let (sent, received) = (msg["sent_at_ms"].as_u64(), msg["received_at_ms"].as_u64());
    assert!(
        sent.zip(received)
            .is_some_and(|(s, r)| s > 1_700_000_000_000 && r >= s),
        "times in ms since 1970: {msg}"
    );

    // Bob → Alice, then a few more both ways: order kept per conversation.
    bob.home.ok(["send", "alice", "hi alice"]);
    for i in 0..3 {
        alice.home.ok(["send", "bob", &format!("a{i}")]);
        bob.home.ok(["send", "alice", &format!("b{i}")]);
    }
    let a_in = eventually(Duration::from_secs(10), || {
        let m = alice.inbox();
        (m.len() == 4).then_some(m)
    })
    .expect("alice has 4 messages");
    assert_eq!(texts(&a_in), ["hi alice", "b0", "b1", "b2"]);
    let b_in = eventually(Duration::from_secs(10), || {
        let m = bob.inbox();
        (m.len() == 4).then_some(m)
    })
    .expect("bob has 4 messages");
    assert_eq!(texts(&b_in), ["hello bob", "a0", "a1", "a2"]);

    // The status of Alice's node shows the connection and a routing table.
    let status = alice.home.json(["status"]);
    let s = status.last().expect("status prints an object");
    assert!(
        s["listen_addrs"].as_array().is_some_and(|a| !a.is_empty()),
        "{s}"
    );
    assert!(
        s["connected"].as_array().is_some_and(|a| !a.is_empty()),
        "{s}"
    );
    drop(alice.node);
    drop(bob.node);
}
