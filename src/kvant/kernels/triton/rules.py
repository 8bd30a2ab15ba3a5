"""The launch configuration of the Triton kernels by shape and batch: :class:`Config` and
:func:`heuristic`, with the rules it applies (block sizes, K splits, warps, the 4-bit batch
table). Pure Python: it imports no Triton, so the rules run and are tested anywhere
(tests/kernels/test_dispatch_heuristic.py holds them to the measured kernel table);
:mod:`.dispatch` launches what they choose, and re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvant.kernels.triton import repack as rp


GEMV_MAX_M = 4  # rows of x the CUDA-core kernel takes (2/3/8 bits; 4 bits use tl.dot)
DOT_MAX_M = 64  # 2/3/8 bits above: dequantize + cuBLAS (H200 tuning: dequant at 128)


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
