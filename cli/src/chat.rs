//! `meshchat chat TO`: an interactive conversation in the terminal (ratatui over crossterm).
//! The screen, in 80×24 or larger:
//!
//! ```text
//! Chat with bob · verified                                 header: the peer and its verification
//! 18:31 bob: hello                                         the conversation, newest at the bottom
//! 18:32 you: hi bob · delivered                            own messages carry their delivery status
//! > typing here_                                           the input line
//!  2 peers connected · Enter send · Esc quit                status line
//! ```
//!
//! It talks to the node of the home through the same control requests as the other commands
//! (a running `meshchat run`, or a node started for the chat): the received messages of the
//! conversation (`Inbox`), new ones as they arrive (`Inbox` with `follow`, on a connection of its
//! own), `Send` for each line typed (one after the other, so order is kept), and `Status` every
//! two seconds for the peer count. See `docs/cli.md`, section "chat".

use std::{io::IsTerminal, time::Duration};

use crossterm::event::{Event, EventStream, KeyCode, KeyEventKind, KeyModifiers};
use futures::StreamExt;
use meshchat_node::control::{
    ControlRequest, ControlResponse, MessageView, SendOutcome, SendView, MAX_REQUEST_TEXT_BYTES,
};
use ratatui::{
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::Paragraph,
    Frame,
};
use tokio::sync::mpsc;

use crate::{
    commands::Ctx,
    conn::{self, Conn},
    exit::{self, Failure},
    output::format_time,
};

/// Events from the background tasks to the screen.
#[derive(Debug)]
enum Update {
    Incoming(MessageView),
    Sent {
        slot: usize,
        result: Result<SendView, String>,
    },
    Peers(usize),
}

/// Where an own message is.
#[derive(Debug, Clone)]
enum Delivery {
    Sending,
    Done(SendOutcome),
    Failed(String),
}

#[derive(Debug)]
struct Entry {
    time_ms: u64,
    own: bool,
    text: String,
    delivery: Option<Delivery>,
}

#[derive(Debug)]
struct Screen {
    peer_label: String,
    peer_name: Option<String>,
    verified: bool,
    entries: Vec<Entry>,
    input: String,
    peers: Option<usize>,
    notice: Option<String>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn delivery_span(d: &Delivery) -> Span<'static> {
    match d {
        Delivery::Sending => Span::styled("sending…", Style::default().fg(Color::Yellow)),
        Delivery::Done(SendOutcome::Delivered) => {
            Span::styled("delivered", Style::default().fg(Color::Green))
        }
        Delivery::Done(SendOutcome::Stored { replicas }) => Span::styled(
            format!("stored on {replicas} replicas"),
            Style::default().fg(Color::Cyan),
        ),
        Delivery::Done(SendOutcome::Queued { .. }) => {
            Span::styled("queued", Style::default().fg(Color::Magenta))
        }
        Delivery::Failed(why) => {
            Span::styled(format!("failed: {why}"), Style::default().fg(Color::Red))
        }
    }
}

/// `text` cut into pieces of at most `width` characters (at least one piece).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    chars.chunks(width).map(|c| c.iter().collect()).collect()
}

