//! `HOME/meshchat.toml` through the real binary: flags > environment > file > defaults (seen by
//! `meshchat config --json`), the file really reaches the node (`run` listens where it says), a
//! bad file is one sentence with the file, the line and the problem, and bootstrap addresses
//! given once are remembered in the file. See `docs/cli.md`, "Configuration".

use std::process::Stdio;

use meshchat_tests::{parse_json_lines, wait_with_timeout, Daemon, Home};

const PEER: &str = "12D3KooWBQ58zWXNYqJ5jiHWi5KiE5DHZXBwMN6zdzYpqFL7vQYq";

fn write_config(home: &Home, text: &str) {
    std::fs::write(home.path().join("meshchat.toml"), text).expect("write meshchat.toml");
}

/// `meshchat --json config ARGS` with extra environment variables.
fn config(home: &Home, env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let mut cmd = home.command(["--json", "config"]);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = wait_with_timeout(
        cmd.spawn().expect("spawn"),
        std::time::Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_json_lines(&String::from_utf8_lossy(&out.stdout))
        .pop()
        .expect("one JSON object")
}

#[test]
fn init_writes_a_commented_file_and_defaults_apply() {
    let home = Home::new();
    home.init();
    let text = std::fs::read_to_string(home.path().join("meshchat.toml")).expect("written");
    for key in [
        "listen",
        "bootstrap",
        "dht_server",
        "lan_only",
        "send_timeout_secs",
        "log_level",
    ] {
        assert!(
            text.contains(&format!("# {key} = ")),
            "{key} documented: {text}"
        );
    }
    // (The harness sets RUST_LOG; an empty one counts as unset.)
    let c = config(&home, &[("RUST_LOG", "")], &[]);
    assert_eq!(c["file_exists"], true);
    assert_eq!(c["send_timeout_secs"], 10);
    assert_eq!(c["listen"], serde_json::json!([]));
    assert_eq!(c["lan_only"], false);
    for (_, source) in c["sources"].as_object().expect("sources") {
        assert_eq!(source, "default", "{c}");
    }
}

#[test]
fn flags_beat_environment_beat_file_beat_defaults() {
    let home = Home::new();
    write_config(
        &home,
        "send_timeout_secs = 30\nlan_only = true\nlisten = [\"/ip4/127.0.0.1/tcp/4001\"]\n\
         log_level = \"info\"\n",
    );
    let file = config(&home, &[("RUST_LOG", "")], &[]);
    assert_eq!(file["send_timeout_secs"], 30);
    assert_eq!(file["sources"]["send_timeout_secs"], "file");
    assert_eq!(file["lan_only"], true);
    assert_eq!(file["listen"][0], "/ip4/127.0.0.1/tcp/4001");
    assert_eq!(file["log_level"], "info");
    assert_eq!(file["sources"]["log_level"], "file");

    let env = [
        ("MESHCHAT_SEND_TIMEOUT", "20"),
        (
            "MESHCHAT_LISTEN",
            "/ip4/127.0.0.1/tcp/4002,/ip4/127.0.0.1/udp/4002/quic-v1",
        ),
        ("MESHCHAT_LAN_ONLY", "false"),
        ("MESHCHAT_LOG", "debug"),
    ];
    let by_env = config(&home, &env, &[]);
    assert_eq!(by_env["send_timeout_secs"], 20);
    assert_eq!(by_env["sources"]["send_timeout_secs"], "env");
    assert_eq!(by_env["lan_only"], false);
    assert_eq!(by_env["listen"].as_array().map(Vec::len), Some(2));
    assert_eq!(by_env["log_level"], "debug");

    let by_flag = config(
        &home,
        &env,
        &[
            "--send-timeout",
            "5",
            "--listen",
            "/ip4/127.0.0.1/tcp/4003",
            "--log-level",
            "warn",
        ],
    );
    assert_eq!(by_flag["send_timeout_secs"], 5);
    assert_eq!(by_flag["sources"]["send_timeout_secs"], "flag");
    assert_eq!(
        by_flag["listen"],
        serde_json::json!(["/ip4/127.0.0.1/tcp/4003"])
    );
    assert_eq!(by_flag["sources"]["listen"], "flag");
    assert_eq!(by_flag["log_level"], "warn");
    assert_eq!(by_flag["sources"]["lan_only"], "env");
}

#[test]
fn the_file_reaches_the_node_and_its_log_level_applies() {
    let home = Home::new();
    home.init();
    write_config(
        &home,
        "listen = [\"/ip4/127.0.0.1/tcp/0\"]\nlog_level = \"info\"\n",
    );
    // Only the file's address: loopback TCP, no QUIC, no other interface.
    let mut cmd = home.command(["--json", "run"]);
    cmd.env_remove("RUST_LOG");
    cmd.stderr(Stdio::piped());
    let node = Daemon::spawn(cmd);
    assert!(!node.addrs.is_empty());
    for a in &node.addrs {
        assert!(a.starts_with("/ip4/127.0.0.1/tcp/"), "{a}");
    }
    drop(node);

    // log_level = "info" from the file: the node's info line appears on stderr.
    let mut cmd = home.command(["status"]);
    cmd.env_remove("RUST_LOG");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let o = wait_with_timeout(
        cmd.spawn().expect("spawn"),
        std::time::Duration::from_secs(60),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("node started"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_bad_file_names_the_file_the_line_and_the_problem() {
    let home = Home::new();
    home.init();
    let file = home.path().join("meshchat.toml");
    let cases = [
        (
            "lan_only = true\n\nlisen = []\n",
            "line 3: unknown field `lisen`",
        ),
        (
            "listen = [\n  \"/ip4/127.0.0.1/tcp/0\",\n  \"127.0.0.1:4001\",\n]\n",
            "line 3: `127.0.0.1:4001` in `listen` is not a multiaddr",
        ),
        (
            "send_timeout_secs = 0\n",
            "line 1: `send_timeout_secs` is 0; it must be between 1 and 240",
        ),
        (
            "# x\nlan_only = \"yes\"\n",
            "line 2: `lan_only`: invalid type: string \"yes\", expected a boolean",
        ),
        ("dht_server = tru\n", "line 1"),
        (
            "log_level = \"info,==\"\n",
            "line 1: `info,==` is not a log filter",
        ),
    ];
    for (text, fragment) in cases {
        write_config(&home, text);
        for json in [false, true] {
            let args: Vec<&str> = if json {
                vec!["--json", "id"]
            } else {
                vec!["id"]
            };
            let o = home.run(&args);
            assert_eq!(o.status.code(), Some(8), "{text:?}");
            let err = String::from_utf8_lossy(&o.stderr);
            let line = err
                .lines()
                .find(|l| l.starts_with("error: "))
                .unwrap_or_else(|| panic!("an error line for {text:?}: {err}"));
            assert!(
                line.contains(&format!("bad configuration in {}, ", file.display())),
                "{line}"
            );
            assert!(line.contains(fragment), "{fragment} in {line}");
            if json {
                let v = parse_json_lines(&String::from_utf8_lossy(&o.stdout));
                assert_eq!(v[0]["error"], "bad_config");
                assert!(v[0]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(fragment)));
            }
        }
    }
    // A bad environment variable is a usage error that names it.
    std::fs::remove_file(&file).expect("rm");
    let mut cmd = home.command(["id"]);
    cmd.env("MESHCHAT_SEND_TIMEOUT", "soon");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let o = wait_with_timeout(
        cmd.spawn().expect("spawn"),
        std::time::Duration::from_secs(30),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad MESHCHAT_SEND_TIMEOUT"));
}

#[test]
fn bootstrap_addresses_given_once_are_remembered_in_the_file() {
    let home = Home::new();
    home.init();
    let file = home.path().join("meshchat.toml");
    let mut text = std::fs::read_to_string(&file).expect("template");
    text.push_str("\n# my own note\nsend_timeout_secs = 12\n");
    std::fs::write(&file, &text).expect("write");
    let boot = format!("/ip4/127.0.0.1/tcp/9/p2p/{PEER}");
    let node = home.spawn_run(["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", &boot]);
    drop(node);
    let after = std::fs::read_to_string(&file).expect("read");
    assert!(after.contains("# my own note"), "comments kept: {after}");
    assert!(after.contains(&boot), "remembered: {after}");
    let c = config(&home, &[], &[]);
    assert_eq!(c["bootstrap"], serde_json::json!([boot]));
    assert_eq!(c["sources"]["bootstrap"], "file");
    assert_eq!(c["send_timeout_secs"], 12);

    // Given again: not listed twice.
    let node = home.spawn_run(["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", &boot]);
    drop(node);
    let again = std::fs::read_to_string(&file).expect("read");
    assert_eq!(again.matches(&boot).count(), 1, "{again}");
}
