"""Safe output directories: refuse what is not ours, lock, write aside, swap in, recover.

Every directory kvant writes (its checkpoints and its GPTQ/AWQ/compressed-tensors exports)
goes through :func:`replace_dir`:

1. :func:`check_output` refuses, before any work, an output that is an existing file or a
   symbolic link, the source model's directory (or one holding it), the current directory
   (or one holding it) and any non-empty directory that is not a kvant output. A kvant
   output (it holds the ``.kvant`` marker this module writes, or is a kvant checkpoint
   written before the marker existed) is replaced only with ``overwrite=True``, and only when
   it holds nothing but what kvant wrote there. An empty directory is fine.
2. :func:`reserve` takes an exclusive ``flock`` on ``<parent>/.<name>.lock`` (non-blocking:
   a second run on the same output fails at once, naming the process that holds it; the
   kernel drops the lock when its process dies, however it dies) and finishes the leftovers
   of an earlier crashed run (:func:`recover`).
3. The writer fills ``<parent>/.<name>.tmp-<id>``; the marker is added, every file is
   fsynced, then the old output is renamed to ``.<name>.old-<id>``, the new one to
   ``<name>``, and the old one to ``.<name>.del-<id>`` before it is deleted.

What a kill at any point can leave, and how :func:`recover` (run by the next save, by
``kvant.load_quantized`` and by ``kvant inspect``) finishes it, is written in docs/FORMAT.md.
A rename is atomic, so ``<name>`` and every ``.old-`` directory are always complete; ``.tmp-``
and ``.del-`` directories may be partial and are only ever deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
import uuid
from pathlib import Path

from kvant.errors import CheckpointError, OutputError

MARKER = ".kvant"
# files a kvant checkpoint or export written before the marker can hold (tokenizer files are
# whatever save_pretrained wrote)
_LEGACY_NAMES = ("config.json", "model-*.safetensors", "model.safetensors.index.json",
                 "quantize_config.json", "generation_config.json", "tokenizer*",
                 "special_tokens_map.json", "added_tokens.json", "chat_template*", "vocab*",
                 "merges.txt", "spiece.model")
_LEFTOVER_KINDS = ("tmp", "old", "del")
# lock files this process holds: path -> [fd, depth]; a nested reserve (the CLI holds the
# output for the whole run, the writer takes it again) reuses the descriptor, because a
# second flock on a new descriptor of the same file would fail even in the same process
_HELD: dict[str, list[int]] = {}


def _rename(src: Path, dst: Path) -> None:
    """One step of the swap (a single function, so tests can stop a run between steps)."""
    os.rename(src, dst)


def _kvant_entries(d: Path) -> tuple[bool, list[str] | None]:
    """(whether ``d`` is a kvant output, the entries kvant wrote there or None if unknown)."""
    marker = d / MARKER
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and info.get("writer") == "kvant":
            entries = info.get("entries")
            return True, entries if isinstance(entries, list) else None
    try:  # kvant checkpoints and GPTQ exports written before the marker existed
        meta = json.loads((d / "config.json").read_text())
        qc = meta.get("quantization_config") or {}
        legacy = qc.get("format") == "kvant" or qc.get("quantizer") == "kvant"
        shards = list(meta.get("files") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        return False, None
    if not legacy:
        return False, None
    # what those versions wrote: config, shards, the tokenizer's files; nothing else
    return True, [n for n in os.listdir(d) if n in shards or (d / n).is_file() and any(
        fnmatch.fnmatch(n, pat) for pat in _LEGACY_NAMES)]


def _local(path) -> Path | None:
    """``path`` resolved when it names something on this machine (not a hub id)."""
    if path is None or not str(path).strip():
        return None
    p = Path(path).expanduser()
    return p.resolve() if os.path.lexists(p) else None


def check_output(out_dir: str | os.PathLike, *, overwrite: bool = False,
                 sources=()) -> Path:
    """Raise :class:`OutputError` when ``out_dir`` may not be (re)placed; else return it,
    absolute. ``sources``: paths the run reads (the input model); they are never replaced."""
    if not str(out_dir).strip():
        raise OutputError("the output path is empty")
    p = Path(out_dir).expanduser()
    shown = str(out_dir)
    if p.is_symlink():
        raise OutputError(f"output {shown!r} is a symbolic link; give the directory itself")
    out = p.resolve()
    if out == Path(out.anchor):
        raise OutputError(f"output {shown!r} is the root directory")
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"output {shown!r} is an existing file, not a directory; "
                          "give a new directory")
    for src in sources:
        s = _local(src)
        if s is not None and (s == out or out in s.parents):
            raise OutputError(f"output {shown!r} is (or contains) the source model "
                              f"{str(src)!r}; write to another directory")
    ours, entries = _kvant_entries(out) if out.is_dir() else (False, None)
    cwd = Path.cwd().resolve()
    if (out == cwd or out in cwd.parents) and not ours:
        raise OutputError(f"output {shown!r} is the current directory (or contains it); "
                          "kvant replaces the whole output directory, give a new one")
    try:
        empty = not out.is_dir() or not any(out.iterdir())
    except OSError as e:
        raise OutputError(f"cannot read the output directory {shown!r}: {e.strerror}") from None
    if empty:
        return out
    if not ours:
        raise OutputError(f"output {shown!r} is a non-empty directory that kvant did not "
                          "write; refusing to replace it (give a new or empty directory)")
    if not overwrite:
        raise OutputError(f"output {shown!r} already holds a kvant output; pass "
                          "overwrite=True (CLI: --overwrite) to replace it")
    if entries is not None:
        foreign = sorted(set(os.listdir(out)) - set(entries))
        if foreign:
            raise OutputError(f"output {shown!r} holds files kvant did not write "
                              f"({', '.join(foreign[:3])}); move them or give another "
                              "directory")
    return out


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _try_lock(lock: Path) -> int | None:
    """An fd holding an exclusive flock on ``lock``, or None when another process holds it."""
    for _ in range(5):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # the previous holder unlinks the file before closing it: a lock won on that
        # unlinked file guards nothing, so open the path again
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise OutputError(f"could not take the lock {str(lock)!r} (it keeps being replaced)")


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def _locked(out: Path, what: str):
    """Hold the output's lock for the block (reentrant within this process)."""
    lock = _lock_path(out)
    key = str(lock)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    try:
        fd = _try_lock(lock)
    except OSError as e:  # permission denied, read-only file system
        raise OutputError(f"cannot create the lock file {key!r}: {e.strerror}") from None
    if fd is None:
        raise OutputError(f"{what} {str(out)!r} is being written by {_holder(lock)} (lock "
                          f"{key!r}); wait for it to finish or choose another output")
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        _HELD.pop(key)
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still locked: see _try_lock
        os.close(fd)


