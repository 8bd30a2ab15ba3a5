"""Measuring the grid of ``kvant bench`` (:mod:`kvant.bench`): load the float model once,
draw the calibration and evaluation windows every configuration shares, score the float
model once (:class:`kvant.eval.kl.FloatReference`), then quantize and score a copy per
configuration. Nothing here touches files; :mod:`kvant.bench_output` writes the results.

Records carry the code's ``commit`` / ``dirty`` only as given (``stamp``): the library runs
no git; front ends (the CLI, ``benchmarks/``) say what code they run.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import kvant
from kvant.algorithms.registry import needs_calibration
from kvant.bench import EMBEDDED, BenchSettings, GridItem, config_label, grid
from kvant.config import EngineOptions, MethodConfig
from kvant.eval.kl import FloatReference
from kvant.eval.table import model_bytes, quantized_bits_per_weight

log = logging.getLogger(__name__)

WIKITEXT_DESC = "wikitext2 test (raw rows joined by '\\n\\n')"
# annotate(config, quantized model, its QuantReport) -> fields added to that record
Annotate = Callable[[MethodConfig, nn.Module, object], dict]


def weights_fingerprint(model: nn.Module, samples: int = 4096) -> str:
    """sha256 of every parameter's and buffer's name, shape, dtype and ``samples`` evenly
    spaced values: tells two models apart without reading every byte of a large one."""
    h = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(flat[::step][:samples].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 (16 hex digits) of an integer tensor's values and shape."""
    t = t.to("cpu", torch.int64).contiguous()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()[:16]


