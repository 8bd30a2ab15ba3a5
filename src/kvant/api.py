"""The public verbs. No algorithm logic lives here: it calls the engine and the formats."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from kvant.calib.engine import QuantReport, quantize_model
from kvant.config import EngineOptions, MethodConfig
from kvant.formats import checkpoint as ckpt
from kvant.kernels.options import KernelOptions
from kvant.model import nanogpt


def quantize(model: nn.Module, config: MethodConfig, calib: torch.Tensor | None = None,
             options: EngineOptions | None = None, *, target_bpw: float | None = None,
             mixed=None) -> QuantReport:
    """Quantize ``model`` in place. ``calib``: token ids (n_samples, seq_len) when the method
    needs calibration. Returns the per-layer :class:`QuantReport`.

    Mixed precision: ``target_bpw=3.0`` (or ``mixed=kvant.MixedConfig(target_bpw=3.0,
    widths=(2, 3, 4, 8), ...)`` for the other knobs) first measures every layer at every
    candidate width on ``calib``, then gives each layer its own width so that the stored
    bits per weight (every overhead counted) stay at or under the target with the least
    predicted loss (kvant.calib.mixed; ``config`` gives the method and its other settings).
    The chosen :class:`kvant.calib.plan.MixedPlan` is ``report.plan`` and is saved in the
    checkpoint."""
    from kvant.calib.plan import MixedConfig

    if target_bpw is not None:
        if mixed is not None:
            raise ValueError("give target_bpw or mixed (which holds a target_bpw), not both")
        mixed = MixedConfig(target_bpw=target_bpw)
    if mixed is None:
        return quantize_model(model, config, calib, options)
    if not isinstance(mixed, MixedConfig):
        raise TypeError(f"mixed must be a kvant.MixedConfig, got {type(mixed).__name__}")
    from kvant.calib.mixed import plan_mixed

    plan = plan_mixed(model, config, calib, mixed, options)
    return quantize_model(model, config, calib, options, plan=plan)


def _spec(model: nn.Module, tokenizer):
    if isinstance(model, nanogpt.GPTLanguageModel):
        if tokenizer is None:
            raise ValueError("saving a nanoGPT model needs its tokenizer (the vocabulary)")
        return "nanogpt", nanogpt.spec(model, tokenizer), {}
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):
        from kvant.model import hf
        return "hf", hf.spec(model), hf.tokenizer_files(tokenizer)
    raise ValueError(f"cannot save a {type(model).__name__}: kvant knows nanoGPT models and "
                     "Hugging Face PreTrainedModels")


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, *,
                   overwrite: bool = False, source: str | os.PathLike | None = None) -> Path:
    """Write a quantized model in kvant's format (docs/FORMAT.md), atomically and safely:
    an existing kvant output is replaced only with ``overwrite=True``; a non-empty directory
    kvant did not write, an existing file, the current directory and ``source`` (the model's
    own directory; a Hugging Face model's ``name_or_path`` is refused too) raise
    :class:`kvant.errors.OutputError`. A second run on the same output fails at once.
    Across several processes (torchrun) every rank calls it: rank 0 writes once all ranks
    have arrived, and every rank returns its path or raises its error."""
    from kvant.calib import dist as kdist

    config = getattr(model, "kvant_quantization_config", None)
    if config is None:
        raise ValueError("model has not been quantized by kvant.quantize")
    model_type, spec, files = _spec(model, tokenizer)
    qc = config.to_dict()
    qc["ignored_modules"] = list(config.ignore)
    plan = getattr(model, "kvant_mixed_plan", None)
    if plan is not None:  # per-layer widths: kvant.calib.plan.MixedPlan
        qc["mixed_plan"] = plan.to_dict()
    tuned = getattr(model, "kvant_finetune", None)
    if tuned:  # fine-tuning after rounding (kvant.tune): a record, not needed to load
        qc["finetune"] = tuned
    sources = [source, getattr(model, "name_or_path", None)]
    from kvant.formats.summary import layer_losses

    report = getattr(model, "kvant_quantization_report", None)  # set by quantize()
    losses = layer_losses(report.layers) if report is not None else None
    return kdist.on_rank0(lambda: ckpt.save_checkpoint(model, out_dir, model_type, spec, qc,
                                                       files, overwrite=overwrite,
                                                       sources=sources, layer_losses=losses),
                          "saving the checkpoint")


def export_quantized(model: nn.Module, out_dir: str | os.PathLike, fmt: str,
                     tokenizer=None, *, overwrite: bool = False,
                     source: str | os.PathLike | None = None) -> Path:
    """Write a kvant-quantized Hugging Face model in the GPTQ, AWQ or compressed-tensors
    checkpoint layout that vLLM and transformers load (``fmt`` "gptq", "awq" or
    "compressed-tensors"; kvant.formats.hf_export). ``overwrite`` and ``source`` (the kvant
    checkpoint the model came from, never replaced) as for :func:`save_quantized`."""
    from kvant.formats.hf_export import export_hf

    return export_hf(model, out_dir, fmt, tokenizer, overwrite=overwrite, source=source)


def export_gguf(model_or_checkpoint, path: str | os.PathLike, type: str | None = None,
                tokenizer=None, *, source_gguf: str | os.PathLike | None = None,
                float_type: str = "F32", embed_type: str | None = None,
                overwrite: bool = False) -> Path:
    """Write a model as one GGUF file for llama.cpp / ollama; returns its path.

    ``model_or_checkpoint``: a model quantized with ``grid="gguf:TYPE"`` (or a float
    Llama-family model), or the directory of a kvant checkpoint of one (loaded with
    :func:`load_quantized`, its tokenizer too). ``type``: the GGUF type its layers were
    rounded on ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q3_K", "Q2_K", "Q6_K"; layers whose width
    the type cannot split hold llama.cpp's fallback type); None accepts the model's own.
    The quantized layers are written block for block, so llama.cpp dequantizes exactly
    kvant's weights. ``source_gguf``: the GGUF file the model was loaded from, whose metadata
    and tokenizer are copied; without it a Hugging Face Llama model's config and
    ``tokenizer`` are mapped. ``float_type`` ("F32" or "F16"): tensors left in float;
    ``embed_type``: round the token embedding (and an untied head) to this GGUF type.
    An existing ``path`` is replaced only with ``overwrite=True``; the file is written aside
    and renamed into place. Bad input raises
    :class:`kvant.formats.gguf_export.GGUFExportError` (kvant.formats.gguf_export)."""
    from kvant.formats.gguf_export import export_gguf as write

    model = model_or_checkpoint
    if isinstance(model, (str, os.PathLike)):
        model, tok = load_quantized(model)
        tokenizer = tokenizer if tokenizer is not None else tok
    return write(model, path, type, tokenizer, source_gguf=source_gguf,
                 float_type=float_type, embed_type=embed_type, overwrite=overwrite)


def prepare_for_inference(model: nn.Module, device: str | torch.device | None = None,
                          options: KernelOptions | None = None) -> int:
    """Move ``model`` to ``device`` (if given) and get its packed layers ready to compute there,
    once (the GPU kernels' layout, as non-persistent buffers: checkpoints are unchanged).
    ``options``: :class:`kvant.kernels.KernelOptions`. Returns the number of layers the GPU
    kernels compute (0 on the CPU). ``load_quantized`` and ``.to(device)`` call it; call it
    yourself after editing packed tensors in place, and before ``torch.compile`` or CUDA-graph
    capture."""
    from kvant.nn.qlinear import prepare_for_inference as prepare

    return prepare(model, device, options)


def _model_from_meta(meta: dict, path):
    """(empty model, tokenizer) that a checkpoint's ``model_config`` describes."""
    from kvant.errors import KvantError

    try:
        if meta["model_type"] == "nanogpt":
            return nanogpt.from_spec(meta["model_config"])
        if meta["model_type"] == "hf":
            from kvant.model import hf
            return hf.from_spec(meta["model_config"], path)
    except KvantError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError,
            RuntimeError) as e:
        raise ckpt.CheckpointError(f"{path}: its model_config does not build a model "
                                   f"({type(e).__name__}: {e})") from None
    raise ckpt.CheckpointError(f"unknown model_type {meta['model_type']!r} in {path}")


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu",
                   kernel_options: KernelOptions | None = None, verify: bool = True):
    """Load a kvant checkpoint -> (model, tokenizer), on ``device`` and prepared for it
    (:func:`prepare_for_inference`, with ``kernel_options``). Needs no calibration.

    Every tensor and config.json are compared with the checksums recorded at save, and the
    quantized tensors' values are checked (kvant.formats.integrity); ``verify=False`` skips
    the checksums (not the value checks) for files you trust. Problems raise
    :class:`kvant.errors.CheckpointError`. Leftovers of a save killed mid-way next to
    ``path`` are finished first (kvant.formats.outdir.recover)."""
    from kvant.algorithms.registry import config_from_dict

    meta = ckpt.read_config(path, verify=verify)
    qc = dict(meta["quantization_config"])
    modules = qc.pop("modules")
    plan = qc.pop("mixed_plan", None)
    tuned = qc.pop("finetune", [])
    for key in ("format", "format_version", "ignored_modules"):
        qc.pop(key, None)
    try:
        config = config_from_dict(qc)
        if plan is not None:
            from kvant.calib.plan import MixedPlan

            plan = MixedPlan.from_dict(plan)
    except ValueError as e:
        raise ckpt.CheckpointError(f"{path}: quantization_config is invalid: {e}") from None
    model, tok = _model_from_meta(meta, path)
    ckpt.install_quant_shells(model, modules)
    state = ckpt.read_tensors(path, meta, verify=verify)
    ckpt.check_quant_tensors(modules, state)
    ckpt.load_state(model, state, check_finite=verify and "integrity" not in meta)
    model.kvant_quantization_config = config
    model.kvant_mixed_plan = plan
    model.kvant_finetune = tuned
    if meta["model_type"] == "hf":  # save_pretrained writes what from_pretrained loads
        from kvant.formats.hf_integration import attach
        attach(model)
    prepare_for_inference(model, device, kernel_options)
    return model.eval(), tok


