"""The 4-bit decode kernel on the Llama-3-70B block shapes (issues 13 and 14).

A 70B decode step spends most of its time in the four 4-bit products of each block
(decode_70b.md). For each of those shapes (q/k/v fused 10240×8192, o 8192×8192, gate/up
fused 57344×8192, down 8192×28672) at batch 1 and 8, fp16 activations, g128, this times:
- ``fp16``: cuBLAS on an fp16 weight (the baseline of every speed-up);
- the library's 4-bit kernel (kernels/triton/pairs.py) at K splits 1-8 and 3-5 pipeline
  stages, and the configuration the dispatcher's heuristic picks (``heuristic`` rows);
and then one block, the four products in order as a decode step runs them, with the
heuristic's configurations and with the fastest ones. Every call reads its own weight copy
(no L2 reuse) in a replayed CUDA graph (kernel_table.graph_time_us). Writes
gemv_70b.{json,md} (the card's name in each). The experiment that chose the current kernel
(group words pipelined, one K=128 dot a chunk) is archive/gemv_variants_1052675.md.

Usage: ``PYTHONPATH=src python3 benchmarks/gemv_70b.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kernel_table import _clone, _copies, _packed_problem, graph_time_us  # noqa: E402

SHAPES = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192),
          "down": (8192, 28672)}
BATCHES = (1, 8)
SPLITS = (1, 2, 4, 8)
STAGES = (3, 4, 5)


def _config(split, stages, m):
    import kvant.kernels.triton.dispatch as d

    bm = d.block_m("dot", m)
    return d.Config("dot", bn=128, bm=bm, split=split, warps=d.dot_warps(128, bm),
                    stages=stages, cpi=1)


def _fns(cfg, x, ps):
    import kvant.kernels.triton.dispatch as d

    return [lambda p=p: d.launch(x, p, cfg) for p in ps]


def main() -> None:
    import kvant.kernels.triton.dispatch as d
    from kvant.kernels.triton import repack as rp
    from record import git_commit, tree_dirty

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--name", default="gemv_70b", help="output file stem")
    args = ap.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name(0)
    names = args.shapes.split(",")
    rows, best, heur = [], {}, {}
    log = lambda s: print(s, flush=True)  # noqa: E731
    for name in names:
        n, k = SHAPES[name]
        p0 = _packed_problem(n, k, 4)
        assert p0.pairs, "expected the 4-bit pairs layout"
        ps = [p0] + [_clone(p0) for _ in range(_copies(p0.nbytes()) - 1)]
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.01
              for _ in range(_copies(n * k * 2))]
        w_ref = rp.dequantize_packed(p0, torch.float16)
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = (x.float() @ w_ref.float().t())
            t16 = graph_time_us([lambda w=w: torch.matmul(x, w.t()) for w in ws], reps=5,
                                rounds=5)
            rows.append(dict(shape=name, n=n, k=k, m=m, kernel="fp16 cuBLAS", us=round(t16, 2),
                             gbs=round(n * k * 2 / t16 / 1e3)))
            h = d.heuristic(m, n, k, 4, x.device, True)
            heur[(name, m)] = h
            cfgs = {(s, st): _config(s, st, m) for s in SPLITS for st in STAGES}
            for (split, stages), cfg in cfgs.items():
                out = d.launch(x, p0, cfg)
                err = float((out.float() - ref).abs().max() / ref.abs().max())
                assert err < 5e-3, f"{name} M={m} {cfg}: relative error {err}"
                us = graph_time_us(_fns(cfg, x, ps), reps=5, rounds=5)
                rows.append(dict(shape=name, n=n, k=k, m=m, kernel="w4", split=split,
                                 stages=stages, heuristic=cfg == h, us=round(us, 2),
                                 gbs=round(p0.nbytes() / us / 1e3), vs_fp16=round(t16 / us, 3),
                                 rel_err=err))
                if (name, m) not in best or us < best[(name, m)][0]:
                    best[(name, m)] = (us, cfg)
            if h not in cfgs.values():  # the heuristic outside the sweep: time it too
                us = graph_time_us(_fns(h, x, ps), reps=5, rounds=5)
                rows.append(dict(shape=name, n=n, k=k, m=m, kernel="w4", split=h.split,
                                 stages=h.stages, heuristic=True, us=round(us, 2),
                                 gbs=round(p0.nbytes() / us / 1e3), vs_fp16=round(t16 / us, 3)))
            hus = next(r["us"] for r in rows if r.get("heuristic") and r["shape"] == name
                       and r["m"] == m)
            b = best[(name, m)]
            log(f"{name} M={m}: fp16 {t16:.1f} | heuristic (split {h.split}, stages "
                f"{h.stages}) {hus:.1f} | best (split {b[1].split}, stages {b[1].stages}) "
                f"{b[0]:.1f} us")
        del ps, ws, w_ref
        torch.cuda.empty_cache()
    blocks = []
    for m in batches:
        probs = {nm: _packed_problem(*SHAPES[nm], 4, seed=1) for nm in names}
        xs = {nm: torch.randn(m, SHAPES[nm][1], device="cuda", dtype=torch.float16)
              for nm in names}
        ws = {nm: torch.randn(*SHAPES[nm], device="cuda", dtype=torch.float16) * 0.01
              for nm in names}
        fns = [lambda nm=nm: torch.matmul(xs[nm], ws[nm].t()) for nm in names]
        blocks.append(dict(m=m, kernel="fp16 cuBLAS",
                           us_block=round(graph_time_us(fns, reps=5, rounds=5) * len(fns), 1)))
        del ws
        for label, pick in (("w4 heuristic", heur), ("w4 fastest", best)):
            cfg = {nm: (pick[(nm, m)] if label == "w4 heuristic" else pick[(nm, m)][1])
                   for nm in names}
            fns = [f for nm in names for f in _fns(cfg[nm], xs[nm], [probs[nm]])]
            blocks.append(dict(m=m, kernel=label, us_block=round(
                graph_time_us(fns, reps=5, rounds=5) * len(fns), 1)))
        for b in blocks[-3:]:
            log(f"block M={m} {b['kernel']}: {b['us_block']} us")
        del probs
        torch.cuda.empty_cache()
    commit = git_commit() + ("+dirty" if tree_dirty() is not False else "")
    meta = dict(device=dev, commit=commit, torch=torch.__version__,
                date=datetime.date.today().isoformat())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, rows=rows, blocks=blocks),
                                                  indent=1))
    lines = [f"# The 4-bit decode kernel on the Llama-3-70B block shapes, {dev}", "",
             f"{meta['date']}, commit {commit}, torch {torch.__version__}. Median µs per call "
             "in a replayed CUDA graph, each call on its own weight copy; fp16 activations, "
             "4-bit g128 (kvant's pairs layout), BN 128 in the sweep (the heuristic's own BN where it "
             "differs). GB/s: the weight's bytes (codes, "
             "group words) per second.", "",
             "| shape | batch | fp16 µs | heuristic µs (split, stages) | GB/s | fastest µs "
             "(split, stages) | GB/s | speed-up vs fp16 |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        for m in batches:
            r16 = next(r for r in rows if r["shape"] == name and r["m"] == m
                       and r["kernel"] == "fp16 cuBLAS")
            rh = next(r for r in rows if r.get("heuristic") and r["shape"] == name
                      and r["m"] == m)
            rb = min((r for r in rows if r["kernel"] == "w4" and r["shape"] == name
                      and r["m"] == m), key=lambda r: r["us"])
            lines.append(f"| {name} {SHAPES[name][0]}×{SHAPES[name][1]} | {m} | {r16['us']} | "
                         f"{rh['us']} ({rh['split']}, {rh['stages']}) | {rh['gbs']} | "
                         f"{rb['us']} ({rb['split']}, {rb['stages']}) | {rb['gbs']} | "
                         f"{rb['vs_fp16']}× |")
    lines += ["", "One block (the four products in order):", "",
              "| batch | kernel | µs a block |", "|---|---|---|"]
    lines += [f"| {b['m']} | {b['kernel']} | {b['us_block']} |" for b in blocks]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
