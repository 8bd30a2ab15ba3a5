"""kvant's error types: what a user did wrong, said in one line.

Every error kvant raises on purpose is a :class:`KvantError`; the CLI prints its message as
``kvant: error: ...`` and exits 2. ``KvantError`` subclasses ``ValueError`` so code that
catches ``ValueError`` keeps working. Anything else reaching the CLI is a bug in kvant (or
in a library below it) and is reported as such.
"""

from __future__ import annotations


class KvantError(ValueError):
    """Base of every error kvant raises on purpose; the message names the problem."""


class InputError(KvantError):
    """A bad argument: a config field, a calibration set, a model path, a device, an option."""


class CheckpointError(KvantError):
    """A checkpoint (kvant's own or an export) is missing, corrupted, edited or unsupported."""


class OutputError(KvantError):
    """The output path cannot be written safely (it holds foreign data, is locked, ...)."""


class ResourceError(KvantError):
    """The run would need more memory (or disk) than the machine has; the message gives both
    numbers, so the user can pick smaller settings before any work is done."""
