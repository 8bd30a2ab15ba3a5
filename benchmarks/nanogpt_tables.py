"""The nanoGPT tables: RTN, GPTQ, AWQ, QuIP and SpQR on the embedded character model.

Protocol, the same for every table: the embedded character-level GPT (Tiny Shakespeare,
n_embd 384, 6 blocks), calibration on 128 random windows x 256 characters of the training
split (seed 0 unless ``--seeds``), scored on the whole validation split (windows of 256) by
per-character perplexity (the SpQR table adds the mean KL divergence from the float model).
``--methods`` picks the tables (their rows are in ``nanogpt_layouts.py``); each writes
``results/<table>_nanogpt.{json,md,png}``. New rows replace the stored rows of the same
method, spec and seed; every row names its commit, dirty flag, device and calibration seed.

    python benchmarks/nanogpt_tables.py --methods gptq            # the GPTQ table (CPU)
    python benchmarks/nanogpt_tables.py --methods gptq --grids 3:128 --seeds 0 1 2
    python benchmarks/nanogpt_tables.py --methods awq --rows awq awq-noclip --max-windows 16
    python benchmarks/nanogpt_tables.py --methods spqr --rewrite  # tables from the JSON only

A dirty tree (uncommitted code) is refused unless ``--allow-dirty``; its rows say dirty.

The measuring is ``kvant bench``'s (:func:`kvant.bench_run.prepare` and
:func:`kvant.bench_run.run_grid`: one float reference per calibration seed, every row a
quantized copy of the same float model on the same windows); this script adds the tables'
rows and labels, the merging into stored tables and their Markdown. Records keep the
format the tables had (``eval`` and ``calib`` as sentences, ``calib_seed``, ``bpc``), and
now every row also carries ``kl`` (mean KL from the float model), ``nll``, ``config``,
``model_fingerprint`` and ``kvant_version``. A row that cannot run is printed and left out
of the table (exit code 1), where the script used to stop.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from kvant.algorithms.registry import config_from_spec
from kvant.bench import BenchSettings
from kvant.bench_run import prepare, run_grid
from kvant.eval.plot import can_plot, plot_ppl_vs_bits
from kvant.eval.table import group_label, markdown_table, write_json

import record as rec  # benchmarks/: commit, dirty flag, device
from nanogpt_layouts import TABLES, Table, extras, grid_summary, spqr_summary

MODEL = "nanogpt-shakespeare"
N_CALIB, SEQ_LEN = 128, 256


def table_record(r: dict, labels: dict[str, str], seed: int) -> dict:
    """A ``kvant bench`` record in the tables' format: the row's table label, ``eval`` and
    ``calib`` as the sentences the stored rows have, ``calib_seed`` and ``bpc``."""
    ev = r["eval"]
    out = {**r, "eval": f"validation split, seq_len {ev['seq_len']}, {ev['tokens']} chars, "
                        f"{ev['windows']} windows", "bpc": r["nll"] / math.log(2)}
    out.pop("settings", None)  # the table's protocol is fixed (module docstring)
    if r["method"] == "float":
        return out
    out["method"] = labels[r["spec"]]
    if r.get("calib"):
        c = r["calib"]
        out["calib"] = f"training split, {c['n_samples']} x {c['seq_len']} chars, seed {seed}"
    else:
        out["calib"] = None
    out["calib_seed"] = seed
    return out


def _key(r: dict) -> tuple:
    """Rows with the same key replace each other (rows stored before seeds were recorded
    were calibrated with seed 0)."""
    seed = r.get("calib_seed", None if r["method"] == "float" else 0)
    return (r["method"], r.get("spec"), seed)


def _grid(text: str) -> tuple[int, int]:
    """'3:128' -> (3, 128)."""
    try:
        bits, group = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not bits:group_size (e.g. 3:128)")
    return bits, group


def merge(table: Table, new: list[dict], out: Path) -> list[dict]:
    """Merge ``new`` into ``out/<table>.json`` (same method, spec and seed replaced) under a
    file lock, in the table's row order; rewrite its Markdown and plot."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{table.name}.json"
    # the lock lives outside the repository (runs of different grids may go side by side)
    with open(Path(tempfile.gettempdir()) / f"kvant-{table.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.is_file() else []
        fresh = {_key(r) for r in new}
        records = [r for r in old if _key(r) not in fresh] + new
        evals = sorted({r.get("eval", "") for r in records})
        if len(evals) > 1:  # one table, one evaluation: refuse rather than mix
            raise ValueError(f"{path} holds rows scored on {evals[0]!r}, these on "
                             f"{evals[-1]!r}: pass another --out")
        order = {row: i for i, row in enumerate(table.rows + table.optional)}
        records.sort(key=lambda r: (r["method"] != "float",
                                    order.get((r["method"], r.get("spec")), 1e9),
                                    r.get("calib_seed") or 0))
        write_json(records, path)
        write_tables(table, records, out)
    return records


def write_tables(table: Table, records: list[dict], out: Path) -> None:
    """``<table>.md`` (and ``.png`` when matplotlib is installed) from ``records``."""
    note, per_row = rec.provenance_note(records)
    seeds = sorted({r["calib_seed"] for r in records if r.get("calib_seed") is not None})
    first = records[0]
    dates = ", ".join(sorted({r["date"] for r in records}))
    md = [f"# {table.title}", "", f"{note} Dates: {dates}. Calibration: training split, {N_CALIB} random windows x {SEQ_LEN} chars, seed "
          f"{', '.join(map(str, seeds)) or '0'}. Eval: {first.get('eval', '')}. {table.note}",
          ""]
    notes = {rec.stamp(r): r["note"] for r in records if r.get("note")}
    md += [f"{k}: {v}." for k, v in sorted(notes.items())] + ([""] if notes else [])
    base = next((r for r in records if r["method"] == "float"), None)
    if base:
        md += [f"Float perplexity: {base['ppl']:.4f}.", ""]
    if len(seeds) > 1:
        md += ["Cells: perplexity at the lowest seed; [min–max] over the calibration seeds "
               "where more than one ran (how much a rerun with other calibration windows "
               "moves the row).", ""]
    scales = next((r["awq_scales"] for r in records if r.get("awq_scales")), "")
    if scales:
        md += [f"AWQ scale placement (groups over all blocks): {scales}.", ""]
    md.append(spqr_summary(records) if table.kl else grid_summary(table, records))
    redone = [r for r in records if r.get("previous_ppl") is not None and r["bits"]]
    if redone:  # rows that replaced stored rows of the same method, spec and seed
        md += ["Rerun against the rows they replaced (ppl before → now): " + "; ".join(
            f"{r['method']} W{r['bits']} {group_label(r['group_size'])} "
            f"{r['previous_ppl']:.4f} → {r['ppl']:.4f}" for r in redone) + ".", ""]
    note_col = None
    if per_row or len(seeds) > 1:  # say per row what differs between rows
        head = ", ".join(["seed"] * (len(seeds) > 1) + ["code, device"] * per_row)
        note_col = (head, lambda r: " ".join(
            [str(r.get("calib_seed", "-"))] * (len(seeds) > 1) + [rec.stamp(r)] * per_row))
    md.append(markdown_table(records, "All records", note=note_col))
    (out / f"{table.name}.md").write_text("\n".join(md))
    if can_plot():
        plot_ppl_vs_bits([r for r in records if r.get("calib_seed") in (None, seeds[0] if seeds
                                                                      else 0)],
                         out / f"{table.name}.png", f"nanoGPT: {table.title}")


def pick_rows(table: Table, args) -> list[tuple[str, str]]:
    """The table's rows, filtered by --rows (labels, optional rows included) and --grids."""
    rows = table.rows + [r for r in table.optional if args.rows and r[0] in args.rows]
    if args.rows:
        known = {label for label, _ in table.rows + table.optional}
        unknown = sorted(set(args.rows) - known)
        if unknown:
            raise ValueError(f"--rows {unknown} not in the {table.name} table "
                             f"(known: {sorted(known)})")
        rows = [r for r in rows if r[0] in args.rows]
    if args.grids:
        want = set(args.grids)
        rows = [(label, spec) for label, spec in rows
                if (config_from_spec(spec).bits, config_from_spec(spec).group_size) in want]
    return rows


def main(argv=None) -> int:
    """Run the chosen tables, printing each row as it lands."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", choices=list(TABLES), default=["gptq"],
                   help="which tables to run")
    p.add_argument("--rows", nargs="*", default=None, help="only these row labels")
    p.add_argument("--grids", nargs="*", type=_grid, default=None,
                   help="only these bits:group_size")
    p.add_argument("--seeds", type=int, nargs="*", default=[0],
                   help="calibration seeds (rows without calibration run at the first only)")
    p.add_argument("--max-windows", type=int, default=None, help="eval windows (default all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: what each table was measured with)")
    p.add_argument("--out", default=None,
                   help="results folder (default: results/ for the GPTQ table, "
                        "results/archive/ for the others)")
    p.add_argument("--allow-dirty", action="store_true",
                   help="record from uncommitted code (rows are marked dirty)")
    p.add_argument("--skip-float", action="store_true",
                   help="keep the stored float row (the float model still runs: it is the "
                        "reference of every row's KL)")
    p.add_argument("--rewrite", action="store_true",
                   help="run nothing: rewrite the Markdown and plot from the stored JSON")
    args = p.parse_args(argv)
    outs = {name: Path(args.out) if args.out else
            (rec.RESULTS if TABLES[name].headline else rec.ARCHIVE) for name in args.methods}
    if args.rewrite:
        for name in args.methods:
            table, out = TABLES[name], outs[name]
            write_tables(table, json.loads((out / f"{table.name}.json").read_text()), out)
        return 0
    try:
        stamp = rec.provenance(args.allow_dirty)
        rows = {name: pick_rows(TABLES[name], args) for name in args.methods}
    except (rec.DirtyTree, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    failed = 0
    try:
        for name in args.methods:
            failed += run_table(TABLES[name], rows[name], outs[name], stamp, args)
    except ValueError as e:  # rows that cannot join the stored table
        print(f"error: {e}", file=sys.stderr)
        return 2
    if failed:
        print(f"error: {failed} rows could not run (printed above)", file=sys.stderr)
        return 1
    return 0


def run_table(table: Table, rows: list, out: Path, stamp: dict, args) -> int:
    """For each seed, ``kvant bench``'s grid over the table's rows (rows without calibration
    at the first seed only), merging each record as it lands; the float row (the KL
    reference, scored per seed) is merged once unless --skip-float. Returns the failed
    rows' count."""
    threads = args.threads or table.threads
    if threads:
        torch.set_num_threads(threads)
    labels = {spec: label for label, spec in rows}
    failed = 0
    for i, seed in enumerate(args.seeds):
        specs = [spec for _, spec in rows if not (i and spec.startswith("rtn:"))]
        if not specs:  # only rows without calibration: measured at the first seed
            continue
        settings = BenchSettings(methods=(), bits=(), specs=tuple(specs), n_samples=N_CALIB,
                                 seq_len=SEQ_LEN, seed=seed, max_windows=args.max_windows,
                                 eval_batch_size=16, device=args.device, kl_store="full")
        inputs = prepare("embedded", settings)

        def land(r: dict, seed=seed, first=i == 0) -> None:
            nonlocal failed
            if "error" in r:
                failed += 1
                print(f"[{table.name}] seed {seed} {labels[r['spec']]:20s} {r['spec']:50s} "
                      f"FAILED {r['error']}", flush=True)
                return
            row = table_record(r, labels, seed)
            if row["method"] == "float":
                if first and not args.skip_float:
                    merge(table, [row], out)
                    print(f"[{table.name}] float ppl {row['ppl']:.4f}", flush=True)
                return
            print(f"[{table.name}] seed {seed} {row['method']:20s} {row['spec']:50s} ppl "
                  f"{row['ppl']:.4f} ({row['quant_seconds']:.0f} s)", flush=True)
            merge(table, [row], out)  # after every row: an interrupted run keeps its rows

        run_grid(inputs, stamp, on_record=land, show_progress=False,
                 annotate=lambda cfg, q, report: extras(q, report, cfg.method))
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
