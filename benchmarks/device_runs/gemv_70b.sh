#!/bin/bash
# The 4-bit decode kernel on the Llama-3-70B block shapes -> gemv_70b.{json,md} (~2 min)
. "$(dirname "$0")/common.sh"
timeout 400 python3 benchmarks/gemv_70b.py --out "$R" "$@" > "$R/gemv_70b.log" 2>&1
tar czf "$OUT/gemv_70b.tgz" -C "$R" .
tail -n 14 "$R/gemv_70b.log"
