"""Mixture-of-experts blocks: find the experts and the router generically, one layer per expert.

Nothing here names a model. Two expert layouts are recognised from structure:

1. **Stacked (fused) experts** — transformers 5 (Mixtral, Qwen2-MoE, Qwen3-MoE, ...): a module
   inside a decoder block holds 3-D float parameters (E, N, K), one (N, K) matrix per expert,
   and a router sits next to it: a sibling module (or the module itself) with a 2-D weight of
   E rows. :func:`unfuse` replaces every such parameter by a
   :class:`~kvant.nn.experts.ExpertStack` of E ``nn.Linear(K, N)`` whose weights are views of
   the parameter (no copy), named ``<module>.<param>.<e>`` (``mlp.experts.down_proj.3``).
   The model's forward keeps calling ``F.linear(x, stack[e])`` on the tokens routed to e; that
   call now runs expert e's own layer. :func:`prepare_model` switches a transformers model to
   its per-expert ("eager") experts forward, unfuses, and checks on one short batch that the
   logits are unchanged and that every stack was applied through its experts — anything else
   (a grouped matmul over the whole stack, a transposed (E, K, N) stack used as ``x @ w``)
   raises :class:`~kvant.nn.experts.ExpertLayoutError` before any layer is quantized.
   A 3-D parameter in a block with no router beside it is refused the same way.
2. **Lists of expert modules** (older transformers, custom models): an ``nn.ModuleList`` of
   >= 2 modules of one class, each holding Linears, with a router sibling of ``len(list)``
   rows. Their Linears are ordinary layers already (``experts.3.w1``).

Routers stay float: a Linear that is a direct child of the module holding the experts (or of
its parent, the MoE block) with one output per expert is the router, and one with a single
output is a scalar gate (Qwen2-MoE's ``shared_expert_gate``). :func:`router_names` lists them
and :func:`kvant.model.discovery.find_linears` never returns them. (Routers stored as a bare
weight, as in transformers 5, are no Linear and were never candidates.)

Per-expert statistics come for free: hooks on expert e's layer see only the tokens routed to
it (gate/up: the expert's input rows; down: its intermediate activation). :func:`routed_tokens`
counts them; :func:`merge_groups` lets the engine calibrate all experts' gate/up layers in one
pass and all down layers in the next, instead of two passes per expert.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from kvant.nn.experts import ExpertLayoutError, ExpertStack

log = logging.getLogger(__name__)

# relative error of the logits after unfusing (the same matmuls run, so it is ~0)
_VERIFY_TOL = 1e-4


@dataclass(frozen=True)
class FusedStack:
    """A 3-D expert parameter: ``module`` (dotted name under the root searched) holds
    ``param`` of shape (experts, out_features, in_features)."""

    module: str
    param: str
    experts: int
    out_features: int
    in_features: int

    @property
    def name(self) -> str:
        """The dotted name the :class:`ExpertStack` gets (``mlp.experts.gate_up_proj``)."""
        return f"{self.module}.{self.param}" if self.module else self.param


def _is_linear(m: nn.Module) -> bool:
    from kvant.model.discovery import is_linear  # discovery imports this module
    return is_linear(m)


def _child_rows(module: nn.Module, skip: nn.Module | None = None) -> set[int]:
    """Row counts of the 2-D weights of ``module``'s direct children (and its own 2-D
    parameters): where a router with one row per expert would show."""
    rows = {p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 2}
    for child in module.children():
        w = getattr(child, "weight", None)
        if child is not skip and isinstance(w, torch.Tensor) and w.dim() == 2:
            rows.add(w.shape[0])
    return rows


def _parent(root: nn.Module, name: str) -> nn.Module | None:
    if not name:
        return None
    parent = name.rpartition(".")[0]
    return root.get_submodule(parent) if parent else root


def _has_router(root: nn.Module, holder_name: str, n_experts: int) -> bool:
    holder = root.get_submodule(holder_name) if holder_name else root
    parent = _parent(root, holder_name)
    return n_experts in _child_rows(holder) or (
        parent is not None and n_experts in _child_rows(parent, skip=holder))


def find_fused_stacks(root: nn.Module) -> list[FusedStack]:
    """Every 3-D floating parameter under ``root`` outside convolutions, as a
    :class:`FusedStack` (router not yet checked: :func:`check_stacks`)."""
    out = []
    for mname, mod in root.named_modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() == 3 and p.is_floating_point():
                out.append(FusedStack(mname, pname, *p.shape))
    return out


def check_stacks(root: nn.Module, stacks: list[FusedStack], where: str = "") -> None:
    """Refuse a 3-D parameter that has no router of as many rows beside it: kvant would not
    know it is a stack of experts, and leaving it float would be silent."""
    for s in stacks:
        if s.experts < 1 or not _has_router(root, s.module, s.experts):
            raise ExpertLayoutError(
                f"{where}{s.name} is a 3-D parameter {(s.experts, s.out_features, s.in_features)}"
                f" with no router of {s.experts} rows next to it: kvant quantizes stacked "
                "experts, (E, N, K) beside a router with one row per expert, so this model is "
                "not supported")


def find_expert_lists(block: nn.Module) -> list[str]:
    """Names (relative to ``block``) of ModuleLists of expert modules: >= 2 children of one
    class that hold Linears, with a router of ``len(list)`` rows beside them."""
    out = []
    for name, mod in block.named_modules():
        if not name or not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        kids = list(mod)
        if len({type(k) for k in kids}) != 1 or _is_linear(kids[0]):
            continue
        if not all(any(_is_linear(m) for m in k.modules()) for k in kids):
            continue
        if len(kids) in _child_rows(_parent(block, name), skip=mod):
            out.append(name)
    return out


def _moe_parents(block: nn.Module) -> list[tuple[nn.Module, int]]:
    """(module that may hold the router, number of experts) for every expert container."""
    out = []
    for name, mod in block.named_modules():
        if isinstance(mod, ExpertStack):
            holder = _parent(block, name)
            out.append((holder, len(mod)))
            holder_name = name.rpartition(".")[0]
            if holder_name:
                out.append((_parent(block, holder_name), len(mod)))
    for s in find_fused_stacks(block):
        if not _has_router(block, s.module, s.experts):
            continue
        holder = block.get_submodule(s.module) if s.module else block
        out.append((holder, s.experts))
        if s.module:
            out.append((_parent(block, s.module), s.experts))
    for name in find_expert_lists(block):
        out.append((_parent(block, name), len(block.get_submodule(name))))
    return out


def router_names(block: nn.Module) -> set[str]:
    """Names (relative to ``block``) of the Linears that route or gate experts and stay float:
    direct children of an expert container's holder or of its parent with one output per
    expert (the router) or a single output (a scalar gate)."""
    parents = _moe_parents(block)
    if not parents:
        return set()
    ids = {id(m): n for n, m in block.named_modules()}
    out = set()
    for holder, n_experts in parents:
        for cname, child in holder.named_children():
            if _is_linear(child) and child.weight.dim() == 2:
                from kvant.model.discovery import linear_weight
                if linear_weight(child).shape[0] in (n_experts, 1):
                    base = ids[id(holder)]
                    out.add(f"{base}.{cname}" if base else cname)
    return out


def expert_layers(block: nn.Module, names) -> dict[str, tuple[str, int]]:
    """For the layer ``names`` (relative to ``block``) that are experts: name -> (role, expert
    index); the role names the layer with its expert index replaced by ``*``
    (``mlp.experts.gate_up_proj.*``, ``mlp.experts.*.w2``): one role per kind of expert
    layer."""
    stacks = {n for n, m in block.named_modules() if isinstance(m, ExpertStack)}
    lists = find_expert_lists(block)
    out = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        if parent in stacks and leaf.isdigit():
            out[name] = (f"{parent}.*", int(leaf))
            continue
        for lst in lists:
            if name.startswith(lst + "."):
                idx, _, rest = name[len(lst) + 1:].partition(".")
                if idx.isdigit():
                    out[name] = (f"{lst}.*.{rest}", int(idx))
                break
    return out


def merge_groups(groups: list[list[str]], experts: dict) -> list[list[str]]:
    """The engine's sequential groups with expert layers regrouped by role: every expert's
    gate/up layer in the first group of that role, every down layer in the first down group
    (in the order the roles first ran). Expert e's down layer depends only on expert e's
    gate/up, so quantizing all gate/up layers before any down layer keeps each down layer
    calibrated on its own expert's quantized outputs, in two passes instead of 2E."""
    out: list[list[str]] = []
    where: dict[str, int] = {}
    for names in groups:
        rest = [n for n in names if n not in experts]
        if rest:
            out.append(rest)
        for n in (n for n in names if n in experts):
            role = experts[n][0]
            if role not in where:
                where[role] = len(out)
                out.append([])
            out[where[role]].append(n)
    return [g for g in out if g]


