"""The four nanoGPT tables of ``nanogpt_tables.py``: their rows, notes and summaries.

Each :class:`Table` keeps the configurations its own script had before the scripts became
one (gptq_nanogpt.py, awq_nanogpt.py, quip_nanogpt.py, spqr_nanogpt.py; see git history).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from kvant.eval.table import group_label
from kvant.nn.spqr_linear import SpQRLinear


def _grid_rows(grids: list[tuple[int, int]], methods: list[tuple[str, str]],
               skip: Callable[[str, int], bool] = lambda label, gs: False,
               grid_first: bool = False) -> list:
    """(label, full spec) for every grid x method: the method's options and ``bits=..,
    group_size=..`` (the grid first with ``grid_first``: the spec strings a table stored)."""
    rows = []
    for bits, gs in grids:
        for label, base in methods:
            if skip(label, gs):
                continue
            name, _, opts = base.partition(":")
            grid = f"bits={bits},group_size={gs}"
            items = [grid, opts] if grid_first else [opts, grid]
            rows.append((label, f"{name}:{','.join(filter(None, items))}"))
    return rows


@dataclass(frozen=True)
class Table:
    """One results table: ``rows`` run by default, ``optional`` only when named by --rows."""

    name: str  # results file stem
    title: str
    rows: list[tuple[str, str]]  # (label, spec)
    note: str  # what the methods are, after the protocol sentence
    threads: int | None  # CPU threads the table was measured with (None: torch's default)
    kl: bool = False  # score against a float reference (perplexity and KL)
    optional: list[tuple[str, str]] = field(default_factory=list)
    gain: tuple[str, str, str] | None = None  # (label prefix, against prefix, column header)
    seconds_in_cells: bool = False
    headline: bool = False  # written to results/ (else results/archive/)


GPTQ = Table(
    "gptq_nanogpt", "GPTQ vs RTN on the embedded nanoGPT",
    _grid_rows([(4, -1), (4, 128), (3, -1), (3, 128), (2, -1), (2, 128)],
               [("rtn", "rtn:"), ("gptq", "gptq:"), ("gptq-actorder", "gptq:act_order=true"),
                ("gptq-actorder-static", "gptq:act_order=true,static_groups=true")],
               # per channel there are no groups to fix: the same as act-order
               skip=lambda label, gs: label == "gptq-actorder-static" and gs == -1),
    "Asymmetric grids; GPTQ damp 0.01, block 128, true-sequential.", threads=1,
    gain=("gptq", "rtn", "GPTQ best vs RTN"), headline=True)

_AWQ_METHODS = [("rtn", "rtn:"), ("gptq", "gptq:"), ("awq", "awq:"),
                ("awq+gptq", "awq:rounding=gptq")]
_AWQ_ABLATIONS = [("awq-duo", "awq:duo_scaling=true"), ("awq-noclip", "awq:clip_search=false"),
                  ("awq+gptq-noclip", "awq:rounding=gptq,clip_search=false")]
_AWQ_GRIDS = [(4, 128), (3, 128), (2, 64)]
AWQ = Table(
    "awq_nanogpt", "AWQ and AWQ+GPTQ vs RTN and GPTQ on the embedded nanoGPT",
    _grid_rows(_AWQ_GRIDS, _AWQ_METHODS),
    "Asymmetric grids. AWQ: 20-point alpha grid, clip search (20 steps to 0.5) unless noted; "
    "GPTQ: damp 0.01, block 128, true-sequential. Cells: perplexity (quantization seconds).",
    threads=None, optional=_grid_rows(_AWQ_GRIDS, _AWQ_ABLATIONS), seconds_in_cells=True)

_QUIP_METHODS = [("quip-clip", "quip:clip=true"), ("gptq-clip", "gptq:clip=true"),
                 ("quip-clip-rescale", "quip:clip=true,rescale=true"),
                 ("rot+rtn-clip", "quip:rounding=rtn,clip=true"), ("rtn-clip", "rtn:clip=true"),
                 ("gptq", "gptq:")]
_QUIP_GRIDS = [(2, -1), (2, 64), (3, 128), (4, 128)]
QUIP = Table(
    "quip_nanogpt", "QuIP (randomized Hadamard incoherence) vs GPTQ on the embedded nanoGPT",
    _grid_rows(_QUIP_GRIDS, _QUIP_METHODS, grid_first=True),
    "Asymmetric grids; GPTQ and LDLQ: damp 0.01, block 128, true-sequential. rot+rtn = QuIP's "
    "rotation with round-to-nearest; -clip = MSE range search of each grid; -rescale = QuIP's "
    "diag(H) rescaling.", threads=1,
    optional=_grid_rows(_QUIP_GRIDS, [("quip", "quip:")], grid_first=True),
    gain=("quip", "gptq", "best QuIP vs best GPTQ"))

SPQR = Table(
    "spqr_nanogpt", "SpQR on the embedded nanoGPT",
    [("gptq", "gptq:bits=4,group_size=128"),
     ("gptq-actorder", "gptq:bits=4,group_size=128,act_order=true"),
     ("gptq", "gptq:bits=3,group_size=128"),
     ("gptq-actorder", "gptq:bits=3,group_size=128,act_order=true"),
     # SpQR at about 4.0 / 3.5 / 3.0 bits: 3-bit statistics, act-order, the outlier count set
     # by a budget (fraction of weights) chosen before the walk, so the bits are known
     ("spqr", "spqr:bits=3,group_size=16,stat_bits=3,stat_group_size=16,outlier_budget=0.007"),
     ("spqr", "spqr:bits=3,group_size=32,stat_bits=3,stat_group_size=16,outlier_budget=0.0015"),
     ("spqr", "spqr:bits=3,group_size=128,stat_bits=3,stat_group_size=64,"
              "outlier_threshold=inf,act_order=false"),
     # 2-bit dense with 3-bit statistics and 0.7% outliers (about 3.0 bits as well)
     ("spqr-w2", "spqr:bits=2,group_size=16,stat_bits=3,stat_group_size=16,"
                 "outlier_budget=0.007"),
     # 4-bit dense with quantized statistics: GPTQ W4 g128's grid for fewer bits
     ("spqr-w4", "spqr:bits=4,group_size=128,stat_bits=3,stat_group_size=64,"
                 "outlier_threshold=inf,act_order=false"),
     # the paper's relative threshold (outliers found during the column walk)
     ("spqr-threshold", "spqr:bits=3,group_size=16,stat_bits=3,stat_group_size=16,"
                        "outlier_threshold=0.2"),
     ("spqr-threshold", "spqr:bits=3,group_size=16,stat_bits=3,stat_group_size=16,"
                        "outlier_threshold=0.5"),
     ("spqr-threshold", "spqr:bits=3,group_size=64,stat_bits=3,stat_group_size=32,"
                        "outlier_threshold=2,act_order=false"),
     # the same fp16 outlier path on plain bases: GPTQ W3 g128 (fp16 scales), RTN w3 g16
     ("gptq+outliers", "spqr:bits=3,group_size=128,stat_bits=16,outlier_budget=0.01,"
                       "act_order=false"),
     ("rtn+outliers", "spqr:bits=3,group_size=16,base=rtn,outlier_budget=0.01,act_order=false"),
     # ... and on AWQ (+GPTQ rounding): AWQ's scales and clip, 1% fp16 outliers
     ("awq+gptq+outliers", "awq:bits=3,group_size=128,rounding=gptq,outlier_budget=0.01"),
     ("awq+gptq+outliers-noclip", "awq:bits=3,group_size=128,rounding=gptq,"
                                  "outlier_budget=0.01,clip_search=false"),
     ("awq+outliers", "awq:bits=3,group_size=128,outlier_budget=0.01")],
    "Bits per weight count every stored byte of the quantized Linears (packed weights, "
    "statistics, permutation, CSR outliers); KL is the mean KL divergence from the float "
    "model per scored character.", threads=None, kl=True)

TABLES = {"gptq": GPTQ, "awq": AWQ, "quip": QUIP, "spqr": SPQR}


def extras(q, report, spec: str) -> dict:
    """Record fields beyond the common ones: where AWQ put its scales, SpQR's bits split."""
    out: dict = {}
    if spec.startswith("awq"):
        out["awq_scales"] = _treatments(report)
        alphas = [g["alpha"] for b in report.blocks for g in b.get("awq", []) if "alpha" in g]
        out["awq_mean_alpha"] = sum(alphas) / max(len(alphas), 1)
    parts, weights, nnz = {}, 0, 0
    for m in q.modules():
        if isinstance(m, SpQRLinear):
            n = m.in_features * m.out_features
            for k, v in m.bits_breakdown().items():
                parts[k] = parts.get(k, 0.0) + v * n
            weights += n
            nnz += m.nnz
    if weights:
        out["bits_parts"] = {k: v / weights for k, v in parts.items()}
        out["outlier_fraction"] = nnz / weights
    return out


