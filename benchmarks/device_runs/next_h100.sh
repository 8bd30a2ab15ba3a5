#!/bin/bash
# Prepared for a later session (unrun): the kernel table and the 7B-shape decode on an H100
# (kind nvidia-h100-x1; no carry), the card the peer figures come from. One call,
# about 7 minutes: GPU tests first (4 shards, the ONE_DOT variant's included), lazy loading
# on the GPU, the ONE_DOT A/B, then kernels.py, then decode.py fused + compiled.
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/res; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/gpus.txt
bash benchmarks/device_runs/sharded_tests.sh $R 200 4 tests/test_kernels_gpu.py
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_lazy.py > $R/lazy_gpu.log 2>&1
timeout 100 python3 benchmarks/kernel_layouts.py --one-dot-ab --shapes 8192x8192,28672x8192 \
  --batches 1,16 --out $R > $R/one_dot.log 2>&1
timeout 150 python3 benchmarks/kernels.py --out $R > $R/kernels.log 2>&1
timeout 200 python3 benchmarks/decode.py --fuse --compile --name decode_fused_compiled_h100 \
  --out $R > $R/decode.log 2>&1
tar czf $OUT/h100.tgz -C $R .
tail -n 1 $R/gpu_tests*.log; grep -h "tokens/s" $R/decode.log
