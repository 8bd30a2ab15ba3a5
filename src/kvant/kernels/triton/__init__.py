"""Triton GPU kernels for weight-only quantized matmuls (docs/KERNELS.md).

Importing this package imports no Triton: :mod:`.repack` (the load-time layout change and its
pure-torch inverse) runs anywhere. :mod:`.gemv`, :mod:`.gemm`, :mod:`.pairs` and
:mod:`.dispatch` import Triton; ``kernels/packed.py`` imports them only where
:func:`available` is true.
"""


def available() -> bool:
    """True when CUDA is usable and Triton imports, i.e. the GPU kernels can run."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
