//! The conversation screen of `meshchat chat`, with a person or a group: its state (the messages
//! of both directions with the delivery status of ours, the input line, the scroll position),
//! how updates from the node merge into it (a line typed here, the node's answer to its send,
//! the conversation stream's messages and status changes arrive in any order and each message is
//! shown once), its keys and its drawing. See `docs/cli.md`, section "chat".

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use meshchat_node::control::{
    ConversationWith, MessageStatusView, MessageView, StatusView, MAX_REQUEST_TEXT_BYTES,
};
use ratatui::{
    layout::Rect,
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::Paragraph,
    Frame,
};

use super::text::{self, width};

/// Where one of our messages is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Typed here; the node has not answered yet.
    Sending,
    /// What the node says.
    At(StatusView),
    /// The node refused it or stopped.
    Failed(String),
}

fn rank(s: &StatusView) -> u8 {
    match s {
        StatusView::Queued => 0,
        StatusView::Failed => 1,
        StatusView::Stored { .. } => 2,
        StatusView::Delivered => 3,
        StatusView::Read => 4,
    }
}

impl Delivery {
    /// Whether `next` is news (statuses only move forward; a late "stored" never hides a
    /// "delivered").
    fn advanced_by(&self, next: &StatusView) -> bool {
        match self {
            Delivery::Sending | Delivery::Failed(_) => true,
            Delivery::At(StatusView::Stored { replicas: a }) => match next {
                StatusView::Stored { replicas: b } => b > a,
                other => rank(other) > 2,
            },
            Delivery::At(now) => rank(next) > rank(now),
        }
    }

    /// How it reads; in a group, "delivered" means sent to the members online.
    fn span(&self, group: bool) -> Span<'static> {
        let (text, color) = match self {
            Delivery::Sending => ("sending…".to_owned(), Color::Yellow),
            Delivery::At(StatusView::Queued) => ("queued".to_owned(), Color::Magenta),
            Delivery::At(StatusView::Stored { replicas }) => {
                let s = if *replicas == 1 { "" } else { "s" };
                (format!("stored on {replicas} replica{s}"), Color::Cyan)
            }
            Delivery::At(StatusView::Delivered) if group => ("sent".to_owned(), Color::Green),
            Delivery::At(StatusView::Delivered) => ("delivered".to_owned(), Color::Green),
            Delivery::At(StatusView::Read) => ("read".to_owned(), Color::Green),
            Delivery::At(StatusView::Failed) => ("failed".to_owned(), Color::Red),
            Delivery::Failed(why) => (format!("failed: {}", text::one_line(why)), Color::Red),
        };
        Span::styled(text, Style::default().fg(color))
    }
}

/// One message on the screen.
#[derive(Debug, Clone)]
struct Entry {
    /// Local key of a line typed here (to match the node's answer to its `Send`).
    key: Option<u64>,
    /// The message id (hex), once known.
    id: Option<String>,
    time_ms: u64,
    own: bool,
    /// Who wrote it (in a group; in a 1:1 conversation the peer's label is used).
    author: Option<String>,
    text: String,
    /// Ours only.
    delivery: Option<Delivery>,
}

/// What a key press asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Nothing beyond redrawing.
    None,
    /// Send this text (local key, text).
    Send(u64, String),
    /// Leave the conversation (back to the list, or quit).
    Leave,
    /// Quit the chat.
    Quit,
}

/// The conversation screen.
#[derive(Debug)]
pub(crate) struct Conversation {
    /// The person or group.
    pub(crate) with: ConversationWith,
    entries: Vec<Entry>,
    next_key: u64,
    input: String,
    /// Lines scrolled up from the bottom.
    scroll: usize,
    /// A passing remark for the status line (cleared by typing).
    pub(crate) notice: Option<String>,
    /// Whether Esc goes back to a list (else it quits).
    pub(crate) back_to_list: bool,
}

