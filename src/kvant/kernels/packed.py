"""The repacked-weight op: ``x @ Wᵀ`` for a weight already in the kernels' layout.

``kvant::wq_linear_packed(x, qweight, scales, zeros, perm, bits, group_size, in_features,
pairs, tile, autotune)`` takes the tensors of a :class:`~kvant.kernels.triton.repack.PackedWeight`
(kernels/triton/repack.py builds them from the stored layout) and returns ``x @ Wᵀ``. Its
default implementation is a pure-torch reference (dequantize the repacked layout, matmul) so
it runs and is tested everywhere; where CUDA and Triton exist, importing this module
registers the Triton kernels (kernels/triton/dispatch.py) as its CUDA implementation. A fake
implementation makes it traceable by ``torch.compile``; the CUDA implementation makes no
host synchronisation and so is captured by CUDA graphs.

Tensors in, tensors out: which layer gets ready for which device, and when, is the layer's
business (``QuantLinear.prepare``); nothing here caches anything per layer or per tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

from kvant.kernels.triton import repack as rp


_KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # the Triton kernels take 16-bit inputs


def _reference(x: torch.Tensor, p: rp.PackedWeight) -> torch.Tensor:
    # fp16 weights, then x's dtype: the same roundings as the stored-layout reference
    w = rp.dequantize_packed(p, torch.float16)
    return torch.matmul(x, w.to(x.dtype).t())


def _weight(qweight, scales, zeros, perm, bits, group_size, in_features, pairs,
            tile) -> rp.PackedWeight:
    return rp.PackedWeight(qweight, scales, zeros, perm, bits, group_size, in_features,
                           scales.shape[1], pairs, tile)


@torch.library.custom_op("kvant::wq_linear_packed", mutates_args=())
def wq_linear_packed(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, perm: Optional[torch.Tensor], bits: int,
                     group_size: int, in_features: int, pairs: bool, tile: int,
                     autotune: bool = False) -> torch.Tensor:
    """y = x @ Wᵀ for W in the repacked layout (``pairs``: the 4-bit pairs layout, ``tile``
    rows a tile); x (..., K) -> (..., N) in x.dtype, N = scales.shape[1]. ``autotune``
    (KernelOptions.autotune) matters only to the CUDA kernels."""
    return _reference(x, _weight(qweight, scales, zeros, perm, bits, group_size,
                                 in_features, pairs, tile))


@wq_linear_packed.register_fake
def _(x, qweight, scales, zeros, perm, bits, group_size, in_features, pairs, tile,
      autotune=False):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


def _register_cuda() -> bool:
    """Register the Triton kernels as the op's CUDA implementation where CUDA and Triton
    exist. A CPU-only install never imports Triton."""
    from kvant.kernels.triton import kernel_module

    dispatch = kernel_module("dispatch")
    if dispatch is None:
        return False

    @torch.library.register_kernel("kvant::wq_linear_packed", "cuda")
    def _cuda(x, qweight, scales, zeros, perm, bits, group_size, in_features, pairs, tile,
              autotune=False):
        p = _weight(qweight, scales, zeros, perm, bits, group_size, in_features, pairs, tile)
        if x.dtype not in _KERNEL_DTYPES:  # fp32 activations: the reference
            return _reference(x, p)
        return dispatch.linear(x, p, autotune)

    return True


CUDA_KERNELS = _register_cuda()  # True where the op's CUDA implementation is the Triton one
