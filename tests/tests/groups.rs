//! End-to-end: group channels through the `meshchat group …` commands of real processes, each
//! with its own home and RocksDB, on loopback: create, invite over 1:1, join by code, messages
//! shown in `inbox` with their group, members, remove, and the mistakes' sentences and exit
//! codes. See `docs/cli.md`, "group".

use std::time::Duration;

use meshchat_tests::{eventually, Daemon, Home};

struct User {
    home: Home,
    id: String,
    _node: Daemon,
}

impl User {
    fn new(bootstrap: &str) -> User {
        let home = Home::new();
        let id = home.init();
        let node = home.spawn_run(["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", bootstrap]);
        User {
            home,
            id,
            _node: node,
        }
    }

    /// Group messages in `inbox --json`.
    fn group_texts(&self) -> Vec<(String, String)> {
        self.home
            .json(["inbox"])
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

    /// Wait for an invite and join it; returns the joined group's JSON.
    fn join_first_invite(&self) -> serde_json::Value {
        let code = eventually(Duration::from_secs(30), || {
            self.home
                .json(["group", "invites"])
                .first()
                .and_then(|i| i["code"].as_str().map(str::to_owned))
        })
        .expect("an invite arrives");
        let joined = self.home.json(["group", "join", &code]);
        joined.last().cloned().expect("join answers")
    }
}

fn hub() -> (Home, Daemon, String) {
    let home = Home::new();
    home.init();
    let node = home.spawn_run(["--listen", "/ip4/127.0.0.1/tcp/0", "--dht-server"]);
    let boot = node.tcp_addr();
    (home, node, boot)
}

#[test]
fn three_users_talk_in_a_group_and_a_removed_member_reads_nothing_after() {
    let (_hub_home, _hub, boot) = hub();
    let alice = User::new(&boot);
    let bob = User::new(&boot);
    let carol = User::new(&boot);
    for (u, others) in [
        (&alice, [("bob", &bob), ("carol", &carol)]),
        (&bob, [("alice", &alice), ("carol", &carol)]),
        (&carol, [("alice", &alice), ("bob", &bob)]),
    ] {
        for (name, other) in others {
            u.home.ok(["contact", "add", name, &other.id]);
        }
    }

    let created = alice.home.json(["group", "create", "book club"]);
    let group = created.last().expect("create answers").clone();
    assert_eq!(group["name"], "book club");
    assert_eq!(group["role"], "admin");
    assert_eq!(group["members"], 1);
    let id = group["id"].as_str().expect("id").to_owned();
    assert_eq!(id.len(), 64, "{group}");
    let topic = group["topic"].as_str().expect("topic");
    assert!(
        !topic.contains("book") && !topic.contains(&id),
        "the topic reveals neither the name nor the id: {topic}"
    );

    for who in ["bob", "carol"] {
        let invite = alice.home.json(["group", "invite", "book club", who]);
        let invite = invite.last().expect("invite answers");
        assert_eq!(invite["group_name"], "book club", "{invite}");
    }
    for u in [&bob, &carol] {
        let joined = u.join_first_invite();
        assert_eq!(joined["id"], id.as_str(), "{joined}");
        // The invite's snapshot: Bob's was made before Carol was added.
        assert!(joined["members"].as_u64() >= Some(2), "{joined}");
        assert_eq!(joined["role"], "member");
    }
    for u in [&bob, &carol] {
        eventually(Duration::from_secs(30), || {
            (u.home.json(["group", "members", &id]).len() == 3).then_some(())
        })
        .expect("every member learns the whole membership");
    }

    // A message from Alice reaches both, shown in the inbox with the group's name.
    let sent = alice
        .home
        .json(["group", "send", "book club", "chapter 3 tonight?"]);
    let sent = sent.last().expect("send answers");
    assert_ne!(sent["outcome"], "queued", "{sent}");
    for u in [&bob, &carol] {
        let got = eventually(Duration::from_secs(30), || {
            let t = u.group_texts();
            (!t.is_empty()).then_some(t)
        })
        .expect("the group message arrives");
        assert_eq!(
            got,
            [("book club".to_owned(), "chapter 3 tonight?".to_owned())]
        );
    }
    // Bob answers by an id prefix.
    bob.home.json(["group", "send", &id[..12], "yes, 8pm"]);
    for u in [&alice, &carol] {
        eventually(Duration::from_secs(30), || {
            u.group_texts()
                .iter()
                .any(|(_, t)| t == "yes, 8pm")
                .then_some(())
        })
        .expect("bob's reply arrives");
    }

    let members = alice.home.json(["group", "members", "book club"]);
    assert_eq!(members.len(), 3, "{members:?}");
    assert_eq!(members.iter().filter(|m| m["is_me"] == true).count(), 1);
    assert_eq!(
        members.iter().filter(|m| m["role"] == "admin").count(),
        1,
        "{members:?}"
    );

    // Carol is removed; what Alice sends afterwards reaches Bob and not Carol.
    alice.home.ok(["group", "remove", "book club", "carol"]);
    let members = eventually(Duration::from_secs(30), || {
        let m = bob.home.json(["group", "members", &id]);
        (m.len() == 2).then_some(m)
    })
    .expect("bob applies the removal");
    assert!(members.iter().all(|m| m["user_id"] != carol.id.as_str()));
    alice
        .home
        .json(["group", "send", "book club", "after carol left"]);
    eventually(Duration::from_secs(30), || {
        bob.group_texts()
            .iter()
            .any(|(_, t)| t == "after carol left")
            .then_some(())
    })
    .expect("bob still receives");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !carol
            .group_texts()
            .iter()
            .any(|(_, t)| t == "after carol left"),
        "the removed member cannot read what follows"
    );
}

#[test]
fn group_mistakes_get_one_sentence_and_an_exit_code() {
    let home = Home::new();
    home.init();
    for (args, code, words) in [
        (vec!["group", "send", "nosuchgroup", "hi"], 4, "no group"),
        (vec!["group", "join", "0123456789abcdef"], 4, "invite"),
        (vec!["group", "join", "not-a-code"], 2, "code"),
        (vec!["group", "create", ""], 2, "name"),
        (vec!["group", "members", "nosuchgroup"], 4, "no group"),
    ] {
        let out = home.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: exit code; stderr: {stderr}"
        );
        let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(error_lines.len(), 1, "{args:?}: one sentence: {stderr}");
        assert!(
            error_lines[0].to_lowercase().contains(words),
            "{args:?}: {stderr}"
        );
    }
}
