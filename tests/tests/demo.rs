//! `meshchat demo` through the real binary, as the README's first command runs it: it exits 0,
//! every step of the demonstration happened (each reported with its timing), and it removes its
//! temporary folder. See `docs/cli.md`, "demo".

use std::{process::Stdio, time::Duration};

use meshchat_tests::{meshchat_bin, parse_json_lines, wait_with_timeout};

/// The steps the demo must report, in order.
const STEPS: &[&str] = &[
    "home_server",
    "users",
    "contacts",
    "first_message",
    "reply",
    "established",
    "carol_offline",
    "stored",
    "collected",
    "group_created",
    "group_joined",
    "group_message",
    "group_replies",
];

fn demo(json: bool) -> std::process::Output {
    let mut cmd = std::process::Command::new(meshchat_bin());
    if json {
        cmd.arg("--json");
    }
    cmd.arg("demo")
        .env_remove("MESHCHAT_HOME")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    wait_with_timeout(
        cmd.spawn().expect("spawn meshchat demo"),
        Duration::from_secs(240),
    )
}

/// One test, the two runs one after the other: each demo starts five nodes, and two at once on
/// two cores would measure the machine, not the demo.
#[test]
fn the_demo_runs_in_json_and_as_a_story() {
    json_demo();
    human_demo();
}

fn json_demo() {
    let out = demo(true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed ({:?})\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = parse_json_lines(&stdout);
    let start = lines
        .iter()
        .find(|l| l["event"] == "start")
        .expect("a start line");
    let folder = start["folder"].as_str().expect("folder").to_owned();
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l["event"] == "step").collect();
    let names: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
    assert_eq!(names, STEPS, "steps reported, in order");
    for s in &steps {
        let ms = s["ms"].as_f64().expect("every step has a timing");
        assert!(ms >= 0.0, "{s}");
    }
    let stored = steps
        .iter()
        .find(|s| s["step"] == "stored")
        .expect("stored");
    assert!(
        stored["detail"]["replicas"].as_u64().expect("replicas") >= 1,
        "the offline message is on at least one replica: {stored}"
    );
    let group = steps
        .iter()
        .find(|s| s["step"] == "group_message")
        .expect("group message");
    assert_eq!(
        group["detail"]["received_by"].as_u64(),
        Some(3),
        "every other member got the group message: {group}"
    );
    let summary = lines.last().expect("a summary");
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["steps"].as_u64(), Some(STEPS.len() as u64));
    assert!(
        !std::path::Path::new(&folder).exists(),
        "the temporary folder {folder} is removed"
    );
}

fn human_demo() {
    let out = demo(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for text in [
        "A 1:1 conversation",
        "alice → bob, first message",
        "stored on",
        "carol comes back online and collects the message",
        "A group conversation",
        "Summary",
    ] {
        assert!(stdout.contains(text), "{text:?} missing from:\n{stdout}");
    }
    assert_eq!(
        stdout.matches('✓').count(),
        STEPS.len(),
        "one ✓ per step:\n{stdout}"
    );
}
