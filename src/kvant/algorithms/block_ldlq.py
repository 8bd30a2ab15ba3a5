"""Block LDLQ: GPTQ's column walk with a vector quantizer over blocks of ``d`` columns.

QuIP# (Tseng et al., 2024, §4.2 "BlockLDLQ") rounds ``d`` consecutive columns of W (N, K)
jointly — each row's ``d`` entries are one vector of the lattice codebook — and feeds the
block's error forward to the columns not yet rounded, with the block LDL decomposition of H.

Here the same update is written with GPTQ's factor: ``U`` (K, K) upper triangular with
``H⁻¹ = Uᵀ U`` (:func:`kvant.core.hessian.inverse_cholesky`). After the columns before block
B are rounded, the inverse Hessian of the remaining columns R is ``U[R, R]ᵀ U[R, R]``; the
optimal (OBS) change of the later columns L for an error ``e = w_B - q_B`` (N, d) of block B
is then

    ΔW_L = -e · [H⁻¹]_BB⁻¹ · [H⁻¹]_BL = -(e · U_BB⁻¹) · U_BL,

and its cost is ``‖e · U_BB⁻¹‖²`` (halved: the increase of ``‖WX - ŴX‖²/n`` with
``H = 2XXᵀ/n``, GPTQ's ``loss``). With d = 1 this is GPTQ's walk exactly. No feedback flows
inside a block (its d columns are chosen together, by Euclidean nearness, as in QuIP#).
Lazy batching as in GPTQ: inside a chunk of ``chunk`` columns the updates touch the chunk
only; later columns get ``U[chunk, later]ᵀ @ E_chunk`` once per chunk as one matmul.

Layout: W is held transposed, ``Wt`` (K, N), so a block of columns is a slice of rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from kvant.core.hessian import inverse_cholesky, zero_dead

# quantize(x (N, d) the block's current columns, one row per output channel, block index b)
#   -> (dequantized (N, d), codes (N, ...) any integer tensor, stored per block)
BlockQuantizer = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def block_ldlq(W: torch.Tensor, H: torch.Tensor, quantize: BlockQuantizer, dim: int = 8, *,
               chunk: int = 128, damp_percent: float = 0.01, layer: str = "",
               U: torch.Tensor | None = None):
    """Round W (N, K) block by block against the Hessian H (K, K) (modified in place: dead
    inputs get ``H[k, k] = 1``; W is not modified). ``U``: the factor of H⁻¹ from an earlier
    call with the same H (:func:`inverse_factor`), to walk again without refactoring.

    ``quantize`` rounds one block (see :data:`BlockQuantizer`). Returns ``(codes, deq, loss)``:
    codes (K/dim, N, ...) the stacked codes of every block in walk order, deq (N, K) float32
    the rounded weight, loss the proxy ``Σ_B ‖e_B U_BB⁻¹‖² / 2`` (float).
    """
    n, k = W.shape
    if k % dim:
        raise ValueError(f"layer {layer!r}: input width {k} is not a multiple of the block "
                         f"dimension {dim}")
    if chunk % dim:
        raise ValueError(f"chunk {chunk} is not a multiple of the block dimension {dim}")
    if H.shape != (k, k):
        raise ValueError(f"layer {layer!r}: Hessian shape {tuple(H.shape)} does not match "
                         f"weight {tuple(W.shape)}")
    W = W.to(device=H.device, dtype=torch.float32, copy=True)
    if U is None:
        U = inverse_factor(H, W, damp_percent, layer)
    Wt = W.t().contiguous()  # (K, N)
    del W
    deq = torch.empty_like(Wt)  # (K, N)
    codes = []
    loss = torch.zeros((), device=Wt.device)
    for i1 in range(0, k, chunk):
        i2 = min(i1 + chunk, k)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]
        E1 = torch.empty_like(W1)  # (c, N): the scaled errors e U_BB⁻¹, transposed
        for j in range(0, i2 - i1, dim):
            b = slice(j, j + dim)
            q, c = quantize(W1[b].t(), (i1 + j) // dim)  # (N, d)
            codes.append(c)
            deq[i1 + j:i1 + j + dim] = q.t()
            # (U_BB⁻¹)ᵀ eᵀ: solve U_BBᵀ y = eᵀ, U_BBᵀ lower triangular
            E1[b] = torch.linalg.solve_triangular(U1[b, b].t(), W1[b] - q.t(), upper=False)
            if j + dim < i2 - i1:
                W1[j + dim:].addmm_(U1[b, j + dim:].t(), E1[b], alpha=-1)
        loss += E1.square().sum() / 2
        if i2 < k:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1)
    return torch.stack(codes), deq.t().contiguous(), float(loss)


def inverse_factor(H: torch.Tensor, W: torch.Tensor, damp_percent: float = 0.01,
                   layer: str = "") -> torch.Tensor:
    """U (K, K) float32, upper triangular, ``(H + λI)⁻¹ = Uᵀ U`` after the dead inputs of H
    (zero diagonal) got ``H[k, k] = 1`` and their columns of W were zeroed (both in place)."""
    zero_dead(H, W)
    return inverse_cholesky(H, damp_percent, layer).to(torch.float32)
