"""Peak host memory of quantizing a model loaded whole vs lazily (blocks read one at a time).

A random Llama (``--hidden``, ``--layers``; fp16 safetensors shards) is saved to a temporary
directory, then RTN W4 g128 runs twice, each in a fresh process: ``kvant.load_model(dir)``
(every weight in memory) and ``kvant.load_model(dir, lazy=True)`` (kvant.model.lazy). The
peak resident set size of each process (VmHWM, reset when it starts) is recorded with the checkpoint size
and the time; both quantized models are saved and compared tensor by tensor.

Writes ``lazy_memory.{json,md}``. Usage: ``PYTHONPATH=src python3 benchmarks/lazy_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from kvant.eval.table import write_json

import record as rec  # benchmarks/: commit, dirty flag, device

# The child resets its peak-RSS mark first (Linux keeps ru_maxrss across fork + exec, so it
# would start at the parent's size) and reports VmHWM at the end.
CHILD = r"""
import json, sys, time, torch, kvant
open("/proc/self/clear_refs", "w").write("5")
src, out, lazy = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
t0 = time.time()
model, tok = kvant.load_model(src, dtype=torch.float16, lazy=lazy)
hwm = lambda: int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
kvant.quantize(model, kvant.RTNConfig(bits=4, group_size=128),
               options=kvant.EngineOptions(device="cpu", show_progress=False))
quant_peak = hwm() / 2**20
kvant.save_quantized(model, out, tok, overwrite=True)  # repeats reuse the output
print(json.dumps({"seconds": time.time() - t0, "peak_rss_quantize_gb": quant_peak,
                  "peak_rss_gb": hwm() / 2**20}))
"""


def _measure(args, layers: int, tiny_tokenizer) -> list:
    """Whole and lazy rows for a random Llama of ``layers`` blocks."""
    import transformers
    from safetensors.torch import load_file

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model"
        cfg = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden,
            intermediate_size=args.intermediate, num_hidden_layers=layers,
            num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 128,
            max_position_embeddings=2048)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).half()
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(src, max_shard_size="500MB")
        tiny_tokenizer().save_pretrained(src)
        del model
        ckpt_gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**30
        outs = {}
        for run in range(args.repeats):  # the peak varies between runs: whole/lazy alternate
            for lazy in (False, True):
                outs[lazy] = Path(tmp) / f"q{int(lazy)}"
                res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(outs[lazy]),
                                      str(int(lazy))], capture_output=True, text=True,
                                     check=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(dict(model=f"llama-random-{layers}L-d{args.hidden}",
                                 params=n_params, checkpoint_gb=ckpt_gb, method="rtn", bits=4,
                                 group_size=128, loading="lazy" if lazy else "whole", run=run,
                                 **r, device=rec.device_name("cpu"), date=rec.today(),
                                 **args.stamp))
                print(json.dumps(rows[-1]), flush=True)
        a = {k: v for f in outs[False].glob("*.safetensors") for k, v in load_file(str(f)).items()}
        b = {k: v for f in outs[True].glob("*.safetensors") for k, v in load_file(str(f)).items()}
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for r in rows:
            r["identical_checkpoints"] = same
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--layers", default="8,16", help="block counts, comma separated")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each (model, loading)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--allow-dirty", action="store_true",
                    help="record from uncommitted code (rows are marked dirty)")
    args = ap.parse_args(argv)
    args.stamp = rec.provenance_or_exit(args.allow_dirty)
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from hf_tiny import tiny_tokenizer

    rows = []
    for layers in [int(v) for v in args.layers.split(",")]:
        rows += _measure(args, layers, tiny_tokenizer)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(rows, out / "lazy_memory.json")
    md = [f"# Peak host memory of quantization, whole vs lazy loading, {rows[0]['device']}", "",
          f"{rows[0]['date']}, {rec.provenance_note(rows)[0]} Random Llama (d {args.hidden}, "
          f"intermediate {args.intermediate}), fp16 safetensors; RTN W4 g128; load + quantize "
          "+ save in a fresh process each; peak resident set size over "
          f"{args.repeats} runs.", "",
          "| model | parameters | checkpoint GiB | loading | peak RSS GiB, load + quantize, "
          "min / median / max | peak RSS GiB with the save, max | seconds, median | "
          "same checkpoint |", "|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["loading"]), []).append(r)
    for (_model, loading), rs in groups.items():
        q = sorted(r["peak_rss_quantize_gb"] for r in rs)
        r0 = rs[0]
        md.append(f"| {r0['model']} | {r0['params'] / 1e6:.0f} M | {r0['checkpoint_gb']:.2f} | "
                  f"{loading} | {q[0]:.2f} / {statistics.median(q):.2f} / {q[-1]:.2f} | "
                  f"{max(r['peak_rss_gb'] for r in rs):.2f} | "
                  f"{statistics.median(r['seconds'] for r in rs):.1f} | "
                  f"{r0['identical_checkpoints']} |")
    (out / "lazy_memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
