"""``kvant demo``: the embedded nanoGPT model, float vs every method on the same text.

Evaluates a fixed slice of the held-out validation text (the first ``windows`` windows of
256 characters) so that the whole table finishes in about a minute on a 2-core CPU.
Calibration (for methods that need it) draws seeded random windows from the training text.
Records name the kvant version and the device; the plot is written when matplotlib (the
``plot`` extra) is installed.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
import resource
import time
from pathlib import Path

import torch

import kvant
from kvant.algorithms.registry import available, config_from_spec
from kvant.calib.data_char import char_windows
from kvant.config import EngineOptions
from kvant.calib.engine import quantize_model
from kvant.eval.perplexity import char_perplexity
from kvant.model import nanogpt
from kvant.eval.plot import PLOT_HINT, can_plot, plot_ppl_change
from kvant.eval.table import markdown_table, model_bytes, quantized_bits_per_weight, write_json

log = logging.getLogger(__name__)

# the seed's naive rounding first, then per-channel and group 128, at 4/3/2 bits
RTN_SPECS = [f"rtn:bits={b},group_size={g}{',sym=true' if g == 0 else ''}"
             for g in (0, -1, 128) for b in (4, 3, 2)]
# GPTQ where it matters: 3 and 2 bits (the full grid is benchmarks/gptq_nanogpt.py)
GPTQ_SPECS = ["gptq:bits=3,group_size=128,act_order=true",
              "gptq:bits=2,group_size=128,act_order=true"]
DEFAULT_WINDOWS = 32
CALIB_SAMPLES, CALIB_SEED = 32, 0


def default_specs() -> list[str]:
    """RTN rows, plus rows of every registered calibrated method that the demo knows."""
    specs = list(RTN_SPECS)
    if "gptq" in available():
        specs += GPTQ_SPECS
    return specs


def _label(cfg) -> str:
    name = cfg.method
    if getattr(cfg, "act_order", False):
        name += "-actorder"
    if cfg.method == "rtn" and cfg.group_size == 0:
        name += "-naive"
    return name


def run_demo(out_dir: str | Path = "kvant-demo", specs: list[str] | None = None,
             windows: int = DEFAULT_WINDOWS, progress=None) -> list[dict]:
    """Run the table; write report.md and report.json into ``out_dir``, and report.png when
    matplotlib is installed (:func:`plot_written` says whether it was).

    ``progress(record)`` is called after each row (the CLI prints it). Returns the records.
    """
    torch.manual_seed(0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base, tok = nanogpt.load_embedded()
    text = nanogpt.validation_text()
    calib = char_windows(tok, nanogpt.training_text(), CALIB_SAMPLES,
                         base.config.block_size, CALIB_SEED)
    common = {"model": "nanogpt-shakespeare", "device": f"cpu-{os.cpu_count()}core",
              "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(),
              "kvant_version": kvant.__version__}
    records = []

    def evaluate(model):
        return char_perplexity(model, tok, text, seq_len=base.config.block_size,
                               max_windows=windows)

    t0 = time.perf_counter()
    ev = evaluate(base)
    eval_desc = (f"tiny-shakespeare validation, first {ev['windows']} windows of "
                 f"{ev['seq_len']} chars, {ev['tokens']} scored chars")
    rec = {**common, "method": "float", "bits": None, "group_size": None, "sym": None,
           "bits_per_weight": None, "ppl": ev["ppl"], "bpc": ev["bpc"],
           "size_mb": model_bytes(base) / 1e6, "quant_seconds": 0.0,
           "eval": eval_desc, "calib": None, "eval_seconds": time.perf_counter() - t0}
    records.append(rec)
    if progress:
        progress(rec)
    for spec in specs or default_specs():
        cfg = config_from_spec(spec)
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = quantize_model(model, cfg, calib, EngineOptions(device="cpu",
                                                                 show_progress=False))
        secs = time.perf_counter() - t0
        ev = evaluate(model)
        rec = {**common, "method": _label(cfg), "spec": spec, "bits": cfg.bits,
               "group_size": cfg.group_size, "sym": cfg.sym,
               "bits_per_weight": quantized_bits_per_weight(model), "ppl": ev["ppl"],
               "bpc": ev["bpc"], "size_mb": model_bytes(model) / 1e6,
               "quant_seconds": secs, "eval": eval_desc,
               "calib": (f"tiny-shakespeare train, {CALIB_SAMPLES} x {base.config.block_size}"
                         f" chars, seed {CALIB_SEED}") if report.n_calib else None,
               "peak_cpu_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
        records.append(rec)
        if progress:
            progress(rec)
    write_json(records, out / "report.json")
    md = markdown_table(records, "kvant demo: nanoGPT (tiny Shakespeare), validation "
                                 "perplexity per character")
    plot = out / "report.png"
    if can_plot():
        plot_ppl_change(records, plot, "nanoGPT Shakespeare: perplexity change vs "
                                       "bits/weight")
    (out / "report.md").write_text(md + f"\nEval: {eval_desc}. Device: {common['device']}, "
                                        f"kvant {common['kvant_version']}."
                                        + ("" if can_plot() else f" No plot: {PLOT_HINT}.")
                                        + "\n")
    return records


def plot_written(out_dir: str | Path = "kvant-demo") -> str:
    """What the CLI prints about report.png: its path, or how to get the plot."""
    plot = Path(out_dir) / "report.png"
    return str(plot) if can_plot() and plot.is_file() else f"no report.png ({PLOT_HINT})"
