//! Reaching a home: the running node's control socket if there is one; otherwise an in-process
//! node for the duration of the command (network commands), or storage alone (contacts, id,
//! inbox listing). All three answer the same typed control requests. See `docs/architecture.md`,
//! section "CLI".

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use meshchat_node::{
    control::{self, Client, ControlError, ControlRequest, ControlResponse, StorageBackend},
    storage::{Direction, Storage, StorageErrorKind},
    Node, NodeEvent, NodeHandle,
};
use tokio::sync::broadcast;

use meshchat_protocol::UserId;

use crate::{
    config::Settings,
    exit::{Failure, GENERIC, NOT_FOUND, NO_IDENTITY},
    progress::Progress,
};

/// How long a node started for one command waits for its first connection.
const WARM_UP: Duration = Duration::from_secs(5);
/// Extra time a client gives the node beyond the node's own request timeout.
const CLIENT_SLACK: Duration = Duration::from_secs(10);
/// How long a command waits for its node's first mail collection before going on (the
/// collection goes on in the background).
const COLLECT_WAIT: Duration = Duration::from_secs(20);

/// A way to answer control requests for one home.
pub(crate) enum Conn {
    /// The node running on the home (`meshchat run`), through its socket.
    Remote(Client),
    /// A node started by this command; shut down by [`Conn::close`].
    Node(NodeHandle),
    /// Storage alone (no node runs; the command needs no network).
    Storage(Arc<StorageBackend>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Remote(_) => "Conn::Remote",
            Conn::Node(_) => "Conn::Node",
            Conn::Storage(_) => "Conn::Storage",
        })
    }
}

/// Refuse early, without creating anything, when the home was never initialised.
pub(crate) fn require_initialised(home: &Path) -> Result<(), Failure> {
    if home.join("db").exists() {
        Ok(())
    } else {
        Err(Failure::new(
            NO_IDENTITY,
            "no_identity",
            format!(
                "no identity in {}; run `meshchat init` first",
                home.display()
            ),
        ))
    }
}

/// Storage of `home`, opened off the async runtime.
pub(crate) async fn open_storage(home: &Path) -> Result<Storage, Failure> {
    let home: PathBuf = home.to_path_buf();
    tokio::task::spawn_blocking(move || Storage::open(&home))
        .await
        .map_err(|e| Failure::new(1, "internal", format!("storage task failed: {e}")))?
        .map_err(Failure::from)
}

