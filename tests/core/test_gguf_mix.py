"""llama.cpp's per-tensor types (kvant.core.gguf_mix): SmolLM2-135M's tensors per file type,
and, opt-in, llama.cpp's own choices and file sizes next to kvant's."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from collections import Counter

import pytest
import torch

from kvant.core import gguf_mix
from kvant.core.gguf_mix import LlamaShape, file_types, tensor_type

# SmolLM2-135M: 30 layers, 9 heads over 3 KV heads, width 576, MLP 1536, tied embedding
SMOL = LlamaShape(30, 9, 3, tied=True)
SMOL_WIDTHS = {"token_embd": 576, "attn_q": 576, "attn_k": 576, "attn_v": 576,
               "attn_output": 576, "ffn_gate": 576, "ffn_up": 576, "ffn_down": 1536}


@pytest.mark.parametrize("base, counts", [
    # the counts of llama.cpp's own +imatrix files of SmolLM2 (benchmarks/results/
    # gguf_quality.md: Q4_0, Q4_K_S and Q3_K_S), and the rule for the other types
    ("Q4_0", {"Q4_0": 207, "Q4_1": 3, "Q8_0": 1}),
    ("Q4_K", {"Q5_0": 176, "Q4_K": 27, "Q5_1": 4, "Q5_K": 3, "Q8_0": 1}),
    ("Q3_K", {"Q4_0": 180, "Q3_K": 30, "Q8_0": 1}),
    ("Q2_K", {"Q4_0": 180, "Q3_K": 30, "Q8_0": 1}),
    ("Q6_K", {"Q8_0": 181, "Q6_K": 30}),
    ("Q4_1", {"Q4_1": 210, "Q8_0": 1}),
    ("Q8_0", {"Q8_0": 211}),
    ("Q5_0", {"Q5_0": 207, "Q5_1": 3, "Q8_0": 1}),
])
def test_smollm2_counts_per_file_type(base, counts):
    assert Counter(file_types(base, SMOL, SMOL_WIDTHS).values()) == counts


def test_smollm2_which_tensors():
    t = lambda base, name, im=True: tensor_type(  # noqa: E731
        base, name, SMOL_WIDTHS[name.split(".")[-2]] if name.startswith("blk") else 576,
        SMOL, im)
    # Q4_0: ffn_down of layers 0..2 (30 // 8 = 3) as Q4_1, only with an importance matrix
    assert [t("Q4_0", f"blk.{i}.ffn_down.weight") for i in (0, 2, 3, 29)] == [
        "Q4_1", "Q4_1", "Q4_0", "Q4_0"]
    assert t("Q4_0", "blk.0.ffn_down.weight", im=False) == "Q4_0"
    assert t("Q4_0", "blk.0.attn_v.weight") == "Q4_0"
    # Q4_K_S: attn_v 0..3 as Q5_K (Q5_1 at width 576), ffn_down 0..2 as Q5_K, the rest Q4_K
    # (Q5_0 at width 576)
    assert [t("Q4_K", f"blk.{i}.attn_v.weight") for i in (0, 3, 4)] == ["Q5_1", "Q5_1", "Q5_0"]
    assert [t("Q4_K", f"blk.{i}.ffn_down.weight") for i in (2, 3)] == ["Q5_K", "Q4_K"]
    assert t("Q4_K", "blk.0.attn_q.weight") == "Q5_0"
    # the tied embedding: Q6_K, Q8_0 at width 576 (or when the base is Q8_0)
    assert t("Q4_K", "token_embd.weight") == "Q8_0"
    assert tensor_type("Q4_0", "token_embd.weight", 512, SMOL) == "Q6_K"
    # Q2_K: attn_v, attn_output and ffn_down as Q3_K
    assert tensor_type("Q2_K", "blk.5.attn_output.weight", 512, SMOL) == "Q3_K"
    assert tensor_type("Q2_K", "blk.5.attn_v.weight", 512, SMOL) == "Q3_K"
    assert tensor_type("Q2_K", "blk.5.attn_q.weight", 512, SMOL) == "Q2_K"


def test_gqa_70b_and_untied():
    big = LlamaShape(80, 64, 8, tied=False)  # a Llama-2/3 70B
    assert big.is_70b and not SMOL.is_70b
    assert tensor_type("Q2_K", "blk.9.attn_v.weight", 8192, big) == "Q5_K"  # Q4_K, 70B
    assert tensor_type("Q2_K", "blk.9.attn_v.weight", 4096,
                       LlamaShape(32, 32, 8)) == "Q4_K"  # n_head / n_kv >= 4
    assert tensor_type("Q3_K", "blk.9.attn_v.weight", 8192, big) == "Q5_K"
    assert tensor_type("Q3_K", "blk.9.attn_q.weight", 8192, big) == "Q3_K"
    assert tensor_type("Q4_K", "token_embd.weight", 8192, big) == "Q4_K"  # untied: base
    assert tensor_type("Q4_K", "output.weight", 8192, big) == "Q6_K"
    assert tensor_type("Q8_0", "output.weight", 8192, big) == "Q8_0"


def test_names_and_refusals():
    assert gguf_mix.gguf_name("model.layers.12.mlp.down_proj", "model.layers") == \
        "blk.12.ffn_down.weight"
    assert gguf_mix.gguf_name("model.layers.1.mlp.experts.0.down_proj", "model.layers") is None
    with pytest.raises(ValueError, match="no llama.cpp file type"):
        tensor_type("IQ4_NL", "blk.0.attn_q.weight", 576, SMOL)
    with pytest.raises(ValueError, match="not a Llama"):
        tensor_type("Q4_0", "blk.0.attn_norm.weight", 576, SMOL)


def test_engine_rounds_each_layer_on_its_mix_type():
    """GPTQ on gguf:Q4_K of a 2-layer Llama of width 96: attn_v of both layers as Q5_K's
    width fallback Q5_1, the other 96-wide inputs as Q5_0, ffn_down (256 wide) as Q4_K;
    RTN (no data) on Q4_0 leaves ffn_down alone, GPTQ (data) widens it in 8+ layer models."""
    import transformers

    import kvant
    from kvant.config import GPTQConfig
    from kvant.nn.gguf_linear import GGUFLinear

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=256,
                                   num_hidden_layers=8, num_attention_heads=3,
                                   num_key_value_heads=1, max_position_embeddings=64)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    for base, want in (("Q4_K", {"self_attn.v_proj": "Q5_1", "self_attn.q_proj": "Q5_0",
                                 "mlp.down_proj": ("Q5_K", "Q4_K")}),
                       ("Q4_0", {"self_attn.v_proj": "Q4_0",
                                 "mlp.down_proj": ("Q4_1", "Q4_0")})):
        m = transformers.LlamaForCausalLM(cfg).eval()
        kvant.quantize(m, GPTQConfig(grid=f"gguf:{base}"), calib)
        for hf, w in want.items():
            first, later = (w, w) if isinstance(w, str) else w
            got = [m.model.layers[i].get_submodule(hf) for i in (0, 1)]
            assert all(isinstance(g, GGUFLinear) for g in got)
            # 8 // 8 = 1: only layer 0's ffn_down is wider; attn_v 0..3 all are (Q4_K)
            assert [g.gguf_type for g in got] == [first, later if hf == "mlp.down_proj"
                                                  else first]


def test_gguf_mix_picks_llama_cpps_plain_or_imatrix_types():
    """``gguf_mix``: GPTQ (data) on Q4_0 follows the +imatrix types (layer 0's ffn_down as
    Q4_1) under "auto" and "imatrix", llama.cpp's plain types (all Q4_0: the smaller file)
    under "plain"; RTN under "imatrix" widens it too; only "auto" on the int grid."""
    import transformers

    import kvant
    from kvant.config import ConfigError, GPTQConfig, RTNConfig

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=256,
                                   num_hidden_layers=8, num_attention_heads=3,
                                   num_key_value_heads=1, max_position_embeddings=64)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    got = {}
    for name, qc in (("gptq auto", GPTQConfig(grid="gguf:Q4_0")),
                     ("gptq imatrix", GPTQConfig(grid="gguf:Q4_0", gguf_mix="imatrix")),
                     ("gptq plain", GPTQConfig(grid="gguf:Q4_0", gguf_mix="plain")),
                     ("rtn imatrix", RTNConfig(grid="gguf:Q4_0", gguf_mix="imatrix"))):
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(cfg).eval()
        kvant.quantize(m, qc, calib)
        got[name] = [m.model.layers[i].mlp.down_proj.gguf_type for i in (0, 1)]
    assert got == {"gptq auto": ["Q4_1", "Q4_0"], "gptq imatrix": ["Q4_1", "Q4_0"],
                   "gptq plain": ["Q4_0", "Q4_0"], "rtn imatrix": ["Q4_1", "Q4_0"]}
    assert GPTQConfig.from_dict(GPTQConfig(grid="gguf:Q4_0", gguf_mix="plain").to_dict()
                                ).gguf_mix == "plain"
    with pytest.raises(ConfigError, match="applies only to a 'gguf:TYPE' grid"):
        GPTQConfig(gguf_mix="plain")
    with pytest.raises(ConfigError, match="gguf_mix must be one of"):
        GPTQConfig(grid="gguf:Q4_0", gguf_mix="imat")


# -- llama.cpp itself (opt-in) ----------------------------------------------------------------
def _llama_python():
    """A Python that imports llama_cpp: this one, or KVANT_LLAMA_PYTHON."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        import sys
        return sys.executable
    py = os.environ.get("KVANT_LLAMA_PYTHON")
    return py if py and shutil.which(py) else None


