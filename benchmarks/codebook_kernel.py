"""The E8P codebook kernel (QuIP# codes, kernels/triton/e8p.py) against fp16 cuBLAS (issue 15).

For each weight shape (N, K), stored bits (2: E8P; 3: + E8P1; 4: + E8P, row scales) and batch
M in 1-16: every candidate launch configuration (e8p.candidates) is timed, the fastest is
timed again and set against ``torch.matmul`` in fp16 on the same x. Timing as
benchmarks/kernel_table.py: each timed call reads its own copy of the weight (enough copies to
exceed 3x the L2), the calls are captured in one CUDA graph and replayed, median of rounds.
The kernel computes the rotated-basis product only (the Hadamard transforms of QuipLinear
stay outside it, as in the layer's forward). Each best configuration's output is checked
against the float64 product with the decoded weight.

Writes <out>/codebook_kernel.{json,md}: per (shape, bits, batch) the best time, fp16 time,
speed-up, stored bits per weight (codes + fp16 row scales + the sign vectors of the two
transforms), GB/s (bytes the kernel reads and writes / time), the best configuration and
every configuration's time (``configs``), so the dispatch heuristic can be set from one run.

Usage: ``PYTHONPATH=src python3 benchmarks/codebook_kernel.py [--quick] [--out DIR]
[--allow-dirty]`` (~2-3 minutes on an H200).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch

SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672)]
BATCHES = [1, 2, 4, 8, 16]
BITS = [2, 3, 4]


def stored_bits(n: int, k: int, bits: int) -> float:
    """Stored bits per weight of a quipsharp layer (row scales): the codes, one fp16 scale a
    row and stage, one sign bit per input and output (QuipSharpLinear.bits_per_weight without
    the dense factors, which these power-of-two sizes do not have)."""
    stages = 1 if bits == 2 else 2
    return bits + 16 * stages / k + (n + k) / (n * k)


def make_codes(n: int, k: int, bits: int, seed: int = 0):
    """Random stored codes and row scales on the GPU: (qweight, qweight_resid, scales)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    kb = k // 8
    q1 = torch.randint(-32768, 32768, (n, kb), generator=g, device="cuda", dtype=torch.int16)
    q2 = None
    if bits == 3:
        q2 = torch.randint(0, 256, (n, kb), generator=g, device="cuda", dtype=torch.uint8)
    elif bits == 4:
        q2 = torch.randint(-32768, 32768, (n, kb), generator=g, device="cuda",
                           dtype=torch.int16)
    s = torch.rand(1 if bits == 2 else 2, n, generator=g, device="cuda") * 0.002 + 0.001
    return q1, q2, s.half()


def _nbytes(w) -> int:
    return sum(t.numel() * t.element_size() for t in w if t is not None)


def _copies(nbytes: int) -> int:
    import math

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, min(64, math.ceil(3 * l2 / nbytes)))


def _precompile_worker(task):
    """Compile one (bits, configuration, split-K or not) by running it on a small problem
    whose integer arguments specialise like the real ones (multiples of 16, row stride 1)."""
    from kvant.core.e8p_words import kernel_tables
    from kvant.kernels.triton import e8p

    bits, cfg_dict = task
    cfg = e8p.Config(**cfg_dict)
    q1, q2, s = make_codes(256, 4096, bits)
    x = torch.randn(16 if cfg.dot else 1, 4096, device="cuda", dtype=torch.float16)
    try:
        e8p.launch(x, q1, q2, s, kernel_tables().cuda(), bits, cfg)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # reported; the timing loop skips it too
        return f"{bits} {cfg_dict}: {e!r}"[:300]


def precompile(tasks, workers: int) -> list:
    """Compile the configurations in parallel processes (Triton's disk cache is shared)."""
    if workers <= 1:
        return [r for r in map(_precompile_worker, tasks) if r]
    with mp.get_context("spawn").Pool(workers) as pool:
        return [r for r in pool.map(_precompile_worker, tasks, chunksize=1) if r]


