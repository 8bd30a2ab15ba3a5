"""AWQ on post-norm blocks (BERT): fold only where exact, an input scale elsewhere, reported
per layer; the float function survives the folding; W4 beats RTN layer by layer; what AWQ
cannot scale is refused with the layer named (issue 21).

In a BERT layer the LayerNorm comes after the residual add, so the LayerNorm that feeds the
FFN also feeds the next residual add: it cannot absorb a scale meant for the FFN alone.
Measured (cpu-2core, the issue's model: hidden 128, FFN 512, W4 g128, 8x64 random tokens):
relative output error RTN 0.0124, AWQ 0.0090, AWQ+GPTQ 0.0073; summed relative squared
layer errors over the self-contained layers 0.069 (AWQ) vs 0.081 (RTN), over all 12 layers
with fold=false 0.084 vs 0.119.
"""

import copy

import pytest
import torch
import torch.nn as nn

import kvant
from kvant.algorithms.awq import AWQ, AWQUnsupportedError
from kvant.algorithms.registry import config_from_spec
from kvant.calib.capture import BlockInput, capture_block_inputs, run_block
from kvant.calib.engine import sequential_groups
from kvant.config import AWQConfig
from kvant.model import fold
from kvant.model.discovery import find_blocks, find_linears
from kvant.nn.qlinear import QuantLinear

from hf_tiny import tiny_bert

OPTS = kvant.EngineOptions(device="cpu", show_progress=False)
L0 = "encoder.layer.0."


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bert():
    """(float BertModel of the issue, its float output on ``calib``)"""
    model = tiny_bert()
    ids = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(0))
    return model, _out(model, ids)


@torch.no_grad()
def _out(model, ids):
    return model(ids).last_hidden_state


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _quantize(model, spec, calib):
    q = copy.deepcopy(model)
    report = kvant.quantize(q, config_from_spec(spec), calib, options=OPTS)
    return q, report


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_awq_quantizes_bert_and_reports_each_layer(bert, calib, rounding):
    model, ref = bert
    rtn, _ = _quantize(model, "rtn:bits=4,group_size=128", calib)
    q, report = _quantize(model, f"awq:bits=4,group_size=128,rounding={rounding}", calib)
    layer = q.encoder.layer[0]
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 12
    # the FFN's first Linear reads a LayerNorm that also feeds the residual: input scale
    inter = report.layers[L0 + "intermediate.dense"]
    assert inter["awq_folded_into"] == [] and inter["awq_input_scale_channels"] == 128
    assert "attention.output.LayerNorm also feeds other operations" in inter["awq_scale"]
    assert layer.intermediate.dense.input_scale.shape == (128,)
    # the FFN's second Linear reads GELU's output (not homogeneous): input scale, width 512
    assert report.layers[L0 + "output.dense"]["awq_input_scale_channels"] == 512
    assert layer.output.dense.input_scale.shape == (512,)
    # attention output: v rows drive its columns one-to-one, folded exactly, no input scale
    # (its name ends with the FFN's "output.dense": the lookup must not confuse the two)
    att = report.layers[L0 + "attention.output.dense"]
    assert att["awq_folded_into"] == ["attention.self.value"]
    assert att["awq_input_scale_channels"] == 0
    assert layer.attention.output.dense.input_scale is None
    assert _rel(_out(q, calib), ref) < _rel(_out(rtn, calib), ref)


def _walk(model, calib, fn):
    """fn(block, linears, groups, inputs) on every block, float outputs fed on."""
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], torch.split(calib, 4), "cpu")
    for block in blocks:
        linears = find_linears(block)
        fn(block, linears, sequential_groups(block, linears, inputs[0]), inputs)
        inputs = [i.with_hidden(o) for i, o in zip(inputs, run_block(block, inputs))]


def test_folding_alone_leaves_the_float_bert_unchanged(bert, calib):
    """AWQ's search, fold and input scales with no rounding (clip off): same function."""
    model = copy.deepcopy(bert[0])
    method = AWQ(AWQConfig(bits=4, group_size=128, clip_search=False))
    reports = []
    _walk(model, calib, lambda b, lin, grp, inp: reports.append(
        method.prepare_block(b, lin, grp, inp, run_block)))
    out = _out(model, calib)
    assert float((out - bert[1]).abs().max() / bert[1].abs().max()) < 1e-5
    groups = [g for r in reports for g in r["awq"]]
    assert any(g["alpha"] > 0 for g in groups)  # scales other than 1 were applied
    assert any(g["treatment"].startswith("fold->") for g in groups)
    assert any("input_scale" in g["treatment"] for g in groups)


