"""A Llama-3-70B-shaped model through kvant end to end on one GPU (issue 13).

``quantize``: streams GPTQ W4 g128 act-order over a 70B-shaped Llama (80 blocks, d 8192,
28672 intermediate, 64/8 heads, vocab 128256) whose weights are generated per tensor from a
seed when the loader asks (kvant.model.synthetic; ``--source DIR`` reads a safetensors
directory instead), 128 x 2048 random calibration tokens, into a kvant checkpoint. A call
stops cleanly when its ``--budget`` seconds would be exceeded by the next block, or dies by
SIGKILL after block ``--kill-after`` (the hard resume test); running the same command again
resumes from the progress record. Each call appends one line to ``<out>.calls.jsonl``: the
blocks it did, its setup time, per-block host RSS (VmRSS, VmHWM) and peak GPU memory.

``serve``: loads the checkpoint onto the GPU (kvant.load_quantized) and times decode at each
``--batches`` with a ``--ctx`` context (kvant.serve), recording load time and GPU memory.

``record``: turns the calls log and serve results into benchmarks/results/scale_70b.{json,md}.

Usage (on the GPU machine; see benchmarks/device_runs/README.md):
``python benchmarks/scale_70b.py quantize --out /root/q70 --blocks 80 --budget 540``
``python benchmarks/scale_70b.py serve --ckpt /root/q70 --batches 1,8 --ctx 2048``
``python benchmarks/scale_70b.py record --out /root/q70 --serve-json serve.json``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/record.py
import kvant  # noqa: E402
from kvant.calib.streaming import quantize_streaming  # noqa: E402
from kvant.formats import stream  # noqa: E402
from kvant.model.synthetic import llama_config, load_synthetic  # noqa: E402


def _status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Pause(Exception):
    """The call's time budget is spent; the progress record is on disk."""


def cmd_quantize(args) -> int:
    t_start = time.time()
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM of this process only
    cfg = llama_config(blocks=args.blocks)
    if args.source:
        model, _ = kvant.load_model(args.source, dtype=torch.bfloat16, lazy=True)
    else:
        model = load_synthetic(cfg, seed=args.seed, dtype=torch.bfloat16, device=args.device)
    vocab = model.config.vocab_size
    calib = torch.randint(0, vocab, (args.n_samples, args.seq_len),
                          generator=torch.Generator().manual_seed(args.seed))
    config = kvant.GPTQConfig(bits=4, group_size=128, act_order=True)
    opts = kvant.EngineOptions(device=args.device, batch_size=args.batch_size,
                               show_progress=True)
    per_block: list[dict] = []
    orig = stream.StreamWriter._write_block
    first_block_t = [None]

    def traced(self, i, *a):
        orig(self, i, *a)
        per_block.append({"block": i, "t": time.time() - t_start,
                          "rss_mb": _status_mb("VmRSS"), "hwm_mb": _status_mb("VmHWM")})
        if args.kill_after is not None and i == args.kill_after:
            _log_call(args, t_start, per_block, "sigkill", first_block_t[0])
            os.kill(os.getpid(), signal.SIGKILL)

    def block_done(self, i, *a, **k):
        if first_block_t[0] is None:
            first_block_t[0] = time.time() - t_start
        stream.StreamWriter.block_done_orig(self, i, *a, **k)
        done_t = [b["t"] for b in per_block]
        step = (done_t[-1] - done_t[-2]) if len(done_t) > 1 else (time.time() - t_start) / 2
        if time.time() - t_start + 1.3 * step > args.budget and i + 1 < args.blocks:
            self._wait()  # block i is on disk with its record
            raise _Pause

    stream.StreamWriter._write_block = traced
    stream.StreamWriter.block_done_orig = stream.StreamWriter.block_done
    stream.StreamWriter.block_done = block_done
    status = "finished"
    try:
        quantize_streaming(model, config, calib, args.out, None, opts)
    except _Pause:
        status = "paused"
    _log_call(args, t_start, per_block, status, first_block_t[0])
    print(f"{status}: {len(per_block)} blocks this call in {time.time() - t_start:.0f}s")
    return 0


def _code() -> dict:
    """Commit and dirty flag of the running code (benchmarks/record.py; KVANT_COMMIT and
    KVANT_DIRTY on a device copy without .git), stored with every call's record."""
    from record import provenance

    return provenance(allow_dirty=True)


