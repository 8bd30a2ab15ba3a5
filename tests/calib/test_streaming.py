"""Streaming quantization (kvant.calib.streaming): block by block to disk, resumable.

A tiny multi-shard Llama is quantized straight into a checkpoint; the result equals
quantizing the whole model; a run killed with SIGKILL after a block and started again gives
a byte-identical checkpoint; another run against the same output is refused; a disk error
leaves a valid progress record that a rerun resumes from."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kvant
from kvant.calib.streaming import quantize_streaming
from kvant.config import GPTQConfig, RTNConfig
from kvant.formats import stream
from kvant.formats.stream import StreamError

transformers = pytest.importorskip("transformers")
OPTS = kvant.EngineOptions(device="cpu", show_progress=False, batch_size=4)
GPTQ = GPTQConfig(bits=3, group_size=32, act_order=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from hf_tiny import save_sharded_llama

    return save_sharded_llama(tmp_path_factory.mktemp("src") / "m", layers=4)


def _calib():
    return torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("config", [RTNConfig(bits=4, group_size=32), GPTQ])
def test_streamed_checkpoint_equals_whole_model(llama_dir, tmp_path, config):
    whole, tok = kvant.load_model(llama_dir, dtype=torch.float32)
    kvant.quantize(whole, config, _calib(), OPTS)
    lazy, tok = kvant.load_model(llama_dir, dtype=torch.float32, lazy=True)
    report, out = quantize_streaming(lazy, config, _calib(), tmp_path / "q", tok, OPTS)
    assert len(report.layers) == 4 * 7
    assert all(p.is_meta for p in lazy.model.layers.parameters())  # every block freed
    assert sorted(p.name for p in Path(out).glob("*.safetensors")) == [
        f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    loaded, _ = kvant.load_quantized(out)
    ws, ls = whole.state_dict(), loaded.state_dict()
    assert set(ws) == set(ls)
    for name in ws:
        assert torch.equal(ws[name], ls[name]), name
    with torch.no_grad():
        assert torch.equal(whole(_calib()[:2]).logits, loaded(_calib()[:2]).logits)
    assert not list(tmp_path.glob(".q.partial"))


KILLER = textwrap.dedent("""
    import os, signal, sys, torch, kvant
    from kvant.calib.streaming import quantize_streaming
    src, out, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def die_after(i):
        if i == kill_after:  # the record of block i is on disk: die as hard as possible
            os.kill(os.getpid(), signal.SIGKILL)
    calib = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    model, tok = kvant.load_model(src, dtype=torch.float32, lazy=True)
    quantize_streaming(model, kvant.GPTQConfig(bits=3, group_size=32, act_order=True), calib,
                       out, tok, kvant.EngineOptions(device="cpu", show_progress=False,
                                                     batch_size=4), on_block=die_after)
