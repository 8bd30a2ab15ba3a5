"""Triton kernel for E8P lattice codes (QuIP#): ``y = x @ Ŵᵀ`` at batch 1-16, Ŵ decoded on the
fly from the stored 16-bit codes (kernels/codebook.py has the op and the reference,
core/e8p_words.py builds the word tables).

Decoding 8 weights (one code ``c``): ``idx = c & 255`` picks a row of 4 words of the absolute
table (the 8 |values| in the activation dtype, two a word, the parity of Σa already in entry
7's sign bit); the 7 sign bits ``(c >> 8) & 127`` become 4 XOR masks (a 128-row table, or
computed: the parity of the 7 bits is entry 7's sign, one multiply spreads bit pairs to bits
15 and 31); one XOR a word gives the signed values exactly, as fp16/bf16 bit patterns. The
shift bit ``t`` (±¼ on all 8) never touches the weights: ``Σ_i (σa_i + t/4) x_i = Σ σa_i x_i +
t/4 · Σ_i x_i``, so the kernel sums x over each block of 8 once per program and adds
``¼ (Σ_j xs_j − 2 Σ_j tbit_j xs_j)``. Each stage (E8P, then the residual E8P1 or E8P) keeps its
own accumulators and is scaled once at the end by its per-row or per-layer scale.

A program owns BN output rows and a K-slice (split-K: partial tiles reduced by the last
program, planes.store_or_reduce), walking BKB codes (8·BKB columns) a row per iteration and
loading the next iteration's codes before decoding this one's. Three products (``DOT``):
CUDA cores (one row of x a program, fp32 FMAs into a (BN, BKB, ·) accumulator reduced once
after the loop, as gemv.py), ``x @ Wᵀ`` or ``(W @ xᵀ)ᵀ`` on tensor cores (x padded to 16
rows); three ways to turn table words into the dot's operand (``UNPACK``): even and odd
halves as two products, halves joined back in column order, or the tables read as 16-bit
values. Which is fastest is measured (benchmarks/codebook_kernel.py), not assumed.

A CUDA-core launch (``dot`` 0) with ``paired`` set and an even number of codes a row runs
the paired kernel of e8p_gemv.py instead (packed half-precision products, 3.75 instead of
8.8 sm_90 instructions a weight at 2 bits offline: benchmarks/e8p_sass_count.py; yet 30-70 %
slower than the form here on the H200, benchmarks/results/codebook_kernel.md, so it is a
tuning candidate, not the default).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from kvant.kernels.codebook import KERNEL_MAX_M, RESID, split_tables
from kvant.kernels.triton.e8p_configs import (  # noqa: F401  (re-exported)
    DOT_TILES, GEMV_TILES, Config, auto_split, candidates, heuristic, smem_estimate)
from kvant.kernels.triton import e8p_gemv
from kvant.kernels.triton.e8p_gemv import e8p_gemv_kernel, gemv_split, resid_words  # noqa: F401
from kvant.kernels.triton.planes import device_counters, split_k_buffers, store_or_reduce

log = logging.getLogger(__name__)
_MASK_HI = tl.constexpr(-2147450880)  # 0x80008000 as int32: bits 15 and 31
_RESID_KIND = {None: 0, "e8p1": 1, "e8p": 2}


@triton.jit
def _codes(q_ptr, rows, b0, b_hi, KB, BKB: tl.constexpr, EVEN: tl.constexpr):
    """The stored codes (BN, BKB) of rows ``rows`` and blocks ``b0 .. b0+BKB`` (0 past
    ``b_hi`` unless EVEN), in their stored dtype; streamed once, so kept out of L1's way."""
    kb = b0 + tl.arange(0, BKB)
    q_ptrs = q_ptr + rows[:, None].to(tl.int64) * KB + kb[None, :]
    if EVEN:
        return tl.load(q_ptrs, eviction_policy="evict_first")
    return tl.load(q_ptrs, mask=(kb < b_hi)[None, :], other=0, eviction_policy="evict_first")


@triton.jit
def _decode_halves(c, absh_ptr, sgnh_ptr, IB: tl.constexpr, DT: tl.constexpr):
    """Codes (BN, BKB) int32 -> w (BN, BKB, 8) in DT without the shift: both tables read as
    16-bit values (int16 pointers), one XOR a weight. IB: index bits (8: E8P; 0: E8P1,
    absolute row 256)."""
    offs_h = tl.arange(0, 8)
    if IB > 0:
        a = tl.load(absh_ptr + (c & 255)[:, :, None] * 8 + offs_h[None, None, :])
    else:
        a = tl.load(absh_ptr + 256 * 8 + offs_h)[None, None, :]
    m = tl.load(sgnh_ptr + ((c >> IB) & 127)[:, :, None] * 8 + offs_h[None, None, :])
    return (a ^ m).to(DT, bitcast=True)


