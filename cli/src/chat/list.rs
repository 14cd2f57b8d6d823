//! The conversation list of `meshchat chat` (no `TO`): every conversation, with a person or a
//! group, with its last message time, the start of its last message and the unread count, most
//! recent first, then contacts and groups without messages; arrow keys choose, Enter opens, Esc
//! quits. See `docs/cli.md`, "chat".

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use meshchat_node::control::{ConversationView, ConversationWith};
use ratatui::{
    layout::Rect,
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::Paragraph,
    Frame,
};

use super::text;

/// What a key press asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Nothing beyond redrawing.
    None,
    /// Open this conversation.
    Open(ConversationView),
    /// Quit the chat.
    Quit,
}

/// The list screen.
#[derive(Debug, Default)]
pub(crate) struct List {
    items: Vec<ConversationView>,
    /// The chosen row.
    selected: usize,
    /// The first row drawn.
    top: usize,
    /// Whether the node answered once.
    loaded: bool,
    /// Why the list could not be read, if it could not.
    pub(crate) notice: Option<String>,
}

/// A short form of a user ID for a list: `mc1abcdef…uvwxyz`.
pub(crate) fn short_id(user_id: &str) -> String {
    let chars: Vec<char> = user_id.chars().collect();
    if chars.len() <= 16 {
        return user_id.to_owned();
    }
    let head: String = chars[..9].iter().collect();
    let tail: String = chars[chars.len() - 6..].iter().collect();
    format!("{head}…{tail}")
}

/// Whether two list entries are the same conversation (names and counts may have changed).
fn same(a: &ConversationWith, b: &ConversationWith) -> bool {
    match (a, b) {
        (ConversationWith::Peer { user_id: x, .. }, ConversationWith::Peer { user_id: y, .. }) => {
            x == y
        }
        (ConversationWith::Group { id: x, .. }, ConversationWith::Group { id: y, .. }) => x == y,
        _ => false,
    }
}

impl List {
    /// A fresh listing from the node; the chosen conversation stays chosen.
    pub(crate) fn set(&mut self, items: Vec<ConversationView>) {
        let chosen = self.items.get(self.selected).map(|c| c.with.clone());
        self.items = items;
        self.loaded = true;
        self.notice = None;
        self.selected = chosen
            .and_then(|with| self.items.iter().position(|c| same(&c.with, &with)))
            .unwrap_or(0)
            .min(self.items.len().saturating_sub(1));
    }

    /// A key press; `page` is the number of rows on the screen.
    pub(crate) fn key(&mut self, k: KeyEvent, page: usize) -> Action {
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        let last = self.items.len().saturating_sub(1);
        match k.code {
            KeyCode::Esc | KeyCode::Char('q') => return Action::Quit,
            KeyCode::Char('c') | KeyCode::Char('d') if ctrl => return Action::Quit,
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => self.selected = (self.selected + 1).min(last),
            KeyCode::PageUp => self.selected = self.selected.saturating_sub(page.max(1)),
            KeyCode::PageDown => self.selected = (self.selected + page.max(1)).min(last),
            KeyCode::Home => self.selected = 0,
            KeyCode::End => self.selected = last,
            KeyCode::Enter => {
                if let Some(c) = self.items.get(self.selected) {
                    return Action::Open(c.clone());
                }
            }
            _ => {}
        }
        Action::None
    }

