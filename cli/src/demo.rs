//! `meshchat demo`: a small mesh on this machine, shown step by step with timings. See
//! `docs/cli.md`, "demo".
//!
//! It starts real nodes in this process — a home server and four users, each with its own
//! identity and RocksDB home in a temporary folder, talking libp2p over loopback TCP — and then:
//! introduces the users to each other, sends a 1:1 conversation, sends to a user whose node is
//! off and lets that user collect the mail from its mailbox replicas when it comes back, and
//! runs a group conversation. Every step prints what happened and how long it took; the run
//! ends with a summary and removes the temporary folder. Any step that does not complete in
//! time fails the demo (non-zero exit), so CI can run it as a test.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use libp2p::Multiaddr;
use meshchat_node::{storage::Storage, Node, NodeConfig, NodeEvent, NodeHandle, SendOutcome};
use meshchat_protocol::{Identity, PublicIdentity};
use serde_json::json;
use tokio::sync::broadcast;

use crate::{
    exit::{self, Failure},
    output::Out,
};

/// How long one step may take before the demo gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a user's node tries to reach a recipient before it stores the message in the
/// recipient's mailbox (short, so that the offline step does not wait long).
const DEMO_SEND_TIMEOUT: Duration = Duration::from_secs(3);

/// One person in the demo.
struct User {
    name: &'static str,
    home: PathBuf,
    identity: PublicIdentity,
    handle: Option<NodeHandle>,
}

impl User {
    fn node(&self) -> Result<&NodeHandle, Failure> {
        self.handle
            .as_ref()
            .ok_or_else(|| demo_failure(format!("{}'s node is not running", self.name)))
    }
}

/// What one step measured, for the summary.
struct Step {
    what: String,
    ms: f64,
}

/// The demo's output: one line per step (or one JSON object), and the summary.
struct Show {
    out: Out,
    steps: Vec<Step>,
    started: Instant,
}

impl Show {
    fn step(&mut self, key: &str, what: String, elapsed: Duration, detail: serde_json::Value) {
        let ms = elapsed.as_secs_f64() * 1000.0;
        self.out.emit(
            format!("  ✓ {what} ({})", fmt_ms(ms)),
            json!({"event": "step", "step": key, "what": what, "ms": round(ms), "detail": detail}),
        );
        self.steps.push(Step { what, ms });
    }

    fn heading(&self, text: &str) {
        self.out.emit(
            format!("\n{text}"),
            json!({"event": "section", "title": text}),
        );
    }
}

fn round(ms: f64) -> f64 {
    (ms * 100.0).round() / 100.0
}

fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 10_000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

fn demo_failure(message: impl Into<String>) -> Failure {
    Failure::new(exit::GENERIC, "demo_failed", message)
}

/// Run the demonstration.
pub(crate) async fn demo(out: Out) -> Result<u8, Failure> {
    let dir = tempfile::Builder::new()
        .prefix("meshchat-demo-")
        .tempdir()
        .map_err(|e| demo_failure(format!("cannot create a temporary folder: {e}")))?;
    let mut show = Show {
        out,
        steps: Vec::new(),
        started: Instant::now(),
    };
    out.emit(
        format!(
            "meshchat demo: a home server and four users (alice, bob, carol, dave) on this \
             machine, real libp2p nodes on loopback, each with its own RocksDB home in {}",
            dir.path().display()
        ),
        json!({"event": "start", "folder": dir.path().display().to_string()}),
    );
    let mut users = Vec::new();
    let result = scenario(&mut show, dir.path(), &mut users).await;
    // Clean up whatever happened.
    for u in &users {
        if let Some(h) = &u.handle {
            h.shutdown().await;
        }
    }
    let total = show.started.elapsed();
    match result {
        Ok(server) => {
            server.shutdown().await;
            summary(&show, total);
            drop(dir);
            Ok(exit::OK)
        }
        Err(e) => Err(e),
    }
}

