"""GPTQ: error below RTN, exact loss proxy, act-order/static layouts, robustness, engine."""

import copy

import pytest
import torch

import kvant
from kvant.algorithms.gptq import gptq_quantize
from kvant.algorithms.gptq_walk import WalkHooks
from kvant.config import EngineOptions, GPTQConfig, QuantArgs
from kvant.core.grid import find_params, rtn, weight_params
from kvant.core.hessian import HessianError
from kvant.formats.packing import unpack
from kvant.model.nanogpt import GPTConfig, GPTLanguageModel
from kvant.nn.qlinear import QuantLinear


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny shapes: one thread is fastest, and immune to a busy machine's thread contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _layer(seed=0, n=48, k=128, m=1024, dead=(), dup=()):
    """A weight and correlated inputs: a few large-variance channels, mixed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    x[:, :6] *= 15.0
    x = x @ (torch.eye(k, dtype=torch.float64)
             + 0.3 * torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5)
    for j in dead:
        x[:, j] = 0
    for a, b in dup:
        x[:, b] = x[:, a]
    w = torch.randn(n, k, generator=g)
    return w, x, (2 * x.t() @ x / m).float()


def _deq(res, k):
    idx = (res.g_idx.long() if res.g_idx is not None else
           torch.arange(k) // res.group_size if res.group_size > 0 else torch.zeros(k).long())
    return (res.qweight.float() - res.zeros[:, idx]) * res.scales[:, idx]


def _out_err(w, wq, x):
    return float((((w - wq).double()) @ x.t()).pow(2).sum() / x.shape[0])


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("gs", [-1, 32])
def test_gptq_beats_rtn_on_correlated_inputs(bits, gs):
    # margin: GPTQ's output error at most 1/3 of RTN's (measured ~1/10 on these layers)
    w, x, H = _layer(seed=bits)
    args = QuantArgs(bits, gs)
    res = gptq_quantize(w, H, args)
    q, p = rtn(w, args)
    s, z = p.expand(w.shape[1])
    e_gptq, e_rtn = _out_err(w, _deq(res, 128), x), _out_err(w, (q - z) * s, x)
    assert e_gptq < e_rtn / 3, (e_gptq, e_rtn)


def test_loss_is_the_output_error():
    # Σ (w-q)²/(2d²) equals ||(W-Ŵ)X||²/n exactly when the damping vanishes
    w, x, _ = _layer(seed=5, k=64, m=2048)
    H = 2 * x.t() @ x / x.shape[0]
    res = gptq_quantize(w, H, QuantArgs(3, -1), damp_percent=1e-7)
    e = _out_err(w, _deq(res, 64), x)
    assert abs(res.loss - e) / e < 1e-4


@pytest.mark.parametrize("static", [False, True])
def test_act_order_round_trip_through_quantlinear(static):
    w, x, H = _layer(seed=7)
    # the walk's own dequantized weights, via the identity column hook
    ident = lambda c, s, z, d: (torch.clamp(torch.round(c / s.view(-1)) + z.view(-1), 0, 7)  # noqa
                                - z.view(-1)) * s.view(-1)
    res = gptq_quantize(w, H.clone(), QuantArgs(3, 32), act_order=True, static_groups=static,
                        hooks=WalkHooks(quantize_column=ident))
    plain = gptq_quantize(w, H.clone(), QuantArgs(3, 32), act_order=True, static_groups=static)
    assert torch.equal(res.qweight, plain.qweight) and res.loss == pytest.approx(plain.loss)
    walk_deq = res.info["dequantized"]
    assert torch.equal(_deq(plain, 128), walk_deq)
    if static:
        assert plain.g_idx is None  # grids stay on the original groups: k // gs
        ref = weight_params(torch.where(H.diagonal() == 0, 0.0, w), QuantArgs(3, 32))
        assert torch.equal(plain.scales, ref.scales)  # static grids = RTN grids
    else:
        g = plain.g_idx.long()
        assert not torch.equal(g, torch.arange(128) // 32)  # really reordered
        assert torch.equal(torch.bincount(g), torch.full((4,), 32))
    ql = QuantLinear.from_result(plain, None, dtype=torch.float32)
    assert (ql.g_idx is None) == static
    # unpack the stored ints with g_idx and stored scales, in float32: exactly the walk's
    q = unpack(ql.qweight, 3, 128).float()
    z = unpack(ql.qzeros, 3, 4).float()
    idx = ql.g_idx.long() if ql.g_idx is not None else torch.arange(128) // 32
    assert torch.equal((q - z[:, idx]) * ql.scales.float()[:, idx], walk_deq)
    assert torch.equal(ql.dequantized_weight(), walk_deq.half())


def test_group_params_hook_matches_default():
    w, x, H = _layer(seed=11)
    base = gptq_quantize(w, H.clone(), QuantArgs(4, 32))
    hooked = gptq_quantize(w, H.clone(), QuantArgs(4, 32),
                           hooks=WalkHooks(group_params=lambda c: find_params(c, 4, False)))
    assert torch.equal(base.qweight, hooked.qweight) and torch.equal(base.scales, hooked.scales)


def test_block_size_does_not_change_the_result():
    # lazy batching is exact; groups of 32 cross blocks of 24 (grid on current weights)
    w, x, H = _layer(seed=13)
    a = gptq_quantize(w, H.clone(), QuantArgs(3, 32), block_size=24)
    b = gptq_quantize(w, H.clone(), QuantArgs(3, 32), block_size=128)
    assert (a.qweight != b.qweight).float().mean() < 0.01
    torch.testing.assert_close(a.scales, b.scales, rtol=2e-3, atol=0)
    assert a.loss == pytest.approx(b.loss, rel=1e-3)


def test_dead_and_duplicated_inputs_give_finite_results():
    w, x, H = _layer(seed=17, dead=(3, 40), dup=((0, 1), (5, 9)))
    for ao in (False, True):
        res = gptq_quantize(w, H.clone(), QuantArgs(3, 32), act_order=ao, layer="l")
        deq = _deq(res, 128)
        assert torch.isfinite(deq).all() and torch.isfinite(res.scales).all()
        assert res.info["dead_inputs"] == 2
        assert deq[:, [3, 40]].abs().max() == 0  # dead columns are zeroed
        assert _out_err(w, deq, x) < 0.5 * _out_err(w, _deq(gptq_quantize(
            w, torch.eye(128), QuantArgs(3, 32)), 128), x)  # H=I is plain rounding


def test_impossible_hessian_raises_named_error():
    w, _, H = _layer(seed=19)
    H[5, 7] = float("nan")
    with pytest.raises(HessianError, match="blocks.1.mlp.down"):
        gptq_quantize(w, H, QuantArgs(4, 32), layer="blocks.1.mlp.down")
    with pytest.raises(HessianError, match="blocks.1.mlp.down"):
        gptq_quantize(w, -torch.eye(128), QuantArgs(4, 32), layer="blocks.1.mlp.down")


def test_static_groups_with_act_order_finite_and_better_than_rtn():
    w, x, H = _layer(seed=23)
    res = gptq_quantize(w, H, QuantArgs(2, 32, sym=True, clip=True), act_order=True,
                        static_groups=True)
    q, p = rtn(w, QuantArgs(2, 32, sym=True, clip=True))
    s, z = p.expand(128)
    assert torch.isfinite(_deq(res, 128)).all()
    assert _out_err(w, _deq(res, 128), x) < _out_err(w, (q - z) * s, x) / 3


def _toy(seed):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=65, n_layer=2, n_embd=64, n_head=2, block_size=32, dropout=0.0)
    return (GPTLanguageModel(cfg).eval(), torch.randint(0, 65, (32, 32)),
            torch.randint(0, 65, (32, 32)))


def _final_err(model, calib, test, config_cls=GPTQConfig, **cfg):
    q = copy.deepcopy(model)
    kvant.quantize(q, config_cls(**cfg), calib, EngineOptions(device="cpu", show_progress=False))
    with torch.no_grad():
        return float((q(test)[0] - model(test)[0]).pow(2).mean()), q


def test_true_sequential_beats_float_inputs_on_a_two_block_model():
    # measured ratio ~0.85 on held-out tokens over 12 seeds; every seed must win
    ratios = []
    for seed in range(4):
        model, calib, test = _toy(seed)
        seq, _ = _final_err(model, calib, test, bits=2, group_size=-1, true_sequential=True)
        flat, _ = _final_err(model, calib, test, bits=2, group_size=-1, true_sequential=False)
        ratios.append(seq / flat)
    assert max(ratios) < 1.0 and sum(ratios) / len(ratios) < 0.93, ratios


def test_engine_installs_act_order_layers_and_reports():
    model, calib, test = _toy(0)
    err, q = _final_err(model, calib, test, bits=4, group_size=32, act_order=True)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * (3 * 2 + 3) and all(m.g_idx is not None for m in layers)
    err_rtn, _ = _final_err(model, calib, test, kvant.RTNConfig, bits=4, group_size=32)
    assert err < 0.7 * err_rtn, (err, err_rtn)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gs, ao, st", [(-1, False, False), (32, False, False),
                                        (64, True, False), (32, True, True)])
def test_cuda_graph_walk_equals_eager(gs, ao, st):
    w, x, H = _layer(seed=29, n=256, k=512)
    args = QuantArgs(4, gs)
    a = gptq_quantize(w.cuda(), H.cuda(), args, act_order=ao, static_groups=st, block_size=64)
    b = gptq_quantize(w.cuda(), H.cuda(), args, act_order=ao, static_groups=st, block_size=64,
                      cuda_graph=False)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
