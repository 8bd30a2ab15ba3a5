"""Perplexity on held-out text in non-overlapping windows.

``char_perplexity`` serves the character-level nanoGPT track: every window of ``seq_len``
characters is scored at all its positions (the first character of a window is predicted from
nothing before it, so is not scored), and the report gives perplexity per character, bits
per character, and how many tokens and windows were used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _device_of(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, seq_len: int, batch_size: int = 16,
               max_windows: int | None = None, show_progress: bool = False,
               forward=None) -> dict:
    """Sum of next-token NLL over non-overlapping windows of ``ids`` (1-D LongTensor).

    Each window holds ``seq_len`` tokens and scores its last ``seq_len - 1``.
    ``forward(model, batch) -> logits`` defaults to ``model(batch)``.
    """
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"text of {ids.numel()} tokens is shorter than one window of {seq_len}")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    device = _device_of(model)
    total, count = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity",
                      disable=not show_progress):
        batch = windows[start:start + batch_size].to(device)
        logits = forward(model, batch) if forward else model(batch)
        if isinstance(logits, tuple):
            logits = logits[0]
        logits = getattr(logits, "logits", logits)
        nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                              batch[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    return {"nll_sum": total, "tokens": count, "windows": n_windows, "seq_len": seq_len}


def char_perplexity(model, tokenizer, text: str, seq_len: int = 256,
                    max_windows: int | None = None, batch_size: int = 16,
                    show_progress: bool = False) -> dict:
    """Perplexity and bits per character of a character model on ``text``.

    Returns ppl, bpc, nll (mean nats per scored character), tokens, windows, seq_len.
    """
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    r = window_nll(model, ids, seq_len, batch_size, max_windows, show_progress)
    nll = r["nll_sum"] / r["tokens"]
    return {"ppl": math.exp(nll), "bpc": nll / math.log(2), "nll": nll,
            "tokens": r["tokens"], "windows": r["windows"], "seq_len": seq_len}
