"""QuIP# without fine-tuning: lattice vector quantization in QuIP's rotated basis.

Tseng, Chee, Sun, Kuleshov, De Sa, "QuIP#: Even Better LLM Quantization with Hadamard
Incoherence and Lattice Codebooks" (ICML 2024). Three parts, the first shared with QuIP:

1. Incoherence: ``W̃ = U W Vᵀ``, ``H̃ = V H Vᵀ`` with randomized Hadamard transforms
   (:mod:`kvant.algorithms.quip`; same seeds, same shared input transform per group), which
   makes the entries of W̃ close to i.i.d. Gaussian — the distribution a ball-shaped
   codebook suits.
2. The E8P codebook (:mod:`kvant.core.e8p`): every 8 consecutive rotated weights of a row are
   one vector, rounded to one of 2¹⁶ points of the shifted E8 lattice: 16 bits per 8 weights.
   The codes are scaled by one float16 scale per rotated output row (``scale="row"``) or per
   layer (``"layer"``, as in QuIP#). Residual VQ for more bits (QuIP#'s §4.3): a second stage
   rounds what the first left with its own scale: E8P + E8P (4 bits) or E8P + the 1-bit
   E8P1 (3 bits).
3. Block LDLQ (:mod:`kvant.algorithms.block_ldlq`): the blocks of 8 columns are rounded in
   order, each block's error fed back to the later columns through H̃⁻¹.

Scales: before the walk, the scale of each stage is ``rms · m`` (rms of the rotated row, or
of the layer; for the residual stage, of what the first stage leaves under plain nearest
rounding), ``m = 2**e`` with the least squared nearest-rounding error on (at most
:data:`FIT_VECTORS`) vectors of the layer (a coarse grid of e, then three halving steps),
the scale rounded to float16 as stored.
Fine-tuning (QuIP#'s §5) is not part of this method.
"""

from __future__ import annotations

import torch

from kvant.algorithms.base import LayerQuantizer
from kvant.algorithms.block_ldlq import block_ldlq, inverse_factor
from kvant.algorithms.quip import (QuIP, _QuIPLayer, incoherence, rotate_hessian,
                                   rotate_weight, transforms_for)
from kvant.algorithms.registry import register
from kvant.config import QuIPSharpConfig
from kvant.core.e8p import DIM, Codebook, codebook, round_stages
from kvant.core.hessian import HessianAccumulator, zero_dead
from kvant.core.result import LayerResult
from kvant.nn.quipsharp_linear import STAGES

# scale = rms · m, m = 2**e: a coarse search over COARSE, then steps of ±1/4, ±1/8, ±1/16
COARSE = (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0)
# block LDLQ's common factor on the fitted scales (ldlq_with_scale_search)
FACTOR_START, FACTOR_STEP, FACTOR_RANGE = 1.2, 0.1, (0.8, 2.0)
# vectors of a layer the scale search rounds (evenly spaced over the layer), at most
FIT_VECTORS = 1 << 13


def _rms(X: torch.Tensor, per_row: bool) -> torch.Tensor:
    """X (N, B, 8) -> root mean square per row (N, 1, 1) or of the whole (1, 1, 1)."""
    dims = (1, 2) if per_row else (0, 1, 2)
    return X.square().mean(dims, keepdim=True).sqrt().clamp(min=1e-12)


def _round(cb: Codebook, X: torch.Tensor, s: torch.Tensor, kernel: bool = True):
    """Nearest codes (...) of X (..., 8) / s and their dequantized values (..., 8).
    ``kernel``: the Triton kernel on CUDA (core.e8p.round_stages), False: torch."""
    deq, codes = round_stages((cb,), X, (s,), kernel)
    return codes[..., 0], deq


