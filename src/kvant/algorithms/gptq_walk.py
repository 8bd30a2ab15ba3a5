"""GPTQ's column walk: quantize columns in order, spreading each one's error over the rest.

Layout: the weight is held transposed, ``Wt`` (K, N), so that column k of W is the contiguous
row ``Wt[k]`` and every per-column operation is one vectorised op over the N output channels.
``U`` (K, K) is the upper Cholesky factor of H⁻¹ in walk order. For column i with d = U[i, i]:

    q   = grid(w)                      (integers, scale/zero of the column's group)
    e   = (w - deq(q)) / d             (the scaled error, kept in E)
    Wt[j] -= U[i, j] * e   for j > i   (OBS update of the columns not yet quantized)

Lazy batching (the paper's §"Lazy batch-updates"): inside a block of ``block`` columns the
update touches only the block; the columns after it receive ``U[block, rest]ᵀ @ E_block`` once
per block as one matmul.

Per-column work is ~9 tiny kernels, so on a GPU the walk is bound by kernel-launch overhead.
Full blocks with a regular group layout are therefore recorded once as a CUDA graph over
static buffers and replayed for every later block (the same kernels, so identical numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

# find(vals (N, C)) -> (scale (N, 1), zero (N, 1)) for one group's current columns
FindParams = Callable[[torch.Tensor], tuple]
# quantize_column(w (N,), scale (N, 1), zero (N, 1), d: 0-d tensor) -> dequantized (N,); d is
# the column's inverse-Hessian diagonal, left on the device (a float would sync every column)
QuantizeColumn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                          torch.Tensor]
# on_inverse(U (K, K), perm (K,) or None): the inverse-Hessian factor, before the walk
OnInverse = Callable[[torch.Tensor, Optional[torch.Tensor]], None]


@dataclass(eq=False)
class WalkHooks:
    """What a method changes in GPTQ's walk (:func:`kvant.algorithms.gptq.gptq_quantize`),
    one object for the three extension points; None keeps plain GPTQ there. A method may
    subclass it and define them as methods (SpQR's ``OutlierWalk``).

    group_params: replaces :func:`~kvant.core.grid.find_params` wherever a grid is found.
    quantize_column: replaces the rounding of one column by its grid.
    on_inverse: sees U and the walk order once before the walk.
    """

    group_params: Optional[FindParams] = None
    quantize_column: Optional[QuantizeColumn] = None
    on_inverse: Optional[OnInverse] = None


@dataclass
class Grid:
    """Where each walked column takes its scale and zero from.

    St, Zt: (G, N) scales and zeros, one row per group (G = 1 per channel).
    gidx: (K,) long group row of each walked column, when the grids are fixed before the walk
        (per channel, static groups); None for dynamic groups.
    group_size / find: dynamic groups — entering column c with c % group_size == 0 computes
        ``St[c // group_size]`` from the current (error-corrected) group columns with ``find``.
    """

    St: torch.Tensor
    Zt: torch.Tensor
    gidx: Optional[torch.Tensor] = None
    group_size: int = -1
    find: Optional[FindParams] = None


def _walk_block(W1, Hinv1, Q1, E1, bits: int, params, qcol: Optional[QuantizeColumn] = None):
    """Quantize the c columns of one block in place.

    W1 (c, N) the block's current weights (row i is used, then overwritten with the
    dequantized value when ``qcol`` is given); Hinv1 (c, c) its part of U; Q1 (c, N) receives
    the integers (as floats); E1 (c, N) the scaled errors. ``params(i) -> (s (N,), z (N,))``.
    """
    maxq = 2 ** bits - 1
    neg_dinv = Hinv1.diagonal().reciprocal().neg()  # (c,): -1 / d per column
    for i in range(W1.shape[0]):
        s, z = params(i)
        w, q, e = W1[i], Q1[i], E1[i]
        if qcol is None:
            torch.div(w, s, out=q)
            q.round_().add_(z).clamp_(0, maxq)
            torch.sub(q, z, out=e).mul_(s)  # e = dequantized column, for now
        else:
            deq = qcol(w, s.unsqueeze(1), z.unsqueeze(1), Hinv1[i, i])
            torch.div(deq, s, out=q)
            q.round_().add_(z).clamp_(0, maxq)
            e.copy_(deq)
        e.sub_(w).mul_(neg_dinv[i])  # e = (w - deq) / d
        if qcol is not None:
            w.copy_(deq)
        if i + 1 < W1.shape[0]:
            W1[i + 1:].addr_(Hinv1[i, i + 1:], e, alpha=-1)


def _dynamic_params(grid: Grid, W1, E1, Wt, U, i1: int, i2: int, goff: int, dst=None):
    """params(i) for dynamic groups in block [i1, i2): at a group entry, compute the grid from
    the group's current columns — those in the block from W1, those after it from Wt minus
    the part of this block's lazy update already due (rows of E1 before i)."""
    gs = grid.group_size
    St, Zt = (grid.St, grid.Zt) if dst is None else dst

    def params(i: int):
        col = i1 + i
        g = col // gs - goff
        if col % gs == 0:
            vals = W1[i:i + gs]
            end = col + gs
            if end > i2:  # group runs past the block: bring those columns up to date
                late = Wt[i2:end] - U[i1:col, i2:end].t() @ E1[:i]
                vals = torch.cat([vals, late])
            s, z = grid.find(vals.t())
            St[g].copy_(s.view(-1))
            Zt[g].copy_(z.view(-1))
        return St[g], Zt[g]

    return params


def _fixed_params(S1, Z1):
    return lambda i: (S1[i], Z1[i])


class _BlockGraph:
    """A CUDA graph of :func:`_walk_block` for full blocks of c columns, static buffers."""

    def __init__(self, grid: Grid, c: int, n: int, bits: int, device):
        z = lambda *shape: torch.zeros(*shape, device=device, dtype=torch.float32)  # noqa: E731
        self.W1, self.H1, self.Q1, self.E1 = z(c, n), z(c, c), z(c, n), z(c, n)
        self.grid, self.c, self.bits = grid, c, bits
        if grid.gidx is not None:  # fixed grids: per-column tables gathered before replay
            self.S1, self.Z1 = z(c, n), z(c, n)
            self.params = _fixed_params(self.S1, self.Z1)
        else:  # dynamic groups, all inside the block: record them locally
            self.Sg, self.Zg = z(c // grid.group_size, n), z(c // grid.group_size, n)
            self.params = _dynamic_params(grid, self.W1, self.E1, None, None, 0, c, 0,
                                          dst=(self.Sg, self.Zg))
        self.graph = None

    def _load(self, Wt, U, i1: int) -> None:
        i2 = i1 + self.c
        self.W1.copy_(Wt[i1:i2])
        self.H1.copy_(U[i1:i2, i1:i2])
        if self.grid.gidx is not None:
            idx = self.grid.gidx[i1:i2]
            self.S1.copy_(self.grid.St[idx])
            self.Z1.copy_(self.grid.Zt[idx])

    def run(self, Wt, U, i1: int) -> None:
        """Quantize block [i1, i1 + c) into the static Q1 / E1 (dynamic grids into St, Zt)."""
        self._load(Wt, U, i1)
        if self.graph is None:
            # warm up on a side stream (this computes the block), then record the graph
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _walk_block(self.W1, self.H1, self.Q1, self.E1, self.bits, self.params)
            torch.cuda.current_stream().wait_stream(side)
            # recording runs nothing, so Q1 / E1 (and Sg / Zg) keep the warm-up's results
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                _walk_block(self.W1, self.H1, self.Q1, self.E1, self.bits, self.params)
        else:
            self.graph.replay()
        if self.grid.gidx is None:
            g0 = i1 // self.grid.group_size
            self.grid.St[g0:g0 + len(self.Sg)].copy_(self.Sg)
            self.grid.Zt[g0:g0 + len(self.Zg)].copy_(self.Zg)


def walk(Wt: torch.Tensor, U: torch.Tensor, bits: int, grid: Grid, block: int = 128,
         qcol: Optional[QuantizeColumn] = None, cuda_graph: bool = True):
    """Run GPTQ over all columns of ``Wt`` (K, N), in row order, in place.

    Returns (Q (K, N) integers as float32, loss 0-d tensor Σ e² / 2). With ``qcol``, Wt ends
    holding the dequantized weights it returned.
    """
    k, n = Wt.shape
    Q = torch.empty_like(Wt)
    loss = torch.zeros((), device=Wt.device, dtype=torch.float32)
    gs = grid.group_size
    regular = grid.gidx is not None or block % gs == 0
    graph = None
    if cuda_graph and Wt.is_cuda and qcol is None and regular and k >= 2 * block:
        graph = _BlockGraph(grid, block, n, bits, Wt.device)
    E_eager = torch.empty(block, n, device=Wt.device, dtype=torch.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        if graph is not None and i2 - i1 == block:
            graph.run(Wt, U, i1)
            Q[i1:i2].copy_(graph.Q1)
            E1 = graph.E1
        else:
            W1, E1 = Wt[i1:i2], E_eager[: i2 - i1]
            if grid.gidx is not None:
                idx = grid.gidx[i1:i2]
                params = _fixed_params(grid.St[idx], grid.Zt[idx])
            else:
                params = _dynamic_params(grid, W1, E1, Wt, U, i1, i2, 0)
            _walk_block(W1, U[i1:i2, i1:i2], Q[i1:i2], E1, bits, params, qcol)
        loss += E1.square().sum() / 2
        if i2 < k:  # lazy batch update of every later column
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)
    return Q, loss
