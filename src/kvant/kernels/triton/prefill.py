"""Large-batch (prefill) kernels on the 4-bit pairs layout, and the fast dequantizer.

``wq_mma_pairs_kernel``: a tensor-core GEMM for 32..8192 rows of x. Like the decode kernel
(pairs.py) it computes the output transposed (weight = the MMA's A operand, dequantized in
registers; x = the B operand, pipelined into shared memory with cp.async), but built for
large tiles (BM 64-256 rows of x, BN 64-256 channels): the group scale is folded into the
16-bit weight (``(q - z) * s`` rounded once, exactly what the reference's fp16 weight is), so
every plane's ``tl.dot`` accumulates into one fp32 accumulator (no per-group partial sum, half
the accumulator registers of pairs.py, no per-chunk FMA over the tile); programs are ordered
in groups of ``GROUP_M`` M-tiles per weight tile (a wave reads each weight tile once and each
x tile a few times from L2); act-order inputs are permuted once on the host (a gather of x
per element would be slow at this size).

``dequant_pairs_fast_kernel``: the whole weight as fp16/bf16 for cuBLAS at very large M.
The slow part of the old dequantizer (planes-style, since removed: ~440 GB/s on the H200) was
two float conversions a weight (fp16 -> fp32 -> fp16, F2F issues at 16 a clock per SM); here
the weight is made in packed 16-bit arithmetic (three instructions per two weights) and
stored as it comes out, 64 bytes a row per plane.

Unpacking (``ASM``): the production path is inline PTX (:func:`pair_w`): LOP3 into the
mantissa of a half2 of 1024 (bf16: 128), one fma.x2 for the exact ``q - z``, one mul.x2 by
the group scale. Triton's CPU interpreter cannot run inline PTX, so ``ASM=False`` computes the
same values with integer shifts and fp32 math (for fp16: ``(q - z) * s`` is exact in fp32 and
rounded once; for bf16 the scale is first rounded to bf16, as the PTX path does); the two are
bit-identical (tests/kernels/test_prefill_gpu.py checks it on the GPU, test_prefill_interp.py
checks the pure path against the reference on the CPU). The pure path is for tests only.

bf16 activations: the weight is ``bf16((q - z) * bf16(s))``, within one bf16 rounding of the
reference's ``bf16(fp16((q - z) * s))``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kvant.kernels.triton import repack as rp
from kvant.kernels.triton.pairs import _groups, _pick, row_words
from kvant.kernels.triton.planes import dup_pairs, store_or_reduce

GROUP_M = 8  # M tiles per weight tile in the launch order (the usual L2 grouping)
CK = tl.constexpr(128)  # columns per chunk of the pairs layout


@triton.jit
def pair_w(wd, zc, sc, SH: tl.constexpr, BF16: tl.constexpr):
    """``(q - z) * s`` in fp16 or bf16, (R, 32), from pairs words duplicated by dup_pairs
    and shifted so the plane's nibbles sit at bits SH and 16 + SH (see planes.pair_qz: the
    LOP3 and fma.x2 there give the exact ``q - z``); one more mul.x2 (bf16: fma with -0)
    by the group scale ``sc`` (same dtype, broadcast per row) rounds the product once."""
    if BF16:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, s, nz; lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xea; "
            "mov.b32 s, 0x3F803F80; mov.b32 nz, 0x80008000; fma.rn.bf16x2 t, t, s, $3; "
            "fma.rn.bf16x2 $0, t, $4, nz; }",
            "=r,r,r,r,r", [wd, zc, sc], dtype=tl.bfloat16, is_pure=True, pack=2)
    elif SH == 0:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, s; lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xea; "
            "mov.b32 s, 0x3C003C00; fma.rn.f16x2 t, t, s, $3; mul.rn.f16x2 $0, t, $4; }",
            "=r,r,r,r,r", [wd, zc, sc], dtype=tl.float16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, s; lop3.b32 t, $1, 0x00F000F0, 0x64006400, 0xea; "
            "mov.b32 s, 0x2C002C00; fma.rn.f16x2 t, t, s, $3; mul.rn.f16x2 $0, t, $4; }",
            "=r,r,r,r,r", [wd, zc, sc], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _wplane(d0, d1, d2, d3, zf, sf, P: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr):
    """The scaled 16-bit weights (R, 32) of plane P (0..3) of a chunk. ``d*``: the duplicated
    words, pre-shifted as in pairs._plane (the pure path reads d0, unshifted); ``zf``, ``sf``:
    zero point and scale of each row, fp32 (R,)."""
    if ASM:
        SH: tl.constexpr = 0 if BF16 else 4 * (P % 2)
        wd = _pick(P, d0, d1, d2, d3)
        if BF16:
            zc = (-(zf + 128.0)).to(tl.bfloat16)[:, None]
            sc = sf.to(tl.bfloat16)[:, None]
        else:
            zc = (-(zf + (1 << (10 - SH)))).to(tl.float16)[:, None]
            sc = sf.to(tl.float16)[:, None]
        return pair_w(wd, zc, sc, SH, BF16)
    else:
        parity = tl.arange(0, 32) % 2  # column 2c + parity of word c
        q = (d0 >> (4 * P + 16 * parity)[None, :]) & 15
        v = q.to(tl.float32) - zf[:, None]
        if BF16:
            return (v * sf.to(tl.bfloat16).to(tl.float32)[:, None]).to(tl.bfloat16)
        else:
            return (v * sf[:, None]).to(tl.float16)


@triton.jit
def _dups(wv, R: tl.constexpr, BF16: tl.constexpr, ASM: tl.constexpr):
    """The duplicated words _wplane reads: (d0, d1, d2, d3)."""
    d0 = dup_pairs(wv, R)
    d1 = d0
    d2 = d0
    d3 = d0
    if ASM:
        if BF16:
            d1 = dup_pairs(wv >> 4, R)
            d2 = dup_pairs(wv >> 8, R)
            d3 = dup_pairs(wv >> 12, R)
        else:
            d2 = dup_pairs(wv >> 8, R)
            d3 = d2
    return d0, d1, d2, d3


@triton.jit(do_not_specialize=["M", "chunks_per_split", "n_chunks"])
def wq_mma_pairs_kernel(x_ptr, qw_ptr, g_ptr, out_ptr, part_ptr, cnt_ptr,
                        M, N, K, W, stride_xm, stride_om, chunks_per_split, n_chunks,
                        GS: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr,
                        BM: tl.constexpr, TH: tl.constexpr, GROUP: tl.constexpr,
                        KD: tl.constexpr, ASM: tl.constexpr):
    """out (M, N) = x (M, K) @ W (N, K)ᵀ for a 4-bit pairs-layout W (W words a row, tiled by
    TH rows), x in the repacked column order (act-order: permuted by the caller); grid
    (M tiles x N tiles in groups of GROUP M tiles, K splits). KD: columns per ``tl.dot``,
    32 (a dot per plane; Triton waits for each before the next) or 128 (the chunk's planes
    joined: one conversion of the (BN, 128) weight into the MMA layout and asynchronous
    wgmma chains across chunks; TTGIR for sm_90 compiled on the CPU)."""
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    PPG: tl.constexpr = 4 if GS == 0 else GS // 32  # planes per group
    NG: tl.constexpr = 4 // PPG  # groups per chunk
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    in_group = GROUP * grid_n
    first_m = (pid // in_group) * GROUP
    size_m = tl.minimum(grid_m - first_m, GROUP)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 32)
    rows = tl.minimum(offs_n, N - 1)  # clamped: unmasked weight loads, tail rows discarded
    w_ptrs = row_words(qw_ptr, rows, W, TH)  # (BN, 16)
    x_ptrs = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm  # (1, BM)
    m_ok = offs_m < M
    c_lo = pid_k * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, n_chunks)
    acc = tl.zeros((BN, BM), tl.float32)
    if GS == 0:  # one zero point and scale a row
        z0, s0, z1, s1, z2, s2, z3, s3 = _groups(g_ptr, rows, N, K, 0, GS, NG)
    for c in range(c_lo, c_hi):
        wv = tl.load(w_ptrs + c * (TH * 16))
        if GS > 0:  # group words: pipelined through shared memory with the weights
            z0, s0, z1, s1, z2, s2, z3, s3 = _groups(g_ptr, rows, N, K, c, GS, NG)
        d0, d1, d2, d3 = _dups(wv, BN, BF16, ASM)
        if KD == 128:  # the four planes joined, columns in order: one dot a chunk
            v0 = _wplane(d0, d1, d2, d3, z0, s0, 0, BF16, ASM)
            v1 = _wplane(d0, d1, d2, d3, _pick(1 // PPG, z0, z1, z2, z3),
                         _pick(1 // PPG, s0, s1, s2, s3), 1, BF16, ASM)
            v2 = _wplane(d0, d1, d2, d3, _pick(2 // PPG, z0, z1, z2, z3),
                         _pick(2 // PPG, s0, s1, s2, s3), 2, BF16, ASM)
            v3 = _wplane(d0, d1, d2, d3, _pick(3 // PPG, z0, z1, z2, z3),
                         _pick(3 // PPG, s0, s1, s2, s3), 3, BF16, ASM)
            # (BN, 32, a, b) = plane 2b + a -> (BN, b, a, 32) -> column (2b + a) * 32 + r
            v = tl.join(tl.join(v0, v1), tl.join(v2, v3))
            v = tl.reshape(tl.permute(v, (0, 3, 2, 1)), (BN, CK))
            kk = c * CK + tl.arange(0, CK)
            xt = tl.load(x_ptrs + kk[:, None], mask=(kk < K)[:, None] & m_ok[None, :],
                         other=0.0)  # (128, BM)
            acc = tl.dot(v, xt, acc)
        else:  # one dot a plane
            for j in tl.static_range(4):
                v = _wplane(d0, d1, d2, d3, _pick(j // PPG, z0, z1, z2, z3),
                            _pick(j // PPG, s0, s1, s2, s3), j, BF16, ASM)  # (BN, 32)
                kk = c * CK + j * 32 + offs_r
                xt = tl.load(x_ptrs + kk[:, None], mask=(kk < K)[:, None] & m_ok[None, :],
                             other=0.0)  # (32, BM)
                acc = tl.dot(v, xt, acc)
    mask = (offs_n < N)[:, None] & m_ok[None, :]
    out_ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    part_offs = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
    store_or_reduce(acc, out_ptrs, part_ptr, part_offs, mask, cnt_ptr, pid, pid_k,
                    tl.num_programs(1), M * N, SPLIT)


@triton.jit
def dequant_pairs_fast_kernel(qw_ptr, g_ptr, out_ptr, N, K, W, stride_on,
                              GS: tl.constexpr, BN: tl.constexpr, TH: tl.constexpr,
                              ASM: tl.constexpr):
    """out (N, Kp) = (q - z) * s in out's 16-bit dtype (see the module docstring for bf16),
    columns in the repacked order; grid (chunks, N tiles): neighbouring programs write
    neighbouring columns of the same rows."""
    BF16: tl.constexpr = out_ptr.dtype.element_ty == tl.bfloat16
    PPG: tl.constexpr = 4 if GS == 0 else GS // 32
    NG: tl.constexpr = 4 // PPG
    c = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, 32)
    rows = tl.minimum(offs_n, N - 1)
    wv = tl.load(row_words(qw_ptr, rows, W, TH) + c * (TH * 16))
    z0, s0, z1, s1, z2, s2, z3, s3 = _groups(g_ptr, rows, N, K, c, GS, NG)
    d0, d1, d2, d3 = _dups(wv, BN, BF16, ASM)
    o_ptrs = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + (c * CK + offs_r)[None, :]
    n_ok = (offs_n < N)[:, None]
    for j in tl.static_range(4):
        v = _wplane(d0, d1, d2, d3, _pick(j // PPG, z0, z1, z2, z3),
                    _pick(j // PPG, s0, s1, s2, s3), j, BF16, ASM)
        tl.store(o_ptrs + j * 32, v, mask=n_ok)


# ---------------------------------------------------------------- host side


def _need_pairs(p: rp.PackedWeight) -> None:
    if not p.pairs:
        raise NotImplementedError("the prefill kernels read the 4-bit pairs layout only "
                                  f"(this weight: {p.bits} bits, planes layout)")


def launch_mma(x2: torch.Tensor, p: rp.PackedWeight, bn: int, bm: int, split: int, warps: int,
               stages: int, out: torch.Tensor, counters: Optional[torch.Tensor],
               kd: int = 128, asm: bool = True) -> torch.Tensor:
    """out (M, N) = x2 (M, K) @ Wᵀ through :func:`wq_mma_pairs_kernel` with a (BN, BM) tile,
    ``kd`` columns a dot (32 or 128) and ``split`` K splits (reduced by the last program,
    dispatch's tile counters); ``asm=False`` is the pure-Triton unpacking, for tests only."""
    if kd not in (32, 128):
        raise ValueError(f"kd must be 32 or 128 columns a dot, got {kd}")
    _need_pairs(p)
    m, k = x2.shape
    n = p.out_features
    if p.perm is not None:  # act-order: one gather of x here instead of one per element
        x2 = x2.index_select(1, p.perm.long())
    n_chunks = p.k_padded // rp.chunk_k(4, True)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    cps = triton.cdiv(n_chunks, max(1, min(split, n_chunks)))
    split = triton.cdiv(n_chunks, cps)
    if split > 1 and (counters is None or tiles > counters.numel()):
        split, cps = 1, n_chunks
    part = (torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
            if split > 1 else out)
    wq_mma_pairs_kernel[(tiles, split)](
        x2, p.qweight, rp.group_words(p), out, part,
        counters if split > 1 else p.qweight,
        m, n, k, p.qweight.shape[1], x2.stride(0), out.stride(0), cps, n_chunks,
        GS=p.group_size, SPLIT=split > 1, BN=bn, BM=bm, TH=p.tile, GROUP=GROUP_M, KD=kd, ASM=asm,
        num_warps=warps, num_stages=stages)
    return out


def dequantize_pairs(p: rp.PackedWeight, dtype: torch.dtype, out: Optional[torch.Tensor] = None,
                     bn: int = 64, asm: bool = True) -> torch.Tensor:
    """The (N, Kp) weight in ``dtype`` (fp16: exactly the reference's weight; bf16: see the
    module docstring), columns in the repacked order, padding columns zero-weight garbage;
    written into ``out`` when given (a reusable buffer, :func:`weight_buffer`)."""
    _need_pairs(p)
    n, kp = p.out_features, p.k_padded
    if out is None:
        out = torch.empty((n, kp), dtype=dtype, device=p.qweight.device)
    dequant_pairs_fast_kernel[(kp // rp.chunk_k(4, True), triton.cdiv(n, bn))](
        p.qweight, rp.group_words(p), out, n, p.in_features, p.qweight.shape[1],
        out.stride(0), GS=p.group_size, BN=bn, TH=p.tile, ASM=asm, num_warps=4)
    return out


_BUFFERS: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def weight_buffer(device: torch.device, dtype: torch.dtype, n: int, kp: int) -> torch.Tensor:
    """An (n, kp) view of this device's reusable dequantization buffer for ``dtype``, grown to
    the largest weight seen (allocated outside graph capture only; a capture that needs a
    larger one gets a graph-private tensor, not kept). One buffer for every layer: the layers
    of a stream run one after the other, so they never need it at the same time (like the
    split-K counters, it assumes one stream uses the kernels at a time)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _BUFFERS.get((idx, dtype))
    if buf is None or buf.numel() < n * kp:
        fresh = torch.empty(n * kp, dtype=dtype, device=device)
        if torch.cuda.is_current_stream_capturing():
            return fresh.view(n, kp)
        buf = _BUFFERS[(idx, dtype)] = fresh
    return buf[: n * kp].view(n, kp)


def release_buffers() -> None:
    """Drop the reusable dequantization buffers (their memory returns to PyTorch's cache)."""
    _BUFFERS.clear()
