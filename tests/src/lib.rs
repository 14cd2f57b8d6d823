#![doc = include_str!("../README.md")]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{mpsc, OnceLock},
    time::{Duration, Instant},
};

/// The `meshchat` binary, built once per test process with the same target directory and profile
/// as the tests (`cargo build -p meshchat` is a no-op when it is up to date).
pub fn meshchat_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let workspace = manifest
            .parent()
            .expect("invariant: tests/ is inside the workspace");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "meshchat", "--bin", "meshchat"])
            .current_dir(workspace)
            .status()
            .expect("run cargo build for the meshchat binary");
        assert!(status.success(), "cargo build -p meshchat failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        let bin = target.join("debug").join("meshchat");
        assert!(bin.exists(), "no binary at {}", bin.display());
        bin
    })
}

/// One user's home folder, in a temporary directory removed on drop.
#[derive(Debug)]
pub struct Home {
    dir: tempfile::TempDir,
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
        }
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
        let mut cmd = Command::new(meshchat_bin());
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
}

/// A background `meshchat run` (or `serve`), killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// Every address it printed (full multiaddrs ending in `/p2p/PEER_ID`).
    pub addrs: Vec<String>,
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
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait().expect("poll child") {
            Some(_) => return child.wait_with_output().expect("collect output"),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("collect output");
                panic!(
                    "command still running after {limit:?}; stdout: {} stderr: {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
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
