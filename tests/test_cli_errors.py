"""The CLI on bad input (issue 17): one line ``kvant: error: ...`` and exit 2, checked before
any work where it can be; an unexpected error is one line and exit 1 (``-v``: traceback);
method defaults survive unset flags; and nothing around the command changes."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvant import cli, cli_quantize
from kvant.config import ConfigError
from kvant.model.nanogpt import GPTConfig, GPTLanguageModel, embedded_text

TINY = GPTConfig(vocab_size=65, n_embd=32, n_head=2, n_layer=2, block_size=32, dropout=0.0)


def tree_hash(root: Path) -> str:
    """Hash of every path and file content under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory holding a tiny nanoGPT weight dir ``tiny/`` and a user file."""
    torch.manual_seed(0)
    model = GPTLanguageModel(TINY)
    d = tmp_path / "tiny"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "w.safetensors"))
    vocab = "".join(sorted(set(embedded_text())))
    (d / "config.json").write_text(json.dumps({"model_type": "nanogpt", "config": TINY.to_dict(),
                                               "vocab": vocab, "shards": ["w.safetensors"]}))
    (tmp_path / "notes.txt").write_text("user data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(argv, capsys):
    """(exit code, stderr) of ``kvant argv`` run in-process."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def assert_clear(rc, err, pattern):
    import re
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("kvant: error: "), err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


QUANT = ["quantize", "tiny", "--out", "out", "--method", "gptq", "--group-size", "32"]


