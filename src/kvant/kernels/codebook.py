"""The E8P codebook op: ``x @ Ŵᵀ`` for a weight stored as QuIP# lattice codes.

``kvant::e8p_linear(x, qweight, qweight_resid, scales, tables, bits, autotune)`` computes
``x @ Ŵᵀ`` with Ŵ (N, K) decoded from the stored codes (layout: nn/quipsharp_linear.py,
codebooks: core/e8p.py):

    Ŵ[n, 8j:8j+8] = Σ_stage  scales[stage, n or 0] · codebook_stage(codes_stage[n, j])

qweight int16 (N, K/8) E8P codes; qweight_resid (N, K/8) int16 E8P (bits 4) or uint8 E8P1
(bits 3) codes, None for bits 2; scales (stages, N) or (stages, 1); ``tables`` the int32 word
tables of core/e8p_words.py (fp16 and bf16 absolute values, sign masks), which both the
reference and the kernel decode from, so nothing here depends on the codebook module. A code
``c`` decodes to ``abs[c & 255] ^ signs[(c >> 8) & 127]`` (8 values in two-a-word form) plus
``±¼`` by its bit 15 (E8P1: ``abs[256] ^ signs[c & 127]``, shift bit 7).

The default implementation is the pure-torch reference (decode the whole weight, one matmul);
where CUDA and Triton exist, importing this module registers the Triton kernel
(kernels/triton/e8p.py) as the CUDA implementation for batches of at most
:data:`KERNEL_MAX_M` rows of fp16/bf16 activations, the reference above that.
"""

from __future__ import annotations

from typing import Optional

import torch

KERNEL_MAX_M = 16  # rows of x the Triton kernel takes; above, the reference (one matmul)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # the tables' order of absolute tables
ABS_ROWS, SIGN_ROWS = 257, 128  # core/e8p_words.py: rows per absolute table, sign rows
RESID = {2: None, 3: "e8p1", 4: "e8p"}  # the second stage's codebook by bits


