//! CRIU RPC client.
