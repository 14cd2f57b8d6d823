//! `meshchat group …`: group channels (create, invite, join, send, members, leave, remove, list,
//! invites). Each subcommand is one control request to the home's node — the running `meshchat
//! run`, or a node started for the command (groups need the network and the group state the
//! node keeps). See `docs/cli.md`, section "group".

use meshchat_node::{
    control::{ControlRequest, ControlResponse},
    groups::{GroupSendOutcome, GroupSendReport, GroupView, InviteView, MemberView},
};
use serde_json::json;

use crate::{
    args::GroupCommand,
    commands::Ctx,
    conn::{self, Conn},
    exit::{self, Failure},
    output::format_time,
    progress::Progress,
};

/// Run one `group` subcommand.
pub(crate) async fn group(ctx: &Ctx, command: GroupCommand) -> Result<u8, Failure> {
    let (request, waiting) = match command {
        GroupCommand::Create { name } => (
            ControlRequest::GroupCreate { name },
            "Creating the group…".to_owned(),
        ),
        GroupCommand::Invite { group, contact } => (
            ControlRequest::GroupInvite {
                group,
                contact: contact.clone(),
            },
            format!("Inviting {contact} (sending the invite over your 1:1 channel)…"),
        ),
        GroupCommand::Join { invite } => (
            ControlRequest::GroupJoin { code: invite },
            "Joining the group (subscribing, collecting what was sent)…".to_owned(),
        ),
        GroupCommand::Send { group, text } => (
            ControlRequest::GroupSend { group, text },
            "Sending to the group…".to_owned(),
        ),
        GroupCommand::Members { group } => (
            ControlRequest::GroupMembers { group },
            "Reading the member list…".to_owned(),
        ),
        GroupCommand::Leave { group } => (
            ControlRequest::GroupLeave { group },
            "Leaving the group (telling the other members)…".to_owned(),
        ),
        GroupCommand::Remove { group, contact } => (
            ControlRequest::GroupRemove { group, contact },
            "Removing the member (new keys for everybody else)…".to_owned(),
        ),
        GroupCommand::List => (ControlRequest::GroupList, "Listing groups…".to_owned()),
        GroupCommand::Invites => (ControlRequest::GroupInvites, "Listing invites…".to_owned()),
    };
    // Bad names, codes and texts are refused before a node is started for them.
    meshchat_node::control::validate(&request)
        .map_err(|e| Failure::from_control_kind(e.kind, e.message))?;
    conn::require_initialised(&ctx.home)?;
    let mut conn = Conn::for_network(&ctx.home, &ctx.settings, ctx.progress()).await?;
    let p = Progress::start(ctx.progress(), waiting);
    let out = ctx.out;
    let mut items = 0usize;
    let r = conn
        .request(request.clone(), |r| {
            match r {
                ControlResponse::Group(g) if matches!(request, ControlRequest::GroupList) => {
                    out.emit(group_line(&g), group_json(&g));
                    items += 1;
                }
                ControlResponse::Invite(i) if matches!(request, ControlRequest::GroupInvites) => {
                    out.emit(invite_line(&i), invite_json(&i));
                    items += 1;
                }
                ControlResponse::Member(m) => {
                    out.emit(member_line(&m), member_json(&m));
                    items += 1;
                }
                _ => {}
            }
            Ok(())
        })
        .await;
    p.finish(None);
    conn.close().await;
    let done = |what: &str| {
        out.emit(what.to_owned(), json!({"ok": true}));
        Ok(exit::OK)
    };
    match (request, r?) {
        (ControlRequest::GroupList | ControlRequest::GroupInvites, ControlResponse::End) => {
            if items == 0 && !out.json {
                out.emit("(none)", json!(null));
            }
            Ok(exit::OK)
        }
        (ControlRequest::GroupMembers { .. }, ControlResponse::End) => Ok(exit::OK),
        (ControlRequest::GroupCreate { .. }, ControlResponse::Group(g)) => {
            out.emit(
                format!(
                    "created group \"{}\" ({}); invite people with `meshchat group invite {} CONTACT`",
                    g.name,
                    short(&g.id),
                    quoted(&g.name)
                ),
                group_json(&g),
            );
            Ok(exit::OK)
        }
        (ControlRequest::GroupJoin { .. }, ControlResponse::Group(g)) => {
            out.emit(
                format!(
                    "joined group \"{}\" ({} members); send with `meshchat group send {} TEXT`",
                    g.name,
                    g.members,
                    quoted(&g.name)
                ),
                group_json(&g),
            );
            Ok(exit::OK)
        }
        (ControlRequest::GroupInvite { contact, .. }, ControlResponse::Invite(i)) => {
            out.emit(
                format!(
                    "invited {contact} to \"{}\"; they join with `meshchat group join {}`",
                    i.group_name, i.code
                ),
                invite_json(&i),
            );
            Ok(exit::OK)
        }
        (ControlRequest::GroupSend { .. }, ControlResponse::GroupSent(s)) => {
            out.emit(sent_line(&s), sent_json(&s));
            Ok(match s.outcome {
                GroupSendOutcome::Queued => exit::UNAVAILABLE,
                _ => exit::OK,
            })
        }
        (ControlRequest::GroupLeave { .. }, ControlResponse::Done) => {
            done("left the group; its messages stay in your inbox")
        }
        (ControlRequest::GroupRemove { .. }, ControlResponse::Done) => {
            done("removed; the other members switch to new keys, so they cannot read what follows")
        }
        (_, other) => Err(Failure::new(
            exit::GENERIC,
            "internal",
            format!("unexpected answer from the node: {other:?}"),
        )),
    }
}

