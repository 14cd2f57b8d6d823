//! The control server over a real Unix socket, with real storage behind a test backend: request
//! round trips, streams, hostile frames, the connection limit and stale sockets.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::stream::BoxStream;
use meshchat_node::{
    control::{
        self, BackendError, Client, ControlBackend, ControlError, ControlErrorKind, ControlRequest,
        ControlResponse, ConversationView, ConversationWith, GroupAnswer, GroupRequest,
        NodeStatusView, SendOutcome, SendOutcomeReport, StatusView,
    },
    groups::GroupView,
    storage::{Direction, Status, Storage, StoredMessage},
};
use meshchat_protocol::{Identity, PublicIdentity, SafetyNumber};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::UnixStream,
    sync::broadcast,
};

/// Real storage; `send_text` records what it was asked and answers `Delivered`; wake-ups come
/// from a broadcast channel the test drives.
#[derive(Clone)]
struct TestBackend {
    storage: Storage,
    sent: Arc<Mutex<Vec<(PublicIdentity, String)>>>,
    wake: broadcast::Sender<()>,
}

#[async_trait::async_trait]
impl ControlBackend for TestBackend {
    fn storage(&self) -> &Storage {
        &self.storage
    }
    async fn status(&self) -> Result<NodeStatusView, BackendError> {
        Ok(NodeStatusView {
            peer_id: "12D3KooWtest".into(),
            user_id: self
                .storage
                .load_identity()
                .map_err(BackendError::from)?
                .user_id()
                .to_string(),
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWtest".into(); 1000],
            external_addrs: vec![],
            connected: vec![],
            routing_table_size: 3,
            nat_status: "unknown".into(),
            relay_reservations: vec![],
            mailbox_replicas_held: 0,
            reachability: Default::default(),
        })
    }
    async fn send_text(
        &self,
        to: PublicIdentity,
        text: String,
    ) -> Result<SendOutcomeReport, BackendError> {
        self.sent.lock().expect("lock").push((to, text));
        Ok(SendOutcomeReport {
            message_id: [7; 16],
            outcome: SendOutcome::Delivered,
        })
    }
    fn message_wakeups(&self) -> Option<BoxStream<'static, ()>> {
        let rx = self.wake.subscribe();
        Some(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => Some(((), rx)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })))
    }
    async fn shutdown(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    home: std::path::PathBuf,
    backend: TestBackend,
    server: Option<control::ControlServer>,
}

fn me() -> Identity {
    Identity::from_seed(&[1; 32])
}

fn bob() -> PublicIdentity {
    Identity::from_seed(&[2; 32]).public()
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().to_path_buf();
    let storage = Storage::open(&home).expect("opens");
    storage.save_identity(&me()).expect("saves");
    let (wake, _) = broadcast::channel(16);
    let backend = TestBackend {
        storage,
        sent: Arc::default(),
        wake,
    };
    let server = control::serve(backend.clone(), &control::socket_path(&home)).expect("serves");
    Fixture {
        _dir: dir,
        home,
        backend,
        server: Some(server),
    }
}

async fn client(home: &Path) -> Client {
    Client::connect(home).await.expect("connects")
}

fn incoming(from: &PublicIdentity, id: u8, body: &str) -> StoredMessage {
    StoredMessage {
        id: [id; 16],
        peer: *from,
        direction: Direction::In,
        seq: u64::from(id),
        sent_at_ms: 1_700_000_000_000,
        received_at_ms: 1_700_000_000_500,
        body: body.into(),
        status: Status::Delivered,
        group: None,
    }
}

fn receive(storage: &Storage, from: &PublicIdentity, id: u8, body: &str) {
    storage
        .commit_incoming(
            &[id; 32],
            from,
            b"session",
            None,
            None,
            Some(&incoming(from, id, body)),
        )
        .expect("commits");
}

fn error_kind(r: &ControlResponse) -> Option<ControlErrorKind> {
    match r {
        ControlResponse::Error { kind, .. } => Some(*kind),
        _ => None,
    }
}

async fn collect(c: &mut Client, req: ControlRequest) -> Vec<ControlResponse> {
    c.send(&req).await.expect("sends");
    let mut out = Vec::new();
    loop {
        let r = c.next_response().await.expect("response");
        let last = r.is_final(&req);
        out.push(r);
        if last {
            return out;
        }
    }
}

