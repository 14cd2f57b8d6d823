//! One function per command. Each returns the process exit code, or a [`Failure`] (one sentence
//! and an exit code). See `docs/architecture.md`, section "CLI".

use std::{
    io::{BufRead, IsTerminal, Read},
    path::PathBuf,
};

use meshchat_node::{
    control::{ControlRequest, ControlResponse, SendOutcome},
    Node,
};
use meshchat_protocol::Identity;
use serde_json::json;

use crate::{
    args::{Cli, Command, ContactCommand, NodeArgs},
    config::{self, Settings},
    conn::{self, Conn},
    exit::{self, Failure},
    generate,
    output::{self, Out},
    progress::Progress,
};

/// Everything a command needs besides its own arguments.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) home: PathBuf,
    pub(crate) out: Out,
    pub(crate) quiet: bool,
    /// `meshchat.toml`, the environment and the flags, merged.
    pub(crate) settings: Settings,
}

impl Ctx {
    /// Whether to tell the person on stderr what a wait is for: not with `-q`, not with `--json`.
    pub(crate) fn progress(&self) -> bool {
        !self.quiet && !self.out.json
    }
}

/// Resolve `--home` / `MESHCHAT_HOME` / `~/.meshchat`.
pub(crate) fn home_dir(cli: &Cli) -> Result<PathBuf, Failure> {
    if let Some(h) = &cli.home {
        return Ok(h.clone());
    }
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => Ok(PathBuf::from(h).join(".meshchat")),
        _ => Err(Failure::usage(
            "no home directory: pass --home DIR or set MESHCHAT_HOME",
        )),
    }
}

pub(crate) async fn run(cli: Cli) -> Result<u8, Failure> {
    // Commands that need no home.
    match &cli.command {
        Command::Completions { shell } => return generate::completions(*shell),
        Command::Man => return generate::man(),
        Command::Demo => return crate::demo::demo(Out { json: cli.json }).await,
        _ => {}
    }
    let home = home_dir(&cli)?;
    let flags = match &cli.command {
        Command::Run(a) | Command::Config(a) => a.clone(),
        Command::Serve(a) => a.node.clone(),
        _ => NodeArgs::default(),
    };
    let settings = Settings::load(&home, &flags, cli.log_level.as_deref())?;
    // Log lines would tear the chat's screen apart.
    let quiet = cli.quiet || matches!(cli.command, Command::Chat { .. });
    crate::init_tracing(quiet, cli.verbose, &settings.log_level);
    let ctx = Ctx {
        home,
        out: Out { json: cli.json },
        quiet: cli.quiet,
        settings,
    };
    match cli.command {
        Command::Init { restore } => init(&ctx, restore).await,
        Command::Id { qr } => id(&ctx, qr).await,
        Command::Run(args) => run_node(&ctx, args).await,
        Command::Serve(args) => crate::serve::serve(&ctx, args).await,
        Command::Config(_) => {
            ctx.out.emit(ctx.settings.to_text(), ctx.settings.to_json());
            Ok(exit::OK)
        }
        Command::Status => status(&ctx).await,
        Command::Contact(c) => contact(&ctx, c).await,
        Command::Send { to, text } => send(&ctx, to, text).await,
        Command::Inbox { wait, follow } => inbox(&ctx, wait, follow).await,
        Command::Chat { to } => crate::chat::chat(&ctx, to).await,
        Command::Group(g) => crate::group::group(&ctx, g).await,
        Command::Completions { .. } | Command::Man | Command::Demo => Ok(exit::OK),
    }
}

const PHRASE_WARNING: &str = "Write these 24 words down, in order, and keep them somewhere safe \
and secret. They are the only way to restore this identity on another machine, and anyone who \
has them can read your messages and write as you.";

/// Longest recovery phrase input read from stdin.
const MAX_PHRASE_INPUT: u64 = 4096;

fn read_phrase() -> Result<String, Failure> {
    let stdin = std::io::stdin();
    let mut text = String::new();
    if stdin.is_terminal() {
        eprintln!("Type your 24-word recovery phrase and press Enter:");
        stdin
            .lock()
            .take(MAX_PHRASE_INPUT)
            .read_line(&mut text)
            .map_err(|e| Failure::usage(format!("cannot read the recovery phrase: {e}")))?;
    } else {
        stdin
            .lock()
            .take(MAX_PHRASE_INPUT)
            .read_to_string(&mut text)
            .map_err(|e| Failure::usage(format!("cannot read the recovery phrase: {e}")))?;
    }
    Ok(text)
}

