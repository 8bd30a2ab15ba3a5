"""The E8P codebook kernel against the reference decode on a GPU (skipped without CUDA).

Error bound: ``‖y - y_ref‖ / ‖y_ref‖`` with ``y_ref`` the float64 product of the same x and
the decoded weight (kernels.codebook.decoded_weight) below 2e-3 for fp16 activations and
1e-2 for bf16: the kernel decodes the weights exactly (the table values and their signs are
exact in fp16/bf16, the shift is applied through fp32 block sums of x), so the error is the
output's rounding plus fp32 accumulation (and, on the tensor-core forms, the block sums of
x rounded to the activation dtype for the shift's dot). Every output starts as NaN and must
come back fully written.
"""

import pytest
import torch

from kvant.core.e8p_words import kernel_tables
from kvant.kernels import KernelOptions
from kvant.kernels import codebook as cbk

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BOUND = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _e8p():
    from kvant.kernels.triton import e8p

    return e8p


def _tables():
    return kernel_tables().cuda()


def _codes(n, kb, bits, layer=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q1 = torch.randint(-32768, 32768, (n, kb), generator=g, device="cuda", dtype=torch.int16)
    q2 = None
    if bits == 3:
        q2 = torch.randint(0, 256, (n, kb), generator=g, device="cuda", dtype=torch.uint8)
    elif bits == 4:
        q2 = torch.randint(-32768, 32768, (n, kb), generator=g, device="cuda",
                           dtype=torch.int16)
    s = torch.rand(1 if bits == 2 else 2, 1 if layer else n, generator=g, device="cuda")
    return q1, q2, (s * 0.02 + 0.001).half()


def _err(y, ref):
    assert not torch.isnan(y).any(), "NaN left in the output (unwritten)"
    return ((y.double() - ref).norm() / ref.norm()).item()


def _check(n, kb, bits, ms, configs, dtype=torch.float16, layer=False):
    e8p = _e8p()
    q1, q2, s = _codes(n, kb, bits, layer)
    t = _tables()
    w = cbk.decoded_weight(q1, q2, s, t, bits).double()
    for m in ms:
        x = torch.randn(m, 8 * kb, device="cuda").to(dtype)
        ref = x.double() @ w.t()
        for cfg in configs(m):
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            e8p.launch(x, q1, q2, s, t, bits, cfg, out=out)
            assert _err(out, ref) < BOUND[dtype], (n, kb, bits, m, dtype, layer, cfg)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_candidate_fp16(bits):
    # N = 208: a tail in every BN > 16 (sizes that specialise like the benchmark's, so its
    # compiled kernels are reused)
    _check(208, 256, bits, [1, 2, 16], lambda m: _e8p().candidates(m, bits))


@pytest.mark.parametrize("bits", [2, 3])
def test_k_tails(bits):
    # K = 8 * 200: masked last iterations at BKB 16 and 32, uneven splits
    e8p = _e8p()
    _check(200, 200, bits, [1, 5], lambda m: [
        e8p.heuristic(m, bits), e8p.Config(dot=0, bn=32, bkb=16, split=3),
        e8p.Config(dot=1, bn=64, bkb=32, unpack=1, split=2),
        e8p.Config(dot=2, bn=64, bkb=16, unpack=2, split=5)][:4 if m == 1 else 1] + [
        e8p.Config(dot=2, bn=64, bkb=32, unpack=0, sign_table=False, split=2)])


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("layer", [False, True])
def test_bf16_and_layer_scales(bits, layer):
    e8p = _e8p()
    _check(136, 256, bits, [1, 3, 8, 16],
           lambda m: [e8p.heuristic(m, bits), e8p.Config(dot=2, bn=64, bkb=16, unpack=1,
                                                          split=3),
                      e8p.Config(dot=0, bn=32, bkb=16, split=2)][:3 if m <= 2 else 2],
           dtype=torch.bfloat16, layer=layer)


@pytest.mark.parametrize("m", list(range(1, 17)))
def test_op_every_batch(m):
    """The dispatched op (heuristic launch) for M = 1..16, an 8192-wide layer shape."""
    q1, q2, s = _codes(256, 1024, 2)
    t = _tables()
    x = torch.randn(m, 8192, device="cuda", dtype=torch.float16)
    ref = x.double() @ cbk.decoded_weight(q1, q2, s, t, 2).double().t()
    assert _err(cbk.e8p_linear(x, q1, q2, s, t, 2), ref) < BOUND[torch.float16]


def test_layer_forward_uses_the_kernel_and_matches_the_reference():
    from kvant.nn.quipsharp_linear import QuipSharpLinear

    m = QuipSharpLinear(512, 96, bits=4)
    q1, q2, s = _codes(96, 64, 4, seed=1)
    m.qweight.copy_(q1.cpu())
    m.qweight_resid.copy_(q2.cpu())
    m.scales.copy_(s.cpu())
    m = m.cuda()
    assert m.prepare()  # tables on the device: graph capture can follow
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    calls = []
    orig = _e8p().launch
    try:
        _e8p().launch = lambda *a, **k: calls.append(1) or orig(*a, **k)
        y = m(x)
    finally:
        _e8p().launch = orig
    assert calls, "the layer did not call the kernel"
    x32 = torch.randn(32, 512, device="cuda", dtype=torch.float16)
    y32 = m(x32)  # above 16 rows: the reference
    m.prepare(options=KernelOptions(gpu_kernels=False))
    ref = m(x)
    assert _err(y, ref.double()) < 2e-3
    assert torch.equal(y32, m(x32))


def test_cuda_graph_capture_and_replay():
    from kvant.serve.generate import capture_graph

    e8p = _e8p()
    q1, q2, s = _codes(1024, 512, 3)
    t = _tables()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    cbk.prepare(x.device)
    out = torch.empty(1, 1024, device="cuda", dtype=torch.float16)
    cfg = e8p.Config(dot=0, bn=32, bkb=16, split=4)
    g = capture_graph(lambda: e8p.launch(x, q1, q2, s, t, 3, cfg, out=out))
    x.normal_()
    g.replay()
    ref = x.double() @ cbk.decoded_weight(q1, q2, s, t, 3).double().t()
    assert _err(out, ref) < BOUND[torch.float16]
