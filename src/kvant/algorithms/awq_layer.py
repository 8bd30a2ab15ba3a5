"""How AWQ rounds one Linear once its block is prepared (kvant.algorithms.awq): the weight
arrives already scaled by ``s`` and clipped; it is rounded with RTN, GPTQ (on the Hessian of
the scaled inputs), llama.cpp's block grid, or with an fp16 outlier budget through SpQR's
separable path, and carries its ``input_scale`` where no previous op absorbed ``s``."""

from __future__ import annotations

import torch

from kvant.algorithms.base import LayerQuantizer, LayerResult
from kvant.config import AWQConfig
from kvant.core.grid import rtn
from kvant.core.outliers import OutlierRounding


class AWQUnsupportedError(ValueError):
    """A block whose structure AWQ cannot scale (the message names the layer)."""


def round_scaled(weight: torch.Tensor, H: torch.Tensor | None, config: AWQConfig,
                 name: str = "") -> LayerResult:
    """GPTQ of a scaled weight (N, K) with the Hessian ``H`` (K, K) of its scaled inputs, on
    the config's grid: llama.cpp's blocks for a GGUF grid (RTN there when ``H`` is None),
    else kvant's integer grid. GPTQ may change ``H`` in place (dead inputs)."""
    if config.grid != "int":  # llama.cpp's block grid (kvant.algorithms.gguf_round)
        from kvant.algorithms.gguf_round import round_layer

        return round_layer(weight, H, config, name)
    from kvant.algorithms.gptq import gptq_quantize

    return gptq_quantize(weight, H, config.qargs, block_size=config.block_size,
                         damp_percent=config.damp_percent, act_order=config.act_order,
                         layer=name)


class AWQLayer(LayerQuantizer):
    """Rounds one (already scaled and clipped) Linear with RTN or GPTQ."""

    def __init__(self, name: str, weight: torch.Tensor, config: AWQConfig,
                 input_scale: torch.Tensor | None, info: dict,
                 unclipped: torch.Tensor | None = None):
        self.name, self.weight, self.config = name, weight, config
        self.input_scale, self.info = input_scale, info
        self.unclipped = unclipped  # (N, K) scaled weight before the clip (outlier budget)
        self.acc = None
        if config.rounding == "gptq" or config.outlier_budget > 0:
            from kvant.core.hessian import HessianAccumulator
            self.acc = HessianAccumulator.for_config(weight.shape[1], weight.device, config)

    def observe(self, x: torch.Tensor) -> None:
        if self.acc is not None:
            self.acc.add(x)

    def quantize(self) -> LayerResult:
        cfg = self.config
        H = self.acc.result(self.name) if self.acc is not None else None
        self.acc = None
        if cfg.grid == "int" and cfg.outlier_budget > 0:
            res = self._with_outliers(H)
        elif H is not None or cfg.grid != "int":
            res = round_scaled(self.weight, H, cfg, self.name)
        else:
            q, p = rtn(self.weight, cfg.qargs, self.name)
            s, z = p.expand(q.shape[1])
            loss = float(((self.weight.float() - (q.float() - z) * s) ** 2).sum())
            res = LayerResult(q, p.scales, p.zeros, cfg.bits, p.group_size, loss=loss)
        if self.input_scale is not None:
            if self.input_scale.numel() != self.weight.shape[1]:  # never a raw shape error
                raise AWQUnsupportedError(
                    f"AWQ found an input scale of {self.input_scale.numel()} channels for layer "
                    f"{self.name!r} with {self.weight.shape[1]} inputs")
            res.extras["input_scale"] = self.input_scale
        res.info.update(self.info)
        return res

    def _with_outliers(self, H: torch.Tensor) -> LayerResult:
        """RTN or GPTQ rounding of the scaled weight with an fp16 outlier budget, through
        SpQR's separable path (fp16 statistics, AWQ's integer-zero grid)."""
        from kvant.algorithms.spqr import spqr_gptq, spqr_rtn

        cfg = self.config
        scfg = OutlierRounding(cfg.bits, cfg.group_size, cfg.outlier_budget,
                               act_order=cfg.act_order and cfg.rounding == "gptq",
                               damp_percent=cfg.damp_percent, block_size=cfg.block_size)
        res = (spqr_gptq if cfg.rounding == "gptq" else spqr_rtn)(self.weight, H, scfg, self.name)
        if self.unclipped is not None:
            # the clip shaped the dense grid; an outlier keeps its unclipped value
            ex, mask = res.extras, res.extras["outlier_mask"]
            d = self.unclipped.to(mask.device).float() - self.weight.to(mask.device).float()
            ex["outlier_vals"] = torch.where(mask, ex["outlier_vals"] + d,
                                             ex["outlier_vals"]).half().float()
        return res
