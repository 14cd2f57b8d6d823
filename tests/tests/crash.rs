//! Crash safety with real processes: `kill -9` a sender in the middle of a burst of sends and a
//! receiver in the middle of receiving; after restart every message that `send` reported as sent
//! arrives exactly once, nothing arrives twice, and the ratchets still agree.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use meshchat_tests::{eventually, Daemon, Home};

struct User {
    home: Home,
    id: String,
}

impl User {
    fn new() -> User {
        let home = Home::new();
        let id = home.init();
        User { home, id }
    }

    fn run(&self, boot: &str) -> Daemon {
        self.home
            .spawn_run(["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", boot])
    }

    /// How often each text appears in this user's inbox.
    fn inbox_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for m in self.home.json(["inbox"]) {
            if let Some(t) = m.get("text").and_then(|t| t.as_str()) {
                *counts.entry(t.to_owned()).or_insert(0) += 1;
            }
        }
        counts
    }
}

/// Send `prefix0..prefixN` from `from` to `to` one after the other in a background thread;
/// returns the texts whose `send` exited 0 (reported delivered) and a counter of those.
fn burst(
    from: &User,
    to: &str,
    prefix: &str,
    n: usize,
) -> (
    std::thread::JoinHandle<()>,
    Arc<Mutex<Vec<String>>>,
    Arc<AtomicUsize>,
) {
    let ok = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let home = from.home.path().to_owned();
    let (ok2, count2, to, prefix) = (ok.clone(), count.clone(), to.to_owned(), prefix.to_owned());
    let t = std::thread::spawn(move || {
        for i in 0..n {
            let text = format!("{prefix}{i}");
            let out = std::process::Command::new(meshchat_tests::meshchat_bin())
                .arg("--home")
                .arg(&home)
                .args(["-q", "send", &to, &text])
                .env("RUST_LOG", "off")
                .stdin(std::process::Stdio::null())
                .output()
                .expect("run meshchat send");
            if out.status.success() {
                ok2.lock().expect("lock").push(text);
                count2.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (t, ok, count)
}

fn assert_exactly_once(inbox: &HashMap<String, usize>, reported: &[String], prefix: &str) {
    for t in reported {
        assert_eq!(
            inbox.get(t),
            Some(&1),
            "{t} was reported sent: it must arrive exactly once"
        );
    }
    for (t, n) in inbox {
        assert!(*n == 1 || !t.starts_with(prefix), "{t} arrived {n} times");
    }
}

#[test]
fn killed_sender_and_receiver_lose_nothing_and_duplicate_nothing() {
    let hub_home = Home::new();
    hub_home.init();
    let hub = hub_home.spawn_run(["--listen", "/ip4/127.0.0.1/tcp/0", "--dht-server"]);
    let boot = hub.tcp_addr();

    let alice = User::new();
    let bob = User::new();
    let mut alice_node = alice.run(&boot);
    let mut bob_node = bob.run(&boot);
    alice.home.ok(["contact", "add", "bob", &bob.id]);
    bob.home.ok(["contact", "add", "alice", &alice.id]);
    alice.home.ok(["send", "bob", "hello"]);
    bob.home.ok(["send", "alice", "hello back"]);

    // 1. kill -9 the sender's node in the middle of a burst.
    let (t, reported, count) = burst(&alice, "bob", "s", 30);
    eventually(Duration::from_secs(60), || {
        (count.load(Ordering::SeqCst) >= 8).then_some(())
    })
    .expect("the burst gets going");
    alice_node.kill();
    t.join().expect("burst thread");
    alice_node = alice.run(&boot);
    let reported_s = reported.lock().expect("lock").clone();
    assert!(
        reported_s.len() >= 8,
        "sends before and after the kill: {reported_s:?}"
    );
    let inbox = eventually(Duration::from_secs(60), || {
        let c = bob.inbox_counts();
        reported_s.iter().all(|t| c.contains_key(t)).then_some(c)
    })
    .unwrap_or_else(|| {
        panic!(
            "bob misses some of {reported_s:?}: {:?}",
            bob.inbox_counts()
        )
    });
    assert_exactly_once(&inbox, &reported_s, "s");

    // 2. kill -9 the receiver's node while messages arrive.
    let (t, reported, count) = burst(&alice, "bob", "r", 30);
    eventually(Duration::from_secs(60), || {
        (count.load(Ordering::SeqCst) >= 8).then_some(())
    })
    .expect("the burst gets going");
    bob_node.kill();
    t.join().expect("burst thread");
    bob_node = bob.run(&boot);
    let reported_r = reported.lock().expect("lock").clone();
    // Everything alice's node accepted is in its durable outbox: once bob is back, all 30
    // arrive (those that `send` reported as only queued, too), each exactly once.
    let all_r: Vec<String> = (0..30).map(|i| format!("r{i}")).collect();
    let inbox = eventually(Duration::from_secs(90), || {
        let c = bob.inbox_counts();
        all_r.iter().all(|t| c.contains_key(t)).then_some(c)
    })
    .unwrap_or_else(|| panic!("bob misses some r*: {:?}", bob.inbox_counts()));
    assert_exactly_once(&inbox, &reported_r, "r");
    assert_exactly_once(&inbox, &all_r, "r");

    // 3. The ratchets still agree, both ways.
    bob.home.ok(["send", "alice", "after the crashes"]);
    alice.home.ok(["send", "bob", "still here"]);
    let a = eventually(Duration::from_secs(20), || {
        let c = alice.inbox_counts();
        c.contains_key("after the crashes").then_some(c)
    })
    .expect("alice reads bob's message");
    assert_eq!(a.get("after the crashes"), Some(&1));
    let b = eventually(Duration::from_secs(20), || {
        let c = bob.inbox_counts();
        c.contains_key("still here").then_some(c)
    })
    .expect("bob reads alice's message");
    assert_eq!(b.get("still here"), Some(&1));
    drop((alice_node, bob_node, hub));
}
