"""Trust no file: checksums of a kvant checkpoint and value checks of its quantized layers.

At save, :func:`seal` computes the ``integrity`` entry of config.json: the SHA-256 of every
tensor (its dtype, shape and raw bytes), of every extra file (the tokenizer) and of the rest
of config.json itself (canonical JSON), so a changed byte of a shard, an edited header or an
edited ``bits``/``method``/``dtype`` is found on load. SHA-256 rather than a CRC because it
runs at disk speed here (hashlib uses the CPU's SHA instructions) and anyone can check it.

Independently of the checksums (older checkpoints have none, and ``verify=False`` skips
them), :func:`check_layer` checks the values of every quantized layer: no set padding bits
in packed words (for 2/4/8 bits every other bit pattern is a valid code), finite scales and
statistics, ``g_idx`` within ``[0, n_groups)``, a permutation that is one, CSR outliers inside
the matrix, QuIP factors that are orthogonal. Each failure is one :class:`CheckpointError`
line naming the tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from kvant.errors import CheckpointError

HASH = "sha256"


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of ``t``'s dtype, shape and raw bytes (hex). A header edit that reinterprets
    the same bytes (float16 read as bfloat16, a reshape) changes it too."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # hashlib drops the GIL here
    return h.hexdigest()


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """name -> :func:`tensor_digest`, hashed on a few threads."""
    names = list(tensors)
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(names, pool.map(lambda n: tensor_digest(tensors[n]), names)))


def _canonical(meta: dict) -> bytes:
    rest = {k: v for k, v in meta.items() if k != "integrity"}
    # through JSON and back first: what is hashed at save is exactly what a reader parses
    # (tuples become lists, int dict keys become strings, which changes their sort order)
    rest = json.loads(json.dumps(rest))
    return json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()


def config_digest(meta: dict) -> str:
    """SHA-256 of config.json's content except its ``integrity`` entry."""
    return hashlib.sha256(_canonical(meta)).hexdigest()


def seal(meta: dict, tensors: dict[str, torch.Tensor], extra_files: dict[str, bytes],
         digests: dict[str, str] | None = None) -> dict:
    """The ``integrity`` entry of ``meta`` (whose ``files`` already lists the shards).
    ``digests``: tensor checksums computed earlier (a streaming writer hashes each block as
    it writes it), merged with those of ``tensors``."""
    return {"hash": HASH, "config": config_digest(meta),
            "tensors": dict(sorted({**(digests or {}), **tensor_digests(tensors)}.items())),
            "files": {name: hashlib.sha256(data).hexdigest()
                      for name, data in sorted(extra_files.items())}}


def check_config(meta: dict, where: str) -> None:
    """Refuse a config.json edited after kvant wrote it (a no-op for checkpoints without
    checksums)."""
    integ = meta.get("integrity")
    if integ is None:
        return
    if not isinstance(integ, dict) or integ.get("hash") != HASH:
        raise CheckpointError(f"{where}: unknown integrity entry (hash "
                              f"{integ.get('hash') if isinstance(integ, dict) else integ!r})")
    if integ.get("config") != config_digest(meta):
        raise CheckpointError(f"{where}/config.json was edited after kvant wrote it (its "
                              "checksum does not match), so its metadata cannot be trusted; "
                              "load with verify=False (CLI: --no-verify) to accept it anyway")


def check_tensors(state: dict[str, torch.Tensor], meta: dict, where: str) -> None:
    """Compare every stored tensor with its recorded checksum (checkpoints with checksums)."""
    integ = meta.get("integrity")
    if integ is None:
        return
    recorded = integ.get("tensors") or {}
    unlisted = sorted(set(state) - set(recorded))
    if unlisted:
        raise CheckpointError(f"{where}: tensor {unlisted[0]!r} has no recorded checksum")
    got = tensor_digests({n: state[n] for n in sorted(state)})
    for name in sorted(state):
        if got[name] != recorded[name]:
            raise CheckpointError(f"{where}: tensor {name!r} is corrupted or was altered "
                                  f"(its {HASH} does not match the one recorded at save)")


