"""4-bit kernels on the "pairs" layout (repack.py): every batch size, and its dequantizer.

Same scheme as gemm.wq_dot_kernel (swap AB: a program computes outᵀ for BN channels x BM rows
of x with ``tl.dot`` per 32-column plane; group scale on the fp32 partial sums; split-K with
the last-program reduction), but the weight tile of a chunk (128 columns, 16 words a row) is
unpacked with packed 16-bit arithmetic (planes.pair_qz): per word of 8 weights one shift,
four LOP3 and four fma.x2 (bf16: three shifts), against two 32-bit instructions per weight on
the planes layout. The plane comes out in the activation's 16-bit type, ready for the MMA.
"""

import triton
import triton.language as tl

from kvant.kernels.triton.planes import dup_pairs, pair_qz, store_or_reduce, x_tile


@triton.jit
def _zc(zf, SH: tl.constexpr, BF16: tl.constexpr):
    """The fma addend of pair_qz from zero points ``zf`` (R,) fp32, as (R, 1)."""
    if BF16:
        return (-(zf + 128.0)).to(tl.bfloat16)[:, None]
    else:
        return (-(zf + (1 << (10 - SH)))).to(tl.float16)[:, None]


@triton.jit
def _pick(i: tl.constexpr, a, b, c, d):
    """Element ``i`` of (a, b, c, d), chosen at compile time."""
    r = a
    if i == 1:
        r = b
    elif i == 2:
        r = c
    elif i == 3:
        r = d
    return r


@triton.jit
def _plane(d0, d1, d2, d3, zf, P: tl.constexpr, BF16: tl.constexpr):
    """(q - z) of plane P (0..3) of a chunk; d* are the duplicated, pre-shifted words (fp16:
    the caller passes d1 = d0 and d3 = d2, planes 1 and 3 sit 4 bits higher)."""
    SH: tl.constexpr = 0 if BF16 else 4 * (P % 2)
    return pair_qz(_pick(P, d0, d1, d2, d3), _zc(zf, SH, BF16), SH, BF16)


