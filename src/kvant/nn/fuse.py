"""Fuse Linears (quantized or float) that read the same input into one layer, for inference.

A decode step of a Llama block calls q/k/v (three GEMVs on one input) and gate/up (two): at
batch 1 each call is a small, latency-bound kernel. :func:`fuse_siblings` concatenates the
rows of such siblings into one :class:`~kvant.nn.qlinear.QuantLinear` (same bits, group size,
input scale; no act-order permutation, which differs per layer) and replaces each sibling by
a :class:`FusedSlice` that returns its rows of the fused output. Plain ``nn.Linear`` siblings
(the float baseline) fuse the same way, by concatenating their weights. The fused layer runs once
per input: the first slice to see an input computes it, the others reuse it (the very input
tensor, unmodified: :mod:`kvant.nn.memo`), so the model's own forward code is unchanged.

This is an inference-time transform, for eager execution, CUDA-graph capture and
``torch.compile`` (which cannot trace the weak-reference key: there the first sibling in call
order computes the product and the others slice it, see ``_FusedGroup._traced_output``); a
fused model is not meant to be saved (the checkpoint stores the unfused layers).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kvant.nn.memo import input_key, same_input
from kvant.nn.qlinear import QuantLinear

__all__ = ["FusedSlice", "fuse_siblings", "can_fuse", "find_siblings"]


class _FusedGroup:
    """Row bounds of the siblings, the slice owning the fused layer, and the last (input,
    output) it computed. The layer is looked up on the owner at every call, so replacing
    ``owner.fused`` (e.g. quantizing a fused float layer) is picked up."""

    def __init__(self, widths: list[int]):
        self.owner: "FusedSlice | None" = None
        self.bounds = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self._key: tuple | None = None
        self._y: torch.Tensor | None = None
        self._left = 0

    def output(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced_output(x, i)
        if self._left == 0 or not same_input(self._key, x):
            self._y, self._key = self.owner.fused(x), input_key(x)
            self._left = len(self.bounds) - 1
        y = self._y[..., self.bounds[i]:self.bounds[i + 1]]
        self._left -= 1
        if self._left == 0:  # every sibling has its rows: free the fused output
            self._y, self._key = None, None
        return y

    def _traced_output(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The same under torch.compile, which cannot trace the weak-reference key: sibling 0
        (the first one called: find_siblings lists siblings in call order) computes the
        fused product, the others slice it within the same traced graph, the last drops it."""
        if i == 0:
            self._y = self.owner.fused(x)
        elif self._y is None:
            raise RuntimeError("fused sibling called before the first sibling of its group "
                               "under torch.compile; the siblings must run in the order "
                               "find_siblings recorded")
        y = self._y[..., self.bounds[i]:self.bounds[i + 1]]
        if i == len(self.bounds) - 2:
            self._y = None
        return y


class FusedSlice(nn.Module):
    """Stands in for one sibling: its rows ``[a, b)`` of the fused layer's output.

    The first slice of a group owns the fused QuantLinear as its submodule ``fused`` (so
    ``.to()`` moves it); the others refer to it.
    """

    def __init__(self, group: _FusedGroup, index: int, fused: nn.Module | None = None):
        super().__init__()
        self._group, self.index = group, index
        if fused is not None:  # the owner
            self.fused = fused
            group.owner = self
        self.in_features = group.owner.fused.in_features
        self.out_features = group.bounds[index + 1] - group.bounds[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., out_features): this sibling's rows of the fused product."""
        return self._group.output(x, self.index)

    def extra_repr(self) -> str:
        b = self._group.bounds
        return f"rows [{b[self.index]}, {b[self.index + 1]}) of a fused {self.in_features}->{b[-1]}"


