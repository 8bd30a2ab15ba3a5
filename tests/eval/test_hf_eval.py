"""Perplexity with the papers' protocol and KL to the float model, on a tiny HF model."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import kvant
from kvant.calib.data import CalibrationDataError, encode, wikitext_rows
from kvant.eval.kl import FloatReference, kl_divergence
from kvant.eval.perplexity import eval_windows, perplexity

from hf_tiny import logits, text_sample, tiny_model, tiny_tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    # a raw WikiText-style file: one row per line, blank lines hold a single space
    lines = [" = Act I = ", " "] + [" " + l for l in text_sample(6000).splitlines() if l] + [" "]
    f = tmp_path_factory.mktemp("wiki") / "wiki.test.raw"
    f.write_text("\n".join(lines) + "\n")
    return model, tok, f


def test_perplexity_follows_the_protocol(setup):
    model, tok, f = setup
    r = perplexity(model, tok, "wikitext2", seq_len=SEQ, eval_file=f, show_progress=False)
    # by hand: rows joined by "\n\n", tokenized once, non-overlapping windows, mean NLL
    ids = torch.tensor(tok("\n\n".join(wikitext_rows(f)))["input_ids"])
    n = ids.numel() // SEQ
    w = ids[: n * SEQ].view(n, SEQ)
    lg = logits(model, w)[:, :-1]
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), w[:, 1:].reshape(-1))
    assert r["windows"] == n and r["tokens"] == n * (SEQ - 1) and r["seq_len"] == SEQ
    assert math.isclose(r["nll"], float(nll), rel_tol=1e-5)
    assert math.isclose(r["ppl"], math.exp(float(nll)), rel_tol=1e-5)
    # a random model is near-uniform: perplexity close to the vocabulary size
    assert 0.5 * len(tok) < r["ppl"] < 2 * len(tok)
    r3 = perplexity(model, tok, "wikitext2", seq_len=SEQ, eval_file=f, max_windows=3,
                    show_progress=False)
    assert r3["windows"] == 3


def test_kl_of_a_model_with_itself_is_zero_and_grows_with_damage(setup):
    model, tok, f = setup
    w = eval_windows(tok, "wikitext2", SEQ, f, max_windows=4)
    ref = FloatReference(model, w, batch_size=2, store="full", store_dtype=torch.float32,
                         show_progress=False)
    same = ref.compare(model, show_progress=False)
    assert abs(same["kl"]) < 1e-6 and math.isclose(same["ppl"], ref.ppl, rel_tol=1e-6)
    ppl = perplexity(model, tok, "wikitext2", SEQ, f, max_windows=4, show_progress=False)["ppl"]
    assert math.isclose(ref.ppl, ppl, rel_tol=1e-6)

    q8, q2 = copy.deepcopy(model), copy.deepcopy(model)
    opts = kvant.EngineOptions(device="cpu", show_progress=False)
    kvant.quantize(q8, kvant.RTNConfig(bits=8, group_size=-1), options=opts)
    kvant.quantize(q2, kvant.RTNConfig(bits=2, group_size=32), options=opts)
    kl8, kl2 = ref.compare(q8, False)["kl"], ref.compare(q2, False)["kl"]
    assert 0 < kl8 < kl2

    # float16 storage: same KL up to rounding; top-k: a lower bound, exact when k = vocab
    r16 = FloatReference(model, w, store="full", show_progress=False)
    assert math.isclose(r16.compare(q2, False)["kl"], kl2, rel_tol=1e-2)
    top = FloatReference(model, w, store="topk", topk=16, show_progress=False)
    assert top.store == "topk" and 0 < top.compare(q2, False)["kl"] <= kl2 + 1e-6
    top_all = FloatReference(model, w, store="topk", topk=len(tok), show_progress=False)
    assert math.isclose(top_all.compare(q2, False)["kl"], kl2, rel_tol=1e-4)
    assert math.isclose(kl_divergence(model, q2, w), kl2, rel_tol=1e-6)


def test_eval_bad_input(setup, tmp_path):
    model, tok, f = setup
    with pytest.raises(CalibrationDataError, match="exceeds the model's context length 128"):
        perplexity(model, tok, "wikitext2", seq_len=256, eval_file=f)
    short = tmp_path / "short.raw"
    short.write_text(" tiny\n")
    with pytest.raises(ValueError, match="shorter than one window"):
        perplexity(model, tok, "wikitext2", seq_len=SEQ, eval_file=short)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        perplexity(model, tok, "wikitext2", seq_len=SEQ, eval_file=tmp_path / "missing.raw")
    with pytest.raises(FileNotFoundError, match="neither"):
        perplexity(model, tok, "ptb", seq_len=SEQ)
    with pytest.raises(ValueError, match="store must be"):
        FloatReference(model, torch.zeros(1, SEQ, dtype=torch.long), store="disk")


def test_encode_uses_special_tokens_only_when_asked(setup):
    _, tok, _ = setup
    assert encode(tok, "hello") == tok("hello", add_special_tokens=False)["input_ids"]
