"""The uniform integer grid: scales and zero points, quantize / dequantize, and RTN.

Conventions (shared by every method and by the checkpoint format):
- a weight ``w`` maps to an unsigned integer ``q = clamp(round(w / s) + z, 0, 2**bits - 1)``
  and back to ``(q - z) * s``;
- symmetric grids use ``s = absmax / (2**(bits-1) - 1)`` and ``z = 2**(bits-1)``, so the signed
  value ``q - z`` lies in ``[-2**(bits-1), 2**(bits-1) - 1]`` and zero is exact. With one scale
  for the whole tensor this is the seed's naive absmax rounding;
- asymmetric grids use the min-max range widened to contain 0, ``s = (max - min) / (2**bits-1)``
  and the integer ``z = round(-min / s)`` (the integer-zero grid GPTQ/AWQ formats store);
- scales are rounded to float16 here, because that is what is stored, so that what a method
  optimises is exactly what the checkpoint reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvant.config import QuantArgs

# clipping search, as GPTQ's ``mse`` option: shrink the range by up to 80% in 100 steps
CLIP_GRID = 100
CLIP_MAXSHRINK = 0.8
CLIP_NORM = 2.4


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    # store-exact scales; never zero so division is always defined
    return scale.clamp(min=1e-7).to(torch.float16).to(torch.float32)


def _range_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool):
    """Scale and zero for rows whose range is [xmin, xmax] (both (R,), xmin <= 0 <= xmax)."""
    maxq = 2 ** bits - 1
    if sym:
        absmax = torch.maximum(xmin.abs(), xmax)
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        scale = _fp16_scale(absmax / (2 ** (bits - 1) - 1))
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale = _fp16_scale((xmax - xmin) / maxq)
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers of ``x`` on the grid (broadcasting scale/zero); float tensor of whole numbers."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Grid values ``(q - zero) * scale`` (broadcasting)."""
    return (q - zero) * scale


def fake_quantize(x, scale, zero, bits: int) -> torch.Tensor:
    """``dequantize(quantize(x))``: the value a weight takes after rounding."""
    return dequantize(quantize(x, scale, zero, bits), scale, zero)


def find_params(x: torch.Tensor, bits: int, sym: bool, clip: bool = False):
    """Scale and zero point per row of ``x`` (R, C); each row is one channel or group.

    Returns (scale, zero), each (R, 1) float32; ``zero`` holds whole numbers.
    """
    x = x.float()
    xmin = x.min(dim=1).values.clamp(max=0)
    xmax = x.max(dim=1).values.clamp(min=0)
    scale, zero = _range_params(xmin, xmax, bits, sym)
    if clip:
        best = torch.full_like(xmin, float("inf"))
        for i in range(int(CLIP_MAXSHRINK * CLIP_GRID)):
            p = 1 - i / CLIP_GRID
            s1, z1 = _range_params(p * xmin, p * xmax, bits, sym)
            err = (fake_quantize(x, s1[:, None], z1[:, None], bits) - x).abs_().pow_(CLIP_NORM)
            err = err.sum(1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale[:, None], zero[:, None]


def check_group_size(k: int, group_size: int, layer: str = "") -> None:
    """Raise a clear error when ``group_size`` does not divide the input width ``k``."""
    if group_size > 0 and k % group_size:
        divisors = [g for g in (16, 32, 64, 128, 256) if k % g == 0]
        where = f" of layer {layer!r}" if layer else ""
        raise ValueError(
            f"group_size {group_size} does not divide the input width {k}{where}; "
            f"group sizes that work: {divisors or 'none of 16..256'}, or -1 (per channel)")


@dataclass
class GridParams:
    """Scales and zeros of a whole weight: shapes (N, G), or (1, 1) for one tensor scale."""

    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    def expand(self, k: int, g_idx: torch.Tensor | None = None):
        """Per-element (N or 1, K) scale and zero, using ``g_idx`` when given."""
        if self.group_size == 0 or self.scales.shape[1] == 1:
            return self.scales, self.zeros
        if g_idx is None:
            g_idx = torch.arange(k, device=self.scales.device) // self.group_size
        return self.scales[:, g_idx.long()], self.zeros[:, g_idx.long()]


def weight_params(w: torch.Tensor, args: QuantArgs, layer: str = "") -> GridParams:
    """Grid parameters of a weight (N, K) by the layout in ``args``."""
    n, k = w.shape
    gs = args.group_size
    if gs == 0:
        s, z = find_params(w.reshape(1, -1), args.bits, args.sym, args.clip)
        return GridParams(s, z, 0)
    if gs == -1:
        s, z = find_params(w, args.bits, args.sym, args.clip)
        return GridParams(s, z, -1)
    check_group_size(k, gs, layer)
    s, z = find_params(w.reshape(n * (k // gs), gs), args.bits, args.sym, args.clip)
    return GridParams(s.reshape(n, k // gs), z.reshape(n, k // gs), gs)


def rtn(w: torch.Tensor, args: QuantArgs, layer: str = ""):
    """Round-to-nearest of ``w`` (N, K). Returns (q int32 (N, K), GridParams)."""
    params = weight_params(w, args, layer)
    s, z = params.expand(w.shape[1])
    q = quantize(w.float(), s, z, args.bits).to(torch.int32)
    return q, params
