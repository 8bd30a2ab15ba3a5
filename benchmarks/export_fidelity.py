"""Do the GPTQ / AWQ / compressed-tensors exports hold the model kvant quantized? (CPU)

SmolLM2-135M (GGUF) is quantized with RTN (W4 g64; symmetric, the grid transformers'
compressed-tensors loader takes), exported in the compressed-tensors layout, loaded back with
``transformers.AutoModelForCausalLM`` (the compressed-tensors package decompresses it) and
scored on the same WikiText-2 windows as kvant's own model. The GPTQ and AWQ exports of the
same model are decoded with autoawq's packing utilities when ``KVANT_REF_AUTOAWQ`` points at
``awq/utils/packing_utils.py`` of autoawq 0.2.9 (AWQ: dequantize_gemm; GPTQ: autoawq's AWQ →
GPTQ converter must give our words), counting the layers that match bit for bit.

Writes ``export_fidelity.{json,md}``. Usage::

    PYTHONPATH=src python3 benchmarks/export_fidelity.py --gguf smollm2.gguf \\
        --eval-file wiki.test.raw [--windows 4 --seq-len 512]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import kvant
from kvant.eval.table import write_json
from kvant.nn.qlinear import QuantLinear

import record as rec  # benchmarks/: commit, dirty flag, device


def _score(model, tok, args) -> dict:
    return kvant.perplexity(model, tok, "wikitext2", seq_len=args.seq_len,
                            eval_file=args.eval_file, max_windows=args.windows,
                            show_progress=False)


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _autoawq_check(model, folder: Path) -> dict | None:
    """Layers whose AWQ export autoawq dequantizes to kvant's weights, and whose GPTQ export
    equals autoawq's AWQ → GPTQ conversion (None without KVANT_REF_AUTOAWQ)."""
    path = os.environ.get("KVANT_REF_AUTOAWQ")
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("awq_packing", path)
    pu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pu)
    awq, gptq = _tensors(folder / "awq"), _tensors(folder / "gptq")
    layers = awq_ok = gptq_ok = 0
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        layers += 1
        a = [awq[f"{name}.{b}"] for b in ("qweight", "qzeros", "scales")]
        w = pu.dequantize_gemm(*a, 4, m.group_size)
        awq_ok += bool(torch.equal(w.t().contiguous(), m.dequantized_weight().half()))
        qw, qz = pu.unpack_reorder_pack(a[0], a[1], 4)
        gptq_ok += bool(torch.equal(qw, gptq[f"{name}.qweight"])
                        and torch.equal(qz, gptq[f"{name}.qzeros"]))
    return {"layers": layers, "awq_layers_identical": awq_ok, "gptq_layers_identical": gptq_ok,
            "reference": "autoawq 0.2.9 packing_utils"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--eval-file", required=True, help="local wiki.test.raw")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--allow-dirty", action="store_true",
                    help="record from uncommitted code (rows are marked dirty)")
    args = ap.parse_args(argv)
    stamp = rec.provenance_or_exit(args.allow_dirty)
    import transformers

    torch.manual_seed(0)
    model, tok = kvant.load_model(args.gguf)
    cfg = kvant.RTNConfig(bits=4, group_size=64, sym=True)
    t0 = time.time()
    kvant.quantize(model, cfg, options=kvant.EngineOptions(show_progress=False))
    quant_s = time.time() - t0
    ours = _score(model, tok, args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for fmt in ("compressed-tensors", "gptq", "awq"):
            kvant.export_quantized(model, folder / fmt, fmt, tok)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            folder / "compressed-tensors", dtype=torch.float32)
        theirs = _score(loaded, tok, args)
        cross = _autoawq_check(model, folder)
    base = dict(model="smollm2-135m", method="rtn", bits=4, group_size=64, sym=True,
                quant_seconds=quant_s, device=rec.device_name("cpu"), date=rec.today(),
                **stamp,
                eval={"dataset": "wikitext2", "seq_len": args.seq_len,
                      "windows": ours["windows"], "tokens": ours["tokens"]})
    rows.append(dict(base, reader="kvant", ppl=ours["ppl"], nll=ours["nll"]))
    rows.append(dict(base, reader="transformers + compressed-tensors (export)",
                     ppl=theirs["ppl"], nll=theirs["nll"],
                     transformers=transformers.__version__))
    if cross:
        rows.append(dict(base, reader="autoawq packing utils (AWQ and GPTQ exports)", **cross))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(rows, out / "export_fidelity.json")
    md = [f"# Export fidelity, SmolLM2-135M RTN W4 g64 symmetric, {rows[0]['device']}", "",
          f"{rows[0]['date']}, {rec.provenance_note(rows)[0]} WikiText-2 test, {ours['windows']} "
          f"windows of {args.seq_len} tokens ({ours['tokens']} scored).", "",
          "| reader | ppl | nll |", "|---|---|---|"]
    for r in rows[:2]:
        md.append(f"| {r['reader']} | {r['ppl']:.4f} | {r['nll']:.6f} |")
    if cross:
        md += ["", f"autoawq's packing utilities: {cross['awq_layers_identical']} of "
                   f"{cross['layers']} layers of the AWQ export dequantize to kvant's weights "
                   f"bit for bit; {cross['gptq_layers_identical']} of {cross['layers']} GPTQ "
                   "layers equal autoawq's AWQ → GPTQ conversion."]
    (out / "export_fidelity.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
