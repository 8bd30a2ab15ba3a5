"""``import kvant`` does not import transformers, yet kvant is registered with transformers
whichever of the two is imported first (kvant.formats.hf_hook). Fresh interpreters: the
test process has imported both long ago."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SRC = str(Path(__file__).resolve().parents[2] / "src")

CHECK = """
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
print("registered", "kvant" in AUTO_QUANTIZER_MAPPING, "hf" in CONFIG_MAPPING)
"""


def _run(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {SRC!r})\n"
                        + code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_kvant_first_then_transformers():
    out = _run("""
import importlib.util, sys
import kvant
print("eager", "transformers" in sys.modules)
assert importlib.util.find_spec("transformers") is not None  # a check alone registers nothing
print("after find_spec", "transformers" in sys.modules)
import transformers
print("loader", type(transformers.__spec__.loader).__name__)
print("hooks left", sum(type(f).__name__ == "_TransformersImportHook" for f in sys.meta_path))
""" + CHECK)
    assert "eager False" in out and "after find_spec False" in out
    assert "loader SourceFileLoader" in out and "hooks left 0" in out
    assert "registered True True" in out


def test_transformers_first_then_kvant():
    out = _run("import sys, transformers, kvant\n" + CHECK + """
print("hooks", sum(type(f).__name__ == "_TransformersImportHook" for f in sys.meta_path))
""")
    assert "registered True True" in out and "hooks 0" in out