fn summary(show: &Show, total: Duration) {
    let mut text = String::from("\nSummary\n");
    for s in &show.steps {
        text.push_str(&format!("  {:<62} {:>10}\n", s.what, fmt_ms(s.ms)));
    }
    text.push_str(&format!(
        "  all {} steps done in {:.1} s; the temporary folder is removed.",
        show.steps.len(),
        total.as_secs_f64()
    ));
    show.out.emit(
        text,
        json!({
            "event": "summary",
            "steps": show.steps.len(),
            "total_ms": round(total.as_secs_f64() * 1000.0),
        }),
    );
}

fn node_config(home: &Path, bootstrap: Vec<Multiaddr>) -> NodeConfig {
    let mut config = NodeConfig::new(home);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0"
        .parse()
        .expect("invariant: constant multiaddr parses")];
    config.bootstrap = bootstrap;
    // Loopback only: nobody can confirm a public address, so every node serves the DHT.
    config.dht_server = true;
    config.send_timeout = DEMO_SEND_TIMEOUT;
    config
}

fn new_home(root: &Path, name: &str) -> Result<(PathBuf, PublicIdentity), Failure> {
    let home = root.join(name);
    std::fs::create_dir_all(&home)
        .map_err(|e| demo_failure(format!("cannot create {}: {e}", home.display())))?;
    let identity = Identity::generate(&mut rand::rngs::OsRng);
    Storage::open(&home)
        .and_then(|s| s.save_identity(&identity))
        .map_err(|e| demo_failure(format!("cannot create {name}'s identity: {e}")))?;
    Ok((home, identity.public()))
}

async fn start(
    home: &Path,
    bootstrap: Vec<Multiaddr>,
    server: bool,
) -> Result<NodeHandle, Failure> {
    let mut config = node_config(home, bootstrap);
    config.home_server = server;
    Node::start(config)
        .await
        .map_err(|e| demo_failure(format!("a node did not start: {e}")))
}

async fn tcp_addr(node: &NodeHandle) -> Result<Multiaddr, Failure> {
    let status = node
        .status()
        .await
        .map_err(|e| demo_failure(format!("status: {e}")))?;
    status
        .listen_addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| demo_failure("the home server has no TCP address"))
}

/// Wait until `rx` reports a received message whose text is `text`.
async fn received(rx: &mut broadcast::Receiver<NodeEvent>, text: &str) -> Result<(), Failure> {
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(NodeEvent::MessageReceived(m)) if m.body == text => return Ok(()),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(demo_failure("a node stopped during the demo"))
                }
            }
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, wait)
        .await
        .map_err(|_| demo_failure(format!("\"{text}\" did not arrive within {STEP_TIMEOUT:?}")))?
}

/// Send `text` from `from` to `to` and wait until `to`'s node has stored it.
async fn message(
    show: &mut Show,
    key: &str,
    from: &User,
    to: &User,
    text: &str,
    what: String,
) -> Result<(), Failure> {
    let mut rx = to.node()?.subscribe();
    let t = Instant::now();
    let report = tokio::time::timeout(
        STEP_TIMEOUT,
        from.node()?.send_text(to.identity, text.to_owned()),
    )
    .await
    .map_err(|_| {
        demo_failure(format!(
            "{} could not send within {STEP_TIMEOUT:?}",
            from.name
        ))
    })?
    .map_err(|e| demo_failure(format!("{} could not send: {e}", from.name)))?;
    // On a loaded machine the direct attempt can time out; the message then reaches the
    // recipient through its mailbox (pushed to its node), which the step waits for all the same.
    let outcome = match report.outcome {
        SendOutcome::Delivered => "delivered".to_owned(),
        SendOutcome::Stored { replicas } => format!("stored on {replicas} replicas"),
        other => {
            return Err(demo_failure(format!(
                "{}'s message to {} was not sent: {other:?}",
                from.name, to.name
            )))
        }
    };
    received(&mut rx, text).await?;
    show.step(
        key,
        what,
        t.elapsed(),
        json!({"from": from.name, "to": to.name, "outcome": outcome}),
    );
    Ok(())
}

