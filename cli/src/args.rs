//! The command-line contract (`docs/architecture.md`, section "CLI"; the specification's
//! "command-line contract"), as clap derive definitions.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};
use libp2p::Multiaddr;

/// meshchat: an end-to-end encrypted peer-to-peer messenger with no centre.
#[derive(Debug, Parser)]
#[command(name = "meshchat", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Where this identity lives (default: ~/.meshchat).
    #[arg(long, global = true, env = "MESHCHAT_HOME", value_name = "DIR")]
    pub(crate) home: Option<PathBuf>,
    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// More log output on stderr (-v, -vv, -vvv); RUST_LOG overrides.
    #[arg(short, long, global = true, action = ArgAction::Count, conflicts_with = "quiet")]
    pub(crate) verbose: u8,
    /// No log output at all.
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,
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
    Id,
    /// Run the node in the foreground; other commands with the same --home talk to it.
    Run(RunArgs),
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
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Listen on this address (repeatable; default: all interfaces, random TCP and QUIC ports).
    #[arg(long, value_name = "MULTIADDR", value_parser = parse_multiaddr)]
    pub(crate) listen: Vec<Multiaddr>,
    /// Connect to this peer first (repeatable; a full multiaddr ending in /p2p/PEER_ID). Remembered.
    #[arg(long, value_name = "MULTIADDR", value_parser = parse_multiaddr)]
    pub(crate) bootstrap: Vec<Multiaddr>,
    /// Local network only: find peers by mDNS, no bootstrap needed.
    #[arg(long)]
    pub(crate) lan_only: bool,
    /// Answer DHT queries and store records for others from the start, without waiting for a
    /// confirmed public address (a node others bootstrap from on a private network or loopback).
    #[arg(long, env = "MESHCHAT_DHT_SERVER")]
    pub(crate) dht_server: bool,
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
