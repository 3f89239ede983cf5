//! The coordinator: the epoch state machine and the image store.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod commit;
pub mod digest;
pub mod epoch;
pub mod store;
