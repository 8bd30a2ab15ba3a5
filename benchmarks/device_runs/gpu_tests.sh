#!/bin/bash
# The GPU tests (every test marked gpu), in N parallel shards: Triton compiles on the CPU one
# kernel at a time per process, so shards finish the suite sooner. Logs: gpu_tests<i>.log.
# Usage: gpu_tests.sh [SECONDS] [SHARDS] [pytest args, default: -m gpu tests]
. "$(dirname "$0")/common.sh"
limit=${1:-300}; n=${2:-4}; shift $(( $# < 2 ? $# : 2 ))
[ $# -gt 0 ] || set -- -m gpu tests
python3 -m pytest --collect-only -q -p no:cacheprovider "$@" | grep '::' > "$R/ids"
pids=""
for ((i = 0; i < n; i++)); do
  awk "NR%$n==$i" "$R/ids" > "$R/ids$i"
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider $(cat "$R/ids$i") \
    > "$R/gpu_tests$i.log" 2>&1 &
  pids="$pids $!"
done
wait $pids
tar czf "$OUT/gpu_tests.tgz" -C "$R" .
tail -n 1 "$R"/gpu_tests*.log
