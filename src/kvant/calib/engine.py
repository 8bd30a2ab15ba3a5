"""The one block-by-block quantization loop every method runs through.

For each decoder block, on the compute device:
1. find the block's linear layers and, with one traced-by-hooks forward, the order in which
   they run and which of them read the same input tensor ("sequential groups", e.g. q/k/v,
   then o, then gate/up, then down) — found from the forward, not from names;
2. let the method prepare the block (``prepare_block``; AWQ's scale search lives there);
3. for each group in execution order (true-sequential) — or for all layers at once — run the
   block on the calibration inputs with hooks that hand each layer's input to its quantizer,
   quantize, and install the packed :class:`QuantLinear`; later groups thus see the quantized
   outputs of earlier ones;
4. run the quantized block to produce the next block's inputs (or the float outputs, if asked).
The engine never tests a method's name: it reads ``needs_calibration`` and the config.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from kvant.algorithms.registry import build
from kvant.calib.budget import check_calibration
from kvant.calib import dist as kdist
from kvant.calib.capture import BlockInput, capture_block_inputs, run_block
from kvant.calib.head import plan_head, quantize_head
from kvant.calib.placement import on_device_except_blocks
from kvant.calib.runner import BlockRunner
from kvant.config import EngineOptions, MethodConfig
from kvant.config_gguf import uses_imatrix_mix
from kvant.core.gguf_grid import type_for_grid
from kvant.core.grid import check_group_size
from kvant.core.result import quant_linear_class
from kvant.errors import InputError
from kvant.model import moe
from kvant.model.discovery import (check_model, find_blocks, find_linears, linear_weight,
                                   set_submodule)
from kvant.nn.qlinear import QuantLinear

log = logging.getLogger(__name__)


@dataclass
class QuantReport:
    """What a quantization run did: per-layer losses and extras, timings."""

    config: dict
    layers: dict[str, dict] = field(default_factory=dict)
    blocks: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    n_calib: int = 0
    plan: object = None  # the kvant.calib.plan.MixedPlan a mixed-precision run followed
    # mixture-of-experts (kvant.model.moe): stacks unfused, expert layers quantized, and the
    # expert layers that got too few routed tokens and were quantized without data
    moe: dict = field(default_factory=dict)


def resolve_device(device: str | None) -> torch.device:
    """``None`` -> cuda when available, else cpu."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def validate_model(model: nn.Module, config: MethodConfig) -> tuple[str, nn.Module]:
    """Checks that must pass before any work: blocks found, groups divide, ignore patterns
    name layers, every tensor finite (a lazily read block's tensors are checked when they
    are read, kvant.model.lazy)."""
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for name, lin in find_linears(block, config.ignore, f"{prefix}.{i}.").items():
            k = linear_weight(lin).shape[1]
            if getattr(config, "grid", "int") == "int":
                check_group_size(k, config.group_size, f"{prefix}.{i}.{name}")
            else:  # llama.cpp's block types, with its fallbacks for other widths
                type_for_grid(config.grid, k, f"{prefix}.{i}.{name}")
    check_model(model, config.ignore)
    return prefix, blocks


