"""kvant.compat.awq: the AutoAWQ snippet runs end to end on a tiny local Llama, reloads with
identical outputs, and every unsupported argument fails with a clear message."""

import json
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import kvant  # noqa: E402
from kvant.compat.awq import (AutoAWQForCausalLM, CompatError, autoawq_calibration,  # noqa: E402
                              awq_config_from_autoawq)

TEXTS = [f"To be, or not to be: that is question {i}. Whether 'tis nobler in the mind."
         for i in range(24)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama and a character tokenizer, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tiny-llama")
    chars = [chr(c) for c in range(32, 127)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                               bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_autoawq_snippet_end_to_end(model_dir, tmp_path):
    from transformers import AutoTokenizer

    # the AutoAWQ README snippet, with a local model and local calibration strings
    model_path, quant_path = str(model_dir), str(tmp_path / "tiny-awq")
    quant_config = {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}
    model = AutoAWQForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=True)
    model.quantize(tokenizer, quant_config=quant_config, calib_data=TEXTS,
                   max_calib_samples=16, max_calib_seq_len=128)
    model.save_quantized(quant_path)
    tokenizer.save_pretrained(quant_path)
    qc = json.loads((tmp_path / "tiny-awq" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["group_size"] == 32
    with pytest.raises(CompatError, match="AWQ GEMM export"):
        AutoAWQForCausalLM.from_quantized(quant_path)
    kvant_path = tmp_path / "tiny-kvant"
    kvant.save_quantized(model.model, kvant_path, tokenizer)

    ids = torch.tensor([tokenizer.encode("To be or not to be")])
    with torch.no_grad():
        before = model(ids).logits
    loaded = AutoAWQForCausalLM.from_quantized(str(kvant_path), fuse_layers=True,
                                               device_map="cpu")
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)
    assert loaded.quant_config["w_bit"] == 4 and loaded.quant_config["zero_point"]
    out = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    # AutoAWQ's default: a group no previous op absorbs (o_proj under GQA) stays unscaled
    treat = {g["layers"][0]: g["treatment"] for g in model.report.blocks[0]["awq"]}
    assert treat["self_attn.q_proj"].startswith("fold->input_layernorm")
    assert "input_scale" not in treat["self_attn.o_proj"]
    assert loaded.model.model.layers[0].self_attn.o_proj.input_scale is None


def test_quant_config_mapping():
    cfg = awq_config_from_autoawq({"zero_point": False, "q_group_size": 64, "w_bit": 3,
                                   "version": "gemv", "modules_to_not_convert": ["lm_head"]},
                                  duo_scaling=False, apply_clip=False, rounding="gptq")
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.ignore) == (3, 64, True, ("lm_head",))
    assert not cfg.duo_scaling and not cfg.clip_search and cfg.rounding == "gptq"
    assert awq_config_from_autoawq(None).duo_scaling  # AutoAWQ's default
    with pytest.raises(CompatError, match="unknown quant_config keys"):
        awq_config_from_autoawq({"bits": 4})
    with pytest.raises(CompatError, match="version 'marlin'"):
        awq_config_from_autoawq({"version": "marlin"})
    with pytest.raises(CompatError, match="w_bit"):
        awq_config_from_autoawq({"w_bit": 5})
    with pytest.raises(CompatError, match="unknown quantize"):
        awq_config_from_autoawq({}, foo=1)


def test_rejected_arguments(model_dir):
    from transformers import AutoTokenizer

    model = AutoAWQForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    with pytest.raises(CompatError, match="export_compatible"):
        model.quantize(tok, calib_data=TEXTS, export_compatible=True)
    with pytest.raises(CompatError, match="device_map"):
        AutoAWQForCausalLM.from_pretrained(str(model_dir), device_map={"": 0})
    with pytest.raises(CompatError, match="quantize"):
        model.save_quantized("/nonexistent/never-written")
    with pytest.raises(EnvironmentError):
        AutoAWQForCausalLM()


def test_calibration_protocol_and_sources(model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    calib = autoawq_calibration(tok, TEXTS, max_calib_samples=8, max_calib_seq_len=96)
    n_tok = sum(len(tok.encode(t.strip())) for t in TEXTS[:8])
    assert calib.shape == (n_tok // 96, 96)
    first = tok.encode(TEXTS[0].strip())  # texts are encoded one by one and concatenated
    assert calib[0, :len(first)].tolist() == first
    f = tmp_path / "calib.txt"
    f.write_text("\n\n".join(TEXTS))
    assert torch.equal(autoawq_calibration(tok, str(f), 8, 96), calib)
    with pytest.raises(CompatError, match="fewer than one window"):
        autoawq_calibration(tok, TEXTS[:1], max_calib_seq_len=128)
    # "pileval" needs the hub: offline it says so
    fake = types.ModuleType("datasets")

    def offline(*a, **k):
        raise ConnectionError("no network")

    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(CompatError, match="needs the Hugging Face hub.*offline"):
        autoawq_calibration(tok, "pileval")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CompatError, match="offline"):
        autoawq_calibration(tok, "pileval")


def test_facade_model_exports_to_the_gemm_layout(model_dir, tmp_path):
    """With scale_unfoldable=False (AutoAWQ's treatment of unabsorbable channels) the
    facade's model exports to AutoAWQ's GEMM layout for vLLM."""
    import json

    import kvant
    from transformers import AutoTokenizer

    model = AutoAWQForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model.quantize(tokenizer, quant_config={"zero_point": True, "q_group_size": 32,
                                            "w_bit": 4, "version": "GEMM"},
                   calib_data=TEXTS, max_calib_samples=16, max_calib_seq_len=128,
                   scale_unfoldable=False)
    out = kvant.export_quantized(model.model, tmp_path / "gemm", "awq", tokenizer)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["version"], qc["group_size"]) == ("awq", "gemm", 32)
