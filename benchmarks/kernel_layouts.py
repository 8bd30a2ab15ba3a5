"""Retired: the A/B sweeps of the 4-bit pairs kernel's experiment switches (issue 16).

This script timed the kernel under process-wide switches that no longer exist: the row-tile
height (``KVANT_W4_TILE``: 1, 16, 64), a wider tuning space (``WIDE_SEARCH``: 4-5 pipeline
stages, 16 K splits), the group-parameter prefetch (``KVANT_W4_PREFETCH``) and the
one-dot-per-chunk variant (``KVANT_W4_ONE_DOT``). What measured best is now the code
(row tile 16, 3 stages, at most 8 splits, prefetch per launch configuration at BM 16; the
one-dot variant was deleted unmeasured); docs/KERNELS.md's experiment log keeps the history
and benchmarks/results/archive/kernel_layouts.md and kernel_prefetch*.md the numbers. The
script as it ran: ``git show 583ba6f:benchmarks/kernel_layouts.py``. To time the kernels today, use
benchmarks/kernel_table.py. (The prefetch itself is gone since the group words are pipelined:
benchmarks/results/gemv_70b.md.)
"""

import sys

if __name__ == "__main__":
    sys.exit("kernel_layouts.py is retired: the switches it compared were removed (issue 16); "
             "see its docstring, docs/KERNELS.md and benchmarks/kernel_table.py")
