"""W4 g128 at every batch (1 to 8192): every kvant path against fp16 cuBLAS and two peers.

For each weight shape (N, K) of the kernel table and batch M, in one run on one GPU: fp16
``torch.matmul`` (cuBLAS), kvant's dispatched path (``dispatch.heuristic``: the committed
PAIRS_BY_BATCH table, no tuning) and every candidate it chooses among — the decode kernel
("dot", its heuristic tile, M <= 64), each tile of the large-batch GEMM ("mma",
dispatch.MMA_TILES, with and without K splits) and dequantize-into-a-reused-buffer + cuBLAS
("dequant") — plus ``torch._weight_int4pack_mm`` (bf16, M <= 256: its time grows linearly
with M) and GemLite's A16W4 g128 (when the ``gemlite`` package imports; its shipped H100
configurations are loaded, an H200 reads them as the same sm_90 part).

Timing as in benchmarks/kernel_table.py: each call reads its own weight copy (enough copies to
exceed 3x the L2), the calls are captured in a CUDA graph and replayed; repetitions shrink
with the call's length. Every path's output is checked against the float64 product of the
reference weight on the first rows (``rel_err``). A path that fails records its error and
the run goes on; past ``--budget`` seconds no new batch is started and what was measured is
written. The Markdown ends with the dispatch table the measurements support, in the format
of ``dispatch.PAIRS_BY_BATCH``.

Writes ``<out>/prefill.{json,md}``. Usage:
``PYTHONPATH=src python3 benchmarks/prefill.py --out DIR [--allow-dirty] [--budget 400]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import traceback
from pathlib import Path

import torch

from kernel_table import (GS, SHAPES, _clone, _copies, _packed_problem, format_bits, int4pack_peer,
                     precompile)
from record import device_name, provenance_or_exit, today

BATCHES = [1, 16, 32, 64, 128, 256, 512, 2048, 8192]
PEER_MAX_M = 256
CHECK_ROWS = 128  # rows of x whose outputs are checked against the float64 reference


def graph_us(fns, target_ms: float = 40.0) -> float:
    """Median µs per call of ``fns`` (each once, in order) replayed as one CUDA graph; the
    repetitions shrink with the call's length (at least 3 rounds of at least 1 replay)."""
    from kvant.serve.generate import capture_graph

    def all_fns():
        for f in fns:
            f()
    g = capture_graph(all_fns)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    torch.cuda.synchronize()
    reps = max(1, min(20, int(target_ms / max(a.elapsed_time(b), 1e-3))))
    times = []
    for _ in range(5 if reps > 1 else 3):
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (reps * len(fns)))
    del g
    return statistics.median(times)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y[: ref.shape[0]].double()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - ref).norm() / ref.norm()).item()


