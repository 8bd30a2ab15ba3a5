"""Load-time repacking of a stored quantized weight into the layout the GPU kernels read.

Pure torch (no Triton), so it is tested on the CPU. docs/KERNELS.md draws both layouts.

Stored layout (docs/FORMAT.md): ``qweight`` (N, ceil(K*bits/32)) int32, each row a little-endian
bit stream in input-column order; ``scales`` (N, G) fp16; ``qzeros`` packed the same way along
G; optional act-order ``g_idx`` (K,).

Repacked layout ("plane-interleaved"):
- act-order is made free offline: the input columns are sorted by group (``perm``), so every
  group is a run of ``group_size`` consecutive columns; the kernel reads ``x[:, perm]``;
- K is padded with zero weights to a multiple of the chunk ``CK`` (see :func:`chunk_k`);
- for 2/4/8 bits, each row of a chunk is 32 words; word ``r`` holds the ``P = 32 / bits``
  values of columns ``k = chunk*CK + j*32 + r`` (j = 0..P-1) at bits ``[j*bits, (j+1)*bits)``.
  Extracting slot ``j`` of a (rows, 32) tile of words therefore gives the weights of 32
  *consecutive* columns (a "plane"): unpacking is element-wise and shape-preserving, needs no
  shuffle, and feeds ``tl.dot`` directly. Every plane lies inside one group for group sizes
  that are multiples of 32;
- 3 bits are split into the 2-bit layout of the low two bits (K/16 words a row) followed, in
  the same row, by a 1-bit layout of the high bit (K/32 words a row; chunk 1024, word ``r``
  bit ``p`` = column ``chunk*1024 + p*32 + r``): exactly 3 bits a weight, no word straddling;
- 4 bits use the "pairs" layout instead (group sizes dividing 128, per channel, per tensor;
  4-bit group size 256 keeps the planes layout): a chunk is 128 columns, 16 words a row, word ``c`` holding columns ``j*32 + 2c`` at bits ``4j`` and
  ``j*32 + 2c + 1`` at bits ``16 + 4j`` (j = 0..3). One and-or with ``0x000F000F << 4j``
  then yields two fp16 values of adjacent columns in one register (see planes.py); the
  words are stored in tiles of ``tile`` rows (:func:`tile_rows`, default :data:`PAIRS_TILE`);
- ``scales`` become (G, N) fp16 and zero points (G, N) uint8, transposed so that a tile of
  output channels reads them contiguously. Per-tensor grids are broadcast to per channel.
  In the 4-bit pairs layout they are one (G, N) int32 array of *group words* instead (fp16
  scale in the low half, the zero point as fp16 in the high half): 4 bytes a (group, row)
  are wide enough for Triton to pipeline them through shared memory with the weights
  (cp.async), and a shared-memory load hands them to the tensor-core layouts without the
  register shuffle (two barriers a use) that 1-2-byte loads needed (H200, 70B block shapes:
  benchmarks/results/gemv_70b.md). ``scales`` and ``zeros`` are then fp16 views into
  that array (stride 2), so the reference and every reader of the two names still work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from kvant.formats.packing import packed_width, unpack

PLANE_COLS = 32  # consecutive columns in one plane = words in one row of a chunk
# rows per tile of the 4-bit pairs layout (1 KB blocks a chunk): +0-13 % over row-major on
# the H200, 64 no better (docs/KERNELS.md); other heights remain for tests of the indexing
PAIRS_TILE = 16


def chunk_k(bits: int, pairs: bool = False) -> int:
    """Input columns in one repacked chunk: 32 words a row (3 bits: 1024 = 2-bit + 1-bit),
    or 128 columns (16 words) in the 4-bit pairs layout."""
    if pairs:
        return 128
    if bits == 3:
        return 1024
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits}")
    return PLANE_COLS * (32 // bits)


def use_pairs(bits: int, group_size: int) -> bool:
    """Whether a weight gets the 4-bit pairs layout (see the module docstring)."""
    if bits != 4:
        return False
    return group_size == 0 or 128 % group_size == 0


def kernel_group_size(bits: int, group_size: int, n_groups: int) -> int:
    """The group size the kernels use: 0 for one scale per row (per channel or per tensor)."""
    return 0 if n_groups == 1 else group_size


def supported(bits: int, group_size: int, n_groups: int) -> Optional[str]:
    """None when the kernels handle this grid, else the reason they do not."""
    if bits not in (2, 3, 4, 8):
        return f"bits={bits}"
    gs = kernel_group_size(bits, group_size, n_groups)
    if gs != 0 and (gs % PLANE_COLS or chunk_k(bits) % gs):
        return (f"group_size={group_size} (kernels need a multiple of 32 that divides "
                f"{chunk_k(bits)} for {bits}-bit weights, or per channel)")
    return None


@dataclass
class PackedWeight:
    """A weight in the kernels' layout (tensors on one device) and its shape.

    qweight: int32 (N, Kp*bits/32); scales: fp16 (G, N); zeros: uint8 (G, N) (pairs layout:
    both fp16 views into the group words, :func:`group_words`);
    perm: int32 (K,) input-column order (act-order) or None; group_size: 0 = one group.
    pairs: 4-bit pairs layout (else planes). tile: rows per tile of the pairs layout (1 =
    row-major; T > 1: qweight's memory holds, for each tile of T rows and each chunk, the T
    rows' 16 words contiguously, rows padded to a multiple of T; the tensor keeps the shape
    (N rounded up to T, Kp/8)).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: Optional[torch.Tensor]
    bits: int
    group_size: int
    in_features: int
    out_features: int
    pairs: bool = False
    tile: int = 1

    @property
    def k_padded(self) -> int:
        """K rounded up to whole chunks."""
        return self.qweight.shape[1] * 32 // self.bits

    def clone(self) -> "PackedWeight":
        """A copy with its own tensors (the pairs layout's scales and zero points stay views
        into one copy of their group words: cloning them one by one would split them)."""
        if self.pairs:
            g, n = self.scales.shape
            words = torch.empty(0, dtype=torch.int32, device=self.scales.device).set_(
                self.scales.untyped_storage(), self.scales.storage_offset() // 2, (g, n))
            s, z = word_views(words.clone())
        else:
            s, z = self.scales.clone(), self.zeros.clone()
        perm = None if self.perm is None else self.perm.clone()
        return replace(self, qweight=self.qweight.clone(), scales=s, zeros=z, perm=perm)

    def nbytes(self) -> int:
        """Bytes the kernel reads per call for the weight (qweight, scales, zeros, perm)."""
        ts = [self.qweight, self.scales, self.zeros] + ([self.perm] if self.perm is not None
                                                         else [])
        return sum(t.numel() * t.element_size() for t in ts)


def source_key(*tensors: Optional[torch.Tensor]) -> tuple:
    """Identity of stored tensors: (device, data_ptr, version, shape) each; rebuild on change."""
    return tuple(None if t is None else (str(t.device), t.data_ptr(), t._version, tuple(t.shape))
                 for t in tensors)


def _act_order_perm(g_idx: torch.Tensor, group_size: int, n_groups: int, k: int):
    """Permutation sorting columns by group, or None when already in order.

    Raises NotImplementedError when groups are not runs of exactly ``group_size`` columns after
    sorting (then no plane-aligned layout exists and the caller uses the reference).
    """
    g = g_idx.to(torch.int64)
    if g.numel() != k:
        raise ValueError(f"g_idx has {g.numel()} entries, expected in_features={k}")
    if int(g.min()) < 0 or int(g.max()) >= n_groups:
        raise ValueError(f"g_idx values must lie in [0, {n_groups}), got "
                         f"[{int(g.min())}, {int(g.max())}]")
    expected = torch.arange(k, device=g.device) // group_size
    if torch.equal(g, expected):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], expected):
        raise NotImplementedError("act-order g_idx whose groups do not all hold exactly "
                                  f"group_size={group_size} columns")
    return perm