def check_files(read, meta: dict, where: str) -> None:
    """Compare the extra files (tokenizer) with their checksums; ``read(name)`` -> bytes."""
    integ = meta.get("integrity")
    for name, digest in ((integ or {}).get("files") or {}).items():
        try:
            data = read(name)
        except OSError:
            raise CheckpointError(f"{where}: file {name!r} is missing") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"{where}: file {name!r} is corrupted or was altered "
                                  f"(its {HASH} does not match)")


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of a float tensor is finite (a sum first: a NaN or Inf anywhere
    makes it non-finite, and summing runs several times faster than ``isfinite``)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if math.isfinite(float(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())  # the sum may overflow for huge finite values


def _padding_clear(words: torch.Tensor, n_values: int, bits: int) -> bool:
    """Whether the unused high bits of the last word of each row are zero (``words``
    (..., W) int32 holding ``n_values`` values of ``bits`` bits per row)."""
    used = n_values * bits - (words.shape[-1] - 1) * 32  # bits used in the last word
    if used >= 32 or words.numel() == 0:
        return True
    last = words[..., -1].to(torch.int64) & 0xFFFFFFFF
    return bool(((last >> used) == 0).all())


def _fail(name: str, tensor: str, what: str) -> None:
    raise CheckpointError(f"layer {name!r}: {tensor} {what}; the checkpoint is corrupted")


def check_layer(name: str, m) -> None:
    """Check the values of one quantized layer (``QuantLinear`` or a subclass) whose tensors
    are loaded. Buffers are found by their names, the checkpoint contract."""
    buf = dict(m.named_buffers(recurse=False))
    if hasattr(m, "stored_problem"):  # layers with their own layout (GGUFLinear)
        problem = m.stored_problem()
        if problem:
            _fail(name, "blocks", problem)
        return
    k, n, bits = m.in_features, m.out_features, m.bits
    if not _padding_clear(buf["qweight"], k, bits):
        _fail(name, "qweight", f"has bits set beyond its {k} {bits}-bit codes")
    if buf.get("qzeros") is not None and buf.get("scales") is not None:
        g = buf["scales"].shape[1]
        if not _padding_clear(buf["qzeros"], g, bits):
            _fail(name, "qzeros", f"holds zero points beyond its {g} {bits}-bit values")
    for t in ("scales", "scale_stats", "zero_stats", "outlier_vals", "bias"):
        if buf.get(t) is not None and not all_finite(buf[t]):
            _fail(name, t, "holds NaN or Inf")
    if buf.get("input_scale") is not None:
        s = buf["input_scale"]
        if not all_finite(s) or bool((s == 0).any()):
            _fail(name, "input_scale", "holds NaN, Inf or 0 (the input is divided by it)")
    if buf.get("g_idx") is not None:
        groups = k // m.group_size if m.group_size > 0 else 1
        gi = buf["g_idx"]
        if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= groups):
            _fail(name, "g_idx", f"holds groups outside [0, {groups}): "
                                 f"[{int(gi.min())}, {int(gi.max())}]")
    _check_spqr(name, m, buf, k, n)
    _check_quip(name, buf, k, n)


def _check_spqr(name: str, m, buf: dict, k: int, n: int) -> None:
    if buf.get("scale_q") is not None:
        g = k // m.group_size if m.group_size > 0 else 1
        for t in ("scale_q", "zero_q"):
            if not _padding_clear(buf[t], n * g, m.stat_bits):
                _fail(name, t, f"has bits set beyond its {n * g} {m.stat_bits}-bit values")
    perm = buf.get("perm")
    if perm is not None:
        p = perm.long()
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= k
                          or not bool((torch.bincount(p, minlength=k) == 1).all())):
            _fail(name, "perm", f"is not a permutation of the {k} input columns")
    rowptr = buf.get("outlier_rowptr")
    if rowptr is not None:
        cols, nnz = buf["outlier_cols"].long(), buf["outlier_cols"].numel()
        if (int(rowptr[0]) != 0 or int(rowptr[-1]) != nnz
                or bool((rowptr[1:] < rowptr[:-1]).any())):
            _fail(name, "outlier_rowptr", f"is not a CSR row pointer for {nnz} outliers")
        if nnz and (int(cols.min()) < 0 or int(cols.max()) >= k):
            _fail(name, "outlier_cols", f"holds columns outside [0, {k})")


def _check_quip(name: str, buf: dict, k: int, n: int) -> None:
    for side, size in (("in", k), ("out", n)):
        signs = buf.get(f"sign_{side}")
        if signs is not None and size % 8 and int(signs[-1]) >> (size % 8):
            _fail(name, f"sign_{side}", f"has bits set beyond its {size} signs")
        f = buf.get(f"factor_{side}")
        if f is not None:
            eye = torch.eye(f.shape[0], dtype=torch.float64)
            if not all_finite(f) or float((f.double() @ f.double().T - eye).abs().max()) > 1e-3:
                _fail(name, f"factor_{side}", "is not an orthogonal matrix")
