//! The command-line contract (`docs/architecture.md`, section "CLI"; the specification's
//! "command-line contract"), as clap derive definitions.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};
use libp2p::Multiaddr;

/// meshchat: an end-to-end encrypted peer-to-peer messenger with no centre.
#[derive(Debug, Parser)]
#[command(
    name = "meshchat",
    version,
    about,
    long_about = "meshchat: an end-to-end encrypted peer-to-peer messenger with no centre. Every \
                  participant runs a libp2p node; messages go straight to the recipient's node \
                  when it is reachable and wait in mailboxes on other nodes when it is not. \
                  Start with `meshchat init`, then `meshchat run`; every other command uses the \
                  node running on its --home, or starts one for itself. The configuration file \
                  is HOME/meshchat.toml (see `meshchat config`).",
    propagate_version = true
)]
pub(crate) struct Cli {
    /// Where this identity lives (default: ~/.meshchat).
    #[arg(long, global = true, env = "MESHCHAT_HOME", value_name = "DIR")]
    pub(crate) home: Option<PathBuf>,
    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// More log output on stderr (-v, -vv, -vvv); --log-level overrides.
    #[arg(short, long, global = true, action = ArgAction::Count, conflicts_with = "quiet")]
    pub(crate) verbose: u8,
    /// No log output and no progress lines at all.
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,
    /// Log filter for stderr, e.g. `info` or `warn,meshchat_node=debug` (overrides -v). Env
    /// MESHCHAT_LOG or RUST_LOG; file `log_level`.
    #[arg(long, global = true, value_name = "FILTER")]
    pub(crate) log_level: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create a new identity (prints the user ID and the recovery phrase).
    Init {
        /// Restore an identity from its 24-word recovery phrase, read from stdin.
        #[arg(long)]
        restore: bool,
    },
    /// Print this home's user ID.
    Id {
        /// Also draw it as a QR code in the terminal (scan it to add this user as a contact).
        #[arg(long)]
        qr: bool,
    },
    /// Run the node in the foreground; other commands with the same --home talk to it.
    Run(NodeArgs),
    /// Run as a home server: always-on DHT server, relay for friends behind NATs, mailbox
    /// replica. Prints the addresses friends should bootstrap from.
    Serve(ServeArgs),
    /// Show the configuration a node on this home runs with, and where each value comes from.
    Config(NodeArgs),
    /// Peer ID, addresses, NAT status, connected peers, routing table.
    Status,
    /// Manage contacts.
    #[command(subcommand)]
    Contact(ContactCommand),
    /// Send a message; returns once it is delivered or stored on replicas, and says which.
    Send {
        /// A contact name or a user ID.
        to: String,
        /// The text.
        text: String,
    },
    /// Print received messages (from, time, text), oldest first.
    Inbox {
        /// If there is nothing unread, wait up to SECS seconds for a new message.
        #[arg(long, value_name = "SECS", conflicts_with = "follow")]
        wait: Option<u32>,
        /// Keep printing new messages as they arrive (Ctrl-C to stop).
        #[arg(long)]
        follow: bool,
    },
    /// An interactive conversation in the terminal (Enter sends, Esc quits); without TO, the
    /// list of conversations to choose from.
    Chat {
        /// A contact name or a user ID (none: the list of conversations).
        to: Option<String>,
    },
    /// Print a shell completion script (e.g. `meshchat completions bash > ~/.local/share/bash-completion/completions/meshchat`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `meshchat man | man -l -`.
    Man,
    /// Group channels: create, invite, join, send, members, leave, remove, list, invites.
    #[command(subcommand)]
    Group(GroupCommand),
    /// The local demonstration: a home server and four users on this machine (real nodes on
    /// loopback, temporary homes), a 1:1 conversation, mail to an offline user collected later,
    /// a group conversation, each step timed.
    Demo,
}