def device_name(device: torch.device) -> str:
    """The CUDA card's name, or ``cpu-<n>core``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}core"


@dataclass
class BenchInputs:
    """The float model and what every configuration shares: grid, calibration, eval windows.

    calib: (n_samples, seq_len) token ids, or None when no configuration needs them.
    windows: (n_windows, eval_seq_len) token ids scored by every configuration.
    model_desc: ``model`` (a name) and ``model_fingerprint`` (:func:`weights_fingerprint`).
    calib_desc, eval_desc: how the windows were drawn, with their ``digest``.
    """

    model: nn.Module
    tokenizer: object
    settings: BenchSettings
    items: list[GridItem]
    calib: torch.Tensor | None
    calib_desc: dict | None
    windows: torch.Tensor
    eval_desc: dict
    model_desc: dict
    device: torch.device


def _is_char_model(model: nn.Module) -> bool:
    from kvant.model.nanogpt import GPTLanguageModel

    return isinstance(model, GPTLanguageModel)


def _default_seq_len(model: nn.Module) -> int:
    from kvant.calib.data import context_length

    if _is_char_model(model):
        return model.config.block_size
    return min(2048, context_length(model) or 2048)


def _eval_windows(model, tok, s: BenchSettings, seq_len: int) -> tuple[torch.Tensor, str]:
    """(windows (W, seq_len), the dataset's description)."""
    from kvant.calib.data import check_seq_len

    check_seq_len(model, seq_len, "eval seq_len")
    if _is_char_model(model):
        from kvant.model.nanogpt import validation_text

        if s.eval is not None and not Path(s.eval).is_file():
            raise FileNotFoundError(f"eval text {s.eval!r} is not a file")
        text = Path(s.eval).read_text(encoding="utf-8") if s.eval else validation_text()
        ids = torch.tensor(tok.encode(text), dtype=torch.long)
        n = ids.numel() // seq_len
        n = min(n, s.max_windows) if s.max_windows else n
        if n == 0:
            raise ValueError(f"eval text of {ids.numel()} characters is shorter than one "
                             f"window of {seq_len}")
        desc = f"file {Path(s.eval).name}" if s.eval else "tiny-shakespeare validation split"
        return ids[: n * seq_len].view(n, seq_len), desc
    from kvant.eval.perplexity import eval_windows

    dataset = s.eval or "wikitext2"
    windows = eval_windows(tok, dataset, seq_len, s.eval_file, s.max_windows)
    return windows, WIKITEXT_DESC if dataset == "wikitext2" else f"file {Path(dataset).name}"


def prepare(model_source: str | os.PathLike | None, settings: BenchSettings) -> BenchInputs:
    """Load the float model (None or ``"embedded"``: the embedded nanoGPT; else what
    :func:`kvant.load_model` reads: a Hugging Face directory or hub id, a GGUF file), build
    the grid, draw the calibration windows (when a configuration needs them) and the
    evaluation windows."""
    from kvant.calib.engine import resolve_device

    items = grid(settings)
    src = "nanogpt" if model_source is None or str(model_source) in EMBEDDED else model_source
    model, tok = kvant.load_model(src, device="cpu")
    model.eval()
    name = "nanogpt-shakespeare" if src == "nanogpt" else str(model_source)
    s = settings
    seq_len = s.seq_len or _default_seq_len(model)
    calib, calib_desc = None, None
    if any(it.config is not None and needs_calibration(it.config) for it in items):
        calib = kvant.calibration_for(model, tok, s.calib, n_samples=s.n_samples,
                                      seq_len=seq_len, seed=s.seed, calib_file=s.calib_file)
        source = s.calib or ("tiny-shakespeare training split" if _is_char_model(model)
                             else "c4")
        calib_desc = {"source": source, "file": Path(s.calib_file).name if s.calib_file
                      else None, "n_samples": s.n_samples, "seq_len": seq_len, "seed": s.seed,
                      "digest": tensor_digest(calib)}
    eval_len = s.eval_seq_len or seq_len
    windows, dataset = _eval_windows(model, tok, s, eval_len)
    eval_desc = {"dataset": dataset, "seq_len": eval_len, "windows": len(windows),
                 "tokens": len(windows) * (eval_len - 1), "digest": tensor_digest(windows)}
    model_desc = {"model": name, "model_fingerprint": weights_fingerprint(model)}
    return BenchInputs(model, tok, s, items, calib, calib_desc, windows, eval_desc,
                       model_desc, resolve_device(s.device))


def _peak_gpu(device: torch.device, held: float) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 1e9 - held


def measure_config(inputs: BenchInputs, cfg: MethodConfig, ref: FloatReference):
    """Quantize a copy of the float model with ``cfg`` and score it against ``ref``.

    Returns (the record's measured fields, the quantized model, its QuantReport)."""
    dev = inputs.device
    model = copy.deepcopy(inputs.model)
    held = 0.0
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        held = torch.cuda.memory_allocated(dev) / 1e9
        torch.cuda.reset_peak_memory_stats(dev)
    calib = inputs.calib if needs_calibration(cfg) else None
    t0 = time.perf_counter()
    report = kvant.quantize(model, cfg, calib, EngineOptions(device=str(dev),
                                                             show_progress=False))
    seconds = time.perf_counter() - t0
    peak = _peak_gpu(dev, held)  # the quantization's own peak, above the reference held
    t0 = time.perf_counter()
    ev = ref.compare(model.to(dev), show_progress=False)
    row = {"bits_per_weight": quantized_bits_per_weight(model), "ppl": ev["ppl"],
           "nll": ev["nll"], "kl": ev["kl"], "size_mb": model_bytes(model) / 1e6,
           "quant_seconds": seconds, "eval_seconds": time.perf_counter() - t0,
           "peak_gpu_gb": peak, "calib": inputs.calib_desc if calib is not None else None}
    return row, model, report


def _common(inputs: BenchInputs, stamp: dict | None, kl_store: str) -> dict:
    stamp = stamp or {}
    return {**inputs.model_desc, "device": device_name(inputs.device),
            "date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(),
            "kvant_version": kvant.__version__, "commit": stamp.get("commit"),
            "dirty": stamp.get("dirty"), "threads": torch.get_num_threads(),
            "eval": {**inputs.eval_desc, "kl_store": kl_store}}


def float_reference(inputs: BenchInputs, show_progress: bool = True) -> FloatReference:
    """Run the float model once over the evaluation windows (on the compute device)."""
    s = inputs.settings
    batch = s.eval_batch_size or (16 if _is_char_model(inputs.model) else 1)
    ref = FloatReference(inputs.model.to(inputs.device), inputs.windows, batch_size=batch,
                         device=inputs.device, store=s.kl_store, show_progress=show_progress)
    inputs.model.to("cpu")  # copies are made on the host; one at a time on the device
    return ref


def run_grid(inputs: BenchInputs, stamp: dict | None = None, skip: set[str] = frozenset(),
             on_record: Callable[[dict], None] | None = None, show_progress: bool = True,
             float_ppl: float | None = None, extra: dict | None = None,
             annotate: Annotate | None = None) -> list[dict]:
    """Score the float model, then every grid configuration whose key is not in ``skip``.

    stamp: ``commit`` and ``dirty`` of the code, as the caller knows them (the library runs
        no git; None: both recorded as None).
    on_record(record): called after the float row and after each configuration.
    float_ppl: the float perplexity stored by an earlier run: the reference must agree
        (relative 1e-4), else :class:`kvant.errors.InputError`, before anything is quantized.
    extra: fields added to every record.
    annotate(config, quantized model, report): more fields for that configuration's record
        (e.g. where AWQ put its scales), read before the quantized copy is dropped.
    Returns the records, the float row first.
    """
    from kvant.errors import InputError

    todo = [it for it in inputs.items if it.key not in skip]
    bar = tqdm(total=len(inputs.items), initial=len(inputs.items) - len(todo),
               desc="kvant bench", unit="config", disable=not show_progress)
    t0 = time.perf_counter()
    ref = float_reference(inputs, show_progress)
    common = {**_common(inputs, stamp, ref.store), **(extra or {})}
    if float_ppl is not None and abs(ref.ppl / float_ppl - 1) > 1e-4:
        bar.close()
        raise InputError(f"the float model now scores perplexity {ref.ppl:.6f}, the stored "
                         f"results were measured against {float_ppl:.6f} (other code or "
                         "device?): resume on the same setup, or use another output")
    records = [{**common, "method": "float", "spec": None, "config": None, "bits": None,
                "group_size": None, "sym": None, "bits_per_weight": None, "ppl": ref.ppl,
                "nll": ref.nll, "kl": 0.0, "size_mb": model_bytes(inputs.model) / 1e6,
                "quant_seconds": 0.0, "eval_seconds": time.perf_counter() - t0,
                "peak_gpu_gb": None, "calib": None}]
    if on_record:
        on_record(records[0])
    for it in todo:
        bar.set_postfix_str(it.spec)
        records.append(_one(inputs, it, ref, common, annotate))
        if on_record:
            on_record(records[-1])
        bar.update(1)
    bar.close()
    return records


def _one(inputs: BenchInputs, it: GridItem, ref: FloatReference, common: dict,
         annotate: Annotate | None = None) -> dict:
    """The record of one grid item; whatever stops it becomes the record's ``error``."""
    cfg = it.config
    head = {**common, "method": config_label(cfg) if cfg else it.spec.partition(":")[0],
            "spec": it.spec, "config": cfg.to_dict() if cfg else None,
            "bits": cfg.bits if cfg else _field(it.spec, "bits"),
            "group_size": cfg.group_size if cfg else _field(it.spec, "group_size"),
            "sym": cfg.sym if cfg else None}
    if it.error is not None:
        return {**head, "error": it.error}
    try:
        row, model, report = measure_config(inputs, cfg, ref)
        if annotate is not None:
            row = {**row, **annotate(cfg, model, report)}
    except Exception as e:  # one configuration that cannot run must not end the grid
        log.warning("kvant bench: %s failed: %s: %s", it.spec, type(e).__name__, e)
        if inputs.device.type == "cuda":
            torch.cuda.empty_cache()
        return {**head, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
    del model
    if inputs.device.type == "cuda":
        torch.cuda.empty_cache()
    return {**head, **row}


def _field(spec: str, name: str) -> int | None:
    for item in spec.partition(":")[2].split(","):
        key, _, value = item.partition("=")
        if key == name:
            return int(value)
    return None
