"""Kernel choice by shape and batch, launches and tuning of the Triton kernels.

Tensors in, tensors out: :func:`linear` computes ``x @ Wᵀ`` for a weight in the repacked
layout (kernels/triton/repack.py). ``kernels/packed.py`` registers it as the CUDA
implementation of ``kvant::wq_linear_packed`` where CUDA and Triton exist; nothing here knows
about layers. docs/KERNELS.md has the dispatch table.

Launch configurations come from :func:`heuristic` (kernels/triton/rules.py, re-exported
here) unless :func:`tune` has timed the
candidates for that shape (benchmarks do; ``KernelOptions(autotune=True)`` tunes each new
shape on its first call outside graph capture). Nothing in the hot path synchronises with
the host or allocates outside PyTorch's caching allocator, so calls are captured by CUDA
graphs.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import torch
import triton

from kvant.kernels.triton import prefill
from kvant.kernels.triton import repack as rp
from kvant.kernels.triton.gemm import dequant_kernel, wq_dot_kernel
from kvant.kernels.triton.gemv import wq_gemv_kernel
from kvant.kernels.triton.pairs import wq_dot_pairs_kernel
from kvant.kernels.triton.planes import device_counters, split_k_buffers
# re-exported for the callers that read the rules through this module (benchmarks, spqr.py)
from kvant.kernels.triton.rules import (DOT_MAX_M, GEMV_MAX_M, MMA_TILES,  # noqa: F401
                                        PAIRS_BY_BATCH, Config, _sms, _split_for, block_m,
                                        dot_warps, heuristic, mma_config, pairs_row)

log = logging.getLogger(__name__)

_SMEM_BUDGET = 200 * 1024  # bytes of pipelined tiles a program may keep in shared memory
MAGIC = 0x4B000000  # float bits of 2**23, passed at run time (see planes.py)


def _stages(cfg: "Config", bits: int, pairs: bool, bm: int) -> int:
    """cfg.stages, lowered until the pipelined x and weight tiles fit in shared memory."""
    ck = rp.chunk_k(bits, pairs)
    per_stage = ck * bm * 2 + cfg.bn * ck * bits // 8
    return max(1, min(cfg.stages, _SMEM_BUDGET // per_stage))



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

