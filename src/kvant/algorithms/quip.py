"""QuIP: incoherence processing with randomized Hadamard transforms, then adaptive rounding.

Chee et al., "QuIP: 2-Bit Quantization of Large Language Models With Guarantees" (2023):
multiply the weight W (N, K) and its proxy Hessian H (K, K) by random orthogonal matrices,

    W̃ = U W Vᵀ,    H̃ = V H Vᵀ,

so that no entry of W̃ and no direction of H̃ stands out ("incoherence": a few huge weights or
input channels are spread evenly over all of them), round W̃ with LDLQ — which is GPTQ's
column-by-column update with the Cholesky factor of H̃⁻¹ (QuIP, Theorem 6) — and undo the
rotation at inference: ``y = Uᵀ Q(W̃) V x``. The proxy loss tr((Ŵ - W) H (Ŵ - W)ᵀ) is
unchanged by the rotation, so what LDLQ minimises in the rotated basis is the original loss.
U and V are QuIP#'s randomized Hadamard transforms (Tseng et al., 2024; core/hadamard.py):
O(n log n) and defined by their sign vectors, seeded here by the config seed and the layer name.
Layers that read the same input (q/k/v, gate/up: the engine's sequential groups) share one V,
so at inference the input is rotated once for all of them (QuipLinear memoises it) — what
QuIP# gets from fusing those layers; the rotation does not need to differ between them.

Optional first step (QuIP's Algorithm 1): the diagonal rescaling ``W ← W D``,
``H ← D⁻¹ H D⁻¹`` with ``D = (diag(H) / diag(WᵀW))^(1/4)``, which lowers the bound
tr(H)·‖W‖² on the proxy loss; D is stored as the layer's ``input_scale``.

Rotation is independent of the rounding: ``rounding="rtn"`` gives rotation + round-to-nearest
(no calibration needed unless rescaling), ``rounding="ldlq"`` rotation + GPTQ. The GPTQ update
itself is :func:`kvant.algorithms.gptq.gptq_quantize`, reused, not repeated.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from kvant.algorithms.base import HessianLayer, LayerQuantizer, QuantMethod, block_relative
from kvant.algorithms.gptq import gptq_quantize
from kvant.algorithms.registry import register
from kvant.config import QuIPConfig
from kvant.core.grid import rtn
from kvant.core.hadamard import RandomizedHadamard
from kvant.core.hessian import HessianAccumulator, SharedGram, zero_dead
from kvant.core.result import LayerResult
import kvant.nn.quip_linear  # noqa: F401  (registers the "quip" layer kind)

log = logging.getLogger(__name__)

# D below this fraction of its mean is clamped: it divides activations at inference
MIN_RESCALE = 1e-3


def layer_seed(seed: int, layer: str, side: str) -> int:
    """A 63-bit seed for one transform of one layer, stable across runs and machines
    (Python's ``hash`` is salted per process, so a digest is used)."""
    digest = hashlib.sha256(f"kvant-quip/{seed}/{layer}/{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def transforms_for(layer: str, n: int, k: int, seed: int, input_key: str | None = None):
    """(U, V): the output-side (size n) and input-side (size k) transforms of ``layer``.

    ``input_key`` names the input V belongs to (the first layer of a group reading the same
    tensor); default: the layer itself.
    """
    return (RandomizedHadamard(n, layer_seed(seed, layer, "out")),
            RandomizedHadamard(k, layer_seed(seed, input_key or layer, "in")))


def rotate_weight(W: torch.Tensor, U: RandomizedHadamard, V: RandomizedHadamard) -> torch.Tensor:
    """``U W Vᵀ`` for W (N, K): V on every row, then U on every column."""
    return U.forward(V.forward(W).t()).t()


def rotate_hessian(H: torch.Tensor, V: RandomizedHadamard) -> torch.Tensor:
    """``V H Vᵀ`` for a symmetric H (K, K), symmetrised against round-off."""
    Hr = V.forward(V.forward(H).t()).t()
    return (Hr + Hr.t()) / 2


def incoherence(W: torch.Tensor) -> float:
    """QuIP's μ of a weight: ``max |W_ij| · sqrt(N·K) / ‖W‖_F`` (1 = perfectly flat)."""
    return float(W.abs().max() * W.numel() ** 0.5 / W.norm().clamp(min=1e-30))


def rescale_factor(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """QuIP's D = (diag(H) / diag(WᵀW))^(1/4) (K,), normalised to mean 1 and rounded to
    float16 (what the checkpoint stores, so quantization sees the stored value)."""
    d = (H.diagonal().clamp(min=1e-8) / (W * W).sum(0).clamp(min=1e-8)).pow(0.25)
    d = (d / d.mean()).clamp(min=MIN_RESCALE)
    return d.to(torch.float16).to(torch.float32)


class _QuIPLayer(HessianLayer):
    def __init__(self, method: "QuIP", name: str, weight: torch.Tensor, input_key: str):
        self.method, self.name, self.weight = method, name, weight
        self.config, self.input_key = method.config_for(name), input_key
        self.acc = (HessianAccumulator.for_config(weight.shape[1], weight.device, self.config)
                    if method.needs_calibration else None)
        self.grams = method.grams  # layers reading the same x share one xᵀx

    def quantize(self) -> LayerResult:
        cfg = self.config
        W = self.weight.float().clone()
        n, k = W.shape
        H = None
        self.grams.release()
        if self.acc is not None:
            H = self.acc.result(self.name).float().clone()
            self.acc = None  # free the accumulator before the walk
            zero_dead(H, W)  # inputs that are always 0: drop their weights
        extras: dict = {}
        mu_before = incoherence(W)
        if cfg.rescale:
            D = rescale_factor(W, H)
            W = W * D
            H = H / D[:, None] / D[None, :]
            extras["input_scale"] = D.cpu()
        U, V = transforms_for(self.name, n, k, cfg.seed, self.input_key)
        Wr = rotate_weight(W, U, V)
        if cfg.rounding == "ldlq":
            res = gptq_quantize(Wr, rotate_hessian(H, V), cfg.qargs, block_size=cfg.block_size,
                                damp_percent=cfg.damp_percent, act_order=cfg.act_order,
                                layer=self.name)
        else:
            q, p = rtn(Wr, cfg.qargs, self.name)
            s, z = p.expand(k)
            loss = float(((Wr - (q.float() - z) * s) ** 2).sum())
            res = LayerResult(q, p.scales, p.zeros, cfg.bits, p.group_size, loss=loss)
        extras.update(sign_in=V.signs, sign_out=U.signs)
        if V.kind == "random":
            extras["factor_in"] = V.factor
        if U.kind == "random":
            extras["factor_out"] = U.factor
        res.extras.update(extras)
        res.layer_kind = "quip"
        res.info.update(mu_before=mu_before, mu_after=incoherence(Wr))
        return res


@register(QuIPConfig)
class QuIP(QuantMethod):
    """QuIP with randomized Hadamard incoherence; rounding by LDLQ (= GPTQ) or RTN."""

    needs_calibration = True
    supports_distributed = True  # its layers reduce one Hessian each

    def __init__(self, config: QuIPConfig):
        super().__init__(config)
        self.grams = SharedGram()
        self._input_of: dict[str, str] = {}  # layer (block-relative) -> first of its group

    @classmethod
    def calibrates(cls, config: QuIPConfig) -> bool:
        """LDLQ needs the Hessian; rotation + RTN needs data only to rescale."""
        return config.rounding == "ldlq" or config.rescale

    def prepare_block(self, block, linears, groups, block_inputs, run_block) -> dict:
        """Record which layers read the same input: they will share one V."""
        self._input_of = {name: group[0] for group in groups for name in group}
        return {}

    def _input_key(self, name: str) -> str:
        rel = block_relative(name, self._input_of)  # name = block prefix + rel
        if rel is None:
            return name
        return name[: len(name) - len(rel)] + self._input_of[rel]

    def layer_quantizer(self, name: str, weight: torch.Tensor) -> LayerQuantizer:
        return _QuIPLayer(self, name, weight, self._input_key(name))
