"""QuantLinear: a Linear whose weight is stored packed (2/3/4/8-bit) with its grid.

Buffers (all in the state_dict, names are the checkpoint contract, docs/FORMAT.md):
- ``qweight`` int32 (N, ceil(K*bits/32)): packed unsigned integers, rows = output channels;
- ``scales`` float16 (N, G), or (1, 1) for one scale per tensor;
- ``qzeros`` int32 (N or 1, ceil(G*bits/32)): packed integer zero points;
- ``g_idx`` int32 (K,), only for act-order: the group of each input column;
- ``bias`` (N,) in the model's dtype, when the original Linear had one;
- ``input_scale`` float16 (K,), only where a method scaled input channels and no previous
  operation could absorb 1/s (AWQ): the forward computes ``(x / input_scale) @ Wᵀ``.

Getting ready for a device is one explicit step, owned by the layer: :meth:`QuantLinear.prepare`
(or :func:`prepare_for_inference` for a whole model; ``kvant.load_quantized`` and every
``.to()`` / ``.cuda()`` call it) repacks the stored tensors once into the GPU kernels'
layout, kept as non-persistent buffers ``kernel_qweight``, ``kernel_scales``,
``kernel_zeros``, ``kernel_perm`` (never in the state_dict or the checkpoint, not counted by
:meth:`QuantLinear.storage_bytes`) and described by :class:`KernelLayout`. On the CPU, and for
grids or layer kinds the kernels do not handle, there is no layout and the forward is the
pure-torch reference ``kvant::wq_linear`` (kernels/ops.py). :meth:`QuantLinear._product` is
the one place where any layer kind chooses between the two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from kvant.core.result import LayerResult, quant_linear_class, register_kind  # noqa: F401
from kvant.formats.packing import pack, packed_width
from kvant.kernels import ops, packed
from kvant.kernels.options import KernelOptions
from kvant.kernels.triton import repack as rp

log = logging.getLogger(__name__)

# the non-persistent buffers of a prepared layer, in PackedWeight's order
KERNEL_BUFFERS = ("kernel_qweight", "kernel_scales", "kernel_zeros", "kernel_perm")
# the stored buffers the kernel layout is built from (KernelOptions.stored_on_host moves them)
KERNEL_SOURCES = ("qweight", "scales", "qzeros", "g_idx")


def _resolved(device: torch.device | str) -> torch.device:
    """``device`` with the current CUDA index filled in ("cuda" -> "cuda:0"), for comparing."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


