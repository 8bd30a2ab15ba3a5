"""Mixture-of-experts models: every expert quantized on its own routed tokens, routers float.

Tiny random transformers models (hidden 64, 4 experts, top-2, 2 blocks) built from configs:
Mixtral, Qwen2-MoE (with a shared expert and its scalar gate) and Qwen3-MoE store experts as
3-D parameters; a small hand-written model covers experts kept as a ModuleList of Linears
and the layouts kvant must refuse. Errors are relative logits errors on held-out tokens.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kvant
from kvant.errors import InputError, KvantError
from kvant.formats.checkpoint import verify_checkpoint
from kvant.nn.experts import ExpertStack
from kvant.nn.qlinear import QuantLinear

transformers = pytest.importorskip("transformers")

E, TOP_K, LAYERS, HIDDEN, VOCAB = 4, 2, 2, 64, 128
OPTS = kvant.EngineOptions(device="cpu", show_progress=False)


def moe_config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  num_experts_per_tok=TOP_K)
    T = transformers
    if arch == "mixtral":
        return T.MixtralConfig(intermediate_size=64, num_local_experts=E, **common)
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=64,
                                shared_expert_intermediate_size=64, num_experts=E, **common)
    return T.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=64, num_experts=E,
                            head_dim=16, **common)


# packed layers per block: 4 attention projections + gate_up and down per expert
# (+ gate, up, down of Qwen2-MoE's shared expert; its scalar gate stays float)
PER_BLOCK = {"mixtral": 4 + 2 * E, "qwen2_moe": 4 + 2 * E + 3, "qwen3_moe": 4 + 2 * E}


def tiny_moe(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(moe_config(arch)).eval()


def _ids(n, t, seed):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


CALIB, HELD_OUT = _ids(16, 48, 1), _ids(4, 48, 2)


def _logits(model, ids=HELD_OUT):
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


def _rel(a, b):
    return float((a - b).norm() / b.norm())


_CACHE: dict = {}


def quantized(arch, spec, **opts):
    """(float logits, quantized model, report), cached per (arch, spec, options)."""
    key = (arch, spec, tuple(sorted(opts.items())))
    if key not in _CACHE:
        model = tiny_moe(arch)
        ref = _logits(model)
        config = kvant.algorithms.registry.config_from_spec(spec)
        report = kvant.quantize(model, config, CALIB,
                                kvant.EngineOptions(device="cpu", show_progress=False, **opts))
        _CACHE[key] = (ref, model, report)
    return _CACHE[key]


def _float_experts(model):
    """Names of nn.Linear layers left inside expert stacks."""
    return [n for n, m in model.named_modules() if isinstance(m, ExpertStack)
            for i in range(len(m)) if not isinstance(m.expert(i), QuantLinear)]


@pytest.mark.parametrize("arch,method", [("mixtral", "gptq"), ("mixtral", "awq"),
                                         ("qwen3_moe", "gptq"), ("qwen3_moe", "awq"),
                                         ("qwen2_moe", "gptq"), ("qwen2_moe", "awq")])
def test_every_expert_quantized_and_beats_rtn(arch, method):
    ref, model, report = quantized(arch, f"{method}:bits=3,group_size=32")
    _, rtn_model, _ = quantized(arch, "rtn:bits=3,group_size=32")
    packed = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(packed) == PER_BLOCK[arch] * LAYERS
    assert not _float_experts(model)
    stacks = [m for m in model.modules() if isinstance(m, ExpertStack)]
    assert len(stacks) == 2 * LAYERS and all(len(s) == E for s in stacks)
    assert report.moe["expert_layers"] == 2 * E * LAYERS
    assert report.moe["expert_layers_few_tokens"] == 0
    # each expert saw only its routed tokens: over a stack, every token counted top-k times
    for i in range(LAYERS):
        for stack in ("gate_up_proj", "down_proj"):
            names = [f"model.layers.{i}.mlp.experts.{stack}.{e}" for e in range(E)]
            counts = [report.layers[n]["routed_tokens"] for n in names]
            assert sum(counts) == CALIB.numel() * TOP_K
            assert min(counts) > 0
    err, err_rtn = _rel(_logits(model), ref), _rel(_logits(rtn_model), ref)
    assert err < err_rtn, (err, err_rtn)


def test_routers_and_scalar_gates_stay_float():
    float_model = tiny_moe("qwen2_moe")
    _, model, _ = quantized("qwen2_moe", "gptq:bits=3,group_size=32")
    for i in range(LAYERS):
        mlp, ref = model.model.layers[i].mlp, float_model.model.layers[i].mlp
        assert type(mlp.shared_expert_gate) is nn.Linear  # Linear(H, 1): a scalar gate
        assert torch.equal(mlp.shared_expert_gate.weight, ref.shared_expert_gate.weight)
        assert torch.equal(mlp.gate.weight, ref.gate.weight)  # the router (E, H)


@pytest.mark.parametrize("arch,method", [("mixtral", "gptq"), ("qwen2_moe", "awq")])
def test_save_load_identical(arch, method, tmp_path):
    _, model, _ = quantized(arch, f"{method}:bits=3,group_size=32")
    kvant.save_quantized(model, tmp_path / "q")
    loaded, _ = kvant.load_quantized(tmp_path / "q")
    assert torch.equal(_logits(loaded), _logits(model))
    assert verify_checkpoint(tmp_path / "q")["layers"] == PER_BLOCK[arch] * LAYERS
    assert not _float_experts(loaded)


def test_few_token_experts_fall_back_to_rtn_and_are_counted():
    # every expert below the minimum: each is quantized without data, which for GPTQ is
    # plain rounding (H = I), so it matches RTN's packed integers exactly
    _, model, report = quantized("mixtral", "gptq:bits=3,group_size=32",
                                 expert_min_tokens=10**9)
    _, rtn_model, _ = quantized("mixtral", "rtn:bits=3,group_size=32")
    assert report.moe["expert_layers_few_tokens"] == 2 * E * LAYERS
    assert len(report.moe["few_token_layers"]) == 2 * E * LAYERS
    rtn = dict(rtn_model.named_modules())
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear) and ".experts." in n:
            assert torch.equal(m.qweight, rtn[n].qweight), n
    # a minimum between the smallest and largest routed count: exactly those below it
    _, _, full = quantized("mixtral", "gptq:bits=3,group_size=32")
    counts = {n: e["routed_tokens"] for n, e in full.layers.items() if "routed_tokens" in e}
    floor = sorted(counts.values())[len(counts) // 2]
    _, _, part = quantized("mixtral", "gptq:bits=3,group_size=32", expert_min_tokens=floor)
    assert part.moe["expert_layers_few_tokens"] == sum(c < floor for c in counts.values()) > 0
    assert sorted(part.moe["few_token_layers"]) == sorted(n for n, c in counts.items()
                                                          if c < floor)


def test_default_minimum_is_the_input_width():
    # 2 calibration windows of 8 tokens: 32 routed rows over 4 experts, fewer than the
    # 64 inputs of every gate_up layer, so all of them fall back
    model = tiny_moe("mixtral")
    report = kvant.quantize(model, kvant.GPTQConfig(bits=4, group_size=32), CALIB[:2, :8], OPTS)
    gate_up = [n for n in report.layers if ".gate_up_proj." in n]
    assert len(gate_up) == E * LAYERS
    assert all(report.layers[n]["calibration"].startswith("none") for n in gate_up)
    assert report.moe["expert_layers_few_tokens"] >= E * LAYERS


def test_rtn_needs_no_calibration():
    model = tiny_moe("qwen3_moe")
    ref = _logits(model)
    report = kvant.quantize(model, kvant.RTNConfig(bits=8, group_size=32), None, OPTS)
    assert report.moe["expert_layers"] == 2 * E * LAYERS
    assert not _float_experts(model)
    assert _rel(_logits(model), ref) < 0.02


def test_export_to_hf_layouts_refused(tmp_path):
    _, model, _ = quantized("mixtral", "gptq:bits=3,group_size=32")
    with pytest.raises(KvantError, match="mixture-of-experts"):
        kvant.export_quantized(model, tmp_path / "x", "gptq")


# -- a hand-written MoE: experts as a ModuleList, and stacked layouts kvant must refuse --------

class _MLP(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.w1, self.w2 = nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)))


class _MoE(nn.Module):
    """Top-2 routing over E experts; ``layout``: "list" (ModuleList of MLPs, router Linear),
    "stacked" (3-D parameters applied as F.linear(x, w[e])), "transposed" (x @ w[e].t()),
    "whole" (one einsum over the stack), "no_router" (stacked, routing by token position)."""

    def __init__(self, layout, h=HIDDEN, i=64):
        super().__init__()
        self.layout = layout
        if layout == "list":
            self.gate = nn.Linear(h, E, bias=False)
            self.experts = nn.ModuleList(_MLP(h, i) for _ in range(E))
        else:
            if layout != "no_router":
                self.router = nn.Parameter(torch.randn(E, h) / h ** 0.5)
            self.w1 = nn.Parameter(torch.randn(E, i, h) / h ** 0.5)
            self.w2 = nn.Parameter(torch.randn(E, h, i) / i ** 0.5)

    def _route(self, x):
        if self.layout == "no_router":
            idx = torch.arange(x.shape[0])[:, None].remainder(E).repeat(1, TOP_K)
            return torch.full(idx.shape, 1.0 / TOP_K), idx
        logits = self.gate(x) if self.layout == "list" else F.linear(x, self.router)
        return torch.topk(logits.softmax(-1), TOP_K, dim=-1)

    def _expert(self, e, x):
        if self.layout == "list":
            return self.experts[e](x)
        if self.layout == "transposed":
            return F.silu(x @ self.w1[e].t()) @ self.w2[e].t()
        return F.linear(F.silu(F.linear(x, self.w1[e])), self.w2[e])

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self._route(flat)
        if self.layout == "whole":
            hid = F.silu(torch.einsum("th,eih->eti", flat, self.w1))
            every = torch.einsum("eti,ehi->eth", hid, self.w2)
            out = (every[idx, torch.arange(len(flat))[:, None]] * w[..., None]).sum(1)
            return out.view_as(x)
        out = torch.zeros_like(flat)
        for e in range(E):
            rows, slot = torch.where(idx == e)
            if len(rows):
                out.index_add_(0, rows, self._expert(e, flat[rows]) * w[rows, slot, None])
        return out.view_as(x)


class _Block(nn.Module):
    def __init__(self, layout):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.moe = _MoE(layout)

    def forward(self, x):
        x = x + self.proj(self.norm1(x))
        return x + self.moe(self.norm2(x))


class _TinyMoELM(nn.Module):
    def __init__(self, layout, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(_Block(layout) for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_module_list_experts_quantized_per_expert_router_float():
    model = _TinyMoELM("list").eval()
    ref, gate0 = _logits(model), model.blocks[0].moe.gate.weight.clone()
    rtn = copy.deepcopy(model)
    kvant.quantize(rtn, kvant.RTNConfig(bits=3, group_size=32), None, OPTS)
    report = kvant.quantize(model, kvant.GPTQConfig(bits=3, group_size=32), CALIB, OPTS)
    assert type(model.blocks[0].moe.gate) is nn.Linear  # the router Linear(H, E) stays float
    assert torch.equal(model.blocks[0].moe.gate.weight, gate0)
    experts = [n for n, e in report.layers.items() if "expert" in e]
    assert len(experts) == LAYERS * E * 2
    w1 = [report.layers[f"blocks.0.moe.experts.{e}.w1"]["routed_tokens"] for e in range(E)]
    assert sum(w1) == CALIB.numel() * TOP_K
    assert _rel(_logits(model), ref) < 0.9 * _rel(_logits(rtn), ref)


@pytest.mark.parametrize("layout,match", [("transposed", "F.linear"),
                                          ("whole", "one at a time"),
                                          ("no_router", "no router")])
def test_unsupported_stacked_layouts_refused(layout, match):
    model = _TinyMoELM(layout).eval()
    ref = _logits(model)
    with pytest.raises(InputError, match=match):
        kvant.quantize(model, kvant.GPTQConfig(bits=4, group_size=32), CALIB, OPTS)
    # refused before any change: nothing packed, the stacks are parameters again
    assert not any(isinstance(m, (QuantLinear, ExpertStack)) for m in model.modules())
    assert torch.equal(_logits(model), ref)


def test_stacked_hand_written_layout_supported():
    model = _TinyMoELM("stacked").eval()
    ref = _logits(model)
    report = kvant.quantize(model, kvant.AWQConfig(bits=4, group_size=32), CALIB, OPTS)
    assert report.moe["expert_layers"] == LAYERS * E * 2 and not _float_experts(model)
    assert _rel(_logits(model), ref) < 0.1
