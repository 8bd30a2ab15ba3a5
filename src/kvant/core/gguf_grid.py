"""llama.cpp's quantization grids (GGUF block types), exactly, in torch.

Every type dequantizes a weight as ``a[sub] * level[code] + b[sub]``: ``code`` is the stored
integer (0 .. L-1), ``level`` its value in the type's formula (e.g. ``code - 8`` for Q4_0, a
table entry for IQ4_NL), and ``a`` / ``b`` the scale and offset of the weight's sub-block,
computed from the stored fields in float32 in the same order as llama.cpp's (and the ``gguf``
package's) dequantization, so that kvant's weights and an engine's are the same floats:

=======  =====  =====  ==================================================================
type     block  bytes  fields (per block) -> a, b of each sub-block
=======  =====  =====  ==================================================================
Q4_0     32     18     d fp16 -> a = d, levels code - 8
Q4_1     32     20     d, m fp16 -> a = d, b = m, levels 0..15
Q5_0     32     22     d fp16 -> a = d, levels code - 16
Q5_1     32     24     d, m fp16 -> a = d, b = m, levels 0..31
Q8_0     32     34     d fp16 -> a = d, levels code - 128 (int8)
IQ4_NL   32     18     d fp16 -> a = d, levels = a fixed 16-entry table
Q2_K     256    84     d, dmin fp16; 16 x (4-bit sc, 4-bit m) -> a = d*sc, b = -(dmin*m)
Q3_K     256    110    d fp16; 16 x 6-bit signed sc -> a = d*sc, levels code - 4
Q4_K     256    144    d, dmin fp16; 8 x (6-bit sc, 6-bit m) -> a = d*sc, b = -(dmin*m)
Q5_K     256    176    as Q4_K, levels 0..31
Q6_K     256    210    d fp16; 16 x int8 sc -> a = d*sc, levels code - 32
=======  =====  =====  ==================================================================

The byte layouts (which bit of which byte holds a code or a sub-scale) are llama.cpp's
``block_*`` structs; :mod:`kvant.core.gguf_layout` packs and unpacks them.

Choosing the fields (:func:`fit_blocks`): per sub-block a float scale/offset is searched
(shrunken ranges, then a weighted least-squares refit), the sub-scales are quantized to the
type's integers under an fp16 super-scale, and each integer sub-scale (and min) is finally
moved by ±1 where that lowers the weighted error of its sub-block. ``imp`` weights the error
of every weight (GPTQ passes the Hessian diagonal, an importance matrix in llama.cpp's terms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK_K = 256
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_SHRINK = [1.0 - 0.025 * i for i in range(16)]  # range shrink factors tried per sub-block


@dataclass(frozen=True)
class GGUFType:
    """One llama.cpp block type.

    block / nbytes: weights and bytes per block; sub: weights sharing one scale (and min);
    n_levels / offset: codes 0..n_levels-1 have levels ``code - offset`` (table types: see
    ``table``); has_min: an additive per-sub-block offset is stored; sc_range: the integer
    range of the quantized sub-scales (K types); fallback: the type llama.cpp uses instead
    for rows whose width is not a multiple of ``block`` (None: such rows are refused);
    bits: the nominal bits of a code.
    """

    name: str
    block: int
    nbytes: int
    sub: int
    n_levels: int
    offset: int
    has_min: bool
    bits: int
    sc_range: tuple[int, int] | None = None
    table: tuple[int, ...] | None = None
    fallback: str | None = None

    @property
    def k_quant(self) -> bool:
        """A super-block type with quantized sub-scales."""
        return self.block == QK_K

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.block

    def levels(self, device=None) -> torch.Tensor:
        """(n_levels,) float32 level of each code."""
        if self.table is not None:
            return torch.tensor(self.table, dtype=torch.float32, device=device)
        return torch.arange(self.n_levels, dtype=torch.float32, device=device) - self.offset


TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("Q4_0", 32, 18, 32, 16, 8, False, 4),
    GGUFType("Q4_1", 32, 20, 32, 16, 0, True, 4),
    GGUFType("Q5_0", 32, 22, 32, 32, 16, False, 5),
    GGUFType("Q5_1", 32, 24, 32, 32, 0, True, 5),
    GGUFType("Q8_0", 32, 34, 32, 256, 128, False, 8),
    GGUFType("IQ4_NL", 32, 18, 32, 16, 0, False, 4, table=IQ4NL_VALUES),
    GGUFType("Q2_K", QK_K, 84, 16, 4, 0, True, 2, (0, 15), fallback="Q4_0"),
    GGUFType("Q3_K", QK_K, 110, 16, 8, 4, False, 3, (-32, 31), fallback="Q4_0"),
    GGUFType("Q4_K", QK_K, 144, 32, 16, 0, True, 4, (0, 63), fallback="Q5_0"),
    GGUFType("Q5_K", QK_K, 176, 32, 32, 0, True, 5, (0, 63), fallback="Q5_1"),
    GGUFType("Q6_K", QK_K, 210, 16, 64, 32, False, 6, (-128, 127), fallback="Q8_0"),
)}
# the types a user may ask for: each names llama.cpp's file type of that base type
# (kvant.core.gguf_mix), whose per-tensor mix also uses Q4_1, Q5_0, Q5_1 and Q5_K; IQ4_NL
# stays a grid kvant reads and rounds on
EXPORT_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q3_K", "Q2_K", "Q6_K")


def gguf_type(name: str) -> GGUFType:
    """The :class:`GGUFType` called ``name`` (e.g. "Q4_K"); a clear ValueError otherwise."""
    t = TYPES.get(str(name).upper())
    if t is None:
        raise ValueError(f"unknown GGUF type {name!r}; kvant writes {list(EXPORT_TYPES)}")
    return t


def type_for_width(t: GGUFType, k: int, layer: str = "") -> GGUFType:
    """The type a row of ``k`` weights gets: ``t``, or llama.cpp's fallback when ``k`` is not
    a multiple of ``t.block`` (as ``llama_model_quantize`` does); a ValueError when neither
    fits."""
    if k % t.block == 0:
        return t
    if t.fallback is not None and k % TYPES[t.fallback].block == 0:
        return TYPES[t.fallback]
    where = f" of layer {layer!r}" if layer else ""
    raise ValueError(f"GGUF type {t.name} needs rows of a multiple of {t.block} weights; the "
                     f"input width {k}{where} is not (nor a multiple of 32)")


def type_for_grid(grid: str, k: int, layer: str = "") -> GGUFType:
    """The type of a layer of input width ``k`` under a config's ``grid`` "gguf:TYPE"
    (:func:`type_for_width`; a ValueError naming the layer when no type fits)."""
    return type_for_width(gguf_type(grid.split(":", 1)[1]), k, layer)


def _f16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back (what is stored)."""
    return x.to(torch.float16).to(torch.float32)


