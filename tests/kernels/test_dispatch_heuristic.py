"""The 4-bit decode heuristic against the kernel table it was fitted to: at batch <= 16, on
the card the table was measured on, the configuration a call gets untuned is one that table
timed within a few percent of the fastest it found (benchmarks/results/kernels.json). The
rules import no Triton, so this runs on any machine."""

import json
from pathlib import Path

import pytest
import torch

import kvant.kernels.triton.rules as d  # the launch rules: no Triton needed

TABLE = Path(__file__).parents[2] / "benchmarks" / "results" / "kernels.json"
SMS = {"NVIDIA H200": 132}  # streaming multiprocessors of the cards a table may name
SLACK = 1.07  # the tuner's own repeat-to-repeat spread on one row is ~3-5 % (kernels.md)


def _decode_rows():
    rows = json.loads(TABLE.read_text())
    return [r for r in rows if r["bits"] == 4 and r["batch"] <= 16 and r.get("tuned")]


def test_heuristic_picks_what_the_table_measured_fast(monkeypatch):
    rows = _decode_rows()
    assert rows, "the kernel table has no 4-bit decode rows"
    monkeypatch.setattr(d, "_sms", lambda device: SMS[rows[0]["device"]])
    slow, unmeasured = [], []
    for r in rows:
        (n, k), m = r["shape"], r["batch"]
        times = dict((c, t) for c, t in r["tuned"])
        times[r["config"]] = min(times.get(r["config"], float("inf")), r["us_kernel"])
        if r.get("us_heuristic") is not None:
            times[r["heuristic_config"]] = r["us_heuristic"]
        pick = repr(d.heuristic(m, n, k, 4, torch.device("cuda"), pairs=True))
        if pick not in times:
            unmeasured.append((n, k, m))
        elif times[pick] > SLACK * min(times.values()):
            slow.append((n, k, m, pick, round(times[pick] / min(times.values()), 3)))
    assert not slow, f"the heuristic picks configurations the table measured slow: {slow}"
    # a choice the table never timed is allowed only rarely (neighbouring batches cover it)
    assert len(unmeasured) <= len(rows) // 10, unmeasured


@pytest.mark.parametrize("n,k,split", [(10240, 8192, 4), (8192, 8192, 4), (57344, 8192, 2),
                                       (8192, 28672, 8)])
def test_heuristic_keeps_the_70b_block_splits(monkeypatch, n, k, split):
    """The Llama-3-70B block shapes at batch 1 keep the splits gemv_70b.md measured fastest."""
    monkeypatch.setattr(d, "_sms", lambda device: 132)
    cfg = d.heuristic(1, n, k, 4, torch.device("cuda"), pairs=True)
    assert (cfg.kernel, cfg.bn, cfg.split) == ("dot", 128, split)
