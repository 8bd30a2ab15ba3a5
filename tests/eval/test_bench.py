"""``kvant bench`` (kvant.bench, kvant.bench_run, kvant.bench_output, kvant.bench_cli): the grid, the
records against independent measurements, the table, the plot, resuming and refusing."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import kvant
import kvant.bench as kb
import kvant.bench_run as kr
from kvant import cli
from kvant.bench_output import bench
from kvant.errors import InputError, OutputError
from kvant.eval.bench_report import pareto_front
from kvant.eval.kl import FloatReference
from kvant.eval.perplexity import windows_nll
from kvant.eval.plot import can_plot
from kvant.model.nanogpt import GPTConfig, GPTLanguageModel, embedded_text

TINY = GPTConfig(vocab_size=65, n_embd=64, n_head=2, n_layer=2, block_size=32, dropout=0.0)
FAST = dict(n_samples=4, max_windows=4)


def tiny_dir(path: Path, seed: int = 0) -> Path:
    """A random 2-block nanoGPT weight directory (n_embd 64, context 32)."""
    torch.manual_seed(seed)
    model = GPTLanguageModel(TINY)
    path.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "w.safetensors"))
    vocab = "".join(sorted(set(embedded_text())))
    (path / "config.json").write_text(json.dumps({"model_type": "nanogpt",
                                                  "config": TINY.to_dict(), "vocab": vocab,
                                                  "shards": ["w.safetensors"]}))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_dir(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def first_run(model_dir, tmp_path_factory):
    """rtn and gptq at 4 and 3 bits, groups 32 and 48 (48 divides no layer: error rows)."""
    out = tmp_path_factory.mktemp("b") / "bench"
    settings = kb.BenchSettings(methods=("rtn", "gptq"), bits=(4, 3), group_sizes=(32, 48),
                                **FAST)
    return bench(str(model_dir), settings, out, show_progress=False), settings


def test_grid_keeps_method_defaults_and_reports_refused_points():
    items = kb.grid(kb.BenchSettings(methods=("rtn", "gptq", "spqr"), bits=(4,),
                                     group_sizes=(None, 0)))
    by_spec = {it.spec: it for it in items}
    spqr = by_spec["spqr:bits=4"].config
    assert (spqr.bits, spqr.group_size, spqr.stat_bits) == (4, 16, 3)  # SpQR's own group
    assert by_spec["rtn:bits=4"].config.group_size == 128
    assert by_spec["gptq:bits=4,group_size=0"].config is None  # GPTQ refuses one scale
    assert "group_size=0" in by_spec["gptq:bits=4,group_size=0"].error
    assert by_spec["rtn:bits=4,group_size=0"].config.group_size == 0
    same = kb.grid(kb.BenchSettings(methods=("rtn",), bits=(4,), group_sizes=(None, 128)))
    assert len(same) == 1  # two spellings of one configuration run once


@pytest.mark.parametrize("kw, match", [
    (dict(methods=("rtn", "nope")), "unknown method 'nope'"),
    (dict(bits=(5,)), "bits must be among"),
    (dict(group_sizes=(-2,)), "group sizes"),
    (dict(specs=("gptq:bits=3,bogus=1",)), "bogus"),
    (dict(max_windows=0), "max_windows"),
])
def test_settings_refuse_bad_input(kw, match):
    with pytest.raises(InputError, match=match):
        kb.BenchSettings(**kw)


def test_records_match_independent_measurements(first_run, model_dir):
    res, settings = first_run
    recs = res.records
    assert [r["method"] for r in recs][:1] == ["float"] and len(recs) == 9
    assert res.ran == 8 and res.skipped == 0 and res.failed == 4
    errors = [r for r in recs if "error" in r]
    assert {r["group_size"] for r in errors} == {48}
    assert all("48" in r["error"] for r in errors)  # the engine's group-size check, as text
    base, tok = kvant.load_model(str(model_dir))
    inputs = kr.prepare(str(model_dir), settings)
    nll = windows_nll(base, inputs.windows, show_progress=False)
    float_ppl = math.exp(float(nll.sum()) / inputs.eval_desc["tokens"])
    assert recs[0]["ppl"] == pytest.approx(float_ppl, rel=1e-6) and recs[0]["kl"] == 0.0
    # the RTN row: quantize a copy here and measure it with the eval code directly
    q = kvant.load_model(str(model_dir))[0]
    kvant.quantize(q, kvant.RTNConfig(bits=3, group_size=32), None,
                   kvant.EngineOptions(device="cpu", show_progress=False))
    row = next(r for r in recs if r["spec"] == "rtn:bits=3,group_size=32")
    q_nll = windows_nll(q, inputs.windows, show_progress=False)
    assert row["ppl"] == pytest.approx(math.exp(float(q_nll.sum()) / inputs.eval_desc["tokens"]),
                                       rel=1e-6)
    ref = FloatReference(base, inputs.windows, store="full", show_progress=False)
    assert row["kl"] == pytest.approx(ref.compare(q, show_progress=False)["kl"], rel=1e-6)
    host = FloatReference(base, inputs.windows, store="host", show_progress=False)
    assert host.store == "full" and host.store_device == torch.device("cpu")
    assert host.compare(q, show_progress=False)["kl"] == ref.compare(q, show_progress=False)["kl"]
    exact = FloatReference(base, inputs.windows, store="full", store_dtype=torch.float32,
                           show_progress=False)  # float16 log P moves the mean KL by < 1e-4
    assert row["kl"] == pytest.approx(exact.compare(q, show_progress=False)["kl"], abs=1e-4)
    # stored bits per weight: every packed buffer of every quantized layer counted
    from kvant.nn.qlinear import QuantLinear

    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    stored = sum(8 * m.storage_bytes() for m in layers)
    assert row["bits_per_weight"] == pytest.approx(
        stored / sum(m.in_features * m.out_features for m in layers))
    assert 3 < row["bits_per_weight"] < 3 + 2 * 16 / 32 + 1e-9  # + scale and zero per group
    ok = [r for r in recs[1:] if "error" not in r]
    assert all(r["kl"] > 0 and r["quant_seconds"] > 0 for r in ok)
    g = next(r for r in ok if r["spec"] == "gptq:bits=3,group_size=32")
    assert g["calib"]["n_samples"] == 4 and row["calib"] is None  # RTN drew no calibration
    for r in recs:  # provenance on every row
        assert r["device"].startswith("cpu-") and r["kvant_version"] == kvant.__version__
        assert r["model_fingerprint"] == recs[0]["model_fingerprint"]


def test_pareto_front_is_the_undominated_set(first_run):
    recs = first_run[0].records
    front = pareto_front(recs)
    ok = [r for r in recs[1:] if "error" not in r]
    for r in ok:
        dominated = any(o["bits_per_weight"] <= r["bits_per_weight"] and o["ppl"] <= r["ppl"]
                        and (o["bits_per_weight"], o["ppl"]) != (r["bits_per_weight"], r["ppl"])
                        for o in ok)
        assert (r in front) == (not dominated), r["spec"]


def test_table_json_and_plot_files(first_run):
    res = first_run[0]
    stored = json.loads((res.out / "bench.json").read_text())
    assert stored == json.loads(json.dumps(res.records))
    md = (res.out / "bench.md").read_text()
    base = res.records[0]["ppl"]
    for r in res.records[1:]:
        assert f"`{r['spec']}`" in md
        if "error" not in r:
            line = next(ln for ln in md.splitlines() if f"`{r['spec']}`" in ln)
            assert f"| {r['ppl']:.4f} | {100 * (r['ppl'] / base - 1):+.2f} | {r['kl']:.4f} |" \
                in line
    assert md.count("could not run") == 4 and md.count("Pareto front") == \
        len(pareto_front(res.records))
    assert "| float | - | 16 | - | 16 |" in md
    assert "fingerprint" in md and "cpu-" in md
    assert sorted(p.name for p in res.out.iterdir()) == sorted(
        [".kvant", "bench.json", "bench.md"] + ["bench.png"] * can_plot())
    if can_plot():
        assert (res.out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_measures_only_new_and_failed_configs(model_dir, tmp_path, monkeypatch):
    calls = []
    real = kr.measure_config
    monkeypatch.setattr(kr, "measure_config",
                        lambda inputs, cfg, ref: calls.append(cfg.method) or real(inputs, cfg, ref))
    out = tmp_path / "b"
    s1 = kb.BenchSettings(methods=("rtn",), bits=(4,), group_sizes=(32, 48), **FAST)
    r1 = bench(str(model_dir), s1, out, show_progress=False)
    assert calls == ["rtn", "rtn"] and r1.failed == 1  # g48 fails inside the engine
    first = json.loads((out / "bench.json").read_text())
    s2 = kb.BenchSettings(methods=("rtn", "gptq"), bits=(4,), group_sizes=(32, 48), **FAST)
    r2 = bench(str(model_dir), s2, out, show_progress=False)
    # rtn g32 skipped; rtn g48 (failed) tried again; gptq g32 and g48 new
    assert calls == ["rtn", "rtn", "rtn", "gptq", "gptq"] and (r2.ran, r2.skipped) == (3, 1)
    second = json.loads((out / "bench.json").read_text())
    assert second[:2] == first[:2]  # the float row and rtn g32 untouched, timings included
    assert [r["spec"] for r in second] == [None, "rtn:bits=4,group_size=32",
                                           "rtn:bits=4,group_size=48",
                                           "gptq:bits=4,group_size=32",
                                           "gptq:bits=4,group_size=48"]
    monkeypatch.setattr(kr, "float_reference", lambda *a, **k: pytest.fail("reran the float"))
    r3 = bench(str(model_dir), kb.BenchSettings(methods=("rtn", "gptq"), bits=(4,),
                                                group_sizes=(32,), **FAST),
               out, show_progress=False)
    assert (r3.ran, r3.skipped) == (0, 2) and len(calls) == 5


def test_mismatched_resume_is_refused(first_run, tmp_path):
    res, settings = first_run
    before = (res.out / "bench.json").read_bytes()
    other = tiny_dir(tmp_path / "other", seed=1)
    s = kb.BenchSettings(methods=("rtn",), bits=(4,), group_sizes=(32,), **FAST)
    with pytest.raises(InputError, match="another model"):
        bench(str(other), s, res.out, show_progress=False)
    model = str(res.records[0]["model"])
    with pytest.raises(InputError, match="evaluated on other windows"):
        bench(model, kb.BenchSettings(methods=("rtn",), bits=(4,), group_sizes=(32,),
                                      n_samples=4, max_windows=3), res.out, show_progress=False)
    with pytest.raises(InputError, match="calibrated on other windows"):
        bench(model, kb.BenchSettings(methods=("gptq",), bits=(2,), group_sizes=(32,),
                                      n_samples=4, seed=1, max_windows=4), res.out,
              show_progress=False)
    assert (res.out / "bench.json").read_bytes() == before


def test_foreign_directory_and_broken_json_are_refused(model_dir, tmp_path):
    s = kb.BenchSettings(methods=("rtn",), bits=(4,), **FAST)
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("user data")
    with pytest.raises(OutputError, match="did not write"):
        bench(str(model_dir), s, d, show_progress=False)
    assert [p.name for p in d.iterdir()] == ["notes.txt"]
    ours = tmp_path / "ours"
    bench(str(model_dir), kb.BenchSettings(methods=("rtn",), bits=(4,), group_sizes=(32,),
                                           **FAST), ours, show_progress=False)
    (ours / "bench.json").write_text("{not json")
    with pytest.raises(OutputError, match="not valid JSON"):
        bench(str(model_dir), s, ours, show_progress=False)


def test_cli_bad_method_is_one_line_exit_2(capsys, tmp_path):
    rc = cli.main(["bench", "--methods", "rtn,gtpq", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("kvant: error: unknown method 'gtpq'")
    assert not (tmp_path / "b").exists()
    assert cli.main(["bench", "--bits", "4,three", "--out", str(tmp_path / "b")]) == 2
    assert "--bits" in capsys.readouterr().err


def test_cli_on_the_embedded_model(tmp_path, capsys, monkeypatch):
    out = tmp_path / "b"  # the code's name comes from the caller
    rc = cli.main(["bench", "--methods", "rtn", "--bits", "4", "--max-windows", "2",
                   "--commit", "abc1234", "--dirty", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    recs = json.loads((out / "bench.json").read_text())
    assert [r["method"] for r in recs] == ["float", "rtn"]
    model, tok = kvant.load_model("nanogpt")
    assert recs[0]["ppl"] == pytest.approx(kvant.evaluate(model, tok, max_windows=2)["ppl"],
                                           rel=1e-6)
    assert recs[0]["model"] == "nanogpt-shakespeare" and recs[0]["eval"]["windows"] == 2
    assert "| rtn | `rtn:bits=4` | 4 | g128 |" in text
    assert {(r["commit"], r["dirty"]) for r in recs} == {("abc1234", True)}
    assert cli.main(["bench", "embedded", "--methods", "rtn", "--bits", "4",
                     "--max-windows", "2", "--out", str(out)]) == 0
    assert "0 configs measured, 1 already in" in capsys.readouterr().err


def test_hf_llama_with_text_files(tmp_path):
    from hf_tiny import tiny_llama, tiny_tokenizer, text_sample

    d = tmp_path / "llama"
    tiny_llama(vocab=300, ctx=128, tied=True).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    (tmp_path / "calib.txt").write_text(text_sample(8000))
    (tmp_path / "eval.txt").write_text(text_sample(20000)[8000:])
    s = kb.BenchSettings(methods=("rtn", "awq"), bits=(4,), group_sizes=(32,), n_samples=4,
                         seq_len=32, calib=str(tmp_path / "calib.txt"),
                         eval=str(tmp_path / "eval.txt"), max_windows=4, device="cpu")
    res = bench(str(d), s, tmp_path / "b", show_progress=False)
    assert [r["method"] for r in res.records] == ["float", "rtn", "awq"]
    assert res.failed == 0 and res.records[0]["eval"]["dataset"] == "file eval.txt"
    assert res.records[2]["calib"]["source"] == str(tmp_path / "calib.txt")
    assert all(r["kl"] > 0 for r in res.records[1:])


def test_annotate_adds_fields_and_its_failure_is_the_rows_error(model_dir):
    from kvant.nn.qlinear import QuantLinear

    s = kb.BenchSettings(methods=("rtn", "gptq"), bits=(4,), group_sizes=(32,), **FAST)
    inputs = kr.prepare(str(model_dir), s)

    def annotate(cfg, model, report):
        if cfg.method == "gptq":
            raise RuntimeError("no extras for gptq")
        return {"quant_layers": sum(isinstance(m, QuantLinear) for m in model.modules()),
                "report_layers": len(report.layers)}

    recs = kr.run_grid(inputs, {"commit": "c0ffee0", "dirty": False}, annotate=annotate,
                       show_progress=False)
    rtn, gptq = recs[1:]
    # 2 blocks x (2 heads x key/query/value + proj + 2 feed-forward) = 18 Linears
    assert rtn["quant_layers"] == rtn["report_layers"] == 18 and "error" not in rtn
    assert gptq["error"] == "RuntimeError: no extras for gptq"
    assert all((r["commit"], r["dirty"]) == ("c0ffee0", False) for r in recs)


def test_the_library_runs_no_git():
    """/work/shared/DESIGN.md: the library runs no git; the stamp is passed in."""
    src = Path(kvant.__file__).parent
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if "import subprocess" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_nanogpt_tables_script_is_kvant_bench_in_the_tables_format(tmp_path, monkeypatch):
    """benchmarks/nanogpt_tables.py measures through kvant bench and keeps the tables' record
    format (RTN rows only: no calibration, so cheap)."""
    import sys

    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    import record
    import nanogpt_tables

    monkeypatch.setattr(record, "provenance",
                        lambda allow_dirty=False: {"commit": "abc1234", "dirty": False})
    argv = ["--methods", "gptq", "--rows", "rtn", "--grids", "4:128", "3:128",
            "--max-windows", "2", "--threads", str(torch.get_num_threads()),
            "--out", str(tmp_path)]
    assert nanogpt_tables.main(argv) == 0
    recs = json.loads((tmp_path / "gptq_nanogpt.json").read_text())
    assert [(r["method"], r["spec"]) for r in recs] == [
        ("float", None), ("rtn", "rtn:bits=4,group_size=128"), ("rtn", "rtn:bits=3,group_size=128")]
    assert {r["eval"] for r in recs} == {"validation split, seq_len 256, 510 chars, 2 windows"}
    assert all(r["commit"] == "abc1234" and r["device"].startswith("cpu-") for r in recs)
    model, tok = kvant.load_model("nanogpt")
    assert recs[0]["ppl"] == pytest.approx(kvant.evaluate(model, tok, max_windows=2)["ppl"],
                                           rel=1e-6)
    kvant.quantize(model, kvant.RTNConfig(bits=3, group_size=128), None,
                   kvant.EngineOptions(device="cpu", show_progress=False))
    ev = kvant.evaluate(model, tok, max_windows=2)
    w3 = recs[2]
    assert w3["ppl"] == pytest.approx(ev["ppl"], rel=1e-6)
    assert w3["bpc"] == pytest.approx(ev["bpc"], rel=1e-6) and w3["kl"] > 0
    assert (w3["calib"], w3["calib_seed"], w3["bits"], w3["group_size"]) == (None, 0, 3, 128)
    md = (tmp_path / "gptq_nanogpt.md").read_text()
    assert f"| 3 | g128 | {w3['ppl']:.4f} |" in md and "abc1234 cpu-" in md
    # a second seed reruns only calibrated rows: RTN rows are not measured again
    assert nanogpt_tables.main(argv + ["--seeds", "0", "1"]) == 0
    again = json.loads((tmp_path / "gptq_nanogpt.json").read_text())
    assert len(again) == 3 and again[1:] != recs[1:]  # replaced (timings differ), not added
    assert [r["ppl"] for r in again] == pytest.approx([r["ppl"] for r in recs], rel=1e-6)
    sys.modules.pop("nanogpt_tables", None)


def test_config_label_names_the_variant_options():
    """Rows of one method that differ in a variant option get different labels."""
    from kvant.bench import config_label
    from kvant.algorithms.registry import config_from_spec

    assert config_label(config_from_spec("gptq:bits=4,act_order=true")) == "gptq-actorder"
    assert config_label(config_from_spec("gptq:bits=4,sink_weight=128")) == "gptq-sink128"
    assert config_label(config_from_spec("quip:bits=3,sink_weight=2.5")) == "quip-sink2.5"
    assert config_label(config_from_spec("gptq:bits=4,sink_weight=128,sink_max_share=1")
                        ) == "gptq-sink128-share1"
    assert config_label(config_from_spec("awq:bits=4,rounding=gptq")) == "awq+gptq"
    assert config_label(config_from_spec("awq:bits=4,rounding=gptq,gptq_rescore=0")
                        ) == "awq+gptq-rescore0"
