"""Triton kernel: nearest E8P codes, and a whole residual stage quantizer, in one launch.

The torch search (``core/e8p.py``, ``Codebook._nearest``) launches about a hundred small
kernels a call; block LDLQ calls it once per block of 8 columns, per stage, per walk of the
scale search, so on a GPU the walk waited on launches. This kernel computes the same thing
for a tile of BM rows a program:

- for each shift ``t`` (+¼, then -¼): ``y = z - t/4``; for every absolute vector ``a`` of the
  table (BA at a time) the distance ``‖y‖² - 2 Σ a_i|y_i| + ‖a‖²`` with the signs of y, plus
  ``4 min_i a_i|y_i|`` where the parity of y's minus signs is wrong for ``a`` (written in the
  torch path's order of operations, so both round alike);
- the best ``a`` of the shift (first index on a tie), then the entry whose sign is flipped
  (the first smallest ``a_i|y_i|``), the code ``i | signs << ib | shift << (ib + 7)``, and
  the point ``σ ⊙ a + t/4`` exactly as ``Codebook.decode`` makes it;
- -¼ wins only when strictly nearer.

With scales, stage ``k`` rounds ``(x - Σ_{j<k} q_j) / s_k`` (an IEEE division, as torch's)
and adds ``q_k = point · s_k``; codes (M, stages) int64 and the sum of the ``q_k`` (M, 8)
float32 are written: one launch per block of the walk instead of ~100 per stage. Floating
point contraction is off (``enable_fp_fusion=False``) so no product and sum fuse into an FMA
the torch path does not make; the results then equal the torch path's except where two
candidates' float32 distances are equal or within the rounding of the 8-term dot product
(summed in another order here).

This module imports Triton; ``core/e8p.py`` imports it only for CUDA tensors where Triton
exists, and takes the codebook tensors (absolute table, parities, norms) from there.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

BM = 16  # rows a program
BA = 32  # absolute vectors per step of the table walk (256 for E8P: 8 steps)
WARPS = 4


@triton.jit
def _shift_best(z, offs_k, a_ptr, par_ptr, n2_ptr, T: tl.constexpr, NA: tl.constexpr,
                BM: tl.constexpr, BA: tl.constexpr):
    """For y = z - T (z (BM, 8) float32, T = ±¼): the least distance (BM,) over the table
    with the parity fix, and its absolute vector's index (BM,) int32 (first on a tie)."""
    y = z - T
    ay = tl.abs(y)
    nneg = tl.sum((y < 0).to(tl.int32), axis=1)  # (BM,): the sign of 0 is taken as +
    ss = tl.sum(ay * ay, axis=1)  # (BM,)
    best_d = tl.full((BM,), float("inf"), tl.float32)
    best_i = tl.zeros((BM,), tl.int32)
    for a0 in range(0, NA, BA):
        offs_a = a0 + tl.arange(0, BA)
        am = offs_a < NA
        A = tl.load(a_ptr + offs_a[:, None] * 8 + offs_k[None, :], mask=am[:, None],
                    other=0.0)  # (BA, 8)
        par = tl.load(par_ptr + offs_a, mask=am, other=0)  # (BA,) parity of Σ a
        n2 = tl.load(n2_ptr + offs_a, mask=am, other=0.0)  # (BA,) ‖a‖²
        p = ay[:, None, :] * A[None, :, :]  # (BM, BA, 8): a_i |y_i|
        # torch: ‖y‖² - (2|y|) @ Aᵀ + ‖a‖²; doubling is exact, so 2·Σ = Σ of doubled terms
        d = (ss[:, None] - 2.0 * tl.sum(p, axis=2)) + n2[None, :]  # (BM, BA)
        wrong = ((nneg[:, None] + par[None, :]) & 1) != 0
        d = tl.where(wrong, d + 4.0 * tl.min(p, axis=2), d)
        d = tl.where(am[None, :], d, float("inf"))
        dmin, imin = tl.min(d, axis=1, return_indices=True,
                            return_indices_tie_break_left=True)
        take = dmin < best_d  # strictly: an earlier step keeps a tie
        best_d = tl.where(take, dmin, best_d)
        best_i = tl.where(take, imin + a0, best_i)
    return best_d, best_i