def fit_scale(X: torch.Tensor, cb: Codebook, per_row: bool,
              kernel: bool = True) -> torch.Tensor:
    """The scale (N, 1, 1) or (1, 1, 1), float16-exact, with which ``cb`` rounds X (N, B, 8)
    by plain nearest search with the least squared error (module docstring)."""
    n, b, _ = X.shape
    base = _rms(X, per_row)
    step = max(1, (n * b) // FIT_VECTORS)
    idx = torch.arange(0, n * b, step, device=X.device)
    rows = idx // b
    sample = X.reshape(-1, DIM)[idx]  # (M, 8)
    tried: dict[float, tuple[float, torch.Tensor]] = {}

    def error(e: float) -> float:
        if e not in tried:
            s = (base * 2 ** e).half().float()
            s_rows = s.reshape(-1)[rows if per_row else torch.zeros_like(rows)].unsqueeze(1)
            tried[e] = (float((sample - _round(cb, sample, s_rows, kernel)[1]).square().sum()),
                        s)
        return tried[e][0]

    best = min(COARSE, key=error)
    for step in (0.25, 0.125, 0.0625):
        best = min((best - step, best, best + step), key=error)
    return tried[best][1]


class StageQuantizer:
    """Residual VQ with fixed scales: stage i rounds what stages < i left, ``scales[i]``
    (N or 1, 1) broadcast over the rows. Called on one block of 8 columns at a time: on CUDA
    one Triton launch for all stages (core.e8p.round_stages), unless ``kernel`` is False."""

    def __init__(self, names: tuple[str, ...], scales: list[torch.Tensor], device,
                 kernel: bool = True):
        self.books = [codebook(n) for n in names]
        self.scales = [s.reshape(-1, 1).to(device) for s in scales]  # (N or 1, 1) each
        self.kernel = kernel

    def __call__(self, x: torch.Tensor, block: int = 0):
        """x (N, 8) -> (dequantized (N, 8), codes (N, stages))."""
        return round_stages(self.books, x, self.scales, self.kernel)


def fit_stage_scales(Wr: torch.Tensor, names: tuple[str, ...], per_row: bool,
                     kernel: bool = True):
    """Scales of every stage (list of (N or 1, 1, 1)) for the rotated weight Wr (N, K).
    ``kernel``: the Triton search on CUDA (False: torch everywhere)."""
    n, k = Wr.shape
    R = Wr.reshape(n, k // DIM, DIM)
    scales = []
    for i, name in enumerate(names):
        cb = codebook(name)
        s = fit_scale(R, cb, per_row, kernel)
        scales.append(s)
        if i + 1 < len(names):  # what this stage leaves under nearest rounding
            R = R - _round(cb, R, s, kernel)[1]
    return scales


def ldlq_with_scale_search(Wr: torch.Tensor, Hr: torch.Tensor, names: tuple[str, ...],
                           scales: list[torch.Tensor], cfg: QuIPSharpConfig, layer: str = "",
                           kernel: bool = True):
    """Block LDLQ of Wr (N, K) against Hr with the stage scales times a common factor f.

    The error fed back by LDLQ widens the vectors to round, so scales fitted to plain nearest
    rounding are too small under LDLQ (on the embedded model's first MLP layer the proxy loss
    is lowest near f = 1.2, 1/3 below f = 1). With ``cfg.scale_search`` f starts at
    :data:`FACTOR_START` and moves by :data:`FACTOR_STEP` while the walk's loss falls (within
    :data:`FACTOR_RANGE`); else f = 1. Returns (codes, deq, loss, f) of the best walk.
    ``kernel``: round blocks with the Triton kernel on CUDA (False: torch everywhere).
    """
    U = inverse_factor(Hr, Wr.clone(), cfg.damp_percent, layer)
    losses: dict[float, float] = {}
    best: list = [None, None]  # [f, (codes, deq, loss)]: only the best walk is kept

    def walk(f: float) -> float:
        if f not in losses:
            q = StageQuantizer(names, [(s * f).half().float() for s in scales], Wr.device,
                               kernel)
            res = block_ldlq(Wr, Hr, q, DIM, chunk=cfg.block_size, U=U, layer=layer)
            losses[f] = res[2]
            if best[0] is None or res[2] < losses[best[0]]:
                best[:] = [f, res]
        return losses[f]

    f = FACTOR_START if cfg.scale_search else 1.0
    walk(f)
    for step in (FACTOR_STEP, -FACTOR_STEP) if cfg.scale_search else ():
        while FACTOR_RANGE[0] <= round(f + step, 6) <= FACTOR_RANGE[1] and \
                walk(round(f + step, 6)) < walk(f):
            f = round(f + step, 6)
    return (*best[1], best[0])


class _QuIPSharpLayer(_QuIPLayer):
    """QuIP's per-layer state (Hessian, input key); quantizes with codebook + block LDLQ."""

    def __init__(self, method: "QuIPSharp", name: str, weight: torch.Tensor, input_key: str):
        self.method, self.name, self.weight = method, name, weight
        self.config, self.input_key = method.config_for(name), input_key
        self.acc = (HessianAccumulator.for_config(weight.shape[1], weight.device, self.config)
                    if method.needs_calibration else None)
        self.grams = method.grams

    def quantize(self) -> LayerResult:
        cfg = self.config
        W = self.weight.float().clone()
        n, k = W.shape
        if k % DIM:
            raise ValueError(f"layer {self.name!r}: quipsharp needs an input width that is a "
                             f"multiple of {DIM}, got {k}")
        self.grams.release()
        H = None
        if self.acc is not None:
            H = self.acc.result(self.name).float().clone()
            self.acc = None
            zero_dead(H, W)
        U, V = transforms_for(self.name, n, k, cfg.seed, self.input_key)
        Wr = rotate_weight(W, U, V)
        names = STAGES[cfg.bits]
        scales = fit_stage_scales(Wr, names, cfg.scale == "row")
        if cfg.rounding == "ldlq":
            codes, deq, loss, factor = ldlq_with_scale_search(
                Wr, rotate_hessian(H, V), names, scales, cfg, self.name)
            scales = [(s * factor).half().float() for s in scales]
        else:
            quant = StageQuantizer(names, scales, Wr.device)
            blocks = Wr.reshape(n, k // DIM, DIM).transpose(0, 1)  # (K/8, N, 8)
            parts = [quant(blocks[b]) for b in range(k // DIM)]
            codes = torch.stack([c for _, c in parts])
            deq = torch.stack([q for q, _ in parts], 1).reshape(n, k)
            loss = float((Wr - deq).square().sum())  # no Hessian: the plain squared error
        codes = codes.permute(2, 1, 0)  # (stages, N, K/8)
        extras = dict(sign_in=V.signs, sign_out=U.signs, scale_mode=cfg.scale)
        if len(names) > 1:
            extras["codes_resid"] = codes[1].to(torch.int32)
        if V.kind == "random":
            extras["factor_in"] = V.factor
        if U.kind == "random":
            extras["factor_out"] = U.factor
        res = LayerResult(codes[0].to(torch.int32),  # (N, K/8) codes, not grid integers
                          torch.stack([s.reshape(-1) for s in scales]),  # (stages, N or 1)
                          torch.zeros(0), cfg.bits, -1, extras=extras, loss=loss,
                          layer_kind="quipsharp")
        res.info.update(mu_before=incoherence(W), mu_after=incoherence(Wr),
                        rotated_mse=float((Wr - deq).square().mean()),
                        scale_factor=factor if cfg.rounding == "ldlq" else 1.0)
        return res


@register(QuIPSharpConfig)
class QuIPSharp(QuIP):
    """QuIP#'s E8P lattice codebook (+ residual stages) with block LDLQ, after QuIP's
    randomized Hadamard rotation (which it inherits: seeds, shared input transforms)."""

    @classmethod
    def calibrates(cls, config: QuIPSharpConfig) -> bool:
        """Block LDLQ needs the Hessian; nearest rounding needs no data."""
        return config.rounding == "ldlq"

    def layer_quantizer(self, name: str, weight: torch.Tensor) -> LayerQuantizer:
        return _QuIPSharpLayer(self, name, weight, self._input_key(name))

    def least_stored_bits(self, n: int, k: int) -> int:
        """Exact: the packed layer's codes, per-stage scales and sign vectors (no zeros)."""
        from kvant.nn.quipsharp_linear import QuipSharpLinear

        return 8 * QuipSharpLinear(k, n, self.config.bits, -1,
                                   scale=self.config.scale).storage_bytes()
