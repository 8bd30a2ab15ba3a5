"""KL divergence of a quantized model's next-token distribution from the original's.

``KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))`` per scored position (P: the original model,
Q: the quantized one), averaged over every scored position of the evaluation windows (the
same non-overlapping windows as the perplexity, each scoring its last seq_len - 1 tokens).

The original model runs once per benchmark run: :class:`FloatReference` computes its
per-window NLL (so its perplexity) and keeps its log-probabilities, then scores any number of
quantized models against them without running the original again.

How the original's log-probabilities are kept (``store``):
- ``"full"``: every log-probability, (windows, seq_len - 1, vocab) in ``store_dtype``
  (float16 by default). KL is then exact up to float16 rounding of log P: the rounding
  error is at most 2**-11 relative, zero-mean, and largest for the rare tokens whose weight
  P(v) is tiny, so the mean KL moves by far less than 1e-3. SmolLM2-135M on the full
  WikiText-2 test set (149 windows of 2048 tokens) needs 149 x 2047 x 49152 x 2 bytes =
  30 GB: it is kept on the GPU when half of the free GPU memory holds it, else in CPU memory
  (``max_cpu_bytes``).
- ``"topk"``: the ``topk`` largest log-probabilities per position and their token ids; KL
  is computed over the coarser partition {top-k tokens, all other tokens}. By the data
  processing inequality this is a lower bound of the exact KL; the gap is the tail's own
  divergence weighted by the tail mass, small when k covers nearly all of P's mass.
- ``"host"``: as "full", always in CPU memory (for several jobs sharing one GPU, which
  would each find it free at the start and fill it; each window's rows are copied to the
  compute device when a quantized model is compared).
- ``"auto"``: "full" when it fits as said above, else "topk".
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

STORES = ("auto", "full", "host", "topk")  # FloatReference(store=...): module docstring

from kvant.eval.perplexity import model_device, lm_logits

DEFAULT_MAX_CPU_BYTES = 48 * 1024 ** 3
TAIL_EPS = 1e-6


class FloatReference:
    """The original model's outputs on fixed windows, computed once and reused.

    windows: LongTensor (W, T) of token ids (e.g. :func:`kvant.eval.perplexity.eval_windows`).
    """

    @torch.no_grad()
    def __init__(self, model, windows: torch.Tensor, batch_size: int = 1, device=None,
                 store: str = "auto", topk: int = 128, store_dtype: torch.dtype = torch.float16,
                 max_cpu_bytes: int = DEFAULT_MAX_CPU_BYTES, show_progress: bool = True):
        if store not in STORES:
            raise ValueError(f"store must be one of {', '.join(STORES)}, got {store!r}")
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise ValueError(f"windows must be (n_windows, seq_len >= 2), "
                             f"got {tuple(windows.shape)}")
        self.windows = windows
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else model_device(model)
        self.store_dtype = store_dtype
        self.topk = topk
        n_w, t = windows.shape
        self.tokens = n_w * (t - 1)
        self.nll_sum = torch.zeros(n_w, dtype=torch.float64)
        self._full: list[torch.Tensor] = []
        self._top: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.store = store
        self.store_device: torch.device | None = None
        for start in tqdm(range(0, n_w, batch_size), desc="float reference",
                          disable=not show_progress):
            batch = windows[start:start + batch_size].to(self.device)
            lp = torch.log_softmax(lm_logits(model, batch)[:, :-1].float(), -1)  # (B, T-1, V)
            if self.store_device is None:
                self._choose_store(lp.shape[-1], max_cpu_bytes)
            nll = -lp.gather(-1, batch[:, 1:, None]).squeeze(-1)  # (B, T-1)
            self.nll_sum[start:start + len(batch)] = nll.double().sum(1).cpu()
            for row in lp:
                if self.store == "full":
                    self._full.append(row.to(self.store_device, self.store_dtype))
                else:
                    v, i = row.topk(min(topk, row.shape[-1]), dim=-1)
                    self._top.append((v.to(self.store_device),
                                      i.to(self.store_device, torch.int32)))

    def _full_device(self, vocab: int, max_cpu_bytes: int) -> torch.device | None:
        """Where all log-probs fit: this GPU (half its free memory) or the CPU, else None."""
        n_w, t = self.windows.shape
        need = n_w * (t - 1) * vocab * torch.finfo(self.store_dtype).bits // 8
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if need <= free // 2:
                return self.device
        return torch.device("cpu") if need <= max_cpu_bytes else None

    def _choose_store(self, vocab: int, max_cpu_bytes: int) -> None:
        if self.store == "host":
            self.store, self.store_device = "full", torch.device("cpu")
            return
        dev = self._full_device(vocab, max_cpu_bytes)
        if self.store == "auto":
            self.store = "full" if dev is not None else "topk"
        if self.store == "full":  # forced "full" that fits nowhere goes to the CPU anyway
            self.store_device = dev or torch.device("cpu")
        else:
            self.store_device = self.device if self.device.type == "cuda" else torch.device("cpu")

    @property
    def nll(self) -> float:
        """Mean next-token NLL (nats) of the original model."""
        return float(self.nll_sum.sum()) / self.tokens

    @property
    def ppl(self) -> float:
        """Perplexity of the original model on the windows."""
        return math.exp(self.nll)

    def _kl_rows(self, lq: torch.Tensor, idx: int) -> torch.Tensor:
        """KL per position (T-1,) of window ``idx`` against the quantized log-probs ``lq``."""
        if self.store == "full":
            lp = self._full[idx].to(lq.device, torch.float32)
            return (lp.exp() * (lp - lq)).sum(-1)
        v, i = self._top[idx]
        v, i = v.to(lq.device), i.to(lq.device).long()
        p, lq_top = v.exp(), lq.gather(-1, i)
        head = (p * (v - lq_top)).sum(-1)
        # tail masses below float32 rounding of a sum of probabilities are noise, not mass
        p_tail = 1 - p.double().sum(-1)
        q_tail = (1 - lq_top.exp().double().sum(-1)).clamp_min(1e-12)
        tail = torch.where(p_tail > TAIL_EPS,
                           p_tail * (p_tail.clamp_min(1e-12).log() - q_tail.log()),
                           torch.zeros_like(p_tail)).float()
        return head + tail

    @torch.no_grad()
    def compare(self, model, show_progress: bool = True) -> dict:
        """Perplexity of ``model`` and its mean KL from the original on the same windows.

        Returns ppl, nll, kl (mean over scored positions), kl_store ("full"/"topk"), tokens,
        windows.
        """
        device = model_device(model)
        n_w = len(self.windows)
        nll_sum, kl_sum = 0.0, 0.0
        for start in tqdm(range(0, n_w, self.batch_size), desc="compare",
                          disable=not show_progress):
            batch = self.windows[start:start + self.batch_size].to(device)
            lq = torch.log_softmax(lm_logits(model, batch)[:, :-1].float(), -1)  # (B, T-1, V)
            nll_sum += float(-lq.gather(-1, batch[:, 1:, None]).double().sum())
            for j, row in enumerate(lq):
                kl_sum += float(self._kl_rows(row, start + j).double().sum())
        nll = nll_sum / self.tokens
        return {"ppl": math.exp(nll), "nll": nll, "kl": kl_sum / self.tokens,
                "kl_store": self.store, "tokens": self.tokens, "windows": n_w}


def kl_divergence(original, quantized, windows: torch.Tensor, batch_size: int = 1,
                  store: str = "auto", show_progress: bool = False) -> float:
    """Mean KL(original || quantized) of next-token distributions on ``windows`` (W, T)."""
    ref = FloatReference(original, windows, batch_size, store=store,
                         store_dtype=torch.float32, show_progress=show_progress)
    return ref.compare(quantized, show_progress=show_progress)["kl"]
