#!/usr/bin/env bash
# Runs every test: unit tests, and the end-to-end suite (real CRIU, real
# processes, real MPI; needs root and scripts/bootstrap.sh). Under CI=true a
# missing prerequisite fails the run instead of skipping.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The end-to-end tests drive the real binaries (ckpt-job, ckpt-init).
cargo build --workspace --bins
# End-to-end tests checkpoint real process trees; two at a time fits the
# two-core machines this runs on.
exec cargo test --workspace -- --test-threads="${CKPT_TEST_THREADS:-2}" "$@"