def _as_int32(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


def split_tables(tables: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(abs (257, 4), signs (128, 4)) views of ``tables`` for activations in ``dtype``."""
    if tables.shape != (2 * ABS_ROWS + SIGN_ROWS, 4) or tables.dtype != torch.int32:
        raise ValueError(f"e8p_linear: tables must be int32 ({2 * ABS_ROWS + SIGN_ROWS}, 4) "
                         f"(core.e8p_words.kernel_tables), got {tables.dtype} "
                         f"{tuple(tables.shape)}")
    i = _KERNEL_DTYPES.index(dtype) if dtype in _KERNEL_DTYPES else 0
    return tables[i * ABS_ROWS:(i + 1) * ABS_ROWS], tables[2 * ABS_ROWS:]


def decode_words(codes: torch.Tensor, tables: torch.Tensor, index_bits: int,
                 dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The decode the kernel does, in torch: codes (...) (code value in the low 16 bits) ->
    points (..., 8) float32; ``index_bits`` 8 (E8P) or 0 (E8P1)."""
    absw, sgn = (t.long() for t in split_tables(tables, dtype))
    c = codes.long() & 0xFFFF
    idx = (c & 255) if index_bits else torch.full_like(c, ABS_ROWS - 1)
    w = absw[idx] ^ sgn[(c >> index_bits) & 127]  # (..., 4)
    halves = torch.stack([w & 0xFFFF, (w >> 16) & 0xFFFF], -1).flatten(-2)  # (..., 8)
    vals = _as_int32(halves).to(torch.int16).view(dtype).float()
    t = 1 - 2 * ((c >> (index_bits + 7)) & 1)
    return vals + 0.25 * t.unsqueeze(-1).float()


def e8p1_words(tables: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """(256, 4) int32 on ``tables``' device: row c = the 8 values of E8P1 code c, shift
    included (±¼, ±¾, exact in fp16/bf16), two ``dtype`` values a word (entry 2j low, 2j+1
    high): the kernel's 3-bit stage reads them in one look-up (kernels/triton/e8p_gemv.py).
    Derived from ``tables`` by :func:`decode_words`, so both decode the same points."""
    codes = torch.arange(256, device=tables.device)
    bits = decode_words(codes, tables, 0, dtype).to(dtype).view(torch.int16).long() & 0xFFFF
    return _as_int32(bits[:, 0::2] | (bits[:, 1::2] << 16))


def decoded_weight(qweight: torch.Tensor, qweight_resid: Optional[torch.Tensor],
                   scales: torch.Tensor, tables: torch.Tensor, bits: int) -> torch.Tensor:
    """Ŵ (N, K) float32 from the stored codes (the module docstring's sum over stages)."""
    stored = [(qweight, 8)] + ([(qweight_resid, 8 if bits == 4 else 0)] if RESID[bits] else [])
    tables = tables.to(qweight.device)
    n, blocks = qweight.shape
    w = torch.zeros(n, blocks, 8, device=qweight.device)
    for i, (codes, ib) in enumerate(stored):
        w += decode_words(codes, tables, ib) * scales[i].float().view(-1, 1, 1)
    return w.view(n, blocks * 8)


def _check(qweight, qweight_resid, scales, bits) -> None:
    if bits not in RESID:
        raise ValueError(f"e8p_linear: bits must be 2, 3 or 4, got {bits}")
    if (qweight_resid is None) != (RESID[bits] is None):
        raise ValueError(f"e8p_linear: {bits} bits {'needs' if RESID[bits] else 'takes no'} "
                         "residual codes")
    stages = 1 + (RESID[bits] is not None)
    if scales.dim() != 2 or scales.shape[0] != stages or scales.shape[1] not in (
            1, qweight.shape[0]):
        raise ValueError(f"e8p_linear: scales must be ({stages}, N or 1), got "
                         f"{tuple(scales.shape)}")


def reference(x: torch.Tensor, qweight: torch.Tensor, qweight_resid: Optional[torch.Tensor],
              scales: torch.Tensor, tables: torch.Tensor, bits: int) -> torch.Tensor:
    """Decode the whole weight, one matmul in x's dtype."""
    w = decoded_weight(qweight, qweight_resid, scales, tables, bits)
    return x @ w.to(device=x.device, dtype=x.dtype).t()


@torch.library.custom_op("kvant::e8p_linear", mutates_args=())
def e8p_linear(x: torch.Tensor, qweight: torch.Tensor, qweight_resid: Optional[torch.Tensor],
               scales: torch.Tensor, tables: torch.Tensor, bits: int,
               autotune: bool = False) -> torch.Tensor:
    """y = x @ Ŵᵀ for E8P codes (module docstring); x (..., K) -> (..., N) in x.dtype.
    ``autotune`` (KernelOptions.autotune) matters only to the CUDA kernel."""
    _check(qweight, qweight_resid, scales, bits)
    return reference(x, qweight, qweight_resid, scales, tables, bits)


@e8p_linear.register_fake
def _(x, qweight, qweight_resid, scales, tables, bits, autotune=False):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether the CUDA kernel (not the reference) computes a call with this input."""
    return (CUDA_KERNELS and x.is_cuda and x.dtype in _KERNEL_DTYPES
            and x.numel() // max(1, x.shape[-1]) <= KERNEL_MAX_M)


def prepare(device: torch.device, tables: Optional[torch.Tensor] = None) -> bool:
    """Make the kernel's split-K counters (and, given the word ``tables``, its E8P1 value
    tables) on a CUDA ``device`` now, so that a later CUDA-graph capture finds them; False
    where the kernel cannot run there."""
    device = torch.device(device)
    if not (CUDA_KERNELS and device.type == "cuda"):
        return False
    from kvant.kernels.triton import e8p

    e8p.counters(device)
    if tables is not None:
        for dtype in _KERNEL_DTYPES:
            e8p.resid_words(tables.to(device), dtype)
    return True


def _register_cuda() -> bool:
    """Register the Triton kernel as the op's CUDA implementation where CUDA and Triton
    exist. A CPU-only install never imports Triton."""
    from kvant.kernels.triton import kernel_module

    e8p = kernel_module("e8p")
    if e8p is None:
        return False

    @torch.library.register_kernel("kvant::e8p_linear", "cuda")
    def _cuda(x, qweight, qweight_resid, scales, tables, bits, autotune=False):
        _check(qweight, qweight_resid, scales, bits)
        if not kernel_applies(x):
            return reference(x, qweight, qweight_resid, scales, tables, bits)
        return e8p.linear(x, qweight, qweight_resid, scales, tables, bits, autotune)

    return True


CUDA_KERNELS = _register_cuda()  # True where the op's CUDA implementation is the Triton one
