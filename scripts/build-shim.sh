#!/bin/sh
# Build the MPI drain shim once per MPI ABI (Open MPI and MPICH differ:
# MPI_Comm is a pointer in one and an int in the other).
#   scripts/build-shim.sh [--debug] [openmpi|mpich ...]    (default: both)
# Produces target/shim/libckpt_mpi_shim_<mpi>.so (--debug: target/shim/debug/)
# from separate cargo target dirs target/shim-<mpi>, so the two builds never
# share artifacts. An MPI that is
# not installed is an error when named, skipped with a note when defaulted.
set -eu
cd "$(dirname "$0")/.."
profile=release
flag=--release
out=target/shim
if [ "${1:-}" = "--debug" ]; then profile=debug; flag=; out=target/shim/debug; shift; fi
explicit=1
if [ $# -eq 0 ]; then set -- openmpi mpich; explicit=0; fi
mkdir -p "$out"
for mpi in "$@"; do
    case "$mpi" in
        openmpi) cc=mpicc.openmpi ;;
        mpich) cc=mpicc.mpich ;;
        *) echo "build-shim.sh: unknown MPI '$mpi' (openmpi or mpich)" >&2; exit 2 ;;
    esac
    if ! command -v "${MPICC:-$cc}" >/dev/null 2>&1; then
        if [ $explicit -eq 1 ]; then
            echo "build-shim.sh: $mpi requested but ${MPICC:-$cc} is not installed" >&2; exit 1
        fi
        echo "build-shim.sh: ${MPICC:-$cc} not found, skipping $mpi" >&2
        continue
    fi
    # shellcheck disable=SC2086
    cargo build -q $flag -p ckpt-mpi-shim --features "$mpi" --target-dir "target/shim-$mpi"
    # A private temp name: concurrent builds (parallel tests) must not meet.
    cp "target/shim-$mpi/$profile/libckpt_mpi_shim.so" "$out/libckpt_mpi_shim_$mpi.so.tmp.$$"
    mv -f "$out/libckpt_mpi_shim_$mpi.so.tmp.$$" "$out/libckpt_mpi_shim_$mpi.so"
    echo "$out/libckpt_mpi_shim_$mpi.so"
done
