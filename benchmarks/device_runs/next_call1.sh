#!/bin/bash
# Prepared for the next session (unrun): call 1 of 3 on nvidia-h200-x2 (or h100-x2).
# carry: [".carry/smollm2/part-aa"]. GPU 0: the whole GPU test file, then the full kernel
# table (row tiles); GPU 1: decode of the 7B shape, unfused and with q/k/v and gate/up fused
# (both fp16 and W4), then the QuIP transform overhead.
mkdir -p /root/stash && cp .carry/smollm2/part-aa /root/stash/
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/res; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/gpus.txt
(CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/decode.py --out $R > $R/decode.log 2>&1;
 CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/decode.py --fuse --name decode_fused \
   --out $R > $R/decode_fused.log 2>&1;
 CUDA_VISIBLE_DEVICES=1 timeout 150 python3 benchmarks/quip_overhead.py --out $R \
   > $R/quip_overhead.log 2>&1) &
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -q -p no:cacheprovider \
  tests/test_kernels_gpu.py > $R/gpu_tests.log 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 250 python3 benchmarks/kernels.py --out $R > $R/kernels.log 2>&1
wait
tar czf $OUT/call1.tgz -C $R .
tail -n 3 $R/gpu_tests.log $R/kernels.log $R/decode.log $R/decode_fused.log $R/quip_overhead.log
