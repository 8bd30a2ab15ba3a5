"""Which 4-bit layout and loop shape read fastest: row tiles x chunks per iteration (issue 8).

For each row-tile height of the pairs layout (``KVANT_W4_TILE``: 1 = row-major, 16, 64) and
each weight shape and batch, every dispatch candidate (BN, split, pipeline stages, chunks per
iteration) is timed as in kernels.py (rotating weight copies in a replayed CUDA graph); the
best time per (tile, stages, cpi) is kept, next to fp16 cuBLAS. This chooses the defaults of
repack.DEFAULT_TILE and dispatch.heuristic. Writes kernel_layouts.{json,md} into --out.

Usage: ``PYTHONPATH=src python3 benchmarks/kernel_layouts.py --out DIR``.
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


def sweep(tile: int, shapes, batches, log) -> list:
    """Time every candidate for each (shape, batch) with this row-tile height."""
    import kvant.kernels.triton.dispatch as d

    os.environ["KVANT_W4_TILE"] = str(tile)
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
                key = f"stages={cfg.stages},cpi={cfg.cpi}"
                if cfg.kernel == "dot" and t < by_knob.get(key, (1e9,))[0]:
                    by_knob[key] = (t, repr(cfg))
            rows.append(dict(tile=tile, shape=[n, k], batch=m, us=us, us_fp16=us_fp16,
                             speedup=us_fp16 / us, config=repr(best), by_knob=by_knob,
                             gbps=p0.nbytes() / us / 1e3))
            log(f"tile {tile} {n}x{k} M={m}: {us:.1f}us fp16 {us_fp16:.1f}us "
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
    args = ap.parse_args()
    import kvant.kernels.triton.dispatch as d
    from kvant.kernels.triton import repack as rp

    d.WIDE_SEARCH = True  # stages 3-5, one or two chunks an iteration, up to 16 splits
    batches = [int(b) for b in args.batches.split(",")]
    tiles = [int(t) for t in args.tiles.split(",")]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    rows = []
    for tile in tiles:
        os.environ["KVANT_W4_TILE"] = str(tile)
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
        log(f"tile {tile}: compiled {len(tasks)} in {time.time() - t0:.0f}s, "
            f"{len(failed)} failed {failed[:2]}")
        rows += sweep(tile, SHAPES, batches, log)
    device = torch.cuda.get_device_name(0)
    meta = dict(device=device, date=datetime.date.today().isoformat(), commit=kb._commit(),
                torch=torch.__version__)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_layouts.json").write_text(json.dumps([{**meta, **r} for r in rows], indent=1))
    md = [f"# 4-bit pairs layout: row tiles and loop shape, {device}", "",
          f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}. Best tuned µs per "
          "(shape, batch) for each row-tile height; speed-up vs fp16 cuBLAS (rotating copies, "
          "replayed graph).", "",
          "| N×K | batch | " + " | ".join(f"tile {t}" for t in tiles) + " | fp16 µs |",
          "|---|---|" + "---|" * (len(tiles) + 1)]
    for n, k in SHAPES:
        for m in batches:
            cells = []
            for t in tiles:
                r = next(r for r in rows if r["tile"] == t and r["shape"] == [n, k]
                         and r["batch"] == m)
                cells.append(f"{r['us']:.1f} ({r['speedup']:.2f}×)")
            fp = next(r["us_fp16"] for r in rows if r["shape"] == [n, k] and r["batch"] == m)
            md.append(f"| {n}×{k} | {m} | " + " | ".join(cells) + f" | {fp:.1f} |")
    md += ["", "Best µs by (stages, chunks per iteration), each cell over BN and split:", ""]
    for r in rows:
        knobs = ", ".join(f"{k} {v[0]:.1f}" for k, v in sorted(r["by_knob"].items()))
        md.append(f"- tile {r['tile']} {r['shape'][0]}×{r['shape'][1]} M={r['batch']}: {knobs}")
    (out / "kernel_layouts.md").write_text("\n".join(md) + "\n")
    log("\n".join(md))


if __name__ == "__main__":
    main()
