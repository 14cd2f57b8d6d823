//! The `meshchat` binary, black box: the commands that need no network, their output, and the
//! exit codes of user mistakes.

use std::{
    io::Write,
    path::Path,
    process::{Command, Output, Stdio},
};

fn meshchat(home: &Path, args: &[&str]) -> Output {
    meshchat_stdin(home, args, "")
}

fn meshchat_stdin(home: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshchat"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("MESHCHAT_HOME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs the binary");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("writes stdin");
    child.wait_with_output().expect("waits")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stdout line is JSON"))
        .collect()
}

const BOB: &str = "mc1";

fn other_user_id(dir: &Path) -> String {
    let home = dir.join("other");
    let o = meshchat(&home, &["--json", "init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    json_lines(&o)[0]["user_id"]
        .as_str()
        .expect("user_id")
        .to_owned()
}

#[test]
fn init_prints_id_and_phrase_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    let o = meshchat(&home, &["init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("Your user ID: mc1"), "{text}");
    assert!(text.contains("24."), "{text}");
    assert!(text.contains("Write these 24 words down"), "{text}");

    let id = meshchat(&home, &["id"]);
    assert!(id.status.success());
    let user_id = stdout(&id).trim().to_owned();
    assert!(user_id.starts_with(BOB) && user_id.len() == 61, "{user_id}");
    assert!(text.contains(&user_id));

    let again = meshchat(&home, &["init"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("refusing to overwrite"),
        "{}",
        stderr(&again)
    );
    assert_eq!(stdout(&meshchat(&home, &["id"])).trim(), user_id);
}

#[test]
fn restore_from_the_phrase_gives_the_same_user_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = meshchat(&dir.path().join("a"), &["--json", "init"]);
    let v = &json_lines(&o)[0];
    let phrase = v["recovery_phrase"].as_str().expect("phrase");
    let restored = meshchat_stdin(
        &dir.path().join("b"),
        &["--json", "init", "--restore"],
        phrase,
    );
    assert!(restored.status.success(), "{}", stderr(&restored));
    assert_eq!(json_lines(&restored)[0]["user_id"], v["user_id"]);
    assert_eq!(
        json_lines(&restored)[0]["recovery_phrase"],
        serde_json::Value::Null
    );

    let bad = meshchat_stdin(
        &dir.path().join("c"),
        &["init", "--restore"],
        "abandon abandon",
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("24"), "{}", stderr(&bad));
}

#[test]
fn no_identity_is_exit_3_with_one_sentence_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("nothing");
    for args in [
        &["id"][..],
        &["contact", "list"],
        &["inbox"],
        &["send", "bob", "hi"],
    ] {
        let o = meshchat(&home, args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("run `meshchat init` first"),
            "{}",
            stderr(&o)
        );
    }
    assert!(!home.exists());
}

#[test]
fn contacts_add_list_remove_and_their_mistakes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    assert!(meshchat(&home, &["init"]).status.success());
    let bob = other_user_id(dir.path());

    let o = meshchat(&home, &["contact", "add", "bob", &bob]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Added bob"));

    let list = meshchat(&home, &["--json", "contact", "list"]);
    let lines = json_lines(&list);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["name"], "bob");
    assert_eq!(lines[0]["user_id"], bob.as_str());
    assert_eq!(lines[0]["verified"], false);

    // A typo in the user ID: exit 2, the parser's sentence.
    let mut typo: Vec<char> = bob.chars().collect();
    typo[20] = if typo[20] == 'q' { 'p' } else { 'q' };
    let typo: String = typo.into_iter().collect();
    let o = meshchat(&home, &["contact", "add", "carol", &typo]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a valid user ID"), "{}", stderr(&o));

    // Same person twice.
    let o = meshchat(&home, &["contact", "add", "robert", &bob]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("already a contact, named `bob`"),
        "{}",
        stderr(&o)
    );

    // Verify with --yes shows the 60-digit safety number.
    let o = meshchat(&home, &["--json", "contact", "verify", "bob", "--yes"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = &json_lines(&o)[0];
    assert_eq!(v["verified"], true);
    assert_eq!(
        v["safety_number"]
            .as_str()
            .expect("digits")
            .replace(' ', "")
            .len(),
        60
    );

    // Unknown contact: exit 4, also as JSON on stdout.
    let o = meshchat(&home, &["--json", "contact", "remove", "nobody"]);
    assert_eq!(o.status.code(), Some(4));
    assert_eq!(json_lines(&o)[0]["error"], "not_found");

    assert!(meshchat(&home, &["contact", "remove", "bob"])
        .status
        .success());
    assert!(json_lines(&meshchat(&home, &["--json", "contact", "list"])).is_empty());
}

#[test]
fn bad_multiaddr_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    assert!(meshchat(&home, &["init"]).status.success());
    let o = meshchat(&home, &["run", "--bootstrap", "not-an-address"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a multiaddr"), "{}", stderr(&o));
}

#[test]
fn inbox_of_a_new_home_is_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    assert!(meshchat(&home, &["init"]).status.success());
    let o = meshchat(&home, &["--json", "inbox"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(json_lines(&o).is_empty());
}

/// A `meshchat run` in the background, stopped with SIGINT (Ctrl-C) when dropped.
struct Running {
    child: std::process::Child,
    addr: String,
}

impl Running {
    fn start(home: &Path, extra: &[&str]) -> Running {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshchat"))
            .arg("--home")
            .arg(home)
            .args(["--json", "run", "--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starts the node");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("reads the banner");
        let banner: serde_json::Value = serde_json::from_str(&line).expect("JSON banner");
        assert_eq!(banner["event"], "listening");
        let addr = banner["listen_addrs"][0]
            .as_str()
            .expect("an address")
            .to_owned();
        assert!(addr.contains("/p2p/12D3KooW"), "{addr}");
        Running { child, addr }
    }

    fn interrupt(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let status = self.child.wait().expect("waits");
        status.code()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn two_running_nodes_exchange_a_message_through_their_control_sockets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for h in [&a, &b] {
        assert!(meshchat(h, &["init"]).status.success());
    }
    let a_id = stdout(&meshchat(&a, &["id"])).trim().to_owned();
    let b_id = stdout(&meshchat(&b, &["id"])).trim().to_owned();
    let node_a = Running::start(&a, &["--lan-only"]);
    let node_b = Running::start(&b, &["--bootstrap", &node_a.addr]);

    // The home is locked by the running node.
    let second = meshchat(&a, &["run"]);
    assert_eq!(second.status.code(), Some(6));
    assert!(
        stderr(&second).contains("is already running on"),
        "{}",
        stderr(&second)
    );

    // Contacts on both sides (added through the running nodes): each publishes a presence
    // record that only the other can find and read.
    assert!(meshchat(&a, &["contact", "add", "bob", &b_id])
        .status
        .success());
    assert!(meshchat(&b, &["contact", "add", "alice", &a_id])
        .status
        .success());
    let sent = meshchat(&b, &["--json", "send", "alice", "hello over the mesh"]);
    assert!(sent.status.success(), "{}{}", stdout(&sent), stderr(&sent));
    assert_eq!(json_lines(&sent)[0]["outcome"], "delivered");

    let inbox = meshchat(&a, &["--json", "inbox", "--wait", "10"]);
    assert!(inbox.status.success(), "{}", stderr(&inbox));
    let msgs = json_lines(&inbox);
    assert_eq!(
        msgs.last().expect("a message")["text"],
        "hello over the mesh"
    );

    let status = meshchat(&a, &["--json", "status"]);
    let s = &json_lines(&status)[0];
    assert!(!s["connected"].as_array().expect("list").is_empty(), "{s}");
    assert_eq!(s["listen_addrs"][0], node_a.addr.as_str());

    // Ctrl-C stops cleanly: exit 0 and the control socket is gone.
    assert_eq!(node_b.interrupt(), Some(0));
    assert_eq!(node_a.interrupt(), Some(0));
    assert!(!a.join("control.sock").exists());
}

#[test]
fn verify_asks_and_marks_only_on_yes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    assert!(meshchat(&home, &["init"]).status.success());
    let bob = other_user_id(dir.path());
    assert!(meshchat(&home, &["contact", "add", "bob", &bob])
        .status
        .success());
    let verified = |home: &Path| {
        json_lines(&meshchat(home, &["--json", "contact", "list"]))[0]["verified"].clone()
    };

    let no = meshchat_stdin(&home, &["contact", "verify", "bob"], "n\n");
    assert!(no.status.success(), "{}", stderr(&no));
    assert!(
        stdout(&no).contains("Not marked as verified."),
        "{}",
        stdout(&no)
    );
    assert_eq!(verified(&home), false);

    // --json without a terminal and without --yes: the number, not marked.
    let o = meshchat(&home, &["--json", "contact", "verify", "bob"]);
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 1, "only JSON on stdout: {}", stdout(&o));
    assert_eq!(lines[0]["verified"], false);
    assert_eq!(verified(&home), false);

    let yes = meshchat_stdin(&home, &["contact", "verify", "bob"], "y\n");
    assert!(
        stdout(&yes).contains("bob is marked as verified."),
        "{}",
        stdout(&yes)
    );
    assert_eq!(verified(&home), true);
}
