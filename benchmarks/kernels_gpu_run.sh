#!/usr/bin/env bash
# Issue 8 on a GPU machine, in one call: the GPU kernel tests (spread over parallel pytest
# processes, since Triton compiles dominate), the kernel table, and decode speed.
# Usage (repo root): OUT=dir bash benchmarks/kernels_gpu_run.sh STEP...  with STEP in
#   info | tests | quick | full | decode
# Logs and results land in $OUT (kernels.{json,md,png} and decode.{json,md} for full/decode).
set -u
OUT=${OUT:-/tmp/kvant_gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
layout() {  # the tests step records a fallback layout when the 4-bit pairs kernels fail
  if [ -f /tmp/kv_w4_layout ]; then export KVANT_W4_LAYOUT=$(cat /tmp/kv_w4_layout); fi
  echo "KVANT_W4_LAYOUT=${KVANT_W4_LAYOUT:-pairs}"
}
for step in "$@"; do
  case $step in
    info)
      nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw \
        --format=csv > "$OUT/info.log" 2>&1
      python3 -c "import torch, triton, transformers; print(torch.__version__, \
triton.__version__, transformers.__version__, torch.cuda.get_device_name(0))" >> "$OUT/info.log" 2>&1
      cat "$OUT/info.log" ;;
    tests)
      t0=$(date +%s)
      rm -f /tmp/kv_w4_layout
      python3 -m pytest --collect-only -q tests/test_kernels_gpu.py | grep '::' > /tmp/kv_ids
      rm -f /tmp/kv_ids_*
      split -n r/8 /tmp/kv_ids /tmp/kv_ids_
      for f in /tmp/kv_ids_*; do
        timeout 240 python3 -m pytest -q -p no:cacheprovider $(cat "$f") > "$f.log" 2>&1 &
      done
      wait
      { for f in /tmp/kv_ids_*.log; do echo "== $f"; cat "$f"; done;
        echo "tests wall $(( $(date +%s) - t0 ))s"; } > "$OUT/tests.log"
      grep -h "passed\|failed\|error" /tmp/kv_ids_*.log; echo "tests wall $(( $(date +%s) - t0 ))s"
      # the 4-bit pairs layout (inline PTX) failing its tests: measure the planes layout
      if grep -h "^FAILED.*test_4bit_g128\|^FAILED.*test_act_order\[4" /tmp/kv_ids_*.log; then
        echo planes > /tmp/kv_w4_layout; echo "4-bit pairs layout FAILED: falling back to planes"
      fi ;;
    quick)
      layout
      timeout 420 python3 benchmarks/kernels.py --quick --out "$OUT/quick" 2>&1 \
        | tee "$OUT/kernels_quick.log" ;;
    full)
      layout | tee "$OUT/kernels.log"
      timeout 330 python3 benchmarks/kernels.py --out "$OUT" 2>&1 | tee -a "$OUT/kernels.log" ;;
    decode)
      layout | tee "$OUT/decode.log"
      timeout 240 python3 benchmarks/decode.py --out "$OUT" 2>&1 | tee -a "$OUT/decode.log" ;;
  esac
done
