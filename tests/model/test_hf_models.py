"""Hugging Face causal LMs of every listed architecture, quantized with no per-model code.

Tiny random-weight models (hidden 64, 2 blocks, vocab 128) of Llama, Mistral, Qwen2, Gemma,
Phi-3, OPT, GPT-NeoX and GPT-2 (Conv1D projections). Bounds on the relative logits error
||y_q - y|| / ||y||: measured 1.3e-3..7.7e-3 for RTN W8 per channel and 2e-2..0.11 for RTN
W4 g32; the tests allow 2e-2 and 0.2.
"""

import copy
import json

import pytest
import torch

import kvant
from kvant.calib.capture import capture_block_inputs, run_block
from kvant.model.discovery import find_blocks, find_linears
from kvant.model.hf import ModelLoadError, load_hf
from kvant.nn.qlinear import QuantLinear

from hf_tiny import ARCHS, VOCAB, logits, tiny_model, tiny_tokenizer

OPTS = kvant.EngineOptions(device="cpu", show_progress=False)
HAS_GPTQ = "gptq" in kvant.algorithms.registry.available()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (8, 32), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_inputs_reproduce_the_model(arch, data):
    # running the blocks on the captured block-0 inputs gives the model's own hidden states:
    # position embeddings, masks and position ids are carried, no cache leaks between batches
    model = tiny_model(arch, layers=3)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        hs = model(input_ids=data, output_hidden_states=True, use_cache=False).hidden_states
    inputs = capture_block_inputs(model, blocks[0], torch.split(data, 4), "cpu")
    for i in range(2):  # the last entry of hidden_states has the final norm applied
        outs = run_block(blocks[i], inputs)
        torch.testing.assert_close(torch.cat(outs), hs[i + 1], rtol=1e-5, atol=1e-5)
        inputs = [inp.with_hidden(o) for inp, o in zip(inputs, outs)]


@pytest.mark.parametrize("arch", ARCHS)
def test_rtn_keeps_outputs_close_and_generates(arch, data):
    model = tiny_model(arch)
    ref = logits(model, data)
    n_linears = sum(len(find_linears(b)) for b in find_blocks(model)[1])
    errs = {}
    for bits, gs in ((8, -1), (4, 32)):
        q = copy.deepcopy(model)
        rep = kvant.quantize(q, kvant.RTNConfig(bits=bits, group_size=gs), options=OPTS)
        assert len(rep.layers) == n_linears
        assert sum(isinstance(m, QuantLinear) for m in q.modules()) == n_linears
        errs[bits] = _rel(logits(q, data), ref)
    assert errs[8] < 2e-2, errs
    assert errs[8] < errs[4] < 0.2, errs
    out = q.generate(data[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and int(out.max()) < VOCAB
    assert torch.equal(out[:, :5], data[:1, :5])


@pytest.mark.skipif(not HAS_GPTQ, reason="GPTQ not available")
@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_gptq_beats_rtn_on_its_calibration_data(arch, data):
    model = tiny_model(arch)
    ref = logits(model, data)
    errs = {}
    for cfg in (kvant.RTNConfig(bits=4, group_size=32),
                kvant.GPTQConfig(bits=4, group_size=32, act_order=True)):
        q = copy.deepcopy(model)
        kvant.quantize(q, cfg, data, options=OPTS)
        errs[cfg.method] = _rel(logits(q, data), ref)
    assert errs["gptq"] < 0.9 * errs["rtn"], errs


def test_gpt2_conv1d_becomes_quantlinear_with_transposed_weight(data):
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].attn.c_attn  # Conv1D, weight (in 64, out 192)
    assert type(conv).__name__ == "Conv1D" and conv.weight.shape == (64, 192)
    w = conv.weight.detach().clone()
    kvant.quantize(model, kvant.RTNConfig(bits=8, group_size=-1), options=OPTS)
    ql = model.transformer.h[0].attn.c_attn
    assert isinstance(ql, QuantLinear) and (ql.out_features, ql.in_features) == (192, 64)
    assert _rel(ql.dequantized_weight().float(), w.t()) < 1e-2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_identical_logits_with_tokenizer(tmp_path, arch):
    tok = tiny_tokenizer()
    model = tiny_model(arch, vocab=len(tok))
    calib = kvant.calibration_data(tok, ["To be, or not to be: that is the question. " * 40],
                                   n_samples=4, seq_len=32)
    cfg = (kvant.GPTQConfig(bits=4, group_size=32, act_order=True) if HAS_GPTQ
           else kvant.RTNConfig(bits=4, group_size=32))
    kvant.quantize(model, cfg, calib, options=OPTS)
    kvant.save_quantized(model, tmp_path / "q", tok)
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["model_type"] == "hf" and meta["model_config"]["model_type"] == arch
    model2, tok2 = kvant.load_model(tmp_path / "q")
    assert type(model2) is type(model)
    assert torch.equal(logits(model2, calib), logits(model, calib))
    assert tok2("Hello there")["input_ids"] == tok("Hello there")["input_ids"]


def test_load_hf_directory_roundtrip_and_errors(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    good = tmp_path / "good"
    model.save_pretrained(good)
    tok.save_pretrained(good)
    m2, t2 = kvant.load_model(good, dtype="float32")
    x = torch.tensor([tok("All the world's a stage")["input_ids"]])
    assert torch.equal(logits(m2, x), logits(model, x))
    assert not m2.training and m2.config.use_cache is False

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_hf(no_weights)

    no_tok = tmp_path / "no_tok"
    model.save_pretrained(no_tok)
    with pytest.raises(ModelLoadError, match="no tokenizer could be loaded.*tokenizer.json"):
        load_hf(no_tok)

    arch = tmp_path / "arch"
    model.save_pretrained(arch)
    cfg = json.loads((arch / "config.json").read_text())
    cfg["model_type"] = "vit"
    (arch / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture: model_type 'vit'"):
        load_hf(arch)

    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_hf(tmp_path)
    with pytest.raises(ValueError, match="cannot load"):
        kvant.load_model(good / "config.json")
