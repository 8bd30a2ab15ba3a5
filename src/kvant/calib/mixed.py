"""Mixed precision to a target size: measure every layer at every candidate width, then
choose the widths (:func:`plan_mixed`), then the engine quantizes with them.

The budget is global, so the work is two passes over the blocks:

1. *measure* (this module): the float model runs block by block on the calibration tokens
   (each block fed the float outputs of the one before). In each block every Linear's input
   Gram matrix ``H = Σ x xᵀ`` is accumulated, and the method's own layer quantizer is run
   at every candidate (bits, group_size) on the same inputs; the packed candidate gives the
   exact stored size and the effective weight ``Ŵ`` (read back through the packed layer's
   forward, so rotations and input scales are included). Its predicted cost is
   ``sum_n f_n ((W - Ŵ) H (W - Ŵ)ᵀ)_nn`` (see :class:`kvant.calib.plan.MixedConfig` for the
   weights ``f_n`` of each sensitivity; "kl" replaces it by the measured KL increase).
   Cost: one float forward per block, plus every candidate's quantization of every layer
   (about ``len(candidates)`` times the quantizing pass's layer solves), plus for "fisher"
   one forward and backward of the whole float model on the calibration tokens, for "kl"
   one forward of the whole model per layer and candidate.
2. *quantize* (kvant.calib.engine, with the plan): the ordinary pass, each layer quantized
   with its chosen config (``QuantMethod.config_for``), quantized outputs propagated.

Block-level preparation (AWQ's scale search) is not run while measuring: a candidate is
measured with the method's layer rounding on the unscaled weights, and in the quantizing
pass AWQ searches its scales at the base config's width.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvant.algorithms.registry import build
from kvant.calib import dist as kdist
from kvant.calib.allocate import BudgetError, allocate
from kvant.calib.candidates import Cand
from kvant.calib.capture import block_output, capture_block_inputs
from kvant.calib.plan import LayerChoice, MixedConfig, MixedPlan
from kvant.config import EngineOptions, MethodConfig
from kvant.core.grid import check_group_size
from kvant.core.result import quant_linear_class
from kvant.errors import InputError
from kvant.eval.perplexity import lm_logits
from kvant.model.discovery import find_blocks, find_linears, linear_weight, set_submodule
from kvant.nn.qlinear import QuantLinear



@dataclasses.dataclass
class Measurement:
    """Every layer's candidates: full name -> {(method, bits, group): (stored bits, loss)},
    and the layer's weight count."""

    options: dict[str, dict[Cand, tuple[int, float]]]
    weights: dict[str, int]
    seconds: float = 0.0


def _check_inputs(model: nn.Module, config: MethodConfig, mixed: MixedConfig, calib,
                  methods: dict) -> dict:
    """Refuse before any work (``methods``: candidate -> built method); returns full layer
    name -> (N, K)."""
    if getattr(model, "kvant_lazy_blocks", None) is not None:
        raise InputError("mixed precision does not stream blocks from disk yet: load the "
                         "model whole (kvant.load_model without lazy=True; CLI --no-stream)")
    if kdist.active():
        raise InputError("mixed precision does not run across several processes yet")
    if calib is None or len(calib) == 0:
        raise InputError("mixed precision measures each layer on calibration data; none "
                         "was given")
    prefix, blocks = find_blocks(model)
    shapes = {}
    for i, block in enumerate(blocks):
        for name, lin in find_linears(block, config.ignore, f"{prefix}.{i}.").items():
            n, k = linear_weight(lin).shape
            full = f"{prefix}.{i}.{name}"
            for g in sorted({c.group_size for c in methods}):
                check_group_size(k, g, full)
            shapes[full] = (n, k)
    lowest = min_bpw(shapes, methods)
    if mixed.target_bpw < lowest:
        raise InputError(f"target of {mixed.target_bpw} bits/weight is below the smallest "
                         f"candidate: every layer at its narrowest grid stores at least "
                         f"{lowest:.4f} bits/weight (scales and zero points counted); raise "
                         "the target or add a narrower width / larger group")
    return shapes


def min_bpw(shapes: dict[str, tuple[int, int]], methods: dict) -> float:
    """Stored bits per weight with every layer on its cheapest candidate (``methods``:
    candidate -> built method), each counted by its method's
    :meth:`~kvant.algorithms.base.QuantMethod.least_stored_bits` (exact for the grids and
    codebooks, a lower bound where outliers depend on the data)."""
    bits = 0
    for n, k in shapes.values():
        bits += min(m.least_stored_bits(n, k) for m in methods.values())
    return bits / sum(n * k for n, k in shapes.values())


