"""QuipLinear: a packed QuantLinear whose weight lives in a randomly rotated basis.

QuIP stores ``Q(W̃)`` with ``W̃ = U W Vᵀ`` (U on the N outputs, V on the K inputs, both
randomized Hadamard transforms, kvant.core.hadamard) and computes

    y = Uᵀ · Q(W̃) · V · (x / input_scale) + bias,

which is the fake-quantized float computation ``x @ (Uᵀ Q(W̃) V)ᵀ`` done in three cheap steps
(the transforms cost O(n log n); a fused kernel is future work). The middle product goes
through the same dispatch as every QuantLinear (``QuantLinear._product``: the GPU kernels
once the layer is prepared for a CUDA device, else the reference).

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

from kvant.core.hadamard import RandomizedHadamard, pack_signs, split_size, unpack_signs
from kvant.core.result import LayerResult, register_kind
from kvant.kernels import ops
from kvant.nn.memo import input_key, same_input
from kvant.nn.qlinear import QuantLinear


@register_kind
class QuipLinear(QuantLinear):
    """QuantLinear in the rotated basis of QuIP; forward ``Uᵀ Q(W̃) V x`` (+ bias)."""

    kind = "quip"
    # (input key of x, digest of V, V x): see the module docstring
    _last_input: tuple | None = None

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
            digest = hashlib.sha1(str(self.in_features).encode())
            digest.update(self.sign_in.cpu().numpy().tobytes())
            if self.factor_in is not None:
                digest.update(self.factor_in.cpu().numpy().tobytes())
            self._vkey = digest.digest()
        return self._transforms[1], self._transforms[2]

    def _rotated_input(self, x: torch.Tensor, v: RandomizedHadamard) -> torch.Tensor:
        """``V (x / input_scale)``, reusing the previous layer's result for the same x and V."""
        if self.input_scale is not None:  # per-layer D: nothing to share
            return v.forward(x / self.input_scale.to(x.dtype))
        if torch.compiler.is_compiling():
            return v.forward(x)
        memo = QuipLinear._last_input
        if memo is not None and same_input(memo[0], x) and memo[1] == self._vkey:
            return memo[2]
        xr = v.forward(x)
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
        y = u.inverse(self._product(self._rotated_input(x, v)))  # kernels or reference
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + ", rotated=True"