@triton.jit
def _decode_words(c, absw_ptr, sgn_ptr, IB: tl.constexpr, SIGN_TABLE: tl.constexpr,
                  DT: tl.constexpr):
    """Codes (BN, BKB) int32 -> (lo, hi) (BN, BKB, 4) in DT without the shift: the even and
    odd weights of each 32-bit word of the tables, one XOR a word (masks from the sign
    table or computed)."""
    offs_w = tl.arange(0, 4)
    s7 = (c >> IB) & 127
    if IB > 0:
        a = tl.load(absw_ptr + (c & 255)[:, :, None] * 4 + offs_w[None, None, :])
    else:
        a = tl.load(absw_ptr + 256 * 4 + offs_w)[None, None, :]
    if SIGN_TABLE:
        m = tl.load(sgn_ptr + s7[:, :, None] * 4 + offs_w[None, None, :])
    else:
        p = s7 ^ (s7 >> 4)
        p = p ^ (p >> 2)
        p = p ^ (p >> 1)
        s8 = s7 | ((p & 1) << 7)  # bit 7: the implied 8th sign (before the table's parity)
        # word j takes sign bits 2j -> 15 and 2j+1 -> 31: s8 * (2^(15-2j) + 2^(30-2j)), the
        # two shifted copies never overlap, so no carry reaches bits 15 and 31
        mul = (1 << (15 - 2 * offs_w)) + (1 << (30 - 2 * offs_w))
        m = (s8[:, :, None] * mul[None, None, :]) & _MASK_HI
    w = a ^ m  # (BN, BKB, 4) two signed values a word
    lo = w.to(tl.int16).to(DT, bitcast=True)
    hi = (w >> 16).to(tl.int16).to(DT, bitcast=True)
    return lo, hi


@triton.jit
def _one_or_zero(bit, DT: tl.constexpr):
    """int32 0/1 -> 0.0/1.0 in DT by its bit pattern (a multiply, not a slow conversion)."""
    if DT == tl.bfloat16:
        return (bit * 0x3F80).to(tl.int16).to(DT, bitcast=True)
    return (bit * 0x3C00).to(tl.int16).to(DT, bitcast=True)


@triton.jit
def _product(acc, sh, c, x8, xe, xo, xs, absw_ptr, sgn_ptr, IB: tl.constexpr,
             SIGN_TABLE: tl.constexpr, DOT: tl.constexpr, UNPACK: tl.constexpr,
             DT: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr):
    """One stage's codes ``c`` (BN, BKB) times this iteration's x, added into ``acc``, and
    the shift-bit sums into ``sh``. x8: the x columns ((BKB, 8) fp32 for DOT 0, (BM, BKB*8)
    in DT for DOT 1/2), xe/xo their even/odd columns ((BKB, 4) / (BM, BKB*4)), xs the block
    sums ((BKB,) fp32 / (BM, BKB) in DT). UNPACK 0: the even and odd weights of each
    32-bit table word multiply xe and xo; 1: the words' halves joined back in column order;
    2: the tables read as 16-bit values (needs SIGN_TABLE)."""
    c = c.to(tl.int32)  # int16 sign-extends: every field below is masked after its shift
    tb = (c >> (IB + 7)) & 1  # the shift bit (1: -¼)
    if UNPACK == 2:
        w = _decode_halves(c, absw_ptr, sgn_ptr, IB, DT)
        hi = w
    else:
        w, hi = _decode_words(c, absw_ptr, sgn_ptr, IB, SIGN_TABLE, DT)
        if UNPACK == 1:
            w = tl.reshape(tl.join(w, hi), (BN, BKB, 8))
    if DOT == 0:
        if UNPACK == 0:
            acc += w.to(tl.float32) * xe[None, :, :]
            acc += hi.to(tl.float32) * xo[None, :, :]
        else:  # (BN, BKB, 8) against x8 (BKB, 8)
            acc += w.to(tl.float32) * x8[None, :, :]
        sh += tb.to(tl.float32) * xs[None, :]
    elif DOT == 1:  # (BM, BN) += x (BM, BKB*8) @ W (BKB*8, BN)
        if UNPACK == 0:
            acc = tl.dot(xe, tl.trans(tl.reshape(w, (BN, BKB * 4))), acc)
            acc = tl.dot(xo, tl.trans(tl.reshape(hi, (BN, BKB * 4))), acc)
        else:
            acc = tl.dot(x8, tl.trans(tl.reshape(w, (BN, BKB * 8))), acc)
        sh = tl.dot(xs, tl.trans(_one_or_zero(tb, DT)), sh)
    else:  # (BN, BM) += W (BN, BKB*8) @ xᵀ (BKB*8, BM): the weights are the A operand
        if UNPACK == 0:
            acc = tl.dot(tl.reshape(w, (BN, BKB * 4)), tl.trans(xe), acc)
            acc = tl.dot(tl.reshape(hi, (BN, BKB * 4)), tl.trans(xo), acc)
        else:
            acc = tl.dot(tl.reshape(w, (BN, BKB * 8)), tl.trans(x8), acc)
        sh = tl.dot(_one_or_zero(tb, DT), tl.trans(xs), sh)
    return acc, sh


