"""The block runner the engine hands to a method's block-level preparation.

A method that must see a whole block (AWQ's scale search and fold probes) never calls the
block or registers hooks itself: it asks a :class:`BlockRunner` to
(a) run the block on its calibration inputs (:meth:`BlockRunner.outputs`);
(b) run it with callbacks before / after named submodules, e.g. to capture their inputs
    (:meth:`BlockRunner.run`, :meth:`BlockRunner.capture`);
(c) probe a candidate: run it with some weights or submodules temporarily replaced, restored
    afterwards even on error, and return the outputs or the mean squared error against
    reference outputs (:meth:`BlockRunner.probe`, :meth:`BlockRunner.patched`).
Hooks are removed when each call returns. Everything runs under ``torch.no_grad``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn

from kvant.calib.capture import BlockInput, block_output
from kvant.model.discovery import is_conv1d

# before[name](args, kwargs): called with a submodule's positional and keyword arguments
# before it runs; after[name](args, kwargs, output): called once it has returned
Before = Callable[[tuple, dict], None]
After = Callable[[tuple, dict, object], None]


def _pairs(hooks) -> list:
    if not hooks:
        return []
    return list(hooks.items()) if isinstance(hooks, dict) else list(hooks)


def _pre_hook(fn: Before):
    def hook(_mod, args, kwargs):  # returns None: a value would replace the arguments
        fn(args, kwargs)
    return hook


def _post_hook(fn: After):
    def hook(_mod, args, kwargs, out):  # returns None: a value would replace the output
        fn(args, kwargs, out)
    return hook


class BlockRunner:
    """Runs one block (or any module) on its captured inputs; see the module docstring.

    block: the module; inputs: its calibration calls (:class:`BlockInput`), the default of
    every method that takes ``inputs``; prefix: the block's full name with a trailing dot
    (e.g. "model.layers.3."), for messages and for keys that must match the names the
    engine gives layer quantizers. Submodules are named relative to the block ("" is the
    block itself) or given as modules.
    """

    def __init__(self, block: nn.Module, inputs: list[BlockInput] | None = None,
                 prefix: str = ""):
        self.block, self.prefix = block, prefix
        self.inputs = list(inputs) if inputs is not None else []

    def _module(self, ref) -> nn.Module:
        return ref if isinstance(ref, nn.Module) else self.block.get_submodule(ref)

    # -- (a) plain runs -------------------------------------------------------------------
    @torch.no_grad()
    def output(self, inp: BlockInput) -> torch.Tensor:
        """The hidden states the block returns for one call."""
        return block_output(self.block(*inp.args, **inp.kwargs))

    @torch.no_grad()
    def outputs(self, inputs: list[BlockInput] | None = None) -> list[torch.Tensor]:
        """The block's hidden-state outputs on ``inputs`` (default: the calibration inputs)."""
        return [self.output(inp) for inp in self._inputs(inputs)]

    def _inputs(self, inputs):
        return self.inputs if inputs is None else inputs

    # -- (b) runs with callbacks ------------------------------------------------------------
    @torch.no_grad()
    def run(self, inputs: list[BlockInput] | None = None, *,
            before=None, after=None,
            keep_outputs: bool = True) -> list[torch.Tensor] | None:
        """Run the block on ``inputs`` (default: the calibration inputs) with the callbacks
        ``before`` / ``after`` (a dict submodule name or module -> callback, see ``Before``
        / ``After``, or a list of such pairs when one submodule gets several) attached for
        this call only, in the order given. Returns the block's outputs (detached), or
        None with ``keep_outputs=False``. A callback's return value is ignored: it observes,
        never changes, what the submodule sees."""
        handles = []
        try:
            for ref, fn in _pairs(before):
                handles.append(self._module(ref).register_forward_pre_hook(
                    _pre_hook(fn), with_kwargs=True))
            for ref, fn in _pairs(after):
                handles.append(self._module(ref).register_forward_hook(
                    _post_hook(fn), with_kwargs=True))
            outs = []
            for inp in self._inputs(inputs):
                out = self.output(inp).detach()
                if keep_outputs:
                    outs.append(out)
            return outs if keep_outputs else None
        finally:
            for h in handles:
                h.remove()

    def capture(self, names, fn: Callable[[str, torch.Tensor], None],
                inputs: list[BlockInput] | None = None) -> None:
        """Call ``fn(name, x)`` with the first positional input ``x`` of every call of each
        named submodule, over ``inputs`` (default: the calibration inputs)."""
        before = {n: (lambda a, kw, n=n: fn(n, a[0].detach())) for n in names}
        self.run(inputs, before=before, keep_outputs=False)

    def ran(self, names, inp: BlockInput) -> set:
        """The subset of ``names`` (submodule names) that run when the block is called on
        ``inp``."""
        seen: set = set()
        self.run([inp], before={n: (lambda a, kw, n=n: seen.add(n)) for n in names},
                 keep_outputs=False)
        return seen

    # -- (c) probes -----------------------------------------------------------------------
    @contextmanager
    def patched(self, weights: dict | None = None, modules: dict | None = None):
        """Context: the block with ``weights`` (Linear name or module -> (N, K) weight, as
        :func:`kvant.model.discovery.linear_weight` returns it; a Conv1D stores its
        transpose) set in the layer's dtype and ``modules`` (submodule name -> module)
        swapped in; everything is put back on exit, even on error."""
        saved_w, saved_m = [], []
        try:
            with torch.no_grad():
                for ref, w in (weights or {}).items():
                    lin = self._module(ref)
                    saved_w.append((lin, lin.weight.data.clone()))
                    lin.weight.data.copy_((w.t() if is_conv1d(lin) else w).to(lin.weight.dtype))
                for name, mod in (modules or {}).items():
                    parent, _, leaf = name.rpartition(".")
                    owner = self.block.get_submodule(parent) if parent else self.block
                    saved_m.append((owner, leaf, getattr(owner, leaf)))
                    setattr(owner, leaf, mod)
            yield self
        finally:
            with torch.no_grad():
                for owner, leaf, mod in reversed(saved_m):
                    setattr(owner, leaf, mod)
                for lin, data in reversed(saved_w):
                    lin.weight.data.copy_(data)

    @torch.no_grad()
    def probe(self, *, weights: dict | None = None, modules: dict | None = None,
              inputs: list[BlockInput] | None = None,
              reference: list[torch.Tensor] | None = None,
              first_weights: list | None = None):
        """Run a candidate (see :meth:`patched`) on ``inputs`` (default: the calibration
        inputs) and restore the block. Without ``reference``: the outputs. With it (one
        tensor per input): the mean squared error over all elements, each call's float32
        sum accumulated in float64 on the device and read once (one host synchronisation
        per probe, not per call). ``first_weights`` (one per input, a number or 0-dim
        tensor): the error at position 0 of every window of that input's (B, T, C) output
        counts that many times (outputs without a position axis are unweighted)."""
        with self.patched(weights, modules):
            if reference is None:
                return self.outputs(inputs)
            total, count = None, 0
            weights0 = first_weights or [1.0] * len(reference)
            for inp, ref, w0 in zip(self._inputs(inputs), reference, weights0, strict=True):
                err = (self.output(inp).float() - ref.float()).pow(2)
                if not (isinstance(w0, float) and w0 == 1.0) and err.dim() >= 3 \
                        and err.shape[-2] >= 2:
                    err[..., 0, :] *= w0
                part = err.sum().double()
                total = part if total is None else total + part
                count += ref.numel()
        return float(total) / max(count, 1) if total is not None else 0.0
