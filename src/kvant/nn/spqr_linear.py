"""SpQRLinear: a packed low-bit weight with quantized statistics plus fp16 outliers in CSR.

The stored weight is ``W = dense + S``:

- dense: ``(q[n, k] - z[n, g]) * s[n, g]`` with ``q`` the ``bits``-bit integers (``qweight``,
  packed as every QuantLinear) and ``g = g_idx[k]``. With act-order the permutation is
  stored (``perm``, int16 when K < 32768) and ``g_idx[perm[j]] = j // group_size``: groups
  are consecutive columns in the order the column walk quantized them.
- statistics, ``stat_bits < 16`` (the paper's bilevel scheme): every first-level scale and
  zero (N, G) is itself quantized to ``stat_bits`` in groups of ``stat_group_size``
  consecutive output rows of one column group; each such group keeps an fp16 ``base`` and
  ``step``: ``s = base + s_int * step``. Zeros are real numbers, not integers, as in SpQR.
  ``stat_bits == 16``: plain fp16 ``scales`` and packed integer ``qzeros`` (the GPTQ grid).
- S: a sparse (N, K) matrix of fp16 residuals ``w - dense`` at the outlier positions, in CSR:
  ``outlier_rowptr`` int32 (N+1,), ``outlier_cols`` int16 (int32 when K >= 32768),
  ``outlier_vals`` float16 (all three absent when there are no outliers). Storing the residual (not the raw weight) makes the sum exact
  without masking the dense part.

Buffers (state_dict names are the checkpoint contract): ``qweight``, ``scale_q``, ``zero_q``
(int32 words of the flattened (N, G) statistic integers, packed as one row), ``scale_stats``,
``zero_stats`` (float16 (2, N/stat_group_size, G): base, step), or ``scales``/``qzeros`` when
stat_bits == 16; ``perm``; the three CSR arrays; ``bias``.

Compute (:meth:`SpQRLinear._product`): on CUDA, for at most ``kernels.spqr.KERNEL_MAX_M``
(16) rows of fp16/bf16 activations, with ``KernelOptions.gpu_kernels`` and Triton importable,
the fused Triton kernel ``kvant::spqr_linear`` (kernels/spqr.py, kernels/triton/spqr.py)
reads the weight in its load-time layout (codes in the planes layout, statistics still
quantized, outliers as packed words) and adds the outliers in its epilogue; it is trusted
once it matched :meth:`reference_product` on the device (kvant.kernels.selfcheck). The layout
is built once per device (:meth:`kernel_pack`: on ``prepare`` / ``.to()``, else on the first
eager call), kept outside the state_dict (the checkpoint format is unchanged) and rebuilt when
a stored tensor changes. Everything else (the CPU, more than 16 rows, fp32, the kernels
switched off) is the reference: the dense part dequantized, one matmul, the CSR product.
``KernelOptions.stored_on_host`` does not apply: the stored tensors stay on the device.
"""

from __future__ import annotations

import logging

import torch

from kvant.core.result import LayerResult, register_kind
from kvant.core.stats import dequantize_stats
from kvant.formats.packing import pack, packed_width, unpack
from kvant.kernels import selfcheck
from kvant.kernels import spqr as spk
from kvant.kernels.spqr import csr_matmul
from kvant.kernels.triton.repack import source_key
from kvant.nn.qlinear import QuantLinear, _resolved

log = logging.getLogger(__name__)

# the kernel's relative error against the reference: ~1e-3 in fp16 (one rounding of each
# weight, as the reference's, and fp32 sums in another order), more in bf16; a wrong layout
# is off by order 1
KERNEL_RTOL = 2e-2
# the stored tensors the kernel layout is built from, in kernels.spqr.repack's order
PACK_SOURCES = ("qweight", "perm", "scale_q", "zero_q", "scale_stats", "zero_stats", "scales",
                "qzeros", "outlier_rowptr", "outlier_cols", "outlier_vals")


