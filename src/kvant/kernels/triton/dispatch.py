"""Kernel choice by shape and batch, launches and tuning of the Triton kernels.

Tensors in, tensors out: :func:`linear` computes ``x @ Wᵀ`` for a weight in the repacked
layout (kernels/triton/repack.py). ``kernels/packed.py`` registers it as the CUDA
implementation of ``kvant::wq_linear_packed`` where CUDA and Triton exist; nothing here knows
about layers. docs/KERNELS.md has the dispatch table.

Launch configurations come from :func:`heuristic` unless :func:`tune` has timed the
candidates for that shape (benchmarks do; ``KernelOptions(autotune=True)`` tunes each new
shape on its first call outside graph capture). Nothing in the hot path synchronises with
the host or allocates outside PyTorch's caching allocator, so calls are captured by CUDA
graphs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton

from kvant.kernels.triton import prefill
from kvant.kernels.triton import repack as rp
from kvant.kernels.triton.gemm import dequant_kernel, wq_dot_kernel
from kvant.kernels.triton.gemv import wq_gemv_kernel
from kvant.kernels.triton.pairs import wq_dot_pairs_kernel
from kvant.kernels.triton.planes import device_counters, split_k_buffers

log = logging.getLogger(__name__)

GEMV_MAX_M = 4  # rows of x the CUDA-core kernel takes (2/3/8 bits; 4 bits use tl.dot)
DOT_MAX_M = 64  # 2/3/8 bits above: dequantize + cuBLAS (H200 tuning: dequant at 128)
_SMEM_BUDGET = 200 * 1024  # bytes of pipelined tiles a program may keep in shared memory
MAGIC = 0x4B000000  # float bits of 2**23, passed at run time (see planes.py)


@dataclass(frozen=True)
class Config:
    """One launch: ``kernel`` in {"gemv", "dot", "mma", "dequant"} ("mma": the large-batch
    GEMM of prefill.py, 4-bit pairs layout); BN output channels and BM rows of x per
    program; ``split`` programs along K; Triton's warps and pipeline stages;
    ``cpi`` chunks loaded per loop iteration (gemv; the 4-bit pairs kernel takes one);
    ``kd``: columns a ``tl.dot`` in the mma kernel (32: one per plane, 128: a chunk's planes
    joined)."""

    kernel: str
    bn: int = 64
    bm: int = 16
    split: int = 1
    warps: int = 4
    stages: int = 2
    cpi: int = 2
    kd: int = 128


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def block_m(kernel: str, m: int, bits: int = 4) -> int:
    """Rows of x per program: the power of two >= m within 16..128 for tl.dot (3 bits: 64,
    the x tile of a 1024-column chunk must fit in shared memory), 1 for gemv."""
    if kernel == "gemv":
        return 1
    return min(max(_pow2(m), 16), 64 if bits == 3 else 128)


def _stages(cfg: "Config", bits: int, pairs: bool, bm: int) -> int:
    """cfg.stages, lowered until the pipelined x and weight tiles fit in shared memory."""
    ck = rp.chunk_k(bits, pairs)
    per_stage = ck * bm * 2 + cfg.bn * ck * bits // 8
    return max(1, min(cfg.stages, _SMEM_BUDGET // per_stage))


def _split_for(tiles: int, n_chunks: int, sms: int, min_chunks: int = 2) -> int:
    """K splits (at most 8) that bring the program count near 8 per SM, each split at least
    min_chunks chunks long (what the H200 tuning run chose for the 4-bit kernel at batch
    <= 16: 8 for N = 4096/8192, 4 for 11008, 2 for 28672)."""
    split = 1
    while (tiles * split * 2 <= 8 * sms and n_chunks // (split * 2) >= min_chunks
           and split < 8):
        split *= 2
    return split


# The 4-bit (pairs layout) path by batch: the first row whose bound is >= M applies;
# (largest M, kernel, BN, BM, warps, stages, KD), "dot" rows leave M to the decode heuristic
# below. Measured: benchmarks/prefill.py on one H200 at 9d2a59b (results/prefill.md,
# "Dispatch table": the best geometric-mean speed-up over fp16 across the six shapes at each
# batch; at 64 the tuned dot kernel of kernels.md, 0.90-1.44x, beats the mma tiles' 0.89x
# geo-mean). The mma kernel reaches 0.6-0.8x of cuBLAS fp16 from batch 128 on, and dequantize
# + cuBLAS 0.7-1.0x: prefill is still slower than fp16 from batch 128 (issue 14).
PAIRS_BY_BATCH: tuple[tuple[Optional[int], str, int, int, int, int, int], ...] = (
    (64, "dot", 0, 0, 0, 0, 0),
    (128, "mma", 128, 128, 8, 3, 128),
    (256, "mma", 128, 128, 8, 3, 32),
    (None, "dequant", 64, 0, 4, 0, 0),
)
# tiles of the mma kernel the tuner and the benchmark time: (BN, BM, warps, stages, KD); all
# compile for sm_90 without spills (ptxas via scripts/kernel_ir.py, fp16, g128) except the
# 256-wide ones at KD 128 (16-32 bytes), which are therefore timed at KD 32 only
MMA_TILES = ((128, 64, 4, 4, 128), (128, 128, 8, 3, 128), (128, 128, 8, 4, 128),
             (128, 128, 8, 3, 32), (256, 128, 8, 3, 32), (128, 256, 8, 3, 32))


def pairs_row(m: int) -> tuple:
    """The :data:`PAIRS_BY_BATCH` row for batch ``m``."""
    return next(r for r in PAIRS_BY_BATCH if r[0] is None or m <= r[0])


def mma_config(m: int, n: int, n_chunks: int, sms: int, bn: int, bm: int, warps: int,
               stages: int, kd: int = 128) -> Config:
    """An mma launch with BM no larger than the batch needs and K splits (at most 8, each at
    least 8 chunks) while the tiles alone leave half the SMs idle."""
    bm = min(bm, max(16, _pow2(m)))
    tiles = -(-n // bn) * -(-m // bm)
    split = 1
    while tiles * split * 2 <= sms and n_chunks // (split * 2) >= 8 and split < 8:
        split *= 2
    return Config("mma", bn=bn, bm=bm, split=split, warps=warps, stages=stages, cpi=1, kd=kd)


def heuristic(m: int, n: int, k: int, bits: int, device: torch.device,
              pairs: bool = False) -> Config:
    """The default configuration for x (m, k) times an (n, k) weight of ``bits`` bits."""
    n_chunks = -(-k // rp.chunk_k(bits, pairs))
    sms = _sms(device)
    if pairs:
        _, kernel, bn, bm, warps, stages, kd = pairs_row(m)
        if kernel == "mma":
            return mma_config(m, n, n_chunks, sms, bn, bm, warps, stages, kd)
        if kernel == "dequant":
            return Config("dequant", bn=bn, bm=0, warps=warps)
    elif m > DOT_MAX_M:
        return Config("dequant", bn=32, bm=0)
    if m <= GEMV_MAX_M and not pairs:
        bn = 32
        tiles = -(-n // bn) * m
        return Config("gemv", bn=bn, bm=1, split=_split_for(tiles, n_chunks, sms),
                      cpi=1 if bits == 3 else 2)
    bm = block_m("dot", m, bits)
    # BN 128 at BM >= 64 and, on the pairs layout, at BM 16 where N > 4096; at N <= 4096 (32
    # tiles of 128 or fewer) BN 64 doubles the tiles the K split must otherwise make up for.
    # H200, kernels.md at b55dc88: 4096² at batch 1-16 7.7-8.0 µs at BN 64, 8.8-9.4 at 128
    wide = pairs and bm <= 16 and n > 4096
    bn = 128 if bm >= 64 or wide else 64
    tiles = -(-n // bn) * -(-m // bm)
    if pairs:  # H200: 4 stages won at BM 16 (gemv_70b.md) and mostly at 32 (kernels.md)
        return Config("dot", bn=bn, bm=bm, split=_pairs_split(tiles, n_chunks, sms, bm),
                      warps=dot_warps(bn, bm), stages=4 if bm <= 32 else 3, cpi=1)
    return Config("dot", bn=bn, bm=bm, split=_split_for(tiles, n_chunks, sms),
                  warps=dot_warps(bn, bm), stages=3, cpi=1)


def _pairs_split(tiles: int, n_chunks: int, sms: int, bm: int = 16) -> int:
    """K splits (at most 8) of the 4-bit kernel: double while the programs stay under 8 per
    SM and either fill fewer than 1.5 per SM or keep at least 16 chunks each; at BM 64 only
    while they fill fewer than half the SMs. H200, the Llama-3-70B block shapes
    (results/gemv_70b*.md): at BM 16, 4 splits for 10240×8192 and 8192², 2 for 57344×8192, 8
    for 8192×28672 were the fastest of 1-8; at BM 64, 1, 2, 1 and 2 (one program an SM is
    enough there; the old rule's 4-8 splits were 10-20 % slower). 1.5 per SM, not 1: at
    11008×4096 (86 tiles, 32 chunks) 4 splits took 12.6-13.1 µs at batch 1-16 against
    14.1-14.5 for the 2 that "fewer than one per SM" gave (kernels.md at b55dc88)."""
    split = 1
    while (tiles * split * 2 <= 8 * sms and split < 8 and n_chunks // (split * 2) >= 2
           and (tiles * split * 2 <= sms if bm >= 64 else
                2 * tiles * split < 3 * sms or n_chunks // (split * 2) >= 16)):
        split *= 2
    return split


def dot_warps(bn: int, bm: int) -> int:
    """Warps for a (BN, BM) tile: 8 once two fp32 accumulators of it pass ~32 registers a
    thread at 4 warps (ptxas, planes kernel: BM 64 x BN 64 takes 166 registers at 4 warps,
    125 at 8; BM 128 x BN 128 spills even at 8, so it is never used)."""
    return 4 if bn * bm <= 2048 else 8


_TUNED: dict[tuple, Config] = {}
_COUNTERS: dict[tuple, torch.Tensor] = {}


def _bucket(m: int) -> int:
    return min(_pow2(m), 1 << 14)


def _tune_key(m: int, p: rp.PackedWeight, dtype: torch.dtype) -> tuple:
    return (_bucket(m), p.out_features, p.in_features, p.bits, p.group_size,
            p.perm is not None, p.pairs, p.tile, dtype)


def _counters(device: torch.device) -> Optional[torch.Tensor]:
    return device_counters(_COUNTERS, device)


def launch(x2: torch.Tensor, p: rp.PackedWeight, cfg: Config,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out (M, N) = x2 (M, K) @ Wᵀ with one configuration; x2 fp16/bf16, last dim contiguous."""
    m, k = x2.shape
    n = p.out_features
    if out is None:
        out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return out
    if cfg.kernel == "dequant":  # into the device's reusable buffer, then cuBLAS
        buf = prefill.weight_buffer(x2.device, x2.dtype, n, p.k_padded)
        w = dequantize(p, x2.dtype, bn=cfg.bn, out=buf)[:, :k]
        xp = x2 if p.perm is None else x2.index_select(1, p.perm.long())
        return torch.matmul(xp, w.t(), out=out)
    if cfg.kernel == "mma":
        return prefill.launch_mma(x2, p, cfg.bn, cfg.bm, cfg.split, cfg.warps,
                                  _stages(cfg, p.bits, p.pairs, cfg.bm), out,
                                  _counters(x2.device), kd=cfg.kd)
    if p.pairs and cfg.kernel == "gemv":  # the pairs layout has only the tensor-core kernel
        cfg = Config("dot", bn=cfg.bn, bm=16, split=cfg.split, warps=4, stages=3, cpi=1)
    ck = rp.chunk_k(p.bits, p.pairs)
    n_chunks = p.k_padded // ck
    bm = block_m(cfg.kernel, m) if cfg.kernel == "gemv" else min(cfg.bm,
                                                                 block_m("dot", 128, p.bits))
    grid_m, grid_n = -(-m // bm), -(-n // cfg.bn)
    cpi = 1
    if cfg.kernel == "gemv":  # chunks per loop iteration
        while cpi * 2 <= min(cfg.cpi, n_chunks):
            cpi *= 2
    cps = -(-n_chunks // max(1, min(cfg.split, n_chunks)))
    cps = -(-cps // cpi) * cpi  # whole loop iterations per split
    split = -(-n_chunks // cps)
    split, cps, cnt, part = split_k_buffers(split, cps, n_chunks, grid_m * grid_n, out,
                                            lambda: _counters(x2.device))
    tail = (p.perm if p.perm is not None else p.qweight, out, part,
            cnt if cnt is not None else p.qweight,
            m, n, k, p.qweight.shape[1], x2.stride(0), out.stride(0), cps, n_chunks)
    meta = dict(GS=p.group_size, HAS_PERM=p.perm is not None, SPLIT=split > 1, BN=cfg.bn,
                num_warps=cfg.warps, num_stages=_stages(cfg, p.bits, p.pairs, bm))
    if p.pairs:
        wq_dot_pairs_kernel[(grid_m, grid_n, split)](x2, p.qweight, rp.group_words(p), *tail,
                                                     BM=bm, TH=p.tile, **meta)
        return out
    args = (x2, p.qweight, p.scales, p.zeros) + tail + (MAGIC,)
    meta["BITS"] = p.bits
    if cfg.kernel == "gemv":
        wq_gemv_kernel[(grid_m, grid_n, split)](*args, CPI=cpi, **meta)
    else:
        wq_dot_kernel[(grid_m, grid_n, split)](*args, BM=bm, **meta)
    return out


def dequantize(p: rp.PackedWeight, dtype: torch.dtype, bn: int = 32,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, Kp) weight in ``dtype`` (rounded through fp16 like the reference; 4-bit pairs in
    bf16: one bf16 rounding of ``(q - z) * bf16(s)``, prefill.py), columns in the repacked
    (act-order sorted) order, written into ``out`` when given; the padding columns past K are
    garbage."""
    n, kp = p.out_features, p.k_padded
    if out is None:
        out = torch.empty((n, kp), dtype=dtype, device=p.qweight.device)
    n_chunks = kp // rp.chunk_k(p.bits, p.pairs)
    if p.pairs:  # packed 16-bit arithmetic, no float conversions (prefill.py)
        return prefill.dequantize_pairs(p, dtype, out=out, bn=max(bn, 16))
    dequant_kernel[(-(-n // bn), n_chunks)](
        p.qweight, p.scales, p.zeros, out, n, p.in_features, p.qweight.shape[1], n_chunks,
        out.stride(0), MAGIC,
        BITS=p.bits, GS=p.group_size, BN=bn, num_warps=4)
    return out


def candidates(m: int, p: rp.PackedWeight, device: torch.device) -> list[Config]:
    """The configurations :func:`tune` times for batch ``m``."""
    base = heuristic(m, p.out_features, p.in_features, p.bits, device, p.pairs)
    out = {base}
    if p.pairs and m >= 32:  # the large-batch GEMM, with and without K splits
        n_chunks = p.k_padded // rp.chunk_k(p.bits, p.pairs)
        for bn, bm, warps, stages, kd in MMA_TILES:
            if bm <= max(64, _pow2(m)):
                auto = mma_config(m, p.out_features, n_chunks, _sms(device), bn, bm, warps,
                                  stages, kd)
                out.update({auto, replace(auto, split=1)})
        out.add(Config("dequant", bn=64, bm=0))
    if m > DOT_MAX_M:
        return sorted(out, key=repr)
    splits = (1, 2, 4, 8)
    if m <= GEMV_MAX_M and not p.pairs:
        for bn in (16, 32, 64):
            for cpi in (1, 2, 4):
                if bn * cpi <= (32 if p.bits == 3 else 64):  # 3 bits: registers
                    out.update(Config("gemv", bn=bn, bm=1, split=s, cpi=cpi) for s in splits)
    bm = block_m("dot", m, p.bits)
    # 3 stages (4 too on the pairs layout since its group words are pipelined: 4 won at BM
    # 16 on the 70B block shapes, gemv_70b.md); 16 splits were never faster on the H200
    stage_set = (3, 4) if p.pairs else (3,)
    for bn in (32, 64, 128):
        if bn * bm > 8192:
            continue
        for st in stage_set:
            out.update(Config("dot", bn=bn, bm=bm, split=s, warps=dot_warps(bn, bm),
                              stages=st, cpi=1) for s in splits)
    if m >= 64:
        out.add(Config("dequant", bn=32, bm=0))
    return sorted(out, key=repr)


def tune(x2: torch.Tensor, p: rp.PackedWeight, reps_ms: int = 20) -> tuple[Config, dict]:
    """Time every candidate for this input shape, remember the fastest for its shape bucket.
    Returns (best, {config: median microseconds})."""
    times = {}
    for cfg in candidates(x2.shape[0], p, x2.device):
        try:
            times[cfg] = 1e3 * triton.testing.do_bench(lambda: launch(x2, p, cfg), warmup=5,
                                                       rep=reps_ms, return_mode="median")
        except Exception as e:  # a configuration that does not compile or fit is skipped
            log.info("config %s failed: %s", cfg, e)
    best = min(times, key=times.get)
    remember(x2.shape[0], p, x2.dtype, best)
    return best, times


def remember(m: int, p: rp.PackedWeight, dtype: torch.dtype, cfg: Config) -> None:
    """Use ``cfg`` for calls of ``m`` rows (its bucket) on weights shaped like ``p`` in
    ``dtype`` from now on (what a tuner that timed the candidates itself found best)."""
    _TUNED[_tune_key(m, p, dtype)] = cfg


def choose(x2: torch.Tensor, p: rp.PackedWeight, autotune: bool = False) -> Config:
    """The configuration for this call: tuned if known, else (``autotune`` and not capturing a
    graph) tuned now, else the heuristic."""
    cfg = _TUNED.get(_tune_key(x2.shape[0], p, x2.dtype))
    if cfg is not None:
        return cfg
    if autotune and not torch.cuda.is_current_stream_capturing():
        return tune(x2, p)[0]
    return heuristic(x2.shape[0], p.out_features, p.in_features, p.bits, x2.device, p.pairs)


def linear(x: torch.Tensor, p: rp.PackedWeight, autotune: bool = False) -> torch.Tensor:
    """x (..., K) @ Wᵀ -> (..., N) in x's dtype (fp16 or bf16) through the chosen kernel."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return launch(x2, p, choose(x2, p, autotune)).reshape(*lead, p.out_features)


__all__ = ["Config", "heuristic", "launch", "tune", "choose", "linear", "dequantize",
           "candidates"]

