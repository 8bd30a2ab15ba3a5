"""The E8P codebook op on the CPU (no Triton needed): the kernel's word tables decode every
code exactly as kvant.core.e8p does, the op's reference equals the layer's, and the layer
keeps the reference where the kernel does not apply."""

import pytest
import torch

from kvant.core.e8p import codebook
from kvant.core.e8p_words import abs_words, kernel_tables
from kvant.kernels import codebook as cbk
from kvant.nn.quipsharp_linear import QuipSharpLinear


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_word_tables_decode_every_code(dtype):
    t = kernel_tables()
    codes = torch.arange(1 << 16)
    assert torch.equal(cbk.decode_words(codes, t, 8, dtype), codebook("e8p").decode(codes))
    small = torch.arange(256)
    assert torch.equal(cbk.decode_words(small, t, 0, dtype), codebook("e8p1").decode(small))
    # stored int16 patterns (negative values) decode like their uint16 code
    stored = codes.to(torch.int32).where(codes < 1 << 15, codes - (1 << 16)).to(torch.int16)
    assert torch.equal(cbk.decode_words(stored, t, 8, dtype), codebook("e8p").decode(codes))


def test_word_tables_layout():
    t = kernel_tables()
    assert t.shape == (642, 4) and t.dtype == torch.int32
    absw, sgn = cbk.split_tables(t, torch.float16)
    assert torch.equal(absw, abs_words(torch.float16))
    assert torch.equal(cbk.split_tables(t, torch.bfloat16)[0], abs_words(torch.bfloat16))
    # row 0: all 1/2 (fp16 0x3800), even sum: no parity bit
    assert absw[0].tolist() == [0x38003800] * 4
    # sign row 1: entry 0 negative (bit 15 of word 0) and the implied 8th sign (bit 31 of
    # word 3) flips with it
    assert sgn[1].tolist() == [0x8000, 0, 0, -(1 << 31)]
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        abs_words(torch.float32)
    with pytest.raises(ValueError, match="tables must be"):
        cbk.split_tables(t[:10], torch.float16)


def _layer(bits, scale="row", n=24, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = QuipSharpLinear(k, n, bits, scale=scale)
    m.qweight.copy_(torch.randint(-32768, 32768, m.qweight.shape, generator=g))
    if m.qweight_resid is not None:
        hi = 256 if bits == 3 else 1 << 16
        lo = 0 if bits == 3 else -32768
        m.qweight_resid.copy_(torch.randint(lo, lo + hi, m.qweight_resid.shape, generator=g))
    m.scales.copy_(torch.rand(m.scales.shape, generator=g) * 0.02 + 0.001)
    return m


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scale", ["row", "layer"])
def test_op_reference_matches_the_layer(bits, scale):
    m = _layer(bits, scale)
    x = torch.randn(3, 64)
    w = cbk.decoded_weight(m.qweight, m.qweight_resid, m.scales, m.kernel_tables, bits)
    assert torch.equal(w, m.rotated_weight())
    y = cbk.e8p_linear(x, m.qweight, m.qweight_resid, m.scales, m.kernel_tables, bits)
    assert torch.allclose(y, m.reference_product(x), atol=1e-6, rtol=1e-5)


def test_op_rejects_inconsistent_inputs():
    m = _layer(3)
    x = torch.randn(1, 64)
    t = m.kernel_tables
    with pytest.raises(ValueError, match="residual codes"):
        cbk.e8p_linear(x, m.qweight, None, m.scales, t, 3)
    with pytest.raises(ValueError, match="scales must be"):
        cbk.e8p_linear(x, m.qweight, m.qweight_resid, m.scales[:1], t, 3)
    with pytest.raises(ValueError, match="bits must be"):
        cbk.e8p_linear(x, m.qweight, None, m.scales[:1], t, 5)


def test_tables_are_derived_not_stored():
    m = _layer(3)
    assert "kernel_tables" not in m.state_dict()
    # 3 bits + two fp16 scales a row over K = 64 + the packed signs of 64 inputs, 24 outputs
    assert m.bits_per_weight() == pytest.approx(3 + 2 * 16 / 64 + (8 + 3) * 8 / (24 * 64))


def test_cpu_layer_stays_on_the_reference():
    m = _layer(2)
    x = torch.randn(1, 64)
    assert not cbk.kernel_applies(x)
    assert not m.prepare()  # nothing to prepare on the CPU
    assert m.kernel_layout is None
    assert torch.allclose(m._product(x), m.reference_product(x))
