"""QuipSharpLinear: E8P lattice codes (QuIP#) in QuIP's rotated basis.

The layer computes ``y = Uᵀ · Ŵ · V · x + bias`` as :class:`kvant.nn.quip_linear.QuipLinear`
does (same sign vectors, dense factors, shared-input memo), with the rotated weight decoded
from codebook codes instead of an integer grid: row n, columns ``8j .. 8j+7`` of Ŵ are

    Ŵ[n, 8j:8j+8] = Σ_stage  scales[stage, n or 0] · codebook_stage(codes_stage[n, j])

(:mod:`kvant.core.e8p`: a table look-up plus signs). Stages by ``bits``: 2 -> E8P;
3 -> E8P + E8P1 (the 1-bit residual book); 4 -> E8P + E8P.

Buffers (the checkpoint contract; names are kept from QuantLinear where the role matches):
- ``qweight`` int16 (N, K/8): the first stage's 16-bit E8P codes (the uint16 bit pattern);
- ``qweight_resid`` (N, K/8), residual stage only: int16 E8P codes (bits=4) or uint8 E8P1
  codes (bits=3);
- ``scales`` float16 (stages, N) for ``scale="row"``, (stages, 1) for ``"layer"``;
- ``sign_in``, ``sign_out``, ``factor_in``, ``factor_out``, ``bias``: as QuipLinear.
No ``qzeros``, ``g_idx`` or ``input_scale``. Stored bits per weight (:meth:`bits_per_weight`,
every buffer but the bias counted): ``2·stages`` (3 bits: 2 + 1) plus
``16·stages·rows / (N·K)`` for the scales plus ``(⌈N/8⌉ + ⌈K/8⌉)·8 / (N·K)`` for the signs
(plus the dense factors where a size has no Hadamard construction).
Compute (:meth:`QuipSharpLinear._product`, the rotated-basis product between the two
transforms): on CUDA, for at most ``kernels.codebook.KERNEL_MAX_M`` (16) rows of fp16/bf16
activations, with ``KernelOptions.gpu_kernels`` and Triton importable, the Triton kernel
``kvant::e8p_linear`` (kernels/triton/e8p.py) decodes the codes on the fly; everything else
(the CPU, larger batches such as prefill, fp32 activations) takes the reference: decode the
whole weight, one matmul. The codes are the kernel's layout as stored: no repacking; the
only derived tensor is ``kernel_tables`` (non-persistent, never saved or counted): the 10 KB
of word tables both paths of the op decode from (core/e8p_words.py), moved with the layer.
"""

from __future__ import annotations

import torch

from kvant.core.e8p import DIM, codebook
from kvant.core.e8p_words import kernel_tables
from kvant.core.hadamard import pack_signs
from kvant.core.result import LayerResult, register_kind
from kvant.kernels import codebook as cbk
from kvant.kernels import selfcheck
from kvant.nn.quip_linear import QuipLinear

# the codebooks of each stage, by stored bits per weight
STAGES = {2: ("e8p",), 3: ("e8p", "e8p1"), 4: ("e8p", "e8p")}
_CODE_DTYPE = {"e8p": torch.int16, "e8p1": torch.uint8}
# the kernel's relative error against the reference: ~1e-3 (fp16) and ~5e-3 (bf16) measured
# in the interpreter (tests/kernels); a wrong decode is off by order 1
KERNEL_RTOL = 2e-2


def to_stored(codes: torch.Tensor, name: str) -> torch.Tensor:
    """Codes (any integer dtype, values in [0, size)) as stored: int16 holding the uint16 bit
    pattern (E8P), or uint8 (E8P1)."""
    c = codes.to(torch.int32)
    if name == "e8p":
        return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)
    return c.to(torch.uint8)


def from_stored(stored: torch.Tensor) -> torch.Tensor:
    """Stored codes -> int64 code values in [0, size)."""
    return stored.long() & 0xFFFF


