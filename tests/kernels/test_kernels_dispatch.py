"""CPU side of the GPU kernels and of the runtime step: the repacked layout round-trips, the
ops agree with the reference, a layer's prepared layout is built once as non-persistent
buffers and rebuilt when a stored tensor changes, the CPU forward never repacks, the kernels
package imports nothing from kvant.nn and reads no environment, and importing kvant never
imports Triton without CUDA."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvant
from kvant.algorithms.base import LayerResult
from kvant.config import QuantArgs
from kvant.core.grid import rtn
from kvant.formats.packing import pack, unpack
from kvant.kernels import KernelOptions, ops, packed
from kvant.kernels.triton import repack as rp
from kvant.nn.qlinear import KERNEL_BUFFERS, QuantLinear, prepare_for_inference

SRC = Path(__file__).parents[2] / "src" / "kvant"


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


@pytest.mark.parametrize("bits,gs", [(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128, -1, 0)]
                         + [(4, 256)])
def test_repack_round_trip(bits, gs):
    # K = 200 / 640 / 896 are not whole numbers of some chunks: padding is exercised too;
    # 4 bits at group 256 keep the planes layout (the pairs chunk is 128 columns)
    k = {128: 896, -1: 200, 0: 200, 256: 768}.get(gs, 640)
    qw, s, qz, g_idx = _stored(24, k, bits, gs)
    p = rp.repack(qw, s, qz, g_idx, bits, gs, k, rows_per_step=7)
    assert p.pairs == (bits == 4 and gs != 256)
    ck = rp.chunk_k(bits, p.pairs)
    assert p.tile == (rp.PAIRS_TILE if p.pairs else 1)
    assert p.qweight.shape == (-(-24 // p.tile) * p.tile, p.k_padded * bits // 32)
    assert p.k_padded % ck == 0 and p.k_padded - k < ck
    ref = ops.dequantize_weight(qw, s, qz, g_idx, bits, gs, k)
    assert torch.equal(rp.dequantize_packed(p), ref)


@pytest.mark.parametrize("gs", [32, 128, -1, 0])
def test_pairs_group_words_hold_scale_and_zero_point(gs):
    # the pairs layout keeps a (group, row)'s scale and zero point in one int32 word (fp16
    # scale low, fp16 zero point high); scales and zeros are views into those words
    k = 256
    qw, s, qz, _ = _stored(40, k, 4, gs, seed=3)
    p = rp.repack(qw, s, qz, None, 4, gs, k)
    words = rp.group_words(p)
    g = p.scales.shape[0]
    assert words.data_ptr() == p.scales.data_ptr() and p.zeros.data_ptr() == words.data_ptr() + 2
    raw = torch.empty(0, dtype=torch.int32).set_(p.scales.untyped_storage(), 0, (g * 40,))
    assert torch.equal(raw, rp.pack_group_words(p.scales, p.zeros).reshape(-1))
    assert torch.equal(p.scales.float(), s.float().expand(40, g).t())
    assert torch.equal(p.zeros.float(), unpack(qz, 4, g).expand(40, g).t().float())
    c = p.clone()  # a clone keeps the views into one (new) copy of the words
    assert torch.equal(rp.group_words(c).float(), p.scales.float())
    assert c.scales.data_ptr() != p.scales.data_ptr() and torch.equal(c.zeros, p.zeros)
    # stored separately (not views into words), the kernels' reader refuses them
    bad = rp.PackedWeight(p.qweight, p.scales.contiguous(), p.zeros.contiguous(), None, 4,
                          p.group_size, k, 40, True, p.tile)
    with pytest.raises(ValueError, match="group words"):
        rp.group_words(bad)


@pytest.mark.parametrize("tile", [1, 16, 64])
def test_pairs_tiles_hold_each_chunk_of_a_row_tile_contiguously(tile):
    n, k = 40, 384  # 40 rows: the last tile is partial
    qw, s, qz, g_idx = _stored(n, k, 4, 128)
    p = rp.repack(qw, s, qz, g_idx, 4, 128, k, tile=tile)
    flat = rp.repack(qw, s, qz, g_idx, 4, 128, k, tile=1).qweight  # (40, 48) row-major words
    assert p.tile == tile and p.qweight.shape == (-(-n // tile) * tile, 48)
    mem = p.qweight.reshape(-1)
    for row, chunk in [(0, 0), (17, 2), (39, 1), (n - 1, 2)]:
        start = (row // tile) * tile * 48 + chunk * tile * 16 + (row % tile) * 16
        assert torch.equal(mem[start:start + 16], flat[row, chunk * 16:(chunk + 1) * 16])
    assert torch.equal(rp.untile_rows(p.qweight, tile, n), flat)
    assert torch.equal(rp.dequantize_packed(p), ops.dequantize_weight(qw, s, qz, g_idx, 4, 128, k))
    with pytest.raises(ValueError, match="tile"):
        rp.repack(qw, s, qz, g_idx, 4, 128, k, tile=0)


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
    y = packed.wq_linear_packed(x, p.qweight, p.scales, p.zeros, p.perm, 3, 128, 384,
                                p.pairs, p.tile)
    ref = ops.wq_linear(x, qw, s, qz, g_idx, 3, 128, 384)
    assert y.shape == (2, 5, 32) and y.dtype == dtype
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_packed_op_passes_opcheck():
    qw, s, qz, g_idx = _stored(16, 256, 4, 64, act_order=True)
    p = rp.repack(qw, s, qz, g_idx, 4, 64, 256)
    x = torch.randn(3, 256)
    torch.library.opcheck(torch.ops.kvant.wq_linear_packed.default,
                          (x, p.qweight, p.scales, p.zeros, p.perm, 4, 64, 256, p.pairs, p.tile,
                           True),
                          test_utils=("test_schema", "test_faketensor"))


def _qlinear(n=48, k=256, bits=4, gs=64, act_order=False):
    torch.manual_seed(0)
    w = torch.randn(n, k)
    q, prm = rtn(w, QuantArgs(bits, gs))
    g_idx = (torch.randperm(k) // gs).int() if act_order else None
    res = LayerResult(q, prm.scales, prm.zeros, bits, gs, g_idx=g_idx)
    return QuantLinear.from_result(res, torch.randn(n), dtype=torch.float32)


def test_cpu_forward_is_the_reference_and_never_repacks():
    ql = _qlinear()
    x = torch.randn(4, 256)
    ref = x @ ql.dequantized_weight().float().t() + ql.bias
    assert ql.prepare() is False and prepare_for_inference(ql, "cpu") == 0
    torch.testing.assert_close(ql(x), ref, rtol=1e-5, atol=1e-5)
    assert ql.kernel_layout is None and all(getattr(ql, n) is None for n in KERNEL_BUFFERS)


@pytest.mark.parametrize("act_order", [False, True])
def test_prepared_layout_gives_the_reference_output(act_order):
    """The dispatch to the repacked-layout op (its CPU implementation is the reference of
    that layout) returns bit for bit what the stored-layout reference returns."""
    ql = _qlinear(act_order=act_order)
    x = torch.randn(3, 256)
    ref = ql(x)
    assert ql._build_layout() is True  # what prepare() does on a CUDA device
    assert ql.kernel_layout.pairs and ql.kernel_qweight.dtype == torch.int32
    assert (ql.kernel_perm is not None) == act_order
    torch.testing.assert_close(ql(x), ref, rtol=0, atol=0)


def test_layout_is_non_persistent_and_not_counted_as_storage():
    ql = _qlinear()
    before, size = ql.state_dict(), ql.storage_bytes()
    ql._build_layout()
    after = ql.state_dict()
    assert list(after) == list(before) and not any(k.startswith("kernel") for k in after)
    assert ql.storage_bytes() == size == sum(t.numel() * t.element_size()
                                             for n, t in after.items() if n != "bias")
    assert {n for n, _ in ql.named_buffers()} >= set(KERNEL_BUFFERS) - {"kernel_perm"}


def test_layout_is_rebuilt_when_a_stored_tensor_changes():
    ql = _qlinear()
    ql._build_layout()
    first = ql.kernel_layout
    x = torch.randn(2, 256)
    ql(x)
    assert ql.kernel_layout is first  # built once
    ql.qweight[0, 0] ^= 1  # in-place change bumps the version
    y = ql(x)
    assert ql.kernel_layout is not first  # rebuilt by the forward that saw the change
    torch.testing.assert_close(y, x @ ql.dequantized_weight().float().t() + ql.bias,
                               rtol=1e-5, atol=1e-5)


def test_moving_to_the_cpu_drops_the_layout():
    ql = _qlinear()
    ql._build_layout()
    ql.to("cpu")  # .to() re-prepares for the (CPU) device: no kernels there
    assert ql.kernel_layout is None and ql.kernel_qweight is None


def test_unsupported_layer_keeps_the_reference():
    ql = _qlinear(gs=16)
    assert ql._build_layout() is False and ql.kernel_layout is None


def test_kernel_options_are_typed_and_kept():
    with pytest.raises(TypeError, match="autotune"):
        KernelOptions(autotune="yes")
    with pytest.raises(Exception):
        KernelOptions().autotune = True  # frozen
    ql = _qlinear()
    with pytest.raises(TypeError, match="KernelOptions"):
        ql.prepare(options={"autotune": True})
    opts = KernelOptions(autotune=True)
    ql.prepare(options=opts)
    assert ql.kernel_options is opts
    ql.to("cpu")
    assert ql.kernel_options is opts


def test_every_layer_kind_dispatches_through_one_point():
    from kvant.nn.quip_linear import QuipLinear
    from kvant.nn.spqr_linear import SpQRLinear

    assert QuipLinear.forward is not QuantLinear.forward
    assert SpQRLinear.forward is QuantLinear.forward  # the dense + outlier product differs
    quip = QuipLinear(256, 64, 4, 64)
    torch.manual_seed(1)
    quip.qweight.random_(-2 ** 31, 2 ** 31 - 1)
    quip.scales.uniform_(0.001, 0.02)
    quip.sign_in.random_(0, 256)
    x = torch.randn(2, 256)
    ref = quip(x)
    assert quip._build_layout() is True
    torch.testing.assert_close(quip(x), ref, rtol=0, atol=0)
    spqr = SpQRLinear(256, 64, 4, 64)
    assert spqr._build_layout() is False  # no GPU kernel: its own reference product


def test_load_quantized_prepares_with_the_given_options(tmp_path, tiny_gpt):
    model, tok = tiny_gpt
    kvant.quantize(model, kvant.RTNConfig(bits=4, group_size=32),
                   options=kvant.EngineOptions(device="cpu", show_progress=False))
    kvant.save_quantized(model, tmp_path / "q", tokenizer=tok)
    opts = KernelOptions(autotune=True)
    loaded, _ = kvant.load_quantized(tmp_path / "q", kernel_options=opts)
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.kernel_options is opts and m.kernel_layout is None
                          for m in layers)


def _kvant_imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return [m for m in out if m == "kvant" or m.startswith("kvant.")]


def test_kernels_package_is_tensor_only():
    """kvant/kernels imports nothing from kvant/nn (nor any other part of kvant but the
    packing format): layers depend on kernels, never the reverse."""
    files = sorted((SRC / "kernels").rglob("*.py"))
    assert len(files) >= 9
    for f in files:
        for mod in _kvant_imports(f):
            assert mod.startswith(("kvant.kernels", "kvant.formats.packing")), (f, mod)


def test_no_environment_switches_in_the_runtime():
    """The kernels and layers read no environment variable (settings: KernelOptions)."""
    for folder in ("kernels", "nn"):
        for f in (SRC / folder).rglob("*.py"):
            assert not re.search(r"\benviron\b|getenv", f.read_text()), f


def test_cpu_import_never_imports_triton():
    code = ("import sys, torch\n"
            "torch.cuda.is_available = lambda: False\n"
            "import kvant, kvant.nn.qlinear, kvant.kernels.packed\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
