"""The engine's block runner (kvant.calib.runner) and the up-front model check it comes with."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kvant
from kvant.algorithms.awq import AWQUnsupportedError
from kvant.calib.capture import BlockInput
from kvant.calib.runner import BlockRunner
from kvant.config import AWQConfig
from kvant.nn.qlinear import QuantLinear

OPTS = kvant.EngineOptions(device="cpu", show_progress=False)


class _Block(nn.Module):
    """x -> x + down(relu(up(norm(x)))), called with a keyword ``scale``."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x, scale=1.0):
        return x + scale * self.down(torch.relu(self.up(self.norm(x))))


def _setup(n_calls: int = 3):
    torch.manual_seed(0)
    block = _Block()
    inputs = [BlockInput((torch.randn(2, 5, 16),), {"scale": 0.5}) for _ in range(n_calls)]
    return block, inputs


def _no_hooks(block: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in block.modules())


def test_outputs_are_the_block_outputs():
    block, inputs = _setup()
    runner = BlockRunner(block, inputs, "layers.0.")
    outs = runner.outputs()
    assert len(outs) == 3 and runner.prefix == "layers.0."
    for inp, out in zip(inputs, outs):
        assert torch.equal(out, block(*inp.args, **inp.kwargs))


def test_run_hands_callbacks_the_submodule_calls_and_removes_its_hooks():
    block, inputs = _setup()
    runner = BlockRunner(block, inputs)
    seen_in, seen_out, order = [], [], []
    outs = runner.run(before=[("down", lambda a, kw: seen_in.append(a[0])),
                              ("up", lambda a, kw: order.append("up")),
                              ("down", lambda a, kw: order.append("down"))],
                      after={"up": lambda a, kw, out: seen_out.append(out)})
    assert _no_hooks(block)
    assert order == ["up", "down"] * 3
    for inp, x, u, out in zip(inputs, seen_in, seen_out, outs):
        h = inp.args[0]
        assert torch.equal(u, block.up(block.norm(h)))
        assert torch.equal(x, torch.relu(u))
        assert torch.equal(out, block(*inp.args, **inp.kwargs))
    assert runner.run(inputs[:1], keep_outputs=False) is None


def test_capture_and_ran():
    block, inputs = _setup()
    runner = BlockRunner(block, inputs)
    got: dict = {}
    runner.capture(["up", "down"], lambda n, x: got.setdefault(n, []).append(x))
    assert [len(got[n]) for n in ("up", "down")] == [3, 3]
    assert torch.equal(got["up"][1], block.norm(inputs[1].args[0]))
    assert runner.ran(["up", "norm"], inputs[0]) == {"up", "norm"}
    assert _no_hooks(block)


def test_hooks_are_removed_when_a_callback_raises():
    block, inputs = _setup()

    def boom(a, kw):
        raise KeyError("stop")

    with pytest.raises(KeyError):
        BlockRunner(block, inputs).run(before={"up": boom})
    assert _no_hooks(block)


def test_probe_changes_weights_only_for_the_probe():
    block, inputs = _setup()
    runner = BlockRunner(block, inputs)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    ref = runner.outputs()
    w = torch.zeros_like(block.down.weight)
    outs = runner.probe(weights={"down": w})
    # a zero down-projection leaves x + bias
    for inp, out in zip(inputs, outs):
        assert torch.allclose(out, inp.args[0] + 0.5 * block.down.bias)
    loss = runner.probe(weights={block.down: w}, reference=ref)
    manual = sum(float((o - r).pow(2).sum()) for o, r in zip(outs, ref)) / sum(
        r.numel() for r in ref)
    assert loss == pytest.approx(manual, rel=1e-6) and loss > 0
    assert runner.probe(reference=ref) == 0.0  # the unchanged block reproduces its outputs
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())


def test_probe_swaps_modules_and_restores_them_even_on_error():
    block, inputs = _setup()
    runner = BlockRunner(block, inputs)
    up = block.up
    outs = runner.probe(modules={"up": nn.Sequential(up, nn.Tanh())})
    assert block.up is up
    x = inputs[0].args[0]
    expect = x + 0.5 * block.down(torch.relu(torch.tanh(up(block.norm(x)))))
    assert torch.allclose(outs[0], expect)
    with pytest.raises(RuntimeError):  # a module of the wrong width fails inside the probe
        runner.probe(modules={"up": nn.Linear(16, 7)}, weights={"down": block.down.weight * 2})
    assert block.up is up
    assert torch.equal(runner.outputs()[0], block(*inputs[0].args, **inputs[0].kwargs))


def test_probe_sets_a_conv1d_weight_in_linear_layout():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(6, 4)  # weight stored (4, 6) = (K, N)
    x = torch.randn(3, 4)
    w = torch.randn(6, 4)  # (N, K)
    out = BlockRunner(conv).probe(weights={conv: w}, inputs=[BlockInput((x,), {})])[0]
    assert torch.allclose(out, x @ w.t() + conv.bias)


def test_awq_names_layers_by_the_prefix_the_runner_carries():
    from kvant.algorithms.awq import AWQ

    block, inputs = _setup()
    linears = {"up": block.up, "down": block.down}
    method = AWQ(AWQConfig(bits=4, group_size=16))
    with pytest.raises(AWQUnsupportedError, match=r"'model\.layers\.3\.down'.*32 input"):
        method.prepare_block(block, linears, [["up", "down"]], inputs,
                             BlockRunner(block, inputs, "model.layers.3."))


def _llama():
    pytest.importorskip("transformers")
    from hf_tiny import tiny_llama

    return tiny_llama()


def test_awq_refuses_a_model_up_front_before_any_block_changes():
    """A tied parameter in the last block is refused before block 0 is touched: AWQ scales
    in place, so scaling block 0's copy would silently change block 1."""
    from kvant.algorithms.awq import AWQ

    model = _llama()
    layers = model.model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight
    state = {k: v.clone() for k, v in layers[0].state_dict().items()}
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(AWQUnsupportedError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*"
                                                   r"model\.layers\.1\.mlp\.up_proj\.weight"):
        kvant.quantize(model, AWQConfig(bits=4, group_size=32, n_grid=4), ids, options=OPTS)
    assert not any(isinstance(m, QuantLinear) for m in layers[0].modules())
    assert all(torch.equal(state[k], v) for k, v in layers[0].state_dict().items())
    # untied, the same model passes the check
    layers[1].mlp.up_proj.weight = nn.Parameter(layers[0].mlp.up_proj.weight.detach().clone())
    AWQ(AWQConfig()).check_model(model, layers, ())
