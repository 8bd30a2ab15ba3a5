"""SpQR (Dettmers et al., 2024, "SpQR: A Sparse-Quantized Representation for Near-Lossless
LLM Weight Compression"), on the GPTQ column walk of :func:`kvant.algorithms.gptq.gptq_quantize`.

Three ideas on top of GPTQ, all in this file but the outlier selection itself
(:mod:`kvant.core.outliers`, shared with AWQ's outlier budget):

1. Small groups (16 input columns) with an asymmetric min-max grid whose zero point is a real
   number; each group's scale and zero (N,) are themselves quantized to ``stat_bits`` in
   groups of ``stat_group_size`` output rows (the paper's bilevel quantization;
   :func:`kvant.core.stats.quantize_stats`).
2. Outliers by sensitivity (the paper's §4.1). With U the upper Cholesky factor of H⁻¹ in walk
   order and ``d_j = U[j, j]``, the cost of rounding weight w of column j is ``((w - q)/d_j)²``.
   When the walk enters a group it fits the grid without the weights whose leave-one-out gain
   (how much the group's d-weighted error drops when the weight stays in float and the grid
   is refit without it, :func:`drop_gain`) exceeds ``tau`` (:func:`grid_outliers`); then each
   column is rounded and every weight with ``((w - q)/d_j)² > tau`` keeps its exact value,
   stored as an fp16 residual, so the error it feeds to later columns is zero.
   ``tau = outlier_threshold * mean_j(Var(W[:, j]) / d_j²)`` (the paper's relative threshold).
3. Act-order: columns walked by decreasing diag(H), groups formed in walk order.

Outlier budget (any base): :func:`select_outliers` picks at most a fixed fraction of the
weights up front by the same rule at the threshold that meets the budget (errors weighted by
``1/d²`` in walk order for GPTQ, by ``diag(H)`` for RTN); the base method then rounds W with
those weights left out of the grids and keeps them in fp16. Invoke it with
``SpQRConfig(outlier_budget=0.01, base="rtn" | "gptq")``; the hooks of
:class:`OutlierWalk` serve any method that calls ``gptq_quantize``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from kvant.algorithms.base import HessianLayer, LayerQuantizer, QuantMethod
from kvant.algorithms.gptq import gptq_quantize
from kvant.algorithms.gptq_walk import WalkHooks
from kvant.algorithms.registry import register
from kvant.config import SpQRConfig
from kvant.core.grid import check_group_size
from kvant.core.hessian import HessianAccumulator, SharedGram
from kvant.core.outliers import (OutlierRounding, drop_gain, fill_excluded, grid_outliers,
                                 real_zero_grid, round_on_grid, select_outliers,
                                 sensitive_weights)
from kvant.core.result import LayerResult
from kvant.core.stats import quantize_stats
from kvant.nn.spqr_linear import SpQRLinear  # registers the "spqr" layer kind

# what the rounding functions below read: SpQR's config, or AWQ's outlier-budget settings
Settings = SpQRConfig | OutlierRounding

log = logging.getLogger(__name__)
__all__ = ["SpQR", "SpQRLinear", "drop_gain", "grid_outliers", "sensitive_weights",
           "select_outliers", "fit_groups", "OutlierWalk",
           "spqr_gptq", "spqr_rtn"]


@dataclass
class GroupFit:
    """Grids of G column groups: dequantized scale/zero (N, G) as the weights use them, and
    (stat_bits < 16) the stored statistic integers (N, G) with their fp16 (2, N/sgs, G)."""

    scale: torch.Tensor
    zero: torch.Tensor
    scale_q: torch.Tensor | None = None
    scale_stats: torch.Tensor | None = None
    zero_q: torch.Tensor | None = None
    zero_stats: torch.Tensor | None = None


def fit_groups(x: torch.Tensor, exclude: torch.Tensor | None, cfg: Settings,
               layer: str = "") -> GroupFit:
    """Grids of groups x (N, G, C), fit without the ``exclude`` (N, G, C) weights."""
    n, g, c = x.shape
    x = fill_excluded(x, exclude)
    plain = cfg.stat_bits >= 16
    s, z = real_zero_grid(x.reshape(n * g, c), cfg.bits, plain)
    s, z = s.reshape(n, g), z.reshape(n, g)
    if plain:
        return GroupFit(s, z)
    try:
        sq, sp, sd = quantize_stats(s, cfg.stat_bits, cfg.stat_group_size, positive=True)
        zq, zp, zd = quantize_stats(z, cfg.stat_bits, cfg.stat_group_size)
    except ValueError as e:
        raise ValueError(f"layer {layer!r}: {e}") from None
    return GroupFit(sd, zd, sq, sp, zq, zp)


class OutlierWalk(WalkHooks):
    """The ``gptq_quantize`` hooks that make its column walk SpQR's.

    ``on_inverse`` receives U and the walk order; it sets the absolute threshold tau (or, with
    a budget, the fixed outlier mask). ``group_params`` fits each group without its likely
    outliers (and quantizes its statistics); ``quantize_column`` rounds a column and keeps the
    outliers exact (fp16 residual). The records (walk order) build the LayerResult.
    """

    def __init__(self, W: torch.Tensor, cfg: Settings, layer: str = ""):
        self.W, self.cfg, self.layer = W, cfg, layer
        n, k = W.shape
        self.d = self.perm = self.tau = self.fixed = None
        self.Q = torch.zeros(n, k, device=W.device)  # integers, walk order
        self.R = torch.zeros(n, k, device=W.device)  # fp16-exact outlier residuals, walk order
        self.mask = torch.zeros(n, k, dtype=torch.bool, device=W.device)
        self.fits: list[GroupFit] = []
        self.col = 0

    def on_inverse(self, U: torch.Tensor, perm: torch.Tensor | None) -> None:
        """Called by gptq_quantize with U (K, K) and the walk order."""
        cfg = self.cfg
        self.d, self.perm = U.diagonal().clone(), perm
        self.seen: list[torch.Tensor] = []  # the d of each visited column, checked once
        Ww = self.W.to(U.device) if perm is None else self.W.to(U.device)[:, perm]
        inv_d2 = self.d.reciprocal().square()
        if cfg.outlier_budget > 0:
            self.fixed = select_outliers(Ww, inv_d2, cfg.outlier_budget, cfg.group_size,
                                         cfg.bits, cfg.stat_bits >= 16)
        elif math.isfinite(cfg.outlier_threshold):
            self.tau = cfg.outlier_threshold * float((Ww.var(0) * inv_d2).mean())

    def check_order(self) -> None:
        """After the walk: the columns came in the order ``on_inverse`` was told (each
        column's d is U's diagonal entry), else a RuntimeError naming the first that did
        not."""
        seen = torch.stack(self.seen) if self.seen else self.d[:0]
        bad = (seen != self.d[:len(seen)]).nonzero()
        if len(seen) != len(self.d) or len(bad):
            i = int(bad[0, 0]) if len(bad) else len(seen)
            raise RuntimeError(f"layer {self.layer!r}: the GPTQ walk visited columns in an "
                               f"unexpected order (column {i} of {len(self.d)} differs)")

    def group_params(self, cols: torch.Tensor):
        """cols (N, C): the current columns of the next group in walk order."""
        c0 = len(self.fits) * self.cfg.group_size
        c1 = c0 + cols.shape[1]
        if self.fixed is not None:
            excl = self.fixed[:, c0:c1]
        elif self.tau is not None:
            excl = grid_outliers(cols, self.d[c0:c1].reciprocal().square(), self.tau,
                                 self.cfg.bits, self.cfg.stat_bits >= 16)
        else:
            excl = None
        fit = fit_groups(cols[:, None, :], None if excl is None else excl[:, None, :],
                         self.cfg, self.layer)
        self.fits.append(fit)
        return fit.scale, fit.zero  # (N, 1) each

    def quantize_column(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                        d: torch.Tensor):
        """Round column w (N,) on (s, z) (N, 1); outliers keep w (as dense + fp16 residual)."""
        i = self.col
        self.col += 1
        self.seen.append(d)  # a 0-d device tensor: comparing it here would sync every column
        q, deq = round_on_grid(w, s[:, 0], z[:, 0], self.cfg.bits)
        self.Q[:, i] = q
        if self.fixed is not None:
            out = self.fixed[:, i]
        elif self.tau is not None:
            out = ((w - deq) / d).square() > self.tau
        else:
            return deq
        resid = torch.where(out, w - deq, torch.zeros_like(w)).half().float()
        self.mask[:, i], self.R[:, i] = out, resid
        return deq + resid


def _result(cfg: Settings, Q, fits: list[GroupFit], mask, R, perm, g_idx, loss, info):
    """The LayerResult (layer_kind "spqr"); Q, mask, R (N, K) in original column order."""
    cat = lambda name, dim: None if getattr(fits[0], name) is None else torch.cat(  # noqa: E731
        [getattr(f, name) for f in fits], dim)
    extras = {"stat_bits": cfg.stat_bits, "stat_group_size": cfg.stat_group_size,
              "outlier_mask": mask.cpu(), "outlier_vals": R.cpu()}
    if cfg.stat_bits < 16:
        extras.update(scale_q=cat("scale_q", 1).cpu(), scale_stats=cat("scale_stats", 2).cpu(),
                      zero_q=cat("zero_q", 1).cpu(), zero_stats=cat("zero_stats", 2).cpu())
    if perm is not None:
        extras["perm"] = perm.cpu()
    nnz = int(mask.sum())
    info.update(outliers=nnz, outlier_fraction=nnz / mask.numel())
    return LayerResult(Q.to(torch.int32).cpu(), cat("scale", 1).cpu(), cat("zero", 1).cpu(),
                       cfg.bits, cfg.group_size, g_idx=g_idx, extras=extras, loss=loss,
                       info=info, layer_kind="spqr")


def spqr_gptq(W: torch.Tensor, H: torch.Tensor, cfg: Settings, layer: str = "") -> LayerResult:
    """SpQR of W (N, K) with the Hessian H (K, K) on the GPTQ walk (``cfg.base == "gptq"``)."""
    W = W.to(device=H.device, dtype=torch.float32, copy=True)
    W[:, H.diagonal() == 0] = 0  # dead inputs, as gptq_quantize zeroes them
    hooks = OutlierWalk(W, cfg, layer)
    res = gptq_quantize(W, H, cfg.qargs, block_size=cfg.block_size,
                        damp_percent=cfg.damp_percent, act_order=cfg.act_order, layer=layer,
                        hooks=hooks)
    res.info.pop("dequantized", None)
    hooks.check_order()
    perm = hooks.perm
    Q, mask, R = hooks.Q, hooks.mask, hooks.R
    if perm is not None:  # walk order -> original column order
        inv = torch.argsort(perm)
        Q, mask, R = Q[:, inv], mask[:, inv], R[:, inv]
    return _result(cfg, Q, hooks.fits, mask, R, perm, res.g_idx, res.loss, res.info)


def spqr_rtn(W: torch.Tensor, H: torch.Tensor | None, cfg: Settings,
             layer: str = "") -> LayerResult:
    """Round-to-nearest with SpQR's grids and, with ``outlier_budget``, fp16 outliers chosen
    by the diag(H)-weighted leave-one-out gain (``cfg.base == "rtn"``)."""
    n, k = W.shape
    gs = cfg.group_size
    check_group_size(k, gs, layer)
    W = W.float()
    mask = torch.zeros(n, k, dtype=torch.bool, device=W.device)
    if cfg.outlier_budget > 0:
        if H is None:
            raise ValueError(f"layer {layer!r}: an outlier budget needs calibration inputs")
        mask = select_outliers(W, H.diagonal().to(W.device), cfg.outlier_budget, gs, cfg.bits,
                               cfg.stat_bits >= 16)
    x = W.reshape(n, k // gs, gs)
    fit = fit_groups(x, mask.reshape(x.shape), cfg, layer)
    q, deq = round_on_grid(x, fit.scale[..., None], fit.zero[..., None], cfg.bits)
    R = torch.where(mask, W - deq.reshape(n, k), torch.zeros_like(W)).half().float()
    loss = float((W - deq.reshape(n, k) - R).square().sum())
    return _result(cfg, q.reshape(n, k), [fit], mask, R, None, None, loss, {})


class _SpQRLayer(HessianLayer):
    """Accumulates the layer's Hessian (when needed), then runs SpQR."""

    def __init__(self, method: "SpQR", name: str, weight: torch.Tensor):
        self.method, self.name, self.weight = method, name, weight
        self.config = method.config_for(name)
        self.acc = HessianAccumulator.for_config(weight.shape[1], weight.device, self.config) \
            if method.needs_calibration else None
        self.grams = method.grams

    def quantize(self) -> LayerResult:
        cfg = self.config
        self.grams.release()
        H = None
        if self.acc is not None:
            H = self.acc.result(self.name)
        self.acc = None
        if cfg.base == "gptq":
            return spqr_gptq(self.weight, H, cfg, self.name)
        return spqr_rtn(self.weight, H, cfg, self.name)


@register(SpQRConfig)
class SpQR(QuantMethod):
    """SpQR; calibrates for base="gptq" and for an outlier budget, else runs like RTN."""

    needs_calibration = True
    supports_distributed = True  # its layers reduce one Hessian each (or keep none)

    def __init__(self, config: SpQRConfig):
        super().__init__(config)
        self.grams = SharedGram()

    @classmethod
    def calibrates(cls, config: SpQRConfig) -> bool:
        """The GPTQ walk and the outlier budget read the Hessian; plain rounding does not."""
        return config.base == "gptq" or config.outlier_budget > 0

    def layer_quantizer(self, name: str, weight: torch.Tensor) -> LayerQuantizer:
        return _SpQRLayer(self, name, weight)
