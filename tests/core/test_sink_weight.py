"""The attention-sink weighting of the layer Hessian (WalkConfig.sink_weight)."""

import pytest
import torch

from kvant.algorithms.gptq import gptq_quantize
from kvant.config import ConfigError, GPTQConfig, QuantArgs
from kvant.core.hessian import HessianAccumulator, SharedGram, first_positions


def test_first_position_counts_sink_weight_times():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 8)  # (windows, positions, K)
    acc = HessianAccumulator(8, dtype="float64", sink_weight=9.0)
    acc.add(x)
    xd = x.double()
    want = xd[:, 1:].reshape(-1, 8).t() @ xd[:, 1:].reshape(-1, 8) + 9 * xd[:, 0].t() @ xd[:, 0]
    assert acc.n == 18  # n still counts tokens: the weight moves H, not the mean's divisor
    torch.testing.assert_close(acc.H, 2 * want / 18)


def test_inputs_without_positions_are_not_weighted():
    torch.manual_seed(1)
    x = torch.randn(10, 8)  # routed expert tokens: no position axis
    rows = x.reshape(-1, 8)
    assert first_positions(x, rows) is None
    a, b = HessianAccumulator(8, sink_weight=50.0), HessianAccumulator(8)
    a.add(x), b.add(x)
    torch.testing.assert_close(a.H, b.H)


def test_shared_gram_is_keyed_on_the_weight():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 4)
    rows = x.reshape(-1, 4)
    g = SharedGram()
    plain = g.gram(x, rows, torch.float32)
    weighted = g.gram(x, rows, torch.float32, 4.0)
    assert not torch.allclose(plain, weighted)
    torch.testing.assert_close(weighted - plain, 3 * x[:, 0].t() @ x[:, 0])


@pytest.mark.parametrize("bad", [0.5, 0, float("inf"), float("nan"), True, "8"])
def test_config_refuses_bad_weights(bad):
    with pytest.raises(ConfigError, match="sink_weight"):
        GPTQConfig(sink_weight=bad)


def test_gptq_keeps_the_sink_token_accurate():
    """Typical tokens in a low-rank subspace, the window's first token (the sink) off it: GPTQ
    hides its error where typical tokens do not look, so the sink's output error is 3× a
    typical token's; weighting the sink 16× cuts that many times over at a small cost."""
    torch.manual_seed(3)
    k, t, windows, r = 64, 64, 8, 8
    A = torch.randn(r, k)
    x = torch.randn(windows, t, r) @ A / r ** 0.5 + 0.1 * torch.randn(windows, t, k)
    sink = torch.randn(k)
    sink = sink / sink.norm() * float(x[:, 1:].norm(dim=-1).mean())  # a typical token's norm
    x[:, 0] = sink + 0.02 * torch.randn(windows, k)
    W = torch.randn(48, k)
    args = QuantArgs(bits=3, group_size=-1, sym=False)

    def errors(weight):
        acc = HessianAccumulator(k, dtype="float64", sink_weight=weight)
        acc.add(x)
        res = gptq_quantize(W, acc.H.float(), args, cuda_graph=False)
        s = res.scales.repeat_interleave(k // res.scales.shape[1], 1)
        z = res.zeros.repeat_interleave(k // res.zeros.shape[1], 1)
        e = (x @ (W - (res.qweight.float() - z) * s).t()).square().sum(-1)  # (windows, t)
        return float(e[:, 0].mean()), float(e[:, 1:].mean())

    sink1, rest1 = errors(1.0)
    sink16, rest16 = errors(16.0)
    assert sink1 > 2 * rest1  # the failure being fixed
    assert sink16 < 0.3 * sink1
    assert rest16 < 1.3 * rest1