def gemlite_layers(n, k, copies, log):
    """GemLite A16W4 g128 layers on random stored tensors (fp16), or [] without gemlite;
    returns (layers, dequantized weight of the first, version)."""
    try:
        import gemlite
        from gemlite.helper import A16Wn
    except Exception as e:  # not installed, or it does not import here
        log(f"gemlite unavailable: {e!r}"[:200])
        return [], None, None
    cfg = Path(gemlite.__file__).parent / "configs" / "h100.json"
    if cfg.exists() and not getattr(gemlite_layers, "loaded", False):
        gemlite.load_config(str(cfg))
        gemlite_layers.loaded = True
    g = torch.Generator(device="cuda").manual_seed(2)
    layers, w0 = [], None
    for i in range(copies):
        q = torch.randint(0, 16, (n, k), generator=g, device="cuda", dtype=torch.uint8)
        s = (torch.rand(n, k // GS, generator=g, device="cuda") * 0.002 + 0.001).half()
        z = torch.randint(0, 16, (n, k // GS), generator=g, device="cuda").half()
        if i == 0:
            idx = torch.arange(k, device="cuda") // GS
            w0 = (q.float() - z.float()[:, idx]) * s.float()[:, idx]
        layers.append(A16Wn(device="cuda", dtype=torch.float16).from_weights(
            q, s, z, W_nbits=4, group_size=GS))
    return layers, w0, gemlite.__version__


def _attempt(rows, base, kind, fn_make, ref, log, **extra):
    """Time one path (``fn_make(i)``: the call on weight copy i, ``fn_make.copies`` of them)
    and append its row; a failure appends the error instead."""
    row = dict(base, path=kind, **extra)
    try:
        fns = [fn_make(i) for i in range(fn_make.copies)]
        y = fns[0]()
        torch.cuda.synchronize()
        row["rel_err"] = rel_err(y, ref) if ref is not None else None
        row["us"] = graph_us(fns)
    except Exception as e:  # recorded, the run goes on
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        log(f"  {kind} {extra.get('config', '')}: FAILED {row['error'][:150]}")
        log(traceback.format_exc(limit=3)[-600:])
    rows.append(row)
    return row


def _maker(copies, fn):
    fn.copies = copies
    return fn


def bench_shape(n, k, batches, rows, deadline, log, use_gemlite=True):
    """Every path at every batch of one shape; stops starting batches after ``deadline``."""
    import kvant.kernels.triton.dispatch as d
    from kvant.kernels.triton import repack as rp

    p0 = _packed_problem(n, k, 4)
    ps = [p0] + [_clone(p0) for _ in range(_copies(p0.nbytes()) - 1)]
    w_ref = rp.dequantize_packed(p0).double()
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
          for _ in range(_copies(n * k * 2))]
    peers = int4pack_peer(n, k, _copies(n * k // 2)) if min(batches) <= PEER_MAX_M else []
    gl, gl_w, gl_version = (gemlite_layers(n, k, _copies(n * k // 2), log) if use_gemlite
                            else ([], None, None))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in batches:
        if time.time() > deadline:
            log(f"time guard: {n}x{k} M={m} and later not started")
            rows.append(dict(shape=[n, k], batch=m, path="not_run", error="time guard"))
            continue
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xr = x[:CHECK_ROWS].double()
        ref = xr @ w_ref.t()
        base = dict(shape=[n, k], batch=m, bits=4, group_size=GS, dtype="float16")
        t_cell = time.time()
        fp = _attempt(rows, base, "fp16", _maker(len(ws), lambda i: (
            lambda w=ws[i]: torch.matmul(x, w.t()))), None, log)
        cands = d.candidates(m, p0, x.device)
        chosen = d.heuristic(m, n, k, 4, x.device, True)
        paths = [("dispatched", chosen)] + [(c.kernel, c) for c in cands
                                            if c.kernel in ("mma", "dequant")]
        if m <= d.DOT_MAX_M:
            paths.append(("dot", d.heuristic(m, n, k, 4, x.device, True)
                          if chosen.kernel == "dot" else
                          d.Config("dot", bn=128, bm=d.block_m("dot", m), split=1,
                                   warps=d.dot_warps(128, d.block_m("dot", m)), stages=3,
                                   cpi=1)))
        for kind, cfg in paths:
            _attempt(rows, base, kind, _maker(len(ps), lambda i, c=cfg: (
                lambda p=ps[i]: d.launch(x, p, c))), ref, log, config=repr(cfg))
        if m <= PEER_MAX_M and peers:
            xb = x.to(torch.bfloat16)
            _attempt(rows, base, "int4pack", _maker(len(peers), lambda i: (
                lambda a=peers[i]: torch._weight_int4pack_mm(xb, a[0], GS, a[1]))), None, log)
        if gl:
            gref = xr @ gl_w.double().t()
            _attempt(rows, base, "gemlite", _maker(len(gl), lambda i: (
                lambda lay=gl[i]: lay(x))), gref, log, version=gl_version)
        mine = [r for r in rows if r.get("shape") == [n, k] and r.get("batch") == m]
        us_fp = fp.get("us")
        for r in mine:
            if us_fp and r.get("us"):
                r["speedup"] = us_fp / r["us"]
        ok = [r for r in mine if r.get("us") and r["path"] in ("mma", "dequant", "dot")]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        disp = next((r for r in mine if r["path"] == "dispatched"), {})
        log(f"{n}x{k} M={m}: fp16 {us_fp or float('nan'):.1f}us; dispatched "
            f"{disp.get('us', float('nan')):.1f}us ({disp.get('speedup', float('nan')):.2f}x"
            f" {chosen.kernel}); best {best['path'] if best else '-'} "
            f"{best['us'] if best else float('nan'):.1f}us "
            f"({best.get('speedup', float('nan')) if best else float('nan'):.2f}x); "
            f"{time.time() - t_cell:.1f}s")
    torch.cuda.empty_cache()
    return sms


def dispatch_table(rows) -> list[str]:
    """Per batch, the fastest kvant path by geometric-mean speed-up over the shapes measured,
    and the rows of dispatch.PAIRS_BY_BATCH it implies."""
    def cfg_of(r):
        return r.get("config", "")
    lines, table = [], []
    for m in sorted({r["batch"] for r in rows if "batch" in r}):
        per = {}
        for r in rows:
            if r.get("batch") == m and r.get("speedup") and r["path"] in ("mma", "dequant",
                                                                         "dot"):
                key = (r["path"], _tile(cfg_of(r)))
                per.setdefault(key, {})[tuple(r["shape"])] = r["speedup"]
        shapes = {tuple(r["shape"]) for r in rows if r.get("batch") == m and "shape" in r
                  and r.get("path") == "fp16" and r.get("us")}
        full = {key: v for key, v in per.items() if set(v) >= shapes and shapes}
        if not full:
            continue
        geo = {key: math.exp(sum(math.log(s) for s in v.values()) / len(v))
               for key, v in full.items()}
        best = max(geo, key=geo.get)
        lines.append(f"| {m} | {best[0]} | `{best[1]}` | {geo[best]:.2f}× | "
                     f"{min(full[best].values()):.2f}× |")
        table.append((m, best))
    out = ["## Dispatch table", "",
           "Per batch: the kvant path with the best geometric-mean speed-up over fp16 across "
           "the shapes measured at that batch (its worst shape beside it).", "",
           "| batch | path | tile | geo-mean speed-up | worst shape |", "|---|---|---|---|---|",
           *lines, "", "Implied `dispatch.PAIRS_BY_BATCH` rows (a row per change of path; "
           "upper bound = the last batch measured with it):", "", "```python"]
    rows_out = []
    for i, (m, (path, tile)) in enumerate(table):
        nxt = table[i + 1][1] if i + 1 < len(table) else None
        if nxt == (path, tile):
            continue
        bound = "None" if i + 1 == len(table) else str(m)
        if path == "mma":
            bn, bm, w, st, kd = tile
            rows_out.append(f'    ({bound}, "mma", {bn}, {bm}, {w}, {st}, {kd}),')
        elif path == "dequant":
            rows_out.append(f'    ({bound}, "dequant", 64, 0, 4, 0, 0),')
        else:
            rows_out.append(f'    ({bound}, "dot", 0, 0, 0, 0, 0),')
    return out + rows_out + ["```", ""]


def _tile(cfg: str):
    """(BN, BM, warps, stages, KD) of a Config repr (mma), else ()."""
    if not cfg.startswith("Config(kernel='mma'"):
        return ()
    kv = dict(part.split("=") for part in cfg[len("Config("):-1].split(", "))
    return tuple(int(kv[k]) for k in ("bn", "bm", "warps", "stages", "kd"))


def write(rows, out: Path, meta: dict, note: str) -> None:
    """prefill.json (records) and prefill.md (a table per shape, then the dispatch table)."""
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.update(meta)
    (out / "prefill.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# W4 g128 at every batch on {meta['device']}", "",
             f"{meta['date']}, commit {meta['commit']}{' (dirty tree)' if meta['dirty'] else ''}"
             f", torch {meta['torch']}, triton {meta['triton']}. Median µs per call in a "
             "replayed CUDA graph, each call on its own weight copy; speed-up = fp16 cuBLAS "
             "µs / µs. kvant: fp16 activations, asymmetric g128 (ideal "
             f"{16 / format_bits(4, GS):.2f}×); `dispatched` = the committed table, `mma` = "
             "the best large-batch GEMM tile, `dequant` = dequantize into the reused buffer + "
             "cuBLAS, `dot` = the decode kernel. int4pack = torch._weight_int4pack_mm (bf16), "
             "gemlite = GemLite A16W4 g128. " + note, ""]
    shapes = []
    for r in rows:
        if r.get("shape") and r["shape"] not in shapes:
            shapes.append(r["shape"])
    for n, k in shapes:
        lines += [f"## {n}×{k}", "", "| batch | fp16 µs | dispatched | best mma (tile) | "
                  "dequant | dot | int4pack | gemlite |", "|---|---|---|---|---|---|---|---|"]
        for m in sorted({r["batch"] for r in rows if r.get("shape") == [n, k]}):
            cell = [r for r in rows if r.get("shape") == [n, k] and r["batch"] == m]

            def best(path):
                ok = [r for r in cell if r["path"] == path and r.get("us")]
                if not ok:
                    err = next((r.get("error") for r in cell if r["path"] == path), None)
                    return "failed" if err else "–"
                b = min(ok, key=lambda r: r["us"])
                tile = _tile(b.get("config", "")) if path == "mma" else ""
                sp = f" {b['speedup']:.2f}×" if b.get("speedup") else ""
                return f"{b['us']:.1f}{sp}" + (f" `{tile}`" if tile else "")
            fp = next((r for r in cell if r["path"] == "fp16" and r.get("us")), None)
            lines.append(f"| {m} | {fp['us']:.1f} | " if fp else f"| {m} | – | ")
            lines[-1] += " | ".join(best(p) for p in ("dispatched", "mma", "dequant", "dot",
                                                      "int4pack", "gemlite")) + " |"
        lines.append("")
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["## Failures", ""] + [f"- {r.get('shape')} M={r.get('batch')} {r['path']} "
                                        f"{r.get('config', '')}: {r['error']}" for r in failed]
        lines.append("")
    lines += dispatch_table(rows)
    (out / "prefill.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", default="", help="e.g. 8192x8192,28672x8192")
    ap.add_argument("--batches", default="", help="e.g. 128,2048")
    ap.add_argument("--budget", type=float, default=400.0,
                    help="seconds after which no new batch is started")
    ap.add_argument("--no-gemlite", action="store_true")
    ap.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    prov = provenance_or_exit(args.allow_dirty)
    t0 = time.time()
    deadline = t0 + args.budget
    import triton

    import kvant.kernels.triton.dispatch as d
    from kvant.kernels.triton import repack as rp

    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x"))
                                             for s in args.shapes.split(",")]
    batches = BATCHES if not args.batches else [int(b) for b in args.batches.split(",")]
    meta = dict(device=device_name(), date=today(), commit=prov["commit"], dirty=prov["dirty"],
                torch=torch.__version__, triton=triton.__version__)

    def log(msg):
        print(f"[{time.time() - t0:5.0f}s] {msg}", flush=True)

    # compile every mma / dot variant once, in parallel processes (Triton's disk cache)
    probe = rp.PackedWeight(torch.empty(1, 1), None, None, None, 4, GS, 4096, 4096,
                            pairs=True, tile=rp.PAIRS_TILE)
    tasks = set()
    for m in batches:
        for cfg in d.candidates(m, probe, torch.device("cuda")):
            if cfg.kernel in ("mma", "dot"):
                key = dict(vars(cfg), split=min(cfg.split, 2))
                tasks.add((4, min(m, 256), tuple(sorted(key.items())), "float16"))
    tasks = [(b, m, dict(c), dt) for b, m, c, dt in sorted(tasks)]
    failed = precompile(tasks, args.workers)
    log(f"precompiled {len(tasks)} variants; {len(failed)} failed: {failed[:3]}")
    rows, out = [], Path(args.out)
    for n, k in shapes:
        if time.time() > deadline:
            log(f"time guard: shape {n}x{k} not started")
            rows.append(dict(shape=[n, k], path="not_run", error="time guard"))
            continue
        try:
            bench_shape(n, k, batches, rows, deadline, log, not args.no_gemlite)
        except Exception as e:  # e.g. out of memory: the other shapes still run
            log(f"{n}x{k} failed: {e!r}"[:300])
            rows.append(dict(shape=[n, k], path="shape", error=f"{e!r}"[:300]))
            torch.cuda.empty_cache()
        write(rows, out, meta, "(partial: the run continues)")
    stopped = any(r.get("error") == "time guard" for r in rows)
    write(rows, out, meta, f"Run time {time.time() - t0:.0f}s" +
          ("; stopped by the time guard, cells marked not_run were not measured." if stopped
           else "."))
    log(f"wrote {out}/prefill.{{json,md}} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