@dataclass(frozen=True)
class KernelLayout:
    """What a prepared layer's kernel buffers hold, beside the tensors: the shape of the
    repacked weight (kernels/triton/repack.py), the device it lives on, and the identity of
    the stored tensors it was built from (``repack.source_key``: an in-place edit, a
    ``load_state_dict`` or a move makes it stale, and the layer rebuilds it)."""

    bits: int
    group_size: int  # the kernels' group size: 0 = one group a row
    in_features: int
    pairs: bool
    tile: int
    device: torch.device
    source: tuple


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
        for name in KERNEL_BUFFERS:  # filled by prepare() on a CUDA device
            self.register_buffer(name, None, persistent=False)
        self.kernel_options = KernelOptions()
        self.kernel_layout: KernelLayout | None = None

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
        y = self._product(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def reference_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Wᵀ`` by the pure-torch reference (x already divided by input_scale)."""
        return ops.wq_linear(x, self.qweight, self.scales, self.qzeros, self.g_idx, self.bits,
                             self.group_size, self.in_features)

    def kernel_source(self) -> tuple:
        """The stored tensors the GPU kernels compute ``x @ Wᵀ`` from: (qweight, scales,
        qzeros, g_idx) in the checkpoint layout. Kinds whose weight the kernels cannot read
        raise NotImplementedError saying why."""
        return self.qweight, self.scales, self.qzeros, self.g_idx

    def prepare(self, device: torch.device | str | None = None,
                options: KernelOptions | None = None) -> bool:
        """Get ready to compute on ``device`` (default: where the layer is; the layer is moved
        there first): on CUDA with the kernels available, repack the stored tensors into the
        kernels' layout as non-persistent buffers, once; elsewhere drop any such layout.
        ``options`` (default: the layer's current ones) are kept for later calls and moves.
        Returns whether the GPU kernels will compute this layer. Idempotent: an up-to-date
        layout is not rebuilt."""
        if options is not None:
            if not isinstance(options, KernelOptions):
                raise TypeError(f"options must be a KernelOptions, got {type(options).__name__}")
            self.kernel_options = options
        if device is not None and _resolved(device) != self.compute_device():
            self.to(device)  # _apply prepares for the new device
            return self.kernel_layout is not None
        return self._prepare_on(self.compute_device())

    def compute_device(self) -> torch.device:
        """Where this layer computes: its kernel layout's device when prepared (the stored
        tensors may then be on the host, KernelOptions.stored_on_host), else its tensors'."""
        return self.kernel_layout.device if self.kernel_layout is not None else \
            self.qweight.device

    def _prepare_on(self, dev: torch.device) -> bool:
        kernels = dev.type == "cuda" and packed.CUDA_KERNELS and self.kernel_options.gpu_kernels
        if kernels and self._layout_current() and self.kernel_layout.device == dev:
            return True
        if kernels and self._build_layout(dev):
            return True
        self._drop_layout()
        self._move_sources(dev)  # the reference op computes from the stored tensors
        return False

    def _move_sources(self, dev: torch.device) -> None:
        for name in KERNEL_SOURCES:
            t = self._buffers.get(name)
            if t is not None and t.device != dev:
                self._buffers[name] = t.to(dev)

    def _build_layout(self, dev: torch.device | None = None) -> bool:
        """Repack now on ``dev`` (default: where the stored tensors are; on the CPU only tests
        call it), or drop the layout and keep the reference when the kernels do not handle
        this layer. With ``stored_on_host``, the stored tensors then go to the host."""
        self._drop_layout()
        try:
            src = self.kernel_source()
            dev = src[0].device if dev is None else dev
            p = rp.repack(*(None if t is None else t.to(dev) for t in src), self.bits,
                          self.group_size, self.in_features)
        except NotImplementedError as e:
            log.info("%s(%d->%d) stays on the reference op: %s", type(self).__name__,
                     self.in_features, self.out_features, e)
            return False
        except ValueError as e:  # inconsistent stored tensors (e.g. an uninitialised shell)
            log.warning("%s(%d->%d) not repacked, the reference op will run: %s",
                        type(self).__name__, self.in_features, self.out_features, e)
            return False
        for name, t in zip(KERNEL_BUFFERS, (p.qweight, p.scales, p.zeros, p.perm)):
            setattr(self, name, t)
        if self.kernel_options.stored_on_host and dev.type == "cuda":
            self._move_sources(torch.device("cpu"))
        self.kernel_layout = KernelLayout(p.bits, p.group_size, p.in_features, p.pairs,
                                          p.tile, p.qweight.device,
                                          rp.source_key(*self.kernel_source()))
        return True

    def _drop_layout(self) -> None:
        for name in KERNEL_BUFFERS:
            setattr(self, name, None)
        self.kernel_layout = None

    def _layout_current(self) -> bool:
        """Whether the layout exists and was built from the stored tensors as they are now."""
        lay = self.kernel_layout
        if lay is None:
            return False
        try:
            return lay.source == rp.source_key(*self.kernel_source())
        except NotImplementedError:
            return False

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Wᵀ`` (x already divided by input_scale): the one dispatch point of every
        layer kind. The prepared layout on x's device goes to the GPU kernels
        (``kvant::wq_linear_packed``), anything else to :meth:`reference_product`.

        A layout made stale by an in-place edit of the stored tensors is rebuilt here (not
        under torch.compile, which cannot trace the check: prepare before compiling; during
        CUDA-graph capture, which cannot repack, the layer falls back with a warning)."""
        lay = self.kernel_layout
        if lay is not None and x.device == lay.device:
            if torch.compiler.is_compiling() or self._layout_current():
                return packed.wq_linear_packed(
                    x, self.kernel_qweight, self.kernel_scales, self.kernel_zeros,
                    self.kernel_perm, lay.bits, lay.group_size, lay.in_features, lay.pairs,
                    lay.tile, self.kernel_options.autotune)
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                log.warning("%s: stored tensors changed since prepare(); the reference op "
                            "runs in this CUDA graph (prepare before capturing)",
                            type(self).__name__)
            elif self._build_layout(lay.device):
                return self._product(x)
        return self.reference_product(x)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half(): the kernel layout is derived, so it is not moved or cast
        # but dropped and (on a CUDA device) rebuilt from the moved stored tensors; an
        # up-to-date layout (a .to() that moved nothing) is kept as it is
        layout = (self.kernel_layout, [self._buffers[n] for n in KERNEL_BUFFERS])
        # where the move sends the layer: its stored tensors may be on the host while it
        # computes on the GPU (stored_on_host), so ask ``fn`` with a probe on the compute device
        target = None if layout[0] is None else fn(torch.empty(0, device=layout[0].device)).device
        for name in KERNEL_BUFFERS:
            self._buffers[name] = None
        super()._apply(fn, recurse)
        self.kernel_layout, kept = layout
        for name, t in zip(KERNEL_BUFFERS, kept):
            self._buffers[name] = t
        self._prepare_on(target or self.qweight.device)
        return self

    def storage_bytes(self) -> int:
        """Bytes of every stored tensor of this layer (bias excluded: it is not a weight;
        the kernel layout excluded: it is derived, never saved)."""
        return sum(t.numel() * t.element_size() for name, t in self.named_buffers()
                   if name != "bias" and name not in KERNEL_BUFFERS)

    def bits_per_weight(self) -> float:
        """Stored bits per weight, scales, zeros, g_idx and input_scale counted."""
        return 8 * self.storage_bytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, "
                f"act_order={self.g_idx is not None}")


def prepare_for_inference(model: nn.Module, device: torch.device | str | None = None,
                          options: KernelOptions | None = None) -> int:
    """Move ``model`` to ``device`` (if given) and get every packed layer ready to compute
    there (:meth:`QuantLinear.prepare`): the GPU kernels' layout is built once, now, so that
    ``torch.compile`` and CUDA-graph capture find it. Returns the number of layers the GPU
    kernels compute (0 on the CPU)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers if options is not None else []:
        m.prepare(options=options)  # options first, so the move below builds with them
    if device is not None:
        model.to(device)
    return sum(m.prepare() for m in layers)
