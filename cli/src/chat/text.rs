//! Text for the chat screens: display widths (wide characters count two columns), word
//! wrapping, cutting to a width, short times, and the status line that fits the terminal. See
//! `docs/cli.md`, section "chat".

use meshchat_node::control::NodeStatusView;
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use crate::output::format_time;

/// Columns `text` takes on the screen.
pub(crate) fn width(text: &str) -> usize {
    text.width()
}

/// A character as it may be drawn: control characters (which would move the cursor or change
/// colours) become spaces.
fn visible(c: char) -> char {
    if c.is_control() {
        ' '
    } else {
        c
    }
}

/// `text` as one line: control characters (line breaks too) become spaces.
pub(crate) fn one_line(text: &str) -> String {
    text.chars().map(visible).collect()
}

/// `text` cut to at most `max` columns, with `…` where it was cut.
pub(crate) fn cut(text: &str, max: usize) -> String {
    if width(text) <= max {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        let w = c.width().unwrap_or(0);
        if used + w + 1 > max {
            break;
        }
        out.push(c);
        used += w;
    }
    if max > 0 {
        out.push('…');
    }
    out
}

/// `text` cut or padded with spaces to exactly `cols` columns.
pub(crate) fn fit(text: &str, cols: usize) -> String {
    let mut s = cut(text, cols);
    let w = width(&s);
    s.extend(std::iter::repeat_n(' ', cols.saturating_sub(w)));
    s
}

/// `text` broken into lines: the first at most `first` columns wide, the others at most `rest`;
/// at spaces where possible, inside a word when it is longer than a line; the text's own line
/// breaks are kept. Always at least one line.
pub(crate) fn wrap(text: &str, first: usize, rest: usize) -> Vec<String> {
    let (first, rest) = (first.max(1), rest.max(1));
    let mut lines: Vec<String> = Vec::new();
    for paragraph in text.split('\n') {
        let mut line = String::new();
        let mut used = 0usize;
        // Byte offset and used width of the last space in `line`.
        let mut space: Option<usize> = None;
        for c in paragraph.chars().map(visible) {
            let w = c.width().unwrap_or(0);
            let limit = if lines.is_empty() { first } else { rest };
            if used + w > limit {
                match space.filter(|at| *at > 0 && c != ' ') {
                    Some(at) => {
                        let tail = line.split_off(at);
                        lines.push(line);
                        line = tail.trim_start_matches(' ').to_owned();
                    }
                    None => lines.push(std::mem::take(&mut line)),
                }
                used = width(&line);
                space = None;
                let limit = if lines.is_empty() { first } else { rest };
                if used + w > limit {
                    lines.push(std::mem::take(&mut line));
                    used = 0;
                }
                if c == ' ' && line.is_empty() {
                    continue;
                }
            }
            if c == ' ' {
                space = Some(line.len());
            }
            line.push(c);
            used += w;
        }
        lines.push(line);
    }
    lines
}

/// `HH:MM` (UTC).
pub(crate) fn hhmm(ms: u64) -> String {
    format_time(ms).get(11..16).unwrap_or("--:--").to_owned()
}

/// `YYYY-MM-DD` (UTC).
pub(crate) fn day(ms: u64) -> String {
    format_time(ms).get(..10).unwrap_or("----------").to_owned()
}

