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
