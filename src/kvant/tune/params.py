"""The continuous tensors of a quantized model that fine-tuning may move, and how they move.

A packed layer (:class:`kvant.nn.qlinear.QuantLinear` and every kind built on it) keeps all
its tensors as buffers. Its integer codes (``qweight``, ``qzeros``, GGUF ``blocks``, sign
vectors, permutations, outlier positions) are frozen; what may move is
- "scales": the float buffers that scale the codes (``scales``; SpQR's ``scale_stats``, the
  base and step of its quantized scales) and AWQ-style ``input_scale``;
- "biases": the layer's ``bias`` buffer;
- "norms": the float parameters of normalisation modules (LayerNorm, RMSNorm, ... : a module
  whose class name contains "Norm").

Each such tensor gets a float32 master. Scales move multiplicatively, ``s = s0 * (1 + θ)``
with θ starting at 0 (one learning rate is then a relative step for every layer); the others
additively. The forward always sees the master cast to the tensor's stored dtype (float16
scales stay float16), so what is tuned is what will be stored; the cast passes gradients
straight through. While tuning, each packed layer is swapped for a differentiable stand-in
that computes ``(x / input_scale) @ dequantized_weight()ᵀ + bias`` — the contract every layer
kind's forward honours — because the packed product is a custom op without a backward.
A scale buffer whose layer kind does not dequantize it differentiably is left alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvant.nn.qlinear import QuantLinear

SCALE_BUFFERS = ("scales", "scale_stats")  # buffers that scale the stored codes
INPUT_SCALE = "input_scale"


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (nn.LayerNorm, nn.RMSNorm, transformers' *RMSNorm, ...)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


@dataclass
class Entry:
    """One tensor that moves: ``module.<name>`` (a buffer, or a parameter when ``is_param``).

    original: the stored tensor itself (written in place by :meth:`TunableSet.write_back`);
    saved: a copy of its value before tuning (for :meth:`TunableSet.revert`);
    theta: the float32 master the optimizer updates; multiplicative: ``s0 * (1 + theta)``.
    """

    module: nn.Module
    name: str
    kind: str
    is_param: bool
    original: torch.Tensor
    saved: torch.Tensor
    theta: nn.Parameter
    multiplicative: bool
    base: torch.Tensor | None = None  # float32 s0 of a multiplicative entry

    def value(self) -> torch.Tensor:
        """The tensor the forward sees, in the stored dtype (differentiable in theta)."""
        v = self.base * (1 + self.theta) if self.multiplicative else self.theta
        return v.to(self.original.dtype)


class _Differentiable(nn.Module):
    """Stand-in for a packed layer while tuning: the same product, computed through the
    layer's dequantized weight so that gradients reach its scales. ``cache``: the weight does
    not depend on a tuned tensor, so it is dequantized once."""

    def __init__(self, layer: QuantLinear, cache: bool):
        super().__init__()
        self.layer = layer
        self.cache = cache
        self._w: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., K) -> (..., N)
        lay = self.layer
        if self.cache:
            if self._w is None:
                with torch.no_grad():
                    self._w = lay.dequantized_weight()
            w = self._w
        else:
            w = lay.dequantized_weight()
        if lay.input_scale is not None:
            x = x / lay.input_scale.to(x.dtype)
        y = F.linear(x, w.to(device=x.device, dtype=x.dtype))
        return y if lay.bias is None else y + lay.bias.to(y.dtype)


def _scale_is_differentiable(layer: QuantLinear, name: str) -> bool:
    # whether the layer's dequantized weight carries a gradient back to buffer ``name``
    orig = layer._buffers[name]
    try:
        with torch.enable_grad():
            probe = orig.detach().float().requires_grad_(True)
            layer._buffers[name] = probe.to(orig.dtype)
            return bool(layer.dequantized_weight().requires_grad)
    except (RuntimeError, NotImplementedError):
        return False
    finally:
        layer._buffers[name] = orig


@dataclass
class TunableSet:
    """The tensors of ``root`` that move (see the module docstring), with their masters."""

    entries: list[Entry] = field(default_factory=list)
    # packed layer name -> (layer, whether its weight stays fixed and is dequantized once)
    layers: dict[str, tuple[QuantLinear, bool]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # scale buffers left alone, and why

    @classmethod
    @torch.no_grad()
    def collect(cls, root: nn.Module, params=("scales", "norms", "biases")) -> "TunableSet":
        """Every tensor of the kinds ``params`` under ``root``, in module order."""
        out = cls()
        for mname, mod in root.named_modules():
            if isinstance(mod, QuantLinear):
                weight_tuned = False
                if "scales" in params:
                    for b in SCALE_BUFFERS:
                        t = mod._buffers.get(b)
                        if t is None or not t.is_floating_point():
                            continue
                        if _scale_is_differentiable(mod, b):
                            out._add(mod, b, "scales", False, True)
                            weight_tuned = True
                        else:
                            out.skipped.append(f"{mname}.{b} ({type(mod).__name__} does not "
                                               "dequantize it differentiably)")
                    if mod._buffers.get(INPUT_SCALE) is not None:
                        out._add(mod, INPUT_SCALE, "scales", False, True)
                if "biases" in params and mod._buffers.get("bias") is not None:
                    out._add(mod, "bias", "biases", False, False)
                out.layers[mname] = (mod, not weight_tuned)
            elif "norms" in params and is_norm(mod):
                for pname, p in mod.named_parameters(recurse=False):
                    if p.is_floating_point():
                        out._add(mod, pname, "norms", True, False)
        return out

    def _add(self, mod, name, kind, is_param, multiplicative) -> None:
        t = mod._parameters[name] if is_param else mod._buffers[name]
        base = t.detach().float()
        theta = nn.Parameter(torch.zeros_like(base) if multiplicative else base.clone())
        self.entries.append(Entry(mod, name, kind, is_param, t, t.detach().clone(), theta,
                                  multiplicative, base if multiplicative else None))

    def parameters(self) -> list[nn.Parameter]:
        """The float32 masters, for the optimizer."""
        return [e.theta for e in self.entries]

    def counts(self) -> dict[str, int]:
        """Number of scalar values that move, per kind."""
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.kind] = out.get(e.kind, 0) + e.original.numel()
        return out

    @contextmanager
    def applied(self, root: nn.Module):
        """Context: ``root``'s packed layers replaced by differentiable stand-ins and every
        tuned tensor by its master's value; every other parameter of ``root`` stops asking
        for gradients. All is put back on exit, even on error; the stored tensors are not
        changed (:meth:`write_back` does that)."""
        frozen = [p for p in root.parameters() if p.requires_grad]
        swapped: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            for p in frozen:
                p.requires_grad_(False)
            for name, (layer, cache) in self.layers.items():
                parent_name, _, leaf = name.rpartition(".")
                parent = root.get_submodule(parent_name) if parent_name else root
                if not name:  # root itself is a packed layer: nothing to swap
                    continue
                swapped.append((parent, leaf, layer))
                setattr(parent, leaf, _Differentiable(layer, cache))
            yield _Feeder(self.entries)
        finally:
            for e in self.entries:
                _put(e, e.original)
            for parent, leaf, layer in reversed(swapped):
                setattr(parent, leaf, layer)
            for p in frozen:
                p.requires_grad_(True)

    @torch.no_grad()
    def write_back(self) -> None:
        """Store the masters' values (cast to each tensor's dtype) into the tensors in place."""
        for e in self.entries:
            e.original.copy_(e.value().detach())

    @torch.no_grad()
    def revert(self) -> None:
        """Put back the values from before tuning."""
        for e in self.entries:
            e.original.copy_(e.saved)


class _Feeder:
    """Handed out by :meth:`TunableSet.applied`: :meth:`refresh` puts the masters' current
    values (a new autograd graph) into the modules; call it before every forward."""

    def __init__(self, entries: list[Entry]):
        self.entries = entries

    def refresh(self) -> None:
        for e in self.entries:
            _put(e, e.value())


def _put(e: Entry, t: torch.Tensor) -> None:
    # bypass nn.Module.__setattr__, which refuses a plain tensor for a parameter slot
    if e.is_param:
        e.module._parameters[e.name] = t
    else:
        e.module._buffers[e.name] = t
