"""GGUF export (llama.cpp, ollama): a kvant model as one ``.gguf`` file.

What is written:
- every layer quantized on a GGUF grid (``grid="gguf:TYPE"``, :class:`GGUFLinear`): its
  blocks, byte for byte, so llama.cpp dequantizes exactly kvant's weights;
- norms in F32; the token embedding, an untied output head and Linears left in float as
  ``float_type`` (F32: exact; F16: rounded to fp16), or, with ``embed_type``, the token
  embedding / untied head rounded to nearest on that GGUF type at export (llama.cpp's own
  files quantize them too; kvant did not quantize them, so they are not kvant's weights);
- metadata and tokenizer: copied from a GGUF source (``source_gguf``, every key but the
  file type), or mapped from a Llama-family Hugging Face model (its config and its
  byte-level BPE tokenizer.json). Other architectures are refused.

Tensor names are llama.cpp's (``token_embd``, ``blk.N.attn_q``, ...). llama.cpp stores the
Q and K projections with the rows of each head permuted for its rotary layout (pairs
interleaved, where Hugging Face keeps the two halves apart); the export applies that
permutation (transformers' GGUF loader undoes it), to quantized blocks as well, which stay
intact because a block never spans two rows.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from kvant.core import gguf_grid as gg
from kvant.core import gguf_mix
from kvant.core.gguf_layout import encode
from kvant.core.gguf_mix import HF_ROLES
from kvant.errors import InputError
from kvant.nn.gguf_linear import GGUFLinear
from kvant.nn.qlinear import QuantLinear

BLOCK_NAMES = {**HF_ROLES, "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}
# llama.cpp's general.file_type of the file type whose mix a kvant type follows (LlamaFileType;
# kvant.core.gguf_mix.FILE_TYPES)
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
              "Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18}
LLAMA_FAMILY = ("llama",)


class GGUFExportError(InputError):
    """The model or options cannot be written as the GGUF file asked for."""


def _head_perm(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp stores a Q/K projection in: within each head of ``hd`` rows, HF's
    row ``p*hd/2 + i`` (half p, pair i) goes to position ``2*i + p``."""
    hd = n_rows // n_head
    return torch.arange(n_rows).view(n_head, 2, hd // 2).transpose(1, 2).reshape(-1)


def _float_array(w: torch.Tensor, ftype: str):
    """(array, raw_dtype or None) of a float tensor as F32, F16 or a GGUF block type (RTN)."""
    from gguf import GGMLQuantizationType

    w = w.detach().float().cpu()
    if ftype == "F32":
        return w.numpy(), None
    if ftype == "F16":
        return w.half().numpy(), None
    t = gg.type_for_width(gg.gguf_type(ftype), w.shape[-1])
    codes, f, _ = gg.rtn_fit(w, t)
    n, k = w.shape
    nb = k // t.block
    flat = {key: v.reshape(n * nb, *v.shape[2:]) for key, v in f.items()}
    blocks = encode(t, codes.reshape(n * nb, t.block), flat).view(n, nb * t.nbytes)
    return blocks.numpy(), GGMLQuantizationType[t.name]


def _model_parts(model: nn.Module):
    """(config, decoder layers, embedding, final norm, lm_head) of a Llama-family model."""
    cfg = getattr(model, "config", None)
    arch = getattr(cfg, "model_type", type(model).__name__)
    inner = getattr(model, "model", None)
    if arch not in LLAMA_FAMILY or inner is None or not hasattr(inner, "layers"):
        raise GGUFExportError(f"GGUF export maps Llama-family models (model_type {LLAMA_FAMILY})"
                              f" to llama.cpp's tensor names; this model is {arch!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise GGUFExportError("GGUF export of Llama models with attention or MLP biases is not "
                              "supported")
    return cfg, inner.layers, inner.embed_tokens, inner.norm, getattr(model, "lm_head", None)


def collect_tensors(model: nn.Module, gguf_type: str | None, float_type: str = "F32",
                    embed_type: str | None = None) -> tuple[list, str | None]:
    """The tensors of ``model`` under llama.cpp's names: a list of (name, array, raw_dtype)
    and the main quantized type. Raises :class:`GGUFExportError` for layers the file cannot
    hold (another grid, another GGUF type)."""
    from gguf import GGMLQuantizationType

    cfg, layers, embed, norm, head = _model_parts(model)
    want = None if gguf_type is None else gg.gguf_type(gguf_type)
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    shape = gguf_mix.LlamaShape(len(layers), n_head, n_kv)
    out: list = []
    types: dict[str, int] = {}

    def allowed(name: str, k: int) -> set:
        # the type (or its fallback), or llama.cpp's type for the tensor in that file type's
        # mix, with or without an importance matrix (GPTQ / AWQ, or RTN)
        ok = {want.name, want.fallback}
        if want.name in gguf_mix.FILE_TYPES and name.startswith("blk."):
            ok |= {gguf_mix.tensor_type(want.name, name, k, shape, im) for im in (True, False)}
        return ok

    def matrix(name: str, mod: nn.Module, perm_heads: int | None, ftype: str) -> None:
        if isinstance(mod, GGUFLinear):
            if want is not None and mod.gguf_type not in allowed(name, mod.in_features):
                raise GGUFExportError(
                    f"layer for {name!r} was rounded on GGUF type {mod.gguf_type}, not "
                    f"{want.name} or llama.cpp's type for it in a {want.name} file: quantize "
                    f"with --grid gguf:{want.name} to export {want.name}")
            arr = mod.blocks.cpu()
            if perm_heads:
                arr = arr[_head_perm(arr.shape[0], perm_heads)]
            types[mod.gguf_type] = types.get(mod.gguf_type, 0) + mod.blocks.numel()
            out.append((name, arr.numpy(), GGMLQuantizationType[mod.gguf_type]))
            return
        if isinstance(mod, QuantLinear):
            raise GGUFExportError(
                f"layer for {name!r} is quantized on kvant's integer grid, which GGUF types do "
                f"not hold exactly; quantize with --grid gguf:TYPE to export GGUF")
        w = mod.weight
        if perm_heads:
            w = w[_head_perm(w.shape[0], perm_heads)]
        arr, raw = _float_array(w, ftype)
        out.append((name, arr, raw))

    etype = embed_type or float_type
    matrix("token_embd.weight", embed, None, etype)
    for i, layer in enumerate(layers):
        for hf_name, g_name in BLOCK_NAMES.items():
            mod = layer.get_submodule(hf_name)
            name = f"blk.{i}.{g_name}.weight"
            if g_name.endswith("norm"):
                out.append((name, mod.weight.detach().float().cpu().numpy(), None))
                continue
            perm = n_head if g_name == "attn_q" else n_kv if g_name == "attn_k" else None
            matrix(name, mod, perm, float_type)
    out.append(("output_norm.weight", norm.weight.detach().float().cpu().numpy(), None))
    tied = head is None or (not isinstance(head, QuantLinear)
                            and head.weight.data_ptr() == embed.weight.data_ptr())
    if not tied:
        matrix("output.weight", head, None, etype)
    # the file's type: the one asked for, else the quantizing grid's, else the type present
    # that is no other's fallback
    grid = str(getattr(getattr(model, "kvant_quantization_config", None), "grid", "int"))
    fallbacks = {gg.TYPES[t].fallback for t in types}
    main = want.name if want is not None and types else (
        grid.split(":", 1)[1] if grid.startswith("gguf:") else max(
            types, key=lambda t: (t not in fallbacks, types[t]))) if types else None
    if want is not None and main is None:
        raise GGUFExportError(f"the model has no layer rounded on a GGUF grid; quantize with "
                              f"--grid gguf:{want.name} first")
    return out, main


# keys the writer sets itself, or that describe the file rather than the model
_OWN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version",
             "general.alignment")