""")


def test_sigkill_then_resume_is_byte_identical(llama_dir, tmp_path):
    lazy, tok = kvant.load_model(llama_dir, dtype=torch.float32, lazy=True)
    _, ref = quantize_streaming(lazy, GPTQ, _calib(), tmp_path / "ref", tok, OPTS)
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(llama_dir), str(out), "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    record = json.loads((tmp_path / ".killed.partial" / "progress.json").read_text())
    assert record["done"] == 1 and not out.exists()
    resumed_blocks = []
    lazy, tok = kvant.load_model(llama_dir, dtype=torch.float32, lazy=True)
    report, _ = quantize_streaming(lazy, GPTQ, _calib(), out, tok, OPTS,
                                   on_block=resumed_blocks.append)
    assert resumed_blocks == [2, 3]  # blocks 0 and 1 were not redone
    assert len(report.layers) == 28  # the report still covers every layer
    assert _digest(out) == _digest(Path(ref))


def test_other_run_against_same_output_is_refused(llama_dir, tmp_path):
    out = tmp_path / "q"
    subprocess.run([sys.executable, "-c", KILLER, str(llama_dir), str(out), "0"],
                   capture_output=True, timeout=120)
    assert (tmp_path / ".q.partial" / "progress.json").is_file()
    lazy, tok = kvant.load_model(llama_dir, dtype=torch.float32, lazy=True)
    with pytest.raises(StreamError, match="another run.*config"):
        quantize_streaming(lazy, GPTQConfig(bits=4, group_size=32), _calib(), out, tok, OPTS)
    other = _calib()
    other[0, 0] += 1
    with pytest.raises(StreamError, match="another run.*calib"):
        quantize_streaming(lazy, GPTQ, other, out, tok, OPTS)
    assert not out.exists()


def test_disk_error_keeps_record_and_resume_works(llama_dir, tmp_path, monkeypatch):
    lazy, tok = kvant.load_model(llama_dir, dtype=torch.float32, lazy=True)
    _, ref = quantize_streaming(lazy, GPTQ, _calib(), tmp_path / "ref", tok, OPTS)
    orig = stream._save_tensors

    def full_disk(tensors, path):
        if path.name.startswith("model-00003"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return orig(tensors, path)

    monkeypatch.setattr(stream, "_save_tensors", full_disk)
    out = tmp_path / "q"
    lazy, tok = kvant.load_model(llama_dir, dtype=torch.float32, lazy=True)
    with pytest.raises(StreamError, match="No space left.*resume"):
        quantize_streaming(lazy, GPTQ, _calib(), out, tok, OPTS)
    record = json.loads((tmp_path / ".q.partial" / "progress.json").read_text())
    assert record["done"] == 1
    monkeypatch.setattr(stream, "_save_tensors", orig)  # space freed
    lazy, tok = kvant.load_model(llama_dir, dtype=torch.float32, lazy=True)
    quantize_streaming(lazy, GPTQ, _calib(), out, tok, OPTS)
    assert _digest(out) == _digest(Path(ref))


def test_missing_shard_mid_run_is_a_clear_error(llama_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    victim = src / index["model.layers.2.mlp.down_proj.weight"]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated after the run started
    lazy, tok = kvant.load_model(src, dtype=torch.float32, lazy=True)
    with pytest.raises(ValueError, match="cannot be read"):
        quantize_streaming(lazy, GPTQ, _calib(), tmp_path / "q", tok, OPTS)
    assert not (tmp_path / "q").exists()
    assert json.loads((tmp_path / ".q.partial" / "progress.json").read_text())["done"] == 1


def test_block_without_quantized_layers_still_runs(llama_dir):
    """Block 0 with every Linear ignored must still feed its real outputs to block 1."""
    from kvant.calib.capture import capture_block_inputs, run_block

    model, _ = kvant.load_model(llama_dir, dtype=torch.float32)
    calib = _calib()
    blocks = model.model.layers
    inputs = capture_block_inputs(model, blocks[0], torch.split(calib, 4), "cpu")
    expected = [h.clone() for h in run_block(blocks[0], inputs)]
    seen = []
    blocks[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    ignore = tuple(f"model.layers.0.{n}" for n, m in blocks[0].named_modules()
                   if isinstance(m, torch.nn.Linear))
    config = GPTQConfig(bits=4, group_size=32, ignore=ignore)
    report = kvant.quantize(model, config, calib, OPTS)
    assert not any(n.startswith("model.layers.0.") for n in report.layers)
    # block 1's q_proj sees block 0's float outputs (normed by input_layernorm): once to
    # find the sequential groups (batch 0), then in the observation pass (batches 0, 1)
    with torch.no_grad():
        normed = [blocks[1].input_layernorm(h) for h in expected]
    assert len(seen) == 3
    for got, want in zip(seen, [normed[0], normed[0], normed[1]]):
        assert torch.allclose(got, want, atol=1e-6)


def test_cli_streams_local_safetensors_dirs(llama_dir, tmp_path, capsys):
    """`kvant quantize DIR` streams by default (same files as the API), resumes, and keeps
    --lazy as an accepted alias."""
    from kvant.cli import main

    lazy, tok = kvant.load_model(llama_dir, dtype=torch.float32, lazy=True)
    calib = kvant.calibration_for(lazy, tok, str(Path(kvant.__file__).parent / "assets" /
                                                 "input.txt"), n_samples=8, seq_len=32)
    _, ref = quantize_streaming(lazy, GPTQConfig(bits=4, group_size=32), calib,
                                tmp_path / "api", tok, kvant.EngineOptions(device="cpu",
                                                                           show_progress=False))
    args = ["quantize", str(llama_dir), "--method", "gptq", "--bits", "4", "--group-size", "32",
            "--calib", str(Path(kvant.__file__).parent / "assets" / "input.txt"),
            "--n-samples", "8", "--seq-len", "32", "--device", "cpu", "--json"]
    assert main(args + ["--out", str(tmp_path / "cli")]) == 0
    assert _digest(tmp_path / "cli") == _digest(Path(ref))
    assert main(args + ["--out", str(tmp_path / "cli"), "--lazy"]) == 2  # no --overwrite
    assert "already holds a kvant output" in capsys.readouterr().err
