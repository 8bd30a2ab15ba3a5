"""Greedy generation with a static KV cache: one prefill, then decode steps that can be
compiled and replayed as one CUDA graph each.

A decode step runs the decoder blocks directly with our own position and mask tensors (no
host-side logic of the HF top-level forward), so the whole step is a fixed sequence of GPU
work: ``torch.compile`` fuses what lies between the linear layers and a CUDA graph removes
the launch overhead. The same code runs eagerly on the CPU (no graph), which is what the
tests check token for token against full forwards without a cache.

Works for HF Llama-like causal LMs (``model.model.embed_tokens / layers / norm / rotary_emb``
and ``model.lm_head``); anything else is refused with a clear error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from kvant.errors import InputError
from kvant.eval.perplexity import model_device
from kvant.serve.attention import register, set_attention


class GenerateError(InputError):
    """A model or request the static decoder cannot serve."""


@dataclass(frozen=True)
class DecodeStats:
    """Timings of one :func:`generate` call (seconds; tokens/s over the decode steps)."""

    prefill_s: float
    decode_s: float
    new_tokens: int
    batch: int

    @property
    def ms_per_step(self) -> float:
        """Milliseconds per decode step (the first new token comes from the prefill)."""
        return 1e3 * self.decode_s / max(self.new_tokens - 1, 1)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the decode steps, all sequences together."""
        steps = max(self.new_tokens - 1, 1)
        return self.batch * steps / self.decode_s if self.decode_s > 0 else float("nan")


