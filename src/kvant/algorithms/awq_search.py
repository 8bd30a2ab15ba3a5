"""AWQ's two searches: the per-channel scale of a group, and the per-group weight clip.

Scale search (Lin et al., 2024, section 3.3): for a group of Linears reading the same input
``x`` (..., K), with per-channel activation magnitude ``a = mean |x|`` (K,), try
``s = a**alpha`` (or, with duo scaling, ``a**alpha / w**(1-alpha)`` with ``w`` the mean
group-normalised weight magnitude of each column) for ``alpha`` on a grid in [0, 1); replace
every weight ``W`` of the group by ``Q(W * s) / s`` (which is what the model computes after
the columns are scaled by ``s`` and the input divided by ``s``) and measure the output of the
smallest module that contains the group against its float output. ``alpha = 0`` is plain
rounding, so the search never does worse than RTN on its own objective.

Clip search: for each Linear, shrink the range of each (row, group) of the scaled weight by
``p`` in ``1, 1 - 1/n, ...`` and keep the ``p`` that minimises the group's contribution to the
layer output on a sample of its inputs; the weight is clamped to the chosen range, so plain
min-max rounding afterwards reproduces the clipped grid exactly.

Blocks and their modules are run, hooked and probed only through a
:class:`kvant.calib.runner.BlockRunner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from kvant.calib.capture import BlockInput, block_output
from kvant.calib.runner import BlockRunner
from kvant.config import QuantArgs
from kvant.core.grid import fake_quantize, find_params, weight_params
from kvant.core.hessian import sink_gram, sink_weight_of
from kvant.model.discovery import is_conv1d, linear_weight


@dataclass
class GroupCapture:
    """What one pass over the calibration inputs records for a group.

    abs_sum: (K,) float32 sum of |x| over all tokens; tokens: how many; calls: the inspected
    module's (args, kwargs, float output) of every call (none when the inspected module is
    the group's single Linear); gram: (K, K) float32 ``Σ xᵀx`` with the first position of
    every window counted as the sink weight says (core.hessian.sink_gram), when the group is
    a single Linear or the capture was asked for it;
    first_weights: per call, that weight of the call's first positions (1.0: unweighted).
    """

    abs_sum: torch.Tensor | None = None
    tokens: int = 0
    calls: list = field(default_factory=list)
    gram: torch.Tensor | None = None
    first_weights: list = field(default_factory=list)

    @property
    def act_mean(self) -> torch.Tensor:
        """(K,) mean |x| per input channel."""
        return self.abs_sum / max(self.tokens, 1)


def inspected_module(runner: BlockRunner, names: list[str], probe) -> str:
    """Name of the smallest module containing all ``names`` that the forward calls ("" =
    the block itself): the lowest common ancestor, or its nearest ancestor that runs (a
    ModuleList of heads has no forward of its own)."""
    parts = [n.split(".") for n in names]
    common = []
    for comps in zip(*parts):
        if len(set(comps)) != 1:
            break
        common.append(comps[0])
    if len(names) == 1:
        common = parts[0]
    chain = [".".join(common[:i]) for i in range(len(common), 0, -1)]
    fired = runner.ran(chain, probe)
    return next((n for n in chain if n in fired), "")


def _map_tensors(obj, fn):
    """Apply ``fn`` to every tensor inside nested tuples, lists and dicts."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _tensors(obj) -> list:
    out: list = []
    _map_tensors(obj, out.append)
    return out


@torch.no_grad()
def small_probe(runner: BlockRunner, probe: BlockInput, tol: float, n: int = 1) -> BlockInput:
    """The first ``n`` samples of a captured block input, when cutting every batch-sized
    tensor (hidden states, masks, rotary tables) gives the same outputs; else ``probe``."""
    b = probe.hidden.shape[0]
    if b <= n:
        return probe
    cut = lambda t: t[:n] if t.dim() >= 1 and t.shape[0] == b else t  # noqa: E731
    small = BlockInput(_map_tensors(probe.args, cut), _map_tensors(probe.kwargs, cut))
    try:
        y_small = runner.output(small).float()
    except (RuntimeError, ValueError, IndexError, TypeError):
        return probe  # some argument was not batch-major after all
    y_full = runner.output(probe)[:n].float()
    if y_small.shape == y_full.shape and float(
            (y_small - y_full).abs().max()) <= tol * float(y_full.abs().max()):
        return small
    return probe


