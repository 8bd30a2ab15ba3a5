#!/bin/bash
# SmolLM2-135M at 2-4 bits with fine-tuning after rounding: benchmarks/smollm2_tune.py, one
# job per argument, all on GPU 0 side by side (the model is small: the jobs share the card,
# so their seconds are upper bounds). Needs the GGUF in /root/stash/smollm2.gguf (carried in
# parts, benchmarks/README.md) and carry [".carry/data", ".whl"].
# Usage: smollm2_tune.sh SECONDS 'CONFIGS FOR JOB 0' ['CONFIGS FOR JOB 1' ...], e.g.
#   smollm2_tune.sh 540 'quipsharp:bits=2' 'quipsharp:bits=3 quipsharp:bits=4'
# TUNE_ARGS (environment) is passed to every job, e.g. TUNE_ARGS=--no-block. With more than
# one job the float log-probs (30 GB a job) stay in host memory (--kl-store host): on
# 2026-12-02 three jobs that each kept them on the GPU ran out of its memory in end-to-end
# tuning.
. "$(dirname "$0")/common.sh"
smollm2_inputs
secs=$1; shift
store=$([ $# -gt 1 ] && echo host || echo auto)
i=0
for configs in "$@"; do
  (timeout "$secs" python3 benchmarks/smollm2_tune.py --gguf /root/stash/smollm2.gguf \
     --calib-file .carry/data/c4_en_train_00000_first1000.jsonl \
     --eval-file .carry/data/wiki.test.raw --out "$R" --name "smollm2_tune_part$i" $ALLOW --kl-store $store ${TUNE_ARGS:-} \
     --configs $configs 2>&1 | grep -v "Convert\|Loading" > "$R/smollm2_tune_part$i.log") &
  i=$((i + 1))
done
wait
tar czf "$OUT/smollm2_tune.tgz" -C "$R" .
tail -n 6 "$R"/smollm2_tune_part*.log
