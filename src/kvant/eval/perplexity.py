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


def model_device(model: torch.nn.Module) -> torch.device:
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
    device = model_device(model)
    total, count = 0.0, 0
    # None: tqdm shows the bar only when stderr is a terminal
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity",
                      disable=None if show_progress else True):
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


# ---------------------------------------------------------------------------------------
# Hugging Face models: WikiText-2 with the papers' protocol (GPTQ, AWQ, QuIP#, SpQR)

EVAL_SETS = ("wikitext2",)


def lm_logits(model, batch: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of a causal LM on token ids (B, T); HF models run without KV cache."""
    if hasattr(getattr(model, "config", None), "use_cache"):
        out = model(input_ids=batch, use_cache=False)
    else:
        out = model(batch)
    if isinstance(out, tuple):
        out = out[0]
    return getattr(out, "logits", out)


def eval_text(dataset="wikitext2", eval_file=None) -> str:
    """The evaluation text: WikiText-2 test rows joined by ``"\\n\\n"``, or a text file's content.

    ``dataset="wikitext2"`` reads ``eval_file`` (the raw ``wiki.test.raw``; each line is one
    row) or, without it, the hub's test split through ``datasets``. Any other string is a
    path to a plain text file, scored as it is.
    """
    import os

    from kvant.calib.data import CalibrationDataError, wikitext_rows

    name = str(dataset)
    if name == "wikitext2":
        if eval_file is not None:
            if not os.path.isfile(eval_file):
                raise FileNotFoundError(f"eval file {str(eval_file)!r} does not exist")
            return "\n\n".join(wikitext_rows(eval_file))
        try:
            import datasets
        except ImportError:
            raise CalibrationDataError(
                "wikitext2 needs a local copy of wiki.test.raw (eval_file=..., CLI --eval-file) "
                "or the `datasets` package to download it, which is not installed: "
                "pip install 'kvant[hf]'") from None
        try:
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        except Exception as e:  # network errors come in many types
            raise CalibrationDataError(f"could not load wikitext2 from the hub ({type(e).__name__}"
                                       f"); offline? pass eval_file=<wiki.test.raw>") from None
        return "\n\n".join(rows)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"eval set {name!r} is neither {list(EVAL_SETS)} nor a text file")
    with open(name, encoding="utf-8") as f:
        return f.read()


def eval_windows(tokenizer, dataset="wikitext2", seq_len: int = 2048, eval_file=None,
                 max_windows: int | None = None) -> torch.Tensor:
    """The text tokenized once (with the tokenizer's own special tokens, as the papers do)
    and cut into non-overlapping windows -> LongTensor (windows, seq_len); the tail that does
    not fill a window is dropped."""
    from kvant.calib.data import encode

    text = eval_text(dataset, eval_file)
    ids = torch.tensor(encode(tokenizer, text, add_special_tokens=True), dtype=torch.long)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"eval text of {ids.numel()} tokens is shorter than one window of "
                         f"{seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def windows_nll(model, windows: torch.Tensor, batch_size: int = 1, device=None,
                show_progress: bool = True, desc: str = "perplexity") -> torch.Tensor:
    """Sum of next-token NLL of each window (W,) float64; logits taken in float32."""
    from kvant.model.lazy import check_materialized

    check_materialized(model)  # a lazily loaded model before quantization: a clear error
    device = torch.device(device) if device is not None else model_device(model)
    out = torch.zeros(len(windows), dtype=torch.float64)
    for start in tqdm(range(0, len(windows), batch_size), desc=desc,
                      disable=None if show_progress else True):  # None: only on a terminal
        batch = windows[start:start + batch_size].to(device)
        logits = lm_logits(model, batch)[:, :-1].float()  # (B, T-1, V)
        # log_softmax + gather: cross_entropy on the (B, V, T-1) layout loses ~4e-5 of the
        # NLL on CPU (measured against float64), the flat layout does not
        lp = torch.log_softmax(logits, -1)
        nll = -lp.gather(-1, batch[:, 1:, None]).squeeze(-1)  # (B, T-1)
        out[start:start + len(batch)] = nll.double().sum(1).cpu()
    return out


def perplexity(model, tokenizer, dataset="wikitext2", seq_len: int = 2048, eval_file=None,
               max_windows: int | None = None, batch_size: int = 1, device=None,
               show_progress: bool = True) -> dict:
    """Perplexity of a causal LM with the papers' protocol: exp of the mean next-token NLL
    over non-overlapping windows of ``seq_len`` (each window scores its last seq_len - 1).

    Returns ppl, nll (mean nats per scored token), tokens (scored), windows, seq_len, dataset.
    """
    from kvant.calib.data import check_seq_len

    check_seq_len(model, seq_len)
    windows = eval_windows(tokenizer, dataset, seq_len, eval_file, max_windows)
    if device is not None:
        model.to(device)
    nll = windows_nll(model, windows, batch_size, device, show_progress)
    tokens = windows.shape[0] * (seq_len - 1)
    mean = float(nll.sum()) / tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": tokens, "windows": windows.shape[0],
            "seq_len": seq_len, "dataset": str(dataset)}
