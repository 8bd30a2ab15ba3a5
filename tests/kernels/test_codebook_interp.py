"""The E8P kernel's indexing and decoding on the CPU, through Triton's interpreter (skipped
without Triton): every product form (CUDA cores, x @ Wᵀ, (W @ xᵀ)ᵀ), every unpacking, both
sign paths, 2/3/4 bits, row and layer scales, N and K tails, split-K, 1-16 rows, against
the pure-torch decode. fp16 for the tensor-core forms, whose bf16 ``tl.dot`` the interpreter
gets wrong (values ~1e10); bf16 on the CUDA-core form here, everywhere on the GPU
(test_codebook_gpu.py).

Triton 3.6's interpreter takes ``int()`` of one-element arrays, which numpy >= 2.4 refuses
for a loop bound; the script patches that one conversion (the kernel is unchanged)."""

from pathlib import Path

import pytest

from interp_patch import PATCH, run_cases

pytest.importorskip("triton")

SRC = Path(__file__).parents[2] / "src"
SCRIPT = PATCH + r"""
import json, torch
from kvant.core.e8p_words import kernel_tables
from kvant.kernels import codebook as cb
from kvant.kernels.triton import e8p
tables = kernel_tables()
torch.manual_seed(0)
res = []
for bits, n, kb, m, dt, layer, dot, st, unpack, bn, bkb, split in CASES:
    dtype = getattr(torch, dt)
    q1 = torch.randint(-32768, 32768, (n, kb), dtype=torch.int16)
    q2 = {2: None, 3: torch.randint(0, 256, (n, kb), dtype=torch.uint8),
          4: torch.randint(-32768, 32768, (n, kb), dtype=torch.int16)}[bits]
    s = (torch.rand(1 if bits == 2 else 2, 1 if layer else n) * 0.02 + 0.001).half()
    x = torch.randn(m, 8 * kb).to(dtype)
    ref = x.double() @ cb.decoded_weight(q1, q2, s, tables, bits).double().t()
    out = torch.full((m, n), float("nan"), dtype=dtype)
    cfg = e8p.Config(dot=dot, bn=bn, bkb=bkb, split=split, sign_table=st, unpack=unpack)
    e8p.launch(x, q1, q2, s, tables, bits, cfg, out=out)
    cnt = e8p._COUNTERS.get(("cpu", None))
    res.append(dict(err=((out.double() - ref).norm() / ref.norm()).item(),
                    nan=bool(out.isnan().any()),
                    counters=int(cnt.abs().sum()) if cnt is not None else 0))
print(json.dumps(res))
"""
BOUND = {"float16": 2e-3, "bfloat16": 1e-2}


def _run(cases):
    return run_cases(SCRIPT, cases, SRC)


def test_e8p_kernel_matches_the_reference_in_the_interpreter():
    # (bits, N, K/8, M, dtype, layer scale, dot, sign table, unpack, BN, BKB, split):
    # N not a multiple of BN, K/8 not a multiple of BKB (masked iterations), uneven splits
    cases = [(2, 40, 20, 1, "float16", False, 0, True, 0, 16, 8, 1),
             (2, 40, 20, 1, "float16", False, 0, False, 1, 16, 8, 2),
             (3, 33, 20, 2, "bfloat16", True, 0, False, 0, 16, 8, 2),
             (4, 33, 24, 1, "bfloat16", False, 0, True, 2, 32, 8, 3),
             (2, 40, 40, 3, "float16", False, 1, True, 0, 16, 16, 1),
             (3, 40, 40, 16, "float16", True, 2, False, 1, 32, 16, 2),
             (4, 24, 32, 5, "float16", False, 2, True, 2, 16, 16, 2),
             (4, 33, 20, 1, "float16", False, 1, True, 2, 32, 16, 1),
             (3, 50, 48, 9, "float16", False, 1, False, 1, 32, 16, 3),
             (2, 17, 16, 12, "float16", True, 2, True, 2, 16, 16, 1)]
    for case, r in zip(cases, _run(cases)):
        assert not r["nan"], case
        assert r["err"] < BOUND[case[4]], (case, r)
        assert r["counters"] == 0, case  # split-K counters reset for the next launch
