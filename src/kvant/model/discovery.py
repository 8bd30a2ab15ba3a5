"""Generic discovery of decoder blocks and their linear layers (no per-model name lists).

Blocks: the ``nn.ModuleList``/``nn.Sequential`` whose children all share one class, each
holding at least one linear layer, with the most parameters (``model.layers`` of Llama,
``transformer.h`` of GPT-2, ``blocks`` of nanoGPT). Linear layers: ``nn.Linear`` and
transformers' ``Conv1D`` (GPT-2 family, weight stored transposed as (in, out)).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kvant.errors import InputError


class DiscoveryError(InputError):
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
    The routers and scalar gates of mixture-of-experts layers are never returned: they stay
    float (:func:`kvant.model.moe.router_names` says how they are recognised).
    """
    from kvant.model.moe import router_names

    routers = router_names(block)
    out = {}
    for name, mod in block.named_modules():
        if not name or not is_linear(mod) or name in routers:
            continue
        full = f"{prefix}{name}"
        if any(matches_ignore(full, ig) for ig in ignore):
            continue
        out[name] = mod
    return out


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def matches_ignore(full_name: str, pattern: str) -> bool:
    """Whether an ``ignore`` pattern names the module ``full_name`` (exactly or as its
    dotted suffix: ``"c_proj"`` names ``blocks.0.attn.c_proj``)."""
    return full_name == pattern or full_name.endswith("." + pattern)


def check_ignore_patterns(model: nn.Module, patterns) -> None:
    """Raise :class:`InputError` naming every ``ignore`` pattern that matches no linear layer
    of ``model``: a typo there would silently quantize the layer the user meant to keep."""
    if isinstance(patterns, str):  # one name, never its characters
        patterns = (patterns,)
    names = [n for n, m in model.named_modules() if n and is_linear(m)]
    unmatched = [p for p in patterns if not any(matches_ignore(n, p) for n in names)]
    if unmatched:
        examples = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise InputError(f"ignore pattern(s) {unmatched} match no linear layer of "
                         f"{type(model).__name__} (a pattern is a module name or its dotted "
                         f"suffix, e.g. {examples})")


def check_finite(model: nn.Module) -> None:
    """Raise :class:`InputError` naming the first parameter or buffer of ``model`` that holds
    NaN or Inf (embeddings, norms, biases and the output head included, not only the layers
    that get quantized): the result would be NaN however well the weights are rounded.

    Tensors still on the meta device (a lazily loaded block) are checked when they are read.
    Integer and boolean buffers (masks, position ids) cannot hold NaN and are skipped; float
    buffers are checked for NaN only, as an additive attention mask may hold -inf on purpose.
    """
    for kind, items in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta or not t.is_floating_point():
                continue
            bad_mask = ~torch.isfinite(t) if kind == "parameter" else torch.isnan(t)
            if bad_mask.any():
                what = "NaN/Inf" if kind == "parameter" else "NaN"
                raise InputError(f"{kind} {name!r} {tuple(t.shape)} holds "
                                 f"{int(bad_mask.sum())} {what} value(s): the model is broken "
                                 "before quantization")


def check_model(model: nn.Module, ignore=()) -> None:
    """The model-wide checks before quantizing: every ``ignore`` pattern names a layer
    (:func:`check_ignore_patterns`) and every parameter is finite (:func:`check_finite`)."""
    check_ignore_patterns(model, ignore)
    check_finite(model)
