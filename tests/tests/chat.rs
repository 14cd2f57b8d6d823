//! `meshchat chat` in a real terminal, driven as a person would: tmux runs it in an 80×24 pane,
//! the test types a line, the other side's node receives it, and the screen shows it delivered,
//! then read once the other side has seen it; a message from the other side appears as it
//! arrives; the history of both directions is there when the chat is opened again; without a
//! `TO` the conversation list shows the contact with its unread count, Enter opens it and Esc
//! goes back. Also the progress of a command that starts its own node and collects mail. See
//! `docs/cli.md`, sections "chat" and "Progress".

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use meshchat_tests::{eventually, meshchat_bin, Daemon, Home};

/// A private tmux server (its own socket), killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn new(dir: &Path) -> Tmux {
        let ok = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "this test needs tmux (apt-get install tmux)");
        Tmux {
            socket: dir.join("tmux.sock"),
        }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "chat"]).stdout)
            .into_owned()
    }

    /// Run `meshchat --home HOME ARGS…` in a new 80×24 session named `chat`.
    fn start(&self, home: &Home, args: &str) {
        let command = format!(
            "'{}' --home '{}' {args}",
            meshchat_bin().display(),
            home.path().display()
        );
        let o = self.cmd(&[
            "new-session",
            "-d",
            "-x",
            "80",
            "-y",
            "24",
            "-s",
            "chat",
            &command,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "chat"];
        args.extend_from_slice(keys);
        assert!(self.cmd(&args).status.success());
    }

    /// Wait until the session has ended (the program quit).
    fn wait_ended(&self, what: &str) {
        eventually(Duration::from_secs(10), || {
            (!self.cmd(&["has-session", "-t", "chat"]).status.success()).then_some(())
        })
        .unwrap_or_else(|| panic!("{what}:\n{}", self.screen()));
    }

    fn wait_for(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        eventually(Duration::from_secs(30), || {
            let s = self.screen();
            f(&s).then_some(s)
        })
        .unwrap_or_else(|| panic!("the screen never showed {what}:\n{}", self.screen()))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

fn inbox_texts(home: &Home) -> Vec<String> {
    home.json(["inbox"])
        .iter()
        .filter_map(|m| m.get("text").and_then(|t| t.as_str()).map(str::to_owned))
        .collect()
}

/// Two users, each with a running node (alice's is the bootstrap), contacts both ways.
fn two_users() -> (Home, Home, Daemon, Daemon) {
    let alice = Home::new();
    let alice_id = alice.init();
    let bob = Home::new();
    let bob_id = bob.init();
    let alice_node = alice.spawn_run(["--listen", "/ip4/127.0.0.1/tcp/0", "--dht-server"]);
    let bob_node = bob.spawn_run([
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &alice_node.tcp_addr(),
    ]);
    alice.ok(["contact", "add", "bob", &bob_id]);
    bob.ok(["contact", "add", "alice", &alice_id]);
    (alice, bob, alice_node, bob_node)
}

/// Where each of `texts` is on the screen; fails unless they are all there, in this order.
fn assert_in_order(screen: &str, texts: &[&str]) {
    let at: Vec<usize> = texts
        .iter()
        .map(|t| {
            screen
                .find(t)
                .unwrap_or_else(|| panic!("`{t}` is not on the screen:\n{screen}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "in order: {screen}");
}

fn assert_fits_80x24(s: &str) {
    let lines: Vec<&str> = s.lines().collect();
    assert!(lines.len() <= 24, "{s}");
    assert!(lines.iter().all(|l| l.chars().count() <= 80), "{s}");
}

#[test]
fn chat_in_an_80x24_terminal_sends_receives_and_shows_delivery() {
    let (alice, bob, _alice_node, _bob_node) = two_users();
    let first = bob.json(["send", "alice", "before the chat"]);
    assert_eq!(first[0]["outcome"], "delivered", "{first:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let tmux = Tmux::new(dir.path());
    tmux.start(&alice, "chat bob");

    // The header names the peer and its verification; the history is there; the status line
    // counts the peers and says how they are connected.
    let s = tmux.wait_for("the conversation", |s| {
        s.contains("Chat with bob") && s.contains("bob: before the chat") && s.contains("connected")
    });
    assert!(s.contains("not verified"), "{s}");
    assert_fits_80x24(&s);
    let last = s.lines().last().unwrap_or_default();
    assert!(
        last.contains("Esc quit"),
        "the status line is the last one: {s}"
    );
    let s = tmux.wait_for("the connection's kind", |s| {
        s.lines()
            .last()
            .is_some_and(|l| l.contains("1 peer connected, direct") && l.contains("NAT"))
    });
    assert_fits_80x24(&s);

    // Type a line: bob's node receives it, and the screen says it was delivered.
    tmux.keys(&["hello from the terminal", "Enter"]);
    tmux.wait_for("the message delivered (or already read)", |s| {
        s.contains("you: hello from the terminal · delivered")
            || s.contains("you: hello from the terminal · read")
    });
    // Bob reads it (`inbox` shows it and marks it read): the screen says so, live.
    eventually(Duration::from_secs(30), || {
        inbox_texts(&bob)
            .iter()
            .any(|t| t == "hello from the terminal")
            .then_some(())
    })
    .expect("bob receives the line typed in the chat");
    tmux.wait_for("the message read", |s| {
        s.contains("you: hello from the terminal · read")
    });

    // Bob answers: the answer appears while the chat runs.
    bob.ok(["send", "alice", "answer from bob"]);
    let s = tmux.wait_for("bob's answer", |s| s.contains("bob: answer from bob"));
    assert_in_order(
        &s,
        &[
            "before the chat",
            "hello from the terminal",
            "answer from bob",
        ],
    );

    // Esc quits; alice's node keeps running.
    tmux.keys(&["Escape"]);
    tmux.wait_ended("the chat ends on Esc");
    assert!(!alice.json(["status"]).is_empty());

    // Opened again, the chat shows the history of both directions, ours with its status.
    tmux.start(&alice, "chat bob");
    let s = tmux.wait_for("the history", |s| s.contains("bob: answer from bob"));
    assert_in_order(
        &s,
        &[
            "bob: before the chat",
            "you: hello from the terminal · read",
            "bob: answer from bob",
        ],
    );
    assert_fits_80x24(&s);
    tmux.keys(&["C-c"]);
    tmux.wait_ended("the chat ends on Ctrl-C");
}

#[test]
fn the_conversation_list_shows_unread_mail_and_opens_the_conversation() {
    let (alice, bob, _alice_node, _bob_node) = two_users();
    bob.ok(["send", "alice", "are you there?"]);
    bob.ok(["send", "alice", "hello?"]);

    let dir = tempfile::tempdir().expect("tempdir");
    let tmux = Tmux::new(dir.path());
    tmux.start(&alice, "chat");
    let s = tmux.wait_for("the conversation list", |s| {
        s.contains("Conversations")
            && s.lines()
                .any(|l| l.contains("bob") && l.contains("2 unread"))
    });
    let row = s
        .lines()
        .find(|l| l.contains("bob"))
        .expect("bob's row")
        .to_owned();
    assert!(row.starts_with("> "), "bob's row is chosen: {s}");
    assert!(row.contains("hello?"), "the last message's start: {row}");
    assert!(
        s.lines().last().is_some_and(|l| l.contains("Enter open")),
        "{s}"
    );
    assert_fits_80x24(&s);

    // Enter opens the conversation; what it shows is read now (bob's side learns it too).
    tmux.keys(&["Enter"]);
    let s = tmux.wait_for("the conversation", |s| {
        s.contains("Chat with bob") && s.contains("bob: hello?")
    });
    assert_in_order(&s, &["bob: are you there?", "bob: hello?"]);
    assert!(
        s.lines().last().is_some_and(|l| l.contains("Esc back")),
        "{s}"
    );
    tmux.keys(&["yes, here", "Enter"]);
    eventually(Duration::from_secs(30), || {
        inbox_texts(&bob)
            .iter()
            .any(|t| t == "yes, here")
            .then_some(())
    })
    .expect("bob receives the answer");
    // Bob's chat shows his messages read: the read receipts went out when alice's screen
    // showed them.
    let bob_dir = tempfile::tempdir().expect("tempdir");
    let bob_tmux = Tmux::new(bob_dir.path());
    bob_tmux.start(&bob, "chat alice");
    let s = bob_tmux.wait_for("bob's messages read", |s| {
        s.contains("you: are you there? · read") && s.contains("you: hello? · read")
    });
    assert!(s.contains("alice: yes, here"), "{s}");
    bob_tmux.keys(&["Escape"]);
    bob_tmux.wait_ended("bob's chat ends on Esc");

    // Esc goes back to the list: nothing unread any more, the last message is ours.
    tmux.keys(&["Escape"]);
    let s = tmux.wait_for("the list again, read", |s| {
        s.contains("Conversations")
            && s.lines()
                .any(|l| l.contains("bob") && l.contains("you: yes, here") && !l.contains("unread"))
    });
    assert_fits_80x24(&s);
    // And Esc on the list quits.
    tmux.keys(&["Escape"]);
    tmux.wait_ended("Esc on the list quits");
}

/// A group is in the list too: its unread count, opened with Enter, each author named, and a
/// line typed there reaches the members.
#[test]
fn a_group_conversation_opens_from_the_list() {
    let (alice, bob, _alice_node, _bob_node) = two_users();
    alice.ok(["group", "create", "weekend"]);
    alice.ok(["group", "invite", "weekend", "bob"]);
    let code = eventually(Duration::from_secs(30), || {
        bob.json(["group", "invites"])
            .first()
            .and_then(|i| i["code"].as_str().map(str::to_owned))
    })
    .expect("the invite arrives");
    bob.ok(["group", "join", &code]);
    bob.ok(["group", "send", "weekend", "who brings the tent?"]);
    let group_texts = |home: &Home| -> Vec<String> {
        home.json(["inbox"])
            .into_iter()
            .filter(|m| !m["group_id"].is_null())
            .filter_map(|m| m["text"].as_str().map(str::to_owned))
            .collect()
    };
    // Wait for it without reading it (`inbox` would mark it read): the list counts it.
    let dir = tempfile::tempdir().expect("tempdir");
    let tmux = Tmux::new(dir.path());
    tmux.start(&alice, "chat");
    let s = tmux.wait_for("the group in the list", |s| {
        s.lines()
            .any(|l| l.contains("#weekend") && l.contains("1 unread") && l.contains("tent"))
    });
    assert_fits_80x24(&s);
    // Choose it (wherever it is) and open it.
    let rows: Vec<&str> = s.lines().skip(1).collect();
    let at = rows
        .iter()
        .position(|l| l.contains("#weekend"))
        .expect("the group's row");
    let chosen = rows
        .iter()
        .position(|l| l.starts_with("> "))
        .expect("a chosen row");
    for _ in chosen..at {
        tmux.keys(&["Down"]);
    }
    for _ in at..chosen {
        tmux.keys(&["Up"]);
    }
    tmux.keys(&["Enter"]);
    let s = tmux.wait_for("the group conversation", |s| {
        s.contains("Group weekend · 2 members") && s.contains("bob: who brings the tent?")
    });
    assert_fits_80x24(&s);
    tmux.keys(&["me, and the stove", "Enter"]);
    tmux.wait_for("the line sent to the group", |s| {
        s.contains("you: me, and the stove · sent") || s.contains("you: me, and the stove · stored")
    });
    eventually(Duration::from_secs(30), || {
        group_texts(&bob)
            .iter()
            .any(|t| t == "me, and the stove")
            .then_some(())
    })
    .expect("bob receives the line typed in the group");
    tmux.keys(&["Escape"]);
    tmux.wait_for("the list, read", |s| {
        s.lines()
            .any(|l| l.contains("#weekend") && !l.contains("unread") && l.contains("you: me"))
    });
    tmux.keys(&["Escape"]);
    tmux.wait_ended("Esc on the list quits");
}

/// A command that starts its own node collects the mail waiting for it on the mailbox replicas
/// and says so; quiet with `-q` and `--json`.
#[test]
fn a_node_started_for_a_command_collects_mail_with_progress() {
    let (_alice, bob, alice_node, _bob_node) = two_users();
    let carol = Home::new();
    let carol_id = carol.init();
    // Carol is online once (her prekeys are published), then goes away.
    let carol_node = carol.spawn_run([
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &alice_node.tcp_addr(),
    ]);
    bob.ok(["contact", "add", "carol", &carol_id]);
    let hello = bob.json(["send", "carol", "hello carol"]);
    assert!(
        hello[0]["outcome"] == "delivered" || hello[0]["outcome"] == "stored",
        "{hello:?}"
    );
    carol_node.kill();
    let away = bob.json(["send", "carol", "while you were away"]);
    assert_eq!(away[0]["outcome"], "stored", "{away:?}");

    let inbox = |args: &[&str]| {
        let mut cmd = carol.command(args);
        cmd.env("MESHCHAT_LISTEN", "/ip4/127.0.0.1/tcp/0")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let child = cmd.spawn().expect("spawn meshchat");
        meshchat_tests::wait_with_timeout(child, Duration::from_secs(120))
    };
    let o = inbox(&["inbox", "--wait", "10"]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("while you were away"),
        "stdout: {out}\nstderr: {err}"
    );
    assert!(err.contains("Collecting mail…"), "{err}");
    assert!(
        err.lines()
            .any(|l| l.ends_with("new message.") || l.ends_with("new messages.")),
        "the result of the collection: {err}"
    );
    for quiet in [
        &["-q", "inbox", "--wait", "1"][..],
        &["--json", "inbox", "--wait", "1"],
    ] {
        let o = inbox(quiet);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("Collecting mail"), "{quiet:?}: {err}");
    }
}

/// On a terminal a wait is a spinner that is cleared when it ends; the outcome line stays.
#[test]
fn progress_on_a_terminal_is_a_spinner_that_clears() {
    let home = Home::new();
    home.init();
    let dir = tempfile::tempdir().expect("tempdir");
    let tmux = Tmux::new(dir.path());
    let command = format!(
        "'{}' --home '{}' status; sleep 60",
        meshchat_bin().display(),
        home.path().display()
    );
    // Tall enough that the whole status stays on the screen below the progress lines.
    let o = tmux.cmd(&[
        "new-session",
        "-d",
        "-x",
        "80",
        "-y",
        "60",
        "-s",
        "chat",
        &command,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = tmux.wait_for("a spinner", |s| {
        s.lines().any(|l| {
            l.contains("Connecting to the network…")
                && l.chars()
                    .next()
                    .is_some_and(|c| ('\u{2800}'..='\u{28FF}').contains(&c))
        })
    });
    assert!(s.contains("Connecting"), "{s}");
    let s = tmux.wait_for("the status", |s| s.contains("peer ID:"));
    assert!(s.contains("No peer reached yet; continuing anyway."), "{s}");
    assert!(
        !s.contains("Connecting to the network…"),
        "the spinner is cleared: {s}"
    );
}
