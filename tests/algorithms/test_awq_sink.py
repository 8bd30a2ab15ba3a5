"""AWQ's scale search with the first token weighted (sink_weight), and the clip default by grid."""

import pytest
import torch
import torch.nn as nn

from kvant.algorithms.awq_search import capture_groups, search_scale
from kvant.calib.capture import BlockInput
from kvant.config import AWQConfig, ConfigError
from kvant.core.hessian import gram, sink_gram, sink_weight_of


def _problem():
    torch.manual_seed(0)
    block = nn.Sequential(nn.LayerNorm(64), nn.Sequential(nn.Linear(64, 32)))
    x = torch.randn(4, 16, 64) * torch.linspace(0.1, 5, 64)
    x[:, 0] *= 6.0  # a sink-like first position: large, so the cap matters
    return block, [BlockInput((x[:2],), {}), BlockInput((x[2:],), {})]


@pytest.mark.parametrize("weight,share", [(1.0, 0.2), (8.0, 1.0), (64.0, 0.2)])
def test_gram_and_module_losses_agree_with_sink_weight(weight, share):
    """The one-Linear Gram loss and the module-output loss weight the first token alike
    (same weight, same cap), so both searches pick the same scale with the same losses."""
    block, inputs = _problem()
    single = capture_groups(block, [("1.0", "1.0")], inputs, weight, share)[0]
    module = capture_groups(block, [("1.0", "1")], inputs, weight, share)[0]
    assert single.gram is not None and not single.calls
    assert len(module.calls) == len(module.first_weights) == 2
    args = AWQConfig(bits=3, group_size=32).qargs
    keep = torch.ones(64, dtype=torch.bool)
    lin = block[1][0]
    s1, i1 = search_scale(lin, [lin], single, args, 6, False, keep)
    s2, i2 = search_scale(block[1], [lin], module, args, 6, False, keep)
    assert i1["alpha"] == i2["alpha"] and torch.equal(s1, s2)
    assert i1["loss"] == pytest.approx(i2["loss"], rel=1e-4)
    assert i1["loss_rtn"] == pytest.approx(i2["loss_rtn"], rel=1e-4)


def test_sink_weight_changes_the_loss_and_respects_the_cap():
    block, inputs = _problem()
    args = AWQConfig(bits=3, group_size=32).qargs
    keep = torch.ones(64, dtype=torch.bool)
    lin = block[1][0]
    plain = capture_groups(block, [("1.0", "1")], inputs)[0]
    heavy = capture_groups(block, [("1.0", "1")], inputs, 64.0, 1.0)[0]
    capped = capture_groups(block, [("1.0", "1")], inputs, 64.0, 0.2)[0]
    assert plain.first_weights == [1.0, 1.0]
    assert [float(w) for w in heavy.first_weights] == [64.0, 64.0]
    # capped: the first positions hold at most 20 % of the weighted input energy
    with torch.no_grad():
        h = block[0](inputs[0].args[0])
    w = float(capped.first_weights[0])
    t0 = float(h[:, 0].pow(2).sum())
    total = float(h.pow(2).sum())
    assert 1.0 <= w < 64.0
    assert w * t0 / (w * t0 + total - t0) == pytest.approx(0.2, rel=1e-4)
    losses = [search_scale(block[1], [lin], c, args, 4, False, keep)[1]["loss_rtn"]
              for c in (plain, capped, heavy)]
    assert losses[0] < losses[1] < losses[2]


def test_sink_weight_of_is_the_weight_sink_gram_uses():
    _, inputs = _problem()
    x = inputs[0].args[0]
    rows = x.reshape(-1, 64)
    for weight, share in ((8.0, 0.2), (8.0, 1.0), (1.0, 0.2)):
        w = sink_weight_of(x, weight, share)
        expect = gram(rows, torch.float32) + (float(w) - 1.0) * gram(x[:, 0], torch.float32)
        assert torch.allclose(sink_gram(x, rows, torch.float32, weight, share), expect,
                              rtol=1e-5, atol=1e-3)
    assert sink_weight_of(rows, 8.0, 0.2) == 1.0  # no position axis: unweighted


def test_clip_search_default_depends_on_the_grid():
    assert AWQConfig().clips is True
    gguf = dict(scale_unfoldable=False)  # what a GGUF grid needs (no input_scale there)
    assert AWQConfig(grid="gguf:Q4_0", **gguf).clips is False
    assert AWQConfig(grid="gguf:Q4_K", clip_search=True, **gguf).clips is True
    assert AWQConfig(clip_search=False).clips is False
    cfg = AWQConfig(grid="gguf:Q3_K", **gguf)
    back = AWQConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.clip_search is None and not back.clips
    with pytest.raises(ConfigError, match="clip_search"):
        AWQConfig(clip_search="yes")
