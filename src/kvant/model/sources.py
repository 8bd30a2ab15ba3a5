"""Where the float weights of a streamed model come from: one interface, two sources.

The streaming engine reads a decoder block's tensors just before it quantizes the block. It
asks a *tensor source* for a list of names and gets CPU (or device) tensors back. Two sources
serve that interface:

- :class:`SafetensorsSource`: a Hugging Face checkpoint directory (one ``model.safetensors``
  or shards with ``model.safetensors.index.json``), read tensor by tensor;
- :class:`kvant.model.synthetic.SyntheticSource`: seeded random weights generated per tensor
  on request, so shapes larger than the disk (a 70B Llama) can go through the same path.

``identity()`` describes the source for the resume record: a run is continued only against
the same source (file names and sizes, or the synthetic config and seed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch

from kvant.errors import InputError


class SourceError(InputError):
    """A tensor source cannot serve a request: missing files or tensors, bad values."""


class TensorSource(Protocol):
    """Serves float tensors by their state_dict names."""

    def names(self) -> set[str]:
        """Every tensor name the source holds."""

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (floating ones cast to ``dtype``), freshly allocated."""

    def identity(self) -> dict:
        """A JSON-able description that changes when the weights change."""


def _weight_map(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file of a checkpoint directory."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            entries = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SourceError(f"{index} is not a valid safetensors index: {e}") from None
        for f in set(entries.values()):
            if Path(f).name != f:  # confine every shard to the directory
                raise SourceError(f"{index} names a shard outside the directory: {f!r}")
        return {name: folder / f for name, f in entries.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {name: single for name in f.keys()}
    raise SourceError(f"{folder} has no model.safetensors or model.safetensors.index.json: "
                      "streaming reads safetensors checkpoints only")


class SafetensorsSource:
    """Tensors of a local safetensors checkpoint directory, read on request."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.weight_map = _weight_map(self.folder)

    def names(self) -> set[str]:
        return set(self.weight_map)

    def identity(self) -> dict:
        files = sorted({p.name for p in self.weight_map.values()})
        sizes = {}
        for f in files:
            p = self.folder / f
            sizes[f] = p.stat().st_size if p.is_file() else None
        return {"kind": "safetensors", "path": str(self.folder.resolve()), "files": sizes}

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError, safe_open

        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise SourceError(f"{len(missing)} tensors missing from {self.folder} "
                              f"(first: {missing[0]!r})")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for file, group in by_file.items():
            if not file.is_file():
                raise SourceError(f"shard {str(file)!r} is missing")
            try:
                with safe_open(str(file), "pt") as f:
                    for n in group:
                        t = f.get_tensor(n)
                        # a copy: get_tensor's tensors may share the file's memory map,
                        # which a small tensor that stays (a norm) would keep resident
                        # with every page of the shard the quantization touched
                        out[n] = t.to(dtype if t.is_floating_point() else t.dtype, copy=True)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise SourceError(f"shard {str(file)!r} cannot be read (truncated or "
                                  f"corrupt?): {e}") from None
        return out
