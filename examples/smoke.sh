#!/bin/sh
# smoke.sh <bindir> [steps]: run every workload twice (no checkpoint) and
# check exit 0 and byte-identical stdout.  Used by `make smoke`.
set -u
bin=${1:?usage: smoke.sh <bindir> [steps]}
steps=${2:-5}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rc=0
for p in threads forktree zombie pipes unix_sockets tcp_loopback files shm timers events; do
	for i in 1 2; do
		mkdir -p "$tmp/$p.$i"
		if ! "$bin/$p" "$tmp/$p.$i" "$steps" >"$tmp/$p.$i.out"; then
			echo "$p: run $i failed"; rc=1
		fi
	done
	if cmp -s "$tmp/$p.1.out" "$tmp/$p.2.out"; then
		echo "$p: ok $(tail -n 1 "$tmp/$p.1.out")"
	else
		echo "$p: stdout differs between runs"; rc=1
	fi
done
if out=$("$bin/memhog" 16 1) && [ "$(echo "$out" | head -n 1)" = READY ]; then
	echo "memhog: ok $(echo "$out" | tail -n 1)"
else
	echo "memhog: failed"; rc=1
fi
a=$(mpirun.openmpi --allow-run-as-root --oversubscribe -np 4 --mca btl self,vader "$bin/ring-openmpi" "$tmp" "$steps") || rc=1
b=$(UCX_TLS=^sysv mpirun.mpich -np 4 "$bin/ring-mpich" "$tmp" "$steps") || rc=1
if [ -n "$a" ] && [ "$a" = "$b" ]; then
	echo "ring: ok (Open MPI == MPICH) $(echo "$a" | tail -n 1)"
else
	echo "ring: Open MPI and MPICH outputs differ"; rc=1
fi
a=$(mpirun.openmpi --allow-run-as-root --oversubscribe -np 4 --mca btl self,vader "$bin/halo-openmpi" 20 200) || rc=1
b=$(UCX_TLS=^sysv mpirun.mpich -np 4 "$bin/halo-mpich" 20 200) || rc=1
if [ -n "$a" ] && [ "$a" = "$b" ]; then
	echo "halo: ok (Open MPI == MPICH) $(echo "$a" | tail -n 1)"
else
	echo "halo: Open MPI and MPICH outputs differ"; rc=1
fi
exit $rc
