"""QuantLinear: forward equals the dequantized matmul; its storage is really small."""

import pytest
import torch

from kvant.algorithms.base import LayerResult
from kvant.config import QuantArgs
from kvant.core.grid import rtn
from kvant.nn.qlinear import QuantLinear


def _layer(n, k, bits, group_size, sym=False, bias=True, g_idx=None):
    torch.manual_seed(0)
    w = torch.randn(n, k)
    q, p = rtn(w, QuantArgs(bits, group_size, sym))
    res = LayerResult(q, p.scales, p.zeros, bits, group_size, g_idx=g_idx)
    b = torch.randn(n) if bias else None
    return QuantLinear.from_result(res, b, dtype=torch.float32), q, p, b


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 0, 32])
def test_forward_equals_dequantized_matmul(bits, group_size):
    ql, q, p, b = _layer(24, 96, bits, group_size)
    s, z = p.expand(96)
    w_deq = (q.float() - z) * s
    assert torch.equal(ql.dequantized_weight().float(), w_deq.half().float())
    x = torch.randn(3, 5, 96)
    ref = x @ w_deq.half().float().t() + b
    torch.testing.assert_close(ql(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 128), (2, 64), (4, 32), (8, 128)])
def test_bits_per_weight_formula(bits, group_size):
    n, k = 512, 4096
    ql, *_ = _layer(n, k, bits, group_size, bias=False)
    expected = bits + (16 + bits) / group_size
    # zero points of a row are packed into whole int32 words: at most 31 bits of padding a row
    assert expected <= ql.bits_per_weight() <= expected + 31 / k + 1e-9
    sd_bytes = sum(t.numel() * t.element_size() for t in ql.state_dict().values())
    assert sd_bytes == ql.storage_bytes()


def test_state_dict_is_packed():
    ql, *_ = _layer(64, 256, 4, 128, bias=False)
    sd = ql.state_dict()
    assert sd["qweight"].dtype == torch.int32 and sd["qweight"].shape == (64, 32)
    assert sd["scales"].dtype == torch.float16 and sd["scales"].shape == (64, 2)
    assert sd["qzeros"].shape == (64, 1)
    assert "weight" not in sd


def test_g_idx_is_used():
    n, k, gs = 8, 64, 32
    g_idx = torch.randperm(k) // gs
    ql, q, p, _ = _layer(n, k, 4, gs, bias=False, g_idx=g_idx.int())
    s, z = p.scales[:, g_idx], p.zeros[:, g_idx]
    assert torch.equal(ql.dequantized_weight().float(), ((q.float() - z) * s).half().float())


def test_input_scale():
    torch.manual_seed(0)
    q, p = rtn(torch.randn(8, 32), QuantArgs(4, -1))
    s_in = torch.rand(32) + 0.5
    res = LayerResult(q, p.scales, p.zeros, 4, -1, extras={"input_scale": s_in})
    ql = QuantLinear.from_result(res, None, dtype=torch.float32)
    x = torch.randn(2, 32)
    ref = (x / s_in.half().float()) @ ql.dequantized_weight().float().t()
    torch.testing.assert_close(ql(x), ref, rtol=1e-5, atol=1e-5)
