"""The SpQR op: ``x @ Wᵀ`` for ``W = dense + S`` read from a load-time layout (issue 14 item 5).

``nn/spqr_linear.py`` stores the dense part as ``(q - z[n, g]) * s[n, g]`` (``bits``-bit q,
groups of ``group_size`` input columns, optional act-order ``perm``), its statistics s and z
quantized to ``stat_bits`` in groups of ``stat_group_size`` output rows with an fp16 (base,
step) each (zeros are real numbers), and S as fp16 outliers in CSR. :func:`repack` turns that
into :class:`SpQRPacked`, the layout the Triton kernel (kernels/triton/spqr.py) reads in one
sequential pass; ``kvant::spqr_linear`` takes its tensors. Pure torch here (no Triton), so the
layout and the op's reference run and are tested anywhere.

Layout, and why (bytes read per weight for the typical 3-bit g16, stat_bits 3, 16-row stat
groups, 1 % outliers in brackets):

- ``qweight``: the planes encoding of kernels/triton/repack.py (3 bits = a 2-bit plane plus a
  1-bit plane; 2/4/8 bits one plane; K padded to whole chunks), so a row's words stream
  sequentially and unpack element-wise with the magic-number helpers of planes.py [3 bits].
  But inside a chunk the columns are reordered (:func:`chunk_order`) so that each word holds
  ``S`` *consecutive* columns (S = 16 at 2/3 bits, 8 at 4, 4 at 8 bits; at 3 bits the
  1-bit plane follows the 2-bit one): a SpQR group (16 columns, or a multiple of 16) is then
  one word (or 2, 4) of a (rows, 32) word tile, not a piece of every plane. So the kernel
  dequantizes the statistics once per word tile, in the tile's own register layout, and uses
  them for all S values of each word; with the plain order a group of 16 would be half of
  every 32-column plane and the statistics would be recomputed (or shuffled) for every 16
  weights in every thread that holds a piece of them. Columns are in act-order (sorted by
  group) order before that.
- ``stats``: the two statistic integers of the group of each word of the first plane
  (``s_int | z_int << shift``; shift 4 for stat_bits <= 4: one uint8; 8 for stat_bits 8:
  int16), (N, Kp / S): laid out like the word tiles, so the kernel loads a (rows, 32) tile
  of them in the words' own register layout, once per 32·S columns (with the (N, G) order the
  compiler shuffled every plane through shared memory). A group of 16·t columns is t words
  (S = 16), so its byte is repeated t times; at S = 16 and groups of 16 this is exactly the
  (N, G) table [8 bits / 16 weights = 0.5]. With stat_bits 16: the fp16 scales here and the
  integer zeros uint8 in ``zeros``, same shape [24 bits / 16 weights].
- ``params``: fp16 (4, N / stat_group_size, Kp / S) = scale base, scale step, zero base, zero
  step of each second-level group, per word as ``stats``; dequantized in the kernel
  (``s = max(base + s_int·step, 1e-8)``, ``z = base + z_int·step``, as core.stats) [64 bits /
  256 weights = 0.25]. Keeping s and z as fp16 per group of 16 would read 2 bits a weight
  more.
- ``perm``: int32 (Kp,), for each position of the chunk order the stored column of x it
  multiplies (act-order and the chunk order composed; 0 in the padding), or None without
  act-order, where the kernel computes the columns: x is gathered, the weights stream.
- ``outliers``: int32 (nnz,), ``fp16 bits << 16 | column`` (stored column order: no
  permutation), and ``rowptr`` int32 (N+1,): one 4-byte load an outlier, read by the kernel's
  epilogue [32 bits × 1 % = 0.32, plus 32 bits a row].

Typical total: 3 + 0.5 + 0.25 + 0.32 ≈ 4.07 bits read a weight (W4 g128's kernels: 4.19).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kvant.formats.packing import unpack
from kvant.kernels.triton import repack as rp

KERNEL_MAX_M = 16  # rows of x the kernel takes; above, dequantize once and one matmul
# rows of x the CUDA-core form takes by default; above, tensor cores (sm_90 offline, 3 bits:
# ~9.1 instructions a weight and row on CUDA cores, ~14 a weight for all 16 rows with tl.dot)
GEMV_MAX_M = 1
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# core.stats.MIN_SCALE, the clamp of second-level scales (kernels import nothing from core:
# tests/kernels/test_kernels_dispatch.py)
MIN_SCALE = 1e-8


@dataclass
class SpQRPacked:
    """A SpQR weight in the kernel's layout (module docstring), tensors on one device.

    stat_shift: 0 for plain fp16 statistics (``stats`` fp16 scales, ``zeros`` uint8), else the
    bit position of the zero integer in ``stats``; ``params`` None then."""

    qweight: torch.Tensor
    stats: torch.Tensor
    zeros: Optional[torch.Tensor]
    params: Optional[torch.Tensor]
    perm: Optional[torch.Tensor]
    outliers: Optional[torch.Tensor]
    rowptr: Optional[torch.Tensor]
    bits: int
    group_size: int
    stat_group_size: int
    stat_shift: int
    in_features: int
    out_features: int

    def tensors(self) -> tuple:
        """The op's tensor arguments, in its order."""
        return (self.qweight, self.stats, self.zeros, self.params, self.perm, self.outliers,
                self.rowptr)

    def nbytes(self) -> int:
        """Bytes the kernel reads per call for the weight (every tensor above)."""
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)