async fn scenario(
    show: &mut Show,
    root: &Path,
    users: &mut Vec<User>,
) -> Result<NodeHandle, Failure> {
    show.heading("Starting the mesh");
    let t = Instant::now();
    let (server_home, _) = new_home(root, "home-server")?;
    let server = start(&server_home, Vec::new(), true).await?;
    let boot = tcp_addr(&server).await?;
    show.step(
        "home_server",
        "home server up (DHT server, relay, mailbox replica)".into(),
        t.elapsed(),
        json!({"address": boot.to_string()}),
    );

    let t = Instant::now();
    for name in ["alice", "bob", "carol", "dave"] {
        let (home, identity) = new_home(root, name)?;
        let handle = start(&home, vec![boot.clone()], false).await?;
        users.push(User {
            name,
            home,
            identity,
            handle: Some(handle),
        });
    }
    show.step(
        "users",
        "four users created (new identities) and online".into(),
        t.elapsed(),
        json!({"users": 4}),
    );

    // Everybody adds everybody (in real life: `meshchat contact add NAME USER_ID`).
    let t = Instant::now();
    for i in 0..users.len() {
        for j in 0..users.len() {
            if i != j {
                users[i]
                    .node()?
                    .add_contact(users[j].name.to_owned(), users[j].identity)
                    .await
                    .map_err(|e| demo_failure(format!("adding a contact: {e}")))?;
            }
        }
    }
    let publishing = users.iter().map(|u| async move {
        u.node()?
            .publish_records()
            .await
            .map_err(|e| demo_failure(format!("publishing {}'s records: {e}", u.name)))
    });
    for r in futures::future::join_all(publishing).await {
        r?;
    }
    show.step(
        "contacts",
        "contacts exchanged; prekey bundles and presence published".into(),
        t.elapsed(),
        json!({}),
    );

    show.heading("A 1:1 conversation (end-to-end encrypted, delivered directly)");
    let (alice, bob) = (&users[0], &users[1]);
    message(
        show,
        "first_message",
        alice,
        bob,
        "Hi Bob! This is the first message: it starts our session.",
        "alice → bob, first message (DHT lookup + X3DH handshake)".into(),
    )
    .await?;
    message(
        show,
        "reply",
        bob,
        alice,
        "Hi Alice, got it.",
        "bob → alice, reply".into(),
    )
    .await?;
    let mut times = Vec::new();
    for i in 1..=5 {
        let t = Instant::now();
        let mut rx = bob.node()?.subscribe();
        let text = format!("message {i} of 5");
        let report = alice
            .node()?
            .send_text(bob.identity, text.clone())
            .await
            .map_err(|e| demo_failure(format!("alice could not send: {e}")))?;
        if !matches!(
            report.outcome,
            SendOutcome::Delivered | SendOutcome::Stored { .. }
        ) {
            return Err(demo_failure(format!("not sent: {:?}", report.outcome)));
        }
        received(&mut rx, &text).await?;
        times.push(t.elapsed());
    }
    times.sort();
    show.step(
        "established",
        "alice → bob, 5 more messages, median".into(),
        times[times.len() / 2],
        json!({"messages": 5}),
    );

    show.heading("A message to a user who is offline (stored in mailboxes, collected later)");
    let t = Instant::now();
    let carol_home = users[2].home.clone();
    if let Some(h) = users[2].handle.take() {
        h.shutdown().await;
    }
    show.step(
        "carol_offline",
        "carol's node shuts down".into(),
        t.elapsed(),
        json!({}),
    );
    let text = "Carol, dinner on Friday?";
    let t = Instant::now();
    let report = tokio::time::timeout(
        STEP_TIMEOUT,
        users[0]
            .node()?
            .send_text(users[2].identity, text.to_owned()),
    )
    .await
    .map_err(|_| demo_failure("alice could not send to carol in time"))?
    .map_err(|e| demo_failure(format!("alice could not send to carol: {e}")))?;
    let replicas = match report.outcome {
        SendOutcome::Stored { replicas } => replicas,
        other => {
            return Err(demo_failure(format!(
                "the message to offline carol was not stored in her mailbox: {other:?}"
            )))
        }
    };
    show.step(
        "stored",
        format!("alice → carol (offline): stored on {replicas} mailbox replicas"),
        t.elapsed(),
        json!({"replicas": replicas}),
    );
    let t = Instant::now();
    let carol = start(&carol_home, vec![boot.clone()], false).await?;
    let mut rx = carol.subscribe();
    users[2].handle = Some(carol.clone());
    let collect = carol.collect_mail();
    let (_, got) = tokio::join!(collect, received(&mut rx, text));
    got?;
    show.step(
        "collected",
        "carol comes back online and collects the message".into(),
        t.elapsed(),
        json!({}),
    );

    group_part(show, users).await?;
    Ok(server)
}

