"""Extra inference cost of QuIP's transforms (V x before, Uᵀ y after the matmul).

For the Linear layers of a whole model (shapes only: the values do not change the time), one
decode token (batch 1, fp16) is pushed through every layer in turn: with plain QuantLinear
modules, with QuipLinear modules holding the same packed weights and the reference
transforms (kvant.core.hadamard, 2 + 2t small kernels a transform), and with the same
QuipLinear modules using the one-launch transform kernel (``kvant::rht``,
kernels/hadamard.py; ``QuipLinear.transform_kernel``). Two more passes time the transforms
alone, reference and kernel. Issue #14's goal: the QuIP step with the kernel <= 1.15x the
plain W4 step on the 7B shape (``ratio_quip_kernel``). ``kernel_sides`` says how many of the
transforms the kernel computes (the others, e.g. width 64, stay on the reference), and
``max_rel_diff`` compares the two QuIP paths' outputs on the model's first input group.
Layers that read one input in the real model (q/k/v, gate/up, nanoGPT's heads) get one input
tensor and one V, as QuIP quantizes them, so their input is rotated once.
Every layer has its own weights, so nothing is served from L2 between layers. Median of
``--reps`` timed passes after warm-up, CUDA events. Writes ``quip_overhead.{json,md}``;
records carry ``commit`` and ``dirty`` (benchmarks/record.py; a dirty tree needs
``--allow-dirty``).

GPU (kvant not installed there)::

    PYTHONPATH=src python3 benchmarks/quip_overhead.py --out $OUT
    (defaults: W4 g128, all three models, eager and CUDA graph)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from kvant.serve.generate import capture_graph  # noqa: E402
import record as rep  # noqa: E402  (benchmarks/record.py: device, date, commit)
from kvant.eval.table import group_label, write_json  # noqa: E402
from kvant.kernels import hadamard as rht  # noqa: E402
from kvant.nn.qlinear import QuantLinear  # noqa: E402
from kvant.nn.quip_linear import QuipLinear  # noqa: E402

# per block: groups (in_features, [out_features of the layers reading that input]); blocks
MODELS = {
    "nanogpt-shakespeare": ([(384, [64] * 18), (384, [384]), (384, [1536]), (1536, [384])], 6),
    "smollm2-135m": ([(576, [576, 192, 192]), (576, [576]), (576, [1536, 1536]),
                      (1536, [576])], 30),
    "llama2-7b": ([(4096, [4096] * 3), (4096, [4096]), (4096, [11008] * 2), (11008, [4096])],
                  32),
}


def build_groups(groups, blocks, kind, bits, group_size, device):
    """[(input x (1, 1, K), [modules])] for every input of the model, fp16 on ``device``.

    QuIP groups get random signs, one V per group (shared inside it, as QuIP assigns them).
    """
    cls = QuipLinear if kind == "quip" else QuantLinear
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(blocks):
        for k, ns in groups:
            gs = group_size if k % group_size == 0 else -1
            mods = [cls(k, n, bits, gs, dtype=torch.float16) for n in ns]
            if kind == "quip":
                sign_in = torch.randint(0, 256, ((k + 7) // 8,), generator=g, dtype=torch.uint8)
                for m in mods:
                    m.sign_in.copy_(sign_in)
                    m.sign_out.copy_(torch.randint(0, 256, m.sign_out.shape, generator=g,
                                                   dtype=torch.uint8))
            x = torch.randn(1, 1, k, generator=g).to(device, torch.float16)
            out.append((x, [m.to(device) for m in mods]))
    return out


def time_pass(fn, reps: int, device) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def graphed(fn):
    """``fn`` captured once as a CUDA graph (kvant.serve.generate.capture_graph, three warm-ups); returns
    the replay. Times GPU work only: no Python or launch overhead, as in a graph-captured
    decode step."""
    return capture_graph(fn, warmup=3).replay


def _run(built):
    def run():
        for x, mods in built:
            for m in mods:
                m(x)
    return run


def _randomize(mods) -> None:
    """Random packed weights, scales and zeros in place (the kernel layout is rebuilt)."""
    for m in mods:
        for t in (m.qweight, m.qzeros):
            t.random_()
        m.scales.uniform_(0.005, 0.02)
        m.prepare()


def _set_kernel(built, on: bool) -> None:
    for _, mods in built:
        for m in mods:
            m.transform_kernel = on
    QuipLinear._last_input = None  # no rotated input carried from one path to the other


def _transform_plans(built, device):
    """[(x, V, plan of V, [(U, plan of U, y)])] of every input group, plans None where the
    kernel does not apply; y: an output-sized input for Uᵀ."""
    plans = []
    for x, mods in built:
        v, pv = mods[0].transforms()[0], mods[0].transform_plans(device)[0]
        us = [(m.transforms()[1], m.transform_plans(device)[1],
               torch.randn(1, 1, m.out_features, device=device, dtype=torch.float16))
              for m in mods]
        plans.append((x, v, pv, us))
    return plans


def _transforms_pass(plans, kernel: bool):
    def go(t, p, x, inverse):
        if kernel and rht.applies(p, x):
            return rht.apply(p, x, inverse)
        return t.inverse(x) if inverse else t.forward(x)

    def run():
        for x, v, pv, us in plans:
            go(v, pv, x, False)
            for u, pu, y in us:
                go(u, pu, y, True)
    return run


def measure(model: str, bits: int, group_size: int, reps: int, device,
            graph: bool = False) -> dict:
    """ms per token for plain and QuIP layers of ``model`` (reference transforms and the
    kernel), and for the transforms alone; ``graph``: each pass replayed as one CUDA graph
    instead of run eagerly."""
    groups, blocks = MODELS[model]
    wrap = graphed if graph else (lambda f: f)
    built = build_groups(groups, blocks, "quant", bits, group_size, device)
    out = {"quant": time_pass(wrap(_run(built)), reps, device)}
    built = None  # free the layers before the QuIP ones
    if device.type == "cuda":
        torch.cuda.empty_cache()
    built = build_groups(groups, blocks, "quip", bits, group_size, device)
    n_layers = sum(len(mods) for _, mods in built)
    x0, mods0 = built[0]
    _randomize(mods0)  # zero weights would make the two paths' outputs trivially equal
    ys = {}
    for kernel in (False, True):
        _set_kernel(built, kernel)
        ys[kernel] = [m(x0).float() for m in mods0]
        _set_kernel(built, kernel)
        out["quip_kernel" if kernel else "quip"] = time_pass(wrap(_run(built)), reps, device)
    diff = max(((a - b).norm() / b.norm()).item() for a, b in zip(ys[True], ys[False]))
    plans = _transform_plans(built, device)
    sides = [pv is not None and rht.applies(pv, x) for x, _, pv, _ in plans] + \
        [pu is not None and rht.applies(pu, y) for _, _, _, us in plans for _, pu, y in us]
    for kernel in (False, True):
        key = "transforms_kernel" if kernel else "transforms"
        out[key] = time_pass(wrap(_transforms_pass(plans, kernel)), reps, device)
    built = plans = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": model, "bits": bits, "group_size": group_size, "layers": n_layers,
            "ms_per_token_quant": out["quant"], "ms_per_token_quip": out["quip"],
            "ms_per_token_quip_kernel": out["quip_kernel"],
            "ms_per_token_transforms": out["transforms"],
            "ms_per_token_transforms_kernel": out["transforms_kernel"],
            "overhead_ms": out["quip"] - out["quant"],
            "overhead_pct": 100 * (out["quip"] / out["quant"] - 1),
            "overhead_kernel_ms": out["quip_kernel"] - out["quant"],
            "ratio_quip_kernel": out["quip_kernel"] / out["quant"], "goal_ratio": 1.15,
            "kernel_sides": f"{sum(sides)}/{len(sides)}", "max_rel_diff": diff,
            "dtype": "float16", "batch": 1, "mode": "cuda graph" if graph else "eager"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--allow-dirty", action="store_true",
                   help="record from uncommitted code (records say dirty: true)")
    args = p.parse_args(argv)
    prov = rep.provenance_or_exit(args.allow_dirty)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    records = []
    # eager: what a Python loop over the layers pays (launches and dispatch included);
    # CUDA graph (GPU only): the GPU time alone, as in a graph-captured decode step
    for graph in ((False, True) if device.type == "cuda" else (False,)):
        for model in args.models:
            r = measure(model, args.bits, args.group_size, args.reps, device, graph)
            r.update(device=rep.device_name(device), date=rep.today(), **prov)
            records.append(r)
            print(json.dumps(r), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(records, out / "quip_overhead.json")
    lines = [f"## QuIP transform overhead, decode (batch 1, fp16), {records[0]['device']}", "",
             "Eager: one Python call per layer, as timed by CUDA events (launch and dispatch "
             "overhead included). CUDA graph: the same pass captured and replayed, GPU time "
             "only. QuIP ref: the reference transforms (kvant.core.hadamard); QuIP kernel: "
             "one launch a transform (kvant::rht). Goal (issue #14): QuIP kernel / QuantLinear "
             f"<= {records[0]['goal_ratio']} on llama2-7b. {rep.provenance_note(records)[0]} "
             f"Date {records[0]['date']}.", "",
             "| mode | model | linears | W | ms/token QuantLinear | ms/token QuIP ref | "
             "ms/token QuIP kernel | transforms ref ms | transforms kernel ms | "
             "QuIP kernel / QuantLinear | kernel sides | max rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['mode']} | {r['model']} | {r['layers']} | {r['bits']}-bit "
                     f"{group_label(r['group_size'])} | {r['ms_per_token_quant']:.3f} | "
                     f"{r['ms_per_token_quip']:.3f} | {r['ms_per_token_quip_kernel']:.3f} | "
                     f"{r['ms_per_token_transforms']:.3f} | "
                     f"{r['ms_per_token_transforms_kernel']:.3f} | "
                     f"{r['ratio_quip_kernel']:.3f} | {r['kernel_sides']} | "
                     f"{r['max_rel_diff']:.1e} |")
    (out / "quip_overhead.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
