"""Rounding on llama.cpp's grids (``grid="gguf:TYPE"``): RTN, and GPTQ's column walk.

A layer gets the type llama.cpp's file type of that name gives it (:func:`mix_configs`,
kvant.core.gguf_mix: some attn_v / ffn_down / attn_output matrices wider, and llama.cpp's
fallback type where the input width K is not a multiple of the type's block). The result is
the layer's GGUF blocks themselves (``extras["gguf_blocks"]``, uint8 (N, K/block*nbytes)),
stored by :class:`kvant.nn.gguf_linear.GGUFLinear` and written unchanged by the GGUF export.

GPTQ on a GGUF grid walks the columns in order (act-order would scatter a block's columns,
so it is refused by the config) with :class:`~kvant.algorithms.gptq_walk.WalkHooks`: entering
a block of columns, the block's fields (fp16 scales, sub-scales, mins) are fitted on the
current, error-corrected columns, weighted by the Hessian diagonal; each column is then
rounded to the nearest level of its sub-block and its error spread as in plain GPTQ.

After the walk, the fp16 scale (and min) of every 32-weight block is refitted to the codes
the walk chose (:func:`refit_blocks`): the walk fixed each block's scale before GPTQ's
corrections of the block's later columns were known, so with the codes held, the scales that
minimise the layer's output error ``(w - ŵ)ᵀ H (w - ŵ)`` of a row are a small least-squares
problem (one or two unknowns per block). A row keeps its refitted fp16 scales only where they
lower that error.
"""

from __future__ import annotations

import torch

from kvant.config import MethodConfig, QuantArgs
from kvant.core import gguf_grid as gg
from kvant.core.gguf_layout import encode
from kvant.core.result import LayerResult
from kvant.nn import gguf_linear  # noqa: F401  (registers the "gguf" layer kind)


def mix_configs(config: MethodConfig, layers: dict[str, int], prefix: str, model_config,
                imatrix: bool) -> dict[str, MethodConfig]:
    """The configs of the Linears that llama.cpp's mix (kvant.core.gguf_mix) stores in
    another type than ``config.grid``'s: {full name: config on that type}.

    layers: {full Linear name: input width} of the decoder blocks under ``prefix``;
    model_config: the model's (Hugging Face) config, for its layer and head counts;
    imatrix: the method calibrates on data (llama.cpp's importance-matrix branches).
    A model without head counts, or a Linear that is not one of a Llama layer's seven
    matrices, keeps the grid's type (or its fallback for the width)."""
    from kvant.config_gguf import with_gguf_type
    from kvant.core import gguf_mix

    base = config.grid.split(":", 1)[1]
    heads = getattr(model_config, "num_attention_heads", None)
    n_layer = 1 + max((int(n[len(prefix) + 1:].split(".")[0]) for n in layers), default=-1)
    shape = None if not heads or base not in gguf_mix.FILE_TYPES else gguf_mix.LlamaShape(
        n_layer, heads, getattr(model_config, "num_key_value_heads", None) or heads,
        bool(getattr(model_config, "tie_word_embeddings", True)))
    out = {}
    for name, k in layers.items():
        g = None if shape is None else gguf_mix.gguf_name(name, prefix)
        t = (gg.type_for_grid(config.grid, k, name).name if g is None
             else gguf_mix.tensor_type(base, g, k, shape, imatrix))
        if t != base:
            out[name] = with_gguf_type(config, t)
    return out


def layer_type(config: MethodConfig, k: int, layer: str = "") -> gg.GGUFType:
    """The GGUF type a layer of input width ``k`` is rounded on under ``config.grid``."""
    return gg.type_for_grid(config.grid, k, layer)


