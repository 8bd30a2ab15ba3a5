"""Typed errors and the checks that turn silent wrong results into clear ones (issue 17):
the KvantError hierarchy, ignore patterns, NaN/Inf anywhere in the model, calibration tensors,
duplicated spec keys, non-finite knobs, devices, local paths, GGUF headers, foreign
exports, and the calibration memory estimate."""

import math

import pytest
import torch

import kvant
from kvant.algorithms.registry import config_from_spec
from kvant.calib import budget
from kvant.calib.data import CalibrationDataError, check_token_ids
from kvant.config import (ConfigError, EngineOptions, GPTQConfig, RTNConfig, SpQRConfig,
                          check_device)
from kvant.errors import (CheckpointError, InputError, KvantError, OutputError,
                          ResourceError)
from kvant.model.discovery import check_finite, check_ignore_patterns, find_blocks

OPTS = EngineOptions(device="cpu", show_progress=False, batch_size=4)


def test_hierarchy_keeps_valueerror_working():
    for cls in (InputError, CheckpointError, OutputError, ResourceError):
        assert issubclass(cls, KvantError) and issubclass(cls, ValueError)
    from kvant.calib.data import CalibrationDataError
    from kvant.model.discovery import DiscoveryError
    from kvant.model.hf import ModelLoadError
    for cls in (ConfigError, CalibrationDataError, DiscoveryError, ModelLoadError):
        assert issubclass(cls, InputError)


# ---- ignore ------------------------------------------------------------------------------

def test_ignore_string_is_one_pattern_not_characters():
    assert RTNConfig(ignore="proj").ignore == ("proj",)
    assert RTNConfig.from_dict({"ignore": "net.0"}).ignore == ("net.0",)
    assert RTNConfig(ignore=["a", "b.c"]).ignore == ("a", "b.c")
    with pytest.raises(ConfigError, match="ignore must be"):
        RTNConfig(ignore=[3])
    with pytest.raises(ConfigError, match="ignore must be"):
        RTNConfig(ignore=[""])


def test_ignore_string_keeps_exactly_that_layer(tiny_gpt):
    model, _ = tiny_gpt
    before = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    rep = kvant.quantize(model, RTNConfig(bits=4, group_size=32, ignore="sa.proj"), None, OPTS)
    left = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    # the two attention output projections stay float; lm_head is never quantized
    assert left == {"blocks.0.sa.proj", "blocks.1.sa.proj", "lm_head"}
    assert len(rep.layers) == len(before) - 3


def test_ignore_pattern_matching_nothing_is_refused(tiny_gpt):
    model, _ = tiny_gpt
    with pytest.raises(InputError, match=r"\['nothere'\] match no linear layer"):
        kvant.quantize(model, RTNConfig(bits=4, group_size=32, ignore=("sa.proj", "nothere")),
                       None, OPTS)
    assert not any(type(m).__name__ == "QuantLinear" for m in model.modules())  # untouched
    check_ignore_patterns(model, "lm_head")  # a real (never quantized) layer is fine
    with pytest.raises(InputError, match="match no linear layer"):
        check_ignore_patterns(model, "proj.")  # one string, never split into characters


def test_spec_and_duplicate_keys():
    assert config_from_spec("rtn:ignore=lm_head,ignore=sa.proj").ignore == ("lm_head", "sa.proj")
    with pytest.raises(ConfigError, match=r"'bits' is given twice .* \(3 and 2\)"):
        config_from_spec("gptq:bits=3,bits=2")


# ---- NaN / Inf everywhere ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["lm_head.weight", "ln_f.weight", "blocks.1.ffwd.net.0.bias",
                                  "token_embedding_table.weight",
                                  "position_embedding_table.weight", "blocks.0.ln1.bias"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_parameter_outside_the_linears_is_named(tiny_gpt, name, value):
    model, _ = tiny_gpt
    with torch.no_grad():
        model.get_parameter(name).view(-1)[3] = value
    with pytest.raises(InputError, match=rf"parameter '{name}' .* holds 1 NaN/Inf"):
        kvant.quantize(model, RTNConfig(bits=4, group_size=32), None, OPTS)


def test_nan_buffer_is_named_but_minus_inf_mask_is_allowed():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("mask", torch.tensor([0.0, -math.inf]))
    m = M()
    check_finite(m)  # an additive mask with -inf is legitimate
    m.mask[0] = math.nan
    with pytest.raises(InputError, match="buffer 'mask'"):
        check_finite(m)


# ---- calibration tensors -----------------------------------------------------------------

@pytest.mark.parametrize("calib, msg", [
    (torch.full((4, 32), 65), r"token id 65, outside the model's vocabulary \[0, 65\)"),
    (torch.full((4, 32), -1), "token id -1"),
    (torch.rand(4, 32), "integer token ids, got dtype torch.float32"),
    (torch.zeros(32, dtype=torch.long), r"2-D \(n_samples, seq_len\), got shape \(32,\)"),
    (torch.zeros(2, 4, 32, dtype=torch.long), "2-D"),
    (torch.zeros(0, 32, dtype=torch.long), "empty"),
    (torch.zeros(2, 33, dtype=torch.long), "seq_len 33 exceeds the model's context length 32"),
])
def test_bad_calibration_tensor_is_refused_before_work(tiny_gpt, calib, msg):
    model, _ = tiny_gpt
    w0 = model.blocks[0].sa.proj.weight.clone()
    with pytest.raises(CalibrationDataError, match=msg):
        kvant.quantize(model, GPTQConfig(bits=4, group_size=32), calib, OPTS)
    assert torch.equal(model.blocks[0].sa.proj.weight, w0)


