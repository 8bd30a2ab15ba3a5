#!/bin/bash
# SmolLM2-135M at 2-4 bits with fine-tuning after rounding: benchmarks/smollm2_tune.py, one
# job per argument, all on GPU 0 side by side (the model is small: the jobs share the card,
# so their seconds are upper bounds). Needs the GGUF in /root/stash/smollm2.gguf (carried in
# parts, benchmarks/README.md) and carry [".carry/data", ".whl"].
# Usage: smollm2_tune.sh SECONDS 'CONFIGS FOR JOB 0' ['CONFIGS FOR JOB 1' ...], e.g.
#   smollm2_tune.sh 540 'quipsharp:bits=2' 'quipsharp:bits=3 quipsharp:bits=4'
. "$(dirname "$0")/common.sh"
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /root/stash/smollm2.gguf" \
  | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/gguf-*.whl
export PYTHONPATH=$PYTHONPATH:/tmp/site
secs=$1; shift
i=0
for configs in "$@"; do
  (timeout "$secs" python3 benchmarks/smollm2_tune.py --gguf /root/stash/smollm2.gguf \
     --calib-file .carry/data/c4_en_train_00000_first1000.jsonl \
     --eval-file .carry/data/wiki.test.raw --out "$R" --name "smollm2_tune_part$i" $ALLOW \
     --configs $configs 2>&1 | grep -v "Convert\|Loading" > "$R/smollm2_tune_part$i.log") &
  i=$((i + 1))
done
wait
tar czf "$OUT/smollm2_tune.tgz" -C "$R" .
tail -n 6 "$R"/smollm2_tune_part*.log
