#![doc = include_str!("../README.md")]

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{mpsc, OnceLock},
    time::{Duration, Instant},
};

/// The `meshchat` binary under test.
///
/// `MESHCHAT_BIN` if set; otherwise the binary that `cargo test --workspace` (or
/// `scripts/test.sh`) built beside this test executable (`target/debug/meshchat`: the `meshchat`
/// package has integration tests of its own, so cargo builds its binary in the same run). A
/// binary older than any source file of the workspace fails the test with a sentence that says
/// what to run, rather than testing stale code; so does a missing one.
pub fn meshchat_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("MESHCHAT_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("invariant: the test knows its own path");
        let deps = exe.parent().expect("invariant: the test lives in a folder");
        let bin = deps
            .parent()
            .expect("invariant: deps/ has a parent")
            .join("meshchat");
        let built = std::fs::metadata(&bin)
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| {
                panic!(
                    "no meshchat binary at {}: run the tests with `cargo test --workspace` \
                     (or scripts/test.sh), which builds it, or set MESHCHAT_BIN",
                    bin.display()
                )
            });
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("invariant: tests/ is inside the workspace");
        if let Some(newer) = newest_source(workspace).filter(|(t, _)| *t > built) {
            panic!(
                "the meshchat binary at {} is older than {}: run the tests with \
                 `cargo test --workspace` (or scripts/test.sh), which rebuilds it",
                bin.display(),
                newer.1.display()
            );
        }
        bin
    })
}

/// The most recently modified `.rs` or `Cargo.toml` under the crates the binary is built from.
fn newest_source(workspace: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    fn walk(dir: &Path, best: &mut Option<(std::time::SystemTime, PathBuf)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, best);
            } else if p.extension().is_some_and(|x| x == "rs")
                || p.file_name().is_some_and(|n| n == "Cargo.toml")
            {
                if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
                    if best.as_ref().is_none_or(|(b, _)| t > *b) {
                        *best = Some((t, p));
                    }
                }
            }
        }
    }
    let mut best = None;
    for krate in ["protocol/src", "node/src", "cli/src"] {
        walk(&workspace.join(krate), &mut best);
    }
    best
}

pub mod netns;

/// One user's home folder, in a temporary directory removed on drop.
#[derive(Debug)]
pub struct Home {
    dir: tempfile::TempDir,
    /// The network namespace its commands run in (`ip netns exec`), if any.
    netns: Option<String>,
}

impl Default for Home {
    fn default() -> Self {
        Self::new()
    }
}

