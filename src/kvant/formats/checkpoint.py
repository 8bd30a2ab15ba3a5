"""kvant's own checkpoint format: safetensors shards plus ``config.json`` (docs/FORMAT.md).

Writing goes through :func:`kvant.formats.outdir.replace_dir` (refuses foreign directories,
locks the output, writes aside and swaps in, so an interrupted save never loses the previous
checkpoint nor leaves a half-written one). config.json records a SHA-256 of every tensor and
of itself (:mod:`kvant.formats.integrity`).

Loading is split into small steps a loader can reuse: :func:`read_config` (recovers a
crashed save's leftovers, validates the metadata), :func:`read_tensors` (confined paths,
sizes, tensor names, checksums), :func:`install_quant_shells`, :func:`check_quant_tensors`
(shapes, dtypes and values of every quantized layer) and :func:`load_state` (the rest of
the model). Every problem is one :class:`CheckpointError` line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvant.core.result import quant_linear_class
from kvant.errors import CheckpointError
from kvant.formats import integrity, outdir
from kvant.model.discovery import set_submodule
from kvant.nn.qlinear import QuantLinear

FORMAT = "kvant"
FORMAT_VERSION = 1
MAX_SHARD_BYTES = 2 * 1024 ** 3
INDEX_NAME = "model.safetensors.index.json"
# fields a module entry shares with the top-level method config; they must agree
_SHARED_FIELDS = ("bits", "group_size", "stat_bits", "stat_group_size")

__all__ = ["CheckpointError", "save_checkpoint", "read_config", "read_tensors",
           "install_quant_shells", "check_quant_tensors", "load_state", "write_shards",
           "write_index",
           "dedupe_tensors", "verify_checkpoint", "recover_leftovers"]


def _module_entries(model: nn.Module) -> dict:
    return {name: {"kind": m.kind, **m.init_kwargs()}
            for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def dedupe_tensors(state: dict) -> tuple[dict, dict]:
    """Drop tensors that share storage with an earlier one (tied embeddings); keep aliases."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def write_shards(tensors: dict, folder: Path, max_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Save ``tensors`` (name -> CPU tensor) as ``model-0000i-of-0000n.safetensors`` files of
    at most ``max_bytes`` each (a larger single tensor gets its own file). Returns
    {file name: {"bytes": size on disk, "tensors": sorted names}}."""
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    from tqdm.auto import tqdm

    files = {}
    # a bar for checkpoints of several shards (over 2 GiB), on a terminal only (None)
    bar = tqdm(total=sum(t.numel() * t.element_size() for t in tensors.values()),
               desc="writing checkpoint", unit="B", unit_scale=True, leave=False,
               disable=None if len(shards) > 1 else True)
    with bar:
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            files[fname] = {"bytes": (folder / fname).stat().st_size, "tensors": sorted(shard)}
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    return files


def write_index(files: dict, folder: Path) -> None:
    """``model.safetensors.index.json`` (tensor -> shard) for ``files`` as
    :func:`write_shards` returns them: the map transformers reads to find tensors."""
    index = {"metadata": {"total_size": sum(info["bytes"] for info in files.values())},
             "weight_map": {t: f for f, info in sorted(files.items()) for t in info["tensors"]}}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=1, sort_keys=True))


def save_checkpoint(model: nn.Module, out_dir: str | os.PathLike, model_type: str,
                    model_config: dict, quantization_config: dict,
                    extra_files: dict[str, bytes] | None = None, *, overwrite: bool = False,
                    sources=(), layer_losses: dict | None = None) -> Path:
    """Write ``model`` (with its QuantLinear modules) to ``out_dir`` safely: an existing kvant
    output is replaced only with ``overwrite``; ``sources`` (the input model's path) and
    foreign directories are refused (:func:`kvant.formats.outdir.check_output`).
    ``layer_losses`` (name -> loss, kvant.formats.summary.layer_losses) is kept in
    config.json for ``kvant inspect``."""
    extra_files = extra_files or {}
    with outdir.replace_dir(out_dir, overwrite=overwrite, sources=sources,
                            kind="checkpoint") as tmp:
        tensors, aliases = dedupe_tensors(model.state_dict())
        files = write_shards(tensors, tmp)
        if model_type == "hf":  # how transformers finds the shards (hf_integration)
            write_index(files, tmp)
        qc = dict(quantization_config)
        qc.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                   "modules": _module_entries(model)})
        meta = {"model_type": model_type, "model_config": model_config,
                "quantization_config": qc, "files": files, "tied": aliases}
        if layer_losses:
            meta["layer_losses"] = dict(layer_losses)
        meta["integrity"] = integrity.seal(meta, tensors, extra_files)
        (tmp / "config.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        for fname, data in extra_files.items():
            (tmp / _confined(fname, "extra file")).write_bytes(data)
    return Path(out_dir)


def _confined(fname, what: str) -> str:
    """``fname`` when it is a plain file name inside the checkpoint directory, else an error
    (``../elsewhere.safetensors``, ``/etc/x``, ``sub/x`` are refused)."""
    if (not isinstance(fname, str) or not fname or fname in (".", "..") or "/" in fname
            or "\\" in fname or "\0" in fname):
        raise CheckpointError(f"{what} {fname!r} is not a plain file name inside the "
                              "checkpoint directory; refusing to read it")
    return fname


def recover_leftovers(ckpt_dir: str | os.PathLike) -> list[str]:
    """Finish what a save killed mid-way left next to ``ckpt_dir``; returns what was done."""
    return outdir.recover_for_read(ckpt_dir)


def _check_schema(meta, where: str) -> None:
    """The shape of config.json itself: wrong types and missing keys are one clear line."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{where}/config.json: {what}")

    need(isinstance(meta, dict), "not a JSON object")
    need(isinstance(meta.get("model_type"), str), "'model_type' is missing or not a string")
    need(isinstance(meta.get("model_config"), dict), "'model_config' is missing")
    qc = meta.get("quantization_config")
    need(isinstance(qc.get("modules"), dict), "'quantization_config.modules' is missing")
    plan = qc.get("mixed_plan")  # per-layer widths (kvant.calib.plan): checked against it
    planned = plan.get("layers") if isinstance(plan, dict) else None
    need(plan is None or isinstance(planned, dict), "'mixed_plan' has no 'layers'")
    for name, e in qc["modules"].items():
        need(isinstance(e, dict) and isinstance(e.get("kind"), str),
             f"module {name!r} has no 'kind'")
        own = (planned or {}).get(name)
        for field in ("bits", "group_size") if isinstance(own, dict) else ():
            need(e.get(field) == own.get(field),
                 f"module {name!r} has {field}={e.get(field)!r} but the checkpoint's "
                 f"mixed_plan says {field}={own.get(field)!r}")
        # a GGUF layer's bits and block are its own type's (llama.cpp's per-tensor mix,
        # kvant.core.gguf_mix); GGUFLinear checks them against its gguf_type
        for field in _SHARED_FIELDS if own is None and e["kind"] != "gguf" else ():
            need(field not in e or field not in qc or e[field] == qc[field],
                 f"module {name!r} has {field}={e.get(field)!r} but the checkpoint's "
                 f"quantization_config says {field}={qc.get(field)!r}")
    files = meta.get("files")
    need(isinstance(files, dict) and files, "'files' is missing or empty")
    for fname, info in files.items():
        _confined(fname, "checkpoint file")
        need(isinstance(info, dict) and isinstance(info.get("bytes"), int)
             and isinstance(info.get("tensors"), list), f"'files' entry {fname!r} is malformed")
    tied = meta.get("tied", {})
    need(isinstance(tied, dict) and all(isinstance(v, str) for v in tied.values()),
         "'tied' is malformed")


