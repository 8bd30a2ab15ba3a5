"""Mixed precision to a target size: what the user asks for (:class:`MixedConfig`) and what
the allocator chose (:class:`MixedPlan`, saved in the checkpoint as
``quantization_config["mixed_plan"]``).

The budget is the average number of *stored* bits per quantized weight, every overhead
counted (packed codes, scales, zero points, g_idx, method extras such as QuIP's sign vectors),
weighted by layer size: ``sum_l 8 * storage_bytes_l / sum_l N_l * K_l``, the number
:func:`kvant.eval.table.quantized_bits_per_weight` reports for the finished model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from kvant.config import VALID_BITS, ConfigError, MethodConfig

# "fisher" ranks layers like "kl" (Spearman 0.96 on the embedded nanoGPT, asserted in
# tests/calib/test_mixed.py); the unweighted output error ||(W - Ŵ)X||² does not (about -0.1
# there: a layer's error says little about what it costs downstream), so it is not offered
SENSITIVITIES = ("fisher", "kl")


@dataclass(frozen=True)
class MixedConfig:
    """Pick each layer's width so that the model meets ``target_bpw`` with the least
    predicted loss (kvant.calib.mixed).

    target_bpw: the average stored bits per quantized weight to stay at or under.
    widths: candidate bit widths of every layer (each of 2, 3, 4, 8); () (the default) =
        every width each candidate method stores (quipsharp: 2, 3, 4; the grids: 2, 3, 4, 8).
    group_sizes: candidate group sizes; () = each method's own group size only.
    methods: other methods a layer may take besides the config's own (e.g. ("gptq",) beside
        quipsharp), each with its default config at each candidate width it accepts
        (kvant.calib.candidates); () = the config's method only.
    sensitivity: how a candidate's cost to the model is predicted:
        "fisher" (default): the layer's output error ``sum_n f_n ((W - Ŵ) H (W - Ŵ)ᵀ)_nn``,
            each output channel n weighted by the empirical Fisher ``f_n`` (mean squared
            gradient of the calibration loss with respect to that output) from one
            forward/backward pass of the float model: a second-order estimate of the loss
            increase. Needs the whole model on the device once.
        "kl": the real measure, the KL of the float model's next-token distribution to the
            model with only this layer quantized, on the calibration tokens: one full
            forward per layer and candidate (for small models and for checking proxies).
    """

    version: ClassVar[int] = 1

    target_bpw: float = 3.0
    widths: tuple[int, ...] = ()
    group_sizes: tuple[int, ...] = ()
    sensitivity: str = "fisher"
    methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        t = self.target_bpw
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
                or t <= 0:
            raise ConfigError(f"target_bpw must be a positive number of bits per weight, "
                              f"got {t!r}")
        object.__setattr__(self, "target_bpw", float(t))
        widths = tuple(self.widths) if isinstance(self.widths, (list, tuple)) else None
        if widths is None or any(type(b) is not int or b not in VALID_BITS for b in widths):
            raise ConfigError(f"widths must be a list of bit widths from "
                              f"{VALID_BITS}, got {self.widths!r}")
        object.__setattr__(self, "widths", tuple(sorted(set(widths))))
        gs = tuple(self.group_sizes) if isinstance(self.group_sizes, (list, tuple)) else None
        if gs is None or any(type(g) is not int or g < -1 for g in gs):
            raise ConfigError(f"group_sizes must be a list of group sizes (-1 per channel, "
                              f"0 per tensor, or positive), got {self.group_sizes!r}")
        object.__setattr__(self, "group_sizes", tuple(sorted(set(gs))))
        ms = tuple(self.methods) if isinstance(self.methods, (list, tuple)) else None
        if ms is None or any(not isinstance(m, str) or not m for m in ms):
            raise ConfigError(f"methods must be a list of method names, got {self.methods!r}")
        object.__setattr__(self, "methods", tuple(dict.fromkeys(ms)))
        if self.sensitivity not in SENSITIVITIES:
            raise ConfigError(f"sensitivity must be one of {SENSITIVITIES}, "
                              f"got {self.sensitivity!r}")

    def candidates(self, config: MethodConfig) -> dict:
        """Every candidate a layer may take: (method, bits, group_size) -> its config
        (kvant.calib.candidates.candidate_configs)."""
        from kvant.calib.candidates import candidate_configs

        return candidate_configs(config, self)

    def to_dict(self) -> dict:
        """JSON-ready dict with ``version``."""
        d = dataclasses.asdict(self)
        d.update(widths=list(self.widths), group_sizes=list(self.group_sizes),
                 methods=list(self.methods))
        return {"version": self.version, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "MixedConfig":
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        d = dict(d)
        version = d.pop("version", cls.version)
        if version != cls.version:
            raise ConfigError(f"MixedConfig version {version!r} is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown MixedConfig keys: {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class LayerChoice:
    """One layer's chosen candidate: its method and grid, its exact stored size and
    predicted loss."""

    bits: int
    group_size: int
    stored_bits: int      # 8 * storage_bytes of the packed layer at this choice
    weights: int          # N * K
    predicted_loss: float  # the sensitivity measure at this choice
    method: str = ""      # "" (plans written before methods could mix): the run's method

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of this layer."""
        return self.stored_bits / self.weights


