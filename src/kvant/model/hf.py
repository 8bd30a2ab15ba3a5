"""Hugging Face causal LMs: load from a directory or hub id, and rebuild from a kvant checkpoint.

Nothing here is per-model: any architecture that ``AutoModelForCausalLM`` knows is accepted.
A kvant checkpoint stores :func:`spec` (the HF config dict and dtype) plus the tokenizer's own
files (:func:`tokenizer_files`); :func:`from_spec` builds the empty model again from them.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from kvant.errors import CheckpointError, InputError

# files one of which a directory must hold to have weights (sharded variants via their index)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model")


class ModelLoadError(InputError):
    """A model directory, architecture or tokenizer cannot be loaded."""


# "org/name" (one slash, no leading dot): what a hub id looks like
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_local(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id: it exists, starts with
    ``/``, ``.`` or ``~``, ends in ``.gguf``, or holds a path separator without being of the
    hub's ``org/name`` shape."""
    if os.path.exists(os.path.expanduser(name)):
        return True
    if name.startswith(("/", ".", "~")) or name.lower().endswith(".gguf"):
        return True
    seps = (os.sep, os.altsep) if os.altsep else (os.sep,)
    return any(sep in name for sep in seps) and not _HUB_ID.fullmatch(name)


def local_or_hub(path_or_id: str | os.PathLike) -> str:
    """``path_or_id`` with ``~`` expanded; raises FileNotFoundError ("no such file or
    directory") at once for a local-looking path that does not exist, instead of asking the
    hub for it (which takes tens of seconds offline and then reports something else)."""
    name = os.fspath(path_or_id)
    if looks_local(name):
        full = os.path.expanduser(name)
        if not os.path.exists(full):
            raise FileNotFoundError(f"no such file or directory: {name!r}")
        return full
    return name


def check_not_foreign_quantized(meta: dict, path: str | os.PathLike) -> None:
    """Refuse a directory whose config.json holds another tool's ``quantization_config``
    (e.g. kvant's own GPTQ/AWQ/compressed-tensors exports): kvant loads float models and its
    own checkpoints, and would otherwise fail deep inside transformers or, worse, treat the
    packed integers as float weights."""
    qc = meta.get("quantization_config") or {}
    qm = qc.get("quant_method") if isinstance(qc, dict) else None
    if qm is None or qm == "kvant":  # kvant's save_pretrained layout: kvant.formats.hf_integration
        return
    raise CheckpointError(
        f"{str(path)!r} is a {qm} checkpoint (config.json quantization_config.quant_method="
        f"{qm!r}), which kvant does not load: if it is a kvant export, evaluate the kvant "
        "checkpoint it came from; otherwise load it with vLLM or transformers")


def require_transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ModelLoadError("loading Hugging Face models needs `transformers`: "
                             "pip install 'kvant[hf]'") from None
    return transformers


def resolve_dtype(dtype) -> torch.dtype | str:
    """``torch.float16`` / ``"float16"`` / ``"fp16"`` / ``"auto"`` -> torch dtype or "auto"."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
             "float": "float32"}
    name = names.get(str(dtype), str(dtype)).removeprefix("torch.")
    if name not in ("float32", "float16", "bfloat16"):
        raise ModelLoadError(f"dtype must be float32, float16, bfloat16 or 'auto', got {dtype!r}")
    return getattr(torch, name)


def dtype_kwargs(dtype) -> dict:
    """``{"dtype": dtype}`` for transformers >= 4.56, ``{"torch_dtype": dtype}`` before."""
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__) >= Version("4.56")
    return {"dtype" if new else "torch_dtype": dtype}


def check_architecture(config) -> None:
    """Raise a clear error when no causal-LM class is registered for ``config.model_type``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mt = getattr(config, "model_type", None)
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        archs = getattr(config, "architectures", None)
        raise ModelLoadError(
            f"unsupported architecture: model_type {mt!r} (architectures {archs}) has no "
            "causal-LM class in transformers' AutoModelForCausalLM mapping "
            f"({len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} model types, e.g. llama, mistral, "
            "qwen2, gemma, phi3, opt, gpt_neox, gpt2); kvant needs a decoder-only causal LM")