@pytest.mark.parametrize("extra, pattern", [
    (["--seq-len", "-5"], "--seq-len must be a positive integer, got -5"),
    (["--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
    (["--n-samples", "0"], "--n-samples must be a positive integer, got 0"),
    (["--n-samples", "-3"], "--n-samples must be a positive integer, got -3"),
    (["--seq-len", "64"], "seq_len 64 exceeds the model's context length 32"),
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--option", "bits=3", "--option", "bits=2"], "'bits' is set twice"),
    (["--bits", "3", "--option", "bits=2"], "'bits' is set twice"),
    (["--option", "damp_percent=nan"], "damp_percent must be a finite number, got nan"),
    (["--sink-weight", "0.5"], "sink_weight must be a finite number >= 1, got 0.5"),
    (["--sink-weight", "inf"], "sink_weight must be a finite number, got inf"),
    (["--option", "ignore=nothere"], r"\['nothere'\] match no linear layer"),
    (["--option", "bits"], "--option 'bits': expected key=value"),
    (["--bits", "5"], r"bits must be one of \(2, 3, 4, 8\), got 5"),
])
def test_quantize_bad_input_is_one_line_and_touches_nothing(work, capsys, extra, pattern):
    before = tree_hash(work)
    rc, err = run(QUANT + extra, capsys)
    assert_clear(rc, err, pattern)
    assert tree_hash(work) == before


def test_spqr_outlier_threshold_nan(work, capsys):
    rc, err = run(["quantize", "tiny", "--out", "out", "--method", "spqr", "--option",
                   "outlier_threshold=nan"], capsys)
    assert_clear(rc, err, "outlier_threshold must be a finite number, got nan")


def test_device_is_checked_before_the_model_is_loaded(work, capsys, monkeypatch):
    import kvant
    monkeypatch.setattr(kvant, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    rc, err = run(QUANT + ["--device", "bogus"], capsys)
    assert_clear(rc, err, "unknown device")
    if not torch.cuda.is_available():
        rc, err = run(QUANT + ["--device", "cuda"], capsys)
        assert_clear(rc, err, "CUDA is not available")
        rc, err = run(["eval", "tiny", "--device", "cuda"], capsys)
        assert_clear(rc, err, "CUDA is not available")


def test_unset_flags_keep_the_method_defaults():
    p = cli.build_parser()
    spqr = cli_quantize.config_from_args(p.parse_args(["quantize", "m", "--out", "o", "--method", "spqr"]))
    assert (spqr.bits, spqr.group_size, spqr.act_order) == (3, 16, True)
    gptq = cli_quantize.config_from_args(p.parse_args(["quantize", "m", "--out", "o", "--method", "gptq"]))
    assert (gptq.bits, gptq.group_size, gptq.sym) == (4, 128, False)
    assert gptq.sink_weight == 1.0
    sunk = cli_quantize.config_from_args(p.parse_args(["quantize", "m", "--out", "o", "--method",
                                                       "gptq", "--sink-weight", "64"]))
    assert sunk.sink_weight == 64.0
    with pytest.raises(ConfigError, match="--sink-weight does not apply to method 'rtn'"):
        cli_quantize.config_from_args(p.parse_args(["quantize", "m", "--out", "o", "--method",
                                                    "rtn", "--sink-weight", "64"]))
    set_ = cli_quantize.config_from_args(p.parse_args(["quantize", "m", "--out", "o", "--method", "spqr",
                                               "--bits", "4", "--group-size", "32"]))
    assert (set_.bits, set_.group_size) == (4, 32)
    ig = cli_quantize.config_from_args(p.parse_args(["quantize", "m", "--out", "o", "--option",
                                             "ignore=proj", "--option", "ignore=net.0"]))
    assert ig.ignore == ("proj", "net.0")


def test_memory_budget_refuses_with_numbers(work, capsys, monkeypatch):
    from kvant.calib import budget
    monkeypatch.setattr(budget, "available_bytes", lambda device: 256 * 1024 ** 2)
    before = tree_hash(work)
    rc, err = run(QUANT + ["--n-samples", "100000"], capsys)
    # 2 x 100000 x 32 x 32 x 4 bytes of hidden states = 0.76 GiB, plus Hessians and a block
    assert_clear(rc, err, r"n_samples=100000 x seq_len=32 needs ~0\.8 GB for calibration on cpu "
                          r"\(block inputs and outputs 0\.8 GB.*; 0\.2 GB host memory available")
    assert tree_hash(work) == before


@pytest.mark.parametrize("argv, pattern", [
    (["eval", "tiny", "--max-windows", "-1"], "--max-windows must be a positive integer"),
    (["eval", "tiny", "--seq-len", "0"], "--seq-len must be a positive integer"),
    (["eval", "tiny", "--seq-len", "64"], "seq_len 64 exceeds the model's context length 32"),
    (["eval", "tiny", "--ppl", "nope.txt"], "no such file or directory"),
    (["demo", "--windows", "-1"], "--windows must be a positive integer"),
    (["eval", "./missing"], "no such file or directory: './missing'"),
    (["eval", "missing/deeper/model"], "no such file or directory"),
    (["quantize", "~/kvant-no-such-model", "--out", "out"], "no such file or directory"),
    (["eval", "notes.txt"], "is a file kvant cannot load"),
])
def test_eval_and_paths(work, capsys, argv, pattern):
    before = tree_hash(work)
    rc, err = run(argv, capsys)
    assert_clear(rc, err, pattern)
    assert tree_hash(work) == before


def test_gguf_of_only_magic_bytes(work, capsys):
    pytest.importorskip("gguf")
    (work / "m.gguf").write_bytes(b"GGUF")
    rc, err = run(["eval", "m.gguf"], capsys)
    assert_clear(rc, err, "truncated or corrupted")


def test_unexpected_error_is_one_line_exit_1_and_v_shows_traceback(work, capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("something deep")
    monkeypatch.setattr(cli, "cmd_inspect", boom)
    p = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_fn(p(), "inspect", boom))
    rc, err = run(["inspect", "x"], capsys)
    assert rc == 1
    assert err.strip().splitlines() == [
        "kvant: internal error: RuntimeError: something deep (run with -v for the traceback)"]
    rc, err = run(["inspect", "x", "-v"], capsys)
    assert rc == 1 and "Traceback (most recent call last)" in err


def _with_fn(parser, cmd, fn):
    parser._subparsers._group_actions[0].choices[cmd].set_defaults(fn=fn)
    return parser


def test_quantize_and_eval_still_work(work, capsys):
    rc = cli.main(["quantize", "tiny", "--out", "out", "--group-size", "32", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["config"]["bits"] == 4
    assert (work / "notes.txt").read_text() == "user data"
    rc = cli.main(["eval", "out", "--max-windows", "2", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["windows"] == 2 and 1 < res["ppl"] < 100
