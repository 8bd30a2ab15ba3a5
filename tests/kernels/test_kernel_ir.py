"""scripts/kernel_ir.py: the main-loop load census of a compiled kernel's TTGIR."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "kernel_ir", Path(__file__).parents[2] / "scripts" / "kernel_ir.py")
kernel_ir = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_ir)

TTGIR = """
    %a = tt.load %p0 : tensor<64x!tt.ptr<f16>>
    %r:2 = scf.for %i = %lo to %hi step %c1 iter_args(%x = %a) -> (tensor<64xf32>) {
      %w = ttg.async_copy_global_to_local %p1, %buf mask %m : tensor<64x16x!tt.ptr<i32>>
      %z = tt.load %p2 : tensor<64x!tt.ptr<i8>>
      %inner = scf.if %c -> (i32) {
        %s = tt.load %p3 : tensor<64x!tt.ptr<f16>>
      }
      scf.yield %x : tensor<64xf32>
    }
    %after = tt.load %p4 : tensor<64x!tt.ptr<f32>>
"""


def _compile_pairs(**const):
    """The 4-bit pairs kernel compiled for sm_90 with these constexprs, or a skip."""
    pytest.importorskip("triton.backends.compiler")
    try:
        return kernel_ir.compile_kernel("pairs", const, warps=4, stages=3)
    except Exception as e:  # a Triton without the NVIDIA backend or its ptxas
        pytest.skip(f"cannot compile for sm_90 here: {e!r}"[:200])


def test_loop_loads_counts_only_the_first_loop_body():
    assert kernel_ir.loop_loads(TTGIR) == ["cp.async %w", "plain    %z", "plain    %s"]
    assert kernel_ir.loop_loads("%a = tt.load %p\n") == []
    assert kernel_ir.loop_mma(TTGIR) == {"dots": 0, "waits": 0, "full_waits": 0}


def test_pairs_kernel_pipelines_weights_group_words_and_x():
    compiled = _compile_pairs()
    ttgir = compiled.asm["ttgir"]
    loads = kernel_ir.loop_loads(ttgir)
    # the (BN, 16) weight words, the (BN,) int32 group words and the (128, BM) x tile all go
    # through cp.async: no plain (waited-for) load is left in the loop
    assert [ln.split()[0] for ln in loads] == ["cp.async"] * 3, loads
    # g128: a chunk's four planes are one K=128 dot, awaited once
    assert kernel_ir.loop_mma(ttgir) == {"dots": 1, "waits": 1, "full_waits": 1}
    # the group words reach both MMA layouts straight from shared memory: the loop holds no
    # layout conversion (each cost a shared-memory round trip and two barriers)
    assert "convert_layout" not in "\n".join(kernel_ir.main_loop(ttgir))


def test_pairs_kernel_small_groups_take_a_dot_a_plane():
    ttgir = _compile_pairs(GS=32).asm["ttgir"]
    kinds = [ln.split()[0] for ln in kernel_ir.loop_loads(ttgir)]
    assert kinds.count("plain") == 0 and kinds.count("cp.async") == 1 + 4 + 4
    assert kernel_ir.loop_mma(ttgir)["dots"] == 4


def test_default_pairs_config_compiles_without_spilling(tmp_path):
    # the configuration the heuristic launches at batch <= 16 (g128, BN 128, BM 16, row tile
    # 16, 4 stages): ptxas keeps it in registers
    pytest.importorskip("triton.backends.compiler")
    try:
        compiled = kernel_ir.compile_kernel("pairs", dict(GS=128, BN=128, BM=16, TH=16),
                                            warps=4, stages=4)
    except Exception as e:
        pytest.skip(f"cannot compile for sm_90 here: {e!r}"[:200])
    ptx = tmp_path / "pairs.ptx"
    ptx.write_text(compiled.asm["ptx"])
    report = kernel_ir.ptxas_report(ptx)
    assert "0 bytes spill stores" in report, report


def test_pairs_kernel_has_no_experiment_switch():
    # ONE_DOT became the g128 path and PREFETCH went with the group words: neither is a
    # switch of the kernel or the dispatcher
    import inspect

    pytest.importorskip("triton")
    from kvant.kernels.triton import dispatch, pairs

    params = inspect.signature(pairs.wq_dot_pairs_kernel.fn).parameters
    assert "ONE_DOT" not in params and "PREFETCH" not in params
    assert not hasattr(dispatch, "ONE_DOT") and "prefetch" not in dispatch.Config.__dataclass_fields__


def test_sass_is_written_and_holds_the_wgmma(tmp_path):
    compiled = _compile_pairs()
    text = kernel_ir.sass(compiled.asm["cubin"], tmp_path, "pairs").read_text()
    assert "HGMMA" in text and "0x" not in text.split("\n")[0]  # instructions, no addresses
