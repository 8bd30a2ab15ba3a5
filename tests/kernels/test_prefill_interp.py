"""The prefill kernels' indexing on the CPU, through Triton's interpreter (skipped without
Triton). The inline-PTX unpacking cannot run there, so these run the pure-Triton path
(``asm=False``) against the stored-layout reference; test_prefill_gpu.py checks on a GPU
that both paths are bit-identical. fp16 only: the interpreter's bf16 ``tl.dot`` is wrong
(values ~1e10 on a plain bf16 dot), so bf16 is checked on the GPU."""

from pathlib import Path

import pytest

from interp_patch import PATCH, run_cases

pytest.importorskip("triton")

SRC = Path(__file__).parents[2] / "src"
SCRIPT = PATCH + r"""
import json, torch
from kvant.formats.packing import pack
from kvant.kernels import ops
from kvant.kernels.triton import repack as rp, prefill as pf
torch.manual_seed(0)
res = []
for kd, n, k, gs, act, m, bn, bm, split in CASES:
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    groups = k // gs if gs > 0 else 1
    s = (torch.rand(n, groups) * 0.02 + 0.001).half()
    z = torch.randint(0, 16, (n, groups), dtype=torch.int32)
    g_idx = (torch.randperm(k) // gs).int() if act else None
    qw, qz = pack(q, 4), pack(z, 4)
    p = rp.repack(qw, s, qz, g_idx, 4, gs, k)
    w = ops.dequantize_weight(qw, s, qz, g_idx, 4, gs, k)
    x = torch.randn(m, k).half()
    out = torch.full((m, n), float("nan")).half()
    cnt = torch.zeros(256, dtype=torch.int32)
    pf.launch_mma(x, p, bn, bm, split, 4, 3, out, cnt, kd=kd, asm=False)
    ref = x.double() @ w.double().t()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    wd = pf.dequantize_pairs(p, torch.float16, bn=16, asm=False)[:, :k]
    if p.perm is not None:
        wd = torch.empty_like(wd).index_copy_(1, p.perm.long(), wd)
    res.append(dict(err=err, nan=bool(out.isnan().any()), deq_equal=torch.equal(wd, w),
                    counters=int(cnt.abs().sum())))
print(json.dumps(res))
"""


def _run(cases):
    return run_cases(SCRIPT, cases, SRC)


def test_mma_and_dequant_match_the_reference_in_the_interpreter():
    # (kd, N, K, group, act-order, M, BN, BM, split): partial row and column tiles, K not a
    # whole number of chunks (384 = 3 chunks, 320 padded), group sizes 128/64/32/per
    # channel, act-order, split-K with the last-program reduction
    cases = [(128, 40, 384, 128, False, 20, 32, 16, 1),
             (128, 40, 384, 64, True, 33, 32, 32, 2),
             (32, 24, 320, 32, False, 17, 16, 16, 3),
             (32, 24, 256, -1, False, 5, 16, 16, 2)]
    for case, r in zip(cases, _run(cases)):
        assert not r["nan"], case
        assert r["err"] < 2e-3, (case, r)
        assert r["deq_equal"], case  # fp16: exactly the reference's weight
        assert r["counters"] == 0, case  # split-K counters reset for the next launch
