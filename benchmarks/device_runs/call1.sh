#!/bin/bash
# Call 1: GPU kernel tests and the 4-bit layout sweep on GPU 0; nanoGPT SpQR and AWQ tables
# on GPU 1. Carries the first third of the SmolLM2 GGUF into /root/stash.
mkdir -p /root/stash && cp .carry/smollm2/part-aa /root/stash/
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/res; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/gpus.txt
(CUDA_VISIBLE_DEVICES=1 timeout 500 python3 benchmarks/spqr_nanogpt.py --device cuda --out $R \
  > $R/spqr_nanogpt.log 2>&1) &
(CUDA_VISIBLE_DEVICES=1 timeout 500 python3 benchmarks/awq_nanogpt.py --device cuda --out $R \
  > $R/awq_nanogpt.log 2>&1) &
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_kernels_gpu.py > $R/gpu_tests.log 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 benchmarks/kernel_layouts.py --out $R \
  > $R/kernel_layouts.log 2>&1
wait
tar czf $OUT/call1.tgz -C $R .
tail -3 $R/gpu_tests.log; tail -30 $R/kernel_layouts.log; tail -4 $R/*nanogpt.log
