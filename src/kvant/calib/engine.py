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
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from kvant.algorithms.registry import build
from kvant.calib.budget import check_calibration
from kvant.calib import dist as kdist
from kvant.calib.capture import BlockInput, capture_block_inputs, run_block
from kvant.calib.runner import BlockRunner
from kvant.config import EngineOptions, MethodConfig
from kvant.core.grid import check_group_size
from kvant.core.result import quant_linear_class
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
            check_group_size(linear_weight(lin).shape[1], config.group_size,
                             f"{prefix}.{i}.{name}")
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


def _calibrate_group(block, names, linears, method, inputs, prefix) -> dict:
    quantizers = {n: method.layer_quantizer(f"{prefix}{n}", linear_weight(linears[n]).detach()
                                            .float()) for n in names}
    observe = None
    if method.needs_calibration:
        observe = lambda: _observe_group(block, {n: linears[n] for n in names},  # noqa: E731
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
        dtype = lin.weight.dtype if lin.weight.dtype != torch.float32 else torch.float32
        ql = quant_linear_class(res.layer_kind).from_result(res, lin.bias, dtype=dtype).to(lin.weight.device)
        set_submodule(block, n, ql)
        results[n] = {"loss": res.loss, "bits_per_weight": ql.bits_per_weight(), **res.info}
    return results


def quantize_model(model: nn.Module, config: MethodConfig, calib: torch.Tensor | None = None,
                   options: EngineOptions | None = None, sink=None) -> QuantReport:
    """Quantize ``model`` in place with ``config``; ``calib`` is token ids (n, seq_len).

    ``sink`` (a :class:`kvant.formats.stream.StreamWriter`, already started): every finished
    block is handed to it and freed (streaming; the model's blocks must be lazily read), and
    blocks it reports as finished by an earlier run are skipped (resume).
    Returns a :class:`QuantReport`. Raises before any work on bad input.
    """
    options = options or EngineOptions()
    t0 = time.perf_counter()
    prefix, blocks = validate_model(model, config)
    method = build(config)
    method.check_model(model, blocks, config.ignore)  # refuse what it cannot do, up front
    check_calibration(model, blocks, method, calib, options)  # token ids valid, memory fits
    if method.needs_calibration and (calib is None or len(calib) == 0):
        raise ValueError(f"method {config.method!r} needs calibration data; none was given")
    device = resolve_device(options.device)
    report = QuantReport(config=config.to_dict())
    lazy = getattr(model, "kvant_lazy_blocks", None)  # blocks read from disk one at a time
    if sink is not None and lazy is None:
        raise ValueError("streaming to disk needs a model whose blocks are read lazily "
                         "(kvant.load_model(dir, lazy=True))")
    kdist.check_supported(method, sink is not None, device)  # several processes: refuse early
    start = 0
    if sink is not None:
        start = sink.record["done"] + 1
        report.layers.update(sink.report()["layers"])
        report.blocks.extend(sink.report()["blocks"])

    inputs: list[BlockInput] = []
    homes: dict[int, torch.device] = {}  # where a block goes back to, if moved before its turn
    if method.needs_calibration:
        report.n_calib = len(calib)
        batches = torch.split(kdist.shard_calibration(calib), options.batch_size)  # this rank's
        if lazy is not None:
            lazy.load(0, blocks[0])
        homes[0] = next(blocks[0].parameters()).device
        with _on_device_except_blocks(model, blocks, device):
            blocks[0].to(device)
            inputs = capture_block_inputs(model, blocks[0], batches, device)
        if start > 0:  # resume: the last finished block's outputs were saved with it
            saved = sink.saved_inputs()
            if saved is None or len(saved) != len(inputs):
                raise ValueError("the progress record has no saved block outputs to resume "
                                 f"from; remove {sink.work} to start over")
            inputs = [inp.with_hidden(h.to(device)) for inp, h in zip(inputs, saved)]
            del saved  # the host copy (GBs at 70B scale) is not needed once on the device
            lazy.release(blocks[0])

    todo = list(enumerate(blocks))[start:]
    bar = tqdm(todo, desc=f"{config.method} blocks", disable=not options.show_progress,
               initial=start, total=len(blocks))
    for i, block in bar:
        tb = time.perf_counter()
        if lazy is not None:
            lazy.load(i, block)
        home = homes.pop(i, None) or next(block.parameters()).device
        block.to(device)
        bprefix = f"{prefix}.{i}."
        layers, extra, outs = _quantize_block(block, bprefix, config, method, inputs, options)
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
    report.seconds = time.perf_counter() - t0
    model.kvant_quantization_config = config  # read by save_quantized
    return report


def _quantize_block(block, bprefix, config, method, inputs, options):
    """Quantize one block in place -> (per-layer report, block extras, next inputs or None).

    A block with nothing to quantize (every Linear ignored) still runs, so the next block is
    calibrated on this block's real outputs."""
    linears = find_linears(block, config.ignore, bprefix)
    layers, extra = {}, {}
    if linears and method.needs_calibration:
        groups = sequential_groups(block, linears, inputs[0])
        float_out = run_block(block, inputs) if options.propagate == "float" else None
        extra = method.prepare_block(block, linears, groups, inputs,
                                     BlockRunner(block, inputs, bprefix))
        linears = find_linears(block, config.ignore, bprefix)  # prepare may swap modules
    else:
        groups, float_out = [list(linears)], None
    if not config.true_sequential:
        groups = [[n for g in groups for n in g]]
    for names in groups if linears else []:
        res = _calibrate_group(block, names, linears, method, inputs, bprefix)
        layers.update({bprefix + n: r for n, r in res.items()})
    if not method.needs_calibration:
        return layers, extra, None
    return layers, extra, float_out if float_out is not None else run_block(block, inputs)


class _on_device_except_blocks:
    """Context: move every parameter/buffer outside the blocks to ``device``, then back."""

    def __init__(self, model: nn.Module, blocks: nn.Module, device: torch.device):
        self.model, self.blocks, self.device = model, blocks, device
        self.moved: list[tuple[nn.Module, torch.device]] = []

    def _outside(self):
        inside = {id(m) for m in self.blocks.modules()}
        for m in self.model.modules():
            if id(m) in inside:
                continue
            tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
            if tensors:
                yield m, tensors[0].device

    def __enter__(self):
        for m, dev in self._outside():
            if dev != self.device:
                self.moved.append((m, dev))
                m.to(self.device) if not list(m.children()) else _move_own(m, self.device)
        return self

    def __exit__(self, *exc):
        for m, dev in self.moved:
            m.to(dev) if not list(m.children()) else _move_own(m, dev)
        return False


def _move_own(m: nn.Module, device: torch.device) -> None:
    # move only the module's own parameters and buffers, not its children
    for name, p in list(m._parameters.items()):
        if p is not None:
            p.data = p.data.to(device)
    for name, b in list(m._buffers.items()):
        if b is not None:
            m._buffers[name] = b.to(device)