@pytest.mark.parametrize("kw, msg", [
    (dict(n_samples=0), "n_samples must be a positive int, got 0"),
    (dict(n_samples=-3), "n_samples must be a positive int, got -3"),
    (dict(seq_len=0), "seq_len must be a positive int, got 0"),
    (dict(seq_len=-5), "seq_len must be a positive int, got -5"),
    (dict(n_samples=2.5), "n_samples must be a positive int"),
])
def test_calibration_counts_on_the_nanogpt_track(tiny_gpt, kw, msg):
    model, tok = tiny_gpt
    args = dict(n_samples=4, seq_len=16) | kw
    with pytest.raises(CalibrationDataError, match=msg):
        kvant.calibration_for(model, tok, **args)


def test_valid_calibration_tensor_passes(tiny_gpt, tiny_calib):
    check_token_ids(tiny_gpt[0], tiny_calib)


# ---- config knobs, devices ---------------------------------------------------------------

def test_non_finite_knobs_are_refused():
    with pytest.raises(ConfigError, match="outlier_threshold must be a finite number, got nan"):
        SpQRConfig(outlier_threshold=math.nan)
    with pytest.raises(ConfigError, match="damp_percent must be a finite number"):
        GPTQConfig(damp_percent=math.inf)
    with pytest.raises(ConfigError, match="outlier_budget must be a finite number"):
        SpQRConfig(outlier_budget=math.nan)
    assert SpQRConfig(outlier_threshold=math.inf).outlier_threshold == math.inf  # documented


def test_devices_are_checked():
    check_device("cpu")
    check_device(None)
    with pytest.raises(ConfigError, match="unknown device 'bogus'"):
        EngineOptions(device="bogus")
    with pytest.raises(ConfigError, match="not supported"):
        check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            EngineOptions(device="cuda")


# ---- model paths -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["./missing", "missing-dir/sub/model", "~/no-such-kvant-dir",
                                  "no-such.gguf", "/no/such/abs"])
def test_missing_local_path_never_asks_the_hub(name, monkeypatch, tmp_path):
    from kvant.model import hf
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf, "load_hf", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        kvant.load_model(name)


def test_hub_ids_still_look_like_hub_ids():
    from kvant.model.hf import looks_local
    assert not looks_local("HuggingFaceTB/SmolLM2-135M")
    assert not looks_local("gpt2")
    assert looks_local("./HuggingFaceTB/SmolLM2-135M") and looks_local("a/b/c")


@pytest.mark.parametrize("content", [b"GGUF", b"GGUF\x03\x00\x00\x00", b"GGUF" + b"\xff" * 40])
def test_truncated_gguf_is_a_clear_error(tmp_path, content):
    pytest.importorskip("gguf")
    f = tmp_path / "m.gguf"
    f.write_bytes(content)
    from kvant.model.hf import ModelLoadError
    with pytest.raises(ModelLoadError, match="truncated or corrupted"):
        kvant.load_model(f)


def test_foreign_quantized_dir_is_refused(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a gptq checkpoint .* evaluate the kvant "
                                              "checkpoint it came from"):
        kvant.load_model(tmp_path)


def test_evaluate_without_tokenizer_or_with_bad_counts(tiny_gpt):
    model, tok = tiny_gpt
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        kvant.evaluate(model, None)
    with pytest.raises(InputError, match="max_windows must be a positive int, got -1"):
        kvant.evaluate(model, tok, max_windows=-1)


# ---- memory budget -----------------------------------------------------------------------

def test_estimate_counts_activations_hessians_and_block(tiny_gpt):
    model, _ = tiny_gpt
    _, blocks = find_blocks(model)
    est = budget.estimate(model, blocks, n_samples=100, seq_len=32, batch_size=8)
    assert est["activations"] == 2 * 100 * 32 * 64 * 4  # inputs + outputs, float32
    # one block: 2 heads x (q, k, v) 64->32, proj 64->64, ffwd 64->256 and 256->64; the
    # largest set of equal input width: the 8 Linears reading 64 features (131 kB) or the
    # one reading 256 (262 kB)
    assert est["hessians"] == max(8 * 64 ** 2, 256 ** 2) * 4 == 262144
    at_once = budget.estimate(model, blocks, 100, 32, 8, sequential=False)["hessians"]
    assert at_once == (8 * 64 ** 2 + 256 ** 2) * 4
    block_params = sum(p.numel() for p in blocks[0].parameters()) * 4
    assert est["block"] > block_params
    assert est["total"] == est["activations"] + est["hessians"] + est["block"]


def test_calibration_larger_than_memory_is_refused_with_numbers(tiny_gpt, tiny_calib,
                                                                monkeypatch):
    model, _ = tiny_gpt
    monkeypatch.setattr(budget, "available_bytes", lambda device: 1_000_000)
    w0 = model.blocks[0].sa.proj.weight.clone()
    with pytest.raises(ResourceError, match=r"n_samples=8 x seq_len=32 needs ~0\.0 GB .*"
                                            r"block inputs and outputs .* host memory"):
        kvant.quantize(model, GPTQConfig(bits=4, group_size=32), tiny_calib, OPTS)
    assert torch.equal(model.blocks[0].sa.proj.weight, w0)
    kvant.quantize(model, RTNConfig(bits=4, group_size=32), None, OPTS)  # needs no calibration


def test_available_bytes_reads_meminfo():
    free = budget.available_bytes(torch.device("cpu"))
    assert free is None or free > 0
