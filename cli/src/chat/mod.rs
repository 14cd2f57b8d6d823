//! `meshchat chat [TO]`: an interactive terminal chat (ratatui over crossterm). With `TO`, the
//! conversation with that contact or user ID; without, the list of conversations (people and
//! groups) to open one from (Esc goes back to it). In 80×24 or larger:
//!
//! ```text
//! Chat with bob · verified                                 header: the peer and its verification
//! 18:31 bob: hello                                         both directions, newest at the bottom
//! 18:32 you: hi bob · read                                 ours carry their delivery status, live
//! > typing here_                                           the input line
//!  2 peers connected, all direct · NAT public · Enter send · Esc quit      status line
//! ```
//!
//! It talks to the node of the home (a running `meshchat run`, or a node started for the chat,
//! which collects its mail first) through the control requests of `node/src/control.rs`, each
//! on a connection of its own so none waits for another: `Conversation` (or `GroupConversation`)
//! with `follow` (the history of both directions, then new messages and status changes of ours
//! as they happen), `Send` (or `GroupSend`) for each line typed (one after the other, so order is
//! kept), `MarkRead` for the incoming messages the screen shows, `Conversations` for the list,
//! and `Status` every two seconds for the status line. See `docs/cli.md`, section "chat".

mod conversation;
mod list;
mod text;

use std::{
    collections::VecDeque,
    io::IsTerminal,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use crossterm::event::{Event, EventStream, KeyEventKind};
use futures::StreamExt;
use meshchat_node::{
    control::{
        Client, ControlRequest, ControlResponse, ConversationView, ConversationWith,
        MessageStatusView, MessageView, SendOutcome, StatusView, StorageBackend, MAX_MARK_READ_IDS,
    },
    groups::GroupSendOutcome,
    NodeHandle,
};
use meshchat_protocol::UserId;
use ratatui::{
    layout::{Constraint, Layout, Rect},
    Frame,
};
use tokio::{sync::mpsc, task::JoinSet};

use self::{
    conversation::Conversation,
    list::List,
    text::{status_line, NodeState},
};
use crate::{
    commands::Ctx,
    conn::{self, Conn},
    exit::{self, Failure},
};

/// Messages of the conversation loaded when it opens (older ones stay in storage).
const HISTORY: u32 = 1000;
/// How often the status line and the list are refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(2);
const LIST_EVERY: Duration = Duration::from_secs(3);
/// Pause before a lost `Conversation` stream is opened again.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Updates waiting for the screen. The conversation stream may deliver a whole history at once;
/// if the screen falls this far behind, the stream is re-read rather than blocked.
const UPDATES: usize = 4096;

/// The screen's rows: header, body, input (or hint) line, status line.
fn layout(area: Rect) -> [Rect; 4] {
    Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area)
}

/// A way to open another connection to the node, for each background task.
#[derive(Clone)]
enum Dial {
    Remote(PathBuf),
    Node(NodeHandle),
    Storage(Arc<StorageBackend>),
}

impl std::fmt::Debug for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dial::Remote(_) => "Dial::Remote",
            Dial::Node(_) => "Dial::Node",
            Dial::Storage(_) => "Dial::Storage",
        })
    }
}

impl Dial {
    fn of(conn: &Conn, home: &Path) -> Dial {
        match conn {
            Conn::Remote(_) => Dial::Remote(home.to_path_buf()),
            Conn::Node(h) => Dial::Node(h.clone()),
            Conn::Storage(b) => Dial::Storage(b.clone()),
        }
    }

    /// A connection for one task. Never closed (that would stop a node this command started):
    /// dropped.
    async fn conn(&self) -> Result<Conn, Failure> {
        Ok(match self {
            Dial::Remote(home) => Conn::Remote(Client::connect(home).await?),
            Dial::Node(h) => Conn::Node(h.clone()),
            Dial::Storage(b) => Conn::Storage(b.clone()),
        })
    }

    /// One request that is not a stream.
    async fn call(&self, request: ControlRequest) -> Result<ControlResponse, Failure> {
        self.conn().await?.request(request, |_| Ok(())).await
    }
}

/// From the background tasks to the screen. `gen` tells which opening of a conversation an
/// update belongs to (updates of one left already are dropped).
#[derive(Debug)]
enum Update {
    Node(NodeState),
    List(Result<Vec<ConversationView>, String>),
    Message {
        gen: u64,
        view: MessageView,
    },
    Status {
        gen: u64,
        view: MessageStatusView,
    },
    Sent {
        gen: u64,
        key: u64,
        result: Result<(String, StatusView), String>,
    },
    StreamLost {
        gen: u64,
        why: String,
    },
}

/// Which screen is up.
#[derive(Debug)]
enum Screen {
    List,
    Chat(Box<Conversation>),
}