@torch.no_grad()
def routed_tokens(runner, names) -> dict[str, int]:
    """name -> how many token rows reached each layer over the runner's calibration inputs
    (for an expert: the tokens routed to it)."""
    counts = dict.fromkeys(names, 0)

    def count(n):
        def fn(args, _kw):
            counts[n] += args[0].reshape(-1, args[0].shape[-1]).shape[0]
        return fn

    runner.run(before={n: count(n) for n in names}, keep_outputs=False)
    return counts


def unfuse(root: nn.Module, stacks: list[FusedStack]) -> dict[str, nn.Parameter]:
    """Replace each stacked parameter by an :class:`ExpertStack` of ``nn.Linear`` views of it;
    returns {stack name: the original parameter} (for :func:`fuse_back`)."""
    originals = {}
    for s in stacks:
        holder = root.get_submodule(s.module) if s.module else root
        p = originals[s.name] = holder._parameters.pop(s.param)
        experts = []
        for e in range(s.experts):
            lin = nn.Linear(s.in_features, s.out_features, bias=False, device="meta")
            lin.weight = nn.Parameter(p.data[e], requires_grad=p.requires_grad)  # a view
            experts.append(lin)
        holder.add_module(s.param, ExpertStack(experts, s.out_features, s.in_features, p.dtype))
    return originals


