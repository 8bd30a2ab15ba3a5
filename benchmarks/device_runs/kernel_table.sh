#!/bin/bash
# The kernel table: benchmarks/kernel_table.py on one GPU -> kernels.{json,md,png} (the card's
# name is in each). Usage: kernel_table.sh [kernel_table.py args]   (~4 minutes on an H200)
. "$(dirname "$0")/common.sh"
timeout 540 python3 benchmarks/kernel_table.py --out "$R" $ALLOW "$@" > "$R/kernels.log" 2>&1
tar czf "$OUT/kernel_table.tgz" -C "$R" .
tail -n 3 "$R/kernels.log"; grep -E "^\| (8192×8192|28672×8192|8192×28672) \| (1|16|64) \|" \
  "$R/kernels.md" | cut -d'|' -f1-7
