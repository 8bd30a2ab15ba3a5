"""Randomized Hadamard transforms: orthogonal, O(n log n), defined by a seed.

QuIP# (Tseng et al., 2024) replaced QuIP's dense random orthogonal matrices by ``V = H S``:
a normalised Hadamard matrix ``H`` times a diagonal of random signs ``S``. ``V x`` spreads
every coordinate of ``x`` over all others ("incoherence"), costs O(n log n), and needs only
the signs stored.

Sizes. A Hadamard matrix of order n exists only for n = 1, 2 or a multiple of 4, and the
sizes of real layers are often n = 2^k·m with m odd (576 = 2^6·9, 11008 = 2^8·43). We write
the transform as a Kronecker product ``H_n = H_p ⊗ M`` with p a power of two and M a small
orthogonal m×m factor:
- M is a normalised Hadamard matrix of order m = odd·2^j (smallest j that works) when one of
  the constructions below gives it: Sylvester (powers of two), Paley I (q + 1 for a prime
  q ≡ 3 mod 4: 12, 20, 44, ...), Paley II (2(q + 1) for a prime q ≡ 1 mod 4: 28, 36, ...),
  and doubling of any of these. 576 = 16·36, 1536 = 128·12, 14336 = 512·28, 384 = 32·12;
- otherwise M is a seeded random orthogonal m×m matrix (QR of a Gaussian), m the odd part
  (11008 = 256·43). Such a factor must be stored, since it is not a fixed construction.

The power-of-two part is a Walsh–Hadamard transform applied as a Kronecker product of
Sylvester blocks of at most 64×64, each a batched matmul along one axis. That is the
butterfly grouped six levels at a time: O(n log n) work like the radix-2 butterfly, but
log_64(n) kernel launches on a GPU instead of log_2(n).
"""

from __future__ import annotations

import functools
import math

import torch

# largest dense Hadamard factor we use; beyond it the per-element cost (m) gets large
MAX_HADAMARD_FACTOR = 256
# largest random dense factor (the odd part of n); a bigger odd part is refused
MAX_RANDOM_FACTOR = 1024
# Sylvester blocks of the power-of-two part
SYLVESTER_BLOCK = 64


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i) for the quadratic character χ of the prime field GF(q); (q, q)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)],
                       dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4): I + [[0, 1ᵀ], [-1, Q]]."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)  # antisymmetric because -1 is a non-square
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Hadamard matrix of order 2(q + 1) for a prime q ≡ 1 (mod 4).

    The symmetric conference matrix C = [[0, 1ᵀ], [1, Q]] of order q + 1 with every 0
    replaced by [[1, -1], [-1, -1]] and every ±1 by ±[[1, 1], [1, -1]].
    """
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    eye = torch.eye(q + 1, dtype=torch.float64)
    return torch.kron(c, one_block) + torch.kron(eye, zero_block)


@functools.lru_cache(maxsize=None)
def _hadamard_f64(order: int) -> torch.Tensor | None:
    if order < 1:
        return None
    if order == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if order == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if order & (order - 1) == 0:  # Sylvester: H_2 ⊗ H_(order/2), symmetric
        return torch.kron(_hadamard_f64(2), _hadamard_f64(order // 2))
    if order % 4:
        return None
    q = order - 1
    if _is_prime(q) and q % 4 == 3:
        return _paley1(q)
    q = order // 2 - 1
    if _is_prime(q) and q % 4 == 1:
        return _paley2(q)
    half = _hadamard_f64(order // 2)
    if half is not None:  # Sylvester doubling: H_2 ⊗ H_half
        return torch.kron(_hadamard_f64(2), half)
    return None


def hadamard_matrix(order: int) -> torch.Tensor | None:
    """A ±1 matrix ``H`` (order, order) float32 with ``H Hᵀ = order·I``, or None.

    None means none of the constructions here (Sylvester, Paley I, Paley II, doubling)
    reaches this order; it does not mean that no Hadamard matrix of that order exists.
    """
    h = _hadamard_f64(int(order))
    return None if h is None else h.to(torch.float32)


def split_size(n: int) -> tuple[int, int, str]:
    """How ``n`` is built: ``(p, m, kind)`` with ``n = p·m``, p a power of two.

    kind: "none" (m = 1, pure Walsh–Hadamard), "hadamard" (M a known Hadamard matrix of order
    m) or "random" (M a seeded random orthogonal matrix of the odd part m).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"transform size must be a positive int, got {n!r}")
    k = (n & -n).bit_length() - 1  # n = 2^k · odd
    odd = n >> k
    if odd == 1:
        return n, 1, "none"
    for j in range(k + 1):
        m = odd << j
        if m > MAX_HADAMARD_FACTOR:
            break
        if _hadamard_f64(m) is not None:
            return n // m, m, "hadamard"
    if odd > MAX_RANDOM_FACTOR:
        raise ValueError(f"transform size {n} = 2^{k}·{odd}: the odd part {odd} is larger than "
                         f"{MAX_RANDOM_FACTOR} and has no known Hadamard factor")
    return 1 << k, odd, "random"