impl Home {
    /// A fresh, empty home.
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("meshchat-home-")
                .tempdir()
                .expect("create a temporary home"),
            netns: None,
        }
    }

    /// Run every later command of this home inside network namespace `ns` (`ip netns exec`;
    /// see [`netns::Lab`]). The home itself stays where it is.
    pub fn enter(&mut self, ns: &str) {
        self.netns = Some(ns.to_owned());
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A `meshchat --home HOME ARGS…` command, with logs kept quiet unless `MESHCHAT_TEST_LOG` is set.
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = match &self.netns {
            None => Command::new(meshchat_bin()),
            Some(ns) => {
                // `ip netns exec` execs the program: the child's pid is meshchat's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(meshchat_bin());
                c
            }
        };
        cmd.arg("--home").arg(self.path()).args(args);
        cmd.env_remove("MESHCHAT_HOME");
        match std::env::var("MESHCHAT_TEST_LOG") {
            Ok(level) => cmd.env("RUST_LOG", level),
            Err(_) => cmd.env("RUST_LOG", "warn"),
        };
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Run a command to completion with a time limit; returns its output whatever the exit code.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.run_with_timeout(args, Duration::from_secs(120))
    }

    /// As [`Home::run`] with an explicit limit; a command still running then is killed and the test fails.
    pub fn run_with_timeout<I, S>(&self, args: I, limit: Duration) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command(args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().expect("spawn meshchat");
        wait_with_timeout(child, limit)
    }

    /// Run a command with `input` on its stdin (then closed), with the same limit as [`Home::run`].
    pub fn run_with_stdin<I, S>(&self, args: I, input: &str) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        use std::io::Write;
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn meshchat");
        {
            let mut stdin = child.stdin.take().expect("piped stdin");
            // The command may refuse before reading; a closed pipe is not the test's concern.
            let _ = stdin.write_all(input.as_bytes());
        }
        wait_with_timeout(child, Duration::from_secs(120))
    }

    /// Run a command that must succeed; returns its stdout.
    pub fn ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.run(&args);
        assert!(
            out.status.success(),
            "meshchat {:?} failed ({}):\nstdout: {}\nstderr: {}",
            args,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("stdout is UTF-8")
    }

    /// Run a command with `--json` that must succeed; returns every JSON line it printed.
    pub fn json<I, S>(&self, args: I) -> Vec<serde_json::Value>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec!["--json".into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        parse_json_lines(&self.ok(all))
    }

    /// `meshchat init`, returning the new user ID.
    pub fn init(&self) -> String {
        let lines = self.json(["init"]);
        lines
            .iter()
            .find_map(|v| v.get("user_id").and_then(|u| u.as_str()).map(str::to_owned))
            .expect("init prints a user_id")
    }

    /// Start `meshchat --json run ARGS…` in the background and wait until it prints its addresses.
    pub fn spawn_run<I, S>(&self, args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec!["--json".into(), "run".into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        Daemon::spawn(self.command(all))
    }

    /// Start `meshchat --json serve ARGS…` (a home server) in the background and wait until it
    /// prints its addresses.
    pub fn spawn_serve<I, S>(&self, args: I) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec!["--json".into(), "serve".into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        Daemon::spawn(self.command(all))
    }
}

/// A background `meshchat run` (or `serve`), killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// Every address it printed (full multiaddrs ending in `/p2p/PEER_ID`).
    pub addrs: Vec<String>,
    /// The whole `listening` line (e.g. `serve`'s `bootstrap_addrs`, `peer_id`).
    pub banner: serde_json::Value,
    lines: mpsc::Receiver<String>,
}

impl Daemon {
    /// Spawn `cmd` (a `meshchat --json run|serve`, which prints
    /// `{"event":"listening","listen_addrs":[…],…}` once it is up) and wait for that line.
    pub fn spawn(mut cmd: Command) -> Daemon {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn meshchat run");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::sync_channel(1024);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Daemon {
            child,
            addrs: Vec::new(),
            banner: serde_json::Value::Null,
            lines: rx,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = daemon
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("meshchat run did not become ready within 60 s"));
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v.get("event").and_then(|e| e.as_str()) == Some("listening") {
                daemon.addrs = v
                    .get("listen_addrs")
                    .and_then(|a| a.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                daemon.banner = v;
                break;
            }
        }
        daemon
    }

    /// A loopback TCP address of this node, ready for `--bootstrap`.
    pub fn tcp_addr(&self) -> String {
        self.addrs
            .iter()
            .find(|a| a.starts_with("/ip4/127.0.0.1/tcp/"))
            .or_else(|| self.addrs.iter().find(|a| a.contains("/tcp/")))
            .cloned()
            .expect("the node printed a TCP address")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kill with SIGKILL and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Lines printed after start-up, as they arrive.
    pub fn next_line(&self, limit: Duration) -> Option<String> {
        self.lines.recv_timeout(limit).ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait for `child` at most `limit`, collecting its output; kill it and fail past the limit.
pub fn wait_with_timeout(mut child: Child, limit: Duration) -> Output {
    // Drain the pipes while waiting: a child writing more than a pipe buffer (64 KiB) would
    // otherwise block and never exit.
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let (status, timed_out) = loop {
        match child.try_wait().expect("poll child") {
            Some(status) => break (status, false),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                break (child.wait().expect("reap child"), true);
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let out = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if timed_out {
        panic!(
            "command still running after {limit:?}; stdout: {} stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Parse every line of `text` that is a JSON object.
pub fn parse_json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect()
}

/// Poll `f` every 100 ms until it returns `Some`, for at most `limit`.
pub fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
