"""Typed, frozen, versioned configurations.

Every method has one config class. All share the grid fields of :class:`QuantArgs`
(``bits``, ``group_size``, ``sym``, ``clip``) and add their own knobs. ``to_dict`` writes the
method name and the config version; ``from_dict`` rejects unknown keys and validation errors
name the field and the bad value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from kvant.errors import InputError

VALID_BITS = (2, 3, 4, 8)


class ConfigError(InputError):
    """A configuration field holds an invalid value, or a dict holds an unknown key."""


def _check_floats(cfg: Any, inf_ok: tuple[str, ...] = ()) -> None:
    # a NaN compares False with every bound, so range checks written as `not lo < x < hi`
    # catch it but `x <= 0` does not: refuse non-finite numbers once, for every field
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            if math.isinf(v) and v > 0 and f.name in inf_ok:
                continue
            raise ConfigError(f"{f.name} must be a finite number, got {v!r}")


def _as_patterns(ignore: Any) -> tuple[str, ...]:
    """``ignore`` as a tuple of patterns: a string is one pattern (never its characters)."""
    if isinstance(ignore, str):
        ignore = (ignore,)
    if not isinstance(ignore, (list, tuple)) or not all(isinstance(s, str) and s
                                                        for s in ignore):
        raise ConfigError(f"ignore must be a module name or a list of module names, "
                          f"got {ignore!r}")
    return tuple(ignore)


@dataclass(frozen=True)
class QuantArgs:
    """The integer grid of weights.

    bits: 2, 3, 4 or 8.
    group_size: -1 one scale per output channel, 0 one scale for the whole tensor, or a
        positive group of consecutive input columns (32, 64, 128, ...).
    sym: symmetric grid (zero point fixed at 2**(bits-1), zero exactly representable) or
        asymmetric min-max grid with an integer zero point.
    clip: search a shrink factor of the range per row/group that minimises the
        quantization error (GPTQ's ``mse`` option) instead of plain min-max.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    clip: bool = False

    def __post_init__(self) -> None:
        _validate_grid(self)


def _validate_grid(cfg: Any) -> None:
    if not isinstance(cfg.bits, int) or isinstance(cfg.bits, bool) or cfg.bits not in VALID_BITS:
        raise ConfigError(f"bits must be one of {VALID_BITS}, got {cfg.bits!r}")
    gs = cfg.group_size
    if not isinstance(gs, int) or isinstance(gs, bool) or gs < -1:
        raise ConfigError(
            f"group_size must be -1 (per channel), 0 (per tensor) or a positive int, got {gs!r}")
    for name in ("sym", "clip"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be a bool, got {getattr(cfg, name)!r}")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config: the grid fields plus modules to leave in float.

    ignore: module names (exact, or ending in ``.name``) that stay unquantized; one string
        is one name. Quantizing fails when a name matches no layer of the model.
    quantize_head: also quantize the output head (lm_head), with the same grid, after the
        decoder blocks (kvant.calib.head); off by default, as in most tools, because the
        head is the layer most sensitive to rounding.
    grid: "int" (kvant's integer grid of ``bits`` / ``group_size`` / ``sym``) or
        "gguf:TYPE" (TYPE one of Q4_0, Q4_1, Q8_0, Q4_K, Q3_K, Q2_K, Q6_K): round directly on
        llama.cpp's block grid of that type (kvant.core.gguf_grid), so that the GGUF export
        holds exactly the quantized weights; ``bits`` and ``group_size`` then become the
        type's (a conflicting value is an error) and ``sym`` / ``clip`` do not apply.
    gguf_mix: a GGUF grid's per-tensor types, llama.cpp's with ("imatrix") or without
        ("plain") an importance matrix; "auto": kvant.config_gguf.uses_imatrix_mix.
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    clip: bool = False
    ignore: tuple[str, ...] = ()
    quantize_head: bool = False
    grid: str = "int"
    gguf_mix: str = "auto"

    # float fields for which +inf is a documented value (e.g. "inf disables it")
    inf_fields: ClassVar[tuple[str, ...]] = ()
    # calibrate a block's Linears in order (WalkConfig's); a field where a method offers it
    true_sequential: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if check_gguf_grid(self) is None:
            _validate_grid(self)
        object.__setattr__(self, "ignore", _as_patterns(self.ignore))
        if not isinstance(self.quantize_head, bool):
            raise ConfigError(f"quantize_head must be a bool, got {self.quantize_head!r}")
        _check_floats(self, self.inf_fields)
        if isinstance(self, WalkConfig):
            _check_walk(self)
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; subclasses raise :class:`ConfigError` naming the field."""

    @property
    def qargs(self) -> QuantArgs:
        """The grid part of this config. On a GGUF grid: an integer grid close to the type's
        (its bits, or 8 above 4, per sub-block), for methods that search on a grid (AWQ's
        scales and clipping) before the final rounding on the GGUF grid."""
        if self.grid != "int":
            from kvant.core.gguf_grid import gguf_type

            t = gguf_type(self.grid.split(":", 1)[1])
            return QuantArgs(t.bits if t.bits in VALID_BITS else 8, t.sub, not t.has_min)
        return QuantArgs(self.bits, self.group_size, self.sym, self.clip)

    def to_dict(self) -> dict:
        """JSON-ready dict with ``method`` and ``version``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["ignore"] = list(self.ignore)
        return {"method": self.method, "version": self.version, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "MethodConfig":
        """Build from :meth:`to_dict` output; unknown keys or a wrong method are errors."""
        d = dict(d)
        method = d.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}")
        version = d.pop("version", cls.version)
        if version != cls.version:
            raise ConfigError(f"{cls.__name__} version {version!r} is not supported "
                              f"(this kvant reads version {cls.version})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys: {unknown}; known: {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    """Round-to-nearest on the grid; needs no calibration data.

    ``RTNConfig(bits=b, group_size=0, sym=True)`` is the seed's naive rounding: one absmax
    scale for the whole tensor.
    """

    method: ClassVar[str] = "rtn"


@dataclass(frozen=True)
class WalkConfig(MethodConfig):
    """Base of the methods that can round with GPTQ's column walk: its knobs, checked once.

    damp_percent: damping added to diag(H), as a fraction of its mean, in (0, 1).
    block_size: columns per lazy-batch block.
    act_order: quantize columns in order of decreasing diag(H); stores ``g_idx``.
    true_sequential: calibrate a block's Linears in order, later ones on quantized earlier ones.
    sink_weight: how many times the first token of every calibration window counts in the
        layer Hessians (>= 1; kvant.core.hessian.sink_gram says why it matters).
    sink_max_share: the most of a layer's Hessian trace the weighted first tokens may take,
        in (0, 1]; where they already hold more, their weight stays 1 (docs/METHODS.md).
    """

    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False
    true_sequential: bool = True
    sink_weight: float = 1.0
    sink_max_share: float = 0.2


def _check_walk(cfg: WalkConfig) -> None:
    if not 0 < cfg.damp_percent < 1:
        raise ConfigError(f"damp_percent must be in (0, 1), got {cfg.damp_percent!r}")
    if type(cfg.block_size) is not int or cfg.block_size <= 0:  # noqa: E721 (bool is no size)
        raise ConfigError(f"block_size must be a positive int, got {cfg.block_size!r}")
    w = cfg.sink_weight  # non-finite floats were refused by _check_floats
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 1:
        raise ConfigError(f"sink_weight must be a finite number >= 1, got {w!r}")
    s = cfg.sink_max_share
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
        raise ConfigError(f"sink_max_share must be a number in (0, 1], got {s!r}")
    for name in ("act_order", "true_sequential", "static_groups"):
        if not isinstance(getattr(cfg, name, False), bool):
            raise ConfigError(f"{name} must be a bool, got {getattr(cfg, name)!r}")


@dataclass(frozen=True)
class GPTQConfig(WalkConfig):
    """GPTQ (Frantar et al., 2023): column-wise rounding with inverse-Hessian correction.

    damp_percent, block_size, act_order, true_sequential: see :class:`WalkConfig`.
    static_groups: with act_order, fix the group grids before reordering.
    hessian_dtype: "float32" or "float64" accumulation.
    """

    method: ClassVar[str] = "gptq"

    static_groups: bool = False
    hessian_dtype: str = "float32"

    def validate(self) -> None:
        if self.hessian_dtype not in ("float32", "float64"):
            raise ConfigError(f"hessian_dtype must be 'float32' or 'float64', "
                              f"got {self.hessian_dtype!r}")
        if self.group_size == 0:
            raise ConfigError("group_size=0 (one scale per tensor) is not supported by GPTQ; "
                              "use -1 (per channel) or a positive group")


@dataclass(frozen=True)
class SpQRConfig(WalkConfig):
    """SpQR (Dettmers et al., 2024): small groups, quantized statistics, fp16 outliers.

    bits / group_size: the dense grid (asymmetric min-max), groups of input columns.
    stat_bits: bits of the second-level quantization of every group's scale and zero, in
        groups of ``stat_group_size`` output rows (each such group keeps an fp16 base and
        step); 16 stores plain fp16 scales and integer zeros (the ordinary GPTQ/RTN grid).
    outlier_threshold: the paper's relative threshold ``tau``: a weight stays in fp16 when
        keeping it lowers the layer's inverse-Hessian-weighted error by more than
        ``tau * mean_j(Var(W[:, j]) / d_j^2)``; ``inf`` disables it. Only with base="gptq"
        and outlier_budget == 0.
    outlier_budget: when > 0, keep exactly this fraction of each layer's weights in fp16,
        chosen up front by the same sensitivity score; works with any base (this is the
        separable "outlier budget" path; outlier_threshold is then not used).
    base: the rounding of the dense part: "gptq" (column walk with error feedback) or
        "rtn" (round to nearest).
    act_order (default True here), damp_percent, block_size, true_sequential: WalkConfig's.
    """

    method: ClassVar[str] = "spqr"
    inf_fields: ClassVar[tuple[str, ...]] = ("outlier_threshold",)

    bits: int = 3
    group_size: int = 16
    stat_bits: int = 3
    stat_group_size: int = 16
    outlier_threshold: float = 0.2
    outlier_budget: float = 0.0
    base: str = "gptq"
    act_order: bool = True

    def validate(self) -> None:
        if self.stat_bits not in VALID_BITS + (16,):
            raise ConfigError(f"stat_bits must be one of {VALID_BITS + (16,)}, "
                              f"got {self.stat_bits!r}")
        if not isinstance(self.stat_group_size, int) or self.stat_group_size <= 0:
            raise ConfigError(f"stat_group_size must be a positive int, "
                              f"got {self.stat_group_size!r}")
        if not isinstance(self.outlier_threshold, (int, float)) or self.outlier_threshold <= 0:
            raise ConfigError(f"outlier_threshold must be > 0 (inf disables it), "
                              f"got {self.outlier_threshold!r}")
        if not isinstance(self.outlier_budget, (int, float)) or not 0 <= self.outlier_budget < 0.5:
            raise ConfigError(f"outlier_budget must be a fraction in [0, 0.5), "
                              f"got {self.outlier_budget!r}")
        if self.base not in ("gptq", "rtn"):
            raise ConfigError(f"base must be 'gptq' or 'rtn', got {self.base!r}")
        if self.group_size <= 0:
            raise ConfigError(f"SpQR needs groups of input columns (group_size > 0, e.g. 16), "
                              f"got {self.group_size!r}")
        if self.sym or self.clip:
            raise ConfigError("SpQR uses the plain asymmetric min-max grid; "
                              "sym=True and clip=True are not supported")


def check_seed_and_rounding(cfg: Any) -> None:
    """The fields QuIP and QuIP# share: ``seed`` (of the sign vectors) and ``rounding``."""
    if cfg.rounding not in ("ldlq", "rtn"):
        raise ConfigError(f"rounding must be 'ldlq' or 'rtn', got {cfg.rounding!r}")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {cfg.seed!r}")


@dataclass(frozen=True)
class QuIPConfig(WalkConfig):
    """QuIP (Chee et al., 2023) with QuIP#'s randomized Hadamard transforms: round
    ``W̃ = U W Vᵀ`` against ``H̃ = V H Vᵀ``, and run ``y = Uᵀ Q(W̃) V x``.

    seed: derives the per-layer sign vectors (with the layer name).
    rounding: "ldlq" (GPTQ's update in the rotated basis = QuIP's LDLQ) or "rtn" (rotation
        then round-to-nearest; needs no calibration unless ``rescale``).
    rescale: QuIP's diagonal rescaling ``W ← W D``, ``H ← D⁻¹ H D⁻¹`` with
        ``D = (diag(H) / diag(WᵀW))^(1/4)`` before the rotation; stores D (K,) per layer.
    damp_percent, block_size, act_order, true_sequential: see :class:`WalkConfig`.
    """

    method: ClassVar[str] = "quip"

    seed: int = 0
    rounding: str = "ldlq"
    rescale: bool = False

    def validate(self) -> None:
        check_seed_and_rounding(self)
        if not isinstance(self.rescale, bool):
            raise ConfigError(f"rescale must be a bool, got {self.rescale!r}")
        if self.act_order and self.rounding != "ldlq":
            raise ConfigError("act_order needs rounding='ldlq'")
        if self.group_size == 0 and self.rounding == "ldlq":
            raise ConfigError("group_size=0 (one scale per tensor) is not supported with "
                              "rounding='ldlq'; use -1 (per channel) or a positive group")


# imported last, as they need the names above: the GGUF grid check, the AWQ and quipsharp
# configs and the engine's options (kvant.options), re-exported here
from kvant.config_awq import AWQConfig  # noqa: E402,F401
from kvant.config_gguf import check_gguf_grid  # noqa: E402
from kvant.config_quipsharp import QuIPSharpConfig  # noqa: E402,F401
from kvant.options import EngineOptions, check_device  # noqa: E402,F401
