"""E8P: QuIP#'s 8-dimensional lattice codebook (Tseng et al., 2024, §4), and its 1-bit sibling.

The E8 lattice is ``D8 ∪ (D8 + ½·1)`` (D8: integer vectors with an even sum). Its coset
``D̂8 = D8 + ½·1`` holds the vectors of half-integers (every entry in ℤ + ½) with an even sum.
Every entry of such a vector is non-zero, so a vector is its absolute values plus signs, and
the signs are constrained by one parity: flipping entry i changes the sum by the odd number
2|x_i|, so for given absolute values ``a`` exactly the sign patterns whose number of minus
signs has the parity of ``Σ a`` land in D̂8. The 8th sign is therefore implied by the other 7.

A codebook here is a table ``A`` of absolute vectors (positive half-integers) and the points

    c = σ ⊙ a + t/4 · 1,     a ∈ A,  σ ∈ {±1}⁸ with the parity above,  t ∈ {+1, -1},

all in the shifted lattice ``E8 + ¼·1`` (``σ ⊙ a ∈ D̂8 ⊂ E8``; for t = -1,
``D̂8 - ¼ = (D̂8 - ½) + ¼`` and ``D̂8 - ½ = D8 ⊂ E8``). The shift makes the set symmetric
around 0 as a whole while every point stays off the origin. A code is one integer:

    bits [0, ib)        index of ``a`` in A  (ib = log2 |A|)
    bits [ib, ib + 7)   signs of entries 0..6 (bit set = minus); entry 7's from the parity
    bit  ib + 7         the shift (0: +1/4, 1: -1/4)

- :data:`E8P` (2 bits per weight): |A| = 256, 16-bit codes, 2¹⁶ points. A is the 227
  absolute vectors of norm² ≤ 10 (entries from {½, 3/2, 5/2}: 1 + 8 + 28 + 64 + 126) plus
  29 of norm² 12, as in QuIP#. Which 29 (:data:`NORM12`): the 224 candidates of norm² 12
  (five entries 3/2, or one 5/2 with two 3/2) were all added to the table, 2¹⁶ seeded
  Gaussian vectors (torch seed 0, scale 1.1) were rounded to it, and the 29 used most were
  kept (ties by table order). Measured on 2·10⁵ other Gaussian vectors at the best scale,
  this gives MSE 0.0915 per entry; the first 29 in table order give 0.0919.
- :data:`E8P1` (1 bit per weight): |A| = 1 (all ½), 8-bit codes, 2⁸ points (entries ±¼, ±¾):
  the second stage of 3-bit residual VQ.

Decoding is a table look-up plus signs (:meth:`Codebook.decode`); nearest-point search
(:meth:`Codebook.nearest`) is exact and cheap thanks to the same structure: for a fixed ``a``
and shift, the best signs are those of the input, and when their parity is wrong the best
fix flips the entry with the smallest ``a_i |y_i|`` — so one (M, |A|) matmul plus a min over
8 entries per shift replaces a search over all 2¹⁶ points.

On CUDA tensors (where Triton imports) the search and the residual stage rounding
(:func:`round_stages`) run as one Triton launch (kernels/triton/e8p_nearest.py) instead of
~100 small torch kernels; the torch code here is the reference and the CPU path, and
``kernel=False`` keeps it on every device. Both give the same codes except where two
candidates' float32 distances are equal or within float32 rounding of each other.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import torch

DIM = 8
SHIFT = 0.25


def _half_vectors(max_norm2: float) -> list[tuple[float, ...]]:
    """Every vector of positive half-integers (entries ½, 3/2, ...) with norm² ≤ max_norm2,
    sorted by norm² then lexicographically (a fixed, documented order of the table)."""
    top = int((max_norm2 ** 0.5) + 0.5)  # the largest entry that can fit
    entries = [i + 0.5 for i in range(top + 1)]
    out = [v for v in itertools.product(entries, repeat=DIM)
           if sum(x * x for x in v) <= max_norm2 + 1e-9]
    return sorted(out, key=lambda v: (sum(x * x for x in v), v))


# the 29 absolute vectors of norm² 12 (module docstring), each entry written as 2·a
NORM12 = ("31131333", "33113313", "33113133", "13133133", "31133313", "33111333", "31331133",
          "13333113", "15131113", "33331113", "13111351", "13133331", "15111313", "33311313",
          "13131333", "13313133", "31115113", "11151313", "11333133", "13113115", "13313331",
          "31133133", "11131153", "11333313", "13113151", "33113331", "11113351", "11131315",
          "11313333")


def _norm12_choice() -> list[tuple[float, ...]]:
    """:data:`NORM12` as vectors of half-integers."""
    return [tuple(int(c) / 2 for c in v) for v in NORM12]


class Codebook:
    """A sign-symmetric codebook in E8 + ¼ (module docstring): ``absolute`` (|A|, 8) table of
    positive half-integers, |A| a power of two; codes of ``index_bits + 8`` bits."""

    def __init__(self, name: str, absolute: torch.Tensor):
        n = absolute.shape[0]
        if n & (n - 1) or absolute.shape[1] != DIM:
            raise ValueError(f"codebook {name}: need a power-of-two number of 8-dim vectors, "
                             f"got {tuple(absolute.shape)}")
        self.name = name
        self.absolute = absolute.to(torch.float32)  # (|A|, 8)
        self.index_bits = n.bit_length() - 1
        self.code_bits = self.index_bits + 8
        # parity of Σ a (an integer: 8 half-integers): the number of minus signs must match it
        self._abs_parity = (self.absolute.sum(1).round().long() & 1)  # (|A|,)
        self._abs_norm2 = (self.absolute ** 2).sum(1)  # (|A|,)
        self._on: dict = {}  # device (or ("table", device)) -> its copies there

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(absolute (|A|, 8) float32, parity (|A|,) int64, norm² (|A|,) float32, parity
        (|A|,) int32) on ``device``, copied once per device (a copy each call of the walk
        was a host-to-device transfer each)."""
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = tuple(t.to(device).contiguous() for t in (
                self.absolute, self._abs_parity, self._abs_norm2,
                self._abs_parity.to(torch.int32)))
        return self._on[device]

    def table_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`table` on ``device``, copied once per device."""
        device = torch.device(device)
        key = ("table", device)
        if key not in self._on:
            self._on[key] = self.table.to(device)
        return self._on[key]

    def kernel_book(self, device: torch.device) -> tuple:
        """This codebook as the Triton kernel takes it (kernels/triton/e8p_nearest.Book)."""
        a, _, n2, par32 = self.on_device(device)
        return a, par32, n2, self.index_bits

    @property
    def size(self) -> int:
        """Number of codewords, 2 ** code_bits."""
        return 1 << self.code_bits

    @property
    def bits_per_weight(self) -> float:
        """Code bits per weight (code_bits / 8)."""
        return self.code_bits / DIM

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (...) integers in [0, size) -> points (..., 8) float32."""
        codes = codes.long()
        idx = codes & ((1 << self.index_bits) - 1)
        a = self.absolute.to(codes.device)[idx]  # (..., 8)
        shifts = torch.arange(7, device=codes.device)
        neg = (codes.unsqueeze(-1) >> (self.index_bits + shifts)) & 1  # (..., 7)
        last = (neg.sum(-1) + self._abs_parity.to(codes.device)[idx]) & 1  # implied 8th sign
        neg = torch.cat([neg, last.unsqueeze(-1)], -1)
        t = 1 - 2 * ((codes >> (self.index_bits + 7)) & 1)  # +1 or -1
        return a * (1 - 2 * neg).float() + SHIFT * t.unsqueeze(-1).float()

    @functools.cached_property
    def table(self) -> torch.Tensor:
        """Every codeword, (size, 8) float32, row = code (for fast decoding of whole weights)."""
        return self.decode(torch.arange(self.size))

    def nearest(self, x: torch.Tensor, chunk: int = 1024, kernel: bool = True) -> torch.Tensor:
        """Codes (M,) int64 of the nearest codeword (Euclidean) to each row of x (M, 8).
        ``kernel``: one Triton launch where :func:`kernel_applies` (else torch, ``chunk``
        rows at a time)."""
        if x.shape[-1] != DIM:
            raise ValueError(f"nearest: rows must have {DIM} entries, got {tuple(x.shape)}")
        x = x.reshape(-1, DIM).float()
        if kernel and kernel_applies(x):
            return _triton().nearest(x, self.kernel_book(x.device))
        return torch.cat([self._nearest(x[i:i + chunk]) for i in range(0, len(x), chunk)]) \
            if len(x) else torch.zeros(0, dtype=torch.long, device=x.device)

    def _nearest(self, x: torch.Tensor) -> torch.Tensor:
        A, par, norm2, _ = self.on_device(x.device)  # (|A|, 8), (|A|,), (|A|,)
        rows = torch.arange(len(x), device=x.device)
        best_d = best_code = None
        for t in (1, -1):
            y = x - SHIFT * t  # (M, 8)
            ay, neg = y.abs(), y < 0  # the sign of 0 is taken as +
            # ‖y - σ⊙a‖² with σ = sign(y): ‖y‖² - 2 Σ a_i|y_i| + ‖a‖²
            d = (ay * ay).sum(1, keepdim=True) - 2 * ay @ A.t() + norm2
            # a wrong parity flips the entry with the smallest a_i|y_i|: + 4 min_i a_i|y_i|
            # (a running min over the 8 entries: (M, |A|) element-wise ops, no (M, |A|, 8))
            fix = ay[:, :1] * A[:, 0]
            for i in range(1, DIM):
                fix = torch.minimum(fix, ay[:, i:i + 1] * A[:, i])
            wrong = ((neg.sum(1, keepdim=True) + par) & 1).bool()  # (M, |A|)
            d, i = d.addcmul_(fix, wrong, value=4).min(1)  # (M,)
            flip = wrong[rows, i]
            j = (ay * A[i]).argmin(1)  # the entry whose sign is flipped, where flip
            # flip entry j where flip (no boolean indexing: it would sync a GPU every call)
            at_j = j.unsqueeze(1) == torch.arange(DIM, device=x.device)  # (M, 8)
            negf = neg ^ (flip.unsqueeze(1) & at_j)
            sign_bits = (negf[:, :7].long() << torch.arange(7, device=x.device)).sum(1)
            code = i | (sign_bits << self.index_bits) | (int(t < 0) << (self.index_bits + 7))
            if best_d is None:
                best_d, best_code = d, code
            else:
                take = d < best_d
                best_d = torch.where(take, d, best_d)
                best_code = torch.where(take, code, best_code)
        return best_code


