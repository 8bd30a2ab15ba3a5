"""The SpQR kernel (kernels/triton/spqr.py) against SpQRLinear.reference_product on a GPU
(skipped without CUDA): both forms (CUDA cores, tensor cores), every tuning candidate on one
shape, 2/3/4 bits, groups of 16 and 32, act-order, quantized (3-bit) and plain (16-bit)
statistics, with and without outliers, N and K tails, 1-16 rows, fp16 and bf16; the layer's
forward going through the kernel once selfcheck trusts it; CUDA-graph capture and replay;
torch.compile; a layer from a real SpQR quantization.

Error bound: ``‖y - y_ref‖ / ‖y_ref‖`` with ``y_ref`` the float64 product of the same x with
the layer's float32 weight (dense part + outliers) below 2e-3 (fp16) and 1e-2 (bf16): the
kernel rounds each weight as the reference does on the tensor-core form and not at all on
the CUDA-core form, so the error is the output's rounding plus fp32 sums in another order.
"""

import pytest
import torch

from spqr_cases import random_spqr

from kvant.kernels import KernelOptions, selfcheck
from kvant.kernels import spqr as spk

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BOUND = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _ks():
    from kvant.kernels.triton import spqr as ks

    return ks


def _err(y, ref):
    assert not torch.isnan(y).any(), "NaN left in the output (unwritten)"
    return ((y.double() - ref).norm() / ref.norm()).item()


def _ref(lay, x):
    return x.double() @ lay.dequantized_weight().double().t().to(x.device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,gs,stat_bits,act,outl", [
    (3, 16, 3, True, 0.01), (3, 16, 3, False, 0.0), (3, 32, 16, True, 0.02),
    (2, 16, 3, True, 0.01), (4, 16, 3, False, 0.01), (4, 32, 16, True, 0.0)])
def test_both_forms_match_the_reference(bits, gs, stat_bits, act, outl, dtype):
    ks = _ks()
    lay = random_spqr(1088, 176, bits, gs, stat_bits, act, outl, seed=bits + gs)  # tails
    p = lay.kernel_pack("cuda")
    for m in (1, 2, 3, 16):
        x = torch.randn(m, 1088, device="cuda").to(dtype)
        ref = _ref(lay, x)
        for cfg in (ks.Config(False, bn=32), ks.Config(True, bn=64, warps=8),
                    ks.Config(False, bn=16, split=3), ks.Config(True, bn=32, split=2)):
            out = torch.full((m, 176), float("nan"), device="cuda", dtype=dtype)
            ks.launch(x, p, cfg, out=out)
            assert _err(out, ref) < BOUND[dtype], (m, cfg)
    assert all(int(c.abs().sum()) == 0 for c in ks._COUNTERS.values())  # reset for replays


def _candidates():
    from kvant.kernels.triton.spqr import candidates

    return sorted(set(candidates(1)) | set(candidates(16)), key=repr)


@pytest.mark.parametrize("cfg", _candidates() if torch.cuda.is_available() else [], ids=repr)
def test_every_candidate_on_a_7b_shape(cfg):
    ks = _ks()
    lay = random_spqr(4096, 1024, 3, 16, 3, True, 0.01)
    p = lay.kernel_pack("cuda")
    for m in (1, 16) if cfg.dot else (1, 4):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        assert _err(ks.launch(x, p, cfg), _ref(lay, x)) < BOUND[torch.float16], (m, cfg)


def test_layer_forward_uses_the_kernel_once_trusted():
    ks = _ks()
    lay = random_spqr(2048, 256, 3, 16, 3, True, 0.01).cuda()
    assert lay.prepare() and "_kernel_pack" in lay.__dict__  # built by prepare()
    assert set(lay.state_dict()) == set(random_spqr(2048, 256).state_dict())
    selfcheck.forget()
    calls = []
    orig = ks.launch
    try:
        ks.launch = lambda *a, **k: calls.append(1) or orig(*a, **k)
        for m in (1, 7):
            x = torch.randn(m, 2048, device="cuda", dtype=torch.float16)
            y = lay(x)
            assert _err(y, _ref(lay, x)) < BOUND[torch.float16]
    finally:
        ks.launch = orig
    assert len(calls) >= 2, "the layer did not call the kernel"
    verdicts = [k for k in selfcheck._VERDICTS if k[0] == "spqr"]
    assert len(verdicts) == 2 and all(selfcheck.verdict(k) for k in verdicts)
    x32 = torch.randn(32, 2048, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(lay(x32), lay.reference_product(x32))  # above 16 rows
    lay.prepare(options=KernelOptions(gpu_kernels=False))
    assert "_kernel_pack" not in lay.__dict__
    x = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(lay(x), lay.reference_product(x))


@pytest.mark.parametrize("m", [1, 16])
def test_cuda_graph_capture_and_replay(m):
    from kvant.serve.generate import capture_graph

    lay = random_spqr(4096, 512, 3, 16, 3, True, 0.01).cuda()
    assert lay.prepare()
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    lay(x)  # eager first call: selfcheck runs (it cannot during capture)
    out = {}
    g = capture_graph(lambda: out.__setitem__("y", lay(x)), warmup=2)
    x.normal_()
    g.replay()
    assert _err(out["y"], _ref(lay, x)) < BOUND[torch.float16]


def test_torch_compile():
    lay = random_spqr(1024, 128, 3, 16, 3, True, 0.02).cuda()
    assert lay.prepare()
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    lay(x)  # checked eagerly; the compiled call reuses the verdict
    y = torch.compile(lay, fullgraph=True)(x)
    assert _err(y, _ref(lay, x)) < BOUND[torch.float16]


def test_a_real_quantization():
    from kvant.algorithms.spqr import spqr_gptq
    from kvant.config import SpQRConfig
    from kvant.nn.spqr_linear import SpQRLinear

    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 512, generator=g) * 0.02
    W[3, 7] = 0.5  # an outlier
    X = torch.randn(1024, 512, generator=g)
    res = spqr_gptq(W, 2 * X.T @ X / 1024, SpQRConfig(), "l")
    lay = SpQRLinear.from_result(res, None).cuda()
    assert lay.nnz > 0 and lay.perm is not None and lay.prepare()
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(4, 512, device="cuda", dtype=dtype)
        y = spk.apply(x, lay.kernel_pack())
        assert _err(y, _ref(lay, x)) < BOUND[dtype]