def load_model(path_or_id: str | os.PathLike, dtype=None, device: str | torch.device = "cpu",
               lazy: bool = False, verify: bool = True,
               kernel_options: KernelOptions | None = None):
    """Load any model kvant knows -> (model, tokenizer).

    ``lazy=True`` (a local Hugging Face safetensors directory): the decoder blocks are not
    read now but one at a time while :func:`quantize` works (kvant.model.lazy), which needs
    less host memory than loading the whole model; it runs once every block is quantized.

    - ``"nanogpt"`` / ``"default"``: the embedded nanoGPT Shakespeare model;
    - a ``.gguf`` file: dequantized into a float Hugging Face model (float32 by default);
    - a directory whose config.json says ``quantization_config.format == "kvant"``: a kvant
      checkpoint (:func:`load_quantized`, ``verify`` and ``kernel_options`` passed on);
    - a directory whose config.json says ``model_type == "nanogpt"``: nanoGPT weights;
    - any other directory or a hub id: a Hugging Face causal LM (``dtype`` None = as stored).
    """
    import json

    from kvant.model import hf

    if str(path_or_id) not in ("nanogpt", "default"):
        ckpt.recover_leftovers(path_or_id)  # a kvant save killed mid-way: finish it first
        path_or_id = hf.local_or_hub(path_or_id)  # a missing local path: no hub lookup
    if lazy:
        from kvant.model.lazy import load_lazy

        if torch.device(device).type != "cpu":
            raise ValueError("lazy loading keeps the model on the CPU (quantize moves one "
                             "block at a time to the compute device)")
        return load_lazy(path_or_id, dtype or "auto")
    if str(path_or_id) in ("nanogpt", "default"):
        return nanogpt.load_embedded(dtype or torch.float32)
    path = Path(path_or_id)
    if path.is_file() and (path.suffix.lower() == ".gguf"):
        from kvant.model.gguf import load_gguf
        return load_gguf(path, dtype or "float32", device)
    if path.is_file():
        raise ValueError(f"{str(path)!r} is a file kvant cannot load: expected a .gguf file or "
                         "a model directory")
    cfg_file = path / "config.json"
    if path.is_dir() and cfg_file.is_file():
        try:
            meta = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
        if (meta.get("quantization_config") or {}).get("format") == ckpt.FORMAT:
            return load_quantized(path, device, kernel_options, verify=verify)
        if meta.get("model_type") == "nanogpt":
            model, tok = nanogpt.load_nanogpt_dir(path, dtype or torch.float32)
            return model.to(device), tok
    return hf.load_hf(path_or_id, dtype or "auto", device)