@torch.no_grad()
def probe_signature(runner: BlockRunner, probe: BlockInput,
                    specs: list[tuple[str, str]]) -> dict:
    """One block forward on ``probe``; for each (first Linear, inspected module) of ``specs``:
    the Linear's input as (M, K) float32 ("x") and the tensors entering the module ("m");
    and the block output ("y", float32)."""
    sig = {"x": [None] * len(specs), "m": [None] * len(specs)}

    def on_x(a, _kw, j):
        if sig["x"][j] is None:
            x = a[0].detach()
            sig["x"][j] = x.reshape(-1, x.shape[-1]).float().clone()

    def on_m(a, kw, j):
        if sig["m"][j] is None:
            sig["m"][j] = [t.detach().float().clone() for t in _tensors((a, kw))
                           if t.is_floating_point()]

    before = []
    for j, (first, module) in enumerate(specs):
        before.append((first, lambda a, kw, j=j: on_x(a, kw, j)))
        if module and module != first:
            before.append((module, lambda a, kw, j=j: on_m(a, kw, j)))
    sig["y"] = runner.run([probe], before=before)[0].float()
    return sig


def changed(before: dict, after: dict, j: int, tol: float) -> bool:
    """Whether group ``j``'s input or inspected-module inputs differ between two signatures
    by more than rounding (``tol`` relative to the largest value)."""
    pairs = [(before["x"][j], after["x"][j])]
    pairs += list(zip(before["m"][j] or [], after["m"][j] or []))
    for a, b in pairs:
        if a is None or b is None or a.shape != b.shape:
            return True
        if float((a - b).abs().max()) > tol * float(a.abs().max().clamp(min=1e-30)):
            return True
    return False


@torch.no_grad()
def capture_groups(block: nn.Module, specs: list[tuple[str, str]], inputs,
                   sink_weight: float = 1.0, sink_max_share: float = 1.0,
                   grams: bool = False) -> list:
    """One pass over all calibration inputs recording, for each (first Linear, inspected
    module) of ``specs``, a :class:`GroupCapture`: |x| of the Linear's input, and the
    inspected module's calls (the block's own calls when the module is "").

    When the inspected module is the Linear itself (a group of one Linear), its output
    error is a quadratic form in the weight error, ``||x ΔWᵀ||² = tr(ΔW G ΔWᵀ)``: only the
    Gram matrix ``G = Σ xᵀx`` is kept, and each grid point costs N·K² instead of T·N·K.

    ``sink_weight`` / ``sink_max_share``: the first position of every window counts that
    many times in the loss (capped by its share of the Linear's input energy), as in GPTQ's
    Hessian (core.hessian.sink_gram), so the scales are searched for the objective a GPTQ
    rounding after them minimises. ``grams``: keep that Gram matrix for every group (GPTQ
    rounding inside the search needs it), not only for single Linears.
    """
    caps = [GroupCapture() for _ in specs]
    runner = BlockRunner(block, inputs)
    seen: dict = {}  # id(cap) -> the first positions' weight of each call of its Linear

    def stats(a, cap, single):
        x = a[0].detach()
        rows = x.reshape(-1, x.shape[-1])
        s = rows.abs().float().sum(0)
        cap.abs_sum = s if cap.abs_sum is None else cap.abs_sum + s
        cap.tokens += rows.shape[0]
        if single or grams:
            g = sink_gram(x, rows, torch.float32, sink_weight, sink_max_share)
            cap.gram = g if cap.gram is None else cap.gram + g
        if not single:
            seen.setdefault(id(cap), []).append(
                sink_weight_of(x, sink_weight, sink_max_share))

    def call(a, kw, out, cap):  # the module's call follows its first Linear's
        cap.calls.append((a, kw, block_output(out).detach()))
        cap.first_weights.append(seen.get(id(cap), [1.0])[-1])

    before, after = [], []
    for (first, module), cap in zip(specs, caps):
        single = module == first
        before.append((first, lambda a, kw, cap=cap, single=single: stats(a, cap, single)))
        if module and not single:  # the module's calls: (args, kwargs, float output)
            after.append((module, lambda a, kw, out, cap=cap: call(a, kw, out, cap)))
    whole = any(not module for _, module in specs)  # the block itself is inspected
    outs = runner.run(before=before, after=after, keep_outputs=whole)
    if whole:
        for i, (inp, out) in enumerate(zip(inputs, outs)):
            for (_, module), cap in zip(specs, caps):
                if not module:
                    ws = seen.get(id(cap), [])
                    cap.calls.append((inp.args, inp.kwargs, out))
                    # a Linear run other than once per input: its calls can't be matched
                    cap.first_weights.append(ws[i] if len(ws) == len(inputs) else 1.0)
    return caps