impl Conversation {
    pub(crate) fn new(with: ConversationWith, back_to_list: bool) -> Conversation {
        Conversation {
            with,
            entries: Vec::new(),
            next_key: 0,
            input: String::new(),
            scroll: 0,
            notice: None,
            back_to_list,
        }
    }

    fn label(&self) -> String {
        match &self.with {
            ConversationWith::Peer { user_id, name, .. } => {
                name.clone().unwrap_or_else(|| user_id.clone())
            }
            ConversationWith::Group { name, .. } => name.clone(),
        }
    }

    fn is_group(&self) -> bool {
        matches!(self.with, ConversationWith::Group { .. })
    }

    fn by_id(&mut self, id: &str) -> Option<&mut Entry> {
        self.entries
            .iter_mut()
            .find(|e| e.id.as_deref() == Some(id))
    }

    /// A message from the `Conversation` stream. Returns its id if it is an incoming message the
    /// user has not read yet (it is on the screen now: the caller marks it read).
    pub(crate) fn on_message(&mut self, m: MessageView) -> Option<String> {
        if let ConversationWith::Peer { user_id, .. } = &self.with {
            if m.peer_user_id != *user_id {
                return None;
            }
        }
        if let Some(e) = self.by_id(&m.id) {
            if let Some(d) = &mut e.delivery {
                if d.advanced_by(&m.status) {
                    *d = Delivery::At(m.status);
                }
            }
            return None;
        }
        if m.outgoing {
            // A line typed here that the node has not confirmed yet: the oldest with this text
            // (lines are sent one after the other).
            if let Some(e) = self.entries.iter_mut().find(|e| {
                e.own && e.id.is_none() && e.delivery == Some(Delivery::Sending) && e.text == m.text
            }) {
                e.id = Some(m.id);
                e.delivery = Some(Delivery::At(m.status));
                return None;
            }
        }
        let unread = !m.outgoing && m.status != StatusView::Read;
        let id = m.id.clone();
        let author = self.is_group().then(|| {
            m.peer_name
                .clone()
                .unwrap_or_else(|| super::list::short_id(&m.peer_user_id))
        });
        self.entries.push(Entry {
            key: None,
            id: Some(m.id),
            time_ms: m.sent_at_ms,
            own: m.outgoing,
            author,
            text: m.text,
            delivery: m.outgoing.then_some(Delivery::At(m.status)),
        });
        if self.scroll > 0 {
            // Keep the lines being read in place.
            self.scroll += 1;
        }
        unread.then_some(id)
    }

    /// A status change of one of our messages.
    pub(crate) fn on_status(&mut self, s: MessageStatusView) {
        if let ConversationWith::Peer { user_id, .. } = &self.with {
            if s.peer_user_id != *user_id {
                return;
            }
        }
        if let Some(d) = self.by_id(&s.id).and_then(|e| e.delivery.as_mut()) {
            if d.advanced_by(&s.status) {
                *d = Delivery::At(s.status);
            }
        }
    }

    /// The node's answer to the send of the line typed under `key`: the message id and where
    /// it is, or why it failed.
    pub(crate) fn on_sent(&mut self, key: u64, result: Result<(String, StatusView), String>) {
        let Some(pos) = self.entries.iter().position(|e| e.key == Some(key)) else {
            return;
        };
        match result {
            Err(why) => {
                if self.entries[pos].delivery == Some(Delivery::Sending) {
                    self.entries[pos].delivery = Some(Delivery::Failed(why));
                }
            }
            Ok((message_id, status)) => {
                // The stream may have shown it already (under its id): keep one line.
                let twin = self
                    .entries
                    .iter()
                    .position(|e| e.key.is_none() && e.id.as_deref() == Some(&message_id));
                if let Some(t) = twin {
                    let shown = self.entries.remove(t);
                    let pos = if t < pos { pos - 1 } else { pos };
                    self.entries[pos].delivery = shown.delivery;
                }
                let e = &mut self.entries[pos];
                e.id = Some(message_id);
                match &mut e.delivery {
                    Some(d) if !d.advanced_by(&status) => {}
                    d => *d = Some(Delivery::At(status)),
                }
            }
        }
    }

