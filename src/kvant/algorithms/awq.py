"""AWQ (Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, MLSys 2024).

Not all weights matter equally: input channels that see large activations carry the salient
weights. For every group of Linears that read the same input, AWQ multiplies their input
columns by ``s`` (K,) before rounding — salient columns then lose relatively less — and divides
the input by ``s``, folded into the operation that produced it (kvant.model.fold) or, where
none can absorb it, kept as the QuantLinear's ``input_scale``. ``s = act_mean**alpha`` with
alpha chosen on a grid to minimise the output error of the smallest module holding the group
(kvant.algorithms.awq_search). A clipping search then shrinks each weight group's range to
minimise the layer's output error, and the scaled, clipped weights are rounded with RTN — or
with GPTQ (``rounding="gptq"``), whose Hessian is that of the scaled inputs ``x / s``.

Everything block-level happens in :meth:`AWQ.prepare_block`, on the float block, before the
engine quantizes any Linear of it: find where each group's scale can be folded (probing the
first block of a structure; later identical blocks reuse the plan), capture every group's
statistics in one pass over the calibration inputs, then per group in execution order search,
apply and verify the fold on a probe batch (a failed check falls back to a fresh plan, then to
``input_scale``); finally clip. The dict it returns (stored per block in the report) says
which layers got a fold and which an input scale, with the chosen alpha and losses.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from kvant.algorithms.awq_search import (capture_groups, changed, inspected_module,
                                         probe_signature, search_clip, search_scale,
                                         set_weight, small_probe)
from kvant.algorithms.base import LayerQuantizer, LayerResult, QuantMethod, block_relative
from kvant.algorithms.registry import register
from kvant.config import AWQConfig
from kvant.core.grid import rtn
from kvant.model import fold
from kvant.model.discovery import linear_weight
from kvant.model.mappings import awq_skips_clip

log = logging.getLogger(__name__)


class _AWQLayer(LayerQuantizer):
    """Rounds one (already scaled and clipped) Linear with RTN or GPTQ."""

    def __init__(self, name: str, weight: torch.Tensor, config: AWQConfig,
                 input_scale: torch.Tensor | None, info: dict,
                 unclipped: torch.Tensor | None = None):
        self.name, self.weight, self.config = name, weight, config
        self.input_scale, self.info = input_scale, info
        self.unclipped = unclipped  # (N, K) scaled weight before the clip (outlier budget)
        self.acc = None
        if config.rounding == "gptq" or config.outlier_budget > 0:
            from kvant.core.hessian import HessianAccumulator
            self.acc = HessianAccumulator(weight.shape[1], weight.device)

    def observe(self, x: torch.Tensor) -> None:
        if self.acc is not None:
            self.acc.add(x)

    def quantize(self) -> LayerResult:
        cfg = self.config
        H = self.acc.result(self.name) if self.acc is not None else None
        self.acc = None
        if cfg.outlier_budget > 0:
            res = self._with_outliers(H)
        elif H is not None:
            from kvant.algorithms.gptq import gptq_quantize
            res = gptq_quantize(self.weight, H, cfg.qargs, block_size=cfg.block_size,
                                damp_percent=cfg.damp_percent, act_order=cfg.act_order,
                                layer=self.name)
        else:
            q, p = rtn(self.weight, cfg.qargs, self.name)
            s, z = p.expand(q.shape[1])
            loss = float(((self.weight.float() - (q.float() - z) * s) ** 2).sum())
            res = LayerResult(q, p.scales, p.zeros, cfg.bits, p.group_size, loss=loss)
        if self.input_scale is not None:
            res.extras["input_scale"] = self.input_scale
        res.info.update(self.info)
        return res

    def _with_outliers(self, H: torch.Tensor) -> LayerResult:
        """RTN or GPTQ rounding of the scaled weight with an fp16 outlier budget, through
        SpQR's separable path (fp16 statistics, AWQ's integer-zero grid)."""
        from kvant.algorithms.spqr import spqr_gptq, spqr_rtn
        from kvant.config import SpQRConfig

        cfg = self.config
        scfg = SpQRConfig(bits=cfg.bits, group_size=cfg.group_size, stat_bits=16,
                          outlier_budget=cfg.outlier_budget, base=cfg.rounding,
                          act_order=cfg.act_order and cfg.rounding == "gptq",
                          damp_percent=cfg.damp_percent, block_size=cfg.block_size)
        if cfg.rounding == "gptq":
            res = spqr_gptq(self.weight, H, scfg, self.name)
        else:
            res = spqr_rtn(self.weight, H, scfg, self.name)
        if self.unclipped is not None:
            # the clip shaped the dense grid; an outlier keeps its unclipped value
            ex = res.extras
            mask = ex["outlier_mask"]
            d = self.unclipped.to(mask.device).float() - self.weight.to(mask.device).float()
            ex["outlier_vals"] = torch.where(mask, ex["outlier_vals"] + d,
                                             ex["outlier_vals"]).half().float()
        return res


def _structure_key(block: nn.Module, names: list[str]) -> tuple:
    shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters())
    return type(block).__qualname__, tuple(names), shapes


@register(AWQConfig)
class AWQ(QuantMethod):
    """AWQ scale search, fold and clip per block; RTN or GPTQ rounding per layer."""

    needs_calibration = True

    def __init__(self, config: AWQConfig):
        super().__init__(config)
        self._plans: dict = {}        # structure key -> (inspected module, FoldPlan)
        self._input_scales: dict = {}  # Linear name in the current block -> (K,) scale
        self._unclipped: dict = {}     # Linear name -> weight before the clip (outlier budget)
        self._layer_info: dict = {}    # Linear name in the current block -> report entries

    # -- per block ---------------------------------------------------------------------
    @torch.no_grad()
    def prepare_block(self, block, linears, groups, block_inputs, run_block) -> dict:
        """Search, fold and verify the scale of every group, then clip every Linear.

        One pass over the calibration inputs captures what every group's search needs; a
        group is captured again only when an earlier group's fold changed its inputs (seen
        on the probe batch, which also verifies every fold)."""
        self._input_scales, self._layer_info, self._unclipped = {}, {}, {}
        groups = [g for g in ([n for n in names if n in linears] for names in groups) if g]
        dtype = next(iter(linears.values())).weight.dtype
        tol = fold.probe_tolerance(dtype)
        probe = small_probe(block, block_inputs[0], fold.verify_tolerance(dtype))
        plans = [self._plan(block, linears, names, probe, tol) for names in groups]
        specs = [(names[0], plan[0]) for names, plan in zip(groups, plans)]
        sig = probe_signature(block, probe, specs)
        y_ref = sig["y"]
        caps = capture_groups(block, specs, block_inputs)
        report = []
        for i, names in enumerate(groups):
            if caps[i] is None:  # stale: an earlier fold changed what this group reads
                caps[i] = capture_groups(block, [specs[i]], block_inputs)[0]
            entry, sig = self._group(block, linears, names, plans[i], caps[i], probe, tol,
                                     y_ref, sig, specs, i)
            caps[i] = None
            for j in range(i + 1, len(groups)):
                if caps[j] is not None and entry.get("stale_check") and changed(
                        entry["stale_check"], sig, j, fold.verify_tolerance(dtype)):
                    caps[j] = None
            entry.pop("stale_check", None)
            report.append(entry)
        clip = self._clip(block, linears, block_inputs) if self.config.clip_search else {}
        return {"awq": report, "awq_clip": clip}

    def _plan(self, block, linears, names, probe, tol, fresh: bool = False):
        """(inspected module name, FoldPlan, whether it came from an earlier block)."""
        key = _structure_key(block, names)
        cached = key in self._plans and not fresh
        if not cached:
            module = inspected_module(block, names, probe)
            if self.config.fold:
                plan = fold.find_fold_plan(block, names[0], set(names), probe, tol)
            else:
                k = linear_weight(linears[names[0]]).shape[1]
                plan = fold.FoldPlan(dead=torch.zeros(k, dtype=torch.bool),
                                     free=torch.ones(k, dtype=torch.bool))
            if not self.config.scale_unfoldable:  # unabsorbable channels keep s = 1
                plan = fold.FoldPlan(sources=plan.sources, dead=plan.dead | plan.free,
                                     free=torch.zeros_like(plan.free))
            self._plans[key] = (module, plan)
        return (*self._plans[key], cached)

    def _group(self, block, linears, names, planned, cap, probe, tol, y_ref, sig, specs, i):
        """Search, apply and verify one group's scale. Returns (report entry, signature of
        the block after it)."""
        cfg = self.config
        module_name, plan, cached = planned
        if cap.tokens == 0:
            return {"layers": names, "treatment": "unused (no calibration input)"}, sig
        module = block.get_submodule(module_name) if module_name else block
        lins = [linears[n] for n in names]
        s, info = search_scale(module, lins, cap, cfg.qargs, cfg.n_grid, cfg.duo_scaling,
                               ~plan.dead)
        args = (block, linears, names, s, probe, y_ref, sig, specs, i)
        ok, err, new_sig = self._apply(plan, *args)
        if not ok and cached:
            # a plan cached from an earlier block may not fit this one: probe this block
            _, plan, _ = self._plan(block, linears, names, probe, tol, fresh=True)
            ok, err, new_sig = self._apply(plan, *args)
        if not ok and cfg.scale_unfoldable:
            log.warning("AWQ fold of %s failed verification (error %.3g); keeping the scale "
                        "as input_scale", names, err)
            plan = fold.FoldPlan(dead=plan.dead, free=torch.ones(s.numel(), dtype=torch.bool))
            ok, err, new_sig = self._apply(plan, *args)
        elif not ok:  # scale_unfoldable=False: leave the group unscaled
            log.warning("AWQ fold of %s failed verification (error %.3g); leaving it "
                        "unscaled", names, err)
        treatment = plan.describe() if ok else "not scaled (verification failed)"
        for n in names:
            self._layer_info[n] = {"awq_alpha": info["alpha"], "awq_scale": treatment}
        entry = {"layers": names, "module": module_name or "<block>", "treatment": treatment,
                 "alpha": info["alpha"], "loss": info["loss"], "loss_rtn": info["loss_rtn"],
                 "verify_error": err, "stale_check": sig}
        return entry, new_sig

    def _apply(self, plan, block, linears, names, s, probe, y_ref, sig, specs, i):
        """Scale the group's columns, fold 1/s, add input scales; verify on the probe that
        the group now sees ``x / s`` and the block output is unchanged.

        Returns (ok, error, new signature); on failure everything is undone exactly."""
        snap = fold.snapshot(block, [src.module for src in plan.sources] + names)
        in_scale, handles = fold.apply_scales(block, names, plan, s)
        new = probe_signature(block, probe, specs)
        x_before, x_after = sig["x"][i], new["x"][i]
        amax = x_before.abs().amax(0).clamp(min=1e-30)
        err_x = float(((x_after * s.to(x_after.device) - x_before).abs().amax(0) / amax).max())
        err_y = float((new["y"] - y_ref).norm() / y_ref.norm().clamp(min=1e-30))
        err = max(err_x, err_y)
        if err <= fold.verify_tolerance(linears[names[0]].weight.dtype):
            if in_scale is not None:
                for n in names:
                    self._input_scales[n] = in_scale.detach().float().cpu()
            return True, err, new
        for h in handles:
            h.remove()
        fold.restore(block, snap)
        return False, err, sig

    # -- clipping -------------------------------------------------------------------------
    def _clip(self, block, linears, inputs) -> dict:
        cfg = self.config
        names = [n for n in linears if not awq_skips_clip(n)]
        if not names:
            return {}
        n_calls = len(inputs)
        per_call = max(1, -(-cfg.clip_tokens // n_calls))
        samples: dict[str, list] = {n: [] for n in names}

        def take(_m, a, n):
            x = a[0].detach().reshape(-1, a[0].shape[-1])
            step = max(1, x.shape[0] // per_call)
            samples[n].append(x[::step][:per_call].float())

        handles = [linears[n].register_forward_pre_hook(lambda m, a, n=n: take(m, a, n))
                   for n in names]
        try:
            for inp in inputs:
                block(*inp.args, **inp.kwargs)
        finally:
            for h in handles:
                h.remove()
        out = {}
        for n in names:
            if not samples[n]:
                continue
            x = torch.cat(samples[n])[: cfg.clip_tokens]
            w = linear_weight(linears[n]).detach().float()
            w_new, shrink = search_clip(w, x, cfg.qargs, cfg.clip_grid, cfg.clip_max_shrink)
            if cfg.outlier_budget > 0:
                self._unclipped[n] = w.clone()
            set_weight(linears[n], w_new)
            out[n] = round(shrink, 4)
            self._layer_info.setdefault(n, {})["awq_clip"] = round(shrink, 4)
        return out

    # -- per layer ------------------------------------------------------------------------
    def _lookup(self, table: dict, name: str):
        rel = block_relative(name, table)
        return table[rel] if rel is not None else None

    def layer_quantizer(self, name: str, weight: torch.Tensor) -> LayerQuantizer:
        return _AWQLayer(name, weight, self.config, self._lookup(self._input_scales, name),
                         dict(self._lookup(self._layer_info, name) or {}),
                         unclipped=self._lookup(self._unclipped, name))
