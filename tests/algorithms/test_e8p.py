"""E8P codebook (kvant.core.e8p): size, lattice coset, norms, exact nearest-point search."""

import pytest
import torch

from kvant.core.e8p import NORM12, codebook


def _in_e8(v: torch.Tensor) -> torch.Tensor:
    """Rows of v (M, 8) that lie in E8 = D8 ∪ (D8 + ½): all integers or all half-integers,
    with an even sum."""
    twice = v * 2
    whole = (twice - twice.round()).abs().max(1).values < 1e-6
    ints = ((v - v.round()).abs().max(1).values < 1e-6)
    halves = whole & ((twice.round().long() % 2) != 0).all(1)
    even = (v.sum(1) - 2 * (v.sum(1) / 2).round()).abs() < 1e-6
    return (ints | halves) & even


@pytest.mark.parametrize("name,bits,size", [("e8p", 16, 1 << 16), ("e8p1", 8, 256)])
def test_codebook_size_coset_and_norms(name, bits, size):
    cb = codebook(name)
    assert cb.code_bits == bits and cb.size == size and cb.bits_per_weight == bits / 8
    T = cb.table
    assert T.shape == (size, 8)
    assert len(torch.unique(T, dim=0)) == size  # every code decodes to a distinct point
    assert bool(_in_e8(T - 0.25).all())  # all in the coset E8 + 1/4
    absn = cb.absolute.pow(2).sum(1)
    if name == "e8p":
        assert len(cb.absolute) == 256 and float(absn.max()) == 12.0
        assert int((absn <= 10).sum()) == 227 and int((absn == 12).sum()) == len(NORM12) == 29
        # ‖σ⊙a ± ¼‖ stays within ‖a‖ ± ‖¼·1‖ = ‖a‖ ± 0.7071
        norms = T.norm(dim=1)
        assert float(norms.max()) <= 12 ** 0.5 + 0.5 ** 0.5 + 1e-5
        assert float(norms.min()) >= 2 ** 0.5 - 0.5 ** 0.5 - 1e-5
    else:
        assert set(T.abs().unique().tolist()) == {0.25, 0.75}


@pytest.mark.parametrize("name", ["e8p", "e8p1"])
def test_decode_encode_round_trip(name):
    cb = codebook(name)
    codes = torch.randint(0, cb.size, (3000,), generator=torch.Generator().manual_seed(0))
    pts = cb.decode(codes)
    assert torch.equal(cb.nearest(pts), codes)  # a codeword is its own nearest point


@pytest.mark.parametrize("name,scale", [("e8p", 1.0), ("e8p", 2.5), ("e8p1", 0.7)])
def test_nearest_matches_brute_force(name, scale):
    cb = codebook(name)
    x = torch.randn(1500, 8, generator=torch.Generator().manual_seed(1)) * scale
    T = cb.table
    d_fast = (cb.decode(cb.nearest(x)) - x).pow(2).sum(1)
    d_brute = torch.cdist(x.double(), T.double()).pow(2).min(1).values.float()
    torch.testing.assert_close(d_fast, d_brute, atol=1e-4, rtol=1e-5)


def test_gaussian_mse_beats_scalar_2bit():
    # 2 bits per weight on unit Gaussians: the best 4-level scalar quantizer (Lloyd-Max)
    # has MSE 0.1175; E8P at its best scale measured 0.0915 on 2e5 vectors (docstring)
    cb = codebook("e8p")
    x = torch.randn(20000, 8, generator=torch.Generator().manual_seed(2))
    mse = min(float((cb.decode(cb.nearest(x * s)) / s - x).pow(2).mean())
              for s in (0.95, 1.025, 1.1))
    assert 0.085 < mse < 0.097, mse
    with pytest.raises(ValueError, match="unknown codebook"):
        codebook("e8")
