"""Decode speed of SpQR layers (the fused kernel, kvant::spqr_linear) against plain W4 g128
QuantLinear (the W4 kernels) and fp16, issue #14 item 5.

For the Linear layers of a whole model (shapes only: the values do not change the time),
one decode step (batch 1, and batch 16) is pushed through every layer in turn, captured as
one CUDA graph and replayed (quip_overhead.py's helpers: GPU time only, no launch overhead):

- fp16: ``nn.Linear`` (cuBLAS);
- W4: QuantLinear 4-bit g128 (random codes, scales and zeros), prepared for the GPU kernels;
- SpQR: SpQRLinear 3-bit g16, stat_bits 3 in groups of 16 rows, act-order, ~1 % outliers
  (``--outliers``), from **random valid buffers** (random codes, statistic integers,
  second-level base/step, permutation and CSR outliers: not a real quantization).

Goal (issue #14): SpQR / W4 <= 1.3 at batch 1 on the Llama-2-7B shape (``ratio``). Every
layer has its own weights, so nothing is served from L2 between layers. ``bits_read``: bytes
the kernels read per step over the model's weights, in bits a weight (W4: repacked codes,
scales, zero points; SpQR: kernels.spqr.SpQRPacked.nbytes, outliers included).
``kernel_trusted``: whether every SpQR kernel key passed its selfcheck (if not, the
reference was timed: the record is then wrong and says so), ``max_rel_diff``: the first
layer's output against its reference. ``--tune`` times the launch candidates of every shape
first (KernelOptions(autotune=True), both W4 and SpQR). On the CPU (no graphs) only the
``tiny`` model makes sense: it checks the script, not the speed.

Writes ``spqr_speed.{json,md}``; records carry ``commit`` and ``dirty`` (benchmarks/record.py;
a dirty tree needs ``--allow-dirty``).

GPU (kvant not installed there)::

    PYTHONPATH=src python3 benchmarks/spqr_speed.py --out $OUT [--tune]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import record as rep  # noqa: E402  (benchmarks/record.py: device, date, commit)
from kernel_table import format_bits  # noqa: E402  (benchmarks/kernel_table.py)
from quip_overhead import MODELS, graphed, time_pass  # noqa: E402  (benchmarks/quip_overhead.py)
from kvant.eval.table import write_json  # noqa: E402
from kvant.kernels import KernelOptions, selfcheck  # noqa: E402
from kvant.nn.qlinear import QuantLinear  # noqa: E402
from kvant.nn.spqr_linear import SpQRLinear  # noqa: E402

# a small model for checking the script on the CPU: (in, [outs]) groups per block, blocks
SHAPES = dict(MODELS, tiny=([(256, [256] * 3), (256, [256]), (256, [512] * 2), (512, [256])],
                            2))
SPQR = dict(bits=3, group_size=16, stat_bits=3, stat_group_size=16, act_order=True)


def spqr_layer(k: int, n: int, outliers: float, g: torch.Generator) -> SpQRLinear:
    """A SpQRLinear (SPQR's grid) with random valid buffers, made on the current default
    device: every code and statistic integer valid, scales > 0, ``outliers`` of the weights
    (a whole number a row) in CSR."""
    per_row = round(outliers * k)
    m = SpQRLinear(k, n, nnz=n * per_row, **SPQR)
    dev = m.qweight.device
    for t in (m.qweight, m.scale_q, m.zero_q):
        t.random_(generator=g)
    for stats, base, step in ((m.scale_stats, (0.002, 0.01), (0.0, 0.001)),
                              (m.zero_stats, (0.0, 3.0), (0.0, 0.5))):
        stats[0].uniform_(*base, generator=g)
        stats[1].uniform_(*step, generator=g)
    m.perm.copy_(torch.randperm(k, generator=g, device=dev).to(m.perm.dtype))
    if per_row:
        m.outlier_rowptr.copy_(torch.arange(n + 1, device=dev, dtype=torch.int32) * per_row)
        m.outlier_cols.copy_(torch.randint(0, k, (n * per_row,), generator=g, device=dev,
                                           dtype=m.outlier_cols.dtype))
        m.outlier_vals.copy_(torch.randn(n * per_row, generator=g, device=dev) * 0.05)
    return m


def w4_layer(k: int, n: int, g: torch.Generator) -> QuantLinear:
    """QuantLinear 4-bit g128 with random codes, scales and zero points."""
    m = QuantLinear(k, n, 4, 128 if k % 128 == 0 else -1)
    for t in (m.qweight, m.qzeros):
        t.random_(generator=g)
    m.scales.uniform_(0.005, 0.02, generator=g)
    return m


def build(kind: str, model: str, batch: int, outliers: float, options: KernelOptions,
          device: torch.device) -> list:
    """[(x (batch, K) fp16, [modules])] for every input of ``model``, on ``device``."""
    groups, blocks = SHAPES[model]
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    with torch.device(device), torch.no_grad():
        for _ in range(blocks):
            for k, ns in groups:
                if kind == "fp16":
                    mods = [torch.nn.Linear(k, n, bias=False, dtype=torch.float16)
                            for n in ns]
                else:
                    mods = [spqr_layer(k, n, outliers, g) if kind == "spqr" else
                            w4_layer(k, n, g) for n in ns]
                    for m in mods:
                        m.prepare(options=options)
                out.append((torch.randn(batch, k, generator=g).half(), mods))
    return out


def read_bits(kind: str, built: list) -> float:
    """Bits the kernels read per weight over all layers (see the module docstring)."""
    nbytes = weights = 0
    for _, mods in built:
        for m in mods:
            weights += m.in_features * m.out_features
            if kind == "fp16":
                nbytes += 2 * m.in_features * m.out_features
            elif kind == "spqr":
                p = m.kernel_pack()
                nbytes += p.nbytes() if p is not None else m.storage_bytes()
            elif m.kernel_layout is not None:
                nbytes += sum(t.numel() * t.element_size() for t in (
                    m.kernel_qweight, m.kernel_scales, m.kernel_zeros))
            else:
                nbytes += m.storage_bytes()
    return 8 * nbytes / weights


def _run(built):
    def run():
        for x, mods in built:
            for m in mods:
                m(x)
    return run


def measure(model: str, batch: int, outliers: float, tune: bool, reps: int,
            device: torch.device) -> dict:
    """ms per step of fp16, W4 and SpQR layers of ``model`` at ``batch`` rows."""
    graph = device.type == "cuda"
    wrap = graphed if graph else (lambda f: f)
    options = KernelOptions(autotune=tune)
    out = {}
    for kind in ("fp16", "w4", "spqr"):
        selfcheck.forget()
        built = build(kind, model, batch, outliers, options, device)
        out[f"bits_read_{kind}"] = read_bits(kind, built)
        with torch.no_grad():
            if kind == "spqr":
                x0, m0 = built[0][0], built[0][1][0]
                ref = m0.reference_product(x0).float()
                out["max_rel_diff"] = float((m0(x0).float() - ref).norm() / ref.norm())
            out[f"ms_{kind}"] = time_pass(wrap(_run(built)), reps, device)
        if kind == "spqr":
            verdicts = [v for key, v in selfcheck._VERDICTS.items() if key[0] == "spqr"]
            out["kernel_trusted"] = bool(verdicts) and all(verdicts)
            out["spqr_kernel_layers"] = sum(m.kernel_pack() is not None
                                            for _, mods in built for m in mods)
        out["layers"] = sum(len(mods) for _, mods in built)
        built = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"model": model, "batch": batch, "ms_per_step_fp16": out["ms_fp16"],
            "ms_per_step_w4": out["ms_w4"], "ms_per_step_spqr": out["ms_spqr"],
            "ratio_spqr_w4": out["ms_spqr"] / out["ms_w4"], "goal_ratio": 1.3,
            "bits_read_fp16": out["bits_read_fp16"], "bits_read_w4": out["bits_read_w4"],
            "bits_stored_w4": format_bits(4, 128), "bits_read_spqr": out["bits_read_spqr"],
            "layers": out["layers"], "spqr_kernel_layers": out["spqr_kernel_layers"],
            "kernel_trusted": out["kernel_trusted"], "max_rel_diff": out["max_rel_diff"],
            "spqr": dict(SPQR, outliers=outliers), "weights": "random valid buffers",
            "tuned": tune, "dtype": "float16", "mode": "cuda graph" if graph else "eager"}


def write_md(records: list, path: Path) -> None:
    """The table of ``records`` (one row per model and batch)."""
    r0 = records[0]
    how = ("one CUDA graph (GPU time only), median of replays" if r0["mode"] == "cuda graph"
           else "eager on the CPU (the references: checks the script, not a speed)")
    lines = [f"## SpQR decode step vs W4 g128 and fp16, {r0['device']}", "",
             f"Every Linear layer of the model once per step, {how}. SpQR: 3-bit g16, "
             "stat_bits 3 (16-row groups), act-order, "
             f"{100 * r0['spqr']['outliers']:.0f} % outliers, **random valid buffers** (not a "
             "real quantization); W4: 4-bit g128 QuantLinear, random; fp16: nn.Linear. "
             f"Goal (issue #14): SpQR / W4 <= {r0['goal_ratio']} at batch 1 on llama2-7b. "
             f"{rep.provenance_note(records)[0]} Date {r0['date']}.", "",
             "| model | batch | linears | ms fp16 | ms W4 | ms SpQR | SpQR / W4 | bits read "
             "W4 | bits read SpQR | tuned | SpQR kernel trusted | max rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['batch']} | {r['layers']} | "
                     f"{r['ms_per_step_fp16']:.3f} | {r['ms_per_step_w4']:.3f} | "
                     f"{r['ms_per_step_spqr']:.3f} | {r['ratio_spqr_w4']:.3f} | "
                     f"{r['bits_read_w4']:.2f} | {r['bits_read_spqr']:.2f} | {r['tuned']} | "
                     f"{r['kernel_trusted']} ({r['spqr_kernel_layers']}/{r['layers']}) | "
                     f"{r['max_rel_diff']:.1e} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=["llama2-7b"], choices=sorted(SHAPES))
    p.add_argument("--batches", nargs="*", type=int, default=[1, 16])
    p.add_argument("--outliers", type=float, default=0.01)
    p.add_argument("--tune", action="store_true", help="time the launch candidates first")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--allow-dirty", action="store_true",
                   help="record from uncommitted code (records say dirty: true)")
    args = p.parse_args(argv)
    prov = rep.provenance_or_exit(args.allow_dirty)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    records = []
    for model in args.models:
        for batch in args.batches:
            r = measure(model, batch, args.outliers, args.tune, args.reps, device)
            r.update(device=rep.device_name(device), date=rep.today(), **prov)
            records.append(r)
            print(json.dumps(r), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(records, out / "spqr_speed.json")
    write_md(records, out / "spqr_speed.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
