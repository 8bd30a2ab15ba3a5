"""GGUF grids, block layouts and the GGUF export, checked with the ``gguf`` package's own
reader and dequantization (and, opt-in, llama.cpp's logits).

Exactness: llama.cpp stores fp16 scales (and int sub-scales); kvant rounds on those stored
values, so the exported blocks dequantize to kvant's float32 weights bit for bit (``torch.equal``,
no tolerance). Only llama.cpp's own forward differs from kvant's, because it quantizes the
activations to 8 bits for its dot products (opt-in test at the end).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import kvant  # noqa: E402
from kvant.config import (AWQConfig, ConfigError, GPTQConfig, QuIPConfig,  # noqa: E402
                          RTNConfig, SpQRConfig)
from kvant.core import gguf_grid as gg  # noqa: E402
from kvant.core import gguf_mix  # noqa: E402
from kvant.core.gguf_layout import decode, encode  # noqa: E402
from kvant.formats.gguf_export import GGUFExportError, _head_perm, export_gguf  # noqa: E402
from kvant.nn.gguf_linear import GGUFLinear  # noqa: E402

from hf_tiny import tiny_tokenizer  # noqa: E402

ALL_TYPES = list(gg.TYPES)


def _gguf_deq(blocks: torch.Tensor, name: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", ALL_TYPES)
def test_rtn_blocks_dequantize_exactly_with_gguf(name):
    t = gg.TYPES[name]
    torch.manual_seed(0)
    w = torch.randn(6, 512) * 0.02
    w[1, 5] = 0.3  # an outlier
    codes, f, deq = gg.rtn_fit(w, t)
    nb = 512 // t.block
    flat = {k: v.reshape(6 * nb, *v.shape[2:]) for k, v in f.items()}
    blocks = encode(t, codes.reshape(6 * nb, t.block), flat)
    assert blocks.shape == (6 * nb, t.nbytes)
    assert torch.equal(_gguf_deq(blocks.view(6, -1), name), deq)
    c2, f2 = decode(t, blocks)
    assert torch.equal(c2, codes.reshape(6 * nb, t.block))
    assert all(torch.equal(f2[k].float(), flat[k].float()) for k in flat)
    err = float((deq - w).square().mean().sqrt() / w.std())
    # relative RMS error ~ the grid's step: 2-bit worst, 8-bit near zero
    assert err < {"Q2_K": 0.35, "Q3_K": 0.2, "Q8_0": 0.01, "Q6_K": 0.03}.get(name, 0.1)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_layout_over_full_field_ranges(name):
    """Random codes and sub-scales over their whole ranges: every bit lands where gguf's
    dequantization reads it."""
    t = gg.TYPES[name]
    g = torch.Generator().manual_seed(1)
    r = 5
    codes = torch.randint(0, t.n_levels, (r, t.block), generator=g)
    f = {"d": (torch.rand(r, generator=g) - 0.5).half().float()}
    if t.k_quant:
        lo, hi = t.sc_range
        f["sc"] = torch.randint(lo, hi + 1, (r, t.block // t.sub), generator=g)
        if t.has_min:
            f["dmin"] = torch.rand(r, generator=g).half().float()
            f["mn"] = torch.randint(0, hi + 1, (r, t.block // t.sub), generator=g)
    elif t.has_min:
        f["m"] = (torch.rand(r, generator=g) - 0.5).half().float()
    blocks = encode(t, codes, f)
    assert torch.equal(_gguf_deq(blocks, name), gg.dequantize_blocks(t, codes, f))


def test_q4_0_golden_bytes():
    t = gg.TYPES["Q4_0"]
    codes = torch.arange(32).remainder(16).view(1, 32)
    b = encode(t, codes, {"d": torch.tensor([1.0])})
    # fp16 1.0 = 0x3c00 little-endian, then byte j = code[j] | code[j + 16] << 4
    assert b[0, :4].tolist() == [0x00, 0x3C, 0x00, 0x11]
    assert b[0, -1].item() == 0xFF


def test_fallback_types_and_refusal():
    assert gg.type_for_width(gg.TYPES["Q4_K"], 576).name == "Q5_0"
    assert gg.type_for_width(gg.TYPES["Q3_K"], 576).name == "Q4_0"
    assert gg.type_for_width(gg.TYPES["Q2_K"], 576).name == "Q4_0"
    assert gg.type_for_width(gg.TYPES["Q6_K"], 576).name == "Q8_0"
    assert gg.type_for_width(gg.TYPES["Q4_K"], 512).name == "Q4_K"
    with pytest.raises(ValueError, match="multiple of 32"):
        gg.type_for_width(gg.TYPES["Q4_0"], 48)


# -- configs -------------------------------------------------------------------------------
def test_grid_config_fixes_bits_and_refuses_conflicts():
    c = GPTQConfig(grid="gguf:q4_k")
    assert (c.grid, c.bits, c.group_size) == ("gguf:Q4_K", 4, 256)
    assert GPTQConfig.from_dict(c.to_dict()) == c
    assert RTNConfig(grid="gguf:Q6_K").bits == 6
    with pytest.raises(ConfigError, match="conflicts"):
        GPTQConfig(grid="gguf:Q4_K", bits=3)
    assert GPTQConfig(grid="gguf:Q5_K").bits == 5  # a type of llama.cpp's Q4_K_S mix
    with pytest.raises(ConfigError, match="unknown GGUF type"):
        GPTQConfig(grid="gguf:Q7_K")
    with pytest.raises(ConfigError, match="grid must be"):
        GPTQConfig(grid="nf4")
    with pytest.raises(ConfigError, match="act_order"):
        GPTQConfig(grid="gguf:Q4_0", act_order=True)
    with pytest.raises(ConfigError, match="rotated basis"):
        QuIPConfig(grid="gguf:Q4_0")
    with pytest.raises(ConfigError, match="outliers"):
        SpQRConfig(grid="gguf:Q4_0")
    with pytest.raises(ConfigError, match="scale_unfoldable=False"):
        AWQConfig(grid="gguf:Q4_0")
    AWQConfig(grid="gguf:Q4_0", scale_unfoldable=False)


# -- quantize, export, read back -------------------------------------------------------------
def _tokenizer():
    from tokenizers import decoders

    tok = copy.deepcopy(tiny_tokenizer())
    tok._tokenizer.decoder = decoders.ByteLevel()  # GGUF's BPE vocab needs a byte-level one
    return tok


def _llama(hidden=256, tied=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=512,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _check_file_matches(model, path, want_types=None):
    """Every quantized layer's tensor in the file dequantizes (by gguf) to kvant's weight;
    ``want_types`` {base type}: layer 0's types are llama.cpp's mix of that file type."""
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    cfg = model.config
    names = {"self_attn.q_proj": ("attn_q", cfg.num_attention_heads),
             "self_attn.k_proj": ("attn_k", cfg.num_key_value_heads),
             "self_attn.v_proj": ("attn_v", None), "self_attn.o_proj": ("attn_output", None),
             "mlp.gate_proj": ("ffn_gate", None), "mlp.up_proj": ("ffn_up", None),
             "mlp.down_proj": ("ffn_down", None)}
    for hf, (g, heads) in names.items():
        mod = model.model.layers[0].get_submodule(hf)
        assert isinstance(mod, GGUFLinear)
        t = tensors[f"blk.0.{g}.weight"]
        assert t.tensor_type.name == mod.gguf_type
        if want_types is not None:
            shape = gguf_mix.LlamaShape(len(model.model.layers), cfg.num_attention_heads,
                                        cfg.num_key_value_heads)
            assert {mod.gguf_type} == {gguf_mix.tensor_type(
                b, t.name, mod.in_features, shape) for b in want_types}, t.name
        w = mod.dequantized_weight()
        if heads:
            w = w[_head_perm(w.shape[0], heads)]
        assert torch.equal(torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)), w)
    return reader


@pytest.mark.parametrize("name", gg.EXPORT_TYPES)
def test_rtn_grid_export_is_exact(tmp_path, name):
    m = _llama()
    kvant.quantize(m, RTNConfig(grid=f"gguf:{name}"))
    f = export_gguf(m, tmp_path / "m.gguf", name, _tokenizer())
    r = _check_file_matches(m, f, {name})
    assert r.fields["general.file_type"].contents() == {
        "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q6_K": 18}[name]


@pytest.mark.parametrize("name", ["Q4_K", "Q3_K", "Q4_0"])
def test_gptq_grid_export_loads_in_transformers_with_identical_logits(tmp_path, name):
    m = _llama()
    kvant.quantize(m, GPTQConfig(grid=f"gguf:{name}"), CALIB)
    tok = _tokenizer()
    f = export_gguf(m, tmp_path / "m.gguf", name, tok)
    _check_file_matches(m, f, {name})
    # transformers' own GGUF path: gguf dequantization + its inverse Q/K permutation
    m2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                           dtype=torch.float32).eval()
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(m(x).logits, m2(x).logits)
    tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "To be, or not to be: that is the question"
    assert tok2(text, add_special_tokens=False).input_ids == tok(text).input_ids


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_awq_grid_export_is_exact(tmp_path, rounding):
    """AWQ folds its scales into the norms (written as they are) and rounds on the grid."""
    m = _llama()
    cfg = AWQConfig(grid="gguf:Q4_K", scale_unfoldable=False, rounding=rounding, n_grid=4,
                    clip_grid=4)
    kvant.quantize(m, cfg, CALIB)
    f = export_gguf(m, tmp_path / "m.gguf", "Q4_K", _tokenizer())
    _check_file_matches(m, f, {"Q4_K"})
    m2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                           dtype=torch.float32).eval()
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(m(x).logits, m2(x).logits)


def test_gptq_on_gguf_grid_beats_rtn_on_output_error():
    from kvant.algorithms.gguf_round import gguf_gptq, gguf_rtn

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(512, 512, generator=g) / 512 ** 0.5 + torch.eye(512)
    X = torch.randn(2048, 512, generator=g) @ mix  # correlated inputs
    W = torch.randn(64, 512, generator=g) * 0.02
    H = 2 * X.t() @ X / X.shape[0]
    cfg = GPTQConfig(grid="gguf:Q3_K")
    err = {}
    for label, res in (("rtn", gguf_rtn(W, cfg)), ("gptq", gguf_gptq(W, H.clone(), cfg))):
        lin = GGUFLinear.from_result(res, None)
        err[label] = float((X @ (lin.dequantized_weight() - W).t()).square().mean())
    assert err["gptq"] < 0.8 * err["rtn"]


def test_fallback_width_and_tied_embedding(tmp_path):
    m = _llama(hidden=64 * 9, tied=True)  # 576 = SmolLM2's width: K-quants fall back
    kvant.quantize(m, RTNConfig(grid="gguf:Q4_K"))
    f = export_gguf(m, tmp_path / "m.gguf", "Q4_K", _tokenizer(), embed_type="Q8_0")
    r = gguf.GGUFReader(str(f))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["blk.0.ffn_down.weight"] == "Q4_K"
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types
    assert r.fields["general.file_type"].contents() == 14


def test_gguf_source_metadata_copied(tmp_path):
    m = _llama()
    src = export_gguf(m, tmp_path / "src.gguf", tokenizer=_tokenizer(), float_type="F32")
    model, tok = kvant.load_model(str(src))
    kvant.quantize(model, RTNConfig(grid="gguf:Q4_0"))
    out = export_gguf(model, tmp_path / "q.gguf", "Q4_0", source_gguf=src)
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    skip = {"general.file_type", "general.quantization_version"}
    keys = {k for k in a.fields if not k.startswith("GGUF.")} - skip
    assert keys == {k for k in b.fields if not k.startswith("GGUF.")} - skip
    for k in keys:
        assert a.fields[k].contents() == b.fields[k].contents(), k
    assert b.fields["general.file_type"].contents() == 2
    assert a.fields["general.file_type"].contents() == 0  # F32
    _check_file_matches(model, out, {"Q4_0"})


def test_checkpoint_round_trip_keeps_blocks(tmp_path):
    m = _llama()
    kvant.quantize(m, GPTQConfig(grid="gguf:Q4_K"), CALIB)
    kvant.save_quantized(m, tmp_path / "ck", _tokenizer())
    m2, tok = kvant.load_quantized(tmp_path / "ck")
    a, b = m.model.layers[0].mlp.up_proj, m2.model.layers[0].mlp.up_proj
    assert isinstance(b, GGUFLinear) and torch.equal(a.blocks, b.blocks)
    f = export_gguf(m2, tmp_path / "m.gguf", "Q4_K", tok)
    _check_file_matches(m2, f, {"Q4_K"})


def test_public_export_gguf_from_checkpoint_or_model(tmp_path):
    """kvant.export_gguf takes a model or a checkpoint directory (its tokenizer comes along)."""
    m = _llama()
    kvant.quantize(m, GPTQConfig(grid="gguf:Q4_K"), CALIB)
    tok = _tokenizer()
    kvant.save_quantized(m, tmp_path / "ck", tok)
    a = kvant.export_gguf(tmp_path / "ck", tmp_path / "a.gguf", type="Q4_K")
    b = kvant.export_gguf(m, tmp_path / "b.gguf", type="q4_k", tokenizer=tok)
    ra, rb = _check_file_matches(m, a, {"Q4_K"}), _check_file_matches(m, b, {"Q4_K"})
    key = "tokenizer.ggml.tokens"
    assert ra.fields[key].contents() == rb.fields[key].contents()
    with pytest.raises(GGUFExportError, match="gguf:Q3_K"):
        kvant.export_gguf(str(tmp_path / "ck"), tmp_path / "c.gguf", type="Q3_K")
    with pytest.raises(GGUFExportError, match="exists"):
        kvant.export_gguf(m, a, type="Q4_K", tokenizer=tok)
    assert not (tmp_path / "c.gguf").exists()


# -- refusals --------------------------------------------------------------------------------
def test_export_refusals(tmp_path):
    m = _llama()
    kvant.quantize(m, RTNConfig(grid="gguf:Q4_0"))
    tok = _tokenizer()
    with pytest.raises(GGUFExportError, match="--grid gguf:Q4_K"):
        export_gguf(m, tmp_path / "a.gguf", "Q4_K", tok)
    (tmp_path / "b.gguf").write_bytes(b"keep me")
    with pytest.raises(GGUFExportError, match="exists"):
        export_gguf(m, tmp_path / "b.gguf", "Q4_0", tok)
    assert (tmp_path / "b.gguf").read_bytes() == b"keep me"
    with pytest.raises(GGUFExportError, match=".gguf file"):
        export_gguf(m, tmp_path / "c.bin", "Q4_0", tok)
    intq = _llama()
    kvant.quantize(intq, RTNConfig(bits=4, group_size=32))
    with pytest.raises(GGUFExportError, match="integer grid"):
        export_gguf(intq, tmp_path / "d.gguf", "Q4_0", tok)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, n_embd=64, n_layer=1, n_head=4, n_positions=32)).eval()
    with pytest.raises(GGUFExportError, match="Llama-family"):
        export_gguf(gpt2, tmp_path / "e.gguf", None, tok)
    assert not list(tmp_path.glob(".*kvant-tmp*"))


def test_cli_quantize_grid_and_export(tmp_path):
    from kvant.cli import main

    m = _llama()
    m.save_pretrained(tmp_path / "hf")
    _tokenizer().save_pretrained(tmp_path / "hf")
    ck = tmp_path / "ck"
    assert main(["quantize", str(tmp_path / "hf"), "--method", "rtn", "--grid", "gguf:Q4_K",
                 "--out", str(ck)]) == 0
    out = tmp_path / "m.gguf"
    assert main(["export", str(ck), "--format", "gguf", "--type", "q4_k",
                 "--out", str(out)]) == 0
    q, _ = kvant.load_quantized(ck)
    _check_file_matches(q, out, {"Q4_K"})
    assert main(["export", str(ck), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert main(["export", str(ck), "--format", "gguf", "--type", "Q3_K",
                 "--out", str(tmp_path / "y.gguf")]) == 2
    assert main(["quantize", str(tmp_path / "hf"), "--method", "quip", "--grid", "gguf:Q4_K",
                 "--out", str(tmp_path / "z")]) == 2


# -- llama.cpp itself (opt-in) ----------------------------------------------------------------
def _llama_python():
    """A Python that imports llama_cpp: this one, or KVANT_LLAMA_PYTHON."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        import sys
        return sys.executable
    py = os.environ.get("KVANT_LLAMA_PYTHON")
    return py if py and shutil.which(py) else None


