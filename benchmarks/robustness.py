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
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable
KVANT = [PY, "-m", "kvant.cli"]
NOT_RUN = -998  # a runner could not set the case up (reported as outcome "not_run")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONWARNINGS": "ignore"}


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

@dataclass
class Case:
    """One hostile input. ``argv``: kvant arguments (or ``code``: a Python snippet whose
    KvantError counts as a clear refusal); ``expect``: "error" or "ok"; ``setup(d)``
    prepares the case directory; ``check(d, proc)`` -> None when the result is right, else
    a sentence saying what is wrong; ``may_change``: paths the command may replace."""

    name: str
    group: str
    argv: list[str] | None = None
    code: str | None = None
    expect: str = "error"
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, object], str | None] | None = None
    may_change: tuple[str, ...] = ()
    needs: tuple[str, ...] = ("tiny",)
    runner: Callable | None = None  # custom: (case, d) -> (rc, stdout, stderr)
    timeout: int = 300
    extra: dict = field(default_factory=dict)


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


def _run(cmd: list[str], d: Path, timeout: int) -> tuple[int, str, str]:
    try:
        p = subprocess.run(cmd, cwd=d, env=ENV, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        return -999, e.stdout or "", (e.stderr or "") + f"\n(timed out after {timeout}s)"


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


def _hidden_leftover(rel: str) -> bool:
    top = rel.split("/")[0]
    return top.startswith(".") and any(f".{k}-" in top for k in ("tmp", "old", "del"))


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
        rc, out, err = _run([PY, "-c", API_WRAPPER.format(body=body)], d, case.timeout)
    else:
        rc, out, err = _run(KVANT + case.argv, d, case.timeout)
    seconds = time.perf_counter() - t0
    outcome, msg = classify(case, d, before, snapshot(d), rc, out, err)
    shutil.rmtree(d, ignore_errors=True)
    return {"case": case.name, "group": case.group, "outcome": outcome, "exit_code": rc,
            "message": msg, "seconds": round(seconds, 2)}


# ---------------------------------------------------------------------------------------
# helpers to damage checkpoints

def _shard(ck: Path) -> Path:
    return sorted(ck.glob("*.safetensors"))[0]


def _data_start(f: Path) -> int:
    return 8 + int.from_bytes(f.read_bytes()[:8], "little")


def _zero_tensor_bytes(ck: Path) -> None:
    f = _shard(ck)
    raw = bytearray(f.read_bytes())
    start = _data_start(f)
    raw[start:] = bytes(len(raw) - start)
    f.write_bytes(bytes(raw))


def _tensor_span(f: Path, name_part: str) -> tuple[int, int]:
    raw = f.read_bytes()
    header = json.loads(raw[8:_data_start(f)])
    key = next(k for k in header if k != "__metadata__" and name_part in k)
    a, b = header[key]["data_offsets"]
    return _data_start(f) + a, _data_start(f) + b


def _flip(ck: Path, name_part: str) -> None:
    f = next(s for s in sorted(ck.glob("*.safetensors"))
             if any(name_part in k for k in json.loads(s.read_bytes()[8:_data_start(s)])))
    a, b = _tensor_span(f, name_part)
    raw = bytearray(f.read_bytes())
    for i in range(a, b, max(1, (b - a) // 16)):
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))


def _edit_tensor(ck: Path, name_part: str, fn) -> None:
    """Rewrite the tensor whose name contains ``name_part`` through safetensors (a valid
    file with a wrong value: what only a checksum or a range check can catch)."""
    from safetensors.torch import load_file, save_file
    for f in sorted(ck.glob("*.safetensors")):
        t = load_file(str(f))
        keys = [k for k in t if name_part in k]
        if keys:
            t[keys[0]] = fn(t[keys[0]].clone())
            save_file(t, str(f), metadata={"format": "pt"})
            return
    raise KeyError(name_part)


def _edit_config(ck: Path, fn) -> None:
    p = ck / "config.json"
    meta = json.loads(p.read_text())
    fn(meta)
    p.write_text(json.dumps(meta, indent=1))


def _first_module(meta: dict) -> dict:
    return next(iter(meta["quantization_config"]["modules"].values()))


def _nan_param(name: str):
    def setup(d: Path) -> None:
        from safetensors.torch import load_file, save_file
        f = d / "tiny" / "w.safetensors"
        t = load_file(str(f))
        t[name] = t[name].clone()
        t[name].view(-1)[0] = float("nan")
        save_file(t, str(f))
    return setup


def _ckpt_loads(path: str):
    def check(d: Path, _res) -> str | None:
        rc, out, err = _run(KVANT + ["eval", path, "--max-windows", "2", "--json"], d, 300)
        if rc != 0:
            return f"the result does not evaluate: {err.strip().splitlines()[-1:]}"
        ppl = json.loads(out)["ppl"]
        return None if math.isfinite(ppl) else f"the result evaluates to ppl {ppl}"
    return check


def _qc(d: Path, path: str) -> dict:
    return json.loads((d / path / "config.json").read_text())["quantization_config"]


def _quantized_all_but(path: str, suffix: str, n: int):
    def check(d: Path, _res) -> str | None:
        mods = list(_qc(d, path)["modules"])
        wrong = [m for m in mods if m == suffix or m.endswith("." + suffix)]
        if wrong or len(mods) != n:
            return (f"ignore={suffix!r}: {len(mods)} layers quantized (expected {n}), "
                    f"ignored ones among them: {wrong[:2]}")
        return None
    return check


def _spqr_defaults(d: Path, _res) -> str | None:
    qc = _qc(d, "o")
    got = (qc.get("bits"), qc.get("group_size"))
    return None if got == (3, 16) else f"SpQR got bits, group_size = {got}, not its own (3, 16)"


# ---------------------------------------------------------------------------------------
# custom runners: concurrency, kills

def _concurrent(case: Case, d: Path):
    cmd = KVANT + ["quantize", "tiny", "--method", "gptq", "--group-size", "32", "--out", "out"]
    ps = [subprocess.Popen(cmd, cwd=d, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for _ in range(2)]
    res = [p.communicate(timeout=case.timeout) for p in ps]
    codes = [p.returncode for p in ps]
    errs = "\n".join(r[1] for r in res)
    if sorted(codes) == [0, 2]:
        return 2, "", errs  # one refused, clearly: the expected outcome
    if codes == [0, 0]:
        return 0, "both runs exited 0 (one result silently replaced the other)", errs
    return max(codes, key=abs), "", errs


def _kill_during_save(sig):
    def runner(case: Case, d: Path):
        # the embedded model (a 10 MB checkpoint) so that the save takes long enough
        cmd = KVANT + ["quantize", "nanogpt", "--out", "out", "--overwrite"]
        p = subprocess.Popen(cmd, cwd=d, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        killed = False
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < case.timeout:
            if any(e.name.startswith(".out.tmp-") for e in d.iterdir()):
                time.sleep(0.05)
                p.send_signal(sig)
                killed = True
                break
            time.sleep(0.01)
        p.communicate()
        if not killed:
            return NOT_RUN, "", "the save finished before it could be killed"
        # the next command must find the previous checkpoint whole and leave nothing behind
        rc, out, err = _run(KVANT + ["inspect", "out"], d, 120)
        left = [e.name for e in d.iterdir() if _hidden_leftover(e.name)]
        if rc != 0:
            return rc, out, err
        if left:
            return 0, f"hidden leftovers after the next command: {left}", ""
        return 0, "killed during save; the old checkpoint is intact and nothing is left", ""
    return runner


def _between_renames(case: Case, d: Path):
    # the state a kill between the two renames leaves: out/ gone, the previous checkpoint
    # only under its hidden .old- name, a partial new one under .tmp-
    (d / "out").rename(d / ".out.old-0000abcd")
    shutil.copytree(d / ".out.old-0000abcd", d / ".out.tmp-0000beef")
    (d / ".out.tmp-0000beef" / "config.json").unlink()
    rc, out, err = _run(KVANT + ["inspect", "out"], d, 120)
    left = [e.name for e in d.iterdir() if _hidden_leftover(e.name)]
    if rc == 0 and left:
        return 0, f"hidden leftovers: {left}", ""
    return rc, out, err


def _no_leftovers(d: Path, res) -> str | None:
    rc, out, err = res
    return out if out.startswith("hidden leftovers") or "both runs" in out else None


def _loads_after_swap(d: Path, res) -> str | None:
    if not (d / "out" / "config.json").is_file():
        return "DATA_LOSS: out/ is gone after the next command (the previous checkpoint " \
               "was not restored)"
    return _no_leftovers(d, res) or _ckpt_loads("out")(d, res)


def _prior_ck(d: Path) -> None:
    shutil.copytree(d / "ck", d / "out")


# ---------------------------------------------------------------------------------------
# the list

def cases() -> list[Case]:
    Q = ["quantize", "tiny", "--group-size", "32"]
    QG = Q + ["--method", "gptq"]
    c: list[Case] = []
    add = c.append
    # -- data loss -------------------------------------------------------------------------
    def victim(d):
        (d / "victim").mkdir()
        (d / "victim" / "thesis.tex").write_text("years of work")
    add(Case("out_foreign_dir", "data_loss", Q + ["--out", "victim"], setup=victim))
    add(Case("out_foreign_dir_overwrite", "data_loss", Q + ["--out", "victim", "--overwrite"],
             setup=victim))
    add(Case("out_source_dir", "data_loss", Q + ["--out", "tiny", "--overwrite"]))
    add(Case("out_cwd", "data_loss", Q + ["--out", "$PWD"]))
    add(Case("out_dot", "data_loss", Q + ["--out", ".", "--overwrite"]))
    add(Case("out_existing_file", "data_loss", Q + ["--out", "notes.txt", "--overwrite"]))
    add(Case("out_existing_ckpt_no_overwrite", "data_loss", Q + ["--out", "ck"],
             needs=("tiny", "ck")))
    add(Case("out_existing_ckpt_overwrite", "data_loss", Q + ["--out", "ck", "--overwrite"],
             expect="ok", needs=("tiny", "ck"), may_change=("ck",), check=_ckpt_loads("ck")))
    def ck_plus_user_file(d):
        (d / "ck" / "my_notes.txt").write_text("mine")
    add(Case("out_ckpt_holding_user_file", "data_loss", Q + ["--out", "ck", "--overwrite"],
             needs=("tiny", "ck"), setup=ck_plus_user_file))
    add(Case("export_over_checkpoint", "data_loss",
             ["export", "hfck", "--format", "gptq", "--out", "hfck", "--overwrite"],
             needs=("hfck",)))
    add(Case("export_to_foreign_dir", "data_loss",
             ["export", "hfck", "--format", "gptq", "--out", "victim"], needs=("hfck",),
             setup=victim))
    add(Case("concurrent_runs_same_out", "data_loss", runner=_concurrent, may_change=("out",),
             check=_no_leftovers, timeout=600))
    add(Case("sigkill_during_save", "data_loss", runner=_kill_during_save(signal.SIGKILL),
             expect="ok", needs=("ck",), setup=_prior_ck, check=_loads_after_swap,
             may_change=("out",), timeout=600))
    add(Case("sigterm_during_save", "data_loss", runner=_kill_during_save(signal.SIGTERM),
             expect="ok", needs=("ck",), setup=_prior_ck, check=_loads_after_swap,
             may_change=("out",), timeout=600))
    add(Case("kill_between_renames", "data_loss", runner=_between_renames, expect="ok",
             needs=("ck",), setup=_prior_ck, check=_loads_after_swap,
             may_change=("out", ".out.old-0000abcd", ".out.tmp-0000beef")))
    # -- corrupted / edited checkpoints ----------------------------------------------------
    E = ["eval", "ck", "--max-windows", "2"]
    CK = ("ck",)
    corrupt = [
        ("zeroed_shard_bytes", lambda d: _zero_tensor_bytes(d / "ck")),
        ("flipped_qweight_bytes", lambda d: _flip(d / "ck", "qweight")),
        ("flipped_embedding_bytes", lambda d: _flip(d / "ck", "token_embedding")),
        ("nan_scales", lambda d: _edit_tensor(d / "ck", "scales",
                                              lambda t: t.fill_(float("nan")))),
        ("inf_scales", lambda d: _edit_tensor(d / "ck", "scales",
                                              lambda t: t.fill_(float("inf")))),
        ("zero_points_out_of_range", lambda d: _edit_tensor(d / "ck", "qzeros",
                                                            lambda t: t.fill_(-1))),
        ("truncated_shard", lambda d: _shard(d / "ck").write_bytes(
            _shard(d / "ck").read_bytes()[:-100])),
        ("missing_shard", lambda d: _shard(d / "ck").unlink()),
        ("config_not_json", lambda d: (d / "ck" / "config.json").write_text("{nope")),
        ("edited_top_bits", lambda d: _edit_config(
            d / "ck", lambda m: m["quantization_config"].update(bits=2))),
        ("edited_top_method", lambda d: _edit_config(
            d / "ck", lambda m: m["quantization_config"].update(method="gptq"))),
        ("edited_module_bits", lambda d: _edit_config(
            d / "ck", lambda m: _first_module(m).update(bits=3))),
        ("edited_module_dtype", lambda d: _edit_config(
            d / "ck", lambda m: _first_module(m).update(dtype="float16"))),
        ("edited_module_shape", lambda d: _edit_config(
            d / "ck", lambda m: _first_module(m).update(out_features=7))),
        ("edited_module_kind", lambda d: _edit_config(
            d / "ck", lambda m: _first_module(m).update(kind="nope"))),
        ("deleted_module_key", lambda d: _edit_config(
            d / "ck", lambda m: _first_module(m).pop("in_features"))),
        ("path_escape_files_entry", lambda d: _edit_config(
            d / "ck", lambda m: m.__setitem__("files", {"../elsewhere.safetensors": next(
                iter(m["files"].values()))} if isinstance(m.get("files"), dict) else
                ["../elsewhere.safetensors"]))),
    ]
    for name, setup in corrupt:
        add(Case(name, "checkpoint", E, setup=setup, needs=CK))
    # the same value edits with checksums skipped: only the value-range checks stand
    values = {"nan_scales", "inf_scales", "zero_points_out_of_range"}
    for name, setup in corrupt:
        if name in values:
            add(Case(name + "_no_verify", "checkpoint", E + ["--no-verify"], setup=setup,
                     needs=CK))

    def bad_gidx(d):
        code = (f"import kvant, torch\n"
                f"m, t = kvant.load_model('tiny')\n"
                f"kvant.quantize(m, kvant.GPTQConfig(bits=4, group_size=32, act_order=True), "
                f"kvant.calibration_for(m, t, n_samples=8, seq_len=32), "
                f"kvant.EngineOptions(device='cpu', show_progress=False))\n"
                f"kvant.save_quantized(m, 'ao', t)\n")
        subprocess.run([PY, "-c", code], cwd=d, env=ENV, check=True, capture_output=True)
        _edit_tensor(d / "ao", "g_idx", lambda x: x.fill_(99))
    add(Case("g_idx_out_of_range", "checkpoint", ["eval", "ao", "--max-windows", "2"],
             setup=bad_gidx))
    add(Case("g_idx_out_of_range_no_verify", "checkpoint",
             ["eval", "ao", "--max-windows", "2", "--no-verify"], setup=bad_gidx))
    add(Case("inspect_corrupted", "checkpoint", ["inspect", "ck"], needs=CK,
             setup=lambda d: _zero_tensor_bytes(d / "ck")))
    # -- silent wrong results (calibration, configs) ---------------------------------------
    # the tiny model has 2 blocks of 9 Linears; each pattern names one Linear per block
    add(Case("ignore_as_string", "silent", Q + ["--option", "ignore=proj", "--out", "o"],
             expect="ok", may_change=("o",), check=_quantized_all_but("o", "proj", 16)))
    add(Case("ignore_suffix_net0", "silent", Q + ["--option", "ignore=net.0", "--out", "o"],
             expect="ok", may_change=("o",), check=_quantized_all_but("o", "net.0", 16)))
    add(Case("ignore_matches_nothing", "silent", Q + ["--option", "ignore=nothere",
                                                      "--out", "o"]))
    for pname in ("lm_head.weight", "ln_f.weight", "blocks.0.ffwd.net.0.bias",
                  "token_embedding_table.weight", "blocks.1.sa.heads.0.key.weight"):
        add(Case(f"nan_in_{pname.replace('.', '_')}", "silent", Q + ["--out", "o"],
                 setup=_nan_param(pname)))
    for flag, val in (("--seq-len", "-5"), ("--seq-len", "0"), ("--n-samples", "0"),
                      ("--n-samples", "-3"), ("--seq-len", "99999")):
        add(Case(f"gptq{flag.replace('-', '_')}_{val}", "silent", QG + [flag, val, "--out", "o"]))
    add(Case("duplicate_spec_key", "silent", QG + ["--option", "bits=3", "--option", "bits=2",
                                                   "--out", "o"]))
    add(Case("flag_and_option_same_key", "silent", QG + ["--bits", "3", "--option", "bits=2",
                                                         "--out", "o"]))
    add(Case("duplicate_key_api_spec", "silent",
             code="from kvant.algorithms.registry import config_from_spec\n"
                  "config_from_spec('gptq:bits=3,bits=2')"))
    add(Case("spqr_outlier_threshold_nan", "silent",
             ["quantize", "tiny", "--method", "spqr", "--option", "outlier_threshold=nan",
              "--out", "o"]))
    add(Case("damp_percent_inf", "silent", QG + ["--damp-percent", "inf", "--out", "o"]))
    add(Case("spqr_keeps_its_defaults", "silent",
             ["quantize", "tiny", "--method", "spqr", "--option", "base=rtn", "--out", "o"],
             expect="ok", may_change=("o",), check=_spqr_defaults))
    add(Case("calib_chars_outside_vocab", "silent", QG + ["--calib", "weird.txt", "--out", "o"],
             setup=lambda d: (d / "weird.txt").write_text("naïve ☃ " * 500)))
    calib_api = ("import kvant, torch\nm, t = kvant.load_model('tiny')\n"
                 "kvant.quantize(m, kvant.GPTQConfig(bits=4, group_size=32), {calib}, "
                 "kvant.EngineOptions(device='cpu', show_progress=False))")
    for name, calib in (("calib_ids_outside_vocab", "torch.full((4, 32), 999)"),
                        ("calib_negative_ids", "torch.full((4, 32), -1)"),
                        ("calib_float_tensor", "torch.rand(4, 32)"),
                        ("calib_1d_tensor", "torch.zeros(32, dtype=torch.long)"),
                        ("calib_3d_tensor", "torch.zeros(2, 4, 32, dtype=torch.long)")):
        add(Case(name, "silent", code=calib_api.format(calib=calib)))
    add(Case("api_n_samples_float", "silent",
             code="import kvant\nm, t = kvant.load_model('tiny')\n"
                  "kvant.calibration_for(m, t, n_samples=1e6, seq_len=32)"))
    # -- raw tracebacks --------------------------------------------------------------------
    add(Case("device_cuda_without_cuda", "traceback", Q + ["--device", "cuda", "--out", "o"]))
    add(Case("device_bogus", "traceback", Q + ["--device", "bogus", "--out", "o"]))
    add(Case("eval_device_bogus", "traceback", ["eval", "tiny", "--device", "bogus"]))
    add(Case("gguf_magic_only", "traceback", ["eval", "m.gguf"],
             setup=lambda d: (d / "m.gguf").write_bytes(b"GGUF")))
    add(Case("gguf_garbage_header", "traceback", ["eval", "m.gguf"],
             setup=lambda d: (d / "m.gguf").write_bytes(b"GGUF" + b"\xff" * 64)))
    add(Case("gguf_not_gguf", "traceback", ["eval", "m.gguf"],
             setup=lambda d: (d / "m.gguf").write_bytes(b"not a gguf file")))
    for fmt in ("gptq", "awq", "ct"):
        add(Case(f"eval_kvant_{fmt}_export", "traceback", ["eval", fmt, "--max-windows", "1"],
                 needs=(fmt,)))
    add(Case("quantize_kvant_gptq_export", "traceback", ["quantize", "gptq", "--out", "o"],
             needs=("gptq",)))
    add(Case("max_windows_negative", "traceback", ["eval", "tiny", "--max-windows", "-1"]))
    add(Case("max_windows_zero", "traceback", ["eval", "tiny", "--max-windows", "0"]))
    add(Case("eval_seq_len_zero", "traceback", ["eval", "tiny", "--seq-len", "0"]))
    add(Case("eval_seq_len_over_context", "traceback", ["eval", "tiny", "--seq-len", "64"]))
    add(Case("demo_windows_negative", "traceback", ["demo", "--windows", "-1", "--out", "o"]))
    add(Case("hf_ckpt_without_tokenizer", "traceback",
             ["eval", "hfck_notok", "--ppl", "text.txt", "--max-windows", "1", "--seq-len", "64"],
             needs=("hfck_notok",)))
    add(Case("hf_dir_without_tokenizer", "traceback", ["eval", "hfnotok"], needs=("hf",),
             setup=lambda d: [shutil.move(str(d / "hf"), str(d / "hfnotok"))] + [
                 p.unlink() for p in (d / "hfnotok").iterdir() if "token" in p.name]))
    add(Case("missing_local_path", "traceback", ["eval", "./no/such/model"]))
    add(Case("missing_local_dir_two_parts", "traceback", ["quantize", "models/llama/7b",
                                                          "--out", "o"]))
    add(Case("missing_home_path", "traceback", ["eval", "~/no-such-kvant-model"]))
    add(Case("missing_gguf", "traceback", ["eval", "nothere.gguf"]))
    add(Case("eval_a_text_file", "traceback", ["eval", "notes.txt"]))
    add(Case("inspect_not_a_checkpoint", "traceback", ["inspect", "tiny"]))
    add(Case("export_nanogpt_ckpt", "traceback", ["export", "ck", "--format", "gptq",
                                                  "--out", "o"], needs=CK))
    add(Case("unknown_method", "traceback", Q + ["--method", "nope", "--out", "o"]))
    add(Case("bits_5", "traceback", Q + ["--bits", "5", "--out", "o"]))
    add(Case("unknown_option_key", "traceback", Q + ["--option", "blocksize=3", "--out", "o"]))
    add(Case("option_without_value", "traceback", Q + ["--option", "bits", "--out", "o"]))
    add(Case("flag_not_for_method", "traceback", Q + ["--act-order", "--out", "o"]))
    add(Case("group_not_dividing", "traceback", ["quantize", "tiny", "--group-size", "48",
                                                 "--out", "o"]))
    add(Case("calib_file_missing", "traceback", QG + ["--calib", "nope.txt", "--out", "o"]))
    add(Case("eval_ppl_file_missing", "traceback", ["eval", "tiny", "--ppl", "nope.txt"]))
    add(Case("argparse_missing_out", "traceback", ["quantize", "tiny"]))
    # -- resources -------------------------------------------------------------------------
    add(Case("n_samples_100000_embedded", "resources",
             ["quantize", "nanogpt", "--method", "gptq", "--n-samples", "100000", "--out", "o"],
             needs=()))
    add(Case("n_samples_huge_hf", "resources",
             ["quantize", "hf", "--method", "gptq", "--group-size", "32", "--calib", "text.txt",
              "--seq-len", "128", "--n-samples", "1000000000", "--out", "o"], needs=("hf",)))
    # -- sanity: valid requests still work -------------------------------------------------
    add(Case("valid_gptq_quantize", "sanity", QG + ["--n-samples", "8", "--out", "o"],
             expect="ok", may_change=("o",), check=_ckpt_loads("o")))
    add(Case("valid_eval_checkpoint", "sanity", E, expect="ok", needs=CK))
    return c


# ---------------------------------------------------------------------------------------

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
