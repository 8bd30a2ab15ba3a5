"""Peak host memory of streaming quantization at several depths (issue 13).

For each ``--depths`` value a fresh process streams RTN W4 g128 (or ``--method gptq``) over
a synthetic Llama of that many blocks (``--hidden`` wide, weights generated per tensor, so
no input files and no page cache in the way) into a kvant checkpoint, and reports its peak
resident set (VmHWM, reset at start) and the RSS after each written block. The slope of the
peak between depths is the number the issue asks for (goal: <= 5 MB/block).

Writes ``stream_memory.{json,md,png}``. Usage:
``PYTHONPATH=src python3 benchmarks/stream_memory.py --depths 8,16,32 --device cpu``
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, torch, kvant
open("/proc/self/clear_refs", "w").write("5")
from kvant.calib.streaming import quantize_streaming
from kvant.model.synthetic import llama_config, load_synthetic
blocks, hidden, out, method, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
status = lambda k: int([l for l in open("/proc/self/status") if l.startswith(k)][0].split()[1]) / 1024
trace = []
cfg = llama_config(hidden=hidden, intermediate=int(hidden * 2.75), blocks=blocks,
                   heads=hidden // 128, kv_heads=max(hidden // 512, 1), vocab=32000,
                   max_positions=2048)
model = load_synthetic(cfg, seed=0, dtype=torch.bfloat16, device=device)
calib = torch.randint(0, 32000, (8, 512), generator=torch.Generator().manual_seed(0))
config = (kvant.RTNConfig(bits=4, group_size=128) if method == "rtn"
          else kvant.GPTQConfig(bits=4, group_size=128, act_order=True))
t0 = time.time()
quantize_streaming(model, config, calib if method != "rtn" else None, out, None,
                   kvant.EngineOptions(device=device, show_progress=False),
                   on_block=lambda i: trace.append(status("VmRSS")))
print(json.dumps({"blocks": blocks, "peak_cpu_gb": status("VmHWM") / 1024,
                  "rss_trace_mb": trace, "seconds": time.time() - t0}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="8,16,32")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--device-name", default="cpu-2core")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--allow-dirty", action="store_true", help="record from an uncommitted tree")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from record import provenance_or_exit

    prov = provenance_or_exit(args.allow_dirty)
    commit, dirty = prov["commit"], prov["dirty"]
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(depth), str(args.hidden),
                                   str(Path(tmp) / "q"), args.method, args.device],
                                  capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"model": f"llama-synthetic-{args.hidden}", "method": args.method,
                     "bits": 4, "group_size": 128, "device": args.device_name,
                     "date": datetime.date.today().isoformat(), "commit": commit,
                     "dirty": dirty, **row})
        print(f"{depth} blocks: peak {row['peak_cpu_gb']:.2f} GiB in {row['seconds']:.0f}s")
    d0, d1 = rows[0], rows[-1]
    slope = 1024 * (d1["peak_cpu_gb"] - d0["peak_cpu_gb"]) / (d1["blocks"] - d0["blocks"])
    for r in rows:
        r["host_slope_mb_per_block"] = slope
    out = Path(args.out)
    (out / "stream_memory.json").write_text(json.dumps(rows, indent=1))
    md = [f"# Streaming quantization: peak host memory by depth ({args.device_name}, commit "
          f"{commit}{' + uncommitted changes' if dirty else ''})", "",
          f"Synthetic Llama, d {args.hidden}, {args.method.upper()} W4 g128, one fresh "
          "process per depth (VmHWM).", "",
          "| blocks | peak host RSS (GiB) | seconds |", "|---|---|---|"]
    md += [f"| {r['blocks']} | {r['peak_cpu_gb']:.3f} | {r['seconds']:.0f} |" for r in rows]
    md += ["", f"Slope of the peak from {d0['blocks']} to {d1['blocks']} blocks: "
           f"{slope:.2f} MB/block."]
    (out / "stream_memory.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in rows:
        ax.plot(range(len(r["rss_trace_mb"])), [x / 1024 for x in r["rss_trace_mb"]],
                marker=".", label=f"{r['blocks']} blocks (peak {r['peak_cpu_gb']:.2f} GiB)")
    ax.set_xlabel("block written")
    ax.set_ylabel("host RSS (GiB)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "stream_memory.png", dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