@triton.jit
def _nearest(z, offs_k, a_ptr, par_ptr, n2_ptr, NA: tl.constexpr, IB: tl.constexpr,
             BM: tl.constexpr, BA: tl.constexpr):
    """Codes (BM,) int64 and points (BM, 8) float32 of the nearest codewords to z (BM, 8)."""
    d_p, i_p = _shift_best(z, offs_k, a_ptr, par_ptr, n2_ptr, 0.25, NA, BM, BA)
    d_m, i_m = _shift_best(z, offs_k, a_ptr, par_ptr, n2_ptr, -0.25, NA, BM, BA)
    minus = d_m < d_p  # (BM,): the -¼ shift only when strictly nearer
    i = tl.where(minus, i_m, i_p)
    t = tl.where(minus, -0.25, 0.25)  # (BM,)
    y = z - t[:, None]
    ay = tl.abs(y)
    neg = (y < 0).to(tl.int32)  # (BM, 8)
    A = tl.load(a_ptr + i[:, None] * 8 + offs_k[None, :])  # (BM, 8) the chosen a
    wrong = (tl.sum(neg, axis=1) + tl.load(par_ptr + i)) & 1  # (BM,)
    _, j = tl.min(ay * A, axis=1, return_indices=True, return_indices_tie_break_left=True)
    negf = neg ^ ((offs_k[None, :] == j[:, None]).to(tl.int32) * wrong[:, None])
    signs = tl.sum(tl.where(offs_k[None, :] < 7, negf << offs_k[None, :], 0), axis=1)
    code = (i.to(tl.int64) | (signs.to(tl.int64) << IB)
            | (minus.to(tl.int64) << (IB + 7)))
    point = A * (1 - 2 * negf).to(tl.float32) + t[:, None]
    return code, point


@triton.jit
def _scale(s_ptr, rows, rm, stride_s, BM: tl.constexpr):
    """The scale of each row (BM, 8) broadcast over its 8 entries (stride_s 0: one scale)."""
    s = tl.load(s_ptr + rows * stride_s, mask=rm, other=1.0)
    return tl.broadcast_to(s[:, None], (BM, 8))


