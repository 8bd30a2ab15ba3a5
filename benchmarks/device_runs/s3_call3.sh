#!/bin/bash
# Session 3, call 3 of 3 (call 2 only copies part-ab to /root/stash). carry:
# [".carry/smollm2/part-ac", ".carry/data", ".whl"]. GPU 0: SmolLM2 decode (fp16 vs W4 g64),
# graph only, then fused + torch.compile-d; GPU 1: the SpQR SmolLM2 row aimed at <= 4.0 bits.
cat /root/stash/part-aa /root/stash/part-ab .carry/smollm2/part-ac > /root/stash/smollm2.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /root/stash/smollm2.gguf" \
  | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/gguf-*.whl
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
G1=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
(CUDA_VISIBLE_DEVICES=$G1 timeout 520 python3 benchmarks/smollm2.py --gguf /root/stash/smollm2.gguf \
   --calib-file .carry/data/c4_en_train_00000_first1000.jsonl \
   --eval-file .carry/data/wiki.test.raw --out $OUT --name s_spqr3 --methods --grid \
   --configs spqr:bits=3,group_size=16,stat_bits=3,stat_group_size=64,outlier_budget=0.013 \
   2>&1 | grep -v "Convert\|Loading\|reference" > /tmp/spqr.log) &
CUDA_VISIBLE_DEVICES=0 timeout 180 python3 benchmarks/decode.py --model /root/stash/smollm2.gguf \
  --group-size 64 --name decode_smollm2 --out $OUT > /tmp/decode.log 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 330 python3 benchmarks/decode.py --model /root/stash/smollm2.gguf \
  --group-size 64 --fuse --compile --name decode_smollm2_fc --out $OUT > /tmp/decode_fc.log 2>&1
wait
tail -n 8 /tmp/decode.log /tmp/decode_fc.log; tail -n 12 /tmp/spqr.log
