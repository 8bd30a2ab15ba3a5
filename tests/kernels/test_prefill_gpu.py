"""The prefill kernels on a GPU: the inline-PTX path equals the pure-Triton path bit for bit,
both agree with the reference (fp16 and bf16, tails, act-order, split-K), the dequantize path
reuses one buffer, and dispatch sends large batches to the prefill paths."""

import pytest
import torch

from kvant.formats.packing import pack
from kvant.kernels import ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BOUND = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _problem(n, k, gs, act_order=False, seed=0):
    from kvant.kernels.triton import repack as rp

    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, device="cuda", dtype=torch.int32)
    groups = k // gs if gs > 0 else 1
    s = (torch.rand(n, groups, generator=g, device="cuda") * 0.02 + 0.001).half()
    z = torch.randint(0, 16, (n, groups), generator=g, device="cuda", dtype=torch.int32)
    g_idx = ((torch.randperm(k, generator=g, device="cuda") // gs).int() if act_order
             else None)
    qw, qz = pack(q, 4), pack(z, 4)
    w = ops.dequantize_weight(qw, s, qz, g_idx, 4, gs, k).double()
    return rp.repack(qw, s, qz, g_idx, 4, gs, k), w


def _err(y, ref):
    assert not torch.isnan(y).any()
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kd", [32, 128])
def test_mma_asm_equals_pure_and_the_reference(dtype, kd):
    import kvant.kernels.triton.dispatch as d
    from kvant.kernels.triton import prefill as pf

    for n, k, gs, act, m, bn, bm, split, warps in [(200, 1152, 128, False, 33, 128, 64, 1, 4),
                                                   (72, 1024, 32, True, 130, 64, 128, 3, 4),
                                                   (96, 1024, -1, False, 300, 128, 128, 2, 8),
                                                   (136, 640, 64, False, 64, 128, 256, 1, 8)]:
        p, w = _problem(n, k, gs, act)
        x = torch.randn(m, k, device="cuda").to(dtype)
        outs = []
        for asm in (True, False):
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            pf.launch_mma(x, p, bn, bm, split, warps, 3, out, d._counters(x.device), kd=kd,
                          asm=asm)
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), (n, k, gs, m)
        assert _err(outs[0], x.double() @ w.t()) < BOUND[dtype], (n, k, gs, m)
    assert all(int(c.abs().sum()) == 0 for c in d._COUNTERS.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_asm_equals_pure_and_reuses_the_buffer(dtype):
    import kvant.kernels.triton.dispatch as d
    from kvant.kernels.triton import prefill as pf

    p, w = _problem(200, 1152, 64, act_order=True)
    a = pf.dequantize_pairs(p, dtype, asm=True)
    b = pf.dequantize_pairs(p, dtype, asm=False)
    assert torch.equal(a, b)
    full = torch.empty_like(a[:, :1152]).index_copy_(1, p.perm.long(), a[:, :1152])
    if dtype == torch.float16:
        assert torch.equal(full, w.half())  # exactly the reference's weight
    else:  # one bf16 rounding of (q - z) * bf16(s)
        assert ((full.double() - w).abs() <= w.abs() * 2 ** -7 + 1e-6).all()
    x = torch.randn(300, 1152, device="cuda").to(dtype)
    cfg = d.Config("dequant", bn=64, bm=0)
    y1 = d.launch(x, p, cfg)
    buf = next(iter(pf._BUFFERS.values()))
    y2 = d.launch(x, p, cfg)
    assert next(iter(pf._BUFFERS.values())) is buf and torch.equal(y1, y2)
    assert _err(y1, x.double() @ w.t()) < BOUND[dtype]


def test_dispatch_uses_the_prefill_paths_and_stays_correct():
    import kvant.kernels.triton.dispatch as d

    p, w = _problem(320, 2048, 128)
    for m in (1, 64, 65, 512, 5000):
        cfg = d.heuristic(m, 320, 2048, 4, torch.device("cuda"), True)
        row = d.pairs_row(m)
        assert cfg.kernel == row[1], (m, cfg)
        x = torch.randn(m, 2048, device="cuda").half()
        assert _err(d.linear(x, p), x.double() @ w.t()) < 2e-3, m
    kinds = {c.kernel for c in d.candidates(128, p, torch.device("cuda"))}
    assert {"mma", "dequant"} <= kinds
