//! NAT traversal and LAN-only clusters with the real `meshchat` binary in network namespaces
//! that each test creates and removes itself (`meshchat_tests::netns`; needs root, as in CI).
//!
//! ```text
//!  NAT test:   a (192.168.1.2) ── nat-a ──┐                       ┌── nat-b ── b (192.168.2.2)
//!                      MASQUERADE, no     ├── "internet" switch ──┤   MASQUERADE, no inbound
//!                      inbound            │    203.0.113.0/24     │
//!                                         └── srv 203.0.113.10 ───┘   meshchat serve
//!
//!  LAN test:   n1, n2, n3 on one switch (10.77.0.0/24), no router, no internet, no bootstrap:
//!              1:1 messages, a group, offline mail and the group's catch-up
//! ```

use std::time::{Duration, Instant};

use meshchat_tests::{
    eventually,
    netns::{Lab, NatKind},
    Daemon, Home,
};

/// Inbox texts of `home` (through its running node or its storage).
fn inbox(home: &Home) -> Vec<String> {
    home.json(["inbox"])
        .into_iter()
        .filter_map(|m| m.get("text").and_then(|t| t.as_str()).map(str::to_owned))
        .collect()
}

/// Group messages in `inbox --json`: (group name, text).
fn group_texts(home: &Home) -> Vec<(String, String)> {
    home.json(["inbox"])
        .into_iter()
        .filter(|m| !m["group_id"].is_null())
        .map(|m| {
            (
                m["group_name"].as_str().unwrap_or_default().to_owned(),
                m["text"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn wait_group_text(home: &Home, text: &str, limit: Duration) {
    eventually(limit, || {
        group_texts(home)
            .iter()
            .any(|(_, t)| t == text)
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "group message {text:?} did not arrive: {:?}",
            group_texts(home)
        )
    });
}

fn status(home: &Home) -> serde_json::Value {
    home.json(["status"])
        .pop()
        .expect("status prints an object")
}

/// `send --json` and its outcome (`delivered`, `stored`, `queued`), whatever the exit code.
fn send(home: &Home, to: &str, text: &str) -> String {
    let out = home.run(["--json", "send", to, text]);
    let lines = meshchat_tests::parse_json_lines(&String::from_utf8_lossy(&out.stdout));
    lines
        .iter()
        .find_map(|v| v.get("outcome").and_then(|o| o.as_str()).map(str::to_owned))
        .unwrap_or_else(|| {
            panic!(
                "send printed no outcome ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn wait_inbox(home: &Home, text: &str, limit: Duration) -> Vec<String> {
    eventually(limit, || {
        let m = inbox(home);
        m.iter().any(|t| t == text).then_some(m)
    })
    .unwrap_or_else(|| panic!("{text:?} did not arrive; inbox: {:?}", inbox(home)))
}

/// The connection `from` has to the node with peer ID `to`, from `status`.
fn connection(s: &serde_json::Value, to: &str) -> Option<serde_json::Value> {
    s["connected"]
        .as_array()?
        .iter()
        .find(|c| c["peer_id"] == to)
        .cloned()
}

#[test]
fn two_users_behind_nats_talk_through_a_home_server_and_collect_offline_mail() {
    let Some(upgraded) = nat_scenario("the NAT test", NatKind::PortPreserving) else {
        return;
    };
    eprintln!(
        "port-preserving NATs: hole punching {}",
        if upgraded {
            "upgraded the connection"
        } else {
            "did not upgrade the connection (messages went through the relay)"
        }
    );
}

#[test]
fn behind_symmetric_nats_the_conversation_stays_on_the_relay() {
    let Some(upgraded) = nat_scenario("the symmetric NAT test", NatKind::Symmetric) else {
        return;
    };
    // Random ports per connection: the addresses the server observed are useless to the
    // other side, so every message of this test went through the relay.
    assert!(
        !upgraded,
        "hole punching cannot work through symmetric NATs"
    );
}

/// Two users, each behind its own NAT of `kind`, talk through a home server and collect mail
/// sent while offline. Returns whether hole punching upgraded their connection (`None`: no
/// namespaces on this machine, skipped).
fn nat_scenario(test: &str, kind: NatKind) -> Option<bool> {
    let mut lab = Lab::new(test)?;
    let internet = lab.ns("inet");
    let srv = lab.ns("srv");
    let (nat_a, nat_b) = (lab.ns("nata"), lab.ns("natb"));
    let (ns_a, ns_b) = (lab.ns("a"), lab.ns("b"));
    lab.bridge(&internet, "br0");
    for (ns, port, ip) in [
        (&srv, "p-srv", "203.0.113.10/24"),
        (&nat_a, "p-nata", "203.0.113.2/24"),
        (&nat_b, "p-natb", "203.0.113.3/24"),
    ] {
        let ifname = if ns == &srv { "eth0" } else { "wan" };
        lab.link(ns, ifname, &internet, port);
        lab.attach(&internet, port, "br0");
        lab.addr(ns, ifname, ip);
    }
    for (router, user, net) in [(&nat_a, &ns_a, "1"), (&nat_b, &ns_b, "2")] {
        lab.link(router, "lan", user, "eth0");
        lab.addr(router, "lan", &format!("192.168.{net}.1/24"));
        lab.addr(user, "eth0", &format!("192.168.{net}.2/24"));
        lab.default_route(user, &format!("192.168.{net}.1"));
        lab.nat_router(router, "wan", "lan", kind);
    }

    // The home server, told its public address.
    let mut server = Home::new();
    server.init();
    server.enter(&srv);
    let hub = server.spawn_serve([
        "--external",
        "/ip4/203.0.113.10/tcp/4001",
        "--external",
        "/ip4/203.0.113.10/udp/4001/quic-v1",
    ]);
    let friends: Vec<String> = hub.banner["bootstrap_addrs"]
        .as_array()
        .expect("serve prints bootstrap_addrs")
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let boot_tcp = friends
        .iter()
        .find(|a| a.starts_with("/ip4/203.0.113.10/tcp/4001/p2p/"))
        .unwrap_or_else(|| panic!("the public TCP address is offered to friends: {friends:?}"))
        .clone();
    let boot_quic = friends
        .iter()
        .find(|a| a.starts_with("/ip4/203.0.113.10/udp/4001/quic-v1/p2p/"))
        .unwrap_or_else(|| panic!("the public QUIC address is offered to friends: {friends:?}"))
        .clone();

    let mut alice = Home::new();
    let alice_id = alice.init();
    alice.enter(&ns_a);
    let mut bob = Home::new();
    let bob_id = bob.init();
    bob.enter(&ns_b);
    let node_args = [
        "--bootstrap",
        boot_tcp.as_str(),
        "--bootstrap",
        boot_quic.as_str(),
        "--send-timeout",
        "8",
    ];
    let _alice_node = alice.spawn_run(node_args);
    let bob_node = bob.spawn_run(node_args);

    // Each reserves a slot on the server's relay; AutoNAT finds them unreachable.
    for (who, home) in [("alice", &alice), ("bob", &bob)] {
        let s = eventually(Duration::from_secs(45), || {
            let s = status(home);
            let reserved = s["relay_reservations"].as_array().is_some_and(|r| {
                r.iter().any(|a| {
                    a.as_str().is_some_and(|a| {
                        a.contains("203.0.113.10/tcp/4001/p2p/") && a.contains("/p2p-circuit/p2p/")
                    })
                })
            });
            (reserved && s["nat_status"] == "private").then_some(s)
        })
        .unwrap_or_else(|| {
            panic!(
                "{who} has no relay reservation or no verdict: {}",
                status(home)
            )
        });
        assert_eq!(s["nat_status"], "private", "{who}: {s}");
    }
    let hub_status = status(&server);
    assert_eq!(hub_status["nat_status"], "public", "{hub_status}");
    assert!(
        hub_status["relay_server"]["reservations"].as_u64() >= Some(2),
        "{hub_status}"
    );

    alice.ok(["contact", "add", "bob", &bob_id]);
    bob.ok(["contact", "add", "alice", &alice_id]);
    let bob_peer = status(&bob)["peer_id"]
        .as_str()
        .expect("peer id")
        .to_owned();

    // Messages both ways: through the relay, or directly once hole punching succeeded.
    let started = Instant::now();
    assert_eq!(send(&alice, "bob", "hello from behind a NAT"), "delivered");
    wait_inbox(&bob, "hello from behind a NAT", Duration::from_secs(20));
    let first = started.elapsed();
    assert_eq!(send(&bob, "alice", "hello back"), "delivered");
    wait_inbox(&alice, "hello back", Duration::from_secs(20));

    // DCUtR runs when the relayed connection opens: wait until it has upgraded the connection
    // or one side reports that it gave up (three attempts), then report.
    let outcome = eventually(Duration::from_secs(90), || {
        let s = status(&alice);
        let c = connection(&s, &bob_peer)?;
        if c["relayed"] == false {
            return Some(Some(c));
        }
        let failed = s["hole_punches_failed"].as_u64().unwrap_or(0)
            + status(&bob)["hole_punches_failed"].as_u64().unwrap_or(0);
        (failed > 0).then_some(None)
    });
    let upgraded = outcome.expect("hole punching ends, one way or the other, within 90 s");
    let s = status(&alice);
    let b_side = status(&bob);
    eprintln!(
        "{test} ({kind:?}): first message delivered in {first:?}; hole punching {} \
         (alice: {} succeeded / {} failed, bob: {} / {}); connection now: {}",
        if upgraded.is_some() {
            "upgraded the connection to a direct one"
        } else {
            "did not upgrade the connection; it stays relayed"
        },
        s["hole_punches_succeeded"],
        s["hole_punches_failed"],
        b_side["hole_punches_succeeded"],
        b_side["hole_punches_failed"],
        connection(&s, &bob_peer).map_or("none".into(), |c| c.to_string()),
    );
    match &upgraded {
        Some(c) => assert!(
            !c["addr"].as_str().unwrap_or("").contains("p2p-circuit"),
            "{c}"
        ),
        None => {
            let c = connection(&s, &bob_peer).expect("still connected through the relay");
            assert_eq!(c["relayed"], true, "{c}");
        }
    }
    assert_eq!(
        send(&alice, "bob", "after the upgrade, or not"),
        "delivered"
    );
    wait_inbox(&bob, "after the upgrade, or not", Duration::from_secs(20));

    // Bob goes offline; Alice's message waits in his mailbox on the home server.
    bob_node.kill();
    let outcome = send(&alice, "bob", "while you were away");
    assert_eq!(
        outcome, "stored",
        "stored on the home server's mailbox replica"
    );
    let held = status(&server)["mailbox_replicas_held"].as_u64();
    assert!(held >= Some(1), "the home server holds the mail: {held:?}");

    // Bob comes back (behind his NAT, no other change) and collects it.
    let _bob_node = bob.spawn_run(node_args);
    let got = wait_inbox(&bob, "while you were away", Duration::from_secs(60));
    assert_eq!(
        got.iter().filter(|t| *t == "while you were away").count(),
        1,
        "{got:?}"
    );
    drop(hub);
    Some(upgraded.is_some())
}

#[test]
fn a_lan_only_cluster_needs_no_bootstrap_and_collects_offline_mail() {
    let Some(mut lab) = Lab::new("the LAN test") else {
        return;
    };
    let lan = lab.ns("lan");
    lab.bridge(&lan, "br0");
    let mut homes = Vec::new();
    let mut ids = Vec::new();
    for i in 1..=3 {
        let ns = lab.ns(&format!("n{i}"));
        let port = format!("p{i}");
        lab.link(&ns, "eth0", &lan, &port);
        lab.attach(&lan, &port, "br0");
        lab.addr(&ns, "eth0", &format!("10.77.0.{i}/24"));
        let mut home = Home::new();
        ids.push(home.init());
        home.enter(&ns);
        homes.push(home);
    }
    // Two told `--lan-only`, the third just started with no peers at all: the same behaviour.
    let mut nodes: Vec<Option<Daemon>> = vec![
        Some(homes[0].spawn_run(["--lan-only", "--send-timeout", "5"])),
        Some(homes[1].spawn_run(["--lan-only", "--send-timeout", "5"])),
        Some(homes[2].spawn_run(["--send-timeout", "5"])),
    ];
    for (i, home) in homes.iter().enumerate() {
        let s = eventually(Duration::from_secs(30), || {
            let s = status(home);
            (s["connected"].as_array().map(Vec::len) >= Some(2)
                && s["routing_table_size"].as_u64() >= Some(2))
            .then_some(s)
        })
        .unwrap_or_else(|| panic!("n{} did not find the others: {}", i + 1, status(home)));
        assert_eq!(s["lan_only"], true, "n{}: {s}", i + 1);
        assert_eq!(s["mdns"], true, "n{}: {s}", i + 1);
    }

    let names = ["n1", "n2", "n3"];
    for (i, home) in homes.iter().enumerate() {
        for (j, id) in ids.iter().enumerate() {
            if i != j {
                home.ok(["contact", "add", names[j], id]);
            }
        }
    }
    assert_eq!(send(&homes[0], "n2", "hello over the LAN"), "delivered");
    wait_inbox(&homes[1], "hello over the LAN", Duration::from_secs(20));
    assert_eq!(send(&homes[2], "n1", "and from the third"), "delivered");
    wait_inbox(&homes[0], "and from the third", Duration::from_secs(20));

    // A group among the three, over gossipsub on the LAN.
    let created = homes[0].json(["group", "create", "lan party"]);
    assert_eq!(created.last().expect("create answers")["name"], "lan party");
    for who in ["n2", "n3"] {
        homes[0].ok(["group", "invite", "lan party", who]);
    }
    for home in &homes[1..] {
        let code = eventually(Duration::from_secs(30), || {
            home.json(["group", "invites"])
                .first()
                .and_then(|i| i["code"].as_str().map(str::to_owned))
        })
        .expect("an invite arrives over the LAN");
        let joined = home.json(["group", "join", &code]);
        assert_eq!(joined.last().expect("join answers")["name"], "lan party");
    }
    homes[0].json(["group", "send", "lan party", "welcome to the LAN party"]);
    for home in &homes[1..] {
        wait_group_text(home, "welcome to the LAN party", Duration::from_secs(30));
    }
    homes[1].json(["group", "send", "lan party", "thanks from n2"]);
    for home in [&homes[0], &homes[2]] {
        wait_group_text(home, "thanks from n2", Duration::from_secs(30));
    }

    // n3 goes off; mail for it waits on the others; it collects when it returns, and catches
    // up with the group.
    if let Some(n) = nodes[2].take() {
        n.kill();
    }
    let outcome = send(&homes[0], "n3", "kept for you on the LAN");
    assert_eq!(outcome, "stored", "stored on a LAN peer's mailbox replica");
    homes[1].json(["group", "send", "lan party", "said while n3 was off"]);
    nodes[2] = Some(homes[2].spawn_run(["--send-timeout", "5"]));
    wait_inbox(
        &homes[2],
        "kept for you on the LAN",
        Duration::from_secs(60),
    );
    wait_group_text(&homes[2], "said while n3 was off", Duration::from_secs(60));
    drop(nodes);
}
