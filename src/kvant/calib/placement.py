"""Where a model's tensors live while the engine calibrates: everything outside the blocks
goes to the compute device for the capture of block 0's inputs and comes back after."""

from __future__ import annotations

import torch
import torch.nn as nn


class on_device_except_blocks:
    """Context: move every parameter/buffer outside the blocks to ``device``, then back."""

    def __init__(self, model: nn.Module, blocks: nn.Module, device: torch.device):
        self.model, self.blocks, self.device = model, blocks, device
        self.moved: list[tuple[nn.Module, torch.device]] = []

    def _outside(self):
        inside = {id(m) for m in self.blocks.modules()}
        for m in self.model.modules():
            if id(m) in inside:
                continue
            tensors = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
            if tensors:
                yield m, tensors[0].device

    def __enter__(self):
        for m, dev in self._outside():
            if not _same_device(dev, self.device):
                self.moved.append((m, dev))
                m.to(self.device) if not list(m.children()) else _move_own(m, self.device)
        return self

    def __exit__(self, *exc):
        # last moved first: a tied weight (lm_head = embed_tokens) was seen a second time
        # already on the device, so its first owner's record must win and be applied last
        for m, dev in reversed(self.moved):
            m.to(dev) if not list(m.children()) else _move_own(m, dev)
        return False


def _same_device(a: torch.device, b: torch.device | str) -> bool:
    # "cuda" and "cuda:0" name one device; a tensor always reports its index
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    cur = torch.cuda.current_device()
    return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)


def _move_own(m: nn.Module, device: torch.device) -> None:
    # move only the module's own parameters and buffers, not its children
    for name, p in list(m._parameters.items()):
        if p is not None:
            p.data = p.data.to(device)
    for name, b in list(m._buffers.items()):
        if b is not None:
            m._buffers[name] = b.to(device)
