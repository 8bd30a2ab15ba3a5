"""What the nanoGPT benchmark scripts share: the protocol and one quantize-and-score record.

Protocol: the embedded model, calibration on ``N_CALIB`` random training windows of
``SEQ_LEN`` characters (seed ``SEED``), evaluation on the whole validation split (or its first
``max_windows`` windows) by per-character perplexity.
"""

from __future__ import annotations

import copy
import time

import torch

import kvant
from kvant import report as rep
from kvant.algorithms.registry import config_from_spec
from kvant.calib.data_char import char_windows
from kvant.eval.perplexity import char_perplexity
from kvant.model.nanogpt import load_embedded, training_text, validation_text

MODEL = "nanogpt-shakespeare"
N_CALIB, SEQ_LEN, SEED = 128, 256, 0


def setup(device: str):
    """Seeded, gradient-free start: (embedded model on ``device``, tokenizer, calibration)."""
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model, tok = load_embedded()
    model = model.to(device)
    return model, tok, calibration(tok)


def float_row(model, tok, device: str, max_windows: int | None = None) -> dict:
    """The float model scored like every quantized row: its record (the table's first)."""
    ev = char_perplexity(model, tok, validation_text(), seq_len=SEQ_LEN, max_windows=max_windows)
    return float_record(model, device, ev)


def calibration(tok):
    """(N_CALIB, SEQ_LEN) calibration windows of the training split."""
    return char_windows(tok, training_text(), N_CALIB, SEQ_LEN, SEED)


def quantize_copy(model, spec: str, calib, device: str):
    """A quantized deep copy of ``model``: (copy, config, report, seconds)."""
    cfg = config_from_spec(spec)
    q = copy.deepcopy(model)
    t0 = time.perf_counter()
    report = kvant.quantize(q, cfg, calib, kvant.EngineOptions(device=device,
                                                                show_progress=False))
    return q, cfg, report, time.perf_counter() - t0


def record(q, label: str, spec: str, cfg, seconds: float, device: str, ev: dict,
           **extra) -> dict:
    """One benchmark record of a quantized model ``q`` scored as ``ev`` (ppl, tokens,
    windows; bpc and kl when present)."""
    r = {"model": MODEL, "method": label, "spec": spec, "bits": cfg.bits,
         "group_size": cfg.group_size, "sym": cfg.sym,
         "bits_per_weight": rep.quantized_bits_per_weight(q), "ppl": ev["ppl"],
         "size_mb": rep.model_bytes(q) / 1e6, "quant_seconds": seconds, "peak_gpu_gb": None,
         "device": rep.device_name(device),
         "calib": f"training split, {N_CALIB} x {SEQ_LEN} chars, seed {SEED}",
         "eval": f"validation split, seq_len {SEQ_LEN}, {ev['tokens']} chars, "
                 f"{ev['windows']} windows",
         "date": rep.today(), "commit": rep.git_commit()}
    for key in ("bpc", "kl"):
        if key in ev:
            r[key] = ev[key]
    r.update(extra)
    return r


def run_one(model, tok, label: str, spec: str, calib, device: str,
            max_windows: int | None = None) -> tuple[dict, object]:
    """Quantize a copy with ``spec``, score its perplexity: (record, quantization report)."""
    q, cfg, report, seconds = quantize_copy(model, spec, calib, device)
    ev = char_perplexity(q, tok, validation_text(), seq_len=SEQ_LEN, max_windows=max_windows)
    return record(q, label, spec, cfg, seconds, device, ev), report


def float_record(model, device: str, ev: dict) -> dict:
    """The float model's record (the table's first row)."""
    r = {"model": MODEL, "method": "float", "bits": None, "group_size": None,
         "bits_per_weight": None, "ppl": ev["ppl"], "kl": 0.0, "quant_seconds": 0.0,
         "size_mb": rep.model_bytes(model) / 1e6, "device": rep.device_name(device),
         "eval": f"validation split, seq_len {SEQ_LEN}, {ev['tokens']} chars, "
                 f"{ev['windows']} windows", "date": rep.today(), "commit": rep.git_commit()}
    if "bpc" in ev:
        r["bpc"] = ev["bpc"]
    return r
