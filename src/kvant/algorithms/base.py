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

import torch

from kvant.calib.runner import BlockRunner
from kvant.config import MethodConfig
from kvant.core.hessian import HessianAccumulator, SharedGram
from kvant.core.result import LayerResult


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


class HessianLayer(LayerQuantizer):
    """A layer quantizer that accumulates its input Hessian in ``acc`` (None: it keeps no
    statistics), taking each input's ``xᵀx`` from the method's ``grams`` so that layers
    reading the same tensor share one matmul (GPTQ, QuIP, SpQR)."""

    acc: HessianAccumulator | None
    grams: SharedGram

    def observe(self, x: torch.Tensor) -> None:
        if self.acc is not None:
            self.acc.add_shared(x, self.grams)

    def state_for_reduce(self):
        return self.acc.state_for_reduce() if self.acc is not None else None

    def load_reduced(self, state, count) -> None:
        self.acc.load_reduced(state, count)


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

    # whether the method needs calibration data, declared by the class; a method for which
    # it depends on the config refines :meth:`calibrates` (read without building the method)
    needs_calibration: bool = False
    # its layer quantizers implement state_for_reduce / load_reduced (or keep no statistics)
    # and prepare_block needs no data: kvant.calib.dist may run it across several processes
    supports_distributed: bool = False
    # why the method cannot quantize the output head (config.quantize_head), or None when
    # its layer quantizers work on the head as on any Linear (kvant.calib.head)
    head_unsupported: str | None = None

    def __init__(self, config: MethodConfig):
        self.config = config
        self.needs_calibration = self.calibrates(config)
        # full layer name -> the config of that layer where it differs from ``config`` (a
        # mixed-precision plan, kvant.calib.mixed); set by the engine before any block
        self.layer_configs: dict[str, MethodConfig] = {}

    def config_for(self, name: str) -> MethodConfig:
        """The config that quantizes the Linear ``name`` (its full name): its entry in
        ``layer_configs`` (same method, other bits / group_size), else ``config``. Layer
        quantizers read their grid through it; block-level preparation (AWQ's scale search)
        uses ``config``."""
        return self.layer_configs.get(name, self.config)

    @classmethod
    def calibrates(cls, config: MethodConfig) -> bool:
        """Whether quantizing with ``config`` needs calibration data (default: the class's
        ``needs_calibration``)."""
        return cls.needs_calibration

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

    def least_stored_bits(self, n: int, k: int) -> int:
        """Stored bits of an (N, K) Linear quantized with ``config``, counted before any
        rounding (mixed precision refuses an impossible target with it): here a plain
        packed layer's (codes, float16 scales, packed zeros), exact for the grids and a
        lower bound for kinds that store more (sign vectors, outliers); a method whose
        layer kind stores less overrides it."""
        from kvant.nn.qlinear import QuantLinear

        return 8 * QuantLinear(k, n, self.config.bits, self.config.group_size).storage_bytes()
