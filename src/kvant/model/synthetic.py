"""Seeded random weights of any Hugging Face shape, generated per tensor on request.

Large shapes (a 70B Llama: ~140 GB in bf16) do not fit the disks the benchmarks run on, so
their weights are made when the streaming loader asks for them, through the same
interface the safetensors reader serves (:class:`kvant.model.sources.TensorSource`). Every
tensor depends only on (seed, its name, the device it is generated on): reading block 57
twice, or in another run, gives the same bytes.

Values: norm weights 1, biases 0, everything else N(0, ``std``) (0.02, the usual Llama
initialisation). They exercise speed and memory, not quality.
"""

from __future__ import annotations

import hashlib
import torch

from kvant.model.sources import SourceError


def llama_config(hidden: int = 8192, intermediate: int = 28672, blocks: int = 80,
                 heads: int = 64, kv_heads: int = 8, vocab: int = 128256,
                 max_positions: int = 8192):
    """A transformers ``LlamaConfig`` (defaults: the Llama-3-70B shape), bf16 storage."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, torch_dtype="bfloat16")


def _shapes(config) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """state_dict names -> (shape, dtype) of the model ``config`` describes (built on meta)."""
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {n: (t.shape, t.dtype) for n, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # stored once, as the embedding
    return shapes


class SyntheticSource:
    """Tensors of ``config``'s model, drawn from N(0, std) seeded by (seed, name)."""

    def __init__(self, config, seed: int = 0, std: float = 0.02,
                 device: str | torch.device = "cpu"):
        self.config, self.seed, self.std = config, seed, std
        self.device = torch.device(device)
        self.shapes = _shapes(config)

    def names(self) -> set[str]:
        return set(self.shapes)

    def identity(self) -> dict:
        cfg = self.config.to_dict()
        keep = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "vocab_size")
        return {"kind": "synthetic", "seed": self.seed, "std": self.std,
                "device": self.device.type, "config": {k: cfg.get(k) for k in keep}}

    def _generator(self, name: str) -> torch.Generator:
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        return torch.Generator(device=self.device).manual_seed(
            int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))

    def read(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            if n not in self.shapes:
                raise SourceError(f"tensor {n!r} is not part of the synthetic model")
            shape, stored = self.shapes[n]
            dt = dtype if stored.is_floating_point else stored
            if "norm" in n and n.endswith(".weight"):
                t = torch.ones(shape, dtype=dt, device=self.device)
            elif n.endswith(".bias"):
                t = torch.zeros(shape, dtype=dt, device=self.device)
            elif not stored.is_floating_point:
                raise SourceError(f"synthetic weights cannot make integer tensor {n!r}")
            else:
                t = torch.empty(shape, dtype=torch.float32, device=self.device)
                t.normal_(0.0, self.std, generator=self._generator(n))
                t = t.to(dt)
            out[n] = t
        return out


def load_synthetic(config, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                   device: str | torch.device = "cpu"):
    """A model of ``config`` whose blocks are generated one at a time while quantizing
    (kvant.model.lazy). ``device``: where the tensors are generated (cuda is fast)."""
    from kvant.model.lazy import build_streamed

    return build_streamed(config, SyntheticSource(config, seed, device=device), dtype)