def _copy_metadata(writer, source: Path) -> dict:
    """Copy every key-value field of the GGUF file ``source`` but :data:`_OWN_KEYS`; returns
    its tensors' {name: shape} to check the export against."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _OWN_KEYS:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    return {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}


def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    kind = rp.get("rope_type", "default") if isinstance(rp, dict) else "default"
    kind = scaling.get("rope_type", scaling.get("type", kind)) if scaling else kind
    if kind not in ("default", None):
        raise GGUFExportError(f"rope scaling {kind!r} is not mapped to GGUF by kvant; export "
                              "from a GGUF source (source_gguf) instead")
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def _hf_metadata(writer, cfg, tokenizer) -> None:
    """llama.* hyper-parameters and the tokenizer (byte-level BPE tokenizer.json) of an HF
    Llama model."""
    from gguf import SpecialVocab
    from gguf.vocab import BpeVocab

    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(str(getattr(cfg, "_name_or_path", "") or "kvant export"))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None)
                             or cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(hd)
    if tokenizer is None:
        raise GGUFExportError("GGUF export of a Hugging Face model needs its tokenizer")
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        if not (Path(d) / "tokenizer.json").is_file():
            raise GGUFExportError("GGUF export maps only fast (tokenizer.json) BPE tokenizers")
        try:
            vocab = BpeVocab(Path(d))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise GGUFExportError(f"the tokenizer is not a byte-level BPE tokenizer GGUF can "
                                  f"describe: {e}") from None
        tokens, scores, toktypes = zip(*vocab.all_tokens())
        if len(tokens) > cfg.vocab_size:
            raise GGUFExportError(f"tokenizer has {len(tokens)} tokens, more than the model's "
                                  f"vocab_size {cfg.vocab_size}")
        pad = cfg.vocab_size - len(tokens)  # embedding rows no token uses, as llama.cpp pads
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens) + [f"[PAD{i}]".encode() for i in range(pad)])
        writer.add_token_types([int(t) for t in toktypes] + [5] * pad)  # 5: unused
        SpecialVocab(Path(d), load_merges=True, n_vocab=cfg.vocab_size).add_to_gguf(
            writer, quiet=True)


def export_gguf(model: nn.Module, out_file: str | os.PathLike, gguf_type: str | None = None,
                tokenizer=None, *, source_gguf: str | os.PathLike | None = None,
                float_type: str = "F32", embed_type: str | None = None,
                overwrite: bool = False) -> Path:
    """Write ``model`` (a kvant model quantized with ``grid="gguf:TYPE"``, or a float model)
    as the GGUF file ``out_file``; returns its path.

    gguf_type: the type the quantized layers must have (they may also hold llama.cpp's
        fallback type for widths the type cannot split); None accepts the model's own.
    source_gguf: a GGUF file the model was loaded from: its metadata and tokenizer are
        copied and its tensor names and shapes must match; otherwise a Llama-family HF
        model's config and ``tokenizer`` are mapped.
    float_type / embed_type: see the module docstring.
    overwrite: replace an existing ``out_file`` (never ``source_gguf`` itself). The file is
        written next to its destination and renamed into place, so a failed export leaves
        nothing half-written.
    """
    from gguf import GGUFWriter

    out = Path(out_file)
    for name, val in (("float_type", float_type), ("embed_type", embed_type)):
        if val is not None and val not in ("F32", "F16") and val.upper() not in gg.TYPES:
            raise GGUFExportError(f"{name} must be F32, F16 or a GGUF type, got {val!r}")
    if out.suffix != ".gguf":
        raise GGUFExportError(f"the GGUF output must be a .gguf file, got {str(out)!r}")
    if source_gguf is not None and out.resolve() == Path(source_gguf).resolve():
        raise GGUFExportError(f"refusing to overwrite the source file {str(out)!r}")
    if out.exists() and not overwrite:
        raise GGUFExportError(f"{str(out)!r} exists; pass overwrite=True (--overwrite) to "
                              "replace it")
    if out.is_dir():
        raise GGUFExportError(f"{str(out)!r} is a directory, not a .gguf file")
    if not out.parent.is_dir():
        raise GGUFExportError(f"the directory of {str(out)!r} does not exist")
    tensors, main = collect_tensors(model, gguf_type, float_type,
                                    None if embed_type is None else embed_type.upper())
    tmp = out.with_name(f".{out.name}.kvant-tmp-{os.getpid()}")
    writer = GGUFWriter(str(tmp), "llama")
    try:
        if source_gguf is not None:
            shapes = _copy_metadata(writer, Path(source_gguf))
            _check_names(tensors, shapes, source_gguf)
        else:
            _hf_metadata(writer, model.config, tokenizer)
        ftype = main or float_type
        writer.add_file_type(FILE_TYPES.get(ftype, 0))
        if main is not None:
            writer.add_quantization_version(2)
        for name, arr, raw in tensors:
            writer.add_tensor(name, np.ascontiguousarray(arr), raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return out


def _check_names(tensors: list, shapes: dict, source) -> None:
    """The export's tensor names must be the source's (shapes in GGUF order: K first)."""
    from gguf.quants import quant_shape_from_byte_shape

    names = {n for n, _, _ in tensors}
    if names != set(shapes):
        diff = sorted(names ^ set(shapes))[:4]
        raise GGUFExportError(f"the model's tensors differ from those of {str(source)!r} "
                              f"(e.g. {diff}); export without source_gguf")
    for n, arr, raw in tensors:
        shape = arr.shape if raw is None else quant_shape_from_byte_shape(arr.shape, raw)
        if tuple(reversed(shape)) != shapes[n]:
            raise GGUFExportError(f"tensor {n!r} is {tuple(reversed(shape))} here but "
                                  f"{shapes[n]} in {str(source)!r}")
