"""SpQR on the embedded nanoGPT at about 3.0, 3.5 and 4.0 average bits, against GPTQ g128.

The embedded character-level GPT (Tiny Shakespeare, n_embd 384, 6 blocks) is quantized with
SpQR configurations (spec strings below) and with GPTQ W4/W3 g128 for comparison —
calibration: 128 random windows x 256 characters of the training split, seed 0 — and scored
on the whole validation split (windows of 256): perplexity per character and the mean KL
divergence from the float model. ``bits_per_weight`` counts every stored byte (packed
weights, quantized statistics and their fp16 second level, act-order permutation, CSR
outliers). Writes ``spqr_nanogpt.{json,md,png}``; the plot adds the nanoGPT points of the
other benchmarks found in the results folder.

    python benchmarks/spqr_nanogpt.py                      # the full table (CPU, ~minutes)
    python benchmarks/spqr_nanogpt.py --max-windows 8 --configs "spqr:"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvant import report as rep
from kvant.algorithms.registry import config_from_spec
from kvant.eval.kl import FloatReference
from kvant.model.nanogpt import validation_text
from kvant.nn.spqr_linear import SpQRLinear

import nanogpt_bench as nb  # benchmarks/: the protocol the nanoGPT tables share
from nanogpt_bench import MODEL, N_CALIB, SEED, SEQ_LEN

CONFIGS = [  # (label, spec)
    ("gptq", "gptq:bits=4,group_size=128"),
    ("gptq-actorder", "gptq:bits=4,group_size=128,act_order=true"),
    ("gptq", "gptq:bits=3,group_size=128"),
    ("gptq-actorder", "gptq:bits=3,group_size=128,act_order=true"),
    # SpQR at about 4.0 / 3.5 / 3.0 bits: 3-bit statistics, act-order, the outlier count set
    # by a budget (fraction of weights) so that the bits are known in advance
    ("spqr", "spqr:bits=3,group_size=16,stat_bits=3,stat_group_size=16,outlier_budget=0.007"),
    ("spqr", "spqr:bits=3,group_size=32,stat_bits=3,stat_group_size=16,outlier_budget=0.0015"),
    ("spqr", "spqr:bits=3,group_size=128,stat_bits=3,stat_group_size=64,outlier_threshold=inf,"
             "act_order=false"),
    # 2-bit dense with 3-bit statistics and 0.7% outliers (about 3.0 bits as well)
    ("spqr-w2", "spqr:bits=2,group_size=16,stat_bits=3,stat_group_size=16,outlier_budget=0.007"),
    # 4-bit dense with quantized statistics: GPTQ W4 g128's grid for fewer bits
    ("spqr-w4", "spqr:bits=4,group_size=128,stat_bits=3,stat_group_size=64,"
                "outlier_threshold=inf,act_order=false"),
    # the paper's relative threshold (outliers found during the column walk)
    ("spqr-threshold", "spqr:bits=3,group_size=16,stat_bits=3,stat_group_size=16,"
                       "outlier_threshold=0.2"),
    ("spqr-threshold", "spqr:bits=3,group_size=16,stat_bits=3,stat_group_size=16,"
                       "outlier_threshold=0.5"),
    ("spqr-threshold", "spqr:bits=3,group_size=64,stat_bits=3,stat_group_size=32,"
                       "outlier_threshold=2,act_order=false"),
    # the same fp16 outlier path on plain bases: GPTQ W3 g128 (fp16 scales) and RTN w3 g16
    ("gptq+outliers", "spqr:bits=3,group_size=128,stat_bits=16,outlier_budget=0.01,"
                      "act_order=false"),
    ("rtn+outliers", "spqr:bits=3,group_size=16,base=rtn,outlier_budget=0.01,act_order=false"),
    # ... and on AWQ+GPTQ (AWQ's scales and clip, GPTQ rounding, 1% fp16 outliers)
    ("awq+gptq+outliers", "awq:bits=3,group_size=128,rounding=gptq,outlier_budget=0.01"),
    ("awq+gptq+outliers-noclip", "awq:bits=3,group_size=128,rounding=gptq,outlier_budget=0.01,"
                                 "clip_search=false"),
    ("awq+outliers", "awq:bits=3,group_size=128,outlier_budget=0.01"),
]


def _parts(model) -> dict:
    """Average bits per weight of each stored part over the SpQR layers, and outliers."""
    parts, weights, nnz = {}, 0, 0
    for m in model.modules():
        if isinstance(m, SpQRLinear):
            n = m.in_features * m.out_features
            for k, v in m.bits_breakdown().items():
                parts[k] = parts.get(k, 0.0) + v * n
            weights += n
            nnz += m.nnz
    if not weights:
        return {}
    return {"bits_parts": {k: v / weights for k, v in parts.items()},
            "outlier_fraction": nnz / weights}


def run_one(model, ref, label, spec, calib, args) -> dict:
    """Quantize a copy of ``model`` with ``spec``, score it against the float reference
    (perplexity and KL): one benchmark record with the SpQR bits split into parts."""
    q, cfg, _, seconds = nb.quantize_copy(model, spec, calib, args.device)
    ev = ref.compare(q, show_progress=False)
    return nb.record(q, label, spec, cfg, seconds, args.device, ev, **_parts(q))


def table(records: list[dict]) -> str:
    """Markdown: one row per configuration, bits split into their parts."""
    base = next(r["ppl"] for r in records if r["method"] == "float")
    lines = ["| method | spec | bits/weight | dense + stats + perm + outliers | outliers % | "
             "ppl | Δ ppl % | KL | quant s | device |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["method"] == "float":
            lines.append(f"| float | - | 32 | - | - | {r['ppl']:.4f} | | 0 | | {r['device']} |")
            continue
        p = r.get("bits_parts")
        parts = " + ".join(f"{p[k]:.3f}" for k in ("dense", "stats", "perm", "outliers")) \
            if p else "-"
        frac = f"{100 * r['outlier_fraction']:.2f}" if "outlier_fraction" in r else "-"
        lines.append(f"| {r['method']} | `{r['spec']}` | {r['bits_per_weight']:.3f} | {parts} | "
                     f"{frac} | {r['ppl']:.4f} | {100 * (r['ppl'] / base - 1):+.2f} | "
                     f"{r['kl']:.4f} | {r['quant_seconds']:.1f} | {r['device']} |")
    return "\n".join(lines) + "\n"


def others(out: Path) -> list[dict]:
    """nanoGPT records of the other benchmarks in ``out`` (for the plot)."""
    recs = []
    for f in sorted(out.glob("*.json")):
        if f.name == "spqr_nanogpt.json":
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, list):
            recs += [r for r in data if isinstance(r, dict) and r.get("model") == MODEL
                     and r.get("method") not in (None, "float") and r.get("bits_per_weight")
                     and r.get("ppl")]
    return recs


def plot(records: list[dict], other: list[dict], path: Path) -> None:
    """PNG: perplexity against stored bits; this run's methods as lines, the other
    benchmarks' nanoGPT points as hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lines: dict[str, list] = {}
    for r in records:
        if r["method"] == "float":
            ax.axhline(r["ppl"], color="k", ls="--", lw=1, label=f"float ({r['ppl']:.3f})")
        else:
            lines.setdefault(r["method"], []).append((r["bits_per_weight"], r["ppl"]))
    for key, pts in lines.items():
        pts.sort()
        ax.plot(*zip(*pts), marker="o", lw=2 if key == "spqr" else 1, label=f"{key} (this run)")
    groups: dict[str, list] = {}
    shown = {"rtn", "gptq", "gptq-actorder", "awq", "awq+gptq", "quip-clip"}
    for r in other:
        if r["method"] not in shown:
            continue
        key = f"{r['method']} {rep.group_label(r.get('group_size'))}"
        groups.setdefault(key, []).append((r["bits_per_weight"], r["ppl"]))
    for key, pts in sorted(groups.items()):
        pts.sort()
        ax.plot(*zip(*pts), marker="s", mfc="none", ls=":", lw=0.8, label=key)
    ax.set_xlim(2.9, 4.5)
    base = next(r["ppl"] for r in records if r["method"] == "float")
    ax.set_ylim(base * 0.997, base * 1.035)
    ax.set_xlabel("stored bits per weight (statistics, permutation, outliers counted)")
    ax.set_ylabel("perplexity per character")
    ax.set_title("nanoGPT Shakespeare: SpQR vs GPTQ and the other methods")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="*", default=None,
                   help="spec strings (default: the table's list)")
    p.add_argument("--max-windows", type=int, default=None, help="eval windows (default all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="run nothing: rewrite the table and plot of a results file into --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        write_outputs(json.loads(Path(args.replot).read_text()), out)
        return 0
    model, tok, calib = nb.setup(args.device)
    ids = torch.tensor(tok.encode(validation_text()), dtype=torch.long)
    n_w = ids.numel() // SEQ_LEN
    if args.max_windows:
        n_w = min(n_w, args.max_windows)
    ref = FloatReference(model, ids[: n_w * SEQ_LEN].view(n_w, SEQ_LEN), batch_size=16,
                         store="full", show_progress=False)
    labels = {spec: label for label, spec in CONFIGS}
    configs = CONFIGS if args.configs is None else [
        (labels.get(s, config_from_spec(s).method), s) for s in args.configs]
    records = [nb.float_record(model, args.device,
                               {"ppl": ref.ppl, "tokens": ref.tokens, "windows": n_w})]
    print(f"float ppl {ref.ppl:.4f}", flush=True)
    for label, spec in configs:
        r = run_one(model, ref, label, spec, calib, args)
        print(f"{label:14s} {r['bits_per_weight']:.3f} b/w  ppl {r['ppl']:.4f}  "
              f"kl {r['kl']:.4f}  ({r['quant_seconds']:.0f} s)  {spec}", flush=True)
        records.append(r)
        rep.write_json(records, out / "spqr_nanogpt.json")  # partial results survive
    write_outputs(records, out)
    return 0


def write_outputs(records: list[dict], out: Path) -> None:
    """spqr_nanogpt.{json,md,png}; the plot adds the other nanoGPT tables found in ``out``."""
    rep.write_json(records, out / "spqr_nanogpt.json")
    md = ["# SpQR on the embedded nanoGPT", "",
          f"Devices {', '.join(sorted({r['device'] for r in records}))}, {records[0]['date']}, "
          f"commits {', '.join(sorted({r['commit'] for r in records}))}. "
          f"Calibration: training split, {N_CALIB} random windows x {SEQ_LEN} chars, seed "
          f"{SEED}. Eval: {records[0]['eval']}. Bits per weight count every stored byte of "
          "the quantized Linears (packed weights, statistics, permutation, CSR outliers).", "",
          table(records)]
    (out / "spqr_nanogpt.md").write_text("\n".join(md))
    plot(records, others(out), out / "spqr_nanogpt.png")
    print("\n".join(md))


if __name__ == "__main__":
    raise SystemExit(main())
