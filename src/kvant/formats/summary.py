"""What a kvant checkpoint holds, in a few numbers: size, bits per weight, bits histogram,
and the per-layer losses of the run that wrote it.

Read from ``config.json`` and the safetensors headers only (no tensor data is loaded), so
``kvant inspect`` and the end of ``kvant quantize`` can print it for a model of any size,
streamed or not. Sizes count every stored byte: a quantized layer's packed weights, scales,
zero points and method extras (its bias is not a weight and is counted with the rest).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import struct
from collections import Counter
from pathlib import Path

from kvant.errors import CheckpointError

# bytes per element of the safetensors dtype names
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4,
                "U64": 8}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def layer_losses(layers: dict[str, dict]) -> dict[str, float | None]:
    """name -> the method's loss of that layer, from a QuantReport's ``layers``; a missing
    or non-finite loss is None (JSON has no NaN)."""
    out = {}
    for name, entry in sorted(layers.items()):
        loss = entry.get("loss") if isinstance(entry, dict) else None
        out[name] = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) \
            else None
    return out


def loss_summary(losses: dict[str, float | None], worst: int = 5) -> dict | None:
    """{"median", "worst": [(name, loss)] (the ``worst`` largest, largest first), "layers"}
    over the layers with a loss; None when no layer has one."""
    known = {n: v for n, v in losses.items() if v is not None}
    if not known:
        return None
    top = sorted(known.items(), key=lambda kv: kv[1], reverse=True)[:worst]
    return {"median": statistics.median(known.values()), "worst": top, "layers": len(known)}


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file: tensor name -> {dtype, shape, data_offsets}."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            head = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"cannot read the header of {str(path)!r}: {e}") from None
    head.pop("__metadata__", None)
    return head


def checkpoint_summary(ckpt_dir: str | os.PathLike, meta: dict) -> dict:
    """Totals of a checkpoint whose parsed ``config.json`` is ``meta``
    (kvant.formats.checkpoint.read_config). Returns::

        method, bits, group_size      the method config
        size_bytes                    all shards on disk
        float16_bytes                 the same model with every parameter in 16-bit floats
        quantized_layers, quantized_weights
        bits_per_weight               stored bits per quantized weight (scales etc. counted)
        bits_per_parameter            all stored bits / all parameters (float ones included)
        float_parameters              elements of float tensors outside quantized layers
        bits_histogram                {bits: number of quantized layers}
        head_quantized                whether the output head (lm_head) is quantized
        losses                        :func:`loss_summary` of the stored losses, or None
        finetune                      the fine-tuning stages after rounding (kvant.tune)
    """
    d = Path(ckpt_dir)
    qc = meta["quantization_config"]
    modules = qc["modules"]
    nbytes: dict[str, int] = {}
    dtypes: dict[str, str] = {}
    numel: dict[str, int] = {}
    for fname in meta["files"]:
        for name, t in _header(d / fname).items():
            start, end = t["data_offsets"]
            nbytes[name], dtypes[name] = end - start, t["dtype"]
            numel[name] = math.prod(t["shape"])
    owner = {name: name.rpartition(".")[0] for name in nbytes}
    q_weights = sum(m["in_features"] * m["out_features"] for m in modules.values())
    q_bytes = sum(b for name, b in nbytes.items()
                  if owner[name] in modules and not name.endswith(".bias"))
    float_params = sum(numel[n] for n in nbytes if dtypes[n] in _FLOAT_DTYPES
                       and (owner[n] not in modules or n.endswith(".bias")))
    total_bytes = sum(nbytes.values())
    head = any(n == "lm_head" or n.endswith(".lm_head") for n in modules)
    return {
        "method": qc.get("method"), "bits": qc.get("bits"), "group_size": qc.get("group_size"),
        "size_bytes": sum(int(f["bytes"]) for f in meta["files"].values()),
        "float16_bytes": 2 * (q_weights + float_params),
        "quantized_layers": len(modules), "quantized_weights": q_weights,
        "bits_per_weight": 8 * q_bytes / q_weights if q_weights else None,
        "bits_per_parameter": (8 * total_bytes / (q_weights + float_params)
                               if q_weights + float_params else None),
        "float_parameters": float_params,
        "bits_histogram": dict(sorted(Counter(int(m["bits"]) for m in modules.values())
                                      .items())),
        "head_quantized": head,
        "losses": loss_summary(meta.get("layer_losses") or {}),
        "finetune": list(qc.get("finetune") or []),
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def format_summary(s: dict) -> list[str]:
    """The lines ``kvant quantize`` and ``kvant inspect`` print for :func:`checkpoint_summary`."""
    from kvant.eval.table import group_label

    hist = ", ".join(f"{b}-bit: {n}" for b, n in s["bits_histogram"].items()) or "none"
    bpw = f"{s['bits_per_weight']:.3f}" if s["bits_per_weight"] is not None else "-"
    bpp = f"{s['bits_per_parameter']:.3f}" if s["bits_per_parameter"] is not None else "-"
    n_all = s["quantized_weights"] + s["float_parameters"]
    head = "" if s["head_quantized"] else ", lm_head among them: --quantize-head quantizes it"
    lines = [
        f"method {s['method']}, {s['bits']}-bit, group {group_label(s['group_size'])}: "
        f"{s['quantized_layers']} quantized layers ({hist})",
        f"size {_mb(s['size_bytes'])} on disk (the model in 16-bit floats: "
        f"{_mb(s['float16_bytes'])})",
        f"bits/weight {bpw} over the quantized layers; {bpp} over all {n_all:,} parameters "
        f"({s['float_parameters']:,} kept in float{head})",
    ]
    for st in s.get("finetune", []):
        c = st["config"]
        what = f"{c['steps']} steps a block" if st["stage"] == "block" else \
            f"{st['tokens']:,} tokens, calibration KL {st['calib_kl_before']:.4g} -> " \
            f"{st['calib_kl_after']:.4g}"
        lines.append(f"fine-tuned after rounding ({st['stage']}): {', '.join(c['params'])}, "
                     f"{what}")
    loss = s["losses"]
    if loss is None:
        lines.append("layer loss: not recorded in this checkpoint")
    else:
        lines.append(f"layer loss (the method's error proxy), {loss['layers']} layers: "
                     f"median {loss['median']:.4g}; worst five:")
        lines += [f"  {v:10.4g}  {n}" for n, v in loss["worst"]]
    return lines