fn short(id: &str) -> &str {
    id.get(..16).unwrap_or(id)
}

/// A group name as it can be pasted into a shell.
fn quoted(name: &str) -> String {
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        name.to_owned()
    } else {
        format!("'{}'", name.replace('\'', r"'\''"))
    }
}

fn group_line(g: &GroupView) -> String {
    format!(
        "{}  {}  {} member{}  {}",
        short(&g.id),
        g.name,
        g.members,
        if g.members == 1 { "" } else { "s" },
        g.role
    )
}

fn group_json(g: &GroupView) -> serde_json::Value {
    json!({
        "id": g.id,
        "name": g.name,
        "epoch": g.epoch,
        "members": g.members,
        "role": g.role,
        "topic": g.topic,
    })
}

fn invite_line(i: &InviteView) -> String {
    format!(
        "{}  \"{}\" from {} ({} members, {})  join: meshchat group join {}",
        i.code,
        i.group_name,
        i.from_name.as_deref().unwrap_or(&i.from),
        i.members,
        format_time(i.received_at_ms),
        i.code
    )
}

fn invite_json(i: &InviteView) -> serde_json::Value {
    json!({
        "code": i.code,
        "group_id": i.group_id,
        "group_name": i.group_name,
        "from": i.from,
        "from_name": i.from_name,
        "members": i.members,
        "received_at_ms": i.received_at_ms,
    })
}

fn member_line(m: &MemberView) -> String {
    let who = match (&m.name, m.is_me) {
        (_, true) => "you".to_owned(),
        (Some(n), false) => n.clone(),
        (None, false) => m.user_id.clone(),
    };
    format!("{who}  {}  {}", m.role, m.user_id)
}

fn member_json(m: &MemberView) -> serde_json::Value {
    json!({
        "user_id": m.user_id,
        "name": m.name,
        "role": m.role,
        "is_me": m.is_me,
    })
}

fn sent_line(s: &GroupSendReport) -> String {
    match s.outcome {
        GroupSendOutcome::Published => format!(
            "sent to the group ({} peer{} online; stored on {} mailbox replica{} for the others)",
            s.peers,
            if s.peers == 1 { "" } else { "s" },
            s.stored_replicas,
            if s.stored_replicas == 1 { "" } else { "s" }
        ),
        GroupSendOutcome::Stored => format!(
            "no member is online; stored on {} mailbox replica{}, members collect it when they \
             come back",
            s.stored_replicas,
            if s.stored_replicas == 1 { "" } else { "s" }
        ),
        GroupSendOutcome::Queued => "not sent yet: no member and no mailbox replica is reachable; \
                                     kept and sent when one is"
            .to_owned(),
    }
}

fn sent_json(s: &GroupSendReport) -> serde_json::Value {
    json!({
        "message_id": s.message_id,
        "outcome": match s.outcome {
            GroupSendOutcome::Published => "published",
            GroupSendOutcome::Stored => "stored",
            GroupSendOutcome::Queued => "queued",
        },
        "peers": s.peers,
        "stored_replicas": s.stored_replicas,
    })
}
