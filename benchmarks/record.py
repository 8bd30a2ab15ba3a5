"""Where a benchmark result came from: the code (commit, dirty), the device, the date.

This is the lab's half of the records (the library's half, tables and JSON, is
``kvant.eval.table``). It runs git, so it lives here and not in ``src/kvant``.

A result names the code that made it: ``commit`` is the checkout's HEAD and ``dirty`` is true
when tracked files other than ``benchmarks/results/`` differ from it (``git status
--porcelain``), so a dirty record's numbers may come from code no commit holds.
:func:`provenance` refuses a dirty tree unless the script was given ``--allow-dirty``.
A copy of the tree on a device machine names its code with the environment variables
``KVANT_COMMIT`` and ``KVANT_DIRTY`` (``0``/``1``), set by the script that copied it; when
set they win over git, because such a copy can carry a stale ``.git`` of an earlier commit
(on 2026-12-02 a device copy's git said 82a0bf5+dirty for code that was e8d173b, clean).
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository
RESULTS = Path(__file__).resolve().parent / "results"  # the headline tables
ARCHIVE = RESULTS / "archive"  # experiments and the tables the README does not lead with


class DirtyTree(RuntimeError):
    """Recording from uncommitted code without ``--allow-dirty``."""


def device_name(device: str | torch.device | None = None) -> str:
    """Exact device name: the CUDA card's name, or ``cpu-<n>core``."""
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return f"cpu-{os.cpu_count()}core"


def today() -> str:
    """ISO date (UTC)."""
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root,
                              timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str:
    """``KVANT_COMMIT`` when set (the script that copied the tree names its code: a device
    copy may hold a stale .git of an earlier commit), else the short hash of HEAD, else
    'unknown'."""
    if os.environ.get("KVANT_COMMIT"):
        return os.environ["KVANT_COMMIT"]
    out = _git("rev-parse", "--short", "HEAD")
    if out and out.strip():
        return out.strip()
    return "unknown"


def dirty_paths(root: Path = ROOT) -> list[str] | None:
    """Tracked files that differ from HEAD, outside benchmarks/results/ (None: no git)."""
    out = _git("status", "--porcelain", "--untracked-files=no", root=root)
    if out is None:
        return None
    paths = [line[3:] for line in out.splitlines() if line.strip()]
    return [p for p in paths if not p.startswith("benchmarks/results/")]


def tree_dirty() -> bool | None:
    """True when the code differs from its commit: ``KVANT_DIRTY`` when set (with
    ``KVANT_COMMIT``, see :func:`git_commit`), else git's status; None when nothing says."""
    flag = os.environ.get("KVANT_DIRTY")
    if flag is not None and os.environ.get("KVANT_COMMIT"):
        return flag not in ("0", "false", "")
    paths = dirty_paths()
    if paths is not None:
        return bool(paths)
    return None if flag is None else flag not in ("0", "false", "")


def provenance(allow_dirty: bool = False) -> dict:
    """``{"commit", "dirty"}`` for every record of this run; raises :class:`DirtyTree` when
    the tree is dirty (or unknown) and ``allow_dirty`` is false."""
    dirty = tree_dirty()
    if dirty is not False and not allow_dirty:
        paths = dirty_paths()
        what = ("differs from HEAD in " + ", ".join(paths[:5]) if paths else
                "is marked dirty by KVANT_DIRTY") if dirty else "has no git and no KVANT_DIRTY"
        raise DirtyTree(f"the tree {what}: commit first, or pass --allow-dirty to record "
                        "results marked dirty")
    return {"commit": git_commit(), "dirty": dirty}


def provenance_or_exit(allow_dirty: bool = False) -> dict:
    """:func:`provenance` for a script's main: a dirty tree ends it with one line, exit 2."""
    try:
        return provenance(allow_dirty)
    except DirtyTree as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def stamp(r: dict) -> str:
    """'<commit>[+dirty] <device>' of a record ('?' for what it does not say)."""
    dirty = r.get("dirty")
    mark = "+dirty" if dirty else ("" if dirty is False else "+?")
    return f"{r.get('commit', 'unknown')}{mark} {r.get('device', '?')}"


def provenance_note(records: list[dict]) -> tuple[str, bool]:
    """(a sentence naming the code and device of ``records``, whether rows differ).

    When every row shares one commit, dirty flag and device the sentence names them; else it
    says that rows differ and the table must carry :func:`stamp` per row."""
    stamps = sorted({stamp(r) for r in records})
    if len(stamps) == 1:
        return f"Code and device: {stamps[0]} (all rows).", False
    return ("Rows come from different code or devices (" + "; ".join(stamps) +
            "): each row names its own in the last column."), True


if __name__ == "__main__":  # the code's names for a device copy: KVANT_COMMIT=.. KVANT_DIRTY=..
    print(f"KVANT_COMMIT={git_commit()} KVANT_DIRTY={int(tree_dirty() is not False)}")
