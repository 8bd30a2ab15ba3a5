"""Fold per-input-channel scales into the operation that produced a Linear's input.

AWQ multiplies the input columns of a group of Linears by ``s`` (K,) and must divide their
shared input ``x`` (..., K) by ``s``. That division is free when channel ``c`` of ``x`` is
exactly proportional to one parameter row of an earlier module of the block: a norm's weight
(and bias) entry, or a Linear's output row followed only by operations that are linear in it
(attention is linear in v, ReLU is positively homogeneous, a gate multiplies up_proj's output).
Dividing that row by ``s[c]`` then divides ``x[..., c]`` by ``s[c]`` and changes nothing else.

Which rows feed which channels is found by probing the block, not from names:
1. scale all rows of each earlier candidate module by 2 and rerun the block on one probe
   batch; channels of ``x`` that double exactly are driven linearly by that candidate
   (scaling by 2 is exact in floating point, so "exactly" means up to nondeterminism);
2. for such candidates, ``ceil(log2(rows+1))`` more probes scale row ``r`` by 2 where bit j of
   ``r+1`` is set; the bits each channel doubles in spell the row that drives it;
3. a row that drives several channels (grouped-query attention repeats each v head over
   several o_proj input blocks) cannot carry one factor per channel;
4. the fold must also be exact for every other reader of those rows: halving the found rows
   and doubling the matching columns of the group's Linears (both exact in floating point)
   must leave the block output unchanged. A post-norm block (BERT) fails here: the LayerNorm
   before its FFN also feeds the residual add, so it cannot absorb a scale meant for the FFN
   alone (such modules are listed in ``FoldPlan.shared``).
Channels that fail any step, and channels no candidate drives, are "free" and keep their
scale as an explicit input scaling of the Linear (``QuantLinear.input_scale``).
Channels that are zero on the whole probe are "dead": nothing can be learned about them and
AWQ leaves their scale at 1. Callers verify every fold numerically (:func:`fold_error`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kvant.calib.runner import BlockRunner
from kvant.model.discovery import is_conv1d, is_linear
from kvant.model.mappings import norm_weight_offset


@dataclass
class FoldSource:
    """Rows of one module's parameters that drive channels of a group's input.

    module: name relative to the block; rows, channels: (n,) long, row ``rows[i]`` drives
    input channel ``channels[i]``.
    """

    module: str
    rows: torch.Tensor
    channels: torch.Tensor


@dataclass
class FoldPlan:
    """Where the inverse scale of each input channel of a group can go.

    sources: rows that absorb ``1/s``; dead: (K,) bool channels silent on the probe (keep
    s = 1); free: (K,) bool channels no row drives one-to-one (need an input scaling);
    shared: modules whose rows drive channels of the group but also feed other operations
    (so folding into them would not be exact).
    """

    sources: list[FoldSource] = field(default_factory=list)
    dead: torch.Tensor | None = None
    free: torch.Tensor | None = None
    shared: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """Short human-readable summary, e.g. ``"fold->ln1 (384)"``."""
        parts = [f"{src.module}({len(src.rows)})" for src in self.sources]
        text = "fold->" + ",".join(parts) if parts else "no fold"
        n_free = self.n_free
        if n_free:
            text += f"; input_scale on {n_free} channels"
            if self.shared:
                text += f" ({', '.join(self.shared)} also feeds other operations)"
        return text

    @property
    def n_free(self) -> int:
        """How many channels keep an explicit input scale."""
        return int(self.free.sum()) if self.free is not None else 0


def row_params(module: nn.Module) -> list[tuple[nn.Parameter, int, float]] | None:
    """(parameter, row dimension, weight offset) of a module whose outputs are its rows.

    nn.Linear and Conv1D: weight rows and bias; a norm (a leaf module whose parameters are
    all 1-D of one size, with a ``weight``): weight and bias entries. Anything else: None.
    """
    if isinstance(module, nn.Linear):
        out = [(module.weight, 0, 0.0)]
    elif is_conv1d(module):
        out = [(module.weight, 1, 0.0)]
    else:
        params = dict(module.named_parameters(recurse=False))
        w = params.get("weight")
        if (list(module.children()) or w is None or w.dim() != 1
                or any(p.dim() != 1 or p.numel() != w.numel() for p in params.values())):
            return None
        out = [(w, 0, norm_weight_offset(module))]
        if params.get("bias") is not None:
            out.append((params["bias"], 0, 0.0))
        return out
    if getattr(module, "bias", None) is not None:
        out.append((module.bias, 0, 0.0))
    return out


def n_rows(module: nn.Module) -> int:
    """Number of output rows of a module accepted by :func:`row_params`."""
    p, dim, _ = row_params(module)[0]
    return p.shape[dim]


@torch.no_grad()
def scale_rows(module: nn.Module, factor: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Multiply the output rows ``rows`` (all if None) of ``module`` by ``factor`` (n,)."""
    for p, dim, off in row_params(module):
        idx = torch.arange(p.shape[dim], device=p.device) if rows is None else rows.to(p.device)
        f = factor.to(p.device, torch.float32)
        sel = p.data.index_select(dim, idx).float()
        shape = [-1 if d == dim else 1 for d in range(p.dim())]
        new = (sel + off) * f.view(shape) - off
        p.data.index_copy_(dim, idx, new.to(p.dtype))


