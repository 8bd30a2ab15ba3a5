"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023): rounding with Hessian correction.

For a Linear W (N, K) and inputs X, GPTQ minimises ``||W X - Ŵ X||²`` one input column at a
time: column i is rounded to the grid, and its error ``(w - q) / [H⁻¹]_ii`` is spread over the
columns not yet quantized through row i of the Cholesky factor of H⁻¹ (the paper's Eq. 2-3 in
the Cholesky form of §3 "Step 3"). The walk itself lives in :mod:`kvant.algorithms.gptq_walk`.
Options as in the reference implementation: lazy-batch blocks, act-order (columns by
decreasing diag(H), ``g_idx`` stored), static groups (grids fixed before reordering), the
clipping search of the grid (``clip``, the reference's ``mse``).
"""

from __future__ import annotations

import logging
import time

import torch

from kvant.algorithms.base import HessianLayer, LayerQuantizer, QuantMethod
from kvant.algorithms.gptq_walk import Grid, WalkHooks, walk
from kvant.algorithms.registry import register
from kvant.config import GPTQConfig, QuantArgs
from kvant.core.grid import check_group_size, find_params
from kvant.core.hessian import HessianAccumulator, SharedGram, inverse_cholesky, zero_dead
from kvant.core.result import LayerResult

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, args: QuantArgs, *, block_size: int = 128,
                  damp_percent: float = 0.01, act_order: bool = False,
                  static_groups: bool = False, layer: str = "",
                  hooks: WalkHooks | None = None, cuda_graph: bool = True) -> LayerResult:
    """Quantize W (N, K) with the Hessian H (K, K) of its inputs; returns a LayerResult.

    Runs on H's device in float32 (U is cast from a float64 H). H's zero diagonal entries
    (dead inputs) are set to 1 in place; W is not modified.
    Grids: per channel (``group_size=-1``), found once on W; groups, found on the current,
    error-corrected columns ``W[:, g:g+gs]`` when the walk enters group g; with
    ``static_groups``, found on the original column groups before the walk. With
    ``act_order`` the walk visits columns by decreasing diag(H) and, for dynamic groups, the
    group of column k is its walk position // gs: ``g_idx`` (K,) then maps every original
    column to its group, so ``W_deq[:, k] = (q[:, k] - zeros[:, g_idx[k]]) *
    scales[:, g_idx[k]]`` with q in original column order. Otherwise ``g_idx`` is None.
    ``loss`` is the reference's proxy Σ (w - q)² / (2 d²), d = U[i, i]; with H = 2XXᵀ/n it is
    the increase of ``||W X - Ŵ X||² / n`` summed over the walk.
    ``info``: seconds_invert, seconds_loop, dead_inputs.

    Extension points, the attributes of ``hooks`` (:class:`WalkHooks`; None = plain GPTQ;
    group_params and quantize_column force the eager, non-graphed walk):
    - ``group_params(cols (N, C)) -> (scale (N, 1), zero (N, 1))`` replaces
      :func:`~kvant.core.grid.find_params` wherever a grid is found (whole rows per channel,
      one group otherwise); zeros must be whole numbers in [0, 2**bits).
    - ``quantize_column(w (N,), scale (N, 1), zero (N, 1), d: 0-d tensor) -> (N,)`` replaces the
      rounding of one column by the grid; it returns the dequantized values the column takes
      (which may leave some off the grid, e.g. outliers kept in float). Their error drives the
      update; the stored integers are those values rounded to the grid, and
      ``info["dequantized"]`` holds the returned (N, K) weights in original column order.
    - ``on_inverse(U (K, K), perm (K,) or None)`` is called once before the walk with the
      inverse-Hessian Cholesky factor in walk order (column i of the walk is original column
      ``perm[i]``); dynamic groups then call ``group_params`` for walk columns
      ``[g*gs, (g+1)*gs)`` in order g = 0, 1, ..., and ``quantize_column`` runs once per
      walk column in order, with ``d = U[i, i]`` (SpQR's outlier criterion needs both).
    """
    n, k = W.shape
    device = H.device
    gs = args.group_size
    if H.shape != (k, k):
        raise ValueError(f"layer {layer!r}: Hessian shape {tuple(H.shape)} does not match "
                         f"weight {tuple(W.shape)}")
    if gs == 0:
        raise ValueError(f"layer {layer!r}: GPTQ needs group_size -1 or > 0, not 0")
    check_group_size(k, gs, layer)
    t0 = time.perf_counter()
    hooks = hooks or WalkHooks()
    quantize_column = hooks.quantize_column
    find = hooks.group_params or (lambda x: find_params(x, args.bits, args.sym, args.clip))
    W = W.to(device=device, dtype=torch.float32, copy=True)
    dead = zero_dead(H, W)

    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    n_groups = 1 if gs == -1 else k // gs
    St = torch.zeros(n_groups, n, device=device)  # (G, N): row g = scales of group g
    Zt = torch.zeros_like(St)
    grid = Grid(St, Zt)
    if gs == -1 or static_groups:  # grids fixed before the walk, on the original columns
        cols = [W] if gs == -1 else W.split(gs, dim=1)
        for g, c in enumerate(cols):
            s, z = find(c)
            St[g], Zt[g] = s.view(-1), z.view(-1)
        gidx = torch.zeros(k, dtype=torch.long, device=device) if gs == -1 else (
            torch.arange(k, device=device) // gs)
        grid.gidx = gidx if perm is None else gidx[perm]
    else:
        grid.group_size, grid.find = gs, find

    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky(H, damp_percent, layer).to(torch.float32)
    if hooks.on_inverse is not None:
        hooks.on_inverse(U, perm)
    del H
    _sync(device)
    t1 = time.perf_counter()

    Wt = W.t().contiguous()  # (K, N): column k of W is row k
    del W
    Q, loss = walk(Wt, U, args.bits, grid, block_size, quantize_column, cuda_graph)
    del U
    info = {}
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[inv]
        if quantize_column is not None:
            Wt = Wt[inv]
        if gs > 0 and not static_groups:
            g_idx = (inv // gs).to(torch.int32)  # walk position of column k, // gs
    if quantize_column is not None:
        info["dequantized"] = Wt.t()
    qweight = Q.t().to(torch.int32).contiguous()
    loss = float(loss)
    _sync(device)
    t2 = time.perf_counter()
    info.update(seconds_invert=t1 - t0, seconds_loop=t2 - t1, dead_inputs=int(dead.sum()))
    return LayerResult(qweight, St.t().contiguous(), Zt.t().contiguous(), args.bits, gs,
                       g_idx=g_idx, loss=loss, info=info)


class _GPTQLayer(HessianLayer):
    """Accumulates one Linear's Hessian from its inputs, then runs :func:`gptq_quantize`."""

    def __init__(self, method: "GPTQ", name: str, weight: torch.Tensor):
        self.method, self.name, self.weight = method, name, weight
        self.config = method.config_for(name)
        self.acc = HessianAccumulator.for_config(weight.shape[1], weight.device, self.config,
                                                  dtype=self.config.hessian_dtype)
        self.grams = method.grams
        self.seconds_hessian = 0.0

    def observe(self, x: torch.Tensor) -> None:
        t = time.perf_counter()
        self.acc.add_shared(x, self.grams)
        _sync(self.acc.device)
        self.seconds_hessian += time.perf_counter() - t

    def quantize(self) -> LayerResult:
        cfg = self.config
        self.grams.release()
        H = self.acc.result(self.name)
        self.acc = None
        if cfg.grid != "int":  # llama.cpp's block grid (kvant.algorithms.gguf_round)
            from kvant.algorithms.gguf_round import gguf_gptq

            res = gguf_gptq(self.weight, H, cfg, self.name, cfg.block_size, cfg.damp_percent)
            res.info["seconds_hessian"] = self.seconds_hessian
            return res
        res = gptq_quantize(self.weight, H, cfg.qargs, block_size=cfg.block_size,
                            damp_percent=cfg.damp_percent, act_order=cfg.act_order,
                            static_groups=cfg.static_groups, layer=self.name)
        res.info["seconds_hessian"] = self.seconds_hessian
        return res


@register(GPTQConfig)
class GPTQ(QuantMethod):
    """GPTQ; Linears that read the same input tensor share each batch's ``xᵀx`` matmul."""

    needs_calibration = True
    supports_distributed = True  # its layers reduce one Hessian each

    def __init__(self, config: GPTQConfig):
        super().__init__(config)
        self.grams = SharedGram()

    def layer_quantizer(self, name: str, weight: torch.Tensor) -> LayerQuantizer:
        return _GPTQLayer(self, name, weight)
