"""Triton GPU kernels for weight-only quantized matmuls (docs/KERNELS.md).

Importing this package imports no Triton: :mod:`.repack` (the load-time layout change and its
pure-torch inverse) and :mod:`.rules` (the launch configuration by shape and batch) run
anywhere. :mod:`.gemv`, :mod:`.gemm`, :mod:`.pairs` and
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


def kernel_module(name: str):
    """``kvant.kernels.triton.<name>`` where the GPU kernels can run (:func:`available`),
    else None; an import that fails there is logged once as a warning naming the module, so
    the op keeps its reference implementation instead of breaking ``import kvant``."""
    if not available():
        return None
    import importlib
    import logging

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as e:  # pragma: no cover - depends on the environment
        logging.getLogger(__name__).warning("Triton kernel module %s not registered: %s",
                                            name, e)
        return None
