"""An AutoAWQ-compatible facade: scripts written for AutoAWQ run by changing one import.

    from kvant.compat.awq import AutoAWQForCausalLM      # was: from awq import ...

    model = AutoAWQForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model.quantize(tokenizer, quant_config={"zero_point": True, "q_group_size": 128,
                                            "w_bit": 4, "version": "GEMM"})
    model.save_quantized(quant_path)
    tokenizer.save_pretrained(quant_path)
    model = AutoAWQForCausalLM.from_quantized(quant_path)

Quantization runs kvant's AWQ (:class:`kvant.AWQConfig`) through kvant's engine; the output is
a kvant checkpoint (docs/FORMAT.md). Every AutoAWQ argument is supported, mapped to its kvant
equivalent, accepted and ignored (where it only tuned AutoAWQ's own memory or kernels), or
rejected with a message: the table is in docs/AUTOAWQ.md. Calibration follows AutoAWQ's
protocol: texts are tokenized one by one, texts longer than ``max_calib_seq_len`` tokens are
skipped, up to ``max_calib_samples`` texts are concatenated and cut into windows of
``max_calib_seq_len`` tokens.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from kvant.config import AWQConfig, ConfigError, EngineOptions

log = logging.getLogger(__name__)

PILEVAL = ("mit-han-lab/pile-val-backup", "validation")  # AutoAWQ's default calibration set
# AWQConfig fields a quantize() call may set directly (kvant extensions, not AutoAWQ's)
_KVANT_KEYS = ("n_grid", "clip_grid", "clip_max_shrink", "clip_tokens", "rounding",
               "damp_percent", "act_order", "block_size", "fold", "scale_unfoldable",
               "true_sequential")
_QUANT_CONFIG_KEYS = ("zero_point", "q_group_size", "w_bit", "version",
                      "modules_to_not_convert", "quant_method")


class CompatError(ValueError):
    """An AutoAWQ argument kvant does not support, with what to do instead."""


def _device_of(device_map) -> str | None:
    """AutoAWQ's ``device_map`` -> kvant's compute device (None = cuda when present)."""
    if device_map in (None, "auto", "balanced", "balanced_low_0", "sequential"):
        return None
    if isinstance(device_map, (str, torch.device)):
        return str(device_map)
    raise CompatError(f"device_map={device_map!r} is not supported: kvant keeps the model in "
                      "host memory and moves one block at a time to the GPU; pass None, 'auto' "
                      "or a device string such as 'cuda:0'")


def _reject(name: str, value, default, why: str) -> None:
    if value != default:
        raise CompatError(f"AutoAWQ argument {name}={value!r} is not supported by kvant: {why}")


def awq_config_from_autoawq(quant_config: dict | None, duo_scaling: bool = True,
                            apply_clip: bool = True, **kvant_kw) -> AWQConfig:
    """AutoAWQ's ``quant_config`` dict (+ quantize() switches) -> :class:`AWQConfig`."""
    qc = dict(quant_config or {})
    unknown = sorted(set(qc) - set(_QUANT_CONFIG_KEYS))
    if unknown:
        raise CompatError(f"unknown quant_config keys {unknown}; AutoAWQ's keys are "
                          f"{list(_QUANT_CONFIG_KEYS)}")
    if qc.get("quant_method", "awq") != "awq":
        raise CompatError(f"quant_method {qc['quant_method']!r}: only 'awq' is meaningful here")
    version = str(qc.get("version", "GEMM"))
    if version.lower() not in ("gemm", "gemv"):
        raise CompatError(f"version {version!r} is not supported: kvant stores one packed "
                          "layout and picks its kernel by device; use 'GEMM' (or 'GEMV')")
    bad = sorted(set(kvant_kw) - set(_KVANT_KEYS))
    if bad:
        raise CompatError(f"unknown quantize() arguments {bad}; kvant extensions accepted "
                          f"here: {list(_KVANT_KEYS)}")
    ignore = qc.get("modules_to_not_convert") or ()
    # AutoAWQ scales a group only where a previous op absorbs the scale (e.g. it skips o_proj
    # under grouped-query attention) and leaves the rest unscaled: the facade does the same,
    # so every layer fits the AWQ GEMM layout save_quantized writes
    kvant_kw.setdefault("scale_unfoldable", False)
    try:
        return AWQConfig(bits=qc.get("w_bit", 4), group_size=qc.get("q_group_size", 128),
                         sym=not qc.get("zero_point", True), ignore=tuple(ignore),
                         duo_scaling=duo_scaling, clip_search=apply_clip, **kvant_kw)
    except ConfigError as e:
        raise CompatError(f"quant_config {quant_config!r}: {e}") from None


