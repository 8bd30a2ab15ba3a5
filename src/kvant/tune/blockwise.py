"""Block-wise fine-tuning after rounding: match a quantized block to its float outputs.

Once every layer of a block is packed, the engine (kvant.calib.engine, with
``EngineOptions(finetune=TuneConfig(...))``) hands this module the block, its calibration
inputs and the float block's outputs on those same inputs. Adam then moves the block's
continuous tensors (kvant.tune.params: scales, norms, biases; never the integer codes) for
``TuneConfig.steps`` steps to lower the mean squared error of the block's output, one
calibration batch a step. If the tuned block does not end with a lower error on the whole
calibration set than it started with, the values from before are put back: tuning never
makes a block worse on the data it sees.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from kvant.calib.capture import BlockInput, block_output
from kvant.tune.config import TuneConfig
from kvant.tune.params import TunableSet


@torch.no_grad()
def block_mse(block: nn.Module, inputs: list[BlockInput], targets: list[torch.Tensor]) -> float:
    """Mean squared error of ``block``'s outputs against ``targets`` over all inputs (the
    block's own forward, as inference runs it)."""
    total, count = 0.0, 0
    for inp, ref in zip(inputs, targets, strict=True):
        out = block_output(block(*inp.args, **inp.kwargs))
        total += float((out.float() - ref.float()).pow(2).sum())
        count += ref.numel()
    return total / max(count, 1)


def tune_block(block: nn.Module, inputs: list[BlockInput], targets: list[torch.Tensor],
               config: TuneConfig) -> dict:
    """Tune ``block`` in place so that its outputs on ``inputs`` approach ``targets`` (one
    (B, T, C) tensor per input: the float block's outputs). Returns a report:
    ``mse_before``, ``mse_after``, ``steps``, ``values`` (scalars moved per kind),
    ``reverted`` (True when tuning did not help and the old values were kept), ``seconds``.
    """
    if not isinstance(config, TuneConfig):
        raise TypeError(f"config must be a kvant.TuneConfig, got {type(config).__name__}")
    if len(inputs) != len(targets) or not inputs:
        raise ValueError("block tuning needs one float target per calibration input, and at "
                         f"least one input; got {len(inputs)} inputs, {len(targets)} targets")
    t0 = time.perf_counter()
    tunables = TunableSet.collect(block, config.params)
    before = block_mse(block, inputs, targets)
    report = {"mse_before": before, "mse_after": before, "steps": 0,
              "values": tunables.counts(), "reverted": False}
    if tunables.skipped:
        report["skipped"] = tunables.skipped
    if not tunables.entries or before == 0.0:
        return {**report, "seconds": time.perf_counter() - t0}
    opt = torch.optim.Adam(tunables.parameters(), lr=config.lr)
    training = block.training
    block.eval()  # no dropout: the targets were computed without it
    try:
        with torch.enable_grad(), tunables.applied(block) as feed:
            for step in range(config.steps):
                inp, ref = inputs[step % len(inputs)], targets[step % len(targets)]
                feed.refresh()
                out = block_output(block(*inp.args, **inp.kwargs))
                loss = (out.float() - ref.float()).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        tunables.write_back()
        after = block_mse(block, inputs, targets)
        if not after < before:  # worse, equal or NaN: keep what the rounding gave
            tunables.revert()
            after, report["reverted"] = before, True
    finally:
        block.train(training)
    report.update(mse_after=after, steps=config.steps, seconds=time.perf_counter() - t0)
    return report


class BlockTuning:
    """The quantization engine's side of block-wise tuning (kvant.calib.engine).

    With ``target="float"`` it carries the float model's hidden states beside the engine's
    (quantized) inputs: :meth:`advance` runs each block on them before it is rounded, and the
    result is what :meth:`tune` fits the packed block's outputs to. With ``"local"`` the
    target is the float block's outputs on the engine's own inputs (``float_out``, which the
    engine then computes: :attr:`local`)."""

    def __init__(self, config: TuneConfig, inputs: list[BlockInput], resumed: bool = False):
        from kvant.errors import InputError

        self.config = config
        self.local = config.target == "local"
        if resumed and not self.local:
            raise InputError("a streaming run with block-wise tuning toward the float model "
                             "(TuneConfig target='float') cannot resume: the float hidden "
                             "states are not saved; start over, or tune with target='local'")
        self.ref = None if self.local else [inp.hidden for inp in inputs]

    @staticmethod
    def check(config: TuneConfig, calib, distributed: bool) -> None:
        """Refuse, before any work, what block-wise tuning cannot do."""
        from kvant.errors import InputError

        if not isinstance(config, TuneConfig):
            raise TypeError(f"finetune must be a kvant.TuneConfig, got {type(config).__name__}")
        if calib is None or len(calib) == 0:
            raise ValueError("block-wise fine-tuning (EngineOptions.finetune) needs "
                             "calibration data; none was given")
        if distributed:
            raise InputError("block-wise fine-tuning runs in one process only: each rank "
                             "would tune the block on its own calibration shard")

    @torch.no_grad()
    def advance(self, block: nn.Module, inputs: list[BlockInput]) -> None:
        """Before ``block`` is rounded: the float model's states move through it."""
        if self.ref is not None:
            calls = [inp.with_hidden(h) for inp, h in zip(inputs, self.ref)]
            self.ref = [block_output(block(*c.args, **c.kwargs)) for c in calls]

    def tune(self, block: nn.Module, inputs: list[BlockInput],
             float_out: list[torch.Tensor] | None) -> dict:
        """Tune the packed ``block`` (:func:`tune_block`); ``float_out``: the float block's
        outputs on ``inputs``, the target when :attr:`local`."""
        targets = float_out if self.local else self.ref
        return {"target": self.config.target, **tune_block(block, inputs, targets, self.config)}
