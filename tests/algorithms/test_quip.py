"""QuIP: rotation algebra, the rotated QuantLinear, outliers at 2 bits, save -> load."""

import json

import pytest
import torch

import kvant
from kvant.algorithms.quip import (layer_seed, rescale_factor, rotate_hessian, rotate_weight,
                                   transforms_for)
from kvant.algorithms.registry import build, config_from_spec
from kvant.config import ConfigError, GPTQConfig, QuIPConfig, RTNConfig
from kvant.model.nanogpt import GPTConfig, GPTLanguageModel
from kvant.nn.qlinear import quant_linear_class
from kvant.nn.quip_linear import QuipLinear

QUIET = kvant.EngineOptions(show_progress=False)


def _quantize_layer(cfg, W, X, name="blocks.0.fc"):
    lq = build(cfg).layer_quantizer(name, W)
    lq.observe(X)
    res = lq.quantize()
    return res, quant_linear_class(res.layer_kind).from_result(res, None, dtype=torch.float32)


def _outlier_layer(seed=0, n=64, k=128):
    """Weights with two large entries per row, inputs with four loud channels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) * 0.02
    W.scatter_(1, torch.randint(0, k, (n, 2), generator=g), torch.randn(n, 2, generator=g) * 0.5)
    X = torch.randn(1024, k, generator=g)
    X[:, :4] *= 15
    return W, X


def _rel_err(ql, W, X):
    y = X @ W.t()
    return float(((ql(X) - y) ** 2).mean() / (y ** 2).mean())


def test_config_spec_and_validation():
    cfg = config_from_spec("quip:bits=2,group_size=64")
    assert isinstance(cfg, QuIPConfig) and cfg.bits == 2 and cfg.group_size == 64
    assert cfg.rounding == "ldlq" and QuIPConfig.from_dict(cfg.to_dict()) == cfg
    assert config_from_spec("quip:bits=3,rounding=rtn,rescale=true").rescale
    with pytest.raises(ConfigError, match="rounding"):
        QuIPConfig(rounding="nearest")
    with pytest.raises(ConfigError, match="act_order needs"):
        QuIPConfig(rounding="rtn", act_order=True)
    with pytest.raises(ConfigError, match="group_size=0"):
        QuIPConfig(group_size=0)
    with pytest.raises(ConfigError, match="unknown QuIPConfig keys"):
        config_from_spec("quip:bits=2,sede=1")


def test_needs_calibration_only_when_used():
    assert build(QuIPConfig()).needs_calibration
    assert not build(QuIPConfig(rounding="rtn")).needs_calibration
    assert build(QuIPConfig(rounding="rtn", rescale=True)).needs_calibration


def test_layer_seeds_stable_and_distinct():
    assert layer_seed(0, "a.b", "in") == layer_seed(0, "a.b", "in")  # no salted hash()
    seeds = {layer_seed(s, name, side) for s in (0, 1) for name in ("a", "b")
             for side in ("in", "out")}
    assert len(seeds) == 8


@pytest.mark.parametrize("n,k", [(48, 64), (86, 52)])  # Hadamard factors / random factors
def test_rotation_is_the_dense_product(n, k):
    torch.manual_seed(0)
    W, A = torch.randn(n, k, dtype=torch.float64), torch.randn(k, 3 * k, dtype=torch.float64)
    H = A @ A.t()
    U, V = transforms_for("x", n, k, seed=5)
    Um, Vm = U.matrix().double(), V.matrix().double()
    torch.testing.assert_close(rotate_weight(W, U, V), Um @ W @ Vm.t(), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate_hessian(H, V), Vm @ H @ Vm.t(), atol=1e-3, rtol=1e-5)
    # the proxy loss tr(E H Eᵀ) of any error E is unchanged by the rotation
    E = torch.randn(n, k, dtype=torch.float64)
    loss = torch.trace(E @ H @ E.t())
    loss_r = torch.trace(rotate_weight(E, U, V) @ rotate_hessian(H, V)
                         @ rotate_weight(E, U, V).t())
    torch.testing.assert_close(loss_r, loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("n,k,gs,rescale,rounding", [
    (48, 64, 32, False, "ldlq"), (86, 52, -1, True, "ldlq"), (48, 64, 16, True, "rtn")])
def test_forward_matches_fake_quantized_float(n, k, gs, rescale, rounding):
    torch.manual_seed(1)
    W, X = torch.randn(n, k), torch.randn(256, k)
    bias = torch.randn(n)
    cfg = QuIPConfig(bits=3, group_size=gs, rescale=rescale, rounding=rounding, seed=3)
    lq = build(cfg).layer_quantizer("blk.lin", W)
    lq.observe(X)
    res = lq.quantize()
    assert res.layer_kind == "quip" and ("input_scale" in res.extras) == rescale
    ql = QuipLinear.from_result(res, bias, dtype=torch.float32)
    assert (ql.factor_in is not None) == (k == 52) and (ql.factor_out is not None) == (n == 86)
    # the float computation: Uᵀ Q(W̃) V D⁻¹ with the dense matrices of the seeded transforms
    U, V = transforms_for("blk.lin", n, k, seed=3)
    s, z = res.scales, res.zeros
    if gs > 0:
        s, z = s.repeat_interleave(gs, 1), z.repeat_interleave(gs, 1)
    Wq = ((res.qweight.float() - z) * s).half().float()  # the stored grid values are fp16
    D = ql.input_scale.float() if rescale else torch.ones(k)
    W_eff = U.matrix().t() @ Wq @ V.matrix() / D
    torch.testing.assert_close(ql.dequantized_weight(), W_eff * D, atol=1e-5, rtol=0)
    x = torch.randn(2, 5, k)
    torch.testing.assert_close(ql(x), x @ W_eff.t() + bias, atol=1e-4, rtol=1e-5)
    # low-precision activations go through the same path; random factors stay float32
    y16 = ql.half()(x.half())
    assert y16.dtype == torch.float16
    assert ql.factor_in is None or ql.factor_in.dtype == torch.float32
    torch.testing.assert_close(y16.float(), x @ W_eff.t() + bias, atol=0.05, rtol=0.02)


def test_incoherence_beats_plain_gptq_on_outliers_at_2_bits():
    for seed in (0, 1):
        W, X = _outlier_layer(seed)
        _, plain = _quantize_layer(GPTQConfig(bits=2, group_size=-1, clip=True), W, X)
        res, rot = _quantize_layer(QuIPConfig(bits=2, group_size=-1, clip=True), W, X)
        e_plain, e_rot = _rel_err(plain, W, X), _rel_err(rot, W, X)
        assert e_rot < 0.5 * e_plain, (seed, e_rot, e_plain)
        assert res.info["mu_after"] < 0.2 * res.info["mu_before"]  # flattened weights


def test_rescale_helps_on_uneven_columns():
    W, X = _outlier_layer(2)
    _, plain = _quantize_layer(QuIPConfig(bits=2, group_size=-1), W, X)
    _, resc = _quantize_layer(QuIPConfig(bits=2, group_size=-1, rescale=True), W, X)
    assert _rel_err(resc, W, X) < 0.8 * _rel_err(plain, W, X)
    D = rescale_factor(W, X.t() @ X)
    assert D.shape == (128,) and torch.equal(D, D.half().float())


def test_rotation_plus_rtn_on_heavy_tailed_weights():
    # heavy-tailed weights everywhere (Student t, 3 dof): the rotation alone helps RTN, both
    # for Gaussian-like rows and for input columns of very different scales
    torch.manual_seed(0)
    heavy = torch.distributions.StudentT(3.0).sample((64, 128))
    uneven = torch.randn(64, 128) * torch.randn(1, 128).exp()
    X = torch.randn(512, 128)
    for W in (heavy, uneven):
        _, plain = _quantize_layer(RTNConfig(bits=2, group_size=-1, clip=True), W, X)
        _, rot = _quantize_layer(QuIPConfig(bits=2, group_size=-1, rounding="rtn", clip=True),
                                 W, X)
        assert _rel_err(rot, W, X) < 0.75 * _rel_err(plain, W, X)


@pytest.mark.parametrize("cfg,gpt", [
    (QuIPConfig(bits=2, group_size=32, seed=4), GPTConfig(65, 64, 2, 2, 32, 0.0)),
    (QuIPConfig(bits=3, group_size=-1, rescale=True), GPTConfig(65, 86, 2, 1, 32, 0.0)),
    (QuIPConfig(bits=4, group_size=32, rounding="rtn"), GPTConfig(65, 64, 2, 1, 32, 0.0))])
def test_save_load_identical(cfg, gpt, tiny_gpt, tiny_calib, tmp_path):
    _, tok = tiny_gpt
    torch.manual_seed(0)
    model = GPTLanguageModel(gpt).eval()
    x = torch.randint(0, 65, (2, 32))
    with torch.no_grad():
        ref = model(x)[0]
    report = kvant.quantize(model, cfg, tiny_calib, options=QUIET)
    assert len(report.layers) == gpt.n_layer * (3 * gpt.n_head + 3)  # k/q/v per head, proj, ffn
    out = kvant.save_quantized(model, tmp_path / "q", tok)
    loaded, _ = kvant.load_quantized(out)
    with torch.no_grad():
        y, y2 = model(x)[0], loaded(x)[0]
    assert torch.equal(y, y2)
    assert float((y - ref).abs().mean()) < float(ref.abs().mean())  # still a model
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "quip" and {e["kind"] for e in qc["modules"].values()} == {"quip"}
    assert loaded.kvant_quantization_config == cfg
    ql = next(m for m in loaded.modules() if isinstance(m, QuipLinear))
    # layers reading the same input share V (heads' key/query/value), not U
    heads = loaded.blocks[0].sa.heads
    if not cfg.rescale and cfg.rounding == "ldlq":
        assert torch.equal(heads[0].key.sign_in, heads[1].value.sign_in)
        assert not torch.equal(heads[0].key.sign_out, heads[1].value.sign_out)
    # signs cost one bit per input and output channel
    assert ql.sign_in.dtype == torch.uint8 and ql.sign_in.numel() == (ql.in_features + 7) // 8


def test_shared_input_rotation_is_reused_exactly():
    torch.manual_seed(0)
    W1, W2, X = torch.randn(48, 64), torch.randn(32, 64), torch.randn(256, 64)
    method = build(QuIPConfig(bits=4, group_size=32))
    method.prepare_block(None, {}, [["a", "b"]], None, None)
    layers = []
    for name, W in (("blk.0.a", W1), ("blk.0.b", W2)):
        lq = method.layer_quantizer(name, W)
        lq.observe(X)
        layers.append(QuipLinear.from_result(lq.quantize(), None, dtype=torch.float32))
    a, b = layers
    assert torch.equal(a.sign_in, b.sign_in) and not torch.equal(a.sign_out[:4], b.sign_out[:4])
    x = torch.randn(3, 64)
    a(x)
    memo_y = b(x)  # reuses a's V x
    assert QuipLinear._last_input[0][0]() is x  # the memo holds (input key, V digest, V x)
    QuipLinear._last_input = None
    assert torch.equal(b(x), memo_y)
    x.mul_(2)  # in-place change: the memo must not be used
    torch.testing.assert_close(b(x), 2 * memo_y, rtol=1e-5, atol=1e-5)


def test_wrong_factorisation_is_refused():
    with pytest.raises(NotImplementedError, match="dense factor of order 12"):
        QuipLinear(64, 48, 4, -1, m_in=12)
    with pytest.raises(ValueError, match="sign_in"):
        W, X = _outlier_layer(0)
        res, _ = _quantize_layer(QuIPConfig(bits=4, group_size=-1), W, X)
        del res.extras["sign_in"]
        QuipLinear.from_result(res, None)


def test_layer_without_calibration_input_rounds_with_identity_hessian():
    W = torch.randn(48, 64)
    res = build(QuIPConfig(bits=4, group_size=32)).layer_quantizer("blk.0.unused", W).quantize()
    ql = QuipLinear.from_result(res, None, dtype=torch.float32)
    err = (ql.dequantized_weight() - W).pow(2).mean() / W.pow(2).mean()
    assert float(err) < 0.02  # 4-bit g32 rounding of a Gaussian: ~1% relative error
