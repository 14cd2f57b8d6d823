//! Network namespaces for the NAT and LAN tests: a [`Lab`] creates namespaces (names unique to
//! this process), veth pairs between them, bridges, addresses, routes and NAT routers
//! (`iptables` MASQUERADE, no inbound), and deletes all of it on drop, killing whatever still
//! runs inside. Commands run inside with `ip netns exec`; [`crate::Home::enter`] makes a home's
//! `meshchat` commands do so.
//!
//! Needs root and `ip netns` (iproute2); NAT routers need `iptables`
//! (`scripts/ensure-deps.sh` installs both). [`Lab::new`] returns `None`, after printing why,
//! when the machine cannot host namespaces at all (not root, no `ip netns`), so the tests can be
//! skipped there; in CI (root) they run.

use std::{
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// How a [`Lab::nat_router`] picks the public source port of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Keeps the inside port when it is free (Linux MASQUERADE's default, most home routers):
    /// hole punching can work.
    PortPreserving,
    /// A random port for every connection (`--random-fully`, "symmetric" NAT): the port a
    /// third party observed is useless to anyone else, so hole punching cannot work.
    Symmetric,
}

/// A set of namespaces removed on drop.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
}

/// Run `program args…`; panic with its output if it fails.
fn must(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Why namespaces cannot be used here, if they cannot (checked once per process).
fn unavailable() -> Option<String> {
    static CHECKED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    CHECKED.get_or_init(check).clone()
}

fn check() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not running as root".into());
    }
    let probe = format!("mcprobe{}", std::process::id());
    let added = Command::new("ip")
        .args(["netns", "add", &probe])
        .stderr(Stdio::piped())
        .output();
    match added {
        Err(e) => Some(format!("`ip` cannot run ({e}); install iproute2")),
        Ok(o) if !o.status.success() => Some(format!(
            "`ip netns add` fails: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            None
        }
    }
}

impl Lab {
    /// A new, empty lab; `None` (with a message on stderr saying why the test is skipped) when
    /// this machine cannot create network namespaces.
    pub fn new(test: &str) -> Option<Lab> {
        if let Some(why) = unavailable() {
            eprintln!("skipping {test}: network namespaces unavailable ({why})");
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        Some(Lab {
            prefix: format!("mc{}x{n}", std::process::id()),
            namespaces: Vec::new(),
        })
    }

    /// Create namespace `name` (its full name is returned) with loopback up.
    pub fn ns(&mut self, name: &str) -> String {
        let full = format!("{}-{name}", self.prefix);
        must("ip", &["netns", "add", &full]);
        self.namespaces.push(full.clone());
        must("ip", &["-n", &full, "link", "set", "lo", "up"]);
        full
    }

    /// Run `args…` inside `ns`; panic if it fails; returns stdout.
    pub fn exec(&self, ns: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", ns];
        all.extend_from_slice(args);
        must("ip", &all)
    }

    /// A veth pair: `if_a` in `ns_a`, `if_b` in `ns_b`, both up.
    pub fn link(&self, ns_a: &str, if_a: &str, ns_b: &str, if_b: &str) {
        must(
            "ip",
            &[
                "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns",
                ns_b,
            ],
        );
        must("ip", &["-n", ns_a, "link", "set", if_a, "up"]);
        must("ip", &["-n", ns_b, "link", "set", if_b, "up"]);
    }

    /// A bridge `br` in `ns` (a switch), up.
    pub fn bridge(&self, ns: &str, br: &str) {
        must("ip", &["-n", ns, "link", "add", br, "type", "bridge"]);
        must("ip", &["-n", ns, "link", "set", br, "up"]);
    }

    /// Plug interface `ifname` of `ns` into bridge `br` of the same namespace.
    pub fn attach(&self, ns: &str, ifname: &str, br: &str) {
        must("ip", &["-n", ns, "link", "set", ifname, "master", br, "up"]);
    }

    /// Give `ifname` in `ns` the address `cidr` (e.g. `192.168.1.2/24`).
    pub fn addr(&self, ns: &str, ifname: &str, cidr: &str) {
        must("ip", &["-n", ns, "addr", "add", cidr, "dev", ifname]);
    }

    /// Route everything not on a local network through `via`.
    pub fn default_route(&self, ns: &str, via: &str) {
        must("ip", &["-n", ns, "route", "add", "default", "via", via]);
    }

    /// Make `ns` a home router: forward between `lan` and `wan`, masquerade what leaves through
    /// `wan`, and silently drop every new connection coming in from `wan`, to the router itself
    /// or beyond (no port forwarding, no answer: like a home router). Replies to connections
    /// made from the inside get through. `kind` says how source ports are chosen.
    pub fn nat_router(&self, ns: &str, wan: &str, lan: &str, kind: NatKind) {
        self.exec(ns, &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        let masquerade = match kind {
            NatKind::PortPreserving => "MASQUERADE",
            NatKind::Symmetric => "MASQUERADE --random-fully",
        };
        let rules = [
            format!("-A INPUT -i {wan} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
            format!("-A INPUT -i {wan} -j DROP"),
            format!("-t nat -A POSTROUTING -o {wan} -j {masquerade}"),
            format!("-A FORWARD -i {lan} -o {wan} -j ACCEPT"),
            format!(
                "-A FORWARD -i {wan} -o {lan} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
            ),
            format!("-A FORWARD -i {wan} -o {lan} -j DROP"),
        ];
        for rule in &rules {
            let mut args = vec!["iptables"];
            args.extend(rule.split_whitespace());
            self.exec(ns, &args);
        }
    }

    /// The process ids running inside `ns`.
    pub fn pids(&self, ns: &str) -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            // Whatever this test started inside and did not stop yet.
            for pid in self.pids(ns) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .output();
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
