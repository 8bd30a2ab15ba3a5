"""``kvant demo``: the embedded nanoGPT model, float vs every method on the same text.

Evaluates a fixed slice of the held-out validation text (the first ``windows`` windows of
256 characters) so that the whole table finishes in about a minute on a 2-core CPU.
Calibration (for methods that need it) draws seeded random windows from the training text.
"""

from __future__ import annotations

import copy
import logging
import resource
import time
from pathlib import Path

import torch

from kvant.algorithms.registry import available, config_from_spec
from kvant.calib.data_char import char_windows
from kvant.config import EngineOptions
from kvant.calib.engine import quantize_model
from kvant.eval.perplexity import char_perplexity
from kvant.model import nanogpt
from kvant import report as rep

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
    """Run the table; write report.md, report.json and report.png into ``out_dir``.

    ``progress(record)`` is called after each row (the CLI prints it). Returns the records.
    """
    torch.manual_seed(0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base, tok = nanogpt.load_embedded()
    text = nanogpt.validation_text()
    calib = char_windows(tok, nanogpt.training_text(), CALIB_SAMPLES,
                         base.config.block_size, CALIB_SEED)
    common = {"model": "nanogpt-shakespeare", "device": rep.device_name("cpu"),
              "date": rep.today(), "commit": rep.git_commit()}
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
           "size_mb": rep.model_bytes(base) / 1e6, "quant_seconds": 0.0,
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
               "bits_per_weight": rep.quantized_bits_per_weight(model), "ppl": ev["ppl"],
               "bpc": ev["bpc"], "size_mb": rep.model_bytes(model) / 1e6,
               "quant_seconds": secs, "eval": eval_desc,
               "calib": (f"tiny-shakespeare train, {CALIB_SAMPLES} x {base.config.block_size}"
                         f" chars, seed {CALIB_SEED}") if report.n_calib else None,
               "peak_cpu_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
        records.append(rec)
        if progress:
            progress(rec)
    rep.write_json(records, out / "report.json")
    md = rep.markdown_table(records, "kvant demo: nanoGPT (tiny Shakespeare), validation "
                                     "perplexity per character")
    (out / "report.md").write_text(md + f"\nEval: {eval_desc}. Device: {common['device']}.\n")
    rep.plot_ppl_vs_bits(records, out / "report.png",
                         "nanoGPT Shakespeare: perplexity vs bits/weight")
    return records