def _effective_weight(ql: nn.Module, res, k: int, device) -> torch.Tensor:
    """(N, K) float32 weight the packed layer multiplies by (input scale included). A plain
    QuantLinear's is ``(q - z[g]) * s[g]`` with its stored fp16 scales; any other layer kind
    (rotations, outliers) is read through its forward on the identity (built without bias,
    so nothing to subtract)."""
    if type(ql) is QuantLinear:
        gs = res.group_size
        g = (torch.arange(k, device=device) // gs if gs > 0 else
             torch.zeros(k, dtype=torch.long, device=device))
        if res.g_idx is not None:
            g = res.g_idx.to(device).long()
        s = ql.scales.to(device).float()  # (N or 1, G): as stored
        z = res.zeros.to(device).float().round()
        w = (res.qweight.to(device).float() - z[:, g]) * s[:, g]
        if ql.input_scale is not None:
            w = w / ql.input_scale.to(device).float()
        return w
    cols = []
    for start in range(0, k, 4096):  # (chunk, K) rows of the identity -> (chunk, N)
        eye = torch.eye(k, device=device, dtype=torch.float32)[start:start + 4096]
        cols.append(ql(eye).float())
    return torch.cat(cols).t()


@torch.no_grad()
def _measure_block(block, bprefix, config, methods, inputs, fisher, keep) -> tuple:
    """One block: each layer's (stored bits, loss) at each candidate; the block's float
    outputs. ``keep`` collects the packed candidates (CPU) for the KL measure."""
    linears = find_linears(block, config.ignore, bprefix)
    dev = inputs[0].hidden.device
    H = {n: torch.zeros(linear_weight(m).shape[1], linear_weight(m).shape[1], device=dev)
         for n, m in linears.items()}  # (K, K) sum of x xᵀ over every calibration token
    W = {n: linear_weight(m).detach().float() for n, m in linears.items()}
    quant = {c: {n: m.layer_quantizer(bprefix + n, W[n]) for n in linears}
             for c, m in methods.items()}

    last: list = [None, None]  # (input tensor, its xᵀx): layers reading one x share it

    def hook(name):
        def fn(_mod, args):
            x = args[0]
            if last[0] is not x:
                rows = x.reshape(-1, x.shape[-1]).float()  # (M, K)
                last[:] = [x, rows.t() @ rows]
            H[name].add_(last[1])
            for c, m in methods.items():
                if m.needs_calibration:
                    quant[c][name].observe(x)
        return fn

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in linears.items()]
    try:
        outs = [block_output(block(*inp.args, **inp.kwargs)) for inp in inputs]
    finally:
        for h in handles:
            h.remove()
        last.clear()
    table = {}
    for n, lin in linears.items():
        full, w = bprefix + n, W[n]
        row = {}
        for c in methods:
            res = quant[c].pop(n).quantize()
            ql = quant_linear_class(res.layer_kind).from_result(res, None, torch.float32)
            ql = ql.to(dev)
            d = w - _effective_weight(ql, res, w.shape[1], dev)  # (N, K)
            per_out = ((d @ H[n]) * d).sum(1)  # (N,) squared output error of each channel
            if fisher is not None:
                per_out = per_out * fisher[full].to(dev)
            row[c] = (8 * ql.storage_bytes(), float(per_out.sum()))
            if keep is not None:
                keep.setdefault(full, {})[c] = ql.cpu()
        table[full] = row
    return table, {bprefix + n: w.numel() for n, w in W.items()}, outs


