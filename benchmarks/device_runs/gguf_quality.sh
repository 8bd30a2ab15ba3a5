#!/bin/bash
# GGUF quality (benchmarks/gguf_quality.py) on the GPU machine: kvant's files quantized on the
# GPU, llama.cpp's files and every llama.cpp perplexity on the host's CPU cores, SHARDS
# scoring processes side by side (one llama.cpp thread each), each stopped after SECONDS.
# Every step is cached in /tmp/gq, so a second call (same machine, still warm) goes on
# where the first stopped. llama-cpp-python travels as .carry/llpkg.tar.xz (its llama_cpp
# and diskcache packages, built here for AVX2 without AVX-512/AMX, as gguf_quality.md says);
# the GGUF as for the other SmolLM2 scripts. Carry [".carry/data", ".carry/llpkg.tar.xz",
# ".whl"]. Usage: gguf_quality.sh SECONDS SHARDS [gguf_quality.py args], e.g.
#   gguf_quality.sh 500 14 --methods gptq --sink-weight 128 --sink-max-share 0.2
. "$(dirname "$0")/common.sh"
smollm2_inputs
L=/tmp/llpkg
[ -d $L/llama_cpp ] || { mkdir -p $L && tar xJf .carry/llpkg.tar.xz -C $L; }
printf '#!/bin/sh\nPYTHONPATH=%s exec python3 "$@"\n' "$L" > /tmp/llpy && chmod +x /tmp/llpy
secs=$1 shards=$2; shift 2
G=(python3 benchmarks/gguf_quality.py --gguf /root/stash/smollm2.gguf --work /tmp/gq
   --llama-python /tmp/llpy --calib-file .carry/data/c4_en_train_00000_first1000.jsonl
   --eval-file .carry/data/wiki.test.raw --device cuda --no-float $ALLOW)
start=$(date +%s)
timeout "$secs" "${G[@]}" --files-only "$@" > "$R/files.log" 2>&1 || echo "files step: rc $?"
left=$((secs - $(date +%s) + start))
[ "$left" -gt 10 ] || { echo "no time left to score after the files step"; left=0; }
for k in $( [ "$left" -gt 0 ] && seq 0 $((shards - 1)) ); do
  timeout "$left" "${G[@]}" --shard "$k/$shards" --threads 1 --out "$R/shard$k" "$@" \
    > "$R/score$k.log" 2>&1 &
done
wait
"${G[@]}" --table-only --out "$R" "$@" > "$R/table.log" 2>&1
tar czf "$OUT/gguf_quality.tgz" -C /tmp/gq steps -C "$R" .
ls /tmp/gq/steps | grep -c nll; tail -n 3 "$R/files.log"; cat "$R/gguf_quality.md" 2>/dev/null | head -30
