"""The configuration of the ``quipsharp`` method (E8P lattice codes in QuIP's rotated basis);
re-exported by :mod:`kvant.config` beside the other methods' configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvant.config import ConfigError, WalkConfig, check_seed_and_rounding


@dataclass(frozen=True)
class QuIPSharpConfig(WalkConfig):
    """QuIP# (Tseng et al., 2024) without fine-tuning: QuIP's randomized Hadamard rotation,
    then the E8P lattice codebook (kvant.core.e8p) on groups of 8 rotated weights of a row,
    rounded with block LDLQ; ``y = Uᵀ Q(W̃) V x`` (kvant.algorithms.quipsharp).

    bits: 2 (one E8P code per 8 weights), 3 (plus a 1-bit E8P residual stage) or 4 (plus a
        second E8P stage): residual vector quantization, each stage with its own scale.
    group_size: must stay -1: the scale is per output row or per layer (``scale``).
    scale: "row" (one float16 scale per rotated output row and stage) or "layer" (one per
        stage, as QuIP#).
    seed: derives the per-layer sign vectors (with the layer name), as QuIP's.
    rounding: "ldlq" (block LDLQ: GPTQ's walk over blocks of 8 columns, each block rounded
        jointly and its error fed back through the inverse Hessian) or "rtn" (nearest code,
        no feedback; needs no calibration).
    scale_search: with "ldlq", search a common factor on the scales fitted to nearest
        rounding by the walk's proxy loss (a few walks per layer); False keeps them.
    damp_percent, block_size (lazy-batch columns, a multiple of 8), true_sequential:
        :class:`WalkConfig`; act_order is not supported.
    """

    method: ClassVar[str] = "quipsharp"

    bits: int = 2
    group_size: int = -1
    scale: str = "row"
    seed: int = 0
    rounding: str = "ldlq"
    scale_search: bool = True

    def validate(self) -> None:
        if self.bits not in (2, 3, 4):
            raise ConfigError(f"quipsharp stores 2, 3 or 4 bits per weight, got {self.bits!r}")
        if self.group_size != -1:
            raise ConfigError(f"quipsharp scales whole rows or the whole layer (scale=...); "
                              f"group_size must be -1, got {self.group_size!r}")
        if self.scale not in ("row", "layer"):
            raise ConfigError(f"scale must be 'row' or 'layer', got {self.scale!r}")
        check_seed_and_rounding(self)
        if not isinstance(self.scale_search, bool):
            raise ConfigError(f"scale_search must be a bool, got {self.scale_search!r}")
        if self.block_size % 8:
            raise ConfigError(f"block_size must be a multiple of 8 (the codebook's dimension), "
                              f"got {self.block_size!r}")
        for name in ("act_order", "sym", "clip"):
            if getattr(self, name):
                raise ConfigError(f"{name}=True does not apply to quipsharp (a lattice "
                                  "codebook, walked in column order)")
