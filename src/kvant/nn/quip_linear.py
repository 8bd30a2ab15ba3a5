"""QuipLinear: a packed QuantLinear whose weight lives in a randomly rotated basis.

QuIP stores ``Q(W̃)`` with ``W̃ = U W Vᵀ`` (U on the N outputs, V on the K inputs, both
randomized Hadamard transforms, kvant.core.hadamard) and computes

    y = Uᵀ · Q(W̃) · V · (x / input_scale) + bias,

which is the fake-quantized float computation ``x @ (Uᵀ Q(W̃) V)ᵀ`` done in three cheap steps
(the transforms cost O(n log n)). The middle product goes through the same dispatch as every
QuantLinear (``QuantLinear._product``: the GPU kernels once the layer is prepared for a CUDA
device, else the reference). Each transform is one Triton launch (``kvant::rht``,
kernels/hadamard.py) for fp16/bf16 decode batches (<= 16 rows) on CUDA where its geometry
applies and ``transform_kernel`` and KernelOptions.gpu_kernels are on; otherwise the
reference RandomizedHadamard (CPU, fp32, larger batches, sizes the kernel does not lay out).

Buffers beyond :class:`kvant.nn.qlinear.QuantLinear`'s (names are the checkpoint contract):
- ``sign_in`` uint8 (ceil(K/8),), ``sign_out`` uint8 (ceil(N/8),): the random signs of V and
  U, packed 8 per byte (bit i%8 of byte i//8 set = sign -1; core.hadamard.pack_signs);
- ``factor_in`` float32 (m, m) / ``factor_out``: the seeded random orthogonal factor of V / U,
  only for sizes whose odd part has no Hadamard construction (e.g. K = 11008 = 256·43); for
  the other sizes the factor is a fixed Hadamard matrix rebuilt from its order;
- ``input_scale`` float16 (K,): QuIP's diagonal rescaling D, when used (x is divided by it).
``init_kwargs`` records the dense factor orders ``m_in``/``m_out`` so that a checkpoint never
loads into a different factorisation.

Layers that read the same input with the same V (QuIP gives q/k/v, gate/up one V) rotate it
once: the last rotated input is memoised (weakly keyed by the input tensor, its version
counter and a digest of V), so the second and later layers reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from kvant.core.hadamard import (RandomizedHadamard, hadamard_matrix, pack_signs, split_size,
                                 unpack_signs)
from kvant.core.result import LayerResult, register_kind
from kvant.kernels import hadamard as rht
from kvant.kernels import ops
from kvant.kernels import selfcheck
from kvant.nn.memo import input_key, same_input
from kvant.nn.qlinear import QuantLinear

# the transform kernel's relative error against the float32 reference rounded to the input
# dtype: about one ulp (tests/kernels); a wrong permutation or factor is off by order 1
TRANSFORM_RTOL = 2e-2


def kernel_plan(t: RandomizedHadamard, device: torch.device | str) -> rht.SidePlan | None:
    """``t`` ready for the one-launch transform kernel on ``device`` (kernels/hadamard.py),
    or None where the kernel does not lay out its size or does not run there."""
    geo = rht.geometry(t.n, t.p, t.m, t.kind, t.factors[0].shape[0] if t.factors else 1,
                       len(t.factors))
    if geo is None:
        return None
    factor = hadamard_matrix(t.m) if t.kind == "hadamard" else t.factor  # None: no factor
    return rht.plan(geo, pack_signs(t.signs), factor, device)


@register_kind
class QuipLinear(QuantLinear):
    """QuantLinear in the rotated basis of QuIP; forward ``Uᵀ Q(W̃) V x`` (+ bias)."""

    kind = "quip"
    # (input key of x, digest of V, V x): see the module docstring
    _last_input: tuple | None = None
    # the one-launch transform kernel where it applies (module docstring); False keeps the
    # reference transforms on every device (to compare numerics or time the two)
    transform_kernel: bool = True

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, *,
                 m_in: int | None = None, m_out: int | None = None, **kwargs):
        super().__init__(in_features, out_features, bits, group_size, **kwargs)
        for side, n, m in (("in", in_features, m_in), ("out", out_features, m_out)):
            _, m_now, kind = split_size(n)
            if m is not None and m != m_now:
                raise NotImplementedError(
                    f"checkpoint rotates size {n} with a dense factor of order {m}, this kvant "
                    f"builds order {m_now}; it cannot load this layer")
            self.register_buffer(f"sign_{side}", torch.zeros((n + 7) // 8, dtype=torch.uint8))
            self.register_buffer(f"factor_{side}", torch.eye(m_now, dtype=torch.float32)
                                 if kind == "random" else None)
            self._init_kwargs[f"m_{side}"] = m_now
        self._transforms: tuple | None = None
        self._plans: dict = {}  # device -> (plan of V, plan of U) for kvant::rht
        self._vkey = b""

    @classmethod
    def from_result(cls, result: LayerResult, bias: torch.Tensor | None,
                    dtype: torch.dtype = torch.float16) -> "QuipLinear":
        """Pack a QuIP :class:`LayerResult`; extras ``sign_in`` (K,), ``sign_out`` (N,) ±1,
        optional ``factor_in``/``factor_out`` (m, m) and ``input_scale`` (K,)."""
        extras = dict(result.extras)
        try:
            signs = {s: extras.pop(f"sign_{s}") for s in ("in", "out")}
        except KeyError as e:
            raise ValueError(f"a QuIP LayerResult needs extras 'sign_in' and 'sign_out'; "
                             f"missing {e}") from None
        factors = {s: extras.pop(f"factor_{s}", None) for s in ("in", "out")}
        base = dataclasses.replace(result, extras=extras, layer_kind="quant")
        m = super().from_result(base, bias, dtype)
        for s in ("in", "out"):
            getattr(m, f"sign_{s}").copy_(pack_signs(signs[s].cpu()))
            buf = getattr(m, f"factor_{s}")
            if (buf is None) != (factors[s] is None):
                raise ValueError(f"factor_{s}: the layer {'needs' if buf is not None else 'has'}"
                                 f" a random orthogonal factor but the result "
                                 f"{'has none' if buf is not None else 'carries one'}")
            if buf is not None:
                buf.copy_(factors[s].to(torch.float32).cpu())
        return m

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) must not round the random orthogonal factors: the rotation used
        # at inference has to be the one the weight was quantized in. Keep them float32.
        keep = {n: t for n in ("factor_in", "factor_out")
                if (t := self._buffers.get(n)) is not None}
        super()._apply(fn, recurse)
        for name, t in keep.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:
                self._buffers[name] = t.to(moved.device)
        return self

    def _key(self) -> tuple:
        # rebuild the transforms when a buffer is replaced, moved or written in place
        return tuple((t.data_ptr(), t._version, t.device) if t is not None else None
                     for t in (self.sign_in, self.sign_out, self.factor_in, self.factor_out))

    def transforms(self) -> tuple[RandomizedHadamard, RandomizedHadamard]:
        """(V, U): the input-side and output-side transforms, built from the buffers."""
        key = self._key()
        if self._transforms is None or self._transforms[0] != key:
            v = RandomizedHadamard(self.in_features, signs=unpack_signs(
                self.sign_in.cpu(), self.in_features), factor=self.factor_in)
            u = RandomizedHadamard(self.out_features, signs=unpack_signs(
                self.sign_out.cpu(), self.out_features), factor=self.factor_out)
            self._transforms = (key, v, u)
            self._plans = {}
            digest = hashlib.sha1(str(self.in_features).encode())
            digest.update(self.sign_in.cpu().numpy().tobytes())
            if self.factor_in is not None:
                digest.update(self.factor_in.cpu().numpy().tobytes())
            self._vkey = digest.digest()
        return self._transforms[1], self._transforms[2]

    def transform_plans(self, device: torch.device) -> tuple:
        """(plan of V, plan of U) for the transform kernel on ``device``, (None, None) where
        it does not run: not CUDA, Triton missing, sizes it does not lay out. Built on the
        first call on a device (host-to-device copies: before any CUDA-graph capture, as the
        warm-up calls do) and kept until the transforms change."""
        if device not in self._plans:
            v, u = self.transforms()
            self._plans[device] = ((kernel_plan(v, device), kernel_plan(u, device))
                                   if device.type == "cuda" else (None, None))
        return self._plans[device]

    def _transform(self, x: torch.Tensor, t: RandomizedHadamard, side: int,
                   inverse: bool) -> torch.Tensor:
        """``V x`` (side 0) or ``Uᵀ x`` (side 1, inverse): the one-launch kernel where it
        applies, else the reference (CPU, fp32, more than rht.MAX_ROWS rows, sizes the
        kernel does not lay out, or the kernel switched off)."""
        # under torch.compile the reference: the plans (a dict by device, built with host
        # copies on first use) are not traced, and the op was not run compiled yet
        if (x.is_cuda and self.transform_kernel and self.kernel_options.gpu_kernels
                and not torch.compiler.is_compiling()):
            p = self.transform_plans(x.device)[side]
            # trusted once it matched the reference on this device (kvant.kernels.selfcheck)
            key = ("rht", t.n, side, inverse, x.dtype, str(x.device))
            if rht.applies(p, x) and selfcheck.trusted(
                    key, lambda: rht.apply(p, x, inverse),
                    lambda: (t.inverse(x) if inverse else t.forward(x)).to(x.dtype),
                    TRANSFORM_RTOL):
                return rht.apply(p, x, inverse)
        return t.inverse(x) if inverse else t.forward(x)

    def _rotated_input(self, x: torch.Tensor, v: RandomizedHadamard) -> torch.Tensor:
        """``V (x / input_scale)``, reusing the previous layer's result for the same x and V."""
        if self.input_scale is not None:  # per-layer D: nothing to share
            return self._transform(x / self.input_scale.to(x.dtype), v, 0, False)
        if torch.compiler.is_compiling():
            return v.forward(x)
        memo = QuipLinear._last_input
        if memo is not None and same_input(memo[0], x) and memo[1] == self._vkey:
            return memo[2]
        xr = self._transform(x, v, 0, False)
        QuipLinear._last_input = (input_key(x), self._vkey, xr)
        return xr

    def rotated_weight(self) -> torch.Tensor:
        """The stored grid values ``Q(W̃)`` (N, K) in the rotated basis, float32."""
        return ops.dequantize_weight(self.qweight, self.scales, self.qzeros, self.g_idx,
                                     self.bits, self.group_size, self.in_features).float()

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 (N, K) weight ``Uᵀ Q(W̃) V`` in the original basis (input_scale not
        applied), so that ``forward(x) = (x / input_scale) @ dequantized_weight()ᵀ``."""
        v, u = self.transforms()
        w = v.inverse(self.rotated_weight())  # rows: Q(W̃) V
        return u.inverse(w.t()).t()  # columns: Uᵀ (Q(W̃) V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype; the transforms compute in float32."""
        v, u = self.transforms()
        y = self._transform(self._product(self._rotated_input(x, v)), u, 1, True)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + ", rotated=True"