def _treatments(report) -> str:
    """Distinct AWQ group treatments with counts: 'fold->ln1 x6; fold->sa.heads.*.value x6'."""
    seen: dict[str, int] = {}
    for b in report.blocks:
        for g in b.get("awq", []):
            text = re.sub(r"\(\d+\)", "", g["treatment"])
            text = re.sub(r"\.\d+\.", ".*.", text)
            head, _, rest = text.partition("->")
            if rest:
                where, sep, tail = rest.partition(";")
                text = head + "->" + ",".join(dict.fromkeys(where.split(","))) + sep + tail
            seen[text] = seen.get(text, 0) + 1
    return "; ".join(f"{k} x{v}" for k, v in seen.items())


def _cell(rows: list[dict], seconds: bool) -> tuple[str, float | None]:
    """'ppl' of seed 0 (or the lowest seed), '[min–max]' over seeds when several ran."""
    if not rows:
        return "-", None
    rows = sorted(rows, key=lambda r: r.get("calib_seed", 0))
    text = f"{rows[0]['ppl']:.4f}"
    if len(rows) > 1:
        ppl = [r["ppl"] for r in rows]
        text += f" [{min(ppl):.4f}–{max(ppl):.4f}]"
    if seconds:
        text += f" ({rows[0]['quant_seconds']:.0f} s)"
    return text, rows[0]["ppl"]


