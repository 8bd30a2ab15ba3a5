"""The one-launch randomized Hadamard kernel (kernels/triton/hadamard.py) on the CPU through
Triton's interpreter (skipped without Triton), against the reference
core.hadamard.RandomizedHadamard: widths 576 (16·36, Paley factor), 1536 (128·12), 4096,
8192 (pure Walsh-Hadamard, two axes), 11008 (256·43, a stored random factor, three axes),
forward (V x) and inverse (Vᵀ x), 1, 3 and 16 rows, fp16 and bf16; and in float32, where
the kernel's error must be float32 rounding (both paths within a few ulp of each other).

Rounding to the output dtype: the interpreter rounds fp32 -> fp16 to nearest (numpy), but
truncates fp32 -> bf16 (its ``_convert_float`` without a rounding mode); so fp16 outputs
must be within half an ulp of the float32 reference (plus its float32 error), bf16 outputs
within one ulp. On the GPU both round to nearest (test_hadamard_gpu.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SRC = Path(__file__).parents[2] / "src"
WIDTHS = (576, 1536, 4096, 11008, 8192)
SCRIPT = r"""
import json, torch
from kvant.core.hadamard import RandomizedHadamard
from kvant.kernels.triton import hadamard as kh
from kvant.nn.quip_linear import kernel_plan

MANT = {torch.float16: 10, torch.bfloat16: 7}

def ulp(v, dtype):  # the spacing of dtype's values at |v| (normal range)
    e = torch.floor(torch.log2(v.abs().clamp(min=2.0 ** -14)))
    return torch.exp2(e - MANT[dtype])

def run(p, x, inverse):
    g, geo = (p.g_inverse if inverse else p.g_forward), p.geo
    return kh.launch(x, p.signs, g, geo.d1, geo.d2, geo.d3, geo.m, geo.pieces, geo.perm_d,
                     geo.scale, inverse, geo.warps)

res = {}
g = torch.Generator().manual_seed(0)
for n in WIDTHS:
    rh = RandomizedHadamard(n, seed=n)
    p = kernel_plan(rh, "cpu")
    for inverse in (False, True):
        ref_fn = rh.inverse if inverse else rh.forward
        for rows in (1, 3, 16):
            for dt in (torch.float16, torch.bfloat16):
                x = (torch.randn(rows, n, generator=g) * 3).to(dt)
                y = run(p, x, inverse)
                ref32 = ref_fn(x.float())  # the reference in float32, before rounding
                # the reference's own float32 error bounds how far apart the two may be
                slack = 4e-7 * ref32.abs().amax(1, keepdim=True)
                excess = ((y.float() - ref32).abs() - slack) / ulp(ref32, dt)
                res[f"{n}-{inverse}-{rows}-{dt}"] = dict(
                    dtype=str(y.dtype), shape=list(y.shape), excess=excess.max().item(),
                    differ=(y != ref_fn(x)).float().mean().item())
        x = torch.randn(4, n, generator=g)
        y, ref = run(p, x, inverse), ref_fn(x)
        res[f"{n}-{inverse}-fp32"] = ((y - ref).abs().max() / ref.abs().max()).item()
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(SRC))
    r = subprocess.run([sys.executable, "-c", f"WIDTHS = {WIDTHS!r}\n" + SCRIPT],
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_kernel_matches_the_reference(results, n, inverse, rows, dtype):
    r = results[f"{n}-{inverse}-{rows}-torch.{dtype}"]
    assert r["dtype"] == f"torch.{dtype}" and r["shape"] == [rows, n]
    # fp16: rounded to nearest (half an ulp); bf16: truncated by the interpreter (one ulp)
    assert r["excess"] <= (0.5 if dtype == "float16" else 1.0)
    # the same rounding as the reference's output almost everywhere (interpreter bf16
    # truncation: about half of the values are one ulp below)
    assert r["differ"] <= (0.02 if dtype == "float16" else 0.7)


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("inverse", [False, True])
def test_kernel_is_float32_accurate(results, n, inverse):
    # the reference's own error against exact arithmetic is ~3e-7 of the largest output
    assert results[f"{n}-{inverse}-fp32"] < 1.5e-6
