"""Bit packing: golden words written out by hand, and round trips over shapes and widths."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kvant.formats.packing import pack, packed_width, unpack


def _i32(u: int) -> int:
    return u - (1 << 32) if u >= 1 << 31 else u


def test_golden_4bit():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert pack(q, 4).tolist() == [[_i32(0x87654321)]]


def test_golden_2bit():
    q = torch.tensor([[0, 1, 2, 3] * 4])
    assert pack(q, 2).tolist() == [[_i32(0xE4E4E4E4)]]


def test_golden_8bit_with_padding():
    q = torch.tensor([[1, 2, 3, 4, 255]])
    assert pack(q, 8).tolist() == [[0x04030201, 0xFF]]


def test_golden_3bit_crosses_word():
    # value 10 occupies stream bits 30..32: its low two bits end word 0, its top bit starts word 1
    q = torch.zeros(1, 11, dtype=torch.int64)
    q[0, 0], q[0, 10] = 1, 6  # 6 = 0b110
    assert pack(q, 3).tolist() == [[_i32(0x80000001), 0x1]]
    q = torch.full((1, 11), 7)
    assert pack(q, 3).tolist() == [[-1, 0x1]]


def test_packed_width():
    assert packed_width(128, 4) == 16
    assert packed_width(128, 3) == 12
    assert packed_width(11, 3) == 2
    assert packed_width(576, 2) == 36


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 5), k=st.integers(1, 130),
       seed=st.integers(0, 2 ** 16))
def test_round_trip(bits, rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (rows, k), generator=g, dtype=torch.int32)
    words = pack(q, bits)
    assert words.dtype == torch.int32
    assert words.shape == (rows, packed_width(k, bits))
    assert torch.equal(unpack(words, bits, k), q)


def test_round_trip_leading_dims():
    q = torch.randint(0, 8, (2, 3, 21), dtype=torch.int32)
    assert torch.equal(unpack(pack(q, 3), 3, 21), q)


def test_errors():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.zeros(1, 4, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(1, 3, dtype=torch.int32), 4, 8)
