"""The 4-bit kernel on the "pairs" layout (repack.py) for batches up to 64, and the device
helpers the prefill kernels (prefill.py) share with it.

Same scheme as gemm.wq_dot_kernel (swap AB: a program computes outᵀ for BN channels x BM rows
of x with ``tl.dot``; group scale on the fp32 partial sums; split-K with the last-program
reduction), but the weight tile of a chunk (128 columns, 16 words a row) is unpacked with
packed 16-bit arithmetic (planes.pair_qz): per word of 8 weights one shift, four LOP3 and
four fma.x2 (bf16: three shifts), against two 32-bit instructions per weight on the planes
layout. The plane comes out in the activation's 16-bit type, ready for the MMA. A group's
scale and zero point arrive as one int32 group word (repack.group_words).
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
def _group(g_ptr, rows, N, K, g, GS: tl.constexpr):
    """Zero points and scales (fp32, (R,)) of group ``g`` for ``rows`` from the group words
    at ``g_ptr`` (repack.group_words: (G, N) int32, fp16 scale low, fp16 zero point high;
    GS 0: one group; padding past K: the last group). One 4-byte load a row: Triton
    pipelines it through shared memory like the weight words."""
    if GS > 0:
        g = tl.minimum(g, (K - 1) // GS)
    else:
        g = 0
    w = tl.load(g_ptr.to(tl.pointer_type(tl.int32)) + g * N + rows)
    sc = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    zf = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return zf, sc


@triton.jit
def _groups(g_ptr, rows, N, K, c, GS: tl.constexpr, NG: tl.constexpr):
    """The NG (1, 2 or 4) groups of chunk ``c``: (z0, s0, z1, s1, z2, s2, z3, s3), the
    unused ones repeating group 0 (no load)."""
    z0, s0 = _group(g_ptr, rows, N, K, c * NG, GS)
    z1, s1, z2, s2, z3, s3 = z0, s0, z0, s0, z0, s0
    if NG > 1:
        z1, s1 = _group(g_ptr, rows, N, K, c * NG + 1, GS)
    if NG > 2:
        z2, s2 = _group(g_ptr, rows, N, K, c * NG + 2, GS)
        z3, s3 = _group(g_ptr, rows, N, K, c * NG + 3, GS)
    return z0, s0, z1, s1, z2, s2, z3, s3


@triton.jit
def _chunk_planes(d0, d1, d2, d3, zf, BN: tl.constexpr, BF16: tl.constexpr):
    """(q - z) of a chunk's four planes joined along K into (BN, 128), columns in order
    (one zero point a row: one group a chunk). The join is a register relabelling."""
    v0 = _plane(d0, d1, d2, d3, zf, 0, BF16)
    v1 = _plane(d0, d1, d2, d3, zf, 1, BF16)
    v2 = _plane(d0, d1, d2, d3, zf, 2, BF16)
    v3 = _plane(d0, d1, d2, d3, zf, 3, BF16)
    v01 = tl.reshape(tl.permute(tl.join(v0, v1), (0, 2, 1)), (BN, 64))
    v23 = tl.reshape(tl.permute(tl.join(v2, v3), (0, 2, 1)), (BN, 64))
    return tl.reshape(tl.permute(tl.join(v01, v23), (0, 2, 1)), (BN, 128))


@triton.jit(do_not_specialize=["M", "chunks_per_split", "n_chunks"])
def wq_dot_pairs_kernel(x_ptr, qw_ptr, g_ptr, perm_ptr, out_ptr, part_ptr, cnt_ptr,
                        M, N, K, W, stride_xm, stride_om, chunks_per_split, n_chunks,
                        GS: tl.constexpr, HAS_PERM: tl.constexpr, SPLIT: tl.constexpr,
                        BN: tl.constexpr, BM: tl.constexpr, TH: tl.constexpr):
    """out (M, N) = x (M, K) @ W (N, K)ᵀ for a 4-bit pairs-layout W (W words a row, tiled
    by TH rows; group words at ``g_ptr``); grid (M tiles, N tiles, K splits).

    The weight words, the group words and the x tiles are all pipelined by Triton
    (cp.async into shared memory, ``num_stages``). With one group a chunk (GS 128, or per
    channel) the chunk's four planes are joined into one K=128 dot, awaited once; smaller
    groups take a dot a plane, each group's partial sum scaled on its own."""
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
        zc, sc = _group(g_ptr, rows, N, K, 0, GS)
    for c in range(c_lo, c_hi):
        wv = tl.load(w_ptrs + c * (TH * 16))
        if GS > 0:
            z0, s0, z1, s1, z2, s2, z3, s3 = _groups(g_ptr, rows, N, K, c, GS, NG)
        else:
            z0 = zc
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
        if NG == 1:  # one group a chunk: one K=128 dot
            v = _chunk_planes(d0, d1, d2, d3, z0, BN, BF16)  # (BN, 128) x.dtype
            xt = x_tile(x_ptrs, perm_ptr, c * CK + tl.arange(0, CK), K, m_ok, HAS_PERM)
            if GS > 0:
                acc += tl.dot(v, xt) * s0[:, None]
            else:
                acc = tl.dot(v, xt, acc)
        else:
            for gi in tl.static_range(NG):
                zf = _pick(gi, z0, z1, z2, z3)
                sg = _pick(gi, s0, s1, s2, s3)
                accg = tl.zeros((BN, BM), tl.float32)
                for pj in tl.static_range(PPG):
                    v = _plane(d0, d1, d2, d3, zf, gi * PPG + pj, BF16)  # (BN, 32) x.dtype
                    kk = c * CK + (gi * PPG + pj) * 32 + offs_r
                    xt = x_tile(x_ptrs, perm_ptr, kk, K, m_ok, HAS_PERM)  # (32, BM)
                    accg = tl.dot(v, xt, accg)
                acc += accg * sg[:, None]
    if GS == 0:
        acc = acc * sc[:, None]
    mask = (offs_n < N)[:, None] & m_ok[None, :]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    part_offs = offs_m[None, :] * N + offs_n[:, None]
    tile = pid_n * tl.num_programs(0) + pid_m
    store_or_reduce(acc, out_ptrs, part_ptr, part_offs, mask, cnt_ptr, tile, pid_k,
                    tl.num_programs(2), M * N, SPLIT)
