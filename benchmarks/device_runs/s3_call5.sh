#!/bin/bash
# Session 3, call 5 (nvidia-h200-x2). No carry. The 4-bit kernel now loads the next chunk's
# group scales and zero points ahead. GPU 0: GPU tests (4 shards), then the full kernel
# table. GPU 1: the prefetch A/B (kernel_layouts.py --prefetch-ab), then the 7B-shape decode
# (fused, compiled).
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=/tmp/res; rm -rf $R; mkdir -p $R
G1=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
(CUDA_VISIBLE_DEVICES=$G1 timeout 200 python3 benchmarks/kernel_layouts.py --prefetch-ab \
   --shapes 4096x4096,11008x4096,8192x8192,28672x8192 --out $R > $R/prefetch_ab.log 2>&1;
 CUDA_VISIBLE_DEVICES=$G1 timeout 300 python3 benchmarks/decode.py --fuse --compile \
   --name decode_fused_compiled --out $R > $R/decode_fc.log 2>&1) &
LANE1=$!
python3 -m pytest --collect-only -q -p no:cacheprovider tests/test_kernels_gpu.py \
  | grep '::' > /tmp/ids
PIDS=""
for i in 0 1 2 3; do
  awk "NR%4==$i" /tmp/ids > /tmp/ids$i
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -q -p no:cacheprovider \
    $(cat /tmp/ids$i) > $R/gpu_tests$i.log 2>&1 &
  PIDS="$PIDS $!"
done
wait $PIDS
CUDA_VISIBLE_DEVICES=0 timeout 250 python3 benchmarks/kernels.py --out $R > $R/kernels.log 2>&1
wait $LANE1
tar czf $OUT/call5.tgz -C $R .
tail -n 3 $R/gpu_tests*.log | grep -v "^$"; grep -i "fail\|error" $R/gpu_tests*.log | head -5
cat $R/kernel_prefetch.md | head -20; grep "8192x8192 b4\|28672x8192 b4" $R/kernels.log | head -4
grep -v "Warn\|warn" $R/decode_fc.log | grep "tokens/s"
