"""Triton kernel: one side of QuIP's randomized Hadamard transform in one launch.

``core/hadamard.RandomizedHadamard`` computes ``V x = P (H_p ⊗ M) diag(s) x`` as a chain of
batched matmuls and transposing copies: 2 + 2t kernels a call (t Kronecker factors), which
at decode batch is all launch latency (benchmarks/results/archive/quip_overhead.md). This
kernel does the whole side for one row of x per program:

- x (n,) is read as a tensor (D1, D2, D3) in registers, natural index
  ``i = (a1·D2 + a2)·m + b`` (b < m; D3 = m padded to a power of two ≥ 16 when a factor M
  of order m exists, else D3 is a third power-of-two axis and m = D3). Since
  ``H_p = H_D1 ⊗ H_D2 (⊗ H_D3)`` for Sylvester matrices of any split of p, each axis is
  contracted with its own factor as one ``tl.dot``: axis 3 with M (or H_D3), axis 2 with
  H_D2 (skipped when D2 = 1), axis 1 with H_D1;
- the Sylvester factors are generated in registers (``H[i, j] = (-1)^popcount(i & j)``, ±1,
  exact in bf16), M is read from a small table;
- precision: every fp32 operand is split into three bf16 pieces, ``x = hi + mid + lo``
  exactly (8 + 8 + 8 significand bits), and the products with the ±1 factors are exact, so
  the tensor cores return fp32 sums of exact products: the reference's float32 rounding,
  summed in another order. A random (non-Hadamard) M is split the same way and the six
  products of pieces whose weights reach 2⁻²⁴ are summed;
- forward: signs on the load, the reference's output permutation P (``_kron_forward``
  leaves the first factor's axis last: natural ``i = i_1·(n/d_1) + r`` lands at
  ``r·d_1 + i_1``) on the store; inverse: P⁻¹ on the load, signs on the store. The
  normalisation ``1/sqrt(p·m)`` (Hadamard M) or ``1/sqrt(p)`` (random M, orthogonal) is
  one multiply at the end.

Triton's CPU interpreter computes a bf16 ``tl.dot`` on the raw bit patterns, so on CPU
tensors (only the interpreter runs them) the pieces are kept in float32 containers
(``DT``); their values, and the products, are the same.

This module imports Triton; ``kernels/hadamard.py`` imports it only where CUDA and Triton
exist and owns the geometry (``Geometry``) and the op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sylvester(D: tl.constexpr, DT: tl.constexpr):
    """The ±1 Sylvester matrix (D, D), D ≤ 256, in DT: (-1)^popcount(i & j)."""
    v = tl.arange(0, D)[:, None] & tl.arange(0, D)[None, :]
    v = v ^ (v >> 4)
    v = v ^ (v >> 2)
    v = v ^ (v >> 1)
    return (1 - 2 * (v & 1)).to(tl.float32).to(DT)


@triton.jit
def _split(x, DT: tl.constexpr):
    """fp32 x -> (hi, mid, lo) bf16 values (held in DT) with hi + mid + lo == x exactly."""
    hi = x.to(tl.bfloat16).to(tl.float32)
    r = x - hi  # exact: below half an ulp of hi
    mid = r.to(tl.bfloat16).to(tl.float32)
    lo = r - mid  # exact, and at most 8 significant bits: a bf16 value
    return hi.to(DT), mid.to(DT), lo.to(DT)


@triton.jit
def _times_sylvester(x, D: tl.constexpr, DT: tl.constexpr):
    """x (R, D) fp32 @ H_D (±1, symmetric) -> (R, D) fp32."""
    h = _sylvester(D, DT)
    hi, mid, lo = _split(x, DT)
    acc = tl.dot(hi, h)
    acc = tl.dot(mid, h, acc)
    return tl.dot(lo, h, acc)


@triton.jit
def _sylvester_times(x, D: tl.constexpr, DT: tl.constexpr):
    """H_D @ x (D, C) fp32 -> (D, C) fp32."""
    h = _sylvester(D, DT)
    hi, mid, lo = _split(x, DT)
    acc = tl.dot(h, hi)
    acc = tl.dot(h, mid, acc)
    return tl.dot(h, lo, acc)


@triton.jit
def _times_factor(x, g_ptr, D: tl.constexpr, PIECES: tl.constexpr, DT: tl.constexpr):
    """x (R, D) fp32 @ G (D, D) read from g_ptr: PIECES 1 (G exact in bf16: ±1) or 3 (G =
    G0 + G1 + G2, bf16 pieces, stored one after the other)."""
    offs = tl.arange(0, D)[:, None] * D + tl.arange(0, D)[None, :]
    g0 = tl.load(g_ptr + offs)
    hi, mid, lo = _split(x, DT)
    acc = tl.dot(hi, g0)
    acc = tl.dot(mid, g0, acc)
    acc = tl.dot(lo, g0, acc)
    if PIECES == 3:
        g1 = tl.load(g_ptr + D * D + offs)
        g2 = tl.load(g_ptr + 2 * D * D + offs)
        acc = tl.dot(hi, g1, acc)
        acc = tl.dot(mid, g1, acc)
        acc = tl.dot(hi, g2, acc)
    return acc


@triton.jit
def rht_kernel(x_ptr, out_ptr, sign_ptr, g_ptr, scale,
               N: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
               M: tl.constexpr, PIECES: tl.constexpr, PERM_D: tl.constexpr,
               INVERSE: tl.constexpr, DT: tl.constexpr):
    """Row ``program_id`` of x (rows, N) -> out (rows, N) in out's dtype (module docstring).
    PIECES 0: axis 3 is the Sylvester H_D3 (no factor, M == D3); 1 or 3: the factor table
    at g_ptr (D3, D3), already transposed for the direction. PERM_D: the reference's first
    factor order d_1 (0: no permutation)."""
    row = tl.program_id(0).to(tl.int64)
    a1 = tl.arange(0, D1)[:, None, None]
    a2 = tl.arange(0, D2)[None, :, None]
    b = tl.arange(0, D3)[None, None, :]
    nat = (a1 * D2 + a2) * M + b  # (D1, D2, D3) natural index
    valid = b < M
    if PERM_D > 0:
        perm = (nat % (N // PERM_D)) * PERM_D + nat // (N // PERM_D)
    else:
        perm = nat
    if INVERSE:
        src, dst = perm, nat
    else:
        src, dst = nat, perm
    bit = (tl.load(sign_ptr + (nat >> 3), mask=valid, other=0).to(tl.int32) >> (nat & 7)) & 1
    sign = (1 - 2 * bit).to(tl.float32)  # (D1, D2, D3) ±1
    x = tl.load(x_ptr + row * N + src, mask=valid, other=0.0).to(tl.float32)
    if not INVERSE:
        x = x * sign
    # axis 3: M (or H_D3); padded columns b >= M stay 0 (G is zero-padded)
    x = tl.reshape(x, (D1 * D2, D3))
    if PIECES == 0:
        x = _times_sylvester(x, D3, DT)
    else:
        x = _times_factor(x, g_ptr, D3, PIECES, DT)
    x = tl.reshape(x, (D1, D2, D3))
    if D2 > 1:  # axis 2: bring it last, contract, put it back
        x = tl.reshape(tl.permute(x, (0, 2, 1)), (D1 * D3, D2))
        x = _times_sylvester(x, D2, DT)
        x = tl.permute(tl.reshape(x, (D1, D3, D2)), (0, 2, 1))
    x = _sylvester_times(tl.reshape(x, (D1, D2 * D3)), D1, DT)  # axis 1
    x = tl.reshape(x, (D1, D2, D3)) * scale
    if INVERSE:
        x = x * sign
    tl.store(out_ptr + row * N + dst, x.to(out_ptr.dtype.element_ty), mask=valid)


def launch(x: torch.Tensor, signs: torch.Tensor, g: torch.Tensor | None, d1: int, d2: int,
           d3: int, m: int, pieces: int, perm_d: int, scale: float, inverse: bool,
           warps: int) -> torch.Tensor:
    """One launch over the rows of x (rows, n) contiguous: the transform (or its inverse)
    of every row, in x's dtype. ``signs`` uint8 packed (core.hadamard.pack_signs), ``g``
    the factor pieces (pieces·d3·d3,) in the kernel's operand type or None; the geometry
    comes from kernels/hadamard.Geometry, which checks it."""
    rows, n = x.shape
    out = torch.empty_like(x)
    # the interpreter (CPU tensors) cannot take a bf16 tl.dot: float32 containers there
    dt = tl.float32 if x.device.type == "cpu" else tl.bfloat16
    if rows:
        rht_kernel[(rows,)](x, out, signs, signs if g is None else g, scale, N=n, D1=d1,
                            D2=d2, D3=d3, M=m, PIECES=pieces, PERM_D=perm_d,
                            INVERSE=inverse, DT=dt, num_warps=warps)
    return out
