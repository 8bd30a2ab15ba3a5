"""GPU kernels against the reference, on random inputs (skipped without CUDA).

Error bound: ``‖y - y_ref‖ / ‖y_ref‖`` with ``y_ref`` the float64 product of the same x and
the reference's dequantized weight (rounded to fp16, as kvant::wq_linear does) must stay
below 2e-3 for fp16 activations and 1e-2 for bf16. The kernels do not round the weight (they
scale the exact fp32 sum of ``(q - z) * x`` per group), so the error is the output's rounding
(fp16: 2**-11, bf16: 2**-8 relative) plus fp32 accumulation. Every output buffer is filled
with NaN first and must come back fully written.
"""

import pytest
import torch

import kvant
from kvant.formats.packing import pack
from kvant.kernels import KernelOptions, ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BOUND = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
BATCHES = [1, 2, 3, 8, 16, 33, 64, 128]


def _dispatch():
    import kvant.kernels.triton.dispatch as d

    return d


def _problem(n, k, bits, gs, act_order=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (n, k), generator=g, device="cuda", dtype=torch.int32)
    groups = k // gs if gs > 0 else 1
    s = (torch.rand(n, groups, generator=g, device="cuda") * 0.02 + 0.001).half()
    z = torch.randint(0, 2 ** bits, (n, groups), generator=g, device="cuda", dtype=torch.int32)
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(k, generator=g, device="cuda") // gs).to(torch.int32)
    return pack(q, bits), s, pack(z, bits), g_idx


def _rel_err(y, ref):
    assert not torch.isnan(y).any(), "NaN left in the output (unwritten or poisoned)"
    return ((y.double() - ref).norm() / ref.norm()).item()


def _check(n, k, bits, gs, batches, configs, dtype=torch.float16, act_order=False, seed=0,
           tile=None):
    from kvant.kernels.triton import repack as rp

    d = _dispatch()
    qw, s, qz, g_idx = _problem(n, k, bits, gs, act_order, seed)
    p = rp.repack(qw, s, qz, g_idx, bits, gs, k, tile=tile or rp.PAIRS_TILE)
    assert tile is None or not p.pairs or p.tile == tile
    w = ops.dequantize_weight(qw, s, qz, g_idx, bits, gs, k).double()
    for m in batches:
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = x.double() @ w.t()
        for cfg in configs(m):
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            d.launch(x, p, cfg, out=out)
            err = _rel_err(out, ref)
            assert err < BOUND[dtype], (m, cfg, err)
        if d._COUNTERS:
            assert all(int(c.abs().sum()) == 0 for c in d._COUNTERS.values()), \
                "split-K counters not reset"


def _all_kernels(m):
    d = _dispatch()
    bm = d.block_m("dot", m)
    cfgs = [d.Config("dot", bn=64, bm=bm, split=1, warps=d.dot_warps(64, bm)),
            d.Config("dot", bn=32, bm=bm, split=3, warps=d.dot_warps(32, bm))]
    if m <= d.GEMV_MAX_M:
        cfgs += [d.Config("gemv", bn=32, bm=1, split=1, cpi=1),
                 d.Config("gemv", bn=16, bm=1, split=4, cpi=2)]
    if m >= 33:
        cfgs.append(d.Config("dequant", bn=32, bm=0))
    return cfgs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_4bit_g128_every_batch_and_kernel(dtype):
    # N not a multiple of any tile, K not a whole number of chunks
    _check(200, 1152, 4, 128, BATCHES, _all_kernels, dtype)


def _pairs_variants(m):
    d = _dispatch()
    bm = d.block_m("dot", m)
    return [d.Config("dot", bn=bn, bm=bm, split=sp, warps=d.dot_warps(bn, bm), stages=st)
            for bn, sp, st in [(64, 1, 3), (32, 3, 4), (128, 16, 5), (64, 4, 3), (128, 2, 4)]]


@pytest.mark.parametrize("tile", [1, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_4bit_pairs_tiles_and_splits(tile, dtype):
    # 200 rows: the last row tile is partial; 9 chunks split 3 ways or 16 (one chunk each:
    # the pipeline of weight and group words is shorter than its stages); g128 and per
    # channel take the one-dot path, g32 / g64 a dot a plane
    configs = _pairs_variants
    _check(200, 1152, 4, 128, [1, 5, 16, 64], configs, dtype, tile=tile)
    _check(72, 1024, 4, 32, [1, 16], configs, dtype, act_order=True, tile=tile)
    _check(96, 1024, 4, 64, [2], configs, dtype, tile=tile)
    _check(96, 1024, 4, -1, [1, 16], configs, dtype, tile=tile)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128, -1])
