"""Perplexity against stored bits per weight as a PNG (needs the ``plot`` extra)."""

from __future__ import annotations

import os

from kvant.eval.table import group_label

PLOT_HINT = "the plot needs matplotlib: pip install kvant[plot]"


def can_plot() -> bool:
    """Whether matplotlib is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_ppl_vs_bits(records: list[dict], path: str | os.PathLike, title: str) -> None:
    """PNG: perplexity (log) against bits/weight, one line per method and group layout.

    Raises ImportError naming the ``plot`` extra when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(PLOT_HINT) from e
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
