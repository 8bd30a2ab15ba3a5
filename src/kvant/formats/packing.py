"""Bit packing of small unsigned integers into int32 words.

Layout (the on-disk contract, see docs/FORMAT.md): each row of a ``(..., K)`` integer tensor
is read as a little-endian bit stream. Value ``j`` of a row occupies bits
``[j*bits, (j+1)*bits)`` of the stream; bit ``i`` of the stream is bit ``i % 32`` of word
``i // 32``. A row of K values takes ``ceil(K*bits/32)`` words, the unused high bits of the
last word are zero. For 2, 4 and 8 bits a value never crosses a word; for 3 bits it does
(value 10 uses bits 30-31 of word 0 and bit 0 of word 1). Words are stored as int32 (two's
complement), so a word with bit 31 set reads as a negative number.

Example, 4 bits: values [1, 2, 3, 4, 5, 6, 7, 8] -> one word 0x87654321.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_width(k: int, bits: int) -> int:
    """Number of int32 words that hold ``k`` values of ``bits`` bits."""
    return (k * bits + 31) // 32


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _positions(k: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit offset of each of ``k`` values in a row's stream."""
    start = torch.arange(k, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ints ``q`` (..., K), each in ``[0, 2**bits)``, into int32 (..., words)."""
    _check_bits(bits)
    if q.dtype.is_floating_point:
        raise TypeError("pack expects an integer tensor")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 1 << bits):
        raise ValueError(f"values out of range for {bits}-bit packing: "
                         f"[{int(q.min())}, {int(q.max())}]")
    *lead, k = q.shape
    n_words = packed_width(k, bits)
    q = q.reshape(-1, k).to(torch.int64)
    word, off = _positions(k, bits, q.device)
    # bit ranges are disjoint, so adding the shifted values is a bitwise or; a value that
    # crosses into the next word leaves its high bits there (one spare word absorbs the last)
    words = torch.zeros(q.shape[0], n_words + 1, dtype=torch.int64, device=q.device)
    words.index_add_(1, word, (q << off) & 0xFFFFFFFF)
    words.index_add_(1, word + 1, q >> (32 - off))
    words = words[:, :n_words]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.reshape(*lead, n_words)


def unpack(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 (..., words) -> int32 values (..., k) in [0, 2**bits)."""
    _check_bits(bits)
    if words.dtype != torch.int32:
        raise TypeError(f"unpack expects int32 words, got {words.dtype}")
    *lead, n_words = words.shape
    if n_words != packed_width(k, bits):
        raise ValueError(f"{n_words} words cannot hold exactly {k} values of {bits} bits "
                         f"(expected {packed_width(k, bits)} words)")
    w = words.reshape(-1, n_words)
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        # word-aligned widths: int32 arithmetic shifts, the mask drops the sign extension
        per = 32 // bits
        shifts = torch.arange(per, device=w.device, dtype=torch.int32) * bits
        vals = ((w.unsqueeze(-1) >> shifts) & mask).reshape(w.shape[0], n_words * per)[:, :k]
        return vals.reshape(*lead, k)
    w = torch.nn.functional.pad(w.to(torch.int64) & 0xFFFFFFFF, (0, 1))
    word, off = _positions(k, bits, w.device)
    lo = w[:, word] >> off
    hi = w[:, word + 1] << (32 - off)
    return ((lo | hi) & mask).to(torch.int32).reshape(*lead, k)
