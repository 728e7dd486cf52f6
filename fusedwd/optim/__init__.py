"""Optimizer wrappers: torch.optim.Optimizer subclasses over fused kernels."""

from .adamw import AdamW
from .lion import Lion
from .rmspropw import RMSpropW
from .sgdw import SGDW

__all__ = ["AdamW", "SGDW", "RMSpropW", "Lion"]