def fuse_back(root: nn.Module, stacks: list[FusedStack], originals: dict) -> None:
    """Undo :func:`unfuse`: put the original stacked parameters back."""
    for s in stacks:
        holder = root.get_submodule(s.module) if s.module else root
        if s.name in originals:
            holder._modules.pop(s.param, None)
            holder.register_parameter(s.param, originals[s.name])


def _eager_experts(model: nn.Module) -> None:
    """Make a transformers model run its experts one at a time (``stack[e]``), the layout
    ExpertStack serves; its default grouped matmul takes the whole stack at once."""
    setter = getattr(model, "set_experts_implementation", None)
    if callable(setter):
        try:
            setter("eager")
        except (ValueError, RuntimeError, KeyError) as e:
            raise ExpertLayoutError(f"cannot switch {type(model).__name__} to its per-expert "
                                    f"forward: {e}") from None


def _logits(out) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def prepare_model(model: nn.Module, prefix: str, blocks, ignore=(), verify_ids=None) -> dict:
    """Unfuse every stacked expert parameter of the decoder ``blocks`` (named ``prefix.i``)
    and check the result; returns {stack name: number of experts} (empty: nothing stacked).

    Stacks whose every expert matches ``ignore`` stay fused and float. ``verify_ids``
    (1, T) token ids (default 8 zeros) are run through the model before and after: the
    logits must agree and every unfused stack must have run at least one expert through
    ``F.linear(x, stack[e])``; otherwise :class:`ExpertLayoutError`, before any layer is
    quantized. Blocks still on the meta device (lazy loading) are refused the same way."""
    from kvant.calib.capture import model_forward
    from kvant.model.discovery import matches_ignore

    todo: list[FusedStack] = []
    for i, block in enumerate(blocks):
        stacks = find_fused_stacks(block)
        check_stacks(block, stacks, f"{prefix}.{i}.")
        for s in stacks:
            full = [f"{prefix}.{i}.{s.name}.{e}" for e in range(s.experts)]
            if all(any(matches_ignore(f, ig) for ig in ignore) for f in full):
                continue
            if block.get_submodule(s.module).get_parameter(s.param).is_meta:
                raise ExpertLayoutError(
                    f"{prefix}.{i}.{s.name}: stacked experts cannot be quantized from a lazily "
                    "loaded model yet; load it without lazy=True (kvant quantize --no-stream)")
            todo.append(FusedStack(f"{prefix}.{i}.{s.module}".rstrip("."), s.param,
                                   s.experts, s.out_features, s.in_features))
    if not todo:
        return {}
    _eager_experts(model)
    device = next(model.parameters()).device
    ids = verify_ids if verify_ids is not None else torch.zeros(1, 8, dtype=torch.long)
    ids = ids[:1, :16].to(device)
    try:
        before = _logits(model_forward(model, ids)).float()
    except Exception as e:  # the float model itself: not an MoE problem, say so plainly
        raise ExpertLayoutError(f"the model does not run on a short batch before unfusing its "
                                f"experts: {type(e).__name__}: {e}") from e
    originals = unfuse(model, todo)
    try:
        _verify(model, todo, ids, before)
    except ExpertLayoutError:
        fuse_back(model, todo, originals)  # leave the user's float model as it was
        raise
    log.info("unfused %d expert stacks (%d experts)", len(todo), sum(s.experts for s in todo))
    return {s.name: s.experts for s in todo}