def leftovers(out: str | os.PathLike) -> dict[str, list[Path]]:
    """Hidden ``.<name>.tmp-*``, ``.old-*`` and ``.del-*`` siblings of ``out``, by kind."""
    out = Path(out).absolute()
    found: dict[str, list[Path]] = {k: [] for k in _LEFTOVER_KINDS}
    try:
        names = os.listdir(out.parent)
    except OSError:
        return found
    for kind in _LEFTOVER_KINDS:
        prefix = f".{out.name}.{kind}-"
        found[kind] = sorted(out.parent / n for n in names if n.startswith(prefix))
    return found


def _delete(d: Path, out: Path) -> None:
    """Rename ``d`` to a ``.del-`` name first, so a partly deleted tree is never mistaken
    for a complete old output, then delete it."""
    if not d.name.startswith(f".{out.name}.del-"):
        trash = out.parent / f".{out.name}.del-{uuid.uuid4().hex[:8]}"
        _rename(d, trash)
        d = trash
    shutil.rmtree(d, ignore_errors=True)


def recover(out: str | os.PathLike) -> list[str]:
    """Finish what a killed run left next to ``out`` (the caller holds the lock, so no live
    run owns them): delete ``.tmp-`` and ``.del-`` directories; put the newest ``.old-``
    directory back when ``out`` is missing, delete the others. Returns what was done."""
    out = Path(out).absolute()
    found = leftovers(out)
    done = []
    for d in found["tmp"] + found["del"]:
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"deleted the unfinished {d.name}")
    olds = sorted(found["old"], key=lambda d: d.stat().st_ctime)
    if olds and not os.path.lexists(out):
        _rename(olds.pop(), out)
        done.append(f"restored {out.name} from the interrupted swap")
    for d in olds:
        _delete(d, out)
        done.append(f"deleted the replaced {d.name}")
    return done