impl Screen {
    fn lines(&self, width: usize) -> Vec<Line<'static>> {
        let mut out = Vec::new();
        let who = self.peer_name.clone().unwrap_or_else(|| "them".to_owned());
        for e in &self.entries {
            let clock = format_time(e.time_ms);
            let hhmm = clock.get(11..16).unwrap_or("--:--").to_owned();
            let (name, style) = if e.own {
                ("you".to_owned(), Style::default().fg(Color::Blue))
            } else {
                (who.clone(), Style::default().fg(Color::Green))
            };
            let head = format!("{hhmm} {name}: ");
            let first_width = width.saturating_sub(head.chars().count());
            let mut pieces = wrap(&e.text, first_width.max(8));
            let rest: Vec<String> = if pieces.len() > 1 {
                wrap(
                    &pieces.split_off(1).concat(),
                    width.saturating_sub(2).max(8),
                )
            } else {
                Vec::new()
            };
            let mut first = vec![
                Span::styled(hhmm, Style::default().add_modifier(Modifier::DIM)),
                Span::raw(" "),
                Span::styled(format!("{name}:"), style.add_modifier(Modifier::BOLD)),
                Span::raw(" "),
                Span::raw(pieces.remove(0)),
            ];
            let status = e.delivery.as_ref().map(delivery_span);
            if rest.is_empty() {
                if let Some(s) = status.clone() {
                    first.push(Span::raw(" · "));
                    first.push(s);
                }
            }
            out.push(Line::from(first));
            let n = rest.len();
            for (i, piece) in rest.into_iter().enumerate() {
                let mut spans = vec![Span::raw("  "), Span::raw(piece)];
                if i + 1 == n {
                    if let Some(s) = status.clone() {
                        spans.push(Span::raw(" · "));
                        spans.push(s);
                    }
                }
                out.push(Line::from(spans));
            }
        }
        out
    }

    fn draw(&self, frame: &mut Frame<'_>) {
        let [header, body, input, status] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(1),
            Constraint::Length(1),
            Constraint::Length(1),
        ])
        .areas(frame.area());

        let verification = if self.verified {
            Span::styled("verified", Style::default().fg(Color::Green))
        } else {
            let hint = match &self.peer_name {
                Some(n) => format!("not verified (meshchat contact verify {n})"),
                None => "not a contact, not verified".to_owned(),
            };
            Span::styled(hint, Style::default().fg(Color::Yellow))
        };
        frame.render_widget(
            Paragraph::new(Line::from(vec![
                Span::styled(
                    format!("Chat with {}", self.peer_label),
                    Style::default().add_modifier(Modifier::BOLD),
                ),
                Span::raw(" · "),
                verification,
            ])),
            header,
        );

        let lines = self.lines(usize::from(body.width));
        let height = usize::from(body.height);
        let skip = lines.len().saturating_sub(height);
        frame.render_widget(
            Paragraph::new(lines.into_iter().skip(skip).collect::<Vec<_>>()),
            body,
        );

        // The input line shows its end when it is longer than the screen.
        let room = usize::from(input.width).saturating_sub(3).max(1);
        let typed: Vec<char> = self.input.chars().collect();
        let shown: String = typed[typed.len().saturating_sub(room)..].iter().collect();
        let cursor_x = input.x + 2 + u16::try_from(shown.chars().count()).unwrap_or(0);
        frame.render_widget(
            Paragraph::new(Line::from(vec![
                Span::styled("> ", Style::default().add_modifier(Modifier::BOLD)),
                Span::raw(shown),
            ])),
            input,
        );
        frame.set_cursor_position((
            cursor_x.min(input.x + input.width.saturating_sub(1)),
            input.y,
        ));

        let peers = match self.peers {
            Some(1) => "1 peer connected".to_owned(),
            Some(n) => format!("{n} peers connected"),
            None => "connecting…".to_owned(),
        };
        let mut text = format!(" {peers} · Enter send · Esc quit");
        if let Some(n) = &self.notice {
            text = format!(" {n} ·{text}");
        }
        frame.render_widget(
            Paragraph::new(text).style(Style::default().add_modifier(Modifier::REVERSED)),
            status,
        );
    }
}

/// The peer of the conversation: its user ID, contact name and verification.
async fn resolve_peer(
    conn: &mut Conn,
    to: &str,
) -> Result<(String, Option<String>, bool), Failure> {
    let mut found = None;
    conn.request(ControlRequest::ContactList, |r| {
        if let ControlResponse::Contact(c) = r {
            if found.is_none() && (c.name.eq_ignore_ascii_case(to) || c.user_id == to) {
                found = Some(c);
            }
        }
        Ok(())
    })
    .await?;
    Ok(match found {
        Some(c) => (c.user_id, Some(c.name), c.verified),
        None => (to.to_owned(), None, false),
    })
}

pub(crate) async fn chat(ctx: &Ctx, to: String) -> Result<u8, Failure> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(Failure::usage(
            "chat needs a terminal; in scripts use `meshchat send` and `meshchat inbox --follow`",
        ));
    }
    conn::check_recipient(&ctx.home, &to).await?;
    let mut conn = Conn::for_network(&ctx.home, &ctx.settings, ctx.progress()).await?;
    let result = run_chat(ctx, &mut conn, &to).await;
    conn.close().await;
    result
}

