"""Extra inference cost of QuIP's transforms (V x before, Uᵀ y after the matmul), unfused.

For the Linear layers of a whole model (shapes only: the values do not change the time), one
decode token (batch 1, fp16) is pushed through every layer in turn, once with plain
QuantLinear modules and once with QuipLinear modules holding the same packed weights; the
difference is the cost of the randomized Hadamard transforms as implemented in PyTorch
(kvant.core.hadamard) before any fused kernel. A third pass times the transforms alone.
Every layer has its own weights, so nothing is served from L2 between layers. Median of
``--reps`` timed passes after warm-up, CUDA events. Writes ``quip_overhead.{json,md}``.

GPU (kvant not installed there)::

    PYTHONPATH=src python3 benchmarks/quip_overhead.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kvant import report as rep
from kvant.nn.qlinear import QuantLinear
from kvant.nn.quip_linear import QuipLinear

# (in_features, out_features, count per block), blocks
MODELS = {
    "nanogpt-shakespeare": ([(384, 64, 18), (384, 384, 1), (384, 1536, 1), (1536, 384, 1)], 6),
    "smollm2-135m": ([(576, 576, 2), (576, 192, 2), (576, 1536, 2), (1536, 576, 1)], 30),
    "llama2-7b": ([(4096, 4096, 4), (4096, 11008, 2), (11008, 4096, 1)], 32),
}


def build_layers(shapes, blocks, kind, bits, group_size, device):
    """Every Linear of the model as an empty ``kind`` module (fp16) on ``device``."""
    cls = QuipLinear if kind == "quip" else QuantLinear
    layers = []
    for _ in range(blocks):
        for k, n, count in shapes:
            gs = group_size if k % group_size == 0 else -1
            for _ in range(count):
                layers.append(cls(k, n, bits, gs, dtype=torch.float16).to(device))
    return layers


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


def measure(model: str, bits: int, group_size: int, reps: int, device) -> dict:
    """ms per token for plain and QuIP layers of ``model``, and for the transforms alone."""
    shapes, blocks = MODELS[model]
    xs = {k: torch.randn(1, 1, k, device=device, dtype=torch.float16) for k, _, _ in shapes}
    out = {}
    for kind in ("quant", "quip"):
        layers = build_layers(shapes, blocks, kind, bits, group_size, device)

        def run():
            for m in layers:
                m(xs[m.in_features])
        out[kind] = time_pass(run, reps, device)
        if kind == "quip":
            ys = {n: torch.randn(1, 1, n, device=device, dtype=torch.float16)
                  for _, n, _ in shapes}
            pairs = [m.transforms() for m in layers]

            def transforms_only():
                for m, (v, u) in zip(layers, pairs):
                    v.forward(xs[m.in_features])
                    u.inverse(ys[m.out_features])
            out["transforms"] = time_pass(transforms_only, reps, device)
        n_layers = len(layers)
        del layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"model": model, "bits": bits, "group_size": group_size, "layers": n_layers,
            "ms_per_token_quant": out["quant"], "ms_per_token_quip": out["quip"],
            "ms_per_token_transforms": out["transforms"],
            "overhead_ms": out["quip"] - out["quant"],
            "overhead_pct": 100 * (out["quip"] / out["quant"] - 1),
            "dtype": "float16", "batch": 1}


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
    for model in args.models:
        r = measure(model, args.bits, args.group_size, args.reps, device)
        r.update(device=rep.device_name(device), date=rep.today(), commit=rep.git_commit())
        records.append(r)
        print(json.dumps(r), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep.write_json(records, out / "quip_overhead.json")
    lines = [f"## QuIP transform overhead, decode (batch 1, fp16), {records[0]['device']}", "",
             "| model | linears | W | ms/token QuantLinear | ms/token QuipLinear | "
             "transforms alone ms | overhead % |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['layers']} | {r['bits']}-bit "
                     f"{rep.group_label(r['group_size'])} | {r['ms_per_token_quant']:.3f} | "
                     f"{r['ms_per_token_quip']:.3f} | {r['ms_per_token_transforms']:.3f} | "
                     f"{r['overhead_pct']:+.1f} |")
    (out / "quip_overhead.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
