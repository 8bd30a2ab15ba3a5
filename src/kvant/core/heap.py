"""Host memory that a long streamed run gives back (glibc only; no-ops elsewhere).

Streaming reads a block, quantizes it, writes it and frees it, eighty times for a 70B model.
glibc keeps freed memory in its heap unless told otherwise, and the process would grow with
depth: :func:`tensors_from_mmap` serves large tensors from their own mappings while a run
lasts, and :func:`trim` hands the heap's free pages back after each freed block.
"""

from __future__ import annotations

import contextlib
import ctypes

# glibc: mallopt's M_MMAP_THRESHOLD; 128 KiB is its starting value, 32 MiB the most its
# dynamic threshold grows to on 64-bit systems
_M_MMAP_THRESHOLD, _START, _DYNAMIC_MAX = -3, 128 * 1024, 32 * 1024 * 1024


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def tensors_from_mmap():
    """Serve every allocation above 128 KiB with its own mmap while the block runs, so a freed
    block's tensors go back to the system at once. glibc otherwise raises its threshold
    after the first large free and serves later tensors from the heap, whose fragments make
    the peak grow with depth (cpu-2core, 2048-wide Llama, RTN: peak 1.38 GiB at 8 blocks,
    1.66-1.77 at 16; with this, 1.203 at 4 and 1.205 at 12). Afterwards the threshold is
    set to the most glibc's own dynamic threshold reaches (setting it at all ends glibc's
    adjustment for the process; there is no way to read it back)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _START)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_MAX)


def trim() -> None:
    """Give the heap's free pages back to the system (after a block is freed; without it the
    resident floor of a streamed run rose ~20-30 MB a block in one of two runs, cpu-2core)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