@functools.lru_cache(maxsize=None)
def _triton():
    """The Triton module (kernels/triton/e8p_nearest.py), None without CUDA or Triton."""
    from kvant.kernels import triton as kt

    if not kt.available():
        return None
    from kvant.kernels.triton import e8p_nearest

    return e8p_nearest


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether the Triton kernel computes nearest codes of x: a CUDA tensor, Triton there."""
    return x.is_cuda and _triton() is not None


def round_stages(books: Sequence[Codebook], x: torch.Tensor, scales: Sequence[torch.Tensor],
                 kernel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual rounding with fixed scales: stage k rounds what the stages before it left,
    divided by ``scales[k]`` (broadcastable to (..., 1)), to ``books[k]`` and adds back the
    rounded point times the scale. x (..., 8) float32 -> (dequantized sum (..., 8) float32,
    codes (..., stages) int64). ``kernel``: one Triton launch for all stages where
    :func:`kernel_applies` (1 or 2 stages), else the torch reference below."""
    lead = x.shape[:-1]
    if kernel and kernel_applies(x) and len(books) in (1, 2):
        m = lead.numel()
        flat = [s.float().expand(*lead, 1).reshape(-1) if s.numel() > 1
                else s.float().reshape(1) for s in scales]  # (M,) or (1,) each
        deq, codes = _triton().round_stages(x.reshape(m, DIM).float(), [
            cb.kernel_book(x.device) for cb in books], flat)
        return deq.view(*lead, DIM), codes.view(*lead, len(books))
    out, codes = None, []
    for cb, s in zip(books, scales):
        c = cb.nearest(((x if out is None else x - out) / s).reshape(-1, DIM),
                       kernel=False).view(lead)
        q = cb.table_on(x.device)[c] * s
        out = q if out is None else out + q
        codes.append(c)
    return out, torch.stack(codes, -1)


def _e8p_absolute() -> torch.Tensor:
    low = _half_vectors(10.0)  # the 227 of norm² ≤ 10
    return torch.tensor(low + _norm12_choice())


@functools.lru_cache(maxsize=None)
def codebook(name: str) -> Codebook:
    """The named codebook: ``"e8p"`` (2 bits per weight) or ``"e8p1"`` (1 bit)."""
    if name == "e8p":
        return Codebook(name, _e8p_absolute())
    if name == "e8p1":
        return Codebook(name, torch.full((1, DIM), 0.5))
    raise ValueError(f"unknown codebook {name!r}; known: e8p, e8p1")
