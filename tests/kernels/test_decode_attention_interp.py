"""The split-KV decode attention kernel (kernels/triton/decode_attention.py) on the CPU through
Triton's interpreter (skipped without Triton), against SDPA over repeated key/value heads in
float32: boolean prefix masks (batch-expanded with stride 0, as the static decoder's), an
additive mask, no mask; one and several query positions; splits that end inside a BT tile, a
split whose keys are all masked, the output written in the model's (B, q, H, D) layout. fp16:
the interpreter's bf16 ``tl.dot`` is not exact enough to say anything (the GPU test checks
bf16). interp_patch: Triton 3.6's interpreter and numpy >= 2.4 (a loop bound)."""

from pathlib import Path

import pytest

from interp_patch import PATCH, run_cases

pytest.importorskip("triton")

SRC = Path(__file__).parents[2] / "src"
SCRIPT = PATCH + r"""
import json, torch
import torch.nn.functional as F
from kvant.kernels.triton import decode_attention as kd

res = []
g = torch.Generator().manual_seed(0)
for (b, hkv, grp, q_len, t, d, mask_kind, splits, valid) in CASES:
    qh = torch.randn(b, hkv * grp, q_len, d, generator=g)
    k, v = (torch.randn(b, hkv, t, d, generator=g) for _ in range(2))
    mask = None
    if mask_kind == "bool":  # each row's prefix of `valid` keys (+ its position), shared rows
        pos = torch.tensor(valid).view(-1, 1, 1, 1) + torch.arange(q_len).view(1, 1, q_len, 1)
        mask = (torch.arange(t).view(1, 1, 1, t) <= pos)
        if mask.shape[0] == 1:
            mask = mask.expand(b, 1, q_len, t)  # stride 0 over the batch
    elif mask_kind == "float":
        mask = torch.randn(b, 1, q_len, t, generator=g) * 2
    scale = 0.7 / d ** 0.5
    kr, vr = k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1)
    ref = F.scaled_dot_product_attention(qh, kr, vr, attn_mask=mask, scale=scale)
    ref = ref.transpose(1, 2)  # (B, q, H, D)
    qg = qh.half().reshape(b, hkv, grp * q_len, d)
    out = kd.launch(qg, k.half(), v.half(), mask, scale, q_len, splits=splits)
    res.append(dict(shape=list(out.shape), dtype=str(out.dtype),
                    err=(out.float() - ref).abs().max().item(),
                    scale=ref.abs().max().item(), nan=bool(out.isnan().any())))
print(json.dumps(res))
"""


def _run(cases):
    return run_cases(SCRIPT, cases, SRC)


def test_split_kv_kernel_matches_sdpa_in_the_interpreter():
    # (B, H_kv, G, q, T, D, mask, splits (None: planned), valid prefix per batch row)
    cases = [(1, 2, 4, 1, 100, 32, "bool", None, [40]),      # planned: 2 splits, 36-key tail
             (2, 2, 4, 1, 200, 16, "bool", 3, [10, 150]),    # row 0: splits 2, 3 all masked
             (2, 1, 3, 2, 200, 16, "float", 3, None),        # two positions, additive mask
             (1, 4, 8, 1, 130, 64, None, 1, None),           # 32 rows, no mask, one split
             (1, 1, 5, 3, 64, 32, "bool", 2, [60])]          # 15 rows, one tile, one split
    for case, r in zip(cases, _run(cases)):
        b, hkv, grp, q_len, t, d = case[:6]
        assert r["shape"] == [b, q_len, hkv * grp, d] and r["dtype"] == "torch.float16", case
        assert not r["nan"], case
        # fp16 inputs and output against a float32 reference: a few fp16 ulps of the output
        assert r["err"] < 4e-3 * max(1.0, r["scale"]), (case, r)
