#!/bin/bash
# Session 3, call 4 (nvidia-h200-x2). No carry. GPU 0: the 7B-shape decode, q/k/v and
# gate/up fused, the step compiled as one graph (cache initialised first). GPU 1: QuIP
# transform overhead, eager and CUDA graph; then the SmolLM2-135M-shape decode, same way.
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/res; rm -rf $R; mkdir -p $R
G1=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
(CUDA_VISIBLE_DEVICES=$G1 timeout 150 python3 benchmarks/quip_overhead.py --out $R \
   > $R/quip_overhead.log 2>&1;
 CUDA_VISIBLE_DEVICES=$G1 timeout 380 python3 benchmarks/decode.py --shape smollm2-135m \
   --group-size 64 --fuse --compile --name decode_smollm2_shape_fc --out $R \
   > $R/decode_s_fc.log 2>&1) &
CUDA_VISIBLE_DEVICES=0 timeout 540 python3 benchmarks/decode.py --fuse --compile \
  --name decode_fused_compiled --out $R > $R/decode_fc.log 2>&1
wait
tar czf $OUT/call4.tgz -C $R .
grep -v "Warn\|warn" $R/decode_fc.log | tail -n 12; tail -n 10 $R/decode_s_fc.log; cat $R/quip_overhead.md
