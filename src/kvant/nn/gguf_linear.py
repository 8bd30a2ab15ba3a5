"""GGUFLinear: a Linear whose weight is stored as llama.cpp blocks (``grid="gguf:TYPE"``).

Buffers (the checkpoint contract, docs/FORMAT.md):
- ``blocks`` uint8 (N, K / block * nbytes): row n holds the K / block blocks of output
  channel n, each exactly the bytes of llama.cpp's ``block_<type>`` (kvant.core.gguf_layout);
  the GGUF export writes these bytes unchanged;
- ``bias`` (N,) in the model's dtype, when the original Linear had one.

The forward dequantizes the blocks (kvant.core.gguf_grid, in llama.cpp's float32 order of
operations) and multiplies in torch; there is no GPU kernel for this layout.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kvant.core import gguf_grid as gg
from kvant.core.gguf_layout import decode
from kvant.core.result import LayerResult, register_kind
from kvant.kernels.options import KernelOptions
from kvant.nn.qlinear import KERNEL_BUFFERS, QuantLinear


@register_kind
class GGUFLinear(QuantLinear):
    """Weight in llama.cpp's block layout of one GGUF type (``gguf_type``)."""

    kind = "gguf"

    def __init__(self, in_features: int, out_features: int, gguf_type: str, *,
                 bits: int | None = None, group_size: int | None = None,
                 bias: bool = False, dtype: torch.dtype | str = torch.float16):
        """bits / group_size: the type's code bits and block (derived from ``gguf_type``;
        given, they must agree: a checkpoint entry records them for summaries)."""
        nn.Module.__init__(self)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        t = gg.gguf_type(gguf_type)
        if (bits, group_size) != (None, None) and (bits, group_size) != (t.bits, t.block):
            raise ValueError(f"GGUF type {t.name} has {t.bits}-bit codes in blocks of "
                             f"{t.block}, not bits={bits}, group_size={group_size}")
        if in_features % t.block:
            raise ValueError(f"GGUF type {t.name} needs an input width that is a multiple of "
                             f"{t.block}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.gguf_type = t.name
        self.bits, self.group_size = t.bits, t.block
        self.register_buffer("blocks", torch.zeros(
            out_features, in_features // t.block * t.nbytes, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        for name in ("g_idx", "input_scale") + KERNEL_BUFFERS:  # never held by this layout
            self.register_buffer(name, None, persistent=False)
        self.kernel_options = KernelOptions()
        self.kernel_layout = None
        self._init_kwargs = dict(in_features=in_features, out_features=out_features,
                                 gguf_type=t.name, bits=t.bits, group_size=t.block,
                                 bias=bias,
                                 dtype=str(dtype).removeprefix("torch."))

    @property
    def qtype(self) -> gg.GGUFType:
        return gg.gguf_type(self.gguf_type)

    @classmethod
    def from_result(cls, result: LayerResult, bias: torch.Tensor | None,
                    dtype: torch.dtype = torch.float16) -> "GGUFLinear":
        """The layer of a result from :mod:`kvant.algorithms.gguf_round`."""
        n, k = result.qweight.shape
        m = cls(k, n, result.extras["gguf_type"], bias=bias is not None, dtype=dtype)
        m.blocks.copy_(result.extras["gguf_blocks"])
        if bias is not None:
            m.bias.copy_(bias.detach().to(dtype).cpu())
        return m

    def decoded(self):
        """(codes (N*nb, block) long, fields with leading dim N*nb) of the stored blocks."""
        t = self.qtype
        return decode(t, self.blocks.reshape(-1, t.nbytes))

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 (N, K) weight, equal to what llama.cpp dequantizes from the blocks."""
        codes, f = self.decoded()
        return gg.dequantize_blocks(self.qtype, codes, f).view(self.out_features,
                                                               self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        y = self.reference_product(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def reference_product(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dequantized_weight().to(device=x.device, dtype=x.dtype).t()

    def kernel_source(self) -> tuple:
        raise NotImplementedError("GGUF blocks have no GPU kernel layout; the torch reference "
                                  "computes this layer")

    def prepare(self, device: torch.device | str | None = None,
                options: KernelOptions | None = None) -> bool:
        """Move to ``device`` when given; no kernel layout exists, so always False."""
        if options is not None:
            self.kernel_options = options
        if device is not None:
            nn.Module._apply(self, lambda t: t.to(device))
        return False

    def _apply(self, fn, recurse=True):
        # no derived kernel buffers to drop or rebuild: a plain module move / cast
        return nn.Module._apply(self, fn, recurse)

    def stored_problem(self) -> str | None:
        """Why the stored blocks are invalid (non-finite scales), or None."""
        _, f = self.decoded()
        for key in ("d", "dmin", "m"):
            if key in f and not bool(torch.isfinite(f[key]).all()):
                return f"holds NaN or Inf {key} scales"
        return None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"gguf_type={self.gguf_type}")