def _pack_planes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, Kp) ints < 2**bits, Kp a multiple of 32*32/bits -> (rows, Kp*bits/32) int32."""
    rows, kp = q.shape
    per = 32 // bits
    q = q.to(torch.int64).reshape(rows, kp // (per * PLANE_COLS), per, PLANE_COLS)
    shifts = (torch.arange(per, device=q.device, dtype=torch.int64) * bits)[:, None]
    words = (q << shifts).sum(2)  # disjoint bit ranges: sum == or; (rows, chunks, 32)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.reshape(rows, kp * bits // 32)


def _unpack_planes(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_planes`: (rows, Kp*bits/32) int32 -> (rows, Kp) int64."""
    rows, nw = w.shape
    per = 32 // bits
    w = (w.to(torch.int64) & 0xFFFFFFFF).reshape(rows, nw // PLANE_COLS, 1, PLANE_COLS)
    shifts = (torch.arange(per, device=w.device, dtype=torch.int64) * bits)[:, None]
    return ((w >> shifts) & ((1 << bits) - 1)).reshape(rows, nw * per)


def _pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """(rows, Kp) 4-bit ints, Kp a multiple of 128 -> (rows, Kp/8) int32, pairs layout."""
    rows, kp = q.shape
    q = q.to(torch.int64).reshape(rows, kp // 128, 4, 16, 2)  # (chunk, plane j, word c, parity)
    shifts = (4 * torch.arange(4, device=q.device)[:, None, None]
              + 16 * torch.arange(2, device=q.device)[None, None, :])
    words = (q << shifts).sum((2, 4))  # (rows, chunks, 16)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.reshape(rows, kp // 8)


def _unpack_pairs(w: torch.Tensor) -> torch.Tensor:
    rows, nw = w.shape
    w = (w.to(torch.int64) & 0xFFFFFFFF).reshape(rows, nw // 16, 1, 16, 1)
    shifts = (4 * torch.arange(4, device=w.device)[:, None, None]
              + 16 * torch.arange(2, device=w.device)[None, None, :])
    return ((w >> shifts) & 15).reshape(rows, nw * 8)


def tile_rows(words: torch.Tensor, tile: int) -> torch.Tensor:
    """Row-major pairs words (N, W) -> tiled order, shape (N rounded up to ``tile``, W)."""
    if tile == 1:
        return words
    n, w = words.shape
    npad = -(-n // tile) * tile
    words = torch.nn.functional.pad(words, (0, 0, 0, npad - n))
    t = words.reshape(npad // tile, tile, w // 16, 16).permute(0, 2, 1, 3)
    return t.contiguous().reshape(npad, w)


def untile_rows(words: torch.Tensor, tile: int, n: int) -> torch.Tensor:
    """Inverse of :func:`tile_rows`: the first ``n`` rows in row-major order."""
    if tile == 1:
        return words[:n]
    npad, w = words.shape
    t = words.reshape(npad // tile, w // 16, tile, 16).permute(0, 2, 1, 3)
    return t.reshape(npad, w)[:n]


def _encode(q: torch.Tensor, bits: int, pairs: bool = False) -> torch.Tensor:
    """Integer weights (rows, Kp) -> repacked words; 3 bits = 2-bit plane words + 1-bit."""
    if pairs:
        return _pack_pairs(q)
    if bits == 3:
        return torch.cat([_pack_planes(q & 3, 2), _pack_planes(q >> 2, 1)], dim=1)
    return _pack_planes(q, bits)


def _decode(w: torch.Tensor, bits: int, kp: int, pairs: bool = False) -> torch.Tensor:
    if pairs:
        return _unpack_pairs(w)
    if bits == 3:
        lo, hi = w[:, : kp // 16], w[:, kp // 16:]
        return _unpack_planes(lo, 2) | (_unpack_planes(hi, 1) << 2)
    return _unpack_planes(w, bits)


def repack(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
           g_idx: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
           rows_per_step: int = 0, tile: int = PAIRS_TILE) -> PackedWeight:
    """Stored tensors -> :class:`PackedWeight` on the same device.

    ``tile``: rows per tile of the 4-bit pairs layout (ignored by the others). Works on
    slices of rows so the int64 temporaries stay near 2**24 elements. Raises
    NotImplementedError for grids the kernels do not handle (:func:`supported`).
    """
    n = qweight.shape[0]
    k = in_features
    n_groups = scales.shape[1]
    why = supported(bits, group_size, n_groups)
    if why is not None:
        raise NotImplementedError(f"no GPU kernel for {why}")
    gs = kernel_group_size(bits, group_size, n_groups)
    if qweight.shape[1] != packed_width(k, bits):
        raise ValueError(f"qweight has {qweight.shape[1]} words a row; {k} values of {bits} "
                         f"bits need {packed_width(k, bits)}")
    if gs and n_groups * gs != k:
        raise ValueError(f"{n_groups} groups of {gs} do not cover in_features={k}")
    perm = None
    if g_idx is not None and gs:
        perm = _act_order_perm(g_idx, gs, n_groups, k)
    pairs = use_pairs(bits, gs)
    ck = chunk_k(bits, pairs)
    kp = -(-k // ck) * ck
    step = rows_per_step or max(1, (1 << 24) // max(k, 1))
    words = []
    for r0 in range(0, n, step):
        q = unpack(qweight[r0:r0 + step], bits, k)  # (rows, K) int32, stored column order
        if perm is not None:
            q = q[:, perm]
        q = torch.nn.functional.pad(q, (0, kp - k))  # zero weights x zero-masked inputs
        words.append(_encode(q, bits, pairs))
    z = unpack(qzeros, bits, n_groups)  # (N or 1, G)
    s_t = scales.to(torch.float16).expand(n, n_groups).t().contiguous()
    z_t = z.expand(n, n_groups).t().to(torch.uint8).contiguous()
    if tile < 1:
        raise ValueError(f"tile must be a positive number of rows, got {tile}")
    tile = tile if pairs else 1
    if pairs:
        s_t, z_t = word_views(pack_group_words(s_t, z_t))
    return PackedWeight(tile_rows(torch.cat(words, 0), tile), s_t, z_t,
                        None if perm is None else perm.to(torch.int32).contiguous(),
                        bits, gs, k, n, pairs, tile)


def pack_group_words(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(G, N) fp16 scales and (G, N) integer zero points -> (G, N) int32 group words: the
    scale's fp16 bits low, the zero point's fp16 bits high (exact: zero points < 2048)."""
    s = scales.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    z = zeros.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    return (s | (z << 16)).contiguous()


def word_views(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (G, N) fp16 scales and zero points inside group words (views, stride 2)."""
    h = words.view(torch.float16)  # (G, 2N): little-endian, the low half first
    return h[:, 0::2], h[:, 1::2]


def group_words(p: PackedWeight) -> torch.Tensor:
    """The scales of a pairs-layout weight, checked to be the views :func:`word_views`
    makes, so the kernels may read them as (G, N) int32 group words from ``scales``'
    address. Raises ValueError for separately stored scales and zero points."""
    s, z = p.scales, p.zeros
    g, n = s.shape
    if not (s.dtype == z.dtype == torch.float16 and s.stride() == (2 * n, 2)
            and z.stride() == s.stride() and z.data_ptr() == s.data_ptr() + 2):
        raise ValueError("a 4-bit pairs-layout weight needs its scales and zero points as "
                         "views into group words (repack.pack_group_words / word_views)")
    return s


def dequantize_packed(p: PackedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The (N, K) weight in stored column order, from the repacked layout (reference)."""
    kp = p.k_padded
    words = untile_rows(p.qweight, p.tile, p.out_features)
    q = _decode(words, p.bits, kp, p.pairs)[:, : p.in_features].float()  # (N, K) permuted order
    if p.group_size:
        g = torch.arange(p.in_features, device=q.device) // p.group_size
        s, z = p.scales.t().float()[:, g], p.zeros.t().float()[:, g]
    else:
        s, z = p.scales.t().float(), p.zeros.t().float()
    w = ((q - z) * s).to(dtype)
    if p.perm is not None:
        out = torch.empty_like(w)
        out[:, p.perm.long()] = w
        w = out
    return w
