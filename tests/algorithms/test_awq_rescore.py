"""AWQ+GPTQ: the scale search scores its best candidates and alpha = 0 with the GPTQ rounding
that follows (AWQConfig.gptq_rescore), and dense_weight reads back what a result packs."""

import pytest
import torch
import torch.nn as nn

from kvant.algorithms.awq_search import capture_groups, search_scale
from kvant.algorithms.gguf_round import gguf_gptq
from kvant.algorithms.gptq import gptq_quantize
from kvant.calib.capture import BlockInput
from kvant.calib.engine import quantize_model
from kvant.config import AWQConfig, ConfigError, EngineOptions, GPTQConfig
from kvant.core.result import dense_weight, quant_linear_class

CPU = EngineOptions(device="cpu", show_progress=False, batch_size=4)


def _problem():
    torch.manual_seed(0)
    block = nn.Sequential(nn.LayerNorm(64), nn.Sequential(nn.Linear(64, 32)))
    x = torch.randn(4, 16, 64) * torch.linspace(0.1, 5, 64)
    return block, [BlockInput((x[:2],), {}), BlockInput((x[2:],), {})]


@pytest.mark.parametrize("case", ["g32", "channel", "act_order", "Q4_0", "Q4_K", "Q3_K"])
def test_dense_weight_is_what_the_packed_layer_computes_with(case):
    torch.manual_seed(1)
    w = torch.randn(32, 256)
    x = torch.randn(512, 256) * torch.linspace(0.2, 3, 256)
    h = x.T @ x
    if case.startswith("Q"):
        res = gguf_gptq(w, h, AWQConfig(grid=f"gguf:{case}", scale_unfoldable=False))
    else:
        cfg = GPTQConfig(bits=4, group_size=-1 if case == "channel" else 32,
                         act_order=case == "act_order")
        res = gptq_quantize(w, h, cfg.qargs, act_order=cfg.act_order)
        assert (res.g_idx is not None) == (case == "act_order")
    layer = quant_linear_class(res.layer_kind).from_result(res, None, dtype=torch.float32)
    # the packed layer keeps fp16 scales (and computes in fp16): equal within fp16 rounding
    assert torch.allclose(dense_weight(res), layer.dequantized_weight().float(), atol=2e-3)
    assert 0 < float((dense_weight(res) - w).abs().max()) < 1


def test_rescored_candidates_are_the_rounded_output_error():
    """alpha = 0 and the RTN-best alpha are scored with the rounder; alpha = 0's score is the
    module's output error with the plainly GPTQ-rounded weight, computed here directly."""
    block, inputs = _problem()
    lin = block[1][0]
    cap = capture_groups(block, [("1.0", "1")], inputs, grams=True)[0]
    assert cap.gram is not None and len(cap.calls) == 2
    args = AWQConfig(bits=3, group_size=32).qargs
    keep = torch.ones(64, dtype=torch.bool)
    rounder = lambda _lin, ws, h: dense_weight(gptq_quantize(ws, h, args))  # noqa: E731
    _, plain = search_scale(block[1], [lin], cap, args, 6, False, keep)
    s, info = search_scale(block[1], [lin], cap, args, 6, False, keep, rounder, 1)
    assert set(info["rescored"]) == {0.0, plain["alpha"]}
    assert info["loss"] == min(info["rescored"].values())
    assert info["alpha"] == min(info["rescored"], key=info["rescored"].get)
    w = lin.weight.detach().clone()
    q = dense_weight(gptq_quantize(w, cap.gram.clone(), args))
    with torch.no_grad():
        err, n = 0.0, 0
        for inp in inputs:
            hdn = block[0](*inp.args)
            ref = hdn @ w.T
            err += float((hdn @ q.T - ref).pow(2).sum())
            n += ref.numel()
    assert info["rescored"][0.0] == pytest.approx(err / n, rel=1e-4)
    # the one-Linear Gram loss scores the same candidates alike
    single = capture_groups(block, [("1.0", "1.0")], inputs)[0]
    _, info1 = search_scale(lin, [lin], single, args, 6, False, keep, rounder, 1)
    assert info1["alpha"] == info["alpha"]
    for a, v in info["rescored"].items():
        assert info1["rescored"][a] == pytest.approx(v, rel=1e-4)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("grid", ["int", "gguf:Q4_0"])
def test_awq_gptq_reports_the_rescored_losses(grid):
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(bits=4, group_size=32, rounding="gptq", n_grid=5, scale_unfoldable=False,
              grid=grid)
    groups = {}
    for k in (0, 2):
        report = quantize_model(_tiny_llama(), AWQConfig(gptq_rescore=k, **kw), calib, CPU)
        groups[k] = [g for b in report.blocks for g in b["awq"] if "alpha" in g]
    assert groups[0] and not any("loss_gptq_by_alpha" in g for g in groups[0])
    for g in groups[2]:
        by_alpha = g["loss_gptq_by_alpha"]
        assert 0.0 in by_alpha and 2 <= len(by_alpha) <= 3
        assert g["loss"] == min(by_alpha.values()) <= by_alpha[0.0]


def test_gptq_rescore_validates():
    with pytest.raises(ConfigError, match="gptq_rescore"):
        AWQConfig(gptq_rescore=-1)
    with pytest.raises(ConfigError, match="gptq_rescore"):
        AWQConfig(gptq_rescore=True)
