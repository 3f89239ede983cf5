#!/bin/sh
# Drain latency of the MPI drain shim under load: 8 Open MPI ranks on this
# node (oversubscribed, shared memory) run examples/mpi/halo.c (nonblocking
# halo exchange, many messages in flight) with the shim preloaded; a client
# (the agent's protocol: DRAIN to every rank socket at once, wait for every
# READY, then RESUME) drains them N times, and prints the median and p99 of
# DRAIN sent -> all READY.
#   scripts/bench-drain.sh [drains=50] [ranks=8]
set -eu
cd "$(dirname "$0")/.."
n=${1:-50}
np=${2:-8}
lib=$(pwd)/$(./scripts/build-shim.sh openmpi | tail -1)
make -s -C examples OUT="$(pwd)/target/bench-drain" >/dev/null
sockdir=$(mktemp -d)
trap 'kill $pid 2>/dev/null; rm -rf "$sockdir"' EXIT
mpirun.openmpi --allow-run-as-root --oversubscribe --mca btl self,vader -np "$np" \
    -x LD_PRELOAD="$lib" -x CKPT_SHIM_DIR="$sockdir" \
    target/bench-drain/halo-openmpi 1000000 2000 >/dev/null &
pid=$!
python3 - "$sockdir" "$n" "$np" <<'PY'
import os, socket, statistics, sys, time
d, n, np = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.time()
while len([f for f in os.listdir(d) if f.endswith(".sock")]) < np:
    if time.time() - t0 > 60:
        sys.exit("bench-drain: the ranks did not start")
    time.sleep(0.1)
time.sleep(1)
lat = []
for i in range(n):
    socks = []
    t = time.perf_counter()
    for r in range(np):
        s = socket.socket(socket.AF_UNIX)
        s.connect(os.path.join(d, f"{r}.sock"))
        s.sendall(b"DRAIN\n")
        socks.append(s)
    for s in socks:
        line = s.makefile().readline()
        if not line.startswith("READY"):
            sys.exit(f"bench-drain: {line!r}")
    lat.append((time.perf_counter() - t) * 1e3)
    for s in socks:
        s.sendall(b"RESUME\n")
    for s in socks:
        s.makefile().readline()
        s.close()
    time.sleep(0.05)
lat.sort()
p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
print(f"{np} ranks, {n} drains under load: median {statistics.median(lat):.2f} ms, "
      f"p99 {p99:.2f} ms, min {lat[0]:.2f} ms, max {lat[-1]:.2f} ms")
PY
