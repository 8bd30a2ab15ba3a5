"""The one-launch randomized Hadamard kernel on a GPU (skipped without CUDA): the op
``kvant::rht`` against the reference RandomizedHadamard on the same device (widths 576,
1536, 4096, 11008, 8192; both sides; 1, 3, 16 rows; fp16 and bf16), float32 accuracy, and
QuipLinear's forward with the kernel against its reference-transform path (the same packed
product in between), its dispatch (kernel at <= 16 rows, reference above and for fp32) and
CUDA-graph capture.

On the GPU fp32 -> fp16/bf16 rounds to nearest, so every output must be within half an ulp
of the float32 reference plus the reference's own float32 error."""

import pytest
import torch

from kvant.core.hadamard import RandomizedHadamard
from kvant.kernels import hadamard as H
from kvant.kernels import selfcheck
from kvant.nn.quip_linear import kernel_plan

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

WIDTHS = (576, 1536, 4096, 11008, 8192)
MANT = {torch.float16: 10, torch.bfloat16: 7}


def _ulp(v, dtype):
    e = torch.floor(torch.log2(v.abs().clamp(min=2.0 ** -14)))
    return torch.exp2(e - MANT[dtype])


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_matches_the_reference(n, inverse, rows, dtype):
    rh = RandomizedHadamard(n, seed=n + rows)
    p = kernel_plan(rh, "cuda")
    assert p is not None
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = (torch.randn(rows, n, generator=g, device="cuda") * 3).to(dtype)
    assert H.applies(p, x)
    y = H.apply(p, x, inverse)
    ref_fn = rh.inverse if inverse else rh.forward
    ref32 = ref_fn(x.float())
    assert y.dtype == dtype and y.shape == x.shape
    slack = 4e-7 * ref32.abs().amax(1, keepdim=True)
    excess = ((y.float() - ref32).abs() - slack) / _ulp(ref32, dtype)
    assert excess.max().item() <= 0.5
    assert (y != ref_fn(x)).float().mean().item() < 0.02  # rare ties of the two roundings


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("inverse", [False, True])
def test_kernel_is_float32_accurate_on_gpu(n, inverse):
    from kvant.kernels.triton import hadamard as kh

    rh = RandomizedHadamard(n, seed=7)
    p = kernel_plan(rh, "cuda")
    geo = p.geo
    x = torch.randn(5, n, device="cuda")
    y = kh.launch(x, p.signs, p.g_inverse if inverse else p.g_forward, geo.d1, geo.d2, geo.d3,
                  geo.m, geo.pieces, geo.perm_d, geo.scale, inverse, geo.warps)
    ref = (rh.inverse if inverse else rh.forward)(x)
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1.5e-6


def _quip(k, n, seed):
    from kvant.nn.quip_linear import QuipLinear

    g = torch.Generator().manual_seed(seed)
    m = QuipLinear(k, n, 4, 64, bias=True)
    m.qweight.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, m.qweight.shape, generator=g,
                                  dtype=torch.int64).to(torch.int32))
    m.scales.copy_((torch.rand(m.scales.shape, generator=g) * 0.02 + 0.005).half())
    m.qzeros.copy_(torch.randint(-2 ** 31, 2 ** 31 - 1, m.qzeros.shape, generator=g,
                                 dtype=torch.int64).to(torch.int32))
    m.sign_in.copy_(torch.randint(0, 256, m.sign_in.shape, generator=g, dtype=torch.uint8))
    m.sign_out.copy_(torch.randint(0, 256, m.sign_out.shape, generator=g, dtype=torch.uint8))
    for name in ("factor_in", "factor_out"):
        f = getattr(m, name)
        if f is not None:
            f.copy_(torch.linalg.qr(torch.randn(f.shape, generator=g, dtype=torch.float64))[0])
    m.bias.copy_(torch.randn(n, generator=g).half())
    return m.cuda()


def _counting(monkeypatch):
    calls = []
    real = H.apply

    def counted(p, x, inverse):
        calls.append(inverse)
        return real(p, x, inverse)
    monkeypatch.setattr(H, "apply", counted)
    return calls


@pytest.mark.parametrize("k,n", [(4096, 11008), (11008, 4096), (576, 1536), (1536, 576)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 16])
def test_quip_forward_with_the_kernel_equals_the_reference_path(monkeypatch, k, n, dtype,
                                                                rows):
    from kvant.nn.quip_linear import QuipLinear

    m = _quip(k, n, seed=k + n)
    selfcheck.forget()
    calls = _counting(monkeypatch)
    x = torch.randn(rows, k, device="cuda").to(dtype)
    QuipLinear._last_input = None
    m(x)
    # the first call of each side is checked against the reference (kernels/selfcheck.py):
    # the kernel runs for the check, then for the result
    assert calls == [False, False, True, True]
    calls.clear()
    QuipLinear._last_input = None
    y = m(x)
    assert calls == [False, True]  # once trusted: V x and Uᵀ y, one launch each
    calls.clear()
    m.transform_kernel = False
    QuipLinear._last_input = None
    ref = m(x)
    assert calls == [] and y.dtype == ref.dtype == dtype
    # the same packed product between transforms that agree to a rounding of the dtype
    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < (2e-3 if dtype == torch.float16 else 1e-2)


def test_quip_dispatch_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    m = _quip(4096, 4096, seed=1)
    selfcheck.forget()
    calls = _counting(monkeypatch)
    m(torch.randn(17, 4096, device="cuda").half())  # above MAX_ROWS
    m(torch.randn(2, 4096, device="cuda"))  # fp32 activations
    assert calls == []
    m(torch.randn(2, 8, 4096, device="cuda").half())  # 16 rows in a (2, 8, K) batch
    assert calls == [False, False, True, True]  # each side checked once, then computed


def test_quip_forward_in_a_cuda_graph():
    from kvant.nn.quip_linear import QuipLinear
    from kvant.serve.generate import capture_graph

    m = _quip(11008, 4096, seed=2)
    x = torch.randn(1, 1, 11008, device="cuda").half()
    out = {}

    def step():
        QuipLinear._last_input = None
        out["y"] = m(x)
    graph = capture_graph(step, warmup=2)
    # the memo set during capture holds the graph's (not yet computed) V x: reset it
    QuipLinear._last_input = None
    first = m(x).clone()
    x.copy_(torch.randn_like(x))
    graph.replay()
    QuipLinear._last_input = None
    assert torch.equal(out["y"], m(x))  # the replay computed the new input, as eager does
    assert not torch.equal(out["y"], first)