def bench(n, k, bits, batches, log) -> list:
    """All batches of one (shape, bits): time every candidate, then the best and fp16."""
    from dataclasses import asdict, replace

    from kernel_table import graph_time_us

    from kvant.core.e8p_words import kernel_tables
    from kvant.kernels import codebook as cbk
    from kvant.kernels.triton import e8p

    tables = kernel_tables().cuda()
    w0 = make_codes(n, k, bits)
    nb = _nbytes(w0)
    ws = [w0] + [tuple(None if t is None else t.clone() for t in w0)
                 for _ in range(_copies(nb) - 1)]
    ref_w = cbk.decoded_weight(*w0, tables, bits)  # float32 (N, K)
    fs = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
          for _ in range(_copies(n * k * 2))]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for m in batches:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        out = torch.empty(m, n, device="cuda", dtype=torch.float16)
        times = {}
        t0 = time.time()
        for cfg in e8p.candidates(m, bits):
            calls = [lambda w=w, c=cfg: e8p.launch(x, *w, tables, bits, c, out) for w in ws]
            try:
                times[cfg] = graph_time_us(calls, reps=3, rounds=3)
            except Exception as e:  # a configuration that does not compile or fit
                log(f"  skip {cfg}: {e!r}"[:200])
        best = min(times, key=times.get)
        us = graph_time_us([lambda w=w: e8p.launch(x, *w, tables, bits, best, out)
                            for w in ws])
        us_fp16 = graph_time_us([lambda f=f: torch.matmul(x, f.t()) for f in fs])
        y = e8p.launch(x, *w0, tables, bits, best)
        ref = x.double() @ ref_w.double().t()
        err = float((y.double() - ref).norm() / ref.norm())
        # the split the launch chose (0 in the config: from the SM count)
        iters = -(-(k // 8) // best.bkb)
        tiles = -(-m // (16 if best.dot else 1)) * -(-n // best.bn)
        split = best.split or (e8p.gemv_split(m, n, k // 8, best, sms)
                               if best.dot == 0 and best.paired and (k // 8) % 2 == 0
                               else e8p.auto_split(tiles, iters, sms))
        moved = nb + x.numel() * 2 + m * n * 2
        bpw = stored_bits(n, k, bits)
        rows.append(dict(
            shape=[n, k], batch=m, bits=bits, method="quipsharp", scale="row",
            dtype="float16", us_kernel=us, us_fp16=us_fp16, speedup=us_fp16 / us,
            ideal_speedup=16 / bpw, bits_per_weight=bpw, gbps=moved / us / 1e3,
            gbps_fp16=(n * k * 2 + x.numel() * 2 + m * n * 2) / us_fp16 / 1e3,
            rel_err=err, config=asdict(replace(best, split=split)),
            configs=sorted(([repr(c), t] for c, t in times.items()), key=lambda r: r[1]),
            tune_seconds=time.time() - t0))
        log(f"{n}x{k} {bits}-bit M={m}: {us:.1f}us ({rows[-1]['gbps']:.0f} GB/s) fp16 "
            f"{us_fp16:.1f}us -> {us_fp16 / us:.2f}x (ideal {16 / bpw:.2f}); err {err:.1e}; "
            f"{best} split {split}")
    del ws, fs, ref_w
    torch.cuda.empty_cache()
    return rows


def write_outputs(rows, out: Path, meta: dict) -> None:
    """codebook_kernel.json (records) and codebook_kernel.md (tables)."""
    for r in rows:
        r.update(meta)
    out.mkdir(parents=True, exist_ok=True)
    (out / "codebook_kernel.json").write_text(json.dumps(rows, indent=1))
    mark = "+dirty" if meta["dirty"] else ""
    lines = [f"# E8P codebook kernel (QuIP# codes) on {meta['device']}", "",
             f"{meta['date']}, commit {meta['commit']}{mark}, torch {meta['torch']}, triton "
             f"{meta['triton']}. Median µs per call in a replayed CUDA graph, each call on its "
             "own weight copy (no L2 reuse); fp16 activations, row scales, the rotated-basis "
             "product only (the layer's Hadamard transforms are not timed). speed-up = fp16 "
             "cuBLAS time / kernel time; ideal = 16 / stored bits per weight; GB/s = bytes "
             "read and written by the kernel / time. Best of every candidate configuration "
             "(`configs` in the JSON has them all).", ""]
    for bits in sorted({r["bits"] for r in rows}):
        lines += [f"## {bits} bits", "",
                  "| N×K | batch | bits/weight | kernel µs | fp16 µs | speed-up | ideal | "
                  "GB/s | rel. err | config |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["bits"] == bits):
            c = r["config"]
            cfg = (f"dot {c['dot']} bn {c['bn']} bkb {c['bkb']} split {c['split']} unpack "
                   f"{c['unpack']} {'table' if c['sign_table'] else 'computed'} w{c['warps']}"
                   f" s{c['stages']}")
            lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['batch']} | "
                         f"{r['bits_per_weight']:.3f} | {r['us_kernel']:.1f} | "
                         f"{r['us_fp16']:.1f} | {r['speedup']:.2f}× | {r['ideal_speedup']:.2f}× "
                         f"| {r['gbps']:.0f} | {r['rel_err']:.1e} | {cfg} |")
        lines.append("")
    (out / "codebook_kernel.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="8192x8192 only, batches 1 and 16")
    ap.add_argument("--shapes", default="", help="e.g. 8192x8192,28672x8192")
    ap.add_argument("--batches", default="", help="e.g. 1,4,16")
    ap.add_argument("--bits", default="", help="e.g. 2,4")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    from record import device_name, provenance_or_exit, today

    prov = provenance_or_exit(args.allow_dirty)
    import triton

    from kvant.kernels.triton import e8p

    shapes, batches, bits_list = SHAPES, BATCHES, BITS
    if args.quick:
        shapes, batches = [(8192, 8192)], [1, 16]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    if args.bits:
        bits_list = [int(b) for b in args.bits.split(",")]

    def log(msg):
        print(msg, flush=True)

    t0 = time.time()
    from dataclasses import asdict

    tasks = sorted({(b, tuple(sorted(asdict(replace_split(c, s)).items())))
                    for b in bits_list for m in batches for c in e8p.candidates(m, b)
                    for s in (1, 2)})
    failed = precompile([(b, dict(c)) for b, c in tasks], args.workers)
    log(f"precompiled {len(tasks)} kernels in {time.time() - t0:.0f}s; {len(failed)} failed: "
        f"{failed[:3]}")
    meta = dict(device=device_name(), date=today(), commit=prov["commit"],
                dirty=prov["dirty"], torch=torch.__version__, triton=triton.__version__)
    rows = []
    partial = Path(args.out) / "codebook_kernel_partial.json"  # what a cut-off run returns
    partial.parent.mkdir(parents=True, exist_ok=True)
    for bits in bits_list:
        for n, k in shapes:
            rows += bench(n, k, bits, batches, log)
            partial.write_text(json.dumps(rows, indent=1))
    write_outputs(rows, Path(args.out), meta)
    partial.unlink(missing_ok=True)
    log(f"wrote {args.out}/codebook_kernel.{{json,md}} ({len(rows)} rows, "
        f"{time.time() - t0:.0f}s)")


def replace_split(cfg, split: int):
    """``cfg`` with a fixed split (1: one program along K; 2: the split-K variant)."""
    from dataclasses import replace

    return replace(cfg, split=split)


if __name__ == "__main__":
    main()
