#!/usr/bin/env bash
# Benchmark (issue 5, Slurm): a 2-node job submitted with `ckpt-job submit`
# (real Slurm, coordinator and agents on network-namespace nodes, MIB MiB of
# touched memory per node): time from `scancel --signal=USR1 --batch` to the
# job requeued, and from the requeued job's start to the application running
# again, vs raw `criu dump` and `criu restore` of the same trees, same run.
#
#   sudo scripts/bench-slurm.sh              # MIB=1024 ROUNDS=3
#   MIB=256 ROUNDS=2 BENCH_DIR=/path sudo -E scripts/bench-slurm.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ "$(id -u)" = 0 ] || { echo "bench: must run as root" >&2; exit 1; }
cargo build --release --workspace --bins -q
CKPT_BIN_DIR="$PWD/target/release" exec target/release/ckpt-bench-slurm "${MIB:-1024}" "${ROUNDS:-3}"
