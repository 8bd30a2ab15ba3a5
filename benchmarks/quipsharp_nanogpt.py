"""QuIP# (E8P codebook + block LDLQ) against QuIP's scalar LDLQ on the embedded nanoGPT.

Every spec quantizes a fresh copy of the embedded model with the same calibration windows
(training split, ``--n-samples`` x 256 chars, seed 0) and is scored on the whole validation
split (perplexity). Writes ``results/quipsharp_nanogpt.{json,md}`` (or ``--name``); a rerun
merges into the JSON by spec, so specs may run in several processes one after another.

    python benchmarks/quipsharp_nanogpt.py --allow-dirty \
        --specs quip:bits=2,group_size=-1 quipsharp:bits=2

A spec ending in ``@T`` is mixed precision to T stored bits per weight (``kvant.quantize(...,
target_bpw=T)``: each layer's width among the method's own, 2/3/4 bits for quipsharp, Fisher
sensitivity on the same calibration windows); its record carries the plan's share of weights
per width and the seconds spent measuring.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record  # noqa: E402

import kvant  # noqa: E402
from kvant.algorithms.registry import config_from_spec  # noqa: E402
from kvant.bench import config_label  # noqa: E402
from kvant.eval.table import markdown_table, model_bytes, quantized_bits_per_weight  # noqa: E402
from kvant.model.nanogpt import load_embedded  # noqa: E402

DEFAULT_SPECS = ("float", "quip:bits=2,group_size=-1", "quipsharp:bits=2")


def run_spec(spec: str, calib: torch.Tensor, prov: dict) -> dict:
    """One record: quantize (unless float), evaluate, with provenance."""
    model, tok = load_embedded()
    t0 = time.perf_counter()
    cfg, plan = None, None
    if spec != "float":
        body, _, target = spec.partition("@")
        cfg = config_from_spec(body)
        rep = kvant.quantize(model, cfg, calib, kvant.EngineOptions(device="cpu",
                                                                    show_progress=False),
                             target_bpw=float(target) if target else None)
        plan = rep.plan
    seconds = time.perf_counter() - t0
    ev = kvant.evaluate(model, tok, show_progress=False)
    label = "float" if cfg is None else config_label(cfg)
    if cfg is not None and cfg.method == "quipsharp":
        label += f"-{cfg.scale}" + ("-rtn" if cfg.rounding == "rtn" else "") + (
            "-nosearch" if cfg.rounding == "ldlq" and not cfg.scale_search else "")
    if plan is not None:
        label += f"-mixed@{plan.mixed.target_bpw:g}"
    return {"model": "nanogpt-shakespeare", "spec": spec, "method": label,
            "bits": None if cfg is None else cfg.bits,
            "group_size": None if cfg is None else cfg.group_size,
            "bits_per_weight": quantized_bits_per_weight(model),
            "size_mb": model_bytes(model) / 1e6, "ppl": ev["ppl"], "quant_seconds": seconds,
            "config": None if cfg is None else cfg.to_dict(),
            **({} if plan is None else {
                "target_bpw": plan.mixed.target_bpw, "plan_share": plan.histogram(),
                "plan_measure_seconds": plan.measure_seconds,
                "plan_sensitivity": plan.mixed.sensitivity}),
            "calib": {"source": "embedded training split", "n_samples": len(calib),
                      "seq_len": calib.shape[1], "seed": 0},
            "eval": {"dataset": "embedded validation split", "seq_len": ev["seq_len"],
                     "tokens": ev["tokens"], "windows": ev["windows"]},
            "device": "cpu-2core", "date": record.today(), **prov}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--specs", nargs="*", default=list(DEFAULT_SPECS))
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--name", default="quipsharp_nanogpt")
    p.add_argument("--allow-dirty", action="store_true")
    a = p.parse_args(argv)
    prov = record.provenance_or_exit(a.allow_dirty)
    model, tok = load_embedded()
    calib = kvant.calibration_for(model, tok, n_samples=a.n_samples, seed=0)
    out = record.RESULTS / a.name
    for spec in a.specs:
        r = run_spec(spec, calib, prov)
        path = out.with_suffix(".json")
        old = json.loads(path.read_text()) if path.exists() else []
        records = [x for x in old if x["spec"] != spec] + [r]
        order = {s: i for i, s in enumerate(DEFAULT_SPECS)}
        records.sort(key=lambda x: (order.get(x["spec"], len(order)), x["bits"] or 16,
                                    x["bits_per_weight"] or 16))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(records, indent=1) + "\n")
        tmp.replace(path)
        note, _ = record.provenance_note(records)
        md = markdown_table(records, "QuIP# (E8P + block LDLQ) vs QuIP on the embedded nanoGPT",
                            note=("spec, code, device",
                                  lambda x: f"{x['spec']} {record.stamp(x)}"))
        head = (f"{note} Calibration: {r['calib']}. Eval: {r['eval']}. Written by "
                "benchmarks/quipsharp_nanogpt.py.\n\n")
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text(md.replace("\n\n", "\n\n" + head, 1) if md.startswith("## ") else
                       head + md)
        tmp.replace(out.with_suffix(".md"))
        print(f"{spec}: ppl {r['ppl']:.4f}, {r['bits_per_weight'] or 16:.3f} bits/weight, "
              f"{r['quant_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
