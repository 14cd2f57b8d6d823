//! Real nodes over loopback TCP, each with its own RocksDB home: presence lookup and direct
//! delivery between two users through a third node as the only bootstrap; hostile bytes on the
//! direct protocol; invalid DHT records pushed at a node.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{
    kad::{self, store::MemoryStore},
    noise, request_response,
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm,
};
use meshchat_node::{
    direct::{DirectReply, DirectRequest, DirectResponse, RejectReason, MAX_BATCH_ENVELOPES},
    storage::{Direction, MessageFilter, Status, Storage},
    Node, NodeConfig, NodeEvent, NodeHandle, SendOutcome,
};
use meshchat_protocol::{
    addressing::{epoch, first_contact_mailbox, pair_secret},
    content::{Content, MessageId},
    envelope::{open_pair, Envelope, EnvelopeError, PairEnvelopeKey},
    records::{self, bundle_record_key},
    replay::ReplayCache,
    session::{seal_message, seal_pair_message, SessionRecord},
    Identity, MailboxKeys, PrekeySecrets, PublicIdentity, VerifiedBundle, Wire,
};
use rand::rngs::OsRng;
use tempfile::TempDir;
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(30);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

struct TestNode {
    _home: TempDir,
    handle: NodeHandle,
    identity: Identity,
    addr: Multiaddr,
}

/// Start a node on loopback with a fresh identity in its own home.
async fn start(bootstrap: Vec<Multiaddr>) -> TestNode {
    start_with(bootstrap, true).await
}

/// Start a node; `serve_mailbox: false` makes it refuse to be a mailbox replica.
async fn start_with(bootstrap: Vec<Multiaddr>, serve_mailbox: bool) -> TestNode {
    start_full(bootstrap, serve_mailbox, None).await
}

/// Start a node, with its own idle-connection timeout if `idle` is given.
async fn start_full(
    bootstrap: Vec<Multiaddr>,
    serve_mailbox: bool,
    idle: Option<Duration>,
) -> TestNode {
    let home = tempfile::tempdir().expect("tempdir");
    let identity = Identity::generate(&mut OsRng);
    {
        let storage = Storage::open(home.path()).expect("open storage");
        storage.save_identity(&identity).expect("save identity");
    }
    let mut config = NodeConfig::new(home.path());
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    config.bootstrap = bootstrap;
    config.dht_server = true;
    config.send_timeout = Duration::from_secs(10);
    config.mailbox.serve = serve_mailbox;
    if let Some(idle) = idle {
        config.limits.idle_connection_timeout = idle;
    }
    let handle = Node::start(config).await.expect("node starts");
    let status = handle.status().await.expect("status");
    let addr: Multiaddr = status
        .listen_addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .expect("a TCP listen address")
        .parse()
        .expect("multiaddr");
    assert!(addr
        .to_string()
        .ends_with(&format!("/p2p/{}", handle.peer_id())));
    TestNode {
        _home: home,
        handle,
        identity,
        addr,
    }
}

/// A bootstrap node and two users who know each other, with their records published.
async fn mesh() -> (TestNode, TestNode, TestNode) {
    mesh_with(true).await
}

/// [`mesh`], with a bootstrap node that serves mailboxes or not.
async fn mesh_with(boot_serves_mailboxes: bool) -> (TestNode, TestNode, TestNode) {
    mesh_configured(boot_serves_mailboxes, None).await
}

/// [`mesh_with`], every node with its own idle-connection timeout if `idle` is given.
async fn mesh_configured(
    boot_serves_mailboxes: bool,
    idle: Option<Duration>,
) -> (TestNode, TestNode, TestNode) {
    let boot = start_full(Vec::new(), boot_serves_mailboxes, idle).await;
    let a = start_full(vec![boot.addr.clone()], true, idle).await;
    let b = start_full(vec![boot.addr.clone()], true, idle).await;
    a.handle
        .add_contact("bob".into(), b.identity.public())
        .await
        .expect("add bob");
    b.handle
        .add_contact("alice".into(), a.identity.public())
        .await
        .expect("add alice");
    for n in [&a, &b] {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let report = n.handle.publish_records().await.expect("publish");
            if report.bundle_published && report.presence_published == 1 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "records not published: {report:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    (boot, a, b)
}

/// The next message received by a subscriber.
async fn next_message(
    rx: &mut broadcast::Receiver<NodeEvent>,
) -> meshchat_node::storage::StoredMessage {
    tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await.expect("event stream open") {
                NodeEvent::MessageReceived(m) => return m,
                _ => continue,
            }
        }
    })
    .await
    .expect("a message arrives")
}

