"""AWQ (Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, MLSys 2024).

Not all weights matter equally: input channels that see large activations carry the salient
weights. For every group of Linears that read the same input, AWQ multiplies their input
columns by ``s`` (K,) before rounding — salient columns then lose relatively less — and divides
the input by ``s``, folded into the operation that produced it (kvant.model.fold) or, where
none can absorb it, kept as the QuantLinear's ``input_scale``. ``s = act_mean**alpha`` with
alpha chosen on a grid to minimise the output error of the smallest module holding the group
(kvant.algorithms.awq_search). A clipping search then shrinks each weight group's range to
minimise the layer's output error, and the scaled, clipped weights are rounded with RTN — or
with GPTQ (``rounding="gptq"``), whose Hessian is that of the scaled inputs ``x / s``; then the
search's best few alphas and alpha = 0 are scored again with that GPTQ rounding on the
layer's own grid (``gptq_rescore``), so a scale is kept only where it helps the rounding
that really follows.

Everything block-level happens in :meth:`AWQ.prepare_block`, on the float block, before the
engine quantizes any Linear of it, through the engine's block runner only (kvant.calib.runner):
find where each group's scale can be folded (probing the first block of a structure; later
identical blocks reuse the plan), capture every group's statistics in one pass over the
calibration inputs, then per group in execution order search, apply and verify the fold on a
probe batch (a failed check falls back to a fresh plan, then to ``input_scale``); finally
clip. The dict it returns (stored per block in the report) says which layers got a fold and
which an input scale, with the chosen alpha and losses; every layer's own report entry says
the same (``awq_folded_into``, ``awq_input_scale_channels``).

A fold is used only where it is exact (kvant.model.fold): in a post-norm block (BERT) the
LayerNorm before the FFN also feeds the residual add, so that FFN keeps an input scale. What
AWQ cannot scale is refused with :class:`AWQUnsupportedError` naming the layers in full
(:meth:`AWQ.check_model` before any block changes; checks needing a block's inputs before
that block changes; torch errors while probing, searching or clipping likewise).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kvant.algorithms.awq_search import (capture_groups, changed, inspected_module,
                                         probe_signature, search_clip, search_scale,
                                         set_weight, small_probe)
from kvant.algorithms.awq_layer import AWQLayer, AWQUnsupportedError, round_scaled
from kvant.algorithms.base import LayerQuantizer, QuantMethod, as_runner
from kvant.algorithms.registry import register
from kvant.calib.capture import BlockInput
from kvant.calib.runner import BlockRunner
from kvant.config import AWQConfig
from kvant.core.result import dense_weight
from kvant.model import fold
from kvant.model.discovery import linear_weight
from kvant.model.mappings import awq_skips_clip

log = logging.getLogger(__name__)


def _check_groups(block: nn.Module, linears: dict, groups: list[list[str]],
                  reached: set, prefix: str) -> None:
    """Refuse, before the block is changed, what one shared scale cannot describe: a group
    of Linears that run but have different input widths."""
    for names in groups:
        if not set(names) <= reached:
            continue
        widths = {n: linear_weight(linears[n]).shape[1] for n in names}
        if len(set(widths.values())) > 1:
            bad = next(n for n in names if widths[n] != widths[names[0]])
            raise AWQUnsupportedError(
                f"AWQ cannot scale layer {prefix + bad!r} of a {type(block).__name__} block: "
                f"it reads the same input as {prefix + names[0]!r} but has {widths[bad]} "
                f"input channels, not {widths[names[0]]}")


class _naming:
    """Context: a torch error while scaling a block becomes an :class:`AWQUnsupportedError`
    naming the block's layers (the block is left as the failed step left it)."""

    def __init__(self, block: nn.Module, groups: list[list[str]], prefix: str):
        self.block, self.groups, self.prefix = block, groups, prefix

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if typ is None or typ is torch.OutOfMemoryError or not issubclass(
                typ, (RuntimeError, IndexError)):
            return False
        names = [self.prefix + n for g in self.groups for n in g]
        raise AWQUnsupportedError(
            f"AWQ cannot scale the layers {names} of a {type(self.block).__name__} block: "
            f"{exc}; quantize them with another method or list them in ignore") from exc


