"""The block-by-block engine: discovery, sequential groups, bad input raised before work."""

import pytest
import torch
import torch.nn as nn

import kvant
from kvant.calib.capture import capture_block_inputs
from kvant.calib.engine import sequential_groups
from kvant.model.discovery import DiscoveryError, find_blocks, find_linears
from kvant.nn.qlinear import QuantLinear

OPTS = kvant.EngineOptions(show_progress=False)


def test_discovery_nanogpt(tiny_gpt):
    model, _ = tiny_gpt
    name, blocks = find_blocks(model)
    assert name == "blocks" and len(blocks) == 2
    lins = find_linears(blocks[0])
    assert len(lins) == 2 * 3 + 3
    assert "sa.heads.1.value" in lins and "ffwd.net.2" in lins


def test_sequential_groups_found_from_the_forward(tiny_gpt, tiny_calib):
    model, _ = tiny_gpt
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], [tiny_calib[:2]], "cpu")
    groups = sequential_groups(blocks[0], find_linears(blocks[0]), inputs[0])
    # all key/query/value Linears read ln1's output; then proj; then the two FFN Linears
    assert sorted(groups[0]) == sorted(f"sa.heads.{h}.{p}" for h in range(2)
                                       for p in ("key", "query", "value"))
    assert groups[1:] == [["sa.proj"], ["ffwd.net.0"], ["ffwd.net.2"]]


def test_rtn_replaces_every_block_linear(tiny_gpt):
    model, _ = tiny_gpt
    rep = kvant.quantize(model, kvant.RTNConfig(bits=4, group_size=32), options=OPTS)
    assert len(rep.layers) == 18
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 18
    assert isinstance(model.lm_head, nn.Linear)  # outside the blocks: left in float


def test_rtn8_is_close(tiny_gpt):
    model, _ = tiny_gpt
    x = torch.randint(0, 65, (2, 32))
    ref = model(x)
    kvant.quantize(model, kvant.RTNConfig(bits=8, group_size=-1), options=OPTS)
    rel = (model(x) - ref).norm() / ref.norm()
    assert rel < 0.01


def test_ignore(tiny_gpt):
    model, _ = tiny_gpt
    rep = kvant.quantize(model, kvant.RTNConfig(bits=4, group_size=32, ignore=("ffwd.net.2",)),
                         options=OPTS)
    assert len(rep.layers) == 16 and isinstance(model.blocks[0].ffwd.net[2], nn.Linear)


def test_nan_weight_named(tiny_gpt):
    model, _ = tiny_gpt
    with torch.no_grad():
        model.blocks[1].sa.proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'blocks\.1\.sa\.proj\.weight' .* NaN/Inf"):
        kvant.quantize(model, kvant.RTNConfig(bits=4, group_size=32), options=OPTS)
    # nothing was replaced: the error came before any work
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_group_size_error_names_layer(tiny_gpt):
    model, _ = tiny_gpt
    with pytest.raises(ValueError, match=r"group_size 48 does not divide.*'blocks\.0\.sa\.heads"):
        kvant.quantize(model, kvant.RTNConfig(bits=4, group_size=48), options=OPTS)


def test_no_blocks():
    with pytest.raises(DiscoveryError, match="no decoder blocks"):
        kvant.quantize(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), kvant.RTNConfig(group_size=-1),
                       options=OPTS)
