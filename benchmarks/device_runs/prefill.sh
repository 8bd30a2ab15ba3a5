#!/bin/bash
# W4 g128 at batches 1-8192: benchmarks/prefill.py on one GPU -> prefill.{json,md} (fp16
# cuBLAS, kvant's dispatched path and every candidate, torch int4pack, GemLite from .whl/).
# Carry [".whl"] for GemLite. Usage: prefill.sh [prefill.py args]   (<= 8 minutes, H200)
. "$(dirname "$0")/common.sh"
if ls .whl/gemlite-*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/gemlite-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
timeout 460 python3 benchmarks/prefill.py --out "$R" --budget 390 $ALLOW "$@" \
  > "$R/prefill.log" 2>&1
tar czf "$OUT/prefill.tgz" -C "$R" .
tail -n 4 "$R/prefill.log"; grep -A 12 "^## Dispatch table" "$R/prefill.md"
