#!/usr/bin/env bash
# Benchmark (issue: multi-node coordinated checkpoint): application downtime
# of a coordinated checkpoint of a 2-node job (real coordinator and agents on
# network-namespace nodes, MIB MiB of touched memory per node) vs the
# slowest raw `criu dump` of the same trees, same run. Run on an idle machine.
#
#   sudo scripts/bench-cluster.sh              # MIB=1024 ROUNDS=5
#   MIB=256 ROUNDS=3 BENCH_DIR=/path sudo -E scripts/bench-cluster.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ "$(id -u)" = 0 ] || { echo "bench: must run as root" >&2; exit 1; }
cargo build --release --workspace --bins -q
CKPT_BIN_DIR="$PWD/target/release" exec target/release/ckpt-bench-cluster "${MIB:-1024}" "${ROUNDS:-5}"
