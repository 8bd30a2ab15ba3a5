"""The report of ``kvant bench``: the Markdown table, the Pareto front, the plot.

Records are the flat dicts of :mod:`kvant.bench` (one per configuration, the float row
first; a configuration that could not run carries ``error`` instead of scores). The plot
shows the change in perplexity against the float model (%) over the stored bits per weight;
a configuration is on the Pareto front when no other one has at most its bits per weight
and at most its perplexity, one of them strictly less.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvant.eval.plot import PLOT_HINT
from kvant.eval.table import group_label


def ppl_change(record: dict, float_ppl: float) -> float:
    """Change of the record's perplexity against the float model's, in percent."""
    return 100.0 * (record["ppl"] / float_ppl - 1.0)


def pareto_front(records: list[dict]) -> list[dict]:
    """The scored quantized records no other scored record dominates in (bits per weight,
    perplexity), sorted by bits per weight."""
    pts = sorted((r for r in records if r.get("method") != "float" and "error" not in r
                  and r.get("bits_per_weight") is not None),
                 key=lambda r: (r["bits_per_weight"], r["ppl"]))
    front, best = [], float("inf")
    for r in pts:  # by increasing size: on the front when better than everything smaller
        if r["ppl"] < best:
            front.append(r)
            best = r["ppl"]
    return front


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown_report(records: list[dict], title: str) -> str:
    """The bench table in Markdown, with the settings every row shares below it."""
    base = next(r for r in records if r["method"] == "float")
    on_front = {id(r) for r in pareto_front(records)}
    head = ["method", "spec", "bits", "group", "bits/weight", "size MB", "ppl", "Δ ppl %",
            "KL", "quant s", "note"]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['method']} | `{r['spec']}` | {r.get('bits') or '-'} | "
                         f"{group_label(r.get('group_size'))} | - | - | - | - | - | - | "
                         f"could not run: {_cell(r['error'])} |")
            continue
        is_float = r["method"] == "float"
        delta = "" if is_float else f"{ppl_change(r, base['ppl']):+.2f}"
        bpw = "16" if is_float else _fmt(r.get("bits_per_weight"), ".3f")
        note = "Pareto front" if id(r) in on_front else ""
        lines.append(f"| {r['method']} | {'-' if is_float else '`' + r['spec'] + '`'} | "
                     f"{r.get('bits') or 16} | {group_label(r.get('group_size'))} | {bpw} | "
                     f"{_fmt(r.get('size_mb'), '.2f')} | {r['ppl']:.4f} | {delta} | "
                     f"{_fmt(r.get('kl'), '.4f')} | {_fmt(r.get('quant_seconds'), '.1f')} | "
                     f"{note} |")
    lines += ["", _settings_note(records, base)]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:300]


def _settings_note(records: list[dict], base: dict) -> str:
    """One paragraph: model, calibration, evaluation, code and device of the rows."""
    calib = next((r["calib"] for r in records if r.get("calib")), None)
    stamps = sorted({_stamp(r) for r in records if "error" not in r})
    dates = sorted({r["date"] for r in records if r.get("date")})
    parts = [f"Model: {base['model']} (weights fingerprint {base['model_fingerprint'][:12]}).",
             f"Eval: {json.dumps(base['eval'])}.",
             f"Calibration: {json.dumps(calib) if calib else 'none needed by these configs'}.",
             "bits/weight: stored bits per quantized weight (scales, zeros and method extras "
             "counted); size MB: every tensor as stored, float ones at 16 bits. "
             "quant s: quantization time, calibration drawn once for all rows. "
             "KL: mean KL divergence from the float model's next-token distribution.",
             ("Code and device: " if len(stamps) == 1 else "Rows come from several codes or "
              "devices: ") + "; ".join(stamps) + f". Dates: {', '.join(dates)}."]
    return " ".join(parts)


def _stamp(r: dict) -> str:
    commit = r.get("commit") or "commit unknown"
    dirty = {True: "+dirty", False: ""}.get(r.get("dirty"), "")
    return f"kvant {r.get('kvant_version', '?')} {commit}{dirty} {r.get('device', '?')}"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def plot_bench(records: list[dict], path: str | os.PathLike, title: str) -> None:
    """PNG: change in perplexity (%, symmetric log axis) against stored bits per weight, one
    line per method, the Pareto front drawn over them. Written through a temporary file.

    Raises ImportError naming the ``plot`` extra when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(PLOT_HINT) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, SymmetricalLogLocator

    base = next(r for r in records if r["method"] == "float")
    scored = [r for r in records if r["method"] != "float" and "error" not in r]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.axhline(0.0, color="k", ls="--", lw=1, label=f"float (ppl {base['ppl']:.3f})")
    by_method: dict[str, list] = {}
    for r in scored:
        by_method.setdefault(r["method"], []).append((r["bits_per_weight"],
                                                      ppl_change(r, base["ppl"])))
    markers = "os^vDP*Xhp<>"
    for i, (method, pts) in enumerate(sorted(by_method.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                ls=":", lw=1, label=method)
    front = pareto_front(records)
    if front:
        ax.step([r["bits_per_weight"] for r in front],
                [ppl_change(r, base["ppl"]) for r in front], where="post", color="crimson",
                lw=2, alpha=0.5, label="Pareto front")
        ax.scatter([r["bits_per_weight"] for r in front],
                   [ppl_change(r, base["ppl"]) for r in front], s=120, facecolors="none",
                   edgecolors="crimson", lw=1.5, zorder=3)
    # changes span from below 1 % to thousands: symmetric log (also shows a negative change)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.yaxis.set_major_locator(SymmetricalLogLocator(linthresh=1.0, base=10,
                                                     subs=[1.0, 2.0, 5.0]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("stored bits per weight (scales, zeros and extras counted)")
    ax.set_ylabel("perplexity change vs float (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)
