"""The configuration of the ``awq`` method; re-exported by :mod:`kvant.config` beside the
other methods' configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvant.config import ConfigError, WalkConfig


@dataclass(frozen=True)
class AWQConfig(WalkConfig):
    """AWQ (Lin et al., 2024): activation-aware per-input-channel scaling, then rounding.

    n_grid: grid points of the exponent alpha in [0, 1) of ``s = act_mean**alpha``.
    duo_scaling: AutoAWQ's ``s = act_mean**alpha / w_mean**(1 - alpha)``.
    clip_search: search a per-group weight-range shrink minimising each Linear's output error;
        None (default): on for kvant's integer grid, off on a GGUF grid (``grid="gguf:..."``),
        where the shrink is fitted for min-max rounding on an integer grid near the type but
        then only takes range from the block fit that rounds afterwards (llama.cpp's own
        perplexity, SmolLM2, AWQ+GPTQ: Q4_0 22.98 with it, 22.61 without; Q3_K 27.81 / 24.09;
        benchmarks/results/gguf_quality.md). :attr:`clips` is the resolved choice.
    clip_grid, clip_max_shrink: shrink factors ``1 - i/clip_grid`` down to ``1 - clip_max_shrink``.
    clip_tokens: calibration tokens sampled per Linear for the clip search.
    rounding: "rtn" (AWQ) or "gptq" (AWQ scales, then GPTQ rounding of the scaled weights).
    gptq_rescore: with rounding="gptq", the scale search's this many best alphas (scored with
        RTN on an integer grid near the layer's) and alpha = 0 are scored again with the GPTQ
        rounding that follows, on the layer's own grid, and the best of them is kept (each
        costs one GPTQ of the group's Linears); 0: keep the RTN choice. On SmolLM2 Q4_0 the
        RTN choice rounded worse than GPTQ alone (benchmarks/results/gguf_quality.md).
    damp_percent, act_order, block_size, true_sequential: :class:`WalkConfig`, for GPTQ rounding.
    sink_weight, sink_max_share: :class:`WalkConfig`; they weight the first token of every
        calibration window in the scale search's loss too (same weight, same cap), so that
        the scales and a GPTQ rounding after them minimise the same objective.
    fold: fold 1/s into the preceding operation where the block allows it; False keeps every
        scale as the QuantLinear's ``input_scale``.
    scale_unfoldable: scale channels that no preceding operation can absorb too, keeping
        their scale as ``input_scale`` (default); False leaves them unscaled, as AutoAWQ does
        (e.g. o_proj under grouped-query attention), so every layer stays a plain
        QuantLinear that the GPTQ/AWQ exports (``kvant.export_quantized``) can hold.
    outlier_budget: when > 0, keep this fraction of each Linear's (scaled) weights in fp16 as
        CSR outliers, chosen by SpQR's sensitivity rule and left out of the grids (the
        separable outlier path of :mod:`kvant.algorithms.spqr`; layers become SpQRLinear with
        fp16 statistics). Outliers keep their values from before the clip search
        (benchmarks/results/archive/spqr_nanogpt.md compares clip_search on and off).
    """

    method: ClassVar[str] = "awq"

    n_grid: int = 20
    duo_scaling: bool = False
    clip_search: bool | None = None
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    rounding: str = "rtn"
    gptq_rescore: int = 2
    fold: bool = True
    scale_unfoldable: bool = True
    outlier_budget: float = 0.0

    def validate(self) -> None:
        b = self.outlier_budget
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0 <= b < 0.5:
            raise ConfigError(f"outlier_budget must be a fraction in [0, 0.5), "
                              f"got {self.outlier_budget!r}")
        if self.outlier_budget > 0 and self.group_size <= 0:
            raise ConfigError("outlier_budget needs a positive group_size (SpQR's grids are "
                              f"per group), got group_size={self.group_size}")
        for name in ("n_grid", "clip_grid", "clip_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if (not isinstance(self.gptq_rescore, int) or isinstance(self.gptq_rescore, bool)
                or self.gptq_rescore < 0):
            raise ConfigError(f"gptq_rescore must be an int >= 0, got {self.gptq_rescore!r}")
        if not 0 <= self.clip_max_shrink < 1:
            raise ConfigError(f"clip_max_shrink must be in [0, 1), got {self.clip_max_shrink!r}")
        if self.rounding not in ("rtn", "gptq"):
            raise ConfigError(f"rounding must be 'rtn' or 'gptq', got {self.rounding!r}")
        for name in ("duo_scaling", "fold", "scale_unfoldable"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.clip_search is not None and not isinstance(self.clip_search, bool):
            raise ConfigError(f"clip_search must be a bool or None (by grid), "
                              f"got {self.clip_search!r}")
        if not self.fold and not self.scale_unfoldable:
            raise ConfigError("fold=False with scale_unfoldable=False would scale nothing")
        if self.rounding == "gptq" and self.group_size == 0:
            raise ConfigError("rounding='gptq' does not support group_size=0 (one scale per "
                              "tensor); use -1 (per channel) or a positive group")

    @property
    def clips(self) -> bool:
        """Whether the clip search runs: ``clip_search``, or by grid when it is None."""
        return self.clip_search if self.clip_search is not None else self.grid == "int"
