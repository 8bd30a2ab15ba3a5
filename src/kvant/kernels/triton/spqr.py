"""Triton kernel for SpQR weights at decode batches (1-16 rows): ``y = x @ (dense + S)ᵀ`` in
one launch, from the layout of kernels/spqr.py (which says why it is what it is and the bytes
read per weight).

A program owns BN output rows and a K-slice (split-K: partial tiles reduced by the last
program, planes.store_or_reduce). An iteration of its loop reads one (32 words, BN rows)
tile of the planes encoding (3 bits: the 2-bit words of half a chunk and the chunk's 1-bit
words) -- 32·S columns, S = the consecutive columns a word holds (16 at 2/3 bits) -- and the
(32, BN) tiles of statistic bytes and (base, step) pairs of the same words, so everything
sits in one register layout: rows contiguous in memory (16-byte loads along the rows), each
thread holding a few rows of a few words, so one x value serves several rows. With rows as
the tile's second axis (the (N, ·) orientation) the compiler put one row in a thread and
reloaded, converted and masked x for every weight: sm_90 offline, 3-bit BN 32, ~15 against
~10 instructions a weight (scripts/kernel_ir.py). The statistics are dequantized once per
tile, ``s = max(base + s_int·step, 1e-8)`` and ``z·s``, each element serving the S values of
its word; per weight the kernel computes

    q    = _q3 / planes.plane_qz with zero point 0  (2 LOP3 + FFMA at 3 bits, exact)

then either (``DOT`` 0, CUDA cores, one row of x a program) ``accq += q · x`` (one FFMA a
weight) and, once per word and iteration, ``acc += s · accq − z·s · Σx`` (z is real, so it
cannot join the integer magic-number subtraction; Σx is the sum of the word's x, shared by
all rows), the fp32 (32, BN) accumulator reduced once after the loop, as gemv.py; or
(``DOT`` 1, tensor cores) ``w = q · s − z·s`` rounded to x's dtype (the reference's own
rounding of the weight) and ``acc = tl.dot(x_tile (BM, 32), w (32, BN), acc)`` with BM 16
rows of x (rows past M masked). Act-order gathers x through ``perm``.

Outliers: the program with pid_k == 0 walks its rows' CSR ranges in (BN, OC) tiles of packed
words (``fp16 bits << 16 | column``) in the epilogue and adds ``val · x[col]`` before the
store: no second launch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvant.kernels.spqr import GEMV_MAX_M, slots
from kvant.kernels.triton import dispatch
from kvant.kernels.triton.planes import (device_counters, plane_qz, split_k_buffers,
                                         store_or_reduce)

log = logging.getLogger(__name__)


@triton.jit
def _q3(lo, lo_hi, h_lo, h_hi, magic, J: tl.constexpr):
    """q fp32 (exact) of value J (0..15) of 3-bit words: the 2-bit field from ``lo`` (J < 8)
    or ``lo_hi = lo >> 16``, the high bit from ``h_lo`` / ``h_hi``, the 1-bit words already
    shifted so that it sits just above the field (kernels/spqr.py, ``encode``): three LOP3
    and one FFMA a weight, no shift (planes.plane3_qz shifts the high bit for every weight;
    sm_90 offline, 3-bit BN 32: 1203 -> 1165 instructions a loop iteration, 9.1 a weight).
    ptxas does not fuse the or of ``magic`` into the bit select (tried)."""
    SH: tl.constexpr = (2 * J) % 16
    MLO: tl.constexpr = 3 << SH
    MHI: tl.constexpr = 4 << SH
    INV: tl.constexpr = 1.0 / (1 << SH)
    OFF: tl.constexpr = 1 << (23 - SH)
    if J < 8:
        f = ((lo & MLO) | (h_lo & MHI) | magic).to(tl.float32, bitcast=True)
    else:
        f = ((lo_hi & MLO) | (h_hi & MHI) | magic).to(tl.float32, bitcast=True)
    return f * INV - OFF


@triton.jit
def _stats(st_ptr, z_ptr, prm_ptr, wi, rows, N, NSG, WS, magic, SG: tl.constexpr,
           SHIFT: tl.constexpr):
    """(s, z·s) float32 (32, BN) of words ``wi`` (32,) of rows ``rows`` (BN,): the (Kp/S, N)
    tables hold them like the word tiles. The integers become floats by the magic number
    (no I2F conversion)."""
    offs = wi[:, None].to(tl.int64) * N + rows[None, :]  # (32, BN)
    if SHIFT == 0:  # plain fp16 scales, integer zeros
        s = tl.load(st_ptr + offs).to(tl.float32)
        z = tl.load(z_ptr + offs).to(tl.float32)
    else:
        MASK: tl.constexpr = (1 << SHIFT) - 1
        u = tl.load(st_ptr + offs).to(tl.int32)
        pp = prm_ptr + wi[:, None].to(tl.int64) * NSG + (rows // SG)[None, :]
        plane = WS * NSG  # (4, Kp/S, N/SG) tables
        si = ((u & MASK) | magic).to(tl.float32, bitcast=True) - 8388608.0
        zi = (((u >> SHIFT) & MASK) | magic).to(tl.float32, bitcast=True) - 8388608.0
        s = tl.load(pp).to(tl.float32) + si * tl.load(pp + plane).to(tl.float32)
        s = tl.maximum(s, 1e-8)
        z = tl.load(pp + 2 * plane).to(tl.float32) + zi * tl.load(pp + 3 * plane).to(
            tl.float32)
    return s, z * s


@triton.jit(do_not_specialize=["M", "chunks_per_split", "n_chunks", "magic"])
def spqr_kernel(x_ptr, qw_ptr, st_ptr, z_ptr, prm_ptr, perm_ptr, ol_ptr, rp_ptr, out_ptr,
                part_ptr, cnt_ptr, M, N, K, NSG, stride_xm, stride_om, chunks_per_split,
                n_chunks, magic,
                BITS: tl.constexpr, SG: tl.constexpr, SHIFT: tl.constexpr,
                HAS_PERM: tl.constexpr, HAS_OUTL: tl.constexpr, DOT: tl.constexpr,
                EVEN: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr,
                BM: tl.constexpr, OC: tl.constexpr):
    """out (M, N) = x (M, K) @ (dense + S)ᵀ; grid (M / BM, N / BN, K splits) (module
    docstring). n_chunks: loop iterations of 32·S columns in all; NSG: second-level groups
    of rows (N / SG); EVEN: K is a whole number of iterations (no masks on x)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    S: tl.constexpr = 16 if BITS <= 3 else 32 // BITS  # consecutive columns a word holds
    SUB: tl.constexpr = 32 * S  # columns an iteration: a chunk (3 bits: half a chunk)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = tl.minimum(offs_n, N - 1)  # clamped: unmasked loads, tail rows discarded
    offs_r = tl.arange(0, 32)
    w_ptrs = qw_ptr + offs_r[:, None] * N + rows[None, :]  # (32, BN): rows contiguous
    if DOT:
        offs_m = pid_m * BM + tl.arange(0, BM)
        m_ok = offs_m < M
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # (BM, 1)
        acc = tl.zeros((BM, BN), tl.float32)
    else:
        x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
        acc = tl.zeros((32, BN), tl.float32)
    c_lo = pid_k * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, n_chunks)
    for sc in range(c_lo, c_hi):  # one (32, BN) word tile a plane group
        wi = sc * 32 + offs_r  # (32,) words of the first plane
        lo = tl.load(w_ptrs + sc * 32 * N)  # int32 offsets: words·N < 2**31
        lo_hi = lo >> 16
        if BITS == 3:  # the chunk's 1-bit words, aligned for this half (h = sc % 2)
            hw = tl.load(w_ptrs + (n_chunks + sc // 2) * 32 * N)
            h_lo = hw << (2 - sc % 2)  # high bit of value j (< 8) at 2j + 2
            h_hi = hw >> (14 + sc % 2)  # of value j (>= 8) at 2j - 14, as lo_hi's field
        a_r = sc * SUB + offs_r * S  # (32,) first column of each word
        s, zs = _stats(st_ptr, z_ptr, prm_ptr, wi, rows, N, NSG, n_chunks * 32, magic, SG,
                       SHIFT)
        if not DOT:
            accq = tl.zeros((32, BN), tl.float32)  # Σ_j q·x of each word this iteration
            xs = tl.zeros((32,), tl.float32)  # Σ_j x of each word's columns
        for j in tl.static_range(S):  # plane j: value j of each word
            if BITS == 3:
                q = _q3(lo, lo_hi, h_lo, h_hi, magic, j)
            else:
                q = plane_qz(lo, lo_hi, 0.0, magic, j, BITS)
            kk = a_r + j  # (32,) columns (act-order sorted) of this plane
            if HAS_PERM:
                kx = tl.load(perm_ptr + sc * SUB + j * 32 + offs_r)  # contiguous
            else:
                kx = kk
            if DOT:
                if EVEN:
                    xt = tl.load(x_ptrs + kx[None, :], mask=m_ok[:, None], other=0.0)
                else:
                    xt = tl.load(x_ptrs + kx[None, :], mask=m_ok[:, None] & (kk < K)[None, :],
                                 other=0.0)  # (BM, 32)
                w = q * s - zs  # (32, BN): (q - z)·s, z real, rounded as the reference
                acc = tl.dot(xt, w.to(xt.dtype), acc)
            else:
                if EVEN:
                    xk = tl.load(x_row + kx).to(tl.float32)
                else:
                    xk = tl.load(x_row + kx, mask=kk < K, other=0.0).to(tl.float32)
                accq += q * xk[:, None]
                xs += xk
        if not DOT:  # Σ_j (q - z)·s·x = s·Σ q·x − z·s·Σ x: one FFMA a weight
            acc += accq * s - zs * xs[:, None]
    if DOT:
        y = acc
    else:
        y = tl.sum(acc, axis=0)  # (BN,)
    if HAS_OUTL:
        if pid_k == 0:
            y = _outliers(y, x_ptr, ol_ptr, rp_ptr, offs_n, N, M, stride_xm, pid_m, BM, OC,
                          DOT)
    if DOT:
        mask = m_ok[:, None] & (offs_n < N)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        part_offs = offs_m[:, None] * N + offs_n[None, :]
    else:
        mask = offs_n < N
        out_ptrs = out_ptr + pid_m * stride_om + offs_n
        part_offs = pid_m * N + offs_n
    tile = pid_n * tl.num_programs(0) + pid_m
    store_or_reduce(y, out_ptrs, part_ptr, part_offs, mask, cnt_ptr, tile, pid_k,
                    tl.num_programs(2), M * N, SPLIT)


@triton.jit
def _outliers(y, x_ptr, ol_ptr, rp_ptr, offs_n, N, M, stride_xm, pid_m, BM: tl.constexpr,
              OC: tl.constexpr, DOT: tl.constexpr):
    """``y`` plus ``x @ Sᵀ`` of rows ``offs_n``: their CSR ranges OC outliers at a time."""
    n_ok = offs_n < N
    start = tl.load(rp_ptr + offs_n, mask=n_ok, other=0)
    end = tl.load(rp_ptr + offs_n + 1, mask=n_ok, other=0)
    longest = tl.max(end - start, axis=0)
    offs_o = tl.arange(0, OC)
    if DOT:
        offs_m = pid_m * BM + tl.arange(0, BM)
        m_ok = offs_m < M
    for i in range(0, longest, OC):
        idx = start[:, None] + i + offs_o[None, :]  # (BN, OC)
        ok = idx < end[:, None]
        word = tl.load(ol_ptr + idx, mask=ok, other=0)
        col = word & 0xFFFF
        val = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        if DOT:
            xv = tl.load(x_ptr + offs_m[None, None, :].to(tl.int64) * stride_xm
                         + col[:, :, None], mask=ok[:, :, None] & m_ok[None, None, :],
                         other=0.0).to(tl.float32)  # (BN, OC, BM)
            y += tl.trans(tl.sum(val[:, :, None] * xv, axis=1))  # (BM, BN)
        else:
            xv = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + col, mask=ok,
                         other=0.0).to(tl.float32)
            y += tl.sum(val * xv, axis=1)
    return y


@dataclass(frozen=True)
class Config:
    """One launch: ``dot`` (tensor cores, BM 16 rows of x a program; else CUDA cores, one
    row a program), BN output rows a program, ``split`` programs along K (0: from the SM
    count, dispatch._split_for), Triton's warps and stages."""

    dot: bool
    bn: int = 32
    split: int = 0
    warps: int = 4
    stages: int = 2


def heuristic(m: int) -> Config:
    """CUDA cores for one row (the weight is decoded once per row of x), tensor cores above
    (decoded once per 16 rows). Chosen offline (sm_90, ptxas, no spills: 3 bits 128 / 172
    registers), not measured yet: benchmarks/spqr_speed.py --tune times the candidates."""
    return Config(False, bn=32) if m <= GEMV_MAX_M else Config(True, bn=64, warps=8)


def candidates(m: int) -> list[Config]:
    """The configurations :func:`tune` times for ``m`` rows."""
    out = [Config(True, bn=bn, split=s, warps=w) for bn in (32, 64, 128) for s in (0, 1, 2, 4)
           for w in (4, 8)]
    if m <= 4:
        out += [Config(False, bn=bn, split=s) for bn in (16, 32, 64) for s in (0, 1, 2, 4, 8)]
    return out


def launch(x2: torch.Tensor, p, cfg: Config, out: torch.Tensor | None = None) -> torch.Tensor:
    """out (M, N) = x2 (M, K) @ (dense + S)ᵀ for a kernels.spqr.SpQRPacked ``p`` with one
    configuration; x2 fp16/bf16 (M <= 16 for the tensor-core form), last dim contiguous."""
    m, k = x2.shape
    n = p.out_features
    if out is None:
        out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return out
    sub = 32 * slots(p.bits)  # columns a loop iteration
    n_chunks = p.qweight.shape[0] * 32 // p.bits // sub  # loop iterations
    bm = 16 if cfg.dot else 1
    grid_m, grid_n = -(-m // bm), -(-n // cfg.bn)
    split = cfg.split
    if split == 0:
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count \
            if x2.is_cuda else 1
        split = dispatch._split_for(grid_m * grid_n, n_chunks, sms, min_chunks=1)
    cps = -(-n_chunks // max(1, min(split, n_chunks)))
    split = -(-n_chunks // cps)
    split, cps, cnt, part = split_k_buffers(split, cps, n_chunks, grid_m * grid_n, out,
                                            lambda: counters(x2.device))
    any_t = p.qweight
    spqr_kernel[(grid_m, grid_n, split)](
        x2, p.qweight, p.stats, p.zeros if p.zeros is not None else any_t,
        p.params if p.params is not None else any_t, p.perm if p.perm is not None else any_t,
        p.outliers if p.outliers is not None else any_t,
        p.rowptr if p.rowptr is not None else any_t, out, part,
        cnt if cnt is not None else any_t,
        m, n, k, max(1, n // p.stat_group_size), x2.stride(0),
        out.stride(0), cps, n_chunks, dispatch.MAGIC,
        BITS=p.bits, SG=p.stat_group_size, SHIFT=p.stat_shift,
        HAS_PERM=p.perm is not None, HAS_OUTL=p.outliers is not None, DOT=cfg.dot,
        # whole iterations of real columns only: a 3-bit K of 512 mod 1024 pads half a chunk
        # (two iterations of 512), whose x must read as zeros (q = 0 there, but z·s·Σx not)
        EVEN=k == n_chunks * sub,
        SPLIT=split > 1, BN=cfg.bn, BM=bm, OC=8 if cfg.dot else 32, num_warps=cfg.warps,
        num_stages=cfg.stages)
    return out


_TUNED: dict[tuple, Config] = {}
_COUNTERS: dict[tuple, torch.Tensor] = {}


def counters(device: torch.device) -> torch.Tensor | None:
    """The split-K tile counters of ``device`` (zeros; each launch leaves them at zero), made
    on first use outside graph capture (None during a capture that finds none)."""
    return device_counters(_COUNTERS, device)


def _key(m: int, p, dtype: torch.dtype) -> tuple:
    return (m, p.out_features, p.in_features, p.bits, p.group_size, p.stat_shift,
            p.perm is not None, p.outliers is not None, dtype)


def remember(m: int, p, dtype: torch.dtype, cfg: Config) -> None:
    """Use ``cfg`` for calls of ``m`` rows on weights shaped like ``p`` in ``dtype``."""
    _TUNED[_key(m, p, dtype)] = cfg


def tune(x2: torch.Tensor, p, reps_ms: int = 20) -> tuple[Config, dict]:
    """Time every candidate (triton.testing.do_bench), remember the fastest; returns (best,
    {config: median microseconds})."""
    times = {}
    for cfg in candidates(x2.shape[0]):
        try:
            times[cfg] = 1e3 * triton.testing.do_bench(lambda c=cfg: launch(x2, p, c),
                                                       warmup=5, rep=reps_ms,
                                                       return_mode="median")
        except Exception as e:  # a configuration that does not compile or fit is skipped
            log.info("spqr config %s failed: %s", cfg, e)
    best = min(times, key=times.get)
    remember(x2.shape[0], p, x2.dtype, best)
    return best, times


def linear(x: torch.Tensor, p, autotune: bool = False) -> torch.Tensor:
    """x (..., K) -> (..., N) in x's dtype (fp16/bf16, at most 16 rows) through the tuned or
    the heuristic configuration."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = _TUNED.get(_key(m, p, x2.dtype))
    if cfg is None:
        if autotune and not torch.cuda.is_current_stream_capturing():
            cfg = tune(x2, p)[0]
        else:
            cfg = heuristic(m)
    return launch(x2, p, cfg).reshape(*lead, p.out_features)
