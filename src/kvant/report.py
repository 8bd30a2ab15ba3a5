"""Result records (../shared/BENCHMARKS.md) and their Markdown / JSON / PNG renderings."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from pathlib import Path

import torch
import torch.nn as nn

from kvant.nn.qlinear import QuantLinear


def device_name(device: str | torch.device | None = None) -> str:
    """Exact device name: the CUDA card's name, or ``cpu-<n>core``."""
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return f"cpu-{os.cpu_count()}core"


def git_commit() -> str:
    """Short hash of the checkout kvant runs from (``KVANT_COMMIT`` overrides it, for copies
    of the tree without .git), or 'unknown'."""
    if os.environ.get("KVANT_COMMIT"):
        return os.environ["KVANT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=5,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def today() -> str:
    """ISO date (UTC)."""
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


def model_bytes(model: nn.Module, float_bytes: int = 2) -> int:
    """Stored size: quantized buffers as stored, every other float tensor at ``float_bytes``."""
    total = 0
    quant = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            for t in m.buffers():
                if t is not None:
                    quant.add(id(t))
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


def group_label(group_size: int | None) -> str:
    """-1 -> 'channel', 0 -> 'tensor', g -> 'g<g>'."""
    if group_size is None:
        return "-"
    return {-1: "channel", 0: "tensor"}.get(group_size, f"g{group_size}")


def markdown_table(records: list[dict], title: str = "") -> str:
    """A Markdown table of records, change in perplexity against the float record."""
    base = next((r["ppl"] for r in records if r["method"] == "float"), None)
    lines = [f"## {title}", ""] if title else []
    lines += ["| method | bits | group | bits/weight | size MB | ppl | Δ ppl % | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for r in records:
        delta = "" if base is None or r["method"] == "float" else f"{100 * (r['ppl'] / base - 1):+.1f}"
        bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "16"
        lines.append(f"| {r['method']} | {r.get('bits') or 16} | {group_label(r.get('group_size'))}"
                     f" | {bpw} | {r['size_mb']:.2f} | {r['ppl']:.3f} | {delta} | "
                     f"{r.get('quant_seconds', 0):.1f} |")
    return "\n".join(lines) + "\n"


def write_json(records: list[dict], path: str | os.PathLike) -> None:
    """Write records as a JSON list (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)


def plot_ppl_vs_bits(records: list[dict], path: str | os.PathLike, title: str) -> None:
    """PNG: perplexity (log) against bits/weight, one line per method and group layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[str, list] = {}
    for r in records:
        if r["method"] == "float":
            ax.axhline(r["ppl"], color="k", ls="--", lw=1, label=f"float ({r['ppl']:.2f})")
            continue
        # SpQR's group size is one of its knobs along the bits axis: one line per method
        key = r["method"] if r["method"].startswith("spqr") else \
            f"{r['method']} {group_label(r.get('group_size'))}"
        lines.setdefault(key, []).append((r["bits_per_weight"], r["ppl"]))
    colors = plt.get_cmap("tab20").colors
    markers = "os^vDP*Xhp<>"
    for i, (key, pts) in enumerate(sorted(lines.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                color=colors[i % len(colors)], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (scales, zeros, extras counted)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
