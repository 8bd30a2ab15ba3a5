"""AWQ: scale folding is exact, the search beats RTN where activations have outliers,
clipping never hurts its objective, configs parse, and AWQ+GPTQ runs."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from kvant.algorithms.awq import AWQ
from kvant.algorithms.awq_search import search_clip
from kvant.algorithms.registry import config_from_spec
from kvant.calib.capture import capture_block_inputs, run_block
from kvant.calib.engine import quantize_model, sequential_groups
from kvant.config import AWQConfig, ConfigError, EngineOptions, RTNConfig
from kvant.core.grid import fake_quantize, find_params
from kvant.model import fold
from kvant.model.discovery import find_blocks, find_linears

# fp32 folding: every scale is applied exactly once to a weight and once (inverted) to a
# predecessor, so outputs agree up to float32 rounding of the products
FOLD_RTOL = 1e-5
CPU = EngineOptions(device="cpu", show_progress=False, batch_size=4)


def tiny_llama(kv_heads: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def logits(model, ids):
    out = model(ids)
    return getattr(out, "logits", out)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def walk_blocks(model, calib, fn):
    """Call fn(block, linears, groups, inputs) on every block, feeding float outputs on."""
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], torch.split(calib, 4), "cpu")
    for block in blocks:
        linears = find_linears(block)
        groups = sequential_groups(block, linears, inputs[0])
        fn(block, linears, groups, inputs)
        inputs = [i.with_hidden(o) for i, o in zip(inputs, run_block(block, inputs))]


def random_scale_fold(model, calib, seed=0):
    """Apply random scales s = exp(N(0, 0.5)) to every group, folded by probed plans."""
    g = torch.Generator().manual_seed(seed)
    plans = []

    def fn(block, linears, groups, inputs):
        for names in groups:
            plan = fold.find_fold_plan(block, names[0], set(names), inputs[0], 1e-4)
            k = plan.free.numel()
            s = torch.exp(0.5 * torch.randn(k, generator=g))
            fold.apply_scales(block, names, plan, s)
            plans.append((names, plan))

    walk_blocks(model, calib, fn)
    return plans


def test_fold_is_exact_on_nanogpt_block(tiny_gpt, tiny_calib):
    model, _ = tiny_gpt
    ref = logits(model, tiny_calib)
    plans = random_scale_fold(model, tiny_calib)
    assert rel_err(logits(model, tiny_calib), ref) < FOLD_RTOL
    where = {names[0]: plan for names, plan in plans[:4]}
    assert [s.module for s in where["sa.heads.0.key"].sources] == ["ln1"]
    assert [s.module for s in where["sa.proj"].sources] == ["sa.heads.0.value",
                                                            "sa.heads.1.value"]
    assert [s.module for s in where["ffwd.net.0"].sources] == ["ln2"]
    assert [s.module for s in where["ffwd.net.2"].sources] == ["ffwd.net.0"]
    # value rows map one-to-one onto proj's input columns (head h -> columns h*hs...)
    v1 = where["sa.proj"].sources[1]
    assert torch.equal(v1.channels, v1.rows + 32)
    assert all(int(p.free.sum()) == 0 for _, p in plans)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fold_is_exact_on_tiny_llama(kv_heads):
    model = tiny_llama(kv_heads)
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    ref = logits(model, calib)
    plans = random_scale_fold(model, calib)
    assert rel_err(logits(model, calib), ref) < FOLD_RTOL
    where = {names[0]: plan for names, plan in plans[:4]}
    assert [s.module for s in where["self_attn.q_proj"].sources] == ["input_layernorm"]
    assert [s.module for s in where["mlp.gate_proj"].sources] == ["post_attention_layernorm"]
    assert [s.module for s in where["mlp.down_proj"].sources] == ["mlp.up_proj"]
    o = where["self_attn.o_proj"]
    if kv_heads == 4:  # v rows map one-to-one onto o_proj columns: fold
        assert [s.module for s in o.sources] == ["self_attn.v_proj"] and not o.free.any()
    else:  # grouped-query attention repeats v heads: no one-to-one fold, input scaling
        assert not o.sources and bool(o.free.all())


def test_prepare_block_keeps_float_model_exact(tiny_gpt, tiny_calib):
    """The whole AWQ preparation (search, fold, verify) leaves the float function intact."""
    model, _ = tiny_gpt
    ref = logits(model, tiny_calib)
    method = AWQ(AWQConfig(bits=3, group_size=32, n_grid=5, clip_search=False))
    reports = []
    walk_blocks(model, tiny_calib, lambda b, lin, grp, inp: reports.append(
        method.prepare_block(b, lin, grp, inp, run_block)))
    assert rel_err(logits(model, tiny_calib), ref) < FOLD_RTOL
    groups = [g for r in reports for g in r["awq"]]
    assert len(groups) == 8 and all(g["treatment"].startswith("fold->") for g in groups)
    assert all(g["loss"] <= g["loss_rtn"] for g in groups)


class _OutlierModel(nn.Module):
    """Embedding -> one block (LayerNorm with a few huge channels -> Linear) -> head."""

    def __init__(self, k=64, n_out=8):
        super().__init__()
        self.emb = nn.Embedding(32, k)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(k), nn.Linear(k, k))])
        self.head = nn.Linear(k, n_out)
        with torch.no_grad():
            self.blocks[0][0].weight[:4] = 30.0  # 4 input channels with large activations

    def forward(self, ids):
        return self.head(self.blocks[0](self.emb(ids)))


def test_awq_beats_rtn_with_activation_outliers():
    torch.manual_seed(0)
    float_model = _OutlierModel().eval()
    ids = torch.randint(0, 32, (8, 16), generator=torch.Generator().manual_seed(1))
    ref = float_model(ids).detach()
    errs = {}
    for name, cfg in {"rtn": RTNConfig(bits=3, group_size=32),
                      "awq": AWQConfig(bits=3, group_size=32, clip_search=False)}.items():
        m = copy.deepcopy(float_model)
        quantize_model(m, cfg, ids, CPU)
        errs[name] = float((m(ids) - ref).detach().pow(2).mean())
    assert errs["awq"] < 0.5 * errs["rtn"], errs  # measured: 0.17x


def test_clip_search_never_worse_than_minmax():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    w[:, 3] *= 8  # one column with a wide range makes clipping worth it
    x = torch.randn(128, 64, generator=g)
    cfg = AWQConfig(bits=3, group_size=32)

    def err(wq_src):
        s, z = find_params(wq_src.reshape(-1, 32), 3, False)
        q = fake_quantize(wq_src.reshape(-1, 32), s, z, 3).reshape(16, 64)
        return float((x @ q.t() - x @ w.t()).pow(2).sum())

    clipped, shrink = search_clip(w, x, cfg.qargs, n_grid=20, max_shrink=0.5)
    assert shrink < 1.0
    assert err(clipped) <= err(w)
    assert (clipped.abs() <= w.abs() + 1e-7).all()


def test_config_spec_and_validation():
    cfg = config_from_spec("awq:bits=4,group_size=64")
    assert isinstance(cfg, AWQConfig) and (cfg.bits, cfg.group_size, cfg.sym) == (4, 64, False)
    cfg = config_from_spec("awq:bits=3,rounding=gptq,duo_scaling=true")
    assert cfg.rounding == "gptq" and cfg.duo_scaling
    assert AWQConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="rounding"):
        AWQConfig(rounding="nearest")
    with pytest.raises(ConfigError, match="n_grid"):
        AWQConfig(n_grid=0)


def test_awq_gptq_and_input_scale_on_gqa_llama():
    model = tiny_llama(kv_heads=2)
    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    ref = logits(model, calib)
    report = quantize_model(model, AWQConfig(bits=4, group_size=32, rounding="gptq", n_grid=5),
                            calib, CPU)
    o = model.model.layers[0].self_attn.o_proj
    assert o.input_scale is not None and not torch.all(o.input_scale == 1)
    assert model.model.layers[0].self_attn.q_proj.input_scale is None
    assert "input_scale" in report.layers["model.layers.0.self_attn.o_proj"]["awq_scale"]
    assert rel_err(logits(model, calib), ref) < 0.5


def test_unfoldable_channels_left_unscaled_make_an_exportable_model(tmp_path):
    """scale_unfoldable=False: o_proj under GQA stays unscaled (AutoAWQ's choice), no layer
    has an input_scale, and the model exports to the GPTQ and AWQ layouts; with the default
    the input scale is kept and the exporter refuses it."""
    from kvant.formats.hf_export import ExportError, export_hf

    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_llama(kv_heads=2)
    report = quantize_model(model, AWQConfig(bits=4, group_size=32, n_grid=5, sym=True,
                                             scale_unfoldable=False), calib, CPU)
    layers = [m for m in model.modules() if hasattr(m, "input_scale")]
    assert layers and all(m.input_scale is None for m in layers)
    info = report.layers["model.layers.0.self_attn.o_proj"]["awq_scale"]
    assert "input_scale" not in info
    # q/k/v, gate/up and down still get their folds
    assert "fold->" in report.layers["model.layers.0.self_attn.q_proj"]["awq_scale"]
    for fmt in ("gptq", "awq"):
        assert (export_hf(model, tmp_path / fmt, fmt) / "config.json").exists()
    default = tiny_llama(kv_heads=2)
    quantize_model(default, AWQConfig(bits=4, group_size=32, n_grid=5, sym=True), calib, CPU)
    with pytest.raises(ExportError, match="input scale"):
        export_hf(default, tmp_path / "refused", "awq")
    with pytest.raises(ConfigError, match="scale nothing"):
        AWQConfig(fold=False, scale_unfoldable=False)


def test_single_linear_search_uses_exact_quadratic_form():
    """For a group of one Linear, the Gram-matrix loss equals the output MSE it replaces."""
    from kvant.algorithms.awq_search import GroupCapture, capture_groups, search_scale
    from kvant.calib.capture import BlockInput

    torch.manual_seed(0)
    block = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 32))
    x = torch.randn(4, 16, 64) * torch.linspace(0.1, 5, 64)
    inputs = [BlockInput((x,), {})]
    cap = capture_groups(block, [("1", "1")], inputs)[0]
    assert cap.gram is not None and not cap.calls
    h = block[0](x)
    direct = GroupCapture(abs_sum=cap.abs_sum, tokens=cap.tokens,
                          calls=[((h,), {}, block[1](h))])
    args = AWQConfig(bits=3, group_size=32).qargs
    keep = torch.ones(64, dtype=torch.bool)
    s1, i1 = search_scale(block[1], [block[1]], cap, args, 5, False, keep)
    s2, i2 = search_scale(block[1], [block[1]], direct, args, 5, False, keep)
    assert i1["alpha"] == i2["alpha"] and torch.equal(s1, s2)
    assert i1["loss"] == pytest.approx(i2["loss"], rel=1e-4)
    assert i1["loss_rtn"] == pytest.approx(i2["loss_rtn"], rel=1e-4)


def test_awq_in_half_precision_keeps_dtypes():
    """A float16 model (AutoAWQ's default dtype) stays float16 through search, fold, clip."""
    model = tiny_llama(kv_heads=2)
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    ref = logits(model, calib)
    model.half()
    report = quantize_model(model, AWQConfig(bits=4, group_size=32, n_grid=4), calib, CPU)
    out = logits(model, calib)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert rel_err(out.float(), ref) < 0.5
    groups = [g for b in report.blocks for g in b["awq"]]
    assert all(not g["treatment"].startswith("not scaled") for g in groups)
    assert all(p.dtype == torch.float16 for p in model.parameters())


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_outlier_budget_on_awq_keeps_fp16_outliers(rounding, tmp_path):
    """AWQ (+GPTQ) with an outlier budget: SpQRLinear layers holding the budgeted fraction of
    fp16 outliers (input scales included where not foldable), a lower logit error than the
    same AWQ without outliers, and an identical reload."""
    import kvant
    from kvant.nn.spqr_linear import SpQRLinear

    calib = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    errs = {}
    for budget in (0.0, 0.02):
        model = tiny_llama(kv_heads=2)
        ref = logits(model, calib)
        cfg = AWQConfig(bits=2, group_size=32, rounding=rounding, n_grid=5,
                        clip_search=False, outlier_budget=budget)
        quantize_model(model, cfg, calib, CPU)
        errs[budget] = float((logits(model, calib) - ref).pow(2).mean())
    layers = [m for m in model.modules() if isinstance(m, SpQRLinear)]
    assert len(layers) == 14  # 7 Linears in each of the 2 blocks
    for m in layers:
        numel = m.in_features * m.out_features
        assert 0.015 * numel <= m.nnz <= math.ceil(0.02 * numel), m.nnz
        assert m.bits_breakdown()["outliers"] > 0
    o = model.model.layers[0].self_attn.o_proj
    assert o.input_scale is not None  # GQA: v -> o is not foldable, the scale stays explicit
    assert errs[0.02] < errs[0.0], errs
    out = logits(model, calib)
    kvant.save_quantized(model, tmp_path / "ck")
    back, _ = kvant.load_quantized(tmp_path / "ck")
    assert torch.equal(logits(back, calib), out)


def test_outlier_budget_validation():
    with pytest.raises(ConfigError, match="outlier_budget"):
        AWQConfig(outlier_budget=0.6)
    with pytest.raises(ConfigError, match="group_size"):
        AWQConfig(group_size=-1, outlier_budget=0.01)


def test_outliers_keep_their_unclipped_values():
    """With a clip search and an outlier budget, the grid is fitted to the clipped weight but
    every outlier stores the weight's value before the clip (fp16-exact)."""
    from kvant.algorithms.awq_layer import AWQLayer as _AWQLayer
    from kvant.nn.spqr_linear import SpQRLinear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    clipped = w.clamp(-1.5, 1.5)  # ~13% of the weights lose range
    cfg = AWQConfig(bits=3, group_size=32, outlier_budget=0.02)
    layer = _AWQLayer("l", clipped, cfg, None, {}, unclipped=w)
    layer.observe(torch.randn(256, 64, generator=g))
    m = SpQRLinear.from_result(layer.quantize(), None, dtype=torch.float32)
    deq = m.dequantized_weight()
    mask = torch.zeros_like(w, dtype=torch.bool)
    counts = (m.outlier_rowptr[1:] - m.outlier_rowptr[:-1]).long()
    mask[torch.repeat_interleave(torch.arange(32), counts), m.outlier_cols.long()] = True
    was_clipped = mask & ((w - clipped).abs() > 0.05)
    assert int(mask.sum()) >= 40 and int(was_clipped.sum()) >= 3
    # dense part + fp16 residual = the unclipped weight (to the residual's fp16 rounding)
    assert torch.allclose(deq[mask], w[mask], atol=2e-3)
    assert float((deq[was_clipped] - clipped[was_clipped]).abs().min()) > 1e-3