def _is_char_model(model: nn.Module) -> bool:
    return isinstance(model, nanogpt.GPTLanguageModel)


def calibration_for(model: nn.Module, tokenizer, source=None, n_samples: int = 128,
                    seq_len: int | None = None, seed: int = 0, calib_file=None,
                    chat_file=None):
    """Calibration token windows (n_samples, seq_len) suited to ``model``.

    ``seq_len`` None: 2048, or the model's context when shorter
    (kvant.calib.data.default_seq_len). nanoGPT: random windows of the embedded training
    text (or of ``source``, a text file). Other models:
    :func:`kvant.calib.data.calibration_data` (c4, wikitext2, files, lists).
    ``chat_file``: a JSONL file of ``{"messages": [...]}`` conversations rendered with the
    tokenizer's chat template (:func:`kvant.calib.data.chat_calibration_data`), instead of
    ``source``.
    """
    from kvant.calib.data import check_counts, resolve_seq_len
    from kvant.calib.data_char import char_windows

    check_counts(n_samples, 1 if seq_len is None else seq_len)  # 0 is not "the default"
    seq_len = resolve_seq_len(model, seq_len)
    if chat_file is not None:
        from kvant.calib.data import chat_calibration_data

        if source is not None:
            raise ValueError("give calibration text (source) or chat data (chat_file), "
                             "not both")
        return chat_calibration_data(tokenizer, chat_file, n_samples, seq_len, seed)
    if _is_char_model(model):
        text = Path(source).read_text() if source else nanogpt.training_text()
        return char_windows(tokenizer, text, n_samples, seq_len, seed)
    from kvant.calib.data import calibration_data

    return calibration_data(tokenizer, source or "c4", n_samples=n_samples, seq_len=seq_len,
                            seed=seed, calib_file=calib_file)


