"""fusedwd: fused optimizer kernels for PyTorch, built around decoupled weight decay.

Public API: the optimizers, the reference update rules, and backend discovery.
"""

from __future__ import annotations

from typing import Union

import torch

from . import reference, schedules
from ._spec import BACKENDS, DECAY_MODES
from .groups import param_groups
from .optim import SGDW, AdamW, RMSpropW
from . import ops  # registers torch.ops.fusedwd.*, which a compiled step calls  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AdamW", "SGDW", "RMSpropW", "param_groups", "schedules", "reference", "available_backends",
    "DECAY_MODES", "BACKENDS", "__version__",
]


def available_backends(device: Union[str, torch.device] = "cpu") -> list[str]:
    """The backends that can step parameters on ``device``, fastest first.

    Example:
        >>> fusedwd.available_backends("cpu")
        ['cpu', 'reference']
        >>> fusedwd.available_backends("cuda")  # CUDA extension built, Triton installed
        ['cuda', 'triton', 'reference']
    """
    from . import _cuda_ext, _ext

    device = torch.device(device)
    backends = []
    if device.type == "cpu" and _ext.has_cpu():
        backends.append("cpu")
    # Triton only where it compiles for the device: the interpreter (TRITON_INTERPRET=1)
    # also steps CPU tensors, but it is a testing aid, far slower than the reference.
    if device.type == "cuda" and _cuda_ext.has_cuda() and _cuda_ext.unusable(device) is None:
        backends.append("cuda")
    if device.type == "cuda" and torch.cuda.is_available() and _ext.triton_unusable(device) is None:
        backends.append("triton")
    backends.append("reference")
    return backends