    /// One row at `cols` columns.
    fn row(&self, c: &ConversationView, chosen: bool, cols: usize, now_ms: u64) -> Line<'static> {
        let (name, mark) = match &c.with {
            ConversationWith::Peer {
                user_id,
                name,
                verified,
            } => (
                name.as_deref()
                    .map_or_else(|| short_id(user_id), text::one_line),
                if *verified { "✓" } else { " " },
            ),
            ConversationWith::Group { name, .. } => (format!("#{}", text::one_line(name)), " "),
        };
        let name_cols = (cols / 3).clamp(8, 24);
        let unread = match c.unread {
            0 => String::new(),
            n => format!("{n} unread"),
        };
        let time = c
            .last_at_ms
            .map(|t| text::short_time(t, now_ms))
            .unwrap_or_default();
        let preview = match (&c.last_text, c.last_outgoing) {
            (Some(t), true) => format!("you: {}", text::one_line(t)),
            (Some(t), false) => text::one_line(t),
            (None, _) => "no messages yet".to_owned(),
        };
        let fixed = 2 + name_cols + 2 + 10 + 1 + 5 + 2;
        let preview = text::cut(&preview, cols.saturating_sub(fixed));
        let base = if chosen {
            Style::default().add_modifier(Modifier::REVERSED)
        } else {
            Style::default()
        };
        let bold = if c.unread > 0 {
            base.add_modifier(Modifier::BOLD)
        } else {
            base
        };
        Line::from(vec![
            Span::styled(if chosen { "> " } else { "  " }, base),
            Span::styled(text::fit(&name, name_cols), bold),
            Span::styled(format!("{mark} "), base.fg(Color::Green)),
            Span::styled(format!("{unread:>10} "), bold.fg(Color::Yellow)),
            Span::styled(format!("{time:>5}  "), base.add_modifier(Modifier::DIM)),
            Span::styled(preview, base),
        ])
    }

    /// Draw into `area`: the header, the rows, a hint and `status`.
    pub(crate) fn draw(&mut self, frame: &mut Frame<'_>, area: Rect, status: &str) {
        let [header, body, hint, status_area] = super::layout(area);
        let unread: u64 = self.items.iter().map(|c| c.unread).sum();
        let title = match (self.items.len(), unread) {
            (0, _) => "Conversations".to_owned(),
            (n, 0) => format!("Conversations ({n})"),
            (n, u) => format!("Conversations ({n}, {u} unread)"),
        };
        frame.render_widget(
            Paragraph::new(Span::styled(
                title,
                Style::default().add_modifier(Modifier::BOLD),
            )),
            header,
        );

        let rows = usize::from(body.height).max(1);
        let cols = usize::from(body.width);
        let lines: Vec<Line<'static>> = if self.items.is_empty() {
            let first = if self.loaded {
                "No conversations yet."
            } else {
                "Reading the conversations…"
            };
            vec![
                Line::raw(first),
                Line::raw(""),
                Line::raw("Add a contact with `meshchat contact add NAME USER_ID`,"),
                Line::raw("or open a chat with `meshchat chat USER_ID`."),
            ]
        } else {
            if self.selected < self.top {
                self.top = self.selected;
            } else if self.selected >= self.top + rows {
                self.top = self.selected + 1 - rows;
            }
            let now = text::now_ms();
            self.items
                .iter()
                .enumerate()
                .skip(self.top)
                .take(rows)
                .map(|(i, c)| self.row(c, i == self.selected, cols, now))
                .collect()
        };
        frame.render_widget(Paragraph::new(lines), body);

        let more = self.items.len().saturating_sub(self.top + rows);
        let hint_text = if more > 0 {
            format!("  ({more} more below)")
        } else {
            String::new()
        };
        frame.render_widget(
            Paragraph::new(Span::styled(
                hint_text,
                Style::default().add_modifier(Modifier::DIM),
            )),
            hint,
        );
        frame.render_widget(
            Paragraph::new(text::cut(status, usize::from(status_area.width)))
                .style(Style::default().add_modifier(Modifier::REVERSED)),
            status_area,
        );
    }

    /// The keys shown in the status line.
    pub(crate) fn keys(&self) -> [&'static str; 3] {
        ["↑↓ choose", "Enter open", "Esc quit"]
    }

    /// Whether `width` columns fit a row's fixed part (used by tests).
    #[cfg(test)]
    fn rows_fit(&self, cols: usize) -> bool {
        let now = text::now_ms();
        self.items.iter().all(|c| {
            let l = self.row(c, false, cols, now);
            text::width(
                &l.spans
                    .iter()
                    .map(|s| s.content.as_ref())
                    .collect::<String>(),
            ) <= cols
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: Option<&str>, id: &str, unread: u64, text: Option<&str>) -> ConversationView {
        ConversationView {
            with: ConversationWith::Peer {
                user_id: id.into(),
                name: name.map(str::to_owned),
                verified: false,
            },
            messages: u64::from(text.is_some()),
            unread,
            last_at_ms: text.map(|_| 1_700_000_000_000),
            last_text: text.map(str::to_owned),
            last_outgoing: false,
        }
    }

    #[test]
    fn arrows_choose_enter_opens_esc_quits_and_the_choice_survives_a_refresh() {
        let mut l = List::default();
        l.set(vec![
            item(Some("bob"), "mc1b", 2, Some("hi")),
            item(Some("carol"), "mc1c", 0, Some("yo")),
        ]);
        assert_eq!(l.key(KeyEvent::from(KeyCode::Down), 5), Action::None);
        assert_eq!(l.key(KeyEvent::from(KeyCode::Down), 5), Action::None);
        match l.key(KeyEvent::from(KeyCode::Enter), 5) {
            Action::Open(c) => assert!(same(&c.with, &item(None, "mc1c", 0, None).with)),
            other => panic!("{other:?}"),
        }
        // carol moves to the top: still chosen.
        l.set(vec![
            item(Some("carol"), "mc1c", 1, Some("new")),
            item(Some("bob"), "mc1b", 2, Some("hi")),
        ]);
        assert_eq!(l.selected, 0);
        assert_eq!(l.key(KeyEvent::from(KeyCode::Esc), 5), Action::Quit);
        let mut empty = List::default();
        assert_eq!(empty.key(KeyEvent::from(KeyCode::Enter), 5), Action::None);
    }

    #[test]
    fn rows_fit_the_width() {
        let mut l = List::default();
        let long = "a very long message ".repeat(20);
        let mut group = item(None, "-", 3, Some(&long));
        group.with = ConversationWith::Group {
            id: "ab".repeat(32),
            name: "a group with a long name, too long".into(),
            members: 12,
        };
        l.set(vec![
            group,
            item(
                Some("somebody with a long name indeed"),
                "mc1x",
                12,
                Some(&long),
            ),
            item(None, &format!("mc1{}", "q".repeat(58)), 0, None),
        ]);
        assert!(l.rows_fit(80));
        assert!(l.rows_fit(60));
        assert_eq!(
            short_id(&format!("mc1{}", "q".repeat(58))).chars().count(),
            16
        );
    }
}
