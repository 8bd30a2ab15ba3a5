"""How uneven the input channels of the Linear layers are: max / median of per-channel mean |x|.

The reason AWQ's per-channel scales pay off on SmolLM2 and hardly on the embedded nanoGPT
(benchmarks/results/archive/awq_nanogpt.md, results/smollm2.md) is measured here: for each
Linear, the mean absolute activation of every input channel over the calibration tokens,
then the ratio of the largest to the median channel; reported per layer kind as the median
over blocks and the maximum. SmolLM2: the C4 sample (--n-samples x --seq-len tokens); nanoGPT: training windows.
Writes activation_outliers.{json,md} into --out (default results/archive/).

    python benchmarks/activation_outliers.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib-file ../shared/data/c4-sample/c4_en_train_00000_first1000.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import kvant
from kvant.calib.data import calibration_data
from kvant.calib.data_char import char_windows
from kvant.eval.table import write_json
from kvant.model.nanogpt import load_embedded, training_text

import record as rec  # benchmarks/: commit, dirty flag, device

KINDS = {"smollm2-135m": ("q_proj", "o_proj", "gate_proj", "down_proj"),
         "nanogpt-shakespeare": ("query", "proj", "net.0", "net.2")}


@torch.no_grad()
def channel_ratios(model, ids, kinds) -> dict:
    """{kind: [max/median channel mean |x| of each Linear of that kind]} over one forward."""
    ratios: dict = {k: [] for k in kinds}
    handles = []

    def hook(kind):
        def fn(_m, a):  # returns None: a pre-hook's return value would replace the input
            x = a[0].reshape(-1, a[0].shape[-1]).abs().float().mean(0)
            ratios[kind].append(float(x.max() / x.median()))
        return fn

    for name, m in model.named_modules():
        kind = next((k for k in kinds if name.endswith(k)), None)
        if isinstance(m, torch.nn.Linear) and kind:
            handles.append(m.register_forward_pre_hook(hook(kind)))
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--calib-file", required=True)
    ap.add_argument("--n-samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=str(rec.ARCHIVE))
    ap.add_argument("--allow-dirty", action="store_true",
                    help="record from uncommitted code (rows are marked dirty)")
    args = ap.parse_args()
    stamp = rec.provenance_or_exit(args.allow_dirty)
    smol, tok = kvant.load_model(args.gguf, dtype="float32", device="cpu")
    ids = calibration_data(tok, "c4", n_samples=args.n_samples, seq_len=args.seq_len, seed=0,
                           calib_file=args.calib_file)
    gpt, ctok = load_embedded()
    # the first 4 of the nanoGPT tables' calibration windows (128 x 256, seed 0)
    gwin = char_windows(ctok, training_text(), 128, 256, 0)[:4]
    runs = {"smollm2-135m": (smol, ids, f"C4 sample, {args.n_samples} x {args.seq_len} tokens"),
            "nanogpt-shakespeare": (gpt, gwin, "training split, 4 x 256 chars")}
    rows = []
    for model_name, (model, x, data) in runs.items():
        for kind, v in channel_ratios(model, x, KINDS[model_name]).items():
            rows.append(dict(model=model_name, layer=kind, layers=len(v), data=data,
                             median_ratio=statistics.median(v), max_ratio=max(v),
                             device=rec.device_name("cpu"), date=rec.today(), **stamp))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(rows, out / "activation_outliers.json")
    md = ["# Input-channel outliers: max / median of per-channel mean |x|", "",
          f"{rec.provenance_note(rows)[0]} Date {rows[0]['date']}.", "",
          "| model | Linear | layers | data | median over layers | max |", "|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['layer']} | {r['layers']} | {r['data']} | "
           f"{r['median_ratio']:.1f} | {r['max_ratio']:.1f} |" for r in rows]
    (out / "activation_outliers.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(json.dumps(rows[0]))


if __name__ == "__main__":
    main()