def _texts(calib_data, split: str, text_column: str):
    """Calibration texts (or pre-tokenized id lists) from AutoAWQ's ``calib_data``."""
    if isinstance(calib_data, (list, tuple)):
        if not calib_data:
            raise CompatError("calib_data is an empty list")
        if all(isinstance(t, str) for t in calib_data):
            return list(calib_data)
        if all(isinstance(t, (list, tuple)) and all(isinstance(i, int) for i in t)
               for t in calib_data):
            return [list(t) for t in calib_data]
        raise CompatError("calib_data must be a list of strings or of token-id lists")
    if not isinstance(calib_data, (str, os.PathLike)):
        raise CompatError(f"calib_data of type {type(calib_data).__name__} is not supported: "
                          "pass a list of strings, a local text/.jsonl file or a hub dataset")
    path = Path(calib_data)
    if path.is_file():
        from kvant.calib.data import read_jsonl
        if path.suffix.lower() in (".jsonl", ".json"):
            return read_jsonl(path, text_column)
        return [line for line in path.read_text(encoding="utf-8").split("\n\n") if line.strip()]
    name, sp = PILEVAL if str(calib_data) == "pileval" else (str(calib_data), split)
    try:
        import datasets
    except ImportError:
        raise CompatError(f"calib_data={str(calib_data)!r} is a Hugging Face hub dataset and "
                          "needs the `datasets` package and network access; offline, pass a "
                          "list of strings or a local file instead") from None
    try:
        ds = datasets.load_dataset(name, split=sp)
    except Exception as e:  # network and hub errors come in many types
        raise CompatError(f"calib_data={str(calib_data)!r} needs the Hugging Face hub "
                          f"(dataset {name!r}, split {sp!r}) and it could not be loaded "
                          f"({type(e).__name__}); offline? pass a list of strings or a local "
                          "text/.jsonl file as calib_data") from None
    ds = ds.shuffle(seed=42)
    return [str(t) for t in ds[text_column]]


def autoawq_calibration(tokenizer, calib_data, max_calib_samples: int = 128,
                        max_calib_seq_len: int = 512, split: str = "train",
                        text_column: str = "text") -> torch.Tensor:
    """Token windows (n, max_calib_seq_len) by AutoAWQ's protocol (see module docstring)."""
    if max_calib_samples <= 0 or max_calib_seq_len <= 0:
        raise CompatError("max_calib_samples and max_calib_seq_len must be positive")
    ids: list[int] = []
    used = 0
    for item in _texts(calib_data, split, text_column):
        enc = item if isinstance(item, list) else list(tokenizer.encode(item.strip()))
        if not enc or len(enc) > max_calib_seq_len:
            continue
        ids.extend(enc)
        used += 1
        if used == max_calib_samples:
            break
    n = len(ids) // max_calib_seq_len
    if n == 0:
        raise CompatError(f"calibration data gave {len(ids)} tokens from {used} texts (texts "
                          f"longer than {max_calib_seq_len} tokens are skipped): fewer than one "
                          f"window of max_calib_seq_len={max_calib_seq_len}; pass more text or "
                          "a smaller max_calib_seq_len")
    return torch.tensor(ids[: n * max_calib_seq_len], dtype=torch.long).view(n, max_calib_seq_len)


