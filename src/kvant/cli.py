"""The ``kvant`` command line: demo, quantize, eval, inspect, export, bench, generate. It
only calls the public API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from kvant.config_gguf import GGUF_MIXES
from kvant.cli_quantize import _output_guard, check_positive_flags, cmd_quantize
from kvant.eval.table import group_label


def _fmt_row(r: dict, base: float | None) -> str:
    delta = "" if base is None or r["method"] == "float" else f"{100 * (r['ppl'] / base - 1):+8.1f}%"
    bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "16"
    return (f"{r['method']:<18} {str(r.get('bits') or 16):>4} {group_label(r.get('group_size')):>8} "
            f"{bpw:>8} {r['size_mb']:>8.2f} {r['ppl']:>9.3f} {delta:>9} "
            f"{r.get('quant_seconds', 0):>8.1f}")


def cmd_demo(args) -> int:
    from kvant.demo import run_demo

    header = (f"{'method':<18} {'bits':>4} {'group':>8} {'bits/w':>8} {'size MB':>8} "
              f"{'ppl':>9} {'change':>9} {'seconds':>8}")
    state = {"base": None}
    if not args.json:
        print(header)
        print("-" * len(header))

    def progress(r):
        if r["method"] == "float":
            state["base"] = r["ppl"]
        if not args.json:
            print(_fmt_row(r, state["base"]), flush=True)

    check_positive_flags(args, "windows")
    specs = args.spec or None
    records = run_demo(args.out, specs, args.windows, progress)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(f"\n{records[0]['eval']}")
        from kvant.demo import plot_written

        print(f"wrote {Path(args.out) / 'report.md'}, report.json; {plot_written(args.out)}")
    return 0


def cmd_eval(args) -> int:
    import kvant
    from kvant.config import check_device

    check_device(args.device)
    check_positive_flags(args, "seq_len", "max_windows")
    model, tok = kvant.load_model(args.model, device=args.device or "cpu",
                                  verify=not args.no_verify)
    res = kvant.evaluate(model, tok, args.ppl, seq_len=args.seq_len,
                         max_windows=args.max_windows, eval_file=args.eval_file,
                         show_progress=not args.json)
    print(json.dumps(res, indent=1) if args.json else
          "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in res.items()))
    return 0


def cmd_inspect(args) -> int:
    from kvant.formats.checkpoint import read_config, recover_leftovers, verify_checkpoint

    for done in recover_leftovers(args.path):  # a save killed mid-way
        print(f"kvant: recovered {args.path}: {done}", file=sys.stderr)
    checked = verify_checkpoint(args.path, verify=not args.no_verify)
    meta = read_config(args.path, verify=False)  # verified just above
    qc = meta["quantization_config"]
    if args.json:
        print(json.dumps(meta, indent=1))
        return 0
    from kvant.formats.summary import checkpoint_summary, format_summary

    print(f"{args.path}: model_type {meta['model_type']}, format {qc['format']} "
          f"v{qc['format_version']}")
    for line in format_summary(checkpoint_summary(args.path, meta)):
        print("  " + line)
    if args.layers:
        losses = meta.get("layer_losses") or {}
        for name, m in qc["modules"].items():
            loss = losses.get(name)
            print(f"  {name}: {m['kind']} {m['out_features']}x{m['in_features']} "
                  f"bits={m['bits']} group={group_label(m['group_size'])}"
                  + (f" loss={loss:.4g}" if loss is not None else ""))
    else:
        print(f"  ({len(qc['modules'])} quantized layers; --layers lists them)")
    how = ("match their sha256 checksums" if checked["checksums"] else
           "were not compared with checksums (" + ("--no-verify" if args.no_verify else
                                                   "written before kvant stored them") + ")")
    print(f"integrity: {checked['tensors']} tensors {how}; the values of "
          f"{checked['layers']} quantized layers are in range")
    return 0


def cmd_export(args) -> int:
    from kvant.api import export_quantized, load_quantized
    from kvant.errors import InputError

    if args.format == "gguf":
        return _export_gguf(args)
    for flag in ("type", "gguf_source", "embed_type"):
        if getattr(args, flag) is not None:
            raise InputError(f"--{flag.replace('_', '-')} applies only to --format gguf")
    with _output_guard(args, args.checkpoint):
        model, tok = load_quantized(args.checkpoint)
        out = export_quantized(model, args.out, args.format, tok, overwrite=args.overwrite,
                               source=args.checkpoint)
    print(f"wrote {args.format.upper()} checkpoint {out}")
    return 0


def _export_gguf(args) -> int:
    """``kvant export CKPT --format gguf``: one .gguf file (kvant.formats.gguf_export)."""
    from kvant.api import load_quantized
    from kvant.errors import InputError
    from kvant.formats.gguf_export import export_gguf

    if args.type is None:
        raise InputError("--format gguf needs --type (Q4_0, Q4_1, Q8_0, Q4_K, Q3_K, Q2_K, "
                         "Q6_K): the GGUF type the checkpoint was quantized on "
                         "(--grid gguf:TYPE)")
    if args.gguf_source is not None and not Path(args.gguf_source).is_file():
        raise InputError(f"--gguf-source {args.gguf_source!r} is not a file")
    model, tok = load_quantized(args.checkpoint)
    out = export_gguf(model, args.out, args.type, tok, source_gguf=args.gguf_source,
                      float_type=args.float_type, embed_type=args.embed_type,
                      overwrite=args.overwrite)
    print(f"wrote GGUF {args.type.upper()} file {out}")
    return 0


def _method_defaults(field: str) -> str:
    """'4 (awq, gptq, ...), 3 (spqr)': each registered method's default of ``field``, read
    from its config class, so the help cannot drift from the code."""
    from kvant.algorithms.registry import available, config_class

    by_value: dict = {}
    for m in available():
        by_value.setdefault(getattr(config_class(m)(), field), []).append(m)
    return ", ".join(f"{v} ({', '.join(ms)})" for v, ms in by_value.items())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kvant``."""
    p = argparse.ArgumentParser(prog="kvant", description="weight-only quantization of LMs")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log INFO messages and print the traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="the embedded nanoGPT model: float vs RTN/GPTQ table")
    d.add_argument("--out", default="kvant-demo", help="report directory (default ./kvant-demo)")
    d.add_argument("--windows", type=int, default=32,
                   help="validation windows of 256 chars to evaluate (default 32)")
    d.add_argument("--spec", action="append",
                   help="a config spec such as 'gptq:bits=3,group_size=128' (repeatable)")
    d.add_argument("--json", action="store_true", help="print the records as JSON")
    d.set_defaults(fn=cmd_demo)

    q = sub.add_parser("quantize", help="quantize a model and save a kvant checkpoint")
    q.add_argument("model", help="'nanogpt' (embedded), a nanoGPT/HF dir, a .gguf file or hub id")
    from kvant.algorithms.registry import available

    q.add_argument("--method", default="rtn", choices=available(),
                   help="quantization method (default rtn); its own defaults apply to every "
                        "flag left unset")
    q.add_argument("--bits", type=int, default=None,
                   help=f"2, 3, 4 or 8 (default: the method's own: {_method_defaults('bits')})")
    q.add_argument("--group-size", type=int, default=None,
                   help="-1 per channel, 0 per tensor, or a group of input columns "
                        f"(default: the method's own: {_method_defaults('group_size')})")
    q.add_argument("--sym", action="store_const", const=True, default=None,
                   help="symmetric grid")
    q.add_argument("--clip", action="store_const", const=True, default=None,
                   help="search the clipping range (mse)")
    q.add_argument("--act-order", action="store_const", const=True, default=None)
    q.add_argument("--static-groups", action="store_const", const=True, default=None)
    q.add_argument("--no-true-sequential", dest="true_sequential", action="store_const",
                   const=False, default=None)
    q.add_argument("--damp-percent", type=float, default=None)
    q.add_argument("--sink-weight", type=float, default=None,
                   help="how many times the first token of each calibration window counts in "
                        "the layer Hessians (GPTQ, QuIP, SpQR, AWQ's GPTQ rounding; default 1): "
                        "a decoder's attention sink, which GPTQ otherwise rounds carelessly")
    q.add_argument("--sink-max-share", type=float, default=None,
                   help="with --sink-weight: the most of a layer's Hessian trace the weighted "
                        "first tokens may take (default 0.2); layers whose input the sink "
                        "already dominates keep it at weight 1")
    q.add_argument("--grid", default=None,
                   help="'int' (default: kvant's integer grid of --bits/--group-size) or "
                        "'gguf:TYPE' (Q4_0, Q4_1, Q8_0, Q4_K, Q3_K, Q2_K, Q6_K): round on "
                        "llama.cpp's exact block grid, for `kvant export --format gguf`; the "
                        "type fixes bits and blocks (rtn, gptq, awq)")
    q.add_argument("--gguf-mix", default=None, choices=GGUF_MIXES,
                   help="with --grid gguf:TYPE: follow llama.cpp's per-tensor types with an "
                        "importance matrix (imatrix: a few early ffn_down one type wider at "
                        "Q4_0/Q5_0) or without (plain: the smallest file); auto (default): "
                        "imatrix for methods that calibrate on data")
    q.add_argument("--option", action="append",
                   help="other method field, key=value (repeat --option ignore=NAME to keep "
                        "several layers in float)")
    q.add_argument("--calib", default=None,
                   help="calibration: 'c4', 'wikitext2', a .txt/.jsonl file (default: the "
                        "embedded text for nanoGPT, c4 for others)")
    q.add_argument("--calib-file", default=None, help="local copy for --calib c4/wikitext2")
    q.add_argument("--calib-chat", default=None, metavar="FILE.jsonl",
                   help="calibrate on chat data instead of --calib: one {\"messages\": "
                        "[{\"role\": ..., \"content\": ...}]} conversation per line, "
                        "rendered with the tokenizer's chat template and packed into "
                        "--seq-len windows")
    q.add_argument("--quantize-head", action="store_const", const=True, default=None,
                   help="also quantize the output head (lm_head) with the same grid; off by "
                        "default. Calibrated methods other than AWQ calibrate it on the "
                        "final norm's output")
    q.add_argument("--n-samples", type=int, default=128, help="calibration windows "
                   "(default 128)")
    q.add_argument("--seq-len", type=int, default=None, help="default: 2048, or the "
                   "model's context if shorter")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default=None, help="compute device (default cuda if present)")
    q.add_argument("--distributed", action="store_true",
                   help="run as one rank of a torchrun group (torchrun --nproc-per-node N "
                        "kvant quantize ... --distributed): the ranks share the calibration "
                        "samples and the layers; rank 0 writes --out")
    q.add_argument("--no-stream", dest="stream", action="store_false",
                   help="load a Hugging Face safetensors directory whole instead of streaming "
                        "it (by default its blocks are read, quantized and written one at a "
                        "time, and an interrupted run resumes when rerun)")
    q.add_argument("--lazy", action="store_true",
                   help="kept for old scripts: streaming is now the default")
    q.add_argument("--out", required=True, help="output checkpoint directory")
    q.add_argument("--overwrite", action="store_true",
                   help="replace --out when it already holds a kvant output (never a directory "
                        "kvant did not write, nor the input model)")
    q.add_argument("--target-bpw", type=float, default=None,
                   help="mixed precision: give each layer its own width so that the stored "
                        "bits per weight (scales and zeros counted) stay at or under this, "
                        "with the least predicted loss; the plan is printed and saved")
    q.add_argument("--widths", default=None,
                   help="with --target-bpw: candidate widths, e.g. 2,3,4 (default: every "
                        "width each method stores: 2,3,4,8; quipsharp 2,3,4)")
    q.add_argument("--mixed-methods", default=None,
                   help="with --target-bpw: other methods a layer may take besides --method, "
                        "e.g. gptq,rtn (each at its default settings)")
    q.add_argument("--mixed-group-sizes", default=None,
                   help="with --target-bpw: candidate group sizes, e.g. 64,128 (default: "
                        "the method's group size)")
    q.add_argument("--sensitivity", default=None, choices=["fisher", "kl"],
                   help="with --target-bpw: 'fisher' (default: Fisher-weighted layer output "
                        "error, one backward pass) or 'kl' (KL per layer and width; slow)")
    q.add_argument("--finetune", default=None, choices=["block", "e2e", "both"],
                   help="fine-tune scales, norms and biases after rounding (codes never "
                        "change): 'block' matches each block to its float outputs while "
                        "quantizing, 'e2e' then matches the whole model's next-token "
                        "distributions (KL) on the calibration tokens, 'both' does both "
                        "(kvant.TuneConfig defaults)")
    q.add_argument("--finetune-steps", type=int, default=None,
                   help="with --finetune block|both: Adam steps per block (default 32)")
    q.add_argument("--finetune-tokens", type=int, default=None,
                   help="with --finetune e2e|both: token budget (default 262144)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model or checkpoint")
    e.add_argument("model")
    e.add_argument("--ppl", default=None, help="'wikitext2' or a text file (default: "
                   "wikitext2 for HF models, the embedded validation text for nanoGPT)")
    e.add_argument("--eval-file", default=None, help="local copy of the eval set")
    e.add_argument("--seq-len", type=int, default=None)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true")
    e.add_argument("--no-verify", action="store_true",
                   help="skip comparing the checkpoint with its checksums (trusted files; "
                        "value checks still run)")
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("inspect", help="describe a kvant checkpoint: totals (size, bits per "
                                       "weight, method, bits histogram, layer losses), then "
                                       "with --layers every quantized layer")
    i.add_argument("path")
    i.add_argument("--layers", action="store_true",
                   help="list every quantized layer (shape, bits, group, loss) after the totals")
    i.add_argument("--json", action="store_true")
    i.add_argument("--no-verify", action="store_true",
                   help="skip comparing the checkpoint with its checksums (trusted files; "
                        "value checks still run)")
    i.set_defaults(fn=cmd_inspect)

    x = sub.add_parser("export", help="write a kvant checkpoint of a Hugging Face model in "
                                      "the GPTQ, AWQ or compressed-tensors layout (vLLM, "
                                      "transformers)")
    x.add_argument("checkpoint", help="a kvant checkpoint directory")
    x.add_argument("--format", required=True,
                   choices=["gptq", "awq", "compressed-tensors", "gguf"])
    x.add_argument("--out", required=True, help="output directory (gguf: a .gguf file)")
    x.add_argument("--type", default=None, type=str.upper,
                   help="gguf: the GGUF type of the file (Q4_0, Q4_1, Q8_0, Q4_K, Q3_K, Q2_K, "
                        "Q6_K); the checkpoint must be quantized with --grid gguf:TYPE")
    x.add_argument("--gguf-source", default=None,
                   help="gguf: the .gguf file the model was quantized from: its metadata and "
                        "tokenizer are copied (default: mapped from the Llama config)")
    x.add_argument("--float-type", default="F32", choices=["F32", "F16"],
                   help="gguf: type of the tensors left in float (default F32, exact)")
    x.add_argument("--embed-type", default=None, type=str.upper,
                   help="gguf: round the token embedding (and an untied head) to this GGUF "
                        "type at export, as llama.cpp's files do (default: --float-type)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace --out when it already holds a kvant output (never a directory "
                        "kvant did not write, nor the input model)")
    x.set_defaults(fn=cmd_export)

    from kvant.bench_cli import add_parser as add_bench
    from kvant.serve.cli import add_parser as add_generate

    add_bench(sub)
    add_generate(sub)
    for sp in sub.choices.values():  # -v also after the command; SUPPRESS keeps `kvant -v x`
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log INFO messages and print the traceback of an error")
    return p


# errors that describe the user's input or environment: one line, exit 2. KvantError is a
# ValueError; plain ValueErrors are kvant's older way of saying the same thing.
_CLEAR_ERRORS = (ValueError, OSError, NotImplementedError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 1000 else text[:1000] + " ..."


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvant`` console script.

    Exit codes: 0 done; 2 bad input (one line ``kvant: error: ...``; argparse's usage errors
    too); 1 an unexpected error inside kvant (one line; ``-v`` prints the traceback);
    130 interrupted.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("kvant: interrupted", file=sys.stderr)
        return 130
    except _CLEAR_ERRORS as e:
        if args.verbose:
            traceback.print_exc()
        print(f"kvant: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: say so in one line, the traceback on request
        if args.verbose:
            traceback.print_exc()
        print(f"kvant: internal error: {type(e).__name__}: {_one_line(e)} (run with -v for "
              "the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
