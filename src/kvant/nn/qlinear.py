"""QuantLinear: a Linear whose weight is stored packed (2/3/4/8-bit) with its grid.

Buffers (all in the state_dict, names are the checkpoint contract, docs/FORMAT.md):
- ``qweight`` int32 (N, ceil(K*bits/32)): packed unsigned integers, rows = output channels;
- ``scales`` float16 (N, G), or (1, 1) for one scale per tensor;
- ``qzeros`` int32 (N or 1, ceil(G*bits/32)): packed integer zero points;
- ``g_idx`` int32 (K,), only for act-order: the group of each input column;
- ``bias`` (N,) in the model's dtype, when the original Linear had one;
- ``input_scale`` float16 (K,), only where a method scaled input channels and no previous
  operation could absorb 1/s (AWQ): the forward computes ``(x / input_scale) @ Wᵀ``.
The forward goes through ``kvant::wq_linear`` (kernels/ops.py), which picks the GPU kernel
or the pure-torch reference by device.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kvant.algorithms.base import LayerResult
from kvant.formats.packing import pack, packed_width
from kvant.kernels import ops, packed


_KINDS: dict[str, type] = {}


def register_kind(cls: type) -> type:
    """Class decorator: make a QuantLinear subclass loadable by its ``kind`` string."""
    _KINDS[cls.kind] = cls
    return cls


def quant_linear_class(kind: str) -> type:
    """The QuantLinear class stored under ``kind`` (``LayerResult.layer_kind``)."""
    if kind not in _KINDS:
        import kvant.algorithms.registry as reg  # importing methods registers their layers
        reg.available()
    if kind not in _KINDS:
        raise ValueError(f"unknown quantized layer kind {kind!r}; known: {sorted(_KINDS)}")
    return _KINDS[kind]


@register_kind
class QuantLinear(nn.Module):
    """Packed weight-only quantized replacement for ``nn.Linear`` (and GPT-2's Conv1D).

    Subclasses (QuIP's rotated layer, SpQR's outliers) set their own ``kind``, add buffers in
    ``__init__``, and override ``from_result``, ``init_kwargs`` and ``forward``; the
    checkpoint stores ``kind`` and ``init_kwargs()`` per module and rebuilds empty shells
    with ``quant_linear_class(kind)(**init_kwargs)`` before loading the tensors.
    """

    kind = "quant"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 *, bias: bool = False, act_order: bool = False, input_scale: bool = False,
                 dtype: torch.dtype | str = torch.float16):
        super().__init__()
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n_groups = in_features // group_size if group_size > 0 else 1
        rows = 1 if group_size == 0 else out_features
        self.register_buffer("qweight", torch.zeros(
            out_features, packed_width(in_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(rows, n_groups, dtype=torch.float16))
        self.register_buffer("qzeros", torch.zeros(
            rows, packed_width(n_groups, bits), dtype=torch.int32))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32)
                             if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float16)
                             if input_scale else None)
        self._init_kwargs = dict(in_features=in_features, out_features=out_features, bits=bits,
                                 group_size=group_size, bias=bias, act_order=act_order,
                                 input_scale=input_scale, dtype=str(dtype).removeprefix("torch."))

    def init_kwargs(self) -> dict:
        """JSON-ready constructor arguments (dtype as a string) to rebuild an empty shell."""
        return dict(self._init_kwargs)

    @classmethod
    def from_result(cls, result: LayerResult, bias: torch.Tensor | None,
                    dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """Pack a :class:`LayerResult` into a new module."""
        n, k = result.qweight.shape
        input_scale = result.extras.get("input_scale")
        unknown = set(result.extras) - {"input_scale"}
        if unknown:
            raise NotImplementedError(f"QuantLinear cannot store method extras {sorted(unknown)}")
        m = cls(k, n, result.bits, result.group_size, bias=bias is not None,
                act_order=result.g_idx is not None, input_scale=input_scale is not None,
                dtype=dtype)
        # pack where the result lives (the GPU during quantization): CPU packing of a 7B
        # block's ints costs seconds; copy_ brings the words to the module
        m.qweight.copy_(pack(result.qweight, result.bits))
        m.scales.copy_(result.scales.to(torch.float16).cpu())
        m.qzeros.copy_(pack(result.zeros.round().to(torch.int32), result.bits))
        if result.g_idx is not None:
            m.g_idx.copy_(result.g_idx.to(torch.int32).cpu())
        if bias is not None:
            m.bias.copy_(bias.detach().to(dtype).cpu())
        if input_scale is not None:
            m.input_scale.copy_(input_scale.to(torch.float16).cpu())
        return m

    def dequantized_weight(self) -> torch.Tensor:
        """The float (N, K) weight this layer multiplies by (input_scale not applied)."""
        return ops.dequantize_weight(self.qweight, self.scales, self.qzeros, self.g_idx,
                                     self.bits, self.group_size, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if x.is_cuda:  # cached repacked layout + Triton kernels (kernels/packed.py)
            y = packed.cuda_linear(self, x)
        else:
            y = ops.wq_linear(x, self.qweight, self.scales, self.qzeros, self.g_idx,
                              self.bits, self.group_size, self.in_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def storage_bytes(self) -> int:
        """Bytes of every stored tensor of this layer (bias excluded: it is not a weight)."""
        return sum(t.numel() * t.element_size() for name, t in self.named_buffers()
                   if name != "bias")

    def bits_per_weight(self) -> float:
        """Stored bits per weight, scales, zeros, g_idx and input_scale counted."""
        return 8 * self.storage_bytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, "
                f"act_order={self.g_idx is not None}")
