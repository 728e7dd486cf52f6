"""Loads the compiled CUDA module, keeping the ImportError to re-raise on use.

Like fusedwd/_ext.py for the CPU module: importing fusedwd never fails because
``fusedwd._C_cuda`` is missing (built without nvcc, ``FUSEDWD_CUDA=0``) or
because there is no GPU. The module links cudart statically and imports on a
machine without a driver; ``device_count()`` is 0 there. ``cuda()`` raises a
RuntimeError saying which of the two is missing.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

_cuda: Optional[ModuleType] = None
_cuda_error: Optional[BaseException] = None

try:
    from . import _C_cuda as _cuda  # type: ignore[attr-defined, no-redef]
except ImportError as exc:  # built without nvcc, FUSEDWD_CUDA=0, or a broken build
    _cuda_error = exc


def is_built() -> bool:
    """Whether the compiled CUDA module (fusedwd._C_cuda) was built and imports."""
    return _cuda is not None


def device_count() -> int:
    """CUDA devices the module can launch on: 0 when it is not built, without a driver or without a GPU."""
    return _cuda.device_count() if _cuda is not None else 0


def has_cuda() -> bool:
    """Whether backend='cuda' can run here: the module is built and sees a GPU."""
    return device_count() > 0


def cuda() -> ModuleType:
    """The compiled CUDA module, or a RuntimeError that says why backend='cuda' cannot run."""
    if _cuda is None:
        raise RuntimeError(
            "backend='cuda' needs the compiled extension fusedwd._C_cuda, which failed to import "
            f"({_cuda_error!r}). Reinstall with the CUDA toolkit's nvcc available "
            "(`FUSEDWD_CUDA=1 pip install .` fails loudly if it is not) or use backend='reference'."
        ) from _cuda_error
    if _cuda.device_count() == 0:
        raise RuntimeError(
            f"backend='cuda' found no usable GPU: {_cuda.status() or 'no CUDA device'}. "
            f"fusedwd._C_cuda was built for sm_{_cuda.ARCHS.replace(';', ', sm_')} with CUDA runtime "
            f"{_cuda.CUDART_VERSION // 1000}.{_cuda.CUDART_VERSION % 1000 // 10}."
        )
    return _cuda
