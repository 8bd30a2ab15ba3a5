"""Extra inference cost of QuIP's transforms (V x before, Uᵀ y after the matmul), unfused.

For the Linear layers of a whole model (shapes only: the values do not change the time), one
decode token (batch 1, fp16) is pushed through every layer in turn, once with plain
QuantLinear modules and once with QuipLinear modules holding the same packed weights; the
difference is the cost of the randomized Hadamard transforms as implemented in PyTorch
(kvant.core.hadamard) before any fused kernel. A third pass times the transforms alone.
Layers that read one input in the real model (q/k/v, gate/up, nanoGPT's heads) get one input
tensor and one V, as QuIP quantizes them, so their input is rotated once.
Every layer has its own weights, so nothing is served from L2 between layers. Median of
``--reps`` timed passes after warm-up, CUDA events. Writes ``quip_overhead.{json,md}``.

GPU (kvant not installed there)::

    PYTHONPATH=src python3 benchmarks/quip_overhead.py --out $OUT
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


def measure(model: str, bits: int, group_size: int, reps: int, device,
            graph: bool = False) -> dict:
    """ms per token for plain and QuIP layers of ``model``, and for the transforms alone;
    ``graph``: each pass replayed as one CUDA graph instead of run eagerly."""
    groups, blocks = MODELS[model]
    out = {}
    wrap = graphed if graph else (lambda f: f)
    for kind in ("quant", "quip"):
        built = build_groups(groups, blocks, kind, bits, group_size, device)

        def run():
            for x, mods in built:
                for m in mods:
                    m(x)
        out[kind] = time_pass(wrap(run), reps, device)
        if kind == "quip":
            ys = {n: torch.randn(1, 1, n, device=device, dtype=torch.float16)
                  for _, ns in groups for n in ns}
            plans = [(x, mods[0].transforms()[0], [m.transforms()[1] for m in mods])
                     for x, mods in built]

            def transforms_only():
                for x, v, us in plans:
                    v.forward(x)
                    for u in us:
                        u.inverse(ys[u.n])
            out["transforms"] = time_pass(wrap(transforms_only), reps, device)
        n_layers = sum(len(mods) for _, mods in built)
        built = None  # free the layers before the next kind
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"model": model, "bits": bits, "group_size": group_size, "layers": n_layers,
            "ms_per_token_quant": out["quant"], "ms_per_token_quip": out["quip"],
            "ms_per_token_transforms": out["transforms"],
            "overhead_ms": out["quip"] - out["quant"],
            "overhead_pct": 100 * (out["quip"] / out["quant"] - 1),
            "dtype": "float16", "batch": 1, "mode": "cuda graph" if graph else "eager"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    records = []
    # eager: what a Python loop over the layers pays (launches and dispatch included);
    # CUDA graph (GPU only): the GPU time alone, as in a graph-captured decode step
    for graph in ((False, True) if device.type == "cuda" else (False,)):
        for model in args.models:
            r = measure(model, args.bits, args.group_size, args.reps, device, graph)
            r.update(device=rep.device_name(device), date=rep.today(), commit=rep.git_commit(), dirty=rep.tree_dirty())
            records.append(r)
            print(json.dumps(r), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(records, out / "quip_overhead.json")
    lines = [f"## QuIP transform overhead, decode (batch 1, fp16), {records[0]['device']}", "",
             "Eager: one Python call per layer, as timed by CUDA events (launch and dispatch "
             "overhead included). CUDA graph: the same pass captured and replayed, GPU time "
             "only.", "",
             "| mode | model | linears | W | ms/token QuantLinear | ms/token QuipLinear | "
             "transforms alone ms | overhead % |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['mode']} | {r['model']} | {r['layers']} | {r['bits']}-bit "
                     f"{group_label(r['group_size'])} | {r['ms_per_token_quant']:.3f} | "
                     f"{r['ms_per_token_quip']:.3f} | {r['ms_per_token_transforms']:.3f} | "
                     f"{r['overhead_pct']:+.1f} |")
    (out / "quip_overhead.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
