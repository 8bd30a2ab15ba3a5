#!/bin/bash
# The E8P codebook kernel (QuIP# codes) against fp16 cuBLAS: benchmarks/codebook_kernel.py on
# one GPU -> codebook_kernel.{json,md} (every candidate configuration timed, the best kept),
# then the kernel's GPU tests in three parallel shards (codebook_tests<i>.log; TESTS=0 skips
# them). Usage: codebook_kernel.sh [codebook_kernel.py args]   (~2-3 minutes on an H200)
. "$(dirname "$0")/common.sh"
timeout 240 python3 benchmarks/codebook_kernel.py --out "$R" $ALLOW "$@" \
  > "$R/codebook_kernel.log" 2>&1
if [ "${TESTS:-1}" != 0 ]; then
  pids=""; i=0
  for sel in "candidate or every_batch or forward or graph" "bf16" "tails"; do
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_codebook_gpu.py \
      -k "$sel" > "$R/codebook_tests$i.log" 2>&1 &
    pids="$pids $!"; i=$((i + 1))
  done
  wait $pids
fi
tar czf "$OUT/codebook_kernel.tgz" -C "$R" .
tail -n 2 "$R/codebook_kernel.log"; tail -qn 1 "$R"/codebook_tests*.log 2>/dev/null
grep -E "^\| (8192×8192|28672×8192|8192×28672) \| (1|16) \|" "$R/codebook_kernel.md" \
  | cut -d'|' -f1-8
