//! The coordinator: the epoch state machine and the image store.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod store;
