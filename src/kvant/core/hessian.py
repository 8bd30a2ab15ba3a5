"""The layer Hessian of GPTQ-style methods: accumulate, repair, damp, invert.

For a Linear with weight W (N, K) and calibration inputs x_1..x_n (each (K,)), the layer
reconstruction error ``||W X - Ŵ X||²`` has the Hessian ``H = 2/n Σ x xᵀ`` (K, K) with respect
to every row of Ŵ. :class:`HessianAccumulator` keeps H as a running mean over the rows seen so
far (n counts rows, i.e. tokens), so its scale does not grow with the calibration set.

Before inversion (Frantar et al., 2023, and the reference implementation):
- dead inputs — columns whose diag(H) is exactly 0 (an input that is always zero) — get
  ``H[k, k] = 1`` and their weight column is set to 0, so they cannot affect anything;
- ``damp_percent`` of the mean diagonal is added to the diagonal (:func:`dampen`).
:func:`inverse_cholesky` then returns the upper Cholesky factor U of H⁻¹ (H⁻¹ = Uᵀ U), the
matrix whose rows GPTQ uses to spread each column's rounding error. When the Cholesky
factorisation fails, the damping is raised tenfold (up to :data:`MAX_DAMP`); if it still
fails, :class:`HessianError` names the layer.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# the largest damping tried, as a fraction of the mean diagonal (100%: H + mean(diag) I)
MAX_DAMP = 1.0
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_HAS_MM_DTYPE = True  # torch.mm(..., out_dtype=) on CUDA; cleared on first failure


class HessianError(ValueError):
    """A layer's Hessian cannot be inverted, even with the largest damping."""


def hessian_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"float64"`` (or a torch dtype of those) -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"Hessian dtype must be float32 or float64, got {name}")
        return name
    if name not in _DTYPES:
        raise ValueError(f"Hessian dtype must be 'float32' or 'float64', got {name!r}")
    return _DTYPES[name]


