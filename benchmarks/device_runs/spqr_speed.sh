#!/bin/bash
# SpQR decode step (fused kernel, kvant::spqr_linear) vs W4 g128 and fp16 on the Llama-2-7B
# shape, batch 1 and 16, one CUDA graph a step: benchmarks/spqr_speed.py with the heuristic
# launch configurations -> spqr_speed.{json,md}; TUNE=1 instead times every launch candidate
# of each shape first (--tune; Triton compiles ~40 variants, ~6-8 min). The kernel's GPU
# tests run apart: gpu_tests.sh 540 4 tests/kernels/test_spqr_gpu.py.
# Usage: spqr_speed.sh [spqr_speed.py args]   (~3 minutes on an H200)
. "$(dirname "$0")/common.sh"
timeout 540 python3 benchmarks/spqr_speed.py --out "$R" $ALLOW ${TUNE:+--tune} "$@" \
  > "$R/spqr_speed.log" 2>&1
tar czf "$OUT/spqr_speed.tgz" -C "$R" .
tail -n 3 "$R/spqr_speed.log"
grep -h "^| llama2-7b" "$R/spqr_speed.md" 2>/dev/null
