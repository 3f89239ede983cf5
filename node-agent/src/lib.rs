//! The node agent: everything ckpt does on one node.
//!
//! - [`criu`]: our own client of CRIU's RPC (`criu swrk`).
//! - [`tree`]: starting a job tree in its own PID/IPC/network namespaces.
//! - [`freezer`]: freezing a tree with the cgroup freezer.
//! - [`capture`]: node-local state a tree needs at restore (shm, MPI session
//!   dirs, sizes of files it writes).
//! - [`images`]: packing CRIU's many small image files into one file.
//! - [`config`]: `agent.toml`, the `ckpt-agent` daemon's config.
//! - [`daemon`]: the agent daemon: coordinator session, local trees, the
//!   epoch protocol.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod capture;
pub mod checkpoint;
pub mod config;
pub mod criu;
pub mod daemon;
pub mod forker;
pub mod freezer;
pub mod images;
pub mod jobnet;
pub mod restore;
pub mod shim;
pub mod tree;
