"""Export a kvant-quantized Hugging Face model in the GPTQ, AWQ (GEMM) or compressed-tensors
(pack-quantized) checkpoint layout.

These are the layouts vLLM (``quantization="gptq"`` / ``"awq"`` / ``"compressed-tensors"``,
read from config.json) and transformers (through gptqmodel/optimum, autoawq, or the
compressed-tensors package, which also runs on the CPU) load. The export is a plain HF model
directory: ``config.json`` with a ``quantization_config``, safetensors shards with
``model.safetensors.index.json``, the tokenizer, and (GPTQ) ``quantize_config.json``.
Non-quantized tensors are written in float16. docs/FORMAT.md draws both layouts.

What kvant stores per layer (``QuantLinear``) maps onto them losslessly, with the same
dequantized weight ``(q - z) * s``:

- GPTQ: ``qweight`` int32 (K·bits/32, N), column n the little-endian bit stream of row n's
  values along K (kvant's ``qweight`` transposed); ``qzeros`` int32 (G, N·bits/32), the bit
  stream of the zero points along N; ``scales`` fp16 (G, N); ``g_idx`` int32 (K,), the group
  of every input column (act-order keeps kvant's). 2, 3, 4 and 8 bits. A symmetric grid is
  written in the historic "v1" layout (``checkpoint_format="gptq"``, the one vLLM and every
  GPTQ loader take): ``qzeros`` holds ``z - 1`` and loaders add 1. An asymmetric grid is
  written in gptqmodel's "v2" layout (``checkpoint_format="gptq_v2"``): ``qzeros`` holds z
  itself, so z = 0 is stored as is (gptqmodel refuses asymmetric v1 files it did not
  write, and vLLM refuses asymmetric GPTQ in either layout).
- AWQ GEMM: 4 bits only, ``qweight`` int32 (K, N/8), word j of row k holding the values of
  columns 8j + o for o in (0, 2, 4, 6, 1, 3, 5, 7) at bits 0, 4, ..., 28; ``qzeros`` int32
  (G, N/8) packed the same way (z itself); ``scales`` fp16 (G, N). No act-order.
- compressed-tensors ``pack-quantized`` (llm-compressor's format): ``weight_packed`` int32
  (N, ceil(K·bits/32)) is kvant's ``qweight`` itself (their codes are signed, q - 2**(bits-1),
  offset back to q for packing); ``weight_scale`` (N, G); ``weight_zero_point`` (asymmetric
  grids only) int32 (ceil(N·bits/32), G), z packed along N, as their compressor writes it and
  vLLM reads it; ``weight_shape`` (N, K). Groups must be contiguous (act-order only with the
  trivial g_idx). Float Linears are listed in ``ignore``. An asymmetric export also sets
  ``"dequantize": true``: compressed-tensors 0.20's own loader path (transformers builds the
  compressed model, then loads the files into it) creates ``weight_zero_point`` unpacked,
  (N, G), and refuses every packed asymmetric file with a size mismatch, whoever wrote it;
  with ``dequantize`` transformers decompresses each layer from the file as it loads (the
  same dense weights). vLLM 0.32 (CPU build) loads and runs such a file
(benchmarks/results/interop.md).

Layers the formats cannot express are refused with the reason (QuIP's rotations, see
:data:`QUIP_REFUSAL`; SpQR's outliers; an AWQ input scale that nothing absorbed; mixed bit
widths or group sizes; a block Linear left in float; shapes the packing does not divide).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from kvant.errors import KvantError
from kvant.formats import outdir
from kvant.formats.checkpoint import dedupe_tensors, write_shards
from kvant.formats.packing import pack, unpack
from kvant.nn.qlinear import QuantLinear

FORMATS = ("gptq", "awq", "compressed-tensors")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column (within 8) held by nibble 0, 1, ..., 7
# why a QuIP layer (y = Uᵀ Q(W̃) V x, kvant.nn.quip_linear) is refused by every layout here
QUIP_REFUSAL = (
    "QuIP layers compute Uᵀ·Q(W̃)·V·x with kvant's randomized Hadamard transforms (stored sign "
    "vectors, Kronecker factors and output order, kvant.core.hadamard). GPTQ and AWQ have no "
    "place for transforms. compressed-tensors' transform_config names a transform type whose "
    "matrix its own code rebuilds (its deterministic Hadamard construction, or one drawn from "
    "its own seeded generator), not kvant's sign vectors and factors, and transformers 5.24 "
    "does not apply a transform_config at all, so such a file would run the rotated weights "
    "unrotated (silently wrong). Use kvant.save_quantized for QuIP models")


class ExportError(KvantError):
    """The model cannot be written in the requested layout; the message says why."""


def _zeros_scales(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, G) int32, s (N, G) fp16) of a layer on the CPU, per-tensor grids broadcast."""
    n, g = m.out_features, m.scales.shape[1]
    z = unpack(m.qzeros.cpu(), m.bits, g).expand(n, g)
    return z, m.scales.cpu().to(torch.float16).expand(n, g)


