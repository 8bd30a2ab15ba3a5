"""The nearest-code kernel (kernels/triton/e8p_nearest.py) on a GPU (skipped without CUDA):
brute force over every point, the torch search on the same device, the fused residual
stages, the dispatch of Codebook.nearest / round_stages / StageQuantizer, and a whole block
LDLQ walk with and without the kernel.

Codes may differ from the torch path's only between equally near points (float32 rounding
of the distances, summed in another order): such rows must be rare and their exact
distances within 1e-5; the walk's loss within 1e-3 (a differing code changes the error fed
back, so later codes may differ too)."""

import pytest
import torch

from kvant.algorithms.quipsharp import StageQuantizer, fit_stage_scales, ldlq_with_scale_search
from kvant.config import QuIPSharpConfig
from kvant.core.e8p import codebook, kernel_applies, round_stages

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _kernel():
    from kvant.kernels.triton import e8p_nearest

    return e8p_nearest


def _brute(x, T):
    """Least squared distance (M,) float64 of each row of x to the points T, by chunks."""
    x, T = x.double(), T.double()
    return torch.cat([(c.pow(2).sum(1, keepdim=True) - 2 * c @ T.t() + T.pow(2).sum(1))
                      .min(1).values.clamp(min=0) for c in x.split(2048)])


@pytest.mark.parametrize("name,scale", [("e8p", 1.0), ("e8p", 2.5), ("e8p", 0.3),
                                        ("e8p1", 0.7)])
def test_nearest_on_gpu_is_the_nearest_point_and_matches_torch(name, scale):
    cb = codebook(name)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(20000, 8, generator=g, device="cuda") * scale
    assert kernel_applies(x)
    ck = cb.nearest(x)  # dispatched to the kernel
    assert torch.equal(ck, _kernel().nearest(x, cb.kernel_book(x.device)))
    ct = cb.nearest(x, kernel=False)
    T = cb.table_on(x.device)
    dk = (T[ck].double() - x.double()).pow(2).sum(1)
    dt = (T[ct].double() - x.double()).pow(2).sum(1)
    assert float((dk - _brute(x, T)).abs().max()) < 1e-4
    differ = int((ck != ct).sum())
    assert differ <= 20 and float((dk - dt).abs().max()) < 1e-5, differ


@pytest.mark.parametrize("name", ["e8p", "e8p1"])
def test_codewords_are_their_own_nearest_points_on_gpu(name):
    cb = codebook(name)
    codes = torch.randint(0, cb.size, (50000,), device="cuda")
    assert torch.equal(cb.nearest(cb.decode(codes)), codes)


@pytest.mark.parametrize("names,layer", [(("e8p",), False), (("e8p", "e8p1"), False),
                                         (("e8p", "e8p"), False), (("e8p", "e8p"), True)])
def test_fused_stages_on_gpu_match_the_torch_path(names, layer):
    n = 4096
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(8, n, generator=g, device="cuda").t()  # strided, as block LDLQ passes
    books = [codebook(nm) for nm in names]
    scales = [(torch.rand(1 if layer else n, 1, generator=g, device="cuda") * 0.4 + 0.3)
              / (i + 1) for i in range(len(names))]
    deq_k, codes_k = round_stages(books, x, scales)
    deq_t, codes_t = round_stages(books, x, scales, kernel=False)
    assert codes_k.shape == (n, len(names)) and deq_k.shape == (n, 8)
    same = (codes_k == codes_t).all(1)
    assert int((~same).sum()) <= 4
    assert torch.equal(deq_k[same], deq_t[same])  # bit for bit where the codes agree
    q = StageQuantizer(names, scales, x.device)
    deq_q, codes_q = q(x)
    assert torch.equal(codes_q, codes_k) and torch.equal(deq_q, deq_k)


@pytest.mark.parametrize("bits,names", [(2, ("e8p",)), (3, ("e8p", "e8p1")),
                                        (4, ("e8p", "e8p"))])
def test_ldlq_walk_with_the_kernel_matches_the_torch_walk(bits, names):
    torch.manual_seed(0)
    n, k = 256, 512
    W = torch.randn(n, k, device="cuda")
    X = torch.randn(2048, k, device="cuda")
    H = X.t() @ X / 2048
    cfg = QuIPSharpConfig(bits=bits)
    out = {}
    for kernel in (True, False):
        scales = fit_stage_scales(W, names, True, kernel)
        out[kernel] = (scales, *ldlq_with_scale_search(W, H.clone(), names, scales, cfg,
                                                        kernel=kernel))
    (s1, c1, d1, l1, f1), (s0, c0, d0, l0, f0) = out[True], out[False]
    assert all(torch.equal(a, b) for a, b in zip(s1, s0))  # the fitted scales
    assert f1 == f0 and abs(l1 - l0) <= 1e-3 * l0, (l1, l0)
    assert float((c1 == c0).float().mean()) > 0.99
