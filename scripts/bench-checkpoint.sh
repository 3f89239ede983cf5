#!/usr/bin/env bash
# Benchmark (issue: single-node foundation): for one process with MIB MiB of
# touched memory, `ckpt-job checkpoint` wall time vs a raw `criu dump` of the
# same process tree into the same directory, and `ckpt-job restart` (until
# the job runs again) vs a raw `criu restore`, measured in the same run,
# alternating the order every round. Prints medians and ratios.
#
#   sudo scripts/bench-checkpoint.sh            # MIB=1024 ROUNDS=5
#   MIB=256 ROUNDS=3 BENCH_DIR=/path sudo -E scripts/bench-checkpoint.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MIB=${MIB:-1024}
ROUNDS=${ROUNDS:-5}
DIR=${BENCH_DIR:-/var/tmp/ckpt-bench}
CRIU=${CRIU:-$(command -v criu)}
[ "$(id -u)" = 0 ] || { echo "bench: must run as root" >&2; exit 1; }

cargo build --release --workspace --bins -q
make -s -C examples OUT="$PWD/target/release/examples" matrix
J="$PWD/target/release/ckpt-job"
MEMHOG="$PWD/target/release/examples/memhog"

rm -rf "$DIR"; mkdir -p "$DIR"
cat >"$DIR/ckpt.toml" <<CFG
ckpt_dir = "$DIR/images"
key_file = "$DIR/cluster.key"
run_dir = "$DIR/run"
staging_dir = "$DIR/staging"
keep = 1
CFG
ck() { "$J" --config "$DIR/ckpt.toml" "$@"; }
# The same CRIU options ckpt uses, minus what only makes sense inside ckpt.
CRIU_DUMP=(dump --leave-running --tcp-established --file-locks --manage-cgroups=ignore --ghost-limit 256M -v4)
CRIU_RESTORE=(restore -d --tcp-established --file-locks --manage-cgroups=ignore -v4)

JOBPID=
cleanup() {
  [ -n "$JOBPID" ] && kill "$JOBPID" 2>/dev/null || true
  pkill -f "$MEMHOG" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${KEEP_BENCH_DIR:-}" ] || rm -rf "$DIR"
}
trap cleanup EXIT

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc; }
# Every measurement starts from the same state: dirty data written back and
# the page cache emptied (so restores read their images from disk, as after
# a node failure, and dumps never wait for reclaim of older images).
settle() { sync; echo 3 >/proc/sys/vm/drop_caches; sleep 0.2; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# One job, host network (a raw `criu restore` cannot recreate our external
# network namespace without extra plumbing; memory is what is measured).
"$J" --config "$DIR/ckpt.toml" run --net host --name bench -- "$MEMHOG" "$MIB" 36000 >"$DIR/job.out" 2>"$DIR/job.err" &
JOBPID=$!
for _ in $(seq 600); do grep -q READY "$DIR/job.out" 2>/dev/null && break; sleep 0.1; done
grep -q READY "$DIR/job.out" || { cat "$DIR/job.err" >&2; echo "bench: memhog did not start" >&2; exit 1; }
ROOT=$(ck status --json bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')

: >"$DIR/ckpt.t"; : >"$DIR/raw.t"; : >"$DIR/rawsync.t"
ckpt_once() {
  local t0; t0=$(now)
  ck checkpoint bench >/dev/null
  elapsed "$t0" >>"$DIR/ckpt.t"
}
raw_once() {
  rm -rf "$DIR/images/raw"; mkdir -p "$DIR/images/raw"; settle
  local t0; t0=$(now)
  "$CRIU" "${CRIU_DUMP[@]}" -t "$ROOT" -D "$DIR/images/raw" -o dump.log
  elapsed "$t0" >>"$DIR/raw.t"
  # The same dump made durable, as ckpt's commit rule requires.
  sync "$DIR/images/raw"/* "$DIR/images/raw"
  elapsed "$t0" >>"$DIR/rawsync.t"
}
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then settle; ckpt_once; settle; raw_once; else settle; raw_once; settle; ckpt_once; fi
done

# Restart: stop the job (not timed), then restore each way.
ck checkpoint --stop bench >/dev/null
wait "$JOBPID" || true
JOBPID=
: >"$DIR/restart.t"; : >"$DIR/rawrestore.t"
restart_once() {
  local t0; t0=$(now)
  "$J" --config "$DIR/ckpt.toml" restart bench >"$DIR/r.out" 2>"$DIR/r.err" &
  local sup=$!
  until grep -q "restored from epoch" "$DIR/r.err" 2>/dev/null; do
    kill -0 "$sup" 2>/dev/null || { cat "$DIR/r.err" >&2; exit 1; }
    sleep 0.002
  done
  elapsed "$t0" >>"$DIR/restart.t"
  # End it without a new epoch: the supervisor forwards SIGTERM to the job.
  kill -TERM "$sup"; wait "$sup" || true
}
rawrestore_once() {
  # The image maps the job's init from its private dir, which ckpt-job
  # restart creates itself and removes when the job ends (not timed).
  mkdir -p -m 0700 "$DIR/run/trees/bench"
  cp "$PWD/target/release/ckpt-init" "$DIR/run/trees/bench/ckpt-init"
  local t0; t0=$(now)
  rm -f "$DIR/raw.pid"
  "$CRIU" "${CRIU_RESTORE[@]}" -D "$DIR/images/raw" -o restore.log --pidfile "$DIR/raw.pid"
  elapsed "$t0" >>"$DIR/rawrestore.t"
  # The restored root has PR_SET_PDEATHSIG (from ckpt-init) and dies with criu.
  local p; p=$(cat "$DIR/raw.pid"); while kill -0 "$p" 2>/dev/null; do sleep 0.05; done
}
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then settle; restart_once; settle; rawrestore_once; else settle; rawrestore_once; settle; restart_once; fi
done

c=$(median <"$DIR/ckpt.t"); d=$(median <"$DIR/raw.t"); ds=$(median <"$DIR/rawsync.t")
s=$(median <"$DIR/restart.t"); t=$(median <"$DIR/rawrestore.t")
printf '\n%s MiB touched, %s rounds, medians (all rounds: see below)\n' "$MIB" "$ROUNDS"
printf '%-40s %8.3f s\n' "ckpt-job checkpoint (committed, durable)" "$c" "raw criu dump (page cache)" "$d" \
  "raw criu dump + fsync of its files" "$ds" "ckpt-job restart (running again)" "$s" "raw criu restore" "$t"
printf '%-40s %8.2f   (target <= 1.15)\n' "checkpoint / raw dump" "$(echo "$c / $d" | bc -l)" \
  "checkpoint / (raw dump + fsync)" "$(echo "$c / $ds" | bc -l)" "restart / raw restore" "$(echo "$s / $t" | bc -l)"
printf 'rounds: ckpt [%s] raw dump [%s] raw dump+fsync [%s] restart [%s] raw restore [%s]\n' \
  "$(paste -sd' ' "$DIR/ckpt.t")" "$(paste -sd' ' "$DIR/raw.t")" "$(paste -sd' ' "$DIR/rawsync.t")" "$(paste -sd' ' "$DIR/restart.t")" "$(paste -sd' ' "$DIR/rawrestore.t")"
