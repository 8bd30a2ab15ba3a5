"""Quantization across several processes through ``torch.distributed`` (``torchrun``).

When a process group of more than one rank is initialised (NCCL on GPUs, gloo on CPU), the
engine (:mod:`kvant.calib.engine`) runs every rank through the same blocks with:

- **sharded calibration**: rank r keeps the contiguous slice ``[r n / W, (r + 1) n / W)`` of
  the n calibration samples (:func:`shard_calibration`) and pushes only those through the
  blocks; each rank's block outputs feed its own next block;
- **reduced statistics**: every layer quantizer exposes what it accumulated as means over a
  count of observed rows (``LayerQuantizer.state_for_reduce``); the sums ``mean * count`` of
  all ranks are added on the rank that owns the layer and divided by the total count, so the
  result is the mean over all n samples, as in one process, up to floating-point order;
- **layers solved in parallel**: the layers of a sequential group are assigned to ranks by a
  deterministic balanced split of their estimated cost (:func:`assign_layers`); each owner
  quantizes its layers and broadcasts the :class:`LayerResult` (tensors by ``broadcast``, the
  rest as one gathered object), so every rank installs the same packed layers and reports
  the same losses;
- **agreement before anything is kept**: a failure while observing or quantizing on one rank
  is gathered and every rank raises a :class:`DistributedError` naming it; a rank that dies
  closes its connections (or stops answering until the group's timeout) and the others raise
  a :class:`DistributedError` too. :func:`on_rank0` (used by ``save_quantized``) writes only
  after every rank has reported ready, on rank 0, and tells every rank the outcome.

Nothing is initialised implicitly: :func:`init_distributed` joins the group torchrun set up
(the CLI calls it when given ``--distributed``).
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from kvant.algorithms.base import LayerQuantizer
from kvant.core.result import LayerResult
from kvant.errors import KvantError
from kvant.formats.integrity import tensor_digest

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(KvantError):
    """Another rank failed, died, stopped answering, or disagrees with this one."""


def init_distributed(device: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     local_rank: int | None = None) -> bool:
    """Join the process group that ``torchrun`` set up (torch's ``env://`` rendezvous reads
    the rank, world size and master address torchrun provides); returns True when a group
    of more than one rank is active afterwards. Call it only in a process torchrun started:
    elsewhere it raises a :class:`DistributedError` saying so.

    The backend is NCCL when ``device`` is CUDA (or None and CUDA is present), else gloo.
    ``local_rank``: the CUDA device of this rank on its host (torchrun's ``LOCAL_RANK``;
    None: the global rank modulo the host's device count, right for one host).
    ``timeout_s``: how long a rank waits for the others in one collective before it gives
    up with a :class:`DistributedError`.
    """
    if dist.is_available() and dist.is_initialized():
        return active()
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    want_cuda = (torch.device(device).type == "cuda" if device is not None
                 else torch.cuda.is_available())
    try:
        dist.init_process_group("nccl" if want_cuda else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
    except ValueError as e:  # torch names the rendezvous variable it misses
        raise DistributedError(f"cannot join a process group ({_first_line(e)}): launch "
                               "with torchrun --nproc-per-node N") from None
    if want_cuda:
        n = torch.cuda.device_count()
        local = dist.get_rank() % max(n, 1) if local_rank is None else local_rank
        if not 0 <= local < n:
            raise DistributedError(f"rank {dist.get_rank()} wants cuda:{local} but this "
                                   f"machine has {n} CUDA device(s)")
        torch.cuda.set_device(local)
    return active()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of ranks (1 without a group)."""
    return dist.get_world_size() if active() else 1


def comm_device() -> torch.device:
    """Where tensors must be for collectives: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def _collective(what: str):
    """Turn the backend's error of a broken or silent group into one clear line."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:  # DistBackendError and gloo's errors are RuntimeErrors
        first = _first_line(e)
        raise DistributedError(
            f"rank {dist.get_rank()}: lost the other ranks while {what} (another rank "
            f"failed or was killed, or none answered within the group's timeout; see its "
            f"error): {first}") from None


def agree(ok: bool, message: str, what: str, payload=None) -> list:
    """Every rank reports whether it succeeded (``message`` says why not) and returns the
    list of every rank's ``payload``; if any rank failed, every rank raises a
    :class:`DistributedError` naming the first failed rank and its message."""
    out = [None] * dist.get_world_size()
    with _collective(what):
        dist.all_gather_object(out, (ok, message, payload))
    for r, (r_ok, r_msg, _) in enumerate(out):
        if not r_ok:
            raise DistributedError(f"rank {r} failed while {what}: {r_msg}")
    return [p for _, _, p in out]


def check_same(value, what: str) -> None:
    """Raise on every rank unless every rank passes an equal ``value`` (pickle-able)."""
    values = agree(True, "", f"comparing {what}", value)
    if any(v != values[0] for v in values):
        raise DistributedError(f"the ranks disagree on {what}: {values}; every rank must "
                               "run the same command on the same model and data")


def check_supported(method, device: torch.device) -> None:
    """Refuse, before any work, what cannot yet run across several processes (or a compute
    device other than this rank's GPU under NCCL)."""
    if not active():
        return
    if dist.get_backend() == "nccl" and (device.type != "cuda" or device.index not in (
            None, torch.cuda.current_device())):
        raise DistributedError(f"rank {dist.get_rank()} would compute on {device}, not on its "
                               f"own GPU cuda:{torch.cuda.current_device()}: under torchrun "
                               "pass --device cuda (each rank takes cuda:LOCAL_RANK)")
    if not getattr(method, "supports_distributed", False):
        raise DistributedError(f"{method.config.method} across several processes is not "
                               "supported yet; run it in one process")
    check_same(method.config.to_dict(), "the method config")


def shard_range(n: int, r: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank r's contiguous, near-equal share of n items."""
    return r * n // world, (r + 1) * n // world


def shard_calibration(calib: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the calibration samples (n, seq_len); all of them in one process.

    Every rank must hold the same calibration set (checked by a digest) and at least one
    sample of it."""
    if not active():
        return calib
    world = dist.get_world_size()
    check_same(tensor_digest(calib), "the calibration samples")
    if len(calib) < world:
        raise DistributedError(f"{len(calib)} calibration samples cannot be split over "
                               f"{world} processes; use at least {world}")
    start, stop = shard_range(len(calib), dist.get_rank(), world)
    return calib[start:stop]


def layer_cost(shape: tuple[int, int]) -> float:
    """Estimated solve cost of a Linear with weight (N, K): GPTQ inverts a (K, K) Hessian
    (K³) and walks K columns updating an (N, K) matrix (N K²)."""
    n, k = shape
    return float(k) * k * (k + n)


def assign_layers(costs: dict[str, float], world: int) -> dict[str, int]:
    """A deterministic balanced assignment layer -> rank: the most expensive layer first,
    each to the rank with the least work so far (ties: lower rank; equal costs keep the
    order of ``costs``)."""
    load = [0.0] * world
    owner = {}
    names, values = list(costs), list(costs.values())
    for i in sorted(range(len(names)), key=lambda i: (-values[i], i)):
        r = min(range(world), key=lambda j: (load[j], j))
        owner[names[i]] = r
        load[r] += costs[names[i]]
    return {n: owner[n] for n in names}


def _reduce_statistics(quantizers: dict[str, LayerQuantizer], owners: dict[str, int],
                       counts: dict[str, int], states: dict, prefix: str) -> None:
    """Sum each layer's ``mean * count`` on its owner and load the global mean there."""
    me, dev = dist.get_rank(), comm_device()
    for name, owner in owners.items():
        state = states[name]
        if state is None:
            continue
        total = counts[name]
        local, n = state
        reduced = {}
        for key in sorted(local):
            t = local[key]
            home = t.device
            t = t.to(dev)
            t.mul_(n)  # the local sum of what was averaged
            with _collective(f"reducing the statistics of {prefix}{name}"):
                dist.reduce(t, dst=owner)
            if me == owner:
                reduced[key] = (t.div_(total) if total else t).to(home)
        if me == owner:
            quantizers[name].load_reduced(reduced, total)


def _tensors(res: LayerResult) -> list[tuple[str, str | None, torch.Tensor]]:
    """(field, extras key or None, tensor) of every tensor a result holds, in a fixed order."""
    out = [(f, None, getattr(res, f)) for f in ("qweight", "scales", "zeros", "g_idx")]
    out += [("extras", k, v) for k, v in res.extras.items()]
    return [(f, k, t) for f, k, t in out if torch.is_tensor(t)]


def _result_meta(res: LayerResult) -> dict:
    """Everything of a result but its tensors, plus the shape, dtype and side of each."""
    return {"bits": res.bits, "group_size": res.group_size, "loss": res.loss,
            "layer_kind": res.layer_kind,
            "info": {k: v.cpu() if torch.is_tensor(v) else v for k, v in res.info.items()},
            "plain_extras": {k: v for k, v in res.extras.items() if not torch.is_tensor(v)},
            "tensors": [(f, k, tuple(t.shape), t.dtype, t.device.type == "cpu")
                        for f, k, t in _tensors(res)]}


def _broadcast_result(name: str, res: LayerResult | None, meta: dict, src: int) -> LayerResult:
    """The owner's result (``res`` there, None elsewhere) on every rank; tensors go by
    ``broadcast`` and come back on the CPU where the owner had them there."""
    dev = comm_device()
    sent = {(f, k): t for f, k, t in _tensors(res)} if res is not None else {}
    fields: dict = {"g_idx": None}
    extras = dict(meta["plain_extras"])
    for f, k, shape, dtype, on_cpu in meta["tensors"]:
        t = (sent[(f, k)].to(dev).contiguous() if res is not None
             else torch.empty(shape, dtype=dtype, device=dev))
        if t.numel():
            with _collective(f"sending the quantized {name}"):
                dist.broadcast(t, src=src)
        t = t.cpu() if on_cpu else t
        if f == "extras":
            extras[k] = t
        else:
            fields[f] = t
    return LayerResult(fields["qweight"], fields["scales"], fields["zeros"], meta["bits"],
                       meta["group_size"], g_idx=fields["g_idx"], extras=extras,
                       loss=meta["loss"], info=meta["info"], layer_kind=meta["layer_kind"])


def _agree_or_raise_own(ok: bool, msg: str, err: BaseException | None, what: str, payload):
    """:func:`agree`; the rank that failed raises its own error (with its traceback)."""
    try:
        return agree(ok, msg, what, payload)
    except DistributedError:
        if err is not None:
            raise err
        raise


def solve_group(quantizers: dict[str, LayerQuantizer], shapes: dict[str, tuple[int, int]],
                observe: Callable[[], None] | None, prefix: str = "") -> dict[str, LayerResult]:
    """One sequential group across every rank -> name -> LayerResult (the same on all).

    ``observe`` runs this rank's calibration shard through the group (None: no data);
    ``shapes``: each layer's weight shape (N, K), for the assignment; ``prefix``: the block's,
    for messages. Layers of other ranks
    are dropped from ``quantizers`` once their statistics are sent.
    """
    world, me = dist.get_world_size(), dist.get_rank()
    names = list(quantizers)
    ok, msg, err, states = True, "", None, {}
    try:
        if observe is not None:
            observe()
        states = {n: quantizers[n].state_for_reduce() for n in names}
    except Exception as e:  # every rank must hear of it before the next collective
        ok, msg, err = False, f"{type(e).__name__}: {e}", e
    counts_all = _agree_or_raise_own(ok, msg, err, "observing calibration inputs",
                                     {n: s[1] for n, s in states.items() if s is not None})
    counts = {n: sum(c.get(n, 0) for c in counts_all) for n in names}
    owners = assign_layers({n: layer_cost(shapes[n]) for n in names}, world)
    _reduce_statistics(quantizers, owners, counts, states, prefix)
    del states
    for n in names:
        if owners[n] != me:
            del quantizers[n]  # free its statistics: its owner quantizes it
    mine, metas = {}, {}
    for n in names:
        if owners[n] == me:
            try:
                mine[n] = quantizers[n].quantize()
                metas[n] = _result_meta(mine[n])
            except Exception as e:
                ok, msg, err = False, f"quantizing {prefix}{n}: {type(e).__name__}: {e}", e
                break
    gathered = _agree_or_raise_own(ok, msg, err, "quantizing its layers", metas)
    all_meta = {n: m for part in gathered for n, m in part.items()}
    return {n: _broadcast_result(prefix + n, mine.get(n), all_meta[n], owners[n])
            for n in names}


def on_rank0(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` (e.g. writing the checkpoint) on rank 0 only, once every rank has arrived
    here; every rank returns rank 0's result (pickle-able) or raises its error. Without a
    group: ``fn()``."""
    if not active():
        return fn()
    agree(True, "", f"waiting for every rank before {what}")
    ok, msg, out, err = True, "", None, None
    if dist.get_rank() == 0:
        try:
            out = fn()
        except Exception as e:
            ok, msg, err = False, f"{type(e).__name__}: {e}", e
    return _agree_or_raise_own(ok, msg, err, what, out)[0]
