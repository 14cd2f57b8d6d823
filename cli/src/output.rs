//! Rendering: human text, or with `--json` one JSON object per line whose shape is stable (every
//! key always present, `null` when it does not apply). See `docs/architecture.md`, section "CLI".

use meshchat_node::control::{
    ContactView, MessageView, NodeStatusView, SendOutcome, SendView, VerifyView,
};
use serde_json::{json, Value};

/// Where output goes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Out {
    pub(crate) json: bool,
}

/// Set once a write to stdout found its reader gone.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the reader of stdout went away (`meshchat inbox --follow | head -1`): the command
/// should stop and end quietly with exit code 0, as a filter does.
pub(crate) fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed)
}

impl Out {
    /// Print `human` as text, or `json` as one line. When the reader of stdout went away, the
    /// rest of the output is dropped and [`stdout_closed`] says so; the command then returns
    /// normally (never `process::exit` here: RocksDB may be open, and exiting under its
    /// background threads can crash the process).
    pub(crate) fn emit(&self, human: impl std::fmt::Display, json: Value) {
        use std::io::Write;
        if stdout_closed() {
            return;
        }
        let mut out = std::io::stdout().lock();
        let written = if self.json {
            writeln!(out, "{json}")
        } else {
            writeln!(out, "{human}")
        }
        .and_then(|()| out.flush());
        if let Err(e) = written {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            tracing::warn!("cannot write to stdout: {e}");
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, from milliseconds since the Unix epoch.
pub(crate) fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

pub(crate) fn contact_json(c: &ContactView) -> Value {
    json!({
        "name": c.name,
        "user_id": c.user_id,
        "verified": c.verified,
        "added_at_ms": c.added_at_ms,
    })
}

pub(crate) fn contact_line(c: &ContactView) -> String {
    let mark = if c.verified {
        "verified"
    } else {
        "not verified"
    };
    format!("{:<20} {}  ({mark})", c.name, c.user_id)
}

pub(crate) fn verify_json(v: &VerifyView) -> Value {
    json!({
        "name": v.contact.name,
        "user_id": v.contact.user_id,
        "safety_number": v.safety_number,
        "verified": v.contact.verified,
    })
}

pub(crate) fn message_json(m: &MessageView) -> Value {
    json!({
        "index": m.index,
        "id": m.id,
        "from": m.peer_user_id,
        "from_name": m.peer_name,
        "sent_at_ms": m.sent_at_ms,
        "received_at_ms": m.received_at_ms,
        "text": m.text,
        "group_id": m.group_id,
        "group_name": m.group_name,
    })
}

pub(crate) fn message_line(m: &MessageView) -> String {
    let from = m.peer_name.as_deref().unwrap_or(&m.peer_user_id);
    let group = match (&m.group_name, &m.group_id) {
        (Some(name), _) => format!("{name}/"),
        (None, Some(id)) => format!("{}/", id.get(..16).unwrap_or(id)),
        (None, None) => String::new(),
    };
    format!(
        "[{} UTC] {group}{from}: {}",
        format_time(m.sent_at_ms),
        m.text
    )
}

pub(crate) fn send_json(s: &SendView) -> Value {
    let (outcome, replicas, reason) = match &s.outcome {
        SendOutcome::Delivered => ("delivered", None, None),
        SendOutcome::Stored { replicas } => ("stored", Some(*replicas), None),
        SendOutcome::Queued { reason } => ("queued", None, Some(reason.as_str())),
    };
    json!({
        "message_id": s.message_id,
        "to": s.to_user_id,
        "to_name": s.to_name,
        "outcome": outcome,
        "replicas": replicas,
        "reason": reason,
    })
}

pub(crate) fn send_line(s: &SendView) -> String {
    let to = s.to_name.as_deref().unwrap_or(&s.to_user_id);
    match &s.outcome {
        SendOutcome::Delivered => format!("Delivered to {to}."),
        SendOutcome::Stored { replicas } => format!(
            "Stored on {replicas} replicas of {to}'s mailbox; {to} collects it when back online."
        ),
        SendOutcome::Queued { reason } => format!(
            "Not delivered to {to} yet ({reason}). The message is queued on this home and is \
             retried while a meshchat node runs here."
        ),
    }
}

pub(crate) fn status_json(s: &NodeStatusView) -> Value {
    json!({
        "peer_id": s.peer_id,
        "user_id": s.user_id,
        "listen_addrs": s.listen_addrs,
        "external_addrs": s.external_addrs,
        "connected": s.connected.iter().map(|c| json!({
            "peer_id": c.peer_id,
            "addr": c.addr,
            "relayed": c.relayed,
        })).collect::<Vec<_>>(),
        "routing_table_size": s.routing_table_size,
        "nat_status": s.nat_status,
        "relay_reservations": s.relay_reservations,
        "mailbox_replicas_held": s.mailbox_replicas_held,
        "hole_punches_succeeded": s.reachability.hole_punches_succeeded,
        "hole_punches_failed": s.reachability.hole_punches_failed,
        "relay_server": s.reachability.relay_server.as_ref().map(|r| json!({
            "reservations": r.reservations,
            "circuits": r.circuits,
            "reservations_refused": r.reservations_refused,
            "circuits_refused": r.circuits_refused,
        })),
        "lan_only": s.reachability.lan_only,
        "mdns": s.reachability.mdns,
    })
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "  (none)".to_owned()
    } else {
        items
            .iter()
            .map(|a| format!("  {a}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub(crate) fn status_text(s: &NodeStatusView) -> String {
    let connected: Vec<String> = s
        .connected
        .iter()
        .map(|c| {
            let how = if c.relayed { "relayed" } else { "direct" };
            format!("{} {} ({how})", c.peer_id, c.addr)
        })
        .collect();
    let r = &s.reachability;
    let mode = match (r.lan_only, r.mdns) {
        (true, _) => "LAN-only (peers found by mDNS)",
        (false, true) => "internet, and the LAN by mDNS",
        (false, false) => "internet",
    };
    let relay = match &r.relay_server {
        None => String::new(),
        Some(x) => format!(
            "relay for others:      {} reservations, {} circuits ({} reservations and {} \
             circuits refused)\n",
            x.reservations, x.circuits, x.reservations_refused, x.circuits_refused
        ),
    };
    format!(
        "peer ID:               {}\nuser ID:               {}\nNAT status:            {}\n\
         network:               {mode}\n\
         hole punching:         {} succeeded, {} failed\n{relay}\
         routing table:         {} peers\nmailbox replicas held: {}\n\
         listen addresses:\n{}\nexternal addresses:\n{}\nrelay reservations:\n{}\n\
         connected peers ({}):\n{}",
        s.peer_id,
        s.user_id,
        s.nat_status,
        r.hole_punches_succeeded,
        r.hole_punches_failed,
        s.routing_table_size,
        s.mailbox_replicas_held,
        list(&s.listen_addrs),
        list(&s.external_addrs),
        list(&s.relay_reservations),
        s.connected.len(),
        list(&connected),
    )
}

/// A recovery phrase as six numbered rows of four words.
pub(crate) fn phrase_grid(phrase: &str) -> String {
    let words: Vec<&str> = phrase.split_whitespace().collect();
    words
        .chunks(4)
        .enumerate()
        .map(|(row, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, w)| format!("{:>4}. {:<10}", row * 4 + i + 1, w))
                .collect::<String>()
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_civil_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_time(1_700_000_000_123), "2023-11-14 22:13:20");
    }

    #[test]
    fn phrase_grid_numbers_every_word() {
        let phrase = (1..=24)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        let grid = phrase_grid(&phrase);
        assert_eq!(grid.lines().count(), 6);
        assert!(grid.contains("24. w24"));
        assert!(grid.starts_with("   1. w1"));
    }
}
