#!/bin/sh
# MPI shim overhead: message rate (8-byte messages) and bandwidth (1 MiB
# messages) between 2 ranks, with and without the shim (LD_PRELOAD, drains
# enabled as under ckpt: CKPT_SHIM_DIR set, no drain requested), alternating
# in the same run; prints the best run of each configuration (best-of-N is
# the figure least disturbed by other load on a shared machine), the
# medians, and the ratios (target >= 0.95).
#   scripts/bench-shim.sh [openmpi|mpich] [rounds=5] [seconds per run=1]
set -eu
cd "$(dirname "$0")/.."
mpi=${1:-openmpi}
rounds=${2:-5}
secs=${3:-1}
case "$mpi" in
    openmpi) cc=mpicc.openmpi; run="mpirun.openmpi --allow-run-as-root --oversubscribe --mca btl self,vader -np 2"
             envflag() { echo "-x $1=$2"; } ;;
    mpich) cc=mpicc.mpich; run="mpirun.mpich -np 2"
           envflag() { echo "-genv $1 $2"; } ;;
    *) echo "bench-shim.sh: unknown MPI '$mpi' (openmpi or mpich)" >&2; exit 2 ;;
esac
lib=$(./scripts/build-shim.sh "$mpi" | tail -1)
lib=$(pwd)/$lib
out=target/shim/shimbench-$mpi
$cc -O2 -o "$out" mpi-shim/bench/shimbench.c
sockdir=$(mktemp -d)
trap 'rm -rf "$sockdir"' EXIT
echo "# $mpi, $rounds rounds of ${secs}s per configuration, load: $(cut -d' ' -f1-3 /proc/loadavg)"
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
best() { sort -n | tail -1; }
for mode in rate bw; do
    : >"$sockdir/$mode.base"; : >"$sockdir/$mode.shim"
    i=0
    while [ $i -lt "$rounds" ]; do
        # shellcheck disable=SC2046
        $run "$out" $mode "$secs" | awk '{print $2}' >>"$sockdir/$mode.base"
        # shellcheck disable=SC2046
        $run $(envflag LD_PRELOAD "$lib") $(envflag CKPT_SHIM_DIR "$sockdir") "$out" $mode "$secs" \
            | awk '{print $2}' >>"$sockdir/$mode.shim"
        i=$((i + 1))
    done
    base=$(best <"$sockdir/$mode.base")
    shim=$(best <"$sockdir/$mode.shim")
    mbase=$(median <"$sockdir/$mode.base")
    mshim=$(median <"$sockdir/$mode.shim")
    unit=$([ $mode = rate ] && echo "msg/s (8 B)" || echo "MiB/s (1 MiB)")
    echo "$mode: best without $base, with shim $shim $unit, ratio $(awk "BEGIN {printf \"%.3f\", $shim / $base}");" \
        "medians $mbase, $mshim, ratio $(awk "BEGIN {printf \"%.3f\", $mshim / $mbase}")"
    echo "  runs without: $(tr '\n' ' ' <"$sockdir/$mode.base")"
    echo "  runs with:    $(tr '\n' ' ' <"$sockdir/$mode.shim")"
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