def _codes(m: QuantLinear) -> torch.Tensor:
    """q (N, K) int32 of a layer, on the CPU (where the export is built)."""
    return unpack(m.qweight.cpu(), m.bits, m.in_features)


def exact_weight(m: QuantLinear) -> torch.Tensor:
    """(N, K) float32 ``(q - z) * s`` of a layer, with ``s`` the fp16 scale every export
    stores: the weight a float32 reader of the export computes, unrounded (kvant's own
    ``dequantized_weight`` rounds it to the scales' dtype)."""
    from kvant.kernels import ops

    return ops.dequantize_weight(m.qweight.cpu(), m.scales.cpu().to(torch.float16).float(),
                                 m.qzeros.cpu(), None if m.g_idx is None else m.g_idx.cpu(),
                                 m.bits, m.group_size, m.in_features).contiguous()


def _with_bias(m: QuantLinear, tensors: dict) -> dict:
    """``tensors`` plus the layer's bias in float16, when it has one."""
    if m.bias is not None:
        tensors["bias"] = m.bias.cpu().to(torch.float16)
    return tensors


def _check_layer(name: str, m: nn.Module, fmt: str) -> None:
    if getattr(m, "kind", None) == "quip":
        raise ExportError(f"{name}: {QUIP_REFUSAL}")
    if type(m) is not QuantLinear:
        raise ExportError(f"{name}: {type(m).__name__} layers ({getattr(m, 'kind', '?')}) "
                          f"carry data the {fmt.upper()} layout has no place for")
    if m.input_scale is not None:
        raise ExportError(f"{name}: an AWQ input scale that no previous operation absorbed; "
                          f"the {fmt.upper()} layout has no per-input scale")
    if fmt == "awq":
        if m.bits != 4:
            raise ExportError(f"{name}: the AWQ GEMM layout holds 4-bit weights, not {m.bits}")
        if m.g_idx is not None:
            raise ExportError(f"{name}: act-order (g_idx) has no place in the AWQ layout")
        if m.group_size <= 0:
            raise ExportError(f"{name}: the AWQ layout needs groups (group_size > 0)")
        if m.out_features % 8:
            raise ExportError(f"{name}: out_features {m.out_features} is not a multiple of 8")
    elif fmt == "compressed-tensors":
        if m.g_idx is not None and not torch.equal(
                m.g_idx.cpu().long(), torch.arange(m.in_features) // max(m.group_size, 1)):
            raise ExportError(f"{name}: act-order with regrouped columns (g_idx) has no place "
                              "in the pack-quantized layout")
    else:
        if (m.in_features * m.bits) % 32 or (m.out_features * m.bits) % 32:
            raise ExportError(f"{name}: GPTQ packing needs in_features and out_features times "
                              f"{m.bits} bits to be whole int32 words "
                              f"({m.in_features}x{m.out_features})")


def gptq_tensors(m: QuantLinear, v2: bool = False) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one layer: qweight, qzeros, scales, g_idx (and bias). ``v2``:
    gptqmodel's layout, ``qzeros`` holding z; else the v1 layout, ``qzeros`` holding z - 1."""
    q, (z, s) = _codes(m), _zeros_scales(m)
    k, gs = m.in_features, m.group_size
    if m.g_idx is not None:
        g_idx = m.g_idx.cpu().to(torch.int32)
    elif gs > 0:
        g_idx = torch.arange(k, dtype=torch.int32) // gs
    else:
        g_idx = torch.zeros(k, dtype=torch.int32)
    if not v2 and int(z.min()) < 1:
        q, z = _lift_zero_points(q, z, g_idx.long(), m.bits)
    stored = z if v2 else z - 1
    out = {"qweight": pack(q, m.bits).t().contiguous(),        # (K·bits/32, N)
           "qzeros": pack(stored.t().contiguous(), m.bits),    # (G, N·bits/32)
           "scales": s.t().contiguous(),                        # (G, N)
           "g_idx": g_idx}
    return _with_bias(m, out)


def _lift_zero_points(q: torch.Tensor, z: torch.Tensor, gi: torch.Tensor, bits: int):
    """GPTQ stores z - 1, so a group with z = 0 is shifted to z = 1 and codes q + 1: the same
    (q - z), exact when no code of the group is already 2**bits - 1 (else ExportError)."""
    n, k = q.shape
    top = torch.zeros(z.shape, dtype=q.dtype).scatter_reduce(
        1, gi.expand(n, k), q, "amax", include_self=False)  # (N, G) largest code per group
    zero = z == 0
    stuck = zero & (top == (1 << bits) - 1)
    if bool(stuck.any()):
        raise ExportError(f"{int(stuck.sum())} groups have zero point 0 and use the top code; "
                          "the GPTQ layout (it stores z - 1) cannot hold them")
    return q + zero.to(q.dtype)[:, gi], z + zero.to(z.dtype)


def _awq_pack(v: torch.Tensor) -> torch.Tensor:
    """(R, N) values in [0, 16) -> (R, N/8) int32, nibble i of word j = column 8j+AWQ_ORDER[i]:
    kvant's bit stream (formats.packing) of the columns reordered within each eight."""
    r, n = v.shape
    return pack(v.reshape(r, n // 8, 8)[:, :, list(AWQ_ORDER)].reshape(r, n), 4)


def awq_tensors(m: QuantLinear) -> dict[str, torch.Tensor]:
    """The AWQ GEMM tensors of one layer: qweight, qzeros, scales (and bias)."""
    z, s = _zeros_scales(m)
    return _with_bias(m, {"qweight": _awq_pack(_codes(m).t()),  # (K, N/8)
                          "qzeros": _awq_pack(z.t()),            # (G, N/8)
                          "scales": s.t().contiguous()})         # (G, N)


def ct_tensors(m: QuantLinear, symmetric: bool) -> dict[str, torch.Tensor]:
    """The compressed-tensors pack-quantized tensors of one layer (``weight_zero_point`` only
    for an asymmetric scheme)."""
    z, s = _zeros_scales(m)
    out = {"weight_packed": m.qweight.cpu().contiguous(),           # (N, ceil(K·b/32))
           "weight_scale": s.contiguous(),                          # (N, G)
           "weight_shape": torch.tensor([m.out_features, m.in_features])}
    if not symmetric:
        out["weight_zero_point"] = pack(z.t().contiguous(), m.bits).t().contiguous()
    return _with_bias(m, out)


def _ct_config(bits: int, group_size: int, symmetric: bool, ignore: list[str]) -> dict:
    """compressed-tensors' quantization_config for one int weight scheme on every Linear."""
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
               "strategy": "group" if group_size > 0 else "channel",
               "group_size": group_size if group_size > 0 else None, "actorder": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None,
                                          "output_activations": None,
                                          "format": "pack-quantized"}}}


