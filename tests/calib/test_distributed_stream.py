"""Streaming quantization across two processes (gloo on CPU): rank 0 writes the checkpoint,
every rank keeps its share of the activations, a SIGKILL mid-run resumes byte-identically,
and a resume with another number of processes is refused. Workers: tests/dist_worker.py."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

import kvant
from kvant.formats.stream import StreamError

from test_distributed import WORLD, _start, _wait

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from hf_tiny import save_sharded_llama

    return save_sharded_llama(tmp_path_factory.mktemp("src") / "m", layers=4)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def _run(out: Path, src: Path, *extra: str) -> list[str]:
    outs = _wait(_start("stream", out, str(src), *extra), timeout=180)
    return [(out / f"rank{r}.txt").read_text() if (out / f"rank{r}.txt").exists()
            else f"no message (rc {outs[r][0]}): {outs[r][1][-2000:]}" for r in range(WORLD)]


def _codes(model) -> dict:
    from kvant.nn.qlinear import QuantLinear

    return {n: m.qweight for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_two_processes_stream_what_one_does(llama_dir, tmp_path):
    import dist_worker as w

    two = tmp_path / "two"
    two.mkdir()
    assert _run(two, llama_dir) == ["ok 28", "ok 28"]
    assert sorted(p.name for p in (two / "q").iterdir() if "inputs" in p.name) == []
    assert not list(two.glob(".q.partial"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w.streamed(str(llama_dir), str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    a, _ = kvant.load_quantized(two / "q")
    b, _ = kvant.load_quantized(tmp_path / "one")
    ca, cb = _codes(a), _codes(b)
    same = sum(torch.equal(ca[n], cb[n]) for n in ca)
    assert len(ca) == 28 and same >= 25, same  # float64 Hessians: identical but for ties
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert (la - lb).norm() / lb.norm() < 1e-3


def test_sigkill_of_rank_0_then_resume_is_byte_identical(llama_dir, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    assert _run(ref, llama_dir) == ["ok 28", "ok 28"]
    run = tmp_path / "run"
    run.mkdir()
    msgs = _run(run, llama_dir, "1")  # rank 0 dies once block 1 is recorded
    assert msgs[0].startswith("no message") and msgs[1].startswith("DistributedError"), msgs
    work = run / ".q.partial"
    record = json.loads((work / "progress.json").read_text())
    assert record["done"] == 1 and record["identity"]["processes"] == 2
    # each rank's share of block 1's outputs is there to resume from (block 0's go at the
    # next block, once every rank is past it)
    assert {"inputs-00001-rank0.safetensors", "inputs-00001-rank1.safetensors"} <= {
        p.name for p in work.glob("inputs-*")}
    for r in range(WORLD):
        (run / f"rank{r}.txt").unlink(missing_ok=True)
    assert _run(run, llama_dir) == ["ok 28", "ok 28"]
    assert _digest(run / "q") == _digest(ref / "q")
    # one process cannot continue a two-process record
    (run / "q").rename(run / "done")
    _run(run, llama_dir, "0")  # a new two-process run, killed after block 0
    import dist_worker as w

    with pytest.raises(StreamError, match="another run .different processes"):
        w.streamed(str(llama_dir), str(run / "q"))


def test_cli_streams_under_torchrun(llama_dir, tmp_path):
    outs = _wait(_start("cli", tmp_path, str(llama_dir)), timeout=180)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(WORLD)] == ["rc 0"] * 2, \
        [log[-2000:] for _, log in outs]
    cfg = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert len(cfg["files"]) == 5  # one shard per block + the rest: it streamed
    model, _ = kvant.load_quantized(tmp_path / "cli")
    assert len(_codes(model)) == 28
