"""Models whose decoder blocks are read one at a time: the skeleton of streaming quantization.

:func:`build_streamed` builds a Hugging Face model whose decoder blocks stay on the ``meta``
device (no memory); everything outside them (embeddings, final norm, head) is read at once.
The model carries a :class:`LazyBlocks` as ``model.kvant_lazy_blocks``; the calibration
engine (``kvant.calib.engine.quantize_model``) calls :meth:`LazyBlocks.load` just before it
quantizes block i and, when it streams the result to disk, :meth:`LazyBlocks.release` after
the block is written, so host memory holds one float block at a time and no packed blocks.

The tensors come from a source (kvant.model.sources): a safetensors directory
(:func:`load_lazy`) or seeded synthetic weights (kvant.model.synthetic). Until every block is
quantized the model cannot run: :func:`check_materialized` says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from kvant.core import heap
from kvant.errors import InputError
from kvant.model.discovery import find_blocks
from kvant.model.sources import SafetensorsSource, SourceError, TensorSource


class LazyLoadError(InputError):
    """A lazy load cannot go on: missing tensors, unsupported files, NaN weights."""


class LazyBlocks:
    """Reads the tensors of one decoder block (or of everything outside the blocks) from a
    tensor source, cast to ``dtype``, into a module built on the meta device, and releases a
    finished block back to the meta device."""

    def __init__(self, source: TensorSource, prefix: str, dtype: torch.dtype):
        self.source, self.prefix, self.dtype = source, prefix, dtype

    def fill(self, module: nn.Module, names: list[str], strip: str = "") -> None:
        """Assign source tensors ``names`` (full names; ``strip`` removed to get the
        module's own keys) to ``module``, replacing its meta tensors."""
        try:
            state = self.source.read(names, self.dtype)
        except SourceError as e:
            raise LazyLoadError(str(e)) from None
        for n, t in state.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise LazyLoadError(f"tensor {n!r} has NaN or Inf values")
        local = {n[len(strip):]: t for n, t in state.items()}
        module.load_state_dict(local, strict=False, assign=True)

    def load(self, i: int, block: nn.Module) -> None:
        """Read block ``i``'s weights into ``block`` (on the CPU); a no-op once read. Every
        tensor of the block's state_dict is read (a missing one raises), so none stays meta."""
        state = block.state_dict()
        if not any(t.is_meta for t in state.values()):
            return
        strip = f"{self.prefix}.{i}."
        self.fill(block, [strip + k for k in state], strip)

    @staticmethod
    def release(block: nn.Module) -> None:
        """Free a block whose quantized tensors are on disk: every parameter and persistent
        buffer goes back to the meta device (non-persistent buffers such as rotary tables
        are derived, not stored, and stay), and the freed memory to the system."""
        persistent = set(block.state_dict())
        for name, mod in block.named_modules():
            pre = f"{name}." if name else ""
            for k, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[k] = nn.Parameter(p.to("meta"), p.requires_grad)
            for k, b in list(mod._buffers.items()):
                if b is not None and pre + k in persistent:
                    mod._buffers[k] = b.to("meta")
        heap.trim()  # the freed tensors' heap pages go back to the system


def build_streamed(config, source: TensorSource, dtype: torch.dtype) -> nn.Module:
    """A causal LM of HF ``config`` with its decoder blocks on the meta device and every
    other tensor read from ``source``; ``model.kvant_lazy_blocks`` reads the blocks."""
    from accelerate import init_empty_weights

    from kvant.model import hf

    transformers = hf.require_transformers()
    hf.check_architecture(config)
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, **hf.dtype_kwargs(dtype))
    prefix, _ = find_blocks(model)
    lazy = LazyBlocks(source, prefix, dtype)
    held = source.names()
    # everything outside the blocks that the source holds (a tied head is not stored)
    lazy.fill(model, [n for n in model.state_dict()
                      if not n.startswith(f"{prefix}.") and n in held])
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters()
            if p.is_meta and not n.startswith(f"{prefix}.")]
    if left:
        raise LazyLoadError(f"{left[0]!r} is not in the source {source.identity()}")
    model.kvant_lazy_blocks = lazy
    return hf.prepare_for_calibration(model)


def stored_dtype(config) -> torch.dtype:
    """The dtype a HF config says its weights are stored in (float32 if it says nothing)."""
    # "dtype" first: transformers 5 warns on every read of the deprecated "torch_dtype"
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, torch.dtype):
        return stored
    return getattr(torch, str(stored or "float32").removeprefix("torch."), torch.float32)


def load_lazy(folder: str | os.PathLike, dtype="auto"):
    """(model, tokenizer) of a local Hugging Face safetensors directory with the decoder
    blocks left on the meta device, to be read one at a time while quantizing."""
    from kvant.model import hf

    transformers = hf.require_transformers()
    folder = Path(folder)
    if not folder.is_dir():
        raise LazyLoadError(f"lazy loading needs a local model directory, got {str(folder)!r}")
    try:
        source = SafetensorsSource(folder)
    except SourceError as e:
        raise LazyLoadError(str(e)) from None
    config = transformers.AutoConfig.from_pretrained(str(folder))
    dtype = hf.resolve_dtype(dtype)
    if dtype == "auto":
        dtype = stored_dtype(config)
    model = build_streamed(config, source, dtype)
    return model, hf.load_tokenizer(folder)


def check_materialized(model: nn.Module) -> None:
    """Raise a clear error if some weights of ``model`` are still unread (meta)."""
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise LazyLoadError(f"{len(meta)} weights are not loaded yet (first: {meta[0]!r}): a "
                            "lazily loaded model runs only after kvant.quantize has read and "
                            "quantized every block")


def streamable(path) -> bool:
    """Whether ``path`` is a local Hugging Face model directory of safetensors weights that
    :func:`load_lazy` can read block by block (not a kvant checkpoint, a nanoGPT directory or
    an already quantized export)."""
    import json

    folder = Path(str(path)).expanduser()
    cfg = folder / "config.json"
    if not folder.is_dir() or not cfg.is_file():
        return False
    if not ((folder / "model.safetensors").is_file()
            or (folder / "model.safetensors.index.json").is_file()):
        return False
    try:
        meta = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (isinstance(meta, dict) and meta.get("model_type") not in (None, "nanogpt")
            and not meta.get("quantization_config"))
