#!/usr/bin/env bash
# The main demo: a job with a TCP connection (data in flight both ways) is
# checkpointed mid-run, stopped, inspected, verified, restarted, and its
# output compared with an uninterrupted run. Run as root after bootstrap.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ "$(id -u)" = 0 ] || { echo "demo: run as root (CRIU needs it)" >&2; exit 1; }

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say "building ckpt (release) and the example workloads"
cargo build --release --workspace --bins -q
make -s -C examples OUT="$PWD/target/release/examples" matrix
BIN=$PWD/target/release
PROG=$BIN/examples/tcp_loopback
DIR=$(mktemp -d /var/tmp/ckpt-demo.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
cat >"$DIR/ckpt.toml" <<CFG
ckpt_dir = "$DIR/images"
key_file = "$DIR/cluster.key"
run_dir = "$DIR/run"
staging_dir = "$DIR/staging"
CFG
ck() { "$BIN/ckpt-job" --config "$DIR/ckpt.toml" "$@"; }
mkdir -p "$DIR/ref" "$DIR/work"

say "reference: an uninterrupted run of $(basename "$PROG") (40 steps)"
"$PROG" "$DIR/ref" 40 >"$DIR/reference.out"
tail -1 "$DIR/reference.out"

say "ckpt-job run --name demo -- $(basename "$PROG") ..."
"$BIN/ckpt-job" --config "$DIR/ckpt.toml" run --name demo -- "$PROG" "$DIR/work" 40 >"$DIR/part1.out" &
RUN=$!
until grep -q '^step 15 ' "$DIR/part1.out" 2>/dev/null; do sleep 0.05; done
ck list

say "ckpt-job checkpoint --stop demo   (mid-run, with TCP data in flight)"
ck checkpoint --stop demo
set +e; wait "$RUN"; code=$?; set -e
echo "ckpt-job run exited with $code (75 = stopped after a checkpoint; restartable)"

say "ckpt-job inspect demo / verify demo"
ck inspect demo
ck verify demo

say "ckpt-job restart demo"
ck restart demo >"$DIR/part2.out"
tail -1 "$DIR/part2.out"

say "before-checkpoint output + after-restart output vs the uninterrupted run"
if cat "$DIR/part1.out" "$DIR/part2.out" | cmp -s - "$DIR/reference.out"; then
  echo "identical ($(wc -l <"$DIR/reference.out") lines): the job continued exactly where it stopped"
else
  echo "DIFFERENT output:" >&2
  diff <(cat "$DIR/part1.out" "$DIR/part2.out") "$DIR/reference.out" >&2 || true
  exit 1
fi
