//! Crash safety with real processes: `kill -9` a sender in the middle of a burst of sends and a
//! receiver in the middle of receiving; after restart every message that `send` reported as
//! delivered (exit 0) or durably queued (exit 5) arrives exactly once, nothing arrives twice, and
//! the ratchets still agree.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
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

/// What became of the sends of a burst.
#[derive(Debug, Default, Clone)]
struct Outcomes {
    /// `send` exited 0: reported delivered. Must arrive exactly once.
    delivered: Vec<String>,
    /// `send` exited 5: durably queued in the sender's outbox. Must arrive exactly once, later.
    queued: Vec<String>,
    /// Anything else (the node died under the command): may arrive, at most once.
    unknown: Vec<String>,
}

/// A burst of sends `prefix0, prefix1, …` from `from` to `to`, one after the other in a
/// background thread, until `stop` is set (or `max` sends).
struct Burst {
    thread: std::thread::JoinHandle<()>,
    outcomes: Arc<Mutex<Outcomes>>,
    delivered: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Burst {
    fn start(from: &User, to: &str, prefix: &str, max: usize) -> Burst {
        let outcomes = Arc::new(Mutex::new(Outcomes::default()));
        let delivered = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let home = from.home.path().to_owned();
        let (o, d, st, to, prefix) = (
            outcomes.clone(),
            delivered.clone(),
            stop.clone(),
            to.to_owned(),
            prefix.to_owned(),
        );
        let thread = std::thread::spawn(move || {
            for i in 0..max {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let text = format!("{prefix}{i}");
                let out = std::process::Command::new(meshchat_tests::meshchat_bin())
                    .arg("--home")
                    .arg(&home)
                    .args(["-q", "send", &to, &text])
                    .env("RUST_LOG", "off")
                    .stdin(std::process::Stdio::null())
                    .output()
                    .expect("run meshchat send");
                let mut o = o.lock().expect("lock");
                match out.status.code() {
                    Some(0) => {
                        o.delivered.push(text);
                        d.fetch_add(1, Ordering::SeqCst);
                    }
                    Some(5) => o.queued.push(text),
                    _ => o.unknown.push(text),
                }
            }
        });
        Burst {
            thread,
            outcomes,
            delivered,
            stop,
        }
    }

    fn wait_for_delivered(&self, n: usize) {
        eventually(Duration::from_secs(60), || {
            (self.delivered.load(Ordering::SeqCst) >= n).then_some(())
        })
        .expect("the burst gets going");
    }

    fn finish(self) -> Outcomes {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("burst thread");
        let o = self.outcomes.lock().expect("lock").clone();
        o
    }
}

/// Every delivered or queued message arrives exactly once; nothing with `prefix` arrives twice.
fn check(user: &User, o: &Outcomes, prefix: &str) {
    let must: Vec<&String> = o.delivered.iter().chain(&o.queued).collect();
    let inbox = eventually(Duration::from_secs(90), || {
        let c = user.inbox_counts();
        must.iter().all(|t| c.contains_key(*t)).then_some(c)
    })
    .unwrap_or_else(|| panic!("missing some of {o:?}: {:?}", user.inbox_counts()));
    for t in &must {
        assert_eq!(
            inbox.get(*t),
            Some(&1),
            "{t} must arrive exactly once ({o:?})"
        );
    }
    for (t, n) in &inbox {
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

    // 1. kill -9 the sender's node in the middle of a burst; the sends that follow find no
    //    node and start one of their own on the same home, then the node is restarted.
    let burst = Burst::start(&alice, "bob", "s", 40);
    burst.wait_for_delivered(6);
    alice_node.kill();
    std::thread::sleep(Duration::from_millis(1500));
    let sent = burst.finish();
    alice_node = alice.run(&boot);
    assert!(sent.delivered.len() >= 6, "{sent:?}");
    check(&bob, &sent, "s");

    // 2. kill -9 the receiver's node while messages arrive; alice's outbox delivers the rest
    //    once bob's node is back.
    let burst = Burst::start(&alice, "bob", "r", 40);
    burst.wait_for_delivered(6);
    bob_node.kill();
    std::thread::sleep(Duration::from_millis(500));
    let sent = burst.finish();
    bob_node = bob.run(&boot);
    check(&bob, &sent, "r");

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
