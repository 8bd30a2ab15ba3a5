"""The ``grid`` field of a method config: "int" (kvant's own uniform grids) or "gguf:TYPE"
(llama.cpp's block formats, kvant.core.gguf_grid), and which methods can round on them.
A GGUF grid rounds each Linear on llama.cpp's type for it (kvant.core.gguf_mix):
:func:`with_gguf_type` is the config of a Linear whose type differs from the grid's."""

from __future__ import annotations

import dataclasses
from typing import Any


# which of llama.cpp's per-tensor type rules a GGUF grid follows (MethodConfig.gguf_mix)
GGUF_MIXES = ("auto", "imatrix", "plain")

# why a method cannot round on llama.cpp's grids
_NO_GGUF = {
    "quip": "QuIP rounds W in a rotated basis (U W V^T) that a GGUF file cannot undo",
    "spqr": "SpQR keeps fp16 outliers and quantized statistics that no GGUF type holds",
    "quipsharp": "QuIP# stores lattice codes in a rotated basis, which no GGUF type holds",
}


def check_gguf_grid(cfg: Any):
    """Validate ``cfg.grid``; for "gguf:TYPE" fix bits / group_size to the type's and return
    the type, for "int" return None."""
    from kvant.config import ConfigError  # config imports this module lazily

    g = cfg.grid
    if not isinstance(g, str) or not (g == "int" or g.lower().startswith("gguf:")):
        raise ConfigError(f"grid must be 'int' or 'gguf:TYPE', got {g!r}")
    if cfg.gguf_mix not in GGUF_MIXES:
        raise ConfigError(f"gguf_mix must be one of {list(GGUF_MIXES)}, got {cfg.gguf_mix!r}")
    if g == "int":
        if cfg.gguf_mix != "auto":
            raise ConfigError(f"gguf_mix={cfg.gguf_mix!r} applies only to a 'gguf:TYPE' grid")
        return None
    from kvant.core.gguf_grid import TYPES

    name = g.split(":", 1)[1].upper()
    if name not in TYPES:  # EXPORT_TYPES, and the other types of llama.cpp's mixes
        raise ConfigError(f"grid {g!r}: unknown GGUF type {name!r}; one of {list(TYPES)}")
    t = TYPES[name]
    if cfg.method in _NO_GGUF or not cfg.method:
        raise ConfigError(f"grid {g!r} is not supported by method {cfg.method!r}: "
                          f"{_NO_GGUF.get(cfg.method, 'no GGUF rounding')}")
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for field, want in (("bits", t.bits), ("group_size", t.block)):
        v = getattr(cfg, field)
        if v != want and v != defaults[field]:
            raise ConfigError(f"{field}={v!r} conflicts with grid {g!r} ({t.bits}-bit codes in "
                              f"blocks of {t.block}); leave {field} unset")
    for field in ("sym", "clip", "act_order", "static_groups"):
        if getattr(cfg, field, False) is True:
            raise ConfigError(f"{field}=True does not apply to grid {g!r}: llama.cpp's blocks "
                              "fix the grid and keep columns in order")
    if cfg.method == "awq" and (not cfg.fold or cfg.scale_unfoldable
                                or cfg.outlier_budget > 0):
        raise ConfigError(f"AWQ on grid {g!r} needs fold=True, scale_unfoldable=False and no "
                          "outlier_budget: a GGUF file has no input_scale or outliers")
    object.__setattr__(cfg, "grid", "gguf:" + name)
    object.__setattr__(cfg, "bits", t.bits)
    object.__setattr__(cfg, "group_size", t.block)
    return t


def uses_imatrix_mix(cfg: Any, calibrated: bool) -> bool:
    """Whether a GGUF grid follows llama.cpp's importance-matrix types (kvant.core.gguf_mix:
    at Q4_0 / Q5_0 a few early ffn_down one type wider; "plain" is the smallest file):
    ``cfg.gguf_mix``, where "auto" means yes for a method that calibrates on data."""
    return calibrated if cfg.gguf_mix == "auto" else cfg.gguf_mix == "imatrix"


def with_gguf_type(cfg: Any, name: str):
    """``cfg`` rounding on GGUF type ``name`` instead of its grid's type (one tensor of
    llama.cpp's per-tensor mix); bits and group size follow the type."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, grid="gguf:" + name, bits=defaults["bits"],
                               group_size=defaults["group_size"])