def can_fuse(layers: list[QuantLinear]) -> str | None:
    """Why ``layers`` cannot be fused (None when they can)."""
    if len(layers) < 2:
        return "fewer than two layers"
    if all(type(m) is nn.Linear for m in layers):
        if len({(m.in_features, m.weight.dtype, m.bias is None) for m in layers}) > 1:
            return "input width, dtype or bias differ"
        return None
    if any(type(m) is not QuantLinear for m in layers):
        return "only plain QuantLinear (or all nn.Linear) layers fuse (QuIP/SpQR kinds carry " \
               "per-layer transforms)"
    first = layers[0]
    for m in layers[1:]:
        for attr in ("in_features", "bits", "group_size"):
            if getattr(m, attr) != getattr(first, attr):
                return f"{attr} differs ({getattr(first, attr)} vs {getattr(m, attr)})"
    if first.group_size == 0:
        return "per-tensor grids have one scale per layer"
    if any(m.g_idx is not None for m in layers):
        return "act-order layers have their own column order"
    scales = [m.input_scale for m in layers]
    if any(s is not None for s in scales) and not all(
            s is not None and torch.equal(s, scales[0]) for s in scales):
        return "input scales differ"
    if len({m.bias is None for m in layers}) > 1:
        return "some layers have a bias and some do not"
    return None


def _concat(layers: list) -> nn.Module:
    first = layers[0]
    n = sum(m.out_features for m in layers)
    if type(first) is nn.Linear:
        w = first.weight
        fused = nn.Linear(first.in_features, n, bias=first.bias is not None, device=w.device,
                          dtype=w.dtype)
        fused.weight.data.copy_(torch.cat([m.weight.data for m in layers], 0))
        if first.bias is not None:
            fused.bias.data.copy_(torch.cat([m.bias.data for m in layers], 0))
        return fused.requires_grad_(False)
    with torch.device(first.compute_device()):  # the shell made there: no move, no repack
        fused = QuantLinear(first.in_features, n, first.bits, first.group_size,
                            bias=first.bias is not None,
                            input_scale=first.input_scale is not None,
                            dtype=first.init_kwargs()["dtype"])
    for name in ("qweight", "scales", "qzeros", "bias"):  # all row-major in out_features
        if getattr(first, name) is not None:
            getattr(fused, name).copy_(torch.cat([getattr(m, name) for m in layers], 0))
    if first.input_scale is not None:
        fused.input_scale.copy_(first.input_scale)
    # the kernel layout of the copied tensors (stored on the host again if the siblings were)
    fused.prepare(options=first.kernel_options)
    return fused


@torch.no_grad()
def find_siblings(model: nn.Module, *args, **kwargs) -> list[list[str]]:
    """Names of the QuantLinears and nn.Linears that read the very same input tensor during
    one forward of ``model(*args, **kwargs)`` (q/k/v, gate/up, ...), groups of two or more in
    call order."""
    # (input tensor, its version, names); holding the tensors keeps a freed input's memory
    # from being taken for a later, different one
    seen: list[tuple] = []
    handles = []

    def hook(name):
        def fn(_m, a):
            x = a[0]
            for t, version, names in seen:
                if t is x and version == x._version:
                    names.append(name)
                    return
            seen.append((x, x._version, [name]))
        return fn

    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) or type(m) is nn.Linear:
            handles.append(m.register_forward_pre_hook(hook(name)))
    try:
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return [names for _, _, names in seen if len(names) > 1]


def fuse_siblings(model: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """Fuse each group of layer names (QuantLinears, or nn.Linears, of ``model`` reading the
    same input) that :func:`can_fuse` accepts. Returns the groups fused.

    Raises ValueError when a name is missing or is neither a QuantLinear nor an nn.Linear.
    """
    done = []
    for names in groups:
        layers = []
        for name in names:
            try:
                m = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"no module named {name!r}") from None
            if not isinstance(m, (QuantLinear, nn.Linear)):
                raise ValueError(f"{name!r} is {type(m).__name__}, not a QuantLinear or "
                                 "nn.Linear")
            layers.append(m)
        if can_fuse(layers) is not None:
            continue
        fused = _concat(layers)
        group = _FusedGroup([m.out_features for m in layers])
        for i, name in enumerate(names):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, FusedSlice(group, i, fused if i == 0 else None))
        done.append(list(names))
    return done
