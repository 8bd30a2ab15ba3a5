#!/bin/bash
# Run a pytest selection in N parallel shards (Triton compiles on the CPU, one kernel at a
# time per process), each shard's log in OUTDIR/gpu_tests<i>.log; waits for all of them.
# Usage: sharded_tests.sh OUTDIR SECONDS N pytest-args...  (CUDA_VISIBLE_DEVICES as set)
out=$1; limit=$2; n=$3; shift 3
python3 -m pytest --collect-only -q -p no:cacheprovider "$@" | grep '::' > /tmp/ids
pids=""
for ((i = 0; i < n; i++)); do
  awk "NR%$n==$i" /tmp/ids > /tmp/ids$i
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider $(cat /tmp/ids$i) \
    > "$out/gpu_tests$i.log" 2>&1 &
  pids="$pids $!"
done
wait $pids
