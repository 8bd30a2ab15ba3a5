"""Fusing sibling QuantLinears (q/k/v, gate/up) gives the same outputs with fewer layers."""

import pytest
import torch

from kvant.calib.engine import quantize_model
from kvant.config import EngineOptions, GPTQConfig, RTNConfig
from kvant.nn.fuse import FusedSlice, can_fuse, find_siblings, fuse_siblings
from kvant.nn.qlinear import QuantLinear

CPU = EngineOptions(device="cpu", show_progress=False, batch_size=4)


def tiny_llama():
    pytest.importorskip("transformers")
    from hf_tiny import tiny_llama as build

    return build()


@torch.no_grad()
def test_fused_llama_matches_unfused():
    model = tiny_llama()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, RTNConfig(bits=4, group_size=32), None, CPU)
    ref = model(ids).logits
    groups = find_siblings(model, ids)
    assert sorted(map(len, groups)) == [2, 2, 3, 3]  # q/k/v and gate/up of both blocks
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in groups
    assert fuse_siblings(model, groups) == groups
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.k_proj, FusedSlice) and attn.q_proj.fused.out_features == 64 + 2 * 32
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == 2 * 4  # per block: fused qkv, o, fused gate/up, down
    out = model(ids).logits
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    out2 = model(ids).logits  # a second forward recomputes, nothing stale
    assert torch.equal(out, out2)


def test_what_cannot_fuse():
    a = QuantLinear(64, 32, 4, 32)
    assert can_fuse([a]) is not None
    assert "group_size" in can_fuse([a, QuantLinear(64, 32, 4, 16)])
    assert "act-order" in can_fuse([a, QuantLinear(64, 32, 4, 32, act_order=True)])
    assert "bias" in can_fuse([a, QuantLinear(64, 32, 4, 32, bias=True)])
    assert can_fuse([a, QuantLinear(64, 48, 4, 32)]) is None
    with pytest.raises(ValueError, match="not a QuantLinear"):
        fuse_siblings(torch.nn.Sequential(torch.nn.ReLU()), [["0"]])
    lin = torch.nn.Linear(64, 8)
    assert "only plain" in can_fuse([a, lin])


@torch.no_grad()
def test_fused_float_llama_matches_unfused():
    """The fp16 baseline fuses the same way (nn.Linear weights concatenated)."""
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    ref = model(ids).logits
    groups = find_siblings(model, ids)
    assert sorted(map(len, groups)) == [2, 2, 3, 3]  # lm_head reads its own input
    fuse_siblings(model, groups)
    assert isinstance(model.model.layers[1].mlp.up_proj, FusedSlice)
    assert torch.allclose(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_act_order_layers_stay_unfused():
    model = tiny_llama()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    quantize_model(model, GPTQConfig(bits=4, group_size=32, act_order=True), ids, CPU)
    groups = find_siblings(model, ids)
    assert groups and fuse_siblings(model, groups) == []


@torch.no_grad()
def test_quantizing_a_fused_float_model_equals_fusing_a_quantized_one():
    """RTN grids are per row, so quantizing the fused float layer (the slices look the layer
    up on their owner) gives the model that fusing the quantized siblings gives."""
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    a = tiny_llama()
    fuse_siblings(a, find_siblings(a, ids))
    quantize_model(a, RTNConfig(bits=4, group_size=32), None, CPU)
    assert isinstance(a.model.layers[0].self_attn.q_proj.fused, QuantLinear)
    b = tiny_llama()
    quantize_model(b, RTNConfig(bits=4, group_size=32), None, CPU)
    fuse_siblings(b, find_siblings(b, ids))
    assert torch.allclose(a(ids).logits, b(ids).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fused_model_compiles_in_one_graph():
    """Under torch.compile the siblings share the fused product without the weak-reference
    memo: one graph, no break, the eager logits."""
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    quantize_model(model, RTNConfig(bits=4, group_size=32), None, CPU)
    fuse_siblings(model, find_siblings(model, ids))
    ref = model(ids, use_cache=False).logits

    def fwd(x):
        return model(x, use_cache=False).logits

    explained = torch._dynamo.explain(fwd)(ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    out = torch.compile(fwd, backend="eager")(ids)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    group = model.model.layers[0].self_attn.q_proj._group
    assert group._y is None  # the last sibling dropped the shared product


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_fused_model_on_cuda_runs_the_kernels():
    """On the GPU the fused layers are prepared like any QuantLinear (kernel layout built at
    fuse time from the concatenated tensors) and give the unfused model's logits."""
    from kvant.nn.qlinear import prepare_for_inference

    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    quantize_model(model, RTNConfig(bits=4, group_size=32), None, CPU)
    model = model.half()
    assert prepare_for_inference(model, "cuda") == 2 * 7
    ids = ids.cuda()
    ref = model(ids, use_cache=False).logits.float()
    fuse_siblings(model, find_siblings(model, ids, use_cache=False))
    fused = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(fused) == 2 * 4 and all(m.kernel_layout is not None for m in fused)
    out = model(ids, use_cache=False).logits.float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-3