async fn run_chat(ctx: &Ctx, conn: &mut Conn, to: &str) -> Result<u8, Failure> {
    let (peer_id, peer_name, verified) = resolve_peer(conn, to).await?;
    let mut screen = Screen {
        peer_label: peer_name.clone().unwrap_or_else(|| peer_id.clone()),
        peer_name,
        verified,
        entries: Vec::new(),
        input: String::new(),
        peers: None,
        notice: None,
    };

    // The conversation so far (received messages), and where the live stream continues.
    let mut last_index = None;
    conn.request(
        ControlRequest::Inbox {
            after_index: None,
            wait_secs: None,
            follow: false,
        },
        |r| {
            if let ControlResponse::Message(m) = r {
                last_index = Some(m.index);
                if m.peer_user_id == peer_id {
                    screen.entries.push(Entry {
                        time_ms: m.sent_at_ms,
                        own: false,
                        text: m.text,
                        delivery: None,
                    });
                }
            }
            Ok(())
        },
    )
    .await?;

    let (tx, mut rx) = mpsc::channel::<Update>(1024);
    let mut tasks = tokio::task::JoinSet::new();

    // New messages as they arrive.
    let mut follow = conn.fork(&ctx.home).await?;
    let follow_tx = tx.clone();
    tasks.spawn(async move {
        let request = ControlRequest::Inbox {
            after_index: last_index,
            wait_secs: None,
            follow: true,
        };
        let _ = follow
            .request(request, |r| {
                if let ControlResponse::Message(m) = r {
                    let _ = follow_tx.try_send(Update::Incoming(m));
                }
                Ok(())
            })
            .await;
    });

    // The number of connected peers.
    let mut status = conn.fork(&ctx.home).await?;
    let status_tx = tx.clone();
    tasks.spawn(async move {
        loop {
            if let Ok(ControlResponse::Status(s)) =
                status.request(ControlRequest::Status, |_| Ok(())).await
            {
                if status_tx
                    .send(Update::Peers(s.connected.len()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });

    // Sends, one after the other so that the order is kept.
    let (send_tx, mut send_rx) = mpsc::channel::<(usize, String)>(64);
    let mut sender = conn.fork(&ctx.home).await?;
    let sent_tx = tx.clone();
    let to_id = peer_id.clone();
    tasks.spawn(async move {
        while let Some((slot, text)) = send_rx.recv().await {
            let result = match sender
                .request(
                    ControlRequest::Send {
                        to: to_id.clone(),
                        text,
                    },
                    |_| Ok(()),
                )
                .await
            {
                Ok(ControlResponse::Sent(v)) => Ok(v),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(f) => Err(f.message),
            };
            if sent_tx.send(Update::Sent { slot, result }).await.is_err() {
                return;
            }
        }
    });
    drop(tx);

    let mut terminal = ratatui::try_init().map_err(|e| {
        Failure::new(
            exit::GENERIC,
            "internal",
            format!("cannot use the terminal: {e}"),
        )
    })?;
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut updates_open = true;
    let outcome = loop {
        if let Err(e) = terminal.draw(|f| screen.draw(f)) {
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
                let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
                match k.code {
                    KeyCode::Esc => break Ok(exit::OK),
                    KeyCode::Char('c') | KeyCode::Char('d') if ctrl => break Ok(exit::OK),
                    KeyCode::Char('u') if ctrl => screen.input.clear(),
                    KeyCode::Char(c) if !ctrl => {
                        screen.input.push(c);
                        screen.notice = None;
                    }
                    KeyCode::Backspace => {
                        screen.input.pop();
                    }
                    KeyCode::Enter => {
                        let text = std::mem::take(&mut screen.input);
                        if text.trim().is_empty() {
                            continue;
                        }
                        if text.len() > MAX_REQUEST_TEXT_BYTES {
                            screen.notice = Some(format!(
                                "the message is {} bytes; the limit is {MAX_REQUEST_TEXT_BYTES}",
                                text.len()
                            ));
                            screen.input = text;
                            continue;
                        }
                        screen.entries.push(Entry {
                            time_ms: now_ms(),
                            own: true,
                            text: text.clone(),
                            delivery: Some(Delivery::Sending),
                        });
                        let slot = screen.entries.len() - 1;
                        if send_tx.send((slot, text)).await.is_err() {
                            screen.entries[slot].delivery =
                                Some(Delivery::Failed("the node stopped".into()));
                        }
                    }
                    _ => {}
                }
            }
            update = rx.recv(), if updates_open => match update {
                Some(Update::Incoming(m)) => {
                    if m.peer_user_id == peer_id {
                        screen.entries.push(Entry {
                            time_ms: m.sent_at_ms,
                            own: false,
                            text: m.text,
                            delivery: None,
                        });
                    }
                }
                Some(Update::Sent { slot, result }) => {
                    if let Some(e) = screen.entries.get_mut(slot) {
                        e.delivery = Some(match result {
                            Ok(v) => Delivery::Done(v.outcome),
                            Err(why) => Delivery::Failed(why),
                        });
                    }
                }
                Some(Update::Peers(n)) => screen.peers = Some(n),
                None => updates_open = false,
            },
            _ = tick.tick() => {}
        }
    };
    ratatui::restore();
    tasks.abort_all();
    outcome
}
