"""Helpers for the output-safety and integrity tests: tiny models on disk, tree digests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

import kvant
from kvant.model.nanogpt import CharTokenizer, GPTConfig, GPTLanguageModel

TINY = GPTConfig(vocab_size=65, n_embd=64, n_head=2, n_layer=2, block_size=32, dropout=0.0)
VOCAB = "".join(chr(c) for c in range(32, 97))


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): relative path -> sha256 of a file's
    bytes, ``dir`` or ``link -> target``. Equal digests: nothing was added, removed or
    changed."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tiny_model(seed: int = 0):
    """A 2-block random nanoGPT and its 65-character tokenizer."""
    torch.manual_seed(seed)
    return GPTLanguageModel(TINY).eval(), CharTokenizer(VOCAB)


def tiny_quantized(bits: int = 4, seed: int = 0, config=None):
    """The tiny nanoGPT quantized with RTN (group 32) or ``config``, instantly."""
    model, tok = tiny_model(seed)
    kvant.quantize(model, config or kvant.RTNConfig(bits=bits, group_size=32),
                   options=kvant.EngineOptions(show_progress=False))
    return model, tok


def write_nanogpt_dir(path: Path, seed: int = 0) -> Path:
    """A tiny nanoGPT weight directory that ``kvant.load_model`` (and the CLI) read."""
    model, tok = tiny_model(seed)
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "model-00001-of-00001.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "nanogpt", "config": TINY.to_dict(), "vocab": tok.chars,
        "shards": ["model-00001-of-00001.safetensors"]}))
    return path
