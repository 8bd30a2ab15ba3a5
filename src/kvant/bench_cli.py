"""``kvant bench``: the command line of :mod:`kvant.bench_output` (parser and printing)."""

from __future__ import annotations

import argparse
import json
import sys

from kvant.errors import InputError


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    """'4,3,2' -> (4, 3, 2); anything else is one clear error naming the flag."""
    items = [t.strip() for t in text.split(",")]
    try:
        return tuple(int(t) for t in items)
    except ValueError:
        raise InputError(f"{flag} takes integers separated by commas (e.g. 4,3), "
                         f"got {text!r}") from None


def _flag01(text: str, flag: str) -> bool:
    """'0' / '1' -> False / True; anything else is one clear error naming the flag."""
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"{flag} takes 0 or 1, got {text!r}")
    return text == "1"


def _row_line(r: dict, base: float | None) -> str:
    if "error" in r:
        return f"{r['spec']:<28} could not run: {r['error']}"
    if r["method"] == "float":
        return f"{'float':<28} ppl {r['ppl']:.4f}"
    delta = f"{100 * (r['ppl'] / base - 1):+.2f}%" if base else ""
    return (f"{r['spec']:<28} ppl {r['ppl']:.4f} ({delta}) KL {r['kl']:.4f} "
            f"bits/weight {r['bits_per_weight']:.3f} quantized in {r['quant_seconds']:.1f}s")


def cmd_bench(args) -> int:
    """Run the grid, printing each row as it lands, then the table and the files."""
    from tqdm.auto import tqdm

    from kvant.bench import BenchSettings
    from kvant.bench_output import bench

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    settings = BenchSettings(
        methods=methods, bits=_int_list(args.bits, "--bits"),
        group_sizes=_int_list(args.group_size, "--group-size") if args.group_size else (None,),
        specs=tuple(args.spec or ()), calib=args.calib, calib_file=args.calib_file,
        n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed, eval=args.eval,
        eval_file=args.eval_file, eval_seq_len=args.eval_seq_len,
        max_windows=args.max_windows, device=args.device, kl_store=args.kl_store)
    state = {"base": None}

    def show(r: dict) -> None:
        if r["method"] == "float" and state["base"] is None:
            state["base"] = r["ppl"]
        if not args.json:
            tqdm.write(_row_line(r, state["base"]))

    res = bench(args.model, settings, args.out, stamp={"commit": args.commit, "dirty": args.dirty}, on_record=show)
    if args.json:
        print(json.dumps(res.records, indent=1))
        return 0
    print()
    print((res.out / "bench.md").read_text(encoding="utf-8"))
    done = f"{res.ran} configs measured, {res.skipped} already in {res.out} skipped"
    if res.failed:
        done += f", {res.failed} could not run (see the table)"
    from kvant.eval.plot import PLOT_HINT

    plot = str(res.plot) if res.plot else f"no plot ({PLOT_HINT})"
    print(f"{done}.\nwrote {res.out / 'bench.json'}, {res.out / 'bench.md'}, {plot}",
          file=sys.stderr)
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``kvant bench`` to the subcommands ``sub``."""
    b = sub.add_parser(
        "bench", help="quantize one model with several methods and bit widths, score each "
                      "against one float reference (perplexity, KL), write a table and plot",
        description="Each configuration (methods x bits x group sizes, plus --spec) quantizes "
                    "a copy of the same float model with the same calibration windows and is "
                    "scored on the same evaluation windows against the float model's outputs, "
                    "computed once. Writes bench.json, bench.md and bench.png into --out; "
                    "run again with the same --out to skip the configurations already there. "
                    "Every record names kvant's version, and the code's commit and dirty flag "
                    "when --commit / --dirty give them (kvant runs no git).")
    b.add_argument("model", nargs="?", default="embedded",
                   help="'embedded' (the default: the embedded nanoGPT), a Hugging Face "
                        "directory or hub id, or a .gguf file")
    b.add_argument("--methods", default="rtn,gptq,awq",
                   help="methods separated by commas (default rtn,gptq,awq; also quip, spqr)")
    b.add_argument("--bits", default="4,3", help="bit widths separated by commas (default 4,3)")
    b.add_argument("--group-size", default=None,
                   help="group sizes separated by commas (-1 per channel, 0 per tensor; "
                        "default: each method's own, 128 for most, 16 for spqr)")
    b.add_argument("--spec", action="append",
                   help="a further configuration written in full, e.g. "
                        "'gptq:bits=3,group_size=64,act_order=true' (repeatable)")
    b.add_argument("--calib", default=None,
                   help="calibration: 'c4', 'wikitext2', a .txt/.jsonl file (default: the "
                        "embedded training text for nanoGPT, c4 for others)")
    b.add_argument("--calib-file", default=None, help="local copy for --calib c4/wikitext2")
    b.add_argument("--n-samples", type=int, default=128, help="calibration windows "
                   "(default 128)")
    b.add_argument("--seq-len", type=int, default=None,
                   help="calibration window (default: the model's context, at most 2048)")
    b.add_argument("--seed", type=int, default=0, help="calibration seed (default 0)")
    b.add_argument("--eval", default=None,
                   help="evaluation text: 'wikitext2' or a text file (default: the embedded "
                        "validation text for nanoGPT, wikitext2 test for others)")
    b.add_argument("--eval-file", default=None, help="local copy of wikitext2's wiki.test.raw")
    b.add_argument("--eval-seq-len", type=int, default=None,
                   help="evaluation window (default: as --seq-len)")
    b.add_argument("--max-windows", type=int, default=None,
                   help="score only the first windows (default: all)")
    b.add_argument("--device", default=None, help="compute device (default cuda if present)")
    b.add_argument("--kl-store", default="auto", choices=["auto", "full", "host", "topk"],
                   help="keep every float log-probability (host: in CPU memory, for jobs "
                        "sharing a GPU) or the top 128 per position (default auto: full "
                        "when it fits in memory)")
    b.add_argument("--out", default="kvant-bench",
                   help="results directory (default ./kvant-bench); an earlier run's "
                        "directory resumes it")
    b.add_argument("--commit", default=None,
                   help="the commit of the code that runs, recorded with every row (e.g. "
                        "$(git rev-parse --short HEAD)); default: not recorded")
    b.add_argument("--dirty", default=None, type=lambda v: _flag01(v, "--dirty"),
                   help="1 when that code has uncommitted changes, 0 when not; recorded with "
                        "every row")
    b.add_argument("--json", action="store_true", help="print the records as JSON")
    b.set_defaults(fn=cmd_bench)
    return b
