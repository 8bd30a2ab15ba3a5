"""Variants of the 4-bit pairs kernel, each tuned and timed: row tiles, or one switch (issue 8).

For each row-tile height of the pairs layout (``KVANT_W4_TILE``: 1 = row-major, 16, 64) and
each weight shape and batch, every dispatch candidate (BN, split, pipeline stages) is timed as
in kernels.py (rotating weight copies in a replayed CUDA graph); the best time per (tile,
stages) is kept, next to fp16 cuBLAS. This chose repack.DEFAULT_TILE and dispatch.heuristic.
Writes kernel_layouts.{json,md} into --out. ``--prefetch-ab`` compares instead the kernel with
and without loading the next chunk's group scales and zero points ahead (kernel_prefetch.*);
``--one-dot-ab`` with and without the one-dot-per-chunk variant (kernel_one_dot.*).

Usage: ``PYTHONPATH=src python3 benchmarks/kernel_layouts.py [--prefetch-ab | --one-dot-ab]
--out DIR``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import kernels as kb  # noqa: E402  (the timing helpers of the kernel table)

SHAPES = [(8192, 8192), (28672, 8192), (4096, 4096), (11008, 4096)]
BATCHES = [1, 16, 64]
TILES = [1, 16, 64]


# switch name -> (dispatch module attribute, environment variable the compile workers read)
SWITCHES = {"prefetch": ("PREFETCH", "KVANT_W4_PREFETCH"),
            "one_dot": ("ONE_DOT", "KVANT_W4_ONE_DOT")}


def sweep(tile: int, shapes, batches, log, prefetch: bool = True, switch: str = "prefetch"
          ) -> list:
    """Time every candidate for each (shape, batch) with this row-tile height and with or
    without the switch under test (``prefetch``: the value of ``switch``, default the
    prefetch of group parameters)."""
    import kvant.kernels.triton.dispatch as d

    os.environ["KVANT_W4_TILE"] = str(tile)
    d.PREFETCH = True
    setattr(d, SWITCHES[switch][0], prefetch)
    rows = []
    for n, k in shapes:
        p0 = kb._packed_problem(n, k, 4)
        assert p0.tile == tile
        ps = [p0] + [kb._clone(p0) for _ in range(kb._copies(p0.nbytes()) - 1)]
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16)
              for _ in range(kb._copies(n * k * 2))]
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            best, times = kb.tune_graph(x, ps, log=log)
            us = kb.graph_time_us([lambda p=p: d.launch(x, p, best) for p in ps])
            us_fp16 = kb.graph_time_us([lambda w=w: torch.matmul(x, w.t()) for w in ws])
            by_knob: dict = {}
            for cfg, t in times.items():
                key = f"stages={cfg.stages}"
                if cfg.kernel == "dot" and t < by_knob.get(key, (1e9,))[0]:
                    by_knob[key] = (t, repr(cfg))
            rows.append(dict(tile=tile, switch=switch, prefetch=prefetch, shape=[n, k],
                             batch=m, us=us,
                             us_fp16=us_fp16,
                             speedup=us_fp16 / us, config=repr(best), by_knob=by_knob,
                             gbps=p0.nbytes() / us / 1e3))
            log(f"tile {tile} prefetch {prefetch} {n}x{k} M={m}: {us:.1f}us fp16 {us_fp16:.1f}us "
                f"{us_fp16 / us:.2f}x {best}")
        del ps, ws
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tiles", default=",".join(map(str, TILES)))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--one-dot-ab", action="store_true",
                    help="instead of tiles: the default tile with and without one K=128 dot "
                         "per chunk (writes kernel_one_dot.{json,md})")
    ap.add_argument("--prefetch-ab", action="store_true",
                    help="instead of tiles: the default tile with and without the prefetch "
                         "of group scales and zero points (writes kernel_prefetch.{json,md})")
    ap.add_argument("--shapes", default="", help="e.g. 8192x8192,28672x8192")
    args = ap.parse_args()
    import kvant.kernels.triton.dispatch as d
    from kvant.kernels.triton import repack as rp

    batches = [int(b) for b in args.batches.split(",")]
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    switch = "one_dot" if args.one_dot_ab else "prefetch"
    if args.prefetch_ab or args.one_dot_ab:
        variants = [(rp.DEFAULT_TILE, True), (rp.DEFAULT_TILE, False)]
        stem = "kernel_one_dot" if args.one_dot_ab else "kernel_prefetch"
        name = "one dot" if args.one_dot_ab else "prefetch"
        label = lambda t, pf: name if pf else f"no {name}"  # noqa: E731
    else:
        d.WIDE_SEARCH = True  # stages 3-5, up to 16 splits
        variants = [(int(t), True) for t in args.tiles.split(",")]
        stem, label = "kernel_layouts", lambda t, pf: f"tile {t}"
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    rows = []
    for tile, prefetch in variants:
        os.environ["KVANT_W4_TILE"] = str(tile)
        os.environ["KVANT_W4_PREFETCH"] = "1"
        os.environ[SWITCHES[switch][1]] = "1" if prefetch else "0"  # the compile workers
        t0 = time.time()
        probe = rp.PackedWeight(torch.empty(1, 1), None, None, None, 4, kb.GS, 4096, 4096,
                                pairs=True, tile=tile)
        tasks = set()
        for m in batches:
            for cfg in d.candidates(m, probe, torch.device("cuda")):
                if cfg.kernel == "dot":
                    key = dict(vars(cfg), split=min(cfg.split, 2))
                    tasks.add((4, cfg.bm, tuple(sorted(key.items())), "float16"))
        failed = kb.precompile([(b, m, dict(c), dt) for b, m, c, dt in sorted(tasks)],
                               args.workers)
        log(f"{label(tile, prefetch)}: compiled {len(tasks)} in {time.time() - t0:.0f}s, "
            f"{len(failed)} failed {failed[:2]}")
        rows += sweep(tile, shapes, batches, log, prefetch, switch)
    device = torch.cuda.get_device_name(0)
    meta = dict(device=device, date=datetime.date.today().isoformat(), commit=kb._commit(),
                torch=torch.__version__)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps([{**meta, **r} for r in rows], indent=1))
    what = ("with and without the prefetch of group scales and zero points (row tile "
            f"{rp.DEFAULT_TILE})" if args.prefetch_ab else "for each row-tile height")
    if args.one_dot_ab:
        what = ("with and without one K=128 dot per chunk (pairs.ONE_DOT; g128 has one "
                f"group a chunk), prefetch on, row tile {rp.DEFAULT_TILE}")
    md = [f"# 4-bit pairs kernel: {stem.split('_')[1]}, {device}", "",
          f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}. Best tuned µs per "
          f"(shape, batch) {what}; speed-up vs fp16 cuBLAS (rotating copies, replayed graph).",
          "", "| N×K | batch | " + " | ".join(label(t, pf) for t, pf in variants)
          + " | fp16 µs |", "|---|---|" + "---|" * (len(variants) + 1)]
    for n, k in shapes:
        for m in batches:
            cells = []
            for t, pf in variants:
                r = next(r for r in rows if r["tile"] == t and r["prefetch"] == pf
                         and r["shape"] == [n, k] and r["batch"] == m)
                cells.append(f"{r['us']:.1f} ({r['speedup']:.2f}×)")
            fp = next(r["us_fp16"] for r in rows if r["shape"] == [n, k] and r["batch"] == m)
            md.append(f"| {n}×{k} | {m} | " + " | ".join(cells) + f" | {fp:.1f} |")
    md += ["", "Best µs by pipeline stages, each cell over BN and split, and the chosen config:",
           ""]
    for r in rows:
        knobs = ", ".join(f"{k} {v[0]:.1f}" for k, v in sorted(r["by_knob"].items()))
        md.append(f"- {label(r['tile'], r['prefetch'])} {r['shape'][0]}×{r['shape'][1]} "
                  f"M={r['batch']}: {knobs}; best `{r['config']}`")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    log("\n".join(md))


if __name__ == "__main__":
    main()