/// The open conversation's background work.
#[derive(Debug)]
struct Open {
    sends: mpsc::Sender<(u64, String)>,
    /// (author's user ID, message id) of what the screen showed.
    reads: mpsc::Sender<(String, String)>,
    /// Those that did not fit the channel yet.
    unread: VecDeque<(String, String)>,
}

struct App {
    dial: Dial,
    updates: mpsc::Sender<Update>,
    list: List,
    screen: Screen,
    node: NodeState,
    gen: u64,
    open: Option<Open>,
    /// The work of the screen that is up (list refresh, or the conversation's tasks).
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("screen", &self.screen)
            .field("gen", &self.gen)
            .finish_non_exhaustive()
    }
}

/// The peer of `to`: (user ID, contact name, verified), with the same sentences as `send` for
/// an unknown name or a mistyped user ID.
async fn resolve(dial: &Dial, to: &str) -> Result<(String, Option<String>, bool), Failure> {
    let mut by_name = None;
    let mut by_id = None;
    dial.conn()
        .await?
        .request(ControlRequest::ContactList, |r| {
            if let ControlResponse::Contact(c) = r {
                if c.name == to && by_name.is_none() {
                    by_name = Some(c);
                } else if c.user_id == to && by_id.is_none() {
                    by_id = Some(c);
                }
            }
            Ok(())
        })
        .await?;
    if let Some(c) = by_name.or(by_id) {
        return Ok((c.user_id, Some(c.name), c.verified));
    }
    let looks_like_id = to.len() > 40 && to.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("mc1"));
    match to.parse::<UserId>() {
        Ok(id) => Ok((id.to_string(), None, false)),
        Err(e) if looks_like_id => Err(Failure::usage(e.to_string())),
        Err(_) => Err(Failure::new(
            exit::NOT_FOUND,
            "not_found",
            format!(
                "no contact named `{to}` (see `meshchat contact list`), and it is not a user ID"
            ),
        )),
    }
}

pub(crate) async fn chat(ctx: &Ctx, to: Option<String>) -> Result<u8, Failure> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(Failure::usage(
            "chat needs a terminal; in scripts use `meshchat send` and `meshchat inbox --follow`",
        ));
    }
    match &to {
        Some(to) => conn::check_recipient(&ctx.home, to).await?,
        None => conn::require_initialised(&ctx.home)?,
    }
    let conn = Conn::for_mail(&ctx.home, &ctx.settings, ctx.progress()).await?;
    let dial = Dial::of(&conn, &ctx.home);
    // Every task dials its own connection; an idle one would only be closed by the node. A node
    // started for the chat is kept, to be stopped at the end.
    let started = match conn {
        Conn::Node(h) => Some(Conn::Node(h)),
        _ => None,
    };
    let result = run(dial, to).await;
    if let Some(node) = started {
        node.close().await;
    }
    result
}

async fn run(dial: Dial, to: Option<String>) -> Result<u8, Failure> {
    let first = match &to {
        Some(to) => Some(resolve(&dial, to).await?),
        None => None,
    };
    let (tx, mut rx) = mpsc::channel::<Update>(UPDATES);
    let mut app = App {
        dial: dial.clone(),
        updates: tx.clone(),
        list: List::default(),
        screen: Screen::List,
        node: NodeState::Unknown,
        gen: 0,
        open: None,
        tasks: JoinSet::new(),
    };
    match first {
        Some((user_id, name, verified)) => app.open(
            ConversationWith::Peer {
                user_id,
                name,
                verified,
            },
            false,
        ),
        None => app.show_list(),
    }
    // The status line, whatever the screen.
    let status_task = tokio::spawn(poll_status(dial, tx));

    let mut terminal = ratatui::try_init().map_err(|e| {
        Failure::new(
            exit::GENERIC,
            "internal",
            format!("cannot use the terminal: {e}"),
        )
    })?;
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut page = 10usize;
    let outcome = loop {
        app.flush_reads();
        let drawn = terminal.draw(|f| {
            page = usize::from(f.area().height.saturating_sub(4)).max(1);
            app.draw(f);
        });
        if let Err(e) = drawn {
            break Err(Failure::new(
                exit::GENERIC,
                "internal",
                format!("cannot draw: {e}"),
            ));
        }
        tokio::select! {
            key = keys.next() => {
                let Some(Ok(event)) = key else { break Ok(exit::OK) };
                let Event::Key(k) = event else { continue };
                if k.kind != KeyEventKind::Press {
                    continue;
                }
                if app.key(k, page).await {
                    break Ok(exit::OK);
                }
            }
            update = rx.recv() => match update {
                Some(u) => app.update(u),
                None => break Ok(exit::OK),
            },
            _ = tick.tick() => {}
        }
    };
    ratatui::restore();
    app.tasks.abort_all();
    status_task.abort();
    outcome
}

