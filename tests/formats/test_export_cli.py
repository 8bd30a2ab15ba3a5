"""``kvant export CKPT --format compressed-tensors|gptq|awq``: the CLI reaches the layouts
that load (asymmetric compressed-tensors with ``dequantize``, GPTQ v2 for asymmetric grids)
and refuses QuIP checkpoints with one line and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import kvant  # noqa: E402
from kvant.calib.engine import quantize_model  # noqa: E402
from kvant.cli import main  # noqa: E402
from kvant.config import EngineOptions, QuIPConfig, RTNConfig  # noqa: E402

CPU = EngineOptions(device="cpu", show_progress=False)


def _checkpoint(tmp_path, config, calib=None):
    """A kvant checkpoint of a tiny random Llama quantized with ``config``."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    quantize_model(model, config, calib, CPU)
    return model, kvant.save_quantized(model, tmp_path / "ck")


def _qc(out) -> dict:
    return json.loads((out / "config.json").read_text())["quantization_config"]


def test_cli_writes_the_asymmetric_layouts(tmp_path, capsys):
    model, ck = _checkpoint(tmp_path, RTNConfig(bits=4, group_size=32, sym=False))
    assert main(["export", str(ck), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "ct")]) == 0
    qc = _qc(tmp_path / "ct")
    assert qc["dequantize"] is True
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is False
    assert main(["export", str(ck), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    assert _qc(tmp_path / "g")["checkpoint_format"] == "gptq_v2"
    assert main(["export", str(ck), "--format", "awq", "--out", str(tmp_path / "a")]) == 0
    assert _qc(tmp_path / "a")["version"] == "gemm"
    out = capsys.readouterr().out
    assert "wrote COMPRESSED-TENSORS checkpoint" in out and "wrote GPTQ checkpoint" in out
    # the asymmetric zero points are in the file, packed along N: (N·4/32, G) int32
    tensors = {}
    for f in (tmp_path / "ct").glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    zp = tensors["model.layers.0.mlp.down_proj.weight_zero_point"]
    assert zp.dtype == torch.int32 and tuple(zp.shape) == (64 * 4 // 32, 128 // 32)


def test_cli_writes_gptq_v1_for_symmetric_grids(tmp_path):
    _, ck = _checkpoint(tmp_path, RTNConfig(bits=4, group_size=32, sym=True))
    assert main(["export", str(ck), "--format", "gptq", "--out", str(tmp_path / "g")]) == 0
    qc = _qc(tmp_path / "g")
    assert qc["checkpoint_format"] == "gptq" and qc["sym"] is True
    assert main(["export", str(ck), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "ct")]) == 0
    assert "dequantize" not in _qc(tmp_path / "ct")


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
def test_cli_refuses_quip_in_one_line(tmp_path, capsys, fmt):
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    _, ck = _checkpoint(tmp_path, QuIPConfig(bits=4, group_size=32), calib)
    assert main(["export", str(ck), "--format", fmt, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kvant: error: ")
    assert "QuIP" in err and "kvant.save_quantized" in err
    assert not (tmp_path / "x").exists()