def _structure_key(block: nn.Module, names: list[str]) -> tuple:
    shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())
    return type(block).__qualname__, tuple(names), shapes


@dataclass
class _BlockState:
    """Everything AWQ knows about the block it is preparing.

    runner: the engine's block runner (block, inputs, name prefix); linears: relative name
    -> Linear; probe: the call folds are verified on; y_ref: (B, T, C) float32 block output
    on it before any scaling; sig: the latest probe_signature; specs: (first Linear,
    inspected module) per group. Per-layer tables are keyed by full layer name.
    """

    runner: BlockRunner
    linears: dict
    probe: BlockInput | None = None
    y_ref: torch.Tensor | None = None
    sig: dict | None = None
    specs: list = field(default_factory=list)
    input_scales: dict = field(default_factory=dict)  # full name -> (K,) scale
    unclipped: dict = field(default_factory=dict)     # full name -> weight before the clip
    layer_info: dict = field(default_factory=dict)    # full name -> report entries

    block = property(lambda self: self.runner.block)
    dtype = property(lambda self: next(iter(self.linears.values())).weight.dtype)

    def full(self, name: str) -> str:
        """The full name of the block-relative layer ``name``."""
        return self.runner.prefix + name


@register(AWQConfig)
class AWQ(QuantMethod):
    """AWQ scale search, fold and clip per block; RTN or GPTQ rounding per layer."""

    needs_calibration = True
    head_unsupported = ("its scales are searched and folded inside decoder blocks only, so "
                        "the head would get plain rounding; use rtn, gptq, quip or spqr")

    def __init__(self, config: AWQConfig):
        super().__init__(config)
        self._plans: dict = {}  # structure key -> (inspected module, FoldPlan)
        self._state: _BlockState | None = None  # the block being prepared / quantized

    def check_model(self, model: nn.Module, blocks, ignore) -> None:
        """Refuse, before any block is changed, a block parameter that is tied to another
        (the same tensor under two names): AWQ scales weights and norms in place, so it
        would silently change the other user too."""
        names: dict = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(p, []).append(name)
        for p in (p for block in blocks for p in block.parameters()):
            if len(names[p]) > 1:
                raise AWQUnsupportedError(
                    f"AWQ cannot scale a model whose parameters {names[p]} are one tied "
                    f"tensor: scaling it in place changes every user; untie them first")

    # -- per block ---------------------------------------------------------------------
    @torch.no_grad()
    def prepare_block(self, block, linears, groups, block_inputs, run_block) -> dict:
        """Search, fold and verify the scale of every group, then clip every Linear.

        One pass over the calibration inputs captures what every group's search needs; a
        group is captured again only when an earlier group's fold changed its inputs (seen
        on the probe batch, which also verifies every fold)."""
        st = self._state = _BlockState(as_runner(block, block_inputs, run_block), linears)
        try:
            return self._scale_and_clip(block, linears, groups)
        finally:  # keep only the per-layer tables: the block and its inputs may be freed
            st.runner, st.linears = BlockRunner(nn.Identity()), {}
            st.probe = st.y_ref = st.sig = None

    def _scale_and_clip(self, block, linears, groups) -> dict:
        st, runner = self._state, self._state.runner
        groups = [g for g in ([n for n in names if n in linears] for names in groups) if g]
        try:
            probe = small_probe(runner, runner.inputs[0], fold.verify_tolerance(st.dtype))
            reached = runner.ran(linears, probe)
            if reached != set(linears):  # one sample misses a layer (an MoE expert, ...)
                probe = runner.inputs[0]
                reached = runner.ran(linears, probe)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, IndexError) as e:
            raise AWQUnsupportedError(
                f"AWQ cannot run a {type(block).__name__} block {runner.prefix!r} on its "
                f"calibration inputs: {e}") from e
        st.probe = probe
        _check_groups(block, linears, groups, reached, runner.prefix)
        unscaled = [names for names in groups if not set(names) <= reached]
        report = [self._not_scaled(names, "not scaled (not run on the first calibration "
                                          "batch)") for names in unscaled]
        groups = [names for names in groups if set(names) <= reached]
        with _naming(block, groups, runner.prefix):
            report += self._prepare(groups)
        with _naming(block, [list(linears)], runner.prefix):
            clip = self._clip() if self.config.clips else {}
        return {"awq": report, "awq_clip": clip}

    def _not_scaled(self, names: list[str], treatment: str) -> dict:
        for n in names:
            self._state.layer_info[self._state.full(n)] = {
                "awq_scale": treatment, "awq_folded_into": [], "awq_input_scale_channels": 0}
        return {"layers": names, "treatment": treatment}

    def _prepare(self, groups: list[list[str]]) -> list:
        """Plan, capture, search, apply and verify every group of the block."""
        st = self._state
        if not groups:
            return []
        plans = [self._plan(names) for names in groups]
        st.specs = [(names[0], plan[0]) for names, plan in zip(groups, plans)]
        st.sig = probe_signature(st.runner, st.probe, st.specs)
        st.y_ref = st.sig["y"]
        how = (self.config.sink_weight, self.config.sink_max_share, self._rescores)
        caps = capture_groups(st.block, st.specs, st.runner.inputs, *how)
        report = []
        for i, names in enumerate(groups):
            if caps[i] is None:  # stale: an earlier fold changed what this group reads
                caps[i] = capture_groups(st.block, [st.specs[i]], st.runner.inputs, *how)[0]
            before = st.sig
            entry = self._group(i, names, plans[i], caps[i])
            caps[i] = None
            for j in range(i + 1, len(groups)):
                if caps[j] is not None and st.sig is not before and changed(
                        before, st.sig, j, fold.verify_tolerance(st.dtype)):
                    caps[j] = None
            report.append(entry)
        return report

    def _plan(self, names: list[str], fresh: bool = False):
        """(inspected module name, FoldPlan, whether it came from an earlier block)."""
        st, cfg = self._state, self.config
        key = _structure_key(st.block, names)
        cached = key in self._plans and not fresh
        if not cached:
            module = inspected_module(st.runner, names, st.probe)
            if cfg.fold:
                plan = fold.find_fold_plan(st.block, names[0], set(names), st.probe,
                                           fold.probe_tolerance(st.dtype))
            else:
                k = linear_weight(st.linears[names[0]]).shape[1]
                plan = fold.FoldPlan(dead=torch.zeros(k, dtype=torch.bool),
                                     free=torch.ones(k, dtype=torch.bool))
            if not cfg.scale_unfoldable:  # unabsorbable channels keep s = 1
                plan = fold.FoldPlan(sources=plan.sources, dead=plan.dead | plan.free,
                                     free=torch.zeros_like(plan.free))
            self._plans[key] = (module, plan)
        return (*self._plans[key], cached)

    def _group(self, i: int, names: list[str], planned, cap) -> dict:
        """Search, apply and verify the scale of group ``i`` (``names``); updates the
        state's signature when the block changed. Returns the group's report entry."""
        st, cfg = self._state, self.config
        module_name, plan, cached = planned
        if cap.tokens == 0:
            return self._not_scaled(names, "unused (no calibration input)")
        module = st.block.get_submodule(module_name) if module_name else st.block
        lins = [st.linears[n] for n in names]
        s, info = search_scale(module, lins, cap, cfg.qargs, cfg.n_grid, cfg.duo_scaling,
                               ~plan.dead, self._rounder(names) if self._rescores else None,
                               cfg.gptq_rescore)
        ok, err = self._apply(i, names, plan, s)
        if not ok and cached:
            # a plan cached from an earlier block may not fit this one: probe this block
            _, plan, _ = self._plan(names, fresh=True)
            ok, err = self._apply(i, names, plan, s)
        if not ok and cfg.scale_unfoldable:
            log.warning("AWQ fold of %s failed verification (error %.3g); keeping the scale "
                        "as input_scale", [st.full(n) for n in names], err)
            plan = fold.FoldPlan(dead=plan.dead, free=torch.ones(s.numel(), dtype=torch.bool))
            ok, err = self._apply(i, names, plan, s)
        elif not ok:  # scale_unfoldable=False: leave the group unscaled
            log.warning("AWQ fold of %s failed verification (error %.3g); leaving it "
                        "unscaled", [st.full(n) for n in names], err)
        treatment = plan.describe() if ok else "not scaled (verification failed)"
        folded = [src.module for src in plan.sources] if ok else []
        n_free = plan.n_free if ok else 0
        for n in names:
            st.layer_info[st.full(n)] = {"awq_alpha": info["alpha"], "awq_scale": treatment,
                                         "awq_folded_into": folded,
                                         "awq_input_scale_channels": n_free}
        entry = {"layers": names, "module": module_name or "<block>", "treatment": treatment,
                 "alpha": info["alpha"], "loss": info["loss"], "loss_rtn": info["loss_rtn"],
                 "verify_error": err}
        if "rescored" in info:
            entry["loss_gptq_by_alpha"] = info["rescored"]
        return entry

    @property
    def _rescores(self) -> bool:
        """Whether the scale search scores its best candidates with the GPTQ rounding."""
        cfg = self.config
        return cfg.rounding == "gptq" and cfg.gptq_rescore > 0 and cfg.outlier_budget == 0

    def _rounder(self, names: list[str]):
        """``(Linear, W s, H_s) -> rounded W s`` (N, K) float32: the GPTQ rounding each
        Linear of the group gets after the search, on its own config's grid."""
        st = self._state
        full = {id(st.linears[n]): st.full(n) for n in names}

        def rnd(lin, ws, h):
            name = full[id(lin)]
            return dense_weight(round_scaled(ws, h, self.config_for(name), name))
        return rnd

    def _apply(self, i: int, names: list[str], plan, s: torch.Tensor) -> tuple[bool, float]:
        """Scale group ``i``'s columns, fold 1/s, add input scales; verify on the probe that
        the group now sees ``x / s`` and the block output is unchanged.

        Returns (ok, error); on success the state's signature is the new one, on failure
        everything is undone exactly."""
        st = self._state
        snap = fold.snapshot(st.block, [src.module for src in plan.sources] + names)
        in_scale, handles = fold.apply_scales(st.block, names, plan, s)
        new = probe_signature(st.runner, st.probe, st.specs)
        x_before, x_after = st.sig["x"][i], new["x"][i]
        amax = x_before.abs().amax(0).clamp(min=1e-30)
        err_x = float(((x_after * s.to(x_after.device) - x_before).abs().amax(0) / amax).max())
        err_y = float((new["y"] - st.y_ref).norm() / st.y_ref.norm().clamp(min=1e-30))
        err = max(err_x, err_y)
        if err <= fold.verify_tolerance(st.dtype):
            if in_scale is not None:
                for n in names:
                    st.input_scales[st.full(n)] = in_scale.detach().float().cpu()
            st.sig = new
            return True, err
        for h in handles:
            h.remove()
        fold.restore(st.block, snap)
        return False, err

    # -- clipping -------------------------------------------------------------------------
    def _clip(self) -> dict:
        st, cfg = self._state, self.config
        names = [n for n in st.linears if not awq_skips_clip(n)]
        if not names:
            return {}
        per_call = max(1, -(-cfg.clip_tokens // len(st.runner.inputs)))
        samples: dict[str, list] = {n: [] for n in names}

        def take(n, x):  # an evenly spaced sample of the call's tokens, (<= per_call, K)
            x = x.reshape(-1, x.shape[-1])
            step = max(1, x.shape[0] // per_call)
            samples[n].append(x[::step][:per_call].float())

        st.runner.capture(names, take)
        out = {}
        for n in names:
            if not samples[n]:
                continue
            x = torch.cat(samples[n])[: cfg.clip_tokens]
            w = linear_weight(st.linears[n]).detach().float()
            w_new, shrink = search_clip(w, x, cfg.qargs, cfg.clip_grid, cfg.clip_max_shrink)
            if cfg.outlier_budget > 0:
                st.unclipped[st.full(n)] = w.clone()
            set_weight(st.linears[n], w_new)
            out[n] = round(shrink, 4)
            st.layer_info.setdefault(st.full(n), {})["awq_clip"] = round(shrink, 4)
        return out

    # -- per layer ------------------------------------------------------------------------
    def layer_quantizer(self, name: str, weight: torch.Tensor) -> LayerQuantizer:
        st = self._state or _BlockState(BlockRunner(nn.Identity()), {})  # name: full name
        return AWQLayer(name, weight, self.config_for(name), st.input_scales.get(name),
                         dict(st.layer_info.get(name) or {}), unclipped=st.unclipped.get(name))
