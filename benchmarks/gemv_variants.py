"""Decode GEMV variants on the Llama-3-70B block shapes (issues 13 and 14), side by side.

A 70B decode step spends 11.9 of its 14.5 ms in the four 4-bit products of each block
(decode_70b.md). This times, for each of those shapes (q/k/v fused 10240×8192, o 8192×8192,
gate/up fused 57344×8192, down 8192×28672) at batch 1 and 8, fp16 activations, g128:
- ``fp16``: cuBLAS on the fp16 weight (the baseline of every speed-up);
- ``pairs``: the library's 4-bit kernel (kernels/triton/pairs.py) at K splits 1-8 and 3-4
  pipeline stages (the scales and zero points loaded a chunk ahead into registers);
- ``sz``: the same kernel with each (group, row)'s scale and zero point packed in one int32
  (kernels/triton/pairs_sz.py), pipelined through shared memory with the weights;
- ``sz1``: ``sz`` with a chunk's four planes joined into one K=128 tensor-core dot;
and then each family's best configurations run as one block (the four products in order,
as a decode step runs them). Every call reads its own weight copy (no L2 reuse), in a
replayed CUDA graph (kernel_table.graph_time_us). The copy rate of a 2 GB device-to-device
copy is the bandwidth ceiling. Writes gemv_variants.{json,md} (the card's name in each).

Usage: ``PYTHONPATH=src python3 benchmarks/gemv_variants.py [--out DIR]``.
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
STAGES = (3, 4)


def launch_sz(x2, p, sz, split, stages, one_dot, bn=128, warps=4, out=None):
    """out (M, N) = x2 @ Wᵀ through the packed-parameter kernel (split-K as dispatch does)."""
    import kvant.kernels.triton.dispatch as d
    from kvant.kernels.triton.pairs_sz import wq_dot_pairs_sz_kernel
    from kvant.kernels.triton.planes import split_k_buffers

    m, k = x2.shape
    n = p.out_features
    if out is None:
        out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    bm = max(16, 1 << (m - 1).bit_length())
    n_chunks = p.k_padded // 128
    cps = -(-n_chunks // split)
    split = -(-n_chunks // cps)
    gm, gn = -(-m // bm), -(-n // bn)
    split, cps, cnt, part = split_k_buffers(split, cps, n_chunks, gm * gn, out,
                                            lambda: d._counters(x2.device))
    wq_dot_pairs_sz_kernel[(gm, gn, split)](
        x2, p.qweight, sz, p.qweight, out, part, cnt if cnt is not None else p.qweight,
        m, n, k, p.qweight.shape[1], x2.stride(0), out.stride(0), cps, n_chunks,
        GS=p.group_size, HAS_PERM=False, SPLIT=split > 1, BN=bn, BM=bm, TH=p.tile,
        ONE_DOT=one_dot, num_warps=warps, num_stages=stages)
    return out


def _fns(family, cfg, x, ps, szs, ws):
    import kvant.kernels.triton.dispatch as d

    if family == "fp16":
        return [lambda w=w: torch.matmul(x, w.t()) for w in ws]
    split, stages = cfg
    if family == "pairs":
        c = d.Config("dot", bn=128, bm=16, split=split, warps=4, stages=stages, cpi=1,
                     prefetch=True)
        return [lambda p=p: d.launch(x, p, c) for p in ps]
    return [lambda p=p, s=s: launch_sz(x, p, s, split, stages, family == "sz1")
            for p, s in zip(ps, szs)]


def copy_rate() -> float:
    """GB/s of a 2 GB device-to-device copy (bytes read + written)."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = graph_time_us([lambda: b.copy_(a)], reps=5, rounds=5)
    return 2 * a.numel() / us / 1e3