def evaluate(model: nn.Module, tokenizer, dataset=None, seq_len: int | None = None,
             max_windows: int | None = None, eval_file=None,
             show_progress: bool = True) -> dict:
    """Perplexity of ``model``: nanoGPT on the embedded validation text (or a text file),
    other models on WikiText-2 test with the papers' protocol (or ``dataset``).
    ``seq_len`` None: the nanoGPT context, else 2048 or the model's context if shorter.
    ``show_progress``: a tqdm bar on stderr (when it is a terminal)."""
    from kvant.errors import InputError
    from kvant.eval.perplexity import char_perplexity

    if tokenizer is None:
        raise InputError("evaluating needs the model's tokenizer, and none was given (a kvant "
                         "checkpoint saved without one has no tokenizer files): save the "
                         "checkpoint with its tokenizer")
    for name, v in (("seq_len", seq_len), ("max_windows", max_windows)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise InputError(f"{name} must be a positive int, got {v!r}")
    if _is_char_model(model):
        from kvant.calib.data import check_seq_len

        check_seq_len(model, seq_len or model.config.block_size)
        if dataset and not Path(dataset).is_file():
            raise FileNotFoundError(f"no such file or directory: eval text {str(dataset)!r}")
        text = Path(dataset).read_text() if dataset else nanogpt.validation_text()
        return char_perplexity(model, tokenizer, text, seq_len=seq_len or model.config.block_size,
                               max_windows=max_windows, show_progress=show_progress)
    from kvant.eval.perplexity import perplexity

    from kvant.calib.data import default_seq_len

    return perplexity(model, tokenizer, dataset or "wikitext2",
                      seq_len=seq_len or default_seq_len(model),
                      eval_file=eval_file, max_windows=max_windows,
                      show_progress=show_progress)
