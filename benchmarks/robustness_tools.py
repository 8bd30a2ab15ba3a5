"""Tools of the hostile-input benchmark (benchmarks/robustness.py, issue 17): the
:class:`Case` record, running a command, and the helpers that corrupt checkpoints, kill saves
or race two runs (used by benchmarks/robustness_cases.py)."""

from __future__ import annotations
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PY = sys.executable
KVANT = [PY, "-m", "kvant.cli"]
NOT_RUN = -998  # a runner could not set the case up (reported as outcome "not_run")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONWARNINGS": "ignore"}


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


def run_cmd(cmd: list[str], d: Path, timeout: int) -> tuple[int, str, str]:
    try:
        p = subprocess.run(cmd, cwd=d, env=ENV, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        return -999, e.stdout or "", (e.stderr or "") + f"\n(timed out after {timeout}s)"


def hidden_leftover(rel: str) -> bool:
    top = rel.split("/")[0]
    return top.startswith(".") and any(f".{k}-" in top for k in ("tmp", "old", "del"))


def shard(ck: Path) -> Path:
    return sorted(ck.glob("*.safetensors"))[0]


def data_start(f: Path) -> int:
    return 8 + int.from_bytes(f.read_bytes()[:8], "little")


def zero_tensor_bytes(ck: Path) -> None:
    f = shard(ck)
    raw = bytearray(f.read_bytes())
    start = data_start(f)
    raw[start:] = bytes(len(raw) - start)
    f.write_bytes(bytes(raw))


def tensor_span(f: Path, name_part: str) -> tuple[int, int]:
    raw = f.read_bytes()
    header = json.loads(raw[8:data_start(f)])
    key = next(k for k in header if k != "__metadata__" and name_part in k)
    a, b = header[key]["data_offsets"]
    return data_start(f) + a, data_start(f) + b


def flip(ck: Path, name_part: str) -> None:
    f = next(s for s in sorted(ck.glob("*.safetensors"))
             if any(name_part in k for k in json.loads(s.read_bytes()[8:data_start(s)])))
    a, b = tensor_span(f, name_part)
    raw = bytearray(f.read_bytes())
    for i in range(a, b, max(1, (b - a) // 16)):
        raw[i] ^= 0xFF
    f.write_bytes(bytes(raw))


def edit_tensor(ck: Path, name_part: str, fn) -> None:
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


def edit_config(ck: Path, fn) -> None:
    p = ck / "config.json"
    meta = json.loads(p.read_text())
    fn(meta)
    p.write_text(json.dumps(meta, indent=1))


def first_module(meta: dict) -> dict:
    return next(iter(meta["quantization_config"]["modules"].values()))


def nan_param(name: str):
    def setup(d: Path) -> None:
        from safetensors.torch import load_file, save_file
        f = d / "tiny" / "w.safetensors"
        t = load_file(str(f))
        t[name] = t[name].clone()
        t[name].view(-1)[0] = float("nan")
        save_file(t, str(f))
    return setup


def ckpt_loads(path: str):
    def check(d: Path, _res) -> str | None:
        rc, out, err = run_cmd(KVANT + ["eval", path, "--max-windows", "2", "--json"], d, 300)
        if rc != 0:
            return f"the result does not evaluate: {err.strip().splitlines()[-1:]}"
        ppl = json.loads(out)["ppl"]
        return None if math.isfinite(ppl) else f"the result evaluates to ppl {ppl}"
    return check


def quant_config(d: Path, path: str) -> dict:
    return json.loads((d / path / "config.json").read_text())["quantization_config"]


def quantized_all_but(path: str, suffix: str, n: int):
    def check(d: Path, _res) -> str | None:
        mods = list(quant_config(d, path)["modules"])
        wrong = [m for m in mods if m == suffix or m.endswith("." + suffix)]
        if wrong or len(mods) != n:
            return (f"ignore={suffix!r}: {len(mods)} layers quantized (expected {n}), "
                    f"ignored ones among them: {wrong[:2]}")
        return None
    return check


def spqr_defaults(d: Path, _res) -> str | None:
    qc = quant_config(d, "o")
    got = (qc.get("bits"), qc.get("group_size"))
    return None if got == (3, 16) else f"SpQR got bits, group_size = {got}, not its own (3, 16)"


# ---------------------------------------------------------------------------------------
# custom runners: concurrency, kills

def concurrent(case: Case, d: Path):
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


def kill_during_save(sig):
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
        rc, out, err = run_cmd(KVANT + ["inspect", "out"], d, 120)
        left = [e.name for e in d.iterdir() if hidden_leftover(e.name)]
        if rc != 0:
            return rc, out, err
        if left:
            return 0, f"hidden leftovers after the next command: {left}", ""
        return 0, "killed during save; the old checkpoint is intact and nothing is left", ""
    return runner


def between_renames(case: Case, d: Path):
    # the state a kill between the two renames leaves: out/ gone, the previous checkpoint
    # only under its hidden .old- name, a partial new one under .tmp-
    (d / "out").rename(d / ".out.old-0000abcd")
    shutil.copytree(d / ".out.old-0000abcd", d / ".out.tmp-0000beef")
    (d / ".out.tmp-0000beef" / "config.json").unlink()
    rc, out, err = run_cmd(KVANT + ["inspect", "out"], d, 120)
    left = [e.name for e in d.iterdir() if hidden_leftover(e.name)]
    if rc == 0 and left:
        return 0, f"hidden leftovers: {left}", ""
    return rc, out, err


def no_leftovers(d: Path, res) -> str | None:
    rc, out, err = res
    return out if out.startswith("hidden leftovers") or "both runs" in out else None


def loads_after_swap(d: Path, res) -> str | None:
    if not (d / "out" / "config.json").is_file():
        return "DATA_LOSS: out/ is gone after the next command (the previous checkpoint " \
               "was not restored)"
    return no_leftovers(d, res) or ckpt_loads("out")(d, res)


def prior_ck(d: Path) -> None:
    shutil.copytree(d / "ck", d / "out")


# ---------------------------------------------------------------------------------------
# the list
