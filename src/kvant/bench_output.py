"""The output directory of ``kvant bench``: results written as they land, and resuming.

The directory holds ``bench.json`` (the records, per /work/shared/BENCHMARKS.md: one per
configuration, the float row first), ``bench.md`` (the table) and ``bench.png`` (the plot,
when matplotlib is installed), plus kvant's ``.kvant`` marker. Each file is replaced
atomically after every configuration, so an interrupted run keeps what it measured. Run
again with the same output and the configurations already there are skipped (those that
failed are tried again); the stored results must come from the same model (weights
fingerprint), the same calibration windows and the same evaluation windows, else the run is
refused before any work. A directory kvant bench did not write is never written into
(kvant.formats.outdir: the output's lock is held for the whole run).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvant.algorithms.registry import config_from_dict
from kvant.bench import BenchSettings, config_key, settings_dict
from kvant.bench_run import prepare, run_grid
from kvant.errors import InputError, OutputError
from kvant.eval.bench_report import markdown_report, plot_bench, write_text_atomic
from kvant.eval.plot import can_plot
from kvant.eval.table import write_json
from kvant.formats.outdir import MARKER, reserve

FILES = ("bench.json", "bench.md", "bench.png")
# what the marker says kvant wrote here (temporary files of an interrupted write included)
ENTRIES = sorted([MARKER, *FILES, *(f + ".tmp" for f in FILES)])


@dataclass
class BenchResult:
    """What :func:`bench` did: every record (stored and new), the files, the counts."""

    records: list[dict]
    out: Path
    plot: Path | None
    ran: int
    skipped: int
    failed: int


def _is_bench_dir(d: Path) -> bool:
    try:
        info = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("writer") == "kvant" and info.get("kind") == "bench"


def check_bench_output(out_dir: str | os.PathLike) -> Path:
    """Refuse (:class:`OutputError`) an output that exists and is not an empty directory or
    one kvant bench wrote; return the path."""
    out = Path(out_dir).expanduser()
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"bench output {str(out_dir)!r} is an existing file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_bench_dir(out):
        raise OutputError(f"bench output {str(out_dir)!r} is a non-empty directory that "
                          "kvant bench did not write; give a new or empty directory (or the "
                          "output of an earlier kvant bench run to resume it)")
    return out


def read_stored(out: Path) -> list[dict]:
    """The records of an earlier run in ``out`` ([] when there are none)."""
    path = out / "bench.json"
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())
    except ValueError as e:
        raise OutputError(f"{path} is not valid JSON ({e}); move it away to start over") from None
    if (not isinstance(records, list) or not all(isinstance(r, dict) for r in records)
            or not any(r.get("method") == "float" for r in records)):
        raise OutputError(f"{path} is not a kvant bench result (a list of records with a "
                          "float row); move it away to start over")
    return records


def record_key(r: dict) -> str:
    """The key of a stored record, the same as :attr:`kvant.bench.GridItem.key`. The stored
    config is read back through its class first, so a field kvant added since (at its
    default, which keeps the earlier behaviour) does not make it another configuration."""
    if not r.get("config"):
        return "spec:" + str(r.get("spec"))
    try:
        return config_key(config_from_dict(r["config"]).to_dict())
    except ValueError:  # a field this kvant no longer has: only an equal dict matches
        return config_key(r["config"])


def check_same_setup(stored: list[dict], inputs, path: Path) -> None:
    """Raise :class:`InputError` unless ``stored`` was measured on the same model, eval
    windows and calibration windows as ``inputs`` (:class:`kvant.bench_run.BenchInputs`)."""
    base = next(r for r in stored if r.get("method") == "float")
    fp, now = base.get("model_fingerprint"), inputs.model_desc["model_fingerprint"]
    if fp != now:
        raise InputError(f"{path} holds results of another model ({base.get('model')}, "
                         f"weights {str(fp)[:12]}) than {inputs.model_desc['model']} (weights "
                         f"{now[:12]}): give another --out")
    keys = ("dataset", "seq_len", "windows", "tokens", "digest")
    old = {k: (base.get("eval") or {}).get(k) for k in keys}
    new = {k: inputs.eval_desc.get(k) for k in keys}
    if old != new:
        diff = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in keys if old[k] != new[k])
        raise InputError(f"{path} was evaluated on other windows ({diff}): use the same eval "
                         "settings to resume, or give another --out")
    calibs = [r["calib"] for r in stored if r.get("calib")]
    if calibs and inputs.calib_desc is not None:
        keep = ("n_samples", "seq_len", "seed", "digest")
        if any({k: c.get(k) for k in keep} != {k: inputs.calib_desc.get(k) for k in keep}
               for c in calibs):
            raise InputError(f"{path} was calibrated on other windows (stored "
                             f"{json.dumps({k: calibs[0].get(k) for k in keep})}, now "
                             f"{json.dumps({k: inputs.calib_desc.get(k) for k in keep})}): use "
                             "the same calibration settings to resume, or give another --out")


def add_record(records: list[dict], r: dict) -> None:
    """Put ``r`` into ``records`` in place: a float row only when there is none (a stored
    float row stays the reference of the table), a row of a stored key in that row's place
    (a failed configuration tried again), any other row at the end."""
    if r.get("method") == "float":
        if not any(x.get("method") == "float" for x in records):
            records.insert(0, r)
        return
    k = record_key(r)
    for i, x in enumerate(records):
        if x.get("method") != "float" and record_key(x) == k:
            records[i] = r
            return
    records.append(r)


def write_report(records: list[dict], out: Path, plot: bool = True) -> Path | None:
    """Write bench.json and bench.md (and bench.png when ``plot`` and matplotlib is
    installed); return the plot's path or None."""
    write_json(records, out / "bench.json")
    title = f"kvant bench: {records[0]['model']}"
    write_text_atomic(out / "bench.md", markdown_report(records, title))
    if not (plot and can_plot()):
        return None
    plot_bench(records, out / "bench.png", title)
    return out / "bench.png"


