"""Quantization across two processes (gloo on CPU) equals one process; failures stop all.

Each test starts two ranks of tests/dist_worker.py with the environment torchrun would set
and, for the quality test, computes the one-process reference meanwhile in this process.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvant.calib.dist import assign_layers, layer_cost, shard_range

WORKER = Path(__file__).parents[1] / "dist_worker.py"
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(case: str, out: Path, *extra: str) -> list:
    port = _free_port()
    procs = []
    for r in range(WORLD):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), case, str(out), *extra], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def _wait(procs, timeout=240) -> list:
    outs = []
    try:
        for p in procs:
            outs.append((p.wait(timeout=timeout), p.stdout.read()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def test_shards_and_assignment():
    # contiguous near-equal shards that cover every sample once
    for n in (2, 7, 15, 128):
        spans = [shard_range(n, r, 3) for r in range(3)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1
    # a Llama-70B-shaped q/k/v group on 2 ranks: q alone, k + v together (cost K²(K+N))
    costs = {n: layer_cost(s) for n, s in
             {"q": (8192, 8192), "k": (1024, 8192), "v": (1024, 8192)}.items()}
    assert assign_layers(costs, 2) == {"q": 0, "k": 1, "v": 1}
    assert assign_layers({"a": 1.0, "b": 1.0, "c": 1.0}, 2) == {"a": 0, "b": 1, "c": 0}
    assert assign_layers({"a": 1.0}, 4) == {"a": 0}


def test_two_processes_match_one(tmp_path):
    import dist_worker as w

    procs = _start("quality", tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run single-threaded too
    try:
        ref = {m: w.quantize_embedded(m) for m in w.CONFIGS}
    finally:
        torch.set_num_threads(threads)
    for rc, log in _wait(procs):
        assert rc == 0, log[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for method in w.CONFIGS:
        one, two = ref[method], ranks[0][method]
        # every rank ends with the same model and the same report
        for other in ranks[1:]:
            assert other[method]["layers"] == two["layers"]
            assert all(torch.equal(two["codes"][n], other[method]["codes"][n])
                       for n in two["codes"])
            assert other[method]["ppl"] == two["ppl"]
        assert sorted(two["codes"]) == sorted(one["codes"]) and len(one["codes"]) == 126
        same = sum(torch.equal(one["codes"][n], two["codes"][n]) for n in one["codes"])
        assert abs(two["ppl"] / one["ppl"] - 1) < 1e-3, (method, one["ppl"], two["ppl"])
        if method == "rtn":
            assert same == len(one["codes"])
        else:  # seen: 126 of 126, perplexity equal to every digit (cpu-2core)
            assert same >= 0.9 * len(one["codes"]), same
            losses = [(one["layers"][n]["loss"], two["layers"][n]["loss"]) for n in one["layers"]]
            assert all(abs(a - b) <= 1e-4 * abs(a) + 1e-9 for a, b in losses)
        # rank 0 saved the checkpoint, once, and it loads to the same codes
        import kvant

        model, _ = kvant.load_quantized(tmp_path / method)
        assert all(torch.equal(c, w.codes(model)[n]) for n, c in two["codes"].items())


def test_quip_and_spqr_results_reach_every_rank(tmp_path):
    import dist_worker as w

    procs = _start("methods", tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = w.tiny_methods()
    finally:
        torch.set_num_threads(threads)
    for rc, log in _wait(procs):
        assert rc == 0, log[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for method, (logits_1, layers_1) in ref.items():
        logits, layers = ranks[0][method]
        # the same model on every rank: sign vectors, outliers and all reached rank 1
        assert torch.equal(logits, ranks[1][method][0]) and layers == ranks[1][method][1]
        assert torch.isfinite(logits).all()
        # block 0 sees the same inputs as in one process: losses equal up to float order;
        # later blocks inherit 2-3 bit rounding flips (seen: within 3%)
        for n, r in layers_1.items():
            rel = abs(layers[n]["loss"] / r["loss"] - 1)
            assert rel < (1e-4 if n.startswith("blocks.0.") else 0.1), (method, n, rel)
    for r in ranks:
        assert r["awq"] == ("DistributedError: awq across several processes is not supported "
                            "yet; run it in one process")


def test_hessian_reduction_weights_by_rows():
    from kvant.core.hessian import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    x = torch.randn(15, 10, 6, generator=g, dtype=torch.float64)
    one = HessianAccumulator(6, dtype=torch.float64)
    for b in x.split(4):
        one.add(b)
    parts = [HessianAccumulator(6, dtype=torch.float64) for _ in range(2)]
    parts[0].add(x[:7])
    parts[1].add(x[7:])
    # what kvant.calib.dist does: sum mean * rows over ranks, divide by the total rows
    states = [p.state_for_reduce() for p in parts]
    total = sum(n for _, n in states)
    merged = HessianAccumulator(6, dtype=torch.float64)
    merged.load_reduced({"H": sum(s["H"] * n for s, n in states) / total}, total)
    assert merged.n == one.n == 150
    torch.testing.assert_close(merged.result(), one.result(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="width 6"):
        merged.load_reduced({"H": torch.zeros(5, 5)}, 1)


@pytest.mark.parametrize("case", ["raise", "die"])
def test_a_failed_rank_stops_every_rank_and_nothing_is_written(tmp_path, case):
    outs = _wait(_start(case, tmp_path), timeout=120)
    msg0 = (tmp_path / "rank0.txt").read_text()
    assert not (tmp_path / "ckpt").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
    if case == "raise":
        msg1 = (tmp_path / "rank1.txt").read_text()
        assert msg1 == "RuntimeError: injected failure"  # its own error
        assert msg0.startswith("DistributedError: rank 1 failed while quantizing its layers: "
                               "quantizing blocks.0.sa.heads.")
        assert msg0.endswith("RuntimeError: injected failure")
    else:
        assert outs[1][0] == 3 and not (tmp_path / "rank1.txt").exists()
        assert msg0.startswith("DistributedError: rank 0: lost the other ranks while "
                               "observing calibration inputs"), msg0
