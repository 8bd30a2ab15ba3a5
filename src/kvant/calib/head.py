"""Quantizing the output head (``lm_head``) too: ``MethodConfig.quantize_head=True``.

The head is a Linear outside the decoder blocks, so the engine's block loop never sees it.
After the last block, the engine holds that block's outputs on the calibration samples; the
head reads them after the modules the model applies in between (the final norm: Llama's
``model.norm``, GPT-2's ``ln_f``, OPT's ``final_layer_norm``). Those modules are found, not
named: one forward of a short sample, before anything is changed, records which modules
outside the blocks start running after the last block returns and before the head is
called; applying them in that order to the last block's output must reproduce the head's
input on that sample, or the run is refused (a model that does something else there,
e.g. with extra arguments, cannot be calibrated this way). Methods without calibration
(RTN) need none of this.

Refused, before any work: a model without a Linear output head; a calibrated head while
blocks are streamed from disk or spread over several processes (the probe needs the whole
model in one process); a method that declares it cannot quantize the head
(``QuantMethod.head_unsupported``, e.g. AWQ, whose scales are searched inside blocks only);
an ``ignore`` pattern naming the head.

A tied head (sharing its weight with the input embedding) becomes its own packed layer;
the embedding stays in float, so the checkpoint holds both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kvant.calib import dist as kdist
from kvant.calib.capture import block_output, model_forward
from kvant.core.gguf_grid import type_for_grid
from kvant.core.grid import check_group_size
from kvant.core.result import quant_linear_class
from kvant.errors import InputError
from kvant.model.discovery import is_linear, linear_weight, matches_ignore, set_submodule

# tokens of the probe forward (one sample): enough to exercise the norm, cheap on any model
PROBE_TOKENS = 16


class HeadError(InputError):
    """The output head cannot be quantized as asked."""


@dataclass
class HeadPlan:
    """What quantizing the head needs: its dotted name and the modules between the last
    block and it (empty when the method takes no calibration)."""

    name: str
    tail: list[nn.Module]


class _Stop(Exception):
    pass


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """(dotted name, module) of the model's output head: ``get_output_embeddings()`` of a
    Hugging Face model, else its ``lm_head``. Raises :class:`HeadError` without one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    if head is None or not is_linear(head):
        raise HeadError(f"{type(model).__name__} has no Linear output head (lm_head) to "
                        "quantize")
    name = next(n for n, m in model.named_modules() if m is head)
    return name, head


@torch.no_grad()
def find_tail(model: nn.Module, blocks: nn.Module, head: nn.Module,
              sample: torch.Tensor) -> list[nn.Module]:
    """The modules ``model`` applies between its last block and ``head``, in order, found by
    one forward of ``sample`` (1, T) and checked to reproduce the head's input."""
    inside = {id(m) for m in blocks.modules()}
    after = {"on": False}
    last: dict = {}
    tail: list[nn.Module] = []
    running: list[nn.Module] = []  # tail modules whose forward is in progress (nesting)

    def on_last(_m, _a, out):
        after["on"], last["h"] = True, block_output(out)

    def pre(m, _a):
        if after["on"]:
            if not running:  # outermost: its children are part of it
                tail.append(m)
            running.append(m)

    def post(m, _a, _o):
        if running and running[-1] is m:
            running.pop()

    def on_head(_m, args):
        last["x"] = args[0]
        raise _Stop

    handles = [blocks[-1].register_forward_hook(on_last), head.register_forward_pre_hook(on_head)]
    for m in model.modules():
        if m is model or m is head or id(m) in inside:
            continue
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        model_forward(model, sample)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    if "h" not in last or "x" not in last:
        raise HeadError(f"a forward of {type(model).__name__} did not run its last block and "
                        "then its head; cannot find the head's input to calibrate it")
    names = [n for n, m in model.named_modules() if any(m is t for t in tail)]
    try:
        x = apply_tail(tail, last["h"])
        ok = x.shape == last["x"].shape and torch.allclose(x.float(), last["x"].float(),
                                                           rtol=1e-4, atol=1e-5)
    except Exception:  # a module that needs more than the hidden states
        ok = False
    if not ok:
        raise HeadError(f"cannot reproduce the input of the head of {type(model).__name__} from "
                        f"its last block's output through {names or 'nothing'}; a calibrated "
                        "method cannot quantize this head (RTN can: it needs no input)")
    return tail


def apply_tail(tail: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    """The head's input from the last block's hidden states (B, T, C)."""
    for m in tail:
        h = m(h)
    return h


def plan_head(model: nn.Module, blocks: nn.Module, config, method, calib,
              streamed: bool) -> HeadPlan | None:
    """Everything checked before any block is changed; None when ``config.quantize_head``
    is off. ``streamed``: the blocks are read from disk one at a time."""
    if not getattr(config, "quantize_head", False):
        return None
    name, head = find_head(model)
    reason = getattr(method, "head_unsupported", None)
    if reason:
        raise HeadError(f"method {config.method!r} cannot quantize the output head: {reason}")
    if any(matches_ignore(name, p) for p in config.ignore):
        raise HeadError(f"quantize_head is on but ignore names the head {name!r}; choose one")
    if getattr(config, "grid", "int") == "int":
        check_group_size(linear_weight(head).shape[1], config.group_size, name)
    else:  # llama.cpp's block types, with its fallbacks for other widths
        type_for_grid(config.grid, linear_weight(head).shape[1], name)
    if not method.needs_calibration:
        return HeadPlan(name, [])
    if streamed or kdist.active():
        raise HeadError(f"quantizing the head with {config.method!r} needs the whole model in "
                        "one process to find the head's input; not supported while streaming "
                        "blocks from disk (use --no-stream) or across processes (or use rtn)")
    device = next(head.parameters()).device
    sample = calib[:1, :PROBE_TOKENS].to(device)
    return HeadPlan(name, find_tail(model, blocks, head, sample))


@torch.no_grad()
def quantize_head(model: nn.Module, plan: HeadPlan, method, inputs: list,
                  device: torch.device) -> dict[str, dict]:
    """Quantize the head in place and return its report entry {name: {...}}. ``inputs``:
    the last block's outputs on the calibration samples (BlockInput, empty without
    calibration)."""
    head = model.get_submodule(plan.name)
    home = head.weight.device
    quantizer = method.layer_quantizer(plan.name, linear_weight(head).detach().to(device)
                                       .float())
    if method.needs_calibration:
        moved = [(m, next(m.parameters(), torch.empty(0, device=home)).device)
                 for m in plan.tail]
        for m, _ in moved:
            m.to(device)
        try:
            for inp in inputs:
                quantizer.observe(apply_tail(plan.tail, inp.hidden))  # (B, T, K)
        finally:
            for m, dev in moved:
                m.to(dev)
    res = quantizer.quantize()
    ql = quant_linear_class(res.layer_kind).from_result(res, head.bias, dtype=head.weight.dtype)
    ql = ql.to(home)
    set_submodule(model, plan.name, ql)
    return {plan.name: {"loss": res.loss, "bits_per_weight": ql.bits_per_weight(), **res.info}}
