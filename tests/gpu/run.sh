#!/bin/bash
# run.sh - the GPU checks, from the bundle `make gpu-bundle` builds, on a
# machine with a GPU and its driver (nothing else is needed there).
#
#   build/gpu-bundle/run.sh [OUTDIR]
#
# Writes OUTDIR/gpu-summary.txt (default: the bundle's folder) and exits
# non-zero when a check failed.  Bounded to a few minutes.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
mkdir -p "$out"
summary=$out/gpu-summary.txt
status=0
run() { # a check: its output to the summary; 0 and 77 (skipped) are fine
	echo "== $*" | tee -a "$summary"
	timeout 240 "$@" 2>&1 | tee -a "$summary"
	rc=${PIPESTATUS[0]}
	if [ "$rc" != 0 ] && [ "$rc" != 77 ]; then
		echo "== exit status $rc" | tee -a "$summary"
		status=1
	fi
}
: > "$summary"
{ date -u; uname -r; nvidia-smi -L 2>&1 || echo "nvidia-smi: not found"; } | tee -a "$summary"
run "$here/tests/gpu_check"
for n in 2 4; do
	run "$here/bin/kvrun" -q -n $n --kvd-log "$out/kvd-$n.log" -- "$here/tests/gpu_pushpull"
done
# the CPU engine on this (larger) machine, for scale
run "$here/bin/kvbench" -n 4 --sizes 4K,1M,64M --iters 10
run "$here/bin/kvbench" -n 4 --sizes 64M,256M --iters 10 --zero-copy
echo "== done: status $status" | tee -a "$summary"
exit $status
