"""The decode-step attention operator: split-KV over grouped-query heads, one op on CUDA.

``kvant::gqa_decode(q, k, v, mask, scale, q_len)`` takes the query rows of each key/value
head already folded (serve/attention.py: q (B, H_kv, G·q, D)) and returns the attention
output in the model's (B, q, H, D) layout. Its CUDA implementation is the two-pass Triton
kernel of kernels/triton/decode_attention.py, registered on first use where CUDA and Triton
exist; the default implementation, on every other device, is the reference: SDPA over the
folded rows, which is what serve/attention.py ran before the kernel existed. A fake
implementation makes the op traceable by ``torch.compile``; the kernel makes no host
synchronisation, so CUDA graphs capture it.

:func:`applies` says where the kernel runs: grouped query heads, few rows a head (decode
steps; a long prompt keeps SDPA's prefill kernels), fp16/bf16, a power-of-two head size from
16 to 256.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

MAX_ROWS = 64  # G·q rows a key/value head: the kernel holds (rows, D) in registers
HEAD_DIMS = (16, 32, 64, 128, 256)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


_READY: Optional[bool] = None  # None: not tried yet (ensure_kernel)


def ensure_kernel() -> bool:
    """Register the Triton kernel as kvant::gqa_decode's CUDA implementation, once; False
    without CUDA or Triton (a CPU-only install never imports Triton). Call it outside
    ``torch.compile`` (serve/attention.register does): :func:`applies` then only reads a flag."""
    global _READY
    if _READY is None:
        from kvant.kernels import triton as kt

        kd = kt.kernel_module("decode_attention")
        if kd is not None:
            @torch.library.register_kernel("kvant::gqa_decode", "cuda")
            def _cuda(q, k, v, mask, scale, q_len):
                return kd.launch(q, k, v, mask, scale, q_len)
        _READY = kd is not None
    return _READY


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              scale: float, q_len: int, dropout: float = 0.0) -> torch.Tensor:
    """SDPA over the folded rows: q (B, H_kv, G·q, D), k and v (B, H_kv, T, D), mask None or
    (B or 1, 1, q, T) -> (B, q, G·H_kv, D). Row g·q + i of a group is query head
    h_kv·G + g at position i, so row r reads the mask at position r % q. ``dropout``: SDPA's
    dropout_p (training only; the op itself never drops)."""
    b, hkv, r, d = q.shape
    g = r // q_len
    m = None
    if mask is not None:
        m = mask.unsqueeze(2).expand(mask.shape[0], 1, g, q_len, mask.shape[-1]) \
            .reshape(mask.shape[0], 1, r, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout,
                                         scale=scale)  # (B, H_kv, R, D)
    return out.reshape(b, hkv * g, q_len, d).transpose(1, 2).contiguous()


@torch.library.custom_op("kvant::gqa_decode", mutates_args=())
def gqa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               scale: float, q_len: int) -> torch.Tensor:
    """Attention of the folded query rows q (B, H_kv, G·q, D) over the cache k, v (B, H_kv,
    T, D) with ``mask`` (None, or (B or 1, 1, q, T) boolean or additive) -> (B, q, H, D) in
    q's dtype; :func:`reference` on devices without the kernel."""
    return reference(q, k, v, mask, scale, q_len)


@gqa_decode.register_fake
def _(q, k, v, mask, scale, q_len):
    b, hkv, r, d = q.shape
    return q.new_empty(b, q_len, r // q_len * hkv, d)


def shape_fits(rows: int, q_len: int, head_dim: int) -> bool:
    """The kernel's shape rule: query heads grouped (G = rows / q_len ≥ 2), at most MAX_ROWS
    folded rows a key/value head, a head size in HEAD_DIMS. G = 1 (a key/value head per query
    head) keeps SDPA: there its inputs are the model's own, cuDNN splits the cache itself,
    and it was faster than this kernel on the Llama-2-7B shape (decode_attention.md)."""
    return 2 * q_len <= rows <= MAX_ROWS and head_dim in HEAD_DIMS


def mask_fits(mask_shape: tuple, batch: int, q_len: int, t: int) -> bool:
    """Whether the kernel reads a mask of ``mask_shape`` right: (B or 1, 1, q_len, T) exactly
    (no other broadcast: the kernel indexes the query and key dims by their strides)."""
    return (len(mask_shape) == 4 and mask_shape[0] in (1, batch) and mask_shape[1] == 1
            and mask_shape[2] == q_len and mask_shape[3] == t)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: Optional[torch.Tensor], q_len: int) -> bool:
    """Whether the split-KV kernel runs this call: CUDA with Triton, fp16/bf16 q, k and v of
    one dtype with a contiguous last dim, :func:`shape_fits`, and a mask (if any) that
    :func:`mask_fits`."""
    if not (q.is_cuda and q.dtype in KERNEL_DTYPES and k.dtype == q.dtype == v.dtype):
        return False
    if not shape_fits(q.shape[2], q_len, q.shape[3]):
        return False
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if mask is not None and not mask_fits(tuple(mask.shape), q.shape[0], q_len, k.shape[2]):
        return False
    return _READY if _READY is not None else ensure_kernel()
