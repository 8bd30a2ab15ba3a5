#!/bin/bash
# Session 3, call 6 (nvidia-h200-x2). No carry. Prefetch chosen per launch config. GPU 0:
# dispatch GPU tests, the full kernel table, then the SmolLM2-shape decode (fused, compiled).
# GPU 1: the 7B-shape decode (fused, compiled).
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/res; rm -rf $R; mkdir -p $R
G1=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
(CUDA_VISIBLE_DEVICES=$G1 timeout 330 python3 benchmarks/decode.py --fuse --compile \
   --name decode_fused_compiled --out $R > $R/decode_fc.log 2>&1) &
LANE1=$!
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -p no:cacheprovider \
  tests/test_kernels_gpu.py -k "heuristic or graph or compile or quantlinear" > $R/gpu_tests.log 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 220 python3 benchmarks/kernels.py --out $R > $R/kernels.log 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/decode.py --shape smollm2-135m \
  --group-size 64 --fuse --compile --name decode_smollm2_shape_fc --out $R > $R/decode_s_fc.log 2>&1
wait $LANE1
tar czf $OUT/call6.tgz -C $R .
tail -n 2 $R/gpu_tests.log; grep -E "^\| (8192×8192|28672×8192|8192×28672) \| (1|16|64) \|" $R/kernels.md | cut -d'|' -f1-7
grep -h "tokens/s" $R/decode_fc.log $R/decode_s_fc.log
