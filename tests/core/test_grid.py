"""The grid: rounding error bounds, exact zero, the naive per-tensor rounding, clipping."""

import pytest
import torch

from kvant.config import QuantArgs
from kvant.core.grid import find_params, fake_quantize, rtn, weight_params


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [-1, 0, 32])
def test_error_bounded_by_half_scale(bits, sym, group_size):
    torch.manual_seed(bits)
    w = torch.randn(16, 64)
    q, p = rtn(w, QuantArgs(bits, group_size, sym))
    s, z = p.expand(64)
    deq = (q.float() - z) * s
    # every weight inside the grid's range is off by at most half a step
    lo, hi = (0 - z) * s, (2 ** bits - 1 - z) * s
    inside = (w >= lo - 1e-6) & (w <= hi + 1e-6)
    assert inside.float().mean() > 0.9 or sym  # sym 2-bit clips the top level only
    err = (deq - w).abs()
    assert torch.all(err[inside] <= (s.expand_as(w)[inside] / 2) * (1 + 1e-5))
    assert q.min() >= 0 and q.max() <= 2 ** bits - 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_symmetric_keeps_zero_exact(bits):
    w = torch.randn(8, 32)
    w[:, ::3] = 0.0
    q, p = rtn(w, QuantArgs(bits, -1, True))
    s, z = p.expand(32)
    deq = (q.float() - z) * s
    assert torch.all(deq[:, ::3] == 0)


def test_naive_per_tensor_is_the_seed_rounding():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    bits = 4
    q, p = rtn(w, QuantArgs(bits, 0, True))
    assert p.scales.shape == (1, 1)
    scale = (w.abs().max() / (2 ** (bits - 1) - 1)).half().float()
    seed = torch.clamp(torch.round(w / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
    assert torch.equal(q.float() - p.zeros, seed)


def test_asymmetric_zero_point_is_integer_and_in_range():
    w = torch.rand(4, 32) + 0.5  # all positive: range widened to include 0
    s, z = find_params(w, 3, sym=False)
    assert torch.all(z == z.round()) and torch.all((z >= 0) & (z <= 7))


def test_clip_search_lowers_error():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    w[:, 0] *= 20  # one outlier column stretches every row's range
    s0, z0 = find_params(w, 3, sym=False, clip=False)
    s1, z1 = find_params(w, 3, sym=False, clip=True)
    e0 = (fake_quantize(w, s0, z0, 3) - w).abs().pow(2.4).sum()
    e1 = (fake_quantize(w, s1, z1, 3) - w).abs().pow(2.4).sum()
    assert e1 < 0.9 * e0


def test_group_size_must_divide():
    with pytest.raises(ValueError, match=r"group_size 128 does not divide the input width 576 "
                                         r"of layer 'x.q'.*\[16, 32, 64\]"):
        weight_params(torch.randn(4, 576), QuantArgs(4, 128), layer="x.q")


def test_groups_have_their_own_scales():
    w = torch.ones(2, 64)
    w[:, 32:] *= 100
    p = weight_params(w, QuantArgs(4, 32, False))
    assert p.scales.shape == (2, 2)
    assert p.scales[0, 1] > 50 * p.scales[0, 0]
