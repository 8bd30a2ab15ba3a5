"""The embedded default model end to end: float quality, RTN gates, the demo and the CLI."""

import json

import pytest

import kvant
from kvant.cli import main
from kvant.eval.perplexity import char_perplexity
from kvant.model.nanogpt import load_embedded, validation_text

WINDOWS = 8  # 8 x 256 validation characters: enough to separate the gates below
OPTS = kvant.EngineOptions(show_progress=False, device="cpu")


@pytest.fixture(scope="module")
def embedded():
    return load_embedded()


@pytest.fixture(scope="module")
def float_ppl(embedded):
    model, tok = embedded
    return char_perplexity(model, tok, validation_text(), max_windows=WINDOWS)["ppl"]


def test_embedded_model_is_trained(embedded, float_ppl):
    model, tok = embedded
    assert tok.vocab_size == 65
    assert sum(p.numel() for p in model.parameters()) > 10_000_000
    # the model card's validation loss is <= 1.50 nats/char; a trained model sits far below
    # the uniform 65-way guess (ppl 65) and a unigram model (ppl ~ 25)
    assert float_ppl < 5.5


def test_rtn_g128_4bit_gate(embedded, float_ppl):
    model, tok = embedded
    import copy
    q = copy.deepcopy(model)
    kvant.quantize(q, kvant.RTNConfig(bits=4, group_size=128), options=OPTS)
    ppl = char_perplexity(q, tok, validation_text(), max_windows=WINDOWS)["ppl"]
    # gate: 4-bit g128 RTN costs less than 3% perplexity on this model
    assert float_ppl < ppl < 1.03 * float_ppl


def test_naive_2bit_is_much_worse_than_grouped(embedded, float_ppl):
    model, tok = embedded
    import copy
    ppls = {}
    for g in (0, 128):
        q = copy.deepcopy(model)
        kvant.quantize(q, kvant.RTNConfig(bits=2, group_size=g, sym=g == 0), options=OPTS)
        ppls[g] = char_perplexity(q, tok, validation_text(), max_windows=WINDOWS)["ppl"]
    assert ppls[0] > ppls[128] > float_ppl


def test_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--windows", "2", "--spec",
               "rtn:bits=4,group_size=0,sym=true", "--spec", "rtn:bits=4,group_size=128"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rtn-naive" in printed and "float" in printed
    records = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in records] == ["float", "rtn-naive", "rtn"]
    assert records[2]["bits_per_weight"] == pytest.approx(4 + 20 / 128, abs=0.1)
    assert records[1]["ppl"] > records[0]["ppl"]
    for key in ("model", "device", "date", "kvant_version", "eval", "size_mb", "quant_seconds"):
        assert key in records[1]
    assert (out / "report.md").read_text().count("|") > 20
    assert (out / "report.png").stat().st_size > 1000


def test_cli_quantize_eval_inspect(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "nanogpt", "--method", "rtn", "--bits", "4", "--group-size", "64",
                 "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["layers"] == 6 * (6 * 3 + 3)
    assert main(["eval", str(out), "--max-windows", "2", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["windows"] == 2 and 1 < ev["ppl"] < 10
    assert main(["inspect", str(out), "--layers"]) == 0  # the per-layer list (issue 19)
    assert "blocks.0.sa.heads.0.key" in capsys.readouterr().out


def test_cli_bad_bits(capsys):
    assert main(["quantize", "nanogpt", "--bits", "5", "--out", "x"]) == 2
    assert "bits must be one of" in capsys.readouterr().err
