"""Perplexity against stored bits per weight as a PNG (needs the ``plot`` extra).

:func:`plot_ppl_vs_bits` draws perplexity itself; :func:`plot_ppl_change` draws its change
against the float model in percent on a log axis, where 3- and 4-bit methods that all sit
within a few percent of float can still be told apart (the demo's report uses it).
"""

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


def _line_key(r: dict) -> str:
    # SpQR's group size is one of its knobs along the bits axis: one line per method
    return r["method"] if r["method"].startswith("spqr") else \
        f"{r['method']} {group_label(r.get('group_size'))}"


def ppl_change_series(records: list[dict]) -> tuple[float, dict[str, list[tuple[float, float]]]]:
    """(float perplexity, {line label: [(bits per weight, change in perplexity %)]}) of
    ``records``, each line sorted by bits; the float record is the reference (ValueError
    without one). Records without bits per weight or perplexity are left out."""
    base = next((r["ppl"] for r in records if r["method"] == "float"), None)
    if not base:
        raise ValueError("plotting the change in perplexity needs the float record")
    lines: dict[str, list] = {}
    for r in records:
        if r["method"] == "float" or not r.get("bits_per_weight") or r.get("ppl") is None:
            continue
        lines.setdefault(_line_key(r), []).append(
            (r["bits_per_weight"], 100.0 * (r["ppl"] / base - 1.0)))
    return base, {k: sorted(v) for k, v in sorted(lines.items())}


def plot_ppl_change(records: list[dict], path: str | os.PathLike, title: str) -> dict:
    """PNG: change in perplexity against the float model (%) on a log axis, against stored
    bits per weight; one line per method and group layout, each with its own marker and a
    legend entry. Ticks are plain numbers (0.5, 2, 10, 200), not powers of ten. A change of
    zero or less (a method within noise of float) has no place on a log axis: then the axis
    is symmetric-log (linear within +-0.1%, log beyond), so those points are drawn, not lost.

    Returns what was drawn (for tests and captions): ``{"series", "yscale", "yticks",
    "xticks", "legend", "markers"}`` (tick labels as rendered). Raises ImportError naming
    the ``plot`` extra when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(PLOT_HINT) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    base, series = ppl_change_series(records)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10").colors
    markers = "os^vDP*Xhp<>"
    handles = []
    for i, (key, pts) in enumerate(series.items()):
        (h,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                       ms=6, color=colors[i % len(colors)], label=key)
        handles.append(h)
    values = [p[1] for pts in series.values() for p in pts]
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    if values and min(values) > 0:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:
        ax.set_yscale("symlog", linthresh=0.1)
        ax.axhline(0, color="k", ls="--", lw=1)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(plain)
    ax.set_xlabel("stored bits per weight (scales, zeros, extras counted)")
    ax.set_ylabel(f"perplexity change vs float ({base:.3f}), %")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    legend = ax.legend(fontsize=7, title="method, group", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    drawn = {"series": series, "yscale": ax.get_yscale(),
             "yticks": [t.get_text() for t in ax.get_yticklabels()],
             "xticks": [t.get_text() for t in ax.get_xticklabels()],
             "legend": [t.get_text() for t in legend.get_texts()],
             "markers": [h.get_marker() for h in handles]}
    plt.close(fig)
    return drawn


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
        lines.setdefault(_line_key(r), []).append((r["bits_per_weight"], r["ppl"]))
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


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (bits per weight, perplexity) no other point beats: none has
    at most their bits and at most their perplexity, one of the two strictly lower. Sorted
    by bits; of equal points the first is kept."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:  # cheaper points came first: only a lower ppl survives
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(points: list[tuple[float, float, str]], path: str | os.PathLike, title: str,
                float_ppl: float | None = None) -> list[int]:
    """PNG: every quantized model as a point (bits per weight, perplexity on a log axis),
    one colour per label, the Pareto front (:func:`pareto_front`) drawn as a step line
    through its points. Returns the front's indices. Raises ImportError naming the ``plot``
    extra when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(PLOT_HINT) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front([(b, p) for b, p, _ in points])
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    markers = "os^vDP*Xhp<>"
    for i, label in enumerate(sorted({lab for _, _, lab in points})):
        pts = [(b, p) for b, p, lab in points if lab == label]
        ax.scatter([b for b, _ in pts], [p for _, p in pts], marker=markers[i % len(markers)],
                   color=colors[i % len(colors)], label=label, s=28, zorder=3)
    fb = [points[i][0] for i in front]
    fp = [points[i][1] for i in front]
    ax.step(fb, fp, where="post", color="k", lw=1.2, label="Pareto front", zorder=2)
    ax.scatter(fb, fp, facecolors="none", edgecolors="k", s=90, zorder=4)
    if float_ppl is not None:
        ax.axhline(float_ppl, color="k", ls="--", lw=1, label=f"float ({float_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (scales, zeros, extras counted)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return front