def recover_for_read(path: str | os.PathLike) -> list[str]:
    """Before reading ``path``: finish a crashed save's leftovers when no live run holds
    the lock. Returns what was done (empty when there was nothing to do)."""
    out = Path(path).absolute()
    if not any(leftovers(out).values()):
        return []
    lock = _lock_path(out)
    if str(lock) in _HELD:
        return recover(out)
    try:
        fd = _try_lock(lock)
    except (OSError, OutputError):
        fd = None  # a read-only place: read what is there
    if fd is None:
        if not os.path.lexists(out):
            raise CheckpointError(f"{str(path)!r} is being replaced by {_holder(lock)} or its "
                                  "leftovers cannot be recovered here (lock "
                                  f"{str(lock)!r}); try again when that run has finished")
        return []
    _HELD[str(lock)] = [fd, 1]
    try:
        return recover(out)
    finally:
        _HELD.pop(str(lock))
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def reserve(out_dir: str | os.PathLike, *, overwrite: bool = False, sources=(),
            what: str = "output"):
    """Check ``out_dir`` (:func:`check_output`), create its parent, take its lock, recover
    leftovers of crashed runs and check again; yield the absolute path. Hold it around a
    whole run (load, quantize, save) so a second run on the same output fails at once."""
    out = check_output(out_dir, overwrite=overwrite, sources=sources)
    created = [p for p in reversed(out.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the directory {str(out.parent)!r}: "
                          f"{e.strerror}") from None
    try:
        with _locked(out, what):
            recover(out)
            check_output(out_dir, overwrite=overwrite, sources=sources)
            yield out
    finally:
        if not out.exists():  # nothing was written: leave no empty parents behind
            for p in reversed(created):
                with contextlib.suppress(OSError):
                    p.rmdir()


def _fsync_tree(d: Path) -> None:
    for root, _dirs, files in os.walk(d):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replace_dir(out_dir: str | os.PathLike, *, overwrite: bool = False, sources=(),
                kind: str = "checkpoint"):
    """Yield an empty hidden directory to write into; when the block succeeds it becomes
    ``out_dir`` (see the module docstring); on any error it is deleted and ``out_dir`` is
    left as it was. ``kind`` is recorded in the marker (``"checkpoint"``, ``"gptq"``, ...)."""
    with reserve(out_dir, overwrite=overwrite, sources=sources) as out:
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            install(tmp, out, kind)
        finally:
            if tmp.exists():  # not moved into place (install raised): nothing to keep
                shutil.rmtree(tmp, ignore_errors=True)


def install(work: Path, out: Path, kind: str = "checkpoint") -> Path:
    """Move a finished directory ``work`` (written aside while holding the output's lock:
    :func:`replace_dir`, or the streaming writer) into place as ``out``: marker, fsync, the
    old output swapped out and deleted. The caller has checked ``out`` with
    :func:`reserve`; on failure the old output is put back."""
    entries = sorted(os.listdir(work)) + [MARKER]
    (work / MARKER).write_text(json.dumps({"writer": "kvant", "kind": kind,
                                           "entries": sorted(entries)}) + "\n")
    _fsync_tree(work)
    old = None
    try:
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            _rename(out, old)
        _rename(work, out)
    except OSError as e:
        if old is not None and not os.path.lexists(out):
            _rename(old, out)
        raise OutputError(f"could not move the new output into place at {str(out)!r}: "
                          f"{e.strerror}") from None
    _fsync_dir(out.parent)
    if old is not None:
        _delete(old, out)
    return out
