"""lm_head quantization (quantize_head) and chat calibration (issue 19, part 3)."""

import copy
import json

import pytest
import torch

import kvant
from kvant.calib.data import CalibrationDataError, chat_calibration_data, token_stream
from kvant.calib.head import HeadError
from kvant.nn.qlinear import QuantLinear

OPTS = kvant.EngineOptions(device="cpu", show_progress=False)


def test_rtn_head_counted_and_round_trips(tiny_gpt, tmp_path):
    model, tok = tiny_gpt
    kvant.quantize(model, kvant.RTNConfig(group_size=32, quantize_head=True), options=OPTS)
    assert isinstance(model.lm_head, QuantLinear)
    out = kvant.save_quantized(model, tmp_path / "q", tok)
    meta = json.loads((out / "config.json").read_text())
    assert "lm_head" in meta["quantization_config"]["modules"] and "lm_head" in meta["layer_losses"]
    loaded, _ = kvant.load_quantized(out)
    ids = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    from kvant.formats.checkpoint import read_config
    from kvant.formats.summary import checkpoint_summary
    s = checkpoint_summary(out, read_config(out))
    assert s["head_quantized"] and s["quantized_weights"] == sum(
        m.in_features * m.out_features for m in loaded.modules() if isinstance(m, QuantLinear))


def test_gptq_head_beats_rtn_head_on_its_inputs(tiny_gpt, tiny_calib):
    model, _ = tiny_gpt
    W = model.lm_head.weight.detach().clone()
    q = copy.deepcopy(model)
    kvant.quantize(q, kvant.GPTQConfig(bits=3, group_size=32, quantize_head=True), tiny_calib, OPTS)
    xs = []
    h = q.lm_head.register_forward_pre_hook(lambda m, a: xs.append(a[0]))
    q(tiny_calib)
    h.remove()
    x = xs[0]
    from kvant.algorithms.registry import build
    res = build(kvant.RTNConfig(bits=3, group_size=32)).layer_quantizer("lm_head", W.float()).quantize()
    rtn = QuantLinear.from_result(res, model.lm_head.bias)
    ref = x @ W.t()
    err_gptq = (q.lm_head(x) - model.lm_head.bias - ref).norm()
    err_rtn = (rtn(x) - model.lm_head.bias - ref).norm()
    assert err_gptq < err_rtn


def test_awq_head_is_refused(tiny_gpt, tiny_calib):
    model, _ = tiny_gpt
    with pytest.raises(HeadError, match="cannot quantize the output head"):
        kvant.quantize(model, kvant.AWQConfig(group_size=32, quantize_head=True), tiny_calib, OPTS)
    assert not isinstance(model.lm_head, QuantLinear)


TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def _chat_tok():
    pytest.importorskip("transformers")
    from hf_tiny import tiny_tokenizer
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = TEMPLATE
    return tok


def test_chat_windows_are_slices_of_the_rendered_stream(tmp_path):
    tok = _chat_tok()
    convs = [[{"role": "user", "content": f"question {i} " * 20},
              {"role": "assistant", "content": f"answer {i} " * 20}] for i in range(4)]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"messages": c}) for c in convs) + "\n")
    w = chat_calibration_data(tok, f, n_samples=3, seq_len=32)
    stream = token_stream(tok, [tok.apply_chat_template(c, tokenize=False) for c in convs])
    assert w.shape == (3, 32)
    s = stream.tolist()
    for row in w.tolist():
        assert any(s[i:i + 32] == row for i in range(len(s) - 31))
    from kvant.calib.data import encode
    marker = encode(tok, "<|user|>")
    assert s[:len(marker)] == marker  # the template's role marker is what is calibrated on


def test_chat_errors_name_the_line(tmp_path):
    tok = _chat_tok()
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                 + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(CalibrationDataError, match=r"c\.jsonl:2 has no 'messages'"):
        chat_calibration_data(tok, f, 2, 8)
    f.write_text("{bad\n")
    with pytest.raises(CalibrationDataError, match=r"c\.jsonl:1 is not valid JSON"):
        chat_calibration_data(tok, f, 2, 8)
    tok.chat_template = None
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(CalibrationDataError, match="has no chat template"):
        chat_calibration_data(tok, f, 2, 8)
