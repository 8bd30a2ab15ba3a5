"""Result records as tables: Markdown rows, a JSON list, and the size columns of a row.

A record is a flat dict (``method``, ``bits``, ``group_size``, ``bits_per_weight``,
``size_mb``, ``ppl``, ``quant_seconds``, ...). Where a record came from (commit, device) is
the caller's business: pass ``note`` to add a per-row column for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import torch.nn as nn

from kvant.nn.qlinear import QuantLinear


def group_label(group_size: int | None) -> str:
    """-1 -> 'channel', 0 -> 'tensor', g -> 'g<g>', None -> '-'."""
    if group_size is None:
        return "-"
    return {-1: "channel", 0: "tensor"}.get(group_size, f"g{group_size}")


def model_bytes(model: nn.Module, float_bytes: int = 2) -> int:
    """Stored size: quantized buffers as stored, every other float tensor at ``float_bytes``."""
    total = 0
    quant = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            quant.update(id(t) for t in m.buffers())  # incl. the GPU layout, never stored
            for t in m.state_dict().values():  # what the checkpoint stores
                total += t.numel() * (t.element_size() if not t.is_floating_point()
                                      else min(t.element_size(), float_bytes))
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in quant or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * (float_bytes if t.is_floating_point() else t.element_size())
    return total


def quantized_bits_per_weight(model: nn.Module) -> float | None:
    """Average stored bits per quantized weight over all QuantLinear modules."""
    bits, weights = 0.0, 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            bits += 8 * m.storage_bytes()
            weights += m.in_features * m.out_features
    return bits / weights if weights else None


def markdown_table(records: list[dict], title: str = "",
                   note: tuple[str, Callable[[dict], str]] | None = None) -> str:
    """A Markdown table of records, change in perplexity against the float record.

    ``note``: (header, function of a record) adds a last column, e.g. the commit and device
    of each row when the rows do not share them."""
    base = next((r["ppl"] for r in records if r["method"] == "float"), None)
    lines = [f"## {title}", ""] if title else []
    head = ["method", "bits", "group", "bits/weight", "size MB", "ppl", "Δ ppl %", "seconds"]
    if note:
        head.append(note[0])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        delta = "" if base is None or r["method"] == "float" else \
            f"{100 * (r['ppl'] / base - 1):+.1f}"
        bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "16"
        row = (f"| {r['method']} | {r.get('bits') or 16} | {group_label(r.get('group_size'))}"
               f" | {bpw} | {r['size_mb']:.2f} | {r['ppl']:.3f} | {delta} | "
               f"{r.get('quant_seconds', 0):.1f} |")
        lines.append(row + (f" {note[1](r)} |" if note else ""))
    return "\n".join(lines) + "\n"


def write_json(records: list[dict], path: str | os.PathLike) -> None:
    """Write records as a JSON list (atomically: a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)
