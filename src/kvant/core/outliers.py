"""Which weights stay in float: SpQR's sensitivity-based outlier selection.

Shared by SpQR (:mod:`kvant.algorithms.spqr`) and AWQ's outlier budget. A group of weights
x (R, C) (R rows of C consecutive input columns) is rounded on a min-max grid; the cost of
rounding weight w of column j is ``wt_j (w - deq(w))²`` with ``wt`` a per-column importance
(``1/d_j²`` in a GPTQ walk, ``diag(H)_j`` for plain rounding). A weight is an outlier when
keeping it in float (and refitting the grid without it) saves more than a threshold ``tau``
(:func:`grid_outliers`, :func:`sensitive_weights`); :func:`select_outliers` finds the
threshold that keeps a fixed fraction of the weights (a budget).

The grid here is SpQR's: per row, ``s = (max - min) / (2**bits - 1)`` with a real-valued
zero ``-min / s`` (or, ``plain``, the integer-zero grid of :func:`kvant.core.grid.find_params`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvant.config import QuantArgs
from kvant.core.grid import find_params
from kvant.core.stats import MIN_SCALE  # the smallest scale SpQR stores


def real_zero_grid(x: torch.Tensor, bits: int, plain: bool):
    """Scale and zero (R,) of rows x (R, C): SpQR's real-zero min-max grid, or with
    ``plain`` the integer-zero grid of :func:`kvant.core.grid.find_params`."""
    if plain:
        s, z = find_params(x, bits, sym=False)
        return s[:, 0], z[:, 0]
    lo, hi = x.amin(1), x.amax(1)
    rng = hi - lo
    rng = torch.where(rng > 0, rng, lo.abs().clamp_min(MIN_SCALE))  # constant rows stay exact
    s = rng / (2 ** bits - 1)
    return s, -lo / s


def round_on_grid(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int):
    """(integers, dequantized) of x on the grid ``q = clamp(round(x/s + z))``, ``(q - z) s``
    (broadcasting; z may be fractional, as in SpQR)."""
    q = torch.clamp(torch.round(x / s + z), 0, 2 ** bits - 1)
    return q, (q - z) * s


def fill_excluded(x: torch.Tensor, excl: torch.Tensor | None) -> torch.Tensor:
    """x (..., C) with excluded weights replaced by their row's smallest kept weight, a value
    that leaves the min-max range of the kept weights unchanged (0 for a fully excluded row)."""
    if excl is None or not bool(excl.any()):
        return x
    kept_min = torch.where(excl, torch.full_like(x, math.inf), x).amin(-1, keepdim=True)
    kept_min = torch.where(torch.isfinite(kept_min), kept_min, torch.zeros_like(kept_min))
    return torch.where(excl, kept_min, x)


def weighted_error(x, y, wt, bits: int, plain: bool) -> torch.Tensor:
    """(R, C) ``wt * (x - deq(x))²`` on the grid fit to the rows of y (R, C)."""
    s, z = real_zero_grid(y, bits, plain)
    return (round_on_grid(x, s[:, None], z[:, None], bits)[1] - x).square() * wt


def drop_gain(x: torch.Tensor, wt: torch.Tensor, excl: torch.Tensor, bits: int,
              plain: bool = False):
    """The best weight of each row of x (R, C) to leave out of the grid, among the kept ones.

    ``E_r = Σ_kept wt (x - deq)²`` on the min-max grid of the kept weights; leaving weight i
    out (keeping it in float) gives ``E_r - E_r^{-i}`` with the grid refit on the rest. Only
    the extremes can change a min-max grid, so the candidates are the kept argmin and argmax.
    Returns (gain (R,), column (R,)).
    """
    rows = torch.arange(x.shape[0], device=x.device)
    wt = wt * (~excl)
    y = fill_excluded(x, excl)
    base = weighted_error(x, y, wt, bits, plain).sum(1)
    lo, hi = y.argmin(1), y.argmax(1)
    best_gain, best_idx = None, None
    for idx, other in ((lo, hi), (hi, lo)):
        y2 = y.clone()
        y2[rows, idx] = y[rows, other]  # a duplicate of a kept weight: the rest's range
        e2 = weighted_error(x, y2, wt, bits, plain)
        gain = base - (e2.sum(1) - e2[rows, idx])
        if best_gain is None:
            best_gain, best_idx = gain, idx
        else:
            better = gain > best_gain
            best_gain = torch.where(better, gain, best_gain)
            best_idx = torch.where(better, idx, best_idx)
    return best_gain, best_idx


def grid_outliers(x: torch.Tensor, wt: torch.Tensor, tau: float, bits: int,
                  plain: bool = False, max_rounds: int | None = None) -> torch.Tensor:
    """Weights of the groups x (R, C) to leave out of their grid: repeatedly drop the extreme
    whose leave-one-out gain (:func:`drop_gain`) exceeds ``tau``, refitting after each (at
    most ``max_rounds``, default C // 4, per row). Returns a bool mask (R, C).

    The reference implementation flags at once every weight whose leave-one-out gain exceeds
    tau; next to a true outlier that flags most of the group (each weight's own error under
    the stretched grid is its gain) and fits the grid to a random remainder. Dropping one
    extreme at a time keeps the grid of the rest.
    """
    r, c = x.shape
    excl = torch.zeros(r, c, dtype=torch.bool, device=x.device)
    rows = torch.arange(r, device=x.device)
    wt = wt.expand(r, c)
    for _ in range(max_rounds if max_rounds is not None else max(1, c // 4)):
        gain, idx = drop_gain(x, wt, excl, bits, plain)
        hit = gain > tau
        if not bool(hit.any()):
            break
        excl[rows[hit], idx[hit]] = True
    return excl


def sensitive_weights(x: torch.Tensor, wt: torch.Tensor, tau: float, bits: int,
                      plain: bool = False) -> torch.Tensor:
    """SpQR's outliers of the groups x (R, C) without error feedback: the grid outliers plus
    every weight whose own error ``wt (x - deq)²`` on the refit grid exceeds ``tau``."""
    excl = grid_outliers(x, wt, tau, bits, plain)
    return excl | (weighted_error(x, fill_excluded(x, excl), wt, bits, plain) > tau)


def select_outliers(W: torch.Tensor, col_weight: torch.Tensor, budget: float, group_size: int,
                    bits: int, plain: bool = False, steps: int = 16) -> torch.Tensor:
    """At most ``round(budget * W.numel())`` outliers of W (N, K) (groups of ``group_size``
    columns): :func:`sensitive_weights` at the smallest threshold that stays within the
    budget (bisection on log tau). col_weight (K,): the importance of each column's error
    (1/d² in GPTQ walk order, diag(H) for RTN). Returns a bool mask (N, K).
    """
    n, k = W.shape
    n_out = round(budget * n * k)
    mask = torch.zeros(n, k, dtype=torch.bool, device=W.device)
    if n_out == 0:
        return mask
    g = k // group_size
    x = W.float().reshape(n * g, group_size)
    wt = col_weight.float().reshape(1, g, group_size).expand(n, g, group_size)
    wt = wt.reshape(n * g, group_size)
    top = float((weighted_error(x, x, wt, bits, plain)).max()) + 1e-30
    lo, hi = math.log(top) - 24.0, math.log(top) + 1.0  # count(hi) = 0
    best = mask.view(-1, group_size)
    for _ in range(steps):
        mid = (lo + hi) / 2
        cand = sensitive_weights(x, wt, math.exp(mid), bits, plain)
        if int(cand.sum()) <= n_out:
            hi, best = mid, cand
        else:
            lo = mid
    return best.reshape(n, k)


@dataclass(frozen=True)
class OutlierRounding:
    """Rounding with a budget of fp16 outliers, for a method other than SpQR (AWQ): the
    settings SpQR's separable path (``kvant.algorithms.spqr.spqr_rtn`` / ``spqr_gptq``)
    reads, with SpQR's own knobs fixed to that path: plain fp16 statistics with integer
    zeros (``stat_bits=16``) and outliers chosen only by the budget (no threshold).

    bits / group_size: the dense grid; outlier_budget: fraction of the weights kept in fp16;
    act_order, damp_percent, block_size: the GPTQ walk's (unused by plain rounding).
    """

    bits: int
    group_size: int
    outlier_budget: float
    act_order: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    stat_bits: int = 16
    stat_group_size: int = 16
    outlier_threshold: float = math.inf

    @property
    def qargs(self) -> QuantArgs:
        """The dense grid (asymmetric, no clip search)."""
        return QuantArgs(self.bits, self.group_size, False, False)
