"""Loads the compiled modules, keeping the ImportError to re-raise on use.

Importing fusedwd never fails because an extension is missing: the error is
kept and raised, with its original message, only when a backend that needs
the extension is asked for.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Optional

_cpu: Optional[ModuleType] = None
_cpu_error: Optional[BaseException] = None

try:
    from . import _C as _cpu  # type: ignore[attr-defined, no-redef]
except ImportError as exc:  # built without a compiler, or a broken build
    _cpu_error = exc

_warned_fallback = False


def has_cpu() -> bool:
    """Whether the compiled CPU kernel (fusedwd._C) was built and loads."""
    return _cpu is not None


def cpu() -> ModuleType:
    """The compiled CPU module, or a RuntimeError that says why it is missing."""
    if _cpu is None:
        raise RuntimeError(
            "backend='cpu' needs the compiled extension fusedwd._C, which failed to import "
            f"({_cpu_error!r}). Reinstall with a C++ compiler available (`pip install .`) "
            "or use backend='reference'."
        ) from _cpu_error
    return _cpu


def warn_fallback_once() -> None:
    """One warning per process when backend='auto' falls back to the reference."""
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            "fusedwd: the compiled CPU kernel is not available "
            f"({_cpu_error!r}); backend='auto' falls back to the pure-torch reference, "
            "which is correct but not fused. Reinstall with a C++ compiler to get the kernel.",
            RuntimeWarning,
            stacklevel=3,
        )
