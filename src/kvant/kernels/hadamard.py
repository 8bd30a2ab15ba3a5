"""The fused randomized Hadamard transform: one Triton launch per side on CUDA.

``core/hadamard.RandomizedHadamard`` is the reference (any device, any batch): a chain of
2 + 2t small kernels a call. For decode batches on CUDA, :class:`SidePlan` holds what the
one-launch kernel (kernels/triton/hadamard.py) reads for one transform on one device (packed
signs, the factor's bf16 pieces, the :class:`Geometry`) and ``kvant::rht`` runs it;
QuipLinear builds the plans from its transforms (``nn/quip_linear.kernel_plan``) and picks
the kernel per call with :func:`applies`, else the reference. Tensors and sizes in, as in
the rest of kvant/kernels: nothing here knows the transform objects.

The op has a CUDA implementation only (the reference is RandomizedHadamard itself) and a
fake one, so it traces under ``torch.compile``; it makes no host synchronisation, so CUDA
graphs capture it. Importing this module imports no Triton; the CUDA implementation is
registered on first use where CUDA and Triton exist.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch

# decode batches: the kernel runs one program (one SM) per row; larger batches keep the
# reference's batched GEMMs, which were not measured against it
MAX_ROWS = 16
# padded size n' = D1·D2·D3 held in registers by one program (28672 = 1024·28 -> 32768)
MAX_PADDED = 32768
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_MIN_AXIS, _MAX_AXIS = 4, 7  # log2 of an axis: tl.dot needs >= 16, a ±1 tile <= 128²


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How the kernel lays out one transform of size ``n`` (kernels/triton/hadamard.py).

    d1, d2, d3: the register tensor's axes (powers of two; d2 may be 1); m: the factor's
    order (== d3 without a factor); pieces: 0 (axis 3 Sylvester), 1 (±1 Hadamard factor), 3
    (random factor in three bf16 pieces); perm_d: the reference's first Kronecker factor
    order (0: no output permutation); scale: the normalisation; warps: per program.
    """

    n: int
    d1: int
    d2: int
    d3: int
    m: int
    pieces: int
    perm_d: int
    scale: float
    warps: int


