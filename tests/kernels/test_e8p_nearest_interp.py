"""The nearest-code kernel (kernels/triton/e8p_nearest.py) on the CPU through Triton's
interpreter (skipped without Triton): against brute force over every point of E8P (2¹⁶) and
E8P1 (2⁸), against the torch search's codes, codewords as their own nearest points, ties
(zero rows), and the fused residual stages (1-2 stages, E8P1 or E8P second, per-row and
per-layer scales, a strided x, a row tail) against core.e8p.round_stages' torch path,
dequantized values bit for bit.

Codes may differ from torch's only where the two candidates are equally near: their exact
(float64) distances then differ by float32 rounding of the 8-term dot products (~1e-6 of
‖y‖²), and the test allows that much and no more. Sizes are small: the interpreter runs a
program (16 rows) in ~0.3 s."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SRC = Path(__file__).parents[2] / "src"
SCRIPT = r"""
import json, torch
from kvant.core.e8p import codebook, round_stages
from kvant.kernels.triton import e8p_nearest as k

def dist(T, codes, x):  # exact squared distances (M,) of x (M, 8) to the points of codes
    return (T[codes].double() - x.double()).pow(2).sum(1)

res = {}
g = torch.Generator().manual_seed(0)
for name, scale, m in (("e8p", 1.0, 333), ("e8p", 2.5, 160), ("e8p1", 0.7, 200)):
    cb = codebook(name)
    x = torch.randn(m, 8, generator=g) * scale
    ck, ct = k.nearest(x, cb.kernel_book("cpu")), cb.nearest(x, kernel=False)
    T = cb.table
    brute = torch.cdist(x.double(), T.double()).pow(2).min(1).values
    dk, dt = dist(T, ck, x), dist(T, ct, x)
    res[f"{name}-{scale}"] = dict(
        brute=float((dk - brute).abs().max()), differ=int((ck != ct).sum()),
        gap=float((dk - dt).abs().max()), dtype=str(ck.dtype), shape=list(ck.shape),
        lo=int(ck.min()), hi=int(ck.max()), size=cb.size)
    codes = torch.randint(0, cb.size, (100,), generator=g)
    res[f"{name}-roundtrip"] = bool(torch.equal(k.nearest(cb.decode(codes), cb.kernel_book("cpu")),
                                                codes))
    zero = torch.zeros(20, 8)  # every permutation of a table row ties exactly: first wins
    res[f"{name}-zeros"] = bool(torch.equal(k.nearest(zero, cb.kernel_book("cpu")),
                                            cb.nearest(zero, kernel=False)))

for names, layer in ((("e8p",), False), (("e8p", "e8p1"), False), (("e8p", "e8p"), False),
                     (("e8p", "e8p"), True), (("e8p1",), True)):
    n = 37
    books = [codebook(nm) for nm in names]
    w = torch.randn(8, n, generator=g)  # x = w.t(): strided (N, 8) as block LDLQ passes it
    x = w.t()
    scales = [(torch.rand(1 if layer else n, 1, generator=g) * 0.4 + 0.3) / (i + 1)
              for i in range(len(names))]
    deq_t, codes_t = round_stages(books, x, scales, kernel=False)
    deq_k, codes_k = k.round_stages(x, [b.kernel_book("cpu") for b in books],
                                    [s.reshape(-1) for s in scales])
    same = (codes_k == codes_t).all(1)
    res["-".join(names) + ("-layer" if layer else "-row")] = dict(
        differ=int((~same).sum()), bits_equal=bool(torch.equal(deq_k[same], deq_t[same])),
        shapes=[list(deq_k.shape), list(codes_k.shape)], dtypes=[str(deq_k.dtype),
                                                                 str(codes_k.dtype)])
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(SRC))
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["e8p-1.0", "e8p-2.5", "e8p1-0.7"])
def test_kernel_nearest_is_the_nearest_point(results, case):
    r = results[case]
    assert r["brute"] < 1e-4, r  # the kernel's point is as near as the nearest of all
    assert r["dtype"] == "torch.int64" and 0 <= r["lo"] and r["hi"] < r["size"]
    # the torch search's codes, except exact/rounding ties (equally near points)
    assert r["differ"] <= 1 and r["gap"] < 1e-5, r


@pytest.mark.parametrize("name", ["e8p", "e8p1"])
def test_kernel_codewords_and_ties(results, name):
    assert results[f"{name}-roundtrip"]  # a codeword is its own nearest point
    assert results[f"{name}-zeros"]  # exact ties resolve as torch's (first index)


@pytest.mark.parametrize("case", ["e8p-row", "e8p-e8p1-row", "e8p-e8p-row", "e8p-e8p-layer",
                                  "e8p1-layer"])
def test_fused_stages_match_the_torch_path(results, case):
    r = results[case]
    stages = case.count("e8p")
    assert r["shapes"] == [[37, 8], [37, stages]]
    assert r["dtypes"] == ["torch.float32", "torch.int64"]
    assert r["differ"] == 0 and r["bits_equal"], r
