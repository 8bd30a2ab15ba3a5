"""The fused transform's layout and dispatch on the CPU (no Triton needed): which sizes the
kernel lays out and how (kernels/hadamard.geometry through nn/quip_linear.kernel_plan), that
the axes rebuild n and the reference's output permutation, the factor's bf16 pieces, bad
input, and that nothing on the CPU takes the kernel."""

import math

import pytest
import torch

from kvant.core.hadamard import RandomizedHadamard
from kvant.kernels import hadamard as H
from kvant.nn.quip_linear import kernel_plan


def _geo(rh):
    p = kernel_plan(rh, "cpu")
    return None if p is None else p.geo


@pytest.mark.parametrize("n,axes,m,pieces", [
    (576, (16, 1, 64), 36, 1), (1536, (128, 1, 16), 12, 1), (4096, (64, 1, 64), 64, 0),
    (8192, (128, 1, 64), 64, 0), (11008, (16, 16, 64), 43, 3), (14336, (32, 16, 32), 28, 1),
    (28672, (32, 32, 32), 28, 1), (256, (16, 1, 16), 16, 0), (32768, (32, 32, 32), 32, 0)])
def test_geometry_of_model_widths(n, axes, m, pieces):
    rh = RandomizedHadamard(n, seed=1)
    geo = _geo(rh)
    assert (geo.d1, geo.d2, geo.d3) == axes and geo.m == m and geo.pieces == pieces
    assert geo.d1 * geo.d2 * m == n  # the unpadded axes hold n exactly
    norm = rh.p * (rh.m if rh.kind == "hadamard" else 1)
    assert geo.scale == pytest.approx(1 / math.sqrt(norm), rel=1e-12)
    assert 4 <= geo.warps <= 16


@pytest.mark.parametrize("n", [576, 4096, 8192, 11008, 64 * 43])
def test_permutation_is_the_references(n):
    # natural index i = i1·(n/d) + r lands at r·d + i1 (kernels/triton/hadamard.py)
    rh = RandomizedHadamard(n, seed=2)
    d = _geo(rh).perm_d
    i = torch.arange(n)
    where = (i % (n // d)) * d + i // (n // d) if d else i
    perm = rh.permutation()  # forward(x)[k] = natural[perm[k]]
    assert torch.equal(perm[where], i)


@pytest.mark.parametrize("n", [12, 64, 86, 128, 48, 8 * 43, 1 << 22, 2 * 1021])
def test_sizes_the_kernel_does_not_lay_out(n):
    # axes below 16 (small or 2^k·m with p < 16), a random factor above 128, too large
    assert _geo(RandomizedHadamard(n, seed=0)) is None


def test_plan_pieces_sum_to_the_factor():
    rh = RandomizedHadamard(11008, seed=3)
    p = kernel_plan(rh, "cpu")
    g = p.g_forward.reshape(3, 64, 64)
    assert torch.equal(g.sum(0)[:43, :43], rh.factor.t()) and not g[:, 43:].any()
    assert torch.equal(g, g.bfloat16().float())  # every piece is a bf16 value
    assert torch.equal(p.g_inverse.reshape(3, 64, 64).sum(0)[:43, :43], rh.factor)
    had = kernel_plan(RandomizedHadamard(576, seed=3), "cpu")
    assert set(had.g_forward.unique().tolist()) == {-1.0, 0.0, 1.0}


def test_cpu_tensors_never_take_the_kernel():
    p = kernel_plan(RandomizedHadamard(4096, seed=0), "cpu")
    assert not H.applies(p, torch.randn(2, 4096).half())
    assert not H.applies(None, torch.randn(2, 4096).half())


def test_bad_geometry_and_plan_input_are_one_clear_error():
    with pytest.raises(ValueError, match="not p·m"):
        H.geometry(100, 64, 2, "none", 64, 1)
    geo = H.geometry(4096, 4096, 1, "none", 64, 2)
    with pytest.raises(ValueError, match="signs uint8"):
        H.plan(geo, torch.zeros(4096 // 8, dtype=torch.int32), None, "cpu")
    with pytest.raises(ValueError, match="need no factor"):
        H.plan(geo, torch.zeros(4096 // 8, dtype=torch.uint8), torch.eye(4), "cpu")