class AWQModel(nn.Module):
    """What AutoAWQ's loaders return: ``.model`` (the Hugging Face model), ``quantize``,
    ``save_quantized``, ``generate`` and a forward that passes through to ``.model``."""

    def __init__(self, model: nn.Module, is_quantized: bool, quant_config: dict | None = None,
                 tokenizer=None):
        super().__init__()
        self.model = model
        self.is_quantized = is_quantized
        self.quant_config = dict(quant_config or {})
        self.config = getattr(model, "config", None)
        self.report = None  # kvant's QuantReport after quantize()
        self._tokenizer = tokenizer

    def forward(self, *args, **kwargs):
        """Call the wrapped model."""
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The wrapped model's ``generate`` (no gradients)."""
        with torch.inference_mode():
            return self.model.generate(*args, **kwargs)

    def to(self, *args, **kwargs):
        """Move the wrapped model; returns it (as AutoAWQ does)."""
        return self.model.to(*args, **kwargs)

    @torch.no_grad()
    def quantize(self, tokenizer=None, quant_config: dict | None = None,
                 calib_data="pileval", split: str = "train", text_column: str = "text",
                 duo_scaling: bool = True, export_compatible: bool = False,
                 apply_clip: bool = True, n_parallel_calib_samples: int | None = None,
                 max_calib_samples: int = 128, max_calib_seq_len: int = 512,
                 max_chunk_memory: int = 1024 ** 3, quantizer_cls=None, device=None,
                 **kvant_kw):
        """Quantize in place with kvant's AWQ (AutoAWQ's signature; docs/AUTOAWQ.md).

        ``device`` and the AWQConfig fields in ``kvant_kw`` (e.g. ``rounding="gptq"``) are
        kvant extensions. Returns nothing, as AutoAWQ; the report is in ``self.report``.
        """
        import kvant

        if self.is_quantized:
            raise CompatError("this model is already quantized")
        if tokenizer is None:
            raise CompatError("quantize() needs the tokenizer (its first argument)")
        _reject("export_compatible", export_compatible, False,
                "kvant always packs the weights; to keep a float model with the AWQ scales "
                "applied, use kvant's AWQ directly and skip saving")
        _reject("quantizer_cls", quantizer_cls, None,
                "kvant's AWQ is configured through AWQConfig fields, passed as keyword "
                f"arguments ({', '.join(_KVANT_KEYS)})")
        del max_chunk_memory  # AutoAWQ's chunking of its loss; kvant bounds memory per block
        config = awq_config_from_autoawq(quant_config, duo_scaling, apply_clip, **kvant_kw)
        calib = autoawq_calibration(tokenizer, calib_data, max_calib_samples,
                                    max_calib_seq_len, split, text_column)
        opts = EngineOptions(device=device, batch_size=n_parallel_calib_samples or 8,
                             show_progress=False)
        self.report = kvant.quantize(self.model, config, calib, opts)
        self.quant_config = {"zero_point": not config.sym, "q_group_size": config.group_size,
                             "w_bit": config.bits, "version": "GEMM",
                             "modules_to_not_convert": list(config.ignore) or None}
        self.is_quantized = True
        self._tokenizer = tokenizer

    def save_quantized(self, save_dir: str | os.PathLike, safetensors: bool = True,
                       shard_size: str = "5GB"):
        """Write AutoAWQ's GEMM layout (``quant_method: "awq"``, ``version: "gemm"``: what
        transformers through gptqmodel and vLLM load; kvant.formats.hf_export) with the
        tokenizer given to quantize(). Layouts it cannot hold (bits other than 4, a scale kept
        as ``input_scale`` with ``scale_unfoldable=True``) raise ExportError naming the layer:
        use ``kvant.save_quantized(model.model, dir)`` for those."""
        from kvant.formats.hf_export import export_hf

        if not self.is_quantized:
            raise CompatError("save_quantized() needs a quantized model: call quantize() first")
        if not safetensors:
            log.warning("safetensors=False ignored: the export is always safetensors")
        del shard_size
        export_hf(self.model, save_dir, "awq", self._tokenizer)

    def pack(self):
        """AutoAWQ's packing after ``export_compatible``; kvant always packs."""
        raise CompatError("pack() is not needed: kvant packs the weights during quantize()")

    @staticmethod
    def fuse_layers(model):
        """AutoAWQ's fused modules; kvant runs unfused QuantLinear layers (no-op)."""


