"""The E8P codebooks (kvant.core.e8p) as the small word tables the GPU kernel decodes from.

One int32 tensor (:data:`TABLE_ROWS`, 4), built once on the host by :func:`kernel_tables`:

- rows ``0 .. 256`` (fp16) and ``257 .. 513`` (bf16): the absolute vectors, row r < 256 =
  E8P's absolute vector r, row 256 = all ½ (E8P1), as 8 values of the activation dtype two a
  word (entry 2j in the low half of word j, 2j+1 in the high half), entry 7's sign bit set
  when Σa is odd (the parity the implied 8th sign needs);
- rows ``514 .. 641``: the sign masks, row s = the 7 explicit sign bits ``s`` (bit i: entry
  i) and the 8th sign, popcount(s) mod 2, at bits 15 and 31 of each word.

A code's 8 values without the shift are ``abs[idx] ^ signs[s]``: a look-up, one XOR a word.
The tables are an input of ``kvant::e8p_linear`` (kvant.kernels.codebook), which decodes
from them in torch as well, so the kernels package needs nothing from the codebook module.
"""

from __future__ import annotations

import functools

import torch

from kvant.core.e8p import DIM, codebook

ABS_ROWS = 257  # 256 E8P rows + the E8P1 row, per activation dtype
SIGN_ROWS = 128
TABLE_ROWS = 2 * ABS_ROWS + SIGN_ROWS
DTYPES = (torch.float16, torch.bfloat16)  # the order of the two absolute tables


def _as_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 values of 32-bit patterns -> int32 with the same bits."""
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


def abs_words(dtype: torch.dtype) -> torch.Tensor:
    """(257, 4) int32: the absolute table in ``dtype`` (module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"word tables exist for float16 and bfloat16, not {dtype}")
    a = torch.cat([codebook("e8p").absolute, torch.full((1, DIM), 0.5)])  # (257, 8)
    bits = a.to(dtype).view(torch.int16).long() & 0xFFFF  # (257, 8) 16-bit patterns
    bits[:, 7] |= (a.sum(1).round().long() & 1) << 15  # odd Σa: entry 7's sign flips
    return _as_int32(bits[:, 0::2] | (bits[:, 1::2] << 16))


def sign_words() -> torch.Tensor:
    """(128, 4) int32: the sign masks (module docstring)."""
    neg = (torch.arange(SIGN_ROWS)[:, None] >> torch.arange(7)) & 1  # (128, 7)
    neg = torch.cat([neg, neg.sum(1, keepdim=True) & 1], 1)  # (128, 8): + the implied sign
    return _as_int32((neg[:, 0::2] << 15) | (neg[:, 1::2] << 31))


@functools.lru_cache(maxsize=None)
def _tables() -> torch.Tensor:
    return torch.cat([abs_words(torch.float16), abs_words(torch.bfloat16), sign_words()])


def kernel_tables() -> torch.Tensor:
    """(TABLE_ROWS, 4) int32 on the host: fp16 and bf16 absolute tables, then sign masks (a
    fresh copy: the caller may move or keep it)."""
    return _tables().clone()
