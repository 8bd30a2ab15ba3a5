"""SpQR: bits accounting, CSR product, threshold selection, save -> load, outlier budget."""

import math

import pytest
import torch

import kvant
from kvant.algorithms.registry import config_from_spec
from kvant.algorithms.spqr import drop_gain, select_outliers, spqr_gptq, spqr_rtn
from kvant.config import ConfigError, SpQRConfig
from kvant.core.outliers import real_zero_grid as _first_level, round_on_grid as fake_quantize
from kvant.core.stats import dequantize_stats, quantize_stats
from kvant.model.nanogpt import CharTokenizer, GPTConfig, GPTLanguageModel
from kvant.nn.qlinear import quant_linear_class
from kvant.nn.spqr_linear import SpQRLinear, csr_matmul, to_csr


def _layer(n=32, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) * 0.02
    X = torch.randn(256, k, generator=g)
    return W, 2 * X.T @ X / 256


def test_kind_registered_and_spec_parses():
    assert quant_linear_class("spqr") is SpQRLinear
    cfg = config_from_spec("spqr:bits=3,group_size=16,stat_bits=3,stat_group_size=16,"
                           "outlier_threshold=0.2,act_order=true")
    assert cfg == SpQRConfig()
    assert config_from_spec("spqr:outlier_threshold=inf").outlier_threshold == math.inf
    assert SpQRConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="stat_bits"):
        SpQRConfig(stat_bits=5)
    with pytest.raises(ConfigError, match="base"):
        SpQRConfig(base="awq")
    with pytest.raises(ConfigError, match="group_size"):
        SpQRConfig(group_size=-1)


@pytest.mark.parametrize("spec", ["spqr:", "spqr:stat_bits=16,group_size=32,act_order=false",
                                  "spqr:base=rtn,outlier_budget=0.02",
                                  "spqr:outlier_threshold=inf"])
def test_bits_per_weight_matches_stored_bytes(spec):
    W, H = _layer()
    cfg = config_from_spec(spec)
    res = (spqr_gptq if cfg.base == "gptq" else spqr_rtn)(W, H, cfg, "l")
    m = SpQRLinear.from_result(res, torch.zeros(32), torch.float32)
    n, k = W.shape
    nnz = res.info["outliers"]
    assert (nnz == 0) == ("inf" in spec) and m.nnz == nnz
    assert (m.outlier_vals is None) if nnz == 0 else m.outlier_vals.numel() == nnz
    stored = sum(t.numel() * t.element_size() for name, t in m.state_dict().items()
                 if name != "bias")
    assert m.bits_per_weight() == pytest.approx(8 * stored / (n * k), abs=1e-12)
    # the formula: dense + CSR (row ptrs int32, cols int16, fp16 values) + stats + perm
    g = k // cfg.group_size
    if cfg.stat_bits < 16:
        stats = 2 * 4 * math.ceil(n * g * cfg.stat_bits / 32) + 2 * 2 * 2 * (n // 16) * g
    else:
        stats = 2 * n * g + 4 * n * math.ceil(g * cfg.bits / 32)
    expect = (4 * n * math.ceil(k * cfg.bits / 32) + (4 * (n + 1) + 4 * nnz if nnz else 0) + stats
              + (2 * k if cfg.act_order and cfg.base == "gptq" else 0))
    assert stored == expect
    assert sum(m.bits_breakdown().values()) == pytest.approx(m.bits_per_weight())


def test_csr_product_equals_dense_reference():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(24, 40, generator=g) < 0.1
    mask[5] = False  # an empty row
    vals = torch.randn(24, 40, generator=g).half().float()
    rowptr, cols, v = to_csr(mask, vals, torch.int16)
    assert rowptr.dtype == torch.int32 and cols.dtype == torch.int16 and v.dtype == torch.float16
    assert int(rowptr[-1]) == int(mask.sum()) and rowptr[6] == rowptr[5]
    x = torch.randn(3, 7, 40, generator=g)
    dense = torch.where(mask, vals, torch.zeros_like(vals))
    torch.testing.assert_close(csr_matmul(x, rowptr, cols, v, 24), x @ dense.T,
                               rtol=1e-5, atol=1e-5)
    empty = to_csr(torch.zeros(4, 8, dtype=torch.bool), torch.zeros(4, 8), torch.int16)
    assert torch.equal(csr_matmul(torch.ones(2, 8), *empty, 4), torch.zeros(2, 4))


def test_layer_forward_is_dense_plus_sparse():
    W, H = _layer()
    W[4, 10] = 0.3
    res = spqr_gptq(W, H, SpQRConfig(), "l")
    m = SpQRLinear.from_result(res, None, torch.float32)
    x = torch.randn(5, 64)
    full = m.dequantized_weight()
    torch.testing.assert_close(m(x), x @ full.T, rtol=1e-5, atol=1e-6)
    assert res.extras["outlier_mask"][4, 10]
    # with H = I (no error feedback) the outliers keep their own value, to fp16 of the residual
    res = spqr_gptq(W, torch.eye(64), SpQRConfig(), "l")
    full = SpQRLinear.from_result(res, None, torch.float32).dequantized_weight()
    err = (full - W).abs()
    mask = res.extras["outlier_mask"]
    assert err[mask].max() < 1e-4 < err[~mask].max()


def test_stats_round_trip_exact():
    x = torch.rand(32, 5) * 0.1 + 0.01
    q, p, deq = quantize_stats(x, 3, 16, positive=True)
    assert q.min() >= 0 and q.max() <= 7 and p.dtype == torch.float16 and p.shape == (2, 2, 5)
    assert torch.equal(dequantize_stats(q, p, positive=True), deq)
    assert (deq - x).abs().max() <= p[1].float().max() / 2 + 1e-6


def test_threshold_picks_exactly_the_planted_outliers():
    # H = I: no error feedback between columns, d_j equal; a few weights 40x the rest
    g = torch.Generator().manual_seed(0)
    n, k = 32, 64
    W = torch.rand(n, k, generator=g) * 0.02 - 0.01
    planted = [(1, 3), (7, 40), (20, 17), (31, 63), (12, 0)]
    for r, c in planted:
        W[r, c] = 0.4 if c % 2 else -0.4
    res = spqr_gptq(W, torch.eye(k), SpQRConfig(act_order=False), "l")
    mask = res.extras["outlier_mask"]
    want = torch.zeros(n, k, dtype=torch.bool)
    for r, c in planted:
        want[r, c] = True
    assert torch.equal(mask, want)
    # the rest of the weights are on a grid fit without the planted ones
    assert res.info["outliers"] == len(planted)
    # a threshold above the planted weights' sensitivity keeps no outlier
    res = spqr_gptq(W, torch.eye(k), SpQRConfig(act_order=False, outlier_threshold=1e6), "l")
    assert res.info["outliers"] == 0


def test_drop_gain_matches_brute_force():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, generator=g)
    wt = torch.rand(8, generator=g) + 0.5
    excl = torch.zeros(6, 8, dtype=torch.bool)
    gain, idx = drop_gain(x, wt, excl, 3)

    def err(row, w):
        s, z = _first_level(row, 3, False)
        return float(((fake_quantize(row, s, z, 3)[1] - row).square() * w).sum())

    for r in range(6):
        row = x[r:r + 1]
        base = err(row, wt)
        loo = []
        for i in range(8):
            keep = [j for j in range(8) if j != i]
            loo.append(base - err(row[:, keep], wt[keep]))
        # the best of the leave-one-out gains among the row's extremes
        ext = [int(row.argmin()), int(row.argmax())]
        best = max(ext, key=lambda i: loo[i])
        assert int(idx[r]) == best and float(gain[r]) == pytest.approx(loo[best], rel=1e-4)
        # a non-extreme weight never changes the grid: its gain is its own error term
        for i in set(range(8)) - set(ext):
            own = base - err(row, wt * (torch.arange(8) != i))
            assert loo[i] == pytest.approx(own, rel=1e-4, abs=1e-9)