def capture_graph(fn, warmup: int = 1) -> "torch.cuda.CUDAGraph":
    """``fn`` run ``warmup`` times on a side stream (compiles kernels, allocates what it
    needs: nothing may allocate or synchronise during capture), then captured as a graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def _cache_kw(fn) -> str:
    """The keyword a forward takes its KV cache by: ``cache`` in newer transformers,
    ``past_key_values`` before (and deprecated since 5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def _inner(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if inner is None or not hasattr(inner, attr):
            raise GenerateError(f"{type(model).__name__} is not a Llama-like causal LM "
                                f"(no model.{attr}): kvant's static decoder cannot run it")
    return inner


ATTENTION = ("grouped", "model")


class StaticDecoder:
    """Prefill + graph-replayable greedy decode steps over a ``StaticCache`` of ``ctx``.

    ``attention="grouped"`` (default) runs the model with kvant's grouped-query attention
    (:mod:`kvant.serve.attention`: the cached keys and values are never repeated per query
    head) until :meth:`close`; ``"model"`` keeps the model's own implementation. Use it as a
    context manager, or call :meth:`close`, to give the model its own attention back."""

    def __init__(self, model: nn.Module, batch: int, ctx: int, compile: bool = False,
                 attention: str = "grouped"):
        from transformers import StaticCache

        if attention not in ATTENTION:
            raise GenerateError(f"attention must be one of {', '.join(ATTENTION)}, got "
                                f"{attention!r}")
        self.model, self.inner, self.batch, self.ctx = model, _inner(model), batch, ctx
        dev = model_device(model)
        self.device = dev
        self.cache = StaticCache(config=model.config, max_cache_len=ctx)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.slots = torch.arange(ctx, device=dev)
        self._run = torch.compile(self.step, dynamic=False) if compile else self.step
        self.graph = None
        self._model_kw = _cache_kw(type(model).forward)
        self._layer_kw = _cache_kw(type(self.inner.layers[0]).forward)
        # the prefill runs the model's own attention (its mask creation knows only that
        # one); the steps run the grouped one
        self._own_attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        self._step_attn = register() if attention == "grouped" and self._own_attn else None
        set_attention(model, self._step_attn)

    def close(self) -> None:
        """Give the model its own attention implementation back."""
        set_attention(self.model, self._own_attn)

    def __enter__(self) -> "StaticDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (batch, T) through the model, filling the cache; returns and
        stores the first generated tokens (batch, 1)."""
        b, t = ids.shape
        if b != self.batch or t >= self.ctx:
            raise GenerateError(f"prompt of shape {tuple(ids.shape)} does not fit batch "
                                f"{self.batch} and context {self.ctx}")
        set_attention(self.model, self._own_attn)
        try:
            out = self.model(input_ids=ids.to(self.device), **{self._model_kw: self.cache},
                             use_cache=True, cache_position=torch.arange(t, device=self.device))
        finally:
            set_attention(self.model, self._step_attn)
        self.tok.copy_(out.logits[:, -1:].argmax(-1))
        self.rewind(t)
        return self.tok.clone()

    def rewind(self, t: int) -> None:
        """Set the next write position to ``t``: ours and the cache layers' own counters
        (transformers 5 StaticLayer writes at its ``cumulative_length``, not at the
        cache_position it is given)."""
        self.pos.fill_(t)
        for layer in getattr(self.cache, "layers", []):
            if torch.is_tensor(getattr(layer, "cumulative_length", None)):
                layer.cumulative_length.fill_(t)

    @torch.no_grad()
    def step(self) -> None:
        """Embed the current tokens at ``pos``, run every block, keep the argmax tokens."""
        inner = self.inner
        h = inner.embed_tokens(self.tok)
        pos_ids = self.pos.view(1, 1).expand(self.batch, 1)
        cos_sin = inner.rotary_emb(h, pos_ids)
        mask = (self.slots <= self.pos).view(1, 1, 1, self.ctx).expand(self.batch, 1, 1, -1)
        for layer in inner.layers:
            out = layer(h, attention_mask=mask, position_ids=pos_ids,
                        **{self._layer_kw: self.cache}, use_cache=True, cache_position=self.pos,
                        position_embeddings=cos_sin)
            h = out[0] if isinstance(out, tuple) else out
        logits = self.model.lm_head(inner.norm(h))
        self.tok.copy_(logits[:, -1:].argmax(-1))
        self.pos.add_(1)

    def capture(self, warmup: int = 2) -> None:
        """Capture one (compiled) step as a CUDA graph (:func:`capture_graph`); the warm-up
        steps advance the position, as replays do."""
        self.graph = capture_graph(self._run, warmup)

    def advance(self) -> None:
        """One decode step: a graph replay when captured, else the (compiled) step."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()


@torch.no_grad()
def generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, ctx: int | None = None,
             compile: bool = False, cuda_graph: bool | None = None,
             attention: str = "grouped"):
    """Greedy continuation of ``ids`` (batch, T) by ``max_new_tokens`` tokens ->
    (tokens (batch, T + new), :class:`DecodeStats`). ``cuda_graph`` (default: on CUDA)
    captures the step; the warm-up and capture steps write cache positions past the prompt,
    then the cache is rewound, and the real steps overwrite those positions before the mask
    lets them be read, so the tokens equal eager decoding's. ``attention``: as
    :class:`StaticDecoder` (the model's own implementation is back when this returns)."""
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ctx = ctx or ids.shape[1] + max_new_tokens
    if ids.shape[1] + max_new_tokens > ctx:
        raise GenerateError(f"prompt ({ids.shape[1]}) + new tokens ({max_new_tokens}) exceed "
                            f"the context {ctx}")
    with StaticDecoder(model, ids.shape[0], ctx, compile, attention) as dec:
        return _generate(dec, ids, max_new_tokens, cuda_graph)


def _generate(dec: StaticDecoder, ids: torch.Tensor, max_new_tokens: int,
              cuda_graph: bool | None):
    on_cuda = dec.device.type == "cuda"
    cuda_graph = on_cuda if cuda_graph is None else cuda_graph
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    t0 = time.perf_counter()
    first = dec.prefill(ids)
    sync()
    t1 = time.perf_counter()
    if cuda_graph and max_new_tokens > 1:
        # warm up and capture on the same cache, then rewind: the warm-up steps wrote
        # positions >= T, which the real steps overwrite before reading them (mask)
        dec.capture()
        dec.rewind(ids.shape[1])
        dec.tok.copy_(first)
        sync()
        t1 = time.perf_counter()
    out = [first]
    for _ in range(max_new_tokens - 1):
        dec.advance()
        out.append(dec.tok.clone())
    sync()
    stats = DecodeStats(t1 - t0, time.perf_counter() - t1, max_new_tokens, ids.shape[0])
    return torch.cat([ids.to(dec.device), *out], dim=1), stats


def decode_speed(model: nn.Module, batch: int, ctx: int, steps: int = 64,
                 compile: bool = False) -> dict:
    """Decode tokens/s at ``batch`` with the cache holding ~``ctx`` positions: a random
    prompt of ``ctx - steps - 4`` tokens, then ``steps`` timed greedy steps."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, ctx - steps - 4),
                           generator=torch.Generator().manual_seed(0))
    _, stats = generate(model, prompt, steps, ctx=ctx, compile=compile)
    return {"ctx": ctx, "steps": steps, "prefill_s": stats.prefill_s,
            "ms_per_step": stats.ms_per_step,
            "tokens_per_s": stats.tokens_per_s, "compile": compile}