def set_weight(lin: nn.Module, w: torch.Tensor) -> None:
    """Set the (N, K) weight of a Linear or Conv1D (stored (K, N)) in the layer's dtype."""
    w = w.t() if is_conv1d(lin) else w
    lin.weight.data.copy_(w.to(lin.weight.dtype))


def column_importance(weights: list[torch.Tensor], qargs: QuantArgs) -> torch.Tensor:
    """(K,) mean over rows of |W| normalised by its group's max: AutoAWQ's duo-scaling w."""
    w = torch.cat(weights, 0).abs()  # (sum N, K)
    n, k = w.shape
    gs = qargs.group_size if qargs.group_size > 0 else k
    g = w.reshape(n, k // gs, gs)
    return (g / (g.amax(-1, keepdim=True) + 1e-6)).reshape(n, k).mean(0)


def scale_candidates(act_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float,
                     keep: torch.Tensor) -> torch.Tensor:
    """The scale ``s`` (K,) for one ``alpha``: normalised so max*min = 1, fp16-exact,
    1 on channels outside ``keep``."""
    s = act_mean.clamp(min=1e-8).pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    live = s[keep] if keep.any() else s
    s = s / (live.max() * live.min()).sqrt()
    s = torch.where(keep, s, torch.ones_like(s))
    s = torch.nan_to_num(s, nan=1.0, posinf=1.0).clamp(1e-4, 1e4)
    return s.half().float()  # stored exactly when it ends up as a QuantLinear input_scale


@torch.no_grad()
def search_scale(module: nn.Module, lins: list[nn.Module], cap: GroupCapture,
                 qargs: QuantArgs, n_grid: int, duo: bool, keep: torch.Tensor,
                 rounder: Callable | None = None, rescore_top: int = 0):
    """Grid search of alpha for the group ``lins`` inside ``module``.

    Every alpha is scored with RTN on ``qargs``' integer grid. With ``rounder`` (the
    rounding that follows, ``rounder(lin, W s (N, K), H_s (K, K)) -> rounded W s``, H_s the
    Gram of the scaled inputs ``x / s``; needs ``cap.gram``), the ``rescore_top`` best alphas
    and alpha = 0 are scored again with it, and the best of those is kept: a GPTQ rounding
    corrects much of what RTN's score charges a scale with, and alpha = 0 (plain GPTQ) is
    then always a candidate, so the search never does worse than the rounding alone on the
    objective it measures.

    Returns (s (K,) float32 on the weights' device, info dict with alpha, loss, loss_rtn,
    and ``rescored``: {alpha: loss} when rescored).
    """
    weights = [linear_weight(l).detach().float().clone() for l in lins]
    runner = BlockRunner(module, [BlockInput(a, kw) for a, kw, _ in cap.calls])
    refs = [ref for _, _, ref in cap.calls]
    first_w = cap.first_weights if len(cap.first_weights) == len(refs) else None
    dev = weights[0].device
    act = cap.act_mean.to(dev)
    keep = keep.to(dev)
    w_mean = column_importance(weights, qargs) if duo else None
    grid_args = QuantArgs(qargs.bits, qargs.group_size, qargs.sym, False)
    quadratic = cap.gram is not None and not cap.calls  # the group is one Linear

    def score(cand: dict) -> float:
        if quadratic:  # one Linear: tr(ΔW G ΔWᵀ) / (T N), in the layer's dtype
            dw = cand[lins[0]].to(lins[0].weight.dtype).float() - weights[0]
            return float(((dw @ cap.gram) * dw).sum()) / (cap.tokens * dw.shape[0])
        # the module's output error with the candidate weights, restored after
        return runner.probe(weights=cand, reference=refs, first_weights=first_w)

    def rtn_candidate(s: torch.Tensor) -> dict:
        cand = {}  # Linear -> Q(W s) / s (N, K), what the model computes after the scaling
        for lin, w in zip(lins, weights):
            ws = w * s
            p = weight_params(ws, grid_args)
            sc, z = p.expand(ws.shape[1])
            cand[lin] = fake_quantize(ws, sc, z, qargs.bits) / s
        return cand

    alphas = [i / n_grid for i in range(n_grid)]
    scales = [scale_candidates(act, w_mean, a, keep) for a in alphas]
    losses = [score(rtn_candidate(s)) for s in scales]
    info = {"loss_rtn": losses[0]}
    if rounder is None:
        i = min(range(n_grid), key=losses.__getitem__)
        return scales[i], dict(info, alpha=alphas[i], loss=losses[i])
    top = sorted(range(n_grid), key=losses.__getitem__)[:rescore_top]
    gram = cap.gram.to(dev)
    rescored = {}
    for i in sorted({0, *top}):
        s = scales[i]
        h = gram / (s[:, None] * s[None, :])  # (K, K) Gram of the scaled inputs x / s
        rescored[i] = score({lin: rounder(lin, w * s, h.clone()) / s
                             for lin, w in zip(lins, weights)})
    i = min(rescored, key=rescored.__getitem__)
    return scales[i], dict(info, alpha=alphas[i], loss=rescored[i],
                           rescored={alphas[j]: v for j, v in rescored.items()})


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, qargs: QuantArgs, n_grid: int,
                max_shrink: float, max_elems: int = 2 ** 26):
    """Clamp each (row, group) of ``w`` (N, K) to the shrunk range that minimises
    ``|| x_g (Q(w_g) - w_g)ᵀ ||²`` on the token sample ``x`` (T, K).

    Returns (clamped w (N, K) float32, mean shrink factor). Per-tensor grids are returned as is.
    """
    n, k = w.shape
    if qargs.group_size == 0 or max_shrink == 0:
        return w, 1.0
    gs = qargs.group_size if qargs.group_size > 0 else k
    g = k // gs
    t = x.shape[0]
    xg = x.float().reshape(t, g, gs)
    out = w.float().clone()
    shrink_sum = 0.0
    chunk = max(1, max_elems // max(g * t, 1))
    steps = max(1, int(max_shrink * n_grid))
    for r0 in range(0, n, chunk):
        wc = out[r0:r0 + chunk].reshape(-1, g, gs)  # (n_c, G, gs)
        ref = torch.einsum("ngk,tgk->ngt", wc, xg)
        lo = wc.amin(-1, keepdim=True).clamp(max=0)
        hi = wc.amax(-1, keepdim=True).clamp(min=0)
        best_err = torch.full(wc.shape[:2], float("inf"), device=w.device)
        best_p = torch.ones(wc.shape[:2], device=w.device)
        for i in range(steps):
            p = 1 - i / n_grid
            wcl = torch.minimum(torch.maximum(wc, p * lo), p * hi)
            s, z = find_params(wcl.reshape(-1, gs), qargs.bits, qargs.sym)
            q = fake_quantize(wcl.reshape(-1, gs), s, z, qargs.bits).reshape(wc.shape)
            err = (torch.einsum("ngk,tgk->ngt", q, xg) - ref).pow(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_p = torch.where(better, torch.full_like(best_p, p), best_p)
        bp = best_p[..., None]
        out[r0:r0 + chunk] = torch.minimum(torch.maximum(wc, bp * lo), bp * hi).reshape(-1, k)
        shrink_sum += float(best_p.sum())
    return out, shrink_sum / (n * g)
