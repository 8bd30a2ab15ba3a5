"""kvant's split-KV decode attention on a GPU (skipped without CUDA): grouped_attention's
kernel path (kvant::gqa_decode) against its SDPA path in float32 on Llama-3-70B's and
SmolLM2's head shapes, fp16 and bf16, batch 1 and 8, the static decoder's mask and an
additive one; its dispatch (kernel for decode rows, SDPA for a long prompt and for fp32);
CUDA-graph capture; and greedy tokens of a tiny Llama the same with either attention."""

import pytest
import torch

from kvant.kernels import attention as ka
from kvant.serve import generate
from kvant.serve.attention import grouped_attention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class _Module(torch.nn.Module):
    is_causal = True


def _inputs(b, h, hkv, q, t, d, dtype, seed, filled):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qh = torch.randn(b, h, q, d, generator=g, device="cuda").to(dtype)
    k, v = (torch.randn(b, hkv, t, d, generator=g, device="cuda").to(dtype) for _ in range(2))
    # the static decoder's mask: positions written so far, expanded over the batch
    mask = (torch.arange(t, device="cuda") <= filled).view(1, 1, 1, t).expand(b, 1, q, t)
    return qh, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,hkv,t,d", [(1, 64, 8, 2048, 128), (8, 64, 8, 2048, 128),
                                         (1, 9, 3, 300, 64), (3, 9, 3, 77, 64)])
def test_kernel_matches_sdpa(dtype, b, h, hkv, t, d):
    ka.ensure_kernel()
    qh, k, v, mask = _inputs(b, h, hkv, 1, t, d, dtype, seed=b + t, filled=t // 2 + 3)
    qg = qh.reshape(b, hkv, h // hkv, d)
    assert ka.applies(qg, k, v, mask, 1)
    out, _ = grouped_attention(_Module().eval(), qh, k, v, mask, scaling=d ** -0.5)
    ref = ka.reference(qg.float(), k.float(), v.float(), mask, d ** -0.5, 1)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # a few ulps of the output
    assert out.dtype == dtype and out.shape == (b, 1, h, d)
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max(), \
        (out.float() - ref).abs().max()
    # an additive mask, two query positions (a short speculative step)
    qh2 = torch.randn(b, h, 2, d, device="cuda").to(dtype)
    add = torch.randn(b, 1, 2, t, device="cuda").to(dtype)
    out2, _ = grouped_attention(_Module().eval(), qh2, k, v, add, scaling=0.1)
    ref2 = ka.reference(qh2.float().reshape(b, hkv, 2 * h // hkv, d), k.float(), v.float(),
                        add.float(), 0.1, 2)
    assert (out2.float() - ref2).abs().max() <= tol * ref2.abs().max()


def test_dispatch():
    ka.ensure_kernel()
    qh, k, v, mask = _inputs(1, 64, 8, 1, 512, 128, torch.float16, 0, 100)
    assert ka.applies(qh.reshape(1, 8, 8, 128), k, v, mask, 1)
    long = torch.zeros(1, 8, 8 * 16, 128, device="cuda", dtype=torch.float16)  # 16 positions
    assert not ka.applies(long, k, v, None, 16)  # 128 rows: SDPA's prefill kernels
    assert not ka.applies(qh.float().reshape(1, 8, 8, 128), k.float(), v.float(), mask, 1)
    assert not ka.applies(torch.zeros(1, 8, 8, 96, device="cuda", dtype=torch.float16),
                          k[..., :96], v[..., :96], mask, 1)  # head size not a power of two
    mha = torch.zeros(1, 8, 1, 128, device="cuda", dtype=torch.float16)  # G = 1: SDPA
    assert not ka.applies(mha, k, v, mask, 1)


def test_cuda_graph_capture():
    ka.ensure_kernel()
    qh, k, v, mask = _inputs(1, 64, 8, 1, 1024, 128, torch.float16, 1, 700)
    eager, _ = grouped_attention(_Module().eval(), qh, k, v, mask)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        grouped_attention(_Module().eval(), qh, k, v, mask)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, _ = grouped_attention(_Module().eval(), qh, k, v, mask)
    k.mul_(-1)  # the replay reads the new cache
    g.replay()
    torch.cuda.synchronize()
    ref, _ = grouped_attention(_Module().eval(), qh, k, v, mask)
    assert torch.equal(out, ref) and not torch.equal(out, eager)


def test_greedy_tokens_equal_the_models_attention(monkeypatch):
    from hf_tiny import tiny_llama

    calls = []
    op = ka.gqa_decode
    monkeypatch.setattr(ka, "gqa_decode", lambda *a: calls.append(1) or op(*a))
    # head size 16 (d 64, 4 heads): the smallest the kernel takes
    model = tiny_llama(vocab=300, ctx=128, heads=4, kv_heads=2).to("cuda", torch.float16)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    ours, _ = generate(model, ids, 12, attention="grouped")
    assert calls  # the decode steps ran the kernel
    theirs, _ = generate(model, ids, 12, attention="model")
    assert torch.equal(ours, theirs)