def _check_local_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json: not a Hugging Face model "
                             "directory (nor a kvant or nanoGPT checkpoint)")
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES) or any(
        path.glob("*.safetensors"))
    if not has_weights:
        raise ModelLoadError(f"model directory {str(path)!r} has no weights: looked for "
                             f"{', '.join(WEIGHT_FILES)} or *.safetensors")


def load_tokenizer(path_or_id: str | os.PathLike, **kwargs):
    """``AutoTokenizer.from_pretrained`` with an error that says what was looked for."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path_or_id), **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"no tokenizer could be loaded from {str(path_or_id)!r}: looked for "
                             f"{', '.join(TOKENIZER_FILES)} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None


def prepare_for_calibration(model: nn.Module) -> nn.Module:
    """Eval mode, KV cache off in the config (generation keeps its own cache switch)."""
    model.eval()
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.use_cache = True  # generate() stays fast; calibration passes use_cache=False
    return model


def load_hf(path_or_id: str | os.PathLike, dtype="auto", device: str | torch.device = "cpu"):
    """Load a Hugging Face causal LM and its tokenizer -> (model, tokenizer).

    ``path_or_id``: a local directory (config.json + weights + tokenizer files) or a hub id.
    Errors before any weight is read: missing weights, an unsupported architecture, a
    tokenizer that cannot be found.
    """
    transformers = require_transformers()
    dtype = resolve_dtype(dtype)
    path = Path(path_or_id)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{str(path)!r} is a file, not a model directory "
                                 "(kvant loads .gguf files, HF/kvant/nanoGPT directories)")
        _check_local_dir(path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(path_or_id))
    except (OSError, ValueError, KeyError) as e:
        where = "" if path.exists() else " (not a local path, so it was looked up as a hub id)"
        raise ModelLoadError(f"cannot read the model config of {str(path_or_id)!r}{where}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    check_not_foreign_quantized(config.to_dict(), path_or_id)
    check_architecture(config)
    tokenizer = load_tokenizer(path_or_id)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path_or_id),
                                                              **dtype_kwargs(dtype))
    return prepare_for_calibration(model).to(device), tokenizer


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the first one found)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def spec(model: nn.Module) -> dict:
    """What a kvant checkpoint needs to rebuild ``model``: HF config dict and dtype.

    The GGUF loader's own ``quantization_config`` (how the source file was stored) is dropped:
    the rebuilt model is a plain float model into which kvant's layers are installed.
    """
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    return {"model_type": model.config.model_type, "config": cfg,
            "dtype": str(model_dtype(model)).removeprefix("torch.")}


def from_spec(spec_: dict, ckpt_dir: str | os.PathLike | None = None):
    """(empty model, tokenizer or None) from :func:`spec` output and a checkpoint directory.

    The weights are left uninitialised where ``accelerate`` is present (the checkpoint's
    tensors are assigned afterwards); buffers such as rotary frequencies are built normally.
    """
    transformers = require_transformers()
    cfg = dict(spec_["config"])
    model_type = cfg.pop("model_type", spec_.get("model_type"))
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    check_architecture(config)
    dtype = resolve_dtype(spec_.get("dtype", "float32"))
    dtype = torch.float32 if dtype == "auto" else dtype
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate is part of kvant[hf]
        import contextlib
        init_empty_weights = lambda include_buffers=False: contextlib.nullcontext()  # noqa: E731
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, **dtype_kwargs(dtype))
    tokenizer = None
    if ckpt_dir is not None and any((Path(ckpt_dir) / f).is_file() for f in TOKENIZER_FILES):
        # the model config, not the checkpoint's config.json (kvant's own, model_type "hf")
        tokenizer = load_tokenizer(ckpt_dir, config=config)
    return prepare_for_calibration(model), tokenizer


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files ``tokenizer.save_pretrained`` writes, as name -> bytes ({} for None)."""
    if tokenizer is None:
        return {}
    if not hasattr(tokenizer, "save_pretrained"):
        raise ModelLoadError(f"cannot save a {type(tokenizer).__name__} with a Hugging Face "
                             "model: it has no save_pretrained")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
