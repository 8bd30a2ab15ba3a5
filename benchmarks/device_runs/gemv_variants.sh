#!/bin/bash
# Decode GEMV variants on the Llama-3-70B block shapes -> gemv_variants.{json,md} (~3 min)
. "$(dirname "$0")/common.sh"
timeout 500 python3 benchmarks/gemv_variants.py --out "$R" "$@" > "$R/gemv_variants.log" 2>&1
tar czf "$OUT/gemv_variants.tgz" -C "$R" .
tail -n 30 "$R/gemv_variants.log"
