#!/bin/bash
# Decode speed, W4 vs fp16: benchmarks/decode.py with q/k/v and gate/up fused and the step
# compiled as one CUDA graph. Llama-2-7B shape (random weights) on GPU 0 ->
# decode_fused_compiled.{json,md}; with two GPUs, the SmolLM2-135M shape (g64) beside it on
# GPU 1 -> decode_smollm2_shape_fc.{json,md} (on one GPU it runs after).
. "$(dirname "$0")/common.sh"
small() {
  timeout 300 python3 benchmarks/decode.py --shape smollm2-135m --group-size 64 --fuse \
    --compile --name decode_smollm2_shape_fc --out "$R" $ALLOW > "$R/decode_smollm2.log" 2>&1
}
if [ "$(nvidia-smi -L | wc -l)" -gt 1 ]; then (CUDA_VISIBLE_DEVICES=1 small) & fi
CUDA_VISIBLE_DEVICES=0 timeout 540 python3 benchmarks/decode.py --fuse --compile \
  --name decode_fused_compiled --out "$R" $ALLOW > "$R/decode_7b.log" 2>&1
wait
[ "$(nvidia-smi -L | wc -l)" -gt 1 ] || CUDA_VISIBLE_DEVICES=0 small
tar czf "$OUT/decode.tgz" -C "$R" .
grep -h "tokens/s" "$R"/decode_*.log
