# Sourced by every script here: the device copy of the tree has no .git, so the command that
# starts a script names the code (KVANT_COMMIT, KVANT_DIRTY: see README.md); results go to
# $R and are packed as one tarball into $OUT (a call returns at most 8 files).
if [ -z "$KVANT_COMMIT" ] || [ -z "$KVANT_DIRTY" ]; then
  echo "set KVANT_COMMIT and KVANT_DIRTY (README.md says how)" >&2; exit 2
fi
export KVANT_COMMIT KVANT_DIRTY PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
R=${R:-/tmp/res}; rm -rf "$R"; mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$R/gpus.txt"
# --allow-dirty only when the caller says the tree is dirty: the rows then say so
ALLOW=$([ "$KVANT_DIRTY" = 0 ] || echo --allow-dirty)

# The SmolLM2 scripts: check the GGUF reassembled in /root/stash and install the carried gguf
# wheel (benchmarks/README.md says how both travel)
smollm2_inputs() {
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /root/stash/smollm2.gguf" \
    | sha256sum -c || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/gguf-*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
}
