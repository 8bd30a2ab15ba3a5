#!/bin/bash
# Session 3, call 7 (nvidia-h200-x2). No carry. The gemv kernel's prefetch (2/3/8 bits,
# batch 1-4). GPU 0: the GPU tests that run the gemv kernel (4 shards). GPU 1: the prefetch
# A/B at 3 and 2 bits (kernel_layouts.py --prefetch-ab --bits).
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/res; rm -rf $R; mkdir -p $R
G1=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
(for b in 3 2; do CUDA_VISIBLE_DEVICES=$G1 timeout 110 python3 benchmarks/kernel_layouts.py \
   --prefetch-ab --bits $b --shapes 8192x8192,28672x8192 --batches 1,4 --out $R \
   > $R/prefetch_w$b.log 2>&1; done) &
LANE1=$!
python3 -m pytest --collect-only -q -p no:cacheprovider tests/test_kernels_gpu.py \
  -k "bit_widths or act_order or planes or every_batch" | grep '::' > /tmp/ids
PIDS=""
for i in 0 1 2 3; do
  awk "NR%4==$i" /tmp/ids > /tmp/ids$i
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -q -p no:cacheprovider \
    $(cat /tmp/ids$i) > $R/gpu_tests$i.log 2>&1 &
  PIDS="$PIDS $!"
done
wait $PIDS $LANE1
tar czf $OUT/call7.tgz -C $R .
tail -n 1 $R/gpu_tests*.log | grep -v "^$"; grep -ih "failed\|error" $R/gpu_tests*.log | head -5
grep "^|" $R/kernel_prefetch_w3.md $R/kernel_prefetch_w2.md; tail -n 2 $R/prefetch_w*.log