/// Wait until `rx` reports a group invite; returns its code.
async fn invited(rx: &mut broadcast::Receiver<NodeEvent>) -> Result<String, Failure> {
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(NodeEvent::GroupInvite(invite)) => return Ok(invite.code),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(demo_failure("a node stopped during the demo"))
                }
            }
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, wait)
        .await
        .map_err(|_| demo_failure(format!("no group invite arrived within {STEP_TIMEOUT:?}")))?
}

/// Send `text` to the group from `from` and wait until every other member has it; returns the
/// time that took and the gossipsub peers and mailbox replicas the sender reached.
async fn group_message(
    users: &[User],
    from: usize,
    group: &str,
    text: &str,
) -> Result<(Duration, usize, usize), Failure> {
    let mut rxs = Vec::new();
    for (i, u) in users.iter().enumerate() {
        if i != from {
            rxs.push(u.node()?.subscribe());
        }
    }
    let t = Instant::now();
    let report = users[from]
        .node()?
        .group_send(group, text.to_owned())
        .await
        .map_err(|e| {
            demo_failure(format!(
                "{} could not send to the group: {e}",
                users[from].name
            ))
        })?;
    let waits = rxs.iter_mut().map(|rx| received(rx, text));
    for r in futures::future::join_all(waits).await {
        r?;
    }
    Ok((t.elapsed(), report.peers, report.stored_replicas))
}

async fn group_part(show: &mut Show, users: &[User]) -> Result<(), Failure> {
    show.heading("A group conversation (gossipsub, sender keys, group mailbox)");
    let t = Instant::now();
    let group = users[0]
        .node()?
        .group_create("weekend")
        .await
        .map_err(|e| demo_failure(format!("alice could not create the group: {e}")))?;
    show.step(
        "group_created",
        format!("alice creates the group \"{}\"", group.name),
        t.elapsed(),
        json!({"group": group.id}),
    );

    let t = Instant::now();
    for u in &users[1..] {
        let mut rx = u.node()?.subscribe();
        users[0]
            .node()?
            .group_invite(&group.id, &u.identity)
            .await
            .map_err(|e| demo_failure(format!("alice could not invite {}: {e}", u.name)))?;
        let code = invited(&mut rx).await?;
        u.node()?
            .group_join(&code)
            .await
            .map_err(|e| demo_failure(format!("{} could not join: {e}", u.name)))?;
    }
    show.step(
        "group_joined",
        "bob, carol and dave invited over 1:1 and joined".into(),
        t.elapsed(),
        json!({"members": users.len()}),
    );

    let (took, peers, replicas) = group_message(
        users,
        0,
        &group.id,
        "Hello everyone, welcome to the weekend group!",
    )
    .await?;
    show.step(
        "group_message",
        "alice → group, until all three others have it".into(),
        took,
        json!({
            "from": "alice",
            "received_by": users.len() - 1,
            "gossip_peers": peers,
            "stored_replicas": replicas,
        }),
    );
    let t = Instant::now();
    group_message(users, 1, &group.id, "Thanks Alice!").await?;
    group_message(users, 2, &group.id, "Count me in.").await?;
    show.step(
        "group_replies",
        "bob and carol reply; everybody has both".into(),
        t.elapsed(),
        json!({"received_by": users.len() - 1}),
    );
    Ok(())
}
