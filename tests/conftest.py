"""Shared fixtures: tiny random models and the embedded model."""

import pytest
import torch

from kvant.model.nanogpt import CharTokenizer, GPTConfig, GPTLanguageModel

TINY = GPTConfig(vocab_size=65, n_embd=64, n_head=2, n_layer=2, block_size=32, dropout=0.0)


@pytest.fixture
def tiny_gpt():
    """A 2-block random nanoGPT (n_embd 64) and a 65-character tokenizer."""
    torch.manual_seed(0)
    model = GPTLanguageModel(TINY).eval()
    tok = CharTokenizer("".join(chr(c) for c in range(32, 97)))
    return model, tok


@pytest.fixture
def tiny_calib():
    """Random token windows (8, 32)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 65, (8, 32), generator=g)