@triton.jit
def e8p_round_kernel(x_ptr, stride_xm, stride_xk, M,
                     s1_ptr, stride_s1, s2_ptr, stride_s2,
                     a1_ptr, par1_ptr, n21_ptr, a2_ptr, par2_ptr, n22_ptr,
                     codes_ptr, deq_ptr,
                     NA1: tl.constexpr, IB1: tl.constexpr, NA2: tl.constexpr,
                     IB2: tl.constexpr, STAGES: tl.constexpr, SCALED: tl.constexpr,
                     BM: tl.constexpr, BA1: tl.constexpr, BA2: tl.constexpr):
    """Rows ``pid·BM ..`` of x (M, 8): codes (M, STAGES) int64 and, when SCALED, the sum of
    the dequantized stages (M, 8) float32 (module docstring). Without SCALED: one stage,
    codes of x itself, nothing else written."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rm = rows < M
    offs_k = tl.arange(0, 8)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                mask=rm[:, None], other=0.0)  # (BM, 8)
    codes_at = codes_ptr + rows.to(tl.int64) * STAGES
    if SCALED:
        s1 = _scale(s1_ptr, rows, rm, stride_s1, BM)
        code, point = _nearest(tl.math.div_rn(x, s1), offs_k, a1_ptr, par1_ptr, n21_ptr,
                               NA1, IB1, BM, BA1)
        out = point * s1
        tl.store(codes_at, code, mask=rm)
        if STAGES == 2:
            s2 = _scale(s2_ptr, rows, rm, stride_s2, BM)
            code, point = _nearest(tl.math.div_rn(x - out, s2), offs_k, a2_ptr, par2_ptr,
                                   n22_ptr, NA2, IB2, BM, BA2)
            out = out + point * s2
            tl.store(codes_at + 1, code, mask=rm)
        tl.store(deq_ptr + rows[:, None].to(tl.int64) * 8 + offs_k[None, :], out,
                 mask=rm[:, None])
    else:
        code, _ = _nearest(x, offs_k, a1_ptr, par1_ptr, n21_ptr, NA1, IB1, BM, BA1)
        tl.store(codes_at, code, mask=rm)


# one stage's codebook as the kernel reads it: absolute (|A|, 8) float32, parity (|A|,)
# int32, norm² (|A|,) float32, all contiguous on x's device, and index bits
Book = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


def _check_book(book: Book, device: torch.device) -> None:
    a, par, n2, ib = book
    na = a.shape[0]
    if (a.shape != (na, 8) or na != 1 << ib or a.dtype != torch.float32
            or par.dtype != torch.int32 or n2.dtype != torch.float32
            or par.shape != (na,) or n2.shape != (na,)):
        raise ValueError(f"e8p nearest: bad codebook tensors {tuple(a.shape)} {par.dtype} "
                         f"{n2.dtype} for index bits {ib}")
    if any(t.device != device or not t.is_contiguous() for t in (a, par, n2)):
        raise ValueError("e8p nearest: codebook tensors must be contiguous on x's device")


def _launch(x: torch.Tensor, books: Sequence[Book], scales: Sequence[torch.Tensor] | None):
    m = x.shape[0]
    for b in books:
        _check_book(b, x.device)
    codes = torch.empty(m, len(books), dtype=torch.long, device=x.device)
    deq = torch.empty(m, 8, dtype=torch.float32, device=x.device) if scales else codes
    b1, b2 = books[0], books[-1]
    s1, s2 = (scales[0], scales[-1]) if scales else (x, x)
    st = [s.stride(0) if s.shape[0] > 1 else 0 for s in (s1, s2)]
    if m:
        e8p_round_kernel[(triton.cdiv(m, BM),)](
            x, x.stride(0), x.stride(1), m, s1, st[0], s2, st[1], *b1[:3], *b2[:3], codes, deq,
            NA1=b1[0].shape[0], IB1=b1[3], NA2=b2[0].shape[0], IB2=b2[3], STAGES=len(books),
            SCALED=bool(scales), BM=BM, BA1=max(2, min(BA, b1[0].shape[0])),
            BA2=max(2, min(BA, b2[0].shape[0])), num_warps=WARPS, enable_fp_fusion=False)
    return codes, deq


def nearest(x: torch.Tensor, book: Book) -> torch.Tensor:
    """Codes (M,) int64 of the nearest codewords to the rows of x (M, 8) float32."""
    if x.dim() != 2 or x.shape[1] != 8 or x.dtype != torch.float32:
        raise ValueError(f"e8p nearest: x must be (M, 8) float32, got {x.dtype} "
                         f"{tuple(x.shape)}")
    return _launch(x, [book], None)[0][:, 0]


def round_stages(x: torch.Tensor, books: Sequence[Book], scales: Sequence[torch.Tensor]):
    """Residual rounding of x (M, 8) float32, 1 or 2 stages: stage k rounds what the earlier
    stages left, divided by ``scales[k]`` ((M,) or (1,) float32, one a row or one for all),
    to ``books[k]``. Returns (dequantized sum (M, 8) float32, codes (M, stages) int64)."""
    if x.dim() != 2 or x.shape[1] != 8 or x.dtype != torch.float32:
        raise ValueError(f"e8p round: x must be (M, 8) float32, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if len(books) not in (1, 2) or len(scales) != len(books):
        raise ValueError(f"e8p round: 1 or 2 stages with a scale each, got {len(books)} "
                         f"codebooks and {len(scales)} scales")
    for s in scales:
        if s.dim() != 1 or s.shape[0] not in (1, x.shape[0]) or s.dtype != torch.float32 \
                or s.device != x.device:
            raise ValueError(f"e8p round: a scale must be (M,) or (1,) float32 on x's "
                             f"device, got {s.dtype} {tuple(s.shape)} on {s.device}")
    codes, deq = _launch(x, books, scales)
    return deq, codes
