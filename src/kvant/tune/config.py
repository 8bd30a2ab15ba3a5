"""TuneConfig: the typed, frozen settings of fine-tuning after rounding (kvant.tune).

One config serves both stages: block-wise tuning inside the quantization engine
(``EngineOptions(finetune=TuneConfig(...))``, :mod:`kvant.tune.blockwise`) reads ``steps``;
end-to-end tuning (:func:`kvant.finetune`, :mod:`kvant.tune.e2e`) reads ``tokens`` and
``batch_size``. Both read ``lr``, ``params`` and ``seed``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from kvant.config import ConfigError

# which continuous tensors may move (kvant.tune.params says what each name covers)
PARAM_KINDS = ("scales", "norms", "biases")
TARGETS = ("float", "local")  # what block-wise tuning fits a block's outputs to


@dataclass(frozen=True)
class TuneConfig:
    """Fine-tuning of the continuous parameters of a quantized model; packed integer codes
    never change.

    steps: block-wise: Adam steps per block, each on one calibration batch of the engine
        (``EngineOptions.batch_size`` samples), cycling through the batches.
    target: block-wise: what a block's outputs are fitted to. "float": the float model's own
        hidden states after this block (the engine carries them beside the quantized ones),
        so each block also makes up for the error of the blocks before it; "local": the
        float block's outputs on the same (quantized) inputs. "float" needs one more set of
        hidden states in memory, and a resumed streaming run cannot rebuild it.
    lr: Adam learning rate. Scales move multiplicatively (``s = s0 * (1 + θ)``, so ``lr`` is a
        relative step for every layer alike); norms and biases move additively.
    params: which kinds of tensors move, a subset of ``("scales", "norms", "biases")``:
        "scales" the quantization scales of every packed layer (and AWQ-style input scales),
        "norms" the weights and biases of normalisation layers, "biases" the packed layers'
        biases.
    tokens: end to end: the token budget, i.e. optimizer steps x batch_size x seq_len (rounded
        up to whole steps).
    batch_size: end to end: calibration samples per step.
    holdout: end to end: the fraction of calibration windows kept out of training to stop
        early on (kvant.tune.e2e); 0 = train on all and keep the end if the calibration KL
        fell.
    seed: end to end: the order in which calibration samples are drawn.
    """

    steps: int = 32
    target: str = "float"
    lr: float = 1e-2
    params: tuple[str, ...] = PARAM_KINDS
    tokens: int = 262144
    batch_size: int = 8
    holdout: float = 0.0
    seed: int = 0
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for name in ("steps", "tokens", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                or not math.isfinite(self.lr) or self.lr <= 0):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr!r}")
        if (isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float))
                or not 0 <= self.holdout < 1):
            raise ConfigError(f"holdout must be a fraction in [0, 1), got {self.holdout!r}")
        object.__setattr__(self, "holdout", float(self.holdout))
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {TARGETS}, got {self.target!r}")
        params = (self.params,) if isinstance(self.params, str) else self.params
        if (not isinstance(params, (tuple, list)) or not params
                or any(p not in PARAM_KINDS for p in params)):
            raise ConfigError(f"params must be a non-empty subset of {PARAM_KINDS}, "
                              f"got {self.params!r}")
        object.__setattr__(self, "params", tuple(dict.fromkeys(params)))
        object.__setattr__(self, "lr", float(self.lr))

    def to_dict(self) -> dict:
        """JSON-ready dict with the config version."""
        d = dataclasses.asdict(self)
        d["params"] = list(self.params)
        d["version"] = self.version
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TuneConfig":
        """Inverse of :meth:`to_dict`; unknown keys and other versions are refused."""
        d = dict(d)
        version = d.pop("version", cls.version)
        if version != cls.version:
            raise ConfigError(f"TuneConfig version {version!r} is not supported "
                              f"(this kvant reads version {cls.version})")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown TuneConfig keys: {sorted(unknown)}")
        if isinstance(d.get("params"), list):
            d["params"] = tuple(d["params"])
        return cls(**d)
