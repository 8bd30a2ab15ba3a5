"""The bytes of llama.cpp's quantized blocks (ggml-common.h ``block_*``), packed and unpacked.

A block is a little-endian byte record; fp16 values take 2 bytes. Small integers share bytes
in one recurring pattern: a run of ``A * S * L`` values fills ``A * L`` bytes, value
``(a, s, l)`` (index ``a*S*L + s*L + l``) sitting at bits ``[s*nbits, (s+1)*nbits)`` of byte
``a*L + l`` (:func:`pack_fields`). The records, with that pattern's (A, S, L, nbits):

- Q4_0 / IQ4_NL: d | qs[16] = codes (1, 2, 16, 4)
- Q4_1: d | m | qs[16] as Q4_0
- Q5_0: d | qh[4] = code >> 4 (4, 8, 1, 1) | qs[16] = code & 15 as Q4_0
- Q5_1: d | m | qh[4], qs[16] as Q5_0
- Q8_0: d | qs[32] int8 = code - 128
- Q2_K: scales[16] = sc | m << 4 | qs[64] = codes (2, 4, 32, 2) | d | dmin
- Q3_K: hmask[32] = code >> 2 (1, 8, 32, 1) | qs[64] = code & 3 as Q2_K | scales[12] =
  u = sc + 32: u & 15 (1, 2, 8, 4), then u >> 4 (1, 4, 4, 2) | d
- Q4_K: d | dmin | scales[12] (below) | qs[128] = codes (4, 2, 32, 4)
- Q5_K: d | dmin | scales[12] as Q4_K | qh[32] = code >> 4 (1, 8, 32, 1) | qs[128] =
  code & 15 as Q4_K
- Q6_K: ql[128] = code & 15 (2, 2, 64, 4) | qh[64] = code >> 4 (2, 4, 32, 2) | scales[16]
  int8 | d

Q4_K's 12 scale bytes hold 8 six-bit scales ``sc`` and mins ``m``: for j < 4, byte j =
``sc[j] | (sc[j+4] >> 4) << 6``, byte 4+j = ``m[j] | (m[j+4] >> 4) << 6``, byte 8+j =
``(sc[j+4] & 15) | (m[j+4] & 15) << 4``.
"""

from __future__ import annotations

import torch

from kvant.core.gguf_grid import GGUFType

U8 = torch.uint8


def pack_fields(v: torch.Tensor, a: int, s: int, l: int, nbits: int) -> torch.Tensor:  # noqa: E741
    """Values ``v`` (R, a*s*l) in [0, 2**nbits) -> bytes (R, a*l)."""
    r = v.shape[0]
    v = v.to(torch.int32).view(r, a, s, l)
    shifts = (torch.arange(s, dtype=torch.int32, device=v.device) * nbits).view(1, 1, s, 1)
    return (v << shifts).sum(2).to(U8).reshape(r, a * l)


def unpack_fields(b: torch.Tensor, a: int, s: int, l: int,  # noqa: E741
                  nbits: int) -> torch.Tensor:
    """Inverse of :func:`pack_fields`: bytes (R, a*l) -> values (R, a*s*l) int64."""
    r = b.shape[0]
    b = b.to(torch.int32).view(r, a, 1, l)
    shifts = (torch.arange(s, dtype=torch.int32, device=b.device) * nbits).view(1, 1, s, 1)
    return ((b >> shifts) & ((1 << nbits) - 1)).reshape(r, a * s * l).long()


def _h(x: torch.Tensor) -> torch.Tensor:
    """(R,) float -> (R, 2) bytes of its float16."""
    return x.to(torch.float16).contiguous().view(U8).view(-1, 2)


def _f(b: torch.Tensor) -> torch.Tensor:
    """(R, 2) bytes -> (R,) float16 value as float32."""
    return b.contiguous().view(torch.float16).view(-1).to(torch.float32)


def _q4k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    lm = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return torch.cat([lo, lm, hi], 1).to(U8)


def _q4k_unscales(b: torch.Tensor):
    b = b.long()
    sc = torch.cat([b[:, :4] & 63, (b[:, 8:] & 15) | ((b[:, :4] >> 6) << 4)], 1)
    mn = torch.cat([b[:, 4:8] & 63, (b[:, 8:] >> 4) | ((b[:, 4:8] >> 6) << 4)], 1)
    return sc, mn


