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


def _windows_with_sink(scale: float, seed: int = 3):
    """(windows, T, K) inputs whose first position is ``scale`` times a typical token in one
    channel (a massive activation when scale is large)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 16, 8, generator=g, dtype=torch.float64)
    x[:, 0] = 0.1 * x[:, 0]
    x[:, 0, 0] = scale
    return x


def test_sink_weight_is_capped_at_its_share_of_the_trace():
    x = _windows_with_sink(1.0)
    x0, rest = x[:, 0].reshape(-1, 8), x[:, 1:].reshape(-1, 8)
    t0, tr = float(x0.square().sum()), float(rest.square().sum())
    for share in (0.05, 0.2):
        acc = HessianAccumulator(8, dtype="float64", sink_weight=1e4, sink_max_share=share)
        acc.add(x)
        w = share / (1 - share) * tr / t0  # the weight that gives the sink exactly `share`
        assert 1 < w < 1e4
        want = rest.t() @ rest + w * x0.t() @ x0
        torch.testing.assert_close(acc.H, 2 * want / acc.n)
        got_share = w * t0 / (w * t0 + tr)
        assert abs(got_share - share) < 1e-12
    # below the cap the weight is the one asked for
    low = HessianAccumulator(8, dtype="float64", sink_weight=2.0, sink_max_share=0.2)
    low.add(x)
    torch.testing.assert_close(low.H, 2 * (rest.t() @ rest + 2 * x0.t() @ x0) / low.n)


def test_a_dominant_sink_keeps_weight_one():
    """A massive first-position activation (80-99 % of a down_proj input's trace on SmolLM2)
    is not weighted further under the cap; without the cap it swamps every other token."""
    x = _windows_with_sink(300.0)
    capped = HessianAccumulator(8, dtype="float64", sink_weight=128.0,
                                sink_max_share=GPTQConfig().sink_max_share)
    plain = HessianAccumulator(8, dtype="float64")
    free = HessianAccumulator(8, dtype="float64", sink_weight=128.0, sink_max_share=1.0)
    for a in (capped, plain, free):
        a.add(x)
    torch.testing.assert_close(capped.H, plain.H)
    assert float(free.H[0, 0]) > 100 * float(plain.H[0, 0])


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), True])
def test_config_refuses_bad_shares(bad):
    with pytest.raises(ConfigError, match="sink_max_share"):
        GPTQConfig(sink_weight=8, sink_max_share=bad)