@register_kind
class QuipSharpLinear(QuipLinear):
    """Codebook-quantized Linear in QuIP's rotated basis (see the module docstring)."""

    kind = "quipsharp"

    def __init__(self, in_features: int, out_features: int, bits: int = 2,
                 group_size: int = -1, *, scale: str = "row", m_in: int | None = None,
                 m_out: int | None = None, bias: bool = False,
                 dtype: torch.dtype | str = torch.float16):
        if bits not in STAGES:
            raise ValueError(f"quipsharp layers store 2, 3 or 4 bits per weight, not {bits}")
        if group_size != -1 or scale not in ("row", "layer"):
            raise ValueError(f"quipsharp layers scale by 'row' or 'layer' (group_size -1), "
                             f"got scale={scale!r}, group_size={group_size}")
        if in_features % DIM:
            raise ValueError(f"quipsharp needs an input width that is a multiple of {DIM}, "
                             f"got {in_features}")
        super().__init__(in_features, out_features, bits, -1, m_in=m_in, m_out=m_out,
                         bias=bias, dtype=dtype)
        self.scale_mode = scale
        names = STAGES[bits]
        rows = out_features if scale == "row" else 1
        blocks = in_features // DIM
        # the integer grid's buffers give way to codes and per-stage scales
        self.register_buffer("qweight", torch.zeros(out_features, blocks, dtype=torch.int16))
        self.register_buffer("qzeros", None)
        self.register_buffer("scales", torch.ones(len(names), rows, dtype=torch.float16))
        self.register_buffer("qweight_resid", torch.zeros(
            out_features, blocks, dtype=_CODE_DTYPE[names[1]]) if len(names) > 1 else None)
        # derived, not stored: the op's decode tables (module docstring)
        self.register_buffer("kernel_tables", kernel_tables(), persistent=False)
        kw = self._init_kwargs
        for key in ("act_order", "input_scale"):
            kw.pop(key)
        kw.update(group_size=-1, scale=scale)

    @classmethod
    def from_result(cls, result: LayerResult, bias: torch.Tensor | None,
                    dtype: torch.dtype = torch.float16) -> "QuipSharpLinear":
        """Pack a quipsharp :class:`LayerResult`: qweight (N, K/8) first-stage codes, scales
        (stages, N or 1); extras ``sign_in`` (K,), ``sign_out`` (N,), ``scale_mode``,
        ``codes_resid`` (N, K/8) for 3 and 4 bits, optional ``factor_in``/``factor_out``."""
        ex = dict(result.extras)
        known = {"sign_in", "sign_out", "scale_mode", "codes_resid", "factor_in", "factor_out"}
        if set(ex) - known:
            raise NotImplementedError(f"QuipSharpLinear cannot store method extras "
                                      f"{sorted(set(ex) - known)}")
        n, blocks = result.qweight.shape
        m = cls(blocks * DIM, n, result.bits, -1, scale=ex.get("scale_mode", "row"),
                bias=bias is not None, dtype=dtype)
        names = STAGES[result.bits]
        m.qweight.copy_(to_stored(result.qweight.cpu(), names[0]))
        if m.qweight_resid is not None:
            m.qweight_resid.copy_(to_stored(ex["codes_resid"].cpu(), names[1]))
        m.scales.copy_(result.scales.reshape(m.scales.shape).to(torch.float16).cpu())
        for s in ("in", "out"):
            getattr(m, f"sign_{s}").copy_(pack_signs(ex[f"sign_{s}"].cpu()))
            buf, f = getattr(m, f"factor_{s}"), ex.get(f"factor_{s}")
            if (buf is None) != (f is None):
                raise ValueError(f"factor_{s}: the layer and the result disagree on whether "
                                 "this size needs a random orthogonal factor")
            if buf is not None:
                buf.copy_(f.to(torch.float32).cpu())
        if bias is not None:
            m.bias.copy_(bias.detach().to(dtype).cpu())
        return m

    def rotated_weight(self) -> torch.Tensor:
        """The decoded ``Ŵ`` (N, K) in the rotated basis, float32."""
        names = STAGES[self.bits]
        stored = [self.qweight] + ([self.qweight_resid] if len(names) > 1 else [])
        dev = self.qweight.device
        w = torch.zeros(self.out_features, self.in_features // DIM, DIM, device=dev)
        for i, (name, codes) in enumerate(zip(names, stored)):
            cb, c = codebook(name), from_stored(codes)
            # the host keeps the whole table (size, 8); elsewhere decode from the 256 rows of
            # absolute values rather than copy the table to the device on every call
            pts = cb.table[c] if dev.type == "cpu" else cb.decode(c)
            w += pts * self.scales[i].float().view(-1, 1, 1)
        return w.view(self.out_features, self.in_features)

    def reference_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Ŵᵀ`` for x (..., K) already rotated by V."""
        return x @ self.rotated_weight().to(device=x.device, dtype=x.dtype).t()

    def kernel_source(self) -> tuple:
        raise NotImplementedError("E8P codes need no repacked layout: the codebook kernel "
                                  "reads them as stored (kvant::e8p_linear)")

    def _prepare_on(self, dev: torch.device) -> bool:
        """No layout to build (the codes are the kernel's input; the tables move with the
        layer); on CUDA the kernel's split-K counters and E8P1 value tables are made now so
        that a CUDA-graph capture finds them. Returns whether the kernel computes this layer's decode-size
        batches."""
        super()._prepare_on(dev)
        return self.kernel_options.gpu_kernels and cbk.prepare(dev, self.kernel_tables)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Ŵᵀ`` for x (..., K) already rotated: the codebook kernel where it applies
        (module docstring), else :meth:`reference_product`."""
        def kernel():
            return cbk.e8p_linear(x, self.qweight, self.qweight_resid, self.scales,
                                  self.kernel_tables, self.bits, self.kernel_options.autotune)

        if (self.kernel_options.gpu_kernels and cbk.kernel_applies(x)
                and self.qweight.device == x.device):
            # trusted once it matched the reference on this device (kvant.kernels.selfcheck),
            # per kernel path: batch 1-2 and 3-16 rows run different kernels
            rows = x.numel() // x.shape[-1]
            key = ("e8p", self.bits, self.out_features, self.in_features, x.dtype,
                   str(x.device), rows <= 2)
            if selfcheck.trusted(key, kernel, lambda: self.reference_product(x),
                                 KERNEL_RTOL):
                return kernel()
        return self.reference_product(x)

    def storage_bytes(self) -> int:
        """Bytes of the stored tensors (the derived ``kernel_tables`` not counted)."""
        return super().storage_bytes() - self.kernel_tables.numel() * 4

    def stored_problem(self) -> str | None:
        """Why the stored tensors are invalid, or None (kvant.formats.integrity)."""
        s = self.scales.float()
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            return "holds scales that are not finite and positive"
        for side, size in (("in", self.in_features), ("out", self.out_features)):
            signs = getattr(self, f"sign_{side}")
            if size % 8 and int(signs[-1]) >> (size % 8):
                return f"sign_{side} has bits set beyond its {size} signs"
            f = getattr(self, f"factor_{side}")
            if f is not None:
                eye = torch.eye(f.shape[0], dtype=torch.float64)
                if not bool(torch.isfinite(f).all()) or float(
                        (f.double() @ f.double().T - eye).abs().max()) > 1e-3:
                    return f"factor_{side} is not an orthogonal matrix"
        return None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, codebooks={'+'.join(STAGES[self.bits])}, "
                f"scale={self.scale_mode}, rotated=True")