@pytest.mark.skipif(_llama_python() is None,
                    reason="llama_cpp not importable (set KVANT_LLAMA_PYTHON to a Python with "
                           "llama-cpp-python)")
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q3_K"])
def test_llama_cpp_logits_agree_with_kvant(tmp_path, name):
    """llama.cpp's logits of kvant's file vs kvant's: they differ only by llama.cpp's 8-bit
    activation rounding in its dot products, ~1% of the logit range here."""
    m = _llama()
    kvant.quantize(m, GPTQConfig(grid=f"gguf:{name}"), CALIB)
    export_gguf(m, tmp_path / "m.gguf", name, _tokenizer())
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m(ids).logits[0].numpy()
    np.save(tmp_path / "ref.npy", ref)
    code = (
        "import llama_cpp, numpy as np, json, sys\n"
        f"ids = {ids[0].tolist()}\n"
        f"llm = llama_cpp.Llama({str(tmp_path / 'm.gguf')!r}, n_ctx=64, logits_all=True, "
        "verbose=False, n_threads=1)\n"
        "llm.eval(ids)\n"
        "print(json.dumps(np.array(llm.scores[:len(ids)]).tolist()))\n")
    out = subprocess.run([_llama_python(), "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_fp16_overflow_is_refused():
    from kvant.algorithms.gguf_round import gguf_rtn

    w = torch.full((2, 64), 1e6)
    with pytest.raises(ValueError, match="overflow"):
        gguf_rtn(w, RTNConfig(grid="gguf:Q4_0"), "big")