def _result(t: gg.GGUFType, codes: torch.Tensor, fields: dict, weight: torch.Tensor,
            loss: float | None = None, info: dict | None = None, layer: str = ""
            ) -> LayerResult:
    """LayerResult of kind "gguf" from codes (N, K) and fields (leading dims (N, K/block))."""
    n, k = codes.shape
    nb = k // t.block
    flat = {key: v.reshape(n * nb, *v.shape[2:]) for key, v in fields.items()}
    blocks = encode(t, codes.reshape(n * nb, t.block), flat).view(n, nb * t.nbytes)
    a, b = gg.affine(t, flat)  # (N*nb, n_sub): the scale/offset of every sub-block
    deq = gg.dequantize_blocks(t, codes.reshape(n * nb, t.block), flat).view(n, k)
    if not bool(torch.isfinite(deq).all()):  # fp16 scales overflow past 65504
        raise ValueError(f"GGUF {t.name} cannot hold the weights of layer {layer!r}: its "
                         "fp16 scales overflow (weights too large)")
    if loss is None:
        loss = float((weight.float().to(deq.device) - deq).square().sum())
    zeros = torch.zeros_like(a) if b is None else b
    return LayerResult(codes.to(torch.int32), a.reshape(n, -1), zeros.reshape(n, -1),
                       t.bits, t.sub, loss=loss, info=dict(info or {}, gguf_type=t.name),
                       extras={"gguf_blocks": blocks.cpu(), "gguf_type": t.name},
                       layer_kind="gguf")


def gguf_rtn(weight: torch.Tensor, config: MethodConfig, layer: str = "",
             imp: torch.Tensor | None = None) -> LayerResult:
    """Round-to-nearest of ``weight`` (N, K) on the config's GGUF grid; ``imp`` (K,) weights
    each input column's error when fitting the scales (None: equal)."""
    t = layer_type(config, weight.shape[1], layer)
    codes, fields, _ = gg.rtn_fit(weight, t, imp)
    return _result(t, codes, fields, weight, layer=layer)


class _GGUFWalk:
    """The walk hooks of GPTQ on a GGUF grid; records codes and fields as it goes."""

    def __init__(self, t: gg.GGUFType, n: int, k: int, imp: torch.Tensor, device):
        self.t, self.imp = t, imp
        self.codes = torch.zeros(n, k, dtype=torch.long, device=device)
        self.fields: list[dict] = []
        self.a = self.b = None
        self.col = 0
        self.levels = t.levels(device)

    def group_params(self, vals: torch.Tensor):
        """vals (N, block): the current columns of the next block -> its fields."""
        g = len(self.fields)
        imp = self.imp[g * self.t.block:(g + 1) * self.t.block]
        codes, f = gg.fit_blocks(self.t, vals, imp)
        self.fields.append(f)
        self.a, self.b = gg.affine(self.t, f)
        ones = torch.ones(vals.shape[0], 1, device=vals.device)
        return ones, torch.zeros_like(ones)  # unused: quantize_column does the rounding

    def quantize_column(self, w: torch.Tensor, s, z, d) -> torch.Tensor:
        """w (N,): one column, rounded on its sub-block's grid -> dequantized (N,)."""
        j = (self.col % self.t.block) // self.t.sub
        a = self.a[:, j:j + 1]
        b = None if self.b is None else self.b[:, j:j + 1]
        y = w if b is None else w - b[:, 0]
        y = torch.where(a[:, 0] == 0, torch.zeros_like(y), y / torch.where(
            a[:, 0] == 0, torch.ones_like(y), a[:, 0]))
        c = gg.codes_of(self.t, y)
        self.codes[:, self.col] = c
        self.col += 1
        y = a[:, 0] * self.levels[c]
        return y if b is None else y + b[:, 0]


def gguf_gptq(W: torch.Tensor, H: torch.Tensor, config: MethodConfig, layer: str = "",
              block_size: int = 128, damp_percent: float = 0.01, refit: bool = True
              ) -> LayerResult:
    """GPTQ of ``W`` (N, K) with Hessian ``H`` (K, K) on the config's GGUF grid; ``refit``:
    refit the scales of 32-weight blocks to the chosen codes (:func:`refit_blocks`)."""
    from kvant.algorithms.gptq import gptq_quantize
    from kvant.algorithms.gptq_walk import WalkHooks

    n, k = W.shape
    t = layer_type(config, k, layer)
    imp = H.diagonal().float().clone().clamp(min=0)
    state = _GGUFWalk(t, n, k, imp.to(H.device), H.device)
    hooks = WalkHooks(group_params=state.group_params, quantize_column=state.quantize_column)
    # bits/sym of the args are unused by the hooks; group_size makes the walk fit each block
    args = QuantArgs(bits=8, group_size=t.block, sym=False)
    res = gptq_quantize(W, H, args, block_size=block_size, damp_percent=damp_percent,
                        layer=layer, hooks=hooks, cuda_graph=False)
    fields = {key: torch.stack([f[key] for f in state.fields], 1) for key in state.fields[0]}
    info = {key: v for key, v in res.info.items() if key != "dequantized"}
    if refit and not t.k_quant:
        fields, gain = refit_blocks(t, W, H, state.codes, fields, damp_percent)
        info["refit_rows"], info["refit_gain"] = gain
    return _result(t, state.codes, fields, W, loss=res.loss, info=info, layer=layer)


