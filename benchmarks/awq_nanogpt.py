"""AWQ and AWQ+GPTQ against RTN and GPTQ on the embedded nanoGPT, same run, same machine.

The embedded character-level GPT (Tiny Shakespeare, n_embd 384, 6 blocks of 6 per-head
k/q/v Linears, proj, and a ReLU FFN) is quantized with asymmetric grids at W4 g128, W3 g128
and W2 g64 — calibration: 128 random windows x 256 characters of the training split, seed 0,
the protocol of ``gptq_nanogpt.py`` — and scored by per-character perplexity on the
validation split (windows of 256). Every AWQ record also says how each group's scale was
applied (folded into which module, or kept as an input scale). Writes
``awq_nanogpt.{json,md,png}``.

    python benchmarks/awq_nanogpt.py                         # the full table (CPU)
    python benchmarks/awq_nanogpt.py --grids 3:128 --max-windows 16 --methods rtn awq
    python benchmarks/awq_nanogpt.py --combine results/a.json results/b.json --name all
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from kvant import report as rep

import nanogpt_bench as nb  # benchmarks/: the protocol the nanoGPT tables share
from nanogpt_bench import N_CALIB, SEED, SEQ_LEN

METHODS = {  # label -> spec without the grid
    "rtn": "rtn:",
    "gptq": "gptq:",
    "awq": "awq:",
    "awq-duo": "awq:duo_scaling=true",
    "awq-noclip": "awq:clip_search=false",
    "awq+gptq": "awq:rounding=gptq",
    "awq+gptq-noclip": "awq:rounding=gptq,clip_search=false",
}
DEFAULT_METHODS = ["rtn", "gptq", "awq", "awq+gptq"]
GRIDS = ["4:128", "3:128", "2:64"]


def treatments(report) -> str:
    """Distinct group treatments with counts: 'fold->ln1 x6; fold->sa.heads.*.value x6'."""
    seen: dict[str, int] = {}
    for b in report.blocks:
        for g in b.get("awq", []):
            text = re.sub(r"\(\d+\)", "", g["treatment"])
            text = re.sub(r"\.\d+\.", ".*.", text)
            head, _, rest = text.partition("->")
            if rest:
                where, sep, tail = rest.partition(";")
                parts = list(dict.fromkeys(where.split(",")))
                text = head + "->" + ",".join(parts) + sep + tail
            seen[text] = seen.get(text, 0) + 1
    return "; ".join(f"{k} x{v}" for k, v in seen.items())


def label_of(spec: str) -> str:
    """The METHODS label of a full spec (the grid items removed), or the spec itself."""
    method, _, rest = spec.partition(":")
    items = [i for i in rest.split(",") if i and not i.startswith(("bits=", "group_size="))]
    base = f"{method}:" + ",".join(items)
    return next((k for k, v in METHODS.items() if v == base), spec)


def run_one(model, tok, label, spec, calib, args) -> dict:
    """Quantize a copy of ``model`` with ``spec``, score it: one benchmark record (plus where
    AWQ put its scales and their mean exponent)."""
    r, report = nb.run_one(model, tok, label, spec, calib, args.device, args.max_windows)
    if r["spec"].startswith("awq"):
        r["awq_scales"] = treatments(report)
        alphas = [g["alpha"] for b in report.blocks for g in b["awq"] if "alpha" in g]
        r["awq_mean_alpha"] = sum(alphas) / max(len(alphas), 1)
    return r


def summary(records: list[dict], labels: list[str]) -> str:
    """Perplexity grid: one row per (bits, group), one column per method."""
    cell = {(r["method"], r["bits"], r["group_size"]): r for r in records}
    base = next((r["ppl"] for r in records if r["method"] == "float"), None)
    lines = [f"Float perplexity: {base:.3f}." if base else "", "",
             "| bits | group | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for b, g in sorted({(r["bits"], r["group_size"]) for r in records if r["method"] != "float"},
                       key=lambda t: (-t[0], t[1])):
        row = []
        for m in labels:
            r = cell.get((m, b, g))
            row.append("-" if r is None else f"{r['ppl']:.3f} ({r['quant_seconds']:.0f} s)")
        lines.append(f"| {b} | {rep.group_label(g)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """Run the grid, print and write the records."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grids", nargs="*", default=GRIDS, help="bits:group_size items")
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--max-windows", type=int, default=None, help="eval windows (default all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="awq_nanogpt", help="output file stem")
    p.add_argument("--combine", nargs="*", default=None, metavar="JSON",
                   help="merge these result files into --name instead of running")
    args = p.parse_args(argv)
    if args.combine:
        combine([Path(f) for f in args.combine], Path(args.out), args.name)
        return 0
    model, tok, calib = nb.setup(args.device)
    records = [nb.float_row(model, tok, args.device, args.max_windows)]
    print(f"float ppl {records[0]['ppl']:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for grid in args.grids:
        bits, gs = (int(v) for v in grid.split(":"))
        for label in args.methods:
            base = METHODS[label]
            spec = base + ("," if base[-1] != ":" else "") + f"bits={bits},group_size={gs}"
            r = run_one(model, tok, label, spec, calib, args)
            print(f"{label:14s} w{bits} {rep.group_label(gs):6s} ppl {r['ppl']:.3f} "
                  f"({r['quant_seconds']:.1f} s) {r.get('awq_scales', '')}", flush=True)
            records.append(r)
            rep.write_json(records, out / f"{args.name}.json")  # partial results survive
    write_outputs(records, args.methods, out, args.name)
    return 0


def combine(paths: list[Path], out: Path, name: str) -> None:
    """Merge the records of several runs (same machine and protocol), labels from specs."""
    records: list[dict] = []
    for path in paths:
        for r in json.loads(path.read_text()):
            if r["method"] == "float":
                if not any(x["method"] == "float" for x in records):
                    records.append(r)
                continue
            records.append({**r, "method": label_of(r["spec"])})
    labels = [m for m in METHODS if any(r["method"] == m for r in records)]
    rep.write_json(records, out / f"{name}.json")
    write_outputs(records, labels, out, name)


def write_outputs(records: list[dict], labels: list[str], out: Path, name: str) -> None:
    """The Markdown summary and the plot of ``records``."""
    scales = next((r["awq_scales"] for r in records if r.get("awq_scales")), "")
    devices = sorted({r["device"] for r in records})
    commits = sorted({r["commit"] for r in records})
    md = ["# AWQ and AWQ+GPTQ vs RTN and GPTQ on the embedded nanoGPT", "",
          f"Device {', '.join(devices)}, {records[0]['date']}, commit {', '.join(commits)}. "
          f"Calibration: training split, {N_CALIB} random windows x {SEQ_LEN} chars, seed "
          f"{SEED}. Eval: {records[0]['eval']}. Asymmetric grids. AWQ: 20-point alpha grid, "
          "clip search (20 steps to 0.5) unless noted; GPTQ: damp 0.01, block 128, "
          "true-sequential. Methods: " + "; ".join(f"{m} = `{METHODS[m]}`" for m in labels
                                                  if m in METHODS) + ". Cells: perplexity "
          "(quantization seconds).", "",
          f"AWQ scale placement (groups over all blocks): {scales}.", "",
          summary(records, labels), rep.markdown_table(records, "All records")]
    (out / f"{name}.md").write_text("\n".join(md))
    rep.plot_ppl_vs_bits(records, out / f"{name}.png", "nanoGPT: AWQ vs GPTQ vs RTN")
    print("\n".join(md))

if __name__ == "__main__":
    raise SystemExit(main())