_QUANTIZE = """
import ctypes, json, sys
import llama_cpp, numpy as np
src, dst, ftype, names, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), json.loads(sys.argv[5])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = ftype, 1
keep = [np.ones(k[n], dtype=np.float32) for n in names]
ent = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
for i, (n, v) in enumerate(zip(names, keep)):
    ent[i].name, ent[i].size = n.encode(), v.size
    ent[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
ent[len(names)].name = None
p.imatrix = ctypes.cast(ent, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p))
"""
# llama.cpp's llama_ftype numbers of the file types kvant's types follow
_FTYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 11,
              "Q4_K": 14, "Q5_K": 16, "Q6_K": 18}


@pytest.mark.skipif(_llama_python() is None,
                    reason="llama_cpp not importable (set KVANT_LLAMA_PYTHON to a Python with "
                           "llama-cpp-python)")
def test_llama_cpp_picks_the_same_types_and_kvant_files_are_no_larger(tmp_path):
    """A 30-layer Llama shaped like SmolLM2 (widths 96 and 256: Q4_0-, Q5_0- and Q5_1-
    fallbacks as at 576 and 1536): llama.cpp's +imatrix file of every file type has exactly
    the rule's tensor types, and kvant's GPTQ file of Q4_0, Q4_K and Q3_K has the same
    types and is no larger."""
    import gguf
    import transformers

    import kvant
    from kvant.config import GPTQConfig
    from kvant.formats.gguf_export import export_gguf
    from hf_tiny import tiny_tokenizer
    from tokenizers import decoders

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=256,
                                   num_hidden_layers=30, num_attention_heads=3,
                                   num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    tok = copy.deepcopy(tiny_tokenizer())
    tok._tokenizer.decoder = decoders.ByteLevel()  # GGUF's BPE vocab needs a byte-level one
    src = export_gguf(model, tmp_path / "f32.gguf", tokenizer=tok, float_type="F32")
    shape = LlamaShape(30, 3, 1, tied=True)
    widths = {"token_embd": 96, "attn_q": 96, "attn_k": 96, "attn_v": 96, "attn_output": 96,
              "ffn_gate": 96, "ffn_up": 96, "ffn_down": 256}
    names = [f"blk.{i}.{r}.weight" for i in range(30) for r in gguf_mix.HF_ROLES.values()]
    k = {n: widths[n.split(".")[2]] for n in names}
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))

    def types(path):
        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors
                if not t.name.endswith("norm.weight")}

    for base, ftype in _FTYPE_IDS.items():
        ref = tmp_path / f"llama-{base}.gguf"
        out = subprocess.run([_llama_python(), "-c", _QUANTIZE, str(src), str(ref), str(ftype),
                              json.dumps(names), json.dumps(k)], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert types(ref) == file_types(base, shape, widths), base
        if base not in ("Q4_0", "Q4_K", "Q3_K"):
            continue
        m, _ = kvant.load_model(str(src))
        kvant.quantize(m, GPTQConfig(grid=f"gguf:{base}"), calib)
        ours = export_gguf(m, tmp_path / f"kvant-{base}.gguf", base, source_gguf=src,
                           embed_type=types(ref)["token_embd.weight"])
        assert types(ours) == types(ref), base
        assert ours.stat().st_size <= ref.stat().st_size, base
