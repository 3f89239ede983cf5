//! Wire messages, framing and the on-disk manifest shared by every ckpt
//! component.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod async_framing;
pub mod auth;
pub mod cluster;
pub mod config_file;
pub mod framing;
pub mod jobnet;
pub mod local_control;
pub mod manifest;
pub mod report;

/// ckpt's own control messages (`proto/ckpt.proto`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/ckpt.v1.rs"));
}

/// The subset of CRIU's RPC schema that ckpt speaks (`proto/criu_rpc.proto`).
#[allow(missing_debug_implementations, clippy::all)]
pub mod criu_pb {
    include!(concat!(env!("OUT_DIR"), "/criu.rs"));
}
