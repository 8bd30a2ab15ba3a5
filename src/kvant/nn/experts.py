"""The experts of a mixture-of-experts layer, one layer per expert, behind a stacked façade.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE (and most newer MoE
models) as 3-D parameters, e.g. ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), and
its per-expert forward applies expert ``e`` as ``F.linear(x_e, stack[e])`` on the tokens
routed to it. :class:`ExpertStack` replaces such a parameter (kvant.model.moe does the swap)
by a module holding E ordinary layers — ``nn.Linear`` while the model is float, the packed
:class:`~kvant.nn.qlinear.QuantLinear` (or any other quantized kind) once quantized — named
``<stack>.<e>``, so that the engine, the checkpoint and every method see one layer per
expert. ``stack[e]`` returns an :class:`ExpertWeight`, a storage-less stand-in for the
(N, K) weight whose only supported use is ``F.linear(x, stack[e])`` (optionally with a bias):
that call runs expert ``e``'s layer on ``x`` (M, K) -> (M, N). The model's own forward code —
its router, its top-k weights, its loop over the experts hit — is unchanged; forward hooks on
expert ``e``'s layer therefore see exactly the tokens routed to it.

Any other use of a stand-in (transposing it, ``x @ w``, reading its values) or of the stack
as a whole (a grouped matmul over all experts) raises :class:`ExpertLayoutError`: kvant
refuses a layout it cannot run rather than guess. Running the experts is a loop over the
experts hit, each through its packed layer (there is no grouped kernel yet).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvant.errors import InputError

# metadata a forward may read from a stand-in (shape checks, dtype casts of other tensors)
_METADATA = frozenset({"dim", "size", "ndimension", "is_floating_point", "__len__"})


class ExpertLayoutError(InputError):
    """An experts module uses its stacked weights in a way kvant cannot run per expert."""


def _is_getter(func) -> bool:
    # property reads (w.shape, w.dtype, w.device, ...) reach __torch_function__ as the
    # descriptor's __get__
    return getattr(func, "__name__", "") == "__get__"


class ExpertWeight(torch.Tensor):
    """Stand-in for expert ``index``'s (N, K) weight of ``stack``: ``F.linear(x, w, b)`` runs
    the expert's layer; shape, dtype and device can be read; nothing else is allowed."""

    stack: "ExpertStack"
    index: int

    @staticmethod
    def __new__(cls, stack: "ExpertStack", index: int):
        t = torch.Tensor._make_wrapper_subclass(
            cls, (stack.out_features, stack.in_features), dtype=stack.dtype,
            device=stack.device)
        t.stack, t.index = stack, index
        return t

    def __repr__(self) -> str:  # the default repr would read values
        return (f"ExpertWeight(expert {self.index}, {self.stack.out_features}x"
                f"{self.stack.in_features})")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, ExpertWeight) and not isinstance(x, ExpertWeight) and not \
                    isinstance(b, ExpertWeight):
                y = w.stack.expert(w.index)(x)  # (M, K) -> (M, N)
                return y if b is None else y + b
        if _is_getter(func) or getattr(func, "__name__", "") in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
        raise ExpertLayoutError(
            f"the forward of the experts uses an expert weight in {name}(...); kvant runs "
            "experts only through F.linear(x, stack[e]) (the per-expert layout of "
            "transformers' eager experts), so it cannot quantize this experts layout")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # pragma: no cover
        raise ExpertLayoutError(f"an expert weight stand-in reached {func}; kvant runs "
                                "experts only through F.linear(x, stack[e])")


class ExpertStack(nn.Module):
    """E layers standing for a stacked (E, N, K) expert parameter; ``stack[e]`` is expert
    e's :class:`ExpertWeight`. Children are named ``"0"`` .. ``"E-1"``.

    out_features, in_features: N and K of every expert; dtype: the float dtype the stacked
    parameter had (what the stand-ins report)."""

    def __init__(self, experts: list[nn.Module], out_features: int, in_features: int,
                 dtype: torch.dtype):
        super().__init__()
        if not experts:
            raise ValueError("an expert stack needs at least one expert")
        for i, m in enumerate(experts):
            self.add_module(str(i), m)
        self.out_features, self.in_features, self.dtype = out_features, in_features, dtype

    def __len__(self) -> int:
        return len(self._modules)

    def expert(self, index: int) -> nn.Module:
        """The layer of expert ``index``."""
        return self._modules[str(index)]

    @property
    def device(self) -> torch.device:
        """Where the experts' tensors live (the first expert's)."""
        first = self.expert(0)
        for t in itertools.chain(first.parameters(), first.buffers()):
            return t.device
        return torch.device("cpu")

    def __getitem__(self, index) -> ExpertWeight:
        try:
            i = int(index)  # an int or a 0-d integer tensor (transformers' expert loop)
        except (TypeError, ValueError, RuntimeError):
            raise ExpertLayoutError(f"experts are indexed one at a time (stack[e]); got "
                                    f"{type(index).__name__}") from None
        if not 0 <= i < len(self):
            raise IndexError(f"expert {i} of a stack of {len(self)}")
        return ExpertWeight(self, i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def extra_repr(self) -> str:
        return f"experts={len(self)}, in_features={self.in_features}, " \
               f"out_features={self.out_features}"