@triton.jit
def row_words(qw_ptr, rows, W, TH: tl.constexpr):
    """(R, 16) pointers to chunk 0 of ``rows`` in the pairs layout tiled by TH rows (TH = 1:
    row-major, W words a row; TH > 1: the 16 words of TH consecutive rows for one chunk are
    contiguous, chunk after chunk, so a tile of rows reads whole KB blocks)."""
    offs_c = tl.arange(0, 16)
    base = (rows // TH).to(tl.int64) * (TH * W) + (rows % TH) * 16
    return qw_ptr + base[:, None] + offs_c[None, :]


@triton.jit
def _group(z_ptr, s_ptr, rows, N, K, g, GS: tl.constexpr):
    """Zero points and scales (fp32, (R,)) of group ``g`` for ``rows`` (padding past K: the
    last group)."""
    g = tl.minimum(g, (K - 1) // GS)
    zf = tl.load(z_ptr + g * N + rows).to(tl.float32)
    sc = tl.load(s_ptr + g * N + rows).to(tl.float32)
    return zf, sc


@triton.jit
def _groups(z_ptr, s_ptr, rows, N, K, c, GS: tl.constexpr, NG: tl.constexpr):
    """The NG (1, 2 or 4) groups of chunk ``c``: (z0, s0, z1, s1, z2, s2, z3, s3), the
    unused ones repeating group 0 (no load)."""
    z0, s0 = _group(z_ptr, s_ptr, rows, N, K, c * NG, GS)
    z1, s1, z2, s2, z3, s3 = z0, s0, z0, s0, z0, s0
    if NG > 1:
        z1, s1 = _group(z_ptr, s_ptr, rows, N, K, c * NG + 1, GS)
    if NG > 2:
        z2, s2 = _group(z_ptr, s_ptr, rows, N, K, c * NG + 2, GS)
        z3, s3 = _group(z_ptr, s_ptr, rows, N, K, c * NG + 3, GS)
    return z0, s0, z1, s1, z2, s2, z3, s3


@triton.jit(do_not_specialize=["M", "chunks_per_split", "n_chunks"])
def wq_dot_pairs_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, part_ptr, cnt_ptr,
                        M, N, K, W, stride_xm, stride_om, chunks_per_split, n_chunks,
                        GS: tl.constexpr, HAS_PERM: tl.constexpr, SPLIT: tl.constexpr,
                        BN: tl.constexpr, BM: tl.constexpr, TH: tl.constexpr,
                        PREFETCH: tl.constexpr):
    """out (M, N) = x (M, K) @ W (N, K)ᵀ for a 4-bit pairs-layout W (W words a row, tiled
    by TH rows); grid (M tiles, N tiles, K splits).

    The weight words and x tiles are pipelined by Triton (cp.async into shared memory). The
    group scales and zero points are too narrow for that (1-2 bytes a thread), and as plain
    loads their memory latency was exposed once per chunk; with PREFETCH they are loaded one
    chunk ahead into registers, so each chunk's loads overlap the previous chunk's work
    (H200: +4-20 % at BM 16; at BM 64 it costs registers, so it is a launch option,
    dispatch.Config.prefetch)."""
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    CK: tl.constexpr = 128
    PLANES: tl.constexpr = 4
    PPG: tl.constexpr = PLANES if GS == 0 else GS // 32  # planes per group
    NG: tl.constexpr = PLANES // PPG  # groups per chunk
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 32)
    rows = tl.minimum(offs_n, N - 1)  # clamped: unmasked weight loads, tail rows discarded
    w_ptrs = row_words(qw_ptr, rows, W, TH)  # (BN, 16)
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm  # (1, BM)
    m_ok = offs_m < M
    c_lo = pid_k * chunks_per_split
    c_hi = c_lo + chunks_per_split
    if c_hi > n_chunks:
        c_hi = n_chunks
    acc = tl.zeros((BN, BM), tl.float32)
    if GS == 0:
        zf = tl.load(z_ptr + rows).to(tl.float32)
    else:  # the first chunk's groups; later ones arrive one chunk ahead (PREFETCH)
        z0, s0, z1, s1, z2, s2, z3, s3 = _groups(z_ptr, s_ptr, rows, N, K, c_lo, GS, NG)
    for c in range(c_lo, c_hi):
        wv = tl.load(w_ptrs + c * (TH * 16))
        if GS > 0:
            if PREFETCH:  # the next chunk's (the last chunk re-reads its own)
                n0, t0, n1, t1, n2, t2, n3, t3 = _groups(z_ptr, s_ptr, rows, N, K,
                                                         tl.minimum(c + 1, n_chunks - 1),
                                                         GS, NG)
            else:
                z0, s0, z1, s1, z2, s2, z3, s3 = _groups(z_ptr, s_ptr, rows, N, K, c, GS, NG)
        if BF16:
            d0 = dup_pairs(wv, BN)
            d1 = dup_pairs(wv >> 4, BN)
            d2 = dup_pairs(wv >> 8, BN)
            d3 = dup_pairs(wv >> 12, BN)
        else:
            d0 = dup_pairs(wv, BN)
            d2 = dup_pairs(wv >> 8, BN)
            d1 = d0
            d3 = d2
        for gi in tl.static_range(NG):
            if GS > 0:
                zf = _pick(gi, z0, z1, z2, z3)
                sc = _pick(gi, s0, s1, s2, s3)
                accg = tl.zeros((BN, BM), tl.float32)
            for pj in tl.static_range(PPG):
                v = _plane(d0, d1, d2, d3, zf, gi * PPG + pj, BF16)  # (BN, 32) x.dtype
                kk = c * CK + (gi * PPG + pj) * 32 + offs_r
                xt = x_tile(x_ptrs, perm_ptr, kk, K, m_ok, HAS_PERM)  # (32, BM)
                if GS > 0:
                    accg = tl.dot(v, xt, accg)
                else:
                    acc = tl.dot(v, xt, acc)
            if GS > 0:
                acc += accg * sc[:, None]
        if GS > 0 and PREFETCH:
            z0, s0, z1, s1, z2, s2, z3, s3 = n0, t0, n1, t1, n2, t2, n3, t3
    if GS == 0:
        acc = acc * tl.load(s_ptr + rows).to(tl.float32)[:, None]
    mask = (offs_n < N)[:, None] & m_ok[None, :]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    part_offs = offs_m[None, :] * N + offs_n[:, None]
    tile = pid_n * tl.num_programs(0) + pid_m
    store_or_reduce(acc, out_ptrs, part_ptr, part_offs, mask, cnt_ptr, tile, pid_k,
                    tl.num_programs(2), M * N, SPLIT)


@triton.jit(do_not_specialize=["n_chunks"])
def dequant_pairs_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, W, n_chunks, stride_on,
                         GS: tl.constexpr, BN: tl.constexpr, TH: tl.constexpr):
    """out (N, Kp) = (q - z) * s rounded to fp16, then out's dtype; grid (N tiles, chunks)."""
    CK: tl.constexpr = 128
    PLANES: tl.constexpr = 4
    PPG: tl.constexpr = PLANES if GS == 0 else GS // 32
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 32)
    rows = tl.minimum(offs_n, N - 1)
    wv = tl.load(row_words(qw_ptr, rows, W, TH) + c * (TH * 16))
    d0 = dup_pairs(wv, BN)
    d2 = dup_pairs(wv >> 8, BN)
    o_ptrs = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_r[None, :]
    n_ok = (offs_n < N)[:, None]
    for gi in tl.static_range(PLANES // PPG):
        if GS > 0:
            zf, sc = _group(z_ptr, s_ptr, rows, N, K, c * (CK // GS) + gi, GS)
        else:
            zf = tl.load(z_ptr + rows).to(tl.float32)
            sc = tl.load(s_ptr + rows).to(tl.float32)
        for pj in tl.static_range(PPG):
            v = _plane(d0, d0, d2, d2, zf, gi * PPG + pj, False).to(tl.float32)
            w = (v * sc[:, None]).to(tl.float16).to(out_ptr.dtype.element_ty)
            tl.store(o_ptrs + (c * CK + (gi * PPG + pj) * 32), w, mask=n_ok)
