"""Fine-tuning after rounding (kvant.tune) on the embedded nanoGPT: what it buys at 2-3 bits.

Protocol: the embedded character-level GPT (Tiny Shakespeare, 6 blocks, n_embd 384);
calibration on 128 random windows x 256 characters of the training split (seed 0); scored on
the validation split (windows of 256, every window unless ``--max-windows``) by per-character
perplexity and the mean KL from the float model. The validation text is never seen by the
tuning: both stages read only the calibration windows. For each method and width (group 64)
four rows: no tuning, block-wise tuning inside the engine (``EngineOptions.finetune``),
end-to-end tuning of the untuned model (``kvant.finetune``), and both. Each row also carries
the calibration KL (the e2e objective, on the calibration windows) and the tuning time.

    python benchmarks/finetune.py --allow-dirty                  # all rows (CPU, slow)
    python benchmarks/finetune.py --configs rtn:2 --max-windows 64 --allow-dirty

Writes ``results/finetune.{json,md}``; rows of the same (method, bits, group, variant)
replace the stored ones. A dirty tree is refused unless ``--allow-dirty``.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import tempfile
import time
from pathlib import Path

import torch

import kvant
from kvant.eval.kl import FloatReference
from kvant.eval.table import group_label, quantized_bits_per_weight, write_json
from kvant.model.nanogpt import load_embedded, validation_text
from kvant.tune import TuneConfig

import record as rec  # benchmarks/: commit, dirty flag, device

MODEL = "nanogpt-shakespeare"
N_CALIB, SEQ_LEN, GROUP = 128, 256, 64
VARIANTS = ("none", "block", "e2e", "both")
OUT = rec.RESULTS / "finetune"


def _config(method: str, bits: int):
    cls = {"rtn": kvant.RTNConfig, "gptq": kvant.GPTQConfig}[method]
    return cls(bits=bits, group_size=GROUP)


def nanogpt_meta(method: str) -> dict:
    """The fields of a nanoGPT row that say what was measured, besides the scores."""
    return {"model": MODEL, "method": method,
            "calib": f"training split, {N_CALIB} x {SEQ_LEN} chars, seed 0"}


def run_config(model, calib, ref, config, block_cfg, e2e_cfg, stamp, device, meta: dict,
               compute="cpu", with_block=True, eval_desc=None, mixed=None, on_row=None) -> list:
    """The four rows of one method config: none, block, e2e, both (the first two only
    without ``with_block``). ``meta`` holds the row's model, method label and calibration
    description; ``eval_desc(ev)`` describes the scored text (default: nanoGPT's split).
    ``mixed``: a :class:`kvant.MixedConfig` (mixed widths to its target size); the rows then
    carry the plan's widths and its measuring time (in ``quant_seconds``). ``on_row(rows)``
    is called after every row (a run killed mid-config keeps the rows it finished)."""
    eval_desc = eval_desc or (lambda ev: f"validation split, seq_len {SEQ_LEN}, "
                                         f"{ev['tokens']} chars, {ev['windows']} windows")
    rows = []
    for block in (False, True) if with_block else (False,):
        q = copy.deepcopy(model)
        opts = kvant.EngineOptions(device=compute, show_progress=False,
                                   finetune=block_cfg if block else None)
        t0 = time.perf_counter()
        report = kvant.quantize(q, config, calib, opts, mixed=mixed)
        q.to(compute)
        plan = report.plan
        quant_s = time.perf_counter() - t0
        block_s = sum(b["finetune"]["seconds"] for b in report.blocks if "finetune" in b)
        q2 = copy.deepcopy(q)
        e2e = kvant.finetune(q2, model, calib, e2e_cfg)  # its kl_before is q's calibration KL
        variants = [("block" if block else "none", q, None, e2e["kl_before"]),
                    ("both" if block else "e2e", q2, e2e, e2e["kl_after"])]
        for variant, m, e2e_report, calib_kl in variants:
            ev = ref.compare(m, show_progress=False)
            r = {**meta, "bits": config.bits, "group_size": config.group_size,
                 "sym": getattr(config, "sym", None), "finetune": variant,
                 "bits_per_weight": quantized_bits_per_weight(m), "ppl": ev["ppl"],
                 "kl": ev["kl"], "calib_kl": calib_kl,
                 "quant_seconds": quant_s - block_s,
                 "tune_seconds_block": block_s if block else 0.0,
                 "tune_seconds_e2e": e2e_report["seconds"] if e2e_report else 0.0,
                 "tune_block": block_cfg.to_dict() if block else None,
                 "tune_e2e": e2e_cfg.to_dict() if e2e_report else None,
                 "block_mse": [[b["finetune"]["mse_before"], b["finetune"]["mse_after"]]
                               for b in report.blocks] if block else None,
                 "e2e_reverted": e2e_report["reverted"] if e2e_report else None,
                 "target_bpw": mixed.target_bpw if mixed is not None else None,
                 "plan_widths": plan.histogram() if plan is not None else None,
                 "eval": eval_desc(ev),
                 "device": device, "threads": torch.get_num_threads(), "date": rec.today(),
                 **stamp}
            rows.append(r)
            if on_row is not None:
                on_row(rows)
            print(f"{meta['method']} W{config.bits} {group_label(config.group_size)} "
                  f"{variant:5s} ppl {r['ppl']:.4f} kl {r['kl']:.4f} "
                  f"calib_kl {r['calib_kl']:.4f} tune {r['tune_seconds_block']:.0f}+"
                  f"{r['tune_seconds_e2e']:.0f}s", flush=True)
    return rows


CPU_NOTE = ("Tuning seconds are wall time on a shared 2-core machine (one thread), so they "
            "are upper bounds that other jobs inflate.")


def _bits(r: dict) -> str:
    """The bits column: the width, or a mixed plan's share of weights at each width."""
    widths = r.get("plan_widths")
    if not widths:
        return str(r["bits"])
    return "mixed: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in widths.items())


def markdown(records: list[dict], title: str = "Fine-tuning after rounding on the embedded "
             "nanoGPT", footer: str = CPU_NOTE) -> str:
    """The Markdown page of the records."""
    note, _ = rec.provenance_note(records)
    flt = next(r for r in records if r["method"] == "float")
    q = [r for r in records if r["method"] != "float"]
    b = next((r["tune_block"] for r in q if r["tune_block"]), None)
    e = next((r["tune_e2e"] for r in q if r["tune_e2e"]), None)
    # rows merged from runs with other end-to-end settings say theirs in the tuning column
    varied = len({json.dumps(r["tune_e2e"], sort_keys=True) for r in q if r["tune_e2e"]}) > 1

    def tuning(r: dict) -> str:
        t = r.get("tune_e2e")
        return f"{r['finetune']} (lr {t['lr']:g}, {t['tokens']} tokens)" if varied and t \
            else r["finetune"]
    lines = [
        f"# {title}", "",
        note, f"Dates: {', '.join(sorted({r['date'] for r in records}))}. "
        f"Calibration: {flt['calib']}. Eval: {flt['eval']}. The validation text is never "
        "used for tuning.", "",
        "Variants: none = the rounding alone; block = block-wise tuning while quantizing "
        "(each block's scales, norms and biases fitted to the float block's outputs, MSE, "
        "Adam); e2e = end-to-end tuning of the untuned model (KL to the float model's "
        "next-token distributions on the calibration windows); both = block, then e2e. "
        "Packed integer codes are never changed by tuning (tests/tune).", "",
        f"Block settings: {json.dumps(b)}. End-to-end settings: {json.dumps(e)}" +
        (" (of the first tuned row; rows differ in lr or tokens: see the tuning column)."
         if varied else "."), "",
        f"Float perplexity: {flt['ppl']:.4f}.", "",
        "| method | bits | group | bits/weight | tuning | ppl | Δ ppl % | eval KL | "
        "calib KL | tune s (block + e2e) | code, device |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {v: i for i, v in enumerate(VARIANTS)}
    for r in sorted(q, key=lambda r: (r["method"], -r["bits"], order[r["finetune"]])):
        lines.append(
            f"| {r['method']} | {_bits(r)} | {group_label(r['group_size'])} "
            f"| {r['bits_per_weight']:.3f} "
            f"| {tuning(r)} | {r['ppl']:.4f} | {100 * (r['ppl'] / flt['ppl'] - 1):+.1f} "
            f"| {r['kl']:.4f} | {r['calib_kl']:.4f} | "
            f"{r['tune_seconds_block']:.0f} + {r['tune_seconds_e2e']:.0f} | "
            f"{r['commit']}{'+dirty' if r['dirty'] else ''} {r['device']} |")
    lines += ["", footer]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["rtn:3", "rtn:2", "gptq:3", "gptq:2"])
    ap.add_argument("--block-steps", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--tokens", type=int, default=2 * N_CALIB * SEQ_LEN)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="e2e: fraction of calibration windows held out to stop early")
    ap.add_argument("--device", default="cpu", help="compute device (cpu or cuda)")
    ap.add_argument("--no-block", action="store_true", help="only the none and e2e rows")
    ap.add_argument("--name", default="finetune", help="results/NAME.{json,md}")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args()
    stamp = rec.provenance_or_exit(args.allow_dirty)
    global OUT
    OUT = rec.RESULTS / args.name
    torch.manual_seed(0)
    device = rec.device_name(args.device)
    model, tok = load_embedded()
    model.to(args.device)
    calib = kvant.calibration_for(model, tok, n_samples=N_CALIB, seq_len=SEQ_LEN, seed=0)
    ids = torch.tensor(tok.encode(validation_text()), dtype=torch.long)
    n_w = ids.numel() // SEQ_LEN
    n_w = min(n_w, args.max_windows) if args.max_windows else n_w
    ref = FloatReference(model, ids[: n_w * SEQ_LEN].view(n_w, SEQ_LEN), batch_size=16,
                         store="full", show_progress=False)
    block_cfg = TuneConfig(steps=args.block_steps, lr=args.lr)
    e2e_cfg = TuneConfig(tokens=args.tokens, lr=args.lr, batch_size=8, holdout=args.holdout)
    flt = {"model": MODEL, "method": "float", "bits": 16, "ppl": ref.ppl, "kl": 0.0,
           "calib": f"training split, {N_CALIB} x {SEQ_LEN} chars, seed 0",
           "eval": f"validation split, seq_len {SEQ_LEN}, {ref.tokens} chars, {n_w} windows",
           "device": device, "date": rec.today(), **stamp}
    for spec in args.configs:
        method, bits = spec.split(":")
        rows = run_config(model, calib, ref, _config(method, int(bits)), block_cfg, e2e_cfg,
                          stamp, device, nanogpt_meta(method), args.device, not args.no_block)
        store(flt, rows)  # after every config: a killed run keeps what it made


def store(flt: dict, rows: list[dict]) -> None:
    """Merge ``rows`` (and the float row) into results/finetune.json, replacing rows of the
    same method, bits, group and variant, under a lock (runs may go side by side)."""
    path = OUT.with_suffix(".json")
    with open(Path(tempfile.gettempdir()) / "kvant-finetune-results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.exists() else []
        new = {(r["method"], r["bits"], r["group_size"], r["finetune"]) for r in rows}
        old = [r for r in old if r["method"] != "float" and
               (r["method"], r["bits"], r["group_size"], r["finetune"]) not in new]
        records = [flt] + old + rows
        write_json(records, path)
        OUT.with_suffix(".md").write_text(markdown(records))


if __name__ == "__main__":
    main()