def read_config(ckpt_dir: str | os.PathLike, verify: bool = True) -> dict:
    """The parsed, validated ``config.json`` of a checkpoint (leftovers of a crashed save
    next to it are finished first). ``verify``: also refuse a config.json edited after it
    was written (its checksum); ``False`` trusts it."""
    d = Path(ckpt_dir)
    recover_leftovers(d)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {str(d)!r} does not exist")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{str(d)!r} has no config.json: not a kvant checkpoint")
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg} is not valid JSON (truncated?): {e}") from None
    qc = meta.get("quantization_config") if isinstance(meta, dict) else None
    if not isinstance(qc, dict) or qc.get("format") != FORMAT:
        fmt = qc.get("format") if isinstance(qc, dict) else None
        raise CheckpointError(f"{str(d)!r} is not a kvant-format checkpoint (format={fmt!r})")
    version = qc.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {version!r} is newer than this "
                              f"kvant reads ({FORMAT_VERSION}); upgrade kvant")
    for fname in meta.get("files") or {}:  # never read outside the checkpoint, verified or not
        _confined(fname, "checkpoint file")
    if verify:  # then: an edit is reported as one, whatever it broke
        integrity.check_config(meta, str(d))
    _check_schema(meta, str(d))
    return meta


def read_tensors(ckpt_dir: str | os.PathLike, meta: dict, verify: bool = True) -> dict:
    """All tensors of a checkpoint (aliases restored). Missing, truncated or unlisted shards
    and tensors are errors; ``verify`` also compares every tensor (and tokenizer file) with
    its checksum."""
    d = Path(ckpt_dir)
    state: dict[str, torch.Tensor] = {}
    for fname, info in meta["files"].items():
        f = d / _confined(fname, "checkpoint file")
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {str(f)!r} is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {str(f)!r} is truncated or altered: "
                                  f"{f.stat().st_size} bytes, expected {info['bytes']}")
        try:
            shard = load_file(str(f))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint file {str(f)!r} cannot be read: {e}") from None
        if sorted(shard) != sorted(info["tensors"]):
            odd = sorted(set(shard) ^ set(info["tensors"]))
            raise CheckpointError(f"checkpoint file {str(f)!r} does not hold the tensors "
                                  f"config.json lists (differs in {odd[:3]})")
        twice = set(shard) & set(state)
        if twice:
            raise CheckpointError(f"tensor {sorted(twice)[0]!r} is stored twice")
        state.update(shard)
    if verify:
        integrity.check_tensors(state, meta, str(d))
        integrity.check_files(lambda name: (d / _confined(name, "file")).read_bytes(),
                              meta, str(d))
    for name, src in meta.get("tied", {}).items():
        if src not in state or name in state:
            raise CheckpointError(f"'tied' entry {name!r} -> {src!r} does not match the "
                                  "stored tensors")
        state[name] = state[src]
    return state


