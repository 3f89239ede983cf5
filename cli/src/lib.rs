//! `ckpt-job`'s library: configuration, the single-node supervisor (the
//! coordinator and node agent of one job in one process), the control
//! socket, and the read-only commands. `main.rs` only parses arguments.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod commands;
pub mod config;
pub mod control;
pub mod rsh;
pub mod submit;
pub mod supervisor;
