//! ckpt MPI drain shim: a PMPI interposer preloaded into every rank.
//!
//! The MPI-free parts (request table, matching-order stash, count
//! bookkeeping, control-socket protocol) are always compiled and unit-tested;
//! the interposer itself (`shim`, `drain`) only with feature `openmpi` or
//! `mpich`, which select the MPI ABI (see README.md and scripts/build-shim.sh).

pub mod ledger;
pub mod reqtable;
pub mod stash;
pub mod wire;

#[cfg(all(feature = "openmpi", feature = "mpich"))]
compile_error!("features `openmpi` and `mpich` are exclusive");

#[cfg(any(feature = "openmpi", feature = "mpich"))]
mod drain;
#[cfg(any(feature = "openmpi", feature = "mpich"))]
mod ffi;
#[cfg(any(feature = "openmpi", feature = "mpich"))]
mod shim;
