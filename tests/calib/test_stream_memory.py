"""Host memory of streaming quantization is flat in depth (issue 13).

A fresh process streams RTN W4 g128 over an 8-block, 2048-wide synthetic Llama (weights
generated per tensor, so no input files) and records its resident set size after each
block is written. Tolerance: the lowest RSS of the last four blocks may exceed the lowest of
the first four by at most 8 MB per block. One block's packed output is ~22 MB at this width
(int4 words plus bf16 scales and zeros), so a writer that kept the finished blocks (the
~65 MB/block growth of the old lazy path) raises that floor by ~3x the tolerance or more.
The floor, not a single sample or the peak: the writer thread samples while the main thread
is already quantizing the next block, whose float weights and temporaries add 0-250 MB
depending on timing (seen on cpu-2core: 383-627 MB samples in one flat run).
"""

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

CHILD = textwrap.dedent("""
    import json, sys, torch, kvant
    from kvant.calib.streaming import quantize_streaming
    from kvant.model.synthetic import llama_config, load_synthetic
    st = lambda k: int([l for l in open("/proc/self/status")
                        if l.startswith(k)][0].split()[1]) / 1024
    trace, peaks = [], []
    def probe(i):
        trace.append(st("VmRSS"))
        peaks.append(st("VmHWM"))
    cfg = llama_config(hidden=2048, intermediate=5632, blocks=8, heads=16, kv_heads=4,
                       vocab=1024, max_positions=256)
    model = load_synthetic(cfg, seed=0, dtype=torch.bfloat16)
    quantize_streaming(model, kvant.RTNConfig(bits=4, group_size=128), None, sys.argv[1],
                       None, kvant.EngineOptions(device="cpu", show_progress=False),
                       on_block=probe)
    shard = sorted(__import__("pathlib").Path(sys.argv[1]).glob("model-*.safetensors"))[0]
    print(json.dumps({"trace": trace, "peaks": peaks, "block_mb": shard.stat().st_size / 2**20}))
""")


@pytest.mark.slow
def test_streaming_host_memory_is_flat_in_depth(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "q")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    trace = res["trace"]
    assert len(trace) == 8
    assert res["block_mb"] > 2.5 * 8  # the tolerance is well below one block's output
    slope = (min(trace[4:]) - min(trace[:4])) / 4
    assert slope <= 8.0, f"host memory grows {slope:.1f} MB/block: {trace}"
    # the peak so far (VmHWM) is not asserted here: within 8 blocks it moves in single steps
    # of 20-30 MB at unpredictable blocks; benchmarks/stream_memory.py measures the peak of
    # separate runs at several depths instead
