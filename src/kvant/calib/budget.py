"""Fail fast on memory: estimate what calibration will hold before any of it is allocated.

A run that needs more memory than the machine has would otherwise grow for minutes and die
in the allocator (or in the kernel's OOM killer, with no message at all). What calibration
holds at its peak, on the compute device:

- hidden states of one block: its captured inputs and the outputs that become the next
  block's inputs are alive together, 2 x n_samples x seq_len x hidden x bytes(dtype);
- the statistics of the Linears being calibrated together: a (K, K) Hessian per Linear with
  K input features (float32, or float64 when the config says ``hessian_dtype="float64"``),
  counted for every method that calibrates. With true-sequential calibration the engine
  holds one group at a time; the group is taken as the Linears of equal K (q/k/v/o, or
  gate/up), the largest such set in any block; otherwise the whole block at once;
- the largest block's weights and the intermediate tensors of one batch through it
  (its widest Linear output and one head's attention scores).

The check compares the sum with the memory free now: ``MemAvailable`` of /proc/meminfo for
the CPU, ``torch.cuda.mem_get_info`` for a GPU (under torch.distributed each GPU process
holds its share of the samples; CPU processes share one host and are counted together).
The estimate ignores small per-sample extras (attention masks, rotary tables) and counts
one head's attention scores, so it errs low: a run refused here would not have fitted, and
a run let through may still be tight.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kvant.model.hf import model_dtype
from kvant.errors import ResourceError

GB = 1024 ** 3


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` now, in bytes (None when it cannot be read)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file says kB
    except OSError:
        return None
    return None


def _hidden_size(blocks: nn.Module, model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    # else: the input width of the block's first linear layer
    from kvant.model.discovery import find_linears, linear_weight

    lins = find_linears(blocks[0])
    return linear_weight(next(iter(lins.values()))).shape[1] if lins else 0


def estimate(model: nn.Module, blocks: nn.Module, n_samples: int, seq_len: int,
             batch_size: int = 8, hessian_bytes: int = 4,
             sequential: bool = True) -> dict[str, int]:
    """Bytes calibration will hold at its peak, by part (see the module docstring).

    blocks: the decoder blocks (kvant.model.discovery.find_blocks); hessian_bytes: 4 for
    float32 statistics, 8 for float64, 0 for a method that keeps none; sequential: the
    Linears are calibrated group by group (true-sequential) rather than all at once.
    Returns {"activations", "hessians", "block", "total"}.
    """
    from kvant.model.discovery import find_linears, linear_weight

    elt = torch.tensor([], dtype=model_dtype(model)).element_size()
    hidden = _hidden_size(blocks, model)
    activations = 2 * n_samples * seq_len * hidden * elt
    hessians, block_bytes, widest = 0, 0, hidden
    for block in blocks:
        lins = find_linears(block).values()
        # shapes only: a lazily loaded block's weights on the meta device are fine here
        by_k: dict[int, int] = {}
        for m in lins:
            k = linear_weight(m).shape[1]
            by_k[k] = by_k.get(k, 0) + k * k * hessian_bytes
        h = max(by_k.values(), default=0) if sequential else sum(by_k.values())
        hessians = max(hessians, h)
        block_bytes = max(block_bytes, sum(p.numel() * p.element_size()
                                           for p in block.parameters()))
        widest = max([widest] + [linear_weight(m).shape[0] for m in lins])
    b = min(batch_size, n_samples)
    # one batch inside the block: a few tensors as wide as the widest layer, plus one
    # (b, T, T) float32 score matrix (fused attention kernels never hold every head's at
    # once; an eager all-heads implementation may need more: this stays a lower bound)
    work = 4 * b * seq_len * widest * elt + b * seq_len * seq_len * 4
    total = activations + hessians + block_bytes + work
    return {"activations": activations, "hessians": hessians, "block": block_bytes + work,
            "total": total}


def _per_rank(n_samples: int) -> int:
    """Samples one process holds when torch.distributed splits them (kvant.calib.dist)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return -(-n_samples // dist.get_world_size())
    return n_samples


def _gb(n: int) -> str:
    return f"{n / GB:.1f} GB" if n < 10 * GB else f"{n / GB:.0f} GB"


def check_memory(model: nn.Module, blocks: nn.Module, n_samples: int, seq_len: int,
                 device: torch.device | str | None = None, batch_size: int = 8,
                 hessian_bytes: int = 4, sequential: bool = True) -> dict[str, int]:
    """Raise :class:`ResourceError` with the numbers when :func:`estimate` exceeds the free
    memory of ``device`` (None: cuda when present, else cpu). Returns the estimate."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        n_samples = _per_rank(n_samples)  # each process holds its own share on its own GPU
    need = estimate(model, blocks, n_samples, seq_len, batch_size, hessian_bytes, sequential)
    free = available_bytes(device)
    if free is not None and need["total"] > free:
        where = "GPU memory free" if device.type == "cuda" else "host memory available"
        raise ResourceError(
            f"n_samples={n_samples} x seq_len={seq_len} needs ~{_gb(need['total'])} for "
            f"calibration on {device.type} (block inputs and outputs "
            f"{_gb(need['activations'])}, Hessians {_gb(need['hessians'])}, largest block "
            f"{_gb(need['block'])}); {_gb(free)} {where}: use fewer samples (--n-samples) or "
            "a shorter --seq-len")
    return need


def check_host_bytes(n_bytes: int, what: str) -> None:
    """Raise :class:`ResourceError` when ``n_bytes`` exceed the host memory available now."""
    free = available_bytes(torch.device("cpu"))
    if free is not None and n_bytes > free:
        raise ResourceError(f"{what} need ~{_gb(n_bytes)}; {_gb(free)} host memory available")


def check_calibration(model: nn.Module, blocks: nn.Module, method, calib, options) -> None:
    """What the engine checks before calibrating: the calibration tensor is token ids the
    model accepts (kvant.calib.data.check_token_ids) and its activations and statistics fit
    in the compute device's free memory (:func:`check_memory`). No-op for a method that
    needs no calibration."""
    if not method.needs_calibration:
        return
    from kvant.calib.data import check_token_ids

    if calib is None:
        return  # the engine's own "needs calibration data" error follows
    check_token_ids(model, calib)
    hdt = getattr(method.config, "hessian_dtype", "float32")
    check_memory(model, blocks, calib.shape[0], calib.shape[1], options.device,
                 options.batch_size, 8 if hdt == "float64" else 4,
                 method.config.true_sequential)