def test_budget_selects_exact_count_and_helps():
    W, H = _layer(64, 64, seed=2)
    W[3, 9] = 0.5
    mask = select_outliers(W, H.diagonal(), 0.01, 16, 3)
    assert 0.7 * 0.01 * W.numel() <= int(mask.sum()) <= round(0.01 * W.numel()) and mask[3, 9]
    errs = []
    for budget in (0.0, 0.02):
        cfg = SpQRConfig(base="rtn", outlier_budget=budget)
        m = SpQRLinear.from_result(spqr_rtn(W, H, cfg, "l"), None, torch.float32)
        e = m.dequantized_weight() - W
        errs.append(float((e @ H * e).sum()))
    assert errs[1] < 0.8 * errs[0]


@pytest.mark.parametrize("spec", ["spqr:", "spqr:base=rtn,outlier_budget=0.01,act_order=false"])
def test_save_load_identical(tmp_path, spec):
    torch.manual_seed(0)
    model = GPTLanguageModel(GPTConfig(n_layer=1, n_embd=64, n_head=2, block_size=32,
                                       dropout=0.0)).eval()
    tok = CharTokenizer("".join(chr(c) for c in range(32, 97)))
    calib = torch.randint(0, 65, (8, 32), generator=torch.Generator().manual_seed(1))
    report = kvant.quantize(model, config_from_spec(spec), calib,
                            kvant.EngineOptions(show_progress=False, device="cpu"))
    assert sum(r["outliers"] for r in report.layers.values()) > 0
    assert all(type(m) is SpQRLinear for n, m in model.named_modules() if "key" in n)
    out = kvant.save_quantized(model, tmp_path / "q", tok)
    loaded, _ = kvant.load_quantized(out)
    x = torch.randint(0, 65, (2, 32))
    assert torch.equal(loaded(x), model(x))
    for (n1, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_matches_cpu():
    W, H = _layer()
    m = SpQRLinear.from_result(spqr_gptq(W, H, SpQRConfig(), "l"), torch.ones(32), torch.float16)
    x = torch.randn(4, 64, dtype=torch.float16)
    ref = (x.float() @ m.dequantized_weight().T + 1).half()
    y = m.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-3)
    # the walk itself on the GPU picks the same kind of result
    res = spqr_gptq(W.cuda(), H.cuda(), SpQRConfig(), "l")
    assert res.info["outliers"] > 0 and res.qweight.device.type == "cpu"


def test_walk_order_is_checked_after_the_walk():
    """The hooks record each column's inverse-Hessian diagonal (no per-column host sync) and
    check the order once: a walk that skips or swaps columns is refused, naming the first."""
    from kvant.algorithms.spqr import OutlierWalk

    W, H = _layer(n=32, k=16, seed=3)
    U = torch.linalg.cholesky(torch.linalg.inv(H + 0.01 * torch.eye(16)), upper=True)
    cfg = SpQRConfig(act_order=False, group_size=16)
    hooks = OutlierWalk(W, cfg, "l")
    hooks.on_inverse(U, None)
    order = list(range(16))
    order[5], order[6] = 6, 5
    s, z = hooks.group_params(W.clone())
    for i in order:
        hooks.quantize_column(W[:, i].clone(), s, z, U[i, i])
    with pytest.raises(RuntimeError, match="unexpected order \\(column 5 of 16"):
        hooks.check_order()
    res = spqr_gptq(W, H, cfg, "l")  # the real walk passes the check
    assert res.qweight.shape == W.shape
