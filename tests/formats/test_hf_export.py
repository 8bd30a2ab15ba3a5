"""GPTQ / AWQ export (kvant.formats.hf_export): golden words, an independent decoder of each
layout against the layer's own dequantized weight, a full tiny-Llama export, refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kvant.calib.engine import quantize_model
from kvant.config import EngineOptions, RTNConfig
from kvant.formats.hf_export import ExportError, awq_tensors, export_hf, gptq_tensors
from kvant.formats.packing import pack
from kvant.nn.qlinear import QuantLinear

CPU = EngineOptions(device="cpu", show_progress=False, batch_size=4)


def _layer(k, n, bits, gs, act_order=False, seed=0, zmin=1):
    """A QuantLinear filled with random codes, zero points >= zmin and scales."""
    g = torch.Generator().manual_seed(seed)
    m = QuantLinear(k, n, bits, gs, act_order=act_order, bias=True)
    groups = k // gs if gs > 0 else 1
    m.qweight.copy_(pack(torch.randint(0, 2 ** bits, (n, k), generator=g), bits))
    m.qzeros.copy_(pack(torch.randint(zmin, 2 ** bits, (n, groups), generator=g), bits))
    m.scales.copy_(torch.rand(n, groups, generator=g) * 0.1 + 0.01)
    m.bias.copy_(torch.randn(n, generator=g))
    if act_order:
        m.g_idx.copy_((torch.randperm(k, generator=g) // gs).to(torch.int32))
    return m


def _stream(words: torch.Tensor, bits: int, count: int) -> list[int]:
    """Values of one little-endian bit stream stored in int32 ``words`` (1-D), bit by bit."""
    raw = [int(w) & 0xFFFFFFFF for w in words]
    bit = lambda i: (raw[i // 32] >> (i % 32)) & 1  # noqa: E731
    return [sum(bit(j * bits + b) << b for b in range(bits)) for j in range(count)]


def decode_gptq(t: dict, bits: int, k: int, n: int) -> torch.Tensor:
    """(N, K) weight from GPTQ tensors, read as a v1 loader does: column streams along K for
    qweight, row streams along N for qzeros holding z - 1."""
    g = t["scales"].shape[0]
    q = torch.tensor([_stream(t["qweight"][:, c], bits, k) for c in range(n)])  # (N, K)
    z = torch.tensor([_stream(t["qzeros"][r], bits, n) for r in range(g)]) + 1  # (G, N)
    gi = t["g_idx"].long()
    return (q - z[gi].t()).float() * t["scales"][gi].t().float()


def decode_awq(t: dict, k: int, n: int) -> torch.Tensor:
    """(N, K) weight from AWQ GEMM tensors: nibble i of word j is column 8j + order[i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack_rows(words):
        out = torch.zeros(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
        for j in range(words.shape[1]):
            for i in range(8):
                out[:, 8 * j + order[i]] = (words[:, j].to(torch.int64) >> (4 * i)) & 15
        return out

    q, z = unpack_rows(t["qweight"]), unpack_rows(t["qzeros"])  # (K, N), (G, N)
    gs = k // z.shape[0]
    gi = torch.arange(k) // gs
    return ((q - z[gi]).float() * t["scales"][gi].float()).t()


def test_golden_words():
    m = QuantLinear(32, 8, 4, 32)
    q = (torch.arange(8)[:, None] + torch.arange(32)[None, :]) % 16  # q[n, k] = n + k
    m.qweight.copy_(pack(q, 4))
    m.qzeros.copy_(pack(torch.full((8, 1), 3), 4))
    m.scales.fill_(0.5)
    t = gptq_tensors(m)
    assert t["qweight"].shape == (4, 8) and t["qzeros"].shape == (1, 1)
    assert int(t["qweight"][0, 0]) == 0x76543210  # column 0: k = 0..7 -> 0..7
    assert int(t["qweight"][0, 1]) & 0xFFFFFFFF == 0x87654321
    assert int(t["qzeros"][0, 0]) == 0x22222222  # z - 1 = 2 for all 8 columns
    a = awq_tensors(m)
    assert a["qweight"].shape == (32, 1) and a["qzeros"].shape == (1, 1)
    assert int(a["qweight"][0, 0]) == 0x75316420  # row k=0: columns 0..7 -> order 0,2,4,6,1,...
    assert int(a["qzeros"][0, 0]) == 0x33333333


@pytest.mark.parametrize("bits,gs,act_order", [(4, 32, False), (3, 32, False), (2, 64, True),
                                               (8, -1, False), (4, 16, True)])
def test_gptq_layout_decodes_to_the_same_weight(bits, gs, act_order):
    m = _layer(64, 32, bits, gs, act_order, seed=bits)
    t = gptq_tensors(m)
    ref = m.dequantized_weight()
    assert torch.equal(decode_gptq(t, bits, 64, 32).half(), ref)
    assert torch.equal(t["bias"], m.bias.half())


@pytest.mark.parametrize("gs", [16, 64])
def test_awq_layout_decodes_to_the_same_weight(gs):
    m = _layer(64, 24, 4, gs, seed=gs, zmin=0)  # AWQ stores z itself: 0 is fine
    assert torch.equal(decode_awq(awq_tensors(m), 64, 24).half(), m.dequantized_weight())


def test_refusals():
    with pytest.raises(ExportError, match="zero point 0 and use the top code"):
        gptq_tensors(_zero_point_layer())
    from kvant.model.nanogpt import load_embedded

    model, _ = load_embedded()
    with pytest.raises(ExportError, match="Hugging Face"):
        export_hf(model, "/nonexistent/out", "gptq")
    with pytest.raises(ExportError, match="unknown export format"):
        export_hf(model, "/nonexistent/out", "exl2")


def _zero_point_layer(top: int = 15):
    """Zero points 0 in half the groups; codes up to ``top``."""
    m = _layer(64, 8, 4, 32, seed=5)
    g = torch.Generator().manual_seed(6)
    m.qweight.copy_(pack(torch.randint(0, top + 1, (8, 64), generator=g), 4))
    z = torch.randint(1, 16, (8, 2), generator=g)
    z[::2, 0] = 0
    m.qzeros.copy_(pack(z, 4))
    return m


def test_gptq_zero_point_0_is_lifted_exactly():
    m = _zero_point_layer(top=14)
    t = gptq_tensors(m)
    assert torch.equal(decode_gptq(t, 4, 64, 8).half(), m.dequantized_weight())


def _tiny_llama(bits=4, group_size=32, sym=True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    quantize_model(model, RTNConfig(bits=bits, group_size=group_size, sym=sym), None, CPU)
    return model


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_tiny_llama_export(tmp_path, fmt):
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama()
    out = export_hf(model, tmp_path / "out", fmt)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == fmt and qc["bits"] == 4 and qc["group_size"] == 32
    if fmt == "gptq":
        assert qc["sym"] is True and qc["desc_act"] is False
        assert json.loads((out / "quantize_config.json").read_text()) == qc
        transformers.GPTQConfig.from_dict(dict(qc))  # transformers accepts the fields
    else:
        transformers.AwqConfig.from_dict(dict(qc))
    assert transformers.AutoConfig.from_pretrained(out).model_type == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in set(index["weight_map"].values()):
        tensors.update(load_file(str(out / f)))
    assert set(index["weight_map"]) == set(tensors)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert "model.norm.weight" in tensors and "lm_head.weight" in tensors
    layer = model.model.layers[1].mlp.down_proj
    pre = "model.layers.1.mlp.down_proj."
    t = {b: tensors[pre + b] for b in ("qweight", "qzeros", "scales")}
    k, n = layer.in_features, layer.out_features
    if fmt == "gptq":
        t["g_idx"] = tensors[pre + "g_idx"]
        got = decode_gptq(t, 4, k, n)
    else:
        got = decode_awq(t, k, n)
    assert torch.equal(got.half(), layer.dequantized_weight())
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # no temp left


def test_export_refuses_what_the_layout_cannot_hold(tmp_path):
    model = _tiny_llama(bits=3)
    with pytest.raises(ExportError, match="4-bit"):
        export_hf(model, tmp_path / "awq", "awq")
    assert not (tmp_path / "awq").exists()
    model.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 128)
    with pytest.raises(ExportError, match="left in float"):
        export_hf(model, tmp_path / "gptq", "gptq")
    assert list(tmp_path.iterdir()) == []
    from kvant.nn.fuse import find_siblings, fuse_siblings

    fused = _tiny_llama()
    fuse_siblings(fused, find_siblings(fused, torch.zeros(1, 4, dtype=torch.long)))
    with pytest.raises(ExportError, match="before kvant.nn.fuse"):
        export_hf(fused, tmp_path / "fused", "compressed-tensors")


# Cross-checks against the reference packers, opt-in (their packages need CUDA builds to
# install; point these at the source files of autoawq 0.2.9 and auto-gptq 0.7.1 to run):
# KVANT_REF_AUTOAWQ=.../awq/utils/packing_utils.py
# KVANT_REF_AUTOGPTQ=.../auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py
def _reference(var):
    import importlib.util
    import os

    path = os.environ.get(var)
    if not path:
        pytest.skip(f"{var} not set")
    spec = importlib.util.spec_from_file_location(var.lower(), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_autoawq_reads_our_awq_and_converts_it_to_our_gptq():
    pu = _reference("KVANT_REF_AUTOAWQ")
    for seed, (k, n, gs) in enumerate([(64, 32, 32), (256, 48, 128)]):
        m = _layer(k, n, 4, gs, seed=seed)
        a, g = awq_tensors(m), gptq_tensors(m)
        w = pu.dequantize_gemm(a["qweight"], a["qzeros"], a["scales"], 4, gs)  # (K, N)
        assert torch.equal(w.t().contiguous(), m.dequantized_weight())
        qw, qz = pu.unpack_reorder_pack(a["qweight"], a["qzeros"], 4)  # AWQ -> GPTQ v1
        assert torch.equal(qw, g["qweight"]) and torch.equal(qz, g["qzeros"])


@pytest.mark.parametrize("bits,gs", [(2, 64), (3, 32), (4, 32), (8, 32)])
def test_autogptq_packs_the_same_words(bits, gs):
    from kvant.formats.hf_export import _codes, _zeros_scales

    ql = _reference("KVANT_REF_AUTOGPTQ")
    k, n = 128, 64
    m = _layer(k, n, bits, gs, seed=bits)
    q, (z, s) = _codes(m), _zeros_scales(m)
    gi = torch.arange(k) // gs
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data = (q - z[:, gi]).float() * s.float()[:, gi]
    ref = ql.QuantLinear(bits, gs, k, n, bias=False, use_cuda_fp16=False,
                         weight_dtype=torch.float32)
    ref.pack(lin, s.float(), z.float(), gi.to(torch.int32))
    g = gptq_tensors(m)
    assert torch.equal(ref.qweight, g["qweight"]) and torch.equal(ref.qzeros, g["qzeros"])


def test_cli_export(tmp_path, tiny_gpt, capsys):
    import kvant
    from kvant.cli import main

    model = _tiny_llama()
    kvant.save_quantized(model, tmp_path / "ck")
    assert main(["export", str(tmp_path / "ck"), "--format", "gptq",
                 "--out", str(tmp_path / "gptq")]) == 0
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq"
    gpt, tok = tiny_gpt
    kvant.quantize(gpt, kvant.RTNConfig(bits=4, group_size=32),
                   options=kvant.EngineOptions(show_progress=False))
    kvant.save_quantized(gpt, tmp_path / "nano", tok)
    assert main(["export", str(tmp_path / "nano"), "--format", "awq",
                 "--out", str(tmp_path / "x")]) == 2
    assert "Hugging Face" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compressed_tensors_layout():
    m = _layer(64, 32, 4, 32, seed=9)
    from kvant.formats.hf_export import ct_tensors

    t = ct_tensors(m, symmetric=False)
    assert torch.equal(t["weight_packed"], m.qweight)  # the stored stream is theirs too
    assert t["weight_shape"].tolist() == [32, 64] and t["weight_scale"].shape == (32, 2)
    assert t["weight_zero_point"].shape == (4, 2)  # 32 rows x 4 bits packed along N
    z = torch.tensor([_stream(t["weight_zero_point"][:, g], 4, 32) for g in range(2)]).t()
    gi = torch.arange(64) // 32
    q = torch.tensor([_stream(t["weight_packed"][r], 4, 64) for r in range(32)])
    w = (q - z[:, gi]).float() * t["weight_scale"][:, gi].float()
    assert torch.equal(w.half(), m.dequantized_weight())
    assert "weight_zero_point" not in ct_tensors(m, symmetric=True)


def test_transformers_loads_the_compressed_tensors_export(tmp_path):
    """transformers + the compressed-tensors package read the export on the CPU and
    decompress it to kvant's weights (symmetric grid: see docs/FORMAT.md for asymmetric)."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama(bits=4, group_size=32, sym=True)
    out = export_hf(model, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head"] and qc["format"] == "pack-quantized"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the first forward decompresses the layers
        a, b = model(ids).logits.float(), loaded(ids).logits.float()
    assert float((a - b).norm() / a.norm()) < 2e-3
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        ours = model.model.layers[1].get_submodule(name).dequantized_weight().float()
        theirs = loaded.model.layers[1].get_submodule(name).weight.float()
        assert torch.allclose(theirs, ours, rtol=0, atol=1e-4), name


def test_asymmetric_compressed_tensors_loads_in_transformers_exactly(tmp_path):
    """The asymmetric export (zero points packed as their compressor writes them, with
    ``dequantize`` set) loads in transformers + compressed-tensors: fp32, exact tokens."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama(bits=4, group_size=32, sym=False)
    out = export_hf(model, tmp_path / "ct", "compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is False and qc["dequantize"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits.float(), loaded(ids).logits.float()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert float((a - b).abs().max()) < 1e-3
    for name in ("self_attn.k_proj", "mlp.down_proj"):
        ours = model.model.layers[0].get_submodule(name).dequantized_weight().float()
        theirs = loaded.model.layers[0].get_submodule(name).weight.float()
        assert torch.allclose(theirs, ours, rtol=0, atol=1e-4), name


def test_gptq_v2_for_asymmetric_grids(tmp_path):
    m = _zero_point_layer(top=15)  # z = 0 with the top code: v1 cannot hold it, v2 can
    t = gptq_tensors(m, v2=True)
    g = t["scales"].shape[0]
    q = torch.tensor([_stream(t["qweight"][:, c], 4, 64) for c in range(8)])
    z = torch.tensor([_stream(t["qzeros"][r], 4, 8) for r in range(g)])  # z itself
    gi = t["g_idx"].long()
    w = (q - z[gi].t()).float() * t["scales"][gi].t().float()
    assert torch.equal(w.half(), m.dequantized_weight())
    model = _tiny_llama(sym=False)
    out = export_hf(model, tmp_path / "g", "gptq")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["checkpoint_format"] == "gptq_v2" and qc["sym"] is False
    sym = export_hf(_tiny_llama(sym=True), tmp_path / "s", "gptq")
    assert json.loads((sym / "config.json").read_text())[
        "quantization_config"]["checkpoint_format"] == "gptq"


def test_quip_export_is_refused_with_the_reason(tmp_path):
    pytest.importorskip("transformers")
    from kvant.config import QuIPConfig

    torch.manual_seed(0)
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    quantize_model(model, QuIPConfig(bits=4, group_size=32), calib, CPU)
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(ExportError, match="transform_config"):
            export_hf(model, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("fmt,sym", [("gptq", True), ("gptq", False), ("awq", False)])
def test_gptqmodel_loads_the_export(tmp_path, fmt, sym):
    """Opt-in (gptqmodel installed): its TORCH backend reads every layer to kvant's weights
    within bf16 rounding."""
    gptqmodel = pytest.importorskip("gptqmodel")
    from hf_tiny import tiny_tokenizer

    model = _tiny_llama(sym=sym)
    out = export_hf(model, tmp_path / "x", fmt, tiny_tokenizer())  # its loader needs one
    g = gptqmodel.GPTQModel.load(str(out), backend=gptqmodel.BACKEND.TORCH, device="cpu",
                                 dtype=torch.bfloat16)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits.float(), g.model(ids).logits.float()
    assert float((a - b).abs().max()) < 0.05
