"""Tiny random-weight Hugging Face models and a tiny BPE tokenizer for the HF-track tests."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

SHAKESPEARE = Path(__file__).resolve().parents[1] / "src" / "kvant" / "assets" / "input.txt"
VOCAB = 128


def text_sample(n_chars: int = 20000) -> str:
    """Public-domain text shipped with the package (tiny Shakespeare)."""
    return SHAKESPEARE.read_text(encoding="utf-8")[:n_chars]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    """A byte-level BPE tokenizer with 258 tokens (256 bytes + <unk> + <eos>), trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([text_sample()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")


def configs(vocab: int = VOCAB, layers: int = 2, ctx: int = 128) -> dict:
    """model_type -> config of a 2-block model, hidden 64, for every architecture tested."""
    T = transformers
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=ctx, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return {
        "llama": T.LlamaConfig(num_key_value_heads=2, **common),
        "mistral": T.MistralConfig(num_key_value_heads=2, sliding_window=None, **common),
        "qwen2": T.Qwen2Config(num_key_value_heads=2, **common),
        "gemma": T.GemmaConfig(num_key_value_heads=2, head_dim=16, **common),
        "phi3": T.Phi3Config(num_key_value_heads=2, **common),
        "opt": T.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128,
                           num_hidden_layers=layers, num_attention_heads=4,
                           max_position_embeddings=ctx, word_embed_proj_dim=64,
                           bos_token_id=0, eos_token_id=1, pad_token_id=1),
        "gpt_neox": T.GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=layers, num_attention_heads=4,
                                    max_position_embeddings=ctx, bos_token_id=0,
                                    eos_token_id=1),
        "gpt2": T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=4,
                             n_positions=ctx, bos_token_id=0, eos_token_id=1),
    }


ARCHS = list(configs())


def tiny_model(arch: str, seed: int = 0, **kw):
    """A random-weight causal LM of ``arch`` in eval mode."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(configs(**kw)[arch]).eval()


def tiny_llama(vocab: int = 96, layers: int = 2, ctx: int = 64, tied: bool = False,
               seed: int = 0, heads: int = 4, kv_heads: int = 2):
    """A random GQA Llama (d 64, 4 query / 2 key-value heads by default) in eval mode."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, max_position_embeddings=ctx,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


def save_sharded_llama(path, layers: int):
    """A tied tiny Llama (vocab 300) saved to ``path`` as several safetensors shards with an
    index, plus the tiny tokenizer: the input of lazy loading and streaming."""
    tiny_llama(vocab=300, layers=layers, ctx=128, tied=True).save_pretrained(
        path, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(path)
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) without KV cache."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def more_configs(vocab: int = VOCAB, layers: int = 2, ctx: int = 128) -> dict:
    """model_type -> config (hidden 64, 2 blocks) of ten more causal architectures: parallel
    attention (Phi-2, GPT-J, Falcon, Cohere), ALiBi (Bloom), partial rotary (StableLM),
    q/k norms (Qwen3, OLMo-2), offset RMSNorm with post-norms (Gemma2), multi-query with a
    fused qkv (GPTBigCode)."""
    T = transformers
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=ctx, **ids)
    return {
        "phi": T.PhiConfig(**common),
        "gptj": T.GPTJConfig(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=4,
                             rotary_dim=8, n_inner=128, n_positions=ctx, **ids),
        "falcon": T.FalconConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=layers,
                                 num_attention_heads=4, max_position_embeddings=ctx, **ids),
        "bloom": T.BloomConfig(vocab_size=vocab, hidden_size=64, n_layer=layers, n_head=4,
                               **ids),
        "stablelm": T.StableLmConfig(num_key_value_heads=2, **common),
        "qwen3": T.Qwen3Config(num_key_value_heads=2, head_dim=16, **common),
        "gemma2": T.Gemma2Config(num_key_value_heads=2, head_dim=16, **common),
        "olmo2": T.Olmo2Config(num_key_value_heads=2, **common),
        "cohere": T.CohereConfig(num_key_value_heads=2, **common),
        "gpt_bigcode": T.GPTBigCodeConfig(vocab_size=vocab, n_embd=64, n_layer=layers,
                                          n_head=4, n_inner=128, n_positions=ctx, **ids),
    }


MORE_ARCHS = list(more_configs())


def tiny_causal(arch: str, seed: int = 0, **kw):
    """A random-weight causal LM of any architecture in :func:`configs` or
    :func:`more_configs`, in eval mode."""
    torch.manual_seed(seed)
    cfg = {**configs(**kw), **more_configs(**kw)}[arch]
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def tiny_bert(seed: int = 0, hidden: int = 128, intermediate: int = 512, layers: int = 2,
              vocab: int = 300):
    """A random-weight post-norm encoder (``transformers.BertModel``) in eval mode."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden,
                                  intermediate_size=intermediate, num_hidden_layers=layers,
                                  num_attention_heads=4, max_position_embeddings=128)
    return transformers.BertModel(cfg).eval()