fn incoming(
    storage: &Storage,
    peer: &PublicIdentity,
) -> Vec<meshchat_node::storage::StoredMessage> {
    storage
        .messages(&MessageFilter {
            peer: Some(*peer),
            direction: Some(Direction::In),
            ..MessageFilter::default()
        })
        .expect("messages")
        .into_iter()
        .map(|(_, m)| m)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_users_exchange_messages_both_ways_through_presence_and_direct_delivery() {
    let (boot, a, b) = mesh().await;
    let mut a_events = a.handle.subscribe();
    let mut b_events = b.handle.subscribe();

    // First message: no session yet, so A fetches B's bundle, runs X3DH, and finds B's node
    // through B's presence record for A.
    let report = a
        .handle
        .send_text(b.identity.public(), "hello bob".into())
        .await
        .expect("send");
    assert_eq!(report.outcome, SendOutcome::Delivered);
    let got = next_message(&mut b_events).await;
    assert_eq!(got.body, "hello bob");
    assert_eq!(got.peer, a.identity.public());
    assert_eq!(got.id, report.message_id);
    assert_eq!(got.seq, 1);

    // The reply goes the other way, on the session A started.
    let reply = b
        .handle
        .send_text(a.identity.public(), "hi alice".into())
        .await
        .expect("reply");
    assert_eq!(reply.outcome, SendOutcome::Delivered);
    let got = next_message(&mut a_events).await;
    assert_eq!(got.body, "hi alice");
    assert_eq!(got.peer, b.identity.public());

    // More messages keep their order.
    for text in ["two", "three"] {
        let r = a
            .handle
            .send_text(b.identity.public(), text.into())
            .await
            .expect("send");
        assert_eq!(r.outcome, SendOutcome::Delivered);
        assert_eq!(next_message(&mut b_events).await.body, text);
    }
    let bodies: Vec<(u64, String)> = incoming(b.handle.storage(), &a.identity.public())
        .into_iter()
        .map(|m| (m.seq, m.body))
        .collect();
    assert_eq!(
        bodies,
        [
            (1, "hello bob".into()),
            (2, "two".into()),
            (3, "three".into())
        ]
    );

    // The sender's copy says delivered and nothing is left in the outbox (the mark is written
    // just after `send_text` answers).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, mine) = a
            .handle
            .storage()
            .message(&b.identity.public(), Direction::Out, &report.message_id)
            .expect("read")
            .expect("stored");
        if mine.status == Status::Delivered
            && a.handle.storage().outbox().expect("outbox").is_empty()
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{:?}", mine.status);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A and B are connected directly (the bootstrap node only served the DHT).
    let status = a.handle.status().await.expect("status");
    assert!(status
        .connected
        .iter()
        .any(|c| c.peer_id == b.handle.peer_id().to_string() && !c.relayed));
    assert!(status.routing_table_size >= 1);

    // A read receipt from B moves A's message to Read.
    b.handle
        .mark_read(a.identity.public(), vec![report.message_id])
        .await
        .expect("mark read");
    tokio::time::timeout(WAIT, async {
        loop {
            if let NodeEvent::MessageStatus { id, status, .. } =
                a_events.recv().await.expect("events")
            {
                if id == report.message_id && status == Status::Read {
                    return;
                }
            }
        }
    })
    .await
    .expect("read receipt arrives");

    for n in [&a, &b, &boot] {
        n.handle.shutdown().await;
    }
}

/// Whether `node` reaches a moment with no connection before `limit` passes.
async fn becomes_unconnected(node: &TestNode, limit: Duration) -> Result<Duration, String> {
    let start = tokio::time::Instant::now();
    let mut changes: Vec<String> = Vec::new();
    let mut last: Vec<String> = Vec::new();
    while start.elapsed() < limit {
        let mut now: Vec<String> = node
            .handle
            .status()
            .await
            .expect("status")
            .connected
            .into_iter()
            .map(|c| format!("{} at {}", c.peer_id, c.addr))
            .collect();
        if now.is_empty() {
            return Ok(start.elapsed());
        }
        now.sort();
        if now != last {
            changes.push(format!(
                "{:.1} s: {}",
                start.elapsed().as_secs_f64(),
                now.join(", ")
            ));
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(changes.join("; "))
}

/// Idle connections close: gossipsub opens a stream on every connection (its extensions
/// message) and holds it, and libp2p counts open streams as activity, so before
/// `keep_alive` wrapped it no connection of a node ever closed, and a node kept every peer it
/// had ever spoken to. A message afterwards reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_close_and_a_later_message_reconnects() {
    let (boot, a, b) = mesh_configured(true, Some(Duration::from_secs(1))).await;
    // Start-up work (bootstrap, publication, the first collection rounds) is over within
    // seconds; then a one-second idle timeout must be able to close everything.
    for (name, n) in [("alice", &a), ("bob", &b), ("the bootstrap node", &boot)] {
        match becomes_unconnected(n, Duration::from_secs(20)).await {
            Ok(took) => eprintln!("{name} unconnected after {:.1} s", took.as_secs_f64()),
            Err(seen) => panic!(
                "{name} still holds a connection 20 s after start with a 1 s idle timeout; \
                 connections seen: {seen}"
            ),
        }
    }
    let mut inbox = b.handle.subscribe();
    let report = a
        .handle
        .send_text(b.identity.public(), "after the quiet".into())
        .await
        .expect("send");
    assert_eq!(report.outcome, SendOutcome::Delivered);
    let got = next_message(&mut inbox).await;
    assert_eq!(got.body, "after the quiet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_recipient_gets_the_message_from_the_outbox_later() {
    // No node will hold B's mail (the mailbox path is tested in tests/mailbox.rs): the
    // message waits in A's outbox.
    let (boot, a, b) = mesh_with(false).await;
    // One message establishes the session (and both presence records are known).
    let first = a
        .handle
        .send_text(b.identity.public(), "first".into())
        .await
        .expect("send");
    assert_eq!(first.outcome, SendOutcome::Delivered);
    // B writes back, so A's later messages travel in pair envelopes by B's pair mailbox.
    let reply = b
        .handle
        .send_text(a.identity.public(), "reply".into())
        .await
        .expect("send");
    assert_eq!(reply.outcome, SendOutcome::Delivered);

    // B goes away; A's send times out and is queued durably.
    let b_home = b._home;
    let b_identity = b.identity.clone();
    b.handle.shutdown().await;
    drop(b.handle);
    let queued = a
        .handle
        .send_text(b_identity.public(), "while you were away".into())
        .await
        .expect("send");
    let SendOutcome::Queued { reason } = &queued.outcome else {
        panic!("expected Queued, got {:?}", queued.outcome);
    };
    assert!(!reason.is_empty());
    let outbox = a.handle.storage().outbox().expect("outbox");
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].message_id, queued.message_id);
    // What waits is a pair envelope: routed by B's pair mailbox of the day, and B's key for
    // A's pair envelopes opens it (no sealed-sender Diffie-Hellman).
    let queued_env = Envelope::from_wire(&outbox[0].envelope).expect("envelope");
    let pair = pair_secret(&b_identity, &a.identity.public());
    let day = epoch(queued_env.timestamp);
    assert_eq!(
        queued_env.routing_key,
        MailboxKeys::derive(&pair, &b_identity.public(), day).id()
    );
    let key = PairEnvelopeKey::derive(&pair, &b_identity.public(), day);
    assert!(open_pair(&key, &queued_env, now()).is_ok());
    assert_eq!(
        meshchat_protocol::envelope::open(&b_identity, &queued_env, now()),
        Err(EnvelopeError::Undecryptable),
        "not sealed sender"
    );

    // B comes back on the same home (new address, same identity and peer key); the outbox
    // retry finds the new presence record and delivers the same envelope.
    let mut config = NodeConfig::new(b_home.path());
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    config.bootstrap = vec![boot.addr.clone()];
    config.dht_server = true;
    let b2 = Node::start(config).await.expect("restart");
    let mut b_events = b2.subscribe();
    let mut a_events = a.handle.subscribe();
    let got = next_message(&mut b_events).await;
    assert_eq!(got.body, "while you were away");
    assert_eq!(got.id, queued.message_id);
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let NodeEvent::MessageStatus { id, status, .. } =
                a_events.recv().await.expect("events")
            {
                if id == queued.message_id && status == Status::Delivered {
                    return;
                }
            }
        }
    })
    .await
    .expect("A learns it was delivered");
    assert!(a.handle.storage().outbox().expect("outbox").is_empty());
    for h in [&a.handle, &b2, &boot.handle] {
        h.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile input on the direct protocol
// ---------------------------------------------------------------------------------------------

/// Writes raw bytes (no framing of its own) and reads the raw answer.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, _: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        Err(std::io::Error::other("the raw client serves nothing"))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let mut out = Vec::new();
        io.take(4096).read_to_end(&mut out).await?;
        Ok(out)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        Err(std::io::Error::other("the raw client serves nothing"))
    }
}