def _verify(model: nn.Module, todo: list[FusedStack], ids: torch.Tensor,
            before: torch.Tensor) -> None:
    """The unfused model gives ``before`` on ``ids`` and runs every stack per expert."""
    from kvant.calib.capture import model_forward

    used = dict.fromkeys((s.name for s in todo), 0)
    handles = []
    for s in todo:
        stack = model.get_submodule(s.name)
        for e in range(len(stack)):
            handles.append(stack.expert(e).register_forward_pre_hook(
                lambda *_a, n=s.name: used.__setitem__(n, used[n] + 1)))
    try:
        after = _logits(model_forward(model, ids)).float()
    except ExpertLayoutError as e:
        raise ExpertLayoutError(f"{type(model).__name__}: {e}") from None
    except Exception as e:
        raise ExpertLayoutError(
            f"{type(model).__name__} cannot run its experts one at a time through "
            f"F.linear(x, stack[e]) ({type(e).__name__}: {e}); this experts layout is not "
            "supported") from e
    finally:
        for h in handles:
            h.remove()
    unused = [n for n, c in used.items() if c == 0]
    if unused:
        raise ExpertLayoutError(f"the forward never applied the experts of {unused[0]} through "
                                "F.linear(x, stack[e]); kvant cannot tell how this stack is used")
    err = float((after - before).norm() / before.norm().clamp(min=1e-30))
    if not err <= _VERIFY_TOL:
        raise ExpertLayoutError(f"running the experts of {type(model).__name__} one layer per "
                                f"expert changes its logits (relative error {err:.3g}); this "
                                "experts layout is not supported")


def unfuse_for_load(model: nn.Module, layer_names) -> int:
    """Before a checkpoint's quantized layers are installed: unfuse the stacked parameters
    that the checkpoint stores one layer per expert (a layer named ``<stack>.<e>``), and
    switch the model to its per-expert forward. Returns the number of stacks unfused."""
    names = list(layer_names)
    todo = [s for s in find_fused_stacks(model)
            if any(n.startswith(s.name + ".") and n[len(s.name) + 1:].isdigit() for n in names)]
    if todo:
        _eager_experts(model)
        unfuse(model, todo)
    return len(todo)
