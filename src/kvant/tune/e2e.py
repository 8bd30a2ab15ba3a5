"""End-to-end fine-tuning after rounding: a quantized model learns the float model's
next-token distributions on the calibration tokens.

The loss is ``KL(P || Q)`` per position (P: the float model, Q: the quantized one), averaged
over every position of a batch of calibration windows; Adam moves only the quantized model's
continuous tensors (kvant.tune.params: scales, norms, biases), never its integer codes, for
a fixed token budget (``TuneConfig.tokens``). The float model runs alongside, without
gradients, on whichever device it lives. Calibration tokens only: nothing here reads
evaluation text. If the tuned model's calibration KL is not lower than before, the values
from before are put back.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from kvant.eval.perplexity import lm_logits, model_device
from kvant.tune.config import TuneConfig
from kvant.tune.params import TunableSet


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    # (B, T, V) logits of P and Q -> (B, T) KL(P || Q), float32
    lp = torch.log_softmax(p_logits.float(), -1)
    lq = torch.log_softmax(q_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


@torch.no_grad()
def calibration_kl(qmodel: nn.Module, float_model: nn.Module, calib: torch.Tensor,
                   batch_size: int = 8) -> float:
    """Mean KL(float || quantized) of the next-token distributions over every position of
    ``calib`` (token ids (n, T))."""
    total, count = 0.0, 0
    for batch in torch.split(calib, batch_size):
        p = lm_logits(float_model, batch.to(model_device(float_model)))
        q = lm_logits(qmodel, batch.to(model_device(qmodel)))
        kl = _kl(p.to(q.device), q)
        total += float(kl.double().sum())
        count += kl.numel()
    return total / max(count, 1)


def _split(calib: torch.Tensor, holdout: float, gen: torch.Generator):
    """(training windows, held-out windows or None): ``holdout`` of the windows, at least
    one, chosen at random by ``gen``; at least one window is always trained on."""
    if holdout <= 0 or len(calib) < 2:
        return calib, None
    perm = torch.randperm(len(calib), generator=gen)
    n = min(max(1, round(holdout * len(calib))), len(calib) - 1)
    return calib[perm[n:]], calib[perm[:n]]


def finetune(qmodel: nn.Module, float_model: nn.Module, calib: torch.Tensor,
             config: TuneConfig | None = None, *, show_progress: bool = False) -> dict:
    """Tune the quantized ``qmodel`` in place toward ``float_model``'s next-token
    distributions on ``calib`` (token ids (n_samples, seq_len)): Adam on KL(P || Q) for
    ceil(tokens / (batch_size * seq_len)) steps, over the calibration windows in a seeded
    order. Only scales, norms and biases move (``config.params``); packed codes never.

    ``config.holdout`` > 0: that fraction of the windows (chosen by ``config.seed``) is
    not trained on; its KL is measured at a quarter, half, three quarters and the end of the
    steps, and the values at the best of these points are kept (early stopping against
    overfitting a small calibration set), or the old ones if none is better.

    Returns a report: ``kl_before``, ``kl_after`` (KL on all calibration windows),
    ``holdout_kl_before`` / ``holdout_kl_after`` / ``best_step`` (with a holdout), ``steps``,
    ``tokens``, ``values`` (scalars moved per kind), ``reverted``, ``seconds``.
    """
    config = config or TuneConfig()
    if not isinstance(config, TuneConfig):
        raise TypeError(f"config must be a kvant.TuneConfig, got {type(config).__name__}")
    if not torch.is_tensor(calib) or calib.dim() != 2 or calib.shape[0] == 0 \
            or calib.shape[1] < 1 or calib.is_floating_point():
        raise ValueError("calib must be token ids (n_samples, seq_len), got "
                         f"{getattr(calib, 'shape', type(calib).__name__)}")
    if qmodel is float_model:
        raise ValueError("finetune needs the float model as a separate module (the "
                         "quantized one was changed in place): keep a copy before quantizing")
    t0 = time.perf_counter()
    tunables = TunableSet.collect(qmodel, config.params)
    bs = min(config.batch_size, calib.shape[0])
    steps = math.ceil(config.tokens / (bs * calib.shape[1]))
    report = {"steps": 0, "tokens": 0, "values": tunables.counts(), "reverted": False}
    if tunables.skipped:
        report["skipped"] = tunables.skipped
    modes = (qmodel.training, float_model.training)
    qmodel.eval()
    float_model.eval()
    try:
        before = calibration_kl(qmodel, float_model, calib, bs)
        report.update(kl_before=before, kl_after=before)
        if not tunables.entries:
            return {**report, "seconds": time.perf_counter() - t0}
        gen = torch.Generator().manual_seed(config.seed)
        train, held = _split(calib, config.holdout, gen)
        judge = calib if held is None else held  # the KL that decides what is kept
        held_before = before if held is None else calibration_kl(qmodel, float_model, held, bs)
        checks = {math.ceil(steps * k / 4) for k in (1, 2, 3, 4)} if held is not None else ()
        best = (held_before, None, 0)  # (holdout KL, masters, step); None: the old values
        opt = torch.optim.Adam(tunables.parameters(), lr=config.lr)
        order = torch.empty(0, dtype=torch.long)
        qdev, fdev = model_device(qmodel), model_device(float_model)
        with torch.enable_grad(), tunables.applied(qmodel) as feed:
            for step in tqdm(range(1, steps + 1), desc="fine-tuning end to end",
                             disable=None if show_progress else True):
                if len(order) < bs:  # a new pass over the windows, in a fresh order
                    order = torch.cat([order, torch.randperm(len(train), generator=gen)])
                idx, order = order[:bs], order[bs:]
                batch = train[idx]
                with torch.no_grad():
                    p = lm_logits(float_model, batch.to(fdev)).to(qdev)
                feed.refresh()
                loss = _kl(p, lm_logits(qmodel, batch.to(qdev))).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step in checks:
                    with torch.no_grad():
                        feed.refresh()
                        h = calibration_kl(qmodel, float_model, held, bs)
                    if h < best[0]:
                        best = (h, [t.detach().clone() for t in tunables.parameters()], step)
        if held is not None and best[1] is not None:
            with torch.no_grad():
                for t, v in zip(tunables.parameters(), best[1]):
                    t.copy_(v)
        tunables.write_back()
        judged = calibration_kl(qmodel, float_model, judge, bs)
        if (held is not None and best[1] is None) or not judged < held_before:
            tunables.revert()
            judged, report["reverted"] = held_before, True
        after = calibration_kl(qmodel, float_model, calib, bs) if held is not None else judged
        if report["reverted"]:
            after = before
        report.update(kl_after=after, steps=steps, tokens=steps * bs * calib.shape[1])
        if held is not None:
            report.update(holdout_kl_before=held_before, holdout_kl_after=judged,
                          holdout_windows=len(held), best_step=best[2])
    finally:
        qmodel.train(modes[0])
        float_model.train(modes[1])
    report["seconds"] = time.perf_counter() - t0
    if not report["reverted"] and report["steps"]:  # the checkpoint says it was tuned
        stages = list(getattr(qmodel, "kvant_finetune", []))
        qmodel.kvant_finetune = stages + [{
            "stage": "e2e", "config": config.to_dict(), "tokens": report["tokens"],
            "calib_kl_before": report["kl_before"], "calib_kl_after": report["kl_after"]}]
    return report
