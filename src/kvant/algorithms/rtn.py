"""RTN: round every weight to the nearest point of its grid; no calibration."""

from __future__ import annotations

import torch

from kvant.algorithms.base import LayerQuantizer, LayerResult, QuantMethod
from kvant.algorithms.gguf_round import gguf_rtn
from kvant.algorithms.registry import register
from kvant.config import RTNConfig
from kvant.core.grid import rtn


class _RTNLayer(LayerQuantizer):
    def __init__(self, name: str, weight: torch.Tensor, config: RTNConfig):
        self.name, self.weight, self.config = name, weight, config

    def quantize(self) -> LayerResult:
        if self.config.grid != "int":  # llama.cpp's block grid (kvant.algorithms.gguf_round)
            return gguf_rtn(self.weight, self.config, self.name)
        q, p = rtn(self.weight, self.config.qargs, self.name)
        s, z = p.expand(q.shape[1])
        deq = (q.float() - z) * s
        loss = float(((self.weight.float() - deq) ** 2).sum())
        return LayerResult(q, p.scales, p.zeros, self.config.bits, p.group_size, loss=loss)


@register(RTNConfig)
class RTN(QuantMethod):
    """Round-to-nearest; the baseline every table starts from."""

    needs_calibration = False
    supports_distributed = True  # no statistics; layers are rounded in parallel

    def layer_quantizer(self, name: str, weight: torch.Tensor) -> LayerQuantizer:
        return _RTNLayer(name, weight, self.config_for(name))
