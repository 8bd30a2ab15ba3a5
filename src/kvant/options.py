"""How the block-by-block engine runs (:class:`EngineOptions`) and the device check every
entry point makes before loading a model. Not part of any method's math."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvant.config import ConfigError


@dataclass(frozen=True)
class EngineOptions:
    """How the block-by-block engine runs (not part of any method's math).

    device: compute device for one block at a time ("cpu", "cuda", or None = cuda if present).
    propagate: "quantized" feeds each block the outputs of the already quantized previous
        block; "float" feeds it the float model's outputs.
    batch_size: calibration samples per forward call.
    expert_min_tokens: a mixture-of-experts layer routed fewer calibration tokens than this
        is quantized without data (kvant.model.moe, docs/MOE.md); None = its input width.
    finetune: a :class:`kvant.TuneConfig`: after each block is packed, tune its scales, norms
        and biases to the float block's outputs (kvant.tune.blockwise); None = no tuning.
    """

    device: str | None = None
    propagate: str = "quantized"
    batch_size: int = 8
    show_progress: bool = True
    expert_min_tokens: int | None = None
    finetune: Any = None  # kvant.tune.TuneConfig | None

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.finetune is not None:
            from kvant.tune.config import TuneConfig

            if not isinstance(self.finetune, TuneConfig):
                raise ConfigError("finetune must be a kvant.TuneConfig or None, got "
                                  f"{type(self.finetune).__name__}")
        if self.propagate not in ("quantized", "float"):
            raise ConfigError(f"propagate must be 'quantized' or 'float', got {self.propagate!r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size!r}")
        if self.expert_min_tokens is not None and (
                isinstance(self.expert_min_tokens, bool)
                or not isinstance(self.expert_min_tokens, int) or self.expert_min_tokens < 0):
            raise ConfigError("expert_min_tokens must be a whole number >= 0 or None, got "
                              f"{self.expert_min_tokens!r}")


def check_device(device) -> None:
    """Raise :class:`ConfigError` unless ``device`` (None = cuda if present, "cpu", "cuda",
    "cuda:1", a ``torch.device``) names a device this machine has. Called before any model
    is loaded, so a typo costs nothing."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(device)!r}: expected 'cpu', 'cuda' or "
                          "'cuda:N'") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ConfigError(f"device {str(device)!r} is not supported: kvant computes on 'cpu' "
                          "or 'cuda'")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was asked for but CUDA is not available "
                          "on this machine (torch.cuda.is_available() is False); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(device)!r} does not exist: this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
