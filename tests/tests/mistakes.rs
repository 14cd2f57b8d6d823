//! A user's mistakes, driven through the real `meshchat` binary: each one gets one clear sentence
//! (checked by a stable fragment of it) and its own exit code, in human mode (`error: …` on
//! stderr) and in `--json` mode (`{"error": KIND, "message": …}` on stdout), as `docs/cli.md`,
//! "The sentences for a user's mistakes", promises.

use std::{process::Output, time::Duration};

use meshchat_tests::{parse_json_lines, Home};

/// One mistake and what the user must see.
struct Case<'a> {
    what: &'static str,
    home: &'a Home,
    args: Vec<String>,
    stdin: Option<String>,
    code: i32,
    kind: &'static str,
    fragment: String,
}

fn case<'a>(
    what: &'static str,
    home: &'a Home,
    args: &[&str],
    code: i32,
    kind: &'static str,
    fragment: &str,
) -> Case<'a> {
    Case {
        what,
        home,
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        stdin: None,
        code,
        kind,
        fragment: fragment.to_owned(),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(home: &Home, args: &[String], stdin: Option<&str>) -> Output {
    match stdin {
        Some(input) => home.run_with_stdin(args, input),
        None => home.run(args),
    }
}

/// The case in both modes: exit code, one `error:` line with the fragment; with `--json` one
/// error object with the kind and the same sentence.
fn check(c: &Case<'_>) {
    let human = run(c.home, &c.args, c.stdin.as_deref());
    let (out, err) = (text(&human.stdout), text(&human.stderr));
    assert_eq!(
        human.status.code(),
        Some(c.code),
        "{}: exit code\nstdout: {out}\nstderr: {err}",
        c.what
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{}: one error line\nstderr: {err}", c.what);
    assert!(
        errors[0].contains(&c.fragment),
        "{}: `{}` not in {:?}",
        c.what,
        c.fragment,
        errors[0]
    );
    assert!(
        !err.contains("starting one for this command"),
        "{}: refused before starting a node\nstderr: {err}",
        c.what
    );

    let mut args = vec!["--json".to_owned()];
    args.extend(c.args.iter().cloned());
    let json = run(c.home, &args, c.stdin.as_deref());
    assert_eq!(
        json.status.code(),
        Some(c.code),
        "{} (--json): exit code\nstderr: {}",
        c.what,
        text(&json.stderr)
    );
    let lines = parse_json_lines(&text(&json.stdout));
    let last = lines
        .last()
        .unwrap_or_else(|| panic!("{} (--json): a JSON line on stdout", c.what));
    assert_eq!(last["error"], c.kind, "{} (--json): {last}", c.what);
    let message = last["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&c.fragment),
        "{} (--json): `{}` not in {message:?}",
        c.what,
        c.fragment
    );
    assert!(
        !message.contains('\n'),
        "{} (--json): one sentence: {message:?}",
        c.what
    );
}

/// `id` with its character at `at` (in the data part) replaced by another bech32 character.
fn one_character_changed(id: &str, at: usize) -> String {
    let mut chars: Vec<char> = id.chars().collect();
    chars[at] = if chars[at] == 'q' { 'p' } else { 'q' };
    chars.into_iter().collect()
}

#[test]
fn mistakes_without_a_network_get_one_sentence_and_their_exit_code() {
    let empty = Home::new();
    let alice = Home::new();
    alice.init();
    let bob_home = Home::new();
    let bob = bob_home.init();
    alice.ok(["contact", "add", "bob", &bob]);
    let typo = one_character_changed(&bob, 30);
    assert_ne!(typo, bob);
    let too_long = "a".repeat(60_001);

    let phrase_home = Home::new();
    let phrase = phrase_home.json(["init"])[0]["recovery_phrase"]
        .as_str()
        .expect("a phrase")
        .to_owned();
    let mut words: Vec<&str> = phrase.split(' ').collect();
    assert_eq!(words.len(), 24);
    words[6] = "abandonx";
    let misspelt = words.join(" ");
    // 24 valid words whose checksum does not match (the valid phrase ends in `art`).
    let wrong_checksum = vec!["abandon"; 24].join(" ");
    let restore_home = Home::new();

    let bad_config = Home::new();
    bad_config.init();
    std::fs::write(
        bad_config.path().join("meshchat.toml"),
        "# mine\nlisen = [\"/ip4/127.0.0.1/tcp/0\"]\n",
    )
    .expect("write the config");

    let mut cases = vec![
        case(
            "no identity: id",
            &empty,
            &["id"],
            3,
            "no_identity",
            "run `meshchat init` first",
        ),
        case(
            "no identity: send",
            &empty,
            &["send", "bob", "hi"],
            3,
            "no_identity",
            "run `meshchat init` first",
        ),
        case(
            "no identity: run",
            &empty,
            &["run"],
            3,
            "no_identity",
            "run `meshchat init` first",
        ),
        case(
            "unknown contact: send",
            &alice,
            &["send", "carol", "hi"],
            4,
            "not_found",
            "no contact named `carol`",
        ),
        case(
            "unknown contact: remove",
            &alice,
            &["contact", "remove", "carol"],
            4,
            "not_found",
            "no contact named `carol`",
        ),
        case(
            "unknown contact: verify",
            &alice,
            &["contact", "verify", "carol", "--yes"],
            4,
            "not_found",
            "no contact named `carol`",
        ),
        case(
            "mistyped user ID: contact add",
            &alice,
            &["contact", "add", "carol", &typo],
            2,
            "invalid_input",
            "not a valid user ID",
        ),
        case(
            "mistyped user ID: send",
            &alice,
            &["send", &typo, "hi"],
            2,
            "invalid_input",
            "check for a typo",
        ),
        case(
            "bad multiaddr: --bootstrap",
            &alice,
            &["run", "--bootstrap", "192.0.2.1:4001"],
            2,
            "invalid_input",
            "not a multiaddr",
        ),
        case(
            "bad multiaddr: --listen",
            &alice,
            &["run", "--listen", "/ip4/999.0.0.1/tcp/1"],
            2,
            "invalid_input",
            "not a multiaddr",
        ),
        case(
            "bootstrap address without /p2p/",
            &alice,
            &[
                "run",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--bootstrap",
                "/ip4/127.0.0.1/tcp/1",
            ],
            2,
            "invalid_input",
            "must end in /p2p/PEER_ID",
        ),
        case(
            "message too long",
            &alice,
            &["send", "bob", &too_long],
            2,
            "invalid_input",
            "the limit is 60000 bytes",
        ),
        case(
            "empty message",
            &alice,
            &["send", "bob", "  "],
            2,
            "invalid_input",
            "the message is empty",
        ),
        case(
            "init on a home with an identity",
            &alice,
            &["init"],
            1,
            "already_exists",
            "refusing to overwrite it",
        ),
        case(
            "chat without a terminal",
            &alice,
            &["chat", "bob"],
            2,
            "invalid_input",
            "chat needs a terminal",
        ),
        case(
            "bad configuration file",
            &bad_config,
            &["id"],
            8,
            "bad_config",
            "meshchat.toml, line 2: unknown field `lisen`",
        ),
    ];
    let mut restore = case(
        "a wrong word in the recovery phrase",
        &restore_home,
        &["init", "--restore"],
        2,
        "invalid_input",
        "word 7 (`abandonx`) is not a BIP-39 English word",
    );
    restore.stdin = Some(misspelt);
    cases.push(restore);
    let mut restore = case(
        "valid words, wrong checksum",
        &restore_home,
        &["init", "--restore"],
        2,
        "invalid_input",
        "checksum mismatch",
    );
    restore.stdin = Some(wrong_checksum);
    cases.push(restore);

    for c in &cases {
        check(c);
    }

    // The mistakes changed nothing: no identity was created, the contact list is as it was,
    // the failed restores left no identity behind.
    assert!(!empty.path().join("db").exists());
    let contacts = alice.json(["contact", "list"]);
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    assert_eq!(contacts[0]["user_id"], bob.as_str());
    let o = restore_home.run(["id"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
}

/// Wait until `f` holds, for at most `limit`.
fn until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    meshchat_tests::eventually(limit, || f().then_some(())).is_some()
}

fn inbox_has(home: &Home, text: &str) -> bool {
    home.json(["inbox"])
        .iter()
        .any(|m| m.get("text").and_then(|t| t.as_str()) == Some(text))
}

fn node_args(extra: &[&str]) -> Vec<String> {
    let mut v = vec!["--listen".to_owned(), "/ip4/127.0.0.1/tcp/0".to_owned()];
    v.extend(extra.iter().map(|s| (*s).to_owned()));
    v
}

#[test]
fn mistakes_with_nodes_home_in_use_and_recipient_down() {
    let alice = Home::new();
    let alice_id = alice.init();
    let bob = Home::new();
    let bob_id = bob.init();
    let alice_node = alice.spawn_run(node_args(&["--dht-server", "--send-timeout", "3"]));
    let bob_node = bob.spawn_run(node_args(&["--bootstrap", &alice_node.tcp_addr()]));
    alice.ok(["contact", "add", "bob", &bob_id]);
    bob.ok(["contact", "add", "alice", &alice_id]);
    let hello = alice.json(["send", "bob", "hello"]);
    assert_eq!(hello[0]["outcome"], "delivered", "{hello:?}");
    assert!(until(Duration::from_secs(10), || inbox_has(&bob, "hello")));

    // A second node on a home that has one running.
    let in_use = case(
        "node already running on this home",
        &alice,
        &["run", "--listen", "/ip4/127.0.0.1/tcp/0"],
        6,
        "home_in_use",
        "already running on",
    );
    check(&in_use);

    // Bob's node is down: the send says it is only queued, and exits 5, in both modes.
    bob_node.kill();
    let o = alice.run(["send", "bob", "are you there?"]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(5), "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("Not delivered to bob yet") && out.contains("queued"),
        "{out}"
    );
    let o = alice.run(["--json", "send", "bob", "still there?"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o.stderr));
    let lines = parse_json_lines(&text(&o.stdout));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["outcome"], "queued", "{}", lines[0]);
    assert!(lines[0]["reason"].is_string(), "{}", lines[0]);
    assert_eq!(lines[0]["to_name"], "bob");

    // Queued is not lost: once Bob is back, both arrive.
    let _bob_node = bob.spawn_run(node_args(&["--bootstrap", &alice_node.tcp_addr()]));
    assert!(
        until(Duration::from_secs(60), || inbox_has(
            &bob,
            "are you there?"
        ) && inbox_has(
            &bob,
            "still there?"
        )),
        "the queued messages arrive once bob is back: {:?}",
        bob.json(["inbox"])
    );
}