def encode(t: GGUFType, codes: torch.Tensor, f: dict) -> torch.Tensor:
    """R blocks -> bytes (R, t.nbytes): ``codes`` (R, block) in [0, n_levels), fields ``f``
    as :func:`kvant.core.gguf_grid.fit_blocks` returns them (leading dim R)."""
    c = codes.long()
    n = t.name
    if n in ("Q4_0", "IQ4_NL"):
        parts = [_h(f["d"]), pack_fields(c, 1, 2, 16, 4)]
    elif n == "Q4_1":
        parts = [_h(f["d"]), _h(f["m"]), pack_fields(c, 1, 2, 16, 4)]
    elif n == "Q5_0":
        parts = [_h(f["d"]), pack_fields(c >> 4, 4, 8, 1, 1), pack_fields(c & 15, 1, 2, 16, 4)]
    elif n == "Q5_1":
        parts = [_h(f["d"]), _h(f["m"]), pack_fields(c >> 4, 4, 8, 1, 1),
                 pack_fields(c & 15, 1, 2, 16, 4)]
    elif n == "Q8_0":
        parts = [_h(f["d"]), (c ^ 128).to(U8)]
    elif n == "Q2_K":
        parts = [(f["sc"] | (f["mn"] << 4)).to(U8), pack_fields(c, 2, 4, 32, 2),
                 _h(f["d"]), _h(f["dmin"])]
    elif n == "Q3_K":
        u = f["sc"] + 32
        parts = [pack_fields(c >> 2, 1, 8, 32, 1), pack_fields(c & 3, 2, 4, 32, 2),
                 pack_fields(u & 15, 1, 2, 8, 4), pack_fields(u >> 4, 1, 4, 4, 2), _h(f["d"])]
    elif n == "Q4_K":
        parts = [_h(f["d"]), _h(f["dmin"]), _q4k_scales(f["sc"], f["mn"]),
                 pack_fields(c, 4, 2, 32, 4)]
    elif n == "Q5_K":
        parts = [_h(f["d"]), _h(f["dmin"]), _q4k_scales(f["sc"], f["mn"]),
                 pack_fields(c >> 4, 1, 8, 32, 1), pack_fields(c & 15, 4, 2, 32, 4)]
    elif n == "Q6_K":
        parts = [pack_fields(c & 15, 2, 2, 64, 4), pack_fields(c >> 4, 2, 4, 32, 2),
                 (f["sc"] & 255).to(U8), _h(f["d"])]
    else:  # pragma: no cover - every TYPES entry is handled above
        raise NotImplementedError(f"no byte layout for {n}")
    out = torch.cat(parts, 1)
    assert out.shape[1] == t.nbytes, (n, out.shape)
    return out


def decode(t: GGUFType, b: torch.Tensor):
    """Bytes (R, t.nbytes) -> (codes (R, block) long, fields dict), inverse of :func:`encode`."""
    n = t.name
    if n in ("Q4_0", "IQ4_NL"):
        return unpack_fields(b[:, 2:], 1, 2, 16, 4), {"d": _f(b[:, :2])}
    if n == "Q4_1":
        return unpack_fields(b[:, 4:], 1, 2, 16, 4), {"d": _f(b[:, :2]), "m": _f(b[:, 2:4])}
    if n == "Q5_0":
        c = unpack_fields(b[:, 6:], 1, 2, 16, 4) | (unpack_fields(b[:, 2:6], 4, 8, 1, 1) << 4)
        return c, {"d": _f(b[:, :2])}
    if n == "Q5_1":
        c = unpack_fields(b[:, 8:], 1, 2, 16, 4) | (unpack_fields(b[:, 4:8], 4, 8, 1, 1) << 4)
        return c, {"d": _f(b[:, :2]), "m": _f(b[:, 2:4])}
    if n == "Q8_0":
        return b[:, 2:].long() ^ 128, {"d": _f(b[:, :2])}
    if n == "Q2_K":
        s = b[:, :16].long()
        return unpack_fields(b[:, 16:80], 2, 4, 32, 2), {
            "sc": s & 15, "mn": s >> 4, "d": _f(b[:, 80:82]), "dmin": _f(b[:, 82:84])}
    if n == "Q3_K":
        c = unpack_fields(b[:, 32:96], 2, 4, 32, 2) | (unpack_fields(b[:, :32], 1, 8, 32, 1) << 2)
        u = unpack_fields(b[:, 96:104], 1, 2, 8, 4) | (unpack_fields(b[:, 104:108], 1, 4, 4, 2)
                                                        << 4)
        return c, {"sc": u - 32, "d": _f(b[:, 108:110])}
    if n == "Q4_K":
        sc, mn = _q4k_unscales(b[:, 4:16])
        return unpack_fields(b[:, 16:], 4, 2, 32, 4), {
            "d": _f(b[:, :2]), "dmin": _f(b[:, 2:4]), "sc": sc, "mn": mn}
    if n == "Q5_K":
        sc, mn = _q4k_unscales(b[:, 4:16])
        c = unpack_fields(b[:, 48:], 4, 2, 32, 4) | (unpack_fields(b[:, 16:48], 1, 8, 32, 1)
                                                      << 4)
        return c, {"d": _f(b[:, :2]), "dmin": _f(b[:, 2:4]), "sc": sc, "mn": mn}
    if n == "Q6_K":
        c = unpack_fields(b[:, :128], 2, 2, 64, 4) | (unpack_fields(b[:, 128:192], 2, 4, 32, 2)
                                                       << 4)
        return c, {"sc": b[:, 192:208].contiguous().view(torch.int8).long(),
                   "d": _f(b[:, 208:210])}
    raise NotImplementedError(f"no byte layout for {n}")  # pragma: no cover