#[tokio::test]
async fn requests_round_trip_over_the_socket() {
    let f = fixture().await;
    let mut c = client(&f.home).await;

    let ControlResponse::Id(id) = c.call(&ControlRequest::Id).await.expect("id") else {
        panic!("expected Id");
    };
    assert_eq!(id.user_id, me().user_id().to_string());
    assert!(id.peer_id.starts_with("12D3KooW"), "{}", id.peer_id);

    let bob_id = bob().user_id().to_string();
    let added = c
        .call(&ControlRequest::ContactAdd {
            name: "bob".into(),
            user_id: bob_id.clone(),
        })
        .await
        .expect("adds");
    assert!(
        matches!(&added, ControlResponse::Contact(v) if v.name == "bob" && v.user_id == bob_id)
    );

    // A typo in a user ID is caught with the parser's sentence.
    let mut typo = bob_id.clone();
    typo.replace_range(10..11, if &bob_id[10..11] == "q" { "p" } else { "q" });
    let r = c
        .call(&ControlRequest::ContactAdd {
            name: "carol".into(),
            user_id: typo,
        })
        .await
        .expect("answers");
    match r {
        ControlResponse::Error { kind, message } => {
            assert_eq!(kind, ControlErrorKind::InvalidInput);
            assert!(message.contains("not a valid user ID"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    // Duplicates and bad names are refused.
    let r = c
        .call(&ControlRequest::ContactAdd {
            name: "BOB".into(),
            user_id: bob_id.clone(),
        })
        .await
        .expect("answers");
    assert_eq!(error_kind(&r), Some(ControlErrorKind::InvalidInput));
    let r = c
        .call(&ControlRequest::ContactAdd {
            name: "x\u{1b}[31m".into(),
            user_id: bob_id.clone(),
        })
        .await
        .expect("answers");
    assert_eq!(error_kind(&r), Some(ControlErrorKind::InvalidInput));

    let list = collect(&mut c, ControlRequest::ContactList).await;
    assert_eq!(list.len(), 2);
    assert!(matches!(&list[0], ControlResponse::Contact(v) if v.name == "bob" && !v.verified));
    assert_eq!(list[1], ControlResponse::End);

    let ControlResponse::Verify(v) = c
        .call(&ControlRequest::ContactVerify {
            name: "Bob".into(),
            confirm: false,
        })
        .await
        .expect("verify")
    else {
        panic!("expected Verify");
    };
    assert_eq!(
        v.safety_number,
        SafetyNumber::compute(&me().public(), &bob()).to_string()
    );
    assert!(!v.contact.verified);
    let ControlResponse::Verify(v) = c
        .call(&ControlRequest::ContactVerify {
            name: "bob".into(),
            confirm: true,
        })
        .await
        .expect("verify")
    else {
        panic!("expected Verify");
    };
    assert!(v.contact.verified);
    assert!(
        f.backend
            .storage
            .contact_by_name("bob")
            .expect("exists")
            .verified
    );

    // Send resolves a contact name and a user ID, and refuses what is neither.
    let ControlResponse::Sent(s) = c
        .call(&ControlRequest::Send {
            to: "bob".into(),
            text: "hi".into(),
        })
        .await
        .expect("sends")
    else {
        panic!("expected Sent");
    };
    assert_eq!(s.outcome, SendOutcome::Delivered);
    assert_eq!(s.to_name.as_deref(), Some("bob"));
    assert_eq!(s.message_id, hex::encode([7; 16]));
    let carol = Identity::from_seed(&[3; 32]).public();
    let r = c
        .call(&ControlRequest::Send {
            to: carol.user_id().to_string(),
            text: "yo".into(),
        })
        .await
        .expect("sends");
    assert!(matches!(r, ControlResponse::Sent(ref s) if s.to_name.is_none()));
    assert_eq!(
        *f.backend.sent.lock().expect("lock"),
        vec![(bob(), "hi".to_string()), (carol, "yo".to_string())]
    );
    let r = c
        .call(&ControlRequest::Send {
            to: "nobody".into(),
            text: "x".into(),
        })
        .await
        .expect("answers");
    assert_eq!(error_kind(&r), Some(ControlErrorKind::NotFound));
    let r = c
        .call(&ControlRequest::Send {
            to: "bob".into(),
            text: "x".repeat(70_000),
        })
        .await
        .expect("answers");
    assert_eq!(error_kind(&r), Some(ControlErrorKind::InvalidInput));

    // Status lists are bounded so the answer fits a frame.
    let ControlResponse::Status(st) = c.call(&ControlRequest::Status).await.expect("status") else {
        panic!("expected Status");
    };
    assert_eq!(st.listen_addrs.len(), control::MAX_STATUS_LIST);

    let r = c
        .call(&ControlRequest::ContactRemove { name: "bob".into() })
        .await
        .expect("removes");
    assert!(matches!(r, ControlResponse::Contact(_)));
    let r = c
        .call(&ControlRequest::ContactRemove { name: "bob".into() })
        .await
        .expect("answers");
    assert_eq!(error_kind(&r), Some(ControlErrorKind::NotFound));
}

#[tokio::test]
async fn inbox_lists_oldest_first_waits_and_follows() {
    let f = fixture().await;
    let storage = f.backend.storage.clone();
    storage.add_contact("bob", &bob()).expect("adds");
    receive(&storage, &bob(), 1, "one");
    receive(&storage, &bob(), 2, "two");

    let mut c = client(&f.home).await;
    let all = collect(
        &mut c,
        ControlRequest::Inbox {
            after_index: None,
            wait_secs: None,
            follow: false,
        },
    )
    .await;
    let texts: Vec<_> = all
        .iter()
        .filter_map(|r| match r {
            ControlResponse::Message(m) => {
                Some((m.text.as_str(), m.peer_name.as_deref(), m.status))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        texts,
        [
            ("one", Some("bob"), StatusView::Delivered),
            ("two", Some("bob"), StatusView::Delivered)
        ]
    );
    assert_eq!(all.last(), Some(&ControlResponse::End));

    // Everything shown is read now: --wait waits for something new, and times out without it.
    let started = std::time::Instant::now();
    let r = collect(
        &mut c,
        ControlRequest::Inbox {
            after_index: None,
            wait_secs: Some(1),
            follow: false,
        },
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(
        r.iter()
            .filter(|r| matches!(r, ControlResponse::Message(_)))
            .count(),
        2
    );
    assert_eq!(
        error_kind(r.last().expect("final")),
        Some(ControlErrorKind::Timeout)
    );

    // A message arriving during the wait ends it.
    let (s2, wake) = (storage.clone(), f.backend.wake.clone());
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        receive(&s2, &bob(), 3, "three");
        let _ = wake.send(());
    });
    let started = std::time::Instant::now();
    let r = collect(
        &mut c,
        ControlRequest::Inbox {
            after_index: Some(1),
            wait_secs: Some(20),
            follow: false,
        },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let texts: Vec<_> = r
        .iter()
        .filter_map(|r| match r {
            ControlResponse::Message(m) => Some(m.text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(texts, ["three"]);
    assert_eq!(r.last(), Some(&ControlResponse::End));

    // Follow streams new messages as they come, until the client leaves.
    let mut f2 = client(&f.home).await;
    f2.send(&ControlRequest::Inbox {
        after_index: Some(1),
        wait_secs: None,
        follow: true,
    })
    .await
    .expect("sends");
    let ControlResponse::Message(m) = f2.next_response().await.expect("message") else {
        panic!("expected a message");
    };
    assert_eq!(m.text, "three");
    receive(&storage, &bob(), 4, "four");
    let _ = f.backend.wake.send(());
    let ControlResponse::Message(m) =
        tokio::time::timeout(Duration::from_secs(5), f2.next_response())
            .await
            .expect("in time")
            .expect("message")
    else {
        panic!("expected a message");
    };
    assert_eq!(m.text, "four");
    drop(f2);

    // The server still answers.
    assert!(matches!(
        c.call(&ControlRequest::Id).await.expect("id"),
        ControlResponse::Id(_)
    ));
}

async fn raw(home: &Path) -> UnixStream {
    UnixStream::connect(control::socket_path(home))
        .await
        .expect("connects")
}

/// Read until the server closes; return the frames' responses that decoded.
async fn read_until_closed(s: &mut UnixStream) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf))
        .await
        .expect("server closes the connection")
        .expect("reads");
    buf
}

#[tokio::test]
async fn hostile_frames_close_that_connection_and_the_server_keeps_serving() {
    let f = fixture().await;

    // Oversized length: an error frame, then close, without reading 4 GiB.
    let mut s = raw(&f.home).await;
    s.write_all(&u32::MAX.to_be_bytes()).await.expect("writes");
    let bytes = read_until_closed(&mut s).await;
    let mut cursor = &bytes[..];
    let frame = control::read_frame(&mut cursor)
        .await
        .expect("frame")
        .expect("one frame");
    let r = <ControlResponse as meshchat_protocol::Wire>::from_wire(&frame).expect("decodes");
    assert_eq!(error_kind(&r), Some(ControlErrorKind::InvalidInput));

    // Garbage payload of a valid length.
    let mut s = raw(&f.home).await;
    s.write_all(&[0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .await
        .expect("writes");
    let bytes = read_until_closed(&mut s).await;
    let mut cursor = &bytes[..];
    let frame = control::read_frame(&mut cursor)
        .await
        .expect("frame")
        .expect("one frame");
    let r = <ControlResponse as meshchat_protocol::Wire>::from_wire(&frame).expect("decodes");
    assert_eq!(error_kind(&r), Some(ControlErrorKind::InvalidInput));

    // A valid request with a hostile length prefix inside.
    let mut s = raw(&f.home).await;
    let mut payload = vec![1u8, 2, 0, 0, 0]; // version 1, variant ContactAdd
    payload.extend_from_slice(&u64::MAX.to_le_bytes());
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    s.write_all(&frame).await.expect("writes");
    assert!(!read_until_closed(&mut s).await.is_empty());

    // Truncated: a header promising 100 bytes, 10 bytes, then the client half-closes.
    let mut s = raw(&f.home).await;
    s.write_all(&[0, 0, 0, 100]).await.expect("writes");
    s.write_all(&[1; 10]).await.expect("writes");
    s.shutdown().await.expect("half-closes");
    assert!(read_until_closed(&mut s).await.is_empty());

    // Empty frame.
    let mut s = raw(&f.home).await;
    s.write_all(&[0, 0, 0, 0]).await.expect("writes");
    assert!(!read_until_closed(&mut s).await.is_empty());

    // Sending a second request before the first answer ended is a protocol violation.
    let mut s = raw(&f.home).await;
    let req = <ControlRequest as meshchat_protocol::Wire>::to_wire(&ControlRequest::Inbox {
        after_index: None,
        wait_secs: Some(30),
        follow: false,
    })
    .expect("encodes");
    let mut frame = (req.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&req);
    s.write_all(&frame).await.expect("writes");
    s.write_all(&frame).await.expect("writes");
    // The server closes with our second frame unread, which the OS may report as a reset.
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "the server must close the connection"
    );

    // The server still answers a well-behaved client.
    let mut c = client(&f.home).await;
    assert!(matches!(
        c.call(&ControlRequest::Id).await.expect("id"),
        ControlResponse::Id(_)
    ));
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_and_served_again_later() {
    let f = fixture().await;
    let mut held = Vec::new();
    for _ in 0..control::MAX_CONNECTIONS {
        let mut c = client(&f.home).await;
        // A round trip makes sure the server has taken a permit for it.
        assert!(matches!(
            c.call(&ControlRequest::Id).await.expect("id"),
            ControlResponse::Id(_)
        ));
        held.push(c);
    }
    let mut extra = client(&f.home).await;
    let r = extra.next_response().await.expect("busy answer");
    assert_eq!(error_kind(&r), Some(ControlErrorKind::Unavailable));
    drop(held);
    // Permits come back when connections close.
    let mut again = None;
    for _ in 0..50 {
        let mut c = client(&f.home).await;
        if let Ok(ControlResponse::Id(_)) = c.call(&ControlRequest::Id).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the server did not recover its permits");
}

#[tokio::test]
async fn invalid_requests_get_an_error_and_the_connection_stays_usable() {
    let f = fixture().await;
    let mut c = client(&f.home).await;
    let r = c
        .call(&ControlRequest::Send {
            to: "bob".into(),
            text: "   ".into(),
        })
        .await
        .expect("answers");
    assert_eq!(error_kind(&r), Some(ControlErrorKind::InvalidInput));
    let r = c
        .call(&ControlRequest::Inbox {
            after_index: None,
            wait_secs: Some(u32::MAX),
            follow: false,
        })
        .await
        .expect("answers");
    assert_eq!(error_kind(&r), Some(ControlErrorKind::InvalidInput));
    let r = c
        .call(&ControlRequest::ContactRemove {
            name: "n".repeat(500),
        })
        .await
        .expect("answers");
    assert_eq!(error_kind(&r), Some(ControlErrorKind::InvalidInput));
    assert!(matches!(
        c.call(&ControlRequest::Id).await.expect("id"),
        ControlResponse::Id(_)
    ));
}

#[tokio::test]
async fn socket_is_private_stale_files_are_replaced_and_live_ones_kept() {
    let mut f = fixture().await;
    let path = control::socket_path(&f.home);
    let mode = std::fs::metadata(&path)
        .expect("exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A second server on a live socket is refused.
    let err = control::serve(f.backend.clone(), &path).expect_err("live socket");
    assert!(
        matches!(err, ControlError::AlreadyServing { .. }),
        "{err:?}"
    );

    // Shutting down removes the socket; clients then see NotRunning.
    f.server.take().expect("server").shutdown().await;
    assert!(!path.exists());
    assert!(matches!(
        Client::connect(&f.home).await,
        Err(ControlError::NotRunning { .. })
    ));

    // A stale socket file (as after a crash) is removed and replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("binds"));
    assert!(path.exists());
    assert!(matches!(
        Client::connect(&f.home).await,
        Err(ControlError::NotRunning { .. })
    ));
    let server = control::serve(f.backend.clone(), &path).expect("replaces the stale socket");
    let mut c = client(&f.home).await;
    assert!(matches!(
        c.call(&ControlRequest::Id).await.expect("id"),
        ControlResponse::Id(_)
    ));
    drop(c);
    drop(server);

    // Something that is not a socket is left alone.
    std::fs::write(&path, b"not a socket").expect("writes");
    let err = control::serve(f.backend.clone(), &path).expect_err("not a socket");
    assert!(matches!(err, ControlError::NotASocket { .. }), "{err:?}");
    assert_eq!(std::fs::read(&path).expect("still there"), b"not a socket");
}

#[tokio::test]
async fn local_requests_use_the_same_validation_and_dispatch() {
    let f = fixture().await;
    let backend = Arc::new(control::StorageBackend::new(f.backend.storage.clone()));
    let mut rx = control::local_request(
        backend.clone(),
        ControlRequest::ContactAdd {
            name: "bob".into(),
            user_id: bob().user_id().to_string(),
        },
    );
    assert!(matches!(rx.recv().await, Some(ControlResponse::Contact(_))));
    let mut rx = control::local_request(backend.clone(), ControlRequest::Status);
    assert_eq!(
        rx.recv().await.as_ref().and_then(error_kind),
        Some(ControlErrorKind::Unavailable)
    );
    let mut rx = control::local_request(
        backend,
        ControlRequest::Inbox {
            after_index: None,
            wait_secs: Some(1),
            follow: false,
        },
    );
    assert_eq!(
        rx.recv().await.as_ref().and_then(error_kind),
        Some(ControlErrorKind::Unavailable)
    );
}

// ---------------------------------------------------------------------------------------------
// Conversation, Conversations, MarkRead (the interactive chat)
// ---------------------------------------------------------------------------------------------

fn carol() -> PublicIdentity {
    Identity::from_seed(&[3; 32]).public()
}

/// Our message `id` to `to`, committed as `send` does (queued in the outbox).
fn send_out(storage: &Storage, to: &PublicIdentity, id: u8, body: &str, at_ms: u64) {
    let m = StoredMessage {
        id: [id; 16],
        peer: *to,
        direction: Direction::Out,
        seq: u64::from(id),
        sent_at_ms: at_ms,
        received_at_ms: at_ms,
        body: body.into(),
        status: Status::Queued,
        group: None,
    };
    storage
        .commit_outgoing(to, b"session", &m, b"envelope", u64::from(id) + 1)
        .expect("commits");
}

fn texts_of(items: &[ControlResponse]) -> Vec<(String, bool, StatusView)> {
    items
        .iter()
        .filter_map(|r| match r {
            ControlResponse::Message(m) => Some((m.text.clone(), m.outgoing, m.status)),
            _ => None,
        })
        .collect()
}

/// The next item of a followed conversation, within 5 s.
async fn next_item(c: &mut Client) -> ControlResponse {
    tokio::time::timeout(Duration::from_secs(5), c.next_response())
        .await
        .expect("an item in time")
        .expect("an item")
}

#[tokio::test]
async fn a_conversation_lists_both_directions_and_follows_messages_and_statuses() {
    let f = fixture().await;
    let storage = f.backend.storage.clone();
    storage.add_contact("bob", &bob()).expect("adds");
    storage.add_contact("carol", &carol()).expect("adds");
    receive(&storage, &bob(), 1, "one from bob");
    send_out(&storage, &bob(), 2, "mine to bob", 1_700_000_001_000);
    receive(&storage, &carol(), 5, "carol elsewhere");

    // Both directions of bob's conversation, in order, nothing of carol's, nothing marked read.
    let mut c = client(&f.home).await;
    let listing = ControlRequest::Conversation {
        peer: "bob".into(),
        after_index: None,
        last: None,
        follow: false,
    };
    let all = collect(&mut c, listing.clone()).await;
    assert_eq!(
        texts_of(&all),
        [
            ("one from bob".into(), false, StatusView::Delivered),
            ("mine to bob".into(), true, StatusView::Queued),
        ]
    );
    assert_eq!(all.last(), Some(&ControlResponse::End));
    assert_eq!(
        texts_of(&collect(&mut c, listing).await)[0].2,
        StatusView::Delivered
    );
    // By user ID too; `last` keeps the end of the listing.
    let last = collect(
        &mut c,
        ControlRequest::Conversation {
            peer: bob().user_id().to_string(),
            after_index: None,
            last: Some(1),
            follow: false,
        },
    )
    .await;
    assert_eq!(
        texts_of(&last),
        [("mine to bob".into(), true, StatusView::Queued)]
    );

    // Followed: the history, then status changes of ours and new messages as they happen.
    let mut live = client(&f.home).await;
    live.send(&ControlRequest::Conversation {
        peer: "bob".into(),
        after_index: None,
        last: None,
        follow: true,
    })
    .await
    .expect("sends");
    let history = [next_item(&mut live).await, next_item(&mut live).await];
    assert_eq!(texts_of(&history).len(), 2);

    storage
        .set_status(&[2; 16], Status::Delivered)
        .expect("status");
    let _ = f.backend.wake.send(());
    let ControlResponse::MessageStatus(s) = next_item(&mut live).await else {
        panic!("expected a status change");
    };
    assert_eq!(
        (s.id.as_str(), s.status, s.peer_user_id.as_str()),
        (
            hex::encode([2; 16]).as_str(),
            StatusView::Delivered,
            bob().user_id().to_string().as_str()
        )
    );

    // Another conversation's message is not streamed; bob's next one is.
    receive(&storage, &carol(), 6, "carol again");
    let _ = f.backend.wake.send(());
    receive(&storage, &bob(), 3, "three from bob");
    send_out(&storage, &bob(), 4, "four from me", 1_700_000_004_000);
    let _ = f.backend.wake.send(());
    let mut news = vec![next_item(&mut live).await, next_item(&mut live).await];
    assert_eq!(
        texts_of(&news),
        [
            ("three from bob".into(), false, StatusView::Delivered),
            ("four from me".into(), true, StatusView::Queued),
        ]
    );

    // A status change nobody announced is found by the periodic re-read.
    storage.set_status(&[2; 16], Status::Read).expect("status");
    news.push(next_item(&mut live).await);
    let Some(ControlResponse::MessageStatus(s)) = news.last() else {
        panic!("expected a status change: {news:?}");
    };
    assert_eq!(
        (s.id.clone(), s.status),
        (hex::encode([2; 16]), StatusView::Read)
    );
    drop(live);

    // MarkRead marks bob's incoming messages read; ids that are not bob's incoming ones are
    // ignored; bad ids are refused.
    let r = c
        .call(&ControlRequest::MarkRead {
            peer: "bob".into(),
            ids: vec![
                hex::encode([1; 16]),
                hex::encode([3; 16]),
                hex::encode([5; 16]),
                hex::encode([2; 16]),
            ],
        })
        .await
        .expect("answer");
    assert_eq!(r, ControlResponse::Done);
    for (who, id, want) in [
        (bob(), 1, Status::Read),
        (bob(), 3, Status::Read),
        (carol(), 5, Status::Delivered),
    ] {
        let (_, m) = storage
            .message(&who, Direction::In, &[id; 16])
            .expect("reads")
            .expect("exists");
        assert_eq!(m.status, want, "message {id}");
    }
    for ids in [vec![], vec!["zz".to_owned()], vec!["00".repeat(17)]] {
        let r = c
            .call(&ControlRequest::MarkRead {
                peer: "bob".into(),
                ids,
            })
            .await
            .expect("answer");
        assert_eq!(
            error_kind(&r),
            Some(ControlErrorKind::InvalidInput),
            "{r:?}"
        );
    }
    let r = c
        .call(&ControlRequest::MarkRead {
            peer: "nobody".into(),
            ids: vec![hex::encode([1; 16])],
        })
        .await
        .expect("answer");
    assert_eq!(error_kind(&r), Some(ControlErrorKind::NotFound));

    // The list: most recent first, unread counts, then contacts without messages.
    storage
        .add_contact("dave", &Identity::from_seed(&[4; 32]).public())
        .expect("adds");
    let list: Vec<_> = collect(&mut c, ControlRequest::Conversations)
        .await
        .into_iter()
        .filter_map(|r| match r {
            ControlResponse::Conversation(v) => Some(v),
            _ => None,
        })
        .collect();
    let rows: Vec<_> = list
        .iter()
        .map(|v| {
            let ConversationWith::Peer { name, .. } = &v.with else {
                panic!("no groups here: {v:?}");
            };
            (
                name.clone().unwrap_or_default(),
                v.messages,
                v.unread,
                v.last_text.clone(),
                v.last_outgoing,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("bob".into(), 4, 0, Some("four from me".into()), true),
            ("carol".into(), 2, 2, Some("carol again".into()), false),
            ("dave".into(), 0, 0, None, false),
        ]
    );
    assert_eq!(list[0].last_at_ms, Some(1_700_000_004_000));

    // Following needs a node; storage alone says so.
    let backend = Arc::new(control::StorageBackend::new(storage.clone()));
    let mut rx = control::local_request(
        backend,
        ControlRequest::Conversation {
            peer: "bob".into(),
            after_index: None,
            last: None,
            follow: true,
        },
    );
    assert_eq!(
        rx.recv().await.as_ref().and_then(error_kind),
        Some(ControlErrorKind::Unavailable)
    );
}

/// The test backend with groups: `group(List)` answers `groups`.
#[derive(Clone)]
struct WithGroups {
    inner: TestBackend,
    groups: Vec<GroupView>,
}

#[async_trait::async_trait]
impl ControlBackend for WithGroups {
    fn storage(&self) -> &Storage {
        self.inner.storage()
    }
    async fn status(&self) -> Result<NodeStatusView, BackendError> {
        self.inner.status().await
    }
    async fn send_text(
        &self,
        to: PublicIdentity,
        text: String,
    ) -> Result<SendOutcomeReport, BackendError> {
        self.inner.send_text(to, text).await
    }
    fn message_wakeups(&self) -> Option<BoxStream<'static, ()>> {
        self.inner.message_wakeups()
    }
    async fn shutdown(&self) -> Result<(), BackendError> {
        Ok(())
    }
    async fn group(&self, request: GroupRequest) -> Result<GroupAnswer, BackendError> {
        match request {
            GroupRequest::List => Ok(GroupAnswer::Groups(self.groups.clone())),
            other => Err(BackendError::new(
                ControlErrorKind::Unavailable,
                format!("not in this test: {other:?}"),
            )),
        }
    }
}

/// Everything a local request answered, up to its final response.
async fn local(backend: &Arc<WithGroups>, request: ControlRequest) -> Vec<ControlResponse> {
    let mut rx = control::local_request(backend.clone(), request.clone());
    let mut out = Vec::new();
    while let Some(r) = rx.recv().await {
        let last = r.is_final(&request);
        out.push(r);
        if last {
            break;
        }
    }
    out
}

#[tokio::test]
async fn group_conversations_are_listed_and_followed_apart_from_one_to_one() {
    let f = fixture().await;
    let storage = f.backend.storage.clone();
    storage.add_contact("bob", &bob()).expect("adds");
    let (weekend, quiet) = ([0xab; 32], [0xcd; 32]);
    let view = |id: [u8; 32], name: &str| GroupView {
        id: hex::encode(id),
        name: name.into(),
        epoch: 1,
        members: 3,
        role: "member".into(),
        topic: "mc-g1-test".into(),
    };
    let backend = Arc::new(WithGroups {
        inner: f.backend.clone(),
        groups: vec![view(weekend, "weekend"), view(quiet, "quiet")],
    });
    // Bob writes in the group and to us directly; carol (not a contact) in the group.
    let group_msg = |from: &PublicIdentity, id: u8, body: &str| {
        let mut m = incoming(from, id, body);
        m.group = Some(weekend);
        storage
            .commit_incoming(&[id; 32], from, b"session", None, None, Some(&m))
            .expect("commits");
    };
    group_msg(&bob(), 1, "bob in the group");
    receive(&storage, &bob(), 2, "bob to me");
    group_msg(&carol(), 3, "carol in the group");

    // The group's messages only, with their authors; bob's 1:1 conversation without them.
    let items = local(
        &backend,
        ControlRequest::GroupConversation {
            group: "weekend".into(),
            last: None,
            follow: false,
        },
    )
    .await;
    let shown: Vec<_> = items
        .iter()
        .filter_map(|r| match r {
            ControlResponse::Message(m) => {
                Some((m.text.as_str(), m.peer_user_id.clone(), m.peer_name.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        shown,
        [
            (
                "bob in the group",
                bob().user_id().to_string(),
                Some("bob".to_owned())
            ),
            ("carol in the group", carol().user_id().to_string(), None),
        ]
    );
    let one_to_one = local(
        &backend,
        ControlRequest::Conversation {
            peer: "bob".into(),
            after_index: None,
            last: None,
            follow: false,
        },
    )
    .await;
    assert_eq!(
        texts_of(&one_to_one),
        [("bob to me".into(), false, StatusView::Delivered)]
    );
    // By id prefix too; an unknown group is refused.
    let by_id = local(
        &backend,
        ControlRequest::GroupConversation {
            group: hex::encode(weekend)[..10].to_owned(),
            last: Some(1),
            follow: false,
        },
    )
    .await;
    assert_eq!(texts_of(&by_id).len(), 1);
    let unknown = local(
        &backend,
        ControlRequest::GroupConversation {
            group: "nope".into(),
            last: None,
            follow: false,
        },
    )
    .await;
    assert_eq!(
        unknown.last().and_then(error_kind),
        Some(ControlErrorKind::NotFound)
    );

    // Followed: a new group message appears; a 1:1 message does not.
    let mut rx = control::local_request(
        backend.clone(),
        ControlRequest::GroupConversation {
            group: "weekend".into(),
            last: None,
            follow: true,
        },
    );
    for _ in 0..2 {
        assert!(matches!(rx.recv().await, Some(ControlResponse::Message(_))));
    }
    receive(&storage, &bob(), 4, "bob to me again");
    group_msg(&bob(), 5, "bob in the group again");
    let _ = f.backend.wake.send(());
    let next = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("in time");
    let Some(ControlResponse::Message(m)) = next else {
        panic!("expected a message: {next:?}");
    };
    assert_eq!(m.text, "bob in the group again");
    drop(rx);

    // Group messages are marked read by author, without a receipt.
    let r = local(
        &backend,
        ControlRequest::MarkRead {
            peer: "bob".into(),
            ids: vec![hex::encode([1; 16])],
        },
    )
    .await;
    assert_eq!(r, [ControlResponse::Done]);

    // The list: the groups with their unread counts (the quiet one without messages), and bob.
    let list: Vec<ConversationView> = local(&backend, ControlRequest::Conversations)
        .await
        .into_iter()
        .filter_map(|r| match r {
            ControlResponse::Conversation(v) => Some(v),
            _ => None,
        })
        .collect();
    let rows: Vec<(String, u64, u64)> = list
        .iter()
        .map(|v| {
            let who = match &v.with {
                ConversationWith::Peer { name, user_id, .. } => {
                    name.clone().unwrap_or_else(|| user_id.clone())
                }
                ConversationWith::Group { name, members, .. } => format!("#{name} ({members})"),
            };
            (who, v.messages, v.unread)
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("#weekend (3)".to_owned(), 3, 2),
            ("bob".to_owned(), 2, 2),
            ("#quiet (3)".to_owned(), 0, 0),
        ]
    );
}
