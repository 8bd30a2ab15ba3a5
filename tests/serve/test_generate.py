"""Greedy generation with the static decoder (kvant.serve) equals full forwards without a
cache, for a float and a quantized tiny Llama; bad requests are clear errors."""

import pytest
import torch

import kvant
from kvant.serve import GenerateError, decode_speed, generate

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llama():
    from hf_tiny import tiny_llama

    return tiny_llama(vocab=300, ctx=128)


def _reference(model, ids, n):
    out = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=out, use_cache=False).logits[:, -1:].argmax(-1)
            out = torch.cat([out, nxt], 1)
    return out


@pytest.mark.parametrize("quantized", [False, True])
def test_generate_matches_uncached_forwards(tiny_llama, quantized):
    import copy

    model = copy.deepcopy(tiny_llama)
    if quantized:
        kvant.quantize(model, kvant.RTNConfig(bits=4, group_size=32),
                       options=kvant.EngineOptions(device="cpu", show_progress=False))
    ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    out, stats = generate(model, ids, 8)
    assert out.shape == (3, 17)
    assert torch.equal(out, _reference(model, ids, 8))
    assert stats.new_tokens == 8 and stats.tokens_per_s > 0


def test_decode_speed_reports_steps(tiny_llama):
    r = decode_speed(tiny_llama, batch=2, ctx=48, steps=6)
    assert r["steps"] == 6 and r["tokens_per_s"] > 0 and r["ms_per_step"] > 0


def test_bad_requests_are_clear(tiny_llama):
    ids = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(GenerateError, match="exceed the context"):
        generate(tiny_llama, ids, 8, ctx=12)
    with pytest.raises(GenerateError, match="at least 1"):
        generate(tiny_llama, ids, 0)
    with pytest.raises(GenerateError, match="not a Llama-like"):
        generate(torch.nn.Linear(2, 2), ids, 1)