def test_bit_widths_and_group_sizes(bits, gs):
    _check(96, 1024, bits, gs, [1, 16, 33], _all_kernels, seed=bits * 7 + gs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_4bit_planes_layout(dtype):
    # 4-bit group 256 keeps the planes layout (and the gemv kernel at batch <= 4)
    _check(136, 1280, 4, 256, [1, 3, 16, 40], _all_kernels, dtype)


@pytest.mark.parametrize("bits,gs,dtype", [(4, 128, torch.float16), (3, 64, torch.float16),
                                           (4, 32, torch.bfloat16), (2, 128, torch.float16)])
def test_act_order(bits, gs, dtype):
    _check(80, 1024, bits, gs, [1, 3, 16, 64], _all_kernels, dtype, act_order=True)


def test_heuristic_dispatch_every_batch():
    from kvant.kernels.triton import repack as rp

    d = _dispatch()
    n, k = 320, 2048
    qw, s, qz, _ = _problem(n, k, 4, 128)
    p = rp.repack(qw, s, qz, None, 4, 128, k)
    w = ops.dequantize_weight(qw, s, qz, None, 4, 128, k).double()
    for m in BATCHES + [600]:
        x = torch.randn(m, k, device="cuda").half()
        y = d.linear(x, p)
        assert _rel_err(y, x.double() @ w.t()) < BOUND[torch.float16], m


def _module(bits=4, gs=128, n=256, k=512, act_order=False):
    from kvant.nn.qlinear import QuantLinear

    qw, s, qz, g_idx = _problem(n, k, bits, gs, act_order)
    m = QuantLinear(k, n, bits, gs, bias=True, act_order=act_order).cuda()
    m.qweight.copy_(qw)
    m.scales.copy_(s)
    m.qzeros.copy_(qz)
    if act_order:
        m.g_idx.copy_(g_idx)
    m.bias.normal_()
    return m


def test_quantlinear_is_prepared_once_and_rebuilt_on_change():
    torch.manual_seed(0)
    m = _module(act_order=True)
    keys = list(m.state_dict())
    assert m.prepare() is True and m.kernel_layout.device.type == "cuda"
    x = torch.randn(3, 7, 512, device="cuda").half()
    y = m(x)
    ref = ops.wq_linear(x.cpu().float(), m.qweight.cpu(), m.scales.cpu(), m.qzeros.cpu(),
                        m.g_idx.cpu(), 4, 128, 512) + m.bias.cpu().float()
    assert _rel_err(y.cpu(), ref.double()) < 2e-3
    layout, words = m.kernel_layout, m.kernel_qweight
    m(x)
    assert m.kernel_layout is layout and m.kernel_qweight is words  # built once
    assert m.prepare() is True and m.kernel_layout is layout  # idempotent
    m.scales.mul_(2)  # a stored tensor changes: rebuilt on the next call
    y2 = m(x)
    assert m.kernel_layout is not layout
    assert _rel_err(y2 - m.bias, 2 * (y - m.bias).double()) < 2e-3
    assert list(m.state_dict()) == keys  # the layout is never saved


def test_to_cpu_drops_and_to_cuda_rebuilds():
    m = _module()
    m.prepare()
    x = torch.randn(2, 512, device="cuda").half()
    y = m(x)
    m.to("cpu")
    assert m.kernel_layout is None and m.kernel_qweight is None
    m.cuda()  # .to(cuda) prepares
    assert m.kernel_layout is not None and m.kernel_qweight.is_cuda
    torch.testing.assert_close(m(x), y, rtol=0, atol=0)


def test_stored_on_host_keeps_one_copy_on_the_gpu():
    m = _module(act_order=True)
    x = torch.randn(3, 512, device="cuda").half()
    y = m(x)
    assert m.prepare(options=KernelOptions(stored_on_host=True)) is True
    assert m.qweight.device.type == "cpu" and m.g_idx.device.type == "cpu"
    assert m.kernel_qweight.is_cuda and m.bias.is_cuda and m.compute_device().type == "cuda"
    layout = m.kernel_layout
    # y came from a layout built with the stored tensors on the GPU; the kernel may pick
    # another tile (autotune) for the rebuilt one, so equal up to fp16 rounding
    assert _rel_err(m(x), y.double()) < 1e-3
    assert m.prepare("cuda") is True and m.kernel_layout is layout  # nothing moved or rebuilt
    m.half()
    assert m.kernel_layout is layout and m.qweight.device.type == "cpu"
    m.scales.mul_(2)  # the host copy changes: rebuilt on the GPU, stored back on the host
    y2 = m(x)
    assert m.kernel_layout is not layout and m.kernel_layout.device.type == "cuda"
    assert m.qweight.device.type == "cpu"
    assert _rel_err(y2 - m.bias, 2 * (y - m.bias).double()) < 2e-3
    m.to("cpu")  # everything on the CPU, the reference computes
    assert m.kernel_layout is None and m.bias.device.type == "cpu"
    m.cuda()
    assert m.kernel_layout is not None and m.qweight.device.type == "cpu"
    assert _rel_err(m(x), y2.double()) < 1e-3
    m.prepare(options=KernelOptions(stored_on_host=True, gpu_kernels=False))
    assert m.kernel_layout is None and m.qweight.is_cuda  # the reference needs them there
    # the reference rounds the weight to fp16, the kernel does not: equal up to that rounding
    # (element-wise 2e-3 failed on one of 768 outputs on the H200, 2026-12-02)
    assert _rel_err(m(x), y2.double()) < 2e-3


def test_stored_on_host_model_load_and_save(tmp_path, tiny_gpt, tiny_calib):
    model, tok = tiny_gpt
    kvant.quantize(model, kvant.RTNConfig(bits=4, group_size=32), None,
                   kvant.EngineOptions(device="cpu", show_progress=False))
    kvant.save_quantized(model, tmp_path / "a", tok)
    ids = tiny_calib[:2].cuda()
    start = torch.cuda.memory_allocated()
    dev, _ = kvant.load_quantized(tmp_path / "a", device="cuda")
    before = torch.cuda.memory_allocated()
    host, _ = kvant.load_quantized(tmp_path / "a", device="cuda",
                                   kernel_options=KernelOptions(stored_on_host=True))
    layers = [m for m in host.modules() if hasattr(m, "kernel_layout")]
    assert layers and all(m.kernel_layout is not None and m.qweight.device.type == "cpu"
                          for m in layers)
    stored = sum(m.qweight.numel() * 4 + m.scales.numel() * 2 for m in layers)
    on_gpu = torch.cuda.memory_allocated() - before
    assert on_gpu < before - start - 0.9 * stored  # the stored copy is not on the GPU
    with torch.no_grad():
        torch.testing.assert_close(host(ids), dev(ids), rtol=0, atol=0)
    kvant.save_quantized(host, tmp_path / "b", tok)
    again, _ = kvant.load_quantized(tmp_path / "b")
    a, b = again.state_dict(), dev.state_dict()
    assert all(torch.equal(a[k], b[k].cpu()) for k in a)


def test_gpu_kernels_off_keeps_the_reference():
    m = _module()
    assert m.prepare(options=KernelOptions(gpu_kernels=False)) is False
    assert m.kernel_layout is None
    x = torch.randn(2, 512, device="cuda").half()
    ref = x.double() @ m.dequantized_weight().double().t() + m.bias.double()
    assert _rel_err(m(x), ref) < 2e-3
    m.cpu().cuda()  # the options stay with the layer across moves
    assert m.kernel_layout is None


def test_autotune_option_tunes_each_new_shape():
    d = _dispatch()
    m = _module(n=384, k=1024)
    m.prepare(options=KernelOptions(autotune=True))
    x = torch.randn(5, 1024, device="cuda").half()
    before = dict(d._TUNED)
    y = m(x)
    assert len(d._TUNED) == len(before) + 1
    ref = x.double() @ m.dequantized_weight().double().t() + m.bias.double()
    assert _rel_err(y, ref) < 2e-3


def test_quip_layer_uses_the_kernels():
    from kvant.nn.quip_linear import QuipLinear

    m = QuipLinear(512, 256, 4, 128)
    qw, s, qz, _ = _problem(256, 512, 4, 128)
    m.sign_in.random_(0, 256)
    m.sign_out.random_(0, 256)
    m = m.cuda()
    m.qweight.copy_(qw)
    m.scales.copy_(s)
    m.qzeros.copy_(qz)
    x = torch.randn(3, 512, device="cuda").half()
    ref = m.cpu()(x.cpu().float()).double()
    m.cuda()
    assert m.kernel_layout is not None
    assert _rel_err(m(x).cpu(), ref) < 5e-3


def test_stored_layout_op_runs_the_reference_on_cuda():
    qw, s, qz, g_idx = _problem(128, 768, 3, 64, act_order=True)
    x = torch.randn(5, 768, device="cuda").half()
    y = ops.wq_linear(x, qw, s, qz, g_idx, 3, 64, 768)
    w = ops.dequantize_weight(qw, s, qz, g_idx, 3, 64, 768).double()
    assert _rel_err(y, x.double() @ w.t()) < 2e-3


def test_unsupported_group_size_falls_back():
    m = _module(gs=16, k=256)
    assert m.prepare() is False and m.kernel_layout is None
    x = torch.randn(2, 256, device="cuda").half()
    ref = x.double() @ m.dequantized_weight().double().t() + m.bias.double()
    assert _rel_err(m(x), ref) < 2e-3


def test_cuda_graph_capture_and_replay():
    m = _module(n=1024, k=2048)
    assert kvant.prepare_for_inference(m) == 1
    x = torch.randn(1, 2048, device="cuda").half()
    eager = m(x).clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m(x)  # warm up (compiles, allocates the split-K counters)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = m(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.testing.assert_close(y, m(x), rtol=0, atol=0)
    assert eager.shape == y.shape


def test_torch_compile():
    m = _module(n=512, k=1024)
    kvant.prepare_for_inference(m, "cuda")
    x = torch.randn(4, 1024, device="cuda").half()
    f = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(f(x), m(x), rtol=0, atol=0)
