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
    storage::Storage,
    Node, NodeConfig, NodeHandle,
};

use crate::exit::{Failure, NO_IDENTITY, UNAVAILABLE};

/// How long a node started for one command waits for its first connection.
const WARM_UP: Duration = Duration::from_secs(5);
/// Extra time a client gives the node beyond the node's own request timeout.
const CLIENT_SLACK: Duration = Duration::from_secs(10);

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

async fn running(home: &Path) -> Result<Option<Client>, Failure> {
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
    pub(crate) async fn for_network(home: &Path, progress: bool) -> Result<Conn, Failure> {
        require_initialised(home)?;
        if let Some(c) = running(home).await? {
            return Ok(Conn::Remote(c));
        }
        if progress {
            eprintln!("No node runs on this home; starting one for this command…");
        }
        let mut config = NodeConfig::new(home.to_path_buf());
        // Other commands on this home reach this node meanwhile.
        config.serve_control = true;
        let handle = Node::start(config).await.map_err(Failure::from)?;
        warm_up(&handle, progress).await;
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
                                    UNAVAILABLE,
                                    "unreachable",
                                    "the node running on this home did not answer in time",
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

    /// The node started by this command, if any.
    pub(crate) fn local_node(&self) -> Option<&NodeHandle> {
        match self {
            Conn::Node(h) => Some(h),
            _ => None,
        }
    }
}

fn finish(r: ControlResponse) -> Result<ControlResponse, Failure> {
    match r {
        ControlResponse::Error { kind, message } => Err(Failure::from_control_kind(kind, message)),
        other => Ok(other),
    }
}

/// Give a freshly started node a moment to reach its first peers (bootstrap or mDNS).
async fn warm_up(handle: &NodeHandle, progress: bool) {
    let deadline = tokio::time::Instant::now() + WARM_UP;
    let mut said = false;
    while tokio::time::Instant::now() < deadline {
        match handle.status().await {
            Ok(s) if !s.connected.is_empty() => return,
            Ok(_) => {}
            Err(_) => return,
        }
        if progress && !said {
            eprintln!("Connecting to the network…");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if progress {
        eprintln!("No peer reached yet; continuing anyway.");
    }
}
