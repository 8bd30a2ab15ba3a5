"""kvant.kernels: quantized-matmul operators on tensors (never on layers).

- :mod:`.ops`: ``kvant::wq_linear`` on the stored (checkpoint) layout, the pure-torch
  reference every device runs;
- :mod:`.packed`: ``kvant::wq_linear_packed`` on the kernels' repacked layout (reference
  default, Triton kernels on CUDA), built by :mod:`.triton.repack`;
- :class:`KernelOptions`: the user's settings of the GPU kernels.

This package imports nothing from ``kvant.nn`` (tests/test_kernels_dispatch.py checks it).
"""

from kvant.kernels.options import KernelOptions

__all__ = ["KernelOptions"]
