"""core/hessian.py: accumulation, dead inputs, damping, inverse Cholesky and its errors."""

import logging

import pytest
import torch

from kvant.core.hessian import (HessianAccumulator, HessianError, dampen, gram,
                                inverse_cholesky, zero_dead)


def test_running_mean_over_any_leading_shape():
    torch.manual_seed(0)
    xs = [torch.randn(2, 5, 8), torch.randn(7, 8), torch.randn(1, 3, 4, 8)]
    acc = HessianAccumulator(8)
    for x in xs:
        acc.add(x)
    rows = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    assert acc.n == rows.shape[0] == 29
    assert acc.H.dtype == torch.float32
    torch.testing.assert_close(acc.H.double(), 2 * rows.t() @ rows / 29, rtol=1e-5, atol=1e-5)


def test_float64_option_and_add_gram():
    torch.manual_seed(1)
    x = torch.randn(3, 10, 6)
    a = HessianAccumulator(6, dtype="float64")
    a.add(x)
    b = HessianAccumulator(6, dtype=torch.float64)
    b.add_gram(gram(x.reshape(-1, 6), torch.float64), 30)
    assert a.H.dtype == torch.float64
    torch.testing.assert_close(a.H, b.H)
    with pytest.raises(ValueError, match="float32 or float64"):
        HessianAccumulator(6, dtype=torch.float16)


def test_wrong_width_is_named():
    with pytest.raises(ValueError, match="input width 6"):
        HessianAccumulator(6).add(torch.randn(4, 5))


def test_zero_dead_and_dampen():
    H = torch.diag(torch.tensor([2.0, 0.0, 4.0, 0.0]))
    W = torch.ones(3, 4)
    dead = zero_dead(H, W)
    assert dead.tolist() == [False, True, False, True]
    assert H.diagonal().tolist() == [2.0, 1.0, 4.0, 1.0]
    assert W[:, 1].abs().sum() == 0 and W[:, 3].abs().sum() == 0 and W[:, 0].sum() == 3
    dampen(H, 0.1)  # mean diag = 2 -> + 0.2
    assert torch.allclose(H.diagonal(), torch.tensor([2.2, 1.2, 4.2, 1.2]))


def test_inverse_cholesky_is_upper_factor_of_damped_inverse():
    torch.manual_seed(2)
    x = torch.randn(200, 16, dtype=torch.float64)
    H = 2 * x.t() @ x / 200
    U = inverse_cholesky(H, 0.01)
    assert torch.equal(U, U.triu())
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(Hd), rtol=1e-8, atol=1e-10)


def test_damping_is_raised_when_cholesky_fails(caplog):
    # eigenvalues 2.05 and -0.05: fails at 1% damping, works at 10%
    H = torch.tensor([[1.0, 1.05], [1.05, 1.0]], dtype=torch.float64)
    with caplog.at_level(logging.WARNING):
        U = inverse_cholesky(H, 0.01, layer="blk.0.q")
    assert "blk.0.q" in caplog.text
    torch.testing.assert_close(U.t() @ U, torch.linalg.inv(H + 0.1 * torch.eye(2, dtype=H.dtype)))


@pytest.mark.parametrize("H, match", [
    (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "NaN"),
    (-torch.eye(3), "negative diagonal"),
    (torch.tensor([[1.0, 3.0], [3.0, 1.0]]), "not positive definite"),  # eigenvalue -2
])
def test_impossible_hessian_raises_naming_layer(H, match):
    with pytest.raises(HessianError, match=match) as e:
        inverse_cholesky(H, 0.01, layer="model.blocks.3.ffn.up")
    assert "model.blocks.3.ffn.up" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_rank_deficient_is_repaired_by_damping():
    torch.manual_seed(3)
    x = torch.randn(50, 4)
    x = torch.cat([x, x[:, :2]], dim=1)  # duplicated inputs: rank 4 of 6
    H = 2 * x.t() @ x / 50
    U = inverse_cholesky(H, 0.01)
    assert torch.isfinite(U).all()