    /// A key press.
    pub(crate) fn key(&mut self, k: KeyEvent, page: usize) -> Action {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        match k.code {
            KeyCode::Esc => return Action::Leave,
            KeyCode::Char('c') | KeyCode::Char('d') if ctrl => return Action::Quit,
            KeyCode::Char('u') if ctrl => self.input.clear(),
            KeyCode::Char(c) if !ctrl => {
                self.input.push(c);
                self.notice = None;
            }
            KeyCode::Backspace => {
                self.input.pop();
            }
            KeyCode::PageUp => self.scroll += page.max(1),
            KeyCode::PageDown => self.scroll = self.scroll.saturating_sub(page.max(1)),
            KeyCode::Up => self.scroll += 1,
            KeyCode::Down => self.scroll = self.scroll.saturating_sub(1),
            KeyCode::End => self.scroll = 0,
            KeyCode::Enter => {
                if self.input.trim().is_empty() {
                    return Action::None;
                }
                if self.input.len() > MAX_REQUEST_TEXT_BYTES {
                    self.notice = Some(format!(
                        "the message is {} bytes; the limit is {MAX_REQUEST_TEXT_BYTES}",
                        self.input.len()
                    ));
                    return Action::None;
                }
                let text = std::mem::take(&mut self.input);
                let key = self.next_key;
                self.next_key += 1;
                self.entries.push(Entry {
                    key: Some(key),
                    id: None,
                    time_ms: text::now_ms(),
                    own: true,
                    author: None,
                    text: text.clone(),
                    delivery: Some(Delivery::Sending),
                });
                self.scroll = 0;
                return Action::Send(key, text);
            }
            _ => {}
        }
        Action::None
    }

