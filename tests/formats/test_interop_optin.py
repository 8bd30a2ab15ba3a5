"""Real engines read kvant's exports of a tiny random Llama, checked by their own code
(``benchmarks/interop_engines.py``, run in the engine's Python; it imports no kvant).

transformers + compressed-tensors runs always (the test extra has it). gptqmodel and vLLM are
opt-in: their tests skip unless ``KVANT_GPTQMODEL_PYTHON`` / ``KVANT_VLLM_PYTHON`` names a
Python where the engine imports (the recipes: benchmarks/README.md, "interop"). vLLM's CPU
build runs where its int4 GEMM does (seen here: AVX-512 with BF16); on a CPU without
AVX-512 its first forward may fail after loading, which the test accepts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from kvant.calib.engine import quantize_model  # noqa: E402
from kvant.config import EngineOptions, RTNConfig  # noqa: E402
from kvant.formats.hf_export import exact_weight, export_hf  # noqa: E402
from kvant.nn.qlinear import QuantLinear  # noqa: E402

WORKER = Path(__file__).resolve().parents[2] / "benchmarks" / "interop_engines.py"
CPU = EngineOptions(device="cpu", show_progress=False)
N_LAYERS = 2 * 7  # quantized Linears of the tiny model


def _engine_python(var: str) -> str:
    path = os.environ.get(var)
    if not path:
        pytest.skip(f"{var} is not set (a Python where the engine imports)")
    return path


def _tiny_llama(sym: bool, group_size: int):
    """hidden 128 with head_dim 64 (a head size vLLM's CPU attention takes), RTN W4."""
    from hf_tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=128,
                                   intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=512, bos_token_id=0,
                                   eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    quantize_model(model, RTNConfig(bits=4, group_size=group_size, sym=sym), None, CPU)
    return model, tok


@torch.no_grad()
def _reference(model, vocab: int, ref_dir: Path) -> None:
    """What benchmarks/interop.py writes for the worker: kvant's logits, greedy tokens and
    dequantized weights."""
    ids = torch.randint(2, vocab, (1, 48), generator=torch.Generator().manual_seed(0))
    prompt = ids[:, :8].clone()
    greedy = model.generate(prompt, max_new_tokens=12, min_new_tokens=12,
                            do_sample=False)[:, 8:]
    save_file({"ids": ids, "logits": model(ids).logits.float(), "prompt": prompt,
               "greedy": greedy.contiguous()}, str(ref_dir / "ref.safetensors"))
    save_file({n: exact_weight(m) for n, m in model.named_modules()
               if isinstance(m, QuantLinear)},
              str(ref_dir / "weights.safetensors"))


def _run(python: str, engine: str, tmp_path: Path, fmt: str, sym: bool, gs: int = 64):
    model, tok = _tiny_llama(sym, gs)
    out = export_hf(model, tmp_path / fmt, fmt, tok)
    _reference(model, len(tok), tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    p = subprocess.run([python, str(WORKER), engine, str(out), str(tmp_path)],
                       capture_output=True, text=True, timeout=900, env=env)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    assert lines, f"worker exit {p.returncode}: {p.stderr[-2000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("sym,gs", [(True, 64), (False, 64), (False, 128)])
def test_transformers_reads_compressed_tensors_exactly(tmp_path, sym, gs):
    """fp32: every layer's weight is kvant's, the greedy tokens are kvant's."""
    pytest.importorskip("compressed_tensors")
    res = _run(sys.executable, "transformers", tmp_path, "compressed-tensors", sym, gs)
    assert res["loads"], res.get("error")
    # symmetric: decompressed in float32, kvant's exact weight; asymmetric ("dequantize"
    # at load): decompressed in the files' fp16, kvant's dequantized_weight() bit for bit
    exact = "layers_exact" if sym else "layers_exact_fp16"
    assert res["layers_compared"] == N_LAYERS and res[exact] == N_LAYERS, res
    assert res["greedy_identical"] and res["top1_agreement"] == 1.0
    # the float tensors (embeddings, norms) are exported in fp16: a small, nonzero KL
    assert res["kl"] < 1e-6 and res["max_abs_logit_diff"] < 1e-3


@pytest.mark.parametrize("fmt,sym", [("gptq", True), ("gptq", False), ("awq", True),
                                     ("awq", False)])
def test_gptqmodel_reads_the_export(tmp_path, fmt, sym):
    """gptqmodel's TORCH backend (bf16): every layer's dequantized weight is kvant's within
    bf16 rounding; the logits stay within bf16's reach of kvant's fp32 logits."""
    python = _engine_python("KVANT_GPTQMODEL_PYTHON")
    res = _run(python, "gptqmodel", tmp_path, fmt, sym)
    assert res["loads"], res.get("error")
    assert res["layers_compared"] == N_LAYERS
    assert res["layers_within_bf16"] == N_LAYERS, res
    assert res["max_abs_logit_diff"] < 0.05 and res["kl"] < 1e-3, res


@pytest.mark.parametrize("fmt,sym,loads", [("compressed-tensors", True, True),
                                           ("compressed-tensors", False, True),
                                           ("gptq", True, True), ("gptq", False, False),
                                           ("awq", False, True)])
def test_vllm_loads_the_export(tmp_path, fmt, sym, loads):
    """vLLM's CPU build loads each layout kvant writes, except asymmetric GPTQ, which vLLM
    refuses in any layout. Where its CPU kernel runs (seen here, AVX-512 with BF16), the
    window's log-likelihood is kvant's within bf16; else the failure comes after loading."""
    python = _engine_python("KVANT_VLLM_PYTHON")
    res = _run(python, "vllm", tmp_path, fmt, sym)
    assert res["loads"] is loads, res
    if loads and "error" not in res:
        assert abs(res["nll"] - res["nll_kvant"]) < 0.02 and res["greedy_same"] >= 1, res
    elif loads:
        assert res["error"].startswith("forward: "), res
    else:
        assert "unsupported quantization config" in res["error"].lower(), res  # sym=False