def supported(bits: int, group_size: int, in_features: int) -> Optional[str]:
    """None when the kernel lays this weight out, else why not."""
    if bits not in (2, 3, 4, 8):
        return f"bits={bits}"
    if group_size <= 0 or group_size % 16 or in_features % group_size:
        return (f"group_size={group_size} (the kernel needs a multiple of 16 dividing "
                f"in_features={in_features})")
    if in_features > 1 << 16:
        return f"in_features={in_features} > 65536 (outlier columns are 16-bit)"
    return None


def slots(bits: int) -> int:
    """Consecutive columns a word holds in the chunk order (values a word of the first plane)."""
    return 16 if bits in (2, 3) else 32 // bits


def chunk_order(bits: int, kp: int, device=None) -> torch.Tensor:
    """(kp,) int64: the column (in act-order sorted order) at each position of the planes
    encoding. Position ``c·CK + P·32 + r`` (chunk c, plane P, word r) holds column
    ``c·CK + (P // S)·32·S + r·S + P % S``: word r of plane group P // S holds S consecutive
    columns (module docstring)."""
    ck, sl = rp.chunk_k(bits), slots(bits)
    v = torch.arange(kp, device=device)
    c, pl, r = v // ck, (v % ck) // 32, v % 32
    return c * ck + (pl // sl) * 32 * sl + r * sl + pl % sl


def _hi_order(hi: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The 3-bit high-bit plane's bit order: planes (h·16 + j) -> bit 2j + h of a 1-bit word
    (h: the half of the chunk, j: the value in its 2-bit word), or back."""
    rows, kp = hi.shape
    t = hi.reshape(rows, kp // 1024, *((16, 2) if inverse else (2, 16)), 32)
    return t.transpose(2, 3).reshape(rows, kp)


def encode(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers (rows, Kp) in the chunk order -> words (rows, Kp·bits/32): the planes
    encoding (repack.py), at 3 bits with the high bit of value j of half h of a chunk at bit
    2j + h of its 1-bit word (not h·16 + j): shifted once per tile (left by 2 - h, right by
    14 + h) the word then has every high bit where its value's 2-bit field needs it, so the
    kernel ors it in with no shift a weight."""
    if bits != 3:
        return rp._encode(q, bits)
    return torch.cat([rp._pack_planes(q & 3, 2), rp._pack_planes(_hi_order(q >> 2), 1)], 1)


def decode(w: torch.Tensor, bits: int, kp: int) -> torch.Tensor:
    """Inverse of :func:`encode`: words -> (rows, Kp) int64."""
    if bits != 3:
        return rp._decode(w, bits, kp)
    lo, hi = rp._unpack_planes(w[:, : kp // 16], 2), rp._unpack_planes(w[:, kp // 16:], 1)
    return lo | (_hi_order(hi, inverse=True) << 2)


def repack(qweight: torch.Tensor, bits: int, group_size: int, in_features: int,
           perm: Optional[torch.Tensor], stat_bits: int, stat_group_size: int,
           scale_q: Optional[torch.Tensor], zero_q: Optional[torch.Tensor],
           scale_stats: Optional[torch.Tensor], zero_stats: Optional[torch.Tensor],
           scales: Optional[torch.Tensor], qzeros: Optional[torch.Tensor],
           rowptr: Optional[torch.Tensor], cols: Optional[torch.Tensor],
           vals: Optional[torch.Tensor]) -> SpQRPacked:
    """SpQRLinear's stored tensors (nn/spqr_linear.py, same names) -> :class:`SpQRPacked` on
    qweight's device. Raises NotImplementedError where :func:`supported` says no."""
    n, k = qweight.shape[0], in_features
    why = supported(bits, group_size, k)
    if why is not None:
        raise NotImplementedError(f"no SpQR kernel for {why}")
    g = k // group_size
    ck = rp.chunk_k(bits)
    kp = -(-k // ck) * ck
    dev = qweight.device
    order = None if perm is None else perm.long()
    if order is not None and torch.equal(order, torch.arange(k, device=dev)):
        order = None
    pos = chunk_order(bits, kp, dev)  # (Kp,) sorted column of each position
    cols_in = pos.clamp(max=k - 1) if order is None else order[pos.clamp(max=k - 1)]
    cols_in = torch.where(pos < k, cols_in, k)  # padding reads a zero column
    step = max(1, (1 << 24) // kp)
    words = []
    for r0 in range(0, n, step):
        q = torch.nn.functional.pad(unpack(qweight[r0:r0 + step], bits, k), (0, 1))
        words.append(encode(q[:, cols_in], bits))
    # transposed: (words, N), so a (32 words, rows) tile is contiguous along the rows
    sl = slots(bits)
    word_group = (torch.arange(kp // sl, device=dev) * sl // group_size).clamp(max=g - 1)
    if stat_bits < 16:
        shift = 4 if stat_bits <= 4 else 8
        si = unpack(scale_q[None], stat_bits, n * g)[0].reshape(n, g).to(torch.int32)
        zi = unpack(zero_q[None], stat_bits, n * g)[0].reshape(n, g).to(torch.int32)
        both = (si | (zi << shift))[:, word_group]
        stats = (both.to(torch.uint8) if shift == 4 else
                 torch.where(both >= 1 << 15, both - (1 << 16), both).to(torch.int16))
        zeros = None
        # (2, N/sg, G) base/step of the scales, then of the zeros
        params = torch.cat([scale_stats, zero_stats]).to(torch.float16)[:, :, word_group]
    else:
        shift = 0
        stats = scales.to(torch.float16)[:, word_group].contiguous()
        zeros = unpack(qzeros, bits, g).to(torch.uint8)[:, word_group].contiguous()
        params = None
    outl = None
    if vals is not None and vals.numel():
        bits16 = vals.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
        word = (bits16 << 16) | (cols.to(torch.int64) & 0xFFFF)
        outl = torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)
    perm_v = None
    if order is not None:
        perm_v = torch.where(pos < k, cols_in, 0).to(torch.int32).contiguous()
    return SpQRPacked(torch.cat(words, 0).t().contiguous(), stats.t().contiguous(),
                      None if zeros is None else zeros.t().contiguous(),
                      None if params is None else params.transpose(1, 2).contiguous(),
                      perm_v,
                      outl, None if outl is None else rowptr.to(torch.int32).contiguous(),
                      bits, group_size, stat_group_size if stat_bits < 16 else 1, shift, k, n)


def grid(p: SpQRPacked) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, z) float32 (N, Kp / S) of every word from the packed statistics, as the kernel
    computes them."""
    if p.stat_shift == 0:
        return p.stats.t().float(), p.zeros.t().float()
    mask = (1 << p.stat_shift) - 1
    u = p.stats.t().to(torch.int32) & 0xFFFF
    prm = p.params.transpose(1, 2).float().repeat_interleave(p.stat_group_size, dim=1)
    s = prm[0] + (u & mask).float() * prm[1]
    z = prm[2] + ((u >> p.stat_shift) & mask).float() * prm[3]
    return s.clamp_min(MIN_SCALE), z


def dense_weight(p: SpQRPacked) -> torch.Tensor:
    """The dense part (N, K) float32 in stored column order, decoded from the packed layout."""
    k = p.in_features
    kp = p.qweight.shape[0] * 32 // p.bits
    qv = decode(p.qweight.t(), p.bits, kp).float()  # (N, Kp) in the chunk order
    pos = chunk_order(p.bits, kp, qv.device)
    q = torch.empty_like(qv).index_copy_(1, pos, qv)[:, :k]  # act-order sorted order
    s, z = grid(p)
    wi = torch.arange(k, device=q.device) // slots(p.bits)  # the word of each column
    w = (q - z[:, wi]) * s[:, wi]
    if p.perm is None:
        return w
    stored = p.perm.long()[torch.argsort(pos)][:k]  # stored column of each sorted column
    return torch.empty_like(w).index_copy_(1, stored, w)


def csr_matmul(x: torch.Tensor, rowptr: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
               n: int) -> torch.Tensor:
    """``x @ Sᵀ`` for a CSR matrix S (n, K): x (..., K) -> (..., n) in x's dtype.

    Index-based reference (gather the columns, scatter-add into rows), float32 accumulation;
    works on every device and for nnz == 0."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.zeros(x2.shape[0], n, dtype=torch.float32, device=x.device)
    if vals.numel():
        counts = (rowptr[1:] - rowptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(n, device=x.device), counts)
        contrib = x2[:, cols.long()].float() * vals.float()  # (B, nnz)
        out.index_add_(1, rows, contrib)
    return out.to(x.dtype).reshape(*lead, n)


def outlier_product(x: torch.Tensor, outliers: torch.Tensor, rowptr: torch.Tensor,
                    n: int) -> torch.Tensor:
    """``x @ Sᵀ`` (..., n) in x's dtype from the packed outlier words."""
    vals = (outliers >> 16).to(torch.int16).view(torch.float16)
    return csr_matmul(x, rowptr, outliers & 0xFFFF, vals, n)


def _packed(qweight, stats, zeros, params, perm, outliers, rowptr, bits, group_size,
            stat_group_size, stat_shift, in_features) -> SpQRPacked:
    return SpQRPacked(qweight, stats, zeros, params, perm, outliers, rowptr, bits, group_size,
                      stat_group_size, stat_shift, in_features, stats.shape[1])


def reference(x: torch.Tensor, p: SpQRPacked) -> torch.Tensor:
    """The dense weight rounded to x's dtype, one matmul, plus the outliers in float32 (the
    roundings of SpQRLinear.reference_product)."""
    y = torch.matmul(x, dense_weight(p).to(x.dtype).t())
    if p.outliers is not None:
        y = y + outlier_product(x, p.outliers, p.rowptr, p.out_features)
    return y


@torch.library.custom_op("kvant::spqr_linear", mutates_args=())
def spqr_linear(x: torch.Tensor, qweight: torch.Tensor, stats: torch.Tensor,
                zeros: Optional[torch.Tensor], params: Optional[torch.Tensor],
                perm: Optional[torch.Tensor], outliers: Optional[torch.Tensor],
                rowptr: Optional[torch.Tensor], bits: int, group_size: int,
                stat_group_size: int, stat_shift: int, in_features: int,
                autotune: bool = False) -> torch.Tensor:
    """y = x @ (dense + S)ᵀ for the tensors of a :class:`SpQRPacked`; x (..., K) -> (..., N)
    in x's dtype. ``autotune`` (KernelOptions.autotune) matters only to the CUDA kernel."""
    return reference(x, _packed(qweight, stats, zeros, params, perm, outliers, rowptr, bits,
                                group_size, stat_group_size, stat_shift, in_features))


@spqr_linear.register_fake
def _(x, qweight, stats, zeros, params, perm, outliers, rowptr, bits, group_size,
      stat_group_size, stat_shift, in_features, autotune=False):
    return x.new_empty((*x.shape[:-1], stats.shape[1]))


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether the CUDA kernel (not the reference) computes a call with this input."""
    return (CUDA_KERNELS and x.is_cuda and x.dtype in KERNEL_DTYPES
            and 0 < x.numel() // max(1, x.shape[-1]) <= KERNEL_MAX_M)


def prepare(device: torch.device) -> bool:
    """Make the split-K counters on a CUDA ``device`` now (a later CUDA-graph capture finds
    them); False where the kernel cannot run there."""
    device = torch.device(device)
    if not (CUDA_KERNELS and device.type == "cuda"):
        return False
    from kvant.kernels.triton import spqr as ks

    ks.counters(device)
    return True


def apply(x: torch.Tensor, p: SpQRPacked, autotune: bool = False) -> torch.Tensor:
    """``kvant::spqr_linear`` on ``p``'s tensors."""
    return spqr_linear(x, *p.tensors(), p.bits, p.group_size, p.stat_group_size,
                       p.stat_shift, p.in_features, autotune)


def _register_cuda() -> bool:
    """Register the Triton kernel as the op's CUDA implementation where CUDA and Triton
    exist. A CPU-only install never imports Triton."""
    from kvant.kernels.triton import kernel_module

    ks = kernel_module("spqr")
    if ks is None:
        return False

    @torch.library.register_kernel("kvant::spqr_linear", "cuda")
    def _cuda(x, qweight, stats, zeros, params, perm, outliers, rowptr, bits, group_size,
              stat_group_size, stat_shift, in_features, autotune=False):
        p = _packed(qweight, stats, zeros, params, perm, outliers, rowptr, bits, group_size,
                    stat_group_size, stat_shift, in_features)
        if not kernel_applies(x):
            return reference(x, p)
        return ks.linear(x, p, autotune)

    return True


CUDA_KERNELS = _register_cuda()  # True where the op's CUDA implementation is the Triton one
