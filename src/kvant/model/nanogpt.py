"""The nanoGPT track: the character-level ``GPTLanguageModel`` of "Let's build GPT".

The architecture is kept exactly as the seed defines it — every attention head owns its own
key/query/value ``nn.Linear`` without bias — because that per-head structure is what the
quantizers must handle on this track. Attention itself goes through
``F.scaled_dot_product_attention`` with ``is_causal=True``, which computes the same
``softmax(q kᵀ / sqrt(head_size) + causal mask) v`` as the original masked_fill version.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of the character-level GPT (defaults are the seed's)."""

    vocab_size: int = 65
    n_embd: int = 384
    n_head: int = 6
    n_layer: int = 6
    block_size: int = 256
    dropout: float = 0.2

    def to_dict(self) -> dict:
        """Plain-dict form for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys: {sorted(unknown)}")
        return cls(**d)


class Head(nn.Module):
    """One head of causal self-attention with its own key, query and value projections."""

    def __init__(self, cfg: GPTConfig, head_size: int):
        super().__init__()
        self.key = nn.Linear(cfg.n_embd, head_size, bias=False)
        self.query = nn.Linear(cfg.n_embd, head_size, bias=False)
        self.value = nn.Linear(cfg.n_embd, head_size, bias=False)
        self.dropout_p = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, T, C) -> (B, T, hs)
        k, q, v = self.key(x), self.query(x), self.value(x)
        p = self.dropout_p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)


class MultiHeadAttention(nn.Module):
    """Several heads in parallel, concatenated, then an output projection."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        head_size = cfg.n_embd // cfg.n_head
        self.heads = nn.ModuleList([Head(cfg, head_size) for _ in range(cfg.n_head)])
        self.proj = nn.Linear(head_size * cfg.n_head, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([h(x) for h in self.heads], dim=-1)  # (B, T, n_head*hs)
        return self.dropout(self.proj(out))


class FeedForward(nn.Module):
    """Linear to 4x width, ReLU, Linear back, dropout."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.ReLU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + sa(ln1(x)), then x + ffwd(ln2(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.sa = MultiHeadAttention(cfg)
        self.ffwd = FeedForward(cfg)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class GPTLanguageModel(nn.Module):
    """The seed's character-level GPT; ``forward(idx)`` returns logits (B, T, vocab)."""

    def __init__(self, cfg: GPTConfig | None = None):
        super().__init__()
        cfg = cfg or GPTConfig()
        self.config = cfg
        self.token_embedding_table = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embedding_table = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx: (B, T) token ids. Returns logits (B, T, V), or (logits, loss) with targets."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.token_embedding_table(idx) + self.position_embedding_table(pos)  # (B, T, C)
        x = self.blocks(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` characters after ``idx`` (B, T)."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size:])[:, -1, :] / temperature
            probs = F.softmax(logits.float(), dim=-1)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx


class CharTokenizer:
    """Character-level tokenizer over a fixed, sorted vocabulary."""

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary of a text: its sorted distinct characters (65 for tiny Shakespeare)."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        """Number of characters."""
        return len(self.chars)

    def encode(self, s: str) -> list[int]:
        """Text to ids; an unknown character is a clear error."""
        try:
            return [self.stoi[c] for c in s]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the model's vocabulary") from None

    def decode(self, ids) -> str:
        """Ids to text."""
        return "".join(self.chars[int(i)] for i in ids)


# ---------------------------------------------------------------------------------------
# The embedded default: weights and text shipped in kvant/assets/

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EMBEDDED_DIR = ASSETS / "nanogpt-shakespeare"
EMBEDDED_TEXT = ASSETS / "input.txt"


def embedded_text() -> str:
    """Tiny Shakespeare, the text the embedded model was trained on."""
    return EMBEDDED_TEXT.read_text(encoding="utf-8")


def validation_text(text: str | None = None) -> str:
    """The held-out last 10% of the text (the split used in training)."""
    text = embedded_text() if text is None else text
    return text[int(0.9 * len(text)):]


def training_text(text: str | None = None) -> str:
    """The first 90% of the text (calibration draws from here, never from validation)."""
    text = embedded_text() if text is None else text
    return text[: int(0.9 * len(text))]


def load_nanogpt_dir(path: str | Path = EMBEDDED_DIR, dtype: torch.dtype = torch.float32):
    """Load a nanoGPT weight directory (config.json + safetensors shards) -> (model, tok)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: not a nanoGPT weight dir")
    meta = json.loads(cfg_file.read_text())
    model = GPTLanguageModel(GPTConfig.from_dict(meta["config"]))
    state = {}
    for shard in meta["shards"]:
        f = path / shard
        if not f.is_file():
            raise FileNotFoundError(f"nanoGPT weight shard {str(f)!r} is missing")
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights in {str(path)!r} do not fit GPTLanguageModel: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(dtype).eval()
    return model, CharTokenizer(meta["vocab"])


def load_embedded(dtype: torch.dtype = torch.float32):
    """The embedded default model and its tokenizer."""
    return load_nanogpt_dir(EMBEDDED_DIR, dtype)


def spec(model: GPTLanguageModel, tokenizer: CharTokenizer) -> dict:
    """What a checkpoint needs to rebuild the model: config and vocabulary."""
    return {"config": model.config.to_dict(), "vocab": tokenizer.chars}


def from_spec(spec_: dict):
    """Empty model and tokenizer from :func:`spec` output."""
    return GPTLanguageModel(GPTConfig.from_dict(spec_["config"])).eval(), CharTokenizer(spec_["vocab"])