fn raw_swarm() -> Swarm<request_response::Behaviour<RawCodec>> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| {
            request_response::Behaviour::new(
                [(
                    meshchat_node::direct::PROTOCOL,
                    request_response::ProtocolSupport::Outbound,
                )],
                request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Send `bytes` raw to `peer`; the raw answer, or None if the stream failed.
async fn raw_request(
    swarm: &mut Swarm<request_response::Behaviour<RawCodec>>,
    peer: PeerId,
    addr: &Multiaddr,
    bytes: Vec<u8>,
) -> Option<Vec<u8>> {
    let id = swarm
        .behaviour_mut()
        .send_request_with_addresses(&peer, bytes, vec![addr.clone()]);
    tokio::time::timeout(WAIT, async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) if request_id == id => return (!response.is_empty()).then_some(response),
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    request_id,
                    ..
                }) if request_id == id => return None,
                _ => {}
            }
        }
    })
    .await
    .expect("the node answers or closes the stream")
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// One framed direct request carrying `envelopes`.
fn batch(envelopes: &[Envelope]) -> Vec<u8> {
    let request = DirectRequest {
        envelopes: envelopes.to_vec(),
    };
    frame(&request.to_wire().expect("request encodes"))
}

/// One framed direct request carrying `envelope` alone.
fn one(envelope: &Envelope) -> Vec<u8> {
    batch(std::slice::from_ref(envelope))
}

