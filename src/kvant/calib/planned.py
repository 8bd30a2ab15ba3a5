"""The method a mixed-precision plan quantizes with: each layer by its own planned method.

A plan (kvant.calib.plan.MixedPlan) may give layers different widths of one method, or
different methods (quipsharp codes for most layers, an 8-bit grid for a sensitive one). The
engine holds one :class:`kvant.algorithms.base.QuantMethod`; :class:`PlannedMethod` is that
method: it builds one method per name in the plan, hands each its own layers' configs, and
passes every layer quantizer request to the method of that layer. Layers the plan does not
name (the output head) go to the run's own method.
"""

from __future__ import annotations

import torch

from kvant.algorithms.base import LayerQuantizer, QuantMethod
from kvant.algorithms.registry import build
from kvant.config import MethodConfig


class PlannedMethod(QuantMethod):
    """One method per method name of the plan; layer ``name`` goes to the method of
    ``layer_configs[name]`` (else the run's own ``config``)."""

    def __init__(self, config: MethodConfig, layer_configs: dict[str, MethodConfig]):
        self.parts: dict[str, QuantMethod] = {config.method: build(config)}
        for cfg in layer_configs.values():
            if cfg.method not in self.parts:
                self.parts[cfg.method] = build(cfg)
        super().__init__(config)  # reads calibrates(): needs the parts
        self.layer_configs = dict(layer_configs)
        for method, part in self.parts.items():
            part.layer_configs = {n: c for n, c in layer_configs.items() if c.method == method}
        own = self.parts[config.method]
        self.head_unsupported = own.head_unsupported  # the head is quantized by the own method
        self.supports_distributed = all(p.supports_distributed for p in self.parts.values())

    def calibrates(self, config: MethodConfig) -> bool:  # an instance method: needs the parts
        """Whether any of the plan's methods needs calibration data."""
        return any(p.needs_calibration for p in self.parts.values())

    def _part(self, name: str) -> QuantMethod:
        return self.parts[self.config_for(name).method]

    def check_model(self, model: torch.nn.Module, blocks, ignore) -> None:
        """Every method's own check."""
        for part in self.parts.values():
            part.check_model(model, blocks, ignore)

    def prepare_block(self, block, linears, groups, block_inputs, run_block) -> dict:
        """Every method's block preparation, in plan order (QuIP#'s record of which layers
        share an input; AWQ's scale search, which rescales the whole block at its own width
        whichever method then rounds a layer); their report entries merged."""
        out: dict = {}
        for part in self.parts.values():
            if part.needs_calibration:
                out.update(part.prepare_block(block, linears, groups, block_inputs, run_block))
        return out

    def layer_quantizer(self, name: str, weight: torch.Tensor) -> LayerQuantizer:
        """The quantizer of ``name``'s own method (it reads its planned config itself)."""
        return self._part(name).layer_quantizer(name, weight)