def _log_call(args, t_start, per_block, status, first_block_t) -> None:
    rec = {**_code(), "status": status, "wall_s": time.time() - t_start, "blocks": per_block,
           "setup_s": first_block_t, "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30
           if torch.cuda.is_available() else 0.0, "peak_cpu_gb": _status_mb("VmHWM") / 1024,
           "argv": sys.argv[1:], "tf32": torch.backends.cuda.matmul.allow_tf32}
    with open(f"{args.out}.calls.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def cmd_serve(args) -> int:
    from kvant.serve import decode_speed

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model, _ = kvant.load_quantized(args.ckpt, device="cuda")
    torch.cuda.synchronize()
    load_s = time.time() - t0
    res = {**_code(), "load_s": load_s,
           "gpu_mem_after_load_gb": torch.cuda.memory_allocated() / 2**30,
           "peak_gpu_during_load_gb": torch.cuda.max_memory_allocated() / 2**30,
           "ckpt_gb": sum(p.stat().st_size for p in Path(args.ckpt).iterdir()) / 2**30,
           "decode": []}
    for b in [int(x) for x in args.batches.split(",")]:
        r = decode_speed(model, batch=b, ctx=args.ctx, steps=args.steps, compile=args.compile)
        res["decode"].append({"batch": b, **r})
        print(json.dumps(res["decode"][-1]))
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "decode"}))
    return 0