def output_fisher(model: nn.Module, names: list[str], calib: torch.Tensor,
                  batch_size: int) -> dict[str, torch.Tensor]:
    """Full layer name -> (N,) mean over calibration tokens of the squared gradient of the
    next-token loss with respect to each output channel of that Linear (the empirical
    Fisher's diagonal, in the space of the layer's outputs). Parameters get no gradient."""
    acc: dict[str, torch.Tensor] = {}
    prefix, blocks = find_blocks(model)

    def out_hook(name):
        def fn(_mod, _args, out):
            def grad(g):
                s = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
                acc[name] = acc[name] + s if name in acc else s
            out.register_hook(grad)
        return fn

    def leaf(_mod, args, kwargs):  # the gradient path starts at block 0's hidden input
        if args and torch.is_tensor(args[0]):
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()
                      .requires_grad_()}

    params = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    handles = [model.get_submodule(n).register_forward_hook(out_hook(n)) for n in names]
    handles.append(blocks[0].register_forward_pre_hook(leaf, with_kwargs=True))
    dev = next(model.parameters()).device
    tokens = 0
    try:
        model.eval()
        for p, _ in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            for batch in torch.split(calib, batch_size):
                batch = batch.to(dev)
                logits = lm_logits(model, batch)[:, :-1].float()  # (B, T-1, V)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       batch[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
                tokens += batch[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
        for p, req in params:
            p.requires_grad_(req)
        model.train(was_training)
    missing = [n for n in names if n not in acc]
    if missing:
        raise InputError(f"no gradient reached {missing[:3]}: the Fisher sensitivity needs "
                         "every layer on the path to the loss; use sensitivity='kl'")
    return {n: acc[n] / tokens for n in names}


@torch.no_grad()
def kl_increase(model: nn.Module, packed: dict[str, dict[Cand, nn.Module]],
                calib: torch.Tensor, batch_size: int, show_progress: bool = False
                ) -> dict[str, dict[Cand, float]]:
    """The real measure: full layer name -> candidate -> mean KL(float || model with only
    that layer replaced by its packed candidate) per calibration position (in nats)."""
    dev = next(model.parameters()).device
    batches = [b.to(dev) for b in torch.split(calib, batch_size)]
    ref = [torch.log_softmax(lm_logits(model, b)[:, :-1].float(), -1) for b in batches]
    n_pos = sum(r.shape[0] * r.shape[1] for r in ref)
    out: dict[str, dict[Cand, float]] = {}
    for name, cands in tqdm(packed.items(), desc="KL per layer", disable=not show_progress):
        orig = model.get_submodule(name)
        out[name] = {}
        for c, ql in cands.items():
            set_submodule(model, name, ql.to(dev))
            try:
                kl = 0.0
                for b, lp in zip(batches, ref):
                    lq = torch.log_softmax(lm_logits(model, b)[:, :-1].float(), -1)
                    kl += float((lp.exp() * (lp - lq)).sum())
            finally:
                set_submodule(model, name, orig)
            out[name][c] = kl / n_pos
    return out


def measure(model: nn.Module, config: MethodConfig, calib: torch.Tensor,
            mixed: MixedConfig, options: EngineOptions | None = None) -> Measurement:
    """Pass 1: every quantized layer's exact stored bits and predicted loss at every
    candidate of ``mixed`` (see the module docstring). The model is left unchanged."""
    from kvant.calib.engine import resolve_device
    from kvant.calib.placement import on_device_except_blocks

    options = options or EngineOptions()
    t0 = time.perf_counter()
    methods = {c: build(cfg) for c, cfg in mixed.candidates(config).items()}
    _check_inputs(model, config, mixed, calib, methods)
    device = resolve_device(options.device)
    prefix, blocks = find_blocks(model)
    for m in methods.values():
        m.check_model(model, blocks, config.ignore)
    names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks)
             for n in find_linears(b, config.ignore, f"{prefix}.{i}.")]
    home = next(model.parameters()).device
    model.to(device)  # the Fisher / KL pass runs the whole model
    try:
        fisher = (output_fisher(model, names, calib, options.batch_size)
                  if mixed.sensitivity == "fisher" else None)  # None: KL measured below
        keep = {} if mixed.sensitivity == "kl" else None
        with on_device_except_blocks(model, blocks, device):
            blocks[0].to(device)
            inputs = capture_block_inputs(model, blocks[0], torch.split(calib,
                                          options.batch_size), device)
        options_table: dict = {}
        weights: dict = {}
        bar = tqdm(list(enumerate(blocks)), desc="mixed precision: measuring",
                   disable=not options.show_progress)
        for i, block in bar:
            bhome = next(block.parameters()).device
            block.to(device)
            table, w, outs = _measure_block(block, f"{prefix}.{i}.", config, methods, inputs,
                                            fisher, keep)
            block.to(bhome)
            options_table.update(table)
            weights.update(w)
            inputs = [inp.with_hidden(o) for inp, o in zip(inputs, outs)]
        del inputs
        if keep is not None:
            kl = kl_increase(model, keep, calib, options.batch_size, options.show_progress)
            options_table = {n: {c: (row[c][0], kl[n][c]) for c in row}
                             for n, row in options_table.items()}
    finally:
        model.to(home)
    return Measurement(options_table, weights, time.perf_counter() - t0)


def choose(measurement: Measurement, mixed: MixedConfig) -> MixedPlan:
    """The plan minimising the summed predicted loss with stored bits per weight at or
    under ``mixed.target_bpw`` (kvant.calib.allocate)."""
    total_w = sum(measurement.weights.values())
    budget = int(mixed.target_bpw * total_w)  # whole bits: never over the target
    try:
        pick = allocate(measurement.options, budget)
    except BudgetError:
        lowest = sum(min(c for c, _ in row.values())
                     for row in measurement.options.values()) / total_w
        raise InputError(f"target of {mixed.target_bpw} bits/weight is below the smallest "
                         f"candidate: every layer at its narrowest grid stores "
                         f"{lowest:.4f} bits/weight with this method") from None
    layers = {n: LayerChoice(c.bits, c.group_size, measurement.options[n][c][0],
                             measurement.weights[n], measurement.options[n][c][1], c.method)
              for n, c in pick.items()}
    return MixedPlan(mixed, layers, measure_seconds=measurement.seconds)


def plan_mixed(model: nn.Module, config: MethodConfig, calib: torch.Tensor,
               mixed: MixedConfig, options: EngineOptions | None = None) -> MixedPlan:
    """Measure (pass 1) and choose: the per-layer widths for ``mixed.target_bpw``."""
    return choose(measure(model, config, calib, mixed, options), mixed)
