//! The commands that make `meshchat` pleasant at a terminal, black box: shell completions and
//! the manual page name every subcommand; `id --qr` draws a QR code that a QR reader (rqrr)
//! decodes back to the user ID. See `docs/cli.md`, "completions", "man" and "id".

use meshchat_tests::Home;

fn stdout_of(home: &Home, args: &[&str]) -> String {
    let o = home.run(args);
    assert!(
        o.status.success(),
        "meshchat {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("UTF-8")
}

/// The subcommands `meshchat --help` lists (besides `help`), read from its "Commands:" section.
fn subcommands(home: &Home, args: &[&str]) -> Vec<String> {
    let help = stdout_of(home, args);
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|n| n != "help")
        .collect();
    names
}

#[test]
fn completions_and_man_name_every_subcommand() {
    let home = Home::new();
    let top = subcommands(&home, &["--help"]);
    for expected in [
        "init",
        "id",
        "run",
        "status",
        "contact",
        "send",
        "inbox",
        "config",
        "completions",
        "man",
    ] {
        assert!(top.iter().any(|n| n == expected), "{expected} in {top:?}");
    }
    let contact = subcommands(&home, &["contact", "--help"]);
    assert_eq!(contact, ["add", "list", "remove", "verify"]);

    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = stdout_of(&home, &["completions", shell]);
        assert!(script.len() > 500, "{shell}: {script}");
        for name in top.iter().chain(&contact) {
            assert!(
                script.contains(name.as_str()),
                "{shell} completion lacks `{name}`"
            );
        }
        // Options of subcommands complete, too.
        assert!(
            script.contains("bootstrap") && script.contains("lan-only"),
            "{shell}"
        );
    }
    let bash = stdout_of(&home, &["completions", "bash"]);
    assert!(
        bash.contains("complete -F _meshchat"),
        "a bash completion function"
    );

    let man = stdout_of(&home, &["man"]);
    assert!(
        man.starts_with(".ie") || man.contains(".TH meshchat 1"),
        "{man}"
    );
    assert!(man.contains(".TH meshchat 1"), "roff title");
    assert!(man.contains(".SH SYNOPSIS") && man.contains(".SH SUBCOMMANDS"));
    for name in &top {
        assert!(
            man.contains(&format!("meshchat\\-{name}(1)")),
            "the man page names `{name}`"
        );
    }
    assert!(
        man.contains("MESHCHAT_HOME"),
        "the environment variable of --home"
    );
    // The COMMANDS section: every subcommand, nested ones too, with its arguments.
    assert!(man.contains(".SH COMMANDS"));
    for name in &top {
        assert!(
            man.contains(&format!(".SS \"meshchat {name}")),
            "a COMMANDS entry for `{name}`"
        );
    }
    for name in &contact {
        assert!(
            man.contains(&format!(".SS \"meshchat contact {name}")),
            "a COMMANDS entry for `contact {name}`"
        );
    }
    assert!(
        man.contains("\\fB\\-\\-bootstrap\\fR \\fIMULTIADDR\\fR"),
        "run's options"
    );
    // No line starts with a stray quote (a roff control character).
    assert!(man.lines().all(|l| !l.starts_with('\'')), "{man}");

    // An unknown shell is a usage error.
    let o = home.run(["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
}

/// The half-block drawing back to modules: `▀` top dark, `▄` bottom dark, `█` both, ` ` none.
fn modules(drawing: &str) -> Vec<Vec<bool>> {
    let mut rows = Vec::new();
    for line in drawing.lines() {
        let (mut top, mut bottom) = (Vec::new(), Vec::new());
        for c in line.chars() {
            let (t, b) = match c {
                '█' => (true, true),
                '▀' => (true, false),
                '▄' => (false, true),
                ' ' => (false, false),
                other => panic!("unexpected character {other:?} in the QR drawing"),
            };
            top.push(t);
            bottom.push(b);
        }
        rows.push(top);
        rows.push(bottom);
    }
    rows
}

#[test]
fn id_qr_decodes_back_to_the_user_id() {
    let home = Home::new();
    let user_id = home.init();
    let out = stdout_of(&home, &["id", "--qr"]);
    // Piped, so no colour codes: the drawing, then the user ID on its own line.
    assert!(
        !out.contains('\x1b'),
        "no ANSI codes when stdout is not a terminal"
    );
    let (drawing, last) = out.trim_end().rsplit_once('\n').expect("drawing and id");
    assert_eq!(last, user_id);
    let grid = modules(drawing);
    let (h, w) = (grid.len(), grid[0].len());
    assert!(grid.iter().all(|r| r.len() == w), "a rectangle");
    // A quiet zone of 4 light modules on every side.
    for (y, row) in grid.iter().enumerate() {
        for (x, dark) in row.iter().enumerate() {
            if x < 4 || y < 4 || x >= w - 4 || y + 4 >= h - 1 {
                assert!(!dark, "module ({x},{y}) is in the quiet zone");
            }
        }
    }
    assert!(
        w <= 80 && h / 2 <= 24,
        "fits an 80×24 terminal: {w}×{}",
        h / 2
    );

    // Scan it: 6 pixels per module, dark = black.
    let scale = 6;
    let mut img = rqrr::PreparedImage::prepare_from_bitmap(w * scale, h * scale, |x, y| {
        grid[y / scale][x / scale]
    });
    let grids = img.detect_grids();
    assert_eq!(grids.len(), 1, "one QR code found");
    let (_, content) = grids[0].decode().expect("the QR code decodes");
    assert_eq!(content, user_id);

    // With --json the drawing is left out; the object is unchanged.
    let v = home.json(["id", "--qr"]);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["user_id"], user_id.as_str());
}

/// Progress lines on stderr for the waits a person notices, and none with `--json` or `-q`.
#[test]
fn progress_is_shown_on_stderr_and_quiet_for_scripts() {
    let home = Home::new();
    home.init();
    let bob = Home::new();
    let bob_id = bob.init();
    home.ok(["contact", "add", "bob", &bob_id]);
    let steps = [
        "No node runs on this home; starting one for this command…",
        "Connecting to the network…",
        "No peer reached yet; continuing anyway.",
    ];

    let o = home.run(["status"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    for s in steps {
        assert!(err.contains(s), "`{s}` in {err}");
    }
    // Piped stderr: plain lines, no spinner control codes.
    assert!(!err.contains('\x1b') && !err.contains('\r'), "{err:?}");

    let o = home.run(["send", "bob", "hello"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Sending to bob"), "{err}");

    let o = home.run(["inbox", "--wait", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("waiting up to 1 s"), "{err}");

    for quiet in [
        &["--json", "status"][..],
        &["-q", "status"],
        &["-q", "send", "bob", "hi"],
    ] {
        let o = home.run(quiet);
        let err = String::from_utf8_lossy(&o.stderr);
        for s in steps.iter().chain(&["Sending to bob"]) {
            assert!(!err.contains(s), "{quiet:?} prints `{s}`: {err}");
        }
    }
}

/// `meshchat … | head -1`: a reader that goes away ends the command quietly (exit 0, no panic).
#[test]
fn a_closed_stdout_ends_quietly() {
    let home = Home::new();
    home.init();
    let bob = Home::new();
    home.ok(["contact", "add", "bob", &bob.init()]);
    for args in [
        &["completions", "bash"][..],
        &["man"],
        &["contact", "list"],
        &["--json", "contact", "list"],
    ] {
        let mut cmd = home.command(args);
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        drop(child.stdout.take());
        let o = meshchat_tests::wait_with_timeout(child, std::time::Duration::from_secs(30));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
