"""The protocol between the engine and a quantization method.

A method is a :class:`QuantMethod` built from its config. For every Linear the engine asks
``method.layer_quantizer(name, weight)`` for a per-layer object, hands it the layer's
calibration inputs with ``observe(x)`` (only when ``needs_calibration``), then calls
``quantize()`` which returns a :class:`LayerResult`. A method never walks the model; methods
that must see a whole block (AWQ's scale search) override :meth:`QuantMethod.prepare_block`
and run, hook and probe the block only through the engine's
:class:`kvant.calib.runner.BlockRunner`; :meth:`QuantMethod.check_model` refuses a model
before any block is changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvant.calib.runner import BlockRunner
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

    def state_for_reduce(self) -> tuple[dict[str, torch.Tensor], int] | None:
        """The statistics accumulated so far, for a reduction across processes
        (kvant.calib.dist): ``(tensors, count)`` where every tensor is a mean over ``count``
        observed rows, or None when the layer keeps none (RTN). The tensors may be modified
        in place by the reduction."""
        return None

    def load_reduced(self, state: dict[str, torch.Tensor], count: int) -> None:
        """Replace the statistics by ``state``, the means over all ``count`` rows every
        process observed (the keys of :meth:`state_for_reduce`)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no statistics to load")


def as_runner(block: torch.nn.Module, block_inputs, run_block) -> BlockRunner:
    """The :class:`BlockRunner` a ``prepare_block`` call was given; a plain function
    ``run_block(block, inputs)`` (the older protocol) gets a runner over ``block_inputs``
    with no block prefix."""
    if isinstance(run_block, BlockRunner):
        return run_block
    return BlockRunner(block, block_inputs)


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
    # its layer quantizers implement state_for_reduce / load_reduced (or keep no statistics)
    # and prepare_block needs no data: kvant.calib.dist may run it across several processes
    supports_distributed: bool = False

    def __init__(self, config: MethodConfig):
        self.config = config

    def check_model(self, model: torch.nn.Module, blocks, ignore) -> None:
        """Optional check, run by the engine once before any block is changed: raise a
        ValueError naming what this method cannot handle in ``model`` (``blocks``: its
        decoder blocks; ``ignore``: the config's ignore patterns). Default: accept."""

    def prepare_block(self, block: torch.nn.Module, linears: dict[str, torch.nn.Module],
                      groups: list[list[str]], block_inputs, run_block) -> dict:
        """Optional hook before the block's layers are quantized (e.g. scale search).

        linears: name -> Linear inside the block; groups: names of Linears that read the
        same input, in execution order; block_inputs: the block's calibration calls;
        run_block: the engine's :class:`kvant.calib.runner.BlockRunner` over them (which
        also carries the block's name prefix): a method runs, hooks and probes the block
        only through it (:func:`as_runner` accepts the older plain function too).
        Returns a dict of report entries (may be empty).
        """
        return {}

    def layer_quantizer(self, name: str, weight: torch.Tensor) -> LayerQuantizer:
        """A fresh quantizer for the Linear ``name`` with weight (N, K) (float32 copy)."""
        raise NotImplementedError