def gram(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``xᵀ x`` (K, K) in ``dtype`` for rows ``x`` (M, K), on x's device.

    On CUDA, bf16/fp16 inputs are multiplied on the tensor cores with a float32 result
    (``torch.mm(..., out_dtype=float32)``): products of 8- or 11-bit mantissas are exact in
    float32 and the sums accumulate in float32, so this equals the float32 matmul of the
    upcast inputs up to summation order, at a fraction of its cost.
    """
    global _HAS_MM_DTYPE
    if (_HAS_MM_DTYPE and x.is_cuda and dtype == torch.float32
            and x.dtype in (torch.bfloat16, torch.float16)):
        try:
            return torch.mm(x.t(), x, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _HAS_MM_DTYPE = False  # this torch lacks mm.dtype for CUDA; upcast instead
    x = x.to(dtype)
    return x.t() @ x


def first_positions(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
    """The rows (B, K) of position 0 of every window of the input ``x`` (..., T, K), taken
    from ``rows`` (x flattened to (M, K)); None when ``x`` has no position axis (a 2-D input:
    routed expert tokens, whose positions are unknown) or windows of one token."""
    if x.dim() < 3 or x.shape[-2] < 2:
        return None
    return rows.view(-1, x.shape[-2], rows.shape[-1])[:, 0]


def sink_gram(x: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype,
              sink_weight: float = 1.0, sink_max_share: float = 1.0) -> torch.Tensor:
    """``Σ x xᵀ`` (K, K) over ``rows`` with the first position of every window counted
    ``sink_weight`` times: ``rowsᵀ rows + (w - 1) x₀ᵀ x₀`` (a (B, K) correction, so the
    (M, K) rows are never copied). Without positions (:func:`first_positions`) plain.

    Why: a decoder turns the first token of every sequence into an attention sink (huge
    activations, attended to by every later query); it is 1 row in T of the calibration
    statistics, so an unweighted Hessian lets GPTQ move error onto its direction, which the
    whole sequence then reads (measured on SmolLM2: ~10× the position-0 error of plain
    rounding in the attention projections, and a worse perplexity; docs/METHODS.md).

    ``sink_max_share`` caps the weight: the first positions may take at most that share of
    the trace of this batch's Gram matrix (the weight falls toward 1, never below). Where the
    sink already dominates a layer's input (the massive activations some ``down_proj`` inputs
    carry at position 0: 80-99 % of the trace on SmolLM2), weighting it further leaves the
    other tokens almost no say (measured: 5.7× their output error on blk.28 ffn_down).
    """
    g = gram(rows, dtype)
    x0 = first_positions(x, rows) if sink_weight != 1.0 else None
    if x0 is not None:
        g0 = gram(x0, dtype)
        if sink_max_share < 1.0:  # on the device: no host sync per batch
            t0 = g0.diagonal().sum()
            w = capped_sink_weight(t0, g.diagonal().sum(), sink_weight, sink_max_share)
            g = g.add_(g0.mul_(w - 1.0))
        else:
            g = g.add_(g0, alpha=sink_weight - 1.0)
    return g


def capped_sink_weight(t0: torch.Tensor, total: torch.Tensor, sink_weight: float,
                       sink_max_share: float) -> torch.Tensor:
    """The first positions' weight (0-dim, on the device) given their share ``t0`` of a
    batch's input energy ``total`` (traces of the Gram matrices): ``sink_weight``, lowered
    so that they take at most ``sink_max_share`` of the weighted total, never below 1."""
    rest = total - t0
    # w t0 / (w t0 + rest) <= share  <=>  w <= share/(1-share) rest/t0  (share < 1)
    cap = sink_max_share / (1.0 - sink_max_share) * rest / t0.clamp(min=1e-30)
    return cap.clamp(max=sink_weight).clamp(min=1.0)


def sink_weight_of(x: torch.Tensor, sink_weight: float, sink_max_share: float):
    """The weight :func:`sink_gram` gives the first positions of the input ``x`` (..., T, K)
    (0-dim tensor), or 1.0 where it has no position axis or no weight is asked for."""
    rows = x.reshape(-1, x.shape[-1])
    x0 = first_positions(x, rows) if sink_weight != 1.0 else None
    if x0 is None:
        return 1.0
    if sink_max_share >= 1.0:
        return torch.tensor(float(sink_weight), device=x.device)
    t0 = x0.float().pow(2).sum()
    return capped_sink_weight(t0, rows.float().pow(2).sum(), sink_weight, sink_max_share)


class HessianAccumulator:
    """Running ``H = 2/n Σ x xᵀ`` over every input row seen, for a layer of input width k.

    ``add(x)`` takes inputs of any leading shape (..., k); ``n`` counts rows (tokens).
    H lives on ``device`` in ``dtype`` (float32, or float64 for the float64 option).
    ``sink_weight``: how many times the first position of each window counts, at most
    ``sink_max_share`` of each batch's trace (:func:`sink_gram`; inputs (..., T, k) only).
    """

    def __init__(self, k: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | str = torch.float32, sink_weight: float = 1.0,
                 sink_max_share: float = 1.0):
        self.k = k
        self.dtype = hessian_dtype(dtype)
        self.H = torch.zeros(k, k, device=device, dtype=self.dtype)
        self.n = 0
        self.sink_weight = float(sink_weight)
        self.sink_max_share = float(sink_max_share)

    @classmethod
    def for_config(cls, k: int, device, config, **kw) -> "HessianAccumulator":
        """An accumulator with ``config``'s Hessian options (``sink_weight`` and
        ``sink_max_share`` of a WalkConfig; plain where the config has none)."""
        return cls(k, device, sink_weight=getattr(config, "sink_weight", 1.0),
                   sink_max_share=getattr(config, "sink_max_share", 1.0), **kw)

    @property
    def device(self) -> torch.device:
        """The device H lives on."""
        return self.H.device

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., k) as a (tokens, k) matrix on the accumulator's device; a clear error
        when its last dimension is not the layer's input width."""
        if x.shape[-1] != self.k:
            raise ValueError(f"input of shape {tuple(x.shape)} does not end in the layer's "
                             f"input width {self.k}")
        return x.detach().reshape(-1, self.k).to(self.device)

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs ``x`` (..., k)."""
        rows = self.rows(x)
        if rows.shape[0]:
            self.add_gram(sink_gram(x, rows, self.dtype, self.sink_weight, self.sink_max_share),
                          rows.shape[0])

    def add_shared(self, x: torch.Tensor, grams: "SharedGram") -> None:
        """Accumulate inputs ``x`` (..., k), taking ``xᵀx`` from ``grams``: computed once for
        all the layers that read the very same tensor."""
        rows = self.rows(x)
        if rows.shape[0]:
            self.add_gram(grams.gram(x, rows, self.dtype, self.sink_weight,
                                      self.sink_max_share), rows.shape[0])

    def add_gram(self, g: torch.Tensor, m: int) -> None:
        """Accumulate a precomputed ``xᵀ x`` (k, k) of ``m`` rows (lets layers that read the
        same input share one matmul)."""
        if g.shape != (self.k, self.k):
            raise ValueError(f"Gram matrix of shape {tuple(g.shape)} for a Hessian of width "
                             f"{self.k}")
        total = self.n + m
        # running mean: H_new = n/(n+m) H + 2/(n+m) xᵀx
        self.H.mul_(self.n / total).add_(g.to(self.device, self.dtype), alpha=2.0 / total)
        self.n = total

    def state_for_reduce(self) -> tuple[dict[str, torch.Tensor], int]:
        """``({"H": H}, n)``: the running mean and its row count (kvant.calib.dist)."""
        return {"H": self.H}, self.n

    def load_reduced(self, state: dict[str, torch.Tensor], count: int) -> None:
        """Take the mean H over ``count`` rows of every process."""
        H = state["H"]
        if H.shape != (self.k, self.k):
            raise ValueError(f"reduced Hessian of shape {tuple(H.shape)} for width {self.k}")
        self.H, self.n = H.to(self.device, self.dtype), count

    def result(self, layer: str = "") -> torch.Tensor:
        """H, or the identity (plain rounding, logged) when the layer saw no input: a Linear
        the calibration forward never used (an unused head, a skipped branch)."""
        if self.n == 0:
            log.warning("layer %s saw no calibration input: H = I (plain rounding)", layer)
            return torch.eye(self.k, device=self.device, dtype=self.dtype)
        return self.H


class SharedGram:
    """The Gram matrix of the last input seen, for the Linears that read the same tensor
    (q/k/v, gate/up): one ``xᵀx`` matmul per batch instead of one per layer. A method holds
    one and calls :meth:`release` before quantizing, to free it."""

    def __init__(self) -> None:
        self._memo: tuple | None = None  # (input tensor, dtype, its Gram matrix)

    def gram(self, x: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype,
             sink_weight: float = 1.0, sink_max_share: float = 1.0) -> torch.Tensor:
        """``rowsᵀ rows`` (K, K) of the input ``x`` (rows = x as (M, K) on the compute
        device; the first position weighted by ``sink_weight`` up to ``sink_max_share``,
        :func:`sink_gram`), reused when the previous call saw the very same tensor object."""
        memo = self._memo
        key = (dtype, sink_weight, sink_max_share)
        if memo is not None and memo[0] is x and memo[1] == key:
            return memo[2]
        g = sink_gram(x, rows, dtype, sink_weight, sink_max_share)
        self._memo = (x, key, g)
        return g

    def release(self) -> None:
        """Drop the cached Gram matrix."""
        self._memo = None


def zero_dead(H: torch.Tensor, W: torch.Tensor | None = None) -> torch.Tensor:
    """Repair dead inputs in place: where diag(H) == 0 set H[k, k] = 1 and W[:, k] = 0.

    Returns the (K,) bool mask of dead inputs.
    """
    diag = H.diagonal()
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    if W is not None:
        W.masked_fill_(dead.unsqueeze(0), 0.0)
    return dead


def dampen(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Add ``damp_percent * mean(diag(H))`` to the diagonal of H, in place; returns H."""
    H.diagonal().add_(damp_percent * H.diagonal().mean())
    return H


