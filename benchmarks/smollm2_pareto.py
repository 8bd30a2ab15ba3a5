"""SmolLM2-135M: perplexity against stored bits per weight for every row of the quality table
(``results/smollm2.json``) and the fine-tuning table (``results/smollm2_tune.json``), the
Pareto front marked. Writes ``smollm2_pareto.{png,md}``: no measurement of its own, only the
rows of those two files, each with its commit and device (the two tables share the
protocol: C4-sample calibration 128 × 2048, WikiText-2 test, 149 windows of 2048, the float
model the dequantized Q4_1 GGUF; their float rows must agree). CPU::

    python benchmarks/smollm2_pareto.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _points(quality: list, tune: list) -> tuple[float, list]:
    floats = {round(r["ppl"], 3) for r in quality + tune if r["method"] == "float"}
    if len(floats) != 1:
        raise SystemExit(f"the tables' float rows disagree: {sorted(floats)}")
    pts = []
    # the quality table's rows untuned; the tuning table's only where tuned (its untuned
    # rows repeat a rounding)
    rows = [(r, "none") for r in quality] + [
        (r, r.get("finetune", "none")) for r in tune if r.get("finetune", "none") != "none"]
    for r, tuned in rows:
        if r["method"] == "float" or not r.get("bits_per_weight"):
            continue
        # bits/weight to 3 decimals: layouts that differ in the 5th are the same size
        pts.append(dict(bpw=round(r["bits_per_weight"], 3), ppl=r["ppl"],
                        label=r["method"] + ("" if tuned == "none" else f" +{tuned}"),
                        spec=r.get("spec", r["method"]), tuning=tuned,
                        code=f"{r.get('commit', 'unknown')} {r.get('device', '')}"))
    return floats.pop(), pts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quality", default=str(RESULTS / "smollm2.json"))
    p.add_argument("--tune", default=str(RESULTS / "smollm2_tune.json"))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--max-ppl", type=float, default=200.0,
                   help="leave out rows above this perplexity (the plot's log axis)")
    args = p.parse_args(argv)
    from kvant.eval.plot import plot_pareto

    base, pts = _points(json.loads(Path(args.quality).read_text()),
                        json.loads(Path(args.tune).read_text()))
    shown = [x for x in pts if x["ppl"] <= args.max_ppl]
    out = Path(args.out)
    front = plot_pareto([(x["bpw"], x["ppl"], x["label"]) for x in shown],
                        out / "smollm2_pareto.png",
                        "SmolLM2-135M, WikiText-2: perplexity vs stored bits/weight", base)
    lines = ["# SmolLM2-135M: perplexity against bits per weight, the Pareto front", "",
             f"Every row of `smollm2.json` and the tuned rows of `smollm2_tune.json` "
             f"(same protocol; float {base:.2f}, the dequantized Q4_1 GGUF), rows above "
             f"perplexity {args.max_ppl:g} left out ({len(pts) - len(shown)} of {len(pts)}). "
             "The front: no other row has at most its bits and at most its perplexity. "
             "Each row names the code and device that measured it.", "",
             "| bits/weight | ppl | Δ ppl % | method (spec) | tuning | code, device |",
             "|---|---|---|---|---|---|"]
    for i in front:
        x = shown[i]
        lines.append(f"| {x['bpw']:.3f} | {x['ppl']:.2f} | {100 * (x['ppl'] / base - 1):+.1f} "
                     f"| {x['label']} (`{x['spec']}`) | {x['tuning']} | {x['code']} |")
    (out / "smollm2_pareto.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[6:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