@dataclass(frozen=True)
class MixedPlan:
    """The per-layer widths chosen for a target size (full layer name -> choice).

    ``predicted_bpw`` is the exact stored bits per weight of the plan (the sizes were
    measured on the packed candidates); ``achieved_bpw`` is filled in from the packed
    model once it is quantized (equal unless a method's stored size depends on the data).
    """

    version: ClassVar[int] = 1

    mixed: MixedConfig
    layers: dict[str, LayerChoice] = field(default_factory=dict)
    achieved_bpw: float | None = None
    measure_seconds: float = 0.0

    @property
    def predicted_bpw(self) -> float:
        """Stored bits per weight of the plan, weighted by layer size."""
        w = sum(c.weights for c in self.layers.values())
        return sum(c.stored_bits for c in self.layers.values()) / w if w else 0.0

    @property
    def predicted_loss(self) -> float:
        """Sum of the chosen candidates' sensitivity measures."""
        return sum(c.predicted_loss for c in self.layers.values())

    def histogram(self) -> dict[str, float]:
        """Share of the quantized weights at each (bits, group) choice, e.g. {"3b g128": 0.6}."""
        total = sum(c.weights for c in self.layers.values()) or 1
        out: dict[str, float] = {}
        for c in self.layers.values():
            key = f"{c.method + ' ' if c.method else ''}{c.bits}b g{c.group_size}"
            out[key] = out.get(key, 0.0) + c.weights / total
        return dict(sorted(out.items()))

    def lines(self) -> list[str]:
        """A human-readable description: the totals, then one line per layer."""
        ach = "" if self.achieved_bpw is None else f", achieved {self.achieved_bpw:.4f}"
        head = [f"mixed precision: target {self.mixed.target_bpw:.4f} bits/weight, plan "
                f"{self.predicted_bpw:.4f}{ach} ({self.mixed.sensitivity} sensitivity, "
                f"measured in {self.measure_seconds:.1f}s)",
                "  share of weights: " + ", ".join(f"{k} {100 * v:.1f}%"
                                                   for k, v in self.histogram().items())]
        return head + [f"  {name}: {c.method + ' ' if c.method else ''}{c.bits} bits "
                       f"g{c.group_size} "
                       f"({c.bits_per_weight:.3f} bits/weight stored)"
                       for name, c in self.layers.items()]

    def to_dict(self) -> dict:
        """JSON-ready form, stored in the checkpoint's quantization_config."""
        return {"version": self.version, "mixed": self.mixed.to_dict(),
                "achieved_bpw": self.achieved_bpw, "measure_seconds": self.measure_seconds,
                "predicted_bpw": self.predicted_bpw,
                "layers": {n: dataclasses.asdict(c) for n, c in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "MixedPlan":
        """Build from :meth:`to_dict` output (``predicted_bpw`` is recomputed)."""
        if not isinstance(d, dict) or d.get("version") != cls.version:
            raise ConfigError(f"mixed_plan version {d.get('version') if isinstance(d, dict) else d!r}"
                              " is not supported")
        try:
            layers = {n: LayerChoice(**c) for n, c in d["layers"].items()}
            return cls(MixedConfig.from_dict(d["mixed"]), layers, d.get("achieved_bpw"),
                       float(d.get("measure_seconds", 0.0)))
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"mixed_plan is malformed: {e}") from None

    def with_achieved(self, bpw: float) -> "MixedPlan":
        """A copy recording the packed model's stored bits per weight."""
        return dataclasses.replace(self, achieved_bpw=bpw)

    def layer_configs(self, config: MethodConfig) -> dict[str, MethodConfig]:
        """Full layer name -> its config: ``config`` with that layer's bits and group size,
        or the layer's own method's default config at them
        (kvant.calib.candidates.candidate_config)."""
        from kvant.calib.candidates import candidate_config

        cache: dict[tuple[str, int, int], MethodConfig] = {}
        out = {}
        for name, c in self.layers.items():
            key = (c.method or config.method, c.bits, c.group_size)
            if key not in cache:
                cache[key] = candidate_config(config, *key)
            out[name] = cache[key]
        return out

    def build_method(self, config: MethodConfig):
        """The method that quantizes a model along this plan (kvant.calib.planned)."""
        from kvant.calib.planned import PlannedMethod

        return PlannedMethod(config, self.layer_configs(config))
