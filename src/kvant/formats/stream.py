"""Streaming checkpoint writer with a resume record: block by block to disk, never twice.

While a model is quantized block by block, each finished block goes to its own shard in a
work directory next to the output, ``.<out>.partial/``, and a small progress record
(``progress.json``) says which blocks are done, for which run. A run that is killed (even by
SIGKILL) and started again with the same command finds the record and continues after the
last finished block; the finished checkpoint is byte-identical to an uninterrupted run's.

Per finished block ``i`` the writer (one background thread, so the disk overlaps the next
block's compute; at most one block in flight) writes, each to a temporary name and renamed:
1. ``model-<i+1>-of-<n+1>.safetensors``: the block's packed tensors;
2. ``inputs-<i>-rank<r>.safetensors``: the block's outputs, i.e. the next block's
   calibration inputs (absent for methods without calibration); named by block, so the
   record always finds the outputs of the block it names, whenever the run died;
3. ``progress.json``: ``done = i``, the module entries and report of every finished block,
   and the identity of the run (method config, source model, calibration tokens, engine
   options, number of ranks). Written last: a crash before it leaves the previous record
   valid, with its inputs file, and files of an unfinished block are simply written again.
   Inputs files of blocks before the recorded one are then removed.

Several processes (torch.distributed, one host): every rank quantizes with its share of the
calibration samples, so every rank saves the outputs of its own share (step 2, by rank, on
the calling thread), then all ranks agree that they did (kvant.calib.dist.agree: a rank
that failed stops them all) before rank 0, the only one that writes shards and records and
holds the output's lock, writes steps 1 and 3. A resumed run must have as many ranks.

:meth:`StreamWriter.finish` writes the tensors outside the blocks as the last shard and the
``config.json`` of the kvant format (docs/FORMAT.md), removes the progress files, and renames
the work directory to the output (kvant.formats.outdir: the same checks, lock and swap as
every kvant output; a second run on the same output fails at once).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvant.errors import OutputError
from kvant.formats import integrity, outdir
from kvant.formats.checkpoint import write_index

PROGRESS_VERSION = 2  # 2: inputs files named by block and rank


class StreamError(OutputError):
    """A streamed run cannot start or go on (another run's output, a locked output, disk)."""


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tensors(tensors: dict, path: Path) -> int:
    """safetensors file written under a temporary name, synced, renamed; returns its size."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def shard_name(i: int, n_files: int) -> str:
    """File name of shard ``i`` (0-based) of ``n_files``, as the whole-model writer names them."""
    return f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"


def inputs_name(i: int, rank: int) -> str:
    """File of the outputs of block ``i`` (the next block's inputs) of one rank's samples."""
    return f"inputs-{i:05d}-rank{rank}.safetensors"


def work_dir(out_dir: str | os.PathLike) -> Path:
    """Where a streamed run into ``out_dir`` writes until it finishes: ``.<name>.partial``."""
    out = Path(out_dir).expanduser().absolute()
    return out.parent / f".{out.name}.partial"


def finished_blocks(out_dir: str | os.PathLike) -> int:
    """How many blocks an interrupted streamed run into ``out_dir`` has finished (0 if none):
    what a rerun of the same command resumes after."""
    rec = work_dir(out_dir) / "progress.json"
    try:
        return int(json.loads(rec.read_text()).get("done", -1)) + 1
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


class StreamWriter:
    """Writes a kvant checkpoint block by block with a resume record (see module docs).

    ``identity``: JSON-able description of the run; a work directory holding another run's
    progress is refused. ``n_blocks``: decoder blocks of the model. ``on_written(i)``: called
    (on the writer thread of rank 0) once block ``i`` and its progress record are on disk.
    ``rank``/``world``: this process and the number of processes of a distributed run (every
    rank makes a writer; rank 0 writes the checkpoint, the others their inputs files).
    """

    def __init__(self, out_dir: str | os.PathLike, identity: dict, n_blocks: int,
                 overwrite: bool = False, sources=(), on_written=None, rank: int = 0,
                 world: int = 1):
        self.out = Path(out_dir).expanduser().absolute()
        self.work = work_dir(self.out)
        self._overwrite, self._sources = overwrite, tuple(sources)
        self._on_written = on_written
        self.identity = json.loads(json.dumps(identity, sort_keys=True))
        self.n_blocks = n_blocks
        self.n_files = n_blocks + 1
        self.rank, self.world = rank, world
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._held: contextlib.ExitStack | None = None
        self.record: dict = {}

    # ---- start / resume -------------------------------------------------------------
    def start(self) -> int:
        """Lock the output, check or create the progress record (rank 0; the other ranks
        then read it); returns the first block still to quantize (0 for a new run)."""
        ok, msg = True, ""
        if self.rank == 0:
            self._held = contextlib.ExitStack()
            try:
                # refuses outputs it may not replace, locks (reentrant: the CLI may hold it)
                self._held.enter_context(outdir.reserve(self.out, overwrite=self._overwrite,
                                                        sources=self._sources))
                self._start()
            except BaseException as e:
                self.close()
                if self.world == 1 or not isinstance(e, Exception):
                    raise
                ok, msg, err = False, str(e), e
        if self.world > 1:
            from kvant.calib import dist as kdist

            try:
                kdist.agree(ok, msg, "starting the streamed output")
            except kdist.DistributedError:
                if not ok:
                    raise err from None  # rank 0 raises its own error, the others the agreement's
                raise
            if self.rank:
                self.record = json.loads((self.work / "progress.json").read_text())
        return self.record["done"] + 1

    def _start(self) -> None:
        rec_path = self.work / "progress.json"
        if rec_path.is_file():
            try:
                rec = json.loads(rec_path.read_text())
            except json.JSONDecodeError as e:
                raise StreamError(f"progress record {rec_path} is unreadable ({e}); remove "
                                  f"{self.work} to start over") from None
            if rec.get("version") != PROGRESS_VERSION:
                raise StreamError(f"{rec_path} was written by another kvant version (progress "
                                  f"format {rec.get('version')}, this one reads "
                                  f"{PROGRESS_VERSION}): remove {self.work} to start over")
            if rec.get("identity") != self.identity or rec.get("n_blocks") != self.n_blocks:
                diff = sorted(k for k in set(rec.get("identity", {})) | set(self.identity)
                              if rec.get("identity", {}).get(k) != self.identity.get(k))
                raise StreamError(
                    f"{self.work} holds the progress of another run (different "
                    f"{', '.join(diff) or 'block count'}); resuming it with this command "
                    f"would mix two models: use another --out, or remove {self.work}")
            self.record = rec
        else:
            if self.work.exists():  # a work dir without a record: nothing finished yet
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True)
            self.record = {"version": PROGRESS_VERSION, "identity": self.identity,
                           "n_blocks": self.n_blocks, "done": -1, "files": {},
                           "digests": {}, "modules": {}, "report": {"layers": {}, "blocks": []}}
            _fsync_write(rec_path, json.dumps(self.record, sort_keys=True).encode())
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvant-writer")

    def saved_inputs(self) -> list[torch.Tensor] | None:
        """This rank's hidden states the next block reads (saved with the last finished
        block)."""
        done = self.record.get("done", -1)
        path = self.work / inputs_name(done, self.rank)
        if done < 0 or not path.is_file():
            return None
        state = load_file(str(path))
        return [state[f"hidden.{j}"] for j in range(len(state))]

    # ---- per block ------------------------------------------------------------------
    def _wait(self) -> None:
        if self._pending is not None:
            fut, self._pending = self._pending, None
            try:
                fut.result()
            except OSError as e:
                raise self._disk_error(e) from None

    def _disk_error(self, e: OSError) -> StreamError:
        return StreamError(
            f"writing to {self.work} failed: {e.strerror or e}; the progress record "
            f"still names block {self.record['done']} as the last finished one: "
            "free space (or fix the disk) and rerun the same command to resume")

    def block_done(self, i: int, tensors: dict[str, torch.Tensor], modules: dict,
                   report: dict, hidden: list[torch.Tensor] | None) -> None:
        """Hand block ``i``'s packed tensors (full names, CPU), its module entries, report
        entries and this rank's next-block inputs (or None) to the writer; called by every
        rank (only rank 0's tensors are written)."""
        self._wait()  # at most one block in flight: host memory stays bounded
        hid = None if hidden is None else {f"hidden.{j}": h.detach().cpu().contiguous()
                                           for j, h in enumerate(hidden)}
        if self.world > 1:  # every rank's inputs on disk before rank 0 records the block
            from kvant.calib import dist as kdist

            ok, msg = True, ""
            if hid is not None:
                try:
                    _save_tensors(hid, self.work / inputs_name(i, self.rank))
                except OSError as e:
                    ok, msg = False, str(self._disk_error(e))
            kdist.agree(ok, msg, f"saving the outputs of block {i}")
            hid = None
            self._drop_inputs(before=i - 1)  # the record names block i - 1 (or i) from now
            if self.rank:
                self.record["done"] = i
                return
        tensors = {n: t.detach().contiguous() for n, t in tensors.items()}
        self._pending = self._pool.submit(self._write_block, i, tensors, modules, report, hid)

    def _drop_inputs(self, before: int) -> None:
        """Remove this rank's inputs files of blocks before ``before``."""
        for p in self.work.glob(f"inputs-*-rank{self.rank}.safetensors"):
            if int(p.name.split("-")[1]) < before:
                p.unlink(missing_ok=True)

    def _write_block(self, i, tensors, modules, report, hid) -> None:
        name = shard_name(i, self.n_files)
        size = _save_tensors(tensors, self.work / name)
        if hid is not None:
            _save_tensors(hid, self.work / inputs_name(i, self.rank))
        rec = self.record
        rec["files"][name] = {"bytes": size, "tensors": sorted(tensors)}
        rec["digests"].update(integrity.tensor_digests(tensors))  # checksums, while in memory
        rec["modules"].update(modules)
        rec["report"]["layers"].update(report.get("layers", {}))
        rec["report"]["blocks"].extend(report.get("blocks", []))
        rec["done"] = i
        _fsync_write(self.work / "progress.json", json.dumps(rec, sort_keys=True).encode())
        if self.world == 1:
            self._drop_inputs(before=i)  # the other ranks drop theirs at the next block
        if self._on_written is not None:
            self._on_written(i)

    # ---- end ------------------------------------------------------------------------
    def finish(self, rest: dict[str, torch.Tensor], aliases: dict, model_type: str,
               model_config: dict, quantization_config: dict,
               extra_files: dict[str, bytes] | None = None,
               layer_losses: dict | None = None) -> Path:
        """Write the last shard, the extra files and config.json (with the checksums of
        every tensor and extra file), then move the checkpoint into place.
        ``quantization_config["modules"]``, if given, adds entries for quantized layers
        outside the blocks (lm_head); ``layer_losses`` is kept as save_checkpoint keeps it."""
        self._wait()
        if self.record["done"] != self.n_blocks - 1:
            raise StreamError(f"only {self.record['done'] + 1} of {self.n_blocks} blocks are "
                              "finished; the checkpoint cannot be completed")
        extra_files = extra_files or {}
        files = dict(self.record["files"])
        name = shard_name(self.n_blocks, self.n_files)
        rest = {n: t.detach().contiguous().cpu() for n, t in rest.items()}
        files[name] = {"bytes": _save_tensors(rest, self.work / name), "tensors": sorted(rest)}
        qc = dict(quantization_config)
        qc["modules"] = dict(sorted({**self.record["modules"],
                                     **qc.get("modules", {})}.items()))
        meta = {"model_type": model_type, "model_config": model_config,
                "quantization_config": qc, "files": dict(sorted(files.items())),
                "tied": aliases}
        if layer_losses:
            meta["layer_losses"] = dict(layer_losses)
        meta["integrity"] = integrity.seal(meta, rest, extra_files, self.record["digests"])
        for fname, data in extra_files.items():
            (self.work / fname).write_bytes(data)
        write_index(meta["files"], self.work)  # how transformers finds the shards
        _fsync_write(self.work / "config.json",
                     json.dumps(meta, indent=1, sort_keys=True).encode())
        for leftover in [*self.work.glob("inputs-*.safetensors"), self.work / "progress.json"]:
            leftover.unlink(missing_ok=True)  # every rank's inputs files are final by now
        outdir.install(self.work, self.out, "checkpoint")  # reserve() allowed replacing it
        self.close()
        return self.out

    def report(self) -> dict:
        """Layers and blocks of every finished block (those of earlier, resumed calls too)."""
        return self.record.get("report", {"layers": {}, "blocks": []})

    def close(self) -> None:
        """Stop the writer thread and release the lock (the progress stays for a resume)."""
        if self._pool is not None:
            try:
                self._wait()
            finally:
                self._pool.shutdown(wait=True)
                self._pool = None
        if self._held is not None:
            self._held.close()
            self._held = None
