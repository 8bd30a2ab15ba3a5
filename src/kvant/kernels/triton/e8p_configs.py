"""Launch configurations of the E8P kernel (kernels/triton/e8p.py): the configuration type,
the default pick per batch and width, and the candidates that tuning and the benchmark time.
Pure Python: nothing here needs Triton or a GPU."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """One launch: ``dot`` 0 (CUDA cores, one row of x a program), 1 (x @ Wᵀ on tensor cores,
    x padded to 16 rows) or 2 ((W @ xᵀ)ᵀ, the decoded weights as the A operand); BN output
    rows a program; BKB codes (8·BKB columns) a row per loop iteration; ``split`` programs
    along K (0: chosen from the SM count, :func:`auto_split`); ``sign_table``: the sign masks
    from the 128-row table (else computed); ``unpack`` how table words become the product's
    operand (0: even/odd halves, two products; 1: halves joined in column order; 2: the
    tables read as 16-bit values, needs the sign table); Triton's warps and stages;
    ``paired`` (dot 0 only): the paired CUDA-core kernel of e8p_gemv.py where the call allows
    it (an even number of codes a row), else the CUDA-core form of e8p.py."""

    dot: int
    bn: int = 64
    bkb: int = 32
    split: int = 0
    sign_table: bool = True
    unpack: int = 0
    warps: int = 4
    stages: int = 2
    paired: bool = False



def auto_split(tiles: int, iters: int, sms: int, most: int = 16) -> int:
    """K splits (a power of two, at most ``most``) that bring the programs near 4 per SM while
    each split keeps at least 4 loop iterations."""
    split = 1
    while tiles * split * 2 <= 4 * sms and iters // (split * 2) >= 4 and split < most:
        split *= 2
    return split


def heuristic(m: int, bits: int = 2) -> Config:
    """The default launch for ``m`` rows of x and ``bits``: the fastest candidate on the 8192²
    layer in benchmarks/results/codebook_kernel.md (H200): at 1-2 rows the CUDA-core form of
    e8p.py, BN 32 (computed signs but at 3 bits; 8d538da: 33.4 / 55.4 / 53.5 µs at 2 / 3 / 4
    bits, where the paired kernel of e8p_gemv.py, fewer instructions a weight offline, took
    43.5 / 85.6 / 90.0 µs at its best tile on 2026-12-02, fbd6d40); above, the weights as
    the tensor cores' A operand at BN 64, one stage (BKB 16 at 2 bits, 32 at 3-4)."""
    if m <= 2:
        return Config(dot=0, bn=32, bkb=16, unpack=0, sign_table=bits == 3, warps=4, stages=2)
    return Config(dot=2, bn=64, bkb=16 if bits == 2 else 32, unpack=1, warps=4, stages=1)


# (BN, BKB, unpack, sign table, warps, stages, paired) of the CUDA-core forms at 1-2 rows:
# e8p.py's (the measured default) and the paired kernel (e8p_gemv.py: BKB, unpack and sign
# table unused there; BN a multiple of 32 x warps, each thread BN / (32·warps) rows sharing
# x; offline sm_90 instructions a weight at 2/3/4 bits: 2 rows 3.97/5.66/7.38, 4 rows
# 3.75/5.53/7.12, 8 rows 3.51/5.41/6.91 at 80-128 registers, yet slower on the H200).
# (dot, BN, BKB, unpack, sign table, warps, stages): what tune() and the benchmark time. The
# tensor-core forms pipeline the table gathers into shared memory (cp.async) at stages >= 2:
# BN·BKB·32 bytes a stage and stage (74-140 KB at BN 128, BKB 16, 2-4 bits), so the large
# tiles run at one stage. Offline compile for sm_90 (Triton 3.6's ptxas, as
# scripts/kernel_ir.py does): every one fits in shared memory; at 3-4 bits BN 64 x BKB 32
# spills a few hundred bytes.
GEMV_TILES = ((32, 16, 0, True, 4, 2, False), (64, 16, 0, True, 4, 2, False),
              (64, 16, 2, True, 4, 2, False), (32, 16, 0, False, 4, 2, False),
              (512, 16, 0, False, 4, 2, True), (256, 16, 0, False, 2, 2, True),
              (1024, 16, 0, False, 8, 2, True), (1024, 16, 0, False, 4, 2, True))
DOT_TILES = ((2, 64, 16, 1, True, 4, 1), (2, 64, 16, 1, True, 4, 2), (2, 64, 16, 2, True, 4, 2),
             (2, 128, 16, 1, True, 4, 2), (2, 128, 16, 1, True, 8, 2), (2, 256, 16, 1, True, 8, 2),
             (2, 64, 32, 1, True, 4, 1), (2, 64, 16, 1, False, 4, 2),
             (2, 128, 32, 2, True, 8, 1), (1, 64, 16, 2, True, 4, 2), (1, 64, 32, 1, True, 4, 1))


def smem_estimate(cfg: Config, bits: int) -> int:
    """Shared memory (bytes) of a tensor-core launch: the pipelined table gathers, 32 bytes a
    code and stage for each E8P stage (16 for E8P1, sign table only), plus 16 KB for x and
    the shift's operands: within 20 % of the offline sm_90 compiles (above them but for the
    computed-sign tiles, which are small)."""
    per_code = {2: 32, 3: 48, 4: 64}[bits] if cfg.sign_table else {2: 16, 3: 16, 4: 32}[bits]
    return (cfg.stages - 1) * cfg.bn * cfg.bkb * per_code + 16384


def candidates(m: int, bits: int = 2) -> list[Config]:
    """The launches :func:`tune` (and benchmarks/codebook_kernel.py) time for ``m`` rows of
    x and ``bits``: tensor-core tiles whose shared memory (:func:`smem_estimate`) fits."""
    out = []
    if m <= 2:
        out += [Config(dot=0, bn=bn, bkb=bkb, unpack=u, sign_table=st, warps=w, stages=sg,
                       paired=pr) for bn, bkb, u, st, w, sg, pr in GEMV_TILES]
    for d, bn, bkb, u, st, w, sg in DOT_TILES:
        cfg = Config(dot=d, bn=bn, bkb=bkb, unpack=u, sign_table=st, warps=w, stages=sg)
        if smem_estimate(cfg, bits) <= 200 * 1024:
            out.append(cfg)
    return out
