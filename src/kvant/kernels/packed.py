"""The repacked-weight op and the glue that caches the GPU layout on each QuantLinear.

``kvant::wq_linear_packed(x, qweight, scales, zeros, perm, bits, group_size, in_features,
pairs, tile)``
takes a weight already in the kernels' layout (kernels/triton/repack.py) and returns
``x @ Wᵀ``. Its default implementation is a pure-torch reference (dequantize the repacked
layout, matmul) so it runs and is tested everywhere; ``kernels/triton/dispatch.py`` registers
the Triton kernels for CUDA. A fake implementation makes it traceable by ``torch.compile``;
the CUDA implementation makes no host synchronisation and so is captured by CUDA graphs.

:func:`cuda_linear` is what ``QuantLinear.forward`` calls for CUDA inputs: it builds the
repacked tensors once (on the first CUDA forward, or ahead of time with :func:`prepare`),
keeps them on the module as ``_kvant_gpu`` (not a buffer: never saved, never counted in the
stored size) and rebuilds them when a stored tensor changes (data pointer or version). Grids
the kernels do not handle run the stored-layout reference ``kvant::wq_linear``.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from kvant.kernels.triton import repack as rp

log = logging.getLogger(__name__)

_UNSUPPORTED = "unsupported"  # cached marker: this layer stays on the reference op


@torch.library.custom_op("kvant::wq_linear_packed", mutates_args=())
def wq_linear_packed(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, perm: Optional[torch.Tensor], bits: int,
                     group_size: int, in_features: int, pairs: bool,
                     tile: int) -> torch.Tensor:
    """y = x @ Wᵀ for W in the repacked layout (``pairs``: the 4-bit pairs layout, ``tile``
    rows a tile); x (..., K) -> (..., N) in x.dtype, N = scales.shape[1]."""
    p = rp.PackedWeight(qweight, scales, zeros, perm, bits, group_size, in_features,
                        scales.shape[1], pairs, tile)
    # fp16 weights, then x's dtype: the same roundings as the stored-layout reference
    w = rp.dequantize_packed(p, torch.float16)
    return torch.matmul(x, w.to(x.dtype).t())


@wq_linear_packed.register_fake
def _(x, qweight, scales, zeros, perm, bits, group_size, in_features, pairs, tile):
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


def build(module: nn.Module) -> "rp.PackedWeight | str":
    """Repack ``module``'s stored tensors on their device, or the unsupported marker."""
    key = rp.source_key(module.qweight, module.scales, module.qzeros, module.g_idx)
    try:
        p = rp.repack(module.qweight, module.scales, module.qzeros, module.g_idx,
                      module.bits, module.group_size, module.in_features)
    except NotImplementedError as e:
        log.info("QuantLinear(%d->%d) stays on the reference op: %s", module.in_features,
                 module.out_features, e)
        return _UNSUPPORTED
    p.key = key
    return p


def _cached(module: nn.Module):
    """The cached repacked form of ``module`` if still valid, else None."""
    p = getattr(module, "_kvant_gpu", None)
    if p is None:
        return None
    if p is _UNSUPPORTED:
        key = getattr(module, "_kvant_gpu_key", None)
    else:
        key = p.key
    now = rp.source_key(module.qweight, module.scales, module.qzeros, module.g_idx)
    return p if key == now else None


def prepare(model: nn.Module) -> int:
    """Repack every CUDA QuantLinear of ``model`` now (before ``torch.compile`` or graph
    capture, which cannot repack). Returns the number of layers that use a GPU kernel."""
    from kvant.nn.qlinear import QuantLinear

    n = 0
    for m in model.modules():
        if type(m).forward is QuantLinear.forward and m.qweight.is_cuda:
            _store(m, build(m))
            n += m._kvant_gpu is not _UNSUPPORTED
    return n


def _store(module: nn.Module, p) -> None:
    module._kvant_gpu = p
    module._kvant_gpu_key = rp.source_key(module.qweight, module.scales, module.qzeros,
                                          module.g_idx)


def _reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from kvant.kernels import ops

    return ops.wq_linear(x, module.qweight, module.scales, module.qzeros, module.g_idx,
                         module.bits, module.group_size, module.in_features)


def cuda_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ Wᵀ`` for a QuantLinear on CUDA through the cached repacked layout."""
    if torch.compiler.is_compiling():
        # tracing: the cache must exist already (prepare()); no validity check is traced
        p = getattr(module, "_kvant_gpu", None)
        if p is None or p is _UNSUPPORTED:
            return _reference(module, x)
    else:
        p = _cached(module)
        if p is None:
            if torch.cuda.is_current_stream_capturing():
                log.warning("QuantLinear repacking skipped during CUDA graph capture; call "
                            "kvant.kernels.packed.prepare(model) first")
                return _reference(module, x)
            p = build(module)
            _store(module, p)
        if p is _UNSUPPORTED:
            return _reference(module, x)
    return wq_linear_packed(x, p.qweight, p.scales, p.zeros, p.perm, p.bits, p.group_size,
                            p.in_features, p.pairs, p.tile)


def _register_cuda() -> bool:
    """Import the Triton kernels (they register themselves) where CUDA and Triton exist."""
    from kvant.kernels import triton as kt

    if not kt.available():
        return False
    try:
        import kvant.kernels.triton.dispatch  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        log.warning("Triton kernels not registered: %s", e)
        return False
    return True


CUDA_KERNELS = _register_cuda()