async fn init(ctx: &Ctx, restore: bool) -> Result<u8, Failure> {
    // Refuse before asking for a phrase; create nothing until the identity is ready.
    if ctx.home.join("db").exists() {
        let storage = conn::open_storage(&ctx.home).await?;
        if let Ok(existing) = storage.load_identity() {
            return Err(Failure::new(
                exit::GENERIC,
                "already_exists",
                format!(
                    "{} already holds an identity ({}); refusing to overwrite it (use another --home)",
                    ctx.home.display(),
                    existing.user_id()
                ),
            ));
        }
    }
    let identity = if restore {
        let phrase = read_phrase()?;
        Identity::from_recovery_phrase(&phrase).map_err(|e| Failure::usage(e.to_string()))?
    } else {
        Identity::generate(&mut rand::rngs::OsRng)
    };
    // Saving refuses, too, if another `init` raced us.
    let storage = conn::open_storage(&ctx.home).await?;
    let (peer_id, identity) = tokio::task::spawn_blocking(move || {
        storage.save_identity(&identity)?;
        let peer_id = storage.node_keypair()?.public().to_peer_id();
        Ok::<_, meshchat_node::storage::StorageError>((peer_id, identity))
    })
    .await
    .map_err(|e| Failure::new(exit::GENERIC, "internal", e.to_string()))??;
    // A commented configuration file with every key, for the person to discover and edit.
    if let Err(e) = config::write_template(&ctx.home) {
        tracing::warn!(
            "cannot write {}: {e}",
            ctx.home.join(config::FILE_NAME).display()
        );
    }
    let user_id = identity.user_id().to_string();
    if ctx.out.json {
        let phrase = (!restore).then(|| identity.recovery_phrase().to_string());
        ctx.out.emit(
            "",
            json!({
                "home": ctx.home.display().to_string(),
                "user_id": user_id,
                "peer_id": peer_id.to_string(),
                "restored": restore,
                "recovery_phrase": phrase,
            }),
        );
    } else if restore {
        println!("Identity restored in {}.", ctx.home.display());
        println!("Your user ID: {user_id}");
    } else {
        let phrase = identity.recovery_phrase();
        println!("New identity created in {}.", ctx.home.display());
        println!("Your user ID: {user_id}");
        println!("(share it with the people who should be able to write to you)");
        println!();
        println!("Recovery phrase:");
        println!();
        println!("{}", output::phrase_grid(&phrase));
        println!();
        println!("{PHRASE_WARNING}");
    }
    Ok(exit::OK)
}

async fn id(ctx: &Ctx, qr: bool) -> Result<u8, Failure> {
    let mut conn = Conn::for_storage(&ctx.home).await?;
    let r = conn.request(ControlRequest::Id, |_| Ok(())).await;
    conn.close().await;
    match r? {
        ControlResponse::Id(v) => {
            if qr && !ctx.out.json {
                let stdout = std::io::stdout();
                let ansi = stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none();
                let code = crate::qr::render(&v.user_id, ansi)
                    .map_err(|e| Failure::new(exit::GENERIC, "internal", e.to_string()))?;
                print!("{code}");
            }
            ctx.out.emit(
                &v.user_id,
                json!({ "user_id": v.user_id, "peer_id": v.peer_id }),
            );
            Ok(exit::OK)
        }
        other => Err(unexpected(&other)),
    }
}

fn unexpected(r: &ControlResponse) -> Failure {
    Failure::new(
        exit::GENERIC,
        "internal",
        format!("unexpected answer from the node: {r:?}"),
    )
}

pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn run_node(ctx: &Ctx, args: NodeArgs) -> Result<u8, Failure> {
    conn::require_initialised(&ctx.home)?;
    if conn::running(&ctx.home).await?.is_some() {
        let pid = std::fs::read_to_string(ctx.home.join("meshchat.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default();
        return Err(Failure::new(
            exit::HOME_IN_USE,
            "home_in_use",
            format!(
                "a meshchat node is already running on {}{pid}; commands with this --home use it, \
                 or stop it before starting another",
                ctx.home.display()
            ),
        ));
    }
    let mut config = ctx.settings.node_config(&ctx.home);
    config.serve_control = true;
    let p = Progress::start(ctx.progress(), "Starting the node…");
    let handle = Node::start(config).await?;
    p.finish(None);
    // Bootstrap addresses given on the command line are remembered in meshchat.toml.
    if let Err(e) = config::remember_bootstrap(&ctx.settings.file, &args.bootstrap) {
        tracing::warn!("cannot remember the bootstrap addresses: {e}");
    }
    let status = handle.status().await?;
    if ctx.out.json {
        ctx.out.emit(
            "",
            json!({
                "event": "listening",
                "user_id": status.user_id,
                "peer_id": status.peer_id,
                "listen_addrs": status.listen_addrs,
            }),
        );
    } else {
        println!(
            "meshchat node running on {} (Ctrl-C to stop)",
            ctx.home.display()
        );
        println!("user ID: {}", status.user_id);
        println!("peer ID: {}", status.peer_id);
        println!("dialable at (paste after --bootstrap):");
        for a in &status.listen_addrs {
            println!("  {a}");
        }
    }
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = handle.stopped() => {}
    }
    if ctx.progress() && !ctx.out.json {
        eprintln!("Shutting down…");
    }
    handle.shutdown().await;
    ctx.out.emit("Stopped.", json!({ "event": "stopped" }));
    Ok(exit::OK)
}

async fn status(ctx: &Ctx) -> Result<u8, Failure> {
    let mut conn = Conn::for_network(&ctx.home, &ctx.settings, ctx.progress()).await?;
    let r = conn.request(ControlRequest::Status, |_| Ok(())).await;
    conn.close().await;
    match r? {
        ControlResponse::Status(s) => {
            ctx.out
                .emit(output::status_text(&s), output::status_json(&s));
            Ok(exit::OK)
        }
        other => Err(unexpected(&other)),
    }
}

fn confirm(question: &str) -> bool {
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    let _ = std::io::stdin().lock().take(256).read_line(&mut answer);
    matches!(answer.trim().to_lowercase().as_str(), "y" | "yes")
}

async fn contact(ctx: &Ctx, command: ContactCommand) -> Result<u8, Failure> {
    let mut conn = Conn::for_storage(&ctx.home).await?;
    let result = contact_with(ctx, &mut conn, command).await;
    conn.close().await;
    result
}

async fn contact_with(ctx: &Ctx, conn: &mut Conn, command: ContactCommand) -> Result<u8, Failure> {
    match command {
        ContactCommand::Add { name, user_id } => {
            match conn
                .request(ControlRequest::ContactAdd { name, user_id }, |_| Ok(()))
                .await?
            {
                ControlResponse::Contact(c) => {
                    ctx.out.emit(
                        format!("Added {} ({}).", c.name, c.user_id),
                        output::contact_json(&c),
                    );
                    Ok(exit::OK)
                }
                other => Err(unexpected(&other)),
            }
        }
        ContactCommand::List => {
            let mut n = 0usize;
            let out = ctx.out;
            conn.request(ControlRequest::ContactList, |r| {
                if let ControlResponse::Contact(c) = r {
                    out.emit(output::contact_line(&c), output::contact_json(&c));
                    n += 1;
                }
                Ok(())
            })
            .await?;
            if n == 0 && !ctx.out.json {
                eprintln!("No contacts yet; add one with `meshchat contact add NAME USER_ID`.");
            }
            Ok(exit::OK)
        }
        ContactCommand::Remove { name } => {
            match conn
                .request(ControlRequest::ContactRemove { name }, |_| Ok(()))
                .await?
            {
                ControlResponse::Contact(c) => {
                    let mut j = output::contact_json(&c);
                    j["removed"] = json!(true);
                    ctx.out
                        .emit(format!("Removed {} ({}).", c.name, c.user_id), j);
                    Ok(exit::OK)
                }
                other => Err(unexpected(&other)),
            }
        }
        ContactCommand::Verify { name, yes } => {
            let ControlResponse::Verify(v) = conn
                .request(
                    ControlRequest::ContactVerify {
                        name: name.clone(),
                        confirm: yes,
                    },
                    |_| Ok(()),
                )
                .await?
            else {
                return Err(Failure::new(exit::GENERIC, "internal", "unexpected answer"));
            };
            let json = ctx.out.json;
            // With --json, stdout carries only the JSON object; what the person must read while
            // answering the question goes to stderr.
            let say = |line: String| {
                if json {
                    eprintln!("{line}");
                } else {
                    println!("{line}");
                }
            };
            let ask = !yes && !v.contact.verified && (!json || std::io::stdin().is_terminal());
            if json && !ask {
                ctx.out.emit("", output::verify_json(&v));
                return Ok(exit::OK);
            }
            say(format!(
                "Safety number with {} ({}):\n\n  {}\n",
                v.contact.name, v.contact.user_id, v.safety_number
            ));
            if yes {
                say(format!("{} is marked as verified.", v.contact.name));
                return Ok(exit::OK);
            }
            if v.contact.verified {
                say(format!("{} is already marked as verified.", v.contact.name));
                return Ok(exit::OK);
            }
            say(format!(
                "Compare it with {} in person or over a call you trust; it must be identical on \
                 both sides.",
                v.contact.name
            ));
            if !confirm("Do the numbers match?") {
                if json {
                    ctx.out.emit("", output::verify_json(&v));
                } else {
                    say("Not marked as verified.".to_owned());
                }
                return Ok(exit::OK);
            }
            match conn
                .request(
                    ControlRequest::ContactVerify {
                        name,
                        confirm: true,
                    },
                    |_| Ok(()),
                )
                .await?
            {
                ControlResponse::Verify(v) => {
                    ctx.out.emit(
                        format!("{} is marked as verified.", v.contact.name),
                        output::verify_json(&v),
                    );
                    Ok(exit::OK)
                }
                other => Err(unexpected(&other)),
            }
        }
    }
}

async fn send(ctx: &Ctx, to: String, text: String) -> Result<u8, Failure> {
    // Check the addressee and the text before starting a node for them.
    meshchat_node::control::validate(&ControlRequest::Send {
        to: to.clone(),
        text: text.clone(),
    })
    .map_err(|e| Failure::from_control_kind(e.kind, e.message))?;
    conn::check_recipient(&ctx.home, &to).await?;
    let mut conn = Conn::for_network(&ctx.home, &ctx.settings, ctx.progress()).await?;
    let p = Progress::start(
        ctx.progress(),
        format!("Sending to {to} (finding their node, or their mailbox)…"),
    );
    let r = conn
        .request(ControlRequest::Send { to, text }, |_| Ok(()))
        .await;
    p.finish(None);
    conn.close().await;
    match r? {
        ControlResponse::Sent(s) => {
            ctx.out.emit(output::send_line(&s), output::send_json(&s));
            Ok(match s.outcome {
                SendOutcome::Delivered | SendOutcome::Stored { .. } => exit::OK,
                SendOutcome::Queued { .. } => exit::UNAVAILABLE,
            })
        }
        other => Err(unexpected(&other)),
    }
}

async fn inbox(ctx: &Ctx, wait: Option<u32>, follow: bool) -> Result<u8, Failure> {
    let waiting = follow || wait.is_some();
    let mut conn = if waiting {
        Conn::for_mail(&ctx.home, &ctx.settings, ctx.progress()).await?
    } else {
        Conn::for_storage(&ctx.home).await?
    };
    let out = ctx.out;
    let mut shown = 0usize;
    // A plain line, not a spinner: messages are printed on stdout meanwhile.
    if ctx.progress() {
        if follow {
            eprintln!("Waiting for new messages (Ctrl-C to stop)…");
        } else if let Some(secs) = wait {
            eprintln!(
                "Listing messages; if there is nothing unread, waiting up to {secs} s for one…"
            );
        }
    }
    let request = ControlRequest::Inbox {
        after_index: None,
        wait_secs: wait,
        follow,
    };
    let listing = conn.request(request, |r| {
        if let ControlResponse::Message(m) = r {
            out.emit(output::message_line(&m), output::message_json(&m));
            shown += 1;
        }
        if output::stdout_closed() {
            // Stop listing (or following); mapped to a quiet exit 0 below.
            return Err(Failure::new(exit::OK, "stdout_closed", "stdout closed"));
        }
        Ok(())
    });
    // A wait can be interrupted; a node this command started is then shut down cleanly.
    let result = tokio::select! {
        r = listing => Some(r),
        _ = shutdown_signal(), if waiting => None,
    };
    conn.close().await;
    match result {
        None => Ok(exit::OK),
        Some(Err(_)) if output::stdout_closed() => Ok(exit::OK),
        Some(r) => {
            r?;
            if shown == 0 && !ctx.out.json && !waiting {
                eprintln!("No messages.");
            }
            Ok(exit::OK)
        }
    }
}