def grid_summary(table: Table, records: list[dict]) -> str:
    """Perplexity grid: one row per (bits, group), one column per method label."""
    quant = [r for r in records if r["method"] != "float"]
    labels = list(dict.fromkeys(r["method"] for r in quant))
    head = ["bits", "group"] + labels + ([table.gain[2]] if table.gain else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b, g in sorted({(r["bits"], r["group_size"]) for r in quant},
                       key=lambda t: (-t[0], -t[1] if t[1] > 0 else -1e9)):
        cells = [_cell([r for r in quant if (r["method"], r["bits"], r["group_size"])
                        == (m, b, g)], table.seconds_in_cells) for m in labels]
        row = [str(b), group_label(g)] + [c[0] for c in cells]
        if table.gain:
            mine = [v for m, (_, v) in zip(labels, cells) if m.startswith(table.gain[0])
                    and v is not None]
            other = [v for m, (_, v) in zip(labels, cells) if m.startswith(table.gain[1])
                     and v is not None and not m.startswith(table.gain[0])]
            row.append(f"{100 * (min(mine) / min(other) - 1):+.1f}%" if mine and other else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def spqr_summary(records: list[dict]) -> str:
    """One row per configuration and seed, bits split into their parts, with KL."""
    base = next(r["ppl"] for r in records if r["method"] == "float")
    lines = ["| method | spec | seed | bits/weight | dense + stats + perm + outliers | "
             "outliers % | ppl | Δ ppl % | KL | quant s |", "|" + "---|" * 10]
    for r in records:
        if r["method"] == "float":
            lines.append(f"| float | - | - | 32 | - | - | {r['ppl']:.4f} | | 0 | |")
            continue
        p = r.get("bits_parts")
        parts = " + ".join(f"{p[k]:.3f}" for k in ("dense", "stats", "perm", "outliers")) \
            if p else "-"
        frac = f"{100 * r['outlier_fraction']:.2f}" if "outlier_fraction" in r else "-"
        lines.append(f"| {r['method']} | `{r['spec']}` | {r.get('calib_seed', 0)} | "
                     f"{r['bits_per_weight']:.3f} | {parts} | {frac} | {r['ppl']:.4f} | "
                     f"{100 * (r['ppl'] / base - 1):+.2f} | {r['kl']:.4f} | "
                     f"{r['quant_seconds']:.1f} |")
    return "\n".join(lines) + "\n"
