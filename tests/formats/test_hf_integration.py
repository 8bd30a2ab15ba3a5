"""transformers integration (kvant.formats.hf_integration): from_pretrained of kvant
checkpoints, save_pretrained of kvant models, refusals. fp32 tiny Llamas, exact logits."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import kvant  # noqa: E402  (registers with transformers)
from kvant.config import QuIPConfig  # noqa: E402
from kvant.errors import CheckpointError, KvantError  # noqa: E402
from kvant.nn.qlinear import QuantLinear  # noqa: E402

from hf_tiny import tiny_llama, tiny_tokenizer  # noqa: E402

OPTS = kvant.EngineOptions(show_progress=False, batch_size=4)
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def _quantized(config, tied=True):
    model = tiny_llama(vocab=300, tied=tied)
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    kvant.quantize(model, config, calib, OPTS)
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _n_quant(model):
    return sum(isinstance(m, QuantLinear) for m in model.modules())


def test_save_pretrained_without_kvant_loaded_random_weights_before(tmp_path):
    """The bug this module fixes, asserted on its mechanism: the packed buffers alone (no
    quantization_config) make transformers initialise fresh Linear weights."""
    model = _quantized(kvant.RTNConfig(bits=4, group_size=32))
    del model.hf_quantizer
    model.config.quantization_config = None
    del model.config.quantization_config
    model.save_pretrained(tmp_path / "bare")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bare")
    assert _n_quant(back) == 0
    assert float((_logits(back) - _logits(model)).abs().max()) > 1e-2


@pytest.mark.parametrize("config", [kvant.RTNConfig(bits=4, group_size=32, sym=False),
                                    kvant.GPTQConfig(bits=3, group_size=32, act_order=True)],
                         ids=["rtn-w4-asym", "gptq-w3-actorder"])
def test_save_pretrained_round_trip(tmp_path, config):
    model = _quantized(config)
    want = _logits(model)
    model.save_pretrained(tmp_path / "sp")
    qc = json.loads((tmp_path / "sp" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "kvant" and qc["format"] == "kvant-hf"
    assert qc["bits"] == config.bits and len(qc["modules"]) == 14
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sp")
    assert _n_quant(back) == 14
    assert torch.equal(_logits(back), want)
    assert back.kvant_quantization_config == model.kvant_quantization_config
    back.save_pretrained(tmp_path / "again")  # a loaded model saves again
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(_logits(again), want)


def test_from_pretrained_reads_kvant_checkpoints(tmp_path):
    model = _quantized(kvant.RTNConfig(bits=4, group_size=32, sym=False))
    kvant.save_quantized(model, tmp_path / "ck", tiny_tokenizer())
    assert (tmp_path / "ck" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert type(back) is type(model) and _n_quant(back) == 14
    assert torch.equal(_logits(back), _logits(model))
    # kvant.load_model reads the save_pretrained layout (through transformers) too
    back.save_pretrained(tmp_path / "sp")
    tiny_tokenizer().save_pretrained(tmp_path / "sp")
    again, tok = kvant.load_model(tmp_path / "sp")
    assert tok is not None and torch.equal(_logits(again), _logits(model))


def test_from_pretrained_checks_the_kvant_checkpoint(tmp_path):
    model = _quantized(kvant.RTNConfig(bits=4, group_size=32))
    kvant.save_quantized(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    shutil.copytree(tmp_path / "ck", tmp_path / "edited")
    meta["quantization_config"]["bits"] = 3  # an edit after the save: the checksum differs
    (tmp_path / "edited" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="config.json"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    shutil.copytree(tmp_path / "ck", tmp_path / "bad")
    shard = next((tmp_path / "bad").glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    tensors["model.layers.0.mlp.down_proj.scales"][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="scales"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bad")


def test_save_pretrained_refuses_fused_layers(tmp_path):
    from kvant.nn.fuse import find_siblings, fuse_siblings

    model = _quantized(kvant.RTNConfig(bits=4, group_size=32))
    fuse_siblings(model, find_siblings(model, IDS[:1]))
    with pytest.raises(KvantError, match="fuse_siblings"):
        model.save_pretrained(tmp_path / "fused")


def test_quip_model_round_trips(tmp_path):
    model = _quantized(QuIPConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path / "q")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert {m.kind for m in back.modules() if isinstance(m, QuantLinear)} == {"quip"}
    assert torch.equal(_logits(back), _logits(model))
