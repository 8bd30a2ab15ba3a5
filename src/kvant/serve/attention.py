"""Grouped-query attention that never repeats the key/value heads.

With G = heads / kv_heads query heads per key/value head, transformers' SDPA path repeats
every cached key and value G times whenever it is given a mask and runs under
``torch.compile`` (``repeat_kv``): for a Llama-3-70B block at batch 1 and a 2048-token cache
that is 64 MB written and read again per block, every decode step, where the cache itself
is 8 MB. Here the G query heads of a group become G·q query rows of that group's one
key/value head instead, so the cache is read once:

    query (B, H, q, D) -> (B, H_kv, G·q, D)        row g·q + i  = head h_kv·G + g, position i
    mask  (B, 1, q, T) -> (B, 1, G·q, T)            the same rows of the mask for every g
    SDPA over H_kv heads -> (B, H_kv, G·q, D) -> (B, H, q, D)

Query head h attends to key/value head h // G, as transformers' ``repeat_kv`` pairs them.
The result equals SDPA on repeated heads up to float rounding (tests/serve). On CUDA a
decode step's few rows a head go to kvant's split-KV kernel (kvant.kernels.attention: SDPA's
kernels run one program per head, most of an H200 idle at batch 1); everything else, and every
other device, runs SDPA over the folded rows. Used by
:class:`kvant.serve.StaticDecoder` for its decode steps; registered in transformers'
``AttentionInterface`` as :data:`NAME`.
"""

from __future__ import annotations

import torch

from kvant.kernels import attention as kattn

NAME = "kvant_grouped"


def grouped_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, q, D), key and value
    (B, H_kv, T, D), mask boolean (True: attend) or additive, (B or 1, 1, q, T) or None.
    Returns (output (B, q, H, D), None)."""
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError(f"{NAME} attention supports neither softcap nor sliding windows")
    b, h, q, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} key/value heads")
    g = h // hkv
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if attention_mask is None and causal and q > 1:
        # the fold below breaks SDPA's own is_causal, so spell the causal mask out: query i
        # sits at position t - q + i
        i = torch.arange(q, device=query.device).view(q, 1)
        attention_mask = (torch.arange(t, device=query.device) <= i + (t - q)).view(1, 1, q, t)
    if attention_mask is not None and attention_mask.shape[1] != 1:
        raise ValueError(f"{NAME} attention needs a mask shared by all heads (dim 1 of size "
                         f"1), got {tuple(attention_mask.shape)}")
    qg = query.reshape(b, hkv, g * q, d)  # heads h_kv·G .. h_kv·G + G - 1 are consecutive
    mask = attention_mask[..., :t] if attention_mask is not None else None
    scale = scaling if scaling is not None else d ** -0.5
    p = dropout if module.training else 0.0
    if p == 0.0 and kattn.applies(qg, key, value, mask, q):  # decode steps on CUDA: split-KV
        return kattn.gqa_decode(qg, key, value, mask, scale, q), None
    return kattn.reference(qg, key, value, mask, scale, q, dropout=p), None


def register() -> str | None:
    """Register :func:`grouped_attention` with transformers (idempotent); returns its name,
    or None for a transformers without an attention registry (the model's own is kept)."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return None
    AttentionInterface.register(NAME, grouped_attention)
    kattn.ensure_kernel()  # here, not while torch.compile traces a step
    return NAME


def set_attention(model: torch.nn.Module, name: str | None) -> None:
    """Set the attention implementation ``model``'s blocks look up on every call (its
    config's ``_attn_implementation``); None leaves the model as it is."""
    cfg = getattr(model, "config", None)
    if name is not None and getattr(cfg, "_attn_implementation", None) not in (None, name):
        cfg._attn_implementation = name
