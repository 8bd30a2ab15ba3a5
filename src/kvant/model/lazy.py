"""Quantize with less host memory: decoder blocks read from disk one at a time.

``load_lazy(dir)`` builds a Hugging Face model whose decoder blocks stay on the ``meta``
device (no memory); everything outside them (embeddings, final norm, head) is read at once.
The model carries a :class:`LazyBlocks` as ``model.kvant_lazy_blocks``; the calibration
engine (``kvant.calib.engine.quantize_model``) calls :meth:`LazyBlocks.load` just before it
quantizes block i, so the float weights of one block are read at a time, next to the packed
blocks already done. Measured (benchmarks/results/lazy_memory.md): the peak stays below
loading the whole model, but the process still grows by more than the packed output per
block (memory the allocator keeps), so the peak is not yet independent of the depth.

Only safetensors checkpoints (one file, or shards with ``model.safetensors.index.json``)
whose tensor names are the model's state_dict names, as ``save_pretrained`` writes them.
Until every block is quantized the model cannot run: :func:`check_materialized` says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from kvant.model.discovery import find_blocks


class LazyLoadError(ValueError):
    """A lazy load cannot go on: missing tensors, unsupported files, NaN weights."""


def _weight_map(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file of a checkpoint directory."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        entries = json.loads(index.read_text())["weight_map"]
        return {name: folder / f for name, f in entries.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {name: single for name in f.keys()}
    raise LazyLoadError(f"{folder} has no model.safetensors or model.safetensors.index.json: "
                        "lazy loading reads safetensors checkpoints only")


class LazyBlocks:
    """Reads the tensors of one decoder block (or of everything outside the blocks) from a
    safetensors checkpoint, cast to ``dtype``, into a module built on the meta device."""

    def __init__(self, folder: str | os.PathLike, prefix: str, dtype: torch.dtype):
        self.folder, self.prefix, self.dtype = Path(folder), prefix, dtype
        self.weight_map = _weight_map(self.folder)

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise LazyLoadError(f"{len(missing)} tensors missing from {self.folder} "
                                f"(first: {missing[0]!r})")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for file, group in by_file.items():
            with safe_open(str(file), "pt") as f:
                for n in group:
                    t = f.get_tensor(n)
                    # a copy: get_tensor's tensors may share the file's memory map, which a
                    # small tensor that stays (a norm) would keep resident with every page
                    # of the shard the quantization touched
                    out[n] = t.to(self.dtype if t.is_floating_point() else t.dtype,
                                  copy=True)
        return out

    def fill(self, module: nn.Module, names: list[str], strip: str = "") -> None:
        """Assign checkpoint tensors ``names`` (full names; ``strip`` removed to get the
        module's own keys) to ``module``, replacing its meta tensors."""
        state = self._read(names)
        for n, t in state.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise LazyLoadError(f"tensor {n!r} has NaN or Inf values")
        local = {n[len(strip):]: t for n, t in state.items()}
        module.load_state_dict(local, strict=False, assign=True)

    def load(self, i: int, block: nn.Module) -> None:
        """Read block ``i``'s weights into ``block`` (on the CPU); a no-op once read. Every
        tensor of the block's state_dict is read (a missing one raises), so none stays meta."""
        if not any(p.is_meta for p in block.parameters()):
            return
        strip = f"{self.prefix}.{i}."
        self.fill(block, [strip + k for k in block.state_dict()], strip)


def _return_freed_memory() -> None:
    """Make glibc serve allocations above 128 KB with mmap, so each block's freed float
    weights and temporaries go back to the system instead of staying in the heap (seen
    while writing this on cpu-2core, 2048-wide Llama: growth per block from 80-120 MB to
    ~50 MB, of which ~28 MB is the packed block; the rest is not explained). No-op off
    glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; also stops its dynamic growth
    except (OSError, AttributeError):
        pass


def load_lazy(folder: str | os.PathLike, dtype="auto"):
    """(model, tokenizer) of a local Hugging Face safetensors directory with the decoder
    blocks left on the meta device, to be read one at a time while quantizing."""
    from accelerate import init_empty_weights

    from kvant.model import hf

    transformers = hf._require_transformers()
    folder = Path(folder)
    if not folder.is_dir():
        raise LazyLoadError(f"lazy loading needs a local model directory, got {str(folder)!r}")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    hf.check_architecture(config)
    dtype = hf.resolve_dtype(dtype)
    if dtype == "auto":
        stored = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
        dtype = stored if isinstance(stored, torch.dtype) else getattr(
            torch, str(stored or "float32").removeprefix("torch."), torch.float32)
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, **hf.dtype_kwargs(dtype))
    prefix, blocks = find_blocks(model)
    lazy = LazyBlocks(folder, prefix, dtype)
    # everything outside the blocks that the checkpoint holds (a tied head is not stored)
    lazy.fill(model, [n for n in model.state_dict()
                      if not n.startswith(f"{prefix}.") and n in lazy.weight_map])
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters()
            if p.is_meta and not n.startswith(f"{prefix}.")]
    if left:
        raise LazyLoadError(f"{left[0]!r} is not in the checkpoint {folder}")
    model.kvant_lazy_blocks = lazy
    _return_freed_memory()
    tokenizer = hf.load_tokenizer(folder)
    return hf.prepare_for_calibration(model), tokenizer


def check_materialized(model: nn.Module) -> None:
    """Raise a clear error if some weights of ``model`` are still unread (meta)."""
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise LazyLoadError(f"{len(meta)} weights are not loaded yet (first: {meta[0]!r}): a "
                            "lazily loaded model runs only after kvant.quantize has read and "
                            "quantized every block")
