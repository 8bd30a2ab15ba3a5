#!/bin/bash
# Decode speed of a Llama-3-70B-shaped model, W4 g128 (RTN grid, random weights) on one GPU:
# made and quantized block by block (no fp16 copy exists), each weight once on the GPU
# (KernelOptions.stored_on_host), q/k/v and gate/up fused, the step compiled and captured
# as a CUDA graph, context 2048 -> decode_70b.{json,md}; every batch with kvant's grouped
# attention, then the model's own (the order lets a cut run keep the first).
# Usage: decode70b.sh [SECONDS] [ATTENTIONS, default grouped,model]; DECODE_ARGS (environment)
# adds arguments, e.g. DECODE_ARGS="--layers 8 --profile" for a per-kernel GPU time table.
. "$(dirname "$0")/common.sh"
limit=${1:-500}
att=${2:-grouped,model}
timeout "$limit" python3 benchmarks/decode.py --shape llama3-70b --no-float --stored-on-host \
  --fuse --compile --batches 1,8 --attention "$att" --ctx 2048 --steps 50 --name decode_70b --out "$R" $ALLOW ${DECODE_ARGS:-} \
  > "$R/decode_70b.log" 2>&1
tar czf "$OUT/decode70b.tgz" -C "$R" .
grep -h "tokens/s\|GiB\|Error" "$R"/decode_70b.log | tail -8
