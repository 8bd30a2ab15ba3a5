"""SpQR's second-level quantization: the statistics (scales, zeros) of a grid, themselves
quantized.

A first-level statistic ``x`` (N, G) (one value per output row and column group) is cut into
groups of ``group`` consecutive output rows of one column group; each such group keeps an fp16
``base`` (its minimum) and ``step`` (its range over ``2**bits - 1``), and every value becomes
the integer ``round((x - base) / step)``: ``x ≈ base + q * step``. Used by SpQR
(:mod:`kvant.algorithms.spqr`) to quantize, and by :class:`kvant.nn.spqr_linear.SpQRLinear`
to rebuild the grid from what it stores.
"""

from __future__ import annotations

import torch

# scales never reach zero after second-level rounding, so the weight division stays defined
MIN_SCALE = 1e-8


def quantize_stats(x: torch.Tensor, bits: int, group: int, positive: bool = False):
    """Second-level quantization of statistics ``x`` (N, G) in groups of ``group`` rows.

    Returns (ints (N, G) int32 in [0, 2**bits), params float16 (2, N/group, G) = base, step,
    dequantized float32 (N, G)). The dequantized values are exactly what
    :func:`dequantize_stats` rebuilds from the stored tensors.
    """
    n, g = x.shape
    if n % group:
        raise ValueError(f"stat_group_size {group} does not divide the {n} output rows")
    xg = x.float().reshape(n // group, group, g)
    lo, hi = xg.amin(1), xg.amax(1)  # (N/group, G)
    base = lo.to(torch.float16)
    step = ((hi - base.float()) / (2 ** bits - 1)).clamp_min(0).to(torch.float16)
    safe = torch.where(step > 0, step.float(), torch.ones_like(lo))
    q = torch.round((xg - base.float()[:, None]) / safe[:, None]).clamp_(0, 2 ** bits - 1)
    q = torch.where(step[:, None] > 0, q, torch.zeros_like(q))
    q = q.reshape(n, g).to(torch.int32)
    params = torch.stack([base, step])
    return q, params, dequantize_stats(q, params, positive)


def dequantize_stats(q: torch.Tensor, params: torch.Tensor, positive: bool = False):
    """``base + q * step`` per group of rows -> float32 (N, G); scales clamped > 0."""
    n, g = q.shape
    base, step = params.float()  # (N/group, G) each
    group = n // base.shape[0]
    x = base[:, None] + q.float().reshape(-1, group, g) * step[:, None]
    x = x.reshape(n, g)
    return x.clamp_min(MIN_SCALE) if positive else x
