"""Calibration windows for character-level models (the nanoGPT track)."""

from __future__ import annotations

import torch


def char_windows(tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0):
    """``n_samples`` random windows of ``seq_len`` characters of ``text`` (seeded).

    Returns a LongTensor (n_samples, seq_len).
    """
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text of {ids.numel()} characters is shorter than one "
                         f"window of {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
