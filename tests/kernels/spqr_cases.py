"""SpQR layers with random but valid stored tensors, for the kernel tests (CPU interpreter and
GPU): codes, statistic integers, second-level (base, step) pairs, act-order permutation and
CSR outliers, as SpQRLinear stores them."""

import torch

from kvant.formats.packing import pack
from kvant.nn.spqr_linear import SpQRLinear, to_csr


def random_spqr(k: int, n: int, bits: int = 3, gs: int = 16, stat_bits: int = 3,
                act_order: bool = True, outliers: float = 0.01, seed: int = 0,
                stat_group_size: int = 16) -> SpQRLinear:
    """A SpQRLinear (K -> N) with random valid buffers; ``outliers``: fraction of weights."""
    g = torch.Generator().manual_seed(seed)
    groups = k // gs
    mask = torch.rand(n, k, generator=g) < outliers
    m = SpQRLinear(k, n, bits, gs, stat_bits=stat_bits, stat_group_size=stat_group_size,
                   nnz=int(mask.sum()), act_order=act_order)
    m.qweight.copy_(pack(torch.randint(0, 2 ** bits, (n, k), generator=g), bits))
    if stat_bits < 16:
        for name, lo, hi in (("scale", 0.002, 0.02), ("zero", 0.0, 2.0 ** bits - 1)):
            ints = torch.randint(0, 2 ** stat_bits, (n * groups,), generator=g)
            getattr(m, f"{name}_q").copy_(pack(ints[None], stat_bits)[0])
            base = torch.rand(n // stat_group_size, groups, generator=g) * (hi - lo) / 2 + lo
            step = torch.rand(n // stat_group_size, groups, generator=g) * (hi - lo) / 2 \
                / (2 ** stat_bits - 1)
            getattr(m, f"{name}_stats").copy_(torch.stack([base, step]).half())
    else:
        m.scales.copy_((torch.rand(n, groups, generator=g) * 0.02 + 0.002).half())
        m.qzeros.copy_(pack(torch.randint(0, 2 ** bits, (n, groups), generator=g), bits))
    if m.perm is not None:
        m.perm.copy_(torch.randperm(k, generator=g).to(m.perm.dtype))
    if m.nnz:
        vals = torch.randn(n, k, generator=g) * 0.1
        rowptr, cols, v = to_csr(mask, vals, m.outlier_cols.dtype)
        m.outlier_rowptr.copy_(rowptr)
        m.outlier_cols.copy_(cols)
        m.outlier_vals.copy_(v)
    return m
