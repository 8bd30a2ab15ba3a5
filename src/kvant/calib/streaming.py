"""Quantize a lazily read model straight to a kvant checkpoint, resumable after a kill.

:func:`quantize_streaming` joins the engine (kvant.calib.engine) and the streaming writer
(kvant.formats.stream): block i is read from its source, quantized, written to its own
shard and freed, so host memory holds one float block and the calibration activations,
whatever the depth. Running the same call again after an interruption continues after the
last finished block; a different model, config, calibration set, engine setting or number
of processes against the same output is refused (the progress record names the run).
Under torch.distributed every rank calls it with the same arguments: the samples are split
across the ranks as in :func:`kvant.quantize`, rank 0 writes the checkpoint
(kvant.formats.stream says how the ranks keep one resumable record).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from kvant.calib import dist as kdist
from kvant.calib.engine import QuantReport, quantize_model, resolve_device
from kvant.config import EngineOptions, MethodConfig
from kvant.core import heap
from kvant.formats import checkpoint as ckpt
from kvant.formats import integrity
from kvant.formats.stream import StreamWriter
from kvant.formats.summary import layer_losses
from kvant.model.discovery import find_blocks
from kvant.nn.qlinear import QuantLinear


def run_identity(model: nn.Module, config: MethodConfig, calib, options: EngineOptions) -> dict:
    """What must match for a resumed run to continue an earlier one."""
    lazy = model.kvant_lazy_blocks
    return {"config": config.to_dict(), "model": lazy.source.identity(),
            "dtype": str(lazy.dtype),
            "calib": None if calib is None else integrity.tensor_digest(calib),
            "engine": {"propagate": options.propagate, "batch_size": options.batch_size,
                       "device": resolve_device(options.device).type,
                       **({"finetune": options.finetune.to_dict()} if options.finetune
                          else {})},
            "format_version": ckpt.FORMAT_VERSION, "processes": kdist.world_size()}


def quantize_streaming(model: nn.Module, config: MethodConfig, calib: torch.Tensor | None,
                       out_dir: str | os.PathLike, tokenizer=None,
                       options: EngineOptions | None = None, overwrite: bool = False,
                       sources=(), on_block=None) -> tuple[QuantReport, str]:
    """Quantize a model loaded with ``lazy=True`` block by block into the kvant checkpoint
    ``out_dir``; resumes an interrupted run of the same job. Returns (report, path).

    An existing kvant output at ``out_dir`` is replaced only with ``overwrite``; ``sources``
    (the input model's path) and foreign directories are refused before any work
    (kvant.formats.outdir). ``on_block(i)``: called once block ``i`` is durably written
    (progress, memory probes); it runs on the writer thread.
    """
    from kvant.model import hf

    options = options or EngineOptions()
    if getattr(model, "kvant_lazy_blocks", None) is None:
        raise ValueError("streaming quantization needs a lazily loaded model "
                         "(kvant.load_model(dir, lazy=True))")
    prefix, blocks = find_blocks(model)
    rank = kdist.rank()
    writer = StreamWriter(out_dir, run_identity(model, config, calib, options), len(blocks),
                          overwrite, sources, on_block, rank, kdist.world_size())
    writer.start()
    try:
        with heap.tensors_from_mmap():
            report = quantize_model(model, config, calib, options, sink=writer)
        if rank:  # rank 0 writes the rest; the others learn whether it could
            kdist.agree(True, "", "finishing the checkpoint")
            return report, str(writer.out)
        rest, aliases = ckpt.dedupe_tensors(
            {n: t for n, t in model.state_dict().items() if not n.startswith(f"{prefix}.")})
        qc = config.to_dict()
        if getattr(model, "kvant_finetune", None):  # block-wise tuning (kvant.tune)
            qc["finetune"] = model.kvant_finetune
        qc.update({"ignored_modules": list(config.ignore), "format": ckpt.FORMAT,
                   "format_version": ckpt.FORMAT_VERSION,
                   # quantized layers outside the blocks (lm_head with quantize_head)
                   "modules": {n: {"kind": m.kind, **m.init_kwargs()}
                               for n, m in model.named_modules()
                               if isinstance(m, QuantLinear) and not n.startswith(f"{prefix}.")}})
        try:
            path = writer.finish(rest, aliases, "hf", hf.spec(model), qc,
                                 hf.tokenizer_files(tokenizer), layer_losses(report.layers))
        except Exception as e:
            if kdist.active():
                kdist.agree(False, str(e), "finishing the checkpoint")
            raise
        if kdist.active():
            kdist.agree(True, "", "finishing the checkpoint")
    finally:
        writer.close()
    return report, str(path)
