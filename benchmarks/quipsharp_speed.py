"""QuIP# layer quantization speed on a GPU: the E8P search as one Triton launch per block vs
the torch search (~100 small kernels per stage per block).

For each shape (N, K) (default SmolLM2-135M's MLP: 1536×576 and 576×1536) and each bits
(default 2 and 4), with a random Gaussian weight (what the incoherence rotation makes of
one) and a random SPD Hessian ``XᵀX/n`` (inputs of uneven column scales): seconds of the
stage scale fit (fit_stage_scales) and of block LDLQ with the scale search
(ldlq_with_scale_search, every walk it takes), with ``kernel=True`` (Triton on CUDA) and
``kernel=False`` (the torch search), median of ``--reps`` after a warm-up that compiles the
kernels; and microseconds of one block's rounding (StageQuantizer on an (N, 8) block, median
of 200 synchronised calls). The two paths must agree: the same fitted scales and factor, and
walk losses within 1e-3 relative (they differ only where two codewords are equally near up
to float32 rounding); a disagreement is recorded and the script exits 1.

Usage: ``PYTHONPATH=src python3 benchmarks/quipsharp_speed.py --out DIR [--allow-dirty]``;
``--smoke`` runs a tiny shape (CPU is fine: there both paths are the torch search).
Writes ``DIR/quipsharp_speed.{json,md}`` (``_smoke`` with --smoke).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record  # noqa: E402

from kvant.algorithms.quipsharp import (StageQuantizer, fit_stage_scales,  # noqa: E402
                                        ldlq_with_scale_search)
from kvant.config import QuIPSharpConfig  # noqa: E402
from kvant.core.e8p import kernel_applies  # noqa: E402
from kvant.nn.quipsharp_linear import STAGES  # noqa: E402

LOSS_RTOL = 1e-3


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def problem(n: int, k: int, dev: torch.device, seed: int = 0):
    """A random weight (N, K) and SPD Hessian (K, K), float32 on ``dev``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g)
    X = torch.randn(4 * k, k, generator=g) * (torch.rand(k, generator=g) + 0.1)
    return W.to(dev), (X.t() @ X / len(X)).to(dev)


def layer(W, H, bits: int, kernel: bool):
    """(seconds fit, seconds walk, scales, loss, factor) of one layer's quantization."""
    names, dev = STAGES[bits], W.device
    _sync(dev)
    t0 = time.perf_counter()
    scales = fit_stage_scales(W, names, True, kernel)
    _sync(dev)
    t1 = time.perf_counter()
    _, _, loss, f = ldlq_with_scale_search(W, H.clone(), names, scales,
                                           QuIPSharpConfig(bits=bits), kernel=kernel)
    _sync(dev)
    return t1 - t0, time.perf_counter() - t1, scales, loss, f


