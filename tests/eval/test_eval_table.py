"""Result tables (kvant.eval.table), the optional plot, the demo without matplotlib, and the
benchmarks' record of the code that made a result (benchmarks/record.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import kvant.demo
from kvant.eval import plot as plot_mod
from kvant.eval.table import group_label, markdown_table, write_json

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "benchmarks").is_dir())
sys.path.insert(0, str(ROOT / "benchmarks"))
import record  # noqa: E402  (benchmarks/record.py)

RECORDS = [{"method": "float", "ppl": 4.0, "size_mb": 20.0},
           {"method": "rtn", "bits": 3, "group_size": 128, "bits_per_weight": 3.194,
            "size_mb": 4.58, "ppl": 4.2, "quant_seconds": 1.25, "commit": "abc1234",
            "dirty": False, "device": "cpu-2core"}]


def test_group_label():
    assert [group_label(g) for g in (None, -1, 0, 64)] == ["-", "channel", "tensor", "g64"]


def test_markdown_table_rows_and_note_column():
    md = markdown_table(RECORDS, "t")
    assert "| rtn | 3 | g128 | 3.194 | 4.58 | 4.200 | +5.0 | 1.2 |" in md
    noted = markdown_table(RECORDS, note=("code", lambda r: r.get("commit", "-")))
    assert noted.splitlines()[0].endswith("| code |")
    assert noted.splitlines()[-1].endswith("| 1.2 | abc1234 |")


def test_write_json_round_trip(tmp_path):
    write_json(RECORDS, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == RECORDS
    assert not (tmp_path / "r.json.tmp").exists()


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert not plot_mod.can_plot()
    with pytest.raises(ImportError, match=r"pip install kvant\[plot\]"):
        plot_mod.plot_ppl_vs_bits(RECORDS, tmp_path / "p.png", "t")


def test_demo_without_matplotlib_writes_tables_and_says_why_no_plot(monkeypatch, tmp_path):
    monkeypatch.setattr(kvant.demo, "can_plot", lambda: False)
    records = kvant.demo.run_demo(tmp_path, ["rtn:bits=4,group_size=128"], windows=1)
    assert [r["method"] for r in records] == ["float", "rtn"]
    assert json.loads((tmp_path / "report.json").read_text())[1]["bits"] == 4
    assert "pip install kvant[plot]" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "report.png").exists()


def test_stamp_and_provenance_note():
    a = {"commit": "abc1234", "dirty": False, "device": "cpu-2core"}
    b = {"commit": "def5678", "dirty": True, "device": "NVIDIA H200"}
    assert record.stamp(a) == "abc1234 cpu-2core"
    assert record.stamp(b) == "def5678+dirty NVIDIA H200"
    assert record.stamp({}) == "unknown+? ?"
    assert record.provenance_note([a, dict(a)]) == ("Code and device: abc1234 cpu-2core "
                                                    "(all rows).", False)
    assert record.provenance_note([a, b])[1] is True


def _git(root, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root,
                   check=True, capture_output=True)


def test_dirty_paths_ignore_results_only(tmp_path):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "t.json").write_text("[]")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "c")
    assert record.dirty_paths(tmp_path) == []
    (tmp_path / "benchmarks" / "results" / "t.json").write_text("[1]")
    (tmp_path / "new_untracked.py").write_text("")
    assert record.dirty_paths(tmp_path) == []  # results and untracked files do not count
    (tmp_path / "code.py").write_text("x = 2\n")
    assert record.dirty_paths(tmp_path) == ["code.py"]


def test_provenance_refuses_dirty_without_allow(monkeypatch):
    monkeypatch.setattr(record, "dirty_paths", lambda root=record.ROOT: ["src/kvant/x.py"])
    with pytest.raises(record.DirtyTree, match="src/kvant/x.py.*--allow-dirty"):
        record.provenance()
    assert record.provenance(allow_dirty=True)["dirty"] is True
    monkeypatch.setattr(record, "dirty_paths", lambda root=record.ROOT: None)  # no git
    monkeypatch.setenv("KVANT_COMMIT", "abc1234")
    monkeypatch.setenv("KVANT_DIRTY", "0")
    monkeypatch.setattr(record, "_git", lambda *a, **k: None)
    assert record.provenance() == {"commit": "abc1234", "dirty": False}


def test_nanogpt_tables_keep_every_stored_configuration():
    """benchmarks/nanogpt_layouts.py holds the rows the four former scripts ran: every stored
    row of the four tables is one of them (same label, same spec string)."""
    from nanogpt_layouts import TABLES

    for table in TABLES.values():
        folder = record.RESULTS if table.headline else record.ARCHIVE
        stored = json.loads((folder / f"{table.name}.json").read_text())
        rows = set(table.rows + table.optional)
        assert len(rows) == len(table.rows + table.optional)  # no row twice
        missing = [(r["method"], r["spec"]) for r in stored if r["method"] != "float"
                   and (r["method"], r["spec"]) not in rows]
        assert not missing, (table.name, missing)
    assert len(TABLES["gptq"].rows) == 21 and len(TABLES["spqr"].rows) == 17
