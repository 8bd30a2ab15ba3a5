"""Lazy loading (kvant.model.lazy): blocks read from disk one at a time while quantizing give
the same quantized model as quantizing the fully loaded one."""

import pytest
import torch

import kvant
from kvant.config import GPTQConfig, RTNConfig
from kvant.model.lazy import LazyLoadError

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
OPTS = kvant.EngineOptions(device="cpu", show_progress=False, batch_size=4)


@pytest.fixture
def llama_dir(tmp_path):
    from hf_tiny import save_sharded_llama

    return save_sharded_llama(tmp_path / "m", layers=3)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
@pytest.mark.parametrize("config", [RTNConfig(bits=4, group_size=32),
                                    GPTQConfig(bits=3, group_size=32, act_order=True)])
def test_lazy_quantization_equals_eager(llama_dir, config, device):
    """Blocks read on the CPU and moved to ``device`` one at a time, as the engine does."""
    opts = kvant.EngineOptions(device=device, show_progress=False, batch_size=4)
    assert len(list(llama_dir.glob("*.safetensors"))) > 1
    calib = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    eager, _ = kvant.load_model(llama_dir, dtype=torch.float32)
    lazy, tok = kvant.load_model(llama_dir, dtype=torch.float32, lazy=True)
    assert all(p.is_meta for p in lazy.model.layers.parameters())  # nothing read yet
    assert not lazy.model.embed_tokens.weight.is_meta
    assert lazy.lm_head.weight is lazy.model.embed_tokens.weight  # tied again
    with pytest.raises(LazyLoadError, match="not loaded yet"):
        kvant.perplexity(lazy, tok, "wikitext2", eval_file=__file__, seq_len=32)
    kvant.quantize(eager, config, calib, opts)
    kvant.quantize(lazy, config, calib, opts)
    assert not any(p.is_meta for p in lazy.parameters())
    for label, m in (("eager", eager), ("lazy", lazy)):  # every block back where it was
        away = [k for k, t in m.state_dict().items() if t.device.type != "cpu"]
        assert not away, f"{label}: left on {device}: {away}"
    ea, la = eager.state_dict(), lazy.state_dict()
    assert list(ea) == list(la)
    for name in ea:
        assert torch.equal(ea[name], la[name]), name
    ids = calib[:2]
    with torch.no_grad():
        assert torch.equal(eager(ids).logits, lazy(ids).logits)


def test_lazy_errors(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="on the CPU"):
        kvant.load_model(llama_dir, lazy=True, device="meta")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(LazyLoadError, match="safetensors"):
        kvant.load_model(tmp_path / "empty", lazy=True)
    # a NaN in block 1 is found when that block is read
    from safetensors.torch import load_file, save_file

    shard = next(f for f in llama_dir.glob("*.safetensors")
                 if any("layers.1.mlp.up_proj" in k for k in load_file(str(f))))
    tensors = load_file(str(shard))
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    model, _ = kvant.load_model(llama_dir, dtype=torch.float32, lazy=True)
    with pytest.raises(LazyLoadError, match="NaN"):
        kvant.quantize(model, RTNConfig(bits=4, group_size=32), options=OPTS)


def test_cli_quantize_lazy(llama_dir, tmp_path):
    from kvant.cli import main

    assert main(["quantize", str(llama_dir), "--method", "rtn", "--bits", "4",
                 "--group-size", "32", "--lazy", "--out", str(tmp_path / "q")]) == 0
    model, _ = kvant.load_quantized(tmp_path / "q")
    assert not any(p.is_meta for p in model.parameters())
