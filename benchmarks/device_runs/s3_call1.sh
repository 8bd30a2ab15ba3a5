#!/bin/bash
# Session 3, call 1 of 3 (nvidia-h200-x2 or h100-x2). carry: [".carry/smollm2/part-aa"].
# GPU 0: the GPU test file in 4 parallel shards (Triton compiles on the CPU), then the full
# kernel table. GPU 1: QuIP transform overhead, then the 7B-shape decode with q/k/v and
# gate/up fused and the step torch.compile-d (fp16 and W4 alike).
mkdir -p /root/stash && cp .carry/smollm2/part-aa /root/stash/
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/res; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/gpus.txt
G1=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
(CUDA_VISIBLE_DEVICES=$G1 timeout 100 python3 benchmarks/quip_overhead.py --out $R \
   > $R/quip_overhead.log 2>&1;
 CUDA_VISIBLE_DEVICES=$G1 timeout 430 python3 benchmarks/decode.py --fuse --compile \
   --name decode_fused_compiled --out $R > $R/decode_fc.log 2>&1) &
LANE1=$!
python3 -m pytest --collect-only -q -p no:cacheprovider tests/test_kernels_gpu.py \
  | grep '::' > /tmp/ids
PIDS=""
for i in 0 1 2 3; do
  awk "NR%4==$i" /tmp/ids > /tmp/ids$i
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -q -p no:cacheprovider \
    $(cat /tmp/ids$i) > $R/gpu_tests$i.log 2>&1 &
  PIDS="$PIDS $!"
done
wait $PIDS
CUDA_VISIBLE_DEVICES=0 timeout 270 python3 benchmarks/kernels.py --out $R > $R/kernels.log 2>&1
wait $LANE1
tar czf $OUT/call1.tgz -C $R .
tail -n 2 $R/gpu_tests*.log; tail -n 3 $R/kernels.log $R/quip_overhead.log; tail -n 8 $R/decode_fc.log