def _block_linears_left_float(model: nn.Module, quantized: dict) -> list[str]:
    """Float nn.Linear modules inside the repeated blocks that hold the quantized layers
    (GPTQ/AWQ loaders expect every block Linear quantized; a head outside may stay float).
    A block list is the dotted path before the first numeric part of a layer's name."""
    lists = set()
    for name in quantized:
        parts = name.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx:
            lists.add(".".join(parts[:idx]) + ".")
    return [name for name, mod in model.named_modules()
            if type(mod) is nn.Linear and name not in quantized
            and any(name.startswith(prefix) for prefix in lists)]


def export_hf(model: nn.Module, out_dir: str | os.PathLike, fmt: str, tokenizer=None, *,
              overwrite: bool = False, source: str | os.PathLike | None = None) -> Path:
    """Write ``model`` (quantized by kvant, a transformers model) as a GPTQ, AWQ or
    compressed-tensors checkpoint directory, safely (kvant.formats.outdir: an existing kvant
    output is replaced only with ``overwrite``; ``source``, the checkpoint the model was
    loaded from, and foreign directories are refused). Raises :class:`ExportError` naming
    the first layer or setting the layout cannot express."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; known: {FORMATS}")
    sources = [source, getattr(model, "name_or_path", None)]
    outdir.check_output(out_dir, overwrite=overwrite, sources=sources)  # before any work
    try:
        from transformers import PreTrainedModel
    except ImportError as e:
        raise ExportError("GPTQ/AWQ export needs transformers (pip install kvant[hf])") from e
    hf_config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or hf_config is None:
        raise ExportError("GPTQ/AWQ export needs a Hugging Face transformers model; this one "
                          "has no config (the nanoGPT model has no architecture that vLLM or "
                          "transformers load: use kvant.save_quantized)")
    from kvant.nn.fuse import FusedSlice

    fused = [name for name, m in model.named_modules() if isinstance(m, FusedSlice)]
    if fused:
        raise ExportError(f"fused sibling layers ({fused[0]}, ...) are an inference-time "
                          "transform; export the model before kvant.nn.fuse.fuse_siblings")
    from kvant.nn.experts import ExpertStack

    stacks = [name for name, m in model.named_modules() if isinstance(m, ExpertStack)]
    if stacks:
        raise ExportError(f"stacked mixture-of-experts layers ({stacks[0]}, ...) have no place "
                          f"in the {fmt} layout kvant writes yet; save with "
                          "kvant.save_quantized (kvant format)")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ExportError("the model has no quantized layers")
    for name, m in layers.items():
        _check_layer(name, m, fmt)
    kinds = {(m.bits, m.group_size) for m in layers.values()}
    if len(kinds) > 1:
        raise ExportError(f"the {fmt.upper()} layout has one bit width and group size for the "
                          f"whole model; this one mixes {sorted(kinds)}")
    float_left = _block_linears_left_float(model, layers)
    if float_left and fmt != "compressed-tensors":  # there: listed in "ignore"
        raise ExportError(f"block Linear layers left in float ({float_left[:3]}...): "
                          f"{fmt.upper()} loaders expect every block Linear quantized")
    bits, group_size = kinds.pop()
    symmetric = _symmetric(layers.values(), bits)
    if fmt == "gptq":
        def convert(m):
            return gptq_tensors(m, v2=not symmetric)
    elif fmt == "awq":
        convert = awq_tensors
    else:
        def convert(m):
            return ct_tensors(m, symmetric)

    # tied embeddings are stored once (loaders re-tie them from the config): dedupe before
    # the float16 cast, which would make the two names separate tensors
    skip = {f"{name}.{b}" for name, m in layers.items() for b, _ in m.named_buffers()}
    kept, _aliases = dedupe_tensors({k: t for k, t in model.state_dict().items() if k not in skip})
    tensors = {key: t.to(torch.float16) if t.is_floating_point() else t
               for key, t in kept.items()}
    for name, m in layers.items():
        for b, t in convert(m).items():
            tensors[f"{name}.{b}"] = t.contiguous()

    qc = _quantization_config(fmt, model, layers, bits, group_size, symmetric)
    config = hf_config.to_dict()
    config["quantization_config"] = qc
    config["torch_dtype"] = config["dtype"] = "float16"  # transformers 4.x / 5.x names
    # vLLM picks the model class from "architectures", which a GGUF-loaded config lacks
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    with outdir.replace_dir(out_dir, overwrite=overwrite, sources=sources,
                            kind=fmt) as tmp:
        files = write_shards(tensors, tmp)
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                for t in tensors.values())},
                 "weight_map": {t: f for f, info in files.items() for t in info["tensors"]}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
        if fmt == "gptq":
            (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=1))
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def _quantization_config(fmt: str, model: nn.Module, layers: dict, bits: int,
                         group_size: int, symmetric: bool) -> dict:
    """The ``quantization_config`` of config.json that the format's loaders read."""
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits,
                "group_size": group_size if group_size > 0 else -1,
                "desc_act": any(m.g_idx is not None for m in layers.values()),
                "sym": symmetric, "checkpoint_format": "gptq" if symmetric else "gptq_v2",
                "static_groups": False, "true_sequential": True, "damp_percent": 0.01,
                "quantizer": "kvant"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": bits, "group_size": group_size,
                "zero_point": True, "version": "gemm", "modules_to_not_convert": None}
    float_linears = [n for n, mod in model.named_modules() if type(mod) is nn.Linear]
    qc = _ct_config(bits, group_size, symmetric, float_linears)
    if not symmetric:  # see the module docstring: the only path that reads packed zero points
        qc["dequantize"] = True
    return qc


def _symmetric(layers, bits: int) -> bool:
    """Whether every zero point is the grid's midpoint 2**(bits-1) (a symmetric grid)."""
    mid = 1 << (bits - 1)
    return all(bool((_zeros_scales(m)[0] == mid).all()) for m in layers)
