"""CPU side of the GPU kernels: the repacked layout round-trips, the ops fall back to the
reference on the CPU, the repacked form is cached and rebuilt when a stored tensor changes,
and importing kvant never imports Triton without CUDA."""

import subprocess
import sys

import pytest
import torch

from kvant.algorithms.base import LayerResult
from kvant.config import QuantArgs
from kvant.core.grid import rtn
from kvant.formats.packing import pack
from kvant.kernels import ops, packed
from kvant.kernels.triton import repack as rp
from kvant.nn.qlinear import QuantLinear


def _stored(n, k, bits, gs, act_order=False, seed=0):
    """Random stored tensors (qweight, scales, qzeros, g_idx) of an (n, k) layer."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.int32)
    rows, groups = (1, 1) if gs == 0 else (n, k // gs if gs > 0 else 1)
    s = (torch.rand(rows, groups, generator=g) * 0.02 + 0.001).half()
    z = torch.randint(0, 2 ** bits, (rows, groups), generator=g, dtype=torch.int32)
    g_idx = None
    if act_order:
        g_idx = (torch.randperm(k, generator=g) // gs).to(torch.int32)
    return pack(q, bits), s, pack(z, bits), g_idx


@pytest.mark.parametrize("bits", [2, 3, 4, 8, "4-planes"])
@pytest.mark.parametrize("gs", [32, 64, 128, -1, 0])
def test_repack_round_trip(bits, gs, monkeypatch):
    if bits == "4-planes":
        monkeypatch.setenv("KVANT_W4_LAYOUT", "planes")
        bits = 4
    # K = 200 / 640 / 896 are not whole numbers of some chunks: padding is exercised too
    k = {128: 896, -1: 200, 0: 200}.get(gs, 640)
    qw, s, qz, g_idx = _stored(24, k, bits, gs)
    p = rp.repack(qw, s, qz, g_idx, bits, gs, k, rows_per_step=7)
    assert p.pairs == (bits == 4 and rp.use_pairs(4, gs))
    ck = rp.chunk_k(bits, p.pairs)
    assert p.qweight.shape == (-(-24 // p.tile) * p.tile, p.k_padded * bits // 32)
    assert p.k_padded % ck == 0 and p.k_padded - k < ck
    ref = ops.dequantize_weight(qw, s, qz, g_idx, bits, gs, k)
    assert torch.equal(rp.dequantize_packed(p), ref)


@pytest.mark.parametrize("tile", [1, 16, 64])
def test_pairs_tiles_hold_each_chunk_of_a_row_tile_contiguously(tile, monkeypatch):
    monkeypatch.setenv("KVANT_W4_TILE", str(tile))
    n, k = 40, 384  # 40 rows: the last tile is partial
    qw, s, qz, g_idx = _stored(n, k, 4, 128)
    p = rp.repack(qw, s, qz, g_idx, 4, 128, k)
    monkeypatch.setenv("KVANT_W4_TILE", "1")
    flat = rp.repack(qw, s, qz, g_idx, 4, 128, k).qweight  # (40, 48) row-major words
    assert p.tile == tile and p.qweight.shape == (-(-n // tile) * tile, 48)
    mem = p.qweight.reshape(-1)
    for row, chunk in [(0, 0), (17, 2), (39, 1), (n - 1, 2)]:
        start = (row // tile) * tile * 48 + chunk * tile * 16 + (row % tile) * 16
        assert torch.equal(mem[start:start + 16], flat[row, chunk * 16:(chunk + 1) * 16])
    assert torch.equal(rp.untile_rows(p.qweight, tile, n), flat)
    assert torch.equal(rp.dequantize_packed(p), ops.dequantize_weight(qw, s, qz, g_idx, 4, 128, k))


@pytest.mark.parametrize("bits,gs", [(4, 128), (3, 64), (2, 32), (8, 128)])
def test_act_order_becomes_a_permutation(bits, gs):
    k = 512
    qw, s, qz, g_idx = _stored(16, k, bits, gs, act_order=True, seed=3)
    p = rp.repack(qw, s, qz, g_idx, bits, gs, k)
    assert p.perm is not None and torch.equal(torch.sort(p.perm).values, torch.arange(k).int())
    # after the permutation every group is a run of gs consecutive columns
    assert torch.equal(g_idx[p.perm.long()].long(), torch.arange(k) // gs)
    ref = ops.dequantize_weight(qw, s, qz, g_idx, bits, gs, k)
    assert torch.equal(rp.dequantize_packed(p), ref)


def test_trivial_g_idx_needs_no_permutation():
    qw, s, qz, _ = _stored(8, 256, 4, 64)
    g_idx = (torch.arange(256) // 64).int()
    assert rp.repack(qw, s, qz, g_idx, 4, 64, 256).perm is None


def test_unsupported_grids_raise():
    qw, s, qz, _ = _stored(8, 256, 4, 16)
    with pytest.raises(NotImplementedError, match="group_size=16"):
        rp.repack(qw, s, qz, None, 4, 16, 256)
    qw, s, qz, _ = _stored(8, 512, 8, 256)
    with pytest.raises(NotImplementedError, match="group_size=256"):
        rp.repack(qw, s, qz, None, 8, 256, 512)
    # unequal act-order groups cannot be made contiguous runs of group_size
    qw, s, qz, _ = _stored(8, 256, 4, 64)
    g_idx = torch.zeros(256, dtype=torch.int32)
    g_idx[200:] = 3
    with pytest.raises(NotImplementedError, match="act-order"):
        rp.repack(qw, s, qz, g_idx, 4, 64, 256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_op_reference_equals_stored_op(dtype):
    qw, s, qz, g_idx = _stored(32, 384, 3, 128, act_order=True)
    p = rp.repack(qw, s, qz, g_idx, 3, 128, 384)
    x = torch.randn(2, 5, 384).to(dtype)
    y = torch.ops.kvant.wq_linear_packed(x, p.qweight, p.scales, p.zeros, p.perm, 3, 128, 384,
                                         p.pairs, p.tile)
    ref = ops.wq_linear(x, qw, s, qz, g_idx, 3, 128, 384)
    assert y.shape == (2, 5, 32) and y.dtype == dtype
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_packed_op_passes_opcheck():
    qw, s, qz, g_idx = _stored(16, 256, 4, 64, act_order=True)
    p = rp.repack(qw, s, qz, g_idx, 4, 64, 256)
    x = torch.randn(3, 256)
    torch.library.opcheck(torch.ops.kvant.wq_linear_packed.default,
                          (x, p.qweight, p.scales, p.zeros, p.perm, 4, 64, 256, p.pairs, p.tile),
                          test_utils=("test_schema", "test_faketensor"))


def _qlinear(n=48, k=256, bits=4, gs=64):
    torch.manual_seed(0)
    w = torch.randn(n, k)
    q, prm = rtn(w, QuantArgs(bits, gs))
    res = LayerResult(q, prm.scales, prm.zeros, bits, gs)
    return QuantLinear.from_result(res, torch.randn(n), dtype=torch.float32)


def test_cpu_forward_uses_the_reference():
    ql = _qlinear()
    x = torch.randn(4, 256)
    ref = x @ ql.dequantized_weight().float().t() + ql.bias
    torch.testing.assert_close(ql(x), ref, rtol=1e-5, atol=1e-5)
    assert getattr(ql, "_kvant_gpu", None) is None  # the CPU path never repacks


def test_repacked_cache_is_rebuilt_when_the_weight_changes():
    ql = _qlinear()
    packed._store(ql, packed.build(ql))
    first = packed._cached(ql)
    assert first is not None and packed._cached(ql) is first
    ql.qweight[0, 0] ^= 1  # in-place change bumps the version
    assert packed._cached(ql) is None
    packed._store(ql, packed.build(ql))
    x = torch.randn(2, 256)
    p = packed._cached(ql)
    y = torch.ops.kvant.wq_linear_packed(x, p.qweight, p.scales, p.zeros, p.perm, 4, 64, 256,
                                         p.pairs, p.tile)
    torch.testing.assert_close(y, x @ ql.dequantized_weight().float().t(), rtol=0, atol=0)


def test_unsupported_layer_is_marked():
    ql = _qlinear(gs=16)
    assert packed.build(ql) is packed._UNSUPPORTED
    # the repacked form is transient: never saved, never counted as storage
    packed._store(ql, packed.build(_qlinear()))
    assert all(not k.startswith("_kvant") for k in ql.state_dict())
    assert ql.storage_bytes() == sum(t.numel() * t.element_size()
                                     for n, t in ql.state_dict().items() if n != "bias")


def test_cpu_import_never_imports_triton():
    code = ("import sys, torch\n"
            "torch.cuda.is_available = lambda: False\n"
            "import kvant, kvant.nn.qlinear, kvant.kernels.ops\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