def test_folding_into_the_shared_layernorm_would_not_be_exact(bert, calib):
    """The plan refuses the LayerNorm (listed as shared), and it is right to: forcing the
    same scale into it changes the block output."""
    model = copy.deepcopy(bert[0])
    block = model.encoder.layer[0]
    inputs = capture_block_inputs(model, block, torch.split(calib, 4), "cpu")
    plan = fold.find_fold_plan(block, "intermediate.dense", {"intermediate.dense"},
                               inputs[0], 1e-4)
    assert plan.sources == [] and plan.shared == ["attention.output.LayerNorm"]
    assert bool(plan.free.all())
    ref = run_block(block, inputs[:1])[0]
    s = torch.exp(0.5 * torch.randn(128, generator=torch.Generator().manual_seed(0)))
    forced = fold.FoldPlan(sources=[fold.FoldSource("attention.output.LayerNorm",
                                                    torch.arange(128), torch.arange(128))],
                           dead=plan.dead, free=torch.zeros(128, dtype=torch.bool))
    fold.apply_scales(block, ["intermediate.dense"], forced, s)
    assert _rel(run_block(block, inputs[:1])[0], ref) > 1e-2


def _layer_errors(float_model, quantized, calib, names):
    """name -> ||Q(x) - W(x)||² / ||W(x)||² of each quantized Linear on its float inputs."""
    lin = find_linears(float_model)
    xs = {}

    def keep(name):
        def hook(_m, a):  # returns None: a returned value would replace the input
            xs.setdefault(name, a[0].detach())
        return hook

    handles = [lin[n].register_forward_pre_hook(keep(n)) for n in names]
    _out(float_model, calib)
    for h in handles:
        h.remove()
    mods = dict(quantized.named_modules())
    with torch.no_grad():
        return {n: float((mods[n](xs[n]) - lin[n](xs[n])).pow(2).sum()
                         / lin[n](xs[n]).pow(2).sum()) for n in names}


def test_awq_w4_beats_rtn_layer_by_layer(bert, calib):
    model = bert[0]
    names = [n for n in find_linears(model) if n.startswith("encoder.")]
    rtn, _ = _quantize(model, "rtn:bits=4,group_size=128", calib)
    rtn_err = _layer_errors(model, rtn, calib, names)
    # fold=false keeps every scale on its own layer: each Linear is self-contained
    q, _ = _quantize(model, "awq:bits=4,group_size=128,fold=false", calib)
    err = _layer_errors(model, q, calib, names)
    assert sum(err.values()) < 0.85 * sum(rtn_err.values()), (err, rtn_err)
    # default: a folded layer and its fold source see x / s, not x; compare the others
    q, report = _quantize(model, "awq:bits=4,group_size=128", calib)
    sources = {f"{n.rsplit('.', 2)[0]}." for n in names}
    folded = {n for n, e in report.layers.items() if e["awq_folded_into"]}
    folded |= {p + src for n in folded for p in sources if n.startswith(p)
               for src in report.layers[n]["awq_folded_into"]}
    own = [n for n in names if n not in folded]
    assert len(own) == 8  # q, k, FFN in, FFN out of both blocks
    err = _layer_errors(model, q, calib, own)
    assert sum(err.values()) < 0.95 * sum(rtn_err[n] for n in own), (err, rtn_err)


class _Block(nn.Module):
    """LayerNorm -> (a, b) reading one input -> sum; ``c`` reads the first 32 channels and
    ``unused`` never runs. ``strict`` makes ``attn`` refuse weights changed after build
    (a stand-in for a module AWQ cannot rerun with candidate weights)."""

    def __init__(self, strict=False, with_c=False):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.attn = nn.ModuleDict({"a": nn.Linear(64, 64), "b": nn.Linear(64, 64)})
        self.c = nn.Linear(32, 64) if with_c else None
        self.unused = nn.Linear(16, 8)
        self.strict = strict
        self.register_buffer("w0", self.attn["a"].weight.detach().clone())

    def forward(self, x):
        h = self.norm(x)
        if self.strict and not torch.equal(self.attn["a"].weight, self.w0):
            raise RuntimeError("weights changed")
        y = x + self.attn["a"](h) * self.attn["b"](h)
        return y + self.c(h[..., :32]) if self.c is not None else y


class _Model(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(32, 64)
        self.blocks = nn.ModuleList([_Block(**kw), _Block(**kw)])

    def forward(self, ids):
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h)
        return h


def test_a_layer_that_never_runs_is_quantized_unscaled_and_reported():
    ids = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    model = _Model()
    report = kvant.quantize(model, AWQConfig(bits=4, group_size=16), ids, options=OPTS)
    entry = report.layers["blocks.0.unused"]
    assert entry["awq_scale"].startswith("not scaled") and entry["awq_input_scale_channels"] == 0
    assert model.blocks[0].unused.input_scale is None
    assert report.layers["blocks.0.attn.a"]["awq_folded_into"] == ["norm"]


def test_a_group_of_mixed_widths_is_refused_with_the_layer_named():
    block = _Block(with_c=True)
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    linears = find_linears(block)
    method = AWQ(AWQConfig(bits=4, group_size=16))
    with pytest.raises(AWQUnsupportedError, match="'c'.*32 input channels"):
        method.prepare_block(block, linears, [["attn.a", "c"]], [BlockInput((x,), {})],
                             run_block)


def test_a_torch_error_while_scaling_becomes_a_named_refusal():
    ids = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(AWQUnsupportedError, match=r"attn\.a.*_Block.*weights changed"):
        kvant.quantize(_Model(strict=True), AWQConfig(bits=4, group_size=16), ids,
                       options=OPTS)
