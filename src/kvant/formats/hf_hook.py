"""Register kvant with transformers when transformers is imported, not at ``import kvant``.

Registration (:func:`kvant.formats.hf_integration.register`) needs transformers' modeling
code, which costs seconds to import; most kvant work never touches it. So ``import kvant``
registers at once only when transformers is already imported, and otherwise puts a finder on
``sys.meta_path`` that lets the ordinary finders find ``transformers`` and, once its package
module has run, registers (the import system's documented extension point, PEP 451). The
loader the finder hands out delegates to the real one and puts the real one back on the
module (``__loader__``, ``__spec__.loader``) after running it, so the imported transformers
is the same as without kvant. The finder leaves ``sys.meta_path`` after the first real
import; ``importlib.util.find_spec("transformers")`` alone (an availability check) triggers
nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

_TARGET = "transformers"
_log = logging.getLogger(__name__)


def _register() -> None:
    try:
        from kvant.formats import hf_integration

        hf_integration.register()
    except Exception as e:  # noqa: BLE001 - never break the user's import of transformers
        _log.warning("kvant could not register with transformers (%s: %s); kvant "
                     "checkpoints will not load through from_pretrained", type(e).__name__, e)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader, then registers kvant; everything else is the real loader's."""

    def __init__(self, inner, finder: "_TransformersImportHook"):
        self._inner, self._finder = inner, finder

    def __getattr__(self, name):  # get_code, is_package, get_resource_reader, ...
        return getattr(self._inner, name)

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._inner
        if module.__spec__ is not None:
            module.__spec__.loader = self._inner
        self._inner.exec_module(module)
        self._finder.remove()
        _register()


class _TransformersImportHook(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` entry that only ever answers for the top-level ``transformers``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        self.remove()  # let the other finders answer (and not come back here)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader, self)
        return spec

    def remove(self) -> None:
        while self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Register now when transformers is imported, else when it is (idempotent)."""
    if _TARGET in sys.modules:
        _register()
        return
    if not any(isinstance(f, _TransformersImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersImportHook())