def _build_shell(name: str, entry: dict) -> QuantLinear:
    """An empty layer of the entry's kind; a bad entry is a CheckpointError naming it."""
    kw = dict(entry)
    try:
        cls = quant_linear_class(kw.pop("kind"))
        return cls(**kw)
    except (TypeError, ValueError, NotImplementedError, KeyError, AttributeError,
            ZeroDivisionError) as e:
        raise CheckpointError(f"module {name!r}: its entry in config.json does not describe a "
                              f"layer kvant can build ({e})") from None


def install_quant_shells(model: nn.Module, modules: dict) -> None:
    """Replace the listed Linears of a freshly built model by empty QuantLinear modules; an
    entry that names no Linear of the model, or one of another size, is an error. Stacked
    expert parameters the checkpoint stores one layer per expert are unfused first
    (kvant.model.moe.unfuse_for_load)."""
    from kvant.model.moe import unfuse_for_load

    unfuse_for_load(model, modules)
    for name, entry in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"module {name!r} of the checkpoint is not a layer of the "
                                  "model") from None
        shell = _build_shell(name, entry)
        w = getattr(old, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or sorted(w.shape) != sorted(
                (shell.in_features, shell.out_features)):
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else None
            raise CheckpointError(f"module {name!r}: the checkpoint stores a "
                                  f"{shell.out_features}x{shell.in_features} layer where the "
                                  f"model has a {type(old).__name__} of weight shape {shape}")
        set_submodule(model, name, shell)


def _compare(expected: dict, state: dict, where: str, exact_dtype, prefix: str = "") -> None:
    """Same tensor names, shapes and dtypes (``exact_dtype(name)`` False: float-ness only);
    ``prefix`` + name is the stored name."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        odd = ([f"missing {missing[:4]}"] if missing else []) + (
            [f"unexpected {unexpected[:4]}"] if unexpected else [])
        raise CheckpointError(f"{where} does not match the stored tensors: {', '.join(odd)}")
    for key, want in expected.items():
        got = state[key]
        same_kind = got.dtype == want.dtype or (
            not exact_dtype(key) and got.is_floating_point() and want.is_floating_point())
        if tuple(got.shape) != tuple(want.shape) or not same_kind:
            raise CheckpointError(f"tensor {prefix + key!r} is {str(got.dtype)[6:]} "
                                  f"{list(got.shape)}; {where} needs "
                                  f"{str(want.dtype)[6:]} {list(want.shape)}")


def check_quant_tensors(modules: dict, state: dict) -> None:
    """Check every quantized layer's stored tensors against its entry in config.json (names,
    shapes, dtypes, the entry's ``dtype`` against the model's float tensors) and their values
    (:func:`kvant.formats.integrity.check_layer`). Needs no model."""
    owned = {key for key in state if key.rpartition(".")[0] in modules}
    float_dtypes = {str(t.dtype)[6:] for k, t in state.items()
                    if k not in owned and t.is_floating_point()}
    for name, entry in modules.items():
        with torch.device("meta"):
            shell = _build_shell(name, entry)
        dtype = shell.init_kwargs()["dtype"]
        if float_dtypes and dtype not in float_dtypes:
            raise CheckpointError(f"module {name!r} says dtype {dtype} but the model's other "
                                  f"tensors are {', '.join(sorted(float_dtypes))}")
        local = {key[len(name) + 1:]: t for key, t in state.items()
                 if key.startswith(name + ".") and key in owned}
        _compare(shell.state_dict(), local, f"layer {name!r} as config.json describes it",
                 lambda _k: True, prefix=name + ".")
        shell.load_state_dict(local, strict=True, assign=True)
        integrity.check_layer(name, shell)


def _check_finite(state: dict, quant) -> None:
    """NaN/Inf in a float tensor outside the quantized layers (``quant``: their names)."""
    for key, t in state.items():
        if key.rpartition(".")[0] not in quant and not integrity.all_finite(t):
            raise CheckpointError(f"tensor {key!r} holds NaN or Inf; the checkpoint is "
                                  "corrupted")


def load_state(model: nn.Module, state: dict, check_finite: bool = False) -> None:
    """Load ``state`` into ``model`` (its quantized shells installed): every tensor the model
    has, with its shape (and dtype for quantized layers; float tensors keep the stored float
    dtype, as saved). ``check_finite``: refuse NaN/Inf in float parameters (checkpoints
    without checksums)."""
    quant = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    _compare(model.state_dict(), state, "the model", lambda k: k.rpartition(".")[0] in quant)
    if check_finite:
        _check_finite(state, quant)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, TypeError, KeyError) as e:  # _compare should have said it first
        raise CheckpointError(f"checkpoint does not match the model: {e}") from None


def verify_checkpoint(ckpt_dir: str | os.PathLike, verify: bool = True) -> dict:
    """Check a whole checkpoint without building its model (``kvant inspect``): metadata,
    shards, checksums (unless ``verify=False``) and the quantized layers' tensors. Returns
    {"tensors": stored tensors, "layers": quantized layers, "checksums": whether checksums
    were compared}."""
    meta = read_config(ckpt_dir, verify=verify)
    state = read_tensors(ckpt_dir, meta, verify=verify)
    modules = meta["quantization_config"]["modules"]
    check_quant_tensors(modules, state)
    if verify and "integrity" not in meta:
        _check_finite(state, modules)
    return {"tensors": sum(len(i["tensors"]) for i in meta["files"].values()),
            "layers": len(modules), "checksums": verify and "integrity" in meta}
