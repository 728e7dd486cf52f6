"""Loads the compiled modules, keeping the ImportError to re-raise on use.

Importing fusedwd never fails because an extension is missing: the error is
kept and raised, with its original message, only when a backend that needs
the extension is asked for. The Triton kernels (fusedwd.triton) are loaded the
same way, on first need.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Optional

import torch

_cpu: Optional[ModuleType] = None
_cpu_error: Optional[BaseException] = None

try:
    from . import _C as _cpu  # type: ignore[attr-defined, no-redef]
except ImportError as exc:  # built without a compiler, or a broken build
    _cpu_error = exc

_warned_fallback = False

# fusedwd.triton is imported on first need, not with fusedwd: importing Triton
# takes a second, and CPU-only users never need it.
_triton: Optional[ModuleType] = None
_triton_error: Optional[BaseException] = None
_triton_tried = False


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


# ---------------------------------------------------------------------- Triton
def _load_triton() -> Optional[ModuleType]:
    global _triton, _triton_error, _triton_tried
    if not _triton_tried:
        _triton_tried = True
        try:
            from . import triton as module
        # a broken Triton install can fail with more than ImportError; either way
        # the backend is missing and backend='auto' must still work
        except Exception as exc:
            _triton_error = exc
        else:
            _triton = module
    return _triton


def has_triton() -> bool:
    """Whether Triton imports and fusedwd's Triton kernels are defined (imports them on first call)."""
    return _load_triton() is not None


def triton_unusable(device: torch.device) -> Optional[str]:
    """Why backend='triton' cannot step tensors on ``device``, or None when it can."""
    module = _load_triton()
    if module is None:
        return (
            f"backend='triton' needs Triton, which failed to import ({_triton_error!r}); "
            "install it (`pip install triton`) or use backend='auto' or 'reference'"
        )
    if module.INTERPRETED:
        if device.type != "cpu":
            return (
                f"backend='triton' under TRITON_INTERPRET=1 runs the kernels on the host and takes CPU tensors, "
                f"but a parameter is on {device}; run without TRITON_INTERPRET (read when fusedwd.triton is "
                "first imported) to compile them for the GPU"
            )
        return None
    if device.type == "cpu":
        return (
            "backend='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "fusedwd.triton is first imported (it is slow, meant for tests), or use backend='cpu'"
        )
    if device.type != "cuda":
        return f"backend='triton' runs on CUDA tensors, but a parameter is on {device}"
    if not torch.cuda.is_available():
        return "backend='triton' needs a CUDA device, and torch.cuda.is_available() is False"
    return None


def triton(device: torch.device) -> ModuleType:
    """fusedwd.triton, or a RuntimeError that says why it cannot step tensors on ``device``."""
    reason = triton_unusable(device)
    if reason is not None:
        raise RuntimeError(reason) from _triton_error
    assert _triton is not None
    return _triton
