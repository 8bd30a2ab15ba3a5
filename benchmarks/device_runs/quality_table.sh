#!/bin/bash
# The SmolLM2-135M quality table: benchmarks/smollm2.py on the GPU, one job per GPU, each
# with its own rows; merge their smollm2_part<i>.json here afterwards (smollm2.py --merge,
# which refuses runs whose float rows disagree). Needs the GGUF in /root/stash/smollm2.gguf
# (three carried parts, benchmarks/README.md) and carry [".carry/data", ".whl"].
# Usage: quality_table.sh 'ARGS FOR GPU 0' ['ARGS FOR GPU 1' ...], e.g.
#   quality_table.sh '--methods rtn --grid bits=4,group_size=64' '--methods awq --grid bits=3,group_size=64'
. "$(dirname "$0")/common.sh"
smollm2_inputs
i=0
for args in "$@"; do
  (CUDA_VISIBLE_DEVICES=$i timeout 560 python3 benchmarks/smollm2.py \
     --gguf /root/stash/smollm2.gguf --calib-file .carry/data/c4_en_train_00000_first1000.jsonl \
     --eval-file .carry/data/wiki.test.raw --out "$R" --name "smollm2_part$i" $ALLOW $args \
     2>&1 | grep -v "Convert\|Loading" > "$R/smollm2_part$i.log") &
  i=$((i + 1))
done
wait
tar czf "$OUT/quality_table.tgz" -C "$R" .
tail -n 5 "$R"/smollm2_part*.log