def _check(H: torch.Tensor, layer: str) -> None:
    where = f" of layer {layer!r}" if layer else ""
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise HessianError(f"Hessian{where} must be square, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise HessianError(f"Hessian{where} holds NaN or Inf (non-finite calibration "
                           "activations?)")
    diag = H.diagonal()
    if (diag < 0).any() or not diag.mean() > 0:
        raise HessianError(f"Hessian{where} has a negative diagonal (min {float(diag.min()):.3g}):"
                           " it is no Gram matrix XXᵀ and cannot be repaired by damping")


def inverse_cholesky(H: torch.Tensor, damp_percent: float = 0.01, layer: str = "",
                     max_damp: float = MAX_DAMP) -> torch.Tensor:
    """Upper Cholesky factor U of ``(H + λ I)⁻¹`` (H⁻¹ = Uᵀ U), on H's device and dtype.

    λ = ``damp_percent`` × mean(diag(H)), raised tenfold while the factorisation fails, up to
    ``max_damp``. H is not modified (repair dead inputs first with :func:`zero_dead`).
    Raises :class:`HessianError` naming ``layer`` when H is non-finite, has a negative
    diagonal, or stays indefinite at the largest damping.
    """
    _check(H, layer)
    mean_diag = H.diagonal().mean()
    damp = damp_percent
    while True:
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                if damp != damp_percent:
                    log.warning("layer %s: Cholesky needed damping %.3g (asked %.3g)",
                                layer or "?", damp, damp_percent)
                return U
        if damp >= max_damp:
            break
        damp = min(damp * 10, max_damp)
    where = f" of layer {layer!r}" if layer else ""
    raise HessianError(f"Hessian{where} is not positive definite even with damping "
                       f"{damp:.3g} x mean diagonal; check the calibration data")
