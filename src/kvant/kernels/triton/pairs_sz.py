"""EXPERIMENT (not dispatched): the 4-bit pairs kernel with each (group, row)'s scale and zero
point packed into one int32 (fp16 scale low, fp16 zero point high), so the group parameters
are 4 bytes a thread and Triton pipelines them through shared memory with the weights
(cp.async), and the shared-memory load can produce them in the MMA layouts directly (no
convert_layout round trip with two barriers per use, as the register prefetch needs)."""

import torch
import triton
import triton.language as tl

from kvant.kernels.triton.pairs import _pick, _plane, row_words
from kvant.kernels.triton.planes import dup_pairs, store_or_reduce, x_tile


def pack_sz(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(G, N) fp16 scales and (G, N) uint8 zero points -> (G, N) int32 words."""
    s = scales.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    z = zeros.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    return s | (z << 16)


@triton.jit
def _sz(sz_ptr, rows, N, K, g, GS: tl.constexpr):
    g = tl.minimum(g, (K - 1) // GS)
    w = tl.load(sz_ptr + g * N + rows)
    sc = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    zf = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return zf, sc


@triton.jit(do_not_specialize=["M", "chunks_per_split", "n_chunks"])
def wq_dot_pairs_sz_kernel(x_ptr, qw_ptr, sz_ptr, perm_ptr, out_ptr, part_ptr, cnt_ptr,
                           M, N, K, W, stride_xm, stride_om, chunks_per_split, n_chunks,
                           GS: tl.constexpr, HAS_PERM: tl.constexpr, SPLIT: tl.constexpr,
                           BN: tl.constexpr, BM: tl.constexpr, TH: tl.constexpr,
                           ONE_DOT: tl.constexpr = False):
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    CK: tl.constexpr = 128
    PLANES: tl.constexpr = 4
    PPG: tl.constexpr = GS // 32
    NG: tl.constexpr = PLANES // PPG
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 32)
    rows = tl.minimum(offs_n, N - 1)
    w_ptrs = row_words(qw_ptr, rows, W, TH)
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm
    m_ok = offs_m < M
    c_lo = pid_k * chunks_per_split
    c_hi = c_lo + chunks_per_split
    if c_hi > n_chunks:
        c_hi = n_chunks
    acc = tl.zeros((BN, BM), tl.float32)
    for c in range(c_lo, c_hi):
        wv = tl.load(w_ptrs + c * (TH * 16))
        z0, s0 = _sz(sz_ptr, rows, N, K, c * NG, GS)
        z1, s1, z2, s2, z3, s3 = z0, s0, z0, s0, z0, s0
        if NG > 1:
            z1, s1 = _sz(sz_ptr, rows, N, K, c * NG + 1, GS)
        if NG > 2:
            z2, s2 = _sz(sz_ptr, rows, N, K, c * NG + 2, GS)
            z3, s3 = _sz(sz_ptr, rows, N, K, c * NG + 3, GS)
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
        if ONE_DOT and NG == 1:  # the chunk's 4 planes joined along K: one K=128 dot
            v0 = _plane(d0, d1, d2, d3, z0, 0, BF16)
            v1 = _plane(d0, d1, d2, d3, z0, 1, BF16)
            v2 = _plane(d0, d1, d2, d3, z0, 2, BF16)
            v3 = _plane(d0, d1, d2, d3, z0, 3, BF16)
            v01 = tl.reshape(tl.permute(tl.join(v0, v1), (0, 2, 1)), (BN, 64))
            v23 = tl.reshape(tl.permute(tl.join(v2, v3), (0, 2, 1)), (BN, 64))
            v = tl.reshape(tl.permute(tl.join(v01, v23), (0, 2, 1)), (BN, 128))
            xt = x_tile(x_ptrs, perm_ptr, c * CK + tl.arange(0, 128), K, m_ok, HAS_PERM)
            acc += tl.dot(v, xt) * s0[:, None]
        for gi in tl.static_range(0 if (ONE_DOT and NG == 1) else NG):
            zf = _pick(gi, z0, z1, z2, z3)
            sc = _pick(gi, s0, s1, s2, s3)
            accg = tl.zeros((BN, BM), tl.float32)
            for pj in tl.static_range(PPG):
                v = _plane(d0, d1, d2, d3, zf, gi * PPG + pj, BF16)
                kk = c * CK + (gi * PPG + pj) * 32 + offs_r
                xt = x_tile(x_ptrs, perm_ptr, kk, K, m_ok, HAS_PERM)
                accg = tl.dot(v, xt, accg)
            acc += accg * sc[:, None]
    mask = (offs_n < N)[:, None] & m_ok[None, :]
    out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    part_offs = offs_m[None, :] * N + offs_n[:, None]
    tile = pid_n * tl.num_programs(0) + pid_m
    store_or_reduce(acc, out_ptrs, part_ptr, part_offs, mask, cnt_ptr, tile, pid_k,
                    tl.num_programs(2), M * N, SPLIT)