    /// The lines of one message at `cols` columns.
    fn entry_lines(&self, e: &Entry, cols: usize) -> Vec<Line<'static>> {
        let hhmm = text::hhmm(e.time_ms);
        let (name, color) = if e.own {
            ("you".to_owned(), Color::Blue)
        } else {
            let who = e.author.clone().unwrap_or_else(|| self.label());
            (text::cut(&text::one_line(&who), 24), Color::Green)
        };
        let head = width(&hhmm) + 1 + width(&name) + 2;
        let mut pieces = text::wrap(
            &e.text,
            cols.saturating_sub(head).max(8),
            cols.saturating_sub(2).max(8),
        );
        let group = self.is_group();
        let status = e.delivery.as_ref().map(|d| d.span(group));
        // The status goes after the text if it fits there, else on a line of its own.
        let mut status_line = None;
        if let Some(s) = &status {
            let last_cols = if pieces.len() == 1 { head } else { 2 }
                + width(pieces.last().map_or("", String::as_str));
            if last_cols + 3 + width(&s.content) > cols {
                status_line = Some(s.clone());
            }
        }
        let mut out = Vec::with_capacity(pieces.len() + 1);
        let n = pieces.len();
        for (i, piece) in pieces.drain(..).enumerate() {
            let mut spans = if i == 0 {
                vec![
                    Span::styled(hhmm.clone(), Style::default().add_modifier(Modifier::DIM)),
                    Span::raw(" "),
                    Span::styled(
                        format!("{name}:"),
                        Style::default().fg(color).add_modifier(Modifier::BOLD),
                    ),
                    Span::raw(" "),
                    Span::raw(piece),
                ]
            } else {
                vec![Span::raw("  "), Span::raw(piece)]
            };
            if i + 1 == n && status_line.is_none() {
                if let Some(s) = &status {
                    spans.push(Span::raw(" · "));
                    spans.push(s.clone());
                }
            }
            out.push(Line::from(spans));
        }
        if let Some(s) = status_line {
            out.push(Line::from(vec![Span::raw("  · "), s]));
        }
        out
    }

    /// At least the last `want` lines of the conversation at `cols` columns (all if there are
    /// fewer), with a day line where the date changes.
    fn tail_lines(&self, cols: usize, want: usize) -> Vec<Line<'static>> {
        let today = text::day(text::now_ms());
        let mut rev: Vec<Line<'static>> = Vec::new();
        for (i, e) in self.entries.iter().enumerate().rev() {
            if rev.len() >= want {
                break;
            }
            let mut lines = self.entry_lines(e, cols);
            let day = text::day(e.time_ms);
            let previous = i.checked_sub(1).map(|p| text::day(self.entries[p].time_ms));
            let new_day = match &previous {
                Some(p) => *p != day,
                None => day != today,
            };
            if new_day {
                lines.insert(
                    0,
                    Line::styled(
                        format!("── {day} ──"),
                        Style::default().add_modifier(Modifier::DIM),
                    ),
                );
            }
            rev.extend(lines.into_iter().rev());
        }
        rev.into_iter().rev().collect()
    }

    /// Draw into `area`: the header, the messages, the input line and `status`.
    pub(crate) fn draw(&mut self, frame: &mut Frame<'_>, area: Rect, status: &str) {
        let [header, body, input, status_area] = super::layout(area);

        let cols = usize::from(header.width);
        let title = match &self.with {
            ConversationWith::Peer { .. } => format!("Chat with {}", text::one_line(&self.label())),
            ConversationWith::Group { name, .. } => format!("Group {}", text::one_line(name)),
        };
        let title = text::cut(&title, cols.saturating_sub(15).max(12));
        let verification = match &self.with {
            ConversationWith::Peer { verified: true, .. } => {
                Span::styled("verified", Style::default().fg(Color::Green))
            }
            ConversationWith::Peer { name, .. } => {
                let hint = match name {
                    Some(n) => format!(
                        "not verified (meshchat contact verify {})",
                        text::one_line(n)
                    ),
                    None => "not a contact, not verified".to_owned(),
                };
                // The hint only where it fits.
                let hint = if width(&title) + 3 + width(&hint) > cols {
                    "not verified".to_owned()
                } else {
                    hint
                };
                Span::styled(hint, Style::default().fg(Color::Yellow))
            }
            ConversationWith::Group { members, .. } => {
                let s = if *members == 1 { "" } else { "s" };
                Span::raw(format!("{members} member{s}"))
            }
        };
        frame.render_widget(
            Paragraph::new(Line::from(vec![
                Span::styled(title, Style::default().add_modifier(Modifier::BOLD)),
                Span::raw(" · "),
                verification,
            ])),
            header,
        );

        let height = usize::from(body.height);
        let cols = usize::from(body.width);
        let lines = self.tail_lines(cols, height + self.scroll);
        let max_scroll = lines.len().saturating_sub(height);
        self.scroll = self.scroll.min(max_scroll);
        let end = lines.len() - self.scroll;
        let start = end.saturating_sub(height);
        let shown: Vec<Line<'static>> = lines[start..end].to_vec();
        // Messages sit at the bottom, just above the input line, as in other chat programs.
        let pad = height.saturating_sub(shown.len());
        let body = Rect {
            y: body.y + u16::try_from(pad).unwrap_or(0),
            height: body.height - u16::try_from(pad).unwrap_or(0),
            ..body
        };
        frame.render_widget(Paragraph::new(shown), body);

        // The input line shows its end when it is longer than the screen.
        let room = usize::from(input.width).saturating_sub(3).max(1);
        let typed = text::one_line(&self.input);
        let mut shown = String::new();
        let mut used = 0;
        for c in typed.chars().rev() {
            let w = width(c.encode_utf8(&mut [0; 4]));
            if used + w > room {
                break;
            }
            shown.insert(0, c);
            used += w;
        }
        let cursor_x = input.x + 2 + u16::try_from(used).unwrap_or(0);
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

        let mut status = status.to_owned();
        if self.scroll > 0 {
            status = format!(" ↓ {} more lines (PgDn) ·{status}", self.scroll);
        }
        frame.render_widget(
            Paragraph::new(text::cut(&status, usize::from(status_area.width)))
                .style(Style::default().add_modifier(Modifier::REVERSED)),
            status_area,
        );
    }

    /// The keys shown in the status line.
    pub(crate) fn keys(&self) -> [&'static str; 2] {
        [
            "Enter send",
            if self.back_to_list {
                "Esc back"
            } else {
                "Esc quit"
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: u8, outgoing: bool, text: &str, status: StatusView) -> MessageView {
        MessageView {
            index: u64::from(id),
            id: hex::encode([id; 16]),
            peer_user_id: "mc1bob".into(),
            peer_name: Some("bob".into()),
            outgoing,
            seq: u64::from(id),
            sent_at_ms: 1_700_000_000_000,
            received_at_ms: 1_700_000_000_000,
            text: text.into(),
            status,
            group_id: None,
            group_name: None,
        }
    }

    fn deliveries(c: &Conversation) -> Vec<(String, Option<Delivery>)> {
        c.entries
            .iter()
            .map(|e| (e.text.clone(), e.delivery.clone()))
            .collect()
    }

    fn typed(c: &mut Conversation, text: &str) -> u64 {
        for ch in text.chars() {
            c.key(KeyEvent::from(KeyCode::Char(ch)), 10);
        }
        match c.key(KeyEvent::from(KeyCode::Enter), 10) {
            Action::Send(key, t) => {
                assert_eq!(t, text);
                key
            }
            other => panic!("{other:?}"),
        }
    }

    fn sent(id: u8, status: StatusView) -> Result<(String, StatusView), String> {
        Ok((hex::encode([id; 16]), status))
    }

    fn bob(back: bool) -> Conversation {
        Conversation::new(
            ConversationWith::Peer {
                user_id: "mc1bob".into(),
                name: Some("bob".into()),
                verified: false,
            },
            back,
        )
    }

    #[test]
    fn history_of_both_directions_and_unread_ones_to_mark() {
        let mut c = bob(false);
        assert_eq!(c.on_message(view(1, false, "hi", StatusView::Read)), None);
        assert_eq!(
            c.on_message(view(2, false, "new", StatusView::Delivered)),
            Some(hex::encode([2; 16]))
        );
        assert_eq!(
            c.on_message(view(3, true, "mine", StatusView::Delivered)),
            None
        );
        // Shown once, even when listed again.
        assert_eq!(c.on_message(view(2, false, "new", StatusView::Read)), None);
        assert_eq!(c.entries.len(), 3);
        c.on_status(MessageStatusView {
            id: hex::encode([3; 16]),
            peer_user_id: "mc1bob".into(),
            status: StatusView::Read,
        });
        assert_eq!(
            deliveries(&c)[2],
            ("mine".into(), Some(Delivery::At(StatusView::Read)))
        );
        // Statuses never go backwards.
        c.on_status(MessageStatusView {
            id: hex::encode([3; 16]),
            peer_user_id: "mc1bob".into(),
            status: StatusView::Stored { replicas: 3 },
        });
        assert_eq!(deliveries(&c)[2].1, Some(Delivery::At(StatusView::Read)));
        // Another conversation's messages are not shown.
        let mut other = view(9, false, "elsewhere", StatusView::Delivered);
        other.peer_user_id = "mc1carol".into();
        assert_eq!(c.on_message(other), None);
        assert_eq!(c.entries.len(), 3);
    }

    #[test]
    fn a_typed_line_is_shown_once_whichever_answer_comes_first() {
        // The node's answer first, then the stream.
        let mut c = bob(false);
        let k = typed(&mut c, "one");
        assert_eq!(deliveries(&c), [("one".into(), Some(Delivery::Sending))]);
        c.on_sent(k, sent(1, StatusView::Delivered));
        c.on_message(view(1, true, "one", StatusView::Delivered));
        assert_eq!(
            deliveries(&c),
            [("one".into(), Some(Delivery::At(StatusView::Delivered)))]
        );

        // The stream first (still queued there), then the node's answer.
        let k = typed(&mut c, "two");
        c.on_message(view(2, true, "two", StatusView::Queued));
        c.on_sent(k, sent(2, StatusView::Stored { replicas: 3 }));
        assert_eq!(
            deliveries(&c)[1],
            (
                "two".into(),
                Some(Delivery::At(StatusView::Stored { replicas: 3 }))
            )
        );
        // The stream saw it read before the answer came: read stays.
        let k = typed(&mut c, "three");
        c.on_message(view(3, true, "three", StatusView::Read));
        c.on_sent(k, sent(3, StatusView::Delivered));
        assert_eq!(deliveries(&c)[2].1, Some(Delivery::At(StatusView::Read)));
        assert_eq!(c.entries.len(), 3);

        // A failure.
        let k = typed(&mut c, "four");
        c.on_sent(k, Err("the node stopped".into()));
        assert_eq!(
            deliveries(&c)[3].1,
            Some(Delivery::Failed("the node stopped".into()))
        );
    }

    #[test]
    fn the_input_line_refuses_an_oversized_message() {
        let mut c = bob(true);
        c.input = "x".repeat(MAX_REQUEST_TEXT_BYTES + 1);
        assert_eq!(c.key(KeyEvent::from(KeyCode::Enter), 10), Action::None);
        assert!(c.notice.as_deref().is_some_and(|n| n.contains("limit")));
        assert_eq!(
            c.input.len(),
            MAX_REQUEST_TEXT_BYTES + 1,
            "kept for editing"
        );
        assert_eq!(c.key(KeyEvent::from(KeyCode::Esc), 10), Action::Leave);
        assert_eq!(c.keys()[1], "Esc back");
    }

    #[test]
    fn long_messages_wrap_and_the_status_follows_the_text() {
        let mut c = bob(false);
        c.on_message(view(1, true, &"word ".repeat(30), StatusView::Delivered));
        let lines = c.tail_lines(40, 100);
        let texts: Vec<String> = lines
            .iter()
            .map(|l| l.spans.iter().map(|s| s.content.as_ref()).collect())
            .collect();
        assert!(texts.iter().all(|t| width(t) <= 40), "{texts:#?}");
        assert!(
            texts.last().is_some_and(|t| t.ends_with("delivered")),
            "{texts:#?}"
        );
    }

    #[test]
    fn a_group_shows_each_author_and_sent_for_published() {
        let mut c = Conversation::new(
            ConversationWith::Group {
                id: "ab".repeat(32),
                name: "weekend".into(),
                members: 3,
            },
            true,
        );
        let mut from_bob = view(1, false, "hello all", StatusView::Delivered);
        from_bob.peer_user_id = "mc1bob".into();
        let mut from_carol = view(2, false, "hi", StatusView::Delivered);
        from_carol.peer_user_id = format!("mc1{}", "c".repeat(58));
        from_carol.peer_name = None;
        assert!(c.on_message(from_bob).is_some());
        assert!(c.on_message(from_carol).is_some());
        let k = typed(&mut c, "see you");
        c.on_sent(k, sent(3, StatusView::Delivered));
        let texts: Vec<String> = c
            .tail_lines(80, 100)
            .iter()
            .map(|l| {
                l.spans
                    .iter()
                    .map(|s| s.content.as_ref())
                    .collect::<String>()
            })
            .filter(|l| !l.starts_with("──"))
            .collect();
        assert!(texts[0].ends_with("bob: hello all"), "{texts:?}");
        assert!(texts[1].contains("mc1cccccc…cccccc: hi"), "{texts:?}");
        assert!(texts[2].ends_with("you: see you · sent"), "{texts:?}");
    }
}