def _slope(blocks: list[dict]) -> float:
    """Least-squares MB per block of the host RSS sampled after each written block."""
    xs = [b["block"] for b in blocks]
    ys = [b["rss_mb"] for b in blocks]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def cmd_record(args) -> int:
    """benchmarks/results/scale_70b.{json,md} from a calls log and serve results."""
    import datetime

    calls = [json.loads(line) for line in Path(args.calls).read_text().splitlines()]
    serve = [json.loads(Path(f).read_text()) for f in args.serve]
    blocks = [b for c in calls for b in c["blocks"]]
    done = sorted({b["block"] for b in blocks})
    steps = [b["t"] - a["t"] for c in calls for a, b in zip(c["blocks"], c["blocks"][1:])]
    # the code of each call, as it recorded itself (--commit/--dirty only for old logs)
    codes = {(c.get("commit", args.commit), c.get("dirty", args.dirty)) for c in calls + serve}
    if None in {c for c, _ in codes}:
        raise SystemExit("error: a call did not record its commit: pass --commit (and --dirty)")
    if len(codes) > 1:
        raise SystemExit(f"error: the calls ran different code {sorted(codes)}: one record "
                         "holds one commit")
    (commit, dirty), = codes
    common = {"model": "llama3-70b-shape", "method": "gptq-actorder", "bits": 4,
              "group_size": 128, "sym": False, "gpus": 1, "device": args.device,
              "date": args.date or datetime.date.today().isoformat(),
              "commit": commit, "dirty": dirty,
              "calib": "128 x 2048 random token ids, seed 0"}
    rec = {**common, "blocks": len(done), "full_run": done == list(range(80)),
           "quant_seconds": sum(c["wall_s"] for c in calls),
           "seconds_per_block": sorted(steps)[len(steps) // 2],
           "setup_seconds": [c["setup_s"] for c in calls],
           "peak_gpu_gb": max(c["peak_gpu_gb"] for c in calls),
           "peak_gpu_gb_per_call": [c["peak_gpu_gb"] for c in calls],
           "peak_cpu_gb": max(c["peak_cpu_gb"] for c in calls),
           "host_slope_mb_per_block": [round(_slope(c["blocks"]), 3) for c in calls],
           "calls": len(calls), "call_status": [c["status"] for c in calls],
           "projected_uninterrupted_s": calls[0]["setup_s"] + 80 * sorted(steps)[len(steps) // 2]}
    records = [rec]
    for s in serve:
        for d in ([s["decode"]] if isinstance(s["decode"], dict) else s["decode"]):
            records.append({**common, "kind": "decode", "batch": d["batch"], "ctx": d["ctx"],
                            "tokens_per_s": d["tokens_per_s"], "ms_per_step": d["ms_per_step"],
                            "compile": d["compile"], "load_s": s["load_s"],
                            "gpu_mem_gb": s.get("gpu_mem_after_load_gb")})
    out = Path(args.results)
    (out / "scale_70b.json").write_text(json.dumps(records, indent=1))
    md = [f"# 70B-shaped Llama on one GPU ({args.device}, commit {commit}"
          f"{' + uncommitted changes' if dirty else ''}, {common['date']})", "",
          "Synthetic Llama-3-70B shape (80 blocks, d 8192, 28672 intermediate, 64/8 heads, "
          "vocab 128256), weights generated per tensor from seed 0 on the GPU; GPTQ W4 g128 "
          "act-order, 128 x 2048 calibration tokens, streamed to a kvant checkpoint.", "",
          "| quantity | value |", "|---|---|",
          f"| blocks quantized | {rec['blocks']} of 80 (full run: {rec['full_run']}) |",
          f"| device calls | {rec['calls']} ({', '.join(rec['call_status'])}) |",
          f"| wall time, all calls | {rec['quant_seconds']:.0f} s |",
          f"| median block-to-block time | {rec['seconds_per_block']:.2f} s |",
          f"| setup per call | {', '.join(f'{x:.1f}' for x in rec['setup_seconds'])} s |",
          f"| projected uninterrupted | {rec['projected_uninterrupted_s'] / 60:.1f} min |",
          f"| peak GPU memory per call | {', '.join(f'{x:.1f}' for x in rec['peak_gpu_gb_per_call'])} GiB |",
          f"| peak host RSS | {rec['peak_cpu_gb']:.1f} GiB |",
          f"| host RSS slope per call | {rec['host_slope_mb_per_block']} MB/block |", "",
          "| decode batch | ctx | compile | ms/step | tokens/s | load s | GPU GiB after load |",
          "|---|---|---|---|---|---|---|"]
    for r in records[1:]:
        md.append(f"| {r['batch']} | {r['ctx']} | {r['compile']} | {r['ms_per_step']:.1f} | "
                  f"{r['tokens_per_s']:.1f} | {r['load_s']:.1f} | "
                  f"{'n/a' if r['gpu_mem_gb'] is None else format(r['gpu_mem_gb'], '.1f')} |")
    md += ["", "Host memory after each written block: scale_70b_memory.png (one line per call; "
           "the resumed calls hold ~4 GB more: the saved block outputs they resumed from, "
           "kept by the engine until a fix in the commit after this run)."]
    (out / "scale_70b.md").write_text("\n".join(md) + "\n")
    _plot(calls, out / "scale_70b_memory.png")
    return 0


def _plot(calls, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for c in calls:
        ax.plot([b["block"] for b in c["blocks"]], [b["rss_mb"] / 1024 for b in c["blocks"]],
                marker=".", label=f"call: {c['status']}")
    ax.set_xlabel("block written")
    ax.set_ylabel("host RSS (GiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("Streaming GPTQ of a 70B-shaped Llama: host memory by depth")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("--out", required=True)
    q.add_argument("--blocks", type=int, default=80)
    q.add_argument("--source", help="safetensors directory instead of generated weights")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--n-samples", type=int, default=128)
    q.add_argument("--seq-len", type=int, default=2048)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--device", default="cuda")
    q.add_argument("--budget", type=float, default=540.0, help="seconds this call may use")
    q.add_argument("--kill-after", type=int, help="SIGKILL this process after that block")
    s = sub.add_parser("serve")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--batches", default="1,8")
    s.add_argument("--ctx", type=int, default=2048)
    s.add_argument("--steps", type=int, default=64)
    s.add_argument("--compile", action="store_true")
    s.add_argument("--json", default="serve.json")
    r = sub.add_parser("record")
    r.add_argument("--calls", required=True, help="the <out>.calls.jsonl of the run")
    r.add_argument("--serve", nargs="*", default=[], help="serve JSON files")
    r.add_argument("--device", default="NVIDIA H200")
    r.add_argument("--commit", help="for logs written before calls recorded their commit")
    r.add_argument("--dirty", action="store_true", help="with --commit: that code was dirty")
    r.add_argument("--date")
    r.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    return {"quantize": cmd_quantize, "serve": cmd_serve, "record": cmd_record}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
