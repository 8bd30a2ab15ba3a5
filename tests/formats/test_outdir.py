"""Safe outputs: refused targets change nothing, one run per output, a killed save recovers.

Every refusal test hashes the whole surrounding tree before and after (tests/ckpt_helpers).
The kill tests run a real ``python -c`` save in a subprocess that stops at an injected point
(the subprocess patches its own functions; no environment switch in kvant), SIGKILL it, and
check what the next save, ``kvant.load_quantized`` or ``kvant inspect`` make of the leftovers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kvant
from ckpt_helpers import tiny_quantized, tree_digest, write_nanogpt_dir
from kvant.cli import main
from kvant.errors import OutputError
from kvant.formats import outdir

TESTS = Path(__file__).resolve().parents[1]  # tests/: ckpt_helpers.py


def _bits(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["quantization_config"]["bits"]


@pytest.fixture(scope="module")
def q4():
    return tiny_quantized(bits=4)


def _refused(tmp_path, fn, match):
    """``fn()`` raises OutputError matching ``match`` and leaves ``tmp_path`` unchanged."""
    before = tree_digest(tmp_path)
    with pytest.raises(OutputError, match=match):
        fn()
    assert tree_digest(tmp_path) == before


def test_foreign_directory_refused(tmp_path, q4):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        _refused(tmp_path, lambda: kvant.save_quantized(*q4[:1], victim, q4[1],
                                                        overwrite=overwrite),
                 "non-empty directory that kvant did not write")


def test_source_model_directory_refused(tmp_path, q4):
    src = write_nanogpt_dir(tmp_path / "models" / "tiny")
    for out in (src, tmp_path / "models"):  # the source itself, or a directory holding it
        _refused(tmp_path, lambda: kvant.save_quantized(q4[0], out, q4[1], overwrite=True,
                                                        source=src),
                 "source model")


def test_existing_file_and_symlink_refused(tmp_path, q4):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    _refused(tmp_path, lambda: kvant.save_quantized(*q4[:1], f, q4[1], overwrite=True),
             "existing file")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _refused(tmp_path, lambda: kvant.save_quantized(*q4[:1], tmp_path / "link", q4[1]),
             "symbolic link")


def test_current_directory_refused(tmp_path, q4, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(work), str(tmp_path)):  # also while empty, and a parent of it
        _refused(tmp_path, lambda: kvant.save_quantized(q4[0], out, q4[1], overwrite=True),
                 "current directory")


def test_kvant_output_needs_overwrite(tmp_path, q4):
    out = kvant.save_quantized(*q4[:1], tmp_path / "q", q4[1])
    _refused(tmp_path, lambda: kvant.save_quantized(q4[0], out, q4[1]), "--overwrite")
    q3 = tiny_quantized(bits=3)
    kvant.save_quantized(q3[0], out, q3[1], overwrite=True)
    assert _bits(out) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no lock, tmp or old left


def test_kvant_output_with_user_files_refused(tmp_path, q4):
    out = kvant.save_quantized(*q4[:1], tmp_path / "q", q4[1])
    (out / "my-notes.md").write_text("eval results")
    _refused(tmp_path, lambda: kvant.save_quantized(q4[0], out, q4[1], overwrite=True),
             "my-notes.md")


def test_checkpoint_written_before_the_marker(tmp_path, q4):
    """Older kvant checkpoints (no .kvant) are recognised by config.json; a file they could
    not have held still blocks the overwrite."""
    out = kvant.save_quantized(*q4[:1], tmp_path / "q", q4[1])
    (out / ".kvant").unlink()
    (out / "results.json").write_text("{}")
    _refused(tmp_path, lambda: kvant.save_quantized(q4[0], out, q4[1], overwrite=True),
             "results.json")
    (out / "results.json").unlink()
    _refused(tmp_path, lambda: kvant.save_quantized(q4[0], out, q4[1]), "--overwrite")
    kvant.save_quantized(q4[0], out, q4[1], overwrite=True)
    assert (out / ".kvant").is_file()


def test_empty_directory_and_new_parents_fine(tmp_path, q4):
    (tmp_path / "empty").mkdir()
    kvant.save_quantized(*q4[:1], tmp_path / "empty", q4[1])
    assert _bits(tmp_path / "empty") == 4
    kvant.save_quantized(*q4[:1], tmp_path / "a" / "b" / "c", q4[1])
    assert _bits(tmp_path / "a" / "b" / "c") == 4


def test_refused_run_leaves_no_parents(tmp_path, q4):
    """A failed write into new parent directories removes the parents it created."""
    from kvant.formats import checkpoint as ckpt

    def boom(*a, **k):
        raise OSError("disk full")

    before = tree_digest(tmp_path)
    saved = ckpt.save_file
    ckpt.save_file = boom
    try:
        with pytest.raises(OSError, match="disk full"):
            kvant.save_quantized(*q4[:1], tmp_path / "x" / "y", q4[1])
    finally:
        ckpt.save_file = saved
    assert tree_digest(tmp_path) == before


# ---- the CLI: exit code 2, one line, nothing touched ------------------------------------

def _cli(tmp_path, capsys, argv, code=2):
    before = tree_digest(tmp_path)
    assert main(argv) == code
    err = capsys.readouterr().err
    if code == 2:
        assert err.startswith("kvant: error: ") and err.count("\n") == 1
        assert tree_digest(tmp_path) == before
    return err


def test_cli_refusals(tmp_path, capsys, monkeypatch):
    src = write_nanogpt_dir(tmp_path / "tiny")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.csv").write_text("1,2,3")
    (tmp_path / "file.bin").write_bytes(b"\0" * 10)
    q = ["quantize", str(src), "--method", "rtn", "--group-size", "32"]
    assert "did not write" in _cli(tmp_path, capsys, q + ["--out", str(victim), "--overwrite"])
    assert "source model" in _cli(tmp_path, capsys, q + ["--out", str(src), "--overwrite"])
    assert "existing file" in _cli(tmp_path, capsys, q + ["--out", str(tmp_path / "file.bin")])
    monkeypatch.chdir(victim)
    assert "current directory" in _cli(tmp_path, capsys, q + ["--out", "."])
    monkeypatch.chdir(tmp_path)
    _cli(tmp_path, capsys, q + ["--out", "ck"], code=0)
    assert "--overwrite" in _cli(tmp_path, capsys, q + ["--out", "ck"])
    _cli(tmp_path, capsys, q + ["--out", "ck", "--overwrite"], code=0)
    # export onto the checkpoint it reads: refused before anything is loaded
    assert "source model" in _cli(tmp_path, capsys, ["export", "ck", "--format", "gptq",
                                                     "--out", "ck", "--overwrite"])


def test_export_output_rules(tmp_path):
    """The GPTQ/AWQ exporter writes through the same rules: marker, overwrite, source."""
    pytest.importorskip("transformers")
    from test_hf_export import _tiny_llama

    model = _tiny_llama()
    ck = kvant.save_quantized(model, tmp_path / "ck")
    _refused(tmp_path, lambda: kvant.export_quantized(model, ck, "gptq", overwrite=True,
                                                      source=ck), "source model")
    out = kvant.export_quantized(model, tmp_path / "gptq", "gptq")
    marker = json.loads((out / ".kvant").read_text())
    assert marker["writer"] == "kvant" and marker["kind"] == "gptq"
    _refused(tmp_path, lambda: kvant.export_quantized(model, out, "awq"), "--overwrite")
    kvant.export_quantized(model, out, "awq", overwrite=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"][
        "quant_method"] == "awq"


# ---- one run per output ------------------------------------------------------------------

_HOLD = """
import sys, time
from kvant.formats import outdir
with outdir.reserve(sys.argv[1]):
    print("HELD", flush=True)
    time.sleep(60)