def to_csr(mask: torch.Tensor, values: torch.Tensor, index_dtype: torch.dtype):
    """CSR arrays of the entries of ``values`` (N, K) where ``mask`` is true (row-major)."""
    n = mask.shape[0]
    idx = mask.nonzero()  # (nnz, 2), sorted row-major
    counts = torch.bincount(idx[:, 0], minlength=n)
    rowptr = torch.zeros(n + 1, dtype=torch.int32)
    rowptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return rowptr, idx[:, 1].to(index_dtype), values[mask].to(torch.float16)


@register_kind
class SpQRLinear(QuantLinear):
    """Weight-only quantized Linear in SpQR's layout (see the module docstring)."""

    kind = "spqr"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 *, stat_bits: int = 3, stat_group_size: int = 16, nnz: int = 0,
                 act_order: bool = False, bias: bool = False, input_scale: bool = False,
                 dtype: torch.dtype | str = torch.float16):
        super().__init__(in_features, out_features, bits, group_size, bias=bias, dtype=dtype,
                         input_scale=input_scale)
        self.stat_bits, self.stat_group_size, self.nnz = stat_bits, stat_group_size, nnz
        n_groups = in_features // group_size if group_size > 0 else 1
        if stat_bits < 16:
            if out_features % stat_group_size:
                raise ValueError(f"stat_group_size {stat_group_size} does not divide "
                                 f"out_features {out_features}")
            # the parent's plain grid buffers are replaced by the quantized statistics
            self.register_buffer("scales", None)
            self.register_buffer("qzeros", None)
            words = packed_width(out_features * n_groups, stat_bits)
            shape2 = (2, out_features // stat_group_size, n_groups)
            for name in ("scale", "zero"):
                self.register_buffer(f"{name}_q", torch.zeros(words, dtype=torch.int32))
                self.register_buffer(f"{name}_stats", torch.zeros(shape2, dtype=torch.float16))
        idx_dtype = torch.int16 if in_features < 2 ** 15 else torch.int32
        self.register_buffer("perm", torch.arange(in_features, dtype=idx_dtype)
                             if act_order and group_size > 0 else None)
        # no outliers, no CSR arrays (not even the row pointers)
        self.register_buffer("outlier_rowptr", torch.zeros(out_features + 1, dtype=torch.int32)
                             if nnz else None)
        self.register_buffer("outlier_cols", torch.zeros(nnz, dtype=idx_dtype) if nnz else None)
        self.register_buffer("outlier_vals", torch.zeros(nnz, dtype=torch.float16)
                             if nnz else None)
        kw = self._init_kwargs
        kw.update(stat_bits=stat_bits, stat_group_size=stat_group_size, nnz=nnz,
                  act_order=act_order)

    @classmethod
    def from_result(cls, result: LayerResult, bias: torch.Tensor | None,
                    dtype: torch.dtype = torch.float16) -> "SpQRLinear":
        """Pack a SpQR :class:`LayerResult` (extras as written by kvant.algorithms.spqr)."""
        ex = result.extras
        known = {"stat_bits", "stat_group_size", "scale_q", "scale_stats", "zero_q",
                 "zero_stats", "perm", "outlier_mask", "outlier_vals", "input_scale"}
        unknown = set(ex) - known
        if unknown:
            raise NotImplementedError(f"SpQRLinear cannot store method extras {sorted(unknown)}")
        n, k = result.qweight.shape
        mask = ex["outlier_mask"].cpu()
        sb = ex["stat_bits"]
        m = cls(k, n, result.bits, result.group_size, stat_bits=sb,
                stat_group_size=ex["stat_group_size"], nnz=int(mask.sum()),
                act_order=ex.get("perm") is not None, bias=bias is not None,
                input_scale=ex.get("input_scale") is not None, dtype=dtype)
        if m.input_scale is not None:  # AWQ with an outlier budget, scale not foldable
            m.input_scale.copy_(ex["input_scale"].to(torch.float16).cpu())
        m.qweight.copy_(pack(result.qweight.cpu(), result.bits))
        if sb < 16:
            for name in ("scale", "zero"):
                getattr(m, f"{name}_q").copy_(pack(ex[f"{name}_q"].cpu().reshape(1, -1), sb)[0])
                getattr(m, f"{name}_stats").copy_(ex[f"{name}_stats"].cpu())
        else:
            m.scales.copy_(result.scales.to(torch.float16).cpu())
            m.qzeros.copy_(pack(result.zeros.round().to(torch.int32).cpu(), result.bits))
        if m.perm is not None:
            m.perm.copy_(ex["perm"].cpu().to(m.perm.dtype))
        if m.nnz:
            rowptr, cols, vals = to_csr(mask, ex["outlier_vals"].cpu(), m.outlier_cols.dtype)
            m.outlier_rowptr.copy_(rowptr)
            m.outlier_cols.copy_(cols)
            m.outlier_vals.copy_(vals)
        if bias is not None:
            m.bias.copy_(bias.detach().to(dtype).cpu())
        return m

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First-level scale and zero, float32 (N, G), as the dense part uses them."""
        n = self.out_features
        g = self.in_features // self.group_size if self.group_size > 0 else 1
        if self.stat_bits >= 16:
            z = unpack(self.qzeros, self.bits, g).float()
            return self.scales.float(), z
        s = dequantize_stats(unpack(self.scale_q[None], self.stat_bits, n * g)[0]
                             .reshape(n, g), self.scale_stats, positive=True)
        z = dequantize_stats(unpack(self.zero_q[None], self.stat_bits, n * g)[0]
                             .reshape(n, g), self.zero_stats)
        return s, z

    def group_index(self) -> torch.Tensor:
        """(K,) group of every input column (from ``perm`` under act-order)."""
        k, gs = self.in_features, self.group_size
        if gs <= 0:
            return torch.zeros(k, dtype=torch.long, device=self.qweight.device)
        j = torch.arange(k, device=self.qweight.device)
        if self.perm is None:
            return j // gs
        g_idx = torch.empty_like(j)
        g_idx[self.perm.long()] = j // gs
        return g_idx

    def dense_weight(self) -> torch.Tensor:
        """The dense part (N, K) float32: ``(q - z) * s`` without the outliers."""
        s, z = self.grid()
        idx = self.group_index()
        q = unpack(self.qweight, self.bits, self.in_features).float()
        return (q - z[:, idx]) * s[:, idx]

    def dequantized_weight(self) -> torch.Tensor:
        """The whole weight this layer multiplies by, dense part plus outliers, float32."""
        w = self.dense_weight()
        if self.outlier_vals is None:
            return w
        counts = (self.outlier_rowptr[1:] - self.outlier_rowptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=w.device), counts)
        w.index_put_((rows, self.outlier_cols.long()), self.outlier_vals.float(), accumulate=True)
        return w

    def reference_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Wᵀ`` (x already divided by input_scale): the dense dequantized matmul plus the
        CSR outlier product. ``forward`` (QuantLinear's) adds input_scale and bias."""
        y = torch.matmul(x, self.dense_weight().to(x.dtype).t())
        if self.outlier_vals is not None:
            y = y + csr_matmul(x, self.outlier_rowptr, self.outlier_cols,
                               self.outlier_vals, self.out_features)
        return y

    def kernel_source(self) -> tuple:
        """SpQR has no source for the W2/W3/W4 kernels' layout (QuantLinear._build_layout):
        its zero points are real numbers (second-level statistics) and its outliers a sparse
        matrix. Its own fused kernel reads :meth:`kernel_pack` (``kvant::spqr_linear``)."""
        raise NotImplementedError("SpQR layers are computed by their own kernel "
                                  "(kvant::spqr_linear, SpQRLinear.kernel_pack), not from "
                                  "the repacked QuantLinear layout")

    def _pack_key(self) -> tuple:
        return source_key(*(getattr(self, n, None) for n in PACK_SOURCES))

    def kernel_pack(self, device: torch.device | None = None) -> spk.SpQRPacked | None:
        """The weight in the fused kernel's layout on ``device`` (default: the stored
        tensors'), built on first use and kept (one device at a time, not in the state_dict)
        until a stored tensor is replaced, moved or edited; None where the kernel does not lay
        this weight out (kernels.spqr.supported)."""
        dev = _resolved(device if device is not None else self.qweight.device)
        key = (str(dev), self._pack_key())
        cached = self.__dict__.get("_kernel_pack")
        if cached is not None and cached[0] == key:
            return cached[1]
        src = {n: None if (t := getattr(self, n, None)) is None else t.to(dev)
               for n in PACK_SOURCES}
        try:
            p = spk.repack(src["qweight"], self.bits, self.group_size, self.in_features,
                           src["perm"], self.stat_bits, self.stat_group_size, src["scale_q"],
                           src["zero_q"], src["scale_stats"], src["zero_stats"],
                           src["scales"], src["qzeros"], src["outlier_rowptr"],
                           src["outlier_cols"], src["outlier_vals"])
        except NotImplementedError as e:
            log.info("SpQRLinear(%d->%d) stays on the reference: %s", self.in_features,
                     self.out_features, e)
            p = None
        self.__dict__["_kernel_pack"] = (key, p)
        return p

    def _prepare_on(self, dev: torch.device) -> bool:
        """No QuantLinear layout (kernel_source); on CUDA with the kernel available, the fused
        kernel's layout and split-K counters are built now, so that a CUDA-graph capture or a
        torch.compile trace finds them. Elsewhere the cached layout is dropped. Returns
        whether the kernel computes this layer's decode-size batches."""
        super()._prepare_on(dev)
        if self.kernel_options.gpu_kernels and spk.prepare(dev):
            return self.kernel_pack(dev) is not None
        self.__dict__.pop("_kernel_pack", None)
        return False

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Wᵀ`` (x already divided by input_scale): the fused kernel where it applies
        (module docstring), else :meth:`reference_product`. Under torch.compile or during a
        CUDA-graph capture the layout is not built or checked (prepare first: the layer then
        uses the layout it has); an unchecked kernel key runs the reference there."""
        if not (self.kernel_options.gpu_kernels and spk.kernel_applies(x)):
            return self.reference_product(x)
        cached = self.__dict__.get("_kernel_pack")
        if torch.compiler.is_compiling():  # cannot trace the staleness check
            p = cached[1] if cached is not None and cached[0][0] == str(x.device) else None
        elif x.is_cuda and torch.cuda.is_current_stream_capturing():  # cannot repack
            p = None
            if cached is not None and cached[0] == (str(x.device), self._pack_key()):
                p = cached[1]
            elif cached is not None:
                log.warning("SpQRLinear: stored tensors changed since prepare(); the "
                            "reference runs in this CUDA graph (prepare before capturing)")
        else:
            p = self.kernel_pack(x.device)
        if p is None:
            return self.reference_product(x)
        rows = x.numel() // x.shape[-1]
        key = ("spqr", self.bits, self.group_size, self.stat_bits, self.out_features,
               self.in_features, p.perm is not None, p.outliers is not None, x.dtype,
               str(x.device), rows <= spk.GEMV_MAX_M)  # the two forms of the kernel

        def kernel():
            return spk.apply(x, p, self.kernel_options.autotune)

        if selfcheck.trusted(key, kernel, lambda: self.reference_product(x), KERNEL_RTOL):
            return kernel()
        return self.reference_product(x)

    def bits_breakdown(self) -> dict[str, float]:
        """Bits per weight of each part: dense, statistics, permutation, outliers."""
        per = 8 / (self.in_features * self.out_features)
        nbytes = {name: t.numel() * t.element_size() for name, t in self.state_dict().items()}
        stats = ("scale_q", "zero_q", "scale_stats", "zero_stats", "scales", "qzeros",
                 "input_scale")
        outl = ("outlier_rowptr", "outlier_cols", "outlier_vals")
        return {"dense": per * nbytes["qweight"],
                "stats": per * sum(nbytes.get(n, 0) for n in stats),
                "perm": per * nbytes.get("perm", 0),
                "outliers": per * sum(nbytes.get(n, 0) for n in outl)}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, stat_bits={self.stat_bits}, "
                f"stat_group_size={self.stat_group_size}, nnz={self.nnz}, "
                f"act_order={self.perm is not None}")