def _split_exponent(k: int, parts: int) -> list[int] | None:
    # k = sum of `parts` axis exponents, each in [_MIN_AXIS, _MAX_AXIS], as even as possible
    sizes = [k // parts + (i < k % parts) for i in range(parts)]
    return sizes if all(_MIN_AXIS <= s <= _MAX_AXIS for s in sizes) else None


def geometry(n: int, p: int, m: int, kind: str, first_factor: int,
             n_factors: int) -> Geometry | None:
    """The kernel's layout for a transform ``P (H_p ⊗ M) diag(s)`` of size n = p·m
    (``kind`` "none" (m = 1), "hadamard" or "random", as core.hadamard.split_size says; the
    reference evaluates it as ``n_factors`` Kronecker factors, the first of order
    ``first_factor``), or None where the kernel does not apply (an axis below 16, e.g.
    n < 256 without a factor or p < 16 with one; a factor above 128; a padded size above
    MAX_PADDED)."""
    if kind not in ("none", "hadamard", "random") or p * m != n or p & (p - 1):
        raise ValueError(f"transform geometry: n = {n} is not p·m = {p}·{m} with p a power "
                         f"of two, or kind {kind!r} is unknown")
    k = p.bit_length() - 1
    if kind == "none":
        exps = _split_exponent(k, 2 if k <= 2 * _MAX_AXIS else 3)
        if exps is None:
            return None
        d1, d2, d3 = (exps[0], 0, exps[1]) if len(exps) == 2 else exps
        d1, d2, d3 = 1 << d1, 1 << d2, 1 << d3
        m_axis, pieces = d3, 0
    else:
        d3 = max(16, 1 << (m - 1).bit_length())
        exps = _split_exponent(k, 1 if k <= _MAX_AXIS else 2)
        if exps is None or d3 > 1 << _MAX_AXIS:
            return None
        d1, d2 = 1 << exps[0], 1 << (exps[1] if len(exps) == 2 else 0)
        m_axis, pieces = m, (1 if kind == "hadamard" else 3)
    if d1 * d2 * d3 > MAX_PADDED:
        return None
    # the reference's output order (RandomizedHadamard.permutation): the first factor's
    # axis moves last when there are two factors or more
    perm_d = first_factor if n_factors >= 2 else 0
    norm = p * (m if kind == "hadamard" else 1)  # ±1 factors here, normalised once
    warps = max(4, min(16, d1 * d2 * d3 // 1024))
    return Geometry(n, d1, d2, d3, m_axis, pieces, perm_d, 1.0 / math.sqrt(norm), warps)


def _pieces(g: torch.Tensor, d3: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """(count·d3·d3,) zero-padded pieces of the float32 (m, m) g, each bf16-exact, summing
    to g (count 3) or g itself (count 1, g exact in bf16); stored as ``dtype``."""
    padded = torch.zeros(d3, d3, dtype=torch.float32)
    padded[:g.shape[0], :g.shape[1]] = g
    out, rest = [], padded
    for _ in range(count):
        piece = rest.to(torch.bfloat16).float()
        out.append(piece)
        rest = rest - piece
    return torch.stack(out).reshape(-1).to(dtype)


@dataclasses.dataclass(frozen=True)
class SidePlan:
    """One RandomizedHadamard ready for the kernel on one device: ``geo``, the packed signs
    (uint8 on the device) and the factor pieces for ``forward`` (x @ Mᵀ) and ``inverse``
    (x @ M), None without a factor table."""

    geo: Geometry
    signs: torch.Tensor
    g_forward: Optional[torch.Tensor]
    g_inverse: Optional[torch.Tensor]


def plan(geo: Geometry, signs: torch.Tensor, factor: torch.Tensor | None,
         device: torch.device | str) -> SidePlan | None:
    """The kernel's tensors on ``device`` for a transform laid out as ``geo``: ``signs``
    uint8 packed (core.hadamard.pack_signs), ``factor`` the (m, m) M (a ±1 Hadamard matrix,
    unnormalised, for pieces 1; the orthogonal float32 matrix for pieces 3; None for 0).
    Host-to-device copies: call it before capturing a CUDA graph. None where Triton does not
    run on a CUDA ``device``; on a CPU device the pieces are float32 (Triton's
    interpreter)."""
    device = torch.device(device)
    if device.type == "cuda" and not _cuda_ready():
        return None
    if (factor is None) != (geo.pieces == 0) or signs.dtype != torch.uint8 \
            or signs.numel() * 8 < geo.n:
        raise ValueError(f"transform plan: {geo.pieces} factor pieces need "
                         f"{'no' if geo.pieces == 0 else 'a'} factor, and signs uint8 "
                         f"packed for {geo.n}; got {signs.dtype} ({signs.numel()},) and "
                         f"{'none' if factor is None else tuple(factor.shape)}")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    g_fwd = g_inv = None
    if geo.pieces:
        f = factor.to(torch.float32).cpu()
        g_fwd = _pieces(f.t(), geo.d3, geo.pieces, dtype).to(device)
        g_inv = _pieces(f, geo.d3, geo.pieces, dtype).to(device)
    return SidePlan(geo, signs.to(device), g_fwd, g_inv)


@functools.lru_cache(maxsize=None)
def _cuda_ready() -> bool:
    """Register the Triton kernel as kvant::rht's CUDA implementation, once; False without
    CUDA or Triton (a CPU-only install never imports Triton)."""
    from kvant.kernels import triton as kt

    if not kt.available():
        return False
    from kvant.kernels.triton import hadamard as kh

    @torch.library.register_kernel("kvant::rht", "cuda")
    def _cuda(x, signs, g, d1, d2, d3, m, pieces, perm_d, scale, inverse, warps):
        return kh.launch(x, signs, g, d1, d2, d3, m, pieces, perm_d, scale, inverse, warps)

    return True


@torch.library.custom_op("kvant::rht", mutates_args=())
def rht(x: torch.Tensor, signs: torch.Tensor, g: Optional[torch.Tensor], d1: int, d2: int,
        d3: int, m: int, pieces: int, perm_d: int, scale: float, inverse: bool,
        warps: int) -> torch.Tensor:
    """The randomized Hadamard transform (or its inverse) of every row of x (rows, n)
    contiguous, in x's dtype, by the Triton kernel (CUDA only: see :func:`applies`)."""
    raise NotImplementedError(f"kvant::rht runs on CUDA with Triton only, got {x.device}; "
                              f"the reference is core.hadamard.RandomizedHadamard")


@rht.register_fake
def _(x, signs, g, d1, d2, d3, m, pieces, perm_d, scale, inverse, warps):
    return torch.empty_like(x)


def applies(p: SidePlan | None, x: torch.Tensor) -> bool:
    """Whether the kernel computes ``p``'s transform of x (..., n): a plan (built only where
    Triton runs on CUDA) on x's CUDA device, fp16/bf16, 1 to MAX_ROWS rows."""
    if p is None or not x.is_cuda or x.dtype not in KERNEL_DTYPES:
        return False
    rows = x.numel() // p.geo.n
    return 0 < rows <= MAX_ROWS and p.signs.device == x.device  # plan() registered the op


def apply(p: SidePlan, x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """``V x`` (``inverse``: ``Vᵀ x``) along the last dim of x (..., n) by one launch, as
    RandomizedHadamard.forward / inverse compute it; call only where :func:`applies`."""
    g = p.g_inverse if inverse else p.g_forward
    geo = p.geo
    y = rht(x.reshape(-1, geo.n).contiguous(), p.signs, g, geo.d1, geo.d2, geo.d3, geo.m,
            geo.pieces, geo.perm_d, geo.scale, inverse, geo.warps)
    return y.reshape(x.shape)
