"""kvant's own checkpoint format: safetensors shards plus ``config.json`` (docs/FORMAT.md).

Writing goes to a temporary sibling directory that is renamed into place at the end, so a
failed or interrupted save never leaves a half-written output. Loading checks that every
shard is present and has the recorded size before reading it, and needs no calibration.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvant.model.discovery import set_submodule
from kvant.nn.qlinear import QuantLinear, quant_linear_class

FORMAT = "kvant"
FORMAT_VERSION = 1
MAX_SHARD_BYTES = 2 * 1024 ** 3


class CheckpointError(ValueError):
    """A checkpoint directory is missing, truncated or not a kvant checkpoint."""


def _module_entries(model: nn.Module) -> dict:
    return {name: {"kind": m.kind, **m.init_kwargs()}
            for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _dedupe(state: dict) -> tuple[dict, dict]:
    """Drop tensors that share storage with an earlier one (tied embeddings); keep aliases."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike):
    """Yield a fresh temporary sibling of ``out_dir``; when the block succeeds, it replaces
    ``out_dir`` (an existing one is swapped out, then removed); on any error it is deleted,
    so ``out_dir`` is never left half-written."""
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_shards(tensors: dict, folder: Path, max_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Save ``tensors`` (name -> CPU tensor) as ``model-0000i-of-0000n.safetensors`` files of
    at most ``max_bytes`` each (a larger single tensor gets its own file). Returns
    {file name: {"bytes": size on disk, "tensors": sorted names}}."""
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    files = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        files[fname] = {"bytes": (folder / fname).stat().st_size, "tensors": sorted(shard)}
    return files


def save_checkpoint(model: nn.Module, out_dir: str | os.PathLike, model_type: str,
                    model_config: dict, quantization_config: dict,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` (with its QuantLinear modules) to ``out_dir`` atomically."""
    with atomic_dir(out_dir) as tmp:
        tensors, aliases = _dedupe(model.state_dict())
        files = write_shards(tensors, tmp)
        qc = dict(quantization_config)
        qc.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                   "modules": _module_entries(model)})
        meta = {"model_type": model_type, "model_config": model_config,
                "quantization_config": qc, "files": files, "tied": aliases}
        (tmp / "config.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
    return Path(out_dir)


def read_config(ckpt_dir: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a checkpoint, with clear errors."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {str(d)!r} does not exist")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{str(d)!r} has no config.json: not a kvant checkpoint")
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON (truncated?): {e}") from None
    qc = meta.get("quantization_config", {})
    if qc.get("format") != FORMAT:
        raise CheckpointError(f"{str(d)!r} is not a kvant-format checkpoint "
                              f"(format={qc.get('format')!r})")
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {qc['format_version']} is newer than "
                              f"this kvant reads ({FORMAT_VERSION}); upgrade kvant")
    return meta


def read_tensors(ckpt_dir: str | os.PathLike, meta: dict) -> dict:
    """All tensors of a checkpoint (aliases restored); missing/truncated shards are errors."""
    d = Path(ckpt_dir)
    state = {}
    for fname, info in meta["files"].items():
        f = d / fname
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {str(f)!r} is truncated or altered: "
                                  f"{f.stat().st_size} bytes, expected {info['bytes']}")
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint file {str(f)!r} cannot be read: {e}") from None
    for name, src in meta.get("tied", {}).items():
        state[name] = state[src]
    return state


def install_quant_shells(model: nn.Module, modules: dict) -> None:
    """Replace the listed Linears of a freshly built model by empty QuantLinear modules."""
    for name, e in modules.items():
        e = dict(e)
        cls = quant_linear_class(e.pop("kind", "quant"))
        set_submodule(model, name, cls(**e))


def load_state(model: nn.Module, state: dict) -> None:
    """Load ``state`` strictly, naming missing and unexpected tensors on failure."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not m.endswith(".tril")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
