"""kvant's checkpoint: identical outputs after save -> load, clear errors, atomic writes.

Refused outputs, locks and crash recovery: tests/test_outdir.py; corrupted and edited
checkpoints: tests/test_integrity.py."""

import json

import pytest
import torch

import kvant
from kvant.formats import checkpoint as ckpt
from kvant.formats.checkpoint import CheckpointError


@pytest.fixture
def saved(tiny_gpt, tmp_path):
    model, tok = tiny_gpt
    kvant.quantize(model, kvant.RTNConfig(bits=3, group_size=32),
                   options=kvant.EngineOptions(show_progress=False))
    out = kvant.save_quantized(model, tmp_path / "q", tok)
    return model, out


def test_round_trip_identical(saved):
    model, out = saved
    x = torch.randint(0, 65, (2, 32))
    loaded, tok = kvant.load_quantized(out)
    assert torch.equal(loaded(x), model(x))
    assert loaded.kvant_quantization_config == model.kvant_quantization_config
    meta = json.loads((out / "config.json").read_text())
    qc = meta["quantization_config"]
    assert qc["format"] == "kvant" and qc["method"] == "rtn" and qc["bits"] == 3
    assert len(qc["modules"]) == 2 * (3 * 2 + 3)  # per block: 2 heads x k/q/v, proj, 2 ffn


def test_truncated_file(saved):
    _, out = saved
    f = next(out.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        kvant.load_quantized(out)


def test_missing_file(saved):
    _, out = saved
    next(out.glob("*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        kvant.load_quantized(out)


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        kvant.load_quantized(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        kvant.load_quantized(tmp_path / "empty")


def test_failed_save_leaves_nothing(tiny_gpt, tmp_path, monkeypatch):
    model, tok = tiny_gpt
    kvant.quantize(model, kvant.RTNConfig(bits=4, group_size=32),
                   options=kvant.EngineOptions(show_progress=False))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        kvant.save_quantized(model, tmp_path / "out", tok)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(saved, tiny_gpt):
    model, out = saved
    _, tok = tiny_gpt
    kvant.save_quantized(model, out, tok, overwrite=True)
    # no lock file, no hidden temporary or old directory is left beside the output
    assert sorted(p.name for p in out.parent.iterdir()) == ["q"]
    assert sorted(p.name for p in out.iterdir()) == [
        ".kvant", "config.json", "model-00001-of-00001.safetensors"]


def test_checksums_recorded(saved):
    _, out = saved
    meta = json.loads((out / "config.json").read_text())
    stored = {t for info in meta["files"].values() for t in info["tensors"]}
    integ = meta["integrity"]
    assert integ["hash"] == "sha256" and set(integ["tensors"]) == stored
    assert all(len(h) == 64 for h in integ["tensors"].values())
    from kvant.formats.integrity import config_digest
    assert integ["config"] == config_digest(meta)


def test_checkpoint_without_checksums_still_loads(saved):
    """Checkpoints written before checksums existed load, with the value checks only."""
    model, out = saved
    cfg = out / "config.json"
    meta = json.loads(cfg.read_text())
    del meta["integrity"]
    cfg.write_text(json.dumps(meta))
    loaded, _ = kvant.load_quantized(out)
    x = torch.randint(0, 65, (1, 16))
    assert torch.equal(loaded(x), model(x))


def test_unquantized_model_cannot_be_saved(tiny_gpt, tmp_path):
    model, tok = tiny_gpt
    with pytest.raises(ValueError, match="not been quantized"):
        kvant.save_quantized(model, tmp_path / "x", tok)