def block_us(n: int, bits: int, dev: torch.device, kernel: bool, reps: int = 200) -> float:
    """Median microseconds of rounding one (N, 8) block through every stage."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, n, generator=g).to(dev).t()  # strided, as block LDLQ passes it
    q = StageQuantizer(STAGES[bits], [torch.full((n, 1), 0.9 / (i + 1), device=dev)
                                      for i in range(len(STAGES[bits]))], dev, kernel)
    q(x)
    times = []
    for _ in range(reps):
        _sync(dev)
        t = time.perf_counter()
        q(x)
        _sync(dev)
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def bench(n: int, k: int, bits: int, dev: torch.device, reps: int) -> dict:
    """One record: both paths' seconds, block microseconds and their agreement."""
    W, H = problem(n, k, dev)
    runs = {True: [], False: []}
    for _ in range(reps):
        for kernel in (True, False):
            runs[kernel].append(layer(W, H, bits, kernel))
    fit = {kn: statistics.median(r[0] for r in runs[kn]) for kn in runs}
    walk = {kn: statistics.median(r[1] for r in runs[kn]) for kn in runs}
    (_, _, s1, l1, f1), (_, _, s0, l0, f0) = runs[True][0], runs[False][0]
    agree = (all(torch.equal(a, b) for a, b in zip(s1, s0)) and f1 == f0
             and abs(l1 - l0) <= LOSS_RTOL * abs(l0))
    us = {kn: block_us(n, bits, dev, kn) for kn in (True, False)}
    total = {kn: fit[kn] + walk[kn] for kn in runs}
    return {"model": "random-layer", "method": "quipsharp", "shape": [n, k], "bits": bits,
            "group_size": -1, "scale": "row", "kernel_used": kernel_applies(W),
            "quant_seconds_kernel": total[True], "quant_seconds_torch": total[False],
            "fit_seconds_kernel": fit[True], "fit_seconds_torch": fit[False],
            "walk_seconds_kernel": walk[True], "walk_seconds_torch": walk[False],
            "speedup": total[False] / total[True],
            "us_block_kernel": us[True], "us_block_torch": us[False],
            "loss_kernel": l1, "loss_torch": l0, "loss_rel_diff": abs(l1 - l0) / abs(l0),
            "factor_kernel": f1, "factor_torch": f0, "agree": agree, "reps": reps}


def markdown(records: list[dict]) -> str:
    note, _ = record.provenance_note(records)
    lines = ["## QuIP# layer quantization: Triton E8P search vs torch search", "",
             f"{note} Random Gaussian weight, random SPD Hessian, per-row scales, scale "
             "search on; seconds = stage scale fit + every block LDLQ walk (median of "
             f"{records[0]['reps']}). Written by benchmarks/quipsharp_speed.py.", "",
             "| N×K | bits | s kernel | s torch | speedup | µs/block kernel | µs/block torch "
             "| loss kernel | loss torch | agree |", "|" + "---|" * 10]
    for r in records:
        lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['bits']} | "
                     f"{r['quant_seconds_kernel']:.3f} | {r['quant_seconds_torch']:.3f} | "
                     f"{r['speedup']:.1f}x | {r['us_block_kernel']:.0f} | "
                     f"{r['us_block_torch']:.0f} | {r['loss_kernel']:.5g} | "
                     f"{r['loss_torch']:.5g} | {'yes' if r['agree'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(record.ARCHIVE))
    ap.add_argument("--shapes", nargs="*", default=["1536x576", "576x1536"],
                    help="N×K of the layers (output × input width), e.g. 1536x576")
    ap.add_argument("--bits", nargs="*", type=int, default=[2, 4], choices=[2, 3, 4])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="one tiny shape, to check the script")
    ap.add_argument("--allow-dirty", action="store_true",
                    help="record from uncommitted code (rows are marked dirty)")
    a = ap.parse_args(argv)
    shapes = [(64, 128)] if a.smoke else [tuple(int(v) for v in s.lower().split("x"))
                                         for s in a.shapes]
    if any(k % 8 for _, k in shapes):
        ap.error("every K must be a multiple of 8")
    prov = record.provenance_or_exit(a.allow_dirty)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"device": record.device_name(dev), "date": record.today(), **prov,
            "torch": torch.__version__}
    for bits in a.bits:  # warm-up: compiles the kernels of every stage combination
        W, H = problem(32, 64, dev)
        layer(W, H, bits, True)
        layer(W, H, bits, False)
    records = []
    for n, k in shapes:
        for bits in a.bits:
            r = {**bench(n, k, bits, dev, 1 if a.smoke else a.reps), **meta}
            print(json.dumps(r), flush=True)
            records.append(r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "quipsharp_speed_smoke" if a.smoke else "quipsharp_speed"
    (out / f"{name}.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(records))
    bad = [r for r in records if not r["agree"]]
    for r in bad:
        print(f"error: kernel and torch disagree on {r['shape']} {r['bits']} bits: loss "
              f"{r['loss_kernel']} vs {r['loss_torch']}, factor {r['factor_kernel']} vs "
              f"{r['factor_torch']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
