"""The ``kvant`` command line: demo, quantize, eval, inspect. It only calls the public API."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from kvant.report import group_label


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

    specs = args.spec or None
    records = run_demo(args.out, specs, args.windows, progress)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(f"\n{records[0]['eval']}")
        print(f"wrote {Path(args.out) / 'report.md'}, report.json, report.png")
    return 0


def _config_from_args(args):
    from kvant.algorithms.registry import config_class

    cls = config_class(args.method)
    fields = {"bits": args.bits, "group_size": args.group_size, "sym": args.sym,
              "clip": args.clip}
    known = cls.__dataclass_fields__
    for name in ("act_order", "static_groups", "damp_percent", "true_sequential"):
        val = getattr(args, name)
        if val is not None:
            if name not in known:
                raise SystemExit(f"kvant: --{name.replace('_', '-')} does not apply to "
                                 f"method {args.method!r}")
            fields[name] = val
    for item in args.option or []:
        key, _, value = item.partition("=")
        from kvant.algorithms.registry import _parse_value
        fields[key] = _parse_value(value)
    return cls.from_dict(fields)


def cmd_quantize(args) -> int:
    import kvant
    from kvant.config import EngineOptions

    config = _config_from_args(args)
    model, tok = kvant.load_model(args.model, device="cpu", lazy=args.lazy)
    calib = None
    from kvant.algorithms.registry import build
    if build(config).needs_calibration:
        calib = kvant.calibration_for(model, tok, args.calib, n_samples=args.n_samples,
                                      seq_len=args.seq_len, seed=args.seed,
                                      calib_file=args.calib_file)
    t0 = time.perf_counter()
    report = kvant.quantize(model, config, calib,
                            EngineOptions(device=args.device, show_progress=not args.json))
    out = kvant.save_quantized(model, args.out, tok)
    result = {"out": str(out), "config": config.to_dict(), "seconds": time.perf_counter() - t0,
              "layers": len(report.layers), "n_calib": report.n_calib}
    print(json.dumps(result, indent=1) if args.json else
          f"quantized {len(report.layers)} layers with {config.method} in "
          f"{result['seconds']:.1f}s -> {out}")
    return 0


def cmd_eval(args) -> int:
    import kvant

    model, tok = kvant.load_model(args.model, device=args.device or "cpu")
    res = kvant.evaluate(model, tok, args.ppl, seq_len=args.seq_len,
                         max_windows=args.max_windows, eval_file=args.eval_file)
    print(json.dumps(res, indent=1) if args.json else
          "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in res.items()))
    return 0


def cmd_inspect(args) -> int:
    from kvant.formats.checkpoint import read_config

    meta = read_config(args.path)
    qc = meta["quantization_config"]
    if args.json:
        print(json.dumps(meta, indent=1))
        return 0
    print(f"model_type: {meta['model_type']}  method: {qc.get('method')}  "
          f"format: {qc['format']} v{qc['format_version']}")
    for name, m in qc["modules"].items():
        print(f"  {name}: {m['kind']} {m['out_features']}x{m['in_features']} "
              f"bits={m['bits']} group={group_label(m['group_size'])}")
    return 0


def cmd_export(args) -> int:
    from kvant.api import export_quantized, load_quantized

    model, tok = load_quantized(args.checkpoint)
    out = export_quantized(model, args.out, args.format, tok)
    print(f"wrote {args.format.upper()} checkpoint {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``kvant``."""
    p = argparse.ArgumentParser(prog="kvant", description="weight-only quantization of LMs")
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
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
    q.add_argument("--method", default="rtn")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--sym", action="store_true", help="symmetric grid")
    q.add_argument("--clip", action="store_true", help="search the clipping range (mse)")
    q.add_argument("--act-order", action="store_const", const=True, default=None)
    q.add_argument("--static-groups", action="store_const", const=True, default=None)
    q.add_argument("--no-true-sequential", dest="true_sequential", action="store_const",
                   const=False, default=None)
    q.add_argument("--damp-percent", type=float, default=None)
    q.add_argument("--option", action="append", help="other method field, key=value")
    q.add_argument("--calib", default=None,
                   help="calibration: 'c4', 'wikitext2', a .txt/.jsonl file (default: the "
                        "embedded text for nanoGPT, c4 for others)")
    q.add_argument("--calib-file", default=None, help="local copy for --calib c4/wikitext2")
    q.add_argument("--n-samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=None, help="default: 2048, or the "
                   "model's context if shorter")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default=None, help="compute device (default cuda if present)")
    q.add_argument("--lazy", action="store_true",
                   help="read the decoder blocks from disk one at a time (HF safetensors "
                        "directory): less host memory than loading it whole")
    q.add_argument("--out", required=True, help="output checkpoint directory")
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
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("inspect", help="describe a kvant checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    x = sub.add_parser("export", help="write a kvant checkpoint of a Hugging Face model in "
                                      "the GPTQ, AWQ or compressed-tensors layout (vLLM, "
                                      "transformers)")
    x.add_argument("checkpoint", help="a kvant checkpoint directory")
    x.add_argument("--format", required=True, choices=["gptq", "awq", "compressed-tensors"])
    x.add_argument("--out", required=True, help="output directory")
    x.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvant`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"kvant: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