def affine(t: GGUFType, f: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale ``a`` and offset ``b`` (R, n_sub) float32 from the stored fields ``f`` of R
    blocks, in the dequantization's order of operations (b None: the type has no offset)."""
    d = f["d"].to(torch.float32)
    if not t.k_quant:
        return d[:, None], f["m"].to(torch.float32)[:, None] if t.has_min else None
    a = d[:, None] * f["sc"].to(torch.float32)
    if not t.has_min:
        return a, None
    return a, -(f["dmin"].to(torch.float32)[:, None] * f["mn"].to(torch.float32))


def dequantize_blocks(t: GGUFType, codes: torch.Tensor, f: dict) -> torch.Tensor:
    """Weights (R, block) float32 of R blocks: ``codes`` (R, block) and fields ``f``."""
    a, b = affine(t, f)
    r = codes.shape[0]
    lv = t.levels(codes.device)[codes.long()].view(r, -1, t.sub)
    w = a[:, :, None] * lv
    if b is not None:
        w = w + b[:, :, None]
    return w.view(r, t.block)


def round_codes(t: GGUFType, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None):
    """Nearest codes (R, block) long of weights ``x`` (R, block) under per-sub-block ``a``,
    ``b`` (R, n_sub); a zero scale gives the code of level 0 (or 0)."""
    r = x.shape[0]
    xs = x.contiguous().view(r, -1, t.sub)
    if b is not None:
        xs = xs - b[:, :, None]
    safe = torch.where(a == 0, torch.ones_like(a), a)
    y = xs / safe[:, :, None]
    y = torch.where((a == 0)[:, :, None], torch.zeros_like(y), y)
    return codes_of(t, y).view(r, t.block)


def codes_of(t: GGUFType, y: torch.Tensor) -> torch.Tensor:
    """Codes (long, y's shape) of the levels nearest to ``y`` (weights divided by their
    scale, offset removed)."""
    if t.table is not None:
        lv = t.levels(y.device)
        return torch.bucketize(y.contiguous(), (lv[1:] + lv[:-1]) / 2)
    return (torch.round(y) + t.offset).clamp_(0, t.n_levels - 1).long()


def _sub_err(t, x, imp, a, b):
    """Weighted squared error (R, n_sub) of rounding ``x`` (R, block) with ``a``, ``b``."""
    c = round_codes(t, x, a, b)
    r = x.shape[0]
    lv = t.levels(x.device)[c].view(r, -1, t.sub)
    y = a[:, :, None] * lv + (0 if b is None else b[:, :, None])
    return ((y - x.view(r, -1, t.sub)).square() * imp.view(r, -1, t.sub)).sum(-1)


def _float_params(t: GGUFType, x: torch.Tensor, imp: torch.Tensor, fp16: bool):
    """Search a float scale (and offset) per sub-block: (a, b) (R, n_sub), b None without
    offsets. ``fp16``: the scale and offset are themselves stored as fp16 (32-blocks)."""
    r = x.shape[0]
    xs, ws = x.view(r, -1, t.sub), imp.view(r, -1, t.sub)
    rnd = _f16 if fp16 else (lambda v: v)
    lv = t.levels(x.device)
    best_a = best_b = None
    best = None
    if t.has_min:  # levels 0..L-1 -> [b, b + a (L-1)]; the offset covers the minimum (<= 0)
        lo = xs.amin(-1).clamp(max=0)
        hi = xs.amax(-1).clamp(min=0)
        cands = [(p * lo, p * hi) for p in _SHRINK]
    else:  # the largest |x| on either end of the (possibly asymmetric) level range
        idx = xs.abs().argmax(-1, keepdim=True)
        xm = xs.gather(-1, idx).squeeze(-1)
        cands = [(p * xm / float(lv[0]), None) for p in _SHRINK] + [
            (p * xm / float(lv[-1]), None) for p in _SHRINK]
    for c0, c1 in cands:
        if t.has_min:
            a, b = rnd((c1 - c0) / (t.n_levels - 1)), rnd(c0)
        else:
            a, b = rnd(c0), None
        # one weighted least-squares refit of (a, b) on the codes this candidate picks
        code = round_codes(t, x, a, b).view(r, -1, t.sub)
        q = lv[code]
        if t.has_min:
            sw, sq, sx = ws.sum(-1), (ws * q).sum(-1), (ws * xs).sum(-1)
            sqq, sqx = (ws * q * q).sum(-1), (ws * q * xs).sum(-1)
            det = sw * sqq - sq * sq
            ok = det > 1e-20 * sw * sqq.clamp(min=1e-30)
            a2 = torch.where(ok, (sw * sqx - sq * sx) / torch.where(ok, det, 1), a)
            b2 = torch.where(ok, (sqq * sx - sq * sqx) / torch.where(ok, det, 1), b)
            b2 = b2.clamp(max=0)
            cand2 = [(a, b), (rnd(a2.clamp(min=0)), rnd(b2))]
        else:
            sqq, sqx = (ws * q * q).sum(-1), (ws * q * xs).sum(-1)
            a2 = torch.where(sqq > 0, sqx / sqq.clamp(min=1e-30), a)
            cand2 = [(a, None), (rnd(a2), None)]
        for ca, cb in cand2:
            e = _sub_err(t, x, imp, ca, cb)
            if best is None:
                best, best_a, best_b = e, ca, cb
                continue
            better = e < best
            best = torch.where(better, e, best)
            best_a = torch.where(better, ca, best_a)
            if cb is not None:
                best_b = torch.where(better, cb, best_b)
    return best_a, best_b


def _quantize_sub(v: torch.Tensor, lo: int, hi: int, signed_max: bool):
    """Integer sub-scales of float values ``v`` (R, n_sub) under one fp16 super-scale per
    row: returns (d (R,) fp16-exact float32, ints (R, n_sub) long)."""
    if signed_max:  # the largest |v| maps to ``lo`` (the longer, negative end)
        idx = v.abs().argmax(-1, keepdim=True)
        d = _f16(v.gather(-1, idx).squeeze(-1) / lo)
    else:
        d = _f16(v.amax(-1).clamp(min=0) / hi)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    s = torch.round(v / safe[:, None]).clamp_(lo, hi)
    return d, torch.where(d[:, None] == 0, torch.zeros_like(s), s).long()


def _refine(t: GGUFType, x, imp, f: dict) -> None:
    """Move each integer sub-scale (and min) by -1, 0 or +1 where that lowers its
    sub-block's weighted error; ``f`` is updated in place."""
    lo, hi = t.sc_range
    steps = (-1, 0, 1)
    a, b = affine(t, f)
    best = _sub_err(t, x, imp, a, b)
    base_sc = f["sc"].clone()
    base_mn = f["mn"].clone() if t.has_min else None
    for ds in steps:
        for dm in steps if t.has_min else (0,):
            if ds == 0 and dm == 0:
                continue
            g = dict(f, sc=(base_sc + ds).clamp(lo, hi))
            if t.has_min:
                g["mn"] = (base_mn + dm).clamp(0, hi)
            ca, cb = affine(t, g)
            e = _sub_err(t, x, imp, ca, cb)
            better = e < best
            best = torch.where(better, e, best)
            f["sc"] = torch.where(better, g["sc"], f["sc"])
            if t.has_min:
                f["mn"] = torch.where(better, g["mn"], f["mn"])


def fit_blocks(t: GGUFType, x: torch.Tensor, imp: torch.Tensor | None = None):
    """Choose the stored fields of R blocks ``x`` (R, block) and round them.

    imp: (R, block) or (block,) non-negative error weights (None: all 1).
    Returns (codes (R, block) long, fields dict of tensors, leading dim R): ``d`` (and ``m``
    or ``dmin``) as fp16-exact float32, ``sc`` (and ``mn``) long sub-scales (K types).
    """
    x = x.float().contiguous()
    r = x.shape[0]
    imp = torch.ones_like(x) if imp is None else imp.float().expand_as(x).contiguous()
    imp = imp + 1e-12  # an all-zero importance still ranks candidates by plain error
    if not t.k_quant:
        a, b = _float_params(t, x, imp, fp16=True)
        f = {"d": a[:, 0]}
        if t.has_min:
            f["m"] = b[:, 0]
    else:
        a, b = _float_params(t, x, imp, fp16=False)
        lo, hi = t.sc_range
        d, sc = _quantize_sub(a, lo, hi, signed_max=lo < 0)
        f = {"d": d, "sc": sc}
        if t.has_min:
            f["dmin"], f["mn"] = _quantize_sub(-b, 0, hi, signed_max=False)
        _refine(t, x, imp, f)
    ca, cb = affine(t, f)
    codes = round_codes(t, x, ca, cb)
    assert codes.shape == (r, t.block)
    return codes, f


def rtn_fit(w: torch.Tensor, t: GGUFType, imp: torch.Tensor | None = None):
    """Round-to-nearest of a weight (N, K) on type ``t`` (K a multiple of ``t.block``).

    imp: (K,) importance of each input column or None. Returns (codes (N, K) long,
    fields with leading dims (N, K // block)), dequantized (N, K) float32)."""
    n, k = w.shape
    nb = k // t.block
    x = w.float().reshape(n * nb, t.block)
    im = None if imp is None else imp.float().view(1, nb, t.block).expand(n, nb, t.block
                                                                         ).reshape(n * nb, -1)
    codes, f = fit_blocks(t, x, im)
    deq = dequantize_blocks(t, codes, f).view(n, k)
    f = {key: v.view(n, nb, *v.shape[1:]) for key, v in f.items()}
    return codes.view(n, k), f, deq