"""


def _spawn(code: str, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS)] + sys.path))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, text=True, env=env)


def _wait_for(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline()
    assert line.strip() == word, f"child said {line!r}"


def test_second_run_fails_fast(tmp_path, q4, capsys):
    out = tmp_path / "q"
    child = _spawn(_HOLD, out)
    try:
        _wait_for(child, "HELD")
        _refused(tmp_path, lambda: kvant.save_quantized(q4[0], out, q4[1]),
                 f"being written by process {child.pid}")
        src = write_nanogpt_dir(tmp_path / "tiny")
        err = _cli(tmp_path, capsys, ["quantize", str(src), "--out", str(out)])
        assert f"process {child.pid}" in err
    finally:
        child.kill()
        child.wait()
    # the kernel dropped the lock with the process: the output is free again
    kvant.save_quantized(q4[0], out, q4[1])
    assert _bits(out) == 4


# ---- SIGKILL during a save, then recovery ------------------------------------------------

_SAVE = """
import os, sys, time
import kvant
from ckpt_helpers import tiny_quantized
from kvant.formats import checkpoint, outdir

out, stage = sys.argv[1], sys.argv[2]
model, tok = tiny_quantized(bits=3)

def pause():
    print("PAUSE", flush=True)
    time.sleep(60)  # the test kills us here