def random_orthogonal(m: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal (m, m) float32 matrix from a seeded Gaussian's QR."""
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(m, m, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    # fix the signs so the distribution is Haar and the result deterministic
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
    return q.to(torch.float32)


@functools.lru_cache(maxsize=None)
def _sylvester_normalised(d: int) -> torch.Tensor:
    return (_hadamard_f64(d) / math.sqrt(d)).to(torch.float32)


def _power_of_two_blocks(p: int) -> list[int]:
    blocks = []
    while p > 1:
        d = min(p, SYLVESTER_BLOCK)
        blocks.append(d)
        p //= d
    return blocks


# Applying F_1 ⊗ ... ⊗ F_t to rows y (T, n) read as tensors (T, d_1, ..., d_t): contract the
# last axis with its factor (one GEMM over all rows), then move that axis to the front (one
# transposing copy), t times. After t steps the axes are back in their original order; the
# randomized transform skips the last move, so its output comes in the cyclically shifted
# order (d_2, ..., d_t, d_1) — a fixed permutation, harmless for an orthogonal rotation, and
# one copy fewer on every call.

def _kron_forward(y: torch.Tensor, factors: list, full_cycle: bool) -> torch.Tensor:
    rows, n = y.shape
    for j, f in enumerate(reversed(factors)):
        d = f.shape[0]
        y = y.reshape(-1, d) @ f.t()  # contract the last axis: (T·n/d, d)
        if full_cycle or j < len(factors) - 1:
            y = y.reshape(rows, n // d, d).transpose(1, 2).contiguous()  # last axis -> front
    return y.reshape(rows, n)


def _kron_inverse(y: torch.Tensor, factors: list) -> torch.Tensor:
    # undoes _kron_forward(full_cycle=False): input axes (d_2, ..., d_t, d_1)
    rows, n = y.shape
    for j, f in enumerate(factors):
        d = f.shape[0]
        y = y.reshape(-1, d) @ f  # contract the last axis with fᵀ
        if j < len(factors) - 1:
            front = factors[j + 1].shape[0]
            y = y.reshape(rows, front, n // front).transpose(1, 2).contiguous()  # front -> last
    return y.reshape(rows, n)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform of the last dim of ``x`` (size a power of two).

    Computes ``x @ H_pᵀ / sqrt(p)`` (Sylvester order; H_p is symmetric) in float32 and
    returns float32.
    """
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {p}")
    factors = [_sylvester_normalised(d).to(x.device) for d in _power_of_two_blocks(p)]
    y = x.to(torch.float32).reshape(-1, p)
    if factors:
        y = _kron_forward(y, factors, full_cycle=True)
    return y.reshape(x.shape)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """±1 vector (n,) -> uint8 (ceil(n/8),): bit i % 8 of byte i // 8 set where sign < 0."""
    neg = (signs.reshape(-1) < 0).to(torch.uint8)
    n = neg.numel()
    neg = torch.nn.functional.pad(neg, (0, (-n) % 8)).reshape(-1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=neg.device))
    return (neg.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: float32 ±1 vector (n,) on ``packed``'s device."""
    if packed.numel() * 8 < n:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {n} signs")
    bits = (packed.to(torch.int32)[:, None] >> torch.arange(8, device=packed.device)) & 1
    return (1 - 2 * bits.reshape(-1)[:n]).to(torch.float32)


class RandomizedHadamard:
    """The orthogonal transform ``V = P (H_p ⊗ M) diag(signs)`` on the last dim.

    H_p is the normalised Sylvester matrix (as blocks of at most 64), M the m×m factor of
    :func:`split_size`, P the fixed output permutation of the Kronecker evaluation (see
    ``_kron_forward``). ``forward(x)`` computes ``V x`` for every vector along the last dim
    (i.e. ``x @ Vᵀ``), ``inverse(y)`` computes ``Vᵀ y``; both accept any leading shape and
    float dtype, compute in float32 and return ``x``'s dtype. ``signs`` (n,) and ``factor``
    (m, m) may be given explicitly (a loaded checkpoint); otherwise they come from ``seed``.
    """

    def __init__(self, n: int, seed: int = 0, *, signs: torch.Tensor | None = None,
                 factor: torch.Tensor | None = None):
        self.n, self.seed = n, int(seed)
        self.p, self.m, self.kind = split_size(n)
        g = torch.Generator().manual_seed(self.seed)
        if signs is None:
            signs = torch.randint(0, 2, (n,), generator=g).to(torch.float32) * 2 - 1
        if signs.shape != (n,):
            raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")
        self.signs = signs.to(torch.float32).cpu()
        if self.kind == "random":
            if factor is None:
                factor = random_orthogonal(self.m, int(torch.randint(0, 2 ** 62, (1,),
                                                                      generator=g)))
            if factor.shape != (self.m, self.m):
                raise ValueError(f"factor must have shape ({self.m}, {self.m}), "
                                 f"got {tuple(factor.shape)}")
            self.factor = factor.to(torch.float32).cpu()
        elif self.kind == "hadamard":
            self.factor = hadamard_matrix(self.m) / math.sqrt(self.m)
        else:
            self.factor = None
        # F_1 ⊗ ... ⊗ F_t: the Sylvester blocks of p, then M
        self.factors = [_sylvester_normalised(d) for d in _power_of_two_blocks(self.p)]
        if self.factor is not None:
            self.factors.append(self.factor)
        self._dev: dict = {}

    def _on(self, device: torch.device):
        if device not in self._dev:
            self._dev[device] = (self.signs.to(device), [f.to(device) for f in self.factors])
        return self._dev[device]

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.n:
            raise ValueError(f"RandomizedHadamard({self.n}) got a last dimension of "
                             f"{x.shape[-1]}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"RandomizedHadamard needs a float tensor, got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``V x`` along the last dim: (..., n) -> (..., n), in ``x``'s dtype."""
        self._check(x)
        signs, factors = self._on(x.device)
        y = x.to(torch.float32).reshape(-1, self.n) * signs
        if factors:
            y = _kron_forward(y, factors, full_cycle=False)
        return y.reshape(x.shape).to(x.dtype)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``Vᵀ x`` along the last dim: (..., n) -> (..., n), in ``x``'s dtype."""
        self._check(x)
        signs, factors = self._on(x.device)
        y = x.to(torch.float32).reshape(-1, self.n)
        if factors:
            y = _kron_inverse(y, factors)
        return (y * signs).reshape(x.shape).to(x.dtype)

    def permutation(self) -> torch.Tensor:
        """P as indices (n,): ``forward(x)[..., i] = ((H_p ⊗ M) diag(signs) x)[perm[i]]``."""
        dims = [f.shape[0] for f in self.factors] or [1]
        idx = torch.arange(self.n).reshape(dims)
        return idx.permute(*range(1, len(dims)), 0).reshape(-1)

    def matrix(self) -> torch.Tensor:
        """The dense (n, n) float32 matrix ``V`` (for tests and small layers)."""
        return self.forward(torch.eye(self.n)).t()

    def __repr__(self) -> str:
        return f"RandomizedHadamard(n={self.n}, seed={self.seed}, {self.p}x{self.m} {self.kind})"
