"""Recognising "the same input tensor again": layers that read one activation (q/k/v,
gate/up) share work done on it (QuIP's input rotation, a fused sibling product).

A key holds a weak reference to the tensor and its version counter, so it matches only that
very tensor, unmodified, and never keeps it alive or matches a new tensor that reuses its
memory.
"""

from __future__ import annotations

import weakref

import torch


def input_key(x: torch.Tensor) -> tuple:
    """The key of ``x`` as it is now."""
    return weakref.ref(x), x._version


def same_input(key: tuple | None, x: torch.Tensor) -> bool:
    """Whether ``key`` (from :func:`input_key`, or None) was taken of ``x`` unmodified."""
    return key is not None and key[0]() is x and key[1] == x._version
