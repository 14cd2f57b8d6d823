//! `meshchat chat` in a real terminal: tmux runs it in an 80×24 pane, the test types a line,
//! the other side's node receives it, and the screen shows it delivered; a message from the
//! other side appears on the screen as it arrives; Esc quits. See `docs/cli.md`, "chat".

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use meshchat_tests::{eventually, meshchat_bin, Home};

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

#[test]
fn chat_in_an_80x24_terminal_sends_receives_and_shows_delivery() {
    let alice = Home::new();
    let alice_id = alice.init();
    let bob = Home::new();
    let bob_id = bob.init();
    let alice_node = alice.spawn_run(["--listen", "/ip4/127.0.0.1/tcp/0", "--dht-server"]);
    let _bob_node = bob.spawn_run([
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--bootstrap",
        &alice_node.tcp_addr(),
    ]);
    alice.ok(["contact", "add", "bob", &bob_id]);
    bob.ok(["contact", "add", "alice", &alice_id]);
    let first = bob.json(["send", "alice", "before the chat"]);
    assert_eq!(first[0]["outcome"], "delivered", "{first:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    let tmux = Tmux::new(dir.path());
    let command = format!(
        "'{}' --home '{}' chat bob",
        meshchat_bin().display(),
        alice.path().display()
    );
    let o = tmux.cmd(&[
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

    // The header names the peer and its verification; the history is there; peers counted.
    let s = tmux.wait_for("the conversation", |s| {
        s.contains("Chat with bob") && s.contains("bob: before the chat") && s.contains("connected")
    });
    assert!(s.contains("not verified"), "{s}");
    let lines: Vec<&str> = s.lines().collect();
    assert!(lines.len() <= 24, "{s}");
    assert!(lines.iter().all(|l| l.chars().count() <= 80), "{s}");
    assert!(
        lines.last().is_some_and(|l| l.contains("Esc quit")),
        "the status line is the last one: {s}"
    );

    // Type a line: bob's node receives it, and the screen says it was delivered.
    let o = tmux.cmd(&[
        "send-keys",
        "-t",
        "chat",
        "hello from the terminal",
        "Enter",
    ]);
    assert!(o.status.success());
    eventually(Duration::from_secs(30), || {
        inbox_texts(&bob)
            .iter()
            .any(|t| t == "hello from the terminal")
            .then_some(())
    })
    .expect("bob receives the line typed in the chat");
    tmux.wait_for("the message delivered", |s| {
        s.contains("you: hello from the terminal · delivered")
    });

    // Bob answers: the answer appears while the chat runs.
    bob.ok(["send", "alice", "answer from bob"]);
    let s = tmux.wait_for("bob's answer", |s| s.contains("bob: answer from bob"));
    let order: Vec<usize> = [
        "before the chat",
        "hello from the terminal",
        "answer from bob",
    ]
    .iter()
    .map(|t| s.find(t).expect("shown"))
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "in order: {s}");

    // Esc quits; alice's node keeps running.
    tmux.cmd(&["send-keys", "-t", "chat", "Escape"]);
    eventually(Duration::from_secs(10), || {
        (!tmux.cmd(&["has-session", "-t", "chat"]).status.success()).then_some(())
    })
    .expect("the chat ends on Esc");
    assert!(!alice.json(["status"]).is_empty());
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
    let o = tmux.cmd(&[
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