@torch.no_grad()
def sequential_groups(block: nn.Module, linears: dict, inp: BlockInput) -> list[list[str]]:
    """Linears grouped by shared input tensor, groups in order of first execution."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [lin.register_forward_pre_hook(
        lambda m, a, name=name: seen.append((name, a[0]))) for name, lin in linears.items()]
    try:
        block(*inp.args, **inp.kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    done = set()
    for name, x in seen:
        if name in done:
            continue
        done.add(name)
        for gx, names in groups:
            if gx is x:
                names.append(name)
                break
        else:
            groups.append((x, [name]))
    out = [names for _, names in groups]
    missing = [n for n in linears if n not in done]
    if missing:  # layers the forward never used: quantize them last, without data
        out.append(missing)
    return out


class _GroupObserved(Exception):
    """Raised inside a block forward once every layer of the group has seen its input."""


@torch.no_grad()
def _observe_group(block, group: dict, quantizers: dict, inputs: list) -> None:
    """Hand each layer of ``group`` its inputs, stopping every forward as soon as the last
    of them has run: the rest of the block cannot change what this group sees."""
    pending: set[str] = set()

    def hook(name):
        def fn(_mod, args):
            quantizers[name].observe(args[0])
            pending.discard(name)
            if not pending:
                raise _GroupObserved
        return fn

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in group.items()]
    try:
        for inp in inputs:
            pending.update(group)
            try:
                block(*inp.args, **inp.kwargs)
            except _GroupObserved:
                pass
    finally:
        for h in handles:
            h.remove()


def _calibrate_group(block, names, linears, method, inputs, prefix, skip=frozenset()) -> dict:
    # skip: layers quantized without calibration data (experts with too few routed tokens)
    quantizers = {n: method.layer_quantizer(f"{prefix}{n}", linear_weight(linears[n]).detach()
                                            .float()) for n in names}
    observe = None
    observed = [n for n in names if n not in skip]
    if method.needs_calibration and observed:
        observe = lambda: _observe_group(block, {n: linears[n] for n in observed},  # noqa: E731
                                         quantizers, inputs)
    solved = None
    if kdist.active():  # several processes: statistics reduced, layers solved across ranks
        shapes = {n: tuple(linear_weight(linears[n]).shape) for n in names}
        solved = kdist.solve_group(quantizers, shapes, observe, prefix)
    elif observe is not None:
        observe()
    results = {}
    for n in names:
        lin = linears[n]
        res = solved[n] if solved is not None else quantizers[n].quantize()
        _check_planned(method, prefix + n, res)
        dtype = lin.weight.dtype if lin.weight.dtype != torch.float32 else torch.float32
        ql = quant_linear_class(res.layer_kind).from_result(res, lin.bias, dtype=dtype).to(lin.weight.device)
        set_submodule(block, n, ql)
        results[n] = {"loss": res.loss, "bits_per_weight": ql.bits_per_weight(), **res.info}
    return results


def _gguf_mix(model, prefix, blocks, config, imatrix: bool) -> dict:
    # llama.cpp's per-tensor types of the grid's file type (kvant.core.gguf_mix): each
    # Linear rounded on its own type
    from kvant.algorithms.gguf_round import mix_configs

    widths = {f"{prefix}.{i}.{n}": linear_weight(lin).shape[1] for i, block in enumerate(blocks)
              for n, lin in find_linears(block, config.ignore, f"{prefix}.{i}.").items()}
    return mix_configs(config, widths, prefix, getattr(model, "config", None), imatrix)


def _check_planned(method, name: str, res) -> None:
    # a method that ignored its per-layer config (QuantMethod.config_for) would silently
    # break the plan's size budget: refuse
    want = method.config_for(name).bits
    if method.layer_configs and res.bits != want:
        raise NotImplementedError(f"method {method.config.method!r} does not support per-layer "
                                  f"widths: layer {name!r} was planned at {want} bits and "
                                  f"came out at {res.bits}")


def quantize_model(model: nn.Module, config: MethodConfig, calib: torch.Tensor | None = None,
                   options: EngineOptions | None = None, sink=None,
                   plan=None) -> QuantReport:
    """Quantize ``model`` in place with ``config``; ``calib`` is token ids (n, seq_len).

    ``sink`` (a :class:`kvant.formats.stream.StreamWriter`, already started): every finished
    block is handed to it and freed (streaming; the model's blocks must be lazily read), and
    blocks it reports as finished by an earlier run are skipped (resume).
    ``plan`` (a :class:`kvant.calib.plan.MixedPlan`, kvant.calib.mixed): quantize each
    layer it names with its own method, bits and group size.
    Returns a :class:`QuantReport`. Raises before any work on bad input.
    """
    options = options or EngineOptions()
    t0 = time.perf_counter()
    prefix, blocks = validate_model(model, config)
    # a plan: each layer by its own planned method and width (kvant.calib.planned)
    method = build(config) if plan is None else plan.build_method(config)
    if plan is None and getattr(config, "grid", "int") != "int":
        method.layer_configs.update(_gguf_mix(model, prefix, blocks, config, uses_imatrix_mix(
            config, method.needs_calibration)))
    method.check_model(model, blocks, config.ignore)  # refuse what it cannot do, up front
    check_calibration(model, blocks, method, calib, options)  # token ids valid, memory fits
    if method.needs_calibration and (calib is None or len(calib) == 0):
        raise ValueError(f"method {config.method!r} needs calibration data; none was given")
    tuned = options.finetune is not None  # block-wise fine-tuning (kvant.tune.blockwise)
    if tuned:
        from kvant.tune.blockwise import BlockTuning

        BlockTuning.check(options.finetune, calib, kdist.active())
    stacks = moe.prepare_model(model, prefix, blocks, config.ignore,  # stacked experts ->
                               calib[:1] if calib is not None and len(calib) else None)
    if stacks:  # one Linear per expert now: check their group sizes too
        validate_model(model, config)
    if kdist.active() and (stacks or any(moe.find_expert_lists(b) for b in blocks)):
        raise InputError("mixture-of-experts models are quantized in one process only: "
                         "per-expert token counts differ between ranks")
    device = resolve_device(options.device)
    report = QuantReport(config=config.to_dict())
    lazy = getattr(model, "kvant_lazy_blocks", None)  # blocks read from disk one at a time
    if sink is not None and lazy is None:
        raise ValueError("streaming to disk needs a model whose blocks are read lazily "
                         "(kvant.load_model(dir, lazy=True))")
    kdist.check_supported(method, device)  # several processes: refuse early
    head = plan_head(model, blocks, config, method, calib, lazy is not None)  # quantize_head
    start = 0
    if sink is not None:
        start = sink.record["done"] + 1
        report.layers.update(sink.report()["layers"])
        report.blocks.extend(sink.report()["blocks"])

    inputs: list[BlockInput] = []
    homes: dict[int, torch.device] = {}  # where a block goes back to, if moved before its turn
    if method.needs_calibration or tuned:
        report.n_calib = len(calib)
        batches = torch.split(kdist.shard_calibration(calib), options.batch_size)  # this rank's
        if lazy is not None:
            lazy.load(0, blocks[0])
        homes[0] = next(blocks[0].parameters()).device
        with on_device_except_blocks(model, blocks, device):
            blocks[0].to(device)
            inputs = capture_block_inputs(model, blocks[0], batches, device,
                                          options.show_progress)
        if start > 0:  # resume: the last finished block's outputs were saved with it
            saved = sink.saved_inputs()
            if saved is None or len(saved) != len(inputs):
                raise ValueError("the progress record has no saved block outputs to resume "
                                 f"from; remove {sink.work} to start over")
            inputs = [inp.with_hidden(h.to(device)) for inp, h in zip(inputs, saved)]
            del saved  # the host copy (GBs at 70B scale) is not needed once on the device
            lazy.release(blocks[0])

    tuning = BlockTuning(options.finetune, inputs, resumed=start > 0) if tuned else None
    todo = list(enumerate(blocks))[start:]
    bar = tqdm(todo, desc=f"{config.method} blocks",  # disable None: only on a terminal
               disable=None if options.show_progress else True,
               initial=start, total=len(blocks))
    for i, block in bar:
        tb = time.perf_counter()
        if lazy is not None:
            lazy.load(i, block)
        home = homes.pop(i, None) or next(block.parameters()).device
        block.to(device)
        bprefix = f"{prefix}.{i}."
        if tuning is not None:
            tuning.advance(block, inputs)  # the float model's states, before rounding
        layers, extra, outs = _quantize_block(block, bprefix, config, method, inputs, options,
                                              tuning)
        if outs is not None:
            inputs = [inp.with_hidden(o) for inp, o in zip(inputs, outs)]
        entry = {"block": i, "seconds": time.perf_counter() - tb, **extra}
        report.layers.update(layers)
        report.blocks.append(entry)
        if sink is not None:
            state = {bprefix + k: v.to("cpu") for k, v in block.state_dict().items()}
            modules = {bprefix + n: {"kind": m.kind, **m.init_kwargs()}
                       for n, m in block.named_modules() if isinstance(m, QuantLinear)}
            sink.block_done(i, state, modules, {"layers": layers, "blocks": [entry]},
                            [o.hidden for o in inputs] if outs is not None else None)
            del state
            lazy.release(block)
        else:
            block.to(home)
        log.info("block %d quantized in %.2fs", i, time.perf_counter() - tb)
    if head is not None:  # the output head, after the last block (kvant.calib.head)
        report.layers.update(quantize_head(model, head, method, inputs, device))
    report.moe = _moe_summary(stacks, report.layers, options)
    report.seconds = time.perf_counter() - t0
    model.kvant_quantization_config = config  # read by save_quantized
    if plan is not None:
        report.plan = plan.with_achieved(_stored_bpw(model, plan))
    model.kvant_mixed_plan = report.plan  # read by save_quantized; None: uniform widths
    # what tuned the continuous parameters after rounding, saved in the checkpoint
    model.kvant_finetune = ([{"stage": "block", "config": options.finetune.to_dict()}]
                            if tuned else [])
    model.kvant_quantization_report = report  # its per-layer losses go into the checkpoint
    if "transformers" in sys.modules:  # a transformers model: save_pretrained must load back
        from kvant.formats.hf_integration import attach
        attach(model)
    return report


def _stored_bpw(model: nn.Module, plan) -> float:
    # stored bits per weight of the layers the plan names, as packed
    mods = dict(model.named_modules())
    bits = sum(8 * mods[n].storage_bytes() for n in plan.layers)
    return bits / sum(c.weights for c in plan.layers.values())


def _quantize_block(block, bprefix, config, method, inputs, options, tuning=None):
    """Quantize one block in place -> (per-layer report, block extras, next inputs or None).

    A block with nothing to quantize (every Linear ignored) still runs, so the next block is
    calibrated on this block's real outputs. ``tuning``: a
    :class:`kvant.tune.blockwise.BlockTuning`, which tunes the block once it is packed."""
    linears = find_linears(block, config.ignore, bprefix)
    experts = moe.expert_layers(block, linears)  # name -> (role, expert index)
    layers, extra, counts, few = {}, {}, {}, set()
    tuning = tuning if linears else None
    local = tuning is not None and tuning.local  # target: the float block on these inputs
    if linears and method.needs_calibration:
        groups = sequential_groups(block, linears, inputs[0])
        float_out = run_block(block, inputs) if options.propagate == "float" or local else None
        if experts:
            counts, few = _routed(block, experts, linears, inputs, options)
        ready = {n: lin for n, lin in linears.items() if n not in few}
        extra = method.prepare_block(block, ready, [g for g in ([n for n in g if n not in few]
                                                                for g in groups) if g],
                                     inputs, BlockRunner(block, inputs, bprefix))
        linears = find_linears(block, config.ignore, bprefix)  # prepare may swap modules
    else:
        groups, float_out = [list(linears)], run_block(block, inputs) if local else None
    if experts:  # all experts' gate/up layers in one pass, then all down layers
        groups = moe.merge_groups(groups, experts)
    if not config.true_sequential:
        groups = [[n for g in groups for n in g]]
    for names in groups if linears else []:
        res = _calibrate_group(block, names, linears, method, inputs, bprefix, few)
        layers.update({bprefix + n: r for n, r in res.items()})
    for n in experts:
        layers[bprefix + n].update(expert=experts[n][1], **(
            {"routed_tokens": counts[n], "calibration": "none (too few routed tokens)"
             if n in few else "routed tokens"} if counts else {}))
    if experts:
        extra = {**extra, "expert_layers": len(experts), "expert_layers_few_tokens": len(few)}
    if tuning is not None:
        extra = {**extra, "finetune": tuning.tune(block, inputs, float_out)}
    if not inputs:  # a method without calibration, untuned: nothing to propagate
        return layers, extra, None
    return layers, extra, (float_out if options.propagate == "float" and float_out is not None
                           else run_block(block, inputs))


def _routed(block, experts, linears, inputs, options) -> tuple[dict, set]:
    """(name -> tokens routed to each expert layer over the calibration inputs, the expert
    layers below the minimum). The minimum is ``options.expert_min_tokens``, or by default
    the layer's input width K: with fewer rows than K the Hessian XᵀX is singular and the
    activation means behind AWQ's scales rest on fewer samples than channels, so such a layer
    is quantized as if it had seen no data (kvant.model.moe; docs/MOE.md)."""
    counts = moe.routed_tokens(BlockRunner(block, inputs), list(experts))
    few = set()
    for n, c in counts.items():
        floor = options.expert_min_tokens
        if floor is None:
            floor = linear_weight(linears[n]).shape[1]
        if c < floor:
            few.add(n)
    return counts, few


def _moe_summary(stacks: dict, layers: dict, options) -> dict:
    """The report's mixture-of-experts entry (empty for a dense model)."""
    expert = {n: e for n, e in layers.items() if "expert" in e}
    if not expert:
        return {}
    few = sorted(n for n, e in expert.items() if e.get("calibration", "").startswith("none"))
    return {"stacks_unfused": stacks, "expert_layers": len(expert),
            "expert_layers_few_tokens": len(few), "few_token_layers": few,
            "min_tokens": options.expert_min_tokens if options.expert_min_tokens is not None
            else "input width"}