def bench(model_source: str | os.PathLike | None, settings: BenchSettings,
          out_dir: str | os.PathLike, *, stamp: dict | None = None,
          on_record: Callable[[dict], None] | None = None,
          show_progress: bool = True) -> BenchResult:
    """Run :class:`kvant.bench.BenchSettings`'s grid on a model and write the results into
    ``out_dir`` (see the module docstring), skipping configurations already there.

    stamp: ``commit`` / ``dirty`` recorded with every row, as the caller knows them (the
        library runs no git; the CLI takes ``--commit`` / ``--dirty``).
    on_record(record): called after each newly measured record (float row included).
    """
    out = check_bench_output(out_dir)
    with reserve(out, overwrite=True, what="bench output") as out:
        stored = read_stored(out)  # a broken bench.json is refused before loading anything
        inputs = prepare(model_source, settings)
        if stored:
            check_same_setup(stored, inputs, out / "bench.json")
        done = {record_key(r) for r in stored if "error" not in r and r.get("method") != "float"}
        todo = [it for it in inputs.items if it.key not in done]
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / MARKER, json.dumps({"writer": "kvant", "kind": "bench",
                                                    "entries": ENTRIES}) + "\n")
        if not todo and stored:
            plot = write_report(stored, out)
            return BenchResult(stored, out, plot, 0, len(inputs.items), _failed(stored))
        base = next((r for r in stored if r.get("method") == "float"), None)
        records = list(stored)

        def land(r: dict) -> None:  # every record is on disk before the next one starts
            add_record(records, r)
            write_report(records, out, plot=False)
            if on_record:
                on_record(r)

        run_grid(inputs, stamp, done, land, show_progress,
                 float_ppl=base["ppl"] if base else None,
                 extra={"settings": settings_dict(settings)})
        plot = write_report(records, out)
        return BenchResult(records, out, plot, len(todo), len(inputs.items) - len(todo),
                           _failed(records))


def _failed(records: list[dict]) -> int:
    return sum("error" in r for r in records)