@triton.jit(do_not_specialize=["M", "iters"])
def e8p_kernel(x_ptr, q1_ptr, q2_ptr, s_ptr, absw_ptr, sgn_ptr, out_ptr, part_ptr, cnt_ptr,
               M, N, KB, stride_xm, stride_om, stride_ss, stride_sn, iters,
               RESID: tl.constexpr, DOT: tl.constexpr, SIGN_TABLE: tl.constexpr,
               UNPACK: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BKB: tl.constexpr):
    """out (M, N) = x (M, 8·KB) @ Ŵ (N, 8·KB)ᵀ. Grid (M tiles, N tiles, K splits); RESID 0
    (2 bits), 1 (E8P1 residual, 3 bits), 2 (E8P residual, 4 bits); DOT 0 (CUDA cores, BM 1),
    1 (x @ Wᵀ on tensor cores), 2 ((W @ xᵀ)ᵀ: the decoded weights as the A operand); scales at
    ``s_ptr + stage * stride_ss + row * stride_sn`` (stride_sn 0: one scale a layer). Each
    split walks ``iters`` iterations of BKB codes, the next iteration's codes loaded before
    this one's are decoded; EVEN: every iteration lies inside K (no masks: the loads
    vectorize). The absolute table is the one of x's dtype (core/e8p_words.py)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = tl.minimum(offs_n, N - 1)  # clamped: unmasked rows, tail rows discarded
    offs_c = tl.arange(0, BKB * 8)
    b_lo = pid_k * (iters * BKB)
    b_hi = tl.minimum(b_lo + iters * BKB, KB)
    if DOT == 0:
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        acc1 = tl.zeros((BN, BKB, 4 if UNPACK == 0 else 8), tl.float32)
        sh1 = tl.zeros((BN, BKB), tl.float32)
        xtot = tl.zeros((BKB,), tl.float32)
    else:
        offs_m = pid_m * BM + tl.arange(0, BM)
        m_ok = offs_m < M
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        xtot = tl.zeros((BM, BKB), tl.float32)  # block sums, reduced after the loop
        if DOT == 1:
            acc1 = tl.zeros((BM, BN), tl.float32)
        else:
            acc1 = tl.zeros((BN, BM), tl.float32)
        sh1 = tl.zeros_like(acc1)
    acc2 = tl.zeros_like(acc1)
    sh2 = tl.zeros_like(sh1)
    c1 = _codes(q1_ptr, rows, b_lo, b_hi, KB, BKB, EVEN)
    if RESID > 0:
        c2 = _codes(q2_ptr, rows, b_lo, b_hi, KB, BKB, EVEN)
    for it in range(0, iters):  # a run-time trip count (the interpreter cannot range over
        b0 = b_lo + it * BKB       # program-dependent bounds)
        # the next iteration's codes now (the last iteration reloads its own, in bounds)
        b_nx = tl.where(b0 + BKB < b_hi, b0 + BKB, b0)
        n1 = _codes(q1_ptr, rows, b_nx, b_hi, KB, BKB, EVEN)
        if RESID > 0:
            n2 = _codes(q2_ptr, rows, b_nx, b_hi, KB, BKB, EVEN)
        kc = 8 * b0 + offs_c  # (BKB*8,) input columns of this iteration
        if DOT == 0:
            if EVEN:
                x8 = tl.load(x_row + kc).to(tl.float32)
            else:
                x8 = tl.load(x_row + kc, mask=kc < 8 * b_hi, other=0.0).to(tl.float32)
            x8 = tl.reshape(x8, (BKB, 8))
            xe, xo = tl.split(tl.reshape(x8, (BKB, 4, 2)))  # (BKB, 4) each
            xs = tl.sum(x8, 1)  # (BKB,) block sums
            xtot += xs
        else:
            x8 = tl.load(x_rows + kc[None, :], mask=m_ok[:, None] & (kc < 8 * b_hi)[None, :],
                         other=0.0)  # (BM, BKB*8)
            xe, xo = tl.split(tl.reshape(x8, (BM, BKB * 4, 2)))  # (BM, BKB*4) each
            xs32 = tl.sum(tl.reshape(x8.to(tl.float32), (BM, BKB, 8)), 2)  # (BM, BKB)
            xtot += xs32
            xs = xs32.to(x8.dtype)  # for the shift's dot
        acc1, sh1 = _product(acc1, sh1, c1, x8, xe, xo, xs, absw_ptr, sgn_ptr, 8,
                             SIGN_TABLE, DOT, UNPACK, DT, BN, BKB)
        if RESID > 0:
            acc2, sh2 = _product(acc2, sh2, c2, x8, xe, xo, xs, absw_ptr, sgn_ptr,
                                 8 if RESID == 2 else 0, SIGN_TABLE, DOT, UNPACK, DT,
                                 BN, BKB)
            c2 = n2
        c1 = n1
    s1 = tl.load(s_ptr + rows * stride_sn).to(tl.float32)
    s2 = s1
    if RESID > 0:
        s2 = tl.load(s_ptr + stride_ss + rows * stride_sn).to(tl.float32)
    if DOT == 0:
        xsum = tl.sum(xtot, 0)
        y = s1 * (tl.sum(tl.sum(acc1, 2), 1) + 0.25 * (xsum - 2.0 * tl.sum(sh1, 1)))
        if RESID > 0:
            y += s2 * (tl.sum(tl.sum(acc2, 2), 1) + 0.25 * (xsum - 2.0 * tl.sum(sh2, 1)))
        mask = offs_n < N
        out_ptrs = out_ptr + pid_m * stride_om + offs_n
        part_offs = pid_m * N + offs_n
    elif DOT == 1:
        xtot = tl.sum(xtot, 1)
        y = s1[None, :] * (acc1 + 0.25 * (xtot[:, None] - 2.0 * sh1))
        if RESID > 0:
            y += s2[None, :] * (acc2 + 0.25 * (xtot[:, None] - 2.0 * sh2))
        mask = m_ok[:, None] & (offs_n < N)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        part_offs = offs_m[:, None] * N + offs_n[None, :]
    else:
        xtot = tl.sum(xtot, 1)
        y = s1[:, None] * (acc1 + 0.25 * (xtot[None, :] - 2.0 * sh1))
        if RESID > 0:
            y += s2[:, None] * (acc2 + 0.25 * (xtot[None, :] - 2.0 * sh2))
        mask = (offs_n < N)[:, None] & m_ok[None, :]
        out_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        part_offs = offs_m[None, :] * N + offs_n[:, None]
    tile = pid_n * tl.num_programs(0) + pid_m
    store_or_reduce(y, out_ptrs, part_ptr, part_offs, mask, cnt_ptr, tile, pid_k,
                    tl.num_programs(2), M * N, SPLIT)


_COUNTERS: dict[tuple, torch.Tensor] = {}
_TUNED: dict[tuple, Config] = {}


def counters(device: torch.device) -> Optional[torch.Tensor]:
    """The split-K tile counters of ``device`` (zeros; each launch leaves them at zero),
    made on first use outside graph capture (None during a capture that finds none)."""
    return device_counters(_COUNTERS, device)


def launch(x2: torch.Tensor, qweight: torch.Tensor, qweight_resid: Optional[torch.Tensor],
           scales: torch.Tensor, tables: torch.Tensor, bits: int, cfg: Config,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out (M, N) = x2 (M, K) @ Ŵᵀ with one configuration; x2 fp16/bf16, last dim contiguous,
    codes, scales and the word tables (core/e8p_words.py) contiguous on x2's device."""
    m, k = x2.shape
    n, kb = qweight.shape
    if k != 8 * kb:
        raise ValueError(f"e8p kernel: x has {k} columns, the codes cover {8 * kb}")
    if out is None:
        out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return out
    absw, sgn = split_tables(tables, x2.dtype)
    if cfg.dot == 0 and cfg.paired and e8p_gemv.paired(x2, qweight, qweight_resid):
        return e8p_gemv.launch(x2, qweight, qweight_resid, scales, tables, absw, bits, cfg,
                               out, counters)
    if cfg.unpack == 2:  # the same tables read as 16-bit values
        absw, sgn = absw.view(torch.int16), sgn.view(torch.int16)
    bm = 16 if cfg.dot else 1  # tl.dot needs 16 rows
    grid_m, grid_n = -(-m // bm), -(-n // cfg.bn)
    iters = -(-kb // cfg.bkb)
    split = cfg.split or auto_split(grid_m * grid_n, iters,
                                    torch.cuda.get_device_properties(x2.device)
                                    .multi_processor_count)
    per = -(-iters // max(1, min(split, iters)))  # loop iterations per split
    split = -(-iters // per)
    split, per, cnt, part = split_k_buffers(split, per, iters, grid_m * grid_n, out,
                                            lambda: counters(x2.device))
    even = kb % cfg.bkb == 0 and iters % per == 0
    resid = RESID[bits]
    e8p_kernel[(grid_m, grid_n, split)](
        x2, qweight, qweight_resid if qweight_resid is not None else qweight, scales, absw,
        sgn, out, part, cnt if cnt is not None else qweight,
        m, n, kb, x2.stride(0), out.stride(0), scales.stride(0),
        scales.stride(1) if scales.shape[1] > 1 else 0, per,
        RESID=_RESID_KIND[resid], DOT=cfg.dot, SIGN_TABLE=cfg.sign_table, UNPACK=cfg.unpack,
        SPLIT=split > 1,
        EVEN=even, BM=bm, BN=cfg.bn, BKB=cfg.bkb, num_warps=cfg.warps, num_stages=cfg.stages)
    return out


def _key(m: int, n: int, kb: int, bits: int, dtype: torch.dtype) -> tuple:
    return (m, n, kb, bits, dtype)


def remember(m: int, n: int, kb: int, bits: int, dtype: torch.dtype, cfg: Config) -> None:
    """Use ``cfg`` for calls of ``m`` rows on (n, 8·kb) weights of ``bits`` in ``dtype``."""
    _TUNED[_key(m, n, kb, bits, dtype)] = cfg


def tune(x2, qweight, qweight_resid, scales, tables, bits, reps_ms: int = 20) -> Config:
    """Time every candidate for this call's shape (triton.testing.do_bench), remember the
    fastest and return it."""
    times = {}
    for cfg in candidates(x2.shape[0], bits):
        try:
            times[cfg] = triton.testing.do_bench(
                lambda c=cfg: launch(x2, qweight, qweight_resid, scales, tables, bits, c),
                warmup=5, rep=reps_ms, return_mode="median")
        except Exception as e:  # a configuration that does not compile or fit is skipped
            log.info("e8p config %s failed: %s", cfg, e)
    best = min(times, key=times.get)
    remember(x2.shape[0], *qweight.shape, bits, x2.dtype, best)
    return best


def linear(x: torch.Tensor, qweight: torch.Tensor, qweight_resid: Optional[torch.Tensor],
           scales: torch.Tensor, tables: torch.Tensor, bits: int,
           autotune: bool = False) -> torch.Tensor:
    """x (..., K) @ Ŵᵀ -> (..., N) in x's dtype (fp16/bf16, at most KERNEL_MAX_M rows)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > KERNEL_MAX_M:
        raise ValueError(f"e8p kernel: at most {KERNEL_MAX_M} rows, got {x2.shape[0]}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    cfg = _TUNED.get(_key(x2.shape[0], *qweight.shape, bits, x2.dtype))
    if cfg is None:
        if autotune and not torch.cuda.is_current_stream_capturing():
            cfg = tune(x2, qweight, qweight_resid, scales, tables, bits)
        else:
            cfg = heuristic(x2.shape[0], bits)
    y = launch(x2, qweight, qweight_resid, scales.contiguous(), tables, bits, cfg)
    return y.reshape(*lead, qweight.shape[0])


__all__ = ["Config", "e8p_kernel", "launch", "linear", "heuristic", "candidates", "tune",
           "counters", "auto_split", "remember"]
