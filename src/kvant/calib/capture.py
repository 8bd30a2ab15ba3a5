"""Capture the inputs of the first decoder block, and run a block on captured inputs.

A forward pre-hook on block 0 records its positional and keyword arguments (hidden states,
attention mask, rotary embeddings, cache position, ...) and stops the forward. Later blocks
are called directly with the same arguments, the hidden states replaced. Nothing is traced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


class _Stop(Exception):
    pass


@dataclass
class BlockInput:
    """Arguments of one block call: ``args[hidden_pos]`` or ``kwargs['hidden_states']``."""

    args: tuple
    kwargs: dict

    @property
    def hidden(self) -> torch.Tensor:
        """The hidden states (B, T, C) this call carries."""
        if self.args and torch.is_tensor(self.args[0]):
            return self.args[0]
        return self.kwargs["hidden_states"]

    def with_hidden(self, h: torch.Tensor) -> "BlockInput":
        """A copy whose hidden states are ``h``."""
        if self.args and torch.is_tensor(self.args[0]):
            return BlockInput((h, *self.args[1:]), self.kwargs)
        return BlockInput(self.args, {**self.kwargs, "hidden_states": h})


def _strip_cache(kwargs: dict) -> dict:
    # A cache object carried from one sample to the next makes attention read the other
    # samples' keys: calibrate without any cache.
    out = dict(kwargs)
    for key in ("past_key_value", "past_key_values", "layer_past", "cache"):
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def model_forward(model: nn.Module, batch: torch.Tensor):
    """Call a causal LM on token ids (B, T): HF models without cache, others positionally."""
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        return model(input_ids=batch, use_cache=False)
    return model(batch)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches, device,
                         show_progress: bool = False) -> list:
    """Run the model on each batch until block 0 and return one :class:`BlockInput` each.
    ``show_progress``: a tqdm bar on stderr when it is a terminal."""
    from tqdm.auto import tqdm

    captured: list[BlockInput] = []

    def hook(_mod, args, kwargs):
        captured.append(BlockInput(tuple(args), _strip_cache(kwargs)))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in tqdm(batches, desc="capturing calibration inputs", leave=False,
                          disable=None if show_progress else True):
            try:
                model_forward(model, batch.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def block_output(out) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: list) -> list:
    """Outputs (hidden states) of ``block`` on every captured input."""
    return [block_output(block(*inp.args, **inp.kwargs)) for inp in inputs]