class AutoAWQForCausalLM:
    """Entry point with AutoAWQ's class methods ``from_pretrained`` and ``from_quantized``."""

    def __init__(self):
        raise EnvironmentError("use AutoAWQForCausalLM.from_pretrained(...) or "
                               "AutoAWQForCausalLM.from_quantized(...)")

    @classmethod
    def from_pretrained(cls, model_path, torch_dtype=None, trust_remote_code: bool = True,
                        safetensors: bool = True, device_map=None, download_kwargs=None,
                        low_cpu_mem_usage: bool = True, use_cache: bool = False,
                        **model_init_kwargs) -> AWQModel:
        """Load a float Hugging Face causal LM to quantize (kvant.model.hf.load_hf).

        ``torch_dtype`` None: float16 when CUDA is present (AutoAWQ's default), else the
        stored dtype. The model stays in host memory; quantize() streams blocks to the GPU.
        """
        from kvant.model import hf

        _reject("download_kwargs", download_kwargs, None,
                "download the model first (huggingface-cli download) and pass its directory")
        if model_init_kwargs:
            raise CompatError(f"from_pretrained arguments {sorted(model_init_kwargs)} are not "
                              "supported by kvant (see docs/AUTOAWQ.md)")
        _device_of(device_map)  # validates; the model is loaded on the CPU either way
        del trust_remote_code, safetensors, low_cpu_mem_usage, use_cache
        dtype = torch_dtype or (torch.float16 if torch.cuda.is_available() else "auto")
        model, tok = hf.load_hf(model_path, dtype=dtype, device="cpu")
        return AWQModel(model, is_quantized=False, tokenizer=tok)

    @classmethod
    def from_quantized(cls, quant_path, quant_filename: str = "", max_seq_len=None,
                       trust_remote_code: bool = True, fuse_layers: bool = True,
                       use_exllama: bool = False, use_exllama_v2: bool = False,
                       use_ipex: bool = False, batch_size: int = 1, safetensors: bool = True,
                       device_map="balanced", max_memory=None, offload_folder=None,
                       download_kwargs=None, **config_kwargs) -> AWQModel:
        """Load a kvant checkpoint written by :meth:`AWQModel.save_quantized`.

        Kernel switches (fuse_layers, use_exllama*, use_ipex) are ignored: kvant picks its
        kernel by device. ``device_map`` picks the device (default: cuda when present).
        """
        import kvant

        _reject("quant_filename", quant_filename, "", "a kvant checkpoint is a directory")
        _reject("max_memory", max_memory, None, "kvant loads the whole model on one device")
        _reject("offload_folder", offload_folder, None, "kvant does not offload to disk")
        _reject("download_kwargs", download_kwargs, None,
                "download the checkpoint first and pass its directory")
        if config_kwargs:
            raise CompatError(f"from_quantized arguments {sorted(config_kwargs)} are not "
                              "supported by kvant (see docs/AUTOAWQ.md)")
        del max_seq_len, trust_remote_code, fuse_layers, use_exllama, use_exllama_v2, use_ipex
        del batch_size, safetensors
        device = _device_of(device_map) or ("cuda" if torch.cuda.is_available() else "cpu")
        from kvant.formats.checkpoint import CheckpointError, read_config

        cfg_file = Path(quant_path) / "config.json"
        qc_disk = (json.loads(cfg_file.read_text()).get("quantization_config") or {}
                   if cfg_file.is_file() else {})
        if isinstance(qc_disk, dict) and qc_disk.get("quant_method") == "awq":
            raise CompatError(f"{str(quant_path)!r} is an AWQ GEMM export (what save_quantized "
                              "writes): kvant does not read it back; load it with transformers "
                              "(needs gptqmodel and optimum) or vLLM, or keep a kvant "
                              "checkpoint too (kvant.save_quantized(model.model, dir)) and "
                              "pass that here")
        try:
            read_config(quant_path)
        except CheckpointError as e:
            raise CompatError(f"{e}. from_quantized reads checkpoints written by kvant "
                              "(save_quantized here, or kvant quantize); checkpoints written by "
                              "AutoAWQ itself are not read by this facade") from None
        model, tok = kvant.load_quantized(quant_path, device=device)
        cfg = model.kvant_quantization_config
        qc = {"zero_point": not cfg.sym, "q_group_size": cfg.group_size, "w_bit": cfg.bits,
              "version": "GEMM", "modules_to_not_convert": list(cfg.ignore) or None}
        return AWQModel(model, is_quantized=True, quant_config=qc, tokenizer=tok)