def probe_input(runner: BlockRunner, first: nn.Module, probe, order: dict | None = None):
    """Run the block on ``probe``; return the (M, K) float32 input of ``first`` (first call).

    With ``order`` (module -> name), also return the names of those modules that finished
    before ``first`` was called.
    """
    seen: dict = {}
    done: list[str] = []

    def grab(a, _kw):
        if "x" not in seen:
            seen["x"] = a[0].detach().float().clone()

    def finished(name):
        if "x" not in seen:
            done.append(name)

    after = [(mod, lambda a, kw, o, name=name: finished(name))
             for mod, name in (order or {}).items()]
    runner.run([probe], before=[(first, grab)], after=after, keep_outputs=False)
    if "x" not in seen:
        raise RuntimeError("the group's first Linear did not run on the probe input")
    x = seen["x"]
    return x.reshape(-1, x.shape[-1]), done


def probe_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of an exact-by-construction comparison in ``dtype``."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def verify_tolerance(dtype: torch.dtype) -> float:
    """Largest relative error a correct fold may show in ``dtype`` (arbitrary scales round)."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def _classify(x: torch.Tensor, x2: torch.Tensor, live: torch.Tensor, tol: float):
    """Per channel: 1 doubled, 0 unchanged, -1 anything else (live channels only)."""
    if x2.shape != x.shape:  # the probe changed which tokens reach the layer (MoE routing):
        return torch.where(live, -1, 0).long()  # no channel is driven linearly
    amax = x.abs().amax(0).clamp(min=1e-30)
    same = (x2 - x).abs().amax(0) / amax <= tol
    double = (x2 - 2 * x).abs().amax(0) / amax <= tol
    out = torch.full_like(amax, -1, dtype=torch.long)
    out[same] = 0
    out[double & ~same] = 1
    out[~live] = 0
    return out


@torch.no_grad()
def find_fold_plan(block: nn.Module, group_first: str, exclude: set[str], probe,
                   tol: float) -> FoldPlan:
    """Probe ``block`` for the rows that drive the input of the Linear ``group_first``.

    exclude: the group's own Linears: they may not absorb scales, and they take the
    compensating column scale in the exactness check (step 4 above).
    probe: a captured block input (calib.capture.BlockInput) with live data.
    """
    runner = BlockRunner(block, [probe])
    first = block.get_submodule(group_first)
    group = [block.get_submodule(n) for n in sorted(exclude)]
    group = [m for m in group if is_linear(m)]
    cands = {m: n for n, m in block.named_modules()
             if n and n not in exclude and row_params(m) is not None}
    x, before = probe_input(runner, first, probe, cands)
    y_ref = runner.output(probe).detach().float()
    shared: list[str] = []
    k = x.shape[1]
    amax = x.abs().amax(0)
    live = amax > 1e-6 * amax.max().clamp(min=1e-30)
    live_cpu = live.cpu()
    # channel -> (candidate order, row). Candidates are tried from the one that finished last
    # (closest to the group) backwards; a channel keeps the first candidate that drives it,
    # and the search stops once every live channel has one.
    owner = torch.full((k,), -1, dtype=torch.long)
    owner_row = torch.full((k,), -1, dtype=torch.long)
    names = list(dict.fromkeys(before))
    for ci in reversed(range(len(names))):
        if bool((owner >= 0)[live_cpu].all()):
            break
        mod = block.get_submodule(names[ci])
        saved = [p.data.clone() for p, _, _ in row_params(mod)]
        rows = n_rows(mod)
        try:
            scale_rows(mod, torch.full((rows,), 2.0))
            state = _classify(x, probe_input(runner, first, probe)[0], live, tol)
            _restore(mod, saved)
            hit = (state == 1).cpu()
            if not hit.any():
                continue
            code = torch.zeros(k, dtype=torch.long)
            bad = torch.zeros(k, dtype=torch.bool)
            for j in range((rows + 1).bit_length()):
                bit = ((torch.arange(rows) + 1) >> j) & 1
                scale_rows(mod, 1.0 + bit.float())
                sj = _classify(x, probe_input(runner, first, probe)[0], live, tol).cpu()
                _restore(mod, saved)
                code |= (sj == 1).long() << j
                bad |= sj == -1
            row = code - 1
            ok = hit & ~bad & (row >= 0) & (row < rows)
            # one-to-one: a row feeding several channels cannot carry one factor per channel
            counts = torch.bincount(row[ok], minlength=rows)
            ok &= (counts[row.clamp(0, rows - 1)] == 1) & (owner < 0)
            if ok.any() and not _fold_is_exact(runner, mod, row[ok], ok, group, probe, y_ref,
                                               tol):
                shared.append(names[ci])
                continue
            owner[ok] = ci
            owner_row[ok] = row[ok]
        finally:
            _restore(mod, saved)
    plan = FoldPlan(dead=~live_cpu, free=(owner < 0) & live_cpu, shared=shared)
    for ci, name in enumerate(names):  # execution order
        sel = (owner == ci).nonzero().flatten()
        if len(sel):
            plan.sources.append(FoldSource(name, owner_row[sel], sel))
    return plan


@torch.no_grad()
def _fold_is_exact(runner: BlockRunner, mod: nn.Module, rows: torch.Tensor,
                   channels: torch.Tensor, group: list[nn.Module], probe, y_ref: torch.Tensor,
                   tol: float) -> bool:
    """Halve ``rows`` of ``mod`` and double the columns ``channels`` ((K,) bool) of every
    Linear of ``group``: True when the block output on ``probe`` stays ``y_ref``, i.e. the
    rows reach the rest of the block only through the group."""
    saved = [p.data.clone() for p, _, _ in row_params(mod)]
    saved_cols = [lin.weight.data.clone() for lin in group]
    try:
        scale_rows(mod, torch.full((len(rows),), 0.5), rows)
        s = torch.where(channels, 2.0, 1.0)
        for lin in group:
            scale_columns(lin, s)
        y = runner.output(probe).float()
        return bool((y - y_ref).abs().max() <= tol * y_ref.abs().max().clamp(min=1e-30))
    finally:
        _restore(mod, saved)
        for lin, data in zip(group, saved_cols):
            lin.weight.data.copy_(data)


def _restore(mod: nn.Module, saved: list[torch.Tensor]) -> None:
    for (p, _, _), data in zip(row_params(mod), saved):
        p.data.copy_(data)


@torch.no_grad()
def apply_fold(block: nn.Module, plan: FoldPlan, s: torch.Tensor) -> None:
    """Divide every source row by the scale of the channel it drives; ``s`` (K,) > 0.

    Raises ValueError when a source does not fit (a row or channel out of range): a scale is
    never paired with an operation of another width."""
    for src in plan.sources:
        mod = block.get_submodule(src.module)
        if (len(src.rows) != len(src.channels) or int(src.rows.max()) >= n_rows(mod)
                or int(src.channels.max()) >= s.numel()):
            raise ValueError(f"fold plan does not fit: {len(src.rows)} rows of {src.module!r} "
                             f"({n_rows(mod)} rows) for {s.numel()} input channels")
        scale_rows(block.get_submodule(src.module), 1.0 / s.cpu().float()[src.channels],
                   src.rows)


@torch.no_grad()
def scale_columns(lin: nn.Module, s: torch.Tensor) -> None:
    """W[:, c] *= s[c] for a Linear (N, K) or Conv1D (stored (K, N))."""
    w = lin.weight.data.float()
    s = s.to(w.device, torch.float32)
    lin.weight.data.copy_((w * s[:, None] if is_conv1d(lin) else w * s).to(lin.weight.dtype))


@torch.no_grad()
def apply_scales(block: nn.Module, names: list[str], plan: FoldPlan, s: torch.Tensor):
    """Scale the input columns of the Linears ``names`` by ``s`` (K,) and divide their input
    by ``s``: folded into the plan's sources, and through a forward pre-hook on each Linear
    for the plan's free channels (the float stand-in of ``QuantLinear.input_scale``; it
    stays until the engine replaces the Linear, or the caller removes it to undo).

    Returns (input_scale (K,) with 1 on folded channels, or None; the hook handles).
    """
    for n in names:
        scale_columns(block.get_submodule(n), s)
    apply_fold(block, plan, s)
    free = plan.free.to(s.device)
    if not free.any():
        return None, []
    in_scale = torch.where(free, s, torch.ones_like(s))
    handles = [block.get_submodule(n).register_forward_pre_hook(
        lambda m, a, d=in_scale: (a[0] / d.to(a[0].device, a[0].dtype), *a[1:]))
        for n in names]
    return in_scale, handles


def snapshot(block: nn.Module, names) -> dict:
    """Copies of the parameters of the named modules (for an exact undo)."""
    return {n: {pn: p.data.clone() for pn, p in block.get_submodule(n).named_parameters(
        recurse=False)} for n in names}


def restore(block: nn.Module, snap: dict) -> None:
    """Undo to a :func:`snapshot`."""
    for n, params in snap.items():
        mod = block.get_submodule(n)
        for pn, data in params.items():
            getattr(mod, pn).data.copy_(data)
