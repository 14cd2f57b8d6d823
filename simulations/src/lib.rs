#![doc = include_str!("../README.md")]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cluster;
pub mod group_bench;
pub mod journal;
pub mod output;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod sys;

pub use cluster::{Cluster, ClusterConfig, Transport};
pub use scenario::{run, Kind, Outcome, Params, SimError};