/// A time in a list: `HH:MM` today, else `MM-DD` this year, else the year.
pub(crate) fn short_time(ms: u64, now_ms: u64) -> String {
    let (then, now) = (format_time(ms), format_time(now_ms));
    if then.get(..10) == now.get(..10) {
        hhmm(ms)
    } else if then.get(..4) == now.get(..4) {
        then.get(5..10).unwrap_or("-----").to_owned()
    } else {
        then.get(..4).unwrap_or("----").to_owned()
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What the status line knows about the node.
#[derive(Debug, Clone, Default)]
pub(crate) enum NodeState {
    /// No answer yet.
    #[default]
    Unknown,
    /// The last status.
    Known(Box<NodeStatusView>),
    /// The node did not answer.
    Gone,
}

/// The connections, long form: `3 peers connected: 2 direct, 1 relayed`.
fn peers_long(s: &NodeStatusView) -> String {
    let n = s.connected.len();
    let relayed = s.connected.iter().filter(|c| c.relayed).count();
    let direct = n - relayed;
    match (n, relayed) {
        (0, _) => "no peers connected".to_owned(),
        (1, 0) => "1 peer connected, direct".to_owned(),
        (1, _) => "1 peer connected, relayed".to_owned(),
        (n, 0) => format!("{n} peers connected, all direct"),
        (n, r) if r == n => format!("{n} peers connected, all relayed"),
        (n, r) => format!("{n} peers connected: {direct} direct, {r} relayed"),
    }
}

/// The connections, short form: `3 peers connected`.
fn peers_short(s: &NodeStatusView) -> String {
    match s.connected.len() {
        0 => "no peers connected".to_owned(),
        1 => "1 peer connected".to_owned(),
        n => format!("{n} peers connected"),
    }
}

/// Reachability: `NAT public`, `NAT private, via relay`, `LAN only`.
fn nat(s: &NodeStatusView) -> String {
    if s.reachability.lan_only {
        return "LAN only".to_owned();
    }
    let verdict = one_line(&s.nat_status);
    if s.relay_reservations.is_empty() {
        format!("NAT {verdict}")
    } else {
        format!("NAT {verdict}, via relay")
    }
}

/// The status line: `notice · peers · NAT · keys`, dropping detail until it fits `cols`
/// (keys are kept longest: they say how to leave).
pub(crate) fn status_line(
    notice: Option<&str>,
    node: &NodeState,
    keys: &[&str],
    cols: usize,
) -> String {
    let keys_all = keys.join(" · ");
    let keys_last = keys.last().copied().unwrap_or_default().to_owned();
    let (long, short, nat) = match node {
        NodeState::Unknown => ("connecting…".to_owned(), "connecting…".to_owned(), None),
        NodeState::Gone => (
            "node not answering".to_owned(),
            "node not answering".to_owned(),
            None,
        ),
        NodeState::Known(s) => (peers_long(s), peers_short(s), Some(nat(s))),
    };
    let notice = notice.map(one_line);
    let join = |parts: &[Option<&str>]| -> String {
        let parts: Vec<&str> = parts.iter().flatten().copied().collect();
        format!(" {}", parts.join(" · "))
    };
    let n = notice.as_deref();
    let candidates = [
        join(&[n, Some(&long), nat.as_deref(), Some(&keys_all)]),
        join(&[n, Some(&long), Some(&keys_all)]),
        join(&[n, Some(&short), Some(&keys_all)]),
        join(&[n, Some(&short), Some(&keys_last)]),
        join(&[n, Some(&keys_last)]),
    ];
    candidates
        .iter()
        .find(|c| width(c) <= cols)
        .cloned()
        .unwrap_or_else(|| cut(&candidates[candidates.len() - 1], cols))
}

#[cfg(test)]
mod tests {
    use meshchat_node::control::{ConnectedView, NodeStatusView};

    use super::*;

    #[test]
    fn wrap_breaks_at_spaces_and_inside_long_words() {
        assert_eq!(wrap("hello world", 8, 8), ["hello", "world"]);
        assert_eq!(wrap("abcdefghij", 4, 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("a b", 10, 10), ["a b"]);
        assert_eq!(wrap("", 10, 10), [""]);
        assert_eq!(wrap("one\ntwo", 10, 10), ["one", "two"]);
        assert_eq!(wrap("aa bb cc", 5, 2), ["aa bb", "cc"]);
        // Wide characters take two columns.
        assert_eq!(wrap("日本語です", 4, 4), ["日本", "語で", "す"]);
        // Control characters are not drawn as such.
        assert_eq!(wrap("a\u{1b}[2Jb", 10, 10), ["a [2Jb"]);
        for l in wrap(&"word ".repeat(40), 17, 23).iter().skip(1) {
            assert!(width(l) <= 23, "{l}");
        }
    }

    #[test]
    fn cut_and_fit_count_columns() {
        assert_eq!(cut("hello", 5), "hello");
        assert_eq!(cut("hello world", 6), "hello…");
        assert_eq!(fit("ab", 4), "ab  ");
        assert_eq!(width(&fit("日本語", 4)), 4);
    }

    fn status(relayed: &[bool], nat: &str, lan_only: bool) -> NodeStatusView {
        NodeStatusView {
            peer_id: "p".into(),
            user_id: "u".into(),
            listen_addrs: vec![],
            external_addrs: vec![],
            connected: relayed
                .iter()
                .map(|r| ConnectedView {
                    peer_id: "x".into(),
                    addr: "/ip4/127.0.0.1/tcp/1".into(),
                    relayed: *r,
                })
                .collect(),
            routing_table_size: 0,
            nat_status: nat.into(),
            relay_reservations: vec![],
            mailbox_replicas_held: 0,
            reachability: meshchat_node::control::ReachabilityView {
                lan_only,
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_status_line_says_direct_relayed_and_nat_and_fits() {
        let keys = ["Enter send", "Esc quit"];
        let s = NodeState::Known(Box::new(status(&[false, false, true], "private", false)));
        let line = status_line(None, &s, &keys, 80);
        assert_eq!(
            line,
            " 3 peers connected: 2 direct, 1 relayed · NAT private · Enter send · Esc quit"
        );
        let narrow = status_line(None, &s, &keys, 40);
        assert!(
            width(&narrow) <= 40 && narrow.ends_with("Esc quit"),
            "{narrow}"
        );
        let one = NodeState::Known(Box::new(status(&[false], "public", false)));
        assert!(status_line(None, &one, &keys, 80).contains("1 peer connected, direct"));
        let lan = NodeState::Known(Box::new(status(&[], "unknown", true)));
        assert!(status_line(None, &lan, &keys, 80).contains("no peers connected · LAN only"));
        let with_notice = status_line(Some("too long"), &s, &keys, 80);
        assert!(
            with_notice.starts_with(" too long · 3 peers"),
            "{with_notice}"
        );
        assert!(status_line(None, &NodeState::Unknown, &keys, 80).contains("connecting…"));
    }
}