pub(crate) async fn running(home: &Path) -> Result<Option<Client>, Failure> {
    match Client::connect(home).await {
        Ok(c) => Ok(Some(c)),
        Err(ControlError::NotRunning { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Conn {
    /// For commands that need only storage.
    pub(crate) async fn for_storage(home: &Path) -> Result<Conn, Failure> {
        require_initialised(home)?;
        if let Some(c) = running(home).await? {
            return Ok(Conn::Remote(c));
        }
        let storage = open_storage(home).await?;
        storage.load_identity().map_err(Failure::from)?;
        Ok(Conn::Storage(Arc::new(StorageBackend::new(storage))))
    }

    /// For commands that need the network: the running node, or one started now.
    pub(crate) async fn for_network(
        home: &Path,
        settings: &Settings,
        progress: bool,
    ) -> Result<Conn, Failure> {
        Self::network(home, settings, progress, false).await
    }

    /// As [`Conn::for_network`], for commands that show mail (`inbox --wait`/`--follow`, `chat`):
    /// a node started for the command first collects what waits in its mailboxes, with a
    /// progress line and its result.
    pub(crate) async fn for_mail(
        home: &Path,
        settings: &Settings,
        progress: bool,
    ) -> Result<Conn, Failure> {
        Self::network(home, settings, progress, true).await
    }

    async fn network(
        home: &Path,
        settings: &Settings,
        progress: bool,
        collect: bool,
    ) -> Result<Conn, Failure> {
        require_initialised(home)?;
        if let Some(c) = running(home).await? {
            return Ok(Conn::Remote(c));
        }
        let p = Progress::start(
            progress,
            "No node runs on this home; starting one for this command…",
        );
        let mut config = settings.node_config(home);
        // Other commands on this home reach this node meanwhile.
        config.serve_control = true;
        let handle = Node::start(config).await.map_err(Failure::from)?;
        // Counts what arrives from now on, including the node's own first collection.
        let events = handle.subscribe();
        let connected = warm_up(&handle, p).await;
        if collect && connected {
            collect_mail(&handle, events, progress).await;
        }
        Ok(Conn::Node(handle))
    }

    /// Send `request`; every intermediate response goes to `on_item`; returns the final one
    /// (an `Error` response becomes a [`Failure`]).
    pub(crate) async fn request(
        &mut self,
        request: ControlRequest,
        mut on_item: impl FnMut(ControlResponse) -> Result<(), Failure>,
    ) -> Result<ControlResponse, Failure> {
        let mut rx = match self {
            Conn::Remote(client) => {
                client.send(&request).await?;
                // The node answers within its own per-request timeout; allow for slack, then
                // call it unreachable rather than hang.
                let patience = control::request_timeout(&request).map(|t| t + CLIENT_SLACK);
                loop {
                    let r = match patience {
                        Some(t) => tokio::time::timeout(t, client.next_response())
                            .await
                            .map_err(|_| {
                                Failure::new(
                                    GENERIC,
                                    "unreachable",
                                    "the node running on this home did not answer in time \
                                     (the outcome of the request is unknown)",
                                )
                            })??,
                        None => client.next_response().await?,
                    };
                    if r.is_final(&request) {
                        return finish(r);
                    }
                    on_item(r)?;
                }
            }
            Conn::Node(handle) => control::local_request(Arc::new(handle.clone()), request.clone()),
            Conn::Storage(backend) => control::local_request(backend.clone(), request.clone()),
        };
        while let Some(r) = rx.recv().await {
            if r.is_final(&request) {
                return finish(r);
            }
            on_item(r)?;
        }
        Err(Failure::new(
            1,
            "internal",
            "the request ended without an answer",
        ))
    }

    /// Stop a node this command started (its outbox stays on disk for the next node).
    pub(crate) async fn close(self) {
        if let Conn::Node(handle) = self {
            handle.shutdown().await;
        }
    }
}

fn finish(r: ControlResponse) -> Result<ControlResponse, Failure> {
    match r {
        ControlResponse::Error { kind, message } => Err(Failure::from_control_kind(kind, message)),
        other => Ok(other),
    }
}

/// Give a freshly started node a moment to reach its first peers (bootstrap or mDNS); whether
/// it did.
async fn warm_up(handle: &NodeHandle, progress: Progress) -> bool {
    let deadline = tokio::time::Instant::now() + WARM_UP;
    progress.step("Connecting to the network…");
    while tokio::time::Instant::now() < deadline {
        match handle.status().await {
            Ok(s) if !s.connected.is_empty() => {
                let n = s.connected.len();
                let peers = if n == 1 { "peer" } else { "peers" };
                progress.finish(Some(&format!("Connected to {n} {peers}.")));
                return true;
            }
            Ok(_) => {}
            Err(_) => return false,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress.finish(Some("No peer reached yet; continuing anyway."));
    false
}

/// Collect the mail waiting in the mailboxes of a freshly started node (it also does so by
/// itself; this waits for a round to end and says what arrived since the node started).
async fn collect_mail(
    handle: &NodeHandle,
    mut events: broadcast::Receiver<NodeEvent>,
    progress: bool,
) {
    let p = Progress::start(progress, "Collecting mail…");
    let round = tokio::time::timeout(COLLECT_WAIT, handle.collect_mail()).await;
    let mut new = 0u64;
    loop {
        match events.try_recv() {
            Ok(NodeEvent::MessageReceived(m)) if m.direction == Direction::In => new += 1,
            Ok(_) => {}
            Err(broadcast::error::TryRecvError::Lagged(n)) => new += n,
            Err(_) => break,
        }
    }
    let line = match round {
        _ if new > 0 => {
            let s = if new == 1 { "" } else { "s" };
            format!("{new} new message{s}.")
        }
        Ok(Ok(r)) if r.replicas_answered > 0 => "No new mail.".to_owned(),
        Ok(Ok(_)) => "No mailbox replica answered yet; mail is collected when one does.".to_owned(),
        Ok(Err(_)) | Err(_) => {
            "Mail is still being collected; it is shown as it arrives.".to_owned()
        }
    };
    p.finish(Some(&line));
}

/// Check the addressee of a `send` before a node is started for it: a contact name or a valid
/// user ID. With a running node this is left to the node (it holds the storage lock).
pub(crate) async fn check_recipient(home: &Path, to: &str) -> Result<(), Failure> {
    require_initialised(home)?;
    if running(home).await?.is_some() {
        return Ok(());
    }
    let storage = open_storage(home).await?;
    let lookup = to.to_owned();
    let known = tokio::task::spawn_blocking(move || match storage.contact_by_name(&lookup) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == StorageErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    })
    .await
    .map_err(|e| Failure::new(1, "internal", format!("storage task failed: {e}")))?
    .map_err(Failure::from)?;
    if known {
        return Ok(());
    }
    let looks_like_id = to.len() > 40 && to.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("mc1"));
    match to.parse::<UserId>() {
        Ok(_) => Ok(()),
        Err(e) if looks_like_id => Err(Failure::usage(e.to_string())),
        Err(_) => Err(Failure::new(
            NOT_FOUND,
            "not_found",
            format!(
                "no contact named `{to}` (see `meshchat contact list`), and it is not a user ID"
            ),
        )),
    }
}
