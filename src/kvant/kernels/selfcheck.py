"""A GPU kernel is trusted only after it agreed with its reference on this machine.

A fused kernel that computes a wrong result on some GPU, driver or Triton version would make
a model silently wrong. So the first time a kernel would compute a given kind of call (a
``key``: kernel, shape, dtype, device), the caller runs it and its pure-torch reference once
on the same input and compares; the kernel is used for that key from then on only if the
relative error (Frobenius norm) is within the kernel's tolerance and its output is finite.
A disagreement is logged once, as a warning naming the key and the error, and the reference
computes every later call of that key. The check needs eager execution: while a CUDA graph
is being captured or ``torch.compile`` traces, an unchecked key runs the reference.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)

_VERDICTS: dict[tuple, bool] = {}


def can_check() -> bool:
    """Whether a check may run now (not inside a graph capture or a compiled trace)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def verdict(key: tuple) -> bool | None:
    """True / False once ``key`` was checked, None before."""
    return _VERDICTS.get(key)


def trusted(key: tuple, kernel: Callable[[], torch.Tensor],
            reference: Callable[[], torch.Tensor], rtol: float) -> bool:
    """Whether the kernel may compute calls of ``key``: checked once (module docstring) by
    running ``kernel()`` and ``reference()`` (same input, same shape of result); False while
    unchecked where no check can run."""
    known = _VERDICTS.get(key)
    if known is not None:
        return known
    if not can_check():
        return False
    with torch.no_grad():
        got, want = kernel().float(), reference().float()
    err = float((got - want).norm() / want.norm().clamp_min(1e-30)) \
        if got.shape == want.shape else float("inf")
    ok = bool(torch.isfinite(got).all()) and err <= rtol
    if not ok:
        log.warning("kernel %s disagrees with its reference on this device (relative error "
                    "%.3g > %.3g): the reference computes these calls", key, err, rtol)
    _VERDICTS[key] = ok
    return ok


def forget() -> None:
    """Drop every verdict (tests; a new driver or Triton in the same process)."""
    _VERDICTS.clear()
