"""CUDA-core kernel for one row of x (batch 1): unpack, FMA, reduce once at the end.

A program owns BN output channels of one row of x and walks its share of K chunk by chunk.
Every plane (32 consecutive columns, repack.py) is unpacked to ``q - z`` in registers and
multiplied element-wise into a (BN, 32) fp32 accumulator in the layout the weight tile was
loaded in (16-byte loads along K, no shared-memory shuffle), so the loop has no cross-thread
reduction; the group scale is applied once per group and the sum over the 32 columns happens
once, after the loop. Split-K as in gemm.py.
"""

import triton
import triton.language as tl

from kvant.kernels.triton.planes import plane3_qz, plane_qz, store_or_reduce


@triton.jit(do_not_specialize=["M", "chunks_per_split", "n_chunks", "magic"])
def wq_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, part_ptr, cnt_ptr,
                   M, N, K, W, stride_xm, stride_om, chunks_per_split, n_chunks, magic,
                   BITS: tl.constexpr, GS: tl.constexpr, HAS_PERM: tl.constexpr,
                   SPLIT: tl.constexpr, BN: tl.constexpr, CPI: tl.constexpr):
    """out (M, N) = x (M, K) @ W (N, K)ᵀ, one row of x per program, CPI chunks per loop
    iteration (grid (M, N tiles, K splits)); other arguments as gemm.wq_dot_kernel."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    CK: tl.constexpr = 1024 if BITS == 3 else 1024 // BITS  # columns per chunk
    PLANES: tl.constexpr = CK // 32
    PPG: tl.constexpr = PLANES if GS == 0 else GS // 32  # planes per group
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_h = tl.arange(0, CPI)
    offs_r = tl.arange(0, 32)
    rows = tl.minimum(offs_n, N - 1)  # clamped: unmasked weight loads, tail rows discarded
    # (BN, CPI, 32) pointers: CPI consecutive chunks of a row are consecutive words
    w_ptrs = (qw_ptr + rows[:, None, None].to(tl.int64) * W + offs_h[None, :, None] * 32
              + offs_r[None, None, :])
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    c_lo = pid_k * chunks_per_split
    c_hi = c_lo + chunks_per_split
    if c_hi > n_chunks:
        c_hi = n_chunks
    acc = tl.zeros((BN, CPI, 32), tl.float32)
    if GS == 0:  # one zero point a row
        zneg = -(tl.load(z_ptr + rows).to(tl.float32))[:, None, None]
    for c in range(c_lo, c_hi, CPI):
        # one unmasked load for all CPI chunks: a short tail shifts the window back inside
        # the weight and masks x of the chunks it re-reads (launch() keeps CPI <= n_chunks)
        cw = tl.minimum(c, n_chunks - CPI) if CPI > 1 else c
        if BITS == 3:
            w0 = tl.load(w_ptrs + cw * 64 + offs_h[None, :, None] * 32)
            w1 = tl.load(w_ptrs + (cw * 64 + 32) + offs_h[None, :, None] * 32)
            wh = tl.load(w_ptrs + (n_chunks * 64 + cw * 32))
        else:
            w0 = tl.load(w_ptrs + cw * 32)
            w1 = w0
            wh = w0
        ch = cw + offs_h  # (CPI,) chunk of each slice
        valid = (ch >= c) & (ch < c_hi)
        w0_hi = w0 >> 16
        w1_hi = w1 >> 16
        for gi in tl.static_range(PLANES // PPG):
            if GS > 0:
                g = tl.minimum(ch * (CK // GS) + gi, (K - 1) // GS)  # (CPI,) padding: last
                zneg = -(tl.load(z_ptr + g[None, :] * N + rows[:, None]).to(tl.float32))
                zneg = zneg[:, :, None]  # (BN, CPI, 1)
                sc = tl.load(s_ptr + g[None, :] * N + rows[:, None]).to(tl.float32)
                accg = tl.zeros((BN, CPI, 32), tl.float32)
            for pj in tl.static_range(PPG):
                if BITS == 3:
                    if gi * PPG + pj < 16:
                        v = plane3_qz(w0, w0_hi, wh, zneg, magic, gi * PPG + pj)
                    else:
                        v = plane3_qz(w1, w1_hi, wh, zneg, magic, gi * PPG + pj)
                else:
                    v = plane_qz(w0, w0_hi, zneg, magic, gi * PPG + pj, BITS)
                kk = ch[:, None] * CK + (gi * PPG + pj) * 32 + offs_r[None, :]  # (CPI, 32)
                k_ok = (kk < K) & valid[:, None]
                if HAS_PERM:
                    kx = tl.load(perm_ptr + kk, mask=k_ok, other=0)
                else:
                    kx = kk
                xk = tl.load(x_row + kx, mask=k_ok, other=0.0).to(tl.float32)
                if GS > 0:
                    accg += v * xk[None, :, :]
                else:
                    acc += v * xk[None, :, :]
            if GS > 0:
                acc += accg * sc[:, :, None]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BN,)
    if GS == 0:
        y = y * tl.load(s_ptr + rows).to(tl.float32)
    mask = offs_n < N
    out_ptrs = out_ptr + pid_m * stride_om + offs_n
    part_offs = pid_m * N + offs_n
    tile = pid_n * tl.num_programs(0) + pid_m
    store_or_reduce(y, out_ptrs, part_ptr, part_offs, mask, cnt_ptr, tile, pid_k,
                    tl.num_programs(2), M * N, SPLIT)
