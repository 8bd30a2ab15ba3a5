"""Randomized Hadamard transforms: exact orthogonality, inverse, structure, sizes."""

import math

import pytest
import torch

from kvant.core.hadamard import (RandomizedHadamard, fwht, hadamard_matrix, pack_signs,
                                 split_size, unpack_signs)

# sizes of real layers (SmolLM2 576/1536, Llama 11008/14336/28672, nanoGPT 384/1536/64)
SIZES = [64, 384, 576, 1536, 11008, 14336, 28672]


@pytest.mark.parametrize("order", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 64, 72, 76, 108])
def test_hadamard_matrix_orders(order):
    h = hadamard_matrix(order)
    assert h is not None
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(h @ h.t(), order * torch.eye(order), atol=0, rtol=0)


def test_hadamard_matrix_unknown_order():
    assert hadamard_matrix(6) is None  # no Hadamard matrix of order 6 exists
    assert hadamard_matrix(172) is None  # exists, but none of our constructions reach it


@pytest.mark.parametrize("n, expect", [
    (64, (64, 1, "none")), (384, (32, 12, "hadamard")), (576, (16, 36, "hadamard")),
    (1536, (128, 12, "hadamard")), (11008, (256, 43, "random")),
    (14336, (512, 28, "hadamard")), (28672, (1024, 28, "hadamard"))])
def test_split_size(n, expect):
    assert split_size(n) == expect


def test_split_size_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive int"):
        split_size(0)
    with pytest.raises(ValueError, match="odd part 2053"):
        split_size(2053 * 4)


@pytest.mark.parametrize("n", SIZES)
def test_orthogonal_and_inverse(n):
    t = RandomizedHadamard(n, seed=7)
    x = torch.randn(3, 2, n, dtype=torch.float64)  # any leading shape, any float dtype
    y = t.forward(x)
    assert y.dtype == torch.float64 and y.shape == x.shape
    # norms and inner products preserved (float32 compute)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=2e-6, atol=0)
    torch.testing.assert_close(t.inverse(y), x, rtol=0, atol=2e-5)
    torch.testing.assert_close(t.forward(t.inverse(x)), x, rtol=0, atol=2e-5)


@pytest.mark.parametrize("n", [64, 384, 576, 1536])
def test_dense_matrix_is_orthogonal_kronecker(n):
    t = RandomizedHadamard(n, seed=1)
    v = t.matrix().double()
    torch.testing.assert_close(v @ v.t(), torch.eye(n, dtype=torch.float64), atol=5e-6, rtol=0)
    # V = (H_p ⊗ M) diag(signs) with every entry of a Hadamard-built V equal to ±1/sqrt(n)
    factor = torch.ones(1, 1) if t.factor is None else t.factor
    h = torch.kron(hadamard_matrix(t.p).double() / math.sqrt(t.p), factor.double())
    torch.testing.assert_close(v, (h * t.signs.double())[t.permutation()], atol=1e-6, rtol=0)
    torch.testing.assert_close(v.abs(), torch.full_like(v, n ** -0.5), atol=1e-6, rtol=0)


def test_random_factor_is_orthogonal_and_seeded():
    a, b, c = (RandomizedHadamard(11008, seed=s) for s in (3, 3, 4))
    f = a.factor.double()
    torch.testing.assert_close(f @ f.t(), torch.eye(43, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(a.factor, b.factor) and torch.equal(a.signs, b.signs)
    assert not torch.equal(a.signs, c.signs)
    assert not torch.allclose(a.factor, c.factor)


def test_signs_balanced_and_rebuildable():
    t = RandomizedHadamard(1536, seed=11)
    assert set(t.signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(t.signs.mean())) < 0.1
    t2 = RandomizedHadamard(1536, seed=999, signs=t.signs.clone())  # explicit signs win
    x = torch.randn(4, 1536)
    torch.testing.assert_close(t2.forward(x), t.forward(x), rtol=0, atol=0)


def test_low_precision_dtypes():
    t = RandomizedHadamard(576, seed=0)
    x = torch.randn(8, 576)
    for dt in (torch.float16, torch.bfloat16):
        y = t.forward(x.to(dt))
        assert y.dtype == dt
        torch.testing.assert_close(y.float(), t.forward(x), rtol=0.02, atol=0.02)


def test_incoherence_spreads_a_spike():
    t = RandomizedHadamard(384, seed=0)
    x = torch.zeros(384)
    x[17] = 100.0
    y = t.forward(x)
    # one coordinate of 100 becomes 384 coordinates of 100/sqrt(384)
    torch.testing.assert_close(y.abs(), torch.full_like(y, 100 / math.sqrt(384)), rtol=1e-5,
                               atol=0)


def test_fwht_matches_dense_sylvester():
    x = torch.randn(5, 256)
    h = hadamard_matrix(256) / 16
    torch.testing.assert_close(fwht(x), x @ h.t(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(3, 12))


def test_pack_signs_roundtrip():
    s = torch.tensor([1, -1, -1, 1, 1, 1, 1, 1, -1, 1, 1], dtype=torch.float32)
    packed = pack_signs(s)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b00000110, 0b00000001]
    assert torch.equal(unpack_signs(packed, 11), s)


def test_bad_input_named():
    t = RandomizedHadamard(64)
    with pytest.raises(ValueError, match="last dimension of 65"):
        t.forward(torch.randn(2, 65))
    with pytest.raises(TypeError, match="float"):
        t.forward(torch.ones(2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="signs must have shape"):
        RandomizedHadamard(64, signs=torch.ones(63))
