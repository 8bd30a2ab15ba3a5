"""GGUF files (llama.cpp): dequantize into a float Hugging Face model.

transformers' GGUF path (``from_pretrained(dir, gguf_file=name)``, needs the ``gguf`` and
``accelerate`` packages) is used because it also undoes the Q/K row permutation that
llama.cpp's converter applies for its rotary layout; reading the tensors with ``gguf`` alone
would give a model whose attention is silently wrong. The tokenizer stored inside the file is
rebuilt the same way. The float model is what kvant quantizes: a Q4_1 file's baseline is its
dequantized weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kvant.model.hf import ModelLoadError, dtype_kwargs, prepare_for_calibration, resolve_dtype

GGUF_MAGIC = b"GGUF"


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True for an existing file that starts with the GGUF magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def gguf_architecture(path: str | os.PathLike) -> str:
    """``general.architecture`` of a GGUF file (e.g. ``"llama"``)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # a truncated or corrupted header fails in many ways inside gguf
        raise ModelLoadError(f"GGUF file {str(path)!r} is truncated or corrupted: its header "
                             f"cannot be read ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"GGUF file {str(path)!r} has no general.architecture field")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _supported_architectures() -> list[str] | None:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # layout of another transformers version: let it decide
        return None
    return list(GGUF_SUPPORTED_ARCHITECTURES)


def load_gguf(path: str | os.PathLike, dtype="float32", device: str | torch.device = "cpu"):
    """Load a ``.gguf`` file -> (float model, tokenizer), both through transformers.

    dtype: the float dtype of the dequantized weights (float32 by default, as the reference
    numbers are measured in float32).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {str(p)!r} does not exist (no such file or "
                                "directory)")
    if not is_gguf_file(p):
        raise ModelLoadError(f"{str(p)!r} is not a GGUF file (no 'GGUF' magic bytes)")
    missing = [m for m in ("gguf", "accelerate", "transformers") if not _importable(m)]
    if missing:
        raise ModelLoadError(f"loading GGUF files needs the packages {missing}: "
                             "pip install 'kvant[hf]'")
    arch = gguf_architecture(p)
    supported = _supported_architectures()
    if supported is not None and arch not in supported:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} in {str(p)!r}: "
                             f"transformers' GGUF loader knows {sorted(supported)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype)
    dtype = torch.float32 if dtype == "auto" else dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"no tokenizer could be built from the GGUF file {str(p)!r}: "
                             f"{e}") from None
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                 **dtype_kwargs(dtype))
    # the weights are now plain float tensors: forget how the source file stored them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return prepare_for_calibration(model).to(device), tokenizer


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