impl App {
    /// Show the list (and keep it fresh while it is up).
    fn show_list(&mut self) {
        self.leave();
        self.screen = Screen::List;
        self.tasks
            .spawn(refresh_list(self.dial.clone(), self.updates.clone()));
    }

    /// Open the conversation with a person or a group.
    fn open(&mut self, with: ConversationWith, back: bool) {
        self.leave();
        self.gen += 1;
        let gen = self.gen;
        let (sends, send_rx) = mpsc::channel(64);
        let (reads, read_rx) = mpsc::channel(MAX_MARK_READ_IDS * 4);
        self.tasks.spawn(follow(
            self.dial.clone(),
            with.clone(),
            gen,
            self.updates.clone(),
        ));
        self.tasks.spawn(send_lines(
            self.dial.clone(),
            with.clone(),
            gen,
            send_rx,
            self.updates.clone(),
        ));
        self.tasks.spawn(mark_read(self.dial.clone(), read_rx));
        self.open = Some(Open {
            sends,
            reads,
            unread: VecDeque::new(),
        });
        self.screen = Screen::Chat(Box::new(Conversation::new(with, back)));
    }

    /// Stop the work of the screen that is up.
    fn leave(&mut self) {
        self.tasks.abort_all();
        self.open = None;
    }

    /// Hand the ids of messages shown to the mark-read task (as many as fit now).
    fn flush_reads(&mut self) {
        let Some(open) = &mut self.open else { return };
        while let Some(item) = open.unread.pop_front() {
            match open.reads.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    open.unread.push_front(item);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }

    fn draw(&mut self, frame: &mut Frame<'_>) {
        let area = frame.area();
        let cols = usize::from(area.width);
        match &mut self.screen {
            Screen::List => {
                let status = status_line(
                    self.list.notice.as_deref(),
                    &self.node,
                    &self.list.keys(),
                    cols,
                );
                self.list.draw(frame, area, &status);
            }
            Screen::Chat(c) => {
                let status = status_line(c.notice.as_deref(), &self.node, &c.keys(), cols);
                c.draw(frame, area, &status);
            }
        }
    }

    /// A key press; whether to quit.
    async fn key(&mut self, k: crossterm::event::KeyEvent, page: usize) -> bool {
        match &mut self.screen {
            Screen::List => match self.list.key(k, page) {
                list::Action::None => false,
                list::Action::Quit => true,
                list::Action::Open(c) => {
                    self.open(c.with, true);
                    false
                }
            },
            Screen::Chat(c) => match c.key(k, page) {
                conversation::Action::None => false,
                conversation::Action::Quit => true,
                conversation::Action::Leave if c.back_to_list => {
                    self.show_list();
                    false
                }
                conversation::Action::Leave => true,
                conversation::Action::Send(key, text) => {
                    let queued = match &self.open {
                        Some(open) => open.sends.send((key, text)).await.is_ok(),
                        None => false,
                    };
                    if !queued {
                        c.on_sent(key, Err("the chat's sender stopped".into()));
                    }
                    false
                }
            },
        }
    }

    fn update(&mut self, u: Update) {
        let current = |gen: u64, app: &App| gen == app.gen;
        match u {
            Update::Node(state) => self.node = state,
            Update::List(Ok(items)) => self.list.set(items),
            Update::List(Err(why)) => self.list.notice = Some(why),
            Update::Message { gen, view } if current(gen, self) => {
                if let Screen::Chat(c) = &mut self.screen {
                    let author = view.peer_user_id.clone();
                    if let (Some(id), Some(open)) = (c.on_message(view), &mut self.open) {
                        open.unread.push_back((author, id));
                    }
                }
            }
            Update::Status { gen, view } if current(gen, self) => {
                if let Screen::Chat(c) = &mut self.screen {
                    c.on_status(view);
                }
            }
            Update::Sent { gen, key, result } if current(gen, self) => {
                if let Screen::Chat(c) = &mut self.screen {
                    c.on_sent(key, result);
                }
            }
            Update::StreamLost { gen, why } if current(gen, self) => {
                if let Screen::Chat(c) = &mut self.screen {
                    c.notice = Some(format!("{why}; reconnecting"));
                }
            }
            _ => {}
        }
    }
}

/// The node's status for the status line, every [`STATUS_EVERY`].
async fn poll_status(dial: Dial, tx: mpsc::Sender<Update>) {
    loop {
        let state = match dial.call(ControlRequest::Status).await {
            Ok(ControlResponse::Status(s)) => NodeState::Known(Box::new(s)),
            Ok(_) | Err(_) => NodeState::Gone,
        };
        if tx.send(Update::Node(state)).await.is_err() {
            return;
        }
        tokio::time::sleep(STATUS_EVERY).await;
    }
}

/// The list of conversations, every [`LIST_EVERY`] while the list is up.
async fn refresh_list(dial: Dial, tx: mpsc::Sender<Update>) {
    loop {
        let mut items = Vec::new();
        let result = match dial.conn().await {
            Ok(mut c) => c
                .request(ControlRequest::Conversations, |r| {
                    if let ControlResponse::Conversation(v) = r {
                        items.push(v);
                    }
                    Ok(())
                })
                .await
                .map(|_| items)
                .map_err(|f| f.message),
            Err(f) => Err(f.message),
        };
        if tx.send(Update::List(result)).await.is_err() {
            return;
        }
        tokio::time::sleep(LIST_EVERY).await;
    }
}

/// The conversation: its history, then new messages and status changes, for as long as it is
/// open. A lost stream (the node restarted, the screen fell behind) is opened again and re-read;
/// the screen shows each message once.
async fn follow(dial: Dial, with: ConversationWith, gen: u64, tx: mpsc::Sender<Update>) {
    loop {
        let request = match &with {
            ConversationWith::Peer { user_id, .. } => ControlRequest::Conversation {
                peer: user_id.clone(),
                after_index: None,
                last: Some(HISTORY),
                follow: true,
            },
            ConversationWith::Group { id, .. } => ControlRequest::GroupConversation {
                group: id.clone(),
                last: Some(HISTORY),
                follow: true,
            },
        };
        let why = match dial.conn().await {
            Ok(mut c) => {
                let result = c
                    .request(request, |r| {
                        let update = match r {
                            ControlResponse::Message(view) => Update::Message { gen, view },
                            ControlResponse::MessageStatus(view) => Update::Status { gen, view },
                            _ => return Ok(()),
                        };
                        tx.try_send(update).map_err(|_| {
                            Failure::new(exit::GENERIC, "internal", "the screen fell behind")
                        })
                    })
                    .await;
                match result {
                    Ok(_) => "the conversation stream ended".to_owned(),
                    Err(f) => f.message,
                }
            }
            Err(f) => f.message,
        };
        if tx.is_closed() {
            return;
        }
        let _ = tx.send(Update::StreamLost { gen, why }).await;
        tokio::time::sleep(RETRY_AFTER).await;
    }
}

/// Send the lines typed, one after the other (so the order is kept).
async fn send_lines(
    dial: Dial,
    with: ConversationWith,
    gen: u64,
    mut lines: mpsc::Receiver<(u64, String)>,
    tx: mpsc::Sender<Update>,
) {
    while let Some((key, text)) = lines.recv().await {
        let request = match &with {
            ConversationWith::Peer { user_id, .. } => ControlRequest::Send {
                to: user_id.clone(),
                text,
            },
            ConversationWith::Group { id, .. } => ControlRequest::GroupSend {
                group: id.clone(),
                text,
            },
        };
        let result = match dial.call(request).await {
            Ok(ControlResponse::Sent(v)) => Ok((
                v.message_id,
                match v.outcome {
                    SendOutcome::Delivered => StatusView::Delivered,
                    SendOutcome::Stored { replicas } => StatusView::Stored { replicas },
                    SendOutcome::Queued { .. } => StatusView::Queued,
                },
            )),
            // In a group, "delivered" reads "sent": published to the members online.
            Ok(ControlResponse::GroupSent(r)) => Ok((
                r.message_id,
                match r.outcome {
                    GroupSendOutcome::Published => StatusView::Delivered,
                    GroupSendOutcome::Stored => StatusView::Stored {
                        replicas: u32::try_from(r.stored_replicas).unwrap_or(u32::MAX),
                    },
                    GroupSendOutcome::Queued => StatusView::Queued,
                },
            )),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(f) => Err(f.message),
        };
        if tx.send(Update::Sent { gen, key, result }).await.is_err() {
            return;
        }
    }
}

/// Mark read what the screen showed, in batches (a request per author: a group has several).
async fn mark_read(dial: Dial, mut shown: mpsc::Receiver<(String, String)>) {
    while let Some(first) = shown.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_MARK_READ_IDS {
            match shown.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let mut by_author: std::collections::BTreeMap<String, Vec<String>> =
            std::collections::BTreeMap::new();
        for (author, id) in batch {
            by_author.entry(author).or_default().push(id);
        }
        for (peer, ids) in by_author {
            if let Err(f) = dial.call(ControlRequest::MarkRead { peer, ids }).await {
                tracing::debug!(error = %f.message, "marking messages read failed");
            }
        }
    }
}
