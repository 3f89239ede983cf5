#!/bin/sh
# MPI shim overhead: message rate (8-byte messages) and bandwidth (1 MiB
# messages) between 2 ranks, with and without the shim (LD_PRELOAD, drains
# enabled as under ckpt: CKPT_SHIM_DIR set, no drain requested), alternating
# in the same run; prints the best run of each configuration (best-of-N is
# the figure least disturbed by other load on a shared machine), the
# medians, their ratios and the median of the per-round ratios (target
# >= 0.95).
# The 2 ranks are pinned one per core (--bind-to core; BIND=none to
# disable), and each run warms up (20% of its time) before timing.
#   scripts/bench-shim.sh [openmpi|mpich] [rounds=5] [seconds per run=1]
set -eu
cd "$(dirname "$0")/.."
mpi=${1:-openmpi}
rounds=${2:-5}
secs=${3:-1}
bind=${BIND:-core}
case "$mpi" in
    openmpi) cc=mpicc.openmpi; run="mpirun.openmpi --allow-run-as-root --oversubscribe --bind-to $bind --mca btl self,vader -np 2"
             envflag() { echo "-x $1=$2"; } ;;
    mpich) cc=mpicc.mpich; run="mpirun.mpich -bind-to $bind -np 2"
           envflag() { echo "-genv $1 $2"; } ;;
    *) echo "bench-shim.sh: unknown MPI '$mpi' (openmpi or mpich)" >&2; exit 2 ;;
esac
lib=$(./scripts/build-shim.sh "$mpi" | tail -1)
lib=$(pwd)/$lib
out=target/shim/shimbench-$mpi
$cc -O2 -Wno-stringop-overflow -o "$out" mpi-shim/bench/shimbench.c
sockdir=$(mktemp -d)
trap 'rm -rf "$sockdir"' EXIT
echo "# $mpi, $rounds rounds of ${secs}s per configuration, bind-to $bind, load: $(cut -d' ' -f1-3 /proc/loadavg)"
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
best() { sort -n | tail -1; }
for mode in rate bw; do
    : >"$sockdir/$mode.base"; : >"$sockdir/$mode.shim"
    i=0
    while [ $i -lt "$rounds" ]; do
        # alternate which configuration goes first, so that neither is
        # systematically the one that meets load arriving mid-round
        for cfg in $([ $((i % 2)) -eq 0 ] && echo "base shim" || echo "shim base"); do
            if [ $cfg = base ]; then
                $run "$out" $mode "$secs" | awk '{print $2}' >>"$sockdir/$mode.base"
            else
                # shellcheck disable=SC2046
                $run $(envflag LD_PRELOAD "$lib") $(envflag CKPT_SHIM_DIR "$sockdir") "$out" $mode "$secs" \
                    | awk '{print $2}' >>"$sockdir/$mode.shim"
            fi
        done
        i=$((i + 1))
    done
    base=$(best <"$sockdir/$mode.base")
    shim=$(best <"$sockdir/$mode.shim")
    mbase=$(median <"$sockdir/$mode.base")
    mshim=$(median <"$sockdir/$mode.shim")
    unit=$([ $mode = rate ] && echo "msg/s (8 B)" || echo "MiB/s (1 MiB)")
    echo "$mode: best without $base, with shim $shim $unit, ratio $(awk "BEGIN {printf \"%.3f\", $shim / $base}");" \
        "medians $mbase, $mshim, ratio $(awk "BEGIN {printf \"%.3f\", $mshim / $mbase}")"
    # Each round runs the two configurations back to back: the median of
    # the per-round ratios is the figure least biased by load that comes
    # and goes between rounds.
    pairs=$(paste -d' ' "$sockdir/$mode.shim" "$sockdir/$mode.base" | awk '{printf "%.4f\n", $1 / $2}' | median)
    echo "  median of the per-round ratios (paired): $pairs"
    echo "  runs without: $(tr '\n' ' ' <"$sockdir/$mode.base")"
    echo "  runs with:    $(tr '\n' ' ' <"$sockdir/$mode.shim")"
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