fn parse_reply(raw: &[u8]) -> DirectReply {
    let len = u32::from_be_bytes(raw[..4].try_into().expect("prefix")) as usize;
    assert_eq!(raw.len(), 4 + len, "one frame");
    DirectReply::from_wire(&raw[4..]).expect("a direct reply")
}

/// The answer that acknowledges `envelope` (a `duplicate` or not).
fn accepted_envelope(envelope: &Envelope, duplicate: bool) -> DirectResponse {
    DirectResponse::Accepted {
        envelope_id: envelope.id(),
        duplicate,
    }
}

/// The answer to the one envelope of a request.
fn parse_response(raw: &[u8]) -> DirectResponse {
    match parse_reply(raw) {
        DirectReply::Each(each) if each.len() == 1 => each[0],
        other => panic!("expected one answer, got {other:?}"),
    }
}

/// B's current bundle, as a stranger would fetch it.
/// Like the one the node publishes, it has no one-time prekeys: strangers who seal first messages
/// with it never compete for one.
fn bundle_of(node: &TestNode) -> VerifiedBundle {
    let bytes = node
        .handle
        .storage()
        .prekeys()
        .expect("read prekeys")
        .expect("prekeys saved at start");
    let full = PrekeySecrets::from_wire(&bytes)
        .expect("prekeys decode")
        .bundle(&node.identity);
    meshchat_protocol::PrekeyBundle::sign(
        &node.identity,
        full.version,
        full.signed_prekey,
        Vec::new(),
        full.created_at,
        full.expires_at,
    )
    .verify(now())
    .expect("bundle verifies")
}

