"""Mixed precision to a target size (kvant.calib.mixed, plan, allocate) on the embedded
nanoGPT Shakespeare model: budget met, better than uniform widths, proxy ranks like KL,
plan saved and reloaded, impossible targets refused."""

import itertools
import random

import pytest
import torch

import kvant
from kvant.calib.allocate import BudgetError, allocate, lower_hull, total
from kvant.calib.data_char import char_windows
from kvant.calib.mixed import measure
from kvant.calib.plan import MixedConfig, MixedPlan
from kvant.cli import main
from kvant.config import ConfigError
from kvant.errors import InputError
from kvant.eval.table import quantized_bits_per_weight
from kvant.model import nanogpt
from kvant.nn.qlinear import QuantLinear

OPTS = kvant.EngineOptions(show_progress=False, device="cpu")


def _spearman(a, b) -> float:
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@pytest.fixture(scope="module")
def calib():
    model, tok = nanogpt.load_embedded()
    return kvant.calibration_for(model, tok, n_samples=4, seq_len=128, seed=0)


@torch.no_grad()
def _held_out_kl(model, ref_model, tok) -> float:
    """Mean KL(float || model) per position on 8 validation windows (never calibration)."""
    x = char_windows(tok, nanogpt.validation_text(), 8, 256, seed=3)
    lp = torch.log_softmax(ref_model(x).float(), -1)
    lq = torch.log_softmax(model(x).float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


# -- the allocator --------------------------------------------------------------------------
def test_lower_hull_drops_dominated_and_concave_points():
    opts = {"a": (10, 9.0), "b": (20, 4.0), "c": (30, 3.5), "d": (40, 0.5), "e": (25, 6.0)}
    # e is dominated by b (dearer, worse); c lies above the chord b-d
    assert lower_hull(opts) == ["a", "b", "d"]


@pytest.mark.parametrize("scale", [1, 4096])
def test_allocator_meets_budget_and_finds_the_exhaustive_optimum(scale):
    """Random 5-layer problems, checked against all 4**5 assignments. scale=4096 makes the
    costs far larger than the programme's units (rounding up must still fit)."""
    rng = random.Random(scale)
    gaps = []
    for trial in range(40):
        options = {}
        for layer in range(5):
            size = rng.choice([64, 256, 1024]) * scale
            options[f"l{layer}"] = {b: (size * b + 19 * size // 64, size * rng.uniform(0.5, 2)
                                        * 4.0 ** -b) for b in (2, 3, 4, 8)}
        least = sum(min(c for c, _ in o.values()) for o in options.values())
        most = sum(max(c for c, _ in o.values()) for o in options.values())
        budget = rng.randint(least, most)
        pick = allocate(options, budget)
        assert total(options, pick, 0) <= budget
        best = min(total(options, dict(zip(options, combo)), 1)
                   for combo in itertools.product((2, 3, 4, 8), repeat=5)
                   if total(options, dict(zip(options, combo)), 0) <= budget)
        got = total(options, pick, 1)
        assert got >= best * (1 - 1e-12)
        gaps.append(got / best - 1)
    # exact in whole bits; with costs >> units the rounding up may cost a little
    assert max(gaps) < (1e-9 if scale == 1 else 0.02), max(gaps)


def test_allocator_refuses_a_budget_below_the_cheapest():
    with pytest.raises(BudgetError, match="below"):
        allocate({"l": {2: (100, 1.0), 4: (200, 0.1)}}, 99)


# -- the configuration -----------------------------------------------------------------------
def test_mixed_config_validates_and_round_trips():
    m = MixedConfig(target_bpw=2.5, widths=(4, 2, 3), group_sizes=(128, 64))
    assert m.widths == (2, 3, 4) and m.group_sizes == (64, 128)
    assert MixedConfig.from_dict(m.to_dict()) == m
    assert MixedConfig().widths == ()  # every width the method stores (calib/candidates)
    for bad in (dict(target_bpw=0), dict(target_bpw=float("nan")), dict(widths=(5,)),
                dict(widths=None), dict(sensitivity="output"), dict(group_sizes=(-2,)),
                dict(methods=("",)), dict(methods="gptq")):
        with pytest.raises(ConfigError):
            MixedConfig(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        MixedConfig.from_dict({"target_bpw": 3, "bits": 2})


# -- the measure -----------------------------------------------------------------------------
def test_fisher_proxy_ranks_layers_like_the_kl_increase():
    """The cheap proxy is allowed because it orders layers as the real measure does: the KL
    of the float model to the model with only that layer quantized (2 bits, RTN g64), over
    the layers of blocks 0 and 5. (The unweighted output error scores about -0.1 here.)"""
    model, tok = nanogpt.load_embedded()
    c = kvant.calibration_for(model, tok, n_samples=2, seq_len=64, seed=0)
    ignore = tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                   and n.split(".")[:2] in (["blocks", "1"], ["blocks", "2"], ["blocks", "3"],
                                            ["blocks", "4"]))
    cfg = kvant.RTNConfig(bits=2, group_size=64, ignore=ignore)
    res = {s: measure(model, cfg, c, MixedConfig(target_bpw=3.0, widths=(2,), sensitivity=s),
                      OPTS) for s in ("kl", "fisher")}
    names = list(res["kl"].options)
    assert len(names) == 42
    kl = [res["kl"].options[n][("rtn", 2, 64)][1] for n in names]
    fisher = [res["fisher"].options[n][("rtn", 2, 64)][1] for n in names]
    assert _spearman(kl, fisher) > 0.85
    assert all(k > 0 for k in kl)


# -- end to end ------------------------------------------------------------------------------
def test_target_met_and_better_than_uniform_at_the_same_size(calib):
    ref, tok = nanogpt.load_embedded()
    uniform, _ = nanogpt.load_embedded()
    kvant.quantize(uniform, kvant.RTNConfig(bits=3, group_size=64), calib, OPTS)
    u_bpw = quantized_bits_per_weight(uniform)
    mixed, _ = nanogpt.load_embedded()
    rep = kvant.quantize(mixed, kvant.RTNConfig(bits=3, group_size=64), calib, OPTS,
                         target_bpw=u_bpw)
    bpw = quantized_bits_per_weight(mixed)
    assert bpw <= u_bpw + 1e-12 and rep.plan.achieved_bpw == pytest.approx(bpw, abs=1e-12)
    assert len({c.bits for c in rep.plan.layers.values()}) > 1  # really mixed
    kl_u, kl_m = _held_out_kl(uniform, ref, tok), _held_out_kl(mixed, ref, tok)
    assert kl_m < 0.95 * kl_u, (kl_m, kl_u)
    print("held-out KL uniform", kl_u, "mixed", kl_m)

    # target 3.0: at or under it, and within a small margin
    m3, _ = nanogpt.load_embedded()
    rep3 = kvant.quantize(m3, kvant.RTNConfig(bits=3, group_size=64), calib, OPTS,
                          target_bpw=3.0)
    assert 3.0 - 0.01 <= quantized_bits_per_weight(m3) <= 3.0
    assert rep3.plan.achieved_bpw == pytest.approx(rep3.plan.predicted_bpw, abs=1e-12)
    for name, choice in rep3.plan.layers.items():
        layer = m3.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.bits == choice.bits
        assert 8 * layer.storage_bytes() == choice.stored_bits


def test_plan_saved_reloaded_and_printed(calib, tmp_path, capsys):
    model, tok = nanogpt.load_embedded()
    rep = kvant.quantize(model, kvant.RTNConfig(bits=3, group_size=64), calib, OPTS,
                         mixed=MixedConfig(target_bpw=2.8, widths=(2, 3, 4)))
    out = kvant.save_quantized(model, tmp_path / "q", tok)
    back, _ = kvant.load_quantized(out)
    assert isinstance(back.kvant_mixed_plan, MixedPlan)
    assert back.kvant_mixed_plan.layers == rep.plan.layers
    assert back.kvant_mixed_plan.achieved_bpw == rep.plan.achieved_bpw
    assert MixedPlan.from_dict(rep.plan.to_dict()).layers == rep.plan.layers
    x = calib[:2]
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    for name, choice in rep.plan.layers.items():
        assert back.get_submodule(name).bits == choice.bits

    rc = main(["quantize", "nanogpt", "--method", "rtn", "--bits", "3", "--group-size", "64",
               "--target-bpw", "3.0", "--widths", "2,3,4", "--n-samples", "4",
               "--seq-len", "64", "--out", str(tmp_path / "cli")])
    text = capsys.readouterr().out
    assert rc == 0
    assert "mixed precision: target 3.0000 bits/weight" in text
    assert "blocks.5.ffwd.net.2:" in text
    meta = __import__("json").loads((tmp_path / "cli" / "config.json").read_text())
    assert meta["quantization_config"]["mixed_plan"]["achieved_bpw"] <= 3.0


def test_impossible_target_refused_before_work(calib, capsys):
    model, tok = nanogpt.load_embedded()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match="below the smallest candidate"):
        kvant.quantize(model, kvant.RTNConfig(bits=3, group_size=64), calib, OPTS,
                       target_bpw=2.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(InputError, match="calibration"):
        kvant.quantize(model, kvant.RTNConfig(bits=3, group_size=64), None, OPTS,
                       target_bpw=3.0)
    assert main(["quantize", "nanogpt", "--target-bpw", "1.5", "--out", "/nonexistent/x"]) == 2
    assert "below the smallest candidate" in capsys.readouterr().err
    assert main(["quantize", "nanogpt", "--widths", "2,3", "--out", "/nonexistent/x"]) == 2
    assert "only apply with --target-bpw" in capsys.readouterr().err