def refit_blocks(t: gg.GGUFType, W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor,
                 fields: dict, damp_percent: float = 0.01, rows: int = 128):
    """Least-squares fp16 scales (and mins) of a 32-weight-block type for fixed codes.

    W (N, K) float weights, H (K, K) their input Hessian (damped here by ``damp_percent`` of
    its mean diagonal, as GPTQ's inverse is), codes (N, K), fields ``d`` (and ``m``) of shape
    (N, K/32). Per row the dequantized weight is linear in its blocks' (scale, min), so
    minimising ``(w - ŵ)ᵀ H (w - ŵ)`` is a (K/32·p)-unknown linear system (p = 1 or 2). The
    solution is rounded to fp16 and kept for a row only where it lowers the row's error.
    Returns (fields, (rows changed, relative drop of the layer's error)).
    """
    n, k = W.shape
    b, p = t.block, 2 if t.has_min else 1
    nb = k // b
    Hd = H.double().clone()
    Hd.diagonal().add_(damp_percent * Hd.diagonal().mean())
    H3 = Hd.view(nb, b, k)  # rows of H grouped by block
    lv = t.levels(W.device).double()
    a0 = fields["d"].double()
    b0 = fields["m"].double() if t.has_min else None
    out_a, out_b = a0.clone(), None if b0 is None else b0.clone()
    e_old = e_new = 0.0
    changed = 0
    for r0 in range(0, n, rows):  # a chunk of rows bounds the (rows, nb·p, K) product
        w = W[r0:r0 + rows].double()
        m = w.shape[0]
        q = lv[codes[r0:r0 + rows]].view(m, nb, b)
        D = torch.stack([q] + ([torch.ones_like(q)] if p == 2 else []), 2)  # (m, nb, p, b)
        T = torch.einsum("nxpi,xik->nxpk", D, H3)  # (m, nb, p, K): D_block H
        A = torch.einsum("nxpcj,ncqj->nxpcq", T.view(m, nb, p, nb, b), D).reshape(
            m, nb * p, nb * p)
        rhs = torch.einsum("nxpk,nk->nxp", T, w).reshape(m, nb * p)
        A.diagonal(dim1=1, dim2=2).add_(1e-10 * A.diagonal(dim1=1, dim2=2).mean(1, keepdim=True))
        sol = torch.linalg.solve(A, rhs).view(m, nb, p).to(torch.float16).double()

        def err(a, off):  # (m,) output error of a row under scales a (and mins off)
            e = w - (a[..., None] * q + (0 if off is None else off[..., None])).reshape(m, k)
            return ((e @ Hd) * e).sum(1)

        old = err(a0[r0:r0 + rows], None if b0 is None else b0[r0:r0 + rows])
        a1, b1 = sol[..., 0], sol[..., 1] if p == 2 else None
        new = err(a1, b1)
        ok = torch.isfinite(sol).all(-1).all(-1) & (new < old)
        out_a[r0:r0 + rows] = torch.where(ok[:, None], a1, a0[r0:r0 + rows])
        if p == 2:
            out_b[r0:r0 + rows] = torch.where(ok[:, None], b1, b0[r0:r0 + rows])
        e_old += float(old.sum())
        e_new += float(torch.where(ok, new, old).sum())
        changed += int(ok.sum())
    f = dict(fields, d=out_a.to(fields["d"].dtype))
    if p == 2:
        f["m"] = out_b.to(fields["m"].dtype)
    return f, (changed, 1 - e_new / e_old if e_old > 0 else 0.0)


def round_layer(weight: torch.Tensor, H: torch.Tensor | None, config, layer: str = "",
                ) -> LayerResult:
    """GPTQ (when ``H`` is given) or RTN of one Linear on ``config.grid`` (a GGUF grid)."""
    if H is None:
        return gguf_rtn(weight, config, layer)
    return gguf_gptq(weight, H, config, layer, block_size=config.block_size,
                     damp_percent=config.damp_percent)