/// A first message from `from` to `to` (a stranger, no contact), sealed at `at`.
fn first_message(from: &Identity, to: &TestNode, body: &str, at: u64) -> Envelope {
    let content = Content::Text {
        id: MessageId::random(&mut OsRng),
        seq: 1,
        sent_at_ms: at * 1000,
        body: body.into(),
    };
    let mut record = SessionRecord::new();
    seal_message(
        from,
        &mut record,
        Some(&bundle_of(to)),
        &to.identity.public(),
        first_contact_mailbox(&to.identity.public()),
        at,
        3600,
        &content.encode().expect("content"),
        &mut OsRng,
    )
    .expect("seal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_is_answered_envelope_by_envelope_and_bad_batches_as_a_whole() {
    let b = start(Vec::new()).await;
    let mut b_events = b.handle.subscribe();
    let b_peer = b.handle.peer_id();
    let mut mallory = raw_swarm();

    // Two strangers' genuine first messages, a forged one, an expired one and a copy of the
    // first, in one request: each gets its own answer, in request order.
    let dave = Identity::generate(&mut OsRng);
    let erin = Identity::generate(&mut OsRng);
    let from_dave = first_message(&dave, &b, "dave, first in the batch", now());
    let from_erin = first_message(&erin, &b, "erin, last in the batch", now());
    let mut forged = first_message(&dave, &b, "forged", now());
    forged.ciphertext[20] ^= 0x40;
    let expired = first_message(&erin, &b, "expired", now() - 7200);
    let request = batch(&[
        from_dave.clone(),
        forged,
        expired,
        from_dave.clone(),
        from_erin.clone(),
    ]);
    let answer = raw_request(&mut mallory, b_peer, &b.addr, request)
        .await
        .expect("answered");
    assert_eq!(
        parse_reply(&answer),
        DirectReply::Each(vec![
            accepted_envelope(&from_dave, false),
            DirectResponse::Rejected {
                reason: RejectReason::Undecryptable
            },
            DirectResponse::Rejected {
                reason: RejectReason::Expired
            },
            accepted_envelope(&from_dave, true),
            accepted_envelope(&from_erin, false),
        ])
    );
    let mut bodies = vec![
        next_message(&mut b_events).await.body,
        next_message(&mut b_events).await.body,
    ];
    bodies.sort();
    assert_eq!(
        bodies,
        ["dave, first in the batch", "erin, last in the batch"]
    );
    assert_eq!(incoming(b.handle.storage(), &dave.public()).len(), 1);
    assert_eq!(incoming(b.handle.storage(), &erin.public()).len(), 1);

    // No envelopes, or more than a request may carry: refused whole, nothing processed.
    let refused = DirectReply::Refused {
        reason: RejectReason::Malformed,
    };
    let answer = raw_request(&mut mallory, b_peer, &b.addr, batch(&[]))
        .await
        .expect("answered");
    assert_eq!(parse_reply(&answer), refused);
    let frank = Identity::generate(&mut OsRng);
    let too_many: Vec<Envelope> = (0..=MAX_BATCH_ENVELOPES)
        .map(|i| first_message(&frank, &b, &format!("frank {i}"), now()))
        .collect();
    let answer = raw_request(&mut mallory, b_peer, &b.addr, batch(&too_many))
        .await
        .expect("answered");
    assert_eq!(parse_reply(&answer), refused);
    assert!(incoming(b.handle.storage(), &frank.public()).is_empty());
    b.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_direct_requests_are_rejected_and_real_messages_still_arrive() {
    let (boot, a, b) = mesh().await;
    let mut b_events = b.handle.subscribe();
    let b_peer = b.handle.peer_id();
    let mut mallory = raw_swarm();

    let rejected = |reason| DirectResponse::Rejected { reason };
    let refused = |reason| DirectReply::Refused { reason };
    // Garbage inside a well-formed frame.
    let answer = raw_request(&mut mallory, b_peer, &b.addr, frame(&[1, 2, 3, 4, 5]))
        .await
        .expect("answered");
    assert_eq!(parse_reply(&answer), refused(RejectReason::Malformed));

    // A length prefix of 4 GiB: refused from the prefix alone.
    let mut huge = vec![0xff, 0xff, 0xff, 0xff];
    huge.extend_from_slice(&[0u8; 64]);
    let answer = raw_request(&mut mallory, b_peer, &b.addr, huge)
        .await
        .expect("answered");
    assert_eq!(parse_reply(&answer), refused(RejectReason::TooLarge));

    // A frame one byte over the request limit.
    let over = vec![1u8; DirectRequest::MAX_ENCODED + 1];
    let answer = raw_request(&mut mallory, b_peer, &b.addr, frame(&over)).await;
    // The node answers from the prefix while the body is still arriving; the answer may be
    // lost when it then closes the stream.
    if let Some(answer) = answer {
        assert_eq!(parse_reply(&answer), refused(RejectReason::TooLarge));
    }

    // A real first message from a stranger, with one ciphertext byte flipped: forged.
    let carol = Identity::generate(&mut OsRng);
    let genuine = first_message(&carol, &b, "hello from carol", now());
    let mut forged = genuine.clone();
    forged.ciphertext[10] ^= 0x01;
    let answer = raw_request(&mut mallory, b_peer, &b.addr, one(&forged))
        .await
        .expect("answered");
    assert_eq!(
        parse_response(&answer),
        rejected(RejectReason::Undecryptable)
    );

    // An envelope sealed 2 hours ago with a TTL of 1 hour: expired.
    let old = first_message(&carol, &b, "old news", now() - 7200);
    let answer = raw_request(&mut mallory, b_peer, &b.addr, one(&old))
        .await
        .expect("answered");
    assert_eq!(parse_response(&answer), rejected(RejectReason::Expired));

    // The genuine envelope is accepted and shown once…
    let bytes = one(&genuine);
    let answer = raw_request(&mut mallory, b_peer, &b.addr, bytes.clone())
        .await
        .expect("answered");
    assert_eq!(
        parse_response(&answer),
        DirectResponse::Accepted {
            envelope_id: genuine.id(),
            duplicate: false
        }
    );
    let got = next_message(&mut b_events).await;
    assert_eq!(got.body, "hello from carol");
    assert_eq!(got.peer, carol.public());

    // …and its replay is acknowledged as a duplicate and not shown again.
    let answer = raw_request(&mut mallory, b_peer, &b.addr, bytes)
        .await
        .expect("answered");
    assert_eq!(
        parse_response(&answer),
        DirectResponse::Accepted {
            envelope_id: genuine.id(),
            duplicate: true
        }
    );

    // B still delivers real messages.
    let report = a
        .handle
        .send_text(b.identity.public(), "still there?".into())
        .await
        .expect("send");
    assert_eq!(report.outcome, SendOutcome::Delivered);
    let got = next_message(&mut b_events).await;
    assert_eq!(got.body, "still there?");
    assert_eq!(
        incoming(b.handle.storage(), &carol.public()).len(),
        1,
        "carol's message shown once"
    );

    // No replay cache corruption: B's stored replay cache decodes.
    let cache = b
        .handle
        .storage()
        .replay_cache()
        .expect("read")
        .expect("saved");
    assert!(ReplayCache::from_wire(&cache).is_ok());

    for n in [&a, &b, &boot] {
        n.handle.shutdown().await;
    }
}

/// A text message's content with sequence number `seq`.
fn text(seq: u64, body: &str) -> Vec<u8> {
    Content::Text {
        id: MessageId::random(&mut OsRng),
        seq,
        sent_at_ms: now() * 1000,
        body: body.into(),
    }
    .encode()
    .expect("content")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pair_envelopes_open_by_their_routing_key_and_older_sealed_ones_still_do() {
    let (boot, _a, b) = mesh().await;
    let mut b_events = b.handle.subscribe();
    let b_peer = b.handle.peer_id();
    let b_public = b.identity.public();
    let mut raw = raw_swarm();
    let send = one;
    let accepted = |raw: &[u8]| {
        matches!(
            parse_response(raw),
            DirectResponse::Accepted {
                duplicate: false,
                ..
            }
        )
    };

    // Sam, a stranger, starts a session with B (sealed sender, first-contact mailbox).
    let sam = Identity::generate(&mut OsRng);
    let mut record = SessionRecord::new();
    let t = now();
    let first = seal_message(
        &sam,
        &mut record,
        Some(&bundle_of(&b)),
        &b_public,
        first_contact_mailbox(&b_public),
        t,
        3600,
        &text(1, "one"),
        &mut OsRng,
    )
    .expect("seal");
    let answer = raw_request(&mut raw, b_peer, &b.addr, send(&first))
        .await
        .expect("answer");
    assert!(accepted(&answer), "{:?}", parse_response(&answer));
    assert_eq!(next_message(&mut b_events).await.body, "one");

    // A pair envelope by B's pair mailbox with Sam: B finds Sam by the routing key.
    let pair = pair_secret(&sam, &b_public);
    let route = MailboxKeys::derive(&pair, &b_public, epoch(t)).id();
    let key = PairEnvelopeKey::derive(&pair, &b_public, epoch(t));
    let second = seal_pair_message(
        &mut record,
        &b_public,
        &key,
        route,
        t,
        3600,
        &text(2, "two"),
        &mut OsRng,
    )
    .expect("seal");
    let answer = raw_request(&mut raw, b_peer, &b.addr, send(&second))
        .await
        .expect("answer");
    assert!(accepted(&answer), "{:?}", parse_response(&answer));
    assert_eq!(next_message(&mut b_events).await.body, "two");

    // Sealed sender by the same pair mailbox (as sent before pair envelopes): still opens.
    let third = seal_message(
        &sam,
        &mut record,
        None,
        &b_public,
        route,
        t,
        3600,
        &text(3, "three"),
        &mut OsRng,
    )
    .expect("seal");
    let answer = raw_request(&mut raw, b_peer, &b.addr, send(&third))
        .await
        .expect("answer");
    assert!(accepted(&answer), "{:?}", parse_response(&answer));
    assert_eq!(next_message(&mut b_events).await.body, "three");

    // Under the wrong key (the other direction's), by the right routing key: refused, and
    // nothing is shown; B keeps serving.
    let wrong = PairEnvelopeKey::derive(&pair, &sam.public(), epoch(t));
    let mut copy = record.clone();
    let forged = seal_pair_message(
        &mut copy,
        &b_public,
        &wrong,
        route,
        t,
        3600,
        &text(4, "forged"),
        &mut OsRng,
    )
    .expect("seal");
    let answer = raw_request(&mut raw, b_peer, &b.addr, send(&forged))
        .await
        .expect("answer");
    assert!(
        matches!(parse_response(&answer), DirectResponse::Rejected { .. }),
        "{:?}",
        parse_response(&answer)
    );
    let fourth = seal_pair_message(
        &mut record,
        &b_public,
        &key,
        route,
        t,
        3600,
        &text(4, "four"),
        &mut OsRng,
    )
    .expect("seal");
    let answer = raw_request(&mut raw, b_peer, &b.addr, send(&fourth))
        .await
        .expect("answer");
    assert!(accepted(&answer), "{:?}", parse_response(&answer));
    assert_eq!(next_message(&mut b_events).await.body, "four");

    // Several of Sam's pair envelopes in one request (opened one after the other on the
    // session state carried from the previous one, written together), with a forged one and a
    // copy among them: each answered in its place, each message shown once, in order.
    let mut pair_message = |seq, body: &str| {
        seal_pair_message(
            &mut record,
            &b_public,
            &key,
            route,
            t,
            3600,
            &text(seq, body),
            &mut OsRng,
        )
        .expect("seal")
    };
    let five = pair_message(5, "five");
    let six = pair_message(6, "six");
    let seven = pair_message(7, "seven");
    let answer = raw_request(
        &mut raw,
        b_peer,
        &b.addr,
        batch(&[
            five.clone(),
            six.clone(),
            forged,
            six.clone(),
            seven.clone(),
        ]),
    )
    .await
    .expect("answer");
    assert_eq!(
        parse_reply(&answer),
        DirectReply::Each(vec![
            accepted_envelope(&five, false),
            accepted_envelope(&six, false),
            DirectResponse::Rejected {
                reason: RejectReason::Undecryptable
            },
            accepted_envelope(&six, true),
            accepted_envelope(&seven, false),
        ])
    );
    for body in ["five", "six", "seven"] {
        assert_eq!(next_message(&mut b_events).await.body, body);
    }
    // Written for good: a copy in a later request is a duplicate, and the next message opens
    // on the state the request left.
    let answer = raw_request(&mut raw, b_peer, &b.addr, send(&six))
        .await
        .expect("answer");
    assert_eq!(parse_response(&answer), accepted_envelope(&six, true));
    let eight = pair_message(8, "eight");
    let answer = raw_request(&mut raw, b_peer, &b.addr, send(&eight))
        .await
        .expect("answer");
    assert!(accepted(&answer), "{:?}", parse_response(&answer));
    assert_eq!(next_message(&mut b_events).await.body, "eight");
    assert_eq!(incoming(b.handle.storage(), &sam.public()).len(), 8);
    boot.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_keeps_sending_garbage_is_disconnected_and_blocked() {
    let b = start(Vec::new()).await;
    let b_peer = b.handle.peer_id();
    let mut mallory = raw_swarm();
    let strikes = meshchat_node::Limits::default().max_strikes;
    for i in 1..=strikes {
        let answer = raw_request(&mut mallory, b_peer, &b.addr, frame(&[9, 9, 9])).await;
        match answer {
            Some(answer) => assert_eq!(
                parse_reply(&answer),
                DirectReply::Refused {
                    reason: RejectReason::Malformed
                }
            ),
            // The last strike closes the connection, possibly before the answer leaves.
            None => assert_eq!(i, strikes, "answered until blocked"),
        }
    }
    // Blocked now: the connection is closed and a new one is refused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let carol = Identity::generate(&mut OsRng);
    let genuine = first_message(&carol, &b, "let me in", now());
    let answer = raw_request(&mut mallory, b_peer, &b.addr, one(&genuine)).await;
    assert_eq!(answer, None, "a blocked peer gets no answer");
    let status = b.handle.status().await.expect("status");
    assert!(!status
        .connected
        .iter()
        .any(|c| c.peer_id == mallory.local_peer_id().to_string()));

    // Another peer is still served.
    let mut other = raw_swarm();
    let answer = raw_request(&mut other, b_peer, &b.addr, one(&genuine))
        .await
        .expect("answered");
    assert!(matches!(
        parse_response(&answer),
        DirectResponse::Accepted {
            duplicate: false,
            ..
        }
    ));
    b.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Invalid DHT records
// ---------------------------------------------------------------------------------------------

#[derive(NetworkBehaviour)]
struct KadOnly {
    kad: kad::Behaviour<MemoryStore>,
}

fn kad_swarm() -> Swarm<KadOnly> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let mut config = kad::Config::new(meshchat_node::KAD_PROTOCOL);
            config.set_max_packet_size(64 * 1024);
            let store = MemoryStore::with_config(
                peer,
                kad::store::MemoryStoreConfig {
                    max_value_bytes: 64 * 1024,
                    ..Default::default()
                },
            );
            KadOnly {
                kad: kad::Behaviour::with_config(peer, store, config),
            }
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Push a record straight to `target` and wait for the push to finish.
async fn push(swarm: &mut Swarm<KadOnly>, target: PeerId, key: Vec<u8>, value: Vec<u8>) {
    let record = kad::Record::new(key, value);
    let id =
        swarm
            .behaviour_mut()
            .kad
            .put_record_to(record, std::iter::once(target), kad::Quorum::One);
    tokio::time::timeout(WAIT, async {
        loop {
            if let SwarmEvent::Behaviour(KadOnlyEvent::Kad(kad::Event::OutboundQueryProgressed {
                id: qid,
                result: kad::QueryResult::PutRecord(_),
                ..
            })) = swarm.select_next_some().await
            {
                if qid == id {
                    return;
                }
            }
        }
    })
    .await
    .expect("the push completes");
}

/// The value `node` stores under `key`, waiting for the (off-loop) check to finish.
async fn stored_eventually(node: &TestNode, key: &[u8]) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(v) = node.handle.local_record(key.to_vec()).await.expect("query") {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the record is stored")
}

/// `node` holds `expected` under `key` and keeps holding it for half a second (the check of a
/// pushed record takes microseconds; a record wrongly admitted would show up).
async fn stays(node: &TestNode, key: &[u8], expected: Option<Vec<u8>>) {
    for _ in 0..25 {
        assert_eq!(
            node.handle.local_record(key.to_vec()).await.expect("query"),
            expected
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_dht_records_are_not_stored() {
    let x = start(Vec::new()).await;
    let target = x.handle.peer_id();
    let mut mallory = kad_swarm();
    mallory
        .behaviour_mut()
        .kad
        .add_address(&target, x.addr.clone());
    let t = now();

    // A valid bundle of someone is stored (the control case)…
    let victor = Identity::generate(&mut OsRng);
    let (mut secrets, v1) = PrekeySecrets::generate(&victor, t, &mut OsRng);
    let v2 = secrets.rotate(&victor, t, &mut OsRng);
    assert!(v2.version > v1.version);
    let key = bundle_record_key(&victor.public());
    let v2_bytes = v2.to_wire().expect("encode");
    push(&mut mallory, target, key.clone(), v2_bytes.clone()).await;
    assert_eq!(stored_eventually(&x, &key).await, v2_bytes);
    // …and cannot be rolled back to an older version.
    push(
        &mut mallory,
        target,
        key.clone(),
        v1.to_wire().expect("encode"),
    )
    .await;
    stays(&x, &key, Some(v2_bytes)).await;

    // Forged: a bundle whose signature does not verify.
    let wendy = Identity::generate(&mut OsRng);
    let (_, mut forged) = PrekeySecrets::generate(&wendy, t, &mut OsRng);
    forged.signature[0] ^= 0x01;
    let wendy_key = bundle_record_key(&wendy.public());
    push(
        &mut mallory,
        target,
        wendy_key.clone(),
        forged.to_wire().expect("encode"),
    )
    .await;
    stays(&x, &wendy_key, None).await;

    // Someone's valid bundle under someone else's key.
    push(
        &mut mallory,
        target,
        wendy_key.clone(),
        v1.to_wire().expect("encode"),
    )
    .await;
    stays(&x, &wendy_key, None).await;

    // Expired: a correctly signed bundle whose validity ended long ago.
    let old = Identity::generate(&mut OsRng);
    let (_, expired) = PrekeySecrets::generate(&old, t - 40 * 86_400, &mut OsRng);
    let old_key = bundle_record_key(&old.public());
    push(
        &mut mallory,
        target,
        old_key.clone(),
        expired.to_wire().expect("encode"),
    )
    .await;
    stays(&x, &old_key, None).await;

    // Oversized: 17 KiB under a bundle key.
    let big = Identity::generate(&mut OsRng);
    let big_key = bundle_record_key(&big.public());
    push(&mut mallory, target, big_key.clone(), vec![1u8; 17 * 1024]).await;
    stays(&x, &big_key, None).await;

    // Garbage under an unknown key kind.
    let mut odd_key = vec![0x7f];
    odd_key.extend_from_slice(&[0u8; 32]);
    push(&mut mallory, target, odd_key.clone(), vec![1, 2, 3]).await;
    stays(&x, &odd_key, None).await;

    // A presence record with a forged signature.
    let (p, q) = (
        Identity::generate(&mut OsRng),
        Identity::generate(&mut OsRng),
    );
    let keys = records::PresenceKeys::derive(
        &meshchat_protocol::addressing::pair_secret(&p, &q.public()),
        &p.public(),
        epoch(t),
    );
    let presence = records::Presence {
        peers: vec![records::PresencePeer {
            peer_id: PeerId::random().to_bytes(),
            addrs: Vec::new(),
        }],
    };
    let mut record = keys.seal(&presence, 1, t + 3600, &mut OsRng).expect("seal");
    let good = record.to_wire().expect("encode");
    record.signature[5] ^= 0x10;
    push(
        &mut mallory,
        target,
        keys.dht_key(),
        record.to_wire().expect("encode"),
    )
    .await;
    stays(&x, &keys.dht_key(), None).await;
    // The genuine one is stored.
    push(&mut mallory, target, keys.dht_key(), good.clone()).await;
    assert_eq!(stored_eventually(&x, &keys.dht_key()).await, good);

    // The node still answers.
    assert!(x.handle.status().await.is_ok());
    x.handle.shutdown().await;
}

/// The bundle a user publishes in the DHT carries no one-time prekeys: anyone can read it, so
/// two strangers could otherwise pick the same one and the second first message could never be
/// opened. Three strangers whose first messages use the published bundle all get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_published_bundle_has_no_one_time_prekeys_and_strangers_never_collide() {
    let (boot, _a, b) = mesh().await;
    let key = bundle_record_key(&b.identity.public());
    let deadline = tokio::time::Instant::now() + WAIT;
    let value = loop {
        if let Some(v) = boot
            .handle
            .local_record(key.clone())
            .await
            .expect("local record")
        {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bundle not in the DHT"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let published = meshchat_protocol::PrekeyBundle::from_wire(&value)
        .expect("bundle decodes")
        .verify(now())
        .expect("bundle verifies");
    assert!(published.one_time_prekeys().is_empty(), "{published:?}");

    let mut rx = b.handle.subscribe();
    for (i, stranger) in (0..3).map(|_| Identity::generate(&mut OsRng)).enumerate() {
        let content = Content::Text {
            id: meshchat_protocol::content::MessageId::random(&mut OsRng),
            seq: 1,
            sent_at_ms: now() * 1000,
            body: format!("stranger {i}"),
        };
        let mut record = meshchat_protocol::SessionRecord::new();
        let envelope = meshchat_protocol::seal_message(
            &stranger,
            &mut record,
            Some(&published),
            &b.identity.public(),
            [0u8; 32],
            now(),
            3600,
            &content.encode().expect("content encodes"),
            &mut OsRng,
        )
        .expect("seal a first message against the published bundle");
        let mut swarm = raw_swarm();
        let raw = raw_request(&mut swarm, b.handle.peer_id(), &b.addr, one(&envelope))
            .await
            .expect("an answer");
        assert!(
            matches!(parse_response(&raw), DirectResponse::Accepted { .. }),
            "stranger {i}'s first message is accepted"
        );
    }
    let mut bodies = Vec::new();
    for _ in 0..3 {
        bodies.push(next_message(&mut rx).await.body);
    }
    bodies.sort();
    assert_eq!(bodies, ["stranger 0", "stranger 1", "stranger 2"]);
}
