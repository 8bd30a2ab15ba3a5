"""``kvant bench``: every method on one model, side by side, from one float reference.

Each configuration of the grid (methods x bits x group sizes, plus full specs) quantizes its
own copy of the same float model with the same calibration windows, then is scored on the
same evaluation windows against one :class:`kvant.eval.kl.FloatReference` (the float model
runs once): perplexity and the mean KL divergence of the next-token distributions. A
configuration that cannot run (a group size that does not divide a layer, a combination a
method refuses) becomes a record with its ``error``; the grid goes on.

This module says what runs (:class:`BenchSettings`, :func:`grid`, the row labels);
:mod:`kvant.bench_run` measures it (:func:`~kvant.bench_run.prepare` loads the model and
draws what every configuration shares, :func:`~kvant.bench_run.run_grid` scores);
:func:`kvant.bench_output.bench` adds the output directory (JSON, Markdown, plot) and
resuming. The model must fit in host memory twice (the float model and one copy).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from kvant.algorithms.registry import available, config_class, config_from_spec
from kvant.config import VALID_BITS, ConfigError, MethodConfig, check_device


EMBEDDED = ("nanogpt", "default", "embedded")  # names of the embedded nanoGPT model
KL_STORES = ("auto", "full", "host", "topk")  # kvant.eval.kl.STORES


@dataclass(frozen=True)
class BenchSettings:
    """What ``kvant bench`` runs and how it scores (checked when built).

    methods: method names, each crossed with every ``bits`` and ``group_sizes``.
    bits: the grid's bit widths.
    group_sizes: the grid's group sizes; None keeps each method's own default (16 for SpQR,
        128 for the others). Every other field of a grid config is the method's default.
    specs: further full configurations, run as written (``"gptq:bits=3,act_order=true"``).
    calib, calib_file, n_samples, seq_len, seed: the calibration windows, drawn once
        (:func:`kvant.calibration_for`; seq_len None: the model's context, at most 2048).
    eval: the evaluation text: None for the embedded validation text (nanoGPT) or
        WikiText-2 test (other models), ``"wikitext2"``, or a text file; ``eval_file``: a
        local copy of WikiText-2's ``wiki.test.raw``.
    eval_seq_len: evaluation window (None: as the calibration's). max_windows: score only
        the first windows (None: all).
    eval_batch_size: windows per forward (None: 16 for nanoGPT, 1 for other models).
    device: compute device (None: cuda when present).
    kl_store: how the float reference keeps its log-probabilities
        (:class:`kvant.eval.kl.FloatReference`: "auto", "full", "host" or "topk").
    """

    methods: tuple[str, ...] = ("rtn", "gptq", "awq")
    bits: tuple[int, ...] = (4, 3)
    group_sizes: tuple[int | None, ...] = (None,)
    specs: tuple[str, ...] = ()
    calib: str | None = None
    calib_file: str | None = None
    n_samples: int = 128
    seq_len: int | None = None
    seed: int = 0
    eval: str | None = None
    eval_file: str | None = None
    eval_seq_len: int | None = None
    max_windows: int | None = None
    eval_batch_size: int | None = None
    device: str | None = None
    kl_store: str = "auto"

    def __post_init__(self) -> None:
        for name in ("methods", "bits", "group_sizes", "specs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        known = available()
        for m in self.methods:
            if m not in known:
                raise ConfigError(f"unknown method {m!r}; available: {', '.join(known)}")
        for b in self.bits:
            if b not in VALID_BITS or isinstance(b, bool):
                raise ConfigError(f"bits must be among {list(VALID_BITS)}, got {b!r}")
        for g in self.group_sizes:
            if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < -1):
                raise ConfigError(f"group sizes are -1 (per channel), 0 (per tensor) or a "
                                  f"positive int, got {g!r}")
        for s in self.specs:
            config_from_spec(s)  # a spec written out in full must be valid: refuse now
        if self.methods and not self.bits:
            raise ConfigError("no bit widths given for the methods")
        if not self.methods and not self.specs:
            raise ConfigError("nothing to run: give methods (and bits) or specs")
        for name in ("n_samples", "seq_len", "eval_seq_len", "max_windows", "eval_batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if self.kl_store not in KL_STORES:
            raise ConfigError(f"kl_store must be one of {KL_STORES}, got {self.kl_store!r}")
        check_device(self.device)


@dataclass(frozen=True)
class GridItem:
    """One configuration of the grid: the spec asked for and its config, or why it has none."""

    spec: str
    config: MethodConfig | None
    error: str | None = None

    @property
    def key(self) -> str:
        """What identifies the configuration in results (two spellings of one config match)."""
        if self.config is None:
            return "spec:" + self.spec
        return config_key(self.config.to_dict())


def config_key(config_dict: dict) -> str:
    """The canonical text of a config dict (``MethodConfig.to_dict``)."""
    return json.dumps(config_dict, sort_keys=True)


def config_label(cfg: MethodConfig) -> str:
    """The method's name plus the options that make it a variant (``gptq-actorder``,
    ``awq+gptq``, ``awq+gptq-rescore0``, ``rot+rtn``, ``rtn+outliers``, ``-clip``, ``-sym``,
    ``-sink128``, ``-plainmix``)."""
    name = cfg.method
    rounding, base = getattr(cfg, "rounding", None), getattr(cfg, "base", None)
    if name == "awq" and rounding == "gptq":
        name = "awq+gptq"
        if cfg.gptq_rescore != type(cfg).gptq_rescore:  # how many alphas GPTQ rescores
            name += f"-rescore{cfg.gptq_rescore}"
    elif name == "quip" and rounding == "rtn":
        name = "rot+rtn"
    elif name == "spqr" and base == "rtn":
        name = "rtn+outliers"
    if getattr(cfg, "act_order", False) and cfg.method != "spqr":  # SpQR's default
        name += "-actorder"
    if getattr(cfg, "clip", False):
        name += "-clip"
    if cfg.sym:
        name += "-sym"
    sink = getattr(cfg, "sink_weight", 1.0)
    if sink != 1.0:  # the attention-sink weight of the Hessian (WalkConfig) and its cap
        name += f"-sink{sink:g}"
        share = getattr(cfg, "sink_max_share", None)
        if share is not None and share != type(cfg).sink_max_share:  # not the default
            name += f"-share{share:g}"
    if getattr(cfg, "gguf_mix", "auto") != "auto":  # llama.cpp's per-tensor types followed
        name += f"-{cfg.gguf_mix}mix"
    return name


def grid(settings: BenchSettings) -> list[GridItem]:
    """Every configuration of ``settings`` in order, duplicates dropped; a grid point the
    method refuses (e.g. GPTQ with one scale per tensor) is an item with its error."""
    items: list[GridItem] = []
    for method in settings.methods:
        cls = config_class(method)
        for bits in settings.bits:
            for gs in settings.group_sizes:
                fields = {"bits": bits} if gs is None else {"bits": bits, "group_size": gs}
                spec = f"{method}:" + ",".join(f"{k}={v}" for k, v in fields.items())
                try:
                    items.append(GridItem(spec, cls.from_dict(fields)))
                except ConfigError as e:
                    items.append(GridItem(spec, None, str(e)))
    items += [GridItem(s, config_from_spec(s)) for s in settings.specs]
    seen, out = set(), []
    for it in items:
        if it.key not in seen:
            seen.add(it.key)
            out.append(it)
    return out


def settings_dict(settings: BenchSettings) -> dict:
    """The settings as a JSON-ready dict."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
