"""Quantization of a 70B-shaped Llama across several GPUs (torch.distributed; issue 20).

Run it under ``torchrun --nproc-per-node N`` (or plainly, for one process): every rank builds
the same model whose weights are generated per tensor from ``--seed`` when the engine reads a
block (kvant.model.synthetic, the lead's generator), draws the same ``--n-samples`` x
``--seq-len`` random calibration tokens, and ``kvant.quantize`` runs GPTQ W4 g128 act-order
on the first ``--blocks`` blocks with the calibration samples split across ranks and the
layers of each group solved in parallel (kvant.calib.dist). Rank 0 records seconds per
block, the projected time of all 80 blocks, and the peak GPU memory and host RSS of every
rank, and merges one record (keyed by model, device and GPU count) into
``<out>/scale_multi_gpu.{json,md}``, so runs on 1 and 2 GPUs land in one table.

The quantized blocks stay where the weights were generated (``--gen-device``, default the
compute device): in several processes nothing is streamed to disk, so on the GPU the peak
includes the blocks already done (~0.45 GB each for this shape).

GPU (one host)::

    torchrun --nproc-per-node 2 benchmarks/scale_multi_gpu.py --blocks 4
    python benchmarks/scale_multi_gpu.py --blocks 4            # the 1-GPU baseline

CPU check of the same path on a tiny shape (gloo)::

    torchrun --nproc-per-node 2 benchmarks/scale_multi_gpu.py --device cpu --shape tiny \\
        --blocks 2 --n-samples 8 --seq-len 64 --out /tmp/smg --allow-dirty
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import kvant
from kvant.calib import dist as kdist
from kvant.model.synthetic import llama_config, load_synthetic

sys.path.insert(0, str(Path(__file__).parent))
import record as rec  # noqa: E402

FULL_BLOCKS = 80  # Llama-3-70B
SHAPES = {  # name -> llama_config keywords (blocks added from --blocks)
    "70b": {},
    "tiny": {"hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 2, "vocab": 1000,
             "max_positions": 512},
}


def _rss_peak_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def measure(args) -> dict | None:
    """Quantize on every rank; rank 0 gets the record, the others None."""
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM of this process only
    gpus = kdist.world_size()
    cuda = torch.device(args.device).type == "cuda"
    cfg = llama_config(blocks=args.blocks, **SHAPES[args.shape])
    t0 = time.perf_counter()
    model = load_synthetic(cfg, seed=args.seed, dtype=torch.bfloat16,
                           device=args.gen_device or args.device)
    calib = torch.randint(0, cfg.vocab_size, (args.n_samples, args.seq_len),
                          generator=torch.Generator().manual_seed(args.seed))
    config = kvant.GPTQConfig(bits=4, group_size=128, act_order=True)
    opts = kvant.EngineOptions(device=args.device, batch_size=args.batch_size,
                               show_progress=kdist.rank() == 0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    setup = time.perf_counter() - t0
    rep = kvant.quantize(model, config, calib, opts)
    if cuda:
        torch.cuda.synchronize()
    mine = {"peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "peak_cpu_gb": _rss_peak_gb(), "seconds": rep.seconds,
            "block_seconds": [b["seconds"] for b in rep.blocks]}
    ranks = kdist.agree(True, "", "collecting the measurements", mine) if gpus > 1 else [mine]
    if kdist.rank() != 0:
        return None
    # a block is done when its slowest rank is; block 0 also pays for capturing the inputs
    per_block = [max(r["block_seconds"][i] for r in ranks) for i in range(args.blocks)]
    steady = per_block[1:] or per_block
    spb = statistics.median(steady)
    quant_s = max(r["seconds"] for r in ranks)
    return {"model": "llama3-70b-shape" if args.shape == "70b" else "llama-tiny-shape",
            "blocks": args.blocks, "full_run": False, "method": "gptq-actorder", "bits": 4,
            "group_size": 128, "sym": False, "gpus": gpus,
            "backend": torch.distributed.get_backend() if gpus > 1 else "none",
            "quant_seconds": quant_s, "setup_seconds": setup,
            "seconds_per_block": spb, "block_seconds": per_block,
            "projected_seconds_80_blocks": quant_s - sum(per_block) + spb * FULL_BLOCKS
            if args.shape == "70b" else None,
            "peak_gpu_gb": max(r["peak_gpu_gb"] for r in ranks),
            "peak_gpu_gb_per_rank": [r["peak_gpu_gb"] for r in ranks],
            "peak_cpu_gb": max(r["peak_cpu_gb"] for r in ranks),
            "peak_cpu_gb_per_rank": [r["peak_cpu_gb"] for r in ranks],
            "calib": f"{args.n_samples}x{args.seq_len} random tokens, seed {args.seed}",
            "gen_device": str(args.gen_device or args.device), "calls": 1,
            "device": rec.device_name(args.device), "date": rec.today(), **args.stamp}


def write(records: list[dict], out: Path) -> None:
    """Merge ``records`` into out/scale_multi_gpu.json (same model, device, blocks and GPU
    count replaced) and render the Markdown table with speed-ups against 1 GPU."""
    path = out / "scale_multi_gpu.json"
    old = json.loads(path.read_text()) if path.is_file() else []
    key = lambda r: (r["model"], r["device"], r["blocks"], r["gpus"])  # noqa: E731
    new = {key(r) for r in records}
    rows = sorted([r for r in old if key(r) not in new] + records, key=key)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n")
    note, per_row = rec.provenance_note(rows)
    md = ["# GPTQ W4 g128 act-order across several GPUs (torch.distributed)", "",
          f"{note} Weights generated per tensor from a seed; seconds per block: median over "
          "blocks after the first, slowest rank; projected: measured total + (80 - blocks) "
          "x seconds per block.", "",
          "| model | blocks | gpus | s / block | speed-up | projected 80 blocks, min | "
          "peak GPU GB per rank | peak host GB per rank | calib |" + (" code |" if per_row else ""),
          "|---|---|---|---|---|---|---|---|---|" + ("---|" if per_row else "")]
    base = {(r["model"], r["device"], r["blocks"]): r["seconds_per_block"]
            for r in rows if r["gpus"] == 1}
    for r in rows:
        b = base.get((r["model"], r["device"], r["blocks"]))
        speedup = f"{b / r['seconds_per_block']:.2f}x" if b else "-"
        proj = r.get("projected_seconds_80_blocks")
        gpu = ", ".join(f"{g:.1f}" for g in r["peak_gpu_gb_per_rank"])
        cpu = ", ".join(f"{g:.1f}" for g in r["peak_cpu_gb_per_rank"])
        md.append(f"| {r['model']} | {r['blocks']} | {r['gpus']} | "
                  f"{r['seconds_per_block']:.2f} | {speedup} | "
                  f"{f'{proj / 60:.1f}' if proj else '-'} | {gpu} | {cpu} | {r['calib']} |"
                  + (f" {rec.stamp(r)} |" if per_row else ""))
    (out / "scale_multi_gpu.md").write_text("\n".join(md) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=4, help="blocks quantized (of 80)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    ap.add_argument("--device", default="cuda", help="compute device (each rank: its GPU)")
    ap.add_argument("--gen-device", default=None, help="where weights are generated "
                    "(default: --device)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(rec.RESULTS))
    ap.add_argument("--allow-dirty", action="store_true",
                    help="record from uncommitted code (rows are marked dirty)")
    args = ap.parse_args(argv)
    args.stamp = rec.provenance(args.allow_dirty)
    if "WORLD_SIZE" in os.environ:  # started by torchrun (one plain process otherwise)
        kvant.init_distributed(device=args.device,
                               local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    try:
        r = measure(args)
        if r is not None:
            write([r], Path(args.out))
            print(json.dumps({k: v for k, v in r.items() if k != "block_seconds"}))
    finally:
        if kdist.active():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