if stage == "writing":  # the first shard is on disk, the rest is not written yet
    real = checkpoint.save_file
    def save_file(*a, **k):
        real(*a, **k)
        pause()
    checkpoint.save_file = save_file
else:  # stop after the n-th rename of the swap: out->old, tmp->out, old->del
    n = {"renamed-old": 1, "renamed-new": 2, "deleting": 3}[stage]
    real_rename, calls = outdir._rename, []
    def rename(src, dst):
        real_rename(src, dst)
        calls.append(dst)
        if len(calls) == n:
            pause()
    outdir._rename = rename
kvant.save_quantized(model, out, tok, overwrite=True)
print("DONE", flush=True)
"""


def _recover(route: str, out: Path, capsys) -> None:
    if route == "load":
        kvant.load_quantized(out)
    elif route == "inspect":
        assert main(["inspect", str(out)]) == 0
        assert "recovered" in capsys.readouterr().err
    else:
        m, t = tiny_quantized(bits=8)
        kvant.save_quantized(m, out.parent / "other", t)  # another output: not touched
        m, t = tiny_quantized(bits=2)
        kvant.save_quantized(m, out, t, overwrite=True)


@pytest.mark.parametrize("stage,route,bits", [
    ("writing", "inspect", 4),        # killed mid-write: the old checkpoint stays
    ("renamed-old", "load", 4),       # out missing, old one hidden: put back
    ("renamed-new", "load", 3),       # new one in place, old one left: deleted
    ("deleting", "save", 2),          # half-deleted old one: deleted; then the new save
])
def test_kill_during_save_recovers(tmp_path, q4, capsys, stage, route, bits):
    out = kvant.save_quantized(q4[0], tmp_path / "q", q4[1])
    child = _spawn(_SAVE, out, stage)
    try:
        _wait_for(child, "PAUSE")
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".q.")]
    assert hidden, "the kill should have left something to recover"
    assert (stage == "renamed-old") == (not out.exists())
    _recover(route, out, capsys)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["other", "q"] if route == "save" else ["q"])
    assert _bits(out) == bits
    kvant.load_quantized(out)  # complete and verified


def test_leftovers_of_a_live_run_are_left_alone(tmp_path, q4):
    """A reader never 'recovers' the files of a save that is still running."""
    out = kvant.save_quantized(q4[0], tmp_path / "q", q4[1])
    child = _spawn(_SAVE, out, "renamed-old")
    try:
        _wait_for(child, "PAUSE")  # out is renamed away, the live run holds the lock
        before = tree_digest(tmp_path)
        with pytest.raises(kvant.errors.CheckpointError, match="being replaced"):
            kvant.load_quantized(out)
        assert tree_digest(tmp_path) == before
    finally:
        child.kill()
        child.wait()
    # once the run is dead: its unfinished new copy is deleted and the old one put back
    done = outdir.recover_for_read(out)
    assert "restored q from the interrupted swap" in done and len(done) == 2
    assert _bits(out) == 4
