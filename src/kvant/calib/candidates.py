"""The candidates of mixed precision: which (method, bits, group size) every layer may take.

A candidate is a full method config: the user's config at another width or group size, or
(with :attr:`kvant.calib.plan.MixedConfig.methods`) another method's default config at that
width, e.g. ``quipsharp`` at 2, 3 and 4 bits beside ``gptq`` at 8. Each method keeps only
the widths and group sizes its own config accepts (quipsharp stores 2, 3 or 4 bits with one
scale per row, group size -1), so the default candidate set is "every width each method
stores"; a width or group size the user names that no candidate method accepts is one clear
error, as is a method that is left without any candidate.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from kvant.config import VALID_BITS, ConfigError, MethodConfig


class Cand(NamedTuple):
    """One candidate of a layer: its method name, bits and group size."""

    method: str
    bits: int
    group_size: int


def candidate_config(config: MethodConfig, method: str, bits: int,
                     group_size: int) -> MethodConfig:
    """The config of one candidate: ``config`` at ``bits`` / ``group_size`` when ``method``
    is its own method (or ""), else ``method``'s default config at that width, with
    ``config``'s ignore patterns. Raises ConfigError when the method refuses the width."""
    if method in ("", config.method):
        return dataclasses.replace(config, bits=bits, group_size=group_size)
    from kvant.algorithms.registry import config_class

    return config_class(method)(bits=bits, group_size=group_size, ignore=config.ignore)


def _own_group(config: MethodConfig, method: str) -> int:
    if method == config.method:
        return config.group_size
    from kvant.algorithms.registry import config_class

    return config_class(method)().group_size


def candidate_configs(config: MethodConfig, mixed) -> dict[Cand, MethodConfig]:
    """Every candidate of ``mixed`` (a :class:`kvant.calib.plan.MixedConfig`) for a run of
    ``config``: the widths ``mixed.widths`` (empty: every width in VALID_BITS) and group
    sizes ``mixed.group_sizes`` (empty: each method's own) that each method of
    ``(config.method, *mixed.methods)`` accepts; a method that accepts none of the named
    group sizes keeps its own. Raises ConfigError (one line) for a named width or group size
    no method accepts, and for a method left without candidates."""
    methods = [config.method] + [m for m in mixed.methods if m != config.method]
    widths = mixed.widths or VALID_BITS
    out: dict[Cand, MethodConfig] = {}
    why: dict[tuple[str, int], str] = {}  # (what, value) -> the first refusal's reason
    for method in methods:
        own = _own_group(config, method)  # an unknown method name: ConfigError here
        groups = list(mixed.group_sizes) or [own]
        found = {}
        for attempt in (groups, [own]) if mixed.group_sizes else (groups,):
            for g in attempt:
                for b in widths:
                    try:
                        found[Cand(method, b, g)] = candidate_config(config, method, b, g)
                    except ConfigError as e:
                        why.setdefault(("bits", b), f"{method}: {e}")
                        why.setdefault(("group", g), f"{method}: {e}")
            if found:
                break
        if not found:
            raise ConfigError(f"method {method!r} has no candidate among widths "
                              f"{list(widths)} and group sizes {groups}: "
                              f"{why.get(('bits', widths[0]), '')}")
        out.update(found)
    for b in mixed.widths:
        if not any(c.bits == b for c in out):
            raise ConfigError(f"width {b} is not stored by any candidate method "
                              f"({why[('bits', b)]}); leave it out of the widths")
    for g in mixed.group_sizes:
        if not any(c.group_size == g for c in out):
            raise ConfigError(f"group size {g} is not accepted by any candidate method "
                              f"({why[('group', g)]}); leave it out of the group sizes")
    return out
