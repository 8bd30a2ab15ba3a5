"""Triton GPU kernels for ``kvant::wq_linear`` (docs/KERNELS.md).

Importing this package imports no Triton: :mod:`.repack` (the load-time layout change and its
pure-torch inverse) runs anywhere. :mod:`.gemv`, :mod:`.gemm` and :mod:`.dispatch` import
Triton and are imported only where CUDA and Triton are present (see ``kernels/packed.py``).
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
