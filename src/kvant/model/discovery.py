"""Generic discovery of decoder blocks and their linear layers (no per-model name lists).

Blocks: the ``nn.ModuleList``/``nn.Sequential`` whose children all share one class, each
holding at least one linear layer, with the most parameters (``model.layers`` of Llama,
``transformer.h`` of GPT-2, ``blocks`` of nanoGPT). Linear layers: ``nn.Linear`` and
transformers' ``Conv1D`` (GPT-2 family, weight stored transposed as (in, out)).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class DiscoveryError(ValueError):
    """The model's structure could not be understood."""


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``: a linear layer whose weight is (in_features, out_features)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_linear(module: nn.Module) -> bool:
    """A layer kvant can quantize: nn.Linear or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out_features, in_features) weight of a linear layer (Conv1D transposed)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def find_blocks(model: nn.Module) -> tuple[str, nn.Module]:
    """(dotted name, container) of the decoder blocks."""
    best, best_params = None, -1
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) == 0:
            continue
        kids = list(mod)
        if len({type(k) for k in kids}) != 1:
            continue
        if not all(any(is_linear(m) for m in k.modules()) for k in kids):
            continue
        if isinstance(kids[0], nn.Linear) or is_conv1d(kids[0]):
            continue  # a list of bare linears is not a stack of blocks
        n_params = sum(p.numel() for p in mod.parameters())
        if n_params > best_params:
            best, best_params = (name, mod), n_params
    if best is None:
        raise DiscoveryError(
            f"no decoder blocks found in {type(model).__name__}: looked for an nn.ModuleList or "
            "nn.Sequential of identical modules that each contain nn.Linear/Conv1D layers")
    return best


def find_linears(block: nn.Module, ignore: tuple[str, ...] = (), prefix: str = "") -> dict:
    """name (relative to ``block``) -> linear layer, in registration order.

    ``ignore`` matches the full dotted name (``prefix + name``) exactly or by suffix.
    """
    out = {}
    for name, mod in block.named_modules():
        if not name or not is_linear(mod):
            continue
        full = f"{prefix}{name}"
        if any(full == ig or full.endswith("." + ig) for ig in ignore):
            continue
        out[name] = mod
    return out


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
