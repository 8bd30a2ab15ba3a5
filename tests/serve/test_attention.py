"""kvant's grouped-query attention (kvant.serve.attention) equals SDPA over repeated key/value
heads, and the static decoder runs its steps with it, then gives the model its own back."""

import copy

import pytest
import torch
import torch.nn.functional as F

from kvant.serve import GenerateError, StaticDecoder, generate
from kvant.serve.attention import NAME, grouped_attention

transformers = pytest.importorskip("transformers")


class _Module(torch.nn.Module):  # what the attention function reads of its module
    is_causal = True


def _repeated(q, k, v, mask, causal):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if mask is None and causal and q.shape[2] > 1:
        t, n = k.shape[2], q.shape[2]
        mask = torch.ones(n, t, dtype=torch.bool).tril(t - n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [1, 2, 8])
@pytest.mark.parametrize("q_len,mask_kind", [(1, "bool"), (1, None), (5, "bool"),
                                             (5, None), (5, "float")])
def test_equals_sdpa_on_repeated_heads(kv_heads, q_len, mask_kind):
    g = torch.Generator().manual_seed(kv_heads * 10 + q_len)
    b, h, t, d = 2, 8, 11, 16
    q = torch.randn(b, h, q_len, d, generator=g)
    k, v = (torch.randn(b, kv_heads, t, d, generator=g) for _ in range(2))
    mask = None
    if mask_kind == "bool":  # a prefix of each row's keys, as the static cache's mask
        mask = torch.arange(t).view(1, 1, 1, t) <= torch.tensor([6, 9]).view(b, 1, 1, 1) \
            + torch.arange(q_len).view(1, 1, q_len, 1)
    elif mask_kind == "float":
        mask = torch.randn(b, 1, q_len, t, generator=g)
    out, _ = grouped_attention(_Module().eval(), q, k, v, mask, scaling=0.3)
    ref = _repeated(q, k, v, mask, causal=True)
    assert out.shape == (b, q_len, h, d)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()


def test_refuses_what_it_cannot_do():
    q, k = torch.zeros(1, 6, 1, 4), torch.zeros(1, 4, 3, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        grouped_attention(_Module(), q, k, k, None)
    with pytest.raises(ValueError, match="shared by all heads"):
        grouped_attention(_Module(), torch.zeros(1, 4, 1, 4), k, k,
                          torch.ones(1, 4, 1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="softcap"):
        grouped_attention(_Module(), torch.zeros(1, 4, 1, 4), k, k, None, softcap=2.0)


@pytest.fixture(scope="module")
def gqa_llama():
    from hf_tiny import tiny_llama

    return tiny_llama(vocab=300, ctx=128, heads=8, kv_heads=2)  # 4 query heads per group


def test_decoder_steps_use_it_and_give_the_model_back(gqa_llama, monkeypatch):
    import kvant.serve.attention as att

    model = copy.deepcopy(gqa_llama)
    own = model.config._attn_implementation
    calls = []
    real = att.grouped_attention
    # count the calls that reach kvant's function through transformers' registry
    monkeypatch.setattr(att, "grouped_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        with StaticDecoder(model, 1, 16) as dec:
            assert model.config._attn_implementation == NAME
            dec.prefill(torch.tensor([[1, 2, 3]]))
            assert not calls  # the prefill ran the model's own attention
            dec.step()
            assert len(calls) == model.config.num_hidden_layers
        assert model.config._attn_implementation == own
    finally:
        monkeypatch.undo()
        att.register()


def test_generate_is_the_same_with_either_attention(gqa_llama):
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(3))
    a, _ = generate(gqa_llama, ids, 10, attention="grouped")
    b, _ = generate(gqa_llama, ids, 10, attention="model")
    assert torch.equal(a, b)
    assert gqa_llama.config._attn_implementation not in (NAME, None)
    with pytest.raises(GenerateError, match="attention must be one of"):
        generate(gqa_llama, ids, 2, attention="flash")


def test_kernel_shape_rule():
    from kvant.kernels.attention import shape_fits

    assert shape_fits(8, 1, 128)  # Llama-3-70B decode: 8 query heads a key/value head
    assert shape_fits(2 * 5, 5, 16)  # two heads a group, five positions
    assert not shape_fits(1, 1, 128)  # Llama-2-7B (no grouping): SDPA was faster there
    assert not shape_fits(8 * 16, 16, 128)  # 128 rows: a prompt, SDPA's prefill kernels
    assert not shape_fits(8, 1, 96)  # head size not a power of two
    assert not shape_fits(8, 1, 8)  # below tl.dot's 16


def test_kernel_mask_rule():
    from kvant.kernels.attention import mask_fits

    assert mask_fits((2, 1, 1, 512), 2, 1, 512)  # the static decoder's, batch-expanded
    assert mask_fits((1, 1, 3, 512), 2, 3, 512)  # shared by the batch
    assert not mask_fits((2, 1, 1, 500), 2, 1, 512)  # shorter than the cache
    assert not mask_fits((2, 1, 1, 512), 2, 3, 512)  # one row for three positions
    assert not mask_fits((2, 8, 1, 512), 2, 1, 512)  # per head
    assert not mask_fits((4, 1, 1, 512), 2, 1, 512)  # another batch
    assert not mask_fits((1, 512), 2, 1, 512)
