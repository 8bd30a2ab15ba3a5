"""Quantized-linear operators, registered as torch custom ops.

``kvant::wq_linear(x, qweight, scales, qzeros, g_idx, bits, group_size)`` computes
``x @ dequantize(W)ᵀ`` for a packed weight (layout in docs/FORMAT.md). The default
implementation below is the pure-torch reference (dequantize, then matmul) that runs on every
device, and the only one: the GPU kernels read the repacked layout, through
``kvant::wq_linear_packed`` (kernels/packed.py), which a layer uses once it is prepared for its
device (``QuantLinear.prepare``). A fake (meta) implementation makes the op traceable by
``torch.compile``.
"""

from __future__ import annotations

from typing import Optional

import torch

from kvant.formats.packing import unpack


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                      g_idx: Optional[torch.Tensor], bits: int, group_size: int,
                      in_features: int) -> torch.Tensor:
    """Unpack and dequantize to a (N, K) tensor in the dtype of ``scales``.

    qweight: (N, words) int32; scales: (N, G) or (1, 1); qzeros: packed (N or 1, zwords).
    """
    n = qweight.shape[0]
    q = unpack(qweight, bits, in_features)  # (N, K) int32
    n_groups = scales.shape[1]
    z = unpack(qzeros, bits, n_groups).to(scales.dtype)  # (N or 1, G)
    if n_groups > 1:
        idx = g_idx.long() if g_idx is not None else (
            torch.arange(in_features, device=q.device) // group_size)
        s, z = scales[:, idx], z[:, idx]
    else:
        s = scales
    # float32 math then cast: exact for every integer and stored fp16/bf16 scale
    w = (q.float() - z.float()) * s.float()
    return w.to(scales.dtype).expand(n, in_features)


@torch.library.custom_op("kvant::wq_linear", mutates_args=())
def wq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              qzeros: torch.Tensor, g_idx: Optional[torch.Tensor], bits: int,
              group_size: int, in_features: int) -> torch.Tensor:
    """y = x @ Wᵀ for a packed quantized W (N, K); x (..., K) -> y (..., N) in x.dtype."""
    w = dequantize_weight(qweight, scales, qzeros, g_idx, bits, group_size, in_features)
    return torch.matmul(x, w.to(x.dtype).t())


@wq_linear.register_fake
def _(x, qweight, scales, qzeros, g_idx, bits, group_size, in_features):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))