/// The node's settings: each also an environment variable and a key of `HOME/meshchat.toml`
/// (flags > environment > file > defaults; see `crate::config`).
#[derive(Debug, Args, Default, Clone)]
pub(crate) struct NodeArgs {
    /// Listen on this address (repeatable; default: all interfaces, random TCP and QUIC ports).
    /// Env MESHCHAT_LISTEN (comma-separated); file `listen`.
    #[arg(long, value_name = "MULTIADDR", value_parser = parse_multiaddr)]
    pub(crate) listen: Vec<Multiaddr>,
    /// Connect to this peer first (repeatable; a full multiaddr ending in /p2p/PEER_ID); remembered
    /// in meshchat.toml. Env MESHCHAT_BOOTSTRAP (comma-separated); file `bootstrap`.
    #[arg(long, value_name = "MULTIADDR", value_parser = parse_multiaddr)]
    pub(crate) bootstrap: Vec<Multiaddr>,
    /// Local network only: find peers by mDNS, no bootstrap needed. Env MESHCHAT_LAN_ONLY; file
    /// `lan_only`. A node with no bootstrap peers runs LAN-only anyway while mDNS is on.
    #[arg(long)]
    pub(crate) lan_only: bool,
    /// Do not look for peers on the local network by mDNS (on by default when listening beyond
    /// loopback). Env MESHCHAT_MDNS=false; file `mdns = false`.
    #[arg(long)]
    pub(crate) no_mdns: bool,
    /// This node's public address, when it cannot learn it itself (e.g. a home server behind
    /// port forwarding: /ip4/PUBLIC_IP/tcp/4001). Repeatable. Env MESHCHAT_EXTERNAL
    /// (comma-separated); file `external`.
    #[arg(long, value_name = "MULTIADDR", value_parser = parse_multiaddr)]
    pub(crate) external: Vec<Multiaddr>,
    /// Answer DHT queries and store records for others from the start, without waiting for a
    /// confirmed public address (a node others bootstrap from on a private network or loopback).
    /// Env MESHCHAT_DHT_SERVER; file `dht_server`.
    #[arg(long)]
    pub(crate) dht_server: bool,
    /// How long a send tries to reach the recipient before it reports the message as queued
    /// (1 to 240). Env MESHCHAT_SEND_TIMEOUT; file `send_timeout_secs`.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=240))]
    pub(crate) send_timeout: Option<u64>,
}

/// `meshchat serve`: the node's settings; a home server listens on port 4001 (TCP and QUIC)
/// on all interfaces unless told otherwise.
#[derive(Debug, Args, Default, Clone)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) node: NodeArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ContactCommand {
    /// Add a contact.
    Add {
        /// The name you will use for them.
        name: String,
        /// Their user ID (mc1…).
        user_id: String,
    },
    /// List contacts.
    List,
    /// Remove a contact (the conversation is kept).
    Remove {
        /// The contact's name.
        name: String,
    },
    /// Show the safety number with a contact and mark them verified once you compared it.
    Verify {
        /// The contact's name.
        name: String,
        /// Mark verified without asking (you compared the numbers already).
        #[arg(long)]
        yes: bool,
    },
}

fn parse_multiaddr(s: &str) -> Result<Multiaddr, String> {
    s.parse::<Multiaddr>().map_err(|e| {
        format!("not a multiaddr ({e}); it looks like /ip4/192.0.2.1/tcp/4001/p2p/12D3KooW…")
    })
}

#[derive(Debug, Subcommand)]
pub(crate) enum GroupCommand {
    /// Create a group; you are its first member and admin.
    Create {
        /// Its name (shown to members; 1 to 100 bytes).
        name: String,
    },
    /// Add a contact to a group and send them an invite over your 1:1 channel (admins only).
    Invite {
        /// The group: its name, its id, or the first 8+ hex digits of its id.
        group: String,
        /// A contact name or a user ID.
        contact: String,
    },
    /// Join a group you were invited to (`meshchat group invites` lists the codes).
    Join {
        /// The invite code (16 hex digits).
        invite: String,
    },
    /// Send a message to a group.
    Send {
        /// The group: its name, its id, or the first 8+ hex digits of its id.
        group: String,
        /// The text.
        text: String,
    },
    /// List a group's members and their roles.
    Members {
        /// The group.
        group: String,
    },
    /// Leave a group.
    Leave {
        /// The group.
        group: String,
    },
    /// Remove a member (admins only); everybody else switches to new keys.
    Remove {
        /// The group.
        group: String,
        /// A contact name or a user ID.
        contact: String,
    },
    /// List the groups you are in.
    List,
    /// List the invites you received and have not answered.
    Invites,
}
