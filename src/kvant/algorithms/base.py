"""The protocol between the engine and a quantization method.

A method is a :class:`QuantMethod` built from its config. For every Linear the engine asks
``method.layer_quantizer(name, weight)`` for a per-layer object, hands it the layer's
calibration inputs with ``observe(x)`` (only when ``needs_calibration``), then calls
``quantize()`` which returns a :class:`LayerResult`. A method never walks the model; methods
that must see a whole block (AWQ's scale search) override :meth:`QuantMethod.prepare_block`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kvant.config import MethodConfig


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
    layer_kind: which QuantLinear class stores it (kvant.nn.qlinear.register_kind).
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


class LayerQuantizer:
    """Per-layer state: accumulates statistics from inputs, then quantizes."""

    def observe(self, x: torch.Tensor) -> None:
        """Accumulate statistics of this layer's input ``x`` (..., K)."""

    def quantize(self) -> LayerResult:  # pragma: no cover - abstract
        """Return the quantized layer."""
        raise NotImplementedError


# runs the block on its calibration inputs and returns the outputs; see calib.engine
BlockRunner = Callable[[], list]


def block_relative(name: str, relative_names) -> str | None:
    """The longest of ``relative_names`` (names inside a block) that the full layer ``name``
    ends with, or None: how a layer_quantizer call finds what prepare_block recorded."""
    best = None
    for rel in relative_names:
        if (name == rel or name.endswith("." + rel)) and (best is None or len(rel) > len(best)):
            best = rel
    return best


class QuantMethod:
    """A quantization method: per-layer quantizers plus optional block-level preparation."""

    needs_calibration: bool = False

    def __init__(self, config: MethodConfig):
        self.config = config

    def prepare_block(self, block: torch.nn.Module, linears: dict[str, torch.nn.Module],
                      groups: list[list[str]], block_inputs, run_block) -> dict:
        """Optional hook before the block's layers are quantized (e.g. scale search).

        linears: name -> Linear inside the block; groups: names of Linears that read the
        same input, in execution order; block_inputs / run_block: see calib.engine.
        Returns a dict of report entries (may be empty).
        """
        return {}

    def layer_quantizer(self, name: str, weight: torch.Tensor) -> LayerQuantizer:
        """A fresh quantizer for the Linear ``name`` with weight (N, K) (float32 copy)."""
        raise NotImplementedError
