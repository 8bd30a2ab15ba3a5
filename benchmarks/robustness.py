"""Hostile-user cases against the kvant CLI and API (issue 17), each in its own temp dir.

Every case runs a real ``kvant`` process (or a short Python snippet for API-only cases) and
is classified from what a user would see:

- ``clear``: refused with exit code 2 and no traceback (the case expects a refusal);
- ``ok``: succeeded (the case expects success) and its own check of the result passed;
- ``traceback``: a raw traceback, or an unexpected error (exit 1 "internal error");
- ``silent``: exit 0 where a refusal was due, a wrong result, or stray files left behind;
- ``data_loss``: a file that existed before the command is gone or changed (other than the
  output the command was asked to replace).

Writes benchmarks/results/robustness.{json,md} (one record per case: case, group, outcome,
exit_code, message, seconds; plus device, date, commit, dirty). Run from the repository
root: ``python benchmarks/robustness.py`` (about 5-10 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from robustness_cases import cases  # noqa: E402
from robustness_tools import ENV, KVANT, NOT_RUN, PY, Case, run_cmd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------------------------------
# fixtures, built once and copied into each case's directory

def build_templates(base: Path) -> None:
    """tiny/ (nanoGPT weights), ck/ (its kvant RTN checkpoint), hf/ (tiny Llama with a
    tokenizer), hfck/ (its kvant checkpoint), hfck_notok/ (one without tokenizer),
    gptq/, awq/, ct/ (kvant's exports of hfck)."""
    code = f"""
import json, torch, sys
from pathlib import Path
from safetensors.torch import save_file
import kvant
from kvant.model.nanogpt import GPTConfig, GPTLanguageModel, embedded_text
base = Path({str(base)!r})
cfg = GPTConfig(vocab_size=65, n_embd=32, n_head=2, n_layer=2, block_size=32, dropout=0.0)
torch.manual_seed(0)
m = GPTLanguageModel(cfg)
d = base / "tiny"; d.mkdir()
save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, str(d / "w.safetensors"))
vocab = "".join(sorted(set(embedded_text())))
(d / "config.json").write_text(json.dumps({{"model_type": "nanogpt", "config": cfg.to_dict(),
                                            "vocab": vocab, "shards": ["w.safetensors"]}}))
model, tok = kvant.load_model(d)
opts = kvant.EngineOptions(device="cpu", show_progress=False)
kvant.quantize(model, kvant.RTNConfig(bits=4, group_size=32), None, opts)
kvant.save_quantized(model, base / "ck", tok)
# a tiny Llama with a byte-level BPE tokenizer trained on the embedded text
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import PreTrainedTokenizerFast, LlamaConfig, AutoModelForCausalLM
tk = Tokenizer(models.BPE(unk_token="<unk>"))
tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tk.decoder = decoders.ByteLevel()
tr = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tk.train_from_iterator([embedded_text()[:20000]], tr)
hftok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
lc = LlamaConfig(vocab_size=len(hftok), hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
hm = AutoModelForCausalLM.from_config(lc).eval()
hm.save_pretrained(base / "hf"); hftok.save_pretrained(base / "hf")
hm, htok = kvant.load_model(base / "hf")
kvant.quantize(hm, kvant.RTNConfig(bits=4, group_size=32), None, opts)
kvant.save_quantized(hm, base / "hfck", htok)
kvant.save_quantized(hm, base / "hfck_notok", None)
for fmt, name in (("gptq", "gptq"), ("awq", "awq"), ("compressed-tensors", "ct")):
    kvant.export_quantized(hm, base / name, fmt, htok)
"""
    subprocess.run([PY, "-c", code], check=True, env=ENV, cwd=base)
    (base / "text.txt").write_text((ROOT / "src/kvant/assets/input.txt").read_text()[:20000])


# ---------------------------------------------------------------------------------------
# a case

API_WRAPPER = """
import sys, traceback
from kvant.errors import KvantError
try:
{body}
except (KvantError, FileNotFoundError, NotImplementedError) as e:
    print("kvant: error: " + " ".join(str(e).split()), file=sys.stderr); sys.exit(2)
except Exception:
    traceback.print_exc(); sys.exit(1)
"""




def snapshot(d: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``d`` (links by their target)."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _under(rel: str, roots) -> bool:
    return any(rel == r or rel.startswith(r.rstrip("/") + "/") for r in roots)




def classify(case: Case, d: Path, before: dict, after: dict, rc: int, out: str, err: str):
    """(outcome, message) of one finished case (see the module docstring)."""
    lost = [r for r in before if not _under(r, case.may_change)
            and (r not in after or after[r] != before[r])]
    if lost:
        return "data_loss", f"{len(lost)} pre-existing file(s) changed or gone, e.g. {lost[0]}"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    # the CLI's own line when there is one (progress bars may come after it)
    last = next((ln for ln in reversed(lines) if ln.startswith("kvant:")),
                lines[-1] if lines else "")
    if "Traceback (most recent call last)" in err:
        return "traceback", last[:300]
    if rc == -999:
        return "traceback", "timed out"
    if rc == NOT_RUN:
        return "not_run", last
    if rc not in (0, 2):
        return "traceback", f"exit {rc}: {last[:280]}"
    stray = [r for r in after if r not in before and not _under(r, case.may_change)
             and not r.split("/")[0].endswith(".lock")]
    if case.expect == "error":
        if rc == 0:
            return "silent", "exit 0 where a refusal was due: " + (out.strip()[-200:] or "")
        if stray:
            return "silent", f"refused ({last[:150]}) but left {stray[:2]}"
        return "clear", last[:300]
    if rc != 0:
        return "silent", f"refused a valid request: {last[:280]}"
    problem = case.check(d, (rc, out, err)) if case.check else None
    if problem and problem.startswith("DATA_LOSS: "):
        return "data_loss", problem.removeprefix("DATA_LOSS: ")
    if problem:
        return "silent", problem
    if stray:
        return "silent", f"left stray files {stray[:3]}"
    return "ok", (out.strip().splitlines() or [""])[-1][:300]


def run_case(case: Case, templates: Path, work: Path) -> dict:
    d = work / case.name
    d.mkdir()
    for n in case.needs:
        shutil.copytree(templates / n, d / n)
    (d / "notes.txt").write_text("the user's own file\n")
    if case.setup:
        case.setup(d)
    before = snapshot(d)
    t0 = time.perf_counter()
    if case.runner:
        rc, out, err = case.runner(case, d)
    elif case.code is not None:
        body = "\n".join("    " + ln for ln in case.code.strip().splitlines())
        rc, out, err = run_cmd([PY, "-c", API_WRAPPER.format(body=body)], d, case.timeout)
    else:
        rc, out, err = run_cmd(KVANT + case.argv, d, case.timeout)
    seconds = time.perf_counter() - t0
    outcome, msg = classify(case, d, before, snapshot(d), rc, out, err)
    shutil.rmtree(d, ignore_errors=True)
    return {"case": case.name, "group": case.group, "outcome": outcome, "exit_code": rc,
            "message": msg, "seconds": round(seconds, 2)}


# ---------------------------------------------------------------------------------------
# helpers to damage checkpoints

def _expand(case: Case, d: Path) -> None:
    if case.argv:
        case.argv = [str(d) if a == "$PWD" else a for a in case.argv]


def git_info() -> tuple[str, bool]:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout
    return git("rev-parse", "--short", "HEAD").strip(), bool(git("status", "--porcelain").strip())


def write_results(records: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = [{**r, **meta} for r in records]
    (RESULTS / "robustness.json").write_text(json.dumps(out, indent=1) + "\n")
    counts = {k: sum(r["outcome"] == k for r in records)
              for k in ("clear", "ok", "traceback", "silent", "data_loss")}
    lines = ["# Robustness: hostile inputs against the kvant CLI and API", "",
             f"`benchmarks/robustness.py`, {meta['device']}, {meta['date']}, commit "
             f"{meta['commit']}{' (dirty tree)' if meta['dirty'] else ''}.", "",
             f"{len(records)} cases: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".",
             "Goal: 0 traceback, 0 silent, 0 data_loss.", "",
             "| case | group | outcome | exit | message |", "|---|---|---|---|---|"]
    for r in records:
        msg = r["message"].replace("|", "\\|").replace("\n", " ")[:220]
        lines.append(f"| {r['case']} | {r['group']} | {r['outcome']} | {r['exit_code']} | "
                     f"{msg} |")
    (RESULTS / "robustness.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="run only these case names")
    ap.add_argument("--no-write", action="store_true", help="print, do not write results")
    args = ap.parse_args()
    sel = [c for c in cases() if not args.only or c.name in args.only]
    with tempfile.TemporaryDirectory(prefix="kvant-robust-") as tmp:
        templates = Path(tmp) / "templates"
        templates.mkdir()
        build_templates(templates)
        work = Path(tmp) / "work"
        work.mkdir()
        records = []
        for case in sel:
            _expand(case, work / case.name)
            try:
                rec = run_case(case, templates, work)
            except Exception as e:  # a broken case setup is reported, not hidden
                rec = {"case": case.name, "group": case.group, "outcome": "error",
                       "exit_code": None, "message": f"case setup failed: {e!r}"[:300],
                       "seconds": 0.0}
                shutil.rmtree(work / case.name, ignore_errors=True)
            records.append(rec)
            print(f"{rec['outcome']:>9}  {rec['exit_code']!s:>4}  {case.name:<34} "
                  f"{rec['message'][:110]}", flush=True)
    commit, dirty = git_info()
    meta = {"device": "cpu-2core" if not _cuda() else _cuda(), "date": time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit, "dirty": dirty}
    if not args.no_write:
        write_results(records, meta)


def _cuda() -> str | None:
    try:
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        return None


if __name__ == "__main__":
    main()
