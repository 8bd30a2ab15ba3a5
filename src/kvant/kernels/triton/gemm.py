"""Tensor-core kernel on the planes layout (2, 3, 8 bits, and 4 bits at group size 256),
and the dequantize kernel of the cuBLAS fallback.

``wq_dot_kernel`` computes the output transposed ("swap AB"): a program owns BN output
channels x BM rows of x and accumulates ``(q - z)[BN, 32] @ x[:, k:k+32]ᵀ`` plane by plane
with ``tl.dot``, so the small batch is the dot's N side (16 is the least tl.dot allows) and
the dequantized weight, made in registers, is the A operand. Zero points are subtracted
before the dot (exact small integers in fp16/bf16) and the group's scale is applied once per
group to the fp32 partial sum, so the weight is never rounded to a float format. Programs
along M are adjacent in the launch order so a weight tile read by one is an L2 hit for the
next. Split-K spreads K over ``gridDim.z`` programs whose partial sums are reduced by the
last one to finish (planes.store_or_reduce): no extra launch, no memset.
"""

import triton
import triton.language as tl

from kvant.kernels.triton.planes import plane3_qz, plane_qz, store_or_reduce, x_tile


@triton.jit(do_not_specialize=["M", "chunks_per_split", "n_chunks", "magic"])
def wq_dot_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, part_ptr, cnt_ptr,
                  M, N, K, W, stride_xm, stride_om, chunks_per_split, n_chunks, magic,
                  BITS: tl.constexpr, GS: tl.constexpr, HAS_PERM: tl.constexpr,
                  SPLIT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """out (M, N) = x (M, K) @ W (N, K)ᵀ; W in the repacked layout (repack.py), W words a row,
    GS = group size in columns (0: one scale per row), grid (M tiles, N tiles, K splits)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    CK: tl.constexpr = 1024 if BITS == 3 else 1024 // BITS  # columns per chunk
    PLANES: tl.constexpr = CK // 32
    PPG: tl.constexpr = PLANES if GS == 0 else GS // 32  # planes per group
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 32)
    rows = tl.minimum(offs_n, N - 1)  # clamped: unmasked weight loads, tail rows discarded
    w_ptrs = qw_ptr + rows[:, None].to(tl.int64) * W + offs_r[None, :]  # (BN, 32)
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm  # (1, BM)
    m_ok = offs_m < M
    c_lo = pid_k * chunks_per_split
    c_hi = c_lo + chunks_per_split
    if c_hi > n_chunks:
        c_hi = n_chunks
    acc = tl.zeros((BN, BM), tl.float32)
    if GS == 0:
        zneg = -(tl.load(z_ptr + rows).to(tl.float32))[:, None]
    for c in range(c_lo, c_hi):
        if BITS == 3:
            lo0 = tl.load(w_ptrs + c * 64)
            lo1 = tl.load(w_ptrs + (c * 64 + 32))
            hw = tl.load(w_ptrs + (n_chunks * 64 + c * 32))
            lo0_hi = lo0 >> 16
            lo1_hi = lo1 >> 16
        else:
            wv = tl.load(w_ptrs + c * 32)
            w_hi = wv >> 16
        for gi in tl.static_range(PLANES // PPG):
            if GS > 0:
                g = tl.minimum(c * (CK // GS) + gi, (K - 1) // GS)  # padding: last group
                zneg = -(tl.load(z_ptr + g * N + rows).to(tl.float32))[:, None]
                sc = tl.load(s_ptr + g * N + rows).to(tl.float32)
                accg = tl.zeros((BN, BM), tl.float32)
            for pj in tl.static_range(PPG):
                if BITS == 3:
                    if gi * PPG + pj < 16:
                        v = plane3_qz(lo0, lo0_hi, hw, zneg, magic, gi * PPG + pj)
                    else:
                        v = plane3_qz(lo1, lo1_hi, hw, zneg, magic, gi * PPG + pj)
                else:
                    v = plane_qz(wv, w_hi, zneg, magic, gi * PPG + pj, BITS)
                kk = c * CK + (gi * PPG + pj) * 32 + offs_r
                xt = x_tile(x_ptrs, perm_ptr, kk, K, m_ok, HAS_PERM)  # (32, BM)
                if GS > 0:
                    accg = tl.dot(v.to(xt.dtype), xt, accg)
                else:
                    acc = tl.dot(v.to(xt.dtype), xt, acc)
            if GS > 0:
                acc += accg * sc[:, None]
    if GS == 0:
        acc = acc * tl.load(s_ptr + rows).to(tl.float32)[:, None]
    mask = (offs_n < N)[:, None] & m_ok[None, :]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    part_offs = offs_m[None, :] * N + offs_n[:, None]
    tile = pid_n * tl.num_programs(0) + pid_m
    store_or_reduce(acc, out_ptrs, part_ptr, part_offs, mask, cnt_ptr, tile, pid_k,
                    tl.num_programs(2), M * N, SPLIT)


@triton.jit(do_not_specialize=["n_chunks", "magic"])
def dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, W, n_chunks, stride_on, magic,
                   BITS: tl.constexpr, GS: tl.constexpr, BN: tl.constexpr):
    """out (N, Kp) = (q - z) * s in out's dtype, columns in repacked (act-order sorted) order;
    grid (N tiles, chunks)."""
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    CK: tl.constexpr = 1024 if BITS == 3 else 1024 // BITS  # columns per chunk
    PLANES: tl.constexpr = CK // 32
    PPG: tl.constexpr = PLANES if GS == 0 else GS // 32  # planes per group
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 32)
    rows = tl.minimum(offs_n, N - 1)
    w_ptrs = qw_ptr + rows[:, None].to(tl.int64) * W + offs_r[None, :]
    o_ptrs = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_r[None, :]
    n_ok = (offs_n < N)[:, None]
    if BITS == 3:
        lo0 = tl.load(w_ptrs + c * 64)
        lo1 = tl.load(w_ptrs + (c * 64 + 32))
        hw = tl.load(w_ptrs + (n_chunks * 64 + c * 32))
        lo0_hi = lo0 >> 16
        lo1_hi = lo1 >> 16
    else:
        wv = tl.load(w_ptrs + c * 32)
        w_hi = wv >> 16
    for gi in tl.static_range(PLANES // PPG):
        if GS > 0:
            g = tl.minimum(c * (CK // GS) + gi, (K - 1) // GS)  # padding: last group
        else:
            g = 0
        zneg = -(tl.load(z_ptr + g * N + rows).to(tl.float32))[:, None]
        sc = tl.load(s_ptr + g * N + rows).to(tl.float32)
        for pj in tl.static_range(PPG):
            if BITS == 3:
                if gi * PPG + pj < 16:
                    v = plane3_qz(lo0, lo0_hi, hw, zneg, magic, gi * PPG + pj)
                else:
                    v = plane3_qz(lo1, lo1_hi, hw, zneg, magic, gi * PPG + pj)
            else:
                v = plane_qz(wv, w_hi, zneg, magic, gi * PPG + pj, BITS)
            w = (v * sc[:, None]).to(tl.float16).to(out_ptr.dtype.element_ty)
            tl.store(o_ptrs + (c * CK + (gi * PPG + pj) * 32), w, mask=n_ok)
