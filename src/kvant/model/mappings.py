"""Data-only exceptions to kvant's generic model handling (no code paths per model).

Everything here is a fact about a family of modules that the generic machinery cannot see
from the forward pass alone. Each entry says why it exists.
"""

from __future__ import annotations

# Norm classes whose output is ``normalize(x) * (offset + weight)`` rather than
# ``normalize(x) * weight``: folding a per-channel factor f into them means
# ``weight <- (offset + weight) * f - offset``. (Gemma stores its RMSNorm weight minus one.)
NORM_WEIGHT_OFFSET: dict[str, float] = {
    "GemmaRMSNorm": 1.0,
    "Gemma2RMSNorm": 1.0,
    "Gemma3RMSNorm": 1.0,
    "Qwen3NextRMSNorm": 1.0,
}

# Linear layers whose AWQ clipping search is skipped, matched on the last name component.
# Their output feeds the attention scores q·k, where the softmax makes the per-layer output
# error a poor proxy (AutoAWQ skips them for the same reason).
AWQ_NO_CLIP: tuple[str, ...] = (
    "q_proj", "k_proj", "query", "key", "qkv_proj", "Wqkv", "c_attn", "query_key_value",
)


def norm_weight_offset(module) -> float:
    """The weight offset of a norm module's class (0.0 for an ordinary norm)."""
    return NORM_WEIGHT_OFFSET.get(type(module).__name__, 0.0)


def awq_skips_clip(name: str) -> bool:
    """True when the Linear at dotted ``name`` is excluded from AWQ's clipping search."""
    return name.rsplit(".", 1)[-1] in AWQ_NO_CLIP
