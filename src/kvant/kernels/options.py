"""The user's settings of the GPU kernels: one typed, frozen object, passed explicitly.

``kvant.prepare_for_inference(model, device, KernelOptions(...))`` (or a layer's
``prepare``) takes it; the layer keeps it and hands it to every kernel call. Nothing in
kvant reads these settings from the environment.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelOptions:
    """How packed layers compute on a CUDA device.

    gpu_kernels: use kvant's Triton kernels where they apply (CUDA, Triton importable, a grid
        they handle, fp16/bf16 activations). False keeps every layer on the pure-torch
        reference (dequantize, then matmul) on every device, e.g. to compare numerics.
    autotune: on the first call of each new (batch bucket, shape, grid, dtype), time every
        candidate launch configuration and keep the fastest (seconds per shape; never during
        CUDA-graph capture), instead of the measured heuristic (docs/KERNELS.md, Dispatch).
    stored_on_host: once a layer's kernel layout is built on a CUDA device, its stored
        tensors (the checkpoint layout: qweight, scales, qzeros, g_idx) go back to host
        memory, so the GPU holds each weight once, in the kernels' layout (serving a model that
        fills the GPU: a 70B W4 model needs ~35 GB on the device instead of ~70). Saving,
        ``dequantized_weight`` and the reference op then read the host copy; layers the
        kernels do not compute keep their tensors on the device.
    """

    gpu_kernels: bool = True
    autotune: bool = False
    stored_on_host: bool = False

    def __post_init__(self) -> None:
        for name in ("gpu_kernels", "autotune", "stored_on_host"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"KernelOptions.{name} must be True or False, got {value!r}")
