//! The coordinator: the epoch state machine, the image store, and the
//! network core that drives epochs over agent connections ([`daemon`]),
//! configured by `coordinator.toml` ([`config`]).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod commit;
pub mod config;
pub mod daemon;
pub mod digest;
pub mod epoch;
pub mod launch;
pub mod store;
