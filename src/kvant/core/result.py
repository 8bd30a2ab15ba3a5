"""What a quantization method hands to a packed layer: :class:`LayerResult`, and the registry
of packed layer kinds that store one.

Neutral ground between :mod:`kvant.algorithms` (which produce results) and :mod:`kvant.nn`
(whose QuantLinear classes register themselves here and pack results): neither needs to
import the other for these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LayerResult:
    """The quantized state of one Linear, before packing.

    qweight: (N, K) int32 in [0, 2**bits), the integer of weight[n, k].
    scales, zeros: (N, G) float32 scales and whole-number zero points; (1, 1) for one tensor
        scale. Weight[n, k] ~= (qweight[n, k] - zeros[n, g]) * scales[n, g], with
        g = g_idx[k] when g_idx is given, else k // group_size (or 0 per channel).
    g_idx: (K,) group of each input column (act-order), or None.
    extras: method tensors stored beside the grid (e.g. "input_scale" (K,), outliers);
        :class:`kvant.nn.qlinear.QuantLinear` documents which it understands.
    loss: the method's error proxy for this layer (e.g. GPTQ's sum (w-q)^2 / d^2).
    layer_kind: which QuantLinear class stores it (:func:`register_kind`).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    loss: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    layer_kind: str = "quant"


_KINDS: dict[str, type] = {}


def register_kind(cls: type) -> type:
    """Class decorator: make a QuantLinear subclass loadable by its ``kind`` string."""
    _KINDS[cls.kind] = cls
    return cls


def quant_linear_class(kind: str) -> type:
    """The QuantLinear class stored under ``kind`` (``LayerResult.layer_kind``)."""
    if kind not in _KINDS:
        import kvant.algorithms.registry as reg  # importing methods registers their layers

        reg.available()
    if kind not in _KINDS:
        raise ValueError(f"unknown quantized layer kind {kind!r}; known: {sorted(_KINDS)}")
    return _KINDS[kind]


def dense_weight(res: LayerResult) -> torch.Tensor:
    """The float32 (N, K) weight a result of kind "quant" or "gguf" dequantizes to, before any
    input scale (a packed "quant" layer keeps its scales in fp16: equal within that rounding)."""
    q = res.qweight.long()
    if res.layer_kind == "gguf":  # w = a * level(code) + b per sub-block of the type
        from kvant.core.gguf_grid import gguf_type

        t = gguf_type(res.extras["gguf_type"])
        a = res.scales.float().repeat_interleave(t.sub, 1)
        b = res.zeros.float().repeat_interleave(t.sub, 1)
        return a * t.levels(q.device)[q] + b
    if res.layer_kind != "quant":
        raise ValueError(f"dense_weight reads results of kind 'quant' or 'gguf', "
                         f"not {res.layer_kind!r}")
    from kvant.core.grid import GridParams, dequantize

    params = GridParams(res.scales.float(), res.zeros.float(), res.group_size)
    s, z = params.expand(q.shape[1], res.g_idx)
    return dequantize(q.float(), s, z).expand(q.shape)