def main() -> None:
    from kvant.kernels.triton.pairs_sz import pack_sz
    from record import git_commit, tree_dirty

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name(0)
    rows, best = [], {}
    log = lambda s: print(s, flush=True)  # noqa: E731
    copy_rate()  # warms the clocks
    ceiling = copy_rate()
    log(f"{dev}: copy {ceiling:.0f} GB/s")
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        p0 = _packed_problem(n, k, 4)  # pairs layout (repack's default for 4 bits)
        assert p0.pairs, "expected the 4-bit pairs layout"
        nbytes = p0.nbytes()
        ps = [p0] + [_clone(p0) for _ in range(_copies(nbytes) - 1)]
        szs = [pack_sz(p.scales, p.zeros) for p in ps]
        ws = None
        for m in BATCHES:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = _fns("pairs", (1, 3), x, ps[:1], szs[:1], None)[0]()
            for fam in ("sz", "sz1"):
                got = _fns(fam, (1, 3), x, ps[:1], szs[:1], None)[0]()
                err = float((got.float() - ref.float()).abs().max() /
                            ref.float().abs().max())
                log(f"{name} M={m} {fam} vs pairs: max rel diff {err:.2e}")
                assert err < 1e-2, f"{fam} disagrees with pairs on {name} M={m}: {err}"
            if ws is None:
                ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.01
                      for _ in range(_copies(n * k * 2))]
            t16 = graph_time_us(_fns("fp16", None, x, ps, szs, ws), reps=5, rounds=5)
            rows.append(dict(shape=name, n=n, k=k, m=m, family="fp16", config="cuBLAS",
                             us=round(t16, 2), gbs=round(n * k * 2 / t16 / 1e3)))
            for fam in ("pairs", "sz", "sz1"):
                for split in SPLITS:
                    for stages in STAGES:
                        us = graph_time_us(_fns(fam, (split, stages), x, ps, szs, ws),
                                           reps=5, rounds=5)
                        sz_bytes = szs[0].numel() * 4 if fam != "pairs" else 0
                        byts = (p0.qweight.numel() * 4 + sz_bytes if fam != "pairs"
                                else nbytes)
                        rows.append(dict(shape=name, n=n, k=k, m=m, family=fam,
                                         config=f"split {split}, stages {stages}",
                                         split=split, stages=stages, us=round(us, 2),
                                         gbs=round(byts / us / 1e3), vs_fp16=round(t16 / us, 3)))
                        key = (name, m, fam)
                        if key not in best or us < best[key][0]:
                            best[key] = (us, (split, stages))
            log(f"{name} M={m}: fp16 {t16:.1f} | " + " | ".join(
                f"{f} {best[(name, m, f)][0]:.1f} {best[(name, m, f)][1]}"
                for f in ("pairs", "sz", "sz1")))
        del ws, ps, szs
        torch.cuda.empty_cache()
    # one block: the four products in order with each family's best configuration
    blocks = []
    names = args.shapes.split(",")
    for m in BATCHES:
        probs = {nm: _packed_problem(*SHAPES[nm], 4, seed=1) for nm in names}
        szp = {nm: pack_sz(p.scales, p.zeros) for nm, p in probs.items()}
        xs = {nm: torch.randn(m, SHAPES[nm][1], device="cuda", dtype=torch.float16)
              for nm in names}
        ws = {nm: torch.randn(*SHAPES[nm], device="cuda", dtype=torch.float16) * 0.01
              for nm in names}
        fns = [lambda nm=nm: torch.matmul(xs[nm], ws[nm].t()) for nm in names]
        us = graph_time_us(fns, reps=5, rounds=5) * len(fns)
        blocks.append(dict(m=m, family="fp16", us_block=round(us, 1)))
        log(f"block M={m} fp16: {us:.1f} us")
        del ws
        for fam in ("pairs", "sz", "sz1"):
            fns = [f for nm in names for f in _fns(fam, best[(nm, m, fam)][1], xs[nm],
                                                    [probs[nm]], [szp[nm]], None)]
            us = graph_time_us(fns, reps=5, rounds=5) * len(fns)
            blocks.append(dict(m=m, family=fam, us_block=round(us, 1)))
            log(f"block M={m} {fam}: {us:.1f} us")
        del probs, szp
        torch.cuda.empty_cache()
    commit = git_commit() + ("+dirty" if tree_dirty() is not False else "")
    meta = dict(device=dev, commit=commit, torch=torch.__version__,
                date=datetime.date.today().isoformat(), copy_gbs=round(ceiling))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_variants.json").write_text(json.dumps(
        dict(meta=meta, rows=rows, blocks=blocks,
             best={f"{a} M={b} {c}": v for (a, b, c), v in best.items()}), indent=1))
    lines = [f"# Decode GEMV variants, Llama-3-70B block shapes, on {dev}", "",
             f"{meta['date']}, commit {commit}, torch {torch.__version__}. Median µs per call "
             f"in a replayed CUDA graph, each call on its own weight copy; fp16 activations, "
             f"4-bit g128. Device copy rate (2 GB, read + write): {ceiling:.0f} GB/s.", "",
             "| shape | batch | fp16 µs | pairs µs (split, stages) | sz µs | sz1 µs |",
             "|---|---|---|---|---|---|"]
    for name in names:
        for m in BATCHES:
            t16 = next(r["us"] for r in rows if r["shape"] == name and r["m"] == m
                       and r["family"] == "fp16")
            cells = [f"{best[(name, m, f)][0]:.1f} {best[(name, m, f)][1]}"
                     for f in ("pairs", "sz", "sz1")]
            lines.append(f"| {name} {SHAPES[name][0]}×{SHAPES[name][1]} | {m} | {t16:.1f} | "
                         + " | ".join(cells) + " |")
    lines += ["", "| batch | family | µs a block (4 products) |", "|---|---|---|"]
    lines += [f"| {b['m']} | {b['family']} | {b['us_block']} |" for b in blocks]
    (out / "gemv_variants.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
