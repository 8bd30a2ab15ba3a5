"""Method name -> (config class, method class). Algorithms register themselves."""

from __future__ import annotations

import importlib

from kvant.config import ConfigError, MethodConfig

_METHODS: dict[str, tuple[type, type]] = {}
# modules that register methods when imported
_MODULES = ("rtn", "gptq", "awq", "quip", "spqr", "quipsharp")


def register(config_cls: type):
    """Class decorator: ``@register(GPTQConfig) class GPTQ(QuantMethod)``."""

    def deco(cls):
        _METHODS[config_cls.method] = (config_cls, cls)
        return cls

    return deco


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"kvant.algorithms.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"kvant.algorithms.{mod}":
                raise


def available() -> list[str]:
    """Names of the registered methods."""
    _load_all()
    return sorted(_METHODS)


def config_class(method: str) -> type:
    """The config class of ``method``."""
    _load_all()
    if method not in _METHODS:
        raise ConfigError(f"unknown method {method!r}; available: {sorted(_METHODS)}")
    return _METHODS[method][0]


def method_class(config: MethodConfig) -> type:
    """The method class of a config: its class-level declarations (``needs_calibration``,
    ``calibrates(config)``, ``supports_distributed``) are read without building it."""
    config_class(config.method)  # a clear error for an unknown method
    return _METHODS[config.method][1]


def needs_calibration(config: MethodConfig) -> bool:
    """Whether quantizing with ``config`` needs calibration data."""
    return method_class(config).calibrates(config)


def build(config: MethodConfig):
    """The method object for a config."""
    return method_class(config)(config)


def config_from_dict(d: dict) -> MethodConfig:
    """Any method's config from its ``to_dict`` form."""
    if "method" not in d:
        raise ConfigError("config dict has no 'method' key")
    return config_class(d["method"]).from_dict(d)


def parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def config_from_spec(spec: str) -> MethodConfig:
    """A config from a compact spec, e.g. ``"gptq:bits=3,group_size=128,act_order=true"``.

    Used by benchmark scripts and the CLI to name a configuration in one string. A key
    given twice is an error, except ``ignore`` (``ignore=lm_head,ignore=mlp.c_proj``: each
    value is one module name).
    """
    method, _, rest = spec.partition(":")
    fields: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"bad item {item!r} in spec {spec!r}: expected key=value")
        add_field(fields, key.strip(), parse_value(value.strip()), f"spec {spec!r}")
    return config_class(method.strip()).from_dict(fields)


def add_field(fields: dict, key: str, value, where: str) -> None:
    """Put ``key=value`` into ``fields``; a key given twice is an error (which one was
    meant?), except ``ignore``, whose values collect into a list of module names."""
    if key == "ignore":
        fields.setdefault("ignore", []).append(str(value))
        return
    if key in fields:
        raise ConfigError(f"{key!r} is given twice in {where} ({fields[key]!r} and {value!r})")
    fields[key] = value
