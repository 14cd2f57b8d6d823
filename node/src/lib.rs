#![doc = include_str!("../README.md")]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod batcher;
mod behaviour;
pub mod config;
pub mod control;
pub mod dht;
pub mod direct;
pub mod error;
mod event_loop;
pub mod groups;
mod keep_alive;
pub mod mailbox;
mod messaging;
mod node;
mod pair_keys;
pub mod storage;

pub use behaviour::{IDENTIFY_PROTOCOL, KAD_PROTOCOL};
pub use config::{Limits, NodeConfig};
pub use error::{ErrorKind, NodeError};
pub use messaging::{CollectReport, PublishReport};
pub use node::{
    ConnectedPeer, Node, NodeEvent, NodeHandle, NodeStatus, RelayServerStatus, SendOutcome,
    SendReport,
};
