"""QuIP (incoherence + LDLQ) and rotation + RTN against GPTQ and RTN on the embedded nanoGPT.

The embedded character-level GPT (Tiny Shakespeare, n_embd 384, 6 blocks) is quantized with
every config below — calibration: 128 windows x 256 characters of the training split, seed 0 —
and scored by per-character perplexity on the whole validation split (windows of 256).
Grids of issue 6: W4 g128, W3 g128, W2 per channel, W2 g64. Writes
``quip_nanogpt.{json,md,png}`` into ``--out`` (default benchmarks/results).

    python benchmarks/quip_nanogpt.py                 # the full table (CPU: hours)
    python benchmarks/quip_nanogpt.py --grid bits=2,group_size=64 --methods quip-clip gptq-clip

Rows are merged into the existing JSON by (method, bits, group), so runs of different grids
can go side by side or one after another.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvant import report as rep

import nanogpt_bench as nb  # benchmarks/: the protocol the nanoGPT tables share
from nanogpt_bench import N_CALIB, SEED, SEQ_LEN

GRID = ["bits=2,group_size=-1", "bits=2,group_size=64", "bits=3,group_size=128",
        "bits=4,group_size=128"]
# (label, spec without the grid)
METHODS = [
    ("rtn-clip", "rtn:clip=true"),
    ("rot+rtn-clip", "quip:rounding=rtn,clip=true"),
    ("gptq", "gptq:"),
    ("gptq-clip", "gptq:clip=true"),
    ("quip", "quip:"),
    ("quip-clip", "quip:clip=true"),
    ("quip-clip-rescale", "quip:clip=true,rescale=true"),
]
# what a plain run measures (quip without clip is left to --methods)
DEFAULT_METHODS = ["quip-clip", "gptq-clip", "quip-clip-rescale", "rot+rtn-clip", "rtn-clip",
                   "gptq"]




def summary(records: list[dict]) -> str:
    """Perplexity grid: one row per (bits, group), one column per method, QuIP vs GPTQ."""
    cell = {(r["method"], r["bits"], r["group_size"]): r["ppl"] for r in records}
    base = next((r["ppl"] for r in records if r["method"] == "float"), None)
    present = {r["method"] for r in records}
    labels = [m for m, _ in METHODS if m in present]
    lines = [f"Float perplexity: {base:.3f}." if base else "", "",
             "| bits | group | " + " | ".join(labels) + " | best QuIP vs best GPTQ |",
             "|---|---|" + "---|" * (len(labels) + 1)]
    for b, g in sorted({(r["bits"], r["group_size"]) for r in records if r["method"] != "float"},
                       key=lambda t: (-t[0], -t[1] if t[1] > 0 else 1e9)):
        vals = [cell.get((m, b, g)) for m in labels]
        row = ["-" if v is None else f"{v:.3f}" for v in vals]
        quip = [v for m, v in zip(labels, vals) if m.startswith("quip") and v is not None]
        gptq = [v for m, v in zip(labels, vals) if m.startswith("gptq") and v is not None]
        gain = f"{100 * (min(quip) / min(gptq) - 1):+.1f}%" if quip and gptq else "-"
        lines.append(f"| {b} | {rep.group_label(g)} | " + " | ".join(row) + f" | {gain} |")
    return "\n".join(lines) + "\n"


def merge_and_write(new: list[dict], out: Path) -> list[dict]:
    """Merge ``new`` into ``out/quip_nanogpt.json`` (same method, bits, group replaced), under
    a file lock so that runs of different grids can go side by side; rewrite the tables."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / "quip_nanogpt.json"
    with open(out / ".quip_nanogpt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.is_file() else []
        key = lambda r: (r["method"], r["bits"], r["group_size"])  # noqa: E731
        fresh = {key(r) for r in new}
        records = [r for r in old if key(r) not in fresh] + new
        order = {m: i for i, (m, _) in enumerate([("float", "")] + METHODS)}
        records.sort(key=lambda r: (order.get(r["method"], 99), -(r["bits"] or 99),
                                    r["group_size"] or 0))
        rep.write_json(records, path)
        first = records[0]
        md = ["# QuIP (randomized Hadamard incoherence) vs GPTQ on the embedded nanoGPT", "",
              f"Device {first['device']}, {first['date']}, commit {first['commit']}. "
              f"Calibration: training split, {N_CALIB} random windows x {SEQ_LEN} chars, seed "
              f"{SEED}. Eval: {first.get('eval', '')}. Asymmetric grids; GPTQ and LDLQ: damp "
              "0.01, block 128, true-sequential. rot+rtn = QuIP's rotation with round-to-nearest;"
              " -clip = MSE range search of each grid; -rescale = QuIP's diag(H) rescaling.", "",
              summary(records), rep.markdown_table(records, "All records")]
        (out / "quip_nanogpt.md").write_text("\n".join(md))
        rep.plot_ppl_vs_bits(records, out / "quip_nanogpt.png", "nanoGPT: QuIP vs GPTQ")
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", nargs="*", default=GRID)
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS,
                   help=f"labels from {[m[0] for m in METHODS]}")
    p.add_argument("--max-windows", type=int, default=None, help="eval windows (default all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: immune to a busy machine's thread contention)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = dict(METHODS)
    unknown = set(args.methods) - set(specs)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known {sorted(specs)}")

    model, tok, calib = nb.setup(args.device)
    records = [nb.float_row(model, tok, args.device, args.max_windows)]
    print(f"float ppl {records[0]['ppl']:.4f}", flush=True)
    out = Path(args.out)
    merge_and_write(records, out)
    for grid in args.grid:
        for label in args.methods:
            name, _, opts = specs[label].partition(":")
            spec = f"{name}:{','.join(filter(None, [grid, opts]))}"
            r, _ = nb.run_one(model, tok, label, spec, calib, args.device, args.max_windows)
            print(f"{label:20s} {grid:24s} bpw {r['bits_per_weight']:.3f} "
                  f"ppl {r['ppl']:.4f} ({r['quant_seconds']:.1f}s)", flush=True)
            merge_and_write([r], out)  # after every row: an interrupted run keeps its rows
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
