"""RTN against GPTQ (plain, act-order, act-order + static groups) on the embedded nanoGPT.

The embedded character-level GPT (Tiny Shakespeare, n_embd 384, 6 blocks) is quantized at 4, 3
and 2 bits, per channel and g128 (asymmetric grids) — calibration: 128 random windows x 256
characters of the training split, seed 0 — and scored by per-character perplexity on the
whole validation split (windows of 256). Per channel, static groups change nothing, so
act-order + static is run with groups only. Writes ``gptq_nanogpt.{json,md,png}``.

    python benchmarks/gptq_nanogpt.py                    # the full table (CPU, ~minutes)
    python benchmarks/gptq_nanogpt.py --bits 3 --max-windows 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kvant import report as rep

import nanogpt_bench as nb  # benchmarks/: the protocol the nanoGPT tables share
from nanogpt_bench import N_CALIB, SEED, SEQ_LEN

METHODS = [  # (label, spec without the grid)
    ("rtn", "rtn:"),
    ("gptq", "gptq:"),
    ("gptq-actorder", "gptq:act_order=true"),
    ("gptq-actorder-static", "gptq:act_order=true,static_groups=true"),
]




def summary(records: list[dict]) -> str:
    """Perplexity grid: one row per (bits, group), one column per method."""
    cell = {(r["method"], r["bits"], r["group_size"]): r["ppl"] for r in records}
    base = next((r["ppl"] for r in records if r["method"] == "float"), None)
    labels = [m for m, _ in METHODS]
    lines = [f"Float perplexity: {base:.3f}." if base else "", "",
             "| bits | group | " + " | ".join(labels) + " | GPTQ best vs RTN |",
             "|---|---|" + "---|" * (len(labels) + 1)]
    for b, g in sorted({(r["bits"], r["group_size"]) for r in records if r["method"] != "float"},
                       key=lambda t: (-t[0], t[1])):
        vals = [cell.get((m, b, g)) for m in labels]
        row = ["-" if v is None else f"{v:.3f}" for v in vals]
        gptq = [v for m, v in zip(labels, vals) if m != "rtn" and v is not None]
        rtn = cell.get(("rtn", b, g))
        gain = f"{100 * (min(gptq) / rtn - 1):+.1f}%" if gptq and rtn else "-"
        lines.append(f"| {b} | {rep.group_label(g)} | " + " | ".join(row) + f" | {gain} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, nargs="*", default=[4, 3, 2])
    p.add_argument("--groups", type=int, nargs="*", default=[-1, 128])
    p.add_argument("--methods", nargs="*", default=[m for m, _ in METHODS])
    p.add_argument("--max-windows", type=int, default=None, help="eval windows (default all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: immune to a busy machine's thread contention)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok, calib = nb.setup(args.device)
    specs = dict(METHODS)
    records = [nb.float_row(model, tok, args.device, args.max_windows)]
    print(f"float ppl {records[0]['ppl']:.3f}", flush=True)
    for bits in args.bits:
        for gs in args.groups:
            for label in args.methods:
                if label == "gptq-actorder-static" and gs == -1:
                    continue  # per channel there are no groups to fix: same as act-order
                spec = specs[label] + ("," if specs[label][-1] != ":" else "") + \
                    f"bits={bits},group_size={gs}"
                r, _ = nb.run_one(model, tok, label, spec, calib, args.device,
                                  args.max_windows)
                print(f"{label:22s} w{bits} {rep.group_label(gs):8s} ppl {r['ppl']:.3f} "
                      f"({r['quant_seconds']:.1f} s)", flush=True)
                records.append(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep.write_json(records, out / "gptq_nanogpt.json")
    md = ["# GPTQ vs RTN on the embedded nanoGPT", "",
          f"Device {records[0]['device']}, {records[0]['date']}, commit {records[0]['commit']}. "
          f"Calibration: training split, {N_CALIB} random windows x {SEQ_LEN} chars, seed "
          f"{SEED}. Eval: {records[0]['eval']}. Asymmetric grids; GPTQ damp 0.01, block 128, "
          "true-sequential.", "", summary(records), rep.markdown_table(records, "All records")]
    (out / "gptq_nanogpt.md").write_text("\n".join(md))
    rep.plot_ppl_vs_bits(records, out / "gptq_nanogpt.png", "nanoGPT: RTN vs GPTQ")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
